//! Compiles the xDS, WDS, authorization, CA and our config protos (common/proto/) with protox
//! (pure Rust, no protoc needed) into prost messages and tonic clients/servers.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/discovery.proto",
        "proto/workload.proto",
        "proto/authorization.proto",
        "proto/citadel.proto",
        "proto/mesh_config.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}

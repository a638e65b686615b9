//! Waypoint binary: the per-service L7 proxy. Its data path is tracked by its own issue; until it
//! lands the binary says so and exits non-zero rather than pretending to proxy.

fn main() -> anyhow::Result<()> {
    anyhow::bail!(
        "waypoint {}: the L7 data path is not implemented yet (see the waypoint issue)",
        env!("CARGO_PKG_VERSION")
    )
}

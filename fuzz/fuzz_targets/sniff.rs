//! The waypoint's protocol sniffing (HTTP/1, h2c preface, TLS, opaque) on untrusted bytes,
//! whole and through the bounded async detector.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../../waypoint/src/client_hello.rs"]
#[allow(dead_code)]
mod client_hello;
#[path = "../../waypoint/src/sniff.rs"]
#[allow(dead_code)]
mod sniff;

fuzz_target!(|data: &[u8]| {
    let _ = sniff::classify(data);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut reader = data;
        // Ends (a verdict or an error) in bounded virtual time on any input.
        let r = tokio::time::timeout(
            std::time::Duration::from_secs(3600),
            sniff::detect(&mut reader, std::time::Duration::from_millis(300)),
        )
        .await;
        assert!(r.is_ok(), "detection did not end");
    });
});

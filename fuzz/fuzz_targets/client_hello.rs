//! The waypoint's ClientHello parser (SNI for `tls` routes) on untrusted first bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../../waypoint/src/client_hello.rs"]
#[allow(dead_code)]
mod client_hello;

fuzz_target!(|data: &[u8]| {
    let verdict = client_hello::verdict(data);
    let sni = client_hello::server_name(data);
    if let Some(name) = &sni {
        // A name was only read from a complete record, and it is a bounded hostname.
        assert_eq!(verdict, client_hello::Verdict::Complete, "{name:?}");
        assert!(name.len() <= u16::MAX as usize);
    }
    // More bytes never change a settled verdict: a prefix already known not to be TLS, or
    // already holding a complete first record, says the same as the whole.
    for cut in [1, data.len() / 2] {
        if cut == 0 || cut > data.len() {
            continue;
        }
        let early = client_hello::verdict(&data[..cut]);
        if early != client_hello::Verdict::Incomplete {
            assert_eq!(early, verdict, "prefix of {cut} bytes");
        }
    }
});

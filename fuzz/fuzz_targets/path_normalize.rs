//! Request path normalization before authorization and routing: never a panic; the result is
//! a fixed point (normalizing again changes nothing) with no dot segments, no empty segments
//! and no percent-escaped unreserved characters left — the forms that bypassed a DENY.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(out) = common::l7::path::normalize(text) else {
        return;
    };
    let again = common::l7::path::normalize(&out).expect("a normalized path is accepted");
    assert_eq!(again, out, "normalization is idempotent");
    let path = out.split('?').next().unwrap_or_default();
    if path == "*" {
        // The asterisk form (`OPTIONS *`) is kept as is.
        return;
    }
    assert!(path.starts_with('/'), "{out}");
    assert!(!path.contains("//"), "{out}");
    for seg in path.split('/').skip(1) {
        assert!(seg != "." && seg != "..", "{out}");
    }
    let bytes = path.as_bytes();
    for i in 0..bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz");
            if let Ok(v) = u8::from_str_radix(hex, 16) {
                let c = v as char;
                assert!(
                    !(c.is_ascii_alphanumeric() || "-._~".contains(c)),
                    "unreserved escape left in {out}"
                );
            }
        }
    }
});

//! Durations from CLI flags and config: any text is a duration or an error (never a panic,
//! e.g. on huge or non-finite values), and certificate lifetimes stay within their bounds.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(d) = common::duration::parse(text) {
        // Usable as a deadline offset without overflow checks failing elsewhere.
        let _ = std::time::Instant::now().checked_add(d);
    }
    if let Ok(ttl) = common::duration::parse_ttl(text) {
        assert!(!ttl.is_zero());
        assert!(ttl <= std::time::Duration::from_secs(87_600 * 3600));
    }
});

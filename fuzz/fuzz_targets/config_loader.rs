//! The local config loader on whole multi-document files: any text is a snapshot or a clear
//! error, never a panic; loading is deterministic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let load = || {
        common::config::load_str(text, "fuzz.yaml")
            // Through serde_json's sorted maps: hash-map iteration order is not a difference.
            .map(|s| serde_json::to_value(&s).map_err(|e| e.to_string()))
            .map_err(|e| e.to_string())
    };
    assert_eq!(load(), load(), "loading is deterministic");
});

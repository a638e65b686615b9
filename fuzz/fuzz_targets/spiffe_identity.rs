//! SPIFFE identity parsing (peer certificates' URI SANs, policy principals): never a panic,
//! and a parsed identity prints to a form that parses back to itself.
#![no_main]
use common::identity::Identity;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = Identity::parse(text) {
        let again = Identity::parse(&id.to_string()).expect("printed identity parses");
        assert_eq!(again, id);
        let principal = Identity::parse(&id.principal()).expect("principal parses");
        assert_eq!(principal, id);
    }
});

//! `forwarded` header parsing (the client address a known waypoint vouches for): arbitrary
//! values never panic, and what we write is read back exactly.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = common::hbone::forwarded_for(text);
        let _ = common::hbone::forwarded_host(text);
    }
    if data.len() >= 19 {
        let port = u16::from_be_bytes([data[0], data[1]]);
        let ip = if data[2] & 1 == 0 {
            IpAddr::V4(Ipv4Addr::new(data[3], data[4], data[5], data[6]))
        } else {
            let mut o = [0u8; 16];
            o.copy_from_slice(&data[3..19]);
            IpAddr::V6(Ipv6Addr::from(o))
        };
        let addr = SocketAddr::new(ip, port);
        let host: String = String::from_utf8_lossy(&data[19..])
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '-')
            .collect();
        let host = (!host.is_empty()).then_some(host);
        let v = common::hbone::forwarded_value(addr, host.as_deref());
        assert_eq!(common::hbone::forwarded_for(&v), Some(addr), "{v}");
        assert_eq!(common::hbone::forwarded_host(&v), host.as_deref(), "{v}");
    }
});

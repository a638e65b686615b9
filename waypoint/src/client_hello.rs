//! TLS ClientHello inspection for VirtualService `tls` routes: is a stream's first record a
//! ClientHello, and which server name (SNI) does it ask for. Bounds-checked parsing of
//! untrusted bytes: anything malformed is "no SNI", never a panic.

/// TLS record content type of a handshake record.
const HANDSHAKE: u8 = 0x16;
/// Handshake message type of a ClientHello.
const CLIENT_HELLO: u8 = 0x01;
/// Extension number of `server_name`.
const SERVER_NAME: u16 = 0;
/// Largest TLS plaintext record body.
pub const MAX_RECORD: usize = 16 * 1024;

/// What the first bytes of a stream say about TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not a TLS handshake record.
    NotTls,
    /// A TLS handshake record, not complete yet.
    Incomplete,
    /// A complete first record (`5 + length` bytes).
    Complete,
}

/// Classifies `buf` as the start of a TLS stream.
pub fn verdict(buf: &[u8]) -> Verdict {
    match buf {
        [] => Verdict::Incomplete,
        [t, ..] if *t != HANDSHAKE => Verdict::NotTls,
        [_] => Verdict::Incomplete,
        [_, major, ..] if *major != 3 => Verdict::NotTls,
        [_, _, _, hi, lo, ..] => {
            let len = usize::from(u16::from_be_bytes([*hi, *lo]));
            if len == 0 || len > MAX_RECORD + 256 {
                Verdict::NotTls
            } else if buf.len() >= 5 + len {
                Verdict::Complete
            } else {
                Verdict::Incomplete
            }
        }
        _ => Verdict::Incomplete,
    }
}

/// A cursor over untrusted bytes.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|b| usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]))
    }
    /// A vector with a `len_bytes`-byte length prefix.
    fn vec(&mut self, len_bytes: usize) -> Option<&'a [u8]> {
        let len = match len_bytes {
            1 => usize::from(self.u8()?),
            2 => usize::from(self.u16()?),
            _ => self.u24()?,
        };
        self.take(len)
    }
}

/// The host name a ClientHello in the first record of `buf` asks for (lower-cased).
pub fn server_name(buf: &[u8]) -> Option<String> {
    // Only from what [`verdict`] calls a complete TLS record (found by fuzzing: a record
    // header with a major version other than 3 was read for a name all the same).
    if verdict(buf) != Verdict::Complete {
        return None;
    }
    let mut record = Reader(buf);
    if record.u8()? != HANDSHAKE {
        return None;
    }
    record.take(2)?; // legacy record version
    let body = record.vec(2)?;
    let mut hs = Reader(body);
    if hs.u8()? != CLIENT_HELLO {
        return None;
    }
    // A ClientHello split over several records is not followed (it would need them all).
    let hello_len = hs.u24()?;
    let mut hello = Reader(hs.take(hello_len)?);
    hello.take(2 + 32)?; // legacy version, random
    hello.vec(1)?; // session id
    hello.vec(2)?; // cipher suites
    hello.vec(1)?; // compression methods
    let mut extensions = Reader(hello.vec(2)?);
    while !extensions.0.is_empty() {
        let kind = extensions.u16()?;
        let data = extensions.vec(2)?;
        if kind != SERVER_NAME {
            continue;
        }
        let mut list = Reader(Reader(data).vec(2)?);
        while !list.0.is_empty() {
            let name_type = list.u8()?;
            let name = list.vec(2)?;
            if name_type == 0 {
                let name = std::str::from_utf8(name).ok()?;
                let valid = !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
                return valid.then(|| name.to_ascii_lowercase());
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// The first flight of a real rustls client connecting to `name`.
    fn client_hello(name: &str) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let server = rustls::pki_types::ServerName::try_from(name.to_string()).expect("name");
        let mut conn = rustls::ClientConnection::new(Arc::new(config), server).expect("client");
        let mut out = Vec::new();
        conn.write_tls(&mut out).expect("ClientHello");
        out
    }

    #[test]
    fn reads_the_server_name_of_a_real_client_hello() {
        let hello = client_hello("V11.Example.com");
        assert_eq!(verdict(&hello), Verdict::Complete);
        assert_eq!(server_name(&hello).as_deref(), Some("v11.example.com"));
        for cut in [1, 4, 5, 40, hello.len() - 1] {
            assert_eq!(verdict(&hello[..cut]), Verdict::Incomplete, "cut at {cut}");
        }
    }

    #[test]
    fn malformed_or_foreign_bytes_are_no_sni_and_no_panic() {
        assert_eq!(verdict(b"GET / HTTP/1.1\r\n"), Verdict::NotTls);
        assert_eq!(verdict(b"\x16\x01\x00\x00\x05"), Verdict::NotTls);
        assert_eq!(
            verdict(b"\x16\x03\x01\xff\xff"),
            Verdict::NotTls,
            "oversized"
        );
        assert_eq!(server_name(b"\x16\x03\x01\x00\x04\x01\x00\x00\x10"), None);
        let hello = client_hello("a.example.com");
        // Every truncation and every single-byte corruption parses without panicking.
        for cut in 0..hello.len() {
            let _ = server_name(&hello[..cut]);
        }
        for i in 0..hello.len() {
            let mut bad = hello.clone();
            bad[i] ^= 0xff;
            let _ = server_name(&bad);
        }
        // An IP address is never sent as SNI; a hello without the extension has none.
        assert_eq!(server_name(&client_hello("10.1.2.3")), None);
        // A record that is not TLS by its version (major 0, found by fuzzing) has no name,
        // though the rest is a well-formed hello.
        let mut foreign = client_hello("b.example.com");
        foreign[1] = 0;
        assert_eq!(verdict(&foreign), Verdict::NotTls);
        assert_eq!(server_name(&foreign), None);
    }
}

use super::{normalize, PathRejected};

/// (input, normalized)
const CASES: &[(&str, &str)] = &[
    // Unchanged.
    ("/", "/"),
    ("/admin", "/admin"),
    ("/admin/", "/admin/"),
    ("/a/b/c.txt", "/a/b/c.txt"),
    ("/a/...", "/a/..."),
    ("/a/.b/..c", "/a/.b/..c"),
    // The attack spellings of /admin.
    ("//admin", "/admin"),
    ("///admin", "/admin"),
    ("/./admin", "/admin"),
    ("/././admin", "/admin"),
    ("/%61dmin", "/admin"),
    ("/%41DMIN", "/ADMIN"),
    ("/x/../admin", "/admin"),
    ("/x/y/../../admin", "/admin"),
    ("/../admin", "/admin"),
    ("/../../../admin", "/admin"),
    ("/%2e/admin", "/admin"),
    ("/%2E%2E/admin", "/admin"),
    ("/x/%2e%2e/admin", "/admin"),
    ("/x/.%2e/admin", "/admin"),
    ("/\\admin", "/admin"),
    ("\\admin", "/admin"),
    ("/admin\\x", "/admin/x"),
    ("/x\\..\\admin", "/admin"),
    // `..` removes the empty segment, as in Envoy (normalize, then merge slashes).
    ("/x//..//admin", "/x/admin"),
    ("/x/..//admin", "/admin"),
    ("/admin//x", "/admin/x"),
    ("/admin/./x", "/admin/x"),
    ("/admin/x/..", "/admin/"),
    // Trailing dot segments leave a trailing slash (RFC 3986 §5.2.4).
    ("/admin/.", "/admin/"),
    ("/admin/..", "/"),
    ("/..", "/"),
    ("/.", "/"),
    ("//", "/"),
    ("/a//../b", "/a/b"),
    ("/a/./", "/a/"),
    // Other escapes keep their meaning, hex upper-cased.
    ("/a%20b", "/a%20b"),
    ("/a%2a%3c", "/a%2A%3C"),
    ("/a%3fb", "/a%3Fb"),
    ("/a%25b", "/a%25b"),
    ("/%252F", "/%252F"),
    ("/%7e", "/~"),
    ("/caf\u{e9}/x", "/caf\u{e9}/x"),
    // Query kept byte for byte; fragment dropped.
    ("/a/../b?x=/../&y=%2F\\", "/b?x=/../&y=%2F\\"),
    ("//admin?q=1", "/admin?q=1"),
    ("/admin?", "/admin?"),
    ("/a#frag", "/a"),
    ("/a/..?q#f", "/?q"),
    // Not a path.
    ("*", "*"),
    ("", "/"),
    ("?x=1", "/?x=1"),
];

#[test]
fn normalizes_the_attack_table() {
    for (input, want) in CASES {
        match normalize(input) {
            Ok(got) => assert_eq!(got, *want, "normalize({input:?})"),
            Err(e) => panic!("normalize({input:?}) was rejected: {e}"),
        }
    }
}

#[test]
fn normalization_is_idempotent() {
    for (input, _) in CASES {
        let Ok(once) = normalize(input) else { continue };
        let twice = normalize(&once).map(|c| c.into_owned());
        assert_eq!(twice.as_deref(), Ok(&*once), "{input:?}");
    }
}

#[test]
fn unchanged_paths_are_borrowed() {
    assert!(matches!(
        normalize("/a/b?c=d"),
        Ok(std::borrow::Cow::Borrowed(_))
    ));
    assert!(matches!(normalize("/a//b"), Ok(std::borrow::Cow::Owned(_))));
}

#[test]
fn escaped_slashes_and_bad_escapes_are_rejected() {
    let rejected = [
        ("/admin%2Fx", PathRejected::EscapedSlash),
        ("/admin%2fx", PathRejected::EscapedSlash),
        ("/admin%5Cx", PathRejected::EscapedSlash),
        ("/admin%5cx", PathRejected::EscapedSlash),
        ("%2Fadmin", PathRejected::NotAPath),
        ("admin", PathRejected::NotAPath),
        ("./admin", PathRejected::NotAPath),
        ("/%2e%2e%2fadmin", PathRejected::EscapedSlash),
        ("/a%", PathRejected::MalformedEscape),
        ("/a%4", PathRejected::MalformedEscape),
        ("/a%zz", PathRejected::MalformedEscape),
        ("/a%g1/b", PathRejected::MalformedEscape),
        ("/a%00b", PathRejected::EncodedNul),
    ];
    for (input, why) in rejected {
        assert_eq!(normalize(input), Err(why), "{input:?}");
    }
    // In the query they are data, not path structure.
    assert_eq!(
        normalize("/a?next=%2Fadmin%5C%zz").as_deref(),
        Ok("/a?next=%2Fadmin%5C%zz")
    );
}

/// Every normalized path is absolute, has no empty, `.` or `..` segment and no backslash, and
/// normalizing never panics: random and truncated inputs from a small alphabet rich in the
/// characters that matter.
#[test]
fn random_inputs_never_panic_and_come_out_canonical() {
    const ALPHABET: &[&str] = &[
        "/", "/", ".", "..", "%", "%2", "%2e", "%2E", "%2f", "%5c", "%41", "%zz", "\\", "a", "b",
        "?", "#", "~", "%7E", "\u{e9}", "%00", "%20",
    ];
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..20_000 {
        let len = (next() % 12) as usize;
        let mut s = String::new();
        for _ in 0..len {
            s.push_str(ALPHABET[(next() % ALPHABET.len() as u64) as usize]);
        }
        // Truncated at every char boundary too.
        for cut in (0..=s.len()).filter(|i| s.is_char_boundary(*i)) {
            let input = &s[..cut];
            let Ok(out) = normalize(input) else { continue };
            let path = out.split_once('?').map_or(&*out, |(p, _)| p);
            if path == "*" {
                continue;
            }
            assert!(path.starts_with('/'), "{input:?} → {out:?}");
            assert!(!path.contains('\\'), "{input:?} → {out:?}");
            assert!(!path.contains("//"), "{input:?} → {out:?}");
            for seg in path.split('/').skip(1) {
                assert!(seg != "." && seg != "..", "{input:?} → {out:?}");
            }
            let again = normalize(&out).map(|c| c.into_owned());
            assert_eq!(again.as_deref(), Ok(&*out), "not idempotent: {input:?}");
        }
    }
}

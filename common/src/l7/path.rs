//! Request-path normalization, applied by the waypoint before authorization and routing (and
//! the normalized path is what goes upstream), so a policy on `/admin` cannot be dodged by
//! spelling the same resource differently (`//admin`, `/./admin`, `/%61dmin`, `/x/../admin`,
//! `/admin\x`).
//!
//! What Istio's default `BASE` normalization does in Envoy (`normalize_path: true`,
//! `merge_slashes: true`), step by step on the path (the query string is kept byte for byte,
//! a `#fragment` is dropped):
//! 1. percent-escapes of unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded, the hex
//!    digits of every other escape are upper-cased (RFC 3986 §6.2.2.1–2);
//! 2. a backslash `\` becomes `/` (as Envoy's URL canonicalizer treats it);
//! 3. dot segments are removed (RFC 3986 §5.2.4); `..` never climbs above the root, so
//!    `/../admin` is `/admin`;
//! 4. runs of slashes are merged into one.
//!
//! Deliberate difference: BASE keeps escaped slashes and backslashes (`%2F`, `%5C`) unchanged,
//! which leaves `/admin%2Fx` outside a `/admin/*` rule while many servers decode it to
//! `/admin/x`. Here such a path is rejected ([`PathRejected::EscapedSlash`], 400 at the
//! waypoint; Envoy's `REJECT_REQUEST`), as is a malformed escape (`%`, `%4`, `%zz`) or a percent-
//! encoded NUL, whose meaning upstream is anyone's guess.

use std::borrow::Cow;
use std::fmt;

/// Why a request path is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathRejected {
    /// `%2F` / `%2f` / `%5C` / `%5c` in the path.
    EscapedSlash,
    /// `%` not followed by two hex digits.
    MalformedEscape,
    /// `%00`.
    EncodedNul,
    /// A target that is neither a path starting with `/` nor `*`.
    NotAPath,
}

impl fmt::Display for PathRejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PathRejected::EscapedSlash => {
                "the path contains an escaped slash or backslash (%2F, %5C)"
            }
            PathRejected::MalformedEscape => "the path contains a malformed percent-escape",
            PathRejected::EncodedNul => "the path contains an escaped NUL (%00)",
            PathRejected::NotAPath => "the request target is not a path",
        })
    }
}

impl std::error::Error for PathRejected {}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Steps 1 and 2: decode unreserved escapes, upper-case the others, `\` → `/`.
fn decode(path: &str) -> Result<String, PathRejected> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    // Copy runs of ordinary characters as string slices (keeps any UTF-8 intact).
    let mut run_start = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                out.push_str(&path[run_start..i]);
                let (Some(&h), Some(&l)) = (bytes.get(i + 1), bytes.get(i + 2)) else {
                    return Err(PathRejected::MalformedEscape);
                };
                let (Some(hv), Some(lv)) = (hex(h), hex(l)) else {
                    return Err(PathRejected::MalformedEscape);
                };
                let v = hv * 16 + lv;
                match v {
                    0 => return Err(PathRejected::EncodedNul),
                    b'/' | b'\\' => return Err(PathRejected::EscapedSlash),
                    v if unreserved(v) => out.push(char::from(v)),
                    _ => {
                        out.push('%');
                        out.push(char::from(h.to_ascii_uppercase()));
                        out.push(char::from(l.to_ascii_uppercase()));
                    }
                }
                i += 3;
                run_start = i;
            }
            b'\\' => {
                out.push_str(&path[run_start..i]);
                out.push('/');
                i += 1;
                run_start = i;
            }
            _ => i += 1,
        }
    }
    out.push_str(&path[run_start..]);
    Ok(out)
}

/// Steps 3 and 4 on a path starting with `/`: dot-segment removal, then slash merging.
fn resolve(path: &str) -> String {
    // Segments after the leading slash; an empty segment is kept here (merged below) so that
    // `..` removes exactly what RFC 3986 says it removes.
    let mut stack: Vec<&str> = Vec::new();
    let mut segments = path[1..].split('/').peekable();
    // Whether the result ends with a slash (a final `.`/`..` or an empty last segment).
    let mut trailing = false;
    while let Some(seg) = segments.next() {
        let last = segments.peek().is_none();
        match seg {
            "." => trailing = last,
            ".." => {
                stack.pop();
                trailing = last;
            }
            s => {
                stack.push(s);
                trailing = false;
            }
        }
    }
    let mut out = String::with_capacity(path.len());
    for seg in &stack {
        if !seg.is_empty() {
            out.push('/');
            out.push_str(seg);
        }
    }
    let ends_empty = stack.last().is_some_and(|s| s.is_empty());
    if out.is_empty() || trailing || ends_empty {
        out.push('/');
    }
    out
}

/// Normalizes a request target's path and query (`/a/./b?x=1`). The query is kept unchanged;
/// `*` is returned as is and an empty path becomes `/`; anything else must start with `/` (or
/// `\`). Borrowed when nothing changed.
pub fn normalize(path_and_query: &str) -> Result<Cow<'_, str>, PathRejected> {
    let without_fragment = path_and_query
        .split_once('#')
        .map_or(path_and_query, |(p, _)| p);
    let (path, query) = match without_fragment.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (without_fragment, None),
    };
    if path.is_empty() {
        let mut out = String::from("/");
        if let Some(q) = query {
            out.push('?');
            out.push_str(q);
        }
        return Ok(Cow::Owned(out));
    }
    if path == "*" {
        // `OPTIONS *`.
        return Ok(Cow::Borrowed(without_fragment));
    }
    if !path.starts_with(['/', '\\']) {
        return Err(PathRejected::NotAPath);
    }
    let decoded = decode(path)?;
    let resolved = resolve(&decoded);
    let mut out = resolved;
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    if out == path_and_query {
        Ok(Cow::Borrowed(path_and_query))
    } else {
        Ok(Cow::Owned(out))
    }
}

#[cfg(test)]
#[path = "path_tests.rs"]
mod tests;

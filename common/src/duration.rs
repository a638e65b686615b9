//! Durations as users write them on command lines and in config: `500ms`, `5s`, `10m`, `24h`,
//! or a bare number of seconds.

use std::time::Duration;

/// Parses `500ms`, `5s`, `10m`, `24h` or a bare number of seconds.
pub fn parse(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 500ms, 5s, 10m, 24h"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m, h)")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("{s:?} is not a valid duration"));
    }
    Duration::try_from_secs_f64(secs).map_err(|_| format!("{s:?} is too long a duration"))
}

/// Parses a certificate lifetime: like [`parse`], more than zero and at most ten years (the
/// mesh root's own lifetime).
pub fn parse_ttl(s: &str) -> Result<Duration, String> {
    let d = parse(s)?;
    if d.is_zero() || d > MAX_TTL {
        return Err(format!(
            "{s:?}: a certificate lifetime must be above 0 and at most 87600h"
        ));
    }
    Ok(d)
}

const MAX_TTL: Duration = Duration::from_secs(3650 * 86400);

/// What a deadline too far to represent becomes: about thirty years, i.e. never.
const FAR_FUTURE: Duration = Duration::from_secs(30 * 365 * 86400);

/// `now + d` on tokio's clock, saturating at a far-future instant instead of panicking (a
/// timeout from configuration can be anything up to `Duration::MAX`).
pub fn deadline(d: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(d.min(FAR_FUTURE)).unwrap_or(now)
}

/// `now + d` on the standard clock, saturating like [`deadline`].
pub fn std_deadline(d: Duration) -> std::time::Instant {
    std_after(std::time::Instant::now(), d)
}

/// `at + d`, saturating like [`deadline`].
pub fn std_after(at: std::time::Instant, d: Duration) -> std::time::Instant {
    at.checked_add(d.min(FAR_FUTURE)).unwrap_or(at)
}

#[cfg(test)]
mod tests {
    use super::parse as parse_duration;
    use std::time::Duration;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86400));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("abc").is_err());
    }

    /// Values past what a `Duration` holds are errors, not panics.
    #[test]
    fn hostile_durations_are_errors() {
        for s in [
            "99999999999999999999999h",
            "1e400",
            "-5s",
            "NaN",
            "inf",
            "18446744073709551616",
        ] {
            assert!(parse_duration(s).is_err(), "{s}");
        }
        // Big but representable is fine.
        assert!(parse_duration("99999999999s").is_ok());
    }

    /// A certificate lifetime is bounded (a leaf beyond the mesh root's own lifetime is
    /// meaningless, and the certificate's date fields cannot hold arbitrary years).
    #[test]
    fn certificate_ttl_is_bounded() {
        assert_eq!(super::parse_ttl("24h").unwrap(), Duration::from_secs(86400));
        assert!(super::parse_ttl("876000000h").is_err());
        assert!(super::parse_ttl("0s").is_err());
    }

    /// Deadlines saturate instead of overflowing the clock.
    #[test]
    fn deadlines_saturate() {
        let far = super::deadline(Duration::MAX);
        assert!(far > tokio::time::Instant::now() + Duration::from_secs(86400 * 365));
        let std_far = super::std_deadline(Duration::from_secs(u64::MAX));
        assert!(std_far > std::time::Instant::now());
        let near = super::deadline(Duration::from_secs(1));
        assert!(near <= tokio::time::Instant::now() + Duration::from_secs(1));
    }
}

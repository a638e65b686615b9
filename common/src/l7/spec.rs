//! Pieces shared by the Istio networking specs: the resource envelope and its metadata,
//! durations (`"10s"`, `"1.5s"`, `"100ms"`, `"1h30m"`), percentages (`{value: 12.5}`), port
//! selectors (`{number: 9080}`) and `StringMatch` (`exact` / `prefix` / `regex`).
//!
//! Deserialisation goes through serde with `deny_unknown_fields`; parsed from the document text,
//! serde_yaml_ng reports errors with the field path (`spec.http[0].match[0].uri: unknown field …`).

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use std::collections::BTreeMap;
use std::fmt;

/// A Kubernetes-style resource: `apiVersion`, `kind`, `metadata`, `spec` (and an ignored
/// `status`). Unknown top-level keys are rejected.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Resource<S> {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: Metadata,
    #[serde(default = "Option::default")]
    pub spec: Option<S>,
    #[serde(default)]
    pub status: Option<serde_yaml_ng::Value>,
}

/// Object metadata. Lenient on purpose: `kubectl get -o yaml` output carries `uid`,
/// `resourceVersion`, `managedFields`… which are accepted and ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// A duration written the Istio way: a decimal number with a unit, possibly several
/// (`"10s"`, `"1.5s"`, `"100ms"`, `"1h30m"`, `"0"`). Serialises back in protobuf JSON form
/// (`"1.500s"` → `"1.5s"`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration(pub std::time::Duration);

impl Duration {
    pub fn is_zero(&self) -> bool {
        self.0.is_zero()
    }
}

impl From<Duration> for std::time::Duration {
    fn from(d: Duration) -> Self {
        d.0
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_duration(self.0))
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration such as \"10s\", \"1.5s\" or \"100ms\"")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Duration, E> {
                parse_duration(s).map(Duration).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
                Err(E::custom(format!(
                    "{v} has no unit (write e.g. \"{v}s\" or \"{v}ms\")"
                )))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
                self.visit_u64(v.unsigned_abs())
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Duration, E> {
                Err(E::custom(format!("{v} has no unit (write e.g. \"{v}s\")")))
            }
        }
        d.deserialize_str(V)
    }
}

/// Parses a Go-style duration: one or more `<decimal><unit>` parts with units `h`, `m`, `s`,
/// `ms`, `us`/`µs`, `ns`; `"0"` alone is zero. Negative durations are refused.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let text = s.trim();
    if text == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    if text.starts_with('-') {
        return Err(format!("{s:?}: a duration must not be negative"));
    }
    if text.parse::<f64>().is_ok() {
        return Err(format!(
            "{text} has no unit (write e.g. \"{text}s\" or \"{text}ms\")"
        ));
    }
    let bad = || format!("{s:?} is not a duration (e.g. \"10s\", \"1.5s\", \"100ms\", \"1h30m\")");
    let mut rest = text.strip_prefix('+').unwrap_or(text);
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let int_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        let (int_part, after) = rest.split_at(int_len);
        let (frac_part, after) = match after.strip_prefix('.') {
            Some(f) => {
                let n = f.bytes().take_while(u8::is_ascii_digit).count();
                f.split_at(n)
            }
            None => ("", after),
        };
        if int_part.is_empty() && frac_part.is_empty() {
            return Err(bad());
        }
        let unit_len = after
            .char_indices()
            .find(|(_, c)| c.is_ascii_digit() || *c == '.')
            .map_or(after.len(), |(i, _)| i);
        let (unit, after) = after.split_at(unit_len);
        let nanos_per: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return Err(bad()),
        };
        let int: u128 = if int_part.is_empty() {
            0
        } else {
            int_part.parse().map_err(|_| bad())?
        };
        let frac_digits = &frac_part[..frac_part.len().min(18)];
        let frac: u128 = if frac_digits.is_empty() {
            0
        } else {
            frac_digits.parse().map_err(|_| bad())?
        };
        let scale = 10u128.pow(frac_digits.len() as u32);
        let part = int
            .checked_mul(nanos_per)
            .and_then(|n| n.checked_add(frac * nanos_per / scale))
            .ok_or_else(|| format!("{s:?}: duration too large"))?;
        total = total
            .checked_add(part)
            .ok_or_else(|| format!("{s:?}: duration too large"))?;
        rest = after;
    }
    let secs =
        u64::try_from(total / 1_000_000_000).map_err(|_| format!("{s:?}: duration too large"))?;
    Ok(std::time::Duration::new(
        secs,
        (total % 1_000_000_000) as u32,
    ))
}

/// Protobuf JSON form: seconds with up to nine decimals, trailing zeros dropped (`"0.1s"`).
pub fn format_duration(d: std::time::Duration) -> String {
    if d.subsec_nanos() == 0 {
        return format!("{}s", d.as_secs());
    }
    let frac = format!("{:09}", d.subsec_nanos());
    format!("{}.{}s", d.as_secs(), frac.trim_end_matches('0'))
}

/// Istio's `Percent`: `{value: 12.5}` (0–100, fractions allowed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Percent {
    #[serde(default)]
    pub value: f64,
}

impl Percent {
    pub const HUNDRED: Percent = Percent { value: 100.0 };

    /// Checks the range; `path` names the field in the error.
    pub fn check(&self, path: &str) -> Result<(), (String, String)> {
        if self.value.is_finite() && (0.0..=100.0).contains(&self.value) {
            Ok(())
        } else {
            Err((
                format!("{path}.value"),
                format!("{} is not a percentage between 0 and 100", self.value),
            ))
        }
    }

    /// Whether a request drawn with `random` (any uniformly distributed `u64`) falls inside the
    /// percentage, at a resolution of one in a million as Envoy does.
    pub fn hit(&self, random: u64) -> bool {
        let threshold = (self.value * 10_000.0).round() as u64;
        random % 1_000_000 < threshold
    }
}

/// `port: {number: 9080}`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PortSelector {
    pub number: u16,
}

/// Istio's `StringMatch`: exactly one of `exact`, `prefix`, `regex` (RE2, whole string); none
/// set (`{}`) means "present" where Istio allows it (headers, query parameters).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StringMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration as D;

    #[test]
    fn durations_parse_go_style() {
        let ok = |s: &str| parse_duration(s).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ok("10s"), D::from_secs(10));
        assert_eq!(ok("1.5s"), D::from_millis(1500));
        assert_eq!(ok("100ms"), D::from_millis(100));
        assert_eq!(ok("1h30m"), D::from_secs(5400));
        assert_eq!(ok("0"), D::ZERO);
        assert_eq!(ok("0s"), D::ZERO);
        assert_eq!(ok(".5s"), D::from_millis(500));
        assert_eq!(ok("250us"), D::from_micros(250));
        assert_eq!(ok("1m0.25s"), D::from_millis(60_250));
        for bad in ["", "10", "s", "10x", "-1s", "1.s.s", "1h-5m", "ten s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn durations_serialise_as_protobuf_json() {
        assert_eq!(format_duration(D::from_secs(10)), "10s");
        assert_eq!(format_duration(D::from_millis(1500)), "1.5s");
        assert_eq!(format_duration(D::from_millis(100)), "0.1s");
        assert_eq!(format_duration(D::from_nanos(1)), "0.000000001s");
        let json = serde_json::to_string(&Duration(D::from_millis(250))).expect("serialise");
        assert_eq!(json, "\"0.25s\"");
    }

    #[test]
    fn duration_errors_carry_the_field_path() {
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct T {
            timeout: Duration,
        }
        let e = serde_yaml_ng::from_str::<T>("timeout: 10").expect_err("no unit");
        assert!(e.to_string().starts_with("timeout: 10 has no unit"), "{e}");
        let e = serde_yaml_ng::from_str::<T>("timeout: 3 days").expect_err("bad");
        assert!(
            e.to_string()
                .starts_with("timeout: \"3 days\" is not a duration"),
            "{e}"
        );
    }

    #[test]
    fn percentages_check_range_and_hit() {
        assert!(Percent { value: 12.5 }.check("p").is_ok());
        let (field, msg) = Percent { value: 120.0 }.check("p").expect_err("range");
        assert_eq!(field, "p.value");
        assert!(msg.contains("120"), "{msg}");
        assert!(Percent { value: f64::NAN }.check("p").is_err());
        let ten = Percent { value: 10.0 };
        let hits = (0..1_000_000u64).step_by(7).filter(|r| ten.hit(*r)).count();
        let total = (0..1_000_000u64).step_by(7).count();
        assert!((hits as f64 / total as f64 - 0.10).abs() < 0.001);
        assert!(!Percent { value: 0.0 }.hit(0));
        assert!(Percent::HUNDRED.hit(999_999));
    }
}

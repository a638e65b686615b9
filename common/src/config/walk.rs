//! A small walker over parsed YAML for the hand-compiled Istio resources: typed accessors that
//! carry the field path (`spec.rules[0].from[0].source.ipBlocks[1]`) into every error and
//! mappings that reject unknown keys, naming the allowed ones.

use super::{kind_of, FieldError};
use crate::model::{AddressMatch, StringMatch};
use serde_yaml_ng::{Mapping, Value};
use std::collections::BTreeMap;
use std::net::IpAddr;

pub(super) type R<T> = Result<T, FieldError>;

pub(super) fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// A mapping being walked: knows its path, rejects keys outside `allowed`.
pub(super) struct Obj<'v> {
    pub(super) map: &'v Mapping,
    pub(super) path: String,
}

impl<'v> Obj<'v> {
    pub(super) fn new(v: &'v Value, path: &str, allowed: &[&str]) -> R<Self> {
        let map = mapping(v, path)?;
        for key in map.keys() {
            let Some(key) = key.as_str() else {
                return Err(FieldError::new(
                    path,
                    format!("keys must be strings, found {}", kind_of(key)),
                ));
            };
            if !allowed.contains(&key) {
                let expected = allowed.join(", ");
                return Err(FieldError::new(
                    join(path, key),
                    format!("unknown field (expected one of: {expected})"),
                ));
            }
        }
        Ok(Obj {
            map,
            path: path.to_string(),
        })
    }

    /// The value of `key` (absent when missing or null) and its path.
    pub(super) fn get(&self, key: &str) -> Option<(&'v Value, String)> {
        self.map
            .get(key)
            .filter(|v| !v.is_null())
            .map(|v| (v, join(&self.path, key)))
    }

    pub(super) fn strings(&self, key: &str) -> R<Vec<String>> {
        self.get(key)
            .map_or(Ok(Vec::new()), |(v, p)| strings(v, &p))
    }
}

pub(super) fn mapping<'v>(v: &'v Value, path: &str) -> R<&'v Mapping> {
    v.as_mapping()
        .ok_or_else(|| FieldError::new(path, format!("expected a mapping, found {}", kind_of(v))))
}

pub(super) fn sequence<'v>(v: &'v Value, path: &str) -> R<&'v Vec<Value>> {
    v.as_sequence()
        .ok_or_else(|| FieldError::new(path, format!("expected a list, found {}", kind_of(v))))
}

pub(super) fn string(v: &Value, path: &str) -> R<String> {
    v.as_str()
        .map(str::to_string)
        .ok_or_else(|| FieldError::new(path, format!("expected a string, found {}", kind_of(v))))
}

pub(super) fn strings(v: &Value, path: &str) -> R<Vec<String>> {
    sequence(v, path)?
        .iter()
        .enumerate()
        .map(|(i, item)| string(item, &format!("{path}[{i}]")))
        .collect()
}

pub(super) fn labels(v: &Value, path: &str) -> R<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for (k, val) in mapping(v, path)? {
        let key = string(k, path)?;
        let p = join(path, &key);
        let val = val.as_str().ok_or_else(|| {
            FieldError::new(
                &p,
                format!(
                    "label values must be strings (quote it), found {}",
                    kind_of(val)
                ),
            )
        })?;
        out.insert(key, val.to_string());
    }
    Ok(out)
}

/// A port written as a string (Istio's form) or a number.
pub(super) fn port(v: &Value, path: &str) -> R<u16> {
    let parsed = match v {
        Value::String(s) => s.trim().parse::<u16>().ok(),
        Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
        _ => None,
    };
    match parsed {
        Some(p) if p != 0 => Ok(p),
        _ => {
            let shown = match v {
                Value::String(s) => format!("{s:?}"),
                Value::Number(n) => n.to_string(),
                other => kind_of(other).to_string(),
            };
            Err(FieldError::new(
                path,
                format!("{shown} is not a port number"),
            ))
        }
    }
}

pub(super) fn ports(o: &Obj, key: &str) -> R<Vec<u16>> {
    let Some((v, p)) = o.get(key) else {
        return Ok(Vec::new());
    };
    sequence(v, &p)?
        .iter()
        .enumerate()
        .map(|(i, item)| port(item, &format!("{p}[{i}]")))
        .collect()
}

pub(super) fn address(s: &str, path: &str) -> R<AddressMatch> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(AddressMatch::Ip(ip));
    }
    s.parse::<ipnet::IpNet>()
        .map(AddressMatch::Cidr)
        .map_err(|_| FieldError::new(path, format!("{s:?} is not an IP address or CIDR block")))
}

pub(super) fn addresses(list: &[String], path: &str) -> R<Vec<AddressMatch>> {
    list.iter()
        .enumerate()
        .map(|(i, s)| address(s, &format!("{path}[{i}]")))
        .collect()
}

pub(super) fn plain(list: Vec<String>) -> Vec<StringMatch> {
    list.into_iter().map(StringMatch::Plain).collect()
}

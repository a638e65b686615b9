//! Label selectors (`=`, `==`, `!=`, `in`, `notin`, exists, `!key`) and field selectors
//! (`=`, `==`, `!=` on the fields each kind allows), parsed from query strings.

use crate::error::{ApiError, ApiResult};
use crate::resources::ResourceType;
use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
enum LabelReq {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed `labelSelector`; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LabelSelector(Vec<LabelReq>);

/// Splits on commas that are not inside parentheses.
fn split_top_level(s: &str) -> ApiResult<Vec<String>> {
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut cur = String::new();
    for c in s.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            _ => {}
        }
        if !(0..=1).contains(&depth) {
            return Err(ApiError::bad_request(format!(
                "unable to parse requirement: unbalanced parentheses in {s:?}"
            )));
        }
        if c == ',' && depth == 0 {
            out.push(std::mem::take(&mut cur));
        } else {
            cur.push(c);
        }
    }
    if depth != 0 {
        return Err(ApiError::bad_request(format!(
            "unable to parse requirement: unbalanced parentheses in {s:?}"
        )));
    }
    out.push(cur);
    Ok(out)
}

fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 316
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

fn valid_value(v: &str) -> bool {
    v.len() <= 63
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn checked_key(k: &str) -> ApiResult<String> {
    let k = k.trim();
    if valid_key(k) {
        Ok(k.to_string())
    } else {
        Err(ApiError::bad_request(format!(
            "unable to parse requirement: invalid label key {k:?}"
        )))
    }
}

fn checked_value(v: &str) -> ApiResult<String> {
    let v = v.trim();
    if valid_value(v) {
        Ok(v.to_string())
    } else {
        Err(ApiError::bad_request(format!(
            "unable to parse requirement: invalid label value {v:?}"
        )))
    }
}

impl LabelSelector {
    /// Parses the `labelSelector` query value.
    pub fn parse(s: &str) -> ApiResult<Self> {
        let mut reqs = Vec::new();
        if s.trim().is_empty() {
            return Ok(LabelSelector(reqs));
        }
        for part in split_top_level(s)? {
            let part = part.trim();
            if part.is_empty() {
                return Err(ApiError::bad_request(format!(
                    "unable to parse requirement: empty requirement in {s:?}"
                )));
            }
            reqs.push(Self::parse_req(part)?);
        }
        Ok(LabelSelector(reqs))
    }

    fn parse_req(part: &str) -> ApiResult<LabelReq> {
        if let Some(open) = part.find('(') {
            let close = part
                .rfind(')')
                .filter(|c| *c == part.len() - 1)
                .ok_or_else(|| {
                    ApiError::bad_request(format!("unable to parse requirement: {part:?}"))
                })?;
            let head: Vec<&str> = part[..open].split_whitespace().collect();
            let values = part[open + 1..close]
                .split(',')
                .map(checked_value)
                .collect::<ApiResult<Vec<_>>>()?;
            return match head.as_slice() {
                [key, "in"] => Ok(LabelReq::In(checked_key(key)?, values)),
                [key, "notin"] => Ok(LabelReq::NotIn(checked_key(key)?, values)),
                _ => Err(ApiError::bad_request(format!(
                    "unable to parse requirement: {part:?}"
                ))),
            };
        }
        if let Some(key) = part.strip_prefix('!') {
            return Ok(LabelReq::NotExists(checked_key(key)?));
        }
        if let Some((k, v)) = part.split_once("!=") {
            return Ok(LabelReq::NotEq(checked_key(k)?, checked_value(v)?));
        }
        if let Some((k, v)) = part.split_once("==") {
            return Ok(LabelReq::Eq(checked_key(k)?, checked_value(v)?));
        }
        if let Some((k, v)) = part.split_once('=') {
            return Ok(LabelReq::Eq(checked_key(k)?, checked_value(v)?));
        }
        Ok(LabelReq::Exists(checked_key(part)?))
    }

    /// Whether the object's `metadata.labels` satisfy every requirement.
    pub fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels");
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            LabelReq::Eq(k, v) => get(k) == Some(v.as_str()),
            LabelReq::NotEq(k, v) => get(k) != Some(v.as_str()),
            LabelReq::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelReq::NotIn(k, vs) => !get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelReq::Exists(k) => get(k).is_some(),
            LabelReq::NotExists(k) => get(k).is_none(),
        })
    }
}

/// A parsed `fieldSelector`; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    /// Parses the `fieldSelector` query value, rejecting fields the kind does not support.
    pub fn parse(s: &str, rt: &ResourceType) -> ApiResult<Self> {
        let mut reqs = Vec::new();
        if s.trim().is_empty() {
            return Ok(FieldSelector(reqs));
        }
        for part in s.split(',') {
            let (field, eq, value) = if let Some((f, v)) = part.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = part.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = part.split_once('=') {
                (f, true, v)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid selector: '{s}'; can't understand '{part}'"
                )));
            };
            let field = field.trim();
            if !rt.selectable(field) {
                return Err(ApiError::bad_request(format!(
                    "field label not supported: {field}"
                )));
            }
            reqs.push((field.to_string(), eq, value.trim().to_string()));
        }
        Ok(FieldSelector(reqs))
    }

    /// Whether the object's fields satisfy every requirement (a missing field reads as "").
    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(field, eq, want)| {
            let mut cur = Some(obj);
            for seg in field.split('.') {
                cur = cur.and_then(|c| c.get(seg));
            }
            let have = match cur {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Bool(b)) => b.to_string(),
                Some(Value::Number(n)) => n.to_string(),
                _ => String::new(),
            };
            (have == *want) == *eq
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(labels: Value) -> Value {
        json!({"metadata": {"name": "p", "labels": labels}, "spec": {"nodeName": "n1"}})
    }

    #[test]
    fn label_operators() {
        let p = pod(json!({"app": "a", "tier": "web"}));
        let m = |s: &str| LabelSelector::parse(s).unwrap().matches(&p);
        assert!(m("app=a"));
        assert!(m("app==a,tier"));
        assert!(!m("app!=a"));
        assert!(m("missing!=x"));
        assert!(m("tier in (web, db),app"));
        assert!(!m("tier notin (web)"));
        assert!(m("missing notin (web)"));
        assert!(m("!missing"));
        assert!(!m("!app"));
        assert!(!m("missing"));
        assert!(m(""));
    }

    #[test]
    fn label_parse_errors() {
        for bad in [
            "app in (a",
            "a b c",
            "app=",
            "=x",
            "app in x)",
            ",",
            "app=a b",
        ] {
            if bad == "app=" {
                // An empty value is valid (it matches labels set to "").
                assert!(LabelSelector::parse(bad).is_ok());
                continue;
            }
            assert_eq!(LabelSelector::parse(bad).unwrap_err().code, 400, "{bad}");
        }
    }

    #[test]
    fn field_selectors() {
        let rt = crate::resources::Registry::default()
            .by_plural("", "v1", "pods")
            .unwrap()
            .clone();
        let p = pod(json!({}));
        let m = |s: &str| FieldSelector::parse(s, &rt).unwrap().matches(&p);
        assert!(m("metadata.name=p"));
        assert!(m("spec.nodeName=n1,metadata.name!=q"));
        assert!(!m("spec.nodeName!=n1"));
        assert!(m("status.phase="));
        assert_eq!(
            FieldSelector::parse("spec.containers=x", &rt)
                .unwrap_err()
                .code,
            400
        );
    }
}

//! A proxy's NACK, per resource: the error detail our proxies' client sends lists
//! `<name>: <reason>` entries joined by `; ` (see `common::xds::client`); Istio's ztunnel sends
//! free text. [`resources`] splits it, and each entry becomes a [`NackReport`] that this
//! replica's Event writer consumes through [`super::XdsServer::nack_reports`].

/// One resource a proxy refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NackReport {
    /// The proxy's node id (empty before its first request named it).
    pub node: String,
    pub type_url: String,
    /// The resource name as the proxy wrote it (not checked against the cache).
    pub resource: String,
    pub reason: String,
}

/// Splits a NACK's error detail into `(resource, reason)` entries. An entry starts with a
/// name (no spaces) followed by `: `; text that does not start that way continues the previous
/// entry's reason (a reason may itself contain `; `). Free text with no such entry yields one
/// entry with an empty name.
pub fn resources(message: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for part in message.split("; ") {
        match part.split_once(": ") {
            Some((name, reason)) if !name.is_empty() && !name.contains(char::is_whitespace) => {
                out.push((name.to_string(), reason.to_string()));
            }
            _ => match out.last_mut() {
                Some((_, reason)) => {
                    reason.push_str("; ");
                    reason.push_str(part);
                }
                None => out.push((String::new(), part.to_string())),
            },
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_entries_and_keeps_semicolons_inside_reasons() {
        let m = "VirtualService/default/bad: spec.http[0].route[0].weight: invalid type; \
                 expected u32; DestinationRule/default/x: unknown field `foo`; \
                 configuration: duplicate listener";
        assert_eq!(
            resources(m),
            vec![
                (
                    "VirtualService/default/bad".to_string(),
                    "spec.http[0].route[0].weight: invalid type; expected u32".to_string()
                ),
                (
                    "DestinationRule/default/x".to_string(),
                    "unknown field `foo`".to_string()
                ),
                (
                    "configuration".to_string(),
                    "duplicate listener".to_string()
                ),
            ]
        );
        assert_eq!(
            resources("something went wrong"),
            vec![(String::new(), "something went wrong".to_string())]
        );
    }
}

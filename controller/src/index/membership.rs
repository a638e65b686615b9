//! Ambient enrolment: which pods the mesh captures and reaches over HBONE.
//!
//! A pod is in the mesh when its own `istio.io/dataplane-mode` label is `ambient`, or its
//! namespace's is and the pod does not opt out. Opting out: the pod label
//! `istio.io/dataplane-mode=none` or the annotation `ambient.istio.io/redirection: disabled`.
//! Waypoint pods (label `gateway.networking.k8s.io/gateway-name`) are never captured (they
//! speak HBONE themselves, and their template labels them `dataplane-mode=none`) but are
//! HBONE endpoints. hostNetwork pods are never HBONE (their IP is the node's).
//! Every other pod with an IP is still a workload, with protocol TCP: istiod sends every pod.

use common::config::waypoints::GATEWAY_NAME_LABEL;
use common::model::Protocol;
use std::collections::BTreeMap;

pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
pub const REDIRECTION_ANNOTATION: &str = "ambient.istio.io/redirection";

/// How a pod takes part in the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Membership {
    /// Captured by its node's ztunnel, reached over HBONE.
    Mesh,
    /// A waypoint pod: reached over HBONE, not captured, never bound to a waypoint.
    Waypoint,
    /// Known to the mesh (plain TCP), not captured: outside an ambient namespace, opted out,
    /// or on the host network.
    Outside,
}

impl Membership {
    pub fn protocol(self) -> Protocol {
        match self {
            Membership::Mesh | Membership::Waypoint => Protocol::Hbone,
            Membership::Outside => Protocol::Tcp,
        }
    }
}

/// Decides a pod's membership from its labels, annotations, host-network flag and its
/// namespace's labels (`None`: the Namespace is not known yet, i.e. not ambient).
pub fn membership(
    labels: &BTreeMap<String, String>,
    annotations: &BTreeMap<String, String>,
    host_network: bool,
    namespace_labels: Option<&BTreeMap<String, String>>,
) -> Membership {
    if host_network {
        return Membership::Outside;
    }
    if labels.contains_key(GATEWAY_NAME_LABEL) {
        return Membership::Waypoint;
    }
    let own = labels.get(DATAPLANE_MODE_LABEL).map(String::as_str);
    let opted_out = own == Some("none")
        || annotations.get(REDIRECTION_ANNOTATION).map(String::as_str) == Some("disabled");
    if opted_out {
        return Membership::Outside;
    }
    let ns_ambient = namespace_labels
        .and_then(|l| l.get(DATAPLANE_MODE_LABEL))
        .is_some_and(|m| m == "ambient");
    if own == Some("ambient") || ns_ambient {
        Membership::Mesh
    } else {
        Membership::Outside
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn namespace_pod_label_and_opt_outs() {
        let none = BTreeMap::new();
        let ambient_ns = map(&[(DATAPLANE_MODE_LABEL, "ambient")]);
        assert_eq!(
            membership(&none, &none, false, Some(&ambient_ns)),
            Membership::Mesh
        );
        assert_eq!(membership(&none, &none, false, None), Membership::Outside);
        let pod_ambient = map(&[(DATAPLANE_MODE_LABEL, "ambient")]);
        assert_eq!(
            membership(&pod_ambient, &none, false, None),
            Membership::Mesh
        );
        let pod_none = map(&[(DATAPLANE_MODE_LABEL, "none")]);
        assert_eq!(
            membership(&pod_none, &none, false, Some(&ambient_ns)),
            Membership::Outside
        );
        let disabled = map(&[(REDIRECTION_ANNOTATION, "disabled")]);
        assert_eq!(
            membership(&none, &disabled, false, Some(&ambient_ns)),
            Membership::Outside
        );
        assert_eq!(
            membership(&none, &none, true, Some(&ambient_ns)),
            Membership::Outside
        );
        let waypoint = map(&[(GATEWAY_NAME_LABEL, "wp"), (DATAPLANE_MODE_LABEL, "none")]);
        assert_eq!(
            membership(&waypoint, &none, false, None),
            Membership::Waypoint
        );
        assert_eq!(Membership::Waypoint.protocol(), Protocol::Hbone);
        assert_eq!(Membership::Outside.protocol(), Protocol::Tcp);
    }
}

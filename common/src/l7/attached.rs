//! AuthorizationPolicies attached to a waypoint with `targetRef` / `targetRefs` (Istio's way to
//! bind a policy to a waypoint rather than to workloads): a `Gateway` target
//! (`gateway.networking.k8s.io`) applies to all traffic through that waypoint, a `Service`
//! target to requests for that service through a waypoint. Istio's ztunnels never see them, so
//! they are kept apart from the workload-scoped policies of the snapshot (no ztunnel applies
//! them) and evaluated only by the waypoint, in both forms: [`L7Policy`] for HTTP requests and
//! the L4 [`Authorization`] for streams proxied at L4 (whose HTTP rules fail closed).

use super::policy::L7Policy;
use crate::model::{Authorization, Service};
use serde::Serialize;
use std::sync::Arc;

/// What a policy is attached to (always in the policy's own namespace, as Istio requires).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum PolicyTarget {
    /// A waypoint: the Gateway `name` (its pods carry the `gateway-name` label).
    Gateway { namespace: String, name: String },
    /// A Service by name.
    Service { namespace: String, name: String },
}

/// One attached policy, compiled for HTTP and for L4.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AttachedPolicy {
    pub targets: Vec<PolicyTarget>,
    pub l7: Arc<L7Policy>,
    #[serde(skip)]
    pub l4: Arc<Authorization>,
}

/// The waypoint a request passes through: its Gateway (namespace, name).
#[derive(Debug, Clone, Copy)]
pub struct Through<'a> {
    pub gateway: Option<(&'a str, &'a str)>,
}

impl AttachedPolicy {
    /// Whether the policy applies to a request through the waypoint `through` for `service`
    /// (either target kind is enough).
    pub fn applies(&self, through: Through, service: Option<&Service>) -> bool {
        self.targets.iter().any(|t| match t {
            PolicyTarget::Gateway { namespace, name } => {
                through.gateway == Some((namespace.as_str(), name.as_str()))
            }
            PolicyTarget::Service { namespace, name } => {
                service.is_some_and(|s| s.namespace == *namespace && s.name == *name)
            }
        })
    }
}

impl super::L7Config {
    /// The attached policies that apply to a request through `through` for `service`.
    pub fn attached_for<'a>(
        &'a self,
        through: Through<'a>,
        service: Option<&'a Service>,
    ) -> impl Iterator<Item = &'a AttachedPolicy> + 'a {
        self.attached_policies
            .iter()
            .map(|p| p.as_ref())
            .filter(move |p| p.applies(through, service))
    }
}

//! The kinds the server knows: group, served versions, kind ↔ plural, scope, status
//! subresource and the field selectors each kind supports.

/// One served resource (all versions of a group+kind share one store).
#[derive(Clone, Debug, PartialEq)]
pub struct ResourceType {
    /// API group; empty for the core group.
    pub group: String,
    /// Served versions; objects of the kind are visible under each of them.
    pub versions: Vec<String>,
    /// `kind`, e.g. `Pod`.
    pub kind: String,
    /// Lower-case plural used in URLs, e.g. `pods`.
    pub plural: String,
    /// Namespaced (true) or cluster-scoped (false).
    pub namespaced: bool,
    /// Whether the kind has a `/status` subresource (main writes then ignore `.status`).
    pub status_subresource: bool,
    /// Field selectors accepted besides `metadata.name` and `metadata.namespace`.
    pub selectable_fields: Vec<String>,
}

impl ResourceType {
    /// A resource type with no extra selectable fields.
    pub fn new(
        group: &str,
        versions: &[&str],
        kind: &str,
        plural: &str,
        namespaced: bool,
        status_subresource: bool,
    ) -> Self {
        ResourceType {
            group: group.to_string(),
            versions: versions.iter().map(|v| v.to_string()).collect(),
            kind: kind.to_string(),
            plural: plural.to_string(),
            namespaced,
            status_subresource,
            selectable_fields: Vec::new(),
        }
    }

    fn fields(mut self, fields: &[&str]) -> Self {
        self.selectable_fields = fields.iter().map(|f| f.to_string()).collect();
        self
    }

    /// The first served version (objects are stored in it).
    pub fn storage_version(&self) -> &str {
        self.versions.first().map(String::as_str).unwrap_or("v1")
    }

    /// `apiVersion` for one of the served versions (`v1`, `apps/v1`).
    pub fn api_version(&self, version: &str) -> String {
        if self.group.is_empty() {
            version.to_string()
        } else {
            format!("{}/{}", self.group, version)
        }
    }

    /// `plural.group` (`pods`, `leases.coordination.k8s.io`) as error messages name it.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// Whether `field` may be used in a field selector on this kind.
    pub fn selectable(&self, field: &str) -> bool {
        field == "metadata.name"
            || field == "metadata.namespace"
            || self.selectable_fields.iter().any(|f| f == field)
    }
}

/// Splits an `apiVersion` into (group, version).
pub fn split_api_version(api_version: &str) -> (&str, &str) {
    match api_version.rsplit_once('/') {
        Some((g, v)) => (g, v),
        None => ("", api_version),
    }
}

/// The set of known resource types.
#[derive(Clone, Debug)]
pub struct Registry {
    types: Vec<ResourceType>,
}

impl Default for Registry {
    fn default() -> Self {
        let r = ResourceType::new;
        let istio_net = ["v1", "v1beta1", "v1alpha3"];
        let istio_sec = ["v1", "v1beta1"];
        let gw = ["v1", "v1beta1", "v1alpha2"];
        let types = vec![
            r("", &["v1"], "Namespace", "namespaces", false, true).fields(&["status.phase"]),
            r("", &["v1"], "Pod", "pods", true, true).fields(&[
                "spec.nodeName",
                "spec.restartPolicy",
                "spec.schedulerName",
                "spec.serviceAccountName",
                "spec.hostNetwork",
                "status.phase",
                "status.podIP",
                "status.nominatedNodeName",
            ]),
            r("", &["v1"], "Service", "services", true, true),
            r("", &["v1"], "Endpoints", "endpoints", true, false),
            r(
                "",
                &["v1"],
                "ServiceAccount",
                "serviceaccounts",
                true,
                false,
            ),
            r("", &["v1"], "Node", "nodes", false, true).fields(&["spec.unschedulable"]),
            r("", &["v1"], "ConfigMap", "configmaps", true, false),
            r("", &["v1"], "Secret", "secrets", true, false).fields(&["type"]),
            r("", &["v1"], "Event", "events", true, false).fields(&[
                "involvedObject.kind",
                "involvedObject.namespace",
                "involvedObject.name",
                "involvedObject.uid",
                "involvedObject.apiVersion",
                "involvedObject.resourceVersion",
                "involvedObject.fieldPath",
                "reason",
                "reportingComponent",
                "source",
                "type",
            ]),
            r("events.k8s.io", &["v1"], "Event", "events", true, false),
            r(
                "discovery.k8s.io",
                &["v1"],
                "EndpointSlice",
                "endpointslices",
                true,
                false,
            ),
            r("apps", &["v1"], "Deployment", "deployments", true, true),
            r("apps", &["v1"], "ReplicaSet", "replicasets", true, true),
            r("apps", &["v1"], "StatefulSet", "statefulsets", true, true),
            r("apps", &["v1"], "DaemonSet", "daemonsets", true, true),
            r(
                "autoscaling",
                &["v2"],
                "HorizontalPodAutoscaler",
                "horizontalpodautoscalers",
                true,
                true,
            ),
            r(
                "policy",
                &["v1"],
                "PodDisruptionBudget",
                "poddisruptionbudgets",
                true,
                true,
            ),
            r(
                "apiextensions.k8s.io",
                &["v1"],
                "CustomResourceDefinition",
                "customresourcedefinitions",
                false,
                true,
            ),
            r(
                "coordination.k8s.io",
                &["v1"],
                "Lease",
                "leases",
                true,
                false,
            ),
            r(
                "networking.istio.io",
                &istio_net,
                "VirtualService",
                "virtualservices",
                true,
                true,
            ),
            r(
                "networking.istio.io",
                &istio_net,
                "DestinationRule",
                "destinationrules",
                true,
                true,
            ),
            r(
                "networking.istio.io",
                &istio_net,
                "ServiceEntry",
                "serviceentries",
                true,
                true,
            ),
            r(
                "networking.istio.io",
                &istio_net,
                "Sidecar",
                "sidecars",
                true,
                true,
            ),
            r(
                "networking.istio.io",
                &istio_net,
                "Gateway",
                "gateways",
                true,
                true,
            ),
            r(
                "networking.istio.io",
                &istio_net,
                "WorkloadEntry",
                "workloadentries",
                true,
                true,
            ),
            r(
                "security.istio.io",
                &istio_sec,
                "AuthorizationPolicy",
                "authorizationpolicies",
                true,
                true,
            ),
            r(
                "security.istio.io",
                &istio_sec,
                "PeerAuthentication",
                "peerauthentications",
                true,
                true,
            ),
            r(
                "security.istio.io",
                &istio_sec,
                "RequestAuthentication",
                "requestauthentications",
                true,
                true,
            ),
            r(
                "gateway.networking.k8s.io",
                &gw,
                "Gateway",
                "gateways",
                true,
                true,
            ),
            r(
                "gateway.networking.k8s.io",
                &gw,
                "GatewayClass",
                "gatewayclasses",
                false,
                true,
            ),
            r(
                "gateway.networking.k8s.io",
                &gw,
                "HTTPRoute",
                "httproutes",
                true,
                true,
            ),
            r(
                "gateway.networking.k8s.io",
                &["v1alpha2"],
                "TCPRoute",
                "tcproutes",
                true,
                true,
            ),
            r(
                "gateway.networking.k8s.io",
                &["v1", "v1alpha2"],
                "GRPCRoute",
                "grpcroutes",
                true,
                true,
            ),
        ];
        Registry { types }
    }
}

impl Registry {
    /// Adds a kind (or replaces one with the same group and kind).
    pub fn register(&mut self, t: ResourceType) {
        self.types
            .retain(|x| !(x.group == t.group && x.kind == t.kind));
        self.types.push(t);
    }

    /// Stops serving a kind (its objects stay stored, unreachable, as after a CRD deletion
    /// that has not finished cleaning up).
    pub fn unregister(&mut self, group: &str, kind: &str) {
        self.types.retain(|x| !(x.group == group && x.kind == kind));
    }

    /// The kind a CustomResourceDefinition object defines (served versions only), as the real
    /// server starts serving it once the CRD exists.
    pub fn from_crd(crd: &serde_json::Value) -> Option<ResourceType> {
        let spec = crd.get("spec")?;
        let s = |v: &serde_json::Value, p: &str| v.pointer(p)?.as_str().map(str::to_string);
        let group = s(spec, "/group")?;
        let kind = s(spec, "/names/kind")?;
        let plural = s(spec, "/names/plural")?;
        let versions = spec.get("versions")?.as_array()?;
        let served: Vec<&serde_json::Value> = versions
            .iter()
            .filter(|v| v.get("served").and_then(serde_json::Value::as_bool) == Some(true))
            .collect();
        // The storage version first: the server reports objects in it.
        let mut names: Vec<String> =
            served
                .iter()
                .filter(|v| v.get("storage").and_then(serde_json::Value::as_bool) == Some(true))
                .chain(served.iter().filter(|v| {
                    v.get("storage").and_then(serde_json::Value::as_bool) != Some(true)
                }))
                .filter_map(|v| s(v, "/name"))
                .collect();
        names.dedup();
        if names.is_empty() {
            return None;
        }
        let status = served
            .iter()
            .any(|v| v.pointer("/subresources/status").is_some());
        Some(ResourceType {
            group,
            versions: names,
            kind,
            plural,
            namespaced: s(spec, "/scope").as_deref() != Some("Cluster"),
            status_subresource: status,
            selectable_fields: Vec::new(),
        })
    }

    /// The type served at `/{group}/{version}/{plural}`.
    pub fn by_plural(&self, group: &str, version: &str, plural: &str) -> Option<&ResourceType> {
        self.types.iter().find(|t| {
            t.group == group && t.plural == plural && t.versions.iter().any(|v| v == version)
        })
    }

    /// The type for an object's `apiVersion` + `kind`.
    pub fn by_kind(&self, api_version: &str, kind: &str) -> Option<&ResourceType> {
        let (group, version) = split_api_version(api_version);
        self.types
            .iter()
            .find(|t| t.group == group && t.kind == kind && t.versions.iter().any(|v| v == version))
    }

    /// Every known type.
    pub fn all(&self) -> &[ResourceType] {
        &self.types
    }
}

//! A waypoint's parameters: the controller-wide settings ([`WaypointConfig`]) plus what each
//! Gateway asks for through its annotations or a `spec.infrastructure.parametersRef` ConfigMap
//! (autoscaling, disruption budget, resource requests), validated whole before anything is
//! applied. Precedence: built-in defaults < ConfigMap < Gateway annotations.

use super::gateway::Gateway;
use std::collections::BTreeMap;

/// Annotation prefix whose keys are all ours: an unknown key under it is an error (a typo
/// must not silently fall back to a default).
pub const AUTOSCALING_PREFIX: &str = "autoscaling.ambient.io/";
/// `"true"` (default) or `"false"`: the HorizontalPodAutoscaler.
pub const AUTOSCALING_ENABLED: &str = "autoscaling.ambient.io/enabled";
/// Whole number ≥ 1 (default 2).
pub const MIN_REPLICAS: &str = "autoscaling.ambient.io/min-replicas";
/// Whole number ≥ min-replicas, ≤ 1000 (default 10).
pub const MAX_REPLICAS: &str = "autoscaling.ambient.io/max-replicas";
/// Average CPU utilization target in percent of the request, 1–1000 (default 80).
pub const TARGET_CPU: &str = "autoscaling.ambient.io/target-cpu-utilization";
/// `"true"` (default) or `"false"`: the PodDisruptionBudget (maxUnavailable 1).
pub const PDB_ENABLED: &str = "ambient.io/pod-disruption-budget";
/// CPU request of the waypoint container (default `100m`; the HPA's utilization base).
pub const CPU_REQUEST: &str = "ambient.io/cpu-request";
/// Memory request of the waypoint container (default `128Mi`).
pub const MEMORY_REQUEST: &str = "ambient.io/memory-request";

/// Every parameter: (annotation, ConfigMap key). ConfigMap keys cannot contain `/`.
pub const PARAMETERS: [(&str, &str); 7] = [
    (AUTOSCALING_ENABLED, "autoscaling-enabled"),
    (MIN_REPLICAS, "min-replicas"),
    (MAX_REPLICAS, "max-replicas"),
    (TARGET_CPU, "target-cpu-utilization"),
    (PDB_ENABLED, "pod-disruption-budget"),
    (CPU_REQUEST, "cpu-request"),
    (MEMORY_REQUEST, "memory-request"),
];

/// Controller-wide settings for every waypoint it creates.
#[derive(Debug, Clone, PartialEq)]
pub struct WaypointConfig {
    /// Container image running the `waypoint` binary.
    pub image: String,
    /// `imagePullPolicy` (None: the cluster default).
    pub image_pull_policy: Option<String>,
    /// The control plane's xDS address (`https://host:port`).
    pub xds_address: String,
    /// The control plane's certificate service address.
    pub ca_address: String,
    /// ConfigMap holding the mesh root (`root-cert.pem`), mounted into waypoint pods.
    pub root_configmap: String,
    /// Cluster DNS domain (`cluster.local`), for the address hostname in Gateway status.
    pub domain_suffix: String,
    /// Field manager of every write.
    pub field_manager: String,
    /// How often every Gateway is reconciled again even without events.
    pub resync: std::time::Duration,
}

impl Default for WaypointConfig {
    fn default() -> Self {
        WaypointConfig {
            image: "ambient/waypoint:latest".into(),
            image_pull_policy: None,
            xds_address: "https://ambient-controller.ambient-system.svc:15012".into(),
            ca_address: "https://ambient-controller.ambient-system.svc:15012".into(),
            root_configmap: "istio-ca-root-cert".into(),
            domain_suffix: "cluster.local".into(),
            field_manager: super::FIELD_MANAGER.into(),
            resync: std::time::Duration::from_secs(300),
        }
    }
}

impl WaypointConfig {
    /// Defaults overridden by `WAYPOINT_IMAGE`, `WAYPOINT_IMAGE_PULL_POLICY`,
    /// `WAYPOINT_XDS_ADDRESS`, `WAYPOINT_CA_ADDRESS`, `WAYPOINT_ROOT_CONFIGMAP` and
    /// `CLUSTER_DOMAIN` (empty values are ignored).
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let d = WaypointConfig::default();
        WaypointConfig {
            image: var("WAYPOINT_IMAGE").unwrap_or(d.image),
            image_pull_policy: var("WAYPOINT_IMAGE_PULL_POLICY").or(d.image_pull_policy),
            xds_address: var("WAYPOINT_XDS_ADDRESS").unwrap_or(d.xds_address),
            ca_address: var("WAYPOINT_CA_ADDRESS").unwrap_or(d.ca_address),
            root_configmap: var("WAYPOINT_ROOT_CONFIGMAP").unwrap_or(d.root_configmap),
            domain_suffix: var("CLUSTER_DOMAIN").unwrap_or(d.domain_suffix),
            ..d
        }
    }
}

/// HorizontalPodAutoscaler settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Autoscaling {
    pub min_replicas: i32,
    pub max_replicas: i32,
    pub target_cpu_utilization: i32,
}

/// Everything [`super::render::render`] needs besides the Gateway.
#[derive(Debug, Clone, PartialEq)]
pub struct WaypointParams {
    pub config: WaypointConfig,
    /// None: no HPA (and an existing one is deleted).
    pub autoscaling: Option<Autoscaling>,
    /// Whether to keep a PodDisruptionBudget.
    pub pod_disruption_budget: bool,
    pub cpu_request: String,
    pub memory_request: String,
}

/// A parameter that cannot be used; the message names where it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParamError(pub String);

/// Where a value came from, for messages.
fn origin(source: &Source, annotation: &str) -> String {
    match source {
        Source::Annotation => format!("annotation {annotation}"),
        Source::ConfigMap(name, key) => format!("ConfigMap {name} key {key}"),
    }
}

enum Source {
    Annotation,
    ConfigMap(String, &'static str),
}

fn parse_bool(v: &str, what: &str) -> Result<bool, ParamError> {
    match v.trim() {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(ParamError(format!(
            "{what}: {v:?} is not \"true\" or \"false\""
        ))),
    }
}

fn parse_int(v: &str, what: &str, min: i32, max: i32) -> Result<i32, ParamError> {
    match v.trim().parse::<i32>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        Ok(n) => Err(ParamError(format!(
            "{what}: {n} is out of range ({min}–{max})"
        ))),
        Err(_) => Err(ParamError(format!("{what}: {v:?} is not a whole number"))),
    }
}

/// A Kubernetes resource quantity (`100m`, `0.5`, `128Mi`, `1G`, `1e3`).
pub fn valid_quantity(q: &str) -> bool {
    let suffixes = [
        "", "m", "k", "M", "G", "T", "P", "E", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei",
    ];
    let digits_end = q
        .char_indices()
        .find(|(_, c)| !(c.is_ascii_digit() || *c == '.'))
        .map_or(q.len(), |(i, _)| i);
    let (num, suffix) = q.split_at(digits_end);
    let num_ok = !num.is_empty()
        && num.chars().filter(|c| *c == '.').count() <= 1
        && num.chars().any(|c| c.is_ascii_digit());
    let suffix_ok = suffixes.contains(&suffix)
        || suffix.strip_prefix(['e', 'E']).is_some_and(|e| {
            !e.is_empty() && e.len() <= 2 && e.chars().all(|c| c.is_ascii_digit())
        });
    num_ok && suffix_ok
}

fn parse_quantity(v: &str, what: &str) -> Result<String, ParamError> {
    let v = v.trim();
    let nonzero = v
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .any(|c| matches!(c, '1'..='9'));
    if valid_quantity(v) && nonzero {
        Ok(v.to_string())
    } else {
        Err(ParamError(format!(
            "{what}: {v:?} is not a positive resource quantity (like 100m, 0.5, 128Mi)"
        )))
    }
}

impl WaypointParams {
    /// The parameters of `gw`: defaults, then the data of its parametersRef ConfigMap
    /// (`configmap`: (name, data), already fetched by the caller), then its annotations.
    pub fn resolve(
        gw: &Gateway,
        config: &WaypointConfig,
        configmap: Option<(&str, &BTreeMap<String, String>)>,
    ) -> Result<WaypointParams, ParamError> {
        let annotations = &gw.metadata_annotations();
        if let Some(unknown) = annotations
            .keys()
            .find(|k| k.starts_with(AUTOSCALING_PREFIX) && !PARAMETERS.iter().any(|(a, _)| a == k))
        {
            return Err(ParamError(format!(
                "unknown annotation {unknown} (known: {MIN_REPLICAS}, {MAX_REPLICAS}, {TARGET_CPU}, {AUTOSCALING_ENABLED})"
            )));
        }
        if let Some((name, data)) = configmap {
            if let Some(unknown) = data
                .keys()
                .find(|k| !PARAMETERS.iter().any(|(_, c)| c == k))
            {
                return Err(ParamError(format!(
                    "ConfigMap {name}: unknown key {unknown} (known: {})",
                    PARAMETERS.map(|(_, c)| c).join(", ")
                )));
            }
        }
        // The effective raw value of each parameter and where it came from.
        let lookup = |annotation: &'static str| -> Option<(String, String)> {
            if let Some(v) = annotations.get(annotation) {
                return Some((v.clone(), origin(&Source::Annotation, annotation)));
            }
            let (cm_name, data) = configmap?;
            let (_, key) = PARAMETERS.iter().find(|(a, _)| *a == annotation)?;
            data.get(*key).map(|v| {
                (
                    v.clone(),
                    origin(&Source::ConfigMap(cm_name.to_string(), key), annotation),
                )
            })
        };
        let bool_param = |a: &'static str, default: bool| -> Result<bool, ParamError> {
            lookup(a).map_or(Ok(default), |(v, what)| parse_bool(&v, &what))
        };
        let int_param = |a: &'static str, default: i32, min: i32, max: i32| {
            lookup(a).map_or(Ok(default), |(v, what)| parse_int(&v, &what, min, max))
        };
        let quantity_param = |a: &'static str, default: &str| {
            lookup(a).map_or(Ok(default.to_string()), |(v, what)| {
                parse_quantity(&v, &what)
            })
        };
        let enabled = bool_param(AUTOSCALING_ENABLED, true)?;
        // Validated even when autoscaling is off, so turning it on later cannot surprise.
        let min_replicas = int_param(MIN_REPLICAS, 2, 1, 1000)?;
        let max_replicas = int_param(MAX_REPLICAS, 10.max(min_replicas), 1, 1000)?;
        let target_cpu_utilization = int_param(TARGET_CPU, 80, 1, 1000)?;
        if max_replicas < min_replicas {
            return Err(ParamError(format!(
                "max-replicas {max_replicas} is below min-replicas {min_replicas}"
            )));
        }
        Ok(WaypointParams {
            config: config.clone(),
            autoscaling: enabled.then_some(Autoscaling {
                min_replicas,
                max_replicas,
                target_cpu_utilization,
            }),
            pod_disruption_budget: bool_param(PDB_ENABLED, true)?,
            cpu_request: quantity_param(CPU_REQUEST, "100m")?,
            memory_request: quantity_param(MEMORY_REQUEST, "128Mi")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn gw(annotations: serde_json::Value) -> Gateway {
        serde_json::from_value(json!({
            "metadata": {"name": "wp", "namespace": "app", "uid": "u1", "annotations": annotations},
            "spec": {"gatewayClassName": "istio-waypoint"},
        }))
        .expect("gateway")
    }

    fn resolve(annotations: serde_json::Value) -> Result<WaypointParams, ParamError> {
        WaypointParams::resolve(&gw(annotations), &WaypointConfig::default(), None)
    }

    #[test]
    fn defaults_turn_hpa_and_pdb_on() {
        let p = resolve(json!({})).expect("params");
        assert_eq!(
            p.autoscaling,
            Some(Autoscaling {
                min_replicas: 2,
                max_replicas: 10,
                target_cpu_utilization: 80
            })
        );
        assert!(p.pod_disruption_budget);
        assert_eq!(p.cpu_request, "100m");
        assert_eq!(p.memory_request, "128Mi");
    }

    #[test]
    fn annotations_override_and_disable() {
        let p = resolve(
            json!({MIN_REPLICAS: "3", MAX_REPLICAS: "7", TARGET_CPU: "65",
            PDB_ENABLED: "false", CPU_REQUEST: "250m", MEMORY_REQUEST: "1Gi"}),
        )
        .expect("params");
        assert_eq!(
            p.autoscaling,
            Some(Autoscaling {
                min_replicas: 3,
                max_replicas: 7,
                target_cpu_utilization: 65
            })
        );
        assert!(!p.pod_disruption_budget);
        assert_eq!(
            (p.cpu_request.as_str(), p.memory_request.as_str()),
            ("250m", "1Gi")
        );
        let off = resolve(json!({AUTOSCALING_ENABLED: "false"})).expect("params");
        assert_eq!(off.autoscaling, None);
        // A large minimum raises the default maximum with it.
        let big = resolve(json!({MIN_REPLICAS: "20"})).expect("params");
        assert_eq!(big.autoscaling.map(|a| a.max_replicas), Some(20));
    }

    #[test]
    fn bad_values_are_named_in_the_error() {
        let cases = [
            (
                json!({MIN_REPLICAS: "two"}),
                "annotation autoscaling.ambient.io/min-replicas: \"two\" is not a whole number",
            ),
            (
                json!({MIN_REPLICAS: "0"}),
                "annotation autoscaling.ambient.io/min-replicas: 0 is out of range (1–1000)",
            ),
            (
                json!({MIN_REPLICAS: "5", MAX_REPLICAS: "3"}),
                "max-replicas 3 is below min-replicas 5",
            ),
            (
                json!({AUTOSCALING_ENABLED: "yes"}),
                "annotation autoscaling.ambient.io/enabled: \"yes\" is not \"true\" or \"false\"",
            ),
            (
                json!({"autoscaling.ambient.io/max-replica": "3"}),
                "unknown annotation autoscaling.ambient.io/max-replica",
            ),
            (
                json!({CPU_REQUEST: "lots"}),
                "annotation ambient.io/cpu-request: \"lots\" is not a positive resource quantity",
            ),
            (
                json!({MEMORY_REQUEST: "0"}),
                "annotation ambient.io/memory-request: \"0\" is not a positive resource quantity",
            ),
        ];
        for (annotations, want) in cases {
            let err = resolve(annotations.clone()).expect_err("must fail");
            assert!(
                err.0.starts_with(want),
                "{annotations}: {err} (want {want})"
            );
        }
    }

    #[test]
    fn configmap_values_apply_below_annotations() {
        let data: BTreeMap<String, String> = [
            ("min-replicas", "4"),
            ("max-replicas", "8"),
            ("pod-disruption-budget", "false"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let p = WaypointParams::resolve(
            &gw(json!({MAX_REPLICAS: "6"})),
            &WaypointConfig::default(),
            Some(("wp-params", &data)),
        )
        .expect("params");
        let a = p.autoscaling.expect("hpa");
        assert_eq!((a.min_replicas, a.max_replicas), (4, 6));
        assert!(!p.pod_disruption_budget);
        let mut bad = data.clone();
        bad.insert("min-replicas".into(), "-1".into());
        let err = WaypointParams::resolve(
            &gw(json!({})),
            &WaypointConfig::default(),
            Some(("wp-params", &bad)),
        )
        .expect_err("bad configmap value");
        assert!(
            err.0
                .starts_with("ConfigMap wp-params key min-replicas: -1 is out of range"),
            "{err}"
        );
        bad.insert("replicas".into(), "3".into());
        let err = WaypointParams::resolve(
            &gw(json!({})),
            &WaypointConfig::default(),
            Some(("wp-params", &bad)),
        )
        .expect_err("unknown key");
        assert!(err.0.contains("unknown key replicas"), "{err}");
    }

    #[test]
    fn quantities() {
        for ok in ["100m", "0.5", "1", "128Mi", "2Gi", "1e3", "1.5G"] {
            assert!(valid_quantity(ok), "{ok}");
        }
        for bad in ["", "m", "1.2.3", "12x", "Mi", "-1", "1 Gi"] {
            assert!(!valid_quantity(bad), "{bad}");
        }
    }
}

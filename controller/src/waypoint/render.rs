//! The objects a waypoint Gateway gets, as pure functions of the Gateway and its parameters:
//! ServiceAccount, Deployment (no `replicas`: the HPA owns it), Service, and unless turned
//! off a HorizontalPodAutoscaler and a PodDisruptionBudget. Every object carries the Gateway's
//! controller owner reference and our labels; nothing here talks to the API server.

use super::gateway::{Gateway, InvalidGateway, GATEWAY_NAME_LABEL};
use super::params::WaypointParams;
use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HorizontalPodAutoscaler, HorizontalPodAutoscalerSpec, MetricSpec,
    MetricTarget, ResourceMetricSource,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, HTTPGetAction, ObjectFieldSelector, PodSecurityContext, PodSpec, PodTemplateSpec,
    Probe, ProjectedVolumeSource, ResourceRequirements, SeccompProfile, SecurityContext, Service,
    ServiceAccount, ServiceAccountTokenProjection, ServicePort, ServiceSpec, Volume, VolumeMount,
    VolumeProjection,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::collections::BTreeMap;

/// HBONE port of a waypoint Service as Istio's ztunnel addresses it (`mesh` listener); the
/// waypoint terminates HBONE there too (`--listen-mesh`), so a ztunnel dialing the pod works.
pub const MESH_PORT: i32 = 15008;
/// Port our waypoint terminates HBONE on (`inbound_CONNECT_terminate`).
pub const HBONE_PORT: i32 = 15006;
pub const METRICS_PORT: i32 = 15020;
pub const STATUS_PORT: i32 = 15021;
/// UID/GID the waypoint runs as (Istio's proxy user).
pub const PROXY_UID: i64 = 1337;
/// Where the CA token and the mesh root are mounted.
pub const TOKEN_DIR: &str = "/var/run/secrets/tokens";
pub const TOKEN_FILE: &str = "/var/run/secrets/tokens/istio-token";
pub const ROOT_DIR: &str = "/var/run/secrets/istio";
pub const ROOT_FILE: &str = "/var/run/secrets/istio/root-cert.pem";
/// Audience of the projected service-account token the certificate service checks.
pub const CA_AUDIENCE: &str = "istio-ca";

/// Everything rendered for one Gateway.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub service_account: ServiceAccount,
    /// The service account is the user's (early form): an existing one without our label is
    /// used as is instead of being a conflict.
    pub service_account_is_users: bool,
    pub deployment: Deployment,
    pub service: Service,
    pub hpa: Option<HorizontalPodAutoscaler>,
    pub pdb: Option<PodDisruptionBudget>,
}

impl Rendered {
    /// Every object as JSON (`apiVersion`/`kind` included), in apply order.
    pub fn to_values(&self) -> Result<Vec<serde_json::Value>, serde_json::Error> {
        let mut out = vec![
            serde_json::to_value(&self.service_account)?,
            serde_json::to_value(&self.deployment)?,
            serde_json::to_value(&self.service)?,
        ];
        if let Some(h) = &self.hpa {
            out.push(serde_json::to_value(h)?);
        }
        if let Some(p) = &self.pdb {
            out.push(serde_json::to_value(p)?);
        }
        Ok(out)
    }
}

fn metadata(gw: &Gateway, name: &str) -> Result<ObjectMeta, InvalidGateway> {
    let annotations = gw.object_annotations();
    Ok(ObjectMeta {
        name: Some(name.to_string()),
        namespace: Some(gw.namespace().to_string()),
        labels: Some(gw.object_labels()?),
        annotations: (!annotations.is_empty()).then_some(annotations),
        owner_references: Some(vec![gw.owner_reference()?]),
        ..ObjectMeta::default()
    })
}

fn selector(gw: &Gateway) -> BTreeMap<String, String> {
    BTreeMap::from([(GATEWAY_NAME_LABEL.to_string(), gw.name().to_string())])
}

fn env_field(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn env_value(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

fn port(name: &str, port: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.into()),
        container_port: port,
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    }
}

fn container(params: &WaypointParams) -> Container {
    let cfg = &params.config;
    let args = [
        "run",
        "--xds-address",
        &cfg.xds_address,
        "--xds-root-ca",
        ROOT_FILE,
        "--ca-address",
        &cfg.ca_address,
        "--ca-root",
        ROOT_FILE,
        "--token-file",
        TOKEN_FILE,
        // Expanded by the kubelet from the downward-API variables below.
        "--workload",
        "$(POD_NAMESPACE)/$(POD_NAME)",
        "--node",
        "$(NODE_NAME)",
    ];
    Container {
        name: "waypoint".into(),
        image: Some(cfg.image.clone()),
        image_pull_policy: cfg.image_pull_policy.clone(),
        args: Some(args.iter().map(|a| a.to_string()).collect()),
        env: Some(vec![
            env_field("POD_NAME", "metadata.name"),
            env_field("POD_NAMESPACE", "metadata.namespace"),
            env_field("INSTANCE_IP", "status.podIP"),
            env_field("NODE_NAME", "spec.nodeName"),
            env_field("SERVICE_ACCOUNT", "spec.serviceAccountName"),
            env_value("XDS_ROOT_CA", ROOT_FILE),
        ]),
        ports: Some(vec![
            port("mesh", MESH_PORT),
            port("hbone", HBONE_PORT),
            port("http-monitoring", METRICS_PORT),
            port("status-port", STATUS_PORT),
        ]),
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/healthz/ready".into()),
                port: IntOrString::Int(STATUS_PORT),
                scheme: Some("HTTP".into()),
                ..HTTPGetAction::default()
            }),
            period_seconds: Some(5),
            failure_threshold: Some(4),
            timeout_seconds: Some(3),
            ..Probe::default()
        }),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_string(), Quantity(params.cpu_request.clone())),
                (
                    "memory".to_string(),
                    Quantity(params.memory_request.clone()),
                ),
            ])),
            ..ResourceRequirements::default()
        }),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            run_as_user: Some(PROXY_UID),
            run_as_group: Some(PROXY_UID),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "istio-token".into(),
                mount_path: TOKEN_DIR.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: "mesh-root".into(),
                mount_path: ROOT_DIR.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: "tmp".into(),
                mount_path: "/tmp".into(),
                ..VolumeMount::default()
            },
        ]),
        ..Container::default()
    }
}

fn volumes(params: &WaypointParams) -> Vec<Volume> {
    vec![
        Volume {
            name: "istio-token".into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(CA_AUDIENCE.into()),
                        expiration_seconds: Some(43200),
                        path: "istio-token".into(),
                    }),
                    ..VolumeProjection::default()
                }]),
                ..ProjectedVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: "mesh-root".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: params.config.root_configmap.clone(),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: "tmp".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
    ]
}

fn deployment(
    gw: &Gateway,
    params: &WaypointParams,
    name: &str,
    sa: &str,
) -> Result<Deployment, InvalidGateway> {
    let meta = metadata(gw, name)?;
    let mut pod_labels = gw.object_labels()?;
    pod_labels.extend([
        // Not captured by ztunnel: the waypoint speaks HBONE itself.
        ("istio.io/dataplane-mode".to_string(), "none".to_string()),
        ("sidecar.istio.io/inject".to_string(), "false".to_string()),
        (
            "service.istio.io/canonical-name".to_string(),
            name.to_string(),
        ),
        (
            "service.istio.io/canonical-revision".to_string(),
            "latest".to_string(),
        ),
    ]);
    let mut pod_annotations = gw.object_annotations();
    pod_annotations.extend([
        ("prometheus.io/scrape".to_string(), "true".to_string()),
        ("prometheus.io/port".to_string(), METRICS_PORT.to_string()),
        ("prometheus.io/path".to_string(), "/metrics".to_string()),
    ]);
    Ok(Deployment {
        metadata: meta,
        spec: Some(DeploymentSpec {
            // No `replicas`: the HorizontalPodAutoscaler (or the user) owns the count.
            replicas: None,
            selector: LabelSelector {
                match_labels: Some(selector(gw)),
                ..LabelSelector::default()
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::String("25%".into())),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(pod_annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(sa.to_string()),
                    // The waypoint needs no API access; its CA token is projected below.
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    termination_grace_period_seconds: Some(30),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(PROXY_UID),
                        run_as_group: Some(PROXY_UID),
                        fs_group: Some(PROXY_UID),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..SeccompProfile::default()
                        }),
                        ..PodSecurityContext::default()
                    }),
                    containers: vec![container(params)],
                    volumes: Some(volumes(params)),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    })
}

fn service_port(name: &str, port: i32, target: i32, app_protocol: &str) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port,
        target_port: Some(IntOrString::Int(target)),
        protocol: Some("TCP".into()),
        app_protocol: Some(app_protocol.into()),
        ..ServicePort::default()
    }
}

fn service(gw: &Gateway, name: &str) -> Result<Service, InvalidGateway> {
    let mut meta = metadata(gw, name)?;
    meta.annotations.get_or_insert_with(BTreeMap::new).insert(
        "networking.istio.io/traffic-distribution".into(),
        "PreferClose".into(),
    );
    Ok(Service {
        metadata: meta,
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(selector(gw)),
            ip_family_policy: Some("PreferDualStack".into()),
            ports: Some(vec![
                service_port("status-port", STATUS_PORT, STATUS_PORT, "tcp"),
                service_port("mesh", MESH_PORT, MESH_PORT, "hbone"),
                service_port("hbone", HBONE_PORT, HBONE_PORT, "hbone"),
            ]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    })
}

/// Renders the objects of a waypoint Gateway (one of our classes; the caller checks).
pub fn render(gw: &Gateway, params: &WaypointParams) -> Result<Rendered, InvalidGateway> {
    let name = gw.deployment_name()?;
    let (sa, users) = gw.service_account()?;
    let service_account = ServiceAccount {
        metadata: metadata(gw, &sa)?,
        ..ServiceAccount::default()
    };
    let hpa = match params.autoscaling {
        None => None,
        Some(a) => Some(HorizontalPodAutoscaler {
            metadata: metadata(gw, &name)?,
            spec: Some(HorizontalPodAutoscalerSpec {
                scale_target_ref: CrossVersionObjectReference {
                    api_version: Some("apps/v1".into()),
                    kind: "Deployment".into(),
                    name: name.clone(),
                },
                min_replicas: Some(a.min_replicas),
                max_replicas: a.max_replicas,
                metrics: Some(vec![MetricSpec {
                    type_: "Resource".into(),
                    resource: Some(ResourceMetricSource {
                        name: "cpu".into(),
                        target: MetricTarget {
                            type_: "Utilization".into(),
                            average_utilization: Some(a.target_cpu_utilization),
                            ..MetricTarget::default()
                        },
                    }),
                    ..MetricSpec::default()
                }]),
                ..HorizontalPodAutoscalerSpec::default()
            }),
            ..HorizontalPodAutoscaler::default()
        }),
    };
    let pdb = match params.pod_disruption_budget {
        false => None,
        true => Some(PodDisruptionBudget {
            metadata: metadata(gw, &name)?,
            spec: Some(PodDisruptionBudgetSpec {
                max_unavailable: Some(IntOrString::Int(1)),
                selector: Some(LabelSelector {
                    match_labels: Some(selector(gw)),
                    ..LabelSelector::default()
                }),
                ..PodDisruptionBudgetSpec::default()
            }),
            ..PodDisruptionBudget::default()
        }),
    };
    Ok(Rendered {
        service_account,
        service_account_is_users: users,
        deployment: deployment(gw, params, &name, &sa)?,
        service: service(gw, &name)?,
        hpa,
        pdb,
    })
}

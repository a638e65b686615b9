//! One Gateway's reconcile against the API server: resolve parameters (annotations, the
//! parametersRef ConfigMap), render, refuse to touch an existing object that is not ours,
//! server-side apply every object, delete ours that are no longer wanted (HPA or PDB turned
//! off, renamed), and write status when it changed. A Gateway that is gone (or no longer of
//! our class) gets its objects deleted explicitly, not only through ownerReference GC.

use super::gateway::{Gateway, InvalidGateway, GATEWAY_NAME_LABEL, MANAGED_LABEL, MANAGED_VALUE};
use super::params::{ParamError, WaypointConfig, WaypointParams};
use super::render::render;
use super::status::{desired, owned_part, Outcome};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use serde_json::{json, Value};
use std::collections::BTreeSet;

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("{0}")]
    Kube(#[from] kube::Error),
    #[error("encoding an object: {0}")]
    Json(#[from] serde_json::Error),
}

/// The kinds made for a waypoint, in apply order.
pub fn child_resources() -> [ApiResource; 5] {
    [
        ApiResource::erase::<ServiceAccount>(&()),
        ApiResource::erase::<Deployment>(&()),
        ApiResource::erase::<Service>(&()),
        ApiResource::erase::<HorizontalPodAutoscaler>(&()),
        ApiResource::erase::<PodDisruptionBudget>(&()),
    ]
}

fn resource_of(kind: &str) -> Option<ApiResource> {
    child_resources().into_iter().find(|r| r.kind == kind)
}

/// Label selector of the objects we manage for Gateway `name`.
pub fn managed_selector(name: &str) -> String {
    format!("{MANAGED_LABEL}={MANAGED_VALUE},{GATEWAY_NAME_LABEL}={name}")
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_str()
}

/// RFC 3339 now, whole seconds.
pub fn now_rfc3339() -> String {
    let now = k8s_openapi::jiff::Timestamp::now();
    k8s_openapi::jiff::Timestamp::from_second(now.as_second())
        .unwrap_or(now)
        .to_string()
}

/// Talks to the API server for the waypoint controller.
#[derive(Clone)]
pub struct Reconciler {
    pub client: kube::Client,
    pub config: WaypointConfig,
}

impl Reconciler {
    fn api(&self, ns: &str, ar: &ApiResource) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), ns, ar)
    }

    fn apply_params(&self) -> PatchParams {
        PatchParams::apply(&self.config.field_manager).force()
    }

    /// Reconciles Gateway `ns/name`; `gw` is its current state (None: deleted), `ready_pods`
    /// the number of Ready pods labelled with its name.
    pub async fn reconcile(
        &self,
        ns: &str,
        name: &str,
        gw: Option<&Gateway>,
        ready_pods: usize,
    ) -> Result<(), ReconcileError> {
        let Some(gw) = gw.filter(|g| g.form().is_some()) else {
            let removed = self.delete_managed(ns, name, &BTreeSet::new()).await?;
            if removed > 0 {
                tracing::info!(gateway = %format!("{ns}/{name}"), removed, "waypoint objects deleted");
            }
            return Ok(());
        };
        let outcome = match self.params(gw).await? {
            Err(e) => Outcome::InvalidParameters(e.0),
            Ok(params) => match render(gw, &params) {
                Err(InvalidGateway(m)) => Outcome::InvalidParameters(m),
                Ok(rendered) => {
                    let (skip_sa, conflicts) = self
                        .check_ownership(
                            gw,
                            &rendered.to_values()?,
                            rendered.service_account_is_users,
                        )
                        .await?;
                    if !conflicts.is_empty() {
                        Outcome::Conflict(conflicts.join("; "))
                    } else {
                        let mut keep = BTreeSet::new();
                        let mut service = None;
                        for (i, obj) in rendered.to_values()?.into_iter().enumerate() {
                            if i == 0 && skip_sa {
                                continue;
                            }
                            let kind = str_at(&obj, &["kind"]).unwrap_or_default().to_string();
                            let obj_name = str_at(&obj, &["metadata", "name"])
                                .unwrap_or_default()
                                .to_string();
                            let Some(ar) = resource_of(&kind) else {
                                continue;
                            };
                            let applied = self
                                .api(ns, &ar)
                                .patch(&obj_name, &self.apply_params(), &Patch::Apply(&obj))
                                .await?;
                            if kind == "Service" {
                                service = Some(applied);
                            }
                            keep.insert((kind, obj_name));
                        }
                        let removed = self.delete_managed(ns, gw.name(), &keep).await?;
                        if removed > 0 {
                            tracing::info!(gateway = %format!("{ns}/{}", gw.name()), removed, "unwanted waypoint objects deleted");
                        }
                        let svc_name = rendered.service.metadata.name.clone().unwrap_or_default();
                        Outcome::Applied {
                            hostname: format!("{svc_name}.{ns}.svc.{}", self.config.domain_suffix),
                            cluster_ips: service.map(|s| cluster_ips(&s.data)).unwrap_or_default(),
                            ready_pods,
                        }
                    }
                }
            },
        };
        if let Outcome::InvalidParameters(m) | Outcome::Conflict(m) = &outcome {
            tracing::warn!(gateway = %format!("{ns}/{}", gw.name()), reason = %m, "waypoint not accepted; nothing applied");
        }
        self.write_status(gw, &outcome).await
    }

    /// The Gateway's parameters; `Ok(Err(..))` for parameters that cannot be used.
    async fn params(
        &self,
        gw: &Gateway,
    ) -> Result<Result<WaypointParams, ParamError>, ReconcileError> {
        let pref = gw
            .spec
            .infrastructure
            .as_ref()
            .and_then(|i| i.parameters_ref.as_ref());
        let Some(pref) = pref else {
            return Ok(WaypointParams::resolve(gw, &self.config, None));
        };
        if !pref.group.is_empty() || pref.kind != "ConfigMap" {
            return Ok(Err(ParamError(format!(
                "spec.infrastructure.parametersRef: only a core ConfigMap is supported, not {}/{}",
                pref.group, pref.kind
            ))));
        }
        let cms: Api<ConfigMap> = Api::namespaced(self.client.clone(), gw.namespace());
        let Some(cm) = cms.get_opt(&pref.name).await? else {
            return Ok(Err(ParamError(format!(
                "spec.infrastructure.parametersRef: ConfigMap {}/{} not found",
                gw.namespace(),
                pref.name
            ))));
        };
        let data = cm.data.unwrap_or_default();
        Ok(WaypointParams::resolve(
            gw,
            &self.config,
            Some((&pref.name, &data)),
        ))
    }

    /// Existing objects in the way: returns (the user's own service account exists and is used
    /// as is, conflict messages).
    async fn check_ownership(
        &self,
        gw: &Gateway,
        objects: &[Value],
        sa_is_users: bool,
    ) -> Result<(bool, Vec<String>), ReconcileError> {
        let ns = gw.namespace();
        let mut skip_sa = false;
        let mut conflicts = Vec::new();
        for obj in objects {
            let kind = str_at(obj, &["kind"]).unwrap_or_default();
            let name = str_at(obj, &["metadata", "name"]).unwrap_or_default();
            let Some(ar) = resource_of(kind) else {
                continue;
            };
            let Some(existing) = self.api(ns, &ar).get_opt(name).await? else {
                continue;
            };
            let labels = existing.metadata.labels.clone().unwrap_or_default();
            let managed = labels.get(MANAGED_LABEL).map(String::as_str) == Some(MANAGED_VALUE);
            let for_gw = labels.get(GATEWAY_NAME_LABEL).map(String::as_str);
            match (managed, for_gw) {
                (true, Some(g)) if g == gw.name() => {}
                _ if kind == "ServiceAccount" && sa_is_users && !managed => skip_sa = true,
                (true, other) => conflicts.push(format!(
                    "{kind} {ns}/{name} is managed for Gateway {}: not overwritten",
                    other.unwrap_or("<none>")
                )),
                (false, _) => conflicts.push(format!(
                    "{kind} {ns}/{name} exists and is not managed by this controller (no label {MANAGED_LABEL}={MANAGED_VALUE}): not overwritten"
                )),
            }
        }
        Ok((skip_sa, conflicts))
    }

    /// Deletes our objects for Gateway `ns/name` except those in `keep` (kind, name).
    async fn delete_managed(
        &self,
        ns: &str,
        name: &str,
        keep: &BTreeSet<(String, String)>,
    ) -> Result<usize, ReconcileError> {
        let lp = ListParams::default().labels(&managed_selector(name));
        let mut removed = 0;
        for ar in child_resources() {
            let api = self.api(ns, &ar);
            for obj in api.list(&lp).await?.items {
                let obj_name = obj.metadata.name.clone().unwrap_or_default();
                if keep.contains(&(ar.kind.clone(), obj_name.clone())) {
                    continue;
                }
                match api.delete(&obj_name, &DeleteParams::background()).await {
                    Ok(_) => removed += 1,
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(removed)
    }

    /// Writes the status of `gw` for `outcome` if it differs from the current one.
    async fn write_status(&self, gw: &Gateway, outcome: &Outcome) -> Result<(), ReconcileError> {
        let status = desired(gw, outcome, &now_rfc3339());
        if owned_part(gw.status.as_ref()) == status {
            return Ok(());
        }
        let ar = super::gateway::gateway_resource();
        let body = json!({
            "apiVersion": ar.api_version,
            "kind": ar.kind,
            "metadata": {"name": gw.name(), "namespace": gw.namespace()},
            "status": status,
        });
        self.api(gw.namespace(), &ar)
            .patch_status(gw.name(), &self.apply_params(), &Patch::Apply(&body))
            .await?;
        Ok(())
    }
}

/// A Service's cluster IPs (`clusterIPs`, else `clusterIP`; not `None`).
pub fn cluster_ips(data: &Value) -> Vec<String> {
    let spec = &data["spec"];
    let ips: Vec<String> = match spec.get("clusterIPs").and_then(Value::as_array) {
        Some(list) => list
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect(),
        None => spec
            .get("clusterIP")
            .and_then(Value::as_str)
            .map(|s| vec![s.to_string()])
            .unwrap_or_default(),
    };
    ips.into_iter()
        .filter(|ip| !ip.is_empty() && ip != "None")
        .collect()
}

//! Kubernetes Events about Istio objects: a Warning `Rejected` on an object the index refused
//! (note: field path and message) and a Normal `Accepted` when an object reported rejected is
//! accepted again, both written by the Lease holder only (every replica computes the same
//! verdicts); and a Warning `NackedByProxy` when a proxy NACKs a config resource that names an
//! Istio object (note: the proxy's node id and reason; one per object and reason per minute),
//! written by whichever replica the proxy is connected to, since only that replica sees the
//! NACK. `events.k8s.io/v1` Events, which `kubectl describe` lists with the object
//! (`regarding` carries its uid; `reportingInstance` names the replica).
//!
//! [`plan`] decides (sans-IO); [`run`] writes. The feed publishes the verdicts after every
//! batch ([`crate::feed::feed_with_verdicts`]); NACKs come from
//! [`crate::xds::XdsServer::nack_reports`]. A new leader reports the rejections that exist when
//! it takes over once more (it cannot know what its predecessor wrote).

pub mod plan;

use crate::index::Kind;
use crate::watch::CUSTOM_KINDS;
use crate::xds::NackReport;
use common::xds::{AUTHORIZATION_TYPE, CONFIG_TYPE};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ObjectMeta, PostParams};
use plan::{EventSpec, EventType, NackLimiter, Regarding, Reporter, Verdicts};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// Settings of the Event writer.
#[derive(Debug, Clone)]
pub struct EventsConfig {
    /// `reportingController`.
    pub controller: String,
    /// `reportingInstance`: this replica.
    pub instance: String,
    /// At most one `NackedByProxy` per object and reason per window.
    pub nack_window: Duration,
    /// Retry delay after a failed write.
    pub retry: Duration,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            controller: "ambient-controller".into(),
            instance: "ambient-controller".into(),
            nack_window: Duration::from_secs(60),
            retry: Duration::from_secs(5),
        }
    }
}

/// Most (object, reason) pairs the NACK limiter remembers at once.
const NACK_KEYS: usize = 4096;

/// The `events.k8s.io/v1` Event for `spec`.
pub fn to_event(spec: &EventSpec, cfg: &EventsConfig, now: Timestamp) -> Event {
    Event {
        metadata: ObjectMeta {
            name: Some(format!("{}.{:x}", spec.regarding.name, now.as_nanosecond())),
            namespace: Some(spec.regarding.namespace.clone()),
            ..Default::default()
        },
        event_time: Some(MicroTime(now)),
        type_: Some(spec.type_.as_str().into()),
        reason: Some(spec.reason.into()),
        action: Some(spec.action.into()),
        note: Some(spec.note.clone()),
        regarding: Some(spec.regarding.object_reference()),
        reporting_controller: Some(cfg.controller.clone()),
        reporting_instance: Some(cfg.instance.clone()),
        ..Default::default()
    }
}

async fn write(client: &kube::Client, cfg: &EventsConfig, spec: &EventSpec) -> bool {
    let api: Api<Event> = Api::namespaced(client.clone(), &spec.regarding.namespace);
    match api
        .create(
            &PostParams::default(),
            &to_event(spec, cfg, Timestamp::now()),
        )
        .await
    {
        Ok(_) => {
            tracing::info!(
                object = %format!("{} {}/{}", spec.regarding.kind, spec.regarding.namespace, spec.regarding.name),
                reason = spec.reason, note = %spec.note, "event written"
            );
            true
        }
        Err(e) => {
            tracing::warn!(reason = spec.reason, error = %e, "cannot write an event");
            false
        }
    }
}

/// The Istio object a NACKed resource names: config resources are `<Kind>/<ns>/<name>`,
/// authorizations `<ns>/<name>` (AuthorizationPolicies).
fn nacked_object(report: &NackReport) -> Option<Regarding> {
    match report.type_url.as_str() {
        CONFIG_TYPE => Regarding::from_key(&report.resource),
        AUTHORIZATION_TYPE => Regarding::from_key(&format!(
            "{}/{}",
            Kind::AuthorizationPolicy,
            report.resource
        )),
        _ => None,
    }
}

/// The uid of the object (a GET: only for a NACK that passed the limiter). `None` when it does
/// not exist, so a proxy cannot make us write Events about objects that are not there.
async fn current_uid(client: &kube::Client, r: &Regarding) -> Option<String> {
    let (_, group, version, plural) = CUSTOM_KINDS.iter().find(|(k, ..)| k.as_str() == r.kind)?;
    let gvk = GroupVersionKind::gvk(group, version, &r.kind);
    let ar = ApiResource::from_gvk_with_plural(&gvk, plural);
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &r.namespace, &ar);
    match api.get_opt(&r.name).await {
        Ok(o) => o.and_then(|o| o.metadata.uid),
        Err(e) => {
            tracing::debug!(error = %e, "cannot read a NACKed object");
            None
        }
    }
}

/// Writes verdict Events while `leader` is true and NACK Events always, until `verdicts`'
/// sender is dropped.
pub async fn run(
    client: kube::Client,
    cfg: EventsConfig,
    mut leader: watch::Receiver<bool>,
    mut verdicts: watch::Receiver<Arc<Verdicts>>,
    mut nacks: mpsc::Receiver<NackReport>,
) {
    let mut reporter = Reporter::default();
    let mut limiter = NackLimiter::new(cfg.nack_window, NACK_KEYS);
    let mut failed = false;
    let mut nacks_open = true;
    loop {
        if *leader.borrow_and_update() {
            let current = verdicts.borrow_and_update().clone();
            failed = false;
            for step in reporter.plan(&current) {
                let ok = match &step.event {
                    Some(spec) => write(&client, &cfg, spec).await,
                    None => true,
                };
                if ok {
                    reporter.done(step);
                } else {
                    failed = true;
                }
            }
        }
        let retry = async {
            if failed {
                tokio::time::sleep(cfg.retry).await
            } else {
                std::future::pending().await
            }
        };
        tokio::select! {
            r = leader.changed() => if r.is_err() { return },
            r = verdicts.changed() => if r.is_err() { return },
            n = nacks.recv(), if nacks_open => match n {
                Some(report) => on_nack(&client, &cfg, &mut limiter, report).await,
                None => nacks_open = false,
            },
            _ = retry => {}
        }
    }
}

/// A NACK from one of this replica's own streams (leader or not: no other replica sees it).
async fn on_nack(
    client: &kube::Client,
    cfg: &EventsConfig,
    limiter: &mut NackLimiter,
    report: NackReport,
) {
    let Some(mut regarding) = nacked_object(&report) else {
        return;
    };
    let reason = plan::stable_reason(&report.reason);
    if !limiter.admit(
        tokio::time::Instant::now().into_std(),
        &report.resource,
        reason,
    ) {
        return;
    }
    let Some(uid) = current_uid(client, &regarding).await else {
        return;
    };
    regarding.uid = Some(uid);
    let spec = EventSpec {
        regarding,
        type_: EventType::Warning,
        reason: plan::REASON_NACKED,
        action: "Push",
        note: plan::truncate(&format!("proxy {}: {reason}", report.node)),
    };
    write(client, cfg, &spec).await;
}

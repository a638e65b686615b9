//! Leader election among controller replicas on a `coordination.k8s.io/v1` Lease. Every
//! write is guarded by the Lease's resourceVersion (a replace of the object read), so two
//! replicas can never both win a round; a holder renews at half the lease duration, a lease not
//! renewed within its duration may be taken over, and stopping releases it. Only the holder
//! writes shared objects (root ConfigMaps, waypoint objects); every replica serves gRPC.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, ObjectMeta, PostParams};
use std::time::Duration;
use tokio::sync::watch;

/// Name of the controller's Lease.
pub const LEASE_NAME: &str = "ambient-controller";
/// Lease duration; the holder renews at half of it.
pub const LEASE_SECONDS: u64 = 30;

/// A running election: `is_leader` follows this replica's state.
pub struct Election {
    pub is_leader: watch::Receiver<bool>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Election {
    /// Stops campaigning and releases the lease if held.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if tokio::time::timeout(Duration::from_secs(5), &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
        }
    }
}

impl Drop for Election {
    fn drop(&mut self) {
        if self.stop.is_some() {
            self.task.abort();
        }
    }
}

/// Campaigns for Lease `namespace/name` as `identity` (e.g. the pod name), holding it for
/// `lease_seconds` (at least 2) and renewing at half of that.
pub fn elect(
    client: kube::Client,
    namespace: &str,
    name: &str,
    identity: &str,
    lease_seconds: u64,
) -> Election {
    let lease_seconds = lease_seconds.max(2);
    let api: Api<Lease> = Api::namespaced(client, namespace);
    let (tx, rx) = watch::channel(false);
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel();
    let (name, identity) = (name.to_string(), identity.to_string());
    let task = tokio::spawn(async move {
        let period = Duration::from_millis(lease_seconds * 500);
        loop {
            let leading = match try_acquire(&api, &name, &identity, lease_seconds).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(lease = %name, error = %e, "lease update failed");
                    false
                }
            };
            if *tx.borrow() != leading {
                tracing::info!(lease = %name, identity = %identity, leading, "leadership changed");
                tx.send_replace(leading);
            }
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = &mut stop_rx => {
                    tx.send_replace(false);
                    if leading {
                        if let Err(e) = release(&api, &name, &identity).await {
                            tracing::warn!(lease = %name, error = %e, "lease release failed");
                        }
                    }
                    return;
                }
            }
        }
    });
    Election {
        is_leader: rx,
        stop: Some(stop_tx),
        task,
    }
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// One round: create, renew, or take over an expired lease. True when we hold it afterwards.
async fn try_acquire(
    api: &Api<Lease>,
    name: &str,
    me: &str,
    secs: u64,
) -> Result<bool, kube::Error> {
    let now = Timestamp::now();
    let Some(mut lease) = api.get_opt(name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(me.to_string()),
                lease_duration_seconds: Some(secs as i32),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.get_or_insert_with(Default::default);
    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
    let expired = match (&spec.renew_time, spec.lease_duration_seconds) {
        (Some(MicroTime(t)), Some(d)) => *t + SignedDuration::from_secs(i64::from(d)) < now,
        _ => true,
    };
    let ours = holder.as_deref() == Some(me);
    if !ours && holder.is_some() && !expired {
        return Ok(false);
    }
    if !ours {
        spec.holder_identity = Some(me.to_string());
        spec.acquire_time = Some(MicroTime(now));
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.renew_time = Some(MicroTime(now));
    spec.lease_duration_seconds = Some(secs as i32);
    // The object carries the resourceVersion we read: a concurrent writer makes this a 409.
    match api.replace(name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        Err(e) if is_conflict(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Gives the lease up (if we still hold it) so another replica need not wait for expiry.
async fn release(api: &Api<Lease>, name: &str, me: &str) -> Result<(), kube::Error> {
    let Some(mut lease) = api.get_opt(name).await? else {
        return Ok(());
    };
    let spec = lease.spec.get_or_insert_with(Default::default);
    if spec.holder_identity.as_deref() != Some(me) {
        return Ok(());
    }
    spec.holder_identity = None;
    spec.renew_time = None;
    spec.acquire_time = None;
    match api.replace(name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(()),
        Err(e) if is_conflict(&e) => Ok(()),
        Err(e) => Err(e),
    }
}

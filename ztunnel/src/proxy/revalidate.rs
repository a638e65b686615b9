//! Policy changes reach live connections: each connection ztunnel authorized as the
//! destination side (inbound HBONE streams, same-node deliveries, inbound plaintext) registers
//! what it was authorized on; after a snapshot swap [`check`] re-decides it with the new
//! snapshot, and those no longer allowed (a new DENY, an ALLOW that no longer matches,
//! PeerAuthentication STRICT for plaintext, the destination gone) are closed.

use crate::state::ProxyState;
use common::copy::CopyResult;
use common::identity::Identity;
use common::model::MtlsMode;
use common::revalidate::{Registration, Revoked};
use common::snapshot::Snapshot;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// Which path authorized the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// A CONNECT stream on 15008.
    InboundHbone,
    /// Same-node delivery from 15001.
    Local,
    /// Plaintext on 15006.
    InboundPlaintext,
}

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::InboundHbone => "inbound_hbone",
            Path::Local => "outbound_local",
            Path::InboundPlaintext => "inbound_plaintext",
        }
    }
}

/// The inputs of a live connection's authorization.
#[derive(Debug, Clone)]
pub struct Authorized {
    pub path: Path,
    pub src_ip: IpAddr,
    /// The verified peer identity (`None` for plaintext).
    pub identity: Option<Identity>,
    /// The local pod address the connection is delivered to.
    pub target: SocketAddr,
}

/// Why `a` is no longer allowed under `snap` on `node`, or `None` if it still is.
pub fn decide(snap: &Snapshot, node: &str, a: &Authorized) -> Option<String> {
    let Some(dst) = super::local_workload(snap, node, a.target.ip()) else {
        return Some(format!(
            "{} is no longer a workload on this node",
            a.target.ip()
        ));
    };
    if a.path == Path::InboundPlaintext && snap.mtls_mode(&dst, a.target.port()) == MtlsMode::Strict
    {
        return Some(format!(
            "plaintext refused: PeerAuthentication STRICT for {}",
            dst.name
        ));
    }
    super::authorize(snap, &dst, a.target, a.src_ip, a.identity.as_ref())
        .err()
        .map(|d| d.to_string())
}

/// [`decide`] for the revalidator, logging each connection it closes.
pub fn check(snap: &Snapshot, node: &str, a: &Authorized) -> Option<String> {
    let why = decide(snap, node, a)?;
    tracing::info!(
        target: "access",
        chain = a.path.name(),
        src = %a.src_ip,
        dst = %a.target,
        peer_identity = a.identity.as_ref().map(ToString::to_string).unwrap_or_default(),
        reason = %why,
        "closing live connection: no longer allowed by the new configuration"
    );
    Some(why)
}

/// Registers a connection authorized against `authorized_on`. A swap before the registration
/// may have been swept already without it, so if the snapshot changed since, the connection is
/// decided again here; the error is why it is no longer allowed. Any later swap sweeps it.
pub fn register(
    state: &ProxyState,
    authorized_on: &Arc<Snapshot>,
    a: Authorized,
) -> Result<(Registration<Authorized>, Revoked), String> {
    let registered = state.live.register(a.clone());
    let now = state.config.current();
    if !Arc::ptr_eq(&now, authorized_on) {
        if let Some(why) = decide(&now, &state.node, &a) {
            return Err(why);
        }
    }
    Ok(registered)
}

/// Runs `copy` until it finishes or the connection's authorization is revoked (then the copy
/// is dropped, closing both sides, and the result carries the reason).
pub async fn until_revoked(copy: impl Future<Output = CopyResult>, revoked: Revoked) -> CopyResult {
    tokio::select! {
        r = copy => r,
        why = revoked.wait() => CopyResult {
            error: Some(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!("closed: {why}"),
            )),
            ..Default::default()
        },
    }
}

//! The CA follows its Secret without a restart: when an operator rotates or plugs in a CA
//! (Istio's `cacerts` keys), every replica signs with the new key from then on, and the root
//! bundle — what the CA hands out as the last element of each chain and what the Lease holder
//! publishes as `istio-ca-root-cert` — carries the new root **and the roots it replaced**, so
//! certificates issued before the rotation still verify. A replaced root stays in the bundle
//! for `keep_old_roots` (the longest workload certificate lifetime: every leaf it signed has
//! expired by then; the controller's own serving certificate is re-issued at once) and for
//! as long as the process runs if that is shorter. A Secret that no longer loads, or is
//! deleted, leaves the current CA in place (logged).

use super::root::from_secret;
use common::identity::ca::{
    cert_ders, first_cert_der, pem_of, MeshCa, CA_CERT_FILE, CA_KEY_FILE, CERT_CHAIN_FILE,
    ROOT_CERT_FILE,
};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::runtime::{watcher, WatchStreamExt};
use rustls::pki_types::CertificateDer;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The Secret's plug-in keys, as text.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Material {
    cert: String,
    key: String,
    root: Option<String>,
    chain: Option<String>,
}

impl Material {
    fn of(s: &Secret) -> Option<Material> {
        let get = |k: &str| {
            s.data
                .as_ref()?
                .get(k)
                .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        };
        Some(Material {
            cert: get(CA_CERT_FILE)?,
            key: get(CA_KEY_FILE)?,
            root: get(ROOT_CERT_FILE).filter(|r| !r.trim().is_empty()),
            chain: get(CERT_CHAIN_FILE),
        })
    }

    /// The roots the material itself trusts (the signing certificate when no root is given).
    fn roots(&self) -> Vec<CertificateDer<'static>> {
        match &self.root {
            Some(r) => cert_ders(r),
            None => first_cert_der(&self.cert).into_iter().collect(),
        }
    }
}

/// Sans-IO: the current material and the replaced roots still published.
#[derive(Debug)]
pub struct Rotation {
    trust_domain: String,
    keep_old_roots: Duration,
    material: Option<Material>,
    /// Replaced roots and when they leave the bundle.
    retired: Vec<(CertificateDer<'static>, Instant)>,
}

impl Rotation {
    pub fn new(trust_domain: &str, keep_old_roots: Duration) -> Self {
        Rotation {
            trust_domain: trust_domain.to_string(),
            keep_old_roots,
            material: None,
            retired: Vec::new(),
        }
    }

    /// The Secret as watched. Returns the CA to sign with from now on when it changes.
    /// The first Secret seen that matches `current` (loaded at start) changes nothing.
    pub fn secret(
        &mut self,
        secret: &Secret,
        current: &MeshCa,
        now: Instant,
    ) -> Result<Option<MeshCa>, String> {
        let Some(m) = Material::of(secret) else {
            return Err(format!("missing {CA_CERT_FILE} or {CA_KEY_FILE}"));
        };
        if self.material.as_ref() == Some(&m) {
            return Ok(None);
        }
        if self.material.is_none() {
            let loaded =
                from_secret(secret, "ca", &self.trust_domain).map_err(|e| e.to_string())?;
            if loaded.signing_pems().0 == current.signing_pems().0
                && loaded.root_pem() == current.root_pem()
            {
                self.material = Some(m);
                return Ok(None);
            }
        }
        let new_roots = m.roots();
        let expiry = now + self.keep_old_roots;
        for old in current.root_ders() {
            if !new_roots.contains(old) && !self.retired.iter().any(|(r, _)| r == old) {
                self.retired.push((old.clone(), expiry));
            }
        }
        self.retired.retain(|(r, _)| !new_roots.contains(r));
        let ca = self.build(&m)?;
        self.material = Some(m);
        Ok(Some(ca))
    }

    /// Drops the replaced roots whose time is up; the CA without them when any was dropped.
    pub fn expire(&mut self, now: Instant) -> Result<Option<MeshCa>, String> {
        let before = self.retired.len();
        self.retired.retain(|(_, t)| *t > now);
        if self.retired.len() == before {
            return Ok(None);
        }
        match self.material.clone() {
            Some(m) => self.build(&m).map(Some),
            None => Ok(None),
        }
    }

    /// When the next replaced root leaves the bundle.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.retired.iter().map(|(_, t)| *t).min()
    }

    fn build(&self, m: &Material) -> Result<MeshCa, String> {
        let mut bundle: String = m.roots().iter().map(pem_of).collect();
        for (r, _) in &self.retired {
            bundle.push_str(&pem_of(r));
        }
        // Nothing retired: exactly what a restart would load.
        let root = if self.retired.is_empty() {
            m.root.clone()
        } else {
            Some(bundle)
        };
        MeshCa::from_plugin_pems(
            &self.trust_domain,
            &m.cert,
            &m.key,
            root.as_deref(),
            m.chain.as_deref(),
        )
        .map_err(|e| e.to_string())
    }
}

/// What [`follow_secret`] publishes.
pub struct Following {
    /// The CA to sign with.
    pub ca: watch::Receiver<Arc<MeshCa>>,
    /// Its root bundle (PEM), for the root ConfigMaps.
    pub roots: watch::Receiver<String>,
}

/// Watches Secret `namespace/name` and publishes the CA to sign with (starting with
/// `initial`). Run the future on a task; it runs as long as the process.
pub fn follow_secret(
    client: kube::Client,
    namespace: &str,
    name: &str,
    initial: Arc<MeshCa>,
    keep_old_roots: Duration,
) -> (Following, impl std::future::Future<Output = ()> + Send) {
    let trust_domain = initial.trust_domain().to_string();
    let (roots_tx, roots) = watch::channel(initial.root_pem().to_string());
    let (tx, rx) = watch::channel(initial);
    let publish = move |ca: MeshCa| {
        roots_tx.send_replace(ca.root_pem().to_string());
        tx.send_replace(Arc::new(ca));
    };
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let secret_name = format!("{namespace}/{name}");
    let rx_current = rx.clone();
    let fut = async move {
        let mut rotation = Rotation::new(&trust_domain, keep_old_roots);
        let mut stream = std::pin::pin!(watcher(api, cfg).default_backoff().applied_objects());
        loop {
            let expiry = rotation.next_expiry();
            let next = tokio::select! {
                ev = stream.next() => ev,
                _ = async {
                    match expiry {
                        Some(t) => tokio::time::sleep_until(t.into()).await,
                        None => std::future::pending().await,
                    }
                } => {
                    match rotation.expire(Instant::now()) {
                        Ok(Some(ca)) => {
                            tracing::info!(secret = %secret_name, "a replaced root left the bundle");
                            publish(ca);
                        }
                        Ok(None) => {}
                        Err(e) => tracing::error!(secret = %secret_name, error = %e, "rebuilding the CA"),
                    }
                    continue;
                }
            };
            let secret = match next {
                None => return,
                Some(Err(e)) => {
                    tracing::warn!(secret = %secret_name, error = %e, "CA Secret watch error");
                    continue;
                }
                Some(Ok(s)) => s,
            };
            let current = rx_current.borrow().clone();
            match rotation.secret(&secret, &current, Instant::now()) {
                Ok(Some(ca)) => {
                    tracing::info!(secret = %secret_name, "the CA Secret changed: signing with the new CA; replaced roots stay in the bundle");
                    publish(ca);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(secret = %secret_name, error = %e, "the changed CA Secret does not load; keeping the current CA")
                }
            }
        }
    };
    (Following { ca: rx, roots }, fut)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret_of(ca: &MeshCa) -> Secret {
        Secret {
            data: Some(super::super::root::secret_data(ca)),
            ..Default::default()
        }
    }

    #[test]
    fn a_replaced_root_stays_in_the_bundle_until_its_time_is_up() {
        let td = "cluster.local";
        let a = MeshCa::generate(td).unwrap();
        let b = MeshCa::generate(td).unwrap();
        let keep = Duration::from_secs(3600);
        let t0 = Instant::now();
        let mut r = Rotation::new(td, keep);
        // The Secret the CA was loaded from: nothing to do, nothing retired.
        assert!(r.secret(&secret_of(&a), &a, t0).unwrap().is_none());
        assert!(r.secret(&secret_of(&a), &a, t0).unwrap().is_none());
        assert_eq!(r.next_expiry(), None);
        // Rotated to b: signs as b, bundle = b's root + a's root.
        let rotated = r.secret(&secret_of(&b), &a, t0).unwrap().expect("new CA");
        assert_eq!(rotated.signing_pems().1, b.signing_pems().1, "b's key");
        assert_eq!(
            rotated.root_ders(),
            &[b.root_der().clone(), a.root_der().clone()]
        );
        assert_eq!(r.next_expiry(), Some(t0 + keep));
        // Not yet expired: unchanged.
        assert!(r.expire(t0 + keep / 2).unwrap().is_none());
        // Expired: b alone, as a restart would load it.
        let later = r
            .expire(t0 + keep + Duration::from_secs(1))
            .unwrap()
            .expect("rebuilt");
        assert_eq!(later.root_ders(), &[b.root_der().clone()]);
        assert_eq!(later.root_pem(), b.root_pem());
        assert_eq!(r.next_expiry(), None);
        // Rotating back to a while a's root is retired: it is current again, not retired.
        let mut r = Rotation::new(td, keep);
        let ab = r.secret(&secret_of(&b), &a, t0).unwrap().expect("to b");
        let back = r
            .secret(&secret_of(&a), &ab, t0)
            .unwrap()
            .expect("back to a");
        assert_eq!(
            back.root_ders(),
            &[a.root_der().clone(), b.root_der().clone()]
        );
        // Broken material: an error, the caller keeps its CA.
        let mut broken = secret_of(&b);
        broken.data.as_mut().unwrap().remove(CA_KEY_FILE);
        assert!(r.secret(&broken, &back, t0).is_err());
    }
}

//! Caller authentication by Kubernetes TokenReview: the bearer JWT of a request is reviewed by
//! the API server for the configured audience (Istio's `istio-ca`), the service-account user
//! name `system:serviceaccount:<ns>:<sa>` gives the identity, and the bound token's extras give
//! the pod name/uid and node. Successful reviews are cached briefly (at most [`CACHE_TTL`], never
//! past the token's own `exp`), bounded in size, so a reconnect storm does not turn into one
//! TokenReview per request.

use crate::auth::{Authenticator, CallerIdentity};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tonic::Status;

/// How long a successful review is reused.
pub const CACHE_TTL: Duration = Duration::from_secs(60);
/// At most this many cached reviews (expired ones are dropped first, then all).
pub const CACHE_MAX: usize = 10_000;

const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";

/// Authenticates callers with TokenReview through a `kube::Client`.
pub struct TokenReviewAuthenticator {
    client: kube::Client,
    audiences: Vec<String>,
    cache: Mutex<HashMap<[u8; 32], (CallerIdentity, Instant)>>,
}

impl std::fmt::Debug for TokenReviewAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewAuthenticator")
            .field("audiences", &self.audiences)
            .finish_non_exhaustive()
    }
}

impl TokenReviewAuthenticator {
    /// `audiences`: what the token must be bound to (Istio: `["istio-ca"]`).
    pub fn new(client: kube::Client, audiences: Vec<String>) -> Self {
        TokenReviewAuthenticator {
            client,
            audiences,
            cache: Mutex::new(HashMap::new()),
        }
    }

    fn cached(&self, key: &[u8; 32]) -> Option<CallerIdentity> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .get(key)
            .filter(|(_, until)| *until > Instant::now())
            .map(|(c, _)| c.clone())
    }

    fn remember(&self, key: [u8; 32], caller: CallerIdentity, until: Instant) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CACHE_MAX {
            let now = Instant::now();
            cache.retain(|_, (_, t)| *t > now);
            if cache.len() >= CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(key, (caller, until));
    }

    /// Number of cached reviews (for tests and metrics).
    pub fn cached_len(&self) -> usize {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    async fn review(&self, token: &str) -> Result<CallerIdentity, Status> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(self.audiences.clone()),
            },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let answer = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "TokenReview request failed");
                Status::unavailable("cannot review the token")
            })?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let why = status.error.unwrap_or_else(|| "not authenticated".into());
            return Err(Status::unauthenticated(format!(
                "token review failed: {why}"
            )));
        }
        // With audiences in the spec, an authenticated answer lists the ones that matched.
        if let Some(got) = &status.audiences {
            if !got.iter().any(|a| self.audiences.contains(a)) {
                return Err(Status::unauthenticated(
                    "token review failed: token not bound to the expected audience",
                ));
            }
        }
        let user = status.user.unwrap_or_default();
        caller_from_user(
            user.username.as_deref().unwrap_or_default(),
            user.extra.as_ref(),
        )
    }
}

/// The caller from a reviewed user: only service accounts are accepted.
pub fn caller_from_user(
    username: &str,
    extra: Option<&std::collections::BTreeMap<String, Vec<String>>>,
) -> Result<CallerIdentity, Status> {
    let rest = username
        .strip_prefix("system:serviceaccount:")
        .ok_or_else(|| Status::unauthenticated(format!("{username:?} is not a service account")))?;
    let (ns, sa) = rest
        .split_once(':')
        .filter(|(ns, sa)| !ns.is_empty() && !sa.is_empty() && !sa.contains(':'))
        .ok_or_else(|| {
            Status::unauthenticated(format!("malformed service account {username:?}"))
        })?;
    let one = |k: &str| {
        extra
            .and_then(|e| e.get(k))
            .and_then(|v| v.first())
            .filter(|v| !v.is_empty())
            .cloned()
    };
    Ok(CallerIdentity {
        namespace: ns.to_string(),
        service_account: sa.to_string(),
        pod_name: one(POD_NAME_EXTRA),
        pod_uid: one(POD_UID_EXTRA),
        cluster_id: String::new(),
    })
}

/// The `exp` claim of a JWT, read without verifying it (the API server did that); used only to
/// cut the cache lifetime short.
pub fn jwt_expiry(token: &str) -> Option<SystemTime> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64url_decode(payload)?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = v.get("exp")?.as_u64()?;
    Some(UNIX_EPOCH + Duration::from_secs(exp))
}

fn base64url_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.trim_end_matches('=').bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// The bearer token of a request (`authorization: Bearer <token>`), if any.
pub fn bearer_token(metadata: &tonic::metadata::MetadataMap) -> Option<&str> {
    let v = metadata.get("authorization")?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[tonic::async_trait]
impl Authenticator for TokenReviewAuthenticator {
    async fn authenticate(
        &self,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<CallerIdentity, Status> {
        let token = bearer_token(metadata).ok_or_else(|| {
            Status::unauthenticated("no bearer token in the authorization header")
        })?;
        // Only the local cluster's API server is consulted; the header is reported as given.
        let cluster_id = metadata
            .get("clusterid")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(c) = self.cached(&key) {
            return Ok(CallerIdentity { cluster_id, ..c });
        }
        let caller = self.review(token).await?;
        let mut until = Instant::now() + CACHE_TTL;
        if let Some(exp) = jwt_expiry(token) {
            let left = exp.duration_since(SystemTime::now()).unwrap_or_default();
            until = until.min(Instant::now() + left);
        }
        self.remember(key, caller.clone(), until);
        Ok(CallerIdentity {
            cluster_id,
            ..caller
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_account_users_map_to_callers_with_pod_extras() {
        let mut extra = std::collections::BTreeMap::new();
        extra.insert(POD_NAME_EXTRA.to_string(), vec!["ztunnel-abc".to_string()]);
        extra.insert(POD_UID_EXTRA.to_string(), vec!["uid-1".to_string()]);
        let c =
            caller_from_user("system:serviceaccount:istio-system:ztunnel", Some(&extra)).unwrap();
        assert_eq!(c.namespace, "istio-system");
        assert_eq!(c.service_account, "ztunnel");
        assert_eq!(c.pod_name.as_deref(), Some("ztunnel-abc"));
        assert_eq!(c.pod_uid.as_deref(), Some("uid-1"));
        for bad in [
            "admin",
            "system:serviceaccount:ns",
            "system:serviceaccount::sa",
            "system:serviceaccount:a:b:c",
        ] {
            let e = caller_from_user(bad, None).unwrap_err();
            assert_eq!(e.code(), tonic::Code::Unauthenticated, "{bad}");
        }
    }

    #[test]
    fn bearer_token_is_parsed_case_insensitively_and_empty_is_none() {
        let mut md = tonic::metadata::MetadataMap::new();
        assert_eq!(bearer_token(&md), None);
        md.insert("authorization", "bearer abc.def".parse().unwrap());
        assert_eq!(bearer_token(&md), Some("abc.def"));
        md.insert("authorization", "Bearer  ".parse().unwrap());
        assert_eq!(bearer_token(&md), None);
        md.insert("authorization", "Basic abc".parse().unwrap());
        assert_eq!(bearer_token(&md), None);
    }

    #[test]
    fn jwt_expiry_reads_the_exp_claim() {
        // {"alg":"none"}.{"exp":2000000000,"sub":"x"}.sig
        let token = "eyJhbGciOiJub25lIn0.eyJleHAiOjIwMDAwMDAwMDAsInN1YiI6IngifQ.c2ln";
        assert_eq!(
            jwt_expiry(token),
            Some(UNIX_EPOCH + Duration::from_secs(2_000_000_000))
        );
        assert_eq!(jwt_expiry("opaque-token"), None);
        assert_eq!(jwt_expiry("a.!!!.c"), None);
    }
}

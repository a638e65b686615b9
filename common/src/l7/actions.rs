//! Per-route policies beyond destination choice: retries (Istio's default policy, `retryOn`
//! conditions with Envoy's meaning and the decision whether an attempt's outcome is retriable),
//! fault injection (delay/abort decided from random draws), and mirroring with its percentage.

use super::route::Destination;
use super::spec::{Duration, Percent};
use super::virtual_service::{HttpFaultInjection, HttpRetry};
use serde::Serialize;

/// A `retryOn` condition (Envoy's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RetryOn {
    #[serde(rename = "5xx")]
    FiveXx,
    GatewayError,
    Reset,
    ResetBeforeRequest,
    ConnectFailure,
    EnvoyRatelimited,
    #[serde(rename = "retriable-4xx")]
    Retriable4xx,
    RefusedStream,
    RetriableStatusCodes,
    RetriableHeaders,
    Http3PostConnectFailure,
    Cancelled,
    DeadlineExceeded,
    Internal,
    ResourceExhausted,
    Unavailable,
}

impl RetryOn {
    fn parse(s: &str) -> Option<RetryOn> {
        Some(match s {
            "5xx" => RetryOn::FiveXx,
            "gateway-error" => RetryOn::GatewayError,
            "reset" => RetryOn::Reset,
            "reset-before-request" => RetryOn::ResetBeforeRequest,
            "connect-failure" => RetryOn::ConnectFailure,
            "envoy-ratelimited" => RetryOn::EnvoyRatelimited,
            "retriable-4xx" => RetryOn::Retriable4xx,
            "refused-stream" => RetryOn::RefusedStream,
            "retriable-status-codes" => RetryOn::RetriableStatusCodes,
            "retriable-headers" => RetryOn::RetriableHeaders,
            "http3-post-connect-failure" => RetryOn::Http3PostConnectFailure,
            "cancelled" => RetryOn::Cancelled,
            "deadline-exceeded" => RetryOn::DeadlineExceeded,
            "internal" => RetryOn::Internal,
            "resource-exhausted" => RetryOn::ResourceExhausted,
            "unavailable" => RetryOn::Unavailable,
            _ => return None,
        })
    }
}

/// How one upstream attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// The upstream answered; `grpc_status` from the `grpc-status` header when present.
    Response {
        status: u16,
        grpc_status: Option<u32>,
    },
    /// The connection to the endpoint could not be established.
    ConnectFailure,
    /// The upstream reset the stream before a response (with `before_request` when nothing of
    /// the request had been sent).
    Reset { before_request: bool },
    /// HTTP/2 REFUSED_STREAM.
    RefusedStream,
}

/// A compiled retry policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryPolicy {
    /// Retries after the first attempt (Envoy's `num_retries`).
    pub attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<Duration>,
    pub retry_on: Vec<RetryOn>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub retriable_status_codes: Vec<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Duration>,
    /// Prefer endpoints not tried yet (Istio's default).
    pub ignore_previous_hosts: bool,
}

impl RetryPolicy {
    /// Istio's policy for routes without `retries`: 2 retries on connect-failure,
    /// refused-stream, unavailable, cancelled and 503.
    pub fn istio_default() -> Self {
        RetryPolicy {
            attempts: 2,
            per_try_timeout: None,
            retry_on: vec![
                RetryOn::ConnectFailure,
                RetryOn::RefusedStream,
                RetryOn::Unavailable,
                RetryOn::Cancelled,
                RetryOn::RetriableStatusCodes,
            ],
            retriable_status_codes: vec![503],
            backoff: None,
            ignore_previous_hosts: true,
        }
    }

    /// Compiles `retries` at `path`: `None` when retries are disabled (`attempts` ≤ 0). Integers
    /// in `retryOn` are retriable status codes, as in Istio.
    pub fn compile(spec: Option<&HttpRetry>, path: &str) -> Result<Option<Self>, (String, String)> {
        let Some(spec) = spec else {
            return Ok(Some(RetryPolicy::istio_default()));
        };
        if spec.attempts < 0 {
            return Err((
                format!("{path}.attempts"),
                format!("{} is negative", spec.attempts),
            ));
        }
        if spec
            .per_try_timeout
            .is_some_and(|d| d.0 < std::time::Duration::from_millis(1))
        {
            return Err((
                format!("{path}.perTryTimeout"),
                "must be at least 1ms".into(),
            ));
        }
        if spec.attempts == 0 {
            return Ok(None);
        }
        let mut out = RetryPolicy::istio_default();
        out.attempts = spec.attempts as u32;
        out.per_try_timeout = spec.per_try_timeout;
        out.backoff = spec.backoff;
        if let Some(v) = spec.retry_ignore_previous_hosts {
            out.ignore_previous_hosts = v;
        }
        if let Some(retry_on) = spec.retry_on.as_deref().filter(|s| !s.trim().is_empty()) {
            out.retry_on.clear();
            out.retriable_status_codes.clear();
            for part in retry_on.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                if let Ok(code) = part.parse::<u16>() {
                    if !(100..=599).contains(&code) {
                        return Err((
                            format!("{path}.retryOn"),
                            format!("{code} is not an HTTP status code"),
                        ));
                    }
                    out.retriable_status_codes.push(code);
                } else if let Some(cond) = RetryOn::parse(part) {
                    out.retry_on.push(cond);
                } else {
                    return Err((
                        format!("{path}.retryOn"),
                        format!("{part:?} is not a retry condition (5xx, gateway-error, reset, connect-failure, retriable-4xx, refused-stream, retriable-status-codes, cancelled, deadline-exceeded, internal, resource-exhausted, unavailable, or a status code)"),
                    ));
                }
            }
            if !out.retriable_status_codes.is_empty()
                && !out.retry_on.contains(&RetryOn::RetriableStatusCodes)
            {
                out.retry_on.push(RetryOn::RetriableStatusCodes);
            }
        }
        Ok(Some(out))
    }

    fn has(&self, c: RetryOn) -> bool {
        self.retry_on.contains(&c)
    }

    /// Whether an attempt that ended with `outcome` may be retried under this policy (the caller
    /// counts attempts and budgets).
    pub fn retriable(&self, outcome: AttemptOutcome) -> bool {
        use RetryOn::*;
        match outcome {
            AttemptOutcome::ConnectFailure => {
                self.has(ConnectFailure)
                    || self.has(FiveXx)
                    || self.has(GatewayError)
                    || self.has(Reset)
            }
            AttemptOutcome::Reset { before_request } => {
                self.has(FiveXx)
                    || self.has(GatewayError)
                    || self.has(Reset)
                    || (before_request && self.has(ResetBeforeRequest))
            }
            AttemptOutcome::RefusedStream => {
                self.has(RefusedStream)
                    || self.has(FiveXx)
                    || self.has(GatewayError)
                    || self.has(Reset)
            }
            AttemptOutcome::Response {
                status,
                grpc_status,
            } => {
                (self.has(FiveXx) && status >= 500)
                    || (self.has(GatewayError) && matches!(status, 502..=504))
                    || (self.has(Retriable4xx) && status == 409)
                    || (self.has(RetriableStatusCodes)
                        && self.retriable_status_codes.contains(&status))
                    || grpc_status.is_some_and(|g| {
                        (self.has(Cancelled) && g == 1)
                            || (self.has(DeadlineExceeded) && g == 4)
                            || (self.has(ResourceExhausted) && g == 8)
                            || (self.has(Internal) && g == 13)
                            || (self.has(Unavailable) && g == 14)
                    })
            }
        }
    }
}

/// What an aborted request answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Abort {
    HttpStatus(u16),
    GrpcStatus(u32),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultDelay {
    pub delay: Duration,
    pub percentage: Percent,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultAbort {
    pub abort: Abort,
    pub percentage: Percent,
}

/// Compiled fault injection. An unset percentage injects nothing (Istio's rule).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Fault {
    pub delay: Option<FaultDelay>,
    pub abort: Option<FaultAbort>,
}

/// The faults to inject into one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FaultDecision {
    pub delay: Option<std::time::Duration>,
    pub abort: Option<Abort>,
}

const GRPC_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

fn percentage(
    p: Option<Percent>,
    legacy: Option<u32>,
    path: &str,
) -> Result<Percent, (String, String)> {
    let p = p.unwrap_or(Percent {
        value: legacy.unwrap_or(0) as f64,
    });
    p.check(&format!("{path}.percentage"))?;
    Ok(p)
}

impl Fault {
    pub fn compile(spec: &HttpFaultInjection, path: &str) -> Result<Self, (String, String)> {
        let delay = match &spec.delay {
            None => None,
            Some(d) => {
                let p = format!("{path}.delay");
                if d.exponential_delay.is_some() {
                    return Err((
                        format!("{p}.exponentialDelay"),
                        "is not supported (use fixedDelay)".into(),
                    ));
                }
                let Some(fixed) = d.fixed_delay else {
                    return Err((format!("{p}.fixedDelay"), "missing".into()));
                };
                Some(FaultDelay {
                    delay: fixed,
                    percentage: percentage(d.percentage, d.percent, &p)?,
                })
            }
        };
        let abort = match &spec.abort {
            None => None,
            Some(a) => {
                let p = format!("{path}.abort");
                let kind = match (a.http_status, &a.grpc_status, &a.http2_error) {
                    (Some(s), None, None) if (200..=599).contains(&s) => Abort::HttpStatus(s),
                    (Some(s), None, None) => {
                        return Err((
                            format!("{p}.httpStatus"),
                            format!("{s} is not between 200 and 599"),
                        ))
                    }
                    (None, Some(g), None) => match GRPC_CODES.iter().position(|c| c == g) {
                        Some(code) => Abort::GrpcStatus(code as u32),
                        None => {
                            return Err((
                                format!("{p}.grpcStatus"),
                                format!("{g:?} is not a gRPC status name (e.g. UNAVAILABLE)"),
                            ))
                        }
                    },
                    (None, None, Some(_)) => {
                        return Err((format!("{p}.http2Error"), "is not supported".into()))
                    }
                    _ => return Err((p, "set exactly one of httpStatus, grpcStatus".into())),
                };
                Some(FaultAbort {
                    abort: kind,
                    percentage: percentage(a.percentage, a.percent, &p)?,
                })
            }
        };
        if delay.is_none() && abort.is_none() {
            return Err((path.to_string(), "set delay and/or abort".into()));
        }
        Ok(Fault { delay, abort })
    }

    /// Decides the faults for one request from two independent random draws.
    pub fn decide(&self, delay_draw: u64, abort_draw: u64) -> FaultDecision {
        FaultDecision {
            delay: self
                .delay
                .as_ref()
                .filter(|d| d.percentage.hit(delay_draw))
                .map(|d| d.delay.0),
            abort: self
                .abort
                .as_ref()
                .filter(|a| a.percentage.hit(abort_draw))
                .map(|a| a.abort),
        }
    }
}

/// A mirror target: a copy of matching requests goes there (responses are discarded).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Mirror {
    pub destination: Destination,
    /// Unset in the spec means 100%.
    pub percentage: Percent,
}

impl Mirror {
    /// Whether this request is mirrored, given a random draw.
    pub fn hit(&self, draw: u64) -> bool {
        self.percentage.hit(draw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retry(yaml: &str) -> Result<Option<RetryPolicy>, (String, String)> {
        let spec: HttpRetry = serde_yaml_ng::from_str(yaml).expect("retry spec");
        RetryPolicy::compile(Some(&spec), "spec.http[0].retries")
    }

    #[test]
    fn unset_retries_use_istio_default() {
        let p = RetryPolicy::compile(None, "x")
            .expect("ok")
            .expect("enabled");
        assert_eq!(p.attempts, 2);
        assert!(p.retriable(AttemptOutcome::Response {
            status: 503,
            grpc_status: None
        }));
        assert!(!p.retriable(AttemptOutcome::Response {
            status: 500,
            grpc_status: None
        }));
        assert!(p.retriable(AttemptOutcome::ConnectFailure));
        assert!(p.retriable(AttemptOutcome::Response {
            status: 200,
            grpc_status: Some(14)
        }));
    }

    #[test]
    fn zero_attempts_disable_retries() {
        assert_eq!(retry("{attempts: 0}").expect("ok"), None);
    }

    #[test]
    fn retry_on_conditions_follow_envoy() {
        let p = retry("{attempts: 3, perTryTimeout: 2s, retryOn: \"gateway-error,retriable-4xx\"}")
            .expect("ok")
            .expect("on");
        assert_eq!(p.attempts, 3);
        assert!(p.retriable(AttemptOutcome::Response {
            status: 502,
            grpc_status: None
        }));
        assert!(!p.retriable(AttemptOutcome::Response {
            status: 500,
            grpc_status: None
        }));
        assert!(p.retriable(AttemptOutcome::Response {
            status: 409,
            grpc_status: None
        }));
        assert!(p.retriable(AttemptOutcome::Reset {
            before_request: false
        }));
        let p = retry("{attempts: 1, retryOn: \"5xx\"}")
            .expect("ok")
            .expect("on");
        assert!(p.retriable(AttemptOutcome::Response {
            status: 500,
            grpc_status: None
        }));
        assert!(p.retriable(AttemptOutcome::ConnectFailure));
        let p = retry("{attempts: 1, retryOn: \"connect-failure\"}")
            .expect("ok")
            .expect("on");
        assert!(p.retriable(AttemptOutcome::ConnectFailure));
        assert!(!p.retriable(AttemptOutcome::Reset {
            before_request: false
        }));
        assert!(!p.retriable(AttemptOutcome::Response {
            status: 503,
            grpc_status: None
        }));
        let p = retry("{attempts: 1, retryOn: \"reset\"}")
            .expect("ok")
            .expect("on");
        assert!(p.retriable(AttemptOutcome::RefusedStream));
    }

    #[test]
    fn status_codes_in_retry_on_are_retriable_codes() {
        let p = retry("{attempts: 2, retryOn: \"503, 429\"}")
            .expect("ok")
            .expect("on");
        assert_eq!(p.retriable_status_codes, [503, 429]);
        assert_eq!(p.retry_on, [RetryOn::RetriableStatusCodes]);
        assert!(p.retriable(AttemptOutcome::Response {
            status: 429,
            grpc_status: None
        }));
        assert!(!p.retriable(AttemptOutcome::Response {
            status: 500,
            grpc_status: None
        }));
    }

    #[test]
    fn bad_retry_settings_name_the_field() {
        let (f, m) = retry("{attempts: 2, retryOn: \"5xx,sometimes\"}").expect_err("bad");
        assert_eq!(f, "spec.http[0].retries.retryOn");
        assert!(
            m.starts_with("\"sometimes\" is not a retry condition"),
            "{m}"
        );
        assert_eq!(
            retry("{attempts: -1}").expect_err("neg").0,
            "spec.http[0].retries.attempts"
        );
        assert_eq!(
            retry("{attempts: 1, perTryTimeout: 1us}")
                .expect_err("tiny")
                .0,
            "spec.http[0].retries.perTryTimeout"
        );
    }

    fn fault(yaml: &str) -> Result<Fault, (String, String)> {
        let spec: HttpFaultInjection = serde_yaml_ng::from_str(yaml).expect("fault spec");
        Fault::compile(&spec, "f")
    }

    #[test]
    fn fault_decisions_follow_percentages() {
        let f = fault("{delay: {fixedDelay: 7s, percentage: {value: 100}}, abort: {httpStatus: 503, percentage: {value: 10}}}").expect("ok");
        let d = f.decide(0, 99_999);
        assert_eq!(d.delay, Some(std::time::Duration::from_secs(7)));
        assert_eq!(d.abort, Some(Abort::HttpStatus(503)));
        assert_eq!(f.decide(0, 100_000).abort, None);
        let never = fault("{abort: {httpStatus: 500}}").expect("ok");
        assert_eq!(
            never.decide(0, 0),
            FaultDecision::default(),
            "unset percentage injects nothing"
        );
        let legacy = fault("{delay: {fixedDelay: 1s, percent: 50}}").expect("ok");
        assert_eq!(
            legacy.delay.as_ref().map(|d| d.percentage.value),
            Some(50.0)
        );
        let grpc =
            fault("{abort: {grpcStatus: UNAVAILABLE, percentage: {value: 100}}}").expect("ok");
        assert_eq!(grpc.decide(0, 0).abort, Some(Abort::GrpcStatus(14)));
    }

    #[test]
    fn bad_faults_name_the_field() {
        assert_eq!(
            fault("{abort: {httpStatus: 700}}").expect_err("range").0,
            "f.abort.httpStatus"
        );
        assert_eq!(
            fault("{delay: {percentage: {value: 5}}}")
                .expect_err("no delay")
                .0,
            "f.delay.fixedDelay"
        );
        assert_eq!(
            fault("{delay: {fixedDelay: 1s, percentage: {value: 101}}}")
                .expect_err("pct")
                .0,
            "f.delay.percentage.value"
        );
        assert_eq!(
            fault("{abort: {grpcStatus: NOPE}}").expect_err("grpc").0,
            "f.abort.grpcStatus"
        );
        assert_eq!(fault("{}").expect_err("empty").0, "f");
    }
}

//! Sans-IO decisions of the Event writer: which Istio objects are rejected or were and are
//! accepted again ([`VerdictTracker`], fed from the index after every batch), which of those
//! verdicts still need an Event ([`Reporter`], on the Lease holder), and which proxy NACKs may
//! become an Event now ([`NackLimiter`]: one per object and reason per window).

use k8s_openapi::api::core::v1::ObjectReference;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// Event reason of a rejected object.
pub const REASON_REJECTED: &str = "Rejected";
/// Event reason of an object accepted after having been rejected.
pub const REASON_ACCEPTED: &str = "Accepted";
/// Event reason of a resource a proxy refused.
pub const REASON_NACKED: &str = "NackedByProxy";
/// Longest Event note (the API's limit is 1 kB).
pub const MAX_NOTE: usize = 1024;

/// The object an Event is about (its `regarding`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Regarding {
    pub api_version: String,
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub uid: Option<String>,
}

impl Regarding {
    /// From an object's `apiVersion`, `kind` and metadata; `None` without kind or name.
    pub fn from_object(value: &Value) -> Option<Regarding> {
        let s = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_string);
        let meta = value.get("metadata");
        Some(Regarding {
            api_version: s(value.get("apiVersion")).unwrap_or_default(),
            kind: s(value.get("kind"))?,
            namespace: s(meta.and_then(|m| m.get("namespace"))).unwrap_or_default(),
            name: s(meta.and_then(|m| m.get("name")))?,
            uid: s(meta.and_then(|m| m.get("uid"))).filter(|u| !u.is_empty()),
        })
    }

    /// From a key `<Kind>/<ns>/<name>` of an Istio kind (no uid: unknown from the key).
    pub fn from_key(key: &str) -> Option<Regarding> {
        let mut parts = key.splitn(3, '/');
        let (kind, ns, name) = (parts.next()?, parts.next()?, parts.next()?);
        let (_, group) = crate::index::Kind::ISTIO
            .iter()
            .find(|(k, _)| k.as_str() == kind)?;
        if ns.is_empty() || name.is_empty() {
            return None;
        }
        Some(Regarding {
            api_version: format!("{group}/v1"),
            kind: kind.to_string(),
            namespace: ns.to_string(),
            name: name.to_string(),
            uid: None,
        })
    }

    pub fn object_reference(&self) -> ObjectReference {
        ObjectReference {
            api_version: Some(self.api_version.clone()),
            kind: Some(self.kind.clone()),
            namespace: Some(self.namespace.clone()),
            name: Some(self.name.clone()),
            uid: self.uid.clone(),
            ..Default::default()
        }
    }
}

/// An Istio object that is rejected (`rejected: Some(reason)`), or was and is now accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub regarding: Regarding,
    pub rejected: Option<String>,
}

/// Verdicts by `<Kind>/<ns>/<name>`.
pub type Verdicts = BTreeMap<String, Verdict>;

/// Feed side: the verdicts of the objects currently rejected and of those once rejected that
/// still exist (so the writer can say they are accepted again). Objects never rejected are not
/// tracked; a deleted object leaves.
#[derive(Debug, Default)]
pub struct VerdictTracker {
    current: Verdicts,
}

impl VerdictTracker {
    /// Recomputes from the index's rejections and object lookup. True when anything changed.
    /// Costs O(rejected + once-rejected) lookups, not O(objects).
    pub fn update<'a>(
        &mut self,
        rejections: &BTreeMap<String, String>,
        lookup: impl Fn(&str) -> Option<&'a Value>,
    ) -> bool {
        let mut next = Verdicts::new();
        for (key, reason) in rejections {
            let regarding = lookup(key)
                .and_then(Regarding::from_object)
                .or_else(|| Regarding::from_key(key));
            if let Some(regarding) = regarding {
                next.insert(
                    key.clone(),
                    Verdict {
                        regarding,
                        rejected: Some(stable_reason(reason).to_string()),
                    },
                );
            }
        }
        for key in self.current.keys() {
            if next.contains_key(key) {
                continue;
            }
            if let Some(regarding) = lookup(key).and_then(Regarding::from_object) {
                next.insert(
                    key.clone(),
                    Verdict {
                        regarding,
                        rejected: None,
                    },
                );
            }
        }
        if next == self.current {
            return false;
        }
        self.current = next;
        true
    }

    pub fn verdicts(&self) -> &Verdicts {
        &self.current
    }
}

/// Event type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Normal,
    Warning,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        }
    }
}

/// One Event to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventSpec {
    pub regarding: Regarding,
    pub type_: EventType,
    pub reason: &'static str,
    /// What the controller did (`Validate`, `Push`).
    pub action: &'static str,
    pub note: String,
}

/// What the writer last reported about one object: its uid and the rejection reason (`None`:
/// accepted).
type Reported = (Option<String>, Option<String>);

/// A step of [`Reporter::plan`]: record `state` for `key` once `event` (if any) is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub key: String,
    pub event: Option<EventSpec>,
    state: Reported,
}

/// Leader side: what was reported, so each (object, reason) is reported once. A new reason or a
/// recreated object (new uid) is reported again; an object accepted after a reported rejection
/// gets a Normal `Accepted`; one that was never reported rejected gets nothing.
#[derive(Debug, Default)]
pub struct Reporter {
    reported: HashMap<String, Reported>,
}

impl Reporter {
    /// The steps that bring the reports up to `verdicts`; forgets deleted objects.
    pub fn plan(&mut self, verdicts: &Verdicts) -> Vec<Planned> {
        self.reported.retain(|k, _| verdicts.contains_key(k));
        let mut out = Vec::new();
        for (key, v) in verdicts {
            let state: Reported = (v.regarding.uid.clone(), v.rejected.clone());
            let prev = self.reported.get(key);
            if prev == Some(&state) {
                continue;
            }
            let event = match &v.rejected {
                Some(reason) => Some(EventSpec {
                    regarding: v.regarding.clone(),
                    type_: EventType::Warning,
                    reason: REASON_REJECTED,
                    action: "Validate",
                    note: truncate(reason),
                }),
                None => match prev {
                    Some((uid, Some(_))) if *uid == v.regarding.uid => Some(EventSpec {
                        regarding: v.regarding.clone(),
                        type_: EventType::Normal,
                        reason: REASON_ACCEPTED,
                        action: "Validate",
                        note: "accepted: the earlier rejection no longer applies".into(),
                    }),
                    _ => None,
                },
            };
            out.push(Planned {
                key: key.clone(),
                event,
                state,
            });
        }
        out
    }

    /// A step was carried out (its Event written): remember it.
    pub fn done(&mut self, step: Planned) {
        self.reported.insert(step.key, step.state);
    }
}

/// At most one NACK Event per (resource, reason) per window, over a bounded number of keys.
#[derive(Debug)]
pub struct NackLimiter {
    window: Duration,
    max_keys: usize,
    last: HashMap<(String, String), Instant>,
}

impl NackLimiter {
    pub fn new(window: Duration, max_keys: usize) -> Self {
        NackLimiter {
            window,
            max_keys: max_keys.max(1),
            last: HashMap::new(),
        }
    }

    /// Whether a NACK of `resource` for `reason` at `now` may become an Event.
    pub fn admit(&mut self, now: Instant, resource: &str, reason: &str) -> bool {
        let key = (resource.to_string(), reason.to_string());
        if let Some(t) = self.last.get(&key) {
            if now.saturating_duration_since(*t) < self.window {
                return false;
            }
        }
        if self.last.len() >= self.max_keys {
            let window = self.window;
            self.last
                .retain(|_, t| now.saturating_duration_since(*t) < window);
            if self.last.len() >= self.max_keys {
                return false;
            }
        }
        self.last.insert(key, now);
        true
    }
}

/// A reason without the trailing ` at line L column C` of a parse error: the position is in the
/// text compiled from the object, which moves with any edit (a label), so it is not part of
/// what makes the reason the same.
pub fn stable_reason(reason: &str) -> &str {
    let Some((head, tail)) = reason.rsplit_once(" at line ") else {
        return reason;
    };
    let Some((line, column)) = tail.split_once(" column ") else {
        return reason;
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if digits(line) && digits(column) {
        head
    } else {
        reason
    }
}

/// `s` cut to [`MAX_NOTE`] bytes at a character boundary.
pub fn truncate(s: &str) -> String {
    if s.len() <= MAX_NOTE {
        return s.to_string();
    }
    let mut end = MAX_NOTE - 3;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn vs(name: &str, uid: &str) -> Value {
        json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": name, "namespace": "default", "uid": uid}})
    }

    fn rejections(entries: &[(&str, &str)]) -> BTreeMap<String, String> {
        entries
            .iter()
            .map(|(k, r)| (k.to_string(), r.to_string()))
            .collect()
    }

    fn events(reporter: &mut Reporter, verdicts: &Verdicts) -> Vec<(EventType, &'static str)> {
        let steps = reporter.plan(verdicts);
        let out = steps
            .iter()
            .filter_map(|s| s.event.as_ref().map(|e| (e.type_, e.reason)))
            .collect();
        for s in steps {
            reporter.done(s);
        }
        out
    }

    #[test]
    fn a_rejection_is_reported_once_and_acceptance_after_it() {
        let key = "VirtualService/default/bad";
        let mut objects: BTreeMap<String, Value> = BTreeMap::new();
        objects.insert(key.into(), vs("bad", "u1"));
        let mut tracker = VerdictTracker::default();
        let mut reporter = Reporter::default();

        // Rejected: one Warning with the reason and the object's uid.
        let snapshot = objects.clone();
        assert!(
            tracker.update(&rejections(&[(key, "spec.http: bad")]), |k| snapshot
                .get(k)
                .map(|v| v as &Value))
        );
        let steps = reporter.plan(tracker.verdicts());
        let ev = steps[0].event.clone().expect("an event");
        assert_eq!((ev.type_, ev.reason), (EventType::Warning, REASON_REJECTED));
        assert_eq!(ev.note, "spec.http: bad");
        assert_eq!(ev.regarding.uid.as_deref(), Some("u1"));
        assert_eq!(ev.regarding.kind, "VirtualService");
        for s in steps {
            reporter.done(s);
        }
        // The same rejection again (e.g. another batch, a new resourceVersion): nothing.
        assert!(
            !tracker.update(&rejections(&[(key, "spec.http: bad")]), |k| snapshot
                .get(k)
                .map(|v| v as &Value))
        );
        assert!(events(&mut reporter, tracker.verdicts()).is_empty());
        // Another reason: reported.
        tracker.update(&rejections(&[(key, "spec.hosts: empty")]), |k| {
            snapshot.get(k).map(|v| v as &Value)
        });
        assert_eq!(
            events(&mut reporter, tracker.verdicts()),
            vec![(EventType::Warning, REASON_REJECTED)]
        );
        // Fixed: one Normal Accepted, then quiet.
        tracker.update(&BTreeMap::new(), |k| snapshot.get(k).map(|v| v as &Value));
        assert_eq!(tracker.verdicts()[key].rejected, None);
        assert_eq!(
            events(&mut reporter, tracker.verdicts()),
            vec![(EventType::Normal, REASON_ACCEPTED)]
        );
        assert!(events(&mut reporter, tracker.verdicts()).is_empty());
        // Deleted: the tracker and the reporter forget it.
        objects.clear();
        assert!(tracker.update(&BTreeMap::new(), |k| objects.get(k).map(|v| v as &Value)));
        assert!(tracker.verdicts().is_empty());
        assert!(events(&mut reporter, tracker.verdicts()).is_empty());
        assert!(reporter.reported.is_empty());
    }

    #[test]
    fn a_recreated_object_is_reported_again_and_a_failed_write_is_retried() {
        let key = "VirtualService/default/bad";
        let mut tracker = VerdictTracker::default();
        let mut reporter = Reporter::default();
        let v1 = vs("bad", "u1");
        tracker.update(&rejections(&[(key, "r")]), |_| Some(&v1));
        // The write failed (no `done`): planned again.
        assert_eq!(reporter.plan(tracker.verdicts()).len(), 1);
        assert_eq!(
            events(&mut reporter, tracker.verdicts()),
            vec![(EventType::Warning, REASON_REJECTED)]
        );
        // Recreated with a new uid, same reason: a new object, reported.
        let v2 = vs("bad", "u2");
        tracker.update(&rejections(&[(key, "r")]), |_| Some(&v2));
        assert_eq!(
            events(&mut reporter, tracker.verdicts()),
            vec![(EventType::Warning, REASON_REJECTED)]
        );
        // A fresh reporter (new leader) seeing an accepted object says nothing.
        tracker.update(&BTreeMap::new(), |_| Some(&v2));
        let mut fresh = Reporter::default();
        assert!(events(&mut fresh, tracker.verdicts()).is_empty());
    }

    #[test]
    fn nack_limiter_allows_one_per_resource_and_reason_per_window() {
        let mut l = NackLimiter::new(Duration::from_secs(60), 2);
        let t0 = Instant::now();
        assert!(l.admit(t0, "VirtualService/default/a", "bad"));
        // 1000 proxies NACKing the same thing within the minute: nothing more.
        for i in 0..1000 {
            assert!(!l.admit(
                t0 + Duration::from_millis(i),
                "VirtualService/default/a",
                "bad"
            ));
        }
        assert!(l.admit(t0, "VirtualService/default/a", "other reason"));
        // Key budget exhausted: refused until entries expire.
        assert!(!l.admit(t0, "VirtualService/default/b", "bad"));
        let later = t0 + Duration::from_secs(61);
        assert!(l.admit(later, "VirtualService/default/b", "bad"));
        assert!(l.admit(later, "VirtualService/default/a", "bad"));
    }

    #[test]
    fn keys_map_to_istio_objects_and_notes_are_bounded() {
        let r = Regarding::from_key("DestinationRule/ns1/dr").expect("istio key");
        assert_eq!(r.api_version, "networking.istio.io/v1");
        assert_eq!((r.namespace.as_str(), r.name.as_str()), ("ns1", "dr"));
        assert_eq!(
            Regarding::from_key("AuthorizationPolicy/a/b")
                .map(|r| r.api_version)
                .as_deref(),
            Some("security.istio.io/v1")
        );
        for bad in [
            "Pod/default/x",
            "VirtualService/x",
            "configuration",
            "VirtualService//x",
        ] {
            assert!(Regarding::from_key(bad).is_none(), "{bad}");
        }
        assert_eq!(
            stable_reason("weight: invalid type: string \"x\", expected u32 at line 3 column 327"),
            "weight: invalid type: string \"x\", expected u32"
        );
        assert_eq!(
            stable_reason("at line one column two"),
            "at line one column two"
        );
        let long = "é".repeat(2000);
        let t = truncate(&long);
        assert!(t.len() <= MAX_NOTE && t.ends_with("..."));
    }
}

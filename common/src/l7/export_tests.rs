//! Specifications of `exportTo` as the waypoint sees it: which VirtualService and
//! DestinationRule a waypoint in a given namespace uses, and how bad lists are rejected.

use super::tests::{load, DEMOAPP};
use crate::snapshot::Snapshot;

fn vs(name: &str, ns: &str, export_to: &str, header: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  hosts: [{DEMOAPP}]\n  exportTo: {export_to}\n  http: [{{headers: {{request: {{set: {{x-vs: {header}}}}}}}, route: [{{destination: {{host: {DEMOAPP}}}}}]}}]\n"
    )
}

fn dr(name: &str, ns: &str, export_to: &str, lb: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  host: {DEMOAPP}\n  exportTo: {export_to}\n  trafficPolicy: {{loadBalancer: {{simple: {lb}}}}}\n"
    )
}

fn vs_for(s: &Snapshot, viewer: &str) -> Option<String> {
    s.l7.routes
        .mesh(DEMOAPP, viewer)
        .map(|t| t.virtual_service.clone())
}

fn dr_for(s: &Snapshot, viewer: &str) -> Option<String> {
    s.l7.destination_rule(DEMOAPP, viewer)
        .map(|d| format!("{}/{}", d.namespace, d.name))
}

#[test]
fn a_private_virtual_service_is_seen_only_in_its_namespace() {
    let s = load(&vs("private", "team", "[.]", "team"));
    assert!(s.rejected.is_empty(), "{:?}", s.rejected);
    assert_eq!(vs_for(&s, "team").as_deref(), Some("team/private"));
    assert_eq!(vs_for(&s, "default"), None, "not exported to default");
    let s = load(&vs("none", "team", "[\"~\"]", "none"));
    assert_eq!(vs_for(&s, "team"), None, "~ exports to nobody");
}

#[test]
fn named_and_default_exports() {
    let s = load(&vs("named", "team", "[., mesh-waypoints]", "named"));
    assert_eq!(vs_for(&s, "mesh-waypoints").as_deref(), Some("team/named"));
    assert_eq!(vs_for(&s, "default"), None);
    let s = load(&vs("public", "team", "[]", "public"));
    assert_eq!(
        vs_for(&s, "anywhere").as_deref(),
        Some("team/public"),
        "no exportTo means everywhere"
    );
}

#[test]
fn the_viewers_own_virtual_service_wins_then_file_order() {
    let yaml = [
        vs("first", "shared", "[\"*\"]", "shared"),
        vs("mine", "default", "[.]", "default"),
        vs("theirs", "team", "[\"*\"]", "team"),
    ]
    .join("---\n");
    let s = load(&yaml);
    assert!(s.l7.warnings.is_empty(), "{:?}", s.l7.warnings);
    assert_eq!(vs_for(&s, "default").as_deref(), Some("default/mine"));
    assert_eq!(vs_for(&s, "team").as_deref(), Some("team/theirs"));
    assert_eq!(vs_for(&s, "elsewhere").as_deref(), Some("shared/first"));
}

#[test]
fn a_second_virtual_service_in_the_same_namespace_is_still_a_conflict() {
    let yaml = [vs("a", "default", "[]", "a"), vs("b", "default", "[]", "b")].join("---\n");
    let s = load(&yaml);
    assert_eq!(vs_for(&s, "default").as_deref(), Some("default/a"));
    assert!(
        s.l7.warnings
            .iter()
            .any(|w| w.contains("default/b")
                && w.contains("already routed by VirtualService default/a")),
        "{:?}",
        s.l7.warnings
    );
}

#[test]
fn destination_rules_prefer_the_viewer_then_the_service_namespace() {
    let yaml = [
        dr("elsewhere", "ops", "[\"*\"]", "RANDOM"),
        dr("svc", "default", "[\"*\"]", "LEAST_REQUEST"),
        dr("client", "team", "[.]", "ROUND_ROBIN"),
    ]
    .join("---\n");
    let s = load(&yaml);
    assert!(s.rejected.is_empty(), "{:?}", s.rejected);
    assert_eq!(dr_for(&s, "team").as_deref(), Some("team/client"));
    assert_eq!(
        dr_for(&s, "other").as_deref(),
        Some("default/svc"),
        "the service's namespace comes before configuration order"
    );
    assert_eq!(dr_for(&s, "ops").as_deref(), Some("ops/elsewhere"));
    let s = load(&dr("private", "team", "[.]", "RANDOM"));
    assert_eq!(
        dr_for(&s, "default"),
        None,
        "a private rule of another namespace"
    );
    assert_eq!(
        s.l7.effective_policy(DEMOAPP, "default", None, 80),
        super::EffectivePolicy::default()
    );
}

#[test]
fn two_destination_rules_for_a_host_in_one_namespace_are_rejected() {
    let yaml = [
        dr("one", "default", "[]", "RANDOM"),
        dr("two", "default", "[]", "RANDOM"),
    ]
    .join("---\n");
    let s = load(&yaml);
    let e: Vec<String> = s.rejected.iter().map(ToString::to_string).collect();
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].contains("DestinationRule default/two")
            && e[0].contains("already has DestinationRule default/one"),
        "{}",
        e[0]
    );
}

#[test]
fn bad_export_lists_are_rejected_with_the_field() {
    let s = load(&vs("bad", "default", "[., \"*\"]", "x"));
    let e: Vec<String> = s.rejected.iter().map(ToString::to_string).collect();
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].contains("VirtualService default/bad") && e[0].contains("spec.exportTo[1]"),
        "{}",
        e[0]
    );
    let s = load(&dr("bad", "default", "[Not_A_Namespace]", "RANDOM"));
    let e: Vec<String> = s.rejected.iter().map(ToString::to_string).collect();
    assert!(
        e.len() == 1 && e[0].contains("spec.exportTo[0]") && e[0].contains("Not_A_Namespace"),
        "{e:?}"
    );
}

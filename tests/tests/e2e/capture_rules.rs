//! The standalone capture CLI (`ztunnel capture install|remove`) in a namespace of its own:
//! installing is idempotent, removing takes away everything it added and may be repeated.

use tests::netns::Netns;
use tests::tproxy::{CaptureState, FWMARK_RULE};
use tests::ztunnel::ztunnel_bin;

fn ztunnel(ns: &Netns, args: &[&str]) -> String {
    let bin = ztunnel_bin().unwrap();
    let mut argv = vec![bin.to_str().unwrap()];
    argv.extend_from_slice(args);
    ns.exec(&argv)
        .unwrap_or_else(|e| panic!("ztunnel {args:?} failed: {e:#}"))
}

const INSTALL: &[&str] = &[
    "capture",
    "install",
    "--pod-iface",
    "va",
    "--pod-iface",
    "vc",
    "--pod-cidr",
    "10.244.1.2/32",
    "--pod-cidr",
    "10.244.1.3/32",
];

#[test]
fn capture_install_is_idempotent() {
    let ns = Netns::new("capture").unwrap();
    let clean = CaptureState::read(&ns).unwrap();
    assert!(clean.is_clean(), "fresh namespace not clean: {clean:?}");

    ztunnel(&ns, INSTALL);
    let first = CaptureState::read(&ns).unwrap();
    assert!(
        first.is_installed_once(),
        "after one install: {first:?}\n(ip rule:\n{})",
        ns.ip(&["-4", "rule", "show"]).unwrap_or_default()
    );

    ztunnel(&ns, INSTALL);
    let second = CaptureState::read(&ns).unwrap();
    assert!(
        second.is_installed_once(),
        "after a second install: {second:?}\n(ip rule:\n{})",
        ns.ip(&["-4", "rule", "show"]).unwrap_or_default()
    );
    // Exactly one copy of every rule: one chain, one redirect per listener, one drop each for
    // inbound and outbound, and the anti-spoofing drop (source must route back through the
    // pod interface).
    for (needle, n) in [
        ("chain prerouting", 1),
        ("tproxy ip to 127.0.0.1:15001", 1),
        ("tproxy ip to 127.0.0.1:15006", 1),
        ("tproxy ip to 127.0.0.1:15008", 1),
        ("socket transparent 1", 1),
        // rpf, inbound (nobody listens / stale), outbound SYN, outbound stale segment, pod
        // IPv6 in prerouting and IPv6 towards pods in forward.
        (" drop", 6),
        ("fib saddr . iif oif missing drop", 1),
        ("fib daddr type != local drop", 1),
        ("reject with tcp reset", 1),
        ("chain forward", 1),
        ("set pod_ifs", 1),
        ("set pod_ips", 1),
    ] {
        assert_eq!(
            second.count_in_ruleset(needle),
            n,
            "{needle:?} in the ruleset after two installs:\n{}",
            second.ruleset.as_deref().unwrap_or_default()
        );
    }
    assert_eq!(
        first.ruleset, second.ruleset,
        "installing again with the same arguments changed the ruleset"
    );

    // Installing with other arguments replaces the ruleset rather than adding to it.
    ztunnel(
        &ns,
        &[
            "capture",
            "install",
            "--pod-iface",
            "vx",
            "--pod-cidr",
            "10.244.1.9/32",
        ],
    );
    let replaced = CaptureState::read(&ns).unwrap();
    assert!(
        replaced.is_installed_once(),
        "after reinstall: {replaced:?}"
    );
    let ruleset = replaced.ruleset.as_deref().unwrap_or_default();
    assert!(
        ruleset.contains("\"vx\"") && ruleset.contains("10.244.1.9"),
        "new pods missing:\n{ruleset}"
    );
    assert!(
        !ruleset.contains("\"va\"") && !ruleset.contains("10.244.1.2"),
        "old pods still captured:\n{ruleset}"
    );
    assert_eq!(replaced.count_in_ruleset("tproxy ip to 127.0.0.1:15001"), 1);

    ztunnel(&ns, &["capture", "remove"]);
    let removed = CaptureState::read(&ns).unwrap();
    assert!(
        removed.is_clean(),
        "capture remove left something behind: {removed:?}"
    );
    // The namespace's own rules are untouched.
    let rules = ns.ip(&["-4", "rule", "show"]).unwrap();
    assert!(!rules.contains(FWMARK_RULE));
    for table in ["local", "main", "default"] {
        assert!(
            rules.contains(&format!("lookup {table}")),
            "the {table} rule is gone:\n{rules}"
        );
    }

    // Removing again (nothing installed) is not an error.
    ztunnel(&ns, &["capture", "remove"]);
    let again = CaptureState::read(&ns).unwrap();
    assert!(again.is_clean(), "{again:?}");
}

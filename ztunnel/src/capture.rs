//! Traffic capture on the node: the nftables TPROXY ruleset and the policy routing for the
//! TPROXY mark (see shared/TPROXY.md for the verified recipe). Installing is idempotent (the
//! table is replaced in one nft transaction, so a starting ztunnel takes over whatever a
//! previous one left); removing restores the node as it was.
//!
//! The rules fail closed on their own: they outlive the process that installed them (ztunnel
//! leaves them in place when it exits, however it exits), and while no ztunnel listens every
//! packet they would have given it is dropped — new connections (`tproxy` finds no listener),
//! the rest of connections the dead process owned, and IPv6, which is never captured. A mesh
//! pod's TCP therefore never leaves the node in plaintext, whatever state ztunnel is in.

use crate::cli::CaptureArgs;
use anyhow::{bail, Context};
use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

/// Mark TPROXY sets on captured packets (value within the mask).
pub const TPROXY_MARK: u32 = 0x400;
pub const TPROXY_MASK: u32 = 0xfff;
/// Routing table for locally delivering marked packets.
pub const ROUTE_TABLE: u32 = 100;
/// Mark on ztunnel's own upstream sockets, so no rule ever matches them (must not contain
/// 0x400 within 0xfff, see TPROXY.md pitfall 6).
pub const SOCKET_MARK: u32 = 0x539;
const TABLE: &str = "ztunnel";
/// ICMPv6 a pod needs on its link (neighbour discovery and MLD), the only IPv6 it may send.
const LINK_ICMPV6: &str = "nd-router-solicit, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert, nd-redirect, mld-listener-query, mld-listener-report, mld2-listener-report";

/// What to capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureSpec {
    pub pod_ifaces: Vec<String>,
    /// (interface, address) pairs: the only sources a pod interface may send TCP from.
    pub pod_sources: Vec<(String, Ipv4Addr)>,
    pub pod_cidrs: Vec<ipnet::IpNet>,
    pub outbound_port: u16,
    pub inbound_plaintext_port: u16,
    pub inbound_port: u16,
    /// The DNS proxy's port: UDP and TCP to port 53 from pod interfaces go there (none: DNS
    /// is not captured).
    pub dns_port: Option<u16>,
    /// Pod addresses whose DNS is not captured (`ambient.istio.io/dns-capture: "false"`).
    pub dns_off: Vec<Ipv4Addr>,
}

/// Whether `i` can be a Linux interface name (and is safe to paste into an nft ruleset).
pub fn valid_iface_name(i: &str) -> bool {
    !i.is_empty()
        && i.len() <= 15
        && i.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
}

impl CaptureSpec {
    /// Nothing captured yet (the mesh-following form starts from this).
    pub fn empty() -> Self {
        CaptureSpec {
            pod_ifaces: Vec::new(),
            pod_sources: Vec::new(),
            pod_cidrs: Vec::new(),
            outbound_port: 15001,
            inbound_plaintext_port: 15006,
            inbound_port: 15008,
            dns_port: None,
            dns_off: Vec::new(),
        }
    }

    /// True when the command line names no pods: the spec then follows the mesh
    /// ([`crate::capture_follow`]).
    pub fn follows_mesh(args: &CaptureArgs) -> bool {
        args.pod_ifaces.is_empty() && args.pod_cidrs.is_empty()
    }

    /// The spec the command line names (empty when it names no pods).
    pub fn from_args(args: &CaptureArgs) -> anyhow::Result<Self> {
        let mut pod_ifaces = Vec::new();
        let mut pod_sources = Vec::new();
        for spec in &args.pod_ifaces {
            let (i, ips) = match spec.split_once('=') {
                Some((i, ips)) => (i, Some(ips)),
                None => (spec.as_str(), None),
            };
            if !valid_iface_name(i) {
                bail!("--pod-iface {i:?} is not a valid interface name");
            }
            for ip in ips.into_iter().flat_map(|s| s.split(',')) {
                let ip: Ipv4Addr = ip.trim().parse().map_err(|_| {
                    anyhow::anyhow!("--pod-iface {spec:?}: {ip:?} is not an IPv4 address")
                })?;
                pod_sources.push((i.to_string(), ip));
            }
            pod_ifaces.push(i.to_string());
        }
        Ok(CaptureSpec {
            pod_ifaces,
            pod_sources,
            pod_cidrs: args.pod_cidrs.clone(),
            ..CaptureSpec::empty()
        })
    }

    /// The complete nft ruleset (replaces any previous `inet ztunnel` table atomically).
    pub fn ruleset(&self) -> String {
        let mark = format!("meta mark set meta mark & 0xfffff000 | {TPROXY_MARK:#x}");
        let syn = "tcp flags & (syn | ack | fin | rst) == syn";
        let mut r = String::new();
        // `add` + `delete` makes the replacement work whether or not the table exists.
        r.push_str(&format!(
            "add table inet {TABLE}\ndelete table inet {TABLE}\n"
        ));
        r.push_str(&format!("table inet {TABLE} {{\n"));
        let v4: Vec<String> = self
            .pod_cidrs
            .iter()
            .filter(|c| matches!(c, ipnet::IpNet::V4(_)))
            .map(ToString::to_string)
            .collect();
        if !self.pod_ifaces.is_empty() {
            let ifs: Vec<String> = self.pod_ifaces.iter().map(|i| format!("\"{i}\"")).collect();
            r.push_str(&format!(
                "  set pod_ifs {{ type ifname; elements = {{ {} }} }}\n",
                ifs.join(", ")
            ));
        }
        if !v4.is_empty() {
            r.push_str(&format!(
                "  set pod_ips {{ type ipv4_addr; flags interval; elements = {{ {} }} }}\n",
                v4.join(", ")
            ));
        }
        let mut paired: Vec<String> = self
            .pod_sources
            .iter()
            .map(|(i, _)| format!("\"{i}\""))
            .collect();
        paired.dedup();
        if !paired.is_empty() {
            let pairs: Vec<String> = self
                .pod_sources
                .iter()
                .map(|(i, ip)| format!("\"{i}\" . {ip}"))
                .collect();
            r.push_str(&format!(
                "  set paired_ifs {{ type ifname; elements = {{ {} }} }}\n",
                paired.join(", ")
            ));
            r.push_str(&format!(
                "  set pod_srcs {{ type ifname . ipv4_addr; elements = {{ {} }} }}\n",
                pairs.join(", ")
            ));
        }
        if !self.dns_off.is_empty() {
            let off: Vec<String> = self.dns_off.iter().map(ToString::to_string).collect();
            r.push_str(&format!(
                "  set dns_off {{ type ipv4_addr; elements = {{ {} }} }}\n",
                off.join(", ")
            ));
        }
        r.push_str("  chain prerouting {\n    type filter hook prerouting priority mangle; policy accept;\n");
        if !self.pod_ifaces.is_empty() {
            // IPv6 is not captured: a pod may use it on its link (neighbour discovery, MLD,
            // never forwarded), nothing else. TCP is reset so a dual-stack client falls back to
            // IPv4 at once instead of waiting for a timeout.
            r.push_str(&format!(
                "    iifname @pod_ifs meta nfproto ipv6 icmpv6 type {{ {LINK_ICMPV6} }} ip6 daddr {{ fe80::/10, ff02::/16 }} accept\n"
            ));
            r.push_str(
                "    iifname @pod_ifs meta nfproto ipv6 meta l4proto tcp reject with tcp reset\n",
            );
            r.push_str("    iifname @pod_ifs meta nfproto ipv6 drop\n");
        }
        // Anti-spoofing, before anything can divert the packet: a pod may send TCP only from
        // its own addresses (kernel-enforced, so a spoofed SYN never reaches 15001 and a
        // spoofed segment never reaches a transparent socket).
        let dns = self.dns_port.filter(|_| !self.pod_ifaces.is_empty());
        if !paired.is_empty() {
            r.push_str(
                "    iifname @paired_ifs meta nfproto ipv4 meta l4proto tcp iifname . ip saddr != @pod_srcs drop\n",
            );
            // The DNS proxy tells pods apart by source address too.
            if dns.is_some() {
                r.push_str(
                    "    iifname @paired_ifs meta nfproto ipv4 udp dport 53 iifname . ip saddr != @pod_srcs drop\n",
                );
            }
        }
        if !self.pod_ifaces.is_empty() {
            r.push_str(
                "    iifname @pod_ifs meta nfproto ipv4 meta l4proto tcp fib saddr . iif oif missing drop\n",
            );
            if dns.is_some() {
                r.push_str(
                    "    iifname @pod_ifs meta nfproto ipv4 udp dport 53 fib saddr . iif oif missing drop\n",
                );
            }
        }
        // Segments of connections a transparent socket already owns go to that socket.
        r.push_str(&format!(
            "    tcp flags & (syn | ack | fin | rst) != syn socket transparent 1 {mark} accept\n"
        ));
        if !v4.is_empty() {
            let from_outside = if self.pod_ifaces.is_empty() {
                String::new()
            } else {
                "iifname != @pod_ifs ".to_string()
            };
            r.push_str(&format!(
                "    {from_outside}ip daddr @pod_ips tcp dport {hb} {syn} tproxy ip to 127.0.0.1:{hb} {mark} accept\n",
                hb = self.inbound_port
            ));
            r.push_str(&format!(
                "    {from_outside}ip daddr @pod_ips {syn} tproxy ip to 127.0.0.1:{pt} {mark} accept\n",
                pt = self.inbound_plaintext_port
            ));
            // nft's tproxy fails open: if ztunnel is down, refuse rather than bypass it. Any
            // other TCP to a mesh pod belongs to a connection ztunnel owned (the socket rule
            // above took those while it ran): stale once it is gone, never delivered.
            r.push_str(&format!(
                "    {from_outside}ip daddr @pod_ips meta l4proto tcp drop\n"
            ));
        }
        if let Some(port) = dns {
            // DNS to any nameserver → the DNS proxy (UDP: every datagram; TCP: new
            // connections, the rest follows through `socket transparent`). Pods opted out
            // keep their own resolver. nft tproxy fails open: with ztunnel down, UDP DNS
            // reaches the pod's nameserver directly (TCP falls to the drop below).
            let except = if self.dns_off.is_empty() {
                String::new()
            } else {
                "ip saddr != @dns_off ".to_string()
            };
            r.push_str(&format!(
                "    iifname @pod_ifs meta nfproto ipv4 {except}udp dport 53 tproxy ip to 127.0.0.1:{port} {mark} accept\n"
            ));
            r.push_str(&format!(
                "    iifname @pod_ifs meta nfproto ipv4 {except}tcp dport 53 {syn} tproxy ip to 127.0.0.1:{port} {mark} accept\n"
            ));
        }
        if !self.pod_ifaces.is_empty() {
            // New connections only: the rest of a captured connection reaches ztunnel through
            // the `socket transparent` rule, and replies of connections the node itself opened
            // to a pod (kubelet probes) must route normally, not land on 15001.
            r.push_str(&format!(
                "    iifname @pod_ifs meta nfproto ipv4 {syn} tproxy ip to 127.0.0.1:{} {mark} accept\n",
                self.outbound_port
            ));
            r.push_str(&format!("    iifname @pod_ifs {syn} drop\n"));
            // Every other TCP segment a pod sends off the node belongs to a connection a
            // transparent socket owns (its own, captured at the SYN; or ztunnel's connection to
            // it from the client's address) and was taken by the socket rule. One that is left
            // is a connection whose ztunnel is gone (killed, restarting): forwarding it would
            // send the pod's bytes in plaintext. Replies to connections the node itself opened
            // (kubelet probes) go to a local address and pass.
            r.push_str("    iifname @pod_ifs meta l4proto tcp fib daddr type != local drop\n");
        }
        r.push_str("  }\n");
        if !self.pod_ifaces.is_empty() {
            // IPv6 into mesh pods: never delivered past the mesh either.
            r.push_str(
                "  chain forward {\n    type filter hook forward priority filter; policy accept;\n",
            );
            r.push_str("    meta nfproto ipv6 oifname @pod_ifs drop\n");
            r.push_str("  }\n");
        }
        r.push_str("}\n");
        r
    }
}

fn run(cmd: &str, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {cmd} (is it installed?)"))?;
    if let (Some(text), Some(mut input)) = (stdin, child.stdin.take()) {
        input.write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{cmd} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn rule_args(verb: &str) -> Vec<String> {
    vec![
        "-4".into(),
        "rule".into(),
        verb.into(),
        "fwmark".into(),
        format!("{TPROXY_MARK:#x}/{TPROXY_MASK:#x}"),
        "lookup".into(),
        ROUTE_TABLE.to_string(),
    ]
}

/// Installs (or replaces) the ruleset and the policy routing. Safe to call repeatedly.
pub fn install(spec: &CaptureSpec) -> anyhow::Result<()> {
    run("nft", &["-f", "-"], Some(&spec.ruleset())).context("loading the nft ruleset")?;
    let rules = run("ip", &["-4", "rule", "show"], None)?;
    let wanted = format!("fwmark {TPROXY_MARK:#x}/{TPROXY_MASK:#x} lookup {ROUTE_TABLE}");
    if !rules.contains(&wanted) {
        let a = rule_args("add");
        run(
            "ip",
            &a.iter().map(String::as_str).collect::<Vec<_>>(),
            None,
        )?;
    }
    run(
        "ip",
        &[
            "-4",
            "route",
            "replace",
            "local",
            "0.0.0.0/0",
            "dev",
            "lo",
            "table",
            &ROUTE_TABLE.to_string(),
        ],
        None,
    )?;
    tracing::info!(
        pod_ifaces = ?spec.pod_ifaces,
        pod_cidrs = ?spec.pod_cidrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "capture rules installed"
    );
    Ok(())
}

/// Removes the ruleset and policy routing; absent pieces are not an error.
pub fn remove() -> anyhow::Result<()> {
    let _ = run("nft", &["delete", "table", "inet", TABLE], None);
    let d = rule_args("del");
    while run(
        "ip",
        &d.iter().map(String::as_str).collect::<Vec<_>>(),
        None,
    )
    .is_ok()
    {}
    let _ = run(
        "ip",
        &["-4", "route", "flush", "table", &ROUTE_TABLE.to_string()],
        None,
    );
    tracing::info!("capture rules removed");
    // Nothing captures the pods' 4-tuples now: ztunnel's TIME_WAIT sockets with those tuples
    // would drop their forwarded SYNs (see crate::time_wait).
    match crate::time_wait::forget_transparent() {
        Ok(n) => tracing::info!(
            sockets = n,
            "destroyed TIME_WAIT sockets of transparent connections"
        ),
        Err(e) => {
            tracing::warn!(error = %e, "cannot destroy TIME_WAIT sockets of transparent connections; forwarded SYNs reusing their ports may be dropped for up to 60 s")
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> CaptureSpec {
        CaptureSpec::from_args(&CaptureArgs {
            pod_ifaces: vec!["va".into(), "vc".into()],
            pod_cidrs: vec!["10.244.1.2/32".parse().unwrap()],
        })
        .unwrap()
    }

    #[test]
    fn ruleset_follows_the_verified_recipe() {
        let r = spec().ruleset();
        assert!(r.starts_with("add table inet ztunnel\ndelete table inet ztunnel\n"));
        assert!(r.contains("elements = { \"va\", \"vc\" }"));
        assert!(r.contains("!= syn socket transparent 1 meta mark set"));
        assert!(r.contains("tcp dport 15008 tcp flags & (syn | ack | fin | rst) == syn tproxy ip to 127.0.0.1:15008"));
        assert!(r.contains("tproxy ip to 127.0.0.1:15006"));
        assert!(r.contains(
            "iifname @pod_ifs meta nfproto ipv4 tcp flags & (syn | ack | fin | rst) == syn tproxy ip to 127.0.0.1:15001"
        ));
        // Fail closed: the drop rules follow the tproxy rules.
        assert!(r.find("tproxy ip to 127.0.0.1:15001").unwrap() < r.rfind("drop").unwrap());
    }

    /// Issue 9 item 13: a pod interface's IPv6 is never forwarded (only link-local ND/MLD is
    /// let through, TCP is reset so dual-stack clients fall back to IPv4 at once), and IPv6
    /// towards a pod interface is dropped, before any capture rule can matter.
    #[test]
    fn ipv6_of_mesh_pods_never_bypasses_the_mesh() {
        let r = spec().ruleset();
        let nd = r
            .find("iifname @pod_ifs meta nfproto ipv6 icmpv6 type { nd-router-solicit")
            .expect("link ICMPv6 allowed");
        assert!(r.contains("mld2-listener-report } ip6 daddr { fe80::/10, ff02::/16 } accept"));
        let reset = r
            .find("iifname @pod_ifs meta nfproto ipv6 meta l4proto tcp reject with tcp reset\n")
            .expect("IPv6 TCP reset");
        let drop = r
            .find("iifname @pod_ifs meta nfproto ipv6 drop\n")
            .expect("all other IPv6 dropped");
        let first_divert = r.find("socket transparent").unwrap();
        assert!(nd < reset && reset < drop && drop < first_divert, "{r}");
        let fwd = r.find("chain forward {").expect("forward chain");
        assert!(r[fwd..].contains("type filter hook forward priority filter; policy accept;\n    meta nfproto ipv6 oifname @pod_ifs drop\n"), "{r}");
        // No pod interfaces named: nothing to protect, no IPv6 rules at all.
        let inbound_only = CaptureSpec::from_args(&CaptureArgs {
            pod_ifaces: vec![],
            pod_cidrs: vec!["10.244.1.2/32".parse().unwrap()],
        })
        .unwrap()
        .ruleset();
        assert!(!inbound_only.contains("ipv6"), "{inbound_only}");
    }

    /// Issue 9 item 13: once ztunnel is gone (kill -9), the segments of the connections it
    /// owned are no longer taken by the socket rule; they must be dropped, not forwarded (that
    /// would put a pod's bytes on the wire in plaintext). Node-originated connections' replies
    /// (to a local address) still pass.
    #[test]
    fn segments_of_connections_a_dead_ztunnel_owned_are_dropped() {
        let r = spec().ruleset();
        let outbound = r.find("tproxy ip to 127.0.0.1:15001").unwrap();
        let stale_out = r
            .find("    iifname @pod_ifs meta l4proto tcp fib daddr type != local drop\n")
            .expect("stale outbound segments dropped");
        assert!(outbound < stale_out, "{r}");
        let inbound = r.find("tproxy ip to 127.0.0.1:15006").unwrap();
        let stale_in = r
            .find("    iifname != @pod_ifs ip daddr @pod_ips meta l4proto tcp drop\n")
            .expect("stale inbound segments (and SYNs nobody takes) dropped");
        assert!(inbound < stale_in, "{r}");
        // The socket rule, which keeps live connections working, comes before both.
        let socket = r.find("socket transparent 1").unwrap();
        assert!(socket < stale_in && socket < stale_out);
    }

    #[test]
    fn pod_sources_are_enforced_before_capture() {
        let spec = CaptureSpec::from_args(&CaptureArgs {
            pod_ifaces: vec!["va=10.244.1.2".into(), "vc".into()],
            pod_cidrs: vec![],
        })
        .unwrap();
        assert_eq!(spec.pod_ifaces, vec!["va", "vc"]);
        let r = spec.ruleset();
        assert!(r.contains(
            "set pod_srcs { type ifname . ipv4_addr; elements = { \"va\" . 10.244.1.2 } }"
        ));
        assert!(r.contains("set paired_ifs { type ifname; elements = { \"va\" } }"));
        let paired = r
            .find("iifname . ip saddr != @pod_srcs drop")
            .expect("source check");
        let rpf = r
            .find("fib saddr . iif oif missing drop")
            .expect("rpf check");
        let first_divert = r.find("socket transparent").unwrap();
        assert!(paired < first_divert && rpf < first_divert);
        let bad = CaptureSpec::from_args(&CaptureArgs {
            pod_ifaces: vec!["va=fd00::1".into()],
            pod_cidrs: vec![],
        })
        .unwrap_err();
        assert!(bad.to_string().contains("not an IPv4 address"), "{bad}");
    }

    #[test]
    fn dns_is_captured_before_outbound_except_for_opted_out_pods() {
        let mut spec = CaptureSpec::from_args(&CaptureArgs {
            pod_ifaces: vec!["va=10.244.1.2".into(), "vc=10.244.1.3".into()],
            pod_cidrs: vec![],
        })
        .unwrap();
        assert!(!spec.ruleset().contains("dport 53"), "off unless asked");
        spec.dns_port = Some(15053);
        let r = spec.ruleset();
        let udp = r
            .find("iifname @pod_ifs meta nfproto ipv4 udp dport 53 tproxy ip to 127.0.0.1:15053 meta mark set")
            .expect("udp rule");
        let tcp = r
            .find("iifname @pod_ifs meta nfproto ipv4 tcp dport 53 tcp flags & (syn | ack | fin | rst) == syn tproxy ip to 127.0.0.1:15053")
            .expect("tcp rule");
        let outbound = r.find("tproxy ip to 127.0.0.1:15001").unwrap();
        let spoof = r
            .find("udp dport 53 iifname . ip saddr != @pod_srcs drop")
            .expect("udp source check");
        assert!(spoof < udp && udp < outbound && tcp < outbound);
        assert!(!r.contains("dns_off"));
        spec.dns_off = vec!["10.244.1.3".parse().unwrap()];
        let r = spec.ruleset();
        assert!(r.contains("set dns_off { type ipv4_addr; elements = { 10.244.1.3 } }"));
        assert!(r.contains("ip saddr != @dns_off udp dport 53 tproxy"));
        assert!(r.contains("ip saddr != @dns_off tcp dport 53"));
        // No pod interfaces: nothing to capture DNS from.
        let mut none = CaptureSpec::empty();
        none.dns_port = Some(15053);
        assert!(!none.ruleset().contains("dport 53"));
    }

    #[test]
    fn bad_interface_names_are_rejected() {
        let err = CaptureSpec::from_args(&CaptureArgs {
            pod_ifaces: vec!["va; drop".into()],
            pod_cidrs: vec![],
        })
        .unwrap_err();
        assert!(err.to_string().contains("not a valid interface name"));
    }
}

//! TIME_WAIT sockets that ztunnel's transparent connections leave in the node namespace, and
//! removing them when nothing captures their 4-tuples any more.
//!
//! ztunnel's pod-facing sockets carry the pods' own 4-tuples: an accepted 15001/15006 socket
//! is `pod:port ⇄ original destination`, an upstream socket to a local pod is
//! `client:port ⇄ pod:port` (the client's address, spoofed). When ztunnel closes first, the
//! kernel keeps a TIME_WAIT socket with that tuple for 60 s. While the capture is installed
//! that is harmless (TPROXY hands a SYN that meets a TIME_WAIT socket to the listener, and
//! ztunnel's own connects pick free tuples). Once the capture is gone (`ztunnel capture
//! remove`, or a pod leaving the mesh), the same tuple arrives as a *forwarded* SYN: TCP early
//! demux attaches the TIME_WAIT socket to it, and `ip_forward` drops any packet that carries a
//! socket — plain connections reusing the port fail until the TIME_WAIT expires. Those
//! sockets are destroyed (`ss -K`, `SOCK_DESTROY`) when the capture that covered them goes.

use anyhow::{bail, Context};
use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, Stdio};

/// The `ss` filter for IPv4 TIME_WAIT sockets whose local address is none of the node's
/// (`local`), nor loopback: only a transparent socket can have such an address.
pub fn foreign_filter(local: &[IpAddr]) -> Vec<String> {
    let mut f = vec![
        "not".to_string(),
        "(".into(),
        "src".into(),
        "127.0.0.0/8".into(),
    ];
    for ip in local.iter().filter(|ip| ip.is_ipv4()) {
        f.extend(["or".into(), "src".into(), ip.to_string()]);
    }
    f.push(")".into());
    f
}

/// The `ss` filter for IPv4 TIME_WAIT sockets with one of `ips` at either end.
pub fn involving_filter(ips: &[Ipv4Addr]) -> Vec<String> {
    let mut f = vec!["(".to_string()];
    for (i, ip) in ips.iter().enumerate() {
        if i > 0 {
            f.push("or".into());
        }
        f.extend([
            "src".into(),
            ip.to_string(),
            "or".into(),
            "dst".into(),
            ip.to_string(),
        ]);
    }
    f.push(")".into());
    f
}

/// Destroys the IPv4 TIME_WAIT sockets `filter` selects; returns how many.
fn destroy(filter: &[String]) -> anyhow::Result<usize> {
    let out = Command::new("ss")
        .args(["-K", "-4", "-H", "-t", "-n", "state", "time-wait"])
        .args(filter)
        .stdin(Stdio::null())
        .output()
        .context("cannot run ss (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ss -K failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    // ss prints each socket it destroyed.
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count())
}

/// The node's own addresses in `ip -j addr show` output.
pub fn parse_addresses(json: &str) -> Vec<IpAddr> {
    let Ok(links) = serde_json::from_str::<Vec<serde_json::Value>>(json) else {
        return Vec::new();
    };
    links
        .iter()
        .filter_map(|l| l.get("addr_info")?.as_array())
        .flatten()
        .filter_map(|a| a.get("local")?.as_str()?.parse().ok())
        .collect()
}

/// Destroys the TIME_WAIT sockets of transparent connections (local address not the node's):
/// after the capture is removed nothing else could have made them.
pub fn forget_transparent() -> anyhow::Result<usize> {
    let out = Command::new("ip")
        .args(["-j", "addr", "show"])
        .stdin(Stdio::null())
        .output()
        .context("cannot run ip")?;
    if !out.status.success() {
        bail!("ip -j addr show failed");
    }
    let local = parse_addresses(&String::from_utf8_lossy(&out.stdout));
    if local.is_empty() {
        // Never guess: with no address list the filter would select the node's own sockets.
        bail!("no node addresses found");
    }
    destroy(&foreign_filter(&local))
}

/// Destroys the TIME_WAIT sockets with one of `ips` (pods no longer captured) at either end.
pub fn forget_involving(ips: &[Ipv4Addr]) -> anyhow::Result<usize> {
    if ips.is_empty() {
        return Ok(0);
    }
    destroy(&involving_filter(ips))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn foreign_filter_keeps_every_node_address_and_loopback() {
        let local: Vec<IpAddr> = vec![
            "10.0.0.1".parse().unwrap(),
            "::1".parse().unwrap(),
            "10.244.1.1".parse().unwrap(),
        ];
        assert_eq!(
            foreign_filter(&local).join(" "),
            "not ( src 127.0.0.0/8 or src 10.0.0.1 or src 10.244.1.1 )"
        );
    }

    #[test]
    fn involving_filter_matches_either_end() {
        let ips: Vec<Ipv4Addr> = vec!["10.244.1.2".parse().unwrap(), "10.244.1.3".parse().unwrap()];
        assert_eq!(
            involving_filter(&ips).join(" "),
            "( src 10.244.1.2 or dst 10.244.1.2 or src 10.244.1.3 or dst 10.244.1.3 )"
        );
    }

    #[test]
    fn addresses_come_from_ip_json() {
        let json = r#"[{"ifname":"lo","addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8},{"family":"inet6","local":"::1"}]},
                       {"ifname":"v12","addr_info":[{"family":"inet","local":"10.0.0.1","prefixlen":24}]},
                       {"ifname":"va","addr_info":[]}]"#;
        let got: Vec<String> = parse_addresses(json)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(got, ["127.0.0.1", "::1", "10.0.0.1"]);
        assert!(parse_addresses("garbage").is_empty());
    }
}

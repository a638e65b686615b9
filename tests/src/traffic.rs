//! Traffic for restart and upgrade tests: a continuous load from a pod (long-lived echo
//! streams and a loop of new connections, tallied), and counters of what leaves a node's uplink
//! from mesh pod addresses ([`LeakWatch`]: plaintext vs HBONE).

use crate::apps::{probe_echo, Outcome};
use crate::netns::Netns;
use crate::topology::Node;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bytes every payload of the load carries: a capture on the uplink that contains them saw a
/// mesh pod's data in plaintext.
pub const MARKER: &[u8] = b"MESH-PLAINTEXT-MARKER-";

/// Counters in the node's `postrouting` for TCP leaving on the uplink from mesh pod
/// addresses: `plaintext` (neither port is HBONE's 15008: must stay 0), and `hbone` /
/// `hbone-reply` (to / from 15008: the tunnels, proving the counters see the traffic at all).
pub struct LeakWatch {
    ns: Netns,
}

impl LeakWatch {
    pub fn install(node: &Node, mesh_ips: &[Ipv4Addr]) -> LeakWatch {
        let ips: Vec<String> = mesh_ips.iter().map(ToString::to_string).collect();
        let (link, ips) = (&node.link_if, ips.join(", "));
        let rules = format!(
            "table inet leakwatch {{\n  chain watch {{\n    tcp dport 15008 counter return comment \"hbone\"\n    tcp sport 15008 counter return comment \"hbone-reply\"\n    counter comment \"plaintext\"\n  }}\n  chain post {{\n    type filter hook postrouting priority 100; policy accept;\n    oifname \"{link}\" ip saddr {{ {ips} }} meta l4proto tcp jump watch\n  }}\n}}\n"
        );
        let file = std::env::temp_dir().join(format!("leakwatch-{}.nft", node.ns.name()));
        std::fs::write(&file, rules).unwrap();
        node.ns
            .exec(&["nft", "-f", file.to_str().unwrap()])
            .unwrap();
        LeakWatch {
            ns: node.ns.handle(),
        }
    }

    /// The packet count of the rule commented `counter`. (One port test per rule: nft 1.0.6
    /// merges `tcp sport != X tcp dport != X` into one 32-bit compare that means "or".)
    pub fn packets(&self, counter: &str) -> u64 {
        let out = self
            .ns
            .exec(&["nft", "list", "table", "inet", "leakwatch"])
            .unwrap();
        out.lines()
            .find(|l| l.contains(&format!("comment \"{counter}\"")))
            .and_then(|l| l.split_once("packets "))
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no packet count for {counter} in {out}"))
    }
}

#[derive(Debug, Default)]
pub struct Tally {
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    /// The first failures, for the assertion message.
    pub failures: Mutex<Vec<String>>,
}

impl Tally {
    pub fn fail(&self, what: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut f = self.failures.lock().unwrap();
        if f.len() < 20 {
            f.push(what);
        }
    }
    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }
}

/// Traffic from a pod: per target, a long-lived connection echoing marker-filled chunks
/// (reconnecting when it breaks) when `streams`, and a loop of new short connections.
pub struct Load {
    pub tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    pub fn start(
        pod: &Netns,
        targets: &[SocketAddr],
        streams: bool,
        probe_timeout: Duration,
    ) -> Load {
        let tally = Arc::new(Tally::default());
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for &target in targets {
            if streams {
                let (pod, tally, stop) = (pod.handle(), tally.clone(), stop.clone());
                tasks.push(tokio::spawn(stream_loop(pod, target, tally, stop)));
            }
            let (pod, tally, stop) = (pod.handle(), tally.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match probe_echo(&pod, target, probe_timeout).await {
                        Outcome::Echoed => drop(tally.ok.fetch_add(1, Ordering::Relaxed)),
                        o => tally.fail(format!("new connection to {target}: {o:?}")),
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }));
        }
        Load { tally, stop, tasks }
    }

    /// Waits until `n` more exchanges succeeded than `from`.
    pub async fn wait_ok(&self, from: u64, n: u64, timeout: Duration, what: &str) {
        let deadline = Instant::now() + timeout;
        while self.tally.ok() < from + n {
            assert!(
                Instant::now() < deadline,
                "{what}: only {} of {n} exchanges within {timeout:?}; failures so far {}: {:?}",
                self.tally.ok() - from,
                self.tally.failed(),
                self.tally.failures.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn stop(self) -> Arc<Tally> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
        self.tally
    }
}

/// One connection at a time to `target`, echoing 4 KiB marker chunks until it breaks, then
/// a new one.
async fn stream_loop(pod: Netns, target: SocketAddr, tally: Arc<Tally>, stop: Arc<AtomicBool>) {
    let chunk: Vec<u8> = MARKER.iter().copied().cycle().take(4096).collect();
    while !stop.load(Ordering::Relaxed) {
        let Ok(socket) = pod.tcp_socket() else {
            continue;
        };
        let Ok(Ok(mut s)) =
            tokio::time::timeout(Duration::from_secs(1), socket.connect(target)).await
        else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let mut back = vec![0u8; chunk.len()];
        while !stop.load(Ordering::Relaxed) {
            let exchange = async {
                s.write_all(&chunk).await?;
                s.read_exact(&mut back).await?;
                Ok::<_, std::io::Error>(())
            };
            match tokio::time::timeout(Duration::from_secs(2), exchange).await {
                Ok(Ok(())) if back == chunk => drop(tally.ok.fetch_add(1, Ordering::Relaxed)),
                _ => break,
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

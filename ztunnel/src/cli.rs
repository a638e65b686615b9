//! Command-line interface: `run` the agent, `ca init` a mesh root, `cert issue` a workload
//! certificate (for peers such as Envoy), and `capture install|remove` the TPROXY rules.

use crate::capture::CaptureSpec;
use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use common::identity::ca::MeshCa;
use common::identity::Identity;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "ztunnel",
    version,
    about = "Ambient mesh node agent (TPROXY capture + HBONE)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node agent.
    Run(Box<RunArgs>),
    /// Mesh root CA management.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Certificate tools.
    Cert {
        #[command(subcommand)]
        command: CertCommand,
    },
    /// Install or remove the TPROXY capture rules without running the proxy.
    Capture {
        #[command(subcommand)]
        command: CaptureCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Generate a new mesh root (root-cert.pem, root-key.pem) in DIR.
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = common::identity::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Issue a leaf certificate for a SPIFFE identity: OUT/cert.pem (leaf + root), OUT/key.pem,
    /// OUT/ca.pem.
    Issue {
        #[arg(long)]
        ca_dir: PathBuf,
        #[arg(long)]
        identity: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "24h", value_parser = common::duration::parse_ttl)]
        ttl: Duration,
    },
}

#[derive(Debug, Subcommand)]
pub enum CaptureCommand {
    /// Install (or atomically replace) the rules for the named pods.
    Install(CaptureArgs),
    /// Uninstall the rules (node teardown): the table, the policy routing, and the TIME_WAIT
    /// sockets ztunnel's transparent connections left behind (they would drop forwarded SYNs of
    /// the same 4-tuple for up to 60 s once nothing captures them).
    Remove,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CaptureMode {
    /// nftables TPROXY rules + policy routing installed by ztunnel itself.
    Nft,
    /// No capture: something else steers traffic (or tests connect to the ports directly).
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct CaptureArgs {
    /// Node-side interfaces of mesh pods: their outbound TCP is captured to 15001.
    /// `NAME=IP[,IP…]` also names the pod's IPv4 addresses: TCP arriving on that interface
    /// from any other source is dropped (a pod cannot borrow a neighbour's address). On every
    /// pod interface, TCP whose source does not route back through it is dropped too.
    #[arg(long = "pod-iface")]
    pub pod_ifaces: Vec<String>,
    /// Mesh pod addresses on this node: inbound SYNs to them are captured to 15008/15006.
    #[arg(long = "pod-cidr")]
    pub pod_cidrs: Vec<ipnet::IpNet>,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Local configuration file (YAML); reloaded when it changes. Either this or
    /// `--xds-address`.
    #[arg(long, env = "ZTUNNEL_CONFIG", required_unless_present = "xds_address")]
    pub config: Option<PathBuf>,
    /// The control plane, instead of `--config`: `https://host:port` (Istio's `XDS_ADDRESS`).
    /// Node id, metadata, token (`AUTH_TOKEN`), root (`XDS_ROOT_CA`) and server name
    /// (`ALT_XDS_HOSTNAME`) come from Istio's environment variables.
    #[arg(long, env = "XDS_ADDRESS", conflicts_with = "config")]
    pub xds_address: Option<String>,
    /// PEM file the control plane's certificate must chain to (overrides `XDS_ROOT_CA`).
    #[arg(long)]
    pub xds_root_ca: Option<PathBuf>,
    /// This node's name: workloads whose `node` equals it are served here.
    #[arg(long, env = "NODE_NAME")]
    pub node: String,
    /// Directory holding the mesh root (root-cert.pem, root-key.pem) or Istio's plug-in CA
    /// files (ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem): standalone mode, this
    /// agent mints certificates itself.
    #[arg(long, env = "ZTUNNEL_CA_DIR", required_unless_present = "ca_address")]
    pub ca_dir: Option<PathBuf>,
    /// Trust domain of the identities minted from `--ca-dir` (default: the one of a root this
    /// mesh generated, else `cluster.local`; a foreign root's organisation is not one).
    #[arg(long, env = "TRUST_DOMAIN")]
    pub trust_domain: Option<String>,
    /// The control plane's certificate service (cluster mode), e.g. `https://ambient-controller.ambient-system.svc:15012`;
    /// replaces `--ca-dir` (which wins if both are given).
    #[arg(long, env = "CA_ADDRESS")]
    pub ca_address: Option<String>,
    /// Root bundle PEM verifying the certificate service and mesh peers (cluster mode;
    /// default `./var/run/secrets/istio/root-cert.pem`).
    #[arg(long, env = "CA_ROOT_CA")]
    pub ca_root: Option<PathBuf>,
    /// Bearer token file for the certificate service, re-read on every request (cluster mode;
    /// default `./var/run/secrets/tokens/istio-token`).
    #[arg(long, env = "AUTH_TOKEN")]
    pub token_file: Option<String>,
    #[arg(long, value_enum, default_value = "none")]
    pub capture: CaptureMode,
    #[command(flatten)]
    pub capture_args: CaptureArgs,
    #[arg(long, default_value = "127.0.0.1:15001")]
    pub outbound_addr: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:15006")]
    pub inbound_plaintext_addr: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:15008")]
    pub inbound_addr: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15021")]
    pub readiness_addr: SocketAddr,
    /// How long live connections may take to finish after SIGTERM (the listeners close at
    /// once, so new connections go to a successor ztunnel or are dropped, never bypass it).
    #[arg(long, default_value = "30s", value_parser = common::duration::parse)]
    pub drain_timeout: Duration,
    /// Remove the capture rules when this process exits (node teardown). By default they stay:
    /// captured traffic is dropped while no ztunnel runs (fail closed), and the next ztunnel
    /// takes the rules over; `ztunnel capture remove` uninstalls them.
    #[arg(long)]
    pub remove_capture_on_exit: bool,
    /// Lifetime of minted workload certificates (rotated at half-life).
    #[arg(long, default_value = "24h", value_parser = common::duration::parse_ttl)]
    pub cert_ttl: Duration,
    /// How often the config file is checked for changes.
    #[arg(long, default_value = "1s", value_parser = common::duration::parse)]
    pub config_poll: Duration,
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Initial log filter (tracing EnvFilter syntax); changeable at runtime via /logging.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log_level: String,
    /// Data-plane shards: threads with a single-thread runtime each, every connection living
    /// on one of them (default: number of CPUs).
    #[arg(long)]
    pub worker_threads: Option<usize>,
    /// How long a peer may take for each step of opening an HBONE connection (TLS handshake,
    /// HTTP/2 preface, first CONNECT) before it is closed.
    #[arg(long, default_value = "10s", value_parser = common::duration::parse)]
    pub handshake_timeout: Duration,
    /// Live connections each data-plane listener (15001, 15006, 15008) accepts; more are
    /// reset and counted in `ztunnel_connections_shed_total{reason="connections"}`.
    #[arg(long, default_value_t = common::admission::Caps::default().connections)]
    pub max_connections: usize,
    /// Live connections per listener from one source IP (`reason="per_source"`).
    #[arg(long, default_value_t = common::admission::Caps::default().per_source)]
    pub max_connections_per_source: usize,
    /// TLS handshakes in progress on 15008 (`reason="handshakes"`).
    #[arg(long, default_value_t = common::admission::Caps::default().handshakes)]
    pub max_concurrent_handshakes: usize,
    /// TLS handshakes in progress from one source IP (`reason="handshakes_per_source"`): a
    /// peer stalling handshakes cannot lock every other peer out of new connections.
    #[arg(long, default_value_t = common::admission::Caps::default().handshakes_per_source)]
    pub max_concurrent_handshakes_per_source: usize,
    /// Connections over their source's handshake cap that wait (socket only, no TLS state)
    /// for one of its places until the handshake timeout, rather than being reset at once —
    /// a reset slowloris only reconnects at once; more than this are reset.
    #[arg(long, default_value_t = common::admission::Caps::default().handshakes_waiting)]
    pub max_waiting_handshakes: usize,
    /// The resolv.conf whose nameservers resolve DNS-resolution ServiceEntries (and answer
    /// what the DNS proxy forwards).
    #[arg(long, env = "ZTUNNEL_RESOLV_CONF", default_value = "/etc/resolv.conf")]
    pub resolv_conf: std::path::PathBuf,
    /// The DNS proxy: mesh pods' DNS (UDP/TCP port 53) is captured to `--dns-proxy-addr`,
    /// mesh names are answered there, the rest forwarded to `--resolv-conf`'s nameservers.
    /// Default: on with `--xds-address` (cluster mode, as Istio ambient's DNS capture), off
    /// with `--config`. `--dns-proxy` alone means true.
    #[arg(long, env = "ZTUNNEL_DNS_PROXY", num_args = 0..=1, default_missing_value = "true")]
    pub dns_proxy: Option<bool>,
    #[arg(long, default_value = "127.0.0.1:15053")]
    pub dns_proxy_addr: SocketAddr,
    /// The cluster's DNS domain for short names (`name` → `name.<ns>.svc.<domain>`); default:
    /// the mesh's trust domain (`cluster.local`).
    #[arg(long, env = "CLUSTER_DOMAIN")]
    pub dns_cluster_domain: Option<String>,
    /// Queries the DNS proxy forwards at once; more get SERVFAIL at once.
    #[arg(long, default_value_t = crate::dns_proxy::forward::MAX_IN_FLIGHT)]
    pub dns_max_in_flight: usize,
}

impl RunArgs {
    /// Whether the DNS proxy runs (see `--dns-proxy`).
    pub fn dns_proxy_enabled(&self) -> bool {
        self.dns_proxy.unwrap_or(self.xds_address.is_some())
    }
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(args) => crate::app::run(*args),
        Command::Ca {
            command: CaCommand::Init { dir, trust_domain },
        } => {
            let ca = MeshCa::generate(&trust_domain)?;
            ca.save(&dir)?;
            println!(
                "wrote mesh root for trust domain {trust_domain} to {}",
                dir.display()
            );
            Ok(())
        }
        Command::Cert {
            command:
                CertCommand::Issue {
                    ca_dir,
                    identity,
                    out,
                    ttl,
                },
        } => {
            let ca = MeshCa::load_with(&ca_dir, None)?;
            let id = Identity::parse(&identity)?;
            let issued = ca.issue(&id, ttl)?;
            std::fs::create_dir_all(&out).with_context(|| format!("{}", out.display()))?;
            std::fs::write(out.join("cert.pem"), &issued.chain_pem)?;
            std::fs::write(out.join("key.pem"), &issued.key_pem)?;
            std::fs::write(out.join("ca.pem"), ca.root_pem())?;
            println!("issued {id} into {}", out.display());
            Ok(())
        }
        Command::Capture { command } => match command {
            CaptureCommand::Install(args) => {
                if CaptureSpec::follows_mesh(&args) {
                    anyhow::bail!(
                        "capture install needs --pod-iface or --pod-cidr (`ztunnel run` without them follows the mesh)"
                    );
                }
                let spec = CaptureSpec::from_args(&args)?;
                crate::capture::install(&spec)?;
                println!("capture rules installed");
                Ok(())
            }
            CaptureCommand::Remove => {
                crate::capture::remove()?;
                println!("capture rules removed");
                Ok(())
            }
        },
    }
}

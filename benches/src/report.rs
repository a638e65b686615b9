//! The printed result: one table with raw TCP, ztunnel and Envoy side by side, each proxied
//! figure also as a ratio to the raw baseline of the same run, and the targets next to them.

use crate::setup::LargeConfigMemory;
use crate::suite::SuiteResult;

/// Everything the run measured.
pub struct Report {
    pub raw: SuiteResult,
    pub ztunnel: SuiteResult,
    pub envoy: SuiteResult,
    pub conn_concurrency: usize,
    /// ztunnel n1 / n2 resident memory right after start, bytes.
    pub zt_idle: [u64; 2],
    /// ztunnel n1 / n2 resident memory after the traffic suite, bytes.
    pub zt_after_traffic: [u64; 2],
    pub zt_large: LargeConfigMemory,
    /// Envoy n1 / n2 resident memory after their suite, bytes.
    pub envoy_after_traffic: [u64; 2],
}

const MB: f64 = 1e6;

struct Row<'a> {
    metric: &'a str,
    raw: Option<f64>,
    zt: Option<f64>,
    envoy: Option<f64>,
    digits: usize,
    target: String,
}

fn cell(v: Option<f64>, digits: usize) -> String {
    v.map(|v| format!("{v:.digits$}"))
        .unwrap_or_else(|| "-".into())
}

fn ratio(v: Option<f64>, raw: Option<f64>) -> String {
    match (v, raw) {
        (Some(v), Some(r)) if r > 0.0 => format!("({:.2}×)", v / r),
        _ => String::new(),
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "ok"
    } else {
        "MISSED"
    }
}

impl Report {
    pub fn print(&self) {
        let (raw, zt, ev) = (&self.raw, &self.ztunnel, &self.envoy);
        let one = |s: &SuiteResult| Some(s.one_stream.gbit_per_s());
        let four = |s: &SuiteResult| Some(s.four_streams.gbit_per_s());
        let zt_one_ratio = zt.one_stream.gbit_per_s() / raw.one_stream.gbit_per_s();
        let zt_four_ratio = zt.four_streams.gbit_per_s() / raw.four_streams.gbit_per_s();
        let zt_conn_ratio = zt.conn_conc.per_sec() / raw.conn_conc.per_sec();
        let zt_cpu = zt.cpu_s_per_gb.unwrap_or(f64::NAN);
        let idle = self.zt_idle[0].max(self.zt_idle[1]) as f64 / MB;
        let conc_metric = format!("new connections/s, {} concurrent", self.conn_concurrency);
        let rows = vec![
            Row {
                metric: "throughput, 1 stream [Gbit/s]",
                raw: one(raw),
                zt: one(zt),
                envoy: one(ev),
                digits: 2,
                target: format!(
                    "≥ 0.35× raw: {} (goal 0.46×)",
                    verdict(zt_one_ratio >= 0.35)
                ),
            },
            Row {
                metric: "throughput, 4 streams [Gbit/s]",
                raw: four(raw),
                zt: four(zt),
                envoy: four(ev),
                digits: 2,
                target: format!("goal ≥ 0.36× raw: {}", verdict(zt_four_ratio >= 0.36)),
            },
            Row {
                metric: "proxy CPU, both nodes [s/GB]",
                raw: None,
                zt: zt.cpu_s_per_gb,
                envoy: ev.cpu_s_per_gb,
                digits: 2,
                target: format!("goal ≤ 1.4: {}", verdict(zt_cpu <= 1.4)),
            },
            Row {
                metric: "client+server CPU [s/GB]",
                raw: Some(raw.loadgen_cpu_s_per_gb),
                zt: Some(zt.loadgen_cpu_s_per_gb),
                envoy: Some(ev.loadgen_cpu_s_per_gb),
                digits: 2,
                target: "(the load generators, for scale)".into(),
            },
            Row {
                metric: "latency 1 KiB req/resp p50 [µs]",
                raw: Some(raw.latency.quantile_us(0.5)),
                zt: Some(zt.latency.quantile_us(0.5)),
                envoy: Some(ev.latency.quantile_us(0.5)),
                digits: 1,
                target: "(lower is better)".into(),
            },
            Row {
                metric: "latency 1 KiB req/resp p99 [µs]",
                raw: Some(raw.latency.quantile_us(0.99)),
                zt: Some(zt.latency.quantile_us(0.99)),
                envoy: Some(ev.latency.quantile_us(0.99)),
                digits: 1,
                target: "(lower is better)".into(),
            },
            Row {
                metric: "new connections/s, sequential",
                raw: Some(raw.conn_seq.per_sec()),
                zt: Some(zt.conn_seq.per_sec()),
                envoy: Some(ev.conn_seq.per_sec()),
                digits: 0,
                target: String::new(),
            },
            Row {
                metric: &conc_metric,
                raw: Some(raw.conn_conc.per_sec()),
                zt: Some(zt.conn_conc.per_sec()),
                envoy: Some(ev.conn_conc.per_sec()),
                digits: 0,
                target: format!("goal ≥ 0.375× raw: {}", verdict(zt_conn_ratio >= 0.375)),
            },
            Row {
                metric: "proxy CPU per new connection [µs]",
                raw: None,
                zt: zt.cpu_us_per_conn,
                envoy: ev.cpu_us_per_conn,
                digits: 0,
                target: String::new(),
            },
        ];
        println!();
        println!(
            "{:<38} {:>10} {:>10} {:>8} {:>10} {:>8}   target (ztunnel)",
            "metric", "raw TCP", "ztunnel", "", "Envoy", ""
        );
        println!("{}", "-".repeat(120));
        for r in &rows {
            println!(
                "{:<38} {:>10} {:>10} {:>8} {:>10} {:>8}   {}",
                r.metric,
                cell(r.raw, r.digits),
                cell(r.zt, r.digits),
                ratio(r.zt, r.raw),
                cell(r.envoy, r.digits),
                ratio(r.envoy, r.raw),
                r.target
            );
        }
        let mem = |metric: &str, zt: f64, envoy: Option<f64>, target: String| {
            println!(
                "{:<38} {:>10} {:>10} {:>8} {:>10} {:>8}   {}",
                metric,
                "-",
                format!("{zt:.1}"),
                "",
                cell(envoy, 1),
                "",
                target
            );
        };
        let envoy_mb = self.envoy_after_traffic[0].max(self.envoy_after_traffic[1]) as f64 / MB;
        mem(
            "RSS idle, per process [MB]",
            idle,
            None,
            format!("≤ 20 MB: {}", verdict(idle <= 20.0)),
        );
        mem(
            "RSS after the suite, per process [MB]",
            self.zt_after_traffic[0].max(self.zt_after_traffic[1]) as f64 / MB,
            Some(envoy_mb),
            String::new(),
        );
        mem(
            "RSS large cfg, reload after suite [MB]",
            self.zt_large.reloaded as f64 / MB,
            None,
            format!(
                "≤ 50 MB: {} (peak {:.1} MB)",
                verdict(self.zt_large.reloaded as f64 / MB <= 50.0),
                self.zt_large.reloaded_peak as f64 / MB
            ),
        );
        mem(
            "RSS 10k workloads+1k svcs, fresh [MB]",
            self.zt_large.fresh as f64 / MB,
            None,
            format!(
                "≤ 50 MB: {}",
                verdict(self.zt_large.fresh as f64 / MB <= 50.0)
            ),
        );
        println!("{}", "-".repeat(120));
        println!(
            "bytes moved: raw {:.2}+{:.2} GB, ztunnel {:.2}+{:.2} GB, Envoy {:.2}+{:.2} GB (1 stream + 4 streams); \
             connections: raw {}, ztunnel {}, Envoy {}; RTT samples {} each",
            raw.one_stream.bytes as f64 / 1e9,
            raw.four_streams.bytes as f64 / 1e9,
            zt.one_stream.bytes as f64 / 1e9,
            zt.four_streams.bytes as f64 / 1e9,
            ev.one_stream.bytes as f64 / 1e9,
            ev.four_streams.bytes as f64 / 1e9,
            raw.conn_seq.conns + raw.conn_conc.conns,
            zt.conn_seq.conns + zt.conn_conc.conns,
            ev.conn_seq.conns + ev.conn_conc.conns,
            raw.latency.samples(),
        );
        println!(
            "latency: client and server threads pinned to one CPU, so raw is the kernel path alone; \
             the proxied round trips also pay the cross-CPU wake-ups of the proxies' threads"
        );
        println!(
            "RSS per node (n1/n2): idle {:.1}/{:.1} MB, after the suite {:.1}/{:.1} MB; Envoy after its suite {:.1}/{:.1} MB",
            self.zt_idle[0] as f64 / MB,
            self.zt_idle[1] as f64 / MB,
            self.zt_after_traffic[0] as f64 / MB,
            self.zt_after_traffic[1] as f64 / MB,
            self.envoy_after_traffic[0] as f64 / MB,
            self.envoy_after_traffic[1] as f64 / MB,
        );
    }
}

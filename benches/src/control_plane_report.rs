//! The printed result of `benches --controller`: one table with a column per scale (idle,
//! baseline, measured), the measured scale as a ratio to the baseline and to the idle
//! controller, and issue 7's goals (≤ 1 s from a change to all clients, controller ≤ 300 MB,
//! ztunnel ≤ 50 MB) with a verdict.

use crate::cluster_objects::Scale;
use crate::control_plane::CLIENTS;
use std::path::Path;
use std::time::Duration;

/// Resident memory of a process, bytes.
#[derive(Debug, Clone, Copy)]
pub struct Mem {
    pub rss: u64,
    pub hwm: u64,
}

/// Everything measured at one scale.
pub struct ScaleResult {
    pub scale: Scale,
    pub objects: usize,
    /// Filling the fake API server (in-process inserts).
    pub load_time: Duration,
    /// `/proc/loadavg` just before the controller started.
    pub load_avg: String,
    /// Controller spawn → ready (initial list, index synced, CA loaded, gRPC bound).
    pub sync_time: Duration,
    /// Controller CPU seconds at ready.
    pub sync_cpu: f64,
    pub mem_sync: Mem,
    /// Per client: connect → first response of every type.
    pub push_times: Vec<Duration>,
    /// Per client: bytes of those first responses.
    pub push_bytes: Vec<usize>,
    /// Controller CPU seconds serving the 10 initial pushes.
    pub push_cpu: f64,
    pub mem_push: Mem,
    /// Per change: API write returned → the last of the 10 clients has it.
    pub latencies: Vec<Duration>,
    /// Controller CPU seconds over the whole change test.
    pub change_cpu: f64,
    pub mem_changes: Mem,
    /// ztunnel spawn → ready (first xDS answers applied).
    pub zt_ready: Duration,
    pub zt_mem: Mem,
    /// Controller memory at the end (after also serving the ztunnel).
    pub controller_final: Mem,
}

const MB: f64 = 1e6;

/// Nearest-rank percentile of `v` (sorted in place), in milliseconds.
pub fn percentile_ms(v: &[Duration], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort();
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1].as_secs_f64() * 1e3
}

fn max_ms(v: &[Duration]) -> f64 {
    v.iter().max().map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

fn mean(v: &[usize]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<usize>() as f64 / v.len() as f64
    }
}

impl ScaleResult {
    fn change_p50(&self) -> f64 {
        percentile_ms(&self.latencies, 50.0)
    }
    fn change_p99(&self) -> f64 {
        percentile_ms(&self.latencies, 99.0)
    }
    fn change_max(&self) -> f64 {
        max_ms(&self.latencies)
    }
    /// VmHWM, or a larger VmRSS seen earlier (the kernel folds per-thread RSS counters into
    /// the high-water mark lazily).
    fn controller_peak(&self) -> u64 {
        [
            self.mem_sync,
            self.mem_push,
            self.mem_changes,
            self.controller_final,
        ]
        .iter()
        .map(|m| m.hwm.max(m.rss))
        .max()
        .unwrap_or(0)
    }

    /// A few lines right after the scale ran.
    pub fn print_progress(&self) {
        println!(
            "  {} objects loaded in {:.2} s; controller ready in {:.2} s ({:.2} CPU s), RSS {:.1} MB; \
             initial push {:.2} MB/client in ≤ {:.0} ms; change → {CLIENTS} clients p50 {:.0} ms, max {:.0} ms; \
             ztunnel RSS {:.1} MB (load {})",
            self.objects,
            self.load_time.as_secs_f64(),
            self.sync_time.as_secs_f64(),
            self.sync_cpu,
            self.mem_sync.rss as f64 / MB,
            mean(&self.push_bytes) / MB,
            max_ms(&self.push_times),
            self.change_p50(),
            self.change_max(),
            self.zt_mem.rss as f64 / MB,
            self.load_avg,
        );
    }
}

pub fn print_header(controller: &Path, ztunnel: &Path, quick: bool, changes: usize) {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "benches --controller{}: the control plane at scale — {cpus} CPUs shared by the fake API \
         server, the controller, {CLIENTS} xDS clients and a ztunnel; load average {}",
        if quick { " --quick" } else { "" },
        crate::control_plane::load_average()
    );
    for (what, p) in [("controller", controller), ("ztunnel", ztunnel)] {
        let release = p.components().any(|c| c.as_os_str() == "release");
        println!(
            "{what}: {}{}",
            p.display(),
            if release {
                ""
            } else {
                "  ← NOT a release build: figures are meaningless"
            }
        );
    }
    println!(
        "per scale: objects created in the fake API before the controller starts; {CLIENTS} delta ADS \
         clients (Address + Authorization + config type, TLS, TokenReview) connect at once; then \
         {changes} pod changes (add / delete alternately, one at a time), each timed from the API \
         write to the last client's response naming it (includes the controller's 100 ms debounce)"
    );
}

struct Row {
    metric: &'static str,
    values: [f64; 3],
    digits: usize,
    goal: Option<(f64, &'static str)>,
}

fn row(
    metric: &'static str,
    r: &[ScaleResult],
    f: impl Fn(&ScaleResult) -> f64,
    digits: usize,
) -> Row {
    Row {
        metric,
        values: [f(&r[0]), f(&r[1]), f(&r[2])],
        digits,
        goal: None,
    }
}

fn ratio(v: f64, base: f64) -> String {
    if base > 0.0 {
        format!("{:.2}×", v / base)
    } else {
        "-".into()
    }
}

/// The table: one row per figure, columns idle / baseline / measured / ratios / goal.
pub fn print(r: &[ScaleResult]) {
    if r.len() != 3 {
        return;
    }
    let mb = |m: Mem| m.rss as f64 / MB;
    let rows = [
        row("objects in the API", r, |x| x.objects as f64, 0),
        row(
            "controller ready after (s)",
            r,
            |x| x.sync_time.as_secs_f64(),
            2,
        ),
        row("controller CPU to ready (s)", r, |x| x.sync_cpu, 2),
        row("controller RSS after sync (MB)", r, |x| mb(x.mem_sync), 1),
        row(
            "initial push bytes / client (MB)",
            r,
            |x| mean(&x.push_bytes) / MB,
            3,
        ),
        row(
            "initial push time p50 (ms)",
            r,
            |x| percentile_ms(&x.push_times, 50.0),
            0,
        ),
        row(
            "initial push time, last client (ms)",
            r,
            |x| max_ms(&x.push_times),
            0,
        ),
        row("controller CPU for 10 pushes (s)", r, |x| x.push_cpu, 2),
        row("controller RSS after pushes (MB)", r, |x| mb(x.mem_push), 1),
        row(
            "change → all clients p50 (ms)",
            r,
            ScaleResult::change_p50,
            0,
        ),
        row(
            "change → all clients p99 (ms)",
            r,
            ScaleResult::change_p99,
            0,
        ),
        Row {
            goal: Some((1000.0, "≤ 1000")),
            ..row(
                "change → all clients max (ms)",
                r,
                ScaleResult::change_max,
                0,
            )
        },
        row(
            "controller CPU per change (ms)",
            r,
            |x| x.change_cpu * 1e3 / x.latencies.len().max(1) as f64,
            1,
        ),
        row(
            "controller RSS after changes (MB)",
            r,
            |x| mb(x.mem_changes),
            1,
        ),
        Row {
            goal: Some((300.0, "≤ 300")),
            ..row(
                "controller peak RSS, VmHWM (MB)",
                r,
                |x| x.controller_peak() as f64 / MB,
                1,
            )
        },
        row(
            "ztunnel ready after (s)",
            r,
            |x| x.zt_ready.as_secs_f64(),
            2,
        ),
        row("ztunnel RSS on the feed (MB)", r, |x| mb(x.zt_mem), 1),
        Row {
            goal: Some((50.0, "≤ 50")),
            ..row(
                "ztunnel peak RSS, VmHWM (MB)",
                r,
                |x| x.zt_mem.hwm.max(x.zt_mem.rss) as f64 / MB,
                1,
            )
        },
    ];
    let names = [r[0].scale.name, r[1].scale.name, r[2].scale.name];
    println!();
    let (over_base, goal) = (format!("÷{}", names[1]), format!("goal at {}", names[2]));
    println!(
        "{:<38} {:>10} {:>10} {:>10} {over_base:>10} {:>10}  {goal}",
        "", names[0], names[1], names[2], "÷idle",
    );
    for row in &rows {
        let [idle, base, top] = row.values;
        let d = row.digits;
        let goal = match row.goal {
            Some((limit, text)) => {
                format!("{text} {}", if top <= limit { "met" } else { "MISSED" })
            }
            None => String::new(),
        };
        println!(
            "{:<38} {:>10.d$} {:>10.d$} {:>10.d$} {:>10} {:>10}  {}",
            row.metric,
            idle,
            base,
            top,
            ratio(top, base),
            ratio(top, idle),
            goal
        );
    }
    println!(
        "load average before each controller start: {} / {} / {}",
        r[0].load_avg, r[1].load_avg, r[2].load_avg
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<Duration> = (1..=20).map(Duration::from_millis).collect();
        assert_eq!(percentile_ms(&v, 50.0), 10.0);
        assert_eq!(percentile_ms(&v, 99.0), 20.0);
        assert_eq!(percentile_ms(&v, 100.0), 20.0);
        assert_eq!(percentile_ms(&[], 50.0), 0.0);
        assert_eq!(max_ms(&v), 20.0);
    }
}

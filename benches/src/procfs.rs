//! What the kernel says about the proxy processes: CPU time (utime + stime of every thread,
//! from `/proc/<pid>/stat`) and memory (`VmRSS`, `VmHWM` from `/proc/<pid>/status`).

use anyhow::{Context, Result};

/// User + system CPU seconds consumed so far by `pid` (all threads).
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the `(comm)`: state is index 0, utime 11, stime 12.
    let rest = &stat[stat.rfind(')').context("malformed stat")? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks as f64 / hz)
}

/// Total CPU seconds of several processes.
pub fn cpu_seconds_of(pids: &[u32]) -> Result<f64> {
    pids.iter().map(|p| cpu_seconds(*p)).sum()
}

/// A `kB` line of `/proc/<pid>/status`, in bytes.
fn status_bytes(pid: u32, key: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with(key))
        .with_context(|| format!("no {key} in /proc/{pid}/status"))?;
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .context("malformed status line")?
        .parse()?;
    Ok(kb * 1024)
}

/// Resident memory now, in bytes.
pub fn rss_bytes(pid: u32) -> Result<u64> {
    status_bytes(pid, "VmRSS:")
}

/// Peak resident memory, in bytes.
pub fn peak_rss_bytes(pid: u32) -> Result<u64> {
    status_bytes(pid, "VmHWM:")
}

/// Measures the CPU a set of processes uses across a section.
pub struct CpuMeter {
    pids: Vec<u32>,
    start: f64,
}

impl CpuMeter {
    pub fn start(pids: &[u32]) -> Result<CpuMeter> {
        Ok(CpuMeter {
            pids: pids.to_vec(),
            start: cpu_seconds_of(pids)?,
        })
    }

    /// CPU seconds since [`CpuMeter::start`].
    pub fn elapsed(&self) -> Result<f64> {
        Ok(cpu_seconds_of(&self.pids)? - self.start)
    }
}

/// Busy CPU seconds of the whole machine so far (all CPUs: user, nice, system, irq, softirq,
/// steal; not idle or iowait), from the first line of `/proc/stat`.
pub fn machine_busy_seconds() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    anyhow::ensure!(f.len() >= 8, "malformed /proc/stat: {line}");
    // user nice system idle iowait irq softirq steal
    let busy = f[0] + f[1] + f[2] + f[5] + f[6] + f[7];
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(busy as f64 / hz)
}

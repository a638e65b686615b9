//! Packet capture on a real interface: runs `tcpdump -w` inside a namespace, stops it cleanly,
//! and reads the pcap file with a small parser (Ethernet/IPv4/TCP) to scan for plaintext and list
//! the TCP ports seen on the wire.

use crate::netns::Netns;
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// A running tcpdump; [`Capture::stop`] returns the parsed file. Killed on drop.
pub struct Capture {
    child: Option<Child>,
    file: PathBuf,
    stderr: std::sync::mpsc::Receiver<String>,
}

impl Capture {
    /// Starts `tcpdump -i <iface> -w <file> -U -n -s 0` in `ns` and waits until it listens.
    pub fn start(ns: &Netns, iface: &str, file: &Path) -> Result<Capture> {
        let file_s = file.to_str().context("non-UTF-8 path")?;
        let mut child = ns
            .command(&[
                "tcpdump",
                "-i",
                iface,
                "-w",
                file_s,
                "-U",
                "-n",
                "-s",
                "0",
                "-B",
                "65536",
                "--immediate-mode",
                "-Z",
                "root",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning tcpdump (apt-get install -y tcpdump)")?;
        let stderr = child.stderr.take().context("tcpdump stderr")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = Vec::new();
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    let listening = line.contains("listening on");
                    seen.push(line);
                    if listening {
                        break;
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(_) => bail!("tcpdump exited: {}", seen.join("\n")),
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("tcpdump did not start: {}", seen.join("\n"));
            }
        }
        Ok(Capture {
            child: Some(child),
            file: file.to_path_buf(),
            stderr: rx,
        })
    }

    /// Stops tcpdump (SIGINT, so it flushes) once the file stopped growing, and parses it.
    pub fn stop(mut self) -> Result<Pcap> {
        let size = || std::fs::metadata(&self.file).map(|m| m.len()).unwrap_or(0);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut last = size();
        loop {
            std::thread::sleep(Duration::from_millis(300));
            let now = size();
            if now == last || Instant::now() > deadline {
                break;
            }
            last = now;
        }
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT)?;
            child.wait()?;
        }
        // tcpdump's summary, e.g. "0 packets dropped by kernel".
        let summary: Vec<String> = self.stderr.try_iter().collect();
        let summary = summary.join("\n");
        let mut pcap = Pcap::read(&self.file)?;
        pcap.dropped = summary
            .lines()
            .find(|l| l.contains("dropped by kernel"))
            .and_then(|l| l.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        pcap.summary = summary;
        Ok(pcap)
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One captured IPv4 packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// IP protocol number (6 = TCP).
    pub proto: u8,
    /// TCP ports (0 for other protocols).
    pub src_port: u16,
    pub dst_port: u16,
    /// TCP payload length.
    pub payload_len: usize,
}

/// A parsed pcap file: the raw bytes plus the IPv4 packets found in it.
#[derive(Debug, Clone)]
pub struct Pcap {
    pub raw: Vec<u8>,
    pub packets: Vec<Packet>,
    /// Number of records in the file (IPv4 or not).
    pub records: usize,
    /// Packets tcpdump reported as dropped by the kernel (capture incomplete when > 0).
    pub dropped: u64,
    /// tcpdump's closing summary.
    pub summary: String,
}

impl Pcap {
    /// Reads and parses a pcap file.
    pub fn read(path: &Path) -> Result<Pcap> {
        let raw = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        Pcap::parse(raw)
    }

    /// Parses classic pcap (either byte order, µs or ns timestamps) with Ethernet or Linux
    /// cooked (SLL) link types.
    pub fn parse(raw: Vec<u8>) -> Result<Pcap> {
        if raw.len() < 24 {
            bail!("pcap too short ({} bytes)", raw.len());
        }
        let magic = [raw[0], raw[1], raw[2], raw[3]];
        let le = match magic {
            [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => true,
            [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => false,
            _ => bail!("not a pcap file (magic {magic:02x?})"),
        };
        let u32_at = |b: &[u8], i: usize| {
            let a = [b[i], b[i + 1], b[i + 2], b[i + 3]];
            if le {
                u32::from_le_bytes(a)
            } else {
                u32::from_be_bytes(a)
            }
        };
        let linktype = u32_at(&raw, 20);
        let mut packets = Vec::new();
        let mut records = 0;
        let mut off = 24;
        while off + 16 <= raw.len() {
            let incl = u32_at(&raw, off + 8) as usize;
            let start = off + 16;
            let end = start + incl;
            if end > raw.len() {
                break; // truncated last record
            }
            records += 1;
            let frame = &raw[start..end];
            let l3 = match linktype {
                1 => ethernet_payload(frame),
                113 => frame.get(16..).filter(|_| frame[14..16] == [0x08, 0x00]),
                101 => Some(frame),
                _ => bail!("unsupported pcap link type {linktype}"),
            };
            if let Some(p) = l3.and_then(parse_ipv4) {
                packets.push(p);
            }
            off = end;
        }
        Ok(Pcap {
            raw,
            packets,
            records,
            dropped: 0,
            summary: String::new(),
        })
    }

    /// True when `pattern` occurs anywhere in the captured bytes.
    pub fn contains(&self, pattern: &[u8]) -> bool {
        !pattern.is_empty() && self.raw.windows(pattern.len()).any(|w| w == pattern)
    }

    /// TCP packets.
    pub fn tcp(&self) -> impl Iterator<Item = &Packet> {
        self.packets.iter().filter(|p| p.proto == 6)
    }

    /// Sorted distinct TCP destination ports.
    pub fn tcp_dst_ports(&self) -> Vec<u16> {
        let mut v: Vec<u16> = self.tcp().map(|p| p.dst_port).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Total TCP payload bytes.
    pub fn tcp_payload_bytes(&self) -> usize {
        self.tcp().map(|p| p.payload_len).sum()
    }
}

fn ethernet_payload(frame: &[u8]) -> Option<&[u8]> {
    let mut off = 12;
    let mut ethertype = u16::from_be_bytes([*frame.get(off)?, *frame.get(off + 1)?]);
    while ethertype == 0x8100 || ethertype == 0x88a8 {
        off += 4;
        ethertype = u16::from_be_bytes([*frame.get(off)?, *frame.get(off + 1)?]);
    }
    (ethertype == 0x0800)
        .then(|| frame.get(off + 2..))
        .flatten()
}

fn parse_ipv4(ip: &[u8]) -> Option<Packet> {
    if ip.len() < 20 || ip[0] >> 4 != 4 {
        return None;
    }
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    let total = (u16::from_be_bytes([ip[2], ip[3]]) as usize).min(ip.len());
    let proto = ip[9];
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let (mut src_port, mut dst_port, mut payload_len) = (0, 0, 0);
    if proto == 6 {
        let tcp = ip.get(ihl..total)?;
        if tcp.len() < 20 {
            return None;
        }
        src_port = u16::from_be_bytes([tcp[0], tcp[1]]);
        dst_port = u16::from_be_bytes([tcp[2], tcp[3]]);
        let doff = ((tcp[12] >> 4) as usize) * 4;
        payload_len = tcp.len().saturating_sub(doff);
    }
    Some(Packet {
        src,
        dst,
        proto,
        src_port,
        dst_port,
        payload_len,
    })
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn parses_an_ethernet_tcp_record() {
        let mut f = vec![0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0];
        f.extend_from_slice(&[0; 8]);
        f.extend_from_slice(&65535u32.to_le_bytes());
        f.extend_from_slice(&1u32.to_le_bytes());
        let mut frame = vec![0u8; 12];
        frame.extend_from_slice(&[0x08, 0x00]);
        let payload = b"hello";
        let mut ip = vec![
            0x45, 0, 0, 0, 0, 0, 0, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        let tot = (20 + 20 + payload.len()) as u16;
        ip[2..4].copy_from_slice(&tot.to_be_bytes());
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&15008u16.to_be_bytes());
        tcp[12] = 5 << 4;
        frame.extend_from_slice(&ip);
        frame.extend_from_slice(&tcp);
        frame.extend_from_slice(payload);
        f.extend_from_slice(&[0; 8]);
        f.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        f.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        f.extend_from_slice(&frame);
        let p = Pcap::parse(f).unwrap();
        assert_eq!(p.records, 1);
        assert_eq!(p.tcp_dst_ports(), vec![15008]);
        assert_eq!(p.packets[0].src_port, 40000);
        assert_eq!(p.tcp_payload_bytes(), 5);
        assert!(p.contains(b"hello"));
        assert!(!p.contains(b"absent"));
    }
}

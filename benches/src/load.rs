//! The load generators and the server they drive: one server in pod b whose first byte picks
//! the mode (sink: count until EOF, answer the count; echo: send everything back), and clients
//! in pod a for throughput (N streams for a fixed time), request/response latency on one
//! connection, and new connections per second. Bulk and latency connections get one blocking
//! OS thread per end, like iperf/netperf, so the kernel spreads them over the CPUs and the
//! figures do not depend on how an async runtime happens to place tasks; the many short
//! connections of the rate test run on the benchmark's tokio runtime. Buffers are large so the
//! clients do not bottleneck.

use anyhow::{bail, ensure, Context, Result};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tests::netns::Netns;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;

/// First byte of a connection: count everything until EOF, then answer the count (u64 LE).
pub const MODE_SINK: u8 = b'S';
/// First byte of a connection: echo everything until EOF (served async: the rate test).
pub const MODE_ECHO: u8 = b'E';
/// First byte of a connection: echo everything until EOF on a blocking thread (latency).
pub const MODE_LATENCY: u8 = b'L';
/// Write size of the throughput clients and read size of the sink.
const BULK: usize = 256 * 1024;
/// Payload of one new-connection exchange.
const SMALL: usize = 64;

/// The server in pod b; aborted on drop.
pub struct BenchServer {
    task: JoinHandle<()>,
}

impl Drop for BenchServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts the sink/echo server on `addr` inside `ns`. Accepts on the caller's runtime; echo
/// connections stay async there, sink and latency connections get a blocking thread each.
pub fn start_server(ns: &Netns, addr: SocketAddr) -> Result<BenchServer> {
    let listener = ns.tcp_listener(addr)?;
    let task = tokio::spawn(accept_loop(listener));
    Ok(BenchServer { task })
}

/// Serves every connection `listener` accepts, forever.
async fn accept_loop(listener: tokio::net::TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(async move {
                    let _ = serve(stream).await;
                });
            }
            // EMFILE and friends: say so and back off, never spin on them silently
            // (a spinning accept loop left connections queued unanswered).
            Err(e) => {
                eprintln!("bench server: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The bench server as a process of its own (`benches --bench-server <addr>`, started inside
/// a namespace by [`ServerProcess::start`]): serves until killed.
pub async fn server_main(addr: SocketAddr) -> Result<()> {
    tests::mesh::raise_nofile_limit(65536)?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    // `start_server` with a listener made in this process's own namespace.
    let socket = socket2::SockRef::from(&listener);
    socket.listen(4096)?;
    println!("listening on {addr}");
    accept_loop(listener).await;
    Ok(())
}

/// The bench server in a process of its own inside a namespace, so that its sockets do not
/// count against the client process's open-file limit (10 000 held connections need 10 000
/// descriptors on each side); killed on drop.
pub struct ServerProcess {
    child: std::process::Child,
}

impl ServerProcess {
    pub fn start(ns: &Netns, addr: SocketAddr) -> Result<ServerProcess> {
        let mut child = std::process::Command::new("ip")
            .args(["netns", "exec", ns.name()])
            .arg(std::env::current_exe()?)
            .args(["--bench-server", &addr.to_string()])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("starting the bench server process")?;
        let mut line = String::new();
        let stdout = child.stdout.take().context("server stdout")?;
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)?;
        let server = ServerProcess { child };
        ensure!(
            line.starts_with("listening"),
            "bench server did not start: {line:?}"
        );
        Ok(server)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn serve(s: TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let mut s = s;
    let mode = s.read_u8().await?;
    if mode == MODE_ECHO {
        let mut buf = [0u8; 4096];
        loop {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                return s.shutdown().await;
            }
            s.write_all(&buf[..n]).await?;
        }
    }
    let std = s.into_std()?;
    std.set_nonblocking(false)?;
    std::thread::spawn(move || match mode {
        MODE_SINK => sink_blocking(std),
        MODE_LATENCY => {
            pin_to_cpu(LATENCY_CPU);
            echo_blocking(std)
        }
        _ => Ok(()),
    });
    Ok(())
}

fn sink_blocking(mut s: std::net::TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; BULK];
    let mut total = 0u64;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    s.write_all(&total.to_le_bytes())?;
    s.shutdown(std::net::Shutdown::Write)
}

fn echo_blocking(mut s: std::net::TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return s.shutdown(std::net::Shutdown::Write);
        }
        s.write_all(&buf[..n])?;
    }
}

/// The CPU both ends of the latency test run on. Unpinned, the raw round trip is bimodal on
/// a VM (~5 µs when both threads share a CPU, ~60 µs when each wake-up crosses to an idle
/// vCPU); pinned, the baseline is the kernel path alone and the proxies' threads float.
const LATENCY_CPU: usize = 0;

/// Pins the calling thread to `cpu` (best effort: a failure only makes figures noisier).
fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET stays within it for cpu < CPU_SETSIZE.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let _ = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// A blocking TCP connection from inside `ns` (the socket is made there, then connected from
/// the calling thread).
fn connect_blocking(ns: &Netns, addr: SocketAddr) -> Result<std::net::TcpStream> {
    let socket = ns.run_blocking(move || {
        socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )
    })??;
    socket
        .connect(&addr.into())
        .with_context(|| format!("connecting to {addr} from {}", ns.name()))?;
    let s: std::net::TcpStream = socket.into();
    s.set_nodelay(true)?;
    Ok(s)
}

/// Unconnected sockets made inside the client pod's namespace, handed out one per connection
/// and refilled in batches (one namespace-entering thread per batch).
pub struct Sockets {
    ns: Netns,
    pool: Mutex<Vec<TcpSocket>>,
}

impl Sockets {
    pub fn new(ns: &Netns) -> Arc<Sockets> {
        Arc::new(Sockets {
            ns: ns.handle(),
            pool: Mutex::new(Vec::new()),
        })
    }

    /// Makes sure at least `n` sockets are ready (call before a timed section).
    pub fn prefill(&self, n: usize) -> Result<()> {
        let have = self.pool.lock().unwrap().len();
        if have < n {
            let more = self.ns.tcp_sockets(n - have)?;
            self.pool.lock().unwrap().extend(more);
        }
        Ok(())
    }

    fn take(&self) -> Result<TcpSocket> {
        let mut pool = self.pool.lock().unwrap();
        if pool.is_empty() {
            *pool = self.ns.tcp_sockets(512)?;
        }
        Ok(pool.pop().expect("refilled"))
    }

    /// Connects a fresh socket to `addr` (TCP_NODELAY on).
    pub async fn connect(&self, addr: SocketAddr) -> Result<TcpStream> {
        let s = self
            .take()?
            .connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        s.set_nodelay(true)?;
        Ok(s)
    }
}

/// Bytes moved and the wall time they took.
#[derive(Debug, Clone, Copy)]
pub struct Throughput {
    pub bytes: u64,
    pub secs: f64,
}

impl Throughput {
    pub fn gbit_per_s(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.secs / 1e9
    }
}

/// `streams` connections from `ns` to `addr`, each on its own thread, write as fast as they
/// can for `duration`, then half-close and wait for the sink's count (which must equal what
/// was written). The time runs from before the connects to the last count, so bytes still in
/// flight are included.
pub async fn throughput(
    ns: &Netns,
    addr: SocketAddr,
    streams: usize,
    duration: Duration,
) -> Result<Throughput> {
    let data: Arc<Vec<u8>> = Arc::new(tests::apps::random_bytes(BULK, 42));
    let ns = ns.handle();
    tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        let deadline = start + duration;
        let conns: Vec<std::net::TcpStream> = (0..streams)
            .map(|_| connect_blocking(&ns, addr))
            .collect::<Result<_>>()?;
        let threads: Vec<_> = conns
            .into_iter()
            .map(|mut s| {
                let data = data.clone();
                std::thread::spawn(move || -> Result<u64> {
                    s.write_all(&[MODE_SINK])?;
                    let mut sent = 0u64;
                    while Instant::now() < deadline {
                        s.write_all(&data).context("writing")?;
                        sent += data.len() as u64;
                    }
                    s.shutdown(std::net::Shutdown::Write)?;
                    let mut count = [0u8; 8];
                    s.read_exact(&mut count)
                        .context("reading the sink's count")?;
                    let got = u64::from_le_bytes(count);
                    ensure!(got == sent, "sink counted {got} bytes, client sent {sent}");
                    Ok(got)
                })
            })
            .collect();
        let mut bytes = 0;
        for t in threads {
            bytes += t
                .join()
                .map_err(|_| anyhow::anyhow!("stream thread panicked"))??;
        }
        Ok(Throughput {
            bytes,
            secs: start.elapsed().as_secs_f64(),
        })
    })
    .await?
}

/// Round-trip times, sorted.
#[derive(Debug, Clone)]
pub struct Latency {
    sorted_ns: Vec<u64>,
}

impl Latency {
    /// From unsorted samples.
    pub fn from_samples(samples: Vec<Duration>) -> Latency {
        let mut sorted_ns: Vec<u64> = samples.iter().map(|d| d.as_nanos() as u64).collect();
        sorted_ns.sort_unstable();
        Latency { sorted_ns }
    }

    /// Number of samples.
    pub fn samples(&self) -> usize {
        self.sorted_ns.len()
    }

    /// The `q` quantile (0..=1) in microseconds.
    pub fn quantile_us(&self, q: f64) -> f64 {
        if self.sorted_ns.is_empty() {
            return f64::NAN;
        }
        let i = ((self.sorted_ns.len() as f64 * q) as usize).min(self.sorted_ns.len() - 1);
        self.sorted_ns[i] as f64 / 1000.0
    }
}

/// `rounds` request/response exchanges of `size` bytes each on one connection from `ns` (after
/// `warmup` unmeasured ones), on a blocking thread of its own.
pub async fn latency(
    ns: &Netns,
    addr: SocketAddr,
    size: usize,
    warmup: usize,
    rounds: usize,
) -> Result<Latency> {
    let ns = ns.handle();
    tokio::task::spawn_blocking(move || {
        pin_to_cpu(LATENCY_CPU);
        let mut s = connect_blocking(&ns, addr)?;
        s.write_all(&[MODE_LATENCY])?;
        let req = tests::apps::random_bytes(size, 7);
        let mut resp = vec![0u8; size];
        let mut sorted_ns = Vec::with_capacity(rounds);
        for i in 0..warmup + rounds {
            let t = Instant::now();
            s.write_all(&req)?;
            s.read_exact(&mut resp).context("reading echo")?;
            let ns = t.elapsed().as_nanos() as u64;
            if i >= warmup {
                sorted_ns.push(ns);
            }
        }
        ensure!(resp == req, "echo differs from the request");
        s.shutdown(std::net::Shutdown::Write)?;
        sorted_ns.sort_unstable();
        Ok(Latency { sorted_ns })
    })
    .await?
}

/// New connections completed and the wall time.
#[derive(Debug, Clone, Copy)]
pub struct ConnRate {
    pub conns: u64,
    pub errors: u64,
    pub secs: f64,
}

impl ConnRate {
    pub fn per_sec(&self) -> f64 {
        self.conns as f64 / self.secs
    }
}

/// `concurrency` workers loop for `duration`: connect, send 64 bytes, read them back, close.
pub async fn conn_rate(
    sockets: &Arc<Sockets>,
    addr: SocketAddr,
    concurrency: usize,
    duration: Duration,
) -> Result<ConnRate> {
    sockets.prefill(2048)?;
    let conns = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(Mutex::new(None::<String>));
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..concurrency {
        let (sockets, conns, errors, first_error) = (
            sockets.clone(),
            conns.clone(),
            errors.clone(),
            first_error.clone(),
        );
        tasks.spawn(async move {
            let mut msg = vec![MODE_ECHO];
            msg.extend(tests::apps::random_bytes(SMALL, w as u64));
            while Instant::now() < deadline {
                match exchange(&sockets, addr, &msg).await {
                    Ok(()) => conns.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        first_error
                            .lock()
                            .unwrap()
                            .get_or_insert_with(|| format!("{e:#}"));
                        errors.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r?;
    }
    let rate = ConnRate {
        conns: conns.load(Ordering::Relaxed),
        errors: errors.load(Ordering::Relaxed),
        secs: start.elapsed().as_secs_f64(),
    };
    if rate.errors > rate.conns / 100 {
        bail!(
            "{} of {} connections failed; first error: {}",
            rate.errors,
            rate.conns + rate.errors,
            first_error.lock().unwrap().clone().unwrap_or_default()
        );
    }
    Ok(rate)
}

async fn exchange(sockets: &Sockets, addr: SocketAddr, msg: &[u8]) -> Result<()> {
    let mut s = sockets.connect(addr).await?;
    s.write_all(msg).await?;
    let mut back = [0u8; SMALL];
    s.read_exact(&mut back).await.context("reading echo")?;
    ensure!(back[..] == msg[1..], "echo differs");
    Ok(())
}

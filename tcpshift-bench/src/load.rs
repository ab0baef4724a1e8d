//! The client workloads, with plain threads and blocking sockets (one thread per concurrent
//! connection: on loopback every extra layer of client machinery only dilutes the difference
//! between the targets).
//!
//! Every workload is bounded: it stops after a fixed duration or count, and every socket has
//! read, write and connect timeouts.

use std::{
    collections::BTreeMap,
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use socket2::{Domain, Socket, Type};

use crate::stats::Percentiles;

/// The line every request/response connection sends. tcp-echo answers `PREFIX <line>`.
pub const LINE: &[u8] = b"tcpshift bench\n";

/// Timeout for connect, read and write of every benchmark socket.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest reply accepted by [`exchange`].
const REPLY_MAX: usize = 256;

/// Parses a comma-separated list of `IP:PORT` or `IP:FIRST-LAST` (a port range), each
/// optionally followed by `*WEIGHT`: the client itself then picks that item WEIGHT times as
/// often as an item of weight 1 (`127.0.0.1:9001*80,127.0.0.1:9002*20` splits 80/20 without
/// any steering). Weights are reduced by their greatest common divisor and each address is
/// listed as many times as its weight, so that a uniform pick follows the weights.
pub fn parse_addrs(s: &str) -> Result<Vec<SocketAddr>> {
    let mut items: Vec<(Vec<SocketAddr>, u32)> = Vec::new();
    for item in s.split(',').map(str::trim) {
        let (item, weight) = match item.rsplit_once('*') {
            Some((a, w)) => {
                let w: u32 = w
                    .trim()
                    .parse()
                    .ok()
                    .filter(|w| (1..=1000).contains(w))
                    .with_context(|| format!("{item:?}: the weight after * must be 1..=1000"))?;
                (a.trim(), w)
            }
            None => (item, 1),
        };
        let (host, ports) = item
            .rsplit_once(':')
            .with_context(|| format!("{item:?}: expected IP:PORT or IP:FIRST-LAST"))?;
        let ip: std::net::IpAddr = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .with_context(|| format!("{item:?}: {host:?} is not an IP address"))?;
        let (first, last) = match ports.split_once('-') {
            Some((a, b)) => (a, b),
            None => (ports, ports),
        };
        let first: u16 = first
            .parse()
            .with_context(|| format!("{item:?}: bad port {first:?}"))?;
        let last: u16 = last
            .parse()
            .with_context(|| format!("{item:?}: bad port {last:?}"))?;
        if first == 0 || last < first {
            bail!("{item:?}: expected ports in 1..=65535 with FIRST <= LAST");
        }
        items.push((
            (first..=last).map(|p| SocketAddr::new(ip, p)).collect(),
            weight,
        ));
    }
    let gcd = items.iter().fold(0, |g, (_, w)| gcd(g, *w)).max(1);
    let mut out = Vec::new();
    for (addrs, w) in items {
        for _ in 0..w / gcd {
            out.extend(addrs.iter().copied());
        }
    }
    if out.is_empty() {
        bail!("no address given");
    }
    Ok(out)
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Opens a TCP connection with [`IO_TIMEOUT`] on connect, reads and writes.
pub fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    // SO_SNDTIMEO also bounds a blocking connect.
    socket.set_write_timeout(Some(IO_TIMEOUT))?;
    socket.set_read_timeout(Some(IO_TIMEOUT))?;
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        // A signal cut the wait short (seen once in CI, in the weight-change workload); the
        // kernel goes on connecting: wait for the outcome instead of counting an error.
        Err(e) if e.kind() == io::ErrorKind::Interrupted => finish_connect(&socket)?,
        Err(e) => return Err(e),
    }
    Ok(socket.into())
}

/// Waits (up to [`IO_TIMEOUT`]) for a connect in progress to end; its result.
fn finish_connect(socket: &Socket) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out"));
        }
        let mut pfd = libc::pollfd {
            fd: socket.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1);
        // SAFETY: one valid pollfd, for the duration of the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if rc > 0 {
            return match socket.take_error()? {
                Some(e) => Err(e),
                None => Ok(()),
            };
        }
    }
}

/// One request/response connection: connect, send [`LINE`], read the echoed line, close.
/// Checks the echo and returns the length of the reply's prefix (the backend's name) in `buf`.
pub fn exchange(addr: SocketAddr, buf: &mut [u8; REPLY_MAX]) -> io::Result<usize> {
    exchange_timed(addr, buf).map(|(n, _)| n)
}

/// [`exchange`], also returning when the connect returned (the handshake was done, so the
/// SYN had been steered).
pub fn exchange_timed(addr: SocketAddr, buf: &mut [u8; REPLY_MAX]) -> io::Result<(usize, Instant)> {
    let mut s = connect(addr)?;
    let connected = Instant::now();
    s.write_all(LINE)?;
    let mut n = 0;
    while n < buf.len() {
        let r = match s.read(&mut buf[n..]) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if r == 0 {
            break;
        }
        n += r;
        if buf[n - 1] == b'\n' {
            break;
        }
    }
    let reply = &buf[..n];
    match reply.iter().position(|&b| b == b' ') {
        Some(sp) if &reply[sp + 1..] == LINE => Ok((sp, connected)),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "unexpected reply {:?} (expected \"PREFIX {}\")",
                String::from_utf8_lossy(reply),
                String::from_utf8_lossy(LINE).trim_end()
            ),
        )),
    }
}

/// Counts of replies per prefix, kept per thread without allocating per connection.
#[derive(Default)]
struct Tally(Vec<(Vec<u8>, u64)>);

impl Tally {
    fn add(&mut self, prefix: &[u8]) {
        match self.0.iter_mut().find(|(p, _)| p == prefix) {
            Some((_, n)) => *n += 1,
            None => self.0.push((prefix.to_vec(), 1)),
        }
    }

    fn merge_into(self, out: &mut BTreeMap<String, u64>) {
        for (p, n) in self.0 {
            *out.entry(String::from_utf8_lossy(&p).into_owned())
                .or_default() += n;
        }
    }
}

/// A tiny xorshift generator to pick target addresses.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// When a request/response workload stops.
#[derive(Debug, Clone, Copy)]
pub enum Stop {
    /// After a warm-up (not counted), measure for this long.
    Duration {
        /// Not measured.
        warmup: Duration,
        /// Measured.
        measure: Duration,
    },
    /// After this many connections (all counted).
    Count(u64),
}

/// The edges of the measured window, reported to a [`rate`] caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Edge {
    /// The warm-up is over: measurement starts.
    Start,
    /// Measurement ends (connections still running finish but are not started any more).
    End,
}

/// Result of a closed-loop request/response run ([`rate`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RateResult {
    /// Successful connections in the measured window.
    pub connections: u64,
    /// Failed connections in the measured window.
    pub errors: u64,
    /// The first error seen, if any.
    pub first_error: Option<String>,
    /// Length of the measured window.
    pub seconds: f64,
    /// Successful connections per second.
    pub rate: f64,
    /// Time of each connection (connect to close), in microseconds.
    pub latency: Percentiles,
    /// Replies per backend prefix.
    pub prefixes: BTreeMap<String, u64>,
}

/// Closed loop: `concurrency` threads each open connections one after the other
/// ([`exchange`]) against addresses picked at random from `addrs`. `window` is called at the
/// start and the end of the measured window (only with [`Stop::Duration`]).
pub fn rate(
    addrs: &[SocketAddr],
    concurrency: usize,
    stop: Stop,
    window: &mut dyn FnMut(Edge),
) -> Result<RateResult> {
    if addrs.is_empty() || concurrency == 0 {
        bail!("need at least one address and one connection");
    }
    let started = Instant::now();
    let (measure_start, end) = match stop {
        // Leave the threads a moment to start before the clock runs.
        Stop::Duration { warmup, measure } => {
            let s = started + warmup;
            (s, Some(s + measure))
        }
        Stop::Count(_) => (started, None),
    };
    let next = AtomicU64::new(0);
    let total = match stop {
        Stop::Count(n) => n,
        Stop::Duration { .. } => u64::MAX,
    };
    struct Out {
        ok: u64,
        errors: u64,
        first_error: Option<String>,
        lat: Vec<u64>,
        tally: Tally,
    }
    let outs: Mutex<Vec<Out>> = Mutex::new(Vec::new());
    let finished_at = Mutex::new(started);
    thread::scope(|scope| -> Result<()> {
        for t in 0..concurrency {
            let (next, outs, finished_at) = (&next, &outs, &finished_at);
            thread::Builder::new()
                .name(format!("rate-{t}"))
                .spawn_scoped(scope, move || {
                    let mut rng = Rng::new(t as u64 + 1);
                    let mut buf = [0u8; REPLY_MAX];
                    let mut out = Out {
                        ok: 0,
                        errors: 0,
                        first_error: None,
                        lat: Vec::with_capacity(1 << 16),
                        tally: Tally::default(),
                    };
                    loop {
                        let t0 = Instant::now();
                        match end {
                            Some(end) if t0 >= end => break,
                            None if next.fetch_add(1, Ordering::Relaxed) >= total => break,
                            _ => {}
                        }
                        let addr = addrs[rng.below(addrs.len())];
                        let r = exchange(addr, &mut buf);
                        let measured = t0 >= measure_start;
                        match r {
                            Ok(p) if measured => {
                                out.lat.push(t0.elapsed().as_nanos() as u64);
                                out.tally.add(&buf[..p]);
                                out.ok += 1;
                            }
                            Ok(_) => {}
                            Err(e) => {
                                if measured {
                                    out.errors += 1;
                                    out.first_error
                                        .get_or_insert_with(|| format!("{addr}: {e}"));
                                }
                                // Do not spin on an immediate refusal.
                                thread::sleep(Duration::from_millis(1));
                            }
                        }
                    }
                    if let Ok(mut f) = finished_at.lock() {
                        *f = (*f).max(Instant::now());
                    }
                    if let Ok(mut o) = outs.lock() {
                        o.push(out);
                    }
                })
                .context("cannot start a client thread")?;
        }
        if let Some(end) = end {
            sleep_until(measure_start);
            window(Edge::Start);
            sleep_until(end);
            window(Edge::End);
        }
        Ok(())
    })?;
    let outs = outs.into_inner().unwrap_or_default();
    let seconds = match end {
        Some(end) => (end - measure_start).as_secs_f64(),
        None => (*finished_at
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            - started)
            .as_secs_f64(),
    };
    let mut res = RateResult {
        seconds,
        ..RateResult::default()
    };
    let mut lat = Vec::new();
    for o in outs {
        res.connections += o.ok;
        res.errors += o.errors;
        if res.first_error.is_none() {
            res.first_error = o.first_error;
        }
        lat.extend(o.lat);
        o.tally.merge_into(&mut res.prefixes);
    }
    res.rate = res.connections as f64 / seconds.max(1e-9);
    res.latency = Percentiles::from_ns(&mut lat);
    Ok(res)
}

/// Result of an open-loop run at a fixed rate ([`paced`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PacedResult {
    /// Connections per second asked for.
    pub offered_rate: f64,
    /// Successful connections per second in the measured window.
    pub achieved_rate: f64,
    /// Successful connections in the measured window.
    pub connections: u64,
    /// Failed connections in the measured window.
    pub errors: u64,
    /// The first error seen, if any.
    pub first_error: Option<String>,
    /// Connections that started more than 1 ms after their scheduled time (all workers busy
    /// or the scheduler late).
    pub late: u64,
    /// From the scheduled start to the close (includes any wait for a free worker: no
    /// coordinated omission), in microseconds.
    pub response: Percentiles,
    /// From the actual start (connect) to the close, in microseconds.
    pub service: Percentiles,
}

/// Open loop: connections are scheduled at a fixed `rate` per second and started by the
/// first free of `workers` threads; latency is measured from the scheduled time.
pub fn paced(
    addrs: &[SocketAddr],
    rate: f64,
    workers: usize,
    warmup: Duration,
    measure: Duration,
    window: &mut dyn FnMut(Edge),
) -> Result<PacedResult> {
    if addrs.is_empty() || workers == 0 || rate.is_nan() || rate <= 0.0 {
        bail!("need at least one address, one worker and a positive rate");
    }
    let period = Duration::from_secs_f64(1.0 / rate);
    let started = Instant::now() + Duration::from_millis(20);
    let measure_start = started + warmup;
    let end = measure_start + measure;
    let next = AtomicU64::new(0);
    struct Out {
        ok: u64,
        errors: u64,
        late: u64,
        first_error: Option<String>,
        response: Vec<u64>,
        service: Vec<u64>,
    }
    let outs: Mutex<Vec<Out>> = Mutex::new(Vec::new());
    thread::scope(|scope| -> Result<()> {
        for t in 0..workers {
            let (next, outs) = (&next, &outs);
            thread::Builder::new()
                .name(format!("paced-{t}"))
                .spawn_scoped(scope, move || {
                    precise_timers();
                    let mut rng = Rng::new(t as u64 + 101);
                    let mut buf = [0u8; REPLY_MAX];
                    let mut out = Out {
                        ok: 0,
                        errors: 0,
                        late: 0,
                        first_error: None,
                        response: Vec::new(),
                        service: Vec::new(),
                    };
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(offset) = period.checked_mul(i.min(u32::MAX as u64) as u32) else {
                            break;
                        };
                        let scheduled = started + offset;
                        if scheduled >= end {
                            break;
                        }
                        sleep_until(scheduled);
                        let t0 = Instant::now();
                        let addr = addrs[rng.below(addrs.len())];
                        let r = exchange(addr, &mut buf);
                        let t1 = Instant::now();
                        if scheduled < measure_start {
                            continue;
                        }
                        match r {
                            Ok(_) => {
                                out.ok += 1;
                                out.response.push((t1 - scheduled).as_nanos() as u64);
                                out.service.push((t1 - t0).as_nanos() as u64);
                                if t0 - scheduled > Duration::from_millis(1) {
                                    out.late += 1;
                                }
                            }
                            Err(e) => {
                                out.errors += 1;
                                out.first_error
                                    .get_or_insert_with(|| format!("{addr}: {e}"));
                            }
                        }
                    }
                    if let Ok(mut o) = outs.lock() {
                        o.push(out);
                    }
                })
                .context("cannot start a client thread")?;
        }
        sleep_until(measure_start);
        window(Edge::Start);
        sleep_until(end);
        window(Edge::End);
        Ok(())
    })?;
    let mut res = PacedResult {
        offered_rate: rate,
        ..PacedResult::default()
    };
    let (mut response, mut service) = (Vec::new(), Vec::new());
    for o in outs.into_inner().unwrap_or_default() {
        res.connections += o.ok;
        res.errors += o.errors;
        res.late += o.late;
        if res.first_error.is_none() {
            res.first_error = o.first_error;
        }
        response.extend(o.response);
        service.extend(o.service);
    }
    res.achieved_rate = res.connections as f64 / measure.as_secs_f64().max(1e-9);
    res.response = Percentiles::from_ns(&mut response);
    res.service = Percentiles::from_ns(&mut service);
    Ok(res)
}

/// Result of a bulk run ([`bulk`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BulkResult {
    /// Bytes echoed back to the clients in the measured window.
    pub bytes: u64,
    /// Length of the measured window.
    pub seconds: f64,
    /// Echoed MiB per second.
    pub mib_per_s: f64,
    /// Connections that failed, including any whose echo differed from what was sent.
    pub errors: u64,
    /// The first error seen, if any.
    pub first_error: Option<String>,
    /// Echoed bytes checked against the lines sent (all of them, warm-up included): every
    /// echoed line must be `PREFIX ` followed by the line sent.
    #[serde(default)]
    pub verified_bytes: u64,
}

/// Checks a stream of echoed lines piece by piece: each line must be the same `PREFIX `
/// (learned from the first line) followed by `line`.
#[derive(Debug)]
pub struct EchoCheck {
    line: Vec<u8>,
    /// `PREFIX ` + `line`, once the prefix is known.
    expected: Vec<u8>,
    /// Bytes of the current echoed line seen so far.
    at: usize,
    /// The first line's bytes until its space, while the prefix is not yet known.
    prefix: Vec<u8>,
    /// Bytes checked.
    pub checked: u64,
}

impl EchoCheck {
    /// A check for echoes of `line` (which ends with a newline).
    pub fn new(line: &[u8]) -> Self {
        EchoCheck {
            line: line.to_vec(),
            expected: Vec::new(),
            at: 0,
            prefix: Vec::new(),
            checked: 0,
        }
    }

    /// Checks the next received bytes; an error names the first byte that differs.
    pub fn feed(&mut self, mut data: &[u8]) -> std::result::Result<(), String> {
        while self.expected.is_empty() && !data.is_empty() {
            let b = data[0];
            data = &data[1..];
            self.checked += 1;
            if b == b' ' {
                if self.prefix.is_empty() {
                    return Err("the echo has no backend prefix".into());
                }
                self.expected = [self.prefix.as_slice(), b" ", &self.line].concat();
                self.at = self.prefix.len() + 1;
            } else if self.prefix.len() >= REPLY_MAX || b == b'\n' {
                return Err(format!(
                    "the echo does not start with a backend prefix: {:?}",
                    String::from_utf8_lossy(&self.prefix)
                ));
            } else {
                self.prefix.push(b);
            }
        }
        while !data.is_empty() {
            let n = data.len().min(self.expected.len() - self.at);
            if data[..n] != self.expected[self.at..self.at + n] {
                let i = data[..n]
                    .iter()
                    .zip(&self.expected[self.at..])
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                return Err(format!(
                    "echoed byte {} differs from what was sent (byte {} of a line)",
                    self.checked + i as u64,
                    self.at + i
                ));
            }
            self.checked += n as u64;
            self.at = (self.at + n) % self.expected.len();
            data = &data[n..];
        }
        Ok(())
    }
}

/// Long connections: each of `connections` connections streams lines of `line_bytes` bytes
/// (one writer thread) while a reader thread consumes the echo; the throughput is the echoed
/// bytes received per second in the measured window.
pub fn bulk(
    addrs: &[SocketAddr],
    connections: usize,
    line_bytes: usize,
    warmup: Duration,
    measure: Duration,
    window: &mut dyn FnMut(Edge),
) -> Result<BulkResult> {
    if addrs.is_empty() || connections == 0 || line_bytes < 2 {
        bail!("need at least one address, one connection and lines of 2 bytes or more");
    }
    // A block of whole lines, written with one call.
    let lines_per_block = (256 * 1024 / line_bytes).max(1);
    let mut block = Vec::with_capacity(lines_per_block * line_bytes);
    for _ in 0..lines_per_block {
        block.extend(std::iter::repeat_n(b'x', line_bytes - 1));
        block.push(b'\n');
    }
    let stop = AtomicBool::new(false);
    let received = AtomicU64::new(0);
    let verified = AtomicU64::new(0);
    let errors = AtomicU64::new(0);
    let first_error: Mutex<Option<String>> = Mutex::new(None);
    let fail = |e: String| {
        errors.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut f) = first_error.lock() {
            f.get_or_insert(e);
        }
    };
    let mut rng = Rng::new(7);
    let mut streams = Vec::with_capacity(connections);
    for _ in 0..connections {
        let addr = addrs[rng.below(addrs.len())];
        streams.push((
            addr,
            connect(addr).with_context(|| format!("connect {addr}"))?,
        ));
    }
    let (before, after) = thread::scope(|scope| -> Result<(u64, u64)> {
        for (addr, stream) in &streams {
            let (stop, received, block, fail) = (&stop, &received, &block, &fail);
            let mut writer = stream
                .try_clone()
                .context("cannot clone a bulk connection")?;
            thread::Builder::new()
                .name("bulk-write".into())
                .spawn_scoped(scope, move || {
                    while !stop.load(Ordering::Relaxed) {
                        if let Err(e) = writer.write_all(block) {
                            fail(format!("{addr}: write: {e}"));
                            break;
                        }
                    }
                    let _ = writer.shutdown(Shutdown::Write);
                })
                .context("cannot start a writer thread")?;
            let mut reader = stream
                .try_clone()
                .context("cannot clone a bulk connection")?;
            let line = &block[..line_bytes];
            let verified = &verified;
            thread::Builder::new()
                .name("bulk-read".into())
                .spawn_scoped(scope, move || {
                    let mut buf = vec![0u8; 256 * 1024];
                    let mut check = EchoCheck::new(line);
                    loop {
                        match reader.read(&mut buf) {
                            Ok(0) => break,
                            Ok(n) => {
                                if let Err(e) = check.feed(&buf[..n]) {
                                    fail(format!("{addr}: {e}"));
                                    break;
                                }
                                received.fetch_add(n as u64, Ordering::Relaxed);
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                            Err(e) => {
                                fail(format!("{addr}: read: {e}"));
                                break;
                            }
                        }
                    }
                    verified.fetch_add(check.checked, Ordering::Relaxed);
                })
                .context("cannot start a reader thread")?;
        }
        thread::sleep(warmup);
        let before = received.load(Ordering::Relaxed);
        window(Edge::Start);
        thread::sleep(measure);
        let after = received.load(Ordering::Relaxed);
        window(Edge::End);
        stop.store(true, Ordering::Relaxed);
        Ok((before, after))
    })?;
    let seconds = measure.as_secs_f64();
    let bytes = after - before;
    Ok(BulkResult {
        bytes,
        seconds,
        mib_per_s: bytes as f64 / seconds.max(1e-9) / (1024.0 * 1024.0),
        errors: errors.load(Ordering::Relaxed),
        first_error: first_error.into_inner().unwrap_or_default(),
        verified_bytes: verified.load(Ordering::Relaxed),
    })
}

/// CPU time used by a cgroup (all benchmark processes: clients, servers, proxies, loader)
/// over the measured window, from its `cpu.stat`.
pub struct CpuMeter {
    stat: std::path::PathBuf,
    start: Option<(u64, Instant)>,
    result: Option<(f64, f64)>,
}

/// CPU use over a measured window.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct CpuUse {
    /// CPU time of the cgroup in the window, microseconds.
    pub busy_us: f64,
    /// Busy CPUs on average (busy time / window): what the benchmark got of the machine.
    pub cores: f64,
    /// CPU microseconds per unit of work: per connection, or per MiB for bulk.
    pub per_unit_us: f64,
}

impl CpuMeter {
    /// Reads `<cgroup>/cpu.stat` (cgroup v2).
    pub fn new(cgroup: &std::path::Path) -> Result<Self> {
        let m = CpuMeter {
            stat: cgroup.join("cpu.stat"),
            start: None,
            result: None,
        };
        m.read()?;
        Ok(m)
    }

    fn read(&self) -> Result<u64> {
        let text = std::fs::read_to_string(&self.stat)
            .with_context(|| format!("cannot read {}", self.stat.display()))?;
        text.lines()
            .find_map(|l| l.strip_prefix("usage_usec "))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("no usage_usec in {}", self.stat.display()))
    }

    /// Handles one edge of the measured window.
    pub fn edge(&mut self, edge: Edge) {
        match edge {
            Edge::Start => self.start = self.read().ok().map(|u| (u, Instant::now())),
            Edge::End => {
                if let (Some((u0, t0)), Ok(u1)) = (self.start, self.read()) {
                    let busy = u1.saturating_sub(u0) as f64;
                    self.result = Some((busy, busy / (t0.elapsed().as_secs_f64() * 1e6)));
                }
            }
        }
    }

    /// The CPU use of the window, divided by `units` of work.
    pub fn result(&self, units: f64) -> Option<CpuUse> {
        self.result.map(|(busy_us, cores)| CpuUse {
            busy_us,
            cores,
            per_unit_us: busy_us / units.max(1e-9),
        })
    }
}

/// Sleeps until `t` (returns at once if it has passed).
pub fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        thread::sleep(t - now);
    }
}

/// Asks for 1 ns timer slack on the calling thread so that paced sleeps end on time.
fn precise_timers() {
    // SAFETY: PR_SET_TIMERSLACK takes an integer and affects only the calling thread.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        let a = parse_addrs("127.0.0.1:9001").unwrap();
        assert_eq!(a, vec!["127.0.0.1:9001".parse().unwrap()]);
        let a = parse_addrs("127.0.0.1:20000-20002, [::1]:5").unwrap();
        assert_eq!(a.len(), 4);
        assert_eq!(a[2], "127.0.0.1:20002".parse().unwrap());
        assert_eq!(a[3], "[::1]:5".parse().unwrap());
        assert!(parse_addrs("127.0.0.1").is_err());
        assert!(parse_addrs("127.0.0.1:5-4").is_err());
        assert!(parse_addrs("host:5").is_err());
        assert!(parse_addrs("127.0.0.1:0").is_err());
        let w = parse_addrs("127.0.0.1:9001*80, 127.0.0.1:9002*20").unwrap();
        assert_eq!(w.len(), 5);
        assert_eq!(w.iter().filter(|a| a.port() == 9002).count(), 1);
        assert!(parse_addrs("127.0.0.1:9001*0").is_err());
        assert!(parse_addrs("127.0.0.1:9001*x").is_err());
    }

    #[test]
    fn echo_check_finds_a_changed_byte() {
        let mut c = EchoCheck::new(b"xx\n");
        c.feed(b"one x").unwrap();
        c.feed(b"x\none xx\non").unwrap();
        assert_eq!(c.checked, 16);
        let e = c.feed(b"e yx\n").unwrap_err();
        assert!(e.contains("byte 18 "), "{e}");
        assert!(EchoCheck::new(b"x\n").feed(b" x\n").is_err());
    }

    #[test]
    fn rng_stays_in_range() {
        let mut r = Rng::new(3);
        let mut seen = [0u32; 5];
        for _ in 0..10_000 {
            seen[r.below(5)] += 1;
        }
        assert!(seen.iter().all(|&n| n > 1500), "{seen:?}");
    }

    /// A line-echo server on an ephemeral port that answers `t <line>`, for `n` connections.
    fn echo_server(n: usize) -> SocketAddr {
        use std::io::{BufRead, BufReader};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        thread::spawn(move || {
            for s in l.incoming().take(n) {
                let s = s.unwrap();
                thread::spawn(move || {
                    let mut w = s.try_clone().unwrap();
                    for line in BufReader::new(s).split(b'\n') {
                        let Ok(line) = line else { break };
                        let mut out = b"t ".to_vec();
                        out.extend(line);
                        out.push(b'\n');
                        if w.write_all(&out).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    #[test]
    fn counted_connections_and_prefixes() {
        let addr = echo_server(40);
        let r = rate(&[addr], 4, Stop::Count(40), &mut |_| {}).unwrap();
        assert_eq!(r.connections, 40);
        assert_eq!(r.errors, 0);
        assert_eq!(r.prefixes.get("t"), Some(&40));
        assert_eq!(r.latency.samples, 40);
    }

    #[test]
    fn bulk_echoes() {
        let addr = echo_server(2);
        let r = bulk(
            &[addr],
            2,
            1024,
            Duration::from_millis(20),
            Duration::from_millis(100),
            &mut |_| {},
        )
        .unwrap();
        assert!(r.bytes > 0, "{r:?}");
        assert!(r.verified_bytes >= r.bytes, "{r:?}");
        assert_eq!(r.errors, 0, "{r:?}");
    }
}

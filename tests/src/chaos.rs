//! The fault suite (`cargo xtask chaos`, and its short variant in `cargo test`).
//!
//! In a network namespace of its own it runs the seed (tcp-echo v1 "one" and v2 "two" behind
//! tcpshift on 127.0.0.1:31400 at 80/20), keeps a paced load of new connections plus some
//! long-lived connections exchanging lines, and meanwhile injects one fault after another:
//! weight changes, the loader killed or stopped and restarted, the programs replaced in place,
//! each backend killed and restarted, v2's address hijacked by another user, malformed input. Every reply is checked byte for byte.
//!
//! A new connection belongs to the phase in which it started, a long-lived connection's
//! exchange or failure to the phase in which it happened. Every record is counted in exactly
//! one row: the phases follow each other without a gap, and the load before the first fault
//! and after the last one has rows of its own; the report checks that the rows add up to the
//! records. The goal for every row is no connection refused, none broken and no byte
//! mismatched, and at least one new connection attempted; for a deliberate backend kill, only
//! connections known to have been open on that backend may break: ones whose reply named it,
//! or whose client port the stopped backend held (accepted, or in its accept queue) just
//! before it was killed. A broken connection whose backend is unknown is never excused.

use std::{
    collections::HashSet,
    fmt::Write as _,
    io::{BufRead, BufReader, ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::{TestNs, scaled, seed_addr, seed_config, subset};

/// What to run and how hard.
#[derive(Debug, Clone)]
pub struct Options {
    /// Weight changes (`tcpshiftctl set-weight`) in the weights phase.
    pub weight_changes: usize,
    /// Times the loader is SIGKILLed and restarted.
    pub loader_kills: usize,
    /// Times the loader is stopped (SIGTERM) and restarted.
    pub loader_stops: usize,
    /// Times the programs are replaced in place (`tcpshiftd --reload-program`).
    pub upgrades: usize,
    /// Kill and restart each backend this many times.
    pub backend_kills: usize,
    /// New connections per second, in total (paced).
    pub rate: u32,
    /// Threads making new connections.
    pub workers: usize,
    /// Long-lived connections, each exchanging a line every 20 ms.
    pub long_lived: usize,
    /// Load without a fault before the first fault and after each one.
    pub settle: Duration,
    /// How long a killed backend stays down before it is restarted.
    pub backend_down: Duration,
}

impl Options {
    /// The full suite (`cargo xtask chaos`): about a minute.
    pub fn full() -> Self {
        Self {
            weight_changes: 1000,
            loader_kills: 3,
            loader_stops: 2,
            upgrades: 3,
            backend_kills: 2,
            rate: 600,
            workers: 3,
            long_lived: 8,
            settle: Duration::from_millis(1000),
            backend_down: Duration::from_millis(500),
        }
    }

    /// The short variant that runs with the test suite (in CI).
    pub fn short() -> Self {
        Self {
            weight_changes: 100,
            loader_kills: 1,
            loader_stops: 1,
            upgrades: 1,
            backend_kills: 1,
            rate: 300,
            workers: 2,
            long_lived: 4,
            settle: Duration::from_millis(300),
            backend_down: Duration::from_millis(300),
        }
    }
}

/// The outcome of one connection or one long-lived exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Replied with "one LINE" or "two LINE".
    Ok,
    /// The connection was refused (RST to the SYN).
    Refused,
    /// Connected, then reset, timed out or closed before the whole reply.
    Broken,
    /// A reply whose bytes are not the echo of what was sent.
    Mismatched,
}

/// One short connection, one exchange of a long-lived connection, or its failure.
#[derive(Debug, Clone, Copy)]
struct Record {
    /// When the connection started (a short one counts in the phase it started in).
    start: Instant,
    /// When it ended (a long-lived exchange or failure counts in the phase it ended in).
    end: Instant,
    outcome: Outcome,
    /// The backend that answered (even partly): 1 ("one"), 2 ("two"), 0 unknown.
    backend: u8,
    /// The client's local port once connected (0: not connected).
    port: u16,
    /// A long-lived connection's record.
    long_lived: bool,
    /// What failed, for a failure.
    what: &'static str,
}

/// One row of the report.
#[derive(Debug, Clone)]
pub struct Row {
    /// The fault (or the load's own time before the first fault and after the last).
    pub fault: String,
    /// How long the phase lasted.
    pub duration: Duration,
    /// New connections started during the phase: `succeeded + refused + broken +
    /// mismatched`.
    pub attempted: u64,
    /// ... answered with the exact echo.
    pub succeeded: u64,
    /// ... refused.
    pub refused: u64,
    /// ... broken after connecting (reset, timeout, short reply).
    pub broken: u64,
    /// ... of which were open on the killed backend (allowed for a deliberate backend kill).
    pub held: u64,
    /// ... whose reply differs from what was sent.
    pub mismatched: u64,
    /// Exchanges on long-lived connections that succeeded during the phase.
    pub long_lived_ok: u64,
    /// Long-lived connections that failed during the phase (could not be set up, refused,
    /// broken or mismatched).
    pub long_lived_failed: u64,
    /// ... of which were open on the killed backend.
    pub long_lived_held: u64,
    /// Whether this row is a fault (a phase with nothing attempted fails) rather than the
    /// load's own time before the first fault or after the last.
    pub is_fault: bool,
    /// The phase's own figure: a backend's re-registration time, the loader's time to be
    /// ready, the program change, …
    pub detail: String,
    /// What the phase itself checked and found wrong (e.g. weights not kept).
    pub problems: Vec<String>,
}

impl Row {
    /// Records counted in this row.
    pub fn records(&self) -> u64 {
        self.attempted + self.long_lived_ok + self.long_lived_failed
    }

    /// Whether the row meets the goal: new connections attempted (in a fault's row), nothing
    /// refused, mismatched, or broken except what a killed backend held, and no problem found.
    pub fn goal_met(&self) -> bool {
        (self.attempted > 0 || !self.is_fault)
            && self.refused == 0
            && self.mismatched == 0
            && self.broken == self.held
            && self.long_lived_failed == self.long_lived_held
            && self.succeeded + self.refused + self.broken + self.mismatched == self.attempted
            && self.problems.is_empty()
    }
}

/// The whole report.
#[derive(Debug, Clone)]
pub struct Report {
    /// One row per fault, in order, with the load's time before the first fault first and
    /// after the last one last.
    pub rows: Vec<Row>,
    /// Records the load produced (every new connection, every long-lived exchange or
    /// failure); the rows' records add up to it.
    pub records: u64,
    /// Options used.
    pub options: Options,
}

impl Report {
    /// Whether every row meets its goal and the rows count every record.
    pub fn goals_met(&self) -> bool {
        self.rows.iter().all(Row::goal_met) && self.counted() == self.records
    }

    /// Records counted in the rows.
    pub fn counted(&self) -> u64 {
        self.rows.iter().map(Row::records).sum()
    }

    /// The table, as Markdown.
    pub fn table(&self) -> String {
        let mut t = String::from(
            "| fault | time | attempted | succeeded | refused | broken (open on killed backend) | mismatched | long-lived exchanges | long-lived failed (open on killed backend) | detail | goal |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|\n",
        );
        for r in &self.rows {
            let broken = if r.held > 0 {
                format!("{} ({})", r.broken, r.held)
            } else {
                r.broken.to_string()
            };
            let long_failed = if r.long_lived_held > 0 {
                format!("{} ({})", r.long_lived_failed, r.long_lived_held)
            } else {
                r.long_lived_failed.to_string()
            };
            let _ = writeln!(
                t,
                "| {} | {:.1} s | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.fault,
                r.duration.as_secs_f64(),
                r.attempted,
                r.succeeded,
                r.refused,
                broken,
                r.mismatched,
                r.long_lived_ok,
                long_failed,
                r.detail,
                if r.goal_met() {
                    "met".to_string()
                } else if r.attempted == 0 && r.is_fault {
                    "MISSED: no connection attempted".to_string()
                } else {
                    format!("MISSED: {}", r.problems.join("; "))
                }
            );
        }
        let _ = writeln!(
            t,
            "\n{} records (new connections, long-lived exchanges and failures), {} counted in \
             the rows{}",
            self.records,
            self.counted(),
            if self.counted() == self.records {
                ""
            } else {
                " — MISSED: not every record was counted"
            }
        );
        t
    }

    /// The report as JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "goals_met": self.goals_met(),
            "records": self.records,
            "counted": self.counted(),
            "options": format!("{:?}", self.options),
            "rows": self.rows.iter().map(|r| json!({
                "fault": r.fault,
                "seconds": r.duration.as_secs_f64(),
                "attempted": r.attempted,
                "succeeded": r.succeeded,
                "refused": r.refused,
                "broken": r.broken,
                "held_by_killed_backend": r.held,
                "mismatched": r.mismatched,
                "long_lived_exchanges": r.long_lived_ok,
                "long_lived_failed": r.long_lived_failed,
                "long_lived_failed_held_by_killed_backend": r.long_lived_held,
                "is_fault": r.is_fault,
                "detail": r.detail,
                "problems": r.problems,
                "goal_met": r.goal_met(),
            })).collect::<Vec<_>>(),
        })
    }
}

/// A phase as the driver ran it.
struct Phase {
    fault: String,
    start: Instant,
    end: Instant,
    /// The killed backend: from just before the signal to just after it was reaped, which
    /// (1 or 2) and the client ports of the connections it held. Only connections known to
    /// be open on it then may break.
    kill: Option<Kill>,
    /// A fault's phase (else the load's time before the first fault or after the last).
    is_fault: bool,
    detail: String,
    problems: Vec<String>,
}

/// The load: paced new connections and long-lived connections, each thread keeping its
/// own records.
struct Load {
    stop: Arc<AtomicBool>,
    gate: Arc<Gate>,
    threads: Vec<JoinHandle<Vec<Record>>>,
}

/// Lets the driver hold new connects for the instant of a backend kill, so that every
/// connection that can be open on the killed backend has been set up before its sockets are
/// listed (none can reach it between the list and its death).
#[derive(Default)]
struct Gate {
    /// New connects wait while this is set.
    closed: AtomicBool,
    /// Connects under way.
    connecting: std::sync::atomic::AtomicUsize,
}

impl Gate {
    /// Runs `connect` once the gate is open, counted as under way.
    fn connect<T>(&self, stop: &AtomicBool, connect: impl FnOnce() -> T) -> T {
        loop {
            self.connecting.fetch_add(1, Ordering::SeqCst);
            if !self.closed.load(Ordering::SeqCst) || stop.load(Ordering::Relaxed) {
                break;
            }
            self.connecting.fetch_sub(1, Ordering::SeqCst);
            // Waiting for the driver to reopen the gate (a few milliseconds).
            std::thread::sleep(Duration::from_micros(200));
        }
        let r = connect();
        self.connecting.fetch_sub(1, Ordering::SeqCst);
        r
    }

    /// Closes the gate and waits (up to `timeout`) until no connect is under way.
    fn close(&self, timeout: Duration) -> Result<()> {
        self.closed.store(true, Ordering::SeqCst);
        let start = Instant::now();
        while self.connecting.load(Ordering::SeqCst) > 0 {
            if start.elapsed() > timeout {
                bail!("connects still under way after {timeout:?}");
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(())
    }

    fn open(&self) {
        self.closed.store(false, Ordering::SeqCst);
    }
}

impl Load {
    /// Starts the load against `addr` (threads inherit the caller's network namespace).
    fn start(addr: SocketAddr, opts: &Options) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let gate = Arc::new(Gate::default());
        let mut threads = Vec::new();
        let workers = opts.workers.max(1);
        let interval = Duration::from_secs_f64(workers as f64 / f64::from(opts.rate.max(1)));
        for w in 0..workers {
            let stop = Arc::clone(&stop);
            let gate = Arc::clone(&gate);
            threads.push(
                std::thread::Builder::new()
                    .name(format!("chaos-worker-{w}"))
                    .spawn(move || short_connections(addr, w, interval, &stop, &gate))
                    .context("cannot start a load thread")?,
            );
        }
        for l in 0..opts.long_lived {
            let stop = Arc::clone(&stop);
            let gate = Arc::clone(&gate);
            threads.push(
                std::thread::Builder::new()
                    .name(format!("chaos-long-{l}"))
                    .spawn(move || long_lived(addr, l, &stop, &gate))
                    .context("cannot start a long-lived connection thread")?,
            );
        }
        Ok(Self {
            stop,
            gate,
            threads,
        })
    }

    /// Stops the load; returns every thread's records.
    fn finish(self) -> Result<Vec<Record>> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for t in self.threads {
            let records = t
                .join()
                .map_err(|_| anyhow::anyhow!("a load thread panicked"))?;
            all.extend(records);
        }
        Ok(all)
    }
}

/// A line of `len` bytes that identifies the connection (checked in the echo).
fn payload(worker: usize, n: u64, len: usize) -> String {
    let mut line = format!("w{worker}-c{n}-");
    let alphabet = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut x = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ worker as u64;
    while line.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        line.push(alphabet[(x % alphabet.len() as u64) as usize] as char);
    }
    line
}

/// Which backend a reply prefix names.
fn backend_of(prefix: &str) -> Option<u8> {
    match prefix {
        "one" => Some(1),
        "two" => Some(2),
        _ => None,
    }
}

/// Checks `reply` against `line`: the backend that answered, or the outcome.
fn check_reply(reply: &[u8], line: &str) -> std::result::Result<u8, Outcome> {
    if reply.is_empty() || !reply.ends_with(b"\n") {
        // Closed before the whole reply: the connection broke under us.
        return Err(Outcome::Broken);
    }
    let text = std::str::from_utf8(&reply[..reply.len() - 1]).map_err(|_| Outcome::Mismatched)?;
    match text.split_once(' ') {
        Some((prefix, echoed)) if echoed == line => backend_of(prefix).ok_or(Outcome::Mismatched),
        _ => Err(Outcome::Mismatched),
    }
}

/// One worker: connect, send a line, read the echo until the server closes, at a fixed pace.
fn short_connections(
    addr: SocketAddr,
    worker: usize,
    interval: Duration,
    stop: &AtomicBool,
    gate: &Gate,
) -> Vec<Record> {
    let mut records = Vec::new();
    let mut next = Instant::now();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if next > now {
            // Pacing the load generator (not synchronisation): the next connection's slot.
            std::thread::sleep(next - now);
        }
        next += interval;
        n += 1;
        let start = Instant::now();
        let line = payload(worker, n, 24 + (n % 64) as usize);
        let mut port = 0;
        let mut backend = 0;
        let (outcome, what) = match one_connection(addr, &line, &mut port, &mut backend, gate, stop)
        {
            Ok(()) => (Outcome::Ok, ""),
            Err((o, what)) => (o, what),
        };
        records.push(Record {
            start,
            end: Instant::now(),
            outcome,
            backend,
            port,
            long_lived: false,
            what,
        });
    }
    records
}

/// One connection: `Ok` with the exact echo, or the outcome and what failed. Sets `port` to
/// the client's local port once connected and `backend` to the backend a reply (even a
/// partial one) named.
fn one_connection(
    addr: SocketAddr,
    line: &str,
    port: &mut u16,
    backend: &mut u8,
    gate: &Gate,
    stop: &AtomicBool,
) -> std::result::Result<(), (Outcome, &'static str)> {
    let connected = gate.connect(stop, || {
        TcpStream::connect_timeout(&addr, scaled(Duration::from_secs(5)))
    });
    let mut s = match connected {
        Ok(s) => s,
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
            return Err((Outcome::Refused, "connect: refused"));
        }
        Err(e) => return Err((Outcome::Broken, io_what("connect", &e))),
    };
    *port = s.local_addr().map_or(0, |a| a.port());
    let mut reply = Vec::with_capacity(line.len() + 8);
    let io = (|| -> std::io::Result<()> {
        s.set_read_timeout(Some(scaled(Duration::from_secs(5))))?;
        s.write_all(format!("{line}\n").as_bytes())?;
        s.shutdown(Shutdown::Write)?;
        s.read_to_end(&mut reply)?;
        Ok(())
    })();
    *backend = named_backend(&reply);
    match io {
        Ok(()) => check_reply(&reply, line)
            .map(|_| ())
            .map_err(|o| (o, reply_what(o))),
        Err(e) => Err((Outcome::Broken, io_what("exchange", &e))),
    }
}

/// The backend a reply names by its prefix, even when it is cut short: 1, 2 or 0 (unknown).
fn named_backend(reply: &[u8]) -> u8 {
    if reply.starts_with(b"one ") {
        1
    } else if reply.starts_with(b"two ") {
        2
    } else {
        0
    }
}

/// A short description of an I/O failure at `stage`.
fn io_what(stage: &'static str, e: &std::io::Error) -> &'static str {
    match (stage, e.kind()) {
        ("connect", ErrorKind::TimedOut | ErrorKind::WouldBlock) => "connect: timeout",
        ("connect", _) => "connect: error",
        (_, ErrorKind::ConnectionReset) => "reset",
        (_, ErrorKind::BrokenPipe) => "broken pipe",
        (_, ErrorKind::TimedOut | ErrorKind::WouldBlock) => "read timeout",
        _ => "I/O error",
    }
}

fn reply_what(o: Outcome) -> &'static str {
    match o {
        Outcome::Broken => "closed before the whole reply",
        Outcome::Mismatched => "reply differs",
        _ => "",
    }
}

/// One long-lived connection: a line every 20 ms, each echo checked. On a failure it records
/// it (with the backend the connection had) and connects again.
fn long_lived(addr: SocketAddr, id: usize, stop: &AtomicBool, gate: &Gate) -> Vec<Record> {
    let mut records = Vec::new();
    let mut n = 0u64;
    'connect: while !stop.load(Ordering::Relaxed) {
        let opened = Instant::now();
        let connected = gate.connect(stop, || {
            TcpStream::connect_timeout(&addr, scaled(Duration::from_secs(5)))
        });
        let stream = match connected {
            Ok(s) => s,
            Err(e) => {
                let outcome = if e.kind() == ErrorKind::ConnectionRefused {
                    Outcome::Refused
                } else {
                    Outcome::Broken
                };
                records.push(Record {
                    start: opened,
                    end: Instant::now(),
                    outcome,
                    backend: 0,
                    port: 0,
                    long_lived: true,
                    what: io_what("connect", &e),
                });
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        let port = stream.local_addr().map_or(0, |a| a.port());
        // A connection that cannot be set up counts as failed, not skipped.
        let set_up = stream
            .set_read_timeout(Some(scaled(Duration::from_secs(5))))
            .and_then(|()| stream.try_clone());
        let mut writer = match set_up {
            Ok(w) => w,
            Err(_) => {
                records.push(Record {
                    start: opened,
                    end: Instant::now(),
                    outcome: Outcome::Broken,
                    backend: 0,
                    port,
                    long_lived: true,
                    what: "set-up: read timeout or clone failed",
                });
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        let mut reader = BufReader::new(stream);
        let mut backend = 0u8;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let line = payload(1000 + id, n, 16 + (n % 200) as usize);
            let mut reply = Vec::new();
            let io = writer
                .write_all(format!("{line}\n").as_bytes())
                .and_then(|()| reader.read_until(b'\n', &mut reply));
            let result = match io {
                Ok(_) => check_reply(&reply, &line).map_err(|o| (o, reply_what(o))),
                Err(e) => Err((Outcome::Broken, io_what("exchange", &e))),
            };
            if backend == 0 {
                backend = named_backend(&reply);
            }
            match result {
                Ok(b) if backend == 0 || b == backend => {
                    backend = b;
                    records.push(Record {
                        start: opened,
                        end: Instant::now(),
                        outcome: Outcome::Ok,
                        backend,
                        port,
                        long_lived: true,
                        what: "",
                    });
                }
                Ok(_) => {
                    // Another backend answered on the same connection: impossible unless
                    // bytes got mixed up.
                    records.push(Record {
                        start: opened,
                        end: Instant::now(),
                        outcome: Outcome::Mismatched,
                        backend,
                        port,
                        long_lived: true,
                        what: "another backend answered",
                    });
                    continue 'connect;
                }
                Err((outcome, what)) => {
                    records.push(Record {
                        start: opened,
                        end: Instant::now(),
                        outcome,
                        backend,
                        port,
                        long_lived: true,
                        what,
                    });
                    continue 'connect;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    records
}

/// Runs the suite in a new network namespace of the calling thread. `progress` gets one line
/// per step.
pub fn run(opts: &Options, progress: &mut dyn FnMut(&str)) -> Result<Report> {
    let mut ns = TestNs::new()?;
    let mut v1 = ns.echo("127.0.0.1", 9001, "one")?;
    let mut v2 = ns.echo("127.0.0.1", 9002, "two")?;
    // The loader logs into a file: on a failure the error includes it.
    let mut loader = ns.loader_with(&seed_config(80, 20), &[])?;
    progress(
        "seed running: tcp-echo v1 (one) and v2 (two) behind tcpshift on 127.0.0.1:31400 at 80/20",
    );
    let load_started = Instant::now();
    let load = Load::start(seed_addr(), opts)?;
    // The load's own time before the first fault: its records are counted too.
    let mut phases: Vec<Phase> = vec![Phase {
        fault: "load starting (before the first fault)".into(),
        start: load_started,
        end: Instant::now(),
        kill: None,
        is_fault: false,
        detail: String::new(),
        problems: Vec::new(),
    }];
    let result = drive(
        opts,
        &load.gate,
        &mut ns,
        &mut v1,
        &mut v2,
        &mut loader,
        &mut phases,
        progress,
    );
    let stopping = phases.last().map_or_else(Instant::now, |p| p.end);
    let records = load.finish()?;
    result?;
    // The records of connections still running when the load was told to stop.
    phases.push(Phase {
        fault: "load stopping (after the last fault)".into(),
        start: stopping,
        end: Instant::now() + Duration::from_secs(1),
        kill: None,
        is_fault: false,
        detail: String::new(),
        problems: Vec::new(),
    });
    let kills: Vec<Kill> = phases.iter().filter_map(|p| p.kill.clone()).collect();
    Ok(Report {
        rows: phases.iter().map(|p| row(p, &records, &kills)).collect(),
        records: records.len() as u64,
        options: opts.clone(),
    })
}

/// The faults, one phase each.
// The driver is handed every live handle of the run (options, the load's gate, the
// namespace, three process slots, the phases and the progress line).
#[allow(clippy::too_many_arguments)]
fn drive(
    opts: &Options,
    gate: &Gate,
    ns: &mut TestNs,
    v1: &mut usize,
    v2: &mut usize,
    loader: &mut usize,
    phases: &mut Vec<Phase>,
    progress: &mut dyn FnMut(&str),
) -> Result<()> {
    let mut phase = |fault: String,
                     progress: &mut dyn FnMut(&str),
                     f: &mut dyn FnMut(&mut Phase) -> Result<()>|
     -> Result<()> {
        progress(&format!("fault: {fault}"));
        // Phases follow each other without a gap: this one starts where the last ended.
        let start = phases.last().map_or_else(Instant::now, |p| p.end);
        let mut p = Phase {
            fault,
            start,
            end: start,
            kill: None,
            is_fault: true,
            detail: String::new(),
            problems: Vec::new(),
        };
        // A fault that could not be carried out is a problem of its row; the suite goes on.
        if let Err(e) = f(&mut p) {
            p.problems.push(format!("{e:#}"));
        }
        // Load keeps running after the fault: connections it disturbed show up here.
        std::thread::sleep(opts.settle);
        p.end = Instant::now();
        phases.push(p);
        Ok(())
    };

    phase("none (baseline)".into(), progress, &mut |_| Ok(()))?;

    phase(
        format!("{} weight changes", opts.weight_changes),
        progress,
        &mut |p| {
            let mut x = 0x2545_F491_4F6C_DD1Du64;
            let start = Instant::now();
            let mut last = 20;
            for i in 0..opts.weight_changes {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // Extremes included: every fifth change is 0 or 100.
                let w = match i % 5 {
                    0 => 0,
                    1 => 100,
                    _ => (x % 101) as u32,
                };
                let w = if i + 1 == opts.weight_changes { 20 } else { w };
                ns.ctl_ok(&["set-weight", &format!("v1={}", 100 - w), &format!("v2={w}")])?;
                last = w;
            }
            let took = start.elapsed();
            p.detail = format!(
                "{:.1} ms per change (tcpshiftctl)",
                took.as_secs_f64() * 1000.0 / opts.weight_changes.max(1) as f64
            );
            check_weights(ns, u64::from(100 - last), u64::from(last), p)
        },
    )?;

    for (signal, name, times) in [
        (libc::SIGKILL, "SIGKILL", opts.loader_kills),
        (libc::SIGTERM, "SIGTERM", opts.loader_stops),
    ] {
        for i in 0..times {
            phase(
                format!("loader {name} + restart ({}/{times})", i + 1),
                progress,
                &mut |p| {
                    ns.signal(*loader, signal)?;
                    let start = Instant::now();
                    *loader = ns.restart_loader_with(&[])?;
                    p.detail = format!("loader ready again in {:.0} ms", ms(start.elapsed()));
                    check_weights(ns, 80, 20, p)
                },
            )?;
        }
    }
    for i in 0..opts.upgrades {
        phase(
            format!("program upgrade in place ({}/{})", i + 1, opts.upgrades),
            progress,
            &mut |p| {
                let before = program_id(ns)?;
                ns.signal(*loader, libc::SIGTERM)?;
                let start = Instant::now();
                *loader = ns.restart_loader_with(&["--reload-program"])?;
                let after = program_id(ns)?;
                p.detail = format!(
                    "sk_lookup program {before} -> {after}, new loader ready in {:.0} ms",
                    ms(start.elapsed())
                );
                if after == before {
                    p.problems
                        .push(format!("the program was not replaced (still id {before})"));
                }
                check_weights(ns, 80, 20, p)
            },
        )?;
    }
    for i in 0..opts.backend_kills {
        for (name, prefix, port, backend) in [("v1", "one", 9001u16, 1u8), ("v2", "two", 9002, 2)] {
            let idx = if backend == 1 { &mut *v1 } else { &mut *v2 };
            phase(
                format!(
                    "backend {name} killed, restarted after {} ms ({}/{})",
                    opts.backend_down.as_millis(),
                    i + 1,
                    opts.backend_kills
                ),
                progress,
                &mut |p| {
                    // New connects are held for this instant and the backend is stopped,
                    // so that the connections it holds (accepted or queued) can be listed
                    // before it dies and none reaches it after the list.
                    let pid = ns.pid(*idx);
                    let signalled = Instant::now();
                    let held = (|| -> Result<HashSet<u16>> {
                        gate.close(scaled(Duration::from_secs(2)))?;
                        // SAFETY: plain kill(2) on our own child, not yet reaped (killed and
                        // reaped just below).
                        if unsafe { libc::kill(pid as libc::pid_t, libc::SIGSTOP) } != 0 {
                            bail!("cannot stop {name}: {}", std::io::Error::last_os_error());
                        }
                        let other = if backend == 1 { 9002 } else { 9001 };
                        let ports = client_ports_held_by(pid, seed_addr().port(), other);
                        ns.kill(*idx)?;
                        ports
                    })();
                    // The load goes on whatever happened.
                    gate.open();
                    let ports = held?;
                    p.kill = Some(Kill {
                        signalled,
                        reaped: Instant::now(),
                        backend,
                        ports,
                    });
                    // Down for a while: new connections must all go to the other backend.
                    std::thread::sleep(opts.backend_down);
                    let log_before = ns.loader_log().len();
                    *idx = ns.echo("127.0.0.1", port, prefix)?;
                    let listening = Instant::now();
                    // Readiness (not the figure): the subset is live again.
                    let polled = crate::poll_until(
                        Duration::from_secs(5),
                        "the restarted backend registered",
                        || {
                            let status = ns.status()?;
                            Ok(subset(&status, name)
                                .is_some_and(|s| s["live"] == true)
                                .then(|| listening.elapsed()))
                        },
                    )?;
                    // The figure comes from the daemon's own events when it logs them (from
                    // the scan that saw the listener to the registration); else it is the
                    // polled time, labelled as such.
                    let log = ns.loader_log();
                    let fresh = log.get(log_before..).unwrap_or(&log);
                    let (took, how) = match seen_to_registered(fresh, name) {
                        Some(d) => {
                            p.detail = format!(
                                "re-registered {:.1} ms after tcpshiftd's scan saw it listening \
                                 (daemon's log; live in status {:.0} ms after it listened)",
                                ms(d),
                                ms(polled)
                            );
                            (d, "seen by the scan to registered (daemon's log)")
                        }
                        None => {
                            p.detail = format!(
                                "re-registered {:.0} ms after it listened (polled with \
                                 tcpshiftctl status: the loader logged no \
                                 seen_to_registered_us)",
                                ms(polled)
                            );
                            (polled, "listening to live in status (polled)")
                        }
                    };
                    // 1 s (stretched under emulation, see `scaled`).
                    let limit = scaled(Duration::from_secs(1));
                    if took > limit {
                        p.problems.push(format!(
                            "re-registration took {:.0} ms, {how} (> {:.0} ms)",
                            ms(took),
                            ms(limit)
                        ));
                    }
                    Ok(())
                },
            )?;
        }
    }
    // The backend's address hijacked: v2 dies and another user (uid 65534) listens on its
    // address. The registrar refuses that socket (issue 12), so not one connection reaches
    // it: a reply from it would be a mismatched record of this row.
    phase(
        "backend v2 hijacked: killed, uid 65534 listens on its address".into(),
        progress,
        &mut |p| {
            let pid = ns.pid(*v2);
            let signalled = Instant::now();
            let held = (|| -> Result<HashSet<u16>> {
                gate.close(scaled(Duration::from_secs(2)))?;
                // SAFETY: plain kill(2) on our own child, not yet reaped (killed and reaped
                // just below).
                if unsafe { libc::kill(pid as libc::pid_t, libc::SIGSTOP) } != 0 {
                    bail!("cannot stop v2: {}", std::io::Error::last_os_error());
                }
                let ports = client_ports_held_by(pid, seed_addr().port(), 9001);
                ns.kill(*v2)?;
                ports
            })();
            gate.open();
            p.kill = Some(Kill {
                signalled,
                reaped: Instant::now(),
                backend: 2,
                ports: held?,
            });
            let refused_before = v2_refused(ns)?;
            let hijacker = Hijacker::start(9002)?;
            let seen = crate::poll_until(
                Duration::from_secs(5),
                "the hijacker's socket refused",
                || {
                    let n = v2_refused(ns)?;
                    Ok((n > refused_before).then_some(n))
                },
            )?;
            // Under load for a while with the hijacker listening.
            std::thread::sleep(opts.backend_down);
            let status = ns.status()?;
            if subset(&status, "v2").is_some_and(|s| s["live"] == true) {
                p.problems
                    .push("v2 was live while only the hijacker listened on its address".into());
            }
            drop(hijacker);
            *v2 = ns.echo("127.0.0.1", 9002, "two")?;
            crate::poll_until(Duration::from_secs(5), "v2 registered again", || {
                let status = ns.status()?;
                Ok(subset(&status, "v2")
                    .is_some_and(|s| s["live"] == true)
                    .then_some(()))
            })?;
            p.detail = format!(
                "hijacker refused by the registrar (refusals {refused_before} -> {seen}); v2 registered again"
            );
            Ok(())
        },
    )?;
    phase(
        format!("{} malformed inputs", BAD_INPUTS.len()),
        progress,
        &mut |p| {
            let before = ns.ctl_ok(&["get", "virtualservice", "-o", "yaml"]).ok();
            let weights_before = weights(ns)?;
            let mut refused = 0;
            for (what, args, file) in BAD_INPUTS {
                let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
                if let Some(content) = file {
                    let path = ns.file("bad.yaml");
                    std::fs::write(&path, content)?;
                    args.push(path.display().to_string());
                }
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let out = ns.ctl(&args)?;
                if out.status.success() {
                    p.problems.push(format!("{what}: accepted"));
                } else {
                    refused += 1;
                }
            }
            if weights(ns)? != weights_before {
                p.problems.push("the weights changed".into());
            }
            if ns.ctl_ok(&["get", "virtualservice", "-o", "yaml"]).ok() != before {
                p.problems.push("the routes changed".into());
            }
            p.detail = format!("{refused} of {} refused", BAD_INPUTS.len());
            Ok(())
        },
    )?;
    Ok(())
}

/// How many sockets the registrar refused for v2 (`status --json`).
fn v2_refused(ns: &TestNs) -> Result<u64> {
    let status = ns.status()?;
    Ok(subset(&status, "v2").map_or(0, |s| s["owner"]["refused"].as_u64().unwrap_or(0)))
}

/// `tcp-echo` as uid 65534 on `127.0.0.1:PORT`, replying "evil" (killed on drop).
struct Hijacker(std::process::Child);

impl Hijacker {
    fn start(port: u16) -> Result<Self> {
        let mut child = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(crate::bin_dir().join("tcp-echo"))
            .args(["--bind", "127.0.0.1", &port.to_string(), "evil"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("cannot run setpriv (util-linux)")?;
        let stdout = child.stdout.take().context("tcp-echo stdout")?;
        let me = Self(child);
        let mut lines = BufReader::new(stdout).lines();
        if !lines
            .by_ref()
            .any(|l| l.is_ok_and(|l| l.contains("listening on")))
        {
            bail!("tcp-echo as uid 65534 on port {port} did not start");
        }
        std::thread::spawn(move || for _ in lines {});
        Ok(me)
    }
}

impl Drop for Hijacker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A malformed input: what it is, tcpshiftctl's arguments, and the content of a file
/// appended as the last argument.
type BadInput = (&'static str, &'static [&'static str], Option<&'static [u8]>);

/// Malformed inputs given to tcpshiftctl (the bad-input tests have many more).
const BAD_INPUTS: &[BadInput] = &[
    ("weight not a number", &["set-weight", "v2=abc"], None),
    ("negative weight", &["set-weight", "v2=-5"], None),
    ("percent over 100", &["set-weight", "v2=101"], None),
    ("unknown subset", &["set-weight", "v3=10"], None),
    ("unknown service", &["set-weight", "--service", "nope", "v2=10"], None),
    ("all weights zero", &["set-weight", "v1=0", "v2=0"], None),
    (
        "truncated YAML",
        &["apply", "-f"],
        Some(b"apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: \"tcp-ec"),
    ),
    (
        "unknown subset in a VirtualService",
        &["apply", "-f"],
        Some(
            b"apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: tcp-echo\nspec:\n  hosts: [tcp-echo]\n  tcp:\n  - route:\n    - destination: {host: tcp-echo, subset: v9}\n      weight: 100\n",
        ),
    ),
    (
        "negative weight in a VirtualService",
        &["apply", "-f"],
        Some(
            b"apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: tcp-echo\nspec:\n  hosts: [tcp-echo]\n  tcp:\n  - route:\n    - destination: {host: tcp-echo, subset: v1}\n      weight: -20\n    - destination: {host: tcp-echo, subset: v2}\n      weight: 120\n",
        ),
    ),
    ("binary garbage", &["apply", "-f"], Some(b"\x01\x02\xff\xfe\x00kind: [[[")),
];

/// The weights of tcp-echo's subsets, from `status --json`.
fn weights(ns: &TestNs) -> Result<Vec<(String, u64)>> {
    let status = ns.status()?;
    Ok(crate::subsets(&status)
        .map(|s| {
            (
                s["name"].as_str().unwrap_or_default().to_string(),
                s["weight"].as_u64().unwrap_or(u64::MAX),
            )
        })
        .collect())
}

/// Records a problem unless the kernel holds weights v1/v2.
fn check_weights(ns: &TestNs, v1: u64, v2: u64, p: &mut Phase) -> Result<()> {
    let w = weights(ns)?;
    let want = vec![("v1".to_string(), v1), ("v2".to_string(), v2)];
    if w != want {
        p.problems
            .push(format!("weights are {w:?}, expected v1={v1} v2={v2}"));
    }
    Ok(())
}

fn program_id(ns: &TestNs) -> Result<u64> {
    ns.status()?["program_id"]
        .as_u64()
        .context("no program_id in status --json")
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The time from the scan that saw `subset`'s listener to its registration, from the last
/// `registered listening socket` line of tcpshiftd's log that names it and carries
/// `seen_to_registered_us=N` (colour codes ignored); `None` when no line does.
fn seen_to_registered(log: &str, subset: &str) -> Option<Duration> {
    let want = format!("subset={subset}");
    log.lines()
        .rev()
        .map(strip_ansi)
        .filter(|l| l.contains("registered"))
        .filter(|l| l.split_whitespace().any(|w| w == want))
        .filter_map(|l| {
            let (_, rest) = l.split_once("seen_to_registered_us=")?;
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok().map(Duration::from_micros)
        })
        .next()
}

/// `line` without ANSI escape sequences (`ESC [ ... letter`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A backend killed on purpose.
#[derive(Debug, Clone)]
struct Kill {
    /// Just before it was stopped (then killed).
    signalled: Instant,
    /// Just after the process was reaped (its sockets are closed by then).
    reaped: Instant,
    /// 1 (v1) or 2 (v2).
    backend: u8,
    /// Client ports of the connections it held when it was stopped (accepted or waiting in
    /// its accept queue).
    ports: HashSet<u16>,
}

impl Kill {
    /// Whether `rec` was open on this backend while it died: open at that time, and known to
    /// be on it (its reply named it, or the stopped backend held its client port). A
    /// connection whose backend is unknown is never excused.
    fn held(&self, rec: &Record) -> bool {
        let on_it = rec.backend == self.backend
            || (rec.backend == 0 && rec.port != 0 && self.ports.contains(&rec.port));
        on_it && rec.start < self.reaped && rec.end >= self.signalled
    }
}

/// The client ports of the TCP connections to `service_port` that the stopped process `pid`
/// holds: the ones it accepted (its file descriptors' sockets, matched in its network
/// namespace's `/proc/PID/net/tcp`), and the ones waiting in its accept queue. A queued
/// connection has no file yet; it is counted as the stopped process's only when the other
/// backend's listener (on `other_port`) has an empty accept queue in the same read, so that
/// no queued connection can be the other backend's.
fn client_ports_held_by(pid: u32, service_port: u16, other_port: u16) -> Result<HashSet<u16>> {
    let mut inodes = HashSet::new();
    let fd_dir = format!("/proc/{pid}/fd");
    for e in std::fs::read_dir(&fd_dir).with_context(|| format!("cannot list {fd_dir}"))? {
        let Ok(target) = std::fs::read_link(e?.path()) else {
            continue;
        };
        if let Some(inode) = target
            .to_str()
            .and_then(|t| t.strip_prefix("socket:["))
            .and_then(|t| t.strip_suffix(']'))
            .and_then(|t| t.parse::<u64>().ok())
        {
            inodes.insert(inode);
        }
    }
    // The other backend accepts within microseconds: read again until its queue is empty.
    let mut tries = 0;
    loop {
        let (ports, queued, other_queue) = tcp_rows(pid, service_port, other_port, &inodes);
        tries += 1;
        if other_queue == 0 || tries >= 50 {
            let mut ports = ports;
            if other_queue == 0 {
                ports.extend(queued);
            }
            return Ok(ports);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// One read of `/proc/PID/net/tcp{,6}`: the client ports of connections to `service_port`
/// whose socket is one of `inodes`, those not yet accepted by anyone (no file, established
/// or half-closed by the client), and the accept-queue length of the listener on
/// `other_port`.
fn tcp_rows(
    pid: u32,
    service_port: u16,
    other_port: u16,
    inodes: &HashSet<u64>,
) -> (HashSet<u16>, HashSet<u16>, u64) {
    let mut ports = HashSet::new();
    let mut queued = HashSet::new();
    let mut other_queue = 0u64;
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local rem st tx_queue:rx_queue tr:when retrnsmt uid timeout inode
            let (Some(local), Some(remote), Some(state), Some(queues), Some(inode)) =
                (f.get(1), f.get(2), f.get(3), f.get(4), f.get(9))
            else {
                continue;
            };
            let port = |a: &str| {
                a.rsplit_once(':')
                    .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
            };
            let (Some(local), Some(remote), Ok(inode)) =
                (port(local), port(remote), inode.parse::<u64>())
            else {
                continue;
            };

            if local == other_port && *state == "0A" {
                // A listener's rx_queue is its accept queue's length.
                other_queue += queues
                    .split_once(':')
                    .and_then(|(_, rx)| u64::from_str_radix(rx, 16).ok())
                    .unwrap_or(u64::MAX);
            } else if local == service_port && inodes.contains(&inode) {
                ports.insert(remote);
            } else if local == service_port && inode == 0 && matches!(*state, "01" | "08") {
                // ESTABLISHED or CLOSE_WAIT without a file: waiting to be accepted.
                queued.insert(remote);
            }
        }
    }
    (ports, queued, other_queue)
}

/// Sums the records of phase `p` into its row. `kills` are every backend kill of the run (a
/// connection that started in one phase can be held by a backend killed in the next).
fn row(p: &Phase, records: &[Record], kills: &[Kill]) -> Row {
    let mut r = Row {
        fault: p.fault.clone(),
        duration: p.end - p.start,
        attempted: 0,
        succeeded: 0,
        refused: 0,
        broken: 0,
        held: 0,
        mismatched: 0,
        long_lived_ok: 0,
        long_lived_failed: 0,
        long_lived_held: 0,
        is_fault: p.is_fault,
        detail: p.detail.clone(),
        problems: p.problems.clone(),
    };
    let mut unexpected = Vec::new();
    let in_phase = |at: Instant| at >= p.start && at < p.end;
    for rec in records
        .iter()
        .filter(|r| in_phase(if r.long_lived { r.end } else { r.start }))
    {
        let held = rec.outcome == Outcome::Broken && kills.iter().any(|k| k.held(rec));
        if rec.outcome != Outcome::Ok && !held && unexpected.len() < 5 {
            unexpected.push(format!(
                "{} connection{} at +{:.0} ms: {}",
                if rec.long_lived { "long-lived" } else { "new" },
                match rec.backend {
                    1 => " to v1",
                    2 => " to v2",
                    _ => "",
                },
                ms(rec.end.saturating_duration_since(p.start)),
                if rec.outcome == Outcome::Broken && rec.backend == 0 {
                    format!(
                        "{} (client port {}, backend unknown: not excused)",
                        rec.what, rec.port
                    )
                } else {
                    rec.what.to_string()
                }
            ));
        }
        if rec.long_lived {
            match rec.outcome {
                Outcome::Ok => r.long_lived_ok += 1,
                _ => {
                    r.long_lived_failed += 1;
                    r.long_lived_held += u64::from(held);
                }
            }
            continue;
        }
        r.attempted += 1;
        match rec.outcome {
            Outcome::Ok => r.succeeded += 1,
            Outcome::Refused => r.refused += 1,
            Outcome::Mismatched => r.mismatched += 1,
            Outcome::Broken => {
                r.broken += 1;
                r.held += u64::from(held);
            }
        }
    }
    if !unexpected.is_empty() {
        r.problems.push(unexpected.join(", "));
    }
    r
}

/// Fails with the table when a goal is missed.
pub fn check(report: &Report) -> Result<()> {
    if !report.goals_met() {
        bail!("fault suite: a goal was missed\n{}", report.table());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_time_comes_from_the_daemon_s_line_for_that_subset() {
        let log = "2026-01-01T00:00:00Z  INFO tcpshiftd: registered listening socket \
                   service=tcp-echo subset=v2 backend=127.0.0.1:9002 seen_to_registered_us=99\n\
                   2026-01-01T00:00:01Z  INFO tcpshiftd: registered listening socket \
                   \u{1b}[3mservice\u{1b}[0m\u{1b}[2m=\u{1b}[0mtcp-echo \
                   \u{1b}[3msubset\u{1b}[0m\u{1b}[2m=\u{1b}[0mv1 \
                   \u{1b}[3mseen_to_registered_us\u{1b}[0m\u{1b}[2m=\u{1b}[0m1234\n";
        assert_eq!(
            seen_to_registered(log, "v1"),
            Some(Duration::from_micros(1234))
        );
        assert_eq!(
            seen_to_registered(log, "v2"),
            Some(Duration::from_micros(99))
        );
        assert_eq!(seen_to_registered(log, "v3"), None);
        assert_eq!(
            seen_to_registered("INFO registered listening socket subset=v1", "v1"),
            None
        );
    }

    fn record(outcome: Outcome, backend: u8, port: u16, at: Instant) -> Record {
        Record {
            start: at,
            end: at + Duration::from_millis(5),
            outcome,
            backend,
            port,
            long_lived: false,
            what: "",
        }
    }

    #[test]
    fn a_broken_connection_is_excused_only_when_known_to_be_on_the_killed_backend() {
        let t = Instant::now();
        let kill = Kill {
            signalled: t + Duration::from_millis(2),
            reaped: t + Duration::from_millis(3),
            backend: 1,
            ports: [40000].into(),
        };
        assert!(kill.held(&record(Outcome::Broken, 1, 0, t)));
        assert!(kill.held(&record(Outcome::Broken, 0, 40000, t)));
        // Unknown backend, other port, or the other backend: not excused.
        assert!(!kill.held(&record(Outcome::Broken, 0, 40001, t)));
        assert!(!kill.held(&record(Outcome::Broken, 0, 0, t)));
        assert!(!kill.held(&record(Outcome::Broken, 2, 40000, t)));
        // Not open while it died.
        assert!(!kill.held(&record(
            Outcome::Broken,
            1,
            0,
            t + Duration::from_millis(10)
        )));
    }

    #[test]
    fn every_record_lands_in_exactly_one_row_and_empty_fault_phases_fail() {
        let t = Instant::now();
        let at = |ms: u64| t + Duration::from_millis(ms);
        let phase = |fault: &str, start: Instant, end: Instant, is_fault: bool| Phase {
            fault: fault.into(),
            start,
            end,
            kill: None,
            is_fault,
            detail: String::new(),
            problems: Vec::new(),
        };
        let phases = [
            phase("before", at(0), at(10), false),
            phase("a", at(10), at(20), true),
            phase("b", at(20), at(30), true),
        ];
        let records = vec![
            record(Outcome::Ok, 1, 1, at(0)),
            record(Outcome::Ok, 2, 2, at(10)),
            record(Outcome::Ok, 1, 3, at(19)),
        ];
        let rows: Vec<Row> = phases.iter().map(|p| row(p, &records, &[])).collect();
        let report = Report {
            rows,
            records: records.len() as u64,
            options: Options::short(),
        };
        assert_eq!(report.counted(), 3);
        assert!(report.rows[1].goal_met());
        // Phase b had nothing attempted: its row fails, and so does the report.
        assert!(!report.rows[2].goal_met());
        assert!(!report.goals_met());
    }
}

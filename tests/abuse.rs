//! Resource limits under abuse, against a real `mailgate serve`: 1,000 idle connections,
//! slowloris, 1 MiB headers, MIME nested 10,000 deep, messages at the size limit, a flood of bad
//! commands. For each: the abuse is refused with its reply code and reason id (reject log), a
//! well-behaved client sending mail at the same time keeps its latency (p99 of end of DATA ->
//! 250 within twice the p99 measured without abuse, or that plus 50 ms on a noisy machine), and
//! the server's memory is reported (VmRSS/VmHWM from /proc). The numbers are printed with
//! `eprintln!` (`cargo test --test abuse -- --nocapture`); docs/protocol.md#limits-under-abuse
//! has a run's.
//!
//! The scenarios run one at a time (a lock), each against its own server: latencies measured
//! while another scenario loads the machine would mean nothing.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

const MIB: f64 = 1024.0 * 1024.0;

/// A server with one SMTP listener whose peers are not trusted (so that loopback gets the
/// per-IP limit like any client) and the given `[limits]` lines.
struct Gate {
    _dir: tempfile::TempDir,
    server: Server,
    config: std::path::PathBuf,
    port: u16,
    http: u16,
}

impl Gate {
    fn start(limits: &str) -> Gate {
        let dir = tempfile::tempdir().unwrap();
        let ports = Ports::new();
        let listeners =
            format!("[[listen]]\nprotocol = \"smtp\"\naddress = \"127.0.0.1:{}\"\ntrusted_peers = []\n", ports.smtp);
        let config = write_config(dir.path(), &ports, &listeners, &format!("[limits]\n{limits}\n"));
        let server = Server::start(&config, ports.smtp, ports.http);
        Gate { _dir: dir, server, config, port: ports.smtp, http: ports.http }
    }

    fn pid(&self) -> u32 {
        self.server.pid()
    }

    /// Reject-log entries with this reason id.
    fn rejects(&self, reason: &str) -> Vec<serde_json::Value> {
        let o = cli(&self.config, &["rejects", "--reason", reason, "--json"]);
        assert!(o.status.success(), "rejects: {}", String::from_utf8_lossy(&o.stderr));
        json_values(&stdout(&o))
    }

    /// The value of one `mailgate_refused_total` series (0 when absent).
    fn refused_metric(&self, reason: &str) -> u64 {
        let r = common::receiver::http_get(self.http, "/metrics");
        let text = String::from_utf8_lossy(&r.body).to_string();
        text.lines()
            .filter(|l| l.starts_with("mailgate_refused_total{") && l.contains(&format!("reason=\"{reason}\"")))
            .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
            .sum::<f64>() as u64
    }

    /// The value of an unlabelled series of /metrics (0 when absent).
    fn metric(&self, name: &str) -> u64 {
        let r = common::receiver::http_get(self.http, "/metrics");
        let text = String::from_utf8_lossy(&r.body).to_string();
        text.lines().filter_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok()).sum::<f64>() as u64
    }

    fn alive(&self) -> bool {
        std::fs::metadata(format!("/proc/{}", self.pid())).is_ok()
            && TcpStream::connect(("127.0.0.1", self.port)).is_ok()
    }
}

/// VmRSS, VmHWM and RssAnon of a process, in bytes.
#[derive(Debug, Clone, Copy)]
struct Mem {
    rss: u64,
    hwm: u64,
    anon: u64,
}

fn mem(pid: u32) -> Mem {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    Mem { rss: field("VmRSS:"), hwm: field("VmHWM:"), anon: field("RssAnon:") }
}

impl std::fmt::Display for Mem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = |b: u64| b as f64 / MIB;
        write!(f, "VmRSS {:.1} MiB (anon {:.1}), VmHWM {:.1} MiB", m(self.rss), m(self.anon), m(self.hwm))
    }
}

/// Per-message latencies (end of DATA -> reply) of a well-behaved client.
struct Latency {
    samples: Vec<Duration>,
}

impl Latency {
    fn p(&self, q: f64) -> Duration {
        let mut s = self.samples.clone();
        s.sort();
        s[((s.len() as f64 * q).ceil() as usize).clamp(1, s.len()) - 1]
    }
    fn p99(&self) -> Duration {
        self.p(0.99)
    }
}

impl std::fmt::Display for Latency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        write!(f, "p50 {:.1} ms, p99 {:.1} ms ({} messages)", ms(self.p(0.5)), ms(self.p99()), self.samples.len())
    }
}

static MESSAGE_ID: AtomicUsize = AtomicUsize::new(0);

/// A well-behaved client: `n` messages, a new connection every 10 (so that a short
/// session_timeout never cuts it), each message timed from its final `.` to the 250.
fn good_client(port: u16, n: usize) -> Latency {
    let rcpt = format!("incoming+{KEY}@localhost");
    let mut samples = Vec::with_capacity(n);
    let mut c = None;
    for i in 0..n {
        if i % 10 == 0 {
            if let Some(mut old) = c.take() {
                let _ = Client::cmd(&mut old, "QUIT");
            }
            let mut new = Client::connect(port);
            assert!(new.cmd("EHLO good.example").starts_with("250"));
            c = Some(new);
        }
        let c = c.as_mut().unwrap();
        let id = MESSAGE_ID.fetch_add(1, Ordering::SeqCst);
        assert!(c.cmd("MAIL FROM:<alice@example.org>").starts_with("250"));
        assert!(c.cmd(&format!("RCPT TO:<{rcpt}>")).starts_with("250"));
        assert!(c.cmd("DATA").starts_with("354"));
        let msg = message(&format!("good-{id}-{}@example.org", std::process::id()), "a reply", "");
        c.send_raw(msg.as_bytes());
        let t = Instant::now();
        c.send_raw(b".\r\n");
        let r = c.reply();
        samples.push(t.elapsed());
        assert!(r.starts_with("250 2.0.0 Ok: queued as "), "good client: {r}");
    }
    // leave no session behind: the next step of a test may count the server's connections
    if let Some(mut last) = c {
        assert!(last.cmd("QUIT").starts_with("221"));
        last.read_to_end();
    }
    Latency { samples }
}

const GOOD_MESSAGES: usize = 100;
/// Abusing clients sending as fast as they can. The test machine may have two cores: more
/// would measure the CPU contention of the test process itself.
const ABUSERS: usize = 2;

/// Runs the good client while `abuse` runs (started before, stopped after), and checks its p99
/// against `baseline`. The disk's fsync makes single p99s noisy, so a miss is measured again
/// (up to three runs); every run is reported.
fn under_abuse(
    name: &str,
    port: u16,
    baseline: &Latency,
    abuse: impl FnOnce(Arc<AtomicBool>) -> Vec<thread::JoinHandle<()>>,
) {
    let stop = Arc::new(AtomicBool::new(false));
    let handles = abuse(stop.clone());
    thread::sleep(Duration::from_millis(300));
    let base = baseline.p99();
    let bound = (base * 2).max(base + Duration::from_millis(50));
    let mut runs = Vec::new();
    for _ in 0..3 {
        let l = good_client(port, GOOD_MESSAGES);
        eprintln!("[{name}] good client under abuse: {l} (without abuse: {baseline}; bound p99 {bound:?})");
        let ok = l.p99() <= bound;
        runs.push(l);
        if ok {
            break;
        }
    }
    stop.store(true, Ordering::SeqCst);
    for h in handles {
        h.join().expect("abuse thread");
    }
    let best = runs.iter().map(Latency::p99).min().unwrap();
    assert!(best <= bound, "[{name}] p99 under abuse {best:?} > {bound:?} (baseline {baseline})");
}

/// An SMTP exchange on a raw stream: whole replies, a deadline on every read.
struct Raw {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Raw {
    fn connect(port: u16) -> Raw {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Raw { w: s.try_clone().unwrap(), r: BufReader::new(s) }
    }
    fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            if self.r.read_line(&mut line).unwrap_or(0) == 0 {
                return all;
            }
            all.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                return all;
            }
        }
    }
    fn send(&mut self, b: &[u8]) -> bool {
        self.w.write_all(b).is_ok()
    }
    fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes());
        self.reply()
    }
    /// EHLO, MAIL, RCPT, DATA: ready for the message.
    fn open_data(&mut self) {
        assert!(self.reply().starts_with("220"));
        assert!(self.cmd("EHLO abuser.example").starts_with("250"));
        assert!(self.cmd("MAIL FROM:<mallory@example.org>").starts_with("250"));
        assert!(self.cmd(&format!("RCPT TO:<incoming+{KEY}@localhost>")).starts_with("250"));
        assert!(self.cmd("DATA").starts_with("354"));
    }
    /// A whole transaction on an open session; returns the reply to the end of DATA.
    fn mail(&mut self, message: &[u8]) -> String {
        assert!(self.cmd("MAIL FROM:<mallory@example.org>").starts_with("250"));
        assert!(self.cmd(&format!("RCPT TO:<incoming+{KEY}@localhost>")).starts_with("250"));
        assert!(self.cmd("DATA").starts_with("354"));
        self.send(message);
        self.send(b".\r\n");
        self.reply()
    }
}

/// Makes sure this process may open `n` more descriptors (raising its soft limit if needed).
fn ensure_fds(n: u64) {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read and write the struct they are given.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    if lim.rlim_cur < n {
        lim.rlim_cur = lim.rlim_max.min(n.max(4096));
        // SAFETY: as above
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    }
    // SAFETY: as above
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    assert!(lim.rlim_cur >= n, "the test needs {n} open files, the limit is {}", lim.rlim_cur);
}

/// 1,000 idle connections: the server holds them all, still serves a good client at its usual
/// latency, stays under 64 MiB, and refuses connections over `max_connections` with
/// `421 4.7.0` and `too_many_connections`.
#[test]
fn idle_connections() {
    let _one = serial();
    ensure_fds(3000);
    const IDLE: usize = 1000;
    // No stress mode: this measures what holding them costs (stress_mode_cuts_idle_sessions
    // has the defence).
    let g = Gate::start("max_connections = 1010\nmax_connections_per_ip = 2000\nstress_command_timeout = \"0s\"\n");
    let fresh = mem(g.pid());
    let baseline = good_client(g.port, GOOD_MESSAGES);
    eprintln!("[idle] good client without abuse: {baseline}");
    let before = mem(g.pid());

    let started = Instant::now();
    let mut idle: Vec<Raw> = (0..IDLE).map(|_| Raw::connect(g.port)).collect();
    for c in &mut idle {
        assert!(c.reply().starts_with("220 "), "every idle connection is greeted");
    }
    let opened = started.elapsed();
    thread::sleep(Duration::from_millis(500));
    let with_idle = mem(g.pid());
    let per_conn = (with_idle.rss as f64 - before.rss as f64) / IDLE as f64 / 1024.0;
    eprintln!(
        "[idle] fresh: {fresh}; after {} messages: {before}; with {IDLE} idle connections (opened and greeted in {opened:?}): {with_idle}; {per_conn:.1} KiB per connection",
        GOOD_MESSAGES
    );
    assert!(with_idle.rss < 64 << 20, "RSS with {IDLE} idle connections: {with_idle}");

    under_abuse("idle", g.port, &baseline, |_| Vec::new());

    // the rest up to max_connections, then one too many
    // (a good client's closed session may hold its slot a moment longer on a loaded machine: a
    // refusal then is retried, and the reject log is checked for the last refusal only)
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut more = Vec::new();
    while more.len() < 1010 - IDLE {
        let mut c = Raw::connect(g.port);
        let greeting = c.reply();
        if greeting.starts_with("220 ") {
            more.push(c);
            continue;
        }
        assert!(greeting.starts_with("421 "), "{greeting}");
        assert!(Instant::now() < deadline, "connection {} of 1010 never got a slot", IDLE + more.len() + 1);
        thread::sleep(Duration::from_millis(100));
    }
    let mut over = Raw::connect(g.port);
    assert_eq!(over.reply(), "421 4.7.0 mx.test Error: too many connections\r\n");
    let mut rest = String::new();
    let _ = over.r.read_to_string(&mut rest);
    assert_eq!(rest, "", "closed after the 421");
    drop((idle, more));
    let entries = g.rejects("too_many_connections");
    let last = entries.last().unwrap_or_else(|| panic!("no too_many_connections entry"));
    assert_eq!((last["stage"].as_str(), last["code"].as_u64()), (Some("connect"), Some(421)));
    // once the idle connections are gone, everyone is served again
    thread::sleep(Duration::from_millis(300));
    good_client(g.port, 10);
    eprintln!("[idle] at the end: {}", mem(g.pid()));
}

/// Stress mode: from 80% of `max_connections` taken, a session idle for
/// `stress_command_timeout` (instead of `command_timeout`) is cut with `421 4.4.2` and
/// `timeout`, until fewer than 70% are in use; the rest keep their sessions. Idle connections
/// from many addresses then cannot lock others out for long. Below 80%, nothing changes.
#[test]
fn stress_mode_cuts_idle_sessions() {
    let _one = serial();
    let g = Gate::start("max_connections = 20\nmax_connections_per_ip = 100\nstress_command_timeout = \"2s\"\n");
    // 13 of 20: under the 70% where stress ends (so that a moment at 80%, while the server
    // has not yet seen the close of Server::start's readiness probes, does not last)
    let mut idle: Vec<Raw> = (0..13).map(|_| Raw::connect(g.port)).collect();
    for c in &mut idle {
        assert!(c.reply().starts_with("220 "));
    }
    thread::sleep(Duration::from_secs(3));
    for c in &mut idle {
        assert_eq!(c.cmd("NOOP"), "250 2.0.0 Ok\r\n", "13 of 20 is no stress: still open");
    }
    assert_eq!(g.metric("mailgate_listeners_under_stress"), 0, "13 of 20");
    // 19 of 20: stress from the 16th on
    for _ in 0..6 {
        let mut c = Raw::connect(g.port);
        assert!(c.reply().starts_with("220 "));
        idle.push(c);
    }
    assert_eq!(g.metric("mailgate_listeners_under_stress"), 1, "19 of 20");
    thread::sleep(Duration::from_secs(5));
    let mut cut = 0;
    for c in &mut idle {
        c.r.get_ref().set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        match c.reply().as_str() {
            "" => assert_eq!(c.cmd("NOOP"), "250 2.0.0 Ok\r\n", "a session left open still works"),
            r => {
                assert_eq!(r, "421 4.4.2 mx.test Error: timeout exceeded\r\n");
                cut += 1;
            }
        }
    }
    eprintln!("[stress] 19 of 20 slots taken, stress from 16: {cut} idle sessions cut after 2 s idle");
    assert!((6..=19).contains(&cut), "{cut} cut: at least 6 must go to end the stress (below 14)");
    good_client(g.port, 10);
    assert!(g.rejects("timeout").len() >= 6);
    assert!(g.metric("mailgate_stress_episodes_total") >= 1);
}

/// The default per-IP limit: the 51st connection from one address gets `421 4.7.0` and a
/// `too_many_connections` entry; another address is still served. A flood of refused
/// connections gets one reject-log entry per address in ten seconds (the metrics count all).
#[test]
fn connections_per_ip() {
    let _one = serial();
    let g = Gate::start("");
    // Server::start ends its readiness probe with QUIT and waits for the close, but the slot is
    // let go as the session task ends, a moment after: a refusal in that moment is retried,
    // and counted.
    let mut held: Vec<Raw> = Vec::new();
    let mut early = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while held.len() < 50 {
        let mut c = Raw::connect(g.port);
        let r = c.reply();
        if r.starts_with("220 ") {
            held.push(c);
            continue;
        }
        assert!(r.starts_with("421 4.7.0 ") && Instant::now() < deadline, "connection {}: {r:?}", held.len() + 1);
        early += 1;
        thread::sleep(Duration::from_millis(50));
    }
    const OVER: u64 = 30;
    for _ in 0..OVER {
        let mut over = Raw::connect(g.port);
        assert_eq!(over.reply(), "421 4.7.0 mx.test Error: too many connections from your address\r\n");
    }
    let entries = g.rejects("too_many_connections");
    assert_eq!(entries.len(), 1, "one entry for the flood: {entries:?}");
    assert_eq!(entries[0]["client_ip"], "127.0.0.1");
    assert_eq!(entries[0]["text"], "mx.test Error: too many connections from your address");
    assert!(entries[0].get("suppressed").is_none(), "the first entry has nothing left out: {entries:?}");
    assert_eq!(g.refused_metric("too_many_connections"), OVER + early, "every refusal is counted");
    // a slot freed is a slot for the next connection (once the server has seen the close: on
    // a loaded machine that can take a moment, and each early try is one more refusal)
    drop(held.pop());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut next = loop {
        let mut c = Raw::connect(g.port);
        if c.reply().starts_with("220 ") {
            break c;
        }
        assert!(std::time::Instant::now() < deadline, "the freed slot was never given out");
        thread::sleep(Duration::from_millis(100));
    };
    let _ = &mut next;
    // after the interval, the next refusal is logged with the count left out
    thread::sleep(Duration::from_secs(10));
    let mut over = Raw::connect(g.port);
    assert!(over.reply().starts_with("421 4.7.0 "));
    let entries = g.rejects("too_many_connections");
    let refused = g.refused_metric("too_many_connections");
    assert_eq!(entries.len(), 2, "{entries:?}");
    assert_eq!(entries[1]["suppressed"].as_u64(), Some(refused - 2), "{entries:?}");
    drop(held);
}

/// Slowloris, one byte per second: a command trickled in is cut after `command_timeout`, a
/// message trickled in after `data_timeout` plus a second per `min_data_rate` bytes (500:
/// 2 ms a byte), whole commands sent slowly at `session_timeout`; each gets `421 4.4.2` and a
/// `timeout` entry, and the good client does not notice.
#[test]
fn slowloris() {
    let _one = serial();
    let g = Gate::start("command_timeout = \"2s\"\ndata_timeout = \"2s\"\nsession_timeout = \"5s\"\n");
    let baseline = good_client(g.port, GOOD_MESSAGES);
    eprintln!("[slowloris] good client without abuse: {baseline}");
    const EACH: usize = 10;
    // (kind of slow client, how long until the server hung up, its last reply)
    type Cut = (&'static str, Duration, String);
    let cut: Arc<Mutex<Vec<Cut>>> = Arc::default();
    let port = g.port;
    under_abuse("slowloris", port, &baseline, |_stop| {
        let mut handles = Vec::new();
        for kind in ["command", "data", "noop"] {
            for _ in 0..EACH {
                let cut = cut.clone();
                handles.push(thread::spawn(move || {
                    let started = Instant::now();
                    let mut c = Raw::connect(port);
                    let trickle: &[u8] = match kind {
                        "command" => {
                            assert!(c.reply().starts_with("220"));
                            b"EHLO a-very-slow-client.example\r\n"
                        }
                        "data" => {
                            c.open_data();
                            b"Subject: slow\r\n\r\none byte per second, for ever\r\n"
                        }
                        _ => {
                            assert!(c.reply().starts_with("220"));
                            assert!(c.cmd("EHLO slow.example").starts_with("250"));
                            b""
                        }
                    };
                    // one byte (or one NOOP) a second until the server hangs up
                    let mut i = 0;
                    let reply = loop {
                        let ok = if trickle.is_empty() {
                            let r = c.cmd("NOOP");
                            if !r.starts_with("250") {
                                break r;
                            }
                            true
                        } else {
                            c.send(&trickle[i % trickle.len()..][..1])
                        };
                        i += 1;
                        if !ok || started.elapsed() > Duration::from_secs(20) {
                            break c.reply();
                        }
                        // the 421 arrives while we sleep: look for it without blocking long
                        c.r.get_ref().set_read_timeout(Some(Duration::from_secs(1))).unwrap();
                        let r = c.reply();
                        if !r.is_empty() {
                            break r;
                        }
                    };
                    cut.lock().unwrap().push((kind, started.elapsed(), reply));
                }));
            }
        }
        handles
    });
    let cut = cut.lock().unwrap();
    assert_eq!(cut.len(), 3 * EACH);
    for (kind, took, reply) in cut.iter() {
        assert!(reply.starts_with("421 4.4.2 mx.test Error: timeout exceeded"), "{kind}: {reply:?}");
        let (low, high) = if *kind == "noop" { (4.5, 8.0) } else { (1.5, 4.5) };
        assert!((low..high).contains(&took.as_secs_f64()), "{kind} cut after {took:?}");
    }
    let times = |k: &str| cut.iter().filter(|c| c.0 == k).map(|c| c.1.as_secs_f64()).fold(0.0, f64::max);
    eprintln!(
        "[slowloris] cut after at most: trickled command {:.1} s, trickled DATA {:.1} s, slow NOOPs {:.1} s",
        times("command"),
        times("data"),
        times("noop")
    );
    let entries = g.rejects("timeout");
    assert_eq!(entries.len(), 3 * EACH, "one timeout entry per slow client");
    let stage = |s: &str| entries.iter().filter(|e| e["stage"] == s).count();
    assert_eq!((stage("connect"), stage("data"), stage("helo")), (EACH, EACH, EACH));
    assert!(entries.iter().all(|e| e["code"] == 421 && e["action"] == "tempfail"));
    eprintln!("[slowloris] {}", mem(g.pid()));
}

fn big_header(bytes: usize) -> Vec<u8> {
    let mut m = b"From: mallory@example.org\r\nSubject: big header\r\n".to_vec();
    let mut i = 0;
    while m.len() < bytes {
        m.extend(format!("X-Filler-{i:06}: {}\r\n", "h".repeat(960)).bytes());
        i += 1;
    }
    m.extend(b"\r\nbody\r\n");
    m
}

fn folded_header(bytes: usize) -> Vec<u8> {
    let mut m = b"From: mallory@example.org\r\nSubject: folded\r\nReferences:".to_vec();
    let mut i = 0;
    while m.len() < bytes {
        m.extend(format!(" <id{i:08}@flood.example>\r\n").bytes());
        i += 1;
    }
    m.extend(b"\r\nbody\r\n");
    m
}

/// Headers of 1 MiB, as many lines or one folded header: `552 5.3.4` and `header_too_large`,
/// refused as they arrive (the header is not kept); a header under the limit is accepted.
#[test]
fn one_mebibyte_headers() {
    let _one = serial();
    let g = Gate::start("");
    let baseline = good_client(g.port, GOOD_MESSAGES);
    eprintln!("[headers] good client without abuse: {baseline}");
    let mut c = Raw::connect(g.port);
    assert!(c.reply().starts_with("220"));
    assert!(c.cmd("EHLO abuser.example").starts_with("250"));
    // the default limit is 256 KiB: just under it is fine
    let under = big_header(250 * 1024);
    assert!(c.mail(&under).starts_with("250 2.0.0 Ok: queued as"));
    for (what, msg, reply) in [
        ("1 MiB of header lines", big_header(1 << 20), "552 5.3.4 Error: message header too big\r\n"),
        ("one header folded over 1 MiB", folded_header(1 << 20), "552 5.3.4 Error: too many header lines\r\n"),
    ] {
        let t = Instant::now();
        assert_eq!(c.mail(&msg), reply, "{what}");
        eprintln!("[headers] {what} ({} bytes): refused in {:?}; {}", msg.len(), t.elapsed(), mem(g.pid()));
    }
    let port = g.port;
    let refused = Arc::new(AtomicUsize::new(0));
    let counted = refused.clone();
    under_abuse("headers", port, &baseline, move |stop| {
        (0..ABUSERS)
            .map(|i| {
                let (stop, refused) = (stop.clone(), refused.clone());
                thread::spawn(move || {
                    let msg = if i % 2 == 0 { big_header(1 << 20) } else { folded_header(1 << 20) };
                    let mut c = Raw::connect(port);
                    assert!(c.reply().starts_with("220"));
                    assert!(c.cmd("EHLO abuser.example").starts_with("250"));
                    while !stop.load(Ordering::SeqCst) {
                        assert!(c.mail(&msg).starts_with("552 5.3.4"));
                        refused.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect()
    });
    let n = counted.load(Ordering::SeqCst);
    eprintln!("[headers] {n} messages with 1 MiB headers refused during the good client's run; {}", mem(g.pid()));
    assert_eq!(g.rejects("header_too_large").len(), n + 2);
    assert!(g.alive());
}

fn nested_multipart(depth: usize) -> Vec<u8> {
    let mut m = b"From: mallory@example.org\r\nSubject: deep\r\nMIME-Version: 1.0\r\n".to_vec();
    for i in 0..depth {
        m.extend(format!("Content-Type: multipart/mixed; boundary=\"b{i}\"\r\n\r\n--b{i}\r\n").bytes());
    }
    m.extend(b"Content-Type: text/plain\r\n\r\nhello\r\n");
    for i in (0..depth).rev() {
        m.extend(format!("--b{i}--\r\n").bytes());
    }
    m
}

fn nested_messages(depth: usize) -> Vec<u8> {
    let mut m = b"From: mallory@example.org\r\nSubject: deep\r\nMIME-Version: 1.0\r\n".to_vec();
    for i in 0..depth {
        m.extend(format!("Content-Type: message/rfc822\r\n\r\nSubject: level {i}\r\n").bytes());
    }
    m.extend(b"Content-Type: text/plain\r\n\r\nhello\r\n");
    m
}

/// MIME nested 10,000 deep (multiparts, attached messages): `554 5.6.0` and
/// `mime_too_complex`. Before the limit, attached messages nested that deep overflowed the
/// stack where mail-parser drops them and aborted the server.
#[test]
fn mime_nested_10000_deep() {
    let _one = serial();
    let g = Gate::start("");
    let baseline = good_client(g.port, GOOD_MESSAGES);
    eprintln!("[mime] good client without abuse: {baseline}");
    let mut c = Raw::connect(g.port);
    assert!(c.reply().starts_with("220"));
    assert!(c.cmd("EHLO abuser.example").starts_with("250"));
    assert!(c.mail(&nested_multipart(100)).starts_with("250 2.0.0 Ok: queued as"), "100 deep is within the limit");
    let many_parts = format!(
        "Subject: parts\r\nContent-Type: multipart/mixed; boundary=p\r\n\r\n{}--p--\r\n",
        "--p\r\n\r\nx\r\n".repeat(100_000)
    );
    for (what, msg, reply) in [
        ("multipart nested 10,000 deep", nested_multipart(10_000), "554 5.6.0 Error: MIME nesting too deep\r\n"),
        ("message/rfc822 nested 10,000 deep", nested_messages(10_000), "554 5.6.0 Error: MIME nesting too deep\r\n"),
        ("100,000 MIME parts", many_parts.into_bytes(), "554 5.6.0 Error: too many MIME parts\r\n"),
    ] {
        let t = Instant::now();
        assert_eq!(c.mail(&msg), reply, "{what}");
        eprintln!("[mime] {what} ({} bytes): refused in {:?}; {}", msg.len(), t.elapsed(), mem(g.pid()));
    }
    assert!(g.alive(), "the server survives");
    let port = g.port;
    let refused = Arc::new(AtomicUsize::new(0));
    let counted = refused.clone();
    under_abuse("mime", port, &baseline, move |stop| {
        (0..ABUSERS)
            .map(|i| {
                let (stop, refused) = (stop.clone(), refused.clone());
                thread::spawn(move || {
                    let msg = if i % 2 == 0 { nested_multipart(10_000) } else { nested_messages(10_000) };
                    let mut c = Raw::connect(port);
                    assert!(c.reply().starts_with("220"));
                    assert!(c.cmd("EHLO abuser.example").starts_with("250"));
                    while !stop.load(Ordering::SeqCst) {
                        assert!(c.mail(&msg).starts_with("554 5.6.0"));
                        refused.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect()
    });
    let n = counted.load(Ordering::SeqCst);
    eprintln!("[mime] {n} messages nested 10,000 deep refused during the good client's run; {}", mem(g.pid()));
    assert_eq!(g.rejects("mime_too_complex").len(), n + 3);
    assert!(g.alive());
}

/// A message of exactly `size` bytes as the size limit counts them (unstuffed, CRLFs
/// included, without the final `.`).
fn sized_message(size: usize) -> Vec<u8> {
    let mut m = b"From: mallory@example.org\r\nSubject: at the limit\r\n\r\n".to_vec();
    let line = format!("{}\r\n", "s".repeat(998));
    while m.len() + line.len() <= size {
        m.extend(line.as_bytes());
    }
    let left = size - m.len();
    if left >= 2 {
        m.extend(std::iter::repeat_n(b'e', left - 2));
        m.extend(b"\r\n");
    } else if left == 1 {
        // one byte short of a line: make the last full line one byte longer
        m.truncate(m.len() - 2);
        m.extend(b"e\r\n");
    }
    assert_eq!(m.len(), size);
    m
}

/// Messages at the size limit (25 MiB): exactly the limit is accepted, one byte more gets
/// `552 5.3.4` and `too_large`; four sessions sending at the limit at once keep memory to a
/// few copies of a message each, and the good client's latency.
#[test]
fn messages_at_the_size_limit() {
    let _one = serial();
    const LIMIT: usize = 26_214_400;
    let g = Gate::start(&format!("max_message_size = {LIMIT}\n"));
    let baseline = good_client(g.port, GOOD_MESSAGES);
    eprintln!("[size] good client without abuse: {baseline}");
    let before = mem(g.pid());
    let at = sized_message(LIMIT);
    let over = sized_message(LIMIT + 1);
    let mut c = Raw::connect(g.port);
    assert!(c.reply().starts_with("220"));
    assert!(c.cmd("EHLO big.example").starts_with("250"));
    let t = Instant::now();
    assert!(c.mail(&at).starts_with("250 2.0.0 Ok: queued as"), "exactly max_message_size is accepted");
    let took_at = t.elapsed();
    let one = mem(g.pid());
    let t = Instant::now();
    assert_eq!(c.mail(&over), "552 5.3.4 Error: message file too big\r\n");
    eprintln!(
        "[size] {LIMIT} bytes accepted in {took_at:?}, {} refused in {:?}; before: {before}; after: {}",
        LIMIT + 1,
        t.elapsed(),
        one
    );
    let entries = g.rejects("too_large");
    assert_eq!(entries.len(), 1);
    assert_eq!((entries[0]["code"].as_u64(), entries[0]["stage"].as_str()), (Some(552), Some("data")));

    let port = g.port;
    let at = Arc::new(at);
    let sent = Arc::new(AtomicUsize::new(0));
    let counted = sent.clone();
    under_abuse("size", port, &baseline, move |stop| {
        (0..4)
            .map(|_| {
                let (stop, at, sent) = (stop.clone(), at.clone(), sent.clone());
                thread::spawn(move || {
                    let mut c = Raw::connect(port);
                    assert!(c.reply().starts_with("220"));
                    assert!(c.cmd("EHLO big.example").starts_with("250"));
                    // one message each: every one is 25 MiB of disk (44 MiB in sled's log)
                    let r = c.mail(&at);
                    assert!(r.starts_with("250 2.0.0 Ok: "), "{r}");
                    sent.fetch_add(1, Ordering::SeqCst);
                    let _ = stop;
                })
            })
            .collect()
    });
    let after = mem(g.pid());
    let n = counted.load(Ordering::SeqCst);
    let peak = (after.hwm as f64 - before.rss as f64) / LIMIT as f64;
    eprintln!(
        "[size] {n} messages of {LIMIT} bytes from 4 sessions at once during the good client's run; {after}; peak growth {peak:.1} x the message size"
    );
    assert!(after.hwm < before.rss + 16 * LIMIT as u64, "peak {after} for 4 sessions at the limit");
}

/// A flood of bad commands from 20 clients reconnecting as fast as they can: each session gets
/// `421 4.7.0 … too many errors` after `max_errors` (10), the reject log has `bad_command` and
/// `too_many_errors`, and the good client keeps its latency.
#[test]
fn bad_command_flood() {
    let _one = serial();
    let g = Gate::start("");
    let baseline = good_client(g.port, GOOD_MESSAGES);
    eprintln!("[flood] good client without abuse: {baseline}");
    let port = g.port;
    let sessions = Arc::new(AtomicUsize::new(0));
    let counted = sessions.clone();
    under_abuse("flood", port, &baseline, move |stop| {
        (0..20)
            .map(|_| {
                let (stop, sessions) = (stop.clone(), sessions.clone());
                thread::spawn(move || {
                    // exactly max_errors lines: all read, so the server's close is a clean one
                    let garbage = "GARBAGE command\r\n".repeat(10);
                    while !stop.load(Ordering::SeqCst) {
                        let mut c = Raw::connect(port);
                        c.send(garbage.as_bytes());
                        let mut all = String::new();
                        let _ = c.r.read_to_string(&mut all);
                        let last = all.lines().last().unwrap_or_default();
                        assert!(last.starts_with("421 4.7.0 mx.test Error: too many errors"), "{all}");
                        assert_eq!(all.lines().count(), 1 + 10 + 1, "greeting, 10 errors, 421: {all}");
                        sessions.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect()
    });
    let n = counted.load(Ordering::SeqCst);
    eprintln!("[flood] {n} sessions of bad commands closed with 421 during the good client's run; {}", mem(g.pid()));
    let closed = g.rejects("too_many_errors");
    assert_eq!(closed.len(), n);
    assert!(closed.iter().all(|e| e["code"] == 421 && e["enhanced"] == "4.7.0"));
    assert_eq!(g.rejects("bad_command").len(), 10 * n);
}

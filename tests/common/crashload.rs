//! The load and the reconciliation of the durability tests (crash.rs: kill -9; powercut.rs:
//! a power cut under the spool, then kill -9): parallel sessions with numbered recipients and
//! unique Message-IDs, the server stopped at random points and restarted on the same spool.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use super::powercut::PowerCutFs;
use super::{Ports, Server, cli, json_values, message, receiver, stdout, write_config};

pub const SENDERS: usize = 8;
/// The target: no acknowledged message lost over at least 10 kill -9 cycles.
pub const CYCLES: usize = 10;

/// One sender: sends messages until told to stop or the connection dies; records the
/// Message-IDs that got 250.
pub fn sender(port: u16, n: usize, next: Arc<AtomicUsize>, stop: Arc<AtomicBool>, acked: Arc<Mutex<Vec<String>>>) {
    while !stop.load(Ordering::SeqCst) {
        let Ok(s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        let mut conn = RawConn::new(s);
        if !conn.expect("220") || !conn.send_expect("EHLO crash.test\r\n", "250 ") {
            continue;
        }
        while !stop.load(Ordering::SeqCst) {
            let seq = next.fetch_add(1, Ordering::SeqCst);
            let mid = format!("crash-{n}-{seq}@test");
            let rcpt = format!("incoming+n{seq}@localhost");
            let body = message(&mid, "crash", "");
            let cmds = format!("MAIL FROM:<a@example.org>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n");
            if !conn.send_expect(&cmds, "250") || !conn.expect("250") || !conn.expect("354") {
                break;
            }
            if !conn.send_expect(&format!("{body}.\r\n"), "250 2.0.0 Ok: queued") {
                break;
            }
            if let Ok(mut a) = acked.lock() {
                a.push(mid);
            }
        }
    }
}

pub struct RawConn {
    r: std::io::BufReader<std::net::TcpStream>,
    w: std::net::TcpStream,
}

impl RawConn {
    pub fn new(s: std::net::TcpStream) -> RawConn {
        let w = s.try_clone().expect("clone");
        RawConn { r: std::io::BufReader::new(s), w }
    }
    /// Reads one reply; true if its last line starts with `prefix`.
    pub fn expect(&mut self, prefix: &str) -> bool {
        use std::io::BufRead;
        loop {
            let mut line = String::new();
            match self.r.read_line(&mut line) {
                Ok(0) | Err(_) => return false,
                Ok(_) => {
                    if line.as_bytes().get(3) == Some(&b'-') {
                        continue;
                    }
                    return line.starts_with(prefix);
                }
            }
        }
    }
    pub fn send_expect(&mut self, data: &str, prefix: &str) -> bool {
        use std::io::Write;
        self.w.write_all(data.as_bytes()).is_ok() && self.expect(prefix)
    }
}

/// Numbered recipients: every key is accepted (routes = "any") and recorded on its job.
pub const MAILBOX: &str =
    "[[mailbox]]\nname = \"incoming\"\naddress = \"incoming+%{key}@localhost\"\nroutes = \"any\"\n";

/// How each cycle ends.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// kill -9 of the server: the page cache keeps every write.
    Kill9,
    /// A power cut under the spool (powercut.rs: every write no sync covered is lost), then
    /// kill -9 of the server.
    PowerCut,
}

/// A test's directory, ports and config; with [`Stop::PowerCut`] the spool is on a power-cut
/// mount (`<dir>/mnt` over `<dir>/disk`), mounted for each cycle and for the final checks.
pub struct Rig {
    /// First, so that it is dropped (unmounted) before the directory it is mounted in.
    fs: RefCell<Option<PowerCutFs>>,
    pub dir: tempfile::TempDir,
    pub ports: Ports,
    pub config: PathBuf,
    stop: Stop,
}

impl Rig {
    pub fn new(stop: Stop, extra: &str) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let ports = Ports::new();
        let config = write_config(dir.path(), &ports, "", extra);
        if stop == Stop::PowerCut {
            let (disk, mnt) = (dir.path().join("disk"), dir.path().join("mnt"));
            std::fs::create_dir_all(&disk).unwrap();
            std::fs::create_dir_all(&mnt).unwrap();
            let text = std::fs::read_to_string(&config).unwrap();
            let spool = dir.path().join("spool");
            let moved = text.replace(
                &format!("dir = \"{}\"", spool.display()),
                &format!("dir = \"{}\"", mnt.join("spool").display()),
            );
            assert_ne!(text, moved, "the config names its spool");
            std::fs::write(&config, moved).unwrap();
        }
        Rig { fs: RefCell::new(None), dir, ports, config, stop }
    }

    /// Before a server starts on the spool (or the CLI opens it): mounts it if needed.
    pub fn power_on(&self) {
        if self.stop == Stop::PowerCut && self.fs.borrow().is_none() {
            let (disk, mnt) = (self.dir.path().join("disk"), self.dir.path().join("mnt"));
            *self.fs.borrow_mut() = Some(PowerCutFs::mount(&disk, &mnt));
        }
    }

    /// Ends a cycle: the power cut first (so nothing written after it can be synced), then
    /// kill -9.
    pub fn stop(&self, server: &mut Server) {
        if let Some(mut fs) = self.fs.borrow_mut().take() {
            fs.cut();
        }
        server.kill9();
    }
}

/// Runs `CYCLES` cycles of load + a stop at a random point; calls `each_cycle(cycle)` before
/// each start. Returns the Message-IDs that got 250 and the times of the stops.
pub fn load_and_kill(rig: &Rig, mut each_cycle: impl FnMut(usize)) -> (Vec<String>, Vec<SystemTime>) {
    let (config, ports) = (&rig.config, &rig.ports);
    let acked = Arc::new(Mutex::new(Vec::new()));
    let next = Arc::new(AtomicUsize::new(0));
    let mut kills = Vec::new();
    let mut seed: u64 = std::process::id() as u64 ^ 0x9e37_79b9_7f4a_7c15;
    for cycle in 0..CYCLES {
        each_cycle(cycle);
        rig.power_on();
        let mut server = Server::start(config, ports.smtp, ports.http);
        let stop = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = (0..SENDERS)
            .map(|n| {
                let (next, stop, acked) = (next.clone(), stop.clone(), acked.clone());
                let port = ports.smtp;
                std::thread::spawn(move || sender(port, n, next, stop, acked))
            })
            .collect();
        // xorshift: a random kill point between 200 and 1200 ms
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(200 + seed % 1000));
        rig.stop(&mut server);
        kills.push(SystemTime::now());
        stop.store(true, Ordering::SeqCst);
        for t in threads {
            let _ = t.join();
        }
        eprintln!("cycle {cycle}: {} acknowledged so far", acked.lock().map(|a| a.len()).unwrap_or(0));
    }
    let acked = acked.lock().unwrap().clone();
    (acked, kills)
}

/// Every acknowledged message is in the spool exactly once, with its numbered recipient's
/// key. Returns the jobs.
pub fn reconcile(rig: &Rig, acked: &[String]) -> Vec<serde_json::Value> {
    // with the server stopped: the CLI opens the spool directly (and recovers it if the last
    // stop was a kill)
    rig.power_on();
    let config = &rig.config;
    let o = cli(config, &["queue", "list", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut counts: HashMap<String, usize> = HashMap::new();
    let jobs = json_values(&stdout(&o));
    for job in &jobs {
        let mid = job["message"]["message_id"].as_str().unwrap_or_default().to_string();
        let seq = mid.rsplit_once('-').and_then(|(_, s)| s.strip_suffix("@test")).unwrap_or_default();
        assert_eq!(job["key"].as_str(), Some(format!("n{seq}").as_str()), "the job carries its own recipient's key");
        *counts.entry(mid).or_default() += 1;
    }
    assert!(acked.len() > 50, "the load should have delivered something: {}", acked.len());
    let lost: Vec<&String> = acked.iter().filter(|m| !counts.contains_key(*m)).collect();
    let doubled: Vec<(&String, &usize)> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged messages lost, e.g. {:?}; what the server said about its spool at each start:\n{}\n\
         and the CLI that listed the jobs:\n{}",
        lost.len(),
        lost.first(),
        spool_log(config),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(doubled.is_empty(), "messages stored twice: {doubled:?}");
    eprintln!("{} acknowledged, {} stored, none lost", acked.len(), counts.len());
    jobs
}

/// The server log's lines about the spool's recovery, warnings and errors (the last 60).
pub fn spool_log(config: &Path) -> String {
    let log = std::fs::read_to_string(config.with_extension("log")).unwrap_or_default();
    let wanted = ["WARN", "ERROR", "restored", "removed", "ready again", "mailgate ready"];
    let lines: Vec<&str> = log.lines().filter(|l| wanted.iter().any(|w| l.contains(w))).collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

/// Load and stops, then every acknowledged message is in the spool exactly once; restarts
/// must have restored stores from the journal, or the test did not test that path.
pub fn intake_under(stop: Stop) {
    let rig = Rig::new(stop, MAILBOX);
    let (acked, _) = load_and_kill(&rig, |_| {});
    reconcile(&rig, &acked);
    let log = std::fs::read_to_string(rig.config.with_extension("log")).unwrap_or_default();
    let restored = log.matches("restored stored messages from the journal").count();
    eprintln!("{restored} of {CYCLES} restarts restored stores from the journal");
    assert!(restored > 0, "no restart replayed the journal");
}

/// Load and stops with webhook delivery on (the receiver answers 500 in odd cycles, so jobs
/// wait for retries and the reaper brings them back while the stops fall); then a clean
/// run until everything is delivered. Every acknowledged message is in the spool once, every
/// job is done and was delivered, and twice only when a stop fell between two deliveries.
pub fn delivery_under(stop: Stop) {
    let key = b"crash-test-webhook-key-0123456789";
    let receiver = receiver::Receiver::webhook(key);
    let keys = tempfile::tempdir().unwrap();
    let key_file = keys.path().join("hook.key");
    std::fs::write(&key_file, key).unwrap();
    let extra = format!(
        "{MAILBOX}\n[[deliver]]\nkind = \"webhook\"\nurl = \"{}\"\nsecret_file = \"{}\"\n\
         concurrency = 4\ntimeout = \"2s\"\nretry = [{}]\n",
        receiver.url("/hook"),
        key_file.display(),
        vec!["\"1s\""; 30].join(", ")
    );
    let rig = Rig::new(stop, &extra);
    let (acked, kills) = load_and_kill(&rig, |cycle| {
        receiver.set_mode(if cycle % 2 == 1 { receiver::Mode::Status(500) } else { receiver::Mode::Ok });
    });
    receiver.set_mode(receiver::Mode::Ok);
    rig.power_on();
    let mut server = Server::start(&rig.config, rig.ports.smtp, rig.ports.http);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let o = cli(&rig.config, &["queue", "stats", "--json"]);
        let stats: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        if stats["ready"] == 0 && stats["leased"] == 0 && stats["done"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "delivery did not finish: {stats}\n{}", server.log_text());
        std::thread::sleep(Duration::from_millis(200));
    }
    server.stop();
    let jobs = reconcile(&rig, &acked);

    let mut delivered: HashMap<String, Vec<SystemTime>> = HashMap::new();
    for r in receiver.requests().iter().filter(|r| r.ok() && r.status == 200) {
        delivered.entry(r.job_id().unwrap_or_default().to_string()).or_default().push(r.at);
    }
    let mut redelivered = 0;
    for job in &jobs {
        let id = job["id"].as_str().unwrap_or_default();
        assert_eq!(job["state"], "done", "job {id}: {job}");
        let times = delivered.get(id).unwrap_or_else(|| panic!("job {id} was never delivered"));
        for pair in times.windows(2) {
            let after_a_kill = kills.iter().any(|k| *k >= pair[0] && *k <= pair[1]);
            assert!(after_a_kill, "job {id} delivered twice with no stop in between: {pair:?}");
            redelivered += 1;
        }
    }
    let failed = receiver.requests().iter().filter(|r| r.status == 500).count();
    eprintln!(
        "{} jobs, {} deliveries, {redelivered} repeated after a stop between delivery and acknowledgement, \
         {failed} answered 500 (retried), {} stops",
        jobs.len(),
        delivered.values().map(Vec::len).sum::<usize>(),
        kills.len()
    );
}

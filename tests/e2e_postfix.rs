//! End to end behind a real, private Postfix (DESIGN.md modes A and B; issue 4 item 5): swaks
//! sends to Postfix, Postfix talks to mailgate (policy service + LMTP transport, or the
//! before-queue proxy), and the tests read mailgate's queue and reject log and Postfix's own log,
//! which must never show a bounce (`sender non-delivery notification`).
//!
//! Needs root, Postfix and swaks (`make e2e` installs them); run one at a time:
//! `cargo test --test e2e_postfix -- --test-threads=1`.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::dns::{DnsServer, Zone};
use common::postfix::{PostfixMode, PostfixSetup, PrivatePostfix, require_root};
use common::*;

/// Postfix's queue manager, LMTP client and log writer each take their time: be generous.
const WAIT: Duration = Duration::from_secs(60);
const RELAY_DOMAIN: &str = "mx.test";
/// swaks sends from this address where a test wants to tell the original client (as Postfix
/// saw it) from Postfix itself (127.0.0.1): only XFORWARD can carry it to mailgate.
const REMOTE_IP: &str = "127.0.0.3";

static SEQ: AtomicUsize = AtomicUsize::new(0);

fn good_rcpt() -> String {
    format!("incoming+{KEY}@{RELAY_DOMAIN}")
}

fn bad_rcpt() -> String {
    format!("incoming+not-a-key@{RELAY_DOMAIN}")
}

/// A Message-ID no other test (or run) uses, without the angle brackets.
fn message_id(tag: &str) -> String {
    let n = SEQ.fetch_add(1, Ordering::SeqCst);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("e2e-{tag}-{}-{n}-{nanos}@client.test", std::process::id())
}

// ---------------------------------------------------------------------------------------------
// mailgate

/// A running mailgate with smtp (in-session), lmtp (after-queue) and policy listeners.
struct Gate {
    server: Server,
    config: PathBuf,
    ports: Ports,
    /// `unix:` LMTP listener instead of TCP, when asked for.
    lmtp_socket: Option<PathBuf>,
}

impl Gate {
    /// `auth`: the `[auth]` section (empty: authentication off). `lmtp_unix`: the LMTP listener
    /// on a unix socket in `dir`.
    fn start(dir: &Path, auth: &str, lmtp_unix: bool) -> Gate {
        require_root();
        let ports = Ports::new();
        let lmtp_socket = lmtp_unix.then(|| dir.join("lmtp.sock"));
        let lmtp_address = match &lmtp_socket {
            Some(p) => format!("unix:{}", p.display()),
            None => format!("127.0.0.1:{}", ports.lmtp),
        };
        let listeners = format!(
            r#"
[[listen]]
protocol = "smtp"
address = "127.0.0.1:{smtp}"
mode = "in-session"
[[listen]]
protocol = "lmtp"
address = "{lmtp_address}"
mode = "after-queue"
[[listen]]
protocol = "policy"
address = "127.0.0.1:{policy}"
"#,
            smtp = ports.smtp,
            policy = ports.policy
        );
        let extra =
            format!("[[mailbox]]\nname = \"incoming\"\naddress = \"incoming+%{{key}}@{RELAY_DOMAIN}\"\n{auth}\n");
        let config = write_config(dir, &ports, &listeners, &extra);
        let server = Server::start(&config, ports.policy, ports.http);
        if let Some(sock) = &lmtp_socket {
            wait_for("the LMTP unix socket", Duration::from_secs(30), || sock.exists());
        }
        Gate { server, config, ports, lmtp_socket }
    }

    /// The LMTP next hop for Postfix's transport map.
    fn lmtp_nexthop(&self) -> String {
        match &self.lmtp_socket {
            Some(p) => format!("unix:{}", p.display()),
            None => format!("inet:127.0.0.1:{}", self.ports.lmtp),
        }
    }

    fn policy_service(&self) -> String {
        format!("inet:127.0.0.1:{}", self.ports.policy)
    }

    fn jobs(&self) -> Vec<serde_json::Value> {
        let o = cli(&self.config, &["queue", "list", "--json"]);
        assert!(o.status.success(), "queue list: {}", String::from_utf8_lossy(&o.stderr));
        json_values(&stdout(&o))
    }

    fn rejects(&self) -> Vec<serde_json::Value> {
        let o = cli(&self.config, &["rejects", "--json"]);
        assert!(o.status.success(), "rejects: {}", String::from_utf8_lossy(&o.stderr));
        json_values(&stdout(&o))
    }

    /// Waits until the reject log has an entry for which `pred` holds; returns it.
    fn wait_reject(&self, what: &str, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let all = self.rejects();
            if let Some(e) = all.iter().find(|e| pred(e)) {
                return e.clone();
            }
            if Instant::now() >= deadline {
                panic!("no reject-log entry {what}; log: {all:#?}\nmailgate log:\n{}", self.server.log_text());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------------
// Postfix

fn mode_a(dir: &Path, gate: &Gate, lmtp: String, extra_main_cf: Vec<String>) -> PrivatePostfix {
    PrivatePostfix::start(
        dir,
        PostfixSetup {
            smtp_port: free_port(),
            mode: PostfixMode::ModeA { lmtp, policy: Some(gate.policy_service()) },
            relay_domain: RELAY_DOMAIN.into(),
            extra_main_cf,
        },
    )
}

fn mode_b(dir: &Path, gate: &Gate, speed_adjust: bool) -> PrivatePostfix {
    PrivatePostfix::start(
        dir,
        PostfixSetup {
            smtp_port: free_port(),
            mode: PostfixMode::ModeB { filter: format!("127.0.0.1:{}", gate.ports.smtp), speed_adjust },
            relay_domain: RELAY_DOMAIN.into(),
            extra_main_cf: Vec::new(),
        },
    )
}

/// Postfix sent no bounce (and bounced nothing) and holds no mail any more.
fn assert_no_bounce(pf: &PrivatePostfix) {
    wait_for("Postfix's queue to drain", WAIT, || pf.queue_empty());
    let log = pf.log();
    assert!(!log.contains("sender non-delivery notification"), "Postfix sent a bounce:\n{log}");
    assert!(!log.contains("status=bounced"), "Postfix bounced a recipient:\n{log}");
    assert!(!log.contains("sender delivery status notification"), "Postfix sent a DSN:\n{log}");
}

/// The Postfix queue id in swaks' transcript (`250 2.0.0 Ok: queued as ID`).
fn postfix_queue_id(transcript: &str) -> String {
    transcript
        .lines()
        .filter(|l| l.starts_with("<-"))
        .find_map(|l| l.split_once("queued as ").map(|(_, id)| id.trim().to_string()))
        .unwrap_or_else(|| panic!("no `queued as` in swaks' transcript:\n{transcript}"))
}

/// Waits for Postfix's delivery-status line of `queue_id` to `rcpt` with `status`.
fn wait_status(pf: &PrivatePostfix, queue_id: &str, rcpt: &str, status: &str) -> String {
    pf.wait_log_all(&[&format!("{queue_id}: to=<{rcpt}>"), &format!("status={status}")], WAIT)
}

// ---------------------------------------------------------------------------------------------
// swaks

struct Sent {
    ok: bool,
    transcript: String,
}

/// One message through swaks to Postfix's port. `args` adds or overrides swaks options
/// (`--from`, `--to`, `--header`, `--local-interface`); the Message-Id is `mid`.
fn swaks(pf: &PrivatePostfix, mid: &str, args: &[&str]) -> Sent {
    let mut cmd = Command::new("swaks");
    cmd.args(["--server", &format!("127.0.0.1:{}", pf.smtp_port)])
        .args(["--helo", "client.test", "--timeout", "120"])
        .args(["--header", &format!("Message-Id: <{mid}>")]);
    if !args.contains(&"--from") {
        cmd.args(["--from", "alice@example.org"]);
    }
    if !args.contains(&"--to") {
        cmd.args(["--to", &good_rcpt()]);
    }
    cmd.args(args);
    let o = cmd.output().expect("run swaks (is it installed? `make e2e` installs it)");
    let transcript = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    Sent { ok: o.status.success(), transcript }
}

fn error_replies(s: &Sent) -> Vec<&str> {
    s.transcript.lines().filter(|l| l.starts_with("<**")).collect()
}

// ---------------------------------------------------------------------------------------------
// a. mode A: a valid key reaches the queue with the original client

#[test]
fn mode_a_valid_key_is_queued_with_the_original_client() {
    let dir = tempfile::tempdir().unwrap();
    let gate = Gate::start(dir.path(), "", false);
    let pf = mode_a(dir.path(), &gate, gate.lmtp_nexthop(), Vec::new());

    let mid = message_id("a");
    let sent = swaks(&pf, &mid, &["--local-interface", REMOTE_IP, "--header", "Subject: Re: the issue"]);
    assert!(sent.ok, "swaks:\n{}", sent.transcript);
    let qid = postfix_queue_id(&sent.transcript);
    let line = wait_status(&pf, &qid, &good_rcpt(), "sent");
    assert!(line.contains("relay=127.0.0.1[127.0.0.1]"), "{line}");
    assert!(line.contains("Ok: queued as"), "{line}");

    let jobs = gate.jobs();
    assert_eq!(jobs.len(), 1, "{jobs:#?}");
    let job = &jobs[0];
    assert_eq!(job["key"], KEY);
    assert_eq!(job["mailbox"], "incoming");
    assert_eq!(job["route"], "reply");
    assert_eq!(job["message"]["message_id"], mid.as_str());
    assert_eq!(job["message"]["subject"], "Re: the issue");
    let env = &job["envelope"];
    // the client Postfix saw, not Postfix itself: XFORWARD ADDR/HELO/IDENT/PROTO
    assert_eq!(env["client_ip"], REMOTE_IP, "{job:#}");
    assert_eq!(env["helo"], "client.test", "{job:#}");
    assert_eq!(env["queue_id"], qid.as_str(), "{job:#}");
    assert_eq!(env["protocol"], "ESMTP", "{job:#}");
    assert_eq!(env["mail_from"], "alice@example.org");
    assert_eq!(env["rcpt_to"], serde_json::json!([good_rcpt()]));
    // Postfix's status line names the job mailgate stored
    let id = job["id"].as_str().unwrap();
    assert!(line.contains(id), "status line {line} names job {id}");
    assert!(gate.rejects().is_empty(), "{:#?}", gate.rejects());
    assert_no_bounce(&pf);
}

// ---------------------------------------------------------------------------------------------
// b. mode A: an unknown key is refused at RCPT by the policy service

#[test]
fn mode_a_unknown_key_is_refused_at_rcpt_without_bounce() {
    let dir = tempfile::tempdir().unwrap();
    let gate = Gate::start(dir.path(), "", false);
    let pf = mode_a(dir.path(), &gate, gate.lmtp_nexthop(), Vec::new());

    let mid = message_id("b");
    let sent = swaks(&pf, &mid, &["--to", &bad_rcpt()]);
    assert!(!sent.ok, "swaks should fail:\n{}", sent.transcript);
    let errors = error_replies(&sent);
    assert!(errors.iter().any(|l| l.starts_with("<** 550 5.1.1") && l.contains(&bad_rcpt())), "{}", sent.transcript);
    let line = pf.wait_log_all(&["NOQUEUE: reject: RCPT from", &format!("to=<{}>", bad_rcpt())], WAIT);
    assert!(line.contains("550 5.1.1"), "{line}");
    // an unknown address in the domain too
    let sent = swaks(&pf, &message_id("b2"), &["--to", &format!("someone@{RELAY_DOMAIN}")]);
    assert!(error_replies(&sent).iter().any(|l| l.starts_with("<** 550 5.1.1")), "{}", sent.transcript);
    pf.wait_log_all(&["NOQUEUE: reject: RCPT from", &format!("to=<someone@{RELAY_DOMAIN}>")], WAIT);

    let e = gate.wait_reject("unknown_key", |e| e["reason"] == "unknown_key");
    assert_eq!(e["listener"], "policy");
    assert_eq!(e["stage"], "rcpt");
    assert_eq!(e["action"], "reject");
    assert_eq!(e["code"], 550);
    assert_eq!(e["enhanced"], "5.1.1");
    assert_eq!(e["client_ip"], "127.0.0.1");
    assert_eq!(e["helo"], "client.test");
    assert_eq!(e["mail_from"], "alice@example.org");
    assert_eq!(e["rcpt_to"], serde_json::json!([bad_rcpt()]));
    let e = gate.wait_reject("unknown_address", |e| e["reason"] == "unknown_address");
    assert_eq!(e["listener"], "policy");

    pf.wait_line("for both sessions' ends", WAIT, |l| l.contains("disconnect from") && l.contains("rcpt=0/1"));
    assert!(gate.jobs().is_empty(), "{:#?}", gate.jobs());
    assert_no_bounce(&pf);
}

// ---------------------------------------------------------------------------------------------
// c. mode A: an SPF failure is refused at RCPT by the policy service

#[test]
fn mode_a_spf_failure_is_refused_at_rcpt_without_bounce() {
    let dir = tempfile::tempdir().unwrap();
    let mut zone = Zone::default();
    zone.txt("fail.test", "v=spf1 -all").txt("good.test", "v=spf1 ip4:127.0.0.1 -all");
    let dns = DnsServer::start(zone);
    let auth = format!(
        "[auth]\nnameservers = [\"{}\"]\ntimeout = \"2s\"\nspf = \"reject-fail\"\ndkim = \"off\"\ndmarc = \"off\"\n",
        dns.addr()
    );
    let gate = Gate::start(dir.path(), &auth, false);
    let pf = mode_a(dir.path(), &gate, gate.lmtp_nexthop(), Vec::new());

    let sent = swaks(&pf, &message_id("c"), &["--from", "a@fail.test"]);
    assert!(!sent.ok, "swaks should fail:\n{}", sent.transcript);
    assert!(error_replies(&sent).iter().any(|l| l.starts_with("<** 550 5.7.23")), "{}", sent.transcript);
    let line = pf.wait_log_all(&["NOQUEUE: reject: RCPT from", "from=<a@fail.test>"], WAIT);
    assert!(line.contains("550 5.7.23"), "{line}");
    let e = gate.wait_reject("spf_fail", |e| e["reason"] == "spf_fail");
    assert_eq!(e["listener"], "policy");
    assert_eq!(e["stage"], "rcpt");
    assert_eq!(e["code"], 550);
    assert_eq!(e["enhanced"], "5.7.23");
    assert_eq!(e["mail_from"], "a@fail.test");

    // the same path lets a sender whose SPF passes through
    let mid = message_id("c-pass");
    let sent = swaks(&pf, &mid, &["--from", "alice@good.test"]);
    assert!(sent.ok, "swaks:\n{}", sent.transcript);
    let qid = postfix_queue_id(&sent.transcript);
    wait_status(&pf, &qid, &good_rcpt(), "sent");
    let jobs = gate.jobs();
    assert_eq!(jobs.len(), 1, "{jobs:#?}");
    assert_eq!(jobs[0]["message"]["message_id"], mid.as_str());
    assert_eq!(jobs[0]["auth"]["spf"], "pass", "{:#}", jobs[0]);
    assert!(dns.queries() > 0);
    assert_no_bounce(&pf);
}

// ---------------------------------------------------------------------------------------------
// d. mode A: one message to a good and a bad key

#[test]
fn mode_a_good_and_bad_key_in_one_message() {
    let dir = tempfile::tempdir().unwrap();
    let gate = Gate::start(dir.path(), "", false);
    let pf = mode_a(dir.path(), &gate, gate.lmtp_nexthop(), Vec::new());

    let mid = message_id("d");
    let to = format!("{},{}", good_rcpt(), bad_rcpt());
    let sent = swaks(&pf, &mid, &["--to", &to]);
    let errors = error_replies(&sent);
    assert_eq!(errors.len(), 1, "only the bad key is refused:\n{}", sent.transcript);
    assert!(errors[0].starts_with("<** 550 5.1.1") && errors[0].contains(&bad_rcpt()), "{}", sent.transcript);
    let qid = postfix_queue_id(&sent.transcript);
    wait_status(&pf, &qid, &good_rcpt(), "sent");
    // the first recipient already opened a queue file, so Postfix names it instead of NOQUEUE
    let line = pf.wait_log_all(&[&format!("{qid}: reject: RCPT from"), &format!("to=<{}>", bad_rcpt())], WAIT);
    assert!(line.contains("550 5.1.1"), "{line}");

    let jobs = gate.jobs();
    assert_eq!(jobs.len(), 1, "{jobs:#?}");
    assert_eq!(jobs[0]["key"], KEY);
    assert_eq!(jobs[0]["message"]["message_id"], mid.as_str());
    assert_eq!(jobs[0]["envelope"]["rcpt_to"], serde_json::json!([good_rcpt()]));
    let e = gate.wait_reject("unknown_key", |e| e["reason"] == "unknown_key");
    assert_eq!(e["listener"], "policy");
    assert_eq!(e["rcpt_to"], serde_json::json!([bad_rcpt()]));
    assert!(!pf.log().contains(&format!("{qid}: to=<{}>", bad_rcpt())), "the bad key never entered the queue");
    assert_no_bounce(&pf);
}

// ---------------------------------------------------------------------------------------------
// e. mode A (LMTP over a unix socket): an auto-reply is discarded, not bounced

#[test]
fn mode_a_auto_reply_is_discarded_without_bounce() {
    let dir = tempfile::tempdir().unwrap();
    let gate = Gate::start(dir.path(), "", true);
    let pf = mode_a(dir.path(), &gate, gate.lmtp_nexthop(), Vec::new());

    let mid = message_id("e");
    let sent = swaks(&pf, &mid, &["--header", "Auto-Submitted: auto-replied", "--header", "Subject: Out of office"]);
    assert!(sent.ok, "Postfix accepts it (the policy service sees no headers):\n{}", sent.transcript);
    let qid = postfix_queue_id(&sent.transcript);
    let line = wait_status(&pf, &qid, &good_rcpt(), "sent");
    assert!(line.contains("lmtp.sock"), "delivered over the unix socket: {line}");

    let e = gate.wait_reject("auto_submitted", |e| e["reason"] == "auto_submitted");
    assert_eq!(e["action"], "discard");
    assert_eq!(e["message_id"], mid.as_str());
    assert_eq!(e["listener"], "lmtp");
    assert_eq!(e["client_ip"], "127.0.0.1");
    assert!(gate.jobs().is_empty(), "{:#?}", gate.jobs());
    assert_no_bounce(&pf);
}

// ---------------------------------------------------------------------------------------------
// f. mode A: a timeout after the dot; Postfix redelivers; still one job

/// A TCP proxy that forwards both ways but, on its first connection, holds back the server's
/// replies once the client has sent the end of DATA (`\r\n.\r\n`) for `delay`.
struct StallProxy {
    port: u16,
    stop: Arc<AtomicBool>,
    connections: Arc<AtomicUsize>,
    stalled: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl StallProxy {
    fn start(target: u16, delay: Duration) -> StallProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(AtomicUsize::new(0));
        let stalled = Arc::new(AtomicBool::new(false));
        let (stop2, conns2, stalled2) = (stop.clone(), connections.clone(), stalled.clone());
        let thread = std::thread::spawn(move || {
            let mut workers = Vec::new();
            while !stop2.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let n = conns2.fetch_add(1, Ordering::SeqCst);
                        let stall = (n == 0).then_some(delay);
                        workers.extend(proxy_connection(client, target, stall, stalled2.clone(), stop2.clone()));
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(20)),
                    Err(_) => break,
                }
            }
            for w in workers {
                let _ = w.join();
            }
        });
        StallProxy { port, stop, connections, stalled, thread: Some(thread) }
    }
}

impl Drop for StallProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Two forwarding threads for one connection; `stall`: hold the replies after the dot.
fn proxy_connection(
    client: TcpStream,
    target: u16,
    stall: Option<Duration>,
    stalled: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) -> Vec<JoinHandle<()>> {
    let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
        let _ = client.shutdown(Shutdown::Both);
        return Vec::new();
    };
    let _ = client.set_nonblocking(false);
    for s in [&client, &server] {
        s.set_read_timeout(Some(Duration::from_millis(100))).expect("read timeout");
    }
    let dot_at: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let (c_in, c_out) = (client.try_clone().unwrap(), client);
    let (s_in, s_out) = (server.try_clone().unwrap(), server);
    let (dot1, stop1) = (dot_at.clone(), stop.clone());
    // client -> server: watch for the end of DATA
    let up = std::thread::spawn(move || {
        let (mut from, mut to) = (c_in, s_out);
        let mut tail: Vec<u8> = Vec::new();
        let mut buf = [0u8; 16384];
        while !stop1.load(Ordering::SeqCst) {
            let n = match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
                Err(_) => break,
            };
            if stall.is_some() {
                tail.extend_from_slice(&buf[..n]);
                if tail.windows(5).any(|w| w == b"\r\n.\r\n") {
                    dot1.lock().unwrap().get_or_insert_with(Instant::now);
                }
                let keep = tail.len().saturating_sub(4);
                tail.drain(..keep);
            }
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
    // server -> client: hold replies back once the dot went by
    let down = std::thread::spawn(move || {
        let (mut from, mut to) = (s_in, c_out);
        let mut buf = [0u8; 16384];
        while !stop.load(Ordering::SeqCst) {
            let n = match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
                Err(_) => break,
            };
            if let (Some(delay), Some(at)) = (stall, *dot_at.lock().unwrap()) {
                stalled.store(true, Ordering::SeqCst);
                let until = at + delay;
                while Instant::now() < until && !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
    vec![up, down]
}

#[test]
fn mode_a_lmtp_timeout_after_the_dot_is_redelivered_once() {
    let dir = tempfile::tempdir().unwrap();
    let gate = Gate::start(dir.path(), "", false);
    // Postfix gives up on the reply to the dot after 2 s; the proxy holds it back for 6 s
    let proxy = StallProxy::start(gate.ports.lmtp, Duration::from_secs(6));
    let pf =
        mode_a(dir.path(), &gate, format!("inet:127.0.0.1:{}", proxy.port), vec!["lmtp_data_done_timeout = 2s".into()]);

    let mid = message_id("f");
    let sent = swaks(&pf, &mid, &[]);
    assert!(sent.ok, "swaks:\n{}", sent.transcript);
    let qid = postfix_queue_id(&sent.transcript);
    let line = wait_status(&pf, &qid, &good_rcpt(), "deferred");
    assert!(line.contains("timed out"), "{line}");
    assert!(proxy.stalled.load(Ordering::SeqCst), "the proxy held the reply to the dot back");
    // mailgate stored the message before it answered the dot
    wait_for("the job of the first attempt", WAIT, || gate.jobs().len() == 1);

    // retry now, as often as it takes (the first flush may come before the deferral settles)
    let deadline = Instant::now() + WAIT;
    let sent_line = loop {
        pf.flush();
        let poll_until = Instant::now() + Duration::from_secs(3);
        let found = loop {
            let log = pf.log();
            let hit = log
                .lines()
                .find(|l| l.contains(&format!("{qid}: to=<{}>", good_rcpt())) && l.contains("status=sent"))
                .map(str::to_string);
            if hit.is_some() || Instant::now() >= poll_until {
                break hit;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        if let Some(l) = found {
            break l;
        }
        assert!(Instant::now() < deadline, "Postfix did not redeliver after flush:\n{}", pf.diagnostics());
    };
    assert!(sent_line.contains("duplicate of"), "the redelivery is recognised: {sent_line}");
    assert!(proxy.connections.load(Ordering::SeqCst) >= 2, "redelivered on a new connection");

    let jobs = gate.jobs();
    assert_eq!(jobs.len(), 1, "exactly one job: {jobs:#?}");
    assert_eq!(jobs[0]["message"]["message_id"], mid.as_str());
    assert_eq!(jobs[0]["envelope"]["queue_id"], qid.as_str());
    let id = jobs[0]["id"].as_str().unwrap();
    assert!(sent_line.contains(id), "{sent_line} names job {id}");
    let e = gate.wait_reject("duplicate", |e| e["reason"] == "duplicate");
    assert_eq!(e["action"], "discard");
    assert_eq!(e["message_id"], mid.as_str());
    assert_no_bounce(&pf);
    drop(pf);
    drop(proxy);
}

// ---------------------------------------------------------------------------------------------
// g, h. mode B: the before-queue proxy

/// Zone for mode B: good.test and other.test both pass SPF from REMOTE_IP (only if XFORWARD
/// carried it: Postfix itself connects from 127.0.0.1); strict.test publishes p=reject.
fn mode_b_zone() -> Zone {
    let mut z = Zone::default();
    z.txt("good.test", &format!("v=spf1 ip4:{REMOTE_IP} -all"))
        .txt("_dmarc.good.test", "v=DMARC1; p=reject")
        .txt("other.test", &format!("v=spf1 ip4:{REMOTE_IP} -all"))
        .txt("_dmarc.strict.test", "v=DMARC1; p=reject");
    z
}

fn mode_b_auth(dns: &DnsServer) -> String {
    format!(
        "[auth]\nnameservers = [\"{}\"]\ntimeout = \"2s\"\nspf = \"reject-fail\"\ndkim = \"record\"\ndmarc = \"enforce\"\n",
        dns.addr()
    )
}

/// A valid message through the proxy: Postfix queues nothing, mailgate has the job.
fn mode_b_valid_message_is_accepted(pf: &PrivatePostfix, gate: &Gate) {
    let before = gate.jobs().len();
    let mid = message_id("b-valid");
    let sent = swaks(
        pf,
        &mid,
        &["--local-interface", REMOTE_IP, "--from", "alice@good.test", "--header", "From: Alice <alice@good.test>"],
    );
    assert!(sent.ok, "swaks:\n{}", sent.transcript);
    assert!(
        sent.transcript.lines().any(|l| l.starts_with("<-  250 2.0.0 Ok: queued as")),
        "mailgate's own reply reaches the client:\n{}",
        sent.transcript
    );
    let line = pf.wait_log_all(&["proxy-accept", "END-OF-MESSAGE", "from=<alice@good.test>"], WAIT);
    // nothing enters Postfix's queue: no queue id on the line, no queue file for the message
    assert!(line.contains("]: proxy-accept: "), "{line}");
    assert!(pf.log().contains(&format!("NOQUEUE: client=unknown[{REMOTE_IP}]")), "{}", pf.log());
    assert!(!pf.log().contains(&format!("message-id=<{mid}>")), "Postfix's cleanup saw the message:\n{}", pf.log());
    let jobs = gate.jobs();
    assert_eq!(jobs.len(), before + 1, "{jobs:#?}");
    let job = jobs.iter().find(|j| j["message"]["message_id"] == mid.as_str()).expect("the job");
    assert_eq!(job["envelope"]["client_ip"], REMOTE_IP, "{job:#}");
    assert_eq!(job["envelope"]["helo"], "client.test", "{job:#}");
    assert_eq!(job["auth"]["spf"], "pass", "{job:#}");
    assert_eq!(job["auth"]["dmarc"], "pass", "{job:#}");
    assert!(line.contains(job["id"].as_str().unwrap()), "{line}");
}

/// A spoof of strict.test (p=reject) from other.test: SPF passes but is not aligned, no DKIM.
fn mode_b_dmarc_spoof_is_refused(pf: &PrivatePostfix, gate: &Gate) {
    let before = gate.jobs().len();
    let mid = message_id("b-spoof");
    let sent = swaks(
        pf,
        &mid,
        &["--local-interface", REMOTE_IP, "--from", "x@other.test", "--header", "From: The CEO <ceo@strict.test>"],
    );
    assert!(!sent.ok, "swaks should fail:\n{}", sent.transcript);
    let errors = error_replies(&sent);
    assert_eq!(errors.len(), 1, "{}", sent.transcript);
    assert!(errors[0].starts_with("<** 550 5.7.1"), "refused at the end of DATA:\n{}", sent.transcript);
    let dot = sent.transcript.find("\n -> .\n").expect("the dot was sent");
    assert!(sent.transcript.find("<** 550 5.7.1").unwrap() > dot, "after the dot:\n{}", sent.transcript);
    let line = pf.wait_log_all(&["proxy-reject", "END-OF-MESSAGE", "from=<x@other.test>"], WAIT);
    assert!(line.contains("550 5.7.1"), "{line}");
    let e = gate.wait_reject("dmarc_fail", |e| e["reason"] == "dmarc_fail" && e["message_id"] == mid.as_str());
    assert_eq!(e["listener"], "smtp");
    assert_eq!(e["stage"], "data");
    assert_eq!(e["action"], "reject");
    assert_eq!(e["client_ip"], REMOTE_IP);
    assert_eq!(gate.jobs().len(), before, "no job for the spoof");
}

#[test]
fn mode_b_dmarc_spoof_refused_in_session_and_valid_mail_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let dns = DnsServer::start(mode_b_zone());
    let gate = Gate::start(dir.path(), &mode_b_auth(&dns), false);
    let pf = mode_b(dir.path(), &gate, false);

    mode_b_dmarc_spoof_is_refused(&pf, &gate);
    mode_b_valid_message_is_accepted(&pf, &gate);
    assert_eq!(gate.jobs().len(), 1);
    assert_no_bounce(&pf);
}

#[test]
fn mode_b_speed_adjust_accepts_valid_mail() {
    let dir = tempfile::tempdir().unwrap();
    let dns = DnsServer::start(mode_b_zone());
    let gate = Gate::start(dir.path(), &mode_b_auth(&dns), false);
    let pf = mode_b(dir.path(), &gate, true);

    mode_b_valid_message_is_accepted(&pf, &gate);
    mode_b_dmarc_spoof_is_refused(&pf, &gate);
    assert_eq!(gate.jobs().len(), 1);
    assert_no_bounce(&pf);
}

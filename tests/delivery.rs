//! Push delivery end to end: a real `mailgate serve` with `[[deliver]]` workers, an in-process
//! HTTP receiver that checks requests the way GitLab (mail_room postback) or a webhook consumer
//! does, and a real `redis-server` for Sidekiq. Retries, dead letters, bulk retry, retention,
//! restarts in the middle of deliveries, and the metrics they leave behind.

mod common;

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine;
use common::receiver::{self, Mode, Receiver, Recorded, Verified, http_get, http_post};
use common::redis::RedisServer;
use common::*;
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// The longest any single wait in these tests may take.
const WAIT: Duration = Duration::from_secs(40);
const MAILROOM_PATH: &str = "/api/v4/internal/mail_room/incoming_email";
const HOOK_PATH: &str = "/hooks/mail";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The 32-byte mail_room secret of these tests.
fn mailroom_secret() -> Vec<u8> {
    (0u8..32).map(|i| i.wrapping_mul(37).wrapping_add(11)).collect()
}

/// The webhook HMAC key of these tests (the file holds it plus one newline).
const HOOK_KEY: &[u8] = b"whsec test key \x01\x02 with spaces";

/// A running mailgate with its temporary directory.
struct Env {
    _dir: tempfile::TempDir,
    ports: Ports,
    config: PathBuf,
    server: Server,
}

impl Env {
    /// `extra`: TOML appended to the standard config (mailboxes, `[[deliver]]`, ...);
    /// `spool`: lines added to its `[spool]` table (e.g. `retention = "1s"`).
    fn start(extra: impl Fn(&Path) -> String, spool: &str) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let extra = extra(dir.path());
        let mut failures = Vec::new();
        for _ in 0..5 {
            let ports = receiver::quiet_ports();
            let config = write_config(dir.path(), &ports, "", &extra);
            if !spool.is_empty() {
                let text = std::fs::read_to_string(&config).unwrap();
                assert!(text.contains("\n[spool]\n"), "{text}");
                let text = text.replacen("\n[spool]\n", &format!("\n[spool]\n{spool}\n"), 1);
                std::fs::write(&config, text).unwrap();
            }
            match spawn_server(&config, &ports) {
                Ok(server) => return Env { _dir: dir, ports, config, server },
                // a port taken since it was picked: pick others
                Err(log) if log.contains("Address already in use") => failures.push(log),
                Err(log) => panic!("mailgate did not start; log:\n{log}"),
            }
        }
        panic!("mailgate did not start on five sets of ports:\n{}", failures.join("\n"));
    }

    /// Starts the server again on the same config and ports.
    fn restart(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match spawn_server(&self.config, &self.ports) {
                Ok(server) => {
                    self.server = server;
                    return;
                }
                Err(log) if log.contains("Address already in use") && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200))
                }
                Err(log) => panic!("mailgate did not start again; log:\n{log}"),
            }
        }
    }

    fn log_tail(&self) -> String {
        let log = self.server.log_text();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    /// Sends one message over SMTP; returns the job id from the 250 reply.
    fn send(&self, rcpt: &str, message_id: &str) -> String {
        send_to(self.ports.smtp, rcpt, message_id)
    }

    /// The job (GET /v1/jobs/{id}); `None` on 404.
    fn job(&self, id: &str) -> Option<Value> {
        let r = http_get(self.ports.http, &format!("/v1/jobs/{id}"));
        match r.status {
            200 => Some(r.json()),
            404 => None,
            s => panic!("GET /v1/jobs/{id}: {s} {}", r.text()),
        }
    }

    /// The stored message (GET /v1/jobs/{id}/raw).
    fn raw(&self, id: &str) -> Vec<u8> {
        let r = http_get(self.ports.http, &format!("/v1/jobs/{id}/raw"));
        assert_eq!(r.status, 200, "GET /v1/jobs/{id}/raw: {}", r.text());
        r.body
    }

    /// Polls the job until `pred` holds; panics after WAIT with what it saw.
    fn wait_job(&self, id: &str, what: &str, rx: Option<&Receiver>, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        let mut last = None;
        loop {
            if let Some(job) = self.job(id) {
                if pred(&job) {
                    return job;
                }
                last = Some(job);
            }
            if Instant::now() > deadline {
                panic!(
                    "job {id}: not {what} within {WAIT:?}; last seen:\n{}\nreceiver:\n{}\nserver log:\n{}",
                    last.map(|j| serde_json::to_string_pretty(&j).unwrap()).unwrap_or_else(|| "404".into()),
                    rx.map(|r| r.summary()).unwrap_or_default(),
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_state(&self, id: &str, state: &str, rx: Option<&Receiver>) -> Value {
        self.wait_job(id, state, rx, |j| j["state"] == state)
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        cli(&self.config, args)
    }

    /// `queue retry --all [...]` -> N of `{"retried": N}`.
    fn cli_retry_all(&self, mailbox: Option<&str>) -> u64 {
        let mut args = vec!["queue", "retry", "--all"];
        if let Some(m) = mailbox {
            args.extend(["--mailbox", m]);
        }
        let o = self.cli(&args);
        assert!(o.status.success(), "{args:?}: {}{}", stdout(&o), String::from_utf8_lossy(&o.stderr));
        let v: Value = serde_json::from_str(stdout(&o).trim())
            .unwrap_or_else(|e| panic!("{args:?} printed no JSON ({e}): {}", stdout(&o)));
        v["retried"].as_u64().unwrap_or_else(|| panic!("{args:?}: {v}"))
    }

    fn metrics(&self) -> String {
        let r = http_get(self.ports.http, "/metrics");
        assert_eq!(r.status, 200, "GET /metrics: {}", r.text());
        r.text()
    }
}

/// Like `Server::start`, but notices a server that exits (e.g. on a port in use) at once:
/// `Err(its log)`.
fn spawn_server(config: &Path, ports: &Ports) -> Result<Server, String> {
    let log = config.with_extension("log");
    let logfile = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("log file");
    let from = logfile.metadata().map(|m| m.len()).unwrap_or(0) as usize;
    let child = std::process::Command::new(bin())
        .args(["serve", "--config"])
        .arg(config)
        .env("MAILGATE_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(logfile)
        .spawn()
        .expect("spawn mailgate");
    let mut server = Server { child: Some(child), config: config.to_path_buf(), log, ports_http: ports.http };
    let since_start = |s: &Server| s.log_text().get(from..).unwrap_or_default().to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if std::net::TcpStream::connect(("127.0.0.1", ports.smtp)).is_ok()
            && std::net::TcpStream::connect(("127.0.0.1", ports.http)).is_ok()
        {
            return Ok(server);
        }
        if let Some(Ok(Some(status))) = server.child.as_mut().map(|c| c.try_wait()) {
            server.child = None;
            return Err(format!("(exited: {status})\n{}", since_start(&server)));
        }
        if Instant::now() > deadline {
            return Err(format!("(not listening after 30 s)\n{}", since_start(&server)));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn send_to(port: u16, rcpt: &str, message_id: &str) -> String {
    let mut c = Client::connect(port);
    assert!(c.cmd("EHLO client.example.org").starts_with("250"));
    let r = c.send_mail("alice@example.org", &[rcpt], &message(message_id, "delivery test", ""));
    assert!(r.starts_with("250 2.0.0 Ok: queued as "), "{r}");
    c.cmd("QUIT");
    r.rsplit(' ').next().unwrap().to_string()
}

fn rcpt() -> String {
    format!("incoming+{KEY}@localhost")
}

/// A secret file in `dir`.
fn secret_file(dir: &Path, name: &str, content: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p
}

fn mailroom_secret_file(dir: &Path) -> PathBuf {
    secret_file(dir, "mailroom_secret", format!("{}\n", b64(&mailroom_secret())).as_bytes())
}

fn hook_secret_file(dir: &Path) -> PathBuf {
    let mut content = HOOK_KEY.to_vec();
    content.push(b'\n');
    secret_file(dir, "hook_secret", &content)
}

fn mailroom_toml(dir: &Path, url: &str, timeout: &str, retry: &str) -> String {
    format!(
        r#"
[[deliver]]
name = "gitlab"
kind = "mailroom"
mailboxes = ["incoming"]
url = "{url}"
secret_file = "{secret}"
concurrency = 2
timeout = "{timeout}"
retry = {retry}
"#,
        secret = mailroom_secret_file(dir).display()
    )
}

fn webhook_toml(dir: &Path, url: &str, timeout: &str, retry: &str) -> String {
    format!(
        r#"
[[deliver]]
name = "hook"
kind = "webhook"
url = "{url}"
secret_file = "{secret}"
concurrency = 2
timeout = "{timeout}"
retry = {retry}
"#,
        secret = hook_secret_file(dir).display()
    )
}

const MANY_RETRIES: &str = r#"["1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s"]"#;

fn requests_for<'a>(rx: &'a [Recorded], id: &str) -> Vec<&'a Recorded> {
    rx.iter().filter(|r| r.job_id() == Some(id)).collect()
}

fn unix_now() -> i64 {
    receiver::unix_now()
}

fn rfc3339(v: &Value) -> OffsetDateTime {
    let s = v.as_str().unwrap_or_else(|| panic!("not a string: {v}"));
    OffsetDateTime::parse(s, &Rfc3339).unwrap_or_else(|e| panic!("{s:?} is not RFC 3339: {e}"))
}

fn error_text(job: &Value) -> String {
    job["last_error"].as_str().unwrap_or_else(|| panic!("no last_error in {job}")).to_string()
}

// ---------------------------------------------------------------------------------------------
// The harness itself
// ---------------------------------------------------------------------------------------------

fn post(port: u16, path: &str, headers: &[(&str, &str)], body: &[u8]) -> u16 {
    receiver::http("POST", port, path, headers, body).expect("receiver answers").status
}

#[test]
fn harness_receiver_checks_mailroom_jwts_like_gitlab() {
    let secret = mailroom_secret();
    let rx = Receiver::mailroom(&secret);
    let now = unix_now();
    let h = "Gitlab-Mailroom-Api-Request";
    let ok = receiver::mailroom_token(&secret, "gitlab-mailroom", now);
    assert_eq!(post(rx.port, MAILROOM_PATH, &[(h, &ok), ("Content-Type", "text/plain")], b"raw"), 200);
    let r = &rx.requests()[0];
    match &r.verified {
        Ok(Verified::Mailroom { alg, claims }) => {
            assert_eq!(alg, "HS256");
            assert_eq!(claims["iss"], "gitlab-mailroom");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(r.body, b"raw");
    assert_eq!(r.header("content-type"), Some("text/plain"));
    assert_eq!(r.path, MAILROOM_PATH);

    // 4 minutes old is fine, 6 minutes is not; wrong issuer, wrong secret, other algorithm,
    // no header: 401 as GitLab answers
    let older = receiver::mailroom_token(&secret, "gitlab-mailroom", now - 240);
    assert_eq!(post(rx.port, MAILROOM_PATH, &[(h, &older)], b"x"), 200);
    let stale = receiver::mailroom_token(&secret, "gitlab-mailroom", now - 360);
    assert_eq!(post(rx.port, MAILROOM_PATH, &[(h, &stale)], b"x"), 401);
    let issuer = receiver::mailroom_token(&secret, "mail_room", now);
    assert_eq!(post(rx.port, MAILROOM_PATH, &[(h, &issuer)], b"x"), 401);
    let other_secret = receiver::mailroom_token(&[7u8; 32], "gitlab-mailroom", now);
    assert_eq!(post(rx.port, MAILROOM_PATH, &[(h, &other_secret)], b"x"), 401);
    let claims = serde_json::json!({"nonce": "0123456789abcdef01234567", "iat": now, "iss": "gitlab-mailroom"});
    let hs512 = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS512),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(&secret),
    )
    .unwrap();
    assert_eq!(post(rx.port, MAILROOM_PATH, &[(h, &hs512)], b"x"), 401);
    let no_iat = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"nonce": "0123456789abcdef01234567", "iss": "gitlab-mailroom"}),
        &jsonwebtoken::EncodingKey::from_secret(&secret),
    )
    .unwrap();
    assert_eq!(post(rx.port, MAILROOM_PATH, &[(h, &no_iat)], b"x"), 401);
    assert_eq!(post(rx.port, MAILROOM_PATH, &[], b"x"), 401);
    let verdicts: Vec<bool> = rx.requests().iter().map(Recorded::ok).collect();
    assert_eq!(verdicts, [true, true, false, false, false, false, false, false]);
}

#[test]
fn harness_receiver_checks_webhook_signatures() {
    let rx = Receiver::webhook(HOOK_KEY);
    let now = unix_now();
    let body =
        serde_json::to_vec(&serde_json::json!({"id": "00000000000000ab", "raw": b64(b"Subject: x\r\n\r\nhi\r\n")}))
            .unwrap();
    let sig = receiver::webhook_signature(HOOK_KEY, now, &body);
    let hdrs = |sig: &str| -> Vec<(&'static str, String)> {
        vec![("Mailgate-Job-Id", "00000000000000ab".into()), ("Mailgate-Signature", sig.to_string())]
    };
    let send = |h: Vec<(&'static str, String)>, body: &[u8]| {
        let h: Vec<(&str, &str)> = h.iter().map(|(n, v)| (*n, v.as_str())).collect();
        post(rx.port, HOOK_PATH, &h, body)
    };
    assert_eq!(send(hdrs(&sig), &body), 200);
    match &rx.requests()[0].verified {
        Ok(Verified::Webhook { timestamp, job, raw }) => {
            assert_eq!(*timestamp, now);
            assert_eq!(job["id"], "00000000000000ab");
            assert_eq!(raw, b"Subject: x\r\n\r\nhi\r\n");
        }
        other => panic!("{other:?}"),
    }
    let mut tampered = body.clone();
    tampered[3] ^= 1;
    assert_eq!(send(hdrs(&sig), &tampered), 401, "tampered body");
    assert_eq!(send(hdrs(&receiver::webhook_signature(b"other key", now, &body)), &body), 401, "wrong key");
    let old = now - 301;
    assert_eq!(send(hdrs(&receiver::webhook_signature(HOOK_KEY, old, &body)), &body), 401, "stale timestamp");
    assert_eq!(send(hdrs(&format!("t={now}")), &body), 401, "no v1");
    let wrong_id = serde_json::to_vec(&serde_json::json!({"id": "00000000000000ac", "raw": b64(b"x")})).unwrap();
    assert_eq!(send(hdrs(&receiver::webhook_signature(HOOK_KEY, now, &wrong_id)), &wrong_id), 400, "id mismatch");
    let no_raw = serde_json::to_vec(&serde_json::json!({"id": "00000000000000ab"})).unwrap();
    assert_eq!(send(hdrs(&receiver::webhook_signature(HOOK_KEY, now, &no_raw)), &no_raw), 400, "no raw");
    assert_eq!(rx.count(), 7);
}

#[test]
fn harness_receiver_modes_and_downtime() {
    let rx = Receiver::plain();
    let p = rx.port;
    assert_eq!(post(p, "/", &[], b""), 200);
    rx.set_mode(Mode::Status(503));
    assert_eq!(post(p, "/", &[], b""), 503);
    rx.set_mode(Mode::FailTimes(2, 500));
    let got: Vec<u16> = (0..3).map(|_| post(p, "/", &[], b"")).collect();
    assert_eq!(got, [500, 500, 200]);
    rx.set_mode(Mode::Sequence(VecDeque::from([429, 408])));
    let got: Vec<u16> = (0..3).map(|_| post(p, "/", &[], b"")).collect();
    assert_eq!(got, [429, 408, 200]);
    rx.set_mode(Mode::Slow(Duration::from_millis(300)));
    let t = Instant::now();
    assert_eq!(post(p, "/", &[], b""), 200);
    assert!(t.elapsed() >= Duration::from_millis(300));
    rx.set_mode(Mode::Ok);

    // a kept-alive connection dies with the receiver too
    let mut keep = std::net::TcpStream::connect(("127.0.0.1", p)).unwrap();
    rx.stop();
    assert!(std::net::TcpStream::connect(("127.0.0.1", p)).is_err(), "connection refused while stopped");
    keep.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 16];
    let n = std::io::Read::read(&mut keep, &mut buf).unwrap_or(0);
    assert_eq!(n, 0, "open connections are closed");
    rx.start();
    assert_eq!(post(p, "/", &[], b""), 200);
    assert_eq!(rx.port, p);
    assert_eq!(rx.count(), 10, "{}", rx.summary());
}

#[test]
fn harness_redis_server_runs_and_stops() {
    let mut redis = RedisServer::start();
    assert!(redis.url().starts_with("redis://127.0.0.1:"));
    let _: () = redis.cmd(&["SET", "k", "v"]);
    assert_eq!(redis.cmd::<String>(&["GET", "k"]), "v");
    let _: i64 = redis.cmd(&["LPUSH", "queue:x", "a"]);
    let _: i64 = redis.cmd(&["LPUSH", "queue:x", "b"]);
    assert_eq!(redis.list("queue:x"), ["b", "a"]);
    let pid = redis.pid();
    redis.stop();
    assert!(redis.query::<String>(&["PING"]).is_err());
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists() || {
            // a zombie is reaped by wait(); the pid directory goes away
            std::thread::sleep(Duration::from_millis(100));
            !Path::new(&format!("/proc/{pid}")).exists()
        }
    );
    redis.start_again();
    assert_eq!(redis.cmd::<String>(&["PING"]), "PONG");
    assert!(redis.list("queue:x").is_empty(), "no persistence");
}

// ---------------------------------------------------------------------------------------------
// mail_room postback
// ---------------------------------------------------------------------------------------------

#[test]
fn mailroom_posts_the_stored_message_with_a_gitlab_jwt() {
    let rx = Receiver::mailroom(&mailroom_secret());
    let url = rx.url(MAILROOM_PATH);
    let env = Env::start(|d| mailroom_toml(d, &url, "2s", r#"["1s", "1s"]"#), "");
    let id = env.send(&rcpt(), "mr1@example.org");
    let job = env.wait_state(&id, "done", Some(&rx));
    assert_eq!(job["attempts"], 1, "{job}");
    assert!(job.get("next_attempt_at").is_none_or(Value::is_null), "{job}");
    let o = env.cli(&["queue", "show", &id]);
    assert!(o.status.success(), "queue show: {}", String::from_utf8_lossy(&o.stderr));
    let shown: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!((shown["state"].as_str(), shown["attempts"].as_u64()), (Some("done"), Some(1)), "{shown}");

    let reqs = rx.requests();
    assert_eq!(reqs.len(), 1, "{}", rx.summary());
    let r = &reqs[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, MAILROOM_PATH);
    let ct = r.header("content-type").unwrap_or_default();
    assert!(ct.starts_with("text/plain"), "Content-Type {ct:?}");
    assert_eq!(r.body, env.raw(&id), "the body is the message as stored");
    match &r.verified {
        Ok(Verified::Mailroom { alg, claims }) => {
            assert_eq!(alg, "HS256");
            assert_eq!(claims["iss"], "gitlab-mailroom");
            let nonce = claims["nonce"].as_str().unwrap_or_else(|| panic!("nonce: {claims}"));
            assert_eq!(nonce.len(), 24, "{claims}");
            assert!(nonce.bytes().all(|b| b.is_ascii_hexdigit()), "{claims}");
            let iat = claims["iat"].as_i64().unwrap();
            assert!((unix_now() - iat).abs() < 60, "iat {iat}");
        }
        other => panic!("the receiver refused the request: {other:?}"),
    }
}

#[test]
fn mailroom_400_is_final_and_queue_retry_delivers_again() {
    let rx = Receiver::mailroom(&mailroom_secret());
    rx.set_mode(Mode::Status(400));
    let url = rx.url(MAILROOM_PATH);
    let env = Env::start(|d| mailroom_toml(d, &url, "2s", MANY_RETRIES), "");
    let id = env.send(&rcpt(), "mr400@example.org");
    let job = env.wait_state(&id, "dead", Some(&rx));
    assert_eq!(job["attempts"], 1, "400 is final: no second attempt: {job}");
    assert!(error_text(&job).contains("400"), "{job}");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(rx.count(), 1, "{}", rx.summary());

    rx.set_mode(Mode::Ok);
    let o = env.cli(&["queue", "retry", &id]);
    assert!(o.status.success(), "queue retry: {}", String::from_utf8_lossy(&o.stderr));
    let job = env.wait_state(&id, "done", Some(&rx));
    assert_eq!(job["attempts"], 1, "attempts start again after `queue retry`: {job}");
    assert_eq!(rx.count(), 2);
    assert!(rx.requests()[1].ok());
}

#[test]
fn mailroom_401_from_a_wrong_secret_keeps_retrying() {
    // GitLab answers 401 for a wrong secret or a disabled mailbox: a configuration error,
    // retried (and alerted on), never a dead letter after one attempt
    let rx = Receiver::mailroom(&[0x55; 32]);
    let url = rx.url(MAILROOM_PATH);
    let env = Env::start(|d| mailroom_toml(d, &url, "2s", MANY_RETRIES), "");
    let id = env.send(&rcpt(), "mr401@example.org");
    let job = env.wait_job(&id, "attempted twice", Some(&rx), |j| j["attempts"].as_u64() >= Some(2));
    assert_ne!(job["state"], "dead", "{job}");
    assert!(error_text(&job).contains("401"), "{job}");
    assert!(rx.requests().iter().all(|r| r.status == 401));
}

// ---------------------------------------------------------------------------------------------
// Webhook
// ---------------------------------------------------------------------------------------------

#[test]
fn webhook_posts_signed_job_json_with_the_raw_message() {
    let rx = Receiver::webhook(HOOK_KEY);
    let url = rx.url(HOOK_PATH);
    let env = Env::start(|d| webhook_toml(d, &url, "2s", r#"["1s"]"#), "");
    let id = env.send(&rcpt(), "wh1@example.org");
    let job = env.wait_state(&id, "done", Some(&rx));
    assert_eq!(job["attempts"], 1, "{job}");

    let reqs = rx.requests();
    assert_eq!(reqs.len(), 1, "{}", rx.summary());
    let r = &reqs[0];
    assert_eq!((r.method.as_str(), r.path.as_str()), ("POST", HOOK_PATH));
    let ct = r.header("content-type").unwrap_or_default();
    assert!(ct.starts_with("application/json"), "Content-Type {ct:?}");
    assert_eq!(r.job_id(), Some(id.as_str()));
    let sig = r.header("mailgate-signature").unwrap_or_default();
    assert!(sig.starts_with("t=") && sig.contains(",v1="), "{sig}");
    match &r.verified {
        Ok(Verified::Webhook { timestamp, job: body, raw }) => {
            assert!((unix_now() - timestamp).abs() < 60, "t={timestamp}");
            assert_eq!(body["id"], id.as_str());
            assert_eq!(body["mailbox"], "incoming");
            assert_eq!(body["key"], KEY);
            assert_eq!(body["route"], "reply");
            assert_eq!(body["key_source"], "rcpt");
            assert_eq!(body["message"], job["message"], "the job JSON as `queue show` prints it");
            assert_eq!(body["envelope"], job["envelope"]);
            assert_eq!(body["received_at"], job["received_at"]);
            assert_eq!(body["message"]["message_id"], "wh1@example.org");
            assert_eq!(raw, &env.raw(&id), "raw decodes to the stored message");
        }
        other => panic!("the receiver refused the request: {other:?}"),
    }
}

#[test]
fn webhook_500_twice_then_200_is_done_after_three_attempts() {
    let rx = Receiver::webhook(HOOK_KEY);
    rx.set_mode(Mode::FailTimes(2, 500));
    let url = rx.url(HOOK_PATH);
    let env = Env::start(|d| webhook_toml(d, &url, "2s", r#"["1s", "1s", "1s"]"#), "");
    let id = env.send(&rcpt(), "wh500@example.org");
    let waiting = env.wait_job(&id, "waiting after a 500", Some(&rx), |j| {
        j["state"] == "ready" && j["attempts"].as_u64() >= Some(1) && !j["last_error"].is_null()
    });
    assert!(error_text(&waiting).contains("500"), "{waiting}");
    let job = env.wait_state(&id, "done", Some(&rx));
    assert_eq!(job["attempts"], 3, "{job}");
    let statuses: Vec<u16> = rx.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [500, 500, 200], "{}", rx.summary());
    assert!(rx.requests().iter().all(|r| r.ok() && r.job_id() == Some(id.as_str())));
}

#[test]
fn webhook_404_is_dead_at_once() {
    let rx = Receiver::webhook(HOOK_KEY);
    rx.set_mode(Mode::Status(404));
    let url = rx.url(HOOK_PATH);
    let env = Env::start(|d| webhook_toml(d, &url, "2s", MANY_RETRIES), "");
    let id = env.send(&rcpt(), "wh404@example.org");
    let job = env.wait_state(&id, "dead", Some(&rx));
    assert_eq!(job["attempts"], 1, "{job}");
    assert!(error_text(&job).contains("404"), "{job}");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(rx.count(), 1, "{}", rx.summary());
    let o = env.cli(&["queue", "stats", "--json"]);
    let stats: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(stats["dead"], 1, "{stats}");
}

#[test]
fn webhook_429_and_408_are_retried() {
    let rx = Receiver::webhook(HOOK_KEY);
    rx.set_mode(Mode::Sequence(VecDeque::from([429, 408])));
    let url = rx.url(HOOK_PATH);
    let env = Env::start(|d| webhook_toml(d, &url, "2s", r#"["1s", "1s", "1s"]"#), "");
    let id = env.send(&rcpt(), "wh429@example.org");
    let job = env.wait_state(&id, "done", Some(&rx));
    assert_eq!(job["attempts"], 3, "{job}");
    let statuses: Vec<u16> = rx.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [429, 408, 200], "{}", rx.summary());
}

#[test]
fn receiver_down_is_retried_with_last_error_and_next_attempt_at() {
    let rx = Receiver::webhook(HOOK_KEY);
    rx.stop();
    let url = rx.url(HOOK_PATH);
    let env = Env::start(|d| webhook_toml(d, &url, "1s", MANY_RETRIES), "");
    let id = env.send(&rcpt(), "down@example.org");
    let job = env.wait_job(&id, "waiting for a retry", None, |j| {
        j["state"] == "ready" && !j["last_error"].is_null() && !j["next_attempt_at"].is_null()
    });
    assert!(job["attempts"].as_u64() >= Some(1), "{job}");
    assert!(!error_text(&job).is_empty());
    let next = rfc3339(&job["next_attempt_at"]);
    let now = OffsetDateTime::now_utc();
    assert!(
        next > now - time::Duration::seconds(2) && next < now + time::Duration::seconds(5),
        "next_attempt_at {next} with retry 1s (now {now})"
    );
    // it keeps trying while the receiver is down
    env.wait_job(&id, "attempted twice", None, |j| j["attempts"].as_u64() >= Some(2));
    assert_eq!(rx.count(), 0);

    rx.start();
    let job = env.wait_state(&id, "done", Some(&rx));
    assert!(job["attempts"].as_u64() >= Some(2), "{job}");
    assert!(job.get("next_attempt_at").is_none_or(Value::is_null), "no retry pending once done: {job}");
    assert!(rx.requests().iter().any(|r| r.ok() && r.job_id() == Some(id.as_str())), "{}", rx.summary());
}

#[test]
fn slow_answer_past_the_timeout_is_retried() {
    let rx = Receiver::webhook(HOOK_KEY);
    rx.set_mode(Mode::Slow(Duration::from_secs(4)));
    let url = rx.url(HOOK_PATH);
    let env = Env::start(|d| webhook_toml(d, &url, "1s", MANY_RETRIES), "");
    let id = env.send(&rcpt(), "slow@example.org");
    // ready again after two attempts: both timed out (a job in flight counts its attempt already)
    let job = env.wait_job(&id, "timed out twice", Some(&rx), |j| {
        j["attempts"].as_u64() >= Some(2) && !j["last_error"].is_null() && j["state"] != "leased"
    });
    assert!(error_text(&job).contains("timed out") || error_text(&job).contains("timeout"), "{job}");
    assert_ne!(
        job["state"],
        "done",
        "a 4 s answer with timeout = 1s is no delivery: {job}\nreceiver:\n{}\nlog:\n{}",
        rx.summary(),
        env.log_tail()
    );
    assert_ne!(job["state"], "dead", "{job}");
    rx.set_mode(Mode::Ok);
    let job = env.wait_state(&id, "done", Some(&rx));
    assert!(job["attempts"].as_u64() >= Some(3), "{job}");
}

#[test]
fn retries_exhausted_make_the_job_dead() {
    let rx = Receiver::webhook(HOOK_KEY);
    rx.set_mode(Mode::Status(500));
    let url = rx.url(HOOK_PATH);
    let env = Env::start(|d| webhook_toml(d, &url, "2s", r#"["1s"]"#), "");
    let id = env.send(&rcpt(), "exhausted@example.org");
    let job = env.wait_state(&id, "dead", Some(&rx));
    assert_eq!(job["attempts"], 2, "the first attempt and one retry: {job}");
    assert!(error_text(&job).contains("500"), "{job}");
    assert!(job.get("next_attempt_at").is_none_or(Value::is_null), "{job}");
    std::thread::sleep(Duration::from_millis(2000));
    assert_eq!(rx.count(), 2, "{}", rx.summary());
}

#[test]
fn bulk_retry_by_cli_and_http() {
    let rx = Receiver::webhook(HOOK_KEY);
    rx.set_mode(Mode::Status(404));
    let url = rx.url(HOOK_PATH);
    let env = Env::start(
        |d| {
            format!(
                "[[mailbox]]\nname = \"incoming\"\naddress = \"incoming+%{{key}}@localhost\"\n\
                 [[mailbox]]\nname = \"other\"\naddress = \"other+%{{key}}@localhost\"\n{}",
                webhook_toml(d, &url, "2s", r#"["1s"]"#)
            )
        },
        "",
    );
    let a = env.send(&rcpt(), "bulk-a@example.org");
    let b = env.send(&rcpt(), "bulk-b@example.org");
    let c = env.send(&format!("other+{KEY}@localhost"), "bulk-c@example.org");
    for id in [&a, &b, &c] {
        env.wait_state(id, "dead", Some(&rx));
    }
    assert_eq!(rx.count(), 3);

    // only the other mailbox, still refused: dead again after one more request
    assert_eq!(env.cli_retry_all(Some("other")), 1);
    rx.wait_requests(4, WAIT);
    env.wait_state(&c, "dead", Some(&rx));
    let reqs = rx.requests();
    assert_eq!(requests_for(&reqs, &c).len(), 2, "{}", rx.summary());
    assert_eq!(requests_for(&reqs, &a).len(), 1, "{}", rx.summary());

    rx.set_mode(Mode::Ok);
    let r = http_post(env.ports.http, "/v1/jobs/retry?mailbox=incoming");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["retried"], 2, "{}", r.text());
    env.wait_state(&a, "done", Some(&rx));
    env.wait_state(&b, "done", Some(&rx));
    assert_eq!(env.job(&c).unwrap()["state"], "dead");

    assert_eq!(env.cli_retry_all(None), 1);
    env.wait_state(&c, "done", Some(&rx));
    assert_eq!(env.cli_retry_all(None), 0);
    let r = http_post(env.ports.http, "/v1/jobs/retry");
    assert_eq!((r.status, r.json()["retried"].as_u64()), (200, Some(0)), "{}", r.text());
}

#[test]
fn deliverers_only_take_their_mailboxes() {
    let rx = Receiver::webhook(HOOK_KEY);
    let url = rx.url(HOOK_PATH);
    let env = Env::start(
        |d| {
            format!(
                "[[mailbox]]\nname = \"incoming\"\naddress = \"incoming+%{{key}}@localhost\"\n\
                 [[mailbox]]\nname = \"other\"\naddress = \"other+%{{key}}@localhost\"\n{}mailboxes = [\"incoming\"]\n",
                webhook_toml(d, &url, "2s", r#"["1s"]"#)
            )
        },
        "",
    );
    let other = env.send(&format!("other+{KEY}@localhost"), "only-other@example.org");
    let mine = env.send(&rcpt(), "only-mine@example.org");
    env.wait_state(&mine, "done", Some(&rx));
    std::thread::sleep(Duration::from_millis(1500));
    let job = env.job(&other).unwrap();
    assert_eq!((job["state"].as_str(), job["attempts"].as_u64()), (Some("ready"), Some(0)), "{job}");
    assert_eq!(rx.count(), 1, "{}", rx.summary());
    // left for the pull API
    let o = env.cli(&["queue", "pop", "--mailbox", "other"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let popped: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(popped["id"], other.as_str());
}

// ---------------------------------------------------------------------------------------------
// Retention
// ---------------------------------------------------------------------------------------------

#[test]
fn retention_purges_delivered_jobs_and_their_messages() {
    let rx = Receiver::webhook(HOOK_KEY);
    let url = rx.url(HOOK_PATH);
    let env = Env::start(
        |d| {
            format!(
                "[[mailbox]]\nname = \"incoming\"\naddress = \"incoming+%{{key}}@localhost\"\n\
                 [[mailbox]]\nname = \"other\"\naddress = \"other+%{{key}}@localhost\"\n{}mailboxes = [\"incoming\"]\n",
                webhook_toml(d, &url, "2s", r#"["1s"]"#)
            )
        },
        "retention = \"1s\"",
    );
    let waiting = env.send(&format!("other+{KEY}@localhost"), "kept@example.org");
    let id = env.send(&rcpt(), "purged@example.org");
    let stored = env.raw(&id);
    let reqs = rx.wait_requests(1, WAIT);
    match &reqs[0].verified {
        Ok(Verified::Webhook { raw, .. }) => assert_eq!(raw, &stored),
        other => panic!("{other:?}"),
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while env.job(&id).is_some() {
        assert!(Instant::now() < deadline, "job {id} still there 15 s after delivery: {:?}", env.job(&id));
        std::thread::sleep(Duration::from_millis(100));
    }
    let r = http_get(env.ports.http, &format!("/v1/jobs/{id}/raw"));
    assert_eq!(r.status, 404, "the raw message goes with the job: {}", r.text());
    let o = env.cli(&["queue", "list", "--json"]);
    let ids: Vec<String> = json_values(&stdout(&o)).iter().map(|j| j["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids, std::slice::from_ref(&waiting), "only the undelivered job is left");
    assert_eq!(env.raw(&waiting).len() as u64, env.job(&waiting).unwrap()["message"]["size"].as_u64().unwrap());
}

// ---------------------------------------------------------------------------------------------
// Sidekiq
// ---------------------------------------------------------------------------------------------

fn sidekiq_toml(redis: &str, fields: &str) -> String {
    format!(
        r#"
[[deliver]]
kind = "sidekiq"
redis_url = "{redis}"
concurrency = 2
timeout = "2s"
retry = ["1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s"]
{fields}
"#
    )
}

/// Checks one Sidekiq payload; returns it parsed.
fn check_sidekiq_job(item: &str, class: &str, queue: &str, id: &str, raw: &[u8]) -> Value {
    let v: Value = serde_json::from_str(item).unwrap_or_else(|e| panic!("not JSON ({e}): {item}"));
    assert_eq!(v["class"], class, "{v}");
    assert_eq!(v["queue"], queue, "{v}");
    assert_eq!(v["retry"], false, "{v}");
    let args = v["args"].as_array().unwrap_or_else(|| panic!("args: {v}"));
    assert_eq!(args.len(), 1, "{v}");
    assert_eq!(args[0].as_str(), Some(String::from_utf8_lossy(raw).as_ref()), "args[0] is the raw message");
    let jid = v["jid"].as_str().unwrap_or_else(|| panic!("jid: {v}"));
    assert_eq!(jid.len(), 24, "{jid}");
    assert!(jid.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)), "lowercase hex: {jid}");
    assert!(jid.ends_with(id), "jid {jid} ends with the job id {id}");
    assert!(v["enqueued_at"].is_f64(), "enqueued_at is a float: {v}");
    let at = v["enqueued_at"].as_f64().unwrap();
    assert!((at - unix_now() as f64).abs() < 60.0, "enqueued_at {at}");
    v
}

#[test]
fn sidekiq_lpush_has_the_shape_gitlab_expects() {
    let redis = RedisServer::start();
    let url = redis.url();
    let env = Env::start(|_| sidekiq_toml(&url, "queue = \"default\""), "");
    let id = env.send(&rcpt(), "sk1@example.org");
    let job = env.wait_state(&id, "done", None);
    assert_eq!(job["attempts"], 1);
    let items = redis.list("queue:default");
    assert_eq!(items.len(), 1, "{items:?}");
    check_sidekiq_job(&items[0], "EmailReceiverWorker", "default", &id, &env.raw(&id));
}

#[test]
fn sidekiq_namespace_service_desk_worker_and_worker_override() {
    let redis = RedisServer::start();
    let url = redis.url();
    let env = Env::start(
        |_| {
            format!(
                "[[mailbox]]\nname = \"incoming\"\naddress = \"incoming+%{{key}}@localhost\"\n\
                 [[mailbox]]\nname = \"service_desk\"\naddress = \"contact+%{{key}}@localhost\"\nroutes = \"any\"\n\
                 [[mailbox]]\nname = \"custom\"\naddress = \"custom+%{{key}}@localhost\"\nroutes = \"any\"\n{}{}",
                sidekiq_toml(
                    &url,
                    "mailboxes = [\"incoming\", \"service_desk\"]\nqueue = \"email_receiver\"\nnamespace = \"resque:gitlab\""
                ),
                sidekiq_toml(&url, "mailboxes = [\"custom\"]\nqueue = \"custom_q\"\nworker = \"MyEmailWorker\"")
            )
        },
        "",
    );
    let incoming = env.send(&rcpt(), "ns-in@example.org");
    let desk = env.send("contact+group-project-abc@localhost", "ns-sd@example.org");
    let custom = env.send("custom+anything@localhost", "ns-custom@example.org");
    for id in [&incoming, &desk, &custom] {
        env.wait_state(id, "done", None);
    }
    let items = redis.list("resque:gitlab:queue:email_receiver");
    assert_eq!(items.len(), 2, "{items:?}");
    let by_jid: HashMap<String, &String> = items
        .iter()
        .map(|i| (serde_json::from_str::<Value>(i).unwrap()["jid"].as_str().unwrap_or("").to_string(), i))
        .collect();
    let find = |id: &str| -> &String {
        by_jid.iter().find(|(jid, _)| jid.ends_with(id)).map(|(_, i)| *i).unwrap_or_else(|| panic!("{id}: {items:?}"))
    };
    check_sidekiq_job(find(&incoming), "EmailReceiverWorker", "email_receiver", &incoming, &env.raw(&incoming));
    check_sidekiq_job(find(&desk), "ServiceDeskEmailReceiverWorker", "email_receiver", &desk, &env.raw(&desk));
    assert!(redis.list("queue:email_receiver").is_empty(), "the namespace prefixes the queue key");
    let items = redis.list("queue:custom_q");
    assert_eq!(items.len(), 1, "{items:?}");
    check_sidekiq_job(&items[0], "MyEmailWorker", "custom_q", &custom, &env.raw(&custom));
}

#[test]
fn sidekiq_redis_down_then_up_is_delivered() {
    let mut redis = RedisServer::start();
    redis.stop();
    let url = redis.url();
    let env = Env::start(|_| sidekiq_toml(&url, "queue = \"default\""), "");
    let id = env.send(&rcpt(), "sk-down@example.org");
    let job = env.wait_job(&id, "failed against a stopped redis", None, |j| {
        j["attempts"].as_u64() >= Some(1) && !j["last_error"].is_null()
    });
    assert_ne!(job["state"], "done", "{job}");
    assert_ne!(job["state"], "dead", "{job}");
    redis.start_again();
    let job = env.wait_state(&id, "done", None);
    assert!(job["attempts"].as_u64() >= Some(2), "{job}");
    let items = redis.list("queue:default");
    assert_eq!(items.len(), 1, "{items:?}");
    check_sidekiq_job(&items[0], "EmailReceiverWorker", "default", &id, &env.raw(&id));
}

// ---------------------------------------------------------------------------------------------
// Restarts in the middle of deliveries
// ---------------------------------------------------------------------------------------------

fn restart_mid_delivery(sigterm: bool) {
    let rx = Receiver::webhook(HOOK_KEY);
    rx.set_mode(Mode::Slow(Duration::from_secs(5)));
    let url = rx.url(HOOK_PATH);
    let mut env = Env::start(|d| webhook_toml(d, &url, "10s", MANY_RETRIES), "");
    let ids: Vec<String> = (0..6).map(|i| env.send(&rcpt(), &format!("restart{i}@example.org"))).collect();
    let o = env.cli(&["queue", "list", "--json"]);
    let listed: HashSet<String> =
        json_values(&stdout(&o)).iter().map(|j| j["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(listed, ids.iter().cloned().collect::<HashSet<_>>());
    // requests are in flight (the receiver holds them for 5 s)
    rx.wait_requests(2, WAIT);
    if sigterm {
        let code = env.server.stop();
        assert_eq!(code, Some(0), "clean exit on SIGTERM during deliveries; log:\n{}", env.log_tail());
    } else {
        env.server.kill9();
    }
    rx.set_mode(Mode::Ok);
    env.restart();
    for id in &ids {
        env.wait_state(id, "done", Some(&rx));
    }
    let reqs = rx.requests();
    for id in &ids {
        assert!(
            requests_for(&reqs, id).iter().any(|r| r.ok() && r.status == 200),
            "the receiver never accepted {id}:\n{}",
            rx.summary()
        );
    }
    let o = env.cli(&["queue", "stats", "--json"]);
    let stats: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(stats["done"], ids.len(), "{stats}");
    assert_eq!(
        (stats["ready"].as_u64(), stats["leased"].as_u64(), stats["dead"].as_u64()),
        (Some(0), Some(0), Some(0))
    );
}

#[test]
fn kill_9_mid_delivery_loses_nothing() {
    restart_mid_delivery(false);
}

#[test]
fn sigterm_mid_delivery_loses_nothing() {
    restart_mid_delivery(true);
}

// ---------------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------------

/// `(labels, value)` of every sample of `name` in Prometheus/OpenMetrics text.
fn samples(text: &str, name: &str) -> Vec<(HashMap<String, String>, f64)> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let (metric, labels) = match series.split_once('{') {
            Some((m, l)) => (m, l.trim_end_matches('}')),
            None => (series, ""),
        };
        if metric != name {
            continue;
        }
        let mut map = HashMap::new();
        let mut rest = labels;
        while let Some((k, after)) = rest.split_once("=\"") {
            let mut value = String::new();
            let mut chars = after.char_indices();
            let mut end = after.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            value.push(n);
                        }
                    }
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => value.push(c),
                }
            }
            map.insert(k.trim_start_matches(',').trim().to_string(), value);
            rest = &after[end..];
        }
        if let Ok(v) = value.trim().parse::<f64>() {
            out.push((map, v));
        }
    }
    out
}

/// The sum of the samples of `name` whose labels include `want`; `None` when there is none.
fn metric(text: &str, name: &str, want: &[(&str, &str)]) -> Option<f64> {
    let hits: Vec<f64> = samples(text, name)
        .into_iter()
        .filter(|(l, _)| want.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v)))
        .map(|(_, v)| v)
        .collect();
    if hits.is_empty() { None } else { Some(hits.iter().sum()) }
}

#[test]
fn metrics_show_delivery_counters_and_queue_gauges() {
    let rx = Receiver::webhook(HOOK_KEY);
    rx.set_mode(Mode::FailTimes(1, 500));
    let url = rx.url(HOOK_PATH);
    let env = Env::start(|d| webhook_toml(d, &url, "2s", r#"["1s", "1s"]"#), "");
    let id = env.send(&rcpt(), "metrics@example.org");
    let mut c = Client::connect(env.ports.smtp);
    c.cmd("EHLO client.example.org");
    assert!(c.cmd("MAIL FROM:<alice@example.org>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<incoming+not-a-key@localhost>").starts_with("550"));
    c.cmd("QUIT");
    env.wait_state(&id, "done", Some(&rx));

    let r = http_get(env.ports.http, "/metrics");
    let ct = r.header("content-type").unwrap_or_default().to_string();
    assert!(ct.starts_with("text/plain") || ct.starts_with("application/openmetrics-text"), "{ct}");
    let deadline = Instant::now() + Duration::from_secs(15);
    let attempts = "mailgate_delivery_attempts_total";
    let hook = [("deliverer", "hook"), ("kind", "webhook")];
    let text = loop {
        let text = env.metrics();
        let delivered = metric(&text, attempts, &[hook[0], hook[1], ("outcome", "delivered")]);
        let done = metric(&text, "mailgate_queue_jobs", &[("mailbox", "incoming"), ("state", "done")]);
        if delivered == Some(1.0) && done == Some(1.0) {
            break text;
        }
        assert!(Instant::now() < deadline, "delivered {delivered:?}, done gauge {done:?}:\n{text}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(metric(&text, attempts, &hook), Some(2.0), "one failed and one delivered attempt:\n{text}");
    assert_eq!(
        metric(&text, "mailgate_queue_jobs", &[("mailbox", "incoming"), ("state", "ready")]).unwrap_or(0.0),
        0.0
    );
    assert!(metric(&text, "mailgate_accepted_total", &[]) >= Some(1.0), "{text}");
    assert!(metric(&text, "mailgate_sessions_total", &[]) >= Some(2.0), "{text}");
    assert!(metric(&text, "mailgate_refused_total", &[("reason", "unknown_key")]) >= Some(1.0), "{text}");
}

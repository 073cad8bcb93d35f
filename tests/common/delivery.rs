//! What the delivery tests share: receivers' secrets and paths, config snippets, a server start
//! that retries on a port clash, and small readers of jobs and receiver records.
#![allow(dead_code, unused_imports)]

pub use std::collections::{HashMap, HashSet, VecDeque};
pub use std::path::{Path, PathBuf};
pub use std::time::{Duration, Instant};

pub use base64::Engine;
pub use serde_json::Value;
pub use time::OffsetDateTime;
pub use time::format_description::well_known::Rfc3339;

pub use super::receiver::{self, Mode, Receiver, Recorded, Verified, http_get, http_post};
pub use super::redis::RedisServer;
pub use super::*;
/// The longest any single wait in these tests may take.
pub const WAIT: Duration = Duration::from_secs(40);
pub const MAILROOM_PATH: &str = "/api/v4/internal/mail_room/incoming_email";
pub const HOOK_PATH: &str = "/hooks/mail";

pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The 32-byte mail_room secret of these tests.
pub fn mailroom_secret() -> Vec<u8> {
    (0u8..32).map(|i| i.wrapping_mul(37).wrapping_add(11)).collect()
}

/// The webhook HMAC key of these tests (the file holds it plus one newline).
pub const HOOK_KEY: &[u8] = b"whsec test key \x01\x02 with spaces";

/// A running mailgate with its temporary directory.
pub struct Env {
    pub _dir: tempfile::TempDir,
    pub ports: Ports,
    pub config: PathBuf,
    pub server: Server,
}

impl Env {
    /// `extra`: TOML appended to the standard config (mailboxes, `[[deliver]]`, ...);
    /// `spool`: lines added to its `[spool]` table (e.g. `retention = "1s"`).
    pub fn start(extra: impl Fn(&Path) -> String, spool: &str) -> Env {
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
    pub fn restart(&mut self) {
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

    pub fn log_tail(&self) -> String {
        let log = self.server.log_text();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    /// Sends one message over SMTP; returns the job id from the 250 reply.
    pub fn send(&self, rcpt: &str, message_id: &str) -> String {
        send_to(self.ports.smtp, rcpt, message_id)
    }

    /// The job (GET /v1/jobs/{id}); `None` on 404.
    pub fn job(&self, id: &str) -> Option<Value> {
        let r = http_get(self.ports.http, &format!("/v1/jobs/{id}"));
        match r.status {
            200 => Some(r.json()),
            404 => None,
            s => panic!("GET /v1/jobs/{id}: {s} {}", r.text()),
        }
    }

    /// The stored message (GET /v1/jobs/{id}/raw).
    pub fn raw(&self, id: &str) -> Vec<u8> {
        let r = http_get(self.ports.http, &format!("/v1/jobs/{id}/raw"));
        assert_eq!(r.status, 200, "GET /v1/jobs/{id}/raw: {}", r.text());
        r.body
    }

    /// Polls the job until `pred` holds; panics after WAIT with what it saw.
    pub fn wait_job(&self, id: &str, what: &str, rx: Option<&Receiver>, pred: impl Fn(&Value) -> bool) -> Value {
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

    pub fn wait_state(&self, id: &str, state: &str, rx: Option<&Receiver>) -> Value {
        self.wait_job(id, state, rx, |j| j["state"] == state)
    }

    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        cli(&self.config, args)
    }

    /// `queue retry --all [...]` -> N of `{"retried": N}`.
    pub fn cli_retry_all(&self, mailbox: Option<&str>) -> u64 {
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

    pub fn metrics(&self) -> String {
        let r = http_get(self.ports.http, "/metrics");
        assert_eq!(r.status, 200, "GET /metrics: {}", r.text());
        r.text()
    }
}

/// Like `Server::start`, but notices a server that exits (e.g. on a port in use) at once:
/// `Err(its log)`.
pub fn spawn_server(config: &Path, ports: &Ports) -> Result<Server, String> {
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

pub fn send_to(port: u16, rcpt: &str, message_id: &str) -> String {
    let mut c = Client::connect(port);
    assert!(c.cmd("EHLO client.example.org").starts_with("250"));
    let r = c.send_mail("alice@example.org", &[rcpt], &message(message_id, "delivery test", ""));
    assert!(r.starts_with("250 2.0.0 Ok: queued as "), "{r}");
    c.cmd("QUIT");
    r.rsplit(' ').next().unwrap().to_string()
}

pub fn rcpt() -> String {
    format!("incoming+{KEY}@localhost")
}

/// A secret file in `dir`.
pub fn secret_file(dir: &Path, name: &str, content: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p
}

pub fn mailroom_secret_file(dir: &Path) -> PathBuf {
    secret_file(dir, "mailroom_secret", format!("{}\n", b64(&mailroom_secret())).as_bytes())
}

pub fn hook_secret_file(dir: &Path) -> PathBuf {
    let mut content = HOOK_KEY.to_vec();
    content.push(b'\n');
    secret_file(dir, "hook_secret", &content)
}

pub fn mailroom_toml(dir: &Path, url: &str, timeout: &str, retry: &str) -> String {
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

pub fn webhook_toml(dir: &Path, url: &str, timeout: &str, retry: &str) -> String {
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

pub const MANY_RETRIES: &str = r#"["1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s", "1s"]"#;

pub fn requests_for<'a>(rx: &'a [Recorded], id: &str) -> Vec<&'a Recorded> {
    rx.iter().filter(|r| r.job_id() == Some(id)).collect()
}

pub fn unix_now() -> i64 {
    receiver::unix_now()
}

pub fn rfc3339(v: &Value) -> OffsetDateTime {
    let s = v.as_str().unwrap_or_else(|| panic!("not a string: {v}"));
    OffsetDateTime::parse(s, &Rfc3339).unwrap_or_else(|e| panic!("{s:?} is not RFC 3339: {e}"))
}

pub fn error_text(job: &Value) -> String {
    job["last_error"].as_str().unwrap_or_else(|| panic!("no last_error in {job}")).to_string()
}

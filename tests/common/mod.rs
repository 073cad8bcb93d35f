//! Shared helpers for the integration tests: a real `mailgate serve` process on loopback ports,
//! raw SMTP/LMTP clients, and the CLI. Every process started here is stopped by PID on drop.
#![allow(dead_code)]

pub mod crashload;
pub mod delivery;
pub mod dns;
pub mod fixtures;
pub mod postfix;
pub mod powercut;
pub mod receiver;
pub mod redis;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const KEY: &str = "0123456789abcdef0123456789abcdef";

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_mailgate")
}

/// A free loopback TCP port (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

pub struct Ports {
    pub smtp: u16,
    pub lmtp: u16,
    pub policy: u16,
    pub http: u16,
}

impl Ports {
    /// Ports below the kernel's ephemeral range (see [`receiver::quiet_port`]): an outgoing
    /// connection of another test can never take one between the pick and the bind.
    pub fn new() -> Ports {
        receiver::quiet_ports()
    }
}

/// Writes a config with the given extra TOML appended after the standard listeners.
pub fn write_config(dir: &Path, ports: &Ports, listeners: &str, extra: &str) -> PathBuf {
    let spool = dir.join("spool");
    let listeners = if listeners.is_empty() {
        format!(
            r#"
[[listen]]
protocol = "smtp"
address = "127.0.0.1:{smtp}"
[[listen]]
protocol = "lmtp"
address = "127.0.0.1:{lmtp}"
[[listen]]
protocol = "policy"
address = "127.0.0.1:{policy}"
"#,
            smtp = ports.smtp,
            lmtp = ports.lmtp,
            policy = ports.policy
        )
    } else {
        listeners.to_string()
    };
    // Sender authentication is tested on its own, against a DNS server of the test's; elsewhere
    // it is off so that no test depends on this machine's resolver.
    let extra = if extra.contains("[auth]") {
        extra.to_string()
    } else {
        format!("{extra}\n[auth]\nspf = \"off\"\ndkim = \"off\"\ndmarc = \"off\"\n")
    };
    let text = format!(
        r#"
[server]
hostname = "mx.test"
shutdown_grace = "5s"
{listeners}
[spool]
dir = "{spool}"
[http]
listen = "127.0.0.1:{http}"
{extra}
"#,
        spool = spool.display(),
        http = ports.http
    );
    let has_mailbox = extra.contains("[[mailbox]]");
    let text = if has_mailbox {
        text
    } else {
        format!("{text}\n[[mailbox]]\nname = \"incoming\"\naddress = \"incoming+%{{key}}@localhost\"\n")
    };
    let path = dir.join("mailgate.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// Ends a readiness probe so that the server has let its connection go before a test counts
/// connection slots: an SMTP or LMTP greeting gets QUIT and the probe reads until the server
/// closes. A listener that greets nobody (the policy service) is just closed.
fn end_probe(probe: TcpStream) {
    use std::io::{BufRead, Read, Write};
    let _ = probe.set_read_timeout(Some(Duration::from_millis(500)));
    let mut r = std::io::BufReader::new(&probe);
    let mut greeting = String::new();
    if r.read_line(&mut greeting).is_ok() && greeting.starts_with("220") {
        let _ = (&probe).write_all(b"QUIT\r\n");
        let _ = r.read_to_end(&mut Vec::new());
    }
}

/// A running `mailgate serve`.
pub struct Server {
    pub child: Option<Child>,
    pub config: PathBuf,
    pub log: PathBuf,
    pub ports_http: u16,
}

impl Server {
    pub fn start(config: &Path, wait_port: u16, http: u16) -> Server {
        let log = config.with_extension("log");
        let logfile = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("log file");
        let child = Command::new(bin())
            .args(["serve", "--config"])
            .arg(config)
            .env("MAILGATE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(logfile)
            .spawn()
            .expect("spawn mailgate");
        let server = Server { child: Some(child), config: config.to_path_buf(), log, ports_http: http };
        server.wait_ready(wait_port);
        server
    }

    fn wait_ready(&self, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(probe) = TcpStream::connect(("127.0.0.1", port))
                && TcpStream::connect(("127.0.0.1", self.ports_http)).is_ok()
            {
                end_probe(probe);
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("mailgate did not start; log:\n{}", self.log_text());
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM and wait; returns the exit status code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        signal(child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    /// kill -9.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status();
}

/// Runs the CLI with `--config`.
pub fn cli(config: &Path, args: &[&str]) -> Output {
    Command::new(bin()).args(args).arg("--config").arg(config).output().expect("run mailgate")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Parses `--json` output: a JSON array, or one JSON value per line.
pub fn json_values(text: &str) -> Vec<serde_json::Value> {
    let t = text.trim();
    if t.is_empty() {
        return Vec::new();
    }
    if let Ok(serde_json::Value::Array(a)) = serde_json::from_str(t) {
        return a;
    }
    t.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).expect("json line")).collect()
}

/// A raw SMTP/LMTP client that reads whole (multi-line) replies.
pub struct Client {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Client {
    pub fn connect(port: u16) -> Client {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
        let writer = s.try_clone().expect("clone");
        let mut c = Client { reader: BufReader::new(s), writer };
        let greeting = c.reply();
        assert!(greeting.starts_with("220 "), "{greeting}");
        c
    }

    /// One complete reply (all its lines), joined with '\n'.
    pub fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line).unwrap_or(0) == 0 {
                return all;
            }
            let done = line.as_bytes().get(3) != Some(&b'-');
            all.push_str(line.trim_end());
            if done {
                return all;
            }
            all.push('\n');
        }
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).expect("write");
    }

    /// Sends one command line and returns its reply.
    pub fn cmd(&mut self, line: &str) -> String {
        self.send_raw(format!("{line}\r\n").as_bytes());
        self.reply()
    }

    /// Reads until the server closes the connection.
    pub fn read_to_end(&mut self) -> String {
        let mut s = String::new();
        let _ = self.reader.read_to_string(&mut s);
        s
    }

    /// A whole SMTP transaction; returns the reply to the end of DATA.
    pub fn send_mail(&mut self, from: &str, rcpts: &[&str], message: &str) -> String {
        let r = self.cmd(&format!("MAIL FROM:<{from}>"));
        assert!(r.starts_with("250"), "MAIL: {r}");
        for rcpt in rcpts {
            let r = self.cmd(&format!("RCPT TO:<{rcpt}>"));
            assert!(r.starts_with("250"), "RCPT {rcpt}: {r}");
        }
        let r = self.cmd("DATA");
        assert!(r.starts_with("354"), "DATA: {r}");
        self.send_raw(message.as_bytes());
        self.send_raw(b".\r\n");
        self.reply()
    }
}

pub fn message(message_id: &str, subject: &str, extra_headers: &str) -> String {
    format!(
        "From: Alice <alice@example.org>\r\nTo: incoming@localhost\r\nMessage-ID: <{message_id}>\r\nSubject: {subject}\r\n{extra_headers}\r\nHello from the test.\r\n"
    )
}

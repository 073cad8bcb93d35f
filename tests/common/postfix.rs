//! A private Postfix for end-to-end tests: its own config, queue and data directories under the
//! test's temporary directory, one SMTP listener on a loopback high port, logging to a file.
//! Started with `postfix -c DIR start-fg` as a child process and stopped by PID on drop.
//!
//! Facts this relies on (notes/postfix.md): `maillog_file` must lie under
//! `maillog_file_prefixes` or Postfix exits 1 without a word; Debian's master.cf chroots services,
//! so every service gets `chroot = n`; clients inside `mynetworks` are exempt from some
//! protections, so `mynetworks` leaves out 127.0.0.1, the address the tests send from.
#![allow(dead_code)]

use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How Postfix hands mail to mailgate (DESIGN.md, deployment modes).
#[derive(Debug, Clone)]
pub enum PostfixMode {
    /// Mode A: mail for the relay domain goes to `lmtp` (`inet:127.0.0.1:PORT`,
    /// `unix:/path` or a bare `/path`) after the queue; `policy` (`inet:127.0.0.1:PORT`) is
    /// asked at RCPT.
    ModeA { lmtp: String, policy: Option<String> },
    /// Mode B: the SMTP server proxies every session to `filter` (`127.0.0.1:PORT`) before the
    /// queue; with `speed_adjust` it receives the whole message first.
    ModeB { filter: String, speed_adjust: bool },
}

#[derive(Debug, Clone)]
pub struct PostfixSetup {
    pub smtp_port: u16,
    pub mode: PostfixMode,
    pub relay_domain: String,
    /// Extra `name = value` lines appended to main.cf (later lines win).
    pub extra_main_cf: Vec<String>,
}

pub struct PrivatePostfix {
    pub dir: PathBuf,
    pub conf: PathBuf,
    pub queue: PathBuf,
    pub log_path: PathBuf,
    pub smtp_port: u16,
    child: Option<Child>,
    fg_out: PathBuf,
}

/// The tests need root: Postfix's master and its daemons switch users.
pub fn require_root() {
    let out = Command::new("id").arg("-u").output().expect("run id -u");
    let uid = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        uid == "0",
        "the Postfix end-to-end tests must run as root (a private Postfix instance needs it); uid is {uid}. \
         Run them as root, e.g. `sudo make e2e`"
    );
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn lmtp_nexthop(lmtp: &str) -> String {
    if lmtp.starts_with("inet:") || lmtp.starts_with("unix:") {
        lmtp.to_string()
    } else if lmtp.starts_with('/') {
        format!("unix:{lmtp}")
    } else {
        format!("inet:{lmtp}")
    }
}

impl PrivatePostfix {
    /// Writes the configuration under `dir/postfix` and starts Postfix; returns once its SMTP
    /// port accepts connections.
    pub fn start(dir: &Path, setup: PostfixSetup) -> PrivatePostfix {
        require_root();
        // Postfix's daemons run as the postfix user and must reach the queue, data and log
        // paths (and a unix LMTP socket); temporary directories are created 0700.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod test dir");
        let base = dir.join("postfix");
        let conf = base.join("conf");
        let queue = base.join("queue");
        let data = base.join("data");
        std::fs::create_dir_all(&conf).expect("mkdir conf");
        std::fs::create_dir_all(&queue).expect("mkdir queue");
        for d in [&base, &conf, &queue] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        let log_path = base.join("postfix.log");
        let fg_out = base.join("start-fg.out");

        let mut main = vec![
            "compatibility_level = 3.6".to_string(),
            format!("queue_directory = {}", queue.display()),
            format!("data_directory = {}", data.display()),
            "myhostname = postfix.test".into(),
            "mydomain = test".into(),
            "inet_interfaces = 127.0.0.1".into(),
            "inet_protocols = ipv4".into(),
            "mydestination =".into(),
            // the test client (127.0.0.1) must not be in mynetworks: smtpd_forbid_bare_newline
            // and other protections exempt it
            "mynetworks = 127.0.0.2/32".into(),
            format!("relay_domains = {}", setup.relay_domain),
            "alias_maps =".into(),
            "alias_database =".into(),
            "biff = no".into(),
            "smtputf8_enable = no".into(),
            format!("maillog_file = {}", log_path.display()),
            format!("maillog_file_prefixes = /var, /dev/stdout, {}", base.display()),
        ];
        let mut restrictions = "reject_unauth_destination".to_string();
        match &setup.mode {
            PostfixMode::ModeA { lmtp, policy } => {
                main.push(format!("transport_maps = inline:{{ {}=lmtp:{} }}", setup.relay_domain, lmtp_nexthop(lmtp)));
                main.push("lmtp_send_xforward_command = yes".into());
                if let Some(p) = policy {
                    restrictions.push_str(&format!(", check_policy_service {p}"));
                }
            }
            PostfixMode::ModeB { .. } => {}
        }
        main.push(format!("smtpd_recipient_restrictions = {restrictions}"));
        main.extend(setup.extra_main_cf.iter().cloned());
        std::fs::write(conf.join("main.cf"), main.join("\n") + "\n").expect("write main.cf");

        // master.cf: Debian's, with the public `smtp inet` service moved to our loopback port.
        let stock = std::fs::read_to_string("/etc/postfix/master.cf").expect("read /etc/postfix/master.cf");
        let mut service = format!("127.0.0.1:{} inet n - n - - smtpd", setup.smtp_port);
        if let PostfixMode::ModeB { filter, speed_adjust } = &setup.mode {
            service.push_str(&format!("\n  -o smtpd_proxy_filter={filter}"));
            if *speed_adjust {
                service.push_str("\n  -o smtpd_proxy_options=speed_adjust");
            }
        }
        let mut replaced = false;
        let mut master = String::new();
        let mut skipping = false;
        for line in stock.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let continuation = line.starts_with(' ') || line.starts_with('\t');
            if skipping && continuation {
                continue; // the options of the replaced service
            }
            skipping = false;
            if !continuation && fields.len() >= 2 && fields[0] == "smtp" && fields[1] == "inet" {
                master.push_str(&service);
                master.push('\n');
                replaced = true;
                skipping = true;
                continue;
            }
            master.push_str(line);
            master.push('\n');
        }
        assert!(replaced, "no `smtp inet` service in /etc/postfix/master.cf");
        std::fs::write(conf.join("master.cf"), master).expect("write master.cf");
        let o = run(Command::new("postconf").arg("-c").arg(&conf).args(["-F", "*/*/chroot = n"]));
        assert!(o.status.success(), "postconf -F: {}", String::from_utf8_lossy(&o.stderr));

        let out = std::fs::File::create(&fg_out).expect("start-fg output file");
        let err = out.try_clone().expect("clone file");
        let child = Command::new("postfix")
            .arg("-c")
            .arg(&conf)
            .arg("start-fg")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn postfix start-fg (is Postfix installed? `make e2e` installs it)");
        let mut pf =
            PrivatePostfix { dir: base, conf, queue, log_path, smtp_port: setup.smtp_port, child: Some(child), fg_out };
        pf.wait_ready();
        pf
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if TcpStream::connect(("127.0.0.1", self.smtp_port)).is_ok() {
                return;
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("postfix start-fg exited ({status}) before listening:\n{}", self.diagnostics());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("postfix did not open 127.0.0.1:{} in 60 s:\n{}", self.smtp_port, self.diagnostics());
    }

    /// The start-fg output and the mail log, for failure messages.
    pub fn diagnostics(&self) -> String {
        format!(
            "--- postfix start-fg output ---\n{}\n--- postfix log ---\n{}",
            std::fs::read_to_string(&self.fg_out).unwrap_or_default(),
            self.log()
        )
    }

    /// The whole mail log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The first log line for which `pred` holds, waiting up to `timeout`; panics with the log
    /// (saying what was awaited) when there is none.
    pub fn wait_line(&self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.log().lines().find(|l| pred(l)) {
                return line.to_string();
            }
            if Instant::now() >= deadline {
                panic!("no Postfix log line {what} within {timeout:?}:\n{}", self.diagnostics());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The first log line containing `pattern`, waiting up to `timeout`.
    pub fn wait_log(&self, pattern: &str, timeout: Duration) -> String {
        self.wait_line(&format!("containing {pattern:?}"), timeout, |l| l.contains(pattern))
    }

    /// The first log line containing every one of `patterns`, waiting up to `timeout`.
    pub fn wait_log_all(&self, patterns: &[&str], timeout: Duration) -> String {
        self.wait_line(&format!("containing all of {patterns:?}"), timeout, |l| patterns.iter().all(|p| l.contains(p)))
    }

    /// Asks Postfix to retry deferred mail now (`postfix flush`).
    pub fn flush(&self) {
        let o = run(Command::new("postfix").arg("-c").arg(&self.conf).arg("flush"));
        assert!(o.status.success(), "postfix flush: {}", String::from_utf8_lossy(&o.stderr));
    }

    /// True when no message waits in the queue (neither active nor deferred nor incoming).
    pub fn queue_empty(&self) -> bool {
        let o = run(Command::new("postqueue").arg("-c").arg(&self.conf).arg("-p"));
        if o.status.success() {
            let text = String::from_utf8_lossy(&o.stdout);
            return text.contains("Mail queue is empty");
        }
        // postqueue may refuse an alternate config directory: look at the queue files directly
        ["incoming", "active", "deferred"].iter().all(|d| count_files(&self.queue.join(d)) == 0)
    }

    /// The PID of Postfix's master process, from its pid file.
    pub fn master_pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.queue.join("pid/master.pid")).ok()?;
        text.trim().parse().ok()
    }

    /// Stops Postfix: `postfix stop` (best effort), then SIGTERM and, if need be, SIGKILL to
    /// the master and the start-fg child by PID.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        let master = self.master_pid();
        let _ = Command::new("postfix")
            .arg("-c")
            .arg(&self.conf)
            .arg("stop")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if let Some(p) = master.filter(|p| alive(*p)) {
            super::signal(p, "TERM");
        }
        if matches!(child.try_wait(), Ok(None)) {
            super::signal(child.id(), "TERM");
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let child_done = matches!(child.try_wait(), Ok(Some(_)));
            let master_done = master.is_none_or(|p| !alive(p));
            if child_done && master_done {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Some(p) = master.filter(|p| alive(*p)) {
            super::signal(p, "KILL");
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for PrivatePostfix {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether `pid` still runs (and is not a zombie).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // the state is the field after the parenthesised command name
            let state = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start()).unwrap_or("");
            !state.starts_with('Z') && !state.starts_with('X')
        }
        Err(_) => false,
    }
}

fn count_files(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| {
            let p = e.path();
            if p.is_dir() { count_files(&p) } else { 1 }
        })
        .sum()
}

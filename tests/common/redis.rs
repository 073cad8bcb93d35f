//! A real Debian `redis-server` on a free loopback port, for the Sidekiq delivery tests: no
//! persistence, its own temporary directory, stopped by PID on drop.

use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use super::receiver::quiet_port;

pub const INSTALL_HINT: &str = "apt-get install -y redis-server";

/// `redis-server` from PATH, else /usr/bin/redis-server; panics with the install command.
pub fn redis_server_binary() -> PathBuf {
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join("redis-server");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    let fallback = PathBuf::from("/usr/bin/redis-server");
    if fallback.is_file() {
        return fallback;
    }
    panic!("redis-server is not installed; the Sidekiq delivery tests need it: run `{INSTALL_HINT}` (or `make deps`)");
}

pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts on a free port and waits until it answers PING.
    pub fn start() -> RedisServer {
        let dir = tempfile::tempdir().expect("redis temp dir");
        let mut server = RedisServer { port: quiet_port(), child: None, dir };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("redis.log")).expect("redis log");
        let child = Command::new(redis_server_binary())
            .arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(log.try_clone().expect("redis log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start redis-server ({e}); install it with `{INSTALL_HINT}`"));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(pong) = self.query::<String>(&["PING"]) {
                assert_eq!(pong, "PONG");
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("redis-server exited ({status}); log:\n{}", self.log_text());
            }
            if Instant::now() > deadline {
                panic!("redis-server did not answer PING on port {}; log:\n{}", self.port, self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `redis://127.0.0.1:PORT/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    /// Runs one command on a fresh connection (blocking).
    pub fn query<T: ::redis::FromRedisValue>(&self, args: &[&str]) -> ::redis::RedisResult<T> {
        let client = ::redis::Client::open(self.url())?;
        let mut con = client.get_connection_with_timeout(Duration::from_secs(2))?;
        let mut cmd = ::redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query(&mut con)
    }

    /// Runs one command; panics on an error.
    pub fn cmd<T: ::redis::FromRedisValue>(&self, args: &[&str]) -> T {
        self.query(args).unwrap_or_else(|e| panic!("redis {args:?}: {e}"))
    }

    /// `LRANGE key 0 -1`.
    pub fn list(&self, key: &str) -> Vec<String> {
        self.cmd(&["LRANGE", key, "0", "-1"])
    }

    /// Kills the server (by PID); `start_again` brings it back on the same port.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn start_again(&mut self) {
        if self.child.is_none() {
            self.spawn();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

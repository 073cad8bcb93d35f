//! Listening sockets (TCP and unix), connection limits and the accept loops.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::IpNet;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Notify, watch};

use crate::config::BindAddress;
use crate::gate::verdict::Reason;
use crate::reject::{Action, RejectEntry, Stage};

pub enum Bound {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// Binds a listener. A stale unix socket file is replaced; anything else at that path is an
/// error.
pub fn bind(addr: &BindAddress, socket_mode: u32) -> std::io::Result<Bound> {
    match addr {
        BindAddress::Tcp(a) => {
            let sock = std::net::TcpListener::bind(a)?;
            sock.set_nonblocking(true)?;
            Ok(Bound::Tcp(TcpListener::from_std(sock)?))
        }
        BindAddress::Unix(path) => {
            remove_stale_socket(path)?;
            let l = UnixListener::bind(path)?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(socket_mode))?;
            Ok(Bound::Unix(l))
        }
    }
}

fn remove_stale_socket(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path),
        Ok(_) => Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        )),
        Err(_) => Ok(()),
    }
}

/// Connection counts shared by every SMTP/LMTP listener.
pub struct ConnLimits {
    max_total: usize,
    max_per_ip: usize,
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    idle: Notify,
    /// True from [`STRESS_PERCENT`] of `max_total` slots taken until fewer than
    /// [`CALM_PERCENT`] are: sessions then wait for commands `stress_command_timeout` at most.
    stress: watch::Sender<bool>,
}

/// Stress begins when this share of `max_connections` is in use...
pub const STRESS_PERCENT: usize = 80;
/// ...and ends below this one (a load hovering at the mark does not flip it, and wake every
/// idle session, with each connection).
pub const CALM_PERCENT: usize = 70;
/// No stress mode below this many slots: one connection of two is not an attack.
pub const STRESS_MIN_SLOTS: usize = 10;

/// Holds one connection slot; frees it on drop.
pub struct Slot {
    limits: Arc<ConnLimits>,
    ip: Option<IpAddr>,
}

impl ConnLimits {
    pub fn new(max_total: usize, max_per_ip: usize) -> Arc<ConnLimits> {
        Arc::new(ConnLimits {
            max_total,
            max_per_ip,
            total: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
            idle: Notify::new(),
            stress: watch::channel(false).0,
        })
    }

    /// Follows the stress state: true while the slots are nearly all taken.
    pub fn stress(&self) -> watch::Receiver<bool> {
        self.stress.subscribe()
    }

    /// Sets the stress state from the slots in use now, logging each change. Called after
    /// every change of the count; the count is read under the state's lock, so the last call
    /// decides.
    fn note_use(&self) {
        if self.max_total < STRESS_MIN_SLOTS {
            return;
        }
        let mut in_use = 0;
        let mut stressed = false;
        let changed = self.stress.send_if_modified(|s| {
            in_use = self.active();
            let mark = if *s { CALM_PERCENT } else { STRESS_PERCENT };
            stressed = in_use.saturating_mul(100) >= self.max_total.saturating_mul(mark);
            std::mem::replace(s, stressed) != stressed
        });
        if !changed {
            return;
        }
        crate::metrics::global().stress_changed(stressed);
        if stressed {
            tracing::warn!(
                in_use,
                max_connections = self.max_total,
                "under stress: connection slots nearly all taken; idle sessions get stress_command_timeout"
            );
        } else {
            tracing::info!(in_use, max_connections = self.max_total, "stress is over");
        }
    }

    /// Takes a slot, or says which limit is reached. `exempt` peers skip the per-IP limit.
    pub fn acquire(self: &Arc<Self>, ip: Option<IpAddr>, exempt: bool) -> Result<Slot, &'static str> {
        if self.total.fetch_add(1, Ordering::SeqCst) >= self.max_total {
            self.total.fetch_sub(1, Ordering::SeqCst);
            self.note_use();
            return Err("too many connections");
        }
        let mut counted_ip = None;
        if let (Some(ip), false) = (ip, exempt) {
            let mut map = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
            let n = map.entry(ip).or_insert(0);
            if *n >= self.max_per_ip {
                drop(map);
                self.total.fetch_sub(1, Ordering::SeqCst);
                self.note_use();
                return Err("too many connections from your address");
            }
            *n += 1;
            counted_ip = Some(ip);
        }
        self.note_use();
        Ok(Slot { limits: self.clone(), ip: counted_ip })
    }

    pub fn active(&self) -> usize {
        self.total.load(Ordering::SeqCst)
    }

    /// Waits until no connection is open or `grace` has passed; returns the number still open.
    pub async fn drain(&self, grace: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let notified = self.idle.notified();
            if self.active() == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.active();
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(ip) = self.ip {
            let mut map = self.limits.per_ip.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = map.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&ip);
                }
            }
        }
        let before = self.limits.total.fetch_sub(1, Ordering::SeqCst);
        if before == 1 {
            self.limits.idle.notify_waiters();
        }
        self.limits.note_use();
    }
}

pub fn is_trusted(ip: Option<IpAddr>, trusted: &[IpNet]) -> bool {
    match ip {
        // unix-socket peers are local; the socket's permissions decide who may connect
        None => true,
        Some(ip) => {
            let ip = match ip {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
                v4 => v4,
            };
            trusted.iter().any(|n| n.contains(&ip))
        }
    }
}

/// Refuses a connection over the limits: 421, close, and a reject-log entry when `logged`
/// holds the number of refusals left out of the log since the previous entry
/// ([`crate::frontend::refusals`]); the metrics count every refusal.
pub async fn refuse<S: tokio::io::AsyncWrite + Unpin>(
    mut stream: S,
    hostname: &str,
    ip: Option<IpAddr>,
    why: &str,
    listener: &str,
    (spool, logged): (&crate::spool::Spool, Option<u64>),
) {
    let text = format!("{hostname} Error: {why}");
    let entry = RejectEntry {
        at: time::OffsetDateTime::now_utc(),
        stage: Stage::Connect,
        action: Action::Tempfail,
        code: 421,
        enhanced: "4.7.0".into(),
        reason: Reason::TooManyConnections,
        text: text.clone(),
        client_ip: ip.map(|i| i.to_string()).unwrap_or_default(),
        helo: String::new(),
        mail_from: String::new(),
        rcpt_to: Vec::new(),
        message_id: String::new(),
        subject: String::new(),
        listener: listener.to_string(),
        suppressed: logged.unwrap_or(0),
    };
    if logged.is_some() {
        crate::frontend::log_reject(spool, &entry);
    } else {
        crate::metrics::global().refused(entry.reason.as_str(), entry.action.as_str(), entry.stage.as_str());
    }
    let line = format!("421 4.7.0 {text}\r\n");
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.write_all(line.as_bytes())).await;
    let _ = stream.shutdown().await;
}

/// Waits until the shutdown flag turns true.
pub async fn shutdown_signalled(mut rx: watch::Receiver<bool>) {
    while !*rx.borrow() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn limits_count_total_and_per_ip() {
        let l = ConnLimits::new(3, 2);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let a = l.acquire(Some(ip), false).unwrap();
        let _b = l.acquire(Some(ip), false).unwrap();
        assert!(l.acquire(Some(ip), false).is_err(), "per-ip limit");
        let _c = l.acquire(Some(ip), true).unwrap();
        assert!(l.acquire(None, true).is_err(), "total limit");
        drop(a);
        assert!(l.acquire(Some(ip), false).is_ok());
    }

    #[test]
    fn stress_from_eighty_percent_of_the_slots_until_below_seventy() {
        let l = ConnLimits::new(10, 10);
        let stress = l.stress();
        let mut slots: Vec<Slot> = (0..7).map(|_| l.acquire(None, true).unwrap()).collect();
        assert!(!*stress.borrow());
        slots.push(l.acquire(None, true).unwrap());
        assert!(*stress.borrow(), "8 of 10");
        slots.pop();
        assert!(*stress.borrow(), "7 of 10: not below 70% yet");
        slots.pop();
        assert!(!*stress.borrow(), "6 of 10");
        slots.push(l.acquire(None, true).unwrap());
        assert!(!*stress.borrow(), "7 of 10 on the way up");
        // a refusal (which counts for a moment) leaves it right
        let many: Vec<Slot> = (0..3).map(|_| l.acquire(None, true).unwrap()).collect();
        assert!(l.acquire(None, true).is_err());
        assert!(*stress.borrow(), "10 of 10");
        drop(many);
        assert!(*stress.borrow(), "7 of 10");
        slots.pop();
        assert!(!*stress.borrow(), "6 of 10");
        let small = ConnLimits::new(STRESS_MIN_SLOTS - 1, 10);
        let _all: Vec<Slot> = (0..STRESS_MIN_SLOTS - 1).map(|_| small.acquire(None, true).unwrap()).collect();
        assert!(!*small.stress().borrow(), "no stress mode on a small server");
    }

    #[test]
    fn trust_rules() {
        let nets: Vec<IpNet> = vec!["127.0.0.1/32".parse().unwrap()];
        assert!(is_trusted(Some("127.0.0.1".parse().unwrap()), &nets));
        assert!(is_trusted(Some("::ffff:127.0.0.1".parse().unwrap()), &nets));
        assert!(!is_trusted(Some("127.0.0.2".parse().unwrap()), &nets));
        assert!(is_trusted(None, &nets));
    }
}

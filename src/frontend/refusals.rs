//! How often a connection refused over `max_connections` or `max_connections_per_ip` is
//! written to the reject log. Every such refusal is counted in the metrics, but a connection
//! flood would otherwise write one entry per connection: thousands a second, each a spool
//! write, pushing the rest of the reject log out past `reject_max_entries`. So per client
//! address and refusal, the first is logged, then at most one entry per interval, carrying the
//! number of refusals left out since the previous entry (`suppressed`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// At most one entry per address and refusal in this time.
pub const INTERVAL: Duration = Duration::from_secs(10);
/// Addresses remembered at once. Past this, refusals from addresses not in the table share
/// one window (a flood from many addresses still gets a few entries a second, not thousands).
pub const MAX_ADDRESSES: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Key {
    /// The client's address (None: a unix-socket peer) and which limit refused it.
    Client(Option<IpAddr>, &'static str),
    /// Any address once the table is full.
    Overflow(&'static str),
}

struct Window {
    logged_at: Instant,
    suppressed: u64,
}

struct Table {
    windows: HashMap<Key, Window>,
    last_prune: Option<Instant>,
}

pub struct RefusalThrottle {
    interval: Duration,
    max: usize,
    table: Mutex<Table>,
}

impl Default for RefusalThrottle {
    fn default() -> Self {
        RefusalThrottle::new(INTERVAL, MAX_ADDRESSES)
    }
}

impl RefusalThrottle {
    pub fn new(interval: Duration, max: usize) -> Self {
        RefusalThrottle { interval, max, table: Mutex::new(Table { windows: HashMap::new(), last_prune: None }) }
    }

    /// Whether the refusal of a connection from `ip` for `why`, at `now`, goes to the reject
    /// log: `Some(n)` with the number of like refusals left out since the last entry, or None
    /// when this one is left out.
    pub fn admit(&self, ip: Option<IpAddr>, why: &'static str, now: Instant) -> Option<u64> {
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let mut key = Key::Client(ip, why);
        if !t.windows.contains_key(&key) && t.windows.len() >= self.max {
            // Windows that are over hold nothing worth keeping but their counts, which the
            // metrics have too. At most once a second: the scan is over the whole table.
            if t.last_prune.is_none_or(|p| now.saturating_duration_since(p) >= Duration::from_secs(1)) {
                let interval = self.interval;
                t.windows.retain(|_, w| now.saturating_duration_since(w.logged_at) < interval);
                t.last_prune = Some(now);
            }
            if t.windows.len() >= self.max {
                key = Key::Overflow(why);
            }
        }
        match t.windows.get_mut(&key) {
            Some(w) if now.saturating_duration_since(w.logged_at) < self.interval => {
                w.suppressed += 1;
                None
            }
            Some(w) => {
                let suppressed = std::mem::take(&mut w.suppressed);
                w.logged_at = now;
                Some(suppressed)
            }
            None => {
                t.windows.insert(key, Window { logged_at: now, suppressed: 0 });
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PER_IP: &str = "too many connections from your address";
    const TOTAL: &str = "too many connections";

    fn ip(n: u8) -> Option<IpAddr> {
        Some(IpAddr::from([192, 0, 2, n]))
    }

    #[test]
    fn one_entry_per_address_and_refusal_per_interval_with_the_count_left_out() {
        let t = RefusalThrottle::new(Duration::from_secs(10), 100);
        let t0 = Instant::now();
        assert_eq!(t.admit(ip(1), PER_IP, t0), Some(0));
        for i in 1..=50 {
            assert_eq!(t.admit(ip(1), PER_IP, t0 + Duration::from_millis(i * 100)), None);
        }
        // Another address, another limit: their own windows.
        assert_eq!(t.admit(ip(2), PER_IP, t0), Some(0));
        assert_eq!(t.admit(ip(1), TOTAL, t0), Some(0));
        assert_eq!(t.admit(None, PER_IP, t0), Some(0));
        assert_eq!(t.admit(ip(1), PER_IP, t0 + Duration::from_secs(10)), Some(50));
        assert_eq!(t.admit(ip(1), PER_IP, t0 + Duration::from_secs(11)), None);
        assert_eq!(t.admit(ip(1), PER_IP, t0 + Duration::from_secs(25)), Some(1));
        assert_eq!(t.admit(ip(2), PER_IP, t0 + Duration::from_secs(25)), Some(0));
    }

    #[test]
    fn a_full_table_drops_finished_windows_then_shares_one() {
        let t = RefusalThrottle::new(Duration::from_secs(10), 3);
        let t0 = Instant::now();
        for n in 1..=3 {
            assert_eq!(t.admit(ip(n), TOTAL, t0), Some(0));
        }
        // Full, every window still open: new addresses share the overflow window.
        assert_eq!(t.admit(ip(4), TOTAL, t0), Some(0));
        assert_eq!(t.admit(ip(5), TOTAL, t0), None);
        assert_eq!(t.admit(ip(6), TOTAL, t0 + Duration::from_millis(500)), None);
        // Later the finished windows go, and the table has room again.
        let later = t0 + Duration::from_secs(12);
        assert_eq!(t.admit(ip(7), TOTAL, later), Some(0));
        assert_eq!(t.admit(ip(7), TOTAL, later), None);
        assert!(t.table.lock().unwrap().windows.len() <= 3);
    }
}

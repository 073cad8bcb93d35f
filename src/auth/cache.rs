//! A bounded DNS cache shared by all sessions, plugged into mail-auth through its
//! `ResolverCache` trait (mail-auth 0.13 has no cache of its own). Entries live for the record's
//! TTL, at most [`MAX_TTL`]; when the cache is full, expired entries go first, then arbitrary
//! ones (an eighth of the capacity at a time).

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mail_auth::ResolverCache;

/// Longest time an entry is kept, whatever its TTL (a revoked DKIM key is noticed within it).
pub const MAX_TTL: Duration = Duration::from_secs(3600);

pub struct DnsCache<K, V> {
    map: Mutex<HashMap<K, (V, Instant)>>,
    capacity: usize,
}

impl<K: Hash + Eq, V: Clone> DnsCache<K, V> {
    pub fn new(capacity: usize) -> Self {
        DnsCache { map: Mutex::new(HashMap::new()), capacity: capacity.max(1) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, (V, Instant)>> {
        // A panic elsewhere cannot leave a half-written entry: keep using the map.
        self.map.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<K: Hash + Eq, V: Clone> ResolverCache<K, V> for DnsCache<K, V> {
    fn get<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let mut map = self.lock();
        match map.get(name) {
            Some((value, until)) if *until > Instant::now() => Some(value.clone()),
            Some(_) => {
                map.remove(name);
                None
            }
            None => None,
        }
    }

    fn remove<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.lock().remove(name).map(|(value, _)| value)
    }

    fn insert(&self, key: K, value: V, valid_until: Instant) {
        let now = Instant::now();
        let until = valid_until.min(now + MAX_TTL);
        if until <= now {
            return;
        }
        let mut map = self.lock();
        if map.len() >= self.capacity && !map.contains_key(&key) {
            map.retain(|_, (_, u)| *u > now);
            let mut excess = (map.len() + self.capacity / 8 + 1).saturating_sub(self.capacity);
            map.retain(|_, _| {
                let keep = excess == 0;
                excess = excess.saturating_sub(1);
                keep
            });
        }
        map.insert(key, (value, until));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expires_and_stays_bounded() {
        let c: DnsCache<Box<str>, u32> = DnsCache::new(16);
        let later = Instant::now() + Duration::from_secs(60);
        c.insert("a.example.".into(), 1, later);
        assert_eq!(c.get("a.example."), Some(1));
        c.insert("gone.example.".into(), 2, Instant::now());
        assert_eq!(c.get("gone.example."), None);
        for i in 0..100 {
            c.insert(format!("{i}.example.").into(), i, later);
            assert!(c.len() <= 16);
        }
        assert_eq!(c.get("99.example."), Some(99));
        assert_eq!(c.remove("99.example."), Some(99));
        assert_eq!(c.get("99.example."), None);
        // the longest TTL is capped
        let c: DnsCache<Box<str>, u32> = DnsCache::new(1);
        c.insert("x.".into(), 1, Instant::now() + Duration::from_secs(86_400 * 30));
        assert_eq!(c.get("x."), Some(1));
        assert!(c.lock().get("x.").is_some_and(|(_, u)| *u <= Instant::now() + MAX_TTL));
    }
}

//! Key and value encodings of the spool's trees, and the public dedup key builders.
//!
//! Every number in a key is big-endian so that sled's byte order is numeric order (FIFO).

use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::job::JobState;

/// Largest value spools before segment files wrote to the raw tree (sled moves a page over
/// ~131 KiB to its unsynced blob files, so chunks were kept small).
#[cfg(test)]
pub(super) const CHUNK: usize = 4096;

/// A job record whose JSON is longer than this keeps its immutable part as a blob in a segment
/// file and only a small stub in the jobs tree: sled rewrites whole pages, so big values in
/// its trees cost many times their size in writes.
pub(super) const RECORD_INLINE_MAX: usize = 4096;

/// Key of a job record (jobs tree) and prefix of a raw message's chunks (raw tree).
pub(super) fn id_key(id: u64) -> [u8; 8] {
    id.to_be_bytes()
}

/// State index key: state tag byte + job id.
pub(super) fn state_key(state: JobState, id: u64) -> [u8; 9] {
    tagged_key(state.tag(), id)
}

/// State index tag of a ready job that waits for its next attempt (counted as ready).
pub(super) const WAITING_TAG: u8 = b'w';

/// The job's state index tag: its state's, or [`WAITING_TAG`] for a ready job with a future
/// attempt time.
pub(super) fn index_tag(job: &crate::job::Job) -> u8 {
    if job.state == JobState::Ready && job.next_attempt_at.is_some() { WAITING_TAG } else { job.state.tag() }
}

/// State index key from a tag (see [`index_tag`]) and a job id.
pub(super) fn tagged_key(tag: u8, id: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = tag;
    k[1..].copy_from_slice(&id.to_be_bytes());
    k
}

/// Reference index key: raw message blob id + id of a job that uses it.
pub(super) fn ref_key(raw_id: u64, id: u64) -> [u8; 16] {
    lease_key(raw_id, id)
}

/// Timer index key (tree `leases`): when (unix ms) + job id. A timer ends a lease, ends a
/// wait for the next attempt, or purges a done job.
pub(super) fn lease_key(until_ms: u64, id: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&until_ms.to_be_bytes());
    k[8..].copy_from_slice(&id.to_be_bytes());
    k
}

pub(super) fn parse_lease_key(k: &[u8]) -> Option<(u64, u64)> {
    if k.len() != 16 {
        return None;
    }
    Some((be_u64(&k[..8])?, be_u64(&k[8..])?))
}

/// Raw tree key: raw id + chunk index (also the reject log's key layout).
pub(super) fn chunk_key(raw_id: u64, index: u32) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..8].copy_from_slice(&raw_id.to_be_bytes());
    k[8..].copy_from_slice(&index.to_be_bytes());
    k
}

/// Dedup tree value: the job id that holds the key + expiry (unix ms).
pub(super) fn dedup_value(id: u64, expires_ms: u64) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&id.to_be_bytes());
    v[8..].copy_from_slice(&expires_ms.to_be_bytes());
    v
}

pub(super) fn parse_dedup_value(v: &[u8]) -> Option<(u64, u64)> {
    if v.len() != 16 {
        return None;
    }
    Some((be_u64(&v[..8])?, be_u64(&v[8..])?))
}

/// Reject log key: unix nanos + sequence number.
pub(super) fn reject_key(nanos: u64, seq: u32) -> [u8; 12] {
    chunk_key(nanos, seq)
}

pub(super) fn parse_reject_key(k: &[u8]) -> Option<(u64, u32)> {
    if k.len() != 12 {
        return None;
    }
    let seq = u32::from_be_bytes(k[8..].try_into().ok()?);
    Some((be_u64(&k[..8])?, seq))
}

pub(super) fn be_u64(b: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(b.try_into().ok()?))
}

/// Milliseconds since the epoch (0 before it).
pub(super) fn unix_ms(t: OffsetDateTime) -> u64 {
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

/// Nanoseconds since the epoch (0 before it, saturating far in the future).
pub(super) fn unix_nanos(t: OffsetDateTime) -> u64 {
    u64::try_from(t.unix_timestamp_nanos().max(0)).unwrap_or(u64::MAX)
}

/// Now, in UTC, truncated to whole milliseconds (so it survives the ms lease keys exactly).
pub(super) fn now_ms_precision() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now - time::Duration::nanoseconds(i64::from(now.nanosecond() % 1_000_000))
}

/// `t + d`, saturating at year 9999 instead of panicking on absurd durations.
pub(super) fn add_saturating(t: OffsetDateTime, d: std::time::Duration) -> OffsetDateTime {
    let far = time::macros::datetime!(9999-12-31 0:00 UTC);
    time::Duration::try_from(d).ok().and_then(|d| t.checked_add(d)).map_or(far, |x| x.min(far))
}

fn hashed(tag: u8, parts: &[&[u8]]) -> Vec<u8> {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    let mut key = Vec::with_capacity(33);
    key.push(tag);
    key.extend_from_slice(&h.finalize());
    key
}

/// Dedup key for "the same queue file delivered to the same recipient again" (a Postfix retry
/// after a lost 250). Postfix's short queue ids repeat (inode number and microseconds), so the
/// key also holds the mailbox, the key and the body hash: a retry re-sends the same body, an
/// unrelated message that happens to get a recycled queue id does not. The recipient's domain
/// is compared case-insensitively, its local part (which holds the key) exactly. An empty
/// queue id gives an empty key, which `store` ignores.
pub fn dedup_key_ident(queue_id: &str, rcpt: &str, mailbox: &str, key: &str, body_sha256: &[u8; 32]) -> Vec<u8> {
    if queue_id.is_empty() {
        return Vec::new();
    }
    let rcpt = match rcpt.rsplit_once('@') {
        Some((local, domain)) => format!("{local}@{}", domain.to_ascii_lowercase()),
        None => rcpt.to_string(),
    };
    hashed(b'i', &[queue_id.as_bytes(), rcpt.as_bytes(), mailbox.as_bytes(), key.as_bytes(), body_sha256])
}

/// Dedup key for "the same message (Message-ID and body hash) for the same mailbox and key".
/// An empty Message-ID gives an empty key, which `store` ignores.
pub fn dedup_key_content(message_id: &str, mailbox: &str, key: &str, body_sha256: &[u8; 32]) -> Vec<u8> {
    if message_id.is_empty() {
        return Vec::new();
    }
    hashed(b'c', &[message_id.as_bytes(), mailbox.as_bytes(), key.as_bytes(), body_sha256])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_numerically_and_round_trip() {
        assert!(id_key(255) < id_key(256));
        assert!(state_key(JobState::Ready, 9) < state_key(JobState::Ready, 10));
        assert_eq!(parse_lease_key(&lease_key(7, 9)), Some((7, 9)));
        assert_eq!(parse_dedup_value(&dedup_value(3, 4)), Some((3, 4)));
        assert_eq!(parse_reject_key(&reject_key(5, 6)), Some((5, 6)));
        assert!(reject_key(5, 7) < reject_key(6, 0));
    }

    #[test]
    fn dedup_keys() {
        let h = [7u8; 32];
        let k = |q: &str, r: &str| dedup_key_ident(q, r, "incoming", "k", &h);
        assert_eq!(k("ABC", "user@Example.com"), k("ABC", "user@example.com"));
        assert_ne!(k("ABC", "incoming+AbC@x"), k("ABC", "incoming+abc@x"), "the local part holds the key");
        assert_ne!(k("ABC", "a@x"), k("ABD", "a@x"));
        assert_ne!(k("ABC", "a@x"), dedup_key_ident("ABC", "a@x", "incoming", "k", &[8u8; 32]), "a recycled queue id");
        assert!(k("", "a@x").is_empty());
        let h = [1u8; 32];
        assert_ne!(dedup_key_content("<m@x>", "incoming", "k1", &h), dedup_key_content("<m@x>", "incoming", "k2", &h));
        // Length prefixes: moving a byte between fields changes the key.
        assert_ne!(dedup_key_content("<m@x>a", "b", "k", &h), dedup_key_content("<m@x>", "ab", "k", &h));
        assert!(dedup_key_content("", "incoming", "k", &h).is_empty());
    }
}

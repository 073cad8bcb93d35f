//! The dedup index: key -> (job id, expiry). Looked up and written by the committer alone
//! (jobs.rs), batch by batch in order, so two concurrent stores of the same key create one job.

use sled::Tree;
use time::OffsetDateTime;

use super::keys::{parse_dedup_value, unix_ms};
use super::{Spool, SpoolError};

/// The job that holds one of `keys` and has not expired at `now_ms`, if any. An unreadable
/// value counts as absent (the store overwrites it).
pub(super) fn holder(tree: &Tree, keys: &[Vec<u8>], now_ms: u64) -> Result<Option<u64>, SpoolError> {
    for key in keys {
        if let Some(value) = tree.get(key)?
            && let Some((id, expires)) = parse_dedup_value(&value)
            && expires > now_ms
        {
            return Ok(Some(id));
        }
    }
    Ok(None)
}

impl Spool {
    /// Removes expired dedup entries; an entry a concurrent store has just renewed is kept
    /// (compare-and-swap against the value read).
    pub(super) fn prune_dedup(&self) -> Result<usize, SpoolError> {
        let now = unix_ms(OffsetDateTime::now_utc());
        let mut removed = 0;
        for item in self.0.dedup.iter() {
            let (key, value) = item?;
            let expired = parse_dedup_value(&value).is_none_or(|(_, expires)| expires <= now);
            if expired && self.0.dedup.compare_and_swap(&key, Some(&value), None as Option<&[u8]>)?.is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }
}

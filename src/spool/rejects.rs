//! The operator reject log: key = unix nanos at insertion (BE u64) + sequence (BE u32), value =
//! the entry's JSON. Keys are handed out and inserted under one lock and never go backwards,
//! so a reader following with `after = <last cursor>` never misses an entry.

use std::ops::Bound;
use std::sync::atomic::Ordering;

use time::OffsetDateTime;

use super::keys::{parse_reject_key, reject_key, unix_nanos};
use super::{RejectQuery, RejectRecord, Spool, SpoolError};
use crate::reject::RejectEntry;

/// Longest stored entry (see `keys::CHUNK` for why values stay small). Longer entries are
/// stored with their client-supplied fields shortened; the tracing event keeps them whole.
const MAX_STORED: usize = 4096;

impl Spool {
    /// Stores a reject entry (durable at the next commit, which this asks for) and emits it as
    /// one tracing event (target `mailgate::reject`).
    pub fn log_reject(&self, entry: &RejectEntry) -> Result<(), SpoolError> {
        tracing::info!(target: "mailgate::reject", "{}", entry.to_json_line());
        self.check_open()?;
        let value = bounded_json(entry)?;
        {
            let mut clock = self.0.reject_clock.lock().unwrap_or_else(|p| p.into_inner());
            let now = unix_nanos(OffsetDateTime::now_utc());
            let (last_nanos, last_seq) = *clock;
            let next = if now > last_nanos {
                (now, 0)
            } else if last_seq == u32::MAX {
                (last_nanos.saturating_add(1), 0)
            } else {
                (last_nanos, last_seq + 1)
            };
            self.0.rejects.insert(reject_key(next.0, next.1), value)?;
            *clock = next;
        }
        self.0.reject_count.fetch_add(1, Ordering::Relaxed);
        self.commit_soon();
        Ok(())
    }

    /// Reject entries, oldest first.
    pub fn rejects(&self, q: &RejectQuery) -> Result<Vec<RejectRecord>, SpoolError> {
        let mut start: Bound<Vec<u8>> = Bound::Unbounded;
        if let Some(since) = q.since {
            // Keys are insertion times, never earlier than `at`: start the scan there.
            start = Bound::Included(reject_key(unix_nanos(since), 0).to_vec());
        }
        if let Some(cursor) = &q.after {
            let key = hex::decode(cursor)
                .ok()
                .filter(|k| parse_reject_key(k).is_some())
                .ok_or_else(|| SpoolError::NotFound(format!("reject cursor {cursor:?}")))?;
            let later = match &start {
                Bound::Included(s) => key >= *s,
                _ => true,
            };
            if later {
                start = Bound::Excluded(key);
            }
        }
        let limit = if q.limit == 0 { usize::MAX } else { q.limit };
        let mut out = Vec::new();
        for item in self.0.rejects.range((start, Bound::Unbounded)) {
            let (key, value) = item?;
            let entry: RejectEntry = match serde_json::from_slice(&value) {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(target: "mailgate::spool", error = %e, key = %hex::encode(&key), "unreadable reject entry");
                    continue;
                }
            };
            if q.since.is_some_and(|since| entry.at < since) || q.reason.is_some_and(|r| r != entry.reason) {
                continue;
            }
            out.push(RejectRecord { cursor: hex::encode(&key), entry });
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// Drops entries older than the retention, then the oldest over the maximum count.
    pub(super) fn prune_rejects(&self) -> Result<usize, SpoolError> {
        let i = &self.0;
        let mut removed = 0;
        let mut remove = |key: &[u8]| -> Result<(), SpoolError> {
            if i.rejects.remove(key)?.is_some() {
                removed += 1;
                let _ = i.reject_count.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
            }
            Ok(())
        };
        let retention = i.opts.reject_retention;
        if !retention.is_zero() {
            let cutoff = time::Duration::try_from(retention)
                .ok()
                .and_then(|r| OffsetDateTime::now_utc().checked_sub(r))
                .map_or(0, unix_nanos);
            let old: Vec<sled::IVec> = i.rejects.range(..reject_key(cutoff, 0)).keys().collect::<Result<_, _>>()?;
            for key in old {
                remove(&key)?;
            }
        }
        let max = i.opts.reject_max_entries as u64;
        let count = i.reject_count.load(Ordering::Relaxed);
        if max > 0 && count > max {
            let excess = usize::try_from(count - max).unwrap_or(usize::MAX);
            let oldest: Vec<sled::IVec> = i.rejects.iter().keys().take(excess).collect::<Result<_, _>>()?;
            for key in oldest {
                remove(&key)?;
            }
        }
        Ok(removed)
    }
}

/// The entry's JSON, with client-supplied fields shortened until it fits [`MAX_STORED`].
fn bounded_json(entry: &RejectEntry) -> Result<Vec<u8>, SpoolError> {
    let encode = |e: &RejectEntry| serde_json::to_vec(e).map_err(|e| SpoolError::Corrupt(format!("reject entry: {e}")));
    let mut json = encode(entry)?;
    let mut cap = 512;
    while json.len() > MAX_STORED && cap >= 8 {
        let mut e = entry.clone();
        for field in [&mut e.text, &mut e.helo, &mut e.mail_from, &mut e.message_id, &mut e.subject, &mut e.client_ip] {
            shorten(field, cap);
        }
        if e.rcpt_to.len() > 8 {
            let more = e.rcpt_to.len() - 8;
            e.rcpt_to.truncate(8);
            e.rcpt_to.push(format!("... {more} more"));
        }
        for rcpt in &mut e.rcpt_to {
            shorten(rcpt, cap);
        }
        json = encode(&e)?;
        cap /= 2;
    }
    Ok(json)
}

fn shorten(s: &mut String, max: usize) {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("...");
    }
}

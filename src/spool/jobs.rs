//! Storing jobs. The session writes the raw message (once) and any full-job blob to a segment
//! and prepares every job record; the group committer then plans the whole batch of such
//! messages (de-duplication decided, every insert written to one journal frame: each record
//! with its state index entry, raw-message reference and dedup entries), makes the frame
//! durable, and only then applies it to sled with plain inserts (journal.rs). `store` returns
//! only after that.
//!
//! No sled transaction: every one writes sled's log buffer out twice (sled 0.34's `pin_log`
//! rolls it before and after its batch manifest). A batch's atomicity comes from the journal
//! instead: nothing reaches sled before its frame is durable, and the frame is applied again
//! at open unless sled kept the whole batch.

use std::collections::HashMap;

use sled::transaction::TransactionError;
use tokio::sync::oneshot;

use super::committer::Msg;
use super::journal::{Frame, INLINE_MAX, JournalTrees, TreeId};
use super::keys::{dedup_value, id_key, now_ms_precision, ref_key, state_key, unix_ms};
use super::records::StoredJob;
use super::segments::{Loc, loc_key};
use super::{NewJob, Spool, SpoolError, StoreOutcome, dedup};
use crate::job::{JobState, format_id};

/// The ids of one store's jobs while they are pending (see `Inner::pending`); dropping it,
/// after the commit or on any error, makes them leasable.
pub(super) struct Pending<'a> {
    spool: &'a Spool,
    ids: Vec<u64>,
}

impl<'a> Pending<'a> {
    #[cfg(test)]
    pub(super) fn for_test(spool: &'a Spool) -> Pending<'a> {
        Pending { spool, ids: Vec::new() }
    }

    fn add(&mut self, id: u64) {
        if let Ok(mut p) = self.spool.0.pending.lock() {
            p.insert(id);
        }
        self.ids.push(id);
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if let Ok(mut p) = self.spool.0.pending.lock() {
            for id in &self.ids {
                p.remove(id);
            }
        }
    }
}

/// A job ready to be written by the committer.
pub(super) struct Prepared {
    id: u64,
    record: Vec<u8>,
    mailbox: Vec<u8>,
    keys: Vec<Vec<u8>>,
    /// The full-job blob, for a record that is only a stub.
    full: Option<Blob>,
}

/// A blob (raw message or full job) written to a segment by the session: its id, where it is,
/// and its bytes when they are small enough to travel in the journal frame.
pub(super) struct Blob {
    pub id: u64,
    pub loc: Loc,
    pub inline: Option<Vec<u8>>,
}

impl Blob {
    /// Keeps a copy of a small blob's bytes: the staged store outlives the session's buffer
    /// on its way to the committer, and one copy of a few KiB is the price of leaving out a
    /// second `fdatasync`.
    pub fn new(id: u64, loc: Loc, bytes: &[u8]) -> Blob {
        Blob { id, loc, inline: (bytes.len() <= INLINE_MAX).then(|| bytes.to_vec()) }
    }

    /// The same for bytes the caller owns and no longer needs (a full-job record): moved, not
    /// copied.
    pub fn owned(id: u64, loc: Loc, bytes: Vec<u8>) -> Blob {
        Blob { id, loc, inline: (bytes.len() <= INLINE_MAX).then_some(bytes) }
    }
}

/// One message's jobs, prepared by its session for the committer.
pub(super) struct Staged {
    raw: Blob,
    now_ms: u64,
    /// When the dedup entries written for these jobs expire.
    expires: u64,
    jobs: Vec<Prepared>,
}

/// The trees a store writes, held by the committer.
#[derive(Clone)]
pub(super) struct StoreTrees {
    pub trees: JournalTrees,
    /// Dedup window is not zero.
    pub dedup_on: bool,
}

/// Plans `batch`: decides de-duplication and writes every insert to `frame`; sled is not
/// touched (the committer applies the frame once it is durable). Per message, one outcome per
/// job, in order. A job is a duplicate when a dedup entry of an earlier job (stored before, or
/// earlier in the batch) holds one of its keys and has not expired.
pub(super) fn plan(
    st: &StoreTrees,
    batch: &[&Staged],
    frame: &mut Frame,
) -> Result<Vec<Vec<StoreOutcome>>, SpoolError> {
    let t = &st.trees;
    let mut all = Vec::with_capacity(batch.len());
    let mut blobs: Vec<&Blob> = Vec::new();
    // Dedup keys of the jobs planned so far in this batch (not in sled yet).
    let mut planned: HashMap<&[u8], u64> = HashMap::new();
    for staged in batch {
        let mut out = Vec::with_capacity(staged.jobs.len());
        let mut raw_used = false;
        for p in &staged.jobs {
            if st.dedup_on {
                let earlier = match p.keys.iter().find_map(|k| planned.get(k.as_slice())) {
                    Some(id) => Some(*id),
                    None => dedup::holder(&t.dedup, &p.keys, staged.now_ms)?,
                };
                if let Some(first) = earlier {
                    out.push(StoreOutcome::Duplicate { id: format_id(first) });
                    continue;
                }
            }
            if !raw_used {
                raw_used = true;
                blobs.push(&staged.raw);
            }
            frame.put(TreeId::Jobs, &id_key(p.id), &p.record);
            frame.put(TreeId::State, &state_key(JobState::Ready, p.id), &p.mailbox);
            frame.put(TreeId::Refs, &ref_key(staged.raw.id, p.id), &[]);
            if let Some(full) = &p.full {
                // Every blob a job uses has a reference: the sweep at open (sweep.rs) relies on it.
                frame.put(TreeId::Refs, &ref_key(full.id, p.id), &[]);
                blobs.push(full);
            }
            if st.dedup_on {
                for key in &p.keys {
                    frame.put(TreeId::Dedup, key, &dedup_value(p.id, staged.expires));
                    planned.insert(key, p.id);
                }
            }
            out.push(StoreOutcome::Stored { id: format_id(p.id) });
        }
        all.push(out);
    }
    for blob in blobs {
        frame.put(TreeId::Rawloc, &loc_key(blob.id), &blob.loc.encode());
        frame.message(&blob.loc, blob.inline.as_deref());
    }
    Ok(all)
}

pub(super) fn tx_error(e: TransactionError<SpoolError>) -> SpoolError {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => SpoolError::Storage(e),
    }
}

/// What the session keeps of each prepared job: its mailbox (for the depth counts) and its
/// full-job blob (removed again if the job turns out a duplicate).
pub(super) struct Kept {
    mailbox: Vec<u8>,
    full: Option<u64>,
}

impl Spool {
    /// Stores one message and its jobs (one per accepted mailbox and key); the raw message is
    /// stored once. One outcome per job, in order. Returns only after the commit.
    pub async fn store(&self, raw: &[u8], jobs: Vec<NewJob>) -> Result<Vec<StoreOutcome>, SpoolError> {
        self.check_open()?;
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        // The segment write is a `write` to the page cache (the committer syncs it), so it runs
        // on the session's worker: no thread hop and no copy of the message. The new jobs stay
        // pending (not leasable) until the commit that covers them.
        let mut pending = Pending { spool: self, ids: Vec::with_capacity(jobs.len()) };
        let mut written = Vec::new();
        let (staged, kept) = match self.stage(raw, jobs, &mut written, &mut pending) {
            Ok(s) => s,
            Err(e) => {
                self.remove_blobs(written);
                return Err(e);
            }
        };
        let (tx, rx) = oneshot::channel();
        if self.0.commits.send(Msg::Store(staged, tx)).is_err() {
            self.remove_blobs(written);
            return Err(SpoolError::Closed);
        }
        // On an error from here on the jobs may be in the trees (the flush failed after the
        // inserts): their blobs stay.
        let outcomes = rx.await.map_err(|_| SpoolError::Closed)??;
        let mut unused: Vec<u64> = Vec::new();
        for (o, k) in outcomes.iter().zip(kept) {
            match o {
                StoreOutcome::Stored { .. } => self.count(&k.mailbox, None, Some(JobState::Ready.tag())),
                StoreOutcome::Duplicate { .. } => unused.extend(k.full),
            }
        }
        // Leasable only once counted: a lease before the count would take one from a ready
        // count of zero (it does not go below) and the count would keep a phantom ready job.
        drop(pending);
        if outcomes.iter().any(|o| matches!(o, StoreOutcome::Stored { .. })) {
            // One worker, not all: a worker that finds a job wakes the next (delivery/worker.rs).
            self.0.ready.notify_one();
        } else {
            unused.extend(written.first());
        }
        self.remove_blobs(unused);
        Ok(outcomes)
    }

    /// Test only: stores without the committer's flush (the inserts are applied here), so the
    /// jobs are visible but not yet committed.
    #[cfg(test)]
    pub(super) fn store_blocking(
        &self,
        raw: &[u8],
        jobs: Vec<NewJob>,
        pending: &mut Pending<'_>,
    ) -> Result<Vec<StoreOutcome>, SpoolError> {
        let mut written = Vec::new();
        let (staged, _) = self.stage(raw, jobs, &mut written, pending)?;
        let mut frame = Frame::new(1);
        let out = plan(&self.store_trees(), &[&staged], &mut frame)?.pop().unwrap_or_default();
        super::journal::apply(&self.journal_trees(), &frame.finish())?;
        Ok(out)
    }

    /// Test only: the trees the committer was given.
    #[cfg(test)]
    pub(super) fn store_trees(&self) -> StoreTrees {
        let i = &self.0;
        StoreTrees { trees: self.journal_trees(), dedup_on: !i.opts.dedup_window.is_zero() }
    }

    /// Writes the raw message and any full-job blobs (their ids go to `written`) and prepares
    /// the job records.
    pub(super) fn stage(
        &self,
        raw_msg: &[u8],
        jobs: Vec<NewJob>,
        written: &mut Vec<u64>,
        pending: &mut Pending<'_>,
    ) -> Result<(Staged, Vec<Kept>), SpoolError> {
        let i = &self.0;
        let raw_id = i.db.generate_id()?;
        let raw = Blob::new(raw_id, self.write_message(raw_id, raw_msg)?, raw_msg);
        written.push(raw_id);
        let now = now_ms_precision();
        let now_ms = unix_ms(now);
        let window = i.opts.dedup_window;
        let expires = now_ms.saturating_add(u64::try_from(window.as_millis()).unwrap_or(u64::MAX));
        let mut prepared = Vec::with_capacity(jobs.len());
        let mut kept = Vec::with_capacity(jobs.len());
        for new in jobs {
            let id = i.db.generate_id()?;
            pending.add(id);
            let mut job = new.job;
            job.id = format_id(id);
            job.state = JobState::Ready;
            job.lease_until = None;
            job.updated_at = Some(now);
            let mailbox = job.mailbox.clone().into_bytes();
            let (record, full) = StoredJob::build(self, raw_id, job)?;
            written.extend(record.full);
            let mut keys: Vec<Vec<u8>> = new.dedup_keys.into_iter().filter(|k| !k.is_empty()).collect();
            keys.sort();
            keys.dedup();
            kept.push(Kept { mailbox: mailbox.clone(), full: record.full });
            prepared.push(Prepared { id, record: record.encode()?, mailbox, keys, full });
        }
        Ok((Staged { raw, now_ms, expires, jobs: prepared }, kept))
    }

    /// Removes blobs no stored job uses (a store's blobs on an error before its inserts, a
    /// duplicate's full-job blob, the raw message when every job was a duplicate). The
    /// removals are committed with the next commit.
    fn remove_blobs(&self, unused: Vec<u64>) {
        if unused.is_empty() {
            return;
        }
        for blob in unused {
            if let Err(e) = self.remove_blob(blob) {
                tracing::warn!(target: "mailgate::spool", error = %e, blob, "could not remove an unused blob");
            }
        }
        self.commit_soon();
    }
}

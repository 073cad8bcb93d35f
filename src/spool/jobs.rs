//! Storing jobs: the raw message once, then every job record with its state index entry, its
//! raw-message reference and its dedup entries in one transaction. `store` returns only after
//! the group commit that covers it.

use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

use super::keys::{dedup_value, id_key, now_ms_precision, ref_key, state_key, unix_ms};
use super::records::StoredJob;
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

/// A job ready to be written by the store transaction.
struct Prepared {
    id: u64,
    record: Vec<u8>,
    mailbox: Vec<u8>,
    keys: Vec<Vec<u8>>,
    full: Option<u64>,
}

pub(super) fn tx_error(e: TransactionError<SpoolError>) -> SpoolError {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => SpoolError::Storage(e),
    }
}

impl Spool {
    /// Stores one message and its jobs (one per accepted mailbox and key); the raw message is
    /// stored once. One outcome per job, in order. Returns only after the commit.
    pub async fn store(&self, raw: &[u8], jobs: Vec<NewJob>) -> Result<Vec<StoreOutcome>, SpoolError> {
        self.check_open()?;
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        // sled inserts are memory operations (the disk work is the committer's), so they run
        // on the session's worker: no thread hop and no copy of the message. The new jobs stay
        // pending (not leasable) until the commit that covers them.
        let mut pending = Pending { spool: self, ids: Vec::with_capacity(jobs.len()) };
        let outcomes = self.store_blocking(raw, jobs, &mut pending)?;
        self.commit().await?;
        drop(pending);
        if outcomes.iter().any(|o| matches!(o, StoreOutcome::Stored { .. })) {
            // One worker, not all: a worker that finds a job wakes the next (delivery/worker.rs).
            self.0.ready.notify_one();
        }
        Ok(outcomes)
    }

    pub(super) fn store_blocking(
        &self,
        raw_msg: &[u8],
        jobs: Vec<NewJob>,
        pending: &mut Pending<'_>,
    ) -> Result<Vec<StoreOutcome>, SpoolError> {
        let raw_id = self.0.db.generate_id()?;
        let mut written = vec![raw_id];
        let result = self.write_jobs(raw_msg, raw_id, jobs, &mut written, pending);
        let unused = match &result {
            Err(_) => written,
            Ok((outcomes, prepared)) => {
                let mut unused: Vec<u64> = outcomes
                    .iter()
                    .zip(prepared)
                    .filter(|(o, _)| matches!(o, StoreOutcome::Duplicate { .. }))
                    .filter_map(|(_, p)| p.full)
                    .collect();
                if !outcomes.iter().any(|o| matches!(o, StoreOutcome::Stored { .. })) {
                    unused.push(raw_id);
                }
                unused
            }
        };
        for blob in unused {
            if let Err(e) = self.remove_blob(blob) {
                tracing::warn!(target: "mailgate::spool", error = %e, blob, "could not remove an unused blob");
            }
        }
        result.map(|(outcomes, _)| outcomes)
    }

    fn write_jobs(
        &self,
        raw_msg: &[u8],
        raw_id: u64,
        jobs: Vec<NewJob>,
        written: &mut Vec<u64>,
        pending: &mut Pending<'_>,
    ) -> Result<(Vec<StoreOutcome>, Vec<Prepared>), SpoolError> {
        let i = &self.0;
        self.write_message(raw_id, raw_msg)?;
        let now = now_ms_precision();
        let now_ms = unix_ms(now);
        let window = i.opts.dedup_window;
        let expires = now_ms.saturating_add(u64::try_from(window.as_millis()).unwrap_or(u64::MAX));
        let mut prepared = Vec::with_capacity(jobs.len());
        for new in jobs {
            let id = i.db.generate_id()?;
            pending.add(id);
            let mut job = new.job;
            job.id = format_id(id);
            job.state = JobState::Ready;
            job.lease_until = None;
            job.updated_at = Some(now);
            let mailbox = job.mailbox.clone().into_bytes();
            let record = StoredJob::build(self, raw_id, job)?;
            written.extend(record.full);
            let mut keys: Vec<Vec<u8>> = new.dedup_keys.into_iter().filter(|k| !k.is_empty()).collect();
            keys.sort();
            keys.dedup();
            prepared.push(Prepared { id, record: record.encode()?, mailbox, keys, full: record.full });
        }
        let dedup_on = !window.is_zero();
        let outcomes = (&i.jobs, &i.state, &i.dedup, &i.refs)
            .transaction(|(jobs, state, dedup, refs)| {
                let mut out = Vec::with_capacity(prepared.len());
                for p in &prepared {
                    if dedup_on && let Some(first) = dedup::holder(dedup, &p.keys, now_ms)? {
                        out.push(StoreOutcome::Duplicate { id: format_id(first) });
                        continue;
                    }
                    jobs.insert(&id_key(p.id)[..], p.record.as_slice())?;
                    state.insert(&state_key(JobState::Ready, p.id)[..], p.mailbox.as_slice())?;
                    refs.insert(&ref_key(raw_id, p.id)[..], &[][..])?;
                    if dedup_on {
                        for key in &p.keys {
                            dedup.insert(key.as_slice(), &dedup_value(p.id, expires)[..])?;
                        }
                    }
                    out.push(StoreOutcome::Stored { id: format_id(p.id) });
                }
                Ok::<_, ConflictableTransactionError<SpoolError>>(out)
            })
            .map_err(tx_error)?;
        for (o, p) in outcomes.iter().zip(&prepared) {
            if matches!(o, StoreOutcome::Stored { .. }) {
                self.count(&p.mailbox, None, Some(JobState::Ready.tag()));
            }
        }
        Ok((outcomes, prepared))
    }
}

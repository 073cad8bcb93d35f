//! Storing jobs and moving them between states. Every change of a job record happens in one
//! transaction with its state index entry, its lease entry and (on store) its dedup entries;
//! every public call here returns only after the group commit that covers it.

use std::sync::atomic::Ordering;
use std::time::Duration;

use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use time::OffsetDateTime;

use super::keys::{
    add_saturating, be_u64, dedup_value, id_key, lease_key, now_ms_precision, parse_lease_key, state_key, unix_ms,
};
use super::records::StoredJob;
use super::{NewJob, Spool, SpoolError, StoreOutcome, dedup, raw, state_index};
use crate::job::{Job, JobState, format_id, parse_id};

/// Longest `last_error` kept on a job.
const MAX_ERROR_LEN: usize = 1000;

/// A state change.
enum Change {
    Lease {
        until: OffsetDateTime,
    },
    Ack,
    Nack,
    Retry,
    Fail {
        error: String,
        dead: bool,
    },
    /// The reaper: only if the job's lease still ends at `lease_ms`.
    Expire {
        lease_ms: u64,
    },
}

impl Change {
    fn allowed(&self) -> (&'static [JobState], &'static str) {
        match self {
            Change::Lease { .. } => (&[JobState::Ready], "ready"),
            Change::Ack => (&[JobState::Leased, JobState::Ready], "leased or ready"),
            Change::Nack | Change::Fail { .. } | Change::Expire { .. } => (&[JobState::Leased], "leased"),
            Change::Retry => (&[JobState::Dead], "dead"),
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
        // on the session's worker: no thread hop and no copy of the message.
        let outcomes = self.store_blocking(raw, jobs)?;
        self.commit().await?;
        Ok(outcomes)
    }

    fn store_blocking(&self, raw_msg: &[u8], jobs: Vec<NewJob>) -> Result<Vec<StoreOutcome>, SpoolError> {
        let raw_id = self.0.db.generate_id()?;
        let mut written = vec![raw_id];
        let result = self.write_jobs(raw_msg, raw_id, jobs, &mut written);
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
            if let Err(e) = raw::remove(&self.0.raw, blob) {
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
    ) -> Result<(Vec<StoreOutcome>, Vec<Prepared>), SpoolError> {
        let i = &self.0;
        raw::write(&i.raw, raw_id, raw_msg)?;
        let now = now_ms_precision();
        let now_ms = unix_ms(now);
        let window = i.opts.dedup_window;
        let expires = now_ms.saturating_add(u64::try_from(window.as_millis()).unwrap_or(u64::MAX));
        let mut prepared = Vec::with_capacity(jobs.len());
        for new in jobs {
            let id = i.db.generate_id()?;
            let mut job = new.job;
            job.id = format_id(id);
            job.state = JobState::Ready;
            job.lease_until = None;
            job.updated_at = Some(now);
            let mailbox = job.mailbox.clone().into_bytes();
            let record = StoredJob::build(&i.db, &i.raw, raw_id, job)?;
            written.extend(record.full);
            let mut keys: Vec<Vec<u8>> = new.dedup_keys.into_iter().filter(|k| !k.is_empty()).collect();
            keys.sort();
            keys.dedup();
            prepared.push(Prepared { id, record: record.encode()?, mailbox, keys, full: record.full });
        }
        let dedup_on = !window.is_zero();
        let outcomes = (&i.jobs, &i.state, &i.dedup)
            .transaction(|(jobs, state, dedup)| {
                let mut out = Vec::with_capacity(prepared.len());
                for p in &prepared {
                    if dedup_on && let Some(first) = dedup::holder(dedup, &p.keys, now_ms)? {
                        out.push(StoreOutcome::Duplicate { id: format_id(first) });
                        continue;
                    }
                    jobs.insert(&id_key(p.id)[..], p.record.as_slice())?;
                    state.insert(&state_key(JobState::Ready, p.id)[..], p.mailbox.as_slice())?;
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
        let stored = outcomes.iter().filter(|o| matches!(o, StoreOutcome::Stored { .. })).count() as u64;
        i.counts[state_index(JobState::Ready)].fetch_add(stored, Ordering::Relaxed);
        Ok((outcomes, prepared))
    }

    /// Applies `change` to job `id` in one transaction; returns the new record.
    fn transition(&self, id: u64, change: &Change) -> Result<StoredJob, SpoolError> {
        let (allowed, wanted) = change.allowed();
        let now = now_ms_precision();
        let i = &self.0;
        let (old, record) = (&i.jobs, &i.state, &i.leases)
            .transaction(|(jobs, state, leases)| {
                let abort = ConflictableTransactionError::Abort;
                let Some(bytes) = jobs.get(id_key(id))? else {
                    return Err(abort(SpoolError::NotFound(format_id(id))));
                };
                let mut record = StoredJob::decode(&bytes).map_err(abort)?;
                let job = &mut record.job;
                let old = job.state;
                let lease_matches = match change {
                    Change::Expire { lease_ms } => job.lease_until.map(unix_ms) == Some(*lease_ms),
                    _ => true,
                };
                if !allowed.contains(&old) || !lease_matches {
                    return Err(abort(SpoolError::WrongState { id: job.id.clone(), state: old, wanted }));
                }
                if let Some(until) = job.lease_until.take() {
                    leases.remove(&lease_key(unix_ms(until), id)[..])?;
                }
                match change {
                    Change::Lease { until } => {
                        job.state = JobState::Leased;
                        job.attempts = job.attempts.saturating_add(1);
                        job.lease_until = Some(*until);
                        leases.insert(&lease_key(unix_ms(*until), id)[..], &[][..])?;
                    }
                    Change::Ack => job.state = JobState::Done,
                    Change::Nack | Change::Retry | Change::Expire { .. } => job.state = JobState::Ready,
                    Change::Fail { error, dead } => {
                        job.state = if *dead { JobState::Dead } else { JobState::Ready };
                        job.last_error = Some(error.clone());
                    }
                }
                job.updated_at = Some(now);
                if job.state != old {
                    state.remove(&state_key(old, id)[..])?;
                    state.insert(&state_key(job.state, id)[..], job.mailbox.as_bytes())?;
                }
                jobs.insert(&id_key(id)[..], record.encode().map_err(abort)?)?;
                Ok((old, record))
            })
            .map_err(tx_error)?;
        let new = record.job.state;
        if old != new {
            let _ = i.counts[state_index(old)].fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
            i.counts[state_index(new)].fetch_add(1, Ordering::Relaxed);
        }
        Ok(record)
    }

    async fn change(&self, id: &str, change: Change) -> Result<Job, SpoolError> {
        self.check_open()?;
        let n = parse_id(id).ok_or_else(|| SpoolError::NotFound(id.to_string()))?;
        let record = self.transition(n, &change)?;
        self.commit().await?;
        record.load(&self.0.raw)
    }

    /// Leases the oldest ready job (of `mailbox`): state leased, attempts + 1, `lease_until` set.
    pub async fn lease_next(&self, mailbox: Option<&str>, lease: Duration) -> Result<Option<Job>, SpoolError> {
        self.check_open()?;
        let until = add_saturating(now_ms_precision(), lease);
        let mut leased = None;
        for item in self.0.state.scan_prefix([JobState::Ready.tag()]) {
            let (key, job_mailbox) = item?;
            if mailbox.is_some_and(|m| m.as_bytes() != job_mailbox.as_ref()) {
                continue;
            }
            let id = key.get(1..).and_then(be_u64).ok_or_else(|| SpoolError::Corrupt("state index key".into()))?;
            match self.transition(id, &Change::Lease { until }) {
                Ok(record) => {
                    leased = Some(record);
                    break;
                }
                // Another consumer took it between the scan and the transaction.
                Err(SpoolError::WrongState { .. } | SpoolError::NotFound(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        let Some(record) = leased else { return Ok(None) };
        self.commit().await?;
        record.load(&self.0.raw).map(Some)
    }

    /// Leased (or ready) -> done.
    pub async fn ack(&self, id: &str) -> Result<Job, SpoolError> {
        self.change(id, Change::Ack).await
    }

    /// Leased -> ready.
    pub async fn nack(&self, id: &str) -> Result<Job, SpoolError> {
        self.change(id, Change::Nack).await
    }

    /// Dead -> ready.
    pub async fn retry(&self, id: &str) -> Result<Job, SpoolError> {
        self.change(id, Change::Retry).await
    }

    /// Leased -> ready (`dead` false) or dead, recording `error` as `last_error`. For delivery
    /// workers; a retry delay is a lease that the reaper ends.
    pub async fn fail(&self, id: &str, error: &str, dead: bool) -> Result<Job, SpoolError> {
        let mut error = error.to_string();
        if error.len() > MAX_ERROR_LEN {
            let mut cut = MAX_ERROR_LEN;
            while !error.is_char_boundary(cut) {
                cut -= 1;
            }
            error.truncate(cut);
        }
        self.change(id, Change::Fail { error, dead }).await
    }

    /// Expired leases -> ready; returns how many jobs went back.
    pub async fn reap_leases(&self) -> Result<usize, SpoolError> {
        self.check_open()?;
        let now = unix_ms(OffsetDateTime::now_utc());
        let expired: Vec<sled::IVec> =
            self.0.leases.range(..lease_key(now.saturating_add(1), 0)).keys().collect::<Result<_, _>>()?;
        let mut reaped = 0;
        for key in expired {
            let Some((lease_ms, id)) = parse_lease_key(&key) else {
                self.0.leases.remove(&key)?;
                continue;
            };
            match self.transition(id, &Change::Expire { lease_ms }) {
                Ok(_) => reaped += 1,
                // A stale entry (the job moved on): drop it.
                Err(SpoolError::WrongState { .. } | SpoolError::NotFound(_)) => {
                    self.0.leases.remove(&key)?;
                }
                Err(e) => return Err(e),
            }
        }
        if reaped > 0 {
            self.commit().await?;
        }
        Ok(reaped)
    }
}

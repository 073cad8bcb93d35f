//! Moving jobs between states. Every change of a job record happens in one transaction with
//! its state index entry and its timer (lease end, next attempt, purge). Pull-API calls return
//! after the group commit that covers them; push-worker outcomes only ask for one (a lost
//! acknowledgement after a crash means one more delivery, never a lost job). A push worker's
//! lease is held in memory only (holds.rs).

use std::time::Duration;

use sled::Transactional;
use sled::transaction::ConflictableTransactionError;
use time::OffsetDateTime;

use super::holds::{Hold, PushLease, as_leased};
use super::jobs::tx_error;
use super::keys::{add_saturating, be_u64, id_key, index_tag, lease_key, now_ms_precision, tagged_key, unix_ms};
use super::records::StoredJob;
use super::{Spool, SpoolError};
use crate::job::{Job, JobState, format_id, parse_id};

/// Longest `last_error` kept on a job.
const MAX_ERROR_LEN: usize = 1000;

/// Where a failed attempt sends the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFailure {
    /// Ready again at once.
    Ready,
    /// Ready, but waiting until then for its next attempt.
    RetryAt(OffsetDateTime),
    /// Dead: no more attempts until an operator retries it.
    Dead,
}

/// A state change.
pub(super) enum Change {
    Lease {
        until: OffsetDateTime,
    },
    Ack,
    Nack,
    Retry,
    Fail {
        error: String,
        next: AfterFailure,
    },
    /// A timer at `ms` fired: the lease that ends then, or the wait that ends then, is over.
    Timer {
        ms: u64,
    },
    /// A push worker's lease left behind by an earlier process (before push leases were held
    /// in memory only).
    Release,
    /// The outcome of a push worker's attempt at a job it held: delivered (`None`) or failed.
    Pushed {
        failure: Option<(String, AfterFailure)>,
    },
}

impl Change {
    fn allowed(&self) -> (&'static [JobState], &'static str) {
        match self {
            Change::Lease { .. } => (&[JobState::Ready], "ready"),
            Change::Pushed { .. } => (&[JobState::Ready], "held by a delivery worker"),
            Change::Ack => (&[JobState::Leased, JobState::Ready], "leased or ready"),
            Change::Nack | Change::Fail { .. } | Change::Release => (&[JobState::Leased], "leased"),
            Change::Timer { .. } => (&[JobState::Leased, JobState::Ready], "leased or waiting"),
            Change::Retry => (&[JobState::Dead], "dead"),
        }
    }

    /// Whether the change applies to this record beyond its state.
    fn applies(&self, record: &StoredJob) -> bool {
        let job = &record.job;
        match self {
            Change::Lease { .. } => job.next_attempt_at.is_none(),
            Change::Timer { ms } => match job.state {
                JobState::Leased => job.lease_until.map(unix_ms) == Some(*ms),
                _ => job.next_attempt_at.map(unix_ms) == Some(*ms),
            },
            Change::Release => record.push,
            _ => true,
        }
    }

    /// Whether the change can make a job available to workers.
    fn frees(&self) -> bool {
        matches!(
            self,
            Change::Nack
                | Change::Retry
                | Change::Timer { .. }
                | Change::Release
                | Change::Fail { next: AfterFailure::Ready, .. }
                | Change::Pushed { failure: Some((_, AfterFailure::Ready)) }
        )
    }
}

/// The job's timer: its lease end while leased, its next attempt while waiting.
fn timer_ms(job: &Job) -> Option<u64> {
    match job.state {
        JobState::Leased => job.lease_until.map(unix_ms),
        JobState::Ready => job.next_attempt_at.map(unix_ms),
        JobState::Done | JobState::Dead => None,
    }
}

fn apply(record: &mut StoredJob, change: &Change) {
    let job = &mut record.job;
    match change {
        Change::Lease { until } => {
            job.state = JobState::Leased;
            job.attempts = job.attempts.saturating_add(1);
            job.lease_until = Some(*until);
        }
        Change::Pushed { failure } => {
            job.attempts = job.attempts.saturating_add(1);
            match failure {
                None => {
                    job.state = JobState::Done;
                    job.next_attempt_at = None;
                }
                Some((error, next)) => failed(job, error, *next),
            }
        }
        Change::Ack => {
            job.state = JobState::Done;
            job.next_attempt_at = None;
        }
        Change::Nack | Change::Release => job.state = JobState::Ready,
        Change::Retry => {
            job.state = JobState::Ready;
            job.attempts = 0;
        }
        Change::Timer { .. } => {
            job.state = JobState::Ready;
            job.next_attempt_at = None;
        }
        Change::Fail { error, next } => failed(job, error, *next),
    }
    if job.state != JobState::Leased {
        job.lease_until = None;
    }
    // (only records of earlier versions still carry a push lease)
    record.push = false;
}

fn failed(job: &mut Job, error: &str, next: AfterFailure) {
    job.last_error = Some(error.to_string());
    match next {
        AfterFailure::Ready => job.state = JobState::Ready,
        AfterFailure::RetryAt(at) => {
            job.state = JobState::Ready;
            job.next_attempt_at = Some(at);
        }
        AfterFailure::Dead => job.state = JobState::Dead,
    }
}

impl Spool {
    /// Applies `change` to job `id` in one transaction; returns the new record.
    pub(super) fn transition(&self, id: u64, change: &Change) -> Result<StoredJob, SpoolError> {
        let (old_tag, record) = self.transition_tx(id, change)?;
        // A job a push worker holds is counted as leased (holds.rs): it moves from there.
        let held = old_tag == JobState::Ready.tag() && self.0.holds.uncount(id);
        self.after_transition(old_tag, held, &record, change);
        Ok(record)
    }

    /// The transaction of [`Spool::transition`]; returns the old index tag and the new record.
    fn transition_tx(&self, id: u64, change: &Change) -> Result<(u8, StoredJob), SpoolError> {
        let (allowed, wanted) = change.allowed();
        let now = now_ms_precision();
        let purge_ms = unix_ms(add_saturating(now, self.0.opts.retention));
        let i = &self.0;
        (&i.jobs, &i.state, &i.leases)
            .transaction(|(jobs, state, timers)| {
                let abort = ConflictableTransactionError::Abort;
                let Some(bytes) = jobs.get(id_key(id))? else {
                    return Err(abort(SpoolError::NotFound(format_id(id))));
                };
                let mut record = StoredJob::decode(&bytes).map_err(abort)?;
                let old = record.job.state;
                if !allowed.contains(&old) || !change.applies(&record) {
                    return Err(abort(SpoolError::WrongState { id: record.job.id.clone(), state: old, wanted }));
                }
                let (old_tag, old_timer) = (index_tag(&record.job), timer_ms(&record.job));
                apply(&mut record, change);
                let job = &mut record.job;
                job.updated_at = Some(now);
                let (new_tag, new_timer) = (index_tag(job), timer_ms(job));
                if old_timer != new_timer {
                    if let Some(ms) = old_timer {
                        timers.remove(&lease_key(ms, id)[..])?;
                    }
                    if let Some(ms) = new_timer {
                        timers.insert(&lease_key(ms, id)[..], &[][..])?;
                    }
                }
                if job.state == JobState::Done && old != JobState::Done {
                    timers.insert(&lease_key(purge_ms, id)[..], &[][..])?;
                }
                if old_tag != new_tag {
                    state.remove(&tagged_key(old_tag, id)[..])?;
                    state.insert(&tagged_key(new_tag, id)[..], job.mailbox.as_bytes())?;
                }
                jobs.insert(&id_key(id)[..], record.encode().map_err(abort)?)?;
                Ok((old_tag, record))
            })
            .map_err(tx_error)
    }

    /// The counts and the workers' signal after a transition; `held`: the job was counted as
    /// leased for a push worker's hold.
    fn after_transition(&self, old_tag: u8, held: bool, record: &StoredJob, change: &Change) {
        let new_tag = index_tag(&record.job);
        if old_tag != new_tag {
            let from = if held { JobState::Leased.tag() } else { old_tag };
            self.count(record.job.mailbox.as_bytes(), Some(from), Some(new_tag));
        }
        if change.frees() {
            // One worker, not all: a worker that finds a job wakes the next (delivery/worker.rs).
            self.0.ready.notify_one();
        }
    }

    async fn change(&self, id: &str, change: Change, durable: bool) -> Result<StoredJob, SpoolError> {
        self.check_open()?;
        let n = parse_id(id).ok_or_else(|| SpoolError::NotFound(id.to_string()))?;
        let record = self.transition(n, &change)?;
        if durable {
            self.commit().await?;
        } else {
            self.mark_dirty();
        }
        Ok(record)
    }

    /// The ready jobs, oldest first, that one of `mailboxes` (`None`: any mailbox) may take:
    /// committed, and not held by a push worker. Calls `take` with each (id, mailbox) until it
    /// returns something.
    fn first_ready<T>(
        &self,
        mailboxes: Option<&[&str]>,
        mut take: impl FnMut(u64, &[u8]) -> Result<Option<T>, SpoolError>,
    ) -> Result<Option<T>, SpoolError> {
        self.check_open()?;
        for item in self.0.state.scan_prefix([JobState::Ready.tag()]) {
            let (key, job_mailbox) = item?;
            if mailboxes.is_some_and(|m| !m.iter().any(|m| m.as_bytes() == job_mailbox.as_ref())) {
                continue;
            }
            let id = key.get(1..).and_then(be_u64).ok_or_else(|| SpoolError::Corrupt("state index key".into()))?;
            if self.is_pending(id) {
                continue;
            }
            if let Some(found) = take(id, &job_mailbox)? {
                return Ok(Some(found));
            }
        }
        Ok(None)
    }

    /// Pull API: leases the oldest due ready job (of `mailbox`): state leased, attempts + 1,
    /// `lease_until` set; durable before it returns.
    pub async fn lease_next(&self, mailbox: Option<&str>, lease: Duration) -> Result<Option<Job>, SpoolError> {
        let only = mailbox.map(|m| [m]);
        let until = add_saturating(now_ms_precision(), lease);
        let leased = self.first_ready(only.as_ref().map(|m| &m[..]), |id, _| {
            // Under the holds' lock: a push worker cannot take the job meanwhile.
            let holds = self.0.holds.lock();
            if holds.contains_key(&id) {
                return Ok(None);
            }
            let change = Change::Lease { until };
            match self.transition_tx(id, &change) {
                Ok((old_tag, record)) => {
                    drop(holds);
                    self.after_transition(old_tag, false, &record, &change);
                    Ok(Some(record))
                }
                // Another consumer took it between the scan and the transaction.
                Err(SpoolError::WrongState { .. } | SpoolError::NotFound(_)) => Ok(None),
                Err(e) => Err(e),
            }
        })?;
        let Some(record) = leased else { return Ok(None) };
        self.commit().await?;
        self.present_async(record).await.map(Some)
    }

    /// Push workers: holds the oldest due ready job of `mailboxes` (empty: any) in memory
    /// (holds.rs); nothing is written. The job comes without its reply text: the webhook
    /// derives it from the raw message it sends.
    pub fn lease_for_push(&self, mailboxes: &[&str], lease: Duration) -> Result<Option<PushLease>, SpoolError> {
        let filter = if mailboxes.is_empty() { None } else { Some(mailboxes) };
        let until = add_saturating(now_ms_precision(), lease);
        self.first_ready(filter, |id, mailbox| {
            let Some((hold, record)) = Hold::take(self, id, mailbox, until)? else { return Ok(None) };
            // (an error from here on drops the hold: the job is ready again)
            let mut job = record.load(self)?;
            as_leased(&mut job, until);
            Ok(Some(PushLease::new(hold, job)))
        })
    }

    /// Signalled (`notify_one`) when jobs may have become ready: stored, released, retried, due.
    /// Create the `Notified` future before checking for work to avoid a lost wake-up; a worker
    /// that finds a job passes the signal on, so a burst wakes workers one by one and a single
    /// new job wakes one worker instead of all of them.
    pub fn ready_signal(&self) -> &tokio::sync::Notify {
        &self.0.ready
    }

    /// Leased (or ready) -> done.
    pub async fn ack(&self, id: &str) -> Result<Job, SpoolError> {
        let record = self.change(id, Change::Ack, true).await?;
        self.present_async(record).await
    }

    /// Push workers: the held job was delivered -> done (attempts + 1), committed within a
    /// second (not waited for): a crash before then means one more delivery of the job, never
    /// a lost one. The job comes without its reply text.
    pub async fn push_delivered(&self, lease: PushLease) -> Result<Job, SpoolError> {
        self.push_outcome(lease, None, false).await
    }

    /// Leased -> ready.
    pub async fn nack(&self, id: &str) -> Result<Job, SpoolError> {
        let record = self.change(id, Change::Nack, true).await?;
        self.present_async(record).await
    }

    /// Dead -> ready; the attempt count starts again.
    pub async fn retry(&self, id: &str) -> Result<Job, SpoolError> {
        let record = self.change(id, Change::Retry, true).await?;
        self.present_async(record).await
    }

    /// Every dead job (of `mailbox`) -> ready; returns how many.
    pub async fn retry_all(&self, mailbox: Option<&str>) -> Result<usize, SpoolError> {
        self.check_open()?;
        let mut n = 0;
        for item in self.0.state.scan_prefix([JobState::Dead.tag()]) {
            let (key, job_mailbox) = item?;
            if mailbox.is_some_and(|m| m.as_bytes() != job_mailbox.as_ref()) {
                continue;
            }
            let id = key.get(1..).and_then(be_u64).ok_or_else(|| SpoolError::Corrupt("state index key".into()))?;
            match self.transition(id, &Change::Retry) {
                Ok(_) => n += 1,
                Err(SpoolError::WrongState { .. } | SpoolError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        self.commit().await?;
        Ok(n)
    }

    /// Leased -> ready (`dead` false) or dead, recording `error` as `last_error`.
    pub async fn fail(&self, id: &str, error: &str, dead: bool) -> Result<Job, SpoolError> {
        let next = if dead { AfterFailure::Dead } else { AfterFailure::Ready };
        let record = self.fail_record(id, error, next, true).await?;
        self.present_async(record).await
    }

    /// Push workers: the attempt at the held job failed -> `next` (attempts + 1), recording
    /// `error` as `last_error`; `durable`: wait for the commit, else it is committed within a
    /// second. The job comes without its reply text.
    pub async fn push_failed(
        &self,
        lease: PushLease,
        error: &str,
        next: AfterFailure,
        durable: bool,
    ) -> Result<Job, SpoolError> {
        self.push_outcome(lease, Some((cut_error(error), next)), durable).await
    }

    async fn push_outcome(
        &self,
        lease: PushLease,
        failure: Option<(String, AfterFailure)>,
        durable: bool,
    ) -> Result<Job, SpoolError> {
        self.check_open()?;
        let hold = lease.hold;
        // Ready in the counts again: the transaction counts it from ready to its new state.
        hold.uncount();
        let change = Change::Pushed { failure };
        let result = self.transition(hold.id, &change);
        // Let go only after the transaction: no other worker may take the job in between.
        drop(hold);
        let record = result?;
        if change.frees() {
            // (the transaction's own signal came while the job was still held)
            self.0.ready.notify_one();
        }
        if durable {
            self.commit().await?;
        } else {
            self.mark_dirty();
        }
        record.load(self)
    }

    async fn fail_record(
        &self,
        id: &str,
        error: &str,
        next: AfterFailure,
        durable: bool,
    ) -> Result<StoredJob, SpoolError> {
        self.change(id, Change::Fail { error: cut_error(error), next }, durable).await
    }

    /// At start-up: push leases of an earlier process -> ready (that process is gone: the
    /// spool is locked by this one). Returns how many.
    pub async fn release_push_leases(&self) -> Result<usize, SpoolError> {
        self.check_open()?;
        let mut ids = Vec::new();
        for key in self.0.state.scan_prefix([JobState::Leased.tag()]).keys() {
            let key = key?;
            ids.push(key.get(1..).and_then(be_u64).ok_or_else(|| SpoolError::Corrupt("state index key".into()))?);
        }
        let mut n = 0;
        for id in ids {
            match self.transition(id, &Change::Release) {
                Ok(_) => n += 1,
                Err(SpoolError::WrongState { .. } | SpoolError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        if n > 0 {
            self.commit().await?;
        }
        Ok(n)
    }
}

/// `error`, cut to [`MAX_ERROR_LEN`] bytes at a character boundary.
fn cut_error(error: &str) -> String {
    let mut cut = error.len().min(MAX_ERROR_LEN);
    while !error.is_char_boundary(cut) {
        cut -= 1;
    }
    error[..cut].to_string()
}

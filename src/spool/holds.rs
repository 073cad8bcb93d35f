//! Push leases: the jobs delivery workers are sending now, held in memory only.
//!
//! A push lease never had to survive a crash (the next start made such jobs ready again), so
//! it is no longer written to sled: a sled transaction per lease cost as much as the rest of
//! the attempt (each one writes sled's log out twice and syncs it). The job stays `ready` in
//! the trees while a worker holds it; the attempt's outcome is one transaction from `ready`
//! (attempts + 1, then done, waiting or dead). Everything that shows jobs shows a held job as
//! `leased`, with its `lease_until`: the counts, `get`, `list`, the metrics and the webhook's
//! job JSON.
//!
//! Pull-API leases look at the holds under the same lock as they lease, so a job is never
//! held by a worker and leased by a consumer at once.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use time::OffsetDateTime;

use super::records::StoredJob;
use super::{Spool, SpoolError};
use crate::job::{Job, JobState, parse_id};

/// One job held by a push worker.
pub(super) struct Held {
    /// When the push lease ends.
    until: OffsetDateTime,
    /// Counted as leased, not ready, in the depth counts. Whoever changes the job's state
    /// first (the worker's outcome, or an operator meanwhile) moves it back.
    counted: bool,
}

/// The jobs held by push workers, by job id.
#[derive(Default)]
pub(super) struct Holds(Mutex<HashMap<u64, Held>>);

impl Holds {
    /// The map, also after a panic elsewhere (it holds plain values).
    pub fn lock(&self) -> MutexGuard<'_, HashMap<u64, Held>> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// When the push lease on job `id` ends, if a worker holds it.
    fn until(&self, id: u64) -> Option<OffsetDateTime> {
        self.lock().get(&id).map(|h| h.until)
    }

    /// Whether job `id` was counted as leased because a worker holds it; it no longer is.
    pub fn uncount(&self, id: u64) -> bool {
        self.lock().get_mut(&id).is_some_and(|h| std::mem::take(&mut h.counted))
    }

    /// The held job ids, ascending (job ids grow with time: oldest first).
    pub fn ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.lock().keys().copied().collect();
        ids.sort_unstable();
        ids
    }
}

/// Shows a held job as its worker sees it: `leased` until the push lease ends, this attempt
/// counted.
pub(super) fn as_leased(job: &mut Job, until: OffsetDateTime) {
    job.state = JobState::Leased;
    job.attempts = job.attempts.saturating_add(1);
    job.lease_until = Some(until);
}

/// A push worker's hold on one job (see the module docs). Dropped without an outcome (an
/// error, a worker cut off at shutdown), the job is ready for the next worker at once.
pub struct PushLease {
    pub(super) hold: Hold,
    job: Job,
}

impl PushLease {
    pub(super) fn new(hold: Hold, job: Job) -> PushLease {
        PushLease { hold, job }
    }

    /// The job as leased: state `leased`, `attempts` counting this attempt, `lease_until`.
    pub fn job(&self) -> &Job {
        &self.job
    }
}

/// The hold itself: its entry in [`Holds`].
pub(super) struct Hold {
    pub spool: Spool,
    pub id: u64,
    pub mailbox: Vec<u8>,
}

impl Hold {
    /// Takes job `id` (of `mailbox`) until `until` if it is ready and due, and no other
    /// worker holds it; returns the hold and the job's record.
    ///
    /// The record is read, and the job counted as leased, under the holds' lock. A
    /// transaction that changes the job after the read counts it afterwards and waits for the
    /// lock to do so, so it finds it counted as leased and moves it from there (see
    /// [`Holds::uncount`]); a job that is no longer ready (an index entry read before a
    /// change) is never counted.
    pub fn take(
        spool: &Spool,
        id: u64,
        mailbox: &[u8],
        until: OffsetDateTime,
    ) -> Result<Option<(Hold, StoredJob)>, SpoolError> {
        let mut holds = spool.0.holds.lock();
        if holds.contains_key(&id) {
            return Ok(None);
        }
        let Some(record) = spool.record(id)? else { return Ok(None) };
        if record.job.state != JobState::Ready || record.job.next_attempt_at.is_some() {
            return Ok(None);
        }
        holds.insert(id, Held { until, counted: true });
        spool.count(mailbox, Some(JobState::Ready.tag()), Some(JobState::Leased.tag()));
        drop(holds);
        Ok(Some((Hold { spool: spool.clone(), id, mailbox: mailbox.to_vec() }, record)))
    }

    /// Counts the job as ready again (unless a transition did already): before the outcome's
    /// transaction, which counts it from ready to its new state.
    pub fn uncount(&self) {
        if self.spool.0.holds.uncount(self.id) {
            self.count_ready();
        }
    }

    fn count_ready(&self) {
        self.spool.count(&self.mailbox, Some(JobState::Leased.tag()), Some(JobState::Ready.tag()));
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        let held = self.spool.0.holds.lock().remove(&self.id);
        if held.is_some_and(|h| h.counted) {
            // Let go without an outcome: the job is ready again, one idle worker may take it.
            self.count_ready();
            self.spool.0.ready.notify_one();
        }
    }
}

impl Spool {
    /// Applies the push lease, if any, to a job about to be shown.
    pub(super) fn show_hold(&self, job: &mut Job) {
        if job.state != JobState::Ready {
            return;
        }
        if let Some(until) = parse_id(&job.id).and_then(|id| self.0.holds.until(id)) {
            as_leased(job, until);
        }
    }
}

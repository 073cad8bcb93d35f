//! Timers (tree `leases`: when + job id): a lease that ends, a wait for the next attempt that
//! ends, or a done job whose retention is over. The reaper runs them; a purge removes the job,
//! its index entries and its full-record blob, and the raw message once no job refers to it.

use sled::Transactional;
use sled::transaction::ConflictableTransactionError;
use time::OffsetDateTime;

use super::jobs::tx_error;
use super::keys::{id_key, lease_key, parse_lease_key, ref_key, state_key, unix_ms};
use super::records::StoredJob;
use super::transitions::Change;
use super::{Spool, SpoolError};
use crate::job::JobState;

/// What the reaper did in one pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reaped {
    /// Jobs back to ready (lease over or wait over).
    pub ready: usize,
    /// Done jobs purged.
    pub purged: usize,
}

impl Spool {
    /// Runs every timer that is due: expired leases and finished waits -> ready, done jobs past
    /// retention -> purged. Returns how many jobs went back to ready (see [`Spool::reap`]).
    pub async fn reap_leases(&self) -> Result<usize, SpoolError> {
        Ok(self.reap().await?.ready)
    }

    /// Runs every due timer.
    pub async fn reap(&self) -> Result<Reaped, SpoolError> {
        self.check_open()?;
        let now = unix_ms(OffsetDateTime::now_utc());
        let due: Vec<sled::IVec> =
            self.0.leases.range(..lease_key(now.saturating_add(1), 0)).keys().collect::<Result<_, _>>()?;
        let mut out = Reaped::default();
        for key in due {
            let Some((ms, id)) = parse_lease_key(&key) else {
                self.0.leases.remove(&key)?;
                continue;
            };
            let state = match self.record(id)? {
                Some(r) => r.job.state,
                None => {
                    self.0.leases.remove(&key)?;
                    continue;
                }
            };
            if state == JobState::Done {
                if self.purge(id, ms)? {
                    out.purged += 1;
                }
                continue;
            }
            match self.transition(id, &Change::Timer { ms }) {
                Ok(_) => out.ready += 1,
                // A stale timer (the job moved on): drop it.
                Err(SpoolError::WrongState { .. } | SpoolError::NotFound(_)) => {
                    self.0.leases.remove(&key)?;
                }
                Err(e) => return Err(e),
            }
        }
        if out.ready + out.purged > 0 {
            self.commit().await?;
        }
        Ok(out)
    }

    /// Removes done job `id` and its timer at `ms`; false when it is not (or no longer) done.
    fn purge(&self, id: u64, ms: u64) -> Result<bool, SpoolError> {
        let i = &self.0;
        let removed = (&i.jobs, &i.state, &i.leases, &i.refs)
            .transaction(|(jobs, state, timers, refs)| {
                timers.remove(&lease_key(ms, id)[..])?;
                let Some(bytes) = jobs.get(id_key(id))? else { return Ok(None) };
                let record = StoredJob::decode(&bytes).map_err(ConflictableTransactionError::Abort)?;
                if record.job.state != JobState::Done {
                    return Ok(None);
                }
                jobs.remove(&id_key(id)[..])?;
                state.remove(&state_key(JobState::Done, id)[..])?;
                refs.remove(&ref_key(record.raw_id, id)[..])?;
                if let Some(full) = record.full {
                    refs.remove(&ref_key(full, id)[..])?;
                }
                Ok(Some(record))
            })
            .map_err(tx_error)?;
        let Some(record) = removed else { return Ok(false) };
        self.count(record.job.mailbox.as_bytes(), Some(JobState::Done.tag()), None);
        // Blobs go after the records that point to them: a crash in between leaves a blob no
        // job uses (removed by the sweep at the next open, sweep.rs), never a job without its
        // message.
        if let Some(full) = record.full {
            self.remove_blob(full)?;
        }
        if i.refs.scan_prefix(id_key(record.raw_id)).next().is_none() {
            self.remove_blob(record.raw_id)?;
        }
        Ok(true)
    }
}

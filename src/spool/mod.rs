//! The durable spool: jobs, raw messages, states, leases, the dedup index and the reject log,
//! in one sled database, made durable by one group committer.
//!
//! Trees: `jobs` (id -> record), `state` (state tag + id -> mailbox; ready jobs waiting for a
//! retry have their own tag), `leases` (timers: when ms + id, for lease ends, retry waits and
//! purges), `rawloc` (raw message blob id -> its place in a segment file, see `segments.rs`),
//! `raw` (blob id + chunk index -> at most 4 KiB: raw messages and full records of big jobs
//! from spools written before segment files; read and removed, never written), `refs` (blob
//! id + job id: which jobs use a raw message, and which one a full-job blob), `dedup` (key ->
//! job id + expiry ms), `rejects` (unix nanos + sequence -> entry JSON). A change of a job's
//! state moves its record, state index entry and timer in one transaction; a store's inserts
//! are made durable by the journal (`journal.rs`), which is replayed at open.
//!
//! Files: `committer.rs` (group commit), `open.rs` (opening and the recovery at start), `journal.rs` (the store journal), `replay.rs` (its
//! frames merged back at open), `segments.rs` (raw messages in segment files), `recover.rs`
//! (jobs whose message a machine crash took), `sweep.rs` (blobs no job uses), `jobs.rs`
//! (store), `transitions.rs` (state changes, leases), `holds.rs` (push leases, in memory),
//! `timers.rs` (the reaper and purging), `rejects.rs` (reject log), `dedup.rs` (dedup lookups
//! and expiry), `raw.rs` (chunked blobs), `records.rs` (the internal job record), `keys.rs`
//! (encodings, dedup key builders).

mod committer;

mod dedup;
mod holds;
mod jobs;
mod journal;
mod keys;
mod open;
mod present;
mod raw;
mod records;
mod recover;
mod rejects;
mod replay;
mod segments;
mod sweep;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_delivery;
#[cfg(test)]
mod tests_journal;
#[cfg(test)]
mod tests_queue;
#[cfg(test)]
mod tests_segments;
#[cfg(test)]
mod tests_sweep;
mod timers;
mod transitions;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sled::Tree;
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};

use crate::gate::verdict::Reason;
use crate::job::{Job, JobState, parse_id};
use crate::reject::RejectEntry;
use committer::Msg;
use records::StoredJob;

pub use holds::PushLease;
pub use keys::{dedup_key_content, dedup_key_ident};
pub use present::fill_reply_text;
pub use timers::Reaped;
pub use transitions::AfterFailure;

/// Spool tuning, from `[spool]`.
#[derive(Debug, Clone)]
pub struct SpoolOptions {
    /// How long a dedup key keeps refusing the same message. Zero disables dedup.
    pub dedup_window: Duration,
    /// Reject-log entries older than this are pruned (zero: no age limit).
    pub reject_retention: Duration,
    /// At most this many reject-log entries are kept, oldest dropped first (zero: no limit).
    pub reject_max_entries: usize,
    /// Done jobs and their raw messages are purged this long after delivery (zero: at once).
    pub retention: Duration,
}

impl From<&crate::config::SpoolConfig> for SpoolOptions {
    fn from(c: &crate::config::SpoolConfig) -> Self {
        SpoolOptions {
            dedup_window: c.dedup_window,
            reject_retention: c.reject_retention,
            reject_max_entries: c.reject_max_entries,
            retention: c.retention,
        }
    }
}

impl Default for SpoolOptions {
    fn default() -> Self {
        SpoolOptions::from(&crate::config::SpoolConfig::default())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool storage error: {0}")]
    Storage(#[from] sled::Error),
    #[error("spool I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("job {id} is {state}, not {wanted}")]
    WrongState { id: String, state: JobState, wanted: &'static str },
    #[error("spool {} is locked by another process (is `mailgate serve` running?)", .0.display())]
    Locked(PathBuf),
    #[error("spool data is corrupt: {0}")]
    Corrupt(String),
    #[error("the spool is closed")]
    Closed,
}

/// A job to store: `job.id` and `job.state` are ignored (the spool assigns both).
#[derive(Debug, Clone)]
pub struct NewJob {
    pub job: Job,
    /// Keys from [`dedup_key_ident`] / [`dedup_key_content`]; empty keys are ignored. If any key
    /// is held by a job stored within the dedup window, this job is a duplicate of that one.
    pub dedup_keys: Vec<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreOutcome {
    Stored { id: String },
    Duplicate { id: String },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stats {
    pub ready: u64,
    pub leased: u64,
    pub done: u64,
    pub dead: u64,
    /// Ready jobs waiting for their next delivery attempt (included in `ready`).
    #[serde(default)]
    pub waiting: u64,
    pub rejects: u64,
    #[serde(with = "time::serde::rfc3339::option")]
    pub oldest_ready: Option<OffsetDateTime>,
}

#[derive(Debug, Clone, Default)]
pub struct RejectQuery {
    /// Entries with `at` at or after this time.
    pub since: Option<OffsetDateTime>,
    pub reason: Option<Reason>,
    /// A cursor from an earlier answer: return entries strictly after it.
    pub after: Option<String>,
    /// 0 = no limit.
    pub limit: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RejectRecord {
    pub cursor: String,
    #[serde(flatten)]
    pub entry: RejectEntry,
}

/// The spool. Cheap to clone; every clone is the same database.
#[derive(Clone)]
pub struct Spool(Arc<Inner>);

struct Inner {
    dir: PathBuf,
    opts: SpoolOptions,
    db: sled::Db,
    jobs: Tree,
    state: Tree,
    leases: Tree,
    raw: Tree,
    rawloc: Tree,
    segments: Arc<segments::Segments>,
    refs: Tree,
    dedup: Tree,
    rejects: Tree,
    commits: mpsc::UnboundedSender<Msg>,
    committer: Mutex<Option<std::thread::JoinHandle<()>>>,
    flushes: Arc<AtomicU64>,
    /// Jobs per mailbox and state index tag (see [`Depth`]).
    depth: Mutex<HashMap<Vec<u8>, Depth>>,
    /// Woken when jobs may have become ready for workers.
    ready: tokio::sync::Notify,
    /// Jobs stored but not yet covered by a commit: nobody may lease them (a push worker would
    /// hand the application a message whose sender has no 250 yet and might send it again).
    pending: Mutex<std::collections::HashSet<u64>>,
    /// Jobs push workers are sending now (holds.rs).
    holds: holds::Holds,
    /// State changes not yet committed that need no waiting (push outcomes): the
    /// maintenance loop commits them within a second.
    dirty: AtomicBool,
    reject_count: AtomicU64,
    /// Last reject key (nanos, sequence): keys only grow, so a cursor never misses an entry.
    reject_clock: Mutex<(u64, u32)>,
    closed: AtomicBool,
}

/// Jobs of one mailbox per state; `waiting` are ready jobs waiting for a retry (not in `ready`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Depth {
    pub ready: u64,
    pub waiting: u64,
    pub leased: u64,
    pub done: u64,
    pub dead: u64,
}

impl Depth {
    fn slot(&mut self, tag: u8) -> Option<&mut u64> {
        Some(match tag {
            t if t == JobState::Ready.tag() => &mut self.ready,
            keys::WAITING_TAG => &mut self.waiting,
            t if t == JobState::Leased.tag() => &mut self.leased,
            t if t == JobState::Done.tag() => &mut self.done,
            t if t == JobState::Dead.tag() => &mut self.dead,
            _ => return None,
        })
    }
}

impl Spool {
    /// The trees a journal frame writes (see journal.rs).
    #[cfg(test)]
    fn journal_trees(&self) -> journal::JournalTrees {
        let i = &self.0;
        journal::JournalTrees {
            jobs: i.jobs.clone(),
            state: i.state.clone(),
            refs: i.refs.clone(),
            dedup: i.dedup.clone(),
            rawloc: i.rawloc.clone(),
            meta: Tree::clone(&i.db),
        }
    }

    /// The spool directory.
    pub fn dir(&self) -> &Path {
        &self.0.dir
    }

    /// Returns once everything inserted before the call is durable.
    pub async fn commit(&self) -> Result<(), SpoolError> {
        let (tx, rx) = oneshot::channel();
        self.0.commits.send(Msg::Commit(Some(tx))).map_err(|_| SpoolError::Closed)?;
        rx.await.map_err(|_| SpoolError::Closed)?
    }

    /// Asks for a commit without waiting for it.
    pub fn commit_soon(&self) {
        let _ = self.0.commits.send(Msg::Commit(None));
    }

    /// Marks uncommitted changes that the maintenance loop commits within a second.
    fn mark_dirty(&self) {
        self.0.dirty.store(true, Ordering::Relaxed);
    }

    /// Whether job `id` is stored but not yet committed.
    fn is_pending(&self, id: u64) -> bool {
        self.0.pending.lock().map(|p| p.contains(&id)).unwrap_or(false)
    }

    /// How many flushes the committer has run (each one covers a whole batch of commits).
    pub fn flush_count(&self) -> u64 {
        self.0.flushes.load(Ordering::Relaxed)
    }

    /// Final commit; afterwards every write fails with [`SpoolError::Closed`].
    pub async fn close(&self) -> Result<(), SpoolError> {
        if self.0.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let (tx, rx) = oneshot::channel();
        let result = match self.0.commits.send(Msg::Stop(tx)) {
            Ok(()) => rx.await.map_err(|_| SpoolError::Closed).and_then(|r| r),
            Err(_) => Err(SpoolError::Closed),
        };
        let handle = self.0.committer.lock().map(|mut h| h.take()).unwrap_or(None);
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
        result
    }

    fn check_open(&self) -> Result<(), SpoolError> {
        if self.0.closed.load(Ordering::Relaxed) { Err(SpoolError::Closed) } else { Ok(()) }
    }

    fn record(&self, id: u64) -> Result<Option<StoredJob>, SpoolError> {
        match self.0.jobs.get(keys::id_key(id))? {
            Some(bytes) => Ok(Some(StoredJob::decode(&bytes)?)),
            None => Ok(None),
        }
    }

    pub fn get(&self, id: &str) -> Result<Option<Job>, SpoolError> {
        let Some(n) = parse_id(id) else { return Ok(None) };
        self.record(n)?.map(|r| self.present(r)).transpose()
    }

    /// The job's raw message.
    pub fn raw(&self, id: &str) -> Result<Option<Vec<u8>>, SpoolError> {
        let Some(n) = parse_id(id) else { return Ok(None) };
        let Some(rec) = self.record(n)? else { return Ok(None) };
        match self.read_message(rec.raw_id)? {
            Some(bytes) => Ok(Some(bytes)),
            None => Err(SpoolError::Corrupt(format!("job {id}: raw message {} missing", rec.raw_id))),
        }
    }

    /// Writes blob `raw_id` (a raw message or a full job record) to a segment and its pointer
    /// to `rawloc`.
    fn write_message(&self, raw_id: u64, data: &[u8]) -> Result<segments::Loc, SpoolError> {
        let loc = self.0.segments.append(data)?;
        if let Err(e) = self.0.rawloc.insert(segments::loc_key(raw_id), &loc.encode()[..]) {
            self.0.segments.release(&loc);
            return Err(e.into());
        }
        Ok(loc)
    }

    /// Blob `raw_id`, from its segment or (spools from before segments) the raw tree.
    fn read_message(&self, raw_id: u64) -> Result<Option<Vec<u8>>, SpoolError> {
        match self.0.rawloc.get(segments::loc_key(raw_id))? {
            Some(v) => self.0.segments.read(&segments::Loc::decode(&v)?).map(Some),
            None => raw::read(&self.0.raw, raw_id),
        }
    }

    /// Removes blob `id`: a raw message (its pointer; the segment space is freed with the
    /// segment's last message) or a chunked blob in the raw tree.
    fn remove_blob(&self, id: u64) -> Result<(), SpoolError> {
        match self.0.rawloc.remove(segments::loc_key(id))? {
            Some(v) => {
                self.0.segments.release(&segments::Loc::decode(&v)?);
                Ok(())
            }
            // Only blobs from before segment files are in the raw tree.
            None => raw::remove(&self.0.raw, id),
        }
    }

    /// Segment files on disk now.
    #[cfg(test)]
    fn segment_count(&self) -> usize {
        self.0.segments.count()
    }

    /// Jobs, oldest first, optionally of one state (ready includes jobs waiting for a retry);
    /// `limit` 0 = no limit.
    pub fn list(&self, state: Option<JobState>, limit: usize) -> Result<Vec<Job>, SpoolError> {
        let limit = if limit == 0 { usize::MAX } else { limit };
        let mut out = Vec::new();
        let Some(s) = state else {
            for item in self.0.jobs.iter().values() {
                if out.len() >= limit {
                    break;
                }
                out.push(self.present(StoredJob::decode(&item?)?)?);
            }
            return Ok(out);
        };
        let held = self.0.holds.ids();
        let mut ids = self.indexed(s.tag(), limit.saturating_add(held.len()))?;
        match s {
            JobState::Ready => {
                ids.retain(|id| held.binary_search(id).is_err());
                ids.extend(self.indexed(keys::WAITING_TAG, limit)?);
            }
            // Jobs held by push workers are leased too (holds.rs).
            JobState::Leased => ids.extend(&held),
            JobState::Done | JobState::Dead => {}
        }
        ids.sort_unstable();
        ids.dedup();
        for id in ids {
            if out.len() >= limit {
                break;
            }
            let Some(rec) = self.record(id)? else { continue };
            let job = self.present(rec)?;
            // The job may have changed state since the index was read: skip it then.
            if job.state == s {
                out.push(job);
            }
        }
        Ok(out)
    }

    /// The first `limit` job ids under one state index tag.
    fn indexed(&self, tag: u8, limit: usize) -> Result<Vec<u64>, SpoolError> {
        let mut ids = Vec::new();
        for key in self.0.state.scan_prefix([tag]).keys().take(limit) {
            let key = key?;
            ids.push(keys::be_u64(&key[1..]).ok_or_else(|| SpoolError::Corrupt("state index key".into()))?);
        }
        Ok(ids)
    }

    /// Counts per state (kept in memory) and the age of the oldest ready job.
    pub fn stats(&self) -> Result<Stats, SpoolError> {
        let mut total = Depth::default();
        for d in self.depth().into_values() {
            total.ready += d.ready;
            total.waiting += d.waiting;
            total.leased += d.leased;
            total.done += d.done;
            total.dead += d.dead;
        }
        // (jobs held by push workers count as leased: holds.rs)
        let held = self.0.holds.ids();
        let mut oldest = self.indexed(JobState::Ready.tag(), held.len() + 1)?;
        oldest.retain(|id| held.binary_search(id).is_err());
        oldest.extend(self.indexed(keys::WAITING_TAG, 1)?);
        let oldest_ready = match oldest.into_iter().min() {
            Some(id) => self.record(id)?.map(|r| r.job.received_at),
            None => None,
        };
        Ok(Stats {
            ready: total.ready + total.waiting,
            leased: total.leased,
            done: total.done,
            dead: total.dead,
            waiting: total.waiting,
            rejects: self.0.reject_count.load(Ordering::Relaxed),
            oldest_ready,
        })
    }

    /// Jobs per mailbox and state, kept in memory.
    pub fn depth(&self) -> HashMap<String, Depth> {
        let map = match self.0.depth.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.iter().map(|(k, v)| (String::from_utf8_lossy(k).into_owned(), *v)).collect()
    }

    /// Moves one job of `mailbox` from index tag `from` to `to` in the in-memory counts.
    fn count(&self, mailbox: &[u8], from: Option<u8>, to: Option<u8>) {
        let mut map = match self.0.depth.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        let depth = match map.get_mut(mailbox) {
            Some(d) => d,
            None => map.entry(mailbox.to_vec()).or_default(),
        };
        if let Some(n) = from.and_then(|t| depth.slot(t)) {
            *n = n.saturating_sub(1);
        }
        if let Some(n) = to.and_then(|t| depth.slot(t)) {
            *n += 1;
        }
    }

    /// Drops expired dedup entries and reject-log entries past retention or over the maximum;
    /// returns how many entries were removed.
    pub async fn prune(&self) -> Result<usize, SpoolError> {
        self.check_open()?;
        let removed = self.prune_dedup()? + self.prune_rejects()?;
        if removed > 0 {
            self.commit().await?;
        }
        Ok(removed)
    }

    /// Runs due timers (lease ends, retry waits, purges) every second and prunes every minute until `shutdown` is true.
    pub fn spawn_maintenance(&self, mut shutdown: tokio::sync::watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
        let spool = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut ticks: u64 = 0;
            loop {
                if *shutdown.borrow() {
                    break;
                }
                tokio::select! {
                    _ = tick.tick() => {}
                    changed = shutdown.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        continue;
                    }
                }
                if spool.0.dirty.swap(false, Ordering::Relaxed) {
                    spool.commit_soon();
                }
                match spool.reap().await {
                    Ok(r) if r.purged > 0 => {
                        tracing::debug!(target: "mailgate::spool", purged = r.purged, "done jobs past retention purged");
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(target: "mailgate::spool", error = %e, "timer reaper failed"),
                }
                if ticks.is_multiple_of(60)
                    && let Err(e) = spool.prune().await
                {
                    tracing::warn!(target: "mailgate::spool", error = %e, "spool pruning failed");
                }
                ticks += 1;
            }
        })
    }
}

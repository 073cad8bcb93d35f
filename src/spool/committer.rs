//! The group committer: the one thread that makes the spool durable.
//!
//! Writers send a request: a commit of what they inserted, or a message's prepared jobs
//! (`Store`) whose inserts the committer makes itself. It waits for one request, takes every
//! request already queued behind it, plans the batch's stores as one journal frame (jobs.rs,
//! journal.rs), syncs the segment files written since the last commit if a message is too big
//! to travel in the frame, appends and syncs the frame, applies it to sled, and answers every
//! waiter of that batch with the same result (a store: its outcomes). Requests that arrive
//! during a commit wait for the next one.
//!
//! A batch of stores alone is durable through the journal. A checkpoint (segments synced,
//! `db.flush()` + `sync_data()` on `<dir>/db`, then the journal started again) is made when the
//! batch holds a plain commit request (state changes and removals are not journaled), when a
//! segment is to be deleted, or when the journal would pass its size limit. sled's
//! `flush_async` is never used (concurrent calls deadlock on 0.34), and the `sync_data` closes
//! the gap left by sled's `sync_file_range` (no disk cache flush, no metadata).

use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{mpsc, oneshot};

use super::jobs::{self, Staged, StoreTrees};
use super::journal::{self, Frame, JOURNAL_MAX, Journal};
use super::segments::Segments;
use super::{SpoolError, StoreOutcome};

pub(super) type Waiter = oneshot::Sender<Result<(), SpoolError>>;
pub(super) type StoreWaiter = oneshot::Sender<Result<Vec<StoreOutcome>, SpoolError>>;

pub(super) enum Msg {
    /// Commit; answer the waiter if there is one (`commit_soon` sends none).
    Commit(Option<Waiter>),
    /// Insert one message's jobs, commit, answer with their outcomes.
    Store(Staged, StoreWaiter),
    /// Commit, answer, then refuse new requests and end once the queue is empty.
    Stop(Waiter),
}

pub(super) struct Committer {
    db: sled::Db,
    trees: StoreTrees,
    file: File,
    journal: Journal,
    segments: Arc<Segments>,
    rx: mpsc::UnboundedReceiver<Msg>,
    flushes: Arc<AtomicU64>,
}

/// What the committer works with, from `Spool::open`.
pub(super) struct Parts {
    pub db: sled::Db,
    pub trees: StoreTrees,
    /// `<dir>/db`, sled's file.
    pub file: File,
    pub journal: Journal,
    pub segments: Arc<Segments>,
    pub flushes: Arc<AtomicU64>,
}

impl Committer {
    pub fn new(p: Parts, rx: mpsc::UnboundedReceiver<Msg>) -> Self {
        let Parts { db, trees, file, journal, segments, flushes } = p;
        Committer { db, trees, file, journal, segments, rx, flushes }
    }

    /// Runs on its own thread until the channel closes: no hop through tokio's blocking pool
    /// per batch, and the sessions' worker threads never wait on the disk.
    pub fn run(mut self) {
        while let Some(first) = self.rx.blocking_recv() {
            let mut batch = vec![first];
            while let Ok(more) = self.rx.try_recv() {
                batch.push(more);
            }
            tracing::debug!(target: "mailgate::commit", batch = batch.len(), "batch");
            let mut waiters = Vec::with_capacity(batch.len());
            let mut stores = Vec::new();
            let (mut stop, mut sled_too) = (false, false);
            for msg in batch {
                match msg {
                    Msg::Commit(w) => {
                        sled_too = true;
                        waiters.extend(w);
                    }
                    Msg::Store(staged, w) => stores.push((staged, w)),
                    Msg::Stop(w) => {
                        (stop, sled_too) = (true, true);
                        waiters.push(w);
                    }
                }
            }
            let seq = self.journal.take_seq();
            // A batch with a state change or removal is a checkpoint, which syncs the segments:
            // its messages need not be written to the journal too.
            let mut frame = if sled_too { Frame::new(seq).without_messages() } else { Frame::new(seq) };
            let planned = if stores.is_empty() {
                Ok(Vec::new())
            } else {
                jobs::plan(&self.trees, &stores.iter().map(|(s, _)| s).collect::<Vec<_>>(), &mut frame)
            };
            // A batch whose plan failed writes no frame: none of its stores is acknowledged.
            let segments_too = frame.segments_unsynced();
            let frame = (planned.is_ok() && !frame.is_empty()).then(|| frame.finish());
            let result = self.flush(frame.as_deref(), segments_too, sled_too);
            self.flushes.fetch_add(1, Ordering::Relaxed);
            // A store fails if its plan or the commit failed.
            let stored = planned.and_then(|outcomes| result.as_ref().map(|_| outcomes).map_err(duplicate));
            if let Err(e) = stored.as_ref().and(result.as_ref()) {
                tracing::error!(target: "mailgate::spool", error = %e, stores = stores.len(), waiters = waiters.len(),
                    "spool commit failed");
            }
            for w in waiters {
                let _ = w.send(result.as_ref().map(|_| ()).map_err(duplicate));
            }
            match stored {
                Ok(outcomes) => {
                    for ((_, w), out) in stores.into_iter().zip(outcomes) {
                        let _ = w.send(Ok(out));
                    }
                }
                Err(e) => {
                    for (_, w) in stores {
                        let _ = w.send(Err(duplicate(&e)));
                    }
                }
            }
            if stop {
                // Requests already queued are still answered (the loop runs until the queue is
                // empty); new ones fail at send time and their callers get `Closed`.
                self.rx.close();
            }
        }
    }
}

impl Committer {
    /// The segments when needed (a message not in the frame, or a checkpoint), then the
    /// journal frame, then for a checkpoint sled (see journal.rs); empty segments go only
    /// once the removal of their last pointer is durable.
    fn flush(&mut self, frame: Option<&[u8]>, segments_too: bool, sled_too: bool) -> Result<(), SpoolError> {
        let t0 = std::time::Instant::now();
        let frame_len = frame.map_or(0, |f| f.len() as u64);
        let checkpoint = sled_too || self.journal.len() + frame_len >= JOURNAL_MAX;
        let synced = if segments_too || checkpoint { Some(self.segments.sync()?) } else { None };
        // A segment to delete: its last pointer's removal must be durable first.
        let checkpoint = checkpoint || synced.as_ref().is_some_and(|s| !s.is_empty());
        let t1 = std::time::Instant::now();
        if let Some(frame) = frame {
            self.journal.append(frame)?;
            // Durable now: into sled. An error here leaves the frame to be applied at the next
            // open; this batch's senders get a temporary failure and try again.
            journal::apply(&self.trees.trees, frame)?;
        }
        let t2 = std::time::Instant::now();
        if checkpoint {
            // Everything applied so far first, then the mark that says so: sled may recover a
            // later insert without an earlier one (replay.rs), and a checkpoint mark that
            // outlived the inserts before it would skip their frames at the replay. Two syncs,
            // because one `fdatasync` writes its pages in no set order: a power cut during it
            // could keep the mark and lose an insert.
            self.db.flush()?;
            self.file.sync_data()?;
            self.trees.trees.mark_checkpoint(self.journal.next_seq())?;
            self.db.flush()?;
            self.file.sync_data()?;
            self.journal.reset();
        }
        if let Some(synced) = synced {
            self.segments.after_commit(synced);
        } else {
            // The segments' bytes wait for the next checkpoint: start them on their way now.
            self.segments.start_writeback();
        }
        tracing::debug!(target: "mailgate::commit", segments_us = (t1 - t0).as_micros() as u64,
            journal_us = (t2 - t1).as_micros() as u64, sled_us = t2.elapsed().as_micros() as u64, "commit");
        Ok(())
    }
}

/// One commit error, given to every waiter of the batch.
fn duplicate(e: &SpoolError) -> SpoolError {
    match e {
        SpoolError::Storage(e) => SpoolError::Storage(e.clone()),
        SpoolError::Io(e) => SpoolError::Io(std::io::Error::new(e.kind(), e.to_string())),
        other => SpoolError::Corrupt(other.to_string()),
    }
}

//! Opening the spool: sled, then the recovery at start in order (the journal's replay, the
//! id counter, the sweep of unused blobs, the segments and the jobs whose message a crash
//! took), then the counts, and the committer's thread.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};

use sled::Tree;
use tokio::sync::mpsc;

use super::committer::{self, Committer};
use super::{Depth, Inner, Spool, SpoolError, SpoolOptions, holds, jobs, journal, keys, recover, segments, sweep};

/// sled's page cache (its default, 1 GiB, would dominate the server's memory).
const SLED_CACHE_BYTES: u64 = 64 * 1024 * 1024;

fn open_error(dir: &Path, e: sled::Error) -> SpoolError {
    match e {
        sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
            SpoolError::Locked(dir.to_path_buf())
        }
        other => SpoolError::Storage(other),
    }
}

impl Spool {
    /// Opens (creating) the spool in `dir`. Must be called inside a tokio runtime: it spawns the
    /// committer task. Another process holding the database gives [`SpoolError::Locked`].
    pub fn open(dir: &Path, opts: SpoolOptions) -> Result<Spool, SpoolError> {
        let _runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| SpoolError::Io(std::io::Error::other("Spool::open must run inside a tokio runtime")))?;
        std::fs::create_dir_all(dir)?;
        let db = sled::Config::new()
            .path(dir)
            .flush_every_ms(None)
            .cache_capacity(SLED_CACHE_BYTES)
            .open()
            .map_err(|e| open_error(dir, e))?;
        let file = std::fs::OpenOptions::new().read(true).write(true).open(dir.join("db"))?;
        // The directory entries of the files sled just created must survive a crash too.
        std::fs::File::open(dir)?.sync_all()?;
        let tree = |name: &str| db.open_tree(name);
        let (jobs, state, leases, raw, dedup, rejects) =
            (tree("jobs")?, tree("state")?, tree("leases")?, tree("raw")?, tree("dedup")?, tree("rejects")?);
        let (refs, rawloc) = (tree("refs")?, tree("rawloc")?);
        let journal_trees = journal::JournalTrees {
            jobs: jobs.clone(),
            state: state.clone(),
            refs: refs.clone(),
            dedup: dedup.clone(),
            rawloc: rawloc.clone(),
            meta: Tree::clone(&db),
        };
        // Before anything reads the trees: the journal may hold stores sled lost.
        let (journal, replayed) = journal::Journal::open(dir, &db, &file, &journal_trees)?;
        if replayed > 0 {
            tracing::info!(target: "mailgate::spool", batches = replayed,
                "restored stored messages from the journal that sled had not written before the last stop");
        }
        // Job and blob ids come from sled's counter. At open sled starts it past the last value
        // it persisted, and persists the new start at the first id it gives out, with a flush
        // that is not durable against a power cut (`sync_file_range`). Were that lost, the next
        // open would give out this session's ids again: a new job would overwrite an
        // acknowledged one (tests/powercut.rs). One id now, then a sync, makes the start durable
        // before any job gets an id; later persists (every million ids) are made durable by
        // the checkpoints, which come far more often.
        db.generate_id()?;
        db.flush()?;
        file.sync_data()?;
        // Before the segments count their live messages: a segment only orphans use is deleted.
        let swept = sweep::sweep(&sweep::Trees { jobs: &jobs, refs: &refs, rawloc: &rawloc })?;
        if swept.removed > 0 || swept.adopted > 0 {
            tracing::info!(target: "mailgate::spool", removed = swept.removed, adopted = swept.adopted,
                "removed stored blobs no job uses (a crash came between writing a blob and its commit, or during a purge)");
            db.flush()?;
            file.sync_data()?;
        }
        let (segments, damaged) = segments::Segments::open(dir, &rawloc, segments::SEGMENT_MAX)?;
        if !damaged.is_empty() {
            let trees = recover::Trees { jobs: &jobs, state: &state, refs: &refs, dedup: &dedup, rawloc: &rawloc };
            let discarded = recover::discard(&trees, &damaged)?;
            for (id, message_id) in discarded.jobs {
                tracing::error!(target: "mailgate::spool", job = %crate::job::format_id(id), message_id = %message_id,
                    "removed a job whose stored message did not survive a crash; it was never acknowledged, so the sender will send it again");
            }
            for loc in &discarded.freed {
                segments.release(loc);
            }
            db.flush()?;
            file.sync_data()?;
        }
        let segments = Arc::new(segments);

        let mut depth: HashMap<Vec<u8>, Depth> = HashMap::new();
        for item in state.iter() {
            let (key, mailbox) = item?;
            let tag = key.first().copied().unwrap_or(0);
            if let Some(n) = depth.entry(mailbox.to_vec()).or_default().slot(tag) {
                *n += 1;
            }
        }
        let mut reject_count = 0u64;
        for item in rejects.iter().keys() {
            item?;
            reject_count += 1;
        }
        let last_reject = match rejects.last()? {
            Some((k, _)) => keys::parse_reject_key(&k).ok_or_else(|| SpoolError::Corrupt("reject log key".into()))?,
            None => (0, 0),
        };

        let (commits, rx) = mpsc::unbounded_channel();
        let flushes = Arc::new(AtomicU64::new(0));
        let trees = jobs::StoreTrees { trees: journal_trees, dedup_on: !opts.dedup_window.is_zero() };
        let parts = committer::Parts {
            db: db.clone(),
            trees,
            file,
            journal,
            segments: segments.clone(),
            flushes: flushes.clone(),
        };
        let committer = Committer::new(parts, rx);
        let handle = std::thread::Builder::new().name("mailgate-commit".into()).spawn(move || committer.run())?;
        Ok(Spool(Arc::new(Inner {
            dir: dir.to_path_buf(),
            opts,
            db,
            jobs,
            state,
            leases,
            raw,
            rawloc,
            segments,
            refs,
            dedup,
            rejects,
            commits,
            committer: Mutex::new(Some(handle)),
            flushes,
            depth: Mutex::new(depth),
            ready: tokio::sync::Notify::new(),
            pending: Mutex::new(std::collections::HashSet::new()),
            holds: holds::Holds::default(),
            dirty: AtomicBool::new(false),
            reject_count: AtomicU64::new(reject_count),
            reject_clock: Mutex::new(last_reject),
            closed: AtomicBool::new(false),
        })))
    }
}

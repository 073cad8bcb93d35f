//! Raw messages in append-only segment files outside sled (`<spool>/segments/NNNNNNNN.seg`).
//!
//! Why: sled rewrites whole leaf pages as they change, so a raw message kept in sled was
//! written to disk many times over (about 8× for 100 KiB, 10× for 4 KiB). Here a message is
//! written once, with `pwrite` at an offset reserved under a short lock, and the sled tree
//! `rawloc` keeps only its location (segment, offset, length, CRC-32).
//!
//! Durability: a message of at most 64 KiB also travels in its batch's journal frame, and the
//! journal writes it back at open if a machine crash took it from the segment (journal.rs);
//! every checkpoint syncs the segments before sled's flush. For a bigger message the committer
//! calls [`Segments::sync`] before it writes the frame. The records reach sled only after that
//! frame is synced, so every segment byte is on disk, here or in the journal, before a record
//! points to it. Spools written by earlier versions could hold records without their bytes
//! after a machine crash (such a job was never acknowledged); [`Segments::open`] finds them by
//! checking the CRC of every message in the newest segments.
//!
//! Space: each segment counts its live messages. A segment that is not the one being written
//! and has none left is deleted after the next commit (so the removal of its last pointer is
//! durable before the file goes). A new segment is started at every open and when the current
//! one would pass [`SEGMENT_MAX`].

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use sled::Tree;

use super::SpoolError;
use super::keys::id_key;

/// A segment is closed once it holds this much (a bigger message gets a segment of its own).
pub(super) const SEGMENT_MAX: u64 = 64 << 20;

/// [`Segments::start_writeback`] starts the disk writes once this much is waiting.
const WRITEBACK_STEP: u64 = 1 << 20;

/// How many of the newest segments [`Segments::open`] checks message by message.
const CHECKED_AT_OPEN: usize = 2;

/// Where a raw message is: the value under its blob id in the `rawloc` tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Loc {
    pub seg: u32,
    pub off: u64,
    pub len: u64,
    pub crc: u32,
}

impl Loc {
    pub fn encode(&self) -> [u8; 24] {
        let mut v = [0u8; 24];
        v[..4].copy_from_slice(&self.seg.to_be_bytes());
        v[4..12].copy_from_slice(&self.off.to_be_bytes());
        v[12..20].copy_from_slice(&self.len.to_be_bytes());
        v[20..].copy_from_slice(&self.crc.to_be_bytes());
        v
    }

    pub fn decode(v: &[u8]) -> Result<Loc, SpoolError> {
        let bad = || SpoolError::Corrupt("raw message location".into());
        let v: &[u8; 24] = v.try_into().map_err(|_| bad())?;
        let (seg, rest) = v.split_at(4);
        let (off, rest) = rest.split_at(8);
        let (len, crc) = rest.split_at(8);
        Ok(Loc {
            seg: u32::from_be_bytes(seg.try_into().map_err(|_| bad())?),
            off: u64::from_be_bytes(off.try_into().map_err(|_| bad())?),
            len: u64::from_be_bytes(len.try_into().map_err(|_| bad())?),
            crc: u32::from_be_bytes(crc.try_into().map_err(|_| bad())?),
        })
    }
}

pub(super) struct Segments {
    dir: PathBuf,
    /// [`SEGMENT_MAX`] except in tests.
    max: u64,
    state: Mutex<State>,
}

struct State {
    active: u32,
    active_len: u64,
    /// Where the last [`Segments::start_writeback`] of the active segment ended.
    kicked: u64,
    files: HashMap<u32, Arc<File>>,
    /// Messages per segment that some pointer still refers to.
    live: HashMap<u32, u64>,
    /// Written since the last sync.
    unsynced: HashSet<u32>,
    /// A segment file was created since the last sync: the directory needs one too.
    new_entry: bool,
    /// Empty segments to delete after the next commit.
    doomed: Vec<u32>,
}

/// What [`Segments::sync`] took: the segments to delete once the commit is through.
pub(super) struct Synced(Vec<u32>);

impl Synced {
    /// No segment is waiting to be deleted.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn seg_name(seg: u32) -> String {
    format!("{seg:08x}.seg")
}

/// The file of segment `seg` in the spool directory `spool_dir`.
pub(super) fn seg_path(spool_dir: &Path, seg: u32) -> PathBuf {
    spool_dir.join("segments").join(seg_name(seg))
}

impl Segments {
    /// Opens `<spool>/segments`, counts the live messages from `rawloc`, deletes segments no
    /// pointer uses, checks the messages of the newest segments and starts a new segment.
    /// Returns the blob ids whose bytes are missing or damaged (see the module docs).
    pub fn open(spool_dir: &Path, rawloc: &Tree, max: u64) -> Result<(Segments, Vec<u64>), SpoolError> {
        let dir = spool_dir.join("segments");
        std::fs::create_dir_all(&dir)?;
        let mut files = HashMap::new();
        for entry in std::fs::read_dir(&dir)? {
            let name = entry?.file_name();
            let Some(seg) =
                name.to_str().and_then(|n| n.strip_suffix(".seg")).and_then(|n| u32::from_str_radix(n, 16).ok())
            else {
                continue;
            };
            let file = OpenOptions::new().read(true).write(true).open(dir.join(&name))?;
            files.insert(seg, Arc::new(file));
        }
        let mut newest: Vec<u32> = files.keys().copied().collect();
        newest.sort_unstable_by(|a, b| b.cmp(a));
        newest.truncate(CHECKED_AT_OPEN);
        let mut live: HashMap<u32, u64> = HashMap::new();
        let mut bad = Vec::new();
        for item in rawloc.iter() {
            let (key, value) = item?;
            let id = super::keys::be_u64(&key).ok_or_else(|| SpoolError::Corrupt("raw message key".into()))?;
            let loc = Loc::decode(&value)?;
            let intact = match files.get(&loc.seg) {
                None => false,
                Some(f) if newest.contains(&loc.seg) => read_at(f, &loc).is_ok(),
                Some(f) => f.metadata()?.len() >= loc.off.saturating_add(loc.len),
            };
            if intact {
                *live.entry(loc.seg).or_default() += 1;
            } else {
                bad.push(id);
            }
        }
        // Numbers only grow, also over segments deleted just now.
        let active = files.keys().max().map_or(1, |m| m.saturating_add(1));
        let unused: Vec<u32> = files.keys().copied().filter(|s| !live.contains_key(s)).collect();
        for seg in unused {
            files.remove(&seg);
            std::fs::remove_file(dir.join(seg_name(seg)))?;
        }
        let segments = Segments {
            dir,
            max,
            state: Mutex::new(State {
                active,
                active_len: 0,
                kicked: 0,
                files,
                live,
                unsynced: HashSet::new(),
                new_entry: false,
                doomed: Vec::new(),
            }),
        };
        {
            let mut st = segments.lock()?;
            segments.create(&mut st, active)?;
        }
        File::open(&segments.dir)?.sync_all()?;
        Ok((segments, bad))
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>, SpoolError> {
        self.state.lock().map_err(|_| SpoolError::Corrupt("segment state lock poisoned".into()))
    }

    fn create(&self, st: &mut State, seg: u32) -> Result<(), SpoolError> {
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(self.dir.join(seg_name(seg)))?;
        st.files.insert(seg, Arc::new(file));
        st.active = seg;
        st.active_len = 0;
        st.kicked = 0;
        st.new_entry = true;
        Ok(())
    }

    /// Appends `data`; durable after the next [`Segments::sync`].
    pub fn append(&self, data: &[u8]) -> Result<Loc, SpoolError> {
        let len = data.len() as u64;
        let (file, loc) = {
            let mut st = self.lock()?;
            if st.active_len > 0 && st.active_len.saturating_add(len) > self.max {
                let (old, next) = (st.active, st.active.saturating_add(1));
                self.create(&mut st, next)?;
                if st.live.get(&old).copied().unwrap_or(0) == 0 {
                    st.doomed.push(old);
                }
            }
            let loc = Loc { seg: st.active, off: st.active_len, len, crc: crc32fast::hash(data) };
            st.active_len += len;
            *st.live.entry(loc.seg).or_default() += 1;
            let file = st.files.get(&loc.seg).cloned().ok_or_else(|| missing(loc.seg))?;
            (file, loc)
        };
        let written = file.write_all_at(data, loc.off);
        // Marked only now: a sync that ran during the write does not cover it, the next one does.
        let mut st = self.lock()?;
        st.unsynced.insert(loc.seg);
        drop(st);
        if let Err(e) = written {
            self.release(&loc);
            return Err(e.into());
        }
        Ok(loc)
    }

    /// Starts writing the active segment's newest bytes to disk, without waiting, once a
    /// [`WRITEBACK_STEP`] of them has piled up: a checkpoint's [`Segments::sync`] then finds
    /// them mostly written instead of stalling its commit for megabytes. Only a hint; the sync
    /// stays the guarantee. Returns the bytes it started.
    pub fn start_writeback(&self) -> u64 {
        let Ok(mut st) = self.lock() else { return 0 };
        let (from, to) = (st.kicked, st.active_len);
        if to.saturating_sub(from) < WRITEBACK_STEP {
            return 0;
        }
        let Some(file) = st.files.get(&st.active).cloned() else { return 0 };
        st.kicked = to;
        drop(st);
        let (Ok(off), Ok(len)) = (libc::off64_t::try_from(from), libc::off64_t::try_from(to - from)) else {
            return 0;
        };
        // SAFETY: a plain system call on a file descriptor that `file` keeps open; no memory
        // is passed.
        let rc = unsafe { libc::sync_file_range(file.as_raw_fd(), off, len, libc::SYNC_FILE_RANGE_WRITE) };
        if rc != 0 {
            tracing::debug!(target: "mailgate::spool", error = %std::io::Error::last_os_error(), "sync_file_range");
            return 0;
        }
        to - from
    }

    /// Reads the message at `loc`, checking its length and CRC.
    pub fn read(&self, loc: &Loc) -> Result<Vec<u8>, SpoolError> {
        let file = self.lock()?.files.get(&loc.seg).cloned().ok_or_else(|| missing(loc.seg))?;
        read_at(&file, loc)
    }

    /// Forgets the message at `loc` (its pointer is gone or about to go); an empty segment
    /// that is no longer written is deleted after the next commit.
    pub fn release(&self, loc: &Loc) {
        let Ok(mut st) = self.lock() else { return };
        let left = match st.live.get_mut(&loc.seg) {
            Some(n) => {
                *n = n.saturating_sub(1);
                *n
            }
            None => return,
        };
        if left == 0 && loc.seg != st.active {
            st.live.remove(&loc.seg);
            st.doomed.push(loc.seg);
        }
    }

    /// Makes every completed [`Segments::append`] durable. Called by the committer before it
    /// writes the journal or flushes sled; hand the result to [`Segments::after_commit`] once
    /// a sled flush is through.
    pub fn sync(&self) -> Result<Synced, SpoolError> {
        let (files, new_entry, doomed) = {
            let mut st = self.lock()?;
            let segs: Vec<u32> = st.unsynced.drain().collect();
            let files: Vec<Arc<File>> = segs.iter().filter_map(|s| st.files.get(s).cloned()).collect();
            (files, std::mem::take(&mut st.new_entry), std::mem::take(&mut st.doomed))
        };
        let result = (|| {
            for f in &files {
                f.sync_data()?;
            }
            if new_entry {
                File::open(&self.dir)?.sync_all()?;
            }
            Ok::<_, std::io::Error>(())
        })();
        if let Err(e) = result {
            // Nothing is lost: the next sync tries them all again.
            if let Ok(mut st) = self.lock() {
                st.new_entry |= new_entry;
                st.doomed.extend(doomed);
                let all: Vec<u32> = st.files.keys().copied().collect();
                st.unsynced.extend(all);
            }
            return Err(e.into());
        }
        Ok(Synced(doomed))
    }

    /// Deletes the segments [`Segments::sync`] found empty (their last pointer's removal is
    /// now durable); on failure they are tried again at the next commit.
    pub fn after_commit(&self, synced: Synced) {
        for seg in synced.0 {
            let Ok(mut st) = self.lock() else { return };
            // A segment cannot come back to life (appends only go to the active one).
            st.files.remove(&seg);
            drop(st);
            if let Err(e) = std::fs::remove_file(self.dir.join(seg_name(seg)))
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(target: "mailgate::spool", error = %e, segment = %seg_name(seg), "could not delete an empty segment");
            }
        }
    }

    /// Segment files that exist now.
    #[cfg(test)]
    pub fn count(&self) -> usize {
        self.lock().map(|st| st.files.len()).unwrap_or(0)
    }
}

fn read_at(file: &File, loc: &Loc) -> Result<Vec<u8>, SpoolError> {
    let len = usize::try_from(loc.len).map_err(|_| SpoolError::Corrupt("raw message length".into()))?;
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, loc.off).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => {
            SpoolError::Corrupt(format!("segment {}: message at {} is cut short", seg_name(loc.seg), loc.off))
        }
        _ => SpoolError::Io(e),
    })?;
    if crc32fast::hash(&buf) != loc.crc {
        return Err(SpoolError::Corrupt(format!(
            "segment {}: message at {} fails its CRC",
            seg_name(loc.seg),
            loc.off
        )));
    }
    Ok(buf)
}

fn missing(seg: u32) -> SpoolError {
    SpoolError::Corrupt(format!("segment {} is missing", seg_name(seg)))
}

/// The `rawloc` key of blob `id`.
pub(super) fn loc_key(id: u64) -> [u8; 8] {
    id_key(id)
}

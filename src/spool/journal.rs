//! The store journal (`<spool>/journal`): what makes a stored message durable.
//!
//! Why: a sled 0.34 transaction writes sled's log buffer out twice (`pin_log`), and a sled
//! `flush()` once more; per group commit that was a quarter of intake's CPU. Now the committer
//! writes a batch's stores as one frame of inserts to this file, syncs it, and only then
//! applies the frame to sled with plain inserts: a process killed in the middle of those
//! inserts leaves a durable frame to apply again, never a half-stored job that nothing would
//! repair. A message of at most [`INLINE_MAX`] bytes (and a full-job blob as small) goes into
//! the frame too, so a commit of such messages syncs this one file: the segment files are
//! synced at the next checkpoint. A bigger message makes the commit sync the segments first.
//!
//! Checkpoint: when a batch carries a state change or removal, a segment is to be deleted, the
//! journal would pass [`JOURNAL_MAX`], or at shutdown, the committer syncs the segments,
//! flushes sled, records the next frame's number under [`CHECKPOINT_KEY`], flushes sled again
//! (the mark must never outlive what it covers), and starts the journal again at its
//! beginning. Frames are written over the old ones in place: an `fdatasync` of blocks that
//! already exist needs no file system metadata (about 65 µs here, against about 100 µs for an
//! append). The file grows, with zeros, a MiB at a time.
//!
//! Recovery: at open, every intact frame from the checkpoint on writes its messages back to
//! their segments (a machine crash may have taken the unsynced segment bytes) and is merged
//! into sled (replay.rs): a job sled lacks gets all its inserts back, a job sled has keeps
//! its record, which may have moved on, with its state index entry made to match. Every frame
//! since the checkpoint, not only those after the last one sled says it applied
//! ([`APPLIED_KEY`], still written after each frame): sled 0.34's recovery skips a torn
//! buffer in its last segments and goes on with the next segment, so it can keep a later
//! insert without an earlier one. (One run of the kill -9 delivery test lost 127
//! acknowledged jobs; trusting the applied mark is the one way found that this could
//! happen.) Then sled is flushed and a new checkpoint recorded. A frame cut short or failing
//! its CRC ends the replay (the process died writing it, before any of its messages had a
//! 250), and so do zeros and a frame numbered no higher than the one before it: what follows
//! the newest frames is what earlier rounds left, all of it checkpointed.
//!
//! Frame: `len: u32 | crc32(payload): u32 | payload`; payload: `seq: u64 | count: u32` and
//! `count` times `kind: u8 | key_len: u32 | key | value_len: u32 | value` (big-endian). Kinds
//! 1-5 are sled trees ([`TreeId`]); kind 6 is a message: key its location, value its bytes.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use sled::Tree;

use super::SpoolError;
use super::segments::{Loc, seg_path};

/// A checkpoint is made once the journal holds this much.
pub(super) const JOURNAL_MAX: u64 = 8 << 20;

/// Messages (and full-job blobs) up to this size travel in the frame.
pub(super) const INLINE_MAX: usize = 64 << 10;

/// The file grows by this much, with zeros, when a frame would pass its end.
const GROW: u64 = 1 << 20;

/// Key in sled's default tree: the sequence number of the last frame applied to sled.
pub(super) const APPLIED_KEY: &[u8] = b"journal-applied";

/// Key in sled's default tree: the first frame number after the last checkpoint.
pub(super) const CHECKPOINT_KEY: &[u8] = b"journal-checkpoint";

const HEADER: usize = 8;

/// The frame kind of a message's bytes.
const SEGMENT_BYTES: u8 = 6;

/// The trees a frame writes to, by their number in the frame.
#[derive(Clone)]
pub(super) struct JournalTrees {
    pub jobs: Tree,
    pub state: Tree,
    pub refs: Tree,
    pub dedup: Tree,
    pub rawloc: Tree,
    /// sled's default tree, for [`APPLIED_KEY`] and [`CHECKPOINT_KEY`].
    pub meta: Tree,
}

/// Tree numbers in a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum TreeId {
    Jobs = 1,
    State = 2,
    Refs = 3,
    Dedup = 4,
    /// Into sled at a replay only: at runtime the session inserted it already.
    Rawloc = 5,
}

impl JournalTrees {
    pub(super) fn tree(&self, id: u8) -> Option<&Tree> {
        Some(match id {
            1 => &self.jobs,
            2 => &self.state,
            3 => &self.refs,
            4 => &self.dedup,
            5 => &self.rawloc,
            _ => return None,
        })
    }

    fn number(&self, key: &[u8]) -> Result<u64, SpoolError> {
        match self.meta.get(key)? {
            None => Ok(0),
            Some(v) => v
                .as_ref()
                .try_into()
                .map(u64::from_be_bytes)
                .map_err(|_| SpoolError::Corrupt("journal sequence".into())),
        }
    }

    /// The sequence number of the last frame applied (0: none).
    pub fn applied(&self) -> Result<u64, SpoolError> {
        self.number(APPLIED_KEY)
    }

    /// Records that the frame `seq` is applied: the last insert of every frame.
    pub fn mark_applied(&self, seq: u64) -> Result<(), SpoolError> {
        self.meta.insert(APPLIED_KEY, &seq.to_be_bytes()[..])?;
        Ok(())
    }

    /// Records a checkpoint before the sled flush that makes it: frames from `next` on are
    /// the ones whose messages may still need writing back.
    pub fn mark_checkpoint(&self, next: u64) -> Result<(), SpoolError> {
        self.meta.insert(CHECKPOINT_KEY, &next.to_be_bytes()[..])?;
        Ok(())
    }
}

/// One frame being built: its inserts, encoded as they are made.
pub(super) struct Frame {
    buf: Vec<u8>,
    count: u32,
    /// A message of this batch is not in the frame: the commit must sync the segments.
    segments_unsynced: bool,
    /// Messages may travel in the frame (not in a batch that checkpoints anyway).
    carries_messages: bool,
}

impl Frame {
    pub fn new(seq: u64) -> Frame {
        let mut buf = Vec::with_capacity(4096);
        buf.extend_from_slice(&[0u8; HEADER]);
        buf.extend_from_slice(&seq.to_be_bytes());
        buf.extend_from_slice(&0u32.to_be_bytes());
        Frame { buf, count: 0, segments_unsynced: false, carries_messages: true }
    }

    /// A frame for a batch that syncs the segments anyway (a checkpoint): its messages stay
    /// out of it, written once.
    pub fn without_messages(mut self) -> Frame {
        self.carries_messages = false;
        self
    }

    pub fn put(&mut self, tree: TreeId, key: &[u8], value: &[u8]) {
        self.entry(tree as u8, key, value);
    }

    fn entry(&mut self, kind: u8, key: &[u8], value: &[u8]) {
        self.buf.push(kind);
        for part in [key, value] {
            self.buf.extend_from_slice(&(part.len() as u32).to_be_bytes());
            self.buf.extend_from_slice(part);
        }
        self.count += 1;
    }

    /// A stored message (or full-job blob) at `loc`: its bytes go into the frame when they
    /// were kept for it, else the commit syncs the segments.
    pub fn message(&mut self, loc: &Loc, bytes: Option<&[u8]>) {
        match bytes {
            Some(b) if self.carries_messages => self.entry(SEGMENT_BYTES, &loc.encode(), b),
            _ => self.segments_unsynced = true,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn segments_unsynced(&self) -> bool {
        self.segments_unsynced
    }

    /// The frame's bytes, header filled in.
    pub fn finish(mut self) -> Vec<u8> {
        let count_at = HEADER + 8;
        self.buf[count_at..count_at + 4].copy_from_slice(&self.count.to_be_bytes());
        let payload_len = (self.buf.len() - HEADER) as u32;
        let crc = crc32fast::hash(&self.buf[HEADER..]);
        self.buf[..4].copy_from_slice(&payload_len.to_be_bytes());
        self.buf[4..HEADER].copy_from_slice(&crc.to_be_bytes());
        self.buf
    }
}

/// The journal file, written only by the committer.
pub(super) struct Journal {
    file: File,
    len: u64,
    /// The file's size: blocks up to here exist.
    size: u64,
    next_seq: u64,
}

impl Journal {
    /// Opens `<dir>/journal` and recovers from it (see the module docs): messages back to
    /// their segments, inserts sled lacks back to sled, then a checkpoint. Returns the journal
    /// and how many frames were applied to sled.
    pub fn open(
        dir: &Path,
        db: &sled::Db,
        db_file: &File,
        trees: &JournalTrees,
    ) -> Result<(Journal, usize), SpoolError> {
        let path = dir.join("journal");
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path)?;
        let bytes = std::fs::read(&path)?;
        let checkpoint = trees.number(CHECKPOINT_KEY)?;
        // Every frame before the checkpoint is in sled: the checkpoint is recorded only after
        // a completed flush (a frame whose apply failed had its senders told to try again).
        let mut last = trees.applied()?.max(checkpoint.saturating_sub(1));
        let mut replayed = 0;
        let mut segments: HashMap<u32, File> = HashMap::new();
        for frame in frames(&bytes) {
            let (seq, puts) = frame?;
            last = last.max(seq);
            if seq < checkpoint {
                continue;
            }
            for (_, key, value) in puts.iter().filter(|(kind, _, _)| *kind == SEGMENT_BYTES) {
                write_back(dir, &mut segments, key, value)?;
            }
            // Every frame since the checkpoint, whatever sled says it applied: sled 0.34 does
            // not always recover a prefix of its log (replay.rs).
            if super::replay::merge_puts(trees, &puts)? {
                replayed += 1;
            }
        }
        for f in segments.values() {
            f.sync_data()?;
        }
        if !segments.is_empty() {
            File::open(dir.join("segments"))?.sync_all()?;
        }
        let next_seq = last.saturating_add(1).max(checkpoint);
        // The replayed inserts first, then the checkpoint that says they are in. sled's flush
        // ends in `sync_file_range`, which makes nothing durable against a power cut (no
        // metadata, no disk cache flush): `<dir>/db` is synced here, as at every checkpoint
        // (committer.rs). Without it, the frames the new journal overwrites were lost to a
        // power cut soon after a restart (tests/powercut.rs).
        db.flush()?;
        db_file.sync_data()?;
        trees.mark_checkpoint(next_seq)?;
        db.flush()?;
        db_file.sync_data()?;
        file.sync_all()?;
        File::open(dir)?.sync_all()?;
        Ok((Journal { file, len: 0, size: bytes.len() as u64, next_seq }, replayed))
    }

    /// A sequence number for the next frame. Every batch takes its own, used or not: a
    /// number sled has recorded as applied is never given to another frame.
    pub fn take_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    /// The number the next frame will take.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Bytes written since the last [`Journal::reset`].
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Appends a finished frame and makes it durable.
    pub fn append(&mut self, frame: &[u8]) -> Result<(), SpoolError> {
        let end = self.len + frame.len() as u64;
        if end > self.size {
            // Zeros first, so that the blocks exist for the overwrites to come; synced with
            // the frame.
            let size = end.div_ceil(GROW) * GROW;
            let zeros = vec![0u8; (size - self.size) as usize];
            self.file.write_all_at(&zeros, self.size)?;
            self.size = size;
        }
        if let Err(e) = self.file.write_all_at(frame, self.len).and_then(|_| self.file.sync_data()) {
            // What was written may be a torn frame: the next frame goes over it, and until
            // then a replay stops there (nothing after it had its 250).
            return Err(e.into());
        }
        self.len = end;
        Ok(())
    }

    /// Starts the journal again at its beginning: call only after a checkpoint that covers
    /// every frame in it. What it held is overwritten by the frames to come.
    pub fn reset(&mut self) {
        self.len = 0;
    }
}

/// Writes a message from a frame back to its segment (creating the file if it is gone).
fn write_back(dir: &Path, files: &mut HashMap<u32, File>, key: &[u8], bytes: &[u8]) -> Result<(), SpoolError> {
    let loc = Loc::decode(key)?;
    if loc.len != bytes.len() as u64 || crc32fast::hash(bytes) != loc.crc {
        return Err(SpoolError::Corrupt(format!(
            "journal: the message for segment {} at {} fails its CRC",
            loc.seg, loc.off
        )));
    }
    let file = match files.entry(loc.seg) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(e) => {
            std::fs::create_dir_all(dir.join("segments"))?;
            e.insert(
                OpenOptions::new().read(true).write(true).create(true).truncate(false).open(seg_path(dir, loc.seg))?,
            )
        }
    };
    file.write_all_at(bytes, loc.off)?;
    Ok(())
}

pub(super) type Put<'a> = (u8, &'a [u8], &'a [u8]);

/// Applies the frames in `bytes` (written, and made durable, just before) to sled. The
/// messages' locations are left out: the sessions inserted them when they wrote the messages.
pub(super) fn apply(trees: &JournalTrees, bytes: &[u8]) -> Result<(), SpoolError> {
    for frame in frames(bytes) {
        let (seq, puts) = frame?;
        apply_puts(trees, seq, &puts)?;
    }
    Ok(())
}

/// A frame's inserts into sled at runtime (never the locations, which the sessions inserted,
/// nor the message bytes), then its number as applied.
fn apply_puts(trees: &JournalTrees, seq: u64, puts: &[Put<'_>]) -> Result<(), SpoolError> {
    for (tree, key, value) in puts {
        if *tree == SEGMENT_BYTES || *tree == TreeId::Rawloc as u8 {
            continue;
        }
        let t = trees.tree(*tree).ok_or_else(|| SpoolError::Corrupt(format!("journal tree {tree}")))?;
        t.insert(*key, *value)?;
    }
    trees.mark_applied(seq)
}

/// The intact frames at the start of `bytes`, each as (seq, inserts); ends at the first
/// frame cut short, failing its CRC, or numbered no higher than the one before it.
pub(super) fn frames(bytes: &[u8]) -> impl Iterator<Item = Result<(u64, Vec<Put<'_>>), SpoolError>> {
    let mut rest = bytes;
    let mut last = 0u64;
    std::iter::from_fn(move || {
        let (len, crc) = (be_u32(rest.get(..4)?)?, be_u32(rest.get(4..HEADER)?)?);
        if (len as usize) < 12 {
            // Zeros past the end of what was written (or a length no frame has).
            return None;
        }
        let payload = rest.get(HEADER..HEADER + len as usize)?;
        if crc32fast::hash(payload) != crc {
            return None;
        }
        rest = &rest[HEADER + len as usize..];
        let frame = parse(payload);
        match frame {
            Some((seq, _)) if seq <= last => None,
            Some(f) => {
                last = f.0;
                Some(Ok(f))
            }
            None => Some(Err(SpoolError::Corrupt("journal frame with a valid CRC does not parse".into()))),
        }
    })
}

fn parse(payload: &[u8]) -> Option<(u64, Vec<Put<'_>>)> {
    let seq = u64::from_be_bytes(payload.get(..8)?.try_into().ok()?);
    let count = be_u32(payload.get(8..12)?)?;
    let mut rest = payload.get(12..)?;
    let mut take = |n: usize| {
        let (head, tail) = (rest.get(..n)?, rest.get(n..)?);
        rest = tail;
        Some(head)
    };
    let mut puts = Vec::with_capacity(count.min(1 << 16) as usize);
    for _ in 0..count {
        let tree = *take(1)?.first()?;
        let key_len = be_u32(take(4)?)? as usize;
        let key = take(key_len)?;
        let value_len = be_u32(take(4)?)? as usize;
        let value = take(value_len)?;
        puts.push((tree, key, value));
    }
    Some((seq, puts))
}

fn be_u32(b: &[u8]) -> Option<u32> {
    b.try_into().ok().map(u32::from_be_bytes)
}

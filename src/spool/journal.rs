//! The store journal (`<spool>/journal`): what makes a stored message's job records durable.
//!
//! Why: a sled 0.34 transaction writes sled's log buffer out twice (`pin_log`), and a sled
//! `flush()` once more; per group commit that was a quarter of intake's CPU. Now the committer
//! writes a batch's stores as one frame of inserts to this file, syncs it after the segment
//! files, and only then applies the frame to sled with plain inserts: a process killed in the
//! middle of those inserts leaves a durable frame to apply again, never a half-stored job that
//! nothing would repair. sled itself is flushed only when a batch needs it (state changes,
//! removals, shutdown) or the journal passes [`JOURNAL_MAX`]; after every sled flush the
//! journal starts again at its beginning.
//!
//! The file is filled with zeros at open ([`PREALLOCATED`]) and then overwritten in place: an
//! `fdatasync` of blocks that already exist needs no file system metadata (about 65 µs here,
//! against about 100 µs for an append).
//!
//! Recovery: the last insert of every applied frame is its sequence number under
//! [`APPLIED_KEY`] in sled's default tree. sled recovers a prefix of its log, so when that key
//! survived with sequence `n`, every insert of frames up to `n` survived too. At open every
//! intact frame after `n` is applied again (its inserts are plain puts: applying one twice
//! changes nothing), sled is flushed and the file zeroed. A frame cut short or failing its
//! CRC ends the replay: it was being written when the process died and none of its messages
//! had a 250. So do zeros and a frame whose number is not above the one before it: what
//! follows the newest frames is what earlier rounds left, all of it in sled already.
//!
//! Frame: `len: u32 | crc32(payload): u32 | payload`; payload: `seq: u64 | count: u32` and
//! `count` times `tree: u8 | key_len: u32 | key | value_len: u32 | value` (big-endian).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use sled::Tree;

use super::SpoolError;

/// sled is flushed and the journal started again once it holds this much.
pub(super) const JOURNAL_MAX: u64 = 4 << 20;

/// The journal's size in zeros after open: room for [`JOURNAL_MAX`] and the frame that passes
/// it (a bigger frame makes the file grow).
const PREALLOCATED: u64 = JOURNAL_MAX + (1 << 20);

/// Key in sled's default tree: the sequence number of the last frame applied to sled.
pub(super) const APPLIED_KEY: &[u8] = b"journal-applied";

const HEADER: usize = 8;

/// The trees a frame writes to, by their number in the frame.
#[derive(Clone)]
pub(super) struct JournalTrees {
    pub jobs: Tree,
    pub state: Tree,
    pub refs: Tree,
    pub dedup: Tree,
    pub rawloc: Tree,
    /// sled's default tree, for [`APPLIED_KEY`].
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
    fn tree(&self, id: u8) -> Option<&Tree> {
        Some(match id {
            1 => &self.jobs,
            2 => &self.state,
            3 => &self.refs,
            4 => &self.dedup,
            5 => &self.rawloc,
            _ => return None,
        })
    }

    /// The sequence number of the last frame applied (0: none).
    pub fn applied(&self) -> Result<u64, SpoolError> {
        match self.meta.get(APPLIED_KEY)? {
            None => Ok(0),
            Some(v) => v
                .as_ref()
                .try_into()
                .map(u64::from_be_bytes)
                .map_err(|_| SpoolError::Corrupt("journal sequence".into())),
        }
    }

    /// Records that the frame `seq` is applied: the last insert of every frame.
    pub fn mark_applied(&self, seq: u64) -> Result<(), SpoolError> {
        self.meta.insert(APPLIED_KEY, &seq.to_be_bytes()[..])?;
        Ok(())
    }
}

/// One frame being built: its inserts, encoded as they are made.
pub(super) struct Frame {
    buf: Vec<u8>,
    count: u32,
}

impl Frame {
    pub fn new(seq: u64) -> Frame {
        let mut buf = Vec::with_capacity(4096);
        buf.extend_from_slice(&[0u8; HEADER]);
        buf.extend_from_slice(&seq.to_be_bytes());
        buf.extend_from_slice(&0u32.to_be_bytes());
        Frame { buf, count: 0 }
    }

    pub fn put(&mut self, tree: TreeId, key: &[u8], value: &[u8]) {
        self.buf.push(tree as u8);
        for part in [key, value] {
            self.buf.extend_from_slice(&(part.len() as u32).to_be_bytes());
            self.buf.extend_from_slice(part);
        }
        self.count += 1;
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
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
    next_seq: u64,
}

impl Journal {
    /// Opens `<dir>/journal`, applies the frames sled lacks (see the module docs), flushes
    /// sled and empties the file. Returns the journal and how many frames were applied.
    pub fn open(dir: &Path, db: &sled::Db, trees: &JournalTrees) -> Result<(Journal, usize), SpoolError> {
        let path = dir.join("journal");
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path)?;
        let bytes = std::fs::read(&path)?;
        let applied = trees.applied()?;
        let mut replayed = 0;
        let mut last = applied;
        for frame in frames(&bytes) {
            let (seq, puts) = frame?;
            if seq <= applied {
                continue;
            }
            apply_puts(trees, seq, &puts, true)?;
            last = last.max(seq);
            replayed += 1;
        }
        db.flush()?;
        // Everything in the file is in sled now: zeros over all of it (fresh extents for the
        // overwrites to come, and no frame left to read again).
        let zeros = vec![0u8; 1 << 20];
        let mut at = 0;
        while at < PREALLOCATED.max(bytes.len() as u64) {
            file.write_all_at(&zeros, at)?;
            at += zeros.len() as u64;
        }
        file.sync_all()?;
        std::fs::File::open(dir)?.sync_all()?;
        Ok((Journal { file, len: 0, next_seq: last.saturating_add(1) }, replayed))
    }

    /// A sequence number for the next frame. Every batch takes its own, used or not: a
    /// number sled has recorded as applied is never given to another frame.
    pub fn take_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    /// Bytes written since the last [`Journal::reset`].
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Appends a finished frame and makes it durable.
    pub fn append(&mut self, frame: &[u8]) -> Result<(), SpoolError> {
        if let Err(e) = self.file.write_all_at(frame, self.len).and_then(|_| self.file.sync_data()) {
            // What was written may be a torn frame: the next frame goes over it, and until
            // then a replay stops there (nothing after it had its 250).
            return Err(e.into());
        }
        self.len += frame.len() as u64;
        Ok(())
    }

    /// Starts the journal again at its beginning: call only after a sled flush that covers
    /// every frame in it. What it held is overwritten by the frames to come.
    pub fn reset(&mut self) {
        self.len = 0;
    }
}

type Put<'a> = (u8, &'a [u8], &'a [u8]);

/// Applies the frames in `bytes` (written, and made durable, just before) to sled. The
/// messages' locations are left out: the sessions inserted them when they wrote the messages.
pub(super) fn apply(trees: &JournalTrees, bytes: &[u8]) -> Result<(), SpoolError> {
    for frame in frames(bytes) {
        let (seq, puts) = frame?;
        apply_puts(trees, seq, &puts, false)?;
    }
    Ok(())
}

/// A frame's inserts (the locations too when `with_locations`: a replay), then its number as
/// applied (the last insert: see the module docs).
fn apply_puts(trees: &JournalTrees, seq: u64, puts: &[Put<'_>], with_locations: bool) -> Result<(), SpoolError> {
    for (tree, key, value) in puts {
        if *tree == TreeId::Rawloc as u8 && !with_locations {
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

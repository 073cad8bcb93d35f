//! The sweep at open: blobs that no job uses.
//!
//! A blob's location goes into `rawloc` when the session writes it, before the commit that
//! stores its job, and a purge removes the location after the job's records. A kill -9 (or a
//! machine crash after one of sled's flushes) between the two leaves a location no job uses,
//! and its segment would never be deleted. At open nothing is in flight, so a location is
//! in use exactly when `refs` names it: every job holds a reference to its raw message and,
//! when its record is a stub, to its full-job blob.
//!
//! Spools from before full-job blobs had references hold such blobs without one. They are
//! found by decoding the job records, which happens only when some location lacks a
//! reference; each one found gets its reference, so the next open does not decode again.

use std::collections::HashSet;

use sled::Tree;

use super::SpoolError;
use super::keys::{be_u64, ref_key};
use super::records::StoredJob;
use super::segments::loc_key;

/// The trees a sweep reads and mends.
pub(super) struct Trees<'a> {
    pub jobs: &'a Tree,
    pub refs: &'a Tree,
    pub rawloc: &'a Tree,
}

/// What [`sweep`] did.
#[derive(Debug, Default)]
pub(super) struct Swept {
    /// Locations no job used, removed from `rawloc`.
    pub removed: usize,
    /// Full-job blobs of an older spool that got their missing reference.
    pub adopted: usize,
}

/// Removes every location in `rawloc` that no job uses (see the module docs). Runs before the
/// segments are opened, which then delete the segments nothing uses any more.
pub(super) fn sweep(t: &Trees<'_>) -> Result<Swept, SpoolError> {
    let mut unreferenced = unreferenced(t)?;
    let mut out = Swept::default();
    if unreferenced.is_empty() {
        return Ok(out);
    }
    for item in t.jobs.iter() {
        let (key, bytes) = item?;
        let Some(full) = StoredJob::decode(&bytes)?.full else { continue };
        if unreferenced.remove(&full) {
            let id = be_u64(&key).ok_or_else(|| SpoolError::Corrupt("job key".into()))?;
            t.refs.insert(ref_key(full, id), &[])?;
            out.adopted += 1;
            if unreferenced.is_empty() {
                break;
            }
        }
    }
    for id in unreferenced {
        t.rawloc.remove(loc_key(id))?;
        out.removed += 1;
    }
    Ok(out)
}

/// The blob ids in `rawloc` that no key of `refs` starts with: one ordered pass over both trees
/// (both are keyed by the big-endian blob id first).
fn unreferenced(t: &Trees<'_>) -> Result<HashSet<u64>, SpoolError> {
    let mut refs = t.refs.iter().keys();
    let mut next_ref = || -> Result<Option<u64>, SpoolError> {
        match refs.next().transpose()? {
            Some(k) => k.get(..8).and_then(be_u64).map(Some).ok_or_else(|| SpoolError::Corrupt("reference key".into())),
            None => Ok(None),
        }
    };
    let mut current = next_ref()?;
    let mut out = HashSet::new();
    for key in t.rawloc.iter().keys() {
        let key = key?;
        let id = be_u64(&key).ok_or_else(|| SpoolError::Corrupt("raw message key".into()))?;
        while current.is_some_and(|r| r < id) {
            current = next_ref()?;
        }
        if current != Some(id) {
            out.insert(id);
        }
    }
    Ok(out)
}

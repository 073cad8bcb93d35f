//! Recovery at open: jobs whose blobs (raw message or full record) did not survive a machine
//! crash.
//!
//! Such a job's records reached the disk but the segment bytes they point to did not, which
//! can only happen before the commit that would have covered them: the sender never got its
//! 250 and will send the message again. The job is removed with everything that names it, its
//! dedup entries included (they would otherwise refuse the sender's retry as a duplicate).

use std::collections::HashSet;

use sled::Tree;

use super::SpoolError;
use super::keys::{be_u64, id_key, index_tag, parse_dedup_value, ref_key, tagged_key};
use super::records::StoredJob;
use super::segments::{Loc, loc_key};

/// The trees a discard touches.
pub(super) struct Trees<'a> {
    pub jobs: &'a Tree,
    pub state: &'a Tree,
    pub refs: &'a Tree,
    pub dedup: &'a Tree,
    pub rawloc: &'a Tree,
}

/// What [`discard`] removed.
#[derive(Debug, Default)]
pub(super) struct Discarded {
    /// The jobs, as (job id, Message-ID) for the log.
    pub jobs: Vec<(u64, String)>,
    /// Intact blobs no job uses any more: the segments must forget them.
    pub freed: Vec<Loc>,
}

/// Removes every job that uses one of the `damaged` blobs, the other blobs of those jobs, and
/// the damaged pointers.
pub(super) fn discard(t: &Trees<'_>, damaged: &[u64]) -> Result<Discarded, SpoolError> {
    let damaged: HashSet<u64> = damaged.iter().copied().collect();
    let mut doomed = Vec::new();
    for item in t.jobs.iter() {
        let (key, bytes) = item?;
        let record = StoredJob::decode(&bytes)?;
        if damaged.contains(&record.raw_id) || record.full.is_some_and(|f| damaged.contains(&f)) {
            doomed.push((be_u64(&key).ok_or_else(|| SpoolError::Corrupt("job key".into()))?, record));
        }
    }
    let mut out = Discarded::default();
    let mut unused = Vec::new();
    let mut raw_ids = HashSet::new();
    for (id, record) in doomed {
        t.jobs.remove(id_key(id))?;
        t.state.remove(tagged_key(index_tag(&record.job), id))?;
        t.refs.remove(ref_key(record.raw_id, id))?;
        raw_ids.insert(record.raw_id);
        if let Some(full) = record.full {
            t.refs.remove(ref_key(full, id))?;
            unused.push(full);
        }
        out.jobs.push((id, record.job.message.message_id));
    }
    // (a stale timer of a removed job is dropped by the reaper, which finds no record)
    for item in t.dedup.iter() {
        let (key, value) = item?;
        if parse_dedup_value(&value).is_some_and(|(holder, _)| out.jobs.iter().any(|(id, _)| *id == holder)) {
            t.dedup.remove(key)?;
        }
    }
    for raw_id in raw_ids {
        if t.refs.scan_prefix(id_key(raw_id)).next().is_none() {
            unused.push(raw_id);
        }
    }
    for blob in unused.into_iter().chain(damaged.iter().copied()) {
        if let Some(v) = t.rawloc.remove(loc_key(blob))?
            && !damaged.contains(&blob)
        {
            out.freed.push(Loc::decode(&v)?);
        }
    }
    Ok(out)
}

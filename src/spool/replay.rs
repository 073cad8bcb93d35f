//! Merging a journal frame into sled at open (journal.rs, "Recovery"), job by job.

use std::collections::HashSet;

use super::SpoolError;
use super::journal::{JournalTrees, Put, TreeId};
use super::keys::{WAITING_TAG, be_u64, id_key, index_tag, tagged_key};
use super::records::StoredJob;
use crate::job::JobState;

/// A frame's stores merged into sled at open; true if sled lacked something.
///
/// sled 0.34 may recover its log with a hole: its recovery skips a torn buffer in the last
/// segments and goes on with the next segment, so a later insert (a frame's applied mark, a
/// job's next state) can survive an earlier one (a job's record). The frame is therefore
/// merged, not trusted to be applied or not as a whole: a job whose record sled lacks gets
/// every insert the frame has for it; a job whose record sled has keeps the record, which may
/// have moved on since (a delivery), and gets its state index entry and reference made to
/// match it. Locations and de-duplication entries go in where missing (a location no job
/// uses any more is removed by the sweep that follows, sweep.rs).
pub(super) fn merge_puts(trees: &JournalTrees, puts: &[Put<'_>]) -> Result<bool, SpoolError> {
    let job_id = |key: &[u8]| key.get(..8).and_then(be_u64);
    let mut restored = HashSet::new();
    let mut kept = Vec::new();
    let mut changed = false;
    for (tree, key, value) in puts.iter().filter(|(tree, _, _)| *tree == TreeId::Jobs as u8) {
        let id = job_id(key).ok_or_else(|| SpoolError::Corrupt(format!("journal tree {tree}: job key")))?;
        if let Some(had) = trees.jobs.get(key)? {
            if !same_job(&had, value) {
                // Never expected: the id was given out twice. sled's record is kept.
                tracing::error!(target: "mailgate::spool", job = %crate::job::format_id(id),
                    "journal: a stored job's id belongs to another job in the spool; the journal's job is lost");
            }
            kept.push(id);
        } else {
            trees.jobs.insert(*key, *value)?;
            restored.insert(id);
            changed = true;
        }
    }
    for (tree, key, value) in puts {
        let id_at = |from: usize| key.get(from..).and_then(job_id);
        let missing = match *tree {
            t if t == TreeId::State as u8 => id_at(1).is_some_and(|id| restored.contains(&id)),
            t if t == TreeId::Refs as u8 => id_at(8).is_some_and(|id| restored.contains(&id) || kept.contains(&id)),
            t if t == TreeId::Dedup as u8 || t == TreeId::Rawloc as u8 => true,
            _ => false,
        };
        if !missing {
            continue;
        }
        let t = trees.tree(*tree).ok_or_else(|| SpoolError::Corrupt(format!("journal tree {tree}")))?;
        if !t.contains_key(*key)? {
            t.insert(*key, *value)?;
            changed = true;
        }
    }
    for id in kept {
        changed |= match_index(trees, id)?;
    }
    Ok(changed)
}

/// Makes job `id`'s state index entries match its record: the entry for its tag, no other.
/// True if something was missing or stale.
fn match_index(trees: &JournalTrees, id: u64) -> Result<bool, SpoolError> {
    let Some(bytes) = trees.jobs.get(id_key(id))? else { return Ok(false) };
    let job = StoredJob::decode(&bytes)?.job;
    let want = index_tag(&job);
    let mut changed = false;
    for tag in [JobState::Ready.tag(), WAITING_TAG, JobState::Leased.tag(), JobState::Done.tag(), JobState::Dead.tag()]
    {
        let key = tagged_key(tag, id);
        if tag == want {
            if !trees.state.contains_key(key)? {
                trees.state.insert(key, job.mailbox.as_bytes())?;
                changed = true;
            }
        } else if trees.state.remove(key)?.is_some() {
            changed = true;
        }
    }
    Ok(changed)
}

/// Whether two records are the same job (one may have moved on since): the same message,
/// received at the same time. A record that does not decode counts as the same: this check
/// only decides whether to log, and the record's readers report it.
fn same_job(a: &[u8], b: &[u8]) -> bool {
    match (StoredJob::decode(a), StoredJob::decode(b)) {
        (Ok(a), Ok(b)) => a.raw_id == b.raw_id && a.job.received_at == b.job.received_at,
        _ => true,
    }
}

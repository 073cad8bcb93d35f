//! The internal job record: the public [`Job`] plus where its raw message is. The public Job
//! JSON is unchanged; this wrapper only exists in the jobs tree.
//!
//! A record whose JSON would be longer than [`RECORD_INLINE_MAX`] (a long reply text, a huge
//! subject) keeps the full job as a blob written like a raw message (a segment file; the raw
//! tree in spools from before segments) and a stub in the jobs tree: the stub carries
//! everything a state change touches, the blob the rest.

use serde::{Deserialize, Serialize};

use super::jobs::Blob;
use super::keys::RECORD_INLINE_MAX;
use super::{Spool, SpoolError};
use crate::job::{AuthResults, Envelope, Job, MessageInfo};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct StoredJob {
    /// Blob id of the raw message in the raw tree.
    pub raw_id: u64,
    /// Blob id of the full job when `job` is only a stub.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full: Option<u64>,
    /// Leased by one of this process's push workers (not by a pull client): such a lease dies
    /// with the process, so the next start releases it at once instead of waiting it out.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub push: bool,
    pub job: Job,
}

impl StoredJob {
    /// Builds the record of a new job; writes the full-job blob when needed (and returns it
    /// with its place).
    pub fn build(spool: &Spool, raw_id: u64, job: Job) -> Result<(StoredJob, Option<Blob>), SpoolError> {
        let json = serde_json::to_vec(&job).map_err(|e| SpoolError::Corrupt(format!("job serialization: {e}")))?;
        if json.len() <= RECORD_INLINE_MAX {
            return Ok((StoredJob { raw_id, full: None, push: false, job }, None));
        }
        let blob = spool.0.db.generate_id()?;
        let loc = spool.write_message(blob, &json)?;
        Ok((StoredJob { raw_id, full: Some(blob), push: false, job: stub(job) }, Some(Blob::owned(blob, loc, json))))
    }

    pub fn decode(bytes: &[u8]) -> Result<StoredJob, SpoolError> {
        serde_json::from_slice(bytes).map_err(|e| SpoolError::Corrupt(format!("job record: {e}")))
    }

    pub fn encode(&self) -> Result<Vec<u8>, SpoolError> {
        serde_json::to_vec(self).map_err(|e| SpoolError::Corrupt(format!("job serialization: {e}")))
    }

    /// The public job: the stub's mutable fields over the full job's blob.
    pub fn load(self, spool: &Spool) -> Result<Job, SpoolError> {
        let Some(blob) = self.full else { return Ok(self.job) };
        let bytes = spool
            .read_message(blob)?
            .ok_or_else(|| SpoolError::Corrupt(format!("job {}: full record missing", self.job.id)))?;
        let mut full: Job = serde_json::from_slice(&bytes)
            .map_err(|e| SpoolError::Corrupt(format!("job {}: full record: {e}", self.job.id)))?;
        let s = self.job;
        full.id = s.id;
        full.state = s.state;
        full.attempts = s.attempts;
        full.lease_until = s.lease_until;
        full.updated_at = s.updated_at;
        full.last_error = s.last_error;
        full.next_attempt_at = s.next_attempt_at;
        Ok(full)
    }
}

/// The job without its unbounded, never-changing parts.
fn stub(job: Job) -> Job {
    Job {
        envelope: Envelope::default(),
        message: MessageInfo::default(),
        auth: AuthResults {
            spf: String::new(),
            dkim: String::new(),
            dmarc: String::new(),
            dmarc_policy: String::new(),
            arc: String::new(),
            header: String::new(),
            arc_sealer: None,
        },
        reply_text: None,
        ..job
    }
}

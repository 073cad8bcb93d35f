//! Jobs as consumers see them. `reply_text` is derived from the raw message when a job is
//! handed to a consumer (`get`, `list`, the pull API, `ack`/`nack`/`retry`/`fail`, and the
//! webhook, which has the raw message anyway), not at intake:
//! - it is off the path to the 250: working it out took about a quarter of an SMTP session's
//!   CPU for a 4 KiB message, and mailroom and Sidekiq deliveries never send it (GitLab reads
//!   the raw message);
//! - the stored record stays small (a long reply no longer pushes a record into a blob).
//!
//! Records from spools written before this keep the reply text they were stored with.

use super::records::StoredJob;
use super::{Spool, SpoolError};
use crate::job::Job;

/// Messages at least this large are presented on a blocking thread, not on a runtime worker:
/// the whole message is parsed to find its text.
const PRESENT_OFF_RUNTIME: u64 = 256 * 1024;

/// Sets `job.reply_text` from `raw` unless the job already carries one.
pub fn fill_reply_text(job: &mut Job, raw: &[u8]) {
    if job.reply_text.is_none() {
        job.reply_text = crate::reply::reply_text(raw);
    }
}

impl Spool {
    /// The public job with its reply text. A raw message that cannot be read leaves the reply
    /// text null (and is logged): showing the job matters more than its reply text, and
    /// `raw` reports the missing message itself.
    pub(super) fn present(&self, record: StoredJob) -> Result<Job, SpoolError> {
        let raw_id = record.raw_id;
        let mut job = record.load(self)?;
        self.show_hold(&mut job);
        if job.reply_text.is_some() {
            return Ok(job);
        }
        match self.read_message(raw_id) {
            Ok(Some(raw)) => fill_reply_text(&mut job, &raw),
            Ok(None) => tracing::warn!(target: "mailgate::spool", job = %job.id, raw_id, "raw message missing"),
            Err(e) => {
                tracing::warn!(target: "mailgate::spool", job = %job.id, error = %e, "cannot read the raw message")
            }
        }
        Ok(job)
    }

    /// [`Spool::present`] for async callers: large messages are parsed on a blocking thread.
    pub(super) async fn present_async(&self, record: StoredJob) -> Result<Job, SpoolError> {
        if record.job.reply_text.is_some() || record.job.message.size < PRESENT_OFF_RUNTIME {
            return self.present(record);
        }
        let spool = self.clone();
        match tokio::task::spawn_blocking(move || spool.present(record)).await {
            Ok(result) => result,
            Err(e) => Err(SpoolError::Io(std::io::Error::other(format!("presenting a job: {e}")))),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::tests::{new_job, options, stored_id};
    use super::*;

    const RAW: &[u8] = b"From: a@example.org\r\nSubject: re\r\n\r\nThanks, merged!\r\n\r\nOn Mon, 1 Jan 2026 at 10:00, Bob <b@example.org> wrote:\r\n> the question\r\n";

    /// A job stored without a reply text, as intake stores them now.
    async fn stored(spool: &Spool) -> String {
        let mut new = new_job("incoming", "k1", vec![]);
        new.job.reply_text = None;
        stored_id(&spool.store(RAW, vec![new]).await.unwrap()[0])
    }

    #[tokio::test]
    async fn consumers_get_the_reply_text_worked_out_from_the_raw_message() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), options()).unwrap();
        let id = stored(&spool).await;
        let reply = Some("Thanks, merged!");
        assert_eq!(spool.get(&id).unwrap().unwrap().reply_text.as_deref(), reply);
        assert_eq!(spool.list(None, 0).unwrap()[0].reply_text.as_deref(), reply);
        let leased = spool.lease_next(None, Duration::from_secs(60)).await.unwrap().unwrap();
        assert_eq!(leased.reply_text.as_deref(), reply);
        assert_eq!(spool.nack(&id).await.unwrap().reply_text.as_deref(), reply);
        assert_eq!(spool.ack(&id).await.unwrap().reply_text.as_deref(), reply);
    }

    #[tokio::test]
    async fn push_workers_and_the_record_do_not_carry_it() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), options()).unwrap();
        let id = stored(&spool).await;
        let held = spool.lease_for_push(&[], Duration::from_secs(60)).unwrap().unwrap();
        assert_eq!((held.job().id.as_str(), held.job().reply_text.as_deref()), (id.as_str(), None));
        assert_eq!(spool.push_delivered(held).await.unwrap().reply_text, None);
        // Nothing was written back: the stored record still has none.
        assert_eq!(spool.record(crate::job::parse_id(&id).unwrap()).unwrap().and_then(|r| r.job.reply_text), None);
    }

    #[tokio::test]
    async fn a_stored_reply_text_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), options()).unwrap();
        let id = stored_id(&spool.store(RAW, vec![new_job("incoming", "k1", vec![])]).await.unwrap()[0]);
        assert_eq!(spool.get(&id).unwrap().unwrap().reply_text.as_deref(), Some("the reply"));
    }

    #[test]
    fn fill_reply_text_leaves_a_message_without_text_null() {
        let mut job = super::super::tests::job("incoming", "k");
        job.reply_text = None;
        fill_reply_text(
            &mut job,
            b"Content-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n\r\niVBORw0KGgo=\r\n",
        );
        assert_eq!(job.reply_text, None);
    }
}

//! Spool tests: storing, raw messages, dedup, group commit, persistence.

use std::path::Path;
use std::time::Duration;

use time::OffsetDateTime;

use super::*;
use crate::job::{AuthResults, Envelope, KeySource, MessageInfo, Route};

pub(super) fn job(mailbox: &str, key: &str) -> Job {
    Job {
        id: "ignored".into(),
        state: JobState::Dead,
        received_at: OffsetDateTime::now_utc(),
        attempts: 0,
        mailbox: mailbox.into(),
        key: key.into(),
        key_source: KeySource::Rcpt,
        route: Route::Reply,
        envelope: Envelope {
            mail_from: "a@example.org".into(),
            rcpt_to: vec![format!("{mailbox}+{key}@x")],
            ..Default::default()
        },
        message: MessageInfo { message_id: "<m@x>".into(), subject: "hello".into(), size: 5, ..Default::default() },
        auth: AuthResults::not_checked("mx.example.com"),
        reply_text: Some("the reply".into()),
        lease_until: None,
        updated_at: None,
        last_error: None,
        next_attempt_at: None,
    }
}

pub(super) fn new_job(mailbox: &str, key: &str, dedup_keys: Vec<Vec<u8>>) -> NewJob {
    NewJob { job: job(mailbox, key), dedup_keys }
}

pub(super) fn options() -> SpoolOptions {
    SpoolOptions {
        dedup_window: Duration::from_secs(3600),
        reject_retention: Duration::from_secs(3600),
        reject_max_entries: 1000,
        retention: Duration::from_secs(3600),
    }
}

/// Opens the spool again after a close. sled's I/O threads may hold its lock a few
/// milliseconds after the last handle is gone (a new process never waits: the old one's exit
/// released it).
pub(super) fn reopen(dir: &Path) -> Spool {
    reopen_with(dir, options())
}

pub(super) fn reopen_with(dir: &Path, opts: SpoolOptions) -> Spool {
    let t0 = std::time::Instant::now();
    loop {
        match Spool::open(dir, opts.clone()) {
            Err(SpoolError::Locked(_)) if t0.elapsed().as_secs() < 5 => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            other => return other.unwrap(),
        }
    }
}

pub(super) fn stored_id(o: &StoreOutcome) -> String {
    match o {
        StoreOutcome::Stored { id } => id.clone(),
        StoreOutcome::Duplicate { id } => panic!("expected Stored, got Duplicate {id}"),
    }
}

/// Files in sled's `blobs` directory: values it never syncs. The spool must not create any.
pub(super) fn sled_blob_files(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("blobs")).map(|d| d.count()).unwrap_or(0)
}

fn message(len: usize) -> Vec<u8> {
    (0..len).map(|i| b"abcdefghijklmnopqrstuvwxyz\r\n"[i % 28]).collect()
}

#[test]
fn raw_blobs_round_trip_all_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let db = sled::Config::new().path(dir.path()).flush_every_ms(None).open().unwrap();
    let t = db.open_tree("raw").unwrap();
    for (id, len) in [(1u64, 0usize), (2, 1), (3, keys::CHUNK), (4, keys::CHUNK + 1), (5, 10 * keys::CHUNK + 17)] {
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        raw::write(&t, id, &data).unwrap();
        assert_eq!(raw::read(&t, id).unwrap(), Some(data), "len {len}");
    }
    assert_eq!(raw::read(&t, 99).unwrap(), None);
    raw::remove(&t, 4).unwrap();
    assert_eq!(raw::read(&t, 4).unwrap(), None);
    assert_eq!(raw::read(&t, 5).unwrap().map(|d| d.len()), Some(10 * keys::CHUNK + 17));
    // A missing chunk in the middle is corruption, not a short message.
    t.remove(keys::chunk_key(5, 3)).unwrap();
    assert!(matches!(raw::read(&t, 5), Err(SpoolError::Corrupt(_))));
}

#[tokio::test]
async fn store_get_raw_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), options()).unwrap();
    for len in [0usize, 5, keys::CHUNK, 1 << 20] {
        let raw = message(len);
        let out = spool.store(&raw, vec![new_job("incoming", "k1", vec![])]).await.unwrap();
        let id = stored_id(&out[0]);
        let got = spool.get(&id).unwrap().unwrap();
        assert_eq!(got.id, id);
        assert_eq!(got.state, JobState::Ready);
        assert_eq!(got.key, "k1");
        assert_eq!(got.reply_text.as_deref(), Some("the reply"));
        assert!(got.updated_at.is_some());
        assert_eq!(spool.raw(&id).unwrap().unwrap(), raw, "len {len}");
    }
    assert_eq!(spool.get("0000000000ffffff").unwrap(), None);
    assert_eq!(spool.get("not-an-id").unwrap(), None);
    assert_eq!(spool.raw("0000000000ffffff").unwrap(), None);
    // The public JSON is the Job's: no internal fields leak.
    let first = &spool.list(None, 1).unwrap()[0];
    let json = serde_json::to_value(first).unwrap();
    assert!(json.get("raw_id").is_none() && json.get("job").is_none());
    assert_eq!(sled_blob_files(dir.path()), 0);
}

#[tokio::test]
async fn several_jobs_share_one_raw() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), options()).unwrap();
    let raw = message(10_000);
    let out = spool
        .store(
            &raw,
            vec![new_job("incoming", "a", vec![]), new_job("incoming", "b", vec![]), new_job("sd", "c", vec![])],
        )
        .await
        .unwrap();
    assert_eq!(out.len(), 3);
    let ids: Vec<String> = out.iter().map(stored_id).collect();
    assert!(ids[0] < ids[1] && ids[1] < ids[2], "ids in order: {ids:?}");
    let raw_ids: Vec<u64> = ids.iter().map(|id| spool.record(parse_id(id).unwrap()).unwrap().unwrap().raw_id).collect();
    assert!(raw_ids.iter().all(|r| *r == raw_ids[0]));
    for id in &ids {
        assert_eq!(spool.raw(id).unwrap().unwrap(), raw);
    }
    assert_eq!(spool.0.rawloc.len(), 1, "one raw message, in a segment");
    assert_eq!(spool.0.raw.len(), 0, "no raw chunk in sled");
    assert_eq!(spool.store(&raw, vec![]).await.unwrap(), vec![]);
}

#[tokio::test]
async fn large_job_records_keep_a_stub_and_a_blob() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), options()).unwrap();
    let mut big = new_job("incoming", "k", vec![]);
    big.job.reply_text = Some("é".repeat(100_000));
    big.job.message.subject = "s".repeat(50_000);
    let id = stored_id(&spool.store(b"x", vec![big.clone()]).await.unwrap()[0]);
    let record = spool.record(parse_id(&id).unwrap()).unwrap().unwrap();
    assert!(record.full.is_some() && record.job.reply_text.is_none());
    assert_eq!(spool.0.rawloc.len(), 2, "the raw message and the full record, both in a segment");
    assert_eq!(spool.0.raw.len(), 0);
    let got = spool.get(&id).unwrap().unwrap();
    assert_eq!(got.reply_text, big.job.reply_text);
    assert_eq!(got.message.subject, big.job.message.subject);
    // State changes keep the full job.
    let leased = spool.lease_next(None, Duration::from_secs(60)).await.unwrap().unwrap();
    assert_eq!(leased.id, id);
    assert_eq!(leased.attempts, 1);
    assert_eq!(leased.reply_text, big.job.reply_text);
    let done = spool.ack(&id).await.unwrap();
    assert_eq!(done.state, JobState::Done);
    assert_eq!(done.message.subject, big.job.message.subject);
    assert_eq!(sled_blob_files(dir.path()), 0);
}

#[tokio::test]
async fn dedup_same_key_is_a_duplicate_of_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), options()).unwrap();
    let key = dedup_key_ident("Q1", "incoming+k@x", "incoming", "k", &[1; 32]);
    let first = stored_id(&spool.store(b"m1", vec![new_job("incoming", "k", vec![key.clone()])]).await.unwrap()[0]);
    let again_key = dedup_key_ident("Q1", "incoming+k@X", "incoming", "k", &[1; 32]);
    let out = spool.store(b"m1", vec![new_job("incoming", "k", vec![b"other".to_vec(), again_key])]).await.unwrap();
    assert_eq!(out, vec![StoreOutcome::Duplicate { id: first.clone() }]);
    // Two jobs of one store with the same key: the second is a duplicate of the first.
    let k2 = dedup_key_ident("Q2", "a@x", "incoming", "k", &[1; 32]);
    let out = spool.store(b"m2", vec![new_job("a", "1", vec![k2.clone()]), new_job("a", "2", vec![k2])]).await.unwrap();
    assert_eq!(out[1], StoreOutcome::Duplicate { id: stored_id(&out[0]) });
    // Empty keys never match.
    let a = spool.store(b"m3", vec![new_job("a", "3", vec![Vec::new()])]).await.unwrap();
    let b = spool.store(b"m3", vec![new_job("a", "3", vec![Vec::new()])]).await.unwrap();
    assert_ne!(stored_id(&a[0]), stored_id(&b[0]));
    assert_eq!(spool.stats().unwrap().ready, 4);
}

#[tokio::test]
async fn dedup_expires_after_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let opts = SpoolOptions { dedup_window: Duration::from_millis(300), ..options() };
    let spool = Spool::open(dir.path(), opts).unwrap();
    let key = dedup_key_content("<m@x>", "incoming", "k", &[7; 32]);
    let first = stored_id(&spool.store(b"m", vec![new_job("incoming", "k", vec![key.clone()])]).await.unwrap()[0]);
    let dup = spool.store(b"m", vec![new_job("incoming", "k", vec![key.clone()])]).await.unwrap();
    assert_eq!(dup, vec![StoreOutcome::Duplicate { id: first.clone() }]);
    // The duplicate's raw message was not kept.
    assert_eq!(spool.0.rawloc.len(), 1);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let second = stored_id(&spool.store(b"m", vec![new_job("incoming", "k", vec![key.clone()])]).await.unwrap()[0]);
    assert_ne!(first, second);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(spool.prune().await.unwrap(), 1);
    assert_eq!(spool.0.dedup.len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_stores_of_one_key_create_one_job() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), options()).unwrap();
    let key = dedup_key_ident("QX", "incoming+k@x", "incoming", "k", &[1; 32]);
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let (spool, key) = (spool.clone(), key.clone());
            tokio::spawn(async move { spool.store(b"same", vec![new_job("incoming", "k", vec![key])]).await })
        })
        .collect();
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.extend(t.await.unwrap().unwrap());
    }
    let stored: Vec<&StoreOutcome> = outcomes.iter().filter(|o| matches!(o, StoreOutcome::Stored { .. })).collect();
    assert_eq!(stored.len(), 1, "{outcomes:?}");
    let id = stored_id(stored[0]);
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, StoreOutcome::Stored { id: i } | StoreOutcome::Duplicate { id: i } if *i == id))
    );
    assert_eq!(spool.list(Some(JobState::Ready), 0).unwrap().len(), 1);
    assert_eq!(spool.stats().unwrap().ready, 1);
    assert_eq!(spool.0.rawloc.len(), 1, "duplicates' raw messages are removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn group_commit_batches_concurrent_stores() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), options()).unwrap();
    let before = spool.flush_count();
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let spool = spool.clone();
            tokio::spawn(async move {
                spool.store(&message(4096), vec![new_job("incoming", &format!("k{i}"), vec![])]).await
            })
        })
        .collect();
    for t in tasks {
        assert!(matches!(t.await.unwrap().unwrap()[0], StoreOutcome::Stored { .. }));
    }
    let flushes = spool.flush_count() - before;
    eprintln!("group commit: {flushes} flushes for 64 stores");
    // Stores write their segment on their own worker first, so how many meet in one flush depends on the
    // scheduler (debug builds are slow): any sharing at all shows the group commit works.
    assert!((1..64).contains(&flushes), "{flushes} flushes for 64 stores");
    assert_eq!(spool.stats().unwrap().ready, 64);
    // Waiters that arrive together share a flush: 64 concurrent commits, a handful of flushes.
    let before = spool.flush_count();
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(64));
    let commits: Vec<_> = (0..64)
        .map(|_| {
            let (spool, barrier) = (spool.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                spool.commit().await
            })
        })
        .collect();
    for c in commits {
        c.await.unwrap().unwrap();
    }
    let flushes = spool.flush_count() - before;
    // How many share one flush depends on the scheduler (2 cores, a busy test run): any
    // sharing shows that waiters queued during a flush ride on the next one.
    assert!((1..64).contains(&flushes), "{flushes} flushes for 64 concurrent commits");
    // A commit with nothing new still answers.
    spool.commit().await.unwrap();
    spool.commit_soon();
}

#[tokio::test]
async fn reopen_keeps_everything_and_the_lock_is_exclusive() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, raw);
    {
        let spool = Spool::open(dir.path(), options()).unwrap();
        assert!(matches!(Spool::open(dir.path(), options()), Err(SpoolError::Locked(_))));
        raw = message(100_000);
        a = stored_id(&spool.store(&raw, vec![new_job("incoming", "a", vec![b"k".to_vec()])]).await.unwrap()[0]);
        b = stored_id(&spool.store(b"two", vec![new_job("incoming", "b", vec![])]).await.unwrap()[0]);
        spool.lease_next(None, Duration::from_secs(600)).await.unwrap().unwrap();
        spool.log_reject(&super::tests_queue::reject_entry(crate::gate::verdict::Reason::UnknownKey)).unwrap();
        spool.close().await.unwrap();
        assert!(matches!(spool.store(b"x", vec![new_job("a", "b", vec![])]).await, Err(SpoolError::Closed)));
        assert!(matches!(spool.commit().await, Err(SpoolError::Closed)));
    }
    let spool = reopen(dir.path());
    let ja = spool.get(&a).unwrap().unwrap();
    assert_eq!((ja.state, ja.attempts), (JobState::Leased, 1));
    assert_eq!(spool.raw(&a).unwrap().unwrap(), raw);
    assert_eq!(spool.get(&b).unwrap().unwrap().state, JobState::Ready);
    let stats = spool.stats().unwrap();
    assert_eq!((stats.ready, stats.leased, stats.rejects), (1, 1, 1));
    assert_eq!(spool.rejects(&RejectQuery::default()).unwrap().len(), 1);
    // The dedup index survived, and new ids keep growing.
    let dup = spool.store(b"x", vec![new_job("incoming", "a", vec![b"k".to_vec()])]).await.unwrap();
    assert_eq!(dup, vec![StoreOutcome::Duplicate { id: a.clone() }]);
    let c = stored_id(&spool.store(b"three", vec![new_job("incoming", "c", vec![])]).await.unwrap()[0]);
    assert!(c > b);
    // Reject keys keep growing across a restart too.
    spool.log_reject(&super::tests_queue::reject_entry(crate::gate::verdict::Reason::Loop)).unwrap();
    let all = spool.rejects(&RejectQuery::default()).unwrap();
    assert!(all[0].cursor < all[1].cursor);
    spool.close().await.unwrap();
}

#[tokio::test]
async fn one_batch_applies_several_messages_and_dedups_across_them() {
    // What the committer does with the stores that meet in one batch: applied in order, so
    // the second message with the first's dedup key is its duplicate.
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), options()).unwrap();
    let key = dedup_key_ident("QX", "incoming+k@x", "incoming", "k", &[1; 32]);
    let mut pending = super::jobs::Pending::for_test(&spool);
    let mut stage = |raw: &[u8], job: NewJob| spool.stage(raw, vec![job], &mut Vec::new(), &mut pending).unwrap().0;
    let a = stage(b"first", new_job("incoming", "k", vec![key.clone()]));
    let b = stage(b"again", new_job("incoming", "k", vec![key]));
    let c = stage(b"other", new_job("incoming", "k2", vec![]));
    let i = &spool.0;
    let mut frame = super::journal::Frame::new(1);
    let out = super::jobs::plan(&spool.store_trees(), &[&a, &b, &c], &mut frame).unwrap();
    assert_eq!(i.jobs.len(), 0, "planning writes nothing to sled");
    super::journal::apply(&spool.journal_trees(), &frame.finish()).unwrap();
    let first = stored_id(&out[0][0]);
    assert_eq!(out[1], vec![StoreOutcome::Duplicate { id: first.clone() }]);
    assert!(matches!(&out[2][0], StoreOutcome::Stored { id } if *id != first), "{out:?}");
    assert_eq!((i.jobs.len(), i.state.len(), i.refs.len(), i.dedup.len()), (2, 2, 2, 1));
}

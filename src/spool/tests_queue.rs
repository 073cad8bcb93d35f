//! Spool tests: leases and state changes, the reaper, stats, the reject log, maintenance.

use std::time::Duration;

use time::OffsetDateTime;

use super::tests::{new_job, options, sled_blob_files, stored_id};
use super::*;
use crate::reject::{Action, Stage};

pub(super) fn reject_entry(reason: Reason) -> RejectEntry {
    RejectEntry {
        at: OffsetDateTime::now_utc(),
        stage: Stage::Rcpt,
        action: Action::Reject,
        code: 550,
        enhanced: "5.1.1".into(),
        reason,
        text: "no".into(),
        client_ip: "192.0.2.1".into(),
        helo: "h".into(),
        mail_from: "a@b".into(),
        rcpt_to: vec!["x@y".into()],
        message_id: String::new(),
        subject: String::new(),
        listener: "smtp".into(),
        suppressed: 0,
    }
}

async fn store_one(spool: &Spool, mailbox: &str, key: &str) -> String {
    stored_id(&spool.store(key.as_bytes(), vec![new_job(mailbox, key, vec![])]).await.unwrap()[0])
}

#[tokio::test]
async fn lease_next_is_fifo_and_filters_by_mailbox() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), options()).unwrap();
    let a = store_one(&spool, "incoming", "a").await;
    let b = store_one(&spool, "service_desk", "b").await;
    let c = store_one(&spool, "incoming", "c").await;
    let lease = Duration::from_secs(60);
    let j = spool.lease_next(Some("service_desk"), lease).await.unwrap().unwrap();
    assert_eq!(j.id, b);
    assert_eq!(spool.lease_next(Some("service_desk"), lease).await.unwrap(), None);
    let j = spool.lease_next(None, lease).await.unwrap().unwrap();
    assert_eq!((j.id.as_str(), j.state, j.attempts), (a.as_str(), JobState::Leased, 1));
    let until = j.lease_until.unwrap();
    assert!(until > OffsetDateTime::now_utc() + Duration::from_secs(50));
    assert_eq!(spool.lease_next(Some("incoming"), lease).await.unwrap().unwrap().id, c);
    assert_eq!(spool.lease_next(None, lease).await.unwrap(), None);
    assert_eq!(spool.list(Some(JobState::Leased), 0).unwrap().len(), 3);
    assert_eq!(spool.list(None, 2).unwrap().iter().map(|j| j.id.clone()).collect::<Vec<_>>(), vec![a, b]);
}

#[tokio::test]
async fn ack_nack_retry_and_wrong_states() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), options()).unwrap();
    let a = store_one(&spool, "incoming", "a").await;
    let b = store_one(&spool, "incoming", "b").await;
    let lease = Duration::from_secs(60);

    // nack needs a lease; retry needs a dead job.
    assert!(matches!(
        spool.nack(&a).await,
        Err(SpoolError::WrongState { state: JobState::Ready, wanted: "leased", .. })
    ));
    assert!(matches!(spool.retry(&a).await, Err(SpoolError::WrongState { wanted: "dead", .. })));
    assert!(matches!(spool.ack("00000000000000ff").await, Err(SpoolError::NotFound(_))));
    assert!(matches!(spool.ack("bogus").await, Err(SpoolError::NotFound(_))));

    let j = spool.lease_next(None, lease).await.unwrap().unwrap();
    assert_eq!(j.id, a);
    let j = spool.nack(&a).await.unwrap();
    assert_eq!((j.state, j.lease_until), (JobState::Ready, None));
    assert_eq!(spool.0.leases.len(), 0);
    // Back at the head of the queue; attempts count leases.
    let j = spool.lease_next(None, lease).await.unwrap().unwrap();
    assert_eq!((j.id.as_str(), j.attempts), (a.as_str(), 2));
    let j = spool.ack(&a).await.unwrap();
    assert_eq!((j.state, j.lease_until), (JobState::Done, None));
    assert!(matches!(spool.ack(&a).await, Err(SpoolError::WrongState { state: JobState::Done, .. })));
    // ack straight from ready is allowed.
    let c = store_one(&spool, "incoming", "c").await;
    assert_eq!(spool.ack(&c).await.unwrap().state, JobState::Done);

    // fail: leased -> dead with the error; retry: dead -> ready.
    spool.lease_next(None, lease).await.unwrap().unwrap();
    let j = spool.fail(&b, &"x".repeat(5000), true).await.unwrap();
    assert_eq!(j.state, JobState::Dead);
    assert_eq!(j.last_error.as_deref().map(str::len), Some(1000));
    let j = spool.retry(&b).await.unwrap();
    assert_eq!(j.state, JobState::Ready);
    spool.lease_next(None, lease).await.unwrap().unwrap();
    assert_eq!(spool.fail(&b, "timeout", false).await.unwrap().state, JobState::Ready);

    let s = spool.stats().unwrap();
    assert_eq!((s.ready, s.leased, s.done, s.dead), (1, 0, 2, 0));
    assert_eq!(spool.list(Some(JobState::Done), 0).unwrap().len(), 2);
    assert_eq!(spool.0.state.len(), 3, "one index entry per job");
}

#[tokio::test]
async fn reaper_returns_expired_leases() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), options()).unwrap();
    let a = store_one(&spool, "incoming", "a").await;
    let b = store_one(&spool, "incoming", "b").await;
    spool.lease_next(None, Duration::from_millis(50)).await.unwrap().unwrap();
    spool.lease_next(None, Duration::from_secs(600)).await.unwrap().unwrap();
    assert_eq!(spool.reap_leases().await.unwrap(), 0);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(spool.reap_leases().await.unwrap(), 1);
    let ja = spool.get(&a).unwrap().unwrap();
    assert_eq!((ja.state, ja.lease_until, ja.attempts), (JobState::Ready, None, 1));
    assert_eq!(spool.get(&b).unwrap().unwrap().state, JobState::Leased);
    assert_eq!(spool.reap_leases().await.unwrap(), 0);
    // Acking a reaped job's stale holder fails; the job can be leased again.
    assert!(matches!(spool.nack(&a).await, Err(SpoolError::WrongState { .. })));
    assert_eq!(spool.lease_next(None, Duration::from_secs(1)).await.unwrap().unwrap().attempts, 2);
    let s = spool.stats().unwrap();
    assert_eq!((s.ready, s.leased), (0, 2));
}

#[tokio::test]
async fn maintenance_reaps_and_stops_on_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), options()).unwrap();
    let a = store_one(&spool, "incoming", "a").await;
    spool.lease_next(None, Duration::from_millis(10)).await.unwrap().unwrap();
    let (tx, rx) = tokio::sync::watch::channel(false);
    let task = spool.spawn_maintenance(rx);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(spool.get(&a).unwrap().unwrap().state, JobState::Ready);
    tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task).await.unwrap().unwrap();
}

#[tokio::test]
async fn stats_count_states_and_oldest_ready() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), options()).unwrap();
    let s = spool.stats().unwrap();
    assert_eq!((s.ready, s.leased, s.done, s.dead, s.rejects, s.oldest_ready), (0, 0, 0, 0, 0, None));
    let mut first = new_job("incoming", "a", vec![]);
    first.job.received_at = time::macros::datetime!(2024-01-02 03:04:05 UTC);
    spool.store(b"1", vec![first]).await.unwrap();
    store_one(&spool, "incoming", "b").await;
    spool.log_reject(&reject_entry(Reason::SpfFail)).unwrap();
    let s = spool.stats().unwrap();
    assert_eq!((s.ready, s.rejects), (2, 1));
    assert_eq!(s.oldest_ready, Some(time::macros::datetime!(2024-01-02 03:04:05 UTC)));
    let json = serde_json::to_value(&s).unwrap();
    assert_eq!(json["oldest_ready"], "2024-01-02T03:04:05Z");
    assert_eq!(json["ready"], 2);
}

#[tokio::test]
async fn reject_log_query_and_cursor() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), options()).unwrap();
    let mut old = reject_entry(Reason::UnknownKey);
    old.at = OffsetDateTime::now_utc() - Duration::from_secs(7200);
    spool.log_reject(&old).unwrap();
    for reason in [Reason::SpfFail, Reason::UnknownKey, Reason::SpfFail, Reason::Loop] {
        spool.log_reject(&reject_entry(reason)).unwrap();
    }
    let all = spool.rejects(&RejectQuery::default()).unwrap();
    assert_eq!(all.len(), 5);
    assert!(all.windows(2).all(|w| w[0].cursor < w[1].cursor), "oldest first");
    assert_eq!(all[0].entry, old);

    let since = OffsetDateTime::now_utc() - Duration::from_secs(3600);
    let recent = spool.rejects(&RejectQuery { since: Some(since), ..Default::default() }).unwrap();
    assert_eq!(recent.len(), 4);
    let spf = spool.rejects(&RejectQuery { reason: Some(Reason::SpfFail), ..Default::default() }).unwrap();
    assert_eq!(spf.len(), 2);
    assert!(spf.iter().all(|r| r.entry.reason == Reason::SpfFail));

    // Following: after the last cursor seen, only newer entries come back.
    let page = spool.rejects(&RejectQuery { limit: 2, ..Default::default() }).unwrap();
    assert_eq!(page.len(), 2);
    let rest = spool.rejects(&RejectQuery { after: Some(page[1].cursor.clone()), ..Default::default() }).unwrap();
    assert_eq!(
        rest.iter().map(|r| &r.cursor).collect::<Vec<_>>(),
        all[2..].iter().map(|r| &r.cursor).collect::<Vec<_>>()
    );
    let last = all[4].cursor.clone();
    assert!(spool.rejects(&RejectQuery { after: Some(last.clone()), ..Default::default() }).unwrap().is_empty());
    spool.log_reject(&reject_entry(Reason::Timeout)).unwrap();
    let new = spool.rejects(&RejectQuery { after: Some(last), ..Default::default() }).unwrap();
    assert_eq!(new.len(), 1);
    assert_eq!(new[0].entry.reason, Reason::Timeout);
    assert!(matches!(
        spool.rejects(&RejectQuery { after: Some("zz".into()), ..Default::default() }),
        Err(SpoolError::NotFound(_))
    ));
    // The record's JSON is the entry's plus the cursor.
    let json = serde_json::to_value(&new[0]).unwrap();
    assert_eq!(json["reason"], "timeout");
    assert!(json["cursor"].is_string());
}

#[tokio::test]
async fn reject_log_pruning() {
    let dir = tempfile::tempdir().unwrap();
    let opts = SpoolOptions { reject_max_entries: 3, reject_retention: Duration::from_millis(300), ..options() };
    let spool = Spool::open(dir.path(), opts).unwrap();
    for _ in 0..5 {
        spool.log_reject(&reject_entry(Reason::UnknownKey)).unwrap();
    }
    let before = spool.rejects(&RejectQuery::default()).unwrap();
    assert_eq!(spool.prune().await.unwrap(), 2);
    let after = spool.rejects(&RejectQuery::default()).unwrap();
    assert_eq!(
        after.iter().map(|r| &r.cursor).collect::<Vec<_>>(),
        before[2..].iter().map(|r| &r.cursor).collect::<Vec<_>>()
    );
    assert_eq!(spool.stats().unwrap().rejects, 3);
    tokio::time::sleep(Duration::from_millis(400)).await;
    spool.log_reject(&reject_entry(Reason::Loop)).unwrap();
    assert_eq!(spool.prune().await.unwrap(), 3, "past retention");
    let left = spool.rejects(&RejectQuery::default()).unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].entry.reason, Reason::Loop);
    assert_eq!(spool.stats().unwrap().rejects, 1);
}

#[tokio::test]
async fn huge_reject_entries_are_stored_shortened() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), options()).unwrap();
    let mut e = reject_entry(Reason::TooManyRecipients);
    e.subject = "ü".repeat(100_000);
    e.rcpt_to = (0..500).map(|i| format!("user{i}@example.com")).collect();
    for _ in 0..40 {
        spool.log_reject(&e).unwrap();
    }
    spool.commit().await.unwrap();
    let got = spool.rejects(&RejectQuery { limit: 1, ..Default::default() }).unwrap();
    assert_eq!(got[0].entry.reason, Reason::TooManyRecipients);
    assert!(got[0].entry.subject.len() < 1000 && got[0].entry.subject.starts_with('ü'));
    assert_eq!(got[0].entry.rcpt_to.len(), 9);
    assert_eq!(sled_blob_files(dir.path()), 0);
}

//! The backend against a running HTTP API and against the spool itself: same answers.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use mailgate::config::Config;
use mailgate::gate::verdict::Reason;
use mailgate::http::{HttpState, serve};
use mailgate::job::{AuthResults, Envelope, Job, JobState, KeySource, MessageInfo, Route};
use mailgate::reject::{Action, RejectEntry, Stage};
use mailgate::spool::{NewJob, RejectQuery, Spool, SpoolOptions, StoreOutcome};
use time::OffsetDateTime;

use super::backend::Backend;

fn config(dir: &Path, http: &str) -> Config {
    let mut c = Config::default();
    c.spool.dir = dir.join("spool");
    c.http.listen = http.to_string();
    c
}

fn job() -> Job {
    Job {
        id: String::new(),
        state: JobState::Ready,
        received_at: OffsetDateTime::now_utc(),
        attempts: 0,
        mailbox: "incoming".into(),
        key: "0123456789abcdef0123456789abcdef".into(),
        key_source: KeySource::Rcpt,
        route: Route::Reply,
        envelope: Envelope::default(),
        message: MessageInfo { subject: "hello".into(), ..Default::default() },
        auth: AuthResults::not_checked("mx.example.com"),
        reply_text: None,
        lease_until: None,
        updated_at: None,
        last_error: None,
        next_attempt_at: None,
    }
}

fn reject() -> RejectEntry {
    RejectEntry {
        at: OffsetDateTime::now_utc(),
        stage: Stage::Rcpt,
        action: Action::Reject,
        code: 550,
        enhanced: "5.1.1".into(),
        reason: Reason::UnknownKey,
        text: "unknown key".into(),
        client_ip: "192.0.2.1".into(),
        helo: "h".into(),
        mail_from: "a@example.org".into(),
        rcpt_to: vec!["incoming+x@localhost".into()],
        message_id: String::new(),
        subject: String::new(),
        listener: "smtp".into(),
        suppressed: 0,
    }
}

/// Stores two jobs and three rejects; returns the job ids.
async fn fill(spool: &Spool) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..2 {
        let outcome = spool.store(b"Subject: hello\r\n\r\nhi\r\n", vec![NewJob { job: job(), dedup_keys: Vec::new() }]);
        match outcome.await.unwrap().pop() {
            Some(StoreOutcome::Stored { id }) => ids.push(id),
            other => panic!("not stored: {other:?}"),
        }
    }
    for _ in 0..3 {
        spool.log_reject(&reject()).unwrap();
    }
    ids
}

/// The same script through either backend.
async fn exercise(backend: &Backend, ids: &[String]) {
    let all = backend.list(None, 100).await.unwrap();
    assert_eq!(all.iter().map(|j| j.id.clone()).collect::<Vec<_>>(), ids);
    assert_eq!(backend.get(&ids[0]).await.unwrap().map(|j| j.state), Some(JobState::Ready));
    assert!(backend.get("ffffffffffffffff").await.unwrap().is_none());
    assert_eq!(backend.raw(&ids[0]).await.unwrap().as_deref(), Some(&b"Subject: hello\r\n\r\nhi\r\n"[..]));
    let leased = backend.pop(Some("incoming"), Duration::from_secs(60)).await.unwrap();
    assert_eq!(leased.map(|j| (j.id, j.state)), Some((ids[0].clone(), JobState::Leased)));
    assert!(backend.pop(Some("service_desk"), Duration::from_secs(60)).await.unwrap().is_none());
    assert_eq!(backend.transition(&ids[0], "ack").await.unwrap().state, JobState::Done);
    let e = backend.transition(&ids[0], "retry").await.unwrap_err();
    assert!(e.to_string().contains(&ids[0]), "{e}");
    assert!(backend.transition("ffffffffffffffff", "ack").await.is_err());
    let stats = backend.stats().await.unwrap();
    assert_eq!((stats["done"].as_u64(), stats["ready"].as_u64()), (Some(1), Some(1)));
    let first = backend.rejects(&RejectQuery { limit: 2, ..Default::default() }).await.unwrap();
    assert_eq!(first.len(), 2);
    let rest = RejectQuery { limit: 2, after: Some(first[1].cursor.clone()), ..Default::default() };
    assert_eq!(backend.rejects(&rest).await.unwrap().len(), 1);
    let since = RejectQuery {
        since: Some(OffsetDateTime::now_utc() + time::Duration::hours(1)),
        limit: 10,
        ..Default::default()
    };
    assert!(backend.rejects(&since).await.unwrap().is_empty());
}

#[tokio::test]
async fn http_and_local_backends_agree() {
    let dir = tempfile::tempdir().unwrap();
    let spool_config = config(dir.path(), "").spool;
    let spool = Spool::open(&spool_config.dir, SpoolOptions::from(&spool_config)).unwrap();
    let ids = fill(&spool).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let state = HttpState { spool: spool.clone(), token: None };
    let server = tokio::spawn(serve(listener, state, async move {
        let _ = stopped.await;
    }));

    let c = config(dir.path(), &addr.to_string());
    let backend = Backend::connect(&c).await.unwrap();
    assert!(matches!(backend, Backend::Http(_)));
    exercise(&backend, &ids).await;
    backend.close().await.unwrap();

    let _ = stop.send(());
    server.await.unwrap().unwrap();
    spool.close().await.unwrap();
    drop(spool);

    // Fresh data in a second spool, now used directly (nothing answers at `addr`).
    let dir2 = tempfile::tempdir().unwrap();
    let c2 = config(dir2.path(), &addr.to_string());
    let spool = Spool::open(&c2.spool.dir, SpoolOptions::from(&c2.spool)).unwrap();
    let ids = fill(&spool).await;
    spool.close().await.unwrap();
    drop(spool);
    let backend = Backend::connect(&c2).await.unwrap();
    assert!(matches!(backend, Backend::Local(_)));
    exercise(&backend, &ids).await;
    backend.close().await.unwrap();
}

#[tokio::test]
async fn missing_spool_and_silent_api_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let c = config(dir.path(), &format!("0.0.0.0:{port}"));
    let e = Backend::connect(&c).await.err().unwrap().to_string();
    assert!(e.contains(&format!("http://127.0.0.1:{port}")) && e.contains("does not exist"), "{e}");
    assert!(!c.spool.dir.exists(), "a failed lookup creates no spool");
}

#[tokio::test]
async fn a_locked_spool_names_the_silent_api() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let c = config(dir.path(), &format!("127.0.0.1:{port}"));
    let held = Spool::open(&c.spool.dir, SpoolOptions::from(&c.spool)).unwrap();
    let e = Backend::connect(&c).await.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("holds the spool") && e.contains(&format!("http://127.0.0.1:{port}")), "{e}");
    held.close().await.unwrap();
}

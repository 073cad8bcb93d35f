//! The API over a real socket, with a spool on a temporary directory.

use std::net::SocketAddr;

use reqwest::StatusCode;
use serde_json::Value;
use time::OffsetDateTime;

use super::*;
use crate::config::SpoolConfig;
use crate::spool::SpoolOptions;

struct TestServer {
    base: String,
    spool: Spool,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    _dir: tempfile::TempDir,
}

impl TestServer {
    async fn start(token: Option<&str>) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let config = SpoolConfig { dir: dir.path().join("spool"), ..SpoolConfig::default() };
        let spool = Spool::open(&config.dir, SpoolOptions::from(&config)).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let state = HttpState { spool: spool.clone(), token: token.map(str::to_string) };
        let task = tokio::spawn(serve(listener, state, async move {
            let _ = stopped.await;
        }));
        TestServer { base: format!("http://{addr}"), spool, stop: Some(stop), task, _dir: dir }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        let r = reqwest::get(self.url(path)).await.unwrap();
        let status = r.status();
        let text = r.text().await.unwrap();
        (status, if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap() })
    }

    async fn post(&self, path: &str) -> (StatusCode, Value) {
        let r = reqwest::Client::new().post(self.url(path)).send().await.unwrap();
        let status = r.status();
        let text = r.text().await.unwrap();
        (status, if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap() })
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.await.unwrap().unwrap();
        self.spool.close().await.unwrap();
    }
}

fn error_text(v: &Value) -> &str {
    v["error"].as_str().unwrap_or_else(|| panic!("no error field in {v}"))
}

#[tokio::test]
async fn health_and_empty_spool() {
    let s = TestServer::start(None).await;
    assert_eq!(s.get("/healthz").await, (StatusCode::OK, serde_json::json!({"status": "ok"})));
    let (status, stats) = s.get("/v1/stats").await;
    assert_eq!(status, StatusCode::OK);
    for key in ["ready", "leased", "done", "dead"] {
        assert_eq!(stats[key], 0, "{key} in {stats}");
    }
    assert_eq!(s.get("/v1/jobs").await, (StatusCode::OK, serde_json::json!([])));
    assert_eq!(s.get("/v1/jobs?state=dead&limit=5").await, (StatusCode::OK, serde_json::json!([])));
    assert_eq!(s.get("/v1/rejects?since=1h&reason=unknown_key").await, (StatusCode::OK, serde_json::json!([])));
    let (status, body) = s.get("/v1/jobs/next").await;
    assert_eq!((status, body), (StatusCode::NO_CONTENT, Value::Null));
    let (status, _) = s.post("/v1/jobs/next?lease=60&mailbox=incoming").await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    s.stop().await;
}

#[tokio::test]
async fn unknown_jobs_are_404_as_json() {
    let s = TestServer::start(None).await;
    for path in ["/v1/jobs/0000000000000001", "/v1/jobs/0000000000000001/raw", "/v1/nowhere"] {
        let (status, body) = s.get(path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        assert!(!error_text(&body).is_empty());
    }
    for verb in ["ack", "nack", "retry"] {
        let (status, body) = s.post(&format!("/v1/jobs/0000000000000001/{verb}")).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{verb}: {body}");
        assert!(!error_text(&body).is_empty());
    }
    let (status, body) = s.post("/v1/stats").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(!error_text(&body).is_empty());
    s.stop().await;
}

#[tokio::test]
async fn bad_parameters_are_400_as_json() {
    let s = TestServer::start(None).await;
    for path in [
        "/v1/jobs?state=lost",
        "/v1/jobs?limit=many",
        "/v1/jobs/next?lease=-1",
        "/v1/jobs/next?lease=0",
        "/v1/rejects?since=yesterday",
        "/v1/rejects?reason=no_such_reason",
        "/v1/rejects?limit=100000000",
    ] {
        let (status, body) = s.get(path).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
        assert!(!error_text(&body).is_empty(), "{path}");
    }
    s.stop().await;
}

#[tokio::test]
async fn token_does_not_lock_out_loopback() {
    let s = TestServer::start(Some("secret")).await;
    let (status, _) = s.get("/v1/stats").await;
    assert_eq!(status, StatusCode::OK);
    s.stop().await;
}

#[tokio::test]
async fn a_router_without_peer_info_counts_every_client_as_remote() {
    let dir = tempfile::tempdir().unwrap();
    let config = SpoolConfig { dir: dir.path().join("spool"), ..SpoolConfig::default() };
    let spool = Spool::open(&config.dir, SpoolOptions::from(&config)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = router(HttpState { spool: spool.clone(), token: Some("secret".into()) });
    let task = tokio::spawn(async move { axum::serve(listener, app).await });
    let client = reqwest::Client::new();
    let r = client.get(format!("http://{addr}/v1/stats")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(r.headers().get("www-authenticate").map(|v| v.as_bytes()), Some(&b"Bearer"[..]));
    let body: Value = r.json().await.unwrap();
    assert!(!error_text(&body).is_empty());
    let r = client.get(format!("http://{addr}/v1/stats")).bearer_auth("wrong").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = client.get(format!("http://{addr}/v1/stats")).bearer_auth("secret").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // The health check is open to everyone: it reveals nothing.
    let r = client.get(format!("http://{addr}/healthz")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    task.abort();
    spool.close().await.unwrap();
}

#[test]
fn since_accepts_durations_and_rfc3339() {
    let now = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
    assert_eq!(parse_since("1h", now).unwrap(), now - time::Duration::hours(1));
    assert_eq!(parse_since("30m", now).unwrap(), now - time::Duration::minutes(30));
    assert_eq!(parse_since("2d", now).unwrap(), now - time::Duration::days(2));
    let t = parse_since("2024-05-01T10:00:00Z", now).unwrap();
    assert_eq!(t.unix_timestamp(), 1_714_557_600);
    assert!(parse_since("yesterday", now).is_err());
    assert!(parse_since("", now).is_err());
}

fn sample_job(mailbox: &str, key: &str) -> crate::job::Job {
    use crate::job::{AuthResults, Envelope, Job, KeySource, MessageInfo, Route};
    Job {
        id: String::new(),
        state: JobState::Ready,
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
        message: MessageInfo { subject: "hello".into(), size: 5, ..Default::default() },
        auth: AuthResults::not_checked("mx.example.com"),
        reply_text: None,
        lease_until: None,
        updated_at: None,
        last_error: None,
        next_attempt_at: None,
    }
}

fn sample_reject(reason: Reason) -> crate::reject::RejectEntry {
    use crate::reject::{Action, RejectEntry, Stage};
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
        mail_from: "a@example.org".into(),
        rcpt_to: vec!["x@y".into()],
        message_id: String::new(),
        subject: String::new(),
        listener: "smtp".into(),
        suppressed: 0,
    }
}

async fn store(spool: &Spool, mailbox: &str, raw: &[u8]) -> String {
    let new =
        crate::spool::NewJob { job: sample_job(mailbox, "0123456789abcdef0123456789abcdef"), dedup_keys: Vec::new() };
    match spool.store(raw, vec![new]).await.unwrap().pop() {
        Some(crate::spool::StoreOutcome::Stored { id }) => id,
        other => panic!("not stored: {other:?}"),
    }
}

#[tokio::test]
async fn job_lifecycle() {
    let s = TestServer::start(None).await;
    let raw = b"Subject: hello\r\n\r\nbody\r\n";
    let id = store(&s.spool, "incoming", raw).await;
    let (status, jobs) = s.get("/v1/jobs?state=ready").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(jobs.as_array().map(Vec::len), Some(1));
    assert_eq!(jobs[0]["id"], id.as_str());
    let (status, job) = s.get(&format!("/v1/jobs/{id}")).await;
    assert_eq!(
        (status, &job["state"], &job["mailbox"]),
        (StatusCode::OK, &Value::from("ready"), &Value::from("incoming"))
    );

    let r = reqwest::get(s.url(&format!("/v1/jobs/{id}/raw"))).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers().get("content-type").map(|v| v.as_bytes()), Some(&b"message/rfc822"[..]));
    assert_eq!(&r.bytes().await.unwrap()[..], raw);

    assert_eq!(s.get("/v1/jobs/next?mailbox=service_desk").await.0, StatusCode::NO_CONTENT);
    let (status, job) = s.post("/v1/jobs/next?mailbox=incoming&lease=60").await;
    assert_eq!(
        (status, &job["id"], &job["state"]),
        (StatusCode::OK, &Value::from(id.as_str()), &Value::from("leased"))
    );
    assert!(job["lease_until"].is_string());
    assert_eq!(s.get("/v1/jobs/next").await.0, StatusCode::NO_CONTENT);
    let (status, job) = s.post(&format!("/v1/jobs/{id}/nack")).await;
    assert_eq!((status, &job["state"]), (StatusCode::OK, &Value::from("ready")));
    let (status, _) = s.get("/v1/jobs/next").await;
    assert_eq!(status, StatusCode::OK);
    let (status, job) = s.post(&format!("/v1/jobs/{id}/ack")).await;
    assert_eq!((status, &job["state"]), (StatusCode::OK, &Value::from("done")));
    for verb in ["ack", "nack", "retry"] {
        let (status, body) = s.post(&format!("/v1/jobs/{id}/{verb}")).await;
        assert_eq!(status, StatusCode::CONFLICT, "{verb} on a done job: {body}");
        assert!(error_text(&body).contains(&id), "{body}");
    }
    let (_, stats) = s.get("/v1/stats").await;
    assert_eq!((stats["ready"].as_u64(), stats["done"].as_u64()), (Some(0), Some(1)));
    s.stop().await;
}

#[tokio::test]
async fn rejects_page_with_cursors_and_filter() {
    let s = TestServer::start(None).await;
    for reason in [Reason::UnknownKey, Reason::SpfFail, Reason::UnknownKey] {
        s.spool.log_reject(&sample_reject(reason)).unwrap();
    }
    let (status, page) = s.get("/v1/rejects?limit=2").await;
    assert_eq!(status, StatusCode::OK);
    let page = page.as_array().cloned().unwrap_or_default();
    assert_eq!(page.len(), 2);
    assert_eq!((&page[0]["reason"], &page[1]["reason"]), (&Value::from("unknown_key"), &Value::from("spf_fail")));
    assert_eq!(page[0]["rcpt_to"], serde_json::json!(["x@y"]));
    let cursor = page[1]["cursor"].as_str().unwrap_or_default().to_string();
    let (_, rest) = s.get(&format!("/v1/rejects?after={cursor}")).await;
    assert_eq!(rest.as_array().map(Vec::len), Some(1));
    let (_, keyed) = s.get("/v1/rejects?reason=unknown_key&since=1h").await;
    assert_eq!(keyed.as_array().map(Vec::len), Some(2));
    let (_, future) = s.get("/v1/rejects?since=2999-01-01T00:00:00Z").await;
    assert_eq!(future, serde_json::json!([]));
    let (status, body) = s.get("/v1/rejects?after=not-a-cursor").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    s.stop().await;
}

#[tokio::test]
async fn bulk_retry_and_metrics() {
    let s = TestServer::start(None).await;
    let a = store(&s.spool, "incoming", b"a").await;
    let b = store(&s.spool, "service_desk", b"b").await;
    for _ in 0..2 {
        let held = s.spool.lease_for_push(&[], Duration::from_secs(60)).unwrap().unwrap();
        s.spool.push_failed(held, "HTTP 400", crate::spool::AfterFailure::Dead, true).await.unwrap();
    }
    let (status, v) = s.post("/v1/jobs/retry?mailbox=service_desk").await;
    assert_eq!((status, v["retried"].as_u64()), (StatusCode::OK, Some(1)));
    let (_, v) = s.get(&format!("/v1/jobs/{b}")).await;
    assert_eq!((v["state"].as_str(), v["attempts"].as_u64()), (Some("ready"), Some(0)));
    let (_, v) = s.get(&format!("/v1/jobs/{a}")).await;
    assert_eq!(v["state"], "dead");
    assert_eq!(v["last_error"], "HTTP 400");
    let (status, v) = s.post("/v1/jobs/retry").await;
    assert_eq!((status, v["retried"].as_u64()), (StatusCode::OK, Some(1)));

    let r = reqwest::get(s.url("/metrics")).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers()[header::CONTENT_TYPE].to_str().unwrap().contains("openmetrics"));
    let text = r.text().await.unwrap();
    assert!(text.contains(r#"mailgate_queue_jobs{mailbox="incoming",state="ready"} 1"#), "{text}");
    assert!(text.contains(r#"mailgate_queue_jobs{mailbox="service_desk",state="ready"} 1"#), "{text}");
    assert!(text.contains(r#"mailgate_queue_jobs{mailbox="incoming",state="dead"} 0"#), "{text}");
    assert!(text.trim_end().ends_with("# EOF"));
    s.stop().await;
}

#[tokio::test]
async fn metrics_need_the_token_from_remote_clients() {
    // The same router behind the bearer middleware as every /v1 path: checked through a
    // router without peer info (every client is remote).
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
    let app = router(HttpState { spool: spool.clone(), token: Some("t0ken".into()) });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move { axum::serve(listener, app).await });
    let r = reqwest::get(format!("http://{addr}/metrics")).await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = reqwest::Client::new().get(format!("http://{addr}/metrics")).bearer_auth("t0ken").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    task.abort();
    spool.close().await.unwrap();
}

//! Push delivery end to end over HTTP: a real `mailgate serve` with `[[deliver]]` workers and an
//! in-process receiver that checks requests the way GitLab (mail_room API) or a webhook consumer
//! does. Final answers, retries, timeouts, dead letters, bulk retry and retention.

mod common;

use common::delivery::*;

#[test]
fn mailroom_posts_the_stored_message_with_a_gitlab_jwt() {
    let rx = Receiver::mailroom(&mailroom_secret());
    let url = rx.url(MAILROOM_PATH);
    let env = Env::start(|d| mailroom_toml(d, &url, "2s", r#"["1s", "1s"]"#), "");
    let id = env.send(&rcpt(), "mr1@example.org");
    let job = env.wait_state(&id, "done", Some(&rx));
    assert_eq!(job["attempts"], 1, "{job}");
    assert!(job.get("next_attempt_at").is_none_or(Value::is_null), "{job}");
    let o = env.cli(&["queue", "show", &id]);
    assert!(o.status.success(), "queue show: {}", String::from_utf8_lossy(&o.stderr));
    let shown: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!((shown["state"].as_str(), shown["attempts"].as_u64()), (Some("done"), Some(1)), "{shown}");

    let reqs = rx.requests();
    assert_eq!(reqs.len(), 1, "{}", rx.summary());
    let r = &reqs[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, MAILROOM_PATH);
    let ct = r.header("content-type").unwrap_or_default();
    assert!(ct.starts_with("text/plain"), "Content-Type {ct:?}");
    assert_eq!(r.body, env.raw(&id), "the body is the message as stored");
    match &r.verified {
        Ok(Verified::Mailroom { alg, claims }) => {
            assert_eq!(alg, "HS256");
            assert_eq!(claims["iss"], "gitlab-mailroom");
            let nonce = claims["nonce"].as_str().unwrap_or_else(|| panic!("nonce: {claims}"));
            assert_eq!(nonce.len(), 24, "{claims}");
            assert!(nonce.bytes().all(|b| b.is_ascii_hexdigit()), "{claims}");
            let iat = claims["iat"].as_i64().unwrap();
            assert!((unix_now() - iat).abs() < 60, "iat {iat}");
        }
        other => panic!("the receiver refused the request: {other:?}"),
    }
}

#[test]
fn mailroom_400_is_final_and_queue_retry_delivers_again() {
    let rx = Receiver::mailroom(&mailroom_secret());
    rx.set_mode(Mode::Status(400));
    let url = rx.url(MAILROOM_PATH);
    let env = Env::start(|d| mailroom_toml(d, &url, "2s", MANY_RETRIES), "");
    let id = env.send(&rcpt(), "mr400@example.org");
    let job = env.wait_state(&id, "dead", Some(&rx));
    assert_eq!(job["attempts"], 1, "400 is final: no second attempt: {job}");
    assert!(error_text(&job).contains("400"), "{job}");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(rx.count(), 1, "{}", rx.summary());

    rx.set_mode(Mode::Ok);
    let o = env.cli(&["queue", "retry", &id]);
    assert!(o.status.success(), "queue retry: {}", String::from_utf8_lossy(&o.stderr));
    let job = env.wait_state(&id, "done", Some(&rx));
    assert_eq!(job["attempts"], 1, "attempts start again after `queue retry`: {job}");
    assert_eq!(rx.count(), 2);
    assert!(rx.requests()[1].ok());
}

#[test]
fn mailroom_401_from_a_wrong_secret_keeps_retrying() {
    // GitLab answers 401 for a wrong secret or a disabled mailbox: a configuration error,
    // retried (and alerted on), never a dead letter after one attempt
    let rx = Receiver::mailroom(&[0x55; 32]);
    let url = rx.url(MAILROOM_PATH);
    let env = Env::start(|d| mailroom_toml(d, &url, "2s", MANY_RETRIES), "");
    let id = env.send(&rcpt(), "mr401@example.org");
    let job = env.wait_job(&id, "attempted twice", Some(&rx), |j| j["attempts"].as_u64() >= Some(2));
    assert_ne!(job["state"], "dead", "{job}");
    assert!(error_text(&job).contains("401"), "{job}");
    assert!(rx.requests().iter().all(|r| r.status == 401));
}

// ---------------------------------------------------------------------------------------------
// Webhook
// ---------------------------------------------------------------------------------------------

#[test]
fn webhook_posts_signed_job_json_with_the_raw_message() {
    let rx = Receiver::webhook(HOOK_KEY);
    let url = rx.url(HOOK_PATH);
    let env = Env::start(|d| webhook_toml(d, &url, "2s", r#"["1s"]"#), "");
    let id = env.send(&rcpt(), "wh1@example.org");
    let job = env.wait_state(&id, "done", Some(&rx));
    assert_eq!(job["attempts"], 1, "{job}");

    let reqs = rx.requests();
    assert_eq!(reqs.len(), 1, "{}", rx.summary());
    let r = &reqs[0];
    assert_eq!((r.method.as_str(), r.path.as_str()), ("POST", HOOK_PATH));
    let ct = r.header("content-type").unwrap_or_default();
    assert!(ct.starts_with("application/json"), "Content-Type {ct:?}");
    assert_eq!(r.job_id(), Some(id.as_str()));
    let sig = r.header("mailgate-signature").unwrap_or_default();
    assert!(sig.starts_with("t=") && sig.contains(",v1="), "{sig}");
    match &r.verified {
        Ok(Verified::Webhook { timestamp, job: body, raw }) => {
            assert!((unix_now() - timestamp).abs() < 60, "t={timestamp}");
            assert_eq!(body["id"], id.as_str());
            assert_eq!(body["mailbox"], "incoming");
            assert_eq!(body["key"], KEY);
            assert_eq!(body["route"], "reply");
            assert_eq!(body["key_source"], "rcpt");
            assert_eq!(body["message"], job["message"], "the job JSON as `queue show` prints it");
            assert_eq!(body["envelope"], job["envelope"]);
            assert_eq!(body["received_at"], job["received_at"]);
            assert_eq!(body["message"]["message_id"], "wh1@example.org");
            // Worked out when the job is sent, not stored at intake (spool/present.rs).
            assert_eq!(body["reply_text"], "Hello from the test.", "{body}");
            assert_eq!(body["reply_text"], job["reply_text"], "as the HTTP API shows it");
            assert_eq!(raw, &env.raw(&id), "raw decodes to the stored message");
        }
        other => panic!("the receiver refused the request: {other:?}"),
    }
}

#[test]
fn webhook_500_twice_then_200_is_done_after_three_attempts() {
    let rx = Receiver::webhook(HOOK_KEY);
    rx.set_mode(Mode::FailTimes(2, 500));
    let url = rx.url(HOOK_PATH);
    let env = Env::start(|d| webhook_toml(d, &url, "2s", r#"["1s", "1s", "1s"]"#), "");
    let id = env.send(&rcpt(), "wh500@example.org");
    let waiting = env.wait_job(&id, "waiting after a 500", Some(&rx), |j| {
        j["state"] == "ready" && j["attempts"].as_u64() >= Some(1) && !j["last_error"].is_null()
    });
    assert!(error_text(&waiting).contains("500"), "{waiting}");
    let job = env.wait_state(&id, "done", Some(&rx));
    assert_eq!(job["attempts"], 3, "{job}");
    let statuses: Vec<u16> = rx.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [500, 500, 200], "{}", rx.summary());
    assert!(rx.requests().iter().all(|r| r.ok() && r.job_id() == Some(id.as_str())));
}

#[test]
fn webhook_404_is_dead_at_once() {
    let rx = Receiver::webhook(HOOK_KEY);
    rx.set_mode(Mode::Status(404));
    let url = rx.url(HOOK_PATH);
    let env = Env::start(|d| webhook_toml(d, &url, "2s", MANY_RETRIES), "");
    let id = env.send(&rcpt(), "wh404@example.org");
    let job = env.wait_state(&id, "dead", Some(&rx));
    assert_eq!(job["attempts"], 1, "{job}");
    assert!(error_text(&job).contains("404"), "{job}");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(rx.count(), 1, "{}", rx.summary());
    let o = env.cli(&["queue", "stats", "--json"]);
    let stats: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(stats["dead"], 1, "{stats}");
}

#[test]
fn webhook_429_and_408_are_retried() {
    let rx = Receiver::webhook(HOOK_KEY);
    rx.set_mode(Mode::Sequence(VecDeque::from([429, 408])));
    let url = rx.url(HOOK_PATH);
    let env = Env::start(|d| webhook_toml(d, &url, "2s", r#"["1s", "1s", "1s"]"#), "");
    let id = env.send(&rcpt(), "wh429@example.org");
    let job = env.wait_state(&id, "done", Some(&rx));
    assert_eq!(job["attempts"], 3, "{job}");
    let statuses: Vec<u16> = rx.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [429, 408, 200], "{}", rx.summary());
}

#[test]
fn receiver_down_is_retried_with_last_error_and_next_attempt_at() {
    let rx = Receiver::webhook(HOOK_KEY);
    rx.stop();
    let url = rx.url(HOOK_PATH);
    let env = Env::start(|d| webhook_toml(d, &url, "1s", MANY_RETRIES), "");
    let id = env.send(&rcpt(), "down@example.org");
    let job = env.wait_job(&id, "waiting for a retry", None, |j| {
        j["state"] == "ready" && !j["last_error"].is_null() && !j["next_attempt_at"].is_null()
    });
    assert!(job["attempts"].as_u64() >= Some(1), "{job}");
    assert!(!error_text(&job).is_empty());
    let next = rfc3339(&job["next_attempt_at"]);
    let now = OffsetDateTime::now_utc();
    assert!(
        next > now - time::Duration::seconds(2) && next < now + time::Duration::seconds(5),
        "next_attempt_at {next} with retry 1s (now {now})"
    );
    // it keeps trying while the receiver is down
    env.wait_job(&id, "attempted twice", None, |j| j["attempts"].as_u64() >= Some(2));
    assert_eq!(rx.count(), 0);

    rx.start();
    let job = env.wait_state(&id, "done", Some(&rx));
    assert!(job["attempts"].as_u64() >= Some(2), "{job}");
    assert!(job.get("next_attempt_at").is_none_or(Value::is_null), "no retry pending once done: {job}");
    assert!(rx.requests().iter().any(|r| r.ok() && r.job_id() == Some(id.as_str())), "{}", rx.summary());
}

#[test]
fn slow_answer_past_the_timeout_is_retried() {
    let rx = Receiver::webhook(HOOK_KEY);
    rx.set_mode(Mode::Slow(Duration::from_secs(4)));
    let url = rx.url(HOOK_PATH);
    let env = Env::start(|d| webhook_toml(d, &url, "1s", MANY_RETRIES), "");
    let id = env.send(&rcpt(), "slow@example.org");
    // ready again after two attempts: both timed out (a job in flight counts its attempt already)
    let job = env.wait_job(&id, "timed out twice", Some(&rx), |j| {
        j["attempts"].as_u64() >= Some(2) && !j["last_error"].is_null() && j["state"] != "leased"
    });
    assert!(error_text(&job).contains("timed out") || error_text(&job).contains("timeout"), "{job}");
    assert_ne!(
        job["state"],
        "done",
        "a 4 s answer with timeout = 1s is no delivery: {job}\nreceiver:\n{}\nlog:\n{}",
        rx.summary(),
        env.log_tail()
    );
    assert_ne!(job["state"], "dead", "{job}");
    rx.set_mode(Mode::Ok);
    let job = env.wait_state(&id, "done", Some(&rx));
    assert!(job["attempts"].as_u64() >= Some(3), "{job}");
}

#[test]
fn retries_exhausted_make_the_job_dead() {
    let rx = Receiver::webhook(HOOK_KEY);
    rx.set_mode(Mode::Status(500));
    let url = rx.url(HOOK_PATH);
    let env = Env::start(|d| webhook_toml(d, &url, "2s", r#"["1s"]"#), "");
    let id = env.send(&rcpt(), "exhausted@example.org");
    let job = env.wait_state(&id, "dead", Some(&rx));
    assert_eq!(job["attempts"], 2, "the first attempt and one retry: {job}");
    assert!(error_text(&job).contains("500"), "{job}");
    assert!(job.get("next_attempt_at").is_none_or(Value::is_null), "{job}");
    std::thread::sleep(Duration::from_millis(2000));
    assert_eq!(rx.count(), 2, "{}", rx.summary());
}

#[test]
fn bulk_retry_by_cli_and_http() {
    let rx = Receiver::webhook(HOOK_KEY);
    rx.set_mode(Mode::Status(404));
    let url = rx.url(HOOK_PATH);
    let env = Env::start(
        |d| {
            format!(
                "[[mailbox]]\nname = \"incoming\"\naddress = \"incoming+%{{key}}@localhost\"\n\
                 [[mailbox]]\nname = \"other\"\naddress = \"other+%{{key}}@localhost\"\n{}",
                webhook_toml(d, &url, "2s", r#"["1s"]"#)
            )
        },
        "",
    );
    let a = env.send(&rcpt(), "bulk-a@example.org");
    let b = env.send(&rcpt(), "bulk-b@example.org");
    let c = env.send(&format!("other+{KEY}@localhost"), "bulk-c@example.org");
    for id in [&a, &b, &c] {
        env.wait_state(id, "dead", Some(&rx));
    }
    assert_eq!(rx.count(), 3);

    // only the other mailbox, still refused: dead again after one more request
    assert_eq!(env.cli_retry_all(Some("other")), 1);
    rx.wait_requests(4, WAIT);
    env.wait_state(&c, "dead", Some(&rx));
    let reqs = rx.requests();
    assert_eq!(requests_for(&reqs, &c).len(), 2, "{}", rx.summary());
    assert_eq!(requests_for(&reqs, &a).len(), 1, "{}", rx.summary());

    rx.set_mode(Mode::Ok);
    let r = http_post(env.ports.http, "/v1/jobs/retry?mailbox=incoming");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["retried"], 2, "{}", r.text());
    env.wait_state(&a, "done", Some(&rx));
    env.wait_state(&b, "done", Some(&rx));
    assert_eq!(env.job(&c).unwrap()["state"], "dead");

    assert_eq!(env.cli_retry_all(None), 1);
    env.wait_state(&c, "done", Some(&rx));
    assert_eq!(env.cli_retry_all(None), 0);
    let r = http_post(env.ports.http, "/v1/jobs/retry");
    assert_eq!((r.status, r.json()["retried"].as_u64()), (200, Some(0)), "{}", r.text());
}

#[test]
fn deliverers_only_take_their_mailboxes() {
    let rx = Receiver::webhook(HOOK_KEY);
    let url = rx.url(HOOK_PATH);
    let env = Env::start(
        |d| {
            format!(
                "[[mailbox]]\nname = \"incoming\"\naddress = \"incoming+%{{key}}@localhost\"\n\
                 [[mailbox]]\nname = \"other\"\naddress = \"other+%{{key}}@localhost\"\n{}mailboxes = [\"incoming\"]\n",
                webhook_toml(d, &url, "2s", r#"["1s"]"#)
            )
        },
        "",
    );
    let other = env.send(&format!("other+{KEY}@localhost"), "only-other@example.org");
    let mine = env.send(&rcpt(), "only-mine@example.org");
    env.wait_state(&mine, "done", Some(&rx));
    std::thread::sleep(Duration::from_millis(1500));
    let job = env.job(&other).unwrap();
    assert_eq!((job["state"].as_str(), job["attempts"].as_u64()), (Some("ready"), Some(0)), "{job}");
    assert_eq!(rx.count(), 1, "{}", rx.summary());
    // left for the pull API
    let o = env.cli(&["queue", "pop", "--mailbox", "other"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let popped: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(popped["id"], other.as_str());
}

// ---------------------------------------------------------------------------------------------
// Retention
// ---------------------------------------------------------------------------------------------

#[test]
fn retention_purges_delivered_jobs_and_their_messages() {
    let rx = Receiver::webhook(HOOK_KEY);
    let url = rx.url(HOOK_PATH);
    let env = Env::start(
        |d| {
            format!(
                "[[mailbox]]\nname = \"incoming\"\naddress = \"incoming+%{{key}}@localhost\"\n\
                 [[mailbox]]\nname = \"other\"\naddress = \"other+%{{key}}@localhost\"\n{}mailboxes = [\"incoming\"]\n",
                webhook_toml(d, &url, "2s", r#"["1s"]"#)
            )
        },
        "retention = \"1s\"",
    );
    let waiting = env.send(&format!("other+{KEY}@localhost"), "kept@example.org");
    let id = env.send(&rcpt(), "purged@example.org");
    let stored = env.raw(&id);
    let reqs = rx.wait_requests(1, WAIT);
    match &reqs[0].verified {
        Ok(Verified::Webhook { raw, .. }) => assert_eq!(raw, &stored),
        other => panic!("{other:?}"),
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while env.job(&id).is_some() {
        assert!(Instant::now() < deadline, "job {id} still there 15 s after delivery: {:?}", env.job(&id));
        std::thread::sleep(Duration::from_millis(100));
    }
    let r = http_get(env.ports.http, &format!("/v1/jobs/{id}/raw"));
    assert_eq!(r.status, 404, "the raw message goes with the job: {}", r.text());
    let o = env.cli(&["queue", "list", "--json"]);
    let ids: Vec<String> = json_values(&stdout(&o)).iter().map(|j| j["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids, std::slice::from_ref(&waiting), "only the undelivered job is left");
    assert_eq!(env.raw(&waiting).len() as u64, env.job(&waiting).unwrap()["message"]["size"].as_u64().unwrap());
}

//! The delivery tests' own parts checked first: the receiver verifies mail_room JWTs the way
//! GitLab does and webhook signatures the way docs/delivery.md tells consumers to, its fault
//! modes work, and the redis-server harness starts, stops and restarts.

mod common;

use common::delivery::*;

fn post(port: u16, path: &str, headers: &[(&str, &str)], body: &[u8]) -> u16 {
    receiver::http("POST", port, path, headers, body).expect("receiver answers").status
}

#[test]
fn harness_receiver_checks_mailroom_jwts_like_gitlab() {
    let secret = mailroom_secret();
    let rx = Receiver::mailroom(&secret);
    let now = unix_now();
    let h = "Gitlab-Mailroom-Api-Request";
    let ok = receiver::mailroom_token(&secret, "gitlab-mailroom", now);
    assert_eq!(post(rx.port, MAILROOM_PATH, &[(h, &ok), ("Content-Type", "text/plain")], b"raw"), 200);
    let r = &rx.requests()[0];
    match &r.verified {
        Ok(Verified::Mailroom { alg, claims }) => {
            assert_eq!(alg, "HS256");
            assert_eq!(claims["iss"], "gitlab-mailroom");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(r.body, b"raw");
    assert_eq!(r.header("content-type"), Some("text/plain"));
    assert_eq!(r.path, MAILROOM_PATH);

    // 4 minutes old is fine, 6 minutes is not; wrong issuer, wrong secret, other algorithm,
    // no header: 401 as GitLab answers
    let older = receiver::mailroom_token(&secret, "gitlab-mailroom", now - 240);
    assert_eq!(post(rx.port, MAILROOM_PATH, &[(h, &older)], b"x"), 200);
    let stale = receiver::mailroom_token(&secret, "gitlab-mailroom", now - 360);
    assert_eq!(post(rx.port, MAILROOM_PATH, &[(h, &stale)], b"x"), 401);
    let issuer = receiver::mailroom_token(&secret, "mail_room", now);
    assert_eq!(post(rx.port, MAILROOM_PATH, &[(h, &issuer)], b"x"), 401);
    let other_secret = receiver::mailroom_token(&[7u8; 32], "gitlab-mailroom", now);
    assert_eq!(post(rx.port, MAILROOM_PATH, &[(h, &other_secret)], b"x"), 401);
    let claims = serde_json::json!({"nonce": "0123456789abcdef01234567", "iat": now, "iss": "gitlab-mailroom"});
    let hs512 = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS512),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(&secret),
    )
    .unwrap();
    assert_eq!(post(rx.port, MAILROOM_PATH, &[(h, &hs512)], b"x"), 401);
    let no_iat = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"nonce": "0123456789abcdef01234567", "iss": "gitlab-mailroom"}),
        &jsonwebtoken::EncodingKey::from_secret(&secret),
    )
    .unwrap();
    assert_eq!(post(rx.port, MAILROOM_PATH, &[(h, &no_iat)], b"x"), 401);
    assert_eq!(post(rx.port, MAILROOM_PATH, &[], b"x"), 401);
    let verdicts: Vec<bool> = rx.requests().iter().map(Recorded::ok).collect();
    assert_eq!(verdicts, [true, true, false, false, false, false, false, false]);
}

#[test]
fn harness_receiver_checks_webhook_signatures() {
    let rx = Receiver::webhook(HOOK_KEY);
    let now = unix_now();
    let body =
        serde_json::to_vec(&serde_json::json!({"id": "00000000000000ab", "raw": b64(b"Subject: x\r\n\r\nhi\r\n")}))
            .unwrap();
    let sig = receiver::webhook_signature(HOOK_KEY, now, &body);
    let hdrs = |sig: &str| -> Vec<(&'static str, String)> {
        vec![("Mailgate-Job-Id", "00000000000000ab".into()), ("Mailgate-Signature", sig.to_string())]
    };
    let send = |h: Vec<(&'static str, String)>, body: &[u8]| {
        let h: Vec<(&str, &str)> = h.iter().map(|(n, v)| (*n, v.as_str())).collect();
        post(rx.port, HOOK_PATH, &h, body)
    };
    assert_eq!(send(hdrs(&sig), &body), 200);
    match &rx.requests()[0].verified {
        Ok(Verified::Webhook { timestamp, job, raw }) => {
            assert_eq!(*timestamp, now);
            assert_eq!(job["id"], "00000000000000ab");
            assert_eq!(raw, b"Subject: x\r\n\r\nhi\r\n");
        }
        other => panic!("{other:?}"),
    }
    let mut tampered = body.clone();
    tampered[3] ^= 1;
    assert_eq!(send(hdrs(&sig), &tampered), 401, "tampered body");
    assert_eq!(send(hdrs(&receiver::webhook_signature(b"other key", now, &body)), &body), 401, "wrong key");
    let old = now - 301;
    assert_eq!(send(hdrs(&receiver::webhook_signature(HOOK_KEY, old, &body)), &body), 401, "stale timestamp");
    assert_eq!(send(hdrs(&format!("t={now}")), &body), 401, "no v1");
    let wrong_id = serde_json::to_vec(&serde_json::json!({"id": "00000000000000ac", "raw": b64(b"x")})).unwrap();
    assert_eq!(send(hdrs(&receiver::webhook_signature(HOOK_KEY, now, &wrong_id)), &wrong_id), 400, "id mismatch");
    let no_raw = serde_json::to_vec(&serde_json::json!({"id": "00000000000000ab"})).unwrap();
    assert_eq!(send(hdrs(&receiver::webhook_signature(HOOK_KEY, now, &no_raw)), &no_raw), 400, "no raw");
    assert_eq!(rx.count(), 7);
}

#[test]
fn harness_receiver_modes_and_downtime() {
    let rx = Receiver::plain();
    let p = rx.port;
    assert_eq!(post(p, "/", &[], b""), 200);
    rx.set_mode(Mode::Status(503));
    assert_eq!(post(p, "/", &[], b""), 503);
    rx.set_mode(Mode::FailTimes(2, 500));
    let got: Vec<u16> = (0..3).map(|_| post(p, "/", &[], b"")).collect();
    assert_eq!(got, [500, 500, 200]);
    rx.set_mode(Mode::Sequence(VecDeque::from([429, 408])));
    let got: Vec<u16> = (0..3).map(|_| post(p, "/", &[], b"")).collect();
    assert_eq!(got, [429, 408, 200]);
    rx.set_mode(Mode::Slow(Duration::from_millis(300)));
    let t = Instant::now();
    assert_eq!(post(p, "/", &[], b""), 200);
    assert!(t.elapsed() >= Duration::from_millis(300));
    rx.set_mode(Mode::Ok);

    // a kept-alive connection dies with the receiver too
    let mut keep = std::net::TcpStream::connect(("127.0.0.1", p)).unwrap();
    rx.stop();
    assert!(std::net::TcpStream::connect(("127.0.0.1", p)).is_err(), "connection refused while stopped");
    keep.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 16];
    let n = std::io::Read::read(&mut keep, &mut buf).unwrap_or(0);
    assert_eq!(n, 0, "open connections are closed");
    rx.start();
    assert_eq!(post(p, "/", &[], b""), 200);
    assert_eq!(rx.port, p);
    assert_eq!(rx.count(), 10, "{}", rx.summary());
}

#[test]
fn harness_redis_server_runs_and_stops() {
    let mut redis = RedisServer::start();
    assert!(redis.url().starts_with("redis://127.0.0.1:"));
    let _: () = redis.cmd(&["SET", "k", "v"]);
    assert_eq!(redis.cmd::<String>(&["GET", "k"]), "v");
    let _: i64 = redis.cmd(&["LPUSH", "queue:x", "a"]);
    let _: i64 = redis.cmd(&["LPUSH", "queue:x", "b"]);
    assert_eq!(redis.list("queue:x"), ["b", "a"]);
    let pid = redis.pid();
    redis.stop();
    assert!(redis.query::<String>(&["PING"]).is_err());
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists() || {
            // a zombie is reaped by wait(); the pid directory goes away
            std::thread::sleep(Duration::from_millis(100));
            !Path::new(&format!("/proc/{pid}")).exists()
        }
    );
    redis.start_again();
    assert_eq!(redis.cmd::<String>(&["PING"]), "PONG");
    assert!(redis.list("queue:x").is_empty(), "no persistence");
}

// ---------------------------------------------------------------------------------------------
// mail_room postback
// ---------------------------------------------------------------------------------------------

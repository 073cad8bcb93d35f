//! The connection driver over in-memory streams: TLS, timeouts, the tarpit, min_data_rate.
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::*;
use crate::config::PolicyConfig;
use crate::frontend::tls::{CertStore, test_connector, write_test_pair};

struct Fixture {
    _dir: tempfile::TempDir,
    _stop: watch::Sender<bool>,
    ctx: Arc<ConnContext>,
    cert: rustls_pki_types::CertificateDer<'static>,
}

fn fixture(implicit: bool, require: bool) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let (files, cert) = write_test_pair(dir.path(), "mx");
    let store = Arc::new(CertStore::load(&files).unwrap());
    let (stop, shutdown) = watch::channel(false);
    let ctx = ConnContext {
        spool: Spool::open(&dir.path().join("spool"), Default::default()).unwrap(),
        auth: None,
        gate: super::super::tests::gate(PolicyConfig::default()),
        // ten errors, as the tarpit test counts them
        session: Arc::new(SessionConfig { max_errors: 10, ..(*super::super::tests::config(false, false)).clone() }),
        command_timeout: Duration::from_secs(10),
        stress: None,
        min_data_rate: 500,
        data_timeout: Duration::from_secs(10),
        session_timeout: Duration::from_secs(30),
        error_delay: Duration::ZERO,
        shutdown,
        tls: Some(Arc::new(ListenerTls::new(store, implicit, require))),
    };
    Fixture { _dir: dir, _stop: stop, ctx: Arc::new(ctx), cert }
}

/// A plaintext fixture, its context changed by `change`.
fn plain(change: impl FnOnce(&mut ConnContext)) -> Fixture {
    let mut f = fixture(false, false);
    let ctx = Arc::get_mut(&mut f.ctx).expect("not shared yet");
    ctx.tls = None;
    change(ctx);
    f
}

/// A session of the driver over an in-memory connection: its task, and the client's end.
fn connect(f: &Fixture) -> (tokio::task::JoinHandle<CloseCause>, BufReader<tokio::io::DuplexStream>) {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let ctx = f.ctx.clone();
    (tokio::spawn(async move { run(server, peer(), &ctx).await }), BufReader::new(client))
}

/// Runs `trickle` (a client sending slowly, for ever) until the session ends; its cause.
/// The trickle only ends once the server has closed: the session's end is then ready too, and
/// select! may see either first.
async fn trickle_until_closed(
    mut task: tokio::task::JoinHandle<CloseCause>,
    trickle: impl std::future::Future<Output = ()>,
) -> CloseCause {
    let ended = tokio::select! {
        c = &mut task => Some(c.unwrap()),
        _ = trickle => None,
    };
    match ended {
        Some(cause) => cause,
        None => task.await.unwrap(),
    }
}

fn peer() -> Peer {
    Peer { ip: Some("192.0.2.1".parse().unwrap()), trusted: false }
}

/// One whole (multi-line) reply.
async fn reply<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> String {
    let mut all = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await.unwrap() == 0 {
            return all;
        }
        all.push_str(&line);
        if line.as_bytes().get(3) != Some(&b'-') {
            return all;
        }
    }
}

#[tokio::test]
async fn the_driver_drops_what_was_pipelined_after_starttls() {
    let f = fixture(false, false);
    let (task, mut client) = connect(&f);
    assert!(reply(&mut client).await.starts_with("220 mx.test ESMTP"));
    // one write: the injected commands arrive with STARTTLS in the same read
    client
        .get_mut()
        .write_all(b"EHLO c.example\r\nSTARTTLS\r\nMAIL FROM:<evil@example.org>\r\nRSET\r\n")
        .await
        .unwrap();
    assert!(reply(&mut client).await.contains("250 STARTTLS\r\n"));
    assert_eq!(reply(&mut client).await, "220 2.0.0 Ready to start TLS\r\n");
    let tls = test_connector(f.cert.clone())
        .connect("mx.test".try_into().unwrap(), client.into_inner())
        .await
        .expect("handshake");
    let mut tls = BufReader::new(tls);
    // the first reply over TLS answers the first command sent over TLS
    tls.get_mut().write_all(b"NOOP\r\n").await.unwrap();
    assert_eq!(reply(&mut tls).await, "250 2.0.0 Ok\r\n");
    tls.get_mut().write_all(b"MAIL FROM:<a@example.org>\r\n").await.unwrap();
    assert_eq!(reply(&mut tls).await, "503 5.5.1 Error: send HELO/EHLO first\r\n", "EHLO was forgotten");
    tls.get_mut().write_all(b"EHLO c.example\r\nQUIT\r\n").await.unwrap();
    let ehlo = reply(&mut tls).await;
    assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
    assert_eq!(reply(&mut tls).await, "221 2.0.0 Bye\r\n");
    assert_eq!(task.await.unwrap(), CloseCause::Server("quit"));
}

#[tokio::test]
async fn implicit_tls_handshakes_before_the_greeting_and_a_failed_handshake_closes() {
    let f = fixture(true, false);
    let (task, client) = connect(&f);
    let tls = test_connector(f.cert.clone()).connect("mx.test".try_into().unwrap(), client.into_inner()).await.unwrap();
    let mut tls = BufReader::new(tls);
    assert!(reply(&mut tls).await.starts_with("220 mx.test ESMTP"));
    tls.get_mut().write_all(b"EHLO c.example\r\nQUIT\r\n").await.unwrap();
    assert!(!reply(&mut tls).await.contains("STARTTLS"));
    assert_eq!(reply(&mut tls).await, "221 2.0.0 Bye\r\n");
    assert_eq!(task.await.unwrap(), CloseCause::Server("quit"));

    // a plaintext client on an implicit-TLS listener: no greeting, closed
    let (task, mut client) = connect(&f);
    client.get_mut().write_all(b"EHLO c.example\r\n").await.unwrap();
    assert_eq!(task.await.unwrap(), CloseCause::Server("tls_failed"));
    let mut rest = Vec::new();
    let _ = tokio::io::AsyncReadExt::read_to_end(&mut client, &mut rest).await;
    assert!(!String::from_utf8_lossy(&rest).contains("220"), "no SMTP greeting in plaintext");
}

#[tokio::test]
async fn a_failed_starttls_handshake_closes_the_connection() {
    let f = fixture(false, true);
    let (task, mut client) = connect(&f);
    reply(&mut client).await;
    client.get_mut().write_all(b"EHLO c.example\r\n").await.unwrap();
    reply(&mut client).await;
    client.get_mut().write_all(b"MAIL FROM:<a@example.org>\r\n").await.unwrap();
    assert_eq!(reply(&mut client).await, "530 5.7.0 Must issue a STARTTLS command first\r\n");
    client.get_mut().write_all(b"STARTTLS\r\n").await.unwrap();
    assert_eq!(reply(&mut client).await, "220 2.0.0 Ready to start TLS\r\n");
    client.get_mut().write_all(b"this is not a ClientHello\r\n").await.unwrap();
    assert_eq!(task.await.unwrap(), CloseCause::Server("tls_failed"));
}

/// Slowloris: a command line trickled in byte by byte is cut after `command_timeout`,
/// although every byte restarts the idle timer; whole commands, however slow, are not.
#[tokio::test]
async fn a_trickled_command_line_is_cut_after_the_command_timeout() {
    let f = plain(|ctx| {
        ctx.command_timeout = Duration::from_millis(600);
    });
    let (task, mut client) = connect(&f);
    assert!(reply(&mut client).await.starts_with("220 "));
    // slow, but each command line whole within the timeout
    for _ in 0..3 {
        client.get_mut().write_all(b"NO").await.unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
        client.get_mut().write_all(b"OP\r\n").await.unwrap();
        assert_eq!(reply(&mut client).await, "250 2.0.0 Ok\r\n");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let started = Instant::now();
    let trickle = async {
        for b in b"NOOP this line never ends".iter().cycle() {
            if client.get_mut().write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let cause = trickle_until_closed(task, trickle).await;
    assert_eq!(cause, CloseCause::Server("timeout"));
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(550) && took < Duration::from_secs(3), "{took:?}");
    let mut rest = String::new();
    let _ = tokio::io::AsyncReadExt::read_to_string(&mut client, &mut rest).await;
    assert_eq!(rest, "421 4.4.2 mx.test Error: timeout exceeded\r\n");
}

/// Bad commands after the second are answered `error_delay` late each.
#[tokio::test]
async fn errors_after_the_second_are_answered_late() {
    let f = plain(|ctx| {
        ctx.error_delay = Duration::from_millis(100);
    });
    let (task, mut client) = connect(&f);
    assert!(reply(&mut client).await.starts_with("220 "));
    let started = Instant::now();
    client.get_mut().write_all(b"FOO\r\nBAR\r\n").await.unwrap();
    reply(&mut client).await;
    reply(&mut client).await;
    assert!(started.elapsed() < Duration::from_millis(90), "the first two are free");
    // the rest of the session's ten, pipelined: eight delays, then the 421
    client.get_mut().write_all("BAZ\r\n".repeat(8).as_bytes()).await.unwrap();
    let mut rest = String::new();
    let _ = tokio::io::AsyncReadExt::read_to_string(&mut client, &mut rest).await;
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(800) && took < Duration::from_secs(3), "{took:?}");
    assert!(rest.ends_with("421 4.7.0 mx.test Error: too many errors\r\n"), "{rest}");
    assert_eq!(task.await.unwrap(), CloseCause::Server("too_many_errors"));
}

/// A message arriving at 1,000 bytes/s outlives `data_timeout` (its DATA earns a second
/// per `min_data_rate` bytes); the session's next DATA, trickled at 40 bytes/s, is cut soon
/// after `data_timeout`.
#[tokio::test]
async fn data_slower_than_min_data_rate_is_cut() {
    let f = plain(|ctx| {
        ctx.data_timeout = Duration::from_millis(800);
        ctx.min_data_rate = 500;
    });
    let (task, mut c) = connect(&f);
    assert!(reply(&mut c).await.starts_with("220 "));
    let key = crate::frontend::smtp::tests::KEY;
    for cmd in [
        "EHLO c.example".to_string(),
        "MAIL FROM:<a@example.org>".into(),
        format!("RCPT TO:<incoming+{key}@localhost>"),
    ] {
        c.get_mut().write_all(format!("{cmd}\r\n").as_bytes()).await.unwrap();
        assert!(reply(&mut c).await.starts_with("250"));
    }
    let data = async |c: &mut BufReader<tokio::io::DuplexStream>| {
        c.get_mut().write_all(b"DATA\r\n").await.unwrap();
        assert!(reply(c).await.starts_with("354"));
        c.get_mut().write_all(b"From: a@example.org\r\nSubject: s\r\n\r\n").await.unwrap();
        Instant::now()
    };
    let started = data(&mut c).await;
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(125)).await;
        c.get_mut().write_all(format!("{}\r\n", "x".repeat(123)).as_bytes()).await.unwrap();
    }
    c.get_mut().write_all(b".\r\n").await.unwrap();
    let r = reply(&mut c).await;
    assert!(r.starts_with("250 2.0.0 Ok: queued as"), "{r}");
    assert!(started.elapsed() > Duration::from_millis(800), "it outlived data_timeout");
    c.get_mut().write_all(b"MAIL FROM:<a@example.org>\r\n").await.unwrap();
    assert!(reply(&mut c).await.starts_with("250"));
    c.get_mut().write_all(format!("RCPT TO:<incoming+{key}@localhost>\r\n").as_bytes()).await.unwrap();
    assert!(reply(&mut c).await.starts_with("250"));
    let started = data(&mut c).await;
    let trickle = async {
        loop {
            if c.get_mut().write_all(b"slow data\n").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    };
    let cause = trickle_until_closed(task, trickle).await;
    let took = started.elapsed();
    assert_eq!(cause, CloseCause::Server("timeout"));
    assert!(took >= Duration::from_millis(800) && took < Duration::from_secs(2), "{took:?}");
    let mut rest = String::new();
    let _ = tokio::io::AsyncReadExt::read_to_string(&mut c, &mut rest).await;
    assert_eq!(rest, "421 4.4.2 mx.test Error: timeout exceeded\r\n");
}

#[test]
fn data_may_last_data_timeout_plus_a_second_per_min_rate_bytes() {
    let t0 = Instant::now();
    let ten = Duration::from_secs(10);
    assert_eq!(data_deadline(t0, 0, ten, 500), Some(t0 + ten));
    assert_eq!(data_deadline(t0, 1500, ten, 500), Some(t0 + ten + Duration::from_secs(3)));
    assert_eq!(data_deadline(t0, 250, ten, 500), Some(t0 + ten + Duration::from_millis(500)));
    assert_eq!(data_deadline(t0, u64::MAX, ten, 0), None, "0 turns it off");
}

//! The session core and STARTTLS: offered, refused, required, the reset after the handshake,
//! and what was pipelined after the command thrown away.

use super::session::TlsPolicy;
use super::tests::*;
use crate::gate::verdict::Reason;
use crate::reject::{Action, Stage};

// --- TLS: STARTTLS, require_tls, the reset after the handshake, injection -------------------

fn tls_info() -> crate::job::TlsInfo {
    crate::job::TlsInfo { version: "TLSv1.3".into(), cipher: "TLS13_AES_256_GCM_SHA384".into() }
}

fn tls_harness(starttls: bool, require: bool) -> Harness {
    let mut h = Harness::new(false, false, false);
    h.s.set_tls_policy(TlsPolicy { starttls, require });
    h
}

#[test]
fn starttls_is_advertised_only_on_tls_listeners_before_tls() {
    let mut h = tls_harness(true, false);
    let r = h.send(b"EHLO c.example\r\n");
    assert!(r.iter().any(|l| l[4..] == *"STARTTLS"), "{r:?}");
    assert!(r.last().unwrap().starts_with("250 "), "{r:?}");
    // no certificate: neither advertised nor accepted
    let mut h = Harness::new(false, false, false);
    let r = h.send(b"EHLO c.example\r\n");
    assert!(!r.iter().any(|l| l.contains("STARTTLS")), "{r:?}");
    assert_eq!(h.send(b"STARTTLS\r\n"), vec!["502 5.5.1 Error: STARTTLS not implemented"]);
    assert!(h.starttls.is_empty());
    // after the handshake it is gone from EHLO
    let mut h = tls_harness(true, false);
    h.ehlo();
    assert_eq!(h.send(b"STARTTLS\r\n"), vec!["220 2.0.0 Ready to start TLS"]);
    assert_eq!(h.starttls, vec![0]);
    h.s.tls_started(tls_info());
    let r = h.send(b"EHLO c.example\r\n");
    assert!(!r.iter().any(|l| l.contains("STARTTLS")), "{r:?}");
}

#[test]
fn starttls_twice_is_a_sequence_error() {
    let mut h = tls_harness(true, false);
    h.ehlo();
    h.send(b"STARTTLS\r\n");
    h.s.tls_started(tls_info());
    h.ehlo();
    assert_eq!(h.send(b"STARTTLS\r\n"), vec!["503 5.5.1 Error: TLS already active"]);
    assert_eq!(h.starttls.len(), 1, "no second handshake");
    // implicit TLS: the session starts encrypted, STARTTLS is a sequence error too
    let mut h = tls_harness(false, false);
    h.s.tls_started(tls_info());
    let r = h.send(b"EHLO c.example\r\n");
    assert!(!r.iter().any(|l| l.contains("STARTTLS")), "{r:?}");
    assert_eq!(h.send(b"STARTTLS\r\n"), vec!["503 5.5.1 Error: TLS already active"]);
    assert_eq!(h.s.take_rejects().last().unwrap().reason, Reason::BadCommand);
}

#[test]
fn starttls_inside_a_transaction_is_refused() {
    let mut h = tls_harness(true, false);
    h.ehlo();
    h.send(b"MAIL FROM:<a@example.org>\r\n");
    assert_eq!(h.send(b"STARTTLS\r\n"), vec!["503 5.5.1 Error: MAIL transaction in progress"]);
    assert!(h.starttls.is_empty());
}

#[test]
fn require_tls_refuses_mail_before_tls_with_530() {
    let mut h = tls_harness(true, true);
    h.ehlo();
    let r = h.send(b"NOOP\r\nRSET\r\nMAIL FROM:<a@example.org>\r\nVRFY bob\r\nXFORWARD ADDR=192.0.2.9\r\n");
    assert_eq!(
        r,
        vec![
            "250 2.0.0 Ok",
            "250 2.0.0 Ok",
            "530 5.7.0 Must issue a STARTTLS command first",
            "530 5.7.0 Must issue a STARTTLS command first",
            "530 5.7.0 Must issue a STARTTLS command first",
        ]
    );
    let rejects = h.s.take_rejects();
    assert_eq!(rejects.len(), 3);
    assert!(rejects.iter().all(|e| e.reason == Reason::TlsRequired && e.code == 530 && e.action == Action::Reject));
    assert_eq!(rejects[0].stage, Stage::Helo);
    assert_eq!(rejects[0].client_ip, "192.0.2.1");
    // after TLS the same mail goes through
    assert_eq!(h.send(b"STARTTLS\r\n"), vec!["220 2.0.0 Ready to start TLS"]);
    h.s.tls_started(tls_info());
    h.ehlo();
    let r = h.send(format!("MAIL FROM:<a@example.org>\r\nRCPT TO:<incoming+{KEY}@localhost>\r\nDATA\r\n").as_bytes());
    assert_eq!(r, vec!["250 2.1.0 Ok", "250 2.1.5 Ok", "354 End data with <CR><LF>.<CR><LF>"]);
    assert!(h.send(message("secure").as_bytes())[0].starts_with("250 2.0.0 Ok: queued as"));
}

#[test]
fn the_session_starts_over_after_the_handshake() {
    let mut h = tls_harness(true, false);
    h.ehlo();
    assert_eq!(h.s.helo(), "client.example.org");
    h.send(b"STARTTLS\r\n");
    h.s.tls_started(tls_info());
    assert_eq!(h.s.helo(), "", "HELO/EHLO is forgotten (RFC 3207 4.2)");
    assert_eq!(h.send(b"MAIL FROM:<a@example.org>\r\n"), vec!["503 5.5.1 Error: send HELO/EHLO first"]);
    let r = h.send(b"EHLO again.example.org\r\n");
    assert_eq!(r.last().unwrap(), "250 ENHANCEDSTATUSCODES");
    let r = h.send(format!("MAIL FROM:<a@example.org>\r\nRCPT TO:<incoming+{KEY}@localhost>\r\nDATA\r\n").as_bytes());
    assert_eq!(r.len(), 3, "{r:?}");
    assert!(h.send(message("tls").as_bytes())[0].starts_with("250 2.0.0 Ok: queued as"));
    let (raw, jobs) = &h.stored[0];
    let raw = String::from_utf8_lossy(raw);
    assert!(raw.contains("Received: from again.example.org"), "{raw}");
    assert!(
        raw.contains("(mailgate) with ESMTPS\r\n\t(version=TLSv1.3 cipher=TLS13_AES_256_GCM_SHA384)\r\n\tfor <"),
        "{raw}"
    );
    let env = &jobs[0].job.envelope;
    assert_eq!(env.tls, Some(tls_info()));
    assert_eq!(env.protocol, "ESMTP");
    assert_eq!(env.helo, "again.example.org");
    // a plaintext session records no TLS
    let mut h = Harness::new(false, false, false);
    h.ehlo();
    h.send(format!("MAIL FROM:<a@example.org>\r\nRCPT TO:<incoming+{KEY}@localhost>\r\nDATA\r\n").as_bytes());
    h.send(message("plain").as_bytes());
    assert_eq!(h.stored[0].1[0].job.envelope.tls, None);
    assert!(!String::from_utf8_lossy(&h.stored[0].0).contains("ESMTPS"));
    let json = serde_json::to_value(&h.stored[0].1[0].job.envelope).unwrap();
    assert!(json.get("tls").is_none(), "absent, not null: {json}");
}

#[test]
fn commands_pipelined_after_starttls_are_thrown_away() {
    let mut h = tls_harness(true, false);
    let evil = format!("MAIL FROM:<evil@example.org>\r\nRCPT TO:<incoming+{KEY}@localhost>\r\nRSET\r\n");
    let r = h.send(format!("EHLO c.example\r\nSTARTTLS\r\n{evil}").as_bytes());
    assert_eq!(r.last().unwrap(), "220 2.0.0 Ready to start TLS", "{r:?}");
    assert!(!r.iter().any(|l| l.starts_with("250 2.1") || l == "250 2.0.0 Ok"), "nothing after STARTTLS ran: {r:?}");
    assert_eq!(h.starttls, vec![evil.len()], "the core consumed (threw away) the pipelined bytes");
    assert!(h.pending.is_empty());
    // more plaintext before the driver calls tls_started is thrown away as well
    let r = h.send(b"MAIL FROM:<evil2@example.org>\r\n");
    assert!(r.is_empty(), "{r:?}");
    assert!(h.pending.is_empty());
    h.s.tls_started(tls_info());
    // the injected MAIL did not open a transaction: without EHLO MAIL is still refused
    assert_eq!(h.send(b"RCPT TO:<x@localhost>\r\n"), vec!["503 5.5.1 Error: need MAIL command"]);
    assert!(h.s.take_rejects().iter().all(|e| !e.mail_from.contains("evil")));
}

#[test]
fn tls_is_not_recorded_for_a_forwarded_client() {
    let mut h = Harness::new(false, false, true);
    h.s.set_tls_policy(TlsPolicy { starttls: true, require: false });
    h.ehlo();
    h.send(b"STARTTLS\r\n");
    h.s.tls_started(tls_info());
    h.ehlo();
    h.send(b"XFORWARD ADDR=203.0.113.5 HELO=far.example.org PROTO=ESMTP\r\n");
    h.send(format!("MAIL FROM:<a@example.org>\r\nRCPT TO:<incoming+{KEY}@localhost>\r\nDATA\r\n").as_bytes());
    h.send(message("fwd").as_bytes());
    let (raw, jobs) = &h.stored[0];
    assert_eq!(jobs[0].job.envelope.tls, None, "the relay's TLS is not the client's");
    assert!(!String::from_utf8_lossy(raw).contains("version=TLS"));
}

//! The session core tested line by line, without sockets.

use std::sync::Arc;

use super::session::{Event, Peer, Session, SessionConfig, TlsPolicy};
use crate::config::{MailboxConfig, PolicyConfig, RefusalAction, RouteSet};
use crate::gate::Gate;
use crate::gate::verdict::Reason;
use crate::reject::{Action, Stage};
use crate::spool::StoreOutcome;

const KEY: &str = "0123456789abcdef0123456789abcdef";

fn config(lmtp: bool, after_queue: bool) -> Arc<SessionConfig> {
    Arc::new(SessionConfig {
        hostname: "mx.test".into(),
        lmtp,
        after_queue,
        listener: if lmtp { "lmtp" } else { "smtp" },
        max_message_size: 10_000,
        max_recipients: 3,
        max_errors: 8,
        max_line_length: 1000,
        verify: false,
        verify_spf: false,
    })
}

fn gate(policy: PolicyConfig) -> Arc<Gate> {
    let mb = MailboxConfig {
        name: "incoming".into(),
        address: "incoming+%{key}@localhost".into(),
        reply_host: None,
        routes: RouteSet::Gitlab,
        auth: None,
    };
    Arc::new(Gate::new(&[mb], &policy).unwrap())
}

/// A session plus a fake spool that stores every job as id 1, 2, 3...
struct Harness {
    s: Session,
    pending: Vec<u8>,
    stored: Vec<(Vec<u8>, Vec<crate::spool::NewJob>)>,
    duplicate: bool,
    fail_store: bool,
    /// `discarded` of every StartTls event: the driver would run a handshake now.
    starttls: Vec<usize>,
}

impl Harness {
    fn new(lmtp: bool, after_queue: bool, trusted: bool) -> Harness {
        Harness::with(lmtp, after_queue, trusted, PolicyConfig::default())
    }

    fn with(lmtp: bool, after_queue: bool, trusted: bool, policy: PolicyConfig) -> Harness {
        let peer = Peer { ip: Some("192.0.2.1".parse().unwrap()), trusted };
        let s = Session::new(config(lmtp, after_queue), gate(policy), peer);
        let mut out = Vec::new();
        s.greeting(&mut out);
        assert!(String::from_utf8_lossy(&out).starts_with("220 mx.test "));
        Harness {
            s,
            pending: Vec::new(),
            stored: Vec::new(),
            duplicate: false,
            fail_store: false,
            starttls: Vec::new(),
        }
    }

    /// Sends bytes; returns every reply line produced.
    fn send(&mut self, input: &[u8]) -> Vec<String> {
        self.pending.extend_from_slice(input);
        let mut out = Vec::new();
        loop {
            let (consumed, ev) = self.s.process(&self.pending, &mut out);
            self.pending.drain(..consumed);
            match ev {
                Event::Store(req) => {
                    let n = self.stored.len();
                    let outcomes = (0..req.jobs.len())
                        .map(|i| {
                            let id = format!("{:016x}", n + i + 1);
                            if self.duplicate { StoreOutcome::Duplicate { id } } else { StoreOutcome::Stored { id } }
                        })
                        .collect();
                    let result = if self.fail_store { Err("disk full".to_string()) } else { Ok(outcomes) };
                    self.stored.push((req.raw, req.jobs));
                    self.s.stored(result, &mut out);
                }
                Event::Verify(v) => panic!("checks are off in these tests: {v:?}"),
                Event::StartTls { discarded } => {
                    self.starttls.push(discarded);
                    break;
                }
                Event::NeedInput | Event::Close => break,
            }
        }
        String::from_utf8_lossy(&out).lines().map(str::to_string).collect()
    }

    fn ehlo(&mut self) {
        let verb = if self.s_is_lmtp() { "LHLO" } else { "EHLO" };
        let r = self.send(format!("{verb} client.example.org\r\n").as_bytes());
        assert!(r.last().unwrap().starts_with("250 "), "{r:?}");
    }

    fn s_is_lmtp(&self) -> bool {
        self.s.greeting_kind() == "LMTP"
    }
}

impl Session {
    fn greeting_kind(&self) -> &'static str {
        let mut out = Vec::new();
        self.greeting(&mut out);
        if String::from_utf8_lossy(&out).contains("LMTP") { "LMTP" } else { "ESMTP" }
    }
}

fn message(subject: &str) -> String {
    format!("From: a@example.org\r\nMessage-ID: <{subject}@example.org>\r\nSubject: {subject}\r\n\r\nHello\r\n.\r\n")
}

#[test]
fn ehlo_advertises_extensions_and_xforward_only_to_trusted() {
    let mut h = Harness::new(false, false, true);
    let r = h.send(b"EHLO c.example\r\n");
    assert_eq!(r[0], "250-mx.test");
    for cap in ["PIPELINING", "SIZE 10000", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES"] {
        assert!(r.iter().any(|l| l[4..] == *cap), "{cap} missing: {r:?}");
    }
    assert!(r.iter().any(|l| l.contains("XFORWARD NAME ADDR PORT PROTO HELO IDENT SOURCE")));
    let mut h = Harness::new(false, false, false);
    let r = h.send(b"EHLO c.example\r\n");
    assert!(!r.iter().any(|l| l.contains("XFORWARD")));
}

#[test]
fn a_reply_is_stored_with_its_envelope() {
    let mut h = Harness::new(false, false, false);
    h.ehlo();
    let r = h.send(
        format!("MAIL FROM:<a@example.org> SIZE=100 BODY=8BITMIME\r\nRCPT TO:<incoming+{KEY}@localhost>\r\nDATA\r\n")
            .as_bytes(),
    );
    assert_eq!(r, vec!["250 2.1.0 Ok", "250 2.1.5 Ok", "354 End data with <CR><LF>.<CR><LF>"]);
    let r = h.send(message("hi").as_bytes());
    assert_eq!(r, vec!["250 2.0.0 Ok: queued as 0000000000000001"]);
    let (raw, jobs) = &h.stored[0];
    let raw = String::from_utf8_lossy(raw);
    assert!(raw.starts_with("Return-Path: <a@example.org>\r\nReceived: from client.example.org"), "{raw}");
    assert!(raw.ends_with("Subject: hi\r\n\r\nHello\r\n"));
    let job = &jobs[0].job;
    assert_eq!(job.key, KEY);
    assert_eq!(job.envelope.client_ip, "192.0.2.1");
    assert_eq!(job.envelope.protocol, "ESMTP");
    assert_eq!(job.message.subject, "hi");
}

#[test]
fn pipelined_commands_get_replies_in_order() {
    let mut h = Harness::new(false, false, false);
    let input = format!(
        "EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<incoming+{KEY}@localhost>\r\nDATA\r\n{}QUIT\r\n",
        message("p")
    );
    let r = h.send(input.as_bytes());
    let codes: Vec<&str> = r.iter().filter(|l| !l.starts_with("250-")).map(|l| &l[..3]).collect();
    assert_eq!(codes, vec!["250", "250", "250", "354", "250", "221"]);
    assert!(h.s.is_closed());
}

#[test]
fn unknown_key_and_address_are_refused_at_rcpt() {
    let mut h = Harness::new(false, false, false);
    h.ehlo();
    let r = h.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<incoming+nokey@localhost>\r\nRCPT TO:<bob@elsewhere.example>\r\nDATA\r\n");
    assert!(r[1].starts_with("550 5.1.1 "), "{r:?}");
    assert!(r[2].starts_with("550 5.1.1 "), "{r:?}");
    assert!(r[3].starts_with("554 5.5.1"), "{r:?}");
    let rejects = h.s.take_rejects();
    assert_eq!(rejects[0].reason, Reason::UnknownKey);
    assert_eq!(rejects[0].stage, Stage::Rcpt);
    assert_eq!(rejects[0].rcpt_to, vec!["incoming+nokey@localhost"]);
    assert_eq!(rejects[1].reason, Reason::UnknownAddress);
}

#[test]
fn after_queue_lmtp_never_refuses_policy_and_answers_per_recipient() {
    let mut h = Harness::new(true, true, true);
    h.ehlo();
    let r = h.send(
        format!(
            "XFORWARD NAME=mail.example.org ADDR=203.0.113.5 HELO=mail.example.org\r\nXFORWARD IDENT=ABC123 PROTO=ESMTP\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<incoming+{KEY}@localhost>\r\nRCPT TO:<incoming+nokey@localhost>\r\nDATA\r\n"
        )
        .as_bytes(),
    );
    assert_eq!(
        r,
        vec![
            "250 2.0.0 Ok",
            "250 2.0.0 Ok",
            "250 2.1.0 Ok",
            "250 2.1.5 Ok",
            "250 2.1.5 Ok",
            "354 End data with <CR><LF>.<CR><LF>"
        ]
    );
    let r = h.send(message("two").as_bytes());
    assert_eq!(r.len(), 2, "one reply per recipient: {r:?}");
    assert!(r[0].starts_with("250 2.0.0 Ok: queued as"));
    assert!(r[1].starts_with("250 2.0.0 Ok: discarded (unknown_key"), "{r:?}");
    let job = &h.stored[0].1[0].job;
    assert_eq!(job.envelope.client_ip, "203.0.113.5");
    assert_eq!(job.envelope.queue_id, "ABC123");
    let rejects = h.s.take_rejects();
    assert_eq!(rejects.len(), 1);
    assert_eq!(rejects[0].action, Action::Discard);
    assert_eq!(rejects[0].client_ip, "203.0.113.5");
    // XFORWARD attributes end with the transaction
    h.send(format!("MAIL FROM:<a@example.org>\r\nRCPT TO:<incoming+{KEY}@localhost>\r\nDATA\r\n").as_bytes());
    h.send(message("three").as_bytes());
    assert_eq!(h.stored[1].1[0].job.envelope.client_ip, "192.0.2.1");
}

#[test]
fn xforward_from_untrusted_peer_is_refused() {
    let mut h = Harness::new(false, false, false);
    h.ehlo();
    let r = h.send(b"XFORWARD ADDR=203.0.113.5\r\n");
    assert_eq!(r, vec!["550 5.7.0 Error: insufficient authorization"]);
    assert_eq!(h.s.take_rejects()[0].reason, Reason::UntrustedXforward);
}

#[test]
fn smuggling_is_refused_and_nothing_runs_or_is_stored() {
    for fake in ["\n.\n", "\n.\r\n", "\r.\r", "\r\n.\n", "\r.\r\n"] {
        let mut h = Harness::new(false, false, false);
        h.ehlo();
        let input = format!(
            "MAIL FROM:<a@example.org>\r\nRCPT TO:<incoming+{KEY}@localhost>\r\nDATA\r\nSubject: x\r\n\r\nbody{fake}MAIL FROM:<admin@victim.example>\r\nRCPT TO:<incoming+{KEY}@localhost>\r\nDATA\r\nsmuggled\r\n.\r\nNOOP\r\n"
        );
        let r = h.send(input.as_bytes());
        assert_eq!(r[2], "354 End data with <CR><LF>.<CR><LF>");
        assert!(r[3].starts_with("550 5.5.2 Error: bare"), "{fake:?}: {r:?}");
        assert_eq!(r[4], "250 2.0.0 Ok", "only NOOP runs after the data: {r:?}");
        assert_eq!(r.len(), 5, "{fake:?}: {r:?}");
        assert!(h.stored.is_empty());
        assert_eq!(h.s.take_rejects().last().unwrap().reason, Reason::BareLf);
        // a defined state: a new transaction works
        h.send(format!("MAIL FROM:<a@example.org>\r\nRCPT TO:<incoming+{KEY}@localhost>\r\nDATA\r\n").as_bytes());
        let r = h.send(message("after").as_bytes());
        assert!(r[0].starts_with("250 2.0.0 Ok: queued"), "{r:?}");
    }
}

#[test]
fn bare_lf_in_a_command_is_refused() {
    let mut h = Harness::new(false, false, false);
    let r = h.send(b"EHLO x\nNOOP\r\n");
    assert_eq!(r, vec!["500 5.5.2 Error: bare <LF> received", "250 2.0.0 Ok"]);
}

#[test]
fn limits() {
    let mut h = Harness::new(false, false, false);
    h.ehlo();
    let r = h.send(b"MAIL FROM:<a@example.org> SIZE=20000\r\n");
    assert_eq!(r, vec!["552 5.3.4 Error: message size exceeds fixed limit"]);
    h.send(b"MAIL FROM:<a@example.org>\r\n");
    for _ in 0..3 {
        h.send(format!("RCPT TO:<incoming+{KEY}@localhost>\r\n").as_bytes());
    }
    let r = h.send(format!("RCPT TO:<incoming+{KEY}@localhost>\r\n").as_bytes());
    assert_eq!(r, vec!["452 4.5.3 Error: too many recipients"]);
    h.send(b"DATA\r\n");
    let big = format!("Subject: big\r\n\r\n{}\r\n.\r\n", "x".repeat(900) + &"\r\ny".repeat(5000));
    let r = h.send(big.as_bytes());
    assert_eq!(r, vec!["552 5.3.4 Error: message file too big"]);
    let long = format!("NOOP {}\r\n", "a".repeat(600));
    assert_eq!(h.send(long.as_bytes()), vec!["500 5.5.2 Error: line too long"]);
    let reasons: Vec<Reason> = h.s.take_rejects().iter().map(|r| r.reason).collect();
    assert_eq!(reasons, vec![Reason::TooLarge, Reason::TooManyRecipients, Reason::TooLarge, Reason::LineTooLong]);
}

#[test]
fn too_many_errors_closes_with_421() {
    let mut h = Harness::new(false, false, false);
    let r = h.send(b"FOO\r\nBAR\r\nBAZ\r\nQUX\r\nZAP\r\nA\r\nB\r\nC\r\nNOOP\r\n");
    assert_eq!(r.len(), 9, "{r:?}");
    assert!(r[8].starts_with("421 4.7.0 mx.test Error: too many errors"));
    assert!(h.s.is_closed());
}

#[test]
fn sequence_errors() {
    let mut h = Harness::new(false, false, false);
    assert_eq!(h.send(b"MAIL FROM:<a@b.example>\r\n"), vec!["503 5.5.1 Error: send HELO/EHLO first"]);
    h.ehlo();
    assert_eq!(
        h.send(format!("RCPT TO:<incoming+{KEY}@localhost>\r\n").as_bytes()),
        vec!["503 5.5.1 Error: need MAIL command"]
    );
    assert_eq!(h.send(b"DATA\r\n"), vec!["503 5.5.1 Error: need MAIL command"]);
    h.send(b"MAIL FROM:<a@b.example>\r\n");
    assert_eq!(h.send(b"DATA\r\n"), vec!["503 5.5.1 Error: need RCPT command"]);
    assert_eq!(h.send(b"MAIL FROM:<a@b.example>\r\n"), vec!["503 5.5.1 Error: nested MAIL command"]);
    assert_eq!(h.send(b"RSET\r\nVRFY x\r\n")[1][..3].to_string(), "252");
    assert_eq!(h.send(b"LHLO x\r\n")[0][..3].to_string(), "500");
}

#[test]
fn lmtp_requires_lhlo() {
    let mut h = Harness::new(true, true, true);
    assert_eq!(h.send(b"EHLO x\r\n"), vec!["500 5.5.1 Error: this is an LMTP server, use LHLO"]);
    let r = h.send(b"LHLO x\r\n");
    assert!(r.last().unwrap().starts_with("250 "));
}

#[test]
fn auto_replies_and_null_sender() {
    let mut h = Harness::new(false, false, false);
    h.ehlo();
    h.send(format!("MAIL FROM:<>\r\nRCPT TO:<incoming+{KEY}@localhost>\r\nDATA\r\n").as_bytes());
    let r = h.send(message("bounce").as_bytes());
    assert!(r[0].starts_with("250 2.0.0 Ok: discarded (null_sender"), "{r:?}");
    h.send(format!("MAIL FROM:<a@example.org>\r\nRCPT TO:<incoming+{KEY}@localhost>\r\nDATA\r\n").as_bytes());
    let r = h.send(format!("Auto-Submitted: auto-replied\r\n{}", message("ooo")).as_bytes());
    assert!(r[0].starts_with("250 2.0.0 Ok: discarded (auto_submitted"), "{r:?}");
    assert!(h.stored.is_empty());

    let policy = PolicyConfig { auto_submitted: RefusalAction::Reject, null_sender: RefusalAction::Reject };
    let mut h = Harness::with(false, false, false, policy.clone());
    h.ehlo();
    assert!(h.send(b"MAIL FROM:<>\r\n")[0].starts_with("550 5.7.1"));
    h.send(format!("MAIL FROM:<a@example.org>\r\nRCPT TO:<incoming+{KEY}@localhost>\r\nDATA\r\n").as_bytes());
    let r = h.send(format!("X-Autoreply: yes\r\n{}", message("ooo")).as_bytes());
    assert!(r[0].starts_with("550 5.7.1"), "{r:?}");
    // after-queue: the same policy discards instead of refusing
    let mut h = Harness::with(true, true, true, policy);
    h.ehlo();
    h.send(format!("MAIL FROM:<>\r\nRCPT TO:<incoming+{KEY}@localhost>\r\nDATA\r\n").as_bytes());
    let r = h.send(message("bounce").as_bytes());
    assert!(r[0].starts_with("250 2.0.0 Ok: discarded (null_sender"), "{r:?}");
}

#[test]
fn duplicates_and_spool_errors() {
    let mut h = Harness::new(false, false, false);
    h.ehlo();
    h.duplicate = true;
    h.send(format!("MAIL FROM:<a@example.org>\r\nRCPT TO:<incoming+{KEY}@localhost>\r\nDATA\r\n").as_bytes());
    let r = h.send(message("dup").as_bytes());
    assert_eq!(r, vec!["250 2.0.0 Ok: duplicate of 0000000000000001, not queued again"]);
    assert_eq!(h.s.take_rejects()[0].reason, Reason::Duplicate);
    h.fail_store = true;
    h.send(format!("MAIL FROM:<a@example.org>\r\nRCPT TO:<incoming+{KEY}@localhost>\r\nDATA\r\n").as_bytes());
    let r = h.send(message("full").as_bytes());
    assert_eq!(r, vec!["451 4.3.0 Error: queue file write error, try again later"]);
    let e = h.s.take_rejects();
    assert_eq!(e[0].reason, Reason::SpoolError);
    assert_eq!(e[0].subject, "full");
}

#[test]
fn byte_by_byte_input_works() {
    let mut h = Harness::new(false, false, false);
    let input = format!(
        "EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<incoming+{KEY}@localhost>\r\nDATA\r\n{}",
        message("slow")
    );
    let mut all = Vec::new();
    for b in input.as_bytes() {
        all.extend(h.send(&[*b]));
    }
    assert!(all.last().unwrap().starts_with("250 2.0.0 Ok: queued as"), "{all:?}");
}

#[test]
fn smtp_recipient_dropped_after_250_is_logged_as_a_discard() {
    let mut h = Harness::new(false, false, false);
    h.ehlo();
    // the base address needs a key from the headers; this message has none
    h.send(format!("MAIL FROM:<a@example.org>\r\nRCPT TO:<incoming+{KEY}@localhost>\r\nRCPT TO:<incoming@localhost>\r\nDATA\r\n").as_bytes());
    let r = h.send(message("partial").as_bytes());
    assert!(r[0].starts_with("250 2.0.0 Ok: queued as"), "{r:?}");
    let e = h.s.take_rejects();
    assert_eq!(e.len(), 1);
    assert_eq!((e[0].action, e[0].code, e[0].reason), (Action::Discard, 250, Reason::UnknownKey));
    assert_eq!(e[0].rcpt_to, vec!["incoming@localhost"]);
}

#[test]
fn too_many_errors_is_a_tempfail_in_the_log() {
    let mut h = Harness::new(false, false, false);
    h.send(&b"FOO\r\n".repeat(8));
    let last = h.s.take_rejects().pop().unwrap();
    assert_eq!((last.reason, last.action, last.code), (Reason::TooManyErrors, Action::Tempfail, 421));
    assert_eq!(h.s.close_cause(), Some("too_many_errors"));
}

#[test]
fn forwarded_and_local_helo_are_never_mixed() {
    let mut h = Harness::new(true, true, true);
    h.ehlo();
    h.send(b"XFORWARD ADDR=203.0.113.5 HELO=[UNAVAILABLE]\r\n");
    h.send(format!("MAIL FROM:<a@example.org>\r\nRCPT TO:<incoming+{KEY}@localhost>\r\nDATA\r\n").as_bytes());
    h.send(message("local").as_bytes());
    let (raw, jobs) = &h.stored[0];
    assert_eq!(jobs[0].job.envelope.helo, "", "not the relay's LHLO name");
    assert!(String::from_utf8_lossy(raw).contains("Received: from unknown (unknown [203.0.113.5])"));
}

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

/// A transaction to one keyed recipient, up to the 354.
fn open_data(h: &mut Harness) {
    let r = h.send(format!("MAIL FROM:<a@example.org>\r\nRCPT TO:<incoming+{KEY}@localhost>\r\nDATA\r\n").as_bytes());
    assert!(r.last().unwrap().starts_with("354"), "{r:?}");
}

fn nested(depth: usize) -> String {
    let mut m = String::from("From: a@example.org\r\nSubject: deep\r\n");
    for i in 0..depth {
        m.push_str(&format!("Content-Type: multipart/mixed; boundary=\"b{i}\"\r\n\r\n--b{i}\r\n"));
    }
    m.push_str("\r\nhello\r\n");
    for i in (0..depth).rev() {
        m.push_str(&format!("--b{i}--\r\n"));
    }
    m + ".\r\n"
}

#[test]
fn content_limits_refuse_in_session_and_discard_after_the_queue() {
    let limits = crate::gate::mime::ContentLimits {
        max_header_size: 2000,
        max_header_lines: 20,
        max_mime_depth: 5,
        max_mime_parts: 50,
    };
    let lines = format!("{}Subject: many\r\n\r\nbody\r\n.\r\n", "X-A: b\r\n".repeat(20));
    let bytes = format!("{}\r\nbody\r\n.\r\n", format!("X-Big: {}\r\n", "a".repeat(990)).repeat(3));
    let cases = [
        (lines, "552 5.3.4 Error: too many header lines", Reason::HeaderTooLarge),
        (bytes, "552 5.3.4 Error: message header too big", Reason::HeaderTooLarge),
        (nested(6), "554 5.6.0 Error: MIME nesting too deep", Reason::MimeTooComplex),
    ];
    for after_queue in [false, true] {
        for (msg, reply, reason) in &cases {
            let mut h = Harness::new(after_queue, after_queue, false);
            h.s.gate = Arc::new((*h.s.gate).clone().with_limits(limits));
            h.ehlo();
            open_data(&mut h);
            let r = h.send(msg.as_bytes());
            let rejects = h.s.take_rejects();
            assert_eq!(rejects.len(), 1, "{reply}: {r:?}");
            assert_eq!((rejects[0].reason, rejects[0].stage), (*reason, Stage::Data));
            if after_queue {
                let text = &reply[10..];
                assert_eq!(r, vec![format!("250 2.0.0 Ok: discarded ({reason}: {text})")]);
                assert_eq!(rejects[0].action, Action::Discard);
            } else {
                assert_eq!(r, vec![reply.to_string()]);
                assert_eq!(rejects[0].action, Action::Reject);
            }
            assert!(h.stored.is_empty());
            // the session goes on
            open_data(&mut h);
            assert!(h.send(message("after").as_bytes())[0].starts_with("250 2.0.0 Ok: queued as"));
        }
    }
    // within the limits
    let mut h = Harness::new(false, false, false);
    h.s.gate = Arc::new((*h.s.gate).clone().with_limits(limits));
    h.ehlo();
    open_data(&mut h);
    assert!(h.send(nested(5).as_bytes())[0].starts_with("250 2.0.0 Ok: queued as"));
}

#[test]
fn a_message_nested_10000_deep_is_refused_at_the_default_limits() {
    let mut h = Harness::new(false, false, false);
    h.s.cfg = Arc::new(SessionConfig { max_message_size: 1 << 20, ..(*h.s.cfg).clone() });
    h.ehlo();
    open_data(&mut h);
    let mut deep = String::from("Subject: deep\r\n");
    for i in 0..10_000 {
        deep.push_str(&format!("Content-Type: message/rfc822\r\n\r\nSubject: {i}\r\n"));
    }
    deep.push_str("\r\nhello\r\n.\r\n");
    let started = std::time::Instant::now();
    assert_eq!(h.send(deep.as_bytes()), vec!["554 5.6.0 Error: MIME nesting too deep"]);
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
}

//! The session core tested line by line, without sockets.

use std::sync::Arc;

use super::session::{Event, Peer, Session, SessionConfig};
use crate::config::{MailboxConfig, PolicyConfig, RefusalAction, RouteSet};
use crate::gate::Gate;
use crate::gate::verdict::Reason;
use crate::reject::{Action, Stage};
use crate::spool::StoreOutcome;

pub(super) const KEY: &str = "0123456789abcdef0123456789abcdef";

pub(super) fn config(lmtp: bool, after_queue: bool) -> Arc<SessionConfig> {
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

pub(super) fn gate(policy: PolicyConfig) -> Arc<Gate> {
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
pub(super) struct Harness {
    pub(super) s: Session,
    pub(super) pending: Vec<u8>,
    pub(super) stored: Vec<(Vec<u8>, Vec<crate::spool::NewJob>)>,
    pub(super) duplicate: bool,
    pub(super) fail_store: bool,
    /// `discarded` of every StartTls event: the driver would run a handshake now.
    pub(super) starttls: Vec<usize>,
}

impl Harness {
    pub(super) fn new(lmtp: bool, after_queue: bool, trusted: bool) -> Harness {
        Harness::with(lmtp, after_queue, trusted, PolicyConfig::default())
    }

    pub(super) fn with(lmtp: bool, after_queue: bool, trusted: bool, policy: PolicyConfig) -> Harness {
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
    pub(super) fn send(&mut self, input: &[u8]) -> Vec<String> {
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

    pub(super) fn ehlo(&mut self) {
        let verb = if self.s_is_lmtp() { "LHLO" } else { "EHLO" };
        let r = self.send(format!("{verb} client.example.org\r\n").as_bytes());
        assert!(r.last().unwrap().starts_with("250 "), "{r:?}");
    }

    pub(super) fn s_is_lmtp(&self) -> bool {
        self.s.greeting_kind() == "LMTP"
    }
}

impl Session {
    pub(super) fn greeting_kind(&self) -> &'static str {
        let mut out = Vec::new();
        self.greeting(&mut out);
        if String::from_utf8_lossy(&out).contains("LMTP") { "LMTP" } else { "ESMTP" }
    }
}

pub(super) fn message(subject: &str) -> String {
    format!("From: a@example.org\r\nMessage-ID: <{subject}@example.org>\r\nSubject: {subject}\r\n\r\nHello\r\n.\r\n")
}

#[test]
pub(super) fn ehlo_advertises_extensions_and_xforward_only_to_trusted() {
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
pub(super) fn a_reply_is_stored_with_its_envelope() {
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
pub(super) fn pipelined_commands_get_replies_in_order() {
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
pub(super) fn unknown_key_and_address_are_refused_at_rcpt() {
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
pub(super) fn after_queue_lmtp_never_refuses_policy_and_answers_per_recipient() {
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
pub(super) fn xforward_from_untrusted_peer_is_refused() {
    let mut h = Harness::new(false, false, false);
    h.ehlo();
    let r = h.send(b"XFORWARD ADDR=203.0.113.5\r\n");
    assert_eq!(r, vec!["550 5.7.0 Error: insufficient authorization"]);
    assert_eq!(h.s.take_rejects()[0].reason, Reason::UntrustedXforward);
}

#[test]
pub(super) fn smuggling_is_refused_and_nothing_runs_or_is_stored() {
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
pub(super) fn bare_lf_in_a_command_is_refused() {
    let mut h = Harness::new(false, false, false);
    let r = h.send(b"EHLO x\nNOOP\r\n");
    assert_eq!(r, vec!["500 5.5.2 Error: bare <LF> received", "250 2.0.0 Ok"]);
}

#[test]
pub(super) fn limits() {
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
pub(super) fn too_many_errors_closes_with_421() {
    let mut h = Harness::new(false, false, false);
    let r = h.send(b"FOO\r\nBAR\r\nBAZ\r\nQUX\r\nZAP\r\nA\r\nB\r\nC\r\nNOOP\r\n");
    assert_eq!(r.len(), 9, "{r:?}");
    assert!(r[8].starts_with("421 4.7.0 mx.test Error: too many errors"));
    assert!(h.s.is_closed());
}

#[test]
pub(super) fn sequence_errors() {
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
pub(super) fn lmtp_requires_lhlo() {
    let mut h = Harness::new(true, true, true);
    assert_eq!(h.send(b"EHLO x\r\n"), vec!["500 5.5.1 Error: this is an LMTP server, use LHLO"]);
    let r = h.send(b"LHLO x\r\n");
    assert!(r.last().unwrap().starts_with("250 "));
}

#[test]
pub(super) fn auto_replies_and_null_sender() {
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
pub(super) fn duplicates_and_spool_errors() {
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
pub(super) fn byte_by_byte_input_works() {
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
pub(super) fn smtp_recipient_dropped_after_250_is_logged_as_a_discard() {
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
pub(super) fn too_many_errors_is_a_tempfail_in_the_log() {
    let mut h = Harness::new(false, false, false);
    h.send(&b"FOO\r\n".repeat(8));
    let last = h.s.take_rejects().pop().unwrap();
    assert_eq!((last.reason, last.action, last.code), (Reason::TooManyErrors, Action::Tempfail, 421));
    assert_eq!(h.s.close_cause(), Some("too_many_errors"));
}

#[test]
pub(super) fn forwarded_and_local_helo_are_never_mixed() {
    let mut h = Harness::new(true, true, true);
    h.ehlo();
    h.send(b"XFORWARD ADDR=203.0.113.5 HELO=[UNAVAILABLE]\r\n");
    h.send(format!("MAIL FROM:<a@example.org>\r\nRCPT TO:<incoming+{KEY}@localhost>\r\nDATA\r\n").as_bytes());
    h.send(message("local").as_bytes());
    let (raw, jobs) = &h.stored[0];
    assert_eq!(jobs[0].job.envelope.helo, "", "not the relay's LHLO name");
    assert!(String::from_utf8_lossy(raw).contains("Received: from unknown (unknown [203.0.113.5])"));
}

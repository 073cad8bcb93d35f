//! The session core and content limits: header size and MIME structure refused in session,
//! discarded after the queue.

use super::session::SessionConfig;
use super::tests::*;

use std::sync::Arc;

use crate::gate::verdict::Reason;
use crate::reject::{Action, Stage};

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

/// The driver finishes large messages off its workers when the input may end one: the final
/// `.` line at the start of the input or after a line end, never in the middle of a line.
#[test]
fn the_end_of_a_message_is_announced_with_its_size() {
    let mut h = Harness::new(false, false, false);
    assert_eq!(h.s.may_end_message(b".\r\n", 0), None, "not in DATA");
    h.ehlo();
    open_data(&mut h);
    assert!(h.send(b"From: a@example.org\r\nSubject: s\r\n\r\nbody\r\n").is_empty());
    let received = 41;
    assert_eq!(h.s.may_end_message(b"more\r\n", 0), None);
    assert_eq!(h.s.may_end_message(b"a.\r\n", 0), None);
    assert_eq!(h.s.may_end_message(b"..\r\n", 0), None, "a stuffed dot is data");
    assert_eq!(h.s.may_end_message(b".\r\n", 0), Some(received + 3));
    assert_eq!(h.s.may_end_message(b"x\r\n.\r\n", 0), Some(received + 6));
    let r = h.send(b".\r\n");
    assert!(r[0].starts_with("250 2.0.0 Ok: queued as"), "{r:?}");
    assert_eq!(h.s.may_end_message(b".\r\n", 0), None);
    open_data(&mut h);
    assert_eq!(h.s.may_end_message(b".\r\n", 4), None, "smaller than asked");
    assert_eq!(h.s.may_end_message(b".\r\n", 3), Some(3));
}

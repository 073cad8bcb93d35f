//! The ESMTP/LMTP session core: a state machine that does no I/O. The connection driver feeds
//! it bytes and writes what it answers; when a message is complete it asks the driver to store
//! it and is told the outcome. LMTP is a flag (LHLO, one reply per recipient after DATA).

use std::net::IpAddr;
use std::sync::Arc;

use smtp_proto::{Error as ParseError, Request};

use super::data::{DataProgress, DataReceiver};
use super::outcome::{Pending, StoreRequest};
use super::trace;
use super::xforward::{self, Forwarded};
use crate::gate::Gate;
use crate::gate::message::Recipient;
use crate::gate::verdict::{Reason, Reply, Verdict};
use crate::job::TlsInfo;
use crate::reject::{Action, RejectEntry, Stage};

mod log;
mod starttls;

/// Per-listener settings of a session.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub hostname: String,
    pub lmtp: bool,
    pub after_queue: bool,
    /// `smtp` or `lmtp`, as the reject log names the listener.
    pub listener: &'static str,
    pub max_message_size: u64,
    pub max_recipients: usize,
    pub max_errors: u32,
    pub max_line_length: usize,
    /// Run sender authentication (SPF at MAIL, DKIM/ARC/DMARC at end of DATA).
    pub verify: bool,
    /// Some mailbox or route needs SPF (or DMARC, which uses it).
    pub verify_spf: bool,
}

/// The connecting peer.
#[derive(Debug, Clone)]
pub struct Peer {
    /// None for a unix-socket peer.
    pub ip: Option<IpAddr>,
    /// Trusted peers may send XFORWARD.
    pub trusted: bool,
}

/// A listener's TLS settings as the session applies them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TlsPolicy {
    /// Advertise and accept STARTTLS (the listener has a certificate and is not implicit TLS).
    pub starttls: bool,
    /// Before TLS, refuse everything but EHLO/HELO/STARTTLS/NOOP/RSET/QUIT with `530 5.7.0`.
    pub require: bool,
}

/// What the driver must do next.
#[derive(Debug)]
pub enum Event {
    /// Write the pending replies and read more input.
    NeedInput,
    /// Store this message, then call [`Session::stored`].
    Store(StoreRequest),
    /// Run this check, then call [`Session::spf_checked`] or [`Session::message_checked`].
    Verify(super::verify::Verify),
    /// Write the pending replies (the `220` to STARTTLS), then run the TLS handshake and call
    /// [`Session::tls_started`], or close the connection if it fails. Everything the client
    /// sent after the STARTTLS line was consumed and thrown away (STARTTLS command injection,
    /// CVE-2011-0411): the driver must throw away anything it still buffers too.
    StartTls {
        /// Bytes pipelined after STARTTLS that were thrown away.
        discarded: usize,
    },
    /// Write the pending replies and close the connection.
    Close,
}

/// RFC 5321 4.5.3.1.4: 512 octets for a command line.
const MAX_COMMAND_LINE: usize = 512;
/// MAIL and RCPT may carry ESMTP parameters (SIZE, BODY, SMTPUTF8, RET, ENVID, NOTIFY, ORCPT);
/// RFC 1870 and RFC 3461 raise their limit.
const MAX_PARAM_LINE: usize = 1024;
/// With `require_tls`, the commands allowed before TLS (RFC 3207 4: 530 for the others).
const ALLOWED_BEFORE_TLS: [&[u8]; 7] = [b"EHLO", b"HELO", b"LHLO", b"STARTTLS", b"NOOP", b"RSET", b"QUIT"];

pub(super) enum State {
    Command,
    Data(Box<DataReceiver>),
    /// Waiting for the driver to run an authentication check.
    WaitVerify,
    WaitStore(Box<Pending>),
    /// STARTTLS was answered; waiting for the driver's handshake. Input is thrown away.
    WaitTls,
    Closed,
}

pub(super) struct Txn {
    pub mail_from: String,
    pub rcpts: Vec<Recipient>,
    pub refused_rcpts: usize,
    /// The SPF result, once checked.
    pub spf: Option<Box<crate::auth::SpfCheck>>,
}

/// Counters for the session's closing log event.
#[derive(Debug, Default, Clone)]
pub struct SessionStats {
    pub messages: u32,
    pub jobs: u32,
    pub duplicates: u32,
    pub refusals: u32,
}

pub struct Session {
    pub(super) cfg: Arc<SessionConfig>,
    pub(super) gate: Arc<Gate>,
    pub(super) peer: Peer,
    pub(super) helo: Option<String>,
    pub(super) proto: &'static str,
    pub(super) fwd: Forwarded,
    pub(super) txn: Option<Txn>,
    pub(super) state: State,
    errors: u32,
    discarding_line: bool,
    /// Length of the trace headers prepended to the current message.
    pub(super) trace_len: usize,
    /// An event a command handler raised (an authentication check).
    pub(super) pending_event: Option<Event>,
    /// Why the server closed the session (for its log event).
    close_cause: Option<&'static str>,
    pub(super) rejects: Vec<RejectEntry>,
    pub(super) stats: SessionStats,
    tls_policy: TlsPolicy,
    /// The connection's TLS, once established.
    tls: Option<TlsInfo>,
}

impl Session {
    pub fn new(cfg: Arc<SessionConfig>, gate: Arc<Gate>, peer: Peer) -> Session {
        Session {
            cfg,
            gate,
            peer,
            helo: None,
            proto: "SMTP",
            fwd: Forwarded::default(),
            txn: None,
            state: State::Command,
            errors: 0,
            discarding_line: false,
            pending_event: None,
            trace_len: 0,
            close_cause: None,
            rejects: Vec::new(),
            stats: SessionStats::default(),
            tls_policy: TlsPolicy::default(),
            tls: None,
        }
    }

    pub fn greeting(&self, out: &mut Vec<u8>) {
        let kind = if self.cfg.lmtp { "LMTP" } else { "ESMTP" };
        Reply::new(220, "", format!("{} {kind} mailgate", self.cfg.hostname)).write_to(out);
    }

    /// Errors counted toward `max_errors` so far.
    pub fn errors(&self) -> u32 {
        self.errors
    }

    /// Part of a command line was consumed (an over-long line being thrown away).
    pub fn mid_line(&self) -> bool {
        self.discarding_line
    }

    pub fn in_data(&self) -> bool {
        matches!(self.state, State::Data(_))
    }

    /// Bytes of the message received so far, while in DATA.
    pub fn data_received(&self) -> Option<u64> {
        match &self.state {
            State::Data(rx) => Some(rx.received()),
            _ => None,
        }
    }

    /// The size of the message being received when `input` may end it (it holds a line
    /// `.`) and that size is at least `at_least`, else None. The end of DATA parses, checks
    /// and stores the message: the driver runs that off its async workers for large messages.
    /// The size is compared first, so small messages cost no second pass over the input.
    pub fn may_end_message(&self, input: &[u8], at_least: u64) -> Option<u64> {
        let State::Data(rx) = &self.state else { return None };
        let size = rx.received().saturating_add(input.len() as u64);
        // Partial lines stay in the input, so the final `.` line is whole in it.
        let ends = || input.starts_with(b".\r\n") || memchr::memmem::find(input, b"\n.\r\n").is_some();
        (size >= at_least && ends()).then_some(size)
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// Why the session closed itself: quit, too_many_errors, timeout, shutdown.
    pub fn close_cause(&self) -> Option<&'static str> {
        self.close_cause
    }

    pub fn stats(&self) -> &SessionStats {
        &self.stats
    }

    pub fn helo(&self) -> &str {
        self.helo.as_deref().unwrap_or("")
    }

    /// Reject-log entries produced since the last call.
    pub fn take_rejects(&mut self) -> Vec<RejectEntry> {
        std::mem::take(&mut self.rejects)
    }

    /// Consumes input, appending replies to `out`. Returns how many bytes were consumed and
    /// what to do next. Bytes not consumed must be offered again with more input appended.
    pub fn process(&mut self, input: &[u8], out: &mut Vec<u8>) -> (usize, Event) {
        let mut pos = 0;
        loop {
            match &mut self.state {
                State::Closed => return (pos, Event::Close),
                State::WaitStore(_) | State::WaitVerify => return (pos, Event::NeedInput),
                // Nothing pipelined after STARTTLS may be executed: all of it is consumed here.
                State::WaitTls => return (input.len(), Event::StartTls { discarded: input.len() - pos }),
                State::Data(rx) => match rx.feed(&input[pos..]) {
                    DataProgress::More { consumed } => return (pos + consumed, Event::NeedInput),
                    DataProgress::Done { consumed } => {
                        pos += consumed;
                        if let Some(event) = self.end_of_data(out) {
                            return (pos, event);
                        }
                    }
                },
                State::Command => {
                    let rest = &input[pos..];
                    let Some(off) = memchr::memchr(b'\n', rest) else {
                        if rest.len() > MAX_PARAM_LINE {
                            self.discarding_line = true;
                            return (input.len(), Event::NeedInput);
                        }
                        return (pos, Event::NeedInput);
                    };
                    let line = &rest[..=off];
                    pos += off + 1;
                    if std::mem::take(&mut self.discarding_line) {
                        self.bad(out, Reason::LineTooLong, Reply::new(500, "5.5.2", "Error: line too long"));
                    } else {
                        self.command(line, out);
                        if let Some(event) = self.pending_event.take() {
                            return (pos, event);
                        }
                    }
                }
            }
        }
    }

    /// The stage the session is in, for the reject log.
    pub(super) fn stage(&self) -> Stage {
        match (&self.state, &self.txn) {
            (State::Data(_) | State::WaitStore(_), _) => Stage::Data,
            (State::WaitVerify, Some(t)) if t.rcpts.is_empty() => Stage::Mail,
            (State::WaitVerify, _) => Stage::Data,
            (_, Some(t)) if !t.rcpts.is_empty() || t.refused_rcpts > 0 => Stage::Rcpt,
            (_, Some(_)) => Stage::Mail,
            _ if self.helo.is_some() => Stage::Helo,
            _ => Stage::Connect,
        }
    }

    fn command(&mut self, line: &[u8], out: &mut Vec<u8>) {
        let n = line.len();
        let crlf = n >= 2 && line[n - 2] == b'\r';
        let content = &line[..if crlf { n - 2 } else { n - 1 }];
        if !crlf || content.contains(&b'\r') {
            let what = if crlf { "<CR>" } else { "<LF>" };
            self.bad(out, Reason::BareLf, Reply::new(500, "5.5.2", format!("Error: bare {what} received")));
            return;
        }
        let verb_end = content.iter().position(|b| *b == b' ').unwrap_or(content.len());
        let verb = &content[..verb_end];
        let limit = if verb.eq_ignore_ascii_case(b"MAIL") || verb.eq_ignore_ascii_case(b"RCPT") {
            MAX_PARAM_LINE
        } else {
            MAX_COMMAND_LINE
        };
        if n > limit {
            self.bad(out, Reason::LineTooLong, Reply::new(500, "5.5.2", "Error: line too long"));
            return;
        }
        if self.tls_policy.require
            && self.tls.is_none()
            && !ALLOWED_BEFORE_TLS.iter().any(|v| verb.eq_ignore_ascii_case(v))
        {
            self.bad(out, Reason::TlsRequired, Reply::new(530, "5.7.0", "Must issue a STARTTLS command first"));
            return;
        }
        if verb.eq_ignore_ascii_case(b"XFORWARD") {
            let args = String::from_utf8_lossy(&content[verb_end..]).into_owned();
            self.xforward(&args, out);
            return;
        }
        match Request::parse(&mut line.iter()) {
            Ok(req) => self.request(req.into_owned(), out),
            Err(e) => {
                let reply = match e {
                    ParseError::UnknownCommand => Reply::new(500, "5.5.2", "Error: command not recognized"),
                    ParseError::InvalidSenderAddress => Reply::new(501, "5.1.7", "Bad sender address syntax"),
                    ParseError::InvalidRecipientAddress => Reply::new(501, "5.1.3", "Bad recipient address syntax"),
                    ParseError::SyntaxError { syntax } => Reply::new(501, "5.5.4", format!("Syntax: {syntax}")),
                    ParseError::InvalidParameter { param } => {
                        Reply::new(501, "5.5.4", format!("Invalid parameter {}", echoed(param)))
                    }
                    ParseError::UnsupportedParameter { param } => {
                        Reply::new(555, "5.5.4", format!("Unsupported parameter {}", echoed(&param)))
                    }
                    _ => Reply::new(500, "5.5.2", "Error: bad syntax"),
                };
                self.bad(out, Reason::BadCommand, reply);
            }
        }
    }

    fn request(&mut self, req: Request<String>, out: &mut Vec<u8>) {
        match req {
            Request::Ehlo { host } if !self.cfg.lmtp => self.hello(host, "ESMTP", out),
            Request::Helo { host } if !self.cfg.lmtp => self.hello(host, "SMTP", out),
            Request::Lhlo { host } if self.cfg.lmtp => self.hello(host, "LMTP", out),
            Request::Ehlo { .. } | Request::Helo { .. } => {
                self.bad(out, Reason::BadCommand, Reply::new(500, "5.5.1", "Error: this is an LMTP server, use LHLO"))
            }
            Request::Lhlo { .. } => {
                self.bad(out, Reason::BadCommand, Reply::new(500, "5.5.1", "Error: LHLO is for LMTP, use EHLO"))
            }
            Request::Mail { from } => self.mail(from, out),
            Request::Rcpt { to } => self.rcpt(to, out),
            Request::Data => self.data(out),
            Request::Rset => {
                self.reset();
                Reply::new(250, "2.0.0", "Ok").write_to(out);
            }
            Request::Noop { .. } => Reply::new(250, "2.0.0", "Ok").write_to(out),
            Request::StartTls if self.tls.is_some() => {
                self.bad(out, Reason::BadCommand, Reply::new(503, "5.5.1", "Error: TLS already active"))
            }
            Request::StartTls if self.tls_policy.starttls && !self.cfg.lmtp => self.starttls(out),
            Request::Quit => {
                Reply::new(221, "2.0.0", "Bye").write_to(out);
                self.close_cause = Some("quit");
                self.state = State::Closed;
            }
            Request::Vrfy { .. } => {
                Reply::new(252, "2.5.2", "Cannot VRFY user, but will accept message and attempt delivery").write_to(out)
            }
            Request::Help { .. } => {
                let starttls = if self.offers_starttls() { " STARTTLS" } else { "" };
                let text =
                    format!("mailgate: EHLO HELO LHLO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP XFORWARD{starttls}");
                Reply::new(214, "2.0.0", text).write_to(out)
            }
            other => {
                let text = format!("Error: {} not implemented", other.name());
                self.bad(out, Reason::BadCommand, Reply::new(502, "5.5.1", text));
            }
        }
    }

    fn hello(&mut self, host: String, proto: &'static str, out: &mut Vec<u8>) {
        if host.trim().is_empty() {
            self.bad(out, Reason::BadCommand, Reply::new(501, "5.5.4", "Syntax: EHLO hostname"));
            return;
        }
        self.reset();
        self.helo = Some(trace::sanitize(&host));
        self.proto = proto;
        if proto == "SMTP" {
            Reply::new(250, "", self.cfg.hostname.clone()).write_to(out);
            return;
        }
        let mut lines = vec![
            self.cfg.hostname.clone(),
            "PIPELINING".into(),
            format!("SIZE {}", self.cfg.max_message_size),
            "8BITMIME".into(),
            "SMTPUTF8".into(),
            "ENHANCEDSTATUSCODES".into(),
        ];
        if self.offers_starttls() {
            lines.push("STARTTLS".into());
        }
        if self.peer.trusted {
            lines.push(format!("XFORWARD {}", xforward::ATTRIBUTES));
        }
        let last = lines.len() - 1;
        for (i, l) in lines.iter().enumerate() {
            let sep = if i == last { ' ' } else { '-' };
            out.extend_from_slice(format!("250{sep}{l}\r\n").as_bytes());
        }
    }

    fn xforward(&mut self, args: &str, out: &mut Vec<u8>) {
        if !self.peer.trusted {
            let reply = Reply::new(550, "5.7.0", "Error: insufficient authorization");
            self.log(Action::Reject, &reply, Reason::UntrustedXforward, Vec::new());
            self.note_error(out, reply);
            return;
        }
        if self.txn.is_some() {
            self.bad(out, Reason::BadCommand, Reply::new(503, "5.5.1", "Error: MAIL transaction in progress"));
            return;
        }
        match xforward::apply(&mut self.fwd, args) {
            Ok(()) => Reply::new(250, "2.0.0", "Ok").write_to(out),
            Err(e) => self.bad(out, Reason::BadCommand, Reply::new(501, "5.5.4", format!("Error: {e}"))),
        }
    }

    fn mail(&mut self, from: smtp_proto::MailFrom<String>, out: &mut Vec<u8>) {
        if self.helo.is_none() {
            let text = if self.cfg.lmtp { "Error: send LHLO first" } else { "Error: send HELO/EHLO first" };
            self.bad(out, Reason::BadCommand, Reply::new(503, "5.5.1", text));
            return;
        }
        if self.txn.is_some() {
            self.bad(out, Reason::BadCommand, Reply::new(503, "5.5.1", "Error: nested MAIL command"));
            return;
        }
        let mail_from = from.address;
        if from.size as u64 > self.cfg.max_message_size {
            let reply = Reply::new(552, "5.3.4", "Error: message size exceeds fixed limit");
            self.txn = Some(Txn { mail_from, rcpts: Vec::new(), refused_rcpts: 0, spf: None });
            self.log(Action::Reject, &reply, Reason::TooLarge, Vec::new());
            self.txn = None;
            reply.write_to(out);
            return;
        }
        let verdict = self.gate.check_mail(&mail_from);
        self.txn = Some(Txn { mail_from: mail_from.clone(), rcpts: Vec::new(), refused_rcpts: 0, spf: None });
        if let Verdict::Reject { reason, reply } = verdict
            && !self.cfg.after_queue
        {
            self.log(Action::Reject, &reply, reason, Vec::new());
            self.txn = None;
            self.note_error(out, reply);
            return;
        }
        self.after_mail(mail_from, out);
    }

    fn rcpt(&mut self, to: smtp_proto::RcptTo<String>, out: &mut Vec<u8>) {
        let Some(txn) = &self.txn else {
            self.bad(out, Reason::BadCommand, Reply::new(503, "5.5.1", "Error: need MAIL command"));
            return;
        };
        if txn.rcpts.len() >= self.cfg.max_recipients {
            let reply = Reply::new(452, "4.5.3", "Error: too many recipients");
            self.log(Action::Tempfail, &reply, Reason::TooManyRecipients, vec![to.address]);
            reply.write_to(out);
            return;
        }
        let mut target = self.gate.check_rcpt(&to.address);
        // SPF is decided per recipient: its mailbox and route may set their own policy.
        if let (Ok(t), Some(spf)) = (&target, txn.spf.as_deref()) {
            let v = self.gate.spf_at_rcpt(t, spf);
            if v != Verdict::Accept {
                target = Err(v);
            }
        }
        match target {
            // A 4xx never bounces, so after-queue listeners answer it at once too: the
            // client (Postfix) keeps the message and retries this recipient.
            Err(Verdict::Tempfail { reason, reply }) => {
                if let Some(t) = &mut self.txn {
                    t.refused_rcpts += 1;
                }
                self.log(Action::Tempfail, &reply, reason, vec![to.address]);
                reply.write_to(out);
            }
            Err(Verdict::Reject { reason, reply }) if !self.cfg.after_queue => {
                if let Some(t) = &mut self.txn {
                    t.refused_rcpts += 1;
                }
                self.log(Action::Reject, &reply, reason, vec![to.address]);
                self.note_error(out, reply);
            }
            target => {
                if let Some(t) = &mut self.txn {
                    t.rcpts.push(Recipient { address: to.address, target });
                }
                Reply::new(250, "2.1.5", "Ok").write_to(out);
            }
        }
    }

    fn data(&mut self, out: &mut Vec<u8>) {
        let Some(txn) = &self.txn else {
            self.bad(out, Reason::BadCommand, Reply::new(503, "5.5.1", "Error: need MAIL command"));
            return;
        };
        if txn.rcpts.is_empty() {
            let reply = if txn.refused_rcpts > 0 {
                Reply::new(554, "5.5.1", "Error: no valid recipients")
            } else {
                Reply::new(503, "5.5.1", "Error: need RCPT command")
            };
            self.bad(out, Reason::BadCommand, reply);
            return;
        }
        let header = trace::headers(self);
        self.trace_len = header.len();
        let limits = self.gate.content_limits();
        let rx = DataReceiver::new(header, self.cfg.max_message_size, self.cfg.max_line_length)
            .with_header_limits(limits.max_header_size, limits.max_header_lines);
        self.state = State::Data(Box::new(rx));
        Reply::new(354, "", "End data with <CR><LF>.<CR><LF>").write_to(out);
    }

    /// Ends the transaction: envelope and XFORWARD attributes are per transaction.
    pub(super) fn reset(&mut self) {
        self.txn = None;
        self.fwd = Forwarded::default();
    }

    /// A protocol error: reply, log, count; too many and the session ends.
    fn bad(&mut self, out: &mut Vec<u8>, reason: Reason, reply: Reply) {
        self.log(Action::Reject, &reply, reason, Vec::new());
        self.note_error(out, reply);
    }

    fn note_error(&mut self, out: &mut Vec<u8>, reply: Reply) {
        reply.write_to(out);
        self.errors += 1;
        if self.errors >= self.cfg.max_errors {
            let reply = Reply::new(421, "4.7.0", format!("{} Error: too many errors", self.cfg.hostname));
            self.log(Action::Tempfail, &reply, Reason::TooManyErrors, Vec::new());
            self.close_cause = Some("too_many_errors");
            reply.write_to(out);
            self.state = State::Closed;
        }
    }

    /// The command or data timeout (or the session deadline) expired.
    pub fn timeout(&mut self, out: &mut Vec<u8>) {
        let reply = Reply::new(421, "4.4.2", format!("{} Error: timeout exceeded", self.cfg.hostname));
        self.log(Action::Tempfail, &reply, Reason::Timeout, Vec::new());
        reply.write_to(out);
        self.close_cause = Some("timeout");
        self.state = State::Closed;
    }

    /// The server is stopping: say so and close.
    pub fn shutdown(&mut self, out: &mut Vec<u8>) {
        let reply = Reply::new(421, "4.3.2", format!("{} Service shutting down", self.cfg.hostname));
        if self.txn.is_some() {
            self.log(Action::Tempfail, &reply, Reason::Shutdown, Vec::new());
        }
        reply.write_to(out);
        self.close_cause = Some("shutdown");
        self.state = State::Closed;
    }
}

/// A client's parameter quoted in a reply: escaped and cut to 40 characters, so that the reply
/// line stays within RFC 5321's 512 octets whatever the client sent.
pub(super) fn echoed(param: &str) -> String {
    const MAX: usize = 40;
    let mut shown: String = param.chars().take(MAX).collect();
    if param.chars().nth(MAX).is_some() {
        shown.push_str("...");
    }
    format!("{shown:?}")
}

//! End of DATA: turn the gate's decision into the replies the client hears (one for SMTP, one
//! per accepted recipient for LMTP), the store request for the spool, and reject-log entries.

use super::data::DataFault;
use super::session::{Event, Session, State};
use crate::auth::MessageCheck;
use crate::gate;
use crate::gate::auth as auth_policy;
use crate::gate::message::{self, MessageContext, RcptOutcome};
use crate::gate::mime::Violation;
use crate::gate::verdict::{Reason, Reply, Verdict};
use crate::job::{Envelope, MessageInfo};
use crate::reject::{Action, Stage};
use crate::spool::{NewJob, StoreOutcome};

/// A message the driver must store, then report with [`Session::stored`].
#[derive(Debug)]
pub struct StoreRequest {
    pub raw: Vec<u8>,
    pub jobs: Vec<NewJob>,
}

/// What the session remembers while the spool works.
pub struct Pending {
    per_rcpt: Vec<RcptOutcome>,
    rcpts: Vec<String>,
    info: MessageInfo,
}

impl Session {
    /// Called when `CRLF.CRLF` was seen. Returns a check or store request for the driver, or
    /// None when the replies are already written (refused or discarded).
    pub(super) fn end_of_data(&mut self, out: &mut Vec<u8>) -> Option<Event> {
        let State::Data(rx) = std::mem::replace(&mut self.state, State::Command) else {
            return None;
        };
        self.stats.messages += 1;
        let raw = match rx.finish() {
            Ok(raw) => raw,
            Err(DataFault::HeaderTooLarge { lines }) => {
                let (reason, reply) = gate::content_refusal(header_violation(lines));
                self.refuse_content(Verdict::Reject { reason, reply }, out);
                return None;
            }
            Err(fault) => {
                let reply = fault_reply(fault);
                self.log_entry(
                    Stage::Data,
                    Action::Reject,
                    &reply,
                    fault.reason(),
                    Vec::new(),
                    String::new(),
                    String::new(),
                );
                for _ in 0..self.reply_count() {
                    reply.write_to(out);
                }
                self.reset();
                return None;
            }
        };
        // Before anything parses the message (sender authentication, the gate, the reply text):
        // the size of its header and its MIME structure, as the client sent it.
        let verdict = self.gate.check_structure(raw.get(self.trace_len..).unwrap_or_default());
        if verdict != Verdict::Accept {
            self.refuse_content(verdict, out);
            return None;
        }
        match self.request_message_check(raw) {
            Ok(event) => Some(event),
            Err(raw) => self.decide_and_store(raw, None, out).map(Event::Store),
        }
    }

    /// A message over a content limit (`header_too_large`, `mime_too_complex`): refused like a
    /// protocol fault in the session; after the queue a discard, as Postfix has no such limits
    /// to refuse it first and would bounce our refusal to a possibly forged sender.
    fn refuse_content(&mut self, verdict: Verdict, out: &mut Vec<u8>) {
        let verdict = if self.cfg.after_queue { verdict.after_queue() } else { verdict };
        let (action, reply, reason) = verdict_reply(&verdict);
        self.log_entry(Stage::Data, action, &reply, reason, Vec::new(), String::new(), String::new());
        for _ in 0..self.reply_count() {
            reply.write_to(out);
        }
        self.reset();
    }

    /// Decides the message (with the authentication results, when checks ran) and returns what
    /// to store; refusals and discards are answered and logged here.
    pub(super) fn decide_and_store(
        &mut self,
        mut raw: Vec<u8>,
        check: Option<MessageCheck>,
        out: &mut Vec<u8>,
    ) -> Option<StoreRequest> {
        let envelope = self.envelope();
        let spf = self.txn.as_ref().and_then(|t| t.spf.clone());
        let auth = match (&check, spf.as_deref()) {
            (Some(msg), Some(spf)) => Some(message::AuthInput { spf, msg, ip: spf.ip }),
            _ => None,
        };
        // The stored form, before anything is hashed: forged Authentication-Results claiming our
        // authserv-id go (RFC 8601 section 5), also when no check ran; ours goes right after the
        // trace headers mailgate prepended. The checks already ran on the message as received.
        if let Some(clean) = auth_policy::strip_forged_results(&raw, &self.cfg.hostname) {
            raw = clean;
        }
        if let Some(a) = &auth {
            let header = auth_policy::results_header(&self.cfg.hostname, a.spf, a.msg, a.ip);
            let at = self.trace_len.min(raw.len());
            raw.splice(at..at, header.into_bytes());
        }
        let rcpts = self.txn.as_ref().map(|t| t.rcpts.clone()).unwrap_or_default();
        let ctx = MessageContext {
            envelope: &envelope,
            raw: &raw,
            authserv_id: &self.cfg.hostname,
            after_queue: self.cfg.after_queue,
            auth,
        };
        let mut decision = message::decide(&self.gate, &ctx, &rcpts);
        // SMTP has one reply for the whole message: if any recipient failed only temporarily,
        // defer the whole message (the client retries and every recipient is decided again)
        // rather than answer 250 and lose that recipient.
        if !self.cfg.lmtp {
            let transient = decision.per_rcpt.iter().find_map(|o| match o {
                RcptOutcome::Refused(v @ Verdict::Tempfail { .. }) => Some(v.clone()),
                _ => None,
            });
            if let Some(v) = transient {
                decision.jobs.clear();
                decision.per_rcpt = rcpts.iter().map(|_| RcptOutcome::Refused(v.clone())).collect();
            }
        }
        let pending = Pending {
            per_rcpt: decision.per_rcpt,
            rcpts: rcpts.iter().map(|r| r.address.clone()).collect(),
            info: decision.info,
        };
        if decision.jobs.is_empty() {
            self.finish(pending, &[], out);
            return None;
        }
        self.state = State::WaitStore(Box::new(pending));
        Some(StoreRequest { raw, jobs: decision.jobs })
    }

    /// The spool's answer for the pending message.
    pub fn stored(&mut self, result: Result<Vec<StoreOutcome>, String>, out: &mut Vec<u8>) {
        let State::WaitStore(pending) = std::mem::replace(&mut self.state, State::Command) else {
            return;
        };
        match result {
            Ok(outcomes) => self.finish(*pending, &outcomes, out),
            Err(err) => {
                tracing::error!(error = %err, "spool could not store a message");
                let reply = Reply::new(451, "4.3.0", "Error: queue file write error, try again later");
                let (mid, subject) = (pending.info.message_id.clone(), pending.info.subject.clone());
                self.log_entry(Stage::Data, Action::Tempfail, &reply, Reason::SpoolError, Vec::new(), mid, subject);
                for _ in 0..self.reply_count() {
                    reply.write_to(out);
                }
                self.reset();
            }
        }
    }

    /// Writes the replies for every recipient and logs refusals, discards and duplicates.
    fn finish(&mut self, pending: Pending, outcomes: &[StoreOutcome], out: &mut Vec<u8>) {
        let Pending { per_rcpt, rcpts, info } = pending;
        let mut replies = Vec::with_capacity(per_rcpt.len());
        let mut ids = Vec::new();
        let mut dup_ids = Vec::new();
        // (action, reply, reason, recipients): one log entry per distinct refusal
        let mut logs: Vec<(Action, Reply, Reason, Vec<String>)> = Vec::new();
        let mut note = |action, reply: &Reply, reason, rcpt: &str| match logs
            .iter_mut()
            .find(|(a, r, re, _)| *a == action && r == reply && *re == reason)
        {
            Some(entry) => entry.3.push(rcpt.to_string()),
            None => logs.push((action, reply.clone(), reason, vec![rcpt.to_string()])),
        };
        for (outcome, rcpt) in per_rcpt.iter().zip(&rcpts) {
            let reply = match outcome {
                RcptOutcome::Job(i) => match outcomes.get(*i) {
                    Some(StoreOutcome::Stored { id }) => {
                        push_unique(&mut ids, id);
                        Reply::new(250, "2.0.0", format!("Ok: queued as {id}"))
                    }
                    Some(StoreOutcome::Duplicate { id }) => {
                        let reply = Reply::new(250, "2.0.0", format!("Ok: duplicate of {id}, not queued again"));
                        note(Action::Discard, &reply, Reason::Duplicate, rcpt);
                        push_unique(&mut dup_ids, id);
                        reply
                    }
                    None => Reply::new(451, "4.3.0", "Error: internal error, try again later"),
                },
                RcptOutcome::Refused(v) => {
                    let (action, reply, reason) = verdict_reply(v);
                    note(action, &reply, reason, rcpt);
                    reply
                }
            };
            replies.push(reply);
        }
        self.stats.jobs += outcomes.iter().filter(|o| matches!(o, StoreOutcome::Stored { .. })).count() as u32;
        self.stats.duplicates += outcomes.iter().filter(|o| matches!(o, StoreOutcome::Duplicate { .. })).count() as u32;
        // SMTP has one reply after DATA: when some recipients were stored the client heard 250,
        // so recipients refused at this point were discarded, not refused.
        let one_reply_ok = !self.cfg.lmtp && (!ids.is_empty() || !dup_ids.is_empty());
        for (action, reply, reason, rcpt_to) in logs {
            let (action, reply) = if one_reply_ok && action != Action::Discard {
                let text = format!("Ok: discarded ({}: {})", reason.as_str(), reply.text);
                (Action::Discard, Reply::new(250, "2.0.0", text))
            } else {
                (action, reply)
            };
            self.log_entry(Stage::Data, action, &reply, reason, rcpt_to, info.message_id.clone(), info.subject.clone());
        }
        if self.cfg.lmtp {
            for r in &replies {
                r.write_to(out);
            }
        } else if !ids.is_empty() {
            Reply::new(250, "2.0.0", format!("Ok: queued as {}", ids.join(" "))).write_to(out);
        } else if !dup_ids.is_empty() {
            let text = format!("Ok: duplicate of {}, not queued again", dup_ids.join(" "));
            Reply::new(250, "2.0.0", text).write_to(out);
        } else if let Some(first) = replies.into_iter().next() {
            first.write_to(out);
        }
        self.reset();
    }

    /// LMTP answers once per accepted recipient; SMTP once.
    fn reply_count(&self) -> usize {
        if self.cfg.lmtp { self.txn.as_ref().map(|t| t.rcpts.len()).unwrap_or(1).max(1) } else { 1 }
    }

    /// The envelope as the job records it (recipients are added per job).
    fn envelope(&self) -> Envelope {
        Envelope {
            mail_from: self.txn.as_ref().map(|t| t.mail_from.clone()).unwrap_or_default(),
            rcpt_to: Vec::new(),
            client_ip: self.client_ip(),
            client_name: self.fwd.name.clone().unwrap_or_default(),
            helo: self.client_helo(),
            protocol: self.fwd.proto.clone().unwrap_or_else(|| self.proto.to_string()),
            queue_id: self.fwd.ident.clone().unwrap_or_default(),
            tls: self.client_tls().cloned(),
        }
    }
}

fn push_unique(ids: &mut Vec<String>, id: &str) {
    if !ids.iter().any(|i| i == id) {
        ids.push(id.to_string());
    }
}

fn verdict_reply(v: &Verdict) -> (Action, Reply, Reason) {
    match v {
        Verdict::Reject { reason, reply } => (Action::Reject, reply.clone(), *reason),
        Verdict::Tempfail { reason, reply } => (Action::Tempfail, reply.clone(), *reason),
        Verdict::Discard { reason, text } => {
            let reply = Reply::new(250, "2.0.0", format!("Ok: discarded ({}: {text})", reason.as_str()));
            (Action::Discard, reply, *reason)
        }
        Verdict::Accept => (Action::Discard, Reply::new(250, "2.0.0", "Ok"), Reason::BadCommand),
    }
}

fn fault_reply(fault: DataFault) -> Reply {
    match fault {
        DataFault::Bare { cr: false } => Reply::new(550, "5.5.2", "Error: bare <LF> received"),
        DataFault::Bare { cr: true } => Reply::new(550, "5.5.2", "Error: bare <CR> received"),
        DataFault::LineTooLong => Reply::new(500, "5.5.2", "Error: text line too long"),
        DataFault::TooLarge => Reply::new(552, "5.3.4", "Error: message file too big"),
        DataFault::HeaderTooLarge { lines } => gate::content_refusal(header_violation(lines)).1,
    }
}

fn header_violation(lines: bool) -> Violation {
    if lines { Violation::HeaderLines } else { Violation::HeaderSize }
}

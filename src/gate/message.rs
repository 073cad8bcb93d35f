//! The end-of-DATA decision: which recipients become which jobs, which are refused or
//! discarded, and the de-duplication keys. Pure: no I/O, the caller stores the jobs.

use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use super::auth;
use super::verdict::Verdict;
use super::{Gate, Target};
use crate::auth::{MessageCheck, SpfCheck};
use crate::job::{AuthResults, Envelope, Job, JobState, KeySource, MessageInfo, Route};
use crate::spool::{NewJob, dedup_key_content, dedup_key_ident};

/// A recipient accepted at RCPT.
#[derive(Debug, Clone)]
pub struct Recipient {
    pub address: String,
    /// Where it goes, or the refusal decided at RCPT that an after-queue listener turned into
    /// a discard (the recipient was accepted, but nothing is stored for it).
    pub target: Result<Target, Verdict>,
}

/// What happens to one recipient.
#[derive(Debug, Clone, PartialEq)]
pub enum RcptOutcome {
    /// Stored as part of `jobs[i]`.
    Job(usize),
    /// Refused (in-session) or discarded (after-queue, or whole-message discard).
    Refused(Verdict),
}

#[derive(Debug)]
pub struct Decision {
    pub jobs: Vec<NewJob>,
    /// One per recipient, in RCPT order.
    pub per_rcpt: Vec<RcptOutcome>,
    pub info: MessageInfo,
}

impl Decision {
    /// The verdict of the first refused recipient, if every recipient was refused.
    pub fn all_refused(&self) -> Option<&Verdict> {
        if self.jobs.is_empty() {
            self.per_rcpt.iter().find_map(|o| match o {
                RcptOutcome::Refused(v) => Some(v),
                RcptOutcome::Job(_) => None,
            })
        } else {
            None
        }
    }
}

/// The context of one message.
pub struct MessageContext<'a> {
    /// Envelope without recipients (they are added per job).
    pub envelope: &'a Envelope,
    pub raw: &'a [u8],
    pub authserv_id: &'a str,
    pub after_queue: bool,
    /// Sender-authentication results, when the checks ran.
    pub auth: Option<AuthInput<'a>>,
}

/// What the authentication checks found for the message.
#[derive(Clone, Copy)]
pub struct AuthInput<'a> {
    pub spf: &'a SpfCheck,
    pub msg: &'a MessageCheck,
    pub ip: std::net::IpAddr,
}

/// Decides a whole message. In after-queue mode every refusal becomes a discard.
pub fn decide(gate: &Gate, ctx: &MessageContext<'_>, rcpts: &[Recipient]) -> Decision {
    let parsed = mail_parser::MessageParser::default().parse_headers(ctx.raw);
    let empty = mail_parser::Message::default();
    let msg = parsed.as_ref().unwrap_or(&empty);
    let info = Gate::message_info(msg, ctx.raw);
    let body_hash: [u8; 32] = Sha256::digest(body_of(ctx.raw)).into();
    let adjust = |v: Verdict| if ctx.after_queue { v.after_queue() } else { v };

    let whole = gate.check_message(&ctx.envelope.mail_from, msg);
    if whole != Verdict::Accept {
        let v = adjust(whole);
        return Decision {
            jobs: Vec::new(),
            per_rcpt: rcpts.iter().map(|_| RcptOutcome::Refused(v.clone())).collect(),
            info,
        };
    }

    let mut jobs: Vec<NewJob> = Vec::new();
    let mut per_rcpt = Vec::with_capacity(rcpts.len());
    for rcpt in rcpts {
        let target = match &rcpt.target {
            Ok(t) => t,
            Err(v) => {
                per_rcpt.push(RcptOutcome::Refused(adjust(v.clone())));
                continue;
            }
        };
        let resolved = match (&target.key, target.route) {
            (Some(key), Some(route)) => Ok((key.clone(), KeySource::Rcpt, route)),
            _ => gate.resolve_from_headers(target, msg),
        };
        let (key, source, route) = match resolved {
            Ok(r) => r,
            Err(v) => {
                per_rcpt.push(RcptOutcome::Refused(adjust(v)));
                continue;
            }
        };
        // Sender authentication, with this recipient's mailbox and route policy.
        let mut arc_override = false;
        if let Some(a) = &ctx.auth {
            let d = auth::message_verdict(&gate.auth_policy(&target.mailbox, Some(route)), a.spf, a.msg);
            if d.verdict != Verdict::Accept {
                per_rcpt.push(RcptOutcome::Refused(adjust(d.verdict)));
                continue;
            }
            arc_override = d.arc_override;
        }
        let existing = jobs.iter().position(|j| j.job.mailbox == target.mailbox && j.job.key == key);
        let index = match existing {
            Some(i) => i,
            None => {
                jobs.push(new_job(ctx, &info, &target.mailbox, key, source, route, &body_hash));
                jobs.len() - 1
            }
        };
        let job = &mut jobs[index];
        if let Some(a) = &ctx.auth {
            job.job.auth = auth::job_results(ctx.authserv_id, a.spf, a.msg, arc_override);
        }
        job.job.envelope.rcpt_to.push(rcpt.address.clone());
        if !ctx.envelope.queue_id.is_empty() {
            let (mailbox, key) = (&job.job.mailbox, &job.job.key);
            job.dedup_keys.push(dedup_key_ident(&ctx.envelope.queue_id, &rcpt.address, mailbox, key, &body_hash));
        }
        per_rcpt.push(RcptOutcome::Job(index));
    }
    // `reply_text` is not worked out here: it is derived from the raw message when a job is
    // handed out (spool/present.rs, the webhook), off the path to the 250.
    Decision { jobs, per_rcpt, info }
}

/// The body: everything after the first empty line (a header-only parse does not say where the
/// body starts). The de-duplication hash covers it alone, so trace and Authentication-Results
/// headers added on the way (a retry through Postfix gets a new Received) do not matter.
fn body_of(raw: &[u8]) -> &[u8] {
    if raw.starts_with(b"\r\n") {
        return &raw[2..];
    }
    match memchr::memmem::find(raw, b"\r\n\r\n") {
        Some(i) => &raw[i + 4..],
        None => &[],
    }
}

fn new_job(
    ctx: &MessageContext<'_>,
    info: &MessageInfo,
    mailbox: &str,
    key: String,
    key_source: KeySource,
    route: Route,
    body_hash: &[u8; 32],
) -> NewJob {
    let mut dedup_keys = Vec::new();
    if !info.message_id.is_empty() {
        dedup_keys.push(dedup_key_content(&info.message_id, mailbox, &key, body_hash));
    }
    let mut envelope = ctx.envelope.clone();
    envelope.rcpt_to.clear();
    NewJob {
        job: Job {
            id: String::new(),
            state: JobState::Ready,
            received_at: OffsetDateTime::now_utc(),
            attempts: 0,
            mailbox: mailbox.to_string(),
            key,
            key_source,
            route,
            envelope,
            message: info.clone(),
            auth: AuthResults::not_checked(ctx.authserv_id),
            reply_text: None,
            lease_until: None,
            updated_at: None,
            last_error: None,
            next_attempt_at: None,
        },
        dedup_keys,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{MailboxConfig, PolicyConfig, RouteSet};
    use crate::gate::verdict::Reason;

    const REPLY: &str = "0123456789abcdef0123456789abcdef";

    fn gate() -> Gate {
        let mb = MailboxConfig {
            name: "incoming".into(),
            address: "incoming+%{key}@in.example.com".into(),
            reply_host: Some("gitlab.example.com".into()),
            routes: RouteSet::Gitlab,
            auth: None,
        };
        Gate::new(&[mb], &PolicyConfig::default()).unwrap()
    }

    fn rcpt(g: &Gate, a: &str) -> Recipient {
        Recipient { address: a.into(), target: g.check_rcpt(a) }
    }

    fn ctx<'a>(env: &'a Envelope, raw: &'a [u8], after_queue: bool) -> MessageContext<'a> {
        MessageContext { envelope: env, raw, authserv_id: "mx.test", after_queue, auth: None }
    }

    #[test]
    fn the_dedup_hash_covers_the_body_only() {
        assert_eq!(body_of(b"A: 1\r\nB: 2\r\n\r\nbody\r\n"), b"body\r\n");
        assert_eq!(body_of(b"\r\nbody"), b"body");
        assert_eq!(body_of(b"A: 1\r\n"), b"");
        let g = gate();
        let env = Envelope { mail_from: "a@example.org".into(), ..Default::default() };
        let a = format!("incoming+{REPLY}@in.example.com");
        let key_of = |raw: &[u8]| decide(&g, &ctx(&env, raw, false), &[rcpt(&g, &a)]).jobs[0].dedup_keys[0].clone();
        let one = key_of(b"Message-ID: <m@x>\r\n\r\nbody one\r\n");
        assert_eq!(one, key_of(b"Received: from elsewhere\r\nMessage-ID: <m@x>\r\n\r\nbody one\r\n"));
        assert_ne!(one, key_of(b"Message-ID: <m@x>\r\n\r\nbody two\r\n"));
    }

    #[test]
    fn one_job_per_mailbox_and_key() {
        let g = gate();
        let env = Envelope { mail_from: "a@example.org".into(), queue_id: "Q1".into(), ..Default::default() };
        let raw = b"Message-ID: <m1@x>\r\nSubject: hi\r\n\r\nbody\r\n";
        let a = format!("incoming+{REPLY}@in.example.com");
        let b = format!("incoming+{REPLY}@IN.example.com");
        let d = decide(&g, &ctx(&env, raw, false), &[rcpt(&g, &a), rcpt(&g, &b)]);
        assert_eq!(d.jobs.len(), 1);
        assert_eq!(d.per_rcpt, vec![RcptOutcome::Job(0), RcptOutcome::Job(0)]);
        let job = &d.jobs[0];
        assert_eq!(job.job.envelope.rcpt_to.len(), 2);
        assert_eq!(job.job.route, Route::Reply);
        assert_eq!(job.job.key_source, KeySource::Rcpt);
        assert_eq!(job.dedup_keys.len(), 3, "content key + one ident key per recipient");
        assert_eq!(d.info.message_id, "m1@x");
    }

    #[test]
    fn base_address_takes_key_from_references() {
        let g = gate();
        let env = Envelope { mail_from: "a@example.org".into(), ..Default::default() };
        let raw = format!("References: <reply-{REPLY}@gitlab.example.com>\r\nSubject: re\r\n\r\nok\r\n");
        let d = decide(&g, &ctx(&env, raw.as_bytes(), false), &[rcpt(&g, "incoming@in.example.com")]);
        assert_eq!(d.jobs.len(), 1);
        assert_eq!(d.jobs[0].job.key, REPLY);
        assert_eq!(d.jobs[0].job.key_source, KeySource::References);
    }

    #[test]
    fn base_address_without_key_is_refused_or_discarded() {
        let g = gate();
        let env = Envelope { mail_from: "a@example.org".into(), ..Default::default() };
        let raw = b"Subject: no key\r\n\r\nbody\r\n";
        let r = [rcpt(&g, "incoming@in.example.com")];
        let d = decide(&g, &ctx(&env, raw, false), &r);
        assert!(matches!(d.all_refused(), Some(Verdict::Reject { reason: Reason::UnknownKey, .. })));
        let d = decide(&g, &ctx(&env, raw, true), &r);
        assert!(matches!(d.all_refused(), Some(Verdict::Discard { reason: Reason::UnknownKey, .. })));
    }

    #[test]
    fn auto_replies_are_discarded_for_everyone() {
        let g = gate();
        let env = Envelope { mail_from: "a@example.org".into(), ..Default::default() };
        let raw = b"Auto-Submitted: auto-replied\r\nSubject: away\r\n\r\nbody\r\n";
        let a = format!("incoming+{REPLY}@in.example.com");
        let d = decide(&g, &ctx(&env, raw, false), &[rcpt(&g, &a)]);
        assert!(matches!(d.all_refused(), Some(Verdict::Discard { reason: Reason::AutoSubmitted, .. })));
    }

    #[test]
    fn rcpt_time_refusal_stays_with_its_recipient() {
        let g = gate();
        let env = Envelope { mail_from: "a@example.org".into(), ..Default::default() };
        let good = format!("incoming+{REPLY}@in.example.com");
        let bad = Recipient {
            address: "incoming+nope@in.example.com".into(),
            target: g.check_rcpt("incoming+nope@in.example.com"),
        };
        assert!(bad.target.is_err());
        let d = decide(&g, &ctx(&env, b"Subject: x\r\n\r\nb\r\n", true), &[rcpt(&g, &good), bad]);
        assert_eq!(d.jobs.len(), 1);
        assert!(matches!(d.per_rcpt[1], RcptOutcome::Refused(Verdict::Discard { reason: Reason::UnknownKey, .. })));
    }
}

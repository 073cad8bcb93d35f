//! Every decision, shared by all frontends. No I/O.

pub mod address;
pub mod auth;
pub mod autoreply;
pub mod headers;
pub mod message;
pub mod mime;
pub mod route;
pub mod verdict;

use sha2::{Digest, Sha256};

use crate::config::{MailboxConfig, PolicyConfig, RefusalAction};
use crate::job::{KeySource, MessageInfo, Route};
use address::Template;
use verdict::{Reason, Verdict};

#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("mailbox {name}: {msg}")]
    BadTemplate { name: String, msg: String },
    #[error("mailbox {name}: address {address} is already the address of mailbox {other}")]
    DuplicateAddress { name: String, other: String, address: String },
}

/// Where an accepted recipient goes. `key` None: the key comes from the headers at the end of
/// DATA (the recipient was a dedicated address, or a keyed mailbox's base address).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub mailbox: String,
    pub key: Option<String>,
    pub route: Option<Route>,
}

/// The mailboxes and the policy: every decision of the RCPT, MAIL and end-of-DATA stages.
#[derive(Debug, Clone)]
pub struct Gate {
    templates: Vec<Template>,
    policy: PolicyConfig,
    /// `[auth]`, and each mailbox's partial override (sender authentication policy).
    auth: crate::config::AuthConfig,
    mailbox_auth: std::collections::HashMap<String, crate::config::MailboxAuthConfig>,
    /// Header and MIME limits of a message (`[limits]`).
    limits: mime::ContentLimits,
}

fn unknown_key(text: &str) -> Verdict {
    Verdict::reject(Reason::UnknownKey, 550, "5.1.1", text)
}

fn unknown_address() -> Verdict {
    Verdict::reject(Reason::UnknownAddress, 550, "5.1.1", "no such mailbox here")
}

/// The refusal of a message over a content limit.
pub fn content_refusal(v: mime::Violation) -> (Reason, verdict::Reply) {
    use mime::Violation::*;
    let (reason, code, enhanced, text) = match v {
        HeaderSize => (Reason::HeaderTooLarge, 552, "5.3.4", "Error: message header too big"),
        HeaderLines => (Reason::HeaderTooLarge, 552, "5.3.4", "Error: too many header lines"),
        MimeDepth => (Reason::MimeTooComplex, 554, "5.6.0", "Error: MIME nesting too deep"),
        MimeParts => (Reason::MimeTooComplex, 554, "5.6.0", "Error: too many MIME parts"),
        MimeBoundaries => (Reason::MimeTooComplex, 554, "5.6.0", "Error: MIME boundaries missing"),
    };
    (reason, verdict::Reply::new(code, enhanced, text))
}

const NULL_SENDER: &str = "mail from the null sender is not accepted";

/// A policy refusal: 550 5.7.1, or a discard (say 250, store nothing, log it).
fn refuse(action: RefusalAction, reason: Reason, text: &str) -> Verdict {
    match action {
        RefusalAction::Discard => Verdict::Discard { reason, text: text.into() },
        RefusalAction::Reject => Verdict::reject(reason, 550, "5.7.1", text),
    }
}

impl Gate {
    pub fn new(mailboxes: &[MailboxConfig], policy: &PolicyConfig) -> Result<Gate, GateError> {
        let mut templates: Vec<Template> = Vec::with_capacity(mailboxes.len());
        for m in mailboxes {
            let t = Template::parse(m)?;
            // Two mailboxes must not claim the same base or dedicated address either
            // (`incoming+%{key}@h` and `incoming-%{key}@h` both have `incoming@h`): the first
            // would silently take all its mail.
            let base = t.base_address();
            let shares_base = |o: &&Template| !base.starts_with('@') && o.is_base(&base);
            if let Some(other) = templates.iter().find(|o| o.same_addresses(&t) || shares_base(o)) {
                return Err(GateError::DuplicateAddress {
                    name: t.mailbox.clone(),
                    other: other.mailbox.clone(),
                    address: t.address(),
                });
            }
            templates.push(t);
        }
        let mailbox_auth = mailboxes.iter().filter_map(|m| Some((m.name.clone(), m.auth.clone()?))).collect();
        let limits = mime::ContentLimits::DEFAULT;
        Ok(Gate { templates, policy: policy.clone(), auth: Default::default(), mailbox_auth, limits })
    }

    /// Sets the header and MIME limits (default: [`mime::ContentLimits::DEFAULT`]).
    pub fn with_limits(mut self, limits: mime::ContentLimits) -> Gate {
        self.limits = limits;
        self
    }

    pub fn content_limits(&self) -> &mime::ContentLimits {
        &self.limits
    }

    /// End of DATA, before any parser reads the message: the size of its header and its MIME
    /// structure. `raw` is the message as the client sent it.
    pub fn check_structure(&self, raw: &[u8]) -> Verdict {
        match mime::check(raw, &self.limits) {
            Ok(_) => Verdict::Accept,
            Err(v) => {
                let (reason, reply) = content_refusal(v);
                Verdict::Reject { reason, reply }
            }
        }
    }

    /// Sets `[auth]`, the global sender-authentication settings the mailboxes override.
    pub fn with_auth(mut self, auth: &crate::config::AuthConfig) -> Gate {
        self.auth = auth.clone();
        self
    }

    /// The effective sender-authentication policy for a mailbox and (when known) a route.
    pub fn auth_policy(&self, mailbox: &str, route: Option<crate::job::Route>) -> auth::AuthPolicy {
        auth::policy_for(&self.auth, self.mailbox_auth.get(mailbox), route)
    }

    /// Whether any mailbox or route needs sender authentication (`what` picks the test:
    /// `AuthPolicy::needs_checks` for any check at all, `AuthPolicy::needs_spf` for SPF).
    pub fn any_policy(&self, what: fn(&auth::AuthPolicy) -> bool) -> bool {
        use crate::job::Route::*;
        let routes = [Reply, NewIssue, NoteOnIssuable, Unsubscribe, NewMergeRequest, ServiceDesk, Key, Unknown];
        self.templates
            .iter()
            .any(|t| routes.iter().map(|r| Some(*r)).chain([None]).any(|r| what(&self.auth_policy(&t.mailbox, r))))
    }

    /// RCPT-time SPF decision for an accepted recipient (its mailbox's and route's policy).
    pub fn spf_at_rcpt(&self, target: &Target, spf: &crate::auth::SpfCheck) -> Verdict {
        auth::spf_verdict_at_rcpt(&self.auth_policy(&target.mailbox, target.route), spf)
    }

    /// RCPT stage. An exact address (dedicated, or a keyed mailbox's base address) wins over a
    /// template match; among keyed templates the first (config order) whose key classifies as a
    /// known route wins.
    pub fn check_rcpt(&self, rcpt: &str) -> Result<Target, Verdict> {
        if let Some(t) = self.templates.iter().find(|t| t.is_base(rcpt)) {
            return Ok(Target { mailbox: t.mailbox.clone(), key: None, route: None });
        }
        let mut matched = false;
        for t in &self.templates {
            if let Some(key) = t.key_of(rcpt) {
                let route = route::classify(&key, t.routes, &t.mailbox);
                if route != Route::Unknown {
                    return Ok(Target { mailbox: t.mailbox.clone(), key: Some(key), route: Some(route) });
                }
                matched = true;
            }
        }
        Err(if matched { unknown_key("unknown key in the recipient address") } else { unknown_address() })
    }

    /// MAIL stage: the null sender is refused here when the policy says reject.
    pub fn check_mail(&self, mail_from: &str) -> Verdict {
        if autoreply::is_null_sender(mail_from) && self.policy.null_sender == RefusalAction::Reject {
            refuse(RefusalAction::Reject, Reason::NullSender, NULL_SENDER)
        } else {
            Verdict::Accept
        }
    }

    /// End of DATA, the whole message: auto-generated mail, then the null sender.
    pub fn check_message(&self, mail_from: &str, msg: &mail_parser::Message<'_>) -> Verdict {
        if autoreply::is_auto_submitted(msg) {
            let text = "auto-submitted messages are not accepted";
            return refuse(self.policy.auto_submitted, Reason::AutoSubmitted, text);
        }
        if autoreply::is_null_sender(mail_from) {
            return refuse(self.policy.null_sender, Reason::NullSender, NULL_SENDER);
        }
        Verdict::Accept
    }

    /// End of DATA, for a target whose key comes from the headers (GitLab's order, first hit
    /// wins). A target that already has a key is returned as is, with [`KeySource::Rcpt`].
    pub fn resolve_from_headers(
        &self,
        target: &Target,
        msg: &mail_parser::Message<'_>,
    ) -> Result<(String, KeySource, Route), Verdict> {
        let Some(t) = self.template(&target.mailbox) else {
            return Err(unknown_address());
        };
        if let Some(key) = &target.key {
            let route = target.route.unwrap_or_else(|| route::classify(key, t.routes, &t.mailbox));
            return Ok((key.clone(), KeySource::Rcpt, route));
        }
        let Some((key, source)) = headers::find_key(t, msg) else {
            return Err(unknown_key("no key in the recipient or the headers"));
        };
        match route::classify(&key, t.routes, &t.mailbox) {
            Route::Unknown => Err(unknown_key("unknown key in the headers")),
            route => Ok((key, source, route)),
        }
    }

    /// A few facts about the message for the job record: the first Message-ID (without `<>`),
    /// Subject and From address (address only) headers; size and SHA-256 of `raw`.
    pub fn message_info(msg: &mail_parser::Message<'_>, raw: &[u8]) -> MessageInfo {
        use mail_parser::HeaderValue;
        let text = |name: &str| match headers::first(msg, name) {
            Some(HeaderValue::Text(s)) => s.trim().to_string(),
            Some(HeaderValue::TextList(list)) => list.first().map(|s| s.trim().to_string()).unwrap_or_default(),
            _ => String::new(),
        };
        let from = match headers::first(msg, "From") {
            Some(HeaderValue::Address(a)) => a.iter().find_map(|a| a.address.as_deref()).unwrap_or_default(),
            _ => "",
        };
        MessageInfo {
            message_id: text("Message-ID"),
            subject: text("Subject"),
            from: from.to_string(),
            size: raw.len() as u64,
            sha256: hex::encode(Sha256::digest(raw)),
        }
    }

    /// The mailboxes' templates, in config order (for `mailgate check`).
    pub fn mailboxes(&self) -> impl Iterator<Item = &Template> {
        self.templates.iter()
    }

    /// The template of the mailbox named `name`.
    pub fn template(&self, name: &str) -> Option<&Template> {
        self.templates.iter().find(|t| t.mailbox == name)
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn two_mailboxes_cannot_share_a_base_address() {
        let mb = |name: &str, address: &str| MailboxConfig {
            name: name.into(),
            address: address.into(),
            reply_host: None,
            routes: crate::config::RouteSet::Gitlab,
            auth: None,
        };
        let policy = PolicyConfig::default();
        let plus_and_minus = [mb("a", "incoming+%{key}@h.example"), mb("b", "incoming-%{key}@h.example")];
        assert!(matches!(Gate::new(&plus_and_minus, &policy), Err(GateError::DuplicateAddress { .. })));
        let keyed_and_dedicated = [mb("a", "incoming+%{key}@h.example"), mb("b", "incoming@H.example")];
        assert!(matches!(Gate::new(&keyed_and_dedicated, &policy), Err(GateError::DuplicateAddress { .. })));
        let distinct = [mb("a", "incoming+%{key}@h.example"), mb("b", "desk+%{key}@h.example")];
        assert!(Gate::new(&distinct, &policy).is_ok());
    }

    use super::*;
    use crate::config::RouteSet;
    use mail_parser::MessageParser;

    const HEX: &str = "0123456789abcdef0123456789abcdef";

    fn mb(name: &str, address: &str, routes: RouteSet) -> MailboxConfig {
        let (name, address) = (name.into(), address.into());
        MailboxConfig { name, address, reply_host: None, routes, auth: None }
    }

    fn gate(policy: PolicyConfig) -> Gate {
        let gl = RouteSet::Gitlab;
        let mailboxes = [
            mb("incoming", "incoming+%{key}@in.example", gl),
            mb("service_desk", "contact-%{key}@desk.example", gl),
            mb("bot", "bot@in.example", gl),
            mb("any", "any+%{key}@in.example", RouteSet::Any),
        ];
        Gate::new(&mailboxes, &policy).unwrap()
    }

    fn target(mailbox: &str, key: Option<&str>, route: Option<Route>) -> Target {
        Target { mailbox: mailbox.into(), key: key.map(Into::into), route }
    }

    /// (reason, code, enhanced) of a reject; (reason, 250, "") of a discard.
    fn outcome(v: &Verdict) -> Option<(Reason, u16, &'static str)> {
        match v {
            Verdict::Reject { reason, reply } => Some((*reason, reply.code, reply.enhanced)),
            Verdict::Discard { reason, .. } => Some((*reason, 250, "")),
            _ => None,
        }
    }

    fn parse(raw: &str) -> mail_parser::Message<'_> {
        MessageParser::default().parse(raw.as_bytes()).unwrap()
    }

    #[test]
    fn rcpt_keyed_base_dedicated_unknown() {
        let g = gate(PolicyConfig::default());
        let ok = |rcpt: &str| g.check_rcpt(rcpt).unwrap();
        let reply = Some(Route::Reply);
        assert_eq!(ok(&format!("<incoming+{HEX}@IN.example>")), target("incoming", Some(HEX), reply));
        assert_eq!(ok("incoming@in.example"), target("incoming", None, None));
        assert_eq!(ok("bot@in.example"), target("bot", None, None));
        assert_eq!(ok("contact@desk.example"), target("service_desk", None, None));
        let sd = target("service_desk", Some("gitlab-org-gitlab-key"), Some(Route::ServiceDesk));
        assert_eq!(ok("contact-gitlab-org-gitlab-key@desk.example"), sd);
        assert_eq!(ok("any+hello@in.example"), target("any", Some("hello"), Some(Route::Key)));
        let e = g.check_rcpt("incoming+hello@in.example").unwrap_err();
        assert_eq!(outcome(&e), Some((Reason::UnknownKey, 550, "5.1.1")));
        for unknown in ["nobody@in.example", "incoming+x@other.example", "Incoming+x@in.example", "", "<>"] {
            let e = g.check_rcpt(unknown).unwrap_err();
            assert_eq!(outcome(&e), Some((Reason::UnknownAddress, 550, "5.1.1")), "{unknown}");
        }
    }

    #[test]
    fn exact_addresses_win_over_catch_all_templates() {
        let mailboxes = [mb("all", "%{key}@h.example", RouteSet::Gitlab), mb("bot", "bot@h.example", RouteSet::Gitlab)];
        let g = Gate::new(&mailboxes, &PolicyConfig::default()).unwrap();
        assert_eq!(g.check_rcpt("bot@h.example"), Ok(target("bot", None, None)));
        let all = target("all", Some(HEX), Some(Route::Reply));
        assert_eq!(g.check_rcpt(&format!("{HEX}@h.example")), Ok(all));
    }

    #[test]
    fn bad_configs() {
        let p = PolicyConfig::default();
        let e = Gate::new(&[mb("a", "a+%{key}", RouteSet::Gitlab)], &p).unwrap_err();
        assert!(matches!(e, GateError::BadTemplate { .. }), "{e}");
        let twice = [mb("a", "in+%{key}@h.example", RouteSet::Gitlab), mb("b", "in+%{key}@H.example", RouteSet::Any)];
        let e = Gate::new(&twice, &p).unwrap_err();
        assert!(matches!(e, GateError::DuplicateAddress { .. }), "{e}");
        let g = gate(p);
        let names: Vec<_> = g.mailboxes().map(|t| t.mailbox.as_str()).collect();
        assert_eq!(names, ["incoming", "service_desk", "bot", "any"]);
    }

    #[test]
    fn mail_stage_null_sender() {
        let discard = gate(PolicyConfig::default());
        assert_eq!(discard.check_mail(""), Verdict::Accept);
        assert_eq!(discard.check_mail("a@b.example"), Verdict::Accept);
        let reject = gate(PolicyConfig { null_sender: RefusalAction::Reject, ..PolicyConfig::default() });
        assert_eq!(outcome(&reject.check_mail("<>")), Some((Reason::NullSender, 550, "5.7.1")));
        assert_eq!(outcome(&reject.check_mail("")), Some((Reason::NullSender, 550, "5.7.1")));
        assert_eq!(reject.check_mail("a@b.example"), Verdict::Accept);
    }

    #[test]
    fn message_checks() {
        let plain = parse("From: a@b.example\r\nSubject: s\r\n\r\nbody\r\n");
        let auto = parse("From: a@b.example\r\nAuto-Submitted: auto-replied\r\n\r\nbody\r\n");
        let no = parse("From: a@b.example\r\nAuto-Submitted: no\r\nX-Autoreply: YES\r\n\r\nbody\r\n");
        let xa = parse("From: a@b.example\r\nX-Autoreply: yes\r\n\r\nbody\r\n");
        let g = gate(PolicyConfig::default());
        let check = |from: &str, msg: &mail_parser::Message<'_>| outcome(&g.check_message(from, msg));
        assert_eq!(check("a@b.example", &plain), None);
        assert_eq!(check("a@b.example", &no), None);
        assert_eq!(check("a@b.example", &auto), Some((Reason::AutoSubmitted, 250, "")));
        assert_eq!(check("a@b.example", &xa), Some((Reason::AutoSubmitted, 250, "")));
        assert_eq!(check("", &plain), Some((Reason::NullSender, 250, "")));
        // auto-submitted is checked first
        assert_eq!(check("<>", &auto), Some((Reason::AutoSubmitted, 250, "")));
        assert_eq!(g.check_message("a@b.example", &mail_parser::Message::default()), Verdict::Accept);
        let reject = RefusalAction::Reject;
        let strict = gate(PolicyConfig { auto_submitted: reject, null_sender: reject });
        let check = |from: &str, msg: &mail_parser::Message<'_>| outcome(&strict.check_message(from, msg));
        assert_eq!(check("a@b.example", &auto), Some((Reason::AutoSubmitted, 550, "5.7.1")));
        assert_eq!(check("<>", &plain), Some((Reason::NullSender, 550, "5.7.1")));
    }

    #[test]
    fn resolve_from_headers() {
        let g = gate(PolicyConfig::default());
        let resolve = |t: &Target, raw: &str| g.resolve_from_headers(t, &parse(raw));
        let base = target("incoming", None, None);
        let raw = format!("To: incoming@in.example\r\nDelivered-To: incoming+{HEX}@in.example\r\n\r\nx\r\n");
        assert_eq!(resolve(&base, &raw), Ok((HEX.to_string(), KeySource::DeliveredTo, Route::Reply)));
        // dedicated: only References; reply_host defaults to the domain
        let bot = target("bot", None, None);
        let raw = format!("To: incoming+x@in.example\r\nReferences: <a@b> <reply-{HEX}@in.example>\r\n\r\nx\r\n");
        assert_eq!(resolve(&bot, &raw), Ok((HEX.to_string(), KeySource::References, Route::Reply)));
        // first hit wins even when its key is unknown
        let raw = format!("To: incoming+hello@in.example\r\nDelivered-To: incoming+{HEX}@in.example\r\n\r\nx\r\n");
        let e = resolve(&base, &raw).unwrap_err();
        assert_eq!(outcome(&e), Some((Reason::UnknownKey, 550, "5.1.1")));
        // a target with a key keeps it
        let keyed = target("incoming", Some(HEX), Some(Route::Reply));
        assert_eq!(resolve(&keyed, &raw), Ok((HEX.to_string(), KeySource::Rcpt, Route::Reply)));
        // no key anywhere
        let none = Verdict::reject(Reason::UnknownKey, 550, "5.1.1", "no key in the recipient or the headers");
        assert_eq!(resolve(&base, "To: incoming@in.example\r\n\r\nx\r\n").unwrap_err(), none);
        assert_eq!(g.resolve_from_headers(&base, &mail_parser::Message::default()).unwrap_err(), none);
        let e = resolve(&target("gone", None, None), "To: x@y\r\n\r\n").unwrap_err();
        assert_eq!(outcome(&e), Some((Reason::UnknownAddress, 550, "5.1.1")));
    }

    #[test]
    fn message_info() {
        let raw = "From: \"Foo Bar\" <foo@b.example>, x@y.example\r\nMessage-ID: <m1@b.example>\r\n\
                   Subject: =?utf-8?q?h=C3=A9?=\r\n\r\nbody\r\n";
        let info = Gate::message_info(&parse(raw), raw.as_bytes());
        assert_eq!(
            (info.message_id.as_str(), info.subject.as_str(), info.from.as_str()),
            ("m1@b.example", "hé", "foo@b.example")
        );
        assert_eq!(info.size, raw.len() as u64);
        assert_eq!(info.sha256, hex::encode(Sha256::digest(raw.as_bytes())));
        assert_eq!(info.sha256.len(), 64);
        let empty = Gate::message_info(&parse("X-A: b\r\n\r\n"), b"X-A: b\r\n\r\n");
        assert_eq!((empty.message_id.as_str(), empty.subject.as_str(), empty.from.as_str()), ("", "", ""));
        // mail-parser's own accessors panic on an empty message: ours do not
        assert_eq!(Gate::message_info(&mail_parser::Message::default(), b"").size, 0);
    }
}

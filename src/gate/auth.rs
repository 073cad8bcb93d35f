//! Sender-authentication policy (pure: no I/O, no async): what SPF, DKIM, DMARC and ARC results
//! mean for a recipient, the job's `auth` object and our Authentication-Results header. The
//! checks themselves are in `crate::auth`.
//!
//! Replies: SPF `550 5.7.23` / `451 4.7.24` (RFC 7372); DKIM `550 5.7.20` / `451 4.7.20`;
//! DMARC `550 5.7.1` / `451 4.7.1` (RFC 7489 section 7.3). A From header with no address or
//! several addresses is refused as `dmarc_fail` (`550 5.7.1`, RFC 7489 section 6.6.1) unless
//! `dmarc = "off"`. Temporary DNS errors are `auth_temperror`.
//!
//! ARC: a chain that passes, sealed last by a trusted sealer (`trusted_arc_sealers`), stands in
//! for a failed (or temperror) SPF or DMARC; it never stands in for DKIM `require-pass` or for
//! the From rule. At RCPT there is no ARC yet, so where sealers are trusted SPF is decided at the
//! end of DATA only. When the exception is used, [`AuthDecision::arc_override`] is set and the
//! job's `auth.header` ends with a comment naming the sealer.
//!
//! DMARC follows mail-auth 0.13.3, which implements RFC 9989 (DMARCbis): `pct=` is ignored and
//! `t=y` lowers the policy by one level (`reject` -> `quarantine` -> `none`).

mod strip;

use std::net::IpAddr;

use mail_auth::AuthenticationResults;

use crate::auth::{AuthResult, Identity, MessageCheck, Policy, SpfCheck};
use crate::config::{AuthConfig, AuthOverride, DkimMode, DmarcMode, MailboxAuthConfig, SpfMode};
use crate::gate::verdict::{Reason, Verdict};
use crate::job::{AuthResults, Route};
pub use strip::strip_forged_results;

/// The effective settings for one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthPolicy {
    pub spf: SpfMode,
    pub dkim: DkimMode,
    pub dmarc: DmarcMode,
    /// Lower case, without a trailing dot.
    pub trusted_arc_sealers: Vec<String>,
}

impl AuthPolicy {
    fn apply(&mut self, o: &AuthOverride) {
        self.spf = o.spf.unwrap_or(self.spf);
        self.dkim = o.dkim.unwrap_or(self.dkim);
        self.dmarc = o.dmarc.unwrap_or(self.dmarc);
        if let Some(list) = &o.trusted_arc_sealers {
            self.trusted_arc_sealers = list.iter().map(|s| normalize_domain(s)).collect();
        }
    }

    /// SPF must be evaluated: for its own sake, or because DMARC uses it.
    pub fn needs_spf(&self) -> bool {
        self.spf != SpfMode::Off || self.dmarc != DmarcMode::Off
    }

    /// Whether any check runs at all (`dkim = "off"` with SPF and DMARC off: none).
    pub fn needs_checks(&self) -> bool {
        self.needs_spf() || self.dkim != DkimMode::Off
    }

    /// Some ARC sealer is trusted, so an SPF failure may still be rescued at the end of DATA.
    pub fn arc_rescue(&self) -> bool {
        !self.trusted_arc_sealers.is_empty()
    }

    /// The ARC chain passes and its last hop is a trusted sealer.
    /// A passing chain whose last sealer is trusted *and* whose last hop vouches that the
    /// original authenticated (an aligned pass in its ARC-Authentication-Results): a trusted
    /// forwarder that relays a forgery does not launder it.
    pub fn trusted_arc_pass(&self, m: &MessageCheck) -> bool {
        m.arc.result == AuthResult::Pass
            && m.arc.last_hop_vouches
            && m.arc.last_sealer().is_some_and(|s| self.trusted_arc_sealers.contains(&normalize_domain(s)))
    }
}

fn normalize_domain(s: &str) -> String {
    s.trim().trim_end_matches('.').to_ascii_lowercase()
}

/// Effective settings for a recipient: `[auth]`, then the mailbox's `auth`, then
/// `[auth.routes.ROUTE]`, then the mailbox's `auth.routes.ROUTE` (each set field wins).
/// `route` is `None` while it is not known yet (a dedicated address at RCPT).
pub fn policy_for(global: &AuthConfig, mailbox: Option<&MailboxAuthConfig>, route: Option<Route>) -> AuthPolicy {
    let mut p = AuthPolicy {
        spf: global.spf,
        dkim: global.dkim,
        dmarc: global.dmarc,
        trusted_arc_sealers: global.trusted_arc_sealers.iter().map(|s| normalize_domain(s)).collect(),
    };
    if let Some(m) = mailbox {
        p.apply(&m.as_override());
    }
    if let Some(route) = route {
        if let Some(o) = global.routes.get(route) {
            p.apply(o);
        }
        if let Some(o) = mailbox.and_then(|m| m.routes.get(route)) {
            p.apply(o);
        }
    }
    p
}

/// The refusal SPF alone calls for, ARC aside.
fn spf_refusal(p: &AuthPolicy, spf: &SpfCheck) -> Option<Verdict> {
    let refuse_soft = match p.spf {
        SpfMode::Off | SpfMode::Record => return None,
        SpfMode::RejectFail => false,
        SpfMode::RejectSoftfail => true,
    };
    let (domain, ip) = (&spf.domain, spf.ip);
    match spf.result {
        AuthResult::Fail => Some(Verdict::reject(
            Reason::SpfFail,
            550,
            "5.7.23",
            format!("SPF check failed: {domain} does not designate {ip} as permitted sender"),
        )),
        AuthResult::SoftFail if refuse_soft => Some(Verdict::reject(
            Reason::SpfFail,
            550,
            "5.7.23",
            format!("SPF check failed: {domain} does not designate {ip} as permitted sender (softfail)"),
        )),
        AuthResult::TempError => Some(Verdict::tempfail(
            Reason::AuthTemperror,
            451,
            "4.7.24",
            format!("SPF check for {domain}: temporary DNS error, try again later"),
        )),
        _ => None,
    }
}

/// RCPT time: the SPF refusal, when it is final. With trusted ARC sealers the decision waits for
/// [`message_verdict`] (Accept here). Before the route is known, call it with the policy of
/// `policy_for(.., None)` or defer to the end of DATA.
pub fn spf_verdict_at_rcpt(p: &AuthPolicy, spf: &SpfCheck) -> Verdict {
    match spf_refusal(p, spf) {
        Some(v) if !p.arc_rescue() => v,
        _ => Verdict::Accept,
    }
}

/// The end-of-DATA decision for one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthDecision {
    pub verdict: Verdict,
    /// A trusted ARC chain stood in for a failed SPF or DMARC and the message is accepted.
    pub arc_override: bool,
    /// Accepted although DMARC failed under `p=quarantine` (`enforce`): the job is marked by
    /// `auth.dmarc = "fail"`, `auth.dmarc_policy = "quarantine"`.
    pub quarantine: bool,
}

/// End of DATA: the whole decision (From count, SPF, DKIM, DMARC, with the ARC exception).
/// A permanent refusal wins over a temporary one; the first in that order is returned.
pub fn message_verdict(p: &AuthPolicy, spf: &SpfCheck, m: &MessageCheck) -> AuthDecision {
    let arc = p.trusted_arc_pass(m);
    let mut waived = false;
    let mut quarantine = false;
    let mut refusals: Vec<Verdict> = Vec::new();
    if p.dmarc != DmarcMode::Off && m.from_count != 1 {
        let text = format!("the message must have exactly one From address, not {}", m.from_count);
        refusals.push(Verdict::reject(Reason::DmarcFail, 550, "5.7.1", text));
    }
    if let Some(v) = spf_refusal(p, spf) {
        if arc { waived = true } else { refusals.push(v) }
    }
    if p.dkim == DkimMode::RequirePass && !m.dkim.iter().any(|s| s.passes()) {
        refusals.push(if m.dkim_result() == AuthResult::TempError {
            Verdict::tempfail(Reason::AuthTemperror, 451, "4.7.20", "DKIM: temporary DNS error, try again later")
        } else {
            Verdict::reject(Reason::DkimFail, 550, "5.7.20", "no passing DKIM signature")
        });
    }
    let d = &m.dmarc;
    let dmarc = match (p.dmarc, d.result) {
        (DmarcMode::Off | DmarcMode::Record, _) | (_, AuthResult::Pass) => None,
        (_, AuthResult::TempError) => Some(Verdict::tempfail(
            Reason::AuthTemperror,
            451,
            "4.7.1",
            format!("DMARC check for {}: temporary DNS error, try again later", d.from_domain),
        )),
        (DmarcMode::Enforce, AuthResult::Fail) if d.policy == Policy::Reject => Some(Verdict::reject(
            Reason::DmarcFail,
            550,
            "5.7.1",
            format!("DMARC policy of {} rejects this message (neither SPF nor DKIM aligned)", d.from_domain),
        )),
        (DmarcMode::Enforce, AuthResult::Fail) if d.policy == Policy::Quarantine => {
            if arc {
                waived = true
            } else {
                quarantine = true
            }
            None
        }
        (DmarcMode::Enforce, _) => None,
        (DmarcMode::RequirePass, r) => Some(Verdict::reject(
            Reason::DmarcFail,
            550,
            "5.7.1",
            format!("DMARC check of the From domain {} did not pass ({r})", d.from_domain),
        )),
    };
    if let Some(v) = dmarc {
        if arc { waived = true } else { refusals.push(v) }
    }
    let verdict = refusals
        .iter()
        .find(|v| matches!(v, Verdict::Reject { .. }))
        .or_else(|| refusals.first())
        .cloned()
        .unwrap_or(Verdict::Accept);
    let accepted = verdict == Verdict::Accept;
    AuthDecision { verdict, arc_override: waived && accepted, quarantine: quarantine && accepted }
}

/// The Authentication-Results value (RFC 8601), folded: `<authserv-id>;\r\n\tspf=…;\r\n\tdkim=…`.
fn results_value(authserv_id: &str, spf: &SpfCheck, m: &MessageCheck, ip: IpAddr) -> String {
    let mut s = if spf.checked {
        let (ar, out) = (AuthenticationResults::new(authserv_id), spf.output());
        match spf.identity {
            Identity::MailFrom => ar.with_spf_mailfrom_result(&out, ip, &spf.mail_from, &spf.helo),
            Identity::Helo => ar.with_spf_ehlo_result(&out, ip, &spf.helo),
        }
        .to_string()
    } else {
        authserv_id.to_string()
    };
    for piece in [&m.pieces.dkim, &m.pieces.dmarc, &m.pieces.arc] {
        s.push_str(piece);
    }
    if s.len() == authserv_id.len() {
        s.push_str("; none");
    }
    s
}

/// The header line to prepend to the stored message (after [`strip_forged_results`]), CRLF
/// included. `ip` is the client IP SPF was checked for.
pub fn results_header(authserv_id: &str, spf: &SpfCheck, m: &MessageCheck, ip: IpAddr) -> String {
    format!("Authentication-Results: {}\r\n", results_value(authserv_id, spf, m, ip))
}

/// The job's `auth` object; `header` is the header value unfolded onto one line. When the ARC
/// exception was used for this job, the header ends with a comment saying so, e.g.
/// `arc=pass smtp.remote-ip=… (trusted ARC sealer lists.example.org stood in for failed SPF/DMARC)`.
pub fn job_results(authserv_id: &str, spf: &SpfCheck, m: &MessageCheck, arc_override: bool) -> AuthResults {
    let spf_word = if spf.checked { spf.result } else { AuthResult::None };
    let mut header = results_value(authserv_id, spf, m, spf.ip).replace("\r\n\t", " ");
    let mut arc_sealer = None;
    if arc_override {
        let sealer: String = m
            .arc
            .last_sealer()
            .unwrap_or_default()
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
            .collect();
        arc_sealer = Some(sealer.clone());
        let sealer = if sealer.is_empty() { String::new() } else { format!(" {sealer}") };
        header.push_str(&format!(" (trusted ARC sealer{sealer} stood in for failed SPF/DMARC)"));
    }
    AuthResults {
        spf: spf_word.as_str().into(),
        dkim: m.dkim_result().as_str().into(),
        dmarc: m.dmarc.result.as_str().into(),
        dmarc_policy: m.dmarc.policy.as_str().into(),
        arc: m.arc.result.as_str().into(),
        header,
        arc_sealer,
    }
}

#[cfg(test)]
mod tests;

//! Postfix policy delegation (SMTPD_POLICY_README): `name=value` lines ending with an empty
//! line; one `action=...` reply per request; persistent connections. At RCPT it returns the
//! gate's verdict, so refusals happen in Postfix's session and never become bounces.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

use std::net::IpAddr;

use crate::auth::{Authenticator, SpfCheck};
use crate::config::SpfMode;
use crate::gate::Gate;
use crate::gate::verdict::Verdict;
use crate::reject::{Action, RejectEntry, Stage};
use crate::spool::Spool;

/// Longest attribute line and largest request accepted.
const MAX_LINE: usize = 4096;
const MAX_REQUEST: usize = 64 * 1024;

/// The SPF check a request needs before it can be decided: the client Postfix saw, and the
/// identities. None when no SPF decision is due (not RCPT, not ours, refused anyway, SPF off
/// for the recipient's mailbox and route, or no usable client address).
pub fn spf_needed(gate: &Gate, attrs: &HashMap<String, String>) -> Option<(IpAddr, String, String)> {
    let get = |k: &str| attrs.get(k).cloned().unwrap_or_default();
    if !is_ours(gate, attrs) || gate.check_mail(&get("sender")) != Verdict::Accept {
        return None;
    }
    let target = gate.check_rcpt(&get("recipient")).ok()?;
    if gate.auth_policy(&target.mailbox, target.route).spf == SpfMode::Off {
        return None;
    }
    let ip = get("client_address").parse().ok()?;
    Some((ip, get("helo_name"), get("sender")))
}

/// An RCPT-stage request for a recipient in one of our mailbox domains or a subdomain of one:
/// Postfix's `relay_domains` covers subdomains too, and mail to them must be refused here
/// (as an unknown address), or Postfix would queue it and bounce it later.
fn is_ours(gate: &Gate, attrs: &HashMap<String, String>) -> bool {
    let get = |k: &str| attrs.get(k).map(String::as_str).unwrap_or_default();
    if get("request") != "smtpd_access_policy" || !get("protocol_state").eq_ignore_ascii_case("RCPT") {
        return false;
    }
    let domain = get("recipient").rsplit_once('@').map(|(_, d)| d.to_ascii_lowercase()).unwrap_or_default();
    let domain = domain.trim_end_matches('.');
    gate.mailboxes().any(|t| domain == t.domain || domain.ends_with(&format!(".{}", t.domain)))
}

/// Decides one policy request, with the SPF result when [`spf_needed`] asked for one. Returns
/// the `action=` value and, for a refusal, the reject-log entry. Recipients outside every
/// mailbox's domain get `DUNNO`: not ours to judge.
pub fn decide(gate: &Gate, attrs: &HashMap<String, String>, spf: Option<&SpfCheck>) -> (String, Option<RejectEntry>) {
    let get = |k: &str| attrs.get(k).cloned().unwrap_or_default();
    if !is_ours(gate, attrs) {
        return ("DUNNO".into(), None);
    }
    let recipient = get("recipient");
    let sender = get("sender");
    let verdict = match gate.check_mail(&sender) {
        Verdict::Accept => match gate.check_rcpt(&recipient) {
            Ok(target) => spf.map(|s| gate.spf_at_rcpt(&target, s)).unwrap_or(Verdict::Accept),
            Err(v) => v,
        },
        v => v,
    };
    let (action, code, enhanced, reason, text, kind) = match verdict {
        Verdict::Accept | Verdict::Discard { .. } => return ("DUNNO".into(), None),
        Verdict::Reject { reason, reply } => {
            let a = format!("{} {} {}", reply.code, reply.enhanced, reply.text);
            (a, reply.code, reply.enhanced, reason, reply.text, Action::Reject)
        }
        Verdict::Tempfail { reason, reply } => {
            let a = format!("DEFER_IF_PERMIT {} {}", reply.enhanced, reply.text);
            (a, 450, reply.enhanced, reason, reply.text, Action::Tempfail)
        }
    };
    let entry = RejectEntry {
        at: time::OffsetDateTime::now_utc(),
        stage: Stage::Rcpt,
        action: kind,
        code,
        enhanced: enhanced.to_string(),
        reason,
        text,
        client_ip: get("client_address"),
        helo: get("helo_name"),
        mail_from: sender,
        rcpt_to: vec![recipient],
        message_id: String::new(),
        subject: String::new(),
        listener: "policy".into(),
        suppressed: 0,
    };
    (action.replace(['\r', '\n'], " "), Some(entry))
}

/// Serves one persistent policy connection until Postfix closes it. `auth` runs SPF where a
/// recipient's policy asks for it (None: every check is off). Counted in
/// `mailgate_sessions_total{listener="policy"}` with how it ended.
pub async fn run<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    gate: Arc<Gate>,
    spool: Spool,
    auth: Option<Authenticator>,
    hostname: String,
    idle: Duration,
) {
    let (outcome, answered) = serve(stream, &gate, &spool, auth.as_ref(), &hostname, idle).await;
    crate::metrics::global().session("policy", outcome);
    tracing::debug!(target: "mailgate::policy", outcome, requests = answered, "policy connection closed");
}

/// The connection's loop; returns how it ended, `quit` (Postfix closed it), `timeout` (idle
/// for `idle`) or `error` (a read or write failed, or a request Postfix would never send), and
/// how many requests it answered.
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    gate: &Gate,
    spool: &Spool,
    auth: Option<&Authenticator>,
    hostname: &str,
    idle: Duration,
) -> (&'static str, u64) {
    let mut answered = 0;
    let mut reader = BufReader::new(stream);
    let mut attrs = HashMap::new();
    let mut size = 0usize;
    let mut line = Vec::with_capacity(256);
    loop {
        line.clear();
        let read =
            tokio::time::timeout(idle, (&mut reader).take(MAX_LINE as u64 + 1).read_until(b'\n', &mut line)).await;
        let n = match read {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "policy connection error");
                return ("error", answered);
            }
            Err(_) => return ("timeout", answered),
        };
        if n == 0 {
            return ("quit", answered);
        }
        if line.last() != Some(&b'\n') {
            tracing::warn!(target: "mailgate::policy", "policy request line too long; closing without an answer");
            return ("error", answered);
        }
        size += n;
        if size > MAX_REQUEST {
            tracing::warn!(target: "mailgate::policy", "policy request too large; closing without an answer");
            return ("error", answered);
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches(['\r', '\n']);
        if !text.is_empty() {
            match text.split_once('=') {
                Some((k, v)) => {
                    attrs.insert(k.to_string(), v.to_string());
                }
                None => {
                    tracing::warn!(target: "mailgate::policy", "malformed policy attribute; closing without an answer");
                    return ("error", answered);
                }
            }
            continue;
        }
        let spf = match (auth, spf_needed(gate, &attrs)) {
            (Some(a), Some((ip, helo, sender))) => Some(a.spf(ip, &helo, &sender, hostname).await),
            _ => None,
        };
        let (action, entry) = decide(gate, &attrs, spf.as_ref());
        if let Some(entry) = entry {
            crate::frontend::log_reject(spool, &entry);
        }
        attrs.clear();
        size = 0;
        let reply = format!("action={action}\n\n");
        if reader.get_mut().write_all(reply.as_bytes()).await.is_err() {
            return ("error", answered);
        }
        answered += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{MailboxConfig, PolicyConfig, RouteSet};

    fn gate() -> Gate {
        let mb = MailboxConfig {
            name: "incoming".into(),
            address: "incoming+%{key}@in.example.com".into(),
            reply_host: None,
            routes: RouteSet::Gitlab,
            auth: None,
        };
        Gate::new(&[mb], &PolicyConfig::default()).unwrap()
    }

    fn req(rcpt: &str) -> HashMap<String, String> {
        [
            ("request", "smtpd_access_policy"),
            ("protocol_state", "RCPT"),
            ("sender", "a@example.org"),
            ("recipient", rcpt),
            ("client_address", "192.0.2.9"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    #[test]
    fn verdicts_map_to_actions() {
        let g = gate();
        let (a, e) = decide(&g, &req("incoming+0123456789abcdef0123456789abcdef@in.example.com"), None);
        assert_eq!(a, "DUNNO");
        assert!(e.is_none());
        let (a, e) = decide(&g, &req("incoming+nokey@in.example.com"), None);
        assert!(a.starts_with("550 5.1.1 "), "{a}");
        let e = e.unwrap();
        assert_eq!(e.reason.as_str(), "unknown_key");
        assert_eq!(e.client_ip, "192.0.2.9");
        assert_eq!(e.listener, "policy");
        let (a, _) = decide(&g, &req("someone@in.example.com"), None);
        assert!(a.starts_with("550 5.1.1"), "{a}");
        let (a, e) = decide(&g, &req("x@sub.in.example.com"), None);
        assert!(a.starts_with("550 5.1.1"), "a subdomain of a mailbox domain is refused: {a}");
        assert_eq!(e.unwrap().reason.as_str(), "unknown_address");
        let (a, _) = decide(&g, &req("user@other.example.net"), None);
        assert_eq!(a, "DUNNO");
    }

    #[test]
    fn spf_failures_are_refused_in_postfix_session() {
        use crate::auth::{AuthResult, SpfCheck};
        let g = gate();
        let good = "incoming+0123456789abcdef0123456789abcdef@in.example.com";
        let r = req(good);
        let (ip, helo, sender) = spf_needed(&g, &r).expect("an SPF decision is due");
        assert_eq!((ip.to_string(), sender.as_str()), ("192.0.2.9".to_string(), "a@example.org"));
        let fail = SpfCheck::new(AuthResult::Fail, ip, &helo, &sender);
        let (a, e) = decide(&g, &r, Some(&fail));
        assert!(a.starts_with("550 5.7.23 "), "{a}");
        assert_eq!(e.unwrap().reason.as_str(), "spf_fail");
        let temp = SpfCheck::new(AuthResult::TempError, ip, &helo, &sender);
        let (a, e) = decide(&g, &r, Some(&temp));
        assert!(a.starts_with("DEFER_IF_PERMIT 4.7.24 "), "{a}");
        assert_eq!(e.unwrap().reason.as_str(), "auth_temperror");
        let pass = SpfCheck::new(AuthResult::Pass, ip, &helo, &sender);
        assert_eq!(decide(&g, &r, Some(&pass)).0, "DUNNO");
        // refused anyway, or not ours: no lookup
        assert!(spf_needed(&g, &req("incoming+nokey@in.example.com")).is_none());
        assert!(spf_needed(&g, &req("user@other.example.net")).is_none());
    }
}

//! Postfix policy delegation (SMTPD_POLICY_README): `name=value` lines ending with an empty
//! line; one `action=...` reply per request; persistent connections. At RCPT it returns the
//! gate's verdict, so refusals happen in Postfix's session and never become bounces.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

use crate::gate::Gate;
use crate::gate::verdict::Verdict;
use crate::reject::{Action, RejectEntry, Stage};
use crate::spool::Spool;

/// Longest attribute line and largest request accepted.
const MAX_LINE: usize = 4096;
const MAX_REQUEST: usize = 64 * 1024;

/// Decides one policy request. Returns the `action=` value and, for a refusal, the reject-log
/// entry. Recipients outside every mailbox's domain get `DUNNO`: not ours to judge.
pub fn decide(gate: &Gate, attrs: &HashMap<String, String>) -> (String, Option<RejectEntry>) {
    let get = |k: &str| attrs.get(k).cloned().unwrap_or_default();
    if get("request") != "smtpd_access_policy" || !get("protocol_state").eq_ignore_ascii_case("RCPT") {
        return ("DUNNO".into(), None);
    }
    let recipient = get("recipient");
    let sender = get("sender");
    let domain = recipient.rsplit_once('@').map(|(_, d)| d.to_ascii_lowercase()).unwrap_or_default();
    if !gate.mailboxes().any(|t| t.domain == domain) {
        return ("DUNNO".into(), None);
    }
    let verdict = match gate.check_mail(&sender) {
        Verdict::Accept => match gate.check_rcpt(&recipient) {
            Ok(_) => Verdict::Accept,
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
    };
    (action.replace(['\r', '\n'], " "), Some(entry))
}

/// Serves one persistent policy connection until Postfix closes it.
pub async fn run<S: AsyncRead + AsyncWrite + Unpin>(stream: S, gate: Arc<Gate>, spool: Spool, idle: Duration) {
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
                return;
            }
            Err(_) => return,
        };
        if n == 0 {
            return;
        }
        if line.last() != Some(&b'\n') {
            tracing::warn!(target: "mailgate::policy", "policy request line too long; closing without an answer");
            return;
        }
        size += n;
        if size > MAX_REQUEST {
            tracing::warn!(target: "mailgate::policy", "policy request too large; closing without an answer");
            return;
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
                    return;
                }
            }
            continue;
        }
        let (action, entry) = decide(&gate, &attrs);
        if let Some(entry) = entry
            && let Err(e) = spool.log_reject(&entry)
        {
            tracing::error!(error = %e, "could not write the reject log");
        }
        attrs.clear();
        size = 0;
        let reply = format!("action={action}\n\n");
        if reader.get_mut().write_all(reply.as_bytes()).await.is_err() {
            return;
        }
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
        let (a, e) = decide(&g, &req("incoming+0123456789abcdef0123456789abcdef@in.example.com"));
        assert_eq!(a, "DUNNO");
        assert!(e.is_none());
        let (a, e) = decide(&g, &req("incoming+nokey@in.example.com"));
        assert!(a.starts_with("550 5.1.1 "), "{a}");
        let e = e.unwrap();
        assert_eq!(e.reason.as_str(), "unknown_key");
        assert_eq!(e.client_ip, "192.0.2.9");
        assert_eq!(e.listener, "policy");
        let (a, _) = decide(&g, &req("someone@in.example.com"));
        assert!(a.starts_with("550 5.1.1"), "{a}");
        let (a, _) = decide(&g, &req("user@other.example.net"));
        assert_eq!(a, "DUNNO");
    }
}

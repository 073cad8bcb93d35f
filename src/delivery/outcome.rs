//! What an attempt's answer means: delivered, try again later, or never (final). Pure rules,
//! one per kind of receiver.

use crate::config::DeliverKind;

/// A failed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Try again after the schedule's wait.
    Retry(String),
    /// The receiver refused the job for good: it goes to `dead` at once.
    Final(String),
    /// Retried like [`Failure::Retry`], but mailgate's or the receiver's configuration is
    /// wrong (a secret GitLab does not accept): logged as an error, because waiting alone
    /// will not fix it.
    Misconfigured(String),
}

impl Failure {
    pub fn message(&self) -> &str {
        match self {
            Failure::Retry(m) | Failure::Final(m) | Failure::Misconfigured(m) => m,
        }
    }
}

/// The meaning of an HTTP status from a mailroom or webhook receiver. `detail` is the start
/// of the answer's body, for the error text.
pub fn http_status(kind: DeliverKind, status: u16, detail: &str) -> Result<(), Failure> {
    if (200..300).contains(&status) {
        return Ok(());
    }
    let detail = if detail.is_empty() { String::new() } else { format!(": {detail}") };
    match (kind, status) {
        // GitLab answers 400 when it will not take the message (too large, say) and mails the
        // sender itself: trying again cannot help.
        (DeliverKind::Mailroom, 400) => Err(Failure::Final(format!("HTTP 400, GitLab refused the message{detail}"))),
        (DeliverKind::Mailroom, 401) => Err(Failure::Misconfigured(format!(
            "HTTP 401: GitLab does not accept the secret, or the mailbox is disabled in GitLab{detail}"
        ))),
        (DeliverKind::Webhook, 408 | 429) => Err(Failure::Retry(format!("HTTP {status}{detail}"))),
        (DeliverKind::Webhook, 400..=499) => Err(Failure::Final(format!("HTTP {status}, refused for good{detail}"))),
        _ => Err(Failure::Retry(format!("HTTP {status}{detail}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mailroom_statuses() {
        let m = |s| http_status(DeliverKind::Mailroom, s, "");
        assert_eq!(m(200), Ok(()));
        assert!(matches!(m(400), Err(Failure::Final(_))));
        for s in [403, 404, 413, 422, 429, 500, 502, 503, 301] {
            assert!(matches!(m(s), Err(Failure::Retry(_))), "{s}");
        }
        assert!(matches!(m(401), Err(Failure::Misconfigured(_))));
        assert!(m(401).unwrap_err().message().contains("secret"));
    }

    #[test]
    fn webhook_statuses() {
        let w = |s| http_status(DeliverKind::Webhook, s, "nope");
        assert_eq!(w(204), Ok(()));
        for s in [400, 401, 403, 404, 410, 413, 422] {
            assert!(matches!(w(s), Err(Failure::Final(_))), "{s}");
        }
        for s in [408, 429, 500, 503, 302] {
            assert!(matches!(w(s), Err(Failure::Retry(_))), "{s}");
        }
        assert_eq!(w(500).unwrap_err().message(), "HTTP 500: nope");
    }
}

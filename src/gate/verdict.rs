//! Verdicts: what the gate decided, with the SMTP reply and a stable reason id.

use serde::{Deserialize, Serialize};

/// Stable reason ids (DESIGN.md). Operators filter the reject log by these; extend, never rename.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    UnknownAddress,
    UnknownKey,
    AutoSubmitted,
    NullSender,
    SpfFail,
    DmarcFail,
    DkimFail,
    AuthTemperror,
    TooLarge,
    TooManyRecipients,
    BareLf,
    BadCommand,
    Timeout,
    Loop,
    Duplicate,
    /// A text or command line over the RFC 5321 limit.
    LineTooLong,
    /// Connection refused by `max_connections` or `max_connections_per_ip`.
    TooManyConnections,
    /// XFORWARD from a peer not in `trusted_peers`.
    UntrustedXforward,
    /// The spool could not store the message (disk full, I/O error).
    SpoolError,
    /// Too many bad commands in one session.
    TooManyErrors,
    /// The server is shutting down.
    Shutdown,
    /// A command before STARTTLS on a `require_tls` listener.
    TlsRequired,
    /// The header is over `max_header_size` or `max_header_lines`.
    HeaderTooLarge,
    /// The MIME structure is over `max_mime_depth` or `max_mime_parts`, or names boundaries
    /// that never come.
    MimeTooComplex,
}

impl Reason {
    pub const ALL: [Reason; 24] = [
        Reason::UnknownAddress,
        Reason::UnknownKey,
        Reason::AutoSubmitted,
        Reason::NullSender,
        Reason::SpfFail,
        Reason::DmarcFail,
        Reason::DkimFail,
        Reason::AuthTemperror,
        Reason::TooLarge,
        Reason::TooManyRecipients,
        Reason::BareLf,
        Reason::BadCommand,
        Reason::Timeout,
        Reason::Loop,
        Reason::Duplicate,
        Reason::LineTooLong,
        Reason::TooManyConnections,
        Reason::UntrustedXforward,
        Reason::SpoolError,
        Reason::TooManyErrors,
        Reason::Shutdown,
        Reason::TlsRequired,
        Reason::HeaderTooLarge,
        Reason::MimeTooComplex,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::UnknownAddress => "unknown_address",
            Reason::UnknownKey => "unknown_key",
            Reason::AutoSubmitted => "auto_submitted",
            Reason::NullSender => "null_sender",
            Reason::SpfFail => "spf_fail",
            Reason::DmarcFail => "dmarc_fail",
            Reason::DkimFail => "dkim_fail",
            Reason::AuthTemperror => "auth_temperror",
            Reason::TooLarge => "too_large",
            Reason::TooManyRecipients => "too_many_recipients",
            Reason::BareLf => "bare_lf",
            Reason::BadCommand => "bad_command",
            Reason::Timeout => "timeout",
            Reason::Loop => "loop",
            Reason::Duplicate => "duplicate",
            Reason::LineTooLong => "line_too_long",
            Reason::TooManyConnections => "too_many_connections",
            Reason::UntrustedXforward => "untrusted_xforward",
            Reason::SpoolError => "spool_error",
            Reason::TooManyErrors => "too_many_errors",
            Reason::Shutdown => "shutdown",
            Reason::TlsRequired => "tls_required",
            Reason::HeaderTooLarge => "header_too_large",
            Reason::MimeTooComplex => "mime_too_complex",
        }
    }
}

impl std::str::FromStr for Reason {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Reason::ALL.iter().copied().find(|r| r.as_str() == s).ok_or_else(|| format!("unknown reason id {s:?}"))
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An SMTP reply: code, enhanced status code and text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub enhanced: &'static str,
    pub text: String,
}

impl Reply {
    pub fn new(code: u16, enhanced: &'static str, text: impl Into<String>) -> Self {
        Reply { code, enhanced, text: text.into() }
    }

    pub fn is_positive(&self) -> bool {
        self.code < 400
    }

    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// Writes the reply as one SMTP line (`CODE ENH TEXT\r\n`). CR and LF in the text are
    /// replaced so that a reply can never be split.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        use std::io::Write;
        let text: String = self.text.chars().map(|c| if c == '\r' || c == '\n' { ' ' } else { c }).collect();
        if self.enhanced.is_empty() {
            let _ = write!(out, "{} {}\r\n", self.code, text);
        } else {
            let _ = write!(out, "{} {} {}\r\n", self.code, self.enhanced, text);
        }
    }
}

/// What the gate decided for a recipient or a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Go on (at RCPT) or store the job (at end of DATA).
    Accept,
    /// Permanent refusal (5xx) with a stable reason.
    Reject { reason: Reason, reply: Reply },
    /// Transient refusal (4xx) with a stable reason.
    Tempfail { reason: Reason, reply: Reply },
    /// Say 250, store nothing, log it.
    Discard { reason: Reason, text: String },
}

impl Verdict {
    pub fn reject(reason: Reason, code: u16, enhanced: &'static str, text: impl Into<String>) -> Self {
        Verdict::Reject { reason, reply: Reply::new(code, enhanced, text) }
    }

    pub fn tempfail(reason: Reason, code: u16, enhanced: &'static str, text: impl Into<String>) -> Self {
        Verdict::Tempfail { reason, reply: Reply::new(code, enhanced, text) }
    }

    pub fn reason(&self) -> Option<Reason> {
        match self {
            Verdict::Accept => None,
            Verdict::Reject { reason, .. } | Verdict::Tempfail { reason, .. } | Verdict::Discard { reason, .. } => {
                Some(*reason)
            }
        }
    }

    /// In after-queue mode (LMTP behind Postfix) a policy refusal must not become a 5xx, since
    /// Postfix would bounce it to a possibly forged sender: it becomes a discard.
    pub fn after_queue(self) -> Self {
        match self {
            Verdict::Reject { reason, reply } => Verdict::Discard { reason, text: reply.text },
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_ids_round_trip() {
        for r in Reason::ALL {
            assert_eq!(r.as_str().parse::<Reason>().unwrap(), r);
            assert_eq!(serde_json::to_value(r).unwrap(), r.as_str());
        }
    }

    #[test]
    fn reply_text_cannot_split_a_line() {
        let mut out = Vec::new();
        Reply::new(550, "5.1.1", "evil\r\n250 ok").write_to(&mut out);
        assert_eq!(out, b"550 5.1.1 evil  250 ok\r\n");
    }

    #[test]
    fn after_queue_turns_rejects_into_discards() {
        let v = Verdict::reject(Reason::UnknownKey, 550, "5.1.1", "unknown key").after_queue();
        assert!(matches!(v, Verdict::Discard { reason: Reason::UnknownKey, .. }));
        let t = Verdict::tempfail(Reason::SpoolError, 451, "4.3.0", "later").after_queue();
        assert!(matches!(t, Verdict::Tempfail { .. }));
    }
}

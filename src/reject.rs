//! The operator reject log entry: every refusal and discard, with who, what and why.
//! Its JSON form is a public contract (DESIGN.md): extend, never rename.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::gate::verdict::Reason;

/// Where in the session the refusal happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Connect,
    Helo,
    Mail,
    Rcpt,
    Data,
}

/// What was done with the message or recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Reject,
    Tempfail,
    Discard,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Connect => "connect",
            Stage::Helo => "helo",
            Stage::Mail => "mail",
            Stage::Rcpt => "rcpt",
            Stage::Data => "data",
        }
    }
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Reject => "reject",
            Action::Tempfail => "tempfail",
            Action::Discard => "discard",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RejectEntry {
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    pub stage: Stage,
    pub action: Action,
    /// The reply code the client was given (250 for a discard).
    pub code: u16,
    pub enhanced: String,
    pub reason: Reason,
    pub text: String,
    pub client_ip: String,
    pub helo: String,
    pub mail_from: String,
    pub rcpt_to: Vec<String>,
    pub message_id: String,
    pub subject: String,
    /// `smtp`, `lmtp` or `policy`.
    pub listener: String,
    /// Refusals of the same kind from the same address since the previous entry that were
    /// not logged (connections over the limits, see `frontend::refusals`; once 10,000
    /// addresses are tracked, from any further address). Left out when 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub suppressed: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl RejectEntry {
    /// One JSON line; serde_json escapes CR and LF, so client text can never break the line.
    pub fn to_json_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"unserialisable reject entry: {e}\"}}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_text_cannot_break_the_line() {
        let e = RejectEntry {
            at: OffsetDateTime::UNIX_EPOCH,
            stage: Stage::Rcpt,
            action: Action::Reject,
            code: 550,
            enhanced: "5.1.1".into(),
            reason: Reason::UnknownKey,
            text: "unknown key".into(),
            client_ip: "127.0.0.1".into(),
            helo: "evil\r\n{\"fake\":1}".into(),
            mail_from: "a@b".into(),
            rcpt_to: vec!["x\ny@z".into()],
            message_id: String::new(),
            subject: "s\r".into(),
            listener: "smtp".into(),
            suppressed: 0,
        };
        let line = e.to_json_line();
        assert!(!line.contains('\n') && !line.contains('\r'));
        let back: RejectEntry = serde_json::from_str(&line).unwrap();
        assert_eq!(back, e);
        assert!(line.contains("\"reason\":\"unknown_key\""));
        assert!(line.contains("\"stage\":\"rcpt\""));
        for st in [Stage::Connect, Stage::Helo, Stage::Mail, Stage::Rcpt, Stage::Data] {
            assert_eq!(serde_json::to_value(st).unwrap(), st.as_str());
        }
        for a in [Action::Reject, Action::Tempfail, Action::Discard] {
            assert_eq!(serde_json::to_value(a).unwrap(), a.as_str());
        }
    }
}

//! The job record: what mailgate stores for each accepted (mailbox, key) and hands to the
//! application. Its JSON form is a public contract (DESIGN.md): extend, never rename.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Ready,
    Leased,
    Done,
    Dead,
}

impl JobState {
    pub const ALL: [JobState; 4] = [JobState::Ready, JobState::Leased, JobState::Done, JobState::Dead];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Ready => "ready",
            JobState::Leased => "leased",
            JobState::Done => "done",
            JobState::Dead => "dead",
        }
    }

    /// One byte used as a key prefix in the spool's state index.
    pub fn tag(self) -> u8 {
        match self {
            JobState::Ready => b'r',
            JobState::Leased => b'l',
            JobState::Done => b'd',
            JobState::Dead => b'x',
        }
    }
}

impl std::str::FromStr for JobState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ready" => Ok(JobState::Ready),
            "leased" => Ok(JobState::Leased),
            "done" => Ok(JobState::Done),
            "dead" => Ok(JobState::Dead),
            other => Err(format!("unknown state {other:?} (ready, leased, done, dead)")),
        }
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the key of a job was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeySource {
    Rcpt,
    To,
    References,
    DeliveredTo,
    XDeliveredTo,
    EnvelopeTo,
    XEnvelopeTo,
    Received,
    XOriginalTo,
    XForwardedTo,
    Cc,
}

impl KeySource {
    pub fn as_str(self) -> &'static str {
        match self {
            KeySource::Rcpt => "rcpt",
            KeySource::To => "to",
            KeySource::References => "references",
            KeySource::DeliveredTo => "delivered-to",
            KeySource::XDeliveredTo => "x-delivered-to",
            KeySource::EnvelopeTo => "envelope-to",
            KeySource::XEnvelopeTo => "x-envelope-to",
            KeySource::Received => "received",
            KeySource::XOriginalTo => "x-original-to",
            KeySource::XForwardedTo => "x-forwarded-to",
            KeySource::Cc => "cc",
        }
    }
}

/// GitLab-compatible route classes (notes/gitlab.md), plus `key` for `routes = "any"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Route {
    Reply,
    NewIssue,
    NoteOnIssuable,
    Unsubscribe,
    NewMergeRequest,
    ServiceDesk,
    Key,
    Unknown,
}

impl Route {
    pub fn as_str(self) -> &'static str {
        match self {
            Route::Reply => "reply",
            Route::NewIssue => "new_issue",
            Route::NoteOnIssuable => "note_on_issuable",
            Route::Unsubscribe => "unsubscribe",
            Route::NewMergeRequest => "new_merge_request",
            Route::ServiceDesk => "service_desk",
            Route::Key => "key",
            Route::Unknown => "unknown",
        }
    }
}

/// The SMTP envelope as the job records it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub mail_from: String,
    pub rcpt_to: Vec<String>,
    pub client_ip: String,
    pub client_name: String,
    pub helo: String,
    pub protocol: String,
    pub queue_id: String,
    /// The TLS of the client's connection to mailgate (STARTTLS or implicit TLS); absent for a
    /// plaintext connection, and when the transaction came with XFORWARD (the hop from the
    /// relay is not the original client's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsInfo>,
}

/// A TLS connection's negotiated parameters, in rustls's names.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsInfo {
    /// `TLSv1.2` or `TLSv1.3`.
    pub version: String,
    /// The cipher suite, e.g. `TLS13_AES_256_GCM_SHA384`.
    pub cipher: String,
}

/// A few facts about the message, read from its headers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MessageInfo {
    pub message_id: String,
    pub subject: String,
    pub from: String,
    pub size: u64,
    pub sha256: String,
}

/// Sender-authentication results (RFC 8601 result words). Until checks run, every method is
/// `none` and the header says `<authserv-id>; none`, which RFC 8601 defines as "no
/// authentication was performed".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuthResults {
    pub spf: String,
    pub dkim: String,
    pub dmarc: String,
    pub dmarc_policy: String,
    pub arc: String,
    pub header: String,
    /// Set when a trusted ARC sealer's pass stood in for failed SPF/DMARC: that sealer's domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arc_sealer: Option<String>,
}

impl AuthResults {
    pub fn not_checked(authserv_id: &str) -> Self {
        AuthResults {
            spf: "none".into(),
            dkim: "none".into(),
            dmarc: "none".into(),
            dmarc_policy: "none".into(),
            arc: "none".into(),
            header: format!("{authserv_id}; none"),
            arc_sealer: None,
        }
    }
}

/// One job: one accepted (mailbox, key) of one message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    pub state: JobState,
    #[serde(with = "time::serde::rfc3339")]
    pub received_at: OffsetDateTime,
    pub attempts: u32,
    pub mailbox: String,
    pub key: String,
    pub key_source: KeySource,
    pub route: Route,
    pub envelope: Envelope,
    pub message: MessageInfo,
    pub auth: AuthResults,
    /// The reply without quoted text and signatures (`null` when the message has no text).
    pub reply_text: Option<String>,
    /// While leased: when the lease ends and the job goes back to `ready`.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "time::serde::rfc3339::option")]
    pub lease_until: Option<OffsetDateTime>,
    /// When the job last changed state.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "time::serde::rfc3339::option")]
    pub updated_at: Option<OffsetDateTime>,
    /// The last delivery error, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// While a ready job waits for its next delivery attempt (after a failed one): when that
    /// attempt is due. Push workers and the pull API skip it until then.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "time::serde::rfc3339::option")]
    pub next_attempt_at: Option<OffsetDateTime>,
}

/// Formats a job id from the spool's 64-bit sequence number (16 hex digits: sortable).
pub fn format_id(n: u64) -> String {
    format!("{n:016x}")
}

/// Parses a job id printed by [`format_id`].
pub fn parse_id(s: &str) -> Option<u64> {
    if s.len() != 16 {
        return None;
    }
    u64::from_str_radix(s, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_sort() {
        assert_eq!(parse_id(&format_id(42)), Some(42));
        assert!(format_id(9) < format_id(10));
        assert_eq!(parse_id("xyz"), None);
    }

    #[test]
    fn json_names_follow_the_contract() {
        let v = serde_json::to_value(KeySource::XDeliveredTo).unwrap();
        assert_eq!(v, "x-delivered-to");
        let v = serde_json::to_value(Route::NewMergeRequest).unwrap();
        assert_eq!(v, "new_merge_request");
        let v = serde_json::to_value(JobState::Dead).unwrap();
        assert_eq!(v, "dead");
    }
}

//! Default values of every setting: the embedded defaults of DESIGN.md.

use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;

use super::{DkimMode, DmarcMode, ListenConfig, MailboxConfig, Protocol, RefusalAction, RouteSet, SpfMode};

pub(super) fn default_hostname() -> String {
    let h = gethostname::gethostname().to_string_lossy().trim().to_string();
    if h.is_empty() { "localhost".to_string() } else { h }
}
pub(super) fn default_log_format() -> String {
    "text".into()
}
pub(super) fn default_shutdown_grace() -> Duration {
    Duration::from_secs(30)
}
pub(super) fn default_trusted_peers() -> Vec<IpNet> {
    vec!["127.0.0.1/32".parse().expect("literal"), "::1/128".parse().expect("literal")]
}
pub(super) fn default_listeners() -> Vec<ListenConfig> {
    let l = |protocol, address: &str| ListenConfig {
        protocol,
        address: address.to_string(),
        mode: None,
        trusted_peers: default_trusted_peers(),
        socket_mode: None,
        tls: None,
        implicit_tls: false,
        require_tls: false,
    };
    vec![
        l(Protocol::Smtp, "127.0.0.1:2525"),
        l(Protocol::Lmtp, "127.0.0.1:2424"),
        l(Protocol::Policy, "127.0.0.1:10040"),
    ]
}
pub(super) fn default_mailboxes() -> Vec<MailboxConfig> {
    vec![MailboxConfig {
        name: "incoming".into(),
        address: "incoming+%{key}@localhost".into(),
        reply_host: None,
        routes: RouteSet::Gitlab,
        auth: None,
    }]
}
pub(super) fn default_routes() -> RouteSet {
    RouteSet::Gitlab
}
pub(super) fn default_max_message_size() -> u64 {
    26_214_400
}
pub(super) fn default_max_recipients() -> usize {
    100
}
pub(super) fn default_max_connections() -> usize {
    1000
}
pub(super) fn default_max_connections_per_ip() -> usize {
    50
}
pub(super) fn default_command_timeout() -> Duration {
    Duration::from_secs(300)
}
/// Postfix under stress: `smtpd_timeout` 10s.
pub(super) fn default_stress_command_timeout() -> Duration {
    Duration::from_secs(10)
}
pub(super) fn default_data_timeout() -> Duration {
    Duration::from_secs(600)
}
/// Bytes a second, as Postfix's `smtpd_min_data_rate`.
pub(super) fn default_min_data_rate() -> u64 {
    500
}
pub(super) fn default_session_timeout() -> Duration {
    Duration::from_secs(1800)
}
pub(super) fn default_max_errors() -> u32 {
    10
}
pub(super) fn default_error_delay() -> Duration {
    Duration::from_millis(250)
}
pub(super) fn default_max_line_length() -> usize {
    1000
}
pub(super) fn default_max_header_size() -> usize {
    crate::gate::mime::ContentLimits::DEFAULT.max_header_size
}
pub(super) fn default_max_header_lines() -> usize {
    crate::gate::mime::ContentLimits::DEFAULT.max_header_lines
}
pub(super) fn default_max_mime_depth() -> usize {
    crate::gate::mime::ContentLimits::DEFAULT.max_mime_depth
}
pub(super) fn default_max_mime_parts() -> usize {
    crate::gate::mime::ContentLimits::DEFAULT.max_mime_parts
}
pub(super) fn default_spf() -> SpfMode {
    SpfMode::RejectFail
}
pub(super) fn default_dkim() -> DkimMode {
    DkimMode::Record
}
pub(super) fn default_dmarc() -> DmarcMode {
    DmarcMode::Enforce
}
pub(super) fn default_auth_timeout() -> Duration {
    Duration::from_secs(5)
}
pub(super) fn default_discard() -> RefusalAction {
    RefusalAction::Discard
}
pub(super) fn default_spool_dir() -> PathBuf {
    PathBuf::from("./mailgate-data")
}
pub(super) fn default_dedup_window() -> Duration {
    Duration::from_secs(7 * 86_400)
}
/// Done jobs and their raw messages are kept a week: long enough to look into what the
/// application was handed after it reports a problem (`queue show`, `GET /v1/jobs/{id}/raw`).
pub(super) fn default_retention() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}

pub(super) fn default_reject_retention() -> Duration {
    Duration::from_secs(30 * 86_400)
}
pub(super) fn default_reject_max_entries() -> usize {
    1_000_000
}
pub(super) fn default_http_listen() -> String {
    "127.0.0.1:8025".into()
}

//! Configuration: the TOML file of DESIGN.md, with the embedded defaults used when no file is
//! given. Unknown keys are errors, so a typo never silently turns a setting off.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default = "default_listeners")]
    pub listen: Vec<ListenConfig>,
    #[serde(default = "default_mailboxes")]
    pub mailbox: Vec<MailboxConfig>,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub policy: PolicyConfig,
    #[serde(default)]
    pub spool: SpoolConfig,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub deliver: Vec<DeliverConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Banner name and Authentication-Results authserv-id.
    #[serde(default = "default_hostname")]
    pub hostname: String,
    /// `text` (human) or `json` (one JSON object per event) tracing output.
    #[serde(default = "default_log_format")]
    pub log_format: String,
    /// How long sessions in flight may run on after SIGTERM/SIGINT before they are cut.
    #[serde(default = "default_shutdown_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            hostname: default_hostname(),
            log_format: default_log_format(),
            shutdown_grace: default_shutdown_grace(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Smtp,
    Lmtp,
    Policy,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Smtp => "smtp",
            Protocol::Lmtp => "lmtp",
            Protocol::Policy => "policy",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReplyMode {
    /// Refusals go to the client in the session (5xx/4xx).
    InSession,
    /// Behind Postfix's queue: policy refusals are discarded and logged, never 5xx.
    AfterQueue,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    pub protocol: Protocol,
    /// `host:port` or `unix:/path/to.sock`.
    pub address: String,
    /// Default: `in-session` for smtp, `after-queue` for lmtp.
    #[serde(default)]
    pub mode: Option<ReplyMode>,
    /// Peers whose XFORWARD is honoured and who are exempt from the per-IP limit.
    #[serde(default = "default_trusted_peers")]
    pub trusted_peers: Vec<IpNet>,
    /// Permissions of a unix socket (octal string), default "0666": access control for local
    /// peers is the directory's permissions.
    #[serde(default)]
    pub socket_mode: Option<String>,
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    #[serde(default)]
    pub implicit_tls: bool,
    #[serde(default)]
    pub require_tls: bool,
}

impl ListenConfig {
    pub fn reply_mode(&self) -> ReplyMode {
        self.mode.unwrap_or(match self.protocol {
            Protocol::Lmtp => ReplyMode::AfterQueue,
            _ => ReplyMode::InSession,
        })
    }

    pub fn bind_address(&self) -> Result<BindAddress, ConfigError> {
        if let Some(path) = self.address.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(ConfigError::Invalid(format!("listener {:?}: empty unix socket path", self.address)));
            }
            return Ok(BindAddress::Unix(PathBuf::from(path)));
        }
        self.address
            .parse::<SocketAddr>()
            .map(BindAddress::Tcp)
            .map_err(|e| ConfigError::Invalid(format!("listener address {:?}: {e}", self.address)))
    }

    /// TLS settings that cannot work. The files themselves are read by `serve` at startup
    /// (and by `check`), not here: commands that only read the config need not read a key.
    fn tls_problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let at = &self.address;
        if self.tls.is_some() && self.protocol != Protocol::Smtp {
            out.push(format!(
                "listener {at}: tls is for smtp listeners only ({} listeners sit behind Postfix, which does the TLS)",
                self.protocol.as_str()
            ));
        }
        for (key, set) in [("implicit_tls", self.implicit_tls), ("require_tls", self.require_tls)] {
            if set && self.tls.is_none() {
                out.push(format!("listener {at}: {key} needs tls = {{ cert = \"…\", key = \"…\" }}"));
            }
        }
        if let Some(tls) = &self.tls {
            for (key, path) in [("cert", &tls.cert), ("key", &tls.key)] {
                if path.as_os_str().is_empty() {
                    out.push(format!("listener {at}: tls {key} is empty"));
                }
            }
        }
        out
    }

    pub fn socket_mode(&self) -> Result<u32, ConfigError> {
        match &self.socket_mode {
            None => Ok(0o666),
            Some(s) => u32::from_str_radix(s.trim_start_matches("0o"), 8)
                .map_err(|_| ConfigError::Invalid(format!("socket_mode {s:?} is not an octal mode"))),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BindAddress {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::fmt::Display for BindAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BindAddress::Tcp(a) => write!(f, "{a}"),
            BindAddress::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RouteSet {
    /// GitLab's route classes; keys that match none are refused.
    Gitlab,
    /// Every key is accepted as route `key`.
    Any,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MailboxConfig {
    pub name: String,
    /// Template with one `%{key}` in the local part, or a dedicated address without it.
    pub address: String,
    /// Host of `References: <reply-KEY@reply_host>`; default: the address's domain.
    #[serde(default)]
    pub reply_host: Option<String>,
    #[serde(default = "default_routes")]
    pub routes: RouteSet,
    /// Per-mailbox partial override of `[auth]` (sender authentication).
    #[serde(default)]
    pub auth: Option<MailboxAuthConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    #[serde(default = "default_max_message_size")]
    pub max_message_size: u64,
    #[serde(default = "default_max_recipients")]
    pub max_recipients: usize,
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    #[serde(default = "default_max_connections_per_ip")]
    pub max_connections_per_ip: usize,
    #[serde(default = "default_command_timeout", with = "humantime_serde")]
    pub command_timeout: Duration,
    /// `command_timeout` while 80% of `max_connections` are in use ("0s": no stress mode).
    #[serde(default = "default_stress_command_timeout", with = "humantime_serde")]
    pub stress_command_timeout: Duration,
    #[serde(default = "default_data_timeout", with = "humantime_serde")]
    pub data_timeout: Duration,
    /// DATA may last `data_timeout` plus one second per this many bytes received (0: off).
    #[serde(default = "default_min_data_rate")]
    pub min_data_rate: u64,
    /// A whole session may last no longer than this.
    #[serde(default = "default_session_timeout", with = "humantime_serde")]
    pub session_timeout: Duration,
    /// Bad commands tolerated in a session before `421` and close.
    #[serde(default = "default_max_errors")]
    pub max_errors: u32,
    /// The reply to each error after a session's second waits this long ("0s": no wait).
    #[serde(default = "default_error_delay", with = "humantime_serde")]
    pub error_delay: Duration,
    /// Longest text line in DATA, CRLF included (RFC 5321: 1000).
    #[serde(default = "default_max_line_length")]
    pub max_line_length: usize,
    /// Bytes of header in a message: its header section and the headers of its MIME parts and
    /// attached messages together, CRLFs included.
    #[serde(default = "default_max_header_size")]
    pub max_header_size: usize,
    /// Header lines (continuation lines included), counted like `max_header_size`.
    #[serde(default = "default_max_header_lines")]
    pub max_header_lines: usize,
    /// How many multiparts and attached messages may enclose a MIME part.
    #[serde(default = "default_max_mime_depth")]
    pub max_mime_depth: usize,
    /// MIME parts in a message, attached messages and their parts included.
    #[serde(default = "default_max_mime_parts")]
    pub max_mime_parts: usize,
}

impl LimitsConfig {
    /// The header and MIME limits the gate applies at the end of DATA.
    pub fn content(&self) -> crate::gate::mime::ContentLimits {
        crate::gate::mime::ContentLimits {
            max_header_size: self.max_header_size,
            max_header_lines: self.max_header_lines,
            max_mime_depth: self.max_mime_depth,
            max_mime_parts: self.max_mime_parts,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_message_size: default_max_message_size(),
            max_recipients: default_max_recipients(),
            max_connections: default_max_connections(),
            max_connections_per_ip: default_max_connections_per_ip(),
            command_timeout: default_command_timeout(),
            stress_command_timeout: default_stress_command_timeout(),
            data_timeout: default_data_timeout(),
            min_data_rate: default_min_data_rate(),
            session_timeout: default_session_timeout(),
            max_errors: default_max_errors(),
            error_delay: default_error_delay(),
            max_line_length: default_max_line_length(),
            max_header_size: default_max_header_size(),
            max_header_lines: default_max_header_lines(),
            max_mime_depth: default_max_mime_depth(),
            max_mime_parts: default_max_mime_parts(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RefusalAction {
    /// Say 250, store nothing, log it.
    Discard,
    /// Refuse in the session (discarded anyway on after-queue listeners).
    Reject,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    #[serde(default = "default_discard")]
    pub auto_submitted: RefusalAction,
    #[serde(default = "default_discard")]
    pub null_sender: RefusalAction,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig { auto_submitted: RefusalAction::Discard, null_sender: RefusalAction::Discard }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    #[serde(default = "default_spool_dir")]
    pub dir: PathBuf,
    /// How long a delivered message is remembered for de-duplication.
    #[serde(default = "default_dedup_window", with = "humantime_serde")]
    pub dedup_window: Duration,
    /// How long reject-log entries are kept.
    #[serde(default = "default_reject_retention", with = "humantime_serde")]
    pub reject_retention: Duration,
    /// At most this many reject-log entries are kept (oldest dropped first).
    #[serde(default = "default_reject_max_entries")]
    pub reject_max_entries: usize,
    /// Done jobs and their raw messages are purged this long after delivery ("0s": at once).
    #[serde(default = "default_retention", with = "humantime_serde")]
    pub retention: Duration,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            dir: default_spool_dir(),
            dedup_window: default_dedup_window(),
            reject_retention: default_reject_retention(),
            reject_max_entries: default_reject_max_entries(),
            retention: default_retention(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Empty string: no HTTP API.
    #[serde(default = "default_http_listen")]
    pub listen: String,
    /// File holding the bearer token required from non-loopback clients.
    #[serde(default)]
    pub token_file: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig { listen: default_http_listen(), token_file: String::new() }
    }
}

impl HttpConfig {
    pub fn listen_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        if self.listen.is_empty() {
            return Ok(None);
        }
        self.listen.parse().map(Some).map_err(|e| ConfigError::Invalid(format!("[http] listen {:?}: {e}", self.listen)))
    }

    /// Reads the bearer token; `None` when no token file is configured.
    pub fn token(&self) -> Result<Option<String>, ConfigError> {
        if self.token_file.is_empty() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&self.token_file)
            .map_err(|source| ConfigError::Read { path: PathBuf::from(&self.token_file), source })?;
        let token = text.trim().to_string();
        if token.is_empty() {
            return Err(ConfigError::Invalid(format!("[http] token_file {} is empty", self.token_file)));
        }
        Ok(Some(token))
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server: ServerConfig::default(),
            listen: default_listeners(),
            mailbox: default_mailboxes(),
            limits: LimitsConfig::default(),
            auth: AuthConfig::default(),
            policy: PolicyConfig::default(),
            spool: SpoolConfig::default(),
            http: HttpConfig::default(),
            deliver: Vec::new(),
        }
    }
}

impl Config {
    /// Parses a config file's text. Relative paths stay relative to the working directory.
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text)
            .map_err(|e| ConfigError::Parse { path: path.to_path_buf(), message: e.to_string() })?;
        config.validate()?;
        Ok(config)
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Config::from_toml(&text, path)
    }

    /// `--config FILE`, else `$MAILGATE_CONFIG`, else the embedded defaults.
    pub fn load_or_default(path: Option<&Path>) -> Result<Config, ConfigError> {
        match path {
            Some(p) => Config::load(p),
            None => Ok(Config::default()),
        }
    }

    /// Errors that make the config unusable (the same list `mailgate check` prints).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let problems = self.problems();
        if problems.is_empty() { Ok(()) } else { Err(ConfigError::Invalid(problems.join("; "))) }
    }

    /// Every structural problem of the config, one sentence each.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.listen.is_empty() {
            out.push("no [[listen]] entries".to_string());
        }
        for l in &self.listen {
            if let Err(e) = l.bind_address() {
                out.push(e.to_string());
            }
            if let Err(e) = l.socket_mode() {
                out.push(e.to_string());
            }
            out.extend(l.tls_problems());
            if l.protocol == Protocol::Policy && l.mode.is_some() {
                out.push(format!("listener {}: mode applies to smtp and lmtp only", l.address));
            }
        }
        if self.mailbox.is_empty() {
            out.push("no [[mailbox]] entries".to_string());
        }
        let mut names = std::collections::HashSet::new();
        for m in &self.mailbox {
            if !names.insert(m.name.as_str()) {
                out.push(format!("mailbox name {:?} is used twice", m.name));
            }
        }
        if let Err(e) = self.http.listen_addr() {
            out.push(e.to_string());
        }
        if self.limits.max_recipients == 0 {
            out.push("[limits] max_recipients must be at least 1".into());
        }
        if self.limits.max_message_size == 0 {
            out.push("[limits] max_message_size must be at least 1".into());
        }
        if self.limits.max_line_length < 80 {
            out.push("[limits] max_line_length must be at least 80".into());
        }
        if self.limits.max_header_size < 1024 {
            out.push("[limits] max_header_size must be at least 1024".into());
        }
        if self.limits.max_header_lines < 16 {
            out.push("[limits] max_header_lines must be at least 16".into());
        }
        let max_depth = crate::gate::mime::MAX_MIME_DEPTH;
        if !(1..=max_depth).contains(&self.limits.max_mime_depth) {
            out.push(format!("[limits] max_mime_depth must be between 1 and {max_depth}"));
        }
        if self.limits.max_mime_parts < 2 {
            out.push("[limits] max_mime_parts must be at least 2".into());
        }
        let mailbox_auth = self.mailbox.iter().filter_map(|m| Some((m.name.as_str(), m.auth.as_ref()?)));
        out.extend(self.auth.problems(mailbox_auth));
        let mailboxes: Vec<&str> = self.mailbox.iter().map(|m| m.name.as_str()).collect();
        out.extend(deliver::problems(&self.deliver, &mailboxes));
        if !["text", "json"].contains(&self.server.log_format.as_str()) {
            out.push(format!("[server] log_format = {:?}: expected text or json", self.server.log_format));
        }
        out
    }
}

mod auth;
mod defaults;
mod deliver;
#[cfg(test)]
mod tests;

pub use auth::{AuthConfig, AuthOverride, DkimMode, DmarcMode, MailboxAuthConfig, RouteAuthOverrides, SpfMode};
pub use deliver::{DEFAULT_RETRY, DeliverConfig, DeliverKind, names as deliver_names};

use defaults::*;

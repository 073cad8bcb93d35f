//! `mailgate postfix-config --mode lmtp|proxy`: the Postfix side of deployment mode A (LMTP
//! transport + RCPT policy service) or B (before-queue proxy) for the current configuration:
//! the mailbox domains, the listener addresses and socket paths, and timeouts that fit the
//! `[auth]` and `[limits]` settings. The commented templates are in `postfix/`; the walkthrough
//! is docs/postfix.md.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use mailgate::config::{BindAddress, Config, ListenConfig, Protocol, ReplyMode};
use mailgate::gate::Gate;

/// Postfix's queue directory on Debian and most distributions. Socket paths below it are written
/// relative to it: every Postfix daemon runs there, chrooted (Debian's default for smtpd and
/// lmtp) or not, so a relative path works either way.
pub const QUEUE_DIR: &str = "/var/spool/postfix";

/// Postfix's default `smtpd_policy_service_timeout` and `smtpd_proxy_timeout`.
const POSTFIX_DEFAULT_TIMEOUT: Duration = Duration::from_secs(100);

/// Headroom added to mailgate's worst case before comparing it with a Postfix timeout.
const MARGIN: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Mode A: Postfix queues, asks the policy service at RCPT, delivers over LMTP.
    Lmtp,
    /// Mode B: Postfix's smtpd hands every session to mailgate's SMTP listener
    /// (smtpd_proxy_filter), before its queue.
    Proxy,
}

/// What `postfix-config` prints: the snippets (stdout) and warnings (stderr).
#[derive(Debug)]
pub struct Output {
    pub text: String,
    pub warnings: Vec<String>,
}

pub fn run(config: &Config, mode: Mode, source: Option<&Path>) -> Result<ExitCode> {
    let out = generate(config, mode, source)?;
    for w in &out.warnings {
        eprintln!("mailgate: warning: {w}");
    }
    print!("{}", out.text);
    Ok(ExitCode::SUCCESS)
}

/// A mailgate listener as Postfix must name it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Endpoint {
    /// The address Postfix connects to (an unspecified bind address becomes loopback).
    Inet(SocketAddr),
    /// The socket path as Postfix writes it, and whether it lies outside the queue directory
    /// (then the Postfix client that connects must not run chrooted).
    Unix { path: String, outside_queue_dir: bool },
}

impl Endpoint {
    fn of(l: &ListenConfig) -> Result<Endpoint> {
        match l.bind_address()? {
            BindAddress::Tcp(a) => {
                let ip = match a.ip() {
                    IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
                    IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
                    ip => ip,
                };
                Ok(Endpoint::Inet(SocketAddr::new(ip, a.port())))
            }
            BindAddress::Unix(p) => {
                let Some(path) = p.to_str() else {
                    bail!("listener {}: the socket path is not UTF-8", l.address);
                };
                if !path.starts_with('/') {
                    bail!(
                        "listener {}: Postfix needs an absolute socket path (a relative one is resolved \
                         against mailgate's working directory, which Postfix does not know)",
                        l.address
                    );
                }
                if path.chars().any(|c| c.is_whitespace() || c.is_control() || ",{}=".contains(c)) {
                    bail!("listener {}: Postfix cannot name a socket path with spaces or any of , {{ }} =", l.address);
                }
                let inside =
                    Path::new(path).strip_prefix(QUEUE_DIR).ok().and_then(Path::to_str).filter(|r| !r.is_empty());
                Ok(match inside {
                    Some(relative) => Endpoint::Unix { path: relative.to_string(), outside_queue_dir: false },
                    None => Endpoint::Unix { path: path.to_string(), outside_queue_dir: true },
                })
            }
        }
    }

    /// LMTP next-hop syntax (smtp(8), "LMTP DESTINATION SYNTAX"): `inet:host:port`, IPv6 as
    /// `inet:[ipv6:addr]:port`, or `unix:path`.
    fn lmtp(&self) -> String {
        match self {
            Endpoint::Inet(SocketAddr::V4(a)) => format!("inet:{}:{}", a.ip(), a.port()),
            Endpoint::Inet(SocketAddr::V6(a)) => format!("inet:[ipv6:{}]:{}", a.ip(), a.port()),
            Endpoint::Unix { path, .. } => format!("unix:{path}"),
        }
    }

    /// `check_policy_service` / `smtpd_proxy_filter` syntax: `inet:host:port` (IPv6 in
    /// brackets) or `unix:path`.
    fn service(&self) -> String {
        match self {
            Endpoint::Inet(SocketAddr::V4(a)) => format!("inet:{}:{}", a.ip(), a.port()),
            Endpoint::Inet(SocketAddr::V6(a)) => format!("inet:[{}]:{}", a.ip(), a.port()),
            Endpoint::Unix { path, .. } => format!("unix:{path}"),
        }
    }

    fn outside_queue_dir(&self) -> bool {
        matches!(self, Endpoint::Unix { outside_queue_dir: true, .. })
    }
}

/// The listener a mode needs: the first of `protocol` whose reply mode suits it.
fn pick(config: &Config, protocol: Protocol, mode: Option<ReplyMode>) -> Option<&ListenConfig> {
    config.listen.iter().find(|l| l.protocol == protocol && mode.is_none_or(|m| l.reply_mode() == m))
}

/// Postfix connects from the listener's own loopback/local address; XFORWARD is honoured only
/// from `trusted_peers` (unix-socket peers are always trusted).
fn untrusted_warning(l: &ListenConfig, ep: &Endpoint) -> Option<String> {
    let Endpoint::Inet(a) = ep else { return None };
    let ip = a.ip();
    if l.trusted_peers.iter().any(|n| n.contains(&ip)) {
        return None;
    }
    Some(format!(
        "listener {}: Postfix will connect from {ip}, which is not in its trusted_peers; mailgate will not \
         honour Postfix's XFORWARD (the original client IP, HELO and queue id) and SPF will judge {ip}",
        l.address
    ))
}

/// The mailbox domains (lower case, config order, each once).
fn domains(config: &Config) -> Result<Vec<String>> {
    let gate = Gate::new(&config.mailbox, &config.policy).map_err(|e| anyhow!("{e}"))?;
    let mut out: Vec<String> = Vec::new();
    for t in gate.mailboxes() {
        if t.domain.chars().any(|c| c.is_whitespace() || ",{}=".contains(c)) {
            bail!("mailbox {}: Postfix cannot name the domain {:?}", t.mailbox, t.domain);
        }
        if !out.contains(&t.domain) {
            out.push(t.domain.clone());
        }
    }
    if out.is_empty() {
        bail!("no [[mailbox]] entries: no domain for Postfix to hand to mailgate");
    }
    Ok(out)
}

fn secs(d: Duration) -> String {
    format!("{}s", d.as_secs().max(1))
}

/// The Postfix timeout to set: its default, or mailgate's worst case plus a margin if that is
/// longer.
fn timeout_for(worst: Duration) -> Duration {
    let needed = worst.saturating_add(MARGIN);
    let needed = Duration::from_secs(needed.as_secs() + u64::from(needed.subsec_nanos() > 0));
    needed.max(POSTFIX_DEFAULT_TIMEOUT)
}

/// Postfix's `message_size_limit` for mailgate's `max_message_size`: 1/16 lower, because what
/// reaches mailgate is bigger than what Postfix counted (its own Received: header, and LMTP
/// sends CRLF where the queue file has LF). A message refused for size by Postfix is refused in
/// the client's session; by an LMTP server after the queue, it would bounce.
fn message_size_limit(max: u64) -> u64 {
    max - max / 16
}

pub fn generate(config: &Config, mode: Mode, source: Option<&Path>) -> Result<Output> {
    let domains = domains(config)?;
    let mut warnings = Vec::new();
    for d in &domains {
        if d == "localhost" || d.starts_with("localhost.") {
            warnings.push(format!(
                "mailbox domain {d}: Postfix normally delivers {d} itself (mydestination), and a domain must not be \
                 in both mydestination and relay_domains; use a dedicated subdomain such as incoming.example.com"
            ));
        }
    }
    let from = match source {
        Some(p) => format!("from {}", p.display()),
        None => "from mailgate's embedded defaults (no --config)".to_string(),
    };
    let mut text = String::new();
    match mode {
        Mode::Lmtp => lmtp(config, &domains, &from, &mut text, &mut warnings)?,
        Mode::Proxy => proxy(config, &domains, &from, &mut text, &mut warnings)?,
    }
    Ok(Output { text, warnings })
}

/// The relay_domains and message_size_limit lines both modes share.
fn common_main_cf(config: &Config, domains: &[String], out: &mut String) {
    let list = domains.join(", ");
    let size = message_size_limit(config.limits.max_message_size);
    let _ = write!(
        out,
        "\
# The domains of the [[mailbox]] addresses: Postfix accepts mail for them from anyone and hands
# it to mailgate. They must not also be in mydestination or virtual_mailbox_domains. If
# relay_domains already lists other domains, keep them: relay_domains = theirs, {list}
relay_domains = {list}
# mailgate's [limits] max_message_size is {max}; Postfix refuses bigger mail in the client's
# session. 1/16 lower, because Postfix adds its Received: header and the line ends grow.
message_size_limit = {size}
",
        max = config.limits.max_message_size,
    );
}

fn lmtp(config: &Config, domains: &[String], from: &str, out: &mut String, warnings: &mut Vec<String>) -> Result<()> {
    let Some(lmtp_l) = pick(config, Protocol::Lmtp, Some(ReplyMode::AfterQueue)) else {
        if let Some(l) = pick(config, Protocol::Lmtp, None) {
            bail!(
                "listener {} (lmtp) is in-session; mode A needs an after-queue LMTP listener: behind Postfix's queue \
                 every 5xx becomes a bounce to a sender who may be forged. Remove `mode = \"in-session\"` \
                 (after-queue is the default for lmtp)",
                l.address
            );
        }
        bail!(
            "mode A (--mode lmtp) needs an LMTP listener for Postfix's lmtp: transport; add \
             [[listen]] protocol = \"lmtp\", address = \"127.0.0.1:2424\" (after-queue)"
        );
    };
    let Some(policy_l) = pick(config, Protocol::Policy, None) else {
        bail!(
            "mode A (--mode lmtp) needs a policy listener, so that Postfix refuses unknown keys and SPF failures at \
             RCPT (check_policy_service) instead of accepting them for mailgate to discard; add [[listen]] \
             protocol = \"policy\", address = \"127.0.0.1:10040\""
        );
    };
    let lmtp_ep = Endpoint::of(lmtp_l)?;
    let policy_ep = Endpoint::of(policy_l)?;
    warnings.extend(untrusted_warning(lmtp_l, &lmtp_ep));
    let nexthop = format!("lmtp:{}", lmtp_ep.lmtp());
    let transports = domains.iter().map(|d| format!("{d}={nexthop}")).collect::<Vec<_>>().join(", ");
    let recipients = domains.iter().map(|d| format!("@{d}=OK")).collect::<Vec<_>>().join(", ");
    let policy = policy_ep.service();
    let spf_worst = config.auth.timeout.saturating_mul(4);
    let policy_timeout = timeout_for(spf_worst);

    let _ = write!(
        out,
        "\
# Postfix settings for mailgate, deployment mode A (LMTP transport + RCPT policy service),
# generated by `mailgate postfix-config --mode lmtp` {from}.
# Postfix queues the mail, asks mailgate's policy service about every recipient at RCPT (so
# unknown keys and SPF failures are refused in the client's session, never bounced), then
# delivers over LMTP to mailgate's after-queue listener, which stores the job.

# main.cf
# Apply each setting with postconf -e 'name = value' (or paste them at the end of
# /etc/postfix/main.cf, where later lines win), then run: postfix reload
"
    );
    common_main_cf(config, domains, out);
    let _ = write!(
        out,
        "\
# Which recipients of those domains exist: any local part, in exactly these domains (mailgate's
# policy service judges the local part). Without it relay_domains also covers every subdomain
# (parent_domain_matches_subdomains), and mail to x@sub.{first} would be accepted, then
# bounced. If relay_domains lists other domains, give them entries here too (@other.example=OK).
relay_recipient_maps = inline:{{ {recipients} }}
# Deliver the mailbox domains over LMTP to mailgate's listener {lmtp_addr} (after-queue). If
# transport_maps is already set, list both: transport_maps = hash:/etc/postfix/transport, inline:{{...}}
transport_maps = inline:{{ {transports} }}
# Tell mailgate the original client (NAME, ADDR, HELO) and the Postfix queue id (IDENT) by
# XFORWARD: SPF needs the client's address, and IDENT + recipient de-duplicates redeliveries.
lmtp_send_xforward_command = yes
# At RCPT: first Postfix's relay check, then mailgate's policy service ({policy_addr}). Put no
# permit_mynetworks or other permit_* before check_policy_service: clients it permits would skip
# the check. (smtpd_relay_restrictions keeps its default: permit_mynetworks,
# permit_sasl_authenticated, defer_unauth_destination.)
smtpd_recipient_restrictions = reject_unauth_destination, check_policy_service {policy}
# How long smtpd waits for an answer. mailgate's slowest answer is an SPF check, at most
# 4 x [auth] timeout = {spf_worst}; Postfix's default is 100s.
smtpd_policy_service_timeout = {policy_timeout}
# If mailgate cannot be reached or does not answer, tell the client to retry later (Postfix's
# default). Never DUNNO: that would accept, unchecked, mail that should have been refused.
smtpd_policy_service_default_action = 451 4.3.5 Server configuration problem
",
        first = domains[0],
        lmtp_addr = lmtp_l.address,
        policy_addr = policy_l.address,
        spf_worst = secs(spf_worst),
        policy_timeout = secs(policy_timeout),
    );
    if config.limits.max_recipients < 50 {
        let _ = write!(
            out,
            "\
# mailgate takes at most {n} recipients per transaction ([limits] max_recipients); Postfix's
# LMTP client sends up to 50 unless told otherwise.
lmtp_destination_recipient_limit = {n}
",
            n = config.limits.max_recipients
        );
    }
    let _ = write!(
        out,
        "\
# mynetworks: clients listed there may relay anywhere and are exempt from
# smtpd_forbid_bare_newline. Keep it to hosts you trust, e.g.
#   mynetworks = 127.0.0.0/8 [::1]/128
# and test from an address outside it.

# master.cf
"
    );
    let mut changed = false;
    if lmtp_ep.outside_queue_dir() {
        changed = true;
        let _ = write!(
            out,
            "\
# The LMTP socket {path} is outside Postfix's queue directory ({QUEUE_DIR}), and
# Debian runs the lmtp client chrooted there. Run the lmtp client unchrooted: replace the lmtp
# line with this one, or run: postconf -F 'lmtp/unix/chroot = n'
# (or bind mailgate's socket below {QUEUE_DIR}, e.g. unix:{QUEUE_DIR}/mailgate/lmtp.sock).
lmtp      unix  -       -       n       -       -       lmtp
",
            path = lmtp_l.address.trim_start_matches("unix:"),
        );
    }
    if policy_ep.outside_queue_dir() {
        changed = true;
        let _ = write!(
            out,
            "\
# The policy socket {path} is outside Postfix's queue directory ({QUEUE_DIR}), and
# Debian runs smtpd chrooted there. Run smtpd unchrooted: replace the smtp inet line with this
# one, or run: postconf -F 'smtp/inet/chroot = n'
# (or bind mailgate's socket below {QUEUE_DIR}, e.g. unix:{QUEUE_DIR}/mailgate/policy.sock).
smtp      inet  n       -       n       -       -       smtpd
",
            path = policy_l.address.trim_start_matches("unix:"),
        );
    }
    if !changed {
        let _ = writeln!(
            out,
            "# Nothing to change: the smtp and lmtp services reach mailgate from their chroot too{}.",
            if matches!(lmtp_ep, Endpoint::Unix { .. }) || matches!(policy_ep, Endpoint::Unix { .. }) {
                " (the sockets are inside the queue directory, named relative to it)"
            } else {
                " (TCP)"
            }
        );
    }
    Ok(())
}

fn proxy(config: &Config, domains: &[String], from: &str, out: &mut String, warnings: &mut Vec<String>) -> Result<()> {
    let Some(smtp_l) = pick(config, Protocol::Smtp, Some(ReplyMode::InSession)) else {
        if let Some(l) = pick(config, Protocol::Smtp, None) {
            bail!(
                "listener {} (smtp) is after-queue; mode B needs an in-session SMTP listener, whose refusals Postfix \
                 passes to the client word for word (after-queue would accept and discard instead). Remove \
                 `mode = \"after-queue\"` (in-session is the default for smtp)",
                l.address
            );
        }
        bail!(
            "mode B (--mode proxy) needs an SMTP listener for Postfix's smtpd_proxy_filter; add [[listen]] \
             protocol = \"smtp\", address = \"127.0.0.1:2525\" (in-session)"
        );
    };
    let ep = Endpoint::of(smtp_l)?;
    warnings.extend(untrusted_warning(smtp_l, &ep));
    if smtp_l.require_tls || smtp_l.implicit_tls {
        warnings.push(format!(
            "listener {}: Postfix's proxy speaks plain SMTP to the filter; turn off implicit_tls and require_tls",
            smtp_l.address
        ));
    }
    // The design's form for TCP over IPv4 is host:port; everything else needs its prefix.
    let filter = match &ep {
        Endpoint::Inet(SocketAddr::V4(a)) => a.to_string(),
        other => other.service(),
    };
    let data_worst = config.auth.timeout.saturating_mul(12);
    let proxy_timeout = timeout_for(data_worst);

    let _ = write!(
        out,
        "\
# Postfix settings for mailgate, deployment mode B (before-queue proxy),
# generated by `mailgate postfix-config --mode proxy` {from}.
# Postfix's smtpd hands every SMTP session of the service below to mailgate's in-session SMTP
# listener {addr}: mailgate's replies at RCPT and at the end of DATA (SPF, DKIM, DMARC,
# auto-replies) reach the client word for word, and what mailgate accepts never enters the
# Postfix queue. Every mail this smtpd receives goes through mailgate, which refuses addresses
# that are not its own: give mode B a Postfix instance (or an smtpd on its own IP address) of its own.

# main.cf
# Apply each setting with postconf -e 'name = value' (or paste them at the end of
# /etc/postfix/main.cf, where later lines win), then run: postfix reload
",
        addr = smtp_l.address,
    );
    common_main_cf(config, domains, out);
    let _ = write!(
        out,
        "\
# How long smtpd waits for each reply of mailgate. After it the client gets
# 451 4.3.0 Error: queue file write error and retries (mailgate de-duplicates the retry by
# Message-ID and body if the first copy was stored). mailgate's slowest reply is the end of
# DATA: allow 12 x [auth] timeout = {worst}; Postfix's default is 100s.
smtpd_proxy_timeout = {timeout}

# master.cf
# Replace the smtp inet line (Debian: smtp inet n - y - - smtpd) with this entry; the -o lines
# are its continuation and must start with whitespace. Or in one command:
#   postconf -M smtp/inet='smtp inet n - n - 20 smtpd -o smtpd_proxy_filter={filter} -o smtpd_proxy_options=speed_adjust'
# maxproc 20: at most 20 sessions at once, each with one connection to mailgate.
# speed_adjust: Postfix receives the whole message before it connects to mailgate, so slow
# clients do not hold mailgate connections; a message to several recipients is then accepted
# or refused as a whole (one unknown key refuses it for every recipient). Drop that -o line to
# have each recipient judged at its RCPT.
# With postscreen in front, put the -o lines on the \"smtpd pass\" service instead.
smtp      inet  n       -       n       -       20      smtpd
  -o smtpd_proxy_filter={filter}
  -o smtpd_proxy_options=speed_adjust
",
        worst = secs(data_worst),
        timeout = secs(proxy_timeout),
    );
    Ok(())
}

#[cfg(test)]
mod tests;

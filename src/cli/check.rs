//! `mailgate check`: every problem of a config, like `gitlab:incoming_email:check`.
//! Prints `ok: …`, `warning: …`, `error: …` lines and a summary; exit 1 when there are errors.

use std::collections::HashSet;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use mailgate::config::{BindAddress, Config};
use mailgate::gate::Gate;

use super::backend::{Api, client_addr};

/// Longest local part providers accept (RFC 5321).
const MAX_LOCAL_PART: usize = 64;
/// GitLab's legacy reply key: 32 hex digits.
const LEGACY_KEY_LEN: usize = 32;
/// GitLab's longest partitioned reply key: 4 + 1 + 25 + 1 + 13.
const PARTITIONED_KEY_LEN: usize = 44;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Ok,
    Warning,
    Error,
}

#[derive(Debug, Default)]
pub struct Findings(pub Vec<(Level, String)>);

impl Findings {
    fn ok(&mut self, m: impl Into<String>) {
        self.0.push((Level::Ok, m.into()));
    }
    fn warning(&mut self, m: impl Into<String>) {
        self.0.push((Level::Warning, m.into()));
    }
    fn error(&mut self, m: impl Into<String>) {
        self.0.push((Level::Error, m.into()));
    }
    pub fn count(&self, level: Level) -> usize {
        self.0.iter().filter(|(l, _)| *l == level).count()
    }
}

pub async fn run(path: Option<&Path>) -> Result<ExitCode> {
    let mut f = Findings::default();
    if let Some(config) = load(path, &mut f) {
        config_checks(&config, &mut f);
        let running = match config.http.listen_addr() {
            Ok(Some(addr)) => Api::new(addr, None)?.healthy().await,
            _ => false,
        };
        if running {
            f.ok(format!("a mailgate server is running: its HTTP API answers at {}", api_url(&config)));
        }
        spool_check(&config.spool.dir, &mut f);
        delivery::reachability(&config, &mut f).await;
        bind_checks(&config, running, &mut f);
    }
    for (level, message) in &f.0 {
        let tag = match level {
            Level::Ok => "ok",
            Level::Warning => "warning",
            Level::Error => "error",
        };
        println!("{tag}: {message}");
    }
    let (errors, warnings) = (f.count(Level::Error), f.count(Level::Warning));
    println!("{errors} error{}, {warnings} warning{}", plural(errors), plural(warnings));
    Ok(if errors > 0 { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

fn api_url(config: &Config) -> String {
    match config.http.listen_addr() {
        Ok(Some(addr)) => format!("http://{}", client_addr(addr)),
        _ => "(none)".to_string(),
    }
}

/// Parses the config without validating it, so that every problem is listed separately.
fn load(path: Option<&Path>, f: &mut Findings) -> Option<Config> {
    let Some(path) = path else {
        f.ok("no config file given (--config or MAILGATE_CONFIG): checking the embedded defaults");
        return Some(Config::default());
    };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            f.error(format!("cannot read {}: {e}", path.display()));
            return None;
        }
    };
    match toml::from_str::<Config>(&text) {
        Ok(c) => {
            f.ok(format!("{} parses", path.display()));
            Some(c)
        }
        Err(e) => {
            f.error(format!("{}: {}", path.display(), e.to_string().trim_end()));
            None
        }
    }
}

/// Checks that need no I/O besides reading the token file.
pub fn config_checks(config: &Config, f: &mut Findings) {
    for p in config.problems() {
        f.error(p);
    }
    match Gate::new(&config.mailbox, &config.policy) {
        Err(e) => f.error(e.to_string()),
        Ok(gate) => {
            for t in gate.mailboxes() {
                let address = format!("{}{}@{}", t.local_prefix, if t.keyed { "%{key}" } else { "" }, t.domain);
                let name = format!("mailbox {} ({address})", t.mailbox);
                if !t.keyed {
                    f.ok(format!("{name}: dedicated address, keys come from References"));
                    continue;
                }
                let fixed = t.local_prefix.len() + t.local_suffix.len();
                if fixed + LEGACY_KEY_LEN > MAX_LOCAL_PART {
                    f.error(format!(
                        "{name}: with a {LEGACY_KEY_LEN}-character reply key the local part is {} characters, over \
                         the {MAX_LOCAL_PART} that mail providers accept: shorten the part around %{{key}}",
                        fixed + LEGACY_KEY_LEN
                    ));
                } else if fixed + PARTITIONED_KEY_LEN > MAX_LOCAL_PART {
                    f.warning(format!(
                        "{name}: with GitLab's longest ({PARTITIONED_KEY_LEN}-character) reply key the local part is \
                         {} characters, over the {MAX_LOCAL_PART} that mail providers accept",
                        fixed + PARTITIONED_KEY_LEN
                    ));
                } else {
                    f.ok(format!("{name}: key addresses fit in {MAX_LOCAL_PART} characters"));
                }
                if !dedicated_domain(&t.domain) {
                    f.warning(format!(
                        "{name}: {} is not a dedicated subdomain. Receive incoming email on a subdomain such as \
                         incoming.{}, and do not use services that authenticate solely on access to an email \
                         domain: otherwise a key address (e.g. new issue by email) can be used to prove ownership \
                         of an @{} address",
                        t.domain, t.domain, t.domain
                    ));
                }
            }
        }
    }
    token_checks(config, f);
    auth_checks(config, f);
    delivery::config_checks(config, f);
}

/// `example.com` is a main domain; `incoming.example.com` and `localhost` are fine.
fn dedicated_domain(domain: &str) -> bool {
    let domain = domain.trim_end_matches('.');
    domain.eq_ignore_ascii_case("localhost") || domain.starts_with('[') || domain.split('.').count() >= 3
}

fn token_checks(config: &Config, f: &mut Findings) {
    let Ok(Some(addr)) = config.http.listen_addr() else {
        if config.http.listen.is_empty() {
            f.warning(
                "[http] listen is empty: no HTTP API, so applications cannot pull jobs and the CLI cannot \
                       reach the queue while the server runs",
            );
        }
        return;
    };
    match config.http.token() {
        Err(e) => f.error(e.to_string()),
        Ok(Some(_)) => f.ok(format!("[http] bearer token read from {}", config.http.token_file)),
        Ok(None) if !addr.ip().to_canonical().is_loopback() => f.warning(format!(
            "[http] listen {addr} accepts non-loopback clients but no token_file is set: they will all get 401"
        )),
        Ok(None) => {}
    }
}

/// Sender authentication: what is checked, and whether the resolver can be set up.
fn auth_checks(config: &Config, f: &mut Findings) {
    let a = &config.auth;
    let resolver = if a.nameservers.is_empty() {
        "the system resolver (/etc/resolv.conf)".to_string()
    } else {
        a.nameservers.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(", ")
    };
    let overrides = config.mailbox.iter().filter(|m| m.auth.is_some()).count();
    f.ok(format!(
        "sender authentication: spf = {}, dkim = {}, dmarc = {}, {} trusted ARC sealer(s), {overrides} mailbox override(s); DNS from {resolver}",
        a.spf,
        a.dkim,
        a.dmarc,
        a.trusted_arc_sealers.len()
    ));
    if let Err(e) = mailgate::auth::Authenticator::new(a) {
        f.error(format!("sender authentication cannot start its resolver: {e}"));
    }
}

/// The spool directory can be created and written.
/// Directories this check creates are removed again (the server creates them when it starts).
fn spool_check(dir: &Path, f: &mut Findings) {
    let missing: Vec<&Path> = dir.ancestors().take_while(|a| !a.as_os_str().is_empty() && !a.exists()).collect();
    if let Err(e) = std::fs::create_dir_all(dir) {
        f.error(format!("spool directory {} cannot be created: {e}", dir.display()));
        return;
    }
    match probe_write(dir) {
        Ok(()) if missing.is_empty() => f.ok(format!("spool directory {} is writable", dir.display())),
        Ok(()) => f.ok(format!("spool directory {} does not exist yet; it can be created and written", dir.display())),
        Err(e) => f.error(format!("spool directory {} is not writable: {e}", dir.display())),
    }
    for created in missing {
        let _ = std::fs::remove_dir(created);
    }
}

/// Creates, writes and removes a probe file in `dir`.
fn probe_write(dir: &Path) -> std::io::Result<()> {
    let probe: PathBuf = dir.join(format!(".mailgate-check-{}", std::process::id()));
    std::fs::write(&probe, b"probe")?;
    std::fs::remove_file(&probe)
}

/// Every listener and the HTTP API can bind (or are held by the running server).
fn bind_checks(config: &Config, running: bool, f: &mut Findings) {
    let mut seen = HashSet::new();
    let mut targets: Vec<(String, BindAddress)> = Vec::new();
    for l in &config.listen {
        if let Ok(a) = l.bind_address() {
            targets.push((format!("{} listener", l.protocol.as_str()), a));
        }
    }
    if let Ok(Some(addr)) = config.http.listen_addr() {
        targets.push(("HTTP API".to_string(), BindAddress::Tcp(addr)));
    }
    for l in &config.listen {
        if let Some(tls) = &l.tls {
            // Read and parsed as `serve` loads them: a missing file, bad PEM, a key that is not
            // the certificate's.
            match mailgate::frontend::tls::check_files(tls) {
                Ok(cert) => f.ok(format!("listener {}: TLS certificate {}: {cert}", l.address, tls.cert.display())),
                Err(e) => f.error(format!("listener {}: TLS: {e}", l.address)),
            }
        }
    }
    for (what, address) in targets {
        if !seen.insert(address.to_string()) {
            f.error(format!("{what} {address}: the address is used twice"));
            continue;
        }
        match address {
            BindAddress::Tcp(addr) => tcp_check(&what, addr, running, f),
            BindAddress::Unix(path) => unix_check(&what, &path, running, f),
        }
    }
}

fn tcp_check(what: &str, addr: SocketAddr, running: bool, f: &mut Findings) {
    match std::net::TcpListener::bind(addr) {
        Ok(_) => f.ok(format!("{what} {addr} can be bound")),
        Err(e) if e.kind() == ErrorKind::AddrInUse && running => {
            f.ok(format!("{what} {addr} is in use, presumably by the running mailgate server"))
        }
        Err(e) if e.kind() == ErrorKind::AddrInUse => {
            f.error(format!("{what} {addr} is already in use by another program"))
        }
        Err(e) if e.kind() == ErrorKind::PermissionDenied => {
            f.error(format!("{what} {addr}: permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)"))
        }
        Err(e) if e.kind() == ErrorKind::AddrNotAvailable => {
            f.error(format!("{what} {addr}: no local interface has this address"))
        }
        Err(e) => f.error(format!("{what} {addr} cannot be bound: {e}")),
    }
}

fn unix_check(what: &str, path: &Path, running: bool, f: &mut Findings) {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        f.error(format!("{what} unix:{}: directory {} does not exist", path.display(), parent.display()));
        return;
    }
    match probe_write(parent) {
        Ok(()) if path.exists() && running => {
            f.ok(format!("{what} unix:{} exists, presumably the running mailgate server's socket", path.display()))
        }
        Ok(()) => f.ok(format!("{what} unix:{}: directory {} is writable", path.display(), parent.display())),
        Err(e) => {
            f.error(format!("{what} unix:{}: directory {} is not writable: {e}", path.display(), parent.display()))
        }
    }
}

mod delivery;
#[cfg(test)]
mod tests;

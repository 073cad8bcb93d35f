//! Sender authentication, the I/O side: SPF, DKIM, DMARC and ARC through mail-auth 0.13, with
//! DNS from `[auth] nameservers` (or the system resolver) and bounded caches shared by every
//! session. The decisions are in `gate::auth` (pure).
//!
//! A DNS failure never passes silently: lookups that fail or time out become `temperror`.
//! Each check (SPF; DKIM, ARC and DMARC at the end of DATA) also has an overall deadline of four
//! times `[auth] timeout`, after which it is a `temperror` too.

mod arc;
mod cache;
mod message;
mod negative;
mod types;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::Duration;

use mail_auth::hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use mail_auth::hickory_resolver::system_conf::read_system_conf;
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{MX, MessageAuthenticator, Parameters, RecordSet, SpfOutput, SpfResult, Txt};

use crate::config::{AuthConfig, ConfigError};
pub use cache::DnsCache;
pub use types::{ArcCheck, AuthResult, DkimSig, DmarcCheck, Identity, MessageCheck, Policy, ResultPieces, SpfCheck};

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("DNS resolver: {0}")]
    Resolver(String),
}

/// Cache sizes (entries).
const TXT_CACHE: usize = 8192;
const ADDR_CACHE: usize = 4096;
/// DNS attempts per lookup.
const ATTEMPTS: usize = 2;

type Params<'x, P> = Parameters<
    'x,
    P,
    DnsCache<Box<str>, Txt>,
    DnsCache<Box<str>, RecordSet<MX>>,
    DnsCache<Box<str>, RecordSet<Ipv4Addr>>,
    DnsCache<Box<str>, RecordSet<Ipv6Addr>>,
    DnsCache<IpAddr, RecordSet<Box<str>>>,
>;

struct Inner {
    auth: MessageAuthenticator,
    txt: DnsCache<Box<str>, Txt>,
    mx: DnsCache<Box<str>, RecordSet<MX>>,
    ipv4: DnsCache<Box<str>, RecordSet<Ipv4Addr>>,
    ipv6: DnsCache<Box<str>, RecordSet<Ipv6Addr>>,
    ptr: DnsCache<IpAddr, RecordSet<Box<str>>>,
    deadline: Duration,
    /// One lookup's timeout (`[auth] timeout`).
    lookup_timeout: Duration,
}

/// One shared authenticator: clone it freely (an `Arc` inside).
#[derive(Clone)]
pub struct Authenticator(Arc<Inner>);

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator").field("deadline", &self.0.deadline).finish_non_exhaustive()
    }
}

impl Authenticator {
    /// `[auth] nameservers` empty: the system resolver (/etc/resolv.conf); else those servers
    /// over UDP and TCP. `[auth] timeout` per lookup, two attempts.
    pub fn new(cfg: &AuthConfig) -> Result<Authenticator, AuthError> {
        let addrs = cfg.nameserver_addrs()?;
        let (config, mut opts) = if addrs.is_empty() {
            read_system_conf().map_err(|e| AuthError::Resolver(format!("system resolver: {e}")))?
        } else {
            let servers = addrs
                .iter()
                .map(|a| {
                    let mut ns = NameServerConfig::udp_and_tcp(a.ip());
                    for c in &mut ns.connections {
                        c.port = a.port();
                    }
                    ns
                })
                .collect();
            (ResolverConfig::from_name_servers(servers), ResolverOpts::default())
        };
        opts.timeout = cfg.timeout;
        opts.attempts = ATTEMPTS;
        // many sessions share one connection per server: do not turn load into temperrors
        opts.max_active_requests = opts.max_active_requests.max(512);
        let auth = MessageAuthenticator::new(config, opts).map_err(|e| AuthError::Resolver(e.to_string()))?;
        Ok(Authenticator(Arc::new(Inner {
            auth,
            txt: DnsCache::new(TXT_CACHE),
            mx: DnsCache::new(ADDR_CACHE),
            ipv4: DnsCache::new(ADDR_CACHE),
            ipv6: DnsCache::new(ADDR_CACHE),
            ptr: DnsCache::new(ADDR_CACHE),
            deadline: cfg.timeout.saturating_mul(4),
            lookup_timeout: cfg.timeout,
        })))
    }

    fn params<P>(&self, params: P) -> Params<'_, P> {
        let i = &self.0;
        Parameters {
            params,
            cache_txt: Some(&i.txt),
            cache_mx: Some(&i.mx),
            cache_ptr: Some(&i.ptr),
            cache_ipv4: Some(&i.ipv4),
            cache_ipv6: Some(&i.ipv6),
        }
    }

    /// SPF (RFC 7208) for MAIL FROM, or for the HELO identity when the sender is null.
    /// `hostname` is our `[server] hostname` (the `%{r}` macro).
    pub async fn spf(&self, ip: IpAddr, helo: &str, mail_from: &str, hostname: &str) -> SpfCheck {
        let base = SpfCheck::new(AuthResult::None, ip, helo, mail_from);
        let params = match base.identity {
            Identity::Helo => SpfParameters::verify_ehlo(ip, &base.helo, hostname),
            Identity::MailFrom => SpfParameters::verify_mail_from(ip, &base.helo, hostname, &base.mail_from),
        };
        let output = tokio::time::timeout(self.0.deadline, self.0.auth.verify_spf(self.params(params)))
            .await
            .unwrap_or_else(|_| SpfOutput::new(base.domain.clone()).with_result(SpfResult::TempError));
        let explanation = output.explanation().map(str::to_string);
        SpfCheck { result: output.result().into(), explanation, ..base }
    }

    /// End of DATA: every DKIM signature, the ARC chain, and DMARC for the From domain (with the
    /// SPF result of the transaction). `ip`, `helo` and `mail_from` are the transaction's (the
    /// ones `spf` was computed for); when SPF was not run, pass [`SpfCheck::not_checked`].
    /// Call it on the message as received, before removing or adding any header.
    pub async fn message(&self, raw: &[u8], spf: &SpfCheck, ip: IpAddr, helo: &str, mail_from: &str) -> MessageCheck {
        if spf.checked {
            message::check(self, raw, spf, ip).await
        } else {
            message::check(self, raw, &SpfCheck::not_checked(ip, helo, mail_from), ip).await
        }
    }
}

/// The test suite's DNS server (tests/common/dns.rs), for tests that need real answers.
#[cfg(test)]
#[path = "../../tests/common/dns.rs"]
mod test_dns;
#[cfg(test)]
mod tests;

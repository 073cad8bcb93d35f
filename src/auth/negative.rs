//! "No record" answers for the DMARC tree walk, kept in mailgate's TXT cache.
//!
//! mail-auth caches the TXT records it finds (and records that do not parse), but not a name
//! without any: for those it asks the resolver again on every message. The walk of almost every
//! sender's domain ends at such a name (`_dmarc.com.` for `example.com`), so every checked
//! message went through hickory's own cache (perf: about a quarter of the DKIM/DMARC check's
//! CPU), or to the DNS server itself when its answers carry no SOA to cache them by. Before the
//! walk, [`prime`] looks up the walk's names the cache does not hold, through mail-auth, and
//! keeps each "no record" answer for [`NEGATIVE_TTL`]; the walk then finds everything cached.
//! The caller bounds the priming by one lookup's timeout: with a slow or failing DNS it gives
//! up, and the walk meets the failure as it did before.

use std::time::{Duration, Instant};

use mail_auth::dmarc::{Dmarc, Psd};
use mail_auth::{DnsError, Error, ResolverCache, Txt};

use super::Authenticator;

/// How long a "no record" answer is kept. The zone's SOA says how long it may be (RFC 2308),
/// but mail-auth does not pass it on; one minute is below the usual SOA minimum, so a DMARC
/// record published meanwhile is seen within a minute.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(60);

/// The names mail-auth 0.13's DMARC tree walk asks for, in its order (RFC 9989 section 4.10):
/// the domain itself, then (from 8 labels on) its 7-label suffix, then one label less at a
/// time down to the top-level domain. None for a single label.
pub fn walk_names(domain: &str) -> Vec<String> {
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    let labels: Vec<&str> = domain.split('.').collect();
    let total = labels.len();
    if total < 2 || labels.iter().any(|l| l.is_empty()) {
        return Vec::new();
    }
    let mut names = Vec::new();
    let mut count = total;
    loop {
        names.push(format!("_dmarc.{}.", labels[total - count..].join(".")));
        if count == 1 {
            return names;
        }
        count = if count >= 8 { 7 } else { count - 1 };
    }
}

/// Looks up every name of the walk for `domain` that the cache does not hold, until a record
/// that ends the walk (`psd=y` or `psd=n`). Records go into the cache through mail-auth; "no
/// record" answers are added here. A temporary failure stops the priming: the walk itself
/// then meets it and reports it.
pub async fn prime(a: &Authenticator, domain: &str) {
    if !domain.is_ascii() {
        // mail-auth walks the A-label form; priming other names would only cost lookups.
        return;
    }
    let cache = &a.0.txt;
    for name in walk_names(domain) {
        let found = match cache.get(name.as_str()) {
            Some(Txt::Dmarc(record)) => Some(record),
            Some(_) => None,
            None => match a.0.auth.txt_lookup::<Dmarc>(name.as_str(), Some(cache)).await {
                Ok(record) => Some(record),
                Err(e @ Error::Dns(DnsError::RecordNotFound(_))) => {
                    cache.insert(name.into_boxed_str(), Txt::Error(e), Instant::now() + NEGATIVE_TTL);
                    None
                }
                // Not a DMARC record: mail-auth cached that itself.
                Err(Error::Dns(DnsError::InvalidRecordType)) => None,
                Err(_) => return,
            },
        };
        if found.is_some_and(|r| matches!(r.psd, Psd::Yes | Psd::No)) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_dns as dns;
    use super::*;

    #[tokio::test]
    async fn no_record_answers_are_cached_and_a_second_walk_asks_nothing() {
        let mut zone = dns::Zone::default();
        zone.txt("_dmarc.origin.test", "v=DMARC1; p=reject");
        zone.servfail("_dmarc.broken.test");
        let server = dns::DnsServer::start(zone);
        let cfg = crate::config::AuthConfig {
            nameservers: vec![server.addr()],
            timeout: Duration::from_millis(500),
            ..Default::default()
        };
        let a = Authenticator::new(&cfg).unwrap();
        let cached = |name: &str| a.0.txt.get(name);
        let not_found = |t: Option<Txt>| matches!(t, Some(Txt::Error(Error::Dns(DnsError::RecordNotFound(_)))));
        prime(&a, "Sub.Origin.test").await;
        assert!(not_found(cached("_dmarc.sub.origin.test.")));
        assert!(matches!(cached("_dmarc.origin.test."), Some(Txt::Dmarc(_))));
        assert!(not_found(cached("_dmarc.test.")));
        let before = server.queries();
        prime(&a, "sub.origin.test").await;
        assert_eq!(server.queries(), before, "everything came from the cache");
        // A temporary failure is not cached as "no record", and stops the priming.
        prime(&a, "x.broken.test").await;
        assert!(not_found(cached("_dmarc.x.broken.test.")));
        assert!(cached("_dmarc.broken.test.").is_none());
    }

    #[test]
    fn the_walk_asks_for_each_suffix_down_to_the_tld() {
        assert_eq!(walk_names("Sub.Origin.test"), ["_dmarc.sub.origin.test.", "_dmarc.origin.test.", "_dmarc.test."]);
        assert_eq!(walk_names("example.com."), ["_dmarc.example.com.", "_dmarc.com."]);
        assert!(walk_names("localhost").is_empty() && walk_names("a..b").is_empty() && walk_names("").is_empty());
        // From 8 labels on, the second name is the 7-label suffix (the eight-query cap).
        let nine = walk_names("a.b.c.d.e.f.g.h.i");
        assert_eq!(nine.len(), 8);
        assert_eq!((nine[0].as_str(), nine[1].as_str()), ("_dmarc.a.b.c.d.e.f.g.h.i.", "_dmarc.c.d.e.f.g.h.i."));
        assert_eq!(nine[7], "_dmarc.i.");
    }
}

//! `[auth]`: sender authentication (SPF, DKIM, DMARC, ARC), with per-route overrides, and the
//! partial per-mailbox override `[[mailbox]] auth = { ... }`. Modes are enums: an unknown value is
//! a parse error. Precedence (see `gate::auth::policy_for`): `[auth]`, then the mailbox's `auth`,
//! then `[auth.routes.ROUTE]`, then the mailbox's `auth.routes.ROUTE`.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;
use super::defaults::{default_auth_timeout, default_dkim, default_dmarc, default_spf};
use crate::job::Route;

/// Declares a config mode enum with its kebab-case words. `Debug` and `Display` print the config
/// word, and the enum compares equal to it (`SpfMode::Off == "off"`).
macro_rules! mode_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $word:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
        pub enum $name {
            $($(#[$vdoc])* #[serde(rename = $word)] $variant),+
        }
        impl $name {
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $word),+ }
            }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{:?}", self.as_str())
            }
        }
        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }
    };
}

mode_enum!(
    /// What a failed SPF check (RFC 7208) does.
    SpfMode {
        /// Never refuses for SPF (it is still checked when DMARC needs it).
        Off = "off",
        /// Records the result only.
        Record = "record",
        /// Refuses `fail` (550 5.7.23).
        RejectFail = "reject-fail",
        /// Refuses `fail` and `softfail`.
        RejectSoftfail = "reject-softfail",
    }
);

mode_enum!(
    /// What DKIM (RFC 6376) results do.
    DkimMode {
        /// Records the results only.
        Record = "record",
        /// Not checked (with `spf` and `dmarc` off too, no DNS lookup is made at all).
        Off = "off",
        /// Refuses a message without a passing, non-weak signature (550 5.7.20).
        RequirePass = "require-pass",
    }
);

mode_enum!(
    /// What DMARC (RFC 7489) results do.
    DmarcMode {
        /// Never refuses for DMARC, not even for a missing or multiple From.
        Off = "off",
        /// Records the result only (a missing or multiple From is still refused).
        Record = "record",
        /// Obeys the published policy: `p=reject` failures are refused, `p=quarantine`
        /// failures are accepted and marked.
        Enforce = "enforce",
        /// Refuses anything but a DMARC pass.
        RequirePass = "require-pass",
    }
);

/// `[auth]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// `"ip:port"` or `"ip"` (port 53), UDP and TCP; empty: the system resolver.
    #[serde(default)]
    pub nameservers: Vec<String>,
    /// Per DNS lookup (two attempts).
    #[serde(default = "default_auth_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(default = "default_spf")]
    pub spf: SpfMode,
    #[serde(default = "default_dkim")]
    pub dkim: DkimMode,
    #[serde(default = "default_dmarc")]
    pub dmarc: DmarcMode,
    /// ARC sealers (d= of the ARC-Seal) whose passing chain stands in for a failed SPF/DMARC.
    #[serde(default)]
    pub trusted_arc_sealers: Vec<String>,
    /// `[auth.routes.ROUTE]` overrides.
    #[serde(default)]
    pub routes: RouteAuthOverrides,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            nameservers: Vec::new(),
            timeout: default_auth_timeout(),
            spf: default_spf(),
            dkim: default_dkim(),
            dmarc: default_dmarc(),
            trusted_arc_sealers: Vec::new(),
            routes: RouteAuthOverrides::default(),
        }
    }
}

/// A partial override: every field that is set replaces the one it overrides.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthOverride {
    #[serde(default)]
    pub spf: Option<SpfMode>,
    #[serde(default)]
    pub dkim: Option<DkimMode>,
    #[serde(default)]
    pub dmarc: Option<DmarcMode>,
    #[serde(default)]
    pub trusted_arc_sealers: Option<Vec<String>>,
}

/// `[[mailbox]] auth = { ... }`: a partial override of `[auth]`, with its own route overrides.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MailboxAuthConfig {
    #[serde(default)]
    pub spf: Option<SpfMode>,
    #[serde(default)]
    pub dkim: Option<DkimMode>,
    #[serde(default)]
    pub dmarc: Option<DmarcMode>,
    #[serde(default)]
    pub trusted_arc_sealers: Option<Vec<String>>,
    #[serde(default)]
    pub routes: RouteAuthOverrides,
}

impl MailboxAuthConfig {
    /// The mailbox-level part (without the routes).
    pub fn as_override(&self) -> AuthOverride {
        AuthOverride {
            spf: self.spf,
            dkim: self.dkim,
            dmarc: self.dmarc,
            trusted_arc_sealers: self.trusted_arc_sealers.clone(),
        }
    }
}

/// One optional override per route (the names of `job::Route`); an unknown route name is a parse
/// error.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteAuthOverrides {
    #[serde(default)]
    pub reply: Option<AuthOverride>,
    #[serde(default)]
    pub new_issue: Option<AuthOverride>,
    #[serde(default)]
    pub note_on_issuable: Option<AuthOverride>,
    #[serde(default)]
    pub unsubscribe: Option<AuthOverride>,
    #[serde(default)]
    pub new_merge_request: Option<AuthOverride>,
    #[serde(default)]
    pub service_desk: Option<AuthOverride>,
    #[serde(default)]
    pub key: Option<AuthOverride>,
    #[serde(default)]
    pub unknown: Option<AuthOverride>,
}

impl RouteAuthOverrides {
    pub fn get(&self, route: Route) -> Option<&AuthOverride> {
        match route {
            Route::Reply => self.reply.as_ref(),
            Route::NewIssue => self.new_issue.as_ref(),
            Route::NoteOnIssuable => self.note_on_issuable.as_ref(),
            Route::Unsubscribe => self.unsubscribe.as_ref(),
            Route::NewMergeRequest => self.new_merge_request.as_ref(),
            Route::ServiceDesk => self.service_desk.as_ref(),
            Route::Key => self.key.as_ref(),
            Route::Unknown => self.unknown.as_ref(),
        }
    }

    fn all(&self) -> impl Iterator<Item = &AuthOverride> {
        [
            &self.reply,
            &self.new_issue,
            &self.note_on_issuable,
            &self.unsubscribe,
            &self.new_merge_request,
            &self.service_desk,
            &self.key,
            &self.unknown,
        ]
        .into_iter()
        .flatten()
    }
}

impl AuthConfig {
    /// The configured nameservers as socket addresses (`ip` alone means port 53).
    pub fn nameserver_addrs(&self) -> Result<Vec<SocketAddr>, ConfigError> {
        self.nameservers
            .iter()
            .map(|s| {
                let s = s.trim();
                s.parse::<SocketAddr>()
                    .or_else(|_| s.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                    .map_err(|_| ConfigError::Invalid(format!("[auth] nameserver {s:?}: expected ip:port or ip")))
            })
            .collect()
    }

    /// Structural problems of `[auth]` and of the mailboxes' `auth` (for `Config::problems`).
    pub fn problems<'a>(&self, mailboxes: impl Iterator<Item = (&'a str, &'a MailboxAuthConfig)>) -> Vec<String> {
        let mut out = Vec::new();
        if let Err(e) = self.nameserver_addrs() {
            out.push(e.to_string());
        }
        if self.timeout.is_zero() {
            out.push("[auth] timeout must be more than 0s".into());
        }
        let sealers = |list: &[String], place: &str, out: &mut Vec<String>| {
            for s in list.iter().filter(|s| !is_domain(s)) {
                out.push(format!("{place} trusted_arc_sealers: {s:?} is not a domain name"));
            }
        };
        sealers(&self.trusted_arc_sealers, "[auth]", &mut out);
        for o in self.routes.all() {
            sealers(o.trusted_arc_sealers.as_deref().unwrap_or_default(), "[auth.routes]", &mut out);
        }
        for (name, m) in mailboxes {
            let place = format!("mailbox {name:?} auth");
            sealers(m.trusted_arc_sealers.as_deref().unwrap_or_default(), &place, &mut out);
            for o in m.routes.all() {
                sealers(o.trusted_arc_sealers.as_deref().unwrap_or_default(), &place, &mut out);
            }
        }
        out
    }
}

fn is_domain(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    const BASE: &str = "[[mailbox]]\nname = \"incoming\"\naddress = \"incoming+%{key}@in.example\"\n";

    fn parse(extra: &str) -> Result<Config, ConfigError> {
        Config::from_toml(&format!("{BASE}{extra}"), Path::new("t.toml"))
    }

    #[test]
    fn defaults_follow_design() {
        let a = AuthConfig::default();
        assert_eq!((a.spf, a.dkim, a.dmarc), (SpfMode::RejectFail, DkimMode::Record, DmarcMode::Enforce));
        assert_eq!(a.timeout, Duration::from_secs(5));
        assert!(a.nameservers.is_empty() && a.trusted_arc_sealers.is_empty());
        assert_eq!(a.routes, RouteAuthOverrides::default());
        assert_eq!(
            format!("{:?} {}", SpfMode::RejectSoftfail, DmarcMode::RequirePass),
            "\"reject-softfail\" require-pass"
        );
        assert!(SpfMode::Off == "off" && DkimMode::RequirePass != "record");
    }

    #[test]
    fn full_section_parses() {
        let c = parse(
            "[auth]\nnameservers = [\"127.0.0.1:5353\", \"::1\"]\ntimeout = \"2s\"\nspf = \"reject-softfail\"\n\
             dkim = \"require-pass\"\ndmarc = \"require-pass\"\ntrusted_arc_sealers = [\"lists.example.org\"]\n\
             [auth.routes.new_issue]\ndmarc = \"require-pass\"\n[auth.routes.service_desk]\nspf = \"off\"\n",
        )
        .unwrap();
        let a = &c.auth;
        assert_eq!(a.timeout, Duration::from_secs(2));
        assert_eq!(
            a.nameserver_addrs().unwrap(),
            vec!["127.0.0.1:5353".parse::<SocketAddr>().unwrap(), "[::1]:53".parse().unwrap()]
        );
        assert_eq!((a.spf, a.dkim, a.dmarc), (SpfMode::RejectSoftfail, DkimMode::RequirePass, DmarcMode::RequirePass));
        assert_eq!(a.routes.get(Route::NewIssue).and_then(|o| o.dmarc), Some(DmarcMode::RequirePass));
        assert_eq!(a.routes.get(Route::ServiceDesk).and_then(|o| o.spf), Some(SpfMode::Off));
        assert_eq!(a.routes.get(Route::Reply), None);
    }

    #[test]
    fn mailbox_override_is_partial() {
        let c = parse(
            "auth = { dmarc = \"require-pass\", routes = { reply = { spf = \"record\" } } }\n\
             [[mailbox]]\nname = \"plain\"\naddress = \"plain@in.example\"\n",
        )
        .unwrap();
        let m = c.mailbox[0].auth.as_ref().unwrap();
        assert_eq!((m.spf, m.dkim, m.dmarc), (None, None, Some(DmarcMode::RequirePass)));
        assert_eq!(m.routes.get(Route::Reply).and_then(|o| o.spf), Some(SpfMode::Record));
        assert_eq!(m.as_override().dmarc, Some(DmarcMode::RequirePass));
        assert!(c.mailbox[1].auth.is_none());
    }

    #[test]
    fn bad_values_are_errors() {
        for bad in [
            "[auth]\nspf = \"reject\"\n",
            "[auth]\ndkim = \"none\"\n",
            "[auth]\ndmarc = \"quarantine\"\n",
            "[auth]\ntimeout = \"soon\"\n",
            "[auth]\nspff = \"off\"\n",
            "[auth.routes.new_issues]\ndmarc = \"enforce\"\n",
            "[auth.routes.reply]\nnameservers = []\n",
            "auth = { nameservers = [] }\n",
            "auth = { dmarc = \"strict\" }\n",
            "[auth]\nnameservers = [\"dns.example:53\"]\n",
            "[auth]\ntimeout = \"0s\"\n",
            "[auth]\ntrusted_arc_sealers = [\"a b\"]\n",
            "auth = { routes = { key = { trusted_arc_sealers = [\"\"] } } }\n",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}

//! Mailbox address templates and key extraction (notes/gitlab.md, "Key from an address").
//!
//! A template has at most one `%{key}` placeholder, in the local part. GitLab turns it into a
//! greedy `(.+)` and anchors the match, allowing an optional `<`…`>` around the address; the
//! match is case-sensitive. mailgate keeps the local part case-sensitive and compares the domain
//! case-insensitively (SMTP domains are). A template without `%{key}` is a dedicated address.

use crate::config::{MailboxConfig, RouteSet};

use super::GateError;

/// The placeholder GitLab replaces by the key.
pub const PLACEHOLDER: &str = "%{key}";

/// One mailbox's address template, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub mailbox: String,
    /// The local part before `%{key}`, or the whole local part of a dedicated address.
    pub local_prefix: String,
    /// The local part after `%{key}` (empty for a dedicated address).
    pub local_suffix: String,
    /// Lowercase.
    pub domain: String,
    /// Whether the template has a `%{key}`.
    pub keyed: bool,
    /// Host of `References: <reply-KEY@reply_host>` (compared exactly).
    pub reply_host: String,
    pub routes: RouteSet,
    /// Local part of the base address (empty when the template has none, e.g. `%{key}@host`).
    base_local: String,
}

impl Template {
    pub fn parse(mailbox: &MailboxConfig) -> Result<Template, GateError> {
        let bad = |msg: String| GateError::BadTemplate { name: mailbox.name.clone(), msg };
        let address = mailbox.address.trim();
        if address.chars().any(|c| c.is_whitespace() || c.is_control() || c == '<' || c == '>') {
            return Err(bad(format!("address {address:?} must be a bare address (no spaces, no <>)")));
        }
        let Some((local, domain)) = address.rsplit_once('@') else {
            return Err(bad(format!("address {address:?} has no @domain")));
        };
        if domain.is_empty() {
            return Err(bad(format!("address {address:?} has an empty domain")));
        }
        // Compared lowercased: the domain is stored lowercased, and `%{KEY}` would become one.
        if domain.to_ascii_lowercase().contains(PLACEHOLDER) {
            return Err(bad(format!("address {address:?}: {PLACEHOLDER} must be in the local part")));
        }
        if local.is_empty() {
            return Err(bad(format!("address {address:?} has an empty local part")));
        }
        if local.contains('@') {
            return Err(bad(format!("address {address:?} has more than one @")));
        }
        let (local_prefix, local_suffix, keyed) = match local.matches(PLACEHOLDER).count() {
            0 => (local.to_string(), String::new(), false),
            1 => match local.split_once(PLACEHOLDER) {
                Some((p, s)) => (p.to_string(), s.to_string(), true),
                None => {
                    return Err(bad(format!("address {address:?}: cannot split at {PLACEHOLDER}")));
                }
            },
            n => {
                return Err(bad(format!("address {address:?} has {n} {PLACEHOLDER} placeholders, at most one")));
            }
        };
        let domain = domain.to_ascii_lowercase();
        let reply_host = match mailbox.reply_host.as_deref().map(str::trim) {
            Some(h) if !h.is_empty() => h.to_string(),
            _ => domain.clone(),
        };
        let base_local = if keyed { keyed_base_local(&local_prefix, &local_suffix) } else { local_prefix.clone() };
        Ok(Template {
            mailbox: mailbox.name.clone(),
            local_prefix,
            local_suffix,
            domain,
            keyed,
            reply_host,
            routes: mailbox.routes,
            base_local,
        })
    }

    /// The key if `address` (optionally in `<>`, surrounding whitespace ignored) matches
    /// `prefix KEY suffix @domain`. The key is greedy and non-empty.
    pub fn key_of(&self, address: &str) -> Option<String> {
        if !self.keyed {
            return None;
        }
        let (local, domain) = bare(address).rsplit_once('@')?;
        if !domain.eq_ignore_ascii_case(&self.domain) {
            return None;
        }
        let key = local.strip_prefix(self.local_prefix.as_str())?.strip_suffix(self.local_suffix.as_str())?;
        valid_key(key).then(|| key.to_string())
    }

    /// Whether `address` is this template's base address (a dedicated template: the address
    /// itself; a keyed one: the template without the key and its `+`/`-` separator).
    pub fn is_base(&self, address: &str) -> bool {
        if self.base_local.is_empty() {
            return false;
        }
        match bare(address).rsplit_once('@') {
            Some((local, domain)) => local == self.base_local && domain.eq_ignore_ascii_case(&self.domain),
            None => false,
        }
    }

    /// The base address, e.g. `incoming@incoming.example.com` for
    /// `incoming+%{key}@incoming.example.com`. For a template that is only the key
    /// (`%{key}@host`) there is no base address and this is `@host`.
    pub fn base_address(&self) -> String {
        format!("{}@{}", self.base_local, self.domain)
    }

    /// The template as configured (domain lowercased), e.g. `incoming+%{key}@host`.
    pub fn address(&self) -> String {
        if self.keyed {
            format!("{}{PLACEHOLDER}{}@{}", self.local_prefix, self.local_suffix, self.domain)
        } else {
            format!("{}@{}", self.local_prefix, self.domain)
        }
    }

    /// The key of a References message id `reply-KEY@reply_host` (host compared exactly).
    pub fn key_of_reference(&self, id: &str) -> Option<String> {
        let (local, host) = bare(id).rsplit_once('@')?;
        if host != self.reply_host {
            return None;
        }
        let key = local.strip_prefix("reply-")?;
        valid_key(key).then(|| key.to_string())
    }

    /// Whether two templates describe the same addresses.
    pub fn same_addresses(&self, other: &Template) -> bool {
        self.keyed == other.keyed
            && self.local_prefix == other.local_prefix
            && self.local_suffix == other.local_suffix
            && self.domain == other.domain
    }
}

fn keyed_base_local(prefix: &str, suffix: &str) -> String {
    if let Some(p) = prefix.strip_suffix(['+', '-']) {
        format!("{p}{suffix}")
    } else if prefix.is_empty() {
        suffix.strip_prefix(['+', '-']).unwrap_or(suffix).to_string()
    } else {
        format!("{prefix}{suffix}")
    }
}

/// The address without surrounding whitespace and one optional `<` and `>`.
pub fn bare(address: &str) -> &str {
    let a = address.trim();
    let a = a.strip_prefix('<').unwrap_or(a);
    a.strip_suffix('>').unwrap_or(a).trim()
}

/// A key is non-empty and has no whitespace, control characters or angle brackets (GitLab's
/// `.+` allows more; mailgate is stricter so that a key can never break a log line or a reply).
pub fn valid_key(key: &str) -> bool {
    !key.is_empty() && !key.chars().any(|c| c.is_whitespace() || c.is_control() || c == '<' || c == '>')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mb(name: &str, address: &str, reply_host: Option<&str>) -> MailboxConfig {
        MailboxConfig {
            name: name.into(),
            address: address.into(),
            reply_host: reply_host.map(Into::into),
            routes: RouteSet::Gitlab,
            auth: None,
        }
    }

    fn t(address: &str) -> Template {
        Template::parse(&mb("incoming", address, None)).unwrap()
    }

    #[test]
    fn parses_a_sub_address_template() {
        let t = Template::parse(&mb("incoming", "incoming+%{key}@Incoming.Example.COM", None)).unwrap();
        assert_eq!(t.local_prefix, "incoming+");
        assert_eq!(t.local_suffix, "");
        assert_eq!(t.domain, "incoming.example.com");
        assert!(t.keyed);
        assert_eq!(t.reply_host, "incoming.example.com");
        assert_eq!(t.address(), "incoming+%{key}@incoming.example.com");
    }

    #[test]
    fn reply_host_is_configurable() {
        let t = Template::parse(&mb("incoming", "incoming+%{key}@in.example.com", Some("gitlab.example.com"))).unwrap();
        assert_eq!(t.reply_host, "gitlab.example.com");
    }

    #[test]
    fn bad_templates_are_errors() {
        for bad in [
            "incoming+%{key}",
            "incoming+%{key}@",
            "@host",
            "a+%{key}+%{key}@host",
            "incoming@%{key}.host",
            "in+%{key}@%{KEY}.example",
            "in coming+%{key}@host",
            "<incoming+%{key}@host>",
            "a@b@host",
        ] {
            let e = Template::parse(&mb("x", bad, None)).unwrap_err();
            assert!(e.to_string().starts_with("mailbox x: "), "{bad}: {e}");
        }
    }

    #[test]
    fn key_from_a_sub_address() {
        let t = t("incoming+%{key}@host.example");
        assert_eq!(t.key_of("incoming+abc@host.example").as_deref(), Some("abc"));
        assert_eq!(t.key_of("<incoming+abc@host.example>").as_deref(), Some("abc"));
        assert_eq!(t.key_of("  <incoming+abc@host.example> ").as_deref(), Some("abc"));
        // greedy, like GitLab's (.+)
        assert_eq!(t.key_of("incoming+a+b@host.example").as_deref(), Some("a+b"));
        assert_eq!(t.key_of("incoming+gitlab-org/gitlab@host.example").as_deref(), Some("gitlab-org/gitlab"));
        // empty key, other local part, other domain
        assert_eq!(t.key_of("incoming+@host.example"), None);
        assert_eq!(t.key_of("incoming@host.example"), None);
        assert_eq!(t.key_of("other+abc@host.example"), None);
        assert_eq!(t.key_of("incoming+abc@other.example"), None);
        assert_eq!(t.key_of("incoming+abc@host.example.evil"), None);
        assert_eq!(t.key_of("incoming+abc"), None);
        assert_eq!(t.key_of("incoming+a b@host.example"), None);
        assert_eq!(t.key_of("incoming+a\r\nb@host.example"), None);
    }

    #[test]
    fn domain_is_case_insensitive_local_part_is_not() {
        let t = t("incoming+%{key}@host.example");
        assert_eq!(t.key_of("incoming+AbC@HOST.Example").as_deref(), Some("AbC"));
        assert_eq!(t.key_of("Incoming+abc@host.example"), None);
        assert!(t.is_base("incoming@HOST.EXAMPLE"));
        assert!(!t.is_base("INCOMING@host.example"));
    }

    #[test]
    fn catch_all_template() {
        let t = t("incoming-%{key}@host.example");
        assert_eq!(t.key_of("incoming-abc-def@host.example").as_deref(), Some("abc-def"));
        assert_eq!(t.key_of("incoming+abc@host.example"), None);
        assert_eq!(t.base_address(), "incoming@host.example");
        assert!(t.is_base("incoming@host.example"));
        assert!(t.is_base("<incoming@host.example>"));
        assert_eq!(t.key_of("incoming@host.example"), None);
    }

    #[test]
    fn template_with_a_suffix() {
        let m = t("in-%{key}-mail@host");
        assert_eq!(m.key_of("in-abc-mail@host").as_deref(), Some("abc"));
        assert_eq!(m.key_of("in--mail@host"), None);
        assert_eq!(m.key_of("in-mail@host"), None);
        assert_eq!(m.base_address(), "in-mail@host");
        let s = t("%{key}+gitlab@host");
        assert_eq!(s.key_of("abc+gitlab@host").as_deref(), Some("abc"));
        assert_eq!(s.base_address(), "gitlab@host");
    }

    #[test]
    fn key_only_template_has_no_base() {
        let t = t("%{key}@host");
        assert_eq!(t.key_of("anything@host").as_deref(), Some("anything"));
        assert!(!t.is_base("@host"));
        assert_eq!(t.base_address(), "@host");
    }

    #[test]
    fn dedicated_address() {
        let t = t("gitlab-incoming@host.example");
        assert!(!t.keyed);
        assert_eq!(t.local_prefix, "gitlab-incoming");
        assert_eq!(t.key_of("gitlab-incoming@host.example"), None);
        assert_eq!(t.key_of("gitlab-incoming+abc@host.example"), None);
        assert!(t.is_base("gitlab-incoming@Host.Example"));
        assert!(!t.is_base("gitlab-incoming+abc@host.example"));
        assert_eq!(t.base_address(), "gitlab-incoming@host.example");
        assert_eq!(t.address(), "gitlab-incoming@host.example");
    }

    #[test]
    fn base_address_of_sub_address_template() {
        let t = t("incoming+%{key}@host.example");
        assert_eq!(t.base_address(), "incoming@host.example");
        assert!(t.is_base("incoming@host.example"));
        assert!(!t.is_base("incoming+x@host.example"));
        assert!(!t.is_base("incoming@other.example"));
        assert!(!t.is_base("incoming"));
    }

    #[test]
    fn reference_ids() {
        let t = Template::parse(&mb("incoming", "incoming+%{key}@in.example", Some("gitlab.example"))).unwrap();
        assert_eq!(t.key_of_reference("<reply-abc@gitlab.example>").as_deref(), Some("abc"));
        assert_eq!(t.key_of_reference("reply-abc@gitlab.example").as_deref(), Some("abc"));
        assert_eq!(t.key_of_reference("reply-a@b@gitlab.example").as_deref(), Some("a@b"));
        // host compared exactly
        assert_eq!(t.key_of_reference("reply-abc@GITLAB.example"), None);
        assert_eq!(t.key_of_reference("reply-abc@in.example"), None);
        assert_eq!(t.key_of_reference("reply-@gitlab.example"), None);
        assert_eq!(t.key_of_reference("abc@gitlab.example"), None);
    }

    #[test]
    fn same_addresses() {
        assert!(t("incoming+%{key}@host").same_addresses(&t("incoming+%{key}@HOST")));
        assert!(!t("incoming+%{key}@host").same_addresses(&t("incoming-%{key}@host")));
    }
}

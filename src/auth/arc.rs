//! Whether the last ARC hop vouches for the original message: its ARC-Authentication-Results
//! (RFC 8617) must show a pass that is aligned with the From domain. Without this a trusted
//! forwarder that relays a forgery would launder it.

/// `aar` is the ARC-Authentication-Results value (`i=N; authserv-id; method=result props; …`).
pub fn vouches(aar: &str, from_domain: &str) -> bool {
    let from = from_domain.trim().trim_end_matches('.').to_ascii_lowercase();
    if from.is_empty() {
        return false;
    }
    let text = strip_comments(&aar.to_ascii_lowercase());
    text.split(';').any(|method| {
        let mut words = method.split_ascii_whitespace();
        let Some(result) = words.next() else { return false };
        let props: Vec<&str> = words.collect();
        let prop = |name: &str| {
            props.iter().find_map(|p| p.strip_prefix(name).and_then(|v| v.strip_prefix('='))).map(domain_of)
        };
        match result {
            "dmarc=pass" => prop("header.from").is_none_or(|d| aligned(&d, &from)),
            "dkim=pass" => prop("header.d").or_else(|| prop("header.i")).is_some_and(|d| aligned(&d, &from)),
            "spf=pass" => prop("smtp.mailfrom").is_some_and(|d| aligned(&d, &from)),
            _ => false,
        }
    })
}

/// The domain of `user@domain`, `@domain` or `domain`, lower-case, without quotes.
fn domain_of(v: &str) -> String {
    let v = v.trim_matches('"');
    v.rsplit_once('@').map(|(_, d)| d).unwrap_or(v).trim_end_matches('.').to_string()
}

/// Relaxed alignment, approximated without a public-suffix list: the same domain, or one a
/// subdomain of the other.
fn aligned(d: &str, from: &str) -> bool {
    d == from || from.ends_with(&format!(".{d}")) || d.ends_with(&format!(".{from}"))
}

/// Removes RFC 5322 comments `( … )` (nesting allowed), which may contain anything.
fn strip_comments(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut depth = 0usize;
    for c in s.chars() {
        match c {
            '(' => depth += 1,
            ')' if depth > 0 => depth -= 1,
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::vouches;

    #[test]
    fn aligned_passes_vouch() {
        assert!(vouches("i=1; lists.test; dkim=pass header.d=good.test header.s=s1; arc=none", "good.test"));
        assert!(vouches("i=1; lists.test; dkim=pass header.d=good.test", "sub.good.test"));
        assert!(vouches("i=2; mx.test; spf=pass smtp.mailfrom=a@good.test", "good.test"));
        assert!(vouches("i=1; l.test; dmarc=pass (p=reject) header.from=good.test", "good.test"));
    }

    #[test]
    fn forgeries_do_not_vouch() {
        assert!(!vouches(
            "i=1; lists.test; dkim=pass header.d=evil.test; spf=pass smtp.mailfrom=x@evil.test",
            "good.test"
        ));
        assert!(!vouches("i=1; lists.test; dkim=fail header.d=good.test; dmarc=fail", "good.test"));
        assert!(!vouches("i=1; lists.test; dkim=none (dkim=pass header.d=good.test)", "good.test"));
        assert!(!vouches("i=1; lists.test; dkim=pass header.d=good.test.evil.test", "good.test"));
        assert!(!vouches("i=1; lists.test; dkim=pass header.d=good.test", ""));
    }
}

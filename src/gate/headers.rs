//! The key of a message sent to a base or dedicated address, from its headers, in GitLab's
//! order (notes/gitlab.md, "Where the address is looked for"). Every step is linear in the size
//! of the headers.

use std::sync::LazyLock;

use mail_parser::{Header, HeaderValue, Message};
use regex::bytes::Regex;

use super::address::Template;
use crate::job::KeySource;

/// GitLab's order. Every occurrence of a header is tried, top first.
pub const ORDER: [(&str, KeySource); 10] = [
    ("To", KeySource::To),
    ("References", KeySource::References),
    ("Delivered-To", KeySource::DeliveredTo),
    ("X-Delivered-To", KeySource::XDeliveredTo),
    ("Envelope-To", KeySource::EnvelopeTo),
    ("X-Envelope-To", KeySource::XEnvelopeTo),
    ("Received", KeySource::Received),
    ("X-Original-To", KeySource::XOriginalTo),
    ("X-Forwarded-To", KeySource::XForwardedTo),
    ("Cc", KeySource::Cc),
];

/// GitLab's `for\s+<([^<]+)>`, used when mail-parser's Received parser gives no `for` address
/// (it drops addresses with characters such as `/` or `=`, which GitLab keys can contain).
static RECEIVED_FOR: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\bfor\s+<([^<]+)>").expect("constant received regex"));

/// The top-level headers of `msg`, in order (none for an empty `Message::default()`, which
/// mail-parser's own accessors would panic on).
pub fn top<'a, 'x>(msg: &'a Message<'x>) -> &'a [Header<'x>] {
    msg.parts.first().map(|p| p.headers.as_slice()).unwrap_or_default()
}

/// The value of the first top-level header named `name` (case-insensitive).
pub fn first<'a, 'x>(msg: &'a Message<'x>, name: &str) -> Option<&'a HeaderValue<'x>> {
    top(msg).iter().find(|h| h.name.as_str().eq_ignore_ascii_case(name)).map(|h| &h.value)
}

/// The first key for `template` in the headers of `msg`, with where it was found. A dedicated
/// template (no `%{key}`) only gets keys from References.
pub fn find_key(template: &Template, msg: &Message<'_>) -> Option<(String, KeySource)> {
    for (name, source) in ORDER {
        if !template.keyed && source != KeySource::References {
            continue;
        }
        for header in top(msg).iter().filter(|h| h.name.as_str().eq_ignore_ascii_case(name)) {
            let key = match source {
                KeySource::References => references_key(template, &header.value),
                KeySource::Received => received_key(template, header, &msg.raw_message),
                _ => addresses(&header.value).into_iter().find_map(|a| template.key_of(a)),
            };
            if let Some(key) = key {
                return Some((key, source));
            }
        }
    }
    None
}

/// The message ids of a References value: mail-parser gives one id (Text) or several
/// (TextList); ids may also be separated by commas (Exchange, iOS) or lack their `<>`.
pub fn reference_ids<'a>(value: &'a HeaderValue<'_>) -> Vec<&'a str> {
    let parts: Vec<&str> = match value {
        HeaderValue::Text(s) => vec![s.as_ref()],
        HeaderValue::TextList(list) => list.iter().map(|s| s.as_ref()).collect(),
        _ => Vec::new(),
    };
    parts
        .into_iter()
        .flat_map(|p| p.split(|c: char| c.is_whitespace() || c == ','))
        .map(|id| id.trim_start_matches('<').trim_end_matches('>'))
        .filter(|id| !id.is_empty())
        .collect()
}

fn references_key(template: &Template, value: &HeaderValue<'_>) -> Option<String> {
    reference_ids(value).into_iter().find_map(|id| template.key_of_reference(id))
}

/// The `for <addr>` of a Received header: mail-parser's field, else GitLab's regex on the raw
/// header value.
fn received_key(template: &Template, header: &Header<'_>, raw: &[u8]) -> Option<String> {
    if let HeaderValue::Received(r) = &header.value
        && let Some(key) = r.for_.as_deref().and_then(|addr| template.key_of(addr))
    {
        return Some(key);
    }
    let value = raw.get(header.offset_start as usize..header.offset_end as usize)?;
    let caps = RECEIVED_FOR.captures(value)?;
    let addr = std::str::from_utf8(caps.get(1)?.as_bytes()).ok()?;
    template.key_of(addr)
}

/// The addresses of an address-like header value (To, Cc, Delivered-To, …).
fn addresses<'a>(value: &'a HeaderValue<'_>) -> Vec<&'a str> {
    match value {
        HeaderValue::Address(a) => a.iter().filter_map(|addr| addr.address.as_deref()).collect(),
        HeaderValue::Text(s) => vec![s.as_ref()],
        HeaderValue::TextList(list) => list.iter().map(|s| s.as_ref()).collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{MailboxConfig, RouteSet};
    use mail_parser::MessageParser;
    use std::time::{Duration, Instant};

    fn template(address: &str) -> Template {
        Template::parse(&MailboxConfig {
            name: "incoming".into(),
            address: address.into(),
            reply_host: Some("gitlab.example".into()),
            routes: RouteSet::Gitlab,
            auth: None,
        })
        .unwrap()
    }

    fn find(address: &str, headers: &str) -> Option<(String, KeySource)> {
        let raw = format!("{headers}From: a@b.example\r\nSubject: s\r\n\r\nbody\r\n");
        let msg = MessageParser::default().parse(raw.as_bytes()).unwrap();
        find_key(&template(address), &msg)
    }

    const T: &str = "incoming+%{key}@in.example";

    fn hit(key: &str, source: KeySource) -> Option<(String, KeySource)> {
        Some((key.to_string(), source))
    }

    #[test]
    fn to_header_every_address() {
        let h = "To: Foo <foo@x.example>, \"Bar\" <incoming+k1@IN.example>\r\n";
        assert_eq!(find(T, h), hit("k1", KeySource::To));
        let h = "To: foo@x.example\r\nTo: incoming+k2@in.example\r\n";
        assert_eq!(find(T, h), hit("k2", KeySource::To));
        let h = "To: undisclosed-recipients:;\r\nCc: team: incoming+k3@in.example;\r\n";
        assert_eq!(find(T, h), hit("k3", KeySource::Cc));
    }

    #[test]
    fn to_wins_over_references() {
        let h = "References: <reply-r1@gitlab.example>\r\nTo: incoming+t1@in.example\r\n";
        assert_eq!(find(T, h), hit("t1", KeySource::To));
    }

    #[test]
    fn references_forms() {
        let to = "To: incoming@in.example\r\n";
        let single = format!("{to}References: <reply-r1@gitlab.example>\r\n");
        assert_eq!(find(T, &single), hit("r1", KeySource::References));
        let spaces =
            format!("{to}References: <a@b.example>\r\n <reply-r2@gitlab.example> <reply-r3@gitlab.example>\r\n");
        assert_eq!(find(T, &spaces), hit("r2", KeySource::References));
        let commas = format!("{to}References: <a@b.example>,<reply-r4@gitlab.example>\r\n");
        assert_eq!(find(T, &commas), hit("r4", KeySource::References));
        let bare = format!("{to}References: a@b.example, reply-r5@gitlab.example\r\n");
        assert_eq!(find(T, &bare), hit("r5", KeySource::References));
        let second = format!("{to}References: <a@b.example>\r\nReferences: <reply-r6@gitlab.example>\r\n");
        assert_eq!(find(T, &second), hit("r6", KeySource::References));
        // host compared exactly: not the mailbox domain, not another case
        let other = format!("{to}References: <reply-r7@in.example> <reply-r8@GITLAB.example>\r\n");
        assert_eq!(find(T, &other), None);
    }

    #[test]
    fn references_work_for_dedicated_addresses_only_header() {
        let d = "gitlab@in.example";
        let h = "To: incoming+t1@in.example\r\nDelivered-To: gitlab@in.example\r\n\
                 References: <reply-r1@gitlab.example>\r\n";
        assert_eq!(find(d, h), hit("r1", KeySource::References));
        assert_eq!(find(d, "To: gitlab@in.example\r\n"), None);
    }

    #[test]
    fn delivered_to_when_to_has_no_key() {
        let h = "To: incoming@in.example\r\nDelivered-To: incoming+d1@in.example\r\n";
        assert_eq!(find(T, h), hit("d1", KeySource::DeliveredTo));
        let h =
            "To: incoming@in.example\r\nDelivered-To: <other@in.example>\r\nDelivered-To: <incoming+d2@in.example>\r\n";
        assert_eq!(find(T, h), hit("d2", KeySource::DeliveredTo));
    }

    #[test]
    fn header_order() {
        let all = [
            ("Cc", "cc", KeySource::Cc),
            ("X-Forwarded-To", "xft", KeySource::XForwardedTo),
            ("X-Original-To", "xot", KeySource::XOriginalTo),
            ("Received", "rcv", KeySource::Received),
            ("X-Envelope-To", "xet", KeySource::XEnvelopeTo),
            ("Envelope-To", "et", KeySource::EnvelopeTo),
            ("X-Delivered-To", "xdt", KeySource::XDeliveredTo),
            ("Delivered-To", "dt", KeySource::DeliveredTo),
        ];
        // Written bottom-up in the message, found in GitLab's order; drop the winner each round.
        for n in (1..=all.len()).rev() {
            let mut h = String::new();
            for (name, key, _) in &all[..n] {
                if *name == "Received" {
                    h.push_str(&format!(
                        "Received: from a by b for <incoming+{key}@in.example>; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
                    ));
                } else {
                    h.push_str(&format!("{name}: <incoming+{key}@in.example>\r\n"));
                }
            }
            let (_, key, source) = all[n - 1];
            assert_eq!(find(T, &h), hit(key, source), "{h}");
        }
    }

    #[test]
    fn header_names_are_case_insensitive() {
        let h = "x-original-to: incoming+k@in.example\r\n";
        assert_eq!(find(T, h), hit("k", KeySource::XOriginalTo));
    }

    #[test]
    fn received_for_top_header_first() {
        let h = "Received: from a by b with ESMTP id 1 for <other@in.example>; Mon, 1 Jan 2024\r\n\
                 Received: from c by d with ESMTP id 2 for <incoming+rc1@in.example>; Mon, 1 Jan 2024\r\n\
                 Received: from e by f with ESMTP id 3 for <incoming+rc2@in.example>; Mon, 1 Jan 2024\r\n";
        assert_eq!(find(T, h), hit("rc1", KeySource::Received));
    }

    #[test]
    fn received_for_with_characters_mail_parser_drops() {
        let h = "Received: from mail.example (mail.example [192.0.2.1])\r\n\
                 \tby mx.in.example (Postfix) with ESMTPS id 4A1B\r\n\
                 \tfor <incoming+gitlab-org/gitlab@in.example>; Mon, 1 Jan 2024 00:00:00 +0000\r\n";
        assert_eq!(find(T, h), hit("gitlab-org/gitlab", KeySource::Received));
        let h = "Received: by mx for <incoming+a=b_c@in.example>; Mon, 1 Jan 2024 00:00:00 +0000\r\n";
        assert_eq!(find(T, h), hit("a=b_c", KeySource::Received));
    }

    #[test]
    fn nothing_found() {
        assert_eq!(find(T, "To: incoming@in.example\r\nCc: x@y.example\r\n"), None);
        assert_eq!(find(T, ""), None);
        assert_eq!(find_key(&template(T), &Message::default()), None);
    }

    #[test]
    fn headers_only_parse() {
        let raw = b"Subject: a\r\nX-Original-To: incoming+k@in.example\r\n\r\nbody";
        let msg = MessageParser::default().parse_headers(raw).unwrap();
        assert_eq!(find_key(&template(T), &msg), hit("k", KeySource::XOriginalTo));
        assert!(matches!(first(&msg, "subject"), Some(HeaderValue::Text(s)) if s == "a"));
        assert!(first(&Message::default(), "subject").is_none());
    }

    #[test]
    fn received_scan_is_linear() {
        let mut h = String::from("Received: from a by b ");
        h.push_str(&"for <<".repeat(100_000));
        h.push_str("\r\n");
        let start = Instant::now();
        assert_eq!(find(T, &h), None);
        assert!(start.elapsed() < Duration::from_secs(2), "{:?}", start.elapsed());
    }

    #[test]
    fn references_scan_is_linear() {
        let mut h = String::from("To: incoming@in.example\r\nReferences:");
        for i in 0..100_000 {
            h.push_str(&format!(" <id{i}@x.example>"));
        }
        h.push_str(" <reply-last@gitlab.example>\r\n");
        let start = Instant::now();
        assert_eq!(find(T, &h), hit("last", KeySource::References));
        assert!(start.elapsed() < Duration::from_secs(2), "{:?}", start.elapsed());
    }
}

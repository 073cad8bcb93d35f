//! Auto-generated mail (notes/gitlab.md, "Auto-generated mail"): GitLab drops mail with
//! `Auto-Submitted` present and not `no`, or `X-Autoreply: yes` (exact, case-sensitive values).
//! mailgate also treats a null sender (bounces) as auto-generated.

use std::borrow::Cow;

use mail_parser::{HeaderValue, Message};

/// Whether the envelope sender is the null sender (`MAIL FROM:<>`), given as `""` or `"<>"`.
pub fn is_null_sender(mail_from: &str) -> bool {
    let s = mail_from.trim();
    s.is_empty() || s == "<>"
}

/// Whether the message says it was generated automatically: any `Auto-Submitted` header whose
/// value is not exactly `no` (an empty one included), or any `X-Autoreply` that is exactly `yes`.
pub fn is_auto_submitted(msg: &Message<'_>) -> bool {
    super::headers::top(msg).iter().any(|h| {
        let name = h.name.as_str();
        if name.eq_ignore_ascii_case("Auto-Submitted") {
            text(&h.value).is_none_or(|v| v != "no")
        } else if name.eq_ignore_ascii_case("X-Autoreply") {
            text(&h.value).is_some_and(|v| v == "yes")
        } else {
            false
        }
    })
}

/// The trimmed text of an unstructured header value; `None` for a value of another kind.
fn text<'a>(value: &'a HeaderValue<'_>) -> Option<Cow<'a, str>> {
    match value {
        HeaderValue::Text(s) => Some(Cow::Borrowed(s.trim())),
        HeaderValue::TextList(list) => Some(Cow::Owned(list.join(", "))),
        HeaderValue::Empty => Some(Cow::Borrowed("")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mail_parser::MessageParser;

    fn auto(headers: &str) -> bool {
        let raw = format!("From: a@b.example\r\nTo: c@d.example\r\n{headers}Subject: s\r\n\r\nbody\r\n");
        is_auto_submitted(&MessageParser::default().parse(raw.as_bytes()).unwrap())
    }

    #[test]
    fn auto_submitted() {
        assert!(!auto(""));
        assert!(!auto("Auto-Submitted: no\r\n"));
        assert!(!auto("Auto-Submitted:   no  \r\n"));
        assert!(auto("Auto-Submitted: auto-replied\r\n"));
        assert!(auto("Auto-Submitted: auto-generated\r\n"));
        assert!(auto("auto-submitted: auto-notified; owner-email=\"me@example.com\"\r\n"));
        // exact values: anything but `no` counts, an empty value too
        assert!(auto("Auto-Submitted: No\r\n"));
        assert!(auto("Auto-Submitted:\r\n"));
        assert!(auto("Auto-Submitted: no\r\nAuto-Submitted: auto-replied\r\n"));
    }

    #[test]
    fn x_autoreply() {
        assert!(auto("X-Autoreply: yes\r\n"));
        assert!(auto("x-autoreply: yes\r\n"));
        assert!(!auto("X-Autoreply: YES\r\n"));
        assert!(!auto("X-Autoreply: no\r\n"));
        assert!(!auto("X-Autoreply:\r\n"));
    }

    #[test]
    fn only_top_level_headers_count() {
        let raw = "From: a@b.example\r\nTo: c@d.example\r\nSubject: fwd\r\nMIME-Version: 1.0\r\n\
                   Content-Type: message/rfc822\r\n\r\n\
                   From: x@y.example\r\nAuto-Submitted: auto-replied\r\n\r\ninner\r\n";
        assert!(!is_auto_submitted(&MessageParser::default().parse(raw.as_bytes()).unwrap()));
    }

    #[test]
    fn empty_message() {
        assert!(!is_auto_submitted(&mail_parser::Message::default()));
    }

    #[test]
    fn null_sender() {
        assert!(is_null_sender(""));
        assert!(is_null_sender("<>"));
        assert!(is_null_sender(" <> "));
        assert!(!is_null_sender("a@b.example"));
        assert!(!is_null_sender("<a@b.example>"));
    }
}

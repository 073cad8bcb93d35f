//! Trace headers the final destination adds (RFC 5321 4.4): Return-Path and Received.

use time::OffsetDateTime;
use time::format_description::well_known::Rfc2822;

use super::session::Session;

/// Client-supplied text made safe for a header or a log: printable ASCII and UTF-8 letters
/// only, at most 255 characters; anything else becomes `?`.
pub fn sanitize(s: &str) -> String {
    s.chars().take(255).map(|c| if c.is_control() || c == '\u{7f}' { '?' } else { c }).collect()
}

/// The trace header block prepended to the stored message.
pub(super) fn headers(session: &Session) -> Vec<u8> {
    let (mail_from, rcpts) = match &session.txn {
        Some(t) => (t.mail_from.as_str(), t.rcpts.as_slice()),
        None => ("", &[][..]),
    };
    let fwd = &session.fwd;
    let helo = session.client_helo();
    let helo = if helo.is_empty() { "unknown".to_string() } else { helo };
    let name = fwd.name.as_deref().unwrap_or("unknown");
    let ip = session.client_ip();
    let proto = if session.cfg.lmtp { "LMTP" } else { session.proto };
    let mut h = String::with_capacity(256);
    h.push_str("Return-Path: <");
    h.push_str(&sanitize(mail_from));
    h.push_str(">\r\nReceived: from ");
    h.push_str(&sanitize(&helo));
    h.push_str(" (");
    h.push_str(&sanitize(name));
    if !ip.is_empty() {
        h.push_str(" [");
        h.push_str(&sanitize(&ip));
        h.push(']');
    }
    h.push_str(")\r\n\tby ");
    h.push_str(&session.cfg.hostname);
    h.push_str(" (mailgate) with ");
    h.push_str(proto);
    if let Some(tls) = session.client_tls() {
        // RFC 3848: ESMTPS is ESMTP with STARTTLS (or implicit TLS)
        if proto == "ESMTP" {
            h.push('S');
        }
        h.push_str("\r\n\t(version=");
        h.push_str(&sanitize(&tls.version));
        h.push_str(" cipher=");
        h.push_str(&sanitize(&tls.cipher));
        h.push(')');
    }
    if let Some(id) = &fwd.ident {
        h.push_str(" id ");
        h.push_str(&sanitize(id));
    }
    if let [one] = rcpts {
        h.push_str("\r\n\tfor <");
        h.push_str(&sanitize(&one.address));
        h.push('>');
    }
    h.push_str("; ");
    let now = OffsetDateTime::now_utc().format(&Rfc2822).unwrap_or_default();
    h.push_str(&now);
    h.push_str("\r\n");
    h.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_removes_line_breaks() {
        assert_eq!(sanitize("a\r\nb\tc"), "a??b?c");
        assert_eq!(sanitize("mx.example.org"), "mx.example.org");
    }
}

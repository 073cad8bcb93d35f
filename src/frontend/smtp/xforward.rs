//! XFORWARD (Postfix's client-attribute forwarding, XFORWARD_README): attribute parsing.

use super::session::echoed;

/// What XFORWARD told us about the original client, for the current transaction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Forwarded {
    pub name: Option<String>,
    pub addr: Option<String>,
    pub port: Option<String>,
    pub proto: Option<String>,
    pub helo: Option<String>,
    pub ident: Option<String>,
    pub source: Option<String>,
    /// An XFORWARD command was received: the socket peer is a relay, not the client, so a
    /// missing ADDR means the client is unknown (never the relay's own address).
    pub seen: bool,
}

/// The capability line's attribute list.
pub const ATTRIBUTES: &str = "NAME ADDR PORT PROTO HELO IDENT SOURCE";

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum XforwardError {
    #[error("XFORWARD syntax: {0}")]
    Syntax(String),
    #[error("unknown XFORWARD attribute {0}")]
    UnknownAttribute(String),
}

/// Applies `XFORWARD name=value ...` (the text after the verb) to `fwd`. Values are xtext
/// (RFC 3461: `+XX` escapes); `[UNAVAILABLE]` and `[TEMPUNAVAIL]` clear an attribute.
pub fn apply(fwd: &mut Forwarded, args: &str) -> Result<(), XforwardError> {
    let args = args.trim();
    fwd.seen = true;
    if args.is_empty() {
        return Err(XforwardError::Syntax("XFORWARD needs attributes".into()));
    }
    for item in args.split_ascii_whitespace() {
        let Some((name, value)) = item.split_once('=') else {
            return Err(XforwardError::Syntax(format!("bad attribute {}", echoed(item))));
        };
        let value =
            decode_xtext(value).ok_or_else(|| XforwardError::Syntax(format!("bad xtext in {}", echoed(item))))?;
        let value = if value.eq_ignore_ascii_case("[UNAVAILABLE]") || value.eq_ignore_ascii_case("[TEMPUNAVAIL]") {
            None
        } else {
            Some(value)
        };
        let slot = match name.to_ascii_uppercase().as_str() {
            "NAME" => &mut fwd.name,
            "ADDR" => &mut fwd.addr,
            "PORT" => &mut fwd.port,
            "PROTO" => &mut fwd.proto,
            "HELO" => &mut fwd.helo,
            "IDENT" => &mut fwd.ident,
            "SOURCE" => &mut fwd.source,
            _ => return Err(XforwardError::UnknownAttribute(echoed(name))),
        };
        *slot = value;
    }
    if let Some(addr) = &fwd.addr
        && let Some(v6) = addr.strip_prefix("IPV6:").or_else(|| addr.strip_prefix("ipv6:"))
    {
        fwd.addr = Some(v6.to_string());
    }
    Ok(())
}

fn decode_xtext(s: &str) -> Option<String> {
    if !s.contains('+') {
        return Some(s.to_string());
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'+' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postfix_lines_parse() {
        let mut f = Forwarded::default();
        apply(&mut f, "NAME=mail.example.org ADDR=192.0.2.7 PORT=40000").unwrap();
        apply(&mut f, "PROTO=ESMTP HELO=mail.example.org IDENT=4XyZ1 SOURCE=REMOTE").unwrap();
        assert_eq!(f.addr.as_deref(), Some("192.0.2.7"));
        assert_eq!(f.ident.as_deref(), Some("4XyZ1"));
        assert_eq!(f.helo.as_deref(), Some("mail.example.org"));
    }

    #[test]
    fn unavailable_ipv6_and_xtext() {
        let mut f = Forwarded::default();
        apply(&mut f, "NAME=[UNAVAILABLE] ADDR=IPV6:2001:db8::1 HELO=a+20b IDENT=[UNAVAILABLE]").unwrap();
        assert_eq!(f.name, None);
        assert_eq!(f.ident, None);
        assert_eq!(f.addr.as_deref(), Some("2001:db8::1"));
        assert_eq!(f.helo.as_deref(), Some("a b"));
    }

    #[test]
    fn errors() {
        let mut f = Forwarded::default();
        assert!(apply(&mut f, "").is_err());
        assert!(apply(&mut f, "NAME").is_err());
        assert_eq!(apply(&mut f, "FOO=1"), Err(XforwardError::UnknownAttribute("\"FOO\"".into())));
        assert!(apply(&mut f, "HELO=a+zz").is_err());
        // Echoed cut short and escaped (found by fuzzing: a 523-octet reply line).
        let long = "\0\u{ff}/".repeat(200);
        for args in [long.clone(), format!("{long}=1"), format!("NAME=+zz{long}")] {
            let e = apply(&mut f, &args).unwrap_err().to_string();
            assert!(e.len() < 200 && !e.contains('\0'), "{e}");
        }
    }
}

//! The body text of a raw message: the first text/plain body part, else the first text/html
//! body part converted to text (`html.rs`). mail-parser finds the parts and undoes their
//! Content-Transfer-Encoding; the charset is decoded here (`charset.rs`) from the part's
//! undecoded bytes, to recover mislabelled text as GitLab does. Line endings become `\n`.
//!
//! Only the first [`MAX_PART_BYTES`] of the part are read. A message whose header or MIME
//! structure is beyond what mail-parser handles safely (attached messages nested deeper than
//! [`MAX_MIME_DEPTH`](crate::gate::mime::MAX_MIME_DEPTH) overflow the stack) is not parsed.

use std::borrow::Cow;

use mail_parser::{Encoding, Message, MessageParser, MessagePart, MimeHeaders, PartType, parsers::MessageStream};

use super::{charset, html};

/// At most this much of the chosen part (after its transfer decoding) is read.
pub(super) const MAX_PART_BYTES: usize = 1024 * 1024;
/// At most this much of the part's encoded body is transfer-decoded: enough for
/// [`MAX_PART_BYTES`] of quoted-printable at its worst (`=XX` for every byte) or base64.
const MAX_ENCODED_BYTES: usize = 3 * MAX_PART_BYTES + 64 * 1024;

/// The text of the message's body, None when it has no text/plain or text/html body part.
pub(super) fn body_text(raw: &[u8]) -> Option<String> {
    use crate::gate::mime::{ContentLimits, check};
    check(raw, &ContentLimits::PARSER_SAFE).ok()?;
    let message = MessageParser::default().parse(raw)?;
    let (part, is_html) = message
        .text_bodies()
        .find(|p| is_plain(p))
        .map(|p| (p, false))
        .or_else(|| message.html_bodies().find(|p| matches!(p.body, PartType::Html(_))).map(|p| (p, true)))?;
    let text = match undecoded(&message, part) {
        Some(bytes) => {
            let charset = part.content_type().and_then(|ct| ct.attribute("charset"));
            Cow::Owned(charset::decode(cap_bytes(&bytes), charset))
        }
        // mail-parser's own decoding, when the part's bytes cannot be found again
        None => cap_text(part.text_contents().unwrap_or_default()),
    };
    let text = if is_html { Cow::Owned(html::to_text(&text)) } else { text };
    Some(normalize(&text))
}

/// A text/plain part (or a text part without a Content-Type, which means text/plain).
fn is_plain(part: &MessagePart<'_>) -> bool {
    matches!(part.body, PartType::Text(_))
        && part.content_type().is_none_or(|ct| {
            ct.ctype().eq_ignore_ascii_case("text") && ct.subtype().is_none_or(|s| s.eq_ignore_ascii_case("plain"))
        })
}

/// The part's body with its transfer encoding undone but its charset not yet decoded, from
/// the raw message and the part's offsets; None when the offsets do not fit the message.
fn undecoded<'a>(message: &'a Message<'a>, part: &MessagePart<'_>) -> Option<Cow<'a, [u8]>> {
    let start = usize::try_from(part.offset_body).ok()?;
    let end = usize::try_from(part.offset_end).ok()?;
    let encoded = message.raw_message().get(start..end)?;
    let encoded = encoded.get(..MAX_ENCODED_BYTES).unwrap_or(encoded);
    // The same decoders as mail-parser's, without a boundary: the part ends at `offset_end`.
    let (ok, decoded) = match part.encoding {
        Encoding::Base64 => MessageStream::new(encoded).decode_base64_mime(b""),
        Encoding::QuotedPrintable => MessageStream::new(encoded).decode_quoted_printable_mime(b""),
        Encoding::None => return Some(Cow::Borrowed(encoded)),
    };
    // mail-parser keeps the raw bytes of a part it could not decode; so do we.
    Some(if ok == usize::MAX { Cow::Borrowed(encoded) } else { decoded })
}

/// The first [`MAX_PART_BYTES`] of `bytes`, cut after a line feed when there is one (a line
/// feed is never inside a character of the charsets mail uses, UTF-16 apart).
fn cap_bytes(bytes: &[u8]) -> &[u8] {
    if bytes.len() <= MAX_PART_BYTES {
        return bytes;
    }
    let head = &bytes[..MAX_PART_BYTES];
    match memchr::memrchr(b'\n', head) {
        Some(i) => &head[..=i],
        None => head,
    }
}

/// The first [`MAX_PART_BYTES`] of `text`, cut on a character boundary.
fn cap_text(text: &str) -> Cow<'_, str> {
    let mut end = text.len().min(MAX_PART_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Borrowed(&text[..end])
}

/// `\r\n` and lone `\r` become `\n`; a leading byte-order mark goes.
fn normalize(text: &str) -> String {
    let text = text.strip_prefix('\u{FEFF}').unwrap_or(text);
    if !text.contains('\r') {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len());
    let mut lines = text.split('\r').peekable();
    while let Some(part) = lines.next() {
        out.push_str(part);
        if lines.peek().is_some() && !lines.peek().is_some_and(|next| next.starts_with('\n')) {
            out.push('\n');
        }
    }
    out
}

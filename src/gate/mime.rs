//! Content limits: how much header and how much MIME structure a message may have before any
//! MIME parser builds it.
//!
//! mail-parser handles deep nesting without recursion while it parses, but the message it builds
//! nests one `Message` per attached message (`message/rfc822`), and dropping or copying that
//! recurses: an attachment nested 10,000 deep overflowed the stack and aborted the process. It
//! also builds one part per MIME part and one header per header line, with no cap: a 10 MB
//! message of empty parts took 180 MiB. [`check`] walks the structure the way
//! `MessageParser::parse` does (same crate, same stream functions, same header parser), keeps
//! only counters, and stops at the first limit passed. Its cost is linear in the message, and its
//! memory is one header block and one decoded part at a time.

use mail_parser::parsers::MessageStream;
use mail_parser::{Encoding, GetHeader, Header, HeaderName, HeaderValue, MessageParser};

/// The limits of [`check`] (`[limits]` in the configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContentLimits {
    /// Bytes of header, all header blocks together (the message's, every MIME part's and every
    /// attached message's), CRLFs included.
    pub max_header_size: usize,
    /// Header lines (continuation lines included), all header blocks together.
    pub max_header_lines: usize,
    /// How many multiparts and attached messages may enclose a part.
    pub max_mime_depth: usize,
    /// Parts, every level counted: the message itself, each MIME part, each attached message.
    pub max_mime_parts: usize,
}

/// The most `max_mime_depth` may be: deeper attached messages could overflow a thread's stack
/// where mail-parser copies or drops them. The reply-text extraction never parses deeper ones.
pub const MAX_MIME_DEPTH: usize = 100;

impl ContentLimits {
    pub const DEFAULT: ContentLimits = ContentLimits {
        max_header_size: 256 * 1024,
        max_header_lines: 5000,
        max_mime_depth: 100,
        max_mime_parts: 1000,
    };

    /// What any parse of a whole message needs, whatever the configuration (the reply-text
    /// extraction checks these before it parses).
    pub const PARSER_SAFE: ContentLimits = ContentLimits {
        max_header_size: 4 * 1024 * 1024,
        max_header_lines: 100_000,
        max_mime_depth: MAX_MIME_DEPTH,
        max_mime_parts: 100_000,
    };
}

impl Default for ContentLimits {
    fn default() -> Self {
        ContentLimits::DEFAULT
    }
}

/// The first limit a message passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    HeaderSize,
    HeaderLines,
    MimeDepth,
    MimeParts,
    /// Parts name boundaries that never come (see `seek_cost`).
    MimeBoundaries,
}

/// What [`check`] counted (up to the first limit passed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub header_bytes: usize,
    pub header_lines: usize,
    pub depth: usize,
    pub parts: usize,
}

/// mail-parser's `MAX_NESTED_ENCODED`: how deep it parses base64 or quoted-printable
/// encoded attached messages.
const MAX_NESTED_ENCODED: usize = 3;

/// Walks `raw` and returns what it counted, or the first limit passed.
pub fn check(raw: &[u8], limits: &ContentLimits) -> Result<Stats, Violation> {
    let mut walk = Walk { limits, parser: MessageParser::default(), stats: Stats::default(), wasted: 0 };
    walk.message(raw, 0, MAX_NESTED_ENCODED)?;
    Ok(walk.stats)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Message,
    Multipart,
    Digest,
    Other,
}

/// mail-parser's parser state, reduced to what decides the structure.
struct Frame {
    kind: Kind,
    boundary: Option<Vec<u8>>,
    /// Pushed when an attached message started (mail-parser then also stacks a message).
    message: bool,
}

struct Walk<'l> {
    limits: &'l ContentLimits,
    parser: MessageParser,
    stats: Stats,
    /// Bytes mail-parser would read looking for boundaries that are not there.
    wasted: usize,
}

impl Walk<'_> {
    /// The control flow of mail-parser 0.11's `MessageParser::parse_`, without building parts.
    fn message(&mut self, raw: &[u8], base: usize, encoded_left: usize) -> Result<(), Violation> {
        let mut stream = MessageStream::new(raw);
        let mut state = Frame { kind: Kind::Message, boundary: None, message: false };
        let mut stack: Vec<Frame> = Vec::new();
        let mut headers: Vec<Header<'_>> = Vec::new();
        self.depth(base)?;
        'outer: loop {
            self.header_block(raw, stream.offset())?;
            headers.clear();
            if !stream.parse_headers(&self.parser, &mut headers) {
                break;
            }
            self.stats.parts += 1;
            if self.stats.parts > self.limits.max_mime_parts {
                return Err(Violation::MimeParts);
            }
            let content_type = headers.header_value(&HeaderName::ContentType).and_then(|c| c.as_content_type());
            let mut kind = match content_type {
                Some(ct) => match ct.ctype() {
                    "multipart" if ct.subtype() == Some("digest") => Kind::Digest,
                    "multipart" => Kind::Multipart,
                    "message" if [Some("rfc822"), Some("global")].contains(&ct.subtype()) => Kind::Message,
                    _ => Kind::Other,
                },
                None if state.kind == Kind::Digest => Kind::Message,
                None => Kind::Other,
            };
            if matches!(kind, Kind::Multipart | Kind::Digest)
                && let Some(boundary) = content_type.and_then(|c| c.attribute("boundary"))
            {
                let boundary = boundary.as_bytes();
                self.seek_cost(raw, stream.offset(), boundary)?;
                if stream.seek_next_part(boundary) {
                    let next = Frame { kind, boundary: Some(boundary.to_vec()), message: false };
                    stack.push(std::mem::replace(&mut state, next));
                    self.depth(base + stack.len())?;
                    stream.skip_crlf();
                    continue;
                }
                kind = Kind::Other;
            }
            let encoding = match headers.header_value(&HeaderName::ContentTransferEncoding) {
                Some(HeaderValue::Text(e)) if e.eq_ignore_ascii_case("base64") => Encoding::Base64,
                Some(HeaderValue::Text(e)) if e.eq_ignore_ascii_case("quoted-printable") => Encoding::QuotedPrintable,
                _ => Encoding::None,
            };
            if kind == Kind::Message && encoding == Encoding::None {
                let next = Frame { kind: Kind::Message, boundary: state.boundary.take(), message: true };
                stack.push(std::mem::replace(&mut state, next));
                self.depth(base + stack.len())?;
                continue;
            }
            headers.clear();
            let boundary = state.boundary.as_deref().unwrap_or(b"");
            let (offset_end, bytes) = match encoding {
                Encoding::Base64 => stream.decode_base64_mime(boundary),
                Encoding::QuotedPrintable => stream.decode_quoted_printable_mime(boundary),
                Encoding::None => stream.mime_part(boundary),
            };
            if offset_end == usize::MAX {
                // mail-parser keeps such a part as text, never as a message
                let (_, found) = stream.seek_part_end(state.boundary.as_deref());
                if !found {
                    state.boundary = None;
                }
            } else if kind == Kind::Message && encoded_left > 0 {
                self.message(&bytes, base + stack.len() + 1, encoded_left - 1)?;
            }
            drop(bytes);
            if state.boundary.is_some() {
                loop {
                    if state.kind == Kind::Message {
                        // the attached message ended: back to its parent
                        match stack.pop() {
                            Some(mut parent) if state.message => {
                                parent.boundary = state.boundary.take();
                                state = parent;
                            }
                            _ => break 'outer,
                        }
                    }
                    if !stream.is_multipart_end() {
                        break;
                    }
                    let Some(parent) = stack.pop() else { break 'outer };
                    state = parent;
                    let Some(b) = &state.boundary else { break 'outer };
                    self.seek_cost(raw, stream.offset(), b)?;
                    if stream.seek_next_part_offset(b).is_none() {
                        break 'outer;
                    }
                }
            } else if stream.offset() >= stream.len() {
                break;
            }
        }
        Ok(())
    }

    /// mail-parser looks for a boundary by reading on to the end of the message, and goes back
    /// when it is not there: each part naming a boundary that never comes costs one read of
    /// the rest of the message. Those reads may add up to twice the message.
    fn seek_cost(&mut self, data: &[u8], pos: usize, boundary: &[u8]) -> Result<(), Violation> {
        let rest = data.get(pos..).unwrap_or_default();
        // mail-parser's test: "--" and the boundary, anywhere
        let needle = [b"--", boundary].concat();
        let found = !boundary.is_empty() && memchr::memmem::find(rest, &needle).is_some();
        if !found {
            self.wasted += rest.len();
            if self.wasted > 2 * data.len() + 64 * 1024 {
                return Err(Violation::MimeBoundaries);
            }
        }
        Ok(())
    }

    fn depth(&mut self, depth: usize) -> Result<(), Violation> {
        self.stats.depth = self.stats.depth.max(depth);
        if depth > self.limits.max_mime_depth { Err(Violation::MimeDepth) } else { Ok(()) }
    }

    /// Counts the header block at `pos` before mail-parser reads it: its parser skips leading
    /// blanks and stops at an empty line, and makes at most one header of each line.
    fn header_block(&mut self, data: &[u8], mut pos: usize) -> Result<(), Violation> {
        let (start, mut end) = (pos, pos);
        let mut lines = 0;
        loop {
            while pos < data.len() && data[pos] != b'\n' && data[pos].is_ascii_whitespace() {
                pos += 1;
            }
            if pos >= data.len() || data[pos] == b'\n' {
                break;
            }
            lines += 1;
            pos = memchr::memchr(b'\n', &data[pos..]).map_or(data.len(), |i| pos + i + 1);
            // continuation lines
            while matches!(data.get(pos), Some(b' ' | b'\t')) {
                lines += 1;
                pos = memchr::memchr(b'\n', &data[pos..]).map_or(data.len(), |i| pos + i + 1);
            }
            end = pos;
        }
        self.stats.header_bytes += end - start;
        self.stats.header_lines += lines;
        if self.stats.header_bytes > self.limits.max_header_size {
            Err(Violation::HeaderSize)
        } else if self.stats.header_lines > self.limits.max_header_lines {
            Err(Violation::HeaderLines)
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests;

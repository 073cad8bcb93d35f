//! The DATA receiver: smuggling-safe end-of-data detection, dot-unstuffing and limits.
//!
//! Only `CRLF.CRLF` ends DATA (the DATA command's own CRLF counts as the first one, so an empty
//! message `.` right after DATA works). A bare LF or bare CR anywhere is remembered as a
//! refusal; the receiver keeps reading, so whatever a smuggler hid behind `\n.\n` is swallowed
//! as message text up to the real `CRLF.CRLF`, and never runs as commands.

use crate::gate::verdict::Reason;

/// Why a received message cannot be stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataFault {
    /// A bare LF (or a bare CR when `cr` is set).
    Bare {
        cr: bool,
    },
    LineTooLong,
    TooLarge,
    /// The header section passed `max_header_size` (or `max_header_lines` when `lines`).
    HeaderTooLarge {
        lines: bool,
    },
}

impl DataFault {
    pub fn reason(self) -> Reason {
        match self {
            DataFault::Bare { .. } => Reason::BareLf,
            DataFault::LineTooLong => Reason::LineTooLong,
            DataFault::TooLarge => Reason::TooLarge,
            DataFault::HeaderTooLarge { .. } => Reason::HeaderTooLarge,
        }
    }
}

/// Result of feeding bytes to the receiver.
#[derive(Debug, PartialEq, Eq)]
pub enum DataProgress {
    /// All bytes up to `consumed` were taken; more input is needed.
    More { consumed: usize },
    /// `CRLF.CRLF` was seen; `consumed` bytes (including it) were taken.
    Done { consumed: usize },
}

pub struct DataReceiver {
    body: Vec<u8>,
    /// Bytes counted against the size limit (the message as the client sent it, unstuffed).
    received: u64,
    max_size: u64,
    max_line: usize,
    fault: Option<DataFault>,
    /// The previous line ended with a proper CRLF (true at the start: the DATA line's CRLF).
    prev_crlf: bool,
    /// Part of the current line was already consumed (a line longer than the limit).
    mid_line: bool,
    /// The last consumed byte of a partially consumed line was CR.
    tail_cr: bool,
    /// Still in the header section (no empty line yet), and its size so far.
    in_header: bool,
    header_bytes: usize,
    header_lines: usize,
    /// `max_header_size` and `max_header_lines`: checked as the header arrives, so a header
    /// flood is thrown away as it comes instead of being kept to the end of DATA.
    max_header: (usize, usize),
}

impl DataReceiver {
    /// `body` may already hold trace headers the server prepends; they do not count as
    /// received bytes.
    pub fn new(body: Vec<u8>, max_size: u64, max_line: usize) -> Self {
        DataReceiver {
            body,
            received: 0,
            max_size,
            max_line,
            fault: None,
            prev_crlf: true,
            mid_line: false,
            tail_cr: false,
            in_header: true,
            header_bytes: 0,
            header_lines: 0,
            max_header: (usize::MAX, usize::MAX),
        }
    }

    /// Limits the header section: bytes (CRLFs included) and lines (continuation lines
    /// included). Default: none.
    pub fn with_header_limits(mut self, max_bytes: usize, max_lines: usize) -> Self {
        self.max_header = (max_bytes, max_lines);
        self
    }

    /// Bytes of the message received so far (unstuffed).
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Consumes complete lines from `input`. A trailing partial line is left for the next call
    /// unless it is already longer than the line limit.
    pub fn feed(&mut self, input: &[u8]) -> DataProgress {
        let mut pos = 0;
        while pos < input.len() {
            let Some(off) = memchr::memchr(b'\n', &input[pos..]) else {
                let rest = &input[pos..];
                if rest.len() >= self.max_line {
                    self.note(DataFault::LineTooLong);
                    self.tail_cr = rest.last() == Some(&b'\r');
                    if rest[..rest.len() - 1].contains(&b'\r') {
                        self.note(DataFault::Bare { cr: true });
                    }
                    self.mid_line = true;
                    self.received += rest.len() as u64;
                    return DataProgress::More { consumed: input.len() };
                }
                return DataProgress::More { consumed: pos };
            };
            let line = &input[pos..pos + off + 1];
            pos += off + 1;
            if self.mid_line {
                self.finish_long_line(line);
                continue;
            }
            if self.line(line) {
                return DataProgress::Done { consumed: pos };
            }
        }
        DataProgress::More { consumed: pos }
    }

    /// Handles one complete line (ending in LF). Returns true at the end of data.
    fn line(&mut self, line: &[u8]) -> bool {
        let n = line.len();
        let crlf = n >= 2 && line[n - 2] == b'\r';
        let content_end = if crlf { n - 2 } else { n - 1 };
        if self.prev_crlf && crlf && content_end == 1 && line[0] == b'.' {
            return true;
        }
        if !crlf {
            self.note(DataFault::Bare { cr: false });
        }
        if line[..content_end].contains(&b'\r') {
            self.note(DataFault::Bare { cr: true });
        }
        self.prev_crlf = crlf;
        if n > self.max_line {
            self.note(DataFault::LineTooLong);
        }
        let stuffed = line[0] == b'.';
        let payload = if stuffed { &line[1..] } else { line };
        if self.in_header {
            self.header_line(payload);
        }
        self.received += payload.len() as u64;
        if self.received > self.max_size {
            self.note(DataFault::TooLarge);
        }
        if self.fault.is_none() {
            self.body.extend_from_slice(payload);
        }
        false
    }

    /// Counts one line of the header section; an empty line ends it.
    fn header_line(&mut self, payload: &[u8]) {
        if payload == b"\r\n" || payload == b"\n" {
            self.in_header = false;
            return;
        }
        self.header_bytes += payload.len();
        self.header_lines += 1;
        let (max_bytes, max_lines) = self.max_header;
        if self.header_bytes > max_bytes {
            self.note(DataFault::HeaderTooLarge { lines: false });
        } else if self.header_lines > max_lines {
            self.note(DataFault::HeaderTooLarge { lines: true });
        }
    }

    fn finish_long_line(&mut self, rest: &[u8]) {
        let n = rest.len();
        let crlf = (n >= 2 && rest[n - 2] == b'\r') || (n == 1 && self.tail_cr);
        if !crlf {
            self.note(DataFault::Bare { cr: false });
        }
        let content_end = if n >= 2 && rest[n - 2] == b'\r' { n - 2 } else { n - 1 };
        if rest[..content_end].contains(&b'\r') || (self.tail_cr && n > 1) {
            self.note(DataFault::Bare { cr: true });
        }
        self.received += n as u64;
        self.prev_crlf = crlf;
        self.mid_line = false;
        self.tail_cr = false;
    }

    fn note(&mut self, fault: DataFault) {
        if self.fault.is_none() {
            self.fault = Some(fault);
            self.body = Vec::new();
        }
    }

    /// The received message, or why it must be refused.
    pub fn finish(self) -> Result<Vec<u8>, DataFault> {
        match self.fault {
            Some(f) => Err(f),
            None => Ok(self.body),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(input: &[u8]) -> (DataProgress, Result<Vec<u8>, DataFault>) {
        let mut r = DataReceiver::new(Vec::new(), 1 << 20, 1000);
        let p = r.feed(input);
        (p, r.finish())
    }

    #[test]
    fn plain_message_and_unstuffing() {
        let (p, body) = run(b"Subject: x\r\n\r\n..dot\r\nline\r\n.\r\nMAIL FROM:<a@b>\r\n");
        assert_eq!(p, DataProgress::Done { consumed: 30 });
        assert_eq!(body.unwrap(), b"Subject: x\r\n\r\n.dot\r\nline\r\n");
    }

    #[test]
    fn empty_message_ends_at_once() {
        let (p, body) = run(b".\r\n");
        assert_eq!(p, DataProgress::Done { consumed: 3 });
        assert_eq!(body.unwrap(), b"");
    }

    #[test]
    fn dot_stuffed_first_line_is_unstuffed() {
        let (_, body) = run(b"..x\r\n.\r\n");
        assert_eq!(body.unwrap(), b".x\r\n");
    }

    #[test]
    fn partial_line_waits_for_more() {
        let mut r = DataReceiver::new(Vec::new(), 1 << 20, 1000);
        assert_eq!(r.feed(b"abc\r\nde"), DataProgress::More { consumed: 5 });
        assert_eq!(r.feed(b"def\r\n.\r"), DataProgress::More { consumed: 5 });
        assert_eq!(r.feed(b".\r\n"), DataProgress::Done { consumed: 3 });
        assert_eq!(r.finish().unwrap(), b"abc\r\ndef\r\n");
    }

    /// Every smuggling payload of notes/security.md: the fake terminator never ends DATA, the
    /// smuggled commands are swallowed, and the message is refused as bare_lf.
    #[test]
    fn smuggling_payloads_never_end_data_and_are_refused() {
        let smuggled = b"MAIL FROM:<admin@victim>\r\nRCPT TO:<x@y>\r\nDATA\r\nevil\r\n";
        for fake in [&b"\n.\n"[..], b"\n.\r\n", b"\r.\r", b"\r\n.\n", b"\r.\r\n", b"\r\r.\r\r"] {
            let mut input = b"Subject: hi\r\n\r\nbody".to_vec();
            input.extend_from_slice(fake);
            input.extend_from_slice(smuggled);
            input.extend_from_slice(b".\r\n");
            let (p, body) = run(&input);
            assert_eq!(p, DataProgress::Done { consumed: input.len() }, "fake {fake:?}");
            assert!(matches!(body, Err(DataFault::Bare { .. })), "fake {fake:?}: {body:?}");
        }
    }

    #[test]
    fn header_with_lone_lf_is_refused() {
        let (_, body) = run(b"Subject: a\nX-Evil: b\r\n\r\nbody\r\n.\r\n");
        assert_eq!(body, Err(DataFault::Bare { cr: false }));
        let (_, body) = run(b"Subject: a\r\r\n\r\nbody\r\n.\r\n");
        assert_eq!(body, Err(DataFault::Bare { cr: true }));
    }

    #[test]
    fn long_lines_are_refused_but_data_still_ends() {
        let mut input = vec![b'a'; 999];
        input.extend_from_slice(b"\r\n.\r\n");
        let (p, body) = run(&input);
        assert!(matches!(p, DataProgress::Done { .. }));
        assert_eq!(body, Err(DataFault::LineTooLong));
        // exactly 1000 octets with CRLF is fine
        let mut input = vec![b'a'; 998];
        input.extend_from_slice(b"\r\n.\r\n");
        assert!(run(&input).1.is_ok());
    }

    #[test]
    fn long_line_split_across_reads() {
        let mut r = DataReceiver::new(Vec::new(), 1 << 20, 100);
        assert_eq!(r.feed(&[b'x'; 150]), DataProgress::More { consumed: 150 });
        assert_eq!(r.feed(b"yy\r\n.\r\n"), DataProgress::Done { consumed: 7 });
        assert_eq!(r.finish(), Err(DataFault::LineTooLong));
    }

    #[test]
    fn size_limit_counts_received_bytes() {
        let mut r = DataReceiver::new(b"Received: trace\r\n".to_vec(), 10, 1000);
        assert_eq!(r.feed(b"12345678\r\n.\r\n"), DataProgress::Done { consumed: 13 });
        assert_eq!(r.finish().unwrap(), b"Received: trace\r\n12345678\r\n");
        let mut r = DataReceiver::new(Vec::new(), 10, 1000);
        r.feed(b"123456789\r\n.\r\n");
        assert_eq!(r.finish(), Err(DataFault::TooLarge));
    }

    #[test]
    fn header_limits_apply_to_the_header_section_only() {
        let feed = |input: &[u8], bytes, lines| {
            let mut r = DataReceiver::new(Vec::new(), 1 << 20, 1000).with_header_limits(bytes, lines);
            assert!(matches!(r.feed(input), DataProgress::Done { .. }));
            r.finish()
        };
        let msg = b"A: 1\r\nB: 2\r\n 3\r\n\r\nbody line one\r\nbody line two\r\n.\r\n";
        // 3 lines, 16 bytes of header; the body does not count
        assert!(feed(msg, 16, 3).is_ok());
        assert_eq!(feed(msg, 15, 3), Err(DataFault::HeaderTooLarge { lines: false }));
        assert_eq!(feed(msg, 16, 2), Err(DataFault::HeaderTooLarge { lines: true }));
        // a dot-stuffed header line counts unstuffed; no empty line: everything is header
        assert!(feed(b"..A: 1\r\n.\r\n", 7, 1).is_ok());
        assert_eq!(feed(b"A: 1\r\nno empty line\r\n.\r\n", 10, 10), Err(DataFault::HeaderTooLarge { lines: false }));
    }

    #[test]
    fn terminator_split_byte_by_byte() {
        let mut r = DataReceiver::new(Vec::new(), 1 << 20, 1000);
        let input = b"hello\r\n.\r\n";
        let mut buf = Vec::new();
        let mut done = false;
        for b in input {
            buf.push(*b);
            match r.feed(&buf) {
                DataProgress::More { consumed } => {
                    buf.drain(..consumed);
                }
                DataProgress::Done { .. } => done = true,
            }
        }
        assert!(done);
        assert_eq!(r.finish().unwrap(), b"hello\r\n");
    }
}

use std::time::{Duration, Instant};

use base64::Engine;
use mail_parser::{Message, MessageParser, PartType};

use super::*;

const OPEN: ContentLimits = ContentLimits {
    max_header_size: usize::MAX,
    max_header_lines: usize::MAX,
    max_mime_depth: usize::MAX,
    max_mime_parts: usize::MAX,
};

/// (depth, parts) of what mail-parser builds: a container counts one level for what it holds.
fn oracle(raw: &[u8]) -> (usize, usize) {
    // mail-parser's debug assertions fire on some broken messages (reply_text catches panics)
    let parsed = std::panic::catch_unwind(|| MessageParser::default().parse(raw));
    let Some(msg) = parsed.ok().flatten() else { return (0, 0) };
    let (mut depth, mut parts) = (0, 0);
    let mut todo: Vec<(&Message<'_>, usize)> = vec![(&msg, 0)];
    while let Some((m, base)) = todo.pop() {
        parts += m.parts.len();
        depth = depth.max(base);
        let mut level = vec![(0u32, base)];
        while let Some((id, d)) = level.pop() {
            let Some(part) = m.parts.get(id as usize) else { continue };
            depth = depth.max(d);
            match &part.body {
                PartType::Multipart(children) => {
                    depth = depth.max(d + 1);
                    level.extend(children.iter().map(|c| (*c, d + 1)));
                }
                PartType::Message(inner) => todo.push((inner, d + 1)),
                _ => {}
            }
        }
    }
    (depth, parts)
}

fn walk(raw: &[u8]) -> Stats {
    check(raw, &OPEN).unwrap()
}

fn multipart(depth: usize) -> Vec<u8> {
    let mut m = b"From: a@example.org\r\nSubject: deep\r\nMIME-Version: 1.0\r\n".to_vec();
    for i in 0..depth {
        m.extend(format!("Content-Type: multipart/mixed; boundary=\"b{i}\"\r\n\r\n--b{i}\r\n").bytes());
    }
    m.extend(b"Content-Type: text/plain\r\n\r\nhello\r\n");
    for i in (0..depth).rev() {
        m.extend(format!("--b{i}--\r\n").bytes());
    }
    m
}

fn attached(depth: usize) -> Vec<u8> {
    let mut m = b"From: a@example.org\r\nSubject: deep\r\n".to_vec();
    for i in 0..depth {
        m.extend(format!("Content-Type: message/rfc822\r\n\r\nSubject: level {i}\r\n").bytes());
    }
    m.extend(b"Content-Type: text/plain\r\n\r\nhello\r\n");
    m
}

#[test]
fn simple_messages() {
    let plain = b"From: a@example.org\r\nSubject: hi\r\n\r\nbody\r\n";
    assert_eq!(walk(plain), Stats { header_bytes: 34, header_lines: 2, depth: 0, parts: 1 });
    assert_eq!(oracle(plain), (0, 1));
    let alt = b"Subject: a\r\nContent-Type: multipart/alternative; boundary=x\r\n\r\npreamble\r\n--x\r\n\
        Content-Type: text/plain\r\n\r\nplain\r\n--x\r\nContent-Type: text/html\r\n\r\n<p>html</p>\r\n--x--\r\n";
    let s = walk(alt);
    assert_eq!((s.depth, s.parts, s.header_lines), (1, 3, 4));
    assert_eq!(oracle(alt), (1, 3));
    assert_eq!(walk(b""), Stats::default());
}

#[test]
fn folded_lines_count_as_lines() {
    let raw = b"References: <a@x>\r\n <b@x>\r\n\t<c@x>\r\nSubject: s\r\n\r\nbody\r\n";
    let s = walk(raw);
    assert_eq!((s.header_lines, s.header_bytes), (4, raw.len() - 8));
}

#[test]
fn the_walk_agrees_with_mail_parser() {
    let encoded = base64::engine::general_purpose::STANDARD.encode(multipart(3));
    let digest =
        b"Subject: d\r\nContent-Type: multipart/digest; boundary=d\r\n\r\n--d\r\n\r\nSubject: one\r\n\r\n1\r\n\
        --d\r\n\r\nSubject: two\r\nContent-Type: multipart/mixed; boundary=e\r\n\r\n--e\r\n\r\nx\r\n--e--\r\n--d--\r\n";
    let cases: Vec<Vec<u8>> = vec![
        multipart(1),
        multipart(7),
        attached(1),
        attached(5),
        digest.to_vec(),
        format!(
            "Subject: enc\r\nContent-Type: multipart/mixed; boundary=o\r\n\r\n--o\r\nContent-Type: message/rfc822\r\n\
             Content-Transfer-Encoding: base64\r\n\r\n{encoded}\r\n--o--\r\n"
        )
        .into_bytes(),
        // a boundary that never comes: mail-parser takes the part as text
        b"Subject: m\r\nContent-Type: multipart/mixed; boundary=nope\r\n\r\nno parts\r\n".to_vec(),
        // an attached message inside a multipart, followed by a sibling
        b"Subject: s\r\nContent-Type: multipart/mixed; boundary=o\r\n\r\n--o\r\nContent-Type: message/rfc822\r\n\r\n\
          Subject: inner\r\nContent-Type: multipart/alternative; boundary=i\r\n\r\n--i\r\n\r\na\r\n--i\r\n\r\nb\r\n--i--\r\n\
          --o\r\nContent-Type: text/plain\r\n\r\nsibling\r\n--o--\r\n"
            .to_vec(),
    ];
    for raw in cases {
        let s = walk(&raw);
        assert_eq!((s.depth, s.parts), oracle(&raw), "{}", String::from_utf8_lossy(&raw));
    }
}

/// Random MIME trees, well-formed or cut short: the walk never counts less than mail-parser
/// builds (it may count more for broken messages whose parts mail-parser turns into text).
#[test]
fn random_trees_never_undercount() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut rnd = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    for _ in 0..300 {
        let mut raw = b"Subject: r\r\n".to_vec();
        let mut open: Vec<String> = Vec::new();
        for i in 0..rnd(12) {
            match rnd(5) {
                0 | 1 => {
                    raw.extend(format!("Content-Type: multipart/mixed; boundary=\"q{i}\"\r\n\r\n--q{i}\r\n").bytes());
                    open.push(format!("q{i}"));
                }
                2 => raw.extend(b"Content-Type: message/rfc822\r\n\r\nSubject: in\r\n"),
                3 if !open.is_empty() => {
                    raw.extend(b"Content-Type: text/plain\r\n\r\nleaf\r\n");
                    raw.extend(format!("--{}\r\n", open.last().unwrap()).bytes());
                }
                _ if !open.is_empty() && rnd(2) == 0 => {
                    raw.extend(b"\r\nleaf\r\n");
                    raw.extend(format!("--{}--\r\n", open.pop().unwrap()).bytes());
                }
                _ => raw.extend(b"X-Filler: y\r\n"),
            }
        }
        raw.extend(b"\r\nend\r\n");
        if rnd(2) == 0 {
            while let Some(b) = open.pop() {
                raw.extend(format!("--{b}--\r\n").bytes());
            }
        }
        let s = walk(&raw);
        let (depth, parts) = oracle(&raw);
        assert!(s.depth >= depth && s.parts >= parts, "{s:?} vs ({depth}, {parts}): {}", String::from_utf8_lossy(&raw));
    }
}

#[test]
fn limits_stop_the_walk_early() {
    let limits = ContentLimits::DEFAULT;
    assert_eq!(check(&multipart(100), &limits).unwrap().depth, 100);
    assert_eq!(check(&multipart(101), &limits), Err(Violation::MimeDepth));
    assert_eq!(check(&attached(101), &limits), Err(Violation::MimeDepth));
    let many = format!(
        "Subject: p\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n{}--b--\r\n",
        "--b\r\n\r\nx\r\n".repeat(1000)
    );
    assert_eq!(check(many.as_bytes(), &limits), Err(Violation::MimeParts));
    let lines = format!("{}\r\nbody\r\n", "a: b\r\n".repeat(5001));
    assert_eq!(check(lines.as_bytes(), &limits), Err(Violation::HeaderLines));
    let big = format!("{}\r\nbody\r\n", format!("X-Long: {}\r\n", "y".repeat(990)).repeat(300));
    assert_eq!(check(big.as_bytes(), &limits), Err(Violation::HeaderSize));
    // part headers count too
    let part_headers = format!(
        "Subject: p\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n{}\r\nx\r\n--b--\r\n",
        "a: b\r\n".repeat(5000)
    );
    assert_eq!(check(part_headers.as_bytes(), &limits), Err(Violation::HeaderLines));
}

#[test]
fn abusive_structures_are_refused_in_linear_time() {
    let limits = ContentLimits::DEFAULT;
    let start = Instant::now();
    // 10,000 deep, both kinds: refused at level 101 without reading the rest
    assert_eq!(check(&multipart(10_000), &limits), Err(Violation::MimeDepth));
    assert_eq!(check(&attached(10_000), &limits), Err(Violation::MimeDepth));
    // parts naming boundaries that never come: each would make mail-parser read to the end
    let mut raw = b"Subject: q\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n".to_vec();
    for i in 0..900 {
        raw.extend(format!("--b\r\nContent-Type: multipart/mixed; boundary=missing{i}\r\n\r\n").bytes());
        raw.extend(vec![b'x'; 998]);
        raw.extend(b"\r\n");
    }
    raw.extend(b"--b--\r\n");
    assert_eq!(check(&raw, &limits), Err(Violation::MimeBoundaries));
    // one boundary that is missing is fine
    assert!(check(b"Content-Type: multipart/mixed; boundary=z\r\n\r\nnone\r\n", &limits).is_ok());
    assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
}

#[test]
fn an_attached_message_chain_within_the_limit_parses_and_drops_on_a_small_stack() {
    // mail-parser's drop of nested attached messages recurses: MAX_MIME_DEPTH levels must fit
    // a tokio worker's 2 MiB stack, in a debug build, with the encoded form (which mail-parser
    // also copies recursively).
    let inner = attached(MAX_MIME_DEPTH - 2);
    let encoded = base64::engine::general_purpose::STANDARD.encode(&inner);
    let raw =
        format!("Subject: e\r\nContent-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\n{encoded}\r\n");
    assert_eq!(check(raw.as_bytes(), &ContentLimits::DEFAULT).unwrap().depth, MAX_MIME_DEPTH - 1);
    let t = std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || {
            let parsed = MessageParser::default().parse(raw.as_bytes());
            assert!(parsed.is_some());
        })
        .unwrap();
    t.join().unwrap();
}

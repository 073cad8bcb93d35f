//! The trimming rules of Discourse's `email_reply_trimmer` gem (which GitLab runs on incoming
//! replies): classify every line (`classify.rs`), write the classes as a string of letters
//! (`e`mpty, `d`elimiter, `s`ignature, em`b`edded-email marker, `h`eader, `q`uote, `t`ext) and
//! cut the body with regexes over that string, in the gem's order. Every step is linear in
//! the number of lines (the `regex` crate has no backtracking).
//!
//! Where this differs from the gem, and why, is listed in `mod.rs`.

use std::borrow::Cow;
use std::sync::LazyLock;

use regex::Regex;

use super::classify::{self, Kind};

/// Wrapped markers are joined over at most this many lines ("On …,\nAlice <a@x>\nwrote:").
const MAX_MARKER_LINES: usize = 5;
/// The "embedded email followed by a huge quote" rule gives up when this much text follows.
const MAX_TEXT_AFTER_QUOTE: usize = 7;

fn re(pattern: &str) -> Regex {
    Regex::new(pattern).expect("constant reply-trimmer regex")
}

static PGP_HEADER: LazyLock<Regex> = LazyLock::new(|| re(r"\A-----BEGIN PGP SIGNED MESSAGE-----\n(?:Hash: \S+\n)?\s*"));
static PGP_SIGNATURE: LazyLock<Regex> =
    LazyLock::new(|| re(r"(?ms)^-----BEGIN PGP SIGNATURE-----$.*?^-----END PGP SIGNATURE-----$"));
static UNSUBSCRIBE: LazyLock<Regex> = LazyLock::new(|| re(r"(?im)^Unsubscribe: .+@.+(?:\n.+https?:.+)?\s*\z"));

/// The rules, over the string of line classes.
struct Rules {
    reply_at_end: Regex,
    reply_at_end_text: Regex,
    marker_without_quote: Regex,
    marker_then_quote: Regex,
    text_then_quote: Regex,
    wrapped_headers: Regex,
    text_then_headers: Regex,
    header_run: Regex,
    trailing_quote: Regex,
}

static RULES: LazyLock<Rules> = LazyLock::new(|| Rules {
    reply_at_end: re(r"^b[^t]+t[et]*$"),
    reply_at_end_text: re(r"t[et]*$"),
    marker_without_quote: re(r"te*b[^q]*$"),
    marker_then_quote: re(r"te*b[eqbh]*[te]*$"),
    text_then_quote: re(r"te*[qbe]+$"),
    wrapped_headers: re(r"h+[hte]{1,10}h+e"),
    text_then_headers: re(r"t[eq]*h{3,}"),
    header_run: re(r"h{2,}"),
    trailing_quote: re(r"[eq]+$"),
});

/// The lines of a body and their classes, kept in step.
struct Body<'a> {
    lines: Vec<Cow<'a, str>>,
    kinds: String,
}

impl Body<'_> {
    /// Keeps the lines before `index`.
    fn keep_before(&mut self, index: usize) {
        self.lines.truncate(index);
        self.kinds.truncate(index);
    }

    /// Keeps the lines up to and including `index`.
    fn keep_through(&mut self, index: usize) {
        self.keep_before(index.saturating_add(1));
    }

    /// Drops the lines whose class is `code`.
    fn drop_kind(&mut self, code: char) {
        if self.kinds.contains(code) {
            self.drop_lines(|_, c| c == code);
        }
    }

    /// Drops the lines for which `drop(index, class)` holds.
    fn drop_lines(&mut self, drop: impl Fn(usize, char) -> bool) {
        let mut kept = String::with_capacity(self.kinds.len());
        let mut kinds = self.kinds.chars().enumerate();
        self.lines.retain(|_| match kinds.next() {
            Some((i, c)) if drop(i, c) => false,
            Some((_, c)) => {
                kept.push(c);
                true
            }
            None => true,
        });
        self.kinds = kept;
    }

    /// Sets the class of the lines in `range` (the classes are ASCII: byte and line indexes agree).
    fn set_kind(&mut self, range: std::ops::Range<usize>, kind: Kind) {
        let code = kind.code().to_string().repeat(range.len());
        self.kinds.replace_range(range, &code);
    }
}

/// The reply without quoted text, embedded emails and signatures, trimmed of surrounding
/// whitespace. A blank `text` gives "". A text without text of its own keeps its quotes; when
/// the rules leave nothing of a text that has some (only a forward, a signature), the whole
/// text is returned, trimmed.
pub fn trim(text: &str) -> String {
    let text = normalize(text);
    let text = preprocess(&text);
    if text.is_empty() {
        return String::new();
    }
    let trimmed = apply_rules(&text);
    if trimmed.is_empty() { text.into_owned() } else { trimmed }
}

/// `\r\n` and lone `\r` become `\n`.
fn normalize(text: &str) -> Cow<'_, str> {
    if text.contains('\r') { Cow::Owned(text.replace("\r\n", "\n").replace('\r', "\n")) } else { Cow::Borrowed(text) }
}

/// The gem's clean-up: PGP armour and a mailing list's trailing unsubscribe line go, and the
/// text is trimmed of surrounding whitespace.
fn preprocess(text: &str) -> Cow<'_, str> {
    let mut text = Cow::Borrowed(text.trim());
    if text.starts_with("-----BEGIN PGP SIGNED MESSAGE-----") {
        text = Cow::Owned(PGP_HEADER.replace(&text, "").into_owned());
    }
    if text.contains("-----BEGIN PGP SIGNATURE-----") {
        text = Cow::Owned(PGP_SIGNATURE.replace_all(&text, "").into_owned());
    }
    if UNSUBSCRIBE.is_match(&text) {
        text = Cow::Owned(UNSUBSCRIBE.replace(&text, "").into_owned());
    }
    match text {
        Cow::Borrowed(t) => Cow::Borrowed(t),
        Cow::Owned(t) => Cow::Owned(t.trim().to_string()),
    }
}

fn apply_rules(text: &str) -> String {
    let mut body = join_wrapped_markers(text);
    let rules = &*RULES;

    // Delimiters: everything from the first one that follows some text goes (a "-- " signature,
    // Outlook's "____" before a quoted email). A delimiter before any text is only a rule; a
    // "____" rule inside the reply, with the reply's own text after it and a marker further
    // down, is kept as text (the gem's newer behaviour).
    let first_text = body.kinds.find('t').unwrap_or(body.kinds.len());
    let mut relabel = Vec::new();
    let mut cut = None;
    for (i, _) in body.kinds.char_indices().filter(|&(_, code)| code == 'd') {
        let after = &body.kinds[i + 1..];
        if i < first_text {
            relabel.push((i, Kind::Empty));
        } else if classify::is_underscore_rule(&body.lines[i])
            && after.contains('b')
            && after.trim_start_matches('e').starts_with('t')
        {
            relabel.push((i, Kind::Text));
        } else {
            cut = Some(i);
            break;
        }
    }
    for (i, kind) in relabel {
        body.set_kind(i..i + 1, kind);
    }
    if let Some(i) = cut {
        body.keep_before(i);
    }

    // Mobile signatures go, wherever they are.
    body.drop_kind('s');

    // The reply is at the end, after an embedded email: keep the final text.
    if rules.reply_at_end.is_match(&body.kinds)
        && let Some(m) = rules.reply_at_end_text.find(&body.kinds)
    {
        body.lines.drain(..m.start());
        body.kinds = body.kinds[m.start()..].to_string();
    }

    // An embedded-email marker that no quote follows: keep the text up to it.
    if let Some(m) = rules.marker_without_quote.find(&body.kinds) {
        body.keep_through(m.start());
    }

    // A marker followed by a quote and at most a few lines of text: keep the text up to it.
    if let Some(m) = rules.marker_then_quote.find(&body.kinds) {
        let matched = &body.kinds[m.range()];
        let tail_start = matched.rfind(['q', 'b', 'h']).map_or(0, |i| i + 1);
        if matched[tail_start..].matches('t').count() < MAX_TEXT_AFTER_QUOTE {
            body.keep_through(m.start());
        }
    }

    // Text followed by nothing but quotes and markers: drop them.
    if let Some(m) = rules.text_then_quote.find(&body.kinds) {
        body.keep_through(m.start());
    }

    // The remaining markers go.
    body.drop_kind('b');

    // A header block wrapped over a few lines ("To: a,\n b\nSubject: …") is one block.
    if let Some(m) = rules.wrapped_headers.find(&body.kinds) {
        body.set_kind(m.range(), Kind::Header);
    }

    // Text followed by three or more header lines: keep the text.
    if let Some(m) = rules.text_then_headers.find(&body.kinds) {
        body.keep_through(m.start());
    }

    // Runs of header lines go; a lone "To: …" or "Subject: …" line is the reply's own text.
    let mut in_run = vec![false; body.kinds.len()];
    for m in rules.header_run.find_iter(&body.kinds) {
        in_run[m.range()].fill(true);
    }
    body.drop_lines(|i, _| in_run.get(i).copied().unwrap_or(false));

    // Trailing quotes go when there is some text.
    if body.kinds.contains('t')
        && let Some(m) = rules.trailing_quote.find(&body.kinds)
    {
        body.keep_before(m.start());
    }

    body.lines.join("\n").trim().to_string()
}

/// Splits `text` into classified lines, joining a marker that a client wrapped over up to
/// [`MAX_MARKER_LINES`] lines into one line (the gem does the same with its marker regexes).
fn join_wrapped_markers(text: &str) -> Body<'_> {
    let raw: Vec<&str> = text.split('\n').collect();
    let kinds: Vec<Kind> = raw.iter().map(|l| classify::classify(l)).collect();
    let mut lines: Vec<Cow<'_, str>> = Vec::with_capacity(raw.len());
    let mut out_kinds = String::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let kind = kinds[i];
        let may_start = match kind {
            Kind::Text | Kind::Quote => classify::may_start_marker(raw[i]),
            // "On <date>, Alice <a@x.org>" is a marker already; "\nwrote:" belongs to it
            Kind::Embedded => classify::opens_dated_marker(raw[i]),
            _ => false,
        };
        if may_start && let Some((joined, used)) = joined_marker(&raw[i..], &kinds[i..]) {
            lines.push(Cow::Owned(joined));
            out_kinds.push(Kind::Embedded.code());
            i += used;
            continue;
        }
        lines.push(Cow::Borrowed(raw[i]));
        out_kinds.push(kind.code());
        i += 1;
    }
    Body { lines, kinds: out_kinds }
}

/// The marker that `lines[0]` starts and the next lines end, with the number of lines it
/// takes. A continuation line must be text (or quote); it may be a marker itself ("<a@x.org>
/// wrote:") only after a dated "On <date>," line, so that a line of text is never taken into
/// the marker that follows it.
fn joined_marker(lines: &[&str], kinds: &[Kind]) -> Option<(String, usize)> {
    let first = lines.first()?;
    let dated = classify::opens_dated_marker(first) && first.bytes().any(|b| b.is_ascii_digit());
    let mut joined = first.trim_end().to_string();
    for n in 1..MAX_MARKER_LINES.min(lines.len()) {
        let next = lines[n];
        let continues = match kinds[n] {
            Kind::Text | Kind::Quote => true,
            Kind::Embedded => dated,
            _ => false,
        };
        if !continues || next.len() > classify::MAX_MARKER_BYTES / 2 {
            return None;
        }
        joined.push(' ');
        joined.push_str(next.trim_start_matches(|c: char| c.is_whitespace() || c == '>').trim_end());
        if classify::classify(&joined) == Kind::Embedded {
            return Some((joined, n + 1));
        }
    }
    None
}

//! Text from an HTML body, with `html2text`: block quotes become `> ` lines (which the trimmer
//! then treats as quotes), links become Markdown links, lines are not re-wrapped and tables
//! are read cell by cell.
//!
//! html5ever, html2text's parser, is quadratic in the nesting depth of elements and in the
//! number of attributes of one tag, so only the start of a large document is converted: from
//! `<body` on (the head holds styles, not text), the first [`MAX_HTML_BYTES`] and at most
//! [`MAX_HTML_TAGS`] `<`. The reply is at the top; what is cut is quoted history.

use std::sync::LazyLock;

use html2text::render::TextDecorator;
use regex::Regex;

/// At most this much HTML is converted.
const MAX_HTML_BYTES: usize = 64 * 1024;
/// At most this many `<` (an upper bound on the number of tags) are converted.
const MAX_HTML_TAGS: usize = 2000;

static BODY_TAG: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"(?i)<body[\s>/]").expect("constant body-tag regex"));
/// Wide enough that html2text never wraps a line of an email.
const WIDTH: usize = 10_000;

/// The text of `html`. When html2text fails, mail-parser's simpler converter is used.
pub(super) fn to_text(html: &str) -> String {
    let html = bounded(html);
    html2text::config::with_decorator(ReplyDecorator::default())
        .raw_mode(true)
        .allow_width_overflow()
        .string_from_read(html.as_bytes(), WIDTH)
        .unwrap_or_else(|_| mail_parser::decoders::html::html_to_text(html))
}

/// The start of `html` that html2text converts in bounded time.
fn bounded(html: &str) -> &str {
    let html = BODY_TAG.find(html).map_or(html, |m| &html[m.start()..]);
    let mut end = html.len().min(MAX_HTML_BYTES);
    while !html.is_char_boundary(end) {
        end -= 1;
    }
    let html = &html[..end];
    match memchr::memchr_iter(b'<', html.as_bytes()).nth(MAX_HTML_TAGS) {
        Some(cut) => &html[..cut],
        None => html,
    }
}

/// Renders like html2text's plain decorator without emphasis marks, but with links inline as
/// Markdown (`[text](url)`, GitLab renders Markdown) instead of footnotes; `mailto:` and
/// other non-web links keep only their text.
#[derive(Clone, Debug, Default)]
struct ReplyDecorator {
    /// The URL of every open link, None for those shown as text only.
    links: Vec<Option<String>>,
}

impl TextDecorator for ReplyDecorator {
    type Annotation = ();

    fn decorate_link_start(&mut self, url: &str) -> (String, ()) {
        let url = url.trim();
        let web = url.starts_with("http://") || url.starts_with("https://");
        let web = web && !url.contains([')', ' ', '\n']);
        self.links.push(web.then(|| url.to_string()));
        (if web { "[".into() } else { String::new() }, ())
    }

    fn decorate_link_end(&mut self) -> String {
        match self.links.pop().flatten() {
            Some(url) => format!("]({url})"),
            None => String::new(),
        }
    }

    fn decorate_em_start(&self) -> (String, ()) {
        (String::new(), ())
    }

    fn decorate_em_end(&self) -> String {
        String::new()
    }

    fn decorate_strong_start(&self) -> (String, ()) {
        (String::new(), ())
    }

    fn decorate_strong_end(&self) -> String {
        String::new()
    }

    fn decorate_strikeout_start(&self) -> (String, ()) {
        (String::new(), ())
    }

    fn decorate_strikeout_end(&self) -> String {
        String::new()
    }

    fn decorate_code_start(&self) -> (String, ()) {
        (String::new(), ())
    }

    fn decorate_code_end(&self) -> String {
        String::new()
    }

    fn decorate_preformat_first(&self) {}

    fn decorate_preformat_cont(&self) {}

    fn decorate_image(&mut self, _src: &str, title: &str) -> (String, ()) {
        (if title.is_empty() { String::new() } else { format!("[{title}]") }, ())
    }

    fn header_prefix(&self, level: usize) -> String {
        "#".repeat(level.min(6)) + " "
    }

    fn quote_prefix(&self) -> String {
        "> ".into()
    }

    fn unordered_item_prefix(&self) -> String {
        "* ".into()
    }

    fn ordered_item_prefix(&self, i: i64) -> String {
        format!("{i}. ")
    }

    fn make_subblock_decorator(&self) -> Self {
        ReplyDecorator::default()
    }

    fn finalise(&mut self, _urls: Vec<String>) -> Vec<html2text::render::TaggedLine<()>> {
        Vec::new()
    }
}

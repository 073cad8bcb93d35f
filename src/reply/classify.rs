//! Line classes for the reply trimmer, after the matchers of Discourse's `email_reply_trimmer`
//! gem: each line of a body is empty, a delimiter, a mobile signature, an embedded-email marker
//! ("On … wrote:", "-----Original Message-----"), an email header ("From: …"), a quote (`>`) or
//! text. The patterns are compiled once and run in linear time (`regex` crate); lines longer
//! than [`MAX_MARKER_BYTES`] are never signatures, markers or headers.
//!
//! Where the gem's patterns catch ordinary sentences, these are narrower (see `mod.rs`): a
//! dated "On … wrote" marker needs a digit and a closing colon, "From my …" signatures must
//! be short lines.

use std::sync::LazyLock;

use memchr::memmem;
use regex::{Regex, RegexSet};

/// Longer lines are text (or quote, delimiter, empty): no marker or header is this long.
pub(super) const MAX_MARKER_BYTES: usize = 1000;
/// Longer lines are never mobile signatures ("Sent from my iPhone" is short).
const MAX_SIGNATURE_CHARS: usize = 80;

/// The class of one line. Its [`code`](Kind::code) is the gem's letter, so that the trimming
/// rules can be written as (linear-time) regexes over the string of codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Empty,
    Delimiter,
    Signature,
    Embedded,
    Header,
    Quote,
    Text,
}

impl Kind {
    pub(super) fn code(self) -> char {
        match self {
            Kind::Empty => 'e',
            Kind::Delimiter => 'd',
            Kind::Signature => 's',
            Kind::Embedded => 'b',
            Kind::Header => 'h',
            Kind::Quote => 'q',
            Kind::Text => 't',
        }
    }
}

/// Horizontal blanks: tab, every Unicode space separator (NBSP included), zero-width space, BOM.
const BLANK: &str = r"\t\p{Zs}\x{200B}\x{FEFF}";

/// Compiles constant patterns, `{B}` standing for the [`BLANK`] characters (inside a class).
fn set(patterns: &[&str]) -> RegexSet {
    RegexSet::new(patterns.iter().map(|p| p.replace("{B}", BLANK))).expect("constant reply-trimmer regex")
}

fn one(pattern: &str) -> Regex {
    Regex::new(&pattern.replace("{B}", BLANK)).expect("constant reply-trimmer regex")
}

/// The end of a dated marker: the verb, then a colon (ASCII or full-width) or a `--` run.
macro_rules! tail {
    () => {
        r"[{B}]*(?::|：|-{2,})[{B}.:：>-]*$"
    };
}

/// "On <date>, <someone> wrote:" and its translations; they only count with a digit in the line.
static DATED_MARKERS: LazyLock<RegexSet> = LazyLock::new(|| {
    set(&[
        // English
        concat!(r"(?i)^[{B}<>-]*(?:On|At)\s.+?\b(?:wrote|writes|says|said)", tail!()),
        concat!(r"(?i)^[{B}<>-]*In message\s.+?\bwrites", tail!()),
        r"(?i)^.+\bwrote\s+on\b.+:[{B}]*$",
        // French
        concat!(r"(?i)^[{B}<>-]*Le\s.+?(?:nous\s+a\s+dit|a\s+écrit)", tail!()),
        // German
        concat!(r"(?i)^[{B}<>-]*Am\s.+?(?:schrieben\s+Sie|geschrieben|schrieb\b[^:]*)", tail!()),
        r"(?i)^.+\bschrieb\s+am\b.+:[{B}]*$",
        // Dutch
        concat!(r"(?i)^[{B}<>-]*Op\s.+?(?:het\s+volgende\s+geschreven|schreef\b[^:]*)", tail!()),
        // Italian
        concat!(r"(?i)^[{B}<>-]*Il\s.+?ha\s+scritto", tail!()),
        // Polish
        concat!(r"(?i)^[{B}<>-]*(?:Dnia|Dňa|W\s+dniu)\s.+?(?:napisał(?:\(a\))?|pisze)", tail!()),
        r"(?i)\d{4}.{1,80}napisał\(a\)[{B}]*:",
        // Portuguese
        concat!(r"(?i)^[{B}<>-]*Em\s.+?escreveu", tail!()),
        // Spanish
        concat!(r"(?i)^[{B}<>-]*El\s.+?escribió", tail!()),
        // Danish, Norwegian, Swedish
        r"(?i)^[{B}>]*(?:Den|søn\.)\s.+\sskrev\s[^:]+:",
        r"(?i)\bskrev\b[^:]*:[{B}]*$",
        // Russian, Ukrainian
        r"(?i)(?:написал|написала|написал\(а\)|пишет|пише)[{B}]*:[{B}]*$",
        // Chinese
        r"^[{B}<>-]*在.+?写道[{B}.:：>-]*$",
        r"(?:写道|寫道)[{B}]*[:：][{B}]*$",
        // Japanese
        r"(?:のメッセージ|のメール|書きました)[{B}]*[:：][{B}]*$",
        // Korean
        r"작성[{B}]*[:：][{B}]*$",
        // "2016-03-03 17:21 GMT+01:00 Some One"
        r"^[{B}>]*20\d\d-\d\d-\d\d \d\d:\d\d GMT\+\d\d:\d\d [\w{B}]+$",
        // "2015-10-18 0:17 GMT+03:00 Matt <m@x.org>:", "вт, 5 янв. 2016 г. в 23:39, Erlend <e@x.org>:"
        r"\d{4}.{1,80}\s?<[^@<>\s]+@[^@<>.\s]+\.[^@<>\s]+>[:：]?[{B}]*$",
        // "Posted by mpalmer on 01/21/2016"
        r"(?i)^[{B}>]*Posted by .+ on \d{2}/\d{2}/\d{4}$",
    ])
});

/// Markers without a date: "Alice <a@x.org> wrote:", forwarded and original-message banners.
static MARKERS: LazyLock<RegexSet> = LazyLock::new(|| {
    set(&[
        // "codinghorror via Discourse Meta wrote:"
        r"^.+ via .+ (?:wrote|schrieb):[{B}]*$",
        // "Some One <info@discourse.org> wrote:", "Gavin (gavin@x.org) wrote:"
        r"^.+\b[\w.+-]+@[\w.-]+\.\w{2,}\b.*\bwrote:[{B}]*$",
        r"(?i)^[{B}>]*Begin forwarded message:",
        r"(?i)^[{B}>]*Début du message (?:transféré|réexpédié)[{B}]*:",
        concat!(
            r"(?i)^[{B}>*]*-{2,}[{B}]*(?:(?:Forwarded|Original|Reply) Message|Message transféré|",
            r"Message d'origine|Ursprüngliche Nachricht|Weitergeleitete Nachricht|Mensaje original|",
            r"Mensaje reenviado|Messaggio originale|Messaggio inoltrato|Mensagem original|",
            r"Mensagem encaminhada|Oorspronkelijk bericht|Origineel bericht|Doorgestuurd bericht|",
            r"Oryginalna wiadomość|Wiadomość przekazana|Ursprungligt meddelande|",
            r"Vidarebefordrat meddelande|Opprinnelig melding|Videresendt melding|",
            r"Oprindelig meddelelse|Videresendt meddelelse|Исходное сообщение|",
            r"Пересылаемое сообщение|Переслане повідомлення|原始邮件|转发邮件|原始郵件|",
            r"元のメッセージ|転送されたメッセージ)[{B}]*-{2,}"
        ),
    ])
});

/// Header lines of an embedded email, as Outlook writes them ("From: …", "Sent: …").
static HEADERS: LazyLock<RegexSet> = LazyLock::new(|| {
    set(&[
        // headers with a date
        concat!(
            r"^[{B}*]*(?:Sendt|Sent|Date|Le|Gesendet|Enviada em|Enviado|Fecha|Data|Datum|Skickat|",
            r"Wysłano|Отправлено|Дата|发送时间|發送時間|日期|送信日時|日時)[{B}*]*[:：].*\d"
        ),
        // headers with text
        concat!(
            r"(?i)^[{B}*]*(?:Fra|Til|Emne|From|To|Cc|Bcc|Reply-To|Subject|De|Expéditeur|À|",
            r"Destinataire|Répondre à|Objet|Von|An|Betreff|Para|Assunto|Asunto|Da|Risposta|A|",
            r"Oggetto|Van|Beantwoorden - Aan|Aan|Onderwerp|Från|Till|Ämne|Od|Do|Temat|Kopia|От|",
            r"Кому|Тема|Копия|发件人|收件人|抄送|主题|寄件者|收件者|主旨|差出人|宛先|件名)",
            r"[{B}*]*[:：].*\w"
        ),
    ])
});

/// Mobile and webmail signatures ("Sent from my iPhone") in the languages GitLab users write.
static SIGNATURES: LazyLock<RegexSet> = LazyLock::new(|| {
    set(&[
        r"(?i)^[{B}]*[(<]*Sent (?:from|via|with|by|using) .+",
        r"(?i)^[{B}]*\w{1,30} from mobile",
        r"(?i)^[{B}]*From my .{1,20}$",
        r"(?i)^[{B}]*Get Outlook for ",
        r"(?i)^[{B}]*Envoyé (?:depuis|de|avec) ",
        r"(?i)^[{B}]*Von meinem .+ gesendet",
        r"(?i)^[{B}]*Gesendet (?:von|mit) ",
        r"(?i)^[{B}]*Diese Nachricht wurde von .+ gesendet",
        r"(?i)^[{B}]*Inviato da ",
        r"(?i)^[{B}]*Sendt fra ",
        r"(?i)^[{B}]*Enviado (?:do|desde|de) ",
        r"(?i)^[{B}]*(?:Verzonden|Verstuurd) (?:met|vanaf|van) ",
        r"(?i)^[{B}]*(?:Skickat )?från min ",
        r"(?i)^[{B}]*Wysłane z ",
        r"(?i)^[{B}]*(?:Отправлено|Надіслано) (?:с|з|из) ",
        r"(?i)^[{B}]*Lähetetty ",
        r"^[{B}]*(?:從|从)我的.{1,30}(?:傳送|发送)",
        r"^[{B}]*.{1,30}から送信[{B}]*$",
        r"^[{B}]*.{1,30}에서 보냄[{B}]*$",
    ])
});

/// A Markdown link `[text](url)`, shown by some clients around "Sent from [Outlook](…)".
static MARKDOWN_LINK: LazyLock<Regex> = LazyLock::new(|| one(r"\[([^\]]+)\]\([^)]+\)"));

/// Starts of the "On <date> … wrote:" forms, which clients wrap over several lines.
static MARKER_START: LazyLock<Regex> =
    LazyLock::new(|| one(r"(?i)^[{B}<>-]*(?:On|At|In message|Le|Am|Il|Op|Em|El|Dnia|Dňa|W\s+dniu|Den|在)\s"));

static FIND_LINK: LazyLock<memmem::Finder<'static>> = LazyLock::new(|| memmem::Finder::new("]("));
static FIND_WIDE_COLON: LazyLock<memmem::Finder<'static>> = LazyLock::new(|| memmem::Finder::new("："));
static FIND_DASHES: LazyLock<memmem::Finder<'static>> = LazyLock::new(|| memmem::Finder::new("--"));

fn is_blank(c: char) -> bool {
    c.is_whitespace() || c == '\u{200B}' || c == '\u{FEFF}'
}

/// A line of only blanks.
pub(super) fn is_empty(line: &str) -> bool {
    line.chars().all(is_blank)
}

/// A line of only `-_,=+~#*ᐧ—` and box-drawing rules (the gem's delimiter characters), except
/// a lone `-` or `*`, which is how plain-text clients write an empty bullet.
fn is_delimiter(line: &str) -> bool {
    let body = line.trim_matches(is_blank);
    !body.is_empty() && body != "-" && body != "*" && body.chars().all(|c| "-_,=+~#*ᐧ—─━".contains(c))
}

/// A line of only underscores (Outlook's rule before an embedded email).
pub(super) fn is_underscore_rule(line: &str) -> bool {
    let body = line.trim_matches(is_blank);
    !body.is_empty() && body.chars().all(|c| c == '_')
}

fn is_quote(line: &str) -> bool {
    line.trim_start_matches(is_blank).starts_with('>')
}

fn is_signature(line: &str) -> bool {
    // (bytes >= chars: the count is only needed for long lines)
    if line.len() > MAX_SIGNATURE_CHARS * 3 && line.chars().count() > MAX_SIGNATURE_CHARS * 3 {
        return false;
    }
    let stripped =
        if FIND_LINK.find(line.as_bytes()).is_some() { MARKDOWN_LINK.replace_all(line, "$1") } else { line.into() };
    stripped.trim_matches(is_blank).chars().count() <= MAX_SIGNATURE_CHARS && SIGNATURES.is_match(&stripped)
}

/// Every undated marker and every header has a colon (ASCII or full-width) or a `--` run: a
/// cheap test that spares most lines of prose the regexes.
fn has_colon_or_dashes(line: &str) -> bool {
    let b = line.as_bytes();
    memchr::memchr(b':', b).is_some() || FIND_WIDE_COLON.find(b).is_some() || FIND_DASHES.find(b).is_some()
}

fn is_embedded(line: &str, colon_or_dashes: bool) -> bool {
    (colon_or_dashes && MARKERS.is_match(line))
        || (line.bytes().any(|b| b.is_ascii_digit()) && DATED_MARKERS.is_match(line))
}

fn is_header(line: &str, colon_or_dashes: bool) -> bool {
    colon_or_dashes && HEADERS.is_match(line)
}

/// The class of `line`, tested in the gem's order (an empty line is never a delimiter, a
/// quoted "> On … wrote:" is a marker, a quoted "> From: …" is a quote).
pub(super) fn classify(line: &str) -> Kind {
    if is_empty(line) {
        return Kind::Empty;
    }
    if is_delimiter(line) {
        return Kind::Delimiter;
    }
    if line.len() <= MAX_MARKER_BYTES {
        if is_signature(line) {
            return Kind::Signature;
        }
        let colon_or_dashes = has_colon_or_dashes(line);
        if is_embedded(line, colon_or_dashes) {
            return Kind::Embedded;
        }
        if is_header(line, colon_or_dashes) {
            return Kind::Header;
        }
    }
    if is_quote(line) { Kind::Quote } else { Kind::Text }
}

/// Whether `line` may be the first line of a marker that a client wrapped: an "On …" form, or
/// a line with a year or an address (the "<date> <someone> <address>:" forms).
pub(super) fn may_start_marker(line: &str) -> bool {
    line.len() <= MAX_MARKER_BYTES / 2
        && (opens_dated_marker(line)
            || line.contains('@')
            || line.as_bytes().windows(4).any(|w| w.iter().all(u8::is_ascii_digit)))
}

/// Whether `line` starts an "On <date> … wrote:" form ("Le …", "Am …", …).
pub(super) fn opens_dated_marker(line: &str) -> bool {
    line.len() <= MAX_MARKER_BYTES / 2 && MARKER_START.is_match(line)
}

#[cfg(test)]
pub(super) fn compile_all() {
    for s in [&*DATED_MARKERS, &*MARKERS, &*HEADERS, &*SIGNATURES] {
        assert!(!s.is_empty());
    }
    let _ = (&*MARKDOWN_LINK, &*MARKER_START);
}

//! Text from the bytes of a body part and its declared charset, with GitLab's fallbacks for
//! mislabelled mail: a part labelled ISO-2022-JP that is not (it is UTF-8, EUC-JP or
//! Shift_JIS), a part labelled GB2312 that holds GBK or GB18030 characters, and 8-bit text
//! that is not UTF-8 although labelled UTF-8, US-ASCII or nothing (it is Latin-1, read as
//! windows-1252).
//!
//! The charset tables are mail-parser's (`charset_decoder`, backed by `encoding_rs` through
//! its `full_encoding` feature); nothing here knows a charset's bytes.

use mail_parser::decoders::charsets::map::charset_decoder;

/// The replacement character, which the decoders write for bytes that are not in the charset.
const REPLACEMENT: char = '\u{FFFD}';

/// Decodes `bytes`, labelled `charset` (the `charset` parameter of the part's Content-Type).
pub(super) fn decode(bytes: &[u8], charset: Option<&str>) -> String {
    let label = charset.map(|c| c.trim().trim_matches(['"', '\'']).trim().to_ascii_lowercase());
    match label.as_deref() {
        None | Some("") => utf8_or_latin1(bytes),
        Some(l) if is_utf8_or_ascii(l) => utf8_or_latin1(bytes),
        Some(l) if l.starts_with("iso-2022-jp") || l == "csiso2022jp" => japanese(bytes),
        Some(l) if is_chinese_gb(l) => with("gb18030", bytes).unwrap_or_else(|| utf8_or_latin1(bytes)),
        Some(l) => match charset_decoder(l.as_bytes()) {
            Some(decoder) => decoder(bytes),
            None => utf8_or_latin1(bytes),
        },
    }
}

fn is_utf8_or_ascii(label: &str) -> bool {
    matches!(
        label,
        "utf-8" | "utf8" | "unicode-1-1-utf-8" | "x-unicode20utf8" | "us-ascii" | "ascii" | "ansi_x3.4-1968" | "7bit"
    )
}

/// GB2312 and its supersets: GB18030 decodes them all (GitLab reads GB2312 as GB18030).
fn is_chinese_gb(label: &str) -> bool {
    matches!(
        label,
        "gb2312"
            | "gb_2312"
            | "gb_2312-80"
            | "csgb2312"
            | "csiso58gb231280"
            | "iso-ir-58"
            | "chinese"
            | "euc-cn"
            | "x-euc-cn"
            | "gbk"
            | "x-gbk"
            | "cp936"
            | "ms936"
            | "windows-936"
            | "gb18030"
            | "csgb18030"
    )
}

/// Decodes with the charset `label`, None when mail-parser does not know it.
fn with(label: &str, bytes: &[u8]) -> Option<String> {
    charset_decoder(label.as_bytes()).map(|decoder| decoder(bytes))
}

/// Decodes with `label` only when every byte is valid in it (the decoders replace invalid
/// bytes with U+FFFD, which none of these charsets can encode).
fn strict(label: &str, bytes: &[u8]) -> Option<String> {
    with(label, bytes).filter(|text| !text.contains(REPLACEMENT))
}

/// A part labelled ISO-2022-JP: as labelled when it is valid ISO-2022-JP, else UTF-8, else
/// EUC-JP or Shift_JIS (whichever decodes, the one with fewer half-width katakana when both
/// do: EUC-JP read as Shift_JIS is mostly half-width katakana), else Shift_JIS with
/// replacement characters.
fn japanese(bytes: &[u8]) -> String {
    if let Some(text) = strict("iso-2022-jp", bytes) {
        return text;
    }
    if let Ok(text) = std::str::from_utf8(bytes) {
        return text.to_string();
    }
    let halfwidth_katakana = |text: &String| text.chars().filter(|c| ('\u{FF61}'..='\u{FF9F}').contains(c)).count();
    match (strict("euc-jp", bytes), strict("shift_jis", bytes)) {
        (Some(euc), Some(sjis)) => {
            if halfwidth_katakana(&euc) <= halfwidth_katakana(&sjis) {
                euc
            } else {
                sjis
            }
        }
        (Some(text), None) | (None, Some(text)) => text,
        (None, None) => with("shift_jis", bytes).unwrap_or_else(|| String::from_utf8_lossy(bytes).into_owned()),
    }
}

/// UTF-8 when valid; else, when the bytes hold more valid multi-byte UTF-8 characters than
/// invalid sequences, UTF-8 with replacement characters (a damaged UTF-8 text); else
/// windows-1252 (8-bit Latin-1 text sent without a charset, or labelled US-ASCII or UTF-8).
fn utf8_or_latin1(bytes: &[u8]) -> String {
    if let Ok(text) = std::str::from_utf8(bytes) {
        return text.to_string();
    }
    let (mut multibyte, mut invalid) = (0usize, 0usize);
    for chunk in bytes.utf8_chunks() {
        multibyte += chunk.valid().chars().filter(|c| !c.is_ascii()).count();
        invalid += usize::from(!chunk.invalid().is_empty());
    }
    if multibyte > invalid {
        return String::from_utf8_lossy(bytes).into_owned();
    }
    with("windows-1252", bytes).unwrap_or_else(|| String::from_utf8_lossy(bytes).into_owned())
}

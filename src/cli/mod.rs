//! The command-line side of mailgate (binary only): queue and reject-log commands through a
//! [`backend::Backend`], `route` and `check`.

pub mod backend;
#[cfg(test)]
mod backend_tests;
pub mod check;
pub mod postfix;
pub mod queue;
pub mod rejects;
pub mod route;

use std::path::Path;

use anyhow::Result;
use mailgate::config::Config;

/// Exit code of `queue pop` when no job is ready.
pub const EXIT_EMPTY: u8 = 3;

/// `--config FILE` (or `$MAILGATE_CONFIG`), else the embedded defaults.
pub fn load_config(path: Option<&Path>) -> Result<Config> {
    Ok(Config::load_or_default(path)?)
}

/// Client-supplied text made safe for one line of human output: control characters
/// (CR, LF, TAB, ESC, ...) are shown escaped, so they can neither break lines and columns nor
/// drive the terminal.
pub fn clean(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Whether an error is stdout's reader having gone away (`mailgate rejects --follow | head`).
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
}

/// `-` for an empty field, so columns stay countable.
pub fn or_dash(text: &str) -> String {
    if text.is_empty() { "-".to_string() } else { clean(text) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_keeps_one_line() {
        assert_eq!(clean("a\r\nb\tc\u{1b}[2J"), "a\\r\\nb\\tc\\u{1b}[2J");
        assert_eq!(clean("Grüße"), "Grüße");
        assert_eq!(or_dash(""), "-");
    }
}

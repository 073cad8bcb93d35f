//! Reply text: the reply of an incoming email without quoted text and signatures, as GitLab
//! computes it for replies by email (hosted mail services call it "stripped-text"). Every job
//! handed to a consumer carries it as `reply_text`, worked out then (spool/present.rs).
//!
//! - `extract.rs` picks the body text: the first text/plain part, else the first text/html part
//!   converted to text (`html.rs`), decoded from its charset with GitLab's fallbacks for
//!   mislabelled mail (`charset.rs`).
//! - `trim.rs` applies the rules of Discourse's `email_reply_trimmer` gem, which GitLab uses, to
//!   the lines classified by `classify.rs`: everything from the first delimiter that follows
//!   some text goes ("-- " signatures, Outlook's "____" rule); mobile signature lines go ("Sent
//!   from my iPhone" and its translations); an embedded-email marker ("On … wrote:" wrapped or
//!   not, in a dozen languages, "-----Original Message-----") that follows some text cuts the
//!   rest when no quote follows it, or a quote with fewer than seven lines of text after it; a
//!   message that starts with a marker and a quote and ends with text keeps that text; three or
//!   more Outlook header lines ("From: / Sent: / To: / Subject:") after some text cut the rest;
//!   trailing quotes go. Quotes with replies after them (inline replies) stay.
//!
//! Where the gem is unclear or too eager, this module chooses:
//! - A message with no text of its own keeps its quotes (the gem's intent: trailing quotes only
//!   go when there is some text; its newer "huge quote" rule would keep only the first quoted
//!   line, which is dropped here). When the rules leave nothing at all (the message is only a
//!   forward, a signature, a marker), the whole text is returned, trimmed, rather than "" as the
//!   gem does: a message that has text never gets an empty reply text; None is kept for messages
//!   without any text.
//! - A delimiter line before any text is a rule, not a cut (the gem cuts there, leaving nothing).
//!   A "____" rule followed by the reply's own text and, further down, a marker stays (the gem's
//!   newer behaviour); a lone "-" or "*" line is a bullet, not a delimiter.
//! - Dated markers ("On …", "Le …", "Am …", "… написал:") need a digit and a closing colon (or a
//!   `--` run), and "… via … wrote" / "<address> … wrote" markers a colon: the gem's forms match
//!   sentences such as "On the other hand, he said".
//! - "From my …" signatures must be short whole lines; no signature line is over 80 characters
//!   ("From my experience, …" is text).
//! - A lone header-like line ("To: everyone", "Subject: …") left after the rules is text; the gem
//!   drops every such line. Runs of two or more still go.
//! - Header lines count as one wrapped block when at most ten lines apart (the gem: any number).
//! - Not done from the gem's clean-up: rewriting other quote styles (`|`, "AB>", ">>>…<<<")
//!   into `>`; the gem's "elided" part (what was cut) is not kept.
//!
//! It never panics (a panic in the MIME or HTML libraries counts as no text), and its work is
//! bounded: 1 MiB of the chosen part is read, the HTML converter gets at most 64 KiB (from
//! `<body` on) and 2,000 tags, and at most 64 KiB of reply text are returned.

mod charset;
mod classify;
mod extract;
mod html;
mod trim;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod trim_tests;

/// At most this many bytes of reply text are returned (cut on a character boundary).
const MAX_REPLY_BYTES: usize = 64 * 1024;

/// The reply without quoted text and signatures, or None when the message has no text at all.
pub fn reply_text(raw: &[u8]) -> Option<String> {
    let body = std::panic::catch_unwind(|| extract::body_text(raw)).ok().flatten()?;
    let reply = std::panic::catch_unwind(|| trim::trim(&body)).ok()?;
    if reply.is_empty() {
        return None;
    }
    Some(truncate(reply, MAX_REPLY_BYTES))
}

/// `text` cut to at most `max` bytes, on a character boundary.
fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

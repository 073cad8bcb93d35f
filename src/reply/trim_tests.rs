//! Unit tests of the trimming rules (`trim.rs`, `classify.rs`) on plain text.

use super::classify::{self, Kind, classify};
use super::trim::trim;

const QUOTE: &str = "> Can you look at the pipeline?\n> It fails on main.\n>\n> Alice\n";

/// `reply`, a blank line, `marker` and [`QUOTE`].
fn with_marker(reply: &str, marker: &str) -> String {
    format!("{reply}\n\n{marker}\n{QUOTE}")
}

#[test]
fn patterns_compile() {
    classify::compile_all();
}

#[test]
fn blank_text_is_empty() {
    assert_eq!(trim(""), "");
    assert_eq!(trim(" \n\t\r\n \u{a0}\n"), "");
}

#[test]
fn text_without_quote_is_kept() {
    assert_eq!(trim("  Hello,\n\nthis is fine.\n\nBob\n\n"), "Hello,\n\nthis is fine.\n\nBob");
}

#[test]
fn crlf_becomes_lf() {
    assert_eq!(trim("Line one\r\nLine two\r\n\r\n> quote\r\n"), "Line one\nLine two");
}

#[test]
fn gmail_marker_and_quote() {
    let text = with_marker("Thanks, fixed in !42.", "On Mon, 1 Jan 2024 at 10:00, Alice <a@x.org> wrote:");
    assert_eq!(trim(&text), "Thanks, fixed in !42.");
}

#[test]
fn english_marker_variants() {
    for marker in [
        "On Jan 1, 2024, at 10:00, Alice Example <alice@example.com> wrote:",
        "On 1/1/2024 10:00 AM, Alice wrote:",
        "On Wed, 2015-12-02 at 13:58 +0000, Tom Newsom wrote:",
        "---- On Tue, 22 Dec 2015 14:17:36 +0530 Sam <sam@x.org> wrote ----",
        "At 6/16/2016 08:32 PM, you wrote:",
        "Alice <alice@example.com> wrote:",
        "alice via GitLab wrote:",
        "2015-10-18 0:17 GMT+03:00 Matt Palmer <matt@example.com>:",
        "-----Original Message-----",
        "----- Original Message -----",
        "---------- Forwarded message ---------",
        "Begin forwarded message:",
    ] {
        assert_eq!(trim(&with_marker("My reply.", marker)), "My reply.", "{marker}");
    }
}

#[test]
fn marker_wrapped_over_lines() {
    for marker in [
        "On Mon, 1 Jan 2024 at 10:00, Alice Example <\nalice@example.com> wrote:",
        "On Mon, 1 Jan 2024 at 10:00, Alice Example <alice@example.com>\nwrote:",
        "On Monday, January 1, 2024 10:00 AM,\nAlice Example\n<alice@example.com> wrote:",
        "Am 01.01.2024 um 10:00 schrieb Alice Example\n<alice@example.com>:",
        "Le lun. 1 janv. 2024 à 10:00, Alice Example <alice@example.com> a\nécrit :",
    ] {
        assert_eq!(trim(&with_marker("Wrapped.", marker)), "Wrapped.", "{marker}");
    }
}

#[test]
fn translated_markers() {
    for marker in [
        // French
        "Le lun. 1 janv. 2024 à 10:00, Alice <alice@example.com> a écrit :",
        "Le 1 janv. 2024 à 10:00, Alice <alice@example.com> a\u{a0}écrit\u{a0}:",
        // German
        "Am Mo., 1. Jan. 2024 um 10:00 Uhr schrieb Alice <alice@example.com>:",
        "Am 01.01.2024 um 10:00 schrieb Alice:",
        "Alice <alice@example.com> schrieb am Mo., 1. Jan. 2024, 10:00:",
        // Spanish
        "El lun, 1 ene 2024 a las 10:00, Alice (<alice@example.com>) escribió:",
        // Dutch
        "Op ma 1 jan. 2024 om 10:00 schreef Alice <alice@example.com>:",
        "Op 1 jan. 2024 om 10:00 heeft Alice <alice@example.com> het volgende geschreven:",
        // Italian
        "Il giorno lun 1 gen 2024 alle ore 10:00 Alice <alice@example.com> ha scritto:",
        // Portuguese
        "Em seg., 1 de jan. de 2024 às 10:00, Alice <alice@example.com> escreveu:",
        // Polish
        "W dniu 1.01.2024 o 10:00, Alice pisze:",
        "Dnia 1 sty 2024 o godz. 10:00 Alice <alice@example.com> napisał(a):",
        // Russian
        "пн, 1 янв. 2024 г. в 10:00, Alice <alice@example.com>:",
        "1 января 2024 г., в 10:00, Alice написал(а):",
        // Swedish, Danish, Norwegian
        "Den 1 jan. 2024 kl. 10:00 skrev Alice <alice@example.com>:",
        "man. 1. jan. 2024 kl. 10.00 skrev Alice <alice@example.com>:",
        // Japanese
        "2024年1月1日(月) 10:00 Alice <alice@example.com>:",
        "2024/01/01 10:00、山田太郎 のメッセージ:",
        // Chinese
        "在 2024年1月1日周一 10:00，Alice <alice@example.com> 写道：",
        "Alice <alice@example.com> 于2024年1月1日周一 10:00写道：",
        // Korean
        "2024년 1월 1일 (월) 오전 10:00, Alice <alice@example.com>님이 작성:",
    ] {
        assert_eq!(trim(&with_marker("Réponse.", marker)), "Réponse.", "{marker}");
    }
}

#[test]
fn marker_without_quote_cuts_the_rest() {
    let text = "Agreed.\n\nOn Mon, 1 Jan 2024 at 10:00, Alice <a@x.org> wrote:\nOld text that a client did not quote.\nMore old text.";
    assert_eq!(trim(text), "Agreed.");
}

#[test]
fn outlook_original_message_block() {
    let text = "Will do.\n\n-----Original Message-----\nFrom: Alice <a@x.org>\nSent: Monday, January 1, 2024 10:00 AM\nTo: Bob <b@x.org>\nSubject: Re: build\n\nPlease fix the build.\n";
    assert_eq!(trim(text), "Will do.");
}

#[test]
fn outlook_underscore_rule_and_headers() {
    let text = "Will do.\n\n________________________________\nFrom: Alice <a@x.org>\nSent: Monday, January 1, 2024 10:00\nTo: Bob\nSubject: Re: build\n\nPlease fix the build.\n\nOn Sun, 31 Dec 2023, Carol <c@x.org> wrote:\n> older\n";
    assert_eq!(trim(text), "Will do.");
}

#[test]
fn outlook_header_block_without_rule() {
    let text = "Will do.\n\nFrom: Alice <a@x.org>\nSent: Monday, January 1, 2024 10:00 AM\nTo: Bob <b@x.org>\nCc: Carol <c@x.org>,\n Dave <d@x.org>\nSubject: Re: build\n\nPlease fix the build.\n";
    assert_eq!(trim(text), "Will do.");
    let german = "Mache ich.\n\nVon: Alice <a@x.org>\nGesendet: Montag, 1. Januar 2024 10:00\nAn: Bob <b@x.org>\nBetreff: AW: Build\n\nBitte den Build reparieren.\n";
    assert_eq!(trim(german), "Mache ich.");
    let french = "D'accord.\n\nDe : Alice <a@x.org>\nEnvoyé : lundi 1 janvier 2024 10:00\nÀ : Bob <b@x.org>\nObjet : RE: build\n\nAncien texte.\n";
    assert_eq!(trim(french), "D'accord.");
}

#[test]
fn dash_dash_signature_goes() {
    assert_eq!(trim("Looks good.\n\n-- \nBob Builder\nACME Corp\n+1 555 0100\n"), "Looks good.");
    assert_eq!(trim("Looks good.\n--\nBob\n"), "Looks good.");
}

#[test]
fn mobile_signatures_go() {
    for signature in [
        "Sent from my iPhone",
        "Sent from my Samsung Galaxy smartphone.",
        "Sent from my BlackBerry 10 smartphone.",
        "Sent from my Windows Phone",
        "Sent from Yahoo Mail on Android",
        "Get Outlook for iOS",
        "Get Outlook for Android",
        "Envoyé de mon iPhone",
        "Envoyé depuis mon mobile",
        "Von meinem iPhone gesendet",
        "Enviado desde mi iPhone",
        "Enviado do meu iPhone",
        "Verstuurd vanaf mijn iPhone",
        "Inviato da iPhone",
        "Skickat från min iPhone",
        "Sendt fra min iPhone",
        "Wysłane z iPhone'a",
        "Отправлено с iPhone",
        "iPhoneから送信",
        "從我的 iPhone 傳送",
        "Sent from [Proton Mail](https://proton.me/mail/home) for iOS",
    ] {
        let text = format!("Ship it.\n\n{signature}\n\nOn Mon, 1 Jan 2024 at 10:00, Alice <a@x.org> wrote:\n{QUOTE}");
        assert_eq!(trim(&text), "Ship it.", "{signature}");
        assert_eq!(trim(&format!("Ship it.\n{signature}")), "Ship it.", "{signature}");
    }
}

#[test]
fn sentences_that_look_like_signatures_stay() {
    let text = "From my point of view, the change is fine and we should merge it before the release.\nThanks";
    assert_eq!(trim(text), text);
}

#[test]
fn inline_replies_are_kept() {
    let text = "> Can you look at the pipeline?\n\nYes, looking now.\n\n> It fails on main.\n\nFixed in !42.\n";
    assert_eq!(trim(text), text.trim());
}

#[test]
fn inline_replies_after_a_marker_are_kept() {
    let text = "On Mon, 1 Jan 2024 at 10:00, Alice <a@x.org> wrote:\n> Can you look?\n\nYes.\n\n> It fails.\n\nFixed.";
    assert_eq!(trim(text), "> Can you look?\n\nYes.\n\n> It fails.\n\nFixed.");
}

#[test]
fn reply_at_the_end_is_kept() {
    let text = "On Mon, 1 Jan 2024 at 10:00, Alice <a@x.org> wrote:\n> Can you look?\n> Thanks\n\nDone, see !42.\n";
    assert_eq!(trim(text), "Done, see !42.");
}

#[test]
fn quote_only_message_is_returned_whole() {
    let text = "> Can you look?\n> Thanks\n";
    assert_eq!(trim(text), "> Can you look?\n> Thanks");
    let marker_only = "On Mon, 1 Jan 2024 at 10:00, Alice <a@x.org> wrote:\n> Can you look?";
    assert_eq!(trim(marker_only), "> Can you look?");
    assert_eq!(trim("-- \nBob"), "-- \nBob");
}

#[test]
fn sentences_that_look_like_markers_stay() {
    let text = "On the other hand, he said:\nthe old API is fine.\n\nOn second thought I wrote it myself.\nBob";
    assert_eq!(trim(text), text);
}

#[test]
fn lone_header_like_lines_stay() {
    let text = "To: everyone on the team\nPlease review.\n\nSubject: the new pipeline is ready";
    assert_eq!(trim(text), text);
}

#[test]
fn lone_bullets_are_not_delimiters() {
    let text = "Here is my reply with a bullet list:\n\n-\nFirst item.\n*\nSecond item.\n\n--\nSignature line that should be trimmed.\n";
    assert_eq!(trim(text), "Here is my reply with a bullet list:\n\n-\nFirst item.\n*\nSecond item.");
}

#[test]
fn underscore_rule_inside_the_reply_stays() {
    let text = "Hello,\n\nFirst part.\n\n________________________________\n\nSecond part.\n\nBest regards,\nBob\n\nOn July 28, 2026, Alice wrote:\n> Previous message.\n";
    assert_eq!(
        trim(text),
        "Hello,\n\nFirst part.\n\n________________________________\n\nSecond part.\n\nBest regards,\nBob"
    );
}

#[test]
fn delimiter_before_any_text_is_a_rule() {
    assert_eq!(trim("=====\nRelease notes are ready.\n> old"), "=====\nRelease notes are ready.");
}

#[test]
fn pgp_armour_goes() {
    let text = "-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\nSigned reply.\n-----BEGIN PGP SIGNATURE-----\n\niQEzBAEBCAAdFiEE\n=abcd\n-----END PGP SIGNATURE-----\n";
    assert_eq!(trim(text), "Signed reply.");
}

#[test]
fn nested_quotes_and_quoted_markers_go() {
    let text = "Top reply.\n\nOn Tue, 2 Jan 2024, Bob <b@x.org> wrote:\n> Middle.\n>\n> On Mon, 1 Jan 2024, Alice <a@x.org> wrote:\n> > Bottom.\n";
    assert_eq!(trim(text), "Top reply.");
}

#[test]
fn line_classes() {
    assert_eq!(classify(""), Kind::Empty);
    assert_eq!(classify(" \u{a0}\t"), Kind::Empty);
    assert_eq!(classify("-----"), Kind::Delimiter);
    assert_eq!(classify("-- "), Kind::Delimiter);
    assert_eq!(classify("-"), Kind::Text);
    assert_eq!(classify("Sent from my iPhone"), Kind::Signature);
    assert_eq!(classify("> On Mon, 1 Jan 2024, Alice <a@x.org> wrote:"), Kind::Embedded);
    assert_eq!(classify("From: Alice <a@x.org>"), Kind::Header);
    assert_eq!(classify("> From: Alice <a@x.org>"), Kind::Quote);
    assert_eq!(classify("  > quoted"), Kind::Quote);
    assert_eq!(classify("On Monday we ship."), Kind::Text);
    let long = format!("On Mon, 1 Jan 2024, {} wrote:", "x".repeat(2000));
    assert_eq!(classify(&long), Kind::Text);
}

#[test]
fn huge_text_is_linear() {
    let line = "Some text, On Mon 2024 wrote > From: x\n";
    let text = line.repeat(1024 * 1024 / line.len());
    let start = std::time::Instant::now();
    let trimmed = trim(&text);
    assert!(!trimmed.is_empty());
    let newlines = "\n".repeat(1024 * 1024) + "x";
    assert_eq!(trim(&newlines), "x");
    let quotes = "> q\n".repeat(250_000) + "reply";
    assert_eq!(trim(&quotes), quotes);
    assert!(start.elapsed() < std::time::Duration::from_secs(20), "{:?}", start.elapsed());
}

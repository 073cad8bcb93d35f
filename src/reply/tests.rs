//! Unit tests of the reply text of whole messages: part choice, transfer encodings, charsets
//! and their fallbacks, HTML, limits and hostile input.

use std::time::{Duration, Instant};

use super::reply_text;

/// A single-part message with the given Content-Type and Content-Transfer-Encoding.
fn message(content_type: &str, encoding: &str, body: &[u8]) -> Vec<u8> {
    let mut raw = format!(
        "From: Bob <bob@example.com>\r\nTo: reply+abc@gitlab.example.com\r\nSubject: Re: build\r\n\
         Message-ID: <1@example.com>\r\nMIME-Version: 1.0\r\nContent-Type: {content_type}\r\n\
         Content-Transfer-Encoding: {encoding}\r\n\r\n"
    )
    .into_bytes();
    raw.extend_from_slice(body);
    raw
}

fn plain(body: &str) -> Vec<u8> {
    message("text/plain; charset=utf-8", "8bit", body.as_bytes())
}

const GMAIL_QUOTE: &str =
    "\r\n\r\nOn Mon, 1 Jan 2024 at 10:00, Alice <alice@example.com> wrote:\r\n> Please fix the build.\r\n";

#[test]
fn plain_reply_with_quote() {
    let raw = plain(&format!("Fixed in !42.\r\n\r\nThanks{GMAIL_QUOTE}"));
    assert_eq!(reply_text(&raw).as_deref(), Some("Fixed in !42.\n\nThanks"));
}

#[test]
fn multipart_alternative_prefers_plain() {
    let raw =
        b"From: bob@example.com\r\nMIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary=\"b1\"\r\n\r\n\
--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nPlain reply.\r\n\r\n> old\r\n\
--b1\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>HTML reply.</p>\r\n--b1--\r\n";
    assert_eq!(reply_text(raw).as_deref(), Some("Plain reply."));
}

#[test]
fn multipart_mixed_with_attachment() {
    let raw = b"From: bob@example.com\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"m\"\r\n\r\n\
--m\r\nContent-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n\
Voil=E0 le fichier.\r\n\r\n--m\r\nContent-Type: application/pdf; name=a.pdf\r\nContent-Disposition: attachment; filename=a.pdf\r\n\
Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n--m--\r\n";
    assert_eq!(reply_text(raw).as_deref(), Some("Voilà le fichier."));
}

#[test]
fn html_only_message() {
    let html = r#"<html><head><style>p { color: red; }</style></head><body><div dir="ltr">Thanks, <b>looks</b> good. See <a href="https://example.com/docs">the docs</a>.<br><br>Bob</div><br><div class="gmail_quote"><div dir="ltr" class="gmail_attr">On Mon, 1 Jan 2024 at 10:00, Alice &lt;<a href="mailto:alice@example.com">alice@example.com</a>&gt; wrote:<br></div><blockquote class="gmail_quote" style="margin:0px">Please <i>fix</i> the build.<br>Alice<blockquote>older</blockquote></blockquote></div></body></html>"#;
    let raw = message("text/html; charset=utf-8", "7bit", html.as_bytes());
    assert_eq!(
        reply_text(&raw).as_deref(),
        Some("Thanks, looks good. See [the docs](https://example.com/docs).\n\nBob")
    );
}

#[test]
fn html_blockquote_without_marker_goes() {
    let html = "<p>Yes, merged.</p><blockquote type=\"cite\"><p>Can you merge it?</p></blockquote>";
    let raw = message("text/html; charset=utf-8", "7bit", html.as_bytes());
    assert_eq!(reply_text(&raw).as_deref(), Some("Yes, merged."));
}

#[test]
fn html_outlook_reply() {
    let html = "<html><body><div class=WordSection1><p class=MsoNormal>Will do.<o:p></o:p></p><p class=MsoNormal><o:p>&nbsp;</o:p></p>\
<div style='border:none;border-top:solid #E1E1E1 1.0pt'><p class=MsoNormal><b>From:</b> Alice &lt;alice@example.com&gt; <br><b>Sent:</b> Monday, January 1, 2024 10:00 AM<br>\
<b>To:</b> Bob &lt;bob@example.com&gt;<br><b>Subject:</b> Re: build<o:p></o:p></p></div><p class=MsoNormal>Please fix the build.<o:p></o:p></p></div></body></html>";
    let raw = message("text/html; charset=\"us-ascii\"", "quoted-printable", html.replace('=', "=3D").as_bytes());
    assert_eq!(reply_text(&raw).as_deref(), Some("Will do."));
}

#[test]
fn quoted_printable_body() {
    let body = b"Caf=C3=A9 au lait, s'il vous pla=C3=AEt. This line is soft=\r\n broken.\r\n\r\n> old=20\r\n";
    let raw = message("text/plain; charset=UTF-8", "quoted-printable", body);
    assert_eq!(reply_text(&raw).as_deref(), Some("Café au lait, s'il vous plaît. This line is soft broken."));
}

#[test]
fn base64_body() {
    // "Grüße aus Köln.\n\n> old\n" in UTF-8
    let raw = message("text/plain; charset=utf-8", "base64", b"R3LDvMOfZSBhdXMgS8O2bG4uCgo+IG9sZAo=\r\n");
    assert_eq!(reply_text(&raw).as_deref(), Some("Grüße aus Köln."));
}

/// "こんにちは、世界。返信です。" in ISO-2022-JP, Shift_JIS, EUC-JP and UTF-8.
const JA: &str = "こんにちは、世界。返信です。";
const JA_ISO_2022_JP: &[u8] = b"\x1b$B$3$s$K$A$O!\"@$3&!#JV?.$G$9!#\x1b(B";
const JA_SHIFT_JIS: &[u8] =
    b"\x82\xb1\x82\xf1\x82\xc9\x82\xbf\x82\xcd\x81A\x90\xa2\x8aE\x81B\x95\xd4\x90M\x82\xc5\x82\xb7\x81B";
const JA_EUC_JP: &[u8] =
    b"\xa4\xb3\xa4\xf3\xa4\xcb\xa4\xc1\xa4\xcf\xa1\xa2\xc0\xa4\xb3\xa6\xa1\xa3\xca\xd6\xbf\xae\xa4\xc7\xa4\xb9\xa1\xa3";

fn japanese(body: &[u8], encoding: &str) -> Vec<u8> {
    // "2024年1月1日(月) 10:00 山田太郎 <taro@example.jp>:" in ISO-2022-JP, then a quote
    let mut text = body.to_vec();
    text.extend_from_slice(b"\r\n\r\n2024\x1b$BG/\x1b(B1\x1b$B7n\x1b(B1\x1b$BF|\x1b(B(\x1b$B7n\x1b(B) 10:00 \x1b$B;3EDB@O:\x1b(B <taro@example.jp>:\r\n> old\r\n");
    message("text/plain; charset=ISO-2022-JP", encoding, &text)
}

#[test]
fn iso_2022_jp_body() {
    assert_eq!(reply_text(&japanese(JA_ISO_2022_JP, "7bit")).as_deref(), Some(JA));
}

#[test]
fn iso_2022_jp_label_on_other_japanese_bodies() {
    for (name, body) in [("Shift_JIS", JA_SHIFT_JIS), ("EUC-JP", JA_EUC_JP), ("UTF-8", JA.as_bytes())] {
        let raw = message("text/plain; charset=iso-2022-jp", "8bit", &[body, b"\r\n\r\n> old\r\n"].concat());
        assert_eq!(reply_text(&raw).as_deref(), Some(JA), "{name}");
    }
}

#[test]
fn gb2312_label_on_gbk_body() {
    // "朱镕基和王喆说你好": 镕 and 喆 are GBK, not GB2312
    let body = b"\xd6\xec\xe9F\xbb\xf9\xba\xcd\xcd\xf5\x86\xb4\xcb\xb5\xc4\xe3\xba\xc3";
    // "在 2024年1月1日，王喆 <wang@example.cn> 写道：" in GB18030
    let marker =
        b"\xd4\xda 2024\xc4\xea1\xd4\xc21\xc8\xd5\xa3\xac\xcd\xf5\x86\xb4 <wang@example.cn> \xd0\xb4\xb5\xc0\xa3\xba";
    let text = [&body[..], b"\r\n\r\n", marker, b"\r\n> old\r\n"].concat();
    for label in ["gb2312", "GB2312", "\"gb2312\"", "gbk", "gb18030"] {
        let raw = message(&format!("text/plain; charset={label}"), "8bit", &text);
        assert_eq!(reply_text(&raw).as_deref(), Some("朱镕基和王喆说你好"), "{label}");
    }
}

#[test]
fn latin1_body_without_charset() {
    let body = b"Gr\xfc\xdfe aus K\xf6ln, \xe0 bient\xf4t.\r\n";
    for content_type in ["text/plain", "text/plain; charset=us-ascii", "text/plain; charset=utf-8"] {
        let raw = message(content_type, "8bit", body);
        assert_eq!(reply_text(&raw).as_deref(), Some("Grüße aus Köln, à bientôt."), "{content_type}");
    }
    let no_mime = b"From: bob@example.com\r\nSubject: hi\r\n\r\nCaf\xe9\r\n";
    assert_eq!(reply_text(no_mime).as_deref(), Some("Café"));
}

#[test]
fn damaged_utf8_stays_utf8() {
    let raw = message("text/plain; charset=utf-8", "8bit", b"Gr\xc3\xbc\xc3\x9fe, caf\xc3\xa9 \xff ok");
    assert_eq!(reply_text(&raw).as_deref(), Some("Grüße, café \u{FFFD} ok"));
}

#[test]
fn other_declared_charsets() {
    let raw = message("text/plain; charset=windows-1251", "8bit", b"\xcf\xf0\xe8\xe2\xe5\xf2");
    assert_eq!(reply_text(&raw).as_deref(), Some("Привет"));
    let raw = message("text/plain; charset=x-unknown-charset", "8bit", "héllo".as_bytes());
    assert_eq!(reply_text(&raw).as_deref(), Some("héllo"));
}

#[test]
fn no_text_part_is_none() {
    let image = message("image/png", "base64", b"iVBORw0KGgo=\r\n");
    assert_eq!(reply_text(&image), None);
    let attachment_only = b"From: bob@example.com\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"m\"\r\n\r\n\
--m\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n\
--m\r\nContent-Type: text/plain\r\nContent-Disposition: attachment; filename=notes.txt\r\n\r\nnot the body\r\n--m--\r\n";
    assert_eq!(reply_text(attachment_only), None);
}

#[test]
fn empty_body_is_none() {
    assert_eq!(reply_text(&plain("")), None);
    assert_eq!(reply_text(&plain(" \r\n\r\n\t\r\n")), None);
    assert_eq!(reply_text(b"Subject: nothing\r\n\r\n"), None);
    assert_eq!(reply_text(b""), None);
    assert_eq!(reply_text(&message("text/html", "7bit", b"<html><body><p> </p></body></html>")), None);
}

#[test]
fn garbage_never_panics() {
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for round in 0..300 {
        let len = (next() % 4096) as usize;
        let mut raw: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if round % 3 == 0 {
            // structure around the noise, so that the parsers get past the headers
            let head = b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\nContent-Type: text/html; charset=iso-2022-jp\r\nContent-Transfer-Encoding: base64\r\n\r\n";
            raw.splice(0..0, head.iter().copied());
        }
        let _ = reply_text(&raw);
    }
    for raw in [
        &b"Content-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n====!!!!"[..],
        b"Content-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n=\r\n=Z=",
        b"Content-Type: multipart/alternative; boundary=\r\n\r\n--\r\n--\r\n",
        b"Content-Type: multipart/mixed; boundary=a\r\n\r\n--a\r\nContent-Type: message/rfc822\r\n\r\n--a\r\n",
        b"Content-Type: text/html; charset=\r\n\r\n<<<<>>>><!--<a href=\"",
        b"\x00\x00\x00\r\n\r\n\xff\xfe",
    ] {
        let _ = reply_text(raw);
    }
}

#[test]
fn huge_body_is_capped_and_fast() {
    let line = "Ceci est une très longue réponse, ligne après ligne.\r\n";
    let body = line.repeat(5 * 1024 * 1024 / line.len() + 1);
    let start = Instant::now();
    let reply = reply_text(&plain(&body)).unwrap_or_default();
    assert!(start.elapsed() < Duration::from_secs(30), "{:?}", start.elapsed());
    assert!(reply.len() <= 64 * 1024 && reply.len() > 60 * 1024, "{}", reply.len());
    assert!(reply.starts_with("Ceci est une très longue réponse"));
}

#[test]
fn reply_is_cut_on_a_char_boundary() {
    let body = "é".repeat(40_000) + "x";
    let reply = reply_text(&plain(&body)).unwrap_or_default();
    assert_eq!(reply.len(), 64 * 1024);
    assert!(reply.chars().all(|c| c == 'é'));
}

#[test]
fn hostile_html_is_bounded() {
    let start = Instant::now();
    for html in [
        format!("<p>Deep reply.</p>{}x", "<div>".repeat(200_000)),
        format!("<p>Wide reply.</p><div {}>x</div>", (0..100_000).map(|i| format!(" a{i}")).collect::<String>()),
        format!("<p>Formatted reply.</p>{}x", "<b><i><u><a href=x>".repeat(50_000)),
    ] {
        let raw = message("text/html; charset=utf-8", "8bit", html.as_bytes());
        let reply = reply_text(&raw).unwrap_or_default();
        assert!(
            reply.starts_with("Deep reply.") || reply.starts_with("Wide") || reply.starts_with("Formatted"),
            "{reply}"
        );
    }
    assert!(start.elapsed() < Duration::from_secs(60), "{:?}", start.elapsed());
}

#[test]
fn html_after_a_large_head() {
    let style = "p.MsoNormal { margin: 0cm; font-size: 11.0pt; font-family: \"Calibri\", sans-serif; }\n".repeat(2000);
    let html = format!(
        "<html><head><style>{style}</style></head><body lang=EN-US><p>Approved.</p><table><tr><td>Bob</td></tr></table></body></html>"
    );
    let raw = message("text/html; charset=utf-8", "8bit", html.as_bytes());
    assert_eq!(reply_text(&raw).as_deref(), Some("Approved.\n\nBob"));
}

#[test]
fn forwarded_message_attachment_is_not_the_body() {
    let raw = b"From: bob@example.com\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"m\"\r\n\r\n\
--m\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nSee the attached mail.\r\n\
--m\r\nContent-Type: message/rfc822\r\n\r\nFrom: alice@example.com\r\nSubject: old\r\n\r\nOld body.\r\n--m--\r\n";
    assert_eq!(reply_text(raw).as_deref(), Some("See the attached mail."));
}

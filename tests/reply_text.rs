//! `reply_text` end to end: replies sent over SMTP to a real `mailgate serve` carry the reply
//! without its quote and signature in the stored job, whatever part and charset it came in.
//! (The trimming rules themselves are unit-tested in src/reply/.)

mod common;

use common::*;

/// Headers of a reply to `KEY`'s thread, then `rest` (MIME headers, a blank line, the body).
fn reply(message_id: &str, rest: &[u8]) -> Vec<u8> {
    let mut raw = format!(
        "From: Bob <bob@example.com>\r\nTo: incoming+{KEY}@localhost\r\nSubject: Re: build\r\n\
         Message-ID: <{message_id}>\r\nMIME-Version: 1.0\r\n"
    )
    .into_bytes();
    raw.extend_from_slice(rest);
    raw
}

#[test]
fn replies_in_plain_html_and_mislabelled_charsets_are_trimmed_in_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let ports = Ports::new();
    let config = write_config(dir.path(), &ports, "", "");
    let _server = Server::start(&config, ports.smtp, ports.http);

    // "朱镕基和王喆说你好" in GBK (镕 and 喆 are not in GB2312, the label senders use)
    let gbk = b"\xd6\xec\xe9F\xbb\xf9\xba\xcd\xcd\xf5\x86\xb4\xcb\xb5\xc4\xe3\xba\xc3";
    let messages: Vec<(&str, Vec<u8>, Option<&str>)> = vec![
        (
            "plain@example.com",
            reply(
                "plain@example.com",
                b"Content-Type: text/plain; charset=utf-8\r\n\r\nFixed in !42.\r\n\r\nThanks\r\n\r\n\
                  On Mon, 1 Jan 2024 at 10:00, Alice <alice@example.com> wrote:\r\n> Please fix the build.\r\n> \r\n",
            ),
            Some("Fixed in !42.\n\nThanks"),
        ),
        (
            "signature@example.com",
            reply(
                "signature@example.com",
                b"Content-Type: text/plain; charset=utf-8\r\n\r\nLooks good to me.\r\n\r\nSent from my iPhone\r\n\r\n\
                  > Can you review?\r\n",
            ),
            Some("Looks good to me."),
        ),
        (
            "html@example.com",
            reply(
                "html@example.com",
                b"Content-Type: text/html; charset=iso-8859-1\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n\
                  <p>Merci, c'est r=E9par=E9.</p><blockquote type=3D\"cite\"><p>Le build est cass=E9.</p></blockquote>\r\n",
            ),
            Some("Merci, c'est réparé."),
        ),
        (
            "gbk@example.com",
            reply(
                "gbk@example.com",
                &[
                    &b"Content-Type: multipart/alternative; boundary=\"b\"\r\n\r\n--b\r\n\
                       Content-Type: text/plain; charset=gb2312\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"[..],
                    gbk,
                    b"\r\n\r\n> old\r\n--b\r\nContent-Type: text/html; charset=utf-8\r\n\r\n<p>html</p>\r\n--b--\r\n",
                ]
                .concat(),
            ),
            Some("朱镕基和王喆说你好"),
        ),
        (
            "image@example.com",
            reply(
                "image@example.com",
                b"Content-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n\r\niVBORw0KGgo=\r\n",
            ),
            None,
        ),
    ];

    let mut c = Client::connect(ports.smtp);
    assert!(c.cmd("EHLO client.example.org").contains("250 "));
    let rcpt = format!("incoming+{KEY}@localhost");
    for (id, raw, _) in &messages {
        assert!(c.cmd("MAIL FROM:<bob@example.com> BODY=8BITMIME").starts_with("250"), "{id}");
        assert!(c.cmd(&format!("RCPT TO:<{rcpt}>")).starts_with("250"), "{id}");
        assert!(c.cmd("DATA").starts_with("354"), "{id}");
        c.send_raw(raw);
        c.send_raw(b".\r\n");
        let r = c.reply();
        assert!(r.starts_with("250 "), "{id}: {r}");
    }
    assert!(c.cmd("QUIT").starts_with("221"));

    let o = cli(&config, &["queue", "list", "--json"]);
    assert!(o.status.success(), "queue list: {}", String::from_utf8_lossy(&o.stderr));
    let jobs = json_values(&stdout(&o));
    assert_eq!(jobs.len(), messages.len());
    for (id, _, want) in &messages {
        let job = jobs.iter().find(|j| j["message"]["message_id"] == *id).unwrap_or_else(|| panic!("no job for {id}"));
        let got = &job["reply_text"];
        match want {
            Some(text) => assert_eq!(got, text, "{id}"),
            None => assert!(got.is_null(), "{id}: no text part gives null, got {got}"),
        }
    }
}

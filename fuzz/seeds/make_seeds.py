#!/usr/bin/env python3
"""Writes the hand-made seed inputs of every fuzz target into fuzz/corpus/<target>/seed-*.

Run from anywhere: python3 fuzz/seeds/make_seeds.py. The input formats are documented on each
harness function in fuzz/src/lib.rs (the first bytes pick flags and a seed).
"""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "0123456789abcdef0123456789abcdef"
RCPT = f"incoming+{KEY}@localhost"


def write(target, name, data):
    d = os.path.join(ROOT, "corpus", target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


def message(subject, extra=""):
    return (f"From: a@example.org\r\nTo: {RCPT}\r\nMessage-ID: <{subject}@example.org>\r\n"
            f"Subject: {subject}\r\n{extra}\r\nHello\r\n.\r\n")


# session: [listener flags, tls flags, seed] + client bytes
LMTP, AFTERQ, TRUSTED, VERIFY, SPF, REJECT, UNIX, SMALL = (1 << i for i in range(8))
txn = f"MAIL FROM:<a@example.org>\r\nRCPT TO:<{RCPT}>\r\nDATA\r\n"
sessions = {
    "simple": (0, 0, "EHLO client.example.org\r\n" + txn + message("hi") + "QUIT\r\n"),
    "helo": (0, 0, "HELO c\r\n" + txn + message("h") + "RSET\r\nNOOP\r\nVRFY x\r\nHELP\r\nQUIT\r\n"),
    "lmtp": (LMTP | AFTERQ | TRUSTED, 0,
             "LHLO relay\r\nXFORWARD NAME=mail.example.org ADDR=203.0.113.5 HELO=mail.example.org\r\n"
             "XFORWARD IDENT=ABC123 PROTO=ESMTP SOURCE=REMOTE PORT=25\r\n"
             f"MAIL FROM:<a@example.org>\r\nRCPT TO:<{RCPT}>\r\nRCPT TO:<incoming+nokey@localhost>\r\n"
             "RCPT TO:<incoming@localhost>\r\nDATA\r\n" + message("two") + "QUIT\r\n"),
    "verify": (VERIFY | SPF, 0, "EHLO mail.example.org\r\n" + txn + message("v", "DKIM-Signature: v=1; d=example.org; s=s; a=rsa-sha256; b=x\r\n")),
    "verify-unix": (VERIFY | SPF | UNIX, 0, "EHLO x\r\nMAIL FROM:<>\r\nRCPT TO:<bot@localhost>\r\nDATA\r\n"
                    + message("bounce", f"References: <reply-{KEY}@localhost>\r\n")),
    "reject-policy": (REJECT, 0, "EHLO x\r\nMAIL FROM:<>\r\n" + txn + "Auto-Submitted: auto-replied\r\n" + message("ooo")),
    "limits": (SMALL, 0, "EHLO x\r\nMAIL FROM:<a@example.org> SIZE=20000\r\nMAIL FROM:<a@example.org> SIZE=100 BODY=8BITMIME\r\n"
               + f"RCPT TO:<{RCPT}>\r\n" * 5 + "DATA\r\nSubject: big\r\n\r\n" + ("x" * 999 + "\r\n") * 3 + ".\r\n"
               + "NOOP " + "a" * 600 + "\r\nFOO\r\nBAR\r\n"),
    "errors": (0, 0, "FOO\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\nDATA\r\nEHLO\r\nEHLO x\nMAIL FROM:<<>>\r\n"
               "RCPT TO:<@@>\r\nMAIL FROM:<a@b> NOTIFY=X\r\nLHLO x\r\nBDAT 10 LAST\r\nAUTH PLAIN\r\nXFORWARD ADDR=1.2.3.4\r\nQUIT\r\n"),
    "dotstuff": (0, 0, "EHLO x\r\n" + txn + ".\r\n" + txn + "..leading dot\r\n.\r\n" + txn + "Subject: s\r\n\r\n..\r\n.x\r\n.\r\n"),
    "multi-rcpt": (0, 0, "EHLO x\r\nMAIL FROM:<a@example.org>\r\n"
                   f"RCPT TO:<{RCPT}>\r\nRCPT TO:<contact-gitlab-org-gitlab-key@desk.localhost>\r\n"
                   "RCPT TO:<any+hello@any.localhost>\r\nRCPT TO:<contact@desk.localhost>\r\nRCPT TO:<nobody@elsewhere>\r\nDATA\r\n"
                   + message("m", "Cc: incoming+gitlab-org-gitlab-20-glimt-abc-issue@localhost\r\n")),
    "starttls": (0, 1, "EHLO x\r\nSTARTTLS\r\nMAIL FROM:<evil@x>\r\nRCPT TO:<" + RCPT + ">\r\nEHLO x\r\n" + txn + message("tls")),
    "starttls-required": (0, 3, "EHLO x\r\nMAIL FROM:<a@b>\r\nSTARTTLS\r\nEHLO x\r\nSTARTTLS\r\n" + txn + message("t2")),
    "implicit-tls": (0, 4, "EHLO x\r\nSTARTTLS\r\n" + txn + message("t3")),
}
for fake in ["\n.\n", "\n.\r\n", "\r.\r", "\r\n.\n", "\r.\r\n", "\r\r\n"]:
    name = "smuggle-" + fake.replace("\r", "CR").replace("\n", "LF").replace(".", "DOT")
    sessions[name] = (0, 0, "EHLO x\r\n" + txn + "Subject: x\r\n\r\nbody" + fake
                      + "MAIL FROM:<admin@victim.example>\r\n" + f"RCPT TO:<{RCPT}>\r\nDATA\r\nsmuggled\r\n.\r\nNOOP\r\n")
sessions["smuggle-header-lf"] = (0, 0, "EHLO x\r\n" + txn + "Subject: a\nX-Evil: b\r\n\r\nbody\r\n.\r\nQUIT\r\n")
sessions["smuggle-lmtp"] = (LMTP | AFTERQ | TRUSTED, 0, "LHLO x\r\n" + txn + "body\n.\nRSET\r\n.\r\n")
sessions["forged-ar"] = (VERIFY, 0, "EHLO x\r\n" + txn + message("ar", "Authentication-Results: mx.test; dkim=pass\r\n"
                                                              "Authentication-Results: other.example; spf=pass\r\n"))
for i, (name, (flags, tls, text)) in enumerate(sorted(sessions.items())):
    write("session", name, bytes([flags, tls, i * 37 % 256]) + text.encode())

# address: [routes flag] + template \n address \n reply_host \n second template
addresses = {
    "plus": (0, "incoming+%{key}@incoming.example.com", f"incoming+{KEY}@incoming.example.com"),
    "angle": (0, "incoming+%{key}@Incoming.Example.COM", f" <incoming+{KEY}@INCOMING.example.com> "),
    "greedy": (0, "incoming+%{key}@h", "incoming+a+b@h"),
    "suffix": (0, "in-%{key}-mail@host", "in-abc-mail@host"),
    "key-only": (1, "%{key}@host", "anything@host"),
    "dedicated": (0, "gitlab-incoming@host.example", "gitlab-incoming@Host.Example"),
    "service-desk": (0, "contact-%{key}@desk.example", "contact-gitlab-org-gitlab-20-issue-@desk.example"),
    "new-issue": (0, "incoming+%{key}@h", "incoming+gitlab-org-gitlab-20-glimt-abc-issue@h"),
    "note": (0, "incoming+%{key}@h", "incoming+gitlab-org-gitlab-20-glimt-abc-issue-34@h"),
    "mr": (0, "incoming+%{key}@h", "incoming+gitlab-org-gitlab-20-glimt-abc-merge-request@h"),
    "unsub": (0, "incoming+%{key}@h", f"incoming+{KEY}-unsubscribe@h"),
    "partitioned": (0, "incoming+%{key}@h", "incoming+abcd-0123456789abcdefghijklmno-ns1@h"),
    "legacy": (0, "incoming+%{key}@h", "incoming+gitlab-org/gitlab+merge-request+tok@h"),
    "reference": (0, "incoming+%{key}@in.example\n", f"<reply-{KEY}@gitlab.example>\ngitlab.example"),
    "bad-templates": (0, "a+%{key}+%{key}@host", "a+x+y@host"),
    "two": (0, "incoming+%{key}@h.example", "incoming@h.example\n\nincoming-%{key}@h.example"),
    "crlf": (0, "incoming+%{key}@host.example", "incoming+a\r\nb@host.example"),
    "unicode": (1, "ünïcode+%{key}@hôst.example", "ünïcode+ключ@HÔST.example"),
}
for name, (flags, template, addr) in addresses.items():
    write("address", name, bytes([flags]) + f"{template}\n{addr}".encode())

# headers: [flags: 1 null sender, 2 after-queue, 4 reject policy, 8 queue id] + raw message
hdrs = {
    "to": f"To: {RCPT}\r\nSubject: s\r\n\r\nbody\r\n",
    "references": f"To: incoming@localhost\r\nReferences: <a@b> <reply-{KEY}@localhost>,<c@d>\r\n\r\nx\r\n",
    "references-any": f"References: <reply-{KEY}@gitlab.localhost>\r\n\r\nx\r\n",
    "delivered-to": f"Delivered-To: {RCPT}\r\nX-Delivered-To: incoming+x@localhost\r\nEnvelope-To: {RCPT}\r\n\r\n",
    "received": f"Received: from a by b with ESMTP id 1 for <incoming+gitlab-org/gitlab=x@localhost>; Tue, 4 Mar 2025 10:00:00 +0000\r\n"
                f"Received: from c by d for <{RCPT}>;\r\n Tue, 4 Mar 2025 10:00:00 +0000\r\n\r\nx\r\n",
    "received-bomb": "Received: " + "for <<" * 2500 + "\r\n\r\n",
    "cc": f"To: someone@example.org\r\nX-Original-To: nobody@x\r\nX-Forwarded-To: y@z\r\nCc: Bob <bob@x>, {RCPT}\r\n\r\n",
    "service-desk": "To: contact-gitlab-org-gitlab-key@desk.localhost\r\n\r\n",
    "auto": "From: a@b\r\nAuto-Submitted: auto-replied\r\nX-Autoreply: yes\r\nTo: incoming+x@localhost\r\n\r\n",
    "forged-ar": "Authentication-Results: mx.test; dkim=pass\r\nAuthentication-Results: MX.TEST;\r\n\tspf=pass\r\n"
                 "Authentication-Results: other; dmarc=pass\r\nTo: x@y\r\n\r\nAuthentication-Results: mx.test\r\n",
    "encoded": "From: =?utf-8?q?h=C3=A9?= <a@b>\r\nSubject: =?iso-8859-1?B?aOk=?=\r\nTo: \"Name, with comma\" <"
               + RCPT + ">\r\nMessage-ID: <m1@b>\r\n\r\n",
    "folded-lf": f"To:\n {RCPT}\nSubject: lf only\n\nbody\n",
    "groups": f"To: group: a@b, {RCPT};, undisclosed-recipients:;\r\n\r\n",
}
with open(os.path.join(os.path.dirname(ROOT), "tests", "fixtures", "dkimpy", "signed.eml"), "rb") as f:
    signed = f.read()
for i, (name, text) in enumerate(hdrs.items()):
    write("headers", name, bytes([i % 16]) + text.encode())
write("headers", "signed-eml", b"\x00" + signed)

# reply: [wrapper] + body (0 = the body is the whole message)
quote = "> Can you look at the pipeline?\n> It fails on main.\n>\n> Alice\n"
replies = {
    "gmail": (1, "Thanks, fixed in !42.\n\nOn Mon, 1 Jan 2024 at 10:00, Alice <a@x.org> wrote:\n" + quote),
    "signature": (1, "Looks good.\n\n-- \nBob\nSent from my iPhone\n"),
    "outlook": (1, "Reply here.\n\n________________________________\nFrom: Alice\nSent: Monday\nTo: Bob\nSubject: x\n\n" + quote),
    "original": (1, "ok\n-----Original Message-----\nFrom: a\n" + quote),
    "inline": (1, quote + "my answer\n" + quote + "second answer\n"),
    "qp": (2, "Caf=C3=A9 au lait, s'il vous pla=C3=AEt. soft=\r\n broken.\r\n\r\n> old=20\r\n"),
    "base64": (3, "Grüße aus Köln.\n\n> old\n"),
    "html": (4, "<html><body><p>Thanks!</p><div class=gmail_quote>On Mon wrote:<blockquote>old</blockquote></div></body></html>"),
    "multipart-html": (5, "<p>Hi <b>there</b></p><br>Le lun. 1 janv. 2024 à 10:00, Alice a écrit :<br><blockquote>q</blockquote>"),
    "multipart-plain": (6, "Hallo=\r\n Welt\r\n\r\nAm 01.01.2024 um 10:00 schrieb Alice:\r\n> q\r\n"),
    "latin1": (7, "Caf\xe9 cr\xe8me\n\n> q\n"),
    "russian": (1, "Спасибо\n\n1 января 2024 г., в 10:00, Alice написал:\n> q\n"),
    "empty": (1, ""),
}
for name, (w, body) in replies.items():
    data = body.encode("latin-1") if w == 7 else body.encode()
    write("reply", name, bytes([w]) + data)
with open(os.path.join(os.path.dirname(ROOT), "tests", "fixtures", "dkimpy", "message.eml"), "rb") as f:
    write("reply", "fixture-eml", b"\x00" + f.read())
write("reply", "mime-nested", b"\x00" + (
    b"From: a@b\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"m\"\r\n\r\n--m\r\n"
    b"Content-Type: multipart/alternative; boundary=\"a\"\r\n\r\n--a\r\nContent-Type: text/plain; charset=windows-1252\r\n\r\n"
    b"Merci \x93beaucoup\x94\r\n--a\r\nContent-Type: text/html\r\n\r\n<p>x</p>\r\n--a--\r\n--m\r\nContent-Type: message/rfc822\r\n\r\n"
    b"Subject: inner\r\n\r\ninner body\r\n--m--\r\n"))

# policy: [seed] + what Postfix sends
def req(**kw):
    base = {"request": "smtpd_access_policy", "protocol_state": "RCPT", "protocol_name": "ESMTP",
            "helo_name": "mail.example.org", "queue_id": "", "sender": "a@example.org",
            "recipient": RCPT, "recipient_count": "0", "client_address": "192.0.2.9",
            "client_name": "mail.example.org", "reverse_client_name": "mail.example.org", "instance": "123.456.7",
            "sasl_method": "", "size": "0", "etrn_domain": "", "encryption_protocol": "TLSv1.3",
            "encryption_cipher": "TLS_AES_256_GCM_SHA384", "stress": "", "server_address": "10.0.0.1", "server_port": "25"}
    base.update(kw)
    return "".join(f"{k}={v}\n" for k, v in base.items()) + "\n"

policies = {
    "accept": req(),
    "unknown-key": req(recipient="incoming+nokey@localhost"),
    "unknown-address": req(recipient="someone@localhost"),
    "subdomain": req(recipient="x@sub.localhost."),
    "other-domain": req(recipient="user@other.example.net"),
    "null-sender": req(sender=""),
    "mail-stage": req(protocol_state="MAIL"),
    "ipv6": req(client_address="2001:db8::1", recipient="contact-gitlab-org-gitlab-20-issue-@desk.localhost"),
    "persistent": req() + req(recipient="bot@localhost") + req(recipient="any+k@ANY.localhost"),
    "crlf": req().replace("\n", "\r\n"),
    "malformed": "request=smtpd_access_policy\nnot an attribute\n\n",
    "long-line": "recipient=" + "x" * 5000 + "\n\n",
    "empty-values": "request=\nrecipient=\n=\n\n\n",
}
for i, (name, text) in enumerate(policies.items()):
    write("policy", name, bytes([i * 11 % 256]) + text.encode())

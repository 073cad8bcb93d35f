//! Sender authentication inside the session, without I/O in the core: the session asks for a
//! check with [`Event::Verify`], the driver runs it (DNS through `crate::auth`) and hands the
//! result back. SPF runs after MAIL FROM (its 250 waits for it) and is applied per recipient at
//! RCPT; DKIM, DMARC and ARC run at the end of DATA, before anything is stored.

use std::net::{IpAddr, Ipv4Addr};

use super::outcome::StoreRequest;
use super::session::{Event, Session, State};
use crate::auth::{MessageCheck, SpfCheck};
use crate::gate::verdict::Reply;

/// A check the driver must run.
#[derive(Debug)]
pub enum Verify {
    /// SPF for the transaction's sender (or HELO when the sender is null).
    Spf { ip: IpAddr, helo: String, mail_from: String },
    /// DKIM, ARC and DMARC for the received message; give `raw` back with the result.
    Message { raw: Vec<u8>, ip: IpAddr, helo: String, mail_from: String, spf: Box<SpfCheck> },
}

impl Session {
    /// The original client's IP for SPF: XFORWARD's from a trusted peer, else the socket's.
    /// None when it is unknown (a unix-socket peer without XFORWARD, XFORWARD without ADDR).
    pub(super) fn check_ip(&self) -> Option<IpAddr> {
        self.client_ip().parse().ok()
    }

    /// After MAIL FROM was accepted: ask for SPF, or answer 250 at once when checks are off.
    /// Without a client IP SPF cannot be evaluated: it is recorded as not checked, and the
    /// message checks still run at the end of DATA (DMARC then rests on DKIM alone, so a
    /// spoof of a p=reject domain is still refused: the checks fail closed, not open).
    pub(super) fn after_mail(&mut self, mail_from: String, out: &mut Vec<u8>) {
        if !self.cfg.verify {
            Reply::new(250, "2.1.0", "Ok").write_to(out);
            return;
        }
        let helo = self.check_helo();
        match self.check_ip() {
            Some(ip) if self.cfg.verify_spf => {
                self.state = State::WaitVerify;
                self.pending_event = Some(Event::Verify(Verify::Spf { ip, helo, mail_from }));
                return;
            }
            ip => {
                let ip = ip.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
                if let Some(txn) = &mut self.txn {
                    txn.spf = Some(Box::new(SpfCheck::not_checked(ip, &helo, &mail_from)));
                }
            }
        }
        Reply::new(250, "2.1.0", "Ok").write_to(out);
    }

    fn check_helo(&self) -> String {
        self.client_helo()
    }

    /// The SPF result for the pending MAIL FROM.
    pub fn spf_checked(&mut self, check: SpfCheck, out: &mut Vec<u8>) {
        if !matches!(self.state, State::WaitVerify) {
            return;
        }
        self.state = State::Command;
        if let Some(txn) = &mut self.txn {
            txn.spf = Some(Box::new(check));
        }
        Reply::new(250, "2.1.0", "Ok").write_to(out);
    }

    /// At the end of DATA with checks on: hand the message to the driver for DKIM/ARC/DMARC.
    /// Returns None when the message must be decided without checks.
    pub(super) fn request_message_check(&mut self, raw: Vec<u8>) -> Result<Event, Vec<u8>> {
        let spf = self.txn.as_ref().and_then(|t| t.spf.clone());
        match (self.cfg.verify, self.check_ip().unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)), spf) {
            (true, ip, Some(spf)) => {
                let helo = self.check_helo();
                let mail_from = self.txn.as_ref().map(|t| t.mail_from.clone()).unwrap_or_default();
                self.state = State::WaitVerify;
                Ok(Event::Verify(Verify::Message { raw, ip, helo, mail_from, spf }))
            }
            _ => Err(raw),
        }
    }

    /// The message checks are done: decide and (maybe) store.
    pub fn message_checked(&mut self, raw: Vec<u8>, check: MessageCheck, out: &mut Vec<u8>) -> Option<StoreRequest> {
        if !matches!(self.state, State::WaitVerify) {
            return None;
        }
        self.state = State::Command;
        self.decide_and_store(raw, Some(check), out)
    }
}

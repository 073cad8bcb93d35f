//! The connection driver: moves bytes between a socket and the session core, applies the
//! command, DATA and session timeouts, stores messages through the spool, writes the reject log.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use super::session::{Event, Peer, Session, SessionConfig};
use super::verify::Verify;
use crate::auth::Authenticator;
use crate::gate::Gate;
use crate::spool::Spool;

/// What every connection of a listener shares.
pub struct ConnContext {
    pub spool: Spool,
    /// Sender authentication (DNS); None when every check is off.
    pub auth: Option<Authenticator>,
    pub gate: Arc<Gate>,
    pub session: Arc<SessionConfig>,
    pub command_timeout: Duration,
    pub data_timeout: Duration,
    pub session_timeout: Duration,
    pub shutdown: watch::Receiver<bool>,
}

const READ_CHUNK: usize = 64 * 1024;

/// How a session ended, for its log event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCause {
    /// The session closed itself: QUIT, too many errors, timeout or shutdown.
    Server(&'static str),
    /// The client closed the connection.
    PeerClosed,
    /// A read or write failed.
    Error,
}

impl std::fmt::Display for CloseCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CloseCause::Server(why) => f.write_str(why),
            CloseCause::PeerClosed => f.write_str("peer_closed"),
            CloseCause::Error => f.write_str("io_error"),
        }
    }
}

/// Runs one SMTP or LMTP session to its end.
pub async fn run<S>(mut stream: S, peer: Peer, ctx: &ConnContext) -> CloseCause
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let started = Instant::now();
    let deadline = started + ctx.session_timeout;
    let mut session = Session::new(ctx.session.clone(), ctx.gate.clone(), peer.clone());
    let mut shutdown = ctx.shutdown.clone();
    let mut out = Vec::with_capacity(512);
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    session.greeting(&mut out);
    let cause = loop {
        let (consumed, event) = session.process(&buf, &mut out);
        buf.drain(..consumed);
        flush_rejects(&mut session, &ctx.spool);
        match event {
            Event::Store(req) => store(&mut session, ctx, req, &mut out).await,
            Event::Verify(Verify::Spf { ip, helo, mail_from }) => {
                let Some(auth) = &ctx.auth else { break CloseCause::Error };
                let check = auth.spf(ip, &helo, &mail_from, &ctx.session.hostname).await;
                session.spf_checked(check, &mut out);
            }
            Event::Verify(Verify::Message { raw, ip, helo, mail_from, spf }) => {
                let Some(auth) = &ctx.auth else { break CloseCause::Error };
                let check = auth.message(&raw, &spf, ip, &helo, &mail_from).await;
                if let Some(req) = session.message_checked(raw, check, &mut out) {
                    store(&mut session, ctx, req, &mut out).await;
                } else {
                    flush_rejects(&mut session, &ctx.spool);
                }
            }
            Event::Close => {
                let _ = write(&mut stream, &mut out, write_limit(ctx, deadline)).await;
                break CloseCause::Server(session.close_cause().unwrap_or("closed"));
            }
            Event::NeedInput => {
                if write(&mut stream, &mut out, write_limit(ctx, deadline)).await.is_err() {
                    break CloseCause::Error;
                }
                if *shutdown.borrow() && !session.in_data() {
                    session.shutdown(&mut out);
                    flush_rejects(&mut session, &ctx.spool);
                    let _ = write(&mut stream, &mut out, write_limit(ctx, deadline)).await;
                    break CloseCause::Server("shutdown");
                }
                // The session deadline holds even for a client that always has data ready
                // (a read that never blocks would never see its timer fire).
                if Instant::now() >= deadline {
                    session.timeout(&mut out);
                    flush_rejects(&mut session, &ctx.spool);
                    let _ = write(&mut stream, &mut out, write_limit(ctx, deadline)).await;
                    break CloseCause::Server("timeout");
                }
                let idle = if session.in_data() { ctx.data_timeout } else { ctx.command_timeout };
                let wait = idle.min(deadline.saturating_duration_since(Instant::now()));
                buf.reserve(READ_CHUNK.saturating_sub(buf.capacity() - buf.len()));
                tokio::select! {
                    r = tokio::time::timeout(wait, stream.read_buf(&mut buf)) => match r {
                        Ok(Ok(0)) => break CloseCause::PeerClosed,
                        Ok(Ok(_)) => {}
                        Ok(Err(_)) => break CloseCause::Error,
                        Err(_) => {
                            session.timeout(&mut out);
                            flush_rejects(&mut session, &ctx.spool);
                            let _ = write(&mut stream, &mut out, write_limit(ctx, deadline)).await;
                            break CloseCause::Server("timeout");
                        }
                    },
                    _ = shutdown.changed(), if !session.in_data() => {}
                }
            }
        }
    };
    let _ = stream.shutdown().await;
    let stats = session.stats();
    let outcome = if stats.jobs > 0 {
        "accepted"
    } else if stats.refusals > 0 {
        "refused"
    } else {
        match cause {
            CloseCause::Server(why) => why,
            CloseCause::PeerClosed => "closed",
            CloseCause::Error => "error",
        }
    };
    crate::metrics::global().session(ctx.session.listener, outcome);
    tracing::info!(
        target: "mailgate::session",
        listener = ctx.session.listener,
        peer_ip = %peer.ip.map(|ip| ip.to_string()).unwrap_or_else(|| "unix".into()),
        helo = %session.helo(),
        messages = stats.messages,
        jobs = stats.jobs,
        duplicates = stats.duplicates,
        refusals = stats.refusals,
        duration_ms = started.elapsed().as_millis() as u64,
        close = %cause,
        "session closed"
    );
    cause
}

async fn store(session: &mut Session, ctx: &ConnContext, req: super::StoreRequest, out: &mut Vec<u8>) {
    let mailboxes: Vec<String> = req.jobs.iter().map(|j| j.job.mailbox.clone()).collect();
    let result = ctx.spool.store(&req.raw, req.jobs).await.map_err(|e| e.to_string());
    if let Ok(outcomes) = &result {
        let metrics = crate::metrics::global();
        for (outcome, mailbox) in outcomes.iter().zip(&mailboxes) {
            match outcome {
                crate::spool::StoreOutcome::Stored { .. } => metrics.accepted(ctx.session.listener, mailbox),
                crate::spool::StoreOutcome::Duplicate { .. } => metrics.duplicate(mailbox),
            }
        }
    }
    session.stored(result, out);
    flush_rejects(session, &ctx.spool);
}

/// How long one write may take: a client that stops reading must not hold its connection
/// slot forever. At least a second, so the final 421 of an expired session still goes out.
fn write_limit(ctx: &ConnContext, deadline: Instant) -> Duration {
    ctx.command_timeout.min(deadline.saturating_duration_since(Instant::now())).max(Duration::from_secs(1))
}

async fn write<S: AsyncWrite + Unpin>(stream: &mut S, out: &mut Vec<u8>, limit: Duration) -> std::io::Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    let r = match tokio::time::timeout(limit, stream.write_all(out)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "client stopped reading")),
    };
    out.clear();
    r
}

fn flush_rejects(session: &mut Session, spool: &Spool) {
    for entry in session.take_rejects() {
        crate::frontend::log_reject(spool, &entry);
    }
}

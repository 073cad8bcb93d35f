//! The connection driver: moves bytes between a socket and the session core, applies the
//! command, DATA and session timeouts, stores messages through the spool, writes the reject log.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use super::offload;
use super::session::{Event, Peer, Session, SessionConfig, TlsPolicy};
use super::verify::Verify;
use crate::auth::Authenticator;
use crate::frontend::tls::{ListenerTls, MaybeTls};
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
    /// Under stress (connection slots nearly all taken, see
    /// [`crate::frontend::listener::ConnLimits`]), sessions wait
    /// for commands this long at most. None: no stress mode.
    pub stress: Option<(watch::Receiver<bool>, Duration)>,
    pub data_timeout: Duration,
    /// Bytes a second: DATA may last `data_timeout` plus a second per this many bytes (0: off).
    pub min_data_rate: u64,
    pub session_timeout: Duration,
    /// The replies to errors after the first [`FREE_ERRORS`] wait this long each (tarpit).
    pub error_delay: Duration,
    pub shutdown: watch::Receiver<bool>,
    /// The listener's TLS (certificate, implicit or STARTTLS, required or not); None: plaintext.
    pub tls: Option<Arc<ListenerTls>>,
}

/// Read buffer sizes: small while waiting for commands (idle connections are cheap), larger in
/// DATA. A buffer grown in DATA is shrunk again when the session goes back to commands.
const COMMAND_CHUNK: usize = 1024;
const READ_CHUNK: usize = 64 * 1024;

/// Errors answered at once; the replies to later ones wait `error_delay` each, so that a client
/// flooding bad commands gets through few sessions (and reject-log entries) a second.
pub const FREE_ERRORS: u32 = 2;

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
pub async fn run<S>(stream: S, peer: Peer, ctx: &ConnContext) -> CloseCause
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let started = Instant::now();
    let deadline = started + ctx.session_timeout;
    let mut stream = MaybeTls::Plain(stream);
    let mut session = Session::new(ctx.session.clone(), ctx.gate.clone(), peer.clone());
    if let Some(tls) = &ctx.tls {
        session.set_tls_policy(TlsPolicy { starttls: !tls.implicit, require: tls.require });
    }
    let mut shutdown = ctx.shutdown.clone();
    let mut stress = ctx.stress.as_ref().map(|(rx, _)| rx.clone());
    let mut out = Vec::with_capacity(512);
    let mut buf: Vec<u8> = Vec::with_capacity(COMMAND_CHUNK);
    // When the first byte of the command line being received arrived.
    let mut command_started: Option<Instant> = None;
    // When the current DATA began (seen in DATA first), and how many messages had ended then:
    // a DATA pipelined right after the end of the previous one is a new DATA.
    let mut data_started: Option<(u32, Instant)> = None;
    let mut errors_answered = 0;
    // The last byte received or reply sent: the idle timeouts count from there.
    let mut last_active = started;
    let cause = 'session: {
        // Implicit TLS: the handshake comes before the greeting.
        if let Some(tls) = ctx.tls.as_ref().filter(|t| t.implicit) {
            match Box::pin(stream.upgrade(tls.acceptor(), write_limit(ctx, deadline))).await {
                Ok(info) => {
                    session.tls_started(info);
                    last_active = Instant::now();
                }
                Err(e) => {
                    handshake_failed(ctx, &peer, &e);
                    break 'session CloseCause::Server("tls_failed");
                }
            }
        }
        session.greeting(&mut out);
        loop {
            let large = session.may_end_message(&buf, offload::LARGE).is_some_and(offload::wanted);
            let (consumed, event) = offload::call(large, || session.process(&buf, &mut out));
            buf.drain(..consumed);
            flush_rejects(&mut session, &ctx.spool);
            match event {
                Event::Store(req) => Box::pin(store(&mut session, ctx, req, &mut out)).await,
                Event::Verify(Verify::Spf { ip, helo, mail_from }) => {
                    let Some(auth) = &ctx.auth else { break CloseCause::Error };
                    let check = Box::pin(auth.spf(ip, &helo, &mail_from, &ctx.session.hostname)).await;
                    session.spf_checked(check, &mut out);
                }
                Event::Verify(Verify::Message { raw, ip, helo, mail_from, spf }) => {
                    let Some(auth) = &ctx.auth else { break CloseCause::Error };
                    let large = offload::wanted(raw.len() as u64);
                    let check = offload::run(large, Box::pin(auth.message(&raw, &spf, ip, &helo, &mail_from))).await;
                    if let Some(req) = offload::call(large, || session.message_checked(raw, check, &mut out)) {
                        Box::pin(store(&mut session, ctx, req, &mut out)).await;
                    } else {
                        flush_rejects(&mut session, &ctx.spool);
                    }
                }
                Event::StartTls { discarded } => {
                    if write(&mut stream, &mut out, write_limit(ctx, deadline)).await.is_err() {
                        break CloseCause::Error;
                    }
                    // STARTTLS command injection: nothing read before the handshake is a command.
                    let discarded = discarded + buf.len();
                    buf.clear();
                    if discarded > 0 {
                        tracing::warn!(
                            listener = ctx.session.listener,
                            peer_ip = %peer_ip(&peer),
                            bytes = discarded,
                            "input pipelined after STARTTLS thrown away"
                        );
                    }
                    let Some(tls) = &ctx.tls else { break CloseCause::Error };
                    // The handshake counts against the command timeout.
                    match Box::pin(stream.upgrade(tls.acceptor(), write_limit(ctx, deadline))).await {
                        Ok(info) => {
                            session.tls_started(info);
                            last_active = Instant::now();
                        }
                        Err(e) => {
                            handshake_failed(ctx, &peer, &e);
                            break CloseCause::Server("tls_failed");
                        }
                    }
                }
                Event::Close => {
                    tarpit(&session, &mut errors_answered, ctx.error_delay).await;
                    let _ = write(&mut stream, &mut out, write_limit(ctx, deadline)).await;
                    break CloseCause::Server(session.close_cause().unwrap_or("closed"));
                }
                Event::NeedInput => {
                    tarpit(&session, &mut errors_answered, ctx.error_delay).await;
                    let replied = !out.is_empty();
                    if write(&mut stream, &mut out, write_limit(ctx, deadline)).await.is_err() {
                        break CloseCause::Error;
                    }
                    if replied {
                        // The client's turn: its idle time starts now.
                        last_active = Instant::now();
                    }
                    if *shutdown.borrow() && !session.in_data() {
                        session.shutdown(&mut out);
                        flush_rejects(&mut session, &ctx.spool);
                        let _ = write(&mut stream, &mut out, write_limit(ctx, deadline)).await;
                        break CloseCause::Server("shutdown");
                    }
                    // A command line must arrive within command_timeout however it trickles in
                    // (the idle timer alone restarts with every byte).
                    let now = Instant::now();
                    let command_timeout = command_timeout(ctx);
                    let partial = !session.in_data() && (!buf.is_empty() || session.mid_line());
                    let command_deadline = match (partial, command_started) {
                        (false, _) => None,
                        (true, Some(since)) => Some(since + command_timeout),
                        (true, None) => Some(*command_started.insert(now) + command_timeout),
                    };
                    if !partial {
                        command_started = None;
                    }
                    let data_deadline = match session.data_received() {
                        Some(received) => {
                            let ended = session.stats().messages;
                            let since = match data_started {
                                Some((n, since)) if n == ended => since,
                                _ => data_started.insert((ended, now)).1,
                            };
                            data_deadline(since, received, ctx.data_timeout, ctx.min_data_rate)
                        }
                        None => {
                            data_started = None;
                            None
                        }
                    };
                    // Idle since the last byte or reply, not since this wait began: a session
                    // already idle longer than stress_command_timeout is cut when stress begins.
                    let idle = if session.in_data() { ctx.data_timeout } else { command_timeout };
                    let idle_deadline = last_active.checked_add(idle);
                    let until = [command_deadline, data_deadline, idle_deadline]
                        .into_iter()
                        .flatten()
                        .fold(deadline, Instant::min);
                    // The deadlines hold even for a client that always has data ready (a read
                    // that never blocks would never see its timer fire).
                    if now >= until {
                        session.timeout(&mut out);
                        flush_rejects(&mut session, &ctx.spool);
                        let _ = write(&mut stream, &mut out, write_limit(ctx, deadline)).await;
                        break CloseCause::Server("timeout");
                    }
                    let wait = until.saturating_duration_since(now);
                    let chunk = if session.in_data() { READ_CHUNK } else { COMMAND_CHUNK };
                    if chunk == COMMAND_CHUNK && buf.is_empty() && buf.capacity() > COMMAND_CHUNK {
                        buf.shrink_to(COMMAND_CHUNK);
                    }
                    buf.reserve(chunk.saturating_sub(buf.capacity() - buf.len()));
                    tokio::select! {
                        r = tokio::time::timeout(wait, stream.read_buf(&mut buf)) => match r {
                            Ok(Ok(0)) => break CloseCause::PeerClosed,
                            Ok(Ok(_)) => last_active = Instant::now(),
                            Ok(Err(_)) => break CloseCause::Error,
                            Err(_) => {
                                session.timeout(&mut out);
                                flush_rejects(&mut session, &ctx.spool);
                                let _ = write(&mut stream, &mut out, write_limit(ctx, deadline)).await;
                                break CloseCause::Server("timeout");
                            }
                        },
                        _ = shutdown.changed(), if !session.in_data() => {}
                        // Stress began or ended: the deadlines are worked out again.
                        _ = changed(&mut stress), if !session.in_data() => {}
                    }
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
        peer_ip = %peer_ip(&peer),
        helo = %session.helo(),
        tls_version = %session.tls().map(|t| t.version.as_str()).unwrap_or(""),
        tls_cipher = %session.tls().map(|t| t.cipher.as_str()).unwrap_or(""),
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

fn peer_ip(peer: &Peer) -> String {
    peer.ip.map(|ip| ip.to_string()).unwrap_or_else(|| "unix".into())
}

/// A failed handshake ends the connection; the client hears nothing more (there is no
/// channel left to speak SMTP on).
fn handshake_failed(ctx: &ConnContext, peer: &Peer, e: &std::io::Error) {
    tracing::warn!(
        listener = ctx.session.listener,
        peer_ip = %peer_ip(peer),
        error = %e,
        "TLS handshake failed; connection closed"
    );
}

async fn store(session: &mut Session, ctx: &ConnContext, req: super::StoreRequest, out: &mut Vec<u8>) {
    let mailboxes: Vec<String> = req.jobs.iter().map(|j| j.job.mailbox.clone()).collect();
    // Writing (and checksumming) 25 MiB takes a worker's while too.
    let large = offload::wanted(req.raw.len() as u64);
    let result = offload::run(large, ctx.spool.store(&req.raw, req.jobs)).await.map_err(|e| e.to_string());
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

/// Waits `delay` for each error since the last call beyond the first [`FREE_ERRORS`] of the
/// session (at most ten delays at once), before their replies go out.
async fn tarpit(session: &Session, answered: &mut u32, delay: Duration) {
    let errors = session.errors();
    let late = errors.saturating_sub((*answered).max(FREE_ERRORS)).min(10);
    *answered = errors;
    if late > 0 && !delay.is_zero() {
        tokio::time::sleep(delay * late).await;
    }
}

/// Waits for the stress state to change; for ever without stress mode (or once the limits
/// are gone, at shutdown).
async fn changed(stress: &mut Option<watch::Receiver<bool>>) {
    if let Some(rx) = stress
        && rx.changed().await.is_ok()
    {
        return;
    }
    std::future::pending().await
}

/// When a DATA begun at `since` must be over: `data_timeout`, plus one second for every
/// `min_rate` bytes received so far (Postfix's `smtpd_min_data_rate`). A client trickling a
/// message in restarts the idle timer with each byte, but falls behind this. None: no minimum.
fn data_deadline(since: Instant, received: u64, data_timeout: Duration, min_rate: u64) -> Option<Instant> {
    if min_rate == 0 {
        return None;
    }
    let earned = Duration::from_secs_f64(received as f64 / min_rate as f64);
    since.checked_add(data_timeout.saturating_add(earned))
}

/// `command_timeout`, or `stress_command_timeout` while the server is under stress.
fn command_timeout(ctx: &ConnContext) -> Duration {
    match &ctx.stress {
        Some((rx, short)) if *rx.borrow() => ctx.command_timeout.min(*short),
        _ => ctx.command_timeout,
    }
}

/// How long one write may take: a client that stops reading must not hold its connection
/// slot forever (under stress, no longer than an idle one). At least a second, so the final
/// 421 of an expired session still goes out.
fn write_limit(ctx: &ConnContext, deadline: Instant) -> Duration {
    command_timeout(ctx).min(deadline.saturating_duration_since(Instant::now())).max(Duration::from_secs(1))
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

#[cfg(test)]
#[path = "tests_conn.rs"]
mod tests;

//! `mailgate serve`: opens the spool, binds every listener and the HTTP API, runs until
//! SIGTERM/SIGINT, then stops accepting, lets sessions in flight finish within
//! `[server] shutdown_grace` and commits the spool. SIGHUP reloads TLS certificates.

use std::sync::Arc;

use tokio::sync::watch;

use crate::auth::Authenticator;
use crate::config::{Config, ListenConfig, Protocol, ReplyMode};
use crate::frontend::listener::{self, Bound, ConnLimits};
use crate::frontend::policy;
use crate::frontend::smtp::{self, ConnContext, Peer, SessionConfig};
use crate::frontend::tls::{CertStore, ListenerTls};
use crate::gate::Gate;
use crate::http;
use crate::spool::{Spool, SpoolError, SpoolOptions};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("mailboxes: {0}")]
    Gate(#[from] crate::gate::GateError),
    #[error("spool {dir}: {source}")]
    Spool { dir: String, source: SpoolError },
    #[error("cannot listen on {address}: {source}")]
    Bind { address: String, source: std::io::Error },
    #[error("sender authentication: {0}")]
    Auth(#[from] crate::auth::AuthError),
    #[error("delivery: {0}")]
    Delivery(#[from] crate::delivery::DeliveryError),
    #[error("cannot start the delivery runtime: {0}")]
    DeliveryRuntime(std::io::Error),
    #[error("signal handler: {0}")]
    Signal(std::io::Error),
    #[error("listener {address}: TLS: {source}")]
    Tls { address: String, source: crate::frontend::tls::TlsError },
}

struct Listener {
    config: ListenConfig,
    bound: Bound,
    tls: Option<Arc<ListenerTls>>,
}

pub async fn serve(config: Config) -> Result<(), ServerError> {
    config.validate()?;
    let gate = Arc::new(
        Gate::new(&config.mailbox, &config.policy)?.with_auth(&config.auth).with_limits(config.limits.content()),
    );
    raise_open_file_limit(config.limits.max_connections);
    let verify = gate.any_policy(crate::gate::auth::AuthPolicy::needs_checks);
    let verify_spf = gate.any_policy(crate::gate::auth::AuthPolicy::needs_spf);
    // One shared authenticator (DNS resolver and caches) for every session.
    let auth = if verify { Some(Authenticator::new(&config.auth)?) } else { None };
    let spool = Spool::open(&config.spool.dir, SpoolOptions::from(&config.spool))
        .map_err(|source| ServerError::Spool { dir: config.spool.dir.display().to_string(), source })?;
    let token = config.http.token()?;
    let deliverers = crate::delivery::build(&config)?;
    let released = spool
        .release_push_leases()
        .await
        .map_err(|source| ServerError::Spool { dir: config.spool.dir.display().to_string(), source })?;
    if released > 0 {
        tracing::info!(jobs = released, "jobs in delivery when the last process stopped are ready again");
    }

    // Bind everything before serving anything: a port in use is a clear startup error.
    let mut listeners = Vec::new();
    for l in &config.listen {
        let addr = l.bind_address()?;
        // Certificates are read before anything is bound: a bad file is a startup error.
        let tls =
            ListenerTls::for_listener(l).map_err(|source| ServerError::Tls { address: l.address.clone(), source })?;
        let bound = listener::bind(&addr, l.socket_mode()?)
            .map_err(|source| ServerError::Bind { address: addr.to_string(), source })?;
        listeners.push(Listener { config: l.clone(), bound, tls });
    }
    let cert_stores: Vec<(String, Arc<CertStore>)> =
        listeners.iter().filter_map(|l| Some((l.config.address.clone(), l.tls.as_ref()?.store.clone()))).collect();
    let http_listener = match config.http.listen_addr()? {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| ServerError::Bind { address: addr.to_string(), source })?,
        ),
        None => None,
    };

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let maintenance = spool.spawn_maintenance(shutdown_rx.clone());
    let limits = ConnLimits::new(config.limits.max_connections, config.limits.max_connections_per_ip);
    let policy_limits = ConnLimits::new(config.limits.max_connections, usize::MAX);
    let mut tasks = Vec::new();
    for l in listeners {
        tracing::info!(protocol = l.config.protocol.as_str(), address = %l.config.address, "listening");
        if let Some(tls) = &l.tls {
            let kind = if tls.implicit { "implicit" } else { "starttls" };
            let cert = tls.store.summary();
            tracing::info!(address = %l.config.address, tls = kind, require_tls = tls.require, %cert, "TLS certificate loaded");
        }
        let shutdown = shutdown_rx.clone();
        if l.config.protocol == Protocol::Policy {
            let (gate, spool, limits) = (gate.clone(), spool.clone(), policy_limits.clone());
            let (auth, hostname) = (auth.clone(), config.server.hostname.clone());
            let idle = config.limits.command_timeout;
            let refuse = (spool.clone(), config.server.hostname.clone());
            tasks.push(tokio::spawn(accept_loop(l, limits, shutdown, refuse, move |stream, _peer, slot| {
                let (gate, spool, auth, hostname) = (gate.clone(), spool.clone(), auth.clone(), hostname.clone());
                async move {
                    let _slot = slot;
                    policy::run(stream, gate, spool, auth, hostname, idle).await
                }
            })));
            continue;
        }
        let lmtp = l.config.protocol == Protocol::Lmtp;
        let ctx = Arc::new(ConnContext {
            spool: spool.clone(),
            auth: auth.clone(),
            gate: gate.clone(),
            session: Arc::new(SessionConfig {
                hostname: config.server.hostname.clone(),
                lmtp,
                after_queue: l.config.reply_mode() == ReplyMode::AfterQueue,
                listener: l.config.protocol.as_str(),
                max_message_size: config.limits.max_message_size,
                max_recipients: config.limits.max_recipients,
                max_errors: config.limits.max_errors,
                max_line_length: config.limits.max_line_length,
                verify,
                verify_spf,
            }),
            command_timeout: config.limits.command_timeout,
            stress: (!config.limits.stress_command_timeout.is_zero())
                .then(|| (limits.stress(), config.limits.stress_command_timeout)),
            data_timeout: config.limits.data_timeout,
            min_data_rate: config.limits.min_data_rate,
            session_timeout: config.limits.session_timeout,
            error_delay: config.limits.error_delay,
            shutdown: shutdown_rx.clone(),
            tls: l.tls.clone(),
        });
        let refuse = (spool.clone(), config.server.hostname.clone());
        tasks.push(tokio::spawn(accept_loop(l, limits.clone(), shutdown, refuse, move |stream, peer, slot| {
            let ctx = ctx.clone();
            async move {
                let _slot = slot;
                smtp::run(stream, peer, &ctx).await;
            }
        })));
    }
    let http_task = http_listener.map(|hl| {
        let addr = hl.local_addr().map(|a| a.to_string()).unwrap_or_default();
        tracing::info!(address = %addr, "HTTP API listening");
        let state = http::HttpState { spool: spool.clone(), token };
        let stop = listener::shutdown_signalled(shutdown_rx.clone());
        tokio::spawn(async move {
            if let Err(e) = http::serve(hl, state, stop).await {
                tracing::error!(error = %e, "HTTP API stopped");
            }
        })
    });
    let workers = crate::delivery::spawn(&deliverers, &spool, &shutdown_rx).map_err(ServerError::DeliveryRuntime)?;
    for m in &config.mailbox {
        if !deliverers.iter().any(|d| d.mailboxes.is_empty() || d.mailboxes.contains(&m.name)) {
            tracing::info!(mailbox = %m.name, "no [[deliver]] entry for this mailbox: its jobs wait for the pull API");
        }
    }
    tracing::info!(hostname = %config.server.hostname, spool = %config.spool.dir.display(), "mailgate ready");

    wait_for_signal(&cert_stores).await?;
    tracing::info!("shutting down: no new connections; sessions in flight may finish");
    let _ = shutdown_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    let left = limits.drain(config.server.shutdown_grace).await;
    if left > 0 {
        tracing::warn!(sessions = left, "sessions still open after the shutdown grace period; closing them");
    }
    // Workers take no new job once told to stop; an attempt in flight may finish within the
    // grace period. One cut off leaves a push lease that the next start releases.
    if !workers.stop(config.server.shutdown_grace).await {
        tracing::warn!(
            "deliveries still in flight after the shutdown grace period; they are retried at the next start"
        );
    }
    if let Some(t) = http_task {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), t).await;
    }
    let _ = maintenance.await;
    if let Err(e) = spool.close().await {
        tracing::error!(error = %e, "final spool commit failed");
    }
    tracing::info!("mailgate stopped");
    Ok(())
}

/// Raises the soft limit on open files to the hard limit: every connection takes a descriptor,
/// and the usual soft limit (1024) is no more than the default `max_connections` (1000) for
/// SMTP/LMTP plus as many for the policy service. Over the limit, accept fails and nobody is
/// served, not even within the connection limits.
fn raise_open_file_limit(max_connections: usize) {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write the struct they are given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return;
    }
    let before = limit.rlim_cur;
    // an unlimited hard limit is still capped by the kernel's nr_open (default 1048576)
    let wanted = limit.rlim_max.min(1 << 20);
    if before < wanted {
        let raised = libc::rlimit { rlim_cur: wanted, rlim_max: limit.rlim_max };
        // SAFETY: as above
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit.rlim_cur = wanted;
            tracing::info!(from = before, to = wanted, "open-file limit raised");
        }
    }
    let needed = 2 * max_connections as u64 + 64;
    if limit.rlim_cur < needed {
        tracing::warn!(
            limit = limit.rlim_cur,
            needed,
            "open-file limit below 2 x max_connections + 64: connections beyond it cannot be accepted"
        );
    }
}

/// Waits for SIGTERM or SIGINT; on SIGHUP reloads every TLS listener's certificate.
async fn wait_for_signal(cert_stores: &[(String, Arc<CertStore>)]) -> Result<(), ServerError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(ServerError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(ServerError::Signal)?;
    let mut hup = signal(SignalKind::hangup()).map_err(ServerError::Signal)?;
    loop {
        tokio::select! {
            _ = term.recv() => break tracing::info!("SIGTERM received"),
            _ = int.recv() => break tracing::info!("SIGINT received"),
            _ = hup.recv() => reload_certificates(cert_stores),
        }
    }
    Ok(())
}

/// New handshakes use the new certificate; one that does not load leaves the old one in use.
fn reload_certificates(cert_stores: &[(String, Arc<CertStore>)]) {
    tracing::info!(listeners = cert_stores.len(), "SIGHUP received: reloading TLS certificates");
    for (address, store) in cert_stores {
        let cert_file = store.files().cert.display().to_string();
        match store.reload() {
            Ok(cert) => tracing::info!(address = %address, file = %cert_file, %cert, "TLS certificate reloaded"),
            Err(e) => tracing::error!(
                address = %address,
                error = %e,
                "TLS certificate reload failed; the previous certificate stays in use"
            ),
        }
    }
}

/// A boxed bidirectional stream (TCP or unix).
pub trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

async fn accept_loop<F, Fut>(
    l: Listener,
    limits: Arc<ConnLimits>,
    shutdown: watch::Receiver<bool>,
    (spool, hostname): (Spool, String),
    handle: F,
) where
    F: Fn(Box<dyn Stream>, Peer, listener::Slot) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let trusted = l.config.trusted_peers.clone();
    let name = l.config.protocol.as_str();
    let throttle = crate::frontend::refusals::RefusalThrottle::default();
    let stop = listener::shutdown_signalled(shutdown);
    tokio::pin!(stop);
    loop {
        let accepted: std::io::Result<(Box<dyn Stream>, Option<std::net::IpAddr>)> = tokio::select! {
            _ = &mut stop => break,
            r = accept(&l.bound) => r,
        };
        let (stream, ip) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, listener = name, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let trusted_peer = listener::is_trusted(ip, &trusted);
        if l.config.protocol == Protocol::Policy {
            // The policy service tells whoever asks which keys are valid: Postfix (a trusted
            // peer) only. Refusals are closes: Postfix speaks no SMTP on this socket.
            let refused = if !trusted_peer { Some("peer not in trusted_peers") } else { None };
            let slot = match refused {
                Some(why) => Err(why),
                None => limits.acquire(ip, true),
            };
            match slot {
                Ok(slot) => {
                    tokio::spawn(handle(stream, Peer { ip, trusted: true }, slot));
                }
                Err(why) => tracing::warn!(client_ip = ?ip, listener = name, why, "policy connection closed"),
            }
            continue;
        }
        match limits.acquire(ip, trusted_peer) {
            Ok(slot) => {
                let fut = handle(stream, Peer { ip, trusted: trusted_peer }, slot);
                tokio::spawn(fut);
            }
            Err(why) => {
                let logged = throttle.admit(ip, why, std::time::Instant::now());
                if let Some(suppressed) = logged {
                    tracing::warn!(client_ip = ?ip, listener = name, why, suppressed, "connection refused");
                }
                let (spool, hostname) = (spool.clone(), hostname.clone());
                tokio::spawn(async move { listener::refuse(stream, &hostname, ip, why, name, (&spool, logged)).await });
            }
        }
    }
    if let (Bound::Unix(_), Ok(crate::config::BindAddress::Unix(p))) = (&l.bound, l.config.bind_address()) {
        let _ = std::fs::remove_file(p);
    }
}

async fn accept(bound: &Bound) -> std::io::Result<(Box<dyn Stream>, Option<std::net::IpAddr>)> {
    match bound {
        Bound::Tcp(l) => {
            let (s, addr) = l.accept().await?;
            let _ = s.set_nodelay(true);
            Ok((Box::new(s), Some(addr.ip())))
        }
        Bound::Unix(l) => {
            let (s, _) = l.accept().await?;
            Ok((Box::new(s), None))
        }
    }
}

//! The worker loop: lease a due job of the deliverer's mailboxes, send it within the timeout,
//! record the outcome. Idle workers sleep until the spool signals new ready jobs (or a second
//! passes). The signal wakes one worker; a worker that leases a job wakes the next, so a
//! backlog sets every worker going while one new job costs one scan of the ready index, not
//! one per worker (with 16 workers that herd cost 1.4x the CPU per job). On shutdown a worker
//! takes no new job and finishes the attempt in flight; a worker cut off anyway leaves a push
//! lease that the next start releases.

use std::sync::Arc;
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tokio::sync::watch;

use super::Deliverer;
use super::outcome::Failure;
use crate::spool::{AfterFailure, PushLease, Spool, SpoolError};

/// A push lease outlives the attempt's timeout by this much, so it never ends mid-attempt.
const LEASE_MARGIN: Duration = Duration::from_secs(60);
/// Idle workers look for due jobs at least this often (retry waits end without a signal
/// until the reaper runs).
const IDLE_POLL: Duration = Duration::from_secs(1);

/// Threads of the delivery runtime. The kernel shares the CPU between threads, so under a
/// full-speed intake delivery gets as many threads' share as the sessions' runtime has on a
/// 2-core machine: measured in `make bench`, one thread fell behind a 20-session intake, two
/// kept up with 20 and with 50 sessions.
const THREADS: usize = 2;

/// The running workers, on a runtime of their own. On the server's runtime they got a share
/// per task: each step of an attempt queued behind every SMTP session's task, so 16 workers
/// kept up with 20 sessions but fell behind 50 (backlog 6,000-9,500 jobs, `make bench`).
pub struct Workers {
    runtime: Option<tokio::runtime::Runtime>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Workers {
    /// Waits up to `grace` for the workers to finish (they stop when `shutdown` turns true);
    /// false if some attempt was still in flight, which then ends with the runtime.
    pub async fn stop(mut self, grace: Duration) -> bool {
        let tasks = std::mem::take(&mut self.tasks);
        let all = async {
            for t in tasks {
                let _ = t.await;
            }
        };
        tokio::time::timeout(grace, all).await.is_ok()
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        // Never blocks, so it may run on the server's runtime.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Starts every deliverer's workers on the delivery runtime; they stop when `shutdown` turns
/// true. No deliverer: no runtime.
pub fn spawn(
    deliverers: &[Arc<Deliverer>],
    spool: &Spool,
    shutdown: &watch::Receiver<bool>,
) -> std::io::Result<Workers> {
    if deliverers.is_empty() {
        return Ok(Workers { runtime: None, tasks: Vec::new() });
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(THREADS)
        .thread_name("mailgate-deliver")
        .enable_all()
        .build()?;
    let mut tasks = Vec::new();
    for d in deliverers {
        tracing::info!(
            target: "mailgate::delivery",
            deliverer = %d.name,
            kind = d.kind.as_str(),
            mailboxes = ?d.mailboxes,
            concurrency = d.concurrency,
            attempts = d.schedule.attempts(),
            "delivery workers starting"
        );
        for _ in 0..d.concurrency {
            let (d, spool, shutdown) = (d.clone(), spool.clone(), shutdown.clone());
            tasks.push(runtime.spawn(async move { run(d, spool, shutdown).await }));
        }
    }
    Ok(Workers { runtime: Some(runtime), tasks })
}

async fn run(d: Arc<Deliverer>, spool: Spool, mut shutdown: watch::Receiver<bool>) {
    let mailboxes: Vec<&str> = d.mailboxes.iter().map(String::as_str).collect();
    let lease = d.timeout + LEASE_MARGIN;
    loop {
        let signal = spool.ready_signal().notified();
        tokio::pin!(signal);
        signal.as_mut().enable();
        if *shutdown.borrow() {
            break;
        }
        match spool.lease_for_push(&mailboxes, lease) {
            Ok(Some(lease)) => {
                // There may be more: pass the signal on to an idle peer.
                spool.ready_signal().notify_one();
                attempt(&d, &spool, lease).await
            }
            Ok(None) => {
                tokio::select! {
                    _ = &mut signal => {}
                    _ = tokio::time::sleep(IDLE_POLL) => {}
                    _ = shutdown.changed() => {}
                }
            }
            Err(SpoolError::Closed) => break,
            Err(e) => {
                tracing::error!(target: "mailgate::delivery", deliverer = %d.name, error = %e, "cannot lease a job");
                tokio::select! {
                    _ = tokio::time::sleep(IDLE_POLL) => {}
                    _ = shutdown.changed() => {}
                }
            }
        }
    }
}

/// One attempt at one leased job.
async fn attempt(d: &Deliverer, spool: &Spool, lease: PushLease) {
    let job = lease.job();
    let id = job.id.clone();
    let started = Instant::now();
    let result = match spool.raw(&job.id) {
        Ok(Some(raw)) => match tokio::time::timeout(d.timeout, d.receiver.send(job, raw)).await {
            Ok(r) => r,
            Err(_) => Err(Failure::Retry(format!("timed out after {}", humantime::format_duration(d.timeout)))),
        },
        Ok(None) => Err(Failure::Final("the raw message is missing from the spool".into())),
        Err(e) => Err(Failure::Retry(format!("cannot read the raw message: {e}"))),
    };
    let took = started.elapsed();
    let metrics = crate::metrics::global();
    let kind = d.kind.as_str();
    let recorded = match &result {
        Ok(()) => {
            let latency = (OffsetDateTime::now_utc() - job.received_at).try_into().unwrap_or(Duration::ZERO);
            metrics.delivery_attempt(&d.name, kind, "delivered", took);
            metrics.delivered(&d.name, kind, latency);
            tracing::info!(
                target: "mailgate::delivery",
                deliverer = %d.name, kind, job = %job.id, mailbox = %job.mailbox, attempt = job.attempts,
                took_ms = took.as_millis() as u64, latency_ms = latency.as_millis() as u64,
                "delivered"
            );
            spool.push_delivered(lease).await
        }
        Err(failure) => {
            let error = failure.message();
            let wait = match failure {
                Failure::Final(_) => None,
                Failure::Retry(_) | Failure::Misconfigured(_) => {
                    d.schedule.wait_after(job.attempts, rand::random::<f64>())
                }
            };
            let next = match wait {
                Some(wait) => {
                    let at = OffsetDateTime::now_utc() + wait;
                    metrics.delivery_attempt(&d.name, kind, "retry", took);
                    if matches!(failure, Failure::Misconfigured(_)) {
                        tracing::error!(
                            target: "mailgate::delivery",
                            deliverer = %d.name, kind, job = %job.id, mailbox = %job.mailbox, attempt = job.attempts,
                            error, next_attempt_at = %at, "delivery refused: check the configuration; will retry"
                        );
                    } else {
                        tracing::warn!(
                            target: "mailgate::delivery",
                            deliverer = %d.name, kind, job = %job.id, mailbox = %job.mailbox, attempt = job.attempts,
                            error, next_attempt_at = %at, "delivery failed; will retry"
                        );
                    }
                    AfterFailure::RetryAt(at)
                }
                None => {
                    metrics.delivery_attempt(&d.name, kind, "dead", took);
                    tracing::error!(
                        target: "mailgate::delivery",
                        deliverer = %d.name, kind, job = %job.id, mailbox = %job.mailbox, attempt = job.attempts,
                        error, final_answer = matches!(failure, Failure::Final(_)),
                        "delivery failed for good; the job is dead (`mailgate queue retry` replays it)"
                    );
                    AfterFailure::Dead
                }
            };
            spool.push_failed(lease, error, next, false).await
        }
    };
    if let Err(e) = recorded {
        // An operator moved the job meanwhile (ack, retry), or the spool is closing: the
        // attempt's outcome is logged above; the job's own state stands.
        tracing::warn!(target: "mailgate::delivery", deliverer = %d.name, job = %id, error = %e,
            "could not record the delivery outcome");
    }
}

//! Large messages are finished off the async workers. Parsing, hashing (the dedup
//! fingerprint, DKIM body hashes), checking and writing a message cost time in proportion
//! to its size: tens of milliseconds per mebibyte. Done on a runtime worker, that time would
//! stall every other session queued on it; on a two-core machine four messages at the size
//! limit would stop the server for a while. [`tokio::task::block_in_place`] hands the
//! worker's other sessions to a new thread for as long as the work runs.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::{Handle, RuntimeFlavor};

/// Messages of at least this many bytes are finished off the workers. Below it the work
/// takes well under a millisecond and moving it would cost more than it saves.
pub const LARGE: u64 = 256 * 1024;

/// Whether `bytes` is large enough, and the runtime can hand its worker over (a
/// current-thread runtime, as in unit tests, cannot).
pub fn wanted(bytes: u64) -> bool {
    bytes >= LARGE && Handle::try_current().is_ok_and(|h| h.runtime_flavor() == RuntimeFlavor::MultiThread)
}

/// Work finished off the workers now. Each holds a thread of the blocking pool, also while it
/// waits (DNS answers for DKIM, the group commit), so a flood of large messages could use the
/// whole pool: past [`max_offloads`], work stays on its worker as before.
static ACTIVE: AtomicUsize = AtomicUsize::new(0);

/// Four per core.
fn max_offloads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).saturating_mul(4)
}

/// One offload in progress.
struct Offload;

impl Offload {
    fn try_start(large: bool) -> Option<Offload> {
        let taken = large && ACTIVE.fetch_add(1, Ordering::SeqCst) < max_offloads();
        if taken {
            return Some(Offload);
        }
        if large {
            ACTIVE.fetch_sub(1, Ordering::SeqCst);
        }
        None
    }
}

impl Drop for Offload {
    fn drop(&mut self) {
        ACTIVE.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Runs `f` here when `large` is false (or too many run off the workers), else off the worker.
pub fn call<R>(large: bool, f: impl FnOnce() -> R) -> R {
    match Offload::try_start(large) {
        Some(_offload) => tokio::task::block_in_place(f),
        None => f(),
    }
}

/// Awaits `fut` here when `large` is false (or too many run off the workers), else runs it to
/// its end off the worker.
pub async fn run<F: Future>(large: bool, fut: F) -> F::Output {
    match Offload::try_start(large) {
        Some(_offload) => {
            let handle = Handle::current();
            tokio::task::block_in_place(move || handle.block_on(fut))
        }
        None => fut.await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tests share [`ACTIVE`].
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_large_message_leaves_the_worker_to_other_sessions() {
        let _one = SERIAL.lock().await;
        // One worker: while it is blocked in `call`, a spawned task can only run if the
        // worker's queue was handed to another thread.
        assert!(wanted(LARGE) && !wanted(LARGE - 1));
        // On the worker (the test body itself runs on the test's own thread).
        let on_worker = tokio::spawn(async {
            let (tx, rx) = std::sync::mpsc::channel();
            let other = tokio::spawn(async move { tx.send(()).ok() });
            let ran = call(true, || rx.recv_timeout(std::time::Duration::from_secs(5)).is_ok());
            (ran, other)
        });
        let (ran, other) = on_worker.await.unwrap();
        assert!(ran, "the other task did not run while the large message was finished");
        other.await.unwrap();
        assert_eq!(run(true, async { 7 }).await, 7);
    }

    #[test]
    fn offloads_are_capped() {
        let _one = SERIAL.blocking_lock();
        let held: Vec<Offload> = std::iter::from_fn(|| Offload::try_start(true)).take(10_000).collect();
        assert!(!held.is_empty() && held.len() <= max_offloads(), "{}", held.len());
        assert!(Offload::try_start(true).is_none(), "over the cap: in place");
        assert!(Offload::try_start(false).is_none());
        drop(held);
        assert!(Offload::try_start(true).is_some(), "free again");
    }

    #[tokio::test]
    async fn a_current_thread_runtime_keeps_the_work_in_place() {
        assert!(!wanted(u64::MAX));
        assert_eq!(run(false, async { 7 }).await, 7);
    }
}

//! Prometheus metrics for mailgate.
//!
//! This module only counts and renders: it does no I/O and holds no policy. The listeners, the gate and the
//! deliverers call the recording methods of [`Metrics`] (usually through [`global()`]); the HTTP side calls
//! [`Metrics::render`] at scrape time with a [`QueueSnapshot`] it reads from the spool, and serves the result
//! with [`CONTENT_TYPE`].
//!
//! The exposition is OpenMetrics text as written by `prometheus-client` (counter families are declared without
//! their `_total` suffix in the `# TYPE` line, samples carry it, and the body ends with a single `# EOF`), which
//! Prometheus scrapes natively when it is served as `application/openmetrics-text`.
//!
//! Exposed series (HELP texts in the code below):
//!
//! | name | type | labels |
//! |---|---|---|
//! | `mailgate_sessions_total` | counter | `listener`, `outcome` |
//! | `mailgate_accepted_total` | counter | `listener`, `mailbox` |
//! | `mailgate_refused_total` | counter | `reason`, `action`, `stage` |
//! | `mailgate_duplicates_total` | counter | `mailbox` |
//! | `mailgate_delivery_attempts_total` | counter | `deliverer`, `kind`, `outcome` |
//! | `mailgate_delivery_attempt_duration_seconds` | histogram (1 ms .. 60 s) | `deliverer`, `kind` |
//! | `mailgate_delivery_latency_seconds` | histogram (5 ms .. 12 h) | `deliverer`, `kind` |
//! | `mailgate_queue_jobs` | gauge | `mailbox`, `state` |
//! | `mailgate_queue_oldest_ready_age_seconds` | gauge | |
//! | `mailgate_rejects_stored` | gauge | |
//! | `mailgate_listeners_under_stress` | gauge | |
//! | `mailgate_stress_episodes_total` | counter | |
//!
//! The three queue gauges are built from the snapshot in a fresh registry on every render, so a mailbox or
//! state that disappeared from the spool disappears from the output too.
//! A labelled family with no series yet (e.g. no delivery attempt since start) is left out entirely, HELP and
//! TYPE included: that is how `prometheus-client` encodes an empty family.

use std::borrow::Cow;
use std::sync::OnceLock;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

#[cfg(test)]
mod tests;

/// The `Content-Type` to serve [`Metrics::render`]'s output with.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds (seconds) of `mailgate_delivery_attempt_duration_seconds`: 1 ms .. 60 s, roughly 1-2.5-5.
const ATTEMPT_DURATION_BUCKETS: [f64; 15] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// Upper bounds (seconds) of `mailgate_delivery_latency_seconds`: 5 ms .. 12 h, roughly exponential (retries
/// can keep a job in the queue for hours).
const LATENCY_BUCKETS: [f64; 22] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
    7200.0, 14400.0, 28800.0, 43200.0,
];

// Expected values of the fixed-vocabulary labels. A known word becomes a borrowed `'static` label value, so
// recording it does not allocate; anything else is still recorded, as an owned copy.
const LISTENERS: &[&str] = &["smtp", "lmtp", "policy"];
const SESSION_OUTCOMES: &[&str] = &["accepted", "refused", "quit", "timeout", "error", "dropped"];
const ACTIONS: &[&str] = &["reject", "tempfail", "discard"];
const STAGES: &[&str] = &["connect", "helo", "mail", "rcpt", "data"];
const KINDS: &[&str] = &["mailroom", "webhook", "sidekiq"];
const DELIVERY_OUTCOMES: &[&str] = &["delivered", "retry", "dead"];

/// A label value: borrowed for the fixed vocabularies above, owned for names from config or mail.
type Label = Cow<'static, str>;

fn word(value: &str, known: &'static [&'static str]) -> Label {
    match known.iter().find(|k| **k == value) {
        Some(k) => Cow::Borrowed(k),
        None => Cow::Owned(value.to_owned()),
    }
}

fn owned(value: &str) -> Label {
    Cow::Owned(value.to_owned())
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SessionLabels {
    listener: Label,
    outcome: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AcceptedLabels {
    listener: Label,
    mailbox: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    reason: Label,
    action: Label,
    stage: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MailboxLabels {
    mailbox: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttemptLabels {
    deliverer: Label,
    kind: Label,
    outcome: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DelivererLabels {
    deliverer: Label,
    kind: Label,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabels {
    mailbox: String,
    state: String,
}

type HistogramFamily<S> = Family<S, Histogram, fn() -> Histogram>;

fn attempt_duration_histogram() -> Histogram {
    Histogram::new(ATTEMPT_DURATION_BUCKETS)
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// Queue depth at scrape time.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QueueSnapshot {
    /// (mailbox, state, jobs): state is "ready"|"leased"|"done"|"dead"; also "waiting" may appear (ready jobs
    /// waiting for a retry). Repeated (mailbox, state) pairs are summed.
    pub depth: Vec<(String, String, u64)>,
    /// Age in seconds of the oldest ready job, if any.
    pub oldest_ready_age_seconds: Option<f64>,
    /// Reject-log entries currently stored.
    pub rejects_stored: u64,
}

/// mailgate's metrics. Cheap to record into from any thread; see the module documentation for the series.
#[derive(Debug)]
pub struct Metrics {
    /// Everything but the queue gauges (those come from the [`QueueSnapshot`] at render time).
    registry: Registry,
    sessions: Family<SessionLabels, Counter>,
    accepted: Family<AcceptedLabels, Counter>,
    refused: Family<RefusedLabels, Counter>,
    duplicates: Family<MailboxLabels, Counter>,
    delivery_attempts: Family<AttemptLabels, Counter>,
    delivery_attempt_duration: HistogramFamily<DelivererLabels>,
    delivery_latency: HistogramFamily<DelivererLabels>,
    under_stress: Gauge,
    stress_episodes: Counter,
}

static GLOBAL: OnceLock<Metrics> = OnceLock::new();

/// The process-wide metrics (a `std::sync::OnceLock<Metrics>` static).
pub fn global() -> &'static Metrics {
    GLOBAL.get_or_init(Metrics::new)
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh, empty set of metrics; also usable in tests, independent of [`global()`].
    pub fn new() -> Metrics {
        let sessions = Family::default();
        let accepted = Family::default();
        let refused = Family::default();
        let duplicates = Family::default();
        let delivery_attempts = Family::default();
        let delivery_attempt_duration: HistogramFamily<DelivererLabels> =
            Family::new_with_constructor(attempt_duration_histogram);
        let delivery_latency: HistogramFamily<DelivererLabels> = Family::new_with_constructor(latency_histogram);

        // prometheus-client appends `_total` to counters and the unit to unit-tagged metrics, and a final
        // `.` to every HELP text.
        let mut registry = Registry::default();
        registry.register(
            "mailgate_sessions",
            "SMTP, LMTP and policy sessions ended, by listener and outcome",
            sessions.clone(),
        );
        registry.register(
            "mailgate_accepted",
            "Jobs stored in the spool (one per accepted mailbox), by listener and mailbox",
            accepted.clone(),
        );
        registry.register(
            "mailgate_refused",
            "Refusals logged, by reason id, action (reject, tempfail, discard) and SMTP stage",
            refused.clone(),
        );
        registry.register(
            "mailgate_duplicates",
            "Duplicate messages recognised and not stored again, by mailbox",
            duplicates.clone(),
        );
        registry.register(
            "mailgate_delivery_attempts",
            "Delivery attempts ended, by deliverer, kind and outcome (delivered, retry, dead)",
            delivery_attempts.clone(),
        );
        registry.register_with_unit(
            "mailgate_delivery_attempt_duration",
            "Duration of one delivery attempt, by deliverer and kind",
            Unit::Seconds,
            delivery_attempt_duration.clone(),
        );
        registry.register_with_unit(
            "mailgate_delivery_latency",
            "Time from a job's acceptance (the 250) to the application's 2xx, retries included, by deliverer and kind",
            Unit::Seconds,
            delivery_latency.clone(),
        );

        let under_stress = Gauge::default();
        registry.register(
            "mailgate_listeners_under_stress",
            "Listeners in stress mode now (80% of max_connections in use, until under 70%)",
            under_stress.clone(),
        );
        let stress_episodes = Counter::default();
        registry.register(
            "mailgate_stress_episodes",
            "Times a listener went into stress mode",
            stress_episodes.clone(),
        );

        Metrics {
            registry,
            sessions,
            accepted,
            refused,
            duplicates,
            delivery_attempts,
            delivery_attempt_duration,
            delivery_latency,
            under_stress,
            stress_episodes,
        }
    }

    /// A listener went into stress mode (`on`) or out of it.
    pub fn stress_changed(&self, on: bool) {
        if on {
            self.under_stress.inc();
            self.stress_episodes.inc();
        } else {
            self.under_stress.dec();
        }
    }

    /// One SMTP/LMTP/policy session ended. listener: "smtp"|"lmtp"|"policy"; outcome: a short word such as
    /// "accepted", "refused", "quit", "timeout", "error", "dropped".
    pub fn session(&self, listener: &str, outcome: &str) {
        let labels = SessionLabels { listener: word(listener, LISTENERS), outcome: word(outcome, SESSION_OUTCOMES) };
        self.sessions.get_or_create(&labels).inc();
    }

    /// A job was stored (one per accepted mailbox/key).
    pub fn accepted(&self, listener: &str, mailbox: &str) {
        let labels = AcceptedLabels { listener: word(listener, LISTENERS), mailbox: owned(mailbox) };
        self.accepted.get_or_create(&labels).inc();
    }

    /// A refusal was logged. reason: a stable reason id ("unknown_key", "spf_fail", ...); action:
    /// "reject"|"tempfail"|"discard"; stage: "connect"|"helo"|"mail"|"rcpt"|"data".
    pub fn refused(&self, reason: &str, action: &str, stage: &str) {
        let labels = RefusedLabels { reason: owned(reason), action: word(action, ACTIONS), stage: word(stage, STAGES) };
        self.refused.get_or_create(&labels).inc();
    }

    /// A duplicate message was recognised and not stored again.
    pub fn duplicate(&self, mailbox: &str) {
        let labels = MailboxLabels { mailbox: owned(mailbox) };
        self.duplicates.get_or_create(&labels).inc();
    }

    /// One delivery attempt ended. deliverer: the `[[deliver]]` entry's name; kind: "mailroom"|"webhook"|"sidekiq";
    /// outcome: "delivered"|"retry"|"dead"; duration: how long the attempt took.
    pub fn delivery_attempt(&self, deliverer: &str, kind: &str, outcome: &str, duration: Duration) {
        let kind = word(kind, KINDS);
        let attempt = AttemptLabels {
            deliverer: owned(deliverer),
            kind: kind.clone(),
            outcome: word(outcome, DELIVERY_OUTCOMES),
        };
        self.delivery_attempts.get_or_create(&attempt).inc();
        let AttemptLabels { deliverer, kind, .. } = attempt;
        let labels = DelivererLabels { deliverer, kind };
        self.delivery_attempt_duration.get_or_create(&labels).observe(duration.as_secs_f64());
    }

    /// A job was delivered: `latency` = time from its acceptance (the 250) to the application's 2xx.
    pub fn delivered(&self, deliverer: &str, kind: &str, latency: Duration) {
        let labels = DelivererLabels { deliverer: owned(deliverer), kind: word(kind, KINDS) };
        self.delivery_latency.get_or_create(&labels).observe(latency.as_secs_f64());
    }

    /// Renders everything in the Prometheus text exposition format (OpenMetrics flavour, see [`CONTENT_TYPE`]),
    /// with the queue gauges taken from `queue` (a snapshot the caller reads from the spool at scrape time).
    pub fn render(&self, queue: &QueueSnapshot) -> String {
        let queue_registry = queue_registry(queue);
        let mut out = String::with_capacity(8192);
        let written = encode_registry(&mut out, &self.registry)
            .and_then(|()| encode_registry(&mut out, &queue_registry))
            .and_then(|()| encode_eof(&mut out));
        // Cannot fail: writing into a `String` never fails, and the encoder's only error of its own is for
        // native-only histograms, which are not used here (every histogram has classic buckets).
        written.expect("encoding metrics into a String cannot fail");
        out
    }
}

/// The queue gauges, built fresh from `queue` so that series gone from the spool are not rendered again.
fn queue_registry(queue: &QueueSnapshot) -> Registry {
    let jobs = Family::<QueueLabels, Gauge<u64, AtomicU64>>::default();
    for (mailbox, state, count) in &queue.depth {
        let labels = QueueLabels { mailbox: mailbox.clone(), state: state.clone() };
        jobs.get_or_create(&labels).inc_by(*count);
    }
    // 0 when there is no ready job; also for a nonsensical age (negative, NaN, infinite), which the text format
    // could not carry as a plain number anyway.
    let oldest = Gauge::<f64, AtomicU64>::default();
    oldest.set(queue.oldest_ready_age_seconds.filter(|age| age.is_finite() && *age > 0.0).unwrap_or(0.0));
    let rejects = Gauge::<u64, AtomicU64>::default();
    rejects.set(queue.rejects_stored);

    let mut registry = Registry::default();
    registry.register("mailgate_queue_jobs", "Jobs in the spool, by mailbox and state", jobs);
    registry.register_with_unit(
        "mailgate_queue_oldest_ready_age",
        "Age of the oldest ready job in the spool, 0 when there is none",
        Unit::Seconds,
        oldest,
    );
    registry.register("mailgate_rejects_stored", "Reject-log entries currently stored", rejects);
    registry
}

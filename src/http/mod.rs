//! The admin and pull HTTP API (axum), used by the CLI while a server runs and by applications
//! that pull jobs. Every error is JSON: `{"error": "..."}`.
//!
//! | method | path | answer |
//! |---|---|---|
//! | GET | `/healthz` | `{"status":"ok"}` (no auth) |
//! | GET | `/v1/stats` | spool counters |
//! | GET | `/v1/jobs?state=&limit=` | array of jobs, oldest first |
//! | GET | `/v1/jobs/{id}` | one job |
//! | GET | `/v1/jobs/{id}/raw` | the message, `message/rfc822` |
//! | GET, POST | `/v1/jobs/next?mailbox=&lease=SECONDS` | 200 leased job, 204 when empty |
//! | POST | `/v1/jobs/{id}/ack`, `/nack`, `/retry` | 200 job, 404, 409 wrong state |
//! | POST | `/v1/jobs/retry?mailbox=` | every dead job (of the mailbox) -> ready: `{"retried": N}` |
//! | GET | `/metrics` | Prometheus (OpenMetrics text) |
//! | GET | `/v1/rejects?since=&reason=&after=&limit=` | array of reject records |

mod auth;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router, middleware};
use serde::Deserialize;
use serde_json::json;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

pub use auth::authorized;

use crate::gate::verdict::Reason;
use crate::job::JobState;
use crate::spool::{RejectQuery, Spool, SpoolError};

/// Default lease of `/v1/jobs/next`, in seconds.
pub const DEFAULT_LEASE_SECS: u64 = 300;
/// Longest lease a client may ask for (30 days).
pub const MAX_LEASE_SECS: u64 = 30 * 86_400;
/// Default and largest page of `/v1/jobs` and `/v1/rejects`.
pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 10_000;

/// What the handlers share.
pub struct HttpState {
    pub spool: Spool,
    /// Bearer token required from non-loopback clients; `None`: loopback clients only.
    pub token: Option<String>,
}

/// Serves the API on `listener` until `shutdown` completes (then finishes requests in flight).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: HttpState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state).into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(shutdown)
        .await
}

/// The API's routes. Serve it with connection info (`SocketAddr`), or every client counts as
/// remote.
pub fn router(state: HttpState) -> Router {
    let state = Arc::new(state);
    let api = Router::new()
        .route("/v1/stats", get(stats))
        .route("/v1/jobs", get(list_jobs))
        .route("/v1/jobs/next", get(next_job).post(next_job))
        .route("/v1/jobs/{id}", get(show_job))
        .route("/v1/jobs/{id}/raw", get(raw_job))
        .route("/v1/jobs/{id}/ack", post(ack_job))
        .route("/v1/jobs/{id}/nack", post(nack_job))
        .route("/v1/jobs/{id}/retry", post(retry_job))
        .route("/v1/jobs/retry", post(retry_all))
        .route("/metrics", get(metrics))
        .route("/v1/rejects", get(rejects))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::require_auth));
    Router::new()
        .route("/healthz", get(healthz))
        .merge(api)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// An error answer: a status and `{"error": message}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into() }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

impl From<SpoolError> for ApiError {
    fn from(e: SpoolError) -> Self {
        let status = match &e {
            SpoolError::NotFound(_) => StatusCode::NOT_FOUND,
            SpoolError::WrongState { .. } => StatusCode::CONFLICT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(e: QueryRejection) -> Self {
        ApiError::bad_request(e.body_text())
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// Runs a synchronous spool call off the async workers (sled scans may block).
async fn blocking<T: Send + 'static>(
    spool: &Spool,
    f: impl FnOnce(&Spool) -> Result<T, SpoolError> + Send + 'static,
) -> ApiResult<T> {
    let spool = spool.clone();
    match tokio::task::spawn_blocking(move || f(&spool)).await {
        Ok(result) => result.map_err(ApiError::from),
        Err(e) => Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("spool task failed: {e}"))),
    }
}

/// `1h`, `30m`, `2d` (humantime, counted back from `now`) or an RFC 3339 time.
pub fn parse_since(value: &str, now: OffsetDateTime) -> Result<OffsetDateTime, String> {
    let value = value.trim();
    if let Ok(t) = OffsetDateTime::parse(value, &Rfc3339) {
        return Ok(t);
    }
    let d = humantime::parse_duration(value)
        .map_err(|_| format!("since {value:?}: expected a duration like 1h, 30m, 2d or an RFC 3339 time"))?;
    let d = time::Duration::try_from(d).map_err(|_| format!("since {value:?}: duration too long"))?;
    now.checked_sub(d).ok_or_else(|| format!("since {value:?}: duration too long"))
}

fn parse_limit(value: Option<&str>) -> ApiResult<usize> {
    let Some(value) = value.filter(|v| !v.is_empty()) else {
        return Ok(DEFAULT_LIMIT);
    };
    // 0 means "everything" (the CLI's default for `queue list`, so a reconciliation after a
    // crash sees every job); otherwise at most MAX_LIMIT per request.
    match value.parse::<usize>() {
        Ok(n) if n <= MAX_LIMIT => Ok(n),
        _ => Err(ApiError::bad_request(format!("limit {value:?}: expected 0 (all) or a number up to {MAX_LIMIT}"))),
    }
}

fn non_empty(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such endpoint")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed on this endpoint")
}

async fn stats(State(state): State<Arc<HttpState>>) -> ApiResult<Response> {
    let stats = blocking(&state.spool, |s| s.stats()).await?;
    Ok(Json(stats).into_response())
}

#[derive(Debug, Deserialize)]
struct ListParams {
    state: Option<String>,
    limit: Option<String>,
}

async fn list_jobs(
    State(state): State<Arc<HttpState>>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> ApiResult<Response> {
    let Query(params) = params?;
    let job_state = match non_empty(&params.state) {
        Some(s) => Some(s.parse::<JobState>().map_err(ApiError::bad_request)?),
        None => None,
    };
    let limit = parse_limit(params.limit.as_deref())?;
    let jobs = blocking(&state.spool, move |s| s.list(job_state, limit)).await?;
    Ok(Json(jobs).into_response())
}

async fn show_job(State(state): State<Arc<HttpState>>, Path(id): Path<String>) -> ApiResult<Response> {
    let lookup = id.clone();
    match blocking(&state.spool, move |s| s.get(&lookup)).await? {
        Some(job) => Ok(Json(job).into_response()),
        None => Err(ApiError::new(StatusCode::NOT_FOUND, format!("no job {id}"))),
    }
}

async fn raw_job(State(state): State<Arc<HttpState>>, Path(id): Path<String>) -> ApiResult<Response> {
    let lookup = id.clone();
    match blocking(&state.spool, move |s| s.raw(&lookup)).await? {
        Some(bytes) => Ok(([(header::CONTENT_TYPE, "message/rfc822")], bytes).into_response()),
        None => Err(ApiError::new(StatusCode::NOT_FOUND, format!("no job {id}"))),
    }
}

#[derive(Debug, Deserialize)]
struct NextParams {
    mailbox: Option<String>,
    lease: Option<String>,
}

async fn next_job(
    State(state): State<Arc<HttpState>>,
    params: Result<Query<NextParams>, QueryRejection>,
) -> ApiResult<Response> {
    let Query(params) = params?;
    let lease = match non_empty(&params.lease) {
        None => DEFAULT_LEASE_SECS,
        Some(v) => match v.parse::<u64>() {
            Ok(n) if (1..=MAX_LEASE_SECS).contains(&n) => n,
            _ => {
                return Err(ApiError::bad_request(format!("lease {v:?}: expected seconds from 1 to {MAX_LEASE_SECS}")));
            }
        },
    };
    let job = state.spool.lease_next(non_empty(&params.mailbox), Duration::from_secs(lease)).await?;
    Ok(match job {
        Some(job) => Json(job).into_response(),
        None => StatusCode::NO_CONTENT.into_response(),
    })
}

async fn ack_job(State(state): State<Arc<HttpState>>, Path(id): Path<String>) -> ApiResult<Response> {
    Ok(Json(state.spool.ack(&id).await?).into_response())
}

async fn nack_job(State(state): State<Arc<HttpState>>, Path(id): Path<String>) -> ApiResult<Response> {
    Ok(Json(state.spool.nack(&id).await?).into_response())
}

async fn retry_job(State(state): State<Arc<HttpState>>, Path(id): Path<String>) -> ApiResult<Response> {
    Ok(Json(state.spool.retry(&id).await?).into_response())
}

#[derive(Debug, Deserialize)]
struct RetryParams {
    mailbox: Option<String>,
}

async fn retry_all(
    State(state): State<Arc<HttpState>>,
    params: Result<Query<RetryParams>, QueryRejection>,
) -> ApiResult<Response> {
    let Query(params) = params?;
    let retried = state.spool.retry_all(non_empty(&params.mailbox)).await?;
    Ok(Json(json!({ "retried": retried })).into_response())
}

async fn metrics(State(state): State<Arc<HttpState>>) -> ApiResult<Response> {
    let snapshot = blocking(&state.spool, |s| {
        let stats = s.stats()?;
        let mut depth = Vec::new();
        for (mailbox, d) in s.depth() {
            for (name, n) in
                [("ready", d.ready), ("waiting", d.waiting), ("leased", d.leased), ("done", d.done), ("dead", d.dead)]
            {
                depth.push((mailbox.clone(), name.to_string(), n));
            }
        }
        depth.sort();
        let oldest_ready_age_seconds =
            stats.oldest_ready.map(|t| (OffsetDateTime::now_utc() - t).as_seconds_f64().max(0.0));
        Ok(crate::metrics::QueueSnapshot { depth, oldest_ready_age_seconds, rejects_stored: stats.rejects })
    })
    .await?;
    let body = crate::metrics::global().render(&snapshot);
    Ok(([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], body).into_response())
}

#[derive(Debug, Deserialize)]
struct RejectParams {
    since: Option<String>,
    reason: Option<String>,
    after: Option<String>,
    limit: Option<String>,
}

async fn rejects(
    State(state): State<Arc<HttpState>>,
    params: Result<Query<RejectParams>, QueryRejection>,
) -> ApiResult<Response> {
    let Query(params) = params?;
    let since = match non_empty(&params.since) {
        Some(v) => Some(parse_since(v, OffsetDateTime::now_utc()).map_err(ApiError::bad_request)?),
        None => None,
    };
    let reason = match non_empty(&params.reason) {
        Some(v) => Some(v.parse::<Reason>().map_err(ApiError::bad_request)?),
        None => None,
    };
    let query = RejectQuery {
        since,
        reason,
        after: non_empty(&params.after).map(str::to_string),
        limit: parse_limit(params.limit.as_deref())?,
    };
    let records = blocking(&state.spool, move |s| s.rejects(&query)).await.map_err(|e| match e.status {
        // The spool's only NotFound here is an unusable cursor: the client's mistake.
        StatusCode::NOT_FOUND => ApiError::bad_request(format!("after: {}", e.message)),
        _ => e,
    })?;
    Ok(Json(records).into_response())
}

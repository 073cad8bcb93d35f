//! What the HTTP receivers (mailroom, webhook) share: the client and reading an answer.

use std::time::Duration;

use super::outcome::{Failure, http_status};
use crate::config::DeliverKind;

/// At most this much of an error answer's body goes into `last_error`.
const DETAIL_MAX: usize = 200;

/// One client (connection pool) per `[[deliver]]` entry. Redirects are not followed: a
/// receiver that moved is a configuration problem, reported as a retryable failure.
pub fn client(timeout: Duration, concurrency: usize) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(concurrency)
        .user_agent(concat!("mailgate/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// Sends `request` and turns the answer into an outcome.
pub async fn send(kind: DeliverKind, request: reqwest::RequestBuilder) -> Result<(), Failure> {
    let response = request.send().await.map_err(|e| Failure::Retry(describe(&e)))?;
    let status = response.status().as_u16();
    if (200..300).contains(&status) {
        return Ok(());
    }
    let detail = match response.text().await {
        Ok(text) => shorten(text.trim()),
        Err(_) => String::new(),
    };
    http_status(kind, status, &detail)
}

/// A transport error in one line: connection refused, timed out, TLS...
fn describe(e: &reqwest::Error) -> String {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else if e.is_redirect() {
        "redirect"
    } else {
        "request failed"
    };
    let mut text = format!("{what}: {e}");
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

fn shorten(text: &str) -> String {
    let mut cut = text.len().min(DETAIL_MAX);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    text[..cut].chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
}

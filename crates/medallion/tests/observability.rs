//! deploy/prometheus and deploy/grafana against the code: every metric a dashboard, recording
//! rule or alert rule names is exported by the running pipeline, every metric DESIGN.md §5
//! requires is on a dashboard, promtool accepts the files, and a real Prometheus scraping the
//! local pipeline returns the lag and the recording rules.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// DESIGN.md §5's required metrics.
const REQUIRED: [&str; 9] = [
    "kafka_consumer_lag",
    "kafka_messages_in_total",
    "kafka_bytes_in_total",
    "schema_registry_schemas_total",
    "medallion_records_out_total",
    "medallion_dlq_records_total",
    "medallion_retries_total",
    "medallion_batch_duration_seconds",
    "medallion_event_to_output_latency_seconds",
];

/// Metric names in a PromQL expression (ours all start with one of these prefixes).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c.is_ascii_alphabetic() || c == b'_' {
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                i += 1;
            }
            let word = &expr[start..i];
            let in_label_value = start > 0 && bytes[start - 1] == b'"';
            if !in_label_value
                && ["kafka_", "medallion_", "schema_registry_"]
                    .iter()
                    .any(|p| word.starts_with(p))
            {
                let base = word
                    .strip_suffix("_bucket")
                    .or_else(|| word.strip_suffix("_count"))
                    .or_else(|| word.strip_suffix("_sum"))
                    .unwrap_or(word);
                out.insert(base.to_string());
            }
        } else {
            i += 1;
        }
    }
    out
}

fn dashboard_exprs() -> Vec<String> {
    let mut out = Vec::new();
    for name in ["pipeline-overview.json", "worker.json"] {
        let path = root().join("deploy/grafana/dashboards").join(name);
        let text = std::fs::read_to_string(&path).expect("dashboard");
        let json: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
        for panel in json["panels"].as_array().expect("panels") {
            for target in panel["targets"].as_array().expect("targets") {
                out.push(target["expr"].as_str().expect("expr").to_string());
            }
        }
    }
    out
}

/// (recording rule name → expr, alert expressions).
fn rules() -> (BTreeMap<String, String>, Vec<String>) {
    let mut records = BTreeMap::new();
    let mut alerts = Vec::new();
    for name in ["recording.yml", "alerts.yml"] {
        let text = std::fs::read_to_string(root().join("deploy/prometheus/rules").join(name))
            .expect("rules");
        let yaml: serde_json::Value = serde_yaml_ng::from_str(&text).expect("rules are YAML");
        for group in yaml["groups"].as_array().expect("groups") {
            for rule in group["rules"].as_array().expect("rules") {
                let expr = rule["expr"].as_str().expect("expr").to_string();
                match rule["record"].as_str() {
                    Some(record) => {
                        records.insert(record.to_string(), expr);
                    }
                    None => alerts.push(expr),
                }
            }
        }
    }
    (records, alerts)
}

fn need(tool: &str) -> PathBuf {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .expect("sh");
    assert!(
        found.status.success(),
        "{tool} is not installed: `apt-get install prometheus` (.ci/run does)"
    );
    PathBuf::from(String::from_utf8_lossy(&found.stdout).trim())
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    medallion_tests::free_port().expect("a free port")
}

/// A plain HTTP/1.0 GET of `http://host:port/path`; the body of a 200 answer.
fn get(url: &str) -> Option<String> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    let mut stream = std::net::TcpStream::connect(host).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    let (head, body) = answer.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200")
        .then(|| body.to_string())
        .or_else(|| head.starts_with("HTTP/1.0 200").then(|| body.to_string()))
}

#[test]
fn promtool_accepts_the_prometheus_files() {
    let promtool = need("promtool");
    let dir = root().join("deploy/prometheus");
    let rules = Command::new(&promtool)
        .arg("check")
        .arg("rules")
        .arg(dir.join("rules/recording.yml"))
        .arg(dir.join("rules/alerts.yml"))
        .output()
        .expect("promtool");
    assert!(
        rules.status.success(),
        "{}",
        String::from_utf8_lossy(&rules.stdout)
    );
    let config = Command::new(&promtool)
        .arg("check")
        .arg("config")
        .arg(dir.join("prometheus.yml"))
        .output()
        .expect("promtool");
    assert!(
        config.status.success(),
        "{}{}",
        String::from_utf8_lossy(&config.stdout),
        String::from_utf8_lossy(&config.stderr)
    );
}

#[test]
fn dashboards_and_rules_match_the_metrics_of_the_running_pipeline() {
    let prometheus = need("prometheus");
    let (records, alerts) = rules();
    let dashboards = dashboard_exprs();

    // Every required metric is on a dashboard, directly or through a recording rule.
    let mut on_dashboards = BTreeSet::new();
    for expr in &dashboards {
        for name in metric_names(expr) {
            if let Some(source) = records.get(&name) {
                on_dashboards.extend(metric_names(source));
            }
            on_dashboards.insert(name);
        }
    }
    for required in REQUIRED {
        assert!(
            on_dashboards.contains(required),
            "{required} is on no dashboard"
        );
    }

    // The local pipeline, left serving its metrics.
    let metrics_port = free_port();
    let store = std::env::temp_dir().join(format!("medallion-obs-{}", std::process::id()));
    let mut demo = Command::new(env!("CARGO_BIN_EXE_medallion"))
        .args([
            "demo",
            "--events",
            "4000",
            "--keep-running",
            "--metrics-listen",
        ])
        .arg(format!("127.0.0.1:{metrics_port}"))
        .arg("--audit-store")
        .arg(&store)
        .env("MEDALLION_HOME", root())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("demo starts");
    let stdout = demo.stdout.take().expect("stdout");
    let demo = Killed(demo);
    let mut lines = BufReader::new(stdout).lines();
    let mut seen = String::new();
    loop {
        let line = lines
            .next()
            .and_then(Result::ok)
            .unwrap_or_else(|| panic!("demo ended:\n{seen}"));
        seen.push_str(&line);
        seen.push('\n');
        if line.starts_with("serving the final metrics") {
            break;
        }
    }
    let scrape = get(&format!("http://127.0.0.1:{metrics_port}/metrics")).expect("scrape");
    let exported: BTreeSet<String> = scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .flat_map(|l| metric_names(l.split(['{', ' ']).next().unwrap_or_default()))
        .collect();
    let mut referenced = BTreeSet::new();
    for expr in dashboards.iter().chain(records.values()).chain(&alerts) {
        referenced.extend(metric_names(expr));
    }
    for name in &referenced {
        assert!(
            exported.contains(name) || records.contains_key(name),
            "{name} is queried but not exported by the pipeline (exported: {exported:?})"
        );
    }
    for name in medallion_runtime::metrics::ALL {
        assert!(
            exported.contains(name),
            "{name} is declared but not exported"
        );
    }

    // A real Prometheus scrapes it and evaluates the rules.
    let dir = std::env::temp_dir().join(format!("medallion-prom-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let rules_dir = root().join("deploy/prometheus/rules");
    let config = format!(
        "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\nrule_files: [\"{}\", \"{}\"]\nscrape_configs:\n  - job_name: medallion\n    static_configs: [{{ targets: [\"127.0.0.1:{metrics_port}\"] }}]\n",
        rules_dir.join("recording.yml").display(),
        rules_dir.join("alerts.yml").display()
    );
    std::fs::write(dir.join("prometheus.yml"), config).expect("config");
    let web = free_port();
    let prom = Killed(
        Command::new(prometheus)
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{web}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus starts"),
    );
    let query = |q: &str| -> usize {
        let url = format!(
            "http://127.0.0.1:{web}/api/v1/query?query={}",
            q.replace(' ', "%20")
        );
        get(&url)
            .and_then(|body| serde_json::from_str::<serde_json::Value>(&body).ok())
            .and_then(|v| v["data"]["result"].as_array().map(Vec::len))
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    let wanted = [
        "kafka_consumer_lag",
        "kafka_messages_in_per_sec",
        "kafka_bytes_in_per_sec",
        "medallion_consumer_lag_by_group",
    ];
    let mut missing: Vec<&str> = wanted.to_vec();
    while !missing.is_empty() && Instant::now() < deadline {
        missing.retain(|q| query(q) == 0);
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        missing.is_empty(),
        "no series from Prometheus for {missing:?}"
    );
    // The lag series carry the labels the dashboards group by.
    assert!(
        query("kafka_consumer_lag{group=\"bronze-processor\",topic=\"connector.data.raw\"}") > 0
    );
    let rules_loaded = get(&format!("http://127.0.0.1:{web}/api/v1/rules")).unwrap_or_default();
    assert!(
        rules_loaded.contains("MedallionConsumerLagGrowing"),
        "{rules_loaded}"
    );
    assert!(
        !rules_loaded.contains("\"health\":\"err\""),
        "{rules_loaded}"
    );
    drop(prom);
    drop(demo);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&store);
}

#[test]
fn metric_names_are_read_out_of_promql() {
    let names = metric_names(
        "histogram_quantile(0.99, sum by (le) (rate(medallion_batch_duration_seconds_bucket{stage=\"kafka_x\"}[5m])))",
    );
    assert_eq!(
        names,
        BTreeSet::from(["medallion_batch_duration_seconds".to_string()])
    );
}

//! deploy/k8s and deploy/docker against the code: the kustomize overlays build, and what they
//! produce names the real binaries, ports, probe paths, topics and partition counts, and
//! configuration files the workers accept.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use medallion_contracts::TopicConfig;
use medallion_runtime::config::WorkerConfig;
use serde_json::Value as Json;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn kustomize(overlay: &str) -> Vec<Json> {
    let out = Command::new("kubectl")
        .args(["kustomize"])
        .arg(root().join("deploy/k8s/overlays").join(overlay))
        .output()
        .unwrap_or_else(|e| {
            panic!("kubectl is needed (apt-get install kubernetes-client; .ci/run does): {e}")
        });
    assert!(
        out.status.success(),
        "kubectl kustomize {overlay}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| serde::Deserialize::deserialize(doc).expect("a YAML document"))
        .collect()
}

fn of_kind<'a>(docs: &'a [Json], kind: &str) -> BTreeMap<String, &'a Json> {
    docs.iter()
        .filter(|d| d["kind"] == kind)
        .map(|d| {
            (
                d["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                d,
            )
        })
        .collect()
}

fn topics() -> TopicConfig {
    TopicConfig::load(&root().join("topic-config.yaml")).expect("topic-config.yaml")
}

/// Each worker config in the ConfigMap is accepted by the worker's own config type.
/// Loads `text` as `group`'s config; returns its `state.dir`.
fn check_worker_config(group: &str, text: &str) -> Option<PathBuf> {
    let path = std::env::temp_dir().join(format!(
        "medallion-deploy-{group}-{}.yaml",
        std::process::id()
    ));
    std::fs::write(&path, text).expect("write");
    use medallion_stages::*;
    let state = |c: &medallion_runtime::config::StateConfig| c.dir.clone();
    let loaded = match group {
        "bronze-processor" => WorkerConfig::<bronze::BronzeConfig>::load(Some(&path))
            .map(|c| (c.http.listen, state(&c.state))),
        "silver-processor" => WorkerConfig::<silver::SilverConfig>::load(Some(&path))
            .map(|c| (c.http.listen, state(&c.state))),
        "gold-processor" => WorkerConfig::<gold::GoldConfig>::load(Some(&path))
            .map(|c| (c.http.listen, state(&c.state))),
        "rule-evaluator" => WorkerConfig::<rules::RulesConfig>::load(Some(&path))
            .map(|c| (c.http.listen, state(&c.state))),
        "notification-sender" => WorkerConfig::<notify::NotifyConfig>::load(Some(&path))
            .map(|c| (c.http.listen, state(&c.state))),
        "audit-writer" => WorkerConfig::<audit_writer::AuditWriterConfig>::load(Some(&path))
            .map(|c| (c.http.listen, state(&c.state))),
        "realtime-gateway" => WorkerConfig::<gateway::GatewayConfig>::load(Some(&path))
            .map(|c| (c.http.listen, state(&c.state))),
        other => panic!("no config type for {other}"),
    };
    let _ = std::fs::remove_file(&path);
    let (listen, state_dir) =
        loaded.unwrap_or_else(|e| panic!("{group}'s config is rejected: {e}"));
    assert_eq!(listen.port(), 9464, "{group}");
    state_dir
}

/// A group that reads only outside the group (the realtime gateway): every replica reads
/// every partition, so it scales on CPU, keeps no state, serves clients on a port of its own
/// and signs cursors with a key from a Secret.
fn check_reader_outside_its_group(
    overlay: &str,
    group: &str,
    deployment: &Json,
    docs: &[Json],
    config_maps: &[&Json],
) {
    let c = &deployment["spec"]["template"]["spec"]["containers"][0];
    let scaler = of_kind(docs, "HorizontalPodAutoscaler");
    let hpa = scaler
        .get(group)
        .unwrap_or_else(|| panic!("{overlay} {group}: no HorizontalPodAutoscaler"));
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], group);
    assert!(
        !of_kind(docs, "ScaledObject").contains_key(group),
        "{group}: no lag scaler"
    );
    let key = format!("{group}.yaml");
    let text = config_maps
        .iter()
        .find_map(|m| m["data"][&key].as_str())
        .unwrap_or_else(|| panic!("{overlay}: no {key} in a ConfigMap"));
    assert_eq!(check_worker_config(group, text), None, "{group}: no state");
    let path =
        std::env::temp_dir().join(format!("medallion-deploy-gw-{}.yaml", std::process::id()));
    std::fs::write(&path, text).expect("write");
    let config = WorkerConfig::<medallion_stages::gateway::GatewayConfig>::load(Some(&path))
        .expect("the gateway's config");
    let _ = std::fs::remove_file(&path);
    let api = c["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .find(|p| p["name"] == "api")
        .unwrap_or_else(|| panic!("{group}: no api port"));
    assert_eq!(api["containerPort"], config.stage.listen.port(), "{group}");
    let services = of_kind(docs, "Service");
    let service = services
        .get(group)
        .unwrap_or_else(|| panic!("{group}: no client Service"));
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "api");
    let cursor_key = c["env"]
        .as_array()
        .expect("env")
        .iter()
        .find(|e| e["name"] == "MEDALLION__STAGE__CURSOR_KEY")
        .unwrap_or_else(|| panic!("{group}: no cursor key"));
    let secret = cursor_key["valueFrom"]["secretKeyRef"]["name"]
        .as_str()
        .expect("from a Secret");
    if overlay == "local" {
        assert!(
            of_kind(docs, "Secret")
                .keys()
                .any(|k| k.starts_with(secret)),
            "{secret} is generated locally"
        );
    }
    assert_eq!(instance_id(c), None, "{group}: no group membership");
}

/// Where a container's `MEDALLION__KAFKA__INSTANCE_ID` comes from (a field of the pod), if set.
fn instance_id(container: &Json) -> Option<&str> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == "MEDALLION__KAFKA__INSTANCE_ID")
        .map(|e| {
            e["valueFrom"]["fieldRef"]["fieldPath"]
                .as_str()
                .unwrap_or("not from a pod field")
        })
}

/// The groups that keep state in the local store: StatefulSets with a volume of their own.
const STATEFUL: [&str; 2] = ["silver-processor", "notification-sender"];

#[test]
fn the_overlays_build_and_match_the_workers() {
    let topics = topics();
    let binaries = std::fs::read_to_string(root().join("crates/medallion-stages/Cargo.toml"))
        .expect("Cargo.toml");
    let http = std::fs::read_to_string(root().join("crates/medallion-runtime/src/http.rs"))
        .expect("http.rs");
    let default_port = WorkerConfig::<()>::default().http.listen.port();
    for overlay in ["local", "production"] {
        let docs = kustomize(overlay);
        let mut deployments = of_kind(&docs, "Deployment");
        let stateful_sets = of_kind(&docs, "StatefulSet");
        assert_eq!(
            stateful_sets.keys().map(String::as_str).collect::<Vec<_>>(),
            STATEFUL
                .iter()
                .copied()
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect::<Vec<_>>(),
            "{overlay}: the stateful groups run as StatefulSets"
        );
        deployments.extend(stateful_sets.iter().map(|(k, v)| (k.clone(), *v)));
        let services = of_kind(&docs, "Service");
        let budgets = of_kind(&docs, "PodDisruptionBudget");
        let scalers = of_kind(&docs, "ScaledObject");
        let config_maps: Vec<&Json> = docs.iter().filter(|d| d["kind"] == "ConfigMap").collect();
        assert_eq!(
            deployments.len(),
            topics.consumer_groups.len(),
            "{overlay}: one Deployment or StatefulSet per group"
        );
        assert_eq!(of_kind(&docs, "ServiceMonitor").len(), 1);
        for (group, spec) in &topics.consumer_groups {
            let d = deployments
                .get(group)
                .unwrap_or_else(|| panic!("{overlay}: no Deployment {group}"));
            let pod = &d["spec"]["template"]["spec"];
            let c = &pod["containers"][0];
            assert_eq!(
                c["command"][0],
                format!("/usr/local/bin/{group}"),
                "{group}"
            );
            assert!(
                binaries.contains(&format!("name = \"{group}\"")),
                "{group} is not a binary of the workspace"
            );
            assert_eq!(c["ports"][0]["containerPort"], default_port, "{group}");
            assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
            assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
            for path in ["/healthz", "/readyz", "/metrics"] {
                assert!(
                    http.contains(&format!(".route(\"{path}\"")),
                    "the worker serves no {path}"
                );
            }
            for bound in ["requests", "limits"] {
                assert!(
                    c["resources"][bound]["cpu"].is_string()
                        && c["resources"][bound]["memory"].is_string(),
                    "{group} {bound}"
                );
            }
            assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{group}");
            assert_eq!(
                c["securityContext"]["allowPrivilegeEscalation"], false,
                "{group}"
            );
            assert_eq!(
                c["securityContext"]["readOnlyRootFilesystem"], true,
                "{group}"
            );
            assert!(
                budgets.contains_key(group),
                "{group} has no PodDisruptionBudget"
            );
            let service = services
                .get(&format!("{group}-metrics"))
                .unwrap_or_else(|| panic!("{group}: no metrics Service"));
            assert_eq!(service["spec"]["ports"][0]["port"], default_port);
            if spec.consumes.is_empty() {
                check_reader_outside_its_group(overlay, group, d, &docs, &config_maps);
                continue;
            }
            // Lag-based autoscaling, never beyond the partitions of the consumed topic.
            let scaler = scalers
                .get(group)
                .unwrap_or_else(|| panic!("{group}: no ScaledObject"));
            let input = &spec.consumes[0];
            let partitions = topics.topic(input).expect("declared").partitions;
            let max = scaler["spec"]["maxReplicaCount"].as_u64().expect("max");
            assert!(
                max >= 1 && max <= u64::from(partitions),
                "{overlay} {group}: {max} > {partitions}"
            );
            if overlay == "production" {
                assert_eq!(
                    max,
                    u64::from(partitions),
                    "{group}: scale to every partition"
                );
            }
            let query = scaler["spec"]["triggers"][0]["metadata"]["query"]
                .as_str()
                .expect("query");
            assert!(
                query.contains("kafka_consumer_lag")
                    && query.contains(&format!("group=\"{group}\"")),
                "{query}"
            );
            // The worker's config file is one its config type accepts.
            let key = format!("{group}.yaml");
            let text = config_maps
                .iter()
                .find_map(|m| m["data"][&key].as_str())
                .unwrap_or_else(|| panic!("{overlay}: no {key} in a ConfigMap"));
            // Every worker has a state directory (a store, or only its dedup windows'
            // copies), mounted where its config puts it.
            let dir =
                check_worker_config(group, text).unwrap_or_else(|| panic!("{group}: no state.dir"));
            let mount = c["volumeMounts"]
                .as_array()
                .expect("mounts")
                .iter()
                .find(|m| m["mountPath"].as_str() == dir.to_str())
                .unwrap_or_else(|| panic!("{group}: nothing mounted at {}", dir.display()));
            if STATEFUL.contains(&group.as_str()) {
                // The store on the pod's own volume.
                let claims = d["spec"]["volumeClaimTemplates"]
                    .as_array()
                    .expect("volumeClaimTemplates");
                assert!(
                    claims.iter().any(|t| t["metadata"]["name"] == mount["name"]
                        && t["spec"]["resources"]["requests"]["storage"].is_string()),
                    "{group}: the state volume is not a claim of its own"
                );
                assert_eq!(
                    d["spec"]["serviceName"],
                    format!("{group}-metrics"),
                    "{group}: governing Service"
                );
                assert_eq!(scaler["spec"]["scaleTargetRef"]["kind"], "StatefulSet");
                // Static membership under the pod's stable name: a restarted replica gets
                // its partitions (and its disk's state) back without a rebalance.
                assert_eq!(
                    instance_id(c),
                    Some("metadata.name"),
                    "{group}: kafka.instance_id from the pod's name"
                );
            } else {
                // No store: only the dedup windows' copies, on an emptyDir, so a container's
                // restart (an OOM kill, a failed liveness probe) takes them back instead of
                // reading its partitions' last records again; a new pod starts without them.
                let volume = pod["volumes"]
                    .as_array()
                    .expect("volumes")
                    .iter()
                    .find(|v| v["name"] == mount["name"])
                    .unwrap_or_else(|| panic!("{group}: no volume {}", mount["name"]));
                assert!(
                    volume["emptyDir"].is_object(),
                    "{group}: the state directory is an emptyDir: {volume}"
                );
                // A Deployment's pods get new names: their old ids would hold partitions
                // until their sessions expired.
                assert_eq!(instance_id(c), None, "{group}: dynamic membership");
            }
        }
        // topic-config.yaml in the ConfigMap is the repository's.
        let shipped = config_maps
            .iter()
            .find_map(|m| m["data"]["topic-config.yaml"].as_str())
            .expect("topic-config.yaml ConfigMap");
        let repo =
            std::fs::read_to_string(root().join("topic-config.yaml")).expect("topic-config.yaml");
        assert_eq!(
            shipped, repo,
            "deploy/k8s/base/topic-config.yaml differs from topic-config.yaml: copy it"
        );
    }
    // Local secrets the Deployments reference exist; production takes them from the cluster.
    let local = kustomize("local");
    let secrets = of_kind(&local, "Secret");
    assert!(secrets.keys().any(|k| k.starts_with("medallion-pii-keys")));
    assert!(secrets.keys().any(|k| k.starts_with("medallion-webhooks")));
}

#[test]
fn the_container_build_ships_every_worker_as_a_non_root_user() {
    let dockerfile =
        std::fs::read_to_string(root().join("deploy/docker/Dockerfile")).expect("Dockerfile");
    let topics = topics();
    for group in topics
        .consumer_groups
        .keys()
        .chain(std::iter::once(&"medallion".to_string()))
    {
        assert!(
            dockerfile.contains(&format!("--bin {group}")),
            "{group} is not built"
        );
        assert!(
            dockerfile.contains(&format!("target/release/{group}")),
            "{group} is not copied"
        );
    }
    assert!(dockerfile.contains("EXPOSE 9464"));
    assert!(dockerfile.contains("USER 10001"));
    assert!(
        dockerfile.contains("FROM rust:1.95"),
        "the build uses the project's toolchain"
    );
}

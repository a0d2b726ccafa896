//! A deterministic generator of realistic `connector.data.raw` events across several orgs, for
//! the local mode, tests and benchmarks: the release, case and lead feeds, or every feed of
//! the catalog ([`SampleEvents::every_feed`]).

use serde_json::{json, Value as Json};

/// SplitMix64: small, fast, deterministic; no cryptographic use.
#[derive(Debug, Clone)]
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    pub fn uuid(&mut self) -> String {
        let a = self.next_u64();
        let b = self.next_u64();
        format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            0x8000 | (b >> 48) & 0x3fff,
            b & 0xffff_ffff_ffff
        )
    }
}

/// Generates connector events. Entity ids are scoped by org, as a system of record's ids are:
/// one id under two orgs is refused (`tenant_mismatch`).
#[derive(Debug, Clone)]
pub struct SampleEvents {
    rng: SplitMix,
    orgs: Vec<i64>,
    clock_ms: i64,
    /// How many of [`FEEDS`] are drawn from (the first three, or all).
    kinds: u64,
}

/// The event types, in the order the generator draws them.
pub const FEEDS: [&str; 8] = [
    "release.sync.created",
    "case.sync.v1",
    "lead.created",
    "alert.sync.v1",
    "invoice.generated",
    "payment.processed",
    "task.completed",
    "threat.detected",
];

/// The payload branch of each of [`FEEDS`].
pub const BRANCHES: [&str; 8] = [
    "release_sync",
    "case_sync",
    "lead_created",
    "alert_sync",
    "invoice_generated",
    "payment_processed",
    "task_completed",
    "threat_detected",
];

const STATUSES: [&str; 3] = ["Open", "Resolved", "Deleted"];
const ENDPOINTS: [&str; 6] = ["eks", "lambda", "gke", "fargate", "iot", "mission_asset"];

impl SampleEvents {
    /// `orgs` tenants, event time starting at `start_ms` and advancing ~100 ms per event.
    pub fn new(seed: u64, orgs: usize, start_ms: i64) -> Self {
        Self {
            rng: SplitMix::new(seed),
            orgs: (0..orgs.max(1) as i64).map(|i| 100 + i * 111).collect(),
            clock_ms: start_ms,
            kinds: 3,
        }
    }

    /// Like [`SampleEvents::new`], drawing from every feed (the benchmarks keep the first three,
    /// so their figures stay comparable).
    pub fn every_feed(seed: u64, orgs: usize, start_ms: i64) -> Self {
        Self {
            kinds: FEEDS.len() as u64,
            ..Self::new(seed, orgs, start_ms)
        }
    }

    /// The next event as JSON (the connector schema's JSON form).
    pub fn next_event(&mut self) -> Json {
        self.clock_ms += 1 + self.rng.below(200) as i64;
        let org = self.orgs[self.rng.below(self.orgs.len() as u64) as usize];
        let id = self.rng.uuid();
        let t = self.clock_ms;
        let kind = self.rng.below(self.kinds) as usize;
        let (branch, classification, source_system, measurements) = match kind {
            0 => {
                let n = self.rng.below(40);
                let release = json!({
                    "event_time": t, "synced_at": t - 5_000,
                    "release": {"name": format!("org-{org}/service-{}", n % 7), "version": format!(" v1.{}.{} ", n % 5, n),
                                "projecttype": "docker", "gitcommit": format!("{:07x}", self.rng.below(1 << 28)),
                                "dockersha": null, "is_public": !n.is_multiple_of(3)},
                    "sbom_ref": {"cid": format!("Qm{:040x}", self.rng.next_u64()), "storage_type": if n.is_multiple_of(2) { "ipfs" } else { "S3" },
                                 "content_sha": null, "uploaded_at": t - 10_000},
                    "endpoint": {"name": format!("prod-cluster-{:02}", n % 4), "endpoint_type": ENDPOINTS[(n % 6) as usize],
                                 "environment": if n.is_multiple_of(4) { "Staging" } else { "production" }, "is_public": true}
                });
                (
                    release,
                    "internal",
                    "pdvd",
                    json!([{"name": "release.deployments", "value": 1.0, "unit": "count"}]),
                )
            }
            1 => {
                let severity = 1 + self.rng.below(4) as i64;
                let case_no = self.rng.below(500);
                let case = json!({
                    "case_id": format!("CASE-{org}-{case_no}"), "title": format!("  Case {case_no} on host-{} ", case_no % 13),
                    "description": null, "severity": severity, "status": STATUSES[self.rng.below(3) as usize],
                    "owner": if case_no % 50 == 7 { String::from(" ") } else { format!("analyst-{}", case_no % 9) }, "flag": case_no.is_multiple_of(5), "tlp": (case_no % 4) as i64,
                    "pap": (case_no % 3) as i64, "created_at": t - 3_600_000, "updated_at": t - self.rng.below(60_000) as i64,
                    "custom_fields": {"region": "eu-west-1"}
                });
                (
                    case,
                    "confidential",
                    "v4",
                    json!([{"name": "case.severity", "value": severity as f64, "unit": null}]),
                )
            }
            2 => {
                let n = self.rng.next_u64();
                let lead = json!({
                    "lead_id": self.rng.uuid(), "name": format!("Lead {}", n % 10_000),
                    "email": format!("lead{}@example.com", n % 10_000), "source": "marketing",
                    "assigned_to": null, "created_at": t
                });
                (lead, "restricted", "crm", json!([]))
            }
            3 => {
                let n = self.rng.below(300);
                let alert = json!({
                    "alert_id": format!("alert-{org}-{n}"), "title": format!(" Suspicious activity {} ", n % 17),
                    "type": (["Phishing", "malware", "Login"][(n % 3) as usize]), "source": "SIEM",
                    "sourceRef": format!("siem-{}", n * 7), "status": ALERT_STATUSES[self.rng.below(4) as usize],
                    "created_at": t - 600_000, "updated_at": t - self.rng.below(60_000) as i64
                });
                (alert, "confidential", "v4", json!([]))
            }
            4 => {
                let n = self.rng.below(10_000);
                let invoice = json!({
                    "invoice_id": format!("inv-{org}-{n:05}"), "amount": (50 + n % 5_000) as f64 + 0.5,
                    "currency": (["usd", "EUR", " gbp "][(n % 3) as usize]), "status": (["Pending", "PAID", "overdue"][(n % 3) as usize]),
                    "issued_by": format!("user-{}", n % 40), "issued_at": t
                });
                (invoice, "confidential", "erp", json!([]))
            }
            5 => {
                let n = self.rng.below(10_000);
                let payment = json!({
                    "payment_id": format!("pay-{org}-{n:05}"), "invoice_id": format!("INV-{org}-{n:05}"),
                    "amount": (50 + n % 5_000) as f64 + 0.5, "currency": "USD",
                    "status": if n.is_multiple_of(10) { "failed" } else { "succeeded" },
                    "method": if n.is_multiple_of(2) { "Card" } else { "transfer" }, "processed_at": t
                });
                (payment, "confidential", "erp", json!([]))
            }
            6 => {
                let task = json!({
                    "workflow_id": format!("wfl-{org}-{}", self.rng.below(50)), "task_id": self.rng.uuid(),
                    "user_id": self.rng.uuid(), "status": "completed", "completed_at": t
                });
                (task, "internal", "workflow", json!([]))
            }
            _ => {
                let threat = json!({
                    "alert_id": self.rng.uuid(), "severity": THREAT_SEVERITIES[self.rng.below(4) as usize],
                    "source_system": " Endpoint-Agent ", "description": "Unusual data exfiltration pattern",
                    "detected_at": t
                });
                (threat, "restricted", "inosec", json!([]))
            }
        };
        let event_type = FEEDS[kind];
        let mut payload = serde_json::Map::new();
        payload.insert(
            "connector_id".into(),
            json!(format!(
                "{}-connector",
                event_type.split('.').next().unwrap_or("generic")
            )),
        );
        payload.insert("source_system".into(), json!(source_system));
        for (i, name) in BRANCHES.iter().enumerate() {
            let value = if i == kind {
                branch.clone()
            } else {
                Json::Null
            };
            payload.insert((*name).into(), value);
        }
        payload.insert("measurements".into(), measurements);
        payload.insert("attributes".into(), json!({}));
        json!({
            "event_id": id, "event_type": event_type, "event_version": "1.0.0", "timestamp": t,
            "source": {"service": "connector-service", "instance": format!("connector-{}", org % 3)},
            "correlation_id": id, "org_id": org, "trace_id": null, "classification": classification,
            "payload": payload
        })
    }
}

const ALERT_STATUSES: [&str; 4] = ["New", "updated", "IGNORED", "Imported"];
const THREAT_SEVERITIES: [&str; 4] = ["low", "Medium", "HIGH", "critical"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_events_fit_the_connector_schema() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas");
        let contracts = crate::ContractSet::load(&root).expect("schemas");
        let raw = contracts.get("connector/data-raw.avsc").expect("raw");
        let mut events = SampleEvents::new(1, 5, 1_735_200_000_000);
        for _ in 0..300 {
            let event = events.next_event();
            crate::json::to_avro_binary(&event, &raw.schema).expect("valid event");
        }
        let mut every = SampleEvents::every_feed(2, 5, 1_735_200_000_000);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..300 {
            let event = every.next_event();
            crate::json::to_avro_binary(&event, &raw.schema).expect("valid event");
            seen.insert(event["event_type"].as_str().map(str::to_string));
        }
        assert_eq!(seen.len(), FEEDS.len(), "every feed drawn: {seen:?}");
        let mut again = SampleEvents::new(1, 5, 1_735_200_000_000);
        let mut first = SampleEvents::new(1, 5, 1_735_200_000_000);
        assert_eq!(again.next_event(), first.next_event(), "deterministic");
    }
}

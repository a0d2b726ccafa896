//! The Schema Registry path, through the real client (`schema_registry_converter`): register
//! every contract under `<topic>-value`, resolve ids to writer schemas, ask the registry's own
//! compatibility endpoint.

use std::collections::{BTreeMap, HashMap};
use std::error::Error as _;
use std::sync::Mutex;
use std::time::Duration;

use schema_registry_converter::async_impl::schema_registry::{
    get_all_subjects, get_schema_by_id, post_schema, SrSettings,
};
use schema_registry_converter::error::SRCError;
use schema_registry_converter::schema_registry_common::{RawError, SchemaType, SuppliedSchema};

use crate::schemas::ContractSet;
use crate::topics::TopicConfig;

/// A registry failure, typed by whether waiting can help.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RegistryError {
    /// Connection refused, timeout, 5xx: transient, retry with backoff.
    #[error("schema registry at {url} is unreachable: {message}")]
    Unreachable { url: String, message: String },
    /// The id or subject does not exist (40403 / 40401): poison for the message that named it.
    #[error("schema registry has no {what}")]
    NotFound { what: String },
    /// 409: the schema is not compatible with the subject's latest version.
    #[error("schema registry rejected {subject} as incompatible: {message}")]
    Incompatible { subject: String, message: String },
    /// Any other refusal (invalid schema, bad request).
    #[error("schema registry refused the request for {what}: {message}")]
    Rejected { what: String, message: String },
    #[error("schema of {topic} is not in the contract set: {path}")]
    MissingContract { topic: String, path: String },
}

impl RegistryError {
    /// Whether a retry with backoff can help.
    pub fn is_transient(&self) -> bool {
        matches!(self, RegistryError::Unreachable { .. })
    }
}

/// A client of a Confluent-compatible registry.
pub struct RegistryClient {
    url: String,
    settings: SrSettings,
    by_id: Mutex<HashMap<u32, String>>,
    http: reqwest::Client,
    /// HTTP basic credentials (Confluent Cloud: API key and secret).
    basic: Option<(String, String)>,
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryClient")
            .field("url", &self.url)
            .finish()
    }
}

impl RegistryClient {
    /// `url` like `http://127.0.0.1:8081`; each call times out after `timeout`.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, RegistryError> {
        Self::with_basic_auth(url, timeout, None)
    }

    /// Like [`RegistryClient::new`], authenticating with HTTP basic `(username, password)`.
    pub fn with_basic_auth(
        url: &str,
        timeout: Duration,
        basic: Option<(String, String)>,
    ) -> Result<Self, RegistryError> {
        let url = url.trim_end_matches('/').to_string();
        let mut builder = SrSettings::new_builder(url.clone());
        builder.set_timeout(timeout).no_proxy();
        if let Some((user, password)) = &basic {
            builder.set_basic_authorization(user, Some(password));
        }
        let settings = builder.build().map_err(|e| RegistryError::Rejected {
            what: format!("client for {url}"),
            message: e.to_string(),
        })?;
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .no_proxy()
            .build()
            .map_err(|e| RegistryError::Rejected {
                what: format!("HTTP client for {url}"),
                message: e.to_string(),
            })?;
        Ok(Self {
            url,
            http,
            settings,
            by_id: Mutex::new(HashMap::new()),
            basic,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn classify(&self, what: &str, subject: Option<&str>, err: SRCError) -> RegistryError {
        let mut source = err.source();
        while let Some(inner) = source {
            if let Some(raw) = inner.downcast_ref::<RawError>() {
                return match raw.error_code {
                    40401 | 40402 | 40403 | 404 => RegistryError::NotFound {
                        what: what.to_string(),
                    },
                    409 | 40901 => RegistryError::Incompatible {
                        subject: subject.unwrap_or(what).to_string(),
                        message: raw.message.clone(),
                    },
                    code if code >= 50000 || (500..600).contains(&code) => {
                        RegistryError::Unreachable {
                            url: self.url.clone(),
                            message: raw.message.clone(),
                        }
                    }
                    _ => RegistryError::Rejected {
                        what: what.to_string(),
                        message: format!("{} (error code {})", raw.message, raw.error_code),
                    },
                };
            }
            if inner.downcast_ref::<reqwest::Error>().is_some() {
                return RegistryError::Unreachable {
                    url: self.url.clone(),
                    message: err.to_string(),
                };
            }
            source = inner.source();
        }
        let text = err.to_string();
        if err.retriable || text.contains("error sending request") {
            RegistryError::Unreachable {
                url: self.url.clone(),
                message: text,
            }
        } else if text.contains("404") {
            RegistryError::NotFound {
                what: what.to_string(),
            }
        } else {
            RegistryError::Rejected {
                what: what.to_string(),
                message: text,
            }
        }
    }

    /// Registers `schema` under `subject`; the same schema always gets the same id.
    pub async fn register(&self, subject: &str, schema: &str) -> Result<u32, RegistryError> {
        let supplied = SuppliedSchema::new(None, SchemaType::Avro, schema.to_string());
        let registered = post_schema(&self.settings, subject.to_string(), supplied)
            .await
            .map_err(|e| self.classify(&format!("subject {subject}"), Some(subject), e))?;
        if let Ok(mut cache) = self.by_id.lock() {
            cache.insert(registered.id, schema.to_string());
        }
        Ok(registered.id)
    }

    /// The schema text registered under `id` (cached: ids are immutable).
    pub async fn schema_by_id(&self, id: u32) -> Result<String, RegistryError> {
        if let Some(schema) = self.by_id.lock().ok().and_then(|c| c.get(&id).cloned()) {
            return Ok(schema);
        }
        let registered = get_schema_by_id(id, &self.settings)
            .await
            .map_err(|e| self.classify(&format!("schema id {id}"), None, e))?;
        if let Ok(mut cache) = self.by_id.lock() {
            cache.insert(id, registered.schema.clone());
        }
        Ok(registered.schema)
    }

    /// The registry's own verdict: can `schema` be registered under `subject`, judged against
    /// its latest version (`POST /compatibility/subjects/{subject}/versions/latest`, the form
    /// every Confluent-compatible registry serves)?
    pub async fn is_compatible(&self, subject: &str, schema: &str) -> Result<bool, RegistryError> {
        let what = format!("subject {subject}");
        let url = format!(
            "{}/compatibility/subjects/{subject}/versions/latest",
            self.url
        );
        let body = serde_json::json!({ "schema": schema, "schemaType": "AVRO" });
        let mut request = self
            .http
            .post(&url)
            .header("Content-Type", "application/vnd.schemaregistry.v1+json")
            .body(body.to_string());
        if let Some((user, password)) = &self.basic {
            request = request.basic_auth(user, Some(password));
        }
        let response = request
            .send()
            .await
            .map_err(|e| RegistryError::Unreachable {
                url: self.url.clone(),
                message: e.to_string(),
            })?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|e| RegistryError::Unreachable {
                url: self.url.clone(),
                message: e.to_string(),
            })?;
        if status.as_u16() == 404 {
            return Err(RegistryError::NotFound { what });
        }
        if status.is_server_error() {
            return Err(RegistryError::Unreachable {
                url: self.url.clone(),
                message: format!("{status}: {text}"),
            });
        }
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| RegistryError::Rejected {
                what: what.clone(),
                message: format!("{status}: {e}: {text}"),
            })?;
        json.get("is_compatible")
            .and_then(serde_json::Value::as_bool)
            .ok_or(RegistryError::Rejected {
                what,
                message: format!("{status}: no is_compatible in {text}"),
            })
    }

    pub async fn subjects(&self) -> Result<Vec<String>, RegistryError> {
        get_all_subjects(&self.settings)
            .await
            .map_err(|e| self.classify("subject list", None, e))
    }

    /// Registers the contract of every topic in `topics` under `<topic>-value`.
    /// Returns topic → schema id.
    pub async fn register_all(
        &self,
        contracts: &ContractSet,
        topics: &TopicConfig,
    ) -> Result<BTreeMap<String, u32>, RegistryError> {
        let mut ids = BTreeMap::new();
        for (topic, spec) in &topics.topics {
            let contract =
                contracts
                    .get(&spec.schema)
                    .ok_or_else(|| RegistryError::MissingContract {
                        topic: topic.clone(),
                        path: spec.schema.clone(),
                    })?;
            let id = self
                .register(&topics.subject(topic), &contract.text)
                .await?;
            ids.insert(topic.clone(), id);
        }
        Ok(ids)
    }
}

//! Personal data (schema fields marked `"pii": true`) is encrypted with
//! AES-256-GCM before it leaves bronze. A value becomes `enc:v1:<key id>:<base64(nonce ‖
//! ciphertext ‖ tag)>`, bound to its field path as associated data. Keys come from config or
//! the environment; the active key encrypts, every configured key decrypts, so a rotation only
//! adds a key and moves `active_key`.

use std::collections::BTreeMap;
use std::sync::Arc;

use aes_gcm::aead::rand_core::RngCore;
use aes_gcm::aead::{Aead, AeadCore, AeadInPlace, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use arrow::array::{Array, ArrayRef, AsArray, RecordBatch, StringBuilder, StructArray};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// Marks an encrypted value.
pub const PREFIX: &str = "enc:v1:";
/// AES-GCM's 96-bit nonce.
const NONCE_LEN: usize = 12;
/// Record header naming the key that encrypted a record's personal data.
pub const KEY_ID_HEADER: &str = "medallion.pii.key_id";

/// Why a key could not be loaded or a value not decrypted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PiiError {
    #[error("pii: {0}")]
    Config(String),
    #[error("pii: value of {field} is not an encrypted value")]
    NotEncrypted { field: String },
    #[error("pii: key `{0}` is not configured")]
    UnknownKey(String),
    #[error("pii: value of {field} does not decrypt with key `{key}` (wrong key or tampered)")]
    Decrypt { field: String, key: String },
    #[error("pii: {0}")]
    Arrow(String),
}

/// The `pii:` section of a config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PiiConfig {
    /// The id of the key that encrypts.
    pub active_key: String,
    /// Every key that may decrypt, by id.
    pub keys: BTreeMap<String, KeySource>,
}

/// Where a key's 32 bytes (base64) come from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeySource {
    /// The environment variable holding the key (the production way: a mounted secret).
    pub env: Option<String>,
    /// The key itself (local runs and tests).
    pub value: Option<String>,
}

/// Loaded keys.
#[derive(Clone)]
pub struct Keyring {
    active: String,
    keys: BTreeMap<String, Arc<Aes256Gcm>>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key material.
        f.debug_struct("Keyring")
            .field("active", &self.active)
            .field("keys", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Keyring {
    /// Keys as raw bytes; each must be 32 bytes (AES-256).
    pub fn new(
        active: &str,
        keys: impl IntoIterator<Item = (String, Vec<u8>)>,
    ) -> Result<Self, PiiError> {
        let mut loaded = BTreeMap::new();
        for (id, bytes) in keys {
            if id.is_empty() || id.contains(':') {
                return Err(PiiError::Config(format!(
                    "key id `{id}` must be non-empty without ':'"
                )));
            }
            let cipher = Aes256Gcm::new_from_slice(&bytes).map_err(|_| {
                PiiError::Config(format!("key `{id}` must be 32 bytes, has {}", bytes.len()))
            })?;
            loaded.insert(id, Arc::new(cipher));
        }
        if !loaded.contains_key(active) {
            return Err(PiiError::Config(format!(
                "active_key `{active}` is not among the configured keys ({})",
                loaded.keys().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        Ok(Self {
            active: active.to_string(),
            keys: loaded,
        })
    }

    /// Loads `config` (`section` names it in errors, e.g. `stage.pii`).
    pub fn from_config(config: &PiiConfig, section: &str) -> Result<Self, PiiError> {
        if config.keys.is_empty() || config.active_key.is_empty() {
            return Err(PiiError::Config(format!(
                "{section}: no encryption key configured; set {section}.active_key and {section}.keys.<id>.env naming a variable that holds a base64 32-byte key"
            )));
        }
        let mut keys = Vec::new();
        for (id, source) in &config.keys {
            let text = match (&source.env, &source.value) {
                (Some(var), None) => std::env::var(var).map_err(|_| {
                    PiiError::Config(format!(
                        "{section}.keys.{id}.env: variable {var} is not set"
                    ))
                })?,
                (None, Some(value)) => value.clone(),
                _ => {
                    return Err(PiiError::Config(format!(
                        "{section}.keys.{id}: give exactly one of `env` or `value`"
                    )))
                }
            };
            let bytes = STANDARD
                .decode(text.trim())
                .map_err(|e| PiiError::Config(format!("{section}.keys.{id}: not base64: {e}")))?;
            keys.push((id.clone(), bytes));
        }
        Self::new(&config.active_key, keys).map_err(|e| PiiError::Config(format!("{section}: {e}")))
    }

    /// A fresh random key, base64 (for local runs).
    pub fn generate_key() -> String {
        STANDARD.encode(Aes256Gcm::generate_key(OsRng))
    }

    pub fn active_id(&self) -> &str {
        &self.active
    }

    /// Encrypts `plaintext` of field `field` with the active key.
    pub fn encrypt(&self, field: &str, plaintext: &str) -> Result<String, PiiError> {
        let nonce = Aes256Gcm::generate_nonce(OsRng);
        let mut out = String::new();
        self.seal(
            self.active_cipher()?,
            &nonce,
            field,
            plaintext,
            &mut Vec::new(),
            &mut out,
        )?;
        Ok(out)
    }

    fn active_cipher(&self) -> Result<&Aes256Gcm, PiiError> {
        self.keys
            .get(&self.active)
            .map(|c| c.as_ref())
            .ok_or_else(|| PiiError::UnknownKey(self.active.clone()))
    }

    /// Writes the encrypted form of `plaintext` (by `cipher`, the active key's) to `out`, with
    /// `buf` as scratch space.
    fn seal(
        &self,
        cipher: &Aes256Gcm,
        nonce: &[u8],
        field: &str,
        plaintext: &str,
        buf: &mut Vec<u8>,
        out: &mut String,
    ) -> Result<(), PiiError> {
        buf.clear();
        buf.extend_from_slice(nonce);
        buf.extend_from_slice(plaintext.as_bytes());
        let tag = cipher
            .encrypt_in_place_detached(
                Nonce::from_slice(nonce),
                field.as_bytes(),
                &mut buf[nonce.len()..],
            )
            .map_err(|_| PiiError::Config("encryption failed".into()))?;
        buf.extend_from_slice(&tag);
        out.clear();
        out.push_str(PREFIX);
        out.push_str(&self.active);
        out.push(':');
        STANDARD.encode_string(&buf[..], out);
        Ok(())
    }

    /// Decrypts a value of field `field` with the key it names.
    pub fn decrypt(&self, field: &str, value: &str) -> Result<String, PiiError> {
        let not_encrypted = || PiiError::NotEncrypted {
            field: field.to_string(),
        };
        let (key, body) = value
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split_once(':'))
            .ok_or_else(not_encrypted)?;
        let cipher = self
            .keys
            .get(key)
            .ok_or_else(|| PiiError::UnknownKey(key.to_string()))?;
        let bytes = STANDARD.decode(body).map_err(|_| not_encrypted())?;
        if bytes.len() < NONCE_LEN {
            return Err(not_encrypted());
        }
        let (nonce, sealed) = bytes.split_at(NONCE_LEN);
        let failed = || PiiError::Decrypt {
            field: field.to_string(),
            key: key.to_string(),
        };
        let plain = cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: field.as_bytes(),
                },
            )
            .map_err(|_| failed())?;
        String::from_utf8(plain).map_err(|_| failed())
    }

    /// Encrypts the non-empty strings at each dotted `path` (through struct columns) of
    /// `batch`. Returns the batch and, per row, the paths encrypted in it.
    pub fn encrypt_columns(
        &self,
        batch: &RecordBatch,
        paths: &[String],
    ) -> Result<(RecordBatch, Vec<Vec<String>>), PiiError> {
        let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
        let mut touched: Vec<Vec<String>> = vec![Vec::new(); batch.num_rows()];
        for path in paths {
            let parts: Vec<&str> = path.split('.').collect();
            let Some(index) = parts
                .first()
                .and_then(|first| batch.schema().index_of(first).ok())
            else {
                continue;
            };
            let mut rows = Vec::new();
            columns[index] = self.encrypt_path(&columns[index], &parts[1..], path, &mut rows)?;
            for row in rows {
                touched[row].push(path.clone());
            }
        }
        let batch = RecordBatch::try_new(batch.schema(), columns)
            .map_err(|e| PiiError::Arrow(e.to_string()))?;
        Ok((batch, touched))
    }

    fn encrypt_path(
        &self,
        array: &ArrayRef,
        rest: &[&str],
        path: &str,
        rows: &mut Vec<usize>,
    ) -> Result<ArrayRef, PiiError> {
        match rest.split_first() {
            None => {
                let Some(strings) = array.as_string_opt::<i32>() else {
                    return Err(PiiError::Arrow(format!("{path} is not a string column")));
                };
                let sealable = |v: &str| !v.is_empty() && !v.starts_with(PREFIX);
                let count = strings.iter().flatten().filter(|v| sealable(v)).count();
                // One call to the system's random source per column and batch, not per value.
                let mut nonces = vec![0u8; NONCE_LEN * count];
                OsRng
                    .try_fill_bytes(&mut nonces)
                    .map_err(|e| PiiError::Config(format!("no random nonce: {e}")))?;
                let mut nonces = nonces.chunks_exact(NONCE_LEN);
                let mut out = StringBuilder::with_capacity(
                    strings.len(),
                    strings.value_data().len() * 2 + count * 64,
                );
                let cipher = self.active_cipher()?;
                let (mut buf, mut text) = (Vec::new(), String::new());
                for (row, value) in strings.iter().enumerate() {
                    match value {
                        Some(v) if sealable(v) => {
                            let nonce = nonces.next().ok_or_else(|| {
                                PiiError::Config("fewer nonces than values".into())
                            })?;
                            self.seal(cipher, nonce, path, v, &mut buf, &mut text)?;
                            rows.push(row);
                            out.append_value(&text);
                        }
                        other => out.append_option(other),
                    }
                }
                Ok(std::sync::Arc::new(out.finish()))
            }
            Some((name, rest)) => {
                let Some(parent) = array.as_struct_opt() else {
                    return Err(PiiError::Arrow(format!(
                        "{path}: {name}'s parent is not a struct"
                    )));
                };
                let (fields, mut children, nulls) = parent.clone().into_parts();
                let Some(index) = fields.iter().position(|f| f.name() == name) else {
                    return Ok(array.clone());
                };
                let mut child_rows = Vec::new();
                children[index] =
                    self.encrypt_path(&children[index], rest, path, &mut child_rows)?;
                // Rows of a null parent hold no value that counts.
                rows.extend(child_rows.into_iter().filter(|r| parent.is_valid(*r)));
                let rebuilt = StructArray::try_new(fields, children, nulls)
                    .map_err(|e| PiiError::Arrow(e.to_string()))?;
                Ok(std::sync::Arc::new(rebuilt))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::StringArray;

    fn ring(active: &str, keys: &[(&str, u8)]) -> Keyring {
        Keyring::new(
            active,
            keys.iter().map(|(id, b)| (id.to_string(), vec![*b; 32])),
        )
        .expect("keys")
    }

    #[test]
    fn round_trips_with_the_right_key_and_fails_with_a_wrong_one() {
        let k = ring("k1", &[("k1", 1)]);
        let sealed = k
            .encrypt("payload.lead_created.email", "ada@example.com")
            .expect("sealed");
        assert!(sealed.starts_with("enc:v1:k1:"));
        assert!(!sealed.contains("ada"));
        assert_ne!(
            sealed,
            k.encrypt("payload.lead_created.email", "ada@example.com")
                .expect("again"),
            "fresh nonce"
        );
        assert_eq!(
            k.decrypt("payload.lead_created.email", &sealed).as_deref(),
            Ok("ada@example.com")
        );
        // Another key under the same id, another field, a tampered value: all refused.
        let wrong = ring("k1", &[("k1", 2)]);
        assert!(matches!(
            wrong.decrypt("payload.lead_created.email", &sealed),
            Err(PiiError::Decrypt { .. })
        ));
        assert!(matches!(
            k.decrypt("payload.lead_created.name", &sealed),
            Err(PiiError::Decrypt { .. })
        ));
        let mut tampered = sealed.clone();
        tampered.replace_range(
            sealed.len() - 3..sealed.len() - 2,
            if sealed.ends_with("A==") { "B" } else { "A" },
        );
        assert!(k.decrypt("payload.lead_created.email", &tampered).is_err());
        assert_eq!(
            k.decrypt("f", "plain"),
            Err(PiiError::NotEncrypted { field: "f".into() })
        );
    }

    #[test]
    fn rotation_encrypts_with_the_new_key_and_still_decrypts_the_old() {
        let old = ring("k1", &[("k1", 1)]);
        let before = old.encrypt("f", "x").expect("sealed");
        let rotated = ring("k2", &[("k1", 1), ("k2", 7)]);
        let after = rotated.encrypt("f", "y").expect("sealed");
        assert!(after.starts_with("enc:v1:k2:"));
        assert_eq!(rotated.decrypt("f", &before).as_deref(), Ok("x"));
        assert_eq!(rotated.decrypt("f", &after).as_deref(), Ok("y"));
        assert_eq!(
            old.decrypt("f", &after),
            Err(PiiError::UnknownKey("k2".into()))
        );
    }

    #[test]
    fn config_errors_name_the_problem() {
        let none = Keyring::from_config(&PiiConfig::default(), "stage.pii").expect_err("no keys");
        assert!(none.to_string().contains("stage.pii.active_key"), "{none}");
        let config = PiiConfig {
            active_key: "k1".into(),
            keys: [(
                "k1".to_string(),
                KeySource {
                    env: Some("MEDALLION_TEST_UNSET_KEY".into()),
                    value: None,
                },
            )]
            .into(),
        };
        let e = Keyring::from_config(&config, "stage.pii").expect_err("unset");
        assert!(e.to_string().contains("MEDALLION_TEST_UNSET_KEY"), "{e}");
        let short = PiiConfig {
            active_key: "k1".into(),
            keys: [(
                "k1".to_string(),
                KeySource {
                    env: None,
                    value: Some(STANDARD.encode([1u8; 16])),
                },
            )]
            .into(),
        };
        let e = Keyring::from_config(&short, "stage.pii").expect_err("short");
        assert!(e.to_string().contains("32 bytes"), "{e}");
        let generated = PiiConfig {
            active_key: "k1".into(),
            keys: [(
                "k1".to_string(),
                KeySource {
                    env: None,
                    value: Some(Keyring::generate_key()),
                },
            )]
            .into(),
        };
        assert!(Keyring::from_config(&generated, "stage.pii").is_ok());
    }

    #[test]
    fn nested_columns_are_encrypted_in_place_and_empty_values_left_alone() {
        use arrow::datatypes::{DataType, Field, Fields};
        let inner = Fields::from(vec![Field::new("email", DataType::Utf8, true)]);
        let lead = StructArray::try_new(
            inner.clone(),
            vec![std::sync::Arc::new(StringArray::from(vec![
                Some("a@x.io"),
                Some(""),
                Some("c@x.io"),
            ])) as ArrayRef],
            Some(vec![true, true, false].into()),
        )
        .expect("lead");
        let outer = Fields::from(vec![Field::new("lead", DataType::Struct(inner), true)]);
        let payload = StructArray::try_new(
            outer.clone(),
            vec![std::sync::Arc::new(lead) as ArrayRef],
            None,
        )
        .expect("payload");
        let schema = std::sync::Arc::new(arrow::datatypes::Schema::new(vec![Field::new(
            "payload",
            DataType::Struct(outer),
            false,
        )]));
        let batch =
            RecordBatch::try_new(schema, vec![std::sync::Arc::new(payload)]).expect("batch");
        let k = ring("k1", &[("k1", 3)]);
        let (out, touched) = k
            .encrypt_columns(&batch, &["payload.lead.email".to_string()])
            .expect("encrypted");
        assert_eq!(
            touched,
            vec![vec!["payload.lead.email".to_string()], vec![], vec![]]
        );
        let email = out
            .column(0)
            .as_struct()
            .column(0)
            .as_struct()
            .column(0)
            .as_string::<i32>()
            .clone();
        assert_eq!(
            k.decrypt("payload.lead.email", email.value(0)).as_deref(),
            Ok("a@x.io")
        );
        assert_eq!(email.value(1), "");
    }
}

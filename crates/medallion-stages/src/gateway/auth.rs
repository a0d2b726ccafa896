//! Who a connection is: a bearer token (HS256 with a shared secret, or RS256/ES256 with a key
//! of the identity provider's JWKS, e.g. Keycloak's `/protocol/openid-connect/certs`) with its
//! issuer, audience and expiry checked and the org read from a claim; or a one-use ticket the
//! gateway signed for such a token, for a browser's EventSource, which cannot send headers.
//! No token or ticket is ever logged.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// How tokens are checked (`stage.auth`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Shared secret of HS256 tokens (or `MEDALLION__STAGE__AUTH__HS256_SECRET`).
    pub hs256_secret: Option<String>,
    /// JWKS of RS256/ES256 tokens (Keycloak: `<realm URL>/protocol/openid-connect/certs`),
    /// fetched at start and again for a key id it does not hold (at most every 30 s).
    pub jwks_url: Option<String>,
    /// The `iss` a token must carry, when set.
    pub issuer: Option<String>,
    /// The `aud` a token must carry, when set (a token with an `aud` is refused without it).
    pub audience: Option<String>,
    /// The claim naming the connection's org (a number or decimal text).
    pub org_claim: String,
    /// Seconds of clock skew allowed on `exp` and `nbf`.
    pub leeway_s: u64,
    /// How long a ticket stays usable, once.
    pub ticket_ttl_ms: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            hs256_secret: None,
            jwks_url: None,
            issuer: None,
            audience: None,
            org_claim: "org_id".into(),
            leeway_s: 30,
            ticket_ttl_ms: 30_000,
        }
    }
}

/// Why a connection was refused (the `reason` of the 401 and of the auth-failure metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Missing,
    Malformed,
    BadSignature,
    Expired,
    NotYetValid,
    WrongIssuer,
    WrongAudience,
    WrongAlgorithm,
    UnknownKey,
    NoOrg,
    TicketUsed,
    TicketExpired,
    /// The JWKS could not be fetched: not the client's fault, but no data either.
    KeysUnavailable,
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::Missing => "missing",
            Refusal::Malformed => "malformed",
            Refusal::BadSignature => "bad_signature",
            Refusal::Expired => "expired",
            Refusal::NotYetValid => "not_yet_valid",
            Refusal::WrongIssuer => "wrong_issuer",
            Refusal::WrongAudience => "wrong_audience",
            Refusal::WrongAlgorithm => "wrong_algorithm",
            Refusal::UnknownKey => "unknown_key",
            Refusal::NoOrg => "no_org_claim",
            Refusal::TicketUsed => "ticket_used",
            Refusal::TicketExpired => "ticket_expired",
            Refusal::KeysUnavailable => "keys_unavailable",
        }
    }

    pub const ALL: [Refusal; 13] = [
        Refusal::Missing,
        Refusal::Malformed,
        Refusal::BadSignature,
        Refusal::Expired,
        Refusal::NotYetValid,
        Refusal::WrongIssuer,
        Refusal::WrongAudience,
        Refusal::WrongAlgorithm,
        Refusal::UnknownKey,
        Refusal::NoOrg,
        Refusal::TicketUsed,
        Refusal::TicketExpired,
        Refusal::KeysUnavailable,
    ];
}

/// A verified identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub org_id: i64,
    pub subject: Option<String>,
    /// When the token stops being valid (epoch seconds): the stream ends then.
    pub expires_at: u64,
}

/// Why the auth settings are unusable.
#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    #[error("stage.auth: set hs256_secret or jwks_url (or both)")]
    NoVerifier,
    #[error("stage.auth.org_claim is empty")]
    NoOrgClaim,
    #[error("stage.auth.jwks_url {url}: {reason}")]
    Jwks { url: String, reason: String },
}

/// Checks bearer tokens and issues and redeems tickets.
pub struct Authenticator {
    config: AuthConfig,
    keys: Mutex<Keys>,
    http: reqwest::Client,
    ticket_key: Vec<u8>,
    /// Nonces of redeemed tickets, until they expire: a ticket is used once per replica.
    redeemed: Mutex<HashMap<[u8; 16], u64>>,
}

#[derive(Default)]
struct Keys {
    by_id: HashMap<String, (Algorithm, DecodingKey)>,
    without_id: Vec<(Algorithm, DecodingKey)>,
    fetched: Option<Instant>,
}

const REFETCH_AT_MOST_EVERY: Duration = Duration::from_secs(30);

impl Authenticator {
    /// Checks the settings and fetches the JWKS, if one is set.
    pub async fn new(mut config: AuthConfig, ticket_key: &[u8]) -> Result<Self, AuthSetupError> {
        // An empty setting (an overlay's way to turn one off) is no setting.
        config.jwks_url = config.jwks_url.filter(|u| !u.trim().is_empty());
        config.hs256_secret = config.hs256_secret.filter(|s| !s.is_empty());
        if config.hs256_secret.as_deref().is_none_or(str::is_empty)
            && config.jwks_url.as_deref().is_none_or(str::is_empty)
        {
            return Err(AuthSetupError::NoVerifier);
        }
        if config.org_claim.trim().is_empty() {
            return Err(AuthSetupError::NoOrgClaim);
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| AuthSetupError::Jwks {
                url: config.jwks_url.clone().unwrap_or_default(),
                reason: e.to_string(),
            })?;
        let auth = Self {
            config,
            keys: Mutex::new(Keys::default()),
            http,
            ticket_key: ticket_key.to_vec(),
            redeemed: Mutex::new(HashMap::new()),
        };
        if let Some(url) = auth.config.jwks_url.clone() {
            auth.fetch_keys()
                .await
                .map_err(|reason| AuthSetupError::Jwks { url, reason })?;
        }
        Ok(auth)
    }

    async fn fetch_keys(&self) -> Result<(), String> {
        let Some(url) = &self.config.jwks_url else {
            return Ok(());
        };
        let set: JwkSet = self
            .http
            .get(url)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| format!("not a JWKS: {e}"))?;
        let mut keys = Keys {
            fetched: Some(Instant::now()),
            ..Keys::default()
        };
        for jwk in &set.keys {
            let algorithm = match &jwk.algorithm {
                jsonwebtoken::jwk::AlgorithmParameters::RSA(_) => Algorithm::RS256,
                jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(ec)
                    if ec.curve == jsonwebtoken::jwk::EllipticCurve::P256 =>
                {
                    Algorithm::ES256
                }
                // Other key types and curves (encryption keys, P-384...) are not ours to use.
                _ => continue,
            };
            let Ok(key) = DecodingKey::from_jwk(jwk) else {
                continue;
            };
            match &jwk.common.key_id {
                Some(id) => {
                    keys.by_id.insert(id.clone(), (algorithm, key));
                }
                None => keys.without_id.push((algorithm, key)),
            }
        }
        if let Ok(mut held) = self.keys.lock() {
            *held = keys;
        }
        Ok(())
    }

    fn validation(&self, algorithm: Algorithm) -> Validation {
        let mut validation = Validation::new(algorithm);
        validation.leeway = self.config.leeway_s;
        validation.validate_nbf = true;
        match &self.config.issuer {
            Some(issuer) => validation.set_issuer(&[issuer]),
            None => validation.iss = None,
        }
        match &self.config.audience {
            Some(audience) => validation.set_audience(&[audience]),
            None => validation.validate_aud = false,
        }
        validation
    }

    /// The principal of a bearer token.
    pub async fn verify(&self, token: &str) -> Result<Principal, Refusal> {
        let token = token.trim();
        if token.is_empty() {
            return Err(Refusal::Missing);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| Refusal::Malformed)?;
        let (algorithm, key) = match header.alg {
            Algorithm::HS256 => {
                let secret = self
                    .config
                    .hs256_secret
                    .as_deref()
                    .filter(|s| !s.is_empty())
                    .ok_or(Refusal::WrongAlgorithm)?;
                (
                    Algorithm::HS256,
                    DecodingKey::from_secret(secret.as_bytes()),
                )
            }
            Algorithm::RS256 | Algorithm::ES256 => {
                if self.config.jwks_url.is_none() {
                    return Err(Refusal::WrongAlgorithm);
                }
                self.key_for(header.kid.as_deref(), header.alg).await?
            }
            _ => return Err(Refusal::WrongAlgorithm),
        };
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token,
            &key,
            &self.validation(algorithm),
        )
        .map_err(|e| refusal_of(e.kind()))?;
        let claims = data.claims;
        let org_id = claims
            .get(&self.config.org_claim)
            .and_then(|v| match v {
                serde_json::Value::Number(n) => n.as_i64(),
                serde_json::Value::String(s) => s.trim().parse().ok(),
                _ => None,
            })
            .ok_or(Refusal::NoOrg)?;
        let expires_at = claims
            .get("exp")
            .and_then(serde_json::Value::as_u64)
            .ok_or(Refusal::Malformed)?;
        Ok(Principal {
            org_id,
            subject: claims
                .get("sub")
                .and_then(|s| s.as_str())
                .map(str::to_string),
            expires_at,
        })
    }

    async fn key_for(
        &self,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<(Algorithm, DecodingKey), Refusal> {
        let find = |keys: &Keys| -> Option<(Algorithm, DecodingKey)> {
            match kid {
                Some(kid) => keys.by_id.get(kid).cloned(),
                None => keys.without_id.iter().find(|(a, _)| *a == alg).cloned(),
            }
        };
        let (found, may_refetch) = {
            let keys = self.keys.lock().map_err(|_| Refusal::KeysUnavailable)?;
            (
                find(&keys),
                keys.fetched
                    .is_none_or(|at| at.elapsed() >= REFETCH_AT_MOST_EVERY),
            )
        };
        let found = match found {
            Some(k) => Some(k),
            // A key rotated in at the provider: fetch the set again, at most every 30 s.
            None if may_refetch => {
                self.fetch_keys().await.map_err(|reason| {
                    tracing::warn!(%reason, "the JWKS could not be fetched");
                    Refusal::KeysUnavailable
                })?;
                let keys = self.keys.lock().map_err(|_| Refusal::KeysUnavailable)?;
                find(&keys)
            }
            None => None,
        };
        let (algorithm, key) = found.ok_or(Refusal::UnknownKey)?;
        if algorithm != alg {
            return Err(Refusal::WrongAlgorithm);
        }
        Ok((algorithm, key))
    }

    fn ticket_mac(&self) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.ticket_key)
            .unwrap_or_else(|_| unreachable!("HMAC takes a key of any length"));
        mac.update(b"medallion.ticket.v1");
        mac
    }

    /// A ticket for `principal`: usable once, within `ticket_ttl_ms`, never past the token.
    pub fn issue_ticket(&self, principal: &Principal) -> (String, u64) {
        let now = now_ms();
        let expires_ms = (now + self.config.ticket_ttl_ms).min(principal.expires_at * 1000);
        let nonce: [u8; 16] = *uuid::Uuid::new_v4().as_bytes();
        let mut body = Vec::with_capacity(48);
        body.extend_from_slice(&nonce);
        body.extend_from_slice(&principal.org_id.to_be_bytes());
        body.extend_from_slice(&expires_ms.to_be_bytes());
        body.extend_from_slice(&principal.expires_at.to_be_bytes());
        let mut mac = self.ticket_mac();
        mac.update(&body);
        body.extend_from_slice(&mac.finalize().into_bytes()[..16]);
        (URL_SAFE_NO_PAD.encode(body), expires_ms.saturating_sub(now))
    }

    /// The principal of a ticket, which is then used up.
    pub fn redeem_ticket(&self, ticket: &str) -> Result<Principal, Refusal> {
        let ticket = ticket.trim();
        if ticket.is_empty() {
            return Err(Refusal::Missing);
        }
        if ticket.len() > 256 {
            return Err(Refusal::Malformed);
        }
        let bytes = URL_SAFE_NO_PAD
            .decode(ticket)
            .map_err(|_| Refusal::Malformed)?;
        if bytes.len() != 16 + 8 + 8 + 8 + 16 {
            return Err(Refusal::Malformed);
        }
        let (body, tag) = bytes.split_at(40);
        let mut mac = self.ticket_mac();
        mac.update(body);
        mac.verify_truncated_left(tag)
            .map_err(|_| Refusal::BadSignature)?;
        let field = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&body[at..at + 8]);
            b
        };
        let mut nonce = [0u8; 16];
        nonce.copy_from_slice(&body[..16]);
        let org_id = i64::from_be_bytes(field(16));
        let ticket_expires_ms = u64::from_be_bytes(field(24));
        let expires_at = u64::from_be_bytes(field(32));
        let now = now_ms();
        if now >= ticket_expires_ms {
            return Err(Refusal::TicketExpired);
        }
        let mut redeemed = self.redeemed.lock().map_err(|_| Refusal::TicketUsed)?;
        redeemed.retain(|_, until| *until > now);
        if redeemed.insert(nonce, ticket_expires_ms).is_some() {
            return Err(Refusal::TicketUsed);
        }
        Ok(Principal {
            org_id,
            subject: None,
            expires_at,
        })
    }
}

/// An HS256 token for `org_id`, valid `ttl_s` seconds: for local mode, development and tests
/// (production tokens come from the identity provider).
pub fn mint_hs256(
    secret: &str,
    org_id: i64,
    issuer: Option<&str>,
    audience: Option<&str>,
    subject: &str,
    ttl_s: u64,
) -> Result<String, jsonwebtoken::errors::Error> {
    let mut claims = serde_json::json!({
        "sub": subject,
        "org_id": org_id,
        "iat": now_ms() / 1000,
        "exp": now_ms() / 1000 + ttl_s,
    });
    if let Some(iss) = issuer {
        claims["iss"] = iss.into();
    }
    if let Some(aud) = audience {
        claims["aud"] = aud.into();
    }
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
}

fn refusal_of(kind: &ErrorKind) -> Refusal {
    match kind {
        ErrorKind::InvalidSignature => Refusal::BadSignature,
        ErrorKind::ExpiredSignature => Refusal::Expired,
        ErrorKind::ImmatureSignature => Refusal::NotYetValid,
        ErrorKind::InvalidIssuer => Refusal::WrongIssuer,
        ErrorKind::InvalidAudience => Refusal::WrongAudience,
        ErrorKind::InvalidAlgorithm => Refusal::WrongAlgorithm,
        ErrorKind::MissingRequiredClaim(claim) if claim == "iss" => Refusal::WrongIssuer,
        ErrorKind::MissingRequiredClaim(claim) if claim == "aud" => Refusal::WrongAudience,
        _ => Refusal::Malformed,
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{encode, EncodingKey, Header};
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    fn config() -> AuthConfig {
        AuthConfig {
            hs256_secret: Some("s3cret".into()),
            issuer: Some("https://id.example/realms/medallion".into()),
            audience: Some("medallion-gateway".into()),
            ..AuthConfig::default()
        }
    }

    fn token(claims: serde_json::Value, secret: &str) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .expect("signed")
    }

    fn claims(org: serde_json::Value) -> serde_json::Value {
        json!({
            "iss": "https://id.example/realms/medallion",
            "aud": "medallion-gateway",
            "exp": now_ms() / 1000 + 600,
            "sub": "u1",
            "org_id": org,
        })
    }

    fn block<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    #[test]
    fn a_good_token_names_its_org_and_every_bad_one_its_reason() {
        block(async {
            let auth = Authenticator::new(config(), b"k").await.expect("auth");
            let ok = auth.verify(&token(claims(json!(42)), "s3cret")).await;
            assert_eq!(
                ok.map(|p| (p.org_id, p.subject)),
                Ok((42, Some("u1".into())))
            );
            let text_org = auth.verify(&token(claims(json!("43")), "s3cret")).await;
            assert_eq!(text_org.map(|p| p.org_id), Ok(43));

            let mut expired = claims(json!(42));
            expired["exp"] = json!(now_ms() / 1000 - 120);
            let mut issuer = claims(json!(42));
            issuer["iss"] = json!("https://evil.example");
            let mut audience = claims(json!(42));
            audience["aud"] = json!("someone-else");
            let mut no_org = claims(json!(42));
            no_org.as_object_mut().expect("object").remove("org_id");
            let mut later = claims(json!(42));
            later["nbf"] = json!(now_ms() / 1000 + 600);
            let cases = [
                (String::new(), Refusal::Missing),
                ("not.a.token".to_string(), Refusal::Malformed),
                (token(claims(json!(42)), "forged"), Refusal::BadSignature),
                (token(expired, "s3cret"), Refusal::Expired),
                (token(issuer, "s3cret"), Refusal::WrongIssuer),
                (token(audience, "s3cret"), Refusal::WrongAudience),
                (token(no_org, "s3cret"), Refusal::NoOrg),
                (token(later, "s3cret"), Refusal::NotYetValid),
                (
                    encode(
                        &Header::new(Algorithm::HS512),
                        &claims(json!(42)),
                        &EncodingKey::from_secret(b"s3cret"),
                    )
                    .expect("signed"),
                    Refusal::WrongAlgorithm,
                ),
            ];
            for (token, reason) in cases {
                assert_eq!(auth.verify(&token).await, Err(reason), "{reason:?}");
            }
            // An unsigned token ("alg": "none") is never taken.
            let none = format!(
                "{}.{}.",
                URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#),
                URL_SAFE_NO_PAD.encode(claims(json!(42)).to_string())
            );
            assert!(auth.verify(&none).await.is_err());
        });
    }

    #[test]
    fn a_ticket_is_used_once_and_never_forged() {
        block(async {
            let auth = Authenticator::new(config(), b"k").await.expect("auth");
            let principal = Principal {
                org_id: 9,
                subject: None,
                expires_at: now_ms() / 1000 + 600,
            };
            let (ticket, ttl) = auth.issue_ticket(&principal);
            assert!(ttl > 0 && ttl <= 30_000);
            let redeemed = auth.redeem_ticket(&ticket).expect("first use");
            assert_eq!(
                (redeemed.org_id, redeemed.expires_at),
                (9, principal.expires_at)
            );
            assert_eq!(auth.redeem_ticket(&ticket), Err(Refusal::TicketUsed));
            let other = Authenticator::new(config(), b"other key")
                .await
                .expect("auth");
            let (theirs, _) = other.issue_ticket(&principal);
            assert_eq!(auth.redeem_ticket(&theirs), Err(Refusal::BadSignature));
            let expired = Principal {
                expires_at: now_ms() / 1000 - 1,
                ..principal
            };
            let (late, _) = auth.issue_ticket(&expired);
            assert_eq!(auth.redeem_ticket(&late), Err(Refusal::TicketExpired));
        });
    }

    #[test]
    fn settings_without_a_verifier_are_refused() {
        block(async {
            let none = AuthConfig::default();
            assert!(matches!(
                Authenticator::new(none, b"k").await,
                Err(AuthSetupError::NoVerifier)
            ));
            let unreachable = AuthConfig {
                jwks_url: Some("http://127.0.0.1:9/certs".into()),
                ..AuthConfig::default()
            };
            let err = Authenticator::new(unreachable, b"k")
                .await
                .err()
                .expect("refused");
            assert!(err.to_string().contains("127.0.0.1:9/certs"), "{err}");
        });
    }

    /// One authenticator for the 10,000 cases.
    fn shared() -> &'static (tokio::runtime::Runtime, Authenticator) {
        static SHARED: std::sync::OnceLock<(tokio::runtime::Runtime, Authenticator)> =
            std::sync::OnceLock::new();
        SHARED.get_or_init(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let auth = runtime
                .block_on(Authenticator::new(config(), b"k"))
                .expect("auth");
            (runtime, auth)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(10_000))]

        #[test]
        fn any_token_or_ticket_text_is_refused_never_a_panic(text in ".{0,400}") {
            let (runtime, auth) = shared();
            prop_assert!(runtime.block_on(auth.verify(&text)).is_err());
            prop_assert!(auth.redeem_ticket(&text).is_err());
        }
    }
}

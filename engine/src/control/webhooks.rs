//! Outbound webhooks as the Standard Webhooks specification signs them
//! (<https://www.standardwebhooks.com>): each delivery carries `webhook-id`,
//! `webhook-timestamp` (Unix seconds) and `webhook-signature: v1,<base64>`, the
//! HMAC-SHA256 of `<id>.<timestamp>.<body>` under the endpoint's secret. A secret is
//! `whsec_` and the base64 of its key bytes; it is shown once when an endpoint is made or
//! its secret rotated.
//!
//! This is the signing and the event vocabulary; a receiver checks a delivery with
//! [`verify`]. Endpoints and deliveries are stored by [`super::WebhookStore`].

use aes_gcm::aead::OsRng;
use aes_gcm::aead::rand_core::RngCore;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::error::{EngineError, ErrorKind, Result};

/// The prefix of a secret.
pub const SECRET_PREFIX: &str = "whsec_";

/// How far a delivery's timestamp may be from the receiver's clock (the specification's
/// recommendation), so a captured delivery cannot be replayed later.
pub const TOLERANCE_SECS: i64 = 5 * 60;

/// What happened, as an endpoint subscribes to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
pub enum EventType {
    /// A run ended with every row accounted for.
    #[serde(rename = "run.succeeded")]
    RunSucceeded,
    /// A run stopped early.
    #[serde(rename = "run.failed")]
    RunFailed,
    /// A run set aside more rows than the endpoint's threshold.
    #[serde(rename = "run.quarantined")]
    RunQuarantined,
    /// A job ran out of attempts.
    #[serde(rename = "dead_letter.created")]
    DeadLetterCreated,
    /// Quarantined rows were replayed.
    #[serde(rename = "quarantine.replayed")]
    QuarantineReplayed,
    /// A test send an admin asked for (never subscribed to).
    #[serde(rename = "webhook.test")]
    WebhookTest,
}

impl EventType {
    /// Every event type an endpoint can subscribe to.
    pub const ALL: [EventType; 5] = [
        EventType::RunSucceeded,
        EventType::RunFailed,
        EventType::RunQuarantined,
        EventType::DeadLetterCreated,
        EventType::QuarantineReplayed,
    ];

    /// Its name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::RunSucceeded => "run.succeeded",
            EventType::RunFailed => "run.failed",
            EventType::RunQuarantined => "run.quarantined",
            EventType::DeadLetterCreated => "dead_letter.created",
            EventType::QuarantineReplayed => "quarantine.replayed",
            EventType::WebhookTest => "webhook.test",
        }
    }

    /// The event type named `s`.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .chain([EventType::WebhookTest])
            .find(|e| e.as_str() == s)
    }
}

/// An endpoint's signing secret.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookSecret(Vec<u8>);

impl std::fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookSecret(..)")
    }
}

impl WebhookSecret {
    /// A new secret of 32 random bytes.
    pub fn generate() -> Self {
        let mut key = vec![0u8; 32];
        OsRng.fill_bytes(&mut key);
        WebhookSecret(key)
    }

    /// Reads `whsec_<base64>` (the prefix may be left out, as receivers' libraries allow).
    pub fn parse(text: &str) -> Result<Self> {
        let encoded = text.strip_prefix(SECRET_PREFIX).unwrap_or(text);
        let key = STANDARD.decode(encoded).map_err(|e| {
            EngineError::new(
                ErrorKind::Input,
                format!("not a webhook secret (whsec_ and base64): {e}"),
            )
        })?;
        Self::from_key(&key)
    }

    /// A secret of these key bytes (as stored, sealed).
    pub fn from_key(key: &[u8]) -> Result<Self> {
        if !(24..=64).contains(&key.len()) {
            return Err(EngineError::new(
                ErrorKind::Input,
                format!(
                    "a webhook secret holds 24 to 64 bytes, this one {}",
                    key.len()
                ),
            ));
        }
        Ok(WebhookSecret(key.to_vec()))
    }

    /// The key bytes, to be sealed for storage.
    pub fn key(&self) -> &[u8] {
        &self.0
    }

    /// `whsec_<base64>`: what the endpoint's owner is shown, once.
    pub fn reveal(&self) -> String {
        format!("{SECRET_PREFIX}{}", STANDARD.encode(&self.0))
    }

    fn mac(&self, id: &str, timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes a key of any length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }

    /// The `webhook-signature` header of a delivery: `v1,<base64 HMAC-SHA256>` of
    /// `<id>.<timestamp>.<body>`.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let tag = self.mac(id, timestamp, body).finalize().into_bytes();
        format!("v1,{}", STANDARD.encode(tag))
    }
}

/// Why a delivery was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The timestamp is not a number of seconds.
    #[error("webhook-timestamp is not a Unix time")]
    BadTimestamp,
    /// The timestamp is further than [`TOLERANCE_SECS`] from now.
    #[error("webhook-timestamp is {0} s from now, more than the tolerance")]
    OutsideTolerance(i64),
    /// No `v1` signature in the header matches.
    #[error("no signature matches")]
    NoMatch,
}

/// Checks a delivery as a receiver does: the timestamp within [`TOLERANCE_SECS`] of
/// `now` (Unix seconds), and one of the header's space-separated `v1,<base64>` signatures
/// equal (in constant time) to the body's.
pub fn verify(
    secret: &WebhookSecret,
    id: &str,
    timestamp: &str,
    signatures: &str,
    body: &[u8],
    now: i64,
) -> std::result::Result<(), VerifyError> {
    let ts: i64 = timestamp.parse().map_err(|_| VerifyError::BadTimestamp)?;
    let skew = now - ts;
    if skew.abs() > TOLERANCE_SECS {
        return Err(VerifyError::OutsideTolerance(skew));
    }
    let matched = signatures.split(' ').any(|sig| {
        sig.strip_prefix("v1,")
            .and_then(|b64| STANDARD.decode(b64).ok())
            .is_some_and(|tag| secret.mac(id, ts, body).verify_slice(&tag).is_ok())
    });
    if matched {
        Ok(())
    } else {
        Err(VerifyError::NoMatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The specification's example, also what the reference Python library
    // (`standardwebhooks` on PyPI) signs for these inputs.
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const TS: i64 = 1_614_265_330;
    const BODY: &[u8] = br#"{"test": 2432232314}"#;
    const SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    #[test]
    fn signs_as_the_specification_does() {
        let secret = WebhookSecret::parse(SECRET).expect("secret");
        assert_eq!(secret.sign(ID, TS, BODY), SIGNATURE);
        assert_eq!(secret.reveal(), SECRET);
    }

    #[test]
    fn a_receiver_accepts_the_delivery_and_refuses_any_change() {
        let secret = WebhookSecret::parse(SECRET).expect("secret");
        let ts = TS.to_string();
        // Among several signatures (a rotation in progress), one matching is enough.
        let header = format!("v1,AAAA {SIGNATURE}");
        assert_eq!(verify(&secret, ID, &ts, &header, BODY, TS + 10), Ok(()));
        assert_eq!(
            verify(&secret, ID, &ts, SIGNATURE, br#"{"test": 2432232315}"#, TS),
            Err(VerifyError::NoMatch)
        );
        assert_eq!(
            verify(&secret, "msg_other", &ts, SIGNATURE, BODY, TS),
            Err(VerifyError::NoMatch)
        );
        let other = WebhookSecret::generate();
        assert_eq!(
            verify(&other, ID, &ts, SIGNATURE, BODY, TS),
            Err(VerifyError::NoMatch)
        );
        assert_eq!(
            verify(&secret, ID, &ts, SIGNATURE, BODY, TS + TOLERANCE_SECS + 1),
            Err(VerifyError::OutsideTolerance(TOLERANCE_SECS + 1))
        );
        assert_eq!(
            verify(&secret, ID, "soon", SIGNATURE, BODY, TS),
            Err(VerifyError::BadTimestamp)
        );
    }

    #[test]
    fn generated_secrets_differ_and_read_back() {
        let a = WebhookSecret::generate();
        let b = WebhookSecret::generate();
        assert_ne!(a, b);
        assert!(a.reveal().starts_with(SECRET_PREFIX));
        assert_eq!(WebhookSecret::parse(&a.reveal()).expect("reads back"), a);
        assert!(format!("{a:?}").find(&a.reveal()[6..]).is_none());
        assert!(WebhookSecret::parse("whsec_c2hvcnQ=").is_err());
        assert!(WebhookSecret::parse("whsec_not base64!").is_err());
    }

    #[test]
    fn event_names_round_trip() {
        for e in EventType::ALL {
            assert_eq!(EventType::parse(e.as_str()), Some(e));
            assert_eq!(
                serde_json::to_value(e).expect("json"),
                serde_json::json!(e.as_str())
            );
        }
        assert_eq!(EventType::parse("run.started"), None);
    }
}

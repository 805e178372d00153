//! Secrets at rest: AES-256-GCM envelope encryption. Each tenant has a random 256-bit data
//! key; it is stored only wrapped (encrypted) under the master key from `SLUICE_MASTER_KEY`
//! (or the file `SLUICE_MASTER_KEY_FILE` names: a systemd credential, a container secret).
//! Pipeline secrets (passwords, OAuth tokens) are sealed under the tenant's data key, with
//! the tenant and pipeline as associated data so a ciphertext cannot be moved to another
//! owner. Keys and plaintexts never appear in `Debug` output, errors or logs, and key bytes
//! are zeroed when a key is dropped.

use std::fmt;

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use zeroize::Zeroize;

use crate::error::{EngineError, ErrorKind, Result};

const NONCE_LEN: usize = 12;

/// The master key that wraps every tenant's data key, and while a rotation is rolled out
/// the key before it, which still opens what it wrapped (never wraps anything new).
pub struct MasterKey(Key<Aes256Gcm>, Option<Box<MasterKey>>);

/// A tenant's data key, unwrapped in memory only while it is used.
pub struct DataKey(Key<Aes256Gcm>);

impl Drop for MasterKey {
    fn drop(&mut self) {
        self.0[..].zeroize();
    }
}

impl Drop for DataKey {
    fn drop(&mut self) {
        self.0[..].zeroize();
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey(<redacted>)")
    }
}

impl MasterKey {
    /// Parses 64 hex characters (32 bytes), e.g. the output of `openssl rand -hex 32`.
    pub fn from_hex(text: &str) -> Result<Self> {
        let mut decoded = decode_hex(text.trim());
        let key = decoded
            .as_deref()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .map(|mut bytes| {
                let key = Key::<Aes256Gcm>::from(bytes);
                bytes.zeroize();
                MasterKey(key, None)
            });
        if let Some(d) = decoded.as_mut() {
            d.zeroize();
        }
        key.ok_or_else(|| {
            EngineError::new(
                ErrorKind::Config,
                "SLUICE_MASTER_KEY must be 64 hex characters (32 bytes), e.g. from `openssl rand -hex 32`",
            )
        })
    }

    /// The key from `SLUICE_MASTER_KEY_FILE` (a file holding the hex key) or
    /// `SLUICE_MASTER_KEY`; an error when neither is set.
    pub fn from_env() -> Result<Self> {
        Self::from_env_if_set()?.ok_or_else(|| {
            EngineError::new(
                ErrorKind::Config,
                "SLUICE_MASTER_KEY (or SLUICE_MASTER_KEY_FILE) is not set; it encrypts tenant keys at rest (64 hex characters, e.g. `openssl rand -hex 32`)",
            )
        })
    }

    /// The key from `SLUICE_MASTER_KEY_FILE` or `SLUICE_MASTER_KEY`, if one is set, with
    /// the previous one from `SLUICE_MASTER_KEY_PREVIOUS_FILE` or
    /// `SLUICE_MASTER_KEY_PREVIOUS` when a rotation is being rolled out.
    pub fn from_env_if_set() -> Result<Option<Self>> {
        let current = Self::from_sources(
            std::env::var("SLUICE_MASTER_KEY").ok(),
            std::env::var_os("SLUICE_MASTER_KEY_FILE").map(std::path::PathBuf::from),
        )?;
        let previous = Self::from_sources(
            std::env::var("SLUICE_MASTER_KEY_PREVIOUS").ok(),
            std::env::var_os("SLUICE_MASTER_KEY_PREVIOUS_FILE").map(std::path::PathBuf::from),
        )
        .map_err(|e| {
            EngineError::new(
                ErrorKind::Config,
                format!("SLUICE_MASTER_KEY_PREVIOUS: {}", e.message()),
            )
        })?;
        match (current, previous) {
            (Some(current), Some(previous)) => Ok(Some(current.with_previous(previous))),
            (current, None) => Ok(current),
            (None, Some(_)) => Err(EngineError::new(
                ErrorKind::Config,
                "SLUICE_MASTER_KEY_PREVIOUS is set without SLUICE_MASTER_KEY",
            )),
        }
    }

    /// This key, still able to open what `previous` wrapped (while a rotation is rolled
    /// out: processes given the new key and the old one read keys wrapped by either).
    pub fn with_previous(mut self, mut previous: MasterKey) -> Self {
        // One generation back only: the previous key's own previous is forgotten.
        previous.1 = None;
        self.1 = Some(Box::new(previous));
        self
    }

    /// The key given as `value` or in the file `file` (not both); `value` is zeroed.
    pub fn from_sources(
        value: Option<String>,
        file: Option<std::path::PathBuf>,
    ) -> Result<Option<Self>> {
        let mut text = match (value, file) {
            (Some(mut v), Some(_)) => {
                v.zeroize();
                return Err(EngineError::new(
                    ErrorKind::Config,
                    "set SLUICE_MASTER_KEY or SLUICE_MASTER_KEY_FILE, not both",
                ));
            }
            (Some(v), None) => v,
            (None, Some(path)) => std::fs::read_to_string(&path).map_err(|e| {
                EngineError::new(
                    ErrorKind::Config,
                    format!("cannot read SLUICE_MASTER_KEY_FILE {}", path.display()),
                )
                .with_source(e)
            })?,
            (None, None) => return Ok(None),
        };
        let key = Self::from_hex(&text);
        text.zeroize();
        key.map(Some)
    }

    /// Encrypts a data key for storage, bound to `tenant`.
    pub fn wrap(&self, key: &DataKey, tenant: &str) -> Vec<u8> {
        seal_with(&self.0, &key.0[..], tenant.as_bytes())
    }

    /// Decrypts a stored data key of `tenant`, wrapped by this key or the previous one.
    pub fn unwrap_key(&self, wrapped: &[u8], tenant: &str) -> Result<DataKey> {
        let bytes = open_with(&self.0, wrapped, tenant.as_bytes())
            .or_else(|()| match &self.1 {
                Some(previous) => open_with(&previous.0, wrapped, tenant.as_bytes()),
                None => Err(()),
            })
            .map_err(|_| {
            EngineError::new(
                ErrorKind::Config,
                format!("cannot unwrap the data key of tenant '{tenant}': wrong SLUICE_MASTER_KEY, or the stored key was altered"),
            )
        })?;
        let mut bytes = bytes;
        let key = <[u8; 32]>::try_from(bytes.as_slice()).map(|mut raw| {
            let key = DataKey(Key::<Aes256Gcm>::from(raw));
            raw.zeroize();
            key
        });
        bytes.zeroize();
        key.map_err(|_| {
            EngineError::new(ErrorKind::Config, "unwrapped data key has the wrong length")
        })
    }
}

impl DataKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        DataKey(Aes256Gcm::generate_key(OsRng))
    }

    /// Encrypts `plaintext`; `context` (e.g. `tenant/pipeline`) must be given again to open it.
    pub fn seal(&self, plaintext: &[u8], context: &str) -> Vec<u8> {
        seal_with(&self.0, plaintext, context.as_bytes())
    }

    /// Decrypts what [`DataKey::seal`] produced with the same `context`.
    pub fn open(&self, sealed: &[u8], context: &str) -> Result<Vec<u8>> {
        open_with(&self.0, sealed, context.as_bytes()).map_err(|_| {
            EngineError::new(
                ErrorKind::Config,
                format!(
                    "cannot decrypt the secrets of {context}: they were altered or belong elsewhere"
                ),
            )
        })
    }
}

fn seal_with(key: &Key<Aes256Gcm>, plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
    let cipher = Aes256Gcm::new(key);
    let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
    // Encryption with a fresh nonce and in-memory buffers cannot fail.
    let ct = cipher
        .encrypt(
            &nonce,
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .unwrap_or_default();
    let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&ct);
    out
}

fn open_with(key: &Key<Aes256Gcm>, sealed: &[u8], aad: &[u8]) -> std::result::Result<Vec<u8>, ()> {
    if sealed.len() < NONCE_LEN + 16 {
        return Err(());
    }
    let (nonce, ct) = sealed.split_at(NONCE_LEN);
    let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| ())?;
    Aes256Gcm::new(key)
        .decrypt(&Nonce::from(nonce), Payload { msg: ct, aad })
        .map_err(|_| ())
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    #[test]
    fn wrapped_keys_and_sealed_secrets_round_trip_only_with_the_right_key_and_owner() {
        let master = MasterKey::from_hex(HEX).expect("key");
        let data = DataKey::generate();
        let wrapped = master.wrap(&data, "acme");
        let sealed = data.seal(b"hunter2", "acme/erp");
        assert!(
            !sealed.windows(7).any(|w| w == b"hunter2"),
            "plaintext visible in ciphertext"
        );

        let again = master.unwrap_key(&wrapped, "acme").expect("unwrap");
        assert_eq!(again.open(&sealed, "acme/erp").expect("open"), b"hunter2");
        assert!(
            again.open(&sealed, "globex/erp").is_err(),
            "moved to another owner"
        );
        assert!(master.unwrap_key(&wrapped, "globex").is_err());
        let other = MasterKey::from_hex(&HEX.replace("00", "ff")).expect("key");
        assert!(other.unwrap_key(&wrapped, "acme").is_err());
        let mut tampered = sealed.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(again.open(&tampered, "acme/erp").is_err());
    }

    #[test]
    fn a_key_given_its_previous_one_opens_what_either_wrapped_and_wraps_with_itself() {
        let old = MasterKey::from_hex(HEX).expect("key");
        let new_hex = HEX.replace("00", "ee");
        let new = MasterKey::from_hex(&new_hex).expect("key");
        let data = DataKey::generate();
        let by_old = old.wrap(&data, "acme");
        let by_new = new.wrap(&data, "acme");
        assert!(new.unwrap_key(&by_old, "acme").is_err());
        let rolling = MasterKey::from_hex(&new_hex)
            .expect("key")
            .with_previous(MasterKey::from_hex(HEX).expect("key"));
        assert!(rolling.unwrap_key(&by_old, "acme").is_ok());
        assert!(rolling.unwrap_key(&by_new, "acme").is_ok());
        // What it wraps, the new key alone opens.
        let rewrapped = rolling.wrap(&data, "acme");
        assert!(new.unwrap_key(&rewrapped, "acme").is_ok());
        assert!(old.unwrap_key(&rewrapped, "acme").is_err());
        let stranger = MasterKey::from_hex(&HEX.replace("00", "11")).expect("key");
        assert!(
            rolling
                .unwrap_key(&stranger.wrap(&data, "acme"), "acme")
                .is_err()
        );
    }

    #[test]
    fn the_master_key_comes_from_the_variable_or_a_file_not_both() {
        let hex = "4f6e6520737472696e6720746f2072756c65207468656d20616c6c2c206f6e65";
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("master.key");
        std::fs::write(&file, format!("{hex}\n")).expect("write");
        let from_file = MasterKey::from_sources(None, Some(file.clone()))
            .expect("file")
            .expect("key");
        let from_value = MasterKey::from_sources(Some(hex.into()), None)
            .expect("value")
            .expect("key");
        let data = DataKey::generate();
        let wrapped = from_file.wrap(&data, "acme");
        assert!(from_value.unwrap_key(&wrapped, "acme").is_ok());
        assert!(MasterKey::from_sources(Some(hex.into()), Some(file)).is_err());
        assert!(MasterKey::from_sources(None, None).expect("none").is_none());
        let missing = MasterKey::from_sources(None, Some(dir.path().join("nope")));
        assert!(missing.is_err());
    }

    #[test]
    fn keys_never_print_and_bad_master_keys_are_refused() {
        let master = MasterKey::from_hex(HEX).expect("key");
        assert_eq!(format!("{master:?}"), "MasterKey(<redacted>)");
        assert_eq!(format!("{:?}", DataKey::generate()), "DataKey(<redacted>)");
        for bad in [
            "",
            "abc",
            &HEX[..62],
            &format!("{HEX}00"),
            &HEX.replace('0', "g"),
        ] {
            assert!(MasterKey::from_hex(bad).is_err(), "{bad:?} accepted");
        }
    }
}

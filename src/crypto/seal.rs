//! Secrets at rest (provider tokens, and TOTP seeds later): AES-256-GCM under keys from
//! configuration, so a database dump alone reveals none of them.
//!
//! Keys have ids so they can rotate: `ROSTER_ENCRYPTION_KEYS` lists `id:base64key` pairs, the
//! first one seals, every one opens. A sealed value is `version (1) | id length (1) | id |
//! nonce (12) | ciphertext and tag`. The caller passes associated data naming where the value
//! lives (project, row id, column), so a sealed value copied into another row fails to open.
use std::fmt;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

pub(super) const FORMAT_VERSION: u8 = 1;
const NONCE_LEN: usize = 12;

/// The configured keys. Its `Debug` shows key ids only.
#[derive(Clone)]
pub struct Sealer {
    /// (id, cipher); the first seals.
    keys: Vec<(String, Aes256Gcm)>,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|(id, _)| id.as_str()).collect();
        f.debug_struct("Sealer").field("key_ids", &ids).finish()
    }
}

impl Sealer {
    /// Parses `id:base64key[,id:base64key...]`; each key is 32 bytes (standard base64).
    pub fn parse(spec: &str) -> anyhow::Result<Sealer> {
        let mut keys = Vec::new();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (id, key) = part
                .split_once(':')
                .ok_or_else(|| anyhow::anyhow!("encryption keys are 'id:base64key' pairs"))?;
            if id.is_empty()
                || id.len() > 64
                || !id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                anyhow::bail!("encryption key id {id:?}: 1 to 64 of [A-Za-z0-9_-]");
            }
            let bytes = STANDARD
                .decode(key)
                .map_err(|_| anyhow::anyhow!("encryption key {id}: not base64"))?;
            if bytes.len() != 32 {
                anyhow::bail!("encryption key {id}: must be 32 bytes, is {}", bytes.len());
            }
            let cipher = Aes256Gcm::new_from_slice(&bytes)
                .map_err(|_| anyhow::anyhow!("encryption key {id}: invalid"))?;
            if keys.iter().any(|(k, _)| k == id) {
                anyhow::bail!("encryption key id {id} is given twice");
            }
            keys.push((id.to_string(), cipher));
        }
        if keys.is_empty() {
            anyhow::bail!("no encryption key given");
        }
        Ok(Sealer { keys })
    }

    /// The id of the key new values are sealed with (the first one listed).
    pub fn current_key_id(&self) -> &str {
        &self.keys[0].0
    }

    /// Whether `id` is one of the configured keys.
    pub fn has_key(&self, id: &str) -> bool {
        self.keys.iter().any(|(k, _)| k == id)
    }

    /// A new random key in the configuration format, for `id`.
    pub fn generate_spec(id: &str) -> String {
        let key: [u8; 32] = rand::random();
        format!("{id}:{}", STANDARD.encode(key))
    }

    /// Encrypts `plain` bound to `context`.
    pub fn seal(&self, plain: &[u8], context: &[u8]) -> anyhow::Result<Vec<u8>> {
        let (id, cipher) = &self.keys[0];
        let nonce: [u8; NONCE_LEN] = rand::random();
        let sealed = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plain,
                    aad: context,
                },
            )
            .map_err(|_| anyhow::anyhow!("sealing failed"))?;
        let mut out = Vec::with_capacity(2 + id.len() + NONCE_LEN + sealed.len());
        out.push(FORMAT_VERSION);
        out.push(id.len() as u8);
        out.extend_from_slice(id.as_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Decrypts a value made by [`Sealer::seal`] with any configured key and the same context.
    pub fn open(&self, sealed: &[u8], context: &[u8]) -> anyhow::Result<Vec<u8>> {
        let bad = || anyhow::anyhow!("sealed value is malformed");
        let (&version, rest) = sealed.split_first().ok_or_else(bad)?;
        if version != FORMAT_VERSION {
            anyhow::bail!("sealed value has unknown format {version}");
        }
        let (&id_len, rest) = rest.split_first().ok_or_else(bad)?;
        let id_len = usize::from(id_len);
        if rest.len() < id_len + NONCE_LEN {
            return Err(bad());
        }
        let (id, rest) = rest.split_at(id_len);
        let (nonce, ct) = rest.split_at(NONCE_LEN);
        let id = std::str::from_utf8(id).map_err(|_| bad())?;
        let (_, cipher) = self
            .keys
            .iter()
            .find(|(k, _)| k == id)
            .ok_or_else(|| anyhow::anyhow!("sealed with key {id}, which is not configured"))?;
        cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ct,
                    aad: context,
                },
            )
            .map_err(|_| anyhow::anyhow!("sealed value does not open with key {id}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_and_rotate() {
        let old = Sealer::generate_spec("k1");
        let new = Sealer::generate_spec("k2");
        let before = Sealer::parse(&old).unwrap();
        let sealed = before.seal(b"refresh-token", b"ctx").unwrap();
        assert!(!sealed.windows(7).any(|w| w == b"refresh"));
        // After rotation the new key seals and the old one still opens.
        let after = Sealer::parse(&format!("{new},{old}")).unwrap();
        assert_eq!(after.open(&sealed, b"ctx").unwrap(), b"refresh-token");
        let resealed = after.seal(b"x", b"ctx").unwrap();
        assert!(before.open(&resealed, b"ctx").is_err());
        // Another row's context, or a flipped bit, does not open.
        assert!(after.open(&sealed, b"other").is_err());
        let mut tampered = sealed.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(after.open(&tampered, b"ctx").is_err());
        assert!(after.open(&[], b"ctx").is_err());
        assert!(format!("{after:?}").contains("k2"));
        for bad in [
            "",
            "k1",
            "k1:notbase64!",
            "k1:AAAA",
            &format!("{old},{old}"),
        ] {
            assert!(Sealer::parse(bad).is_err(), "{bad}");
        }
    }
}

//! Password hashing on a bounded pool off the async runtime, and the checks on passwords and
//! imported hashes.
//!
//! argon2id costs tens of milliseconds of CPU and ~19 MiB per call: run inline on the async
//! runtime it would stall every other RPC. [`Hasher`] admits at most `workers` hashes at a
//! time (a semaphore) and runs each on tokio's blocking pool, so a sign-in flood queues here
//! while lookups keep being served.
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use argon2::password_hash::{PasswordHash, PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use tokio::sync::Semaphore;

use crate::error::{Error, Result};

/// Hashes passwords with argon2id at the configured cost, on a bounded pool.
pub struct Hasher {
    permits: Arc<Semaphore>,
    argon2: Argon2<'static>,
    waiting: AtomicUsize,
}

impl Hasher {
    pub fn new(
        workers: usize,
        memory_kib: u32,
        iterations: u32,
        parallelism: u32,
    ) -> anyhow::Result<Self> {
        let params = Params::new(memory_kib, iterations, parallelism, None)
            .map_err(|e| anyhow::anyhow!("invalid argon2 parameters: {e}"))?;
        Ok(Hasher {
            permits: Arc::new(Semaphore::new(workers.max(1))),
            argon2: Argon2::new(Algorithm::Argon2id, Version::V0x13, params),
            waiting: AtomicUsize::new(0),
        })
    }

    /// Calls waiting for a hashing worker right now (for logs and metrics).
    pub fn queue_depth(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// A new argon2id PHC string for `password`.
    pub async fn hash(&self, password: String) -> Result<String> {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let permit = self.permits.clone().acquire_owned().await;
        self.waiting.fetch_sub(1, Ordering::Relaxed);
        let permit = permit.map_err(Error::internal)?;
        let argon2 = self.argon2.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let salt = SaltString::generate(&mut rand::rngs::OsRng);
            argon2
                .hash_password(password.as_bytes(), &salt)
                .map(|h| h.to_string())
                .map_err(|e| Error::internal(anyhow::anyhow!("argon2: {e}")))
        })
        .await
        .map_err(Error::internal)?
    }
}

/// Passwords are 8 to 1,024 characters (NIST 800-63B: length, not composition rules).
pub fn check_password_policy(password: &str) -> std::result::Result<(), String> {
    let n = password.chars().count();
    if n < 8 {
        return Err("must be at least 8 characters".into());
    }
    if n > 1024 {
        return Err("must be at most 1024 characters".into());
    }
    Ok(())
}

/// The hash formats accepted on create, set and import.
pub const ACCEPTED_HASH_FORMATS: &str = "PHC argon2id/argon2i/argon2d, bcrypt ($2a$, $2b$, $2y$), \
    PHC pbkdf2-sha256/pbkdf2-sha512, PHC scrypt";

/// Checks that `hash` is in an accepted format, so it can be verified at sign-in.
pub fn check_hash_format(hash: &str) -> std::result::Result<(), String> {
    let err = || format!("not a supported password hash; accepted: {ACCEPTED_HASH_FORMATS}");
    if hash.len() > 1024 {
        return Err(err());
    }
    if is_bcrypt(hash) {
        return Ok(());
    }
    let phc = PasswordHash::new(hash).map_err(|_| err())?;
    if phc.hash.is_none() {
        return Err(err());
    }
    match phc.algorithm.as_str() {
        "argon2id" | "argon2i" | "argon2d" => {
            Params::try_from(&phc).map_err(|e| format!("invalid argon2 parameters: {e}"))?;
            Ok(())
        }
        "pbkdf2-sha256" | "pbkdf2-sha512" | "scrypt" => Ok(()),
        _ => Err(err()),
    }
}

/// `$2a$`, `$2b$` or `$2y$`, a two-digit cost of 4 to 31, and 53 characters of bcrypt base64.
fn is_bcrypt(hash: &str) -> bool {
    let b = hash.as_bytes();
    b.len() == 60
        && (hash.starts_with("$2a$") || hash.starts_with("$2b$") || hash.starts_with("$2y$"))
        && b[6] == b'$'
        && hash[4..6]
            .parse::<u32>()
            .is_ok_and(|c| (4..=31).contains(&c))
        && b[7..]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'.' || *c == b'/')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_hash_formats() {
        for ok in [
            "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$W7wzG3zJx4bC4aCqb9jB8ODm3pLoT9H0yJu5QwZ9vYw",
            "$2b$10$N9qo8uLOickgx2ZMRZoMyeIjZAgcfl7p92ldGxad68LJZdL17lhWy",
            "$pbkdf2-sha256$i=600000,l=32$c29tZXNhbHQ$T6QzUU0zNlNxWVZ0cGs3ZmJ6bXp4c0p6dXhtN0RkZkE",
            "$scrypt$ln=17,r=8,p=1$c29tZXNhbHQ$T6QzUU0zNlNxWVZ0cGs3ZmJ6bXp4c0p6dXhtN0RkZkE",
        ] {
            assert!(
                check_hash_format(ok).is_ok(),
                "{ok}: {:?}",
                check_hash_format(ok)
            );
        }
        for bad in [
            "",
            "plaintext",
            "$1$abc$def",
            "$2b$99$N9qo8uLOickgx2ZMRZoMyeIjZAgcfl7p92ldGxad68LJZdL17lhWy",
            "$md5$x$y",
            "$argon2id$v=19$m=1,t=0,p=0$c29tZXNhbHQ$aGFzaA",
        ] {
            assert!(check_hash_format(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn password_length_policy() {
        assert!(check_password_policy("short").is_err());
        assert!(check_password_policy("long enough").is_ok());
        assert!(check_password_policy(&"é".repeat(1024)).is_ok());
        assert!(check_password_policy(&"a".repeat(1025)).is_err());
    }
}

//! The password-hash formats Roster accepts (new argon2id ones and legacy ones brought in by
//! imports), their cost bounds, and verification in each.
//!
//! Every format is checked by its reference crate (`argon2`, `bcrypt`, `pbkdf2`, `scrypt`).
//! Cost parameters are bounded on the way in: an imported hash is attacker-controlled input,
//! and one with `bcrypt` cost 31 or a 4 GiB argon2 memory cost would turn every sign-in
//! attempt against it into a denial of service.
use argon2::password_hash::{PasswordHash, PasswordVerifier};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use subtle::ConstantTimeEq;

/// The hash formats accepted on create, set and import.
pub const ACCEPTED_HASH_FORMATS: &str = "PHC argon2id/argon2i/argon2d, bcrypt ($2a$, $2b$, $2y$), \
    PHC pbkdf2-sha256/pbkdf2-sha512, PHC scrypt";

/// Longest hash string accepted.
pub const MAX_HASH_LEN: usize = 1024;
/// Highest bcrypt cost accepted (2^16 rounds, seconds per check).
pub const MAX_BCRYPT_COST: u32 = 16;
/// Highest argon2 memory cost accepted, in KiB (256 MiB).
pub const MAX_ARGON2_MEMORY_KIB: u32 = 256 * 1024;
/// Highest argon2 iteration count accepted.
pub const MAX_ARGON2_ITERATIONS: u32 = 16;
/// Highest argon2 parallelism accepted.
pub const MAX_ARGON2_PARALLELISM: u32 = 16;
/// Highest PBKDF2 iteration count accepted.
pub const MAX_PBKDF2_ITERATIONS: u32 = 5_000_000;
/// Most memory an scrypt hash may need (128 · r · 2^ln bytes): 256 MiB.
pub const MAX_SCRYPT_MEMORY_BYTES: u64 = 256 * 1024 * 1024;
/// Highest scrypt parallelism accepted.
pub const MAX_SCRYPT_PARALLELISM: u32 = 16;

/// A parsed, bounded hash.
pub enum Format<'a> {
    Argon2 {
        phc: PasswordHash<'a>,
        algorithm: Algorithm,
        version: Version,
        params: Params,
    },
    Bcrypt,
    Pbkdf2(PasswordHash<'a>),
    Scrypt(PasswordHash<'a>),
}

impl Format<'_> {
    /// The algorithm's name, for events (`argon2id`, `bcrypt`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            Format::Argon2 { algorithm, .. } => match algorithm {
                Algorithm::Argon2d => "argon2d",
                Algorithm::Argon2i => "argon2i",
                Algorithm::Argon2id => "argon2id",
            },
            Format::Bcrypt => "bcrypt",
            Format::Pbkdf2(phc) if phc.algorithm.as_str() == "pbkdf2-sha512" => "pbkdf2-sha512",
            Format::Pbkdf2(_) => "pbkdf2-sha256",
            Format::Scrypt(_) => "scrypt",
        }
    }
}

/// The first argon2 parameter above its bound, as (what, value, bound): the bounds on stored
/// and imported hashes, which the hasher's own settings must keep too.
pub fn argon2_over_bound(
    memory_kib: u32,
    iterations: u32,
    parallelism: u32,
) -> Option<(&'static str, u32, u32)> {
    [
        ("memory cost (KiB)", memory_kib, MAX_ARGON2_MEMORY_KIB),
        ("iterations", iterations, MAX_ARGON2_ITERATIONS),
        ("parallelism", parallelism, MAX_ARGON2_PARALLELISM),
    ]
    .into_iter()
    .find(|&(_, value, max)| value > max)
}

/// Parses `hash` as one of the accepted formats within the cost bounds; the error says why not.
pub fn parse(hash: &str) -> Result<Format<'_>, String> {
    let unsupported =
        || format!("is not a supported password hash; accepted: {ACCEPTED_HASH_FORMATS}");
    if hash.len() > MAX_HASH_LEN {
        return Err(format!("must be at most {MAX_HASH_LEN} characters"));
    }
    if let Some(cost) = bcrypt_cost(hash) {
        if cost > MAX_BCRYPT_COST {
            return Err(format!("bcrypt cost must be at most {MAX_BCRYPT_COST}"));
        }
        return Ok(Format::Bcrypt);
    }
    let phc = PasswordHash::new(hash).map_err(|_| unsupported())?;
    if phc.hash.is_none() || phc.salt.is_none() {
        return Err(unsupported());
    }
    match phc.algorithm.as_str() {
        "argon2id" | "argon2i" | "argon2d" => {
            let algorithm = Algorithm::try_from(phc.algorithm).map_err(|_| unsupported())?;
            let version = match phc.version {
                Some(v) => {
                    Version::try_from(v).map_err(|_| "unknown argon2 version".to_string())?
                }
                None => Version::default(),
            };
            let too_big = || {
                format!(
                    "argon2 parameters must be at most m={MAX_ARGON2_MEMORY_KIB}, \
                     t={MAX_ARGON2_ITERATIONS}, p={MAX_ARGON2_PARALLELISM}"
                )
            };
            // Bounds first, on every occurrence of each parameter: argon2's own check
            // multiplies p by 8 in u32 and panics on overflow in checked builds (found by
            // fuzzing: p=1888888888).
            for (name, value) in phc.params.iter() {
                let limit = match name.as_str() {
                    "m" => MAX_ARGON2_MEMORY_KIB,
                    "t" => MAX_ARGON2_ITERATIONS,
                    "p" => MAX_ARGON2_PARALLELISM,
                    _ => continue,
                };
                if value.decimal().map_or(true, |v| v > limit) {
                    return Err(too_big());
                }
            }
            let params =
                Params::try_from(&phc).map_err(|e| format!("invalid argon2 parameters: {e}"))?;
            if argon2_over_bound(params.m_cost(), params.t_cost(), params.p_cost()).is_some() {
                return Err(too_big());
            }
            Ok(Format::Argon2 {
                phc,
                algorithm,
                version,
                params,
            })
        }
        "pbkdf2-sha256" | "pbkdf2-sha512" => {
            let params = pbkdf2::Params::try_from(&phc)
                .map_err(|e| format!("invalid pbkdf2 parameters: {e}"))?;
            if params.rounds > MAX_PBKDF2_ITERATIONS {
                return Err(format!(
                    "pbkdf2 iterations must be at most {MAX_PBKDF2_ITERATIONS}"
                ));
            }
            Ok(Format::Pbkdf2(phc))
        }
        "scrypt" => {
            let params = scrypt::Params::try_from(&phc)
                .map_err(|e| format!("invalid scrypt parameters: {e}"))?;
            // ln is at most 63 here; anything above 30 is far over the bound anyway.
            let memory = if params.log_n() > 30 {
                u64::MAX
            } else {
                (128 * u64::from(params.r())) << params.log_n()
            };
            if memory > MAX_SCRYPT_MEMORY_BYTES || params.p() > MAX_SCRYPT_PARALLELISM {
                return Err(format!(
                    "scrypt parameters must need at most {} MiB (128·r·2^ln bytes) and p ≤ \
                     {MAX_SCRYPT_PARALLELISM}",
                    MAX_SCRYPT_MEMORY_BYTES >> 20
                ));
            }
            Ok(Format::Scrypt(phc))
        }
        _ => Err(unsupported()),
    }
}

/// The cost of a well-formed bcrypt hash: `$2a$`, `$2b$` or `$2y$`, two digits, `$`, and 53
/// characters of bcrypt base64.
fn bcrypt_cost(hash: &str) -> Option<u32> {
    let b = hash.as_bytes();
    let well_formed = b.len() == 60
        && (hash.starts_with("$2a$") || hash.starts_with("$2b$") || hash.starts_with("$2y$"))
        && b[6] == b'$'
        && b[7..]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'.' || *c == b'/');
    if !well_formed {
        return None;
    }
    hash[4..6]
        .parse::<u32>()
        .ok()
        .filter(|c| (4..=31).contains(c))
}

/// Checks `password` against a parsed hash. argon2 runs in `blocks` (reused between calls, so
/// a verification does not fault in tens of MiB of fresh pages each time).
pub fn verify(
    format: &Format<'_>,
    hash: &str,
    password: &[u8],
    blocks: &mut Vec<Block>,
) -> anyhow::Result<bool> {
    match format {
        Format::Argon2 {
            phc,
            algorithm,
            version,
            params,
        } => {
            let (Some(salt), Some(expected)) = (phc.salt, phc.hash) else {
                anyhow::bail!("argon2 hash without salt or output");
            };
            let mut salt_buf = [0u8; 64];
            let salt = salt
                .decode_b64(&mut salt_buf)
                .map_err(|e| anyhow::anyhow!("argon2 salt: {e}"))?;
            let params = Params::new(
                params.m_cost(),
                params.t_cost(),
                params.p_cost(),
                Some(expected.len()),
            )
            .map_err(|e| anyhow::anyhow!("argon2 parameters: {e}"))?;
            let need = params.block_count();
            if blocks.len() < need {
                blocks.resize(need, Block::default());
            }
            let mut out = vec![0u8; expected.len()];
            Argon2::new(*algorithm, *version, params)
                .hash_password_into_with_memory(password, salt, &mut out, &mut blocks[..need])
                .map_err(|e| anyhow::anyhow!("argon2: {e}"))?;
            Ok(bool::from(out.as_slice().ct_eq(expected.as_bytes())))
        }
        Format::Bcrypt => {
            bcrypt::verify(password, hash).map_err(|e| anyhow::anyhow!("bcrypt: {e}"))
        }
        Format::Pbkdf2(phc) => Ok(pbkdf2::Pbkdf2.verify_password(password, phc).is_ok()),
        Format::Scrypt(phc) => Ok(scrypt::Scrypt.verify_password(password, phc).is_ok()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_formats_and_bounds() {
        for ok in [
            "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$W7wzG3zJx4bC4aCqb9jB8ODm3pLoT9H0yJu5QwZ9vYw",
            "$2b$10$N9qo8uLOickgx2ZMRZoMyeIjZAgcfl7p92ldGxad68LJZdL17lhWy",
            "$pbkdf2-sha256$i=600000,l=32$c29tZXNhbHQ$T6QzUU0zNlNxWVZ0cGs3ZmJ6bXp4c0p6dXhtN0RkZkE",
            "$scrypt$ln=17,r=8,p=1$c29tZXNhbHQ$T6QzUU0zNlNxWVZ0cGs3ZmJ6bXp4c0p6dXhtN0RkZkE",
        ] {
            assert!(parse(ok).is_ok(), "{ok}: {:?}", parse(ok).err());
        }
        for bad in [
            "",
            "plaintext",
            "$1$abc$def",
            "$md5$x$y",
            "$argon2id$v=19$m=1,t=0,p=0$c29tZXNhbHQ$aGFzaA",
        ] {
            assert!(
                parse(bad).err().unwrap_or_default().contains("accepted:")
                    || bad.starts_with("$argon2"),
                "{bad}"
            );
        }
        // Costs that would make each sign-in a denial of service.
        for (bad, says) in [
            (
                "$2b$17$N9qo8uLOickgx2ZMRZoMyeIjZAgcfl7p92ldGxad68LJZdL17lhWy",
                "bcrypt cost",
            ),
            (
                "$argon2id$v=19$m=4194304,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$W7wzG3zJx4bC4aCqb9jB8ODm3pLoT9H0yJu5QwZ9vYw",
                "argon2 parameters",
            ),
            // Found by fuzzing: argon2's own check overflowed (p * 8) and panicked.
            (
                "$argon2i$m=9,p=8,p=41,p=1,p=1888888888$1alAX0EzO8888888883$1alAX0EzOTTg79U",
                "argon2 parameters",
            ),
            (
                "$argon2id$v=19$m=65536,t=2,p=1073741824$c29tZXNhbHRzb21lc2FsdA$W7wzG3zJx4bC4aCqb9jB8ODm3pLoT9H0yJu5QwZ9vYw",
                "argon2 parameters",
            ),
            (
                "$pbkdf2-sha256$i=90000000,l=32$c29tZXNhbHQ$T6QzUU0zNlNxWVZ0cGs3ZmJ6bXp4c0p6dXhtN0RkZkE",
                "pbkdf2 iterations",
            ),
            (
                "$scrypt$ln=22,r=8,p=1$c29tZXNhbHQ$T6QzUU0zNlNxWVZ0cGs3ZmJ6bXp4c0p6dXhtN0RkZkE",
                "scrypt parameters",
            ),
        ] {
            let err = parse(bad).err().unwrap_or_default();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }
}

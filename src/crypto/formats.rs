//! The password-hash formats Roster accepts (new argon2id ones and legacy ones brought in by
//! imports), their cost bounds, and verification in each.
//!
//! Every format is checked by its reference crate (`argon2`, `bcrypt`, `pbkdf2`, `scrypt`,
//! `sha-crypt`); for the frameworks' own encodings of those (Django, Werkzeug) only the text
//! around the hash is ours, and Firebase's scrypt is that crate's scrypt and `aes`'s AES-CTR
//! put together as Firebase publishes it.
//! Cost parameters are bounded on the way in: an imported hash is attacker-controlled input,
//! and one with `bcrypt` cost 31 or a 4 GiB argon2 memory cost would turn every sign-in
//! attempt against it into a denial of service.
use argon2::password_hash::{PasswordHash, PasswordVerifier};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use subtle::ConstantTimeEq;

/// The hash formats accepted on create, set and import.
pub const ACCEPTED_HASH_FORMATS: &str = "PHC argon2id/argon2i/argon2d, bcrypt ($2a$, $2b$, $2y$), \
    PHC pbkdf2 (SHA-1)/pbkdf2-sha256/pbkdf2-sha512, PHC scrypt, SHA-crypt ($5$, $6$), \
    Django (pbkdf2_sha256$, pbkdf2_sha1$, argon2$, bcrypt$, bcrypt_sha256$), \
    Werkzeug (pbkdf2:sha256:N$, pbkdf2:sha512:N$, pbkdf2:sha1:N$, scrypt:N:r:p$), \
    passlib pbkdf2 ($pbkdf2-sha256$N$, $pbkdf2-sha512$N$, $pbkdf2$N$), \
    Firebase scrypt ($firescrypt$)";

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
/// Highest SHA-crypt round count accepted (glibc's default is 5,000, passlib's 656,000).
pub const MAX_SHA_CRYPT_ROUNDS: u32 = 1_000_000;
/// Longest salt of a framework hash (Django's are 22 characters, Werkzeug's 16).
const MAX_SALT_LEN: usize = 128;

/// A parsed, bounded hash.
pub enum Format<'a> {
    Argon2 {
        phc: PasswordHash<'a>,
        algorithm: Algorithm,
        version: Version,
        params: Params,
    },
    /// `hash` is the bcrypt string itself; `sha256_first` for Django's bcrypt_sha256, which
    /// hashes the password's hex SHA-256 digest (so that passwords past bcrypt's 72 bytes
    /// count in full).
    Bcrypt {
        hash: &'a str,
        sha256_first: bool,
    },
    Pbkdf2(PasswordHash<'a>),
    Scrypt(PasswordHash<'a>),
    /// `$5$` (SHA-256) or `$6$` (SHA-512) crypt, as in /etc/shadow, LDAP and Dovecot.
    ShaCrypt {
        sha512: bool,
    },
    /// Firebase Authentication's modified scrypt, in Ory Kratos's encoding
    /// `$firescrypt$ln=<mem_cost>,r=<rounds>,p=1$<salt>$<hash>$<salt separator>$<signer key>`
    /// (standard base64): the hash is the project's signer key encrypted with AES-256-CTR
    /// (zero IV) under scrypt(password, salt ‖ separator).
    Firebase {
        params: scrypt::Params,
        salt: Vec<u8>,
        separator: Vec<u8>,
        signer_key: Vec<u8>,
        expected: Vec<u8>,
    },
    /// PBKDF2 or scrypt with the salt and expected output taken apart: the frameworks' own
    /// encodings (Django, Werkzeug; the salt is its text's bytes) and PHC `$pbkdf2$` (SHA-1,
    /// which the `pbkdf2` crate's PHC support does not cover). The output's length is the
    /// expected hash's.
    Salted {
        kdf: Kdf,
        salt: Vec<u8>,
        expected: Vec<u8>,
    },
}

/// The key derivation of a [`Format::Salted`] hash.
pub enum Kdf {
    Pbkdf2Sha1 { rounds: u32 },
    Pbkdf2Sha256 { rounds: u32 },
    Pbkdf2Sha512 { rounds: u32 },
    Scrypt(scrypt::Params),
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
            Format::Bcrypt {
                sha256_first: false,
                ..
            } => "bcrypt",
            Format::Bcrypt {
                sha256_first: true, ..
            } => "bcrypt-sha256",
            Format::Pbkdf2(phc) if phc.algorithm.as_str() == "pbkdf2-sha512" => "pbkdf2-sha512",
            Format::Pbkdf2(_) => "pbkdf2-sha256",
            Format::Scrypt(_) => "scrypt",
            Format::Firebase { .. } => "firebase-scrypt",
            Format::ShaCrypt { sha512: false } => "sha256-crypt",
            Format::ShaCrypt { sha512: true } => "sha512-crypt",
            Format::Salted { kdf, .. } => match kdf {
                Kdf::Pbkdf2Sha1 { .. } => "pbkdf2-sha1",
                Kdf::Pbkdf2Sha256 { .. } => "pbkdf2-sha256",
                Kdf::Pbkdf2Sha512 { .. } => "pbkdf2-sha512",
                Kdf::Scrypt(_) => "scrypt",
            },
        }
    }
}

/// The algorithm names of [`Format::name`], for the `password_format` filter.
pub const FORMAT_NAMES: &[&str] = &[
    "argon2id",
    "argon2i",
    "argon2d",
    "bcrypt",
    "bcrypt-sha256",
    "pbkdf2-sha1",
    "pbkdf2-sha256",
    "pbkdf2-sha512",
    "scrypt",
    "firebase-scrypt",
    "sha256-crypt",
    "sha512-crypt",
];

/// [`Format::name`] of a stored `password_hash`, in SQL (NULL without a hash): by the prefix
/// [`parse`] tells each format by, so a listing can tell the users a migration has not yet
/// moved to argon2id without parsing every hash. Only accepted hashes are ever stored.
pub const FORMAT_SQL: &str = "(CASE \
    WHEN password_hash LIKE '$argon2id$%' OR password_hash LIKE 'argon2$argon2id$%' THEN 'argon2id' \
    WHEN password_hash LIKE '$argon2i$%' OR password_hash LIKE 'argon2$argon2i$%' THEN 'argon2i' \
    WHEN password_hash LIKE '$argon2d$%' OR password_hash LIKE 'argon2$argon2d$%' THEN 'argon2d' \
    WHEN password_hash LIKE 'bcrypt\\_sha256$%' THEN 'bcrypt-sha256' \
    WHEN password_hash LIKE '$2_$%' OR password_hash LIKE 'bcrypt$%' THEN 'bcrypt' \
    WHEN password_hash LIKE '$pbkdf2$%' OR password_hash LIKE 'pbkdf2:sha1:%' \
         OR password_hash LIKE 'pbkdf2\\_sha1$%' THEN 'pbkdf2-sha1' \
    WHEN password_hash LIKE '$pbkdf2-sha512$%' OR password_hash LIKE 'pbkdf2:sha512:%' \
         THEN 'pbkdf2-sha512' \
    WHEN password_hash LIKE '$pbkdf2-sha256$%' OR password_hash LIKE 'pbkdf2:sha256:%' \
         OR password_hash LIKE 'pbkdf2\\_sha256$%' THEN 'pbkdf2-sha256' \
    WHEN password_hash LIKE '$scrypt$%' OR password_hash LIKE 'scrypt:%' THEN 'scrypt' \
    WHEN password_hash LIKE '$firescrypt$%' THEN 'firebase-scrypt' \
    WHEN password_hash LIKE '$5$%' THEN 'sha256-crypt' \
    WHEN password_hash LIKE '$6$%' THEN 'sha512-crypt' END)";

/// A `password_format` filter value: one of [`FORMAT_NAMES`].
pub fn format_name(name: &str) -> Option<&'static str> {
    FORMAT_NAMES.iter().copied().find(|n| *n == name)
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
    if hash.len() > MAX_HASH_LEN {
        return Err(format!("must be at most {MAX_HASH_LEN} characters"));
    }
    // Django prefixes its hasher's name: `bcrypt$` and `argon2$` to the library's own
    // string, `bcrypt_sha256$` to a bcrypt of the password's SHA-256.
    if let Some(rest) = hash.strip_prefix("bcrypt_sha256$") {
        return bcrypt(rest, true);
    }
    if let Some(rest) = hash.strip_prefix("bcrypt$") {
        return bcrypt(rest, false);
    }
    if hash.starts_with("argon2$argon2") {
        return phc(&hash["argon2".len()..]);
    }
    if let Some(rest) = hash.strip_prefix("pbkdf2_sha256$") {
        return django_pbkdf2(rest, false);
    }
    if let Some(rest) = hash.strip_prefix("pbkdf2_sha1$") {
        return django_pbkdf2(rest, true);
    }
    if hash.starts_with("pbkdf2:") || hash.starts_with("scrypt:") {
        return werkzeug(hash);
    }
    if hash.starts_with("$5$") || hash.starts_with("$6$") {
        return sha_crypt(hash);
    }
    if let Some(rest) = hash.strip_prefix("$firescrypt$") {
        return firebase(rest);
    }
    if let Some(format) = passlib_pbkdf2(hash) {
        return format;
    }
    if bcrypt_cost(hash).is_some() {
        return bcrypt(hash, false);
    }
    phc(hash)
}

fn unsupported() -> String {
    format!("is not a supported password hash; accepted: {ACCEPTED_HASH_FORMATS}")
}

fn bcrypt(hash: &str, sha256_first: bool) -> Result<Format<'_>, String> {
    let cost = bcrypt_cost(hash).ok_or_else(unsupported)?;
    if cost > MAX_BCRYPT_COST {
        return Err(format!("bcrypt cost must be at most {MAX_BCRYPT_COST}"));
    }
    Ok(Format::Bcrypt { hash, sha256_first })
}

/// A PHC string: argon2, pbkdf2 or scrypt.
fn phc(hash: &str) -> Result<Format<'_>, String> {
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
        // SHA-1: what Keycloak (`pbkdf2`) and passlib wrote before SHA-2 became their default.
        "pbkdf2" => {
            let params = pbkdf2::Params::try_from(&phc)
                .map_err(|e| format!("invalid pbkdf2 parameters: {e}"))?;
            let (Some(salt), Some(expected)) = (phc.salt, phc.hash) else {
                return Err(unsupported());
            };
            let mut buf = [0u8; MAX_SALT_LEN];
            let salt = salt
                .decode_b64(&mut buf)
                .map_err(|_| "pbkdf2 salt is not base64".to_string())?;
            Ok(Format::Salted {
                kdf: Kdf::Pbkdf2Sha1 {
                    rounds: pbkdf2_bound(params.rounds)?,
                },
                salt: salt.to_vec(),
                expected: expected_len(expected.as_bytes().to_vec())?,
            })
        }
        "scrypt" => {
            let params = scrypt::Params::try_from(&phc)
                .map_err(|e| format!("invalid scrypt parameters: {e}"))?;
            scrypt_bounds(&params)?;
            Ok(Format::Scrypt(phc))
        }
        _ => Err(unsupported()),
    }
}

fn scrypt_bounds(params: &scrypt::Params) -> Result<(), String> {
    // ln is at most 63 here; anything above 30 is far over the bound anyway.
    let memory = if params.log_n() > 30 {
        u64::MAX
    } else {
        (128 * u64::from(params.r())) << params.log_n()
    };
    if memory > MAX_SCRYPT_MEMORY_BYTES || params.p() > MAX_SCRYPT_PARALLELISM {
        return Err(scrypt_bounds_text());
    }
    Ok(())
}

fn scrypt_bounds_text() -> String {
    format!(
        "scrypt parameters must need at most {} MiB (128·r·2^ln bytes) and p ≤ \
         {MAX_SCRYPT_PARALLELISM}",
        MAX_SCRYPT_MEMORY_BYTES >> 20
    )
}

fn pbkdf2_rounds(text: &str) -> Result<u32, String> {
    let rounds: u32 = text
        .parse()
        .map_err(|_| format!("pbkdf2 iterations {text:?} are not a number"))?;
    pbkdf2_bound(rounds)
}

fn pbkdf2_bound(rounds: u32) -> Result<u32, String> {
    if !(1..=MAX_PBKDF2_ITERATIONS).contains(&rounds) {
        return Err(format!(
            "pbkdf2 iterations must be 1..={MAX_PBKDF2_ITERATIONS}"
        ));
    }
    Ok(rounds)
}

/// A framework's salt: text of its own (the KDF takes its bytes), no `$`.
fn salt_text(salt: &str) -> Result<Vec<u8>, String> {
    if salt.is_empty() || salt.len() > MAX_SALT_LEN {
        return Err(format!("salt must be 1..={MAX_SALT_LEN} characters"));
    }
    Ok(salt.as_bytes().to_vec())
}

/// A derived key of 16..=64 bytes, the range of the hashes these frameworks write.
fn expected_len(bytes: Vec<u8>) -> Result<Vec<u8>, String> {
    if !(16..=64).contains(&bytes.len()) {
        return Err("hash must be 16..=64 bytes".into());
    }
    Ok(bytes)
}

/// passlib's PBKDF2 (`pbkdf2_sha256` and friends; ZITADEL's passwap writes it too):
/// `$pbkdf2-sha256$<iterations>$<salt>$<key>` in passlib's base64 (`.` for `+`, unpadded).
/// None when the hash is not of that shape (a PHC `$pbkdf2...$i=...` string is not: its
/// second field is not a bare number).
fn passlib_pbkdf2(hash: &str) -> Option<Result<Format<'_>, String>> {
    use base64::Engine as _;
    let mut parts = hash.split('$');
    let (Some(""), Some(name), Some(rounds), Some(salt), Some(key), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return None;
    };
    if rounds.is_empty() || !rounds.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let kind = match name {
        "pbkdf2" => 1,
        "pbkdf2-sha256" => 256,
        "pbkdf2-sha512" => 512,
        _ => return None,
    };
    let ab64 = |text: &str| {
        base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(text.replace('.', "+"))
            .map_err(|_| format!("passlib {name} salt and hash must be passlib's base64"))
    };
    Some((|| {
        let rounds = pbkdf2_rounds(rounds)?;
        let salt = ab64(salt)?;
        if salt.is_empty() || salt.len() > MAX_SALT_LEN {
            return Err(format!("salt must be 1..={MAX_SALT_LEN} bytes"));
        }
        Ok(Format::Salted {
            kdf: match kind {
                1 => Kdf::Pbkdf2Sha1 { rounds },
                256 => Kdf::Pbkdf2Sha256 { rounds },
                _ => Kdf::Pbkdf2Sha512 { rounds },
            },
            salt,
            expected: expected_len(ab64(key)?)?,
        })
    })())
}

/// Django's default hasher, `pbkdf2_sha256$<iterations>$<salt>$<base64 of the key>`, or its
/// older `pbkdf2_sha1$...`.
fn django_pbkdf2(rest: &str, sha1: bool) -> Result<Format<'_>, String> {
    use base64::Engine as _;
    let name = if sha1 { "pbkdf2_sha1" } else { "pbkdf2_sha256" };
    let mut parts = rest.split('$');
    let (Some(rounds), Some(salt), Some(key), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(format!(
            "Django {name} hashes are {name}$<iterations>$<salt>$<hash>"
        ));
    };
    let key = base64::engine::general_purpose::STANDARD
        .decode(key)
        .map_err(|_| format!("Django {name} hash is not base64"))?;
    let rounds = pbkdf2_rounds(rounds)?;
    Ok(Format::Salted {
        kdf: if sha1 {
            Kdf::Pbkdf2Sha1 { rounds }
        } else {
            Kdf::Pbkdf2Sha256 { rounds }
        },
        salt: salt_text(salt)?,
        expected: expected_len(key)?,
    })
}

/// Werkzeug's (Flask's): `pbkdf2:sha256:<iterations>$<salt>$<hex>`, `pbkdf2:sha512:...`,
/// `scrypt:<n>:<r>:<p>$<salt>$<hex>`. The parameters must be written out: Werkzeug's
/// defaults for omitted ones changed between versions.
fn werkzeug(hash: &str) -> Result<Format<'_>, String> {
    let shape = "Werkzeug hashes are pbkdf2:sha256:<iterations>$<salt>$<hex> or \
                 scrypt:<n>:<r>:<p>$<salt>$<hex>";
    let mut parts = hash.split('$');
    let (Some(method), Some(salt), Some(key), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(shape.into());
    };
    let method: Vec<&str> = method.split(':').collect();
    let kdf = match method[..] {
        ["pbkdf2", "sha256", rounds] => Kdf::Pbkdf2Sha256 {
            rounds: pbkdf2_rounds(rounds)?,
        },
        ["pbkdf2", "sha512", rounds] => Kdf::Pbkdf2Sha512 {
            rounds: pbkdf2_rounds(rounds)?,
        },
        ["pbkdf2", "sha1", rounds] => Kdf::Pbkdf2Sha1 {
            rounds: pbkdf2_rounds(rounds)?,
        },
        ["scrypt", n, r, p] => {
            let number = |t: &str| t.parse::<u32>().map_err(|_| shape.to_string());
            let n = number(n)?;
            if !n.is_power_of_two() || n < 2 {
                return Err("scrypt n must be a power of two".into());
            }
            let params = scrypt::Params::new(n.trailing_zeros() as u8, number(r)?, number(p)?, 16)
                .map_err(|e| format!("invalid scrypt parameters: {e}"))?;
            scrypt_bounds(&params)?;
            Kdf::Scrypt(params)
        }
        _ => return Err(shape.into()),
    };
    let key = hex::decode(key).map_err(|_| format!("{shape} (the hash is not hex)"))?;
    Ok(Format::Salted {
        kdf,
        salt: salt_text(salt)?,
        expected: expected_len(key)?,
    })
}

/// Firebase's scrypt, after `$firescrypt$`: `ln=<mem_cost>,r=<rounds>,p=<p>`, then salt, hash,
/// salt separator and signer key in standard base64 (Firebase's export and console give them
/// so). The hash is as long as the signer key (Firebase's are 64 bytes).
fn firebase(rest: &str) -> Result<Format<'_>, String> {
    use base64::Engine as _;
    let shape = "Firebase scrypt hashes are $firescrypt$ln=<mem_cost>,r=<rounds>,p=1$<salt>$\
                 <hash>$<salt separator>$<signer key>, the last four in base64";
    let fields: Vec<&str> = rest.split('$').collect();
    let [params, salt, hash, separator, signer_key] = fields[..] else {
        return Err(shape.into());
    };
    let mut ln = None;
    let mut r = None;
    let mut p = None;
    for pair in params.split(',') {
        let (name, value) = pair.split_once('=').ok_or_else(|| shape.to_string())?;
        let slot = match name {
            "ln" => &mut ln,
            "r" => &mut r,
            "p" => &mut p,
            _ => return Err(shape.into()),
        };
        let value: u32 = value.parse().map_err(|_| shape.to_string())?;
        if slot.replace(value).is_some() {
            return Err(shape.into());
        }
    }
    let (Some(ln), Some(r), Some(p)) = (ln, r, p) else {
        return Err(shape.into());
    };
    if ln > 30 {
        return Err(scrypt_bounds_text());
    }
    // Output length 32: the AES-256 key.
    let params = scrypt::Params::new(ln as u8, r, p, 32)
        .map_err(|e| format!("invalid scrypt parameters: {e}"))?;
    scrypt_bounds(&params)?;
    let decode = |what: &str, text: &str, range: std::ops::RangeInclusive<usize>| {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|_| format!("{shape} (the {what} is not base64)"))?;
        if !range.contains(&bytes.len()) {
            return Err(format!(
                "Firebase scrypt {what} must be {}..={} bytes",
                range.start(),
                range.end()
            ));
        }
        Ok(bytes)
    };
    let signer_key = decode("signer key", signer_key, 16..=128)?;
    let expected = decode("hash", hash, 16..=128)?;
    if expected.len() != signer_key.len() {
        return Err("Firebase scrypt hash must be as long as the signer key".into());
    }
    Ok(Format::Firebase {
        params,
        salt: decode("salt", salt, 1..=MAX_SALT_LEN)?,
        separator: decode("salt separator", separator, 0..=16)?,
        signer_key,
        expected,
    })
}

/// `$5$[rounds=N$]<salt>$<hash>` or `$6$...`, checked field by field so that verification
/// (by `sha-crypt`) never meets a string it reads differently.
fn sha_crypt(hash: &str) -> Result<Format<'_>, String> {
    let sha512 = hash.starts_with("$6$");
    let shape = "SHA-crypt hashes are $5$ or $6$, [rounds=N$], a salt of up to 16 characters, $, \
                 and the hash";
    let fields: Vec<&str> = hash[3..].split('$').collect();
    let (rounds, salt, key) = match fields[..] {
        [salt, key] => (None, salt, key),
        [rounds, salt, key] => (Some(rounds), salt, key),
        _ => return Err(shape.into()),
    };
    if let Some(rounds) = rounds {
        let n: u32 = rounds
            .strip_prefix("rounds=")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| shape.to_string())?;
        // glibc writes what it used, never below 1,000.
        if !(1_000..=MAX_SHA_CRYPT_ROUNDS).contains(&n) {
            return Err(format!(
                "SHA-crypt rounds must be 1000..={MAX_SHA_CRYPT_ROUNDS}"
            ));
        }
    }
    let crypt64 = |t: &str| {
        t.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'.' || c == b'/')
    };
    let key_len = if sha512 { 86 } else { 43 };
    if salt.len() > 16 || salt.starts_with("rounds=") || key.len() != key_len || !crypt64(key) {
        return Err(shape.into());
    }
    Ok(Format::ShaCrypt { sha512 })
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
        Format::Bcrypt { hash, sha256_first } => {
            let digest;
            let password = if *sha256_first {
                use sha2::Digest as _;
                digest = hex::encode(sha2::Sha256::digest(password));
                digest.as_bytes()
            } else {
                password
            };
            bcrypt::verify(password, hash).map_err(|e| anyhow::anyhow!("bcrypt: {e}"))
        }
        Format::Pbkdf2(phc) => Ok(pbkdf2::Pbkdf2.verify_password(password, phc).is_ok()),
        Format::Scrypt(phc) => Ok(scrypt::Scrypt.verify_password(password, phc).is_ok()),
        Format::Firebase {
            params,
            salt,
            separator,
            signer_key,
            expected,
        } => {
            use aes::cipher::{KeyIvInit as _, StreamCipher as _};
            let mut key = [0u8; 32];
            let salted = [salt.as_slice(), separator].concat();
            scrypt::scrypt(password, &salted, params, &mut key)
                .map_err(|e| anyhow::anyhow!("scrypt: {e}"))?;
            let mut out = signer_key.clone();
            ctr::Ctr128BE::<aes::Aes256>::new(&key.into(), &[0u8; 16].into())
                .apply_keystream(&mut out);
            Ok(bool::from(out.as_slice().ct_eq(expected)))
        }
        Format::ShaCrypt { .. } => {
            use sha_crypt::password_hash::{Error, PasswordVerifier as _};
            match sha_crypt::ShaCrypt::default().verify_password(password, hash) {
                Ok(()) => Ok(true),
                Err(Error::PasswordInvalid) => Ok(false),
                Err(e) => Err(anyhow::anyhow!("sha-crypt: {e}")),
            }
        }
        Format::Salted {
            kdf,
            salt,
            expected,
        } => {
            let mut out = vec![0u8; expected.len()];
            match kdf {
                Kdf::Pbkdf2Sha1 { rounds } => {
                    pbkdf2_sha1::pbkdf2_hmac::<sha1::Sha1>(password, salt, *rounds, &mut out)
                }
                Kdf::Pbkdf2Sha256 { rounds } => {
                    pbkdf2::pbkdf2_hmac::<sha2::Sha256>(password, salt, *rounds, &mut out)
                }
                Kdf::Pbkdf2Sha512 { rounds } => {
                    pbkdf2::pbkdf2_hmac::<sha2::Sha512>(password, salt, *rounds, &mut out)
                }
                Kdf::Scrypt(params) => scrypt::scrypt(password, salt, params, &mut out)
                    .map_err(|e| anyhow::anyhow!("scrypt: {e}"))?,
            }
            Ok(bool::from(out.as_slice().ct_eq(expected)))
        }
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
            "$pbkdf2-sha256$29000$N2YuJWQsZQ$OFvEcLOIPFd/oq8egf10i.qJLI7A8nDjPLnolCWarQY",
            "$pbkdf2$12$cmFuZG9tc2FsdGlzaGFyZA$mwUqsMixIYMc/0eN4v1.l3SVDpk",
        ] {
            let name = parse(ok).map(|f| f.name());
            assert!(name.is_ok(), "{ok}: {:?}", parse(ok).err());
            assert!(FORMAT_NAMES.contains(&name.unwrap()), "{ok} is filterable");
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
            (
                "$pbkdf2-sha256$90000000$c29tZXNhbHQ$T6QzUU0zNlNxWVZ0cGs3ZmJ6bXp4c0p6dXhtN0RkZkE",
                "pbkdf2 iterations",
            ),
            (
                "$pbkdf2-sha256$1000$c29t!$T6QzUU0zNlNxWVZ0",
                "passlib's base64",
            ),
            ("$pbkdf2-sha256$1000$c29tZXNhbHQ$T6Qz", "16..=64 bytes"),
        ] {
            let err = parse(bad).err().unwrap_or_default();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn framework_formats_are_parsed_strictly() {
        let sha512 = "zHds6jenH9HqnLCeIi7oExqGm4X6DZX38ZduOJeGVXRY5oyJCC/IUfYEsDwhhsrC9yXQ4PUqBo8m039aMRIVZ.";
        let hex32 = "931b959a5718874655f9af4cb79e0d769e067056f5d6a050ef419fe88c399b79";
        let key64 = "a".repeat(85) + "A==";
        let fire = |params: &str, salt: &str, hash: &str, sep: &str, key: &str| {
            format!("$firescrypt${params}${salt}${hash}${sep}${key}")
        };
        let p = "ln=14,r=8,p=1";
        for (ok, name) in [
            (format!("$6$rounds=10000$salt${sha512}"), "sha512-crypt"),
            (format!("$6$salt${sha512}"), "sha512-crypt"),
            (format!("$5$salt${}", &sha512[..43]), "sha256-crypt"),
            (
                format!("pbkdf2:sha256:600000$salt${hex32}"),
                "pbkdf2-sha256",
            ),
            (format!("scrypt:32768:8:1$salt${hex32}"), "scrypt"),
            (
                "pbkdf2_sha256$870000$salt$oAYrzfyuPoi+SvRaXjJ4joM0+SKgl6/evx19IAj8Wp4=".into(),
                "pbkdf2-sha256",
            ),
            (
                "bcrypt_sha256$$2b$10$N9qo8uLOickgx2ZMRZoMyeIjZAgcfl7p92ldGxad68LJZdL17lhWy".into(),
                "bcrypt-sha256",
            ),
            (
                format!("$firescrypt$ln=14,r=8,p=1$c2FsdA==${key64}$Bw==${key64}"),
                "firebase-scrypt",
            ),
            (format!("pbkdf2:sha1:20000$salt${hex32}"), "pbkdf2-sha1"),
            (
                "pbkdf2_sha1$10000$salt$/oWvuzD2PUF7FV8msQicE/JG0YA=".into(),
                "pbkdf2-sha1",
            ),
            (
                "$pbkdf2$i=20000,l=20$c2FsdHNhbHQ$/oWvuzD2PUF7FV8msQicE/JG0YA".into(),
                "pbkdf2-sha1",
            ),
            (
                format!("$firescrypt$p=1,r=8,ln=14$c2FsdA==${key64}$${key64}"),
                "firebase-scrypt",
            ),
        ] {
            let got = parse(&ok).map(|f| f.name());
            assert_eq!(got, Ok(name), "{ok}");
            assert!(FORMAT_NAMES.contains(&name), "{name} is filterable");
        }
        for (bad, says) in [
            (format!("$6$rounds=5000000$salt${sha512}"), "rounds must be"),
            (format!("$6$rounds=10$salt${sha512}"), "rounds must be"),
            (format!("$6$rounds=x$salt${sha512}"), "SHA-crypt hashes are"),
            (format!("$6$salt${}", &sha512[..43]), "SHA-crypt hashes are"),
            (format!("$6$seventeen-chars!!${sha512}"), "SHA-crypt hashes are"),
            (format!("$6$a$b$c${sha512}"), "SHA-crypt hashes are"),
            (format!("pbkdf2:sha256$salt${hex32}"), "Werkzeug hashes are"),
            (format!("pbkdf2:md5:1000$salt${hex32}"), "Werkzeug hashes are"),
            (format!("pbkdf2:sha256:0$salt${hex32}"), "pbkdf2 iterations"),
            (format!("pbkdf2:sha256:90000000$salt${hex32}"), "pbkdf2 iterations"),
            (format!("scrypt:1000:8:1$salt${hex32}"), "power of two"),
            (format!("scrypt:4194304:8:1$salt${hex32}"), "scrypt parameters"),
            (format!("scrypt:32768:8:99$salt${hex32}"), "scrypt parameters"),
            ("pbkdf2:sha256:1000$salt$zz".into(), "not hex"),
            ("pbkdf2:sha256:1000$salt$abcd".into(), "16..=64 bytes"),
            (format!("pbkdf2:sha256:1000$${hex32}"), "salt must be"),
            (format!("pbkdf2:sha256:1000${}${hex32}", "s".repeat(129)), "salt must be"),
            ("pbkdf2_sha256$870000$salt".into(), "Django pbkdf2_sha256 hashes are"),
            ("pbkdf2_sha256$870000$salt$not base64!".into(), "not base64"),
            ("pbkdf2_sha1$10000$salt".into(), "Django pbkdf2_sha1 hashes are"),
            ("$pbkdf2$i=90000000,l=20$c2FsdHNhbHQ$/oWvuzD2PUF7FV8msQicE/JG0YA".into(), "pbkdf2 iterations"),
            ("$pbkdf2$i=1000,l=21$c2FsdHNhbHQ$/oWvuzD2PUF7FV8msQicE/JG0YA".into(), "invalid pbkdf2 parameters"),
            ("$pbkdf2$i=1000$c2FsdHNhbHQ$/oWvuzD2PUF7FV8m".into(), "16..=64 bytes"),
            ("bcrypt$$2b$99$N9qo8uLOickgx2ZMRZoMyeIjZAgcfl7p92ldGxad68LJZdL17lhWy".into(), "accepted:"),
            ("bcrypt$$2b$17$N9qo8uLOickgx2ZMRZoMyeIjZAgcfl7p92ldGxad68LJZdL17lhWy".into(), "bcrypt cost"),
            ("argon2$argon2id$v=19$m=4194304,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$W7wzG3zJx4bC4aCqb9jB8ODm3pLoT9H0yJu5QwZ9vYw".into(), "argon2 parameters"),
            (fire("ln=14,r=8", "c2FsdA==", &key64, "Bw==", &key64), "Firebase scrypt hashes are"),
            (fire("ln=14,r=8,p=1,ln=14", "c2FsdA==", &key64, "Bw==", &key64), "Firebase scrypt hashes are"),
            (fire("ln=14,r=8,q=1", "c2FsdA==", &key64, "Bw==", &key64), "Firebase scrypt hashes are"),
            (fire("ln=x,r=8,p=1", "c2FsdA==", &key64, "Bw==", &key64), "Firebase scrypt hashes are"),
            (fire("ln=31,r=8,p=1", "c2FsdA==", &key64, "Bw==", &key64), "scrypt parameters"),
            (fire("ln=255,r=8,p=1", "c2FsdA==", &key64, "Bw==", &key64), "scrypt parameters"),
            (fire("ln=18,r=1024,p=1", "c2FsdA==", &key64, "Bw==", &key64), "scrypt parameters"),
            (fire("ln=14,r=8,p=1024", "c2FsdA==", &key64, "Bw==", &key64), "scrypt parameters"),
            (fire(p, "", &key64, "Bw==", &key64), "salt must be"),
            (fire(p, "c2FsdA==", "not base64!", "Bw==", &key64), "hash is not base64"),
            (fire(p, "c2FsdA==", &key64, "Bw==", "YWJj"), "signer key must be"),
            (fire(p, "c2FsdA==", &key64[..44], "Bw==", &key64), "as long as the signer key"),
            (fire(p, "c2FsdA==", &key64, &"B".repeat(24), &key64), "salt separator must be"),
            (format!("$firescrypt${p}$c2FsdA==${key64}$Bw=="), "Firebase scrypt hashes are"),
            (format!("$firescrypt${p}$c2FsdA==${key64}$Bw==${key64}$x"), "Firebase scrypt hashes are"),
        ] {
            let err = parse(&bad).err().unwrap_or_default();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }
}

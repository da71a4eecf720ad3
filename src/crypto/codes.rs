//! Short one-time codes (contact verification, email/SMS OTP): 6 random digits, stored as a
//! salted SHA-256. A 6-digit code is guessable offline from its hash, so codes live minutes
//! and die after a few wrong tries; the salt keeps equal codes from having equal hashes.
use rand::Rng;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// A fresh code: 6 digits from the OS random source.
pub fn six_digit_code() -> String {
    format!("{:06}", rand::rngs::OsRng.gen_range(0..1_000_000u32))
}

/// A fresh 16-byte salt.
pub fn salt() -> [u8; 16] {
    rand::random()
}

pub fn salted_hash(salt: &[u8], code: &str) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(code.as_bytes());
    h.finalize().to_vec()
}

/// Whether `code` is the one hashed as `hash` with `salt`, in constant time.
pub fn matches(salt: &[u8], hash: &[u8], code: &str) -> bool {
    bool::from(salted_hash(salt, code).ct_eq(hash))
}

/// Whether `code` is exactly six ASCII digits.
pub fn is_six_digits(code: &str) -> bool {
    code.len() == 6 && code.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_hash_and_match() {
        let code = six_digit_code();
        assert!(is_six_digits(&code));
        let s = salt();
        let h = salted_hash(&s, &code);
        assert!(matches(&s, &h, &code));
        let other = if code == "000000" { "000001" } else { "000000" };
        assert!(!matches(&s, &h, other));
        assert!(!matches(&salt(), &h, &code));
        for bad in ["12345", "1234567", "12345a", "١٢٣٤٥٦", ""] {
            assert!(!is_six_digits(bad), "{bad}");
        }
    }
}

//! Recovery codes: 10 single-use codes of 60 random bits each, shown once. Only their
//! SHA-256 is stored (high-entropy codes need no slow hash); a new set replaces the old.
use sha2::{Digest, Sha256, Sha512};
use uuid::Uuid;

use super::factors::{self, about, lock_user};
use super::password::record;
use super::store::{self, NewAuthenticator};
use super::{Authenticator, Kind};
use crate::auth::Caller;
use crate::db::{self, Pool};
use crate::error::Result;
use crate::events::{EventContext, EventType, NewEvent};

/// Codes per set.
pub const CODES_PER_SET: usize = 10;
/// A set's name when none is given (also an imported set's).
pub const SET_NAME: &str = "Recovery codes";
/// Characters of a code (without the dashes); 5 bits each.
const CODE_CHARS: usize = 12;
/// Crockford's base32: no I, L, O or U, so codes read aloud or typed go right.
const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// A fresh code, shown as `XXXX-XXXX-XXXX`.
fn new_code() -> String {
    let bytes: [u8; CODE_CHARS] = rand::random();
    let chars: Vec<char> = bytes
        .iter()
        .map(|b| ALPHABET[usize::from(b & 31)] as char)
        .collect();
    chars
        .chunks(4)
        .map(|c| c.iter().collect::<String>())
        .collect::<Vec<_>>()
        .join("-")
}

/// The canonical form of a typed code: upper case, without dashes or spaces, with the
/// letters people confuse mapped as Crockford does (O→0, I/L→1). `None` when it cannot be a
/// recovery code at all.
pub fn normalize(typed: &str) -> Option<String> {
    let mut out = String::with_capacity(CODE_CHARS);
    for c in typed.chars() {
        let c = match c.to_ascii_uppercase() {
            '-' | ' ' => continue,
            'O' => '0',
            'I' | 'L' => '1',
            c => c,
        };
        if !c.is_ascii() || !ALPHABET.contains(&(c as u8)) {
            return None;
        }
        out.push(c);
        if out.len() > CODE_CHARS {
            return None;
        }
    }
    (out.len() == CODE_CHARS).then_some(out)
}

fn code_hash(normalized: &str) -> Vec<u8> {
    Sha256::digest(normalized.as_bytes()).to_vec()
}

/// At most this many codes in an imported set (other systems issue 8 to 16).
pub const IMPORTED_CODES_MAX: usize = 32;
/// The lengths an imported code may have, as issued without dashes and spaces.
const ISSUED_CHARS: std::ops::RangeInclusive<usize> = 6..=64;

/// A code as another system issued it (Better Auth's `AbCdE-12345`, Kratos's `abcd1234`):
/// without dashes and whitespace, case kept, since those systems compare codes exactly.
/// Roster's own codes are in this form already once upper-cased, so one hash serves both.
pub fn as_issued(code: &str) -> Option<String> {
    let out: String = code
        .chars()
        .filter(|c| *c != '-' && !c.is_whitespace())
        .collect();
    (ISSUED_CHARS.contains(&out.len()) && out.bytes().all(|b| b.is_ascii_graphic())).then_some(out)
}

/// The hash an import carries for a code another system issued (see [`as_issued`]).
pub fn issued_hash(code: &str) -> Option<Vec<u8>> {
    as_issued(code).map(|c| code_hash(&c))
}

/// The hashes a typed code may be stored under, most likely first: Roster's form, and for a
/// set that came by import ([`as_issued`]) the form its system issued, as SHA-256 and as
/// SHA-512 (Keycloak keeps its codes' SHA-512; the hash's length tells them apart). Empty
/// when the code can be neither.
pub fn hashes_to_try(typed: &str, foreign: bool) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = normalize(typed).iter().map(|c| code_hash(c)).collect();
    if let Some(issued) = as_issued(typed).filter(|_| foreign) {
        for h in [
            code_hash(&issued),
            Sha512::digest(issued.as_bytes()).to_vec(),
        ] {
            if !out.contains(&h) {
                out.push(h);
            }
        }
    }
    out
}

/// Generates a new set for the user, replacing any older one; returns the codes once.
pub async fn generate(
    pool: &Pool,
    caller: &Caller,
    user_id: Uuid,
) -> Result<(Authenticator, Vec<String>)> {
    let codes: Vec<String> = (0..CODES_PER_SET).map(|_| new_code()).collect();
    let hashes: Vec<Vec<u8>> = codes
        .iter()
        .filter_map(|c| normalize(c))
        .map(|c| code_hash(&c))
        .collect();
    let p = caller.project_id;
    let mut client = db::client(pool).await?;
    let tx = client.transaction().await?;
    lock_user(&tx, caller, user_id).await?;
    let replaced =
        store::delete_authenticators(&tx, p, user_id, None, Some(Kind::RecoveryCodes)).await?;
    factors::ensure_room(&tx, caller, user_id).await?;
    let authenticator = store::insert_authenticator(
        &tx,
        p,
        &NewAuthenticator {
            id: Uuid::now_v7(),
            user_id,
            kind: Some(Kind::RecoveryCodes),
            name: Some(SET_NAME),
            confirmed: true,
            ..Default::default()
        },
    )
    .await?;
    store::insert_recovery_codes(&tx, p, authenticator.id, &hashes).await?;
    let mut data = about(&authenticator);
    data["count"] = serde_json::json!(hashes.len());
    data["replaced"] = serde_json::json!(!replaced.is_empty());
    let ev = NewEvent::for_user(EventType::RecoveryCodesGenerated, user_id, data);
    record(&tx, caller, &EventContext::from_caller(caller), &[ev]).await?;
    tx.commit().await?;
    Ok((authenticator, codes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_through_normalize() {
        let a = new_code();
        assert_eq!(a.len(), CODE_CHARS + 2);
        let n = normalize(&a).unwrap();
        assert_eq!(normalize(&a.to_lowercase()).unwrap(), n);
        assert_eq!(normalize(&n).unwrap(), n);
        assert_ne!(new_code(), a);
        assert_eq!(normalize("oooo-iiii-llll").unwrap(), "000011111111");
        for bad in [
            "",
            "ABCD-EFGH",
            "ABCD-EFGH-JKMN-P",
            "ABCD-EFGH-JKM!",
            "ÄBCD-EFGH-JKMN",
            "UUUU-UUUU-UUUU",
        ] {
            assert!(normalize(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn imported_codes_are_checked_as_issued() {
        // Better Auth's and Kratos's shapes, dashes and spaces aside, case kept.
        assert_eq!(as_issued("AbCdE-12345").as_deref(), Some("AbCdE12345"));
        assert_eq!(as_issued(" abcd 1234 ").as_deref(), Some("abcd1234"));
        assert_eq!(issued_hash("AbCdE-12345"), issued_hash("AbCdE12345"));
        assert_ne!(issued_hash("AbCdE-12345"), issued_hash("abcde-12345"));
        for bad in ["", "abc12", &"a".repeat(65), "abcd\u{e9}1234"] {
            assert!(as_issued(bad).is_none(), "{bad}");
        }
        // A Roster code's hash is its issued form's: an exported set imports and still works.
        let code = new_code();
        assert_eq!(
            issued_hash(&code),
            Some(code_hash(&normalize(&code).unwrap()))
        );
        // Roster's form first; the issued form only for an imported set, and once.
        let typed = code.to_lowercase();
        assert_eq!(hashes_to_try(&typed, false).len(), 1);
        assert_eq!(hashes_to_try(&typed, true).len(), 3);
        assert_eq!(hashes_to_try(&code, true).len(), 2);
        assert_eq!(hashes_to_try("AbCdE-12345", false).len(), 0);
        // Keycloak's: the Base64 of the SHA-512 of the code as shown, taken from a realm export.
        let sha512 = Sha512::digest(b"AbCdE12345").to_vec();
        assert_eq!(
            hashes_to_try("AbCdE-12345", true),
            [issued_hash("AbCdE12345").unwrap(), sha512]
        );
    }
}

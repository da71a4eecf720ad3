//! Recovery codes: 10 single-use codes of 60 random bits each, shown once. Only their
//! SHA-256 is stored (high-entropy codes need no slow hash); a new set replaces the old.
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::factors::{self, about, lock_user};
use super::password::record;
use super::store::{self, NewAuthenticator, RecoveryUse};
use super::{Authenticator, Kind};
use crate::auth::Caller;
use crate::db::{self, Pool};
use crate::error::Result;
use crate::events::{EventContext, EventType, NewEvent};

/// Codes per set.
pub const CODES_PER_SET: usize = 10;
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
            name: Some("Recovery codes"),
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

/// What a recovery code check found: spent now (with how many remain), used before, or
/// unknown.
pub(super) async fn spend(
    tx: &deadpool_postgres::Transaction<'_>,
    project_id: Uuid,
    authenticator_id: Uuid,
    normalized: &str,
) -> Result<RecoveryUse> {
    store::use_recovery_code(tx, project_id, authenticator_id, &code_hash(normalized)).await
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
}

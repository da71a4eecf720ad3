//! TOTP (RFC 6238: HMAC-SHA1, 6 digits, 30-second steps) with `totp-rs`. The seed is sealed
//! (AES-256-GCM, bound to the project and authenticator) before it is stored; a code is
//! accepted for the current step ±1, and each step works once per authenticator (replay).
use chrono::Utc;
use serde_json::json;
use subtle::ConstantTimeEq;
use totp_rs::{Builder, Totp};
use uuid::Uuid;

use super::factors::{self, about, account_label, authenticator_not_found, lock_user};
use super::password::{precondition, record};
use super::store::{self, FactorSecrets, NewAuthenticator};
use super::{Authenticator, FactorResult, Kind};
use crate::auth::Caller;
use crate::crypto::seal::Sealer;
use crate::db::{self, Pool};
use crate::error::{Error, Reason, Result};
use crate::events::{EventContext, EventType, NewEvent};

/// Seconds per step.
pub const STEP_SECS: u64 = 30;
/// Seed length: 160 bits, as RFC 4226 recommends.
const SECRET_BYTES: usize = 20;

fn build(secret: &[u8], digits: u8, issuer: Option<&str>, account: &str) -> Result<Totp> {
    // otpauth labels use ':' as the issuer separator.
    let clean = |s: &str| s.replace(':', " ");
    Builder::new()
        .with_secret(secret.to_vec())
        .with_digits(digits)
        .with_step_duration(STEP_SECS)
        .with_issuer(issuer.map(clean))
        .with_account_name(clean(account))
        .build()
        .map_err(|e| Error::internal(anyhow::anyhow!("TOTP parameters: {e:?}")))
}

/// The code of `secret` at Unix time `unix` (what an authenticator app shows then).
pub fn code_at(secret: &[u8], digits: u8, unix: u64) -> Result<String> {
    Ok(build(secret, digits, None, "")?.generate(unix).to_string())
}

/// The step in `now-1 ..= now+1` whose 6-digit code is `code`, comparing in constant time.
pub fn matching_step(secret: &[u8], code: &str, unix: u64) -> Result<Option<u64>> {
    let totp = build(secret, 6, None, "")?;
    let now = unix / STEP_SECS;
    let mut found = None;
    // Every candidate is computed and compared, so timing says nothing about which matched.
    for step in now.saturating_sub(1)..=now + 1 {
        let candidate = totp.generate(step * STEP_SECS).to_string();
        if bool::from(candidate.as_bytes().ct_eq(code.as_bytes())) {
            found = Some(step);
        }
    }
    Ok(found)
}

/// What a sealed seed is bound to.
pub(crate) fn seal_context(project_id: Uuid, authenticator_id: Uuid) -> Vec<u8> {
    format!("roster/authenticators/{project_id}/{authenticator_id}/totp_secret").into_bytes()
}

fn sealer_or_error(sealer: Option<&Sealer>) -> Result<&Sealer> {
    sealer.ok_or_else(|| {
        precondition(
            Reason::EncryptionNotConfigured,
            "TOTP needs ROSTER_ENCRYPTION_KEYS to be configured",
        )
    })
}

/// The outcome of checking a code against one TOTP authenticator.
pub(super) enum Check {
    /// Right, for this (unused) step.
    Ok(i64),
    /// Right, but its step was used already.
    Reused,
    Invalid,
}

/// Checks `code` against a stored authenticator's sealed seed.
pub(super) fn check(
    sealer: Option<&Sealer>,
    project_id: Uuid,
    f: &FactorSecrets,
    code: &str,
) -> Result<Check> {
    let sealed = f
        .totp_secret
        .as_deref()
        .ok_or_else(|| Error::internal(anyhow::anyhow!("TOTP authenticator without a seed")))?;
    let secret = sealer_or_error(sealer)?
        .open(sealed, &seal_context(project_id, f.authenticator.id))
        .map_err(|e| {
            tracing::warn!(error = %e, authenticator = %f.authenticator.id, "TOTP seed cannot be opened");
            precondition(
                Reason::SecretUnreadable,
                "the stored TOTP seed cannot be decrypted with the configured keys",
            )
        })?;
    let unix = Utc::now().timestamp().max(0) as u64;
    Ok(match matching_step(&secret, code, unix)? {
        None => Check::Invalid,
        Some(step) if f.totp_last_step.is_some_and(|last| step as i64 <= last) => Check::Reused,
        Some(step) => Check::Ok(step as i64),
    })
}

/// What EnrollTotp hands out once.
pub struct Enrolment {
    pub authenticator: Authenticator,
    pub secret_base32: String,
    pub otpauth_uri: String,
    pub qr_png: Vec<u8>,
}

/// Enrols a new, unconfirmed TOTP authenticator (replacing an unconfirmed one).
pub async fn enroll(
    pool: &Pool,
    sealer: Option<&Sealer>,
    caller: &Caller,
    user_id: Uuid,
    name: Option<&str>,
) -> Result<Enrolment> {
    let sealer = sealer_or_error(sealer)?;
    let p = caller.project_id;
    let mut client = db::client(pool).await?;
    let tx = client.transaction().await?;
    let user = lock_user(&tx, caller, user_id).await?.user;
    store::delete_unconfirmed(&tx, p, user_id, Kind::Totp).await?;
    factors::ensure_room(&tx, caller, user_id).await?;
    let issuer = store::project_name(&tx, p).await?;
    let secret: [u8; SECRET_BYTES] = rand::random();
    let totp = build(&secret, 6, Some(&issuer), &account_label(&user))?;
    let otpauth_uri = totp
        .to_url()
        .map_err(|e| Error::internal(anyhow::anyhow!("otpauth URI: {e:?}")))?;
    let qr_png = qr_png(&otpauth_uri)?;
    let id = Uuid::now_v7();
    let sealed = sealer
        .seal(&secret, &seal_context(p, id))
        .map_err(Error::internal)?;
    let authenticator = store::insert_authenticator(
        &tx,
        p,
        &NewAuthenticator {
            id,
            user_id,
            kind: Some(Kind::Totp),
            name,
            totp_secret: Some(&sealed),
            ..Default::default()
        },
    )
    .await?;
    let ev = NewEvent::for_user(
        EventType::AuthenticatorEnrolled,
        user_id,
        about(&authenticator),
    );
    record(&tx, caller, &EventContext::from_caller(caller), &[ev]).await?;
    tx.commit().await?;
    Ok(Enrolment {
        authenticator,
        secret_base32: totp.secret().to_base32(),
        otpauth_uri,
        qr_png,
    })
}

/// Confirms an enrolment with the first code from the app (that step is then spent). A
/// wrong code answers INVALID_CODE and does not count toward the lockout: whoever confirms
/// holds the seed already.
pub async fn confirm(
    pool: &Pool,
    sealer: Option<&Sealer>,
    caller: &Caller,
    user_id: Uuid,
    id: Uuid,
    code: &str,
) -> Result<(FactorResult, Authenticator)> {
    let p = caller.project_id;
    let mut client = db::client(pool).await?;
    let tx = client.transaction().await?;
    lock_user(&tx, caller, user_id).await?;
    let found = store::factor_secrets(&tx, p, user_id, Some(id), None)
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| authenticator_not_found(id))?;
    if found.authenticator.kind != Kind::Totp {
        return Err(Error::invalid(
            "authenticator_id",
            "is not a TOTP authenticator",
        ));
    }
    if found.authenticator.confirmed {
        return Err(precondition(
            Reason::AlreadyConfirmed,
            "the TOTP authenticator is confirmed already",
        ));
    }
    let ctx = EventContext::from_caller(caller);
    let result = match check(sealer, p, &found, code)? {
        Check::Ok(step) => {
            store::confirm_authenticator(&tx, p, id, Some(step)).await?;
            store::ensure_default(&tx, p, user_id).await?;
            let ev = NewEvent::for_user(
                EventType::AuthenticatorConfirmed,
                user_id,
                about(&found.authenticator),
            );
            record(&tx, caller, &ctx, &[ev]).await?;
            FactorResult::Ok
        }
        Check::Reused | Check::Invalid => {
            let mut data = about(&found.authenticator);
            data["reason"] = json!("INVALID_CODE");
            data["via"] = json!("ConfirmTotp");
            let ev = NewEvent::for_user(EventType::FactorVerificationFailed, user_id, data);
            record(&tx, caller, &ctx, &[ev]).await?;
            FactorResult::InvalidCode
        }
    };
    let authenticator = store::get_authenticator(&tx, p, user_id, id)
        .await?
        .ok_or_else(|| authenticator_not_found(id))?;
    tx.commit().await?;
    Ok((result, authenticator))
}

/// Pixels per QR module, and the quiet zone in modules (the QR spec asks for 4).
const QR_SCALE: usize = 6;
const QR_QUIET: usize = 4;

/// The URI as a black-on-white QR code PNG (8-bit greyscale).
pub fn qr_png(uri: &str) -> Result<Vec<u8>> {
    let code = qrcode::QrCode::new(uri.as_bytes())
        .map_err(|e| Error::internal(anyhow::anyhow!("QR code: {e}")))?;
    let modules = code.width();
    let colors = code.to_colors();
    let side = (modules + 2 * QR_QUIET) * QR_SCALE;
    let mut pixels = vec![255u8; side * side];
    for (i, c) in colors.iter().enumerate() {
        if *c == qrcode::Color::Dark {
            let (mx, my) = (i % modules + QR_QUIET, i / modules + QR_QUIET);
            for y in my * QR_SCALE..(my + 1) * QR_SCALE {
                pixels[y * side + mx * QR_SCALE..y * side + (mx + 1) * QR_SCALE].fill(0);
            }
        }
    }
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, side as u32, side as u32);
        enc.set_color(png::ColorType::Grayscale);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc
            .write_header()
            .map_err(|e| Error::internal(anyhow::anyhow!("PNG: {e}")))?;
        w.write_image_data(&pixels)
            .map_err(|e| Error::internal(anyhow::anyhow!("PNG: {e}")))?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 6238 appendix B, SHA-1 rows (8 digits, seed "12345678901234567890").
    #[test]
    fn rfc6238_vectors() {
        let seed = b"12345678901234567890";
        for (t, code) in [
            (59u64, "94287082"),
            (1_111_111_109, "07081804"),
            (1_111_111_111, "14050471"),
            (1_234_567_890, "89005924"),
            (2_000_000_000, "69279037"),
            (20_000_000_000, "65353130"),
        ] {
            assert_eq!(code_at(seed, 8, t).unwrap(), code, "t={t}");
        }
    }

    #[test]
    fn window_is_one_step_each_way() {
        let seed = [7u8; 20];
        let t = 1_700_000_015u64; // step 56_666_667
        let step = t / STEP_SECS;
        for (offset, expect) in [
            (-2i64, None),
            (-1, Some(step - 1)),
            (0, Some(step)),
            (1, Some(step + 1)),
            (2, None),
        ] {
            let at = (t as i64 + offset * STEP_SECS as i64) as u64;
            let code = code_at(&seed, 6, at).unwrap();
            assert_eq!(
                matching_step(&seed, &code, t).unwrap(),
                expect,
                "offset {offset}"
            );
        }
        assert_eq!(matching_step(&seed, "abcdef", t).unwrap(), None);
    }

    #[test]
    fn qr_is_a_png() {
        let png = qr_png("otpauth://totp/Roster:a%40b.io?secret=ABC&issuer=Roster").unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let decoder = png::Decoder::new(std::io::Cursor::new(&png));
        let reader = decoder.read_info().unwrap();
        let info = reader.info();
        assert_eq!(info.width, info.height);
        assert!(info.width >= ((21 + 8) * QR_SCALE) as u32);
    }
}

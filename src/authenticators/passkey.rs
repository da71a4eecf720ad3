//! Passkeys: the WebAuthn registration and authentication ceremonies with `webauthn-rs`.
//!
//! The relying party (id, name, allowed origins) is the project's own when set
//! (`roster projects update --webauthn-rp-id ...`), otherwise the server's defaults. A
//! ceremony's state is stored in `passkey_ceremonies` (5 minutes), so any replica can finish
//! what another started; a finish call consumes it whatever the outcome, so a challenge is
//! answered once. Authentication checks the signature, user verification and the signature
//! counter (a counter that does not grow marks a cloned authenticator and is refused), and
//! counts failures toward the same lockout as passwords.
use chrono::{Duration, Utc};
use serde_json::json;
use uuid::Uuid;
use webauthn_rs::prelude::{
    Credential, DiscoverableAuthentication, Passkey, PasskeyAuthentication, PasskeyRegistration,
    PublicKeyCredential, RegisterPublicKeyCredential, Url, Webauthn, WebauthnBuilder,
};

use super::factors::{self, check_state, fail_check, lock_user, pass_check};
use super::password::{Origin, PasswordSettings, not_found, precondition, record, sign_in_context};
use super::store::{
    self, CEREMONY_AUTHENTICATION, CEREMONY_REGISTRATION, Ceremony, NewAuthenticator,
};
use super::{Authenticator, FactorResult, Kind};
use crate::auth::Caller;
use crate::db::{self, Pool};
use crate::error::{Error, Reason, Result};
use crate::events::{EventContext, EventType, NewEvent};
use crate::users::{User, UserStatus};

/// How long a ceremony may take (the WebAuthn recommendation for user interaction).
pub const CEREMONY_TTL_MINUTES: i64 = 5;

/// The server-wide relying party, for projects without their own.
#[derive(Debug, Clone, Default)]
pub struct RelyingPartyDefaults {
    pub rp_id: Option<String>,
    pub rp_name: Option<String>,
    pub origins: Vec<String>,
}

fn not_configured() -> Error {
    precondition(
        Reason::WebauthnNotConfigured,
        "passkeys need a relying party: set the project's WebAuthn RP id and origins \
         (roster projects update) or ROSTER_WEBAUTHN_RP_ID and ROSTER_WEBAUTHN_ORIGINS",
    )
}

/// Builds the WebAuthn verifier of the caller's project.
async fn webauthn_for(
    db: &impl deadpool_postgres::GenericClient,
    defaults: &RelyingPartyDefaults,
    caller: &Caller,
) -> Result<Webauthn> {
    let (rp_id, rp_name, origins, project) = store::relying_party(db, caller.project_id)
        .await?
        .ok_or_else(not_configured)?;
    let (rp_id, origins) = match rp_id {
        Some(id) => (id, origins),
        None => (
            defaults.rp_id.clone().ok_or_else(not_configured)?,
            defaults.origins.clone(),
        ),
    };
    let name = rp_name
        .or_else(|| defaults.rp_name.clone())
        .unwrap_or(project);
    let urls: Vec<Url> = origins.iter().filter_map(|o| Url::parse(o).ok()).collect();
    let Some(first) = urls.first() else {
        return Err(not_configured());
    };
    let mut builder = WebauthnBuilder::new(&rp_id, first)
        .map_err(|e| {
            precondition(
                Reason::WebauthnNotConfigured,
                &format!("relying party: {e}"),
            )
        })?
        .rp_name(&name);
    for u in &urls[1..] {
        builder = builder.append_allowed_origin(u);
    }
    builder.build().map_err(|e| {
        precondition(
            Reason::WebauthnNotConfigured,
            &format!("relying party: {e}"),
        )
    })
}

/// Largest passkey an import takes, as its JSON (a stored one is well under 2 KiB).
pub const MAX_CARRIED_BYTES: usize = 16 * 1024;

/// A passkey as an export carried it (the stored JSON): the form to store again, its
/// credential id, whether it is backed up and its counter; `None` when the bytes are not a
/// passkey as Roster stores one.
pub fn read_carried(bytes: &[u8]) -> Option<(serde_json::Value, Vec<u8>, bool, i64)> {
    let passkey: Passkey = serde_json::from_slice(bytes).ok()?;
    let stored = serde_json::to_value(&passkey).ok()?;
    let cred = Credential::from(passkey);
    Some((
        stored,
        cred.cred_id.to_vec(),
        cred.backup_state,
        i64::from(cred.counter),
    ))
}

/// A passkey another WebAuthn server registered, as Roster stores one (the form
/// [`read_carried`] reads), from what every such server keeps of a credential: its id, its
/// public key as COSE (the bytes the authenticator gave at registration), the signature
/// counter, the flags and the transports. The attestation is not carried (none was checked
/// here). The error says which part is wrong, never the key.
pub fn carried_from_cose(
    credential_id: &[u8],
    cose_key: &[u8],
    counter: u32,
    user_verified: bool,
    backed_up: (bool, bool),
    transports: &[String],
) -> std::result::Result<Vec<u8>, String> {
    use webauthn_rs::prelude::{
        AttestationFormat, AttestationMetadata, COSEKey, ParsedAttestation, ParsedAttestationData,
    };
    use webauthn_rs_proto::{AuthenticatorTransport, RegisteredExtensions, UserVerificationPolicy};
    if credential_id.is_empty() || credential_id.len() > 1023 {
        return Err("the credential id must be 1 to 1023 bytes".into());
    }
    let value: serde_cbor_2::Value = serde_cbor_2::from_slice(cose_key)
        .map_err(|_| "the public key is not COSE (CBOR)".to_string())?;
    let cred = COSEKey::try_from(&value)
        .map_err(|_| "the public key is not a COSE key webauthn-rs reads".to_string())?;
    let transports = transports
        .iter()
        .filter_map(|t| t.parse::<AuthenticatorTransport>().ok())
        .collect::<Vec<_>>();
    let credential = Credential {
        cred_id: credential_id.to_vec(),
        cred,
        counter,
        transports: (!transports.is_empty()).then_some(transports),
        user_verified,
        backup_eligible: backed_up.0,
        backup_state: backed_up.1,
        registration_policy: if user_verified {
            UserVerificationPolicy::Required
        } else {
            UserVerificationPolicy::Preferred
        },
        extensions: RegisteredExtensions::none(),
        attestation: ParsedAttestation {
            data: ParsedAttestationData::None,
            metadata: AttestationMetadata::None,
        },
        attestation_format: AttestationFormat::None,
    };
    serde_json::to_vec(&Passkey::from(credential)).map_err(|e| format!("the passkey: {e}"))
}

fn state_json<T: serde::Serialize>(state: &T) -> Result<serde_json::Value> {
    serde_json::to_value(state).map_err(|e| Error::internal(anyhow::anyhow!("ceremony state: {e}")))
}

fn from_json<T: serde::de::DeserializeOwned>(v: serde_json::Value, what: &str) -> Result<T> {
    serde_json::from_value(v).map_err(|e| Error::internal(anyhow::anyhow!("stored {what}: {e}")))
}

fn ceremony_error(description: &str) -> Error {
    Error::invalid("ceremony_id", description)
}

/// Takes the ceremony `id` of `kind`; unknown, used and expired ones are INVALID_ARGUMENT.
async fn take(
    tx: &deadpool_postgres::Transaction<'_>,
    caller: &Caller,
    id: Uuid,
    kind: i16,
) -> Result<Ceremony> {
    let c = store::take_ceremony(tx, caller.project_id, id, kind)
        .await?
        .ok_or_else(|| ceremony_error("is unknown or was already used"))?;
    if c.expires_at <= Utc::now() {
        return Err(ceremony_error("has expired; start a new ceremony"));
    }
    Ok(c)
}

fn refuse_inactive(user: &User) -> Result<()> {
    match user.status {
        UserStatus::Blocked => Err(precondition(Reason::UserBlocked, "the user is blocked")),
        UserStatus::Deactivated => Err(precondition(
            Reason::UserDeactivated,
            "the user is deactivated",
        )),
        _ => Ok(()),
    }
}

/// Starts a registration: (ceremony id, PublicKeyCredentialCreationOptions JSON).
pub async fn start_registration(
    pool: &Pool,
    defaults: &RelyingPartyDefaults,
    caller: &Caller,
    user_id: Uuid,
    name: Option<String>,
) -> Result<(Uuid, String)> {
    let client = db::client(pool).await?;
    let webauthn = webauthn_for(&*client, defaults, caller).await?;
    let user = crate::users::store::get(&*client, caller.project_id, user_id)
        .await?
        .ok_or_else(|| not_found(user_id))?;
    refuse_inactive(&user)?;
    let existing = store::passkeys_of_user(&*client, caller.project_id, user_id).await?;
    // Already registered credentials are excluded, so one authenticator is not added twice.
    let exclude: Vec<_> = existing
        .into_iter()
        .filter_map(|p| serde_json::from_value::<Passkey>(p.passkey).ok())
        .map(|p| p.cred_id().clone())
        .collect();
    let label = factors::account_label(&user);
    let display = user
        .profile
        .display_name
        .clone()
        .unwrap_or_else(|| label.clone());
    let (options, state) = webauthn
        .start_passkey_registration(user_id, &label, &display, Some(exclude))
        .map_err(|e| Error::internal(anyhow::anyhow!("starting a registration: {e}")))?;
    let id = Uuid::now_v7();
    let ceremony = Ceremony {
        user_id: Some(user_id),
        name,
        state: state_json(&state)?,
        expires_at: Utc::now() + Duration::minutes(CEREMONY_TTL_MINUTES),
    };
    store::insert_ceremony(
        &*client,
        caller.project_id,
        id,
        CEREMONY_REGISTRATION,
        &ceremony,
    )
    .await?;
    let options = serde_json::to_string(&options)
        .map_err(|e| Error::internal(anyhow::anyhow!("creation options: {e}")))?;
    Ok((id, options))
}

/// The AAGUID in a registration's authenticator data (bytes 37..53 when attested credential
/// data is present), read from the CBOR attestation object.
fn aaguid_of(reg: &RegisterPublicKeyCredential) -> Option<Uuid> {
    use serde_cbor_2::Value;
    let Value::Map(m) = serde_cbor_2::from_slice(&reg.response.attestation_object).ok()? else {
        return None;
    };
    let Some(Value::Bytes(auth_data)) = m.get(&Value::Text("authData".into())) else {
        return None;
    };
    let attested = auth_data.get(32).is_some_and(|flags| flags & 0x40 != 0);
    let id = Uuid::from_slice(auth_data.get(37..53)?).ok()?;
    (attested && !id.is_nil()).then_some(id)
}

fn transport_names(c: &Credential, reg: &RegisterPublicKeyCredential) -> Vec<String> {
    let list = reg
        .response
        .transports
        .as_ref()
        .or(c.transports.as_ref())
        .cloned()
        .unwrap_or_default();
    list.iter()
        .filter_map(|t| serde_json::to_value(t).ok())
        .filter_map(|v| v.as_str().map(str::to_string))
        .take(8)
        .collect()
}

/// Finishes a registration with the browser's credential; stores the passkey.
pub async fn finish_registration(
    pool: &Pool,
    defaults: &RelyingPartyDefaults,
    caller: &Caller,
    user_id: Uuid,
    ceremony_id: Uuid,
    reg: &RegisterPublicKeyCredential,
) -> Result<Authenticator> {
    let mut client = db::client(pool).await?;
    let webauthn = webauthn_for(&*client, defaults, caller).await?;
    let tx = client.transaction().await?;
    lock_user(&tx, caller, user_id).await?;
    let ceremony = take(&tx, caller, ceremony_id, CEREMONY_REGISTRATION).await?;
    if ceremony.user_id != Some(user_id) {
        return Err(ceremony_error("is unknown or was already used"));
    }
    let state: PasskeyRegistration = from_json(ceremony.state, "registration state")?;
    let passkey = match webauthn.finish_passkey_registration(reg, &state) {
        Ok(p) => p,
        Err(e) => {
            let data = json!({ "type": "PASSKEY", "reason": "REGISTRATION_REJECTED",
                               "via": "FinishPasskeyRegistration", "error": e.to_string() });
            let ev = NewEvent::for_user(EventType::FactorVerificationFailed, user_id, data);
            record(&tx, caller, &EventContext::from_caller(caller), &[ev]).await?;
            // The ceremony stays consumed: its challenge is answered once.
            tx.commit().await?;
            return Err(Error::invalid(
                "credential_json",
                format!("the credential was not accepted: {e}"),
            ));
        }
    };
    let stored = state_json(&passkey)?;
    let cred = Credential::from(passkey);
    let transports = transport_names(&cred, reg);
    let authenticator = factors::enroll_confirmed(
        &tx,
        caller,
        &NewAuthenticator {
            id: Uuid::now_v7(),
            user_id,
            kind: Some(Kind::Passkey),
            name: ceremony.name.as_deref(),
            confirmed: true,
            credential_id: Some(&cred.cred_id),
            passkey: Some(&stored),
            aaguid: aaguid_of(reg),
            transports,
            backed_up: cred.backup_state,
            sign_count: i64::from(cred.counter),
            ..Default::default()
        },
    )
    .await?;
    tx.commit().await?;
    Ok(authenticator)
}

/// Starts an authentication: for a user's passkeys, or (no user) for any discoverable
/// passkey of the project. Returns (ceremony id, PublicKeyCredentialRequestOptions JSON).
pub async fn start_authentication(
    pool: &Pool,
    defaults: &RelyingPartyDefaults,
    caller: &Caller,
    user_id: Option<Uuid>,
) -> Result<(Uuid, String)> {
    let client = db::client(pool).await?;
    let webauthn = webauthn_for(&*client, defaults, caller).await?;
    let (options, state) = match user_id {
        Some(uid) => {
            let user = crate::users::store::get(&*client, caller.project_id, uid)
                .await?
                .ok_or_else(|| not_found(uid))?;
            refuse_inactive(&user)?;
            let passkeys: Vec<Passkey> = store::passkeys_of_user(&*client, caller.project_id, uid)
                .await?
                .into_iter()
                .filter_map(|p| serde_json::from_value(p.passkey).ok())
                .collect();
            if passkeys.is_empty() {
                return Err(precondition(Reason::NoPasskeys, "the user has no passkey"));
            }
            let (options, state) = webauthn
                .start_passkey_authentication(&passkeys)
                .map_err(|e| Error::internal(anyhow::anyhow!("starting authentication: {e}")))?;
            (serde_json::to_string(&options), state_json(&state)?)
        }
        None => {
            let (options, state) = webauthn
                .start_discoverable_authentication()
                .map_err(|e| Error::internal(anyhow::anyhow!("starting authentication: {e}")))?;
            (serde_json::to_string(&options), state_json(&state)?)
        }
    };
    let options = options.map_err(|e| Error::internal(anyhow::anyhow!("request options: {e}")))?;
    let id = Uuid::now_v7();
    let ceremony = Ceremony {
        user_id,
        name: None,
        state,
        expires_at: Utc::now() + Duration::minutes(CEREMONY_TTL_MINUTES),
    };
    store::insert_ceremony(
        &*client,
        caller.project_id,
        id,
        CEREMONY_AUTHENTICATION,
        &ceremony,
    )
    .await?;
    Ok((id, options))
}

/// What FinishPasskeyAuthentication answers.
pub struct SignedIn {
    pub result: FactorResult,
    pub authenticator: Option<Authenticator>,
    pub user: Option<User>,
}

/// Finishes an authentication: on OK the user is signed in (login count, last login, a
/// pending user becomes active) and the passkey's counter and flags are updated.
pub async fn finish_authentication(
    pool: &Pool,
    defaults: &RelyingPartyDefaults,
    settings: &PasswordSettings,
    caller: &Caller,
    ceremony_id: Uuid,
    assertion: &PublicKeyCredential,
    origin: &Origin,
) -> Result<SignedIn> {
    let p = caller.project_id;
    let ctx = sign_in_context(caller, origin);
    let via = "FinishPasskeyAuthentication";
    let at = factors::Attempt {
        caller,
        ctx: &ctx,
        settings,
        via,
    };
    let mut client = db::client(pool).await?;
    let webauthn = webauthn_for(&*client, defaults, caller).await?;
    let tx = client.transaction().await?;
    let ceremony = take(&tx, caller, ceremony_id, CEREMONY_AUTHENTICATION).await?;
    let invalid = SignedIn {
        result: FactorResult::InvalidCode,
        authenticator: None,
        user: None,
    };
    let found = store::passkey_by_credential(&tx, p, assertion.get_credential_id()).await?;
    // The user the attempt counts against: the ceremony's, else the credential's owner.
    let owner = ceremony
        .user_id
        .or(found.as_ref().map(|f| f.authenticator.user_id));
    let Some(owner) = owner else {
        // A credential nobody here registered, in a username-less ceremony.
        tx.commit().await?;
        return Ok(invalid);
    };
    let user = lock_user(&tx, caller, owner).await?;
    // Re-read under the user's lock: every change to a user's authenticators holds it.
    let found = store::passkey_by_credential(&tx, p, assertion.get_credential_id())
        .await?
        .filter(|f| f.authenticator.user_id == owner);
    if let Some(locked) = check_state(&user)? {
        let a = found.map(|f| f.authenticator);
        let result = fail_check(&tx, &at, &user, a.as_ref(), locked).await?;
        tx.commit().await?;
        return Ok(SignedIn {
            result,
            authenticator: a,
            user: None,
        });
    }
    let Some(found) = found else {
        let result = fail_check(&tx, &at, &user, None, FactorResult::InvalidCode).await?;
        tx.commit().await?;
        return Ok(SignedIn { result, ..invalid });
    };
    let mut passkey: Passkey = from_json(found.passkey, "passkey")?;
    let checked = if ceremony.user_id.is_some() {
        let state: PasskeyAuthentication = from_json(ceremony.state, "authentication state")?;
        webauthn.finish_passkey_authentication(assertion, &state)
    } else {
        let state: DiscoverableAuthentication = from_json(ceremony.state, "authentication state")?;
        webauthn.finish_discoverable_authentication_v2(
            assertion,
            state,
            Credential::from(passkey.clone()),
        )
    };
    let stored_count = found.sign_count;
    // The counter must grow whenever either side has one; equal or lower means a clone.
    let accepted = checked.ok().filter(|r| {
        let c = i64::from(r.counter());
        !(c > 0 || stored_count > 0) || c > stored_count
    });
    let Some(res) = accepted else {
        let a = found.authenticator;
        let result = fail_check(&tx, &at, &user, Some(&a), FactorResult::InvalidCode).await?;
        tx.commit().await?;
        return Ok(SignedIn {
            result,
            authenticator: Some(a),
            user: None,
        });
    };
    passkey.update_credential(&res);
    let a = store::update_passkey(
        &tx,
        p,
        found.authenticator.id,
        &state_json(&passkey)?,
        i64::from(res.counter()).max(stored_count),
        res.backup_state(),
    )
    .await?;
    pass_check(&tx, caller, &ctx, &user, &a, via).await?;
    let activate = user.user.status == UserStatus::PendingVerification;
    let signed_in = store::record_success(
        &tx,
        p,
        owner,
        &store::Success {
            sign_in: true,
            ip: origin.ip.as_deref(),
            activate,
            rehash: None,
        },
    )
    .await?;
    let mut data = json!({ "method": "PASSKEY", "result": "OK", "authenticator_id": a.id });
    if activate {
        data["activated"] = json!(true);
    }
    let ev = NewEvent::for_user(EventType::LoginSucceeded, owner, data);
    record(&tx, caller, &ctx, &[ev]).await?;
    tx.commit().await?;
    Ok(SignedIn {
        result: FactorResult::Ok,
        authenticator: Some(a),
        user: Some(signed_in),
    })
}

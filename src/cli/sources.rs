//! Other user stores' exports, as `roster import --from` reads them: each record is put in
//! Roster's field names (records.rs), so that everything after (validation, the request, the
//! errors file) is the same whatever the source. A field a source may carry but Roster has no
//! place for (activity, roles) is left out by name; any other field fails its record naming
//! it, so a new field in a source's export is noticed rather than dropped.
use base64::Engine as _;
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value, json};

use super::records::{as_bool, as_json};

/// Whose field names a file to import uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Source {
    /// Roster's own (what `roster export` writes).
    Roster,
    /// An Auth0 user export (the Management API's users-exports job, JSON or CSV, with
    /// Auth0's user profile field names), plus the `passwordHash` of Auth0's password export.
    Auth0,
    /// A Firebase Authentication export (`firebase auth:export users.json`); password hashes
    /// need `--firebase-hash-parameters`.
    Firebase,
    /// A Keycloak realm export (`kc.sh export`: the realm file or its `*-users-*.json` files).
    Keycloak,
    /// An Amazon Cognito user pool's users (`aws cognito-idp list-users`); Cognito never
    /// exports passwords.
    Cognito,
    /// Supabase Auth's `auth.users` rows as JSON (the README's psql query, which adds each
    /// user's identities and verified MFA factors).
    Supabase,
    /// A Clerk dashboard user export (CSV, or its JSON variant), or the Backend API's user
    /// list (`GET /v1/users`).
    Clerk,
    /// Ory Kratos identities with their credentials (the README's admin API loop, or its
    /// query of Kratos's database).
    Kratos,
    /// Better Auth's `user` rows with their `account`, `twoFactor` and `passkey` rows (the
    /// README's query of your app's database; --better-auth-secret-file for two-factor).
    BetterAuth,
    /// A ZITADEL instance's export (`POST /admin/v1/export` with passwords and OTP): each
    /// organization's human users with their metadata and identity provider links.
    Zitadel,
    /// Okta's user list (`GET /api/v1/users`, the README's loop over its pages); Okta never
    /// exports passwords, so users who had one are marked for the sign-in migration.
    Okta,
    /// An Appwrite project's users as its Users API lists them to a server key (the
    /// README's script), password hashes included.
    Appwrite,
}

/// Identity providers of Auth0 that are not linked accounts: its own database connection
/// (the password, imported as such) and passwordless email and SMS (the email and phone).
const AUTH0_NOT_LINKED: &[&str] = &["auth0", "email", "sms"];

/// Auth0 fields Roster keeps its own account of (activity, counters, computed names).
const AUTH0_SKIPPED: &[&str] = &[
    "nickname",
    "updated_at",
    "last_ip",
    "logins_count",
    "multifactor",
    "last_password_reset",
    // The password export's own bookkeeping.
    "password_set_date",
    "tenant",
    "connection",
];

/// An Auth0 user export record in Roster's field names: `user_id` (`auth0|5f7c...`) becomes
/// `external_id`, `name` `display_name`, `picture` `picture_url`, `passwordHash` (or
/// `custom_password_hash.hash.value`) `password_hash`; linked social and enterprise
/// identities become `identities` (provider and the provider's user id as subject); Auth0's
/// `last_login` becomes `last_login_at`; its other activity fields are left out. A user
/// blocked in Auth0 is imported blocked rather than active. A `roles` list (the RBAC role
/// names, which the export lacks; the README's script adds them) becomes
/// `app_metadata.roles`, an `organizations` list (Auth0 Organizations memberships with the
/// member's roles in each, likewise) `app_metadata.organizations`. Auth0's CSV starts each text
/// cell with `'` (its CSV-injection guard): removed. A record of Auth0's password export
/// (`_id.$oid`, `email`, `passwordHash`, no `user_id`) gets the `external_id` its user has
/// in the user export, `auth0|<oid>`, so that file applies as an UPSERT on external_id.
pub fn from_auth0(obj: Map<String, Value>, csv: bool) -> Result<Map<String, Value>, String> {
    let mut out = Map::new();
    // What the export lacks and the README's scripts add: authorization, for app_metadata.
    let mut authz = Map::new();
    let oid = obj
        .get("_id")
        .and_then(|id| id.get("$oid"))
        .and_then(Value::as_str)
        .map(str::to_string);
    for (k, v) in obj {
        let v = match v {
            Value::String(s) if csv && s.starts_with('\'') => Value::String(s[1..].to_string()),
            v => v,
        };
        let to = match k.as_str() {
            "user_id" => "external_id",
            "name" => "display_name",
            "picture" => "picture_url",
            "passwordHash" => "password_hash",
            "custom_password_hash" => {
                let hash = as_json(&k, v)?;
                let value = hash.pointer("/hash/value").and_then(Value::as_str);
                match value {
                    Some(h) => {
                        out.insert("password_hash".into(), Value::String(h.into()));
                        continue;
                    }
                    None => return Err(format!("{k}: has no hash.value")),
                }
            }
            "identities" => {
                let list = array_of(&k, v)?;
                let mut linked = Vec::new();
                for (i, id) in list.iter().enumerate() {
                    let field = |f: &str| id.get(f).and_then(text);
                    let (Some(provider), Some(subject)) = (field("provider"), field("user_id"))
                    else {
                        return Err(format!("identities[{i}]: needs provider and user_id"));
                    };
                    if AUTH0_NOT_LINKED.contains(&provider.as_str()) {
                        continue;
                    }
                    linked.push(identity(
                        provider,
                        subject,
                        &[("connection", field("connection").map(Value::String))],
                    ));
                }
                set_identities(&mut out, linked);
                continue;
            }
            "blocked" => {
                if as_bool(&k, v)? {
                    blocked(&mut out, "blocked in Auth0");
                }
                continue;
            }
            "last_login" => "last_login_at",
            // Not in the export: the README's scripts add each user's RBAC role names and
            // organization memberships.
            "roles" => {
                put_names(&mut authz, "roles", string_list(&k, &v)?);
                continue;
            }
            "organizations" => {
                put_memberships(&mut authz, &k, v)?;
                continue;
            }
            "email" | "email_verified" | "username" | "phone_number" | "phone_verified"
            | "given_name" | "family_name" | "created_at" | "user_metadata" | "app_metadata" => {
                k.as_str()
            }
            other if other.starts_with('_') || AUTH0_SKIPPED.contains(&other) => continue,
            other => return Err(format!("unknown Auth0 field '{other}'")),
        };
        out.insert(to.to_string(), v);
    }
    if let Some(oid) = oid
        && !out.contains_key("external_id")
    {
        out.insert("external_id".into(), Value::String(format!("auth0|{oid}")));
    }
    if !authz.is_empty() {
        let app = out
            .entry("app_metadata")
            .or_insert_with(|| Value::Object(Map::new()));
        let Value::Object(app) = app else {
            return Err("app_metadata: must be an object".into());
        };
        merge_into(
            app,
            authz,
            "app_metadata and the user's Auth0 roles and organizations",
        )?;
    }
    Ok(out)
}

/// A source's conversion, set up once for a run.
pub enum Convert {
    Roster,
    Auth0 { csv: bool },
    Firebase(Option<FirebaseHash>),
    Keycloak,
    Cognito,
    Supabase,
    Clerk,
    Kratos,
    BetterAuth(Option<BetterAuthSecrets>, Option<OtpChannel>),
    Zitadel,
    Okta,
    Appwrite,
}

/// Where Better Auth's two-factor OTP method (`otpOptions.sendOTP`) sends its codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OtpChannel {
    /// To the user's email address (an EMAIL_OTP channel here).
    Email,
    /// To the user's phone number (an SMS_OTP channel here).
    Sms,
}

impl Convert {
    pub fn apply(&self, obj: Map<String, Value>) -> Result<Map<String, Value>, String> {
        match self {
            Convert::Roster => Ok(obj),
            Convert::Auth0 { csv } => from_auth0(obj, *csv),
            Convert::Firebase(hash) => from_firebase(obj, hash.as_ref()),
            Convert::Keycloak => from_keycloak(obj),
            Convert::Cognito => from_cognito(obj),
            Convert::Supabase => from_supabase(obj),
            Convert::Clerk => from_clerk(obj),
            Convert::Kratos => from_kratos(obj),
            Convert::BetterAuth(secrets, otp) => from_better_auth(obj, secrets.as_ref(), *otp),
            Convert::Zitadel => from_zitadel(obj),
            Convert::Okta => from_okta(obj),
            Convert::Appwrite => from_appwrite(obj),
        }
    }
}

/// A time given as milliseconds since the epoch (a number or its text), as RFC 3339.
fn millis_time(field: &str, v: Value) -> Result<Value, String> {
    let ms = match &v {
        Value::Null => return Ok(Value::Null),
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse::<i64>().ok(),
        _ => None,
    };
    ms.and_then(DateTime::<Utc>::from_timestamp_millis)
        .map(|t| Value::String(t.to_rfc3339_opts(SecondsFormat::Millis, true)))
        .ok_or_else(|| format!("{field}: must be milliseconds since 1970"))
}

/// An `identities` entry (records.rs): provider, subject, and those of `optional` present.
fn identity(provider: String, subject: String, optional: &[(&str, Option<Value>)]) -> Value {
    let mut x = Map::from_iter([
        ("provider".to_string(), Value::String(provider)),
        ("subject".to_string(), Value::String(subject)),
    ]);
    for (name, value) in optional {
        if let Some(v) = value {
            x.insert(name.to_string(), v.clone());
        }
    }
    Value::Object(x)
}

/// Marks a record blocked, so a user the source had disabled does not arrive active.
fn blocked(out: &mut Map<String, Value>, reason: &str) {
    out.insert("blocked".into(), Value::Bool(true));
    out.insert("blocked_reason".into(), Value::String(reason.into()));
}

/// Sets a record's `identities`, unless there are none.
fn set_identities(out: &mut Map<String, Value>, linked: Vec<Value>) {
    if !linked.is_empty() {
        out.insert("identities".into(), Value::Array(linked));
    }
}

/// A field holding an array (or JSON text of one, in a CSV cell); null is an empty one.
fn array_of(field: &str, v: Value) -> Result<Vec<Value>, String> {
    match as_json(field, v)? {
        Value::Array(a) => Ok(a),
        Value::Null => Ok(Vec::new()),
        _ => Err(format!("{field}: must be an array")),
    }
}

/// Text of a string or number field; `None` for null or empty.
fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Base64 as the sources write it: standard or URL-safe alphabet, padded or not.
fn base64_bytes(field: &str, text: &str) -> Result<Vec<u8>, String> {
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    LENIENT
        .decode(text.trim().replace('-', "+").replace('_', "/"))
        .map_err(|_| format!("{field}: is not base64"))
}

/// The project-wide parameters of Firebase's scrypt, as its console shows them
/// (Authentication, Users, the menu's "Password hash parameters"):
///
/// ```text
/// hash_config {
///   algorithm: SCRYPT,
///   base64_signer_key: jxspr8Ki0RYy...,
///   base64_salt_separator: Bw==,
///   rounds: 8,
///   mem_cost: 14,
/// }
/// ```
///
/// The signer key is a secret (with it, exported hashes can be attacked offline): it is never
/// printed, and this type has no `Debug`.
pub struct FirebaseHash {
    signer_key: Vec<u8>,
    separator: Vec<u8>,
    rounds: u32,
    mem_cost: u32,
}

impl FirebaseHash {
    /// Reads the console's block, or the same keys as JSON.
    pub fn parse(text: &str) -> Result<FirebaseHash, String> {
        let mut fields = std::collections::HashMap::new();
        // Base64 has no `,`, `{`, `}` or `:`, so the block and JSON split alike.
        for piece in text.split(['\n', ',', '{', '}']) {
            if let Some((k, v)) = piece.split_once(':') {
                let unquote = |t: &str| t.trim().trim_matches('"').trim().to_string();
                fields.insert(unquote(k), unquote(v));
            }
        }
        if let Some(a) = fields.get("algorithm")
            && !a.eq_ignore_ascii_case("scrypt")
        {
            return Err(format!("algorithm is {a}; only Firebase's SCRYPT is read"));
        }
        let field = |name: &str| {
            fields
                .get(name)
                .ok_or_else(|| format!("{name} is missing (copy the whole hash_config block)"))
        };
        let number = |name: &str| {
            field(name)?
                .parse::<u32>()
                .map_err(|_| format!("{name} must be a number"))
        };
        let hash = FirebaseHash {
            signer_key: base64_bytes("base64_signer_key", field("base64_signer_key")?)?,
            separator: base64_bytes("base64_salt_separator", field("base64_salt_separator")?)?,
            rounds: number("rounds")?,
            mem_cost: number("mem_cost")?,
        };
        // The server's bounds, checked once here rather than on every record.
        let probe = hash.hash_string(&[0; 8], &vec![0; hash.signer_key.len()]);
        crate::crypto::formats::parse(&probe)?;
        Ok(hash)
    }

    /// A user's hash in the `$firescrypt$` form the server takes.
    fn hash_string(&self, salt: &[u8], hash: &[u8]) -> String {
        let b = base64::engine::general_purpose::STANDARD;
        format!(
            "$firescrypt$ln={},r={},p=1${}${}${}${}",
            self.mem_cost,
            self.rounds,
            b.encode(salt),
            b.encode(hash),
            b.encode(&self.separator),
            b.encode(&self.signer_key)
        )
    }
}

/// Firebase's bookkeeping fields, which Roster keeps its own account of, and the Identity
/// Toolkit API's fields Roster has no place for (deprecated profile fields, the tenant, which
/// is the project here, and passkeys, which users register again).
const FIREBASE_SKIPPED: &[&str] = &[
    "lastRefreshAt",
    "validSince",
    "passwordUpdatedAt",
    "version",
    "language",
    "timeZone",
    "dateOfBirth",
    "screenName",
    "customAuth",
    "emailLinkSignin",
    "initialEmail",
    "tenantId",
    "passkeyInfo",
];

/// Firebase providers that are not linked accounts: the password and phone sign-ins (the
/// user's own password and phone number).
const FIREBASE_NOT_LINKED: &[&str] = &["password", "phone"];

/// A Firebase Authentication export record (`firebase auth:export users.json`) in Roster's
/// field names: `localId` becomes `external_id`, `displayName`/`photoUrl`
/// `display_name`/`picture_url`, `phoneNumber` a verified `phone_number` (Firebase only holds
/// numbers it verified), `createdAt` and `lastSignedInAt` (milliseconds) `created_at` and
/// `last_login_at`, `customAttributes` (the
/// custom claims, set by the application's backend) `app_metadata`; `providerUserInfo`
/// entries become identities (`providerId` as provider, `rawId` as subject);
/// `passwordHash` and `salt` become a `$firescrypt$` hash with the project's parameters. A
/// user `disabled` in Firebase is imported blocked rather than active. The Identity Toolkit
/// API's users (`accounts:batchGet`), the same records plus `mfaInfo`, also bring their SMS
/// and email second factors (see [`firebase_factor`]).
pub fn from_firebase(
    obj: Map<String, Value>,
    hash: Option<&FirebaseHash>,
) -> Result<Map<String, Value>, String> {
    let mut out = Map::new();
    let (mut password, mut salt) = (None, None);
    for (k, v) in obj {
        let to = match k.as_str() {
            "localId" => "external_id",
            "email" => "email",
            "emailVerified" => "email_verified",
            "displayName" => "display_name",
            "photoUrl" => "picture_url",
            "customAttributes" => "app_metadata",
            "phoneNumber" => {
                if text(&v).is_some() {
                    out.insert("phone_verified".into(), Value::Bool(true));
                }
                "phone_number"
            }
            "passwordHash" => {
                password = text(&v);
                continue;
            }
            "salt" => {
                salt = text(&v);
                continue;
            }
            "createdAt" => {
                out.insert("created_at".into(), millis_time(&k, v)?);
                continue;
            }
            // `lastSignedInAt` as firebase-tools names it, `lastLoginAt` as the API does.
            "lastSignedInAt" | "lastLoginAt" => {
                out.insert("last_login_at".into(), millis_time(&k, v)?);
                continue;
            }
            "disabled" => {
                if as_bool(&k, v)? {
                    blocked(&mut out, "disabled in Firebase");
                }
                continue;
            }
            "providerUserInfo" => {
                let list = match v {
                    Value::Array(a) => a,
                    Value::Null => continue,
                    _ => return Err("providerUserInfo: must be an array".into()),
                };
                let mut linked = Vec::new();
                for (i, p) in list.iter().enumerate() {
                    let field = |f: &str| p.get(f).and_then(text);
                    let (Some(provider), Some(subject)) = (field("providerId"), field("rawId"))
                    else {
                        return Err(format!("providerUserInfo[{i}]: needs providerId and rawId"));
                    };
                    if FIREBASE_NOT_LINKED.contains(&provider.as_str()) {
                        continue;
                    }
                    let profile: Map<String, Value> = ["displayName", "photoUrl"]
                        .iter()
                        .filter_map(|f| Some((f.to_string(), Value::String(field(f)?))))
                        .collect();
                    let profile = (!profile.is_empty()).then_some(Value::Object(profile));
                    linked.push(identity(
                        provider,
                        subject,
                        &[
                            ("email", field("email").map(Value::String)),
                            ("profile", profile),
                        ],
                    ));
                }
                set_identities(&mut out, linked);
                continue;
            }
            // The Identity Toolkit API's enrolled second factors (firebase-tools leaves them
            // out of its export).
            "mfaInfo" => {
                let mut factors = Vec::new();
                for (i, f) in array_of(&k, v)?.iter().enumerate() {
                    factors.push(firebase_factor(i, f)?);
                }
                if !factors.is_empty() {
                    out.insert("authenticators".into(), Value::Array(factors));
                }
                continue;
            }
            other if other.starts_with('_') || FIREBASE_SKIPPED.contains(&other) => continue,
            other => return Err(format!("unknown Firebase field '{other}'")),
        };
        out.insert(to.to_string(), v);
    }
    if let Some(password) = password {
        let Some(hash) = hash else {
            return Err(
                "has a passwordHash: give --firebase-hash-parameters FILE (the \
                        console's Authentication, Users, \"Password hash parameters\")"
                    .into(),
            );
        };
        let Some(salt) = salt else {
            return Err("has a passwordHash without its salt".into());
        };
        let hashed = hash.hash_string(
            &base64_bytes("salt", &salt)?,
            &base64_bytes("passwordHash", &password)?,
        );
        out.insert("password_hash".into(), Value::String(hashed));
    }
    Ok(out)
}

/// An `mfaInfo` entry (the Identity Toolkit API's MfaEnrollment) as an `authenticators`
/// entry: an SMS second factor as an SMS OTP channel (the admin API's number, unobfuscated),
/// an email one as an email OTP channel. A TOTP one fails the record: Firebase never gives
/// its secret, and dropping a user's second factor unsaid would leave them with a password
/// alone.
fn firebase_factor(i: usize, f: &Value) -> Result<Value, String> {
    let field = |name: &str| f.get(name).and_then(text);
    let name = field("displayName");
    let created = match f.get("enrolledAt") {
        Some(t) => Some(pg_time(&format!("mfaInfo[{i}].enrolledAt"), t)?),
        None => None,
    };
    if let Some(phone) = field("unobfuscatedPhoneInfo").or_else(|| field("phoneInfo")) {
        if phone.contains('*') {
            return Err(format!(
                "mfaInfo[{i}]: the phone number is obfuscated ({phone}); read the users with \
                 a service account (the README's accounts:batchGet call)"
            ));
        }
        return Ok(factor(
            "SMS_OTP",
            ("phone_number", Value::String(phone)),
            name,
            created,
        ));
    }
    if let Some(email) = f.pointer("/emailInfo/emailAddress").and_then(text) {
        return Ok(factor(
            "EMAIL_OTP",
            ("email", Value::String(email)),
            name,
            created,
        ));
    }
    if f.get("totpInfo").is_some() {
        return Err(format!(
            "mfaInfo[{i}]: a TOTP second factor, whose secret Firebase does not export; remove \
             it to import the user without it (they enroll their app again)"
        ));
    }
    Err(format!(
        "mfaInfo[{i}]: a second factor of a kind Roster does not know"
    ))
}

/// Keycloak user fields Roster has no place for: roles, groups, consents and links to
/// Keycloak's own configuration, and the session cut-off.
const KEYCLOAK_SKIPPED: &[&str] = &[
    "self",
    "origin",
    "totp",
    "access",
    "notBefore",
    "applicationRoles",
    "clientConsents",
    "socialLinks",
    "federationLink",
    "disableableCredentialTypes",
    "userProfileMetadata",
];

/// Keycloak's own realm roles and clients, whose roles say what a user may do in Keycloak
/// itself (its account console, its admin API), not in your applications.
const KEYCLOAK_BUILT_IN_ROLES: &[&str] = &["offline_access", "uma_authorization"];
const KEYCLOAK_BUILT_IN_CLIENTS: &[&str] = &[
    "account",
    "account-console",
    "admin-cli",
    "broker",
    "realm-management",
    "security-admin-console",
];

/// A list of strings (Keycloak's roles and groups), refused by field when it is not one.
fn string_list(field: &str, v: &Value) -> Result<Vec<String>, String> {
    let Value::Array(list) = v else {
        return Err(format!("{field}: must be a list of names"));
    };
    list.iter()
        .map(|x| x.as_str().map(str::to_string))
        .collect::<Option<_>>()
        .ok_or_else(|| format!("{field}: must be a list of names"))
}

/// Puts `names` (roles, groups) under `key` of `app`; an empty list is nothing to carry.
fn put_names(app: &mut Map<String, Value>, key: &str, names: Vec<String>) {
    if !names.is_empty() {
        app.insert(key.into(), json!(names));
    }
}

/// Puts a list of organization memberships (each read by [`membership`]) under
/// `organizations` of `app`.
fn put_memberships(app: &mut Map<String, Value>, field: &str, v: Value) -> Result<(), String> {
    let list = array_of(field, v)?
        .into_iter()
        .enumerate()
        .map(|(i, m)| membership(&format!("{field}[{i}]"), m))
        .collect::<Result<Vec<_>, _>>()?;
    if !list.is_empty() {
        app.insert("organizations".into(), Value::Array(list));
    }
    Ok(())
}

/// A Keycloak user (a realm export's `users` entry) in Roster's field names: `id` becomes
/// `external_id`, `firstName`/`lastName` `given_name`/`family_name`, `createdTimestamp`
/// `created_at`, the `locale` attribute `locale` and the other attributes `user_metadata`
/// (one value as itself, several as a list); `federatedIdentities` become identities (the
/// identity provider's alias as provider, its `userId` as subject); the password credential
/// becomes a PHC hash (pbkdf2-sha256, pbkdf2-sha512, pbkdf2 (SHA-1) or argon2 as Keycloak
/// stores them), each OTP credential a TOTP factor with its seed (see [`keycloak_totp`]);
/// each WebAuthn credential a passkey (see [`keycloak_passkey`]), the unused recovery codes
/// a set of them (see [`keycloak_recovery_codes`]); the realm roles, client roles and group
/// paths that authorize the user in your applications `app_metadata.roles`,
/// `app_metadata.client_roles` and `app_metadata.groups` (Keycloak's own left out); a
/// disabled user is imported blocked, a pending UPDATE_PASSWORD action becomes
/// `require_password_change`, and a client's service account is refused.
pub fn from_keycloak(obj: Map<String, Value>) -> Result<Map<String, Value>, String> {
    let mut out = Map::new();
    let mut app = Map::new();
    for (k, v) in obj {
        let to = match k.as_str() {
            "id" => "external_id",
            "username" => "username",
            "email" => "email",
            "emailVerified" => "email_verified",
            "firstName" => "given_name",
            "lastName" => "family_name",
            "createdTimestamp" => {
                out.insert("created_at".into(), millis_time(&k, v)?);
                continue;
            }
            "enabled" => {
                if v == Value::Bool(false) {
                    blocked(&mut out, "disabled in Keycloak");
                }
                continue;
            }
            "requiredActions" => {
                // Keycloak's "update your password at the next sign-in".
                let update = v
                    .as_array()
                    .is_some_and(|a| a.iter().any(|x| x == "UPDATE_PASSWORD"));
                if update {
                    out.insert("require_password_change".into(), Value::Bool(true));
                }
                continue;
            }
            "serviceAccountClientId" => {
                let client = text(&v).unwrap_or_default();
                return Err(format!(
                    "the service account of Keycloak client '{client}', not a user"
                ));
            }
            "attributes" => {
                let Value::Object(attributes) = v else {
                    return Err("attributes: must be an object".into());
                };
                let mut metadata = Map::new();
                for (name, values) in attributes {
                    // Keycloak keeps every attribute as a list of strings.
                    let value = match values {
                        Value::Array(mut a) if a.len() == 1 => a.remove(0),
                        other => other,
                    };
                    if name == "locale" {
                        out.insert("locale".into(), value);
                    } else {
                        metadata.insert(name, value);
                    }
                }
                if !metadata.is_empty() {
                    out.insert("user_metadata".into(), Value::Object(metadata));
                }
                continue;
            }
            "credentials" => {
                let Value::Array(list) = v else {
                    return Err("credentials: must be an array".into());
                };
                let passwords: Vec<_> = list
                    .iter()
                    .filter(|c| c.get("type").and_then(Value::as_str) == Some("password"))
                    .collect();
                match passwords[..] {
                    [] => {}
                    [c] => {
                        out.insert("password_hash".into(), Value::String(keycloak_hash(c)?));
                    }
                    _ => return Err("credentials: more than one password".into()),
                }
                // Authenticator apps (OTP) come along as TOTP factors, security keys and
                // passkeys (WebAuthn, two-factor or passwordless) as passkeys, the unused
                // recovery codes as a set of them.
                for (i, c) in list.iter().enumerate() {
                    let factor = match c.get("type").and_then(Value::as_str) {
                        Some("otp") => keycloak_totp(c)?,
                        Some(t @ ("webauthn" | "webauthn-passwordless")) => {
                            keycloak_passkey(i, c, t == "webauthn-passwordless")?
                        }
                        Some("recovery-authn-codes") => match keycloak_recovery_codes(c)? {
                            Some(set) => set,
                            None => continue,
                        },
                        _ => continue,
                    };
                    add_factor(&mut out, factor);
                }
                continue;
            }
            "realmRoles" => {
                let roles: Vec<String> = string_list(&k, &v)?
                    .into_iter()
                    .filter(|r| {
                        !r.starts_with("default-roles-") && !KEYCLOAK_BUILT_IN_ROLES.contains(&&**r)
                    })
                    .collect();
                put_names(&mut app, "roles", roles);
                continue;
            }
            "clientRoles" => {
                let Value::Object(clients) = v else {
                    return Err("clientRoles: must be an object of lists".into());
                };
                let mut kept = Map::new();
                for (client, roles) in clients {
                    let roles = string_list(&format!("clientRoles.{client}"), &roles)?;
                    if !roles.is_empty() && !KEYCLOAK_BUILT_IN_CLIENTS.contains(&client.as_str()) {
                        kept.insert(client, json!(roles));
                    }
                }
                if !kept.is_empty() {
                    app.insert("client_roles".into(), Value::Object(kept));
                }
                continue;
            }
            "groups" => {
                put_names(&mut app, "groups", string_list(&k, &v)?);
                continue;
            }
            "federatedIdentities" => {
                let Value::Array(list) = v else {
                    return Err("federatedIdentities: must be an array".into());
                };
                let mut linked = Vec::new();
                for (i, f) in list.iter().enumerate() {
                    let field = |name: &str| f.get(name).and_then(text);
                    let (Some(provider), Some(subject)) =
                        (field("identityProvider"), field("userId"))
                    else {
                        return Err(format!(
                            "federatedIdentities[{i}]: needs identityProvider and userId"
                        ));
                    };
                    let profile = field("userName").map(|name| json!({ "userName": name }));
                    linked.push(identity(provider, subject, &[("profile", profile)]));
                }
                set_identities(&mut out, linked);
                continue;
            }
            other if other.starts_with('_') || KEYCLOAK_SKIPPED.contains(&other) => continue,
            other => return Err(format!("unknown Keycloak field '{other}'")),
        };
        out.insert(to.to_string(), v);
    }
    if !app.is_empty() {
        out.insert("app_metadata".into(), Value::Object(app));
    }
    Ok(out)
}

/// Cognito's standard attributes that have a field of their own, by Roster's name.
const COGNITO_ATTRIBUTES: &[(&str, &str)] = &[
    ("email", "email"),
    ("email_verified", "email_verified"),
    ("phone_number", "phone_number"),
    ("phone_number_verified", "phone_verified"),
    ("name", "display_name"),
    ("given_name", "given_name"),
    ("family_name", "family_name"),
    ("picture", "picture_url"),
    ("locale", "locale"),
    ("zoneinfo", "timezone"),
];

/// A Cognito user (`aws cognito-idp list-users`, its `Users` entries) in Roster's field
/// names: the `sub` attribute (the id applications hold) becomes `external_id`, `Username`
/// `username` (unless it is the `sub` again, as in pools that sign in by email), the standard
/// attributes their fields (`name` `display_name`, `picture` `picture_url`, `zoneinfo`
/// `timezone`, ...), the other attributes (`custom:*` without the prefix, `birthdate`,
/// `preferred_username`, ...) `user_metadata`; the `identities` attribute's federated logins
/// become identities (`providerName` as provider, `userId` as subject). `UserCreateDate`
/// becomes `created_at`; `Enabled: false` a blocked user, `UNCONFIRMED` a pending one. Cognito
/// never exports passwords: a user that had one (any status but `EXTERNAL_PROVIDER`) gets
/// `app_metadata.legacy_password`, the mark the README's sign-in migration looks for. A
/// `Groups` list (which list-users lacks; the README's script adds it) becomes
/// `app_metadata.groups`.
pub fn from_cognito(obj: Map<String, Value>) -> Result<Map<String, Value>, String> {
    let mut out = Map::new();
    let mut app = Map::new();
    let mut metadata = Map::new();
    let mut username = None;
    for (k, v) in obj {
        match k.as_str() {
            "Username" => username = text(&v),
            "Attributes" => {
                let Value::Array(list) = v else {
                    return Err("Attributes: must be an array".into());
                };
                for (i, a) in list.iter().enumerate() {
                    let (Some(name), Some(value)) = (
                        a.get("Name").and_then(Value::as_str),
                        a.get("Value").and_then(Value::as_str),
                    ) else {
                        return Err(format!("Attributes[{i}]: needs Name and Value"));
                    };
                    let own = COGNITO_ATTRIBUTES.iter().find(|(c, _)| *c == name);
                    match (name, own) {
                        ("sub", _) => {
                            out.insert("external_id".into(), Value::String(value.into()));
                        }
                        ("identities", _) => {
                            let linked = cognito_identities(value)?;
                            set_identities(&mut out, linked);
                        }
                        (_, Some((_, to))) => {
                            out.insert(to.to_string(), Value::String(value.into()));
                        }
                        (name, None) => {
                            let key = name.strip_prefix("custom:").unwrap_or(name);
                            metadata.insert(key.to_string(), Value::String(value.into()));
                        }
                    }
                }
            }
            "UserCreateDate" => {
                out.insert("created_at".into(), aws_time(&k, v)?);
            }
            "Enabled" => {
                if v == Value::Bool(false) {
                    blocked(&mut out, "disabled in Cognito");
                }
            }
            "UserStatus" => {
                let status = text(&v).unwrap_or_default();
                if status == "UNCONFIRMED" {
                    out.insert("pending".into(), Value::Bool(true));
                }
                if status != "EXTERNAL_PROVIDER" {
                    app.insert("legacy_password".into(), Value::Bool(true));
                }
            }
            // Not in list-users: the README's script adds each user's groups (names, or
            // Cognito's group objects), what `cognito:groups` put in their tokens.
            "Groups" => {
                let Value::Array(list) = v else {
                    return Err("Groups: must be a list of group names".into());
                };
                let mut groups = Vec::with_capacity(list.len());
                for (i, g) in list.iter().enumerate() {
                    let name = match g {
                        Value::Object(o) => o.get("GroupName").and_then(text),
                        other => text(other),
                    };
                    groups.push(name.ok_or_else(|| format!("Groups[{i}]: needs a GroupName"))?);
                }
                put_names(&mut app, "groups", groups);
            }
            // Cognito's bookkeeping and its second factors (which users enroll again).
            "UserLastModifiedDate"
            | "MFAOptions"
            | "UserMFASettingList"
            | "PreferredMfaSetting" => {}
            other if other.starts_with('_') => {}
            other => return Err(format!("unknown Cognito field '{other}'")),
        }
    }
    if let Some(name) = username
        && out.get("external_id").and_then(Value::as_str) != Some(name.as_str())
    {
        out.insert("username".into(), Value::String(name));
    }
    if !metadata.is_empty() {
        out.insert("user_metadata".into(), Value::Object(metadata));
    }
    if !app.is_empty() {
        out.insert("app_metadata".into(), Value::Object(app));
    }
    // A pending user is not also blocked: Cognito's Enabled wins.
    if out.contains_key("blocked") {
        out.remove("pending");
    }
    Ok(out)
}

/// The `identities` attribute: JSON text of the user's federated logins.
fn cognito_identities(text: &str) -> Result<Vec<Value>, String> {
    let list = match serde_json::from_str::<Value>(text) {
        Ok(Value::Array(a)) => a,
        _ => return Err("the identities attribute: must be a JSON array".into()),
    };
    let mut linked = Vec::with_capacity(list.len());
    for (i, x) in list.iter().enumerate() {
        let field = |f: &str| x.get(f).and_then(self::text);
        let (Some(provider), Some(subject)) = (field("providerName"), field("userId")) else {
            return Err(format!(
                "the identities attribute [{i}]: needs providerName and userId"
            ));
        };
        linked.push(identity(provider, subject, &[]));
    }
    Ok(linked)
}

/// A time as the AWS CLI writes it: ISO 8601 (its default), or seconds since 1970 (the API's,
/// and the CLI's with `cli_timestamp_format = none`).
fn aws_time(field: &str, v: Value) -> Result<Value, String> {
    let parsed = match &v {
        Value::Number(n) => n
            .as_f64()
            .and_then(|s| DateTime::<Utc>::from_timestamp_millis((s * 1000.0).round() as i64)),
        Value::String(s) => DateTime::parse_from_rfc3339(s.trim())
            .ok()
            .map(|t| t.with_timezone(&Utc)),
        _ => None,
    };
    parsed
        .map(|t| Value::String(t.to_rfc3339_opts(SecondsFormat::Millis, true)))
        .ok_or_else(|| format!("{field}: must be an ISO 8601 time or seconds since 1970"))
}

/// A Keycloak OTP credential as a TOTP factor (as `authenticators` takes it). The seed is
/// `secretData.value`'s UTF-8 bytes, or that value decoded from base32 when
/// `credentialData.secretEncoding` says BASE32 (as Keycloak reads it). Only what Roster's TOTP
/// is can be carried (HMAC-SHA1, 6 digits, 30 s steps): another fails the record, naming it,
/// rather than dropping the user's second factor.
fn keycloak_totp(credential: &Value) -> Result<Value, String> {
    let part = |name| keycloak_part(credential, name);
    let (secret, data) = (part("secretData")?, part("credentialData")?);
    let get = |name: &str| data.get(name).and_then(text);
    let sub_type = get("subType").unwrap_or_else(|| "totp".into());
    let algorithm = get("algorithm").unwrap_or_else(|| "HmacSHA1".into());
    let digits = get("digits").unwrap_or_else(|| "6".into());
    let period = get("period").unwrap_or_else(|| "30".into());
    if (
        sub_type.as_str(),
        algorithm.as_str(),
        digits.as_str(),
        period.as_str(),
    ) != ("totp", "HmacSHA1", "6", "30")
    {
        return Err(format!(
            "credentials: an OTP credential ({sub_type}, {algorithm}, {digits} digits, {period} s) \
             that Roster's TOTP (totp, HmacSHA1, 6 digits, 30 s) cannot carry; remove it to \
             import the user without it"
        ));
    }
    let value = secret
        .get("value")
        .and_then(Value::as_str)
        .ok_or("credentials.secretData: has no value")?;
    let seed = match get("secretEncoding").map(|e| e.to_ascii_uppercase()) {
        None => value.as_bytes().to_vec(),
        Some(e) if e == "BASE32" => base32_seed("credentials.secretData", value)?,
        Some(e) => return Err(format!("credentials: unknown OTP secretEncoding {e}")),
    };
    let created = match credential.get("createdDate").cloned() {
        Some(c) => Some(millis_time("createdDate", c)?),
        None => None,
    };
    Ok(totp_factor(
        &seed,
        credential.get("userLabel").and_then(text),
        created,
    ))
}

/// A Keycloak credential's `secretData` or `credentialData`: JSON kept as a string.
fn keycloak_part(credential: &Value, name: &str) -> Result<Map<String, Value>, String> {
    match credential
        .get(name)
        .cloned()
        .map(|v| as_json(&format!("credentials.{name}"), v))
    {
        Some(Ok(Value::Object(m))) => Ok(m),
        Some(Err(e)) => Err(e),
        _ => Err(format!("credentials.{name}: must be a JSON object")),
    }
}

/// Keycloak's recovery codes (a `recovery-authn-codes` credential) as a RECOVERY_CODES
/// factor, or `None` when all were used. Its `secretData` lists the unused codes (a used one
/// is removed) with `encodedHashedValue`, the Base64 of the SHA-512 of the code as issued:
/// the hash Roster checks an imported set's codes against. Keycloak asks for the codes in
/// order; Roster takes any unused one.
fn keycloak_recovery_codes(credential: &Value) -> Result<Option<Value>, String> {
    let (secret, data) = (
        keycloak_part(credential, "secretData")?,
        keycloak_part(credential, "credentialData")?,
    );
    // `RS512` before Keycloak 26.2 and `SHA-512` since: both the SHA-512 of the code, once.
    let algorithm = data.get("algorithm").and_then(text);
    let iterations = data.get("hashIterations").and_then(text);
    let known = matches!(
        algorithm.as_deref(),
        None | Some("RS512" | "SHA-512" | "SHA512")
    );
    if !known || iterations.as_deref().is_some_and(|n| n != "1") {
        return Err(format!(
            "credentials: recovery codes hashed with {} ({} iterations) that Roster cannot \
             check (it takes Keycloak's SHA-512); remove the credential to import the user \
             without them",
            algorithm.as_deref().unwrap_or("an unnamed algorithm"),
            iterations.as_deref().unwrap_or("1"),
        ));
    }
    let Some(Value::Array(codes)) = secret.get("codes") else {
        return Err("credentials.secretData: has no codes".into());
    };
    let mut hashes = Vec::with_capacity(codes.len());
    for (i, code) in codes.iter().enumerate() {
        let field = format!("credentials.secretData.codes[{i}].encodedHashedValue");
        let value = code
            .get("encodedHashedValue")
            .and_then(text)
            .ok_or_else(|| format!("{field}: is missing"))?;
        let hash = base64_bytes(&field, &value)?;
        if hash.len() != 64 {
            return Err(format!("{field}: is not a SHA-512 hash (64 bytes)"));
        }
        hashes.push(json!(
            base64::engine::general_purpose::STANDARD.encode(hash)
        ));
    }
    if hashes.is_empty() {
        return Ok(None);
    }
    let created = match credential.get("createdDate").cloned() {
        Some(c) => Some(millis_time("createdDate", c)?),
        None => None,
    };
    let name = credential.get("userLabel").and_then(text);
    let carried = ("recovery_code_hashes", Value::Array(hashes));
    Ok(Some(factor("RECOVERY_CODES", carried, name, created)))
}

/// An `authenticators` entry (records.rs): its type, the one field that type carries, and
/// the optional name and creation time.
fn factor(
    kind: &str,
    carried: (&str, Value),
    name: Option<String>,
    created: Option<Value>,
) -> Value {
    let mut f = Map::from_iter([
        ("type".to_string(), json!(kind)),
        (carried.0.to_string(), carried.1),
    ]);
    if let Some(name) = name {
        f.insert("name".into(), Value::String(name));
    }
    if let Some(created) = created.filter(|c| !c.is_null()) {
        f.insert("created_at".into(), created);
    }
    Value::Object(f)
}

/// A TOTP factor with its seed (base64, as `authenticators` takes it).
fn totp_factor(seed: &[u8], name: Option<String>, created: Option<Value>) -> Value {
    let secret = base64::engine::general_purpose::STANDARD.encode(seed);
    factor("TOTP", ("totp_secret", json!(secret)), name, created)
}

/// A TOTP seed as authenticator apps are given it: base32, padded or not, any case.
fn base32_seed(field: &str, text: &str) -> Result<Vec<u8>, String> {
    base32::decode(
        base32::Alphabet::Rfc4648 { padding: false },
        &text.trim().trim_end_matches('=').to_ascii_uppercase(),
    )
    .filter(|seed| !seed.is_empty())
    .ok_or_else(|| format!("{field}: is not base32"))
}

/// A Keycloak WebAuthn credential (its `credentialData`: `credentialId` and
/// `credentialPublicKey`, the COSE key, in base64, `counter`, `aaguid`, `transports`) as a
/// PASSKEY factor. A passwordless one was registered with user verification.
fn keycloak_passkey(i: usize, credential: &Value, passwordless: bool) -> Result<Value, String> {
    let field = format!("credentials[{i}]");
    let data = match credential
        .get("credentialData")
        .cloned()
        .map(|v| as_json(&format!("{field}.credentialData"), v))
    {
        Some(Ok(Value::Object(m))) => m,
        Some(Err(e)) => return Err(e),
        _ => return Err(format!("{field}.credentialData: must be a JSON object")),
    };
    let bytes = |name: &str| match data.get(name).and_then(text) {
        Some(t) => base64_bytes(&format!("{field}.{name}"), &t),
        None => Err(format!("{field}: has no {name}")),
    };
    let transports = texts(data.get("transports"));
    let counter = data.get("counter").and_then(Value::as_u64).unwrap_or(0);
    let passkey = carry(
        &field,
        &bytes("credentialId")?,
        &bytes("credentialPublicKey")?,
        (counter, "counter"),
        passwordless,
        (false, false),
        &transports,
    )?;
    let aaguid = data
        .get("aaguid")
        .and_then(text)
        .and_then(|a| uuid::Uuid::parse_str(&a).ok());
    let created = match credential.get("createdDate").cloned() {
        Some(c) => Some(millis_time("createdDate", c)?),
        None => None,
    };
    let name = credential.get("userLabel").and_then(text);
    Ok(passkey_factor(&passkey, aaguid, &transports, name, created))
}

/// A Keycloak password credential as a PHC string. Keycloak keeps `secretData` (`value`, the
/// derived key, and `salt`, both base64) and `credentialData` (`algorithm`, `hashIterations`
/// and, for argon2, `additionalParameters` of one-element lists) as JSON text.
fn keycloak_hash(credential: &Value) -> Result<String, String> {
    let part = |name: &str| {
        let v = credential.get(name).cloned().unwrap_or(Value::Null);
        match as_json(&format!("credentials.{name}"), v)? {
            Value::Object(m) => Ok(m),
            _ => Err(format!("credentials.{name}: must be a JSON object")),
        }
    };
    let secret = part("secretData")?;
    let data = part("credentialData")?;
    let bytes = |name: &str| {
        let t = secret.get(name).and_then(Value::as_str).unwrap_or_default();
        base64_bytes(&format!("credentials.secretData.{name}"), t)
    };
    let value = bytes("value")?;
    let key_len = value.len();
    // PHC strings carry base64 without padding.
    let b64 = base64::engine::general_purpose::STANDARD_NO_PAD;
    let (value, salt) = (b64.encode(value), b64.encode(bytes("salt")?));
    let iterations = data
        .get("hashIterations")
        .and_then(Value::as_u64)
        .ok_or("credentials.credentialData: has no hashIterations")?;
    let algorithm = data
        .get("algorithm")
        .and_then(Value::as_str)
        .unwrap_or_default();
    match algorithm {
        "pbkdf2-sha256" | "pbkdf2-sha512" | "pbkdf2" => Ok(format!(
            "${algorithm}$i={iterations},l={key_len}${salt}${value}"
        )),
        "argon2" => {
            let extra = data.get("additionalParameters");
            let param = |name: &str, default: &str| {
                let v = extra.and_then(|e| e.get(name));
                let v = match v {
                    Some(Value::Array(a)) => a.first(),
                    other => other,
                };
                v.and_then(text).unwrap_or_else(|| default.to_string())
            };
            let kind = param("type", "id");
            let version = match param("version", "1.3").as_str() {
                "1.3" => 19,
                "1.0" => 16,
                other => return Err(format!("credentials: unknown argon2 version {other}")),
            };
            if !["id", "i", "d"].contains(&kind.as_str()) {
                return Err(format!("credentials: unknown argon2 type {kind}"));
            }
            Ok(format!(
                "$argon2{kind}$v={version}$m={},t={iterations},p={}${salt}${value}",
                param("memory", "7168"),
                param("parallelism", "1")
            ))
        }
        other => Err(format!(
            "credentials: Keycloak hash algorithm '{other}' is not one Roster accepts"
        )),
    }
}

/// Supabase Auth's bookkeeping columns of `auth.users`: one-time tokens (secrets, never
/// carried), pending changes, and what Roster keeps its own account of.
const SUPABASE_SKIPPED: &[&str] = &[
    "instance_id",
    "aud",
    "role",
    "confirmation_token",
    "confirmation_sent_at",
    "recovery_token",
    "recovery_sent_at",
    "email_change_token_new",
    "email_change_token_current",
    "email_change",
    "email_change_sent_at",
    "email_change_confirm_status",
    "phone_change",
    "phone_change_token",
    "phone_change_sent_at",
    "reauthentication_token",
    "reauthentication_sent_at",
    "invited_at",
    "confirmed_at",
    "updated_at",
    "is_super_admin",
    "is_sso_user",
];

/// Identity providers of Supabase that are not linked accounts: the email and phone sign-ins.
const SUPABASE_NOT_LINKED: &[&str] = &["email", "phone"];

/// A row of Supabase Auth's `auth.users` (as `to_jsonb` writes it) in Roster's field
/// names: `id` becomes `external_id`, `encrypted_password` (bcrypt) `password_hash`,
/// `email_confirmed_at`/`phone_confirmed_at` the verified flags, `phone` (kept without its
/// `+`) an E.164 number, `last_sign_in_at` `last_login_at`; `raw_user_meta_data` becomes
/// `user_metadata` (its `full_name` or `name` also `display_name`, its `avatar_url` or
/// `picture` `picture_url`), `raw_app_meta_data` `app_metadata` without Supabase's own
/// `provider`/`providers`. A user banned until a time still to come is imported blocked, one
/// that confirmed neither address pending; a deleted or anonymous user is refused. The
/// `identities` and `mfa_factors` columns the README's query adds carry linked accounts
/// (`auth.identities`) and verified TOTP and phone factors (`auth.mfa_factors`).
pub fn from_supabase(obj: Map<String, Value>) -> Result<Map<String, Value>, String> {
    let mut out = Map::new();
    let mut confirmed = false;
    for (k, v) in obj {
        let to = match k.as_str() {
            "id" => "external_id",
            "email" | "username" => k.as_str(),
            // As the Clerk migration tool's query names them.
            "first_name" => "given_name",
            "last_name" => "family_name",
            "encrypted_password" => {
                if let Some(hash) = text(&v) {
                    out.insert("password_hash".into(), Value::String(hash));
                }
                continue;
            }
            "email_confirmed_at" | "phone_confirmed_at" => {
                if text(&v).is_some() {
                    confirmed = true;
                    let flag = if k == "email_confirmed_at" {
                        "email_verified"
                    } else {
                        "phone_verified"
                    };
                    out.insert(flag.into(), Value::Bool(true));
                }
                continue;
            }
            "phone" => {
                if let Some(phone) = text(&v) {
                    out.insert("phone_number".into(), Value::String(e164(&phone)));
                }
                continue;
            }
            "created_at" | "last_sign_in_at" => {
                let to = if k == "created_at" {
                    "created_at"
                } else {
                    "last_login_at"
                };
                out.insert(to.into(), pg_time(&k, &v)?);
                continue;
            }
            "banned_until" => {
                let Some(until) = text(&v) else { continue };
                // PostgreSQL's 'infinity' is a ban for good.
                let banned =
                    until == "infinity" || pg_datetime(&k, &v)?.is_some_and(|t| t > Utc::now());
                if banned {
                    blocked(&mut out, &format!("banned in Supabase until {until}"));
                }
                continue;
            }
            "deleted_at" => {
                if text(&v).is_some() {
                    return Err("deleted in Supabase (deleted_at is set)".into());
                }
                continue;
            }
            "is_anonymous" => {
                if as_bool(&k, v)? {
                    return Err("an anonymous Supabase user (no address to sign in with)".into());
                }
                continue;
            }
            "raw_user_meta_data" => {
                let Value::Object(meta) = as_json(&k, v)? else {
                    continue;
                };
                let first = |names: &[&str]| names.iter().find_map(|n| meta.get(*n).and_then(text));
                if let Some(name) = first(&["full_name", "name"]) {
                    out.insert("display_name".into(), Value::String(name));
                }
                if let Some(picture) = first(&["avatar_url", "picture"]) {
                    out.insert("picture_url".into(), Value::String(picture));
                }
                if !meta.is_empty() {
                    out.insert("user_metadata".into(), Value::Object(meta));
                }
                continue;
            }
            "raw_app_meta_data" => {
                let Value::Object(mut meta) = as_json(&k, v)? else {
                    continue;
                };
                // Which sign-in methods the user has: Roster keeps that itself.
                meta.remove("provider");
                meta.remove("providers");
                if !meta.is_empty() {
                    out.insert("app_metadata".into(), Value::Object(meta));
                }
                continue;
            }
            "identities" => {
                let list = array_of(&k, v)?;
                let mut linked = Vec::new();
                for (i, id) in list.iter().enumerate() {
                    let field = |f: &str| id.get(f).and_then(text);
                    let data = id.get("identity_data").filter(|d| d.is_object());
                    // provider_id since 2023; before, the provider's id was the row's id.
                    let subject = field("provider_id")
                        .or_else(|| data.and_then(|d| d.get("sub")).and_then(text))
                        .or_else(|| field("id"));
                    let (Some(provider), Some(subject)) = (field("provider"), subject) else {
                        return Err(format!("identities[{i}]: needs provider and provider_id"));
                    };
                    if SUPABASE_NOT_LINKED.contains(&provider.as_str()) {
                        continue;
                    }
                    let email = field("email")
                        .or_else(|| data.and_then(|d| d.get("email")).and_then(text))
                        .map(Value::String);
                    linked.push(identity(
                        provider,
                        subject,
                        &[("email", email), ("profile", data.cloned())],
                    ));
                }
                set_identities(&mut out, linked);
                continue;
            }
            "mfa_factors" => {
                let list = array_of(&k, v)?;
                let mut factors = Vec::new();
                for (i, f) in list.iter().enumerate() {
                    if let Some(factor) = supabase_factor(i, f)? {
                        factors.push(factor);
                    }
                }
                if !factors.is_empty() {
                    out.insert("authenticators".into(), Value::Array(factors));
                }
                continue;
            }
            other if SUPABASE_SKIPPED.contains(&other) => continue,
            other => return Err(format!("unknown Supabase field '{other}'")),
        };
        out.insert(to.to_string(), v);
    }
    let has_address = ["email", "phone_number"]
        .iter()
        .any(|f| out.get(*f).and_then(text).is_some());
    if !confirmed && has_address && !out.contains_key("blocked") {
        out.insert("pending".into(), Value::Bool(true));
    }
    Ok(out)
}

/// A verified Supabase MFA factor as an `authenticators` entry: TOTP with its base32 secret,
/// phone as an SMS OTP channel, WebAuthn as a passkey (from its `web_authn_credential`).
/// Unverified factors (enrolment never finished) are left out. A secret encrypted by GoTrue's
/// database encryption cannot be read here and fails the record.
fn supabase_factor(i: usize, f: &Value) -> Result<Option<Value>, String> {
    let field = |name: &str| f.get(name).and_then(text);
    if field("status").as_deref() != Some("verified") {
        return Ok(None);
    }
    let created = match f.get("created_at") {
        Some(c) => Some(pg_time("mfa_factors.created_at", c)?),
        None => None,
    };
    let name = field("friendly_name");
    match field("factor_type").as_deref() {
        Some("totp") => {
            let secret = field("secret").ok_or(format!("mfa_factors[{i}]: has no secret"))?;
            if secret.starts_with('{') {
                return Err(format!(
                    "mfa_factors[{i}]: the TOTP secret is encrypted (GoTrue's database \
                     encryption); decrypt it in the query, or leave mfa_factors out to import \
                     the user without it"
                ));
            }
            let seed = base32_seed(&format!("mfa_factors[{i}].secret"), &secret)?;
            Ok(Some(totp_factor(&seed, name, created)))
        }
        Some("phone") => {
            let phone = field("phone").ok_or(format!("mfa_factors[{i}]: has no phone"))?;
            Ok(Some(factor(
                "SMS_OTP",
                ("phone_number", Value::String(e164(&phone))),
                name,
                created,
            )))
        }
        // GoTrue keeps the credential as go-webauthn's Credential JSON; without it (a
        // factor from before it did, or a query leaving it out), the user registers again.
        Some("webauthn") => match f.get("web_authn_credential").filter(|c| c.is_object()) {
            Some(c) => Ok(Some(go_webauthn_passkey(
                &format!("mfa_factors[{i}].web_authn_credential"),
                c,
                name,
                created,
            )?)),
            None => Ok(None),
        },
        other => Err(format!(
            "mfa_factors[{i}]: unknown factor_type '{}'",
            other.unwrap_or_default()
        )),
    }
}

/// A go-webauthn `Credential` (`id`, `publicKey` as COSE, `flags`, `transport`,
/// `authenticator.AAGUID` and `SignCount`; bytes in base64) as a PASSKEY factor.
fn go_webauthn_passkey(
    field: &str,
    c: &Value,
    name: Option<String>,
    created: Option<Value>,
) -> Result<Value, String> {
    let bytes = |key: &str| match c.get(key).and_then(text) {
        Some(t) => base64_bytes(&format!("{field}.{key}"), &t),
        None => Err(format!("{field}: has no {key}")),
    };
    let flag = |key: &str| c.pointer(&format!("/flags/{key}")) == Some(&Value::Bool(true));
    let counter = c
        .pointer("/authenticator/SignCount")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let transports = texts(c.get("transport"));
    let passkey = carry(
        field,
        &bytes("id")?,
        &bytes("publicKey")?,
        (counter, "SignCount"),
        flag("userVerified"),
        (flag("backupEligible"), flag("backupState")),
        &transports,
    )?;
    let aaguid = c
        .pointer("/authenticator/AAGUID")
        .and_then(text)
        .and_then(|a| base64_bytes("AAGUID", &a).ok())
        .and_then(|a| uuid::Uuid::from_slice(&a).ok());
    Ok(passkey_factor(&passkey, aaguid, &transports, name, created))
}

/// The text items of an array field (a credential's transports); none when absent.
fn texts(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|t| t.iter().filter_map(text).collect())
        .unwrap_or_default()
}

/// [`carried_from_cose`](crate::authenticators::passkey::carried_from_cose) for a source's
/// credential at `field`, its counter named as the source names it.
fn carry(
    field: &str,
    id: &[u8],
    key: &[u8],
    (counter, counter_name): (u64, &str),
    user_verified: bool,
    backed_up: (bool, bool),
    transports: &[String],
) -> Result<Vec<u8>, String> {
    let counter =
        u32::try_from(counter).map_err(|_| format!("{field}: {counter_name} is out of range"))?;
    crate::authenticators::passkey::carried_from_cose(
        id,
        key,
        counter,
        user_verified,
        backed_up,
        transports,
    )
    .map_err(|e| format!("{field}: {e}"))
}

/// A PASSKEY `authenticators` entry carrying `passkey` (the stored form), with the
/// authenticator's model (a nil AAGUID is none), transports, name and creation time.
fn passkey_factor(
    passkey: &[u8],
    aaguid: Option<uuid::Uuid>,
    transports: &[String],
    name: Option<String>,
    created: Option<Value>,
) -> Value {
    let b64 = base64::engine::general_purpose::STANDARD.encode(passkey);
    let mut f = factor("PASSKEY", ("passkey", json!(b64)), name, created);
    if let Value::Object(m) = &mut f {
        if let Some(aaguid) = aaguid.filter(|a| !a.is_nil()) {
            m.insert("aaguid".into(), json!(aaguid.to_string()));
        }
        if !transports.is_empty() {
            m.insert("transports".into(), json!(transports));
        }
    }
    f
}

/// A phone number stored without its `+` (Supabase), as E.164.
fn e164(phone: &str) -> String {
    let phone = phone.trim();
    if phone.starts_with('+') {
        phone.to_string()
    } else {
        format!("+{phone}")
    }
}

/// A PostgreSQL `timestamptz` as JSON or psql writes it (`2024-01-15T10:30:00.123456+00:00`,
/// `2024-01-15 10:30:00.123456+00`), or a `timestamp` (taken as UTC), as RFC 3339; null or
/// empty stays null.
fn pg_time(field: &str, v: &Value) -> Result<Value, String> {
    Ok(match pg_datetime(field, v)? {
        Some(t) => Value::String(t.to_rfc3339_opts(SecondsFormat::Micros, true)),
        None => Value::Null,
    })
}

/// [`pg_time`]'s parse, as a time.
fn pg_datetime(field: &str, v: &Value) -> Result<Option<DateTime<Utc>>, String> {
    let Some(t) = text(v) else {
        return Ok(None);
    };
    let t = t.trim().replacen(' ', "T", 1);
    DateTime::parse_from_rfc3339(&t)
        .or_else(|_| DateTime::parse_from_str(&t, "%Y-%m-%dT%H:%M:%S%.f%#z"))
        .map(|t| t.with_timezone(&Utc))
        // A `timestamp` without time zone (Kratos's columns), which those stores keep in UTC.
        .or_else(|_| {
            chrono::NaiveDateTime::parse_from_str(&t, "%Y-%m-%dT%H:%M:%S%.f").map(|t| t.and_utc())
        })
        .map(Some)
        .map_err(|_| format!("{field}: must be a time as PostgreSQL writes it"))
}

/// Clerk's hashers whose digests are in a format Roster reads as it is (bcrypt and PHC
/// argon2 as themselves, Django's and Werkzeug's as those frameworks write them).
const CLERK_HASHERS: &[&str] = &[
    "bcrypt",
    "argon2i",
    "argon2id",
    "bcrypt_sha256_django",
    "pbkdf2_sha256_django",
    "scrypt_werkzeug",
];

/// Clerk fields Roster has no place for: backup codes (no Clerk export holds the codes
/// themselves: users make new ones), and the Backend API's flags, settings
/// and activity that Roster keeps its own account of (or has no notion of: web3 wallets).
const CLERK_SKIPPED: &[&str] = &[
    "backup_codes_enabled",
    "backup_codes",
    "object",
    "profile_image_url",
    "primary_web3_wallet_id",
    "web3_wallets",
    "passkeys",
    "password_enabled",
    "password_last_updated_at",
    "two_factor_enabled",
    "totp_enabled",
    "backup_code_enabled",
    "mfa_enabled_at",
    "mfa_disabled_at",
    "locked",
    "lockout_expires_in_seconds",
    "verification_attempts_remaining",
    "updated_at",
    "last_active_at",
    "delete_self_enabled",
    "create_organization_enabled",
    "create_organizations_limit",
    "legal_accepted_at",
];

/// A Clerk dashboard export record (CSV, or the JSON variant) in Roster's field names: `id`
/// becomes `external_id`, `first_name`/`last_name` `given_name`/`family_name`, the primary
/// email address and phone number `email` and `phone_number` (verified when listed among the
/// verified ones; Roster keeps one of each, so other addresses are not carried),
/// `password_digest` `password_hash` when its `password_hasher` is one Roster reads,
/// `totp_secret` a TOTP factor, `image_url` `picture_url` (when `has_image`: not Clerk's
/// generated avatar); `unsafe_metadata` (which users may edit) becomes `user_metadata`, and
/// `public_metadata` with `private_metadata` (both set by the backend) `app_metadata`.
///
/// A user of the Backend API's list (`GET /v1/users`, which has no digests or secrets) maps
/// the same way, plus: its address objects (the primary one by `primary_*_id`, verified as
/// its `verification.status` says), `external_accounts` (`oauth_google` as provider
/// `google`) and `enterprise_accounts`/`saml_accounts` (with the connection's name) as
/// identities, `banned` as blocked, `created_at` and `last_sign_in_at` (milliseconds), and
/// Clerk's own `external_id` kept as `app_metadata.clerk_external_id`.
pub fn from_clerk(obj: Map<String, Value>) -> Result<Map<String, Value>, String> {
    let mut out = Map::new();
    let mut verified_emails = Vec::new();
    let mut verified_phones = Vec::new();
    // The Backend API's address objects, and which of them is primary.
    let mut addresses: [Vec<(String, String, bool)>; 2] = Default::default();
    let mut primary: [Option<String>; 2] = Default::default();
    let mut linked = Vec::new();
    let mut picture = None;
    let mut has_image = true;
    let mut digest = None;
    let mut hasher = None;
    let mut app = Map::new();
    for (k, v) in obj {
        match k.as_str() {
            "id" | "first_name" | "last_name" | "username" => {
                let to = match k.as_str() {
                    "id" => "external_id",
                    "first_name" => "given_name",
                    "last_name" => "family_name",
                    _ => "username",
                };
                if let Some(t) = text(&v) {
                    out.insert(to.into(), Value::String(t.trim().to_string()));
                }
            }
            "primary_email_address" => {
                if let Some(t) = text(&v) {
                    out.insert("email".into(), Value::String(t.trim().to_string()));
                }
            }
            "primary_phone_number" => {
                if let Some(t) = text(&v) {
                    out.insert("phone_number".into(), Value::String(t.trim().to_string()));
                }
            }
            // The JSON export lists the verified ones as `email_addresses`/`phone_numbers`
            // (text); the Backend API lists every one as an object.
            "email_addresses" | "phone_numbers"
                if v.as_array().is_some_and(|a| a.iter().any(Value::is_object)) =>
            {
                let (i, field) = if k == "email_addresses" {
                    (0, "email_address")
                } else {
                    (1, "phone_number")
                };
                addresses[i] = clerk_addresses(&k, field, &v)?;
            }
            "primary_email_address_id" => primary[0] = text(&v),
            "primary_phone_number_id" => primary[1] = text(&v),
            "verified_email_addresses" | "email_addresses" => verified_emails = clerk_list(&v),
            "verified_phone_numbers" | "phone_numbers" => verified_phones = clerk_list(&v),
            "external_accounts" | "enterprise_accounts" | "saml_accounts" => {
                let Value::Array(list) = v else { continue };
                for (i, a) in list.iter().enumerate() {
                    let field = |f: &str| a.get(f).and_then(text);
                    let (Some(provider), Some(subject)) =
                        (field("provider"), field("provider_user_id"))
                    else {
                        return Err(format!("{k}[{i}]: needs provider and provider_user_id"));
                    };
                    // `oauth_google` is Google; `saml_okta` stays as it is, with its connection.
                    let provider = provider
                        .strip_prefix("oauth_")
                        .map(str::to_string)
                        .unwrap_or(provider);
                    let connection = ["enterprise_connection", "saml_connection"]
                        .iter()
                        .find_map(|c| a.get(*c).and_then(|c| c.get("name")).and_then(text))
                        .map(Value::String);
                    let email = field("email_address").map(Value::String);
                    linked.push(identity(
                        provider,
                        subject,
                        &[("connection", connection), ("email", email)],
                    ));
                }
            }
            "banned" => {
                if as_bool(&k, v)? {
                    blocked(&mut out, "banned in Clerk");
                }
            }
            "created_at" | "last_sign_in_at" => {
                let to = if k == "created_at" {
                    "created_at"
                } else {
                    "last_login_at"
                };
                out.insert(to.into(), millis_time(&k, v)?);
            }
            "external_id" => {
                if let Some(id) = text(&v) {
                    app.insert("clerk_external_id".into(), Value::String(id));
                }
            }
            "unverified_email_addresses" | "unverified_phone_numbers" => {}
            "password_digest" => digest = text(&v),
            "password_hasher" => hasher = text(&v),
            "totp_secret" => {
                if let Some(secret) = text(&v) {
                    let seed = base32_seed("totp_secret", &secret)?;
                    let totp = totp_factor(&seed, None, None);
                    out.insert("authenticators".into(), json!([totp]));
                }
            }
            "image_url" => picture = text(&v),
            "has_image" => has_image = as_bool(&k, v)?,
            "unsafe_metadata" => {
                if let Value::Object(m) = as_json(&k, v)?
                    && !m.is_empty()
                {
                    out.insert("user_metadata".into(), Value::Object(m));
                }
            }
            "public_metadata" | "private_metadata" => {
                if let Value::Object(m) = as_json(&k, v)? {
                    merge_into(&mut app, m, "public_metadata and private_metadata")?;
                }
            }
            // Not in the user list: the README's script adds each user's memberships.
            "organizations" => put_memberships(&mut app, &k, v)?,
            other if CLERK_SKIPPED.contains(&other) => {}
            other => return Err(format!("unknown Clerk field '{other}'")),
        }
    }
    for (i, field, flag) in [
        (0, "email", "email_verified"),
        (1, "phone_number", "phone_verified"),
    ] {
        let chosen = addresses[i]
            .iter()
            .find(|(id, _, _)| Some(id) == primary[i].as_ref())
            .or(addresses[i].first());
        if let Some((_, address, verified)) = chosen {
            out.insert(field.into(), Value::String(address.clone()));
            out.insert(flag.into(), Value::Bool(*verified));
        }
    }
    set_identities(&mut out, linked);
    for (field, flag, verified) in [
        ("email", "email_verified", &verified_emails),
        ("phone_number", "phone_verified", &verified_phones),
    ] {
        if out.contains_key(flag) {
            continue;
        }
        if let Some(address) = out.get(field).and_then(Value::as_str) {
            let listed = verified.iter().any(|a| a.eq_ignore_ascii_case(address));
            out.insert(flag.into(), Value::Bool(listed));
        }
    }
    if let Some(picture) = picture.filter(|_| has_image) {
        out.insert("picture_url".into(), Value::String(picture));
    }
    if !app.is_empty() {
        out.insert("app_metadata".into(), Value::Object(app));
    }
    if let Some(digest) = digest {
        let hasher = hasher.unwrap_or_else(|| "bcrypt".into());
        if !CLERK_HASHERS.contains(&hasher.as_str()) {
            return Err(format!(
                "password_hasher '{hasher}' is not a format Roster reads ({}); empty \
                 password_digest to import the user without the password",
                CLERK_HASHERS.join(", ")
            ));
        }
        out.insert("password_hash".into(), Value::String(digest));
    }
    Ok(out)
}

/// Kratos identity fields Roster has no place for or keeps its own account of: the schema
/// (Roster's profile fields are fixed), bookkeeping times, the recovery addresses (Roster
/// recovers by the user's own email and phone) and the assurance level it last reached.
const KRATOS_SKIPPED: &[&str] = &[
    "schema_id",
    "schema_url",
    "state_changed_at",
    "updated_at",
    "recovery_addresses",
    "available_aal",
    "nid",
];

/// Trait names that are Roster profile fields; every other trait goes to `user_metadata`.
const KRATOS_TRAITS: &[(&str, &str)] = &[
    ("email", "email"),
    ("phone", "phone_number"),
    ("phone_number", "phone_number"),
    ("username", "username"),
    ("first_name", "given_name"),
    ("given_name", "given_name"),
    ("last_name", "family_name"),
    ("family_name", "family_name"),
    ("picture", "picture_url"),
    ("locale", "locale"),
];

/// An Ory Kratos identity (the admin API's `GET /admin/identities/{id}` with
/// `include_credential`, or the README's query of Kratos's database, which writes the same
/// shape) in Roster's field names: `id` becomes `external_id`; the traits `email`, `phone`,
/// `username`, `name` (an object of `first` and `last`, or text), `picture` and `locale`
/// their fields and the other traits `user_metadata` (Kratos's schema is the project's own);
/// the verifiable addresses (`via` email or sms) the verified flags, and the address itself
/// when no trait of those names holds it; `metadata_public` and `metadata_admin` (both set
/// by the backend) `app_metadata`; an `inactive` identity is imported blocked.
///
/// Credentials: the password's `hashed_password` becomes `password_hash` (Kratos's
/// `$pbkdf2-sha1$` and its `$scrypt$`, whose `ln` is N itself, are rewritten as the PHC
/// strings Roster reads; a password left to Kratos's migration hook is marked as Cognito's
/// are, `app_metadata.legacy_password`); each OIDC and SAML provider an identity (provider
/// and subject; the tokens are not read); TOTP a TOTP factor; WebAuthn and passkey
/// credentials passkeys (see [`kratos_passkey`]); the unused recovery codes (`lookup_secret`)
/// a set of codes checked as Kratos issued them. `code` (the addresses, which the user has
/// already) is not carried.
pub fn from_kratos(obj: Map<String, Value>) -> Result<Map<String, Value>, String> {
    let mut out = Map::new();
    let mut app = Map::new();
    let mut addresses: Vec<(String, String, bool)> = Vec::new();
    for (k, v) in obj {
        match k.as_str() {
            "id" => {
                if let Some(id) = text(&v) {
                    out.insert("external_id".into(), Value::String(id));
                }
            }
            "created_at" => {
                out.insert("created_at".into(), pg_time(&k, &v)?);
            }
            "state" => match text(&v).as_deref() {
                None | Some("active") => {}
                Some("inactive") => blocked(&mut out, "inactive in Kratos"),
                Some(other) => return Err(format!("state: unknown Kratos state '{other}'")),
            },
            "traits" => kratos_traits(&mut out, as_json(&k, v)?)?,
            "verifiable_addresses" => {
                for (i, a) in array_of(&k, v)?.iter().enumerate() {
                    let field = |f: &str| a.get(f).and_then(text);
                    let (Some(via), Some(value)) = (field("via"), field("value")) else {
                        return Err(format!("{k}[{i}]: needs via and value"));
                    };
                    let verified = as_bool(&k, a.get("verified").cloned().unwrap_or_default())?;
                    addresses.push((via, value, verified));
                }
            }
            "metadata_public" | "metadata_admin" => {
                if let Value::Object(m) = as_json(&k, v)? {
                    merge_into(&mut app, m, "metadata_public and metadata_admin")?;
                }
            }
            "organization_id" => {
                if let Some(org) = text(&v) {
                    app.insert("kratos_organization_id".into(), Value::String(org));
                }
            }
            "credentials" => {
                let Value::Object(credentials) = as_json(&k, v)? else {
                    continue;
                };
                for (kind, credential) in credentials {
                    kratos_credential(&mut out, &mut app, &kind, &credential)?;
                }
            }
            other if KRATOS_SKIPPED.contains(&other) => {}
            other => return Err(format!("unknown Kratos field '{other}'")),
        }
    }
    for (via, field, flag) in [
        ("email", "email", "email_verified"),
        ("sms", "phone_number", "phone_verified"),
    ] {
        let of_kind = || addresses.iter().filter(|(v, _, _)| v == via);
        let chosen = match out.get(field).and_then(Value::as_str) {
            Some(have) => of_kind().find(|(_, a, _)| a.eq_ignore_ascii_case(have)),
            // No trait of Roster's names holds it: the first verified address, else the first.
            None => of_kind()
                .find(|(_, _, ok)| *ok)
                .or_else(|| of_kind().next()),
        };
        if let Some((_, address, verified)) = chosen {
            out.entry(field)
                .or_insert_with(|| Value::String(address.clone()));
            out.insert(flag.into(), Value::Bool(*verified));
        }
    }
    if !app.is_empty() {
        out.insert("app_metadata".into(), Value::Object(app));
    }
    Ok(out)
}

/// A Kratos identity's traits: those of [`KRATOS_TRAITS`] and `name` as profile fields, the
/// rest as `user_metadata`.
fn kratos_traits(out: &mut Map<String, Value>, traits: Value) -> Result<(), String> {
    let traits = match traits {
        Value::Object(t) => t,
        Value::Null => return Ok(()),
        _ => return Err("traits: must be a JSON object".into()),
    };
    let mut rest = Map::new();
    for (name, value) in traits {
        let to = KRATOS_TRAITS
            .iter()
            .find(|(t, _)| *t == name)
            .map(|(_, to)| *to);
        match (to, name.as_str(), &value) {
            (Some(to), _, Value::String(_)) => {
                out.insert(to.into(), value);
            }
            (None, "name", Value::String(_)) => {
                out.insert("display_name".into(), value);
            }
            // The quickstart schema's `name: {first, last}`.
            (None, "name", Value::Object(parts))
                if parts.keys().all(|p| p == "first" || p == "last") =>
            {
                for (part, to) in [("first", "given_name"), ("last", "family_name")] {
                    if let Some(t) = parts.get(part).and_then(text) {
                        out.insert(to.into(), Value::String(t));
                    }
                }
            }
            _ => {
                rest.insert(name, value);
            }
        }
    }
    if !rest.is_empty() {
        out.insert("user_metadata".into(), Value::Object(rest));
    }
    Ok(())
}

/// One of a Kratos identity's credentials (by its type) into the record.
fn kratos_credential(
    out: &mut Map<String, Value>,
    app: &mut Map<String, Value>,
    kind: &str,
    credential: &Value,
) -> Result<(), String> {
    let field = format!("credentials.{kind}");
    let config = credential.get("config").filter(|c| !c.is_null());
    // The list endpoint, and `GET` without `include_credential`, leave configs out: a
    // password or app read that way would arrive silently missing.
    let needs_config = || {
        format!(
            "{field}: has no config (the hash or secret); fetch each identity with \
             GET /admin/identities/{{id}}?include_credential={kind} as the README shows"
        )
    };
    match kind {
        "password" => {
            let config = config.ok_or_else(needs_config)?;
            if let Some(hash) = config.get("hashed_password").and_then(text) {
                out.insert("password_hash".into(), Value::String(kratos_hash(&hash)?));
            } else if config
                .get("use_password_migration_hook")
                .is_some_and(|h| h == &Value::Bool(true))
            {
                app.insert("legacy_password".into(), Value::Bool(true));
            }
        }
        "oidc" | "saml" => {
            let mut linked = Vec::new();
            match config.and_then(|c| c.get("providers")) {
                Some(providers) => {
                    for (i, p) in array_of(&field, providers.clone())?.iter().enumerate() {
                        let get = |f: &str| p.get(f).and_then(text);
                        let (Some(provider), Some(subject)) = (get("provider"), get("subject"))
                        else {
                            return Err(format!(
                                "{field}.config.providers[{i}]: needs provider and subject"
                            ));
                        };
                        linked.push(identity(provider, subject, &[]));
                    }
                }
                // Without the config, the identifiers say the same: `<provider>:<subject>`.
                None => {
                    let ids = credential.get("identifiers").cloned().unwrap_or_default();
                    for (i, id) in array_of(&field, ids)?.iter().enumerate() {
                        let Some((provider, subject)) = id.as_str().and_then(|t| t.split_once(':'))
                        else {
                            return Err(format!(
                                "{field}.identifiers[{i}]: must be <provider>:<subject>"
                            ));
                        };
                        linked.push(identity(provider.into(), subject.into(), &[]));
                    }
                }
            }
            if let Some(Value::Array(have)) = out.get_mut("identities") {
                have.extend(linked);
            } else {
                set_identities(out, linked);
            }
        }
        "totp" => {
            let config = config.ok_or_else(needs_config)?;
            let Some(url) = config.get("totp_url").and_then(text) else {
                return Ok(());
            };
            let created = match credential.get("created_at") {
                Some(c) => Some(pg_time(&format!("{field}.created_at"), c)?),
                None => None,
            };
            let seed = otpauth_seed(&format!("{field}.config.totp_url"), &url)?;
            add_factor(out, totp_factor(&seed, None, created));
        }
        // Security keys and passkeys, as go-webauthn keeps them: each with its COSE key.
        "webauthn" | "passkey" => {
            let config = config.ok_or_else(needs_config)?;
            let list = config.get("credentials").cloned().unwrap_or_default();
            for (i, c) in array_of(&field, list)?.iter().enumerate() {
                add_factor(
                    out,
                    kratos_passkey(&format!("{field}.credentials[{i}]"), c)?,
                );
            }
        }
        // Recovery codes, kept in the clear with the time each was used: the unused ones
        // come along as codes Roster checks as Kratos issued them.
        "lookup_secret" => {
            let config = config.ok_or_else(needs_config)?;
            let list = config.get("recovery_codes").cloned().unwrap_or_default();
            let mut unused = Vec::new();
            for (i, c) in array_of(&field, list)?.iter().enumerate() {
                // Go's zero time is how an unset `used_at` may have been written.
                let used = c
                    .get("used_at")
                    .and_then(text)
                    .is_some_and(|t| !t.starts_with("0001-01-01"));
                if used {
                    continue;
                }
                let code = c.get("code").and_then(text);
                unused.push(Value::String(code.ok_or_else(|| {
                    format!("{field}.config.recovery_codes[{i}]: needs its code")
                })?));
            }
            if !unused.is_empty() {
                let created = credential.get("created_at").cloned();
                let created = match created.filter(|c| !c.is_null()) {
                    Some(c) => Some(pg_time(&format!("{field}.created_at"), &c)?),
                    None => None,
                };
                add_factor(
                    out,
                    factor(
                        "RECOVERY_CODES",
                        ("recovery_codes", Value::Array(unused)),
                        None,
                        created,
                    ),
                );
            }
        }
        "code" => {}
        other => return Err(format!("{field}: unknown Kratos credential type '{other}'")),
    }
    Ok(())
}

/// Adds a factor to a record's `authenticators`.
fn add_factor(out: &mut Map<String, Value>, factor: Value) {
    match out.get_mut("authenticators") {
        Some(Value::Array(list)) => list.push(factor),
        _ => {
            out.insert("authenticators".into(), Value::Array(vec![factor]));
        }
    }
}

/// A Kratos WebAuthn credential (`id`, `public_key` as COSE, `authenticator.sign_count` and
/// `aaguid`, `flags`, `transport`, `display_name`, `added_at`; bytes in base64) as a PASSKEY
/// factor carrying the credential as Roster stores one. It signs in where the target
/// project's relying party is the one Kratos used.
fn kratos_passkey(field: &str, c: &Value) -> Result<Value, String> {
    let bytes = |name: &str| match c.get(name).and_then(text) {
        Some(t) => base64_bytes(&format!("{field}.{name}"), &t),
        None => Err(format!("{field}: has no {name}")),
    };
    let (id, key) = (bytes("id")?, bytes("public_key")?);
    let flag = |name: &str| c.pointer(&format!("/flags/{name}")) == Some(&Value::Bool(true));
    // Kratos before flags kept only passwordless credentials verified.
    let verified = match c.get("flags") {
        Some(_) => flag("user_verified"),
        None => c.get("is_passwordless") == Some(&Value::Bool(true)),
    };
    let counter = c
        .pointer("/authenticator/sign_count")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let transports = texts(c.get("transport"));
    let passkey = carry(
        field,
        &id,
        &key,
        (counter, "sign_count"),
        verified,
        (flag("backup_eligible"), flag("backup_state")),
        &transports,
    )?;
    let aaguid = c
        .pointer("/authenticator/aaguid")
        .and_then(text)
        .and_then(|a| base64_bytes("aaguid", &a).ok())
        .and_then(|a| uuid::Uuid::from_slice(&a).ok());
    // Go's zero time stands for "not recorded".
    let created = match c.get("added_at").and_then(text) {
        Some(t) if !t.starts_with("0001-") => {
            Some(pg_time(&format!("{field}.added_at"), &json!(t))?)
        }
        _ => None,
    };
    let name = c.get("display_name").and_then(text);
    Ok(passkey_factor(&passkey, aaguid, &transports, name, created))
}

/// A Kratos `hashed_password` as Roster reads it. Kratos writes PBKDF2 with SHA-1 as
/// `$pbkdf2-sha1$` (PHC's name is `$pbkdf2$`) and scrypt as `$scrypt$ln=<N>,r=..,p=..$` with
/// N itself and padded base64 (PHC: log2 N, unpadded); the others (bcrypt, argon2,
/// `$pbkdf2-sha256$`, `$firescrypt$`) are already in the form Roster reads, and a format it
/// does not read is refused by the server, naming the ones it does.
fn kratos_hash(hash: &str) -> Result<String, String> {
    if let Some(rest) = hash.strip_prefix("$pbkdf2-sha1$") {
        return Ok(format!("$pbkdf2${rest}"));
    }
    let Some(rest) = hash.strip_prefix("$scrypt$") else {
        return Ok(hash.to_string());
    };
    let bad = || {
        "credentials.password: a Kratos scrypt hash must be $scrypt$ln=<N>,r=<r>,p=<p>$<salt>$<hash>".to_string()
    };
    let mut parts = rest.split('$');
    let (Some(params), Some(salt), Some(key), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    let mut fields = params.split(',');
    let n = fields
        .next()
        .and_then(|f| f.strip_prefix("ln="))
        .and_then(|n| n.parse::<u64>().ok())
        .filter(|n| *n >= 2 && n.is_power_of_two())
        .ok_or_else(bad)?;
    let rest_params: Vec<&str> = fields.collect();
    let unpadded = |b64: &str| -> Result<String, String> {
        let bytes = base64_bytes("credentials.password", b64)?;
        Ok(base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes))
    };
    Ok(format!(
        "$scrypt$ln={},{}${}${}",
        n.trailing_zeros(),
        rest_params.join(","),
        unpadded(salt)?,
        unpadded(key)?
    ))
}

/// The seed of an `otpauth://totp/...` URI, when it is of the kind Roster's TOTP is (SHA1,
/// 6 digits, 30 s, the defaults of every app and of Kratos); another kind fails the record.
fn otpauth_seed(field: &str, uri: &str) -> Result<Vec<u8>, String> {
    let url = url::Url::parse(uri).map_err(|_| format!("{field}: is not an otpauth:// URI"))?;
    if url.scheme() != "otpauth" || url.host_str() != Some("totp") {
        return Err(format!("{field}: is not an otpauth://totp/ URI"));
    }
    let (mut secret, mut algorithm, mut digits, mut period) =
        (None, "SHA1".to_string(), "6".to_string(), "30".to_string());
    for (k, v) in url.query_pairs() {
        match k.to_ascii_lowercase().as_str() {
            "secret" => secret = Some(v.into_owned()),
            "algorithm" => algorithm = v.to_ascii_uppercase(),
            "digits" => digits = v.into_owned(),
            "period" => period = v.into_owned(),
            _ => {}
        }
    }
    if (algorithm.as_str(), digits.as_str(), period.as_str()) != ("SHA1", "6", "30") {
        return Err(format!(
            "{field}: a TOTP app ({algorithm}, {digits} digits, {period} s) that Roster's TOTP \
             (SHA1, 6 digits, 30 s) cannot carry; remove the totp credential to import the \
             user without it"
        ));
    }
    let secret = secret.ok_or_else(|| format!("{field}: has no secret"))?;
    base32_seed(field, &secret)
}

/// Adds `m`'s keys to `app` (two of a source's metadata objects that both become
/// `app_metadata`); a key both set differently is refused, since `app_metadata` holds one.
fn merge_into(
    app: &mut Map<String, Value>,
    m: Map<String, Value>,
    both: &str,
) -> Result<(), String> {
    for (key, value) in m {
        match app.get(&key) {
            Some(other) if *other != value => {
                return Err(format!(
                    "{both} both set '{key}', differently: app_metadata can hold one"
                ));
            }
            _ => {
                app.insert(key, value);
            }
        }
    }
    Ok(())
}

/// The Backend API's address objects: (id, address, verified) each.
fn clerk_addresses(
    list_name: &str,
    field: &str,
    v: &Value,
) -> Result<Vec<(String, String, bool)>, String> {
    let mut out = Vec::new();
    for (i, a) in v.as_array().into_iter().flatten().enumerate() {
        let (Some(id), Some(address)) = (a.get("id").and_then(text), a.get(field).and_then(text))
        else {
            return Err(format!("{list_name}[{i}]: needs id and {field}"));
        };
        let status = a.pointer("/verification/status").and_then(Value::as_str);
        out.push((id, address, status == Some("verified")));
    }
    Ok(out)
}

/// A list of addresses: a JSON array, or a CSV cell's text (comma-separated, or JSON).
fn clerk_list(v: &Value) -> Vec<String> {
    let items: Vec<Value> = match v {
        Value::Array(a) => a.clone(),
        Value::String(s) if s.trim_start().starts_with('[') => {
            serde_json::from_str::<Vec<Value>>(s).unwrap_or_default()
        }
        Value::String(s) => s
            .split([',', ';', '|', ' '])
            .map(|a| Value::String(a.to_string()))
            .collect(),
        _ => vec![],
    };
    items
        .iter()
        .filter_map(text)
        .map(|a| a.trim().to_string())
        .filter(|a| !a.is_empty())
        .collect()
}

/// One organization membership (Better Auth's organization plugin: a `member` row with its
/// `organization`, as the README's query gives it; Clerk's and Auth0's, as their scripts
/// give them) as `app_metadata.organizations` keeps it: the organization's `id`, `slug` and
/// `name`, the member's `role` (Better Auth's comma-separated roles, as stored) or `roles`
/// (a list of names, or of objects with a `name`, as Auth0 lists a member's roles) and
/// `joined_at`; the spellings of either adapter taken.
fn membership(field: &str, m: Value) -> Result<Value, String> {
    let Value::Object(m) = m else {
        return Err(format!("{field}: must be an object"));
    };
    let get = |names: &[&str]| names.iter().find_map(|n| m.get(*n)).and_then(text);
    let id = get(&["id", "organizationId", "organization_id"])
        .ok_or_else(|| format!("{field}: needs the organization's id"))?;
    let mut out = Map::from_iter([("id".to_string(), Value::String(id))]);
    for name in ["slug", "name", "role"] {
        if let Some(v) = get(&[name]) {
            out.insert(name.into(), Value::String(v));
        }
    }
    if let Some(roles) = m.get("roles").filter(|r| !r.is_null()) {
        let names = roles.as_array().and_then(|list| {
            list.iter()
                .map(|r| r.get("name").unwrap_or(r).as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
        });
        let Some(names) = names else {
            return Err(format!("{field}.roles: must be a list of role names"));
        };
        put_names(&mut out, "roles", names);
    }
    if let Some(v) = m.get("createdAt").or_else(|| m.get("created_at"))
        && !v.is_null()
    {
        out.insert(
            "joined_at".into(),
            pg_time(&format!("{field}.createdAt"), v)?,
        );
    }
    Ok(Value::Object(out))
}

/// Better Auth's scrypt: N = 2^14, r = 16, p = 1, a 64-byte key.
const BETTER_AUTH_SCRYPT: &str = "$scrypt$ln=14,r=16,p=1$";

/// A Better Auth `user` row (the README's query adds its `account` rows as `accounts`) in
/// Roster's field names. Column names are read in Better Auth's own camelCase or in
/// snake_case (an adapter set to it): `id` becomes `external_id`, `name` `display_name`,
/// `image` `picture_url`; the username, phone number and admin plugins' columns their
/// fields (`role` as `app_metadata.role`, a ban still running as blocked); the credential
/// account's password (Better Auth's `salt:key` scrypt, rewritten as the PHC string Roster
/// reads, or a custom hasher's bcrypt or argon2 as it is) `password_hash`; every other
/// account an identity (`providerId` as provider, `accountId` as subject; tokens are not
/// read). Columns of your own (`additionalFields`) go to `user_metadata`. A user with
/// two-factor on brings their authenticator app (the query's `twoFactors`, the TOTP secret
/// opened with the app's secret) with its unused backup codes, and with `otp` (the plugin's
/// OTP method, where the app sends codes) that channel, or fails their record saying what
/// is missing: importing them without it would quietly drop their second factor.
pub fn from_better_auth(
    obj: Map<String, Value>,
    secrets: Option<&BetterAuthSecrets>,
    otp: Option<OtpChannel>,
) -> Result<Map<String, Value>, String> {
    let mut out = Map::new();
    let mut two_factor = false;
    // Each verified app's sealed secret and backup codes.
    let mut sealed: Option<Vec<(String, Option<String>)>> = None;
    let mut extra = Map::new();
    let mut app = Map::new();
    let mut ban: Option<(String, Option<Value>)> = None;
    let mut banned = false;
    for (k, v) in obj {
        // One spelling for the camelCase and snake_case columns.
        let name = k.replace('_', "").to_ascii_lowercase();
        let to = match name.as_str() {
            "id" => "external_id",
            "email" => "email",
            "name" => "display_name",
            "image" => "picture_url",
            "username" => "username",
            "phonenumber" => "phone_number",
            "emailverified" | "phonenumberverified" => {
                if v.is_null() {
                    continue;
                }
                let to = if name == "emailverified" {
                    "email_verified"
                } else {
                    "phone_verified"
                };
                out.insert(to.into(), Value::Bool(as_bool(&k, v)?));
                continue;
            }
            "createdat" => {
                out.insert("created_at".into(), pg_time(&k, &v)?);
                continue;
            }
            "role" => {
                // The admin plugin's role(s), comma-separated: what your backend checks.
                if let Some(role) = text(&v) {
                    app.insert("role".into(), Value::String(role));
                }
                continue;
            }
            "organizations" => {
                // The organization plugin's memberships: what your backend checks access by.
                put_memberships(&mut app, &k, v)?;
                continue;
            }
            "banned" => {
                banned = !v.is_null() && as_bool(&k, v)?;
                continue;
            }
            "banreason" | "banexpires" => {
                let entry = ban.get_or_insert((String::new(), None));
                if name == "banreason" {
                    entry.0 = text(&v).unwrap_or_default();
                } else if !v.is_null() {
                    entry.1 = Some(v);
                }
                continue;
            }
            "twofactorenabled" => {
                two_factor = !v.is_null() && as_bool(&k, v)?;
                continue;
            }
            "passkeys" => {
                for (i, pk) in array_of(&k, v)?.iter().enumerate() {
                    add_factor(&mut out, better_auth_passkey(i, pk)?);
                }
                continue;
            }
            "twofactors" => {
                // Verified enrollments only (an unverified one is an app never confirmed).
                let mut list = Vec::new();
                for (i, t) in array_of(&k, v)?.iter().enumerate() {
                    // Unset counts as verified (the plugin's default); SQLite writes 0/1.
                    let verified = t.get("verified").cloned().unwrap_or(Value::Null);
                    if !verified.is_null() && !as_bool("verified", verified)? {
                        continue;
                    }
                    let secret = t.get("secret").and_then(text);
                    let secret = secret.ok_or_else(|| format!("{k}[{i}]: needs its secret"))?;
                    let codes = t.get("backupCodes").or_else(|| t.get("backup_codes"));
                    list.push((secret, codes.and_then(text)));
                }
                sealed = Some(list);
                continue;
            }
            "isanonymous" => {
                if !v.is_null() && as_bool(&k, v)? {
                    return Err("an anonymous Better Auth user (no address to sign in with)".into());
                }
                continue;
            }
            "accounts" => {
                let mut linked = Vec::new();
                for (i, a) in array_of(&k, v)?.iter().enumerate() {
                    let field = |f: &str, g: &str| a.get(f).or_else(|| a.get(g)).and_then(text);
                    let (Some(provider), Some(subject)) = (
                        field("providerId", "provider_id"),
                        field("accountId", "account_id"),
                    ) else {
                        return Err(format!("accounts[{i}]: needs providerId and accountId"));
                    };
                    if provider != "credential" {
                        linked.push(identity(provider, subject, &[]));
                    } else if let Some(hash) = a.get("password").and_then(text) {
                        let hash = better_auth_hash(&hash)
                            .map_err(|e| format!("accounts[{i}].password: {e}"))?;
                        out.insert("password_hash".into(), Value::String(hash));
                    }
                }
                set_identities(&mut out, linked);
                continue;
            }
            // Kept by Roster itself, or a second spelling of the username.
            "updatedat" | "displayusername" | "lastloginmethod" => continue,
            _ => {
                if !v.is_null() {
                    extra.insert(k, v);
                }
                continue;
            }
        };
        if !v.is_null() {
            out.insert(to.to_string(), v);
        }
    }
    if banned {
        let (reason, until) = ban.unwrap_or_default();
        let ends = match &until {
            Some(v) => pg_datetime("banExpires", v)?,
            None => None,
        };
        if ends.is_none_or(|t| t > Utc::now()) {
            let mut why = "banned in Better Auth".to_string();
            if !reason.is_empty() {
                why.push_str(&format!(": {reason}"));
            }
            if let Some(t) = ends {
                why.push_str(&format!(
                    " (until {})",
                    t.to_rfc3339_opts(SecondsFormat::Secs, true)
                ));
            }
            blocked(&mut out, &why);
        }
    }
    if !extra.is_empty() {
        out.insert("user_metadata".into(), Value::Object(extra));
    }
    if !app.is_empty() {
        out.insert("app_metadata".into(), Value::Object(app));
    }
    if two_factor {
        let gone = "importing the user without it would drop their second factor";
        let Some(sealed) = sealed else {
            return Err(format!(
                "two-factor is on, and the row has no twoFactors: add them to the query \
                 (README), and give --better-auth-secret-file; {gone}"
            ));
        };
        match sealed.first() {
            Some((first, codes)) => {
                let Some(secrets) = secrets else {
                    return Err(format!(
                        "two-factor is on: give --better-auth-secret-file (your \
                         BETTER_AUTH_SECRET) to open its TOTP secret; {gone}"
                    ));
                };
                let seed = secrets
                    .open(first)
                    .map_err(|e| format!("twoFactors[0].secret: {e}"))?;
                add_factor(&mut out, totp_factor(&seed, None, None));
                if let Some(codes) = codes {
                    let codes = better_auth_backup_codes(codes, secrets)
                        .map_err(|e| format!("twoFactors[0].backupCodes: {e}"))?;
                    if !codes.is_empty() {
                        let codes = ("recovery_codes", json!(codes));
                        add_factor(&mut out, factor("RECOVERY_CODES", codes, None, None));
                    }
                }
            }
            None if otp.is_some() => {}
            None => {
                return Err(format!(
                    "two-factor is on without a verified authenticator app: the plugin's OTP \
                     method (codes your app sends) comes along with --better-auth-otp email \
                     or sms; {gone}"
                ));
            }
        }
        // With the OTP method on, every two-factor user may take codes by it (after their
        // app, which stays the default).
        if let Some(channel) = otp {
            let (kind, field, what) = match channel {
                OtpChannel::Email => ("EMAIL_OTP", "email", "email address"),
                OtpChannel::Sms => ("SMS_OTP", "phone_number", "phone number"),
            };
            let Some(address) = out.get(field).filter(|a| !a.is_null()).cloned() else {
                return Err(format!(
                    "two-factor is on, and the user has no {what} for the OTP method's codes \
                     (--better-auth-otp); {gone}"
                ));
            };
            add_factor(&mut out, factor(kind, (field, address), None, None));
        }
    }
    Ok(out)
}

/// The backup codes of a two-factor row: the unused ones, as JSON text sealed like the TOTP
/// secret (the plugin's default) or in the clear (`storeBackupCodes: "plain"`). Better Auth
/// drops a code from the list when it is used.
fn better_auth_backup_codes(
    stored: &str,
    secrets: &BetterAuthSecrets,
) -> Result<Vec<String>, String> {
    let json = if stored.trim_start().starts_with('[') {
        stored.as_bytes().to_vec()
    } else {
        secrets.open(stored).map_err(|e| {
            format!(
                "{e} (codes sealed by a custom storeBackupCodes cannot be read: leave \
                 backupCodes out of the query to import the user without them)"
            )
        })?
    };
    serde_json::from_slice(&json).map_err(|_| "is not a JSON list of codes".to_string())
}

/// A row of Better Auth's passkey plugin (`credentialID` in base64url, `publicKey` the COSE
/// key in base64, `counter`, `backedUp`, `deviceType`, `transports` comma-separated, `name`,
/// `aaguid`, `createdAt`) as a PASSKEY factor: it signs in where the target project's relying
/// party is the app's (its `rpID`). The plugin's passkeys sign users in without a password,
/// so they are carried as user-verified.
fn better_auth_passkey(i: usize, pk: &Value) -> Result<Value, String> {
    let field = format!("passkeys[{i}]");
    let get = |a: &str, b: &str| pk.get(a).or_else(|| pk.get(b));
    let bytes = |a: &str, b: &str| match get(a, b).and_then(text) {
        Some(t) => base64_bytes(&format!("{field}.{a}"), &t),
        None => Err(format!("{field}: has no {a}")),
    };
    let counter = get("counter", "counter")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let flag = |a: &str, b: &str| {
        get(a, b)
            .cloned()
            .map_or(Ok(false), |v| as_bool(&format!("{field}.{a}"), v))
    };
    let multi_device =
        get("deviceType", "device_type").and_then(text).as_deref() == Some("multiDevice");
    let transports: Vec<String> = get("transports", "transports")
        .and_then(text)
        .map(|t| {
            t.split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    let passkey = carry(
        &field,
        &bytes("credentialID", "credential_id")?,
        &bytes("publicKey", "public_key")?,
        (counter, "counter"),
        true,
        (multi_device, flag("backedUp", "backed_up")?),
        &transports,
    )?;
    let aaguid = get("aaguid", "aaguid")
        .and_then(text)
        .and_then(|a| uuid::Uuid::parse_str(&a).ok());
    let created = match get("createdAt", "created_at") {
        Some(c) if !c.is_null() => Some(pg_time("createdAt", c)?),
        _ => None,
    };
    let name = get("name", "name").and_then(text);
    Ok(passkey_factor(&passkey, aaguid, &transports, name, created))
}

/// The secrets Better Auth seals data with: BETTER_AUTH_SECRET (bare hex ciphertexts) and
/// BETTER_AUTH_SECRETS' numbered ones (`$ba$<version>$<hex>`).
pub struct BetterAuthSecrets {
    legacy: Option<String>,
    versions: Vec<(u32, String)>,
}

impl BetterAuthSecrets {
    /// The secret itself, or an .env file's BETTER_AUTH_SECRET, AUTH_SECRET and
    /// BETTER_AUTH_SECRETS (`<version>:<secret>,...`) lines. Errors never show a secret.
    pub fn parse(text: &str) -> Result<BetterAuthSecrets, String> {
        let mut legacy = None;
        let mut auth_secret = None;
        let mut versions = Vec::new();
        let mut env_file = false;
        for line in text.lines() {
            let line = line.trim();
            let line = line.strip_prefix("export ").unwrap_or(line);
            let Some((name, value)) = line.split_once('=') else {
                continue;
            };
            // An environment line (`NAME=value`), as opposed to a base64 secret's `=`.
            let name = name.trim();
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
            {
                continue;
            }
            env_file = true;
            let value = value.trim().trim_matches(['"', '\'']).to_string();
            match name {
                "BETTER_AUTH_SECRET" => legacy = Some(value),
                "AUTH_SECRET" => auth_secret = Some(value),
                "BETTER_AUTH_SECRETS" => {
                    for (i, entry) in value.split(',').enumerate() {
                        let parsed = entry.trim().split_once(':').and_then(|(v, s)| {
                            Some((v.trim().parse::<u32>().ok()?, s.trim().to_string()))
                        });
                        match parsed {
                            Some((v, s)) if !s.is_empty() => versions.push((v, s)),
                            _ => {
                                return Err(format!(
                                    "BETTER_AUTH_SECRETS entry {} is not <version>:<secret>",
                                    i + 1
                                ));
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        if !env_file {
            legacy = Some(text.trim().to_string());
        }
        let legacy = legacy.or(auth_secret).filter(|s| !s.is_empty());
        if legacy.is_none() && versions.is_empty() {
            return Err("holds no secret (BETTER_AUTH_SECRET's value, or an .env with it)".into());
        }
        Ok(BetterAuthSecrets { legacy, versions })
    }

    /// A TOTP secret as Better Auth's two-factor plugin sealed it: the key bytes the codes
    /// are made with (the text of the secret, or what a `base32:` one spells).
    fn open(&self, sealed: &str) -> Result<Vec<u8>, String> {
        let (secret, hex_text) = match sealed.strip_prefix("$ba$") {
            Some(rest) => {
                let (version, hex_text) = rest.split_once('$').ok_or("is not sealed data")?;
                let version: u32 = version.parse().map_err(|_| "is not sealed data")?;
                let secret = self
                    .versions
                    .iter()
                    .find(|(v, _)| *v == version)
                    .map(|(_, s)| s)
                    .ok_or_else(|| {
                        format!(
                            "sealed with secret version {version}, which the file does not hold"
                        )
                    })?;
                (secret, hex_text)
            }
            None => (
                self.legacy
                    .as_ref()
                    .ok_or("sealed with BETTER_AUTH_SECRET, which the file does not hold")?,
                sealed,
            ),
        };
        let opened = unseal(secret, hex_text)
            .ok_or("does not open with the secret given (another BETTER_AUTH_SECRET sealed it)")?;
        let text = String::from_utf8(opened).map_err(|_| "opens to no TOTP secret")?;
        match text.strip_prefix("base32:") {
            Some(b32) => base32_seed("the TOTP secret", b32),
            None => Ok(text.into_bytes()),
        }
    }
}

/// Better Auth's `symmetricDecrypt`: XChaCha20-Poly1305 under SHA-256 of the secret's text,
/// the 24-byte nonce before the ciphertext, all in hex.
fn unseal(secret: &str, hex_text: &str) -> Option<Vec<u8>> {
    use chacha20poly1305::aead::{Aead, KeyInit};
    use sha2::Digest;
    let data = hex::decode(hex_text.trim()).ok()?;
    if data.len() < 24 + 16 {
        return None;
    }
    let key = sha2::Sha256::digest(secret.as_bytes());
    let cipher = chacha20poly1305::XChaCha20Poly1305::new_from_slice(&key).ok()?;
    let nonce = chacha20poly1305::XNonce::try_from(&data[..24]).ok()?;
    cipher.decrypt(&nonce, &data[24..]).ok()
}

/// A Better Auth password as a PHC string: its `salt:key` is scrypt of the password under
/// the salt's hex text itself (not the bytes it spells), the key in hex. A hash of a custom
/// hasher (bcrypt, argon2: `$...`) is left as it is for the server to read.
fn better_auth_hash(hash: &str) -> Result<String, String> {
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD_NO_PAD.encode(b);
    if hash.starts_with('$') {
        return Ok(hash.to_string());
    }
    let shape = "must be Better Auth's salt:key (hex), or a custom hasher's $... hash";
    let (salt, key) = hash.split_once(':').ok_or(shape)?;
    let key = hex::decode(key.trim()).map_err(|_| shape.to_string())?;
    let salt = salt.trim();
    if salt.is_empty() || salt.len() > 48 || key.len() < 16 || key.len() > 64 {
        return Err(shape.into());
    }
    Ok(format!(
        "{BETTER_AUTH_SCRYPT}{}${}",
        b64(salt.as_bytes()),
        b64(&key)
    ))
}

/// One spelling for protobuf JSON's camelCase and proto names (`humanUsers`, `human_users`).
fn proto_key(k: &str) -> String {
    k.replace('_', "").to_ascii_lowercase()
}

/// A field of a protobuf JSON object by its [`proto_key`] (`userId` or `user_id` as
/// `userid`).
fn proto_field<'a>(v: &'a Value, field: &str) -> Option<&'a Value> {
    v.as_object()?
        .iter()
        .find(|(k, _)| proto_key(k) == field)
        .map(|(_, v)| v)
}

/// A ZITADEL export's organization (`orgs[]`) as one record per human user: the user
/// (`userId`, `user`) with its `metadata`, `links` and `grants` gathered from the
/// organization's `userMetadata`, `userLinks` and `userGrants` (each grant with its
/// project's name from `projects` when the project is the organization's own), and the
/// organization's id and name. Service accounts (`machineUsers`), policies and the rest
/// are left out.
pub fn zitadel_users(org: Map<String, Value>) -> Vec<Value> {
    let (mut users, mut metadata, mut links) = (Vec::new(), Vec::new(), Vec::new());
    let (mut grants, mut projects) = (Vec::new(), Vec::new());
    let (mut org_id, mut org_name) = (Value::Null, Value::Null);
    for (k, v) in org {
        match proto_key(&k).as_str() {
            "orgid" => org_id = v,
            "org" => org_name = v.get("name").cloned().unwrap_or_default(),
            "humanusers" => users = array_of(&k, v).unwrap_or_default(),
            "usermetadata" => metadata = array_of(&k, v).unwrap_or_default(),
            "userlinks" => links = array_of(&k, v).unwrap_or_default(),
            "usergrants" => grants = array_of(&k, v).unwrap_or_default(),
            "projects" => projects = array_of(&k, v).unwrap_or_default(),
            _ => {}
        }
    }
    // Project names by id, for the grants (a DataProject is `projectId` and `project`).
    let project_names: std::collections::HashMap<String, Value> = projects
        .iter()
        .filter_map(|p| {
            let id = proto_field(p, "projectid").and_then(text)?;
            let name = proto_field(p, "project").and_then(|p| proto_field(p, "name"))?;
            Some((id, name.clone()))
        })
        .collect();
    let grants: Vec<Value> = grants
        .into_iter()
        .map(|mut g| {
            let name = proto_field(&g, "projectid")
                .and_then(text)
                .and_then(|id| project_names.get(&id).cloned());
            if let (Value::Object(o), Some(name)) = (&mut g, name) {
                o.insert("projectName".into(), name);
            }
            g
        })
        .collect();
    // Each user's entries, by the user id they name (the lists come after the users).
    let by_user = |list: Vec<Value>, field: &str| {
        let mut map: std::collections::HashMap<String, Vec<Value>> = Default::default();
        for entry in list {
            if let Some(id) = proto_field(&entry, field).and_then(text) {
                map.entry(id).or_default().push(entry);
            }
        }
        map
    };
    let (mut metadata, mut links) = (by_user(metadata, "id"), by_user(links, "userid"));
    let mut grants = by_user(grants, "userid");
    users
        .into_iter()
        .map(|mut u| {
            let id = proto_field(&u, "userid").and_then(text).unwrap_or_default();
            if let Value::Object(o) = &mut u {
                let metadata = metadata.remove(&id).unwrap_or_default();
                o.insert("metadata".into(), Value::Array(metadata));
                let links = links.remove(&id).unwrap_or_default();
                o.insert("links".into(), Value::Array(links));
                if let Some(grants) = grants.remove(&id) {
                    o.insert("grants".into(), Value::Array(grants));
                }
                o.insert("org".into(), json!({"id": org_id, "name": org_name}));
            }
            u
        })
        .collect()
}

/// A ZITADEL human user as [`zitadel_users`] gathers it, in Roster's field names: `userId`
/// becomes `external_id`; `userName` `username`; the profile's `firstName`, `lastName`,
/// `displayName` and `preferredLanguage` `given_name`, `family_name`, `display_name` and
/// `locale`, its `nickName` and `gender` `user_metadata`; the email and phone with their
/// verified flags; `hashedPassword` (bcrypt, argon2, scrypt, passlib's PBKDF2, SHA-crypt:
/// what ZITADEL's passwap writes) `password_hash`; `otpCode` (the authenticator app's
/// secret, base32) a TOTP factor; the user's metadata (bytes, read as JSON where they are,
/// else as text), the organization's id and name (`zitadel_org_id`, `zitadel_org`) and the
/// user's grants (`zitadel_grants`: each project's id, name when known, and role keys: what
/// applications authorized the user by) `app_metadata`; each identity provider link an
/// identity (the provider's name in ZITADEL as provider, the user's id there as subject).
pub fn from_zitadel(obj: Map<String, Value>) -> Result<Map<String, Value>, String> {
    let mut out = Map::new();
    let mut app = Map::new();
    let mut extra = Map::new();
    let mut linked = Vec::new();
    for (k, v) in obj {
        match proto_key(&k).as_str() {
            "userid" => {
                if let Some(id) = text(&v) {
                    out.insert("external_id".into(), Value::String(id));
                }
            }
            "user" => {
                let Value::Object(user) = v else {
                    return Err("user: must be an object".into());
                };
                zitadel_user(&mut out, &mut extra, user)?;
            }
            "metadata" => {
                for (i, m) in array_of(&k, v)?.iter().enumerate() {
                    let field = |f: &str| proto_field(m, f).and_then(text);
                    let Some(key) = field("key") else {
                        return Err(format!("metadata[{i}]: needs its key"));
                    };
                    let bytes = base64_bytes(
                        &format!("metadata[{i}].value"),
                        &field("value").unwrap_or_default(),
                    )?;
                    let value = match std::str::from_utf8(&bytes) {
                        Ok(t) => serde_json::from_str::<Value>(t)
                            .ok()
                            .filter(|v| {
                                v.is_object() || v.is_array() || v.is_number() || v.is_boolean()
                            })
                            .unwrap_or_else(|| Value::String(t.to_string())),
                        Err(_) => {
                            Value::String(base64::engine::general_purpose::STANDARD.encode(&bytes))
                        }
                    };
                    app.insert(key, value);
                }
            }
            "links" => {
                for (i, l) in array_of(&k, v)?.iter().enumerate() {
                    let field = |f: &str| proto_field(l, f).and_then(text);
                    let provider = field("idpname").or_else(|| field("idpid"));
                    let (Some(provider), Some(subject)) = (provider, field("provideduserid"))
                    else {
                        return Err(format!("links[{i}]: needs idpName and providedUserId"));
                    };
                    linked.push(identity(provider, subject, &[]));
                }
            }
            "grants" => {
                let mut list = Vec::new();
                for (i, g) in array_of(&k, v)?.iter().enumerate() {
                    let field = |f: &str| proto_field(g, f);
                    let Some(project) = field("projectid").and_then(text) else {
                        return Err(format!("grants[{i}]: needs its projectId"));
                    };
                    let roles = match field("rolekeys") {
                        Some(r) => string_list(&format!("grants[{i}].roleKeys"), r)?,
                        None => Vec::new(),
                    };
                    let mut grant = Map::from_iter([
                        ("project_id".to_string(), Value::String(project)),
                        ("roles".to_string(), json!(roles)),
                    ]);
                    if let Some(name) = field("projectname").and_then(text) {
                        grant.insert("project".into(), Value::String(name));
                    }
                    list.push(Value::Object(grant));
                }
                if !list.is_empty() {
                    app.insert("zitadel_grants".into(), Value::Array(list));
                }
            }
            "org" => {
                if let Some(id) = v.get("id").and_then(text) {
                    app.insert("zitadel_org_id".into(), Value::String(id));
                }
                if let Some(name) = v.get("name").and_then(text) {
                    app.insert("zitadel_org".into(), Value::String(name));
                }
            }
            other => return Err(format!("unknown ZITADEL field '{other}'")),
        }
    }
    set_identities(&mut out, linked);
    if !app.is_empty() {
        out.insert("app_metadata".into(), Value::Object(app));
    }
    if !extra.is_empty() {
        out.insert("user_metadata".into(), Value::Object(extra));
    }
    Ok(out)
}

/// The `user` of a ZITADEL human user (its ImportHumanUserRequest).
fn zitadel_user(
    out: &mut Map<String, Value>,
    extra: &mut Map<String, Value>,
    user: Map<String, Value>,
) -> Result<(), String> {
    let get = |o: &Value, f: &str| proto_field(o, f).filter(|v| !v.is_null()).cloned();
    for (k, v) in user {
        let field = format!("user.{k}");
        match proto_key(&k).as_str() {
            "username" => {
                if let Some(name) = text(&v) {
                    out.insert("username".into(), Value::String(name));
                }
            }
            "profile" => {
                for (from, to) in [
                    ("firstname", "given_name"),
                    ("lastname", "family_name"),
                    ("displayname", "display_name"),
                    ("preferredlanguage", "locale"),
                ] {
                    // `und`: ZITADEL's "no language chosen".
                    if let Some(t) = get(&v, from).and_then(|t| text(&t)).filter(|t| t != "und") {
                        out.insert(to.into(), Value::String(t));
                    }
                }
                if let Some(nick) = get(&v, "nickname").and_then(|t| text(&t)) {
                    extra.insert("nickname".into(), Value::String(nick));
                }
                let gender = get(&v, "gender").and_then(|t| text(&t));
                if let Some(g) = gender.filter(|g| g != "GENDER_UNSPECIFIED" && g != "0") {
                    let g = g.strip_prefix("GENDER_").unwrap_or(&g).to_ascii_lowercase();
                    extra.insert("gender".into(), Value::String(g));
                }
            }
            "email" | "phone" => {
                let (address, flag, to, to_flag) = if proto_key(&k) == "email" {
                    ("email", "isemailverified", "email", "email_verified")
                } else {
                    ("phone", "isphoneverified", "phone_number", "phone_verified")
                };
                if let Some(a) = get(&v, address).and_then(|a| text(&a)) {
                    out.insert(to.into(), Value::String(a));
                    let verified = get(&v, flag).unwrap_or(Value::Bool(false));
                    out.insert(to_flag.into(), Value::Bool(as_bool(&field, verified)?));
                }
            }
            "hashedpassword" => {
                if let Some(hash) = get(&v, "value").and_then(|h| text(&h)) {
                    out.insert("password_hash".into(), Value::String(hash));
                }
            }
            "otpcode" => {
                if let Some(secret) = text(&v) {
                    let seed = base32_seed(&field, &secret)?;
                    add_factor(out, totp_factor(&seed, None, None));
                }
            }
            "passwordchangerequired" => {
                out.insert(
                    "require_password_change".into(),
                    Value::Bool(as_bool(&field, v)?),
                );
            }
            // Sign-up time choices of the import request, not state to carry.
            "requestpasswordlessregistration" | "idps" => {}
            "password" => {
                if text(&v).is_some() {
                    return Err(format!(
                        "{field}: a password in the clear is not imported; give its hash"
                    ));
                }
            }
            _ => return Err(format!("unknown ZITADEL field '{field}'")),
        }
    }
    Ok(())
}

/// Okta profile attributes with a Roster field of their own (`login` is the username unless
/// it is the email; `mobilePhone` the phone number when it is E.164).
const OKTA_PROFILE: &[(&str, &str)] = &[
    ("email", "email"),
    ("firstName", "given_name"),
    ("lastName", "family_name"),
    ("displayName", "display_name"),
    ("locale", "locale"),
    ("timezone", "timezone"),
];

/// Okta's bookkeeping about a user, which Roster keeps its own account of.
const OKTA_SKIPPED: &[&str] = &[
    "activated",
    "statusChanged",
    "lastUpdated",
    "passwordChanged",
    "type",
    "transitioningToStatus",
    "realmId",
];

/// An Okta user (`GET /api/v1/users`) in Roster's field names: `id` becomes `external_id`;
/// the profile's `email`, `firstName`, `lastName`, `displayName`, `locale` (`en_US` as
/// `en-US`) and `timezone` their fields, `login` the username unless it is the email,
/// `mobilePhone` the phone number when it is E.164; every other attribute (custom ones
/// included) `user_metadata`. `created` and `lastLogin` become `created_at` and
/// `last_login_at`; `STAGED` and `PROVISIONED` users arrive pending, `SUSPENDED` blocked,
/// `DEPROVISIONED` deactivated, `PASSWORD_EXPIRED` made to change it; the email is verified
/// when `credentials.emails` lists it as VERIFIED (Identity Engine orgs). Okta never exports
/// passwords: a user with one (`credentials.password`) is marked `app_metadata.legacy_password`
/// for the sign-in migration. A `groups` list of names (which the users list lacks; the
/// README's script adds it) becomes `app_metadata.groups`.
pub fn from_okta(obj: Map<String, Value>) -> Result<Map<String, Value>, String> {
    let mut out = Map::new();
    let mut extra = Map::new();
    let mut app = Map::new();
    let mut login = None;
    let mut verified_emails: Vec<String> = Vec::new();
    for (k, v) in obj {
        match k.as_str() {
            "id" => {
                if let Some(id) = text(&v) {
                    out.insert("external_id".into(), Value::String(id));
                }
            }
            "status" => match text(&v).as_deref() {
                None | Some("ACTIVE" | "RECOVERY" | "LOCKED_OUT") => {}
                Some("STAGED" | "PROVISIONED") => {
                    out.insert("pending".into(), Value::Bool(true));
                }
                Some("SUSPENDED") => blocked(&mut out, "suspended in Okta"),
                Some("DEPROVISIONED") => {
                    out.insert("deactivated".into(), Value::Bool(true));
                }
                Some("PASSWORD_EXPIRED") => {
                    out.insert("require_password_change".into(), Value::Bool(true));
                }
                Some(other) => return Err(format!("status: unknown Okta status '{other}'")),
            },
            "created" => {
                out.insert("created_at".into(), v);
            }
            "lastLogin" => {
                if !v.is_null() {
                    out.insert("last_login_at".into(), v);
                }
            }
            "profile" => {
                let Value::Object(profile) = v else {
                    return Err("profile: must be an object".into());
                };
                for (name, value) in profile {
                    if value.is_null() {
                        continue;
                    }
                    let own = OKTA_PROFILE.iter().find(|(o, _)| *o == name);
                    match (name.as_str(), own) {
                        ("login", _) => login = text(&value),
                        ("locale", _) => {
                            let tag = text(&value).unwrap_or_default().replace('_', "-");
                            out.insert("locale".into(), Value::String(tag));
                        }
                        ("mobilePhone", _) => {
                            let phone = text(&value).unwrap_or_default();
                            let plain: String =
                                phone.chars().filter(|c| !" -().".contains(*c)).collect();
                            let e164 = plain.strip_prefix('+').is_some_and(|d| {
                                (8..=15).contains(&d.len()) && d.bytes().all(|b| b.is_ascii_digit())
                            });
                            if e164 {
                                out.insert("phone_number".into(), Value::String(plain));
                            } else {
                                extra.insert(name, value);
                            }
                        }
                        (_, Some((_, to))) => {
                            out.insert(to.to_string(), value);
                        }
                        (_, None) => {
                            extra.insert(name, value);
                        }
                    }
                }
            }
            "credentials" => {
                let password = v.get("password").is_some_and(|p| !p.is_null());
                if password {
                    app.insert("legacy_password".into(), Value::Bool(true));
                }
                // Identity Engine orgs list the addresses with their state.
                if let Some(Value::Array(emails)) = v.get("emails") {
                    verified_emails.extend(
                        emails
                            .iter()
                            .filter(|e| e.get("status").and_then(Value::as_str) == Some("VERIFIED"))
                            .filter_map(|e| e.get("value").and_then(text)),
                    );
                }
            }
            // Not in the users list: the README's script adds each user's group names.
            "groups" => put_names(&mut app, "groups", string_list(&k, &v)?),
            other if other.starts_with('_') || OKTA_SKIPPED.contains(&other) => {}
            other => return Err(format!("unknown Okta field '{other}'")),
        }
    }
    let email = out.get("email").and_then(Value::as_str);
    if email.is_some_and(|e| verified_emails.iter().any(|v| v.eq_ignore_ascii_case(e))) {
        out.insert("email_verified".into(), Value::Bool(true));
    }
    let email = out.get("email").and_then(Value::as_str);
    if let Some(login) = login.filter(|l| !email.is_some_and(|e| e.eq_ignore_ascii_case(l))) {
        out.insert("username".into(), Value::String(login));
    }
    if !extra.is_empty() {
        out.insert("user_metadata".into(), Value::Object(extra));
    }
    if !app.is_empty() {
        out.insert("app_metadata".into(), Value::Object(app));
    }
    // A user that is not active in a second way too: the stronger state wins.
    if out.contains_key("blocked") || out.contains_key("deactivated") {
        out.remove("pending");
    }
    Ok(out)
}

/// Appwrite's own bookkeeping about a user, and what it works out from the address.
const APPWRITE_SKIPPED: &[&str] = &[
    "$createdAt",
    "$updatedAt",
    "$permissions",
    "passwordUpdate",
    "targets",
    "emailCanonical",
    "emailIsFree",
    "emailIsDisposable",
    "emailIsCorporate",
    "emailIsCanonical",
    "impersonator",
    "impersonatorUserId",
];

/// An Appwrite user (the Users API's `User`, as a server key reads it) in Roster's field
/// names: `$id` becomes `external_id`, `name` `display_name`, `registration` `created_at`,
/// `accessedAt` (Appwrite's last activity, kept to the day) `last_login_at`; the email and
/// phone with their verification flags; `status: false` arrives blocked; `labels` go to
/// `app_metadata.labels` (your backend sets them) and `prefs` (the user's own) to
/// `user_metadata`. The password hash carries over when Roster reads its algorithm: argon2
/// (Appwrite's own) and bcrypt as they are, `scryptMod` (Firebase's, with its
/// `hashOptions`) in the `$firescrypt$` form; another fails the record, naming it. An
/// authenticator app's secret is not in the API: a user with `mfa` on is marked
/// `app_metadata.appwrite_mfa` to enroll again.
pub fn from_appwrite(obj: Map<String, Value>) -> Result<Map<String, Value>, String> {
    let mut out = Map::new();
    let mut app = Map::new();
    let (mut hash, mut algorithm, mut options) = (None, None, Value::Null);
    for (k, v) in obj {
        let to = match k.as_str() {
            "$id" => "external_id",
            "name" => "display_name",
            "registration" => "created_at",
            "email" => "email",
            "phone" => "phone_number",
            "emailVerification" => "email_verified",
            "phoneVerification" => "phone_verified",
            "accessedAt" => "last_login_at",
            "password" => {
                hash = text(&v);
                continue;
            }
            "hash" => {
                algorithm = text(&v);
                continue;
            }
            "hashOptions" => {
                options = v;
                continue;
            }
            "status" => {
                if !v.is_null() && !as_bool(&k, v)? {
                    blocked(&mut out, "blocked in Appwrite");
                }
                continue;
            }
            "labels" => {
                if v.as_array().is_some_and(|l| !l.is_empty()) {
                    app.insert("labels".into(), v);
                }
                continue;
            }
            "mfa" => {
                if !v.is_null() && as_bool(&k, v)? {
                    app.insert("appwrite_mfa".into(), Value::Bool(true));
                }
                continue;
            }
            "prefs" => {
                if v.as_object().is_some_and(|p| !p.is_empty()) {
                    out.insert("user_metadata".into(), v);
                }
                continue;
            }
            other if APPWRITE_SKIPPED.contains(&other) => continue,
            other => return Err(format!("unknown Appwrite field '{other}'")),
        };
        // Appwrite writes absent values as empty strings.
        if !v.is_null() && v != Value::String(String::new()) {
            out.insert(to.to_string(), v);
        }
    }
    if let Some(hash) = hash {
        let hash = match algorithm.as_deref() {
            Some("argon2" | "bcrypt") | None => hash,
            Some("scryptMod") => {
                let option = |name: &str| {
                    options
                        .get(name)
                        .and_then(text)
                        .ok_or_else(|| format!("hashOptions: a scryptMod hash needs its {name}"))
                };
                // Appwrite's scryptMod is Firebase's with its fixed N = 2^14, r = 8.
                format!(
                    "$firescrypt$ln=14,r=8,p=1${}${hash}${}${}",
                    option("salt")?,
                    option("saltSeparator")?,
                    option("signerKey")?
                )
            }
            Some(other) => {
                return Err(format!(
                    "hash: Appwrite's {other} hashes cannot be carried (argon2, bcrypt and \
                     scryptMod can; Appwrite's API does not give a scrypt hash's salt); empty \
                     this user's password to import them without it"
                ));
            }
        };
        out.insert("password_hash".into(), Value::String(hash));
    }
    if !app.is_empty() {
        out.insert("app_metadata".into(), Value::Object(app));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sealed by Better Auth 1.7's own symmetricEncrypt, as its two-factor plugin seals a
    /// TOTP secret: under BETTER_AUTH_SECRET, and under version 2 of BETTER_AUTH_SECRETS.
    const BETTER_AUTH_SEALED: &str = "319ba4a10c8c4065eaa19b45b2003cfc50ba36b6b63991396026f89fb251456384a698817e18fbe42855632309268450abb4fb0af5c3232fd01b46721b85d99afd982dc49e5ed2e6";
    /// The two-factor plugin's backup codes, sealed under the same secret, one of ten spent.
    const BETTER_AUTH_SEALED_CODES: &str = "ff0e43f26d22bc90c2d83858e7585cad85932cd58e09a78441e003e601b293f1f01daf7aa2b698b6435cc38fa1e9d3c03778bb47bc8fa21c7d914f3867fd2d61afe4ad2eda36e79f0e54302f259d7460a80d0a12ff83ce7fdabd47c6100322fe655e17c62084e9186358bef5ff98c1392330b3d1b76400a8c6726514260e6f571b0c63fdd98e31ced0b891a88c3ec15f82de621abee7e6171605556bebef8f8e180f2747065fe7";
    const BETTER_AUTH_SEALED_V2: &str = "$ba$2$a33b66c66ad516a887583093a407cdeffb15560eb90e5ad54e30cef8e7b0da91a9c3c40276957826b6936ab99b5ccf984e7036ee06cec6d013665097cc1aacb75505d43cd5a12905";

    #[test]
    fn appwrite_users_take_roster_names() {
        let r = from_appwrite(obj(json!({"$id": "u1", "name": "", "email": "a@x.io",
            "phone": "+14155550123", "phoneVerification": true, "emailVerification": false,
            "registration": "2024-05-01T10:00:00.000+00:00", "accessedAt": "",
            "status": true, "labels": [], "prefs": {}, "mfa": false, "targets": [],
            "hash": "scryptMod", "password": "aGFzaA==", "hashOptions": {"type": "scryptMod",
                "salt": "c2FsdA==", "saltSeparator": "Bw==", "signerKey": "a2V5"}})))
        .unwrap();
        assert_eq!(
            Value::Object(r),
            json!({"external_id": "u1", "email": "a@x.io", "email_verified": false,
                "phone_number": "+14155550123", "phone_verified": true,
                "created_at": "2024-05-01T10:00:00.000+00:00",
                "password_hash": "$firescrypt$ln=14,r=8,p=1$c2FsdA==$aGFzaA==$Bw==$a2V5"})
        );
        for (bad, says) in [
            (
                json!({"hash": "scryptMod", "password": "aGFzaA==", "hashOptions": {}}),
                "needs its salt",
            ),
            (
                json!({"hash": "sha", "password": "00ff"}),
                "sha hashes cannot be carried",
            ),
            (json!({"favouriteColour": "red"}), "unknown Appwrite field"),
        ] {
            let e = from_appwrite(obj(bad)).unwrap_err();
            assert!(e.contains(says), "{e}");
        }
    }

    #[test]
    fn okta_users_take_roster_names() {
        let r = from_okta(obj(json!({
            "id": "00u1ero7vZFVEIYLWPBN", "status": "ACTIVE",
            "created": "2013-06-24T16:39:18.000Z", "activated": "2013-06-24T16:39:19.000Z",
            "statusChanged": null, "lastLogin": "2013-06-24T17:39:19.000Z",
            "lastUpdated": "2013-07-02T21:36:25.344Z", "passwordChanged": null,
            "type": {"id": "oty1"},
            "profile": {"firstName": "Isaac", "lastName": "Brock", "email": "isaac@example.org",
                "login": "isaac@example.org", "mobilePhone": "+1 415-555-1337",
                "locale": "en_US", "timezone": "America/Los_Angeles", "secondEmail": null,
                "costCenter": "R&D"},
            "credentials": {"password": {}, "recovery_question": {"question": "pet?"},
                "provider": {"type": "OKTA", "name": "OKTA"}},
            "_links": {"self": {"href": "https://x.okta.com/api/v1/users/00u1"}},
            // As the README's script adds them.
            "groups": ["Admins", "Sales Team"]
        })))
        .unwrap();
        assert_eq!(
            Value::Object(r),
            json!({"external_id": "00u1ero7vZFVEIYLWPBN",
                "created_at": "2013-06-24T16:39:18.000Z",
                "last_login_at": "2013-06-24T17:39:19.000Z",
                "given_name": "Isaac", "family_name": "Brock", "email": "isaac@example.org",
                "phone_number": "+14155551337", "locale": "en-US",
                "timezone": "America/Los_Angeles",
                "user_metadata": {"costCenter": "R&D"},
                "app_metadata": {"legacy_password": true, "groups": ["Admins", "Sales Team"]}})
        );
        assert!(from_okta(obj(json!({"groups": []}))).unwrap().is_empty());
        let err = from_okta(obj(json!({"groups": [{"id": "00g1"}]}))).unwrap_err();
        assert!(err.contains("groups: must be a list of names"), "{err}");
        let one = |v: Value| from_okta(obj(v)).unwrap();
        let r = one(
            json!({"profile": {"email": "V@x.io"}, "credentials": {"emails": [
            {"value": "v@x.io", "status": "VERIFIED", "type": "PRIMARY"},
            {"value": "w@x.io", "status": "UNVERIFIED", "type": "SECONDARY"}]}}),
        );
        assert_eq!(r["email_verified"], true);
        let r = one(
            json!({"profile": {"email": "w@x.io"}, "credentials": {"emails": [
            {"value": "w@x.io", "status": "UNVERIFIED", "type": "PRIMARY"}]}}),
        );
        assert!(r.get("email_verified").is_none());
        let r = one(
            json!({"status": "STAGED", "profile": {"login": "ann", "email": "a@x.io",
            "mobilePhone": "555-1337"}, "credentials": {"provider": {"type": "SOCIAL"}}}),
        );
        assert_eq!(r["pending"], true);
        assert_eq!(r["username"], "ann");
        assert_eq!(r["user_metadata"], json!({"mobilePhone": "555-1337"}));
        assert!(r.get("app_metadata").is_none(), "no password in Okta");
        assert_eq!(
            one(json!({"status": "SUSPENDED"}))["blocked_reason"],
            "suspended in Okta"
        );
        assert_eq!(one(json!({"status": "DEPROVISIONED"}))["deactivated"], true);
        assert_eq!(
            one(json!({"status": "PASSWORD_EXPIRED"}))["require_password_change"],
            true
        );
        for (bad, says) in [
            (json!({"status": "ZOMBIE"}), "unknown Okta status"),
            (json!({"shoeSize": 9}), "unknown Okta field"),
        ] {
            let e = from_okta(obj(bad)).unwrap_err();
            assert!(e.contains(says), "{e}");
        }
    }

    #[test]
    fn zitadel_users_gather_their_metadata_and_links_in_either_spelling() {
        // Proto names (snake_case) as well as protobuf JSON's camelCase.
        let org = json!({"org_id": "o1", "org": {"name": "ACME"},
            "human_users": [{"user_id": "u1", "user": {"user_name": "zoe",
                "email": {"email": "z@x.io", "is_email_verified": true},
                "hashed_password": {"value": "$2b$10$abc"}, "otp_code": "JBSWY3DPEHPK3PXP"}},
                {"user_id": "u2", "user": {"user_name": "al"}}],
            "user_metadata": [{"id": "u1", "key": "tags", "value": "WyJhIl0="},
                {"id": "u1", "key": "bin", "value": "/w=="}],
            "user_links": [{"user_id": "u1", "idp_id": "9", "provided_user_id": "s1"}],
            // Grants to a project of the organization's (named) and to a granted one.
            "projects": [{"project_id": "p1", "project": {"name": "Shop"}}],
            "user_grants": [{"user_id": "u1", "project_id": "p1", "role_keys": ["buyer"]},
                {"user_id": "u1", "project_id": "p9", "project_grant_id": "g9",
                 "role_keys": ["viewer", "editor"]}]});
        let records = zitadel_users(obj(org));
        assert_eq!(records.len(), 2);
        let r = from_zitadel(obj(records[0].clone())).unwrap();
        assert_eq!(
            Value::Object(r),
            json!({"external_id": "u1", "username": "zoe", "email": "z@x.io",
                "email_verified": true, "password_hash": "$2b$10$abc",
                "authenticators": [{"type": "TOTP", "totp_secret": "SGVsbG8h3q2+7w=="}],
                "identities": [{"provider": "9", "subject": "s1"}],
                "app_metadata": {"tags": ["a"], "bin": "/w==", "zitadel_org_id": "o1",
                    "zitadel_org": "ACME", "zitadel_grants": [
                        {"project_id": "p1", "project": "Shop", "roles": ["buyer"]},
                        {"project_id": "p9", "roles": ["viewer", "editor"]}]}})
        );
        let r = from_zitadel(obj(records[1].clone())).unwrap();
        assert!(
            r.get("app_metadata").unwrap().get("tags").is_none(),
            "u2 has none"
        );
        for (user, says) in [
            (
                json!({"user": {"password": "hunter2"}}),
                "not imported; give its hash",
            ),
            (json!({"user": {"otpCode": "not base32!"}}), "user.otpCode"),
            (
                json!({"user": {"userName": "a", "shoeSize": 9}}),
                "unknown ZITADEL field",
            ),
            (
                json!({"links": [{"idpName": "Google"}]}),
                "needs idpName and providedUserId",
            ),
            (
                json!({"grants": [{"roleKeys": ["a"]}]}),
                "grants[0]: needs its projectId",
            ),
        ] {
            let e = from_zitadel(obj(user)).unwrap_err();
            assert!(e.contains(says), "{e}");
            assert!(!e.contains("hunter2"), "{e}");
        }
    }

    #[test]
    fn better_auth_totp_secrets_open_with_the_apps_secret() {
        let plain = BetterAuthSecrets::parse("legacy-secret-0123456789abcdefghijklmnop\n").unwrap();
        assert_eq!(
            plain.open(BETTER_AUTH_SEALED).unwrap(),
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"
        );
        let env = BetterAuthSecrets::parse(
            "DATABASE_URL=postgres://x\nexport BETTER_AUTH_SECRETS=\"2:second-secret-0123456789abcdefghijklmnop, 1:first-secret-0123456789abcdefghijklmnopq\"\n",
        )
        .unwrap();
        assert_eq!(
            env.open(BETTER_AUTH_SEALED_V2).unwrap(),
            b"VVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVV"
        );
        let e = env.open(BETTER_AUTH_SEALED).unwrap_err();
        assert!(
            e.contains("BETTER_AUTH_SECRET, which the file does not hold"),
            "{e}"
        );
        let e = plain.open(BETTER_AUTH_SEALED_V2).unwrap_err();
        assert!(e.contains("secret version 2"), "{e}");
        let wrong = BetterAuthSecrets::parse("BETTER_AUTH_SECRET=not-the-one").unwrap();
        let e = wrong.open(BETTER_AUTH_SEALED).unwrap_err();
        assert!(e.contains("does not open"), "{e}");
        assert!(!e.contains("not-the-one"));
        assert!(BetterAuthSecrets::parse("DATABASE_URL=x\n").is_err());
        assert!(BetterAuthSecrets::parse("BETTER_AUTH_SECRETS=two:x").is_err());
        // The record: the app carried, or the user refused with the reason.
        let row = |extra: Value| {
            let mut m = json!({"id": "u1", "email": "a@x.io", "twoFactorEnabled": true});
            m.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            m.as_object().unwrap().clone()
        };
        let sealed = json!({"twoFactors": [{"secret": BETTER_AUTH_SEALED, "verified": true}]});
        let r = from_better_auth(row(sealed.clone()), Some(&plain), None).unwrap();
        assert_eq!(r["authenticators"][0]["type"], "TOTP");
        assert_eq!(
            r["authenticators"][0]["totp_secret"],
            base64::engine::general_purpose::STANDARD.encode(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ012345")
        );
        // Backup codes: sealed by the plugin (Better Auth 1.7 made these, one spent), or
        // in the clear; codes that do not open fail the record rather than vanish.
        let with_codes = |codes: &str| {
            row(
                json!({"twoFactors": [{"secret": BETTER_AUTH_SEALED, "verified": 1,
                                       "backupCodes": codes}]}),
            )
        };
        let r = from_better_auth(with_codes(BETTER_AUTH_SEALED_CODES), Some(&plain), None).unwrap();
        assert_eq!(r["authenticators"][1]["type"], "RECOVERY_CODES");
        let codes = r["authenticators"][1]["recovery_codes"].as_array().unwrap();
        assert_eq!(codes.len(), 9);
        assert_eq!(codes[0], "YTqtq-Y2Fmi");
        let r = from_better_auth(with_codes(r#"["AbCdE-12345"]"#), Some(&plain), None).unwrap();
        assert_eq!(
            r["authenticators"][1]["recovery_codes"],
            json!(["AbCdE-12345"])
        );
        let r = from_better_auth(with_codes("[]"), Some(&plain), None).unwrap();
        assert_eq!(r["authenticators"].as_array().unwrap().len(), 1);
        let e = from_better_auth(with_codes("c0ffee"), Some(&plain), None).unwrap_err();
        assert!(e.starts_with("twoFactors[0].backupCodes: "), "{e}");
        assert!(e.contains("leave backupCodes out of the query"), "{e}");
        // The OTP method (codes the app sends): a channel for every two-factor user, after
        // their app; no secret needed for a user without one.
        let otp_only = row(json!({"twoFactors": []}));
        let r = from_better_auth(otp_only.clone(), None, Some(OtpChannel::Email)).unwrap();
        assert_eq!(
            r["authenticators"],
            json!([{"type": "EMAIL_OTP", "email": "a@x.io"}])
        );
        let r = from_better_auth(row(sealed.clone()), Some(&plain), Some(OtpChannel::Email));
        let kinds: Vec<Value> = r.unwrap()["authenticators"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["type"].clone())
            .collect();
        assert_eq!(kinds, [json!("TOTP"), json!("EMAIL_OTP")]);
        let e = from_better_auth(otp_only.clone(), None, Some(OtpChannel::Sms)).unwrap_err();
        assert!(e.contains("has no phone number"), "{e}");
        let mut with_phone = otp_only;
        with_phone.insert("phoneNumber".into(), json!("+14155550123"));
        let r = from_better_auth(with_phone, None, Some(OtpChannel::Sms)).unwrap();
        assert_eq!(
            r["authenticators"],
            json!([{"type": "SMS_OTP", "phone_number": "+14155550123"}])
        );
        for (extra, secrets, says) in [
            (json!({}), Some(&plain), "has no twoFactors"),
            (sealed.clone(), None, "give --better-auth-secret-file"),
            (
                json!({"twoFactors": [{"secret": "x", "verified": false}]}),
                Some(&plain),
                "OTP method",
            ),
            (sealed, Some(&wrong), "does not open"),
        ] {
            let e = from_better_auth(row(extra), secrets, None).unwrap_err();
            assert!(e.contains(says), "{e}");
        }
        let off = json!({"id": "u2", "email": "b@x.io", "twoFactorEnabled": false,
            "twoFactors": [{"secret": "x", "verified": false}]});
        let r = from_better_auth(off.as_object().unwrap().clone(), None, None).unwrap();
        assert!(
            r.get("authenticators").is_none(),
            "an enrollment never finished"
        );
    }

    #[test]
    fn better_auth_memberships_go_to_app_metadata() {
        // A row of `sqlite3 -json` with the README's organizations query, from Better Auth
        // 1.7.29's organization plugin (Bob, made a member of Acme with two roles, owns Beta),
        // password left out; the admin plugin's role kept beside the memberships.
        let row = json!({"id": "mxeYRbdAtVdctPtIjX8h6aI7uanKRkao", "name": "Bob",
            "email": "bob@example.com", "emailVerified": 0, "image": null, "role": "user",
            "createdAt": "2026-12-07T21:21:46.228Z", "updatedAt": "2026-12-07T21:21:46.228Z",
            "organizations": "[{\"id\":\"9Qq0eNArddfjBWcc5zXAV0yMDwKUv8b1\",\"slug\":\"acme\",\"name\":\"Acme Inc.\",\"role\":\"admin,member\",\"createdAt\":\"2026-12-07T21:21:46.410Z\"},{\"id\":\"HRB0Tu3DYFk7CIqQWGFCvPA9dqO5vhJn\",\"slug\":\"beta\",\"name\":\"Beta\",\"role\":\"owner\",\"createdAt\":\"2026-12-07T21:21:46.422Z\"}]"});
        let r = from_better_auth(obj(row), None, None).unwrap();
        assert_eq!(
            r["app_metadata"],
            json!({"role": "user", "organizations": [
                {"id": "9Qq0eNArddfjBWcc5zXAV0yMDwKUv8b1", "slug": "acme", "name": "Acme Inc.",
                 "role": "admin,member", "joined_at": "2026-12-07T21:21:46.410000Z"},
                {"id": "HRB0Tu3DYFk7CIqQWGFCvPA9dqO5vhJn", "slug": "beta", "name": "Beta",
                 "role": "owner", "joined_at": "2026-12-07T21:21:46.422000Z"}]})
        );
        // No memberships (`[]` from SQLite, null from PostgreSQL): no app_metadata.
        for none in [json!("[]"), Value::Null] {
            let r = from_better_auth(obj(json!({"id": "u2", "organizations": none})), None, None);
            assert!(r.unwrap().get("app_metadata").is_none());
        }
        let err = from_better_auth(obj(json!({"organizations": [{"slug": "x"}]})), None, None);
        assert!(
            err.unwrap_err()
                .contains("organizations[0]: needs the organization's id")
        );
    }

    #[test]
    fn better_auth_rows_in_either_spelling() {
        let row = |extra: Value| {
            let mut m = json!({"id": "u1", "email": "a@x.io", "email_verified": true,
                "created_at": "2026-01-02 03:04:05.6", "banned": true, "ban_reason": "spam",
                "accounts": [{"provider_id": "credential", "account_id": "u1",
                    "password": "$2b$10$abcdefghijklmnopqrstuu3KpJdU6Ew3o4vaL8R0iQ0bbR1iGTW6e"},
                    {"provider_id": "github", "account_id": "583232"}]})
            .as_object()
            .unwrap()
            .clone();
            m.extend(extra.as_object().unwrap().clone());
            from_better_auth(m, None, None)
        };
        let past = row(json!({"ban_expires": "2020-01-01T00:00:00Z"})).unwrap();
        assert!(past.get("blocked").is_none(), "a ban over is no block");
        assert_eq!(past["email_verified"], true);
        assert_eq!(past["created_at"], "2026-01-02T03:04:05.600000Z");
        assert!(past["password_hash"].as_str().unwrap().starts_with("$2b$"));
        assert_eq!(past["identities"][0]["provider"], "github");
        let future = row(json!({"ban_expires": "2999-01-01T00:00:00Z"})).unwrap();
        assert_eq!(
            future["blocked_reason"],
            "banned in Better Auth: spam (until 2999-01-01T00:00:00Z)"
        );
        assert_eq!(row(json!({})).unwrap()["blocked"], true, "no end: for good");
        assert_eq!(
            better_auth_hash("6162:00112233445566778899aabbccddeeff").unwrap(),
            "$scrypt$ln=14,r=16,p=1$NjE2Mg$ABEiM0RVZneImaq7zN3u/w"
        );
        for bad in [
            "no-colon",
            "salt:not-hex",
            ":00112233445566778899aabbccddeeff",
            "s:00",
        ] {
            assert!(better_auth_hash(bad).is_err(), "{bad}");
        }
    }
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn auth0_records_take_roster_names() {
        let r = from_auth0(
            obj(json!({
                "user_id": "auth0|1", "name": "N", "logins_count": 3, "_id": {"$oid": "x"},
                "custom_password_hash": {"algorithm": "bcrypt", "hash": {"value": "$2b$10$h"}},
                "identities": [{"provider": "auth0", "user_id": "1"},
                               {"provider": "github", "user_id": 7, "connection": "github"}],
            })),
            false,
        )
        .unwrap();
        assert_eq!(
            Value::Object(r),
            json!({"external_id": "auth0|1", "display_name": "N", "password_hash": "$2b$10$h",
                   "identities": [{"provider": "github", "subject": "7",
                                   "connection": "github"}]})
        );
        for (bad, says) in [
            (
                json!({"custom_password_hash": {"algorithm": "md5"}}),
                "has no hash.value",
            ),
            (
                json!({"identities": [{"provider": "github"}]}),
                "needs provider and user_id",
            ),
            (
                json!({"passwordHash": "x", "password_set": 1}),
                "unknown Auth0 field",
            ),
            (json!({"favorite": 1}), "unknown Auth0 field 'favorite'"),
            (
                json!({"roles": ["admin"], "app_metadata": {"roles": ["user"]}}),
                "app_metadata and the user's Auth0 roles and organizations both set 'roles', differently",
            ),
            (json!({"roles": "admin"}), "roles: must be a list of names"),
            (
                json!({"organizations": [{"id": "org_1", "roles": "admin"}]}),
                "organizations[0].roles: must be a list of role names",
            ),
            (
                json!({"organizations": [{"name": "acme"}]}),
                "organizations[0]: needs the organization's id",
            ),
        ] {
            let err = from_auth0(obj(bad.clone()), false).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
        // RBAC roles, as the README's script adds them, beside the user's own app_metadata.
        let r = from_auth0(
            obj(json!({"user_id": "auth0|2", "roles": ["admin", "billing"],
                       "app_metadata": {"plan": "pro"}})),
            false,
        )
        .unwrap();
        assert_eq!(
            r["app_metadata"],
            json!({"plan": "pro", "roles": ["admin", "billing"]})
        );
        let r = from_auth0(obj(json!({"roles": ["admin"]})), false).unwrap();
        assert_eq!(r["app_metadata"], json!({"roles": ["admin"]}));
        let r = from_auth0(obj(json!({"roles": []})), false).unwrap();
        assert!(r.get("app_metadata").is_none());
        // Organizations, as the README's script adds them (Auth0's member roles are objects).
        let r = from_auth0(
            obj(json!({"roles": ["admin"], "organizations": [
                {"id": "org_1", "slug": "acme", "name": "Acme Inc.",
                 "roles": [{"id": "rol_1", "name": "billing"}, {"id": "rol_2", "name": "owner"}]},
                {"id": "org_2", "slug": "beta", "name": "Beta", "roles": []}]})),
            false,
        )
        .unwrap();
        assert_eq!(
            r["app_metadata"],
            json!({"roles": ["admin"], "organizations": [
                {"id": "org_1", "slug": "acme", "name": "Acme Inc.", "roles": ["billing", "owner"]},
                {"id": "org_2", "slug": "beta", "name": "Beta"}]})
        );
        let r = from_auth0(obj(json!({"organizations": []})), false).unwrap();
        assert!(r.get("app_metadata").is_none());
    }

    #[test]
    fn firebase_hash_parameters_read_from_the_console_block_or_json() {
        let key = "a".repeat(85) + "A==";
        let block = format!(
            "hash_config {{\n  algorithm: SCRYPT,\n  base64_signer_key: {key},\n  \
             base64_salt_separator: Bw==,\n  rounds: 8,\n  mem_cost: 14,\n}}"
        );
        let json = format!(
            r#"{{"base64_signer_key": "{key}", "base64_salt_separator": "Bw==", "rounds": 8, "mem_cost": 14}}"#
        );
        for text in [block.as_str(), json.as_str()] {
            let h = FirebaseHash::parse(text).unwrap();
            assert_eq!(
                (h.rounds, h.mem_cost, h.separator.as_slice()),
                (8, 14, &[7u8][..])
            );
            assert_eq!(h.signer_key.len(), 64);
        }
        for (bad, says) in [
            (
                block.replace("SCRYPT", "HMAC_SHA256"),
                "only Firebase's SCRYPT",
            ),
            (block.replace("  rounds: 8,\n", ""), "rounds is missing"),
            (
                block.replace("rounds: 8", "rounds: eight"),
                "rounds must be a number",
            ),
            (
                block.replace("Bw==", "B!w"),
                "base64_salt_separator: is not base64",
            ),
            // The server's bound (256 MiB), checked before any record is sent.
            (
                block.replace("mem_cost: 14", "mem_cost: 22"),
                "scrypt parameters",
            ),
        ] {
            let err = FirebaseHash::parse(&bad).err().unwrap_or_default();
            assert!(err.contains(says), "{bad}: {err}");
            assert!(!err.contains(&key[..20]), "no key in {err}");
        }
    }

    #[test]
    fn firebase_and_keycloak_records_take_roster_names() {
        let r = from_firebase(
            obj(
                json!({"localId": "u1", "createdAt": 1589276052123_i64, "mfaInfo": [],
                       "lastSignedInAt": "1700000000000",
                       "providerUserInfo": [{"providerId": "password", "rawId": "a@x.io"},
                                            {"providerId": "apple.com", "rawId": "001.abc"}]}),
            ),
            None,
        )
        .unwrap();
        assert_eq!(
            Value::Object(r),
            json!({"external_id": "u1", "created_at": "2020-05-12T09:34:12.123Z",
                   "last_login_at": "2023-11-14T22:13:20.000Z",
                   "identities": [{"provider": "apple.com", "subject": "001.abc"}]})
        );
        // The Identity Toolkit API's record (accounts:batchGet): times as text, second
        // factors in mfaInfo.
        let r = from_firebase(
            obj(
                json!({"localId": "u2", "createdAt": "1589276052123", "tenantId": "t",
                "emailLinkSignin": false, "lastRefreshAt": "2024-01-01T00:00:00.123Z",
                "mfaInfo": [
                    {"mfaEnrollmentId": "e1", "displayName": "work phone",
                     "phoneInfo": "+15555550100", "enrolledAt": "2023-03-01T10:00:00.5Z"},
                    {"mfaEnrollmentId": "e2", "emailInfo": {"emailAddress": "b@x.io"}},
                    {"mfaEnrollmentId": "e3", "phoneInfo": "+*******0100",
                     "unobfuscatedPhoneInfo": "+15555550199"}]}),
            ),
            None,
        )
        .unwrap();
        assert_eq!(
            r["authenticators"],
            json!([
                {"type": "SMS_OTP", "phone_number": "+15555550100", "name": "work phone",
                 "created_at": "2023-03-01T10:00:00.500000Z"},
                {"type": "EMAIL_OTP", "email": "b@x.io"},
                {"type": "SMS_OTP", "phone_number": "+15555550199"}
            ])
        );
        for (bad, says) in [
            (
                json!({"mfaInfo": [{"mfaEnrollmentId": "e", "totpInfo": {}}]}),
                "a TOTP second factor",
            ),
            (
                json!({"mfaInfo": [{"phoneInfo": "+*******0100"}]}),
                "obfuscated",
            ),
            (
                json!({"createdAt": "yesterday"}),
                "createdAt: must be milliseconds",
            ),
            (
                json!({"providerUserInfo": [{"rawId": "1"}]}),
                "needs providerId and rawId",
            ),
            (
                json!({"passwordHash": "aGFzaA=="}),
                "--firebase-hash-parameters",
            ),
            (
                json!({"tenantSecret": 1}),
                "unknown Firebase field 'tenantSecret'",
            ),
        ] {
            let err = from_firebase(obj(bad.clone()), None).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
        // Recovery codes as Keycloak keeps them: the Base64 of each unused code's SHA-512 (a
        // used one is removed from the list; a set with none left is not carried).
        use sha2::Digest;
        let sha512 = |code: &str| {
            base64::engine::general_purpose::STANDARD.encode(sha2::Sha512::digest(code))
        };
        let codes = |algorithm: &str, hashes: &[String]| {
            let list: Vec<Value> = hashes
                .iter()
                .enumerate()
                .map(|(i, h)| json!({"number": i + 3, "encodedHashedValue": h}))
                .collect();
            json!({"type": "recovery-authn-codes", "userLabel": "Backup codes",
                   "createdDate": 1_700_000_000_000_i64,
                   "secretData": json!({"codes": list}).to_string(),
                   "credentialData": json!({"hashIterations": 1, "algorithm": algorithm,
                                            "totalCodes": 12, "remainingCodes": 2}).to_string()})
        };
        let (one, two) = (sha512("ABCDEFGH1234"), sha512("JKLMNPQR5678"));
        // Roles and groups that authorize the user in your applications, Keycloak's own
        // left out.
        let r = from_keycloak(obj(json!({
            "id": "k1", "username": "u", "enabled": true, "attributes": {"locale": ["fr"]},
            "realmRoles": ["default-roles-acme", "offline_access", "admin"],
            "clientRoles": {"account": ["manage-account"], "billing": ["invoices:read"],
                            "realm-management": ["view-users"], "empty": []},
            "groups": ["/staff", "/staff/eng"], "requiredActions": ["VERIFY_EMAIL"],
            "credentials": [codes("RS512", &[one.clone(), two.clone()]), codes("SHA-512", &[])],
        })))
        .unwrap();
        assert_eq!(
            Value::Object(r),
            json!({"external_id": "k1", "username": "u", "locale": "fr",
                   "app_metadata": {"roles": ["admin"],
                                    "client_roles": {"billing": ["invoices:read"]},
                                    "groups": ["/staff", "/staff/eng"]},
                   "authenticators": [{"type": "RECOVERY_CODES", "name": "Backup codes",
                                       "created_at": "2023-11-14T22:13:20.000Z",
                                       "recovery_code_hashes": [one, two]}]})
        );
        let r = from_keycloak(obj(
            json!({"realmRoles": ["default-roles-acme"], "groups": []}),
        ));
        assert!(r.unwrap().get("app_metadata").is_none(), "nothing of yours");
        let err = from_keycloak(obj(json!({"groups": "/staff"}))).unwrap_err();
        assert!(err.contains("groups: must be a list of names"), "{err}");
        for (credential, says) in [
            (codes("PBKDF2", &[sha512("X")]), "hashed with PBKDF2"),
            (codes("SHA-512", &["AAAA".into()]), "not a SHA-512 hash"),
            (json!({"type": "recovery-authn-codes"}), "secretData"),
        ] {
            let err = from_keycloak(obj(json!({"credentials": [credential]}))).unwrap_err();
            assert!(err.contains(says), "{says}: {err}");
        }
        // Disabled users arrive blocked, each source saying so; a pending password update
        // is kept.
        let r = from_keycloak(obj(json!({
            "enabled": false, "requiredActions": ["UPDATE_PASSWORD", "CONFIGURE_TOTP"],
        })))
        .unwrap();
        assert_eq!(
            Value::Object(r),
            json!({"blocked": true, "blocked_reason": "disabled in Keycloak",
                   "require_password_change": true})
        );
        // A line of Auth0's password export: its user's external_id.
        let r = from_auth0(
            obj(
                json!({"_id": {"$oid": "5f7c"}, "email": "a@x.io", "passwordHash": "$2b$h",
                       "password_set_date": {"$date": "2020-01-01"}, "tenant": "t",
                       "connection": "Username-Password-Authentication"}),
            ),
            false,
        )
        .unwrap();
        assert_eq!(
            Value::Object(r),
            json!({"external_id": "auth0|5f7c", "email": "a@x.io", "password_hash": "$2b$h"})
        );
        let r = from_firebase(obj(json!({"disabled": true})), None).unwrap();
        assert_eq!(r["blocked_reason"], "disabled in Firebase");
        let r = from_auth0(obj(json!({"blocked": "true"})), true).unwrap();
        assert_eq!(r["blocked_reason"], "blocked in Auth0");
        let cred = |algorithm: &str| {
            json!({"type": "password",
                   "secretData": "{\"value\":\"aGFzaGhhc2hoYXNoaGFzaA==\",\"salt\":\"c2FsdHNhbHQ=\"}",
                   "credentialData": format!("{{\"hashIterations\":1000,\"algorithm\":\"{algorithm}\"}}")})
        };
        let r = from_keycloak(obj(json!({"credentials": [cred("pbkdf2-sha512")]}))).unwrap();
        assert_eq!(
            r["password_hash"],
            "$pbkdf2-sha512$i=1000,l=16$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA"
        );
        for (bad, says) in [
            (
                json!({"credentials": [cred("md5")]}),
                "algorithm 'md5' is not one",
            ),
            (
                json!({"credentials": [cred("pbkdf2"), cred("pbkdf2")]}),
                "more than one password",
            ),
            (
                json!({"credentials": [{"type": "password", "secretData": "{}"}]}),
                "credentialData",
            ),
            (
                json!({"federatedIdentities": [{"userId": "1"}]}),
                "needs identityProvider",
            ),
            (
                json!({"credentials": [{"type": "webauthn"}]}),
                "credentials[0].credentialData: must be a JSON object",
            ),
            (
                json!({"credentials": [{"type": "webauthn-passwordless",
                    "credentialData": "{\"credentialId\":\"Y3JlZA==\",\"credentialPublicKey\":\"cGsx\"}"}]}),
                "credentials[0]: the public key is not COSE",
            ),
            (json!({"favorite": 1}), "unknown Keycloak field 'favorite'"),
        ] {
            let err = from_keycloak(obj(bad.clone())).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn cognito_records_take_roster_names() {
        let r = from_cognito(obj(json!({
            "Username": "ann", "UserStatus": "FORCE_CHANGE_PASSWORD", "MFAOptions": [],
            "Attributes": [{"Name": "sub", "Value": "s-1"}, {"Name": "zoneinfo", "Value": "Europe/Oslo"},
                           {"Name": "phone_number_verified", "Value": "false"}],
            "UserCreateDate": 1689980857.5,
            "Groups": ["admins", {"GroupName": "readers", "Precedence": 2}],
        })))
        .unwrap();
        assert_eq!(
            Value::Object(r),
            json!({"external_id": "s-1", "timezone": "Europe/Oslo", "phone_verified": "false",
                   "app_metadata": {"legacy_password": true, "groups": ["admins", "readers"]},
                   "username": "ann", "created_at": "2023-07-21T23:07:37.500Z"})
        );
        for (bad, says) in [
            (
                json!({"Attributes": [{"Name": "email"}]}),
                "needs Name and Value",
            ),
            (
                json!({"Attributes": [{"Name": "identities", "Value": "{}"}]}),
                "must be a JSON array",
            ),
            (
                json!({"UserCreateDate": "last week"}),
                "must be an ISO 8601 time",
            ),
            (json!({"Groups": "admins"}), "Groups: must be a list"),
            (
                json!({"Groups": [{"Precedence": 1}]}),
                "Groups[0]: needs a GroupName",
            ),
            (json!({"Pool": []}), "unknown Cognito field 'Pool'"),
        ] {
            let err = from_cognito(obj(bad.clone())).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn kratos_identities_take_roster_names() {
        // As GET /admin/identities/{id}?include_credential=... writes one.
        let r = from_kratos(obj(json!({
            "id": "9f425a8d-7efc-4768-8f23-7647a74fdf13", "schema_id": "default",
            "schema_url": "http://kratos/schemas/ZGVmYXVsdA", "state": "active",
            "state_changed_at": "2024-01-15T10:30:00.123456Z",
            "traits": {"email": "Kim@Example.com", "name": {"first": "Kim", "last": "Lee"},
                       "newsletter": true},
            "verifiable_addresses": [
                {"id": "a1", "value": "kim@example.com", "verified": true, "via": "email",
                 "status": "completed", "verified_at": "2024-01-15T10:31:00Z"},
                {"id": "a2", "value": "+4915112345678", "verified": false, "via": "sms",
                 "status": "sent"}
            ],
            "recovery_addresses": [{"id": "r1", "value": "kim@example.com", "via": "email"}],
            "metadata_public": {"plan": "pro"}, "metadata_admin": {"crm": 42, "plan": "pro"},
            "created_at": "2024-01-15T10:30:00.123456Z", "updated_at": "2024-02-01T00:00:00Z",
            "organization_id": null,
            "credentials": {
                "password": {"type": "password", "identifiers": ["kim@example.com"],
                    "config": {"hashed_password": "$2a$10$abc"}, "version": 0},
                "oidc": {"type": "oidc", "identifiers": ["google:1099"],
                    "config": {"providers": [{"subject": "1099", "provider": "google",
                        "initial_id_token": "a-token", "initial_access_token": "",
                        "initial_refresh_token": ""}]}},
                "saml": {"type": "saml", "identifiers": ["okta:kim"]},
                "totp": {"type": "totp", "identifiers": ["9f42"], "created_at": "2024-02-01T00:00:00Z",
                    "config": {"totp_url": "otpauth://totp/Acme:kim@example.com?secret=JBSWY3DPEHPK3PXP&issuer=Acme&algorithm=SHA1&digits=6&period=30"}},
                "lookup_secret": {"type": "lookup_secret",
                    "created_at": "2024-02-01T00:00:01Z",
                    "config": {"recovery_codes": [{"code": "abcd1234", "used_at": null},
                        {"code": "efgh5678", "used_at": "2024-03-01T00:00:00Z"},
                        {"code": "ijkl9012", "used_at": "0001-01-01T00:00:00Z"},
                        {"code": "mnop3456"}]}},
                "webauthn": {"type": "webauthn", "config": {"credentials": []}},
                "code": {"type": "code", "config": {"addresses": []}}
            }
        })))
        .unwrap();
        assert_eq!(
            Value::Object(r),
            json!({
                "external_id": "9f425a8d-7efc-4768-8f23-7647a74fdf13",
                "email": "Kim@Example.com", "email_verified": true,
                "phone_number": "+4915112345678", "phone_verified": false,
                "given_name": "Kim", "family_name": "Lee",
                "user_metadata": {"newsletter": true},
                "app_metadata": {"plan": "pro", "crm": 42},
                "created_at": "2024-01-15T10:30:00.123456Z",
                "password_hash": "$2a$10$abc",
                "identities": [
                    {"provider": "google", "subject": "1099"},
                    {"provider": "okta", "subject": "kim"}
                ],
                "authenticators": [
                    {"type": "RECOVERY_CODES",
                     "recovery_codes": ["abcd1234", "ijkl9012", "mnop3456"],
                     "created_at": "2024-02-01T00:00:01.000000Z"},
                    {"type": "TOTP", "totp_secret": "SGVsbG8h3q2+7w==",
                     "created_at": "2024-02-01T00:00:00.000000Z"}
                ]
            })
        );
        let one = |v: Value| from_kratos(obj(v));
        // Inactive: blocked. A name as text: the display name. The migration hook: marked.
        let r = one(
            json!({"state": "inactive", "traits": {"email": "a@x.io", "name": "Al"},
            "organization_id": "org-1",
            "credentials": {"password": {"config": {"use_password_migration_hook": true}}}}),
        )
        .unwrap();
        assert_eq!(r["blocked_reason"], "inactive in Kratos");
        assert_eq!(r["display_name"], "Al");
        assert_eq!(
            r["app_metadata"],
            json!({"kratos_organization_id": "org-1", "legacy_password": true})
        );
        // Kratos's own spellings of PBKDF2-SHA1 and scrypt, as PHC.
        let hash = |h: &str| {
            one(json!({"credentials": {"password": {"config": {"hashed_password": h}}}}))
                .map(|r| r["password_hash"].clone())
        };
        assert_eq!(
            hash("$pbkdf2-sha1$i=10000,l=20$c2FsdA$FbCk").unwrap(),
            "$pbkdf2$i=10000,l=20$c2FsdA$FbCk"
        );
        assert_eq!(
            hash("$scrypt$ln=1024,r=8,p=1$cm9zdGVyLWZpeHR1cmUtc2FsdA==$ly39Byjh1alWA0zXTETO+sZH91tCTx6skWCbtz5IfV4=").unwrap(),
            "$scrypt$ln=10,r=8,p=1$cm9zdGVyLWZpeHR1cmUtc2FsdA$ly39Byjh1alWA0zXTETO+sZH91tCTx6skWCbtz5IfV4"
        );
        assert!(hash("$scrypt$ln=1000,r=8,p=1$c2FsdA==$aGFzaA==").is_err());
        assert_eq!(
            hash("$argon2id$v=19$m=65536,t=1,p=2$c2FsdA$aGFzaA").unwrap(),
            "$argon2id$v=19$m=65536,t=1,p=2$c2FsdA$aGFzaA"
        );
        // No trait of Roster's names: the first verified address of each kind.
        let r = one(json!({"traits": {"contact": {"mail": "b@x.io"}},
            "verifiable_addresses": [
                {"value": "old@x.io", "via": "email", "verified": false},
                {"value": "b@x.io", "via": "email", "verified": true}]}))
        .unwrap();
        assert_eq!(
            (&r["email"], &r["email_verified"]),
            (&json!("b@x.io"), &json!(true))
        );
        // Read without include_credential: refused rather than imported without a password.
        let e = one(json!({"credentials": {"password": {"type": "password",
            "identifiers": ["a@x.io"]}}}))
        .unwrap_err();
        assert!(e.contains("include_credential=password"), "{e}");
        for (bad, says) in [
            (json!({"state": "deleted"}), "unknown Kratos state"),
            (
                json!({"credentials": {"totp": {"config": {"totp_url":
                "otpauth://totp/A:b?secret=JBSWY3DPEHPK3PXP&digits=8"}}}}),
                "8 digits",
            ),
            (
                json!({"credentials": {"totp": {"config": {"totp_url": "https://x"}}}}),
                "otpauth",
            ),
            (
                json!({"credentials": {"profile": {}}}),
                "unknown Kratos credential type",
            ),
            (
                json!({"credentials": {"webauthn": {"config": {"credentials": [
                    {"id": "Y3JlZDE=", "public_key": "cGsx"}]}}}}),
                "credentials.webauthn.credentials[0]: the public key is not COSE",
            ),
            (
                json!({"credentials": {"passkey": {"config": {"credentials": [
                    {"public_key": "cGsx"}]}}}}),
                "has no id",
            ),
            (
                json!({"credentials": {"oidc": {"identifiers": ["nocolon"]}}}),
                "<provider>:<subject>",
            ),
            (
                json!({"metadata_public": {"a": 1}, "metadata_admin": {"a": 2}}),
                "both set 'a'",
            ),
            (
                json!({"traits": {}, "favourite": 1}),
                "unknown Kratos field 'favourite'",
            ),
        ] {
            let e = one(bad).unwrap_err();
            assert!(e.contains(says), "{e}");
        }
    }

    #[test]
    fn supabase_rows_take_roster_names() {
        // As to_jsonb writes a row, with the README query's two added columns.
        let r = from_supabase(obj(json!({
            "instance_id": "00000000-0000-0000-0000-000000000000",
            "id": "7c9e6679-7425-40de-944b-e07fc1f90ae7", "aud": "authenticated",
            "role": "authenticated", "email": "sue@example.com",
            "encrypted_password": "$2a$10$abc", "email_confirmed_at": "2024-01-15T10:30:00.123456+00:00",
            "confirmation_token": "secret-token", "recovery_token": "",
            "phone": "4915112345678", "phone_confirmed_at": null,
            "last_sign_in_at": "2024-03-01 08:00:00+00", "created_at": "2024-01-15 10:30:00.5+01",
            "raw_app_meta_data": {"provider": "email", "providers": ["email", "google"], "plan": "pro"},
            "raw_user_meta_data": {"full_name": "Sue Storm", "avatar_url": "https://img/s.png"},
            "banned_until": "2020-01-01T00:00:00+00:00", "deleted_at": null, "is_anonymous": false,
            "is_sso_user": false,
            "identities": [
                {"provider": "email", "provider_id": "7c9e6679", "identity_data": {"sub": "7c9e6679"}},
                {"provider": "google", "provider_id": "1099", "email": "sue@gmail.com",
                 "identity_data": {"sub": "1099", "name": "Sue"}},
                {"provider": "github", "id": "42", "identity_data": {"sub": "42"}}
            ],
            "mfa_factors": [
                {"factor_type": "totp", "status": "verified", "secret": "jbswy3dpehpk3pxp",
                 "friendly_name": "phone app", "created_at": "2024-02-01T00:00:00+00:00"},
                {"factor_type": "totp", "status": "unverified", "secret": "GEZDGNBV"},
                {"factor_type": "phone", "status": "verified", "phone": "4915112345678"},
                {"factor_type": "webauthn", "status": "verified"}
            ]
        })))
        .unwrap();
        assert_eq!(
            Value::Object(r),
            json!({
                "external_id": "7c9e6679-7425-40de-944b-e07fc1f90ae7", "email": "sue@example.com",
                "password_hash": "$2a$10$abc", "email_verified": true,
                "phone_number": "+4915112345678",
                "last_login_at": "2024-03-01T08:00:00.000000Z",
                "created_at": "2024-01-15T09:30:00.500000Z",
                "app_metadata": {"plan": "pro"},
                "display_name": "Sue Storm", "picture_url": "https://img/s.png",
                "user_metadata": {"full_name": "Sue Storm", "avatar_url": "https://img/s.png"},
                "identities": [
                    {"provider": "google", "subject": "1099", "email": "sue@gmail.com",
                     "profile": {"sub": "1099", "name": "Sue"}},
                    {"provider": "github", "subject": "42", "profile": {"sub": "42"}}
                ],
                "authenticators": [
                    {"type": "TOTP", "totp_secret": "SGVsbG8h3q2+7w==", "name": "phone app",
                     "created_at": "2024-02-01T00:00:00.000000Z"},
                    {"type": "SMS_OTP", "phone_number": "+4915112345678"}
                ]
            })
        );
        // Banned for good or until a time to come: blocked. Nothing confirmed: pending.
        let r = from_supabase(obj(json!({"email": "b@x.io", "banned_until": "infinity"}))).unwrap();
        assert_eq!(r["blocked"], true);
        assert!(!r.contains_key("pending"));
        let r = from_supabase(obj(
            json!({"email": "b@x.io", "banned_until": "2999-01-01 00:00:00+00"}),
        ))
        .unwrap();
        assert_eq!(
            r["blocked_reason"],
            "banned in Supabase until 2999-01-01 00:00:00+00"
        );
        let r = from_supabase(obj(json!({"email": "p@x.io", "email_confirmed_at": null}))).unwrap();
        assert_eq!(r["pending"], true);
        for (bad, says) in [
            (
                json!({"deleted_at": "2024-01-01T00:00:00+00:00"}),
                "deleted in Supabase",
            ),
            (json!({"is_anonymous": true}), "anonymous"),
            (
                json!({"created_at": "yesterday"}),
                "created_at: must be a time",
            ),
            (
                json!({"identities": [{"provider": "google"}]}),
                "identities[0]: needs provider",
            ),
            (
                json!({"mfa_factors": [{"factor_type": "totp", "status": "verified",
                                         "secret": "{\"key_id\":\"k\",\"data\":\"x\"}"}]}),
                "encrypted",
            ),
            (
                json!({"mfa_factors": [{"factor_type": "totp", "status": "verified", "secret": "not base32!"}]}),
                "mfa_factors[0].secret: is not base32",
            ),
            (
                json!({"email_change_token": "t"}),
                "unknown Supabase field 'email_change_token'",
            ),
        ] {
            let err = from_supabase(obj(bad.clone())).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
            assert!(!err.contains("key_id"), "{err}");
        }
    }

    #[test]
    fn clerk_rows_take_roster_names() {
        // CSV cells: every value text, empty when absent.
        let row = |cells: &[(&str, &str)]| {
            let mut m = Map::new();
            for name in [
                "id",
                "first_name",
                "last_name",
                "username",
                "primary_email_address",
                "primary_phone_number",
                "verified_email_addresses",
                "unverified_email_addresses",
                "verified_phone_numbers",
                "unverified_phone_numbers",
                "totp_secret",
                "password_digest",
                "password_hasher",
            ] {
                let v = cells
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map_or("", |(_, v)| v);
                m.insert(name.to_string(), Value::String(v.to_string()));
            }
            m
        };
        let r = from_clerk(row(&[
            ("id", "user_2YDryYFVMM1W1plDDKz7Gzf4we6"),
            ("first_name", "Jane"),
            ("last_name", "Doe"),
            ("primary_email_address", "jane@example.com"),
            (
                "verified_email_addresses",
                "old@example.com,Jane@example.com",
            ),
            ("primary_phone_number", "+12125550100"),
            ("unverified_phone_numbers", "+12125550100"),
            ("totp_secret", "JBSWY3DPEHPK3PXP"),
            ("password_digest", "$2b$10$U4C0ZY8OG8y41F9LusfKyu"),
            ("password_hasher", "bcrypt"),
        ]))
        .unwrap();
        assert_eq!(
            Value::Object(r),
            json!({
                "external_id": "user_2YDryYFVMM1W1plDDKz7Gzf4we6", "given_name": "Jane",
                "family_name": "Doe", "email": "jane@example.com", "email_verified": true,
                "phone_number": "+12125550100", "phone_verified": false,
                "password_hash": "$2b$10$U4C0ZY8OG8y41F9LusfKyu",
                "authenticators": [{"type": "TOTP", "totp_secret": "SGVsbG8h3q2+7w=="}]
            })
        );
        let r = from_clerk(row(&[("id", "user_1"), ("username", "u1")])).unwrap();
        assert_eq!(
            Value::Object(r),
            json!({"external_id": "user_1", "username": "u1"})
        );
        for (bad, says) in [
            (
                row(&[("password_digest", "5f4dcc3b"), ("password_hasher", "md5")]),
                "password_hasher 'md5' is not a format Roster reads",
            ),
            (
                row(&[("totp_secret", "0189")]),
                "totp_secret: is not base32",
            ),
        ] {
            let err = from_clerk(bad).unwrap_err();
            assert!(err.contains(says), "{err}");
            assert!(
                !err.contains("5f4dcc3b"),
                "the digest is not repeated: {err}"
            );
        }
        let mut extra = row(&[]);
        extra.insert("web3_wallet".into(), json!(""));
        assert!(
            from_clerk(extra)
                .unwrap_err()
                .contains("unknown Clerk field 'web3_wallet'")
        );
        // The JSON variant of the export.
        let r = from_clerk(obj(json!({
            "id": "user_2fT3", "first_name": "John", "last_name": null, "username": null,
            "primary_email_address": "john@example.com",
            "email_addresses": ["test@example.com", "JOHN@example.com"],
            "primary_phone_number": null, "phone_numbers": null,
            "password_digest": null, "password_hasher": null,
            "unsafe_metadata": {"theme": "dark"}, "public_metadata": {"plan": "pro"},
            "private_metadata": {"plan": "pro", "stripe": "cus_1"},
            "has_image": false, "image_url": "https://img.clerk.com/generated",
            "backup_codes_enabled": true, "backup_codes": ["a1b2c3d4"], "totp_secret": null
        })))
        .unwrap();
        assert_eq!(
            Value::Object(r),
            json!({
                "external_id": "user_2fT3", "given_name": "John", "email": "john@example.com",
                "email_verified": true, "user_metadata": {"theme": "dark"},
                "app_metadata": {"plan": "pro", "stripe": "cus_1"}
            })
        );
        let r = from_clerk(obj(
            json!({"id": "u", "has_image": true, "image_url": "https://i/x.png"}),
        ))
        .unwrap();
        assert_eq!(r["picture_url"], "https://i/x.png");
        let clash = from_clerk(obj(json!({"public_metadata": {"role": "admin"},
                                           "private_metadata": {"role": "user"}})))
        .unwrap_err();
        assert!(clash.contains("both set 'role'"), "{clash}");
        // A user of the Backend API's list.
        let r = from_clerk(obj(json!({
            "id": "user_2X", "object": "user", "external_id": "legacy-7",
            "primary_email_address_id": "idn_b", "primary_phone_number_id": null,
            "username": null, "first_name": "Ann", "last_name": null,
            "image_url": "https://img.clerk.com/x", "has_image": false,
            "email_addresses": [
                {"id": "idn_a", "object": "email_address", "email_address": "old@example.com",
                 "verification": {"status": "verified", "strategy": "email_code"}},
                {"id": "idn_b", "object": "email_address", "email_address": "ann@example.com",
                 "verification": {"status": "unverified"}}
            ],
            "phone_numbers": [], "web3_wallets": [], "passkeys": [],
            "external_accounts": [
                {"object": "google_account", "id": "eac_1", "provider": "oauth_google",
                 "provider_user_id": "1077", "email_address": "ann@gmail.com"}
            ],
            "enterprise_accounts": [
                {"provider": "saml_okta", "provider_user_id": "ann@acme.example",
                 "enterprise_connection": {"name": "Acme Okta"}}
            ],
            "password_enabled": true, "two_factor_enabled": false, "banned": true,
            "locked": false, "created_at": 1700000000000_i64, "last_sign_in_at": null,
            "updated_at": 1700000001000_i64, "public_metadata": {}, "private_metadata": {},
            "unsafe_metadata": {},
            // As the README's script adds them from the instance's memberships.
            "organizations": [{"id": "org_2a", "slug": "acme", "name": "Acme",
                               "role": "org:admin"}]
        })))
        .unwrap();
        assert_eq!(
            Value::Object(r),
            json!({
                "external_id": "user_2X", "given_name": "Ann", "email": "ann@example.com",
                "email_verified": false, "blocked": true, "blocked_reason": "banned in Clerk",
                "created_at": "2023-11-14T22:13:20.000Z", "last_login_at": null,
                "app_metadata": {"clerk_external_id": "legacy-7", "organizations": [
                    {"id": "org_2a", "slug": "acme", "name": "Acme", "role": "org:admin"}]},
                // Keys are read in order: enterprise_accounts before external_accounts.
                "identities": [
                    {"provider": "saml_okta", "subject": "ann@acme.example",
                     "connection": "Acme Okta"},
                    {"provider": "google", "subject": "1077", "email": "ann@gmail.com"}
                ]
            })
        );
        let bad = from_clerk(obj(
            json!({"external_accounts": [{"provider": "oauth_github"}]}),
        ))
        .unwrap_err();
        assert!(
            bad.contains("external_accounts[0]: needs provider"),
            "{bad}"
        );
    }
}

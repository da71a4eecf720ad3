//! Users: the domain types, their validation, and update masks.
//!
//! `grpc.rs` turns requests into these types (collecting every field violation), `ops.rs`
//! runs each operation in one transaction with its audit event, `store.rs` holds the SQL.
pub mod bulk_grpc;
pub mod bulk_store;
pub mod creates;
pub mod grpc;
pub mod import;
pub mod ops;
pub mod reads;
pub mod store;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::error::Violations;
use crate::wire;

/// Lifecycle status; the numbers are `roster.v1.UserStatus`'s and are stored as such.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UserStatus {
    Active = 1,
    PendingVerification = 2,
    Blocked = 3,
    Deactivated = 4,
}

impl UserStatus {
    /// The status a new user starts in: pending verification when asked, else active.
    pub fn initial(pending: bool) -> Self {
        if pending {
            UserStatus::PendingVerification
        } else {
            UserStatus::Active
        }
    }

    pub fn from_i16(n: i16) -> Self {
        match n {
            2 => UserStatus::PendingVerification,
            3 => UserStatus::Blocked,
            4 => UserStatus::Deactivated,
            _ => UserStatus::Active,
        }
    }

    /// Filter values: `BLOCKED` or `USER_STATUS_BLOCKED`.
    pub fn number_by_name(name: &str) -> Option<i16> {
        let name = name.strip_prefix("USER_STATUS_").unwrap_or(name);
        Some(match name {
            "ACTIVE" => 1,
            "PENDING_VERIFICATION" => 2,
            "BLOCKED" => 3,
            "DEACTIVATED" => 4,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            UserStatus::Active => "ACTIVE",
            UserStatus::PendingVerification => "PENDING_VERIFICATION",
            UserStatus::Blocked => "BLOCKED",
            UserStatus::Deactivated => "DEACTIVATED",
        }
    }
}

/// The fields a caller sets on a user. Absent text is `None` (stored as NULL).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Profile {
    pub external_id: Option<String>,
    pub email: Option<String>,
    pub email_verified: bool,
    pub phone_number: Option<String>,
    pub phone_verified: bool,
    pub username: Option<String>,
    pub display_name: Option<String>,
    pub given_name: Option<String>,
    pub family_name: Option<String>,
    pub picture_url: Option<String>,
    pub locale: Option<String>,
    pub timezone: Option<String>,
    pub user_metadata: Map<String, Value>,
    pub app_metadata: Map<String, Value>,
}

impl Profile {
    /// What a password must not be: the user's own email, username and phone number.
    pub fn personal(&self) -> Vec<&str> {
        [&self.email, &self.username, &self.phone_number]
            .into_iter()
            .filter_map(|v| v.as_deref())
            .collect()
    }
}

/// A stored user.
#[derive(Clone, Debug)]
pub struct User {
    pub id: Uuid,
    pub profile: Profile,
    pub status: UserStatus,
    pub has_password: bool,
    pub password_changed_at: Option<DateTime<Utc>>,
    pub require_password_change: bool,
    pub login_count: i64,
    pub last_login_at: Option<DateTime<Utc>>,
    pub last_login_ip: Option<String>,
    pub locked_until: Option<DateTime<Utc>>,
    pub blocked_reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub version: i64,
    /// `roster.v1.AuthenticatorType` numbers of the confirmed second factors and passkeys
    /// (the password is `has_password`), ascending.
    pub factor_types: Vec<i16>,
    /// The type of the default authenticator, if the user has one.
    pub default_factor: Option<i16>,
}

impl User {
    /// Opaque; changes with every write (the version) and differs between users.
    pub fn etag(&self) -> String {
        let mut h = Sha256::new();
        h.update(self.id.as_bytes());
        h.update(self.version.to_le_bytes());
        h.update(self.updated_at.timestamp_micros().to_le_bytes());
        hex::encode(&h.finalize()[..10])
    }
}

/// A validated user to create.
#[derive(Debug)]
pub struct NewUser {
    pub id: Uuid,
    pub profile: Profile,
    pub pending: bool,
    pub password: Option<PasswordInput>,
    pub created_at: Option<DateTime<Utc>>,
}

/// A password given on create: plain (hashed by us) or a hash made elsewhere.
pub enum PasswordInput {
    Plain(String),
    Hash(String),
}

impl std::fmt::Debug for PasswordInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PasswordInput::Plain(_) => "Plain(<redacted>)",
            PasswordInput::Hash(_) => "Hash(<redacted>)",
        })
    }
}

/// A unique key to look a user up by.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum LookupKey {
    Email(String),
    PhoneNumber(String),
    Username(String),
    ExternalId(String),
}

/// Limits from API.md, in characters.
pub const MAX_EMAIL: usize = 320;
pub const MAX_NAME: usize = 256;
pub const MAX_EXTERNAL_ID: usize = 256;
pub const MAX_PICTURE_URL: usize = 2048;
pub const MAX_LOCALE: usize = 64;
pub const MAX_REASON: usize = 1024;

/// A blocked user's reason (BlockUser's, or an import's): bounded, no control characters but
/// newlines.
pub fn check_reason(reason: &str) -> Result<(), String> {
    if reason.chars().count() > MAX_REASON || reason.chars().any(|c| c.is_control() && c != '\n') {
        return Err(format!(
            "must be at most {MAX_REASON} characters without control characters"
        ));
    }
    Ok(())
}

fn has_control(s: &str) -> bool {
    s.chars().any(char::is_control)
}

/// A plausible email address: one `@`, a non-empty local part and a dotted-or-not domain,
/// no spaces or control characters. Deliverability is the caller's business.
pub fn check_email(e: &str) -> Result<(), String> {
    if e.chars().count() > MAX_EMAIL {
        return Err(format!("must be at most {MAX_EMAIL} characters"));
    }
    let Some((local, domain)) = e.rsplit_once('@') else {
        return Err("must be an email address".into());
    };
    if local.is_empty()
        || domain.is_empty()
        || domain.starts_with('.')
        || domain.ends_with('.')
        || domain.contains('@')
        || e.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err("must be an email address".into());
    }
    Ok(())
}

/// E.164: `+`, a non-zero digit, at most 15 digits in all.
pub fn check_phone(p: &str) -> Result<(), String> {
    let digits = p.strip_prefix('+').unwrap_or("");
    if digits.len() < 2
        || digits.len() > 15
        || !digits.bytes().all(|b| b.is_ascii_digit())
        || digits.starts_with('0')
    {
        return Err("must be an E.164 phone number such as +14155550123".into());
    }
    Ok(())
}

fn check_text(v: &mut Violations, field: &str, value: &Option<String>, max: usize) {
    if let Some(s) = value {
        if s.chars().count() > max {
            v.add(field, format!("must be at most {max} characters"));
        } else if has_control(s) {
            v.add(field, "must not contain control characters");
        }
    }
}

/// Adds a violation (`<prefix>.<field>`) for every bad field of `p`.
pub fn validate_profile(p: &Profile, prefix: &str, v: &mut Violations) {
    let f = |name: &str| format!("{prefix}.{name}");
    if let Some(e) = &p.email
        && let Err(m) = check_email(e)
    {
        v.add(f("email"), m);
    }
    if p.email_verified && p.email.is_none() {
        v.add(f("email_verified"), "cannot be true without an email");
    }
    if let Some(ph) = &p.phone_number
        && let Err(m) = check_phone(ph)
    {
        v.add(f("phone_number"), m);
    }
    if p.phone_verified && p.phone_number.is_none() {
        v.add(f("phone_verified"), "cannot be true without a phone_number");
    }
    if let Some(u) = &p.username {
        if u.chars().count() > MAX_NAME {
            v.add(
                f("username"),
                format!("must be at most {MAX_NAME} characters"),
            );
        } else if u.chars().any(|c| c.is_whitespace() || c.is_control()) {
            v.add(
                f("username"),
                "must not contain spaces or control characters",
            );
        }
    }
    check_text(v, &f("external_id"), &p.external_id, MAX_EXTERNAL_ID);
    check_text(v, &f("display_name"), &p.display_name, MAX_NAME);
    check_text(v, &f("given_name"), &p.given_name, MAX_NAME);
    check_text(v, &f("family_name"), &p.family_name, MAX_NAME);
    if let Some(u) = &p.picture_url {
        if u.chars().count() > MAX_PICTURE_URL {
            v.add(
                f("picture_url"),
                format!("must be at most {MAX_PICTURE_URL} characters"),
            );
        } else if !(u.starts_with("https://") || u.starts_with("http://"))
            || u.len() <= "https://".len()
            || u.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            v.add(f("picture_url"), "must be an http or https URL");
        }
    }
    if let Some(l) = &p.locale
        && (l.len() > MAX_LOCALE
            || !l
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
    {
        v.add(
            f("locale"),
            "must be a BCP 47 language tag such as en-GB (at most 64 characters)",
        );
    }
    if let Some(t) = &p.timezone
        && (t.len() > MAX_LOCALE
            || !t
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_+-/".contains(&b)))
    {
        v.add(
            f("timezone"),
            "must be an IANA time zone such as Europe/Paris (at most 64 characters)",
        );
    }
    for (name, m) in [
        ("user_metadata", &p.user_metadata),
        ("app_metadata", &p.app_metadata),
    ] {
        if let Err(e) = wire::check_metadata(m) {
            v.add(f(name), e);
        }
    }
}

/// A user must stay findable: at least one unique identifier.
pub fn has_identifier(p: &Profile) -> bool {
    p.email.is_some() || p.phone_number.is_some() || p.username.is_some() || p.external_id.is_some()
}

/// Fields an update mask may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProfileField {
    ExternalId,
    Email,
    EmailVerified,
    PhoneNumber,
    PhoneVerified,
    Username,
    DisplayName,
    GivenName,
    FamilyName,
    PictureUrl,
    Locale,
    Timezone,
    UserMetadata,
    AppMetadata,
}

impl ProfileField {
    pub const ALL: [ProfileField; 14] = [
        ProfileField::ExternalId,
        ProfileField::Email,
        ProfileField::EmailVerified,
        ProfileField::PhoneNumber,
        ProfileField::PhoneVerified,
        ProfileField::Username,
        ProfileField::DisplayName,
        ProfileField::GivenName,
        ProfileField::FamilyName,
        ProfileField::PictureUrl,
        ProfileField::Locale,
        ProfileField::Timezone,
        ProfileField::UserMetadata,
        ProfileField::AppMetadata,
    ];

    pub fn name(self) -> &'static str {
        use ProfileField::*;
        match self {
            ExternalId => "external_id",
            Email => "email",
            EmailVerified => "email_verified",
            PhoneNumber => "phone_number",
            PhoneVerified => "phone_verified",
            Username => "username",
            DisplayName => "display_name",
            GivenName => "given_name",
            FamilyName => "family_name",
            PictureUrl => "picture_url",
            Locale => "locale",
            Timezone => "timezone",
            UserMetadata => "user_metadata",
            AppMetadata => "app_metadata",
        }
    }
}

/// `User`'s fields in proto order: what a read mask may name, and export's default columns.
pub const USER_FIELDS: [&str; 29] = [
    "id",
    "external_id",
    "email",
    "email_verified",
    "phone_number",
    "phone_verified",
    "username",
    "display_name",
    "given_name",
    "family_name",
    "picture_url",
    "locale",
    "timezone",
    "status",
    "user_metadata",
    "app_metadata",
    "has_password",
    "password_changed_at",
    "require_password_change",
    "enrolled_methods",
    "default_method",
    "login_count",
    "last_login_at",
    "last_login_ip",
    "locked_until",
    "blocked_reason",
    "created_at",
    "updated_at",
    "etag",
];

/// `User` fields that are output only: naming one in an update mask is an error.
pub const OUTPUT_ONLY: &[&str] = &[
    "id",
    "status",
    "has_password",
    "password_changed_at",
    "require_password_change",
    "enrolled_methods",
    "default_method",
    "login_count",
    "last_login_at",
    "last_login_ip",
    "locked_until",
    "blocked_reason",
    "created_at",
    "updated_at",
    "etag",
];

/// One path of an update mask.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MaskPath {
    Field(ProfileField),
    /// `app_metadata.a.b` (app = true) or `user_metadata.a.b`: one key, possibly nested.
    MetadataKey {
        app: bool,
        path: Vec<String>,
    },
}

/// Parses an update mask, reporting every bad path.
pub fn parse_mask(paths: &[String]) -> Result<Vec<MaskPath>, Violations> {
    let mut v = Violations::new();
    let mut out = Vec::new();
    if paths.is_empty() {
        v.add("update_mask", "must name at least one field");
    }
    for (i, p) in paths.iter().enumerate() {
        let field = format!("update_mask.paths[{i}]");
        let p = p.trim();
        if p == "*" {
            out.extend(ProfileField::ALL.iter().map(|f| MaskPath::Field(*f)));
            continue;
        }
        if let Some(f) = ProfileField::ALL.iter().find(|f| f.name() == p) {
            out.push(MaskPath::Field(*f));
            continue;
        }
        let meta = p
            .strip_prefix("app_metadata.")
            .map(|r| (true, r))
            .or_else(|| p.strip_prefix("user_metadata.").map(|r| (false, r)));
        if let Some((app, rest)) = meta {
            match wire::metadata_key_path(rest) {
                Ok(path) => out.push(MaskPath::MetadataKey { app, path }),
                Err(e) => v.add(field, format!("'{p}' {e}")),
            }
        } else if OUTPUT_ONLY.contains(&p) {
            v.add(field, format!("'{p}' is output only and cannot be updated"));
        } else {
            v.add(
                field,
                format!("'{p}' is not a field of User that can be updated"),
            );
        }
    }
    if v.is_empty() { Ok(out) } else { Err(v) }
}

/// The profile after applying `mask` with values from `given` onto `current`.
pub fn apply_mask(current: &Profile, given: &Profile, mask: &[MaskPath]) -> Profile {
    let mut p = current.clone();
    for m in mask {
        match m {
            MaskPath::Field(f) => {
                use ProfileField::*;
                match f {
                    ExternalId => p.external_id = given.external_id.clone(),
                    Email => p.email = given.email.clone(),
                    EmailVerified => p.email_verified = given.email_verified,
                    PhoneNumber => p.phone_number = given.phone_number.clone(),
                    PhoneVerified => p.phone_verified = given.phone_verified,
                    Username => p.username = given.username.clone(),
                    DisplayName => p.display_name = given.display_name.clone(),
                    GivenName => p.given_name = given.given_name.clone(),
                    FamilyName => p.family_name = given.family_name.clone(),
                    PictureUrl => p.picture_url = given.picture_url.clone(),
                    Locale => p.locale = given.locale.clone(),
                    Timezone => p.timezone = given.timezone.clone(),
                    UserMetadata => p.user_metadata = given.user_metadata.clone(),
                    AppMetadata => p.app_metadata = given.app_metadata.clone(),
                }
            }
            MaskPath::MetadataKey { app, path } => {
                let (target, source) = if *app {
                    (&mut p.app_metadata, &given.app_metadata)
                } else {
                    (&mut p.user_metadata, &given.user_metadata)
                };
                set_key_path(target, source, path);
            }
        }
    }
    let touched = |f: ProfileField| mask.contains(&MaskPath::Field(f));
    // A new email or phone is unverified unless the same update says otherwise.
    let changed = |a: &Option<String>, b: &Option<String>| {
        a.as_deref().map(str::to_lowercase) != b.as_deref().map(str::to_lowercase)
    };
    if changed(&current.email, &p.email) && !touched(ProfileField::EmailVerified) {
        p.email_verified = false;
    }
    if changed(&current.phone_number, &p.phone_number) && !touched(ProfileField::PhoneVerified) {
        p.phone_verified = false;
    }
    if p.email.is_none() {
        p.email_verified = false;
    }
    if p.phone_number.is_none() {
        p.phone_verified = false;
    }
    p
}

/// Sets `target[path]` to `source[path]`, or removes it when `source` lacks it.
fn set_key_path(target: &mut Map<String, Value>, source: &Map<String, Value>, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    // The value to set, if the source has it.
    let mut src: Option<&Map<String, Value>> = Some(source);
    for k in parents {
        src = src.and_then(|m| m.get(k)).and_then(Value::as_object);
    }
    let value = src.and_then(|m| m.get(last)).cloned();
    let mut cur = target;
    for k in parents {
        if value.is_none() {
            // Removing under a parent that is absent or not an object: nothing to do.
            match cur.get_mut(k).and_then(Value::as_object_mut) {
                Some(next) => cur = next,
                None => return,
            }
        } else {
            let entry = cur
                .entry(k.clone())
                .or_insert_with(|| Value::Object(Map::new()));
            if !entry.is_object() {
                *entry = Value::Object(Map::new());
            }
            match entry.as_object_mut() {
                Some(next) => cur = next,
                None => return,
            }
        }
    }
    match value {
        Some(v) => {
            cur.insert(last.clone(), v);
        }
        None => {
            cur.remove(last);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn email_and_phone_checks() {
        assert!(check_email("a@b.io").is_ok());
        for bad in ["", "a", "a@", "@b", "a b@c.io", "a@b.", "a@.b"] {
            assert!(check_email(bad).is_err(), "{bad}");
        }
        assert!(check_phone("+14155550123").is_ok());
        for bad in ["14155550123", "+0123", "+1", "+1234567890123456", "+1-415"] {
            assert!(check_phone(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn mask_paths() {
        let m = parse_mask(&["display_name".into(), "app_metadata.plan".into()]).unwrap();
        assert_eq!(
            m[1],
            MaskPath::MetadataKey {
                app: true,
                path: vec!["plan".into()]
            }
        );
        let err = parse_mask(&["id".into(), "nope".into(), "app_metadata.".into()]).unwrap_err();
        assert_eq!(
            err.into_result().unwrap_err().to_string(),
            "invalid request: update_mask.paths[0]: 'id' is output only and cannot be updated; \
             update_mask.paths[1]: 'nope' is not a field of User that can be updated; \
             update_mask.paths[2]: 'app_metadata.' has an empty key"
        );
        assert_eq!(
            parse_mask(&["user_metadata.`example.com/roles`.admin".into()]).unwrap(),
            [MaskPath::MetadataKey {
                app: false,
                path: vec!["example.com/roles".into(), "admin".into()]
            }]
        );
        assert!(parse_mask(&[]).is_err());
    }

    #[test]
    fn metadata_key_paths_set_and_remove() {
        let cur = Profile {
            app_metadata: json!({"plan": "free", "a": {"b": 1, "c": 2}})
                .as_object()
                .unwrap()
                .clone(),
            ..Default::default()
        };
        let given = Profile {
            app_metadata: json!({"plan": "pro"}).as_object().unwrap().clone(),
            ..Default::default()
        };
        let mask = parse_mask(&[
            "app_metadata.plan".into(),
            "app_metadata.a.b".into(),
            "app_metadata.x.y".into(),
        ])
        .unwrap();
        let out = apply_mask(&cur, &given, &mask);
        assert_eq!(
            Value::Object(out.app_metadata),
            json!({"plan": "pro", "a": {"c": 2}})
        );
    }

    #[test]
    fn changing_email_resets_verification_unless_masked() {
        let cur = Profile {
            email: Some("a@x.io".into()),
            email_verified: true,
            ..Default::default()
        };
        let given = Profile {
            email: Some("b@x.io".into()),
            email_verified: true,
            ..Default::default()
        };
        let only_email = parse_mask(&["email".into()]).unwrap();
        assert!(!apply_mask(&cur, &given, &only_email).email_verified);
        let both = parse_mask(&["email".into(), "email_verified".into()]).unwrap();
        assert!(apply_mask(&cur, &given, &both).email_verified);
        let case_only = Profile {
            email: Some("A@X.io".into()),
            ..Default::default()
        };
        assert!(apply_mask(&cur, &case_only, &only_email).email_verified);
    }
}

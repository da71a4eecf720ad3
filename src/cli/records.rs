//! The file formats of `roster import` and `roster export`: one JSON object per line (JSONL)
//! or CSV with a header row, both using `User`'s field names.
//!
//! What export writes, import reads: `id`, the profile fields, `user_metadata`/`app_metadata`
//! (objects; JSON text in CSV), `password_hash`, `created_at` (RFC 3339), `status`
//! (`PENDING_VERIFICATION`, `BLOCKED` and `DEACTIVATED` import as such), `blocked_reason`,
//! `require_password_change` and `last_login_at`. Import also takes `pending`, `blocked`, `deactivated` and `identities`
//! (an array of `{provider, subject, connection, email, profile}`; JSON text in CSV). Other
//! output-only fields (`login_count`, `etag`, ...) are ignored on import, as are keys that
//! start with `_` (the `--errors` file adds `_record` and `_error`, so it can be fixed and
//! imported again); any other key is an error naming it.
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value};

use crate::pb::v1 as pb;
use crate::users::OUTPUT_ONLY;
pub use crate::users::USER_FIELDS;
use crate::wire;

/// The file formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Jsonl,
    Csv,
}

fn time_text(t: &Option<prost_types::Timestamp>) -> Value {
    t.as_ref()
        .and_then(wire::from_timestamp)
        .map(|t| Value::String(t.to_rfc3339_opts(SecondsFormat::AutoSi, true)))
        .unwrap_or(Value::Null)
}

fn text(s: &str) -> Value {
    if s.is_empty() {
        Value::Null
    } else {
        Value::String(s.to_string())
    }
}

fn meta(s: &Option<prost_types::Struct>) -> Value {
    match s {
        Some(s) => match wire::struct_to_json(s) {
            Ok(m) => Value::Object(m),
            Err(_) => Value::Null,
        },
        None => Value::Null,
    }
}

fn authenticator_name(n: i32) -> Value {
    match pb::AuthenticatorType::try_from(n) {
        Ok(pb::AuthenticatorType::Unspecified) | Err(_) => Value::Null,
        Ok(t) => Value::String(
            t.as_str_name()
                .trim_start_matches("AUTHENTICATOR_TYPE_")
                .to_string(),
        ),
    }
}

/// One field of an exported user as JSON (`Null` when empty).
pub fn field_value(u: &pb::User, field: &str) -> Value {
    match field {
        "id" => text(&u.id),
        "external_id" => text(&u.external_id),
        "email" => text(&u.email),
        "email_verified" => Value::Bool(u.email_verified),
        "phone_number" => text(&u.phone_number),
        "phone_verified" => Value::Bool(u.phone_verified),
        "username" => text(&u.username),
        "display_name" => text(&u.display_name),
        "given_name" => text(&u.given_name),
        "family_name" => text(&u.family_name),
        "picture_url" => text(&u.picture_url),
        "locale" => text(&u.locale),
        "timezone" => text(&u.timezone),
        "status" => match pb::UserStatus::try_from(u.status) {
            Ok(pb::UserStatus::Unspecified) | Err(_) => Value::Null,
            Ok(s) => Value::String(s.as_str_name().trim_start_matches("USER_STATUS_").into()),
        },
        "user_metadata" => meta(&u.user_metadata),
        "app_metadata" => meta(&u.app_metadata),
        "has_password" => Value::Bool(u.has_password),
        "password_changed_at" => time_text(&u.password_changed_at),
        "require_password_change" => Value::Bool(u.require_password_change),
        "enrolled_methods" => Value::Array(
            u.enrolled_methods
                .iter()
                .map(|m| authenticator_name(*m))
                .collect(),
        ),
        "default_method" => authenticator_name(u.default_method),
        "login_count" => Value::from(u.login_count),
        "last_login_at" => time_text(&u.last_login_at),
        "last_login_ip" => text(&u.last_login_ip),
        "locked_until" => time_text(&u.locked_until),
        "blocked_reason" => text(&u.blocked_reason),
        "created_at" => time_text(&u.created_at),
        "updated_at" => time_text(&u.updated_at),
        "etag" => text(&u.etag),
        _ => Value::Null,
    }
}

/// An exported user as one JSON object with `columns` (nulls left out).
pub fn export_json(m: &pb::ExportUsersResponse, columns: &[String]) -> Map<String, Value> {
    let mut out = Map::new();
    let Some(u) = &m.user else { return out };
    for c in columns {
        let v = if c == "password_hash" {
            text(&m.password_hash)
        } else if c == "identities" {
            identities_json(&m.identities)
        } else if c == "authenticators" {
            authenticators_json(&m.authenticators)
        } else {
            field_value(u, c)
        };
        if !v.is_null() {
            out.insert(c.clone(), v);
        }
    }
    out
}

/// Exported identities in the shape `identities` takes them on import (null when none).
fn identities_json(list: &[pb::ImportIdentity]) -> Value {
    if list.is_empty() {
        return Value::Null;
    }
    Value::Array(
        list.iter()
            .map(|x| {
                let mut o = Map::new();
                o.insert("provider".into(), text(&x.provider));
                o.insert("subject".into(), text(&x.subject));
                for (k, v) in [("connection", &x.connection), ("email", &x.email)] {
                    if !v.is_empty() {
                        o.insert(k.into(), text(v));
                    }
                }
                if x.profile.as_ref().is_some_and(|p| !p.fields.is_empty()) {
                    o.insert("profile".into(), meta(&x.profile));
                }
                Value::Object(o)
            })
            .collect(),
    )
}

/// Exported second factors in the shape `authenticators` takes them on import (null when
/// none): the type without its prefix, bytes in standard base64.
fn authenticators_json(list: &[pb::ImportAuthenticator]) -> Value {
    use base64::Engine as _;
    if list.is_empty() {
        return Value::Null;
    }
    let b64 = |b: &[u8]| Value::String(base64::engine::general_purpose::STANDARD.encode(b));
    Value::Array(
        list.iter()
            .map(|a| {
                let mut o = Map::new();
                o.insert("type".into(), authenticator_name(a.r#type));
                if !a.name.is_empty() {
                    o.insert("name".into(), text(&a.name));
                }
                if a.is_default {
                    o.insert("is_default".into(), Value::Bool(true));
                }
                o.insert("created_at".into(), time_text(&a.created_at));
                if !a.totp_secret.is_empty() {
                    o.insert("totp_secret".into(), b64(&a.totp_secret));
                }
                if !a.recovery_code_hashes.is_empty() {
                    let hashes = a.recovery_code_hashes.iter().map(|h| b64(h)).collect();
                    o.insert("recovery_code_hashes".into(), Value::Array(hashes));
                }
                for (k, v) in [
                    ("email", &a.email),
                    ("phone_number", &a.phone_number),
                    ("aaguid", &a.aaguid),
                ] {
                    if !v.is_empty() {
                        o.insert(k.into(), text(v));
                    }
                }
                if !a.passkey.is_empty() {
                    o.insert("passkey".into(), b64(&a.passkey));
                }
                if !a.transports.is_empty() {
                    o.insert("transports".into(), a.transports.clone().into());
                }
                Value::Object(o)
            })
            .collect(),
    )
}

/// The `authenticators` of a record: as export writes them (JSON text in CSV).
fn authenticators(v: Value) -> Result<Vec<pb::ImportAuthenticator>, String> {
    use base64::Engine as _;
    let list = match as_json("authenticators", v)? {
        Value::Null => return Ok(vec![]),
        Value::Array(a) => a,
        _ => return Err("authenticators: must be an array".into()),
    };
    let b64 = |f: &str, v: &Value| {
        let t = v
            .as_str()
            .ok_or_else(|| format!("{f}: must be base64 text"))?;
        base64::engine::general_purpose::STANDARD
            .decode(t)
            .map_err(|_| format!("{f}: is not base64"))
    };
    let mut out = Vec::with_capacity(list.len());
    for (i, item) in list.into_iter().enumerate() {
        let Value::Object(obj) = item else {
            return Err(format!("authenticators[{i}]: must be an object"));
        };
        let mut a = pb::ImportAuthenticator::default();
        for (k, v) in obj {
            let f = format!("authenticators[{i}].{k}");
            match k.as_str() {
                "type" => {
                    let name = as_text(&f, v)?.unwrap_or_default();
                    let name = name.strip_prefix("AUTHENTICATOR_TYPE_").unwrap_or(&name);
                    a.r#type =
                        pb::AuthenticatorType::from_str_name(&format!("AUTHENTICATOR_TYPE_{name}"))
                            .ok_or_else(|| format!("{f}: unknown type '{name}'"))?
                            as i32;
                }
                "name" => a.name = as_text(&f, v)?.unwrap_or_default(),
                "is_default" => a.is_default = as_bool(&f, v)?,
                "created_at" => a.created_at = as_time(&f, v)?,
                "totp_secret" => a.totp_secret = b64(&f, &v)?,
                "recovery_code_hashes" => {
                    let Value::Array(hashes) = v else {
                        return Err(format!("{f}: must be an array"));
                    };
                    a.recovery_code_hashes = hashes
                        .iter()
                        .map(|h| b64(&f, h))
                        .collect::<Result<_, _>>()?;
                }
                // The codes themselves, as another system issued them (a migration that can
                // read them): hashed here as the server checks them; never sent or printed.
                "recovery_codes" => {
                    let Value::Array(codes) = v else {
                        return Err(format!("{f}: must be an array"));
                    };
                    for (j, c) in codes.iter().enumerate() {
                        let hash = c
                            .as_str()
                            .and_then(crate::authenticators::recovery::issued_hash)
                            .ok_or_else(|| {
                                format!(
                                    "{f}[{j}]: must be a code of 6 to 64 characters besides \
                                     dashes and spaces"
                                )
                            })?;
                        if !a.recovery_code_hashes.contains(&hash) {
                            a.recovery_code_hashes.push(hash);
                        }
                    }
                }
                "email" => a.email = as_text(&f, v)?.unwrap_or_default(),
                "phone_number" => a.phone_number = as_text(&f, v)?.unwrap_or_default(),
                "passkey" => a.passkey = b64(&f, &v)?,
                "aaguid" => a.aaguid = as_text(&f, v)?.unwrap_or_default(),
                "transports" => {
                    let Value::Array(list) = v else {
                        return Err(format!("{f}: must be an array"));
                    };
                    a.transports = list
                        .iter()
                        .map(|t| t.as_str().map(str::to_string))
                        .collect::<Option<_>>()
                        .ok_or_else(|| format!("{f}: must be an array of text"))?;
                }
                _ => return Err(format!("{f}: unknown field")),
            }
        }
        out.push(a);
    }
    Ok(out)
}

/// A JSON value as a CSV cell: strings as they are, objects and arrays as JSON text.
pub fn cell(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        other => other.to_string(),
    }
}

fn as_text(field: &str, v: Value) -> Result<Option<String>, String> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) if s.is_empty() => Ok(None),
        Value::String(s) => Ok(Some(s)),
        Value::Number(n) => Ok(Some(n.to_string())),
        _ => Err(format!("{field}: must be a string")),
    }
}

pub(super) fn as_bool(field: &str, v: Value) -> Result<bool, String> {
    match v {
        Value::Null => Ok(false),
        Value::Bool(b) => Ok(b),
        // SQLite's and MySQL's booleans, as their JSON output writes them.
        Value::Number(n) if n.as_u64() == Some(0) => Ok(false),
        Value::Number(n) if n.as_u64() == Some(1) => Ok(true),
        Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "" | "false" | "0" | "no" => Ok(false),
            "true" | "1" | "yes" => Ok(true),
            _ => Err(format!("{field}: must be true or false")),
        },
        _ => Err(format!("{field}: must be true or false")),
    }
}

/// A JSON value, or JSON text in a string (CSV cells).
pub(super) fn as_json(field: &str, v: Value) -> Result<Value, String> {
    match v {
        Value::String(s) if s.trim().is_empty() => Ok(Value::Null),
        Value::String(s) => {
            serde_json::from_str(&s).map_err(|e| format!("{field}: is not valid JSON: {e}"))
        }
        other => Ok(other),
    }
}

fn as_struct(field: &str, v: Value) -> Result<Option<prost_types::Struct>, String> {
    match as_json(field, v)? {
        Value::Null => Ok(None),
        Value::Object(m) => Ok(Some(wire::json_to_struct(&m))),
        _ => Err(format!("{field}: must be a JSON object")),
    }
}

fn as_time(field: &str, v: Value) -> Result<Option<prost_types::Timestamp>, String> {
    match as_text(field, v)? {
        None => Ok(None),
        Some(s) => DateTime::parse_from_rfc3339(s.trim())
            .map(|t| Some(wire::timestamp(t.with_timezone(&Utc))))
            .map_err(|_| format!("{field}: must be an RFC 3339 time such as 2024-01-31T12:00:00Z")),
    }
}

fn identities(v: Value) -> Result<Vec<pb::ImportIdentity>, String> {
    let list = match as_json("identities", v)? {
        Value::Null => return Ok(vec![]),
        Value::Array(a) => a,
        _ => return Err("identities: must be an array".into()),
    };
    let mut out = Vec::with_capacity(list.len());
    for (i, item) in list.into_iter().enumerate() {
        let Value::Object(obj) = item else {
            return Err(format!("identities[{i}]: must be an object"));
        };
        let mut x = pb::ImportIdentity::default();
        for (k, v) in obj {
            let f = format!("identities[{i}].{k}");
            match k.as_str() {
                "provider" => x.provider = as_text(&f, v)?.unwrap_or_default(),
                "subject" => x.subject = as_text(&f, v)?.unwrap_or_default(),
                "connection" => x.connection = as_text(&f, v)?.unwrap_or_default(),
                "email" => x.email = as_text(&f, v)?.unwrap_or_default(),
                "profile" => x.profile = as_struct(&f, v)?,
                _ => return Err(format!("{f}: unknown field")),
            }
        }
        out.push(x);
    }
    Ok(out)
}

/// A file record (a JSON object, or a CSV row as strings by column) as an import record.
pub fn import_record(obj: Map<String, Value>) -> Result<pb::ImportRecord, String> {
    let mut r = pb::ImportRecord::default();
    let mut u = pb::User::default();
    let mut pending: Option<bool> = None;
    // The status an export writes, as the state flags the record carries.
    let mut status = String::new();
    for (k, v) in obj {
        let s = |v: Value| as_text(&k, v).map(Option::unwrap_or_default);
        match k.as_str() {
            "id" | "user_id" => r.user_id = s(v)?,
            "external_id" => u.external_id = s(v)?,
            "email" => u.email = s(v)?,
            "email_verified" => u.email_verified = as_bool(&k, v)?,
            "phone_number" => u.phone_number = s(v)?,
            "phone_verified" => u.phone_verified = as_bool(&k, v)?,
            "username" => u.username = s(v)?,
            "display_name" => u.display_name = s(v)?,
            "given_name" => u.given_name = s(v)?,
            "family_name" => u.family_name = s(v)?,
            "picture_url" => u.picture_url = s(v)?,
            "locale" => u.locale = s(v)?,
            "timezone" => u.timezone = s(v)?,
            "user_metadata" => u.user_metadata = as_struct(&k, v)?,
            "app_metadata" => u.app_metadata = as_struct(&k, v)?,
            "password_hash" => r.password_hash = s(v)?,
            "created_at" => r.created_at = as_time(&k, v)?,
            "last_login_at" => r.last_login_at = as_time(&k, v)?,
            "pending" => pending = Some(as_bool(&k, v)?),
            "blocked" => r.blocked = as_bool(&k, v)?,
            "deactivated" => r.deactivated = as_bool(&k, v)?,
            "blocked_reason" => r.blocked_reason = s(v)?,
            "require_password_change" => r.require_password_change = as_bool(&k, v)?,
            "status" => status = s(v)?.trim_start_matches("USER_STATUS_").to_string(),
            "identities" => r.identities = identities(v)?,
            "authenticators" => r.authenticators = authenticators(v)?,
            // Output-only fields an export writes (id, status, created_at are read above).
            other if other.starts_with('_') || OUTPUT_ONLY.contains(&other) => {}
            other => return Err(format!("unknown field '{other}'")),
        }
    }
    match status.as_str() {
        "" | "ACTIVE" => {}
        "PENDING_VERIFICATION" => r.pending = true,
        "BLOCKED" => r.blocked = true,
        "DEACTIVATED" => r.deactivated = true,
        other => return Err(format!("status: unknown status '{other}'")),
    }
    if let Some(p) = pending {
        r.pending = p;
    }
    r.user = Some(u);
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn json_and_csv_shaped_records_read_alike() {
        let typed = import_record(obj(json!({
            "id": "0190d6a0-0000-7000-8000-000000000001",
            "email": "a@x.io", "email_verified": true,
            "app_metadata": {"plan": "pro"},
            "identities": [{"provider": "google", "subject": "1"}],
            "created_at": "2020-01-02T03:04:05.123456Z",
            "status": "PENDING_VERIFICATION", "login_count": 4, "_error": "ignored"
        })))
        .unwrap();
        let csv = import_record(obj(json!({
            "id": "0190d6a0-0000-7000-8000-000000000001",
            "email": "a@x.io", "email_verified": "true",
            "app_metadata": "{\"plan\": \"pro\"}",
            "identities": "[{\"provider\": \"google\", \"subject\": \"1\"}]",
            "created_at": "2020-01-02T03:04:05.123456+00:00",
            "status": "PENDING_VERIFICATION", "login_count": "4", "phone_number": ""
        })))
        .unwrap();
        assert_eq!(typed, csv);
        assert!(typed.pending);
        assert_eq!(typed.created_at.unwrap().nanos, 123_456_000);
    }

    #[test]
    fn an_exported_users_state_imports_as_such() {
        let r = import_record(obj(json!({
            "email": "a@x.io", "status": "BLOCKED", "blocked_reason": "chargebacks",
            "require_password_change": true,
        })))
        .unwrap();
        assert!(r.blocked && !r.deactivated && !r.pending && r.require_password_change);
        assert_eq!(r.blocked_reason, "chargebacks");
        let r = import_record(obj(
            json!({"email": "a@x.io", "status": "USER_STATUS_DEACTIVATED",
                                         "require_password_change": "false"}),
        ))
        .unwrap();
        assert!(r.deactivated && !r.blocked && !r.require_password_change);
        let r = import_record(obj(json!({"email": "a@x.io", "status": "ACTIVE"}))).unwrap();
        assert!(!r.blocked && !r.deactivated && !r.pending);
        let e = import_record(obj(json!({"status": "SUSPENDED"}))).unwrap_err();
        assert_eq!(e, "status: unknown status 'SUSPENDED'");
    }

    #[test]
    fn authenticators_read_as_export_writes_them() {
        let r = import_record(obj(json!({
            "email": "a@x.io",
            "authenticators": [{"type": "TOTP", "totp_secret": "c2VlZHNlZWRzZWVk", "is_default": true},
                               {"type": "AUTHENTICATOR_TYPE_RECOVERY_CODES",
                                "recovery_code_hashes": ["AAAA"]}],
        })))
        .unwrap();
        assert_eq!(r.authenticators[0].totp_secret, b"seedseedseed");
        assert!(r.authenticators[0].is_default);
        assert_eq!(r.authenticators[1].recovery_code_hashes, [vec![0u8, 0, 0]]);
        // Codes another system issued, hashed here as issued (a repeat once); a bad one
        // fails the record without showing it.
        let r = import_record(obj(json!({
            "email": "a@x.io",
            "authenticators": [{"type": "RECOVERY_CODES",
                                "recovery_codes": ["AbCdE-12345", "abcd 1234", "AbCdE12345"]}],
        })))
        .unwrap();
        let issued = crate::authenticators::recovery::issued_hash;
        assert_eq!(
            r.authenticators[0].recovery_code_hashes,
            [issued("AbCdE12345").unwrap(), issued("abcd1234").unwrap()]
        );
        let e = import_record(obj(json!({"email": "a@x.io",
            "authenticators": [{"type": "RECOVERY_CODES", "recovery_codes": ["abc"]}]})))
        .unwrap_err();
        assert!(
            e.starts_with("authenticators[0].recovery_codes[0]: must be a code"),
            "{e}"
        );
        assert!(!e.contains("abc\""), "{e}");
        // What export writes, import reads back the same, passkeys included.
        let factors = vec![
            pb::ImportAuthenticator {
                r#type: pb::AuthenticatorType::Passkey as i32,
                name: "Laptop".into(),
                is_default: true,
                passkey: b"{\"cred\":{}}".to_vec(),
                aaguid: "ea9b8d66-4d01-1d21-3ce4-b6b48cb575d4".into(),
                transports: vec!["usb".into(), "nfc".into()],
                ..Default::default()
            },
            pb::ImportAuthenticator {
                r#type: pb::AuthenticatorType::SmsOtp as i32,
                phone_number: "+14155550123".into(),
                ..Default::default()
            },
        ];
        let m = pb::ExportUsersResponse {
            user: Some(pb::User {
                email: "a@x.io".into(),
                ..Default::default()
            }),
            authenticators: factors.clone(),
            ..Default::default()
        };
        let columns = ["email".to_string(), "authenticators".to_string()];
        let back = import_record(export_json(&m, &columns)).unwrap();
        assert_eq!(back.authenticators, factors);
        for (bad, says) in [
            (
                json!([{"type": "FINGERPRINT"}]),
                "unknown type 'FINGERPRINT'",
            ),
            (
                json!([{"type": "TOTP", "totp_secret": "not base64!"}]),
                "is not base64",
            ),
            (
                json!([{"type": "TOTP", "seed": "AAAA"}]),
                "authenticators[0].seed: unknown field",
            ),
            (json!({"type": "TOTP"}), "must be an array"),
        ] {
            let e = import_record(obj(json!({"authenticators": bad.clone()}))).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn bad_fields_are_named() {
        let e = import_record(obj(json!({"emial": "a@x.io"}))).unwrap_err();
        assert_eq!(e, "unknown field 'emial'");
        let e = import_record(obj(json!({"email_verified": "maybe"}))).unwrap_err();
        assert!(e.starts_with("email_verified"));
        let e = import_record(obj(json!({"created_at": "yesterday"}))).unwrap_err();
        assert!(e.starts_with("created_at"));
        let e = import_record(obj(json!({"app_metadata": "[1]"}))).unwrap_err();
        assert!(e.starts_with("app_metadata"));
    }

    #[test]
    fn export_columns_leave_out_empty_values() {
        let m = pb::ExportUsersResponse {
            user: Some(pb::User {
                id: "u1".into(),
                email: "a@x.io".into(),
                status: pb::UserStatus::Active as i32,
                enrolled_methods: vec![pb::AuthenticatorType::Password as i32],
                ..Default::default()
            }),
            password_hash: String::new(),
            identities: vec![],
            authenticators: vec![],
        };
        let cols: Vec<String> = [
            "id",
            "email",
            "username",
            "status",
            "enrolled_methods",
            "password_hash",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            Value::Object(export_json(&m, &cols)),
            json!({"id": "u1", "email": "a@x.io", "status": "ACTIVE", "enrolled_methods": ["PASSWORD"]})
        );
        assert_eq!(cell(&json!({"a": 1})), "{\"a\":1}");
    }
}

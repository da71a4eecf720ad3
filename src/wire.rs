//! Conversions between well-known protobuf types and domain types, shared by every
//! `grpc.rs`: `Struct` ↔ JSON object, `Timestamp` ↔ `DateTime<Utc>`, id strings ↔ `Uuid`.
use chrono::{DateTime, Utc};
use prost_types::value::Kind;
use serde_json::{Map, Number, Value};
use uuid::Uuid;

/// Limits on metadata objects (API.md): serialised size and nesting depth.
pub const METADATA_MAX_BYTES: usize = 16 * 1024;
pub const METADATA_MAX_DEPTH: usize = 8;

/// The longest metadata key a mask or filter path may name.
pub const METADATA_MAX_KEY_CHARS: usize = 256;

/// Parses the key path after `app_metadata.` / `user_metadata.` in an update mask or filter:
/// keys separated by dots, each plain or, when it holds anything else (a dot, a dash, a
/// slash...), wrapped in backticks as AIP-161 escapes map keys, with a literal backtick
/// doubled: `` `example.com/role`.admin `` is the key `example.com/role`, then `admin`.
/// The error text suits a field violation.
pub fn metadata_key_path(rest: &str) -> Result<Vec<String>, String> {
    let mut keys = Vec::new();
    let mut chars = rest.chars().peekable();
    loop {
        let mut key = String::new();
        if chars.peek() == Some(&'`') {
            chars.next();
            loop {
                match chars.next() {
                    Some('`') if chars.peek() == Some(&'`') => {
                        chars.next();
                        key.push('`');
                    }
                    Some('`') => break,
                    Some(c) => key.push(c),
                    None => return Err("has a backtick-quoted key that is not closed".into()),
                }
            }
            if !matches!(chars.peek(), None | Some('.')) {
                return Err(
                    "has text after a backtick-quoted key (expected '.' or the end)".into(),
                );
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == '.' {
                    break;
                }
                if c == '`' {
                    return Err("has a backtick inside a key: quote the whole key".into());
                }
                key.push(c);
                chars.next();
            }
        }
        if key.is_empty() {
            return Err("has an empty key".into());
        }
        if key.chars().count() > METADATA_MAX_KEY_CHARS {
            return Err(format!(
                "has a key longer than {METADATA_MAX_KEY_CHARS} characters"
            ));
        }
        keys.push(key);
        if keys.len() > METADATA_MAX_DEPTH {
            return Err(format!(
                "is deeper than metadata nests ({METADATA_MAX_DEPTH} levels)"
            ));
        }
        // Anything left starts with the '.' before the next key.
        if chars.next().is_none() {
            return Ok(keys);
        }
    }
}

pub fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

pub fn opt_timestamp(t: Option<DateTime<Utc>>) -> Option<prost_types::Timestamp> {
    t.map(timestamp)
}

/// A Timestamp as a time, if it is a valid one.
pub fn from_timestamp(t: &prost_types::Timestamp) -> Option<DateTime<Utc>> {
    if !(0..1_000_000_000).contains(&t.nanos) {
        return None;
    }
    DateTime::from_timestamp(t.seconds, t.nanos as u32)
}

/// Parses a required id; the error text suits a field violation.
pub fn parse_id(s: &str) -> Result<Uuid, String> {
    if s.is_empty() {
        return Err("is required".into());
    }
    Uuid::try_parse(s).map_err(|_| "must be a UUID".to_string())
}

/// A `Struct` as a JSON object, enforcing the depth limit and JSON's rules (finite numbers,
/// no NUL characters, which PostgreSQL cannot store).
pub fn struct_to_json(s: &prost_types::Struct) -> Result<Map<String, Value>, String> {
    fields_to_json(s, 1)
}

fn fields_to_json(s: &prost_types::Struct, depth: usize) -> Result<Map<String, Value>, String> {
    if depth > METADATA_MAX_DEPTH {
        return Err(format!("nesting deeper than {METADATA_MAX_DEPTH} levels"));
    }
    let mut map = Map::with_capacity(s.fields.len());
    for (k, v) in &s.fields {
        if k.contains('\0') {
            return Err("keys must not contain NUL characters".into());
        }
        map.insert(k.clone(), value_to_json(v, depth)?);
    }
    Ok(map)
}

fn value_to_json(v: &prost_types::Value, depth: usize) -> Result<Value, String> {
    Ok(match &v.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(*b),
        Some(Kind::NumberValue(n)) => number(*n).ok_or("numbers must be finite")?,
        Some(Kind::StringValue(s)) => {
            if s.contains('\0') {
                return Err("strings must not contain NUL characters".into());
            }
            Value::String(s.clone())
        }
        Some(Kind::StructValue(s)) => Value::Object(fields_to_json(s, depth + 1)?),
        Some(Kind::ListValue(l)) => {
            if depth + 1 > METADATA_MAX_DEPTH {
                return Err(format!("nesting deeper than {METADATA_MAX_DEPTH} levels"));
            }
            Value::Array(
                l.values
                    .iter()
                    .map(|v| value_to_json(v, depth + 1))
                    .collect::<Result<_, _>>()?,
            )
        }
    })
}

/// Integral values within f64's exact range become JSON integers ("5", not "5.0").
fn number(n: f64) -> Option<Value> {
    if n.fract() == 0.0 && n.abs() < 9_007_199_254_740_992.0 {
        Some(Value::Number(Number::from(n as i64)))
    } else {
        Number::from_f64(n).map(Value::Number)
    }
}

pub fn json_to_struct(map: &Map<String, Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: map
            .iter()
            .map(|(k, v)| (k.clone(), json_to_value(v)))
            .collect(),
    }
}

pub fn json_to_value(v: &Value) -> prost_types::Value {
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(json_to_value).collect(),
        }),
        Value::Object(o) => Kind::StructValue(json_to_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

/// Counts what is written (sizes without building the serialised text).
struct ByteCount(usize);

impl std::io::Write for ByteCount {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Checks a metadata object against the size limit.
fn check_metadata_size(map: &Map<String, Value>) -> Result<(), String> {
    let mut count = ByteCount(0);
    let size = serde_json::to_writer(&mut count, map)
        .map(|_| count.0)
        .unwrap_or(usize::MAX);
    if size > METADATA_MAX_BYTES {
        return Err(format!(
            "is {size} bytes serialised; the limit is {METADATA_MAX_BYTES}"
        ));
    }
    Ok(())
}

/// Checks a metadata-like object against the size and depth limits.
pub fn check_metadata(map: &Map<String, Value>) -> Result<(), String> {
    check_metadata_size(map)?;
    if 1 + map.values().map(json_depth).max().unwrap_or(0) > METADATA_MAX_DEPTH {
        return Err(format!("nesting deeper than {METADATA_MAX_DEPTH} levels"));
    }
    Ok(())
}

/// Depth of a JSON value (an object or array counts one level).
pub fn json_depth(v: &Value) -> usize {
    match v {
        Value::Object(m) => 1 + m.values().map(json_depth).max().unwrap_or(0),
        Value::Array(a) => 1 + a.iter().map(json_depth).max().unwrap_or(0),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_key_paths_plain_and_quoted() {
        let ok = |s: &str| metadata_key_path(s).unwrap();
        assert_eq!(ok("plan"), ["plan"]);
        assert_eq!(ok("a.b"), ["a", "b"]);
        assert_eq!(ok("`plan-id`"), ["plan-id"]);
        assert_eq!(
            ok("`example.com/role`.admin"),
            ["example.com/role", "admin"]
        );
        assert_eq!(ok("a.`b.c`"), ["a", "b.c"]);
        assert_eq!(ok("`it``s`"), ["it`s"]);
        assert_eq!(ok("planId"), ["planId"]);
        let err = |s: &str| metadata_key_path(s).unwrap_err();
        assert!(err("").contains("empty key"));
        assert!(err("a.").contains("empty key"));
        assert!(err("a..b").contains("empty key"));
        assert!(err("``").contains("empty key"));
        assert!(err("`open").contains("not closed"));
        assert!(err("`a`b").contains("after a backtick"));
        assert!(err("a`b`").contains("inside a key"));
        assert!(err(&["k"; 9].join(".")).contains("deeper"));
        assert!(err(&"x".repeat(257)).contains("longer"));
        assert_eq!(ok(&["k"; 8].join(".")).len(), 8);
    }

    #[test]
    fn struct_round_trip_keeps_integers_integral() {
        let json = serde_json::json!({"plan": "pro", "seats": 5, "ratio": 0.5, "tags": ["a", null], "nested": {"ok": true}});
        let map = json.as_object().unwrap().clone();
        let back = struct_to_json(&json_to_struct(&map)).unwrap();
        assert_eq!(Value::Object(back), json);
    }

    #[test]
    fn too_deep_is_rejected() {
        let mut v = serde_json::json!(1);
        for _ in 0..9 {
            v = serde_json::json!({ "k": v });
        }
        let s = json_to_struct(v.as_object().unwrap());
        assert!(struct_to_json(&s).is_err());
    }

    #[test]
    fn non_finite_numbers_are_rejected() {
        let mut s = prost_types::Struct::default();
        s.fields.insert(
            "n".into(),
            prost_types::Value {
                kind: Some(Kind::NumberValue(f64::NAN)),
            },
        );
        assert!(struct_to_json(&s).is_err());
    }
}

//! `order_by` parsing (AIP-132), keyset cursors and opaque page tokens (AIP-158).
//!
//! A page token holds the sort values and id of the last row served, plus a fingerprint of
//! the filter, query and order it was made with. The next page is "rows after that key",
//! which an index answers directly: page 10,000 costs what page 1 costs, and rows inserted
//! meanwhile never shift what was already served (nothing is skipped or repeated). NULL sort
//! values (e.g. a user who never signed in) come last in either direction.
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio_postgres::Row;
use uuid::Uuid;

use super::sql::Sql;

pub const DEFAULT_PAGE_SIZE: i64 = 50;
pub const MAX_PAGE_SIZE: i64 = 1000;

/// Splits rows fetched with one extra (see the stores' `list`) into the page and the token of
/// the next one (empty on the last page).
pub fn split_page<T>(
    mut rows: Vec<(T, Cursor)>,
    limit: i64,
    fingerprint: &str,
) -> (Vec<T>, String) {
    let more = rows.len() as i64 > limit;
    rows.truncate(limit.max(0) as usize);
    let token = match (more, rows.last()) {
        (true, Some((_, cursor))) => encode_token(cursor, fingerprint),
        _ => String::new(),
    };
    (rows.into_iter().map(|(item, _)| item).collect(), token)
}

/// AIP-158: 0 means the default, above the maximum is coerced, negative is an error.
pub fn page_size(requested: i32) -> Result<i64, String> {
    match requested {
        n if n < 0 => Err("must not be negative".into()),
        0 => Ok(DEFAULT_PAGE_SIZE),
        n => Ok(i64::from(n).min(MAX_PAGE_SIZE)),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SortKind {
    Time,
    Text,
}

/// A field that results can be ordered by.
#[derive(Clone, Copy, Debug)]
pub struct OrderField {
    pub name: &'static str,
    pub sql: &'static str,
    pub nullable: bool,
    pub kind: SortKind,
}

/// A parsed `order_by`: fields with their direction; the id breaks ties.
#[derive(Clone, Debug)]
pub struct Order {
    pub fields: Vec<(OrderField, bool)>,
}

/// Parses "a, b desc" against the allowed fields; empty means `default`.
pub fn parse_order(s: &str, allowed: &[OrderField], default: &str) -> Result<Order, String> {
    let s = if s.trim().is_empty() { default } else { s };
    let mut fields: Vec<(OrderField, bool)> = Vec::new();
    for part in s.split(',') {
        let words: Vec<&str> = part.split_whitespace().collect();
        let (name, desc) = match words.as_slice() {
            [name] => (*name, false),
            [name, dir] if dir.eq_ignore_ascii_case("desc") => (*name, true),
            [name, dir] if dir.eq_ignore_ascii_case("asc") => (*name, false),
            _ => {
                return Err(format!(
                    "'{}' is not '<field>' or '<field> desc'",
                    part.trim()
                ));
            }
        };
        let f = allowed.iter().find(|f| f.name == name).ok_or_else(|| {
            let names: Vec<&str> = allowed.iter().map(|f| f.name).collect();
            format!("cannot order by '{name}'; use one of: {}", names.join(", "))
        })?;
        if fields.iter().any(|(g, _)| g.name == f.name) {
            return Err(format!("'{name}' is given twice"));
        }
        fields.push((*f, desc));
    }
    Ok(Order { fields })
}

/// One sort value of the last row of a page.
#[derive(Clone, Debug, PartialEq)]
pub enum SortValue {
    Time(Option<DateTime<Utc>>),
    Text(Option<String>),
}

/// Where the next page starts.
#[derive(Clone, Debug, PartialEq)]
pub struct Cursor {
    pub values: Vec<SortValue>,
    pub id: Uuid,
}

impl Order {
    fn id_desc(&self) -> bool {
        self.fields.last().is_some_and(|(_, d)| *d)
    }

    /// A canonical text of the order, for fingerprints.
    pub fn canonical(&self) -> String {
        let parts: Vec<String> = self
            .fields
            .iter()
            .map(|(f, d)| format!("{}{}", f.name, if *d { " desc" } else { "" }))
            .collect();
        parts.join(",")
    }

    /// `, <expr> AS sort0, ...`: the sort values selected with each row (read back by
    /// [`Order::cursor_of`] from column `first` on).
    pub fn select_sql(&self) -> String {
        self.fields
            .iter()
            .enumerate()
            .map(|(i, (f, _))| format!(", {} AS sort{i}", f.sql))
            .collect()
    }

    pub fn order_by_sql(&self, id_col: &str) -> String {
        let mut parts: Vec<String> = self
            .fields
            .iter()
            .map(|(f, d)| format!("{} {} NULLS LAST", f.sql, if *d { "DESC" } else { "ASC" }))
            .collect();
        parts.push(format!(
            "{id_col} {}",
            if self.id_desc() { "DESC" } else { "ASC" }
        ));
        parts.join(", ")
    }

    /// The cursor of a row whose sort values start at column `first`.
    pub fn cursor_of(&self, row: &Row, first: usize, id: Uuid) -> Cursor {
        let values = self
            .fields
            .iter()
            .enumerate()
            .map(|(i, (f, _))| match f.kind {
                SortKind::Time => SortValue::Time(row.get(first + i)),
                SortKind::Text => SortValue::Text(row.get(first + i)),
            })
            .collect();
        Cursor { values, id }
    }

    /// A condition selecting the rows after `cursor` in this order.
    pub fn after_sql(&self, cursor: &Cursor, id_col: &str, sql: &mut Sql) -> String {
        let same_dir = self.fields.iter().all(|(_, d)| *d == self.id_desc());
        let any_null = self.fields.iter().any(|(f, _)| f.nullable);
        if same_dir && !any_null {
            // Row comparison: one index range scan.
            let mut lhs: Vec<String> = self.fields.iter().map(|(f, _)| f.sql.to_string()).collect();
            let mut rhs: Vec<String> = cursor.values.iter().map(|v| bind(v, sql)).collect();
            lhs.push(id_col.to_string());
            rhs.push(sql.param(cursor.id));
            let op = if self.id_desc() { "<" } else { ">" };
            return format!("({}) {op} ({})", lhs.join(", "), rhs.join(", "));
        }
        // General form: after(i) = gt(i) OR (eq(i) AND after(i+1)), ending with the id.
        let mut cond = format!(
            "{id_col} {} {}",
            if self.id_desc() { "<" } else { ">" },
            sql.param(cursor.id)
        );
        for ((f, desc), v) in self.fields.iter().zip(&cursor.values).rev() {
            let (gt, eq) = match v {
                SortValue::Time(None) | SortValue::Text(None) => {
                    ("FALSE".to_string(), format!("{} IS NULL", f.sql))
                }
                _ => {
                    let p = bind(v, sql);
                    let op = if *desc { "<" } else { ">" };
                    let gt = if f.nullable {
                        format!("({} {op} {p} OR {} IS NULL)", f.sql, f.sql)
                    } else {
                        format!("{} {op} {p}", f.sql)
                    };
                    (gt, format!("{} = {p}", f.sql))
                }
            };
            cond = format!("({gt} OR ({eq} AND {cond}))");
        }
        cond
    }
}

fn bind(v: &SortValue, sql: &mut Sql) -> String {
    match v {
        SortValue::Time(Some(t)) => sql.param(*t),
        SortValue::Text(Some(s)) => sql.param(s.clone()),
        SortValue::Time(None) => "NULL::timestamptz".into(),
        SortValue::Text(None) => "NULL::text".into(),
    }
}

/// A short digest of everything a token is bound to.
pub fn fingerprint(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    hex::encode(&h.finalize()[..8])
}

#[derive(Serialize, Deserialize)]
struct TokenBody {
    f: String,
    k: Vec<Value>,
    i: Uuid,
}

pub fn encode_token(cursor: &Cursor, fingerprint: &str) -> String {
    let k = cursor
        .values
        .iter()
        .map(|v| match v {
            SortValue::Time(t) => t
                .map(|t| Value::from(t.timestamp_micros()))
                .unwrap_or(Value::Null),
            SortValue::Text(s) => s.clone().map(Value::from).unwrap_or(Value::Null),
        })
        .collect();
    let body = TokenBody {
        f: fingerprint.to_string(),
        k,
        i: cursor.id,
    };
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(&body).unwrap_or_default())
}

/// Decodes a token made by [`encode_token`] for the same fingerprint and order.
pub fn decode_token(token: &str, fingerprint: &str, order: &Order) -> Result<Cursor, String> {
    let invalid = || "is not a valid page token".to_string();
    if token.len() > 4096 {
        return Err(invalid());
    }
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
    let body: TokenBody = serde_json::from_slice(&bytes).map_err(|_| invalid())?;
    if body.f != fingerprint {
        return Err("was made for a different filter, query or order_by".into());
    }
    if body.k.len() != order.fields.len() {
        return Err(invalid());
    }
    let values = order
        .fields
        .iter()
        .zip(body.k)
        .map(|((f, _), v)| match (f.kind, v) {
            (_, Value::Null) if f.nullable => Ok(if f.kind == SortKind::Time {
                SortValue::Time(None)
            } else {
                SortValue::Text(None)
            }),
            (SortKind::Time, Value::Number(n)) => n
                .as_i64()
                .and_then(DateTime::from_timestamp_micros)
                .map(|t| SortValue::Time(Some(t)))
                .ok_or_else(invalid),
            (SortKind::Text, Value::String(s)) => Ok(SortValue::Text(Some(s))),
            _ => Err(invalid()),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Cursor { values, id: body.i })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIELDS: &[OrderField] = &[
        OrderField {
            name: "created_at",
            sql: "created_at",
            nullable: false,
            kind: SortKind::Time,
        },
        OrderField {
            name: "email",
            sql: "lower(email)",
            nullable: true,
            kind: SortKind::Text,
        },
    ];

    #[test]
    fn order_parsing() {
        let o = parse_order("email desc, created_at", FIELDS, "created_at").unwrap();
        assert_eq!(o.canonical(), "email desc,created_at");
        assert!(parse_order("password", FIELDS, "created_at").is_err());
        assert!(parse_order("email sideways", FIELDS, "created_at").is_err());
        assert!(parse_order("email, email", FIELDS, "created_at").is_err());
        assert_eq!(
            parse_order("", FIELDS, "created_at").unwrap().canonical(),
            "created_at"
        );
    }

    #[test]
    fn tokens_round_trip_and_are_bound_to_their_fingerprint() {
        let o = parse_order("email, created_at desc", FIELDS, "created_at").unwrap();
        let c = Cursor {
            values: vec![
                SortValue::Text(None),
                SortValue::Time(DateTime::from_timestamp_micros(1_700_000_000_123_456)),
            ],
            id: Uuid::now_v7(),
        };
        let t = encode_token(&c, "abc");
        assert_eq!(decode_token(&t, "abc", &o).unwrap(), c);
        assert!(decode_token(&t, "abd", &o).is_err());
        assert!(decode_token("garbage!", "abc", &o).is_err());
    }

    #[test]
    fn page_sizes() {
        assert_eq!(page_size(0).unwrap(), 50);
        assert_eq!(page_size(5000).unwrap(), 1000);
        assert!(page_size(-1).is_err());
    }
}

//! Turns a parsed filter into a parameterised SQL condition over a whitelist of fields.
//!
//! Architecture invariant: no user-supplied text is ever spliced into SQL. Field names map to
//! fixed SQL expressions from a whitelist; every literal becomes a `$n` parameter.
use chrono::{DateTime, Utc};
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::filter::{Expr, FilterError, Literal, Op};

/// SQL text with its parameters, built up piece by piece.
#[derive(Default)]
pub struct Sql {
    pub text: String,
    params: Vec<Box<dyn ToSql + Sync + Send>>,
}

impl Sql {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a parameter and returns its placeholder (`$n`).
    pub fn param<T: ToSql + Sync + Send + 'static>(&mut self, value: T) -> String {
        self.params.push(Box::new(value));
        format!("${}", self.params.len())
    }

    pub fn push(&mut self, s: &str) {
        self.text.push_str(s);
    }

    pub fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.params
            .iter()
            .map(|p| p.as_ref() as &(dyn ToSql + Sync))
            .collect()
    }
}

/// What a filterable field holds, which decides the operators and literals it takes.
#[derive(Clone, Copy)]
pub enum FieldKind {
    Uuid,
    /// Text; `ci` fields compare case-insensitively (the SQL expression is already lowered).
    Text {
        ci: bool,
    },
    Bool,
    Timestamp,
    Int,
    /// An enum stored as its number; the function maps a value name to it.
    Enum(fn(&str) -> Option<i16>),
    /// An enum stored as its name; the function maps a value name to the stored one.
    Name(fn(&str) -> Option<&'static str>),
    /// A list of enum numbers (a smallint[] expression), matched with `:` only (AIP-160's
    /// "has" on a repeated field): `x:VALUE` contains it, `x:*` is not empty.
    EnumList(fn(&str) -> Option<i16>),
    /// Rows of another table linked to the row filtered (`rows`, a subquery selecting them),
    /// matched with `:` only, as a list of their `column`: `x:"v"` has one whose column is v,
    /// `x:*` has any.
    Linked {
        rows: &'static str,
        column: &'static str,
    },
    /// A jsonb column, addressed with a key path.
    Json,
}

/// A resolved field: its SQL expression, kind, and (for JSON) the key path inside it.
pub struct Field {
    pub sql: &'static str,
    pub kind: FieldKind,
    pub path: Vec<String>,
}

/// Maps a filter field name to a [`Field`], or explains why it cannot be filtered on.
pub type Resolver = fn(&str) -> Result<Field, String>;

/// Parses a filter and checks it against `resolve` (unknown fields, bad literals), so a bad
/// filter is reported before any query runs.
pub fn parse_filter(input: &str, resolve: Resolver) -> Result<Option<Expr>, FilterError> {
    let parsed = crate::query::filter::parse(input)?;
    if let Some(expr) = &parsed {
        compile(expr, resolve, &mut Sql::new())?;
    }
    Ok(parsed)
}

/// Compiles `expr` into a SQL boolean expression appended to `sql`.
pub fn compile(expr: &Expr, resolve: Resolver, sql: &mut Sql) -> Result<(), FilterError> {
    match expr {
        Expr::And(parts) | Expr::Or(parts) => {
            let joiner = if matches!(expr, Expr::And(_)) {
                " AND "
            } else {
                " OR "
            };
            sql.push("(");
            for (i, part) in parts.iter().enumerate() {
                if i > 0 {
                    sql.push(joiner);
                }
                compile(part, resolve, sql)?;
            }
            sql.push(")");
        }
        Expr::Not(inner) => {
            sql.push("NOT (");
            compile(inner, resolve, sql)?;
            sql.push(")");
        }
        Expr::Cmp {
            field,
            field_pos,
            op,
            value,
            value_pos,
        } => {
            let f = resolve(field).map_err(|m| FilterError::new(*field_pos, m))?;
            let cond = comparison(&f, field, *op, value, sql)
                .map_err(|m| FilterError::new(*value_pos, m))?;
            sql.push(&cond);
        }
    }
    Ok(())
}

fn sql_op(op: Op) -> &'static str {
    match op {
        Op::Eq => "=",
        Op::Ne => "<>",
        Op::Lt => "<",
        Op::Le => "<=",
        Op::Gt => ">",
        Op::Ge => ">=",
        Op::Has => "=",
    }
}

fn text_of(v: &Literal) -> &str {
    match v {
        Literal::Str(s) | Literal::Word(s) => s,
    }
}

/// A wildcard value, `*` only at the start and/or end: whether it starts with one, the text
/// between, whether it ends with one.
pub fn wildcard(s: &str) -> Result<(bool, &str, bool), String> {
    let (lead, rest) = match s.strip_prefix('*') {
        Some(r) => (true, r),
        None => (false, s),
    };
    let (core, trail) = match rest.strip_suffix('*') {
        Some(r) => (r, true),
        None => (rest, false),
    };
    if core.contains('*') {
        return Err("'*' is allowed only at the start or end of a value".into());
    }
    Ok((lead, core, trail))
}

/// A wildcard value as a LIKE pattern with everything else escaped.
fn like_pattern(s: &str) -> Result<String, String> {
    let (lead, core, trail) = wildcard(s)?;
    let mut p = String::with_capacity(core.len() + 2);
    if lead {
        p.push('%');
    }
    for c in core.chars() {
        if matches!(c, '%' | '_' | '\\') {
            p.push('\\');
        }
        p.push(c);
    }
    if trail {
        p.push('%');
    }
    Ok(p)
}

/// A wildcard literal (`*` at the start and/or end) as an anchored regular expression for
/// jsonpath's `like_regex`, every other character literal.
fn like_regex(s: &str) -> Result<String, String> {
    let (lead, core, trail) = wildcard(s)?;
    let mut r = String::with_capacity(core.len() + 4);
    if !lead {
        r.push('^');
    }
    for c in core.chars() {
        if "\\.^$*+?()[]{}|".contains(c) {
            r.push('\\');
        }
        r.push(c);
    }
    if !trail {
        r.push('$');
    }
    Ok(r)
}

fn comparison(
    f: &Field,
    name: &str,
    op: Op,
    value: &Literal,
    sql: &mut Sql,
) -> Result<String, String> {
    let col = f.sql;
    let only_eq = |what: &str| -> Result<(), String> {
        if matches!(op, Op::Eq | Op::Ne) {
            Ok(())
        } else {
            Err(format!("{what} field '{name}' takes only = and !="))
        }
    };
    Ok(match f.kind {
        FieldKind::Uuid => {
            // Ids are UUIDv7, so they order by creation: `id > "..."` goes on after a user
            // (how `roster export` resumes).
            if op == Op::Has {
                return Err(format!(
                    "'{name}' is not a list: compare it with =, !=, <, >"
                ));
            }
            let id = Uuid::try_parse(text_of(value))
                .map_err(|_| format!("'{name}' must be compared with a UUID"))?;
            format!("{col} {} {}", sql_op(op), sql.param(id))
        }
        FieldKind::Bool => {
            only_eq("boolean")?;
            let b = match value {
                Literal::Word(w) if w == "true" => true,
                Literal::Word(w) if w == "false" => false,
                _ => return Err(format!("'{name}' must be compared with true or false")),
            };
            format!("{col} {} {}", sql_op(op), sql.param(b))
        }
        FieldKind::Enum(lookup) => {
            only_eq("enum")?;
            let n = lookup(text_of(value))
                .ok_or_else(|| format!("'{}' is not a value of '{name}'", text_of(value)))?;
            format!("{col} {} {}", sql_op(op), sql.param(n))
        }
        FieldKind::Name(lookup) => {
            only_eq("enum")?;
            let n = lookup(text_of(value))
                .ok_or_else(|| format!("'{}' is not a value of '{name}'", text_of(value)))?;
            format!("{col} {} {}", sql_op(op), sql.param(n.to_string()))
        }
        FieldKind::EnumList(lookup) => {
            if op != Op::Has {
                return Err(format!(
                    "'{name}' is a list: match it with ':', e.g. '{name}:TOTP' (has TOTP), \
                     '{name}:*' (has any), 'NOT {name}:TOTP'"
                ));
            }
            match text_of(value) {
                "*" => format!("cardinality({col}) > 0"),
                v => {
                    let n = lookup(v).ok_or_else(|| format!("'{v}' is not a value of '{name}'"))?;
                    format!("{col} @> ARRAY[{}::smallint]", sql.param(n))
                }
            }
        }
        FieldKind::Linked { rows, column } => {
            if op != Op::Has {
                return Err(format!(
                    "'{name}' is a list: match it with ':', e.g. '{name}:\"google\"' (has \
                     google), '{name}:*' (has any), 'NOT {name}:*'"
                ));
            }
            match text_of(value) {
                "*" => format!("EXISTS ({rows})"),
                v => format!(
                    "EXISTS ({rows} AND {column} = {})",
                    sql.param(v.to_string())
                ),
            }
        }
        FieldKind::Int => {
            if op == Op::Has {
                return Err(format!("':' does not apply to the number field '{name}'"));
            }
            let n: i64 = text_of(value)
                .parse()
                .map_err(|_| format!("'{name}' must be compared with an integer"))?;
            format!("{col} {} {}", sql_op(op), sql.param(n))
        }
        FieldKind::Timestamp => {
            if op == Op::Has {
                return Err(format!("':' does not apply to the time field '{name}'"));
            }
            let t: DateTime<Utc> = DateTime::parse_from_rfc3339(text_of(value))
                .map_err(|_| {
                    format!("'{name}' must be compared with an RFC 3339 time, e.g. \"2026-01-31T12:00:00Z\"")
                })?
                .with_timezone(&Utc);
            format!("{col} {} {}", sql_op(op), sql.param(t))
        }
        FieldKind::Text { ci } => {
            let raw = text_of(value);
            let v = if ci {
                raw.to_lowercase()
            } else {
                raw.to_string()
            };
            match op {
                // Absent text is stored as NULL: `= ""` finds it, `!= ""` excludes it.
                Op::Eq if v.is_empty() => format!("{col} IS NULL"),
                Op::Ne if v.is_empty() => format!("{col} IS NOT NULL"),
                Op::Ne => format!("{col} IS DISTINCT FROM {}", sql.param(v)),
                Op::Has if v == "*" => format!("{col} IS NOT NULL"),
                Op::Has if v.contains('*') => {
                    let pattern = like_pattern(&v.to_lowercase())?;
                    let lhs = if ci {
                        col.to_string()
                    } else {
                        format!("lower({col})")
                    };
                    format!("{lhs} LIKE {}", sql.param(pattern))
                }
                Op::Has => {
                    let lhs = if ci {
                        col.to_string()
                    } else {
                        format!("lower({col})")
                    };
                    format!("{lhs} = {}", sql.param(v.to_lowercase()))
                }
                _ => format!("{col} {} {}", sql_op(op), sql.param(v)),
            }
        }
        FieldKind::Json => json_comparison(col, &f.path, name, op, value, sql)?,
    })
}

/// A literal as a JSON value: quoted strings are strings; bare words are booleans, null or
/// numbers.
fn json_literal(value: &Literal) -> Result<serde_json::Value, String> {
    Ok(match value {
        Literal::Str(s) => serde_json::Value::String(s.clone()),
        // A bare `*` (as in `app_metadata.plan:*`) is the has-any-value wildcard.
        Literal::Word(w) if w.contains('*') => serde_json::Value::String(w.clone()),
        Literal::Word(w) => match w.as_str() {
            "true" => true.into(),
            "false" => false.into(),
            "null" => serde_json::Value::Null,
            _ => {
                if let Ok(i) = w.parse::<i64>() {
                    i.into()
                } else {
                    let f: f64 = w.parse().map_err(|_| {
                        format!("'{w}' is not a number, true, false or null; quote strings")
                    })?;
                    serde_json::Number::from_f64(f)
                        .ok_or("numbers must be finite")?
                        .into()
                }
            }
        },
    })
}

/// A metadata path as a jsonpath (lax mode): `$."a"."b"`, each key a quoted string (JSON's
/// escaping is jsonpath's), so no key can end the path or inject syntax.
fn json_path(path: &[String]) -> String {
    path.iter().fold(String::from("$"), |mut p, k| {
        p.push('.');
        p.push_str(&serde_json::Value::String(k.clone()).to_string());
        p
    })
}

/// Whether `query` (a jsonpath) selects anything in `col`: `@?`, which the GIN index serves
/// (for equality) and which is never unknown.
fn json_exists(col: &str, query: String, sql: &mut Sql) -> String {
    format!("{col} @? {}::text::jsonpath", sql.param(query))
}

fn json_comparison(
    col: &str,
    path: &[String],
    name: &str,
    op: Op,
    value: &Literal,
    sql: &mut Sql,
) -> Result<String, String> {
    if path.is_empty() {
        return Err(format!("'{name}' needs a key, e.g. '{name}.plan'"));
    }
    let v = json_literal(value)?;
    // PostgreSQL's JSON holds no NUL character, so metadata never does either.
    if path.iter().any(|k| k.contains('\0')) || v.as_str().is_some_and(|s| s.contains('\0')) {
        return Err("metadata keys and values cannot contain the NUL character".into());
    }
    // {"a":{"b":v}} for path a.b: containment uses the GIN index.
    let contained = || {
        path.iter()
            .rev()
            .fold(v.clone(), |acc, k| serde_json::json!({ k.clone(): acc }))
    };
    Ok(match op {
        Op::Eq => format!("{col} @> {}", sql.param(contained())),
        Op::Ne => format!("NOT ({col} @> {})", sql.param(contained())),
        // `:` is AIP-160's "has": the value itself, or a list holding it, at any list on the
        // way (`app_metadata.roles:"admin"` for `"roles": ["admin", ...]`,
        // `app_metadata.orgs.slug:"acme"` for `"orgs": [{"slug": "acme"}, ...]`). A jsonpath
        // in lax mode looks into lists; `@?` uses the GIN index and is never unknown, so NOT
        // works as it reads.
        Op::Has => match &v {
            serde_json::Value::String(s) if s == "*" => json_exists(col, json_path(path), sql),
            // Case-insensitive, as text fields' wildcards are, and through lists too.
            serde_json::Value::String(s) if s.contains('*') => {
                let regex = serde_json::Value::String(like_regex(s)?);
                let query = format!("{} ? (@ like_regex {regex} flag \"i\")", json_path(path));
                json_exists(col, query, sql)
            }
            _ => json_exists(col, format!("{} ? (@ == {v})", json_path(path)), sql),
        },
        _ => {
            let jtype = match &v {
                serde_json::Value::Number(_) => "number",
                serde_json::Value::String(_) => "string",
                _ => {
                    return Err(format!(
                        "'{}' compares only numbers and strings",
                        op.as_str()
                    ));
                }
            };
            // Compare like with like: jsonb orders different types by type, not value.
            let p = sql.param(path.to_vec());
            format!(
                "(jsonb_typeof({col} #> {p}) = '{jtype}' AND ({col} #> {p}) {} {}::jsonb)",
                sql_op(op),
                sql.param(v)
            )
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::query::filter::parse;

    fn resolve(name: &str) -> Result<Field, String> {
        match name {
            "email" => Ok(Field {
                sql: "lower(email)",
                kind: FieldKind::Text { ci: true },
                path: vec![],
            }),
            "login_count" => Ok(Field {
                sql: "login_count",
                kind: FieldKind::Int,
                path: vec![],
            }),
            n if n.starts_with("app_metadata.") => Ok(Field {
                sql: "app_metadata",
                kind: FieldKind::Json,
                path: n.split('.').skip(1).map(String::from).collect(),
            }),
            _ => Err(format!("unknown field '{name}'")),
        }
    }

    fn compiled(f: &str) -> Result<(String, usize), FilterError> {
        let mut sql = Sql::new();
        compile(&parse(f)?.unwrap(), resolve, &mut sql)?;
        let n = sql.params().len();
        Ok((sql.text, n))
    }

    #[test]
    fn literals_become_parameters() {
        let (text, n) = compiled(r#"email = "x\" OR 1=1 --""#).unwrap();
        assert_eq!(text, "lower(email) = $1");
        assert_eq!(n, 1);
    }

    #[test]
    fn wildcards_become_escaped_like_patterns() {
        assert_eq!(
            like_pattern("*@ex_ample%.com").unwrap(),
            "%@ex\\_ample\\%.com"
        );
        assert_eq!(like_pattern("jo*").unwrap(), "jo%");
        assert!(like_pattern("j*o").is_err());
    }

    #[test]
    fn unknown_fields_and_bad_literals_are_errors_with_positions() {
        let e = compiled("nope = 1").unwrap_err();
        assert_eq!(e.position, 1);
        let e = compiled("login_count > many").unwrap_err();
        assert_eq!(e.position, 15);
        assert!(compiled("login_count : 3").is_err());
        assert!(compiled("app_metadata.plan > true").is_err());
    }

    #[test]
    fn json_paths_use_containment() {
        let (text, _) = compiled(r#"app_metadata.plan = "pro""#).unwrap();
        assert_eq!(text, "app_metadata @> $1");
    }

    #[test]
    fn metadata_wildcards_are_anchored_regexes_with_literal_characters() {
        assert_eq!(like_regex("/staff/*").unwrap(), "^/staff/");
        assert_eq!(like_regex("*.example.com").unwrap(), "\\.example\\.com$");
        assert_eq!(like_regex("*a(b)*").unwrap(), "a\\(b\\)");
        assert!(like_regex("a*b").is_err());
        let (text, _) = compiled(r#"app_metadata.groups:"/staff/*""#).unwrap();
        assert_eq!(text, "app_metadata @? $1::text::jsonpath");
    }

    #[test]
    fn has_on_json_paths_looks_into_lists() {
        let (text, n) = compiled(r#"app_metadata.roles : "admin""#).unwrap();
        assert_eq!(
            (text.as_str(), n),
            ("app_metadata @? $1::text::jsonpath", 1)
        );
        assert_eq!(
            json_path(&["orgs".into(), "slug".into()]),
            r#"$."orgs"."slug""#
        );
        // A key cannot end its quotes: JSON's escaping.
        assert_eq!(json_path(&[r#"a" || $.b"#.into()]), r#"$."a\" || $.b""#);
    }
}

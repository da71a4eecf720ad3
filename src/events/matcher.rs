//! Decides in memory whether an event belongs to a live stream, exactly as the SQL of
//! [`store::read_range`] would, so the streams of a project can share one read of each range
//! the horizon makes final instead of each querying it (see `stream`).
//!
//! The SQL is the reference: every test here mirrors its three-valued logic (a comparison
//! with a NULL column is unknown, and `NOT unknown` is unknown, so `NOT ip = "x"` leaves out
//! events without an ip). What cannot be mirrored exactly is not attempted: ordering text
//! (`ip < "b"`) depends on the database's collation, so such a filter gives no matcher and
//! its stream reads with SQL as before; `lower()` is mirrored for ASCII values only, and a
//! range holding another value is read with SQL.
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::store::{self, StreamSpec};
use super::{Event, EventType};
use crate::query::filter::{Expr, Literal, Op};
use crate::query::sql::{FieldKind, wildcard};

/// A stream's filter and start time, compiled for events in memory.
#[derive(Debug)]
pub struct Matcher {
    filter: Option<Node>,
    since: Option<DateTime<Utc>>,
}

/// The value cannot be decided in memory as PostgreSQL would (non-ASCII text under `lower()`).
#[derive(Debug, PartialEq, Eq)]
pub struct Undecided;

#[derive(Debug)]
enum Node {
    And(Vec<Node>),
    Or(Vec<Node>),
    Not(Box<Node>),
    Uuid {
        field: fn(&Event) -> Option<Uuid>,
        ne: bool,
        value: Uuid,
    },
    Type {
        ne: bool,
        name: &'static str,
    },
    Time {
        op: Op,
        value: DateTime<Utc>,
    },
    Text {
        field: fn(&Event) -> Option<&str>,
        test: TextTest,
    },
}

#[derive(Debug)]
enum TextTest {
    IsNull,
    NotNull,
    /// `col = v`
    Eq(String),
    /// `col IS DISTINCT FROM v`
    Distinct(String),
    /// `lower(col) = v` (v already lowered)
    LowerEq(String),
    /// `lower(col) LIKE [%]core[%]` (core already lowered)
    Like {
        lead: bool,
        core: String,
        trail: bool,
    },
}

/// SQL's three-valued truth: `None` is unknown.
type Truth = Option<bool>;

impl Matcher {
    /// The matcher for `spec`, or `None` when its filter uses something that cannot be decided
    /// in memory exactly as the SQL decides it.
    pub fn new(spec: &StreamSpec) -> Option<Matcher> {
        let filter = match &spec.filter {
            Some(e) => Some(compile(e)?),
            None => None,
        };
        Some(Matcher {
            filter,
            since: spec.since.map(as_stored),
        })
    }

    /// Whether `event` (of the stream's project) is one the stream's SQL would return.
    pub fn matches(&self, event: &Event) -> Result<bool, Undecided> {
        if let Some(since) = self.since
            && event.occurred_at < since
        {
            return Ok(false);
        }
        match &self.filter {
            Some(f) => Ok(eval(f, event)? == Some(true)),
            None => Ok(true),
        }
    }
}

/// A time as PostgreSQL receives it as a parameter: whole microseconds (later than 2000, where
/// the driver's truncation is a floor, as for every event).
fn as_stored(t: DateTime<Utc>) -> DateTime<Utc> {
    t - chrono::Duration::nanoseconds(i64::from(t.timestamp_subsec_nanos() % 1000))
}

fn text_of(v: &Literal) -> &str {
    match v {
        Literal::Str(s) | Literal::Word(s) => s,
    }
}

fn compile(expr: &Expr) -> Option<Node> {
    Some(match expr {
        Expr::And(parts) => Node::And(parts.iter().map(compile).collect::<Option<_>>()?),
        Expr::Or(parts) => Node::Or(parts.iter().map(compile).collect::<Option<_>>()?),
        Expr::Not(inner) => Node::Not(Box::new(compile(inner)?)),
        Expr::Cmp {
            field, op, value, ..
        } => comparison(field, *op, value)?,
    })
}

/// Mirrors `sql::comparison` for the fields of [`store::filter_field`]; a field whose kind is
/// not the one expected here (the SQL side changed) gives no matcher rather than a wrong one.
fn comparison(name: &str, op: Op, value: &Literal) -> Option<Node> {
    let kind = store::filter_field(name).ok()?.kind;
    let raw = text_of(value);
    let eq_ne = || match op {
        Op::Eq => Some(false),
        Op::Ne => Some(true),
        _ => None,
    };
    Some(match (name, kind) {
        ("user_id" | "api_key_id", FieldKind::Uuid) => Node::Uuid {
            field: if name == "user_id" {
                |e| e.user_id
            } else {
                |e| e.api_key_id
            },
            ne: eq_ne()?,
            value: Uuid::try_parse(raw).ok()?,
        },
        ("type", FieldKind::Name(_)) => Node::Type {
            ne: eq_ne()?,
            name: EventType::stored_name(raw)?,
        },
        ("occurred_at", FieldKind::Timestamp) if op != Op::Has => Node::Time {
            op,
            value: as_stored(DateTime::parse_from_rfc3339(raw).ok()?.with_timezone(&Utc)),
        },
        ("ip" | "request_id" | "run_id", FieldKind::Text { ci: false }) => Node::Text {
            field: match name {
                "ip" => |e| e.ip.as_deref(),
                "request_id" => |e| e.request_id.as_deref(),
                _ => |e| e.data.get("run_id").and_then(serde_json::Value::as_str),
            },
            test: text_test(op, raw)?,
        },
        _ => return None,
    })
}

fn text_test(op: Op, v: &str) -> Option<TextTest> {
    Some(match op {
        Op::Eq if v.is_empty() => TextTest::IsNull,
        Op::Ne if v.is_empty() => TextTest::NotNull,
        Op::Ne => TextTest::Distinct(v.to_string()),
        Op::Has if v == "*" => TextTest::NotNull,
        Op::Has if v.contains('*') => {
            let v = v.to_lowercase();
            let (lead, core, trail) = wildcard(&v).ok()?;
            TextTest::Like {
                lead,
                core: core.to_string(),
                trail,
            }
        }
        Op::Has => TextTest::LowerEq(v.to_lowercase()),
        Op::Eq => TextTest::Eq(v.to_string()),
        // Text order is the database collation's, which Rust does not know.
        Op::Lt | Op::Le | Op::Gt | Op::Ge => return None,
    })
}

/// SQL's AND (`decisive` false) and OR (`decisive` true): one part with the decisive value
/// decides; otherwise any unknown part makes the whole unknown.
fn combine(parts: &[Node], e: &Event, decisive: bool) -> Result<Truth, Undecided> {
    let mut out = Some(!decisive);
    for p in parts {
        match eval(p, e)? {
            Some(b) if b == decisive => return Ok(Some(decisive)),
            None => out = None,
            Some(_) => {}
        }
    }
    Ok(out)
}

fn eval(node: &Node, e: &Event) -> Result<Truth, Undecided> {
    Ok(match node {
        Node::And(parts) => combine(parts, e, false)?,
        Node::Or(parts) => combine(parts, e, true)?,
        Node::Not(inner) => eval(inner, e)?.map(|b| !b),
        Node::Uuid { field, ne, value } => field(e).map(|v| (v == *value) != *ne),
        Node::Type { ne, name } => Some((e.kind == *name) != *ne),
        Node::Time { op, value } => {
            let t = &e.occurred_at;
            Some(match op {
                Op::Eq => t == value,
                Op::Ne => t != value,
                Op::Lt => t < value,
                Op::Le => t <= value,
                Op::Gt => t > value,
                Op::Ge => t >= value,
                Op::Has => return Err(Undecided),
            })
        }
        Node::Text { field, test } => {
            let col = field(e);
            let lowered = || match col {
                // PostgreSQL's lower() of other characters depends on the database's ctype.
                Some(c) if !c.is_ascii() => Err(Undecided),
                c => Ok(c.map(str::to_ascii_lowercase)),
            };
            match test {
                TextTest::IsNull => Some(col.is_none()),
                TextTest::NotNull => Some(col.is_some()),
                TextTest::Eq(v) => col.map(|c| c == v),
                TextTest::Distinct(v) => Some(col != Some(v.as_str())),
                TextTest::LowerEq(v) => lowered()?.map(|c| c == *v),
                TextTest::Like { lead, core, trail } => lowered()?.map(|c| match (lead, trail) {
                    (true, true) => c.contains(core.as_str()),
                    (true, false) => c.ends_with(core.as_str()),
                    (false, true) => c.starts_with(core.as_str()),
                    (false, false) => c == *core,
                }),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::query::sql::parse_filter;

    fn event(ip: Option<&str>, user: Option<Uuid>) -> Event {
        Event {
            id: Uuid::now_v7(),
            position: 1,
            kind: "USER_CREATED".into(),
            user_id: user,
            occurred_at: "2026-01-31T12:00:00.123456Z".parse().unwrap(),
            api_key_id: None,
            ip: ip.map(str::to_string),
            user_agent: None,
            request_id: None,
            data: serde_json::json!({}),
        }
    }

    fn matcher(filter: &str) -> Option<Matcher> {
        Matcher::new(&StreamSpec {
            project_id: Uuid::nil(),
            filter: parse_filter(filter, store::filter_field).unwrap(),
            since: None,
        })
    }

    #[test]
    fn unknown_is_neither_true_nor_its_negation() {
        let no_ip = event(None, None);
        for f in [
            r#"ip = "a""#,
            r#"NOT ip = "a""#,
            r#"ip:"a*""#,
            r#"NOT ip:"a*""#,
        ] {
            assert_eq!(matcher(f).unwrap().matches(&no_ip), Ok(false), "{f}");
        }
        // ... but an OR with a true side, and IS NULL tests, are decided.
        let m = matcher(r#"ip = "a" OR type = USER_CREATED"#).unwrap();
        assert_eq!(m.matches(&no_ip), Ok(true));
        assert_eq!(matcher(r#"ip = """#).unwrap().matches(&no_ip), Ok(true));
        assert_eq!(matcher(r#"ip != "a""#).unwrap().matches(&no_ip), Ok(true));
    }

    #[test]
    fn text_order_and_non_ascii_lowering_are_left_to_the_database() {
        assert!(matcher(r#"ip < "b""#).is_none());
        let m = matcher(r#"ip:"10.*""#).unwrap();
        assert_eq!(m.matches(&event(Some("10.0.0.1"), None)), Ok(true));
        assert_eq!(m.matches(&event(Some("10.É"), None)), Err(Undecided));
    }

    #[test]
    fn times_compare_at_the_microseconds_the_database_keeps() {
        let e = event(None, None);
        let at = |f: &str| matcher(f).unwrap().matches(&e).unwrap();
        assert!(at(r#"occurred_at = "2026-01-31T12:00:00.123456999Z""#));
        assert!(!at(r#"occurred_at > "2026-01-31T12:00:00.123456999Z""#));
        assert!(at(r#"occurred_at > "2026-01-31T12:00:00.123455999Z""#));
    }
}

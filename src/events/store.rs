//! The SQL of events: writing them inside the caller's transaction, and reading them for
//! ListEvents, GetEvent and streams.
use chrono::{DateTime, Utc};
use deadpool_postgres::{GenericClient, Transaction};
use tokio_postgres::Row;
use uuid::Uuid;

use super::{Event, EventContext, EventType, NewEvent};
use crate::error::{Error, Result};
use crate::query::filter::Expr;
use crate::query::page::{Cursor, Order, OrderField, SortKind};
use crate::query::sql::{self, Field, FieldKind, Sql};

/// Records `events` (one statement for any number) in `tx`.
pub async fn record(
    tx: &Transaction<'_>,
    project_id: Uuid,
    ctx: &EventContext,
    events: &[NewEvent],
) -> Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    let by = By {
        api_key_id: Some(ctx.api_key_id),
        ip: ctx.ip.as_deref(),
        user_agent: ctx.user_agent.as_deref(),
        request_id: Some(&ctx.request_id),
    };
    let rows = Rows::of(project_id, events);
    let stmt = tx.prepare_cached(INSERT_EVENTS).await?;
    super::stream::written();
    tx.execute(&stmt, &rows.params(&by)).await?;
    Ok(())
}

/// What an operator command (the `roster` CLI, or `serve` setting up its embedded database)
/// names itself as in its events' `user_agent`.
pub const OPERATOR: &str = "roster (operator command)";

/// Records `events` of an operator command run against the database, in `tx`: no key, no
/// request, no address; the user agent is [`OPERATOR`].
pub async fn record_operator(
    tx: &tokio_postgres::Transaction<'_>,
    project_id: Uuid,
    events: &[NewEvent],
) -> Result<()> {
    let by = By {
        api_key_id: None,
        ip: None,
        user_agent: Some(OPERATOR),
        request_id: None,
    };
    let rows = Rows::of(project_id, events);
    super::stream::written();
    tx.execute(INSERT_EVENTS, &rows.params(&by)).await?;
    Ok(())
}

const INSERT_EVENTS: &str = "INSERT INTO events (project_id, id, type, user_id, api_key_id, ip,
                                                 user_agent, request_id, data)
     SELECT $1, e.id, e.type, e.user_id, $5, $6, $7, $8, e.data
     FROM unnest($2::uuid[], $3::text[], $4::uuid[], $9::jsonb[]) AS e(id, type, user_id, data)";

/// Who the columns of an event say caused it.
struct By<'a> {
    api_key_id: Option<Uuid>,
    ip: Option<&'a str>,
    user_agent: Option<&'a str>,
    request_id: Option<&'a str>,
}

/// The per-event columns of [`INSERT_EVENTS`].
struct Rows<'a> {
    project_id: Uuid,
    ids: Vec<Uuid>,
    types: Vec<&'static str>,
    users: Vec<Option<Uuid>>,
    data: Vec<&'a serde_json::Value>,
}

impl<'a> Rows<'a> {
    fn of(project_id: Uuid, events: &'a [NewEvent]) -> Self {
        Rows {
            project_id,
            ids: events.iter().map(|_| Uuid::now_v7()).collect(),
            types: events.iter().map(|e| e.kind.as_str()).collect(),
            users: events.iter().map(|e| e.user_id).collect(),
            data: events.iter().map(|e| &e.data).collect(),
        }
    }

    fn params<'p>(&'p self, by: &'p By<'_>) -> [&'p (dyn tokio_postgres::types::ToSql + Sync); 9] {
        [
            &self.project_id,
            &self.ids,
            &self.types,
            &self.users,
            &by.api_key_id,
            &by.ip,
            &by.user_agent,
            &by.request_id,
            &self.data,
        ]
    }
}

/// The columns every event query returns, in the order [`event_from_row`] reads them.
const EVENT_COLUMNS: &str =
    "id, position, type, user_id, occurred_at, api_key_id, ip, user_agent, request_id, data";
const EVENT_COLUMN_COUNT: usize = 10;

fn event_from_row(r: &Row) -> Event {
    Event {
        id: r.get(0),
        position: r.get(1),
        kind: r.get(2),
        user_id: r.get(3),
        occurred_at: r.get(4),
        api_key_id: r.get(5),
        ip: r.get(6),
        user_agent: r.get(7),
        request_id: r.get(8),
        data: r.get(9),
    }
}

/// The filterable fields of an event (the whitelist of AIP-160 field names).
pub fn filter_field(name: &str) -> std::result::Result<Field, String> {
    let simple = |sql: &'static str, kind: FieldKind| {
        Ok(Field {
            sql,
            kind,
            path: vec![],
        })
    };
    let text = FieldKind::Text { ci: false };
    match name {
        "user_id" => simple("user_id", FieldKind::Uuid),
        "api_key_id" => simple("api_key_id", FieldKind::Uuid),
        "type" => simple("type", FieldKind::Name(EventType::stored_name)),
        "occurred_at" => simple("occurred_at", FieldKind::Timestamp),
        "ip" => simple("ip", text),
        "request_id" => simple("request_id", text),
        // The import run that wrote a USER_IMPORTED event (not indexed: with `type =
        // USER_IMPORTED` the type's index narrows it).
        "run_id" => simple("(data->>'run_id')", text),
        _ => Err(format!(
            "unknown field '{name}'; events filter on user_id, type, occurred_at, api_key_id, ip, \
             request_id, run_id"
        )),
    }
}

/// The field ListEvents orders by.
pub const ORDER_FIELDS: &[OrderField] = &[OrderField {
    name: "occurred_at",
    sql: "occurred_at",
    nullable: false,
    kind: SortKind::Time,
}];

/// A validated listing.
pub struct ListSpec {
    pub filter: Option<Expr>,
    pub order: Order,
    pub limit: i64,
    pub after: Option<Cursor>,
}

fn compile_filter(filter: &Option<Expr>, sql: &mut Sql) -> Result<()> {
    if let Some(f) = filter {
        sql.push(" AND ");
        sql::compile(f, filter_field, sql).map_err(|e| Error::invalid("filter", e.to_string()))?;
    }
    Ok(())
}

/// One page of events, each with the cursor just past it; one extra row tells whether there
/// is a next page.
pub async fn list(
    db: &impl GenericClient,
    project_id: Uuid,
    spec: &ListSpec,
) -> Result<Vec<(Event, Cursor)>> {
    let mut sql = Sql::new();
    let p = sql.param(project_id);
    sql.push(&format!(
        "SELECT {EVENT_COLUMNS}{} FROM events WHERE project_id = {p}",
        spec.order.select_sql()
    ));
    compile_filter(&spec.filter, &mut sql)?;
    if let Some(after) = &spec.after {
        let cond = spec.order.after_sql(after, "id", &mut sql);
        sql.push(&format!(" AND {cond}"));
    }
    let limit = sql.param(spec.limit + 1);
    sql.push(&format!(
        " ORDER BY {} LIMIT {limit}",
        spec.order.order_by_sql("id")
    ));
    let rows = db.query(&sql.text, &sql.params()).await?;
    Ok(rows
        .iter()
        .map(|r| {
            let e = event_from_row(r);
            let cursor = spec.order.cursor_of(r, EVENT_COLUMN_COUNT, e.id);
            (e, cursor)
        })
        .collect())
}

pub async fn get(db: &impl GenericClient, project_id: Uuid, id: Uuid) -> Result<Option<Event>> {
    let stmt = db
        .prepare_cached(&format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE project_id = $1 AND id = $2"
        ))
        .await?;
    Ok(db
        .query_opt(&stmt, &[&project_id, &id])
        .await?
        .as_ref()
        .map(event_from_row))
}

/// What a stream reads: a project's events after a position, optionally filtered and from a
/// time on.
pub struct StreamSpec {
    pub project_id: Uuid,
    pub filter: Option<Expr>,
    pub since: Option<DateTime<Utc>>,
}

/// Up to `limit` events with `after < position <= upto`, in position order.
pub async fn read_range(
    db: &impl GenericClient,
    spec: &StreamSpec,
    after: i64,
    upto: i64,
    limit: i64,
) -> Result<Vec<Event>> {
    let mut sql = Sql::new();
    let (p, a, u) = (
        sql.param(spec.project_id),
        sql.param(after),
        sql.param(upto),
    );
    sql.push(&format!(
        "SELECT {EVENT_COLUMNS} FROM events
         WHERE project_id = {p} AND position > {a} AND position <= {u}"
    ));
    if let Some(since) = spec.since {
        let s = sql.param(since);
        sql.push(&format!(" AND occurred_at >= {s}"));
    }
    compile_filter(&spec.filter, &mut sql)?;
    let l = sql.param(limit);
    sql.push(&format!(" ORDER BY position LIMIT {l}"));
    let rows = db.query(&sql.text, &sql.params()).await?;
    Ok(rows.iter().map(event_from_row).collect())
}

/// The position just before the project's first event at or after `since`, if there is one.
pub async fn position_before(
    db: &impl GenericClient,
    project_id: Uuid,
    since: DateTime<Utc>,
) -> Result<Option<i64>> {
    let row = db
        .query_one(
            "SELECT min(position) - 1 FROM events WHERE project_id = $1 AND occurred_at >= $2",
            &[&project_id, &since],
        )
        .await?;
    Ok(row.get(0))
}

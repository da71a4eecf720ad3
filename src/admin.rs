//! Projects and API keys: what the operator CLI manages and the tests set up.
//! These run directly against the database, never over gRPC.
use chrono::{DateTime, Utc};
use tokio_postgres::GenericClient;
use uuid::Uuid;

use crate::auth::{NewKey, ScopeSet};
use crate::error::{Error, Reason, Result};
use crate::events::{EventType, NewEvent};

/// Records an operator's change to a project in `tx` (LogService shows it like any event),
/// with `data.operator`, the operating-system user who ran the command, when known.
async fn audit(
    tx: &tokio_postgres::Transaction<'_>,
    project_id: Uuid,
    kind: EventType,
    mut data: serde_json::Value,
) -> Result<()> {
    let operator = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .ok()
        .filter(|u| !u.is_empty());
    if let (Some(operator), Some(fields)) = (operator, data.as_object_mut()) {
        fields.insert("operator".into(), operator.into());
    }
    crate::events::store::record_operator(tx, project_id, &[NewEvent::for_project(kind, data)])
        .await
}

/// A project: the isolation boundary of users, keys and events.
#[derive(Debug, Clone)]
pub struct Project {
    pub id: Uuid,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

/// An API key as listed (never with its secret).
#[derive(Debug, Clone)]
pub struct ApiKey {
    pub id: Uuid,
    pub project_id: Uuid,
    pub name: String,
    pub scopes: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
    /// When a server last accepted the key, to within a minute.
    pub last_used_at: Option<DateTime<Utc>>,
    /// When servers stop accepting the key; `None`: never.
    pub expires_at: Option<DateTime<Utc>>,
    /// The key's own rate limit (calls per second; 0: none), `None`: the server's.
    pub rate_limit_rps: Option<f64>,
    /// Its burst; `None`: twice the rate.
    pub rate_limit_burst: Option<f64>,
    /// The networks it is accepted from (`10.0.0.0/8`); `None`: any.
    pub allowed_networks: Option<Vec<String>>,
}

/// Most networks one key may name.
pub const MAX_KEY_NETWORKS: usize = 100;

/// The networks of `--allow-from`: CIDR blocks or single addresses (as /32 or /128), at
/// most [`MAX_KEY_NETWORKS`]. A block with host bits set (`10.0.0.1/8`) is refused with the
/// block it probably means, rather than silently widened or narrowed.
pub fn parse_networks<S: AsRef<str>>(given: &[S]) -> Result<Vec<ipnet::IpNet>> {
    let mut v = crate::error::Violations::new();
    if given.is_empty() {
        v.add(
            "allow_from",
            "give at least one network (or lift the restriction)",
        );
    }
    if given.len() > MAX_KEY_NETWORKS {
        v.add(
            "allow_from",
            format!("at most {MAX_KEY_NETWORKS} networks per key"),
        );
    }
    let mut nets = Vec::with_capacity(given.len());
    for text in given.iter().map(|t| t.as_ref().trim()) {
        let net = match text.parse::<ipnet::IpNet>() {
            Ok(net) => net,
            Err(_) => match text.parse::<std::net::IpAddr>() {
                Ok(ip) => ipnet::IpNet::from(ip),
                Err(_) => {
                    v.add(
                        "allow_from",
                        format!("{text:?} is not an address or CIDR block (10.0.0.0/8, fd00::/8)"),
                    );
                    continue;
                }
            },
        };
        if net != net.trunc() {
            v.add(
                "allow_from",
                format!("{net} has host bits set: did you mean {}?", net.trunc()),
            );
            continue;
        }
        if !nets.contains(&net) {
            nets.push(net);
        }
    }
    v.into_result()?;
    Ok(nets)
}

fn network_texts(nets: &[ipnet::IpNet]) -> Vec<String> {
    nets.iter().map(ToString::to_string).collect()
}

pub async fn create_project(db: &mut impl GenericClient, name: &str) -> Result<Project> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 256 || name.chars().any(char::is_control) {
        return Err(Error::invalid(
            "name",
            "must be 1 to 256 printable characters",
        ));
    }
    let tx = db.transaction().await?;
    let row = tx
        .query_one(
            "INSERT INTO projects (id, name) VALUES ($1, $2) RETURNING id, name, created_at",
            &[&Uuid::now_v7(), &name],
        )
        .await?;
    let project = Project {
        id: row.get(0),
        name: row.get(1),
        created_at: row.get(2),
    };
    audit(
        &tx,
        project.id,
        EventType::ProjectCreated,
        serde_json::json!({ "name": project.name }),
    )
    .await?;
    tx.commit().await?;
    Ok(project)
}

pub async fn list_projects(db: &impl GenericClient) -> Result<Vec<Project>> {
    let rows = db
        .query(
            "SELECT id, name, created_at FROM projects ORDER BY name",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Project {
            id: r.get(0),
            name: r.get(1),
            created_at: r.get(2),
        })
        .collect())
}

/// Most origins one relying party allows.
pub const MAX_ORIGINS: usize = 16;

/// Sets a project's WebAuthn relying party: its id (a domain), optional display name, and
/// the origins allowed to run ceremonies (http only for localhost, as browsers require).
pub async fn set_relying_party(
    db: &mut impl GenericClient,
    project_id: Uuid,
    rp_id: &str,
    rp_name: Option<&str>,
    origins: &[String],
) -> Result<()> {
    let mut v = crate::error::Violations::new();
    let rp_id = rp_id.trim().to_ascii_lowercase();
    let domain_ok = !rp_id.is_empty()
        && rp_id.len() <= 253
        && rp_id.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if !domain_ok {
        v.add(
            "webauthn_rp_id",
            "must be a domain name such as example.com",
        );
    }
    let rp_name = rp_name.map(str::trim).filter(|n| !n.is_empty());
    if rp_name.is_some_and(|n| n.chars().count() > 256 || n.chars().any(char::is_control)) {
        v.add(
            "webauthn_rp_name",
            "must be at most 256 printable characters",
        );
    }
    if origins.is_empty() || origins.len() > MAX_ORIGINS {
        v.add(
            "webauthn_origins",
            format!("must list 1 to {MAX_ORIGINS} origins"),
        );
    }
    let mut clean = Vec::with_capacity(origins.len());
    for o in origins {
        match url::Url::parse(o.trim()) {
            Ok(u)
                if (u.scheme() == "https"
                    || (u.scheme() == "http" && u.host_str() == Some("localhost")))
                    && u.host_str().is_some()
                    && u.path() == "/"
                    && u.query().is_none() =>
            {
                clean.push(u.origin().ascii_serialization());
            }
            _ => v.add(
                "webauthn_origins",
                format!("{o:?} is not an origin like https://example.com"),
            ),
        }
    }
    v.into_result()?;
    let tx = db.transaction().await?;
    let n = tx
        .execute(
            "UPDATE projects SET webauthn_rp_id = $2, webauthn_rp_name = $3, webauthn_origins = $4
             WHERE id = $1",
            &[&project_id, &rp_id, &rp_name, &clean],
        )
        .await?;
    if n == 0 {
        return Err(Error::not_found("project", project_id.to_string()));
    }
    audit(
        &tx,
        project_id,
        EventType::ProjectUpdated,
        serde_json::json!({
            "webauthn_rp_id": rp_id,
            "webauthn_rp_name": rp_name,
            "webauthn_origins": clean,
        }),
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// A change to one setting of a project's policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyChange {
    /// Back to the server's setting.
    ServerDefault,
    Value(u32),
}

/// The settings of a project's sign-in policy to change; `None` leaves one as it is. Also
/// the flags of `roster projects policy`, whose help the comments are.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct PolicyUpdate {
    /// Consecutive failed sign-ins that lock an account (0: never), or `default`.
    #[arg(long, value_parser = policy_value(0, 1_000_000))]
    pub lockout_threshold: Option<PolicyChange>,
    /// Seconds a lock lasts (at most a year), or `default`.
    #[arg(long, value_parser = policy_value(1, 31_536_000))]
    pub lockout_secs: Option<PolicyChange>,
    /// A new password may not repeat any of the user's last N (0: off, at most 24), or
    /// `default`.
    #[arg(long, value_parser = policy_value(0, 24))]
    pub password_history: Option<PolicyChange>,
    /// Fewest characters in a new password (8 to 128), or `default`.
    #[arg(long, value_parser = policy_value(8, 128))]
    pub password_min_length: Option<PolicyChange>,
    /// Days a password lasts before a sign-in requires a change (0: no limit, at most
    /// 36500), or `default`.
    #[arg(long, value_parser = policy_value(0, 36_500))]
    pub password_max_age_days: Option<PolicyChange>,
    /// Failed sign-ins one client address may make per window (0: not throttled, at
    /// most 1000000), or `default`: for projects whose backends pass the end user's
    /// real `ip` to VerifyPassword.
    #[arg(long, value_parser = policy_value(0, 1_000_000))]
    pub ip_failure_limit: Option<PolicyChange>,
    /// Seconds before another code or link of the same kind can be issued to a user (0:
    /// none, at most 3600), or `default`.
    #[arg(long, value_parser = policy_value(0, 3600))]
    pub code_resend_secs: Option<PolicyChange>,
    /// Codes or links of one kind a user can be issued per rolling hour (0: no cap, at most
    /// 1000), or `default`.
    #[arg(long, value_parser = policy_value(0, 1000))]
    pub codes_per_hour: Option<PolicyChange>,
    /// Phone prefixes SMS may go to (`+1,+44`; an empty string: any number), or `default`
    /// (the server's --sms-allowed-prefixes): for a project serving other countries than the
    /// server's list.
    #[arg(long, value_parser = sms_prefixes_value)]
    pub sms_allowed_prefixes: Option<SmsPrefixesChange>,
    /// SMS (SMS_OTP challenges and phone verifications) the project's users may be sent per
    /// hour, all together (0: no ceiling, at most 1000000), or `default`.
    #[arg(long, value_parser = policy_value(0, 1_000_000))]
    pub sms_per_hour: Option<PolicyChange>,
    /// Days the project's events are kept (0: kept, at most 36500), or `default` (the
    /// server's --event-retention-days).
    #[arg(long, value_parser = policy_value(0, 36_500))]
    pub event_retention_days: Option<PolicyChange>,
}

/// A change to a project's SMS prefixes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SmsPrefixesChange {
    /// Back to the server's list.
    ServerDefault,
    Value(crate::authenticators::sends::SmsPrefixes),
}

fn sms_prefixes_value(text: &str) -> std::result::Result<SmsPrefixesChange, String> {
    match text.trim() {
        "default" => Ok(SmsPrefixesChange::ServerDefault),
        t => crate::authenticators::sends::SmsPrefixes::parse(t).map(SmsPrefixesChange::Value),
    }
}

/// A policy setting: `default`, or a whole number from `min` to `max`.
fn policy_value(
    min: u32,
    max: u32,
) -> impl Fn(&str) -> std::result::Result<PolicyChange, String> + Clone + Send + Sync + 'static {
    move |text| match text.trim() {
        "default" => Ok(PolicyChange::ServerDefault),
        t => match t.parse::<u32>() {
            Ok(v) if (min..=max).contains(&v) => Ok(PolicyChange::Value(v)),
            _ => Err(format!("give a number from {min} to {max}, or default")),
        },
    }
}

/// Changes the given settings of a project's sign-in policy (the others stay) and returns the
/// policy as stored (a PROJECT_POLICY_UPDATED event names what changed). Servers apply it
/// within their key-cache time.
pub async fn update_policy(
    db: &mut impl GenericClient,
    project_id: Uuid,
    update: PolicyUpdate,
) -> Result<crate::auth::ProjectPolicy> {
    let u = update;
    // The list, a text column, beside the numbers.
    let (sms_set, sms_value) = match &u.sms_allowed_prefixes {
        None => (false, None),
        Some(SmsPrefixesChange::ServerDefault) => (true, None),
        Some(SmsPrefixesChange::Value(list)) => (true, Some(list.to_text())),
    };
    // (column, whether to change it, the new value: NULL for the server's).
    let changes = [
        ("lockout_threshold", u.lockout_threshold),
        ("lockout_secs", u.lockout_secs),
        ("password_history", u.password_history),
        ("password_min_length", u.password_min_length),
        ("password_max_age_days", u.password_max_age_days),
        ("ip_failure_limit", u.ip_failure_limit),
        ("code_resend_secs", u.code_resend_secs),
        ("codes_per_hour", u.codes_per_hour),
        ("sms_per_hour", u.sms_per_hour),
        ("event_retention_days", u.event_retention_days),
    ]
    .map(|(column, change)| match change {
        None => (column, false, None),
        Some(PolicyChange::ServerDefault) => (column, true, None),
        Some(PolicyChange::Value(v)) => (column, true, Some(i32::try_from(v).unwrap_or(i32::MAX))),
    });
    let mut sets: Vec<String> = changes
        .iter()
        .enumerate()
        .map(|(i, (column, ..))| {
            let (flag, value) = (2 * i + 2, 2 * i + 3);
            format!("{column} = CASE WHEN ${flag} THEN ${value}::integer ELSE {column} END")
        })
        .collect();
    let (flag, value) = (2 * changes.len() + 2, 2 * changes.len() + 3);
    sets.push(format!(
        "sms_allowed_prefixes = CASE WHEN ${flag} THEN ${value}::text ELSE sms_allowed_prefixes END"
    ));
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&project_id];
    for (_, change, value) in &changes {
        params.push(change);
        params.push(value);
    }
    params.push(&sms_set);
    params.push(&sms_value);
    // What the event says changed: each setting given, with its new value or "default".
    let mut changed = serde_json::Map::new();
    for (column, change, value) in &changes {
        if *change {
            changed.insert(
                (*column).into(),
                value.map_or_else(|| "default".into(), serde_json::Value::from),
            );
        }
    }
    if sms_set {
        changed.insert(
            "sms_allowed_prefixes".into(),
            sms_value.clone().unwrap_or_else(|| "default".into()).into(),
        );
    }
    let tx = db.transaction().await?;
    let row = tx
        .query_opt(
            &format!(
                "UPDATE projects SET {} WHERE id = $1 RETURNING {}",
                sets.join(", "),
                crate::auth::POLICY_COLUMNS
            ),
            &params,
        )
        .await?
        .ok_or_else(|| Error::not_found("project", project_id.to_string()))?;
    if !changed.is_empty() {
        audit(
            &tx,
            project_id,
            EventType::ProjectPolicyUpdated,
            serde_json::json!({ "changed": changed }),
        )
        .await?;
    }
    tx.commit().await?;
    Ok(crate::auth::ProjectPolicy::from_row(&row, 0))
}

/// What deleting a project removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Deleted {
    pub users: u64,
    pub events: u64,
    pub keys: u64,
}

/// Users deleted per statement (each takes its authenticators, identities, tokens and the
/// rest with it through the foreign keys), and events per statement.
const DELETE_USERS_BATCH: i64 = 1000;
const DELETE_EVENTS_BATCH: i64 = 10_000;

/// Deletes a project and everything in it: its keys stop working first (revoked in their own
/// transaction, so servers refuse them within their key-cache time), then its users (with
/// everything that hangs off them) and its events go in batches, each its own short
/// transaction, and last the project itself. Irreversible. An interrupted deletion is
/// finished by running it again. `progress` hears the running totals after each batch.
pub async fn delete_project(
    db: &mut impl GenericClient,
    project_id: Uuid,
    mut progress: impl FnMut(&Deleted),
) -> Result<Deleted> {
    let mut done = Deleted {
        keys: db
            .execute(
                "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now())
                 WHERE project_id = $1",
                &[&project_id],
            )
            .await?,
        ..Deleted::default()
    };
    // (table, its key within a project, batch size, the total it adds to)
    type Total = fn(&mut Deleted) -> &mut u64;
    let batches: [(&str, &str, i64, Total); 2] = [
        ("users", "id", DELETE_USERS_BATCH, |d| &mut d.users),
        ("events", "position", DELETE_EVENTS_BATCH, |d| &mut d.events),
    ];
    for (table, key, batch, total) in batches {
        let sql = format!(
            "DELETE FROM {table} WHERE project_id = $1 AND {key} IN (
                 SELECT {key} FROM {table} WHERE project_id = $1 LIMIT $2)"
        );
        loop {
            let n = db.execute(&sql, &[&project_id, &batch]).await?;
            *total(&mut done) += n;
            progress(&done);
            if n == 0 {
                break;
            }
        }
    }
    // Whatever arrived meanwhile (a server still holding a key in its cache) goes with the
    // project, through the foreign keys.
    let tx = db.transaction().await?;
    tx.execute(
        "DELETE FROM ip_failures WHERE project_id = $1",
        &[&project_id],
    )
    .await?;
    let gone = tx
        .execute("DELETE FROM projects WHERE id = $1", &[&project_id])
        .await?;
    if gone == 0 {
        return Err(Error::not_found("project", project_id.to_string()));
    }
    tx.commit().await?;
    Ok(done)
}

/// Finds a project by id or by name.
pub async fn find_project(db: &impl GenericClient, id_or_name: &str) -> Result<Project> {
    let id = Uuid::try_parse(id_or_name).ok();
    let row = db
        .query_opt(
            "SELECT id, name, created_at FROM projects WHERE id = $1 OR name = $2",
            &[&id, &id_or_name],
        )
        .await?
        .ok_or_else(|| Error::not_found("project", id_or_name))?;
    Ok(Project {
        id: row.get(0),
        name: row.get(1),
        created_at: row.get(2),
    })
}

/// Creates a key, accepted until `expires_at` when given; the returned token is the only
/// time the secret is seen.
pub async fn create_key(
    db: &mut impl GenericClient,
    project_id: Uuid,
    name: &str,
    scopes: &[String],
    expires_at: Option<DateTime<Utc>>,
) -> Result<(ApiKey, String)> {
    create_restricted_key(db, project_id, name, scopes, expires_at, None).await
}

/// [`create_key`], accepted only from `networks` when given.
pub async fn create_restricted_key(
    db: &mut impl GenericClient,
    project_id: Uuid,
    name: &str,
    scopes: &[String],
    expires_at: Option<DateTime<Utc>>,
    networks: Option<&[ipnet::IpNet]>,
) -> Result<(ApiKey, String)> {
    ScopeSet::parse(scopes).map_err(|e| Error::invalid("scopes", e))?;
    if scopes.is_empty() {
        return Err(Error::invalid("scopes", "give at least one scope (or *)"));
    }
    if expires_at.is_some_and(|t| t <= Utc::now()) {
        return Err(Error::invalid("expires_at", "must be in the future"));
    }
    if networks.is_some_and(<[_]>::is_empty) {
        return Err(Error::invalid("allow_from", "give at least one network"));
    }
    let key = NewKey::generate();
    let networks = networks.map(network_texts);
    let tx = db.transaction().await?;
    let row = tx
        .query_one(
            "INSERT INTO api_keys (id, project_id, name, scopes, secret_hash, expires_at,
                                   allowed_networks)
             VALUES ($1, $2, $3, $4, $5, $6, $7::text[]::cidr[]) RETURNING created_at",
            &[
                &key.id,
                &project_id,
                &name,
                &scopes,
                &key.secret_hash,
                &expires_at,
                &networks,
            ],
        )
        .await?;
    let api_key = ApiKey {
        id: key.id,
        project_id,
        name: name.to_string(),
        scopes: scopes.to_vec(),
        created_at: row.get(0),
        revoked_at: None,
        last_used_at: None,
        expires_at,
        rate_limit_rps: None,
        rate_limit_burst: None,
        allowed_networks: networks,
    };
    audit(
        &tx,
        project_id,
        EventType::ApiKeyCreated,
        serde_json::json!({
            "key_id": api_key.id,
            "name": api_key.name,
            "scopes": api_key.scopes,
            "expires_at": expires_at.map(|t| t.to_rfc3339()),
            "allowed_networks": api_key.allowed_networks,
        }),
    )
    .await?;
    tx.commit().await?;
    Ok((api_key, key.token))
}

pub async fn list_keys(db: &impl GenericClient, project_id: Uuid) -> Result<Vec<ApiKey>> {
    let rows = db
        .query(
            "SELECT id, project_id, name, scopes, created_at, revoked_at, last_used_at,
                    expires_at, rate_limit_rps, rate_limit_burst, allowed_networks::text[]
             FROM api_keys WHERE project_id = $1 ORDER BY created_at",
            &[&project_id],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| ApiKey {
            id: r.get(0),
            project_id: r.get(1),
            name: r.get(2),
            scopes: r.get(3),
            created_at: r.get(4),
            revoked_at: r.get(5),
            last_used_at: r.get(6),
            expires_at: r.get(7),
            rate_limit_rps: r.get(8),
            rate_limit_burst: r.get(9),
            allowed_networks: r.get(10),
        })
        .collect())
}

/// Replaces a key: a new key with the old one's project, name, scopes, rate limit and
/// lifetime (its expiry as far from now as the old one's was from its creation), while the
/// old key keeps working until `old_expires_at` (sooner if it expired sooner), so callers
/// can move to the new one without an outage. The old key must be active. Both changes
/// are audited (API_KEY_CREATED with `rotated_from`, API_KEY_UPDATED with the old key's
/// new expiry). Returns the new key, its token, and when the old one stops working.
pub async fn rotate_key(
    db: &mut impl GenericClient,
    key_id: Uuid,
    old_expires_at: DateTime<Utc>,
) -> Result<(ApiKey, String, DateTime<Utc>)> {
    let tx = db.transaction().await?;
    let row = tx
        .query_opt(
            "SELECT project_id, name, scopes, created_at, expires_at, rate_limit_rps,
                    rate_limit_burst, revoked_at IS NULL AND coalesce(expires_at > now(), true),
                    allowed_networks::text[]
             FROM api_keys WHERE id = $1 FOR UPDATE",
            &[&key_id],
        )
        .await?
        .ok_or_else(|| Error::not_found("api_key", key_id.to_string()))?;
    if !row.get::<_, bool>(7) {
        return Err(Error::FailedPrecondition {
            reason: Reason::KeyNotActive,
            message: "the key is revoked or expired: create a new one instead".into(),
        });
    }
    let (project_id, name, scopes): (Uuid, String, Vec<String>) =
        (row.get(0), row.get(1), row.get(2));
    let created_at: DateTime<Utc> = row.get(3);
    let expires_at: Option<DateTime<Utc>> = row.get(4);
    let (rps, burst): (Option<f64>, Option<f64>) = (row.get(5), row.get(6));
    let networks: Option<Vec<String>> = row.get(8);
    let now = Utc::now();
    let new_expiry =
        expires_at.map(|t| chrono::SubsecRound::trunc_subsecs(now + (t - created_at), 0));
    let old_until = expires_at.map_or(old_expires_at, |t| t.min(old_expires_at));
    let key = NewKey::generate();
    let created: DateTime<Utc> = tx
        .query_one(
            "INSERT INTO api_keys (id, project_id, name, scopes, secret_hash, expires_at,
                                   rate_limit_rps, rate_limit_burst, allowed_networks)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::text[]::cidr[]) RETURNING created_at",
            &[
                &key.id,
                &project_id,
                &name,
                &scopes,
                &key.secret_hash,
                &new_expiry,
                &rps,
                &burst,
                &networks,
            ],
        )
        .await?
        .get(0);
    tx.execute(
        "UPDATE api_keys SET expires_at = $2 WHERE id = $1",
        &[&key_id, &old_until],
    )
    .await?;
    audit(
        &tx,
        project_id,
        EventType::ApiKeyCreated,
        serde_json::json!({
            "key_id": key.id,
            "name": name,
            "scopes": scopes,
            "expires_at": new_expiry.map(|t| t.to_rfc3339()),
            "allowed_networks": networks,
            "rotated_from": key_id,
        }),
    )
    .await?;
    audit(
        &tx,
        project_id,
        EventType::ApiKeyUpdated,
        serde_json::json!({
            "key_id": key_id,
            "name": name,
            "expires_at": old_until.to_rfc3339(),
            "rotated_to": key.id,
        }),
    )
    .await?;
    tx.commit().await?;
    let api_key = ApiKey {
        id: key.id,
        project_id,
        name,
        scopes,
        created_at: created,
        revoked_at: None,
        last_used_at: None,
        expires_at: new_expiry,
        rate_limit_rps: rps,
        rate_limit_burst: burst,
        allowed_networks: networks,
    };
    Ok((api_key, key.token, old_until))
}

/// Restricts a key to `networks` (`None`: accepted from any address again). Servers apply it
/// within their key-cache time. Audited as API_KEY_UPDATED with `allowed_networks`.
pub async fn restrict_key(
    db: &mut impl GenericClient,
    key_id: Uuid,
    networks: Option<&[ipnet::IpNet]>,
) -> Result<()> {
    if networks.is_some_and(<[_]>::is_empty) {
        return Err(Error::invalid("allow_from", "give at least one network"));
    }
    let networks = networks.map(network_texts);
    update_key(
        db,
        key_id,
        "allowed_networks = $2::text[]::cidr[]",
        &[&networks],
        serde_json::json!({ "allowed_networks": networks }),
    )
    .await
}

/// Sets columns of a key (`set`, with `params` as $2...) and records API_KEY_UPDATED with
/// its id, name and `changed`, in one transaction.
async fn update_key(
    db: &mut impl GenericClient,
    key_id: Uuid,
    set: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    changed: serde_json::Value,
) -> Result<()> {
    let tx = db.transaction().await?;
    let mut all: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&key_id];
    all.extend_from_slice(params);
    let row = tx
        .query_opt(
            &format!("UPDATE api_keys SET {set} WHERE id = $1 RETURNING project_id, name"),
            &all,
        )
        .await?
        .ok_or_else(|| Error::not_found("api_key", key_id.to_string()))?;
    let mut data = serde_json::json!({ "key_id": key_id, "name": row.get::<_, String>(1) });
    if let (Some(data), serde_json::Value::Object(changed)) = (data.as_object_mut(), changed) {
        data.extend(changed);
    }
    audit(&tx, row.get(0), EventType::ApiKeyUpdated, data).await?;
    tx.commit().await?;
    Ok(())
}

/// Sets a key's own rate limit: `rps` calls per second (0: none) with bursts of `burst`
/// (twice the rate when `None`), or `rps` `None` for the server's. Servers apply it within
/// their key-cache time.
pub async fn set_key_limit(
    db: &mut impl GenericClient,
    key_id: Uuid,
    rps: Option<f64>,
    burst: Option<f64>,
) -> Result<()> {
    let mut v = crate::error::Violations::new();
    if rps.is_some_and(|r| !(r.is_finite() && (0.0..=1_000_000.0).contains(&r))) {
        v.add("rate_limit_rps", "must be a number from 0 to 1000000");
    }
    if burst.is_some_and(|b| !(b.is_finite() && (1.0..=1_000_000.0).contains(&b))) {
        v.add("rate_limit_burst", "must be a number from 1 to 1000000");
    }
    if burst.is_some() && !rps.is_some_and(|r| r > 0.0) {
        v.add("rate_limit_burst", "goes with a rate above 0");
    }
    v.into_result()?;
    update_key(
        db,
        key_id,
        "rate_limit_rps = $2, rate_limit_burst = $3",
        &[&rps, &burst],
        serde_json::json!({ "rate_limit_rps": rps, "rate_limit_burst": burst }),
    )
    .await
}

/// Revokes a key; servers stop accepting it within their key-cache time. Revoking a revoked
/// key changes nothing (and records nothing).
pub async fn revoke_key(db: &mut impl GenericClient, key_id: Uuid) -> Result<()> {
    let tx = db.transaction().await?;
    let row = tx
        .query_opt(
            "SELECT project_id, name, revoked_at IS NOT NULL FROM api_keys WHERE id = $1
             FOR UPDATE",
            &[&key_id],
        )
        .await?
        .ok_or_else(|| Error::not_found("api_key", key_id.to_string()))?;
    if row.get::<_, bool>(2) {
        return Ok(());
    }
    tx.execute(
        "UPDATE api_keys SET revoked_at = now() WHERE id = $1",
        &[&key_id],
    )
    .await?;
    audit(
        &tx,
        row.get(0),
        EventType::ApiKeyRevoked,
        serde_json::json!({ "key_id": key_id, "name": row.get::<_, String>(1) }),
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// An address the sign-in throttle counts failed sign-ins against, as stored: `failures`
/// owed as of `as_of` (they refill evenly over the window from then on), and the attempts
/// `refused` since it last had room.
#[derive(Debug, Clone)]
pub struct Throttled {
    pub ip: std::net::IpAddr,
    pub failures: f64,
    pub as_of: DateTime<Utc>,
    pub refused: i32,
}

/// Most addresses `list_throttled` returns: the ones refusing, then the most indebted.
pub const THROTTLED_LISTED: i64 = 1000;

/// The addresses of a project the sign-in throttle holds failures against, those being
/// refused first (IPv6 ones as their /64).
pub async fn list_throttled(db: &impl GenericClient, project_id: Uuid) -> Result<Vec<Throttled>> {
    let rows = db
        .query(
            "SELECT ip, spent, at, refusals FROM ip_failures WHERE project_id = $1
             ORDER BY refusals DESC, spent DESC, ip LIMIT $2",
            &[&project_id, &THROTTLED_LISTED],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Throttled {
            ip: r.get(0),
            failures: r.get(1),
            as_of: r.get(2),
            refused: r.get(3),
        })
        .collect())
}

/// Forgets the failures an address owes in a project (an office behind one NAT that a few
/// forgotten passwords got throttled), so its sign-ins are checked again at once; an IPv6
/// address releases its /64. Audited as IP_THROTTLE_RELEASED. `None` when it owed nothing.
/// Sign-ins in flight from it settle against the fresh budget.
pub async fn release_ip(
    db: &mut impl GenericClient,
    project_id: Uuid,
    ip: std::net::IpAddr,
) -> Result<Option<Throttled>> {
    let key = crate::authenticators::throttle::FailureThrottle::key(ip);
    let tx = db.transaction().await?;
    let Some(row) = tx
        .query_opt(
            "DELETE FROM ip_failures WHERE project_id = $1 AND ip = $2
             RETURNING ip, spent, at, refusals",
            &[&project_id, &key],
        )
        .await?
    else {
        return Ok(None);
    };
    let released = Throttled {
        ip: row.get(0),
        failures: row.get(1),
        as_of: row.get(2),
        refused: row.get(3),
    };
    audit(
        &tx,
        project_id,
        EventType::IpThrottleReleased,
        serde_json::json!({
            "ip": released.ip.to_string(),
            // Tenths: the budget refills continuously, more digits say nothing.
            "failures": (released.failures * 10.0).round() / 10.0,
            "refused": released.refused,
        }),
    )
    .await?;
    tx.commit().await?;
    Ok(Some(released))
}

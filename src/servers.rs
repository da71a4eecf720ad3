//! The registry of running servers. Each `roster serve` keeps a row in `servers`: its host,
//! version and address, and its settings (those a project's policy falls back to, and the
//! others an operator compares across replicas; never a secret). The row is written at
//! start, touched every [`HEARTBEAT`] and removed at shutdown; a server that died without
//! removing it drops out of [`running`] after [`ALIVE`] and is forgotten after a day. It is
//! what `roster servers` lists and where `roster projects policy` reads the servers' values.
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use tokio_postgres::GenericClient;
use uuid::Uuid;

use crate::db::{self, Pool};
use crate::error::Result;

/// How often a server touches its row.
pub const HEARTBEAT: Duration = Duration::from_secs(30);
/// A server whose row was touched this recently counts as running (three heartbeats).
pub const ALIVE: Duration = Duration::from_secs(90);

/// What a server publishes about itself.
#[derive(Clone, Debug)]
pub struct Registration {
    pub id: Uuid,
    pub host: String,
    pub version: String,
    pub listen: String,
    pub started_at: DateTime<Utc>,
    pub settings: Value,
}

impl Registration {
    pub fn new(listen: String, settings: Value) -> Self {
        Registration {
            id: Uuid::now_v7(),
            host: host_name(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            listen,
            started_at: Utc::now(),
            settings,
        }
    }
}

/// The host's name: Kubernetes sets `HOSTNAME` to the pod's; else the kernel's.
fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// Writes the row (again, if it was forgotten meanwhile) and forgets servers not seen for a
/// day: one statement each.
async fn touch(pool: &Pool, r: &Registration) -> Result<()> {
    let client = db::client(pool).await?;
    client
        .execute(
            "INSERT INTO servers (id, host, version, listen, started_at, settings)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (id) DO UPDATE SET seen_at = now()",
            &[
                &r.id,
                &r.host,
                &r.version,
                &r.listen,
                &r.started_at,
                &r.settings,
            ],
        )
        .await?;
    client
        .execute(
            "DELETE FROM servers WHERE seen_at < now() - interval '1 day'",
            &[],
        )
        .await?;
    Ok(())
}

/// Keeps the row fresh for as long as the server runs (a database away only delays it).
pub async fn keep_registered(pool: Pool, r: Registration) {
    loop {
        if let Err(e) = touch(&pool, &r).await {
            tracing::debug!(error = %e, "could not touch this server's row in `servers`");
        }
        tokio::time::sleep(HEARTBEAT).await;
    }
}

/// Removes the row at shutdown, so the server drops out of the list at once.
pub async fn deregister(pool: &Pool, id: Uuid) {
    let removed = async {
        let client = db::client(pool).await?;
        client
            .execute("DELETE FROM servers WHERE id = $1", &[&id])
            .await?;
        Ok::<(), crate::error::Error>(())
    };
    match tokio::time::timeout(Duration::from_secs(2), removed).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "could not remove this server's row"),
        Err(_) => tracing::debug!("removing this server's row timed out"),
    }
}

/// A server as its row says.
#[derive(Clone, Debug)]
pub struct Seen {
    pub id: Uuid,
    pub host: String,
    pub version: String,
    pub listen: String,
    pub started_at: DateTime<Utc>,
    pub seen_at: DateTime<Utc>,
    pub settings: Map<String, Value>,
}

/// The servers that touched their row within [`ALIVE`], oldest first.
pub async fn running(db: &impl GenericClient) -> Result<Vec<Seen>> {
    let alive = ALIVE.as_secs_f64();
    let rows = db
        .query(
            "SELECT id, host, version, listen, started_at, seen_at, settings FROM servers
             WHERE seen_at > now() - make_interval(secs => $1)
             ORDER BY started_at, id",
            &[&alive],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Seen {
            id: r.get(0),
            host: r.get(1),
            version: r.get(2),
            listen: r.get(3),
            started_at: r.get(4),
            seen_at: r.get(5),
            settings: match r.get::<_, Value>(6) {
                Value::Object(m) => m,
                _ => Map::new(),
            },
        })
        .collect())
}

/// The settings servers publish, in the order `roster servers` prints them: a project
/// policy's first, as `roster projects policy` lists them.
const SETTINGS: &[&str] = &[
    "lockout-threshold",
    "lockout-secs",
    "password-history",
    "password-min-length",
    "password-max-age-days",
    "ip-failure-limit",
    "code-resend-secs",
    "codes-per-hour",
    "sms-allowed-prefixes",
    "sms-per-hour",
    "event-retention-days",
    "rate-limit",
    "argon2",
    "breached-passwords",
    "key-cache-ms",
    "call-timeout-secs",
    "tls",
    "encryption",
];

/// The names of the settings `servers` publish: [`SETTINGS`]' order, then any others (a
/// newer version's) by name.
pub fn setting_names(servers: &[Seen]) -> Vec<String> {
    let mut names: Vec<String> = SETTINGS.iter().map(|s| s.to_string()).collect();
    let mut others: Vec<&String> = servers
        .iter()
        .flat_map(|s| s.settings.keys())
        .filter(|k| !SETTINGS.contains(&k.as_str()))
        .collect();
    others.sort();
    others.dedup();
    names.extend(others.into_iter().cloned());
    names
}

/// What the running servers say for one setting: one value when they agree, else each value
/// with the hosts that have it; "no server running" when none is.
pub fn setting(servers: &[Seen], name: &str) -> String {
    let mut values: Vec<(String, Vec<String>)> = Vec::new();
    for s in servers {
        let v = match s.settings.get(name) {
            Some(Value::String(t)) => t.clone(),
            Some(v) => v.to_string(),
            None => "(not published)".into(),
        };
        // A host running two servers (two ports, or a restart overlapping) names each.
        let shared = servers.iter().filter(|o| o.host == s.host).count() > 1;
        let label = if shared {
            format!("{} ({})", s.host, s.listen)
        } else {
            s.host.clone()
        };
        match values.iter_mut().find(|(seen, _)| *seen == v) {
            Some((_, hosts)) => hosts.push(label),
            None => values.push((v, vec![label])),
        }
    }
    match &values[..] {
        [] => "no server running".into(),
        [(v, _)] => v.clone(),
        many => {
            let parts: Vec<String> = many
                .iter()
                .map(|(v, hosts)| format!("{v} on {}", hosts.join(", ")))
                .collect();
            format!("servers differ: {}", parts.join("; "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(host: &str, settings: Value) -> Seen {
        Seen {
            id: Uuid::now_v7(),
            host: host.into(),
            version: "0.1.0".into(),
            listen: "0.0.0.0:50051".into(),
            started_at: Utc::now(),
            seen_at: Utc::now(),
            settings: settings.as_object().unwrap().clone(),
        }
    }

    #[test]
    fn every_published_setting_is_listed_in_order() {
        let mut published = crate::config::ServerConfig::default().published_settings();
        published["encryption"] = true.into();
        let published = published.as_object().unwrap().clone();
        let mut keys: Vec<&str> = published.keys().map(String::as_str).collect();
        let mut listed = SETTINGS.to_vec();
        keys.sort();
        listed.sort();
        assert_eq!(keys, listed);
        assert_eq!(published["lockout-threshold"], 10);
        assert_eq!(published["sms-allowed-prefixes"], "any");
        assert_eq!(published["rate-limit"], "off");
    }

    #[test]
    fn a_setting_reads_as_one_value_or_where_each_differs() {
        let a = seen(
            "a",
            serde_json::json!({"lockout-threshold": 10, "sms": "+1"}),
        );
        let b = seen(
            "b",
            serde_json::json!({"lockout-threshold": 10, "sms": "+44"}),
        );
        let c = seen("c", serde_json::json!({"lockout-threshold": 5}));
        assert_eq!(setting(&[], "lockout-threshold"), "no server running");
        assert_eq!(setting(&[a.clone(), b.clone()], "lockout-threshold"), "10");
        assert_eq!(setting(std::slice::from_ref(&a), "sms"), "+1");
        assert_eq!(
            setting(&[a.clone(), b.clone(), c.clone()], "lockout-threshold"),
            "servers differ: 10 on a, b; 5 on c"
        );
        assert_eq!(
            setting(&[a.clone(), c], "sms"),
            "servers differ: +1 on a; (not published) on c"
        );
        let mut a2 = seen("a", serde_json::json!({"sms": "+44"}));
        a2.listen = "0.0.0.0:50052".into();
        assert_eq!(
            setting(&[a, a2], "sms"),
            "servers differ: +1 on a (0.0.0.0:50051); +44 on a (0.0.0.0:50052)"
        );
    }
}

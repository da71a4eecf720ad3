//! Projects and API keys: what the operator CLI manages and the tests set up.
//! These run directly against the database, never over gRPC.
use chrono::{DateTime, Utc};
use tokio_postgres::GenericClient;
use uuid::Uuid;

use crate::auth::{NewKey, ScopeSet};
use crate::error::{Error, Result};

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
}

pub async fn create_project(db: &impl GenericClient, name: &str) -> Result<Project> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 256 || name.chars().any(char::is_control) {
        return Err(Error::invalid(
            "name",
            "must be 1 to 256 printable characters",
        ));
    }
    let row = db
        .query_one(
            "INSERT INTO projects (id, name) VALUES ($1, $2) RETURNING id, name, created_at",
            &[&Uuid::now_v7(), &name],
        )
        .await?;
    Ok(Project {
        id: row.get(0),
        name: row.get(1),
        created_at: row.get(2),
    })
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

/// Creates a key; the returned token is the only time the secret is seen.
pub async fn create_key(
    db: &impl GenericClient,
    project_id: Uuid,
    name: &str,
    scopes: &[String],
) -> Result<(ApiKey, String)> {
    ScopeSet::parse(scopes).map_err(|e| Error::invalid("scopes", e))?;
    if scopes.is_empty() {
        return Err(Error::invalid("scopes", "give at least one scope (or *)"));
    }
    let key = NewKey::generate();
    let row = db
        .query_one(
            "INSERT INTO api_keys (id, project_id, name, scopes, secret_hash)
             VALUES ($1, $2, $3, $4, $5) RETURNING created_at",
            &[&key.id, &project_id, &name, &scopes, &key.secret_hash],
        )
        .await?;
    let api_key = ApiKey {
        id: key.id,
        project_id,
        name: name.to_string(),
        scopes: scopes.to_vec(),
        created_at: row.get(0),
        revoked_at: None,
    };
    Ok((api_key, key.token))
}

pub async fn list_keys(db: &impl GenericClient, project_id: Uuid) -> Result<Vec<ApiKey>> {
    let rows = db
        .query(
            "SELECT id, project_id, name, scopes, created_at, revoked_at FROM api_keys
             WHERE project_id = $1 ORDER BY created_at",
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
        })
        .collect())
}

/// Revokes a key; servers stop accepting it within their key-cache time.
pub async fn revoke_key(db: &impl GenericClient, key_id: Uuid) -> Result<()> {
    let n = db
        .execute(
            "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1",
            &[&key_id],
        )
        .await?;
    if n == 0 {
        return Err(Error::not_found("api_key", key_id.to_string()));
    }
    Ok(())
}

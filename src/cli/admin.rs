//! Operator commands against the database: migrations, projects and API keys. Without a
//! `DATABASE_URL` they use the embedded cluster in `--data-dir` (starting it for the command
//! if `roster serve` is not running it).
use std::future::Future;
use std::pin::Pin;

use anyhow::Context;
use clap::Subcommand;
use uuid::Uuid;

use crate::admin;
use crate::config::DatabaseConfig;
use crate::db::embedded::EmbeddedPostgres;

#[derive(Subcommand)]
pub enum ProjectCommand {
    /// Create a project.
    Create {
        /// A unique name.
        name: String,
    },
    /// List projects.
    List,
    /// Set a project's WebAuthn relying party, used by its passkey ceremonies.
    Update {
        /// Project id or name.
        project: String,
        /// Relying-party id: the site's domain, e.g. example.com.
        #[arg(long)]
        webauthn_rp_id: String,
        /// An origin allowed to run ceremonies, e.g. https://example.com (repeat for several).
        #[arg(long = "webauthn-origin", required = true)]
        webauthn_origins: Vec<String>,
        /// The name authenticators show; the project name when not given.
        #[arg(long)]
        webauthn_rp_name: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum KeyCommand {
    /// Create an API key; its token is printed once and never stored.
    Create {
        /// Project id or name.
        #[arg(long)]
        project: String,
        /// A scope (repeat for several): users.read users.write users.import users.export
        /// users.export_secrets authenticators.read authenticators.write
        /// authenticators.verify identities.read identities.write identities.tokens
        /// logs.read, or * for all.
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
        /// A name saying who uses the key.
        #[arg(long)]
        name: String,
    },
    /// List a project's keys (never their secrets).
    List {
        /// Project id or name.
        #[arg(long)]
        project: String,
    },
    /// Revoke a key; servers reject it within their key-cache time.
    Revoke {
        /// The key id (the part after rst_ in the token, or its UUID form).
        key_id: String,
    },
}

/// Runs `job` on a connection to the configured database, or to the embedded cluster, after
/// applying pending migrations (how many, the job's second argument).
pub async fn with_database<F>(db: &DatabaseConfig, job: F) -> anyhow::Result<()>
where
    F: for<'a> FnOnce(
        &'a mut tokio_postgres::Client,
        usize,
    ) -> Pin<Box<dyn Future<Output = anyhow::Result<()>> + 'a>>,
{
    let mut started: Option<EmbeddedPostgres> = None;
    let url = match db.url()? {
        Some(url) => url,
        None => {
            let (pg, url) = crate::server::start_embedded(&db.data_dir).await?;
            started = Some(pg);
            url
        }
    };
    let result = async {
        let (mut client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .context("connecting to the database")?;
        tokio::spawn(conn);
        let applied = crate::db::migrate::migrate(&mut client).await?;
        job(&mut client, applied).await
    }
    .await;
    if let Some(pg) = started {
        tokio::task::spawn_blocking(move || pg.stop()).await?;
    }
    result
}

pub async fn projects(cmd: ProjectCommand, db: &DatabaseConfig) -> anyhow::Result<()> {
    with_database(db, move |client, _| {
        Box::pin(async move {
            match cmd {
                ProjectCommand::Create { name } => {
                    let p = admin::create_project(&*client, &name).await?;
                    println!("{}\t{}", p.id, p.name);
                }
                ProjectCommand::List => {
                    for p in admin::list_projects(&*client).await? {
                        println!("{}\t{}\t{}", p.id, p.name, p.created_at.to_rfc3339());
                    }
                }
                ProjectCommand::Update {
                    project,
                    webauthn_rp_id,
                    webauthn_origins,
                    webauthn_rp_name,
                } => {
                    let p = admin::find_project(&*client, &project).await?;
                    admin::set_relying_party(
                        &*client,
                        p.id,
                        &webauthn_rp_id,
                        webauthn_rp_name.as_deref(),
                        &webauthn_origins,
                    )
                    .await?;
                    println!("{}\t{}\twebauthn {}", p.id, p.name, webauthn_rp_id.trim());
                }
            }
            Ok(())
        })
    })
    .await
}

pub async fn keys(cmd: KeyCommand, db: &DatabaseConfig) -> anyhow::Result<()> {
    with_database(db, move |client, _| {
        Box::pin(async move {
            match cmd {
                KeyCommand::Create {
                    project,
                    scopes,
                    name,
                } => {
                    let p = admin::find_project(&*client, &project).await?;
                    let (key, token) = admin::create_key(&*client, p.id, &name, &scopes).await?;
                    eprintln!(
                        "created key {} in project {}; the token is shown only now:",
                        key.id, p.name
                    );
                    println!("{token}");
                }
                KeyCommand::List { project } => {
                    let p = admin::find_project(&*client, &project).await?;
                    for k in admin::list_keys(&*client, p.id).await? {
                        let state = match k.revoked_at {
                            Some(t) => format!("revoked {}", t.to_rfc3339()),
                            None => "active".to_string(),
                        };
                        println!("{}\t{}\t{}\t{}", k.id, k.name, k.scopes.join(","), state);
                    }
                }
                KeyCommand::Revoke { key_id } => {
                    let id = Uuid::try_parse(
                        key_id
                            .trim_start_matches("rst_")
                            .split('_')
                            .next()
                            .unwrap_or(""),
                    )
                    .context("not a key id")?;
                    admin::revoke_key(&*client, id).await?;
                    println!("revoked {id}");
                }
            }
            Ok(())
        })
    })
    .await
}

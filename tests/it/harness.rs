//! The test harness: one throwaway PostgreSQL per test run (from the installed binaries, or
//! `DATABASE_URL` when set), a database migrated once per schema and kept as a template, a fresh
//! database per test (`CREATE DATABASE ... TEMPLATE`, dropped `WITH (FORCE)` afterwards), and
//! the real server on an ephemeral port, called through the generated tonic clients.
//! Tracing output appears only when `TEST_LOG` is set.
use std::sync::OnceLock;

use roster::config::ServerConfig;
use roster::db::embedded::{EmbeddedOptions, EmbeddedPostgres};
use roster::pb::v1::authenticator_service_client::AuthenticatorServiceClient;
use roster::pb::v1::identity_service_client::IdentityServiceClient;
use roster::pb::v1::log_service_client::LogServiceClient;
use roster::pb::v1::user_service_client::UserServiceClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use uuid::Uuid;

struct Cluster {
    /// Connection string of a database we may CREATE/DROP DATABASE from.
    admin: String,
    template: String,
    _pg: Option<EmbeddedPostgres>,
}

/// Builds a connection string for `db` on the same server as `admin`.
fn with_dbname(admin: &str, db: &str) -> String {
    if admin.starts_with("postgres://") || admin.starts_with("postgresql://") {
        let (base, query) = admin
            .split_once('?')
            .map(|(b, q)| (b, Some(q)))
            .unwrap_or((admin, None));
        let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
        let base = match base[scheme_end..].find('/') {
            Some(i) => &base[..scheme_end + i],
            None => base,
        };
        match query {
            Some(q) => format!("{base}/{db}?{q}"),
            None => format!("{base}/{db}"),
        }
    } else {
        format!("{admin} dbname={db}")
    }
}

/// Removes test clusters left by runs that died (their pid is gone).
fn sweep_leftovers() {
    let Ok(entries) = std::fs::read_dir("/tmp") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if let Some(pid) = name
            .strip_prefix("roster-test-")
            .and_then(|p| p.parse::<i32>().ok())
        {
            // SAFETY: kill with signal 0 only checks whether the process exists.
            let alive = unsafe { libc::kill(pid, 0) } == 0;
            if !alive {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        // Set up on a plain thread: the caller may be inside a tokio runtime.
        std::thread::spawn(|| {
            let (admin, pg) = match std::env::var("DATABASE_URL") {
                Ok(url) if !url.is_empty() => (url, None),
                _ => {
                    sweep_leftovers();
                    let dir = std::path::PathBuf::from(format!(
                        "/tmp/roster-test-{}",
                        std::process::id()
                    ));
                    let pg = EmbeddedPostgres::start(&EmbeddedOptions {
                        dir,
                        unsafe_fast: true,
                    })
                    .expect("starting the test PostgreSQL");
                    (pg.connection_string("postgres"), Some(pg))
                }
            };
            // Named by the schema, built once per server and kept: under nextest every test
            // is its own process, and a template per process would pile up on a
            // DATABASE_URL server.
            let template = format!("roster_tpl_{}", roster::db::migrate::fingerprint());
            block_on(ensure_template(&admin, &template));
            Cluster {
                admin,
                template,
                _pg: pg,
            }
        })
        .join()
        .expect("cluster set-up")
    })
}

/// Arbitrary constant naming the lock under which one test process builds the template.
const TEMPLATE_LOCK: i64 = 0x726f_7374_6572_7470;

/// Creates the migrated template database `template` unless it exists. It is migrated under
/// another name and renamed when complete, so a run that dies half-way leaves no broken
/// template behind; processes arriving meanwhile wait on the lock, then find it.
async fn ensure_template(admin: &str, template: &str) {
    let (client, conn) = tokio_postgres::connect(admin, tokio_postgres::NoTls)
        .await
        .expect("connect admin");
    let conn = tokio::spawn(conn);
    client
        .execute("SELECT pg_advisory_lock($1)", &[&TEMPLATE_LOCK])
        .await
        .expect("template lock");
    let exists = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&template])
        .await
        .expect("look for the template")
        .is_some();
    if !exists {
        let building = format!("{template}_{}", Uuid::now_v7().simple());
        client
            .batch_execute(&format!("CREATE DATABASE {building}"))
            .await
            .expect("create template");
        let (mut migrating, migrating_conn) =
            tokio_postgres::connect(&with_dbname(admin, &building), tokio_postgres::NoTls)
                .await
                .expect("connect template");
        let migrating_conn = tokio::spawn(migrating_conn);
        roster::db::migrate::migrate(&mut migrating)
            .await
            .expect("migrate template");
        drop(migrating);
        let _ = migrating_conn.await;
        // The migrating session's backend may outlive its socket by a moment.
        let mut tries = 0;
        while let Err(e) = client
            .batch_execute(&format!("ALTER DATABASE {building} RENAME TO {template}"))
            .await
        {
            tries += 1;
            assert!(tries < 50, "renaming the template: {e}");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&TEMPLATE_LOCK])
        .await;
    drop(client);
    let _ = conn.await;
}

/// A database of the test cluster, dropped (`WITH (FORCE)`) when this is.
pub struct TestDatabase {
    pub name: String,
}

impl TestDatabase {
    /// A new database, a copy of `template` (else empty).
    pub async fn create(template: Option<&str>) -> TestDatabase {
        let name = format!("t_{}", Uuid::now_v7().simple());
        let (client, conn) = tokio_postgres::connect(&cluster().admin, tokio_postgres::NoTls)
            .await
            .expect("connect admin");
        let conn = tokio::spawn(conn);
        let from = template
            .map(|t| format!(" TEMPLATE {t}"))
            .unwrap_or_default();
        client
            .batch_execute(&format!("CREATE DATABASE {name}{from}"))
            .await
            .expect("create test database");
        drop(client);
        let _ = conn.await;
        TestDatabase { name }
    }

    /// Its connection string.
    pub fn url(&self) -> String {
        with_dbname(&cluster().admin, &self.name)
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let admin = cluster().admin.clone();
        let db = self.name.clone();
        // Off the test's runtime (Drop cannot await).
        let _ = std::thread::spawn(move || {
            block_on(async {
                if let Ok((client, conn)) =
                    tokio_postgres::connect(&admin, tokio_postgres::NoTls).await
                {
                    let conn = tokio::spawn(conn);
                    let _ = client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
                        .await;
                    drop(client);
                    let _ = conn.await;
                }
            })
        })
        .join();
    }
}

pub fn init_tracing() {
    static INIT: OnceLock<()> = OnceLock::new();
    // An inert dispatcher kept alive for the whole run. With exactly one dispatcher alive
    // (a test's scoped log capture), tracing-core evaluates a new callsite's interest against
    // whichever thread registers it first, so another test's thread without a subscriber
    // can disable it for the capture (tokio-rs/tracing#3611); two keep the general path.
    static PIN: OnceLock<tracing::Dispatch> = OnceLock::new();
    PIN.get_or_init(|| tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default()));
    INIT.get_or_init(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(
                    std::env::var("TEST_LOG").unwrap_or_else(|_| "debug".into()),
                ))
                .with_test_writer()
                .try_init();
        }
    });
}

/// Puts a bearer token on every call.
#[derive(Clone)]
pub struct Key(Option<MetadataValue<Ascii>>);

impl Interceptor for Key {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

pub type Users = UserServiceClient<InterceptedService<Channel, Key>>;
pub type Identities = IdentityServiceClient<InterceptedService<Channel, Key>>;
pub type Logs = LogServiceClient<InterceptedService<Channel, Key>>;
pub type Authenticators = AuthenticatorServiceClient<InterceptedService<Channel, Key>>;

/// A running server on its own fresh database, with a project and an all-scopes key.
pub struct TestApp {
    /// Connection string of this test's database.
    pub url: String,
    pub db_name: String,
    /// Dropped after the server has been told to stop (fields drop after `Drop::drop`).
    _db: TestDatabase,
    pub pool: roster::db::Pool,
    pub project_id: Uuid,
    pub token: String,
    pub channel: Channel,
    /// The server's address.
    pub addr: std::net::SocketAddr,
    /// Where `/metrics` is served, when the config asked for it.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Where the plaintext health-only port listens, when the config asked for it.
    pub health_addr: Option<std::net::SocketAddr>,
    /// The server's live event feed (to watch its subscribers).
    pub feed: std::sync::Arc<roster::events::stream::EventFeed>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestApp {
    pub async fn spawn() -> TestApp {
        Self::spawn_with(ServerConfig {
            key_cache_ms: 50,
            ..ServerConfig::default()
        })
        .await
    }

    /// The encryption keys tests run with (fixed, so a test can check what is stored).
    pub const ENCRYPTION_KEYS: &str = "test1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

    pub async fn spawn_with(config: ServerConfig) -> TestApp {
        Self::start_on(
            TestDatabase::create(Some(&cluster().template)).await,
            config,
        )
        .await
    }

    /// A server on the (migrated) database `db`, with a project "test" and its key.
    pub async fn start_on(db: TestDatabase, mut config: ServerConfig) -> TestApp {
        let db_name = db.name.clone();
        init_tracing();
        if config.encryption_keys.is_none() {
            config.encryption_keys = Some(Self::ENCRYPTION_KEYS.to_string());
        }
        let url = with_dbname(&cluster().admin, &db_name);
        let pool =
            roster::db::connect_pool(&url, 8, std::time::Duration::from_secs(10)).expect("pool");
        let (project_id, token) = {
            let mut client = pool.get().await.expect("db");
            let p = roster::admin::create_project(&mut **client, "test")
                .await
                .expect("project");
            let (_, token) =
                roster::admin::create_key(&mut **client, p.id, "all", &["*".to_string()], None)
                    .await
                    .expect("key");
            clear_set_up_events(&client, p.id).await;
            (p.id, token)
        };
        let app = roster::server::Application::build(
            "127.0.0.1:0".parse().expect("addr"),
            pool.clone(),
            config,
        )
        .await
        .expect("build app")
        .listen_for_events(
            roster::db::pg_config(&url, std::time::Duration::from_secs(10)).expect("pg config"),
        );
        let addr = app.local_addr();
        let metrics_addr = app.metrics_addr();
        let health_addr = app.health_addr();
        let feed = app.event_feed();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(app.run_until(async move {
            let _ = rx.await;
        }));
        // Lazy: a server configured for TLS would refuse this plaintext channel's handshake;
        // such tests make their own channel.
        let channel = channel_to(addr);
        TestApp {
            url,
            db_name,
            _db: db,
            pool,
            project_id,
            token,
            channel,
            addr,
            metrics_addr,
            health_addr,
            feed,
            shutdown: Some(tx),
            server: Some(server),
        }
    }

    /// Starts the server's graceful shutdown (as SIGTERM does for `roster serve`).
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Another server on this test's database (same project and key) with settings of its
    /// own, as a second replica or a restart with new settings would be: a channel to it. It
    /// serves until the test ends.
    pub async fn another_server(&self, mut config: ServerConfig) -> Channel {
        if config.encryption_keys.is_none() {
            config.encryption_keys = Some(Self::ENCRYPTION_KEYS.to_string());
        }
        let app = roster::server::Application::build(
            "127.0.0.1:0".parse().expect("addr"),
            self.pool.clone(),
            config,
        )
        .await
        .expect("build app");
        let addr = app.local_addr();
        tokio::spawn(app.run_until(std::future::pending()));
        channel_to(addr)
    }

    /// Whether the server's `run_until` is still running (its drain not over).
    pub fn running(&self) -> bool {
        self.server.as_ref().is_some_and(|s| !s.is_finished())
    }

    /// Waits until the server has stopped (after [`TestApp::begin_shutdown`]).
    pub async fn stopped(&mut self) {
        if let Some(server) = self.server.take() {
            server.await.expect("server task").expect("server ran");
        }
    }

    /// A UserService client using the all-scopes key.
    pub fn users(&self) -> Users {
        self.users_with(Some(&self.token))
    }

    /// A UserService client sending `token` (or no key at all).
    pub fn users_with(&self, token: Option<&str>) -> Users {
        UserServiceClient::with_interceptor(self.channel.clone(), key(token))
    }

    /// An AuthenticatorService client using the all-scopes key.
    pub fn authenticators(&self) -> Authenticators {
        self.authenticators_with(Some(&self.token))
    }

    /// An AuthenticatorService client with `token` (or none).
    pub fn authenticators_with(&self, token: Option<&str>) -> Authenticators {
        AuthenticatorServiceClient::with_interceptor(self.channel.clone(), key(token))
    }

    /// The metrics endpoint's samples (`name{labels}` → value); the app must serve metrics.
    pub async fn metrics(&self) -> std::collections::HashMap<String, f64> {
        let addr = self.metrics_addr.expect("metrics_listen set");
        let (_, body) = crate::server::http_get(addr, "/metrics").await;
        body.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                Some((name.to_string(), value.parse().ok()?))
            })
            .collect()
    }

    /// Returns once some statement waits on a lock held elsewhere (a test holding a table
    /// stops a call at a chosen point); fails after 10 s naming `what` never came.
    pub async fn until_a_call_waits_on_a_lock(&self, what: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while self
            .sql_one::<i64>("SELECT count(*) FROM pg_locks WHERE NOT granted", &[])
            .await
            == 0
        {
            assert!(
                std::time::Instant::now() < deadline,
                "{what} never waited on the lock"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// One value from this test's database (for what the API never shows, like stored hashes).
    pub async fn sql_one<T>(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> T
    where
        T: for<'a> tokio_postgres::types::FromSql<'a>,
    {
        let client = self.pool.get().await.expect("db");
        client.query_one(sql, params).await.expect("query").get(0)
    }

    /// An IdentityService client using the all-scopes key.
    pub fn identities(&self) -> Identities {
        self.identities_with(Some(&self.token))
    }

    /// An IdentityService client with `token` (or none).
    pub fn identities_with(&self, token: Option<&str>) -> Identities {
        IdentityServiceClient::with_interceptor(self.channel.clone(), key(token))
    }

    /// A LogService client using the all-scopes key.
    pub fn logs(&self) -> Logs {
        self.logs_with(Some(&self.token))
    }

    /// A LogService client with `token` (or none).
    pub fn logs_with(&self, token: Option<&str>) -> Logs {
        LogServiceClient::with_interceptor(self.channel.clone(), key(token))
    }

    /// A new key in this app's project with the given scopes.
    pub async fn key(&self, scopes: &[&str]) -> String {
        let mut client = self.pool.get().await.expect("db");
        let scopes: Vec<String> = scopes.iter().map(|s| s.to_string()).collect();
        roster::admin::create_key(&mut **client, self.project_id, "scoped", &scopes, None)
            .await
            .expect("key")
            .1
    }

    /// A second project with an all-scopes key: (project id, token).
    pub async fn other_project(&self) -> (Uuid, String) {
        let mut client = self.pool.get().await.expect("db");
        let p = roster::admin::create_project(
            &mut **client,
            &format!("other-{}", Uuid::now_v7().simple()),
        )
        .await
        .expect("project");
        let (_, token) =
            roster::admin::create_key(&mut **client, p.id, "all", &["*".to_string()], None)
                .await
                .expect("key");
        clear_set_up_events(&client, p.id).await;
        (p.id, token)
    }

    /// The events of this test's project of the given types, in position order: (type, data).
    pub async fn project_events(&self, types: &[&str]) -> Vec<(String, serde_json::Value)> {
        let client = self.pool.get().await.expect("db");
        client
            .query(
                "SELECT type, data FROM events WHERE project_id = $1 AND type = ANY($2)
                 ORDER BY position",
                &[&self.project_id, &types],
            )
            .await
            .expect("events")
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    }

    /// The events stored for a user, oldest first: (type, data, api_key_id, request_id).
    pub async fn events_of(
        &self,
        user_id: &str,
    ) -> Vec<(String, serde_json::Value, Option<Uuid>, Option<String>)> {
        let client = self.pool.get().await.expect("db");
        let id = Uuid::parse_str(user_id).expect("uuid");
        client
            .query(
                "SELECT type, data, api_key_id, request_id FROM events WHERE user_id = $1 ORDER BY position",
                &[&id],
            )
            .await
            .expect("events")
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect()
    }
}

/// Deletes a test project's set-up events (PROJECT_CREATED, API_KEY_CREATED), so that its log
/// holds what the test did (events.rs checks those events on a project of its own).
async fn clear_set_up_events(client: &deadpool_postgres::Client, project_id: Uuid) {
    client
        .execute("DELETE FROM events WHERE project_id = $1", &[&project_id])
        .await
        .expect("clear the set-up's events");
}

/// The secret part of a key `rst_<key id>_<secret>` (URL-safe base64: it may hold '_').
pub fn key_secret(token: &str) -> &str {
    let secret = token.splitn(3, '_').nth(2).expect("rst_<id>_<secret>");
    assert!(secret.len() >= 40, "a whole secret: {token}");
    secret
}

/// A plaintext channel to a server at `addr` (host:port), connecting on its first call.
pub fn channel_to(addr: impl std::fmt::Display) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect_lazy()
}

pub fn key(token: Option<&str>) -> Key {
    Key(token.map(|t| format!("Bearer {t}").parse().expect("ascii token")))
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        // The database goes with the `_db` field.
    }
}

/// The google.rpc details of a failed call.
pub fn details(status: &tonic::Status) -> tonic_types::ErrorDetails {
    use tonic_types::StatusExt;
    status.get_error_details()
}

/// The field names in a status's BadRequest, sorted.
pub fn violated_fields(status: &tonic::Status) -> Vec<String> {
    let mut f: Vec<String> = details(status)
        .bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
        .unwrap_or_default();
    f.sort();
    f
}

/// The ErrorInfo reason of a status.
pub fn reason(status: &tonic::Status) -> String {
    details(status)
        .error_info()
        .map(|e| e.reason.clone())
        .unwrap_or_default()
}

/// `roster serve` as a process of its own on this test's database (already migrated), on a
/// free port, with `env` added: the child and a lazy channel to it. Callers wait for health.
pub fn serve_process(
    app: &TestApp,
    metrics_listen: &str,
    env: &[(&str, String)],
) -> (std::process::Child, Channel) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("free port")
        .local_addr()
        .expect("addr")
        .port();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_roster"));
    cmd.args([
        "serve",
        "--no-migrate",
        "--listen",
        &format!("127.0.0.1:{port}"),
    ])
    .args(["--metrics-listen", metrics_listen])
    .env("DATABASE_URL", &app.url)
    .env("RUST_LOG", "warn");
    // Only what the test sets: none of the OpenTelemetry settings of the environment.
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("OTEL_")) {
        cmd.env_remove(k);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("spawn roster serve");
    (child, channel_to(format!("127.0.0.1:{port}")))
}

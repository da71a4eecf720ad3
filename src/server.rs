//! Assembles the gRPC server: the four Roster services behind [`AuthLayer`], gRPC health
//! (per service, NOT_SERVING while the database is unreachable), reflection v1 and v1alpha,
//! and graceful shutdown. [`Application::build`] binds (port 0 allowed) so tests start it on
//! an ephemeral port with no sleeps; [`serve`] is `roster serve`.
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic_health::ServingStatus;

use crate::auth::{AuthLayer, InFlight, KeyVerifier};
use crate::authenticators::grpc::AuthenticatorApi;
use crate::authenticators::passkey::RelyingPartyDefaults;
use crate::authenticators::password::PasswordSettings;
use crate::authenticators::throttle::FailureThrottle;
use crate::config::{ServeConfig, ServerConfig};
use crate::crypto::Hasher;
use crate::crypto::seal::Sealer;
use crate::db::embedded::{EmbeddedOptions, EmbeddedPostgres};
use crate::db::{self, Pool};
use crate::events::grpc::LogApi;
use crate::events::retention;
use crate::events::stream::EventFeed;
use crate::identities::grpc::IdentityApi;
use crate::pb::v1::authenticator_service_server::AuthenticatorServiceServer;
use crate::pb::v1::identity_service_server::IdentityServiceServer;
use crate::pb::v1::log_service_server::LogServiceServer;
use crate::pb::v1::user_service_server::UserServiceServer;
use crate::users::creates::UserCreates;
use crate::users::grpc::UserApi;
use crate::users::reads::UserReads;

/// What every service shares.
#[derive(Clone)]
pub struct AppState {
    pub pool: Pool,
    /// Shared, pipelined connections for single-row reads.
    pub readers: Arc<db::Readers>,
    /// GetUser, LookupUser and LookupUserByIdentity reads, coalesced over `readers`.
    pub user_reads: Arc<UserReads>,
    /// CreateUser writes, coalesced.
    pub user_creates: Arc<UserCreates>,
    pub hasher: Arc<Hasher>,
    pub passwords: PasswordSettings,
    /// Passwords exposed in breaches (`--breached-passwords-file`), when configured.
    pub breached: Option<Arc<crate::crypto::breached::BreachedList>>,
    /// What a sign-in with a listed password answers.
    pub breached_sign_in: crate::config::BreachedSignIn,
    /// Where SMS may be sent (`--sms-allowed-prefixes`).
    pub sms_prefixes: Arc<crate::authenticators::sends::SmsPrefixes>,
    /// Failed sign-ins per client address (`--ip-failure-limit`, or the project's own).
    pub ip_throttle: Arc<FailureThrottle>,
    /// Seals provider tokens and TOTP seeds; `None` when no key is configured.
    pub sealer: Option<Arc<Sealer>>,
    /// The WebAuthn relying party of projects that set none of their own.
    pub relying_party: RelyingPartyDefaults,
    /// How many exports run at once, and how long one waits on a client.
    pub exports: Arc<crate::users::bulk_grpc::Exports>,
    /// Counts the codes and links issued (a share of the server's metrics).
    pub codes_issued: crate::metrics::CodesIssued,
    /// Counts credential checks by factor and result (likewise).
    pub verifications: crate::metrics::Verifications,
}

impl AppState {
    /// The password and lockout settings for a call: the server's, with the caller's
    /// project's own policy over them.
    pub fn passwords_for(&self, caller: &crate::auth::Caller) -> PasswordSettings {
        self.passwords.for_project(&caller.policy)
    }

    /// The phone prefixes SMS may go to for a call: its project's own list, or the server's.
    pub fn sms_for(
        &self,
        caller: &crate::auth::Caller,
    ) -> Arc<crate::authenticators::sends::SmsPrefixes> {
        caller
            .policy
            .sms_allowed_prefixes
            .clone()
            .unwrap_or_else(|| self.sms_prefixes.clone())
    }

    /// Whether `password` is in the breached-passwords list (never, without one). The search
    /// reads the file, so it runs on the blocking pool, given only the password's SHA-1.
    pub async fn is_breached(&self, password: &str) -> Result<bool, crate::error::Error> {
        let Some(list) = self.breached.clone() else {
            return Ok(false);
        };
        let hash = crate::crypto::breached::sha1_hex(password);
        let found = tokio::task::spawn_blocking(move || list.contains_hash(&hash))
            .await
            .map_err(|e| crate::error::Error::Internal(e.into()))?;
        found.map_err(|e| {
            crate::error::Error::Internal(
                anyhow::Error::new(e).context("reading the breached-passwords file"),
            )
        })
    }

    /// Whether a sign-in with `password` must change it first: it is in the breached list and
    /// `--breached-at-sign-in` is `change`.
    pub async fn breached_at_sign_in(&self, password: &str) -> Result<bool, crate::error::Error> {
        match self.breached_sign_in {
            crate::config::BreachedSignIn::Change => self.is_breached(password).await,
            crate::config::BreachedSignIn::Allow => Ok(false),
        }
    }

    /// INVALID_ARGUMENT on `field` when a new `password` is in the breached-passwords list.
    pub async fn refuse_breached(
        &self,
        field: &str,
        password: &str,
    ) -> Result<(), crate::error::Error> {
        if self.is_breached(password).await? {
            return Err(crate::error::Error::invalid(
                field,
                crate::crypto::breached::PROBLEM,
            ));
        }
        Ok(())
    }
}

/// Largest request message accepted (API.md).
pub const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;

/// How often refilled addresses are forgotten by the sign-in throttle.
const THROTTLE_PURGE_EVERY: Duration = Duration::from_secs(300);

/// The fully-qualified names of Roster's services, for health statuses.
pub const SERVICE_NAMES: [&str; 4] = [
    "roster.v1.UserService",
    "roster.v1.AuthenticatorService",
    "roster.v1.IdentityService",
    "roster.v1.LogService",
];

/// A bound, ready-to-run server.
pub struct Application {
    listener: TcpListener,
    tls: Option<Arc<crate::tls::ReloadingTls>>,
    metrics_listener: Option<TcpListener>,
    /// The plaintext health-only port, when configured.
    health_listener: Option<TcpListener>,
    metrics: Arc<crate::metrics::Metrics>,
    state: AppState,
    config: ServerConfig,
    feed: Arc<EventFeed>,
    /// Where the event listener connects; without it streams wake by polling only.
    events_listen: Option<tokio_postgres::Config>,
}

/// The ports a server listens on: the gRPC one and the optional metrics and health ones.
/// `serve` binds them before it starts anything else, so a port in use fails start-up at once.
pub struct Listeners {
    grpc: TcpListener,
    metrics: Option<TcpListener>,
    health: Option<TcpListener>,
}

impl Listeners {
    pub async fn bind(listen: SocketAddr, config: &ServerConfig) -> anyhow::Result<Self> {
        Ok(Listeners {
            grpc: TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding {listen} (--listen, ROSTER_LISTEN)"))?,
            metrics: bind_optional(&config.metrics_listen, "metrics", "ROSTER_METRICS_LISTEN")
                .await?,
            health: bind_optional(&config.health_listen, "health", "ROSTER_HEALTH_LISTEN").await?,
        })
    }
}

/// Checks the settings that need neither a database nor a port (argon2 costs, TLS files,
/// encryption keys), so that a mistake fails start-up before a database is started or
/// connected to for nothing. [`Application::build`] checks them again as it uses them.
pub fn check_settings(config: &ServerConfig) -> anyhow::Result<()> {
    crate::crypto::argon2_params(
        config.argon2_memory_kib,
        config.argon2_iterations,
        config.argon2_parallelism,
    )
    .context("--argon2-memory-kib / --argon2-iterations / --argon2-parallelism")?;
    if let Some(files) = config.tls()? {
        crate::tls::ReloadingTls::load(files)?;
    }
    if let Some(spec) = config.encryption_keys()? {
        Sealer::parse(&spec)
            .context("the encryption keys (--encryption-keys or --encryption-keys-file)")?;
    }
    config.breached_passwords()?;
    Ok(())
}

impl Application {
    /// Binds `listen` (and the configured metrics and health addresses) and builds.
    pub async fn build(
        listen: SocketAddr,
        pool: Pool,
        config: ServerConfig,
    ) -> anyhow::Result<Self> {
        Self::build_on(Listeners::bind(listen, &config).await?, pool, config).await
    }

    /// Builds on ports already bound (`serve` binds them before it starts a database).
    pub async fn build_on(
        listeners: Listeners,
        pool: Pool,
        config: ServerConfig,
    ) -> anyhow::Result<Self> {
        // Certificates are read now: a bad path fails start-up, not the first call.
        let tls = config
            .tls()?
            .map(crate::tls::ReloadingTls::load)
            .transpose()?;
        let Listeners {
            grpc: listener,
            metrics: metrics_listener,
            health: health_listener,
        } = listeners;
        let hasher = Hasher::new(
            config.hash_workers(),
            config.argon2_memory_kib,
            config.argon2_iterations,
            config.argon2_parallelism,
        )?;
        let sealer = match config.encryption_keys()? {
            Some(spec) => Some(Arc::new(Sealer::parse(&spec)?)),
            None => {
                tracing::warn!(
                    "no ROSTER_ENCRYPTION_KEYS: provider tokens and TOTP cannot be stored"
                );
                None
            }
        };
        let readers = Arc::new(db::Readers::new(pool.clone(), config.read_connections()));
        let metrics = Arc::new(crate::metrics::Metrics::default());
        // Two reads in flight per shared connection: one at the database while the next
        // queues up.
        let user_reads = Arc::new(UserReads::new(
            readers.clone(),
            2 * config.read_connections(),
            config.db_read_batch.into(),
            metrics.user_read_batch.clone(),
        ));
        // Writes in flight: a statement per core (PostgreSQL works on each on a core of its
        // own), so that calls arriving meanwhile gather into the next ones.
        let user_creates = Arc::new(UserCreates::new(
            pool.clone(),
            config.write_slots(),
            config.db_write_batch.into(),
            metrics.user_create_batch.clone(),
        ));
        let exports = crate::users::bulk_grpc::Exports::new(
            config.export_slots(pool.status().max_size)?,
            (config.export_stall_secs > 0).then(|| Duration::from_secs(config.export_stall_secs)),
        );
        let codes_issued = metrics.codes_issued.clone();
        let verifications = metrics.verifications.clone();
        Ok(Application {
            listener,
            tls,
            metrics_listener,
            health_listener,
            metrics,
            state: AppState {
                readers,
                user_reads,
                user_creates,
                pool,
                hasher: Arc::new(hasher),
                passwords: config.password_settings(),
                sms_prefixes: Arc::new(config.sms_allowed_prefixes.clone()),
                breached: config.breached_passwords()?.map(|list| {
                    tracing::info!(
                        file = %list.path().display(),
                        bytes = list.size_bytes(),
                        "new passwords are checked against a breached-passwords list"
                    );
                    Arc::new(list)
                }),
                breached_sign_in: config.breached_at_sign_in,
                ip_throttle: Arc::new(config.ip_throttle()),
                sealer,
                relying_party: config.relying_party(),
                exports: Arc::new(exports),
                codes_issued,
                verifications,
            },
            config,
            feed: EventFeed::new(),
            events_listen: None,
        })
    }

    /// Lets event streams wake on `LISTEN` over a connection made with `cfg` (besides
    /// polling).
    pub fn listen_for_events(mut self, cfg: tokio_postgres::Config) -> Self {
        self.events_listen = Some(cfg);
        self
    }

    /// The live event feed (to observe its subscribers).
    pub fn event_feed(&self) -> Arc<EventFeed> {
        self.feed.clone()
    }

    /// Where `/metrics` is served, when it is.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// Where the plaintext health-only port listens, when it does.
    pub fn health_addr(&self) -> Option<SocketAddr> {
        self.health_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    pub fn local_addr(&self) -> SocketAddr {
        // A bound listener always has an address.
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Serves until `shutdown` completes, then stops accepting calls and gives in-flight ones
    /// the configured grace period to finish.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let (reporter, health) = tonic_health::server::health_reporter();
        let watcher = tokio::spawn(watch_database(self.state.pool.clone(), reporter.clone()));
        let horizon = self.feed.start(
            self.state.pool.clone(),
            self.events_listen.clone(),
            Duration::from_millis(self.config.event_poll_ms.max(10)),
        );
        // Always: a project may set a retention of its own whatever the server's.
        let retention = tokio::spawn(retention::run(
            self.state.pool.clone(),
            self.config.event_retention_days.min(36_500),
            Duration::from_secs(self.config.event_retention_interval_secs.max(1)),
        ));
        // Every server purges (a project may turn the throttle on whatever the server's
        // limit); concurrent purges skip each other's rows.
        let throttle_purge = tokio::spawn(FailureThrottle::purge_forever(
            self.state.pool.clone(),
            Duration::from_secs(self.config.ip_failure_window_secs),
            THROTTLE_PURGE_EVERY,
        ));
        let mut settings = self.config.published_settings();
        settings["encryption"] = self.state.sealer.is_some().into();
        let registration =
            crate::servers::Registration::new(self.local_addr().to_string(), settings);
        let server_id = registration.id;
        let registry = tokio::spawn(crate::servers::keep_registered(
            self.state.pool.clone(),
            registration,
        ));
        let key_check = tokio::spawn({
            let (pool, sealer) = (self.state.pool.clone(), self.state.sealer.clone());
            async move { crate::crypto::rotation::warn_of_missing_keys(pool, sealer.as_deref()).await }
        });

        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?;

        let verifier = Arc::new(KeyVerifier::new(
            self.state.pool.clone(),
            Duration::from_millis(self.config.key_cache_ms),
        ));
        // Requests may come gzip-compressed (grpcio, grpc-java and grpc-go clients configured
        // for it; without this they got UNIMPLEMENTED); the 4 MiB limit applies to the
        // decompressed message. Responses are not compressed: CPU on every small answer.
        use tonic::codec::CompressionEncoding::Gzip;
        let users = UserServiceServer::new(UserApi::new(self.state.clone()))
            .accept_compressed(Gzip)
            .max_decoding_message_size(MAX_REQUEST_BYTES);
        let authenticators =
            AuthenticatorServiceServer::new(AuthenticatorApi::new(self.state.clone()))
                .accept_compressed(Gzip)
                .max_decoding_message_size(MAX_REQUEST_BYTES);
        let identities = IdentityServiceServer::new(IdentityApi::new(self.state.clone()))
            .accept_compressed(Gzip)
            .max_decoding_message_size(MAX_REQUEST_BYTES);
        let logs = LogServiceServer::new(LogApi::new(self.state.clone(), self.feed.clone()))
            .accept_compressed(Gzip)
            .max_decoding_message_size(MAX_REQUEST_BYTES);

        let in_flight = InFlight::default();
        let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
        let (metrics_stop, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
        let metrics_task = self.metrics_listener.map(|listener| {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, "metrics on http://{addr}/metrics");
            }
            tokio::spawn(crate::metrics::serve(
                listener,
                self.metrics.clone(),
                crate::metrics::Sources {
                    pool: self.state.pool.clone(),
                    hasher: self.state.hasher.clone(),
                    feed: self.feed.clone(),
                    exports: self.state.exports.clone(),
                    in_flight: in_flight.clone(),
                },
                async move {
                    let _ = metrics_stopped.await;
                },
            ))
        });
        let (health_stop, health_stopped) = tokio::sync::oneshot::channel::<()>();
        let health_task = self.health_listener.map(|listener| {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, "grpc.health.v1 (plaintext) on {addr}");
            }
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            tokio::spawn(
                keepalive(Server::builder(), self.config.keepalive_secs)
                    .add_service(health.clone())
                    .serve_with_incoming_shutdown(incoming, async move {
                        let _ = health_stopped.await;
                    }),
            )
        });
        let router = keepalive(Server::builder(), self.config.keepalive_secs)
            .layer(AuthLayer::new(
                verifier,
                in_flight.clone(),
                Arc::new(self.config.rate_limiter()),
                self.metrics.clone(),
                (self.config.call_timeout_secs > 0)
                    .then(|| Duration::from_secs(self.config.call_timeout_secs)),
            ))
            .add_service(health)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(users)
            .add_service(authenticators)
            .add_service(identities)
            .add_service(logs);
        let signal = async move {
            shutdown.await;
            tracing::info!("shutting down: draining in-flight calls");
            let _ = stopping_tx.send(());
        };
        type Serving =
            std::pin::Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>>;
        let (server, tls_task): (Serving, _) = match self.tls.clone() {
            Some(tls) => {
                let reload = Duration::from_secs(self.config.tls_reload_secs);
                let (incoming, task) = crate::tls::incoming(self.listener, tls, reload);
                (
                    Box::pin(router.serve_with_incoming_shutdown(incoming, signal)),
                    Some(task),
                )
            }
            None => {
                // TCP_NODELAY on every accepted connection: without it a response spanning
                // several segments (a page of users) waits out the peer's delayed ACK, ~40 ms
                // per call.
                let incoming = tonic::transport::server::TcpIncoming::from(self.listener)
                    .with_nodelay(Some(true))
                    .with_keepalive(Some(Duration::from_secs(60)));
                (
                    Box::pin(router.serve_with_incoming_shutdown(incoming, signal)),
                    None,
                )
            }
        };
        let grace = Duration::from_secs(self.config.shutdown_grace_secs);
        // After the signal, stop once no call is in flight (idle keep-alive connections do not
        // count; a stream is in flight until it ends), or when the grace period runs out.
        let feed = self.feed.clone();
        let stop_watching = watcher.abort_handle();
        let drained = async {
            let _ = stopping_rx.await;
            // Load balancers that check health (the health port stays up while draining) stop
            // sending new calls here.
            stop_watching.abort();
            set_health(&reporter, ServingStatus::NotServing).await;
            // Live event streams would otherwise hold the drain for the whole grace period;
            // exports and imports count as in flight until their last message and may finish.
            feed.close();
            let deadline = tokio::time::Instant::now() + grace;
            while in_flight.count() > 0 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            if in_flight.count() > 0 {
                tracing::warn!(
                    grace_secs = grace.as_secs(),
                    "calls still running after the grace period; stopping anyway"
                );
            } else {
                // Let the last responses' frames reach their sockets.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        let result = tokio::select! {
            r = server => r.context("serving"),
            _ = drained => Ok(()),
        };
        watcher.abort();
        let _ = metrics_stop.send(());
        let _ = health_stop.send(());
        if let Some(t) = tls_task {
            t.abort();
        }
        if let Some(h) = health_task {
            h.abort();
        }
        if let Some(m) = metrics_task {
            m.abort();
        }
        if let Some(h) = horizon {
            h.abort();
        }
        retention.abort();
        key_check.abort();
        throttle_purge.abort();
        registry.abort();
        crate::servers::deregister(&self.state.pool, server_id).await;
        result
    }
}

/// Calls one HTTP/2 connection may have open at once. tonic leaves it unbounded, so one
/// client (a leak, or a key holder opening streams it never finishes) could make the server
/// keep state for any number until `--call-timeout-secs`; clients and proxies wait for a free
/// stream (or open another connection) at the bound. Far above what a channel multiplexes
/// in practice (the benches run 32 on one).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 1024;

/// The HTTP/2 settings of every listener: the stream bound above, and PINGs after `secs` of
/// silence with the connection closed when one goes unanswered for as long again (0: none).
fn keepalive(server: Server, secs: u64) -> Server {
    let every = (secs > 0).then(|| Duration::from_secs(secs));
    server
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .http2_keepalive_interval(every)
        .http2_keepalive_timeout(every)
}

/// Binds an optional side port (`""`: none).
async fn bind_optional(
    addr: &str,
    what: &str,
    variable: &str,
) -> anyhow::Result<Option<TcpListener>> {
    match addr.trim() {
        "" => Ok(None),
        addr => {
            let flag = format!("--{what}-listen, {variable}; empty turns it off");
            Ok(Some(TcpListener::bind(addr).await.with_context(|| {
                format!("binding the {what} address {addr} ({flag})")
            })?))
        }
    }
}

/// Sets the overall status and every service's.
async fn set_health(reporter: &tonic_health::server::HealthReporter, status: ServingStatus) {
    reporter.set_service_status("", status).await;
    for name in SERVICE_NAMES {
        reporter.set_service_status(name, status).await;
    }
}

/// Keeps health statuses in line with whether the database answers.
async fn watch_database(pool: Pool, reporter: tonic_health::server::HealthReporter) {
    let mut last: Option<bool> = None;
    loop {
        let up = matches!(
            tokio::time::timeout(Duration::from_secs(2), async {
                let client = db::client(&pool).await?;
                client
                    .simple_query("SELECT 1")
                    .await
                    .map_err(crate::error::Error::from)
            })
            .await,
            Ok(Ok(_))
        );
        if last != Some(up) {
            let status = if up {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            set_health(&reporter, status).await;
            if up {
                tracing::info!("database reachable: serving");
            } else {
                tracing::warn!("database unreachable: health is NOT_SERVING");
            }
            last = Some(up);
        }
        tokio::time::sleep(Duration::from_secs(if up { 2 } else { 1 })).await;
    }
}

/// Resolves on SIGINT or SIGTERM.
pub fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    // Registered now, not when the future is first polled: a SIGTERM arriving any time after
    // "roster listening" is logged must drain, not kill the process (the default action).
    let mut term = signal(SignalKind::terminate()).context("handling SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("handling SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
    })
}

/// The name of the database Roster uses inside its embedded cluster.
pub const EMBEDDED_DATABASE: &str = "roster";

/// Starts (initialising on first use) the embedded cluster in `dir` and makes sure Roster's
/// database exists; returns the cluster and the URL of that database.
pub async fn start_embedded(dir: &Path) -> anyhow::Result<(EmbeddedPostgres, String)> {
    let opts = EmbeddedOptions {
        dir: dir.to_path_buf(),
        unsafe_fast: false,
    };
    let pg = tokio::task::spawn_blocking(move || EmbeddedPostgres::start(&opts)).await??;
    let (client, conn) =
        tokio_postgres::connect(&pg.connection_string("postgres"), tokio_postgres::NoTls)
            .await
            .context("connecting to the embedded PostgreSQL")?;
    let conn = tokio::spawn(conn);
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_database WHERE datname = $1",
            &[&EMBEDDED_DATABASE],
        )
        .await?
        .is_some();
    if !exists {
        client
            .batch_execute(&format!("CREATE DATABASE {EMBEDDED_DATABASE}"))
            .await?;
    }
    drop(client);
    let _ = conn.await;
    let url = pg.connection_string(EMBEDDED_DATABASE);
    Ok((pg, url))
}

/// Makes sure the `default` project and a working all-scopes dev key exist; the key is kept
/// in `<dir>/dev-key` (mode 0600). Returns the key file's path.
async fn ensure_dev_key(pool: &Pool, dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("dev-key");
    let mut client = pool.get().await?;
    let project = match crate::admin::find_project(&**client, "default").await {
        Ok(p) => p,
        Err(_) => crate::admin::create_project(&mut **client, "default").await?,
    };
    if let Ok(token) = std::fs::read_to_string(&path) {
        let keys = crate::admin::list_keys(&**client, project.id).await?;
        let usable = keys.iter().any(|k| {
            k.revoked_at.is_none() && token.trim().starts_with(&format!("rst_{}_", k.id.simple()))
        });
        if usable {
            return Ok(path);
        }
    }
    let (_, token) =
        crate::admin::create_key(&mut **client, project.id, "dev", &["*".to_string()], None)
            .await?;
    std::fs::write(&path, format!("{token}\n"))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(path)
}

/// Where the embedded default keeps its encryption keys, in the data directory `dir`.
pub fn embedded_encryption_keys(dir: &Path) -> std::path::PathBuf {
    dir.join("encryption-keys")
}

/// The embedded default's encryption keys: `<dir>/encryption-keys` (mode 0600), made with one
/// random key the first time. Losing the file makes stored provider tokens unreadable.
fn ensure_encryption_keys(dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = embedded_encryption_keys(dir);
    if !path.exists() {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        writeln!(f, "{}", Sealer::generate_spec("k1"))?;
        tracing::info!(file = %path.display(), "generated an encryption key for secrets at rest");
    }
    Ok(path)
}

/// `roster serve`: connect (or start the embedded cluster), migrate, serve until a signal.
pub async fn serve(cfg: ServeConfig) -> anyhow::Result<()> {
    // Settings and ports first: a mistake there should not wait for (or leave behind) a
    // database start-up.
    check_settings(&cfg.server)?;
    cfg.server.export_slots(cfg.database.db_pool_size)?;
    let listeners = Listeners::bind(cfg.listen, &cfg.server).await?;
    let (embedded, url) = match cfg.database.url()? {
        Some(url) => (None, url),
        None => {
            tracing::info!(dir = %cfg.database.data_dir.display(), "no DATABASE_URL: starting a private PostgreSQL");
            let (pg, url) = start_embedded(&cfg.database.data_dir).await?;
            (Some(pg), url)
        }
    };
    let result = serve_on(&cfg, listeners, &url, embedded.is_some()).await;
    if let Some(pg) = embedded {
        tracing::info!("stopping the private PostgreSQL");
        tokio::task::spawn_blocking(move || pg.stop()).await?;
    }
    result
}

async fn serve_on(
    cfg: &ServeConfig,
    listeners: Listeners,
    url: &str,
    embedded: bool,
) -> anyhow::Result<()> {
    let pool = db::connect_pool(url, cfg.database.db_pool_size, cfg.database.timeout())?;
    let mut client = db::retry_unavailable(cfg.database.wait(), || db::client(&pool)).await?;
    if !cfg.no_migrate {
        crate::db::migrate::migrate(&mut client).await?;
    }
    drop(client);
    let mut server = cfg.server.clone();
    if embedded && server.encryption_keys()?.is_none() {
        server.encryption_keys_file = Some(ensure_encryption_keys(&cfg.database.data_dir)?);
    }
    let app = Application::build_on(listeners, pool.clone(), server)
        .await?
        .listen_for_events(db::pg_config(url, cfg.database.timeout())?);
    let addr = app.local_addr();
    if embedded {
        let key_file = ensure_dev_key(&pool, &cfg.database.data_dir).await?;
        tracing::info!(
            "dev key (all scopes, project 'default') is in {k}. Try:\n  \
             buf curl --protocol grpc --http2-prior-knowledge \\\n    \
             -H \"authorization: Bearer $(cat {k})\" \\\n    \
             -d '{{\"user\":{{\"email\":\"ada@example.com\"}}}}' \\\n    \
             http://{addr}/roster.v1.UserService/CreateUser",
            k = key_file.display(),
        );
    }
    let shutdown = shutdown_signal()?;
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    tracing::info!(workers, %addr, "roster listening");
    app.run_until(shutdown).await
}

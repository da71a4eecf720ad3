//! What every benchmark needs: a PostgreSQL (a private cluster from the installed binaries in
//! a temporary directory, or `DATABASE_URL`), a migrated database with a project and an
//! all-scopes key, and the real server on an ephemeral port. Benchmarks print figures; they
//! never assert on timings.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use roster::config::ServerConfig;
use roster::db::embedded::{EmbeddedOptions, EmbeddedPostgres};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::transport::Channel;

// The allocator the `roster` binary ships with, so that a server run inside a bench measures
// what production runs.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The number in environment variable `name`, else `default`.
pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// The UpdateUser the benchmarks send: user `id`'s display name set to `n<k>`, no etag.
pub fn rename(id: String, k: u64) -> roster::pb::v1::UpdateUserRequest {
    use roster::pb::v1 as pb;
    pb::UpdateUserRequest {
        user: Some(pb::User {
            id,
            display_name: format!("n{k}"),
            ..Default::default()
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["display_name".into()],
        }),
        etag: String::new(),
    }
}

/// Puts the bench key on every call.
#[derive(Clone)]
pub struct Key(pub MetadataValue<Ascii>);

impl Interceptor for Key {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

pub struct BenchEnv {
    pub pool: roster::db::Pool,
    pub url: String,
    pub channel: Channel,
    pub key: Key,
    pub project_id: uuid::Uuid,
    pub addr: std::net::SocketAddr,
    /// The server's metrics endpoint, when the config asked for one.
    pub metrics_addr: Option<std::net::SocketAddr>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    pg: Option<EmbeddedPostgres>,
    dir: Option<std::path::PathBuf>,
}

impl BenchEnv {
    pub async fn start(config: ServerConfig) -> BenchEnv {
        if std::env::var_os("RUST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .try_init();
        }
        let (url, pg, dir) = match std::env::var("DATABASE_URL") {
            Ok(url) if !url.is_empty() => (url, None, None),
            _ => {
                let dir = std::env::temp_dir().join(format!("roster-bench-{}", std::process::id()));
                let opts = EmbeddedOptions {
                    dir: dir.clone(),
                    unsafe_fast: false,
                };
                let pg = tokio::task::spawn_blocking(move || EmbeddedPostgres::start(&opts))
                    .await
                    .unwrap()
                    .expect("starting PostgreSQL for the benchmark");
                (pg.connection_string("postgres"), Some(pg), Some(dir))
            }
        };
        let (mut client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        let conn = tokio::spawn(conn);
        roster::db::migrate::migrate(&mut client)
            .await
            .expect("migrate");
        drop(client);
        let _ = conn.await;

        let pool = roster::db::connect_pool(&url, 32, Duration::from_secs(10)).expect("pool");
        let (project_id, token) = {
            let mut client = pool.get().await.expect("db");
            let name = format!("bench-{}", uuid::Uuid::now_v7().simple());
            let p = roster::admin::create_project(&mut **client, &name)
                .await
                .expect("project");
            let (_, token) =
                roster::admin::create_key(&mut **client, p.id, "bench", &["*".into()], None)
                    .await
                    .expect("key");
            (p.id, token)
        };
        let app = roster::server::Application::build(
            "127.0.0.1:0".parse().unwrap(),
            pool.clone(),
            config,
        )
        .await
        .expect("build")
        .listen_for_events(roster::db::pg_config(&url, Duration::from_secs(10)).unwrap());
        let addr = app.local_addr();
        let metrics_addr = app.metrics_addr();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(app.run_until(async move {
            let _ = rx.await;
        }));
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .expect("connect to the server");
        BenchEnv {
            pool,
            url,
            channel,
            key: Key(format!("Bearer {token}").parse().unwrap()),
            project_id,
            addr,
            metrics_addr,
            shutdown: Some(tx),
            pg,
            dir,
        }
    }

    /// The value of the sample `name` (e.g. `roster_user_read_batch_size_sum`) on the metrics
    /// endpoint, if the server has one and shows it.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(self.metrics_addr?)
            .await
            .ok()?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).await.ok()?;
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    /// A fresh HTTP/2 connection, so concurrent load is not serialised on one.
    pub async fn new_channel(&self) -> Channel {
        let uri = format!("http://{}", self.addr);
        tonic::transport::Endpoint::from_shared(uri)
            .unwrap()
            .connect()
            .await
            .unwrap()
    }
}

impl Drop for BenchEnv {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(pg) = self.pg.take() {
            pg.stop();
        }
        if let Some(dir) = self.dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Latency percentiles of a sample, in milliseconds.
pub fn percentiles(samples: &mut [Duration]) -> (f64, f64) {
    samples.sort();
    let at = |q: f64| {
        let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples[i].as_secs_f64() * 1000.0
    };
    (at(0.50), at(0.99))
}

/// A memory figure (`VmRSS`, `VmHWM`) of process `pid` from /proc, in MiB.
pub fn memory_mib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

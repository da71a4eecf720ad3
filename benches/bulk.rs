//! Bulk benchmark: ImportUsers and ExportUsers against raw COPY of the same rows, in one run
//! on one database, plus the peak memory of server and client.
//!
//! 1. `BENCH_USERS` (default 1,000,000) synthetic users with pre-made argon2id hashes.
//! 2. Raw baseline in: binary `COPY users FROM STDIN` of those rows over one connection, then
//!    over two. The table is emptied before each load, so none pays for another's index growth.
//! 3. ImportUsers of the same rows over gRPC (CREATE_ONLY, one USER_IMPORTED event per user,
//!    which raw COPY does not write, carrying the run id as `roster import` sends it;
//!    `BENCH_NO_RUN_ID=1` leaves it out), against a separate `roster serve` process (so its
//!    memory and CPU are its own).
//! 4. VACUUM (ANALYZE), then the raw baseline out: binary `COPY (SELECT ... ORDER BY id) TO
//!    STDOUT` decoding every row, against ExportUsers with hashes, decoding every message.
//!
//! Peak RSS (VmHWM, reset before each phase) is read from /proc for the server process and for
//! this process (the client). Run: `cargo bench --bench bulk`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::pin::pin;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHasher, SaltString};
use futures_util::StreamExt;
use roster::config::ServerConfig;
use roster::pb::v1 as pb;
use roster::pb::v1::user_service_client::UserServiceClient;
use support::{BenchEnv, memory_mib};
use tokio_postgres::binary_copy::{BinaryCopyInWriter, BinaryCopyOutStream};
use tokio_postgres::types::{Json, ToSql, Type};
use uuid::Uuid;

const HASHES: usize = 64;

fn users() -> usize {
    std::env::var("BENCH_USERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000)
}

/// Pre-made argon2id hashes at the default parameters, cycled over the users.
fn hashes() -> Vec<String> {
    let params = argon2::Params::new(19456, 2, 1, None).unwrap();
    let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    (0..HASHES)
        .map(|i| {
            let salt = SaltString::generate(&mut rand::rngs::OsRng);
            a.hash_password(format!("password {i}").as_bytes(), &salt)
                .unwrap()
                .to_string()
        })
        .collect()
}

/// The synthetic user `i`.
struct Synthetic {
    id: Uuid,
    email: String,
    external_id: String,
    given: String,
    family: String,
    display: String,
    hash: String,
}

fn synthetic(i: usize, tag: &str, hashes: &[String]) -> Synthetic {
    Synthetic {
        id: Uuid::now_v7(),
        email: format!("user{i}.{tag}@bench.example"),
        external_id: format!("{tag}-{i}"),
        given: format!("Given{}", i % 1000),
        family: format!("Family{}", i % 997),
        display: format!("User Number {i}"),
        hash: hashes[i % hashes.len()].clone(),
    }
}

fn app_metadata(i: usize) -> serde_json::Value {
    serde_json::json!({"plan": if i.is_multiple_of(3) { "pro" } else { "free" }, "seats": i % 10})
}

/// Peak resident memory of `pid` in MiB since the last reset.
fn peak_rss_mib(pid: u32) -> f64 {
    memory_mib(pid, "VmHWM:")
}

fn reset_peak_rss(pid: u32) {
    // Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// Raw binary COPY of the `n` synthetic rows into `users` over `conns` connections; rows/s.
async fn raw_copy_in(
    env: &BenchEnv,
    project: Uuid,
    n: usize,
    hashes: &[String],
    conns: usize,
) -> f64 {
    let start = Instant::now();
    let tasks: Vec<_> = (0..conns)
        .map(|c| {
            let (pool, hashes) = (env.pool.clone(), hashes.to_vec());
            let range = (c * n / conns)..((c + 1) * n / conns);
            tokio::spawn(async move { copy_rows(pool, project, range, hashes).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    n as f64 / start.elapsed().as_secs_f64()
}

async fn copy_rows(
    pool: roster::db::Pool,
    project: Uuid,
    range: std::ops::Range<usize>,
    hashes: Vec<String>,
) {
    let client = pool.get().await.unwrap();
    let sink = client
        .copy_in(
            "COPY users (project_id, id, email, external_id, given_name, family_name,
                display_name, app_metadata, password_hash, password_changed_at, status,
                created_at, updated_at) FROM STDIN (FORMAT binary)",
        )
        .await
        .unwrap();
    let types = [
        Type::UUID,
        Type::UUID,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::JSONB,
        Type::TEXT,
        Type::TIMESTAMPTZ,
        Type::INT2,
        Type::TIMESTAMPTZ,
        Type::TIMESTAMPTZ,
    ];
    let mut writer = pin!(BinaryCopyInWriter::new(sink, &types));
    let now = chrono::Utc::now();
    for i in range {
        let u = synthetic(i, "raw", &hashes);
        let meta = Json(app_metadata(i));
        let row: [&(dyn ToSql + Sync); 13] = [
            &project,
            &u.id,
            &u.email,
            &u.external_id,
            &u.given,
            &u.family,
            &u.display,
            &meta,
            &u.hash,
            &now,
            &1i16,
            &now,
            &now,
        ];
        writer.as_mut().write(&row).await.unwrap();
    }
    writer.finish().await.unwrap();
}

/// Empties the users table (and what hangs off it), so every load starts from the same state.
async fn empty_users(env: &BenchEnv) {
    let client = env.pool.get().await.unwrap();
    client
        .batch_execute("TRUNCATE users CASCADE")
        .await
        .unwrap();
    client
        .batch_execute("VACUUM (ANALYZE) users")
        .await
        .unwrap();
}

/// CPU seconds (user + system) `pid` has used so far.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at state, field 3.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    (f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0)) / 100.0
}

/// Current resident memory of `pid` in MiB.
fn rss_mib(pid: u32) -> f64 {
    memory_mib(pid, "VmRSS:")
}

async fn grpc_import(
    channel: tonic::transport::Channel,
    key: support::Key,
    n: usize,
    hashes: Vec<String>,
) -> (f64, pb::ImportSummary) {
    let mut users = UserServiceClient::with_interceptor(channel, key);
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    let start = Instant::now();
    tokio::spawn(async move {
        let options = pb::ImportUsersRequest {
            item: Some(pb::import_users_request::Item::Options(pb::ImportOptions {
                mode: pb::ImportMode::CreateOnly as i32,
                // As `roster import` sends it: each USER_IMPORTED event carries it.
                run_id: match std::env::var_os("BENCH_NO_RUN_ID") {
                    Some(_) => String::new(),
                    None => uuid::Uuid::now_v7().to_string(),
                },
                ..Default::default()
            })),
        };
        tx.send(options).await.unwrap();
        for i in 0..n {
            let u = synthetic(i, "imp", &hashes);
            let meta = roster::wire::json_to_struct(app_metadata(i).as_object().unwrap());
            let r = pb::ImportRecord {
                user: Some(pb::User {
                    email: u.email,
                    external_id: u.external_id,
                    given_name: u.given,
                    family_name: u.family,
                    display_name: u.display,
                    app_metadata: Some(meta),
                    ..Default::default()
                }),
                user_id: u.id.to_string(),
                password_hash: u.hash,
                ..Default::default()
            };
            let msg = pb::ImportUsersRequest {
                item: Some(pb::import_users_request::Item::Record(r)),
            };
            if tx.send(msg).await.is_err() {
                break;
            }
        }
    });
    let mut stream = users
        .import_users(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut summary = None;
    while let Some(m) = stream.message().await.unwrap() {
        if let Some(pb::import_users_response::Item::Summary(s)) = m.item {
            summary = Some(s);
        }
    }
    (
        n as f64 / start.elapsed().as_secs_f64(),
        summary.expect("summary"),
    )
}

async fn raw_copy_out(env: &BenchEnv, project: Uuid) -> (usize, f64) {
    let client = env.pool.get().await.unwrap();
    let start = Instant::now();
    let stream = client
        .copy_out(&format!(
            "COPY (SELECT {}, password_hash FROM users WHERE project_id = '{project}' ORDER BY id)
             TO STDOUT (FORMAT binary)",
            roster::users::store::USER_COLUMNS
        ))
        .await
        .unwrap();
    let types = [
        Type::UUID,
        Type::TEXT,
        Type::TEXT,
        Type::BOOL,
        Type::TEXT,
        Type::BOOL,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::INT2,
        Type::JSONB,
        Type::JSONB,
        Type::BOOL,
        Type::TIMESTAMPTZ,
        Type::BOOL,
        Type::INT8,
        Type::TIMESTAMPTZ,
        Type::TEXT,
        Type::TIMESTAMPTZ,
        Type::TEXT,
        Type::TIMESTAMPTZ,
        Type::TIMESTAMPTZ,
        Type::INT8,
        Type::INT2_ARRAY,
        Type::INT2,
        Type::TEXT,
    ];
    let mut rows = pin!(BinaryCopyOutStream::new(stream, &types));
    let mut n = 0;
    while let Some(row) = rows.next().await {
        let row = row.unwrap();
        // Decode every column, as the export does.
        let _: Uuid = row.get(0);
        let _: Option<String> = row.get(2);
        let _: serde_json::Value = row.get(14);
        let _: serde_json::Value = row.get(15);
        let _: Vec<i16> = row.get(27);
        let _: Option<String> = row.get(29);
        n += 1;
    }
    (n, n as f64 / start.elapsed().as_secs_f64())
}

async fn grpc_export(channel: tonic::transport::Channel, key: support::Key) -> (usize, f64) {
    let mut users = UserServiceClient::with_interceptor(channel, key)
        .max_decoding_message_size(16 * 1024 * 1024);
    let start = Instant::now();
    let mut stream = users
        .export_users(pb::ExportUsersRequest {
            include_password_hashes: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    while let Some(m) = stream.message().await.unwrap() {
        assert!(m.user.is_some());
        n += 1;
    }
    (n, n as f64 / start.elapsed().as_secs_f64())
}

/// The server process, killed however the benchmark ends.
struct ServerProcess(Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl ServerProcess {
    fn id(&self) -> u32 {
        self.0.id()
    }
}

/// `roster serve` as its own process on `url`, on a free port.
fn spawn_server(url: &str) -> (ServerProcess, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(env!("CARGO_BIN_EXE_roster"))
        .args([
            "serve",
            "--no-migrate",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .env("DATABASE_URL", url)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("start roster serve");
    (ServerProcess(child), format!("http://127.0.0.1:{port}"))
}

#[tokio::main]
async fn main() {
    let n = users();
    let env = BenchEnv::start(ServerConfig::default()).await;
    let (server, uri) = spawn_server(&env.url);
    let channel = {
        let started = Instant::now();
        loop {
            match tonic::transport::Endpoint::from_shared(uri.clone())
                .unwrap()
                .connect()
                .await
            {
                Ok(c) => break c,
                Err(_) if started.elapsed() < Duration::from_secs(30) => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(e) => panic!("the server did not start: {e}"),
            }
        }
    };
    let me = std::process::id();
    println!("bulk benchmark: {n} users; pre-making {HASHES} argon2id hashes");
    let hashes = tokio::task::spawn_blocking(hashes).await.unwrap();

    let raw_project = {
        let mut client = env.pool.get().await.unwrap();
        roster::admin::create_project(&mut **client, "bench-raw")
            .await
            .unwrap()
            .id
    };
    // Each load starts from an empty table, so none pays for another's index growth.
    let copy_in = raw_copy_in(&env, raw_project, n, &hashes, 1).await;
    println!("raw COPY in, 1 connection:  {copy_in:>9.0} rows/s");
    empty_users(&env).await;
    let copy_in_2 = raw_copy_in(&env, raw_project, n, &hashes, 2).await;
    println!("raw COPY in, 2 connections: {copy_in_2:>9.0} rows/s");
    empty_users(&env).await;

    let (server_before, client_before) = (rss_mib(server.id()), rss_mib(me));
    reset_peak_rss(server.id());
    reset_peak_rss(me);
    let cpu_before = (cpu_secs(server.id()), cpu_secs(me));
    let started = Instant::now();
    let (import, summary) = grpc_import(channel.clone(), env.key.clone(), n, hashes).await;
    let wall = started.elapsed().as_secs_f64();
    let (import_server, import_client) = (peak_rss_mib(server.id()), peak_rss_mib(me));
    let cpu = (
        cpu_secs(server.id()) - cpu_before.0,
        cpu_secs(me) - cpu_before.1,
    );
    assert_eq!(summary.created as usize, n, "{summary:?}");
    println!(
        "ImportUsers (with events):   {import:>9.0} rows/s  ratio {:.2} vs 1 connection (goal >= 0.6), {:.2} vs 2",
        import / copy_in,
        import / copy_in_2
    );
    println!(
        "  peak RSS during import: server {import_server:.0} MiB (at start {server_before:.0}), client {import_client:.0} MiB (at start {client_before:.0})"
    );
    println!(
        "  CPU during import ({wall:.1} s): server {:.1} s, client {:.1} s (the rest is PostgreSQL)",
        cpu.0, cpu.1
    );

    {
        let client = env.pool.get().await.unwrap();
        client
            .batch_execute("VACUUM (ANALYZE) users")
            .await
            .unwrap();
    }
    let (raw_n, copy_out) = raw_copy_out(&env, env.project_id).await;
    assert_eq!(raw_n, n);
    println!("raw COPY out (decoded):     {copy_out:>9.0} rows/s");
    let (server_before, client_before) = (rss_mib(server.id()), rss_mib(me));
    reset_peak_rss(server.id());
    reset_peak_rss(me);
    let (exported, export) = grpc_export(channel, env.key.clone()).await;
    let (export_server, export_client) = (peak_rss_mib(server.id()), peak_rss_mib(me));
    assert_eq!(exported, n);
    println!(
        "ExportUsers (with hashes):   {export:>9.0} rows/s  ratio {:.2} (goal >= 0.5)",
        export / copy_out
    );
    println!(
        "  peak RSS during export: server {export_server:.0} MiB (at start {server_before:.0}), client {export_client:.0} MiB (at start {client_before:.0})"
    );
    drop(server);
}

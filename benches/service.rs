//! Service benchmark, side by side with pgbench on the same database in the same run:
//! GetUser rps vs. a pgbench unique-index select at the same concurrency, CreateUser rps vs. a
//! pgbench single-row INSERT, and ListUsers latency at page 10,000 vs. page 1 over
//! `BENCH_USERS` (default 1,000,000) users. Prints ratios and p50/p99. Each comparison
//! alternates its two sides over three rounds of `BENCH_SECS`/2 seconds. With h2load on PATH
//! (Debian's nghttp2-client) GetUser is also measured from that C load generator (8 calls in
//! flight on 8 connections and on one, as a gRPC channel multiplexes them; 32 on 32), against
//! pgbench reading the same row.
//! LookupUser by email is compared with pgbench's select by `lower(email)` at 8 and 32 clients,
//! LookupUserByIdentity with pgbench's join of identity and user at 8 and 32 clients, UpdateUser
//! (one field) with pgbench's single-row UPDATE by a unique key.
//! Run: `cargo bench --bench service` (`BENCH_SECS`, default 10;
//! `BENCH_ONLY=get,lookup,identity,h2load,create,update,list` runs only the named comparisons;
//! `BENCH_READ_BATCH=1` turns GetUser, LookupUser and LookupUserByIdentity coalescing off).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::pin::pin;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use roster::config::ServerConfig;
use roster::pb::v1 as pb;
use roster::pb::v1::identity_service_client::IdentityServiceClient;
use roster::pb::v1::user_service_client::UserServiceClient;
use support::{BenchEnv, env_or, percentiles, rename};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use uuid::Uuid;

const CONCURRENCY: usize = 8;
/// Alternating rounds per comparison.
const ROUNDS: usize = 3;

/// Loads `n` users into the bench project with binary COPY (external_id `u-<i>`).
async fn seed(env: &BenchEnv, n: usize) -> Vec<Uuid> {
    let client = env.pool.get().await.unwrap();
    let sink = client
        .copy_in(
            "COPY users (project_id, id, email, external_id, display_name, status, created_at,
                updated_at) FROM STDIN (FORMAT binary)",
        )
        .await
        .unwrap();
    let types = [
        Type::UUID,
        Type::UUID,
        Type::TEXT,
        Type::TEXT,
        Type::TEXT,
        Type::INT2,
        Type::TIMESTAMPTZ,
        Type::TIMESTAMPTZ,
    ];
    let mut writer = pin!(BinaryCopyInWriter::new(sink, &types));
    let start = chrono::Utc::now() - chrono::Duration::days(1);
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let id = Uuid::now_v7();
        ids.push(id);
        // Distinct creation times, so the default order (created_at, id) is a real keyset.
        let at = start + chrono::Duration::microseconds(i as i64);
        let row: [&(dyn ToSql + Sync); 8] = [
            &env.project_id,
            &id,
            &format!("user{i}@bench.example"),
            &format!("u-{i}"),
            &format!("User {i}"),
            &1i16,
            &at,
            &at,
        ];
        writer.as_mut().write(&row).await.unwrap();
    }
    writer.finish().await.unwrap();
    client
        .batch_execute("VACUUM (ANALYZE) users")
        .await
        .unwrap();
    ids
}

type Keyed =
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, support::Key>;
type Users = UserServiceClient<Keyed>;
type Identities = IdentityServiceClient<Keyed>;

/// A client of one of the server's services, on a channel of its own with the bench key.
trait Client: Clone + Send + 'static {
    fn new(channel: tonic::transport::Channel, key: support::Key) -> Self;
}

impl Client for Users {
    fn new(channel: tonic::transport::Channel, key: support::Key) -> Self {
        UserServiceClient::with_interceptor(channel, key)
    }
}

impl Client for Identities {
    fn new(channel: tonic::transport::Channel, key: support::Key) -> Self {
        IdentityServiceClient::with_interceptor(channel, key)
    }
}

/// Runs `work` from `clients` tasks (each on its own connection) for `d`: calls per second.
async fn rate<C, F, Fut>(env: &BenchEnv, d: Duration, clients: usize, work: F) -> f64
where
    C: Client,
    F: Fn(C, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let work = Arc::new(work);
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let client = C::new(env.new_channel().await, env.key.clone());
        let (work, done) = (work.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            while start.elapsed() < d {
                let n = done.fetch_add(1, Ordering::Relaxed);
                work(client.clone(), n).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// GetUser of `id` from h2load over `conns` connections with `streams` calls in flight on
/// each, for `secs`: calls per second, or None without h2load.
fn h2load_get(env: &BenchEnv, id: &Uuid, secs: u64, conns: usize, streams: usize) -> Option<f64> {
    let request = pb::GetUserRequest { id: id.to_string() };
    h2load(env, "GetUser", request, secs, conns, streams)
}

/// h2load sending the one UserService `method` call `request` over and over: calls per second
/// (None without h2load on PATH).
fn h2load(
    env: &BenchEnv,
    method: &str,
    request: impl prost::Message,
    secs: u64,
    conns: usize,
    streams: usize,
) -> Option<f64> {
    let msg = request.encode_to_vec();
    // A gRPC message: uncompressed flag, big-endian length, the protobuf bytes.
    let mut body = vec![0u8];
    body.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    body.extend_from_slice(&msg);
    let file = std::env::temp_dir().join(format!("roster-h2load-{}.bin", Uuid::now_v7()));
    std::fs::write(&file, body).unwrap();
    let out = Command::new("h2load")
        .args([
            "-c",
            &conns.to_string(),
            "-m",
            &streams.to_string(),
            "-t",
            "1",
        ])
        .args(["-D", &secs.to_string(), "-d"])
        .arg(&file)
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
        .args([
            "-H",
            &format!("authorization: {}", env.key.0.to_str().unwrap()),
        ])
        .arg(format!(
            "http://{}/roster.v1.UserService/{method}",
            env.addr
        ))
        .output()
        .ok()?;
    let _ = std::fs::remove_file(&file);
    let text = String::from_utf8_lossy(&out.stdout);
    let failed = text
        .lines()
        .find(|l| l.starts_with("requests:"))
        .is_none_or(|l| !l.contains(" 0 failed, 0 errored"));
    assert!(!failed, "h2load said: {text}");
    text.lines().find_map(|l| {
        l.strip_prefix("finished in ")?
            .split(", ")
            .nth(1)?
            .strip_suffix(" req/s")?
            .parse()
            .ok()
    })
}

/// `work` (as in [`rate`]) and pgbench running `script`, both from `clients` clients,
/// alternating over ROUNDS rounds of `round`: their mean rates.
async fn alternating<C, F, Fut>(
    env: &BenchEnv,
    round: Duration,
    clients: usize,
    work: F,
    script: &str,
) -> (f64, f64)
where
    C: Client,
    F: Fn(C, u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let (mut ours, mut theirs) = (0.0, 0.0);
    for _ in 0..ROUNDS {
        ours += rate(env, round, clients, work.clone()).await;
        theirs += pgbench(&env.url, script, round.as_secs(), clients);
    }
    (ours / ROUNDS as f64, theirs / ROUNDS as f64)
}

/// pgbench with `script` at `clients` clients for `secs`: transactions per second.
fn pgbench(url: &str, script: &str, secs: u64, clients: usize) -> f64 {
    let file = std::env::temp_dir().join(format!("roster-pgbench-{}.sql", Uuid::now_v7()));
    std::fs::write(&file, script).unwrap();
    let out = Command::new("pgbench")
        .args(["-n", "-M", "prepared", "-T", &secs.to_string()])
        .args(["-c", &clients.to_string(), "-j", "2", "-f"])
        .arg(&file)
        .arg(url)
        .output()
        .expect("pgbench (from the PostgreSQL packages) on PATH");
    let _ = std::fs::remove_file(&file);
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| {
            let l = l.trim();
            l.strip_prefix("tps = ")
                .and_then(|r| r.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or_else(|| {
            panic!(
                "pgbench said: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

async fn list_latency(users: &mut Users, token: &str, times: usize) -> (f64, f64) {
    let mut samples = Vec::with_capacity(times);
    for _ in 0..times {
        let t = Instant::now();
        let page = users
            .list_users(pb::ListUsersRequest {
                page_size: 100,
                page_token: token.to_string(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        samples.push(t.elapsed());
        assert_eq!(page.users.len(), 100);
    }
    percentiles(&mut samples)
}

/// The (sum, count) of the server's histogram `name` (a sample name with its labels).
async fn histogram(env: &BenchEnv, name: &str) -> (f64, f64) {
    let sample = |suffix: &str| match name.split_once('{') {
        Some((n, labels)) => format!("{n}_{suffix}{{{labels}"),
        None => format!("{name}_{suffix}"),
    };
    let sum = env.metric(&sample("sum")).await.unwrap_or(0.0);
    let count = env.metric(&sample("count")).await.unwrap_or(0.0);
    (sum, count)
}

/// What the server saw of `method`'s calls (`Service/Method` of `roster.v1`, coalesced as
/// `roster_user_<what>_batch_size`): readings of (calls per statement, server-side latency)
/// to print after a phase.
struct ServerSide {
    batch: String,
    latency: String,
    before: [(f64, f64); 2],
}

impl ServerSide {
    async fn start(env: &BenchEnv, what: &str, method: &str) -> Self {
        let batch = format!("roster_user_{what}_batch_size");
        let latency = format!("roster_rpc_duration_seconds{{method=\"/roster.v1.{method}\"}}");
        let before = [histogram(env, &batch).await, histogram(env, &latency).await];
        ServerSide {
            batch,
            latency,
            before,
        }
    }

    /// Prints calls per statement and the server's mean latency since `start`.
    async fn print(&self, env: &BenchEnv) {
        let delta = |(sum, count): (f64, f64), (s0, c0): (f64, f64)| (sum - s0, count - c0);
        let (calls, statements) = delta(histogram(env, &self.batch).await, self.before[0]);
        let (secs, answered) = delta(histogram(env, &self.latency).await, self.before[1]);
        if answered > 0.0 {
            // No statements counted: coalescing is off (a batch size of 1).
            let per = if statements > 0.0 {
                format!("{:.2} calls per statement; ", calls / statements)
            } else {
                String::new()
            };
            println!(
                "            ({per}mean {:.2} ms in the server)",
                secs / answered * 1e3
            );
        }
    }
}

/// Whether `BENCH_ONLY` (a comma-separated list; unset runs everything) names `part`.
fn wanted(part: &str) -> bool {
    std::env::var("BENCH_ONLY").map_or(true, |only| only.split(',').any(|p| p.trim() == part))
}

#[tokio::main]
async fn main() {
    let n = env_or("BENCH_USERS", 1_000_000) as usize;
    let secs = env_or("BENCH_SECS", 10);
    let env = BenchEnv::start(ServerConfig {
        // BENCH_READ_BATCH=1 turns GetUser coalescing off, for comparison.
        db_read_batch: env_or("BENCH_READ_BATCH", 64) as u16,
        // BENCH_WRITE_BATCH=1 turns CreateUser coalescing off, for comparison.
        db_write_batch: env_or("BENCH_WRITE_BATCH", 64) as u16,
        // BENCH_READ_CONNECTIONS: the shared read connections (default: half the cores).
        db_read_connections: env_or("BENCH_READ_CONNECTIONS", 0) as usize,
        metrics_listen: "127.0.0.1:0".into(),
        ..ServerConfig::default()
    })
    .await;
    println!("service benchmark: {n} users, {CONCURRENCY} concurrent clients, {secs} s phases");
    let seeded = Instant::now();
    let ids = Arc::new(seed(&env, n).await);
    println!("seeded in {:.1} s", seeded.elapsed().as_secs_f64());

    // Each comparison alternates the two sides over ROUNDS rounds (A B A B A B) and compares
    // their mean rates: background work (a checkpoint, autovacuum) then falls on both sides
    // alike instead of deciding the ratio, which a single pair of phases left to chance.
    let round = Duration::from_secs((secs / 2).max(2));

    // GetUser vs. a unique-index select of the same rows.
    let select = format!(
        "\\set n random(0, {})\nSELECT * FROM users WHERE project_id = '{}' AND external_id = 'u-' || :n;\n",
        n - 1,
        env.project_id
    );
    if wanted("get") {
        let ids = ids.clone();
        let get_one = move |mut users: Users, k: u64| {
            let id = ids[(k as usize * 7919) % ids.len()].to_string();
            async move {
                users.get_user(pb::GetUserRequest { id }).await.unwrap();
            }
        };
        let server = ServerSide::start(&env, "read", "UserService/GetUser").await;
        let (get, pg_select) = alternating(&env, round, CONCURRENCY, get_one, &select).await;
        println!(
            "GetUser:    {get:>8.0} rps   pgbench unique-index select {pg_select:>8.0} tps   ratio {:.2} (goal >= 0.5)",
            get / pg_select
        );
        server.print(&env).await;
    }

    // LookupUser by email (what a sign-in flow asks first) vs. the same unique-index select
    // in pgbench, at 8 and 32 clients; such lookups coalesce like GetUser.
    if wanted("lookup") {
        let n = ids.len();
        let lookup_one = move |mut users: Users, k: u64| {
            let email = format!("USER{}@bench.example", (k as usize * 7919) % n);
            async move {
                let key = Some(pb::lookup_user_request::Key::Email(email));
                users
                    .lookup_user(pb::LookupUserRequest { key })
                    .await
                    .unwrap();
            }
        };
        let by_email = format!(
            "\\set n random(0, {})\nSELECT * FROM users WHERE project_id = '{}' AND lower(email) = lower('USER' || :n || '@bench.example');\n",
            n - 1,
            env.project_id
        );
        for clients in [CONCURRENCY, 32] {
            let server = ServerSide::start(&env, "read", "UserService/LookupUser").await;
            let (lookup, pg) = alternating(&env, round, clients, lookup_one, &by_email).await;
            println!(
                "LookupUser by email, {clients:>2} clients: {lookup:>8.0} rps   pgbench select by lower(email) {pg:>8.0} tps   ratio {:.2}",
                lookup / pg
            );
            server.print(&env).await;
        }
        // From h2load, one email over and over, against pgbench reading the same row.
        let email = format!("USER{}@bench.example", n / 2);
        let same_row = format!(
            "SELECT * FROM users WHERE project_id = '{}' AND lower(email) = lower('{email}');\n",
            env.project_id
        );
        for (conns, streams) in [(CONCURRENCY, 1), (32, 1)] {
            let key = Some(pb::lookup_user_request::Key::Email(email.clone()));
            let request = pb::LookupUserRequest { key };
            let Some(h2) = h2load(&env, "LookupUser", request, secs, conns, streams) else {
                break;
            };
            let pg = pgbench(&env.url, &same_row, secs, conns * streams);
            println!(
                "LookupUser (h2load, one email, {conns:>2} on {conns:>2} conn.): {h2:>8.0} rps   pgbench same row {pg:>8.0} tps   ratio {:.2}",
                h2 / pg
            );
        }
    }

    // The same comparison with a C load generator on both sides: h2load (nghttp2) for gRPC,
    // as pgbench is for PostgreSQL, so the client's own cost is small on both. h2load sends
    // one fixed request, so both sides read the same single row.
    // Also at 32 calls in flight, where single-row reads pipeline on shared connections.
    let fixed = format!(
        "SELECT * FROM users WHERE project_id = '{}' AND id = '{}';\n",
        env.project_id,
        ids[ids.len() / 2]
    );
    // A gRPC client multiplexes its calls on one channel's connection: also 8 calls in flight
    // on one connection (pgbench cannot multiplex: 8 connections).
    let shapes = [(CONCURRENCY, 1), (1, CONCURRENCY), (32, 1)];
    for (conns, streams) in shapes.into_iter().filter(|_| wanted("h2load")) {
        let Some(h2) = h2load_get(&env, &ids[ids.len() / 2], secs, conns, streams) else {
            println!(
                "(h2load not on PATH: apt-get install nghttp2-client for the C-client comparison)"
            );
            break;
        };
        let in_flight = conns * streams;
        let pg_fixed = pgbench(&env.url, &fixed, secs, in_flight);
        println!(
            "GetUser (h2load, one row, {in_flight:>2} in flight on {conns:>2} conn.): {h2:>8.0} rps   pgbench same row {pg_fixed:>8.0} tps   ratio {:.2}",
            h2 / pg_fixed
        );
    }

    // LookupUserByIdentity (the social sign-in's lookup) vs. pgbench's join of the identity's
    // unique-index probe and the user's primary key, at 8 and 32 clients.
    if wanted("identity") {
        let n = ids.len();
        let linked = Instant::now();
        let client = env.pool.get().await.unwrap();
        client
            .execute(
                "INSERT INTO identities (project_id, id, user_id, provider, subject)
                 SELECT project_id, gen_random_uuid(), id, 'github', 'gh-' || substr(external_id, 3)
                 FROM users WHERE project_id = $1 AND external_id LIKE 'u-%'
                 ON CONFLICT DO NOTHING",
                &[&env.project_id],
            )
            .await
            .unwrap();
        client
            .batch_execute("VACUUM (ANALYZE) identities")
            .await
            .unwrap();
        drop(client);
        println!(
            "linked {n} identities in {:.1} s",
            linked.elapsed().as_secs_f64()
        );
        let by_identity = move |mut identities: Identities, k: u64| {
            let subject = format!("gh-{}", (k as usize * 7919) % n);
            async move {
                let request = pb::LookupUserByIdentityRequest {
                    provider: "github".into(),
                    subject,
                };
                identities.lookup_user_by_identity(request).await.unwrap();
            }
        };
        let join = format!(
            "\\set n random(0, {})\nSELECT u.*, i.* FROM identities i JOIN users u ON u.project_id = i.project_id AND u.id = i.user_id WHERE i.project_id = '{}' AND i.provider = 'github' AND i.subject = 'gh-' || :n;\n",
            n - 1,
            env.project_id
        );
        for clients in [CONCURRENCY, 32] {
            let server =
                ServerSide::start(&env, "read", "IdentityService/LookupUserByIdentity").await;
            let (found, pg) = alternating(&env, round, clients, by_identity, &join).await;
            println!(
                "LookupUserByIdentity, {clients:>2} clients: {found:>8.0} rps   pgbench identity join {pg:>8.0} tps   ratio {:.2}",
                found / pg
            );
            server.print(&env).await;
        }
    }

    // CreateUser vs. a single-row INSERT (fsync on, one transaction each), alternating.
    let insert = format!(
        "INSERT INTO users (project_id, id, email, status, created_at, updated_at) VALUES ('{}', gen_random_uuid(), gen_random_uuid()::text || '@pgbench.example', 1, now(), now());\n",
        env.project_id
    );
    if wanted("create") {
        let create_one = |mut users: Users, _| async move {
            users
                .create_user(pb::CreateUserRequest {
                    user: Some(pb::User {
                        email: format!("{}@create.example", Uuid::now_v7().simple()),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .await
                .unwrap();
        };
        // Also at 32 clients, where concurrent creates are written together.
        for clients in [CONCURRENCY, 32] {
            let server = ServerSide::start(&env, "create", "UserService/CreateUser").await;
            let (create, pg_insert) = alternating(&env, round, clients, create_one, &insert).await;
            let label = if clients == CONCURRENCY {
                "CreateUser:".to_string()
            } else {
                format!("CreateUser ({clients} clients):")
            };
            println!(
                "{label} {create:>8.0} rps   pgbench single-row INSERT   {pg_insert:>8.0} tps   ratio {:.2}{}",
                create / pg_insert,
                if clients == CONCURRENCY {
                    " (goal >= 0.6)"
                } else {
                    ""
                }
            );
            server.print(&env).await;
        }
    }
    // UpdateUser (one field, no etag) vs. a single-row UPDATE by a unique key, alternating.
    // Not a goal of the report; an update is a read and a write (the write with its event).
    let update = format!(
        "\\set n random(0, {})\nUPDATE users SET display_name = 'p' || random(), version = version + 1, updated_at = now() WHERE project_id = '{}' AND external_id = 'u-' || :n;\n",
        n - 1,
        env.project_id
    );
    if wanted("update") {
        let ids = ids.clone();
        let update_one = move |mut users: Users, k: u64| {
            let id = ids[(k as usize * 7919) % ids.len()].to_string();
            async move {
                users.update_user(rename(id, k)).await.unwrap();
            }
        };
        let server = ServerSide::start(&env, "update", "UserService/UpdateUser").await;
        let (updated, pg_update) = alternating(&env, round, CONCURRENCY, update_one, &update).await;
        println!(
            "UpdateUser: {updated:>8.0} rps   pgbench single-row UPDATE   {pg_update:>8.0} tps   ratio {:.2}",
            updated / pg_update
        );
        server.print(&env).await;
    }
    if !wanted("list") {
        return;
    }

    // ListUsers: the first page vs. page 10,000 (page size 100), reached by its token.
    let mut users = UserServiceClient::with_interceptor(env.new_channel().await, env.key.clone());
    let target = (n / 100).clamp(2, 10_000);
    let walked = Instant::now();
    let mut token = String::new();
    for _ in 1..target {
        token = users
            .list_users(pb::ListUsersRequest {
                page_size: 100,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .next_page_token;
    }
    println!(
        "walked to page {target} in {:.1} s",
        walked.elapsed().as_secs_f64()
    );
    let (first_p50, first_p99) = list_latency(&mut users, "", 300).await;
    let (deep_p50, deep_p99) = list_latency(&mut users, &token, 300).await;
    println!(
        "ListUsers page 1:      p50 {first_p50:.2} ms  p99 {first_p99:.2} ms\nListUsers page {target}: p50 {deep_p50:.2} ms  p99 {deep_p99:.2} ms   ratio p50 {:.2} (goal <= 1.5)",
        deep_p50 / first_p50
    );
}

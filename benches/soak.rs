//! Soak: a mixed load (GetUser 60 %, ListUsers 20 %, UpdateUser 10 %, CreateUser 10 %) from
//! 8 clients for `SOAK_SECS` (default 300) against the real server, printing throughput,
//! errors and the process's resident memory every 30 s: memory must stay flat and errors at
//! zero. Server and clients share this process, so the RSS covers both. Each window also
//! prints every RPC's calls/s and mean latency, so a slow window names the RPC that slowed.
//! Run: `cargo bench --bench soak`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use roster::config::ServerConfig;
use roster::pb::v1 as pb;
use roster::pb::v1::user_service_client::UserServiceClient;
use support::{BenchEnv, env_or, rename};

const CLIENTS: usize = 8;
/// The mix's RPCs, in the order of [`Tally`]'s slots.
const KINDS: [&str; 4] = ["GetUser", "ListUsers", "UpdateUser", "CreateUser"];

/// Calls and microseconds spent, per RPC of the mix.
#[derive(Default)]
struct Tally {
    calls: [AtomicU64; 4],
    micros: [AtomicU64; 4],
}

impl Tally {
    fn add(&self, kind: usize, took: Duration) {
        self.calls[kind].fetch_add(1, Ordering::Relaxed);
        self.micros[kind].fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    fn total(&self) -> u64 {
        self.calls.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    fn snapshot(&self) -> [(u64, u64); 4] {
        std::array::from_fn(|k| {
            (
                self.calls[k].load(Ordering::Relaxed),
                self.micros[k].load(Ordering::Relaxed),
            )
        })
    }
}

fn rss_mib() -> f64 {
    support::memory_mib(std::process::id(), "VmRSS:")
}

#[tokio::main]
async fn main() {
    let secs = env_or("SOAK_SECS", 300);
    let env = BenchEnv::start(ServerConfig {
        // As in the service bench: the shared read connections (0: half the cores) and the
        // most GetUser calls read together (1: coalescing off), for comparisons.
        db_read_connections: env_or("BENCH_READ_CONNECTIONS", 0) as usize,
        db_read_batch: env_or("BENCH_READ_BATCH", 64) as u16,
        ..ServerConfig::default()
    })
    .await;
    // A starting population to read, list and update.
    let mut seed = UserServiceClient::with_interceptor(env.new_channel().await, env.key.clone());
    let mut ids = Vec::new();
    for i in 0..1000 {
        let u = seed
            .create_user(pb::CreateUserRequest {
                user: Some(pb::User {
                    email: format!("soak{i}@bench.example"),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .user
            .unwrap();
        ids.push(u.id);
    }
    // Statistics for the seeded tables, as autovacuum would gather within its first minute:
    // without them the first minute measured the planner's guesses about fresh tables
    // (SOAK_NO_ANALYZE=1 shows that dip), not the service.
    if std::env::var_os("SOAK_NO_ANALYZE").is_none() {
        let client = env.pool.get().await.unwrap();
        client.batch_execute("ANALYZE").await.unwrap();
    }
    let ids = Arc::new(ids);
    let (tally, errors) = (Arc::new(Tally::default()), Arc::new(AtomicU64::new(0)));
    let start = Instant::now();
    let d = Duration::from_secs(secs);
    println!(
        "soak: {CLIENTS} clients, {secs} s; RSS at start {:.0} MiB",
        rss_mib()
    );
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let mut users =
            UserServiceClient::with_interceptor(env.new_channel().await, env.key.clone());
        let (ids, errors, tally) = (ids.clone(), errors.clone(), tally.clone());
        tasks.push(tokio::spawn(async move {
            let mut k: usize = c;
            while start.elapsed() < d {
                k = k
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let id = ids[(k >> 33) % ids.len()].clone();
                let kind = match (k >> 20) % 10 {
                    0..=5 => 0,
                    6 | 7 => 1,
                    8 => 2,
                    _ => 3,
                };
                let began = Instant::now();
                let ok = match kind {
                    0 => users.get_user(pb::GetUserRequest { id }).await.is_ok(),
                    1 => users
                        .list_users(pb::ListUsersRequest {
                            page_size: 50,
                            filter: "email_verified = false".into(),
                            ..Default::default()
                        })
                        .await
                        .is_ok(),
                    2 => users.update_user(rename(id, k as u64)).await.is_ok(),
                    _ => users
                        .create_user(pb::CreateUserRequest {
                            user: Some(pb::User {
                                email: format!("{}@soak.example", uuid::Uuid::now_v7().simple()),
                                ..Default::default()
                            }),
                            ..Default::default()
                        })
                        .await
                        .is_ok(),
                };
                tally.add(kind, began.elapsed());
                if !ok {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let mut last = 0;
    let mut last_tally = tally.snapshot();
    while start.elapsed() < d {
        tokio::time::sleep(Duration::from_secs(30).min(d)).await;
        let now = tally.total();
        println!(
            "{:>4.0} s: {:>7.0} calls/s, {} errors, RSS {:.0} MiB",
            start.elapsed().as_secs_f64(),
            (now - last) as f64 / 30.0,
            errors.load(Ordering::Relaxed),
            rss_mib()
        );
        let this = tally.snapshot();
        let per_kind: Vec<String> = KINDS
            .iter()
            .zip(this.iter().zip(&last_tally))
            .map(|(name, ((c, us), (c0, us0)))| {
                let n = c - c0;
                let mean = if n == 0 {
                    0.0
                } else {
                    (us - us0) as f64 / n as f64 / 1000.0
                };
                format!("{name} {:.0}/s {mean:.2} ms", n as f64 / 30.0)
            })
            .collect();
        println!("        {}", per_kind.join(", "));
        last = now;
        last_tally = this;
    }
    for t in tasks {
        t.await.unwrap();
    }
    println!(
        "soak done: {} calls, {} errors, RSS at end {:.0} MiB",
        tally.total(),
        errors.load(Ordering::Relaxed),
        rss_mib()
    );
}

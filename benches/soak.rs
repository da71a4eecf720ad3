//! Soak: a mixed load (GetUser 60 %, ListUsers 20 %, UpdateUser 10 %, CreateUser 10 %) from
//! 8 clients for `SOAK_SECS` (default 300) against the real server, printing throughput,
//! errors and the process's resident memory every 30 s: memory must stay flat and errors at
//! zero. Server and clients share this process, so the RSS covers both.
//! Run: `cargo bench --bench soak`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use roster::config::ServerConfig;
use roster::pb::v1 as pb;
use roster::pb::v1::user_service_client::UserServiceClient;
use support::BenchEnv;

const CLIENTS: usize = 8;

fn rss_mib() -> f64 {
    support::memory_mib(std::process::id(), "VmRSS:")
}

#[tokio::main]
async fn main() {
    let secs: u64 = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let env = BenchEnv::start(ServerConfig::default()).await;
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
    let (calls, errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
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
        let (ids, calls, errors) = (ids.clone(), calls.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut k: usize = c;
            while start.elapsed() < d {
                k = k
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let id = ids[(k >> 33) % ids.len()].clone();
                let ok = match (k >> 20) % 10 {
                    0..=5 => users.get_user(pb::GetUserRequest { id }).await.is_ok(),
                    6 | 7 => users
                        .list_users(pb::ListUsersRequest {
                            page_size: 50,
                            filter: "email_verified = false".into(),
                            ..Default::default()
                        })
                        .await
                        .is_ok(),
                    8 => users
                        .update_user(pb::UpdateUserRequest {
                            user: Some(pb::User {
                                id,
                                display_name: format!("n{k}"),
                                ..Default::default()
                            }),
                            update_mask: Some(prost_types::FieldMask {
                                paths: vec!["display_name".into()],
                            }),
                            etag: String::new(),
                        })
                        .await
                        .is_ok(),
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
                calls.fetch_add(1, Ordering::Relaxed);
                if !ok {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let mut last = 0;
    while start.elapsed() < d {
        tokio::time::sleep(Duration::from_secs(30).min(d)).await;
        let now = calls.load(Ordering::Relaxed);
        println!(
            "{:>4.0} s: {:>7.0} calls/s, {} errors, RSS {:.0} MiB",
            start.elapsed().as_secs_f64(),
            (now - last) as f64 / 30.0,
            errors.load(Ordering::Relaxed),
            rss_mib()
        );
        last = now;
    }
    for t in tasks {
        t.await.unwrap();
    }
    println!(
        "soak done: {} calls, {} errors, RSS at end {:.0} MiB",
        calls.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed),
        rss_mib()
    );
}

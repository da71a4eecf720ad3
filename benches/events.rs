//! Event benchmark: what the audit event costs each mutation (user inserts with and without
//! their event, through the same store functions, same connections and concurrency, in the
//! same run), how soon a live StreamEvents delivers a committed change (p50/p99), idle and
//! under concurrent writes, and what live streams that match none of the writes cost the
//! writers. Run: `cargo bench --bench events` (`BENCH_SECS`, default 10; `BENCH_STREAMS`,
//! default 50).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use roster::config::ServerConfig;
use roster::events::{EventContext, EventType, NewEvent};
use roster::pb::v1 as pb;
use roster::pb::v1::log_service_client::LogServiceClient;
use roster::pb::v1::user_service_client::UserServiceClient;
use roster::users::{NewUser, Profile};
use support::{BenchEnv, percentiles};
use tokio::sync::Mutex;
use uuid::Uuid;

const CONCURRENCY: usize = 8;

fn phase() -> Duration {
    let secs = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    Duration::from_secs(secs)
}

/// Inserts users (each with its USER_CREATED event when `with_event`) from `CONCURRENCY`
/// connections for `d`; returns transactions per second.
async fn insert_rate(env: &BenchEnv, with_event: bool, d: Duration) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (pool, done, project) = (env.pool.clone(), done.clone(), env.project_id);
            tokio::spawn(async move {
                let mut client = pool.get().await.unwrap();
                let ctx = EventContext {
                    api_key_id: Uuid::now_v7(),
                    request_id: "bench".into(),
                    ip: Some("198.51.100.1".into()),
                    user_agent: None,
                };
                while start.elapsed() < d {
                    let id = Uuid::now_v7();
                    let new = NewUser {
                        id,
                        profile: Profile {
                            email: Some(format!("{}@bench.example", id.simple())),
                            ..Default::default()
                        },
                        pending: false,
                        password: None,
                        created_at: None,
                    };
                    let tx = client.transaction().await.unwrap();
                    roster::users::store::insert(&tx, project, &new, None)
                        .await
                        .unwrap();
                    if with_event {
                        let data = serde_json::json!({ "fields": ["email"], "status": "ACTIVE" });
                        let ev = NewEvent::for_user(EventType::UserCreated, id, data);
                        roster::events::store::record(&tx, project, &ctx, &[ev])
                            .await
                            .unwrap();
                    }
                    tx.commit().await.unwrap();
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// A live stream of the events from now on that match `filter`.
async fn follow_from_now(
    env: &BenchEnv,
    channel: tonic::transport::Channel,
    filter: &str,
) -> tonic::Streaming<pb::StreamEventsResponse> {
    LogServiceClient::with_interceptor(channel, env.key.clone())
        .stream_events(pb::StreamEventsRequest {
            after_position: 0,
            since: Some(roster::wire::timestamp(chrono::Utc::now())),
            filter: filter.into(),
            checkpoints: false,
        })
        .await
        .unwrap()
        .into_inner()
}

/// Creates users at one per `interval` for `d` while a stream follows; returns the delay
/// from each CreateUser answer to its event's arrival on the stream.
async fn delivery_latencies(env: &BenchEnv, interval: Duration, d: Duration) -> Vec<Duration> {
    let mut stream = follow_from_now(env, env.new_channel().await, "type = USER_CREATED").await;
    let answered: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let arrived: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let reader = {
        let arrived = arrived.clone();
        tokio::spawn(async move {
            while let Ok(Some(m)) = stream.message().await {
                let e = m.event.unwrap();
                arrived.lock().await.insert(e.user_id, Instant::now());
            }
        })
    };
    let mut users = UserServiceClient::with_interceptor(env.new_channel().await, env.key.clone());
    let mut tick = tokio::time::interval(interval);
    let start = Instant::now();
    while start.elapsed() < d {
        tick.tick().await;
        let id = Uuid::now_v7().to_string();
        users
            .create_user(pb::CreateUserRequest {
                user: Some(pb::User {
                    email: format!("{id}@stream.example"),
                    ..Default::default()
                }),
                user_id: id.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        answered.lock().await.insert(id, Instant::now());
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    reader.abort();
    let answered = answered.lock().await;
    let arrived = arrived.lock().await;
    let lat: Vec<Duration> = answered
        .iter()
        .map(|(id, t)| {
            let a = arrived.get(id).expect("every created user's event arrives");
            a.saturating_duration_since(*t)
        })
        .collect();
    lat
}

/// Keeps `n` CreateUser loops running until `stop`.
async fn background_writes(
    env: &BenchEnv,
    n: usize,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let mut users =
            UserServiceClient::with_interceptor(env.new_channel().await, env.key.clone());
        let (stop, done) = (stop.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let id = Uuid::now_v7();
                users
                    .create_user(pb::CreateUserRequest {
                        user: Some(pb::User {
                            email: format!("{}@load.example", id.simple()),
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tasks
}

/// CreateUser calls per second from `CONCURRENCY` clients over `d`.
async fn create_rate(env: &BenchEnv, d: Duration) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let load = background_writes(env, CONCURRENCY, stop.clone(), done.clone()).await;
    tokio::time::sleep(d).await;
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// Opens `n` live streams whose filter matches none of the benchmark's events (consumers of
/// other event types); each keeps its stream open until aborted.
async fn idle_streams(env: &BenchEnv, n: usize) -> Vec<tokio::task::JoinHandle<()>> {
    let channel = env.new_channel().await;
    let mut tasks = Vec::new();
    for _ in 0..n {
        let mut stream = follow_from_now(env, channel.clone(), "type = USER_BLOCKED").await;
        tasks.push(tokio::spawn(async move {
            while let Ok(Some(_)) = stream.message().await {}
        }));
    }
    tasks
}

#[tokio::main]
async fn main() {
    let env = BenchEnv::start(ServerConfig::default()).await;
    let d = phase();
    println!(
        "events benchmark: {} s phases, {CONCURRENCY} connections for inserts",
        d.as_secs()
    );

    // Alternate so drift of the machine does not favour either side.
    let mut without = Vec::new();
    let mut with = Vec::new();
    for _ in 0..2 {
        without.push(insert_rate(&env, false, d / 2).await);
        with.push(insert_rate(&env, true, d / 2).await);
    }
    let without = without.iter().sum::<f64>() / without.len() as f64;
    let with = with.iter().sum::<f64>() / with.len() as f64;

    let mut idle = delivery_latencies(&env, Duration::from_millis(20), d).await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = background_writes(&env, 4, stop.clone(), Arc::default()).await;
    let mut busy = delivery_latencies(&env, Duration::from_millis(20), d).await;
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.await.unwrap();
    }

    // What live streams that match nothing cost the writers: each follows the shared
    // horizon and reads its range when it moves.
    let streams: usize = std::env::var("BENCH_STREAMS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    let mut bare = Vec::new();
    let mut followed = Vec::new();
    for _ in 0..2 {
        bare.push(create_rate(&env, d / 2).await);
        let open = idle_streams(&env, streams).await;
        followed.push(create_rate(&env, d / 2).await);
        for t in open {
            t.abort();
        }
    }
    let bare = bare.iter().sum::<f64>() / bare.len() as f64;
    let followed = followed.iter().sum::<f64>() / followed.len() as f64;

    let (i50, i99) = percentiles(&mut idle);
    let (b50, b99) = percentiles(&mut busy);
    println!();
    println!("| measure | value |");
    println!("|---|---|");
    println!("| user inserts/s without the event | {without:.0} |");
    println!("| user inserts/s with the event | {with:.0} |");
    println!(
        "| share of a mutation's cost spent on its event | {:.0} % |",
        (1.0 - with / without) * 100.0
    );
    println!(
        "| stream delivery after commit, p50 / p99 ({} events, idle) | {i50:.2} / {i99:.2} ms |",
        idle.len()
    );
    println!(
        "| stream delivery after commit, p50 / p99 ({} events, 4 writers busy) | {b50:.2} / {b99:.2} ms |",
        busy.len()
    );
    println!("| CreateUser/s, no live streams | {bare:.0} |");
    println!("| CreateUser/s, {streams} live streams matching none of them | {followed:.0} |");
    drop(env);
}

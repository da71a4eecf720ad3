//! Password benchmark: VerifyPassword/s through the real server against raw argon2id
//! verifies/s on the same machine in the same run, and GetUser latency idle against during a
//! VerifyPassword flood. Prints figures and ratios (goals: ≥ 0.85 of raw; GetUser p99 under
//! the flood ≤ 3× idle). Also the cost of a `--breached-passwords-file` lookup in a list of
//! `BENCH_BREACHED_HASHES` hashes (default 10,000,000, ~450 MB in the temp dir; 0 skips).
//! Run: `cargo bench --bench passwords` (`BENCH_SECS` sets each phase's length, default 10).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use roster::config::ServerConfig;
use roster::pb::v1 as pb;
use roster::pb::v1::authenticator_service_client::AuthenticatorServiceClient;
use roster::pb::v1::user_service_client::UserServiceClient;
use support::{BenchEnv, percentiles};

const PASSWORD: &str = "correct horse battery staple";

fn phase() -> Duration {
    let secs = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    Duration::from_secs(secs)
}

/// argon2id verifies/s with the argon2 crate's plain API on `threads` threads.
fn raw_verifies_per_sec(hash: &str, threads: usize, for_: Duration) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let hash = hash.to_string();
            let done = done.clone();
            std::thread::spawn(move || {
                let parsed = PasswordHash::new(&hash).unwrap();
                while start.elapsed() < for_ {
                    argon2::Argon2::default()
                        .verify_password(PASSWORD.as_bytes(), &parsed)
                        .unwrap();
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// GetUser calls paced at one per `GET_INTERVAL` for `for_`; their latencies. Paced rather
/// than back-to-back, so the probe itself does not eat the CPU the flood is competing for.
async fn get_user_latencies(env: &BenchEnv, id: &str, for_: Duration) -> Vec<Duration> {
    let mut users = UserServiceClient::with_interceptor(env.new_channel().await, env.key.clone());
    let mut lat = Vec::new();
    let mut tick = tokio::time::interval(GET_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let start = Instant::now();
    while start.elapsed() < for_ {
        tick.tick().await;
        let t = Instant::now();
        users
            .get_user(pb::GetUserRequest { id: id.to_string() })
            .await
            .unwrap();
        lat.push(t.elapsed());
    }
    lat
}

const GET_INTERVAL: Duration = Duration::from_millis(5);

/// Keeps every hashing worker busy with a queue behind it: `workers * 8` concurrent sign-ins
/// over four connections, until `stop`. Returns the count of OK results so far.
async fn start_flood(
    env: &BenchEnv,
    workers: usize,
    stop: Arc<AtomicBool>,
) -> (Arc<AtomicU64>, Vec<tokio::task::JoinHandle<()>>) {
    let ok = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..4 {
        let channel = env.new_channel().await;
        for _ in 0..workers * 2 {
            let mut a =
                AuthenticatorServiceClient::with_interceptor(channel.clone(), env.key.clone());
            let (stop, ok) = (stop.clone(), ok.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let r = a
                        .verify_password(pb::VerifyPasswordRequest {
                            login: Some(pb::verify_password_request::Login::Email(
                                "bench@example.com".into(),
                            )),
                            password: PASSWORD.into(),
                            ip: format!("198.51.100.{c}"),
                            ..Default::default()
                        })
                        .await
                        .unwrap()
                        .into_inner();
                    assert_eq!(r.result, pb::VerifyPasswordResult::Ok as i32);
                    ok.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
    }
    (ok, tasks)
}

#[tokio::main]
async fn main() {
    let config = ServerConfig::default();
    let workers = config.hash_workers();
    let env = BenchEnv::start(config.clone()).await;
    let d = phase();
    println!(
        "passwords benchmark: argon2id m={} t={} p={}, {workers} hashing workers, {} s phases",
        config.argon2_memory_kib,
        config.argon2_iterations,
        config.argon2_parallelism,
        d.as_secs()
    );

    let mut users = UserServiceClient::with_interceptor(env.channel.clone(), env.key.clone());
    let user = users
        .create_user(pb::CreateUserRequest {
            user: Some(pb::User {
                email: "bench@example.com".into(),
                ..Default::default()
            }),
            initial_password: Some(pb::create_user_request::InitialPassword::Password(
                PASSWORD.into(),
            )),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();

    // Raw: the same parameters, one thread per hashing worker, nothing else running.
    let params = argon2::Params::new(
        config.argon2_memory_kib,
        config.argon2_iterations,
        config.argon2_parallelism,
        None,
    )
    .unwrap();
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    let hash = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
        .hash_password(PASSWORD.as_bytes(), &salt)
        .unwrap()
        .to_string();
    // GetUser alone, before anything has loaded the database (after a warm-up: the first
    // calls pay for connections and prepared statements).
    get_user_latencies(&env, &user.id, Duration::from_secs(2)).await;
    let idle = get_user_latencies(&env, &user.id, d).await;

    // Raw verifies are measured before and after the server's run and averaged, so drift of
    // the machine (other tenants, clock boost) does not favour either side.
    let raw_before = {
        let hash = hash.clone();
        tokio::task::spawn_blocking(move || raw_verifies_per_sec(&hash, workers, d))
            .await
            .unwrap()
    };

    // VerifyPassword flood alone: throughput.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, tasks) = start_flood(&env, workers, stop.clone()).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (from, start) = (ok.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(d).await;
    let rps = (ok.load(Ordering::Relaxed) - from) as f64 / start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }

    // GetUser during the flood.
    let stop = Arc::new(AtomicBool::new(false));
    let (_, tasks) = start_flood(&env, workers, stop.clone()).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut busy = get_user_latencies(&env, &user.id, d).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }

    let raw_after = tokio::task::spawn_blocking(move || raw_verifies_per_sec(&hash, workers, d))
        .await
        .unwrap();
    let raw = (raw_before + raw_after) / 2.0;
    let mut idle = idle;
    let (idle50, idle99) = percentiles(&mut idle);
    let (busy50, busy99) = percentiles(&mut busy);
    println!();
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| raw argon2id verifies/s ({workers} threads; before, after) | {raw:.1} ({raw_before:.1}, {raw_after:.1}) |"
    );
    println!("| VerifyPassword/s through the server | {rps:.1} |");
    println!("| ratio (goal ≥ 0.85) | {:.2} |", rps / raw);
    println!(
        "| GetUser p50 / p99 idle (ms, {} calls) | {idle50:.2} / {idle99:.2} |",
        idle.len()
    );
    println!(
        "| GetUser p50 / p99 during the flood (ms, {} calls) | {busy50:.2} / {busy99:.2} |",
        busy.len()
    );
    println!("| p99 ratio (goal ≤ 3) | {:.2} |", busy99 / idle99);
    drop(env);
    let hashes = std::env::var("BENCH_BREACHED_HASHES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000_000usize);
    if hashes > 0 {
        let verify_ms = 1000.0 * workers as f64 / raw;
        tokio::task::spawn_blocking(move || breached_lookups(hashes, verify_ms))
            .await
            .unwrap();
    }
}

/// Lookups in a breached-passwords list of `n` hashes written in HIBP's format: half of them
/// listed, on one thread once the file is in the page cache (as on a server that has been
/// checking passwords), against the time of one argon2id hash.
fn breached_lookups(n: usize, verify_ms: f64) {
    use roster::crypto::breached::{BreachedList, sha1_hex};
    use std::io::Write;
    let made = Instant::now();
    let mut hashes: Vec<[u8; 40]> = (0..n).map(|i| sha1_hex(&format!("listed {i}"))).collect();
    hashes.sort_unstable();
    let file = tempfile::NamedTempFile::new().unwrap();
    {
        let mut w = std::io::BufWriter::new(file.as_file());
        for (i, h) in hashes.iter().enumerate() {
            w.write_all(h).unwrap();
            writeln!(w, ":{}\r", i % 1000 + 1).unwrap();
        }
        w.flush().unwrap();
    }
    drop(hashes);
    let bytes = file.as_file().metadata().unwrap().len();
    let list = BreachedList::open(file.path()).unwrap();
    // Warm the page cache the way a running server would have.
    std::io::copy(
        &mut std::fs::File::open(file.path()).unwrap(),
        &mut std::io::sink(),
    )
    .unwrap();
    let mut times = Vec::with_capacity(100_000);
    let mut found = 0;
    for i in 0..100_000 {
        let p = if i % 2 == 0 {
            format!("listed {}", (i * 7919) % n)
        } else {
            format!("not listed {i}")
        };
        let start = Instant::now();
        let hash = sha1_hex(&p);
        found += usize::from(list.contains_hash(&hash).unwrap());
        times.push(start.elapsed());
    }
    assert_eq!(found, 50_000, "every listed password is found, no other");
    let (p50, p99) = percentiles(&mut times);
    println!(
        "| breached-list lookup, {n} hashes ({:.0} MB, written in {:.0} s): p50 / p99 (µs) | {:.1} / {:.1} ({:.3} % of one argon2id hash, {verify_ms:.1} ms) |",
        bytes as f64 / 1e6,
        made.elapsed().as_secs_f64(),
        p50 * 1000.0,
        p99 * 1000.0,
        100.0 * p99 / verify_ms
    );
}

//! Faults: PostgreSQL stopped and started again under a write load, on a cluster of this
//! test's own (the shared test cluster keeps serving the other tests).
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use roster::config::ServerConfig;
use roster::db::embedded::{EmbeddedOptions, EmbeddedPostgres};
use tokio::sync::Mutex;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::harness::key;
use crate::pb;
use crate::pb::user_service_client::UserServiceClient;

pub(crate) fn start(dir: &std::path::Path) -> EmbeddedPostgres {
    EmbeddedPostgres::start(&EmbeddedOptions {
        dir: dir.to_path_buf(),
        unsafe_fast: false,
    })
    .expect("start PostgreSQL")
}

async fn health(channel: &tonic::transport::Channel) -> Option<ServingStatus> {
    let mut h = HealthClient::new(channel.clone());
    let r = h
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .ok()?;
    ServingStatus::try_from(r.into_inner().status).ok()
}

pub(crate) async fn wait_for(
    channel: &tonic::transport::Channel,
    want: ServingStatus,
    within: Duration,
) {
    let until = Instant::now() + within;
    while health(channel).await != Some(want) {
        assert!(Instant::now() < until, "health never became {want:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restart_under_load_loses_no_acknowledged_write() {
    if std::env::var("DATABASE_URL").is_ok_and(|u| !u.is_empty()) {
        eprintln!("skipped: this test stops and starts its own PostgreSQL");
        return;
    }
    let dir = std::env::temp_dir().join(format!("roster-fault-{}", uuid::Uuid::now_v7().simple()));
    let pg = {
        let dir = dir.clone();
        tokio::task::spawn_blocking(move || start(&dir))
            .await
            .unwrap()
    };
    let url = pg.connection_string("postgres");
    let (mut client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    roster::db::migrate::migrate(&mut client).await.unwrap();
    drop(client);
    let pool = roster::db::connect_pool(&url, 8, Duration::from_secs(2)).unwrap();
    let token = {
        let mut c = pool.get().await.unwrap();
        let p = roster::admin::create_project(&mut **c, "faults")
            .await
            .unwrap();
        roster::admin::create_key(&mut **c, p.id, "all", &["*".into()], None)
            .await
            .unwrap()
            .1
    };
    let app = roster::server::Application::build(
        "127.0.0.1:0".parse().unwrap(),
        pool.clone(),
        ServerConfig::default(),
    )
    .await
    .unwrap();
    let addr = app.local_addr();
    let (stop_server, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(app.run_until(async move {
        let _ = stopped.await;
    }));
    let channel = crate::harness::channel_to(addr);
    wait_for(&channel, ServingStatus::Serving, Duration::from_secs(10)).await;

    // Four writers create users until told to stop, keeping what was acknowledged and every
    // error code they saw.
    let running = Arc::new(AtomicBool::new(true));
    let acknowledged = Arc::new(Mutex::new(Vec::<String>::new()));
    let codes = Arc::new(Mutex::new(Vec::<Code>::new()));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let mut users = UserServiceClient::with_interceptor(channel.clone(), key(Some(&token)));
            let (running, acknowledged, codes) =
                (running.clone(), acknowledged.clone(), codes.clone());
            tokio::spawn(async move {
                let mut i = 0;
                while running.load(Ordering::Relaxed) {
                    i += 1;
                    let r = users
                        .create_user(pb::CreateUserRequest {
                            user: Some(crate::user_with_email(&format!("w{w}-{i}@example.com"))),
                            ..Default::default()
                        })
                        .await;
                    match r {
                        Ok(r) => acknowledged
                            .lock()
                            .await
                            .push(r.into_inner().user.unwrap().id),
                        Err(e) => {
                            codes.lock().await.push(e.code());
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(800)).await;
    let before_fault = acknowledged.lock().await.len();
    assert!(before_fault > 0, "the load runs");

    // Stop the database: health goes NOT_SERVING and calls answer UNAVAILABLE.
    tokio::task::spawn_blocking(move || pg.stop())
        .await
        .unwrap();
    wait_for(&channel, ServingStatus::NotServing, Duration::from_secs(15)).await;
    let mut probe = UserServiceClient::with_interceptor(channel.clone(), key(Some(&token)));
    let err = probe
        .get_user(pb::GetUserRequest {
            id: uuid::Uuid::now_v7().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");

    // Start it again: the same server recovers by itself.
    let pg = {
        let dir = dir.clone();
        tokio::task::spawn_blocking(move || start(&dir))
            .await
            .unwrap()
    };
    wait_for(&channel, ServingStatus::Serving, Duration::from_secs(20)).await;
    let after = acknowledged.lock().await.len();
    let until = Instant::now() + Duration::from_secs(20);
    while acknowledged.lock().await.len() < after + 20 {
        assert!(Instant::now() < until, "writes resume after the restart");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    running.store(false, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }

    // Every error was UNAVAILABLE (safe to retry), never INTERNAL; every acknowledged write
    // is there.
    let codes = codes.lock().await.clone();
    assert!(!codes.is_empty(), "the outage was seen");
    assert!(
        codes.iter().all(|c| *c == Code::Unavailable),
        "codes seen: {codes:?}"
    );
    let ids: Vec<uuid::Uuid> = acknowledged
        .lock()
        .await
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    let stored: i64 = pool
        .get()
        .await
        .unwrap()
        .query_one("SELECT count(*) FROM users WHERE id = ANY($1)", &[&ids])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, ids.len() as i64);

    let _ = stop_server.send(());
    drop(pool);
    tokio::task::spawn_blocking(move || pg.stop())
        .await
        .unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_server_killed_mid_import_leaves_whole_batches_only() {
    let app = crate::harness::TestApp::spawn().await;
    let (mut server, channel) = crate::harness::serve_process(&app, "127.0.0.1:0", &[]);
    wait_for(&channel, ServingStatus::Serving, Duration::from_secs(20)).await;

    let mut users = UserServiceClient::with_interceptor(channel, key(Some(&app.token)));
    let requests = std::iter::once(crate::bulk::options(
        pb::ImportMode::CreateOnly,
        pb::ImportMatchOn::Email,
        false,
    ))
    .chain((0..20_000).map(|i| pb::ImportUsersRequest {
        item: Some(pb::import_users_request::Item::Record(pb::ImportRecord {
            user: Some(crate::user_with_email(&format!("k{i}@example.com"))),
            identities: vec![pb::ImportIdentity {
                provider: "github".into(),
                subject: format!("k{i}"),
                ..Default::default()
            }],
            ..Default::default()
        })),
    }));
    let mut stream = users
        .import_users(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let mut acknowledged = Vec::new();
    while acknowledged.len() < 1500 {
        match stream.message().await.unwrap().unwrap().item {
            Some(pb::import_users_response::Item::Result(r)) => acknowledged.push(r.user_id),
            other => panic!("unexpected {other:?}"),
        }
    }
    // SIGKILL: no shutdown, no rollback sent, transactions die with their connections.
    server.kill().unwrap();
    server.wait().unwrap();
    // Results already on the wire may still arrive; then the stream breaks, with no summary.
    loop {
        match stream.message().await {
            Ok(Some(m)) => match m.item {
                Some(pb::import_users_response::Item::Result(r)) => acknowledged.push(r.user_id),
                other => panic!("unexpected {other:?}"),
            },
            Ok(None) => panic!("the stream ended cleanly although the server was killed"),
            Err(_) => break,
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let ids: Vec<uuid::Uuid> = acknowledged.iter().map(|s| s.parse().unwrap()).collect();
    let present: i64 = app
        .sql_one("SELECT count(*) FROM users WHERE id = ANY($1)", &[&ids])
        .await;
    assert_eq!(
        present,
        ids.len() as i64,
        "every acknowledged record is stored"
    );
    // Whole users only: each stored user has its identity and its USER_IMPORTED event.
    let users_n: i64 = app.sql_one("SELECT count(*) FROM users", &[]).await;
    let identities_n: i64 = app.sql_one("SELECT count(*) FROM identities", &[]).await;
    let events_n: i64 = app
        .sql_one(
            "SELECT count(*) FROM events WHERE type = 'USER_IMPORTED'",
            &[],
        )
        .await;
    assert_eq!((identities_n, events_n), (users_n, users_n));
    assert!(users_n >= ids.len() as i64);
}

/// A deadlock the database breaks between a call and another session answers ABORTED
/// CONCURRENT_CONFLICT (retry it), not INTERNAL, and leaves nothing of the call behind.
#[tokio::test]
async fn a_broken_deadlock_is_aborted_and_safe_to_retry() {
    let app = crate::harness::TestApp::spawn().await;
    let user = crate::create_user(&mut app.users(), "deadlock@example.com").await;
    let id = uuid::Uuid::parse_str(&user.id).unwrap();
    // The other session holds the events table; BlockUser locks the user's row, then waits
    // to write its event; the other session then asks for the user's row: a cycle.
    let other = app.pool.get().await.unwrap();
    other
        .batch_execute("BEGIN; LOCK TABLE events IN SHARE ROW EXCLUSIVE MODE")
        .await
        .unwrap();
    let mut users = app.users();
    let request = pb::BlockUserRequest {
        id: user.id.clone(),
        reason: "test".into(),
    };
    let call = tokio::spawn(async move { users.block_user(request).await });
    app.until_a_call_waits_on_a_lock("BlockUser").await;
    // Waits on BlockUser's row lock until the database breaks the cycle (deadlock_timeout,
    // 1 s): the call waited first, so its transaction is the one rolled back.
    other
        .execute(
            "UPDATE users SET display_name = 'other' WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    other.batch_execute("COMMIT").await.unwrap();
    let err = call.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{err:?}");
    assert_eq!(crate::harness::reason(&err), "CONCURRENT_CONFLICT");
    let now = crate::get(&mut app.users(), &user.id).await;
    assert_eq!(now.status, pb::UserStatus::Active as i32);
    assert_eq!(now.display_name, "other");
    // Sent again, it passes.
    let blocked = app
        .users()
        .block_user(pb::BlockUserRequest {
            id: user.id.clone(),
            reason: "test".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(blocked.status, pb::UserStatus::Blocked as i32);
}

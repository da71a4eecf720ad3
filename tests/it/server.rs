//! The server around the services: health, reflection, request ids, unimplemented services,
//! an unreachable database, limits.
use std::time::Duration;

use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::harness::{TestApp, key, reason, violated_fields};
use crate::{pb, pb_struct, user_with_email};

#[tokio::test]
async fn health_reports_each_service_without_a_key() {
    let app = TestApp::spawn().await;
    let mut health = HealthClient::new(app.channel.clone());
    for service in ["", "roster.v1.UserService", "roster.v1.LogService"] {
        // The database watcher reports within moments of start-up.
        let mut status = ServingStatus::Unknown;
        for _ in 0..100 {
            let r = health
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await;
            if let Ok(r) = r {
                status = r.into_inner().status();
                if status == ServingStatus::Serving {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(status, ServingStatus::Serving, "{service}");
    }
}

#[tokio::test]
async fn reflection_lists_all_four_services_and_health() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let app = TestApp::spawn().await;
    let mut client = ServerReflectionClient::new(app.channel.clone());
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = client
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("{resp:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "roster.v1.UserService",
        "roster.v1.AuthenticatorService",
        "roster.v1.IdentityService",
        "roster.v1.LogService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
}

#[tokio::test]
async fn request_ids_are_kept_or_made_and_recorded_on_events() {
    let app = TestApp::spawn().await;
    let mut users = app.users();
    let mut req = tonic::Request::new(pb::CreateUserRequest {
        user: Some(user_with_email("rid@x.io")),
        ..Default::default()
    });
    req.metadata_mut()
        .insert("x-request-id", "req-abc-123".parse().unwrap());
    let resp = users.create_user(req).await.unwrap();
    assert_eq!(resp.metadata().get("x-request-id").unwrap(), "req-abc-123");
    let id = resp.into_inner().user.unwrap().id;
    let events = app.events_of(&id).await;
    assert_eq!(events[0].3.as_deref(), Some("req-abc-123"));

    let resp = users.get_user(pb::GetUserRequest { id }).await.unwrap();
    let made = resp
        .metadata()
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert!(uuid::Uuid::parse_str(&made).is_ok(), "{made}");
    // Errors carry it too.
    let err = users
        .get_user(pb::GetUserRequest { id: "bad".into() })
        .await
        .unwrap_err();
    assert!(err.metadata().get("x-request-id").is_some());
}

/// Calls `path` with an empty message, raw, as a client built from other protos would.
async fn call_raw(app: &TestApp, path: &'static str, token: Option<&str>) -> tonic::Status {
    crate::matrix::call(app, path, token, vec![])
        .await
        .unwrap_err()
}

#[tokio::test]
async fn unknown_methods_answer_unimplemented_behind_auth() {
    let app = TestApp::spawn().await;
    let path = "/roster.v1.UserService/NoSuchMethod";
    assert_eq!(
        call_raw(&app, path, Some(&app.token)).await.code(),
        Code::Unimplemented
    );
    assert_eq!(
        call_raw(&app, path, None).await.code(),
        Code::Unauthenticated
    );
}

#[tokio::test]
async fn metadata_limits_are_enforced() {
    let app = TestApp::spawn().await;
    let mut users = app.users();
    let mut deep = serde_json::json!("leaf");
    for _ in 0..9 {
        deep = serde_json::json!({ "k": deep });
    }
    let err = users
        .create_user(pb::CreateUserRequest {
            user: Some(pb::User {
                email: "deep@x.io".into(),
                user_metadata: Some(pb_struct(serde_json::json!({ "d": deep }))),
                app_metadata: Some(pb_struct(serde_json::json!({ "nul": "a\u{0}b" }))),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        violated_fields(&err),
        vec!["user.app_metadata", "user.user_metadata"]
    );
    // A message over 4 MiB is refused before it reaches a handler.
    let err = users
        .create_user(pb::CreateUserRequest {
            user: Some(pb::User {
                email: "big@x.io".into(),
                display_name: "x".repeat(5 * 1024 * 1024),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
}

/// Clients may send gzip-compressed requests (grpcio, grpc-java and grpc-go can be set to):
/// unary calls and import streams work, and the 4 MiB limit holds for what a message
/// decompresses to, so a small compressed bomb is refused before any handler.
#[tokio::test]
async fn gzip_compressed_requests_are_accepted_and_bounded_when_decompressed() {
    use tonic::codec::CompressionEncoding::Gzip;
    let app = TestApp::spawn().await;
    let mut users = app.users().send_compressed(Gzip);
    let made = crate::create_user(&mut users, "gzip@x.io").await;
    let got = users
        .get_user(pb::GetUserRequest { id: made.id })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(got.email, "gzip@x.io");
    crate::bulk::seed_more_than_buffers_hold(&mut users, 50).await;
    let n: i64 = app.sql_one("SELECT count(*) FROM users", &[]).await;
    assert_eq!(n, 51);

    // 5 MiB of one letter compresses to a few KiB.
    let err = users
        .create_user(pb::CreateUserRequest {
            user: Some(pb::User {
                email: "bomb@x.io".into(),
                display_name: "x".repeat(5 * 1024 * 1024),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let n: i64 = app.sql_one("SELECT count(*) FROM users", &[]).await;
    assert_eq!(n, 51);
}

#[tokio::test]
async fn an_unreachable_database_answers_unavailable_and_not_serving() {
    roster_harness_free_app().await;
}

/// A server whose database does not exist: calls that need it answer UNAVAILABLE (safe to
/// retry), never INTERNAL, and health says NOT_SERVING.
async fn roster_harness_free_app() {
    crate::harness::init_tracing();
    let dir = tempdir_path();
    let url = format!(
        "host={} port=5432 user=postgres dbname=nothing connect_timeout=1",
        dir.display()
    );
    let pool = roster::db::connect_pool(&url, 2, Duration::from_secs(1)).unwrap();
    let app = roster::server::Application::build(
        "127.0.0.1:0".parse().unwrap(),
        pool,
        Default::default(),
    )
    .await
    .unwrap();
    let addr = app.local_addr();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(app.run_until(async move {
        let _ = rx.await;
    }));
    let channel = crate::harness::channel_to(addr);
    let token = format!("rst_{}_{}", uuid::Uuid::now_v7().simple(), "C".repeat(43));
    let mut users = roster::pb::v1::user_service_client::UserServiceClient::with_interceptor(
        channel.clone(),
        key(Some(&token)),
    );
    let err = users
        .list_users(pb::ListUsersRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(reason(&err), "DATABASE_UNAVAILABLE");
    assert!(
        !err.message().contains("nothing"),
        "no connection details leak: {}",
        err.message()
    );
    let mut health = HealthClient::new(channel);
    let mut status = ServingStatus::Unknown;
    for _ in 0..200 {
        if let Ok(r) = health
            .check(HealthCheckRequest {
                service: "roster.v1.UserService".into(),
            })
            .await
        {
            status = r.into_inner().status();
            if status == ServingStatus::NotServing {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(status, ServingStatus::NotServing);
    let _ = tx.send(());
}

fn tempdir_path() -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("roster-nodb-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&p).unwrap();
    p
}

#[tokio::test]
async fn shutdown_drains_calls_in_flight() {
    // One hashing worker: password creates queue behind each other, so several are in
    // flight when the shutdown begins.
    let mut app = TestApp::spawn_with(roster::config::ServerConfig {
        hash_workers: 1,
        key_cache_ms: 50,
        ..Default::default()
    })
    .await;
    let (first_tx, first_rx) = tokio::sync::oneshot::channel::<()>();
    let mut first_tx = Some(first_tx);
    let mut calls = Vec::new();
    for i in 0..6 {
        let mut users = app.users();
        calls.push(tokio::spawn(async move {
            users
                .create_user(pb::CreateUserRequest {
                    user: Some(user_with_email(&format!("drain{i}@x.io"))),
                    initial_password: Some(pb::create_user_request::InitialPassword::Password(
                        "a long passphrase".into(),
                    )),
                    ..Default::default()
                })
                .await
        }));
    }
    // Begin shutdown as soon as the first call is answered, while the rest wait for hashing.
    let watcher = {
        let mut users = app.users();
        tokio::spawn(async move {
            loop {
                let r = users
                    .list_users(pb::ListUsersRequest {
                        filter: "has_password = true".into(),
                        ..Default::default()
                    })
                    .await;
                if r.is_ok_and(|r| !r.into_inner().users.is_empty()) {
                    if let Some(tx) = first_tx.take() {
                        let _ = tx.send(());
                    }
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    first_rx.await.unwrap();
    app.begin_shutdown();
    for c in calls {
        let r = c.await.unwrap();
        assert!(r.is_ok(), "an in-flight call was cut off: {r:?}");
    }
    watcher.await.unwrap();
    let client = app.pool.get().await.unwrap();
    let n: i64 = client
        .query_one("SELECT count(*) FROM users", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 6);
}

/// A stream is in flight until its last message: a shutdown lets a running export finish
/// rather than cutting it off as soon as no unary call is left. A live event stream never
/// ends by itself, so a shutdown ends it at once with UNAVAILABLE `SHUTTING_DOWN` (the client
/// resumes elsewhere from the last position it saw) instead of holding the server for the
/// whole grace period. Health turns NOT_SERVING as the drain begins.
#[tokio::test]
async fn shutdown_lets_exports_finish_and_ends_live_event_streams() {
    const N: usize = 8000;
    let mut app = TestApp::spawn_with(roster::config::ServerConfig {
        key_cache_ms: 50,
        shutdown_grace_secs: 60,
        ..Default::default()
    })
    .await;
    let mut users = app.users();
    crate::bulk::seed_more_than_buffers_hold(&mut users, N).await;
    let mut live = app
        .logs()
        .stream_events(pb::StreamEventsRequest {
            filter: "type = USER_DELETED".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // 8 MiB of users: far more than the buffers between server and client hold.
    let mut export = users
        .export_users(pb::ExportUsersRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut exported = usize::from(export.message().await.unwrap().is_some());
    let mut health = HealthClient::new(app.channel.clone())
        .watch(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    let status = |m: Option<tonic_health::pb::HealthCheckResponse>| m.unwrap().status;
    assert_eq!(
        status(health.message().await.unwrap()),
        ServingStatus::Serving as i32
    );
    let begun = std::time::Instant::now();
    app.begin_shutdown();
    let turned = tokio::time::timeout(Duration::from_secs(10), health.message())
        .await
        .expect("health still SERVING 10 s into the shutdown");
    assert_eq!(status(turned.unwrap()), ServingStatus::NotServing as i32);

    let ended = tokio::time::timeout(Duration::from_secs(10), live.message())
        .await
        .expect("the live stream was still open 10 s into the shutdown")
        .unwrap_err();
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    assert_eq!(reason(&ended), "SHUTTING_DOWN");

    // Well past the drain's pause after the last unary call: the server still waits on the
    // export (once `run_until` returns, `roster serve` exits and would cut it off).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        app.running(),
        "the server stopped with an export unfinished"
    );
    while let Some(m) = export.message().await.expect("the export was cut off") {
        exported += 1;
        drop(m);
    }
    assert_eq!(exported, N);
    app.stopped().await;
    assert!(
        begun.elapsed() < Duration::from_secs(30),
        "the shutdown waited on the live stream: {:?}",
        begun.elapsed()
    );
}

/// `GET path` over plain HTTP/1.1: (status line, body).
pub(crate) async fn http_get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

#[tokio::test]
async fn metrics_count_calls_by_method_and_code_and_show_the_pools() {
    let app = TestApp::spawn_with(roster::config::ServerConfig {
        metrics_listen: "127.0.0.1:0".into(),
        ..Default::default()
    })
    .await;
    let addr = app.metrics_addr.expect("metrics are served");
    let mut users = app.users();
    crate::create_user(&mut users, "m@example.com").await;
    for _ in 0..3 {
        let err = users
            .get_user(pb::GetUserRequest {
                id: uuid::Uuid::now_v7().to_string(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
    }
    // A made-up method is counted under "unknown", not under its own name.
    call_raw(&app, "/roster.v1.UserService/Invented", Some(&app.token)).await;

    let (status, body) = http_get(addr, "/metrics").await;
    assert!(status.contains("200"), "{status}");
    let line = |needle: &str| {
        body.lines()
            .find(|l| l.starts_with(needle))
            .unwrap_or_else(|| panic!("no {needle} in:\n{body}"))
            .to_string()
    };
    assert!(
        line(r#"roster_rpc_calls_total{method="/roster.v1.UserService/GetUser",code="NotFound"}"#)
            .ends_with(" 3")
    );
    assert!(
        line(r#"roster_rpc_calls_total{method="/roster.v1.UserService/CreateUser",code="Ok"}"#)
            .ends_with(" 1")
    );
    line(r#"roster_rpc_calls_total{method="unknown",code="Unimplemented"}"#);
    assert!(!body.contains("Invented"));
    line(r#"roster_rpc_duration_seconds_count{method="/roster.v1.UserService/GetUser"}"#);
    let build = line("roster_build_info{");
    assert_eq!(
        build,
        format!(
            r#"roster_build_info{{version="{}"}} 1"#,
            env!("CARGO_PKG_VERSION")
        )
    );
    for gauge in [
        "roster_db_pool_connections ",
        "roster_db_pool_idle_connections ",
        "roster_db_pool_waiting ",
        "roster_hash_queue_depth ",
        "roster_event_stream_subscribers ",
        "roster_exports_running ",
    ] {
        line(gauge);
    }
    let (status, _) = http_get(addr, "/other").await;
    assert!(status.contains("404"), "{status}");
}

/// A stream's status comes in its trailers, after its last message: the metrics count it
/// with that status, once it ends, and a stream the client drops counts as cancelled.
#[tokio::test]
async fn streams_are_counted_with_the_status_they_end_with() {
    let app = TestApp::spawn_with(roster::config::ServerConfig {
        metrics_listen: "127.0.0.1:0".into(),
        ..Default::default()
    })
    .await;
    let addr = app.metrics_addr.expect("metrics are served");
    let count = |method: &'static str, code: &'static str| async move {
        let (_, body) = http_get(addr, "/metrics").await;
        let needle =
            format!(r#"roster_rpc_calls_total{{method="/roster.v1.{method}",code="{code}"}} "#);
        body.lines()
            .find_map(|l| l.strip_prefix(&needle).map(|n| n.parse::<u64>().unwrap()))
            .unwrap_or(0)
    };

    // An import whose first message is not the options ends with INVALID_ARGUMENT in its
    // trailers, after the headers went out as a success.
    let mut users = app.users();
    let record = pb::ImportUsersRequest {
        item: Some(pb::import_users_request::Item::Record(pb::ImportRecord {
            user: Some(user_with_email("s@example.com")),
            ..Default::default()
        })),
    };
    let mut answers = users
        .import_users(tokio_stream::iter([record]))
        .await
        .unwrap()
        .into_inner();
    let err = answers.message().await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(count("UserService/ImportUsers", "InvalidArgument").await, 1);
    assert_eq!(count("UserService/ImportUsers", "Ok").await, 0);

    // A live stream is not finished while it runs; dropped by its client, it is cancelled.
    let mut logs = app.logs();
    let mut stream = logs
        .stream_events(pb::StreamEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    crate::create_user(&mut users, "live@example.com").await;
    assert!(stream.message().await.unwrap().is_some());
    assert_eq!(count("LogService/StreamEvents", "Ok").await, 0);
    let in_flight = || async move {
        let (_, body) = http_get(addr, "/metrics").await;
        body.lines()
            .find_map(|l| l.strip_prefix("roster_rpc_in_flight "))
            .map(|n| n.parse::<i64>().unwrap())
            .expect("the in-flight gauge")
    };
    assert_eq!(in_flight().await, 1, "the live stream is in flight");
    // Its reads are counted, shared or its own, as the feed counts them.
    let (_, body) = http_get(addr, "/metrics").await;
    let reads = |kind: &str| {
        let needle = format!(r#"roster_event_stream_reads_total{{kind="{kind}"}} "#);
        body.lines()
            .find_map(|l| l.strip_prefix(&needle).map(|n| n.parse::<u64>().unwrap()))
            .expect("the stream read counter")
    };
    let fed = app.feed.range_reads();
    assert_eq!((reads("shared"), reads("own")), (fed.shared, fed.own));
    assert!(fed.shared + fed.own >= 1, "{fed:?}");
    drop(stream);
    let mut cancelled = 0;
    for _ in 0..100 {
        cancelled = count("LogService/StreamEvents", "Cancelled").await;
        if cancelled > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(cancelled, 1);
    assert_eq!(in_flight().await, 0);
    assert_eq!(count("LogService/StreamEvents", "Ok").await, 0);

    // An export read to its end is a success.
    let exported = crate::bulk::export_all(&mut users, pb::ExportUsersRequest::default())
        .await
        .unwrap();
    assert_eq!(exported.len(), 1);
    assert_eq!(count("UserService/ExportUsers", "Ok").await, 1);
}

/// A call whose client set no deadline is still bounded by the server's: past it the call
/// answers DEADLINE_EXCEEDED (CALL_TIMEOUT) and its statement stops waiting.
#[tokio::test]
async fn the_server_bounds_calls_whose_clients_set_no_deadline() {
    let app = TestApp::spawn_with(roster::config::ServerConfig {
        metrics_listen: "127.0.0.1:0".into(),
        call_timeout_secs: 1,
        ..Default::default()
    })
    .await;
    let mut users = app.users();
    crate::create_user(&mut users, "bounded@example.com").await;
    let (locker, watch) = lock_users_table(&app).await;
    let started = std::time::Instant::now();
    let err = users
        .list_users(pb::ListUsersRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert_eq!(reason(&err), "CALL_TIMEOUT");
    assert!(err.message().contains("--call-timeout-secs"), "{err:?}");
    let took = started.elapsed();
    assert!(
        (Duration::from_secs(1)..Duration::from_secs(3)).contains(&took),
        "{took:?}"
    );
    wait_for_lock_waiters(&watch, &app.db_name, 0).await;
    locker.batch_execute("COMMIT").await.unwrap();

    let page = users
        .list_users(pb::ListUsersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.users.len(), 1);
    let (_, body) = http_get(app.metrics_addr.unwrap(), "/metrics").await;
    let needle = r#"roster_rpc_calls_total{method="/roster.v1.UserService/ListUsers",code="DeadlineExceeded"} 1"#;
    assert!(body.contains(needle), "no {needle} in:\n{body}");
}

/// A transaction holding the users table (every read of it waits until its COMMIT), and a
/// second connection to watch who waits: (locker, watch).
async fn lock_users_table(app: &TestApp) -> (tokio_postgres::Client, tokio_postgres::Client) {
    let connect = || async {
        let (c, conn) = tokio_postgres::connect(&app.url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        c
    };
    let locker = connect().await;
    locker
        .batch_execute("BEGIN; LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    (locker, connect().await)
}

/// How many of the server's backends in this test's database wait on a lock.
async fn lock_waiters(watch: &tokio_postgres::Client, db: &str) -> i64 {
    watch
        .query_one(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = $1 AND application_name = 'roster' AND wait_event_type = 'Lock'",
            &[&db],
        )
        .await
        .unwrap()
        .get(0)
}

async fn wait_for_lock_waiters(watch: &tokio_postgres::Client, db: &str, want: i64) {
    let mut seen = -1;
    for _ in 0..200 {
        seen = lock_waiters(watch, db).await;
        if seen == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("expected {want} backends waiting on a lock, still {seen} after 5 s");
}

#[tokio::test]
async fn a_cancelled_or_timed_out_call_stops_its_database_work() {
    let app = TestApp::spawn_with(roster::config::ServerConfig {
        metrics_listen: "127.0.0.1:0".into(),
        key_cache_ms: 60_000,
        ..Default::default()
    })
    .await;
    let mut users = app.users();
    let id = crate::create_user(&mut users, "deadline@example.com")
        .await
        .id;
    let (locker, watch) = lock_users_table(&app).await;

    // A deadline: tonic answers DEADLINE_EXCEEDED, and the statement must not go on waiting.
    let list = || pb::ListUsersRequest {
        filter: "email = \"deadline@example.com\"".into(),
        ..Default::default()
    };
    let mut call = users.clone();
    let req = list();
    let timed = tokio::spawn(async move {
        let mut req = tonic::Request::new(req);
        req.set_timeout(Duration::from_millis(1500));
        call.list_users(req).await
    });
    wait_for_lock_waiters(&watch, &app.db_name, 1).await;
    let err = timed.await.unwrap().unwrap_err();
    // The server answers DEADLINE_EXCEEDED, unless tonic's client gave up first (CANCELLED).
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err:?}"
    );
    wait_for_lock_waiters(&watch, &app.db_name, 0).await;

    // The client going away (RST_STREAM) does the same.
    let mut call = users.clone();
    let req = list();
    let abandoned = tokio::spawn(async move { call.list_users(req).await });
    wait_for_lock_waiters(&watch, &app.db_name, 1).await;
    abandoned.abort();
    wait_for_lock_waiters(&watch, &app.db_name, 0).await;

    // Single-row reads share pipelined connections and are not cancelled one by one (that
    // would hit their neighbours): a statement timeout bounds them instead, answered
    // UNAVAILABLE, and the connection is then free for the reads behind it.
    let started = std::time::Instant::now();
    let err = users
        .get_user(pb::GetUserRequest { id: id.clone() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert!(!err.message().contains("SELECT"), "{err:?}");
    wait_for_lock_waiters(&watch, &app.db_name, 0).await;

    // Nothing of it lingers: once released, calls are served as before.
    locker.batch_execute("COMMIT").await.unwrap();
    for _ in 0..20 {
        let got = users
            .get_user(pb::GetUserRequest { id: id.clone() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.user.unwrap().id, id);
        let page = users.list_users(list()).await.unwrap().into_inner();
        assert_eq!(page.users.len(), 1);
    }
    // Both abandoned calls are counted, each under the code its client saw.
    let (_, body) = http_get(app.metrics_addr.unwrap(), "/metrics").await;
    for code in ["DeadlineExceeded", "Cancelled"] {
        let needle = format!(
            r#"roster_rpc_calls_total{{method="/roster.v1.UserService/ListUsers",code="{code}"}} 1"#
        );
        assert!(body.contains(&needle), "no {needle} in:\n{body}");
    }
}

/// Copies `from` to `to` until `silent`; from then on passes nothing and holds both sockets
/// open, like a host that lost power or a route that went away.
async fn silenceable_pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    silent: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if silent.load(std::sync::atomic::Ordering::SeqCst) {
            let _held = (from, to);
            std::future::pending::<()>().await;
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A client host that vanishes without closing its connection is found by the server's
/// HTTP/2 PINGs: its live stream's reader is freed within twice `--keepalive-secs`, not after
/// the minutes TCP takes; a client that answers keeps its stream however long it is idle.
#[tokio::test]
async fn keepalive_frees_the_streams_of_a_client_that_went_silent() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let app = TestApp::spawn_with(roster::config::ServerConfig {
        key_cache_ms: 50,
        keepalive_secs: 1,
        ..roster::config::ServerConfig::default()
    })
    .await;
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_addr = proxy.local_addr().unwrap();
    let silent = Arc::new(AtomicBool::new(false));
    let upstream = app.addr;
    tokio::spawn({
        let silent = silent.clone();
        async move {
            while let Ok((client, _)) = proxy.accept().await {
                let server = tokio::net::TcpStream::connect(upstream).await.unwrap();
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(silenceable_pipe(cr, sw, silent.clone()));
                tokio::spawn(silenceable_pipe(sr, cw, silent.clone()));
            }
        }
    });
    let channel = crate::harness::channel_to(proxy_addr);
    let mut logs = roster::pb::v1::log_service_client::LogServiceClient::with_interceptor(
        channel,
        key(Some(&app.token)),
    );
    let _stream = logs
        .stream_events(pb::StreamEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let subscribers_within = |want: usize, secs: u64| {
        let feed = app.feed.clone();
        async move {
            for _ in 0..secs * 20 {
                if feed.subscribers() == want {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            false
        }
    };
    assert!(subscribers_within(1, 5).await);
    // Pings answered: the idle stream stays, several intervals on.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(app.feed.subscribers(), 1);

    silent.store(true, Ordering::SeqCst);
    assert!(
        subscribers_within(0, 10).await,
        "the silent client's stream still holds its reader"
    );
}

/// The server tells every HTTP/2 client how many calls one connection may have open at once
/// (tonic's default is no bound), and a channel with more in flight than that waits for a
/// free stream instead of failing.
#[tokio::test]
async fn a_connection_is_told_its_stream_bound_and_calls_past_it_wait() {
    let app = TestApp::spawn().await;
    let tcp = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let (_client, mut connection) = h2::client::handshake(tcp).await.unwrap();
    // Drive the connection until the server's SETTINGS frame has been read.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while connection.max_concurrent_send_streams() == usize::MAX {
        assert!(
            std::time::Instant::now() < deadline,
            "the server sent no stream bound"
        );
        let _ = tokio::time::timeout(Duration::from_millis(50), &mut connection).await;
    }
    assert_eq!(
        connection.max_concurrent_send_streams(),
        roster::server::MAX_STREAMS_PER_CONNECTION as usize
    );

    // 1,100 GetUser calls at once on the test's one channel: all answered.
    let user = crate::create_user(&mut app.users(), "streams@example.com").await;
    let calls = (0..1_100).map(|_| {
        let mut users = app.users();
        let id = user.id.clone();
        async move { users.get_user(pb::GetUserRequest { id }).await }
    });
    let answers = futures_util::future::join_all(calls).await;
    assert!(
        answers.iter().all(|a| a.is_ok()),
        "{:?}",
        answers.iter().find(|a| a.is_err())
    );
}

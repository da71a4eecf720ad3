//! LogService: listing and getting events, and live streams that neither skip nor repeat an
//! event when transactions commit out of order.
use std::collections::BTreeSet;
use std::time::Duration;

use roster::config::ServerConfig;
use tonic::Code;
use uuid::Uuid;

use crate::harness::{TestApp, violated_fields};
use crate::{create_user, pb};

fn list(filter: &str, page_size: i32, token: &str, order_by: &str) -> pb::ListEventsRequest {
    pb::ListEventsRequest {
        filter: filter.into(),
        page_size,
        page_token: token.into(),
        order_by: order_by.into(),
    }
}

fn type_of(e: &pb::Event) -> pb::EventType {
    pb::EventType::try_from(e.r#type).unwrap()
}

/// Receives `n` events from a stream, failing after `secs` seconds.
async fn take(
    stream: &mut tonic::Streaming<pb::StreamEventsResponse>,
    n: usize,
    secs: u64,
) -> Vec<pb::Event> {
    let mut out = Vec::new();
    while out.len() < n {
        let next = tokio::time::timeout(Duration::from_secs(secs), stream.message())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} events arrived: {out:?}", out.len()))
            .unwrap()
            .expect("stream ended");
        out.push(next.event.unwrap());
    }
    out
}

/// Asserts that nothing more arrives for a moment.
async fn quiet(stream: &mut tonic::Streaming<pb::StreamEventsResponse>) {
    let more = tokio::time::timeout(Duration::from_millis(300), stream.message()).await;
    assert!(more.is_err(), "unexpected: {more:?}");
}

async fn stream(
    app: &TestApp,
    after: i64,
    filter: &str,
) -> tonic::Streaming<pb::StreamEventsResponse> {
    app.logs()
        .stream_events(pb::StreamEventsRequest {
            after_position: after,
            since: None,
            filter: filter.into(),
            checkpoints: false,
        })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
async fn list_filters_pages_and_gets_events() {
    let app = TestApp::spawn().await;
    let mut users = app.users();
    let mut logs = app.logs();
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            create_user(&mut users, &format!("e{i}@example.com"))
                .await
                .id,
        );
    }
    let mut req = tonic::Request::new(pb::BlockUserRequest {
        id: ids[0].clone(),
        reason: "test".into(),
    });
    req.metadata_mut()
        .insert("x-request-id", "req-block-1".parse().unwrap());
    users.block_user(req).await.unwrap();

    // Newest first by default, with every field filled in.
    let all = logs
        .list_events(list("", 0, "", ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.events.len(), 6);
    assert!(all.next_page_token.is_empty());
    let newest = &all.events[0];
    assert_eq!(type_of(newest), pb::EventType::UserBlocked);
    assert_eq!(newest.user_id, ids[0]);
    assert_eq!(newest.request_id, "req-block-1");
    assert!(!newest.api_key_id.is_empty());
    assert!(newest.occurred_at.is_some());
    let data = newest.data.as_ref().unwrap();
    assert!(data.fields.contains_key("new_status"));
    let times: Vec<_> = all
        .events
        .iter()
        .map(|e| {
            let t = e.occurred_at.as_ref().unwrap();
            (t.seconds, t.nanos)
        })
        .collect();
    assert!(times.windows(2).all(|w| w[0] >= w[1]), "{times:?}");

    // Filters.
    for (filter, n) in [
        ("type = USER_CREATED", 5),
        ("type = EVENT_TYPE_USER_BLOCKED", 1),
        (&*format!("user_id = \"{}\"", ids[0]), 2),
        ("request_id = \"req-block-1\"", 1),
        (
            "occurred_at > \"2000-01-01T00:00:00Z\" AND NOT type = USER_BLOCKED",
            5,
        ),
        ("ip = \"10.255.255.1\"", 0),
    ] {
        let got = logs
            .list_events(list(filter, 0, "", ""))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.events.len(), n, "{filter}");
    }
    for bad in [
        "email = \"x\"",
        "type = NOT_A_TYPE",
        "user_id = \"x' OR 1=1 --\"",
        "(",
    ] {
        let err = logs.list_events(list(bad, 0, "", "")).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad}");
        assert_eq!(violated_fields(&err), ["filter"], "{bad}");
    }
    let err = logs
        .list_events(list("", -1, "", "created_at"))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["order_by", "page_size"]);

    // Pages of two, oldest first: every event once.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = logs
            .list_events(list("", 2, &token, "occurred_at"))
            .await
            .unwrap()
            .into_inner();
        seen.extend(page.events.iter().map(|e| e.id.clone()));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let mut expected: Vec<String> = all.events.iter().map(|e| e.id.clone()).collect();
    expected.reverse();
    assert_eq!(seen, expected);
    // A token is bound to its filter.
    let first = logs
        .list_events(list("", 2, "", ""))
        .await
        .unwrap()
        .into_inner();
    let err = logs
        .list_events(list("type = USER_CREATED", 2, &first.next_page_token, ""))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["page_token"]);

    // GetEvent.
    let got = logs
        .get_event(pb::GetEventRequest {
            id: newest.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .event
        .unwrap();
    assert_eq!(&got, newest);
    let err = logs
        .get_event(pb::GetEventRequest {
            id: Uuid::now_v7().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // Another project sees none of it.
    let (_, other) = app.other_project().await;
    let mut theirs = roster::pb::v1::log_service_client::LogServiceClient::with_interceptor(
        app.channel.clone(),
        crate::harness::key(Some(&other)),
    );
    let err = theirs
        .get_event(pb::GetEventRequest {
            id: newest.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let none = theirs
        .list_events(list("", 0, "", ""))
        .await
        .unwrap()
        .into_inner();
    assert!(none.events.is_empty());
    let mut s = theirs
        .stream_events(pb::StreamEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    quiet(&mut s).await;

    // Reading needs logs.read.
    let token = app.key(&["users.read"]).await;
    let mut weak = roster::pb::v1::log_service_client::LogServiceClient::with_interceptor(
        app.channel.clone(),
        crate::harness::key(Some(&token)),
    );
    let err = weak.list_events(list("", 0, "", "")).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn a_stream_replays_then_follows_and_resumes() {
    let app = TestApp::spawn().await;
    let mut users = app.users();
    for i in 0..3 {
        create_user(&mut users, &format!("s{i}@example.com")).await;
    }
    let mut s = stream(&app, 0, "").await;
    let replayed = take(&mut s, 3, 5).await;
    assert!(
        replayed
            .iter()
            .all(|e| type_of(e) == pb::EventType::UserCreated)
    );
    quiet(&mut s).await;

    // Live.
    let u = create_user(&mut users, "live@example.com").await;
    users
        .block_user(pb::BlockUserRequest {
            id: u.id.clone(),
            reason: String::new(),
        })
        .await
        .unwrap();
    let live = take(&mut s, 2, 5).await;
    assert_eq!(type_of(&live[0]), pb::EventType::UserCreated);
    assert_eq!(type_of(&live[1]), pb::EventType::UserBlocked);
    let positions: Vec<i64> = replayed.iter().chain(&live).map(|e| e.position).collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
    drop(s);

    // Resume after the third: exactly the two that followed.
    let mut s = stream(&app, replayed[2].position, "").await;
    let resumed = take(&mut s, 2, 5).await;
    assert_eq!(resumed, live);
    quiet(&mut s).await;

    // A filtered stream, and one from a time.
    let mut blocked = stream(&app, 0, "type = USER_BLOCKED").await;
    assert_eq!(take(&mut blocked, 1, 5).await[0].user_id, u.id);
    quiet(&mut blocked).await;
    let since = live[0].occurred_at;
    let mut from_time = app
        .logs()
        .stream_events(pb::StreamEventsRequest {
            after_position: 0,
            since,
            filter: String::new(),
            checkpoints: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(take(&mut from_time, 2, 5).await, live);
    quiet(&mut from_time).await;

    let err = app
        .logs()
        .stream_events(pb::StreamEventsRequest {
            after_position: -1,
            since: None,
            filter: "nope = 1".into(),
            checkpoints: false,
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["after_position", "filter"]);
}

/// The next message of a stream that asked for checkpoints, failing after `secs` seconds.
async fn next_message(
    stream: &mut tonic::Streaming<pb::StreamEventsResponse>,
    secs: u64,
) -> pb::StreamEventsResponse {
    let m = tokio::time::timeout(Duration::from_secs(secs), stream.message())
        .await
        .expect("nothing arrived")
        .unwrap()
        .expect("stream ended");
    assert!(
        m.event.is_some() != m.checkpoint.is_some(),
        "a message is an event or a checkpoint: {m:?}"
    );
    m
}

#[tokio::test]
async fn checkpoints_mark_the_backlogs_end_and_what_the_filter_passed_over() {
    let app = TestApp::spawn().await;
    let mut users = app.users();
    for i in 0..3 {
        create_user(&mut users, &format!("c{i}@example.com")).await;
    }
    let open = |after: i64, filter: &'static str| {
        let mut logs = app.logs();
        async move {
            logs.stream_events(pb::StreamEventsRequest {
                after_position: after,
                since: None,
                filter: filter.into(),
                checkpoints: true,
            })
            .await
            .unwrap()
            .into_inner()
        }
    };

    // The backlog, then a checkpoint at its end (the last event's position: nothing of this
    // project came after it).
    let mut all = open(0, "").await;
    let mut replayed = Vec::new();
    let end = loop {
        let m = next_message(&mut all, 5).await;
        match m.checkpoint {
            Some(c) => break c.position,
            None => replayed.push(m.event.unwrap()),
        }
    };
    assert_eq!(replayed.len(), 3, "{replayed:?}");
    assert!(end >= replayed[2].position, "{end} {replayed:?}");

    // A filtered stream with nothing to replay says so at once.
    let mut blocked = open(0, "type = USER_BLOCKED").await;
    let first = next_message(&mut blocked, 5).await;
    let caught_up = first
        .checkpoint
        .expect("a checkpoint, not an event")
        .position;
    assert!(caught_up >= replayed[2].position);

    // Events it leaves out move its checkpoints on, spaced at least a second apart, and the
    // last one comes even though the log went quiet before its time.
    let started = std::time::Instant::now();
    let mut created = Vec::new();
    for i in 0..12 {
        created.push(create_user(&mut users, &format!("d{i}@example.com")).await);
    }
    let last_created = app
        .logs()
        .list_events(list("type = USER_CREATED", 1, "", "occurred_at desc"))
        .await
        .unwrap()
        .into_inner()
        .events[0]
        .position;
    let mut checkpoints = vec![caught_up];
    while *checkpoints.last().unwrap() < last_created {
        let m = next_message(&mut blocked, 5).await;
        assert!(m.event.is_none(), "the filter lets no event through: {m:?}");
        let at = m.checkpoint.unwrap().position;
        assert!(
            at > *checkpoints.last().unwrap(),
            "{checkpoints:?} then {at}"
        );
        checkpoints.push(at);
    }
    let spaced_for = started.elapsed().as_secs_f64();
    assert!(
        (checkpoints.len() - 1) as f64 <= spaced_for + 1.0,
        "{} checkpoints in {spaced_for:.1} s",
        checkpoints.len() - 1
    );
    // The unfiltered stream is told about the same events as events, not checkpoints.
    for _ in 0..12 {
        let m = next_message(&mut all, 5).await;
        assert_eq!(type_of(&m.event.unwrap()), pb::EventType::UserCreated);
    }

    // Then a matching event, and a resume from the last checkpoint: that event alone, since
    // everything before the checkpoint was passed over.
    users
        .block_user(pb::BlockUserRequest {
            id: created[5].id.clone(),
            reason: String::new(),
        })
        .await
        .unwrap();
    let m = next_message(&mut blocked, 5).await;
    let block = m.event.expect("the block");
    assert_eq!(block.user_id, created[5].id);
    let mut resumed = stream(&app, *checkpoints.last().unwrap(), "type = USER_BLOCKED").await;
    assert_eq!(take(&mut resumed, 1, 5).await, std::slice::from_ref(&block));
    quiet(&mut resumed).await;
    let mut everything = stream(&app, *checkpoints.last().unwrap(), "").await;
    assert_eq!(take(&mut everything, 1, 5).await, [block]);

    // Another project's events are passed over too.
    let (_, other) = app.other_project().await;
    let before = *checkpoints.last().unwrap();
    create_user(&mut app.users_with(Some(&other)), "o@example.com").await;
    let m = next_message(&mut blocked, 5).await;
    let after = m.checkpoint.expect("a checkpoint").position;
    assert!(after > before);
}

#[tokio::test]
async fn out_of_order_commits_are_streamed_once_each_in_position_order() {
    const WRITERS: usize = 8;
    const PER_WRITER: usize = 25;
    let app = TestApp::spawn().await;
    let mut s = stream(&app, 0, "").await;
    let project = app.project_id;

    // Eight writers insert events in transactions that stay open for a random while, so
    // positions are taken in one order and committed in another. Half of them also abort now
    // and then: their positions must be skipped over, not waited for forever.
    let writers = (0..WRITERS).map(|w| {
        let pool = app.pool.clone();
        tokio::spawn(async move {
            let mut committed = 0;
            for i in 0..PER_WRITER {
                let mut client = pool.get().await.unwrap();
                let tx = client.transaction().await.unwrap();
                tx.execute(
                    "INSERT INTO events (project_id, id, type, data)
                     VALUES ($1, $2, 'USER_UPDATED', '{}')",
                    &[&project, &Uuid::now_v7()],
                )
                .await
                .unwrap();
                let hold = (w * 7 + i * 13) % 23;
                tokio::time::sleep(Duration::from_millis(hold as u64)).await;
                if w % 2 == 1 && i % 5 == 0 {
                    tx.rollback().await.unwrap();
                } else {
                    tx.commit().await.unwrap();
                    committed += 1;
                }
            }
            committed
        })
    });
    // Meanwhile, real RPCs write too.
    let mut users = app.users();
    let rpc_writes = async {
        for i in 0..20 {
            create_user(&mut users, &format!("w{i}@example.com")).await;
        }
        20
    };
    let (committed, rpc) = tokio::join!(futures_util::future::join_all(writers), rpc_writes);
    let total: usize = committed.into_iter().map(|c| c.unwrap()).sum::<usize>() + rpc;

    let got = take(&mut s, total, 20).await;
    quiet(&mut s).await;
    let positions: Vec<i64> = got.iter().map(|e| e.position).collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "out of order or repeated: {positions:?}"
    );
    let stored: Vec<i64> = {
        let client = app.pool.get().await.unwrap();
        client
            .query(
                "SELECT position FROM events WHERE project_id = $1 ORDER BY position",
                &[&project],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    assert_eq!(positions, stored, "every committed event exactly once");
    let unique: BTreeSet<&String> = got.iter().map(|e| &e.id).collect();
    assert_eq!(unique.len(), got.len());
}

#[tokio::test]
async fn a_transaction_left_open_holds_back_later_events_until_it_ends() {
    let app = TestApp::spawn().await;
    let mut s = stream(&app, 0, "").await;
    let mut users = app.users();

    // Take a position and keep the transaction open.
    let mut client = app.pool.get().await.unwrap();
    let tx = client.transaction().await.unwrap();
    let held: i64 = tx
        .query_one(
            "INSERT INTO events (project_id, id, type, data)
             VALUES ($1, $2, 'USER_UPDATED', '{}') RETURNING position",
            &[&app.project_id, &Uuid::now_v7()],
        )
        .await
        .unwrap()
        .get(0);
    // A later event commits first; delivering it now would let the held one be skipped.
    create_user(&mut users, "later@example.com").await;
    quiet(&mut s).await;

    tx.commit().await.unwrap();
    let got = take(&mut s, 2, 5).await;
    assert_eq!(got[0].position, held);
    assert_eq!(type_of(&got[1]), pb::EventType::UserCreated);
}

#[tokio::test]
async fn cancelling_a_stream_frees_its_reader() {
    let app = TestApp::spawn().await;
    let mut users = app.users();
    create_user(&mut users, "c@example.com").await;
    let streams: Vec<_> = futures_util::future::join_all((0..3).map(|_| stream(&app, 0, ""))).await;
    assert_eq!(app.feed.subscribers(), 3);
    drop(streams);
    // The readers notice the closed channels, also with no new events to send.
    for _ in 0..50 {
        if app.feed.subscribers() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(app.feed.subscribers(), 0);
}

#[tokio::test]
async fn old_events_are_deleted_in_the_background() {
    let app = TestApp::spawn_with(ServerConfig {
        key_cache_ms: 50,
        event_retention_days: 30,
        event_retention_interval_secs: 1,
        ..ServerConfig::default()
    })
    .await;
    let mut users = app.users();
    let old = create_user(&mut users, "old@example.com").await;
    let new = create_user(&mut users, "new@example.com").await;
    let old_id = Uuid::parse_str(&old.id).unwrap();
    app.pool
        .get()
        .await
        .unwrap()
        .execute(
            "UPDATE events SET occurred_at = now() - interval '31 days' WHERE user_id = $1",
            &[&old_id],
        )
        .await
        .unwrap();
    let mut left = Vec::new();
    for _ in 0..40 {
        left = app
            .logs()
            .list_events(list("", 0, "", ""))
            .await
            .unwrap()
            .into_inner()
            .events;
        if left.len() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].user_id, new.id);
}

/// A project's own retention (`roster projects policy --event-retention-days`) replaces the
/// server's for its events: 0 keeps them under a server that deletes, and a project's 30 days
/// delete under a server that keeps (`--event-retention-days 0`), while a project of 60 days
/// keeps events of 31.
#[tokio::test]
async fn a_projects_own_retention_replaces_the_servers() {
    use roster::admin::{PolicyChange as C, PolicyUpdate};
    let app = TestApp::spawn_with(ServerConfig {
        event_retention_days: 0,
        event_retention_interval_secs: 1,
        ..ServerConfig::default()
    })
    .await;
    let (keep_id, keep_token) = app.other_project().await;
    let (long_id, long_token) = app.other_project().await;
    let mut client = app.pool.get().await.unwrap();
    for (project, days) in [(app.project_id, 30), (keep_id, 0), (long_id, 60)] {
        roster::admin::update_policy(
            &mut **client,
            project,
            PolicyUpdate {
                event_retention_days: Some(C::Value(days)),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    }
    for token in [&app.token, &keep_token, &long_token] {
        create_user(&mut app.users_with(Some(token)), "aged@example.com").await;
    }
    // Every event of the three users, and the policy changes, 31 days old.
    client
        .execute(
            "UPDATE events SET occurred_at = now() - interval '31 days'",
            &[],
        )
        .await
        .unwrap();
    let events_of = |token: String| {
        let app = &app;
        async move {
            app.logs_with(Some(&token))
                .list_events(list("", 0, "", ""))
                .await
                .unwrap()
                .into_inner()
                .events
                .len()
        }
    };
    let mut left = usize::MAX;
    for _ in 0..40 {
        left = events_of(app.token.clone()).await;
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        left, 0,
        "30 days of the project's own, under a server that keeps"
    );
    // (One pass has run since: what it left is kept.)
    assert_eq!(events_of(keep_token.clone()).await, 2, "kept: 0 is forever");
    assert_eq!(events_of(long_token.clone()).await, 2, "kept: 60 days");
    // Back to the server's (keep): nothing more goes.
    roster::admin::update_policy(
        &mut **client,
        long_id,
        PolicyUpdate {
            event_retention_days: Some(C::ServerDefault),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        events_of(long_token).await,
        3,
        "the policy change's own event is new"
    );
}

/// Caught-up streams take each new range's events from one shared read and pick their own in
/// memory: for events with every mix of empty and set fields, and filters built to catch
/// SQL's NULL logic, exactly what a stream's own SQL read returns.
#[tokio::test]
async fn in_memory_stream_filters_agree_with_sql() {
    use roster::events::matcher::Matcher;
    use roster::events::store::{self, StreamSpec};

    let app = TestApp::spawn().await;
    let (user, key) = (Uuid::now_v7(), Uuid::now_v7());
    // Recent (retention deletes old events), in whole microseconds as stored.
    let base = chrono::DateTime::from_timestamp_micros(
        (chrono::Utc::now() - chrono::Duration::hours(2)).timestamp_micros(),
    )
    .unwrap();
    let mut rows = Vec::new();
    for t in ["USER_CREATED", "LOGIN_FAILED"] {
        for u in [None, Some(user)] {
            for k in [None, Some(key)] {
                for ip in [
                    None,
                    Some("10.0.0.1"),
                    Some("192.168.1.20"),
                    Some("10.0.0.10"),
                ] {
                    for rid in [None, Some("Req-A"), Some("req-b.x")] {
                        let at = base + chrono::Duration::seconds(rows.len() as i64);
                        rows.push((t, u, k, ip, rid, at));
                    }
                }
            }
        }
    }
    let client = app.pool.get().await.unwrap();
    for (i, (t, u, k, ip, rid, at)) in rows.iter().enumerate() {
        // An import's run id in a third of the events' data, two runs taking turns.
        let data = match i % 6 {
            0 => serde_json::json!({"run_id": "run-1"}),
            3 => serde_json::json!({"run_id": "Run-2", "outcome": "CREATED"}),
            _ => serde_json::json!({}),
        };
        client
            .execute(
                "INSERT INTO events (project_id, id, type, user_id, api_key_id, ip, request_id,
                                     occurred_at, data)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                &[
                    &app.project_id,
                    &Uuid::now_v7(),
                    t,
                    u,
                    k,
                    ip,
                    rid,
                    at,
                    &data,
                ],
            )
            .await
            .unwrap();
    }
    let at = |secs: f64| {
        (base + chrono::Duration::microseconds((secs * 1e6) as i64))
            .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
    };
    let filters = [
        String::new(),
        "type = USER_CREATED".into(),
        "type != EVENT_TYPE_LOGIN_FAILED".into(),
        format!("user_id = {user}"),
        format!("user_id != {user}"),
        format!("NOT user_id = {user}"),
        format!("NOT user_id != {user}"),
        format!("api_key_id = {key} OR user_id = {user}"),
        format!("NOT (api_key_id = {key} OR user_id = {user})"),
        r#"ip = "10.0.0.1""#.into(),
        r#"ip != "10.0.0.1""#.into(),
        r#"NOT ip = "10.0.0.1""#.into(),
        r#"ip = """#.into(),
        r#"ip != """#.into(),
        "ip:*".into(),
        r#"ip:"10.*""#.into(),
        r#"ip:"*.1""#.into(),
        r#"ip:"*0.0*""#.into(),
        r#"NOT ip:"10.*""#.into(),
        r#"request_id:"req-a""#.into(),
        r#"request_id = "Req-A""#.into(),
        r#"request_id = "req-a""#.into(),
        r#"request_id:"REQ-*""#.into(),
        r#"NOT (request_id = "Req-A" OR ip = "10.0.0.1")"#.into(),
        r#"(type = USER_CREATED AND NOT ip = "") OR request_id:*"#.into(),
        format!(r#"NOT (user_id = {user} AND ip = "10.0.0.10") AND type = LOGIN_FAILED"#),
        format!(r#"occurred_at >= "{}""#, at(10.0)),
        format!(r#"occurred_at < "{}""#, at(20.5)),
        format!(r#"occurred_at = "{}""#, at(3.0)),
        format!(
            r#"occurred_at != "{}" AND occurred_at <= "{}""#,
            at(3.0),
            at(5.0)
        ),
        format!(r#"occurred_at > "{}" OR NOT ip:*"#, at(90.0)),
        r#"run_id = "run-1""#.into(),
        r#"run_id = "RUN-1""#.into(),
        r#"run_id != "run-1""#.into(),
        r#"NOT run_id = "run-1""#.into(),
        r#"run_id:"run*""#.into(),
        "run_id:*".into(),
        r#"run_id = """#.into(),
        r#"type = USER_CREATED AND run_id = "Run-2""#.into(),
    ];
    let all_spec = StreamSpec {
        project_id: app.project_id,
        filter: None,
        since: None,
    };
    let all = store::read_range(&client, &all_spec, 0, i64::MAX, 1000)
        .await
        .unwrap();
    assert_eq!(all.len(), rows.len());
    for since in [None, Some(base + chrono::Duration::seconds(40))] {
        for f in &filters {
            let spec = StreamSpec {
                project_id: app.project_id,
                filter: roster::query::sql::parse_filter(f, store::filter_field).unwrap(),
                since,
            };
            let by_sql: Vec<i64> = store::read_range(&client, &spec, 0, i64::MAX, 1000)
                .await
                .unwrap()
                .iter()
                .map(|e| e.position)
                .collect();
            let m = Matcher::new(&spec).unwrap_or_else(|| panic!("no matcher for {f}"));
            let in_memory: Vec<i64> = all
                .iter()
                .filter(|e| m.matches(e).unwrap())
                .map(|e| e.position)
                .collect();
            assert_eq!(in_memory, by_sql, "filter {f:?}, since {since:?}");
        }
    }
}

/// With many streams following a project, a write costs one read of the new range, not one
/// per stream, and each stream still gets exactly its events (and none of another project's).
#[tokio::test]
async fn caught_up_streams_share_each_read() {
    let app = TestApp::spawn().await;
    let mut users = app.users();
    let (_, other_token) = app.other_project().await;
    let open_as = |token: String, filter: &'static str| {
        let mut logs = app.logs_with(Some(&token));
        async move {
            logs.stream_events(pb::StreamEventsRequest {
                after_position: 0,
                since: Some(prost_types::Timestamp::from(std::time::SystemTime::now())),
                filter: filter.into(),
                checkpoints: false,
            })
            .await
            .unwrap()
            .into_inner()
        }
    };
    let open = |filter: &'static str| open_as(app.token.clone(), filter);
    let mut other = open_as(other_token.clone(), "").await;
    // Different filters, each matching every USER_CREATED event written below.
    let filters = ["", "type = USER_CREATED", "type != USER_BLOCKED", "ip:*"];
    let mut streams =
        futures_util::future::join_all((0..12).map(|i| open(filters[i % filters.len()]))).await;
    // A first write that every stream receives: the horizon has then passed everything
    // written before (the projects' set-up too), so what follows counts only the writes below.
    let warm = create_user(&mut users, "warm@example.com").await.id;
    for s in &mut streams {
        assert_eq!(take(s, 1, 10).await[0].user_id, warm);
    }
    let before = app.feed.range_reads();
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            create_user(&mut users, &format!("s{i}@example.com"))
                .await
                .id,
        );
        // Every stream has its event before the next write: all are caught up each time.
        for s in &mut streams {
            let got = take(s, 1, 10).await;
            assert_eq!(got[0].user_id, ids[i]);
        }
    }
    let after = app.feed.range_reads();
    assert_eq!(after.own, before.own, "caught-up streams queried alone");
    // At most one read per project (this one and the other's) per write.
    assert!(
        (1..=10).contains(&(after.shared - before.shared)),
        "{before:?} -> {after:?}"
    );

    // A stream whose filter matches none of a range's events gets nothing from it.
    let mut blocked = open("type = USER_BLOCKED").await;
    create_user(&mut users, "s5@example.com").await;
    app.users()
        .block_user(pb::BlockUserRequest {
            id: ids[0].clone(),
            reason: String::new(),
        })
        .await
        .unwrap();
    let got = take(&mut blocked, 1, 10).await;
    assert_eq!(type_of(&got[0]), pb::EventType::UserBlocked);
    assert_eq!(got[0].user_id, ids[0]);
    quiet(&mut blocked).await;
    for s in &mut streams {
        let got = take(s, 1, 10).await;
        assert_eq!(type_of(&got[0]), pb::EventType::UserCreated);
    }

    // The other project's stream saw none of that, and gets its own project's write only.
    let theirs = create_user(&mut app.users_with(Some(&other_token)), "o@example.com").await;
    let got = take(&mut other, 1, 10).await;
    assert_eq!(got[0].user_id, theirs.id);
    quiet(&mut other).await;
    quiet(&mut streams[1]).await; // type = USER_CREATED, of this project
}

/// Operator commands that change a project (its keys, policy, relying party) are audit
/// events of that project like any other: no user and no key, the operator command as the
/// user agent, `data` naming what changed and never a key's secret; a revoke that changes
/// nothing, or a policy command without settings, records nothing.
#[tokio::test]
async fn operator_changes_to_a_project_are_audited() {
    let app = TestApp::spawn().await;
    let mut logs = app.logs();
    use roster::admin::{PolicyChange as C, PolicyUpdate, SmsPrefixesChange};
    let mut client = app.pool.get().await.unwrap();
    let (key, token) = roster::admin::create_key(
        &mut **client,
        app.project_id,
        "billing backend",
        &["users.read".into(), "logs.read".into()],
        None,
    )
    .await
    .unwrap();
    roster::admin::set_key_limit(&mut **client, key.id, Some(50.0), None)
        .await
        .unwrap();
    roster::admin::revoke_key(&mut **client, key.id)
        .await
        .unwrap();
    roster::admin::revoke_key(&mut **client, key.id)
        .await
        .unwrap();
    let policy = |update| {
        let pool = app.pool.clone();
        let project = app.project_id;
        async move {
            let mut client = pool.get().await.unwrap();
            roster::admin::update_policy(&mut **client, project, update)
                .await
                .unwrap();
        }
    };
    policy(PolicyUpdate {
        lockout_threshold: Some(C::Value(5)),
        password_history: Some(C::ServerDefault),
        sms_allowed_prefixes: Some(SmsPrefixesChange::Value(
            roster::authenticators::sends::SmsPrefixes::parse("+44").unwrap(),
        )),
        ..Default::default()
    })
    .await;
    policy(PolicyUpdate::default()).await;
    roster::admin::set_relying_party(
        &mut **client,
        app.project_id,
        "example.com",
        None,
        &["https://example.com".into()],
    )
    .await
    .unwrap();

    let events = logs
        .list_events(list("", 0, "", "occurred_at"))
        .await
        .unwrap()
        .into_inner()
        .events;
    let kinds: Vec<pb::EventType> = events.iter().map(type_of).collect();
    use pb::EventType as E;
    assert_eq!(
        kinds,
        [
            E::ApiKeyCreated,
            E::ApiKeyUpdated,
            E::ApiKeyRevoked,
            E::ProjectPolicyUpdated,
            E::ProjectUpdated,
        ]
    );
    for e in &events {
        assert!(e.user_id.is_empty() && e.api_key_id.is_empty(), "{e:?}");
        assert_eq!(e.user_agent, roster::events::store::OPERATOR);
    }
    let data: Vec<serde_json::Map<String, serde_json::Value>> = events
        .iter()
        .map(|e| roster::wire::struct_to_json(e.data.as_ref().unwrap()).unwrap())
        .collect();
    let id = key.id.to_string();
    assert_eq!(data[0]["key_id"], id.as_str());
    assert_eq!(data[0]["name"], "billing backend");
    assert_eq!(
        data[0]["scopes"],
        serde_json::json!(["users.read", "logs.read"])
    );
    assert_eq!(data[0]["expires_at"], serde_json::Value::Null);
    assert_eq!(data[1]["rate_limit_rps"], 50.0);
    assert_eq!(data[2]["key_id"], id.as_str());
    assert_eq!(
        data[3]["changed"],
        serde_json::json!({
            "lockout_threshold": 5,
            "password_history": "default",
            "sms_allowed_prefixes": "+44",
        })
    );
    assert_eq!(data[4]["webauthn_rp_id"], "example.com");
    let everything = format!("{events:?}");
    assert!(
        !everything.contains(crate::harness::key_secret(&token)),
        "a key's secret in an event"
    );
    // Filterable like any other event.
    let revoked = logs
        .list_events(list("type = API_KEY_REVOKED", 0, "", ""))
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(revoked.len(), 1);

    // A new project's log starts with its creation and its first key.
    let (project, token) = {
        let mut client = app.pool.get().await.unwrap();
        let p = roster::admin::create_project(&mut **client, "audited")
            .await
            .unwrap();
        let (_, token) =
            roster::admin::create_key(&mut **client, p.id, "reader", &["logs.read".into()], None)
                .await
                .unwrap();
        (p, token)
    };
    let theirs = app
        .logs_with(Some(&token))
        .list_events(list("", 0, "", "occurred_at"))
        .await
        .unwrap()
        .into_inner()
        .events;
    let kinds: Vec<pb::EventType> = theirs.iter().map(type_of).collect();
    assert_eq!(kinds, [E::ProjectCreated, E::ApiKeyCreated]);
    let created = roster::wire::struct_to_json(theirs[0].data.as_ref().unwrap()).unwrap();
    assert_eq!(created["name"], project.name.as_str());
    // Who ran the command, when the environment says.
    if let Ok(user) = std::env::var("USER") {
        assert_eq!(created["operator"], user.as_str(), "{created:?}");
    }
}

//! ImportUsers and ExportUsers through the real server: per-record results and errors, batching
//! that never fails a batch for one record, UPSERT idempotence, every hash format, resuming a
//! cut stream, export snapshots, masks and scopes, and round trips between projects.
use std::collections::{HashMap, HashSet};

use futures_util::StreamExt;
use roster::pb::v1 as pb;
use roster::pb::v1::import_users_request::Item as In;
use roster::pb::v1::import_users_response::Item as Out;
use uuid::Uuid;

use crate::get;
use crate::harness::{self, TestApp, Users};
use crate::passwords::{LEGACY_HASHES, LEGACY_PASSWORD};
use crate::user_with_email;

pub fn options(
    mode: pb::ImportMode,
    match_on: pb::ImportMatchOn,
    dry_run: bool,
) -> pb::ImportUsersRequest {
    pb::ImportUsersRequest {
        item: Some(In::Options(pb::ImportOptions {
            mode: mode as i32,
            match_on: match_on as i32,
            dry_run,
            run_id: String::new(),
        })),
    }
}

fn create_only() -> pb::ImportUsersRequest {
    options(
        pb::ImportMode::CreateOnly,
        pb::ImportMatchOn::Unspecified,
        false,
    )
}

fn upsert_on_email() -> pb::ImportUsersRequest {
    options(pb::ImportMode::Upsert, pb::ImportMatchOn::Email, false)
}

fn record(r: pb::ImportRecord) -> pb::ImportUsersRequest {
    pb::ImportUsersRequest {
        item: Some(In::Record(r)),
    }
}

fn by_email(email: &str) -> pb::ImportUsersRequest {
    record(pb::ImportRecord {
        user: Some(user_with_email(email)),
        ..Default::default()
    })
}

/// Runs one import stream to its end: results by index, and the summary.
pub async fn import(
    users: &mut Users,
    requests: impl Iterator<Item = pb::ImportUsersRequest> + Send + 'static,
) -> Result<(Vec<pb::ImportResult>, pb::ImportSummary), tonic::Status> {
    let mut inbound = users
        .import_users(tokio_stream::iter(requests))
        .await?
        .into_inner();
    let mut results = Vec::new();
    let mut summary = None;
    while let Some(msg) = inbound.message().await? {
        match msg.item {
            Some(Out::Result(r)) => {
                assert!(summary.is_none(), "a result after the summary");
                results.push(r);
            }
            Some(Out::Summary(s)) => summary = Some(s),
            None => panic!("an empty response message"),
        }
    }
    results.sort_by_key(|r| r.index);
    Ok((results, summary.expect("a summary ends the stream")))
}

fn outcome(r: &pb::ImportResult) -> pb::ImportOutcome {
    pb::ImportOutcome::try_from(r.outcome).unwrap()
}

/// The ErrorInfo reason and the field violations of a failed record.
fn failure(r: &pb::ImportResult) -> (i32, String, Vec<String>) {
    let e = r.error.as_ref().expect("a failed record has an error");
    let status = tonic::Status::with_details(
        tonic::Code::from(e.code),
        e.message.clone(),
        prost::Message::encode_to_vec(e).into(),
    );
    (
        e.code,
        harness::reason(&status),
        harness::violated_fields(&status),
    )
}

pub async fn export_all(
    users: &mut Users,
    req: pb::ExportUsersRequest,
) -> Result<Vec<pb::ExportUsersResponse>, tonic::Status> {
    let mut stream = users.export_users(req).await?.into_inner();
    let mut out = Vec::new();
    while let Some(m) = stream.message().await? {
        out.push(m);
    }
    Ok(out)
}

async fn count_users(app: &TestApp) -> i64 {
    app.sql_one("SELECT count(*) FROM users", &[]).await
}

#[tokio::test]
async fn a_bad_record_fails_alone_and_results_name_index_and_reason() {
    let app = TestApp::spawn().await;
    let mut users = app.users();
    crate::create_user(&mut users, "taken@example.com").await;
    let requests = vec![
        create_only(),
        by_email("one@example.com"),
        by_email("not an email"),
        by_email("taken@example.com"),
        record(pb::ImportRecord {
            user: Some(user_with_email("two@example.com")),
            password_hash: "$md5$nope".into(),
            ..Default::default()
        }),
        pb::ImportUsersRequest { item: None },
        record(pb::ImportRecord {
            user: Some(pb::User {
                email: "three@example.com".into(),
                display_name: "Zoë \"Q\" O'Brien".into(),
                app_metadata: Some(crate::pb_struct(serde_json::json!({"plan": "pro"}))),
                ..Default::default()
            }),
            identities: vec![pb::ImportIdentity {
                provider: "google".into(),
                subject: "g-3".into(),
                email: "three@example.com".into(),
                ..Default::default()
            }],
            created_at: Some(prost_types::Timestamp {
                seconds: 1_500_000_000,
                nanos: 0,
            }),
            ..Default::default()
        }),
        // Same email as record 0 later in the same stream: it meets record 0 as a stored user.
        by_email("ONE@example.com"),
    ];
    let (results, summary) = import(&mut users, requests.into_iter()).await.unwrap();
    assert_eq!(results.len(), 7);
    assert_eq!(
        results.iter().map(|r| r.index).collect::<Vec<_>>(),
        (0..7).collect::<Vec<_>>()
    );
    assert_eq!(outcome(&results[0]), pb::ImportOutcome::Created);
    assert_eq!(
        failure(&results[1]),
        (
            3,
            "INVALID_ARGUMENT".into(),
            vec!["record.user.email".into()]
        )
    );
    let (code, reason, _) = failure(&results[2]);
    assert_eq!((code, reason.as_str()), (6, "ALREADY_EXISTS"));
    assert!(results[2].error.as_ref().unwrap().message.contains("email"));
    assert_eq!(
        failure(&results[3]).2,
        vec!["record.password_hash".to_string()]
    );
    assert_eq!(failure(&results[4]).2, vec!["record".to_string()]);
    assert_eq!(outcome(&results[5]), pb::ImportOutcome::Created);
    assert_eq!(failure(&results[6]).1, "ALREADY_EXISTS");
    assert_eq!(
        (summary.created, summary.updated, summary.failed),
        (2, 0, 5)
    );

    // What was stored: the good records with every field, nothing of the bad ones.
    assert_eq!(count_users(&app).await, 3);
    let three = get(&mut users, &results[5].user_id).await;
    assert_eq!(three.display_name, "Zoë \"Q\" O'Brien");
    assert_eq!(three.created_at.unwrap().seconds, 1_500_000_000);
    let linked = app
        .identities()
        .lookup_user_by_identity(pb::LookupUserByIdentityRequest {
            provider: "google".into(),
            subject: "g-3".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(linked.user.unwrap().id, three.id);
    let events = app.events_of(&three.id).await;
    assert_eq!(events.len(), 1, "one event per imported user: {events:?}");
    assert_eq!(events[0].0, "USER_IMPORTED");
    assert_eq!(events[0].1["outcome"], "CREATED");
    assert_eq!(events[0].1["identities"], 1);
}

#[tokio::test]
async fn the_stream_must_open_with_valid_options() {
    let app = TestApp::spawn().await;
    let mut users = app.users();
    let err = import(&mut users, vec![by_email("a@example.com")].into_iter())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(harness::violated_fields(&err), vec!["options"]);

    let bad = pb::ImportUsersRequest {
        item: Some(In::Options(pb::ImportOptions {
            mode: 9,
            match_on: 7,
            dry_run: false,
            run_id: "two words".into(),
        })),
    };
    let err = import(&mut users, vec![bad].into_iter()).await.unwrap_err();
    assert_eq!(
        harness::violated_fields(&err),
        vec!["options.match_on", "options.mode", "options.run_id"]
    );

    // Options again later end the stream after what was already committed.
    let requests = vec![create_only(), by_email("a@example.com"), create_only()];
    let mut inbound = users
        .import_users(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    let err = loop {
        match inbound.message().await {
            Ok(Some(m)) => got.push(m),
            Ok(None) => panic!("the stream should fail"),
            Err(e) => break e,
        }
    };
    assert_eq!(got.len(), 1);
    assert_eq!(harness::violated_fields(&err), vec!["options"]);
    assert_eq!(count_users(&app).await, 1);

    // An import needs users.import.
    let token = app.key(&["users.write", "users.read"]).await;
    let err = import(
        &mut app.users_with(Some(&token)),
        vec![create_only()].into_iter(),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
}

#[tokio::test]
async fn a_dry_run_reports_everything_and_writes_nothing() {
    let app = TestApp::spawn().await;
    let mut users = app.users();
    crate::create_user(&mut users, "taken@example.com").await;
    let requests = vec![
        options(pb::ImportMode::CreateOnly, pb::ImportMatchOn::Email, true),
        by_email("new@example.com"),
        by_email("taken@example.com"),
    ];
    let (results, summary) = import(&mut users, requests.into_iter()).await.unwrap();
    assert_eq!(outcome(&results[0]), pb::ImportOutcome::Created);
    assert_eq!(failure(&results[1]).1, "ALREADY_EXISTS");
    assert_eq!((summary.created, summary.failed), (1, 1));
    assert_eq!(count_users(&app).await, 1);
    let imported: i64 = app
        .sql_one(
            "SELECT count(*) FROM events WHERE type = 'USER_IMPORTED'",
            &[],
        )
        .await;
    assert_eq!(imported, 0);
}

fn big_record(i: usize) -> pb::ImportUsersRequest {
    // Every 97th record is bad in one of three ways.
    let email = match i % 97 {
        0 if i.is_multiple_of(3) => format!("bad {i}"),
        0 if i % 3 == 1 => "dup@example.com".to_string(),
        _ => format!("user{i}@example.com"),
    };
    let phone = if i.is_multiple_of(97) && i % 3 == 2 {
        "555-0100".to_string()
    } else {
        String::new()
    };
    record(pb::ImportRecord {
        user: Some(pb::User {
            email,
            phone_number: phone,
            external_id: format!("ext-{i}"),
            given_name: format!("Given {i}"),
            ..Default::default()
        }),
        ..Default::default()
    })
}

#[tokio::test]
async fn a_hundred_thousand_records_with_bad_ones_mixed_in() {
    const N: usize = 100_000;
    let app = TestApp::spawn().await;
    let mut users = app.users();
    let requests = std::iter::once(create_only()).chain((0..N).map(big_record));
    let (results, summary) = import(&mut users, requests).await.unwrap();
    assert_eq!(results.len(), N);
    let mut bad = 0;
    let mut first_dup = true;
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r.index, i as i64);
        if i % 97 != 0 {
            assert_eq!(outcome(r), pb::ImportOutcome::Created, "record {i}");
            continue;
        }
        match i % 3 {
            0 => {
                assert_eq!(failure(r).2, vec!["record.user.email".to_string()], "{i}");
                bad += 1;
            }
            // The first duplicate is created; every later one clashes with it.
            1 if first_dup => {
                first_dup = false;
                assert_eq!(outcome(r), pb::ImportOutcome::Created);
            }
            1 => {
                assert_eq!(failure(r).1, "ALREADY_EXISTS", "{i}");
                bad += 1;
            }
            _ => {
                assert_eq!(failure(r).2, vec!["record.user.phone_number".to_string()]);
                bad += 1;
            }
        }
    }
    assert_eq!(summary.failed, bad);
    assert_eq!(summary.created, N as i64 - bad);
    assert_eq!(count_users(&app).await, N as i64 - bad);
    let events: i64 = app
        .sql_one(
            "SELECT count(*) FROM events WHERE type = 'USER_IMPORTED'",
            &[],
        )
        .await;
    assert_eq!(events, N as i64 - bad);
    // Every good record is there with its fields.
    let stored: i64 = app
        .sql_one(
            "SELECT count(*) FROM users WHERE given_name = 'Given ' || substr(external_id, 5)
               AND (email = 'user' || substr(external_id, 5) || '@example.com'
                    OR email = 'dup@example.com')",
            &[],
        )
        .await;
    assert_eq!(stored, N as i64 - bad);
}

#[tokio::test]
async fn upsert_updates_matches_and_a_second_run_changes_nothing() {
    let app = TestApp::spawn().await;
    let mut users = app.users();
    let existing = crate::create_user(&mut users, "old@example.com").await;
    let batch = || {
        vec![
            upsert_on_email(),
            record(pb::ImportRecord {
                user: Some(pb::User {
                    email: "OLD@example.com".into(),
                    display_name: "Updated".into(),
                    email_verified: true,
                    ..Default::default()
                }),
                password_hash: LEGACY_HASHES[0].1.into(),
                ..Default::default()
            }),
            by_email("fresh@example.com"),
            // Matching on email needs an email.
            record(pb::ImportRecord {
                user: Some(pb::User {
                    username: "nomail".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        ]
    };
    let (first, summary) = import(&mut users, batch().into_iter()).await.unwrap();
    assert_eq!(outcome(&first[0]), pb::ImportOutcome::Updated);
    assert_eq!(first[0].user_id, existing.id);
    assert_eq!(outcome(&first[1]), pb::ImportOutcome::Created);
    assert_eq!(failure(&first[2]).2, vec!["record.user.email".to_string()]);
    assert_eq!(
        (summary.created, summary.updated, summary.failed),
        (1, 1, 1)
    );
    let after_first = get(&mut users, &existing.id).await;
    assert_eq!(after_first.display_name, "Updated");
    assert_eq!(after_first.email, "OLD@example.com");
    assert!(after_first.email_verified && after_first.has_password);
    let events_before: i64 = app.sql_one("SELECT count(*) FROM events", &[]).await;

    let (second, summary) = import(&mut users, batch().into_iter()).await.unwrap();
    assert_eq!(
        (summary.created, summary.updated, summary.failed),
        (0, 2, 1)
    );
    assert_eq!(second[1].user_id, first[1].user_id);
    let after_second = get(&mut users, &existing.id).await;
    assert_eq!(after_second.etag, after_first.etag, "nothing was rewritten");
    let events_after: i64 = app.sql_one("SELECT count(*) FROM events", &[]).await;
    assert_eq!(events_after, events_before);
    assert_eq!(count_users(&app).await, 2);

    // UPSERT on external_id: a record whose other unique value belongs to someone else fails.
    let requests = vec![
        options(pb::ImportMode::Upsert, pb::ImportMatchOn::ExternalId, false),
        record(pb::ImportRecord {
            user: Some(pb::User {
                external_id: "x-1".into(),
                email: "fresh@example.com".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
    ];
    let (r, _) = import(&mut users, requests.into_iter()).await.unwrap();
    assert_eq!(failure(&r[0]).1, "ALREADY_EXISTS");
}

/// A user's state comes along: records create users blocked (with the reason), deactivated
/// or with a password to change, and sign-ins answer accordingly; on UPSERT those only ever
/// restrict (block, deactivate, require a change), never lift, so re-importing an older
/// file cannot reopen an account; contradictory records fail with field violations.
#[tokio::test]
async fn imported_users_keep_their_state_and_upserts_only_restrict() {
    use pb::VerifyPasswordResult as R;
    let app = TestApp::spawn().await;
    let mut users = app.users();
    let hash = LEGACY_HASHES[0].1;
    let rec = |email: &str, f: &dyn Fn(&mut pb::ImportRecord)| {
        let mut r = pb::ImportRecord {
            user: Some(user_with_email(email)),
            password_hash: hash.into(),
            ..Default::default()
        };
        f(&mut r);
        record(r)
    };
    let requests = vec![
        create_only(),
        rec("blocked@example.com", &|r| {
            r.blocked = true;
            r.blocked_reason = "chargebacks".into();
        }),
        rec("deactivated@example.com", &|r| r.deactivated = true),
        rec("change@example.com", &|r| r.require_password_change = true),
        rec("both@example.com", &|r| {
            r.blocked = true;
            r.deactivated = true;
        }),
        rec("pendingblocked@example.com", &|r| {
            r.pending = true;
            r.blocked = true;
        }),
        rec("reason@example.com", &|r| {
            r.blocked_reason = "no block".into()
        }),
        rec("long@example.com", &|r| {
            r.blocked = true;
            r.blocked_reason = "x".repeat(1025);
        }),
    ];
    let (res, summary) = import(&mut users, requests.into_iter()).await.unwrap();
    assert_eq!((summary.created, summary.failed), (3, 4), "{res:?}");
    assert_eq!(failure(&res[3]).2, ["record.blocked"]);
    assert_eq!(failure(&res[4]).2, ["record.blocked"]);
    assert_eq!(failure(&res[5]).2, ["record.blocked_reason"]);
    assert_eq!(failure(&res[6]).2, ["record.blocked_reason"]);

    let blocked = get(&mut users, &res[0].user_id).await;
    assert_eq!(blocked.status, pb::UserStatus::Blocked as i32);
    assert_eq!(blocked.blocked_reason, "chargebacks");
    let deactivated = get(&mut users, &res[1].user_id).await;
    assert_eq!(deactivated.status, pb::UserStatus::Deactivated as i32);
    assert!(
        get(&mut users, &res[2].user_id)
            .await
            .require_password_change
    );
    let a = app.authenticators();
    let sign_in = |email: &str| {
        let mut a = a.clone();
        let email = email.to_string();
        async move {
            let r = a
                .verify_password(pb::VerifyPasswordRequest {
                    login: Some(pb::verify_password_request::Login::Email(email)),
                    password: LEGACY_PASSWORD.into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            R::try_from(r.result).unwrap()
        }
    };
    assert_eq!(sign_in("blocked@example.com").await, R::Blocked);
    assert_eq!(sign_in("deactivated@example.com").await, R::Deactivated);
    assert_eq!(
        sign_in("change@example.com").await,
        R::PasswordChangeRequired
    );
    let imported = app.project_events(&["USER_IMPORTED"]).await;
    assert_eq!(imported[0].1["status"], "BLOCKED");
    assert_eq!(imported[0].1["blocked_reason"], "chargebacks");
    assert_eq!(imported[1].1["status"], "DEACTIVATED");
    assert_eq!(imported[2].1["require_password_change"], true);

    // UPSERT: an active user gets blocked and must change its password; a record without
    // those leaves a blocked user blocked and the flag set; deactivating a blocked user
    // leaves it blocked (and its reason).
    let active = crate::create_user(&mut users, "active@example.com").await;
    let upsert = |email: &str, f: &dyn Fn(&mut pb::ImportRecord)| {
        let mut r = pb::ImportRecord {
            user: Some(user_with_email(email)),
            ..Default::default()
        };
        f(&mut r);
        vec![upsert_on_email(), record(r)]
    };
    let (res, _) = import(
        &mut users,
        upsert("active@example.com", &|r| {
            r.blocked = true;
            r.blocked_reason = "found in a breach".into();
            r.require_password_change = true;
        })
        .into_iter(),
    )
    .await
    .unwrap();
    assert_eq!(outcome(&res[0]), pb::ImportOutcome::Updated);
    let now_blocked = get(&mut users, &active.id).await;
    assert_eq!(now_blocked.status, pb::UserStatus::Blocked as i32);
    assert_eq!(now_blocked.blocked_reason, "found in a breach");
    assert!(now_blocked.require_password_change);
    for f in [
        &(|_: &mut pb::ImportRecord| {}) as &dyn Fn(&mut pb::ImportRecord),
        &|r| r.deactivated = true,
        &|r| {
            r.blocked = true;
            r.blocked_reason = "another reason".into();
        },
    ] {
        import(&mut users, upsert("active@example.com", f).into_iter())
            .await
            .unwrap();
        let after = get(&mut users, &active.id).await;
        assert_eq!(after.etag, now_blocked.etag, "nothing lifted or rewritten");
    }
    // The last sign-in at the old store: kept on create, replaced on UPSERT only by a later
    // one (a sign-in here is later than any the old store saw).
    let at = |seconds: i64| Some(prost_types::Timestamp { seconds, nanos: 0 });
    for (seconds, kept) in [
        (1_700_000_000, 1_700_000_000),
        (1_600_000_000, 1_700_000_000),
    ] {
        import(
            &mut users,
            upsert("change@example.com", &|r| r.last_login_at = at(seconds)).into_iter(),
        )
        .await
        .unwrap();
        let u = crate::user_by_email(&mut users, "change@example.com").await;
        assert_eq!(u.last_login_at.map(|t| t.seconds), Some(kept));
    }
    let (res, _) = import(
        &mut users,
        upsert("change@example.com", &|r| {
            r.last_login_at = at(4_102_444_800)
        })
        .into_iter(),
    )
    .await
    .unwrap();
    assert_eq!(
        failure(&res[0]).2,
        ["record.last_login_at"],
        "2100 is not past"
    );

    // A deactivated user is not reactivated, a pending one can be deactivated.
    import(
        &mut users,
        upsert("deactivated@example.com", &|_| {}).into_iter(),
    )
    .await
    .unwrap();
    assert_eq!(
        get(&mut users, &deactivated.id).await.status,
        pb::UserStatus::Deactivated as i32
    );
    let pending = crate::create_pending(&mut users, "pending@example.com").await;
    import(
        &mut users,
        upsert("pending@example.com", &|r| r.deactivated = true).into_iter(),
    )
    .await
    .unwrap();
    assert_eq!(
        get(&mut users, &pending.id).await.status,
        pb::UserStatus::Deactivated as i32
    );
}

#[tokio::test]
async fn every_hash_format_imports_and_verifies() {
    let app = TestApp::spawn().await;
    let mut users = app.users();
    let requests = std::iter::once(create_only()).chain(LEGACY_HASHES.iter().enumerate().map(
        |(i, (_, hash))| {
            record(pb::ImportRecord {
                user: Some(user_with_email(&format!("h{i}@example.com"))),
                password_hash: hash.to_string(),
                ..Default::default()
            })
        },
    ));
    let (results, summary) = import(&mut users, requests).await.unwrap();
    assert_eq!(summary.created, LEGACY_HASHES.len() as i64, "{results:?}");
    let mut a = app.authenticators();
    for (i, (format, hash)) in LEGACY_HASHES.iter().enumerate() {
        let stored: String = app
            .sql_one(
                "SELECT password_hash FROM users WHERE id = $1",
                &[&Uuid::parse_str(&results[i].user_id).unwrap()],
            )
            .await;
        assert_eq!(stored, *hash, "stored as given");
        let r = a
            .verify_password(pb::VerifyPasswordRequest {
                login: Some(pb::verify_password_request::Login::Email(format!(
                    "h{i}@example.com"
                ))),
                password: LEGACY_PASSWORD.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.result, pb::VerifyPasswordResult::Ok as i32, "{format}");
    }
}

#[tokio::test]
async fn a_cut_stream_resumed_with_upsert_loses_and_duplicates_nothing() {
    const N: usize = 8000;
    let app = TestApp::spawn().await;
    let mut users = app.users();
    let rec = |i: usize| {
        record(pb::ImportRecord {
            user: Some(pb::User {
                email: format!("r{i}@example.com"),
                external_id: format!("r-{i}"),
                ..Default::default()
            }),
            ..Default::default()
        })
    };
    // Send the first 2,000 records, then cut the stream (the client goes away) as soon as
    // some results have arrived.
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let mut inbound = users
        .import_users(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(upsert_on_email()).await.unwrap();
    let sender = tokio::spawn(async move {
        for i in 0..2000 {
            if tx.send(rec(i)).await.is_err() {
                break;
            }
        }
        // Keep the stream open (no half-close) until it is cut.
        tokio::time::sleep(std::time::Duration::from_secs(30)).await;
    });
    let mut acknowledged = HashSet::new();
    while acknowledged.len() < 500 {
        match inbound.message().await.unwrap().unwrap().item {
            Some(Out::Result(r)) => {
                assert_eq!(outcome(&r), pb::ImportOutcome::Created);
                acknowledged.insert(r.index);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    drop(inbound);
    sender.abort();
    // Every acknowledged record is stored.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let stored = count_users(&app).await;
    assert!(stored >= acknowledged.len() as i64, "{stored}");

    // Resume from the first record without a result.
    let first_missing = (0..).find(|i| !acknowledged.contains(i)).unwrap() as usize;
    let requests = std::iter::once(upsert_on_email()).chain((first_missing..N).map(rec));
    let (results, summary) = import(&mut users, requests).await.unwrap();
    assert_eq!(summary.failed, 0, "{results:?}");
    assert_eq!(
        summary.created + summary.updated,
        (N - first_missing) as i64
    );
    assert_eq!(count_users(&app).await, N as i64);
    let distinct: i64 = app
        .sql_one("SELECT count(DISTINCT external_id) FROM users", &[])
        .await;
    assert_eq!(distinct, N as i64);
}

/// A CREATE_ONLY import sent again under the same `run_id` (a client resuming after a break)
/// finds the users that run created and answers them CREATED `replayed`, writing nothing;
/// anything else (a user that was there before, another run, a record without its own id,
/// a value since taken or freed, an identity the user lacks) still fails as a clash.
#[tokio::test]
async fn a_create_only_run_sent_again_replays_its_own_users_and_nothing_else() {
    let app = TestApp::spawn().await;
    let mut users = app.users();
    let before = crate::create_user(&mut users, "there@example.com").await;
    let run = |id: &str| {
        let mut o = create_only();
        if let Some(In::Options(opts)) = &mut o.item {
            opts.run_id = id.into();
        }
        o
    };
    let (a, b, d) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let with_id = |id: Uuid, email: &str, subjects: &[&str]| {
        record(pb::ImportRecord {
            user: Some(pb::User {
                email: email.into(),
                username: format!("u{}", &email[..1]),
                ..Default::default()
            }),
            user_id: id.to_string(),
            identities: subjects
                .iter()
                .map(|s| pb::ImportIdentity {
                    provider: "google".into(),
                    subject: s.to_string(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    };
    let first = vec![
        run("run-1"),
        with_id(a, "a@example.com", &["g-a"]),
        with_id(b, "b@example.com", &[]),
        by_email("c@example.com"),
    ];
    let (results, summary) = import(&mut users, first.into_iter()).await.unwrap();
    assert_eq!(summary.created, 3, "{results:?}");
    assert!(results.iter().all(|r| !r.replayed));
    let tagged: i64 = app
        .sql_one(
            "SELECT count(*) FROM events WHERE type = 'USER_IMPORTED'
               AND data->>'run_id' = 'run-1'",
            &[],
        )
        .await;
    assert_eq!(tagged, 3, "each USER_IMPORTED event names the run");
    // What a run created, found by its run id in the audit log.
    let listed = app
        .logs()
        .list_events(pb::ListEventsRequest {
            filter: r#"type = USER_IMPORTED AND run_id = "run-1""#.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    let mut of_run: Vec<String> = listed.iter().map(|e| e.user_id.clone()).collect();
    let mut created: Vec<String> = results.iter().map(|r| r.user_id.clone()).collect();
    of_run.sort();
    created.sort();
    assert_eq!(of_run, created);

    // b's email changes in between: the record no longer describes its user.
    let mut changed = get(&mut users, &b.to_string()).await;
    changed.email = "b2@example.com".into();
    users
        .update_user(pb::UpdateUserRequest {
            user: Some(changed),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["email".into()],
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let again = vec![
        run("run-1"),
        with_id(a, "a@example.com", &["g-a"]),
        with_id(b, "b@example.com", &[]),
        by_email("c@example.com"),
        with_id(d, "d@example.com", &[]),
        // The user that was there before names its id: not this run's.
        record(pb::ImportRecord {
            user: Some(user_with_email("there@example.com")),
            user_id: before.id.clone(),
            ..Default::default()
        }),
        // a again, with an identity its user does not have.
        with_id(a, "a@example.com", &["g-a", "g-other"]),
    ];
    let (results, summary) = import(&mut users, again.into_iter()).await.unwrap();
    let seen: Vec<(pb::ImportOutcome, bool)> =
        results.iter().map(|r| (outcome(r), r.replayed)).collect();
    use pb::ImportOutcome::{Created, Failed};
    assert_eq!(
        seen,
        vec![
            (Created, true),
            (Failed, false),
            (Failed, false),
            (Created, false),
            (Failed, false),
            (Failed, false),
        ],
        "{results:?}"
    );
    assert_eq!(results[0].user_id, a.to_string());
    assert_eq!(results[3].user_id, d.to_string());
    for r in [&results[1], &results[2], &results[4], &results[5]] {
        assert_eq!(failure(r).0, tonic::Code::AlreadyExists as i32, "{r:?}");
    }
    assert_eq!(
        (summary.created, summary.updated, summary.failed),
        (2, 0, 4)
    );
    // Nothing written for the replay: one new event (d's), a's user as it was.
    let events: i64 = app
        .sql_one(
            "SELECT count(*) FROM events WHERE type = 'USER_IMPORTED'",
            &[],
        )
        .await;
    assert_eq!(events, 4);
    let a_identities: i64 = app
        .sql_one("SELECT count(*) FROM identities WHERE user_id = $1", &[&a])
        .await;
    assert_eq!(a_identities, 1);
    assert_eq!(count_users(&app).await, 5);

    // Another run, or none, meets a's record as the clash it is.
    for options in [run("run-2"), create_only()] {
        let requests = vec![options, with_id(a, "a@example.com", &["g-a"])];
        let (results, _) = import(&mut users, requests.into_iter()).await.unwrap();
        assert_eq!(outcome(&results[0]), Failed, "{results:?}");
        assert!(!results[0].replayed);
    }
}

pub fn rich_user(i: usize) -> pb::ImportRecord {
    pb::ImportRecord {
        user: Some(pb::User {
            external_id: format!("ext,\"{i}\""),
            email: format!("rich{i}@example.com"),
            email_verified: i.is_multiple_of(2),
            phone_number: format!("+1415555{i:04}"),
            phone_verified: i.is_multiple_of(3),
            username: format!("rich_{i}"),
            display_name: format!("Ünïcødé \"quoted\", {i}"),
            given_name: "Ada".into(),
            family_name: "Lovelace 🚀".into(),
            picture_url: "https://example.com/a.png".into(),
            locale: "en-GB".into(),
            timezone: "Europe/London".into(),
            user_metadata: Some(crate::pb_struct(
                serde_json::json!({"theme": "dark", "n": i, "bio": "line one,\n\"line\" two"}),
            )),
            app_metadata: Some(crate::pb_struct(
                serde_json::json!({"roles": ["a", "b"], "nested": {"x": true}}),
            )),
            ..Default::default()
        }),
        user_id: Uuid::now_v7().to_string(),
        password_hash: LEGACY_HASHES[i % LEGACY_HASHES.len()].1.into(),
        // Two identities on every third user, one on the next, none on the rest.
        identities: [
            pb::ImportIdentity {
                provider: "google".into(),
                subject: format!("g-{i}"),
                email: format!("rich{i}@gmail.example"),
                profile: Some(crate::pb_struct(
                    serde_json::json!({"name": format!("Rich {i}"), "hd": null}),
                )),
                ..Default::default()
            },
            pb::ImportIdentity {
                provider: "saml".into(),
                subject: format!("CN=Rich {i}, \"O\""),
                connection: "acme-okta".into(),
                ..Default::default()
            },
        ]
        .into_iter()
        .take(2 - (i % 3).min(2))
        .collect(),
        pending: i.is_multiple_of(5),
        // Some blocked (with a reason) and some deactivated, never two states at once.
        blocked: !i.is_multiple_of(5) && i % 7 == 1,
        blocked_reason: if !i.is_multiple_of(5) && i % 7 == 1 {
            format!("fraud review {i}")
        } else {
            String::new()
        },
        deactivated: !i.is_multiple_of(5) && i % 7 != 1 && i % 11 == 2,
        require_password_change: i % 4 == 3,
        created_at: Some(prost_types::Timestamp {
            seconds: 1_600_000_000 + i as i64,
            nanos: 123_456_000,
        }),
        // Half signed in at the store they come from.
        last_login_at: i.is_multiple_of(2).then_some(prost_types::Timestamp {
            seconds: 1_700_000_000 + i as i64,
            nanos: 0,
        }),
        // A TOTP seed on every third, recovery codes on every fourth, an email channel on
        // every fifth.
        authenticators: [
            (i.is_multiple_of(3)).then(|| pb::ImportAuthenticator {
                r#type: pb::AuthenticatorType::Totp as i32,
                name: format!("Phone {i}"),
                totp_secret: vec![i as u8; 20],
                ..Default::default()
            }),
            (i % 4 == 1).then(|| pb::ImportAuthenticator {
                r#type: pb::AuthenticatorType::RecoveryCodes as i32,
                recovery_code_hashes: (0..3u8).map(|k| vec![k ^ i as u8; 32]).collect(),
                ..Default::default()
            }),
            (i % 5 == 2).then(|| pb::ImportAuthenticator {
                r#type: pb::AuthenticatorType::EmailOtp as i32,
                email: format!("rich{i}@example.com"),
                ..Default::default()
            }),
        ]
        .into_iter()
        .flatten()
        .collect(),
    }
}

/// The importable part of an exported user, as a record.
pub fn record_of(m: &pb::ExportUsersResponse) -> pb::ImportRecord {
    let u = m.user.clone().unwrap();
    pb::ImportRecord {
        user_id: u.id.clone(),
        password_hash: m.password_hash.clone(),
        identities: m.identities.clone(),
        pending: u.status == pb::UserStatus::PendingVerification as i32,
        blocked: u.status == pb::UserStatus::Blocked as i32,
        blocked_reason: u.blocked_reason,
        deactivated: u.status == pb::UserStatus::Deactivated as i32,
        require_password_change: u.require_password_change,
        created_at: u.created_at,
        last_login_at: u.last_login_at,
        authenticators: m.authenticators.clone(),
        user: Some(pb::User {
            external_id: u.external_id,
            email: u.email,
            email_verified: u.email_verified,
            phone_number: u.phone_number,
            phone_verified: u.phone_verified,
            username: u.username,
            display_name: u.display_name,
            given_name: u.given_name,
            family_name: u.family_name,
            picture_url: u.picture_url,
            locale: u.locale,
            timezone: u.timezone,
            user_metadata: u.user_metadata,
            app_metadata: u.app_metadata,
            ..Default::default()
        }),
    }
}

#[tokio::test]
async fn export_round_trips_into_a_fresh_project() {
    const N: usize = 2500;
    let app = TestApp::spawn().await;
    let mut users = app.users();
    let requests = std::iter::once(create_only()).chain((0..N).map(|i| record(rich_user(i))));
    let (res, summary) = import(&mut users, requests).await.unwrap();
    assert_eq!(summary.created, N as i64, "{:?}", &res[..2]);
    let all = pb::ExportUsersRequest {
        include_password_hashes: true,
        ..Default::default()
    };
    let exported = export_all(&mut users, all.clone()).await.unwrap();
    assert_eq!(exported.len(), N);
    // Identities come only when asked for (and then in every chunk of the stream).
    assert!(exported.iter().all(|m| m.identities.is_empty()));
    let all = pb::ExportUsersRequest {
        include_identities: true,
        include_authenticators: true,
        ..all
    };
    let exported = export_all(&mut users, all.clone()).await.unwrap();
    let with_totp = exported
        .iter()
        .filter(|m| m.authenticators.iter().any(|a| !a.totp_secret.is_empty()))
        .count();
    assert_eq!(with_totp, N.div_ceil(3), "every third user's seed");
    let with_identities = exported.iter().filter(|m| !m.identities.is_empty()).count();
    assert_eq!(with_identities, (0..N).filter(|i| i % 3 != 2).count());
    let sample = exported.iter().find(|m| m.identities.len() == 2).unwrap();
    assert_eq!(sample.identities[0].provider, "google");
    assert_eq!(sample.identities[1].connection, "acme-okta");
    let ids: Vec<&str> = exported
        .iter()
        .map(|m| m.user.as_ref().unwrap().id.as_str())
        .collect();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted, "id order");

    let (_, token) = app.other_project().await;
    let mut other = app.users_with(Some(&token));
    let records: Vec<_> = exported.iter().map(|m| record(record_of(m))).collect();
    let (_, summary) = import(&mut other, std::iter::once(create_only()).chain(records))
        .await
        .unwrap();
    assert_eq!(summary.created, N as i64);
    let again = export_all(&mut other, all).await.unwrap();
    assert_eq!(again.len(), N);
    for (a, b) in exported.iter().zip(&again) {
        assert_eq!(record_of(a), record_of(b));
    }
    // The imported identities sign their users in, in the new project.
    let g = &sample.identities[0];
    let found = app
        .identities_with(Some(&token))
        .lookup_user_by_identity(pb::LookupUserByIdentityRequest {
            provider: g.provider.clone(),
            subject: g.subject.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(found.id, sample.user.as_ref().unwrap().id);
}

/// Second factors survive a copy: exported with their secrets (TOTP seed opened, unused
/// recovery-code hashes, OTP channels; only for a key that may read secrets), imported into
/// another project, sealed again there: the same authenticator app's code and an unused
/// recovery code work, the default is kept, a spent code stays spent. Malformed factors fail
/// their record by field.
#[tokio::test]
async fn second_factors_survive_an_export_and_import() {
    use crate::factors::{code, confirmed_totp, mid_step};
    use pb::AuthenticatorType as T;
    let app = TestApp::spawn().await;
    let mut users = app.users();
    let mut authn = app.authenticators();
    let ada = pb::User {
        email_verified: true,
        ..user_with_email("ada@example.com")
    };
    let ada = crate::create(&mut users, ada).await;
    let (_, seed) = confirmed_totp(&mut authn, &ada.id).await;
    let codes = crate::factors::recovery_codes(&mut authn, &ada.id)
        .await
        .codes;
    authn
        .enroll_otp_channel(pb::EnrollOtpChannelRequest {
            user_id: ada.id.clone(),
            r#type: T::EmailOtp as i32,
            name: "Inbox".into(),
        })
        .await
        .unwrap();
    let verify = |authn: &mut crate::harness::Authenticators, user: &str, kind: T, code: &str| {
        let mut authn = authn.clone();
        let req = pb::VerifyFactorRequest {
            user_id: user.into(),
            r#type: kind as i32,
            code: code.into(),
            ..Default::default()
        };
        async move {
            let r = authn.verify_factor(req).await.unwrap().into_inner();
            pb::VerifyFactorResult::try_from(r.result).unwrap()
        }
    };
    // One recovery code spent before the copy.
    let spent = verify(&mut authn, &ada.id, T::RecoveryCodes, &codes[0]).await;
    assert_eq!(spent, pb::VerifyFactorResult::Ok);

    let all = pb::ExportUsersRequest {
        include_password_hashes: true,
        include_authenticators: true,
        ..Default::default()
    };
    // Seeds are secrets: authenticators.read alone is not enough.
    let token = app.key(&["users.export", "authenticators.read"]).await;
    let err = export_all(&mut app.users_with(Some(&token)), all.clone())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    let exported = export_all(&mut users, all).await.unwrap();
    let factors = &exported[0].authenticators;
    let kinds: Vec<i32> = factors.iter().map(|a| a.r#type).collect();
    assert_eq!(
        kinds,
        [T::Totp as i32, T::RecoveryCodes as i32, T::EmailOtp as i32]
    );
    assert_eq!(factors[0].totp_secret, seed);
    assert!(factors[0].is_default);
    assert_eq!(
        factors[1].recovery_code_hashes.len(),
        9,
        "the spent one is left out"
    );
    assert_eq!(factors[2].email, "ada@example.com");
    assert_eq!(factors[2].name, "Inbox");
    // The export's event says factors were read; no seed in any event.
    let exports = app.project_events(&["USERS_EXPORTED"]).await;
    assert_eq!(exports.last().unwrap().1["include_authenticators"], true);

    let (_, token) = app.other_project().await;
    let mut other = app.users_with(Some(&token));
    let records: Vec<_> = exported.iter().map(|m| record(record_of(m))).collect();
    let (res, summary) = import(&mut other, std::iter::once(create_only()).chain(records))
        .await
        .unwrap();
    assert_eq!(summary.created, 1, "{res:?}");
    let copy = &res[0].user_id;
    let listed = crate::factors::list_of(&mut app.authenticators_with(Some(&token)), copy).await;
    let kinds: Vec<(i32, bool)> = listed.iter().map(|a| (a.r#type, a.is_default)).collect();
    assert_eq!(
        kinds,
        [
            (T::Totp as i32, true),
            (T::RecoveryCodes as i32, false),
            (T::EmailOtp as i32, false)
        ]
    );
    let mut other_authn = app.authenticators_with(Some(&token));
    let now = mid_step().await;
    let totp = verify(&mut other_authn, copy, T::Totp, &code(&seed, now)).await;
    assert_eq!(totp, pb::VerifyFactorResult::Ok, "the same app's code");
    let recovery = verify(&mut other_authn, copy, T::RecoveryCodes, &codes[1]).await;
    assert_eq!(recovery, pb::VerifyFactorResult::Ok);
    let again = verify(&mut other_authn, copy, T::RecoveryCodes, &codes[0]).await;
    assert_ne!(again, pb::VerifyFactorResult::Ok, "spent before the copy");
    let copied = get(&mut other, copy).await;
    assert!(copied.enrolled_methods.contains(&(T::Totp as i32)));
    let imported = app.events_of(copy).await;
    let data = &imported.iter().find(|e| e.0 == "USER_IMPORTED").unwrap().1;
    assert_eq!(
        data["authenticators"],
        serde_json::json!(["TOTP", "RECOVERY_CODES", "EMAIL_OTP"])
    );
    let seed_text = format!("{seed:?}");
    assert!(
        !imported
            .iter()
            .any(|e| e.1.to_string().contains(&seed_text))
    );

    // Malformed factors fail their record, each by field.
    let factor = |f: &dyn Fn(&mut pb::ImportAuthenticator)| {
        let mut a = pb::ImportAuthenticator {
            r#type: T::Totp as i32,
            totp_secret: vec![7; 20],
            ..Default::default()
        };
        f(&mut a);
        a
    };
    let with = |email: &str, factors: Vec<pb::ImportAuthenticator>| {
        record(pb::ImportRecord {
            user: Some(user_with_email(email)),
            authenticators: factors,
            ..Default::default()
        })
    };
    let requests = vec![
        create_only(),
        with(
            "f1@example.com",
            vec![factor(&|a| a.r#type = T::Password as i32)],
        ),
        with(
            "f2@example.com",
            vec![factor(&|a| a.totp_secret = vec![1; 5])],
        ),
        with(
            "f3@example.com",
            vec![factor(&|a| {
                a.r#type = T::RecoveryCodes as i32;
                a.totp_secret.clear();
                // SHA-512 is taken (Keycloak's); 48 bytes is no hash a set is kept in.
                a.recovery_code_hashes = vec![vec![0; 64], vec![0; 48]];
            })],
        ),
        with(
            "f4@example.com",
            vec![factor(&|a| {
                a.r#type = T::SmsOtp as i32;
                a.totp_secret.clear();
                a.phone_number = "555-0100".into();
            })],
        ),
        with(
            "f5@example.com",
            vec![
                factor(&|a| a.is_default = true),
                factor(&|a| a.is_default = true),
            ],
        ),
        with(
            "f6@example.com",
            vec![factor(&|a| a.email = "x@example.com".into())],
        ),
        with(
            "f7@example.com",
            vec![factor(&|a| {
                a.r#type = T::RecoveryCodes as i32;
                a.totp_secret.clear();
                a.recovery_code_hashes = vec![vec![1; 32], vec![2; 32], vec![1; 32]];
            })],
        ),
        with(
            "f8@example.com",
            vec![factor(&|a| {
                a.r#type = T::RecoveryCodes as i32;
                a.totp_secret.clear();
                a.recovery_code_hashes = (0..33u8).map(|k| vec![k; 32]).collect();
            })],
        ),
    ];
    let (res, summary) = import(&mut users, requests.into_iter()).await.unwrap();
    assert_eq!(summary.failed, 8, "{res:?}");
    let says = |i: usize| res[i].error.as_ref().unwrap().message.clone();
    assert!(says(6).contains("must be distinct"), "{}", says(6));
    assert!(says(7).contains("at most 32"), "{}", says(7));
    let fields: Vec<Vec<String>> = res.iter().map(|r| failure(r).2).collect();
    assert_eq!(
        fields,
        [
            vec!["record.authenticators[0].type"],
            vec!["record.authenticators[0].totp_secret"],
            vec!["record.authenticators[0].recovery_code_hashes"],
            vec!["record.authenticators[0].phone_number"],
            vec!["record.authenticators"],
            vec!["record.authenticators[0].email"],
            vec!["record.authenticators[0].recovery_code_hashes"],
            vec!["record.authenticators[0].recovery_code_hashes"],
        ]
    );
}

/// Recovery codes another system issued (Better Auth's `AbCdE-12345`, Kratos's `abcd1234`),
/// imported as the SHA-256 of each as issued, or Keycloak's as the SHA-512 it keeps: they
/// work once each, typed with or without the dash, case kept as their system compared them;
/// a code of no possible shape is refused as a bad argument. A set Roster makes later takes
/// only its own shape again.
#[tokio::test]
async fn recovery_codes_another_system_issued_work_after_import() {
    use pb::AuthenticatorType as T;
    use pb::VerifyFactorResult as R;
    use sha2::Digest;
    let app = TestApp::spawn().await;
    let mut users = app.users();
    let authn = app.authenticators();
    let issued = ["AbCdE-12345", "FgHiJ-67890", "abcd1234"];
    let mut hashes: Vec<Vec<u8>> = issued
        .iter()
        .map(|c| sha2::Sha256::digest(c.replace('-', "")).to_vec())
        .collect();
    // Keycloak's code, shown as `QRST-UVWX-YZ12`, kept as the SHA-512 of `QRSTUVWXYZ12`.
    hashes.push(sha2::Sha512::digest("QRSTUVWXYZ12").to_vec());
    let requests = vec![
        create_only(),
        record(pb::ImportRecord {
            user: Some(user_with_email("bea@example.com")),
            authenticators: vec![pb::ImportAuthenticator {
                r#type: T::RecoveryCodes as i32,
                recovery_code_hashes: hashes,
                ..Default::default()
            }],
            ..Default::default()
        }),
    ];
    let (res, summary) = import(&mut users, requests.into_iter()).await.unwrap();
    assert_eq!(summary.created, 1, "{res:?}");
    let bea = crate::user_by_email(&mut users, "bea@example.com").await;
    assert!(bea.enrolled_methods.contains(&(T::RecoveryCodes as i32)));
    let sets = crate::factors::list_of(&mut app.authenticators(), &bea.id).await;
    assert_eq!(
        sets[0].name, "Recovery codes",
        "named as Roster's own sets are"
    );
    let verify = |code: &str| {
        let mut authn = authn.clone();
        let req = pb::VerifyFactorRequest {
            user_id: bea.id.clone(),
            r#type: T::RecoveryCodes as i32,
            code: code.into(),
            ..Default::default()
        };
        async move {
            authn
                .verify_factor(req)
                .await
                .map(|r| R::try_from(r.into_inner().result).unwrap())
        }
    };
    assert_eq!(verify("abcde-12345").await.unwrap(), R::InvalidCode);
    assert_eq!(verify("ZZZZ-ZZZZ-ZZZZ").await.unwrap(), R::InvalidCode);
    assert_eq!(verify("AbCdE-12345").await.unwrap(), R::Ok);
    assert_eq!(verify("AbCdE12345").await.unwrap(), R::CodeReused);
    assert_eq!(verify(" FgHiJ 67890 ").await.unwrap(), R::Ok);
    assert_eq!(verify("abcd-1234").await.unwrap(), R::Ok);
    assert_eq!(verify("qrst-uvwx-yz12").await.unwrap(), R::InvalidCode);
    assert_eq!(verify("QRST-UVWX-YZ12").await.unwrap(), R::Ok);
    assert_eq!(verify("QRSTUVWXYZ12").await.unwrap(), R::CodeReused);
    let err = verify("abc").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(harness::violated_fields(&err), ["code"]);
    assert!(
        err.message().contains("6 to 64 characters"),
        "{}",
        err.message()
    );
    let used: i64 = app
        .sql_one(
            "SELECT count(*) FROM recovery_codes WHERE used_at IS NOT NULL",
            &[],
        )
        .await;
    assert_eq!(used, 4);

    // A new set, Roster's own, replaces it and takes only Roster's shape.
    let fresh = crate::factors::recovery_codes(&mut authn.clone(), &bea.id)
        .await
        .codes;
    let err = verify("FgHiJ-67890").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().contains("XXXX-XXXX-XXXX"),
        "{}",
        err.message()
    );
    assert_eq!(verify(&fresh[0].to_lowercase()).await.unwrap(), R::Ok);
}

#[tokio::test]
async fn export_is_one_snapshot_with_mask_filter_scope_and_audit() {
    let app = TestApp::spawn().await;
    let mut users = app.users();
    let requests = std::iter::once(create_only()).chain((0..2500).map(|i| record(rich_user(i))));
    import(&mut users, requests).await.unwrap();

    // Users created while an export runs are not part of it.
    let mut stream = users
        .export_users(pb::ExportUsersRequest::default())
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(first.password_hash.is_empty());
    for i in 0..20 {
        crate::create_user(&mut users, &format!("late{i}@example.com")).await;
    }
    let mut n = 1;
    while stream.message().await.unwrap().is_some() {
        n += 1;
    }
    assert_eq!(n, 2500);

    // read_mask keeps only the named fields; the filter selects.
    let masked = export_all(
        &mut users,
        pb::ExportUsersRequest {
            filter: "email_verified = true AND phone_verified = true".into(),
            read_mask: crate::mask(&["email", "app_metadata"]),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(masked.len(), (0..2500).filter(|i| i % 6 == 0).count());
    let u = masked[0].user.clone().unwrap();
    assert!(u.email.starts_with("rich") && u.app_metadata.is_some());
    assert!(u.id.is_empty() && u.display_name.is_empty() && u.created_at.is_none());

    let err = export_all(
        &mut users,
        pb::ExportUsersRequest {
            filter: "password = 'x'".into(),
            read_mask: crate::mask(&["email", "password_hash"]),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(
        harness::violated_fields(&err),
        vec!["filter", "read_mask.paths[1]"]
    );

    // Hashes need users.export_secrets on top of users.export, identities identities.read.
    let token = app.key(&["users.export"]).await;
    let mut limited = app.users_with(Some(&token));
    let hashes = pb::ExportUsersRequest {
        include_password_hashes: true,
        ..Default::default()
    };
    let identities = pb::ExportUsersRequest {
        include_identities: true,
        ..Default::default()
    };
    for req in [hashes, identities] {
        let err = export_all(&mut limited, req).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
    }
    let plain = export_all(&mut limited, pb::ExportUsersRequest::default())
        .await
        .unwrap();
    assert!(
        plain
            .iter()
            .all(|m| m.password_hash.is_empty() && m.identities.is_empty())
    );
    let token = app.key(&["users.export", "users.export_secrets"]).await;
    let with = export_all(
        &mut app.users_with(Some(&token)),
        pb::ExportUsersRequest {
            include_password_hashes: true,
            filter: "email = \"rich1@example.com\"".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(with.len(), 1);
    assert_eq!(with[0].password_hash, LEGACY_HASHES[1].1);

    // Every export is audited: who, with what filter and fields, and whether hashes left.
    let client = app.pool.get().await.unwrap();
    let rows = client
        .query(
            "SELECT data, api_key_id FROM events WHERE type = 'USERS_EXPORTED' ORDER BY position",
            &[],
        )
        .await
        .unwrap();
    let data: Vec<serde_json::Value> = rows.iter().map(|r| r.get(0)).collect();
    // The refused export never ran, so it is not among them.
    assert_eq!(data.len(), 4, "{data:?}");
    assert_eq!(
        data[1]["fields"],
        serde_json::json!(["email", "app_metadata"])
    );
    assert_eq!(data[3]["include_password_hashes"], true);
    let keys: HashMap<usize, Option<Uuid>> = rows
        .iter()
        .enumerate()
        .map(|(i, r)| (i, r.get(1)))
        .collect();
    assert!(keys.values().all(Option::is_some));
    let text = serde_json::to_string(&data).unwrap();
    assert!(!text.contains("$argon2") && !text.contains("$2b$"));
}

#[tokio::test]
async fn export_streams_while_the_client_reads_slowly() {
    // A slow reader holds the server back rather than making it buffer: the stream still
    // delivers everything, in order, once the reader catches up.
    let app = TestApp::spawn().await;
    let mut users = app.users();
    let requests = std::iter::once(create_only()).chain((0..3000).map(big_record_ok));
    import(&mut users, requests).await.unwrap();
    let mut stream = users
        .export_users(pb::ExportUsersRequest {
            read_mask: crate::mask(&["id"]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let mut last = String::new();
    let mut n = 0;
    while let Some(m) = stream.next().await {
        let id = m.unwrap().user.unwrap().id;
        assert!(id > last);
        last = id;
        n += 1;
    }
    assert_eq!(n, 3000);
}

/// Imports `n` users with 1 KiB of metadata each. From 8,000 on that is more than an export's
/// three chunks of 1,000 users and HTTP/2's windows and buffers between it and its client
/// hold, so an export its client does not read waits on that client.
pub async fn seed_more_than_buffers_hold(users: &mut Users, n: usize) {
    let padding = "x".repeat(1024);
    let requests = std::iter::once(create_only()).chain((0..n).map(move |i| {
        record(pb::ImportRecord {
            user: Some(pb::User {
                email: format!("big{i}@example.com"),
                user_metadata: Some(crate::pb_struct(serde_json::json!({ "pad": padding }))),
                ..Default::default()
            }),
            ..Default::default()
        })
    }));
    import(users, requests).await.unwrap();
}

/// Each export holds a connection and a snapshot while it runs: past `--max-exports` they are
/// refused, and one whose client takes nothing for `--export-stall-secs` is ended, which frees
/// its slot; the stalled client, reading again, gets what was sent and then EXPORT_STALLED,
/// never a stream that looks complete.
#[tokio::test]
async fn exports_past_the_limit_are_refused_and_a_stalled_one_is_ended() {
    const N: usize = 8000;
    let app = TestApp::spawn_with(roster::config::ServerConfig {
        max_exports: 1,
        export_stall_secs: 1,
        metrics_listen: "127.0.0.1:0".into(),
        ..Default::default()
    })
    .await;
    let running = || async {
        let (_, body) = crate::server::http_get(app.metrics_addr.unwrap(), "/metrics").await;
        body.lines()
            .find_map(|l| l.strip_prefix("roster_exports_running "))
            .unwrap()
            .to_string()
    };
    let mut users = app.users();
    seed_more_than_buffers_hold(&mut users, N).await;

    let mut stalled = users
        .export_users(pb::ExportUsersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(stalled.next().await.unwrap().is_ok());
    let err = users
        .export_users(pb::ExportUsersRequest::default())
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    assert_eq!(harness::reason(&err), "TOO_MANY_EXPORTS");
    assert!(harness::details(&err).retry_info().is_some());
    assert_eq!(running().await, "1");

    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    assert_eq!(
        running().await,
        "0",
        "the stalled export gave its slot back"
    );
    // The stalled export is over and its slot free: another runs to its end.
    let ids = pb::ExportUsersRequest {
        read_mask: crate::mask(&["id"]),
        ..Default::default()
    };
    assert_eq!(export_all(&mut users, ids).await.unwrap().len(), N);

    let mut got = 1;
    let err = loop {
        match stalled.next().await {
            Some(Ok(_)) => got += 1,
            Some(Err(e)) => break e,
            None => panic!("a stalled export ended as if complete after {got} users"),
        }
    };
    assert!(got < N, "{got}");
    assert_eq!(err.code(), tonic::Code::Aborted);
    assert_eq!(harness::reason(&err), "EXPORT_STALLED");
    // Both refusals are counted by reason: the one before the stream (in its headers) and the
    // one ending it (in its trailers).
    let metrics = app.metrics().await;
    for reason in ["TOO_MANY_EXPORTS", "EXPORT_STALLED"] {
        let series = format!(
            "roster_rpc_errors_total{{method=\"/roster.v1.UserService/ExportUsers\",reason=\"{reason}\"}}"
        );
        assert_eq!(metrics.get(&series), Some(&1.0), "{series}");
    }
}

fn big_record_ok(i: usize) -> pb::ImportUsersRequest {
    by_email(&format!("ok{i}@example.com"))
}

#[tokio::test]
async fn an_import_racing_create_user_for_the_same_emails_stores_each_once() {
    const N: usize = 1500;
    let app = TestApp::spawn().await;
    let mut importer = app.users();
    let mut creator = app.users();
    let requests = std::iter::once(create_only())
        .chain((0..N).map(|i| by_email(&format!("race{i}@example.com"))));
    // CreateUser walks the same emails from the other end while the import runs.
    let racing = tokio::spawn(async move {
        let mut won = 0;
        for i in (0..N).rev() {
            let r = creator
                .create_user(pb::CreateUserRequest {
                    user: Some(user_with_email(&format!("race{i}@example.com"))),
                    ..Default::default()
                })
                .await;
            match r {
                Ok(_) => won += 1,
                Err(e) => assert_eq!(e.code(), tonic::Code::AlreadyExists),
            }
        }
        won
    });
    let (results, summary) = import(&mut importer, requests).await.unwrap();
    let won_by_create = racing.await.unwrap();
    for r in &results {
        if outcome(r) == pb::ImportOutcome::Failed {
            assert_eq!(failure(r).1, "ALREADY_EXISTS", "{r:?}");
        }
    }
    assert_eq!(summary.created + won_by_create, N as i64);
    assert_eq!(count_users(&app).await, N as i64);
}

#[tokio::test]
async fn imported_hashes_provider_tokens_and_key_secrets_stay_out_of_logs_and_events() {
    let (logs, _guard) = crate::passwords::capture_logs();
    let app = TestApp::spawn().await;
    let mut users = app.users();
    let bad_hash = "$argon2id$v=19$m=999999999,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo";
    let seed = b"totp-seed-secret-0123";
    let seed_forms = [
        hex::encode(seed),
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, seed),
        format!("{:?}", seed.to_vec()),
        "totp-seed-secret".to_string(),
    ];
    let requests = vec![
        create_only(),
        record(pb::ImportRecord {
            user: Some(user_with_email("s1@example.com")),
            password_hash: LEGACY_HASHES[0].1.into(),
            authenticators: vec![pb::ImportAuthenticator {
                r#type: pb::AuthenticatorType::Totp as i32,
                totp_secret: seed.to_vec(),
                ..Default::default()
            }],
            ..Default::default()
        }),
        record(pb::ImportRecord {
            user: Some(user_with_email("s2@example.com")),
            password_hash: bad_hash.into(),
            // A good seed on a bad record: refused with the record, and not repeated.
            authenticators: vec![pb::ImportAuthenticator {
                r#type: pb::AuthenticatorType::Totp as i32,
                totp_secret: seed.to_vec(),
                ..Default::default()
            }],
            ..Default::default()
        }),
    ];
    let (results, _) = import(&mut users, requests.into_iter()).await.unwrap();
    assert_eq!(
        failure(&results[1]).2,
        vec!["record.password_hash".to_string()]
    );
    let error_text = format!("{:?}", results[1].error);
    let exported = export_all(
        &mut users,
        pb::ExportUsersRequest {
            include_password_hashes: true,
            include_authenticators: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        exported[0].password_hash, LEGACY_HASHES[0].1,
        "export is the one way out"
    );
    assert_eq!(exported[0].authenticators[0].totp_secret, seed);
    let (access, refresh) = ("ya29.access-token-secret", "1//refresh-token-secret");
    app.identities()
        .link_identity(pb::LinkIdentityRequest {
            user_id: results[0].user_id.clone(),
            provider: "google".into(),
            subject: "g-secret".into(),
            access_token: access.into(),
            refresh_token: refresh.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    app.identities()
        .get_provider_tokens(pb::GetProviderTokensRequest {
            user_id: results[0].user_id.clone(),
            provider: "google".into(),
            subject: "g-secret".into(),
        })
        .await
        .unwrap();

    let logged = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(logged.contains("rpc finished"), "logs were captured");
    let key_secret = crate::harness::key_secret(&app.token);
    let events: Vec<serde_json::Value> = {
        let client = app.pool.get().await.unwrap();
        client
            .query("SELECT data FROM events", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    let events = serde_json::to_string(&events).unwrap();
    let seeds = seed_forms.iter().map(String::as_str);
    for secret in [LEGACY_HASHES[0].1, bad_hash, access, refresh, key_secret]
        .into_iter()
        .chain(seeds)
    {
        assert!(!logged.contains(secret), "a secret in the logs: {secret}");
        assert!(!events.contains(secret), "a secret in the events: {secret}");
        assert!(
            !error_text.contains(secret),
            "a secret in an error: {secret}"
        );
    }
}

/// With `--password-history`, an UPSERT that replaces a user's hash files the old one, as
/// SetPassword does: the replaced password cannot come back while it is among the last ones,
/// the history keeps its length, and a record with the hash the user already has files
/// nothing.
#[tokio::test]
async fn upserted_hashes_keep_the_password_history() {
    use crate::passwords::{PASSWORD, user_with_password};
    let app = TestApp::spawn_with(roster::config::ServerConfig {
        password_history: 3,
        ..Default::default()
    })
    .await;
    let mut users = app.users();
    let user = user_with_password(&app, "moved@example.com").await;
    let with_hash = |hash: &str| {
        record(pb::ImportRecord {
            user: Some(user_with_email("moved@example.com")),
            password_hash: hash.into(),
            ..Default::default()
        })
    };
    let kept = || async {
        let id = uuid::Uuid::parse_str(&user.id).unwrap();
        app.sql_one::<i64>(
            "SELECT count(*) FROM password_history WHERE user_id = $1",
            &[&id],
        )
        .await
    };
    // Whether PASSWORD may be the user's next one, as ChangePassword would decide.
    let password_allowed = || {
        let mut a = app.authenticators();
        let user_id = user.id.clone();
        async move {
            a.check_password(pb::CheckPasswordRequest {
                password: PASSWORD.into(),
                user_id,
                check_history: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .acceptable
        }
    };
    assert!(!password_allowed().await, "the current one");
    // Three bcrypt strings of LEGACY_PASSWORD ($2b$, $2a$, $2y$) one after another, then the
    // last one again: PASSWORD is filed by the first and falls out of the last three with
    // the third.
    let hashes = [
        LEGACY_HASHES[6].1,
        LEGACY_HASHES[7].1,
        LEGACY_HASHES[8].1,
        LEGACY_HASHES[8].1,
    ];
    for (i, hash) in hashes.iter().enumerate() {
        let (results, summary) =
            import(&mut users, [upsert_on_email(), with_hash(hash)].into_iter())
                .await
                .unwrap();
        assert_eq!(summary.failed, 0, "{results:?}");
        assert_eq!(kept().await, [1, 2, 2, 2][i], "after import {i}");
        assert_eq!(password_allowed().await, i >= 2, "after import {i}");
    }
}

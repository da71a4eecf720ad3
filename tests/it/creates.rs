//! CreateUser coalescing (`users::creates`): creates in flight together are written in one
//! statement, and each call still gets exactly the answer it would have had alone.
use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tokio::task::JoinHandle;
use tonic::{Code, Status};
use uuid::Uuid;

use crate::get;
use crate::harness::{TestApp, details};
use crate::{pb, user_with_email};

fn with_metrics() -> roster::config::ServerConfig {
    roster::config::ServerConfig {
        metrics_listen: "127.0.0.1:0".into(),
        ..Default::default()
    }
}

/// One create to queue: the request, the key to send it with (None: the app's), and a
/// deadline.
struct Call {
    request: pb::CreateUserRequest,
    token: Option<String>,
    deadline: Option<Duration>,
}

fn call(user: pb::User) -> Call {
    Call {
        request: pb::CreateUserRequest {
            user: Some(user),
            ..Default::default()
        },
        token: None,
        deadline: None,
    }
}

/// Sends `calls` so that they queue, in order, behind creates held at the database (a lock on
/// the users table occupies every write slot), then lets them all go: they are handed to the
/// database as one batch. Returns their calls' handles.
async fn queued_creates(
    app: &TestApp,
    calls: Vec<Call>,
) -> Vec<JoinHandle<Result<pb::User, Status>>> {
    let lock = app.pool.get().await.unwrap();
    lock.batch_execute("BEGIN; LOCK TABLE users IN SHARE MODE")
        .await
        .unwrap();
    let slots = roster::config::ServerConfig::default().write_slots();
    let holders: Vec<_> = (0..slots)
        .map(|_| {
            let mut users = app.users();
            tokio::spawn(async move {
                let email = format!("holder-{}@x.io", Uuid::now_v7().simple());
                users
                    .create_user(pb::CreateUserRequest {
                        user: Some(user_with_email(&email)),
                        ..Default::default()
                    })
                    .await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut handles = Vec::new();
    for c in calls {
        let mut users = app.users_with(Some(c.token.as_deref().unwrap_or(&app.token)));
        handles.push(tokio::spawn(async move {
            let mut request = tonic::Request::new(c.request);
            if let Some(d) = c.deadline {
                request.set_timeout(d);
            }
            users
                .create_user(request)
                .await
                .map(|r| r.into_inner().user.unwrap())
        }));
        // Keeps the queue in the order given.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    lock.batch_execute("COMMIT").await.unwrap();
    for h in holders {
        h.await.unwrap().expect("a holder's create");
    }
    handles
}

async fn answers(
    handles: Vec<JoinHandle<Result<pb::User, Status>>>,
) -> Vec<Result<pb::User, Status>> {
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

fn already_exists(answer: &Result<pb::User, Status>, field: &str) {
    let err = answer.as_ref().expect_err("ALREADY_EXISTS");
    assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
    let details = details(err);
    let info = details.error_info().unwrap();
    assert_eq!(
        info.metadata.get("field").map(String::as_str),
        Some(field),
        "{err:?}"
    );
}

/// The stored user `id` of the app's project has exactly one event, USER_CREATED.
async fn created_once(app: &TestApp, id: &str) {
    let client = app.pool.get().await.unwrap();
    let types: Vec<String> = client
        .query(
            "SELECT type FROM events WHERE project_id = $1 AND user_id = $2",
            &[&app.project_id, &Uuid::parse_str(id).unwrap()],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(types, ["USER_CREATED"], "events of {id}");
}

/// How many calls the histogram `name` saw answered by turns of more than `n` calls, and
/// whether any was.
fn turns_over(metrics: &HashMap<String, f64>, name: &str, n: u32) -> f64 {
    let le = |b: String| {
        metrics
            .get(&format!("{name}_bucket{{le=\"{b}\"}}"))
            .copied()
    };
    le("+Inf".into()).unwrap() - le(format!("{n}.0")).unwrap()
}

/// A batch holding a repeated email (differently cased), an email already stored, a repeated
/// client-chosen id, the same email and id in another project, a password, and a caller that
/// gave up while queued: each call is answered as if it had been alone, and what is stored
/// matches the answers, one event per user.
#[tokio::test]
async fn a_batch_of_creates_answers_each_as_if_alone() {
    let app = TestApp::spawn_with(with_metrics()).await;
    let taken = crate::create_user(&mut app.users(), "taken@x.io").await;
    let (_, other) = app.other_project().await;
    let id = Uuid::now_v7().to_string();
    let with_id = |email: &str, token: Option<&String>| Call {
        request: pb::CreateUserRequest {
            user: Some(user_with_email(email)),
            user_id: id.clone(),
            ..Default::default()
        },
        token: token.cloned(),
        deadline: None,
    };
    let mut in_other = call(user_with_email("Dup@x.io"));
    in_other.token = Some(other.clone());
    let mut gone = call(user_with_email("gone@x.io"));
    gone.deadline = Some(Duration::from_millis(100));
    let mut with_password = call(pb::User {
        email: "pw@x.io".into(),
        display_name: "Has Password".into(),
        ..Default::default()
    });
    with_password.request.initial_password = Some(
        pb::create_user_request::InitialPassword::Password("a long enough passphrase 7".into()),
    );
    let handles = queued_creates(
        &app,
        vec![
            call(user_with_email("Dup@x.io")),
            call(user_with_email("dup@X.io")),
            call(user_with_email("taken@x.io")),
            with_id("first-id@x.io", None),
            with_id("second-id@x.io", None),
            in_other,
            with_id("other-id@x.io", Some(&other)),
            gone,
            with_password,
        ],
    )
    .await;
    let a = answers(handles).await;
    let ok = |i: usize| a[i].as_ref().unwrap_or_else(|e| panic!("call {i}: {e:?}"));
    assert_eq!(ok(0).email, "Dup@x.io");
    already_exists(&a[1], "email");
    already_exists(&a[2], "email");
    assert_eq!(
        (ok(3).id.as_str(), ok(3).email.as_str()),
        (id.as_str(), "first-id@x.io")
    );
    already_exists(&a[4], "id");
    assert_eq!(ok(5).email, "Dup@x.io");
    assert_ne!(ok(5).id, ok(0).id);
    assert_eq!(
        (ok(6).id.as_str(), ok(6).email.as_str()),
        (id.as_str(), "other-id@x.io")
    );
    let err = a[7].as_ref().unwrap_err();
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err:?}"
    );
    assert_eq!(
        (ok(8).email.as_str(), ok(8).has_password),
        ("pw@x.io", true)
    );
    assert_eq!(ok(8).display_name, "Has Password");

    // What is stored is what was answered: one row per winner, one event each, the caller
    // who had gone written nowhere.
    let mut users = app.users();
    for i in [0, 3, 8] {
        let got = get(&mut users, &ok(i).id).await;
        assert_eq!(&got, ok(i));
        created_once(&app, &ok(i).id).await;
    }
    let stored: i64 = app
        .sql_one(
            "SELECT count(*) FROM users WHERE lower(email) IN ('dup@x.io', 'taken@x.io', 'gone@x.io', 'second-id@x.io')",
            &[],
        )
        .await;
    assert_eq!(stored, 3, "Dup@x.io in each project and taken@x.io");
    let events: i64 = app
        .sql_one(
            "SELECT count(*) FROM events WHERE type = 'USER_CREATED' AND user_id = $1",
            &[&Uuid::parse_str(&taken.id).unwrap()],
        )
        .await;
    assert_eq!(events, 1);
    let orphans: i64 = app
        .sql_one(
            "SELECT count(*) FROM events e WHERE e.user_id IS NOT NULL AND NOT EXISTS
                 (SELECT 1 FROM users u WHERE u.project_id = e.project_id AND u.id = e.user_id)",
            &[],
        )
        .await;
    assert_eq!(orphans, 0, "an event for a user not written");

    // The nine queued calls went to the database together.
    let metrics = app.metrics().await;
    assert!(turns_over(&metrics, "roster_user_create_batch_size", 8) >= 1.0);
}

/// A user whose row the database refuses (here a trigger raises an error for one email) fails
/// alone: the users batched with it are written and answered as usual. The error's DETAIL,
/// which for PostgreSQL's own errors may quote the row, reaches neither the caller nor the log.
#[tokio::test]
async fn a_create_failing_in_a_batch_fails_alone() {
    let (logs, _guard) = crate::passwords::capture_logs();
    let app = TestApp::spawn_with(with_metrics()).await;
    let db = app.pool.get().await.unwrap();
    db.batch_execute(
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.email = 'refused@x.io' THEN
                 RAISE EXCEPTION 'refused by the test'
                     USING DETAIL = 'Failing row contains (row-detail-secret)';
             END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER refuse BEFORE INSERT ON users
             FOR EACH ROW EXECUTE FUNCTION refuse();",
    )
    .await
    .unwrap();
    let emails = ["a@x.io", "b@x.io", "refused@x.io", "c@x.io", "d@x.io"];
    let handles = queued_creates(
        &app,
        emails.iter().map(|e| call(user_with_email(e))).collect(),
    )
    .await;
    let a = answers(handles).await;
    for (email, answer) in emails.iter().zip(&a) {
        if *email == "refused@x.io" {
            let err = answer.as_ref().unwrap_err();
            assert_eq!(err.code(), Code::Internal, "{err:?}");
            assert!(
                !err.message().contains("refused by"),
                "database text leaked: {err:?}"
            );
        } else {
            let user = answer.as_ref().unwrap();
            assert_eq!(user.email, *email);
            created_once(&app, &user.id).await;
        }
    }
    let refused: i64 = app
        .sql_one(
            "SELECT count(*) FROM users WHERE email = 'refused@x.io'",
            &[],
        )
        .await;
    assert_eq!(refused, 0);
    let metrics = app.metrics().await;
    assert!(turns_over(&metrics, "roster_user_create_batch_size", 4) >= 1.0);
    let logged = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        logged.contains("refused by the test"),
        "the error is logged"
    );
    assert!(!logged.contains("row-detail-secret"), "the DETAIL is not");
}

/// The call leading a batch gives up while the batch is at the database (its row waits on a
/// lock the test holds): the batch still completes, and every other call in it is answered.
/// The leader's user is written (its write had begun), with its event.
#[tokio::test]
async fn a_leader_giving_up_mid_batch_strands_no_other_call() {
    let app = TestApp::spawn().await;
    let db = app.pool.get().await.unwrap();
    db.batch_execute(
        "CREATE FUNCTION gate() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.email = 'leader@x.io' THEN PERFORM pg_advisory_xact_lock_shared(4242); END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER gate BEFORE INSERT ON users FOR EACH ROW EXECUTE FUNCTION gate();
         SELECT pg_advisory_lock(4242);",
    )
    .await
    .unwrap();
    let mut leader = call(user_with_email("leader@x.io"));
    leader.deadline = Some(Duration::from_millis(900));
    let mut calls = vec![leader];
    calls.extend((0..5).map(|i| call(user_with_email(&format!("led{i}@x.io")))));
    let handles = queued_creates(&app, calls).await;
    // The leader's deadline passes while its batch waits on the lock.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(
        handles[0].is_finished(),
        "the leader's call is still waiting"
    );
    db.batch_execute("SELECT pg_advisory_unlock(4242)")
        .await
        .unwrap();
    let a = answers(handles).await;
    let err = a[0].as_ref().unwrap_err();
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err:?}"
    );
    for (i, answer) in a.iter().enumerate().skip(1) {
        let user = answer
            .as_ref()
            .unwrap_or_else(|e| panic!("call {i}: {e:?}"));
        assert_eq!(user.email, format!("led{}@x.io", i - 1));
        created_once(&app, &user.id).await;
    }
    let leader: Uuid = app
        .sql_one("SELECT id FROM users WHERE email = 'leader@x.io'", &[])
        .await;
    created_once(&app, &leader.to_string()).await;
}

/// Many clients creating at once over two projects, some racing for the same emails: every
/// call gets its own user or ALREADY_EXISTS, each contested email is won exactly once, and
/// every stored user has its one event (and no event lacks its user).
#[tokio::test]
async fn concurrent_creates_are_written_together_and_each_gets_its_own_answer() {
    let app = TestApp::spawn_with(with_metrics()).await;
    let (_, other) = app.other_project().await;
    const CLIENTS: usize = 32;
    const ROUNDS: usize = 8;
    let mut tasks = Vec::new();
    for t in 0..CLIENTS {
        // Clients 24.. work in the other project, with the same emails as clients 0..8.
        let (mut users, mine) = if t < 24 {
            (app.users(), t)
        } else {
            (app.users_with(Some(&other)), t - 24)
        };
        tasks.push(tokio::spawn(async move {
            let mut made = Vec::new();
            for round in 0..ROUNDS {
                // Every third round, clients 2k and 2k+1 race for one email.
                let email = if round % 3 == 2 && t < 24 {
                    format!("contested-{round}-{}@x.io", t / 2)
                } else {
                    format!("c{mine}-r{round}@x.io")
                };
                let name = format!("client {t} round {round}");
                let answer = users
                    .create_user(pb::CreateUserRequest {
                        user: Some(pb::User {
                            email: email.clone(),
                            display_name: name.clone(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                    .await;
                match answer {
                    Ok(r) => {
                        let user = r.into_inner().user.unwrap();
                        assert_eq!(
                            (user.email.as_str(), user.display_name.as_str()),
                            (email.as_str(), name.as_str())
                        );
                        made.push((t >= 24, user.id, email));
                    }
                    Err(e) => {
                        assert!(email.starts_with("contested-"), "{email}: {e:?}");
                        assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
                    }
                }
            }
            made
        }));
    }
    let mut made = Vec::new();
    for t in tasks {
        made.extend(t.await.unwrap());
    }
    let contested: HashSet<&String> = made
        .iter()
        .filter(|(_, _, e)| e.starts_with("contested-"))
        .map(|(_, _, e)| e)
        .collect();
    let contested_wins = made
        .iter()
        .filter(|(_, _, e)| e.starts_with("contested-"))
        .count();
    // Rounds 2 and 5, twelve pairs each: each email won once.
    assert_eq!((contested.len(), contested_wins), (24, 24));
    assert_eq!(made.len(), CLIENTS * ROUNDS - 24);
    let (mut ours, mut theirs) = (app.users(), app.users_with(Some(&other)));
    for (in_other, id, email) in &made {
        let users = if *in_other { &mut theirs } else { &mut ours };
        let got = get(users, id).await;
        assert_eq!(&got.email, email);
    }
    let (users, events): (i64, i64) = (
        app.sql_one("SELECT count(*) FROM users", &[]).await,
        app.sql_one(
            "SELECT count(*) FROM events WHERE type = 'USER_CREATED'",
            &[],
        )
        .await,
    );
    assert_eq!((users, events), (made.len() as i64, made.len() as i64));
    let paired: i64 = app
        .sql_one(
            "SELECT count(*) FROM events e JOIN users u
                 ON u.project_id = e.project_id AND u.id = e.user_id
             WHERE e.type = 'USER_CREATED'",
            &[],
        )
        .await;
    assert_eq!(paired, made.len() as i64);
    let metrics = app.metrics().await;
    let calls = (CLIENTS * ROUNDS) as f64;
    assert_eq!(metrics["roster_user_create_batch_size_sum"], calls);
    assert!(
        metrics["roster_user_create_batch_size_count"] < calls,
        "no two creates were written together"
    );
}

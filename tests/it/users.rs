//! UserService: create, get, lookup, update, delete, lifecycle, contact verification.
use serde_json::json;
use tonic::Code;

use crate::harness::{TestApp, details, reason, violated_fields};
use crate::{create, create_user, get, mask, pb, pb_struct, user_with_email};

#[tokio::test]
async fn create_then_get_returns_every_field_and_ignores_output_only_ones() {
    let app = TestApp::spawn().await;
    let mut users = app.users();
    let input = pb::User {
        id: "ignored".into(),
        external_id: "ext-1".into(),
        email: "  Ada@Example.com ".into(),
        email_verified: true,
        phone_number: "+14155550123".into(),
        username: "ada".into(),
        display_name: "Ada Lovelace".into(),
        given_name: "Ada".into(),
        family_name: "Lovelace".into(),
        picture_url: "https://example.com/ada.png".into(),
        locale: "en-GB".into(),
        timezone: "Europe/London".into(),
        status: pb::UserStatus::Blocked as i32,
        login_count: 99,
        user_metadata: Some(pb_struct(json!({"theme": "dark"}))),
        app_metadata: Some(pb_struct(json!({"plan": "pro", "seats": 5}))),
        ..Default::default()
    };
    let created = users
        .create_user(pb::CreateUserRequest {
            user: Some(input),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(
        created.email, "Ada@Example.com",
        "email is trimmed, case kept"
    );
    assert_eq!(
        created.status,
        pb::UserStatus::Active as i32,
        "status is output only"
    );
    assert_eq!(created.login_count, 0);
    assert!(
        uuid::Uuid::parse_str(&created.id)
            .unwrap()
            .get_version_num()
            == 7
    );
    assert!(!created.etag.is_empty());
    assert!(!created.has_password);

    let got = get(&mut users, &created.id).await;
    assert_eq!(got, created);
    assert_eq!(
        got.app_metadata,
        Some(pb_struct(json!({"plan": "pro", "seats": 5})))
    );
    assert_eq!(got.locale, "en-GB");

    let events = app.events_of(&created.id).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].0, "USER_CREATED");
    assert!(events[0].2.is_some(), "the api key is recorded");
}

#[tokio::test]
async fn create_with_password_stores_an_argon2id_hash_never_returned() {
    let app = TestApp::spawn().await;
    let mut users = app.users();
    let created = users
        .create_user(pb::CreateUserRequest {
            user: Some(user_with_email("p@x.io")),
            initial_password: Some(pb::create_user_request::InitialPassword::Password(
                "correct horse battery".into(),
            )),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert!(created.has_password);
    assert!(created.password_changed_at.is_some());
    assert_eq!(
        created.enrolled_methods,
        vec![pb::AuthenticatorType::Password as i32]
    );
    let client = app.pool.get().await.unwrap();
    let hash: String = client
        .query_one(
            "SELECT password_hash FROM users WHERE id = $1",
            &[&uuid::Uuid::parse_str(&created.id).unwrap()],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
        "{hash}"
    );
    let events = app.events_of(&created.id).await;
    assert!(!events[0].1.to_string().contains("correct horse"));
    assert!(!events[0].1.to_string().contains("argon2"));
}

#[tokio::test]
async fn create_with_imported_hash_keeps_it_and_rejects_unknown_formats() {
    let app = TestApp::spawn().await;
    let mut users = app.users();
    let bcrypt = "$2b$10$N9qo8uLOickgx2ZMRZoMyeIjZAgcfl7p92ldGxad68LJZdL17lhWy";
    let created = users
        .create_user(pb::CreateUserRequest {
            user: Some(user_with_email("h@x.io")),
            initial_password: Some(pb::create_user_request::InitialPassword::PasswordHash(
                bcrypt.into(),
            )),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert!(created.has_password);
    let err = users
        .create_user(pb::CreateUserRequest {
            user: Some(user_with_email("m@x.io")),
            initial_password: Some(pb::create_user_request::InitialPassword::PasswordHash(
                "5f4dcc3b5aa765d61d8327deb882cf99".into(),
            )),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&err), vec!["password_hash"]);
    assert!(
        !err.message().contains("5f4dcc3b"),
        "the hash is not echoed"
    );
}

#[tokio::test]
async fn create_reports_every_bad_field_at_once() {
    let app = TestApp::spawn().await;
    let err = app
        .users()
        .create_user(pb::CreateUserRequest {
            user: Some(pb::User {
                email: "not-an-email".into(),
                phone_number: "555-1234".into(),
                username: "has space".into(),
                display_name: "x".repeat(257),
                picture_url: "ftp://x".into(),
                locale: "en GB".into(),
                app_metadata: Some(pb_struct(json!({"blob": "x".repeat(17 * 1024)}))),
                ..Default::default()
            }),
            user_id: "not-a-uuid".into(),
            initial_password: Some(pb::create_user_request::InitialPassword::Password(
                "short".into(),
            )),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(reason(&err), "INVALID_ARGUMENT");
    assert_eq!(
        violated_fields(&err),
        vec![
            "password",
            "user.app_metadata",
            "user.display_name",
            "user.email",
            "user.locale",
            "user.phone_number",
            "user.picture_url",
            "user.username",
            "user_id",
        ]
    );
    // Nothing was written.
    let client = app.pool.get().await.unwrap();
    let n: i64 = client
        .query_one("SELECT count(*) FROM users", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
}

#[tokio::test]
async fn create_needs_an_identifier_and_a_user() {
    let app = TestApp::spawn().await;
    let mut users = app.users();
    let err = users
        .create_user(pb::CreateUserRequest {
            user: Some(pb::User {
                display_name: "Nobody".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), vec!["user"]);
    let err = users
        .create_user(pb::CreateUserRequest::default())
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), vec!["user"]);
}

#[tokio::test]
async fn client_chosen_id_and_pending_status() {
    let app = TestApp::spawn().await;
    let id = uuid::Uuid::new_v4().to_string();
    let created = app
        .users()
        .create_user(pb::CreateUserRequest {
            user: Some(user_with_email("pending@x.io")),
            user_id: id.clone(),
            pending: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(created.id, id);
    assert_eq!(created.status, pb::UserStatus::PendingVerification as i32);
    let err = app
        .users()
        .create_user(pb::CreateUserRequest {
            user: Some(user_with_email("other@x.io")),
            user_id: id,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    assert_eq!(
        details(&err)
            .error_info()
            .unwrap()
            .metadata
            .get("field")
            .map(String::as_str),
        Some("id")
    );
}

#[tokio::test]
async fn unique_fields_clash_case_insensitively_with_resource_info() {
    let app = TestApp::spawn().await;
    let mut users = app.users();
    let first = users
        .create_user(pb::CreateUserRequest {
            user: Some(pb::User {
                email: "dup@x.io".into(),
                username: "Dup".into(),
                phone_number: "+33612345678".into(),
                external_id: "e1".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    for (user, field) in [
        (
            pb::User {
                email: "DUP@X.IO".into(),
                ..Default::default()
            },
            "email",
        ),
        (
            pb::User {
                username: "dUP".into(),
                ..Default::default()
            },
            "username",
        ),
        (
            pb::User {
                phone_number: "+33612345678".into(),
                ..Default::default()
            },
            "phone_number",
        ),
        (
            pb::User {
                external_id: "e1".into(),
                ..Default::default()
            },
            "external_id",
        ),
    ] {
        let err = users
            .create_user(pb::CreateUserRequest {
                user: Some(user),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::AlreadyExists, "{field}");
        let d = details(&err);
        assert_eq!(d.error_info().unwrap().reason, "ALREADY_EXISTS");
        assert_eq!(
            d.error_info()
                .unwrap()
                .metadata
                .get("field")
                .map(String::as_str),
            Some(field)
        );
        let holder = d.resource_info().unwrap();
        assert_eq!(holder.resource_type, "user");
        assert_eq!(holder.resource_name, first.id, "{field}: whose it is");
    }
    // An update taking another user's value names its holder too.
    let second = create_user(&mut users, "second@x.io").await;
    let err = users
        .update_user(pb::UpdateUserRequest {
            user: Some(pb::User {
                id: second.id.clone(),
                username: "DUP".into(),
                ..Default::default()
            }),
            update_mask: mask(&["username"]),
            etag: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    assert_eq!(
        details(&err).resource_info().unwrap().resource_name,
        first.id
    );
}

#[tokio::test]
async fn concurrent_creates_with_one_email_exactly_one_wins() {
    let app = TestApp::spawn().await;
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let mut users = app.users();
        tasks.push(tokio::spawn(async move {
            users
                .create_user(pb::CreateUserRequest {
                    user: Some(user_with_email("race@x.io")),
                    ..Default::default()
                })
                .await
        }));
    }
    let (mut won, mut holders) = (Vec::new(), std::collections::HashSet::new());
    for t in tasks {
        match t.await.unwrap() {
            Ok(r) => won.push(r.into_inner().user.unwrap().id),
            Err(e) => {
                assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
                holders.insert(details(&e).resource_info().unwrap().resource_name.clone());
            }
        }
    }
    assert_eq!(won.len(), 1);
    assert_eq!(
        holders,
        [won[0].clone()].into(),
        "every loser names the winner"
    );
}

#[tokio::test]
async fn lookup_by_each_unique_key() {
    let app = TestApp::spawn().await;
    let mut users = app.users();
    let u = users
        .create_user(pb::CreateUserRequest {
            user: Some(pb::User {
                email: "Look@X.io".into(),
                username: "Looker".into(),
                phone_number: "+4915112345678".into(),
                external_id: "crm-7".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    use pb::lookup_user_request::Key;
    for key in [
        Key::Email(" look@x.IO ".into()),
        Key::Username("LOOKER".into()),
        Key::PhoneNumber("+4915112345678".into()),
        Key::ExternalId("crm-7".into()),
    ] {
        let got = users
            .lookup_user(pb::LookupUserRequest {
                key: Some(key.clone()),
            })
            .await
            .unwrap()
            .into_inner()
            .user
            .unwrap();
        assert_eq!(got.id, u.id, "{key:?}");
    }
    let err = users
        .lookup_user(pb::LookupUserRequest {
            key: Some(Key::ExternalId("crm-8".into())),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(details(&err).resource_info().unwrap().resource_type, "user");
    let err = users
        .lookup_user(pb::LookupUserRequest { key: None })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // A phone or email no user could have is the caller's mistake, not an unknown user.
    for (key, field) in [
        (Key::PhoneNumber("+49 151 12345678".into()), "phone_number"),
        (Key::PhoneNumber("015112345678".into()), "phone_number"),
        (Key::Email("+4915112345678".into()), "email"),
    ] {
        let err = users
            .lookup_user(pb::LookupUserRequest {
                key: Some(key.clone()),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{key:?}");
        assert_eq!(crate::harness::violated_fields(&err), [field], "{key:?}");
    }
}

#[tokio::test]
async fn get_with_bad_or_unknown_id() {
    let app = TestApp::spawn().await;
    let mut users = app.users();
    let err = users
        .get_user(pb::GetUserRequest { id: "nope".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&err), vec!["id"]);
    get_not_found(&mut users, &uuid::Uuid::now_v7().to_string()).await;
}

/// GetUser of `id` answers NOT_FOUND naming `id`.
async fn get_not_found(users: &mut crate::harness::Users, id: &str) {
    let err = users
        .get_user(pb::GetUserRequest { id: id.to_string() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(details(&err).resource_info().unwrap().resource_name, id);
}

/// One shared read connection, so that concurrent reads queue (two statements in flight),
/// and metrics on, to see how many were read together.
fn one_read_connection() -> roster::config::ServerConfig {
    roster::config::ServerConfig {
        metrics_listen: "127.0.0.1:0".into(),
        db_read_connections: 1,
        ..Default::default()
    }
}

/// Waits for `tasks` (each asserting its own answers), then checks from the metrics that
/// the server answered exactly `calls` coalescable reads and read some of them together.
async fn read_together(app: &TestApp, tasks: Vec<tokio::task::JoinHandle<()>>, calls: usize) {
    for t in tasks {
        t.await.unwrap();
    }
    let metrics = app.metrics().await;
    assert_eq!(metrics["roster_user_read_batch_size_sum"], calls as f64);
    let reads = metrics["roster_user_read_batch_size_count"];
    assert!(
        reads < calls as f64,
        "{reads} reads for {calls} calls: none read together"
    );
}

/// GetUser calls in flight together are read in one statement (`users::reads`); each still
/// gets exactly its own user, sees the writes acknowledged before it was sent, and gets
/// NOT_FOUND for an unknown id or one of another project read in the same batch.
#[tokio::test]
async fn concurrent_gets_are_read_together_and_each_gets_its_own_answer() {
    let app = TestApp::spawn_with(one_read_connection()).await;
    let mut admin = app.users();
    let mut ours = Vec::new();
    for i in 0..24 {
        ours.push(create_user(&mut admin, &format!("reader{i}@x.io")).await.id);
    }
    let (_, other_token) = app.other_project().await;
    let mut theirs_client = app.users_with(Some(&other_token));
    let mut theirs = Vec::new();
    for i in 0..2 {
        theirs.push(
            create_user(&mut theirs_client, &format!("theirs{i}@x.io"))
                .await
                .id,
        );
    }
    const ROUNDS: usize = 10;
    let mut tasks = Vec::new();
    // 24 writers of this project, each updating its own user then reading it back, and
    // asking for the other project's users and an unknown id in between.
    for (i, id) in ours.iter().enumerate() {
        let mut users = app.users();
        let (id, stranger) = (id.clone(), theirs[i % 2].clone());
        tasks.push(tokio::spawn(async move {
            for round in 0..ROUNDS {
                let name = format!("reader {i} round {round}");
                users
                    .update_user(pb::UpdateUserRequest {
                        user: Some(pb::User {
                            id: id.clone(),
                            display_name: name.clone(),
                            ..Default::default()
                        }),
                        update_mask: mask(&["display_name"]),
                        etag: String::new(),
                    })
                    .await
                    .unwrap();
                let got = get(&mut users, &id).await;
                assert_eq!(
                    (got.id.as_str(), got.email.as_str()),
                    (id.as_str(), format!("reader{i}@x.io").as_str())
                );
                assert_eq!(
                    got.display_name, name,
                    "a read must see the write before it"
                );
                for missing in [stranger.clone(), uuid::Uuid::now_v7().to_string()] {
                    get_not_found(&mut users, &missing).await;
                }
            }
        }));
    }
    // 8 readers of the other project, all after the same two users (duplicates in a batch).
    for i in 0..8 {
        let mut users = app.users_with(Some(&other_token));
        let id = theirs[i % 2].clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..ROUNDS * 3 {
                let got = get(&mut users, &id).await;
                assert_eq!(got.id, id);
                assert_eq!(got.email, format!("theirs{}@x.io", i % 2));
            }
        }));
    }
    read_together(&app, tasks, 24 * ROUNDS * 3 + 8 * ROUNDS * 3).await;
}

/// LookupUser and LookupUserByIdentity calls in flight together are read together with each
/// other and with GetUser calls, one statement per kind of key: each call still gets exactly
/// its own user (and identity) whatever the key's case, NOT_FOUND for an unknown key or one
/// that only another project holds, and the other project's callers get their own user for
/// the same email and the same identity.
#[tokio::test]
async fn concurrent_lookups_are_read_together_and_each_gets_its_own_answer() {
    use pb::lookup_user_request::Key;
    let app = TestApp::spawn_with(one_read_connection()).await;
    let new_user = |i: usize| pb::User {
        email: format!("Looker{i}@x.io"),
        username: format!("looker{i}"),
        phone_number: format!("+4915112{i:06}"),
        external_id: format!("crm-{i}"),
        ..Default::default()
    };
    let mut admin = app.users();
    let mut identities = app.identities();
    let link = |user_id: &str, subject: &str| pb::LinkIdentityRequest {
        user_id: user_id.into(),
        provider: "github".into(),
        subject: subject.into(),
        ..Default::default()
    };
    let mut ours = Vec::new();
    for i in 0..16 {
        let id = create(&mut admin, new_user(i)).await.id;
        let linked = link(&id, &format!("gh-{i}"));
        identities.link_identity(linked).await.unwrap();
        ours.push(id);
    }
    // The other project holds the same keys and identity as our user 0 for its own user,
    // and one more of each.
    let (_, other_token) = app.other_project().await;
    let mut theirs = app.users_with(Some(&other_token));
    let mut their_identities = app.identities_with(Some(&other_token));
    let their_twin = create(&mut theirs, new_user(0)).await.id;
    let only_theirs = create_user(&mut theirs, "only-theirs@x.io").await.id;
    for (user, subject) in [(&their_twin, "gh-0"), (&only_theirs, "gh-theirs")] {
        let linked = link(user, subject);
        their_identities.link_identity(linked).await.unwrap();
    }

    async fn lookup(users: &mut crate::harness::Users, key: Key) -> Result<String, tonic::Status> {
        let request = pb::LookupUserRequest { key: Some(key) };
        Ok(users
            .lookup_user(request)
            .await?
            .into_inner()
            .user
            .unwrap()
            .id)
    }
    /// The user and the identity's subject LookupUserByIdentity answers.
    async fn by_identity(
        identities: &mut crate::harness::Identities,
        subject: &str,
    ) -> Result<(String, String), tonic::Status> {
        let request = pb::LookupUserByIdentityRequest {
            provider: "github".into(),
            subject: subject.into(),
        };
        let r = identities
            .lookup_user_by_identity(request)
            .await?
            .into_inner();
        Ok((r.user.unwrap().id, r.identity.unwrap().subject))
    }
    const ROUNDS: usize = 10;
    let mut tasks = Vec::new();
    for (i, id) in ours.iter().enumerate() {
        let (mut users, id) = (app.users(), id.clone());
        let mut identities = app.identities();
        tasks.push(tokio::spawn(async move {
            for _ in 0..ROUNDS {
                for key in [
                    Key::Email(format!("LOOKER{i}@X.IO")),
                    Key::Username(format!("Looker{i}")),
                    Key::PhoneNumber(format!("+4915112{i:06}")),
                    Key::ExternalId(format!("crm-{i}")),
                ] {
                    assert_eq!(
                        lookup(&mut users, key.clone()).await.unwrap(),
                        id,
                        "{key:?}"
                    );
                }
                let got = get(&mut users, &id).await;
                assert_eq!(got.id, id);
                for missing in [
                    Key::Email("only-theirs@x.io".into()),
                    Key::ExternalId(format!("crm-{}", 100 + i)),
                ] {
                    let err = lookup(&mut users, missing.clone()).await.unwrap_err();
                    assert_eq!(err.code(), Code::NotFound, "{missing:?}");
                }
                let subject = format!("gh-{i}");
                let found = by_identity(&mut identities, &subject).await.unwrap();
                assert_eq!(found, (id.clone(), subject));
                let err = by_identity(&mut identities, "gh-theirs").await.unwrap_err();
                assert_eq!(err.code(), Code::NotFound);
            }
        }));
    }
    for _ in 0..4 {
        let (mut users, twin) = (app.users_with(Some(&other_token)), their_twin.clone());
        let mut identities = app.identities_with(Some(&other_token));
        tasks.push(tokio::spawn(async move {
            for _ in 0..ROUNDS * 4 {
                let key = Key::Email("looker0@x.io".into());
                assert_eq!(lookup(&mut users, key).await.unwrap(), twin);
                let found = by_identity(&mut identities, "gh-0").await.unwrap();
                assert_eq!(found, (twin.clone(), "gh-0".to_string()));
            }
        }));
    }
    read_together(&app, tasks, 16 * ROUNDS * 9 + 4 * ROUNDS * 4 * 2).await;
}

/// Calls abandoned mid-read (deadlines of a fraction of a millisecond) among coalesced reads:
/// the calls they were reading for, or that their slots were handed to, are still answered,
/// and no read slot is lost (afterwards reads still go through).
#[tokio::test]
async fn abandoned_gets_strand_no_other_call() {
    let app = TestApp::spawn_with(roster::config::ServerConfig {
        db_read_connections: 1,
        ..Default::default()
    })
    .await;
    let mut admin = app.users();
    let user = create_user(&mut admin, "patient@x.io").await;
    let mut tasks = Vec::new();
    for i in 0..24u64 {
        let mut users = app.users();
        let id = user.id.clone();
        tasks.push(tokio::spawn(async move {
            // Every other task gives up after 50..800 µs; the rest wait for their answer.
            let impatient = i % 2 == 0;
            let mut answered = 0;
            for round in 0..40u64 {
                let mut request = tonic::Request::new(pb::GetUserRequest { id: id.clone() });
                if impatient {
                    request.set_timeout(std::time::Duration::from_micros(
                        50 + (i * 37 + round * 101) % 750,
                    ));
                }
                match users.get_user(request).await {
                    Ok(r) => {
                        assert_eq!(r.into_inner().user.unwrap().id, id);
                        answered += 1;
                    }
                    Err(e) => {
                        assert!(impatient, "a patient call failed: {e:?}");
                        assert!(
                            matches!(e.code(), Code::DeadlineExceeded | Code::Cancelled),
                            "{e:?}"
                        );
                    }
                }
            }
            (impatient, answered)
        }));
    }
    let mut impatient_answered = 0;
    for t in tasks {
        let (impatient, answered) = t.await.unwrap();
        if impatient {
            impatient_answered += answered;
        } else {
            assert_eq!(answered, 40);
        }
    }
    assert!(
        impatient_answered < 12 * 40,
        "no call was abandoned: the test tested nothing"
    );
    // Both slots are free again: a burst of reads is answered promptly.
    let reads = (0..8).map(|_| {
        let mut users = app.users();
        let id = user.id.clone();
        async move { users.get_user(pb::GetUserRequest { id }).await }
    });
    let answers = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        futures_util::future::join_all(reads),
    )
    .await
    .expect("reads still go through");
    assert!(answers.iter().all(|a| a.is_ok()));
}

#[tokio::test]
async fn update_with_mask_changes_only_masked_fields() {
    let app = TestApp::spawn().await;
    let mut users = app.users();
    let u = users
        .create_user(pb::CreateUserRequest {
            user: Some(pb::User {
                email: "u@x.io".into(),
                email_verified: true,
                display_name: "Old".into(),
                given_name: "Keep".into(),
                app_metadata: Some(pb_struct(json!({"plan": "free", "region": "eu"}))),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    let updated = users
        .update_user(pb::UpdateUserRequest {
            user: Some(pb::User {
                id: u.id.clone(),
                display_name: "New".into(),
                given_name: "Ignored".into(),
                email: "new@x.io".into(),
                app_metadata: Some(pb_struct(json!({"plan": "pro"}))),
                ..Default::default()
            }),
            update_mask: mask(&[
                "display_name",
                "email",
                "app_metadata.plan",
                "app_metadata.region",
            ]),
            etag: u.etag.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(updated.display_name, "New");
    assert_eq!(updated.given_name, "Keep");
    assert_eq!(updated.email, "new@x.io");
    assert!(!updated.email_verified, "a new email is unverified");
    assert_eq!(
        updated.app_metadata,
        Some(pb_struct(json!({"plan": "pro"}))),
        "region was removed"
    );
    assert_ne!(updated.etag, u.etag);

    // The old etag is now stale: ABORTED and nothing changes.
    let err = users
        .update_user(pb::UpdateUserRequest {
            user: Some(pb::User {
                id: u.id.clone(),
                display_name: "Stale".into(),
                ..Default::default()
            }),
            update_mask: mask(&["display_name"]),
            etag: u.etag.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted);
    assert_eq!(reason(&err), "ETAG_MISMATCH");
    let got = get(&mut users, &u.id).await;
    assert_eq!(got.display_name, "New");

    // A no-op update writes nothing and keeps the etag.
    let same = users
        .update_user(pb::UpdateUserRequest {
            user: Some(pb::User {
                id: u.id.clone(),
                display_name: "New".into(),
                ..Default::default()
            }),
            update_mask: mask(&["display_name"]),
            etag: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(same.etag, updated.etag);

    let events = app.events_of(&u.id).await;
    let types: Vec<&str> = events.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(types, vec!["USER_CREATED", "USER_UPDATED"]);
    let data = &events[1].1;
    assert_eq!(
        data["changes"]["display_name"],
        json!({"old": "Old", "new": "New"})
    );
    assert!(data["changes"]["app_metadata"].is_object());
    assert!(data["changes"].get("given_name").is_none());
}

/// AIP-161: a metadata key holding dots, dashes or slashes is named in backticks, in an update
/// mask and in a filter alike.
#[tokio::test]
async fn metadata_keys_that_are_not_identifiers_are_named_in_backticks() {
    let app = TestApp::spawn().await;
    let mut users = app.users();
    let meta = json!({"example.com/roles": ["admin"], "plan-id": "p1", "a": {"b.c": 1, "d": 0}});
    let u = create(
        &mut users,
        pb::User {
            email: "quoted@x.io".into(),
            app_metadata: Some(pb_struct(meta)),
            ..Default::default()
        },
    )
    .await;
    create_user(&mut users, "other@x.io").await;
    let updated = users
        .update_user(pb::UpdateUserRequest {
            user: Some(pb::User {
                id: u.id.clone(),
                app_metadata: Some(pb_struct(json!({"plan-id": "p2", "a": {"b.c": 2}}))),
                ..Default::default()
            }),
            update_mask: mask(&[
                "app_metadata.`plan-id`",
                "app_metadata.`example.com/roles`",
                "app_metadata.a.`b.c`",
            ]),
            etag: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(
        updated.app_metadata,
        Some(pb_struct(json!({"plan-id": "p2", "a": {"b.c": 2, "d": 0}}))),
        "set, removed and nested keys"
    );

    let emails = |filter: &str| {
        let mut users = app.users();
        let filter = filter.to_string();
        async move {
            users
                .list_users(pb::ListUsersRequest {
                    filter,
                    ..Default::default()
                })
                .await
                .map(|r| {
                    let users = r.into_inner().users;
                    users.into_iter().map(|u| u.email).collect::<Vec<_>>()
                })
        }
    };
    assert_eq!(
        emails(r#"app_metadata.`plan-id` = "p2""#).await.unwrap(),
        ["quoted@x.io"]
    );
    assert_eq!(
        emails("app_metadata.a.`b.c` >= 2").await.unwrap(),
        ["quoted@x.io"]
    );
    assert!(
        emails(r#"app_metadata.`plan-id` = "p1""#)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        emails("app_metadata.`example.com/roles`:*")
            .await
            .unwrap()
            .is_empty()
    );

    let err = users
        .update_user(pb::UpdateUserRequest {
            user: Some(pb::User {
                id: u.id.clone(),
                ..Default::default()
            }),
            update_mask: mask(&["app_metadata.`plan-id", "user_metadata.a`b`"]),
            etag: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        violated_fields(&err),
        ["update_mask.paths[0]", "update_mask.paths[1]"]
    );
    let err = emails("app_metadata.`plan-id = 1").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&err), ["filter"]);
    assert!(err.message().contains("not closed"), "{}", err.message());
    assert_eq!(
        get(&mut users, &u.id).await.etag,
        updated.etag,
        "nothing written"
    );
}

#[tokio::test]
async fn update_mask_errors() {
    let app = TestApp::spawn().await;
    let mut users = app.users();
    let u = create_user(&mut users, "m@x.io").await;
    let call = |paths: &[&str]| pb::UpdateUserRequest {
        user: Some(pb::User {
            id: u.id.clone(),
            ..Default::default()
        }),
        update_mask: mask(paths),
        etag: String::new(),
    };
    let err = users.update_user(call(&[])).await.unwrap_err();
    assert_eq!(violated_fields(&err), vec!["update_mask"]);
    let err = users
        .update_user(call(&["status", "nickname", "etag"]))
        .await
        .unwrap_err();
    assert_eq!(
        violated_fields(&err),
        vec![
            "update_mask.paths[0]",
            "update_mask.paths[1]",
            "update_mask.paths[2]"
        ]
    );
    // Clearing the only identifier is refused.
    let err = users.update_user(call(&["email"])).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&err), vec!["user"]);
    // Taking someone else's email clashes.
    create_user(&mut users, "taken@x.io").await;
    let err = users
        .update_user(pb::UpdateUserRequest {
            user: Some(pb::User {
                id: u.id.clone(),
                email: "TAKEN@x.io".into(),
                ..Default::default()
            }),
            update_mask: mask(&["email"]),
            etag: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    // Nothing of a refused update is written: neither the user nor an event.
    assert_eq!(get(&mut users, &u.id).await.email, "m@x.io");
    let events = app.events_of(&u.id).await;
    let types: Vec<&str> = events.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(types, vec!["USER_CREATED"]);
    // Unknown user.
    let err = users
        .update_user(pb::UpdateUserRequest {
            user: Some(pb::User {
                id: uuid::Uuid::now_v7().to_string(),
                ..Default::default()
            }),
            update_mask: mask(&["display_name"]),
            etag: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn concurrent_updates_with_one_etag_exactly_one_wins() {
    let app = TestApp::spawn().await;
    let mut users = app.users();
    let u = create_user(&mut users, "etag@x.io").await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let mut users = app.users();
        let (id, etag) = (u.id.clone(), u.etag.clone());
        tasks.push(tokio::spawn(async move {
            users
                .update_user(pb::UpdateUserRequest {
                    user: Some(pb::User {
                        id,
                        display_name: format!("writer {i}"),
                        ..Default::default()
                    }),
                    update_mask: crate::mask(&["display_name"]),
                    etag,
                })
                .await
        }));
    }
    let mut winners = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(r) => winners.push(r.into_inner().user.unwrap().display_name),
            Err(e) => assert_eq!(e.code(), Code::Aborted),
        }
    }
    assert_eq!(winners.len(), 1);
    let got = get(&mut users, &u.id).await;
    assert_eq!(got.display_name, winners[0]);
}

#[tokio::test]
async fn delete_removes_the_user_and_its_events_and_leaves_a_tombstone() {
    let app = TestApp::spawn().await;
    let mut users = app.users();
    let u = create_user(&mut users, "gone@x.io").await;
    users
        .update_user(pb::UpdateUserRequest {
            user: Some(pb::User {
                id: u.id.clone(),
                display_name: "Soon gone".into(),
                ..Default::default()
            }),
            update_mask: mask(&["display_name"]),
            etag: String::new(),
        })
        .await
        .unwrap();
    let err = users
        .delete_user(pb::DeleteUserRequest {
            id: u.id.clone(),
            etag: u.etag.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "stale etag");
    users
        .delete_user(pb::DeleteUserRequest {
            id: u.id.clone(),
            etag: String::new(),
        })
        .await
        .unwrap();
    let err = users
        .get_user(pb::GetUserRequest { id: u.id.clone() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let events = app.events_of(&u.id).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].0, "USER_DELETED");
    assert_eq!(events[0].1, json!({"id": u.id}));
    let err = users
        .delete_user(pb::DeleteUserRequest {
            id: u.id.clone(),
            etag: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // The email is free again.
    create_user(&mut users, "gone@x.io").await;
}

#[tokio::test]
async fn batch_delete_reports_deleted_and_missing() {
    let app = TestApp::spawn().await;
    let mut users = app.users();
    let a = create_user(&mut users, "a@x.io").await;
    let b = create_user(&mut users, "b@x.io").await;
    let missing = uuid::Uuid::now_v7().to_string();
    let r = users
        .batch_delete_users(pb::BatchDeleteUsersRequest {
            ids: vec![a.id.clone(), missing.clone(), b.id.clone(), a.id.clone()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.deleted_ids, vec![a.id.clone(), b.id.clone()]);
    assert_eq!(r.not_found_ids, vec![missing]);
    assert_eq!(
        app.events_of(&b.id)
            .await
            .iter()
            .map(|e| e.0.clone())
            .collect::<Vec<_>>(),
        vec!["USER_DELETED"]
    );

    let err = users
        .batch_delete_users(pb::BatchDeleteUsersRequest {
            ids: vec![a.id.clone(), "x".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), vec!["ids[1]"]);
    let too_many = (0..1001)
        .map(|_| uuid::Uuid::now_v7().to_string())
        .collect();
    let err = users
        .batch_delete_users(pb::BatchDeleteUsersRequest { ids: too_many })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), vec!["ids"]);
    let err = users
        .batch_delete_users(pb::BatchDeleteUsersRequest { ids: vec![] })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), vec!["ids"]);
}

#[tokio::test]
async fn batch_get_answers_in_request_order_and_lists_the_missing() {
    let app = TestApp::spawn().await;
    let mut users = app.users();
    let a = create_user(&mut users, "a@x.io").await;
    let b = create_user(&mut users, "b@x.io").await;
    let c = create_user(&mut users, "c@x.io").await;
    let missing = uuid::Uuid::now_v7().to_string();
    // Another project's user is as missing as an id of nobody.
    let (_, other_token) = app.other_project().await;
    let theirs = create_user(&mut app.users_with(Some(&other_token)), "a@x.io").await;
    let r = users
        .batch_get_users(pb::BatchGetUsersRequest {
            ids: vec![
                c.id.clone(),
                missing.clone(),
                a.id.clone(),
                theirs.id.clone(),
                c.id.clone(),
                b.id.clone(),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    let got: Vec<(&str, &str)> = r
        .users
        .iter()
        .map(|u| (u.id.as_str(), u.email.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (c.id.as_str(), "c@x.io"),
            (a.id.as_str(), "a@x.io"),
            (b.id.as_str(), "b@x.io")
        ]
    );
    assert_eq!(
        r.users[0], c,
        "the whole user, etag included, as GetUser gives it"
    );
    assert_eq!(r.not_found_ids, vec![missing.clone(), theirs.id.clone()]);

    // Only missing ids: an empty list of users, not an error.
    let r = users
        .batch_get_users(pb::BatchGetUsersRequest {
            ids: vec![missing.clone()],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.users.is_empty());
    assert_eq!(r.not_found_ids, vec![missing]);

    // The limits and bad ids, each named.
    let err = users
        .batch_get_users(pb::BatchGetUsersRequest {
            ids: vec![a.id.clone(), "x".into(), "".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&err), vec!["ids[1]", "ids[2]"]);
    let err = users
        .batch_get_users(pb::BatchGetUsersRequest { ids: vec![] })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), vec!["ids"]);
    let mut many: Vec<String> = (0..999).map(|_| uuid::Uuid::now_v7().to_string()).collect();
    many.push(b.id.clone());
    let r = users
        .batch_get_users(pb::BatchGetUsersRequest { ids: many.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.users.len(), 1);
    assert_eq!(r.not_found_ids.len(), 999);
    many.push(a.id.clone());
    let err = users
        .batch_get_users(pb::BatchGetUsersRequest { ids: many })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), vec!["ids"]);

    // users.read is enough; users.write alone is not.
    let reader = app.key(&["users.read"]).await;
    assert!(
        app.users_with(Some(&reader))
            .batch_get_users(pb::BatchGetUsersRequest {
                ids: vec![a.id.clone()],
            })
            .await
            .is_ok()
    );
    let writer = app.key(&["users.write"]).await;
    let err = app
        .users_with(Some(&writer))
        .batch_get_users(pb::BatchGetUsersRequest {
            ids: vec![a.id.clone()],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn lifecycle_transitions_and_their_events() {
    let app = TestApp::spawn().await;
    let mut users = app.users();
    let u = create_user(&mut users, "life@x.io").await;
    let blocked = users
        .block_user(pb::BlockUserRequest {
            id: u.id.clone(),
            reason: "chargeback".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(blocked.status, pb::UserStatus::Blocked as i32);
    assert_eq!(blocked.blocked_reason, "chargeback");
    let err = users
        .deactivate_user(pb::DeactivateUserRequest { id: u.id.clone() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = users
        .reactivate_user(pb::ReactivateUserRequest { id: u.id.clone() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let unblocked = users
        .unblock_user(pb::UnblockUserRequest { id: u.id.clone() })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(unblocked.status, pb::UserStatus::Active as i32);
    assert_eq!(unblocked.blocked_reason, "");
    let deact = users
        .deactivate_user(pb::DeactivateUserRequest { id: u.id.clone() })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(deact.status, pb::UserStatus::Deactivated as i32);
    // Idempotent: a retry changes nothing and writes no event.
    let again = users
        .deactivate_user(pb::DeactivateUserRequest { id: u.id.clone() })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(again.etag, deact.etag);
    let react = users
        .reactivate_user(pb::ReactivateUserRequest { id: u.id.clone() })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(react.status, pb::UserStatus::Active as i32);
    let types: Vec<String> = app
        .events_of(&u.id)
        .await
        .into_iter()
        .map(|e| e.0)
        .collect();
    assert_eq!(
        types,
        vec![
            "USER_CREATED",
            "USER_BLOCKED",
            "USER_UNBLOCKED",
            "USER_DEACTIVATED",
            "USER_REACTIVATED"
        ]
    );
    let events = app.events_of(&u.id).await;
    assert_eq!(events[1].1["reason"], "chargeback");

    // Unblock also clears a brute-force lock on an active user.
    let client = app.pool.get().await.unwrap();
    client
        .execute(
            "UPDATE users SET failed_logins = 10, locked_until = now() + interval '15 minutes' WHERE id = $1",
            &[&uuid::Uuid::parse_str(&u.id).unwrap()],
        )
        .await
        .unwrap();
    let locked = get(&mut users, &u.id).await;
    assert!(locked.locked_until.is_some());
    let cleared = users
        .unblock_user(pb::UnblockUserRequest { id: u.id.clone() })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert!(cleared.locked_until.is_none());
    assert_eq!(cleared.status, pb::UserStatus::Active as i32);
}

#[tokio::test]
async fn contact_verification_flow() {
    let app = TestApp::spawn().await;
    let mut users = app.users();
    let u = crate::create_pending(&mut users, "verify@x.io").await;
    let email = pb::ContactChannel::Email as i32;
    let start = users
        .start_contact_verification(pb::StartContactVerificationRequest {
            id: u.id.clone(),
            channel: email,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(start.code.len(), 6);
    assert!(start.code.bytes().all(|b| b.is_ascii_digit()));
    let ttl = start.expires_at.unwrap().seconds - chrono::Utc::now().timestamp();
    assert!((595..=600).contains(&ttl), "{ttl}");
    // Only a hash is stored.
    let client = app.pool.get().await.unwrap();
    let stored: Vec<u8> = client
        .query_one("SELECT code_hash FROM contact_verifications", &[])
        .await
        .unwrap()
        .get(0);
    assert_ne!(stored, start.code.as_bytes());

    let confirm = |code: &str| pb::ConfirmContactVerificationRequest {
        id: u.id.clone(),
        channel: email,
        code: code.into(),
    };
    let wrong = if start.code == "000000" {
        "111111"
    } else {
        "000000"
    };
    let r = users
        .confirm_contact_verification(confirm(wrong))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.result, pb::ContactVerificationResult::InvalidCode as i32);
    let r = users
        .confirm_contact_verification(confirm("12ab"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.result, pb::ContactVerificationResult::InvalidCode as i32);
    let r = users
        .confirm_contact_verification(confirm(&start.code))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.result, pb::ContactVerificationResult::Ok as i32);
    let user = r.user.unwrap();
    assert!(user.email_verified);
    assert_eq!(
        user.status,
        pb::UserStatus::Active as i32,
        "pending becomes active"
    );
    // The code is used up.
    let r = users
        .confirm_contact_verification(confirm(&start.code))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.result, pb::ContactVerificationResult::InvalidCode as i32);
    let types: Vec<String> = app
        .events_of(&u.id)
        .await
        .into_iter()
        .map(|e| e.0)
        .collect();
    assert_eq!(
        types,
        vec![
            "USER_CREATED",
            "CONTACT_VERIFICATION_STARTED",
            "CONTACT_VERIFICATION_FAILED",
            "CONTACT_VERIFICATION_FAILED",
            "CONTACT_VERIFIED",
            "CONTACT_VERIFICATION_FAILED"
        ]
    );

    // No phone: nothing to verify.
    let err = users
        .start_contact_verification(pb::StartContactVerificationRequest {
            id: u.id.clone(),
            channel: pb::ContactChannel::Phone as i32,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = users
        .start_contact_verification(pb::StartContactVerificationRequest {
            id: u.id.clone(),
            channel: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), vec!["channel"]);
}

#[tokio::test]
async fn contact_verification_limits_attempts_and_expires() {
    let app = TestApp::spawn().await;
    let mut users = app.users();
    let u = create_user(&mut users, "limits@x.io").await;
    let email = pb::ContactChannel::Email as i32;
    let start = |users: &mut crate::harness::Users| {
        let id = u.id.clone();
        let mut users = users.clone();
        async move {
            users
                .start_contact_verification(pb::StartContactVerificationRequest {
                    id,
                    channel: email,
                })
                .await
                .unwrap()
                .into_inner()
                .code
        }
    };
    let code = start(&mut users).await;
    let wrong = if code == "000000" { "111111" } else { "000000" };
    let confirm = |c: &str| pb::ConfirmContactVerificationRequest {
        id: u.id.clone(),
        channel: email,
        code: c.into(),
    };
    for _ in 0..5 {
        let r = users
            .confirm_contact_verification(confirm(wrong))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.result, pb::ContactVerificationResult::InvalidCode as i32);
    }
    let r = users
        .confirm_contact_verification(confirm(&code))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.result,
        pb::ContactVerificationResult::TooManyAttempts as i32,
        "5 wrong codes void it"
    );
    assert!(!r.user.unwrap().email_verified);

    // A new start voids the old code and resets attempts; an expired code answers EXPIRED.
    let old = start(&mut users).await;
    let fresh = start(&mut users).await;
    if old != fresh {
        let r = users
            .confirm_contact_verification(confirm(&old))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.result, pb::ContactVerificationResult::InvalidCode as i32);
    }
    let client = app.pool.get().await.unwrap();
    client
        .execute(
            "UPDATE contact_verifications SET expires_at = now() - interval '1 second'",
            &[],
        )
        .await
        .unwrap();
    let r = users
        .confirm_contact_verification(confirm(&fresh))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.result, pb::ContactVerificationResult::Expired as i32);
}

#[tokio::test]
async fn changing_the_email_voids_a_pending_code() {
    let app = TestApp::spawn().await;
    let mut users = app.users();
    let u = create_user(&mut users, "before@x.io").await;
    let email = pb::ContactChannel::Email as i32;
    let code = users
        .start_contact_verification(pb::StartContactVerificationRequest {
            id: u.id.clone(),
            channel: email,
        })
        .await
        .unwrap()
        .into_inner()
        .code;
    users
        .update_user(pb::UpdateUserRequest {
            user: Some(pb::User {
                id: u.id.clone(),
                email: "after@x.io".into(),
                ..Default::default()
            }),
            update_mask: mask(&["email"]),
            etag: String::new(),
        })
        .await
        .unwrap();
    let r = users
        .confirm_contact_verification(pb::ConfirmContactVerificationRequest {
            id: u.id.clone(),
            channel: email,
            code,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.result, pb::ContactVerificationResult::InvalidCode as i32);
    assert!(!r.user.unwrap().email_verified);
}

#[tokio::test]
async fn fifty_read_modify_write_clients_with_etags_lose_no_update() {
    // Each client adds itself to a list in app_metadata, retrying on ABORTED (stale etag):
    // afterwards every one of the 50 is in the list.
    let app = TestApp::spawn().await;
    let mut admin = app.users();
    let user = create_user(&mut admin, "counter@x.io").await;
    let mut tasks = Vec::new();
    for i in 0..50 {
        let mut users = app.users();
        let id = user.id.clone();
        tasks.push(tokio::spawn(async move {
            let mut attempts = 0;
            loop {
                attempts += 1;
                let current = get(&mut users, &id).await;
                let mut meta = current
                    .app_metadata
                    .as_ref()
                    .map(|s| roster::wire::struct_to_json(s).unwrap())
                    .unwrap_or_default();
                let list = meta
                    .entry("writers")
                    .or_insert_with(|| serde_json::json!([]));
                list.as_array_mut().unwrap().push(serde_json::json!(i));
                let r = users
                    .update_user(pb::UpdateUserRequest {
                        user: Some(pb::User {
                            id: id.clone(),
                            app_metadata: Some(roster::wire::json_to_struct(&meta)),
                            ..Default::default()
                        }),
                        update_mask: mask(&["app_metadata"]),
                        etag: current.etag.clone(),
                    })
                    .await;
                match r {
                    Ok(_) => return attempts,
                    Err(e) => assert_eq!(e.code(), Code::Aborted, "{e:?}"),
                }
            }
        }));
    }
    let mut retried = 0;
    for t in tasks {
        if t.await.unwrap() > 1 {
            retried += 1;
        }
    }
    let stored = get(&mut admin, &user.id).await;
    let meta = roster::wire::struct_to_json(stored.app_metadata.as_ref().unwrap()).unwrap();
    let mut writers: Vec<i64> = meta["writers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    writers.sort();
    assert_eq!(writers, (0..50).collect::<Vec<_>>(), "no update was lost");
    assert!(retried > 0, "the clients did contend");
}

#[tokio::test]
async fn concurrent_updates_without_etags_to_different_fields_lose_none() {
    // Six clients each own one field of the same user and write it 12 times, no etags, all
    // at once: every write lands on the newest version (an update that lost the race for
    // the row is applied again on top of the winner's), so each field ends at its writer's
    // last value, and the user's USER_UPDATED events, in position order, chain: each
    // change's old value is the previous change's new one.
    const ROUNDS: usize = 12;
    let app = TestApp::spawn().await;
    let mut admin = app.users();
    let user = create_user(&mut admin, "many-writers@x.io").await;
    let fields = [
        "display_name",
        "given_name",
        "family_name",
        "username",
        "external_id",
        "picture_url",
    ];
    let value = |field: &str, round: usize| match field {
        "picture_url" => format!("https://x.io/{round}.png"),
        _ => format!("{}-{round}", field.replace('_', "-")),
    };
    let mut tasks = Vec::new();
    for field in fields {
        let mut users = app.users();
        let id = user.id.clone();
        tasks.push(tokio::spawn(async move {
            for round in 0..ROUNDS {
                let mut u = pb::User {
                    id: id.clone(),
                    ..Default::default()
                };
                let v = value(field, round);
                match field {
                    "display_name" => u.display_name = v,
                    "given_name" => u.given_name = v,
                    "family_name" => u.family_name = v,
                    "username" => u.username = v,
                    "external_id" => u.external_id = v,
                    _ => u.picture_url = v,
                }
                users
                    .update_user(pb::UpdateUserRequest {
                        user: Some(u),
                        update_mask: mask(&[field]),
                        etag: String::new(),
                    })
                    .await
                    .expect("update without an etag");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let stored = get(&mut admin, &user.id).await;
    let last = ROUNDS - 1;
    assert_eq!(stored.display_name, value("display_name", last));
    assert_eq!(stored.given_name, value("given_name", last));
    assert_eq!(stored.family_name, value("family_name", last));
    assert_eq!(stored.username, value("username", last));
    assert_eq!(stored.external_id, value("external_id", last));
    assert_eq!(stored.picture_url, value("picture_url", last));

    let mut logs = app.logs();
    let mut events = Vec::new();
    let mut token = String::new();
    loop {
        let page = logs
            .list_events(pb::ListEventsRequest {
                filter: format!("user_id = \"{}\" AND type = USER_UPDATED", user.id),
                page_size: 1000,
                page_token: token,
                order_by: "occurred_at".into(),
            })
            .await
            .unwrap()
            .into_inner();
        events.extend(page.events);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(events.len(), fields.len() * ROUNDS, "one event per update");
    events.sort_by_key(|e| e.position);
    let mut now: std::collections::HashMap<String, serde_json::Value> = fields
        .iter()
        .map(|f| (f.to_string(), serde_json::Value::String(String::new())))
        .collect();
    for e in &events {
        let data = roster::wire::struct_to_json(e.data.as_ref().unwrap()).unwrap();
        let changes = data["changes"].as_object().unwrap();
        assert_eq!(
            changes.len(),
            1,
            "each update changes its own field only: {data:?}"
        );
        for (field, change) in changes {
            let before = now.get(field).cloned().unwrap_or_default();
            let old = match &change["old"] {
                serde_json::Value::Null => serde_json::Value::String(String::new()),
                v => v.clone(),
            };
            assert_eq!(
                old, before,
                "event {} changes {field} from a value it no longer had",
                e.position
            );
            now.insert(field.clone(), change["new"].clone());
        }
    }
}

/// The README's "Retrying calls": a write whose answer was lost (a deadline, a cut
/// connection) can be sent again and the answer says what happened. CreateUser with a
/// client-chosen id: ALREADY_EXISTS naming that id; UpdateUser with the etag read before:
/// ABORTED, the change there once; BlockUser: the same user again and one event; DeleteUser:
/// NOT_FOUND.
#[tokio::test]
async fn writes_sent_again_after_a_lost_answer_say_what_happened() {
    let app = TestApp::spawn().await;
    let mut users = app.users();
    let id = uuid::Uuid::now_v7().to_string();
    let create = pb::CreateUserRequest {
        user: Some(user_with_email("retry@x.io")),
        user_id: id.clone(),
        ..Default::default()
    };
    let first = users
        .create_user(create.clone())
        .await
        .unwrap()
        .into_inner();
    let again = users.create_user(create).await.unwrap_err();
    assert_eq!(again.code(), Code::AlreadyExists);
    let d = details(&again);
    assert_eq!(d.resource_info().unwrap().resource_name, id, "the id sent");
    assert_eq!(d.error_info().unwrap().metadata["field"], "id");

    let etag = first.user.unwrap().etag;
    let update = pb::UpdateUserRequest {
        user: Some(pb::User {
            id: id.clone(),
            display_name: "Retried".into(),
            ..Default::default()
        }),
        update_mask: mask(&["display_name"]),
        etag,
    };
    let updated = users
        .update_user(update.clone())
        .await
        .unwrap()
        .into_inner();
    let again = users.update_user(update).await.unwrap_err();
    assert_eq!(again.code(), Code::Aborted);
    let now = get(&mut users, &id).await;
    assert_eq!(now.display_name, "Retried");
    assert_eq!(now.etag, updated.user.unwrap().etag, "written once");

    let block = pb::BlockUserRequest {
        id: id.clone(),
        reason: "fraud".into(),
    };
    let blocked = users.block_user(block.clone()).await.unwrap().into_inner();
    let again = users.block_user(block).await.unwrap().into_inner();
    assert_eq!(again.user, blocked.user, "already blocked: the same user");
    let events = app
        .logs()
        .list_events(pb::ListEventsRequest {
            filter: format!("user_id = \"{id}\" AND type = USER_BLOCKED"),
            page_size: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(events.len(), 1);

    let delete = pb::DeleteUserRequest {
        id: id.clone(),
        etag: String::new(),
    };
    users.delete_user(delete.clone()).await.unwrap();
    let again = users.delete_user(delete).await.unwrap_err();
    assert_eq!(again.code(), Code::NotFound);
}

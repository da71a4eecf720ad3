//! Schema upgrades: a database made by an older release, then migrated, serves its old data.
use roster::config::ServerConfig;
use roster::pb::v1 as pb;
use uuid::Uuid;

use crate::get;
use crate::harness::{self, TestApp};

/// Migrations 6 and 7 moved a user's factor summary onto the user row: users enrolled before
/// them get their factors backfilled, and later authenticator changes keep the row current.
#[tokio::test]
async fn factor_summary_is_backfilled_and_then_kept_by_the_trigger() {
    use pb::AuthenticatorType as T;
    let db = harness::TestDatabase::create(None).await;
    let (mut client, conn) = tokio_postgres::connect(&db.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    assert_eq!(
        roster::db::migrate::migrate_to(&mut client, 5)
            .await
            .unwrap(),
        5
    );
    let project = roster::admin::create_project(&mut client, "old")
        .await
        .unwrap();
    // The key as that release wrote it (today's create_key names later columns).
    let key = roster::auth::NewKey::generate();
    client
        .execute(
            "INSERT INTO api_keys (id, project_id, name, scopes, secret_hash)
             VALUES ($1, $2, 'all', '{*}', $3)",
            &[&key.id, &project.id, &key.secret_hash],
        )
        .await
        .unwrap();
    let token = key.token.clone();
    let (with_factors, without, totp, sms) = (
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::now_v7(),
    );
    // As release 5 stored them: a confirmed default TOTP, a confirmed SMS channel and an
    // unconfirmed passkey enrolment on one user; nothing on the other.
    client
        .execute(
            "INSERT INTO users (project_id, id, email, status, created_at, updated_at)
             SELECT $1, u, u::text || '@old.example', 1, now(), now() FROM unnest($2::uuid[]) u",
            &[&project.id, &vec![with_factors, without]],
        )
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO authenticators (project_id, id, user_id, type, confirmed, is_default,
                phone_number)
             VALUES ($1, $2, $4, 2, true, true, NULL), ($1, $3, $4, 5, true, false, '+15550100'),
                    ($1, $5, $4, 3, false, false, NULL)",
            &[&project.id, &totp, &sms, &with_factors, &Uuid::now_v7()],
        )
        .await
        .unwrap();
    // 6 adds the columns and the trigger, 7 backfills; later ones are not about this.
    assert_eq!(
        roster::db::migrate::migrate_to(&mut client, 7)
            .await
            .unwrap(),
        2
    );
    roster::db::migrate::migrate(&mut client).await.unwrap();

    let app = TestApp::start_on(
        db,
        ServerConfig {
            key_cache_ms: 50,
            ..ServerConfig::default()
        },
    )
    .await;
    let users = app.users_with(Some(&token));
    let get = |id: Uuid| {
        let mut users = users.clone();
        async move { get(&mut users, &id.to_string()).await }
    };
    let u = get(with_factors).await;
    assert_eq!(u.enrolled_methods, [T::Totp as i32, T::SmsOtp as i32]);
    assert_eq!(u.default_method, T::Totp as i32);
    let etag = u.etag.clone();
    let plain = get(without).await;
    assert!(plain.enrolled_methods.is_empty());
    assert_eq!(plain.default_method, T::Unspecified as i32);

    // A page of users reads the same columns.
    let page = users
        .clone()
        .list_users(pb::ListUsersRequest::default())
        .await
        .unwrap()
        .into_inner();
    let listed = page.users.iter().find(|x| x.id == u.id).unwrap();
    assert_eq!(listed.enrolled_methods, u.enrolled_methods);
    assert_eq!(listed.default_method, u.default_method);

    // Deleting the default TOTP through the API: the summary follows (the SMS channel
    // becomes the default, as the service keeps one), and the etag does not move.
    let mut authn = app.authenticators_with(Some(&token));
    authn
        .delete_authenticator(pb::DeleteAuthenticatorRequest {
            user_id: with_factors.to_string(),
            authenticator_id: totp.to_string(),
        })
        .await
        .unwrap();
    let u = get(with_factors).await;
    assert_eq!(u.enrolled_methods, [T::SmsOtp as i32]);
    assert_eq!(u.default_method, T::SmsOtp as i32);
    assert_eq!(u.etag, etag);

    // A change made outside the API (an operator's SQL) is mirrored too.
    app.pool
        .get()
        .await
        .unwrap()
        .execute(
            "DELETE FROM authenticators WHERE project_id = $1 AND id = $2",
            &[&project.id, &sms],
        )
        .await
        .unwrap();
    let u = get(with_factors).await;
    assert!(u.enrolled_methods.is_empty());
    assert_eq!(u.default_method, T::Unspecified as i32);

    // Deleting the user takes its remaining (unconfirmed) authenticator with it: the trigger
    // finds the user row already gone and changes nothing.
    users
        .clone()
        .delete_user(pb::DeleteUserRequest {
            id: with_factors.to_string(),
            etag: String::new(),
        })
        .await
        .unwrap();
    let left: i64 = app
        .sql_one(
            "SELECT count(*) FROM authenticators WHERE project_id = $1 AND user_id = $2",
            &[&project.id, &with_factors],
        )
        .await;
    assert_eq!(left, 0);
}

/// The backfill (migration 7) and a factor change made meanwhile by a replica still on the
/// previous release: the change, committed while the backfill waits for the user's lock, is
/// what the user row shows afterwards (a one-snapshot backfill would overwrite it).
#[tokio::test]
async fn the_backfill_keeps_a_change_committed_while_it_waits() {
    let db = harness::TestDatabase::create(None).await;
    let url = db.url();
    let connect = || async {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
    };
    let mut client = connect().await;
    roster::db::migrate::migrate_to(&mut client, 5)
        .await
        .unwrap();
    let project = roster::admin::create_project(&mut client, "old")
        .await
        .unwrap();
    let user = Uuid::now_v7();
    client
        .execute(
            "INSERT INTO users (project_id, id, email, status, created_at, updated_at)
             VALUES ($1, $2, 'a@old.example', 1, now(), now())",
            &[&project.id, &user],
        )
        .await
        .unwrap();
    let add = "INSERT INTO authenticators (project_id, id, user_id, type, confirmed, is_default)
               VALUES ($1, $2, $3, $4, true, $5)";
    client
        .execute(add, &[&project.id, &Uuid::now_v7(), &user, &2i16, &true])
        .await
        .unwrap();
    roster::db::migrate::migrate_to(&mut client, 6)
        .await
        .unwrap();

    // The old release's enrolment: the user locked, an SMS channel added, not yet committed.
    let mut other = connect().await;
    let enrol = other.transaction().await.unwrap();
    enrol
        .execute(
            "SELECT 1 FROM users WHERE project_id = $1 AND id = $2 FOR UPDATE",
            &[&project.id, &user],
        )
        .await
        .unwrap();
    enrol
        .execute(add, &[&project.id, &Uuid::now_v7(), &user, &5i16, &false])
        .await
        .unwrap();
    let backfill = tokio::spawn(async move {
        roster::db::migrate::migrate(&mut client).await.unwrap();
        client
    });
    // The backfill reaches the user and waits for its lock.
    let watcher = connect().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let waiting: i64 = watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the backfill never waited"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    enrol.commit().await.unwrap();
    let client = backfill.await.unwrap();
    let row = client
        .query_one(
            "SELECT factor_types, default_factor FROM users WHERE project_id = $1 AND id = $2",
            &[&project.id, &user],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Vec<i16>>(0), [2, 5]);
    assert_eq!(row.get::<_, Option<i16>>(1), Some(2));
}

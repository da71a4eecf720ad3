//! ListUsers: filters, free-text query, order_by, keyset pagination.
use std::collections::HashSet;

use serde_json::json;
use tonic::Code;

use crate::harness::{TestApp, Users, violated_fields};
use crate::{pb, pb_struct};

async fn seed(users: &mut Users) {
    let rows = [
        (
            "ada@example.com",
            "ada",
            "Ada Lovelace",
            json!({"plan": "pro", "seats": 5}),
        ),
        (
            "grace@example.com",
            "grace",
            "Grace Hopper",
            json!({"plan": "free", "seats": 1}),
        ),
        (
            "alan@other.org",
            "alan",
            "Alan Turing",
            json!({"plan": "pro", "seats": 12}),
        ),
        ("linus@other.org", "linus", "", json!({})),
    ];
    for (email, username, name, meta) in rows {
        users
            .create_user(pb::CreateUserRequest {
                user: Some(pb::User {
                    email: email.into(),
                    username: username.into(),
                    display_name: name.into(),
                    app_metadata: Some(pb_struct(meta)),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap();
    }
}

/// The emails of the users `filter` matches, by email (ListUsers, one page).
pub async fn emails(users: &mut Users, filter: &str) -> Result<Vec<String>, tonic::Status> {
    let r = users
        .list_users(pb::ListUsersRequest {
            filter: filter.into(),
            order_by: "email".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(r.users.into_iter().map(|u| u.email).collect())
}

#[tokio::test]
async fn filter_grammar() {
    let app = TestApp::spawn().await;
    let mut users = app.users();
    seed(&mut users).await;
    let cases: &[(&str, &[&str])] = &[
        (
            r#"email:"*@example.com""#,
            &["ada@example.com", "grace@example.com"],
        ),
        (r#"email = "ADA@example.com""#, &["ada@example.com"]),
        (r#"username:"a*""#, &["ada@example.com", "alan@other.org"]),
        (
            r#"app_metadata.plan = "pro""#,
            &["ada@example.com", "alan@other.org"],
        ),
        (
            r#"app_metadata.seats > 4"#,
            &["ada@example.com", "alan@other.org"],
        ),
        (
            r#"app_metadata.plan:*"#,
            &["ada@example.com", "alan@other.org", "grace@example.com"],
        ),
        (
            r#"NOT app_metadata.plan = "pro""#,
            &["grace@example.com", "linus@other.org"],
        ),
        (r#"display_name = """#, &["linus@other.org"]),
        (
            r#"email:"*@other.org" AND app_metadata.plan = "pro" OR username = "linus""#,
            &["alan@other.org", "linus@other.org"],
        ),
        (
            r#"(username = "ada" OR username = "grace") status = ACTIVE"#,
            &["ada@example.com", "grace@example.com"],
        ),
        (r#"status = USER_STATUS_BLOCKED"#, &[]),
        (
            r#"has_password = false AND login_count = 0 AND email_verified != true"#,
            &[
                "ada@example.com",
                "alan@other.org",
                "grace@example.com",
                "linus@other.org",
            ],
        ),
        (
            r#"created_at > "2000-01-01T00:00:00Z" AND created_at < "2999-01-01T00:00:00+02:00""#,
            &[
                "ada@example.com",
                "alan@other.org",
                "grace@example.com",
                "linus@other.org",
            ],
        ),
        (r#"display_name:"*hopper""#, &["grace@example.com"]),
    ];
    for (filter, want) in cases {
        assert_eq!(emails(&mut users, filter).await.unwrap(), *want, "{filter}");
    }

    // The password fields: whose password is older than a date, whose must change.
    for (email, days, expired) in [
        ("ada@example.com", 100, false),
        ("grace@example.com", 10, true),
    ] {
        app.sql_one::<i64>(
            "WITH u AS (UPDATE users SET password_hash = 'x',
                        password_changed_at = now() - make_interval(days => $2),
                        require_password_change = $3
                        WHERE lower(email) = $1 RETURNING 1)
             SELECT count(*) FROM u",
            &[&email, &days, &expired],
        )
        .await;
    }
    let month_ago = (chrono::Utc::now() - chrono::TimeDelta::days(30)).to_rfc3339();
    let cases: &[(String, &[&str])] = &[
        (
            format!(r#"password_changed_at < "{month_ago}""#),
            &["ada@example.com"],
        ),
        (
            format!(r#"password_changed_at >= "{month_ago}""#),
            &["grace@example.com"],
        ),
        (
            "require_password_change = true".into(),
            &["grace@example.com"],
        ),
    ];
    for (filter, want) in cases {
        assert_eq!(emails(&mut users, filter).await.unwrap(), *want, "{filter}");
    }

    // Enrolled methods, as User.enrolled_methods shows them: who has which factor, who has
    // none. Alan confirms TOTP, Grace has recovery codes, Linus only starts a TOTP.
    let id_of = |email: &str| {
        let mut users = users.clone();
        let email = email.to_string();
        async move { crate::user_by_email(&mut users, &email).await.id }
    };
    let mut authn = app.authenticators();
    crate::factors::confirmed_totp(&mut authn, &id_of("alan@other.org").await).await;
    crate::factors::enroll_totp(&mut authn, &id_of("linus@other.org").await).await;
    crate::factors::recovery_codes(&mut authn, &id_of("grace@example.com").await).await;
    let cases: &[(&str, &[&str])] = &[
        (
            "enrolled_methods:PASSWORD",
            &["ada@example.com", "grace@example.com"],
        ),
        (
            "enrolled_methods:AUTHENTICATOR_TYPE_TOTP",
            &["alan@other.org"],
        ),
        ("enrolled_methods:RECOVERY_CODES", &["grace@example.com"]),
        (
            "enrolled_methods:*",
            &["ada@example.com", "alan@other.org", "grace@example.com"],
        ),
        ("NOT enrolled_methods:*", &["linus@other.org"]),
        (
            "NOT enrolled_methods:TOTP AND NOT enrolled_methods:PASSKEY",
            &["ada@example.com", "grace@example.com", "linus@other.org"],
        ),
        (
            "enrolled_methods:PASSWORD AND enrolled_methods:RECOVERY_CODES",
            &["grace@example.com"],
        ),
    ];
    for (filter, want) in cases {
        assert_eq!(emails(&mut users, filter).await.unwrap(), *want, "{filter}");
    }
    for (filter, says) in [
        ("enrolled_methods = TOTP", "is a list: match it with ':'"),
        (
            "enrolled_methods:FINGERPRINT",
            "'FINGERPRINT' is not a value",
        ),
        ("enrolled_methods:\"*TP\"", "is not a value"),
    ] {
        let err = emails(&mut users, filter).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{filter}");
        assert!(err.message().contains(says), "{filter}: {}", err.message());
    }

    // Linked identities, by provider and by connection: Ada and Grace sign in with Google,
    // Alan with GitHub and his company's SAML connection; Linus with nothing linked.
    use crate::identities::{link, linked};
    let mut ids = app.identities();
    for (email, provider, subject, connection) in [
        ("ada@example.com", "google", "g-ada", ""),
        ("grace@example.com", "google", "g-grace", ""),
        ("alan@other.org", "github", "583231", ""),
        ("alan@other.org", "saml", "alan@acme.example", "acme-okta"),
    ] {
        let req = pb::LinkIdentityRequest {
            connection: connection.into(),
            ..link(
                &crate::user_by_email(&mut users, email).await.id,
                provider,
                subject,
            )
        };
        linked(&mut ids, req).await;
    }
    let cases: &[(&str, &[&str])] = &[
        (
            "identity_providers:\"google\"",
            &["ada@example.com", "grace@example.com"],
        ),
        (
            "identity_providers:*",
            &["ada@example.com", "alan@other.org", "grace@example.com"],
        ),
        ("NOT identity_providers:*", &["linus@other.org"]),
        ("identity_connections:\"acme-okta\"", &["alan@other.org"]),
        // Who can sign in only through a linked account.
        (
            "identity_providers:* AND has_password = false",
            &["alan@other.org"],
        ),
        (
            "identity_providers:\"github\" OR identity_providers:\"google\"",
            &["ada@example.com", "alan@other.org", "grace@example.com"],
        ),
        ("identity_providers:\"GOOGLE\"", &[]),
    ];
    for (filter, want) in cases {
        assert_eq!(emails(&mut users, filter).await.unwrap(), *want, "{filter}");
    }
    let err = emails(&mut users, "identity_providers = \"google\"")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("is a list"), "{}", err.message());

    // Ids are UUIDv7 and order by creation: `id > "..."` goes on after a user.
    let mut all = Vec::new();
    for email in [
        "ada@example.com",
        "alan@other.org",
        "grace@example.com",
        "linus@other.org",
    ] {
        all.push((crate::user_by_email(&mut users, email).await.id, email));
    }
    all.sort();
    let (pivot, _) = &all[1];
    let mut later: Vec<&str> = all[2..].iter().map(|(_, e)| *e).collect();
    later.sort();
    assert_eq!(
        emails(&mut users, &format!("id > \"{pivot}\""))
            .await
            .unwrap(),
        later
    );
    let mut upto: Vec<&str> = all[..2].iter().map(|(_, e)| *e).collect();
    upto.sort();
    assert_eq!(
        emails(&mut users, &format!("id <= \"{pivot}\""))
            .await
            .unwrap(),
        upto
    );
    for (filter, says) in [
        ("id:\"x\"", "is not a list"),
        ("id > \"not-a-uuid\"", "must be compared with a UUID"),
    ] {
        let err = emails(&mut users, filter).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{filter}");
        assert!(err.message().contains(says), "{filter}: {}", err.message());
    }
}

#[tokio::test]
async fn hostile_filters_are_data_or_invalid_argument() {
    let app = TestApp::spawn().await;
    let mut users = app.users();
    seed(&mut users).await;
    // Injection attempts are just values: no rows, no error.
    for f in [
        r#"email = "x\" OR 1=1 --""#,
        r#"email = "'; DROP TABLE users; --""#,
        r#"username:"*%""#,
        r#"app_metadata.plan = "pro') OR ('1'='1""#,
    ] {
        assert_eq!(
            emails(&mut users, f).await.unwrap(),
            Vec::<String>::new(),
            "{f}"
        );
    }
    for (f, pos) in [
        ("password_hash = \"x\"", "position 1"),
        ("email = ", "position 9"),
        ("email == \"a\"", "position 8"),
        ("login_count > lots", "position 15"),
        ("created_at > \"yesterday\"", "position 14"),
        ("status = SUPERUSER", "position 10"),
        ("email:\"a*b\"", "position 7"),
        ("(email = \"a\"", "position 13"),
        ("email = \"a\"; DELETE FROM users", "position 12"),
    ] {
        let err = emails(&mut users, f).await.expect_err(f);
        assert_eq!(err.code(), Code::InvalidArgument, "{f}");
        assert_eq!(violated_fields(&err), vec!["filter"], "{f}");
        assert!(err.message().contains(pos), "{f}: {}", err.message());
    }
    let deep = format!("{}email = \"a\"{}", "(".repeat(10_000), ")".repeat(10_000));
    let err = emails(&mut users, &deep).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // The table is intact.
    assert_eq!(emails(&mut users, "").await.unwrap().len(), 4);
}

#[tokio::test]
async fn free_text_query_and_total_size() {
    let app = TestApp::spawn().await;
    let mut users = app.users();
    seed(&mut users).await;
    let r = users
        .list_users(pb::ListUsersRequest {
            query: "LOVE".into(),
            show_total_size: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.users.len(), 1);
    assert_eq!(r.users[0].username, "ada");
    assert_eq!(r.total_size, 1);
    let r = users
        .list_users(pb::ListUsersRequest {
            query: "other.org".into(),
            filter: "username = \"alan\"".into(),
            show_total_size: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.total_size, 1);
    // A % in the query is a literal character, not a wildcard.
    let r = users
        .list_users(pb::ListUsersRequest {
            query: "%".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.users.is_empty());
}

#[tokio::test]
async fn order_by_each_field() {
    let app = TestApp::spawn().await;
    let mut users = app.users();
    seed(&mut users).await;
    let order = |o: &str| pb::ListUsersRequest {
        order_by: o.into(),
        ..Default::default()
    };
    let names =
        |r: pb::ListUsersResponse| r.users.into_iter().map(|u| u.username).collect::<Vec<_>>();
    assert_eq!(
        names(users.list_users(order("")).await.unwrap().into_inner()),
        vec!["ada", "grace", "alan", "linus"]
    );
    assert_eq!(
        names(
            users
                .list_users(order("created_at desc"))
                .await
                .unwrap()
                .into_inner()
        ),
        vec!["linus", "alan", "grace", "ada"]
    );
    assert_eq!(
        names(
            users
                .list_users(order("username desc"))
                .await
                .unwrap()
                .into_inner()
        ),
        vec!["linus", "grace", "alan", "ada"]
    );
    // NULL display names come last either way.
    assert_eq!(
        names(
            users
                .list_users(order("display_name"))
                .await
                .unwrap()
                .into_inner()
        ),
        vec!["ada", "alan", "grace", "linus"]
    );
    assert_eq!(
        names(
            users
                .list_users(order("display_name desc"))
                .await
                .unwrap()
                .into_inner()
        ),
        vec!["grace", "alan", "ada", "linus"]
    );
    for o in ["updated_at", "last_login_at desc", "email, created_at desc"] {
        assert_eq!(
            users
                .list_users(order(o))
                .await
                .unwrap()
                .into_inner()
                .users
                .len(),
            4,
            "{o}"
        );
    }
    let err = users.list_users(order("password_hash")).await.unwrap_err();
    assert_eq!(violated_fields(&err), vec!["order_by"]);
}

/// Pages through everything with `page_size`, returning the ids in order.
async fn all_pages(users: &mut Users, order_by: &str, page_size: i32) -> Vec<String> {
    let mut ids = Vec::new();
    let mut token = String::new();
    loop {
        let r = users
            .list_users(pb::ListUsersRequest {
                page_size,
                page_token: token.clone(),
                order_by: order_by.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.users.len() <= page_size as usize);
        ids.extend(r.users.into_iter().map(|u| u.id));
        if r.next_page_token.is_empty() {
            return ids;
        }
        token = r.next_page_token;
    }
}

#[tokio::test]
async fn pagination_over_thousands_with_concurrent_inserts_skips_and_repeats_nothing() {
    let app = TestApp::spawn().await;
    // Bulk-load 3,000 users directly (the RPC path is tested elsewhere), some with NULL names.
    {
        let client = app.pool.get().await.unwrap();
        client
            .execute(
                "INSERT INTO users (project_id, id, email, display_name, status, created_at, updated_at)
                 SELECT $1, gen_random_uuid(), 'seed' || i || '@x.io',
                        CASE WHEN i % 3 = 0 THEN NULL ELSE 'name ' || (i % 50) END,
                        1, now() - (i || ' seconds')::interval, now()
                 FROM generate_series(1, 3000) AS i",
                &[&app.project_id],
            )
            .await
            .unwrap();
    }
    let mut users = app.users();
    let initial: HashSet<String> = {
        let client = app.pool.get().await.unwrap();
        client
            .query("SELECT id::text FROM users", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    // Writers insert while we page.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..2 {
        let mut users = app.users();
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && n < 200 {
                crate::create_user(&mut users, &format!("live{w}-{n}@x.io")).await;
                n += 1;
            }
        }));
    }
    for (order, size) in [
        ("created_at", 100),
        ("display_name desc", 137),
        ("email", 250),
    ] {
        let seen = all_pages(&mut users, order, size).await;
        let unique: HashSet<&String> = seen.iter().collect();
        assert_eq!(unique.len(), seen.len(), "{order}: a user was repeated");
        let missing: Vec<&String> = initial.iter().filter(|id| !unique.contains(id)).collect();
        assert!(
            missing.is_empty(),
            "{order}: {} users skipped",
            missing.len()
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
}

#[tokio::test]
async fn page_tokens_are_bound_to_their_query_and_sizes_are_coerced() {
    let app = TestApp::spawn().await;
    {
        let client = app.pool.get().await.unwrap();
        client
            .execute(
                "INSERT INTO users (project_id, id, email, status, created_at, updated_at)
                 SELECT $1, gen_random_uuid(), 'p' || i || '@x.io', 1, now(), now()
                 FROM generate_series(1, 1200) AS i",
                &[&app.project_id],
            )
            .await
            .unwrap();
    }
    let mut users = app.users();
    let r = users
        .list_users(pb::ListUsersRequest {
            page_size: 5000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.users.len(), 1000, "coerced to 1000");
    let r = users
        .list_users(pb::ListUsersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.users.len(), 50, "default 50");
    let token = r.next_page_token;
    assert!(!token.is_empty());
    let err = users
        .list_users(pb::ListUsersRequest {
            page_token: token.clone(),
            filter: "email:\"p1*\"".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), vec!["page_token"]);
    let err = users
        .list_users(pb::ListUsersRequest {
            page_token: token.clone(),
            order_by: "email".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = users
        .list_users(pb::ListUsersRequest {
            page_token: "garbage".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), vec!["page_token"]);
    let err = users
        .list_users(pb::ListUsersRequest {
            page_size: -1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), vec!["page_size"]);
    // The same token with the same query continues.
    let r = users
        .list_users(pb::ListUsersRequest {
            page_token: token,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.users.len(), 50);
}

/// `:` on a metadata path is AIP-160's "has": it finds a value in a list, and through lists
/// of objects (roles, groups, organizations as migrations carry them), while `=` stays exact;
/// NOT reads as it should, and a value PostgreSQL cannot hold is a bad argument.
#[tokio::test]
async fn has_on_metadata_finds_values_in_lists() {
    let app = TestApp::spawn().await;
    let mut users = app.users();
    for (email, meta) in [
        (
            "a@x.io",
            json!({"roles": ["admin", "billing"], "orgs": [{"slug": "acme", "role": "owner"}],
                   "groups": ["/staff", "/Staff/Eng"]}),
        ),
        (
            "b@x.io",
            json!({"roles": "admin", "orgs": {"slug": "beta"}, "groups": "/staffing"}),
        ),
        (
            "c@x.io",
            json!({"roles": ["viewer"], "seats": [3, 5], "groups": ["a.b"]}),
        ),
        ("d@x.io", json!({"groups": ["axb"]})),
    ] {
        let mut user = crate::user_with_email(email);
        user.app_metadata = Some(pb_struct(meta));
        crate::create(&mut users, user).await;
    }
    let cases: &[(&str, &[&str])] = &[
        (r#"app_metadata.roles:"admin""#, &["a@x.io", "b@x.io"]),
        (r#"app_metadata.roles = "admin""#, &["b@x.io"]),
        (r#"NOT app_metadata.roles:"admin""#, &["c@x.io", "d@x.io"]),
        (r#"app_metadata.orgs.slug:"acme""#, &["a@x.io"]),
        (r#"app_metadata.orgs.slug:*"#, &["a@x.io", "b@x.io"]),
        (r#"app_metadata.seats:5"#, &["c@x.io"]),
        (r#"app_metadata.roles:5"#, &[]),
        (
            r#"app_metadata.orgs.role:"owner" AND app_metadata.roles:"billing""#,
            &["a@x.io"],
        ),
        // Wildcards reach into lists too, case-insensitively, other characters literal.
        (r#"app_metadata.groups:"/staff/*""#, &["a@x.io"]),
        (r#"app_metadata.groups:"/staff*""#, &["a@x.io", "b@x.io"]),
        (r#"app_metadata.orgs.slug:"*CME""#, &["a@x.io"]),
        (r#"app_metadata.groups:"a.*""#, &["c@x.io"]),
    ];
    for (filter, want) in cases {
        assert_eq!(emails(&mut users, filter).await.unwrap(), *want, "{filter}");
    }
    for bad in [
        "app_metadata.roles:\"a\u{0}b\"",
        "app_metadata.roles = \"a\u{0}b\"",
        "app_metadata.`a\u{0}b`:*",
    ] {
        let err = emails(&mut users, bad).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad}: {err:?}");
        assert!(err.message().contains("NUL"), "{}", err.message());
    }
}

//! API keys, scopes and project isolation.
use std::time::{Duration, Instant};

use tonic::Code;

use crate::get;
use crate::harness::{TestApp, details, reason};
use crate::{create_user, mask, pb, user_with_email};

#[tokio::test]
async fn missing_malformed_and_wrong_keys_are_unauthenticated() {
    let app = TestApp::spawn().await;
    let get = pb::GetUserRequest {
        id: uuid::Uuid::now_v7().to_string(),
    };
    let err = app
        .users_with(None)
        .get_user(get.clone())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(reason(&err), "MISSING_API_KEY");
    let err = app
        .users_with(Some("hunter2"))
        .get_user(get.clone())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(reason(&err), "MALFORMED_API_KEY");
    // Right id, wrong secret.
    let (id_part, _) = app.token.rsplit_once('_').unwrap();
    let forged = format!("{id_part}_{}", "A".repeat(43));
    let err = app
        .users_with(Some(&forged))
        .get_user(get.clone())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(reason(&err), "INVALID_API_KEY");
    assert!(!err.message().contains(&forged));
    // Unknown id.
    let unknown = format!("rst_{}_{}", uuid::Uuid::now_v7().simple(), "B".repeat(43));
    let err = app
        .users_with(Some(&unknown))
        .get_user(get)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn revoked_keys_stop_working_within_the_cache_time() {
    let app = TestApp::spawn().await;
    let token = app.key(&["users.read"]).await;
    let mut users = app.users_with(Some(&token));
    let list = pb::ListUsersRequest::default();
    users.list_users(list.clone()).await.unwrap();
    let key_id =
        uuid::Uuid::parse_str(token.trim_start_matches("rst_").split('_').next().unwrap()).unwrap();
    {
        let mut client = app.pool.get().await.unwrap();
        roster::admin::revoke_key(&mut **client, key_id)
            .await
            .unwrap();
    }
    // The harness caches keys for 50 ms; allow generous slack, no fixed sleep.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match users.list_users(list.clone()).await {
            Err(e) => {
                assert_eq!(e.code(), Code::Unauthenticated);
                assert_eq!(reason(&e), "REVOKED_API_KEY");
                break;
            }
            Ok(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Ok(_) => panic!("revoked key still accepted after 5 s"),
        }
    }
}

/// A key created with an expiry works until then and is refused from then on, with its own
/// reason, even while the server still caches it (for a minute here); a key in use with days left makes the
/// server warn once, not on every call.
#[tokio::test]
async fn keys_expire_on_time_even_while_cached() {
    let (logs, _guard) = crate::passwords::capture_logs();
    let app = TestApp::spawn_with(roster::config::ServerConfig {
        key_cache_ms: 60_000,
        ..Default::default()
    })
    .await;
    let mut client = app.pool.get().await.unwrap();
    let expires_at = chrono::Utc::now() + chrono::TimeDelta::milliseconds(3_000);
    let (key, token) = roster::admin::create_key(
        &mut **client,
        app.project_id,
        "short",
        &["users.read".into()],
        Some(expires_at),
    )
    .await
    .unwrap();
    assert_eq!(key.expires_at, Some(expires_at));
    let mut users = app.users_with(Some(&token));
    let list = pb::ListUsersRequest::default();
    users.list_users(list.clone()).await.unwrap();
    users.list_users(list.clone()).await.unwrap();
    let warnings = || {
        String::from_utf8_lossy(&logs.0.lock().unwrap())
            .lines()
            .filter(|l| l.contains("expires soon"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let warned = warnings();
    assert_eq!(warned.len(), 1, "one warning, not one per call: {warned:?}");
    assert!(
        warned[0].contains("WARN") && warned[0].contains(&key.id.to_string()),
        "{warned:?}"
    );
    assert!(!warned[0].contains(crate::harness::key_secret(&token)));

    // The server checks a call after it was sent: accepted means sent before the expiry,
    // refused means answered after it (no slack needed either way).
    let refused = loop {
        let sent = chrono::Utc::now();
        match users.list_users(list.clone()).await {
            Ok(_) => {
                assert!(
                    sent < expires_at,
                    "the cached key was accepted for a call sent after its expiry"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => break e,
        }
    };
    assert!(
        chrono::Utc::now() >= expires_at,
        "refused before its expiry"
    );
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert_eq!(reason(&refused), "EXPIRED_API_KEY");
    assert_eq!(refused.message(), "the API key has expired");

    // An expiry in the past is refused at creation.
    let err = roster::admin::create_key(
        &mut **client,
        app.project_id,
        "stillborn",
        &["users.read".into()],
        Some(chrono::Utc::now() - chrono::TimeDelta::seconds(1)),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("must be in the future"), "{err}");
}

#[tokio::test]
async fn each_rpc_needs_its_scope() {
    let app = TestApp::spawn().await;
    let mut admin = app.users();
    let u = create_user(&mut admin, "scoped@x.io").await;
    let read_only = app.key(&["users.read", "logs.read"]).await;
    let mut reader = app.users_with(Some(&read_only));
    reader
        .get_user(pb::GetUserRequest { id: u.id.clone() })
        .await
        .unwrap();
    reader
        .list_users(pb::ListUsersRequest::default())
        .await
        .unwrap();
    let err = reader
        .create_user(pb::CreateUserRequest {
            user: Some(user_with_email("no@x.io")),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let info = details(&err).error_info().cloned().unwrap();
    assert_eq!(info.reason, "MISSING_SCOPE");
    assert_eq!(
        info.metadata.get("scope").map(String::as_str),
        Some("users.write")
    );
    let err = reader
        .delete_user(pb::DeleteUserRequest {
            id: u.id.clone(),
            etag: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    let writer = app.key(&["users.write"]).await;
    let err = app
        .users_with(Some(&writer))
        .get_user(pb::GetUserRequest { id: u.id.clone() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(
        details(&err)
            .error_info()
            .unwrap()
            .metadata
            .get("scope")
            .map(String::as_str),
        Some("users.read")
    );
}

#[tokio::test]
async fn projects_are_isolated() {
    let app = TestApp::spawn().await;
    let mut mine = app.users();
    let u = create_user(&mut mine, "shared@x.io").await;
    let (_, other_token) = app.other_project().await;
    let mut theirs = app.users_with(Some(&other_token));

    // Same email is fine in another project.
    let their_user = create_user(&mut theirs, "shared@x.io").await;
    assert_ne!(their_user.id, u.id);

    let err = theirs
        .get_user(pb::GetUserRequest { id: u.id.clone() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = theirs
        .update_user(pb::UpdateUserRequest {
            user: Some(pb::User {
                id: u.id.clone(),
                display_name: "pwned".into(),
                ..Default::default()
            }),
            update_mask: mask(&["display_name"]),
            etag: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = theirs
        .block_user(pb::BlockUserRequest {
            id: u.id.clone(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = theirs
        .delete_user(pb::DeleteUserRequest {
            id: u.id.clone(),
            etag: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let r = theirs
        .batch_delete_users(pb::BatchDeleteUsersRequest {
            ids: vec![u.id.clone()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.not_found_ids, vec![u.id.clone()]);
    let listed = theirs
        .list_users(pb::ListUsersRequest {
            show_total_size: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        listed
            .users
            .iter()
            .map(|u| u.id.clone())
            .collect::<Vec<_>>(),
        vec![their_user.id.clone()]
    );
    assert_eq!(listed.total_size, 1);
    // A client-chosen id that exists in another project is not revealed.
    let err = theirs
        .create_user(pb::CreateUserRequest {
            user: Some(user_with_email("x@x.io")),
            user_id: u.id.clone(),
            ..Default::default()
        })
        .await;
    assert!(err.is_ok(), "ids are per project: {err:?}");

    // Mine is untouched.
    let got = get(&mut mine, &u.id).await;
    assert_eq!(got.display_name, "");
    assert_eq!(got.status, pb::UserStatus::Active as i32);
}

#[tokio::test]
async fn each_key_has_its_own_rate_limit_with_retry_info() {
    let app = TestApp::spawn_with(roster::config::ServerConfig {
        key_cache_ms: 50,
        rate_limit_rps: 5.0,
        rate_limit_burst: 3.0,
        ..Default::default()
    })
    .await;
    let mut users = app.users();
    let get = || pb::GetUserRequest {
        id: uuid::Uuid::now_v7().to_string(),
    };
    // The burst passes (NOT_FOUND is an answer, not a refusal); the next call is refused.
    for _ in 0..3 {
        let err = users.get_user(get()).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
    }
    let err = users.get_user(get()).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(reason(&err), "RATE_LIMITED");
    let wait = details(&err)
        .retry_info()
        .and_then(|r| r.retry_delay)
        .expect("RetryInfo");
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_millis(200),
        "{wait:?}"
    );
    // Another key is not affected.
    let other = app.key(&["users.read"]).await;
    let err = app
        .users_with(Some(&other))
        .get_user(get())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // After the advertised wait the key may call again.
    tokio::time::sleep(wait + Duration::from_millis(20)).await;
    let err = users.get_user(get()).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

/// A key's own limit (`roster keys limit`) replaces the server's for that key: lower, higher,
/// none at all (0), and back to the server's (`default`); servers apply it within their
/// key-cache time.
#[tokio::test]
async fn a_keys_own_rate_limit_replaces_the_servers() {
    let app = TestApp::spawn_with(roster::config::ServerConfig {
        key_cache_ms: 50,
        rate_limit_rps: 1.0,
        rate_limit_burst: 2.0,
        ..Default::default()
    })
    .await;
    let get = || pb::GetUserRequest {
        id: uuid::Uuid::now_v7().to_string(),
    };
    let key_id = |token: &str| {
        uuid::Uuid::parse_str(token.trim_start_matches("rst_").split('_').next().unwrap()).unwrap()
    };
    let set = |token: &str, rps: Option<f64>, burst: Option<f64>| {
        let (pool, id) = (app.pool.clone(), key_id(token));
        async move {
            roster::admin::set_key_limit(&mut **pool.get().await.unwrap(), id, rps, burst)
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    // How many of 20 calls at once pass.
    let passing = |token: String| {
        let mut users = app.users_with(Some(&token));
        async move {
            let mut passed = 0;
            for _ in 0..20 {
                match users.get_user(get()).await {
                    Err(e) if e.code() == Code::NotFound => passed += 1,
                    Err(e) => {
                        assert_eq!(reason(&e), "RATE_LIMITED");
                    }
                    Ok(_) => unreachable!(),
                }
            }
            passed
        }
    };
    let (batch, frontend, trusted) = (
        app.key(&["users.read"]).await,
        app.key(&["users.read"]).await,
        app.key(&["users.read"]).await,
    );
    set(&frontend, Some(0.5), Some(10.0)).await;
    set(&trusted, Some(0.0), None).await;
    // (One more may pass on a machine slow enough to refill a token meanwhile.)
    let batch_passed = passing(batch.clone()).await;
    assert!(
        (2..=3).contains(&batch_passed),
        "the server's burst: {batch_passed}"
    );
    let frontend_passed = passing(frontend.clone()).await;
    assert!(
        (10..=11).contains(&frontend_passed),
        "its own burst: {frontend_passed}"
    );
    assert_eq!(passing(trusted.clone()).await, 20, "no limit");
    // Back to the server's: its bucket holds the server's burst at most.
    set(&trusted, None, None).await;
    assert!(passing(trusted).await <= 3);
    // A burst without a rate to go with it is refused.
    let err = roster::admin::set_key_limit(
        &mut **app.pool.get().await.unwrap(),
        key_id(&batch),
        Some(0.0),
        Some(5.0),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("invalid"), "{err}");
}

/// A key restricted to networks is refused from any other address with its own reason, the
/// address the server saw and a warning (once, not per call); restricting and lifting apply
/// within the key-cache time, and each change is audited.
#[tokio::test]
async fn keys_restricted_to_networks_are_refused_elsewhere() {
    let (logs, _guard) = crate::passwords::capture_logs();
    let app = TestApp::spawn_with(roster::config::ServerConfig {
        key_cache_ms: 50,
        metrics_listen: "127.0.0.1:0".into(),
        ..Default::default()
    })
    .await;
    let nets = |given: &[&str]| roster::admin::parse_networks(given).unwrap();
    let create = |networks: Vec<ipnet::IpNet>| {
        let pool = app.pool.clone();
        let project = app.project_id;
        async move {
            roster::admin::create_restricted_key(
                &mut **pool.get().await.unwrap(),
                project,
                "cluster only",
                &["users.read".into()],
                None,
                Some(&networks),
            )
            .await
            .unwrap()
        }
    };
    let list = pb::ListUsersRequest::default();
    // The tests call from 127.0.0.1.
    let (inside, inside_token) = create(nets(&["10.0.0.0/8", "127.0.0.0/8"])).await;
    assert_eq!(
        inside.allowed_networks,
        Some(vec!["10.0.0.0/8".to_string(), "127.0.0.0/8".to_string()])
    );
    app.users_with(Some(&inside_token))
        .list_users(list.clone())
        .await
        .unwrap();
    let (outside, outside_token) = create(nets(&["10.0.0.0/8", "fd00::/8", "192.0.2.7"])).await;
    let mut users = app.users_with(Some(&outside_token));
    for _ in 0..3 {
        let err = users.list_users(list.clone()).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        assert_eq!(reason(&err), "ADDRESS_NOT_ALLOWED");
        assert_eq!(
            details(&err).error_info().unwrap().metadata["ip"],
            "127.0.0.1"
        );
        assert!(err.message().contains("127.0.0.1"), "{}", err.message());
    }
    let warned: Vec<String> = String::from_utf8_lossy(&logs.0.lock().unwrap())
        .lines()
        .filter(|l| l.contains("outside its allowed networks"))
        .map(str::to_owned)
        .collect();
    assert_eq!(warned.len(), 1, "once, not per call: {warned:?}");
    assert!(warned[0].contains(&outside.id.to_string()) && warned[0].contains("127.0.0.1"));
    assert!(!warned[0].contains(crate::harness::key_secret(&outside_token)));
    let metrics = app.metrics().await;
    assert_eq!(
        metrics["roster_rpc_errors_total{method=\"/roster.v1.UserService/ListUsers\",reason=\"ADDRESS_NOT_ALLOWED\"}"],
        3.0
    );
    // A refused call is not a use of the key.
    let keys = roster::admin::list_keys(&**app.pool.get().await.unwrap(), app.project_id)
        .await
        .unwrap();
    let listed = keys.iter().find(|k| k.id == outside.id).unwrap();
    assert_eq!(listed.last_used_at, None);

    // Lifting the restriction, then restricting an open key, within the cache time.
    let wait_for = |token: String, accepted: bool| {
        let mut users = app.users_with(Some(&token));
        let list = list.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let got = users.list_users(list.clone()).await;
                if got.is_ok() == accepted {
                    return got.err();
                }
                assert!(Instant::now() < deadline, "still {got:?} after 5 s");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    roster::admin::restrict_key(&mut **app.pool.get().await.unwrap(), outside.id, None)
        .await
        .unwrap();
    wait_for(outside_token.clone(), true).await;
    roster::admin::restrict_key(
        &mut **app.pool.get().await.unwrap(),
        inside.id,
        Some(&nets(&["192.0.2.0/24"])),
    )
    .await
    .unwrap();
    let err = wait_for(inside_token.clone(), false).await.unwrap();
    assert_eq!(reason(&err), "ADDRESS_NOT_ALLOWED");

    // A rotated key keeps the restriction.
    let (rotated, rotated_token, _) = roster::admin::rotate_key(
        &mut **app.pool.get().await.unwrap(),
        inside.id,
        chrono::Utc::now() + chrono::TimeDelta::hours(1),
    )
    .await
    .unwrap();
    assert_eq!(
        rotated.allowed_networks,
        Some(vec!["192.0.2.0/24".to_string()])
    );
    let err = app
        .users_with(Some(&rotated_token))
        .list_users(list.clone())
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "ADDRESS_NOT_ALLOWED");

    // Every change is in the project's log.
    let events: Vec<serde_json::Value> = app
        .project_events(&["API_KEY_CREATED", "API_KEY_UPDATED"])
        .await
        .into_iter()
        .map(|(_, data)| data)
        .collect();
    let networks: Vec<&serde_json::Value> = events.iter().map(|e| &e["allowed_networks"]).collect();
    assert_eq!(
        networks,
        [
            &serde_json::json!(["10.0.0.0/8", "127.0.0.0/8"]),
            &serde_json::json!(["10.0.0.0/8", "fd00::/8", "192.0.2.7/32"]),
            &serde_json::Value::Null,
            &serde_json::json!(["192.0.2.0/24"]),
            &serde_json::json!(["192.0.2.0/24"]),
            &serde_json::Value::Null,
        ],
        "{events:?}"
    );
}

#[test]
fn key_networks_are_parsed_strictly() {
    use roster::admin::parse_networks;
    let ok = parse_networks(&["10.0.0.0/8", " 192.0.2.7 ", "2001:db8::/32", "10.0.0.0/8"]).unwrap();
    let texts: Vec<String> = ok.iter().map(ToString::to_string).collect();
    assert_eq!(texts, ["10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32"]);
    for (bad, says) in [
        (vec!["10.0.0.1/8"], "did you mean 10.0.0.0/8?"),
        (vec!["nonsense"], "is not an address or CIDR block"),
        (vec!["10.0.0.0/33"], "is not an address or CIDR block"),
        (vec![], "at least one network"),
    ] {
        let err = parse_networks(&bad).unwrap_err().to_string();
        assert!(err.contains(says), "{bad:?}: {err}");
    }
    let many: Vec<String> = (0..101).map(|i| format!("10.0.{i}.0/24")).collect();
    let err = parse_networks(&many).unwrap_err().to_string();
    assert!(err.contains("at most 100"), "{err}");
}

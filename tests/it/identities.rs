//! IdentityService: link, lookup, list, unlink (also into a standalone user), merge, and
//! provider tokens sealed at rest.
use roster::pb::v1::identity_service_client::IdentityServiceClient;
use tonic::Code;
use uuid::Uuid;

use crate::harness::{Identities, TestApp, details, key, reason, violated_fields};
use crate::{create_user, pb, pb_struct};

pub fn link(user_id: &str, provider: &str, subject: &str) -> pb::LinkIdentityRequest {
    pb::LinkIdentityRequest {
        user_id: user_id.into(),
        provider: provider.into(),
        subject: subject.into(),
        ..Default::default()
    }
}

pub async fn linked(ids: &mut Identities, req: pb::LinkIdentityRequest) -> pb::Identity {
    ids.link_identity(req)
        .await
        .unwrap()
        .into_inner()
        .identity
        .unwrap()
}

/// ListIdentities of `user_id`, which must succeed.
pub async fn identities_of(ids: &mut Identities, user_id: &str) -> Vec<pb::Identity> {
    ids.list_identities(pb::ListIdentitiesRequest {
        user_id: user_id.into(),
    })
    .await
    .unwrap()
    .into_inner()
    .identities
}

/// LookupUserByIdentity (provider, subject).
pub async fn lookup(
    ids: &mut Identities,
    provider: &str,
    subject: &str,
) -> Result<pb::LookupUserByIdentityResponse, tonic::Status> {
    ids.lookup_user_by_identity(pb::LookupUserByIdentityRequest {
        provider: provider.into(),
        subject: subject.into(),
    })
    .await
    .map(|r| r.into_inner())
}

async fn tokens(
    ids: &mut Identities,
    user: &str,
    provider: &str,
    subject: &str,
) -> pb::GetProviderTokensResponse {
    ids.get_provider_tokens(pb::GetProviderTokensRequest {
        user_id: user.into(),
        provider: provider.into(),
        subject: subject.into(),
    })
    .await
    .unwrap()
    .into_inner()
}

#[tokio::test]
async fn link_lookup_relink_and_sealed_tokens() {
    let app = TestApp::spawn().await;
    let mut users = app.users();
    let mut ids = app.identities();
    let ada = create_user(&mut users, "ada@example.com").await;
    let first = linked(
        &mut ids,
        pb::LinkIdentityRequest {
            connection: "google-oauth2".into(),
            email: "ada@gmail.com".into(),
            profile: Some(pb_struct(
                serde_json::json!({"name": "Ada", "locale": "en"}),
            )),
            access_token: "ya29.access-token-secret".into(),
            refresh_token: "1//refresh-token-secret".into(),
            token_expires_at: Some(prost_types::Timestamp {
                seconds: 2_000_000_000,
                nanos: 0,
            }),
            ..link(&ada.id, "google", "10769150350006150715113082367")
        },
    )
    .await;
    assert_eq!(first.user_id, ada.id);
    assert_eq!(first.connection, "google-oauth2");

    let found = lookup(&mut ids, "google", "10769150350006150715113082367")
        .await
        .unwrap();
    assert_eq!(found.user.unwrap().id, ada.id);
    assert_eq!(found.identity.unwrap(), first);

    // Linking again refreshes the details, keeps the id, and keeps tokens not given.
    let again = linked(
        &mut ids,
        pb::LinkIdentityRequest {
            profile: Some(pb_struct(serde_json::json!({"name": "Ada L."}))),
            ..link(&ada.id, "google", "10769150350006150715113082367")
        },
    )
    .await;
    assert_eq!(again.id, first.id);
    assert_eq!(
        again.profile.unwrap().fields["name"],
        pb_struct(serde_json::json!({"n": "Ada L."})).fields["n"]
    );
    let t = tokens(&mut ids, &ada.id, "google", "10769150350006150715113082367").await;
    assert_eq!(t.access_token, "ya29.access-token-secret");
    assert_eq!(t.refresh_token, "1//refresh-token-secret");
    assert_eq!(t.expires_at.unwrap().seconds, 2_000_000_000);
    // The read is audited: which identity and which tokens, by which key, never the values.
    let reads = token_reads(&app, &ada.id).await;
    assert_eq!(reads.len(), 1);
    let (data, key_id) = &reads[0];
    assert_eq!(
        *data,
        serde_json::json!({"identity_id": first.id, "provider": "google",
            "subject": "10769150350006150715113082367",
            "access_token": true, "refresh_token": true})
    );
    assert!(key_id.is_some());

    linked(&mut ids, link(&ada.id, "github", "583231")).await;
    let list = identities_of(&mut ids, &ada.id).await;
    let providers: Vec<&str> = list.iter().map(|i| i.provider.as_str()).collect();
    assert_eq!(providers, ["google", "github"]);

    // At rest the tokens are sealed: a dump shows neither of them.
    let dump: String = app
        .sql_one(
            "SELECT string_agg(encode(access_token, 'escape') || encode(refresh_token, 'escape'), '')
             FROM identities WHERE access_token IS NOT NULL",
            &[],
        )
        .await;
    assert!(!dump.is_empty());
    assert!(!dump.contains("access-token-secret") && !dump.contains("refresh-token-secret"));
    // Nor do the events.
    let events: String = app
        .sql_one(
            "SELECT string_agg(type || data::text, ',') FROM events",
            &[],
        )
        .await;
    assert!(events.contains("IDENTITY_LINKED") && events.contains("\"relinked\": true"));
    assert!(!events.contains("token-secret"));

    // Tokens need their own scope.
    let token = app.key(&["identities.read", "identities.write"]).await;
    let mut weak = IdentityServiceClient::with_interceptor(app.channel.clone(), key(Some(&token)));
    let err = weak
        .get_provider_tokens(pb::GetProviderTokensRequest {
            user_id: ada.id.clone(),
            provider: "google".into(),
            subject: "10769150350006150715113082367".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(lookup(&mut weak, "github", "583231").await.is_ok());
    // An identity without tokens still records its read (nothing was returned, but asked);
    // a refused call or an unknown identity records nothing.
    tokens(&mut ids, &ada.id, "github", "583231").await;
    let err = ids
        .get_provider_tokens(pb::GetProviderTokensRequest {
            user_id: ada.id.clone(),
            provider: "github".into(),
            subject: "nobody".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let reads = token_reads(&app, &ada.id).await;
    assert_eq!(reads.len(), 2, "{reads:?}");
    assert_eq!(reads[1].0["provider"], "github");
    assert_eq!(reads[1].0["access_token"], false);
    assert_eq!(reads[1].0["refresh_token"], false);
}

/// The PROVIDER_TOKENS_READ events of a user, oldest first: (data, api_key_id).
async fn token_reads(app: &TestApp, user_id: &str) -> Vec<(serde_json::Value, Option<Uuid>)> {
    app.events_of(user_id)
        .await
        .into_iter()
        .filter(|(kind, ..)| kind == "PROVIDER_TOKENS_READ")
        .map(|(_, data, key_id, _)| (data, key_id))
        .collect()
}

#[tokio::test]
async fn an_identity_belongs_to_one_user_even_under_races() {
    let app = TestApp::spawn().await;
    let mut users = app.users();
    let mut ids = app.identities();
    let a = create_user(&mut users, "a@example.com").await;
    let b = create_user(&mut users, "b@example.com").await;
    linked(&mut ids, link(&a.id, "apple", "001.abc")).await;
    let err = ids
        .link_identity(link(&b.id, "apple", "001.abc"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    let info = details(&err).resource_info().cloned().unwrap();
    assert_eq!(info.resource_type, "identity");
    assert_eq!(info.resource_name, a.id, "names the user it is linked to");

    // Concurrent links of one (provider, subject) to two users: exactly one wins.
    for round in 0..5 {
        let subject = format!("race-{round}");
        let (mut ca, mut cb) = (app.identities(), app.identities());
        let (ra, rb) = tokio::join!(
            ca.link_identity(link(&a.id, "okta", &subject)),
            cb.link_identity(link(&b.id, "okta", &subject)),
        );
        let wins = [&ra, &rb].iter().filter(|r| r.is_ok()).count();
        assert_eq!(wins, 1, "round {round}: {ra:?} {rb:?}");
        let loser = if ra.is_ok() { rb } else { ra };
        assert_eq!(loser.unwrap_err().code(), Code::AlreadyExists);
    }

    // Unknown users and bad input.
    let err = ids
        .link_identity(link(&Uuid::now_v7().to_string(), "apple", "x"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = ids
        .link_identity(pb::LinkIdentityRequest {
            email: "not-an-email".into(),
            access_token: "x".repeat(17 * 1024),
            ..link("nope", "", " ")
        })
        .await
        .unwrap_err();
    assert_eq!(
        violated_fields(&err),
        ["access_token", "email", "provider", "subject", "user_id"]
    );
    let err = lookup(&mut ids, "apple", "nobody").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn unlink_removes_or_moves_to_a_standalone_user() {
    let app = TestApp::spawn().await;
    let mut users = app.users();
    let mut ids = app.identities();
    let u = create_user(&mut users, "owner@example.com").await;
    linked(&mut ids, link(&u.id, "github", "1")).await;
    linked(
        &mut ids,
        pb::LinkIdentityRequest {
            email: "grace@corp.example".into(),
            profile: Some(pb_struct(serde_json::json!({
                "name": "Grace Hopper", "given_name": "Grace", "email_verified": true
            }))),
            refresh_token: "refresh-of-grace".into(),
            ..link(&u.id, "google", "2")
        },
    )
    .await;

    let r = ids
        .unlink_identity(pb::UnlinkIdentityRequest {
            user_id: u.id.clone(),
            provider: "github".into(),
            subject: "1".into(),
            create_standalone_user: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.user.is_none());
    assert_eq!(
        lookup(&mut ids, "github", "1").await.unwrap_err().code(),
        Code::NotFound
    );
    // Unlinking what is not the user's: NOT_FOUND.
    let err = ids
        .unlink_identity(pb::UnlinkIdentityRequest {
            user_id: u.id.clone(),
            provider: "github".into(),
            subject: "1".into(),
            create_standalone_user: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    let standalone = ids
        .unlink_identity(pb::UnlinkIdentityRequest {
            user_id: u.id.clone(),
            provider: "google".into(),
            subject: "2".into(),
            create_standalone_user: true,
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_ne!(standalone.id, u.id);
    assert_eq!(standalone.email, "grace@corp.example");
    assert!(standalone.email_verified);
    assert_eq!(standalone.display_name, "Grace Hopper");
    assert_eq!(standalone.external_id, "google|2");
    let found = lookup(&mut ids, "google", "2").await.unwrap();
    assert_eq!(found.user.unwrap().id, standalone.id);
    // The sealed token moved with it and still opens.
    assert_eq!(
        tokens(&mut ids, &standalone.id, "google", "2")
            .await
            .refresh_token,
        "refresh-of-grace"
    );
    let evs: Vec<String> = app
        .events_of(&u.id)
        .await
        .into_iter()
        .map(|e| e.0)
        .collect();
    assert_eq!(evs.iter().filter(|e| *e == "IDENTITY_UNLINKED").count(), 2);
    let evs: Vec<String> = app
        .events_of(&standalone.id)
        .await
        .into_iter()
        .map(|e| e.0)
        .collect();
    assert_eq!(
        evs,
        ["USER_CREATED", "IDENTITY_LINKED", "PROVIDER_TOKENS_READ"]
    );
}

#[tokio::test]
async fn merge_moves_identities_and_removes_the_secondary() {
    let app = TestApp::spawn().await;
    let mut users = app.users();
    let mut ids = app.identities();
    let primary = create_user(&mut users, "primary@example.com").await;
    let secondary = users
        .create_user(pb::CreateUserRequest {
            user: Some(crate::user_with_email("secondary@example.com")),
            initial_password: Some(pb::create_user_request::InitialPassword::Password(
                "secondary's passphrase".into(),
            )),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    linked(&mut ids, link(&secondary.id, "github", "7")).await;
    linked(&mut ids, link(&secondary.id, "google", "8")).await;
    linked(&mut ids, link(&primary.id, "apple", "9")).await;

    let merge = |p: &str, s: &str| pb::MergeUsersRequest {
        primary_user_id: p.into(),
        secondary_user_id: s.into(),
    };
    let err = ids
        .merge_users(merge(&primary.id, &primary.id))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["secondary_user_id"]);

    let merged = ids
        .merge_users(merge(&primary.id, &secondary.id))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(merged.id, primary.id);
    assert_eq!(
        merged.email, "primary@example.com",
        "the primary's profile stays"
    );
    assert!(
        merged.has_password,
        "the primary had none, so it takes the secondary's"
    );
    let list = identities_of(&mut ids, &primary.id).await;
    assert_eq!(list.len(), 3);
    let err = users
        .get_user(pb::GetUserRequest {
            id: secondary.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // The secondary's email is free again; its history stays in the log.
    create_user(&mut users, "secondary@example.com").await;
    assert!(!app.events_of(&secondary.id).await.is_empty());
    let merged_ev = app
        .events_of(&primary.id)
        .await
        .into_iter()
        .find(|e| e.0 == "USERS_MERGED")
        .unwrap();
    assert_eq!(merged_ev.1["identities_moved"], 2);
    assert_eq!(merged_ev.1["secondary_user_id"], secondary.id);

    // Users of another project cannot be merged in.
    let (_, other_token) = app.other_project().await;
    let mut other_users = roster::pb::v1::user_service_client::UserServiceClient::with_interceptor(
        app.channel.clone(),
        key(Some(&other_token)),
    );
    let theirs = create_user(&mut other_users, "theirs@example.com").await;
    let err = ids
        .merge_users(merge(&primary.id, &theirs.id))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn a_merge_racing_an_update_of_the_secondary_is_all_or_nothing() {
    let app = TestApp::spawn().await;
    let mut users = app.users();
    for round in 0..6 {
        let primary = create_user(&mut users, &format!("p{round}@example.com")).await;
        let secondary = create_user(&mut users, &format!("s{round}@example.com")).await;
        linked(
            &mut app.identities(),
            link(&secondary.id, "github", &format!("g{round}")),
        )
        .await;
        let update = pb::UpdateUserRequest {
            user: Some(pb::User {
                id: secondary.id.clone(),
                display_name: "renamed".into(),
                ..Default::default()
            }),
            update_mask: crate::mask(&["display_name"]),
            etag: String::new(),
        };
        let (mut ci, mut cu) = (app.identities(), app.users());
        let (m, u) = tokio::join!(
            ci.merge_users(pb::MergeUsersRequest {
                primary_user_id: primary.id.clone(),
                secondary_user_id: secondary.id.clone(),
            }),
            cu.update_user(update),
        );
        assert!(m.is_ok(), "{m:?}");
        if let Err(e) = u {
            assert_eq!(e.code(), Code::NotFound, "the update came after the merge");
        }
        // Either way: the secondary is gone and its identity is the primary's.
        let found = lookup(&mut app.identities(), "github", &format!("g{round}"))
            .await
            .unwrap();
        assert_eq!(found.user.unwrap().id, primary.id);
        let gone = users
            .get_user(pb::GetUserRequest {
                id: secondary.id.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(gone.code(), Code::NotFound);
    }
}

#[tokio::test]
async fn without_encryption_keys_tokens_are_refused_not_stored_in_clear() {
    let app = TestApp::spawn_with(roster::config::ServerConfig {
        key_cache_ms: 50,
        // Empty means "not configured" (the harness fills in a key only when unset).
        encryption_keys: Some(String::new()),
        ..Default::default()
    })
    .await;
    let mut users = app.users();
    let mut ids = app.identities();
    let u = create_user(&mut users, "nokey@example.com").await;
    let err = ids
        .link_identity(pb::LinkIdentityRequest {
            access_token: "would-be-stored-in-clear".into(),
            ..link(&u.id, "google", "1")
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(reason(&err), "ENCRYPTION_NOT_CONFIGURED");
    let stored: i64 = app.sql_one("SELECT count(*) FROM identities", &[]).await;
    assert_eq!(stored, 0);
    // Identities without tokens need no key.
    linked(&mut ids, link(&u.id, "google", "1")).await;
}

//! Passkeys end to end with a software authenticator (webauthn-authenticator-rs SoftPasskey)
//! through the real server: registration, sign-in with counter checks, replays, ceremonies
//! finished on another replica, and hostile WebAuthn JSON.
use roster::config::ServerConfig;
use tonic::Code;
use uuid::Uuid;
use webauthn_authenticator_rs::prelude::{
    CreationChallengeResponse, RequestChallengeResponse, Url, WebauthnAuthenticator,
};
use webauthn_authenticator_rs::softpasskey::SoftPasskey;

use crate::harness::{Authenticators, TestApp, key, reason, violated_fields};
use crate::{create_user, pb};

const ORIGIN: &str = "https://localhost:8443";

pub(crate) async fn configure(app: &TestApp) {
    configure_project(app, app.project_id).await;
}

/// Makes `project`'s relying party the tests' (localhost, ORIGIN).
async fn configure_project(app: &TestApp, project: Uuid) {
    let mut client = app.pool.get().await.unwrap();
    roster::admin::set_relying_party(
        &mut **client,
        project,
        "localhost",
        Some("Roster tests"),
        &[ORIGIN.to_string()],
    )
    .await
    .unwrap();
}

async fn register(
    authn: &mut Authenticators,
    soft: &mut SoftPasskey,
    user: &str,
    origin: &str,
) -> Result<pb::Authenticator, tonic::Status> {
    let start = authn
        .start_passkey_registration(pb::StartPasskeyRegistrationRequest {
            user_id: user.into(),
            name: "Laptop".into(),
        })
        .await?
        .into_inner();
    let options: CreationChallengeResponse = serde_json::from_str(&start.options_json).unwrap();
    let credential = soft
        .do_registration(Url::parse(origin).unwrap(), options)
        .unwrap();
    authn
        .finish_passkey_registration(pb::FinishPasskeyRegistrationRequest {
            user_id: user.into(),
            ceremony_id: start.ceremony_id,
            credential_json: serde_json::to_string(&credential).unwrap(),
        })
        .await
        .map(|r| r.into_inner().authenticator.unwrap())
}

/// Starts an authentication for `user` and signs it with `soft`: (ceremony id, JSON).
async fn assertion(
    authn: &mut Authenticators,
    soft: &mut SoftPasskey,
    user: &str,
) -> (String, String) {
    let start = authn
        .start_passkey_authentication(pb::StartPasskeyAuthenticationRequest {
            user_id: user.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let options: RequestChallengeResponse = serde_json::from_str(&start.options_json).unwrap();
    let credential = soft
        .do_authentication(Url::parse(ORIGIN).unwrap(), options)
        .unwrap();
    (
        start.ceremony_id,
        serde_json::to_string(&credential).unwrap(),
    )
}

async fn finish(
    authn: &mut Authenticators,
    ceremony: &str,
    json: &str,
) -> Result<pb::FinishPasskeyAuthenticationResponse, tonic::Status> {
    authn
        .finish_passkey_authentication(pb::FinishPasskeyAuthenticationRequest {
            ceremony_id: ceremony.into(),
            credential_json: json.into(),
            ip: "203.0.113.9".into(),
            user_agent: "test".into(),
        })
        .await
        .map(|r| r.into_inner())
}

const OK: i32 = pb::VerifyFactorResult::Ok as i32;
const INVALID: i32 = pb::VerifyFactorResult::InvalidCode as i32;

/// A passkey survives a copy into another project with the same relying party: exported
/// with the user's factors, imported, it signs the copy in there (the counter carried, so
/// the authenticator's next count is accepted); a second copy of the same credential for
/// another user of that project is left out and counted; malformed passkeys fail by field.
#[tokio::test]
async fn a_passkey_survives_an_export_and_import() {
    use crate::bulk::{export_all, import, options, record_of};
    let app = TestApp::spawn().await;
    configure(&app).await;
    let mut users = app.users();
    let mut authn = app.authenticators();
    let user = create_user(&mut users, "pk-copy@example.com").await;
    let mut soft = SoftPasskey::new(true);
    let registered = register(&mut authn, &mut soft, &user.id, ORIGIN)
        .await
        .unwrap();
    let (ceremony, json) = assertion(&mut authn, &mut soft, &user.id).await;
    assert_eq!(
        finish(&mut authn, &ceremony, &json).await.unwrap().result,
        OK
    );

    let exported = export_all(
        &mut users,
        pb::ExportUsersRequest {
            include_authenticators: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let carried = &exported[0].authenticators;
    assert_eq!(carried.len(), 1);
    assert_eq!(carried[0].r#type, pb::AuthenticatorType::Passkey as i32);
    assert_eq!(carried[0].name, "Laptop");
    assert!(carried[0].is_default);

    let (other, token) = app.other_project().await;
    configure_project(&app, other).await;
    let record = |email: &str| {
        let mut r = record_of(&exported[0]);
        r.user_id.clear();
        r.user.as_mut().unwrap().email = email.into();
        pb::ImportUsersRequest {
            item: Some(pb::import_users_request::Item::Record(r)),
        }
    };
    let create_only = || {
        options(
            pb::ImportMode::CreateOnly,
            pb::ImportMatchOn::Unspecified,
            false,
        )
    };
    let mut other_users = app.users_with(Some(&token));
    let (res, summary) = import(
        &mut other_users,
        [create_only(), record("pk-copy@example.com")].into_iter(),
    )
    .await
    .unwrap();
    assert_eq!(summary.created, 1, "{res:?}");
    let copy = res[0].user_id.clone();
    let mut other_authn = app.authenticators_with(Some(&token));
    let listed = crate::factors::list_of(&mut other_authn, &copy).await;
    assert_eq!(listed[0].credential_id, registered.credential_id);
    assert!(listed[0].is_default);
    let (ceremony, json) = assertion(&mut other_authn, &mut soft, &copy).await;
    let r = finish(&mut other_authn, &ceremony, &json).await.unwrap();
    assert_eq!(r.result, OK, "the same passkey signs the copy in");

    // The same credential for another user of that project: the user is created, the
    // passkey left out and counted.
    let (res, _) = import(
        &mut other_users,
        [create_only(), record("pk-second@example.com")].into_iter(),
    )
    .await
    .unwrap();
    let second = res[0].user_id.clone();
    let listed = crate::factors::list_of(&mut other_authn, &second).await;
    assert!(listed.is_empty(), "{listed:?}");
    let counted: i64 = app
        .sql_one(
            "SELECT count(*) FROM events WHERE project_id = $1 AND type = 'USER_IMPORTED'
               AND (data->>'passkeys_skipped')::int = 1",
            &[&other],
        )
        .await;
    assert_eq!(counted, 1);

    // Malformed passkeys fail their record by field.
    let bad = |f: &dyn Fn(&mut pb::ImportAuthenticator)| {
        let mut r = record_of(&exported[0]);
        r.user_id.clear();
        r.user.as_mut().unwrap().email = "pk-bad@example.com".into();
        f(&mut r.authenticators[0]);
        pb::ImportUsersRequest {
            item: Some(pb::import_users_request::Item::Record(r)),
        }
    };
    let (res, _) = import(
        &mut users,
        [
            create_only(),
            bad(&|a| a.passkey = b"{\"cred\": 1}".to_vec()),
            bad(&|a| a.aaguid = "not-a-uuid".into()),
            bad(&|a| a.transports = vec!["USB drive".into()]),
            bad(&|a| a.r#type = pb::AuthenticatorType::Totp as i32),
        ]
        .into_iter(),
    )
    .await
    .unwrap();
    let fields: Vec<Vec<String>> = res
        .iter()
        .map(|r| {
            let e = r.error.as_ref().expect("refused");
            let status = tonic::Status::with_details(
                Code::from(e.code),
                e.message.clone(),
                prost::Message::encode_to_vec(e).into(),
            );
            violated_fields(&status)
        })
        .collect();
    assert_eq!(
        fields,
        [
            vec!["record.authenticators[0].passkey"],
            vec!["record.authenticators[0].aaguid"],
            vec!["record.authenticators[0].transports"],
            vec![
                "record.authenticators[0].passkey",
                "record.authenticators[0].totp_secret"
            ],
        ]
    );
}

/// `text`, a file of another store's users, imported with `roster import --from source` into
/// a new project with the tests' relying party: that project's key, and the imported user
/// with `email`.
async fn import_elsewhere(
    app: &TestApp,
    source: &str,
    text: &str,
    email: &str,
) -> (String, pb::User) {
    let dir = std::env::temp_dir().join(format!("roster-{source}-pk-{}", Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("users.json");
    std::fs::write(&file, text).unwrap();
    let (project, token) = app.other_project().await;
    configure_project(app, project).await;
    let args = ["import", file.to_str().unwrap(), "--from", source];
    let (code, _, err) = crate::cli::roster_client(app, &token, &args).await;
    assert_eq!(code, 0, "{err}");
    let user = crate::user_by_email(&mut app.users_with(Some(&token)), email).await;
    (token, user)
}

/// Moving off Ory Kratos, Keycloak or Supabase with passkeys: a credential as each keeps it,
/// its id and its public key as the COSE bytes the authenticator gave, imported with `roster
/// import --from kratos` (`keycloak`, `supabase`) into a project with the same relying party,
/// signs its user in there with the same authenticator, its counter carried.
#[tokio::test]
async fn webauthn_credentials_of_other_stores_sign_in_after_import() {
    use base64::Engine as _;
    use webauthn_rs::prelude::{COSEKeyType, Credential, Passkey};
    let b64 = base64::engine::general_purpose::STANDARD;
    let app = TestApp::spawn().await;
    configure(&app).await;
    // The authenticator's credential, made by a registration here: its id and public key
    // are what any WebAuthn server keeps.
    let mut users = app.users();
    let mut authn = app.authenticators();
    let source = create_user(&mut users, "kratos-source@example.com").await;
    let mut soft = SoftPasskey::new(true);
    register(&mut authn, &mut soft, &source.id, ORIGIN)
        .await
        .unwrap();
    let (ceremony, json) = assertion(&mut authn, &mut soft, &source.id).await;
    assert_eq!(
        finish(&mut authn, &ceremony, &json).await.unwrap().result,
        OK
    );
    let stored: serde_json::Value = app
        .sql_one(
            "SELECT passkey FROM authenticators WHERE user_id = $1::text::uuid",
            &[&source.id],
        )
        .await;
    let credential = Credential::from(serde_json::from_value::<Passkey>(stored).unwrap());
    let COSEKeyType::EC_EC2(ec) = &credential.cred.key else {
        panic!("the soft authenticator makes P-256 keys")
    };
    // The COSE_Key map the authenticator sent: kty EC2, alg ES256, crv P-256, x, y.
    use serde_cbor_2::Value as Cbor;
    let cose = serde_cbor_2::to_vec(&Cbor::Map(
        [
            (Cbor::Integer(1), Cbor::Integer(2)),
            (Cbor::Integer(3), Cbor::Integer(-7)),
            (Cbor::Integer(-1), Cbor::Integer(1)),
            (Cbor::Integer(-2), Cbor::Bytes(ec.x.to_vec())),
            (Cbor::Integer(-3), Cbor::Bytes(ec.y.to_vec())),
        ]
        .into_iter()
        .collect(),
    ))
    .unwrap();
    let identity = serde_json::json!({
        "id": "9f425a8d-7efc-4768-8f23-7647a74fdfaa", "state": "active",
        "traits": {"email": "kim@example.com"},
        "credentials": {"webauthn": {"type": "webauthn", "identifiers": ["kim-handle"],
            "config": {"user_handle": b64.encode(b"kim-handle"), "credentials": [{
                "id": b64.encode(credential.cred_id.as_slice()),
                "public_key": b64.encode(&cose),
                "attestation_type": "none",
                "authenticator": {"aaguid": b64.encode([0u8; 16]), "sign_count": 1,
                                  "clone_warning": false},
                "display_name": "YubiKey", "added_at": "2024-02-01T09:00:00Z",
                "is_passwordless": true,
                "flags": {"user_present": true, "user_verified": true,
                          "backup_eligible": false, "backup_state": false},
                "transport": ["usb"]}]}}}
    });
    let (token, kim) =
        import_elsewhere(&app, "kratos", &format!("{identity}\n"), "kim@example.com").await;
    let mut other_authn = app.authenticators_with(Some(&token));
    let listed = crate::factors::list_of(&mut other_authn, &kim.id).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].r#type, pb::AuthenticatorType::Passkey as i32);
    assert_eq!(listed[0].name, "YubiKey");
    assert_eq!(listed[0].transports, ["usb"]);
    assert_eq!(
        listed[0].created_at.as_ref().unwrap().seconds,
        1_706_778_000
    );
    let (ceremony, json) = assertion(&mut other_authn, &mut soft, &kim.id).await;
    let r = finish(&mut other_authn, &ceremony, &json).await.unwrap();
    assert_eq!(r.result, OK, "the Kratos credential signs Kim in here");
    assert_eq!(r.user.unwrap().id, kim.id);

    // The same credential as Keycloak keeps it (a realm export's passwordless WebAuthn
    // credential, the COSE key in base64url), into a third project: it signs Lee in there.
    let url_b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let data = serde_json::json!({
        "aaguid": "00000000-0000-0000-0000-000000000000",
        "credentialId": b64.encode(credential.cred_id.as_slice()),
        // The last count Keycloak saw: the authenticator has signed twice so far.
        "counter": 2, "attestationStatementFormat": "none",
        "credentialPublicKey": url_b64.encode(&cose), "transports": ["internal"]});
    let realm = serde_json::json!({"realm": "acme", "users": [{
        "id": "2b2f0b4e-8f5a-4c39-9a9e-3f0a9d6f1c11", "username": "lee",
        "email": "lee@example.com", "enabled": true, "createdTimestamp": 1700000000000_i64,
        "credentials": [{"type": "webauthn-passwordless", "userLabel": "Phone",
                         "createdDate": 1700000000000_i64, "secretData": "{}",
                         "credentialData": data.to_string()}]}]});
    let (token, lee) =
        import_elsewhere(&app, "keycloak", &realm.to_string(), "lee@example.com").await;
    let mut third_authn = app.authenticators_with(Some(&token));
    let listed = crate::factors::list_of(&mut third_authn, &lee.id).await;
    assert_eq!(
        (listed.len(), listed[0].name.as_str()),
        (1, "Phone"),
        "{listed:?}"
    );
    let (ceremony, json) = assertion(&mut third_authn, &mut soft, &lee.id).await;
    let r = finish(&mut third_authn, &ceremony, &json).await.unwrap();
    assert_eq!(r.result, OK, "the Keycloak credential signs Lee in here");

    // And as Supabase keeps it: a verified WebAuthn factor holding go-webauthn's Credential.
    let row = serde_json::json!({
        "id": "7c9e6679-7425-40de-944b-e07fc1f90aff", "email": "sue@example.com",
        "email_confirmed_at": "2024-01-15T10:30:00+00:00", "identities": null,
        "mfa_factors": [{"id": "7c9e6679-7425-40de-944b-e07fc1f90a01", "factor_type": "webauthn",
            "status": "verified", "friendly_name": "MacBook",
            "web_authn_credential": {
                "id": b64.encode(credential.cred_id.as_slice()),
                "publicKey": b64.encode(&cose), "attestationType": "none",
                "transport": ["internal"],
                "flags": {"userPresent": true, "userVerified": true,
                          "backupEligible": false, "backupState": false},
                "authenticator": {"AAGUID": b64.encode([0u8; 16]), "SignCount": 3,
                                  "CloneWarning": false, "Attachment": "platform"}}}]});
    let (token, sue) =
        import_elsewhere(&app, "supabase", &format!("{row}\n"), "sue@example.com").await;
    let mut fourth_authn = app.authenticators_with(Some(&token));
    let (ceremony, json) = assertion(&mut fourth_authn, &mut soft, &sue.id).await;
    let r = finish(&mut fourth_authn, &ceremony, &json).await.unwrap();
    assert_eq!(r.result, OK, "the Supabase credential signs Sue in here");

    // And as Better Auth's passkey plugin keeps it (the id in base64url, the COSE key in
    // base64, transports comma-separated), a row of the README's query. Its flags are the
    // soft authenticator's (single-device, not backed up): a credential whose backup
    // eligibility changes is refused at sign-in, so they are carried as stored.
    let row = serde_json::json!({
        "id": "WJU4XpMcOOXLKsntLqpuCOE5deuKH7wh", "name": "Bea", "email": "bea@example.com",
        "emailVerified": true, "createdAt": "2026-12-07T17:22:46.113Z",
        "accounts": [{"providerId": "credential", "accountId": "x", "password": null}],
        "passkeys": [{"id": "pk1", "name": "iPhone", "publicKey": b64.encode(&cose),
            "userId": "WJU4XpMcOOXLKsntLqpuCOE5deuKH7wh",
            "credentialID": url_b64.encode(credential.cred_id.as_slice()), "counter": 4,
            "deviceType": "singleDevice", "backedUp": false, "transports": "internal,hybrid",
            "createdAt": "2026-12-01T08:00:00.000Z",
            "aaguid": "fbfc3007-154e-4ecc-8c0b-6e020557d7bd"}]});
    let (token, bea) =
        import_elsewhere(&app, "better-auth", &format!("{row}\n"), "bea@example.com").await;
    let mut fifth_authn = app.authenticators_with(Some(&token));
    let listed = crate::factors::list_of(&mut fifth_authn, &bea.id).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(
        (listed[0].name.as_str(), listed[0].aaguid.as_str()),
        ("iPhone", "fbfc3007-154e-4ecc-8c0b-6e020557d7bd")
    );
    assert_eq!(listed[0].transports, ["internal", "hybrid"]);
    let (ceremony, json) = assertion(&mut fifth_authn, &mut soft, &bea.id).await;
    let r = finish(&mut fifth_authn, &ceremony, &json).await.unwrap();
    assert_eq!(r.result, OK, "the Better Auth credential signs Bea in here");
}

#[tokio::test]
async fn register_and_sign_in_with_a_software_passkey() {
    let app = TestApp::spawn().await;
    configure(&app).await;
    let mut users = app.users();
    let mut authn = app.authenticators();
    let user = create_user(&mut users, "pk@example.com").await;
    let mut soft = SoftPasskey::new(true);

    let a = register(&mut authn, &mut soft, &user.id, ORIGIN)
        .await
        .unwrap();
    assert_eq!(a.r#type, pb::AuthenticatorType::Passkey as i32);
    assert!(a.confirmed && a.is_default);
    assert_eq!(a.name, "Laptop");
    assert!(a.credential_id.len() >= 16, "{}", a.credential_id);
    let got = app
        .users()
        .get_user(pb::GetUserRequest {
            id: user.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert!(
        got.enrolled_methods
            .contains(&(pb::AuthenticatorType::Passkey as i32))
    );
    assert_eq!(got.default_method, pb::AuthenticatorType::Passkey as i32);

    let (ceremony, json) = assertion(&mut authn, &mut soft, &user.id).await;
    let r = finish(&mut authn, &ceremony, &json).await.unwrap();
    assert_eq!(r.result, OK);
    let signed_in = r.user.unwrap();
    assert_eq!(signed_in.login_count, 1);
    assert_eq!(signed_in.last_login_ip, "203.0.113.9");
    let used = r.authenticator.unwrap();
    assert_eq!(used.id, a.id);
    assert!(used.last_used_at.is_some());
    let aid = Uuid::parse_str(&a.id).unwrap();
    let count: i64 = app
        .sql_one(
            "SELECT sign_count FROM authenticators WHERE id = $1",
            &[&aid],
        )
        .await;
    assert!(count >= 1, "{count}");

    // The same ceremony cannot be finished twice; the same assertion on a new ceremony fails
    // (its challenge is another) and counts as a failed attempt.
    let err = finish(&mut authn, &ceremony, &json).await.unwrap_err();
    assert_eq!(violated_fields(&err), ["ceremony_id"]);
    let (other_ceremony, _) = assertion(&mut authn, &mut soft, &user.id).await;
    let r = finish(&mut authn, &other_ceremony, &json).await.unwrap();
    assert_eq!(r.result, INVALID);
    let uid = Uuid::parse_str(&user.id).unwrap();
    let failed: i32 = app
        .sql_one("SELECT failed_logins FROM users WHERE id = $1", &[&uid])
        .await;
    assert_eq!(failed, 1);

    // A counter that does not grow marks a cloned authenticator: refused.
    {
        let client = app.pool.get().await.unwrap();
        client
            .execute(
                "UPDATE authenticators SET sign_count = 1000000 WHERE id = $1",
                &[&aid],
            )
            .await
            .unwrap();
    }
    let (ceremony, json) = assertion(&mut authn, &mut soft, &user.id).await;
    assert_eq!(
        finish(&mut authn, &ceremony, &json).await.unwrap().result,
        INVALID
    );

    // Registering the same authenticator again is excluded by the options, and a
    // registration made on an origin the project does not allow is refused.
    let mut stranger = SoftPasskey::new(true);
    let err = register(
        &mut authn,
        &mut stranger,
        &user.id,
        "https://localhost:9999",
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&err), ["credential_json"]);

    let events = app.events_of(&user.id).await;
    let kinds: Vec<&str> = events.iter().map(|e| e.0.as_str()).collect();
    assert!(kinds.contains(&"AUTHENTICATOR_ENROLLED"));
    assert!(kinds.contains(&"FACTOR_VERIFIED"));
    assert!(kinds.contains(&"LOGIN_SUCCEEDED"));
    assert!(
        kinds
            .iter()
            .filter(|k| **k == "FACTOR_VERIFICATION_FAILED")
            .count()
            >= 3
    );
    let login = events.iter().find(|e| e.0 == "LOGIN_SUCCEEDED").unwrap();
    assert_eq!(login.1["method"], "PASSKEY");
}

/// One passkey assertion sent by 8 callers at once (a captured assertion raced against its
/// owner): the ceremony is taken by exactly one, which signs the user in once; the others
/// are told the ceremony is gone.
#[tokio::test]
async fn one_assertion_sent_by_several_callers_at_once_signs_in_once() {
    let app = TestApp::spawn().await;
    configure(&app).await;
    let mut authn = app.authenticators();
    let user = create_user(&mut app.users(), "pk-race@example.com").await;
    let mut soft = SoftPasskey::new(true);
    register(&mut authn, &mut soft, &user.id, ORIGIN)
        .await
        .unwrap();
    let (ceremony, json) = assertion(&mut authn, &mut soft, &user.id).await;
    let calls = (0..8).map(|_| {
        let (mut authn, c, j) = (authn.clone(), ceremony.clone(), json.clone());
        async move { finish(&mut authn, &c, &j).await }
    });
    let answers = futures_util::future::join_all(calls).await;
    let oks = answers
        .iter()
        .filter(|a| a.as_ref().is_ok_and(|r| r.result == OK))
        .count();
    assert_eq!(oks, 1, "{answers:?}");
    for a in answers.iter().filter_map(|a| a.as_ref().err()) {
        assert_eq!(violated_fields(a), ["ceremony_id"], "{a:?}");
    }
    assert_eq!(answers.iter().filter(|a| a.is_err()).count(), 7);
    assert_eq!(crate::get(&mut app.users(), &user.id).await.login_count, 1);
}

#[tokio::test]
async fn a_ceremony_started_on_one_replica_finishes_on_another() {
    let app = TestApp::spawn().await;
    configure(&app).await;
    let mut users = app.users();
    let mut authn = app.authenticators();
    let user = create_user(&mut users, "replica@example.com").await;
    let mut soft = SoftPasskey::new(true);
    register(&mut authn, &mut soft, &user.id, ORIGIN)
        .await
        .unwrap();

    // A second server on the same database.
    let second = roster::server::Application::build(
        "127.0.0.1:0".parse().unwrap(),
        app.pool.clone(),
        ServerConfig {
            encryption_keys: Some(TestApp::ENCRYPTION_KEYS.into()),
            ..ServerConfig::default()
        },
    )
    .await
    .unwrap();
    let addr = second.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(second.run_until(async move {
        let _ = stopped.await;
    }));
    let channel = crate::harness::channel_to(addr);
    let mut other =
        roster::pb::v1::authenticator_service_client::AuthenticatorServiceClient::with_interceptor(
            channel,
            key(Some(&app.token)),
        );
    let (ceremony, json) = assertion(&mut authn, &mut soft, &user.id).await;
    let r = finish(&mut other, &ceremony, &json).await.unwrap();
    assert_eq!(r.result, OK);
    let _ = stop.send(());
}

#[tokio::test]
async fn hostile_webauthn_input_is_invalid_argument_never_internal() {
    let app = TestApp::spawn().await;
    let mut users = app.users();
    let mut authn = app.authenticators();
    let user = create_user(&mut users, "bad@example.com").await;
    // No relying party configured yet.
    let err = authn
        .start_passkey_registration(pb::StartPasskeyRegistrationRequest {
            user_id: user.id.clone(),
            name: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::FailedPrecondition, "WEBAUTHN_NOT_CONFIGURED")
    );
    // The relying party is validated: a domain, and https origins (http only on localhost).
    {
        let mut client = app.pool.get().await.unwrap();
        for (rp, origins) in [
            ("", vec![ORIGIN]),
            ("exa mple.com", vec![ORIGIN]),
            ("localhost", vec!["ftp://localhost"]),
            ("localhost", vec!["http://example.com"]),
            ("localhost", vec!["https://example.com/path"]),
            ("localhost", vec![]),
        ] {
            let origins: Vec<String> = origins.iter().map(|o| o.to_string()).collect();
            let err =
                roster::admin::set_relying_party(&mut **client, app.project_id, rp, None, &origins)
                    .await
                    .unwrap_err();
            assert!(
                matches!(err, roster::error::Error::Invalid(_)),
                "{rp} {origins:?}"
            );
        }
    }
    configure(&app).await;
    let err = authn
        .start_passkey_authentication(pb::StartPasskeyAuthenticationRequest {
            user_id: user.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "NO_PASSKEYS");
    // Username-less sign-in starts without a user.
    let start = authn
        .start_passkey_authentication(pb::StartPasskeyAuthenticationRequest {
            user_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let options: serde_json::Value = serde_json::from_str(&start.options_json).unwrap();
    assert!(options["publicKey"]["challenge"].is_string(), "{options}");

    let started = authn
        .start_passkey_registration(pb::StartPasskeyRegistrationRequest {
            user_id: user.id.clone(),
            name: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let options: serde_json::Value = serde_json::from_str(&started.options_json).unwrap();
    assert_eq!(options["publicKey"]["rp"]["id"], "localhost");
    let huge = format!("{{\"id\":\"{}\"}}", "A".repeat(70_000));
    for bad in [
        "",
        "{",
        "[]",
        "{\"id\": 5}",
        "{\"id\":\"x\",\"rawId\":\"!!\",\"type\":\"public-key\"}",
        huge.as_str(),
    ] {
        let err = authn
            .finish_passkey_registration(pb::FinishPasskeyRegistrationRequest {
                user_id: user.id.clone(),
                ceremony_id: started.ceremony_id.clone(),
                credential_json: bad.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad:.40}");
        assert_eq!(violated_fields(&err), ["credential_json"], "{bad:.40}");
        let err = finish(&mut authn, &start.ceremony_id, bad)
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&err), ["credential_json"], "{bad:.40}");
    }
    // Unknown and malformed ceremony ids; another user's ceremony.
    let mut soft = SoftPasskey::new(true);
    let options: CreationChallengeResponse = serde_json::from_str(&started.options_json).unwrap();
    let good = serde_json::to_string(
        &soft
            .do_registration(Url::parse(ORIGIN).unwrap(), options)
            .unwrap(),
    )
    .unwrap();
    let other = create_user(&mut users, "other@example.com").await;
    for (uid, ceremony, field) in [
        (
            other.id.as_str(),
            started.ceremony_id.as_str(),
            "ceremony_id",
        ),
        (user.id.as_str(), "not-a-uuid", "ceremony_id"),
    ] {
        let err = authn
            .finish_passkey_registration(pb::FinishPasskeyRegistrationRequest {
                user_id: uid.into(),
                ceremony_id: ceremony.into(),
                credential_json: good.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&err), [field]);
    }
    // An unknown ceremony.
    let err = finish(&mut authn, &Uuid::now_v7().to_string(), "{}")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

//! Second factors through the real server: TOTP (sealed seed, ±1 step, replay), recovery
//! codes (single use), email/SMS OTP (voiding, attempts), every kind of code raced by several
//! callers (one wins), management with one default, the shared lockout, merge, and bad input.
use std::time::{SystemTime, UNIX_EPOCH};

use roster::config::ServerConfig;
use tonic::Code;
use uuid::Uuid;

use crate::harness::{Authenticators, TestApp, reason, violated_fields};
use crate::{create_user, mask, pb};

use pb::AuthenticatorType as T;
use pb::VerifyFactorResult as R;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Waits until the current 30-second step has at least 4 seconds left on either side, so a
/// code computed here is for the step the server sees. (Not a timing assertion: it only
/// picks a moment.)
pub async fn mid_step() -> u64 {
    loop {
        let t = now();
        if (4..=26).contains(&(t % 30)) {
            return t;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

pub fn code(secret: &[u8], at: u64) -> String {
    roster::authenticators::totp::code_at(secret, 6, at).unwrap()
}

fn secret_bytes(base32: &str) -> Vec<u8> {
    totp_rs::Secret::try_from_base32(base32)
        .unwrap()
        .as_bytes()
        .to_vec()
}

pub async fn enroll_totp(authn: &mut Authenticators, user: &str) -> (pb::Authenticator, Vec<u8>) {
    let r = authn
        .enroll_totp(pb::EnrollTotpRequest {
            user_id: user.into(),
            name: "Phone".into(),
        })
        .await
        .unwrap()
        .into_inner();
    (r.authenticator.unwrap(), secret_bytes(&r.secret))
}

/// A new set of recovery codes for the user (its authenticator and the codes).
pub async fn recovery_codes(
    authn: &mut Authenticators,
    user: &str,
) -> pb::GenerateRecoveryCodesResponse {
    authn
        .generate_recovery_codes(pb::GenerateRecoveryCodesRequest {
            user_id: user.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// A user with a confirmed TOTP authenticator: (its id, the seed).
pub async fn confirmed_totp(authn: &mut Authenticators, user: &str) -> (String, Vec<u8>) {
    let (a, secret) = enroll_totp(authn, user).await;
    let t = mid_step().await;
    let r = authn
        .confirm_totp(pb::ConfirmTotpRequest {
            user_id: user.into(),
            authenticator_id: a.id.clone(),
            code: code(&secret, t),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.result, R::Ok as i32);
    (a.id, secret)
}

async fn verify(
    authn: &mut Authenticators,
    user: &str,
    id: &str,
    kind: T,
    code: &str,
) -> Result<pb::VerifyFactorResponse, tonic::Status> {
    authn
        .verify_factor(pb::VerifyFactorRequest {
            user_id: user.into(),
            authenticator_id: id.into(),
            r#type: kind as i32,
            code: code.into(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

fn result(r: &pb::VerifyFactorResponse) -> R {
    R::try_from(r.result).unwrap()
}

/// Creates a user whose email is verified (as OTP channels need).
async fn create_verified_user(users: &mut crate::harness::Users, email: &str) -> pb::User {
    users
        .create_user(pb::CreateUserRequest {
            user: Some(pb::User {
                email: email.into(),
                email_verified: true,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap()
}

/// The authenticators of `user` (ListAuthenticators, which must succeed).
pub async fn list_of(authn: &mut Authenticators, user: &str) -> Vec<pb::Authenticator> {
    authn
        .list_authenticators(pb::ListAuthenticatorsRequest {
            user_id: user.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .authenticators
}

async fn get_user(app: &TestApp, id: &str) -> pb::User {
    crate::get(&mut app.users(), id).await
}

fn types(app_events: &[(String, serde_json::Value, Option<Uuid>, Option<String>)]) -> Vec<&str> {
    app_events.iter().map(|e| e.0.as_str()).collect()
}

#[tokio::test]
async fn totp_enrol_confirm_and_verify_with_window_and_replay() {
    let app = TestApp::spawn().await;
    let mut users = app.users();
    let mut authn = app.authenticators();
    let user = create_user(&mut users, "totp@example.com").await;

    let r = authn
        .enroll_totp(pb::EnrollTotpRequest {
            user_id: user.id.clone(),
            name: "Phone".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let a = r.authenticator.unwrap();
    assert_eq!(a.r#type, T::Totp as i32);
    assert!(!a.confirmed && !a.is_default);
    assert_eq!(a.name, "Phone");
    assert!(
        r.otpauth_uri.starts_with("otpauth://totp/"),
        "{}",
        r.otpauth_uri
    );
    assert!(r.otpauth_uri.contains(&format!("secret={}", r.secret)));
    assert!(r.otpauth_uri.contains("issuer=test"), "{}", r.otpauth_uri);
    assert!(
        r.otpauth_uri.contains("totp%40example.com"),
        "{}",
        r.otpauth_uri
    );
    assert_eq!(&r.qr_png[..8], b"\x89PNG\r\n\x1a\n");
    let secret = secret_bytes(&r.secret);
    assert_eq!(secret.len(), 20);
    // Unconfirmed: not yet an enrolled method.
    assert!(
        !get_user(&app, &user.id)
            .await
            .enrolled_methods
            .contains(&(T::Totp as i32))
    );
    // At rest the seed is sealed: the raw bytes appear nowhere in the row.
    let id = Uuid::parse_str(&a.id).unwrap();
    let stored: Vec<u8> = app
        .sql_one(
            "SELECT totp_secret FROM authenticators WHERE id = $1",
            &[&id],
        )
        .await;
    assert!(stored.len() > secret.len());
    assert!(!stored.windows(secret.len()).any(|w| w == secret.as_slice()));

    let t = mid_step().await;
    let wrong = if code(&secret, t) == "000000" {
        "111111"
    } else {
        "000000"
    };
    let c = authn
        .confirm_totp(pb::ConfirmTotpRequest {
            user_id: user.id.clone(),
            authenticator_id: a.id.clone(),
            code: wrong.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(c.result, R::InvalidCode as i32);
    assert!(!c.authenticator.unwrap().confirmed);
    let c = authn
        .confirm_totp(pb::ConfirmTotpRequest {
            user_id: user.id.clone(),
            authenticator_id: a.id.clone(),
            code: code(&secret, t),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(c.result, R::Ok as i32);
    let confirmed = c.authenticator.unwrap();
    assert!(confirmed.confirmed && confirmed.is_default);
    let u = get_user(&app, &user.id).await;
    assert!(u.enrolled_methods.contains(&(T::Totp as i32)));
    assert_eq!(u.default_method, T::Totp as i32);

    // The step spent on confirmation cannot be used again.
    let r = verify(
        &mut authn,
        &user.id,
        &a.id,
        T::Unspecified,
        &code(&secret, t),
    )
    .await
    .unwrap();
    assert_eq!(result(&r), R::CodeReused);
    // The next step is within the window; then the one before it is a replay.
    let r = verify(&mut authn, &user.id, "", T::Totp, &code(&secret, t + 30))
        .await
        .unwrap();
    assert_eq!(result(&r), R::Ok);
    assert_eq!(r.user.unwrap().id, user.id);
    assert!(r.authenticator.unwrap().last_used_at.is_some());
    let r = verify(
        &mut authn,
        &user.id,
        &a.id,
        T::Unspecified,
        &code(&secret, t - 30),
    )
    .await
    .unwrap();
    assert_eq!(result(&r), R::CodeReused);
    // Two steps away is outside the window.
    let r = verify(
        &mut authn,
        &user.id,
        &a.id,
        T::Unspecified,
        &code(&secret, t + 60),
    )
    .await
    .unwrap();
    assert_eq!(result(&r), R::InvalidCode);
    assert!(r.user.is_none());

    let events = app.events_of(&user.id).await;
    assert_eq!(
        types(&events),
        [
            "USER_CREATED",
            "AUTHENTICATOR_ENROLLED",
            "FACTOR_VERIFICATION_FAILED",
            "AUTHENTICATOR_CONFIRMED",
            "FACTOR_VERIFICATION_FAILED",
            "FACTOR_VERIFIED",
            "FACTOR_VERIFICATION_FAILED",
            "FACTOR_VERIFICATION_FAILED",
        ]
    );
    assert_eq!(events[4].1["reason"], "CODE_REUSED");
    assert_eq!(events[7].1["reason"], "INVALID_CODE");
    let all = serde_json::to_string(&events.iter().map(|e| &e.1).collect::<Vec<_>>()).unwrap();
    assert!(!all.contains(&r_secret(&secret)));
}

fn r_secret(secret: &[u8]) -> String {
    totp_rs::Secret::new(secret.to_vec().into_boxed_slice()).to_base32()
}

#[tokio::test]
async fn factor_failures_count_toward_the_password_lockout() {
    let app = TestApp::spawn_with(ServerConfig {
        key_cache_ms: 50,
        lockout_threshold: 3,
        ..ServerConfig::default()
    })
    .await;
    let mut users = app.users();
    let mut authn = app.authenticators();
    let user = create_user(&mut users, "lock@example.com").await;
    let (id, secret) = confirmed_totp(&mut authn, &user.id).await;
    let t = mid_step().await;
    let good = code(&secret, t + 30);
    let bad = if good == "000000" { "111111" } else { "000000" };
    for expected in [R::InvalidCode, R::InvalidCode, R::Locked] {
        let r = verify(&mut authn, &user.id, &id, T::Unspecified, bad)
            .await
            .unwrap();
        assert_eq!(result(&r), expected);
    }
    // Locked: even the right code is refused, and so is a password.
    let r = verify(&mut authn, &user.id, &id, T::Unspecified, &good)
        .await
        .unwrap();
    assert_eq!(result(&r), R::Locked);
    assert!(get_user(&app, &user.id).await.locked_until.is_some());
    let events = app.events_of(&user.id).await;
    assert!(types(&events).contains(&"USER_LOCKED_OUT"));
    // Unblocking ends the lock; the right code then works and resets the count.
    users
        .unblock_user(pb::UnblockUserRequest {
            id: user.id.clone(),
        })
        .await
        .unwrap();
    let r = verify(&mut authn, &user.id, &id, T::Unspecified, bad)
        .await
        .unwrap();
    assert_eq!(result(&r), R::InvalidCode);
    let r = verify(&mut authn, &user.id, &id, T::Unspecified, &good)
        .await
        .unwrap();
    assert_eq!(result(&r), R::Ok);
    let uid = Uuid::parse_str(&user.id).unwrap();
    let failed: i32 = app
        .sql_one("SELECT failed_logins FROM users WHERE id = $1", &[&uid])
        .await;
    assert_eq!(failed, 0);
    // Blocked users are refused outright.
    users
        .block_user(pb::BlockUserRequest {
            id: user.id.clone(),
            reason: "fraud".into(),
        })
        .await
        .unwrap();
    let err = verify(&mut authn, &user.id, &id, T::Unspecified, &good)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(reason(&err), "USER_BLOCKED");
}

#[tokio::test]
async fn recovery_codes_work_once_and_a_new_set_replaces_the_old() {
    let app = TestApp::spawn().await;
    let mut users = app.users();
    let mut authn = app.authenticators();
    let user = create_user(&mut users, "rec@example.com").await;
    let first = recovery_codes(&mut authn, &user.id).await;
    assert_eq!(first.codes.len(), 10);
    let distinct: std::collections::HashSet<_> = first.codes.iter().collect();
    assert_eq!(distinct.len(), 10);
    for c in &first.codes {
        assert_eq!(c.len(), 14, "{c}");
        assert_eq!(c.matches('-').count(), 2, "{c}");
    }
    let a = first.authenticator.unwrap();
    assert_eq!(a.r#type, T::RecoveryCodes as i32);
    assert!(a.confirmed && !a.is_default);
    // Stored as hashes only.
    let aid = Uuid::parse_str(&a.id).unwrap();
    let hashes: i64 = app
        .sql_one(
            "SELECT count(*) FROM recovery_codes WHERE authenticator_id = $1",
            &[&aid],
        )
        .await;
    assert_eq!(hashes, 10);
    let dump: String = app
        .sql_one(
            "SELECT string_agg(encode(code_hash, 'escape'), '') FROM recovery_codes",
            &[],
        )
        .await;
    assert!(!first.codes.iter().any(|c| dump.contains(c.as_str())));
    assert!(
        get_user(&app, &user.id)
            .await
            .enrolled_methods
            .contains(&(T::RecoveryCodes as i32))
    );

    let r = verify(&mut authn, &user.id, "", T::RecoveryCodes, &first.codes[0])
        .await
        .unwrap();
    assert_eq!(result(&r), R::Ok);
    let r = verify(&mut authn, &user.id, "", T::RecoveryCodes, &first.codes[0])
        .await
        .unwrap();
    assert_eq!(result(&r), R::CodeReused);
    // Typed sloppily: lower case, no dashes.
    let sloppy = first.codes[1].replace('-', "").to_lowercase();
    let r = verify(&mut authn, &user.id, &a.id, T::Unspecified, &sloppy)
        .await
        .unwrap();
    assert_eq!(result(&r), R::Ok);
    let r = verify(&mut authn, &user.id, "", T::RecoveryCodes, "ZZZZ-ZZZZ-ZZZZ")
        .await
        .unwrap();
    assert_eq!(result(&r), R::InvalidCode);
    // Wrong shape: INVALID_ARGUMENT, not a failed attempt.
    for bad in ["123", "ABCD-EFGH-JKMN-PQRS", "ABCD-EFGH-JK!!"] {
        let err = verify(&mut authn, &user.id, "", T::RecoveryCodes, bad)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad}");
        assert_eq!(violated_fields(&err), ["code"]);
    }

    // Concurrent use of one code: exactly one wins.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut authn = authn.clone();
        let (u, c) = (user.id.clone(), first.codes[2].clone());
        tasks.push(tokio::spawn(async move {
            verify(&mut authn, &u, "", T::RecoveryCodes, &c)
                .await
                .unwrap()
                .result
        }));
    }
    let mut oks = 0;
    for t in tasks {
        let r = t.await.unwrap();
        if r == R::Ok as i32 {
            oks += 1;
        } else {
            assert_eq!(r, R::CodeReused as i32);
        }
    }
    assert_eq!(oks, 1);

    // A new set replaces the old one.
    let second = recovery_codes(&mut authn, &user.id).await;
    let r = verify(&mut authn, &user.id, "", T::RecoveryCodes, &first.codes[3])
        .await
        .unwrap();
    assert_eq!(result(&r), R::InvalidCode);
    let r = verify(&mut authn, &user.id, "", T::RecoveryCodes, &second.codes[3])
        .await
        .unwrap();
    assert_eq!(result(&r), R::Ok);
    let list = list_of(&mut authn, &user.id).await;
    assert_eq!(list.len(), 1);
    let events = app.events_of(&user.id).await;
    let gens: Vec<_> = events
        .iter()
        .filter(|e| e.0 == "RECOVERY_CODES_GENERATED")
        .collect();
    assert_eq!(gens.len(), 2);
    assert_eq!(gens[1].1["replaced"], true);
}

#[tokio::test]
async fn otp_channels_issue_codes_that_void_each_other_and_die_after_five_failures() {
    let app = TestApp::spawn().await;
    let mut users = app.users();
    let mut authn = app.authenticators();
    let user = create_user(&mut users, "otp@example.com").await;
    let enroll = |kind: T| pb::EnrollOtpChannelRequest {
        user_id: user.id.clone(),
        r#type: kind as i32,
        name: String::new(),
    };
    // Unverified email, and no phone at all.
    let err = authn
        .enroll_otp_channel(enroll(T::EmailOtp))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::FailedPrecondition, "CONTACT_NOT_VERIFIED")
    );
    let err = authn
        .enroll_otp_channel(enroll(T::SmsOtp))
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::FailedPrecondition, "NO_CONTACT")
    );
    let err = authn.enroll_otp_channel(enroll(T::Totp)).await.unwrap_err();
    assert_eq!(violated_fields(&err), ["type"]);
    users
        .update_user(pb::UpdateUserRequest {
            user: Some(pb::User {
                id: user.id.clone(),
                email_verified: true,
                ..Default::default()
            }),
            update_mask: mask(&["email_verified"]),
            etag: String::new(),
        })
        .await
        .unwrap();
    let a = authn
        .enroll_otp_channel(enroll(T::EmailOtp))
        .await
        .unwrap()
        .into_inner()
        .authenticator
        .unwrap();
    assert_eq!(a.email, "otp@example.com");
    assert!(a.confirmed && a.is_default);
    let err = authn
        .enroll_otp_channel(enroll(T::EmailOtp))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    assert_eq!(
        get_user(&app, &user.id).await.default_method,
        T::EmailOtp as i32
    );

    let start = |authn: &mut Authenticators| {
        let mut authn = authn.clone();
        let (u, id) = (user.id.clone(), a.id.clone());
        async move {
            authn
                .start_otp_challenge(pb::StartOtpChallengeRequest {
                    user_id: u,
                    authenticator_id: id,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
        }
    };
    let old = start(&mut authn).await;
    assert!(old.code.len() == 6 && old.code.bytes().all(|b| b.is_ascii_digit()));
    let ttl = old.expires_at.unwrap().seconds - now() as i64;
    assert!((590..=601).contains(&ttl), "{ttl}");
    assert_eq!(old.authenticator.unwrap().email, "otp@example.com");
    let new = start(&mut authn).await;
    let aid = Uuid::parse_str(&a.id).unwrap();
    let stored: Vec<u8> = app
        .sql_one(
            "SELECT code_hash FROM otp_challenges WHERE authenticator_id = $1",
            &[&aid],
        )
        .await;
    assert!(!stored.windows(6).any(|w| w == new.code.as_bytes()));
    if old.code != new.code {
        let r = verify(&mut authn, &user.id, &a.id, T::Unspecified, &old.code)
            .await
            .unwrap();
        assert_eq!(result(&r), R::InvalidCode);
    }
    let r = verify(&mut authn, &user.id, "", T::EmailOtp, &new.code)
        .await
        .unwrap();
    assert_eq!(result(&r), R::Ok);
    // Spent.
    let r = verify(&mut authn, &user.id, &a.id, T::Unspecified, &new.code)
        .await
        .unwrap();
    assert_eq!(result(&r), R::Expired);

    // By type, as VerifyFactor takes it: the user's one EMAIL_OTP channel.
    let challenger = authn.clone();
    let by_type = |kind: T| {
        let mut authn = challenger.clone();
        let u = user.id.clone();
        async move {
            authn
                .start_otp_challenge(pb::StartOtpChallengeRequest {
                    user_id: u,
                    r#type: kind as i32,
                    ..Default::default()
                })
                .await
        }
    };
    let t = by_type(T::EmailOtp).await.unwrap().into_inner();
    assert_eq!(t.authenticator.unwrap().id, a.id);
    let r = verify(&mut authn, &user.id, "", T::EmailOtp, &t.code)
        .await
        .unwrap();
    assert_eq!(result(&r), R::Ok);
    let err = by_type(T::SmsOtp).await.unwrap_err();
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::FailedPrecondition, "FACTOR_NOT_ENROLLED")
    );
    for not_a_channel in [T::Totp, T::Unspecified] {
        let err = by_type(not_a_channel).await.unwrap_err();
        assert_eq!(violated_fields(&err), ["type"], "{not_a_channel:?}");
    }

    let c = start(&mut authn).await;
    let wrong = if c.code == "000000" {
        "111111"
    } else {
        "000000"
    };
    for expected in [
        R::InvalidCode,
        R::InvalidCode,
        R::InvalidCode,
        R::InvalidCode,
        R::TooManyAttempts,
    ] {
        let r = verify(&mut authn, &user.id, &a.id, T::Unspecified, wrong)
            .await
            .unwrap();
        assert_eq!(result(&r), expected);
    }
    let r = verify(&mut authn, &user.id, &a.id, T::Unspecified, &c.code)
        .await
        .unwrap();
    assert_eq!(result(&r), R::TooManyAttempts);
    // Wrong shapes.
    for bad in ["12345", "1234567", "12a456"] {
        let err = verify(&mut authn, &user.id, &a.id, T::Unspecified, bad)
            .await
            .unwrap_err();
        assert_eq!(violated_fields(&err), ["code"], "{bad}");
    }
    let events = app.events_of(&user.id).await;
    assert_eq!(
        types(&events)
            .iter()
            .filter(|t| **t == "OTP_CHALLENGE_STARTED")
            .count(),
        4
    );
    let all = serde_json::to_string(&events.iter().map(|e| &e.1).collect::<Vec<_>>()).unwrap();
    assert!(!all.contains(&format!("\"{}\"", c.code)));
}

#[tokio::test]
async fn management_keeps_exactly_one_default_and_merge_moves_factors() {
    let app = TestApp::spawn().await;
    let mut users = app.users();
    let mut authn = app.authenticators();
    let user = create_verified_user(&mut users, "m@example.com").await;
    let (totp_id, _) = confirmed_totp(&mut authn, &user.id).await;
    let email = authn
        .enroll_otp_channel(pb::EnrollOtpChannelRequest {
            user_id: user.id.clone(),
            r#type: T::EmailOtp as i32,
            name: "Inbox".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .authenticator
        .unwrap();
    assert!(!email.is_default);
    let rec = recovery_codes(&mut authn, &user.id)
        .await
        .authenticator
        .unwrap();
    let list = list_of(&mut authn, &user.id).await;
    let ids: Vec<_> = list.iter().map(|a| a.id.as_str()).collect();
    assert_eq!(ids, [totp_id.as_str(), email.id.as_str(), rec.id.as_str()]);
    assert_eq!(list.iter().filter(|a| a.is_default).count(), 1);
    let u = get_user(&app, &user.id).await;
    assert_eq!(
        u.enrolled_methods,
        [T::Totp as i32, T::EmailOtp as i32, T::RecoveryCodes as i32]
    );

    let update = |id: &str, a: pb::Authenticator, paths: &[&str]| pb::UpdateAuthenticatorRequest {
        authenticator: Some(pb::Authenticator {
            id: id.into(),
            user_id: user.id.clone(),
            ..a
        }),
        update_mask: mask(paths),
    };
    let renamed = authn
        .update_authenticator(update(
            &email.id,
            pb::Authenticator {
                name: "Work mail".into(),
                is_default: true,
                ..Default::default()
            },
            &["name", "is_default"],
        ))
        .await
        .unwrap()
        .into_inner()
        .authenticator
        .unwrap();
    assert_eq!(renamed.name, "Work mail");
    assert!(renamed.is_default);
    let totp = authn
        .get_authenticator(pb::GetAuthenticatorRequest {
            user_id: user.id.clone(),
            authenticator_id: totp_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .authenticator
        .unwrap();
    assert!(!totp.is_default);
    assert_eq!(
        get_user(&app, &user.id).await.default_method,
        T::EmailOtp as i32
    );
    // Bad updates: every violation at once; recovery codes cannot be the default.
    let err = authn
        .update_authenticator(update(
            &email.id,
            pb::Authenticator::default(),
            &["is_default", "confirmed"],
        ))
        .await
        .unwrap_err();
    assert_eq!(
        violated_fields(&err),
        ["authenticator.is_default", "update_mask"]
    );
    let err = authn
        .update_authenticator(update(&email.id, pb::Authenticator::default(), &[]))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["update_mask"]);
    let err = authn
        .update_authenticator(update(
            &rec.id,
            pb::Authenticator {
                is_default: true,
                ..Default::default()
            },
            &["is_default"],
        ))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["authenticator.is_default"]);

    // Another user's authenticator id is NOT_FOUND, whatever the call.
    let other = create_user(&mut users, "other@example.com").await;
    let err = authn
        .get_authenticator(pb::GetAuthenticatorRequest {
            user_id: other.id.clone(),
            authenticator_id: totp_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = authn
        .delete_authenticator(pb::DeleteAuthenticatorRequest {
            user_id: other.id.clone(),
            authenticator_id: totp_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = verify(&mut authn, &other.id, &totp_id, T::Unspecified, "123456")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // Deleting the default passes it on to the oldest remaining factor that can be one.
    authn
        .delete_authenticator(pb::DeleteAuthenticatorRequest {
            user_id: user.id.clone(),
            authenticator_id: email.id.clone(),
        })
        .await
        .unwrap();
    assert_eq!(
        get_user(&app, &user.id).await.default_method,
        T::Totp as i32
    );

    // Merge: the secondary's TOTP moves; the primary keeps its default.
    let (other_totp, _) = confirmed_totp(&mut authn, &other.id).await;
    let merged = app
        .identities()
        .merge_users(pb::MergeUsersRequest {
            primary_user_id: user.id.clone(),
            secondary_user_id: other.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(merged.default_method, T::Totp as i32);
    let list = list_of(&mut authn, &user.id).await;
    assert!(
        list.iter()
            .any(|a| a.id == other_totp && a.user_id == user.id && !a.is_default)
    );
    assert_eq!(list.iter().filter(|a| a.is_default).count(), 1);

    let err = authn
        .delete_all_authenticators(pb::DeleteAllAuthenticatorsRequest {
            user_id: user.id.clone(),
            r#type: T::Password as i32,
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["type"]);
    let n = authn
        .delete_all_authenticators(pb::DeleteAllAuthenticatorsRequest {
            user_id: user.id.clone(),
            r#type: T::Totp as i32,
        })
        .await
        .unwrap()
        .into_inner()
        .deleted_count;
    assert_eq!(n, 2);
    let u = get_user(&app, &user.id).await;
    assert_eq!(u.enrolled_methods, [T::RecoveryCodes as i32]);
    assert_eq!(u.default_method, T::Unspecified as i32);
    let n = authn
        .delete_all_authenticators(pb::DeleteAllAuthenticatorsRequest {
            user_id: user.id.clone(),
            r#type: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .deleted_count;
    assert_eq!(n, 1);
    let events = app.events_of(&user.id).await;
    assert_eq!(
        types(&events)
            .iter()
            .filter(|t| **t == "AUTHENTICATOR_DELETED")
            .count(),
        4
    );
    assert!(types(&events).contains(&"AUTHENTICATOR_UPDATED"));
}

#[tokio::test]
async fn factor_requests_are_validated_field_by_field() {
    let app = TestApp::spawn().await;
    let mut authn = app.authenticators();
    let mut users = app.users();
    let user = create_user(&mut users, "v@example.com").await;
    let err = authn
        .verify_factor(pb::VerifyFactorRequest {
            user_id: "nope".into(),
            r#type: T::Passkey as i32,
            code: String::new(),
            ip: "999.1.1.1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&err), ["code", "ip", "type", "user_id"]);
    let err = verify(&mut authn, &user.id, "", T::Totp, "123456")
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), reason(&err).as_str()),
        (Code::FailedPrecondition, "FACTOR_NOT_ENROLLED")
    );
    let err = authn
        .enroll_totp(pb::EnrollTotpRequest {
            user_id: user.id.clone(),
            name: "x".repeat(300),
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["name"]);
    let err = authn
        .confirm_totp(pb::ConfirmTotpRequest {
            user_id: user.id.clone(),
            authenticator_id: "x".into(),
            code: "12".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["authenticator_id", "code"]);
    // An unconfirmed TOTP cannot be used yet.
    let (a, secret) = enroll_totp(&mut authn, &user.id).await;
    let err = verify(
        &mut authn,
        &user.id,
        &a.id,
        T::Unspecified,
        &code(&secret, now()),
    )
    .await
    .unwrap_err();
    assert_eq!(reason(&err), "AUTHENTICATOR_NOT_CONFIRMED");
    // A second enrolment replaces the unconfirmed one.
    enroll_totp(&mut authn, &user.id).await;
    let list = list_of(&mut authn, &user.id).await;
    assert_eq!(list.len(), 1);
    assert_ne!(list[0].id, a.id);
    let err = authn
        .list_authenticators(pb::ListAuthenticatorsRequest {
            user_id: Uuid::now_v7().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn seeds_and_codes_never_reach_logs_or_events() {
    let (logs, _guard) = crate::passwords::capture_logs();
    let app = TestApp::spawn().await;
    let mut users = app.users();
    let mut authn = app.authenticators();
    let user = create_verified_user(&mut users, "quiet@example.com").await;
    let enrolled = authn
        .enroll_totp(pb::EnrollTotpRequest {
            user_id: user.id.clone(),
            name: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let secret = secret_bytes(&enrolled.secret);
    let t = mid_step().await;
    let totp_code = code(&secret, t);
    authn
        .confirm_totp(pb::ConfirmTotpRequest {
            user_id: user.id.clone(),
            authenticator_id: enrolled.authenticator.unwrap().id,
            code: totp_code.clone(),
        })
        .await
        .unwrap();
    let recovery = recovery_codes(&mut authn, &user.id).await.codes;
    verify(&mut authn, &user.id, "", T::RecoveryCodes, &recovery[0])
        .await
        .unwrap();
    let (channel, otp) = email_otp_challenge(&mut authn, &user.id).await;
    verify(&mut authn, &user.id, &channel, T::Unspecified, &otp)
        .await
        .unwrap();

    let events: Vec<String> = {
        let client = app.pool.get().await.unwrap();
        client
            .query("SELECT data::text FROM events", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    let logged = String::from_utf8_lossy(&logs.0.lock().unwrap()).to_string();
    assert!(
        logged.contains("VerifyFactor"),
        "the capture sees the server's logs"
    );
    let mut secrets = vec![
        enrolled.secret.clone(),
        enrolled.otpauth_uri.clone(),
        format!("\"{otp}\""),
        format!("\"{totp_code}\""),
    ];
    secrets.extend(recovery.iter().cloned());
    for text in events.iter().chain([&logged]) {
        for s in &secrets {
            assert!(!text.contains(s.as_str()), "{s:?} leaked in {text}");
        }
    }
}

/// The wait a TOO_MANY_CODES refusal asks for.
fn code_wait(err: &tonic::Status) -> std::time::Duration {
    exhausted_wait(err, "TOO_MANY_CODES")
}

/// The wait a RESOURCE_EXHAUSTED refusal for `why` asks for (its RetryInfo).
fn exhausted_wait(err: &tonic::Status, why: &str) -> std::time::Duration {
    assert_eq!(
        (err.code(), reason(err).as_str()),
        (Code::ResourceExhausted, why),
        "{err:?}"
    );
    crate::harness::details(err)
        .retry_info()
        .and_then(|r| r.retry_delay)
        .expect("RetryInfo")
}

#[tokio::test]
async fn codes_for_a_user_are_limited_per_kind_with_a_gap_and_an_hourly_cap() {
    use std::time::Duration;
    let app = TestApp::spawn_with(ServerConfig {
        key_cache_ms: 50,
        code_resend_secs: 2,
        codes_per_hour: 3,
        metrics_listen: "127.0.0.1:0".into(),
        ..ServerConfig::default()
    })
    .await;
    let mut users = app.users();
    let mut authn = app.authenticators();
    let user = crate::create(
        &mut users,
        pb::User {
            email: "sends@example.com".into(),
            email_verified: true,
            ..Default::default()
        },
    )
    .await;
    let channel = enroll_email_otp(&mut authn, &user.id).await;
    let challenge = || pb::StartOtpChallengeRequest {
        user_id: user.id.clone(),
        r#type: T::EmailOtp as i32,
        ..Default::default()
    };
    let first = authn
        .start_otp_challenge(challenge())
        .await
        .unwrap()
        .into_inner();
    // A resend within the gap is refused and leaves the code sent intact.
    let err = authn.start_otp_challenge(challenge()).await.unwrap_err();
    let wait = code_wait(&err);
    // Whole seconds, rounded up (1 only on a machine slow enough to take a second between).
    assert!(
        wait == Duration::from_secs(2) || wait == Duration::from_secs(1),
        "{wait:?}"
    );
    assert!(
        err.message().contains("email one-time codes"),
        "{}",
        err.message()
    );
    let r = verify(&mut authn, &user.id, &channel.id, T::EmailOtp, &first.code)
        .await
        .unwrap();
    assert_eq!(result(&r), R::Ok);

    // Other kinds of delivery, and other users, have their own allowance.
    users
        .start_contact_verification(pb::StartContactVerificationRequest {
            id: user.id.clone(),
            channel: pb::ContactChannel::Email as i32,
        })
        .await
        .unwrap();
    let reset = |id: &str| pb::CreatePasswordResetTokenRequest {
        login: Some(pb::create_password_reset_token_request::Login::UserId(
            id.into(),
        )),
    };
    authn
        .create_password_reset_token(reset(&user.id))
        .await
        .unwrap();
    let other = create_user(&mut users, "other-sends@example.com").await;
    authn
        .create_password_reset_token(reset(&other.id))
        .await
        .unwrap();
    let err = users
        .start_contact_verification(pb::StartContactVerificationRequest {
            id: user.id.clone(),
            channel: pb::ContactChannel::Email as i32,
        })
        .await
        .unwrap_err();
    code_wait(&err);
    let err = authn
        .create_password_reset_token(reset(&user.id))
        .await
        .unwrap_err();
    assert!(
        err.message().contains("password reset tokens"),
        "{}",
        err.message()
    );

    // Past the gap, two more codes; the fourth within the hour waits for the first to leave.
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(2100)).await;
        authn.start_otp_challenge(challenge()).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let wait = code_wait(&authn.start_otp_challenge(challenge()).await.unwrap_err());
    assert!(
        wait > Duration::from_secs(3570) && wait <= Duration::from_secs(3600),
        "{wait:?}"
    );
    let started = app
        .events_of(&user.id)
        .await
        .iter()
        .filter(|e| e.0 == "OTP_CHALLENGE_STARTED")
        .count();
    assert_eq!(started, 3, "a refused issue records nothing");

    // A project's own policy replaces the server's limits.
    use roster::admin::PolicyChange as C;
    let mut client = app.pool.get().await.unwrap();
    roster::admin::update_policy(
        &mut **client,
        app.project_id,
        roster::admin::PolicyUpdate {
            code_resend_secs: Some(C::Value(0)),
            codes_per_hour: Some(C::Value(0)),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..3 {
        authn.start_otp_challenge(challenge()).await.unwrap();
    }

    // Back on the server's limits: concurrent first issues for a new user count one by one.
    roster::admin::update_policy(
        &mut **client,
        app.project_id,
        roster::admin::PolicyUpdate {
            code_resend_secs: Some(C::ServerDefault),
            codes_per_hour: Some(C::ServerDefault),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let racer = create_user(&mut users, "race-sends@example.com").await;
    let calls = (0..10).map(|_| {
        let mut authn = authn.clone();
        let request = reset(&racer.id);
        async move { authn.create_password_reset_token(request).await }
    });
    let answers = futures_util::future::join_all(calls).await;
    let codes: Vec<Code> = answers
        .iter()
        .map(|a| a.as_ref().map_or_else(|e| e.code(), |_| Code::Ok))
        .collect();
    assert_eq!(
        codes.iter().filter(|c| **c == Code::Ok).count(),
        1,
        "{codes:?}"
    );
    for a in answers.iter().filter_map(|a| a.as_ref().err()) {
        code_wait(a);
    }

    // What was issued, by kind, for the operator's dashboards; refusals are not counted.
    let metrics = app.metrics().await;
    let issued = |kind: &str| {
        metrics
            .get(&format!("roster_codes_issued_total{{kind=\"{kind}\"}}"))
            .copied()
    };
    assert_eq!(issued("email_otp"), Some(6.0), "{metrics:?}");
    assert_eq!(issued("email_verification"), Some(1.0));
    assert_eq!(issued("password_reset"), Some(3.0));
    assert_eq!(issued("sms_otp"), None, "none issued");
}

/// `--sms-per-hour 2`: SMS codes (phone verifications and SMS_OTP challenges) of all the
/// project's users together stop at two an hour, refilling evenly (one every 1,800 s); past
/// it RESOURCE_EXHAUSTED SMS_LIMIT_REACHED with RetryInfo, nothing issued nor recorded, one
/// warning logged; email codes and other projects are not affected; concurrent issues for
/// many users count one by one; a project's own ceiling replaces the server's.
#[tokio::test]
async fn a_projects_sms_stop_at_its_hourly_ceiling() {
    use std::time::Duration;
    let (logs, _guard) = crate::passwords::capture_logs();
    let app = TestApp::spawn_with(ServerConfig {
        sms_per_hour: 2,
        key_cache_ms: 50,
        metrics_listen: "127.0.0.1:0".into(),
        ..ServerConfig::default()
    })
    .await;
    let mut users = app.users();
    let mut authn = app.authenticators();
    let mut n = 0;
    let mut phone_user = |users: &mut crate::harness::Users| {
        n += 1;
        let user = pb::User {
            email: format!("sms{n}@example.com"),
            email_verified: true,
            phone_number: format!("+4477009{n:05}"),
            phone_verified: true,
            ..Default::default()
        };
        let mut users = users.clone();
        async move { crate::create(&mut users, user).await }
    };
    let verify = |id: &str, channel: pb::ContactChannel| pb::StartContactVerificationRequest {
        id: id.into(),
        channel: channel as i32,
    };
    let over = |err: &tonic::Status| exhausted_wait(err, "SMS_LIMIT_REACHED");
    let (a, b, c, d) = (
        phone_user(&mut users).await,
        phone_user(&mut users).await,
        phone_user(&mut users).await,
        phone_user(&mut users).await,
    );
    users
        .start_contact_verification(verify(&a.id, pb::ContactChannel::Phone))
        .await
        .unwrap();
    authn
        .enroll_otp_channel(pb::EnrollOtpChannelRequest {
            user_id: b.id.clone(),
            r#type: T::SmsOtp as i32,
            name: String::new(),
        })
        .await
        .unwrap();
    let sms_challenge = |id: &str| pb::StartOtpChallengeRequest {
        user_id: id.into(),
        r#type: T::SmsOtp as i32,
        ..Default::default()
    };
    authn
        .start_otp_challenge(sms_challenge(&b.id))
        .await
        .unwrap();
    // The third SMS of the hour, for a third user: refused, with the wait for one to refill.
    let err = users
        .start_contact_verification(verify(&c.id, pb::ContactChannel::Phone))
        .await
        .unwrap_err();
    let wait = over(&err);
    assert!(
        wait > Duration::from_secs(1_790) && wait <= Duration::from_secs(1_800),
        "{wait:?}"
    );
    let err = authn
        .start_otp_challenge(sms_challenge(&b.id))
        .await
        .unwrap_err();
    over(&err);
    let events_of_c = app.events_of(&c.id).await;
    assert!(
        !events_of_c
            .iter()
            .any(|e| e.0 == "CONTACT_VERIFICATION_STARTED"),
        "{events_of_c:?}"
    );
    // Email is not SMS; another project has its own budget.
    users
        .start_contact_verification(verify(&c.id, pb::ContactChannel::Email))
        .await
        .unwrap();
    let (_, other) = app.other_project().await;
    let mut theirs = roster::pb::v1::user_service_client::UserServiceClient::with_interceptor(
        app.channel.clone(),
        crate::harness::key(Some(&other)),
    );
    let their_user = phone_user(&mut theirs).await;
    theirs
        .start_contact_verification(verify(&their_user.id, pb::ContactChannel::Phone))
        .await
        .unwrap();

    // Half an hour later one SMS has refilled: one more goes, the next is refused.
    app.sql_one::<i64>(
        "WITH u AS (UPDATE sms_budgets SET at = at - interval '1801 seconds' WHERE project_id = $1
                    RETURNING 1)
         SELECT count(*) FROM u",
        &[&app.project_id],
    )
    .await;
    users
        .start_contact_verification(verify(&c.id, pb::ContactChannel::Phone))
        .await
        .unwrap();
    over(
        &users
            .start_contact_verification(verify(&d.id, pb::ContactChannel::Phone))
            .await
            .unwrap_err(),
    );

    // A project's own ceiling: 0 lifts it; 3, with ten users asking at once, lets three go.
    use roster::admin::PolicyChange as C;
    let ceiling = |v: C| {
        let pool = app.pool.clone();
        let project = app.project_id;
        async move {
            let mut client = pool.get().await.unwrap();
            roster::admin::update_policy(
                &mut **client,
                project,
                roster::admin::PolicyUpdate {
                    sms_per_hour: Some(v),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    ceiling(C::Value(0)).await;
    users
        .start_contact_verification(verify(&d.id, pb::ContactChannel::Phone))
        .await
        .unwrap();
    ceiling(C::Value(3)).await;
    app.sql_one::<i64>(
        "WITH u AS (DELETE FROM sms_budgets WHERE project_id = $1 RETURNING 1)
         SELECT count(*) FROM u",
        &[&app.project_id],
    )
    .await;
    let mut many = Vec::new();
    for _ in 0..10 {
        many.push(phone_user(&mut users).await);
    }
    let calls = many.iter().map(|u| {
        let mut users = users.clone();
        let req = verify(&u.id, pb::ContactChannel::Phone);
        async move { users.start_contact_verification(req).await }
    });
    let answers = futures_util::future::join_all(calls).await;
    assert_eq!(answers.iter().filter(|a| a.is_ok()).count(), 3);
    for err in answers.iter().filter_map(|a| a.as_ref().err()) {
        over(err);
    }

    // The operator sees the SMS sent (refusals not counted) and one warning.
    let metrics = app.metrics().await;
    let issued = |kind: &str| metrics[&format!("roster_codes_issued_total{{kind=\"{kind}\"}}")];
    // a, c, d and three of the ten (the other project's went through the same server).
    assert_eq!(issued("phone_verification"), 7.0);
    assert_eq!(issued("sms_otp"), 1.0);
    // The refusals, by method and reason, for an operator's alert.
    let refused = |method: &str| {
        metrics[&format!(
            "roster_rpc_errors_total{{method=\"/roster.v1.{method}\",reason=\"SMS_LIMIT_REACHED\"}}"
        )]
    };
    assert_eq!(refused("UserService/StartContactVerification"), 9.0);
    assert_eq!(refused("AuthenticatorService/StartOtpChallenge"), 1.0);
    let logged = String::from_utf8_lossy(&logs.0.lock().unwrap()).to_string();
    let warnings = logged
        .lines()
        .filter(|l| l.contains("SMS ceiling (--sms-per-hour) is reached"))
        .count();
    assert_eq!(warnings, 1, "once a minute per project");
}

#[tokio::test]
async fn sms_goes_only_to_the_allowed_prefixes() {
    let app = TestApp::spawn_with(ServerConfig {
        sms_allowed_prefixes: roster::authenticators::sends::SmsPrefixes::parse("+44,+4915")
            .unwrap(),
        key_cache_ms: 50,
        metrics_listen: "127.0.0.1:0".into(),
        ..ServerConfig::default()
    })
    .await;
    let mut users = app.users();
    let mut authn = app.authenticators();
    let with_phone = |email: &str, phone: &str| pb::User {
        email: email.into(),
        email_verified: true,
        phone_number: phone.into(),
        phone_verified: true,
        ..Default::default()
    };
    let far = crate::create(&mut users, with_phone("far@example.com", "+88216001234")).await;
    let near = crate::create(&mut users, with_phone("near@example.com", "+447700900123")).await;
    let verify_phone = |id: &str| pb::StartContactVerificationRequest {
        id: id.into(),
        channel: pb::ContactChannel::Phone as i32,
    };
    let challenge = |id: &str, kind: T| pb::StartOtpChallengeRequest {
        user_id: id.into(),
        r#type: kind as i32,
        ..Default::default()
    };
    let enroll = |id: &str, kind: T| pb::EnrollOtpChannelRequest {
        user_id: id.into(),
        r#type: kind as i32,
        name: String::new(),
    };
    let refused = |err: tonic::Status| {
        assert_eq!(
            (err.code(), reason(&err).as_str()),
            (Code::FailedPrecondition, "SMS_DESTINATION_NOT_ALLOWED")
        );
    };
    // An SMS channel that could never get a code is refused at enrolment.
    refused(
        authn
            .enroll_otp_channel(enroll(&far.id, T::SmsOtp))
            .await
            .unwrap_err(),
    );
    for u in [&far, &near] {
        authn
            .enroll_otp_channel(enroll(&u.id, T::EmailOtp))
            .await
            .unwrap();
    }
    authn
        .enroll_otp_channel(enroll(&near.id, T::SmsOtp))
        .await
        .unwrap();
    // One enrolled before the list (here: through a server without it) gets no code either.
    let mut unlisted =
        roster::pb::v1::authenticator_service_client::AuthenticatorServiceClient::with_interceptor(
            app.another_server(ServerConfig::default()).await,
            crate::harness::key(Some(&app.token)),
        );
    unlisted
        .enroll_otp_channel(enroll(&far.id, T::SmsOtp))
        .await
        .unwrap();
    refused(
        users
            .start_contact_verification(verify_phone(&far.id))
            .await
            .unwrap_err(),
    );
    refused(
        authn
            .start_otp_challenge(challenge(&far.id, T::SmsOtp))
            .await
            .unwrap_err(),
    );
    // Email is not SMS; allowed numbers get their codes.
    authn
        .start_otp_challenge(challenge(&far.id, T::EmailOtp))
        .await
        .unwrap();
    users
        .start_contact_verification(verify_phone(&near.id))
        .await
        .unwrap();
    authn
        .start_otp_challenge(challenge(&near.id, T::SmsOtp))
        .await
        .unwrap();
    let types: Vec<String> = app
        .events_of(&far.id)
        .await
        .into_iter()
        .map(|e| e.0)
        .collect();
    assert!(
        !types.contains(&"CONTACT_VERIFICATION_STARTED".to_string()),
        "{types:?}"
    );
    assert_eq!(
        types
            .iter()
            .filter(|t| *t == "OTP_CHALLENGE_STARTED")
            .count(),
        1,
        "only the email code: {types:?}"
    );
    // The SMS sent, by kind, as the operator's metrics count them (the refused ones not).
    let metrics = app.metrics().await;
    let issued = |kind: &str| metrics[&format!("roster_codes_issued_total{{kind=\"{kind}\"}}")];
    assert_eq!(
        (
            issued("sms_otp"),
            issued("phone_verification"),
            issued("email_otp")
        ),
        (1.0, 1.0, 1.0)
    );
    // A project's own list replaces the server's: empty allows any number; `default` goes back.
    use roster::admin::{PolicyUpdate, SmsPrefixesChange as S};
    let set = |change: S| {
        let pool = app.pool.clone();
        let project = app.project_id;
        async move {
            let mut client = pool.get().await.unwrap();
            roster::admin::update_policy(
                &mut **client,
                project,
                PolicyUpdate {
                    sms_allowed_prefixes: Some(change),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    };
    let before = types.len();
    set(S::Value(
        roster::authenticators::sends::SmsPrefixes::parse("").unwrap(),
    ))
    .await;
    users
        .start_contact_verification(verify_phone(&far.id))
        .await
        .unwrap();
    set(S::ServerDefault).await;
    refused(
        authn
            .start_otp_challenge(challenge(&far.id, T::SmsOtp))
            .await
            .unwrap_err(),
    );
    assert_eq!(app.events_of(&far.id).await.len(), before + 1);
}

/// Credential checks answer results, not errors, so the call counts show none of them
/// failing: `roster_verifications_total{factor,result}` counts each VerifyPassword and
/// VerifyFactor by factor and result (what a dashboard of failed sign-ins needs).
#[tokio::test]
async fn credential_checks_are_counted_by_factor_and_result() {
    let app = TestApp::spawn_with(ServerConfig {
        metrics_listen: "127.0.0.1:0".into(),
        ..ServerConfig::default()
    })
    .await;
    let mut authn = app.authenticators();
    let user = crate::passwords::user_with_password(&app, "counted@example.com").await;
    let sign_in = |password: &str| pb::VerifyPasswordRequest {
        login: Some(pb::verify_password_request::Login::Email(
            "counted@example.com".into(),
        )),
        password: password.into(),
        ..Default::default()
    };
    authn
        .verify_password(sign_in(crate::passwords::PASSWORD))
        .await
        .unwrap();
    for _ in 0..2 {
        authn.verify_password(sign_in("wrong guess")).await.unwrap();
    }
    // An unknown login is a wrong password too.
    let mut nobody = sign_in("wrong guess");
    nobody.login = Some(pb::verify_password_request::Login::Email(
        "nobody@example.com".into(),
    ));
    authn.verify_password(nobody).await.unwrap();
    let (totp, secret) = confirmed_totp(&mut authn, &user.id).await;
    // The next step's code (confirming spent this one's; ±1 step is accepted).
    let t = mid_step().await + 30;
    let r = verify(&mut authn, &user.id, &totp, T::Totp, &code(&secret, t))
        .await
        .unwrap();
    assert_eq!(result(&r), R::Ok);
    let wrong = if code(&secret, t) == "000000" {
        "111111"
    } else {
        "000000"
    };
    let r = verify(&mut authn, &user.id, "", T::Totp, wrong)
        .await
        .unwrap();
    assert_eq!(result(&r), R::InvalidCode);

    let metrics = app.metrics().await;
    let counted = |factor: &str, result: &str| {
        metrics
            .get(&format!(
                "roster_verifications_total{{factor=\"{factor}\",result=\"{result}\"}}"
            ))
            .copied()
    };
    assert_eq!(counted("PASSWORD", "OK"), Some(1.0));
    assert_eq!(counted("PASSWORD", "INVALID_CREDENTIALS"), Some(3.0));
    assert_eq!(counted("TOTP", "OK"), Some(1.0));
    assert_eq!(counted("TOTP", "INVALID_CODE"), Some(1.0));
    assert_eq!(counted("PASSWORD", "LOCKED"), None);
}

/// Enrols the user's (verified) email as an OTP channel.
async fn enroll_email_otp(authn: &mut Authenticators, user: &str) -> pb::Authenticator {
    authn
        .enroll_otp_channel(pb::EnrollOtpChannelRequest {
            user_id: user.into(),
            r#type: T::EmailOtp as i32,
            name: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .authenticator
        .unwrap()
}

/// Enrols the user's (verified) email as an OTP channel and starts a challenge: the
/// channel's id and the code.
async fn email_otp_challenge(authn: &mut Authenticators, user: &str) -> (String, String) {
    let channel = enroll_email_otp(authn, user).await;
    let code = authn
        .start_otp_challenge(pb::StartOtpChallengeRequest {
            user_id: user.into(),
            authenticator_id: channel.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .code;
    (channel.id, code)
}

/// Sends `code` for the authenticator `id` from 8 callers at once: exactly one is OK, every
/// other answer is `loser`.
async fn race_one_code(authn: &Authenticators, user: &str, id: &str, code: &str, loser: R) {
    let calls = (0..8).map(|_| {
        let mut authn = authn.clone();
        async move {
            verify(&mut authn, user, id, T::Unspecified, code)
                .await
                .unwrap()
        }
    });
    let results: Vec<R> = futures_util::future::join_all(calls)
        .await
        .iter()
        .map(result)
        .collect();
    assert_eq!(
        results.iter().filter(|r| **r == R::Ok).count(),
        1,
        "{results:?}"
    );
    assert!(
        results.iter().all(|r| *r == R::Ok || *r == loser),
        "{results:?}"
    );
}

/// One TOTP code, one OTP code and one contact-verification code, each sent by 8 callers at
/// once (a phished code raced against its owner): exactly one call succeeds, the others are
/// told the code was used (TOTP: CODE_REUSED; OTP: EXPIRED, the challenge is spent; contact:
/// not OK), and each success is recorded once.
#[tokio::test]
async fn a_code_sent_by_several_callers_at_once_works_once() {
    let app = TestApp::spawn().await;
    let mut users = app.users();
    let mut authn = app.authenticators();
    let user = create_verified_user(&mut users, "race@example.com").await;

    // TOTP: the next step's code (inside the ±1 window, not used by the confirmation).
    let (totp, secret) = confirmed_totp(&mut authn, &user.id).await;
    let next = code(&secret, mid_step().await + 30);
    race_one_code(&authn, &user.id, &totp, &next, R::CodeReused).await;

    // An email OTP challenge's code.
    let (channel, otp) = email_otp_challenge(&mut authn, &user.id).await;
    race_one_code(&authn, &user.id, &channel, &otp, R::Expired).await;

    // A contact-verification code for a new phone number.
    users
        .update_user(pb::UpdateUserRequest {
            user: Some(pb::User {
                id: user.id.clone(),
                phone_number: "+14155550123".into(),
                ..Default::default()
            }),
            update_mask: mask(&["phone_number"]),
            etag: String::new(),
        })
        .await
        .unwrap();
    let started = users
        .start_contact_verification(pb::StartContactVerificationRequest {
            id: user.id.clone(),
            channel: pb::ContactChannel::Phone as i32,
        })
        .await
        .unwrap()
        .into_inner();
    let calls = (0..8).map(|_| {
        let (mut users, u, c) = (users.clone(), user.id.clone(), started.code.clone());
        async move {
            users
                .confirm_contact_verification(pb::ConfirmContactVerificationRequest {
                    id: u,
                    channel: pb::ContactChannel::Phone as i32,
                    code: c,
                })
                .await
                .unwrap()
                .into_inner()
                .result
        }
    });
    let results = futures_util::future::join_all(calls).await;
    let ok = pb::ContactVerificationResult::Ok as i32;
    assert_eq!(
        results.iter().filter(|r| **r == ok).count(),
        1,
        "{results:?}"
    );
    assert!(get_user(&app, &user.id).await.phone_verified);

    // Each success recorded once.
    let events = app
        .project_events(&["FACTOR_VERIFIED", "CONTACT_VERIFIED"])
        .await;
    let names: Vec<&str> = events.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(
        names,
        ["FACTOR_VERIFIED", "FACTOR_VERIFIED", "CONTACT_VERIFIED"]
    );
}

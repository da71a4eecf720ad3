//! AuthenticatorService passwords: set, change, expire, verify (every result, lockout, rehash
//! of legacy hashes), reset tokens; and that no secret leaves the service.
use std::time::{Duration, Instant};

use roster::config::ServerConfig;
use tonic::Code;
use uuid::Uuid;

use crate::harness::{Authenticators, TestApp, reason, violated_fields};
use crate::{create_user, pb, user_with_email};

use crate::get;
use pb::VerifyPasswordResult as R;
use pb::verify_password_request::Login;

pub const PASSWORD: &str = "correct horse battery staple";

/// The password every legacy fixture hash below was made from.
pub const LEGACY_PASSWORD: &str = "legacy password 1";

/// Known hashes of `LEGACY_PASSWORD`, with the algorithm name their upgrade event gives: PHC
/// and bcrypt ones made by the reference crates (argon2, pbkdf2, scrypt, bcrypt) and checked
/// independently with Python's argon2-cffi, bcrypt and hashlib; the frameworks' ones below.
pub const LEGACY_HASHES: &[(&str, &str)] = &[
    (
        "argon2id",
        // Weaker than the current parameters (m=4096, t=1): upgraded like a legacy format.
        "$argon2id$v=19$m=4096,t=1,p=1$cm9zdGVyLWZpeHR1cmUtc2FsdA$ofXGEmfS3J4FGek5tGGqnH+36jXUZTjD7SOZ9ptg79U",
    ),
    (
        "argon2i",
        "$argon2i$v=19$m=8192,t=2,p=1$cm9zdGVyLWZpeHR1cmUtc2FsdA$NxcmrVvXp7kpM0nxOjIbcL4AklY2rx7DCvYqERAkpaM",
    ),
    (
        "argon2d",
        "$argon2d$v=19$m=8192,t=2,p=1$cm9zdGVyLWZpeHR1cmUtc2FsdA$LxaBfuMvRT3nBy69vEpqGvygCarbgfuCRLSWvNo0GGs",
    ),
    (
        "pbkdf2-sha256",
        "$pbkdf2-sha256$i=10000,l=32$cm9zdGVyLWZpeHR1cmUtc2FsdA$0eTh98cQukJfJywAmG0zTSii/vK62ORKvEfYXR+NM+4",
    ),
    (
        "pbkdf2-sha512",
        "$pbkdf2-sha512$i=10000,l=64$cm9zdGVyLWZpeHR1cmUtc2FsdA$dpFQF4wAr9MN8iTevjvU6liMzW5C/yYU8122B5V+SKqoStQa62Lsm+EkiE1Y5/nm8rHwWCoegPIJmkY0SbZsVQ",
    ),
    (
        "scrypt",
        "$scrypt$ln=10,r=8,p=1$cm9zdGVyLWZpeHR1cmUtc2FsdA$ly39Byjh1alWA0zXTETO+sZH91tCTx6skWCbtz5IfV4",
    ),
    (
        "bcrypt",
        "$2b$06$ak7xbETwJUXncFPzakSfGOhYLQ0XwO60H/0gyPM.iWJiovVXU9YK2",
    ),
    (
        "bcrypt",
        "$2a$06$ak7xbETwJUXncFPzakSfGOhYLQ0XwO60H/0gyPM.iWJiovVXU9YK2",
    ),
    (
        "bcrypt",
        "$2y$06$ak7xbETwJUXncFPzakSfGOhYLQ0XwO60H/0gyPM.iWJiovVXU9YK2",
    ),
    // The frameworks' encodings, made the way Django and Werkzeug make them (Python's
    // hashlib, bcrypt and argon2-cffi) and SHA-crypt by glibc's crypt(3).
    (
        "pbkdf2-sha256",
        "pbkdf2_sha256$10000$cm9zdGVyZml4dHVyZXNhbHQ$oAYrzfyuPoi+SvRaXjJ4joM0+SKgl6/evx19IAj8Wp4=",
    ),
    (
        "argon2id",
        "argon2$argon2id$v=19$m=4096,t=1,p=2$G5rbiKysyvkcP2NVcMIsHg$mHIOOYTCROahxKIzs/oyIp9KfSE7TvhDqQvwoNJyjIQ",
    ),
    (
        "bcrypt",
        "bcrypt$$2b$06$ZvF5Q4E4lyR.siVPcqIg1uFSbQV07jepJ84dVef7z6gbTzEx/zHPq",
    ),
    (
        "bcrypt-sha256",
        "bcrypt_sha256$$2b$06$4LdUsekbVY2PQ/BpwdvV6.8AnFK4rbouI0S6GuKM8kvixsouAMzuS",
    ),
    (
        "pbkdf2-sha256",
        "pbkdf2:sha256:10000$rosterfixture16c$931b959a5718874655f9af4cb79e0d769e067056f5d6a050ef419fe88c399b79",
    ),
    (
        "pbkdf2-sha512",
        "pbkdf2:sha512:10000$rosterfixture16c$d44ac05c2915336ea58a61cc41ff099df7c471e0bef54578ce754016c61ddab5c5c555aa9b7ae0b26cdda80373867f4aa20b242b7b35d899b44cb3697d214226",
    ),
    (
        "scrypt",
        "scrypt:1024:8:1$rosterfixture16c$a2a44d922740c0a52eb0a21b48778bc83a97ee3081cea83cdba382d2f3d2233e52004b8207ae8eb9b01dea361bf6d9cb670052c2fd8cc1cb7a3fe6ec4b67aeba",
    ),
    (
        "sha512-crypt",
        "$6$rosterfixture16$SAXZV.jQqHiUOCN5nIkh6ULhGxxmKzQbbVwHegakueTi4LVCMNVMDmVn0a1aXYx4gngypKpSXffiFAoaK5Lqu1",
    ),
    (
        "sha512-crypt",
        "$6$rounds=10000$rosterfixture16$zHds6jenH9HqnLCeIi7oExqGm4X6DZX38ZduOJeGVXRY5oyJCC/IUfYEsDwhhsrC9yXQ4PUqBo8m039aMRIVZ.",
    ),
    (
        "sha256-crypt",
        "$5$rounds=10000$rosterfixture16$EMjqjPPlHzfZSw3KokgiVD5/ZQGcwyKUmiS4ZahKPn2",
    ),
    (
        "sha256-crypt",
        "$5$shortsalt$tbV72LRiilfZaiW2B1X4KtI9oC.625XCIGLb5LQ2XU1",
    ),
    (
        // PBKDF2-HMAC-SHA1, the older default of Keycloak (`pbkdf2`, here a 16-byte salt and
        // 64-byte key as it writes them, in PHC form), Werkzeug and Django; Python's hashlib.
        "pbkdf2-sha1",
        "$pbkdf2$i=20000,l=64$a2V5Y2xvYWstc2FsdC0xNg$qfkoHjux8mAB/ZPVjw/yvx6TaXJuU9HbT3DYKrFIO8xIjfQRCWWoqC0FVPYVlCr1lCtne0I+JYj+RkEIswO8cA",
    ),
    (
        "pbkdf2-sha1",
        "pbkdf2:sha1:10000$rosterfixture16c$d77a7decd60d8c3d1a0c75165c09ed7890cccf50",
    ),
    (
        "pbkdf2-sha1",
        "pbkdf2_sha1$10000$cm9zdGVyZml4dHVyZXNhbHQ$/oWvuzD2PUF7FV8msQicE/JG0YA=",
    ),
    // passlib's pbkdf2_sha256/sha512/sha1 (Python apps, ZITADEL's passwap): its own base64
    // (`.` for `+`), made and checked by passlib 1.7.
    (
        "pbkdf2-sha256",
        "$pbkdf2-sha256$10000$cm9zdGVyLWZpeHR1cmUrPz4$pXWV8WPY6HQXq61M.08xggVkTQS4Ut5pJLWdi9o2gss",
    ),
    (
        "pbkdf2-sha512",
        "$pbkdf2-sha512$10000$cm9zdGVyLWZpeHR1cmUrPz4$mrxJTCSmAboq/yqB0sRP5rOt9VEvblVWPMouUJ0PKjkllbDYL6NZbHRsKRl0NvK/H3yj0ye9LjoAx6CmOgeuNg",
    ),
    (
        "pbkdf2-sha1",
        "$pbkdf2$10000$cm9zdGVyLWZpeHR1cmUrPz4$cVz3YUyWsBVQyVlwIE1unwdrkO0",
    ),
    (
        // Firebase's modified scrypt with its usual parameters (mem_cost 14, rounds 8, salt
        // separator 0x07) and a 64-byte signer key, made with Python's hashlib.scrypt and
        // cryptography's AES-CTR (which reproduce Ory Kratos's published Firebase vector).
        "firebase-scrypt",
        "$firescrypt$ln=14,r=8,p=1$cm9zdGVyZml4dHVyZQ==$95LE+hYrEG6090iK98DQ/6CQl2WJMtryPz0LuN8iRFtPCcNCnmSPKmPbkvmOzbIXKWNp9J1xkdwIOJ0PILmbKA==$Bw==$cm9zdGVyLWZpeHR1cmUtc2lnbmVyLWtleS1ra2tra2tra2tra2tra2tra2tra2tra2tra2tra2tra2tra2traw==",
    ),
];

/// Creates a user with an email, a username, a phone number and `PASSWORD`.
pub async fn user_with_password(app: &TestApp, email: &str) -> pb::User {
    let local = email.split('@').next().unwrap_or(email);
    app.users()
        .create_user(pb::CreateUserRequest {
            user: Some(pb::User {
                email: email.into(),
                username: format!("{local}_name"),
                ..Default::default()
            }),
            initial_password: Some(pb::create_user_request::InitialPassword::Password(
                PASSWORD.into(),
            )),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap()
}

async fn verify(
    a: &mut Authenticators,
    login: Login,
    password: &str,
) -> pb::VerifyPasswordResponse {
    a.verify_password(pb::VerifyPasswordRequest {
        login: Some(login),
        password: password.into(),
        ip: "203.0.113.7".into(),
        user_agent: "Mozilla/5.0 (test)".into(),
    })
    .await
    .unwrap()
    .into_inner()
}

fn result(r: &pb::VerifyPasswordResponse) -> R {
    R::try_from(r.result).unwrap()
}

fn email(e: &str) -> Login {
    Login::Email(e.into())
}

/// A user with `email` whose password is given as `hash` (an imported or legacy one).
async fn user_with_hash(users: &mut crate::harness::Users, email: &str, hash: &str) -> pb::User {
    users
        .create_user(pb::CreateUserRequest {
            user: Some(user_with_email(email)),
            initial_password: Some(pb::create_user_request::InitialPassword::PasswordHash(
                hash.into(),
            )),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap()
}

async fn stored_hash(app: &TestApp, id: &str) -> String {
    let id = Uuid::parse_str(id).unwrap();
    app.sql_one("SELECT password_hash FROM users WHERE id = $1", &[&id])
        .await
}

async fn failed_logins(app: &TestApp, id: &str) -> i32 {
    let id = Uuid::parse_str(id).unwrap();
    app.sql_one("SELECT failed_logins FROM users WHERE id = $1", &[&id])
        .await
}

fn types(events: &[(String, serde_json::Value, Option<Uuid>, Option<String>)]) -> Vec<&str> {
    events.iter().map(|e| e.0.as_str()).collect()
}

async fn spawn_with_lockout(threshold: u32, secs: u64) -> TestApp {
    TestApp::spawn_with(ServerConfig {
        key_cache_ms: 50,
        lockout_threshold: threshold,
        lockout_secs: secs,
        ..ServerConfig::default()
    })
    .await
}

#[tokio::test]
async fn verify_password_by_each_login_and_its_bookkeeping() {
    let app = TestApp::spawn().await;
    let mut a = app.authenticators();
    let mut users = app.users();
    let created = users
        .create_user(pb::CreateUserRequest {
            user: Some(pb::User {
                email: "Ada@Example.com".into(),
                username: "ada".into(),
                phone_number: "+14155550123".into(),
                ..Default::default()
            }),
            initial_password: Some(pb::create_user_request::InitialPassword::Password(
                PASSWORD.into(),
            )),
            pending: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert_eq!(created.status, pb::UserStatus::PendingVerification as i32);

    let ok = verify(&mut a, email("ada@EXAMPLE.com"), PASSWORD).await;
    assert_eq!(result(&ok), R::Ok);
    let user = ok.user.unwrap();
    assert_eq!(user.id, created.id);
    assert_eq!(user.login_count, 1);
    assert_eq!(user.last_login_ip, "203.0.113.7");
    assert!(user.last_login_at.is_some());
    // The first successful sign-in activates a pending user.
    assert_eq!(user.status, pb::UserStatus::Active as i32);

    for login in [
        Login::Username("ADA".into()),
        Login::PhoneNumber("+14155550123".into()),
        Login::UserId(created.id.clone()),
    ] {
        let r = verify(&mut a, login.clone(), PASSWORD).await;
        assert_eq!(result(&r), R::Ok, "{login:?}");
    }
    let got = get(&mut users, &created.id).await;
    assert_eq!(got.login_count, 4);

    let evs = app.events_of(&created.id).await;
    let succeeded: Vec<_> = evs.iter().filter(|e| e.0 == "LOGIN_SUCCEEDED").collect();
    assert_eq!(succeeded.len(), 4);
    assert_eq!(succeeded[0].1["activated"], true);
    // The end user's address from the request is what the events record.
    let client = app.pool.get().await.unwrap();
    let ip: Option<String> = client
        .query_one(
            "SELECT ip FROM events WHERE type = 'LOGIN_SUCCEEDED' LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(ip.as_deref(), Some("203.0.113.7"));
}

#[tokio::test]
async fn wrong_and_unknown_logins_are_indistinguishable() {
    let app = TestApp::spawn().await;
    let mut a = app.authenticators();
    let user = user_with_password(&app, "grace@example.com").await;
    let wrong = verify(&mut a, email("grace@example.com"), "not the password").await;
    let unknown = verify(&mut a, email("nobody@example.com"), "not the password").await;
    assert_eq!(wrong, unknown);
    assert_eq!(result(&wrong), R::InvalidCredentials);
    assert!(wrong.user.is_none());

    // A user without a password answers the same.
    let mut users = app.users();
    let social = create_user(&mut users, "social@example.com").await;
    let r = verify(&mut a, Login::UserId(social.id.clone()), PASSWORD).await;
    assert_eq!(r, unknown);
    assert_eq!(failed_logins(&app, &social.id).await, 0);
    assert_eq!(
        types(&app.events_of(&social.id).await),
        ["USER_CREATED", "LOGIN_FAILED"]
    );

    // Each attempt is on the record; the unknown one without a user.
    assert_eq!(
        types(&app.events_of(&user.id).await),
        ["USER_CREATED", "LOGIN_FAILED"]
    );
    let orphans: i64 = app
        .sql_one(
            "SELECT count(*) FROM events WHERE type = 'LOGIN_FAILED' AND user_id IS NULL",
            &[],
        )
        .await;
    assert_eq!(orphans, 1);
}

#[tokio::test]
async fn unknown_login_costs_the_same_time_as_a_wrong_password() {
    let app = TestApp::spawn().await;
    let mut a = app.authenticators();
    user_with_password(&app, "timing@example.com").await;
    // Warm up connections and the hashing pool.
    verify(&mut a, email("timing@example.com"), "warm up guess").await;
    let mut known = Vec::new();
    let mut unknown = Vec::new();
    for i in 0..7 {
        let t = Instant::now();
        let r = verify(
            &mut a,
            email("timing@example.com"),
            &format!("wrong guess {i}"),
        )
        .await;
        known.push(t.elapsed());
        assert_eq!(result(&r), R::InvalidCredentials);
        let t = Instant::now();
        let r = verify(
            &mut a,
            email(&format!("nobody{i}@example.com")),
            "wrong guess",
        )
        .await;
        unknown.push(t.elapsed());
        assert_eq!(result(&r), R::InvalidCredentials);
    }
    known.sort();
    unknown.sort();
    let (k, u) = (known[3].as_secs_f64(), unknown[3].as_secs_f64());
    // Without the dummy hash an unknown login answers in about a millisecond, tens of times
    // faster than an argon2id check; with it the medians are within noise of each other.
    let ratio = u / k;
    assert!(
        (0.6..1.6).contains(&ratio),
        "unknown {u:.4}s vs wrong password {k:.4}s (ratio {ratio:.2})"
    );
}

#[tokio::test]
async fn blocked_and_deactivated_users_get_their_result_whatever_the_password() {
    let app = TestApp::spawn().await;
    let mut a = app.authenticators();
    let mut users = app.users();
    let blocked = user_with_password(&app, "blocked@example.com").await;
    users
        .block_user(pb::BlockUserRequest {
            id: blocked.id.clone(),
            reason: "fraud".into(),
        })
        .await
        .unwrap();
    let deact = user_with_password(&app, "gone@example.com").await;
    users
        .deactivate_user(pb::DeactivateUserRequest {
            id: deact.id.clone(),
        })
        .await
        .unwrap();
    for (login, expected) in [
        ("blocked@example.com", R::Blocked),
        ("gone@example.com", R::Deactivated),
    ] {
        let right = verify(&mut a, email(login), PASSWORD).await;
        let wrong = verify(&mut a, email(login), "wrong password!").await;
        assert_eq!(right, wrong, "{login}");
        assert_eq!(result(&right), expected);
        assert!(right.user.is_none());
    }
    // Refusals are not counted as password failures.
    assert_eq!(failed_logins(&app, &blocked.id).await, 0);
}

/// Waits until a statement on this test's database waits for a lock.
async fn until_a_statement_waits_for_a_lock(app: &TestApp) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let waiting: i64 = app
            .sql_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
                &[],
            )
            .await;
        if waiting > 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no statement came to wait for the lock"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An argon2id hash of `PASSWORD` weaker than the current parameters (so it is upgraded).
fn weak_hash_of_password() -> String {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let params = argon2::Params::new(4096, 1, 1, None).unwrap();
    argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
        .hash_password(
            PASSWORD.as_bytes(),
            &SaltString::encode_b64(b"roster-fixture-salt").unwrap(),
        )
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn what_changes_while_a_right_password_is_checked_decides_the_answer() {
    let app = TestApp::spawn().await;
    // Each change is made in a transaction that the sign-in's write has to wait for, after
    // the sign-in read the user: the write must notice it instead of signing in.
    let weak = weak_hash_of_password();
    let other = LEGACY_HASHES[0].1.to_string();
    struct Case {
        login: &'static str,
        set: &'static str,
        hash: Option<String>,
        expected: R,
        last_event: &'static str,
        reason: Option<&'static str>,
        failures: i32,
    }
    let cases = [
        Case {
            login: "blocked-meanwhile@example.com",
            set: "status = 3, blocked_reason = 'fraud', version = version + 1, updated_at = now()",
            hash: None,
            expected: R::Blocked,
            last_event: "LOGIN_FAILED",
            reason: Some("USER_BLOCKED"),
            failures: 0,
        },
        Case {
            login: "locked-meanwhile@example.com",
            set: "failed_logins = 0, locked_until = now() + interval '1 hour'",
            hash: None,
            expected: R::Locked,
            last_event: "LOGIN_FAILED",
            reason: Some("USER_LOCKED"),
            failures: 0,
        },
        // Failures counted meanwhile do not stop a right password, which clears them.
        Case {
            login: "failed-meanwhile@example.com",
            set: "failed_logins = 3",
            hash: None,
            expected: R::Ok,
            last_event: "LOGIN_SUCCEEDED",
            reason: None,
            failures: 0,
        },
        // A concurrent sign-in's upgrade: another hash of the same password, the same
        // version. Checked again against it: signed in (and that weak hash upgraded).
        Case {
            login: "upgraded-meanwhile@example.com",
            set: "password_hash = $2",
            hash: Some(weak.clone()),
            expected: R::Ok,
            last_event: "LOGIN_SUCCEEDED",
            reason: None,
            failures: 0,
        },
        // Another password meanwhile: the one given is checked against it, and is wrong.
        Case {
            login: "changed-meanwhile@example.com",
            set: "password_hash = $2, version = version + 1, updated_at = now()",
            hash: Some(other),
            expected: R::InvalidCredentials,
            last_event: "LOGIN_FAILED",
            reason: Some("INVALID_CREDENTIALS"),
            failures: 1,
        },
    ];
    for c in cases {
        let login = c.login;
        let user = user_with_password(&app, login).await;
        let id = Uuid::parse_str(&user.id).unwrap();
        let holder = app.pool.get().await.unwrap();
        holder.batch_execute("BEGIN").await.unwrap();
        let sql = format!("UPDATE users SET {} WHERE id = $1", c.set);
        match &c.hash {
            Some(h) => holder.execute(&sql, &[&id, h]).await.unwrap(),
            None => holder.execute(&sql, &[&id]).await.unwrap(),
        };
        let mut a = app.authenticators();
        let call = tokio::spawn(async move { verify(&mut a, email(login), PASSWORD).await });
        until_a_statement_waits_for_a_lock(&app).await;
        holder.batch_execute("COMMIT").await.unwrap();
        let answer = call.await.unwrap();
        assert_eq!(result(&answer), c.expected, "{login}");
        assert_eq!(answer.user.is_some(), c.expected == R::Ok, "{login}");

        let logins: i64 = app
            .sql_one("SELECT login_count FROM users WHERE id = $1", &[&id])
            .await;
        assert_eq!(logins, i64::from(c.expected == R::Ok), "{login}");
        assert_eq!(failed_logins(&app, &user.id).await, c.failures, "{login}");
        let events = app.events_of(&user.id).await;
        let last = events.last().unwrap();
        assert_eq!(last.0, c.last_event, "{login}");
        if let Some(reason) = c.reason {
            assert_eq!(last.1["reason"], reason, "{login}");
        }
        let succeeded = types(&events).contains(&"LOGIN_SUCCEEDED");
        assert_eq!(succeeded, c.expected == R::Ok, "{login}");
        if c.hash.as_deref() == Some(weak.as_str()) {
            assert!(types(&events).contains(&"PASSWORD_REHASHED"), "{events:?}");
            assert!(stored_hash(&app, &user.id).await.contains("m=19456"));
        }
    }
}

#[tokio::test]
async fn expired_and_temporary_passwords_require_a_change() {
    let app = TestApp::spawn().await;
    let mut a = app.authenticators();
    let user = user_with_password(&app, "temp@example.com").await;
    let expired = a
        .expire_password(pb::ExpirePasswordRequest {
            user_id: user.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert!(expired.require_password_change);
    assert_ne!(expired.etag, user.etag);
    // Expiring again changes nothing and records nothing more.
    a.expire_password(pb::ExpirePasswordRequest {
        user_id: user.id.clone(),
    })
    .await
    .unwrap();

    let r = verify(&mut a, email("temp@example.com"), PASSWORD).await;
    assert_eq!(result(&r), R::PasswordChangeRequired);
    assert_eq!(r.change_reason, pb::PasswordChangeReason::Expired as i32);
    let u = r.user.unwrap();
    assert_eq!(u.login_count, 0, "not a completed sign-in");
    // A wrong password still answers INVALID_CREDENTIALS: the result reveals nothing.
    let r = verify(&mut a, email("temp@example.com"), "wrong password!").await;
    assert_eq!(result(&r), R::InvalidCredentials);

    let changed = a
        .change_password(pb::ChangePasswordRequest {
            user_id: user.id.clone(),
            current_password: PASSWORD.into(),
            new_password: "a brand new passphrase".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert!(!changed.require_password_change);
    let r = verify(&mut a, email("temp@example.com"), "a brand new passphrase").await;
    assert_eq!(result(&r), R::Ok);
    assert_eq!(
        r.change_reason,
        pb::PasswordChangeReason::Unspecified as i32
    );

    // SetPassword with require_change makes a temporary password.
    a.set_password(pb::SetPasswordRequest {
        user_id: user.id.clone(),
        new_password: Some(pb::set_password_request::NewPassword::Password(
            "temporary passphrase 42".into(),
        )),
        require_change: true,
    })
    .await
    .unwrap();
    let r = verify(&mut a, email("temp@example.com"), "temporary passphrase 42").await;
    assert_eq!(result(&r), R::PasswordChangeRequired);
    assert_eq!(r.change_reason, pb::PasswordChangeReason::Expired as i32);

    let evs = types(&app.events_of(&user.id).await).join(",");
    assert!(
        evs.contains("PASSWORD_EXPIRED,LOGIN_SUCCEEDED,LOGIN_FAILED,PASSWORD_CHANGED"),
        "{evs}"
    );
    assert_eq!(evs.matches("PASSWORD_EXPIRED").count(), 1);

    // A user without a password cannot have it expired.
    let mut users = app.users();
    let none = create_user(&mut users, "nopass@example.com").await;
    let err = a
        .expire_password(pb::ExpirePasswordRequest { user_id: none.id })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(reason(&err), "NO_PASSWORD");
}

#[tokio::test]
async fn every_legacy_format_verifies_and_is_upgraded_to_argon2id() {
    let app = TestApp::spawn().await;
    let mut a = app.authenticators();
    let mut users = app.users();
    for (i, (format, hash)) in LEGACY_HASHES.iter().enumerate() {
        let mail = format!("legacy{i}@example.com");
        let user = user_with_hash(&mut users, &mail, hash).await;
        // A wrong password neither passes nor touches the stored hash.
        let r = verify(&mut a, email(&mail), "not the legacy one").await;
        assert_eq!(result(&r), R::InvalidCredentials, "{format}");
        assert_eq!(stored_hash(&app, &user.id).await, *hash);

        let r = verify(&mut a, email(&mail), LEGACY_PASSWORD).await;
        assert_eq!(result(&r), R::Ok, "{format} {hash}");
        let upgraded = stored_hash(&app, &user.id).await;
        assert!(
            upgraded.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{format}: {upgraded}"
        );
        let evs = app.events_of(&user.id).await;
        let rehashed: Vec<_> = evs.iter().filter(|e| e.0 == "PASSWORD_REHASHED").collect();
        assert_eq!(rehashed.len(), 1, "{format}");
        assert_eq!(rehashed[0].1["from"], *format);
        assert_eq!(rehashed[0].1["to"], "argon2id");

        // The new hash works, and is current: no second upgrade.
        let r = verify(&mut a, email(&mail), LEGACY_PASSWORD).await;
        assert_eq!(result(&r), R::Ok, "{format} after upgrade");
        assert_eq!(stored_hash(&app, &user.id).await, upgraded);
    }
    let rehashes: i64 = app
        .sql_one(
            "SELECT count(*) FROM events WHERE type = 'PASSWORD_REHASHED'",
            &[],
        )
        .await;
    assert_eq!(rehashes, LEGACY_HASHES.len() as i64);
}

/// `password_format` tells every accepted format apart as its upgrade event names it, so a
/// migration can count the users not yet on argon2id; an upgraded user leaves that count.
#[tokio::test]
async fn the_password_format_filter_names_every_accepted_format() {
    let app = TestApp::spawn().await;
    let mut users = app.users();
    let mut created = Vec::new();
    for (i, (_, hash)) in LEGACY_HASHES.iter().enumerate() {
        created.push(user_with_hash(&mut users, &format!("format{i}@example.com"), hash).await);
    }
    user_with_password(&app, "current@example.com").await;
    create_user(&mut users, "nopassword@example.com").await;
    let count = |filter: String| {
        let mut users = users.clone();
        async move {
            users
                .list_users(pb::ListUsersRequest {
                    filter,
                    show_total_size: true,
                    page_size: 1,
                    ..Default::default()
                })
                .await
                .map(|r| i64::from(r.into_inner().total_size))
        }
    };
    for name in roster::crypto::formats::FORMAT_NAMES {
        let fixtures = LEGACY_HASHES.iter().filter(|(n, _)| n == name).count() as i64;
        let current = i64::from(*name == "argon2id");
        let got = count(format!("password_format = \"{name}\""))
            .await
            .unwrap();
        assert_eq!(got, fixtures + current, "{name}");
    }
    // Weaker argon2id fixtures are argon2id too (upgraded in parameters, not format).
    let not_moved = LEGACY_HASHES
        .iter()
        .filter(|(n, _)| *n != "argon2id")
        .count() as i64;
    assert_eq!(
        count(r#"password_format != "argon2id""#.into())
            .await
            .unwrap(),
        not_moved,
        "users without a password are in neither"
    );
    // A sign-in upgrades a sha512-crypt user: one fewer not on argon2id.
    let (i, _) = LEGACY_HASHES
        .iter()
        .enumerate()
        .find(|(_, (n, _))| *n == "sha512-crypt")
        .unwrap();
    let mut a = app.authenticators();
    let r = verify(&mut a, email(&created[i].email), LEGACY_PASSWORD).await;
    assert_eq!(result(&r), R::Ok);
    assert_eq!(
        count(r#"password_format != "argon2id""#.into())
            .await
            .unwrap(),
        not_moved - 1
    );
    let err = count(r#"password_format = "md5""#.into())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn hashes_with_costs_beyond_the_bounds_are_refused() {
    let app = TestApp::spawn().await;
    let mut a = app.authenticators();
    let mut users = app.users();
    let user = create_user(&mut users, "costly@example.com").await;
    for hash in [
        "$2b$20$ak7xbETwJUXncFPzakSfGOhYLQ0XwO60H/0gyPM.iWJiovVXU9YK2",
        "$argon2id$v=19$m=2097152,t=2,p=1$cm9zdGVyLWZpeHR1cmUtc2FsdA$ofXGEmfS3J4FGek5tGGqnH+36jXUZTjD7SOZ9ptg79U",
        "$scrypt$ln=24,r=8,p=1$cm9zdGVyLWZpeHR1cmUtc2FsdA$ly39Byjh1alWA0zXTETO+sZH91tCTx6skWCbtz5IfV4",
        "$6$rounds=900000000$rosterfixture16$zHds6jenH9HqnLCeIi7oExqGm4X6DZX38ZduOJeGVXRY5oyJCC/IUfYEsDwhhsrC9yXQ4PUqBo8m039aMRIVZ.",
        "scrypt:1048576:8:1$rosterfixture16c$931b959a5718874655f9af4cb79e0d769e067056f5d6a050ef419fe88c399b79",
        "pbkdf2:sha256$rosterfixture16c$931b959a5718874655f9af4cb79e0d769e067056f5d6a050ef419fe88c399b79",
        "$firescrypt$ln=20,r=8,p=1$cm9zdGVyZml4dHVyZQ==$95LE+hYrEG6090iK98DQ/6CQl2WJMtryPz0LuN8iRFtPCcNCnmSPKmPbkvmOzbIXKWNp9J1xkdwIOJ0PILmbKA==$Bw==$cm9zdGVyLWZpeHR1cmUtc2lnbmVyLWtleS1ra2tra2tra2tra2tra2tra2tra2tra2tra2tra2tra2tra2traw==",
        "$md5$rounds=5000$salt$hash",
        "5f4dcc3b5aa765d61d8327deb882cf99",
    ] {
        let err = a
            .set_password(pb::SetPasswordRequest {
                user_id: user.id.clone(),
                new_password: Some(pb::set_password_request::NewPassword::PasswordHash(
                    hash.into(),
                )),
                require_change: false,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{hash}");
        assert_eq!(violated_fields(&err), ["password_hash"], "{hash}");
    }
    let err = a
        .set_password(pb::SetPasswordRequest {
            user_id: user.id.clone(),
            new_password: Some(pb::set_password_request::NewPassword::PasswordHash(
                "$md5$x$y".into(),
            )),
            require_change: false,
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("bcrypt"), "{}", err.message());
}

#[tokio::test]
async fn current_argon2id_hashes_are_not_rehashed() {
    let app = TestApp::spawn().await;
    let mut a = app.authenticators();
    let user = user_with_password(&app, "current@example.com").await;
    let before = stored_hash(&app, &user.id).await;
    assert!(before.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
    let r = verify(&mut a, email("current@example.com"), PASSWORD).await;
    assert_eq!(result(&r), R::Ok);
    assert_eq!(stored_hash(&app, &user.id).await, before);
    assert!(!types(&app.events_of(&user.id).await).contains(&"PASSWORD_REHASHED"));
}

#[tokio::test]
async fn consecutive_failures_lock_the_account_until_unblocked() {
    let app = spawn_with_lockout(3, 900).await;
    let mut a = app.authenticators();
    let mut users = app.users();
    let user = user_with_password(&app, "locked@example.com").await;
    let login = || email("locked@example.com");

    // A success in between starts the count again.
    for _ in 0..2 {
        assert_eq!(
            result(&verify(&mut a, login(), "wrong one!").await),
            R::InvalidCredentials
        );
    }
    assert_eq!(result(&verify(&mut a, login(), PASSWORD).await), R::Ok);
    assert_eq!(failed_logins(&app, &user.id).await, 0);

    for _ in 0..2 {
        assert_eq!(
            result(&verify(&mut a, login(), "wrong one!").await),
            R::InvalidCredentials
        );
    }
    let third = verify(&mut a, login(), "wrong one!").await;
    assert_eq!(result(&third), R::Locked);
    let until = third.locked_until.expect("locked_until on LOCKED");
    let now = chrono::Utc::now().timestamp();
    assert!(
        (now + 890..=now + 910).contains(&until.seconds),
        "{until:?}"
    );

    // While locked even the right password is refused, and nothing more is counted.
    let r = verify(&mut a, login(), PASSWORD).await;
    assert_eq!(result(&r), R::Locked);
    assert!(r.user.is_none());
    let got = get(&mut users, &user.id).await;
    assert_eq!(got.locked_until.map(|t| t.seconds), Some(until.seconds));

    let evs = app.events_of(&user.id).await;
    let t = types(&evs);
    // Five wrong passwords and one attempt refused while locked.
    let failed: Vec<_> = evs.iter().filter(|e| e.0 == "LOGIN_FAILED").collect();
    assert_eq!(failed.len(), 6, "{t:?}");
    assert_eq!(failed[5].1["reason"], "USER_LOCKED");
    let locked: Vec<_> = evs.iter().filter(|e| e.0 == "USER_LOCKED_OUT").collect();
    assert_eq!(locked.len(), 1);
    assert_eq!(locked[0].1["consecutive_failures"], 3);

    // UnblockUser clears the lock.
    users
        .unblock_user(pb::UnblockUserRequest {
            id: user.id.clone(),
        })
        .await
        .unwrap();
    assert_eq!(result(&verify(&mut a, login(), PASSWORD).await), R::Ok);
}

#[tokio::test]
async fn a_lock_ends_by_itself() {
    let app = spawn_with_lockout(2, 1).await;
    let mut a = app.authenticators();
    user_with_password(&app, "brief@example.com").await;
    let login = || email("brief@example.com");
    verify(&mut a, login(), "wrong one!").await;
    assert_eq!(
        result(&verify(&mut a, login(), "wrong one!").await),
        R::Locked
    );
    assert_eq!(result(&verify(&mut a, login(), PASSWORD).await), R::Locked);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(result(&verify(&mut a, login(), PASSWORD).await), R::Ok);
}

#[tokio::test]
async fn parallel_wrong_attempts_are_all_counted() {
    let app = spawn_with_lockout(10, 900).await;
    let user = user_with_password(&app, "race@example.com").await;
    let attempts = (0..8).map(|i| {
        let mut a = app.authenticators();
        async move {
            verify(
                &mut a,
                email("race@example.com"),
                &format!("guess number {i}"),
            )
            .await
        }
    });
    let results = futures_util::future::join_all(attempts).await;
    assert!(results.iter().all(|r| result(r) == R::InvalidCredentials));
    assert_eq!(failed_logins(&app, &user.id).await, 8);

    // Two more at once: exactly the tenth locks.
    let attempts = (0..2).map(|i| {
        let mut a = app.authenticators();
        async move {
            verify(
                &mut a,
                email("race@example.com"),
                &format!("last guess {i}"),
            )
            .await
        }
    });
    let results: Vec<R> = futures_util::future::join_all(attempts)
        .await
        .iter()
        .map(result)
        .collect();
    assert!(results.contains(&R::Locked), "{results:?}");
    let lockouts: i64 = app
        .sql_one(
            "SELECT count(*) FROM events WHERE type = 'USER_LOCKED_OUT'",
            &[],
        )
        .await;
    assert_eq!(lockouts, 1);
}

#[tokio::test]
async fn set_password_checks_the_policy_and_records_no_secret() {
    let app = TestApp::spawn().await;
    let mut a = app.authenticators();
    let mut users = app.users();
    let user = users
        .create_user(pb::CreateUserRequest {
            user: Some(pb::User {
                email: "policy.person@example.com".into(),
                username: "policy_person".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert!(!user.has_password);
    let set = |p: &str| pb::SetPasswordRequest {
        user_id: user.id.clone(),
        new_password: Some(pb::set_password_request::NewPassword::Password(p.into())),
        require_change: false,
    };
    for (bad, says) in [
        ("short", "at least 8"),
        ("password123", "common"),
        ("Baseball1", "common"),
        ("policy.person@example.com", "own"),
        ("POLICY_PERSON", "own"),
    ] {
        let err = a.set_password(set(bad)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad}");
        assert_eq!(violated_fields(&err), ["password"], "{bad}");
        assert!(err.message().contains(says), "{bad}: {}", err.message());
    }
    let long = "ü".repeat(1025);
    let err = a.set_password(set(&long)).await.unwrap_err();
    assert!(err.message().contains("at most 1024"));

    let updated = a
        .set_password(set(PASSWORD))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert!(updated.has_password);
    assert!(updated.password_changed_at.is_some());
    assert_eq!(
        updated.enrolled_methods,
        [pb::AuthenticatorType::Password as i32]
    );
    let evs = app.events_of(&user.id).await;
    let set_ev = evs.iter().find(|e| e.0 == "PASSWORD_SET").unwrap();
    assert_eq!(set_ev.1["format"], "argon2id");
    assert_eq!(set_ev.1["require_change"], false);

    // An unknown user and a malformed id.
    let err = a
        .set_password(pb::SetPasswordRequest {
            user_id: Uuid::now_v7().to_string(),
            ..set(PASSWORD)
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = a
        .set_password(pb::SetPasswordRequest {
            user_id: "not-a-uuid".into(),
            new_password: None,
            require_change: false,
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["password", "user_id"]);

    // CreateUser applies the same policy.
    let err = users
        .create_user(pb::CreateUserRequest {
            user: Some(user_with_email("new.person@example.com")),
            initial_password: Some(pb::create_user_request::InitialPassword::Password(
                "new.person@example.com".into(),
            )),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["password"]);
}

#[tokio::test]
async fn change_password_checks_the_current_one_and_counts_failures() {
    let app = spawn_with_lockout(2, 900).await;
    let mut a = app.authenticators();
    let user = user_with_password(&app, "changer@example.com").await;
    let change = |current: &str, new: &str| pb::ChangePasswordRequest {
        user_id: user.id.clone(),
        current_password: current.into(),
        new_password: new.into(),
    };
    let err = a
        .change_password(change(PASSWORD, PASSWORD))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["new_password"]);
    let err = a.change_password(change("", "12345678")).await.unwrap_err();
    assert_eq!(violated_fields(&err), ["current_password", "new_password"]);

    let err = a
        .change_password(change("not my password", "another passphrase"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&err), ["current_password"]);
    assert_eq!(failed_logins(&app, &user.id).await, 1);
    let evs = app.events_of(&user.id).await;
    let failed = evs.iter().find(|e| e.0 == "LOGIN_FAILED").unwrap();
    assert_eq!(failed.1["via"], "ChangePassword");

    let ok = a
        .change_password(change(PASSWORD, "another passphrase"))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert!(ok.has_password);
    assert_eq!(failed_logins(&app, &user.id).await, 0);
    let r = verify(&mut a, email("changer@example.com"), PASSWORD).await;
    assert_eq!(
        result(&r),
        R::InvalidCredentials,
        "the old password is gone"
    );
    let r = verify(&mut a, email("changer@example.com"), "another passphrase").await;
    assert_eq!(result(&r), R::Ok);

    // Two wrong current passwords lock the account like two wrong sign-ins.
    for _ in 0..2 {
        let _ = a
            .change_password(change("wrong again", "third passphrase"))
            .await;
    }
    let err = a
        .change_password(change("another passphrase", "third passphrase"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(reason(&err), "USER_LOCKED");

    let mut users = app.users();
    let none = create_user(&mut users, "nopassword@example.com").await;
    let err = a
        .change_password(pb::ChangePasswordRequest {
            user_id: none.id,
            current_password: "whatever it is".into(),
            new_password: "another passphrase".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "NO_PASSWORD");
}

#[tokio::test]
async fn reset_tokens_work_once_expire_and_void_the_others() {
    let app = spawn_with_lockout(1, 900).await;
    let mut a = app.authenticators();
    let user = user_with_password(&app, "reset@example.com").await;
    let token_for = |login| pb::CreatePasswordResetTokenRequest { login: Some(login) };
    use pb::create_password_reset_token_request::Login as TL;

    let first = a
        .create_password_reset_token(token_for(TL::Email("RESET@example.com".into())))
        .await
        .unwrap()
        .into_inner();
    assert!(first.token.starts_with("prt_"));
    let expires = first.expires_at.unwrap().seconds - chrono::Utc::now().timestamp();
    assert!((1790..=1800).contains(&expires), "{expires}");
    let second = a
        .create_password_reset_token(token_for(TL::UserId(user.id.clone())))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(first.token, second.token);
    // An email no user could have is the caller's mistake, said as such.
    let err = a
        .create_password_reset_token(token_for(TL::Email("reset at example.com".into())))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&err), ["email"]);

    // Only a hash is stored.
    let stored: i64 = app
        .sql_one(
            "SELECT count(*) FROM password_reset_tokens WHERE position($1 in encode(token_hash, 'escape')) > 0",
            &[&first.token],
        )
        .await;
    assert_eq!(stored, 0);

    // Lock the account; a reset also ends the lock.
    let r = verify(&mut a, email("reset@example.com"), "wrong password!").await;
    assert_eq!(result(&r), R::Locked);

    let reset = |token: &str, p: &str| pb::ResetPasswordRequest {
        token: token.into(),
        new_password: p.into(),
    };
    let err = a
        .reset_password(reset(&first.token, "password1"))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["new_password"]);
    let done = a
        .reset_password(reset(&first.token, "fresh start passphrase"))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    assert!(done.locked_until.is_none());
    let r = verify(&mut a, email("reset@example.com"), "fresh start passphrase").await;
    assert_eq!(result(&r), R::Ok);

    // Used once; the other token was voided by the reset.
    for t in [&first.token, &second.token] {
        let err = a
            .reset_password(reset(t, "yet another passphrase"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(violated_fields(&err), ["token"]);
        assert!(err.message().contains("unknown or was already used"));
    }

    // Expiry.
    let third = a
        .create_password_reset_token(token_for(TL::UserId(user.id.clone())))
        .await
        .unwrap()
        .into_inner();
    app.pool
        .get()
        .await
        .unwrap()
        .execute(
            "UPDATE password_reset_tokens SET expires_at = now() - interval '1 second'",
            &[],
        )
        .await
        .unwrap();
    let err = a
        .reset_password(reset(&third.token, "yet another passphrase"))
        .await
        .unwrap_err();
    assert!(err.message().contains("expired"), "{}", err.message());

    // Malformed tokens and unknown users.
    let err = a
        .reset_password(reset("rst_not_a_reset_token", "yet another passphrase"))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["token"]);
    let err = a
        .create_password_reset_token(token_for(TL::Email("nobody@example.com".into())))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    let t = types(&app.events_of(&user.id).await).join(",");
    assert_eq!(t.matches("PASSWORD_RESET_REQUESTED").count(), 3);
    assert_eq!(t.split(',').filter(|t| *t == "PASSWORD_RESET").count(), 1);
}

/// `--password-history 3`: ChangePassword, ResetPassword and SetPassword refuse any of the
/// user's last three passwords (the current one included) with a field violation and write
/// nothing; older ones are allowed again; only two previous hashes are kept. With the
/// default (off) passwords may repeat and no old hash is kept.
#[tokio::test]
async fn password_history_refuses_the_last_passwords() {
    let app = TestApp::spawn_with(ServerConfig {
        password_history: 3,
        ..ServerConfig::default()
    })
    .await;
    let mut a = app.authenticators();
    let user = user_with_password(&app, "history@example.com").await;
    let (b, c, d) = (
        "second passphrase b",
        "third passphrase c",
        "fourth passphrase d",
    );
    let change = |current: &str, new: &str| pb::ChangePasswordRequest {
        user_id: user.id.clone(),
        current_password: current.into(),
        new_password: new.into(),
    };
    let set = |p: &str| pb::SetPasswordRequest {
        user_id: user.id.clone(),
        new_password: Some(pb::set_password_request::NewPassword::Password(p.into())),
        require_change: false,
    };
    let previous = || async {
        let id = Uuid::parse_str(&user.id).unwrap();
        app.sql_one::<i64>(
            "SELECT count(*) FROM password_history WHERE user_id = $1",
            &[&id],
        )
        .await
    };
    a.change_password(change(PASSWORD, b)).await.unwrap();
    a.change_password(change(b, c)).await.unwrap();

    // Now c (current), b and PASSWORD are the last three.
    // CheckPassword says so when asked to (on submit), and not otherwise (per keystroke).
    let check = |p: &str, check_history: bool| pb::CheckPasswordRequest {
        password: p.into(),
        user_id: user.id.clone(),
        check_history,
        ..Default::default()
    };
    for reused in [PASSWORD, b, c] {
        let r = a
            .check_password(check(reused, true))
            .await
            .unwrap()
            .into_inner();
        assert!(!r.acceptable, "{reused}");
        assert_eq!(
            r.problems,
            ["is one of the user's last 3 passwords; choose another"]
        );
        let r = a
            .check_password(check(reused, false))
            .await
            .unwrap()
            .into_inner();
        assert!(r.acceptable, "{reused} without check_history: {r:?}");
    }
    let r = a.check_password(check(d, true)).await.unwrap().into_inner();
    assert!(r.acceptable && r.problems.is_empty(), "{r:?}");
    let err = a
        .check_password(pb::CheckPasswordRequest {
            password: d.into(),
            check_history: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["check_history"]);
    let events_before = app.events_of(&user.id).await.len();
    let hash_before = stored_hash(&app, &user.id).await;
    let err = a.change_password(change(c, PASSWORD)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&err), ["new_password"]);
    assert!(
        err.message().contains("one of the user's last 3 passwords")
            && !err.message().contains(PASSWORD),
        "{}",
        err.message()
    );
    let err = a.set_password(set(b)).await.unwrap_err();
    assert_eq!(violated_fields(&err), ["password"]);
    let err = a.set_password(set(c)).await.unwrap_err();
    assert_eq!(
        violated_fields(&err),
        ["password"],
        "the current one counts"
    );
    use pb::create_password_reset_token_request::Login as TL;
    let token = a
        .create_password_reset_token(pb::CreatePasswordResetTokenRequest {
            login: Some(TL::UserId(user.id.clone())),
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let reset = |p: &str| pb::ResetPasswordRequest {
        token: token.clone(),
        new_password: p.into(),
    };
    let err = a.reset_password(reset(b)).await.unwrap_err();
    assert_eq!(violated_fields(&err), ["new_password"]);
    assert_eq!(
        stored_hash(&app, &user.id).await,
        hash_before,
        "nothing changed"
    );
    assert_eq!(
        app.events_of(&user.id).await.len(),
        events_before + 1,
        "only the reset request's event"
    );
    // The refused reset left the token usable.
    a.reset_password(reset(d)).await.unwrap();
    assert_eq!(previous().await, 2, "the current one and two before it");

    // d, c and b are the last three: the first password is allowed again.
    a.set_password(set(PASSWORD)).await.unwrap();
    let r = verify(&mut a, email("history@example.com"), PASSWORD).await;
    assert_eq!(result(&r), R::Ok);
    assert_eq!(previous().await, 2);

    // Off (the default): a password may repeat, and no old hash is kept.
    let app = TestApp::spawn().await;
    let mut a = app.authenticators();
    let user = user_with_password(&app, "nohistory@example.com").await;
    for (current, new) in [(PASSWORD, b), (b, PASSWORD)] {
        a.change_password(pb::ChangePasswordRequest {
            user_id: user.id.clone(),
            current_password: current.into(),
            new_password: new.into(),
        })
        .await
        .unwrap();
    }
    let kept: i64 = app
        .sql_one("SELECT count(*) FROM password_history", &[])
        .await;
    assert_eq!(kept, 0);
}

/// `--ip-failure-limit 3` per hour: after three failed sign-ins from one address (wrong
/// passwords or unknown logins, across users), its VerifyPassword calls answer
/// RESOURCE_EXHAUSTED IP_THROTTLED with RetryInfo, even with the right password, without
/// being checked or recorded; other addresses, calls without `ip`, other projects and
/// successful sign-ins are not affected.
#[tokio::test]
async fn failed_sign_ins_from_one_address_are_throttled() {
    let (logs, _guard) = capture_logs();
    let app = TestApp::spawn_with(ServerConfig {
        key_cache_ms: 50,
        ip_failure_limit: 3,
        ip_failure_window_secs: 3_600,
        ip_failure_exempt: roster::config::Exempt(vec!["192.0.2.0/24".parse().unwrap()]),
        ..ServerConfig::default()
    })
    .await;
    let mut a = app.authenticators();
    let ada = user_with_password(&app, "ada@example.com").await;
    user_with_password(&app, "bob@example.com").await;
    let attempt = |login: &str, password: &str, ip: &str| pb::VerifyPasswordRequest {
        login: Some(email(login)),
        password: password.into(),
        ip: ip.into(),
        user_agent: String::new(),
    };
    let sign_in = |a: &mut Authenticators, req| {
        let mut a = a.clone();
        async move { a.verify_password(req).await.map(|r| r.into_inner()) }
    };
    const X: &str = "198.51.100.23";
    const Y: &str = "198.51.100.99";
    // Successful sign-ins cost nothing.
    for _ in 0..5 {
        let r = sign_in(&mut a, attempt("bob@example.com", PASSWORD, X))
            .await
            .unwrap();
        assert_eq!(result(&r), R::Ok);
    }
    for (login, password) in [
        ("ada@example.com", "wrong guess one"),
        ("bob@example.com", "wrong guess two"),
        ("nobody@example.com", "wrong guess three"),
    ] {
        let r = sign_in(&mut a, attempt(login, password, X)).await.unwrap();
        assert_eq!(result(&r), R::InvalidCredentials);
    }
    let events_before = app.events_of(&ada.id).await.len();
    let failed_before = failed_logins(&app, &ada.id).await;
    let err = sign_in(&mut a, attempt("ada@example.com", PASSWORD, X))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(reason(&err), "IP_THROTTLED");
    let wait = crate::harness::details(&err)
        .retry_info()
        .and_then(|r| r.retry_delay)
        .expect("RetryInfo");
    // One failure comes back every 1,200 s.
    assert!(
        wait > Duration::from_secs(1_190) && wait <= Duration::from_secs(1_200),
        "{wait:?}"
    );
    let err = sign_in(&mut a, attempt("ada@example.com", "wrong guess four", X))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "IP_THROTTLED");
    assert_eq!(
        app.events_of(&ada.id).await.len(),
        events_before,
        "nothing recorded"
    );
    assert_eq!(failed_logins(&app, &ada.id).await, failed_before);

    // Not throttled: an exempt range, another address, no address, another project.
    for _ in 0..5 {
        let r = sign_in(
            &mut a,
            attempt("ada@example.com", "wrong again", "192.0.2.9"),
        )
        .await
        .unwrap();
        assert_eq!(result(&r), R::InvalidCredentials);
    }
    // (Six wrong passwords in all: under the account's lockout of ten.)
    let r = sign_in(
        &mut a,
        attempt("ada@example.com", PASSWORD, "198.51.100.24"),
    )
    .await
    .unwrap();
    assert_eq!(result(&r), R::Ok);
    let r = sign_in(&mut a, attempt("ada@example.com", PASSWORD, ""))
        .await
        .unwrap();
    assert_eq!(result(&r), R::Ok);
    let (other_id, other) = app.other_project().await;
    let r = sign_in(
        &mut app.authenticators_with(Some(&other)),
        attempt("ada@example.com", PASSWORD, X),
    )
    .await
    .unwrap();
    assert_eq!(
        result(&r),
        R::InvalidCredentials,
        "no such user there, but checked"
    );

    let logged = String::from_utf8_lossy(&logs.0.lock().unwrap()).to_string();
    let warnings: Vec<&str> = logged
        .lines()
        .filter(|l| l.contains("over --ip-failure-limit"))
        .collect();
    assert_eq!(warnings.len(), 1, "once per address: {warnings:?}");
    assert!(
        warnings[0].contains("WARN") && warnings[0].contains(X),
        "{warnings:?}"
    );

    // A project's own limit: 0 turns it off for this project, 1 on for the other.
    use roster::admin::{PolicyChange as C, PolicyUpdate};
    let mut client = app.pool.get().await.unwrap();
    let limit = |n| PolicyUpdate {
        ip_failure_limit: Some(C::Value(n)),
        ..Default::default()
    };
    roster::admin::update_policy(&mut **client, app.project_id, limit(0))
        .await
        .unwrap();
    roster::admin::update_policy(&mut **client, other_id, limit(1))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = sign_in(&mut a, attempt("ada@example.com", PASSWORD, X))
        .await
        .unwrap();
    assert_eq!(result(&r), R::Ok, "this project no longer throttles");
    let mut theirs = app.authenticators_with(Some(&other));
    let r = sign_in(&mut theirs, attempt("nobody@example.com", "wrong guess", Y))
        .await
        .unwrap();
    assert_eq!(result(&r), R::InvalidCredentials);
    let err = sign_in(&mut theirs, attempt("nobody@example.com", "wrong guess", Y))
        .await
        .unwrap_err();
    assert_eq!(
        reason(&err),
        "IP_THROTTLED",
        "the other project's own limit of one"
    );
}

/// The sign-in throttle's budgets live in PostgreSQL: two servers on one database (two
/// replicas, or a server and its restart) draw on one budget per address, concurrent attempts
/// through both count one by one before any hashing (20 wrong passwords at once, limit 3:
/// exactly 3 checked), a budget refills with time, successful sign-ins leave no row behind,
/// and the purge forgets the addresses that have refilled.
#[tokio::test]
async fn the_sign_in_throttle_is_shared_by_every_replica() {
    let config = || ServerConfig {
        key_cache_ms: 50,
        ip_failure_limit: 3,
        ip_failure_window_secs: 3_600,
        ..ServerConfig::default()
    };
    let app = TestApp::spawn_with(config()).await;
    let mut a = app.authenticators();
    let mut b =
        roster::pb::v1::authenticator_service_client::AuthenticatorServiceClient::with_interceptor(
            app.another_server(config()).await,
            crate::harness::key(Some(&app.token)),
        );
    user_with_password(&app, "ada@example.com").await;
    let attempt = |password: &str, ip: &str| pb::VerifyPasswordRequest {
        login: Some(email("ada@example.com")),
        password: password.into(),
        ip: ip.into(),
        user_agent: String::new(),
    };
    let rows = |ip: &'static str| {
        let app = &app;
        async move {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            app.sql_one::<i64>("SELECT count(*) FROM ip_failures WHERE ip = $1", &[&ip])
                .await
        }
    };
    const X: &str = "198.51.100.23";
    const Y: &str = "198.51.100.24";

    // Successful sign-ins through either server leave nothing behind.
    for _ in 0..2 {
        let r = a.verify_password(attempt(PASSWORD, X)).await.unwrap();
        assert_eq!(result(&r.into_inner()), R::Ok);
        let r = b.verify_password(attempt(PASSWORD, X)).await.unwrap();
        assert_eq!(result(&r.into_inner()), R::Ok);
    }
    assert_eq!(rows(X).await, 0);

    // Two failures through one server and one through the other spend the one budget.
    for client in [&mut a, &mut b] {
        let r = client
            .verify_password(attempt("wrong guess", X))
            .await
            .unwrap();
        assert_eq!(result(&r.into_inner()), R::InvalidCredentials);
    }
    let r = a.verify_password(attempt("wrong guess", X)).await.unwrap();
    assert_eq!(result(&r.into_inner()), R::InvalidCredentials);
    for client in [&mut a, &mut b] {
        let err = client
            .verify_password(attempt(PASSWORD, X))
            .await
            .unwrap_err();
        assert_eq!(reason(&err), "IP_THROTTLED");
    }
    assert_eq!(rows(X).await, 1);

    // A third of the window later (one failure's worth refilled) one more attempt is let
    // through, and the right password signs in and keeps its place.
    app.sql_one::<i64>(
        "WITH u AS (UPDATE ip_failures SET at = at - interval '1201 seconds' RETURNING 1)
         SELECT count(*) FROM u",
        &[],
    )
    .await;
    let r = b.verify_password(attempt(PASSWORD, X)).await.unwrap();
    assert_eq!(result(&r.into_inner()), R::Ok);
    let r = a.verify_password(attempt("wrong guess", X)).await.unwrap();
    assert_eq!(result(&r.into_inner()), R::InvalidCredentials);
    let err = b.verify_password(attempt(PASSWORD, X)).await.unwrap_err();
    assert_eq!(reason(&err), "IP_THROTTLED");

    // 20 wrong passwords at once from a new address, half through each server: 3 are checked.
    let calls = (0..20).map(|i| {
        let mut client = if i % 2 == 0 { a.clone() } else { b.clone() };
        let req = attempt("wrong guess", Y);
        async move { client.verify_password(req).await }
    });
    let outcomes = futures_util::future::join_all(calls).await;
    let checked = outcomes.iter().filter(|o| o.is_ok()).count();
    let throttled = outcomes
        .iter()
        .filter(|o| o.as_ref().is_err_and(|e| reason(e) == "IP_THROTTLED"))
        .count();
    assert_eq!((checked, throttled), (3, 17));

    // The purge forgets addresses untouched for a whole window, and only those.
    app.sql_one::<i64>(
        "WITH u AS (UPDATE ip_failures SET at = now() - interval '3601 seconds'
                    WHERE ip = '198.51.100.23' RETURNING 1)
         SELECT count(*) FROM u",
        &[],
    )
    .await;
    let purged = roster::authenticators::throttle::FailureThrottle::purge(
        &app.pool,
        Duration::from_secs(3_600),
    )
    .await
    .unwrap();
    assert_eq!(purged, 1);
    assert_eq!((rows(X).await, rows(Y).await), (0, 1));
    let r = a.verify_password(attempt(PASSWORD, X)).await.unwrap();
    assert_eq!(
        result(&r.into_inner()),
        R::Ok,
        "forgotten: a full budget again"
    );

    // An attempt given up on while its password is hashed (its deadline passed) gives its
    // failure back: after two failures, a cancelled attempt leaves room for one more.
    const Z: &str = "198.51.100.25";
    for _ in 0..2 {
        let r = a.verify_password(attempt("wrong guess", Z)).await.unwrap();
        assert_eq!(result(&r.into_inner()), R::InvalidCredentials);
    }
    let mut req = tonic::Request::new(attempt("wrong guess", Z));
    req.set_timeout(Duration::from_millis(5));
    let err = a.verify_password(req).await.unwrap_err();
    // (tonic's client reports its own deadline as CANCELLED.)
    assert!(
        matches!(err.code(), Code::Cancelled | Code::DeadlineExceeded),
        "{err:?}"
    );
    let spent = || {
        let app = &app;
        async move {
            let ip: std::net::IpAddr = Z.parse().unwrap();
            app.sql_one::<f64>("SELECT spent FROM ip_failures WHERE ip = $1", &[&ip])
                .await
        }
    };
    let given_up = Instant::now() + Duration::from_secs(5);
    while spent().await > 2.01 {
        assert!(
            Instant::now() < given_up,
            "the cancelled attempt's failure is still spent"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = b.verify_password(attempt("wrong guess", Z)).await.unwrap();
    assert_eq!(result(&r.into_inner()), R::InvalidCredentials);
    let err = b
        .verify_password(attempt("wrong guess", Z))
        .await
        .unwrap_err();
    assert_eq!(reason(&err), "IP_THROTTLED");
}

/// A project's own policy (`roster projects policy`) replaces the server's lockout and
/// password-history settings for that project only, within the key-cache time, and
/// `default` gives the server's back.
#[tokio::test]
async fn a_projects_policy_overrides_the_servers_settings() {
    use roster::admin::PolicyChange as C;
    let app = spawn_with_lockout(10, 900).await;
    let (other_id, other) = app.other_project().await;
    let mut a = app.authenticators();
    let user = user_with_password(&app, "strict@example.com").await;
    let aged = user_with_password(&app, "aged@example.com").await;
    let policy = roster::admin::update_policy(
        &mut **app.pool.get().await.unwrap(),
        app.project_id,
        roster::admin::PolicyUpdate {
            lockout_threshold: Some(C::Value(2)),
            lockout_secs: Some(C::Value(60)),
            password_history: Some(C::Value(1)),
            password_min_length: Some(C::Value(20)),
            password_max_age_days: Some(C::Value(90)),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        policy,
        roster::auth::ProjectPolicy {
            lockout_threshold: Some(2),
            lockout_secs: Some(60),
            password_history: Some(1),
            password_min_length: Some(20),
            password_max_age_days: Some(90),
            ..Default::default()
        }
    );
    tokio::time::sleep(Duration::from_millis(100)).await;

    // A password set 91 days ago must be changed at the next sign-in; 89 days is fine.
    let set_age = |days: i32| {
        let id = Uuid::parse_str(&aged.id).unwrap();
        let pool = app.pool.clone();
        async move {
            pool.get()
                .await
                .unwrap()
                .execute(
                    "UPDATE users SET password_changed_at = now() - make_interval(days => $2)
                     WHERE id = $1",
                    &[&id, &days],
                )
                .await
                .unwrap();
        }
    };
    set_age(89).await;
    let r = verify(&mut a, email("aged@example.com"), PASSWORD).await;
    assert_eq!(result(&r), R::Ok);
    set_age(91).await;
    let r = verify(&mut a, email("aged@example.com"), PASSWORD).await;
    assert_eq!(result(&r), R::PasswordChangeRequired);
    assert_eq!(r.change_reason, pb::PasswordChangeReason::MaxAge as i32);
    let (kind, data, ..) = app.events_of(&aged.id).await.pop().unwrap();
    assert_eq!(kind, "LOGIN_SUCCEEDED");
    assert_eq!(data["password_max_age_days"], 90, "{data}");
    // Changing it (to one of at least 20 characters) ends that.
    let long = "a passphrase of thirty characters";
    let err = a
        .change_password(pb::ChangePasswordRequest {
            user_id: aged.id.clone(),
            current_password: PASSWORD.into(),
            new_password: "nineteen characters".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["new_password"]);
    assert!(err.message().contains("at least 20"), "{}", err.message());
    a.change_password(pb::ChangePasswordRequest {
        user_id: aged.id.clone(),
        current_password: PASSWORD.into(),
        new_password: long.into(),
    })
    .await
    .unwrap();
    let r = verify(&mut a, email("aged@example.com"), long).await;
    assert_eq!(result(&r), R::Ok);
    // The minimum holds at creation too, and passwords set before still work.
    let err = app
        .users()
        .create_user(pb::CreateUserRequest {
            user: Some(user_with_email("short@example.com")),
            initial_password: Some(pb::create_user_request::InitialPassword::Password(
                "short but fine 1".into(),
            )),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["password"]);

    // Two failures lock, for a minute.
    let r = verify(&mut a, email("strict@example.com"), "wrong guess one").await;
    assert_eq!(result(&r), R::InvalidCredentials);
    let r = verify(&mut a, email("strict@example.com"), "wrong guess two").await;
    assert_eq!(result(&r), R::Locked);
    let until = r.locked_until.unwrap().seconds - chrono::Utc::now().timestamp();
    assert!((55..=60).contains(&until), "{until}");
    // The current password may not be set again.
    let err = a
        .set_password(pb::SetPasswordRequest {
            user_id: user.id.clone(),
            new_password: Some(pb::set_password_request::NewPassword::Password(
                PASSWORD.into(),
            )),
            require_change: false,
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["password"]);
    assert!(
        err.message().contains("current password"),
        "{}",
        err.message()
    );

    // The other project keeps the server's ten.
    let mut theirs = app.authenticators_with(Some(&other));
    app.users_with(Some(&other))
        .create_user(pb::CreateUserRequest {
            user: Some(user_with_email("lenient@example.com")),
            initial_password: Some(pb::create_user_request::InitialPassword::Password(
                PASSWORD.into(),
            )),
            ..Default::default()
        })
        .await
        .unwrap();
    for guess in ["wrong guess one", "wrong guess two", "wrong guess three"] {
        let r = verify(&mut theirs, email("lenient@example.com"), guess).await;
        assert_eq!(result(&r), R::InvalidCredentials, "{other_id}");
    }

    // Back to the server's settings.
    roster::admin::update_policy(
        &mut **app.pool.get().await.unwrap(),
        app.project_id,
        roster::admin::PolicyUpdate {
            lockout_threshold: Some(C::ServerDefault),
            password_history: Some(C::ServerDefault),
            password_min_length: Some(C::ServerDefault),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let second = user_with_password(&app, "relaxed@example.com").await;
    for guess in ["wrong guess one", "wrong guess two", "wrong guess three"] {
        let r = verify(&mut a, email("relaxed@example.com"), guess).await;
        assert_eq!(result(&r), R::InvalidCredentials);
    }
    a.set_password(pb::SetPasswordRequest {
        user_id: second.id.clone(),
        new_password: Some(pb::set_password_request::NewPassword::Password(
            PASSWORD.into(),
        )),
        require_change: false,
    })
    .await
    .unwrap();
}

/// CheckPassword says which rules a candidate breaks, in the caller's project, and what the
/// rules are, without writing anything.
#[tokio::test]
async fn check_password_names_every_broken_rule_and_the_policy() {
    let app = spawn_with_lockout(5, 600).await;
    let mut a = app.authenticators();
    let user = user_with_password(&app, "candidate@example.com").await;
    let check = |password: &str, user_id: &str| pb::CheckPasswordRequest {
        password: password.into(),
        user_id: user_id.into(),
        ..Default::default()
    };
    let events_before = app.events_of(&user.id).await.len();
    let r = a
        .check_password(check("a fine long passphrase", ""))
        .await
        .unwrap()
        .into_inner();
    assert!(r.acceptable && r.problems.is_empty(), "{r:?}");
    assert_eq!(
        r.policy,
        Some(pb::PasswordPolicy {
            min_length: 8,
            max_length: 1024,
            history: 0,
            max_age_days: 0,
            lockout_threshold: 5,
            lockout_duration: Some(prost_types::Duration {
                seconds: 600,
                nanos: 0
            }),
        })
    );
    let r = a
        .check_password(check("password", ""))
        .await
        .unwrap()
        .into_inner();
    assert!(!r.acceptable);
    assert_eq!(
        r.problems,
        ["is one of the most common passwords; choose a less guessable one"]
    );
    // With the user: its own username is refused too; every broken rule is named.
    let r = a
        .check_password(check("CANDIDATE_NAME", &user.id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.problems,
        ["must not be the user's own email address, username or phone number"]
    );
    let r = a
        .check_password(check("", &user.id))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.problems, ["must be at least 8 characters"]);
    // A sign-up form's identifiers, before the user exists.
    let r = a
        .check_password(pb::CheckPasswordRequest {
            password: "NEWCOMER.2026".into(),
            email: "newcomer.2026@example.com".into(),
            username: "someone".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.problems,
        ["must not be the user's own email address, username or phone number"]
    );

    // The project's own minimum.
    roster::admin::update_policy(
        &mut **app.pool.get().await.unwrap(),
        app.project_id,
        roster::admin::PolicyUpdate {
            password_min_length: Some(roster::admin::PolicyChange::Value(25)),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = a
        .check_password(check("a fine long passphrase", ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.problems, ["must be at least 25 characters"]);
    assert_eq!(r.policy.unwrap().min_length, 25);

    let err = a
        .check_password(check("whatever it is", &Uuid::now_v7().to_string()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = a
        .check_password(check("whatever it is", "not-a-uuid"))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["user_id"]);
    assert_eq!(
        app.events_of(&user.id).await.len(),
        events_before,
        "nothing recorded"
    );
}

#[tokio::test]
async fn concurrent_uses_of_one_reset_token_exactly_one_wins() {
    let app = TestApp::spawn().await;
    let user = user_with_password(&app, "twice@example.com").await;
    let token = app
        .authenticators()
        .create_password_reset_token(pb::CreatePasswordResetTokenRequest {
            login: Some(pb::create_password_reset_token_request::Login::UserId(
                user.id.clone(),
            )),
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let uses = (0..4).map(|i| {
        let mut a = app.authenticators();
        let token = token.clone();
        async move {
            a.reset_password(pb::ResetPasswordRequest {
                token,
                new_password: format!("racing passphrase {i}"),
            })
            .await
        }
    });
    let results = futures_util::future::join_all(uses).await;
    let wins = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(wins, 1, "{results:?}");
    for r in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(r.code(), Code::InvalidArgument);
    }
}

#[tokio::test]
async fn verify_password_validates_its_request() {
    let app = TestApp::spawn().await;
    let mut a = app.authenticators();
    let err = a
        .verify_password(pb::VerifyPasswordRequest {
            login: None,
            password: String::new(),
            ip: "999.1.1.1".into(),
            user_agent: "bad\u{7}agent".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        violated_fields(&err),
        ["ip", "login", "password", "user_agent"]
    );
    let err = a
        .verify_password(pb::VerifyPasswordRequest {
            login: Some(Login::UserId("nope".into())),
            password: "x".repeat(1025),
            ip: "2001:db8::1".into(),
            user_agent: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&err), ["password", "user_id"]);

    // Verifying needs authenticators.verify; users.read is not enough.
    let token = app.key(&["users.read"]).await;
    let mut weak =
        roster::pb::v1::authenticator_service_client::AuthenticatorServiceClient::with_interceptor(
            app.channel.clone(),
            crate::harness::key(Some(&token)),
        );
    let err = weak
        .verify_password(pb::VerifyPasswordRequest {
            login: Some(email("a@example.com")),
            password: PASSWORD.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
}

/// Collects everything logged on this test's thread (the server runs on the test's
/// current-thread runtime, so that is all of its request handling).
#[derive(Clone, Default)]
pub struct LogCapture(pub std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Captures every log line at TRACE on this thread until the guard drops.
pub fn capture_logs() -> (LogCapture, tracing::subscriber::DefaultGuard) {
    crate::harness::init_tracing();
    let logs = LogCapture::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    (logs, tracing::subscriber::set_default(subscriber))
}

#[tokio::test]
async fn passwords_hashes_and_tokens_never_leave_the_service() {
    let (logs, _guard) = capture_logs();
    let app = spawn_with_lockout(3, 900).await;
    let mut a = app.authenticators();
    let mut users = app.users();
    let user = user_with_password(&app, "secret@example.com").await;
    let legacy = user_with_hash(&mut users, "legacy.secret@example.com", LEGACY_HASHES[6].1).await;
    let mut responses = Vec::new();
    responses.push(format!(
        "{:?}",
        verify(&mut a, email("secret@example.com"), PASSWORD).await
    ));
    responses.push(format!(
        "{:?}",
        verify(&mut a, email("legacy.secret@example.com"), LEGACY_PASSWORD).await
    ));
    for _ in 0..3 {
        responses.push(format!(
            "{:?}",
            verify(&mut a, email("secret@example.com"), "a wrong guess 123").await
        ));
    }
    let token = a
        .create_password_reset_token(pb::CreatePasswordResetTokenRequest {
            login: Some(pb::create_password_reset_token_request::Login::UserId(
                user.id.clone(),
            )),
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let reset = a
        .reset_password(pb::ResetPasswordRequest {
            token: token.clone(),
            new_password: "the reset passphrase".into(),
        })
        .await
        .unwrap();
    responses.push(format!("{reset:?}"));
    let err = a
        .reset_password(pb::ResetPasswordRequest {
            token: token.clone(),
            new_password: "the reset passphrase".into(),
        })
        .await
        .unwrap_err();
    responses.push(format!("{err:?}"));
    responses.push(format!(
        "{:?}",
        users
            .get_user(pb::GetUserRequest {
                id: legacy.id.clone()
            })
            .await
            .unwrap()
    ));

    let stored = [
        stored_hash(&app, &user.id).await,
        stored_hash(&app, &legacy.id).await,
    ];
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
    let secrets = [
        PASSWORD,
        LEGACY_PASSWORD,
        "a wrong guess 123",
        "the reset passphrase",
        token.as_str(),
        LEGACY_HASHES[6].1,
        stored[0].as_str(),
        stored[1].as_str(),
        "$argon2",
        "$2b$",
    ];
    let logged = String::from_utf8_lossy(&logs.0.lock().unwrap()).to_string();
    assert!(
        logged.contains("VerifyPassword"),
        "the capture sees the server's logs"
    );
    for text in responses.iter().chain(events.iter()).chain([&logged]) {
        for s in secrets {
            assert!(!text.contains(s), "{s:?} leaked in {text}");
        }
    }
}

/// With `--breached-passwords-file`, a new password found in the list is refused wherever a
/// password is set, and CheckPassword reports it.
#[tokio::test]
async fn passwords_in_the_breached_list_are_refused_wherever_one_is_set() {
    const LEAKED: &str = "leaked in some breach 2024";
    const ALSO_LEAKED: &str = "another leaked passphrase";
    let mut hashes: Vec<String> = [LEAKED, ALSO_LEAKED, LEGACY_PASSWORD, "filler two"]
        .iter()
        .map(|p| String::from_utf8(roster::crypto::breached::sha1_hex(p).to_vec()).unwrap())
        .collect();
    hashes.sort();
    let list = tempfile::NamedTempFile::new().unwrap();
    let text: String = hashes.iter().map(|h| format!("{h}:12\r\n")).collect();
    std::fs::write(list.path(), text).unwrap();
    let app = TestApp::spawn_with(ServerConfig {
        breached_passwords_file: Some(list.path().to_path_buf()),
        key_cache_ms: 50,
        ..ServerConfig::default()
    })
    .await;
    let mut users = app.users();
    let mut a = app.authenticators();
    let breached = |err: tonic::Status, field: &str| {
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert_eq!(violated_fields(&err), [field]);
        assert!(
            err.message().contains("exposed in data breaches"),
            "{}",
            err.message()
        );
    };
    let create = |email: &str, password: &str| pb::CreateUserRequest {
        user: Some(user_with_email(email)),
        initial_password: Some(pb::create_user_request::InitialPassword::Password(
            password.into(),
        )),
        ..Default::default()
    };
    breached(
        users
            .create_user(create("leaky@example.com", LEAKED))
            .await
            .unwrap_err(),
        "password",
    );
    let err = users
        .lookup_user(pb::LookupUserRequest {
            key: Some(pb::lookup_user_request::Key::Email(
                "leaky@example.com".into(),
            )),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "nothing was created");
    let user = users
        .create_user(create("careful@example.com", PASSWORD))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();

    let set = |password: &str| pb::SetPasswordRequest {
        user_id: user.id.clone(),
        new_password: Some(pb::set_password_request::NewPassword::Password(
            password.into(),
        )),
        require_change: false,
    };
    breached(
        a.set_password(set(ALSO_LEAKED)).await.unwrap_err(),
        "password",
    );
    breached(
        a.change_password(pb::ChangePasswordRequest {
            user_id: user.id.clone(),
            current_password: PASSWORD.into(),
            new_password: LEAKED.into(),
        })
        .await
        .unwrap_err(),
        "new_password",
    );
    let token = a
        .create_password_reset_token(pb::CreatePasswordResetTokenRequest {
            login: Some(pb::create_password_reset_token_request::Login::UserId(
                user.id.clone(),
            )),
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let reset = |password: &str| pb::ResetPasswordRequest {
        token: token.clone(),
        new_password: password.into(),
    };
    breached(
        a.reset_password(reset(LEAKED)).await.unwrap_err(),
        "new_password",
    );
    // The refusal left the token usable and the password as it was.
    a.reset_password(reset("a passphrase nobody leaked"))
        .await
        .unwrap();

    let check = |password: &str| pb::CheckPasswordRequest {
        password: password.into(),
        ..Default::default()
    };
    let r = a.check_password(check(LEAKED)).await.unwrap().into_inner();
    assert!(!r.acceptable, "{r:?}");
    assert_eq!(r.problems, [roster::crypto::breached::PROBLEM]);
    let r = a
        .check_password(check("a passphrase nobody leaked"))
        .await
        .unwrap()
        .into_inner();
    assert!(r.acceptable && r.problems.is_empty(), "{r:?}");
    let types: Vec<String> = app
        .events_of(&user.id)
        .await
        .into_iter()
        .map(|e| e.0)
        .collect();
    assert_eq!(
        types.iter().filter(|t| t.starts_with("PASSWORD_")).count(),
        2,
        "the reset request and the one reset: {types:?}"
    );

    // A password set before the list (here: imported as a hash) signs in only to be changed.
    let old = user_with_hash(&mut users, "old@example.com", LEGACY_HASHES[0].1).await;
    let r = verify(&mut a, email("old@example.com"), LEGACY_PASSWORD).await;
    assert_eq!(result(&r), R::PasswordChangeRequired);
    assert_eq!(r.change_reason, pb::PasswordChangeReason::Breached as i32);
    assert_eq!(r.user.map(|u| u.id), Some(old.id.clone()));
    let r = verify(&mut a, email("old@example.com"), "not the password").await;
    assert_eq!(
        result(&r),
        R::InvalidCredentials,
        "a wrong one is still wrong"
    );
    let events = app.events_of(&old.id).await;
    let login = events
        .iter()
        .find(|e| e.0 == "LOGIN_SUCCEEDED")
        .expect("LOGIN_SUCCEEDED");
    assert_eq!(login.1["password_breached"], true, "{:?}", login.1);
    assert_eq!(login.1["result"], "PASSWORD_CHANGE_REQUIRED");
    // A server told to allow them signs the user in.
    let mut lenient =
        roster::pb::v1::authenticator_service_client::AuthenticatorServiceClient::with_interceptor(
            app.another_server(ServerConfig {
                breached_passwords_file: Some(list.path().to_path_buf()),
                breached_at_sign_in: roster::config::BreachedSignIn::Allow,
                ..ServerConfig::default()
            })
            .await,
            crate::harness::key(Some(&app.token)),
        );
    let r = verify(&mut lenient, email("old@example.com"), LEGACY_PASSWORD).await;
    assert_eq!(result(&r), R::Ok);
    // Changing it ends the requirement.
    a.change_password(pb::ChangePasswordRequest {
        user_id: old.id.clone(),
        current_password: LEGACY_PASSWORD.into(),
        new_password: "a passphrase nobody leaked".into(),
    })
    .await
    .unwrap();
    let r = verify(
        &mut a,
        email("old@example.com"),
        "a passphrase nobody leaked",
    )
    .await;
    assert_eq!(result(&r), R::Ok);
}

/// A reset token asked for while another call deletes its user (found by the random
/// requests): the token's row then refers to a user gone by the time it is written, and the
/// caller gets NOT_FOUND, not INTERNAL; nothing is stored.
#[tokio::test]
async fn a_reset_token_for_a_user_deleted_meanwhile_is_not_found() {
    let app = TestApp::spawn().await;
    let user = create_user(&mut app.users(), "gone@example.com").await;
    // Hold the token table so the call waits after reading the user, before its insert.
    let lock = app.pool.get().await.unwrap();
    lock.batch_execute("BEGIN; LOCK TABLE password_reset_tokens IN SHARE ROW EXCLUSIVE MODE")
        .await
        .unwrap();
    let mut a = app.authenticators();
    let id = user.id.clone();
    let call = tokio::spawn(async move {
        a.create_password_reset_token(pb::CreatePasswordResetTokenRequest {
            login: Some(pb::create_password_reset_token_request::Login::UserId(id)),
        })
        .await
    });
    app.until_a_call_waits_on_a_lock("CreatePasswordResetToken")
        .await;
    let id = Uuid::parse_str(&user.id).unwrap();
    lock.execute("DELETE FROM users WHERE id = $1", &[&id])
        .await
        .unwrap();
    lock.batch_execute("COMMIT").await.unwrap();
    let err = call.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert_eq!(reason(&err), "NOT_FOUND");
    assert_eq!(err.message(), "user not found");
    let tokens: i64 = app
        .sql_one("SELECT count(*) FROM password_reset_tokens", &[])
        .await;
    assert_eq!(tokens, 0);
}

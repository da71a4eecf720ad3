//! The `roster` binary itself: `serve` with the embedded default, and the operator commands.
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tonic::Code;

use crate::harness::{TestApp, key};
use crate::{create_user, pb, user_with_email};

const ROSTER: &str = env!("CARGO_BIN_EXE_roster");

fn roster(url: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(ROSTER)
        .args(args)
        .env("DATABASE_URL", url)
        .env("RUST_LOG", "warn")
        // As many operators' shells and containers have it: an operator's error must still
        // read as one line, not a stack trace.
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("run roster");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn migrate_reports_what_it_applied() {
    let db = crate::harness::TestDatabase::create(None).await;
    let url = db.url();
    let (ok, out, err) = roster(&url, &["migrate"]);
    assert!(ok, "{err}");
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let versions: i64 = client
        .query_one("SELECT count(*) FROM schema_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert!(versions >= 7);
    assert_eq!(
        out.trim(),
        format!("applied {versions} migration(s); the schema is up to date")
    );
    // Again, logging at info as an operator runs it: an up-to-date schema says so and
    // nothing else (no PostgreSQL notices about tables that already exist).
    let again = Command::new(ROSTER)
        .arg("migrate")
        .env("DATABASE_URL", &url)
        .env("RUST_LOG", "info")
        .output()
        .expect("run roster");
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{err}");
    assert_eq!(
        String::from_utf8_lossy(&again.stdout).trim(),
        "applied 0 migration(s); the schema is up to date"
    );
    assert!(!err.contains("NOTICE"), "{err}");
}

#[test]
fn serve_refuses_bad_settings_and_busy_ports_before_starting_a_database() {
    // Each mistake must fail start-up at once, naming what is wrong, before a private
    // PostgreSQL is started (or its data directory made) for nothing.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = busy.local_addr().unwrap().to_string();
    let missing = "/nonexistent/roster-test-file.pem";
    let cases: Vec<(Vec<&str>, String)> = vec![
        // Above the bounds on stored hashes every sign-in would fail.
        (
            vec!["--argon2-iterations", "17"],
            "argon2 iterations must be at most 16".into(),
        ),
        (
            vec!["--argon2-memory-kib", "262145"],
            "argon2 memory cost (KiB) must be at most 262144".into(),
        ),
        (
            vec!["--argon2-parallelism", "4000000000"],
            "argon2 parallelism must be at most 16".into(),
        ),
        (
            vec!["--encryption-keys", "k1:not-base64!"],
            "encryption key k1: not base64".into(),
        ),
        (
            vec!["--encryption-keys-file", missing],
            format!("reading {missing}"),
        ),
        (
            vec!["--tls-cert-file", missing, "--tls-key-file", missing],
            format!("reading the TLS certificate {missing}"),
        ),
        (
            vec!["--tls-cert-file", missing],
            "the following required arguments were not provided".into(),
        ),
        (
            vec!["--max-exports", "8", "--db-pool-size", "8"],
            "--max-exports 8 would let exports take every connection of the pool".into(),
        ),
        // A duration past what the clock can add panicked in every connection (keepalive)
        // or timer that used it: every time setting is bounded.
        (
            vec!["--keepalive-secs", "18446744073709551615"],
            "invalid value '18446744073709551615' for '--keepalive-secs <KEEPALIVE_SECS>': \
             18446744073709551615 is not in 0..=86400"
                .into(),
        ),
        (
            vec!["--call-timeout-secs", "86401"],
            "86401 is not in 0..=86400".into(),
        ),
        (
            vec!["--event-retention-days", "36501"],
            "36501 is not in 0..=36500".into(),
        ),
        (
            vec!["--password-history", "25"],
            "25 is not in 0..=24".into(),
        ),
        (
            vec!["--password-min-length", "7"],
            "7 is not in 8..=128".into(),
        ),
        // A rate of 1e-300 made the wait before the next call overflow a Duration (panic).
        (
            vec!["--rate-limit-rps", "NaN"],
            "invalid value 'NaN' for '--rate-limit-rps <RATE_LIMIT_RPS>': give a number from 0 \
             to 1000000"
                .into(),
        ),
        (
            vec!["--ip-failure-window-secs", "0"],
            "0 is not in 1..=86400".into(),
        ),
        (
            vec!["--ip-failure-exempt", "10.0.0.0/8, 10.0.0.0/33"],
            "\"10.0.0.0/33\" is not an address or a CIDR range like 203.0.113.0/24".into(),
        ),
        (
            vec!["--code-resend-secs", "3601"],
            "3601 is not in 0..=3600".into(),
        ),
        (
            vec!["--sms-allowed-prefixes", "+44,44"],
            "\"44\" is not a phone number prefix like +44 (a plus and 1 to 14 digits)".into(),
        ),
        (
            vec!["--breached-passwords-file", missing],
            format!("--breached-passwords-file: opening the breached-passwords file {missing}"),
        ),
        (
            vec!["--listen", &busy],
            format!("binding {busy} (--listen, ROSTER_LISTEN)"),
        ),
        (
            vec!["--metrics-listen", &busy],
            format!(
                "binding the metrics address {busy} (--metrics-listen, ROSTER_METRICS_LISTEN; \
                 empty turns it off)"
            ),
        ),
    ];
    for (args, message) in cases {
        let dir =
            std::env::temp_dir().join(format!("roster-settings-{}", uuid::Uuid::now_v7().simple()));
        let mut command = Command::new(ROSTER);
        command.arg("serve");
        if !args.contains(&"--listen") {
            command.args(["--listen", "127.0.0.1:0"]);
        }
        let mut child = command
            .args(&args)
            .env_remove("DATABASE_URL")
            .env("ROSTER_DATA_DIR", &dir)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run roster");
        // A server that accepted the setting would serve until stopped.
        let deadline = Instant::now() + Duration::from_secs(60);
        while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let started = child.try_wait().unwrap().is_none();
        if started {
            child.kill().unwrap();
        }
        let out = child.wait_with_output().unwrap();
        let made_dir = dir.exists();
        let _ = std::fs::remove_dir_all(&dir);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!started, "{args:?} was accepted: {err}");
        assert!(!out.status.success(), "{args:?}: {err}");
        assert!(err.contains(&message), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(
            !err.contains("starting a private PostgreSQL") && !made_dir,
            "{args:?}: a database was started before the refusal: {err}"
        );
    }
}

/// `roster servers` once it lists `n` servers (a server writes its row as it starts, in a
/// task of its own): its output.
async fn running_servers(app: &TestApp, n: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (ok, out, err) = roster(&app.url, &["servers"]);
        assert!(ok, "{err}");
        let listed = out.lines().filter(|l| l.contains("\tstarted ")).count();
        if listed == n {
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "{n} servers never listed: {out}{err}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `roster servers` lists the servers running against the database with their settings,
/// saying where two replicas differ; `roster projects policy` shows the values its defaults
/// take on them; a server that stops leaves the list.
#[tokio::test]
async fn servers_lists_the_replicas_and_where_their_settings_differ() {
    let mut app = TestApp::spawn().await;
    let out = running_servers(&app, 1).await;
    let first = out.lines().next().unwrap();
    assert!(first.contains(&format!("\t{}\t", app.addr)), "{out}");
    assert!(first.contains(env!("CARGO_PKG_VERSION")), "{out}");
    for line in [
        "lockout-threshold\t10",
        "sms-allowed-prefixes\tany",
        "rate-limit\toff",
        "argon2\tm=19456,t=2,p=1",
        "tls\tfalse",
        "encryption\ttrue",
    ] {
        assert!(out.lines().any(|l| l == line), "{line}: {out}");
    }
    // A second replica, configured apart: both listed, the setting they differ on named.
    let other = app
        .another_server(roster::config::ServerConfig {
            lockout_threshold: 5,
            ..Default::default()
        })
        .await;
    drop(other);
    let out = running_servers(&app, 2).await;
    let differ = out
        .lines()
        .find(|l| l.starts_with("lockout-threshold\t"))
        .unwrap();
    assert!(differ.contains("servers differ: 10 on "), "{out}");
    assert!(differ.contains(&format!("({})", app.addr)), "{out}");
    assert!(out.lines().any(|l| l == "lockout-secs\t900"), "{out}");
    let (ok, policy, err) = roster(&app.url, &["projects", "policy", "test"]);
    assert!(ok, "{err}");
    assert!(
        policy.starts_with("lockout-threshold\tdefault (servers differ: 10 on "),
        "{policy}"
    );
    // The first server stops: its row goes with it.
    app.begin_shutdown();
    app.stopped().await;
    let out = running_servers(&app, 1).await;
    assert!(!out.contains(&app.addr.to_string()), "{out}");
    assert!(out.lines().any(|l| l == "lockout-threshold\t5"), "{out}");
}

#[tokio::test]
async fn projects_and_keys_commands() {
    let app = TestApp::spawn().await;
    let (ok, out, err) = roster(&app.url, &["projects", "create", "acme"]);
    assert!(ok, "{err}");
    assert!(out.contains("acme"));
    let (ok, out, _) = roster(&app.url, &["projects", "list"]);
    assert!(ok && out.contains("acme") && out.contains("test"), "{out}");
    let (ok, _, err) = roster(&app.url, &["projects", "create", "acme"]);
    assert!(!ok, "duplicate project names are refused");
    assert_eq!(err.trim(), "Error: a project with this name already exists");

    // A project's sign-in policy: the server's until set, `default` gives it back.
    let policy = |args: &[&str]| {
        let mut all = vec!["projects", "policy", "acme"];
        all.extend_from_slice(args);
        roster(&app.url, &all)
    };
    // A setting left to the servers shows the running server's value (the test server's
    // defaults).
    running_servers(&app, 1).await;
    let (ok, out, err) = policy(&[]);
    assert!(ok, "{err}");
    assert_eq!(
        out,
        "lockout-threshold\tdefault (10)\nlockout-secs\tdefault (900)\n\
         password-history\tdefault (0)\npassword-min-length\tdefault (8)\n\
         password-max-age-days\tdefault (0)\nip-failure-limit\tdefault (0)\n\
         code-resend-secs\tdefault (0)\ncodes-per-hour\tdefault (0)\n\
         sms-allowed-prefixes\tdefault (any)\nsms-per-hour\tdefault (0)\n\
         event-retention-days\tdefault (90)\n"
    );
    let default = "default (900)";
    let (ok, out, err) = policy(&[
        "--lockout-threshold",
        "5",
        "--password-history",
        "4",
        "--password-min-length",
        "15",
        "--password-max-age-days",
        "90",
        "--ip-failure-limit",
        "100",
        "--code-resend-secs",
        "0",
        "--codes-per-hour",
        "3",
        "--sms-allowed-prefixes",
        "+44, +1",
        "--sms-per-hour",
        "500",
        "--event-retention-days",
        "365",
    ]);
    assert!(ok, "{err}");
    assert_eq!(
        out,
        format!(
            "lockout-threshold\t5\nlockout-secs\t{default}\npassword-history\t4\n\
             password-min-length\t15\npassword-max-age-days\t90\nip-failure-limit\t100\n\
             code-resend-secs\t0\ncodes-per-hour\t3\nsms-allowed-prefixes\t+44,+1\n\
             sms-per-hour\t500\nevent-retention-days\t365\n"
        )
    );
    let (ok, out, _) = policy(&["--lockout-threshold", "default"]);
    assert!(ok && out.starts_with("lockout-threshold\tdefault") && out.contains("history\t4"));
    for (flag, bad) in [
        ("--password-history", "25"),
        ("--lockout-secs", "0"),
        ("--lockout-threshold", "many"),
        ("--password-min-length", "7"),
        ("--password-max-age-days", "36501"),
        ("--code-resend-secs", "3601"),
        ("--codes-per-hour", "1001"),
        ("--sms-per-hour", "1000001"),
        ("--event-retention-days", "36501"),
    ] {
        let (ok, _, err) = policy(&[flag, bad]);
        assert!(!ok && err.contains("or default"), "{flag} {bad}: {err}");
    }
    let (ok, _, err) = policy(&["--sms-allowed-prefixes", "44"]);
    assert!(!ok && err.contains("is not a phone number prefix"), "{err}");
    let (ok, out, err) = policy(&["--sms-allowed-prefixes", ""]);
    assert!(
        ok && out.contains("sms-allowed-prefixes\tany\nsms-per-hour\t500\n"),
        "{out} {err}"
    );

    let (ok, token, err) = roster(
        &app.url,
        &[
            "keys",
            "create",
            "--project",
            "acme",
            "--scope",
            "users.read",
            "--scope",
            "users.write",
            "--name",
            "ci",
        ],
    );
    assert!(ok, "{err}");
    let token = token.trim().to_string();
    assert!(token.starts_with("rst_"), "{token}");
    let (ok, _, err) = roster(
        &app.url,
        &[
            "keys",
            "create",
            "--project",
            "acme",
            "--scope",
            "users.admin",
            "--name",
            "bad",
        ],
    );
    assert!(!ok && err.contains("unknown scope"), "{err}");

    let (_, listed, _) = roster(&app.url, &["keys", "list", "--project", "acme"]);
    assert!(listed.contains("never used"), "{listed}");

    // The new key works, in its own project.
    let mut users = app.users_with(Some(&token));
    let u = create_user(&mut users, "cli@x.io").await;
    let err = app
        .users()
        .get_user(pb::GetUserRequest { id: u.id.clone() })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::NotFound,
        "the test project cannot see acme's user"
    );

    let (ok, listed, _) = roster(&app.url, &["keys", "list", "--project", "acme"]);
    assert!(
        ok && listed.contains("ci")
            && listed.contains("users.read,users.write")
            && listed.contains("active"),
        "{listed}"
    );
    assert!(
        !listed.contains(crate::harness::key_secret(&token)),
        "secrets are never listed"
    );

    // Its use is recorded off the call's path, once a minute at most: a second call within
    // the minute writes nothing.
    let key_id = uuid::Uuid::try_parse(token.split('_').nth(1).unwrap()).unwrap();
    let last_used = || async {
        app.sql_one::<Option<chrono::DateTime<chrono::Utc>>>(
            "SELECT last_used_at FROM api_keys WHERE id = $1",
            &[&key_id],
        )
        .await
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let first = loop {
        match last_used().await {
            Some(t) => break t,
            None if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            None => panic!("the key's use was not recorded"),
        }
    };
    assert!(
        (chrono::Utc::now() - first).num_seconds().abs() < 30,
        "{first}"
    );
    users
        .get_user(pb::GetUserRequest { id: u.id.clone() })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        last_used().await,
        Some(first),
        "one write a minute, not one per call"
    );
    let (_, listed, _) = roster(&app.url, &["keys", "list", "--project", "acme"]);
    let line = listed.lines().find(|l| l.contains("\tci\t")).unwrap();
    assert!(
        line.ends_with(&format!(
            "active\tlast used {}\tno expiry\tlimit default\tfrom any address",
            first.to_rfc3339()
        )),
        "{listed}"
    );

    // A key with a lifetime: the expiry is printed at creation and listed; past it, the
    // key is refused and listed as expired.
    let create_expiring = |lifetime: &str| {
        roster(
            &app.url,
            &[
                "keys",
                "create",
                "--project",
                "acme",
                "--scope",
                "users.read",
                "--name",
                "temp",
                "--expires-in",
                lifetime,
            ],
        )
    };
    for bad in ["0d", "90", "1y", "36501d"] {
        let (ok, _, err) = create_expiring(bad);
        assert!(!ok, "--expires-in {bad} was accepted");
        assert!(
            err.contains("invalid value") && err.contains("e.g. 90d"),
            "{bad}: {err}"
        );
    }
    let (ok, temp, err) = create_expiring("3s");
    assert!(ok, "{err}");
    // Whole seconds, as listed.
    assert!(
        err.contains(", expiring 20") && err.contains("+00:00;") && !err.contains('.'),
        "{err}"
    );
    let temp = temp.trim().to_string();
    let mut temp_users = app.users_with(Some(&temp));
    temp_users
        .get_user(pb::GetUserRequest { id: u.id.clone() })
        .await
        .unwrap();
    let (_, listed, _) = roster(&app.url, &["keys", "list", "--project", "acme"]);
    let line = listed.lines().find(|l| l.contains("\ttemp\t")).unwrap();
    let fields: Vec<&str> = line.split('\t').collect();
    assert_eq!(fields[3], "active", "{line}");
    let expires = chrono::DateTime::parse_from_rfc3339(
        fields[5]
            .strip_prefix("expires ")
            .expect("an expiry column"),
    )
    .unwrap();
    let lifetime = expires.signed_duration_since(chrono::Utc::now());
    assert!(
        lifetime <= chrono::TimeDelta::seconds(3) && lifetime > chrono::TimeDelta::zero(),
        "{line}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match temp_users
            .get_user(pb::GetUserRequest { id: u.id.clone() })
            .await
        {
            Err(e) if e.code() == Code::Unauthenticated => {
                assert_eq!(crate::harness::reason(&e), "EXPIRED_API_KEY");
                break;
            }
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            other => panic!("the key still works past its expiry: {other:?}"),
        }
    }
    let (_, listed, _) = roster(&app.url, &["keys", "list", "--project", "acme"]);
    let line = listed.lines().find(|l| l.contains("\ttemp\t")).unwrap();
    assert!(line.contains("\texpired\t"), "{line}");

    // Its own rate limit, shown by `keys list`; `default` gives the server's back.
    let (ok, out, err) = roster(&app.url, &["keys", "limit", &token, "--rps", "5"]);
    assert!(ok, "{err}");
    assert_eq!(out, format!("{key_id}\tlimit 5/s burst 10\n"));
    let (ok, out, _) = roster(
        &app.url,
        &["keys", "limit", &key_id.to_string(), "--rps", "0"],
    );
    assert!(ok && out.ends_with("\tno limit\n"), "{out}");
    let (ok, _, err) = roster(
        &app.url,
        &["keys", "limit", &token, "--rps", "0", "--burst", "3"],
    );
    assert!(!ok && err.contains("goes with a rate above 0"), "{err}");
    let (ok, _, err) = roster(&app.url, &["keys", "limit", &token, "--rps", "fast"]);
    assert!(!ok && err.contains("or default"), "{err}");
    let (ok, _, err) = roster(
        &app.url,
        &["keys", "limit", &token, "--rps", "2", "--burst", "0.5"],
    );
    assert!(
        !ok && err.contains("--burst") && err.contains("from 1 to 1000000"),
        "{err}"
    );
    let (ok, _, _) = roster(
        &app.url,
        &["keys", "limit", &token, "--rps", "2.5", "--burst", "4"],
    );
    assert!(ok);
    let (_, listed, _) = roster(&app.url, &["keys", "list", "--project", "acme"]);
    let line = listed.lines().find(|l| l.contains("\tci\t")).unwrap();
    assert!(
        line.ends_with("\tlimit 2.5/s burst 4\tfrom any address"),
        "{line}"
    );
    let (ok, out, _) = roster(&app.url, &["keys", "limit", &token, "--rps", "default"]);
    assert!(ok && out.ends_with("\tlimit default\n"), "{out}");

    // Networks: a key restricted elsewhere is refused from here (the test's 127.0.0.1),
    // `any` lifts it; bad blocks are refused before anything changes.
    let restrict = |nets: &str| {
        roster(
            &app.url,
            &["keys", "restrict", &token, "--allow-from", nets],
        )
    };
    let (ok, _, err) = restrict("10.0.0.1/8");
    assert!(!ok && err.contains("did you mean 10.0.0.0/8?"), "{err}");
    let (ok, _, err) = restrict("intranet");
    assert!(!ok && err.contains("not an address or CIDR block"), "{err}");
    let (ok, out, err) = restrict("10.0.0.0/8,fd00::/8");
    assert!(ok, "{err}");
    assert_eq!(out, format!("{key_id}\tfrom 10.0.0.0/8,fd00::/8\n"));
    let refused = |want: bool| {
        let mut users = users.clone();
        let id = u.id.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let got = users.get_user(pb::GetUserRequest { id: id.clone() }).await;
                let is_refused = got
                    .as_ref()
                    .is_err_and(|e| crate::harness::reason(e) == "ADDRESS_NOT_ALLOWED");
                if is_refused == want {
                    break;
                }
                assert!(Instant::now() < deadline, "{got:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    refused(true).await;
    let (_, listed, _) = roster(&app.url, &["keys", "list", "--project", "acme"]);
    let line = listed.lines().find(|l| l.contains("\tci\t")).unwrap();
    assert!(line.ends_with("\tfrom 10.0.0.0/8,fd00::/8"), "{line}");
    let (ok, out, _) = restrict("any");
    assert!(ok && out.ends_with("\tfrom any address\n"), "{out}");
    refused(false).await;
    let (ok, _, err) = roster(
        &app.url,
        &[
            "keys",
            "create",
            "--project",
            "acme",
            "--scope",
            "users.read",
            "--name",
            "office",
            "--allow-from",
            "192.0.2.0/24",
            "--allow-from",
            "2001:db8::1",
        ],
    );
    assert!(ok, "{err}");
    assert!(err.contains("from 192.0.2.0/24,2001:db8::1/128;"), "{err}");

    // A mangled token is refused without echoing it (it may hold the secret).
    let (ok, _, err) = roster(&app.url, &["keys", "revoke", "rst_typo_s3cret"]);
    assert!(!ok);
    assert_eq!(
        err.trim(),
        "Error: not a key id or token: give the key's id (a UUID) or its whole token \
         (rst_<key-id>_<secret>)"
    );
    let (ok, _, err) = roster(&app.url, &["keys", "revoke", &token]);
    assert!(ok, "{err}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match users
            .get_user(pb::GetUserRequest { id: u.id.clone() })
            .await
        {
            Err(e) if e.code() == Code::Unauthenticated => break,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(20)).await,
            other => panic!("revoked key still works: {other:?}"),
        }
    }
    let (_, listed, _) = roster(&app.url, &["keys", "list", "--project", "acme"]);
    assert!(listed.contains("revoked"), "{listed}");

    // Every change the commands made is in acme's audit log, by the operator, never a secret.
    let client = app.pool.get().await.unwrap();
    let rows = client
        .query(
            "SELECT e.type, e.user_agent, e.data::text FROM events e
             JOIN projects p ON p.id = e.project_id
             WHERE p.name = 'acme' AND e.user_id IS NULL ORDER BY e.position",
            &[],
        )
        .await
        .unwrap();
    let kinds: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    for kind in [
        "PROJECT_CREATED",
        "PROJECT_POLICY_UPDATED",
        "API_KEY_CREATED",
        "API_KEY_UPDATED",
        "API_KEY_REVOKED",
    ] {
        assert!(kinds.iter().any(|k| k == kind), "{kind}: {kinds:?}");
    }
    assert_eq!(kinds[0], "PROJECT_CREATED");
    for r in &rows {
        assert_eq!(r.get::<_, String>(1), roster::events::store::OPERATOR);
        assert!(
            !r.get::<_, String>(2)
                .contains(crate::harness::key_secret(&token))
        );
    }
}

/// Rotating the key that seals secrets at rest, as an operator does it: servers first seal
/// with the new key (listed first, the old one still opening), `roster encryption reseal`
/// seals the stored secrets again under it, `status` shows the old key unused, and a server
/// given only the new key opens every provider token and TOTP seed.
#[tokio::test]
async fn encryption_keys_rotate_without_losing_a_secret() {
    use pb::authenticator_service_client::AuthenticatorServiceClient;
    use pb::identity_service_client::IdentityServiceClient;
    use roster::crypto::seal::Sealer;

    let app = TestApp::spawn().await;
    let old = TestApp::ENCRYPTION_KEYS;
    let u = create_user(&mut app.users(), "rotate@x.io").await;
    app.identities()
        .link_identity(pb::LinkIdentityRequest {
            user_id: u.id.clone(),
            provider: "github".into(),
            subject: "7".into(),
            access_token: "gho_access".into(),
            refresh_token: "ghr_refresh".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let (totp, seed) = crate::factors::enroll_totp(&mut app.authenticators(), &u.id).await;
    let encryption =
        |cmd: &str, keys: &str| roster(&app.url, &["encryption", cmd, "--encryption-keys", keys]);
    let lines = |out: &str| out.lines().map(str::to_owned).collect::<Vec<_>>();
    let (ok, out, err) = encryption("status", old);
    assert!(ok, "{err}");
    assert_eq!(
        lines(&out),
        [
            "identities.access_token\ttest1\t1\tcurrent",
            "identities.refresh_token\ttest1\t1\tcurrent",
            "authenticators.totp_secret\ttest1\t1\tcurrent",
        ]
    );

    let new = Sealer::generate_spec("test2");
    let both = format!("{new},{old}");
    // Every server now seals with the new key and still opens the old one.
    app.another_server(roster::config::ServerConfig {
        encryption_keys: Some(both.clone()),
        ..Default::default()
    })
    .await;
    // A server given only the new key too early says, as it starts, what it cannot open.
    let (logs, _guard) = crate::passwords::capture_logs();
    app.another_server(roster::config::ServerConfig {
        encryption_keys: Some(new.clone()),
        ..Default::default()
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let logged = String::from_utf8_lossy(&logs.0.lock().unwrap()).to_string();
        if let Some(line) = logged.lines().find(|l| l.contains("not given")) {
            assert!(
                line.contains("WARN")
                    && line.contains("key_id=\"test1\"")
                    && line.contains("secrets=3"),
                "{line}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "no warning: {logged}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (ok, out, err) = encryption("status", &new);
    assert!(
        !ok,
        "secrets under a key the configuration lacks are an error"
    );
    assert!(
        out.contains("identities.access_token\ttest1\t1\tNOT CONFIGURED"),
        "{out}"
    );
    assert!(err.contains("3 stored secret(s) need a key"), "{err}");

    let (ok, out, err) = encryption("reseal", &both);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "re-sealed 3 secret(s) with key test2");
    let (ok, out, err) = encryption("status", &new);
    assert!(ok, "{err}");
    assert_eq!(
        lines(&out),
        [
            "identities.access_token\ttest2\t1\tcurrent",
            "identities.refresh_token\ttest2\t1\tcurrent",
            "authenticators.totp_secret\ttest2\t1\tcurrent",
        ]
    );
    let (ok, out, _) = encryption("reseal", &both);
    assert!(
        ok && out.trim() == "re-sealed 0 secret(s) with key test2",
        "{out}"
    );

    // The old key is gone from the configuration: nothing was lost.
    let only_new = app
        .another_server(roster::config::ServerConfig {
            encryption_keys: Some(new.clone()),
            ..Default::default()
        })
        .await;
    let tokens = IdentityServiceClient::with_interceptor(only_new.clone(), key(Some(&app.token)))
        .get_provider_tokens(pb::GetProviderTokensRequest {
            user_id: u.id.clone(),
            provider: "github".into(),
            subject: "7".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (tokens.access_token.as_str(), tokens.refresh_token.as_str()),
        ("gho_access", "ghr_refresh")
    );
    let t = crate::factors::mid_step().await;
    let confirmed = AuthenticatorServiceClient::with_interceptor(only_new, key(Some(&app.token)))
        .confirm_totp(pb::ConfirmTotpRequest {
            user_id: u.id.clone(),
            authenticator_id: totp.id.clone(),
            code: crate::factors::code(&seed, t),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(confirmed.result, pb::VerifyFactorResult::Ok as i32);

    // Re-sealing with a configuration that cannot open them says so and changes nothing.
    let (ok, out, err) = encryption("reseal", &Sealer::generate_spec("test3"));
    assert!(!ok);
    assert_eq!(out.trim(), "re-sealed 0 secret(s) with key test3");
    assert!(
        err.contains("did not open") && err.contains("3 sealed with test2"),
        "{err}"
    );
    let (ok, out, _) = encryption("status", &new);
    assert!(
        ok && out.lines().all(|l| l.ends_with("\ttest2\t1\tcurrent")),
        "{out}"
    );
}

/// Starts `roster serve` as `command` sets it up, logging at info: the child, its address
/// once it is listening, and its log (when it has exited).
fn spawn_serve(
    mut command: Command,
) -> (
    std::process::Child,
    std::sync::mpsc::Receiver<String>,
    std::thread::JoinHandle<String>,
) {
    let mut child = command
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn roster serve");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        let mut log = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(addr) = line
                .split("addr=")
                .nth(1)
                .filter(|_| line.contains("roster listening"))
            {
                let _ = tx.send(addr.trim().to_string());
            }
            log.push_str(&line);
            log.push('\n');
        }
        log
    });
    (child, rx, reader)
}

/// PostgreSQL may come up after Roster (a cluster restart, one chart installing both):
/// `serve` and `migrate` keep trying for `--db-wait-secs` instead of exiting at once, and
/// the server then migrates and serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_and_migrate_wait_for_a_database_that_starts_later() {
    if std::env::var("DATABASE_URL").is_ok_and(|u| !u.is_empty()) {
        eprintln!("skipped: this test starts its own PostgreSQL late");
        return;
    }
    let dir = std::env::temp_dir().join(format!("roster-late-{}", uuid::Uuid::now_v7().simple()));
    let url = {
        let dir = dir.clone();
        tokio::task::spawn_blocking(move || {
            let pg = crate::faults::start(&dir);
            let url = pg.connection_string("postgres");
            pg.stop();
            url
        })
        .await
        .unwrap()
    };
    // Nothing answers at `url` now.
    let migrate = std::thread::spawn({
        let url = url.clone();
        move || roster(&url, &["migrate"])
    });
    let mut serve = Command::new(ROSTER);
    serve
        .args(["serve", "--listen", "127.0.0.1:0", "--metrics-listen", ""])
        .env("DATABASE_URL", &url);
    let (mut child, rx, reader) = spawn_serve(serve);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pg = {
        let dir = dir.clone();
        tokio::task::spawn_blocking(move || crate::faults::start(&dir))
            .await
            .unwrap()
    };
    let (ok, out, err) = migrate.join().unwrap();
    assert!(ok, "migrate gave up: {err}");
    assert!(out.contains("the schema is up to date"), "{out}");
    // A database that is there but refuses us is not waited for.
    let started = Instant::now();
    let (ok, _, err) = roster(&url.replace("dbname=postgres", "dbname=nope"), &["migrate"]);
    assert!(!ok && err.contains("\"nope\" does not exist"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30), "it waited");
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("serve did not start once the database was up");
    let channel = crate::harness::channel_to(addr);
    crate::faults::wait_for(
        &channel,
        tonic_health::pb::health_check_response::ServingStatus::Serving,
        Duration::from_secs(10),
    )
    .await;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let log = reader.join().unwrap();
    assert!(status.success(), "serve exited with {status}: {log}");
    assert!(log.contains("the database is not reachable yet"), "{log}");
    tokio::task::spawn_blocking(move || pg.stop())
        .await
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The README's first command: `roster serve` with no DATABASE_URL starts a private cluster,
/// writes a dev key, serves, and on SIGTERM stops cleanly; a second start reuses the data.
#[tokio::test]
async fn serve_with_the_embedded_default() {
    crate::harness::init_tracing();
    let dir = std::env::temp_dir().join(format!("roster-serve-{}", uuid::Uuid::now_v7().simple()));
    let data = dir.join("roster-data");
    let mut first_user = None;
    for round in 0..2 {
        let mut serve = Command::new(ROSTER);
        serve
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
                // The second run on one runtime thread (0: one per core).
                "--worker-threads",
                if round == 0 { "0" } else { "1" },
            ])
            .env_remove("DATABASE_URL")
            .env("ROSTER_DATA_DIR", &data);
        let (mut child, rx, reader) = spawn_serve(serve);
        let addr = rx
            .recv_timeout(Duration::from_secs(90))
            .expect("server did not start");
        let token = std::fs::read_to_string(data.join("dev-key"))
            .expect("dev key")
            .trim()
            .to_string();
        let channel = crate::harness::channel_to(addr);
        let mut users = roster::pb::v1::user_service_client::UserServiceClient::with_interceptor(
            channel.clone(),
            key(Some(&token)),
        );
        if round == 0 {
            let u = users
                .create_user(pb::CreateUserRequest {
                    user: Some(user_with_email("first@x.io")),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .user
                .unwrap();
            first_user = Some(u.id);

            // Operator commands in the same data directory use the cluster `serve` runs
            // (and leave it running): a new key works at once against the server.
            let operator = |args: &[&str]| {
                let out = Command::new(ROSTER)
                    .args(args)
                    .env_remove("DATABASE_URL")
                    .env("ROSTER_DATA_DIR", &data)
                    .env("RUST_LOG", "warn")
                    .output()
                    .unwrap();
                let err = String::from_utf8_lossy(&out.stderr).into_owned();
                assert!(out.status.success(), "{args:?}: {err}");
                String::from_utf8_lossy(&out.stdout).into_owned()
            };
            let listed = operator(&["projects", "list"]);
            assert!(listed.contains("default"), "{listed}");
            let created = operator(&[
                "keys",
                "create",
                "--project",
                "default",
                "--scope",
                "users.read",
                "--name",
                "while-serving",
            ]);
            let mut reader =
                roster::pb::v1::user_service_client::UserServiceClient::with_interceptor(
                    channel.clone(),
                    key(Some(created.trim())),
                );
            let mut got = None;
            // The server's key cache learns of the new key within moments.
            for _ in 0..50 {
                match reader
                    .get_user(pb::GetUserRequest {
                        id: first_user.clone().unwrap(),
                    })
                    .await
                {
                    Ok(r) => {
                        got = Some(r.into_inner());
                        break;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
            assert_eq!(
                got.expect("new key refused").user.unwrap().email,
                "first@x.io"
            );

            // A second server on the same data directory says why it cannot start.
            let out = Command::new(ROSTER)
                .args(["serve", "--listen", "127.0.0.1:0", "--metrics-listen", ""])
                .env_remove("DATABASE_URL")
                .env("ROSTER_DATA_DIR", &data)
                .env("RUST_LOG", "warn")
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success());
            assert!(
                err.contains("is already running") && err.contains("another `roster serve`"),
                "{err}"
            );
        } else {
            // Same data, same dev key file, the user is still there.
            let got = users
                .get_user(pb::GetUserRequest {
                    id: first_user.clone().unwrap(),
                })
                .await
                .unwrap();
            assert_eq!(got.into_inner().user.unwrap().email, "first@x.io");
        }
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = child.wait().unwrap();
        let log = reader.join().unwrap();
        assert!(status.success(), "serve exited with {status}: {log}");
        assert!(log.contains("stopping the private PostgreSQL"), "{log}");
        let workers = match round {
            0 => std::thread::available_parallelism().unwrap().get(),
            _ => 1,
        };
        assert!(log.contains(&format!("workers={workers} ")), "{log}");
    }
    // The cluster stopped with the server.
    assert!(!data.join("pgdata").join("postmaster.pid").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs a client command (`import`, `export`) of the binary against `app` with `token`;
/// returns the exit code, stdout and stderr. It runs on a blocking thread: the server it
/// talks to lives on this test's runtime.
pub(crate) async fn roster_client(
    app: &TestApp,
    token: &str,
    args: &[&str],
) -> (i32, String, String) {
    roster_client_fed(app, token, args, None, &[]).await
}

/// `roster_client` with `stdin` written to the command's standard input, and `env` added to
/// its environment.
async fn roster_client_fed(
    app: &TestApp,
    token: &str,
    args: &[&str],
    stdin: Option<Vec<u8>>,
    env: &[(&str, &str)],
) -> (i32, String, String) {
    use std::io::Write;
    use std::process::Stdio;
    let server = format!("http://{}", app.addr);
    let token = token.to_string();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let mut child = Command::new(ROSTER)
            .args(&args)
            .envs(env)
            .env("ROSTER_SERVER", server)
            .env("ROSTER_API_KEY", token)
            .env_remove("DATABASE_URL")
            .current_dir(std::env::temp_dir())
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run roster");
        if let Some(bytes) = stdin {
            // Written from a thread of its own so a full stdout pipe cannot deadlock us.
            let mut pipe = child.stdin.take().unwrap();
            std::thread::spawn(move || pipe.write_all(&bytes));
        }
        let out = child.wait_with_output().expect("run roster");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

/// A client command against a server that is not there says so in one plain line.
#[test]
fn client_commands_say_when_the_server_cannot_be_reached() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let out = Command::new(ROSTER)
        .args(["export"])
        .env("ROSTER_SERVER", format!("http://{addr}"))
        .env("ROSTER_API_KEY", format!("rst_{}_secret", "0".repeat(32)))
        .env("RUST_BACKTRACE", "1")
        .current_dir(std::env::temp_dir())
        .output()
        .expect("run roster");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with(&format!(
            "Error: cannot reach the Roster server at http://{addr}: "
        )) && err.lines().count() == 1,
        "{err}"
    );
    assert_eq!(err.matches("tcp connect error").count(), 1, "{err}");
}

#[tokio::test]
async fn csv_export_and_import_round_trip_quotes_newlines_and_unicode() {
    use crate::bulk::{export_all, import, record_of};
    let app = TestApp::spawn().await;
    let mut users = app.users();
    let requests = std::iter::once(crate::bulk::options(
        pb::ImportMode::CreateOnly,
        pb::ImportMatchOn::Email,
        false,
    ))
    .chain((0..300).map(|i| pb::ImportUsersRequest {
        item: Some(pb::import_users_request::Item::Record(
            crate::bulk::rich_user(i),
        )),
    }));
    import(&mut users, requests).await.unwrap();
    let dir = scratch_dir("cli");
    let file = dir.join("users.csv");
    let (code, _, err) = roster_client(
        &app,
        &app.token,
        &[
            "export",
            "--format",
            "csv",
            "--include-password-hashes",
            "--include-identities",
            "--include-authenticators",
            "-o",
            file.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("exported 300 users"), "{err}");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(
        text.contains("\"Ünïcødé \"\"quoted\"\", 0\""),
        "CSV quoting"
    );

    let (_, other) = app.other_project().await;
    let (code, _, err) = roster_client(&app, &other, &["import", file.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("300 created, 0 updated, 0 failed"), "{err}");
    let all = pb::ExportUsersRequest {
        include_password_hashes: true,
        include_identities: true,
        include_authenticators: true,
        ..Default::default()
    };
    let a = export_all(&mut users, all.clone()).await.unwrap();
    assert_eq!(a.iter().map(|m| m.identities.len()).sum::<usize>(), 300);
    // Seeds, recovery-code hashes and channels went through the CSV's JSON cells too.
    let factors: usize = a.iter().map(|m| m.authenticators.len()).sum();
    assert_eq!(factors, 100 + 75 + 60);
    let b = export_all(&mut app.users_with(Some(&other)), all)
        .await
        .unwrap();
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(record_of(x), record_of(y));
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// A TCP proxy to `to` that cuts its first connection once `cut_after` bytes have gone to the
/// client (a replica going away mid-stream), closes the next `refuse` at once (the replica
/// still away), and passes later ones through whole.
async fn cutting_proxy(
    to: std::net::SocketAddr,
    cut_after: usize,
    refuse: usize,
) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut limit = Some(cut_after);
        let mut refuse = refuse;
        while let Ok((client, _)) = listener.accept().await {
            if limit.is_none() && refuse > 0 {
                refuse -= 1;
                drop(client);
                continue;
            }
            let Ok(server) = tokio::net::TcpStream::connect(to).await else {
                continue;
            };
            let cut = limit.take();
            tokio::spawn(async move {
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let up = tokio::io::copy(&mut cr, &mut sw);
                let down = async {
                    let mut sent = 0usize;
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let n = sr.read(&mut buf).await?;
                        if n == 0 || cut.is_some_and(|c| sent >= c) {
                            return std::io::Result::Ok(());
                        }
                        cw.write_all(&buf[..n]).await?;
                        sent += n;
                    }
                };
                // Whichever direction ends, both sockets close with it.
                tokio::select! {
                    _ = up => {}
                    _ = down => {}
                }
            });
        }
    });
    addr
}

/// A connection cut in the middle of an export (a replica restarted, a load balancer's idle
/// cut) does not end it: `roster export` goes on after the last user written, so the file
/// holds every user exactly once, in id order, and says the export went on.
#[tokio::test]
async fn an_export_goes_on_after_its_connection_is_cut() {
    const N: usize = 3000;
    let app = TestApp::spawn().await;
    let mut users = app.users();
    crate::bulk::seed_more_than_buffers_hold(&mut users, N).await;
    // An email and an id are about 60 bytes a user: cut after a third of the export.
    let proxy = cutting_proxy(app.addr, 60 * 1024, 0).await;
    let dir = scratch_dir("export-cut");
    let file = dir.join("users.jsonl");
    let server = format!("http://{proxy}");
    let (code, _, err) = roster_client(
        &app,
        &app.token,
        &[
            "export",
            "--server",
            &server,
            "--fields",
            "email",
            "-o",
            file.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("going on after"), "the cut happened: {err}");
    assert!(err.contains(&format!("exported {N} users")), "{err}");
    assert!(err.contains("went on 1 time(s)"), "{err}");
    let text = std::fs::read_to_string(&file).unwrap();
    let emails: Vec<String> = text
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert_eq!(
                v.as_object().unwrap().len(),
                1,
                "only the fields asked for: {l}"
            );
            v["email"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(emails.len(), N);
    let distinct: std::collections::BTreeSet<&String> = emails.iter().collect();
    assert_eq!(distinct.len(), N, "no user twice");

    // With a filter of its own, which the resumed call keeps: big1, big10..19, big100..199
    // and big1000..1999.
    let proxy = cutting_proxy(app.addr, 20 * 1024, 0).await;
    let server = format!("http://{proxy}");
    let (code, out, err) = roster_client(
        &app,
        &app.token,
        &[
            "export",
            "--server",
            &server,
            "--fields",
            "email",
            "--filter",
            r#"email:"big1*" OR email = "nobody@example.com""#,
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("going on after"), "the cut happened: {err}");
    let emails: std::collections::BTreeSet<String> = out
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["email"].to_string())
        .collect();
    assert_eq!(out.lines().count(), 1111, "{err}");
    assert_eq!(emails.len(), 1111);
    assert!(
        emails.iter().all(|e| e.starts_with("\"big1")),
        "only the filter's users"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// A cut connection does not end an import of a file either: `roster import` reads the file
/// again from the first record without a result and goes on, so every user arrives once (an
/// UPSERT's or a CREATE_ONLY's), and the records that fail on this side are reported once
/// though read twice.
#[tokio::test]
async fn an_upsert_import_goes_on_after_its_connection_is_cut() {
    const N: usize = 3000;
    let app = TestApp::spawn().await;
    let dir = scratch_dir("import-cut");
    let file = dir.join("users.jsonl");
    let errors = dir.join("errors.jsonl");
    // Every 250th line is not JSON: 12 local failures, some read again after the cut.
    let mut lines = Vec::new();
    let mut bad = 0;
    for i in 0..N {
        if i % 250 == 249 {
            lines.push(format!("not json {i}"));
            bad += 1;
        } else {
            lines.push(
                serde_json::json!({"email": format!("cut{i}@example.com"),
                                          "display_name": format!("Cut {i}")})
                .to_string(),
            );
        }
    }
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    // `roster import FILE --mode upsert --errors ERRORS` through a proxy that cuts the first
    // connection: a result is a few dozen bytes, so after about a third of them.
    let cut_upsert = |file: std::path::PathBuf, errors: std::path::PathBuf, refuse: usize| {
        let app = &app;
        async move {
            let proxy = cutting_proxy(app.addr, 24 * 1024, refuse).await;
            let server = format!("http://{proxy}");
            let args = [
                "import",
                file.to_str().unwrap(),
                "--mode",
                "upsert",
                "--server",
                &server,
                "--errors",
                errors.to_str().unwrap(),
            ];
            roster_client(app, &app.token, &args).await
        }
    };
    // The first try after the cut is refused too: the import still went on once.
    let (code, _, err) = cut_upsert(file.clone(), errors.clone(), 1).await;
    assert_eq!(code, 2, "the bad lines failed: {err}");
    assert_eq!(err.matches("going on after record").count(), 2, "{err}");
    assert!(
        err.contains("going on after record"),
        "the cut happened: {err}"
    );
    assert!(err.contains("went on 1 time(s)"), "{err}");
    assert!(err.contains(&format!("imported {N} records")), "{err}");
    assert!(err.contains(&format!(", {bad} failed")), "{err}");
    let failed = std::fs::read_to_string(&errors).unwrap();
    assert_eq!(failed.lines().count(), bad, "each bad line once: {failed}");
    let total = app
        .users()
        .list_users(pb::ListUsersRequest {
            page_size: 1,
            show_total_size: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .total_size;
    assert_eq!(total as usize, N - bad);
    // The same as CSV: the errors file keeps its header once and each bad row once (the
    // resumed run reads the header again).
    let csv_file = dir.join("users.csv");
    let csv_errors = dir.join("errors.csv");
    let mut rows = vec!["email,display_name".to_string()];
    for i in 0..N {
        // Bad rows: half with a cell too many, half with one too few.
        rows.push(if i % 500 == 249 {
            format!("csvbad{i}@example.com,too,many")
        } else if i % 500 == 499 {
            format!("csvshort{i}@example.com")
        } else {
            format!("csv{i}@example.com,Csv {i}")
        });
    }
    std::fs::write(&csv_file, rows.join("\n") + "\n").unwrap();
    let (code, _, err) = cut_upsert(csv_file, csv_errors.clone(), 0).await;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("going on after record"),
        "the cut happened: {err}"
    );
    let failed = std::fs::read_to_string(&csv_errors).unwrap();
    let lines: Vec<&str> = failed.lines().collect();
    assert_eq!(lines[0], "email,display_name,_record,_error", "{failed}");
    assert_eq!(
        lines.len(),
        1 + bad,
        "a header and each bad row once: {failed}"
    );
    // A short row is padded, so its record number and error stay in their columns.
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .from_reader(failed.as_bytes());
    let mut short = 0;
    for row in reader.records() {
        let row = row.unwrap();
        if row[0].starts_with("csvshort") {
            short += 1;
            assert_eq!(row.len(), 4, "{row:?}");
            assert!(
                row[3].contains("has 1 fields where the header has 2"),
                "{row:?}"
            );
        }
    }
    assert_eq!(short, bad / 2);

    // CREATE_ONLY goes on too: records read again keep the ids this side gave them, so one
    // written before the cut meets its own user and counts as created, not as a duplicate,
    // while a record repeating an earlier one's email still fails (every 200th here).
    let again = dir.join("more.jsonl");
    let more: Vec<String> = (0..N)
        .map(|i| {
            let n = if i % 200 == 199 { i - 1 } else { i };
            serde_json::json!({"email": format!("more{n}@example.com")}).to_string()
        })
        .collect();
    std::fs::write(&again, more.join("\n") + "\n").unwrap();
    let repeats = N / 200;
    let proxy = cutting_proxy(app.addr, 24 * 1024, 0).await;
    let server = format!("http://{proxy}");
    let (code, _, err) = roster_client(
        &app,
        &app.token,
        &["import", again.to_str().unwrap(), "--server", &server],
    )
    .await;
    assert_eq!(code, 2, "the repeated emails failed: {err}");
    assert!(
        err.contains("going on after record"),
        "the cut happened: {err}"
    );
    let tally = format!("{} created, 0 updated, {repeats} failed", N - repeats);
    assert!(err.contains(&tally), "{err}");
    assert!(err.contains("written by this run before"), "{err}");
    assert!(
        err.contains("record 200: a user with this email already exists"),
        "{err}"
    );
    let stored: i64 = app
        .sql_one(
            "SELECT count(DISTINCT lower(email)) FROM users WHERE email LIKE 'more%'",
            &[],
        )
        .await;
    assert_eq!(stored as usize, N - repeats);

    // Records carrying their own ids (Roster's export) go on too: the server finds the users
    // the run wrote before the cut by its run id.
    let with_ids = dir.join("with-ids.jsonl");
    let lines: Vec<String> = (0..N)
        .map(|i| {
            serde_json::json!({"id": uuid::Uuid::now_v7().to_string(),
                               "email": format!("own{i}@example.com")})
            .to_string()
        })
        .collect();
    std::fs::write(&with_ids, lines.join("\n") + "\n").unwrap();
    let proxy = cutting_proxy(app.addr, 24 * 1024, 0).await;
    let server = format!("http://{proxy}");
    let file = with_ids.to_str().unwrap();
    let run = uuid::Uuid::now_v7().to_string();
    let (code, _, err) = roster_client(
        &app,
        &app.token,
        &["import", file, "--server", &server, "--run-id", &run],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("going on after record"),
        "the cut happened: {err}"
    );
    assert!(
        err.contains(&format!("{N} created, 0 updated, 0 failed")),
        "{err}"
    );
    assert!(err.contains("written by this run before"), "{err}");
    let stored: i64 = app
        .sql_one("SELECT count(*) FROM users WHERE email LIKE 'own%'", &[])
        .await;
    assert_eq!(stored as usize, N);
    // The command a stopped import prints resumes it whole as the same run, and another
    // run meets every record as a duplicate.
    let (code, _, err) = roster_client(
        &app,
        &app.token,
        &["import", file, "--run-id", &run, "--skip", "0"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains(&format!("{N} created, 0 updated, 0 failed")),
        "{err}"
    );
    let (code, _, err) = roster_client(&app, &app.token, &["import", file]).await;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!("0 created, 0 updated, {N} failed")),
        "{err}"
    );
    let imported: i64 = app
        .sql_one(
            "SELECT count(*) FROM events WHERE type = 'USER_IMPORTED'
               AND data->>'run_id' = $1",
            &[&run],
        )
        .await;
    assert_eq!(
        imported as usize, N,
        "one event per user, none for the replays"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// A client command against `app` left running (standard error piped, standard output
/// dropped), for a test to stop with [`interrupt`].
fn spawn_client(app: &TestApp, args: &[&str]) -> std::process::Child {
    Command::new(ROSTER)
        .args(args)
        .env("ROSTER_SERVER", format!("http://{}", app.addr))
        .env("ROSTER_API_KEY", &app.token)
        .env_remove("DATABASE_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run roster")
}

/// Ctrl-C to a command from [`spawn_client`]: its exit code and what it wrote to stderr.
async fn interrupt(child: &mut std::process::Child) -> (Option<i32>, String) {
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = exited(child).await;
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    (status.code(), err)
}

/// An import stopped by a signal (Ctrl-C at a terminal, SIGTERM from a job runner) prints the
/// command that goes on as the same run, and that command leaves every user written exactly
/// once: those written before the stop, their results lost, count as created, not as
/// duplicates (the records carry no ids: the ids the CLI gives them are made again).
#[tokio::test]
async fn an_interrupted_import_goes_on_exactly_with_the_command_it_prints() {
    const N: usize = 20_000;
    let app = TestApp::spawn().await;
    let dir = scratch_dir("interrupted");
    let file = dir.join("users.jsonl");
    let lines: Vec<String> = (0..N)
        .map(|i| serde_json::json!({"email": format!("int{i}@example.com")}).to_string())
        .collect();
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let mut child = spawn_client(&app, &["import", file.to_str().unwrap()]);
    // Stopped once some users are written.
    let deadline = Instant::now() + Duration::from_secs(30);
    while app.sql_one::<i64>("SELECT count(*) FROM users", &[]).await == 0 {
        assert!(Instant::now() < deadline, "nothing written in 30 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (code, err) = interrupt(&mut child).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("the import stopped: interrupted (SIGINT)"),
        "{err}"
    );
    let command = err
        .lines()
        .skip_while(|l| !l.ends_with("resume with:"))
        .nth(1)
        .unwrap_or_else(|| panic!("no command: {err}"))
        .trim()
        .to_string();
    let args: Vec<&str> = command.split_whitespace().skip(1).collect();
    assert_eq!(args[2], "--run-id", "{command}");
    let skip: usize = args[5].parse().unwrap();
    assert!(skip < N, "stopped before the end: {command}");

    let (code, _, err) = roster_client(&app, &app.token, &args).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains(&format!("{} created, 0 updated, 0 failed", N - skip)),
        "{err}"
    );
    let stored: i64 = app
        .sql_one("SELECT count(DISTINCT email) FROM users", &[])
        .await;
    assert_eq!(stored as usize, N);
    assert_eq!(
        app.sql_one::<i64>("SELECT count(*) FROM users", &[]).await as usize,
        N
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// An export stopped by a signal (Ctrl-C, SIGTERM from a job runner) ends as a failed one
/// does: it says after how many users, exits 1, and leaves no file behind, neither the
/// output (which never appears before an export is whole) nor its `.partial`.
#[tokio::test]
async fn an_interrupted_export_leaves_no_file_behind() {
    const N: usize = 40_000;
    let app = TestApp::spawn().await;
    crate::bulk::seed_more_than_buffers_hold(&mut app.users(), N).await;
    let dir = scratch_dir("export-interrupted");
    let out = dir.join("users.jsonl");
    let partial = dir.join("users.jsonl.partial");
    let mut child = spawn_client(&app, &["export", "-o", out.to_str().unwrap()]);
    // Stopped once users are being written.
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::metadata(&partial).map_or(0, |m| m.len()) == 0 {
        assert!(Instant::now() < deadline, "nothing written in 30 s");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let (code, err) = interrupt(&mut child).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("the export stopped after"), "{err}");
    assert!(err.contains("interrupted (SIGINT)"), "{err}");
    assert!(!out.exists() && !partial.exists(), "no file left behind");
    let _ = std::fs::remove_dir_all(dir);
}

/// `roster export | roster import -`: standard input has no extension, so its format is told
/// from its first non-blank byte, as a file's is.
#[tokio::test]
async fn import_reads_either_format_from_standard_input() {
    let app = TestApp::spawn().await;
    let mut users = app.users();
    for i in 0..3 {
        users
            .create_user(pb::CreateUserRequest {
                user: Some(pb::User {
                    email: format!("piped{i}@example.com"),
                    display_name: format!("Piped, \"{i}\""),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    for format in ["jsonl", "csv"] {
        let (code, exported, err) =
            roster_client(&app, &app.token, &["export", "--format", format]).await;
        assert_eq!(code, 0, "{err}");
        let (_, other) = app.other_project().await;
        // Empty lines ahead of the first record must not hide the format.
        let fed = format!("\n\n{exported}").into_bytes();
        let (code, _, err) =
            roster_client_fed(&app, &other, &["import", "-"], Some(fed), &[]).await;
        assert_eq!(code, 0, "{format}: {err}");
        assert!(
            err.contains("3 created, 0 updated, 0 failed"),
            "{format}: {err}"
        );
        let listed = app
            .users_with(Some(&other))
            .list_users(pb::ListUsersRequest {
                order_by: "email".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .users;
        let names: Vec<&str> = listed.iter().map(|u| u.display_name.as_str()).collect();
        assert_eq!(
            names,
            ["Piped, \"0\"", "Piped, \"1\"", "Piped, \"2\""],
            "{format}"
        );
    }
}

/// A server running its limit of exports answers RESOURCE_EXHAUSTED with RetryInfo: the CLI
/// waits as told and exports once a slot is free, rather than failing a scheduled backup.
#[tokio::test]
async fn export_waits_while_the_server_runs_its_limit_of_exports() {
    use futures_util::StreamExt;
    const N: usize = 8000;
    let app = TestApp::spawn_with(roster::config::ServerConfig {
        max_exports: 1,
        ..Default::default()
    })
    .await;
    let mut users = app.users();
    crate::bulk::seed_more_than_buffers_hold(&mut users, N).await;
    let mut held = users
        .export_users(pb::ExportUsersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(held.next().await.unwrap().is_ok());
    let release = async move {
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        drop(held);
    };
    let ((code, out, err), ()) = tokio::join!(
        roster_client(&app, &app.token, &["export", "--fields", "id"]),
        release
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("(--max-exports)") && err.contains("retrying in 5 s"),
        "{err}"
    );
    assert_eq!(out.lines().count(), N);
}

#[tokio::test]
async fn jsonl_import_reports_bad_records_and_resumes() {
    let app = TestApp::spawn().await;
    let dir = scratch_dir("cli");
    let file = dir.join("users.jsonl");
    let errors = dir.join("errors.jsonl");
    std::fs::write(
        &file,
        [
            r#"{"email": "one@example.com", "app_metadata": {"plan": "pro"}}"#,
            r#"{"email": "two@example.com", "emial": "typo"}"#,
            r#"{"email": "broken"#,
            "",
            r#"{"email": "not an email"}"#,
            r#"{"email": "three@example.com", "identities": [{"provider": "github", "subject": "3"}]}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    let path = file.to_str().unwrap();
    let (code, _, err) = roster_client(
        &app,
        &app.token,
        &["import", path, "--errors", errors.to_str().unwrap()],
    )
    .await;
    assert_eq!(code, 2, "failed records exit with 2: {err}");
    assert!(err.contains("2 created, 0 updated, 3 failed"), "{err}");
    let failed: Vec<serde_json::Value> = std::fs::read_to_string(&errors)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let numbers: Vec<i64> = failed
        .iter()
        .map(|f| f["_record"].as_i64().unwrap())
        .collect();
    assert_eq!(numbers, vec![2, 3, 4]);
    assert!(failed[0]["_error"].as_str().unwrap().contains("emial"));
    assert_eq!(failed[1]["_line"], r#"{"email": "broken"#);
    assert!(
        failed[2]["_error"]
            .as_str()
            .unwrap()
            .contains("record.user.email")
    );
    assert_eq!(failed[2]["email"], "not an email");

    // Resuming after the first two records with UPSERT touches only the rest.
    let (code, _, err) = roster_client(
        &app,
        &app.token,
        &["import", path, "--mode", "upsert", "--skip", "2"],
    )
    .await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("0 created, 1 updated, 2 failed"), "{err}");
    let n: i64 = app.sql_one("SELECT count(*) FROM users", &[]).await;
    assert_eq!(n, 2);

    // A JSONL export with a filter and chosen fields, to standard output.
    let (code, out, err) = roster_client(
        &app,
        &app.token,
        &[
            "export",
            "--filter",
            "app_metadata.plan = \"pro\"",
            "--fields",
            "email,app_metadata",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.trim(),
        r#"{"app_metadata":{"plan":"pro"},"email":"one@example.com"}"#
    );
    // A hand-written CSV: quoted commas and quotes, a cell of JSON spread over lines, unicode,
    // CRLF line ends, and a column order of its own.
    let csv = dir.join("hand.csv");
    std::fs::write(
        &csv,
        "display_name,email,user_metadata,email_verified\r\n\
         \"O'Brien, \"\"Zoë\"\"\",zoe@example.com,\"{\n  \"\"bio\"\": \"\"a, b\"\"\n}\",yes\r\n\
         李小龍,lee@example.com,,\r\n",
    )
    .unwrap();
    let (code, _, err) = roster_client(&app, &app.token, &["import", csv.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{err}");
    let mut users = app.users();
    let zoe = crate::user_by_email(&mut users, "zoe@example.com").await;
    assert_eq!(zoe.display_name, "O'Brien, \"Zoë\"");
    assert!(zoe.email_verified);
    assert_eq!(
        zoe.user_metadata.unwrap(),
        crate::pb_struct(serde_json::json!({"bio": "a, b"}))
    );
    let lee = crate::user_by_email(&mut users, "lee@example.com").await;
    assert_eq!(lee.display_name, "李小龍");

    // Without a key the client says how to get one.
    let (code, _, err) = roster_client(&app, "", &["export"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("ROSTER_API_KEY"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

/// `roster projects delete P --confirm P` removes the project and everything in it (users with
/// their passwords, factors and identities, events, keys) and nothing of another project; its
/// keys are refused; a missing or wrong confirmation deletes nothing.
#[tokio::test]
async fn a_project_is_deleted_with_everything_in_it() {
    let app = TestApp::spawn().await;
    let (ok, _, err) = roster(&app.url, &["projects", "create", "doomed"]);
    assert!(ok, "{err}");
    let (ok, token, err) = roster(
        &app.url,
        &[
            "keys",
            "create",
            "--project",
            "doomed",
            "--scope",
            "*",
            "--name",
            "all",
        ],
    );
    assert!(ok, "{err}");
    let token = token.trim().to_string();
    let mut users = app.users_with(Some(&token));
    let mut authn = app.authenticators_with(Some(&token));
    let mut ids = app.identities_with(Some(&token));
    for i in 0..3 {
        let u = create_user(&mut users, &format!("doomed{i}@example.com")).await;
        authn
            .set_password(pb::SetPasswordRequest {
                user_id: u.id.clone(),
                new_password: Some(pb::set_password_request::NewPassword::Password(
                    "a doomed passphrase".into(),
                )),
                require_change: false,
            })
            .await
            .unwrap();
        crate::factors::recovery_codes(&mut authn, &u.id).await;
        ids.link_identity(pb::LinkIdentityRequest {
            user_id: u.id.clone(),
            provider: "github".into(),
            subject: format!("doomed-{i}"),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let kept = create_user(&mut app.users(), "kept@example.com").await;

    let rows_of = |project: &'static str| {
        rows_in_project_tables(
            &app,
            format!("project_id IN (SELECT id FROM projects WHERE name = '{project}')"),
        )
    };
    let before: i64 = rows_of("doomed").await.iter().map(|(_, n)| n).sum();
    assert!(before > 20, "{before}");

    // Without the project's name as confirmation nothing happens.
    let (ok, _, err) = roster(&app.url, &["projects", "delete", "doomed"]);
    assert!(!ok && err.contains("--confirm"), "{err}");
    let (ok, _, err) = roster(
        &app.url,
        &["projects", "delete", "doomed", "--confirm", "test"],
    );
    assert!(
        !ok && err.contains("--confirm must be the project's name"),
        "{err}"
    );
    assert_eq!(
        rows_of("doomed").await.iter().map(|(_, n)| n).sum::<i64>(),
        before
    );

    let (ok, out, err) = roster(
        &app.url,
        &["projects", "delete", "doomed", "--confirm", "doomed"],
    );
    assert!(ok, "{err}");
    // Events: the project's creation and its key's, and four for each user (created,
    // password set, recovery codes, identity linked).
    assert!(
        out.trim_end()
            .ends_with("\tdoomed\tdeleted: 3 users, 14 events, 1 keys"),
        "{out}"
    );
    let (_, listed, _) = roster(&app.url, &["projects", "list"]);
    assert!(!listed.contains("doomed"), "{listed}");
    // Nothing is left in any table of a project that no longer exists.
    for (table, left) in
        rows_in_project_tables(&app, "project_id NOT IN (SELECT id FROM projects)".into()).await
    {
        assert_eq!(left, 0, "{table}");
    }
    let err = users
        .get_user(pb::GetUserRequest {
            id: kept.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "its key is gone");
    // The other project is untouched.
    app.users()
        .get_user(pb::GetUserRequest {
            id: kept.id.clone(),
        })
        .await
        .unwrap();
    let (ok, _, err) = roster(
        &app.url,
        &["projects", "delete", "doomed", "--confirm", "doomed"],
    );
    assert!(!ok && err.contains("not found"), "{err}");
}

/// `roster keys rotate` replaces a key without an outage: the new key has the old one's
/// scopes, limit and lifetime; the old one keeps working for the grace given, then is
/// refused; both changes are in the project's log; a revoked key cannot be rotated.
#[tokio::test]
async fn a_key_is_rotated_with_a_grace_period() {
    let app = TestApp::spawn().await;
    let run = |args: &[&str]| roster(&app.url, args);
    let (ok, old, err) = run(&[
        "keys",
        "create",
        "--project",
        "test",
        "--scope",
        "users.read",
        "--name",
        "billing",
        "--expires-in",
        "90d",
    ]);
    assert!(ok, "{err}");
    let old = old.trim().to_string();
    let old_id = old.split('_').nth(1).unwrap().to_string();
    let (ok, _, err) = run(&["keys", "limit", &old_id, "--rps", "50"]);
    assert!(ok, "{err}");
    let (ok, _, err) = run(&["keys", "rotate", &old_id, "--old-expires-in", "soon"]);
    assert!(!ok && err.contains("or now"), "{err}");

    let (ok, new, err) = run(&["keys", "rotate", &old, "--old-expires-in", "3s"]);
    assert!(ok, "{err}");
    assert!(err.contains("the new token is shown only now"), "{err}");
    let new = new.trim().to_string();
    assert!(new.starts_with("rst_") && new != old);
    let new_id = new.split('_').nth(1).unwrap().to_string();

    // Both work meanwhile, with the same scope (and only it).
    let kept = create_user(&mut app.users(), "rotated@example.com").await;
    let get = |token: &str| {
        let mut users = app.users_with(Some(token));
        let id = kept.id.clone();
        async move { users.get_user(pb::GetUserRequest { id }).await }
    };
    get(&old).await.unwrap();
    get(&new).await.unwrap();
    let err = create_user_with(&app, &new).await;
    assert_eq!(err.code(), Code::PermissionDenied);

    let (_, listed, _) = run(&["keys", "list", "--project", "test"]);
    let line = |id: &str| {
        listed
            .lines()
            .find(|l| l.starts_with(id))
            .unwrap()
            .to_string()
    };
    let new_line = line(&uuid_form(&new_id));
    assert!(
        new_line.contains("\tbilling\tusers.read\tactive\t")
            && new_line.ends_with("\tlimit 50/s burst 100\tfrom any address"),
        "{listed}"
    );
    // The new key lasts what the old one did: about 90 days from now.
    let expires = new_line
        .split("expires ")
        .nth(1)
        .unwrap()
        .split('\t')
        .next()
        .unwrap();
    let expires = chrono::DateTime::parse_from_rfc3339(expires).unwrap();
    let days = (expires.with_timezone(&chrono::Utc) - chrono::Utc::now()).num_hours() as f64 / 24.0;
    assert!((89.9..=90.1).contains(&days), "{days}");

    // Past the grace the old key is refused; the new one goes on.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let err = get(&old).await.unwrap_err();
    assert_eq!(crate::harness::reason(&err), "EXPIRED_API_KEY");
    get(&new).await.unwrap();
    let (ok, _, err) = run(&["keys", "rotate", &old_id]);
    assert!(!ok && err.contains("revoked or expired"), "{err}");

    // `now` ends the old key at once (servers refuse it within their key-cache time).
    let (ok, third, err) = run(&["keys", "rotate", &new, "--old-expires-in", "now"]);
    assert!(ok, "{err}");
    let deadline = Instant::now() + Duration::from_secs(5);
    let refused = loop {
        match get(&new).await {
            Err(e) => break e,
            Ok(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Ok(_) => panic!("the replaced key still works"),
        }
    };
    assert_eq!(crate::harness::reason(&refused), "EXPIRED_API_KEY");
    get(third.trim()).await.unwrap();

    let kinds: Vec<String> = app
        .project_events(&["API_KEY_CREATED", "API_KEY_UPDATED", "API_KEY_REVOKED"])
        .await
        .into_iter()
        .map(|(kind, data)| {
            let rotation = data["rotated_from"]
                .as_str()
                .or(data["rotated_to"].as_str());
            format!("{kind}:{}", rotation.unwrap_or(""))
        })
        .collect();
    let old_uuid = uuid_form(&old_id);
    let new_uuid = uuid_form(&new_id);
    assert_eq!(
        &kinds[..5],
        [
            "API_KEY_CREATED:".to_string(),
            "API_KEY_UPDATED:".to_string(),
            format!("API_KEY_CREATED:{old_uuid}"),
            format!("API_KEY_UPDATED:{new_uuid}"),
            format!("API_KEY_CREATED:{new_uuid}"),
        ],
        "{kinds:?}"
    );
}

/// The rows matching `condition` in every table that has a `project_id` column, by table.
async fn rows_in_project_tables(app: &TestApp, condition: String) -> Vec<(String, i64)> {
    let client = app.pool.get().await.unwrap();
    let tables: Vec<String> = client
        .query(
            "SELECT table_name::text FROM information_schema.columns
             WHERE column_name = 'project_id' AND table_schema = 'public'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(tables.len() >= 10, "{tables:?}");
    let mut counts = Vec::new();
    for table in tables {
        let n: i64 = client
            .query_one(
                &format!("SELECT count(*) FROM {table} WHERE {condition}"),
                &[],
            )
            .await
            .unwrap()
            .get(0);
        counts.push((table, n));
    }
    counts
}

/// A key id as `keys list` prints it (hyphenated), from the simple form in a token.
fn uuid_form(simple: &str) -> String {
    uuid::Uuid::try_parse(simple).unwrap().to_string()
}

/// The status of a CreateUser with `token`.
async fn create_user_with(app: &TestApp, token: &str) -> tonic::Status {
    app.users_with(Some(token))
        .create_user(pb::CreateUserRequest {
            user: Some(user_with_email("denied@example.com")),
            ..Default::default()
        })
        .await
        .unwrap_err()
}

/// An office throttled by a few wrong passwords: `roster throttle list` shows the address
/// being refused, `release` lets its next sign-in through at once (audited), an IPv6 address
/// releases its /64, and releasing an address that owes nothing changes nothing.
#[tokio::test]
async fn a_throttled_address_is_listed_and_released() {
    let app = TestApp::spawn_with(roster::config::ServerConfig {
        key_cache_ms: 50,
        ip_failure_limit: 2,
        ..Default::default()
    })
    .await;
    crate::passwords::user_with_password(&app, "office@x.io").await;
    let project = app.project_id.to_string();
    let a = app.authenticators();
    let sign_in = |ip: &str, password: &str| {
        let mut a = a.clone();
        let req = pb::VerifyPasswordRequest {
            login: Some(pb::verify_password_request::Login::Email(
                "office@x.io".into(),
            )),
            password: password.into(),
            ip: ip.into(),
            user_agent: String::new(),
        };
        async move { a.verify_password(req).await.map(|r| r.into_inner().result) }
    };
    const OFFICE: &str = "203.0.113.9";
    const HOME: &str = "2001:db8:1:2::7";
    for ip in [OFFICE, OFFICE, HOME, HOME] {
        sign_in(ip, "not the password 1").await.unwrap();
    }
    for ip in [OFFICE, HOME] {
        let err = sign_in(ip, crate::passwords::PASSWORD).await.unwrap_err();
        assert_eq!(crate::harness::reason(&err), "IP_THROTTLED");
    }
    sign_in(OFFICE, "not the password 2").await.unwrap_err();

    let (ok, out, err) = roster(&app.url, &["throttle", "list", "--project", &project]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[0].starts_with(&format!("{OFFICE}\towes 2 failures as of 20")),
        "{out}"
    );
    assert!(lines[0].ends_with("\trefused 2"), "{out}");
    assert!(
        lines[1].starts_with("2001:db8:1:2::\towes 2 failures"),
        "{out}"
    );
    assert!(lines[1].ends_with("\trefused 1"), "{out}");

    let (ok, out, err) = roster(
        &app.url,
        &["throttle", "release", "--project", &project, OFFICE],
    );
    assert!(ok, "{err}");
    assert!(
        out.starts_with(&format!("released {OFFICE} in "))
            && out.ends_with(": it owed 2 failures, 2 attempts refused\n"),
        "{out}"
    );
    assert_eq!(
        sign_in(OFFICE, crate::passwords::PASSWORD).await.unwrap(),
        pb::VerifyPasswordResult::Ok as i32
    );
    // Another address of the same /64 releases it.
    let (ok, out, _) = roster(
        &app.url,
        &[
            "throttle",
            "release",
            "--project",
            &project,
            "2001:db8:1:2::ffff",
        ],
    );
    assert!(
        ok && out.starts_with("released 2001:db8:1:2:: in "),
        "{out}"
    );
    assert_eq!(
        sign_in(HOME, crate::passwords::PASSWORD).await.unwrap(),
        pb::VerifyPasswordResult::Ok as i32
    );
    let (ok, out, _) = roster(&app.url, &["throttle", "list", "--project", &project]);
    assert!(ok && out.is_empty(), "{out}");
    let (ok, out, _) = roster(
        &app.url,
        &["throttle", "release", "--project", &project, OFFICE],
    );
    assert!(
        ok && out.starts_with(&format!("{OFFICE} owes no failed sign-ins in ")),
        "{out}"
    );
    let (ok, _, err) = roster(
        &app.url,
        &["throttle", "release", "--project", &project, "office"],
    );
    assert!(!ok && err.contains("invalid value 'office'"), "{err}");

    // Two releases, in the project's log, by the operator.
    let data: Vec<serde_json::Value> = app
        .project_events(&["IP_THROTTLE_RELEASED"])
        .await
        .into_iter()
        .map(|(_, data)| data)
        .collect();
    assert_eq!(data.len(), 2, "{data:?}");
    assert_eq!(data[0]["ip"], OFFICE);
    assert_eq!(data[0]["failures"], 2.0);
    assert_eq!(data[0]["refused"], 2);
    assert_eq!(data[1]["ip"], "2001:db8:1:2::");
}

/// Moving off Auth0: its user export (JSON lines or CSV, Auth0's field names) plus the
/// `passwordHash` of its password export import as they are with `--from auth0`: users keep
/// their Auth0 id as external_id, their social logins as identities and their passwords;
/// a blocked user arrives blocked (not active), and an unknown field is refused by name.
#[tokio::test]
async fn an_auth0_export_imports_with_its_identities_and_passwords() {
    use crate::passwords::{LEGACY_HASHES, LEGACY_PASSWORD};
    let app = TestApp::spawn().await;
    let dir = scratch_dir("auth0");
    let bcrypt = LEGACY_HASHES[6].1;
    let records = [
        serde_json::json!({
            "_id": {"$oid": "5f7c8ec7c33c6c004bbafe82"},
            "user_id": "auth0|5f7c8ec7c33c6c004bbafe82",
            "email": "ada@example.com", "email_verified": true,
            "name": "Ada Lovelace", "given_name": "Ada", "family_name": "Lovelace",
            "nickname": "ada", "picture": "https://s.gravatar.com/avatar/ada.png",
            "created_at": "2020-05-12T09:34:12.123Z", "updated_at": "2024-01-02T03:04:05.000Z",
            "last_login": "2024-01-02T03:04:05.000Z", "logins_count": 42, "blocked": false,
            "user_metadata": {"theme": "dark"}, "app_metadata": {"plan": "pro"},
            "identities": [{"provider": "auth0", "user_id": "5f7c8ec7c33c6c004bbafe82",
                            "connection": "Username-Password-Authentication", "isSocial": false}],
            // As the README's scripts add them.
            "roles": ["admin"],
            "organizations": [{"id": "org_W2Y1yJ", "slug": "acme", "name": "Acme Inc.",
                               "roles": ["billing"]}],
        }),
        serde_json::json!({
            "user_id": "google-oauth2|107691503500061507151",
            "email": "grace@gmail.com", "email_verified": true, "name": "Grace Hopper",
            "identities": [
                {"provider": "google-oauth2", "user_id": "107691503500061507151",
                 "connection": "google-oauth2", "isSocial": true},
                {"provider": "github", "user_id": 583231, "connection": "github",
                 "isSocial": true},
            ],
        }),
        serde_json::json!({"user_id": "auth0|blocked", "email": "mallory@example.com",
                           "blocked": true}),
        serde_json::json!({"user_id": "auth0|odd", "email": "odd@example.com",
                           "favorite_color": "blue"}),
    ];
    let file = dir.join("tenant.json");
    std::fs::write(
        &file,
        records.iter().map(|r| format!("{r}\n")).collect::<String>(),
    )
    .unwrap();
    let (code, err, failed) = import_from(&app, &file, "auth0", &[]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("3 created, 0 updated, 1 failed"), "{err}");
    assert!(
        failed[0].contains("unknown Auth0 field 'favorite_color'"),
        "{failed:?}"
    );

    let mut users = app.users();
    let ada = crate::user_by(
        &mut users,
        pb::lookup_user_request::Key::ExternalId("auth0|5f7c8ec7c33c6c004bbafe82".into()),
    )
    .await;
    assert_eq!(ada.email, "ada@example.com");
    assert!(ada.email_verified);
    assert_eq!(ada.display_name, "Ada Lovelace");
    assert_eq!(
        (ada.given_name.as_str(), ada.family_name.as_str()),
        ("Ada", "Lovelace")
    );
    assert_eq!(ada.picture_url, "https://s.gravatar.com/avatar/ada.png");
    assert_eq!(ada.created_at.unwrap().seconds, 1_589_276_052);
    assert_eq!(ada.login_count, 0, "Roster counts its own sign-ins");
    // Her last sign-in at Auth0 carries over, so inactivity filters keep their meaning.
    assert_eq!(ada.last_login_at.unwrap().seconds, 1_704_164_645);
    assert_eq!(
        ada.app_metadata,
        Some(crate::pb_struct(serde_json::json!({
            "plan": "pro", "roles": ["admin"],
            "organizations": [{"id": "org_W2Y1yJ", "slug": "acme", "name": "Acme Inc.",
                               "roles": ["billing"]}]})))
    );
    // An organization's members, and a role held in one, are found by filter.
    for filter in [
        r#"app_metadata.organizations.id:"org_W2Y1yJ""#,
        r#"app_metadata.organizations.roles:"billing""#,
    ] {
        let found = users
            .list_users(pb::ListUsersRequest {
                filter: filter.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .users;
        let emails: Vec<&str> = found.iter().map(|u| u.email.as_str()).collect();
        assert_eq!(emails, ["ada@example.com"], "{filter}");
    }
    let mallory = crate::user_by_email(&mut users, "mallory@example.com").await;
    assert_eq!(mallory.status, pb::UserStatus::Blocked as i32);
    assert_eq!(mallory.blocked_reason, "blocked in Auth0");
    // Auth0's password export, a file of its own, applies as an UPSERT on external_id: no
    // join needed. Then her Auth0 password signs her in (and is upgraded to argon2id).
    assert!(!ada.has_password);
    let passwords = dir.join("passwords.json");
    let line = serde_json::json!({
        "_id": {"$oid": "5f7c8ec7c33c6c004bbafe82"}, "email": "ada@example.com",
        "email_verified": true, "passwordHash": bcrypt,
        "password_set_date": {"$date": "2020-05-12T09:34:12.123Z"}, "tenant": "acme",
        "connection": "Username-Password-Authentication", "_tmp_is_unique": true,
    });
    std::fs::write(&passwords, format!("{line}\n")).unwrap();
    let upsert = ["--mode", "upsert", "--match-on", "external-id"];
    let (code, err, _) = import_from(&app, &passwords, "auth0", &upsert).await;
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("0 created, 1 updated"), "{err}");
    assert!(signs_in(&app, "ada@example.com", LEGACY_PASSWORD).await);
    // Her Auth0 database identity is her password, not a linked account.
    let ids = crate::identities::identities_of(&mut app.identities(), &ada.id).await;
    assert!(ids.is_empty(), "{ids:?}");
    // Grace's social logins find her, as the social-login lookup will after the move.
    for (provider, subject) in [
        ("google-oauth2", "107691503500061507151"),
        ("github", "583231"),
    ] {
        let found = crate::identities::lookup(&mut app.identities(), provider, subject)
            .await
            .unwrap();
        assert_eq!(found.user.unwrap().email, "grace@gmail.com");
    }

    // Auth0's CSV: each text cell starts with ' (its CSV-injection guard).
    let csv = dir.join("tenant.csv");
    std::fs::write(
        &csv,
        "user_id,email,email_verified,name\n\
         'auth0|csv1,'csv@example.com,true,'Csv O'Neil\n",
    )
    .unwrap();
    let (code, _, err) = roster_client(
        &app,
        &app.token,
        &["import", csv.to_str().unwrap(), "--from", "auth0"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let csv_user = crate::user_by_email(&mut users, "csv@example.com").await;
    assert_eq!(csv_user.external_id, "auth0|csv1");
    assert_eq!(csv_user.display_name, "Csv O'Neil");
    assert!(csv_user.email_verified);
}

/// What VerifyPassword answers for `email` and `password`.
async fn sign_in(app: &TestApp, email: &str, password: &str) -> pb::VerifyPasswordResult {
    let r = app
        .authenticators()
        .verify_password(pb::VerifyPasswordRequest {
            login: Some(pb::verify_password_request::Login::Email(email.into())),
            password: password.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    pb::VerifyPasswordResult::try_from(r.result).unwrap()
}

/// Whether `password` signs `email` in (VerifyPassword answers OK).
async fn signs_in(app: &TestApp, email: &str, password: &str) -> bool {
    sign_in(app, email, password).await == pb::VerifyPasswordResult::Ok
}

/// `roster import FILE --from SOURCE --errors <FILE's dir>/errors.jsonl [extra...]`: its exit
/// code, its standard error and the `_error` of each failed record, in order.
async fn import_from(
    app: &TestApp,
    file: &std::path::Path,
    source: &str,
    extra: &[&str],
) -> (i32, String, Vec<String>) {
    let errors = file.with_file_name("errors.jsonl");
    let mut args = vec![
        "import",
        file.to_str().unwrap(),
        "--from",
        source,
        "--errors",
        errors.to_str().unwrap(),
    ];
    args.extend(extra);
    let (code, _, err) = roster_client(app, &app.token, &args).await;
    let text = std::fs::read_to_string(&errors).unwrap_or_default();
    // Failed records are written in the input's format: CSV rows for a CSV file.
    let reasons = if text.starts_with('{') || text.is_empty() {
        text.lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["_error"].as_str().unwrap().to_string()
            })
            .collect()
    } else {
        let mut rows = csv::Reader::from_reader(text.as_bytes());
        let at = rows
            .headers()
            .unwrap()
            .iter()
            .position(|h| h == "_error")
            .unwrap();
        rows.records().map(|r| r.unwrap()[at].to_string()).collect()
    };
    (code, err, reasons)
}

/// Moving off Firebase Authentication: `firebase auth:export users.json` (one pretty-printed
/// document, read as a stream) imports with `--from firebase`; with the console's password
/// hash parameters its users keep their passwords (Firebase's modified scrypt), and their
/// Google/GitHub sign-ins become identities; a disabled user arrives blocked. Without the
/// parameters, a user with a password is refused saying what to give; a bad parameters file
/// stops the run before anything is sent, without printing the signer key.
#[tokio::test]
async fn a_firebase_export_imports_with_its_passwords() {
    use crate::passwords::{LEGACY_HASHES, LEGACY_PASSWORD};
    let app = TestApp::spawn().await;
    let dir = scratch_dir("firebase");
    // The Firebase fixture hash, taken apart as the export and the console give it.
    let (_, fixture) = LEGACY_HASHES
        .iter()
        .find(|(name, _)| *name == "firebase-scrypt")
        .unwrap();
    let parts: Vec<&str> = fixture.split('$').collect();
    let (salt, hash, separator, signer) = (parts[3], parts[4], parts[5], parts[6]);
    let users = serde_json::json!([
        {
            "localId": "Xk3v9QeUuPbYq0J1sRfT2mWnZa83", "email": "fire@example.com",
            "emailVerified": true, "passwordHash": hash, "salt": salt,
            "displayName": "Fira Base", "photoUrl": "https://example.com/fira.png",
            "lastSignedInAt": "1700000000000", "createdAt": "1589276052123",
            "phoneNumber": "+14155550123", "disabled": false,
            "customAttributes": "{\"admin\":true}",
            "providerUserInfo": [{"providerId": "google.com", "rawId": "107691503500061507151",
                                  "email": "fira@gmail.com", "displayName": "Fira"}],
        },
        {
            "localId": "social0000000000000000000002", "email": "social@example.com",
            "emailVerified": true, "createdAt": "1600000000000",
            "providerUserInfo": [
                {"providerId": "google.com", "rawId": "200000000000000000002"},
                {"providerId": "github.com", "rawId": "583232", "email": "social@example.com"},
            ],
        },
        {"localId": "disabled00000000000000000003", "email": "off@example.com",
         "disabled": true, "createdAt": "1600000000000"},
    ]);
    // As firebase-tools writes it: a pretty-printed document with the records in `users`.
    let file = dir.join("users.json");
    let doc = serde_json::json!({ "users": users });
    std::fs::write(&file, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
    // Without the hash parameters: checked, nothing written, the password user refused.
    let (code, err, reasons) = import_from(&app, &file, "firebase", &["--dry-run"]).await;
    assert_eq!(code, 2, "{err}");
    assert_eq!(reasons.len(), 1, "{reasons:?}");
    assert!(
        reasons[0].contains("--firebase-hash-parameters"),
        "{reasons:?}"
    );

    // A parameters file missing a field stops the run, naming it and not the key.
    let params = dir.join("hash-config.txt");
    let with_params = ["--firebase-hash-parameters", params.to_str().unwrap()];
    std::fs::write(
        &params,
        format!("hash_config {{\n  base64_signer_key: {signer},\n}}\n"),
    )
    .unwrap();
    let (code, err, _) = import_from(&app, &file, "firebase", &with_params).await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("base64_salt_separator is missing"), "{err}");
    assert!(!err.contains(signer), "{err}");

    // The console's block, as copied from it.
    std::fs::write(
        &params,
        format!(
            "hash_config {{\n  algorithm: SCRYPT,\n  base64_signer_key: {signer},\n  \
             base64_salt_separator: {separator},\n  rounds: 8,\n  mem_cost: 14,\n}}\n"
        ),
    )
    .unwrap();
    let (code, err, reasons) = import_from(&app, &file, "firebase", &with_params).await;
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("3 created, 0 updated, 0 failed"), "{err}");
    assert!(reasons.is_empty());
    let off = crate::user_by_email(&mut app.users(), "off@example.com").await;
    assert_eq!(off.status, pb::UserStatus::Blocked as i32);
    assert_eq!(off.blocked_reason, "disabled in Firebase");

    let mut users = app.users();
    let fira = crate::user_by_email(&mut users, "fire@example.com").await;
    assert_eq!(fira.external_id, "Xk3v9QeUuPbYq0J1sRfT2mWnZa83");
    assert_eq!(fira.display_name, "Fira Base");
    assert_eq!(fira.picture_url, "https://example.com/fira.png");
    assert_eq!(fira.phone_number, "+14155550123");
    assert!(fira.phone_verified && fira.email_verified);
    let created = fira.created_at.unwrap();
    assert_eq!(
        (created.seconds, created.nanos),
        (1_589_276_052, 123_000_000)
    );
    assert_eq!(fira.last_login_at.unwrap().seconds, 1_700_000_000);
    assert_eq!(
        fira.app_metadata.unwrap().fields["admin"],
        crate::pb_struct(serde_json::json!({"a": true})).fields["a"]
    );
    // Her Firebase password signs her in; a wrong one does not.
    assert!(!signs_in(&app, "fire@example.com", "not her password").await);
    assert!(signs_in(&app, "fire@example.com", LEGACY_PASSWORD).await);
    for (provider, subject, email) in [
        ("google.com", "107691503500061507151", "fire@example.com"),
        ("google.com", "200000000000000000002", "social@example.com"),
        ("github.com", "583232", "social@example.com"),
    ] {
        let found = crate::identities::lookup(&mut app.identities(), provider, subject)
            .await
            .unwrap();
        assert_eq!(found.user.unwrap().email, email);
    }
    let social = crate::user_by_email(&mut users, "social@example.com").await;
    assert!(
        !social
            .enrolled_methods
            .contains(&(pb::AuthenticatorType::Password as i32))
    );
}

/// Firebase users read from the Identity Toolkit API (`accounts:batchGet`, as the README's
/// loop writes them) bring their enrolled SMS and email second factors, which firebase-tools
/// leaves out: the user arrives with them enrolled, so signing in still asks for a code. A
/// TOTP second factor, whose secret Firebase does not give, fails its record rather than
/// vanishing.
#[tokio::test]
async fn firebase_api_users_keep_their_sms_second_factor() {
    let app = TestApp::spawn().await;
    let dir = scratch_dir("firebase-mfa");
    let rows = [
        serde_json::json!({"localId": "mfa0000000000000000000000001", "email": "two@example.com",
            "emailVerified": true, "createdAt": "1600000000000", "lastLoginAt": "1700000000000",
            "lastRefreshAt": "2023-11-14T22:13:20.123Z", "validSince": "1600000000",
            "emailLinkSignin": false,
            "providerUserInfo": [{"providerId": "password", "rawId": "two@example.com",
                                  "federatedId": "two@example.com"}],
            "mfaInfo": [
                {"mfaEnrollmentId": "0a1b", "displayName": "Pixel", "phoneInfo": "+14155550142",
                 "enrolledAt": "2023-05-01T12:00:00.250Z"},
                {"mfaEnrollmentId": "0a1c", "emailInfo": {"emailAddress": "two@example.com"}}]}),
        serde_json::json!({"localId": "mfa0000000000000000000000002", "email": "app@example.com",
            "createdAt": "1600000000000",
            "mfaInfo": [{"mfaEnrollmentId": "0a1d", "totpInfo": {}}]}),
    ];
    let file = dir.join("users.jsonl");
    let lines: Vec<String> = rows.iter().map(|r| r.to_string()).collect();
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let (code, err, reasons) = import_from(&app, &file, "firebase", &[]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("1 created, 0 updated, 1 failed"), "{err}");
    assert_eq!(reasons.len(), 1);
    assert!(reasons[0].contains("a TOTP second factor"), "{reasons:?}");
    let two = crate::user_by_email(&mut app.users(), "two@example.com").await;
    assert_eq!(two.last_login_at.unwrap().seconds, 1_700_000_000);
    let factors = crate::factors::list_of(&mut app.authenticators(), &two.id).await;
    let sms = factors
        .iter()
        .find(|a| a.r#type == pb::AuthenticatorType::SmsOtp as i32)
        .expect("the SMS second factor");
    assert_eq!(
        (sms.phone_number.as_str(), sms.name.as_str()),
        ("+14155550142", "Pixel")
    );
    assert!(sms.confirmed);
    assert!(
        factors
            .iter()
            .any(|a| a.r#type == pb::AuthenticatorType::EmailOtp as i32
                && a.email == "two@example.com"),
        "{factors:?}"
    );
}

/// Moving off Keycloak: a realm export (`kc.sh export`, the realm's settings around its
/// `users`) imports with `--from keycloak`: passwords in each of Keycloak's hash algorithms
/// sign in, authenticator apps and unused recovery codes work, identity-provider links
/// become identities, attributes become the locale and user_metadata, roles and groups
/// app_metadata; a disabled user
/// arrives blocked, a pending UPDATE_PASSWORD as a password to change, and a service account
/// is refused with its reason.
#[tokio::test]
async fn a_keycloak_realm_export_imports_with_its_passwords() {
    use crate::passwords::LEGACY_PASSWORD;
    let app = TestApp::spawn().await;
    let dir = scratch_dir("keycloak");
    // Keycloak's credential JSON for LEGACY_PASSWORD, made with Python's hashlib and
    // argon2-cffi: pbkdf2-sha256 (27,500 iterations, 64-byte key: Keycloak's defaults before
    // 24), argon2 (its defaults since 25) and pbkdf2 (SHA-1, its oldest).
    let credential = |value: &str, salt: &str, data: serde_json::Value| {
        serde_json::json!({
            "id": uuid::Uuid::new_v4().to_string(), "type": "password",
            "userLabel": "My password", "createdDate": 1700000000000_i64,
            "secretData": serde_json::json!({"value": value, "salt": salt,
                                             "additionalParameters": {}}).to_string(),
            "credentialData": data.to_string(),
        })
    };
    let pbkdf2_sha256 = credential(
        "sZv1VyP/2Wn73wkFPaB3+9L1zuFp2i2dRyviC8KPVbXbZbqTLe19O0sXgga8SwLXqhzOTrVx1T+UEhv+ejUqbA==",
        "a2V5Y2xvYWstc2FsdC0wMQ==",
        serde_json::json!({"hashIterations": 27500, "algorithm": "pbkdf2-sha256",
                           "additionalParameters": {}}),
    );
    let argon2 = credential(
        "w1oRYURqlJoHNb5Ng07B4dwAd9Y2aACcFHMgoBTCWjY=",
        "a2V5Y2xvYWstc2FsdC0wMg==",
        serde_json::json!({"hashIterations": 5, "algorithm": "argon2",
                           "additionalParameters": {"hashLength": ["32"], "memory": ["7168"],
                                                    "type": ["id"], "version": ["1.3"],
                                                    "parallelism": ["1"]}}),
    );
    let pbkdf2_sha1 = credential(
        "q1wc2qcDiteDajjOACW5d3KTfq/RwPHizcvxyf/QAwJaS6J92l84dGRNMJwKdqaqL73WqZ2RpZKSSMSVDfHTDA==",
        "a2V5Y2xvYWstc2FsdC0wMw==",
        serde_json::json!({"hashIterations": 20000, "algorithm": "pbkdf2",
                           "additionalParameters": {}}),
    );
    // OTP credentials as Keycloak keeps them: the seed as text (its UTF-8 bytes are the key),
    // or in base32 when credentialData says so.
    let otp = |value: &str, data: serde_json::Value| {
        serde_json::json!({"type": "otp", "userLabel": "My phone",
                           "createdDate": 1700000000000_i64,
                           "secretData": serde_json::json!({"value": value}).to_string(),
                           "credentialData": data.to_string()})
    };
    let totp = otp(
        "kEy1seedAtLeastTen20",
        serde_json::json!({"subType": "totp", "digits": 6, "period": 30, "counter": 0,
                           "algorithm": "HmacSHA1"}),
    );
    let totp_base32 = otp(
        "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP",
        serde_json::json!({"subType": "totp", "digits": 6, "secretEncoding": "BASE32"}),
    );
    let eight_digits = otp(
        "kEy1seedAtLeastTen20",
        serde_json::json!({"subType": "totp", "digits": 8, "algorithm": "HmacSHA1"}),
    );
    // Recovery codes as Keycloak keeps them: the Base64 of the SHA-512 of each unused code
    // (it showed them as `ABCD-EFGH-1234`; the first two of the set were used and removed).
    let recovery = {
        use base64::Engine as _;
        use sha2::Digest;
        let codes: Vec<serde_json::Value> = ["ABCDEFGH1234", "JKLMNPQR5678"]
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let hash = base64::engine::general_purpose::STANDARD
                    .encode(sha2::Sha512::digest(c.as_bytes()));
                serde_json::json!({"number": i + 3, "encodedHashedValue": hash})
            })
            .collect();
        serde_json::json!({"type": "recovery-authn-codes", "createdDate": 1700000000000_i64,
                           "secretData": serde_json::json!({"codes": codes}).to_string(),
                           "credentialData": serde_json::json!({
                               "hashIterations": 1, "algorithm": "RS512",
                               "totalCodes": 12, "remainingCodes": 2}).to_string()})
    };
    let user = |id: &str, name: &str, creds: Vec<serde_json::Value>| {
        serde_json::json!({
            "id": id, "username": name, "email": format!("{name}@example.com"),
            "emailVerified": true, "enabled": true, "totp": false,
            "createdTimestamp": 1589276052123_i64, "credentials": creds,
            "disableableCredentialTypes": [], "requiredActions": [],
            "realmRoles": ["default-roles-acme"], "notBefore": 0, "groups": ["/staff"],
        })
    };
    let mut alice = user(
        "6f0c9a0e-8b1d-4c2e-9f3a-1b2c3d4e5f60",
        "alice",
        vec![pbkdf2_sha256, totp, recovery],
    );
    alice["realmRoles"] = serde_json::json!(["default-roles-acme", "admin"]);
    alice["clientRoles"] = serde_json::json!({"account": ["view-profile"], "shop": ["buyer"]});
    alice["firstName"] = "Alice".into();
    alice["lastName"] = "Liddell".into();
    alice["attributes"] = serde_json::json!({"locale": ["de"], "department": ["eng"],
                                             "badges": ["a", "b"]});
    alice["federatedIdentities"] = serde_json::json!([
        {"identityProvider": "google", "userId": "107691503500061507152",
         "userName": "alice@gmail.com"}]);
    let bob = user(
        "6f0c9a0e-8b1d-4c2e-9f3a-1b2c3d4e5f61",
        "bob",
        vec![argon2, totp_base32],
    );
    let erin = user(
        "6f0c9a0e-8b1d-4c2e-9f3a-1b2c3d4e5f65",
        "erin",
        vec![eight_digits],
    );
    let carol = user(
        "6f0c9a0e-8b1d-4c2e-9f3a-1b2c3d4e5f62",
        "carol",
        vec![pbkdf2_sha1],
    );
    let mut carol = carol;
    carol["requiredActions"] = serde_json::json!(["UPDATE_PASSWORD"]);
    let mut dave = user("6f0c9a0e-8b1d-4c2e-9f3a-1b2c3d4e5f63", "dave", vec![]);
    dave["enabled"] = false.into();
    let mut robot = user(
        "6f0c9a0e-8b1d-4c2e-9f3a-1b2c3d4e5f64",
        "service-account-ci",
        vec![],
    );
    robot["serviceAccountClientId"] = "ci".into();
    let realm = serde_json::json!({
        "id": "acme", "realm": "acme", "enabled": true, "sslRequired": "external",
        "clients": [{"clientId": "ci", "serviceAccountsEnabled": true}],
        "users": [alice, bob, carol, dave, robot, erin],
        "identityProviders": [{"alias": "google", "providerId": "google"}],
    });
    let file = dir.join("acme-realm.json");
    std::fs::write(&file, serde_json::to_string_pretty(&realm).unwrap()).unwrap();
    let (code, err, reasons) = import_from(&app, &file, "keycloak", &[]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("4 created, 0 updated, 2 failed"), "{err}");
    assert!(
        reasons[0].contains("service account of Keycloak client 'ci'"),
        "{reasons:?}"
    );
    assert!(reasons[1].contains("8 digits"), "{reasons:?}");

    let mut users = app.users();
    let a = crate::user_by_email(&mut users, "alice@example.com").await;
    assert_eq!(a.external_id, "6f0c9a0e-8b1d-4c2e-9f3a-1b2c3d4e5f60");
    assert_eq!(a.username, "alice");
    assert_eq!(
        (a.given_name.as_str(), a.family_name.as_str()),
        ("Alice", "Liddell")
    );
    assert_eq!(a.locale, "de");
    assert_eq!(a.created_at.unwrap().seconds, 1_589_276_052);
    assert_eq!(
        a.user_metadata.unwrap(),
        crate::pb_struct(serde_json::json!({"department": "eng", "badges": ["a", "b"]}))
    );
    // Her roles and groups, for the backend that authorized by them (Keycloak's own left out).
    assert_eq!(
        a.app_metadata.clone().unwrap(),
        crate::pb_struct(serde_json::json!({"roles": ["admin"],
            "client_roles": {"shop": ["buyer"]}, "groups": ["/staff"]}))
    );
    // Her authenticator app and her unused recovery codes came along: they work here, each
    // code once, typed as Keycloak showed it or without the dashes.
    assert_eq!(
        a.enrolled_methods,
        [
            pb::AuthenticatorType::Password as i32,
            pb::AuthenticatorType::Totp as i32,
            pb::AuthenticatorType::RecoveryCodes as i32
        ]
    );
    use pb::AuthenticatorType::RecoveryCodes as Codes;
    use pb::VerifyFactorResult as F;
    for (code, expected) in [
        ("ABCD-EFGH-1234", F::Ok),
        ("ABCDEFGH1234", F::CodeReused),
        ("JKLMNPQR5678", F::Ok),
        ("STUV-WXYZ-9999", F::InvalidCode),
    ] {
        let got = factor_result(&app, &a.id, Codes, code.into()).await;
        assert_eq!(got, expected, "{code}");
    }
    let now = crate::factors::mid_step().await;
    let bob = crate::user_by_email(&mut users, "bob@example.com").await;
    for (user, seed) in [
        (&a.id, b"kEy1seedAtLeastTen20".to_vec()),
        (
            &bob.id,
            b"Hello!\xde\xad\xbe\xefHello!\xde\xad\xbe\xef".to_vec(),
        ),
    ] {
        let r = app
            .authenticators()
            .verify_factor(pb::VerifyFactorRequest {
                user_id: user.clone(),
                r#type: pb::AuthenticatorType::Totp as i32,
                code: crate::factors::code(&seed, now),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.result, pb::VerifyFactorResult::Ok as i32, "{user}");
    }
    // Carol's right password is known, and must be changed, as Keycloak was to ask her.
    use pb::VerifyPasswordResult as R;
    for (name, right) in [
        ("alice", R::Ok),
        ("bob", R::Ok),
        ("carol", R::PasswordChangeRequired),
    ] {
        let email = format!("{name}@example.com");
        let wrong = sign_in(&app, &email, "wrong password").await;
        assert_eq!(wrong, R::InvalidCredentials, "{name}");
        assert_eq!(
            sign_in(&app, &email, LEGACY_PASSWORD).await,
            right,
            "{name}"
        );
    }
    let dave = crate::user_by_email(&mut users, "dave@example.com").await;
    assert_eq!(dave.status, pb::UserStatus::Blocked as i32);
    assert_eq!(dave.blocked_reason, "disabled in Keycloak");
    let found = crate::identities::lookup(&mut app.identities(), "google", "107691503500061507152")
        .await
        .unwrap();
    assert_eq!(found.user.unwrap().id, a.id);

    // A JSON array of Roster's own records is read the same way.
    let list = dir.join("list.json");
    std::fs::write(
        &list,
        r#"[{"email": "arr1@example.com"}, {"email": "arr2@example.com"}]"#,
    )
    .unwrap();
    let (code, _, err) = roster_client(&app, &app.token, &["import", list.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("2 created"), "{err}");
}

/// Moving off Amazon Cognito: `aws cognito-idp list-users` output imports with `--from
/// cognito`: the `sub` becomes external_id, attributes their fields or user_metadata,
/// federated logins identities; Cognito exports no passwords, so users who had one carry the
/// `legacy_password` mark a sign-in migration looks for; disabled users arrive blocked and
/// unconfirmed ones pending.
#[tokio::test]
async fn a_cognito_user_list_imports_with_its_identities() {
    let app = TestApp::spawn().await;
    let dir = scratch_dir("cognito");
    let attrs = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(n, v)| serde_json::json!({"Name": n, "Value": v}))
            .collect::<Vec<_>>()
    };
    let sub = [
        "0b7c8f3e-1111-4c2e-9f3a-000000000001",
        "0b7c8f3e-1111-4c2e-9f3a-000000000002",
    ];
    let list = serde_json::json!({"Users": [
        {
            "Username": sub[0],
            "Attributes": attrs(&[("sub", sub[0]), ("email", "cora@example.com"),
                                  ("email_verified", "true"), ("name", "Cora Cognito"),
                                  ("custom:plan", "pro"), ("birthdate", "1990-01-31")]),
            "UserCreateDate": "2023-07-21T23:07:37.949000+00:00",
            "UserLastModifiedDate": "2023-07-22T00:00:00+00:00",
            "Enabled": true, "UserStatus": "CONFIRMED",
            // As the README's script adds them from list-users-in-group.
            "Groups": ["admins", "billing"],
        },
        {
            "Username": "Google_117600000000000000001",
            "Attributes": attrs(&[("sub", sub[1]), ("email", "gus@gmail.com"),
                                  ("identities", r#"[{"userId":"117600000000000000001","providerName":"Google","providerType":"Google","issuer":null,"primary":true,"dateCreated":1689980857949}]"#)]),
            "UserCreateDate": 1689980857.949, "Enabled": true,
            "UserStatus": "EXTERNAL_PROVIDER",
        },
        {
            "Username": "dora", "Attributes": attrs(&[("email", "dora@example.com")]),
            "UserCreateDate": 1689980857, "Enabled": false, "UserStatus": "CONFIRMED",
        },
        {
            "Username": "ulla", "Attributes": attrs(&[("email", "ulla@example.com")]),
            "UserCreateDate": 1689980857, "Enabled": true, "UserStatus": "UNCONFIRMED",
        },
    ]});
    let file = dir.join("users.json");
    std::fs::write(&file, serde_json::to_string_pretty(&list).unwrap()).unwrap();
    let (code, err, reasons) = import_from(&app, &file, "cognito", &[]).await;
    assert_eq!(code, 0, "{err} {reasons:?}");
    assert!(err.contains("4 created, 0 updated, 0 failed"), "{err}");

    let mut users = app.users();
    let cora = crate::user_by_email(&mut users, "cora@example.com").await;
    assert_eq!(cora.external_id, sub[0]);
    assert_eq!(
        cora.username, "",
        "a Username that is the sub is not a username"
    );
    assert_eq!(cora.display_name, "Cora Cognito");
    assert!(cora.email_verified);
    assert_eq!(
        cora.user_metadata.unwrap(),
        crate::pb_struct(serde_json::json!({"plan": "pro", "birthdate": "1990-01-31"}))
    );
    assert_eq!(cora.created_at.unwrap().seconds, 1_689_980_857);
    let gus = crate::identities::lookup(&mut app.identities(), "Google", "117600000000000000001")
        .await
        .unwrap()
        .user
        .unwrap();
    assert_eq!(gus.email, "gus@gmail.com");
    assert_eq!(gus.username, "Google_117600000000000000001");
    assert_eq!(gus.created_at.unwrap().nanos, 949_000_000);
    let dora = crate::user_by_email(&mut users, "dora@example.com").await;
    assert_eq!(dora.status, pb::UserStatus::Blocked as i32);
    assert_eq!(dora.blocked_reason, "disabled in Cognito");
    let ulla = crate::user_by_email(&mut users, "ulla@example.com").await;
    assert_eq!(ulla.status, pb::UserStatus::PendingVerification as i32);
    // Everyone but the Google user had a Cognito password: marked for the sign-in migration.
    let marked = crate::list::emails(&mut users, "app_metadata.legacy_password = true")
        .await
        .unwrap();
    assert_eq!(
        marked,
        ["cora@example.com", "dora@example.com", "ulla@example.com"]
    );
    // Cora's groups, what `cognito:groups` told applications, found as a filter finds them.
    let admins = crate::list::emails(&mut users, r#"app_metadata.groups:"admins""#)
        .await
        .unwrap();
    assert_eq!(admins, ["cora@example.com"]);
}

/// What a user's code for their factor of `kind` does here.
async fn factor_result(
    app: &TestApp,
    user: &str,
    kind: pb::AuthenticatorType,
    code: String,
) -> pb::VerifyFactorResult {
    let r = app
        .authenticators()
        .verify_factor(pb::VerifyFactorRequest {
            user_id: user.into(),
            r#type: kind as i32,
            code,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    pb::VerifyFactorResult::try_from(r.result).unwrap()
}

/// Whether a user's authenticator app, seeded with `seed`, signs in here.
async fn totp_works(app: &TestApp, user: &str, seed: &[u8]) -> bool {
    let code = crate::factors::code(seed, crate::factors::mid_step().await);
    factor_result(app, user, pb::AuthenticatorType::Totp, code).await == pb::VerifyFactorResult::Ok
}

/// What a user's recovery code does here.
async fn recovery_code(app: &TestApp, user: &str, code: &str) -> pb::VerifyFactorResult {
    factor_result(app, user, pb::AuthenticatorType::RecoveryCodes, code.into()).await
}

/// A 20-byte TOTP seed (what Supabase and Clerk make) and its base32, as they store it.
fn seed_of(fill: u8) -> (Vec<u8>, String) {
    let seed: Vec<u8> = (0..20u8).map(|i| i.wrapping_mul(fill) ^ 0x5a).collect();
    let b32 = base32::encode(base32::Alphabet::Rfc4648 { padding: false }, &seed);
    (seed, b32)
}

/// Moving off Supabase Auth: `auth.users` rows as the README's psql query writes them (one
/// to_jsonb row per line, with the user's identities and MFA factors) import with `--from
/// supabase`: bcrypt passwords sign in, Google sign-ins become identities, verified TOTP
/// factors keep working, phone numbers gain their `+`; a banned user arrives blocked, an
/// unconfirmed one pending, and a deleted one is refused.
#[tokio::test]
async fn a_supabase_export_imports_with_passwords_and_factors() {
    use crate::passwords::{LEGACY_HASHES, LEGACY_PASSWORD};
    let app = TestApp::spawn().await;
    let dir = scratch_dir("supabase");
    let (_, bcrypt) = LEGACY_HASHES.iter().find(|(n, _)| *n == "bcrypt").unwrap();
    let (seed, secret) = seed_of(7);
    let id = |n: u8| format!("7c9e6679-7425-40de-944b-e07fc1f90a{n:02x}");
    let rows = [
        serde_json::json!({
            "instance_id": "00000000-0000-0000-0000-000000000000", "id": id(1),
            "aud": "authenticated", "role": "authenticated", "email": "sue@example.com",
            "encrypted_password": bcrypt,
            "email_confirmed_at": "2024-01-15T10:30:00.123456+00:00",
            "confirmation_token": "", "recovery_token": "", "phone": "4915112345678",
            "phone_confirmed_at": "2024-01-16T00:00:00+00:00",
            "last_sign_in_at": "2024-03-01T08:00:00+00:00",
            "raw_app_meta_data": {"provider": "email", "providers": ["email", "google"], "plan": "pro"},
            "raw_user_meta_data": {"full_name": "Sue Storm", "newsletter": true},
            "created_at": "2024-01-15T10:30:00+00:00", "updated_at": "2024-03-01T08:00:00+00:00",
            "banned_until": null, "deleted_at": null, "is_anonymous": false, "is_sso_user": false,
            "identities": [
                {"id": id(11), "user_id": id(1), "provider": "email", "provider_id": id(1),
                 "identity_data": {"sub": id(1), "email": "sue@example.com"}},
                {"id": id(12), "user_id": id(1), "provider": "google", "provider_id": "109876543210",
                 "identity_data": {"sub": "109876543210", "email": "sue@gmail.com", "name": "Sue"},
                 "email": "sue@gmail.com", "created_at": "2024-02-01T00:00:00+00:00"}
            ],
            "mfa_factors": [
                {"id": id(21), "user_id": id(1), "friendly_name": "Authy", "factor_type": "totp",
                 "status": "verified", "secret": secret, "created_at": "2024-02-02T00:00:00+00:00"}
            ]
        }),
        serde_json::json!({"id": id(2), "email": "ben@example.com",
            "email_confirmed_at": "2024-01-15T10:30:00+00:00", "banned_until": "infinity",
            "identities": null, "mfa_factors": null}),
        serde_json::json!({"id": id(3), "email": "pat@example.com", "email_confirmed_at": null,
            "confirmation_token": "a-secret-link-token", "identities": null, "mfa_factors": null}),
        serde_json::json!({"id": id(4), "email": "del@example.com",
            "deleted_at": "2024-05-01T00:00:00+00:00"}),
    ];
    let file = dir.join("users.jsonl");
    let lines: Vec<String> = rows.iter().map(|r| r.to_string()).collect();
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let (code, err, reasons) = import_from(&app, &file, "supabase", &[]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("3 created, 0 updated, 1 failed"), "{err}");
    assert_eq!(reasons, ["deleted in Supabase (deleted_at is set)"]);
    assert!(!err.contains("a-secret-link-token"), "{err}");

    let mut users = app.users();
    let sue = crate::user_by_email(&mut users, "sue@example.com").await;
    assert_eq!(sue.external_id, id(1));
    assert_eq!(sue.display_name, "Sue Storm");
    assert_eq!(sue.phone_number, "+4915112345678");
    assert!(sue.email_verified && sue.phone_verified);
    assert_eq!(
        sue.app_metadata.clone().unwrap(),
        crate::pb_struct(serde_json::json!({"plan": "pro"}))
    );
    assert_eq!(
        sue.user_metadata.clone().unwrap(),
        crate::pb_struct(serde_json::json!({"full_name": "Sue Storm", "newsletter": true}))
    );
    assert_eq!(sue.last_login_at.unwrap().seconds, 1_709_280_000);
    assert_eq!(
        sign_in(&app, "sue@example.com", "wrong").await,
        pb::VerifyPasswordResult::InvalidCredentials
    );
    assert!(signs_in(&app, "sue@example.com", LEGACY_PASSWORD).await);
    assert!(totp_works(&app, &sue.id, &seed).await);
    let factors = crate::factors::list_of(&mut app.authenticators(), &sue.id).await;
    assert!(factors.iter().any(|a| a.name == "Authy"), "{factors:?}");
    let by_google = crate::identities::lookup(&mut app.identities(), "google", "109876543210")
        .await
        .unwrap()
        .user
        .unwrap();
    assert_eq!(by_google.id, sue.id);
    let linked = app
        .identities()
        .list_identities(pb::ListIdentitiesRequest {
            user_id: sue.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .identities;
    assert_eq!(
        linked.len(),
        1,
        "the email sign-in is not a linked account: {linked:?}"
    );

    let ben = crate::user_by_email(&mut users, "ben@example.com").await;
    assert_eq!(ben.status, pb::UserStatus::Blocked as i32);
    assert_eq!(ben.blocked_reason, "banned in Supabase until infinity");
    let pat = crate::user_by_email(&mut users, "pat@example.com").await;
    assert_eq!(pat.status, pb::UserStatus::PendingVerification as i32);
}

/// Moving off Clerk: the dashboard's user export (CSV) imports with `--from clerk`: bcrypt
/// digests sign in, TOTP secrets keep working, the primary address is verified when Clerk
/// listed it so; a digest of a hasher Roster does not read fails its record, naming it.
#[tokio::test]
async fn a_clerk_export_imports_with_passwords_and_totp() {
    use crate::passwords::{LEGACY_HASHES, LEGACY_PASSWORD};
    let app = TestApp::spawn().await;
    let dir = scratch_dir("clerk");
    let (_, bcrypt) = LEGACY_HASHES.iter().find(|(n, _)| *n == "bcrypt").unwrap();
    let (seed, secret) = seed_of(11);
    let csv = format!(
        "id,first_name,last_name,username,primary_email_address,primary_phone_number,\
         verified_email_addresses,unverified_email_addresses,verified_phone_numbers,\
         unverified_phone_numbers,totp_secret,password_digest,password_hasher\n\
         user_2YDryYFVMM1W1plDDKz7Gzf4we6,Jane,Doe,,jane@example.com,,jane@example.com,,,,\
         {secret},{bcrypt},bcrypt\n\
         user_2ZZCgLE7kJG2CRBxTZ6YUIvzS10,John,Doe,johnd,john@example.com,+12125550100,,\
         john@example.com,+12125550100,,,,\n\
         user_2cWszPHuo6P2lCdnhhZbVMfbAIC,Mo,Five,,mo@example.com,,mo@example.com,,,,,\
         5f4dcc3b5aa765d61d8327deb882cf99,md5\n"
    );
    let file = dir.join("clerk.csv");
    std::fs::write(&file, csv).unwrap();
    let (code, err, reasons) = import_from(&app, &file, "clerk", &[]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("2 created, 0 updated, 1 failed"), "{err}");
    assert_eq!(reasons.len(), 1);
    assert!(reasons[0].contains("password_hasher 'md5'"), "{reasons:?}");
    assert!(!reasons[0].contains("5f4dcc3b"), "{reasons:?}");

    let mut users = app.users();
    let jane = crate::user_by_email(&mut users, "jane@example.com").await;
    assert_eq!(jane.external_id, "user_2YDryYFVMM1W1plDDKz7Gzf4we6");
    assert_eq!(
        (jane.given_name.as_str(), jane.family_name.as_str()),
        ("Jane", "Doe")
    );
    assert!(jane.email_verified);
    assert!(signs_in(&app, "jane@example.com", LEGACY_PASSWORD).await);
    assert!(!signs_in(&app, "jane@example.com", "wrong").await);
    assert!(totp_works(&app, &jane.id, &seed).await);
    let john = crate::user_by_email(&mut users, "john@example.com").await;
    assert_eq!(john.username, "johnd");
    assert!(!john.email_verified, "Clerk listed it as unverified");
    assert_eq!(john.phone_number, "+12125550100");
    assert!(john.phone_verified);
    assert_eq!(john.enrolled_methods, Vec::<i32>::new());

    // Then the Backend API's user list, which has what the CSV lacks (social connections,
    // bans, last sign-in) but no digests or secrets, as an UPSERT on external_id: Jane gains
    // her Google sign-in and keeps her password and app; John is banned.
    let api = serde_json::json!([
        {"id": "user_2YDryYFVMM1W1plDDKz7Gzf4we6", "object": "user", "first_name": "Jane",
         "last_name": "Doe", "primary_email_address_id": "idn_1",
         "email_addresses": [{"id": "idn_1", "object": "email_address",
                              "email_address": "jane@example.com",
                              "verification": {"status": "verified"}}],
         "phone_numbers": [], "external_accounts": [
             {"object": "google_account", "provider": "oauth_google",
              "provider_user_id": "110248495921238986420", "email_address": "jane@gmail.com"}],
         "password_enabled": true, "totp_enabled": true, "banned": false,
         "last_sign_in_at": 1_733_000_000_000_i64, "created_at": 1_700_000_000_000_i64,
         "public_metadata": {"plan": "team"}, "private_metadata": {}, "unsafe_metadata": {}},
        {"id": "user_2ZZCgLE7kJG2CRBxTZ6YUIvzS10", "object": "user", "banned": true,
         "last_sign_in_at": 1_733_000_000_000_i64,
         "email_addresses": [], "phone_numbers": [], "external_accounts": []}
    ]);
    let file = dir.join("clerk-api.json");
    std::fs::write(&file, serde_json::to_string_pretty(&api).unwrap()).unwrap();
    let upsert = ["--mode", "upsert", "--match-on", "external-id"];
    let (code, err, reasons) = import_from(&app, &file, "clerk", &upsert).await;
    assert_eq!(code, 0, "{err} {reasons:?}");
    assert!(err.contains("0 created, 2 updated, 0 failed"), "{err}");
    let by_google =
        crate::identities::lookup(&mut app.identities(), "google", "110248495921238986420")
            .await
            .unwrap()
            .user
            .unwrap();
    assert_eq!(by_google.id, jane.id);
    // Her sign-in here above is later than Clerk's last one: the later is kept.
    assert!(by_google.last_login_at.unwrap().seconds > 1_733_000_000);
    assert_eq!(
        by_google.app_metadata.unwrap(),
        crate::pb_struct(serde_json::json!({"plan": "team"}))
    );
    assert!(signs_in(&app, "jane@example.com", LEGACY_PASSWORD).await);
    // (Her app's code was used above: this step's code would be a replay. Her factor is
    // still there.)
    assert_eq!(
        by_google.enrolled_methods,
        [
            pb::AuthenticatorType::Password as i32,
            pb::AuthenticatorType::Totp as i32
        ]
    );
    let john = crate::user_by_email(&mut users, "john@example.com").await;
    assert_eq!(john.status, pb::UserStatus::Blocked as i32);
    assert_eq!(john.blocked_reason, "banned in Clerk");
    assert_eq!(john.last_login_at.unwrap().seconds, 1_733_000_000);
}

/// Moving off Ory Kratos: identities as the admin API gives them with `include_credential`
/// (and one row as the README's database query writes it) import with `--from kratos`:
/// bcrypt and Kratos's own scrypt and PBKDF2-SHA1 spellings sign in, the TOTP app and the
/// unused recovery codes keep working, OIDC and SAML sign-ins become identities, traits become the profile; an inactive
/// identity arrives blocked, and one listed without its credentials' configs is refused
/// rather than imported without its password.
#[tokio::test]
async fn a_kratos_export_imports_with_passwords_and_totp() {
    use crate::passwords::{LEGACY_HASHES, LEGACY_PASSWORD};
    let app = TestApp::spawn().await;
    let dir = scratch_dir("kratos");
    let (_, bcrypt) = LEGACY_HASHES.iter().find(|(n, _)| *n == "bcrypt").unwrap();
    // LEGACY_PASSWORD under scrypt (N=1024) and PBKDF2-SHA1 (10,000 rounds), salt
    // "roster-fixture-salt", written as Kratos writes them (Python's hashlib).
    let scrypt = "$scrypt$ln=1024,r=8,p=1$cm9zdGVyLWZpeHR1cmUtc2FsdA==$ly39Byjh1alWA0zXTETO+sZH91tCTx6skWCbtz5IfV4=";
    let pbkdf2 = "$pbkdf2-sha1$i=10000,l=20$cm9zdGVyLWZpeHR1cmUtc2FsdA$FbCkJsQS2mu4E+Drb6Xbs8BZ7oA";
    let (seed, secret) = seed_of(13);
    let id = |n: u8| format!("9f425a8d-7efc-4768-8f23-7647a74fdf{n:02x}");
    let password = |hash: &str| {
        serde_json::json!({"type": "password", "identifiers": [], "version": 0,
            "config": {"hashed_password": hash}})
    };
    let rows = [
        serde_json::json!({
            "id": id(1), "schema_id": "default", "schema_url": "http://kratos/schemas/ZGVmYXVsdA",
            "state": "active", "state_changed_at": "2024-01-15T10:30:00.123456Z",
            "traits": {"email": "kim@example.com", "name": {"first": "Kim", "last": "Lee"},
                       "newsletter": true},
            "verifiable_addresses": [{"id": id(11), "value": "kim@example.com",
                "verified": true, "via": "email", "status": "completed"}],
            "recovery_addresses": [{"id": id(12), "value": "kim@example.com", "via": "email"}],
            "metadata_public": {"plan": "pro"}, "metadata_admin": {"crm": 42},
            "created_at": "2024-01-15T10:30:00.123456Z", "updated_at": "2024-02-01T00:00:00Z",
            "organization_id": null,
            "credentials": {
                "password": password(bcrypt),
                "oidc": {"type": "oidc", "identifiers": ["google:1099"], "config": {"providers": [
                    {"provider": "google", "subject": "1099",
                     "initial_access_token": "a-google-access-token"}]}},
                "saml": {"type": "saml", "identifiers": ["okta:kim"], "config": {"providers": [
                    {"provider": "okta", "subject": "kim"}]}},
                "totp": {"type": "totp", "config": {"totp_url": format!(
                    "otpauth://totp/Acme:kim@example.com?secret={secret}&issuer=Acme&algorithm=SHA1&digits=6&period=30")}},
                "lookup_secret": {"type": "lookup_secret", "config": {"recovery_codes": [
                    {"code": "k7x2m9qa", "used_at": null},
                    {"code": "p3n8w1zd", "used_at": "2024-03-01T09:00:00Z"},
                    {"code": "c4v6b0ty"}]}}
            }
        }),
        serde_json::json!({"id": id(2), "state": "active",
            "traits": {"email": "lee@example.com", "username": "lee"},
            "credentials": {"password": password(scrypt)}}),
        serde_json::json!({"id": id(3), "state": "inactive",
            "traits": {"email": "pia@example.com"},
            "credentials": {"password": password(pbkdf2)}}),
        // As the README's query of Kratos's database writes a row: `timestamp` columns
        // without a zone, credentials by type with their configs.
        serde_json::json!({"id": id(4), "state": "active", "traits": {"phone": "+4915112345678"},
            "created_at": "2023-06-01T12:00:00.5", "metadata_public": null,
            "metadata_admin": null, "organization_id": null,
            "verifiable_addresses": [{"value": "+4915112345678", "via": "sms", "verified": true}],
            "credentials": {"password": {"config": {"use_password_migration_hook": true},
                "created_at": "2023-06-01T12:00:00.5"}}}),
        // From the list endpoint: credentials without their configs.
        serde_json::json!({"id": id(5), "state": "active", "traits": {"email": "oli@example.com"},
            "credentials": {"password": {"type": "password",
                "identifiers": ["oli@example.com"], "version": 0}}}),
    ];
    let file = dir.join("identities.jsonl");
    let lines: Vec<String> = rows.iter().map(|r| r.to_string()).collect();
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let (code, err, reasons) = import_from(&app, &file, "kratos", &[]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("4 created, 0 updated, 1 failed"), "{err}");
    assert_eq!(reasons.len(), 1);
    assert!(
        reasons[0].contains("include_credential=password"),
        "{reasons:?}"
    );
    assert!(!err.contains("a-google-access-token"), "{err}");

    let mut users = app.users();
    let kim = crate::user_by_email(&mut users, "kim@example.com").await;
    assert_eq!(kim.external_id, id(1));
    assert_eq!(
        (kim.given_name.as_str(), kim.family_name.as_str()),
        ("Kim", "Lee")
    );
    assert!(kim.email_verified);
    assert_eq!(
        kim.user_metadata.clone().unwrap(),
        crate::pb_struct(serde_json::json!({"newsletter": true}))
    );
    assert_eq!(
        kim.app_metadata.clone().unwrap(),
        crate::pb_struct(serde_json::json!({"plan": "pro", "crm": 42}))
    );
    assert_eq!(
        sign_in(&app, "kim@example.com", "wrong").await,
        pb::VerifyPasswordResult::InvalidCredentials
    );
    assert!(signs_in(&app, "kim@example.com", LEGACY_PASSWORD).await);
    assert!(totp_works(&app, &kim.id, &seed).await);
    for (provider, subject) in [("google", "1099"), ("okta", "kim")] {
        let found = crate::identities::lookup(&mut app.identities(), provider, subject)
            .await
            .unwrap()
            .user
            .unwrap();
        assert_eq!(found.id, kim.id, "{provider}");
    }
    // The unused recovery codes work as Kratos issued them; the used one stays used.
    use pb::VerifyFactorResult as R;
    assert_eq!(
        recovery_code(&app, &kim.id, "p3n8w1zd").await,
        R::InvalidCode
    );
    assert_eq!(recovery_code(&app, &kim.id, "k7x2m9qa").await, R::Ok);
    assert_eq!(
        recovery_code(&app, &kim.id, "k7x2m9qa").await,
        R::CodeReused
    );
    assert_eq!(recovery_code(&app, &kim.id, "c4v6b0ty").await, R::Ok);
    let factors = crate::factors::list_of(&mut app.authenticators(), &kim.id).await;
    let mut types: Vec<i32> = factors.iter().map(|a| a.r#type).collect();
    types.sort();
    assert_eq!(
        types,
        [
            pb::AuthenticatorType::Totp as i32,
            pb::AuthenticatorType::RecoveryCodes as i32
        ],
        "{factors:?}"
    );

    let lee = crate::user_by_email(&mut users, "lee@example.com").await;
    assert_eq!(lee.username, "lee");
    assert!(signs_in(&app, "lee@example.com", LEGACY_PASSWORD).await);
    let pia = crate::user_by_email(&mut users, "pia@example.com").await;
    assert_eq!(pia.status, pb::UserStatus::Blocked as i32);
    assert_eq!(pia.blocked_reason, "inactive in Kratos");
    assert_eq!(
        crate::list::emails(&mut users, "password_format = \"pbkdf2-sha1\"")
            .await
            .unwrap(),
        ["pia@example.com"]
    );
    let nia = crate::user_by(
        &mut users,
        pb::lookup_user_request::Key::PhoneNumber("+4915112345678".into()),
    )
    .await;
    assert!(nia.phone_verified);
    assert_eq!(nia.created_at.unwrap().seconds, 1_685_620_800);
    assert_eq!(
        nia.app_metadata.clone().unwrap(),
        crate::pb_struct(serde_json::json!({"legacy_password": true}))
    );
}

/// Moving off ZITADEL: an instance's export (`POST /admin/v1/export` with passwords and
/// OTP, one line of protobuf JSON as the API answers) imports with `--from zitadel`: each
/// organization's human users, with bcrypt and passlib PBKDF2 passwords that sign in, the
/// authenticator app, metadata and the organization in `app_metadata`, identity provider
/// links as identities; service accounts, projects and policies are left out.
#[tokio::test]
async fn a_zitadel_export_imports_with_passwords_and_totp() {
    use crate::passwords::{LEGACY_HASHES, LEGACY_PASSWORD};
    use base64::Engine as _;
    let app = TestApp::spawn().await;
    let dir = scratch_dir("zitadel");
    let hash = |name: &str, prefix: &str| {
        LEGACY_HASHES
            .iter()
            .find(|(n, h)| *n == name && h.starts_with(prefix))
            .unwrap()
            .1
    };
    let (seed, secret) = seed_of(29);
    let b64 = |t: &str| base64::engine::general_purpose::STANDARD.encode(t);
    let export = serde_json::json!({"orgs": [
        {
            "orgId": "259242039378444290", "org": {"name": "ACME"},
            "domainPolicy": {"userLoginMustBeDomain": true},
            "loginPolicy": {"allowUsernamePassword": true, "forceMfa": false},
            "humanUsers": [
                {"userId": "259242039378509826", "user": {
                    "userName": "zoe", "profile": {"firstName": "Zoe", "lastName": "Ng",
                        "nickName": "z", "displayName": "Zoe Ng", "preferredLanguage": "de",
                        "gender": "GENDER_FEMALE"},
                    "email": {"email": "zoe@acme.test", "isEmailVerified": true},
                    "phone": {"phone": "+41791234567", "isPhoneVerified": false},
                    "hashedPassword": {"value": hash("bcrypt", "$2b$")},
                    "otpCode": secret}},
                {"userId": "259242039378575362", "user": {
                    "userName": "yan@acme.test", "profile": {"firstName": "Yan",
                        "lastName": "Li", "displayName": "Yan Li", "preferredLanguage": "und"},
                    "email": {"email": "yan@acme.test"},
                    "hashedPassword": {"value": hash("pbkdf2-sha256", "$pbkdf2-sha256$10000$")}}}
            ],
            "machineUsers": [{"userId": "259242039378640898",
                "user": {"userName": "ci-bot", "name": "CI"}}],
            "userMetadata": [
                {"id": "259242039378509826", "key": "plan", "value": b64("pro")},
                {"id": "259242039378509826", "key": "seats", "value": b64("12")},
                {"id": "259242039378640898", "key": "owner", "value": b64("ops")}
            ],
            "userLinks": [{"userId": "259242039378575362", "idpId": "259242039378706434",
                "idpName": "Google", "providedUserId": "1098765",
                "providedUserName": "yan@gmail.com", "idpType": "IDP_TYPE_OIDC"}],
            "projects": [{"projectId": "1", "project": {"name": "app"}}],
            "userGrants": [{"userId": "259242039378509826", "projectId": "1",
                "roleKeys": ["admin", "billing"]}]
        },
        {
            "orgId": "259242039378771970", "org": {"name": "Globex"},
            "humanUsers": [{"userId": "259242039378837506", "user": {
                "userName": "xia", "profile": {"firstName": "Xia", "lastName": "Wu"},
                "email": {"email": "xia@globex.test", "isEmailVerified": true},
                "hashedPassword": {"value": "$1$md5salt$0123456789abcdefghijkl"}}}]
        }
    ]});
    let file = dir.join("export.json");
    std::fs::write(&file, export.to_string()).unwrap();
    let (code, err, reasons) = import_from(&app, &file, "zitadel", &[]).await;
    assert_eq!(code, 2, "{err} {reasons:?}");
    assert!(err.contains("2 created, 0 updated, 1 failed"), "{err}");
    assert!(
        reasons[0].contains("not a supported password hash"),
        "the md5-crypt user: {reasons:?}"
    );

    let mut users = app.users();
    let zoe = crate::user_by_email(&mut users, "zoe@acme.test").await;
    assert_eq!(zoe.external_id, "259242039378509826");
    assert_eq!(
        (
            zoe.username.as_str(),
            zoe.given_name.as_str(),
            zoe.family_name.as_str(),
            zoe.display_name.as_str(),
            zoe.locale.as_str()
        ),
        ("zoe", "Zoe", "Ng", "Zoe Ng", "de")
    );
    assert!(zoe.email_verified && !zoe.phone_verified);
    assert_eq!(zoe.phone_number, "+41791234567");
    assert_eq!(
        zoe.app_metadata.clone().unwrap(),
        crate::pb_struct(serde_json::json!({"plan": "pro", "seats": 12,
            "zitadel_org_id": "259242039378444290", "zitadel_org": "ACME",
            "zitadel_grants": [{"project_id": "1", "project": "app",
                                "roles": ["admin", "billing"]}]}))
    );
    assert_eq!(
        zoe.user_metadata.clone().unwrap(),
        crate::pb_struct(serde_json::json!({"nickname": "z", "gender": "female"}))
    );
    assert!(signs_in(&app, "zoe@acme.test", LEGACY_PASSWORD).await);
    assert!(totp_works(&app, &zoe.id, &seed).await);

    let yan = crate::user_by_email(&mut users, "yan@acme.test").await;
    assert_eq!(yan.locale, "", "und: no language chosen");
    assert!(!yan.email_verified);
    assert!(signs_in(&app, "yan@acme.test", LEGACY_PASSWORD).await);
    let found = crate::identities::lookup(&mut app.identities(), "Google", "1098765")
        .await
        .unwrap()
        .user
        .unwrap();
    assert_eq!(found.id, yan.id);
    // The service account is not a user.
    let all = crate::list::emails(&mut users, "").await.unwrap();
    assert_eq!(all.len(), 2, "{all:?}");
}

/// Moving off Okta: users as the README's loop over `GET /api/v1/users` writes them (one
/// per line) import with `--from okta`: profiles, states and times carried, users who had an
/// Okta password marked for the sign-in migration, a social user not.
#[tokio::test]
async fn an_okta_user_list_imports_with_states_and_the_migration_mark() {
    let app = TestApp::spawn().await;
    let dir = scratch_dir("okta");
    let user = |id: &str, status: &str, login: &str, password: bool| {
        let mut credentials = serde_json::json!({"provider": {"type": "OKTA", "name": "OKTA"}});
        if password {
            credentials["password"] = serde_json::json!({});
        }
        // As an Identity Engine org lists a verified address (ada's only here).
        if id == "00u1" {
            credentials["emails"] =
                serde_json::json!([{"value": login, "status": "VERIFIED", "type": "PRIMARY"}]);
        }
        serde_json::json!({"id": id, "status": status, "created": "2021-03-04T05:06:07.000Z",
            "activated": null, "statusChanged": "2021-03-04T05:06:08.000Z",
            "lastLogin": null, "lastUpdated": "2021-03-04T05:06:08.000Z",
            "passwordChanged": null, "type": {"id": "oty1"},
            "profile": {"firstName": "F", "lastName": "L", "email": login, "login": login,
                "mobilePhone": null, "secondEmail": null, "plan": "gold"},
            "credentials": credentials,
            "_links": {"self": {"href": format!("https://acme.okta.com/api/v1/users/{id}")}}})
        .to_string()
    };
    let lines = [
        user("00u1", "ACTIVE", "ada@acme.test", true),
        user("00u2", "STAGED", "bo@acme.test", true),
        user("00u3", "SUSPENDED", "cy@acme.test", true),
        user("00u4", "ACTIVE", "di@acme.test", false),
    ];
    let file = dir.join("okta-users.jsonl");
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let (code, err, reasons) = import_from(&app, &file, "okta", &[]).await;
    assert_eq!(code, 0, "{err} {reasons:?}");
    assert!(err.contains("4 created"), "{err}");
    let mut users = app.users();
    let ada = crate::user_by_email(&mut users, "ada@acme.test").await;
    assert_eq!(ada.external_id, "00u1");
    assert_eq!(
        (ada.given_name.as_str(), ada.family_name.as_str()),
        ("F", "L")
    );
    assert_eq!(ada.username, "", "the login is the email");
    assert_eq!(ada.created_at.unwrap().seconds, 1_614_834_367);
    assert_eq!(ada.status, pb::UserStatus::Active as i32);
    assert!(ada.email_verified);
    assert_eq!(
        ada.user_metadata.clone().unwrap(),
        crate::pb_struct(serde_json::json!({"plan": "gold"}))
    );
    let bo = crate::user_by_email(&mut users, "bo@acme.test").await;
    assert_eq!(bo.status, pb::UserStatus::PendingVerification as i32);
    assert!(!bo.email_verified, "Okta did not say");
    let cy = crate::user_by_email(&mut users, "cy@acme.test").await;
    assert_eq!(cy.status, pb::UserStatus::Blocked as i32);
    assert_eq!(cy.blocked_reason, "suspended in Okta");
    assert_eq!(
        crate::list::emails(&mut users, "app_metadata.legacy_password = true")
            .await
            .unwrap(),
        ["ada@acme.test", "bo@acme.test", "cy@acme.test"],
        "every user who had an Okta password, not the social one"
    );
}

/// Moving off Appwrite: users as the README's script lists them with a server key (one per
/// line) import with `--from appwrite`: Appwrite's own argon2id and a Firebase scrypt hash
/// Appwrite kept for an imported user sign in, labels and prefs carried, a blocked user
/// blocked, an MFA user marked, an MD5 hash refused by name.
#[tokio::test]
async fn an_appwrite_user_list_imports_with_passwords() {
    use crate::passwords::{LEGACY_HASHES, LEGACY_PASSWORD};
    let app = TestApp::spawn().await;
    let dir = scratch_dir("appwrite");
    // The Firebase vector the password tests use, taken apart as Appwrite keeps it.
    let fire = LEGACY_HASHES
        .iter()
        .find(|(n, _)| *n == "firebase-scrypt")
        .unwrap()
        .1;
    let parts: Vec<&str> = fire.split('$').collect();
    let user = |id: &str, email: &str, extra: serde_json::Value| {
        let mut u = serde_json::json!({"$id": id, "$createdAt": "2024-05-01T10:00:00.000+00:00",
            "$updatedAt": "2024-05-02T10:00:00.000+00:00", "name": "N", "registration":
            "2024-05-01T10:00:00.000+00:00", "status": true, "labels": [],
            "passwordUpdate": "", "email": email, "phone": "", "emailVerification": true,
            "phoneVerification": false, "mfa": false, "prefs": {}, "targets": [],
            "accessedAt": "2024-06-01T00:00:00.000+00:00"});
        u.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        u.to_string()
    };
    let lines = [
        user(
            "ada",
            "ada@aw.test",
            serde_json::json!({"hash": "argon2",
            "password": "$argon2id$v=19$m=65536,t=4,p=3$YXBwd3JpdGUtZml4dHVyZQ$sEF0JDoice72BMDG8bT+xRFWvrm0tMupBaR3mIG9xt8",
            "hashOptions": {"type": "argon2", "memoryCost": 65536, "timeCost": 4, "threads": 3},
            "labels": ["vip"], "prefs": {"theme": "dark"}}),
        ),
        user(
            "fay",
            "fay@aw.test",
            serde_json::json!({"hash": "scryptMod",
            "password": parts[4], "hashOptions": {"type": "scryptMod", "salt": parts[3],
                "saltSeparator": parts[5], "signerKey": parts[6]}}),
        ),
        user(
            "gus",
            "gus@aw.test",
            serde_json::json!({"status": false, "mfa": true}),
        ),
        user(
            "hal",
            "hal@aw.test",
            serde_json::json!({"hash": "md5",
            "password": "5f4dcc3b5aa765d61d8327deb882cf99", "hashOptions": {"type": "md5"}}),
        ),
    ];
    let file = dir.join("appwrite-users.jsonl");
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let (code, err, reasons) = import_from(&app, &file, "appwrite", &[]).await;
    assert_eq!(code, 2, "{err} {reasons:?}");
    assert!(err.contains("3 created, 0 updated, 1 failed"), "{err}");
    assert!(
        reasons[0].contains("Appwrite's md5 hashes cannot be carried"),
        "{reasons:?}"
    );
    assert!(!err.contains("5f4dcc3b"), "{err}");

    let mut users = app.users();
    let ada = crate::user_by_email(&mut users, "ada@aw.test").await;
    assert_eq!(
        (ada.external_id.as_str(), ada.display_name.as_str()),
        ("ada", "N")
    );
    assert!(ada.email_verified);
    assert_eq!(ada.phone_number, "");
    assert_eq!(
        ada.app_metadata.clone().unwrap(),
        crate::pb_struct(serde_json::json!({"labels": ["vip"]}))
    );
    assert_eq!(
        ada.user_metadata.clone().unwrap(),
        crate::pb_struct(serde_json::json!({"theme": "dark"}))
    );
    assert!(signs_in(&app, "ada@aw.test", LEGACY_PASSWORD).await);
    assert!(signs_in(&app, "fay@aw.test", LEGACY_PASSWORD).await);
    let gus = crate::user_by_email(&mut users, "gus@aw.test").await;
    assert_eq!(gus.status, pb::UserStatus::Blocked as i32);
    assert_eq!(gus.blocked_reason, "blocked in Appwrite");
    assert_eq!(
        gus.app_metadata.clone().unwrap(),
        crate::pb_struct(serde_json::json!({"appwrite_mfa": true}))
    );
}

/// Moving off Better Auth: rows as the README's query reads them from a database Better Auth
/// 1.7 made (its admin, username and phone number plugins, a column of the app's own, a
/// Google account linked with its tokens, which the query leaves out) import with `--from
/// better-auth`: Better Auth's scrypt passwords sign in, the Google account finds its user,
/// a banned user arrives blocked; a user with two-factor on is refused, saying why.
#[tokio::test]
async fn a_better_auth_database_imports_with_passwords() {
    let app = TestApp::spawn().await;
    let dir = scratch_dir("better-auth");
    // As `psql -At` wrote them; the passwords were hashed by better-auth/crypto.
    let rows = [
        r#"{"id": "xVCyKCBLCHfJqjFa3GSBOv4vm4pLeLy5", "name": "Bob", "plan": null, "role": "user", "email": "bob@example.com", "image": null, "banned": true, "accounts": [{"password": "d15f09508a32fdf2518e7fa78528f74e:25438f03269f4e19fe5cc73d2b3db98c1eb52e40d4f1020ebb4f741cc4645fc3e05d95856148a210a0b126f20cfbeb3799f6b9a11747abccd054d39331fb475b", "accountId": "xVCyKCBLCHfJqjFa3GSBOv4vm4pLeLy5", "providerId": "credential"}], "username": null, "banReason": "spam", "createdAt": "2026-12-07T17:02:31.713+00:00", "updatedAt": "2026-12-07T17:02:31.727+00:00", "banExpires": null, "phoneNumber": null, "emailVerified": false, "displayUsername": null, "phoneNumberVerified": null}"#.to_string(),
        r#"{"id": "wwLQmIqhrRg76ZONPx2NQxNI2UDiK2i4", "name": "Ann Lee", "plan": "pro", "role": "admin", "email": "ann@example.com", "image": null, "banned": false, "accounts": [{"password": "032e48199ef963b7fc6f88fffea0281b:8eb1e44375a6b6751569511ae9e01a1fba9e79a195b672b0703214e332a34e2b1eaf6517189f1caa48c64dc9877193b01402f98e63594e7f85a66086486fb5fc", "accountId": "wwLQmIqhrRg76ZONPx2NQxNI2UDiK2i4", "providerId": "credential"}, {"password": null, "accountId": "1076543210", "providerId": "google"}], "username": "ann_l", "banReason": null, "createdAt": "2026-12-07T17:02:31.569+00:00", "updatedAt": "2026-12-07T17:02:31.73+00:00", "banExpires": null, "phoneNumber": null, "emailVerified": true, "displayUsername": "Ann_L", "phoneNumberVerified": null}"#.to_string(),
        // Two-factor on, its TOTP secret sealed by the two-factor plugin's way under
        // BETTER_AUTH_SECRET (the query's twoFactors).
        r#"{"id": "nwxvNGUZEA4N1SN8149nx0BxGqVUwTxK", "name": "T", "email": "tia@example.com", "image": null, "accounts": [{"password": "949aea412989174b850b03bd2ab5b6e6:dac6fccfe17d20692eae8fed574699aa1f3bc2ba2995c109744810144cc9be90450d767ced9479f0e08727f3a76d4e7c55b83c312bcfebb910e55709404b51ce", "accountId": "nwxvNGUZEA4N1SN8149nx0BxGqVUwTxK", "providerId": "credential"}], "createdAt": "2026-12-07T17:07:29.687+00:00", "updatedAt": "2026-12-07T17:07:29.715+00:00", "twoFactors": [{"secret": "319ba4a10c8c4065eaa19b45b2003cfc50ba36b6b63991396026f89fb251456384a698817e18fbe42855632309268450abb4fb0af5c3232fd01b46721b85d99afd982dc49e5ed2e6", "verified": true}], "emailVerified": false, "twoFactorEnabled": true}"#.to_string(),
        serde_json::json!({"id": "2FAuser", "name": "Una", "email": "una@example.com",
            "emailVerified": true, "createdAt": "2026-12-07T17:02:31.569+00:00",
            "twoFactorEnabled": true})
        .to_string(),
    ];
    let file = dir.join("better-auth-users.jsonl");
    std::fs::write(&file, rows.join("\n") + "\n").unwrap();
    let env = dir.join(".env");
    std::fs::write(
        &env,
        "DATABASE_URL=postgres://app@db/app\nBETTER_AUTH_SECRET=\"legacy-secret-0123456789abcdefghijklmnop\"\n",
    )
    .unwrap();
    let (code, err, reasons) = import_from(
        &app,
        &file,
        "better-auth",
        &["--better-auth-secret-file", env.to_str().unwrap()],
    )
    .await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("3 created, 0 updated, 1 failed"), "{err}");
    assert!(
        reasons[0].contains("two-factor is on, and the row has no twoFactors"),
        "{reasons:?}"
    );
    assert!(!err.contains("legacy-secret"), "{err}");

    let mut users = app.users();
    let ann = crate::user_by_email(&mut users, "ann@example.com").await;
    assert_eq!(ann.external_id, "wwLQmIqhrRg76ZONPx2NQxNI2UDiK2i4");
    assert_eq!(
        (ann.display_name.as_str(), ann.username.as_str()),
        ("Ann Lee", "ann_l")
    );
    assert!(ann.email_verified);
    assert_eq!(ann.created_at.unwrap().seconds, 1_796_662_951);
    assert_eq!(
        ann.app_metadata.clone().unwrap(),
        crate::pb_struct(serde_json::json!({"role": "admin"}))
    );
    assert_eq!(
        ann.user_metadata.clone().unwrap(),
        crate::pb_struct(serde_json::json!({"plan": "pro"}))
    );
    assert_eq!(
        sign_in(&app, "ann@example.com", "correct horse battery stapler").await,
        pb::VerifyPasswordResult::InvalidCredentials
    );
    assert!(signs_in(&app, "ann@example.com", "correct horse battery staple").await);
    let found = crate::identities::lookup(&mut app.identities(), "google", "1076543210")
        .await
        .unwrap()
        .user
        .unwrap();
    assert_eq!(found.id, ann.id);

    let bob = crate::user_by_email(&mut users, "bob@example.com").await;
    assert_eq!(bob.status, pb::UserStatus::Blocked as i32);
    assert_eq!(bob.blocked_reason, "banned in Better Auth: spam");
    assert!(!bob.email_verified);
    assert_eq!(
        crate::list::emails(&mut users, "password_format = \"scrypt\"")
            .await
            .unwrap(),
        ["bob@example.com", "tia@example.com"],
        "scrypt until the first sign-in: Ann's is argon2id now"
    );

    let tia = crate::user_by_email(&mut users, "tia@example.com").await;
    assert!(signs_in(&app, "tia@example.com", "correct horse battery staple").await);
    assert!(totp_works(&app, &tia.id, b"ABCDEFGHIJKLMNOPQRSTUVWXYZ012345").await);
}

/// Better Auth on SQLite: `sqlite3 -json` (the README's SQLite query) writes one JSON array,
/// booleans as 0/1 and the accounts, two-factor and membership rows as JSON text; read
/// alike, the two-factor users' apps and unused backup codes carried, with `--better-auth-otp
/// email` the plugin's OTP method as an email channel, and organizations in app_metadata.
#[tokio::test]
async fn a_better_auth_sqlite_database_imports() {
    let app = TestApp::spawn().await;
    let dir = scratch_dir("better-auth");
    // As sqlite3 -json wrote it from a database Better Auth 1.7 made with better-sqlite3.
    let file = dir.join("better-auth-users.json");
    std::fs::write(&file, r#"[{"id":"WJU4XpMcOOXLKsntLqpuCOE5deuKH7wh","name":"Ann Lee","email":"ann@example.com","emailVerified":1,"image":null,"createdAt":"2026-12-07T17:22:46.113Z","updatedAt":"2026-12-07T17:22:46.255Z","role":"admin","banned":0,"banReason":null,"banExpires":null,"username":"ann_l","displayUsername":"Ann_L","phoneNumber":null,"phoneNumberVerified":null,"plan":"pro","organizations":"[{\"id\":\"9Qq0eNArddfjBWcc5zXAV0yMDwKUv8b1\",\"slug\":\"acme\",\"name\":\"Acme Inc.\",\"role\":\"owner\",\"createdAt\":\"2026-12-07T21:21:46.399Z\"}]","accounts":"[{\"providerId\":\"credential\",\"accountId\":\"WJU4XpMcOOXLKsntLqpuCOE5deuKH7wh\",\"password\":\"c03773393340e6f26151050165183273:fda43de002104d1cfe05b92a567bf9b467aaa9e7583ce590f88a77b88214e493cff5a6e12d026f76df2ab47c1e1d97afd71557910b69cea3fad61e3ba8f3c2e1\"},{\"providerId\":\"google\",\"accountId\":\"1076543210\",\"password\":null}]"},{"id":"oi05W6pbQVLe7uvdaS6KtLinJkwNeIPt","name":"Bob","email":"bob@example.com","emailVerified":0,"image":null,"createdAt":"2026-12-07T17:22:46.240Z","updatedAt":"2026-12-07T17:22:46.250Z","role":"user","banned":1,"banReason":"spam","banExpires":null,"username":null,"displayUsername":null,"phoneNumber":null,"phoneNumberVerified":null,"plan":null,"accounts":"[{\"providerId\":\"credential\",\"accountId\":\"oi05W6pbQVLe7uvdaS6KtLinJkwNeIPt\",\"password\":\"212b443b4330d68e61b34b1d0aa0eeaa:d99d2934b0fdd93230f5401c25ab4d66ff6ddfa107da4a0c951e07847c57d4ea6295af1688f90a46e757c0f9aaf6f8524235e0710ca8c60606328f0671c71d8e\"}]"},{"id":"EhoiMOW7qEn09LxKBkM8aG4lzK7M7hXQ","name":"T","email":"tia@example.com","emailVerified":0,"image":null,"createdAt":"2026-12-07T17:23:43.966Z","updatedAt":"2026-12-07T17:23:43.985Z","twoFactorEnabled":1,"accounts":"[{\"providerId\":\"credential\",\"accountId\":\"EhoiMOW7qEn09LxKBkM8aG4lzK7M7hXQ\",\"password\":\"f9fcfce614ea096769f55c140c2b7fdb:1926097062e756a94a3ae22d7bdcb161695052b8f66b0e71b5f2fe5de58d94539e40b9ab28e6a995c323e048742f635058eec6811980b1bf805e851fbfec701d\"}]","twoFactors":"[{\"secret\":\"fb9b9773d44c1c7bf0d87f7e4ba17872e1689b2f746b849adee0675ecdcb858a05efbdd09dbaea0cbe5f745961ec3bcb2cded377e63d2b32a086bb514afe9e840d934f4dab323769\",\"verified\":1}]"},{"id":"IJ9urdbgSEiKztNbm5DUDhMrMQ6vCqh8","name":"Bea","email":"bea@example.com","emailVerified":0,"image":null,"createdAt":"2026-12-07T18:48:26.994Z","updatedAt":"2026-12-07T18:48:27.122Z","twoFactorEnabled":1,"accounts":"[{\"providerId\":\"credential\",\"accountId\":\"IJ9urdbgSEiKztNbm5DUDhMrMQ6vCqh8\",\"password\":\"08d19dde970353085dfdbafcac1674d5:83c91f3c79aa9086ef4528fff54c35f85e57c6c01961b7755db30577de23881b57f2357078692afe4b907310fab0dff7b053aa4c08fbd6c4447cbda54ae7f5c5\"}]","twoFactors":"[{\"secret\":\"be5f2605b6558f46ecc2ec3d9be4dc684332e2d78567e66d15a9be7e297410c3251e1df7a9687d9d57a7043ec2603442cd3241e22d97c95bcf8879d931f0b8a96097885c120beef4\",\"verified\":1,\"backupCodes\":\"ff0e43f26d22bc90c2d83858e7585cad85932cd58e09a78441e003e601b293f1f01daf7aa2b698b6435cc38fa1e9d3c03778bb47bc8fa21c7d914f3867fd2d61afe4ad2eda36e79f0e54302f259d7460a80d0a12ff83ce7fdabd47c6100322fe655e17c62084e9186358bef5ff98c1392330b3d1b76400a8c6726514260e6f571b0c63fdd98e31ced0b891a88c3ec15f82de621abee7e6171605556bebef8f8e180f2747065fe7\"}]"},{"id":"xT1C1UDgodL3usQKuKrKWz9ro7RD7oo7","name":"Ola","email":"ola@example.com","emailVerified":1,"image":null,"createdAt":"2026-12-07T19:05:25.400Z","updatedAt":"2026-12-07T19:05:25.562Z","twoFactorEnabled":1,"accounts":"[{\"providerId\":\"credential\",\"accountId\":\"xT1C1UDgodL3usQKuKrKWz9ro7RD7oo7\",\"password\":\"df2a5cda8e92d4e16da03f524457f931:09e75eae111b00b209b03a26093d4ad60944e9e577e879cab638af721482e75dac95eb2f1f22a13491759620fbc16ebae6f68a79adc813ee5f792a1116bd0b79\"}]","twoFactors":"[]"}]"#).unwrap();
    let secret = dir.join("secret");
    std::fs::write(&secret, "legacy-secret-0123456789abcdefghijklmnop\n").unwrap();
    let (code, err, reasons) = import_from(
        &app,
        &file,
        "better-auth",
        &[
            "--better-auth-secret-file",
            secret.to_str().unwrap(),
            "--better-auth-otp",
            "email",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err} {reasons:?}");
    assert!(err.contains("5 created"), "{err}");
    let mut users = app.users();
    let tia = crate::user_by_email(&mut users, "tia@example.com").await;
    assert!(totp_works(&app, &tia.id, b"ABCDEFGHIJKLMNOPQRSTUVWXYZ012345").await);
    // Bea turned two-factor on through the plugin's own enableTwoFactor, which gave her
    // ten backup codes, and spent the first (WRDfI-MXjPg) signing in: her app and the nine
    // left work here, as Better Auth compared them (case kept).
    let bea = crate::user_by_email(&mut users, "bea@example.com").await;
    assert!(totp_works(&app, &bea.id, b"LsBHy7mEEvORtqQEO7XIuC_48l_XX3CL").await);
    use pb::VerifyFactorResult as R;
    assert_eq!(
        recovery_code(&app, &bea.id, "WRDfI-MXjPg").await,
        R::InvalidCode
    );
    assert_eq!(
        recovery_code(&app, &bea.id, "ytqtq-y2fmi").await,
        R::InvalidCode
    );
    assert_eq!(recovery_code(&app, &bea.id, "YTqtq-Y2Fmi").await, R::Ok);
    assert_eq!(recovery_code(&app, &bea.id, "oQepB-oyaq9").await, R::Ok);
    assert_eq!(
        recovery_code(&app, &bea.id, "oQepBoyaq9").await,
        R::CodeReused
    );
    // The app served the plugin's OTP method too (codes by email): Ola turned two-factor on
    // with it alone, and every two-factor user may take codes by email here as there, the
    // app staying the default where there is one.
    let mut authn = app.authenticators();
    let factors = |id: &str| {
        let (mut authn, id) = (authn.clone(), id.to_string());
        async move {
            crate::factors::list_of(&mut authn, &id)
                .await
                .iter()
                .map(|a| (a.r#type, a.is_default, a.email.clone()))
                .collect::<Vec<_>>()
        }
    };
    use pb::AuthenticatorType as T;
    assert_eq!(
        factors(&bea.id).await,
        [
            (T::Totp as i32, true, String::new()),
            (T::RecoveryCodes as i32, false, String::new()),
            (T::EmailOtp as i32, false, "bea@example.com".to_string()),
        ]
    );
    let ola = crate::user_by_email(&mut users, "ola@example.com").await;
    assert_eq!(
        factors(&ola.id).await,
        [(T::EmailOtp as i32, true, "ola@example.com".to_string())]
    );
    let code = authn
        .start_otp_challenge(pb::StartOtpChallengeRequest {
            user_id: ola.id.clone(),
            r#type: T::EmailOtp as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .code;
    assert_eq!(factor_result(&app, &ola.id, T::EmailOtp, code).await, R::Ok);
    let ann = crate::user_by_email(&mut users, "ann@example.com").await;
    assert!(ann.email_verified);
    assert_eq!(ann.username, "ann_l");
    // Her admin role and her organization (the organization plugin's membership) are kept
    // for the backend that checks them.
    assert_eq!(
        ann.app_metadata.clone().unwrap(),
        crate::pb_struct(serde_json::json!({"role": "admin", "organizations": [
            {"id": "9Qq0eNArddfjBWcc5zXAV0yMDwKUv8b1", "slug": "acme", "name": "Acme Inc.",
             "role": "owner", "joined_at": "2026-12-07T21:21:46.399000Z"}]}))
    );
    assert!(signs_in(&app, "ann@example.com", "correct horse battery staple").await);
    let found = crate::identities::lookup(&mut app.identities(), "google", "1076543210")
        .await
        .unwrap()
        .user
        .unwrap();
    assert_eq!(found.id, ann.id);
    let bob = crate::user_by_email(&mut users, "bob@example.com").await;
    assert!(!bob.email_verified);
    assert_eq!(bob.blocked_reason, "banned in Better Auth: spam");
}

/// `roster events --until-caught-up`, for a one-off query or a shipper run by a scheduler:
/// it writes the events there are (the filter applied) and exits 0; with `--state`, the next
/// run writes only what came since.
#[tokio::test]
async fn events_until_caught_up_writes_the_log_and_exits() {
    let app = TestApp::spawn().await;
    let dir = scratch_dir("catchup");
    let state = dir.join("position");
    let mut users = app.users();
    let mut created = Vec::new();
    for i in 0..3 {
        created.push(
            create_user(&mut users, &format!("catchup{i}@example.com"))
                .await
                .id,
        );
    }
    let run = || {
        let args = [
            "events",
            "--until-caught-up",
            "--filter",
            "type = USER_CREATED",
            "--state",
            state.to_str().unwrap(),
        ];
        let app = &app;
        async move {
            let (code, out, err) = roster_client(app, &app.token, &args).await;
            assert_eq!(code, 0, "{err}");
            out.lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
                .collect::<Vec<_>>()
        }
    };
    let first = run().await;
    let written: Vec<&str> = first
        .iter()
        .map(|e| e["user_id"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(written, created, "{first:?}");
    assert!(first.iter().all(|e| e["type"] == "USER_CREATED"));
    let saved: i64 = std::fs::read_to_string(&state)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(saved, first[2]["position"].as_i64().unwrap());

    // Nothing new: nothing written. Then an event the filter leaves out: nothing written,
    // but the state moves past it (the server's checkpoint), so no later run reads it again.
    assert!(run().await.is_empty());
    users
        .block_user(pb::BlockUserRequest {
            id: created[1].clone(),
            reason: String::new(),
        })
        .await
        .unwrap();
    let blocked_at = app
        .sql_one::<i64>("SELECT max(position) FROM events", &[])
        .await;
    assert!(run().await.is_empty());
    let saved: i64 = std::fs::read_to_string(&state)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(saved, blocked_at);
    // One more user, read at once (the run does not stop before an event committed before it
    // began): only that one.
    let late = create_user(&mut users, "catchup-late@example.com").await;
    let second = run().await;
    assert_eq!(second.len(), 1, "{second:?}");
    assert_eq!(second[0]["user_id"], late.id.as_str());
}

/// A server with `n` users made by CreateUser (`<prefix><i>@example.com`, their ids in
/// order) and a scratch directory.
async fn app_with_users(prefix: &str, n: usize) -> (TestApp, std::path::PathBuf, Vec<String>) {
    let app = TestApp::spawn().await;
    let dir = scratch_dir(prefix);
    let mut users = app.users();
    let mut created = Vec::new();
    for i in 0..n {
        let email = format!("{prefix}{i}@example.com");
        created.push(create_user(&mut users, &email).await.id);
    }
    (app, dir, created)
}

/// A fresh directory for a test's files, under the system's temporary one.
fn scratch_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("roster-{name}-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `roster users ARGS...` against `app`, with its key.
async fn users_cmd(app: &TestApp, args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["users"];
    all.extend_from_slice(args);
    roster_client(app, &app.token, &all).await
}

/// `roster users` for an operator: a user shown by email, phone, username or id; a filtered
/// list as a table and as JSON; block (with the reason kept) and unblock by username; the
/// user's events; delete only with the id confirmed; a user that is not there said plainly.
#[tokio::test]
async fn roster_users_shows_finds_blocks_and_deletes_one_user() {
    let (app, _dir, created) = app_with_users("desk", 3).await;
    let mut users = app.users();
    let mut u1 = crate::user_by_email(&mut users, "desk1@example.com").await;
    u1.username = "desk-one".into();
    u1.phone_number = "+14155550166".into();
    users
        .update_user(pb::UpdateUserRequest {
            user: Some(u1.clone()),
            update_mask: crate::mask(&["username", "phone_number"]),
            etag: String::new(),
        })
        .await
        .unwrap();
    for who in [
        "desk1@example.com",
        "+14155550166",
        "desk-one",
        created[1].as_str(),
    ] {
        let (code, out, err) = users_cmd(&app, &["get", who]).await;
        assert_eq!(code, 0, "{who}: {err}");
        let shown: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(shown["id"], created[1].as_str(), "{who}");
        assert_eq!(shown["username"], "desk-one");
    }

    let (code, out, err) = users_cmd(&app, &["block", "desk-one", "--reason", "chargeback"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.trim(),
        format!("blocked {} (desk1@example.com)", created[1])
    );
    let blocked = crate::user_by_email(&mut users, "desk1@example.com").await;
    assert_eq!(blocked.status, pb::UserStatus::Blocked as i32);
    assert_eq!(blocked.blocked_reason, "chargeback");
    let (_, table, _) = users_cmd(&app, &["list", "--filter", "status = BLOCKED"]).await;
    let rows: Vec<&str> = table.lines().collect();
    assert_eq!(rows.len(), 2, "a header and the blocked user: {table}");
    assert!(
        rows[1].starts_with(&created[1]) && rows[1].contains("BLOCKED"),
        "{table}"
    );
    let (_, lines, _) = users_cmd(&app, &["list", "--json", "--limit", "2"]).await;
    let listed: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(listed.len(), 2, "--limit: {lines}");
    assert_eq!(listed[0]["id"], created[2].as_str(), "newest first");
    let (_, events, _) = users_cmd(&app, &["events", "desk-one", "--limit", "1"]).await;
    let last: serde_json::Value = serde_json::from_str(events.trim()).unwrap();
    assert_eq!(last["type"], "USER_BLOCKED");
    assert_eq!(last["data"]["reason"], "chargeback");
    let (code, _, err) = users_cmd(&app, &["unblock", "desk-one"]).await;
    assert_eq!(code, 0, "{err}");
    let unblocked = crate::user_by_email(&mut users, "desk1@example.com").await;
    assert_eq!(unblocked.status, pb::UserStatus::Active as i32);

    let (code, _, err) =
        users_cmd(&app, &["delete", "desk0@example.com", "--confirm", "desk0"]).await;
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!("--confirm must be the user's id ({})", created[0])),
        "{err}"
    );
    let (code, out, err) = users_cmd(
        &app,
        &["delete", "desk0@example.com", "--confirm", &created[0]],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("deleted"), "{out}");
    let (code, _, err) = users_cmd(&app, &["get", "desk0@example.com"]).await;
    assert_eq!(code, 1);
    assert!(
        err.contains("no user with the email desk0@example.com"),
        "{err}"
    );
    let (code, _, err) = users_cmd(&app, &["get", "desk0", "--by", "external-id"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("no user with the external id desk0"), "{err}");
}

/// `roster users` for a support desk's factor and password chores: a user's factors listed
/// (table and JSON), one removed by id, the rest reset only with the id confirmed, a password
/// reset token that ResetPassword takes, and a password expired.
#[tokio::test]
async fn roster_users_manages_factors_and_passwords() {
    let (app, _dir, created) = app_with_users("helpdesk", 1).await;
    let id = created[0].clone();
    let mut authn = app.authenticators();
    let (totp, _) = crate::factors::confirmed_totp(&mut authn, &id).await;
    crate::factors::recovery_codes(&mut authn, &id).await;
    let (code, table, err) = users_cmd(&app, &["factors", "helpdesk0@example.com"]).await;
    assert_eq!(code, 0, "{err}");
    let rows: Vec<&str> = table.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{table}");
    assert!(
        rows[0].starts_with(&totp) && rows[0].contains("TOTP"),
        "{table}"
    );
    assert!(rows[1].contains("RECOVERY_CODES"), "{table}");
    let (_, json, _) = users_cmd(&app, &["factors", &id, "--json"]).await;
    let first: serde_json::Value = serde_json::from_str(json.lines().next().unwrap()).unwrap();
    assert_eq!(
        (first["id"].as_str(), first["type"].as_str()),
        (Some(totp.as_str()), Some("TOTP"))
    );
    assert_eq!(first["confirmed"], true);

    let (code, out, err) = users_cmd(&app, &["remove-factor", &id, "--factor", &totp]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with(&format!("removed factor {totp}")), "{out}");
    let left = crate::factors::list_of(&mut authn, &id).await;
    assert_eq!(left.len(), 1);
    let (code, _, err) = users_cmd(&app, &["reset-factors", &id, "--confirm", "no"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("--confirm must be the user's id"), "{err}");
    assert_eq!(crate::factors::list_of(&mut authn, &id).await.len(), 1);
    let (code, out, err) = users_cmd(&app, &["reset-factors", &id, "--confirm", &id]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("removed 1 factor(s)"), "{out}");
    assert!(crate::factors::list_of(&mut authn, &id).await.is_empty());

    let (code, token, err) = users_cmd(&app, &["password-reset", "helpdesk0@example.com"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("valid until"), "{err}");
    authn
        .reset_password(pb::ResetPasswordRequest {
            token: token.trim().to_string(),
            new_password: "a brand new passphrase".into(),
        })
        .await
        .unwrap();
    assert!(signs_in(&app, "helpdesk0@example.com", "a brand new passphrase").await);
    let (code, out, err) = users_cmd(&app, &["expire-password", &id]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("password expired for"), "{out}");
    assert_eq!(
        sign_in(&app, "helpdesk0@example.com", "a brand new passphrase").await,
        pb::VerifyPasswordResult::PasswordChangeRequired
    );
}

/// `roster users create|update|set-password`: a user made from `--set`s with a password piped
/// in (never an argument), metadata keys set one by one with JSON values, an update of only
/// the named fields (a cleared one, a metadata key changed beside one kept), a bad value
/// refused by the server with its field and nothing changed, a temporary password set.
#[tokio::test]
async fn roster_users_creates_updates_and_sets_passwords() {
    let (app, _dir, _) = app_with_users("desk-new", 0).await;
    let users_fed = |args: &[&str], stdin: &str| {
        let mut all = vec!["users".to_string()];
        all.extend(args.iter().map(|a| a.to_string()));
        let app = &app;
        let stdin = stdin.as_bytes().to_vec();
        async move {
            let all: Vec<&str> = all.iter().map(String::as_str).collect();
            roster_client_fed(app, &app.token, &all, Some(stdin), &[]).await
        }
    };
    let (code, out, err) = users_fed(
        &[
            "create",
            "--set",
            "email=ann@example.com",
            "--set",
            "given_name=Ann",
            "--set",
            "email_verified=true",
            "--set",
            "app_metadata.plan=pro",
            "--set",
            "app_metadata.seats=5",
            "--set",
            "app_metadata.`example.com/roles`.admin=true",
            "--password",
        ],
        "correct horse battery staple\n",
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let created: serde_json::Value = serde_json::from_str(&out).unwrap();
    let id = created["id"].as_str().unwrap().to_string();
    assert_eq!(created["email"], "ann@example.com");
    assert_eq!(created["email_verified"], true);
    assert_eq!(
        created["app_metadata"],
        serde_json::json!({"plan": "pro", "seats": 5, "example.com/roles": {"admin": true}})
    );
    assert!(!err.contains("correct horse"), "{err}");
    assert!(signs_in(&app, "ann@example.com", "correct horse battery staple").await);

    let (code, out, err) = users_cmd(
        &app,
        &[
            "update",
            "ann@example.com",
            "--set",
            "app_metadata.plan=team",
            "--set",
            "username=ann",
            "--unset",
            "given_name",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.trim(),
        format!("updated app_metadata.plan, username, given_name of {id} (ann@example.com)")
    );
    let mut users = app.users();
    let stored = crate::get(&mut users, &id).await;
    assert_eq!(
        (stored.username.as_str(), stored.given_name.as_str()),
        ("ann", "")
    );
    let meta = roster::wire::struct_to_json(stored.app_metadata.as_ref().unwrap()).unwrap();
    assert_eq!(meta["plan"], "team");
    assert_eq!(meta["seats"], 5, "a key not named is kept");

    // Bad values: the server's field violation; a field that is not one: refused at once.
    let (code, _, err) = users_cmd(&app, &["update", "ann", "--set", "email=not-an-email"]).await;
    assert_eq!(code, 1);
    assert!(
        err.contains("refused the call: invalid request: user.email: must be an email address"),
        "{err}"
    );
    let (code, _, err) = users_cmd(&app, &["update", "ann", "--set", "status=BLOCKED"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("--set status: not a field to set"), "{err}");
    let (code, _, err) = users_cmd(&app, &["update", "ann", "--set", "id=x"]).await;
    assert_eq!(code, 1, "an id is not updated: {err}");
    let again = crate::get(&mut users, &id).await;
    assert_eq!(again.email, "ann@example.com");
    assert_eq!(again.etag, stored.etag, "nothing was written");

    // A temporary password, piped in; an empty one refused; a weak one refused by the server
    // without being printed.
    let (code, out, err) = users_fed(
        &["set-password", "ann", "--temporary"],
        "temporary passphrase 7\n",
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("password set for {id}")) && out.contains("temporary"),
        "{out}"
    );
    assert_eq!(
        sign_in(&app, "ann@example.com", "temporary passphrase 7").await,
        pb::VerifyPasswordResult::PasswordChangeRequired
    );
    let (code, _, err) = users_fed(&["set-password", "ann"], "").await;
    assert_eq!(code, 1);
    assert!(err.contains("no password given"), "{err}");
    let (code, _, err) = users_fed(&["set-password", "ann"], "qwerty123\n").await;
    assert_eq!(code, 1);
    assert!(err.contains("invalid request: password"), "{err}");
    assert!(!err.contains("qwerty123"), "{err}");
    assert_eq!(
        sign_in(&app, "ann@example.com", "temporary passphrase 7").await,
        pb::VerifyPasswordResult::PasswordChangeRequired,
        "a refused password changes nothing"
    );
}

/// `roster users link|merge`: an identity linked by an operator finds its user, and is
/// refused for a second user; a duplicate merged into another (only with its id confirmed)
/// is gone and its identity now finds the user that remains.
#[tokio::test]
async fn roster_users_links_identities_and_merges_duplicates() {
    let (app, _dir, created) = app_with_users("merge", 2).await;
    let (kept, dup) = (created[0].clone(), created[1].clone());
    let (code, out, err) = users_cmd(
        &app,
        &[
            "link",
            "merge1@example.com",
            "--provider",
            "google",
            "--subject",
            "77",
            "--email",
            "m1@gmail.example",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.trim(),
        format!("linked google:77 to {dup} (merge1@example.com)")
    );
    let whose = |app: &TestApp| {
        let mut ids = app.identities();
        async move {
            let found = crate::identities::lookup(&mut ids, "google", "77").await;
            found.unwrap().user.unwrap().id
        }
    };
    assert_eq!(whose(&app).await, dup);
    let (code, _, err) = users_cmd(
        &app,
        &["link", &kept, "--provider", "google", "--subject", "77"],
    )
    .await;
    assert_eq!(code, 1);
    assert!(err.contains("already exists"), "{err}");

    let merge = |confirm: &str| {
        let confirm = confirm.to_string();
        let app = &app;
        async move {
            users_cmd(
                app,
                &[
                    "merge",
                    "merge1@example.com",
                    "--into",
                    "merge0@example.com",
                    "--confirm",
                    &confirm,
                ],
            )
            .await
        }
    };
    let (code, _, err) = merge(&kept).await;
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!(
            "--confirm must be the id of the user merged in and deleted ({dup})"
        )),
        "{err}"
    );
    assert_eq!(whose(&app).await, dup, "nothing merged");
    let (code, out, err) = merge(&dup).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.trim(),
        format!("merged {dup} (merge1@example.com) into {kept} (merge0@example.com)")
    );
    assert_eq!(whose(&app).await, kept);
    let gone = app
        .users()
        .get_user(pb::GetUserRequest { id: dup.clone() })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), tonic::Code::NotFound);
    let (code, _, err) = users_cmd(
        &app,
        &[
            "merge",
            &kept,
            "--into",
            "merge0@example.com",
            "--confirm",
            &kept,
        ],
    )
    .await;
    assert_eq!(code, 1);
    assert!(err.contains("are the same user"), "{err}");
}

/// `roster users` and linked identities: whose is `google:1099`? (`--by identity`), a user's
/// identities listed, and one unlinked, or moved to a new user of its own.
#[tokio::test]
async fn roster_users_finds_by_and_unlinks_identities() {
    let (app, _dir, created) = app_with_users("social", 1).await;
    let id = created[0].clone();
    let mut ids = app.identities();
    for (provider, subject) in [("google", "1099"), ("github", "42")] {
        ids.link_identity(pb::LinkIdentityRequest {
            user_id: id.clone(),
            provider: provider.into(),
            subject: subject.into(),
            email: format!("{provider}@example.net"),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let (code, out, err) = users_cmd(&app, &["get", "google:1099", "--by", "identity"]).await;
    assert_eq!(code, 0, "{err}");
    let shown: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown["id"], id.as_str());
    let (code, table, err) = users_cmd(&app, &["identities", &id]).await;
    assert_eq!(code, 0, "{err}");
    let rows: Vec<&str> = table.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{table}");
    assert!(
        table.contains("google") && table.contains("1099") && table.contains("github@example.net"),
        "{table}"
    );

    let (code, out, err) = users_cmd(
        &app,
        &["unlink", &id, "--provider", "github", "--subject", "42"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("unlinked github:42"), "{out}");
    let (code, out, err) = users_cmd(
        &app,
        &[
            "unlink",
            &id,
            "--provider",
            "google",
            "--subject",
            "1099",
            "--to-new-user",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let moved = out
        .lines()
        .nth(1)
        .unwrap()
        .trim_start_matches("moved to the new user ");
    let (_, json, _) = users_cmd(&app, &["identities", moved, "--json"]).await;
    let only: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(
        (only["provider"].as_str(), only["subject"].as_str()),
        (Some("google"), Some("1099"))
    );
    let (code, _, err) = users_cmd(&app, &["get", "github:42", "--by", "identity"]).await;
    assert_eq!(code, 1);
    assert!(
        err.contains("no user with the linked identity github:42"),
        "{err}"
    );
}

/// One request a test webhook received, and when.
struct Received {
    at: Instant,
    path: String,
    headers: http::HeaderMap,
    body: serde_json::Value,
    /// The body as sent (decompressed when it came gzipped): what the signature covers.
    raw: Vec<u8>,
    /// How many bytes came on the wire.
    wire: usize,
}

/// A webhook receiver on 127.0.0.1 for `roster events --post`: answers each request with the
/// next of `answers` (status, Retry-After, body), then 200; keeps every request.
async fn webhook_receiver(
    answers: Vec<(u16, Option<&'static str>, &'static str)>,
) -> (String, std::sync::Arc<std::sync::Mutex<Vec<Received>>>) {
    webhook_receiver_tls(answers, None).await
}

/// [`webhook_receiver`], over TLS with `identity` (certificate and key PEM) when given: the
/// URL is then https://localhost:<port>.
async fn webhook_receiver_tls(
    answers: Vec<(u16, Option<&'static str>, &'static str)>,
    identity: Option<(String, String)>,
) -> (String, std::sync::Arc<std::sync::Mutex<Vec<Received>>>) {
    use http_body_util::BodyExt;
    use std::sync::{Arc, Mutex};
    use tokio_rustls::rustls::pki_types::pem::PemObject as _;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let acceptor = identity.map(|(cert, key)| {
        let provider = roster::tls::provider();
        let mut config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                CertificateDer::pem_slice_iter(cert.as_bytes())
                    .map(Result::unwrap)
                    .collect(),
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    });
    let url = match acceptor {
        Some(_) => format!("https://localhost:{port}"),
        None => format!("http://127.0.0.1:{port}"),
    };
    let got: Arc<Mutex<Vec<Received>>> = Arc::default();
    let answers = Arc::new(Mutex::new(std::collections::VecDeque::from(answers)));
    let kept = got.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let (got, answers) = (kept.clone(), answers.clone());
            let service =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let (got, answers) = (got.clone(), answers.clone());
                    async move {
                        let at = Instant::now();
                        let path = req.uri().to_string();
                        let headers = req.headers().clone();
                        let wire = req.into_body().collect().await.unwrap().to_bytes();
                        let bytes = if headers.get("content-encoding").is_some_and(|e| e == "gzip")
                        {
                            use std::io::Read as _;
                            let mut out = Vec::new();
                            flate2::read::GzDecoder::new(&wire[..])
                                .read_to_end(&mut out)
                                .unwrap();
                            out.into()
                        } else {
                            wire.clone()
                        };
                        // JSON, or JSON lines (as an array of the lines).
                        let body = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                            String::from_utf8_lossy(&bytes)
                                .lines()
                                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
                                .collect()
                        });
                        got.lock().unwrap().push(Received {
                            at,
                            path,
                            headers,
                            body,
                            raw: bytes.to_vec(),
                            wire: wire.len(),
                        });
                        let (status, retry_after, text) = answers
                            .lock()
                            .unwrap()
                            .pop_front()
                            .unwrap_or((200, None, ""));
                        let mut answer = http::Response::builder().status(status);
                        if let Some(after) = retry_after {
                            answer = answer.header("retry-after", after);
                        }
                        anyhow::Ok(
                            answer
                                .body(http_body_util::Full::new(hyper::body::Bytes::from(text)))
                                .unwrap(),
                        )
                    }
                });
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let http = hyper::server::conn::http1::Builder::new();
                match acceptor {
                    Some(acceptor) => {
                        if let Ok(tls) = acceptor.accept(stream).await {
                            let _ = http
                                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                                .await;
                        }
                    }
                    None => {
                        let _ = http
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await;
                    }
                }
            });
        }
    });
    (url, got)
}

/// The Standard Webhooks signature of a received request, worked out here from the secret's
/// key (the receiver's side of the specification).
fn webhook_signature(key: &[u8], r: &Received) -> String {
    use base64::Engine as _;
    use hmac::Mac as _;
    let header = |n: &str| r.headers[n].to_str().unwrap().to_string();
    let signed = format!("{}.{}.", header("webhook-id"), header("webhook-timestamp"));
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).unwrap();
    mac.update(signed.as_bytes());
    mac.update(&r.raw);
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    )
}

/// `roster events --post`: each event POSTed to a webhook with Standard Webhooks headers and
/// signature and the operator's own header; a 503 and a 429 are tried again with the same
/// webhook-id (the 429 after its Retry-After), the state moves on only past delivered events,
/// and nothing secret (the URL's path and query, the secret, the header's value) is printed.
#[tokio::test]
async fn events_post_to_a_webhook_signed_and_retried() {
    use base64::Engine as _;
    let (app, dir, created) = app_with_users("hook", 3).await;
    let key = [7u8; 32];
    let secret = dir.join("secret");
    std::fs::write(
        &secret,
        format!(
            "whsec_{}\n",
            base64::engine::general_purpose::STANDARD.encode(key)
        ),
    )
    .unwrap();
    let state = dir.join("position");
    let (url, got) = webhook_receiver(vec![(503, None, "busy\nnow"), (429, Some("1"), "")]).await;
    let hook = format!("{url}/hooks/T0001/s3cr3t-path?token=t0p");
    let (code, out, err) = roster_client(
        &app,
        &app.token,
        &[
            "events",
            "--until-caught-up",
            "--filter",
            "type = USER_CREATED",
            "--state",
            state.to_str().unwrap(),
            "--post",
            &hook,
            "--post-secret-file",
            secret.to_str().unwrap(),
            "--post-header",
            "Authorization: Bearer hook-token",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.is_empty(),
        "events go to the webhook, not stdout: {out}"
    );
    assert!(err.contains("503 Service Unavailable: busy now"), "{err}");
    assert!(err.contains("429 Too Many Requests"), "{err}");
    assert!(
        err.contains("3 event(s) sent to the webhook"),
        "the run's progress line: {err}"
    );
    for secret_part in ["s3cr3t-path", "t0p", "hook-token", "whsec_"] {
        assert!(!err.contains(secret_part), "{secret_part} printed: {err}");
    }
    let got = got.lock().unwrap();
    let ids: Vec<&str> = got
        .iter()
        .map(|r| r.headers["webhook-id"].to_str().unwrap())
        .collect();
    assert_eq!(
        got.len(),
        5,
        "the first event three times, then the others: {ids:?}"
    );
    assert!(ids[0] == ids[1] && ids[1] == ids[2] && ids[2] != ids[3] && ids[3] != ids[4]);
    assert!(
        got[2].at - got[1].at >= Duration::from_millis(950),
        "Retry-After: 1 waited for"
    );
    let users_posted: Vec<&str> = got[2..]
        .iter()
        .map(|r| r.body["user_id"].as_str().unwrap())
        .collect();
    assert_eq!(users_posted, created);
    for r in got.iter() {
        assert_eq!(r.path, "/hooks/T0001/s3cr3t-path?token=t0p");
        assert_eq!(r.headers["content-type"], "application/json");
        assert_eq!(r.headers["authorization"], "Bearer hook-token");
        assert_eq!(r.body["type"], "USER_CREATED");
        assert_eq!(
            r.headers["webhook-id"].to_str().unwrap(),
            r.body["id"].as_str().unwrap()
        );
        let sent: i64 = r.headers["webhook-timestamp"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((chrono::Utc::now().timestamp() - sent).abs() < 60);
        assert_eq!(
            r.headers["webhook-signature"].to_str().unwrap(),
            webhook_signature(&key, r)
        );
    }
    let saved: i64 = std::fs::read_to_string(&state)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(saved, got[4].body["position"].as_i64().unwrap());
}

/// `roster events --post-batch N`: up to N events per POST as a JSON array, each batch signed
/// with a webhook-id naming its positions; a batch the webhook answers 503 to comes again
/// whole with the same id; the state moves on one delivered batch at a time. With
/// `--post-format ndjson` the body is JSON lines, and a refused batch stops the follower
/// before its first event; with `--post-gzip` it goes compressed, signed as JSON.
#[tokio::test]
async fn events_post_in_batches() {
    use base64::Engine as _;
    let (app, dir, created) = app_with_users("batch", 25).await;
    let key = [9u8; 24];
    let state = dir.join("position");
    let (url, got) = webhook_receiver(vec![(200, None, ""), (503, None, "")]).await;
    let secret = format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    );
    let run = |url: String, more: &'static [&'static str]| {
        let (app, state, secret) = (&app, state.clone(), secret.clone());
        async move {
            let mut args = vec![
                "events",
                "--until-caught-up",
                "--filter",
                "type = USER_CREATED",
                "--state",
                state.to_str().unwrap(),
            ];
            args.extend_from_slice(more);
            let env = [
                ("ROSTER_EVENTS_POST", url.as_str()),
                ("ROSTER_EVENTS_POST_SECRET", secret.as_str()),
            ];
            roster_client_fed(app, &app.token, &args, None, &env).await
        }
    };
    let (code, _, err) = run(url, &["--post-batch", "10"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("25 event(s) sent to the webhook"), "{err}");
    let got: Vec<Received> = std::mem::take(&mut *got.lock().unwrap());
    assert!(
        err.contains("503 Service Unavailable; sending the batch of"),
        "{err}"
    );
    assert_eq!(
        (got[1].headers["webhook-id"].clone(), &got[1].raw),
        (got[2].headers["webhook-id"].clone(), &got[2].raw),
        "the batch answered 503 comes again whole, with the same id"
    );
    let delivered: Vec<&Received> = got
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 1)
        .map(|(_, r)| r)
        .collect();
    let mut posted = Vec::new();
    for r in &delivered {
        assert_eq!(r.headers["content-type"], "application/json");
        assert_eq!(
            r.headers["webhook-signature"].to_str().unwrap(),
            webhook_signature(&key, r)
        );
        let events = r.body.as_array().expect("a batch is a JSON array");
        assert!((1..=10).contains(&events.len()), "{}", events.len());
        let position = |e: &serde_json::Value| e["position"].as_i64().unwrap();
        assert_eq!(
            r.headers["webhook-id"].to_str().unwrap(),
            format!(
                "positions-{}-{}",
                position(&events[0]),
                position(events.last().unwrap())
            )
        );
        posted.extend(
            events
                .iter()
                .map(|e| e["user_id"].as_str().unwrap().to_string()),
        );
    }
    assert_eq!(posted, created, "every event once, in order");
    assert!(
        delivered.len() < 10
            && delivered
                .iter()
                .any(|r| r.body.as_array().unwrap().len() == 10),
        "the backlog goes in full batches: {} requests",
        delivered.len()
    );
    let saved: i64 = std::fs::read_to_string(&state)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let last = delivered
        .last()
        .unwrap()
        .body
        .as_array()
        .unwrap()
        .last()
        .unwrap()["position"]
        .clone();
    assert_eq!(saved, last.as_i64().unwrap());

    // JSON lines, from the start again; the second batch refused for good.
    std::fs::remove_file(&state).unwrap();
    let (url, got) = webhook_receiver(vec![(200, None, ""), (422, None, "bad batch")]).await;
    let (code, _, err) = run(url, &["--post-batch", "4", "--post-format", "ndjson"]).await;
    assert_eq!(code, 1, "{err}");
    let got: Vec<Received> = std::mem::take(&mut *got.lock().unwrap());
    assert_eq!(got.len(), 2, "a refusal is not tried again");
    assert_eq!(got[0].headers["content-type"], "application/x-ndjson");
    assert!(got[0].raw.ends_with(b"\n"));
    let lines = |r: &Received| r.body.as_array().unwrap().clone();
    let refused = lines(&got[1]);
    let (from, to) = (
        refused[0]["position"].as_i64().unwrap(),
        refused.last().unwrap()["position"].as_i64().unwrap(),
    );
    assert!(
        err.contains(&format!(
            "refused the batch of {} events at positions {from} to {to}: 422 Unprocessable Entity: bad batch",
            refused.len()
        )),
        "{err}"
    );
    let saved: i64 = std::fs::read_to_string(&state)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        saved,
        lines(&got[0]).last().unwrap()["position"].as_i64().unwrap(),
        "the state stops before the refused batch"
    );

    // Splunk's HTTP Event Collector: each event in HEC's envelope with its own time.
    std::fs::remove_file(&state).unwrap();
    let (url, got) = webhook_receiver(vec![]).await;
    let (code, _, err) = run(
        url,
        &[
            "--post-batch",
            "10",
            "--post-format",
            "splunk-hec",
            "--post-header",
            "Authorization: Splunk hec-t0ken",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("hec-t0ken"), "{err}");
    let got: Vec<Received> = std::mem::take(&mut *got.lock().unwrap());
    let mut users_sent = Vec::new();
    for r in got.iter() {
        assert_eq!(r.headers["content-type"], "application/json");
        assert_eq!(r.headers["authorization"], "Splunk hec-t0ken");
        for e in r.body.as_array().unwrap() {
            assert_eq!(
                (&e["source"], &e["sourcetype"]),
                (&serde_json::json!("roster"), &serde_json::json!("_json"))
            );
            let at = e["time"].as_f64().unwrap();
            assert!(
                (chrono::Utc::now().timestamp() as f64 - at).abs() < 300.0,
                "{at}"
            );
            assert_eq!(e["event"]["type"], "USER_CREATED");
            users_sent.push(e["event"]["user_id"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(users_sent, created);

    // Compressed: gzip on the wire, the signature over the JSON the receiver reads, a 503
    // answered by the same compressed batch again.
    std::fs::remove_file(&state).unwrap();
    let (url, got) = webhook_receiver(vec![(503, None, "")]).await;
    let (code, _, err) = run(url, &["--post-batch", "25", "--post-gzip"]).await;
    assert_eq!(code, 0, "{err}");
    let got = got.lock().unwrap();
    assert_eq!(got.len(), 2, "the batch, then the same again");
    assert_eq!(got[0].raw, got[1].raw);
    let r = &got[1];
    assert_eq!(r.headers["content-encoding"], "gzip");
    assert_eq!(r.headers["content-type"], "application/json");
    assert_eq!(
        r.headers["webhook-signature"].to_str().unwrap(),
        webhook_signature(&key, r)
    );
    let sent: Vec<&str> = r
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["user_id"].as_str().unwrap())
        .collect();
    assert_eq!(sent, created);
    assert!(
        r.wire * 3 < r.raw.len(),
        "{} bytes for {}",
        r.wire,
        r.raw.len()
    );
}

/// An https:// webhook with a certificate from a private CA, trusted with --post-ca-file.
#[tokio::test]
async fn events_post_to_an_https_webhook() {
    let (app, dir, created) = app_with_users("tls-hook", 1).await;
    let ca = crate::tls::Ca::new();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let (url, got) = webhook_receiver_tls(vec![], Some(ca.issue(&["localhost"]))).await;
    let (code, _, err) = roster_client(
        &app,
        &app.token,
        &[
            "events",
            "--until-caught-up",
            "--filter",
            "type = USER_CREATED",
            "--post",
            &format!("{url}/roster"),
            "--post-ca-file",
            ca_file.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let got = got.lock().unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body["user_id"], created[0].as_str());
    assert!(
        got[0].headers.get("webhook-signature").is_none(),
        "no secret, no signature"
    );
}

/// A webhook that refuses an event for good (a 4xx) stops `roster events` with exit 1 and
/// the receiver's reason, its state before that event; started again, it goes on from that
/// event: none lost.
#[tokio::test]
async fn events_post_stops_at_an_event_the_webhook_refuses() {
    let (app, dir, created) = app_with_users("refused", 3).await;
    let state = dir.join("position");
    // The webhook's settings from the environment, as the Helm chart gives them.
    let run = |url: String| {
        let app = &app;
        let state = state.clone();
        async move {
            let args = [
                "events",
                "--until-caught-up",
                "--filter",
                "type = USER_CREATED",
                "--state",
                state.to_str().unwrap(),
            ];
            let env = [
                ("ROSTER_EVENTS_POST", url.as_str()),
                (
                    "ROSTER_EVENTS_POST_SECRET",
                    "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                ),
                ("ROSTER_EVENTS_POST_HEADER", "X-Collector-Token: c0ll3ct"),
            ];
            roster_client_fed(app, &app.token, &args, None, &env).await
        }
    };
    let (url, got) = webhook_receiver(vec![(200, None, ""), (400, None, "unknown event")]).await;
    let (code, _, err) = run(url).await;
    assert_eq!(code, 1, "{err}");
    let first = got.lock().unwrap()[0].body["position"].as_i64().unwrap();
    let refused = got.lock().unwrap()[1].body["position"].as_i64().unwrap();
    assert!(
        err.contains(&format!(
            "refused the event at position {refused}: 400 Bad Request: unknown event"
        )),
        "{err}"
    );
    assert_eq!(got.lock().unwrap().len(), 2, "a refusal is not tried again");
    for r in got.lock().unwrap().iter() {
        assert_eq!(r.headers["x-collector-token"], "c0ll3ct");
        assert!(
            r.headers["webhook-signature"]
                .to_str()
                .unwrap()
                .starts_with("v1,")
        );
    }
    assert!(
        !err.contains("c0ll3ct") && !err.contains("MfKQ9r8"),
        "{err}"
    );
    let saved: i64 = std::fs::read_to_string(&state)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(saved, first);

    let (url, got) = webhook_receiver(vec![]).await;
    let (code, _, err) = run(url).await;
    assert_eq!(code, 0, "{err}");
    let posted: Vec<String> = got
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.body["user_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(posted, created[1..]);
}

/// `roster events` for a log shipper: the log as JSON lines, the backlog then live events;
/// with `--state` a follower killed and started again resumes after the last event it wrote
/// (nothing skipped, nothing repeated once saved); SIGTERM saves and exits 0; a bad filter
/// ends it with the server's reason; a server going away is retried, not fatal.
#[tokio::test]
async fn events_follows_the_log_and_resumes_from_its_state() {
    use std::sync::mpsc;
    let mut app = TestApp::spawn().await;
    let dir = scratch_dir("events");
    let state = dir.join("position");
    let state_arg = state.to_str().unwrap().to_string();
    let server = format!("http://{}", app.addr);
    let token = app.token.clone();
    let follow = |args: &[&str]| {
        let mut child = Command::new(ROSTER)
            .arg("events")
            .args(args)
            .env("ROSTER_SERVER", &server)
            .env("ROSTER_API_KEY", &token)
            .env_remove("DATABASE_URL")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run roster events");
        let (lines_tx, lines) = mpsc::channel::<serde_json::Value>();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if lines_tx.send(serde_json::from_str(&line).unwrap()).is_err() {
                    break;
                }
            }
        });
        (Reap(child), lines)
    };
    let saved = |want: i64| {
        let state = state.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let text = std::fs::read_to_string(&state).unwrap_or_default();
                if text.trim().parse::<i64>().ok() == Some(want) {
                    return;
                }
                assert!(Instant::now() < deadline, "state {text:?}, want {want}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let mut users = app.users();
    let first = create_user(&mut users, "first@x.io").await;

    let (child, lines) = follow(&["--state", &state_arg]);
    let e = next_line(&lines).await;
    assert_eq!(e["type"], "USER_CREATED");
    assert_eq!(e["user_id"], first.id.as_str());
    assert_eq!(e["data"]["fields"], serde_json::json!(["email"]), "{e}");
    assert_eq!(e["ip"], "127.0.0.1");
    assert!(e["occurred_at"].as_str().unwrap().ends_with('Z'), "{e}");
    assert!(e["position"].as_i64().unwrap() > 0);
    saved(e["position"].as_i64().unwrap()).await;
    // Live.
    let second = create_user(&mut users, "second@x.io").await;
    let e = next_line(&lines).await;
    assert_eq!(e["user_id"], second.id.as_str());
    saved(e["position"].as_i64().unwrap()).await;
    drop(child);

    // Killed; two changes meanwhile; started again it goes on after the second user.
    let third = create_user(&mut users, "third@x.io").await;
    users
        .delete_user(pb::DeleteUserRequest {
            id: first.id.clone(),
            etag: String::new(),
        })
        .await
        .unwrap();
    let (mut child, lines) = follow(&["--state", &state_arg]);
    let e = next_line(&lines).await;
    assert_eq!(
        e["user_id"],
        third.id.as_str(),
        "resumed after the second: {e}"
    );
    let e = next_line(&lines).await;
    assert_eq!(e["type"], "USER_DELETED");
    let deleted = e["position"].as_i64().unwrap();
    saved(deleted).await;
    // SIGTERM: saved, exit 0.
    unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
    let status = exited(&mut child.0).await;
    assert!(status.success(), "{status:?}");
    assert!(lines.try_recv().is_err(), "nothing more");

    // A filter, from position 0 without state.
    let (child, lines) = follow(&["--filter", "type = USER_DELETED"]);
    assert_eq!(next_line(&lines).await["position"], deleted);
    drop(child);
    // `--since now`: none of the backlog, the next change first.
    let (child, lines) = follow(&["--since", "now"]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let fourth = create_user(&mut users, "fourth@x.io").await;
    assert_eq!(next_line(&lines).await["user_id"], fourth.id.as_str());
    drop(child);

    // A bad filter is the server's INVALID_ARGUMENT, said once, exit 1.
    let (mut child, _lines) = follow(&["--filter", "colour = blue"]);
    let status = exited(&mut child.0).await;
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.0.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("colour"), "{err}");
    // So is an address that cannot be one (a server that is down is waited for, below).
    let (mut child, _lines) = follow(&["--server", "not a url"]);
    let status = exited(&mut child.0).await;
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.0.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("bad server address not a url"), "{err}");

    // The server going away is waited out (a replica restarting), not an exit.
    let (mut child, _lines) = follow(&["--state", &state_arg]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    app.begin_shutdown();
    app.stopped().await;
    let stderr = child.0.stderr.take().unwrap();
    let (said_tx, said) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if said_tx.send(line).is_err() {
                break;
            }
        }
    });
    // Two attempts (after 0.5 s and 1 s), still running.
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    let said: Vec<String> = said.try_iter().collect();
    assert!(child.0.try_wait().unwrap().is_none(), "exited: {said:?}");
    assert!(
        said.len() >= 2
            && said[0].starts_with("roster events: ")
            && said[0].contains("reconnecting in 0.5 s")
            && said[1].contains("cannot reach the Roster server")
            && said[1].contains("reconnecting in 1.0 s"),
        "{said:?}"
    );
}

/// The next JSON line from a follower, within 10 s. The server runs on the test's thread:
/// this polls, never blocks it.
async fn next_line(lines: &std::sync::mpsc::Receiver<serde_json::Value>) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match lines.try_recv() {
            Ok(line) => return line,
            Err(std::sync::mpsc::TryRecvError::Empty) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            Err(e) => panic!("no event line within 10 s: {e}"),
        }
    }
}

/// A TCP proxy to `target` whose connections can each be made to go silent: from then on it
/// drops what either side sends and closes nothing, as a load balancer that lost a
/// connection's state or a vanished node does. The flags are the connections', in order.
async fn silencing_proxy(
    target: std::net::SocketAddr,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<std::sync::Arc<std::sync::atomic::AtomicBool>>>>,
) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let flags: Arc<Mutex<Vec<Arc<AtomicBool>>>> = Arc::default();
    let kept = flags.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(target).await else {
                continue;
            };
            let silent = Arc::new(AtomicBool::new(false));
            kept.lock().unwrap().push(silent.clone());
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            for (mut from, mut to, silent) in [
                (
                    Box::new(cr) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
                    Box::new(sw) as Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
                    silent.clone(),
                ),
                (Box::new(sr) as _, Box::new(cw) as _, silent),
            ] {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let n = match from.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if silent.load(Ordering::SeqCst) {
                            // Swallowed; both ends stay open.
                            continue;
                        }
                        if to.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    // Keep the other half open while the peer is silent.
                    if silent.load(Ordering::SeqCst) {
                        std::future::pending::<()>().await;
                    }
                });
            }
        }
    });
    (addr, flags)
}

/// A follower whose connection goes silent (dropped by something in between, without a
/// reset) notices by its keepalive pings going unanswered, and reconnects: the next event
/// still arrives.
#[tokio::test]
async fn events_reconnects_when_its_connection_goes_silent() {
    use std::sync::mpsc;
    let app = TestApp::spawn().await;
    let (proxy, connections) = silencing_proxy(app.addr).await;
    let mut child = Command::new(ROSTER)
        .args(["events", "--keepalive-secs", "1"])
        .env("ROSTER_SERVER", format!("http://{proxy}"))
        .env("ROSTER_API_KEY", &app.token)
        .env_remove("DATABASE_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run roster events");
    let (lines_tx, lines) = mpsc::channel::<serde_json::Value>();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(serde_json::from_str(&line).unwrap()).is_err() {
                break;
            }
        }
    });
    let _child = Reap(child);
    let mut users = app.users();
    let a = create_user(&mut users, "before-silence@x.io").await;
    assert_eq!(next_line(&lines).await["user_id"], a.id.as_str());
    for c in connections.lock().unwrap().iter() {
        c.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    let b = create_user(&mut users, "after-silence@x.io").await;
    assert_eq!(
        next_line(&lines).await["user_id"],
        b.id.as_str(),
        "the follower reconnected and went on"
    );
    assert!(connections.lock().unwrap().len() >= 2, "a new connection");
}

/// `roster events --metrics-listen`: while the webhook answers 503, the follower's metrics
/// show it connected, retrying, and the oldest undelivered event's age growing; once the
/// webhook takes the events, delivered and position move on and nothing waits.
#[tokio::test]
async fn events_metrics_show_a_webhook_falling_behind() {
    let (app, _dir, created) = app_with_users("metrics", 3).await;
    let (url, got) = webhook_receiver(vec![
        (503, Some("1"), ""),
        (503, Some("1"), ""),
        (503, Some("1"), ""),
    ])
    .await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(ROSTER)
        .args([
            "events",
            "--filter",
            "type = USER_CREATED",
            "--post",
            &url,
            "--post-batch",
            "10",
            "--metrics-listen",
            &format!("127.0.0.1:{port}"),
        ])
        .env("ROSTER_SERVER", format!("http://{}", app.addr))
        .env("ROSTER_API_KEY", &app.token)
        .env_remove("DATABASE_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run roster events");
    let _child = Reap(child);
    // One metric's value from a scrape of the follower.
    let scrape = || async move {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut text = String::new();
        if let Ok(mut c) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            let _ = c.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await;
            let _ = c.read_to_string(&mut text).await;
        }
        text
    };
    let value = |text: &str, name: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .map(|v| v.parse().unwrap())
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let behind = loop {
        let text = scrape().await;
        if value(&text, "roster_events_webhook_retries_total").unwrap_or(0.0) >= 2.0 {
            break text;
        }
        assert!(Instant::now() < deadline, "no retries seen: {text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        value(&behind, "roster_events_connected"),
        Some(1.0),
        "{behind}"
    );
    assert_eq!(value(&behind, "roster_events_delivered_total"), Some(0.0));
    assert!(
        value(&behind, "roster_events_undelivered_age_seconds").unwrap() > 0.5,
        "{behind}"
    );
    let caught_up = loop {
        let text = scrape().await;
        if value(&text, "roster_events_delivered_total") == Some(3.0) {
            break text;
        }
        assert!(Instant::now() < deadline, "not delivered: {text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        value(&caught_up, "roster_events_undelivered_age_seconds"),
        Some(0.0)
    );
    let got = got.lock().unwrap();
    let last = got.last().unwrap().body.as_array().unwrap().clone();
    assert_eq!(last.len(), created.len());
    // At the last event delivered, or past it at a checkpoint.
    let position = value(&caught_up, "roster_events_position").unwrap();
    assert!(position >= last.last().unwrap()["position"].as_f64().unwrap());
}

/// Kills the child it holds when dropped, so a failed test leaves no process behind.
struct Reap(std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits for `child` to exit without blocking the test's runtime.
async fn exited(child: &mut std::process::Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "still running after 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

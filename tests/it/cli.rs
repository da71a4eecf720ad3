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
        .output()
        .expect("run roster");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
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
    assert!(err.contains("already exists"), "{err}");

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
        !listed.contains(token.rsplit('_').next().unwrap()),
        "secrets are never listed"
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
        let mut child = Command::new(ROSTER)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env_remove("DATABASE_URL")
            .env("ROSTER_DATA_DIR", &data)
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
        let addr = rx
            .recv_timeout(Duration::from_secs(90))
            .expect("server did not start");
        let token = std::fs::read_to_string(data.join("dev-key"))
            .expect("dev key")
            .trim()
            .to_string();
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut users = roster::pb::v1::user_service_client::UserServiceClient::with_interceptor(
            channel,
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
    }
    // The cluster stopped with the server.
    assert!(!data.join("pgdata").join("postmaster.pid").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

//! TLS and mutual TLS on the gRPC port, with certificates made by rcgen for each test.
use std::path::Path;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use roster::config::ServerConfig;
use roster::pb::v1 as pb;
use roster::pb::v1::user_service_client::UserServiceClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::harness::{TestApp, key};

pub(crate) struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    pub(crate) fn new() -> Ca {
        let mut params = CertificateParams::new(vec![]).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Ca { issuer }
    }

    /// A certificate for `names` signed by this CA: (cert PEM, key PEM).
    pub(crate) fn issue(&self, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    pub(crate) fn pem(&self) -> String {
        self.issuer.pem()
    }
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

async fn channel(
    app: &TestApp,
    ca: &str,
    identity: Option<&(String, String)>,
) -> Result<Channel, String> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Endpoint::from_shared(format!("https://localhost:{}", app.addr.port()))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))
}

/// A GetUser of a made-up id: NOT_FOUND proves the call went through.
async fn reaches_the_server(ch: Channel, token: &str) -> Result<(), tonic::Status> {
    let mut users = UserServiceClient::with_interceptor(ch, key(Some(token)));
    let err = users
        .get_user(pb::GetUserRequest {
            id: uuid::Uuid::now_v7().to_string(),
        })
        .await
        .unwrap_err();
    if err.code() == tonic::Code::NotFound {
        Ok(())
    } else {
        Err(err)
    }
}

fn temp_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("roster-tls-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A server requiring mutual TLS (and serving plaintext health on a port of its own): the
/// app, the CA of its certificate, and the CA client certificates must chain to.
async fn mutual_tls_app(dir: &Path) -> (TestApp, Ca, Ca) {
    let server_ca = Ca::new();
    let client_ca = Ca::new();
    let (cert, key_pem) = server_ca.issue(&["localhost"]);
    let app = TestApp::spawn_with(ServerConfig {
        tls_cert_file: Some(write(dir, "server.pem", &cert)),
        tls_key_file: Some(write(dir, "server.key", &key_pem)),
        tls_client_ca_file: Some(write(dir, "clients.pem", &client_ca.pem())),
        health_listen: "127.0.0.1:0".into(),
        ..Default::default()
    })
    .await;
    (app, server_ca, client_ca)
}

#[tokio::test]
async fn tls_serves_encrypted_and_refuses_plaintext() {
    let dir = temp_dir();
    let ca = Ca::new();
    let (cert, key_pem) = ca.issue(&["localhost"]);
    let app = TestApp::spawn_with(ServerConfig {
        tls_cert_file: Some(write(&dir, "server.pem", &cert)),
        tls_key_file: Some(write(&dir, "server.key", &key_pem)),
        // Files read at start only.
        tls_reload_secs: 0,
        ..Default::default()
    })
    .await;
    let ch = channel(&app, &ca.pem(), None).await.unwrap();
    reaches_the_server(ch, &app.token).await.unwrap();
    // Still accepting later on.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let ch = channel(&app, &ca.pem(), None).await.unwrap();
    reaches_the_server(ch, &app.token).await.unwrap();
    // The harness's plaintext channel gets no answer from a TLS port.
    let err = app
        .users()
        .get_user(pb::GetUserRequest {
            id: uuid::Uuid::now_v7().to_string(),
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err.code(), tonic::Code::Unavailable | tonic::Code::Unknown),
        "a transport failure, not an answer: {err:?}"
    );
    // A client that does not trust the server's CA refuses it.
    assert!(channel(&app, &Ca::new().pem(), None).await.is_err());
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn mutual_tls_requires_a_client_certificate_from_the_client_ca() {
    let dir = temp_dir();
    let (app, server_ca, client_ca) = mutual_tls_app(&dir).await;
    let good = client_ca.issue(&["billing.internal"]);
    let ch = channel(&app, &server_ca.pem(), Some(&good)).await.unwrap();
    reaches_the_server(ch, &app.token).await.unwrap();

    // No client certificate, or one from another CA: no call gets through.
    let stranger = Ca::new().issue(&["billing.internal"]);
    for identity in [None, Some(&stranger)] {
        let refused = match channel(&app, &server_ca.pem(), identity).await {
            Err(_) => true,
            Ok(ch) => reaches_the_server(ch, &app.token).await.is_err(),
        };
        assert!(refused, "identity {:?}", identity.map(|_| "stranger"));
    }
    // The API key is still required over mutual TLS.
    let ch = channel(&app, &server_ca.pem(), Some(&good)).await.unwrap();
    let err = reaches_the_server(ch, "rst_nope").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);

    // Probes that cannot speak TLS use the plaintext health port: health only, nothing else.
    let plain = crate::harness::channel_to(app.health_addr.unwrap());
    crate::faults::wait_for(
        &plain,
        tonic_health::pb::health_check_response::ServingStatus::Serving,
        std::time::Duration::from_secs(10),
    )
    .await;
    let err = reaches_the_server(plain, &app.token).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented, "{err:?}");
    let _ = std::fs::remove_dir_all(dir);
}

/// The client commands (`roster export`, `import`, `events`) reach a server that requires
/// mutual TLS with --tls-ca-file, --tls-cert-file and --tls-key-file; without the client
/// certificate the run fails with the server's address in the message, and TLS options with
/// an http:// server are refused before anything is sent.
#[tokio::test]
async fn client_commands_speak_tls_and_mutual_tls() {
    let dir = temp_dir();
    let (app, server_ca, client_ca) = mutual_tls_app(&dir).await;
    let ch = channel(&app, &server_ca.pem(), Some(&client_ca.issue(&["ops"])))
        .await
        .unwrap();
    let mut users = UserServiceClient::with_interceptor(ch, key(Some(&app.token)));
    crate::create_user(&mut users, "over-tls@example.com").await;
    let ca_file = write(&dir, "ca.pem", &server_ca.pem());
    let (client_cert, client_key) = client_ca.issue(&["ops"]);
    let cert_file = write(&dir, "client.pem", &client_cert);
    let key_file = write(&dir, "client.key", &client_key);
    let server = format!("https://localhost:{}", app.addr.port());
    let (code, out, err) = crate::cli::roster_client(
        &app,
        &app.token,
        &[
            "export",
            "--fields",
            "email",
            "--server",
            &server,
            "--tls-ca-file",
            ca_file.to_str().unwrap(),
            "--tls-cert-file",
            cert_file.to_str().unwrap(),
            "--tls-key-file",
            key_file.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("over-tls@example.com"), "{out}");

    let (code, _, err) = crate::cli::roster_client(
        &app,
        &app.token,
        &[
            "export",
            "--server",
            &server,
            "--tls-ca-file",
            ca_file.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(code, 1, "no client certificate: refused by the server");
    assert!(
        err.contains(&format!("cannot reach the Roster server at {server}"))
            && err.contains("client certificate"),
        "{err}"
    );

    let (code, _, err) = crate::cli::roster_client(
        &app,
        &app.token,
        &["export", "--tls-ca-file", ca_file.to_str().unwrap()],
    )
    .await;
    assert_eq!(code, 1);
    assert!(err.contains("need an https:// --server"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn bad_tls_settings_fail_at_start_up() {
    let dir = temp_dir();
    let missing = ServerConfig {
        tls_cert_file: Some(dir.join("absent.pem")),
        tls_key_file: Some(dir.join("absent.key")),
        ..Default::default()
    };
    let pool = roster::db::connect_pool("host=/nonexistent", 1, std::time::Duration::from_secs(1))
        .unwrap();
    let err =
        roster::server::Application::build("127.0.0.1:0".parse().unwrap(), pool.clone(), missing)
            .await
            .err()
            .expect("refused");
    assert!(format!("{err:#}").contains("absent.pem"), "{err:#}");
    let ca_only = ServerConfig {
        tls_client_ca_file: Some(dir.join("ca.pem")),
        ..Default::default()
    };
    let err = roster::server::Application::build("127.0.0.1:0".parse().unwrap(), pool, ca_only)
        .await
        .err()
        .expect("refused");
    assert!(format!("{err:#}").contains("--tls-cert-file"), "{err:#}");
    // A key that is not the certificate's.
    let ca = Ca::new();
    let (cert, _) = ca.issue(&["localhost"]);
    let (_, other_key) = ca.issue(&["localhost"]);
    let mismatched = ServerConfig {
        tls_cert_file: Some(write(&dir, "server.pem", &cert)),
        tls_key_file: Some(write(&dir, "other.key", &other_key)),
        ..Default::default()
    };
    let pool = roster::db::connect_pool("host=/nonexistent", 1, std::time::Duration::from_secs(1))
        .unwrap();
    let err = roster::server::Application::build("127.0.0.1:0".parse().unwrap(), pool, mismatched)
        .await
        .err()
        .expect("refused");
    assert!(format!("{err:#}").contains("do not go together"), "{err:#}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Replaces `path` the way a Secret volume does: write aside, then rename over it.
fn replace(path: &Path, text: &str) {
    let aside = path.with_extension("new");
    std::fs::write(&aside, text).unwrap();
    std::fs::rename(&aside, path).unwrap();
}

#[tokio::test]
async fn a_rotated_certificate_is_served_to_new_connections_and_a_bad_one_is_refused() {
    let dir = temp_dir();
    let old_ca = Ca::new();
    let (cert, key_pem) = old_ca.issue(&["localhost"]);
    let cert_file = write(&dir, "server.pem", &cert);
    let key_file = write(&dir, "server.key", &key_pem);
    let app = TestApp::spawn_with(ServerConfig {
        tls_cert_file: Some(cert_file.clone()),
        tls_key_file: Some(key_file.clone()),
        tls_reload_secs: 1,
        ..Default::default()
    })
    .await;
    let before = channel(&app, &old_ca.pem(), None).await.unwrap();
    reaches_the_server(before.clone(), &app.token)
        .await
        .unwrap();

    // cert-manager renews: a certificate from another CA, key and certificate swapped in.
    let new_ca = Ca::new();
    let (cert, key_pem) = new_ca.issue(&["localhost"]);
    replace(&key_file, &key_pem);
    replace(&cert_file, &cert);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let renewed = loop {
        if let Ok(ch) = channel(&app, &new_ca.pem(), None).await {
            break ch;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the new certificate was never served"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    reaches_the_server(renewed, &app.token).await.unwrap();
    // New connections get the new certificate only; the open one keeps working.
    assert!(channel(&app, &old_ca.pem(), None).await.is_err());
    reaches_the_server(before, &app.token).await.unwrap();

    // A bad rotation (a key that does not match the certificate) is refused: the port keeps
    // serving the last good certificate.
    let (_, stray_key) = new_ca.issue(&["localhost"]);
    replace(&key_file, &stray_key);
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let ch = channel(&app, &new_ca.pem(), None).await.unwrap();
    reaches_the_server(ch, &app.token).await.unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

//! TLS and mutual TLS on the gRPC port, with certificates made by rcgen for each test.
use std::path::Path;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use roster::config::ServerConfig;
use roster::pb::v1 as pb;
use roster::pb::v1::user_service_client::UserServiceClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::harness::{TestApp, key};

struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new() -> Ca {
        let mut params = CertificateParams::new(vec![]).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Ca { issuer }
    }

    /// A certificate for `names` signed by this CA: (cert PEM, key PEM).
    fn issue(&self, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn pem(&self) -> String {
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

#[tokio::test]
async fn tls_serves_encrypted_and_refuses_plaintext() {
    let dir = temp_dir();
    let ca = Ca::new();
    let (cert, key_pem) = ca.issue(&["localhost"]);
    let app = TestApp::spawn_with(ServerConfig {
        tls_cert_file: Some(write(&dir, "server.pem", &cert)),
        tls_key_file: Some(write(&dir, "server.key", &key_pem)),
        ..Default::default()
    })
    .await;
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
    let server_ca = Ca::new();
    let client_ca = Ca::new();
    let (cert, key_pem) = server_ca.issue(&["localhost"]);
    let app = TestApp::spawn_with(ServerConfig {
        tls_cert_file: Some(write(&dir, "server.pem", &cert)),
        tls_key_file: Some(write(&dir, "server.key", &key_pem)),
        tls_client_ca_file: Some(write(&dir, "clients.pem", &client_ca.pem())),
        health_listen: "127.0.0.1:0".into(),
        ..Default::default()
    })
    .await;
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
    let plain = Endpoint::from_shared(format!("http://{}", app.health_addr.unwrap()))
        .unwrap()
        .connect_lazy();
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
    let _ = std::fs::remove_dir_all(dir);
}

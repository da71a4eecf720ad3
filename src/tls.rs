//! TLS on the gRPC port, reloaded from its files while serving.
//!
//! Certificates rotate (cert-manager renews them into the mounted Secret well before they
//! expire), so the files are read again every `--tls-reload-secs`: a changed certificate,
//! key or client CA applies to the next connections, open ones keep theirs. Files that do
//! not make a valid configuration (a key that does not match, half-written PEM) are refused
//! with a warning and the last good configuration stays: a bad rotation never takes the
//! port down. Handshakes run concurrently, each bounded in time, off the accept loop.
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

/// How long a client may take to complete its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the port's TLS material lives.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Client certificates must chain to these CAs (mutual TLS); none: no client certificate.
    pub client_ca: Option<PathBuf>,
}

/// The files' contents, to see whether they changed.
type Contents = Vec<Vec<u8>>;

impl TlsFiles {
    fn read(&self) -> anyhow::Result<Contents> {
        let read = |p: &PathBuf, what: &str| {
            std::fs::read(p).with_context(|| format!("reading the {what} {}", p.display()))
        };
        let mut out = vec![
            read(&self.cert, "TLS certificate")?,
            read(&self.key, "TLS key")?,
        ];
        if let Some(ca) = &self.client_ca {
            out.push(read(ca, "client CA")?);
        }
        Ok(out)
    }

    fn build(&self, contents: &Contents) -> anyhow::Result<Arc<ServerConfig>> {
        let provider = provider();
        let certs = CertificateDer::pem_slice_iter(&contents[0])
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("parsing the TLS certificate {}", self.cert.display()))?;
        anyhow::ensure!(
            !certs.is_empty(),
            "no certificate in {}",
            self.cert.display()
        );
        let key = PrivateKeyDer::from_pem_slice(&contents[1])
            .with_context(|| format!("parsing the TLS key {}", self.key.display()))?;
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        let builder = match (&self.client_ca, contents.get(2)) {
            (Some(path), Some(pem)) => {
                let mut roots = RootCertStore::empty();
                for ca in CertificateDer::pem_slice_iter(pem) {
                    let ca =
                        ca.with_context(|| format!("parsing the client CA {}", path.display()))?;
                    roots
                        .add(ca)
                        .with_context(|| format!("adding the client CA {}", path.display()))?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .with_context(|| format!("the client CA {}", path.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
            _ => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .context("the TLS certificate and key do not go together")?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

/// The configuration new connections get, kept current with the files.
pub struct ReloadingTls {
    files: TlsFiles,
    current: RwLock<(Contents, Arc<ServerConfig>)>,
}

impl ReloadingTls {
    /// Reads and checks the files now: bad ones fail start-up.
    pub fn load(files: TlsFiles) -> anyhow::Result<Arc<Self>> {
        let contents = files.read()?;
        let config = files.build(&contents)?;
        Ok(Arc::new(ReloadingTls {
            files,
            current: RwLock::new((contents, config)),
        }))
    }

    fn config(&self) -> Arc<ServerConfig> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .clone()
    }

    /// Reads the files again and, when they changed and make a valid configuration, uses
    /// them for the next connections. Returns whether it switched.
    pub fn reload(&self) -> bool {
        let contents = match self.files.read() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "keeping the current TLS certificate"
                );
                return false;
            }
        };
        if self.current.read().unwrap_or_else(|p| p.into_inner()).0 == contents {
            return false;
        }
        match self.files.build(&contents) {
            Ok(config) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = (contents, config);
                tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
                true
            }
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "keeping the current TLS certificate"
                );
                // Remember the refused files: warn once per change, not on every check.
                self.current.write().unwrap_or_else(|p| p.into_inner()).0 = contents;
                false
            }
        }
    }
}

/// The TLS crypto provider of the server and the client commands: ring's. rustls 0.23.48
/// deprecates it because ring has no post-quantum key exchange (X25519MLKEM768 needs
/// aws-lc-rs, a large C build); the TLS it makes is otherwise what it was.
#[allow(deprecated)]
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts on `listener` and hands over connections whose TLS handshake succeeded; checks
/// the files every `reload` (zero: never). The task ends when the stream is dropped (or is
/// aborted by the server at shutdown).
pub fn incoming(
    listener: TcpListener,
    tls: Arc<ReloadingTls>,
    reload: Duration,
) -> (
    ReceiverStream<std::io::Result<TlsStream<TcpStream>>>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = mpsc::channel(64);
    let task = tokio::spawn(async move {
        // No timer at all when reloading is off (a huge period would overflow `Instant`).
        let mut tick = (!reload.is_zero()).then(|| {
            let mut t = tokio::time::interval_at(tokio::time::Instant::now() + reload, reload);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        });
        loop {
            let due = async {
                match tick.as_mut() {
                    Some(t) => {
                        t.tick().await;
                    }
                    None => std::future::pending().await,
                }
            };
            let tcp = tokio::select! {
                _ = due => {
                    let tls = tls.clone();
                    // File reads and key parsing: off the async threads.
                    let _ = tokio::task::spawn_blocking(move || tls.reload()).await;
                    continue;
                }
                _ = tx.closed() => return,
                accepted = listener.accept() => match accepted {
                    Ok((tcp, _)) => tcp,
                    Err(e) => {
                        // Out of file descriptors and the like: wait a moment, go on.
                        tracing::warn!(error = %e, "accepting a connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            // As for plaintext: without TCP_NODELAY, multi-segment answers wait out the
            // peer's delayed ACK.
            let _ = tcp.set_nodelay(true);
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.config());
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!("TLS handshake timed out"),
                }
            });
        }
    });
    (ReceiverStream::new(rx), task)
}

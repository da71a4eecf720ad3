//! What the client commands (`import`, `export`, `events`, `users`) share: the server
//! address, the API key, TLS and keepalive, the clients, and progress reporting (a bar on a
//! terminal, periodic lines otherwise).
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::pb::v1::authenticator_service_client::AuthenticatorServiceClient;
use crate::pb::v1::identity_service_client::IdentityServiceClient;
use crate::pb::v1::log_service_client::LogServiceClient;
use crate::pb::v1::user_service_client::UserServiceClient;

/// Where the server is. The API key comes from `ROSTER_API_KEY` (never a flag: flags show in
/// `ps`), else from the key file `roster serve` writes for development.
#[derive(clap::Args, Debug)]
pub struct ServerArgs {
    /// The Roster server to talk to.
    #[arg(long, env = "ROSTER_SERVER", default_value = "http://127.0.0.1:50051")]
    pub server: String,
    /// A file holding the API key, used when ROSTER_API_KEY is not set.
    #[arg(
        long,
        env = "ROSTER_API_KEY_FILE",
        default_value = "./roster-data/dev-key"
    )]
    pub api_key_file: PathBuf,
    /// For an https:// server: trust the CA certificates in this PEM file besides the
    /// system's (a private CA, cert-manager's `ca.crt`).
    #[arg(long, env = "ROSTER_CLIENT_TLS_CA_FILE", value_name = "FILE")]
    pub tls_ca_file: Option<PathBuf>,
    /// For a server that requires mutual TLS: this client certificate (PEM), with
    /// --tls-key-file.
    #[arg(
        long,
        env = "ROSTER_CLIENT_TLS_CERT_FILE",
        value_name = "FILE",
        requires = "tls_key_file"
    )]
    pub tls_cert_file: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert-file.
    #[arg(
        long,
        env = "ROSTER_CLIENT_TLS_KEY_FILE",
        value_name = "FILE",
        requires = "tls_cert_file"
    )]
    pub tls_key_file: Option<PathBuf>,
    /// Ping the server over an idle-looking connection this often, and count it gone when a
    /// ping goes unanswered (at most 20 s): a follower whose connection a load balancer or a
    /// vanished node dropped without a word reconnects instead of waiting for ever. 0: off.
    #[arg(
        long = "keepalive-secs",
        env = "ROSTER_CLIENT_KEEPALIVE_SECS",
        value_name = "SECS",
        default_value_t = 60
    )]
    pub keepalive_secs: u64,
}

#[derive(Clone)]
pub struct Bearer(MetadataValue<Ascii>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

pub type Users = UserServiceClient<InterceptedService<Channel, Bearer>>;
pub type Logs = LogServiceClient<InterceptedService<Channel, Bearer>>;
pub type Authenticators = AuthenticatorServiceClient<InterceptedService<Channel, Bearer>>;
pub type Identities = IdentityServiceClient<InterceptedService<Channel, Bearer>>;

impl ServerArgs {
    fn api_key(&self) -> anyhow::Result<String> {
        if let Ok(k) = std::env::var("ROSTER_API_KEY")
            && !k.trim().is_empty()
        {
            return Ok(k.trim().to_string());
        }
        let k = std::fs::read_to_string(&self.api_key_file).with_context(|| {
            format!(
                "no API key: set ROSTER_API_KEY (or --api-key-file; {} is not readable)",
                self.api_key_file.display()
            )
        })?;
        Ok(k.trim().to_string())
    }

    /// The key as a header value, and a channel to the server (connected now, so a wrong
    /// address is said at once).
    async fn connect(&self) -> anyhow::Result<(Channel, Bearer)> {
        let key = self.api_key()?;
        let bearer: MetadataValue<Ascii> = format!("Bearer {key}")
            .parse()
            .context("the API key has characters a header cannot carry")?;
        let mut endpoint = tonic::transport::Endpoint::from_shared(self.server.clone())
            .with_context(|| format!("bad server address {}", self.server))?
            .connect_timeout(Duration::from_secs(10));
        if self.keepalive_secs > 0 {
            // HTTP/2 pings; a stream's reads end with an error when one goes unanswered.
            // While idle too: hyper counts a connection whose only stream is a long response
            // (a follower's) as idle, and would never ping it otherwise.
            endpoint = endpoint
                .http2_keep_alive_interval(Duration::from_secs(self.keepalive_secs))
                .keep_alive_timeout(Duration::from_secs(self.keepalive_secs.min(20)))
                .keep_alive_while_idle(true);
        }
        if let Some(tls) = self.tls()? {
            endpoint = endpoint.tls_config(tls).context("TLS settings")?;
        }
        let channel = endpoint
            .connect()
            .await
            .with_context(|| format!("cannot reach the Roster server at {}", self.server))?;
        Ok((channel, Bearer(bearer)))
    }

    /// TLS for an https:// server (the system's CAs, --tls-ca-file's, and a client
    /// certificate for mutual TLS); none for http://.
    fn tls(&self) -> anyhow::Result<Option<ClientTlsConfig>> {
        let read = |path: &PathBuf| {
            std::fs::read(path).with_context(|| format!("reading {}", path.display()))
        };
        if !self.server.starts_with("https://") {
            if self.tls_ca_file.is_some() || self.tls_cert_file.is_some() {
                anyhow::bail!("--tls-ca-file and --tls-cert-file need an https:// --server");
            }
            return Ok(None);
        }
        let mut tls = ClientTlsConfig::new().with_native_roots();
        if let Some(ca) = &self.tls_ca_file {
            tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert_file, &self.tls_key_file) {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        Ok(Some(tls))
    }

    pub async fn users(&self) -> anyhow::Result<Users> {
        let (channel, bearer) = self.connect().await?;
        Ok(UserServiceClient::with_interceptor(channel, bearer)
            .max_decoding_message_size(64 * 1024 * 1024))
    }

    pub async fn logs(&self) -> anyhow::Result<Logs> {
        let (channel, bearer) = self.connect().await?;
        Ok(LogServiceClient::with_interceptor(channel, bearer))
    }

    pub async fn authenticators(&self) -> anyhow::Result<Authenticators> {
        let (channel, bearer) = self.connect().await?;
        Ok(AuthenticatorServiceClient::with_interceptor(
            channel, bearer,
        ))
    }

    pub async fn identities(&self) -> anyhow::Result<Identities> {
        let (channel, bearer) = self.connect().await?;
        Ok(IdentityServiceClient::with_interceptor(channel, bearer))
    }
}

/// Progress on stderr: an indicatif bar with rate and ETA on a terminal, else a plain line
/// every few seconds (logs and CI keep a readable trail).
pub struct Progress {
    bar: Option<ProgressBar>,
    started: Instant,
    last_line: Instant,
    label: &'static str,
}

const LINE_EVERY: Duration = Duration::from_secs(5);

impl Progress {
    /// `total` is in the unit `position` is reported in (bytes of the file, or users).
    pub fn new(label: &'static str, total: Option<u64>, bytes: bool) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = match total {
                Some(t) => ProgressBar::new(t),
                None => ProgressBar::new_spinner(),
            };
            let template = match (total.is_some(), bytes) {
                (true, true) => {
                    "{spinner} {elapsed_precise} [{wide_bar}] {bytes}/{total_bytes} ETA {eta} {msg}"
                }
                (true, false) => {
                    "{spinner} {elapsed_precise} [{wide_bar}] {pos}/{len} {per_sec} ETA {eta} {msg}"
                }
                _ => "{spinner} {elapsed_precise} {pos} {per_sec} {msg}",
            };
            if let Ok(style) = ProgressStyle::with_template(template) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_draw_target(ProgressDrawTarget::stderr());
            bar
        });
        let now = Instant::now();
        Progress {
            bar,
            started: now,
            last_line: now,
            label,
        }
    }

    /// Reports progress: `position` for the bar, `count` records so far, `detail` a summary.
    pub fn update(&mut self, position: u64, count: u64, detail: impl FnOnce() -> String) {
        match &self.bar {
            Some(bar) => {
                bar.set_position(position);
                if count.is_multiple_of(512) {
                    bar.set_message(detail());
                }
            }
            None if self.last_line.elapsed() >= LINE_EVERY => {
                self.last_line = Instant::now();
                let detail = detail();
                let detail = if detail.is_empty() {
                    String::new()
                } else {
                    format!(": {detail}")
                };
                eprintln!(
                    "{} {count} records ({:.0}/s){detail}",
                    self.label,
                    self.rate(count),
                );
            }
            None => {}
        }
    }

    pub fn rate(&self, count: u64) -> f64 {
        count as f64 / self.started.elapsed().as_secs_f64().max(1e-3)
    }

    /// "in 12.3s (81300/s)" for the final summary; a run under a second gets no rate, which
    /// would only restate its count ("11 records in 0.0s (11000/s)").
    pub fn took(&self, count: u64) -> String {
        took(self.started.elapsed(), count)
    }

    /// A line on standard error, above the bar when there is one.
    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

fn took(elapsed: Duration, count: u64) -> String {
    let secs = elapsed.as_secs_f64();
    if secs < 1.0 {
        format!("in {secs:.1}s")
    } else {
        format!("in {secs:.1}s ({:.0}/s)", count as f64 / secs)
    }
}

/// A call's failure as its user should read it: a status the server answered, by its
/// message; one the transport made (a TLS alert, a reset connection: tonic's "transport
/// error"), by the server that could not be reached and the underlying reasons.
pub fn call_failed(server: &ServerArgs, what: &str, s: tonic::Status) -> anyhow::Error {
    let why = causes(&s);
    if why.is_empty() {
        return anyhow::anyhow!("the server refused {what}: {}", s.message());
    }
    // TLS 1.3 checks the client's certificate after the client's side of the handshake:
    // the refusal arrives with the first call (as an alert, or as the connection closing).
    let hint = if why.iter().any(|w| w.contains("CertificateRequired")) {
        " (the server requires a client certificate: --tls-cert-file and --tls-key-file)"
    } else if server.server.starts_with("https://") && server.tls_cert_file.is_none() {
        " (if the server requires client certificates: --tls-cert-file and --tls-key-file)"
    } else {
        ""
    };
    anyhow::anyhow!(
        "cannot reach the Roster server at {}: {}{hint}",
        server.server,
        why.join(": ")
    )
}

/// Whether a call failed because the server or the network went away (a replica shutting
/// down, a restart, a broken connection), as opposed to a refusal or a failure on this side.
pub fn server_went_away(e: &anyhow::Error) -> bool {
    e.downcast_ref::<tonic::Status>().is_some_and(|s| {
        matches!(
            s.code(),
            tonic::Code::Unavailable
                | tonic::Code::Unknown
                | tonic::Code::Internal
                | tonic::Code::Cancelled
                | tonic::Code::DeadlineExceeded
        ) && !refused_by_tls(s)
    })
}

/// Whether the server's TLS refused the connection (a fatal alert: no or a wrong client
/// certificate), which calling again cannot mend.
fn refused_by_tls(s: &tonic::Status) -> bool {
    causes(s).iter().any(|c| c.contains("received fatal alert"))
}

/// What a status the transport made says beneath it (none for one the server answered),
/// each cause once.
fn causes(s: &tonic::Status) -> Vec<String> {
    let mut why: Vec<String> = Vec::new();
    let mut cause = std::error::Error::source(s);
    while let Some(c) = cause {
        let text = c.to_string();
        if why.last() != Some(&text) {
            why.push(text);
        }
        cause = c.source();
    }
    why
}

/// Whether a stream can go on after `e` by calling again: the server went away, or is busy
/// (RESOURCE_EXHAUSTED), or a connection could not be made; not a bad key or filter.
pub fn retryable(e: &anyhow::Error) -> bool {
    match e.downcast_ref::<tonic::Status>() {
        Some(s) => server_went_away(e) || s.code() == tonic::Code::ResourceExhausted,
        // Connecting failed, or the stream ended: the server is away.
        None => e.downcast_ref::<std::io::Error>().is_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::took;
    use std::time::Duration;

    #[test]
    fn a_summary_gives_a_rate_only_for_runs_of_a_second_or_more() {
        assert_eq!(took(Duration::from_millis(40), 11), "in 0.0s");
        assert_eq!(took(Duration::from_millis(999), 11), "in 1.0s");
        assert_eq!(
            took(Duration::from_millis(2_500), 5_000),
            "in 2.5s (2000/s)"
        );
    }
}

//! `roster events --post URL`: each event POSTed to a webhook, as the Standard Webhooks
//! specification (standardwebhooks.com) has it, so the receiver's own library checks it:
//! `webhook-id` (the event's id, the same on every try, for the receiver to drop repeats),
//! `webhook-timestamp` (the try's Unix time) and, with a secret, `webhook-signature`
//! (`v1,` and the base64 HMAC-SHA256 of `id.timestamp.body` under the secret's key).
//!
//! An event counts as delivered only on a 2xx answer; the follower moves on (and its state
//! file) only then, so delivery is at least once, in position order. A refused connection, a
//! timeout, 408, 429 or a 5xx is tried again with the same id, waiting as the answer's
//! `Retry-After` says or 0.5 s doubling to 30 s, for as long as it takes (the stream waits
//! meanwhile). Any other answer (a 3xx, a 4xx: the receiver says the event is wrong or the
//! sender unwelcome) stops the follower with an error, its state before that event: retrying
//! cannot mend it, and skipping it would lose it.
//!
//! With `--post-batch N`, up to N events go in one request, as a JSON array (or JSON lines
//! with `--post-format ndjson`, or lines of Splunk HEC's envelope with `splunk-hec`), for
//! log collectors (Datadog, Splunk, Elastic, Vector) whose intake takes batches and for a
//! receiver far enough away that one round trip per event cannot keep up. A batch goes when
//! full, before it would pass 1 MiB, when the stream pauses, or 1 s after its first event,
//! whichever comes first; its `webhook-id` names its first and last positions (each event
//! keeps its own `id` for dropping repeats). With `--post-gzip` the body goes compressed
//! (`Content-Encoding: gzip`), as collectors' intakes take it; the signature covers the
//! body before compression, what the receiver reads.
//!
//! Messages name the webhook by its scheme, host and port only: a webhook URL's path or query
//! is often its secret (Slack's are), and so are the secret and the header values.
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use base64::Engine as _;
use hmac::{Hmac, Mac};
use http::{HeaderName, HeaderValue, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use sha2::Sha256;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{self, RootCertStore};

/// How long connecting (TCP and TLS) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a try may wait for the answer, body included.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// Waits between tries: doubling from the first to the last; a `Retry-After` is honoured up
/// to the longest.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_LAST: Duration = Duration::from_secs(30);
const RETRY_AFTER_LONGEST: Duration = Duration::from_secs(600);
/// How much of an answer's body is read (and at most 200 characters of it shown).
const ANSWER_BODY_LIMIT: usize = 64 * 1024;
/// A batch goes before it would pass this size (collectors' usual limit on a request; an
/// event larger by itself goes alone), and at the latest this long after its first event.
const BATCH_BYTES: usize = 1024 * 1024;
const BATCH_LINGER: Duration = Duration::from_secs(1);
/// The most events one request may carry.
const BATCH_MOST: usize = 1_000;

/// How events are written in a request's body.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PostFormat {
    /// A JSON object per event; a JSON array of them with --post-batch.
    Json,
    /// JSON lines: one object per line (`application/x-ndjson`).
    Ndjson,
    /// Splunk's HTTP Event Collector (`/services/collector/event`): each event in HEC's
    /// envelope (`time` the event's, `source` roster, `sourcetype` _json), one per line.
    SplunkHec,
}

/// The webhook options of `roster events`.
#[derive(clap::Args, Debug)]
pub struct PostArgs {
    /// POST each event to this http:// or https:// URL instead of writing it to standard
    /// output (Standard Webhooks headers; see the README).
    #[arg(
        long,
        value_name = "URL",
        env = "ROSTER_EVENTS_POST",
        hide_env_values = true
    )]
    pub post: Option<String>,
    /// Sign each POST with this Standard Webhooks secret (`whsec_` and base64): a file
    /// holding it. Without it, the secret itself may be in ROSTER_EVENTS_POST_SECRET.
    #[arg(long, value_name = "FILE", requires = "post")]
    pub post_secret_file: Option<std::path::PathBuf>,
    /// A header to send with each POST, `Name: value` (say, the receiver's token); repeat for
    /// more (one may come from ROSTER_EVENTS_POST_HEADER). Values are never printed.
    #[arg(long, value_name = "HEADER", requires = "post")]
    pub post_header: Vec<String>,
    /// Trust the certificate authorities in this PEM file for an https:// webhook, besides the
    /// system's.
    #[arg(
        long,
        value_name = "FILE",
        requires = "post",
        env = "ROSTER_EVENTS_POST_CA_FILE"
    )]
    pub post_ca_file: Option<std::path::PathBuf>,
    /// Send up to N events per POST (1 to 1000), as a JSON array or, with `--post-format
    /// ndjson`, JSON lines: for log collectors that take batches, or a webhook too far away
    /// for one round trip per event. A batch goes when full, when the stream pauses, or 1 s
    /// after its first event.
    #[arg(
        long,
        value_name = "N",
        requires = "post",
        env = "ROSTER_EVENTS_POST_BATCH",
        value_parser = clap::value_parser!(u16).range(1..=BATCH_MOST as i64)
    )]
    pub post_batch: Option<u16>,
    /// How the body holds the events: `json` (an object, or an array with --post-batch),
    /// `ndjson` (one object per line) or `splunk-hec` (Splunk's HTTP Event Collector: each
    /// event in HEC's envelope with its time).
    #[arg(
        long,
        value_enum,
        value_name = "FORMAT",
        default_value = "json",
        requires = "post",
        env = "ROSTER_EVENTS_POST_FORMAT"
    )]
    pub post_format: PostFormat,
    /// Compress each POST's body with gzip (`Content-Encoding: gzip`), as log collectors'
    /// intakes take it: a batch of events shrinks six times or more. The signature covers
    /// the body before compression.
    #[arg(
        long,
        env = "ROSTER_EVENTS_POST_GZIP",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub post_gzip: bool,
}

/// The environment's signing secret and header (secrets belong there rather than in flags,
/// which `ps` shows; a Kubernetes Secret becomes them).
const SECRET_ENV: &str = "ROSTER_EVENTS_POST_SECRET";
const HEADER_ENV: &str = "ROSTER_EVENTS_POST_HEADER";

/// A receiver's answer that retrying cannot mend: the follower stops.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(String);

/// Where events are POSTed, and the connection kept to it.
pub struct Poster {
    /// `scheme://host:port`, the only part of the URL ever shown.
    shown: String,
    host: String,
    port: u16,
    /// The Host header: the URL's host, and its port when not the scheme's.
    authority: String,
    path: String,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    key: Option<Vec<u8>>,
    headers: Vec<(HeaderName, HeaderValue)>,
    connection: Option<SendRequest<Full<Bytes>>>,
    /// How long one event may go untaken before delivery stops (None: for as long as it
    /// takes).
    give_up_after: Option<Duration>,
    format: PostFormat,
    gzip: bool,
    /// With --post-batch: its size (the body is then always a list, even of one).
    batch: Option<usize>,
    pending: Pending,
    /// Counts the tries made again (`roster events --metrics-listen`).
    retries: Option<prometheus_client::metrics::counter::Counter>,
}

/// The events taken from the stream and not yet delivered.
#[derive(Default)]
struct Pending {
    body: Vec<u8>,
    count: usize,
    /// The first event's id (the webhook-id of a request of one event) and position.
    first_id: String,
    first: i64,
    last: i64,
    since: Option<std::time::Instant>,
}

/// What became of one try.
enum Answer {
    Delivered,
    /// Worth another try, after the wait given if any.
    Later(String, Option<Duration>),
    Refused(String),
}

impl Poster {
    pub fn new(args: &PostArgs) -> anyhow::Result<Option<Poster>> {
        let Some(text) = &args.post else {
            // (A flag clap cannot tie to --post: its environment variable may say false.)
            if args.post_gzip {
                bail!("--post-gzip compresses what --post sends: give --post too");
            }
            return Ok(None);
        };
        let url = url::Url::parse(text).map_err(|e| anyhow::anyhow!("--post: not a URL: {e}"))?;
        let tls = match url.scheme() {
            "http" => false,
            "https" => true,
            other => bail!("--post: the URL must be http:// or https://, not {other}://"),
        };
        if !url.username().is_empty() || url.password().is_some() {
            bail!("--post: give credentials with --post-header, not in the URL");
        }
        let host = match url.host() {
            Some(url::Host::Domain(d)) => d.to_string(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            None => bail!("--post: the URL has no host"),
        };
        let port = url
            .port_or_known_default()
            .unwrap_or(if tls { 443 } else { 80 });
        let host_text = url.host_str().unwrap_or_default();
        let authority = match url.port() {
            Some(p) => format!("{host_text}:{p}"),
            None => host_text.to_string(),
        };
        let path = match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_string(),
        };
        let tls = if tls {
            let config = client_config(args.post_ca_file.as_deref())?;
            let name = ServerName::try_from(host.clone())
                .map_err(|_| anyhow::anyhow!("--post: {host} cannot be checked by TLS"))?;
            Some((TlsConnector::from(Arc::new(config)), name))
        } else {
            None
        };
        let key = match (&args.post_secret_file, env(SECRET_ENV)) {
            (Some(path), _) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                Some(secret_key(&text).with_context(|| path.display().to_string())?)
            }
            (None, Some(text)) => Some(secret_key(&text).context(SECRET_ENV)?),
            (None, None) => None,
        };
        let headers = args
            .post_header
            .iter()
            .cloned()
            .chain(env(HEADER_ENV))
            .map(|h| header(&h))
            .collect::<anyhow::Result<_>>()?;
        Ok(Some(Poster {
            shown: format!("{}://{authority}", url.scheme()),
            host,
            port,
            authority,
            path,
            tls,
            key,
            headers,
            connection: None,
            give_up_after: None,
            format: args.post_format,
            gzip: args.post_gzip,
            batch: args.post_batch.map(usize::from),
            pending: Pending::default(),
            retries: None,
        }))
    }

    /// Counts each try made again on `counter`.
    pub fn count_retries(&mut self, counter: prometheus_client::metrics::counter::Counter) {
        self.retries = Some(counter);
    }

    /// Whether no event waits to be sent.
    pub fn is_empty(&self) -> bool {
        self.pending.count == 0
    }

    /// Stops delivery (with Refused) when one event has gone untaken this long.
    pub fn give_up_after(&mut self, limit: Duration) {
        self.give_up_after = Some(limit);
    }

    /// Takes one event (`id`, `position`, when it happened as Unix seconds, its JSON); true
    /// when the request is full and [`Poster::send`] is due.
    pub fn add(&mut self, id: &str, position: i64, at: Option<f64>, json: &[u8]) -> bool {
        let p = &mut self.pending;
        if p.count == 0 {
            p.first_id = id.to_string();
            p.first = position;
            p.since = Some(std::time::Instant::now());
        }
        if self.format == PostFormat::Json && self.batch.is_some() {
            p.body.push(if p.count == 0 { b'[' } else { b',' });
        }
        match self.format {
            PostFormat::SplunkHec => {
                // HEC's envelope; without a time Splunk would use the time of arrival.
                p.body.extend_from_slice(b"{");
                if let Some(at) = at {
                    p.body
                        .extend_from_slice(format!("\"time\":{at:.3},").as_bytes());
                }
                p.body.extend_from_slice(
                    b"\"source\":\"roster\",\"sourcetype\":\"_json\",\"event\":",
                );
                p.body.extend_from_slice(json);
                p.body.extend_from_slice(b"}\n");
            }
            PostFormat::Ndjson => {
                p.body.extend_from_slice(json);
                p.body.push(b'\n');
            }
            PostFormat::Json => p.body.extend_from_slice(json),
        }
        p.count += 1;
        p.last = position;
        p.count >= self.batch.unwrap_or(1)
    }

    /// Whether an event of `size` bytes would take the request past its size: send first.
    pub fn would_overflow(&self, size: usize) -> bool {
        // Room for the separators, or for HEC's envelope.
        self.pending.count > 0 && self.pending.body.len() + size + 96 > BATCH_BYTES
    }

    /// When the events taken must go at the latest (None: there are none).
    pub fn due(&self) -> Option<std::time::Instant> {
        self.pending.since.map(|t| t + BATCH_LINGER)
    }

    /// Forgets the events taken and not sent (the stream is read again from before them).
    pub fn discard(&mut self) {
        self.pending = Pending::default();
    }

    /// POSTs the events taken until the webhook takes them: their last position and count
    /// (None when there were none). Err(Refused) when it refuses them for good, or has not
    /// taken them within the limit set.
    pub async fn send(&mut self) -> anyhow::Result<Option<(i64, usize)>> {
        let mut p = std::mem::take(&mut self.pending);
        if p.count == 0 {
            return Ok(None);
        }
        if self.format == PostFormat::Json && self.batch.is_some() {
            p.body.push(b']');
        }
        let (id, what) = if self.batch.is_none() {
            (
                p.first_id.clone(),
                format!("the event at position {}", p.first),
            )
        } else {
            (
                format!("positions-{}-{}", p.first, p.last),
                match p.count {
                    1 => format!("the batch of the event at position {}", p.first),
                    n => format!(
                        "the batch of {n} events at positions {} to {}",
                        p.first, p.last
                    ),
                },
            )
        };
        let body = Bytes::from(p.body);
        // Compressed once for every try, off the async threads (a full batch is 1 MiB).
        let wire = if self.gzip {
            let plain = body.clone();
            Some(Bytes::from(
                tokio::task::spawn_blocking(move || gzip(&plain))
                    .await
                    .context("compressing")??,
            ))
        } else {
            None
        };
        self.deliver(&id, &what, body, wire).await?;
        Ok(Some((p.last, p.count)))
    }

    /// POSTs one body (signed as it is, sent as `wire`, its compressed form, if given) until
    /// the webhook takes it.
    async fn deliver(
        &mut self,
        id: &str,
        what: &str,
        body: Bytes,
        wire: Option<Bytes>,
    ) -> anyhow::Result<()> {
        let mut wait = RETRY_FIRST;
        let started = std::time::Instant::now();
        loop {
            let (why, asked) = match self.attempt(id, &body, wire.clone()).await {
                Ok(Answer::Delivered) => return Ok(()),
                Ok(Answer::Refused(why)) => {
                    return Err(Refused(format!(
                        "the webhook at {} refused {what}: {why}",
                        self.shown
                    ))
                    .into());
                }
                Ok(Answer::Later(why, asked)) => (why, asked),
                Err(e) => {
                    self.connection = None;
                    (format!("{e:#}"), None)
                }
            };
            let pause = asked.unwrap_or(wait);
            if let Some(limit) = self.give_up_after
                && started.elapsed() + pause > limit
            {
                return Err(Refused(format!(
                    "the webhook at {} has not taken {what} in {} s (last: {why})",
                    self.shown,
                    limit.as_secs()
                ))
                .into());
            }
            if let Some(retries) = &self.retries {
                retries.inc();
            }
            eprintln!(
                "roster events: the webhook at {}: {why}; sending {what} again in {:.1} s",
                self.shown,
                pause.as_secs_f64()
            );
            tokio::time::sleep(pause).await;
            wait = (wait * 2).min(RETRY_LAST);
        }
    }

    async fn attempt(
        &mut self,
        id: &str,
        body: &Bytes,
        wire: Option<Bytes>,
    ) -> anyhow::Result<Answer> {
        let mut send = match self.connection.take() {
            Some(c) if !c.is_closed() => c,
            _ => self.connect().await?,
        };
        send.ready().await.context("the connection closed")?;
        let timestamp = chrono::Utc::now().timestamp().to_string();
        let mut request = http::Request::post(self.path.as_str())
            .header(http::header::HOST, self.authority.as_str())
            .header(
                http::header::CONTENT_TYPE,
                match self.format {
                    PostFormat::Json | PostFormat::SplunkHec => "application/json",
                    PostFormat::Ndjson => "application/x-ndjson",
                },
            )
            .header(
                http::header::USER_AGENT,
                concat!("roster-events/", env!("CARGO_PKG_VERSION")),
            )
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp.as_str());
        if let Some(key) = &self.key {
            let signature = sign(key, id, &timestamp, body);
            request = request.header("webhook-signature", format!("v1,{signature}"));
        }
        if wire.is_some() {
            request = request.header(http::header::CONTENT_ENCODING, "gzip");
        }
        for (name, value) in &self.headers {
            request = request.header(name, value);
        }
        let request = request
            .body(Full::new(wire.unwrap_or_else(|| body.clone())))
            .context("building the request")?;
        let answer = tokio::time::timeout(ANSWER_TIMEOUT, async {
            let response = send.send_request(request).await?;
            let status = response.status();
            let retry_after = response
                .headers()
                .get(http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(|s| Duration::from_secs(s).min(RETRY_AFTER_LONGEST));
            let text = Limited::new(response.into_body(), ANSWER_BODY_LIMIT)
                .collect()
                .await
                .map(|b| shown_body(&b.to_bytes()))
                .unwrap_or_default();
            anyhow::Ok((status, retry_after, text))
        })
        .await;
        let (status, retry_after, text) = match answer {
            Ok(answer) => answer.context("no answer")?,
            Err(_) => bail!("no answer in {} s", ANSWER_TIMEOUT.as_secs()),
        };
        // The answer was read whole: the connection can carry the next event.
        self.connection = Some(send);
        let why = if text.is_empty() {
            status.to_string()
        } else {
            format!("{status}: {text}")
        };
        Ok(if status.is_success() {
            Answer::Delivered
        } else if status.is_server_error()
            || status == StatusCode::REQUEST_TIMEOUT
            || status == StatusCode::TOO_MANY_REQUESTS
        {
            Answer::Later(why, retry_after)
        } else {
            Answer::Refused(why)
        })
    }

    async fn connect(&self) -> anyhow::Result<SendRequest<Full<Bytes>>> {
        let tcp = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio::net::TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|_| anyhow::anyhow!("no connection in {} s", CONNECT_TIMEOUT.as_secs()))?
        .context("cannot connect")?;
        tcp.set_nodelay(true).ok();
        // The connection's own task drives it; it ends when the sender is dropped.
        Ok(match &self.tls {
            Some((connector, name)) => {
                let tls =
                    tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name.clone(), tcp))
                        .await
                        .map_err(|_| {
                            anyhow::anyhow!("no TLS handshake in {} s", CONNECT_TIMEOUT.as_secs())
                        })?
                        .context("TLS")?;
                let (send, connection) =
                    hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
                tokio::spawn(connection);
                send
            }
            None => {
                let (send, connection) =
                    hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
                tokio::spawn(connection);
                send
            }
        })
    }
}

/// The TLS settings for an https:// webhook: the system's roots, and a private CA's.
fn client_config(ca_file: Option<&Path>) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        // A system certificate rustls cannot use is left out, as browsers do.
        let _ = roots.add(cert);
    }
    if let Some(path) = ca_file {
        let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.with_context(|| format!("{}: not PEM certificates", path.display()))?;
            roots
                .add(cert)
                .with_context(|| format!("{}: a certificate rustls cannot use", path.display()))?;
            added += 1;
        }
        if added == 0 {
            bail!("{}: holds no certificate", path.display());
        }
    }
    if roots.is_empty() {
        bail!("--post: no trusted certificate authorities (give --post-ca-file)");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .context("TLS settings")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// A variable of the environment, unless unset or empty.
fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// The key of a Standard Webhooks secret: `whsec_` and base64 (the prefix optional). Errors
/// never show the text.
fn secret_key(text: &str) -> anyhow::Result<Vec<u8>> {
    let text = text.trim();
    let encoded = text.strip_prefix("whsec_").unwrap_or(text);
    let key = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|_| anyhow::anyhow!("must be whsec_ and the base64 of the key"))?;
    if !(16..=256).contains(&key.len()) {
        bail!("the key must be 16 to 256 bytes; a random 32 is usual");
    }
    Ok(key)
}

/// A `--post-header` value: `Name: value`. The value is never put in a message.
fn header(text: &str) -> anyhow::Result<(HeaderName, HeaderValue)> {
    let Some((name, value)) = text.split_once(':') else {
        bail!("--post-header: give Name: value");
    };
    let name = HeaderName::from_bytes(name.trim().as_bytes())
        .map_err(|_| anyhow::anyhow!("--post-header: '{}' is not a header name", name.trim()))?;
    let fixed = [
        "host",
        "content-type",
        "content-length",
        "transfer-encoding",
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
    ];
    if fixed.contains(&name.as_str()) {
        bail!("--post-header: {name} is set by roster events");
    }
    let mut value = HeaderValue::from_str(value.trim())
        .map_err(|_| anyhow::anyhow!("--post-header: the value of {name} cannot be sent"))?;
    value.set_sensitive(true);
    Ok((name, value))
}

/// A body gzip-compressed (the default level: a batch of events is compressed once).
fn gzip(body: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::Write as _;
    let mut out = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 4),
        flate2::Compression::default(),
    );
    out.write_all(body)?;
    out.finish()
}

/// The Standard Webhooks signature: base64 HMAC-SHA256 of `id.timestamp.body`.
pub fn sign(key: &[u8], id: &str, timestamp: &str, body: &[u8]) -> String {
    // Any key length is valid for HMAC.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        unreachable!("HMAC takes keys of any length")
    };
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// An answer's body as a message shows it: text, on one line, at most 200 characters.
fn shown_body(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let one_line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match one_line.char_indices().nth(200) {
        Some((at, _)) => format!("{}...", &one_line[..at]),
        None => one_line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_standard_webhooks_ones() {
        // The specification's example (standard-webhooks, libraries' test vector).
        let key = base64::engine::general_purpose::STANDARD
            .decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
            .unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", "1614265330", body),
            "g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[tokio::test]
    async fn a_limited_delivery_stops_when_the_webhook_stays_away() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hook", closed.local_addr().unwrap());
        drop(closed);
        let args = PostArgs {
            post: Some(url),
            post_secret_file: None,
            post_header: vec![],
            post_ca_file: None,
            post_batch: None,
            post_format: PostFormat::Json,
            post_gzip: false,
        };
        let mut poster = Poster::new(&args).unwrap().unwrap();
        poster.give_up_after(Duration::from_millis(1200));
        let started = std::time::Instant::now();
        assert!(poster.add("evt", 42, None, b"{}"), "one event per request");
        let e = poster.send().await.unwrap_err();
        assert!(e.is::<Refused>(), "{e:#}");
        let text = e.to_string();
        assert!(
            text.contains("has not taken the event at position 42"),
            "{text}"
        );
        assert!(text.contains("cannot connect"), "{text}");
        // Tried at once and after 0.5 s; the next wait (1 s) would pass the limit.
        assert!(started.elapsed() < Duration::from_millis(1200));
    }

    #[test]
    fn gzip_needs_a_webhook_and_round_trips() {
        use std::io::Read as _;
        let args = PostArgs {
            post: None,
            post_secret_file: None,
            post_header: vec![],
            post_ca_file: None,
            post_batch: None,
            post_format: PostFormat::Json,
            post_gzip: true,
        };
        let e = Poster::new(&args).err().unwrap().to_string();
        assert!(e.contains("give --post too"), "{e}");
        let body = br#"[{"type":"USER_CREATED"},{"type":"USER_CREATED"}]"#.repeat(50);
        let packed = gzip(&body).unwrap();
        assert!(packed.len() * 10 < body.len(), "{}", packed.len());
        let mut back = Vec::new();
        flate2::read::GzDecoder::new(&packed[..])
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, body);
    }

    #[test]
    fn batches_fill_to_their_size_and_stay_under_the_byte_limit() {
        let args = |batch, format| PostArgs {
            post: Some("http://127.0.0.1:9/hook".into()),
            post_secret_file: None,
            post_header: vec![],
            post_ca_file: None,
            post_batch: batch,
            post_format: format,
            post_gzip: false,
        };
        let mut p = Poster::new(&args(Some(3), PostFormat::Json))
            .unwrap()
            .unwrap();
        assert!(p.due().is_none());
        assert!(!p.add("a", 1, None, br#"{"n":1}"#));
        assert!(p.due().is_some(), "a batch begun is due within the linger");
        assert!(!p.add("b", 2, None, br#"{"n":2}"#));
        assert!(p.add("c", 3, None, br#"{"n":3}"#), "full at three");
        assert_eq!(p.pending.body, br#"[{"n":1},{"n":2},{"n":3}"#);
        assert_eq!((p.pending.first, p.pending.last), (1, 3));
        assert!(
            p.would_overflow(BATCH_BYTES - 100),
            "a large event waits for the next"
        );
        p.discard();
        assert!(!p.would_overflow(BATCH_BYTES * 2), "alone, any size goes");
        let mut p = Poster::new(&args(None, PostFormat::Ndjson))
            .unwrap()
            .unwrap();
        assert!(
            p.add("a", 1, None, br#"{"n":1}"#),
            "without --post-batch, one per request"
        );
        assert_eq!(p.pending.body, b"{\"n\":1}\n");
        // Splunk's HEC: each event in its envelope with the event's own time, a line each.
        let mut p = Poster::new(&args(Some(2), PostFormat::SplunkHec))
            .unwrap()
            .unwrap();
        assert!(!p.add("a", 1, Some(1_700_000_000.25), br#"{"n":1}"#));
        assert!(p.add("b", 2, None, br#"{"n":2}"#));
        let lines: Vec<serde_json::Value> = p
            .pending
            .body
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        assert_eq!(
            lines,
            [
                serde_json::json!({"time": 1_700_000_000.25, "source": "roster",
                    "sourcetype": "_json", "event": {"n": 1}}),
                serde_json::json!({"source": "roster", "sourcetype": "_json", "event": {"n": 2}}),
            ]
        );
    }

    #[test]
    fn headers_and_urls_are_checked_before_anything_is_sent() {
        assert!(header("Authorization: Bearer abc").is_ok());
        for (bad, says) in [
            ("no colon", "Name: value"),
            ("Bad Name: x", "not a header name"),
            ("webhook-id: 1", "set by roster events"),
            ("X-Token: a\u{7}b", "cannot be sent"),
        ] {
            let e = header(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
            assert!(!e.contains("Bearer"), "{e}");
        }
        let args = |url: &str| PostArgs {
            post: Some(url.into()),
            post_secret_file: None,
            post_header: vec![],
            post_ca_file: None,
            post_batch: None,
            post_format: PostFormat::Json,
            post_gzip: false,
        };
        for (bad, says) in [
            ("ftp://x/y", "http:// or https://"),
            ("https://user:pw@x/y", "--post-header"),
            ("not a url", "not a URL"),
        ] {
            let e = Poster::new(&args(bad)).err().unwrap().to_string();
            assert!(e.contains(says), "{e}");
            assert!(!e.contains("pw"), "{e}");
        }
        let p = Poster::new(&args("http://[::1]:8080/hooks/T0001/secret?x=1"))
            .unwrap()
            .unwrap();
        assert_eq!(
            (
                p.host.as_str(),
                p.port,
                p.authority.as_str(),
                p.path.as_str()
            ),
            ("::1", 8080, "[::1]:8080", "/hooks/T0001/secret?x=1")
        );
        assert_eq!(p.shown, "http://[::1]:8080");
        assert_eq!(shown_body(b"  line one\n line two  "), "line one line two");
        assert!(shown_body(&[b'x'; 500]).ends_with("..."));
    }
}

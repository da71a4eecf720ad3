//! Prometheus metrics on their own HTTP port (`GET /metrics`, OpenMetrics text): per-RPC call
//! counts by status code and latency histograms (recorded by the auth layer, which sees every
//! call), plus gauges read at scrape time: database pool, hashing queue, event streams.
//!
//! The method label is the gRPC path for Roster's own methods and `unknown` otherwise, so a
//! caller inventing paths cannot grow the label set.
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::crypto::Hasher;
use crate::db::Pool;
use crate::events::stream::EventFeed;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    method: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    method: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReadLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    kind: &'static str,
}

/// Codes and links issued for delivery, by kind: what the calling backends send by email and
/// SMS, so an operator can watch (and alert on) the SMS bill and floods. Cheap to clone.
#[derive(Clone, Default)]
pub struct CodesIssued(Family<CodeLabels, Counter>);

impl CodesIssued {
    /// Counts one code or link of `kind` issued (its transaction committed).
    pub fn inc(&self, kind: crate::authenticators::sends::Delivery) {
        self.0
            .get_or_create(&CodeLabels { kind: kind.label() })
            .inc();
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerificationLabels {
    factor: &'static str,
    result: &'static str,
}

/// Credential checks by factor and result (VerifyPassword, VerifyFactor,
/// FinishPasskeyAuthentication answer results, not errors, so the call counts cannot show a
/// rise of wrong passwords). Cheap to clone.
#[derive(Clone, Default)]
pub struct Verifications(Family<VerificationLabels, Counter>);

impl Verifications {
    /// Counts one check of `factor` (an AuthenticatorType name: PASSWORD, TOTP, ...) that
    /// answered `result` (its result enum's name: OK, INVALID_CREDENTIALS, INVALID_CODE, ...).
    pub fn inc(&self, factor: &'static str, result: &'static str) {
        self.0
            .get_or_create(&VerificationLabels { factor, result })
            .inc();
    }
}

type HistogramFamily = Family<MethodLabels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 0.25 ms .. ~8 s: a cached GetUser to a slow import batch.
    Histogram::new(exponential_buckets(0.00025, 2.0, 16))
}

/// What the process measures; one per server.
pub struct Metrics {
    registry: Registry,
    calls: Family<CallLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    latency: HistogramFamily,
    pool_size: Gauge,
    pool_available: Gauge,
    pool_waiting: Gauge,
    hash_queue: Gauge,
    stream_subscribers: Gauge,
    stream_reads: Family<ReadLabels, Counter>,
    /// One scrape at a time brings `stream_reads` up to the feed's counts.
    stream_reads_sync: std::sync::Mutex<()>,
    exports_running: Gauge,
    in_flight: Gauge,
    /// GetUser, LookupUser and LookupUserByIdentity calls per coalesced read (`users::reads`).
    pub user_read_batch: Histogram,
    /// CreateUser calls per coalesced statement (`users::creates`).
    pub user_create_batch: Histogram,
    /// Codes and links issued for delivery.
    pub codes_issued: CodesIssued,
    /// Credential checks by factor and result.
    pub verifications: Verifications,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("roster");
        let calls = Family::<CallLabels, Counter>::default();
        registry.register(
            "rpc_calls",
            "gRPC calls by method and status code",
            calls.clone(),
        );
        let errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "rpc_errors",
            "gRPC calls that failed with a reason (google.rpc.ErrorInfo), by method and reason: IP_THROTTLED, SMS_LIMIT_REACHED, RATE_LIMITED, INVALID_API_KEY, DATABASE_UNAVAILABLE, ...",
            errors.clone(),
        );
        let latency = HistogramFamily::new_with_constructor(latency_histogram);
        registry.register(
            "rpc_duration_seconds",
            "gRPC call latency by method (a stream's runs to its end)",
            latency.clone(),
        );
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            registry.register(name, help, g.clone());
            g
        };
        let pool_size = gauge(
            &mut registry,
            "db_pool_connections",
            "database connections open",
        );
        let pool_available = gauge(
            &mut registry,
            "db_pool_idle_connections",
            "database connections open and idle",
        );
        let pool_waiting = gauge(
            &mut registry,
            "db_pool_waiting",
            "calls waiting for a database connection",
        );
        let hash_queue = gauge(
            &mut registry,
            "hash_queue_depth",
            "password hashes waiting for a hashing worker",
        );
        let stream_subscribers = gauge(
            &mut registry,
            "event_stream_subscribers",
            "open StreamEvents streams",
        );
        let stream_reads = Family::<ReadLabels, Counter>::default();
        registry.register(
            "event_stream_reads",
            "event range reads for live StreamEvents: kind=shared, one per project each time the horizon moves, shared by its caught-up streams; kind=own, a stream's own (catching up, or a filter only SQL decides)",
            stream_reads.clone(),
        );
        let exports_running = gauge(
            &mut registry,
            "exports_running",
            "ExportUsers streams running (each holds a database connection), at most --max-exports",
        );
        let in_flight = gauge(
            &mut registry,
            "rpc_in_flight",
            "calls being handled (a stream until its last message); what a shutdown drains",
        );
        let user_read_batch = Histogram::new(exponential_buckets(1.0, 2.0, 7));
        registry.register(
            "user_read_batch_size",
            "GetUser, LookupUser and LookupUserByIdentity calls read together (one statement per project and kind of key among them)",
            user_read_batch.clone(),
        );
        let user_create_batch = Histogram::new(exponential_buckets(1.0, 2.0, 7));
        registry.register(
            "user_create_batch_size",
            "CreateUser calls written together (users and events in one statement)",
            user_create_batch.clone(),
        );
        let codes_issued = CodesIssued::default();
        registry.register(
            "codes_issued",
            "codes and links issued for the caller to deliver, by kind: email_otp, sms_otp (StartOtpChallenge), email_verification, phone_verification (StartContactVerification), password_reset (CreatePasswordResetToken)",
            codes_issued.0.clone(),
        );
        // The version on every scrape: dashboards and alerts tell replicas apart during a
        // rollout (`roster servers` says the same from the database).
        registry.register(
            "build",
            "the running server's version (always 1)",
            prometheus_client::metrics::info::Info::new(vec![(
                "version".to_string(),
                env!("CARGO_PKG_VERSION").to_string(),
            )]),
        );
        let verifications = Verifications::default();
        registry.register(
            "verifications",
            "credential checks by factor (PASSWORD, TOTP, RECOVERY_CODES, EMAIL_OTP, SMS_OTP, PASSKEY) and result (OK, INVALID_CREDENTIALS, INVALID_CODE, LOCKED, ...): VerifyPassword, VerifyFactor, FinishPasskeyAuthentication",
            verifications.0.clone(),
        );
        Metrics {
            registry,
            calls,
            errors,
            latency,
            pool_size,
            pool_available,
            pool_waiting,
            hash_queue,
            stream_subscribers,
            stream_reads,
            stream_reads_sync: std::sync::Mutex::new(()),
            exports_running,
            in_flight,
            user_read_batch,
            user_create_batch,
            codes_issued,
            verifications,
        }
    }
}

impl Metrics {
    /// Counts one finished call; `known` says whether `path` is one of Roster's methods.
    pub fn record_call(&self, path: &str, known: bool, code: tonic::Code, elapsed: Duration) {
        let method = if known { path } else { "unknown" }.to_string();
        self.calls
            .get_or_create(&CallLabels {
                method: method.clone(),
                code: format!("{code:?}"),
            })
            .inc();
        self.latency
            .get_or_create(&MethodLabels { method })
            .observe(elapsed.as_secs_f64());
    }

    /// Counts one failed call by its ErrorInfo `reason` (one of Roster's fixed set).
    pub fn record_error(&self, path: &str, known: bool, reason: &str) {
        let method = if known { path } else { "unknown" }.to_string();
        self.errors
            .get_or_create(&ErrorLabels {
                method,
                reason: reason.to_string(),
            })
            .inc();
    }

    fn render(&self, sources: &Sources) -> String {
        let status = sources.pool.status();
        self.pool_size.set(status.size as i64);
        self.pool_available.set(status.available as i64);
        self.pool_waiting.set(status.waiting as i64);
        self.hash_queue.set(sources.hasher.queue_depth() as i64);
        self.stream_subscribers
            .set(sources.feed.subscribers() as i64);
        let synced = self.stream_reads_sync.lock();
        let reads = sources.feed.range_reads();
        for (kind, total) in [("shared", reads.shared), ("own", reads.own)] {
            // The feed counts; the counter catches up with it at each scrape.
            let counter = self.stream_reads.get_or_create(&ReadLabels { kind });
            counter.inc_by(total.saturating_sub(counter.get()));
        }
        drop(synced);
        self.exports_running.set(sources.exports.running() as i64);
        self.in_flight.set(sources.in_flight.count() as i64);
        let mut out = String::new();
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// What the scrape-time gauges read.
pub struct Sources {
    pub pool: Pool,
    pub hasher: Arc<Hasher>,
    pub feed: Arc<EventFeed>,
    pub exports: Arc<crate::users::bulk_grpc::Exports>,
    pub in_flight: crate::auth::InFlight,
}

/// Serves `GET /metrics` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    sources: Sources,
    shutdown: impl std::future::Future<Output = ()>,
) {
    serve_with(listener, move || metrics.render(&sources), shutdown).await
}

/// Serves `GET /metrics` on `listener`, as `render` writes them at each scrape, until
/// `shutdown` resolves (the server's, and `roster events --metrics-listen`'s).
pub async fn serve_with(
    listener: TcpListener,
    render: impl Fn() -> String + Send + Sync + 'static,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let render = Arc::new(render);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        let render = render.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: hyper::Request<_>| {
                let response = if req.uri().path() == "/metrics" {
                    hyper::Response::builder()
                        .header(
                            "content-type",
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )
                        .body(Full::new(Bytes::from(render())))
                } else {
                    hyper::Response::builder()
                        .status(404)
                        .body(Full::new(Bytes::from_static(b"see /metrics\n")))
                };
                async move { Ok::<_, Infallible>(response.unwrap_or_default()) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
        });
    }
}

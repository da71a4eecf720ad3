//! API keys and the layer in front of every service.
//!
//! A key is `rst_<key-id>_<secret>`: the id (a UUID in simple form) finds the row, the secret
//! (256 random bits, base64url) is checked against its SHA-256 in constant time. Verified keys
//! are cached for a short time (`--key-cache-ms`), so a revocation takes effect within it; a
//! key's expiry, when it has one, is checked on every call.
//!
//! [`AuthLayer`] runs before any handler: it keeps or makes the request id, opens the per-RPC
//! span (method, request id, project, key, status code, latency), authenticates the key,
//! checks the scope the method needs, and hands the handler a [`Caller`] in the request
//! extensions, bounding its time by `--call-timeout-secs`. Each call is counted and logged
//! once, when its response body ends ([`Observed`]). Health and reflection need no key.
use std::collections::HashMap;
use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tracing::Instrument;
use uuid::Uuid;

use crate::db::{self, Pool};
use crate::error::{Error, Reason};

/// A permission an API key can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    UsersRead,
    UsersWrite,
    UsersImport,
    UsersExport,
    UsersExportSecrets,
    AuthenticatorsRead,
    AuthenticatorsWrite,
    AuthenticatorsVerify,
    IdentitiesRead,
    IdentitiesWrite,
    IdentitiesTokens,
    LogsRead,
}

impl Scope {
    pub const ALL: [Scope; 12] = [
        Scope::UsersRead,
        Scope::UsersWrite,
        Scope::UsersImport,
        Scope::UsersExport,
        Scope::UsersExportSecrets,
        Scope::AuthenticatorsRead,
        Scope::AuthenticatorsWrite,
        Scope::AuthenticatorsVerify,
        Scope::IdentitiesRead,
        Scope::IdentitiesWrite,
        Scope::IdentitiesTokens,
        Scope::LogsRead,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::UsersRead => "users.read",
            Scope::UsersWrite => "users.write",
            Scope::UsersImport => "users.import",
            Scope::UsersExport => "users.export",
            Scope::UsersExportSecrets => "users.export_secrets",
            Scope::AuthenticatorsRead => "authenticators.read",
            Scope::AuthenticatorsWrite => "authenticators.write",
            Scope::AuthenticatorsVerify => "authenticators.verify",
            Scope::IdentitiesRead => "identities.read",
            Scope::IdentitiesWrite => "identities.write",
            Scope::IdentitiesTokens => "identities.tokens",
            Scope::LogsRead => "logs.read",
        }
    }

    fn bit(self) -> u32 {
        1 << (self as u32)
    }
}

/// A set of scopes; `*` in the database means all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ScopeSet(u32);

impl ScopeSet {
    pub fn all() -> Self {
        ScopeSet(Scope::ALL.iter().fold(0, |acc, s| acc | s.bit()))
    }

    pub fn contains(self, scope: Scope) -> bool {
        self.0 & scope.bit() != 0
    }

    /// Parses scope names (`users.read`, ..., or `*`); unknown names are an error naming them.
    pub fn parse<S: AsRef<str>>(names: &[S]) -> Result<Self, String> {
        let mut set = 0;
        for name in names {
            let name = name.as_ref().trim();
            if name == "*" {
                set |= ScopeSet::all().0;
                continue;
            }
            match Scope::ALL.iter().find(|s| s.as_str() == name) {
                Some(s) => set |= s.bit(),
                None => return Err(format!("unknown scope '{name}'")),
            }
        }
        Ok(ScopeSet(set))
    }
}

/// A project's own sign-in settings (`roster projects policy`); `None`: the server's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProjectPolicy {
    pub lockout_threshold: Option<u32>,
    pub lockout_secs: Option<u32>,
    pub password_history: Option<u32>,
    pub password_min_length: Option<u32>,
    pub password_max_age_days: Option<u32>,
    pub ip_failure_limit: Option<u32>,
    pub code_resend_secs: Option<u32>,
    pub codes_per_hour: Option<u32>,
    pub sms_allowed_prefixes: Option<Arc<crate::authenticators::sends::SmsPrefixes>>,
    pub sms_per_hour: Option<u32>,
    /// Read by the retention pass, not by calls (cached with the rest all the same).
    pub event_retention_days: Option<u32>,
}

/// The `projects` columns of a [`ProjectPolicy`], in the order [`ProjectPolicy::from_row`]
/// reads them.
pub const POLICY_COLUMNS: &str = "lockout_threshold, lockout_secs, \
     password_history::integer, password_min_length::integer, password_max_age_days, \
     ip_failure_limit, code_resend_secs, codes_per_hour, sms_allowed_prefixes, sms_per_hour, \
     event_retention_days";

impl ProjectPolicy {
    /// The policy from [`POLICY_COLUMNS`] selected from column `first` on.
    pub fn from_row(row: &tokio_postgres::Row, first: usize) -> Self {
        // The columns' CHECKs keep them non-negative.
        let setting = |i: usize| {
            row.get::<_, Option<i32>>(first + i)
                .map(|v| v.max(0) as u32)
        };
        ProjectPolicy {
            lockout_threshold: setting(0),
            lockout_secs: setting(1),
            password_history: setting(2),
            password_min_length: setting(3),
            password_max_age_days: setting(4),
            ip_failure_limit: setting(5),
            code_resend_secs: setting(6),
            codes_per_hour: setting(7),
            // Written checked by `roster projects policy`; anything else is the server's.
            sms_allowed_prefixes: row
                .get::<_, Option<String>>(first + 8)
                .and_then(|t| crate::authenticators::sends::SmsPrefixes::parse(&t).ok())
                .map(Arc::new),
            sms_per_hour: setting(9),
            event_retention_days: setting(10),
        }
    }
}

/// What every handler knows about who is calling: from the key (and its project's policy,
/// read and cached with it), plus the request's id and the calling peer's address.
#[derive(Debug, Clone)]
pub struct Caller {
    pub project_id: Uuid,
    pub key_id: Uuid,
    pub scopes: ScopeSet,
    pub policy: ProjectPolicy,
    pub request_id: String,
    pub peer_ip: Option<String>,
}

impl Caller {
    /// PERMISSION_DENIED naming the scope unless the key has it.
    pub fn require(&self, scope: Scope) -> Result<(), Error> {
        if self.scopes.contains(scope) {
            Ok(())
        } else {
            Err(Error::PermissionDenied {
                scope: scope.as_str(),
            })
        }
    }
}

/// The [`Caller`] that [`AuthLayer`] put on a request.
pub fn caller_of<T>(request: &tonic::Request<T>) -> Result<Caller, Error> {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or(Error::Unauthenticated {
            reason: Reason::MissingApiKey,
            message: "missing API key",
        })
}

/// The scope each RPC needs; `None` for a method Roster does not have (the router answers
/// UNIMPLEMENTED once the key is checked).
pub fn required_scope(path: &str) -> Option<Scope> {
    let (service, method) = path.trim_start_matches('/').split_once('/')?;
    use Scope::*;
    Some(match (service, method) {
        ("roster.v1.UserService", m) => match m {
            "GetUser" | "BatchGetUsers" | "LookupUser" | "ListUsers" => UsersRead,
            "ImportUsers" => UsersImport,
            "ExportUsers" => UsersExport,
            "CreateUser"
            | "UpdateUser"
            | "DeleteUser"
            | "BatchDeleteUsers"
            | "BlockUser"
            | "UnblockUser"
            | "DeactivateUser"
            | "ReactivateUser"
            | "StartContactVerification"
            | "ConfirmContactVerification" => UsersWrite,
            _ => return None,
        },
        ("roster.v1.AuthenticatorService", m) => match m {
            "ListAuthenticators" | "GetAuthenticator" | "CheckPassword" => AuthenticatorsRead,
            "VerifyPassword"
            | "StartOtpChallenge"
            | "VerifyFactor"
            | "StartPasskeyAuthentication"
            | "FinishPasskeyAuthentication" => AuthenticatorsVerify,
            "SetPassword"
            | "ChangePassword"
            | "ExpirePassword"
            | "CreatePasswordResetToken"
            | "ResetPassword"
            | "EnrollTotp"
            | "ConfirmTotp"
            | "GenerateRecoveryCodes"
            | "EnrollOtpChannel"
            | "StartPasskeyRegistration"
            | "FinishPasskeyRegistration"
            | "UpdateAuthenticator"
            | "DeleteAuthenticator"
            | "DeleteAllAuthenticators" => AuthenticatorsWrite,
            _ => return None,
        },
        ("roster.v1.IdentityService", m) => match m {
            "ListIdentities" | "LookupUserByIdentity" => IdentitiesRead,
            "LinkIdentity" | "UnlinkIdentity" | "MergeUsers" => IdentitiesWrite,
            "GetProviderTokens" => IdentitiesTokens,
            _ => return None,
        },
        ("roster.v1.LogService", "ListEvents" | "GetEvent" | "StreamEvents") => LogsRead,
        _ => return None,
    })
}

/// The calling peer's address, over plaintext or TLS; an IPv4 peer of a dual-stack listener
/// as IPv4 (not `::ffff:10.0.0.1`), so that IPv4 networks match it.
fn peer_addr(ext: &http::Extensions) -> Option<std::net::IpAddr> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    ext.get::<TcpConnectInfo>()
        .or_else(|| {
            ext.get::<TlsConnectInfo<TcpConnectInfo>>()
                .map(|t| t.get_ref())
        })
        .and_then(|i| i.remote_addr())
        .map(|a| a.ip().to_canonical())
}

/// Paths served without a key: health checks and reflection.
fn is_public(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/")
        || path.starts_with("/grpc.reflection.v1.ServerReflection/")
        || path.starts_with("/grpc.reflection.v1alpha.ServerReflection/")
}

/// A newly made API key. `token` is shown once and never stored.
pub struct NewKey {
    pub id: Uuid,
    pub token: String,
    pub secret_hash: Vec<u8>,
}

impl fmt::Debug for NewKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl NewKey {
    pub fn generate() -> Self {
        let id = Uuid::now_v7();
        let mut secret = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut secret);
        let secret = URL_SAFE_NO_PAD.encode(secret);
        let secret_hash = Sha256::digest(secret.as_bytes()).to_vec();
        NewKey {
            id,
            token: format!("rst_{}_{}", id.simple(), secret),
            secret_hash,
        }
    }
}

/// Splits `rst_<id>_<secret>` into its parts.
fn parse_token(token: &str) -> Option<(Uuid, &str)> {
    let rest = token.strip_prefix("rst_")?;
    let (id, secret) = rest.split_once('_')?;
    if id.len() != 32 || secret.is_empty() || secret.len() > 128 {
        return None;
    }
    Some((Uuid::try_parse(id).ok()?, secret))
}

#[derive(Clone)]
struct KeyRecord {
    project_id: Uuid,
    scopes: ScopeSet,
    secret_hash: Vec<u8>,
    revoked: bool,
    expires_at: Option<chrono::DateTime<chrono::Utc>>,
    policy: ProjectPolicy,
    limit: crate::ratelimit::KeyLimit,
    /// The networks the key is accepted from; `None`: any.
    networks: Option<Vec<ipnet::IpNet>>,
}

/// What a verified key says about its call.
struct Verified {
    key_id: Uuid,
    project_id: Uuid,
    scopes: ScopeSet,
    policy: ProjectPolicy,
    limit: crate::ratelimit::KeyLimit,
}

/// Verifies keys against the database, with a short-lived cache.
pub struct KeyVerifier {
    pool: Pool,
    ttl: Duration,
    cache: Mutex<HashMap<Uuid, (Instant, Option<KeyRecord>)>>,
    /// When this server last wrote each key's `last_used_at`.
    noted: Mutex<HashMap<Uuid, Instant>>,
    /// When this server last warned that each key expires soon.
    warned: Mutex<HashMap<Uuid, Instant>>,
    /// When this server last warned that each key was tried from outside its networks.
    refused: Mutex<HashMap<Uuid, Instant>>,
}

/// Bound on cached key ids (including unknown ones) so random ids cannot grow it forever.
const KEY_CACHE_MAX: usize = 10_000;

/// How stale a key's `last_used_at` may get: operators read it to tell whether a key is
/// still in use before revoking it, which needs minutes, not a write per call.
pub const KEY_USE_RESOLUTION: Duration = Duration::from_secs(60);

/// A key used within this long of its expiry makes the server warn, once an hour, so the
/// replacement is made before the callers start failing.
const EXPIRY_WARNING: Duration = Duration::from_secs(7 * 86_400);
const EXPIRY_WARNING_EVERY: Duration = Duration::from_secs(3_600);
/// How often a key refused outside its networks is logged, per server.
const REFUSED_WARNING_EVERY: Duration = Duration::from_secs(60);

/// Whether `key` was last seen in `seen` less than `every` ago; if not, records it as seen now.
fn seen_within(seen: &Mutex<HashMap<Uuid, Instant>>, key: Uuid, every: Duration) -> bool {
    let now = Instant::now();
    let Ok(mut seen) = seen.lock() else {
        return true;
    };
    if seen
        .get(&key)
        .is_some_and(|at| now.duration_since(*at) < every)
    {
        return true;
    }
    if seen.len() >= KEY_CACHE_MAX {
        seen.clear();
    }
    seen.insert(key, now);
    false
}

impl KeyVerifier {
    pub fn new(pool: Pool, ttl: Duration) -> Self {
        KeyVerifier {
            pool,
            ttl,
            cache: Mutex::new(HashMap::new()),
            noted: Mutex::new(HashMap::new()),
            warned: Mutex::new(HashMap::new()),
            refused: Mutex::new(HashMap::new()),
        }
    }

    /// Records that key `id` was accepted, at most once per [`KEY_USE_RESOLUTION`] per
    /// server, off the call's path: a call never waits for (or fails with) this write.
    fn note_use(&self, id: Uuid) {
        if seen_within(&self.noted, id, KEY_USE_RESOLUTION) {
            return;
        }
        let pool = self.pool.clone();
        tokio::spawn(async move {
            let written = async {
                let client = db::client(&pool).await?;
                // Replicas each write once a minute at most; the condition keeps the row
                // from being rewritten by all of them in the same minute.
                client
                    .execute(
                        "UPDATE api_keys SET last_used_at = now()
                         WHERE id = $1 AND (last_used_at IS NULL
                               OR last_used_at < now() - make_interval(secs => $2))",
                        &[&id, &(KEY_USE_RESOLUTION.as_secs_f64() / 2.0)],
                    )
                    .await?;
                Ok::<_, Error>(())
            };
            if let Err(e) = written.await {
                tracing::debug!(error = %e, key = %id, "recording the key's last use");
            }
        });
    }

    async fn lookup(&self, id: Uuid) -> Result<Option<KeyRecord>, Error> {
        if let Ok(cache) = self.cache.lock()
            && let Some((at, rec)) = cache.get(&id)
            && at.elapsed() < self.ttl
        {
            return Ok(rec.clone());
        }
        let client = db::client(&self.pool).await?;
        let row = client
            .query_opt(
                &format!(
                    "SELECT k.project_id, k.scopes, k.secret_hash, k.revoked_at IS NOT NULL,
                            k.expires_at, k.rate_limit_rps, k.rate_limit_burst,
                            k.allowed_networks::text[], {POLICY_COLUMNS}
                     FROM api_keys k JOIN projects p ON p.id = k.project_id
                     WHERE k.id = $1"
                ),
                &[&id],
            )
            .await?;
        let rec = match row {
            Some(row) => {
                let names: Vec<String> = row.get(1);
                Some(KeyRecord {
                    project_id: row.get(0),
                    // A scope name this version does not know grants nothing.
                    scopes: ScopeSet::parse(
                        &names
                            .iter()
                            .filter(|n| ScopeSet::parse(&[n]).is_ok())
                            .collect::<Vec<_>>(),
                    )
                    .unwrap_or_default(),
                    secret_hash: row.get(2),
                    revoked: row.get(3),
                    expires_at: row.get(4),
                    limit: row
                        .get::<_, Option<f64>>(5)
                        .map(|rate| crate::ratelimit::Limit::new(rate, row.get(6))),
                    // PostgreSQL's cidr text always parses; were one not to, the key would
                    // be refused rather than opened up.
                    networks: row
                        .get::<_, Option<Vec<String>>>(7)
                        .map(|nets| nets.iter().filter_map(|n| n.parse().ok()).collect()),
                    policy: ProjectPolicy::from_row(&row, 8),
                })
            }
            None => None,
        };
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= KEY_CACHE_MAX {
                cache.clear();
            }
            cache.insert(id, (Instant::now(), rec.clone()));
        }
        Ok(rec)
    }

    /// What the key in an `authorization` header value, used by the peer at `peer`, says:
    /// its id, project, scopes, the project's policy and the key's own rate limit.
    async fn verify(
        &self,
        header: Option<&str>,
        peer: Option<std::net::IpAddr>,
    ) -> Result<Verified, Error> {
        let unauthenticated = |reason, message| Error::Unauthenticated { reason, message };
        let header = header.ok_or(unauthenticated(
            Reason::MissingApiKey,
            "missing API key: send metadata 'authorization: Bearer rst_<key-id>_<secret>'",
        ))?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .map(str::trim)
            .unwrap_or("");
        let bad = || unauthenticated(Reason::InvalidApiKey, "invalid API key");
        let (id, secret) = parse_token(token).ok_or(unauthenticated(
            Reason::MalformedApiKey,
            "malformed API key: expected 'Bearer rst_<key-id>_<secret>'",
        ))?;
        let rec = self.lookup(id).await?.ok_or_else(bad)?;
        let given = Sha256::digest(secret.as_bytes());
        if !bool::from(given.as_slice().ct_eq(&rec.secret_hash)) {
            return Err(bad());
        }
        if rec.revoked {
            return Err(unauthenticated(
                Reason::RevokedApiKey,
                "the API key has been revoked",
            ));
        }
        if let Some(expires_at) = rec.expires_at {
            // Checked on every call, so a cached key expires on time too.
            let left = expires_at - chrono::Utc::now();
            if left <= chrono::TimeDelta::zero() {
                return Err(unauthenticated(
                    Reason::ExpiredApiKey,
                    "the API key has expired",
                ));
            }
            if left.to_std().is_ok_and(|left| left < EXPIRY_WARNING)
                && !seen_within(&self.warned, id, EXPIRY_WARNING_EVERY)
            {
                tracing::warn!(
                    key = %id,
                    expires_at = %expires_at.to_rfc3339(),
                    "an API key in use expires soon: create its replacement and deploy it \
                     (roster keys create --expires-in ...)"
                );
            }
        }
        if let Some(networks) = &rec.networks
            && !peer.is_some_and(|ip| networks.iter().any(|n| n.contains(&ip)))
        {
            let ip = peer.map_or_else(|| "an unknown address".to_string(), |ip| ip.to_string());
            // A valid secret from the wrong place: a leaked key, or a caller that moved.
            if !seen_within(&self.refused, id, REFUSED_WARNING_EVERY) {
                tracing::warn!(key = %id, ip = %ip, "an API key was used from outside its \
                    allowed networks and refused (roster keys restrict)");
            }
            return Err(Error::AddressNotAllowed { ip });
        }
        self.note_use(id);
        Ok(Verified {
            key_id: id,
            project_id: rec.project_id,
            scopes: rec.scopes,
            policy: rec.policy,
            limit: rec.limit,
        })
    }
}

/// Keeps a well-formed incoming `x-request-id`, otherwise makes one.
fn request_id(headers: &http::HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 128
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:/+=".contains(&b))
        })
        .map(str::to_owned)
        .unwrap_or_else(|| Uuid::now_v7().to_string())
}

/// Counts calls being handled, so shutdown can stop as soon as none are left instead of
/// waiting on idle keep-alive connections (hyper's graceful shutdown can wait on those).
#[derive(Clone, Default)]
pub struct InFlight(Arc<std::sync::atomic::AtomicUsize>);

impl InFlight {
    pub fn count(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn enter(&self) -> InFlightGuard {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        InFlightGuard(self.0.clone())
    }
}

struct InFlightGuard(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The tower layer that authenticates every call; see the module docs.
#[derive(Clone)]
pub struct AuthLayer {
    verifier: Arc<KeyVerifier>,
    in_flight: InFlight,
    limiter: Arc<crate::ratelimit::RateLimiter>,
    metrics: Arc<crate::metrics::Metrics>,
    call_timeout: Option<Duration>,
}

impl AuthLayer {
    /// `call_timeout`: the most a handler may take to answer (a stream: to start), whatever
    /// deadline its client set or did not set.
    pub fn new(
        verifier: Arc<KeyVerifier>,
        in_flight: InFlight,
        limiter: Arc<crate::ratelimit::RateLimiter>,
        metrics: Arc<crate::metrics::Metrics>,
        call_timeout: Option<Duration>,
    ) -> Self {
        AuthLayer {
            verifier,
            in_flight,
            limiter,
            metrics,
            call_timeout,
        }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            verifier: self.verifier.clone(),
            in_flight: self.in_flight.clone(),
            limiter: self.limiter.clone(),
            metrics: self.metrics.clone(),
            call_timeout: self.call_timeout,
        }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    verifier: Arc<KeyVerifier>,
    in_flight: InFlight,
    limiter: Arc<crate::ratelimit::RateLimiter>,
    metrics: Arc<crate::metrics::Metrics>,
    call_timeout: Option<Duration>,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send + 'static>>;

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for AuthService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: http_body::Body + Default + Send + 'static,
{
    type Response = http::Response<Observed<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<ReqBody>) -> Self::Future {
        // The ready inner service is the one to call; leave a fresh clone in its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let verifier = self.verifier.clone();
        let limiter = self.limiter.clone();
        let metrics = self.metrics.clone();
        let call_timeout = self.call_timeout;
        let guard = self.in_flight.enter();
        // RpcScope: a call dropped half-way (client gone, deadline passed) cancels the
        // statements its handler still has running.
        Box::pin(crate::db::RpcScope::run(async move {
            let started = Instant::now();
            let path = req.uri().path().to_owned();
            let rid = request_id(req.headers());
            if is_public(&path) {
                // In flight until answered: a health Watch never ends and must not hold the
                // shutdown's drain.
                let response = inner.call(req).await?;
                drop(guard);
                return Ok(response.map(Observed::untracked));
            }
            let mut unanswered = Unanswered {
                metrics: metrics.clone(),
                known: required_scope(&path).is_some(),
                path: path.clone(),
                started,
                deadline: req
                    .headers()
                    .get("grpc-timeout")
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_grpc_timeout),
                span: tracing::Span::none(),
                answered: false,
                _in_flight: guard,
            };
            let span = rpc_span(&path, &rid, req.headers());
            unanswered.span = span.clone();
            async move {
                let header = req
                    .headers()
                    .get("authorization")
                    .and_then(|v| v.to_str().ok());
                let peer = peer_addr(req.extensions());
                let authorized = match verifier.verify(header, peer).await {
                    Ok(Verified {
                        key_id,
                        project_id,
                        scopes,
                        policy,
                        limit,
                    }) => {
                        let span = tracing::Span::current();
                        span.record("project", tracing::field::display(project_id));
                        span.record("key", tracing::field::display(key_id));
                        match required_scope(&path) {
                            Some(scope) if !scopes.contains(scope) => {
                                Err(Error::PermissionDenied {
                                    scope: scope.as_str(),
                                })
                            }
                            _ if let Err(wait) = limiter.check(key_id, limit) => {
                                Err(Error::RateLimited { retry_after: wait })
                            }
                            _ => Ok(Caller {
                                project_id,
                                key_id,
                                scopes,
                                policy,
                                request_id: rid.clone(),
                                peer_ip: peer.map(|ip| ip.to_string()),
                            }),
                        }
                    }
                    Err(e) => Err(e),
                };
                let mut response = match authorized {
                    Ok(caller) => {
                        req.extensions_mut().insert(caller);
                        match call_timeout {
                            None => inner.call(req).await?,
                            // A scope of its own: a handler dropped at the limit has its
                            // statements cancelled, as when its client goes away.
                            Some(limit) => match tokio::time::timeout(
                                limit,
                                crate::db::RpcScope::run(inner.call(req)),
                            )
                            .await
                            {
                                Ok(response) => response?,
                                Err(_) => {
                                    tonic::Status::from(Error::TimedOut { limit }).into_http()
                                }
                            },
                        }
                    }
                    Err(e) => tonic::Status::from(e).into_http(),
                };
                if let Ok(v) = http::HeaderValue::from_str(&rid) {
                    response.headers_mut().insert("x-request-id", v);
                }
                // Errors decided before any message (rejected calls, unary errors) carry
                // grpc-status in the headers and have an empty body: recorded now. Otherwise
                // the status comes in the trailers, after the last message: the body records
                // the call when it ends, so a stream's outcome and duration are its own.
                Ok(match grpc_status(response.headers()) {
                    Some(code) => {
                        unanswered.finish(code, response.headers());
                        response.map(Observed::untracked)
                    }
                    None => response.map(|body| Observed::tracked(body, unanswered)),
                })
            }
            .instrument(span)
            .await
        }))
    }
}

/// The span of one call: what every log line of it carries, and (when traces are exported)
/// an OpenTelemetry server span with the gRPC semantic-convention attributes, continuing the
/// caller's trace.
fn rpc_span(path: &str, rid: &str, headers: &http::HeaderMap) -> tracing::Span {
    use tracing::field::Empty;
    if !crate::telemetry::exporting() {
        return tracing::info_span!(
            "rpc",
            method = %path,
            request_id = %rid,
            project = Empty,
            key = Empty,
        );
    }
    let name = path.trim_start_matches('/');
    let (service, method) = name.split_once('/').unwrap_or((name, ""));
    let span = tracing::info_span!(
        "rpc",
        method = %path,
        request_id = %rid,
        project = Empty,
        key = Empty,
        otel.name = %name,
        otel.kind = "server",
        otel.status_code = Empty,
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
        rpc.grpc.status_code = Empty,
    );
    crate::telemetry::adopt_remote_parent(&span, headers);
    span
}

/// Puts a call's outcome on its span (a no-op unless traces are exported).
fn record_status(code: tonic::Code) {
    let span = tracing::Span::current();
    span.record("rpc.grpc.status_code", code as i64);
    if crate::telemetry::is_server_error(code) {
        span.record("otel.status_code", "ERROR");
    }
}

/// Counts and logs a call whose future was dropped before it answered: tonic answered
/// DEADLINE_EXCEEDED for it, or the client cancelled (or went away).
struct Unanswered {
    metrics: Arc<crate::metrics::Metrics>,
    known: bool,
    path: String,
    started: Instant,
    deadline: Option<Duration>,
    span: tracing::Span,
    answered: bool,
    /// The call counts as in flight (for the shutdown's drain) until it is recorded: a
    /// stream until its last message.
    _in_flight: InFlightGuard,
}

impl Unanswered {
    /// Records the call as answered with `code` (its status in `status`, the headers or
    /// trailers that carry it): counted, and logged as `rpc finished`.
    fn finish(&mut self, code: tonic::Code, status: &http::HeaderMap) {
        if code != tonic::Code::Ok
            && let Some(reason) = error_reason(status)
        {
            self.metrics.record_error(&self.path, self.known, &reason);
        }
        self.record(code, "finished");
    }

    /// Counts the call under `code` and logs it once, as `rpc <outcome>`.
    fn record(&mut self, code: tonic::Code, outcome: &str) {
        self.answered = true;
        let elapsed = self.started.elapsed();
        self.metrics
            .record_call(&self.path, self.known, code, elapsed);
        let latency_ms = elapsed.as_secs_f64() * 1000.0;
        self.span.in_scope(|| {
            record_status(code);
            tracing::info!(code = ?code, latency_ms, "rpc {outcome}");
        });
    }
}

/// The ErrorInfo reason of an error status (`grpc-status-details-bin`), when it has one.
fn error_reason(status: &http::HeaderMap) -> Option<String> {
    use tonic_types::StatusExt;
    let reason = tonic::Status::from_header_map(status)?
        .get_details_error_info()?
        .reason;
    // Roster's reasons are UPPER_SNAKE_CASE words; anything else is not a label value.
    (!reason.is_empty()
        && reason.len() <= 64
        && reason.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'))
    .then_some(reason)
}

/// The `grpc-status` of a header or trailer map, when it has one.
fn grpc_status(headers: &http::HeaderMap) -> Option<tonic::Code> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(tonic::Code::from_i32)
}

pin_project_lite::pin_project! {
    /// A response body that records its call (status, latency, log line) when its trailers
    /// pass, i.e. after the last message of a stream, rather than when the headers leave. A
    /// body dropped before its end (the client reset the stream) leaves its call unanswered,
    /// which counts it as cancelled.
    pub struct Observed<B> {
        #[pin]
        inner: B,
        call: Option<Unanswered>,
    }
}

impl<B> Observed<B> {
    fn untracked(inner: B) -> Self {
        Observed { inner, call: None }
    }

    fn tracked(inner: B, call: Unanswered) -> Self {
        Observed {
            inner,
            call: Some(call),
        }
    }
}

impl<B: Default> Default for Observed<B> {
    fn default() -> Self {
        Observed::untracked(B::default())
    }
}

impl<B: http_body::Body> http_body::Body for Observed<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Some(call) = this.call {
            let empty = http::HeaderMap::new();
            let code = match &polled {
                Poll::Ready(Some(Ok(frame))) => frame.trailers_ref().map(|t| {
                    // gRPC requires a status; a trailer block without one is not a success.
                    (grpc_status(t).unwrap_or(tonic::Code::Unknown), t)
                }),
                Poll::Ready(Some(Err(_))) | Poll::Ready(None) => {
                    Some((tonic::Code::Unknown, &empty))
                }
                Poll::Pending => None,
            };
            if let Some((code, status)) = code {
                call.finish(code, status);
                *this.call = None;
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        let elapsed = self.started.elapsed();
        // Clients enforce their deadline too and usually reset the stream a moment before
        // ours fires, so a call abandoned within 5 % (at least 20 ms) of it counts as timed out.
        let code = match self.deadline {
            Some(d) if elapsed + (d / 20).max(Duration::from_millis(20)) >= d => {
                tonic::Code::DeadlineExceeded
            }
            _ => tonic::Code::Cancelled,
        };
        self.record(code, "abandoned");
    }
}

/// The `grpc-timeout` header's duration: at most 8 digits and a unit (H M S m u n).
fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_parse_back_to_their_id() {
        let key = NewKey::generate();
        let (id, secret) = parse_token(&key.token).expect("parses");
        assert_eq!(id, key.id);
        assert_eq!(Sha256::digest(secret.as_bytes()).to_vec(), key.secret_hash);
    }

    #[test]
    fn malformed_tokens_are_rejected() {
        for t in [
            "",
            "rst_",
            "rst_abc_def",
            "xyz_0190f3a27c1e7b3a9a513c1f0e4d2b6a_s",
            "rst_0190f3a27c1e7b3a9a513c1f0e4d2b6a_",
        ] {
            assert!(parse_token(t).is_none(), "{t}");
        }
    }

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(
            parse_grpc_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout("123456789S"), None);
        assert_eq!(parse_grpc_timeout("-1S"), None);
        assert_eq!(parse_grpc_timeout("10x"), None);
    }

    #[test]
    fn scope_parsing() {
        assert_eq!(ScopeSet::parse(&["*"]).unwrap(), ScopeSet::all());
        let s = ScopeSet::parse(&["users.read", "logs.read"]).unwrap();
        assert!(s.contains(Scope::UsersRead) && s.contains(Scope::LogsRead));
        assert!(!s.contains(Scope::UsersWrite));
        assert!(ScopeSet::parse(&["users.admin"]).is_err());
    }
}

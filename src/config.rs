//! One typed configuration: command-line flags, then `ROSTER_*` environment variables, then
//! defaults (clap resolves the layering). Every option is listed by `roster serve --help` and in
//! the README. Secrets (the database URL may hold a password) can come from a `*_FILE` path and
//! are never printed: this type has no `Debug`.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use crate::authenticators::passkey::RelyingPartyDefaults;
use crate::authenticators::password::PasswordSettings;
use crate::authenticators::sends::SmsPrefixes;

/// The most a `-secs` time setting takes (a day): beyond it a value is a mistake, and
/// near `u64::MAX` one would overflow the clock where it is added to it.
const MAX_SECS: u64 = 86_400;
/// The most a `-ms` time setting takes (an hour).
const MAX_MS: u64 = 3_600_000;

/// Options of the database connection shared by every subcommand that talks to PostgreSQL.
/// Global: `roster keys list --database-url ...` works as well as `roster keys --database-url
/// ... list`.
#[derive(clap::Args, Clone)]
pub struct DatabaseConfig {
    /// PostgreSQL URL, e.g. postgres://roster:pw@db:5432/roster. Without it (and without
    /// --database-url-file), `serve` starts a private PostgreSQL cluster in --data-dir.
    #[arg(long, global = true, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Read the PostgreSQL URL from this file instead (for mounted secrets).
    #[arg(long, global = true, env = "ROSTER_DATABASE_URL_FILE")]
    pub database_url_file: Option<PathBuf>,
    /// Where the embedded PostgreSQL cluster and the dev key live when no URL is given.
    #[arg(
        long,
        global = true,
        env = "ROSTER_DATA_DIR",
        default_value = "./roster-data"
    )]
    pub data_dir: PathBuf,
    /// Maximum connections in the pool.
    #[arg(long, global = true, env = "ROSTER_DB_POOL_SIZE", default_value_t = 16)]
    pub db_pool_size: usize,
    /// Seconds to wait for a pooled connection (or a new one) before answering UNAVAILABLE.
    #[arg(
        long,
        global = true,
        env = "ROSTER_DB_TIMEOUT_SECS",
        default_value_t = 5,
        value_parser = clap::value_parser!(u64).range(0..=MAX_SECS)
    )]
    pub db_timeout_secs: u64,
    /// Seconds to keep trying at start-up while the database cannot be reached yet (it may
    /// start after Roster); 0 gives up at once. A wrong password or database name fails at
    /// once either way.
    #[arg(long, global = true, env = "ROSTER_DB_WAIT_SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(0..=MAX_SECS))]
    pub db_wait_secs: u64,
}

impl DatabaseConfig {
    /// The URL from the flag/env or the file, if either is set.
    pub fn url(&self) -> anyhow::Result<Option<String>> {
        if let Some(url) = &self.database_url {
            return Ok(Some(url.clone()));
        }
        match &self.database_url_file {
            Some(path) => {
                let url = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                Ok(Some(url.trim().to_string()))
            }
            None => Ok(None),
        }
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.db_timeout_secs.max(1))
    }

    pub fn wait(&self) -> Duration {
        Duration::from_secs(self.db_wait_secs)
    }
}

/// Options of `roster serve`.
#[derive(clap::Args, Clone)]
pub struct ServeConfig {
    /// Address of the gRPC server. Port 0 picks a free port.
    #[arg(long, env = "ROSTER_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Do not apply schema migrations at start-up (run `roster migrate` separately).
    #[arg(long, env = "ROSTER_NO_MIGRATE")]
    pub no_migrate: bool,
    /// Threads running the async runtime (calls, database I/O); 0: one per available core
    /// (the container's CPU limit counts). Fewer help when Roster shares its cores with
    /// PostgreSQL: every wake-up of an idle worker is a context switch.
    #[arg(long, env = "ROSTER_WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,
    #[command(flatten)]
    pub database: DatabaseConfig,
    #[command(flatten)]
    pub server: ServerConfig,
}

/// Options of the running service itself, apart from where it listens and its database.
#[derive(clap::Args, Clone)]
pub struct ServerConfig {
    /// Password-hashing threads (argon2 runs on these, at a lower priority, off the async
    /// runtime; hashes beyond them queue). 0 means one per CPU core.
    #[arg(long, env = "ROSTER_HASH_WORKERS", default_value_t = 0)]
    pub hash_workers: usize,
    /// argon2id memory cost in KiB for new hashes.
    #[arg(long, env = "ROSTER_ARGON2_MEMORY_KIB", default_value_t = 19456)]
    pub argon2_memory_kib: u32,
    /// argon2id iterations for new hashes.
    #[arg(long, env = "ROSTER_ARGON2_ITERATIONS", default_value_t = 2)]
    pub argon2_iterations: u32,
    /// argon2id parallelism for new hashes.
    #[arg(long, env = "ROSTER_ARGON2_PARALLELISM", default_value_t = 1)]
    pub argon2_parallelism: u32,
    /// Keys sealing secrets at rest (provider tokens): `id:base64key[,id:base64key...]`, each
    /// key 32 random bytes; the first seals, all open (list a new key first to rotate, then
    /// `roster encryption reseal`). The embedded default generates one into --data-dir.
    #[arg(long, env = "ROSTER_ENCRYPTION_KEYS", hide_env_values = true)]
    pub encryption_keys: Option<String>,
    /// Read the encryption keys from this file instead (for mounted secrets).
    #[arg(long, env = "ROSTER_ENCRYPTION_KEYS_FILE")]
    pub encryption_keys_file: Option<PathBuf>,
    /// Consecutive failed sign-ins that lock an account; 0 never locks.
    #[arg(long, env = "ROSTER_LOCKOUT_THRESHOLD", default_value_t = 10)]
    pub lockout_threshold: u32,
    /// Seconds an account stays locked after too many failed sign-ins (at most a year).
    #[arg(long, env = "ROSTER_LOCKOUT_SECS", default_value_t = 900,
          value_parser = clap::value_parser!(u64).range(1..=31_536_000))]
    pub lockout_secs: u64,
    /// A new password may not repeat any of the user's last N passwords, the current one
    /// included (PCI DSS 8.3.7 asks for 4); at most 24. The hashes of the N-1 before the
    /// current one are kept for it; 0 keeps none and checks nothing.
    #[arg(long, env = "ROSTER_PASSWORD_HISTORY", default_value_t = 0,
          value_parser = clap::value_parser!(u32).range(0..=24))]
    pub password_history: u32,
    /// Fewest characters in a new password (NIST SP 800-63B-4 asks 15 where a password is
    /// the only factor); 8 to 128. Passwords already set keep working.
    #[arg(long, env = "ROSTER_PASSWORD_MIN_LENGTH", default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(8..=128))]
    pub password_min_length: u32,
    /// Days a password lasts: past it, VerifyPassword answers PASSWORD_CHANGE_REQUIRED until
    /// the password is changed (PCI DSS 8.3.9); 0: no limit.
    #[arg(long, env = "ROSTER_PASSWORD_MAX_AGE_DAYS", default_value_t = 0,
          value_parser = clap::value_parser!(u32).range(0..=36_500))]
    pub password_max_age_days: u32,
    /// Seconds before another code or link of the same kind can be issued to a user
    /// (StartOtpChallenge per channel, StartContactVerification per channel,
    /// CreatePasswordResetToken); sooner, the call answers RESOURCE_EXHAUSTED (TOO_MANY_CODES)
    /// with RetryInfo. Stops a "resend" button from flooding a user's inbox or phone (30 is
    /// usual; the Helm chart sets it). 0 (the default, as API.md lets a new start void the
    /// last code at once): none; at most an hour (the window issues are counted over).
    #[arg(long, env = "ROSTER_CODE_RESEND_SECS", default_value_t = 0,
          value_parser = clap::value_parser!(u32).range(0..=3600))]
    pub code_resend_secs: u32,
    /// Codes or links of one kind a user can be issued per rolling hour (as
    /// --code-resend-secs; SMS pumping runs up a bill one message at a time; 10 is usual, the
    /// Helm chart sets it). 0 (the default): no cap.
    #[arg(long, env = "ROSTER_CODES_PER_HOUR", default_value_t = 0,
          value_parser = clap::value_parser!(u32).range(0..=1000))]
    pub codes_per_hour: u32,
    /// The phone number prefixes SMS may be sent to (SMS_OTP challenges, phone verification),
    /// comma-separated calling codes or longer prefixes (`+1,+44,+4915`), at most 500: the
    /// countries you serve, which shuts out SMS pumping through premium ranges elsewhere.
    /// Others answer FAILED_PRECONDITION (SMS_DESTINATION_NOT_ALLOWED), and are refused as
    /// SMS_OTP channels at enrolment. Empty: any. A project may set its own list.
    #[arg(long, env = "ROSTER_SMS_ALLOWED_PREFIXES", default_value = "",
          value_parser = SmsPrefixes::parse)]
    pub sms_allowed_prefixes: SmsPrefixes,
    /// SMS (SMS_OTP challenges and phone verifications) one project's users may be sent per
    /// hour, all together: a ceiling on the SMS bill against pumping through many new
    /// accounts, which per-user limits cannot see (a spending limit, like SNS's). The whole
    /// hour's worth may go at once after a quiet spell, then it refills evenly; past it, SMS
    /// calls answer RESOURCE_EXHAUSTED (SMS_LIMIT_REACHED) with RetryInfo, email is
    /// unaffected. Set it well above your busiest hour. 0 (the default): none. A project may
    /// set its own.
    #[arg(long, env = "ROSTER_SMS_PER_HOUR", default_value_t = 0,
          value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub sms_per_hour: u32,
    /// A list of breached passwords that new passwords (CreateUser, SetPassword,
    /// ChangePassword, ResetPassword; CheckPassword reports it) may not be: SHA-1 hashes in
    /// hex, one per line, optionally `:count`, sorted by hash, as Have I Been Pwned's Pwned
    /// Passwords "ordered by hash" download. Searched on disk, never loaded.
    #[arg(long, env = "ROSTER_BREACHED_PASSWORDS_FILE")]
    pub breached_passwords_file: Option<PathBuf>,
    /// A right password found in that list at sign-in: `change` answers VerifyPassword with
    /// PASSWORD_CHANGE_REQUIRED until it is changed (NIST SP 800-63B: a change is forced on
    /// evidence of compromise; Auth0's breached password detection blocks it likewise);
    /// `allow` signs the user in as usual.
    #[arg(long, env = "ROSTER_BREACHED_AT_SIGN_IN", value_enum, default_value_t = BreachedSignIn::Change)]
    pub breached_at_sign_in: BreachedSignIn,
    /// Days events are kept; older ones are deleted in the background. 0 keeps them forever.
    /// A project may set its own (`roster projects policy --event-retention-days`).
    #[arg(long, env = "ROSTER_EVENT_RETENTION_DAYS", default_value_t = 90,
          value_parser = clap::value_parser!(u32).range(0..=36_500))]
    pub event_retention_days: u32,
    /// Seconds between two retention passes.
    #[arg(
        long,
        env = "ROSTER_EVENT_RETENTION_INTERVAL_SECS",
        default_value_t = 300,
        value_parser = clap::value_parser!(u64).range(0..=MAX_SECS)
    )]
    pub event_retention_interval_secs: u64,
    /// Milliseconds between two checks for new events when no notification arrives (event
    /// streams wake on LISTEN/NOTIFY; this is the fallback).
    #[arg(long, env = "ROSTER_EVENT_POLL_MS", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(0..=MAX_MS))]
    pub event_poll_ms: u64,
    /// How long (milliseconds) a verified API key is cached; a revocation takes effect within
    /// this time.
    #[arg(long, env = "ROSTER_KEY_CACHE_MS", default_value_t = 2000,
          value_parser = clap::value_parser!(u64).range(0..=MAX_MS))]
    pub key_cache_ms: u64,
    /// PEM certificate chain for TLS on the gRPC port (with --tls-key-file). Without it the
    /// port speaks plaintext HTTP/2 (for a mesh or a trusted network).
    #[arg(long, env = "ROSTER_TLS_CERT_FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<std::path::PathBuf>,
    /// PEM private key of the TLS certificate.
    #[arg(long, env = "ROSTER_TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<std::path::PathBuf>,
    /// PEM CA certificate(s) that client certificates must chain to: turns on mutual TLS
    /// (every connection must present one). Needs the TLS certificate and key.
    #[arg(long, env = "ROSTER_TLS_CLIENT_CA_FILE", requires = "tls_cert_file")]
    pub tls_client_ca_file: Option<std::path::PathBuf>,
    /// Seconds between checks of the TLS files for a rotated certificate, key or client CA
    /// (applied to new connections; invalid files are refused and the last good ones kept);
    /// 0: read them at start only.
    #[arg(long, env = "ROSTER_TLS_RELOAD_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(0..=MAX_SECS))]
    pub tls_reload_secs: u64,
    /// Address of the Prometheus metrics endpoint (`GET /metrics`, plain HTTP); empty turns it
    /// off. Port 0 picks one.
    #[arg(long, env = "ROSTER_METRICS_LISTEN", default_value = "127.0.0.1:9090")]
    pub metrics_listen: String,
    /// Pool connections shared by single-row reads (GetUser, LookupUser, identity lookups),
    /// which pipeline their statements on them; 0: half the cores, at least one.
    #[arg(long, env = "ROSTER_DB_READ_CONNECTIONS", default_value_t = 0)]
    pub db_read_connections: usize,
    /// Most GetUser, LookupUser and LookupUserByIdentity calls read together (one statement per
    /// kind of key among them): calls arriving while earlier reads are at the database are read
    /// together, with no waiting on a timer; 1 reads every call on its own.
    #[arg(long, env = "ROSTER_DB_READ_BATCH", default_value_t = 64,
        value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub db_read_batch: u16,
    /// Most CreateUser calls written by one statement (users and their events, one commit):
    /// calls arriving while a write per core is already at the database are written together
    /// by the next one, with no waiting on a timer; 1 writes every call on its own.
    #[arg(long, env = "ROSTER_DB_WRITE_BATCH", default_value_t = 64,
        value_parser = clap::value_parser!(u16).range(1..=256))]
    pub db_write_batch: u16,
    /// A second address serving only grpc.health.v1, always in plaintext and without a key,
    /// for probes that cannot speak TLS (Kubernetes' native gRPC probes); empty: none. The
    /// statuses are the main port's.
    #[arg(long, env = "ROSTER_HEALTH_LISTEN", default_value = "")]
    pub health_listen: String,
    /// Calls per second each API key may make on this server (a token bucket per key, kept in
    /// memory: each replica counts its own); 0 turns limiting off. Over the limit, calls
    /// answer RESOURCE_EXHAUSTED with RetryInfo.
    #[arg(long, env = "ROSTER_RATE_LIMIT_RPS", default_value_t = 0.0, value_parser = parse_rate)]
    pub rate_limit_rps: f64,
    /// Calls a key may make at once after a quiet spell (the bucket's size); 0 means twice
    /// the rate.
    #[arg(long, env = "ROSTER_RATE_LIMIT_BURST", default_value_t = 0.0, value_parser = parse_rate)]
    pub rate_limit_burst: f64,
    /// Failed sign-ins (VerifyPassword answering INVALID_CREDENTIALS) one client address may
    /// make per project within --ip-failure-window-secs; past it, VerifyPassword calls that
    /// give that `ip` answer RESOURCE_EXHAUSTED (IP_THROTTLED) with RetryInfo, unchecked.
    /// Counted in PostgreSQL, so every replica shares one budget per address; per /64 for
    /// IPv6; calls without `ip` are not counted. 0: off.
    #[arg(long, env = "ROSTER_IP_FAILURE_LIMIT", default_value_t = 0,
          value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub ip_failure_limit: u32,
    /// The window --ip-failure-limit refills over, evenly (100 a day: one more every
    /// 864 s).
    #[arg(long, env = "ROSTER_IP_FAILURE_WINDOW_SECS", default_value_t = 86_400,
          value_parser = clap::value_parser!(u64).range(1..=MAX_SECS))]
    pub ip_failure_window_secs: u64,
    /// Addresses the sign-in throttle never counts nor refuses, as comma-separated CIDR
    /// ranges or addresses (an office's NAT, your own proxies), at most 100:
    /// `203.0.113.0/24,2001:db8::/32`.
    #[arg(long, env = "ROSTER_IP_FAILURE_EXEMPT", default_value = "",
          value_parser = parse_exempt)]
    pub ip_failure_exempt: Exempt,
    /// Seconds a call may take to answer (a stream: to start) whatever deadline its client
    /// set, or when it set none; past it the call answers DEADLINE_EXCEEDED (CALL_TIMEOUT) and
    /// its database statements are cancelled. 0: no bound beyond the client's.
    #[arg(long, env = "ROSTER_CALL_TIMEOUT_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(0..=MAX_SECS))]
    pub call_timeout_secs: u64,
    /// ExportUsers streams running at once. Each holds a database connection and a snapshot
    /// for its whole run, so more answer RESOURCE_EXHAUSTED (with RetryInfo) rather than take
    /// the connections other calls need. 0: a quarter of --db-pool-size, at least one; at most
    /// --db-pool-size minus one.
    #[arg(long, env = "ROSTER_MAX_EXPORTS", default_value_t = 0)]
    pub max_exports: usize,
    /// Seconds an export waits for its client to take the next 1,000 users before ending it
    /// (ABORTED, EXPORT_STALLED), which frees its connection and snapshot; 0: it waits for
    /// ever.
    #[arg(long, env = "ROSTER_EXPORT_STALL_SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(0..=MAX_SECS))]
    pub export_stall_secs: u64,
    /// Seconds of silence on a client connection before the server sends it an HTTP/2 PING; a
    /// client that does not answer within as long again is disconnected, which ends its calls
    /// (the live StreamEvents of a host that vanished without closing its connection would
    /// otherwise hold their reader for the ~12 minutes TCP takes to notice). 0: no pings.
    #[arg(long, env = "ROSTER_KEEPALIVE_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(0..=MAX_SECS))]
    pub keepalive_secs: u64,
    /// Seconds in-flight RPCs (a stream until its last message) get to finish after
    /// SIGINT/SIGTERM; live StreamEvents end at once with UNAVAILABLE SHUTTING_DOWN.
    #[arg(long, env = "ROSTER_SHUTDOWN_GRACE_SECS", default_value_t = 20,
          value_parser = clap::value_parser!(u64).range(0..=MAX_SECS))]
    pub shutdown_grace_secs: u64,
    /// WebAuthn relying-party id (the site's domain, e.g. example.com) for projects that set
    /// none of their own (`roster projects update --webauthn-rp-id`).
    #[arg(long, env = "ROSTER_WEBAUTHN_RP_ID")]
    pub webauthn_rp_id: Option<String>,
    /// WebAuthn relying-party name shown by authenticators; the project name by default.
    #[arg(long, env = "ROSTER_WEBAUTHN_RP_NAME")]
    pub webauthn_rp_name: Option<String>,
    /// Origins allowed to run passkey ceremonies with the default relying party,
    /// comma-separated (e.g. https://example.com,https://app.example.com).
    #[arg(long, env = "ROSTER_WEBAUTHN_ORIGINS", value_delimiter = ',')]
    pub webauthn_origins: Vec<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            hash_workers: 0,
            argon2_memory_kib: 19456,
            argon2_iterations: 2,
            argon2_parallelism: 1,
            encryption_keys: None,
            encryption_keys_file: None,
            lockout_threshold: 10,
            lockout_secs: 900,
            password_history: 0,
            password_min_length: 8,
            password_max_age_days: 0,
            code_resend_secs: 0,
            codes_per_hour: 0,
            sms_allowed_prefixes: SmsPrefixes::default(),
            sms_per_hour: 0,
            breached_passwords_file: None,
            breached_at_sign_in: BreachedSignIn::Change,
            event_retention_days: 90,
            event_retention_interval_secs: 300,
            event_poll_ms: 1000,
            key_cache_ms: 2000,
            tls_cert_file: None,
            tls_key_file: None,
            tls_client_ca_file: None,
            metrics_listen: String::new(),
            health_listen: String::new(),
            tls_reload_secs: 30,
            db_read_connections: 0,
            db_read_batch: 64,
            db_write_batch: 64,
            rate_limit_rps: 0.0,
            rate_limit_burst: 0.0,
            ip_failure_limit: 0,
            ip_failure_window_secs: 86_400,
            ip_failure_exempt: Exempt::default(),
            call_timeout_secs: 30,
            max_exports: 0,
            export_stall_secs: 60,
            keepalive_secs: 30,
            shutdown_grace_secs: 20,
            webauthn_rp_id: None,
            webauthn_rp_name: None,
            webauthn_origins: Vec::new(),
        }
    }
}

impl ServerConfig {
    /// Where the gRPC port's TLS material lives (None: plaintext).
    pub fn tls(&self) -> anyhow::Result<Option<crate::tls::TlsFiles>> {
        let (cert, key) = match (&self.tls_cert_file, &self.tls_key_file) {
            (None, None) if self.tls_client_ca_file.is_some() => {
                anyhow::bail!("--tls-client-ca-file needs --tls-cert-file and --tls-key-file")
            }
            (None, None) => return Ok(None),
            (Some(c), Some(k)) => (c.clone(), k.clone()),
            _ => anyhow::bail!("--tls-cert-file and --tls-key-file go together"),
        };
        Ok(Some(crate::tls::TlsFiles {
            cert,
            key,
            client_ca: self.tls_client_ca_file.clone(),
        }))
    }

    /// How many exports may run at once with a pool of `pool_size` connections: one fewer at
    /// most, so that exports alone never take every connection.
    pub fn export_slots(&self, pool_size: usize) -> anyhow::Result<usize> {
        let most = pool_size.saturating_sub(1).max(1);
        match self.max_exports {
            0 => Ok((pool_size / 4).clamp(1, most)),
            n if n <= most => Ok(n),
            n => anyhow::bail!(
                "--max-exports {n} would let exports take every connection of the pool \
                 (--db-pool-size {pool_size}); at most {most}"
            ),
        }
    }

    /// The per-key limiter, with the server's limit when it has one (keys may have their
    /// own either way).
    pub fn rate_limiter(&self) -> crate::ratelimit::RateLimiter {
        crate::ratelimit::RateLimiter::new(crate::ratelimit::Limit::new(
            self.rate_limit_rps,
            Some(self.rate_limit_burst),
        ))
    }

    /// The per-address throttle of failed sign-ins (its limit is a password setting, which
    /// a project may set for itself).
    pub fn ip_throttle(&self) -> crate::authenticators::throttle::FailureThrottle {
        crate::authenticators::throttle::FailureThrottle::new(
            Duration::from_secs(self.ip_failure_window_secs),
            self.ip_failure_exempt.0.clone(),
        )
    }

    /// The breached-passwords list, opened and checked, if one is set.
    pub fn breached_passwords(
        &self,
    ) -> anyhow::Result<Option<crate::crypto::breached::BreachedList>> {
        self.breached_passwords_file
            .as_deref()
            .map(crate::crypto::breached::BreachedList::open)
            .transpose()
            .context("--breached-passwords-file")
    }

    /// The encryption key list from the flag/env or the file, if either is set.
    pub fn encryption_keys(&self) -> anyhow::Result<Option<String>> {
        encryption_keys(&self.encryption_keys, &self.encryption_keys_file)
    }

    pub fn password_settings(&self) -> PasswordSettings {
        PasswordSettings {
            lockout_threshold: self.lockout_threshold,
            lockout: chrono::Duration::seconds(self.lockout_secs.min(31_536_000) as i64),
            history: self.password_history.min(24),
            min_length: self.password_min_length.clamp(8, 128),
            max_age_days: self.password_max_age_days.min(36_500),
            ip_failure_limit: self.ip_failure_limit.min(1_000_000),
            codes: crate::authenticators::sends::SendLimit {
                resend_secs: self.code_resend_secs.min(3600),
                per_hour: self.codes_per_hour.min(1000),
                sms_per_hour: self.sms_per_hour.min(1_000_000),
            },
        }
    }

    /// What this server applies where a project's policy says `default`, and the other
    /// settings worth comparing across replicas, by their `serve` flag names: published in
    /// the servers registry (`crate::servers`), so nothing secret (no URL, key or path).
    pub fn published_settings(&self) -> serde_json::Value {
        let p = self.password_settings();
        let sms = &self.sms_allowed_prefixes;
        let rate = crate::ratelimit::Limit::new(self.rate_limit_rps, Some(self.rate_limit_burst))
            .map_or_else(
                || "off".to_string(),
                |l| format!("{} per second, burst {}", l.rate, l.burst),
            );
        let breached = match (&self.breached_passwords_file, self.breached_at_sign_in) {
            (None, _) => "off",
            (Some(_), BreachedSignIn::Change) => "on (sign-in: change)",
            (Some(_), BreachedSignIn::Allow) => "on (sign-in: allow)",
        };
        serde_json::json!({
            "lockout-threshold": p.lockout_threshold,
            "lockout-secs": p.lockout.num_seconds(),
            "password-history": p.history,
            "password-min-length": p.min_length,
            "password-max-age-days": p.max_age_days,
            "ip-failure-limit": p.ip_failure_limit,
            "code-resend-secs": p.codes.resend_secs,
            "codes-per-hour": p.codes.per_hour,
            "sms-allowed-prefixes": if sms.is_empty() { "any".to_string() } else { sms.to_text() },
            "sms-per-hour": p.codes.sms_per_hour,
            "event-retention-days": self.event_retention_days.min(36_500),
            "rate-limit": rate,
            "argon2": format!(
                "m={},t={},p={}",
                self.argon2_memory_kib, self.argon2_iterations, self.argon2_parallelism
            ),
            "breached-passwords": breached,
            "key-cache-ms": self.key_cache_ms,
            "call-timeout-secs": self.call_timeout_secs,
            "tls": self.tls_cert_file.is_some(),
        })
    }

    pub fn relying_party(&self) -> RelyingPartyDefaults {
        RelyingPartyDefaults {
            rp_id: self.webauthn_rp_id.clone().filter(|s| !s.trim().is_empty()),
            rp_name: self
                .webauthn_rp_name
                .clone()
                .filter(|s| !s.trim().is_empty()),
            origins: self
                .webauthn_origins
                .iter()
                .map(|o| o.trim().to_string())
                .filter(|o| !o.is_empty())
                .collect(),
        }
    }

    /// Shared read connections: as configured, else half the cores (at least one).
    pub fn read_connections(&self) -> usize {
        match self.db_read_connections {
            0 => std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1)),
            n => n,
        }
    }

    /// Coalesced CreateUser writes at the database at once: one per core, at least two.
    pub fn write_slots(&self) -> usize {
        std::thread::available_parallelism().map_or(2, |n| n.get().max(2))
    }

    /// The number of hashing workers, resolving 0 to the number of cores.
    pub fn hash_workers(&self) -> usize {
        if self.hash_workers > 0 {
            self.hash_workers
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
        }
    }
}

/// The encryption key list from a value or, without one, a file; `None` when neither is set.
/// An empty value means "not configured" (handy to override a file or default).
pub fn encryption_keys(
    value: &Option<String>,
    file: &Option<PathBuf>,
) -> anyhow::Result<Option<String>> {
    if let Some(k) = value {
        return Ok(Some(k.trim().to_string()).filter(|k| !k.is_empty()));
    }
    match file {
        Some(path) => Ok(Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?
                .trim()
                .to_string(),
        )),
        None => Ok(None),
    }
}

/// What a sign-in with a password in the breached list answers (`--breached-at-sign-in`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BreachedSignIn {
    /// PASSWORD_CHANGE_REQUIRED until the password is changed.
    Change,
    /// As any right password.
    Allow,
}

/// `--ip-failure-exempt`: address ranges.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Exempt(pub Vec<ipnet::IpNet>);

/// Comma-separated CIDR ranges or single addresses, at most 100.
fn parse_exempt(text: &str) -> Result<Exempt, String> {
    let mut nets = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let net = part
            .parse::<ipnet::IpNet>()
            .or_else(|_| part.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
            .map_err(|_| {
                format!("{part:?} is not an address or a CIDR range like 203.0.113.0/24")
            })?;
        nets.push(net);
    }
    if nets.len() > 100 {
        return Err("at most 100 ranges".into());
    }
    Ok(Exempt(nets))
}

/// A rate or burst: a finite number from 0 to 1,000,000.
fn parse_rate(text: &str) -> Result<f64, String> {
    number_in(text, 0.0, 1_000_000.0).ok_or_else(|| "give a number from 0 to 1000000".into())
}

/// `text` as a finite number from `min` to `max`, for the flags that take one.
pub fn number_in(text: &str, min: f64, max: f64) -> Option<f64> {
    text.trim()
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && (min..=max).contains(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_never_get_every_connection() {
        let with = |max_exports| ServerConfig {
            max_exports,
            ..Default::default()
        };
        assert_eq!(with(0).export_slots(16).unwrap(), 4);
        assert_eq!(with(0).export_slots(2).unwrap(), 1);
        assert_eq!(with(15).export_slots(16).unwrap(), 15);
        let err = with(16).export_slots(16).unwrap_err().to_string();
        assert!(
            err.contains("--max-exports 16") && err.contains("at most 15"),
            "{err}"
        );
    }
}

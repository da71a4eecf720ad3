//! Operator commands against the database: migrations, projects, API keys and the rotation of
//! the encryption key. Without a `DATABASE_URL` they use the embedded cluster in `--data-dir`
//! (starting it for the command if `roster serve` is not running it).
use std::future::Future;
use std::pin::Pin;

use anyhow::Context;
use clap::Subcommand;
use uuid::Uuid;

use crate::admin;
use crate::config::DatabaseConfig;
use crate::crypto::rotation;
use crate::crypto::seal::Sealer;
use crate::db::embedded::EmbeddedPostgres;

#[derive(Subcommand)]
pub enum ProjectCommand {
    /// Create a project.
    Create {
        /// A unique name.
        name: String,
    },
    /// List projects.
    List,
    /// Show or change a project's policy (sign-in, codes, SMS, event retention): settings
    /// given here replace the server's (the same flags of `serve`) for this project;
    /// `default` goes back to the server's. Servers apply a change within their key-cache
    /// time. Prints the policy, one setting per line.
    Policy {
        /// Project id or name.
        project: String,
        #[command(flatten)]
        update: admin::PolicyUpdate,
    },
    /// Delete a project and everything in it (users, their credentials and identities,
    /// events, API keys): irreversible. Its keys stop working first; users and events go in
    /// batches; an interrupted deletion is finished by running it again.
    Delete {
        /// Project id or name.
        project: String,
        /// The project's name again, to confirm.
        #[arg(long)]
        confirm: String,
    },
    /// Set a project's WebAuthn relying party, used by its passkey ceremonies.
    Update {
        /// Project id or name.
        project: String,
        /// Relying-party id: the site's domain, e.g. example.com.
        #[arg(long)]
        webauthn_rp_id: String,
        /// An origin allowed to run ceremonies, e.g. https://example.com (repeat for several).
        #[arg(long = "webauthn-origin", required = true)]
        webauthn_origins: Vec<String>,
        /// The name authenticators show; the project name when not given.
        #[arg(long)]
        webauthn_rp_name: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum KeyCommand {
    /// Create an API key; its token is printed once and never stored.
    Create {
        /// Project id or name.
        #[arg(long)]
        project: String,
        /// A scope (repeat for several): users.read users.write users.import users.export
        /// users.export_secrets authenticators.read authenticators.write
        /// authenticators.verify identities.read identities.write identities.tokens
        /// logs.read, or * for all.
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
        /// A name saying who uses the key.
        #[arg(long)]
        name: String,
        /// Servers refuse the key this long after its creation (UNAUTHENTICATED
        /// EXPIRED_API_KEY): a number with s, m, h or d, e.g. 90d, at most 36500d. Servers
        /// warn in their log, once an hour, when a key in use has less than 7 days left.
        /// Without it the key lasts until revoked.
        #[arg(long, value_parser = parse_lifetime)]
        expires_in: Option<chrono::TimeDelta>,
        /// Accept the key only from these networks: CIDR blocks or addresses, comma-separated
        /// or repeated (e.g. 10.0.0.0/8,fd00::/8). Anywhere else it is refused with
        /// PERMISSION_DENIED ADDRESS_NOT_ALLOWED. Without it, from any address.
        #[arg(long = "allow-from", value_delimiter = ',')]
        allow_from: Vec<String>,
    },
    /// List a project's keys (never their secrets): id, name, scopes, state (active,
    /// revoked or expired), when a server last accepted the key (to within a minute), when
    /// it expires, its rate limit and the networks it is accepted from.
    List {
        /// Project id or name.
        #[arg(long)]
        project: String,
    },
    /// Revoke a key; servers reject it within their key-cache time.
    Revoke {
        /// The key id (the part after rst_ in the token, or its UUID form).
        key_id: String,
    },
    /// Replace a key without an outage: a new key with the old one's name, scopes, rate limit
    /// and lifetime is printed (once), and the old one keeps working for --old-expires-in
    /// (1d unless given; `now`: at once, within the servers' key-cache time) so its callers
    /// can switch.
    Rotate {
        /// The key id (the part after rst_ in the token, or its UUID form).
        key_id: String,
        /// How long the old key keeps working: a number with s, m, h or d, or `now`.
        #[arg(long, default_value = "1d", value_parser = parse_grace)]
        old_expires_in: chrono::TimeDelta,
    },
    /// Set a key's own rate limit, in place of the server's --rate-limit-rps: a noisy batch
    /// job can get less, a sign-in frontend more. Servers apply it within their key-cache
    /// time.
    Limit {
        /// The key id (the part after rst_ in the token, or its UUID form).
        key_id: String,
        /// Calls per second (0: not limited at all), or `default` for the server's.
        #[arg(long, value_parser = parse_key_rate)]
        rps: KeyRate,
        /// Calls the key may make at once after a quiet spell (1 to 1000000); twice the
        /// rate when not given.
        #[arg(long, value_parser = parse_burst)]
        burst: Option<f64>,
    },
    /// Accept a key only from some networks (a leaked key is then refused anywhere else), or
    /// from any address again. Servers check the address of the connection's peer (a proxy
    /// or service-mesh sidecar in front of Roster is the peer), and apply the change within
    /// their key-cache time.
    Restrict {
        /// The key id (the part after rst_ in the token, or its UUID form).
        key_id: String,
        /// CIDR blocks or addresses, comma-separated or repeated (at most 100), or `any` to
        /// lift the restriction.
        #[arg(long = "allow-from", value_delimiter = ',', required = true)]
        allow_from: Vec<String>,
    },
}

#[derive(Subcommand)]
pub enum ThrottleCommand {
    /// List a project's addresses with failed sign-ins counted against them, those being
    /// refused first: address (IPv6 as its /64), failures owed as of a time (they refill
    /// evenly over --ip-failure-window-secs from then), attempts refused since it had room.
    List {
        /// Project id or name.
        #[arg(long)]
        project: String,
    },
    /// Forget what an address owes, so its sign-ins are checked again at once (an office
    /// behind one NAT throttled by a few forgotten passwords). Audited. For an address that
    /// should never be throttled, use serve's --ip-failure-exempt instead.
    Release {
        /// Project id or name.
        #[arg(long)]
        project: String,
        /// The address (an IPv6 one releases its /64).
        ip: std::net::IpAddr,
    },
}

#[derive(Subcommand)]
pub enum EncryptionCommand {
    /// Count the stored secrets (provider tokens, TOTP seeds) by the key that sealed them,
    /// and say which of those keys this configuration lacks.
    Status,
    /// Seal every stored secret that does not use the current (first) key again under it, so
    /// older keys can be dropped. Safe while servers run; run it after every server seals
    /// with the new key, then check `status`.
    Reseal,
}

/// The keys `serve` is given, by the same flags and variables.
#[derive(clap::Args)]
pub struct EncryptionKeys {
    /// `id:base64key[,id:base64key...]`; the first is the current key. With neither this nor
    /// a file, the embedded default's `<data-dir>/encryption-keys` when it exists.
    #[arg(
        long,
        global = true,
        env = "ROSTER_ENCRYPTION_KEYS",
        hide_env_values = true
    )]
    encryption_keys: Option<String>,
    /// Read the encryption keys from this file instead.
    #[arg(long, global = true, env = "ROSTER_ENCRYPTION_KEYS_FILE")]
    encryption_keys_file: Option<std::path::PathBuf>,
}

/// Runs `job` on a connection to the configured database, or to the embedded cluster, after
/// applying pending migrations (how many, the job's second argument).
pub async fn with_database<F>(db: &DatabaseConfig, job: F) -> anyhow::Result<()>
where
    F: for<'a> FnOnce(
        &'a mut tokio_postgres::Client,
        usize,
    ) -> Pin<Box<dyn Future<Output = anyhow::Result<()>> + 'a>>,
{
    let mut started: Option<EmbeddedPostgres> = None;
    let url = match db.url()? {
        Some(url) => url,
        None => {
            let dir = db.data_dir.clone();
            let running = tokio::task::spawn_blocking(move || {
                crate::db::embedded::running(&dir, crate::server::EMBEDDED_DATABASE)
            })
            .await??;
            match running {
                // `roster serve` runs the cluster: use it, and leave it running.
                Some((_, url)) => url,
                None => {
                    let (pg, url) = crate::server::start_embedded(&db.data_dir).await?;
                    started = Some(pg);
                    url
                }
            }
        }
    };
    let result = async {
        let (mut client, conn) = crate::db::retry_unavailable(db.wait(), || {
            futures_util::TryFutureExt::map_err(
                tokio_postgres::connect(&url, tokio_postgres::NoTls),
                crate::error::Error::from,
            )
        })
        .await
        .context("connecting to the database")?;
        tokio::spawn(conn);
        let applied = crate::db::migrate::migrate(&mut client).await?;
        job(&mut client, applied).await
    }
    .await;
    if let Some(pg) = started {
        tokio::task::spawn_blocking(move || pg.stop()).await?;
    }
    result
}

pub async fn projects(cmd: ProjectCommand, db: &DatabaseConfig) -> anyhow::Result<()> {
    with_database(db, move |client, _| {
        Box::pin(async move {
            match cmd {
                ProjectCommand::Create { name } => {
                    let p = admin::create_project(&mut *client, &name).await?;
                    println!("{}\t{}", p.id, p.name);
                }
                ProjectCommand::Delete { project, confirm } => {
                    let p = admin::find_project(&*client, &project).await?;
                    if confirm != p.name {
                        anyhow::bail!(
                            "--confirm must be the project's name ({:?}) to delete it and \
                             everything in it",
                            p.name
                        );
                    }
                    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
                    let done = admin::delete_project(&mut *client, p.id, |d| {
                        if terminal {
                            eprint!("\rdeleted {} users, {} events", d.users, d.events);
                        }
                    })
                    .await?;
                    if terminal {
                        eprintln!();
                    }
                    println!(
                        "{}\t{}\tdeleted: {} users, {} events, {} keys",
                        p.id, p.name, done.users, done.events, done.keys
                    );
                }
                ProjectCommand::List => {
                    for p in admin::list_projects(&*client).await? {
                        println!("{}\t{}\t{}", p.id, p.name, p.created_at.to_rfc3339());
                    }
                }
                ProjectCommand::Policy { project, update } => {
                    let p = admin::find_project(&*client, &project).await?;
                    let policy = admin::update_policy(&mut *client, p.id, update).await?;
                    // A setting left to the servers shows what the running ones apply.
                    let servers = crate::servers::running(&*client).await?;
                    let default = |name: &str| {
                        format!("default ({})", crate::servers::setting(&servers, name))
                    };
                    let sms = match &policy.sms_allowed_prefixes {
                        None => None,
                        Some(list) if list.is_empty() => Some("any".to_string()),
                        Some(list) => Some(list.to_text()),
                    };
                    let number = |v: Option<u32>| v.map(|v| v.to_string());
                    for (name, own) in [
                        ("lockout-threshold", number(policy.lockout_threshold)),
                        ("lockout-secs", number(policy.lockout_secs)),
                        ("password-history", number(policy.password_history)),
                        ("password-min-length", number(policy.password_min_length)),
                        (
                            "password-max-age-days",
                            number(policy.password_max_age_days),
                        ),
                        ("ip-failure-limit", number(policy.ip_failure_limit)),
                        ("code-resend-secs", number(policy.code_resend_secs)),
                        ("codes-per-hour", number(policy.codes_per_hour)),
                        ("sms-allowed-prefixes", sms),
                        ("sms-per-hour", number(policy.sms_per_hour)),
                        ("event-retention-days", number(policy.event_retention_days)),
                    ] {
                        println!("{name}\t{}", own.unwrap_or_else(|| default(name)));
                    }
                }
                ProjectCommand::Update {
                    project,
                    webauthn_rp_id,
                    webauthn_origins,
                    webauthn_rp_name,
                } => {
                    let p = admin::find_project(&*client, &project).await?;
                    admin::set_relying_party(
                        &mut *client,
                        p.id,
                        &webauthn_rp_id,
                        webauthn_rp_name.as_deref(),
                        &webauthn_origins,
                    )
                    .await?;
                    println!("{}\t{}\twebauthn {}", p.id, p.name, webauthn_rp_id.trim());
                }
            }
            Ok(())
        })
    })
    .await
}

/// `roster keys limit --rps`: a rate, or the server's.
#[derive(Debug, Clone, Copy)]
pub enum KeyRate {
    ServerDefault,
    PerSecond(f64),
}

fn parse_key_rate(text: &str) -> Result<KeyRate, String> {
    match text.trim() {
        "default" => Ok(KeyRate::ServerDefault),
        t => crate::config::number_in(t, 0.0, 1_000_000.0)
            .map(KeyRate::PerSecond)
            .ok_or_else(|| "give calls per second from 0 (no limit) to 1000000, or default".into()),
    }
}

fn parse_burst(text: &str) -> Result<f64, String> {
    crate::config::number_in(text, 1.0, 1_000_000.0)
        .ok_or_else(|| "give a number of calls from 1 to 1000000".into())
}

/// A key's id from its id or its whole token. The input is not echoed on error: it may be a
/// mistyped token holding a secret.
fn key_id_of(text: &str) -> anyhow::Result<Uuid> {
    Uuid::try_parse(
        text.trim_start_matches("rst_")
            .split('_')
            .next()
            .unwrap_or(""),
    )
    .map_err(|_| {
        anyhow::anyhow!(
            "not a key id or token: give the key's id (a UUID) or its whole token \
                 (rst_<key-id>_<secret>)"
        )
    })
}

/// How `keys list` and `keys limit` show a key's own rate limit.
fn limit_text(rps: Option<f64>, burst: Option<f64>) -> String {
    match rps {
        None => "limit default".to_string(),
        Some(r) if r <= 0.0 => "no limit".to_string(),
        Some(r) => {
            let limit = crate::ratelimit::Limit::new(r, burst);
            format!("limit {r}/s burst {}", limit.map_or(1.0, |l| l.burst))
        }
    }
}

/// How `keys list`, `create` and `restrict` show where a key is accepted from.
fn networks_text(networks: Option<&[String]>) -> String {
    match networks {
        None => "from any address".to_string(),
        Some(nets) => format!("from {}", nets.join(",")),
    }
}

/// How long a rotated key keeps working: a lifetime, or `now`.
fn parse_grace(text: &str) -> Result<chrono::TimeDelta, String> {
    match text.trim() {
        "now" => Ok(chrono::TimeDelta::zero()),
        t => parse_lifetime(t).map_err(|e| format!("{e}, or now")),
    }
}

/// A key's lifetime: a whole number with a unit, `s`, `m`, `h` or `d`.
fn parse_lifetime(text: &str) -> Result<chrono::TimeDelta, String> {
    const MAX_DAYS: i64 = 36_500;
    let usage = || format!("give a number with s, m, h or d (e.g. 90d), at most {MAX_DAYS}d");
    let text = text.trim();
    let split = text.len().saturating_sub(1);
    let (count, unit) = (
        text.get(..split).unwrap_or(""),
        text.get(split..).unwrap_or(""),
    );
    let count: i64 = count.parse().map_err(|_| usage())?;
    let unit_secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => return Err(usage()),
    };
    match count.checked_mul(unit_secs) {
        Some(secs) if secs > 0 && secs <= MAX_DAYS * 86_400 => Ok(chrono::TimeDelta::seconds(secs)),
        _ => Err(usage()),
    }
}

pub async fn keys(cmd: KeyCommand, db: &DatabaseConfig) -> anyhow::Result<()> {
    with_database(db, move |client, _| {
        Box::pin(async move {
            match cmd {
                KeyCommand::Create {
                    project,
                    scopes,
                    name,
                    expires_in,
                    allow_from,
                } => {
                    let networks = match allow_from.is_empty() {
                        true => None,
                        false => Some(admin::parse_networks(&allow_from)?),
                    };
                    let p = admin::find_project(&*client, &project).await?;
                    // Whole seconds: the time an operator reads back and writes down.
                    let expires_at = expires_in
                        .map(|d| chrono::SubsecRound::trunc_subsecs(chrono::Utc::now() + d, 0));
                    let (key, token) = admin::create_restricted_key(
                        &mut *client,
                        p.id,
                        &name,
                        &scopes,
                        expires_at,
                        networks.as_deref(),
                    )
                    .await?;
                    let lasts = match key.expires_at {
                        Some(t) => format!(", expiring {}", t.to_rfc3339()),
                        None => String::new(),
                    };
                    let from = match &key.allowed_networks {
                        Some(_) => format!(", {}", networks_text(key.allowed_networks.as_deref())),
                        None => String::new(),
                    };
                    eprintln!(
                        "created key {} in project {}{lasts}{from}; the token is shown only now:",
                        key.id, p.name
                    );
                    println!("{token}");
                }
                KeyCommand::List { project } => {
                    let p = admin::find_project(&*client, &project).await?;
                    let now = chrono::Utc::now();
                    for k in admin::list_keys(&*client, p.id).await? {
                        let state = match (k.revoked_at, k.expires_at) {
                            (Some(t), _) => format!("revoked {}", t.to_rfc3339()),
                            (None, Some(t)) if t <= now => "expired".to_string(),
                            (None, _) => "active".to_string(),
                        };
                        let used = match k.last_used_at {
                            Some(t) => format!("last used {}", t.to_rfc3339()),
                            None => "never used".to_string(),
                        };
                        let expiry = match k.expires_at {
                            Some(t) => format!("expires {}", t.to_rfc3339()),
                            None => "no expiry".to_string(),
                        };
                        let limit = limit_text(k.rate_limit_rps, k.rate_limit_burst);
                        let from = networks_text(k.allowed_networks.as_deref());
                        println!(
                            "{}\t{}\t{}\t{state}\t{used}\t{expiry}\t{limit}\t{from}",
                            k.id,
                            k.name,
                            k.scopes.join(",")
                        );
                    }
                }
                KeyCommand::Revoke { key_id } => {
                    let id = key_id_of(&key_id)?;
                    admin::revoke_key(&mut *client, id).await?;
                    println!("revoked {id}");
                }
                KeyCommand::Rotate {
                    key_id,
                    old_expires_in,
                } => {
                    let id = key_id_of(&key_id)?;
                    let until =
                        chrono::SubsecRound::trunc_subsecs(chrono::Utc::now() + old_expires_in, 0);
                    let (key, token, old_until) =
                        admin::rotate_key(&mut *client, id, until).await?;
                    let lasts = match key.expires_at {
                        Some(t) => format!(", expiring {}", t.to_rfc3339()),
                        None => String::new(),
                    };
                    eprintln!(
                        "created key {} to replace {id}{lasts}; {id} stops working at {}; \
                         the new token is shown only now:",
                        key.id,
                        old_until.to_rfc3339()
                    );
                    println!("{token}");
                }
                KeyCommand::Limit { key_id, rps, burst } => {
                    let id = key_id_of(&key_id)?;
                    let rps = match rps {
                        KeyRate::ServerDefault => None,
                        KeyRate::PerSecond(r) => Some(r),
                    };
                    admin::set_key_limit(&mut *client, id, rps, burst).await?;
                    println!("{id}\t{}", limit_text(rps, burst));
                }
                KeyCommand::Restrict { key_id, allow_from } => {
                    let id = key_id_of(&key_id)?;
                    let networks = match allow_from.as_slice() {
                        [any] if any.trim() == "any" => None,
                        given => Some(admin::parse_networks(given)?),
                    };
                    admin::restrict_key(&mut *client, id, networks.as_deref()).await?;
                    let texts: Option<Vec<String>> =
                        networks.map(|nets| nets.iter().map(ToString::to_string).collect());
                    println!("{id}\t{}", networks_text(texts.as_deref()));
                }
            }
            Ok(())
        })
    })
    .await
}

pub async fn throttle(cmd: ThrottleCommand, db: &DatabaseConfig) -> anyhow::Result<()> {
    with_database(db, move |client, _| {
        Box::pin(async move {
            match cmd {
                ThrottleCommand::List { project } => {
                    let p = admin::find_project(&*client, &project).await?;
                    let listed = admin::list_throttled(&*client, p.id).await?;
                    for t in &listed {
                        println!(
                            "{}\towes {} as of {}\trefused {}",
                            t.ip,
                            failures_text(t.failures),
                            t.as_of.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                            t.refused
                        );
                    }
                    if listed.len() as i64 == admin::THROTTLED_LISTED {
                        eprintln!("(the first {} addresses)", admin::THROTTLED_LISTED);
                    }
                }
                ThrottleCommand::Release { project, ip } => {
                    let p = admin::find_project(&*client, &project).await?;
                    match admin::release_ip(&mut *client, p.id, ip).await? {
                        Some(t) => println!(
                            "released {} in {}: it owed {}, {} attempts refused",
                            t.ip,
                            p.name,
                            failures_text(t.failures),
                            t.refused
                        ),
                        None => println!("{ip} owes no failed sign-ins in {}", p.name),
                    }
                }
            }
            Ok(())
        })
    })
    .await
}

/// `roster servers`: one line per running server, then each setting, one value where they
/// agree and each value with its hosts where they differ.
pub async fn servers(db: &DatabaseConfig) -> anyhow::Result<()> {
    with_database(db, move |client, _| {
        Box::pin(async move {
            let servers = crate::servers::running(&*client).await?;
            if servers.is_empty() {
                eprintln!(
                    "no server has been seen in the last {} s",
                    crate::servers::ALIVE.as_secs()
                );
                return Ok(());
            }
            let now = chrono::Utc::now();
            for s in &servers {
                println!(
                    "{}\t{}\t{}\t{}\tstarted {}\tseen {} s ago",
                    s.id,
                    s.host,
                    s.version,
                    s.listen,
                    s.started_at
                        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    (now - s.seen_at).num_seconds().max(0)
                );
            }
            for name in crate::servers::setting_names(&servers) {
                println!("{name}\t{}", crate::servers::setting(&servers, &name));
            }
            Ok(())
        })
    })
    .await
}

/// Failures owed, as an operator reads them: `1 failure`, `2.5 failures`.
fn failures_text(n: f64) -> String {
    let n = (n * 10.0).round() / 10.0;
    if n == 1.0 {
        "1 failure".to_string()
    } else {
        format!("{n} failures")
    }
}

pub async fn encryption(
    cmd: EncryptionCommand,
    db: &DatabaseConfig,
    keys: &EncryptionKeys,
) -> anyhow::Result<()> {
    let default_file = crate::server::embedded_encryption_keys(&db.data_dir);
    let file = match &keys.encryption_keys_file {
        None if db.url()?.is_none() && default_file.exists() => Some(default_file),
        other => other.clone(),
    };
    let sealer = crate::config::encryption_keys(&keys.encryption_keys, &file)?
        .map(|spec| Sealer::parse(&spec))
        .transpose()?;
    with_database(db, move |client, _| {
        Box::pin(async move {
            match cmd {
                EncryptionCommand::Status => {
                    let uses = rotation::key_use(client).await?;
                    let mut missing = 0;
                    for u in &uses {
                        let state = match &sealer {
                            Some(s) if s.current_key_id() == u.key_id => "current",
                            Some(s) if s.has_key(&u.key_id) => "configured",
                            _ => {
                                missing += u.values;
                                "NOT CONFIGURED"
                            }
                        };
                        println!("{}\t{}\t{}\t{state}", u.column, u.key_id, u.values);
                    }
                    if uses.is_empty() {
                        eprintln!("no secrets are stored");
                    }
                    if missing > 0 {
                        anyhow::bail!(
                            "{missing} stored secret(s) need a key this configuration lacks"
                        );
                    }
                }
                EncryptionCommand::Reseal => {
                    let sealer = sealer.context(
                        "no encryption keys: give --encryption-keys or --encryption-keys-file \
                         (ROSTER_ENCRYPTION_KEYS, ROSTER_ENCRYPTION_KEYS_FILE) as to `serve`",
                    )?;
                    let done = rotation::reseal(client, &sealer).await?;
                    println!(
                        "re-sealed {} secret(s) with key {}",
                        done.resealed,
                        sealer.current_key_id()
                    );
                    if done.changed_meanwhile > 0 {
                        println!(
                            "{} secret(s) were changed by a server meanwhile and left as it \
                             sealed them",
                            done.changed_meanwhile
                        );
                    }
                    if !done.unopened.is_empty() {
                        let listed: Vec<String> = done
                            .unopened
                            .iter()
                            .map(|(key, n)| format!("{n} sealed with {key}"))
                            .collect();
                        anyhow::bail!(
                            "some secrets did not open and were left as they are: {} \
                             (is that key missing from this configuration?)",
                            listed.join(", ")
                        );
                    }
                }
            }
            Ok(())
        })
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::parse_lifetime;

    #[test]
    fn key_lifetimes_are_parsed_and_bounded() {
        let secs = |t: &str| parse_lifetime(t).map(|d| d.num_seconds());
        assert_eq!(secs("90d"), Ok(90 * 86_400));
        assert_eq!(secs("12h"), Ok(43_200));
        assert_eq!(secs("30m"), Ok(1_800));
        assert_eq!(secs(" 45s "), Ok(45));
        assert_eq!(secs("36500d"), Ok(36_500 * 86_400));
        for bad in [
            "",
            "d",
            "90",
            "0d",
            "-1d",
            "36501d",
            "1y",
            "1.5d",
            "9d9",
            "é",
            "1é",
            "9999999999999999999d",
        ] {
            let err = parse_lifetime(bad).unwrap_err();
            assert!(err.contains("e.g. 90d"), "{bad:?}: {err}");
        }
    }
}

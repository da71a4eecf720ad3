//! A private PostgreSQL cluster started from the binaries installed on the machine: what
//! `roster serve` uses when no `DATABASE_URL` is given, and what the tests run against.
//!
//! The cluster listens only on a Unix socket in a directory of its own (no TCP port to clash
//! with, nothing reachable from the network), with `trust` auth inside that private directory.
//! As root, initdb and postgres run as the `postgres` system user (PostgreSQL refuses root).
//! The server is a direct child of a thread that lives exactly as long as it does, and is told
//! (PR_SET_PDEATHSIG) to shut down if this process dies, so it never outlives us.
use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// How the cluster is run.
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// Directory holding `pgdata/`, the log and (when short enough) the socket directory.
    pub dir: PathBuf,
    /// Turn off fsync and friends: for throwaway test clusters only.
    pub unsafe_fast: bool,
}

/// A running private cluster. Stop it with [`EmbeddedPostgres::stop`]; if this process dies
/// first, the kernel tells the server to shut down.
#[derive(Debug)]
pub struct EmbeddedPostgres {
    pid: i32,
    socket_dir: PathBuf,
    log_path: PathBuf,
    /// Receives once the server process has exited (a Mutex makes the handle `Sync`).
    exited: Mutex<mpsc::Receiver<()>>,
}

const PORT: u16 = 5432;
const SUPERUSER: &str = "postgres";

/// Where `initdb` and `postgres` are: on PATH, else the newest `/usr/lib/postgresql/*/bin`.
pub fn find_bin_dir() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .find(|p| p.join("initdb").is_file() && p.join("postgres").is_file())
    });
    if on_path.is_some() {
        return on_path;
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            (bin.join("initdb").is_file() && bin.join("postgres").is_file()).then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, p)| p)
}

/// The error to show when no binaries are installed and no URL was given.
pub const NO_BINARIES_HELP: &str = "no DATABASE_URL was given and no PostgreSQL server binaries \
    (initdb, postgres) were found on PATH or under /usr/lib/postgresql/*/bin. Either set \
    DATABASE_URL=postgres://user:password@host:5432/dbname, or install PostgreSQL \
    (Debian/Ubuntu: apt-get install postgresql) and Roster will run a private cluster in \
    --data-dir.";

/// uid/gid of the `postgres` user when we are root (PostgreSQL will not run as root).
fn drop_privileges_to() -> anyhow::Result<Option<(u32, u32)>> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let name = std::ffi::CString::new(SUPERUSER)?;
    // SAFETY: getpwnam is given a valid C string; the result is read at once, before any
    // other call that could overwrite its static buffer.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        bail!(
            "running as root, the embedded PostgreSQL must run as the '{SUPERUSER}' system user, \
             and there is none (the postgresql package creates it)"
        );
    }
    // SAFETY: pw is non-null and points to a valid passwd entry.
    let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    Ok(Some((uid, gid)))
}

/// Makes `cmd` run as `user` (when given) and, with `die_with_parent`, receive SIGQUIT
/// (immediate shutdown) when the thread that spawned it exits.
fn configure_child(cmd: &mut Command, user: Option<(u32, u32)>, die_with_parent: bool) {
    // SAFETY: the closure only makes async-signal-safe system calls (setgroups, setgid,
    // setuid, prctl) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if let Some((uid, gid)) = user
                && (libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0)
            {
                return Err(std::io::Error::last_os_error());
            }
            // After setuid: a change of credentials clears the parent-death signal.
            if die_with_parent && libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn chown(path: &Path, user: Option<(u32, u32)>) -> anyhow::Result<()> {
    if let Some((uid, gid)) = user {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .with_context(|| format!("chown {}", path.display()))?;
    }
    Ok(())
}

/// Whether the `postgres` user can reach `dir` (every ancestor searchable by others or owned
/// by that user). Root may be able to reach paths the server cannot, e.g. under /root.
fn reachable_by(dir: &Path, user: Option<(u32, u32)>) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some((uid, _)) = user else { return true };
    dir.ancestors().skip(1).all(|a| match fs::metadata(a) {
        Ok(m) => m.uid() == uid || m.mode() & 0o001 != 0,
        Err(_) => false,
    })
}

/// A short, stable, private directory under /tmp for things that cannot live in `dir`.
fn fallback_dir(dir: &Path, what: &str) -> PathBuf {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(dir.as_os_str().as_encoded_bytes());
    PathBuf::from(format!("/tmp/roster-{what}-{}", &hex::encode(digest)[..12]))
}

/// The cluster's data directory for `dir` (canonical): `dir/pgdata` unless the postgres user
/// cannot get there.
fn pgdata_of(dir: &Path, user: Option<(u32, u32)>) -> PathBuf {
    if reachable_by(&dir.join("pgdata"), user) {
        dir.join("pgdata")
    } else {
        fallback_dir(dir, "pgdata")
    }
}

/// A connection string for `dbname` as the superuser, over the socket in `socket_dir`.
fn connection_string(socket_dir: &Path, port: &str, dbname: &str) -> String {
    format!(
        "host={} port={port} user={SUPERUSER} dbname={dbname}",
        socket_dir.display()
    )
}

/// A cluster already running in `dir` (under `roster serve`): its pid and a connection
/// string for `dbname`. `None` when none runs there, or only a stale pid file of one that
/// died. Waits up to 10 s for one that is starting.
pub fn running(dir: &Path, dbname: &str) -> anyhow::Result<Option<(i32, String)>> {
    let Ok(dir) = dir.canonicalize() else {
        return Ok(None);
    };
    let pid_file = pgdata_of(&dir, drop_privileges_to()?).join("postmaster.pid");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // Lines: pid, data directory, start time, port, socket directory, listen address,
        // shared memory key, status.
        let Ok(text) = fs::read_to_string(&pid_file) else {
            return Ok(None);
        };
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        let Some(pid) = lines.first().and_then(|l| l.parse::<i32>().ok()) else {
            return Ok(None);
        };
        // SAFETY: signal 0 only checks that the process exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
        let (Some(port), Some(socket_dir)) = (lines.get(3), lines.get(4)) else {
            return Ok(None);
        };
        // A server killed outright leaves its pid file and socket behind, and its pid may
        // belong to another process by now (a container restarted): only a socket that
        // accepts a connection proves a live server.
        let socket = Path::new(socket_dir).join(format!(".s.PGSQL.{port}"));
        if !alive || std::os::unix::net::UnixStream::connect(&socket).is_err() {
            return Ok(None);
        }
        if lines.get(7) == Some(&"ready") {
            return Ok(Some((
                pid,
                connection_string(Path::new(socket_dir), port, dbname),
            )));
        }
        if Instant::now() > deadline {
            bail!(
                "the embedded PostgreSQL in {} (pid {pid}) did not become ready within 10 s",
                dir.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl EmbeddedPostgres {
    /// Initialises the cluster in `opts.dir` on first use, then starts it and waits until it
    /// accepts connections. Blocking: call it from `spawn_blocking` or a plain thread.
    pub fn start(opts: &EmbeddedOptions) -> anyhow::Result<Self> {
        let bin = find_bin_dir().ok_or_else(|| anyhow::anyhow!(NO_BINARIES_HELP))?;
        let user = drop_privileges_to()?;
        fs::create_dir_all(&opts.dir)
            .with_context(|| format!("creating {}", opts.dir.display()))?;
        let dir = opts.dir.canonicalize()?;
        if let Some((pid, _)) = running(&dir, "postgres")? {
            bail!(
                "the private PostgreSQL in {} is already running (pid {pid}), most likely under \
                 another `roster serve`; stop that one, or give this one another --data-dir",
                dir.display()
            );
        }

        // The cluster itself: in dir/pgdata unless the postgres user cannot get there.
        let pgdata = pgdata_of(&dir, user);
        if pgdata != dir.join("pgdata") {
            tracing::info!(
                path = %pgdata.display(),
                "the postgres user cannot reach the data directory; keeping the cluster here"
            );
        }
        // Unix socket paths are limited to 107 bytes.
        let socket_dir =
            if dir.join("run").as_os_str().len() < 80 && reachable_by(&dir.join("run"), user) {
                dir.join("run")
            } else {
                fallback_dir(&dir, "run")
            };
        for d in [&pgdata, &socket_dir] {
            fs::create_dir_all(d)?;
            fs::set_permissions(d, fs::Permissions::from_mode(0o700))?;
            chown(d, user)?;
        }
        let log_path = if reachable_by(&dir.join("postgres.log"), user) {
            dir.join("postgres.log")
        } else {
            pgdata.with_extension("log")
        };

        if !pgdata.join("PG_VERSION").is_file() {
            let out = {
                let mut cmd = Command::new(bin.join("initdb"));
                cmd.arg("-D")
                    .arg(&pgdata)
                    .args([
                        "-U",
                        SUPERUSER,
                        "--auth=trust",
                        "-E",
                        "UTF8",
                        "--locale=C.UTF-8",
                    ])
                    .stdin(Stdio::null());
                configure_child(&mut cmd, user, false);
                cmd.output().context("running initdb")?
            };
            if !out.status.success() {
                bail!(
                    "initdb failed: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        // A previous server of ours that died without cleaning up leaves a stale pid file;
        // postgres itself detects that case and starts anyway.
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        chown(&log_path, user)?;
        let mut cmd = Command::new(bin.join("postgres"));
        cmd.arg("-D")
            .arg(&pgdata)
            .arg("-k")
            .arg(&socket_dir)
            .args([
                "-p",
                &PORT.to_string(),
                "-c",
                "listen_addresses=",
                "-c",
                "max_connections=300",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if opts.unsafe_fast {
            cmd.args(["-c", "fsync=off", "-c", "synchronous_commit=off"]);
            cmd.args(["-c", "full_page_writes=off", "-c", "shared_buffers=64MB"]);
        }
        configure_child(&mut cmd, user, true);

        // The spawning thread must outlive the server (the death signal is tied to it), so it
        // spawns and then waits for the server to exit.
        let (pid_tx, pid_rx) = mpsc::channel::<std::io::Result<i32>>();
        let (exit_tx, exited) = mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("embedded-postgres".into())
            .spawn(move || match cmd.spawn() {
                Ok(mut child) => {
                    let _ = pid_tx.send(Ok(child.id() as i32));
                    let _ = child.wait();
                    let _ = exit_tx.send(());
                }
                Err(e) => {
                    let _ = pid_tx.send(Err(e));
                }
            })?;
        let pid = pid_rx.recv()?.context("starting postgres")?;
        let pg = EmbeddedPostgres {
            pid,
            socket_dir,
            log_path,
            exited: Mutex::new(exited),
        };
        pg.wait_ready(&pgdata)?;
        Ok(pg)
    }

    /// Waits for postmaster.pid to say "ready", or for the server to die.
    fn wait_ready(&self, pgdata: &Path) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self
                .exited
                .lock()
                .map(|r| r.try_recv().is_ok())
                .unwrap_or(false)
            {
                bail!("postgres exited during start-up: {}", self.log_tail());
            }
            if let Ok(f) = fs::File::open(pgdata.join("postmaster.pid")) {
                let lines: Vec<String> = BufReader::new(f).lines().map_while(Result::ok).collect();
                let ours = lines
                    .first()
                    .is_some_and(|l| l.trim() == self.pid.to_string());
                if ours && lines.get(7).is_some_and(|l| l.trim() == "ready") {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "postgres did not become ready within 60s: {}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// A connection string for `dbname` as the superuser.
    pub fn connection_string(&self, dbname: &str) -> String {
        connection_string(&self.socket_dir, &PORT.to_string(), dbname)
    }

    /// Fast shutdown (SIGINT: abort sessions, checkpoint, exit), waiting up to 30 s.
    pub fn stop(self) {
        // SAFETY: kill with a pid we spawned and a valid signal.
        unsafe { libc::kill(self.pid, libc::SIGINT) };
        let Ok(exited) = self.exited.into_inner() else {
            return;
        };
        if exited.recv_timeout(Duration::from_secs(30)).is_err() {
            // SAFETY: as above.
            unsafe { libc::kill(self.pid, libc::SIGQUIT) };
            let _ = exited.recv_timeout(Duration::from_secs(10));
        }
    }
}

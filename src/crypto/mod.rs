//! Password hashing on a bounded pool off the async runtime, the accepted hash formats, and the
//! password policy.
//!
//! argon2id costs tens of milliseconds of CPU and ~19 MiB per call: run inline on the async
//! runtime it would stall every other RPC. [`Hasher`] owns `workers` threads of its own, at a
//! lower priority, that take hashes from one queue, so a sign-in flood queues here while
//! lookups keep being served; a thread that finishes a hash starts the next queued one at
//! once, without a wake-up in between. Each running hash borrows a memory buffer from a small
//! free list instead of allocating (and page-faulting) tens of MiB per call.
pub mod breached;
pub mod codes;
pub mod formats;
pub mod policy;
pub mod rotation;
pub mod seal;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use argon2::password_hash::{Output, PasswordHash, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};

pub use formats::{ACCEPTED_HASH_FORMATS, Format};

use crate::error::{Error, Result};

/// The outcome of checking a password against a stored hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified {
    /// The password matches.
    pub ok: bool,
    /// The hash is in a legacy format or weaker than the current argon2id parameters, so it
    /// should be replaced after a successful sign-in. `from` names its algorithm.
    pub outdated: Option<&'static str>,
}

/// What the blocking workers share.
struct Engine {
    params: Params,
    /// Free argon2 buffers; at most one per worker is kept.
    buffers: Mutex<Vec<Vec<Block>>>,
    keep_buffers: usize,
}

impl Engine {
    fn with_buffer<T>(&self, f: impl FnOnce(&mut Vec<Block>) -> T) -> T {
        let taken = self.buffers.lock().ok().and_then(|mut b| b.pop());
        let mut buf = taken.unwrap_or_default();
        let out = f(&mut buf);
        // Keep buffers of the current size only: one grown for a costlier imported hash is
        // dropped rather than pinned.
        if buf.len() <= self.params.block_count()
            && let Ok(mut free) = self.buffers.lock()
            && free.len() < self.keep_buffers
        {
            free.push(buf);
        }
        out
    }

    fn hash(&self, password: &[u8]) -> anyhow::Result<String> {
        let salt = SaltString::generate(&mut rand::rngs::OsRng);
        let mut salt_buf = [0u8; 64];
        let salt_bytes = salt
            .decode_b64(&mut salt_buf)
            .map_err(|e| anyhow::anyhow!("salt: {e}"))?;
        let argon2 = Argon2::new(Algorithm::Argon2id, Version::V0x13, self.params.clone());
        let len = self
            .params
            .output_len()
            .unwrap_or(Params::DEFAULT_OUTPUT_LEN);
        let need = self.params.block_count();
        let output = self.with_buffer(|blocks| {
            if blocks.len() < need {
                blocks.resize(need, Block::default());
            }
            Output::init_with(len, |out| {
                argon2
                    .hash_password_into_with_memory(password, salt_bytes, out, &mut blocks[..need])
                    .map_err(|_| argon2::password_hash::Error::Crypto)
            })
        });
        let output = output.map_err(|e| anyhow::anyhow!("argon2: {e}"))?;
        let phc = PasswordHash {
            algorithm: Algorithm::Argon2id.ident(),
            version: Some(Version::V0x13.into()),
            params: (&self.params)
                .try_into()
                .map_err(|e| anyhow::anyhow!("argon2 params: {e}"))?,
            salt: Some(salt.as_salt()),
            hash: Some(output),
        };
        Ok(phc.to_string())
    }

    fn verify(&self, password: &[u8], hash: &str) -> anyhow::Result<Verified> {
        let format = formats::parse(hash).map_err(|e| anyhow::anyhow!("stored hash {e}"))?;
        let ok = self.with_buffer(|blocks| formats::verify(&format, hash, password, blocks))?;
        Ok(Verified {
            ok,
            outdated: self.is_outdated(&format).then(|| format.name()),
        })
    }

    /// Legacy formats, other argon2 variants and versions, and argon2id below the current
    /// memory, iterations, parallelism or output length are all worth replacing.
    fn is_outdated(&self, format: &Format<'_>) -> bool {
        match format {
            Format::Argon2 {
                phc,
                algorithm,
                version,
                params,
            } => {
                let cur = &self.params;
                let out_len = phc.hash.map(|h| h.len()).unwrap_or(0);
                *algorithm != Algorithm::Argon2id
                    || *version != Version::V0x13
                    || params.m_cost() < cur.m_cost()
                    || params.t_cost() < cur.t_cost()
                    || params.p_cost() < cur.p_cost()
                    || out_len < cur.output_len().unwrap_or(Params::DEFAULT_OUTPUT_LEN)
            }
            _ => true,
        }
    }
}

/// How much lower than the rest of the process hashing threads run (a nice value).
const HASHING_NICENESS: i32 = 10;

/// The scheduler time slice asked for hashing threads (Linux 6.12+ EEVDF custom slices; the
/// smallest the kernel accepts). With the default slice a woken thread (a runtime worker,
/// PostgreSQL) could wait up to a few ms for the hash running on its core, niced or not.
const HASHING_SLICE_NS: u64 = 100_000;

/// `struct sched_attr` (the first version, 48 bytes), which the libc crate does not define.
#[repr(C)]
struct SchedAttr {
    size: u32,
    sched_policy: u32,
    sched_flags: u64,
    sched_nice: i32,
    sched_priority: u32,
    sched_runtime: u64,
    sched_deadline: u64,
    sched_period: u64,
}

/// Lowers the calling thread's scheduling priority (a hashing thread's, at its start): when
/// argon2 saturates the cores, threads serving other RPCs (and PostgreSQL) still get the CPU
/// as soon as they wake, so a sign-in flood costs everyone else little latency. Hashing loses
/// nothing when nothing else wants the CPU, and keeps a nice-10 share when something does
/// (not SCHED_IDLE, under which a busy server would all but stop signing users in). On Linux
/// both are per thread.
fn lower_thread_priority() {
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        sched_policy: libc::SCHED_OTHER as u32,
        sched_flags: 0,
        sched_nice: HASHING_NICENESS,
        sched_priority: 0,
        sched_runtime: HASHING_SLICE_NS,
        sched_deadline: 0,
        sched_period: 0,
    };
    // SAFETY: sched_setattr reads `attr`, which outlives the call and is laid out as the
    // kernel's struct; gettid has no preconditions; setpriority only reads its arguments.
    // Kernels before 6.12 ignore the slice; where sched_setattr fails (e.g. a seccomp filter)
    // only the nice value is set, and a failure of that leaves the priority as it was.
    unsafe {
        // pid 0: this thread.
        if libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) != 0 {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            libc::setpriority(libc::PRIO_PROCESS, tid, HASHING_NICENESS);
        }
    }
}

/// The argon2id parameters for new hashes, refused above the bounds every stored hash is
/// verified within (the same as for imported hashes): a hash made above them could never be
/// checked, so every sign-in would fail. Bounds come before argon2's own validation, which
/// overflows on a huge parallelism.
pub fn argon2_params(memory_kib: u32, iterations: u32, parallelism: u32) -> anyhow::Result<Params> {
    if let Some((what, value, max)) =
        formats::argon2_over_bound(memory_kib, iterations, parallelism)
    {
        anyhow::bail!(
            "argon2 {what} must be at most {max} (the bound on stored hashes), not {value}"
        );
    }
    Params::new(memory_kib, iterations, parallelism, None)
        .map_err(|e| anyhow::anyhow!("invalid argon2 parameters: {e}"))
}

/// A queued hash: runs on a hashing thread.
type Job = Box<dyn FnOnce(&Engine) + Send>;

/// Hashes and verifies passwords on a bounded pool of threads of its own, off the async
/// runtime. The threads end when the `Hasher` is dropped (after the hash they are running).
pub struct Hasher {
    jobs: mpsc::Sender<Job>,
    /// Hashes queued and not yet started.
    waiting: Arc<AtomicUsize>,
    /// A hash of a random password at the current parameters: unknown logins are checked
    /// against it so they cost what a wrong password costs.
    dummy: Arc<str>,
}

impl Hasher {
    pub fn new(
        workers: usize,
        memory_kib: u32,
        iterations: u32,
        parallelism: u32,
    ) -> anyhow::Result<Self> {
        let params = argon2_params(memory_kib, iterations, parallelism)?;
        let workers = workers.max(1);
        let engine = Arc::new(Engine {
            params,
            buffers: Mutex::new(Vec::new()),
            keep_buffers: workers,
        });
        let random: [u8; 32] = rand::random();
        let dummy = engine.hash(&random)?.into();
        let (jobs, queue) = mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        for i in 0..workers {
            let (queue, engine) = (queue.clone(), engine.clone());
            std::thread::Builder::new()
                .name(format!("roster-hash-{i}"))
                .spawn(move || {
                    lower_thread_priority();
                    loop {
                        // One idle thread waits on the queue, the others on the lock.
                        let job = match queue.lock() {
                            Ok(q) => q.recv(),
                            Err(_) => return,
                        };
                        let Ok(job) = job else {
                            return; // the Hasher is gone
                        };
                        // A panic fails that call only (its caller sees the result dropped);
                        // the thread keeps serving.
                        let run = std::panic::AssertUnwindSafe(|| job(&engine));
                        let _ = std::panic::catch_unwind(run);
                    }
                })?;
        }
        Ok(Hasher {
            jobs,
            waiting: Arc::new(AtomicUsize::new(0)),
            dummy,
        })
    }

    /// Calls waiting for a hashing worker right now (for logs and metrics).
    pub fn queue_depth(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Runs `f` on a hashing thread once one is free. A caller that gives up while its hash
    /// is queued (a deadline, a disconnect) costs no hashing.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Engine) -> anyhow::Result<T> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let waiting = self.waiting.clone();
        let queued = waiting.fetch_add(1, Ordering::Relaxed) + 1;
        if queued > 1 {
            tracing::debug!(queue_depth = queued, "waiting for a hashing worker");
        }
        let job: Job = Box::new(move |engine| {
            waiting.fetch_sub(1, Ordering::Relaxed);
            if !tx.is_closed() {
                let _ = tx.send(f(engine));
            }
        });
        if self.jobs.send(job).is_err() {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            return Err(Error::internal(anyhow::anyhow!(
                "the hashing threads are gone"
            )));
        }
        rx.await
            .map_err(|_| Error::internal(anyhow::anyhow!("a hash failed without a result")))?
            .map_err(Error::internal)
    }

    /// A new argon2id PHC string for `password`.
    pub async fn hash(&self, password: String) -> Result<String> {
        self.run(move |e| e.hash(password.as_bytes())).await
    }

    /// Checks `password` against `hash`; with no hash (unknown login, user without a password)
    /// it checks against the dummy hash and answers "no" at the same cost.
    pub async fn verify(&self, password: String, hash: Option<String>) -> Result<Verified> {
        let known = hash.is_some();
        let hash: Arc<str> = hash.map(Arc::from).unwrap_or_else(|| self.dummy.clone());
        let v = self
            .run(move |e| e.verify(password.as_bytes(), &hash))
            .await?;
        Ok(if known {
            v
        } else {
            Verified {
                ok: false,
                outdated: None,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hasher() -> Hasher {
        // Small parameters: these tests are about formats, not cost.
        Hasher::new(2, 1024, 2, 1).unwrap()
    }

    #[tokio::test]
    async fn new_hashes_are_argon2id_and_verify() {
        let h = hasher();
        let hash = h.hash("correct horse".into()).await.unwrap();
        assert!(hash.starts_with("$argon2id$v=19$m=1024,t=2,p=1$"), "{hash}");
        let right = h.verify("correct horse".into(), Some(hash.clone())).await;
        assert_eq!(
            right.unwrap(),
            Verified {
                ok: true,
                outdated: None
            }
        );
        let wrong = h.verify("wrong horse".into(), Some(hash)).await.unwrap();
        assert!(!wrong.ok);
        let unknown = h.verify("correct horse".into(), None).await.unwrap();
        assert!(!unknown.ok);
    }

    #[tokio::test]
    async fn parameters_are_bounded_as_stored_hashes_are() {
        // At the bounds: what it hashes, it verifies.
        let (t, p) = (
            formats::MAX_ARGON2_ITERATIONS,
            formats::MAX_ARGON2_PARALLELISM,
        );
        let edge = Hasher::new(1, 8 * p, t, p).unwrap();
        let hash = edge.hash("correct horse".into()).await.unwrap();
        let v = edge.verify("correct horse".into(), Some(hash)).await;
        assert!(v.unwrap().ok);
        for (m, t, p, named) in [
            (formats::MAX_ARGON2_MEMORY_KIB + 1, 2, 1, "memory cost"),
            (1024, formats::MAX_ARGON2_ITERATIONS + 1, 1, "iterations"),
            (1024, 2, 1_888_888_888, "parallelism"),
        ] {
            let err = Hasher::new(1, m, t, p).err().expect("refused").to_string();
            assert!(err.contains(named), "{err}");
        }
    }

    #[tokio::test]
    async fn hashing_threads_run_niced_with_a_short_slice() {
        let (nice, slice) = hasher()
            .run(|_| {
                let mut attr = std::mem::MaybeUninit::<SchedAttr>::zeroed();
                let size = std::mem::size_of::<SchedAttr>() as u32;
                // SAFETY: the kernel writes at most `size` bytes into `attr`.
                let r = unsafe {
                    libc::syscall(libc::SYS_sched_getattr, 0, attr.as_mut_ptr(), size, 0)
                };
                assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
                // SAFETY: zeroed, then filled by the kernel: every field is an integer.
                let attr = unsafe { attr.assume_init() };
                Ok((attr.sched_nice, attr.sched_runtime))
            })
            .await
            .unwrap();
        assert_eq!(nice, HASHING_NICENESS);
        // Kernels before 6.12 report no slice for fair-class threads.
        if slice != 0 {
            assert_eq!(slice, HASHING_SLICE_NS);
        }
    }

    #[tokio::test]
    async fn a_call_given_up_while_queued_costs_no_hashing() {
        let h = Arc::new(Hasher::new(1, 1024, 1, 1).unwrap());
        // The one worker is busy from `started` until `release` is sent.
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let (started, running) = tokio::sync::oneshot::channel::<()>();
        let busy = tokio::spawn({
            let h = h.clone();
            async move {
                h.run(move |_| {
                    let _ = started.send(());
                    wait.recv().ok();
                    Ok(())
                })
                .await
            }
        });
        running.await.unwrap();
        let ran = Arc::new(AtomicUsize::new(0));
        let queued = {
            let ran = ran.clone();
            h.run(move |_| {
                ran.fetch_add(1, Ordering::SeqCst);
                Ok(())
            })
        };
        let gave_up = tokio::time::timeout(std::time::Duration::from_millis(50), queued).await;
        assert!(gave_up.is_err(), "the queued call should still be waiting");
        assert_eq!(h.queue_depth(), 1);
        release.send(()).unwrap();
        busy.await.unwrap().unwrap();
        // The next call runs after the abandoned one was taken off the queue, and skipped.
        h.run(|_| Ok(())).await.unwrap();
        assert_eq!(ran.load(Ordering::SeqCst), 0);
        assert_eq!(h.queue_depth(), 0);
    }

    #[tokio::test]
    async fn a_panicking_hash_fails_its_call_only() {
        let h = Hasher::new(1, 1024, 1, 1).unwrap();
        let failed = h.run(|_| -> anyhow::Result<()> { panic!("boom") }).await;
        assert!(failed.is_err());
        // The same (only) thread still hashes.
        let hash = h.hash("correct horse".into()).await.unwrap();
        assert!(
            h.verify("correct horse".into(), Some(hash))
                .await
                .unwrap()
                .ok
        );
    }

    #[tokio::test]
    async fn weaker_argon2_is_outdated() {
        let weak = Hasher::new(1, 512, 1, 1).unwrap();
        let hash = weak.hash("correct horse".into()).await.unwrap();
        let v = hasher()
            .verify("correct horse".into(), Some(hash))
            .await
            .unwrap();
        assert_eq!(
            v,
            Verified {
                ok: true,
                outdated: Some("argon2id")
            }
        );
    }
}

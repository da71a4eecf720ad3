//! The log line writer: callers append finished lines to a shared buffer, and a thread of its
//! own writes the buffer out in batches.
//!
//! Every call logs a line, so the per-line cost matters: a channel to a writer thread (what
//! tracing-appender does) wakes that thread for each line, about a tenth of a GetUser's server
//! CPU at info level. Here a caller only copies its line under a short lock; the writer wakes
//! when the buffer goes from empty to not empty, then lets lines gather for a few
//! milliseconds, so a busy server writes thousands of lines per write(2) and wakes the writer
//! a few hundred times a second at most. Lines reach stderr at most [`GATHER`] late.
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long the writer lets lines gather after waking.
pub const GATHER: Duration = Duration::from_millis(5);
/// Beyond this many unwritten bytes (stderr blocked, or far slower than the lines come),
/// lines are dropped and counted rather than calls slowed or memory grown.
const MAX_PENDING: usize = 4 << 20;

#[derive(Default)]
struct Pending {
    buf: Vec<u8>,
    dropped: u64,
    closed: bool,
}

struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // Poisoned by a panic mid-copy: at worst that one line is cut short; keep logging.
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The `MakeWriter` for the fmt layer: cheap to clone, one per subscriber.
#[derive(Clone)]
pub struct LogSink(Arc<Shared>);

/// Stops the writer thread after it has written every line appended before; dropping it does
/// the same.
pub struct LogGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// Starts the writer thread over `out`.
pub fn spawn(out: impl Write + Send + 'static) -> std::io::Result<(LogSink, LogGuard)> {
    let shared = Arc::new(Shared {
        pending: Mutex::new(Pending::default()),
        wake: Condvar::new(),
    });
    let thread = std::thread::Builder::new()
        .name("roster-log".into())
        .spawn({
            let shared = shared.clone();
            move || run(&shared, out)
        })?;
    Ok((
        LogSink(shared.clone()),
        LogGuard {
            shared,
            thread: Some(thread),
        },
    ))
}

fn run(shared: &Shared, mut out: impl Write) {
    let mut spare = Vec::new();
    loop {
        {
            let mut p = shared.lock();
            while p.buf.is_empty() && !p.closed {
                p = shared
                    .wake
                    .wait(p)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            if p.buf.is_empty() && p.closed {
                return;
            }
            if !p.closed {
                // Let more lines join this write.
                drop(p);
                std::thread::sleep(GATHER);
                p = shared.lock();
            }
            std::mem::swap(&mut p.buf, &mut spare);
            if p.dropped > 0 {
                let note = format!(
                    "roster: {} log lines dropped (stderr too slow)\n",
                    p.dropped
                );
                spare.extend_from_slice(note.as_bytes());
                p.dropped = 0;
            }
        }
        // Nothing useful can be done when stderr fails; the lines are gone either way.
        let _ = out.write_all(&spare).and_then(|()| out.flush());
        spare.clear();
        // A burst must not pin a huge buffer for the life of the process.
        spare.shrink_to(256 * 1024);
    }
}

impl Write for LogSink {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let mut p = self.0.lock();
        if p.buf.len() + line.len() > MAX_PENDING {
            p.dropped += 1;
            return Ok(line.len());
        }
        let was_empty = p.buf.is_empty();
        p.buf.extend_from_slice(line);
        drop(p);
        if was_empty {
            self.0.wake.notify_one();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogSink {
    type Writer = LogSink;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Write that appends to a shared Vec, counting its writes.
    #[derive(Clone, Default)]
    struct Out(Arc<Mutex<(Vec<u8>, usize)>>);

    impl Write for Out {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let mut o = self.0.lock().unwrap();
            o.0.extend_from_slice(b);
            o.1 += 1;
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_from_many_threads_arrive_whole_in_few_writes_and_all_by_the_guard() {
        let out = Out::default();
        let (sink, guard) = spawn(out.clone()).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let mut sink = sink.clone();
                std::thread::spawn(move || {
                    for i in 0..5000 {
                        sink.write_all(format!("thread {t} line {i}\n").as_bytes())
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(guard);
        let (bytes, writes) = out.0.lock().unwrap().clone();
        let text = String::from_utf8(bytes).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines.len(),
            20_000,
            "every line written by the time the guard drops"
        );
        for t in 0..4 {
            let mine: Vec<&str> = lines
                .iter()
                .copied()
                .filter(|l| l.starts_with(&format!("thread {t} ")))
                .collect();
            // Whole lines, in each thread's order.
            let want: Vec<String> = (0..5000).map(|i| format!("thread {t} line {i}")).collect();
            assert_eq!(mine, want);
        }
        assert!(
            writes < 1000,
            "{writes} writes for 20,000 lines: not batched"
        );
    }

    #[test]
    fn a_blocked_output_drops_lines_instead_of_growing_and_says_so() {
        /// Blocks its first write until released.
        struct Stuck(Arc<(Mutex<bool>, Condvar)>, Out);
        impl Write for Stuck {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                let (m, c) = &*self.0;
                let mut go = m.lock().unwrap();
                while !*go {
                    go = c.wait(go).unwrap();
                }
                self.1.write(b)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let out = Out::default();
        let (mut sink, guard) = spawn(Stuck(gate.clone(), out.clone())).unwrap();
        sink.write_all(b"first\n").unwrap();
        // Wait until the writer holds "first" (the buffer is empty again), stuck in write.
        while !sink.0.lock().buf.is_empty() {
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut line = vec![b'x'; 1023];
        line.push(b'\n');
        for _ in 0..(MAX_PENDING / 1024 + 100) {
            sink.write_all(&line).unwrap();
        }
        assert!(sink.0.lock().buf.len() <= MAX_PENDING);
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        drop(guard);
        let text = String::from_utf8(out.0.lock().unwrap().0.clone()).unwrap();
        assert!(text.starts_with("first\n"));
        assert!(
            text.contains(" log lines dropped (stderr too slow)"),
            "no drop note"
        );
        assert!(text.len() <= MAX_PENDING + 200);
    }
}

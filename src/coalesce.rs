//! Coalescing of concurrent calls into one database statement, with no timer and no task in
//! between: GetUser reads (`users::reads`) and CreateUser writes (`users::creates`).
//!
//! A statement costs PostgreSQL far more per statement (the bind, a snapshot, executor
//! start-up, a commit, a protocol round) than per row. A call that finds one of the `slots`
//! free goes at once, alone, so an idle server is as fast as without coalescing. Only when
//! every slot is busy does a call queue; a call finishing then hands its slot, with
//! everything queued by then (up to `max_batch` calls), to the first queued call, which does
//! the work for all of them and answers each. Every call's statement starts after the call
//! arrived, so a client reads its own acknowledged writes.
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::oneshot;

enum Message<T, R> {
    /// The answer, worked out by another call.
    Done(R),
    /// A slot, this call's own item back, and the calls queued after it: work for them too.
    Lead(Slot<T, R>, T, Vec<Waiter<T, R>>),
}

/// A queued call whose work another call took on: its item, and where its answer goes.
pub struct Waiter<T, R> {
    pub item: T,
    reply: oneshot::Sender<Message<T, R>>,
}

impl<T, R> Waiter<T, R> {
    /// Whether the caller has gone (deadline, cancel): it will take no answer.
    pub fn is_gone(&self) -> bool {
        self.reply.is_closed()
    }

    /// Answers the call (unless it has gone).
    pub fn answer(self, answer: R) {
        let _ = self.reply.send(Message::Done(answer));
    }
}

/// What a call entering the coalescer is to do.
pub enum Turn<T, R> {
    /// Another call did its work: the answer.
    Answered(R),
    /// Its turn, holding a slot until `slot` drops: do the work for `item` and for `others`
    /// (often none), and answer each of them.
    Lead {
        slot: Slot<T, R>,
        item: T,
        others: Vec<Waiter<T, R>>,
    },
    /// The call that took this one's work on went away (was cancelled) without answering.
    Orphaned,
}

struct Queue<T, R> {
    busy: usize,
    waiting: VecDeque<Waiter<T, R>>,
}

/// Admits calls carrying an item `T` and expecting an answer `R`.
pub struct Coalescer<T, R>(Arc<Inner<T, R>>);

struct Inner<T, R> {
    slots: usize,
    max_batch: usize,
    queue: Mutex<Queue<T, R>>,
    /// How many calls each turn worked for.
    sizes: Histogram,
}

impl<T, R> Coalescer<T, R> {
    /// Up to `slots` turns at once, each for up to `max_batch` calls (1: every call goes on
    /// its own at once, unbounded); `sizes` observes how many calls each turn worked for.
    pub fn new(slots: usize, max_batch: usize, sizes: Histogram) -> Self {
        Coalescer(Arc::new(Inner {
            slots: slots.max(1),
            max_batch: max_batch.max(1),
            queue: Mutex::new(Queue {
                busy: 0,
                waiting: VecDeque::new(),
            }),
            sizes,
        }))
    }

    /// Waits for this call's turn, or for another call to have done its work.
    pub async fn enter(&self, item: T) -> Turn<T, R> {
        let this = &self.0;
        if this.max_batch == 1 {
            let slot = Slot(None);
            let others = Vec::new();
            return Turn::Lead { slot, item, others };
        }
        let waiting = {
            let mut queue = this.lock();
            if queue.busy < this.slots {
                queue.busy += 1;
                Err(item)
            } else {
                let (reply, answer) = oneshot::channel();
                queue.waiting.push_back(Waiter { item, reply });
                Ok(answer)
            }
        };
        let (slot, item, others) = match waiting {
            Err(item) => (Slot(Some(this.clone())), item, Vec::new()),
            Ok(answer) => match answer.await {
                Ok(Message::Done(answer)) => return Turn::Answered(answer),
                Ok(Message::Lead(slot, item, others)) => (slot, item, others),
                Err(_) => return Turn::Orphaned,
            },
        };
        this.sizes.observe((others.len() + 1) as f64);
        Turn::Lead { slot, item, others }
    }
}

impl<T, R> Inner<T, R> {
    fn lock(&self) -> MutexGuard<'_, Queue<T, R>> {
        // Nothing panics while holding it; a poisoned queue is still consistent.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Passes a slot to the first queued call still listening, with the calls queued after
    /// it; frees the slot when none is queued.
    fn release(self: &Arc<Self>) {
        let mut queue = self.lock();
        while let Some(Waiter { item, reply }) = queue.waiting.pop_front() {
            let n = queue.waiting.len().min(self.max_batch - 1);
            let batch: Vec<Waiter<T, R>> = queue.waiting.drain(..n).collect();
            match reply.send(Message::Lead(Slot(Some(self.clone())), item, batch)) {
                Ok(()) => return,
                // That caller has gone: the others go back, in order, for the next one.
                Err(Message::Lead(mut slot, _, batch)) => {
                    // Still ours: dropping it armed would release under this lock.
                    slot.0 = None;
                    for w in batch.into_iter().rev() {
                        queue.waiting.push_front(w);
                    }
                }
                Err(Message::Done(_)) => {}
            }
        }
        queue.busy -= 1;
    }
}

/// A held slot; dropping it passes the slot on. A slot handed to a call that is cancelled
/// before it looks at it is dropped with the message, so it is passed on too.
pub struct Slot<T, R>(Option<Arc<Inner<T, R>>>);

impl<T, R> Drop for Slot<T, R> {
    fn drop(&mut self) {
        if let Some(inner) = self.0.take() {
            inner.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
    use tokio::task::JoinHandle;

    use super::{Coalescer, Turn};

    type C = Arc<Coalescer<u32, u32>>;

    fn coalescer(slots: usize, max_batch: usize) -> C {
        let sizes = Histogram::new(exponential_buckets(1.0, 2.0, 4));
        Arc::new(Coalescer::new(slots, max_batch, sizes))
    }

    /// What a call saw: answered with a value, led (its item and the items it worked for),
    /// or orphaned.
    #[derive(Debug, PartialEq)]
    enum Saw {
        Answered(u32),
        Led(u32, Vec<u32>),
        Orphaned,
    }

    /// A call that, when it leads, answers each call it works for with ten times its item.
    fn spawn_call(c: &C, item: u32) -> JoinHandle<Saw> {
        let c = c.clone();
        tokio::spawn(async move {
            match c.enter(item).await {
                Turn::Answered(v) => Saw::Answered(v),
                Turn::Lead { item, others, .. } => {
                    let items = others.iter().map(|w| w.item).collect();
                    for w in others {
                        let v = w.item * 10;
                        w.answer(v);
                    }
                    Saw::Led(item, items)
                }
                Turn::Orphaned => Saw::Orphaned,
            }
        })
    }

    /// Lets spawned calls run up to their queueing (the test runtime has one thread).
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn queued_calls_go_to_the_first_queued_up_to_the_batch_size() {
        let c = coalescer(1, 3);
        let Turn::Lead { slot, others, .. } = c.enter(1).await else {
            panic!("a free slot: the call goes at once")
        };
        assert!(others.is_empty());
        let calls: Vec<_> = (2..=5).map(|i| spawn_call(&c, i)).collect();
        settle().await;
        assert!(calls.iter().all(|h| !h.is_finished()), "all four queue");
        drop(slot);
        let mut saw = Vec::new();
        for h in calls {
            saw.push(h.await.unwrap());
        }
        assert_eq!(
            saw,
            [
                Saw::Led(2, vec![3, 4]),
                Saw::Answered(30),
                Saw::Answered(40),
                // Queued after the batch was full: led alone once 2's slot came free.
                Saw::Led(5, vec![]),
            ]
        );
        // Every slot is free again.
        assert!(matches!(c.enter(6).await, Turn::Lead { .. }));
    }

    #[tokio::test]
    async fn a_call_gone_before_its_turn_is_passed_over() {
        let c = coalescer(1, 8);
        let Turn::Lead { slot, .. } = c.enter(1).await else {
            panic!("a free slot")
        };
        let gone = spawn_call(&c, 2);
        let next = spawn_call(&c, 3);
        settle().await;
        gone.abort();
        settle().await;
        drop(slot);
        assert_eq!(next.await.unwrap(), Saw::Led(3, vec![]));
    }

    #[tokio::test]
    async fn a_leader_dropping_its_calls_orphans_them_and_frees_its_slot() {
        let c = coalescer(1, 8);
        let Turn::Lead { slot, .. } = c.enter(1).await else {
            panic!("a free slot")
        };
        let leader = {
            let c = c.clone();
            tokio::spawn(async move {
                // Takes the lead, then drops everything unanswered (as a cancelled call does).
                match c.enter(2).await {
                    Turn::Lead { others, .. } => others.len(),
                    _ => panic!("2 is first in the queue"),
                }
            })
        };
        let waiter = spawn_call(&c, 3);
        settle().await;
        drop(slot);
        assert_eq!(leader.await.unwrap(), 1);
        assert_eq!(waiter.await.unwrap(), Saw::Orphaned);
        assert!(matches!(c.enter(4).await, Turn::Lead { .. }));
    }

    #[tokio::test]
    async fn a_batch_size_of_one_lets_every_call_go_at_once() {
        let c = coalescer(1, 1);
        let first = c.enter(1).await;
        let second = spawn_call(&c, 2);
        assert_eq!(second.await.unwrap(), Saw::Led(2, vec![]));
        drop(first);
    }
}

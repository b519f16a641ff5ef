//! The job queue of one filter thread: proxy threads push, the filter thread pops.
//!
//! A filter thread is pinned to the CPU of the proxy threads that use it, so waking it
//! preempts the pusher at once. std's channel wakes the receiver while it still holds the
//! channel's lock: the woken thread then finds the lock taken by the thread it preempted,
//! sleeps again, and every job costs two extra context switches. Here a push wakes the thread
//! only after the lock is released.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::Thread;
use std::time::Duration;

use crate::worker::{Job, Reply};

#[derive(Default)]
pub(crate) struct JobQueue {
    jobs: Mutex<Jobs>,
    consumer: OnceLock<Thread>,
}

#[derive(Default)]
struct Jobs {
    queue: VecDeque<Job>,
    /// The thread has stopped: jobs are dropped (a waiting caller sees its reply channel
    /// closed).
    closed: bool,
}

impl JobQueue {
    fn jobs(&self) -> std::sync::MutexGuard<'_, Jobs> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `job` and wakes the filter thread.
    pub fn push(&self, job: Job) {
        self.push_quiet(job);
        if let Some(t) = self.consumer.get() {
            t.unpark();
        }
    }

    /// Queues `job` without waking the filter thread: it runs with the thread's next job or
    /// wake-up.
    pub fn push_quiet(&self, job: Job) {
        let mut jobs = self.jobs();
        if !jobs.closed {
            jobs.queue.push_back(job);
        }
    }

    /// The filter thread stops: drops what is queued and every later job.
    pub fn close(&self) {
        let dropped = {
            let mut jobs = self.jobs();
            jobs.closed = true;
            std::mem::take(&mut jobs.queue)
        };
        drop(dropped);
    }

    /// Called once by the filter thread, before its first [`Self::pop`].
    pub fn attach(&self) {
        let _ = self.consumer.set(std::thread::current());
    }

    pub fn pop(&self) -> Option<Job> {
        self.jobs().queue.pop_front()
    }

    /// Sleeps until a [`Self::push`] (one that came after the last `pop` found nothing
    /// included), `timeout`, or a spurious wake-up.
    pub fn wait(&self, timeout: Option<Duration>) {
        match timeout {
            Some(d) => std::thread::park_timeout(d),
            None => std::thread::park(),
        }
    }
}

/// A phase's reply, from the filter thread to the proxy thread blocked on it. Not tokio's
/// oneshot: polled from inside a task, that counts against the task's cooperative budget, and
/// once the budget is spent it defers its wake-up to the scheduler, which a blocked thread never
/// returns to.
pub(crate) fn reply_channel() -> (ReplyTx, ReplyRx) {
    let slot = Arc::new(Slot {
        state: Mutex::new(SlotState::Empty),
        waiter: std::thread::current(),
    });
    (ReplyTx(slot.clone()), ReplyRx(slot))
}

struct Slot {
    state: Mutex<SlotState>,
    /// The thread that made the channel, the one that waits.
    waiter: Thread,
}

enum SlotState {
    Empty,
    Full(Reply),
    /// The sender was dropped without a reply (the filter thread stopped).
    Closed,
}

impl Slot {
    fn state(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub(crate) struct ReplyTx(Arc<Slot>);

impl ReplyTx {
    pub fn send(self, reply: Reply) {
        *self.0.state() = SlotState::Full(reply);
        // Drop wakes the waiter, after the lock is released.
    }
}

impl Drop for ReplyTx {
    fn drop(&mut self) {
        {
            let mut state = self.0.state();
            if matches!(*state, SlotState::Empty) {
                *state = SlotState::Closed;
            }
        }
        self.0.waiter.unpark();
    }
}

pub(crate) struct ReplyRx(Arc<Slot>);

impl ReplyRx {
    /// The reply, or `None` when the filter thread dropped the job.
    ///
    /// `local`: the filter thread is pinned to the CPU this thread runs on. Then this thread
    /// yields the CPU to it rather than sleeping: a sleeping thread is woken wherever the
    /// scheduler finds an idle CPU, and the next phase would cross CPUs; a yielding one stays
    /// put and needs no wake-up at all. Otherwise it polls for a moment (the reply may come
    /// from another CPU within microseconds). Either way it sleeps once [`YIELD_FOR`] or
    /// [`SPIN_FOR`] has passed, so a long callback does not keep this thread busy.
    pub fn recv(self, local: bool) -> Option<Reply> {
        let busy_until = std::time::Instant::now() + if local { YIELD_FOR } else { SPIN_FOR };
        loop {
            match std::mem::replace(&mut *self.0.state(), SlotState::Empty) {
                SlotState::Full(reply) => return Some(reply),
                SlotState::Closed => return None,
                SlotState::Empty => {}
            }
            if std::time::Instant::now() >= busy_until {
                std::thread::park();
            } else if local {
                // SAFETY: no arguments.
                unsafe { libc::sched_yield() };
            } else {
                std::hint::spin_loop();
            }
        }
    }
}

/// How long a proxy thread yields its CPU to the filter thread pinned there before it sleeps.
const YIELD_FOR: Duration = Duration::from_micros(50);
/// How long a proxy thread polls for the reply of a filter thread on another CPU before it
/// sleeps.
const SPIN_FOR: Duration = Duration::from_micros(10);

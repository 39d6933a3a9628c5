//! Shared state that background threads update and tests wait on, from
//! sync code (a condition variable) or async code (a watch channel).
//!
//! Both wake-up paths are fed by the same [`Watched::update`], so one waiting
//! predicate serves `wait_*` and `wait_*_async` methods alike.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::watch;

pub(crate) struct Watched<T> {
    state: Mutex<T>,
    cond: Condvar,
    generation: watch::Sender<u64>,
}

impl<T> Watched<T> {
    pub(crate) fn new(state: T) -> Self {
        Watched {
            state: Mutex::new(state),
            cond: Condvar::new(),
            generation: watch::Sender::new(0),
        }
    }

    /// Locks the state. A panic in another test thread while it held the
    /// lock must not cascade, so poisoning is ignored.
    pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes the state and wakes every waiter.
    pub(crate) fn update<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        let r = f(&mut self.lock());
        self.notify();
        r
    }

    pub(crate) fn notify(&self) {
        self.cond.notify_all();
        self.generation.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// Blocks until `f` returns `Some` or `timeout` passes.
    pub(crate) fn wait<R>(
        &self,
        timeout: Duration,
        mut f: impl FnMut(&mut T) -> Option<R>,
    ) -> Option<R> {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            if let Some(r) = f(&mut state) {
                return Some(r);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            state = self
                .cond
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Like [`Watched::wait`], without blocking the caller's runtime.
    pub(crate) async fn wait_async<R>(
        &self,
        timeout: Duration,
        mut f: impl FnMut(&mut T) -> Option<R>,
    ) -> Option<R> {
        // Subscribing before the first check means no update between the
        // check and the await is missed.
        let mut rx = self.generation.subscribe();
        let waiting = async {
            loop {
                let found = f(&mut self.lock());
                if let Some(r) = found {
                    return r;
                }
                if rx.changed().await.is_err() {
                    // Unreachable while `self` holds the sender; never spin.
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::time::timeout(timeout, waiting).await.ok()
    }
}

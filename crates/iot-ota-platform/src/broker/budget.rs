//! The bound on what incomplete packets may hold, across all connections.
//!
//! Every connection holds a [`Ticket`]. While its read buffer holds part of
//! a packet, the ticket holds those bytes from the one [`Budget`]; when the
//! total passes the limit, the connection whose incomplete packet began
//! first (the oldest offender: the one that has held memory longest) is told
//! to close. A client that opens thousands of connections and half-sends a
//! 1 MiB packet on each then costs the broker at most the limit, and the
//! devices that finish their packets keep being served.
//!
//! No clock: "first" is the order in which incomplete packets began (a
//! sequence number), which is what the limit needs.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// The shared bound.
#[derive(Debug)]
pub(super) struct Budget {
    limit: usize,
    used: AtomicUsize,
    next: AtomicU64,
    /// Holders of incomplete packets, oldest first: (since, its eviction).
    holders: Mutex<BTreeMap<u64, Arc<Notify>>>,
    /// Connections closed by the bound.
    pub(super) evicted: AtomicU64,
}

impl Budget {
    /// A budget of `limit` bytes.
    pub(super) fn new(limit: usize) -> Budget {
        Budget {
            limit,
            used: AtomicUsize::new(0),
            next: AtomicU64::new(0),
            holders: Mutex::new(BTreeMap::new()),
            evicted: AtomicU64::new(0),
        }
    }

    /// Bytes held now.
    pub(super) fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn holders(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<Notify>>> {
        self.holders.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A connection's ticket; `evict` is notified when it must close.
    pub(super) fn ticket(self: &Arc<Budget>, evict: Arc<Notify>) -> Ticket {
        Ticket {
            budget: self.clone(),
            evict,
            held: 0,
            since: None,
        }
    }
}

/// One connection's share of the [`Budget`].
#[derive(Debug)]
pub(super) struct Ticket {
    budget: Arc<Budget>,
    evict: Arc<Notify>,
    held: usize,
    /// When its incomplete packet began (in the budget's order).
    since: Option<u64>,
}

impl Ticket {
    /// The connection now holds `bytes` of an incomplete packet (0: none).
    /// `Err` when the limit is passed and this connection is the oldest
    /// offender: close it. (When another is older, that one is told, and
    /// this one goes on.)
    pub(super) fn hold(&mut self, bytes: usize) -> Result<(), String> {
        let b = &self.budget;
        if bytes >= self.held {
            b.used.fetch_add(bytes - self.held, Ordering::Relaxed);
        } else {
            b.used.fetch_sub(self.held - bytes, Ordering::Relaxed);
        }
        self.held = bytes;
        match (bytes, self.since) {
            (0, Some(since)) => {
                b.holders().remove(&since);
                self.since = None;
            }
            (1.., None) => {
                let since = b.next.fetch_add(1, Ordering::Relaxed);
                b.holders().insert(since, self.evict.clone());
                self.since = Some(since);
            }
            _ => {}
        }
        if b.used() <= b.limit {
            return Ok(());
        }
        let oldest = b.holders().pop_first();
        match oldest {
            Some((since, _)) if Some(since) == self.since => {
                self.since = None;
                b.evicted.fetch_add(1, Ordering::Relaxed);
                Err(format!(
                    "incomplete packets hold more than {} bytes: this one began first",
                    b.limit
                ))
            }
            Some((_, evict)) => {
                b.evicted.fetch_add(1, Ordering::Relaxed);
                evict.notify_one();
                Ok(())
            }
            None => Ok(()),
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let _ = self.hold(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_incomplete_packet_is_closed_first() {
        let budget = Arc::new(Budget::new(100));
        let kicks: Vec<Arc<Notify>> = (0..3).map(|_| Arc::new(Notify::new())).collect();
        let mut t: Vec<Ticket> = kicks.iter().map(|k| budget.ticket(k.clone())).collect();
        assert!(t[0].hold(40).is_ok());
        assert!(t[1].hold(40).is_ok());
        assert_eq!(budget.used(), 80);
        // The third passes the limit: the first, the oldest, is told (and
        // closes: its ticket is dropped).
        assert!(t[2].hold(40).is_ok());
        assert_eq!(budget.evicted.load(Ordering::Relaxed), 1);
        drop(t.remove(0));
        assert_eq!(budget.used(), 80);
        // Up to the limit is fine; past it, the second (now the oldest).
        assert!(t[0].hold(60).is_ok());
        assert_eq!(budget.used(), 100);
        assert!(t[1].hold(50).is_ok(), "the other one is older");
        assert_eq!(budget.evicted.load(Ordering::Relaxed), 2);
        // A packet completed gives its bytes back.
        t[1].hold(0).unwrap();
        assert_eq!(budget.used(), 60);
        // A holder that is itself the oldest gets Err.
        let budget = Arc::new(Budget::new(10));
        let mut a = budget.ticket(Arc::new(Notify::new()));
        assert!(a.hold(20).is_err());
        a.hold(0).unwrap();
        assert_eq!(budget.used(), 0);
        assert!(a.hold(5).is_ok());
    }
}

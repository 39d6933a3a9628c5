//! The embedded MQTT broker: MQTT 3.1.1 over TCP, on the platform's own
//! tokio runtime, sized for fleets (10,000 connections and more on one
//! machine). Broker URLs are `iot_ota_core::BrokerUrl`.
//!
//! The platform talks to it through an ordinary MQTT client over loopback,
//! exactly as it talks to an external Mosquitto, so both paths run the same
//! code. What it implements:
//!
//! - CONNECT with clean or persistent sessions (kept in memory while the
//!   process runs: subscriptions, QoS 1 and 2 messages queued while the
//!   client is away, up to [`BrokerOptions::max_queued`], and the ids of
//!   QoS 2 messages it has not released; a session away expires after
//!   [`BrokerOptions::session_expiry`], and at most
//!   [`BrokerOptions::max_kept_sessions`] are kept away), session take-over
//!   by a second connection with the same client id, keep-alive (a client
//!   silent for 1.5 × its keep-alive is dropped), last will;
//! - PUBLISH at QoS 0, 1 and 2, both ways; retained messages;
//! - SUBSCRIBE / UNSUBSCRIBE with `+` and `#`, `$`-topics kept from
//!   wildcards; PINGREQ; DISCONNECT.
//!
//! - who may connect and to which topics ([`Authenticator`]).
//!
//! Not implemented: TLS (use an external broker), MQTT 5, shared
//! subscriptions. A slow subscriber whose queue is full loses the
//! newest messages (counted in [`BrokerStats::dropped`], and logged), as
//! Mosquitto's `max_queued_messages` does.
//!
//! Routing: filters without wildcards (every device's own topics) are found
//! by one hash lookup; the few wildcard filters (the platform's) are
//! matched one by one.

mod access;
mod budget;
mod conn;
mod state;
mod strict;
mod topic;

pub use access::{Authenticator, Identity, Refusal};
use conn::connection;
use state::State;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

/// The embedded broker's limits, and who may connect.
#[derive(Debug, Clone)]
pub struct BrokerOptions {
    /// Who may connect, and so to which topics ([`Authenticator`]); `None`:
    /// anyone, to every topic (development only).
    pub auth: Option<Arc<dyn Authenticator>>,
    /// Connections at most; more are refused with CONNACK "server
    /// unavailable". The process's open-file limit bounds it too: every
    /// connection is a descriptor (`ulimit -n`).
    pub max_connections: usize,
    /// Largest MQTT packet accepted, in bytes; a larger one closes the connection.
    pub max_packet_size: usize,
    /// Messages queued per client (online and not reading fast enough, or a
    /// persistent session that is away) before new ones are dropped.
    pub max_queued: usize,
    /// QoS 1 and 2 messages sent to one client and not acknowledged yet, at
    /// most (the rest wait in its queue); and QoS 2 messages received from
    /// it and not released yet (one more closes the connection).
    pub max_inflight: usize,
    /// How long a new connection may take to send its CONNECT.
    pub connect_timeout: Duration,
    /// Subscriptions one client may hold; more are refused (SUBACK failure).
    pub max_subscriptions: usize,
    /// Retained topics kept at most; a retained message on a new topic
    /// beyond that is delivered but not kept.
    pub max_retained: usize,
    /// Bytes that incomplete packets may hold across all connections; past
    /// it, the connection whose incomplete packet began first is closed
    /// (counted in [`BrokerStats::evicted`]).
    pub max_pending_bytes: usize,
    /// Bytes that queued messages (waiting for a client, parked for a
    /// persistent session, or in flight until acknowledged) may hold across
    /// all clients; past it new messages are dropped and counted
    /// ([`BrokerStats::dropped`]), as a full queue's are.
    pub max_queued_bytes: usize,
    /// How long a packet may take from its first byte to its last; a
    /// slower one closes the connection (counted in [`BrokerStats::timed_out`]).
    pub packet_timeout: Duration,
    /// How long a client with keep-alive 0 may stay silent.
    pub idle_timeout: Duration,
    /// How long a persistent session (clean session 0) is kept once its
    /// client is gone: its subscriptions and queued messages, as MQTT 5's
    /// session expiry interval (zero: it ends with its connection).
    pub session_expiry: Duration,
    /// Persistent sessions kept while their clients are away, at most;
    /// past it the one away longest goes (counted in
    /// [`BrokerStats::evicted_sessions`]).
    pub max_kept_sessions: usize,
}

impl Default for BrokerOptions {
    fn default() -> Self {
        BrokerOptions {
            auth: None,
            max_connections: 100_000,
            max_packet_size: 1024 * 1024,
            max_queued: 100_000,
            max_inflight: 1_000,
            connect_timeout: Duration::from_secs(10),
            max_subscriptions: 1_000,
            max_retained: 100_000,
            max_pending_bytes: 64 * 1024 * 1024,
            max_queued_bytes: 256 * 1024 * 1024,
            packet_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(15 * 60),
            session_expiry: Duration::from_secs(7 * 24 * 3600),
            max_kept_sessions: 100_000,
        }
    }
}

/// Counters of an [`EmbeddedBroker`], since it started (also the
/// `broker` object of `GET /api/stats`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BrokerStats {
    /// Clients connected now.
    pub connections: u64,
    /// Connections accepted (CONNACK success) in all.
    pub connects: u64,
    /// PUBLISH packets received from clients.
    pub received: u64,
    /// PUBLISH packets queued to subscribers.
    pub delivered: u64,
    /// Messages dropped because a subscriber's queue was full.
    pub dropped: u64,
    /// The longest any client's queue has been, in messages.
    pub peak_queue: u64,
    /// Connections closed by the bound on incomplete packets
    /// ([`BrokerOptions::max_pending_bytes`]).
    #[serde(default)]
    pub evicted: u64,
    /// Connections closed for silence (keep-alive, the idle limit) or a
    /// packet not finished in time.
    #[serde(default)]
    pub timed_out: u64,
    /// Bytes incomplete packets hold now.
    #[serde(default)]
    pub pending_bytes: u64,
    /// Bytes queued messages hold now.
    #[serde(default)]
    pub queued_bytes: u64,
    /// CONNECTs refused: no, wrong or revoked credentials, or a client id
    /// another identity's session holds.
    #[serde(default)]
    pub refused_connects: u64,
    /// PUBLISH packets (and wills) dropped: a topic not the client's.
    #[serde(default)]
    pub refused_publishes: u64,
    /// SUBSCRIBE filters refused (0x80): not the client's.
    #[serde(default)]
    pub refused_subscribes: u64,
    /// Connections closed because their credentials were revoked.
    #[serde(default)]
    pub revoked: u64,
    /// Persistent sessions forgotten after [`BrokerOptions::session_expiry`] away.
    #[serde(default)]
    pub expired_sessions: u64,
    /// Persistent sessions dropped by [`BrokerOptions::max_kept_sessions`].
    #[serde(default)]
    pub evicted_sessions: u64,
    /// Persistent sessions kept now with no connection.
    #[serde(default)]
    pub sessions_away: u64,
}

/// A handle that reads an [`EmbeddedBroker`]'s counters, for whoever
/// reports them (the platform's `/api/stats`); it does not keep the broker running.
#[derive(Clone, Debug)]
pub struct BrokerStatsHandle(std::sync::Weak<Shared>);

impl BrokerStatsHandle {
    /// The counters now, or `None` once the broker has stopped.
    pub fn get(&self) -> Option<BrokerStats> {
        self.0.upgrade().map(|s| s.stats())
    }

    /// Closes every connection of `identity` (its credentials were
    /// revoked); returns how many. Its sessions go with them.
    pub fn disconnect(&self, identity: &Identity) -> usize {
        let Some(shared) = self.0.upgrade() else {
            return 0;
        };
        let mut state = shared.state();
        let mut n = 0;
        let mut offline = Vec::new();
        for (id, session) in state.sessions.iter_mut() {
            if session.owner != *identity {
                continue;
            }
            // Not kept: a revoked device's session must not fill up.
            session.persistent = false;
            match &session.conn {
                Some(online) => {
                    online.close.notify_one();
                    n += 1;
                }
                None => offline.push(id.clone()),
            }
        }
        for id in offline {
            state.remove_session(&id);
        }
        shared
            .counters
            .revoked
            .fetch_add(n as u64, Ordering::Relaxed);
        n
    }

    /// Whether a client with this id is connected now (`None` once the
    /// broker has stopped).
    pub fn is_connected(&self, client_id: &str) -> Option<bool> {
        let shared = self.0.upgrade()?;
        let state = shared.state();
        Some(
            state
                .sessions
                .get(client_id)
                .is_some_and(|s| s.conn.is_some()),
        )
    }
}

#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    connects: AtomicU64,
    received: AtomicU64,
    delivered: AtomicU64,
    dropped: AtomicU64,
    peak_queue: AtomicU64,
    timed_out: AtomicU64,
    refused_connects: AtomicU64,
    refused_publishes: AtomicU64,
    refused_subscribes: AtomicU64,
    revoked: AtomicU64,
    expired_sessions: AtomicU64,
    evicted_sessions: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> BrokerStats {
        BrokerStats {
            connections: self.connections.load(Ordering::Relaxed),
            connects: self.connects.load(Ordering::Relaxed),
            received: self.received.load(Ordering::Relaxed),
            delivered: self.delivered.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            peak_queue: self.peak_queue.load(Ordering::Relaxed),
            timed_out: self.timed_out.load(Ordering::Relaxed),
            refused_connects: self.refused_connects.load(Ordering::Relaxed),
            refused_publishes: self.refused_publishes.load(Ordering::Relaxed),
            refused_subscribes: self.refused_subscribes.load(Ordering::Relaxed),
            revoked: self.revoked.load(Ordering::Relaxed),
            expired_sessions: self.expired_sessions.load(Ordering::Relaxed),
            evicted_sessions: self.evicted_sessions.load(Ordering::Relaxed),
            ..BrokerStats::default()
        }
    }
}

/// An MQTT broker running on the current tokio runtime; it stops (and drops
/// every connection) when dropped.
#[derive(Debug)]
pub struct EmbeddedBroker {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
}

impl EmbeddedBroker {
    /// Starts a broker listening on `addr` (port 0: a free port). Needs a
    /// tokio runtime's context.
    pub async fn start(addr: SocketAddr, options: BrokerOptions) -> Result<EmbeddedBroker, String> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| format!("the embedded MQTT broker cannot listen on {addr}: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let pool = state::QueuePool::new(options.max_queued_bytes);
        let shared = Arc::new(Shared {
            budget: Arc::new(budget::Budget::new(options.max_pending_bytes)),
            options,
            state: Mutex::new(State::new(pool.clone())),
            pool,
            counters: Counters::default(),
        });
        let (shutdown, stop) = watch::channel(false);
        tokio::spawn(expiry_loop(shared.clone(), stop.clone()));
        tokio::spawn(accept_loop(listener, shared.clone(), stop));
        log::info!("embedded MQTT broker listening on {addr}");
        Ok(EmbeddedBroker {
            addr,
            shared,
            shutdown,
        })
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `mqtt://ADDR`.
    pub fn url(&self) -> String {
        format!("mqtt://{}", self.addr)
    }

    /// Its counters now.
    pub fn stats(&self) -> BrokerStats {
        self.shared.stats()
    }

    /// A handle to read the counters from elsewhere.
    pub fn stats_handle(&self) -> BrokerStatsHandle {
        BrokerStatsHandle(Arc::downgrade(&self.shared))
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

struct Shared {
    options: BrokerOptions,
    state: Mutex<State>,
    counters: Counters,
    budget: Arc<budget::Budget>,
    pool: Arc<state::QueuePool>,
}

impl Shared {
    fn stats(&self) -> BrokerStats {
        BrokerStats {
            evicted: self.budget.evicted.load(Ordering::Relaxed),
            pending_bytes: self.budget.used() as u64,
            queued_bytes: self.pool.used() as u64,
            sessions_away: self.state().away.len() as u64,
            ..self.counters.snapshot()
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Nothing under the lock can leave the state half-changed.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Forgets the persistent sessions away past their expiry, waking when
/// the next one is due. (A session that goes away later expires later than
/// any now away, so sleeping until the first deadline, or a whole expiry
/// when none is away, misses none.)
async fn expiry_loop(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let expiry = shared.options.session_expiry;
    if expiry.is_zero() {
        return; // Sessions end with their connections.
    }
    loop {
        let now = tokio::time::Instant::now();
        let (gone, next) = shared.state().expire(now, expiry);
        shared
            .counters
            .expired_sessions
            .fetch_add(gone as u64, Ordering::Relaxed);
        // None away (or an expiry past what an Instant holds): look again
        // after an expiry, or a day.
        let wake = next
            .or_else(|| now.checked_add(expiry))
            .unwrap_or(now + Duration::from_secs(86_400));
        tokio::select! {
            _ = tokio::time::sleep_until(wake) => {}
            _ = stop.changed() => return,
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, stop: watch::Receiver<bool>) {
    let mut accept_stop = stop.clone();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = accept_stop.changed() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                tokio::spawn(connection(stream, peer, shared.clone(), stop.clone()));
            }
            Err(e) => {
                // EMFILE and friends: wait for descriptors to free up.
                log::warn!("embedded broker: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests;

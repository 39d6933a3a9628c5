//! The embedded MQTT broker: MQTT 3.1.1 over TCP, on the platform's own
//! tokio runtime, sized for fleets (10,000 connections and more on one
//! machine). Broker URLs are `iot_ota_core::BrokerUrl`.
//!
//! The platform talks to it through an ordinary MQTT client over loopback,
//! exactly as it talks to an external Mosquitto, so both paths run the same
//! code. What it implements:
//!
//! - CONNECT with clean or persistent sessions (kept in memory while the
//!   process runs: subscriptions, and QoS 1 messages queued while the client
//!   is away, up to [`BrokerOptions::max_queued`]), session take-over by a
//!   second connection with the same client id, keep-alive (a client silent
//!   for 1.5 × its keep-alive is dropped), last will;
//! - PUBLISH at QoS 0, 1 and 2 from clients; delivery at QoS 0 or 1 (a
//!   subscription asking for 2 is granted 1, as the spec allows); retained
//!   messages;
//! - SUBSCRIBE / UNSUBSCRIBE with `+` and `#`, `$`-topics kept from
//!   wildcards; PINGREQ; DISCONNECT.
//!
//! Not implemented: TLS (use an external broker), authentication (the
//! embedded broker is meant for loopback or a trusted network), MQTT 5,
//! shared subscriptions. A slow subscriber whose queue is full loses the
//! newest messages (counted in [`BrokerStats::dropped`], and logged), as
//! Mosquitto's `max_queued_messages` does.
//!
//! Routing: filters without wildcards (every device's own topics) are found
//! by one hash lookup; the few wildcard filters (the platform's) are
//! matched one by one.

mod topic;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{
    ConnAck, ConnectReturnCode, Packet, PubAck, PubComp, PubRec, Publish, SubAck,
    SubscribeReasonCode, UnsubAck,
};
use rumqttc::mqttbytes::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;

/// The embedded broker's limits.
#[derive(Debug, Clone)]
pub struct BrokerOptions {
    /// Connections at most; more are refused with CONNACK "server
    /// unavailable". The process's open-file limit bounds it too: every
    /// connection is a descriptor (`ulimit -n`).
    pub max_connections: usize,
    /// Largest MQTT packet accepted, in bytes; a larger one closes the connection.
    pub max_packet_size: usize,
    /// Messages queued per client (online and not reading fast enough, or a
    /// persistent session that is away) before new ones are dropped.
    pub max_queued: usize,
    /// QoS 1 messages sent to one client and not acknowledged yet, at most;
    /// the rest wait in its queue.
    pub max_inflight: usize,
    /// How long a new connection may take to send its CONNECT.
    pub connect_timeout: Duration,
    /// Subscriptions one client may hold; more are refused (SUBACK failure).
    pub max_subscriptions: usize,
    /// Retained topics kept at most; a retained message on a new topic
    /// beyond that is delivered but not kept.
    pub max_retained: usize,
}

impl Default for BrokerOptions {
    fn default() -> Self {
        BrokerOptions {
            max_connections: 100_000,
            max_packet_size: 1024 * 1024,
            max_queued: 100_000,
            max_inflight: 1_000,
            connect_timeout: Duration::from_secs(10),
            max_subscriptions: 1_000,
            max_retained: 100_000,
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
}

/// A handle that reads an [`EmbeddedBroker`]'s counters, for whoever
/// reports them (the platform's `/api/stats`); it does not keep the broker running.
#[derive(Clone, Debug)]
pub struct BrokerStatsHandle(std::sync::Weak<Shared>);

impl BrokerStatsHandle {
    /// The counters now, or `None` once the broker has stopped.
    pub fn get(&self) -> Option<BrokerStats> {
        self.0.upgrade().map(|s| s.counters.snapshot())
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
        let shared = Arc::new(Shared {
            options,
            state: Mutex::new(State::default()),
            counters: Counters::default(),
        });
        let (shutdown, stop) = watch::channel(false);
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
        self.shared.counters.snapshot()
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
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // Nothing under the lock can leave the state half-changed.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The routing table and the sessions. One lock; every critical section
/// is a few map operations.
#[derive(Default)]
struct State {
    sessions: HashMap<Arc<str>, Session>,
    /// Filters without wildcards: filter → (client, granted QoS).
    exact: HashMap<String, Vec<(Arc<str>, QoS)>>,
    /// Filters with wildcards: (filter, client, granted QoS).
    wild: Vec<(String, Arc<str>, QoS)>,
    retained: HashMap<String, Publish>,
    next_conn: u64,
    online: usize,
}

struct Session {
    /// The connection now serving it, if any.
    conn: Option<Online>,
    persistent: bool,
    /// Its subscriptions (filter, granted QoS), for unsubscribing and cleanup.
    filters: Vec<(String, QoS)>,
    /// QoS 1 messages kept while a persistent session is away.
    parked: VecDeque<Publish>,
}

struct Online {
    id: u64,
    tx: mpsc::Sender<Publish>,
    kick: Arc<Notify>,
}

impl State {
    fn subscribe(&mut self, client: &Arc<str>, filter: &str, qos: QoS) {
        let Some(session) = self.sessions.get_mut(client) else {
            return;
        };
        if let Some(f) = session.filters.iter_mut().find(|(f, _)| f == filter) {
            f.1 = qos;
        } else {
            session.filters.push((filter.to_owned(), qos));
        }
        if topic::is_wildcard(filter) {
            match self
                .wild
                .iter_mut()
                .find(|(f, c, _)| f == filter && c == client)
            {
                Some(entry) => entry.2 = qos,
                None => self.wild.push((filter.to_owned(), client.clone(), qos)),
            }
        } else {
            let subs = self.exact.entry(filter.to_owned()).or_default();
            match subs.iter_mut().find(|(c, _)| c == client) {
                Some(entry) => entry.1 = qos,
                None => subs.push((client.clone(), qos)),
            }
        }
    }

    fn unsubscribe(&mut self, client: &Arc<str>, filter: &str) {
        if let Some(session) = self.sessions.get_mut(client) {
            session.filters.retain(|(f, _)| f != filter);
        }
        if topic::is_wildcard(filter) {
            self.wild.retain(|(f, c, _)| !(f == filter && c == client));
        } else if let Some(subs) = self.exact.get_mut(filter) {
            subs.retain(|(c, _)| c != client);
            if subs.is_empty() {
                self.exact.remove(filter);
            }
        }
    }

    fn remove_session(&mut self, client: &Arc<str>) {
        if let Some(session) = self.sessions.remove(client) {
            for (filter, _) in session.filters {
                if topic::is_wildcard(&filter) {
                    self.wild.retain(|(f, c, _)| !(*f == filter && c == client));
                } else if let Some(subs) = self.exact.get_mut(&filter) {
                    subs.retain(|(c, _)| c != client);
                    if subs.is_empty() {
                        self.exact.remove(&filter);
                    }
                }
            }
        }
    }

    /// Queues `publish` to every subscriber of its topic (once per client,
    /// at the highest QoS its matching subscriptions grant).
    fn route(&mut self, publish: &Publish, options: &BrokerOptions, counters: &Counters) {
        let mut targets: Vec<(Arc<str>, QoS)> = Vec::new();
        let mut add =
            |client: &Arc<str>, qos: QoS| match targets.iter_mut().find(|(c, _)| c == client) {
                Some(t) => t.1 = max_qos(t.1, qos),
                None => targets.push((client.clone(), qos)),
            };
        if let Some(subs) = self.exact.get(&publish.topic) {
            for (client, qos) in subs {
                add(client, *qos);
            }
        }
        for (filter, client, qos) in &self.wild {
            if topic::matches(filter, &publish.topic) {
                add(client, *qos);
            }
        }
        for (client, granted) in targets {
            let Some(session) = self.sessions.get_mut(&client) else {
                continue;
            };
            let mut out = publish.clone();
            out.qos = min_qos(publish.qos, granted);
            out.retain = false;
            out.dup = false;
            out.pkid = 0;
            let queued = match &session.conn {
                Some(online) => {
                    let sent = online.tx.try_send(out).is_ok();
                    let depth = (online.tx.max_capacity() - online.tx.capacity()) as u64;
                    counters.peak_queue.fetch_max(depth, Ordering::Relaxed);
                    sent
                }
                None if session.persistent && out.qos != QoS::AtMostOnce => {
                    if session.parked.len() < options.max_queued {
                        session.parked.push_back(out);
                        true
                    } else {
                        false
                    }
                }
                None => continue,
            };
            if queued {
                counters.delivered.fetch_add(1, Ordering::Relaxed);
            } else {
                let n = counters.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    log::warn!(
                        "embedded broker: the queue of {client} is full ({} messages): \
                         dropped a message on {} ({n} dropped in all)",
                        options.max_queued,
                        publish.topic
                    );
                }
            }
        }
    }
}

fn qos_level(q: QoS) -> u8 {
    match q {
        QoS::AtMostOnce => 0,
        QoS::AtLeastOnce => 1,
        QoS::ExactlyOnce => 2,
    }
}

fn max_qos(a: QoS, b: QoS) -> QoS {
    if qos_level(a) >= qos_level(b) {
        a
    } else {
        b
    }
}

fn min_qos(a: QoS, b: QoS) -> QoS {
    if qos_level(a) <= qos_level(b) {
        a
    } else {
        b
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

/// Why a connection ended.
enum End {
    /// DISCONNECT, or the broker stopping: no will.
    Clean,
    /// Another connection took the session over: no will, session kept.
    TakenOver,
    /// Anything else (network, keep-alive, protocol error): the will is sent.
    Lost(String),
}

async fn connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let max = shared.options.max_packet_size;
    let mut rd = BytesMut::with_capacity(512);
    let connect = match tokio::time::timeout(
        shared.options.connect_timeout,
        read_packet(&mut stream, &mut rd, max),
    )
    .await
    {
        Ok(Ok(Packet::Connect(c))) => c,
        Ok(Ok(_)) => {
            log::debug!("embedded broker: {peer}: the first packet was not CONNECT");
            return;
        }
        Ok(Err(e)) => {
            log::debug!("embedded broker: {peer}: {e}");
            return;
        }
        Err(_) => {
            log::debug!("embedded broker: {peer}: no CONNECT in time");
            return;
        }
    };
    let mut wr = BytesMut::with_capacity(256);
    let refuse = |code: ConnectReturnCode, wr: &mut BytesMut| {
        let _ = ConnAck::new(code, false).write(wr);
    };
    if connect.protocol != rumqttc::mqttbytes::Protocol::V4 {
        refuse(ConnectReturnCode::RefusedProtocolVersion, &mut wr);
        let _ = stream.write_all(&wr).await;
        return;
    }
    if let Some(w) = &connect.last_will {
        if !topic::valid_topic(&w.topic) {
            // Spec 3.1.2.9 / 4.7: an invalid will topic closes the connection.
            log::debug!("embedded broker: {peer}: invalid will topic {:?}", w.topic);
            return;
        }
    }
    let (client, persistent) = if connect.client_id.is_empty() {
        if !connect.clean_session {
            refuse(ConnectReturnCode::BadClientId, &mut wr);
            let _ = stream.write_all(&wr).await;
            return;
        }
        let n = shared.state().next_conn;
        (Arc::<str>::from(format!("auto-{n}-{peer}")), false)
    } else {
        (
            Arc::<str>::from(connect.client_id.as_str()),
            !connect.clean_session,
        )
    };

    // Register: take over an existing session, keep or drop its state.
    let (tx, mut rx) = mpsc::channel::<Publish>(shared.options.max_queued.max(1));
    let kick = Arc::new(Notify::new());
    let registered = 'register: {
        let mut state = shared.state();
        if state.online >= shared.options.max_connections {
            break 'register None;
        }
        state.next_conn += 1;
        let id = state.next_conn;
        let mut present = false;
        let mut parked = VecDeque::new();
        let mut keep_filters = false;
        if let Some(old) = state.sessions.get_mut(&client) {
            if let Some(o) = old.conn.take() {
                o.kick.notify_one();
                state.online -= 1;
            }
            let old = state.sessions.get_mut(&client).expect("just found");
            if persistent && old.persistent {
                present = true;
                keep_filters = true;
                parked = std::mem::take(&mut old.parked);
            }
        }
        if !keep_filters {
            state.remove_session(&client);
        }
        let session = state.sessions.entry(client.clone()).or_insert(Session {
            conn: None,
            persistent,
            filters: Vec::new(),
            parked: VecDeque::new(),
        });
        session.persistent = persistent;
        session.conn = Some(Online {
            id,
            tx: tx.clone(),
            kick: kick.clone(),
        });
        for p in parked {
            if tx.try_send(p).is_err() {
                shared.counters.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        state.online += 1;
        Some((id, present))
    };
    let Some((conn_id, session_present)) = registered else {
        refuse(ConnectReturnCode::ServiceUnavailable, &mut wr);
        let _ = stream.write_all(&wr).await;
        log::warn!(
            "embedded broker: refused {client}: {} connections already",
            shared.options.max_connections
        );
        return;
    };
    shared.counters.connects.fetch_add(1, Ordering::Relaxed);
    shared.counters.connections.fetch_add(1, Ordering::Relaxed);
    log::debug!("embedded broker: {client} connected from {peer}");
    let _ = ConnAck::new(ConnectReturnCode::Success, session_present).write(&mut wr);

    let mut conn = Conn {
        client: client.clone(),
        shared: shared.clone(),
        own: tx,
        inflight: VecDeque::new(),
        next_pkid: 0,
        qos2_in: Vec::new(),
    };
    // Packet ids are 16 bits: never more in flight than there are ids.
    let max_inflight = shared.options.max_inflight.min(usize::from(u16::MAX) - 1);
    let keep_alive = Duration::from_secs(u64::from(connect.keep_alive));
    let grace = keep_alive + keep_alive / 2;
    let write_timeout = grace.max(Duration::from_secs(30));
    let mut deadline = Instant::now() + grace;
    // Packets sent right behind the CONNECT (pipelined) are already read.
    let end = match conn.take_packets(&mut rd, &mut wr) {
        Ok(true) => None,
        Ok(false) => Some(End::Clean),
        Err(e) => Some(End::Lost(e)),
    };
    let end = if let Some(end) = end {
        end
    } else {
        loop {
            if !wr.is_empty() {
                // A client that stops reading cannot hold this task (and
                // the broker's stop, a take-over) forever.
                match tokio::time::timeout(write_timeout, stream.write_all(&wr)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => break End::Lost(format!("write: {e}")),
                    Err(_) => break End::Lost("not reading: a write timed out".into()),
                }
                wr.clear();
            }
            let can_send = conn.inflight.len() < max_inflight;
            tokio::select! {
                read = stream.read_buf(&mut rd) => match read {
                    Ok(0) => break End::Lost("closed by the client".into()),
                    Ok(_) => {
                        deadline = Instant::now() + grace;
                        match conn.take_packets(&mut rd, &mut wr) {
                            Ok(true) => {}
                            Ok(false) => break End::Clean,
                            Err(e) => break End::Lost(e),
                        }
                    }
                    Err(e) => break End::Lost(format!("read: {e}")),
                },
                Some(p) = rx.recv(), if can_send => {
                    conn.send(p, &mut wr);
                    // Batch what is already queued into one write.
                    while wr.len() < 64 * 1024 && conn.inflight.len() < max_inflight {
                        match rx.try_recv() {
                            Ok(p) => conn.send(p, &mut wr),
                            Err(_) => break,
                        }
                    }
                }
                _ = kick.notified() => break End::TakenOver,
                _ = tokio::time::sleep_until(deadline), if !keep_alive.is_zero() => {
                    break End::Lost("keep-alive timeout".into());
                }
                _ = stop.changed() => break End::Clean,
            }
        }
    };
    drop(stream);

    // Cleanup: a persistent session keeps what was not acknowledged.
    let will = {
        let mut state = shared.state();
        let mine = state
            .sessions
            .get(&client)
            .and_then(|s| s.conn.as_ref())
            .is_some_and(|o| o.id == conn_id);
        let mut dropped = 0u64;
        if mine {
            state.online -= 1;
            let max_queued = shared.options.max_queued;
            let session = state.sessions.get_mut(&client).expect("mine");
            session.conn = None;
            if session.persistent {
                let mut parked: VecDeque<Publish> =
                    conn.inflight.drain(..).map(|(_, p)| p).collect();
                while let Ok(p) = rx.try_recv() {
                    if p.qos != QoS::AtMostOnce {
                        parked.push_back(p);
                    }
                }
                for p in parked.into_iter().rev() {
                    session.parked.push_front(p);
                }
                while session.parked.len() > max_queued {
                    session.parked.pop_back();
                    dropped += 1;
                }
            } else {
                state.remove_session(&client);
            }
        } else if let Some(session) = state.sessions.get_mut(&client) {
            // Taken over, whatever ended this connection first: a persistent
            // session's new connection gets what this one had in flight or
            // queued.
            if let (true, Some(online)) = (session.persistent, &session.conn) {
                let pending: Vec<Publish> = conn
                    .inflight
                    .drain(..)
                    .map(|(_, p)| p)
                    .chain(std::iter::from_fn(|| rx.try_recv().ok()))
                    .collect();
                for p in pending {
                    if online.tx.try_send(p).is_err() {
                        dropped += 1;
                    }
                }
            }
        }
        shared
            .counters
            .dropped
            .fetch_add(dropped, Ordering::Relaxed);
        // The will is for a connection lost, not for one another took over.
        match &end {
            End::Lost(_) if mine => connect.last_will.clone(),
            _ => None,
        }
    };
    shared.counters.connections.fetch_sub(1, Ordering::Relaxed);
    match &end {
        End::Lost(why) => log::debug!("embedded broker: {client} lost: {why}"),
        End::TakenOver => log::debug!("embedded broker: {client} taken over"),
        End::Clean => log::debug!("embedded broker: {client} disconnected"),
    }
    if let Some(w) = will {
        let mut p = Publish::from_bytes(w.topic, w.qos, w.message);
        p.retain = w.retain;
        shared.counters.received.fetch_add(1, Ordering::Relaxed);
        let mut state = shared.state();
        if p.retain {
            retain(&mut state, &p, shared.options.max_retained);
        }
        state.route(&p, &shared.options, &shared.counters);
    }
}

fn retain(state: &mut State, p: &Publish, max: usize) {
    if p.payload.is_empty() {
        state.retained.remove(&p.topic);
    } else if state.retained.len() >= max && !state.retained.contains_key(&p.topic) {
        log::warn!(
            "embedded broker: {max} retained topics already: {} is not kept",
            p.topic
        );
    } else {
        let mut kept = p.clone();
        kept.pkid = 0;
        kept.dup = false;
        state.retained.insert(p.topic.clone(), kept);
    }
}

/// Reads until one whole packet is in `rd`, and returns it.
async fn read_packet(
    stream: &mut TcpStream,
    rd: &mut BytesMut,
    max: usize,
) -> Result<Packet, String> {
    loop {
        match Packet::read(rd, max) {
            Ok(p) => return Ok(p),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(e) => return Err(e.to_string()),
        }
        match stream.read_buf(rd).await {
            Ok(0) => return Err("closed before CONNECT".into()),
            Ok(_) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// One connection's protocol state.
struct Conn {
    client: Arc<str>,
    shared: Arc<Shared>,
    /// This connection's own queue (retained messages for a new
    /// subscription go through it, under the in-flight limit like the rest).
    own: mpsc::Sender<Publish>,
    /// QoS 1 messages sent and not acknowledged, oldest first.
    inflight: VecDeque<(u16, Publish)>,
    next_pkid: u16,
    /// QoS 2 packet ids received and not released yet.
    qos2_in: Vec<u16>,
}

impl Conn {
    /// Writes `p` to the client; a QoS 1 message gets a packet id and waits for its PUBACK.
    fn send(&mut self, mut p: Publish, wr: &mut BytesMut) {
        if p.qos != QoS::AtMostOnce {
            p.qos = QoS::AtLeastOnce;
            // A message sent before (kept by a persistent session) goes
            // again with its packet id and DUP, as the spec wants: a late
            // PUBACK for that id then acknowledges this very message.
            let again = p.pkid != 0 && !self.inflight.iter().any(|(i, _)| *i == p.pkid);
            if again {
                p.dup = true;
            } else {
                p.pkid = self.pkid();
            }
            self.inflight.push_back((p.pkid, p.clone()));
        }
        let _ = p.write(wr);
    }

    /// A free packet id. Terminates: fewer than 65,535 are ever in flight
    /// (the in-flight limit is clamped below that).
    fn pkid(&mut self) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
            let id = self.next_pkid;
            if !self.inflight.iter().any(|(i, _)| *i == id) {
                return id;
            }
        }
    }

    /// Handles every whole packet in `rd`. Ok(false): the client said DISCONNECT.
    fn take_packets(&mut self, rd: &mut BytesMut, wr: &mut BytesMut) -> Result<bool, String> {
        let max = self.shared.options.max_packet_size;
        loop {
            let packet = match Packet::read(rd, max) {
                Ok(p) => p,
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => return Ok(true),
                Err(e) => return Err(format!("bad packet: {e}")),
            };
            match packet {
                Packet::Publish(p) => self.publish(p, wr)?,
                Packet::PubAck(ack) => {
                    if let Some(i) = self.inflight.iter().position(|(id, _)| *id == ack.pkid) {
                        self.inflight.remove(i);
                    }
                }
                Packet::PubRel(rel) => {
                    self.qos2_in.retain(|id| *id != rel.pkid);
                    let _ = PubComp::new(rel.pkid).write(wr);
                }
                Packet::Subscribe(s) => {
                    let mut codes = Vec::with_capacity(s.filters.len());
                    let mut retained = Vec::new();
                    {
                        let mut state = self.shared.state();
                        for f in &s.filters {
                            let held = state.sessions.get(&self.client).map_or(0, |ses| {
                                let has = ses.filters.iter().any(|(x, _)| *x == f.path);
                                ses.filters.len() + usize::from(!has)
                            });
                            if !topic::valid_filter(&f.path)
                                || f.path.starts_with("$share/")
                                || held > self.shared.options.max_subscriptions
                            {
                                codes.push(SubscribeReasonCode::Failure);
                                continue;
                            }
                            let qos = min_qos(f.qos, QoS::AtLeastOnce);
                            state.subscribe(&self.client, &f.path, qos);
                            codes.push(SubscribeReasonCode::Success(qos));
                            for (t, p) in &state.retained {
                                if topic::matches(&f.path, t) {
                                    let mut p = p.clone();
                                    p.qos = min_qos(p.qos, qos);
                                    retained.push(p);
                                }
                            }
                        }
                    }
                    let _ = SubAck::new(s.pkid, codes).write(wr);
                    for p in retained {
                        if self.own.try_send(p).is_err() {
                            self.shared.counters.dropped.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                Packet::Unsubscribe(u) => {
                    {
                        let mut state = self.shared.state();
                        for t in &u.topics {
                            state.unsubscribe(&self.client, t);
                        }
                    }
                    let _ = UnsubAck::new(u.pkid).write(wr);
                }
                Packet::PingReq => {
                    let _ = Packet::PingResp.write(wr, usize::MAX);
                }
                Packet::Disconnect => return Ok(false),
                Packet::PubRec(r) => {
                    // We never send QoS 2; answer as the spec's sender would.
                    let _ = rumqttc::mqttbytes::v4::PubRel::new(r.pkid).write(wr);
                }
                Packet::PubComp(_) => {}
                Packet::Connect(_) => return Err("a second CONNECT".into()),
                other => return Err(format!("unexpected {other:?} from a client")),
            }
        }
    }

    fn publish(&mut self, p: Publish, wr: &mut BytesMut) -> Result<(), String> {
        if !topic::valid_topic(&p.topic) {
            return Err(format!("publish to an invalid topic {:?}", p.topic));
        }
        let counters = &self.shared.counters;
        counters.received.fetch_add(1, Ordering::Relaxed);
        let fresh = match p.qos {
            QoS::AtMostOnce => true,
            QoS::AtLeastOnce => {
                let _ = PubAck::new(p.pkid).write(wr);
                true
            }
            QoS::ExactlyOnce => {
                let _ = PubRec::new(p.pkid).write(wr);
                if self.qos2_in.contains(&p.pkid) {
                    false
                } else {
                    self.qos2_in.push(p.pkid);
                    true
                }
            }
        };
        if fresh {
            let mut state = self.shared.state();
            if p.retain {
                retain(&mut state, &p, self.shared.options.max_retained);
            }
            state.route(&p, &self.shared.options, counters);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions};

    fn client(broker: &EmbeddedBroker, id: &str, clean: bool) -> (AsyncClient, EventLoop) {
        let mut opts = MqttOptions::new(id, "127.0.0.1", broker.addr().port());
        opts.set_clean_session(clean)
            .set_keep_alive(Duration::from_secs(5));
        AsyncClient::new(opts, 64)
    }

    /// Polls until a PUBLISH arrives (acking it as rumqttc does), or the deadline.
    async fn next_publish(el: &mut EventLoop) -> Option<Publish> {
        publish_within(el, Duration::from_secs(5)).await
    }

    /// No PUBLISH within a second.
    async fn nothing_more(el: &mut EventLoop) -> bool {
        publish_within(el, Duration::from_secs(1)).await.is_none()
    }

    async fn publish_within(el: &mut EventLoop, wait: Duration) -> Option<Publish> {
        let deadline = Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, el.poll()).await {
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => return Some(p),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("{e}"),
                Err(_) => return None,
            }
        }
    }

    /// Polls until the SUBACK (or any `want` packet) arrives.
    async fn until(el: &mut EventLoop, want: fn(&Packet) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match tokio::time::timeout_at(deadline, el.poll()).await {
                Ok(Ok(Event::Incoming(p))) if want(&p) => return,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("{e}"),
                Err(_) => panic!("timed out"),
            }
        }
    }

    /// Until the broker acknowledges QoS 1 publish `pkid`.
    async fn acked(el: &mut EventLoop, pkid: u16) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match tokio::time::timeout_at(deadline, el.poll()).await {
                Ok(Ok(Event::Incoming(Packet::PubAck(a)))) if a.pkid == pkid => return,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("{e}"),
                Err(_) => panic!("timed out"),
            }
        }
    }

    /// Publishes retained QoS 1 messages, in order, and waits until the
    /// broker has acknowledged them all (the client's first publishes).
    async fn retain(p: &AsyncClient, el: &mut EventLoop, messages: &[(&str, &str)]) {
        for (topic, payload) in messages {
            p.publish(*topic, QoS::AtLeastOnce, true, *payload)
                .await
                .unwrap();
        }
        acked(el, messages.len() as u16).await;
    }

    fn is_suback(p: &Packet) -> bool {
        matches!(p, Packet::SubAck(_))
    }

    async fn broker() -> EmbeddedBroker {
        EmbeddedBroker::start("127.0.0.1:0".parse().unwrap(), BrokerOptions::default())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn routes_exact_and_wildcard_subscriptions_once_per_client() {
        let b = broker().await;
        let (sub, mut sub_el) = client(&b, "sub", true);
        sub.subscribe("/ota/device/progress/+/+", QoS::AtLeastOnce)
            .await
            .unwrap();
        sub.subscribe("/ota/device/progress/pk/dn", QoS::AtMostOnce)
            .await
            .unwrap();
        until(&mut sub_el, is_suback).await;
        until(&mut sub_el, is_suback).await;
        let (publisher, mut pub_el) = client(&b, "pub", true);
        publisher
            .publish("/ota/device/progress/pk/dn", QoS::AtLeastOnce, false, "42")
            .await
            .unwrap();
        publisher
            .publish("/ota/device/other/pk/dn", QoS::AtLeastOnce, false, "no")
            .await
            .unwrap();
        tokio::spawn(async move { while pub_el.poll().await.is_ok() {} });
        let p = next_publish(&mut sub_el).await.expect("delivered");
        assert_eq!(p.topic, "/ota/device/progress/pk/dn");
        assert_eq!(&p.payload[..], b"42");
        assert_eq!(p.qos, QoS::AtLeastOnce, "the highest granted QoS");
        assert!(nothing_more(&mut sub_el).await, "one copy, nothing else");
        assert_eq!(b.stats().delivered, 1);
        assert_eq!(b.stats().received, 2);
    }

    #[tokio::test]
    async fn a_persistent_session_keeps_qos1_messages_while_away() {
        let b = broker().await;
        {
            let (c, mut el) = client(&b, "platform", false);
            c.subscribe("up/#", QoS::AtLeastOnce).await.unwrap();
            until(&mut el, is_suback).await;
            c.disconnect().await.unwrap();
            while el.poll().await.is_ok() {}
        }
        let (p, mut pel) = client(&b, "dev", true);
        p.publish("up/a", QoS::AtLeastOnce, false, "1")
            .await
            .unwrap();
        p.publish("up/b", QoS::AtMostOnce, false, "lost")
            .await
            .unwrap();
        p.publish("up/c", QoS::AtLeastOnce, false, "2")
            .await
            .unwrap();
        acked(&mut pel, 2).await;
        let (_c, mut el) = client(&b, "platform", false);
        until(
            &mut el,
            |p| matches!(p, Packet::ConnAck(a) if a.session_present),
        )
        .await;
        let got: Vec<_> = [
            next_publish(&mut el).await.unwrap(),
            next_publish(&mut el).await.unwrap(),
        ]
        .into_iter()
        .map(|p| String::from_utf8_lossy(&p.payload).into_owned())
        .collect();
        assert_eq!(got, ["1", "2"], "QoS 1 kept in order, QoS 0 not kept");
    }

    #[tokio::test]
    async fn an_unacknowledged_message_is_sent_again_with_its_id_after_a_reconnect() {
        let b = broker().await;
        let manual = |b: &EmbeddedBroker| {
            let mut opts = MqttOptions::new("platform", "127.0.0.1", b.addr().port());
            opts.set_clean_session(false)
                .set_manual_acks(true)
                .set_keep_alive(Duration::from_secs(5));
            AsyncClient::new(opts, 64)
        };
        let first = {
            let (c, mut el) = manual(&b);
            c.subscribe("up/#", QoS::AtLeastOnce).await.unwrap();
            until(&mut el, is_suback).await;
            let (p, mut pel) = client(&b, "dev", true);
            p.publish("up/a", QoS::AtLeastOnce, false, "report")
                .await
                .unwrap();
            tokio::spawn(async move { while pel.poll().await.is_ok() {} });
            // Read, never acknowledged (the platform crashed before its commit).
            next_publish(&mut el).await.expect("delivered")
        };
        let (c, mut el) = manual(&b);
        let again = next_publish(&mut el).await.expect("delivered again");
        assert_eq!(
            (&again.payload[..], again.pkid, again.dup),
            (&b"report"[..], first.pkid, true)
        );
        c.ack(&again).await.unwrap();
        loop {
            match tokio::time::timeout(Duration::from_secs(5), el.poll()).await {
                Ok(Ok(Event::Outgoing(rumqttc::Outgoing::PubAck(_)))) => break,
                Ok(Ok(_)) => {}
                other => panic!("{other:?}"),
            }
        }
        // Acknowledged now: a third connection gets nothing.
        tokio::time::sleep(Duration::from_millis(200)).await;
        drop((c, el));
        let (_c, mut el) = manual(&b);
        assert!(nothing_more(&mut el).await);
    }

    #[tokio::test]
    async fn retained_messages_reach_later_subscribers_and_are_cleared_by_empty_ones() {
        let b = broker().await;
        let (p, mut pel) = client(&b, "pub", true);
        retain(
            &p,
            &mut pel,
            &[("cfg/a", "kept"), ("cfg/b", "gone"), ("cfg/b", "")],
        )
        .await;
        let (s, mut sel) = client(&b, "sub", true);
        s.subscribe("cfg/+", QoS::AtLeastOnce).await.unwrap();
        let m = next_publish(&mut sel).await.unwrap();
        assert_eq!(
            (m.topic.as_str(), &m.payload[..], m.retain),
            ("cfg/a", &b"kept"[..], true)
        );
        assert!(nothing_more(&mut sel).await);
    }

    #[tokio::test]
    async fn a_second_connection_takes_the_session_over_and_a_lost_one_sends_its_will() {
        let b = broker().await;
        let (w, mut wel) = client(&b, "watcher", true);
        w.subscribe("will/#", QoS::AtLeastOnce).await.unwrap();
        until(&mut wel, is_suback).await;

        let mut opts = MqttOptions::new("dev", "127.0.0.1", b.addr().port());
        opts.set_last_will(rumqttc::LastWill::new(
            "will/dev",
            "gone",
            QoS::AtLeastOnce,
            false,
        ));
        let (_c1, mut el1) = AsyncClient::new(opts.clone(), 8);
        until(&mut el1, |p| matches!(p, Packet::ConnAck(_))).await;
        let (_c2, mut el2) = AsyncClient::new(opts, 8);
        until(&mut el2, |p| matches!(p, Packet::ConnAck(_))).await;
        // The first connection is closed by the broker: no will for a take-over.
        let closed = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if el1.poll().await.is_err() {
                    return;
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "the old connection was closed");
        assert!(nothing_more(&mut wel).await, "no will on take-over");
        // Now the second one drops without DISCONNECT: its will goes out.
        drop(el2);
        let will = next_publish(&mut wel).await.expect("the will");
        assert_eq!(
            (will.topic.as_str(), &will.payload[..]),
            ("will/dev", &b"gone"[..])
        );
        assert_eq!(b.stats().connections, 1);
    }

    #[tokio::test]
    async fn retained_messages_for_a_client_that_never_acks_stay_within_its_limits() {
        let b = EmbeddedBroker::start(
            "127.0.0.1:0".parse().unwrap(),
            BrokerOptions {
                max_queued: 10,
                max_inflight: 5,
                ..BrokerOptions::default()
            },
        )
        .await
        .unwrap();
        let (p, mut pel) = client(&b, "pub", true);
        retain(&p, &mut pel, &[("cfg/x", "kept")]).await;
        tokio::spawn(async move { while pel.poll().await.is_ok() {} });
        // A raw client subscribes 200 times and never acknowledges: each
        // SUBSCRIBE is owed the retained message again.
        let mut raw = TcpStream::connect(b.addr()).await.unwrap();
        let mut out = BytesMut::new();
        rumqttc::mqttbytes::v4::Connect::new("greedy")
            .write(&mut out)
            .unwrap();
        for i in 1..=200u16 {
            let mut sub = rumqttc::mqttbytes::v4::Subscribe::new("cfg/#", QoS::AtLeastOnce);
            sub.pkid = i;
            sub.write(&mut out).unwrap();
        }
        raw.write_all(&out).await.unwrap();
        // The broker still serves others, and kept at most 5 + 10 for it.
        let (s, mut sel) = client(&b, "other", true);
        s.subscribe("cfg/x", QoS::AtLeastOnce).await.unwrap();
        let m = next_publish(&mut sel).await.expect("served");
        assert_eq!(&m.payload[..], b"kept");
        let deadline = Instant::now() + Duration::from_secs(5);
        while b.stats().dropped < 185 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(b.stats().dropped >= 185, "{:?}", b.stats());
        drop(raw);
    }

    #[tokio::test]
    async fn subscriptions_and_retained_topics_are_bounded() {
        let b = EmbeddedBroker::start(
            "127.0.0.1:0".parse().unwrap(),
            BrokerOptions {
                max_subscriptions: 2,
                max_retained: 1,
                ..BrokerOptions::default()
            },
        )
        .await
        .unwrap();
        let (c, mut el) = client(&b, "many", true);
        for f in ["a", "b", "a", "c"] {
            c.subscribe(f, QoS::AtLeastOnce).await.unwrap();
        }
        let mut codes = Vec::new();
        while codes.len() < 4 {
            match tokio::time::timeout(Duration::from_secs(5), el.poll()).await {
                Ok(Ok(Event::Incoming(Packet::SubAck(a)))) => codes.extend(a.return_codes),
                Ok(Ok(_)) => {}
                other => panic!("{other:?}"),
            }
        }
        let ok = SubscribeReasonCode::Success(QoS::AtLeastOnce);
        assert_eq!(
            codes,
            [ok, ok, ok, SubscribeReasonCode::Failure],
            "a again is no new one"
        );
        let (p, mut pel) = client(&b, "pub", true);
        retain(
            &p,
            &mut pel,
            &[("r/1", "one"), ("r/2", "two"), ("r/1", "one again")],
        )
        .await;
        let (s, mut sel) = client(&b, "late", true);
        s.subscribe("r/+", QoS::AtLeastOnce).await.unwrap();
        let m = next_publish(&mut sel).await.unwrap();
        assert_eq!(
            (m.topic.as_str(), &m.payload[..]),
            ("r/1", &b"one again"[..])
        );
        assert!(nothing_more(&mut sel).await, "r/2 was not kept");
    }

    #[tokio::test]
    async fn bad_filters_are_refused_and_a_full_queue_drops_and_counts() {
        let b = EmbeddedBroker::start(
            "127.0.0.1:0".parse().unwrap(),
            BrokerOptions {
                max_queued: 2,
                max_inflight: 0,
                ..BrokerOptions::default()
            },
        )
        .await
        .unwrap();
        // A raw client that subscribes and never reads nor acks.
        let mut raw = TcpStream::connect(b.addr()).await.unwrap();
        let mut out = BytesMut::new();
        rumqttc::mqttbytes::v4::Connect::new("slow")
            .write(&mut out)
            .unwrap();
        let mut sub = rumqttc::mqttbytes::v4::Subscribe::new("t", QoS::AtLeastOnce);
        sub.pkid = 1;
        sub.add("a/#/b".into(), QoS::AtMostOnce);
        sub.write(&mut out).unwrap();
        raw.write_all(&out).await.unwrap();
        let mut rd = BytesMut::new();
        let ack = loop {
            match Packet::read(&mut rd, 1 << 20) {
                Ok(Packet::SubAck(a)) => break a,
                Ok(_) => {}
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {
                    let n = tokio::time::timeout(Duration::from_secs(5), raw.read_buf(&mut rd))
                        .await
                        .expect("the broker answers")
                        .unwrap();
                    assert!(n > 0, "closed by the broker");
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(
            ack.return_codes,
            [
                SubscribeReasonCode::Success(QoS::AtLeastOnce),
                SubscribeReasonCode::Failure
            ]
        );
        let (p, mut pel) = client(&b, "pub", true);
        for i in 0..6 {
            p.publish("t", QoS::AtLeastOnce, false, vec![i])
                .await
                .unwrap();
        }
        acked(&mut pel, 6).await;
        // Nothing may be in flight: two queued, four dropped.
        let s = b.stats();
        assert_eq!((s.received, s.delivered, s.dropped), (6, 2, 4), "{s:?}");
    }
}

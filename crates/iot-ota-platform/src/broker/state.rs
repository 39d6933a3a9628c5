//! The broker's state: sessions, subscriptions, retained messages, and
//! routing a message to its subscribers' queues. No sockets and no waiting:
//! every call is a few map operations under the one lock in [`super::Shared`].

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::mqttbytes::v4::Publish;
use rumqttc::mqttbytes::QoS;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

use super::access::Identity;
use super::topic;
use super::{BrokerOptions, Counters};

/// The bound on what queued messages hold across all clients: every
/// message waiting in a client's queue, parked for a persistent session, or
/// in flight until its PUBACK holds a [`Queued`] charge, given back when it
/// is dropped, however that happens (delivered, discarded with its
/// session, a take-over), so the count cannot drift. A copy of a message
/// for each subscriber is charged in full: the payload is shared between
/// them, so the bound is conservative.
#[derive(Debug)]
pub(super) struct QueuePool {
    limit: usize,
    used: AtomicUsize,
}

impl QueuePool {
    /// A pool of `limit` bytes.
    pub(super) fn new(limit: usize) -> Arc<QueuePool> {
        Arc::new(QueuePool {
            limit,
            used: AtomicUsize::new(0),
        })
    }

    /// Bytes held now.
    pub(super) fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// `publish`, charged; `None` (dropped) when the pool is full.
    pub(super) fn charge(self: &Arc<QueuePool>, publish: Publish) -> Option<Queued> {
        // The topic and payload, and the message's own bookkeeping.
        let bytes = publish.topic.len() + publish.payload.len() + 96;
        let before = self.used.fetch_add(bytes, Ordering::Relaxed);
        if before + bytes > self.limit {
            self.used.fetch_sub(bytes, Ordering::Relaxed);
            return None;
        }
        Some(Queued {
            publish,
            released: false,
            bytes,
            pool: self.clone(),
        })
    }
}

/// A message queued for one client, holding its share of the [`QueuePool`].
#[derive(Debug)]
pub(super) struct Queued {
    pub(super) publish: Publish,
    /// A QoS 2 message whose PUBREC came (the client has it) and whose
    /// PUBREL went out: sent again, it is its PUBREL, not the message.
    pub(super) released: bool,
    bytes: usize,
    pool: Arc<QueuePool>,
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.pool.used.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// The routing table and the sessions. One lock; every critical section
/// is a few map operations.
pub(super) struct State {
    pub(super) sessions: HashMap<Arc<str>, Session>,
    /// Filters without wildcards: filter → (client, granted QoS).
    pub(super) exact: HashMap<String, Vec<(Arc<str>, QoS)>>,
    /// Filters with wildcards: (filter, client, granted QoS).
    pub(super) wild: Vec<(String, Arc<str>, QoS)>,
    pub(super) retained: HashMap<String, Publish>,
    pub(super) next_conn: u64,
    pub(super) online: usize,
    /// What queued messages hold, across all clients.
    pub(super) pool: Arc<QueuePool>,
    /// Persistent sessions away (no connection), by when they went away.
    pub(super) away: BTreeSet<(Instant, Arc<str>)>,
}

pub(super) struct Session {
    /// The connection now serving it, if any.
    pub(super) conn: Option<Online>,
    pub(super) persistent: bool,
    /// Its subscriptions (filter, granted QoS), for unsubscribing and cleanup.
    pub(super) filters: Vec<(String, QoS)>,
    /// QoS 1 and 2 messages kept while a persistent session is away.
    pub(super) parked: VecDeque<Queued>,
    /// Who made it: only that identity may connect with its client id.
    pub(super) owner: Identity,
    /// The ids of QoS 2 messages the client sent and has not released
    /// (PUBREL) yet, kept across connections: a message sent again after
    /// a reconnect is not delivered twice.
    pub(super) qos2_in: Vec<u16>,
    /// When a persistent session lost its connection (its key in
    /// [`State::away`]).
    pub(super) away_since: Option<Instant>,
    /// The connection taken over whose state this session waits for: that
    /// one parks what it held here when it ends (and only that one).
    pub(super) taking_over: Option<u64>,
}

pub(super) struct Online {
    pub(super) id: u64,
    pub(super) tx: mpsc::Sender<Queued>,
    pub(super) kick: Arc<Notify>,
    /// Tells the connection to close (its credentials were revoked).
    pub(super) close: Arc<Notify>,
    /// Signalled once the connection has ended and left what it held (in
    /// flight, queued, QoS 2 ids) to its session: a take-over waits for it.
    pub(super) gone: Arc<Notify>,
}

impl State {
    /// No sessions yet; queued messages charged to `pool`.
    pub(super) fn new(pool: Arc<QueuePool>) -> State {
        State {
            sessions: HashMap::new(),
            exact: HashMap::new(),
            wild: Vec::new(),
            retained: HashMap::new(),
            next_conn: 0,
            online: 0,
            pool,
            away: BTreeSet::new(),
        }
    }

    /// `client`'s persistent session lost its connection at `now`: it is
    /// kept, for `expiry` (zero: not at all), and within `max_kept`
    /// sessions away (past it, the one away longest goes). Returns how
    /// many sessions went: `(expired, evicted)`.
    pub(super) fn went_away(
        &mut self,
        client: &Arc<str>,
        now: Instant,
        expiry: Duration,
        max_kept: usize,
    ) -> (usize, usize) {
        if expiry.is_zero() || max_kept == 0 {
            self.remove_session(client);
            return (1, 0);
        }
        let Some(session) = self.sessions.get_mut(client) else {
            return (0, 0);
        };
        if let Some(before) = session.away_since.replace(now) {
            self.away.remove(&(before, client.clone()));
        }
        self.away.insert((now, client.clone()));
        let mut evicted = 0;
        while self.away.len() > max_kept {
            let Some((_, oldest)) = self.away.pop_first() else {
                break;
            };
            log::info!(
                "embedded broker: the session of {oldest} is dropped: {max_kept} sessions \
                 kept away already"
            );
            if let Some(s) = self.sessions.get_mut(&oldest) {
                s.away_since = None;
            }
            self.remove_session(&oldest);
            evicted += 1;
        }
        (0, evicted)
    }

    /// `client`'s session has a connection again: it no longer expires.
    pub(super) fn came_back(&mut self, client: &Arc<str>) {
        if let Some(since) = self
            .sessions
            .get_mut(client)
            .and_then(|s| s.away_since.take())
        {
            self.away.remove(&(since, client.clone()));
        }
    }

    /// Forgets the sessions away for `expiry` or longer at `now`. Returns
    /// how many went, and when the next one expires (`None`: none is away).
    pub(super) fn expire(&mut self, now: Instant, expiry: Duration) -> (usize, Option<Instant>) {
        let mut n = 0;
        while let Some((since, client)) = self.away.first().cloned() {
            // An expiry past what an Instant holds: never.
            let Some(due) = since.checked_add(expiry) else {
                return (n, None);
            };
            if due > now {
                return (n, Some(due));
            }
            self.away.pop_first();
            if let Some(s) = self.sessions.get_mut(&client) {
                s.away_since = None;
            }
            log::debug!("embedded broker: the session of {client} expired");
            self.remove_session(&client);
            n += 1;
        }
        (n, None)
    }

    pub(super) fn subscribe(&mut self, client: &Arc<str>, filter: &str, qos: QoS) {
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

    pub(super) fn unsubscribe(&mut self, client: &Arc<str>, filter: &str) {
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

    pub(super) fn remove_session(&mut self, client: &Arc<str>) {
        if let Some(session) = self.sessions.remove(client) {
            if let Some(since) = session.away_since {
                self.away.remove(&(since, client.clone()));
            }
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
    pub(super) fn route(
        &mut self,
        publish: &Publish,
        options: &BrokerOptions,
        counters: &Counters,
    ) {
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
            // Online, or a persistent session away that keeps QoS 1 and 2.
            let qos = min_qos(publish.qos, granted);
            if session.conn.is_none() && !(session.persistent && qos != QoS::AtMostOnce) {
                continue;
            }
            let mut out = publish.clone();
            out.qos = qos;
            out.retain = false;
            out.dup = false;
            out.pkid = 0;
            let queued = match self.pool.charge(out) {
                None => Err("the broker's queues are full"),
                Some(q) => match &session.conn {
                    Some(online) => {
                        let sent = online.tx.try_send(q).is_ok();
                        let depth = (online.tx.max_capacity() - online.tx.capacity()) as u64;
                        counters.peak_queue.fetch_max(depth, Ordering::Relaxed);
                        sent.then_some(()).ok_or("its queue is full")
                    }
                    None if session.parked.len() < options.max_queued => {
                        session.parked.push_back(q);
                        Ok(())
                    }
                    None => Err("its queue is full"),
                },
            };
            match queued {
                Ok(()) => {
                    counters.delivered.fetch_add(1, Ordering::Relaxed);
                }
                Err(why) => {
                    let n = counters.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                    if n.is_power_of_two() {
                        log::warn!(
                            "embedded broker: a message on {} for {client} dropped: {why} \
                             ({} messages per client, {} bytes in all; {n} dropped in all)",
                            publish.topic,
                            options.max_queued,
                            options.max_queued_bytes
                        );
                    }
                }
            }
        }
    }
}

pub(super) fn qos_level(q: QoS) -> u8 {
    match q {
        QoS::AtMostOnce => 0,
        QoS::AtLeastOnce => 1,
        QoS::ExactlyOnce => 2,
    }
}

pub(super) fn max_qos(a: QoS, b: QoS) -> QoS {
    if qos_level(a) >= qos_level(b) {
        a
    } else {
        b
    }
}

pub(super) fn min_qos(a: QoS, b: QoS) -> QoS {
    if qos_level(a) <= qos_level(b) {
        a
    } else {
        b
    }
}

pub(super) fn retain(state: &mut State, p: &Publish, max: usize) {
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

//! The broker's state: sessions, subscriptions, retained messages, and
//! routing a message to its subscribers' queues. No sockets and no waiting:
//! every call is a few map operations under the one lock in [`super::Shared`].

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use rumqttc::mqttbytes::v4::Publish;
use rumqttc::mqttbytes::QoS;
use tokio::sync::{mpsc, Notify};

use super::access::Identity;
use super::topic;
use super::{BrokerOptions, Counters};

/// The routing table and the sessions. One lock; every critical section
/// is a few map operations.
#[derive(Default)]
pub(super) struct State {
    pub(super) sessions: HashMap<Arc<str>, Session>,
    /// Filters without wildcards: filter → (client, granted QoS).
    pub(super) exact: HashMap<String, Vec<(Arc<str>, QoS)>>,
    /// Filters with wildcards: (filter, client, granted QoS).
    pub(super) wild: Vec<(String, Arc<str>, QoS)>,
    pub(super) retained: HashMap<String, Publish>,
    pub(super) next_conn: u64,
    pub(super) online: usize,
}

pub(super) struct Session {
    /// The connection now serving it, if any.
    pub(super) conn: Option<Online>,
    pub(super) persistent: bool,
    /// Its subscriptions (filter, granted QoS), for unsubscribing and cleanup.
    pub(super) filters: Vec<(String, QoS)>,
    /// QoS 1 messages kept while a persistent session is away.
    pub(super) parked: VecDeque<Publish>,
    /// Who made it: only that identity may connect with its client id.
    pub(super) owner: Identity,
}

pub(super) struct Online {
    pub(super) id: u64,
    pub(super) tx: mpsc::Sender<Publish>,
    pub(super) kick: Arc<Notify>,
    /// Tells the connection to close (its credentials were revoked).
    pub(super) close: Arc<Notify>,
}

impl State {
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

//! One client connection: the CONNECT and its session take-over, the read,
//! write and keep-alive loop, the packets, and the cleanup (a persistent
//! session keeps what was not acknowledged; a lost connection sends its
//! will).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{
    ConnAck, ConnectReturnCode, Packet, PubAck, PubComp, PubRec, PubRel, Publish, SubAck,
    SubscribeReasonCode, UnsubAck,
};
use rumqttc::mqttbytes::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;

use super::access::{Identity, Refusal};
use super::budget::Ticket;
use super::state::{min_qos, retain, Online, Queued, Session};
use super::strict::{self, Violation};
use super::topic;
use super::Shared;

/// How long a take-over waits for the connection it took over to end and
/// leave its state (it hears the take-over at once, even mid-write).
const HANDOVER_WAIT: Duration = Duration::from_secs(10);

/// Why a connection ended.
enum End {
    /// DISCONNECT, or the broker stopping: no will.
    Clean,
    /// Another connection took the session over: the will is sent (as
    /// Mosquitto does), the session is kept.
    TakenOver,
    /// Anything else (network, keep-alive, protocol error): the will is sent.
    Lost(String),
}

pub(super) async fn connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let max = shared.options.max_packet_size;
    let mut rd = BytesMut::with_capacity(512);
    // What this connection's incomplete packets hold of the shared bound.
    let evict = Arc::new(Notify::new());
    let mut ticket = shared.budget.ticket(evict.clone());
    let connect = match tokio::time::timeout(
        shared.options.connect_timeout,
        read_packet(&mut stream, &mut rd, max, &mut ticket, &evict),
    )
    .await
    {
        Ok(Ok(Packet::Connect(c))) => c,
        Ok(Ok(_)) => {
            log::debug!("embedded broker: {peer}: the first packet was not CONNECT");
            return;
        }
        Ok(Err(Violation::UnsupportedLevel(level))) => {
            // MQTT-3.1.2-2: CONNACK 0x01, so that an MQTT 3.1 stack can fall back.
            log::debug!("embedded broker: {peer}: protocol level {level} refused");
            let mut wr = BytesMut::with_capacity(4);
            let _ = ConnAck::new(ConnectReturnCode::RefusedProtocolVersion, false).write(&mut wr);
            let _ = stream.write_all(&wr).await;
            return;
        }
        Ok(Err(Violation::Close(e))) => {
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
    // Who it is: the authenticator's word, or anyone on an open broker.
    let identity = match &shared.options.auth {
        None => Identity::Anonymous,
        Some(auth) => {
            let (user, pass) = match &connect.login {
                Some(l) => (Some(l.username.as_str()), Some(l.password.as_bytes())),
                None => (None, None),
            };
            match auth.authenticate(&connect.client_id, user, pass) {
                Ok(identity) => identity,
                Err(Refusal::NotAuthorized(why)) => {
                    shared
                        .counters
                        .refused_connects
                        .fetch_add(1, Ordering::Relaxed);
                    log::info!(
                        "embedded broker: {peer} ({:?}, user {user:?}) not authorized: {why}",
                        connect.client_id
                    );
                    refuse(ConnectReturnCode::NotAuthorized, &mut wr);
                    let _ = stream.write_all(&wr).await;
                    return;
                }
            }
        }
    };
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
    let (tx, mut rx) = mpsc::channel::<Queued>(shared.options.max_queued.max(1));
    let kick = Arc::new(Notify::new());
    let close = Arc::new(Notify::new());
    let gone = Arc::new(Notify::new());
    let registered = 'register: {
        let mut state = shared.state();
        if state.online >= shared.options.max_connections {
            break 'register Err(ConnectReturnCode::ServiceUnavailable);
        }
        // A client id is one identity's: another may not take its session
        // over (and read what it queued, or cut it off).
        if state
            .sessions
            .get(&client)
            .is_some_and(|s| s.owner != identity)
        {
            break 'register Err(ConnectReturnCode::BadClientId);
        }
        state.next_conn += 1;
        let id = state.next_conn;
        let mut present = false;
        let mut parked = VecDeque::new();
        let mut qos2_in = Vec::new();
        // The connection this one takes over, if any: what it holds comes
        // to the session when it ends, and this one waits for that.
        let mut taken: Option<(u64, Arc<Notify>)> = None;
        state.came_back(&client);
        if let Some(old) = state.sessions.get_mut(&client) {
            if let Some(o) = old.conn.take() {
                o.kick.notify_one();
                taken = Some((o.id, o.gone.clone()));
                state.online -= 1;
            }
            let old = state.sessions.get_mut(&client).expect("just found");
            if persistent && old.persistent {
                present = true;
                parked = std::mem::take(&mut old.parked);
                qos2_in = std::mem::take(&mut old.qos2_in);
            }
        }
        if !present {
            state.remove_session(&client);
        }
        let session = state.sessions.entry(client.clone()).or_insert(Session {
            conn: None,
            persistent,
            filters: Vec::new(),
            parked: VecDeque::new(),
            owner: identity.clone(),
            qos2_in: Vec::new(),
            away_since: None,
            taking_over: None,
        });
        session.persistent = persistent;
        // Only a session that goes on gets the old connection's state.
        session.taking_over = taken.as_ref().filter(|_| present).map(|t| t.0);
        session.conn = Some(Online {
            id,
            tx: tx.clone(),
            kick: kick.clone(),
            close: close.clone(),
            gone: gone.clone(),
        });
        for p in parked {
            if tx.try_send(p).is_err() {
                shared.counters.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        state.online += 1;
        let waits = taken.filter(|_| present).map(|t| t.1);
        Ok((id, present, qos2_in, waits))
    };
    let (conn_id, session_present, mut qos2_in, waits) = match registered {
        Ok(r) => r,
        Err(code) => {
            refuse(code, &mut wr);
            let _ = stream.write_all(&wr).await;
            if code == ConnectReturnCode::ServiceUnavailable {
                log::warn!(
                    "embedded broker: refused {client}: {} connections already",
                    shared.options.max_connections
                );
            } else {
                shared
                    .counters
                    .refused_connects
                    .fetch_add(1, Ordering::Relaxed);
                log::info!("embedded broker: refused {client}: its session is another's");
            }
            return;
        }
    };
    // A take-over of a session that goes on: the old connection leaves
    // what it held (in flight, queued, the QoS 2 ids it has not seen
    // released) to the session as it ends; they are taken before this one
    // sends anything, so its packet ids cannot collide with theirs and a
    // message the client sends again is still known.
    if let Some(gone) = waits {
        if tokio::time::timeout(HANDOVER_WAIT, gone.notified())
            .await
            .is_err()
        {
            log::warn!("embedded broker: {client}: the connection taken over did not end in time");
        }
        let mut state = shared.state();
        if let Some(session) = state.sessions.get_mut(&client) {
            if session.conn.as_ref().is_some_and(|o| o.id == conn_id) {
                session.taking_over = None;
                for id in std::mem::take(&mut session.qos2_in) {
                    if !qos2_in.contains(&id) {
                        qos2_in.push(id);
                    }
                }
                // Older than anything routed here since: first in the queue.
                let newer: Vec<Queued> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
                for p in std::mem::take(&mut session.parked).into_iter().chain(newer) {
                    if tx.try_send(p).is_err() {
                        shared.counters.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }
    shared.counters.connects.fetch_add(1, Ordering::Relaxed);
    shared.counters.connections.fetch_add(1, Ordering::Relaxed);
    log::debug!("embedded broker: {client} connected from {peer}");
    let _ = ConnAck::new(ConnectReturnCode::Success, session_present).write(&mut wr);

    let mut conn = Conn {
        identity,
        client: client.clone(),
        shared: shared.clone(),
        own: tx,
        inflight: VecDeque::new(),
        next_pkid: 0,
        qos2_in,
    };
    // Packet ids are 16 bits: never more in flight than there are ids.
    let max_inflight = shared.options.max_inflight.min(usize::from(u16::MAX) - 1);
    let keep_alive = Duration::from_secs(u64::from(connect.keep_alive));
    // Keep-alive 0 asks for no timeout; an idle limit still bounds it.
    let grace = if keep_alive.is_zero() {
        shared.options.idle_timeout
    } else {
        keep_alive + keep_alive / 2
    };
    let packet_timeout = shared.options.packet_timeout;
    // Set while a packet has begun and not ended: it must end by then.
    let mut packet_deadline: Option<Instant> = None;
    let write_timeout = grace.max(Duration::from_secs(30));
    let mut deadline = Instant::now() + grace;
    // The CONNACK goes out before anything pipelined behind the CONNECT is
    // looked at: a client whose next packet breaks the rules has still
    // been told it was connected (as Mosquitto does).
    if tokio::time::timeout(write_timeout, stream.write_all(&wr))
        .await
        .map_or(true, |r| r.is_err())
    {
        log::debug!("embedded broker: {client}: the CONNACK could not be sent");
    }
    wr.clear();
    // Packets sent right behind the CONNECT (pipelined) are already read.
    let end = match conn.take_packets(&mut rd, &mut wr) {
        Ok(true) => {
            if !rd.is_empty() {
                packet_deadline = Some(Instant::now() + packet_timeout);
            }
            ticket.hold(held(&rd)).err().map(End::Lost)
        }
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
                // A take-over is heard during a write too: the new
                // connection waits for this one to end.
                let written = tokio::select! {
                    w = tokio::time::timeout(write_timeout, stream.write_all(&wr)) => w,
                    _ = kick.notified() => break End::TakenOver,
                };
                match written {
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
                        let now = Instant::now();
                        deadline = now + grace;
                        match conn.take_packets(&mut rd, &mut wr) {
                            Ok(true) => {}
                            Ok(false) => break End::Clean,
                            Err(e) => break End::Lost(e),
                        }
                        if rd.is_empty() {
                            packet_deadline = None;
                            // One big packet must not keep its buffer.
                            if rd.capacity() > 64 * 1024 {
                                rd = BytesMut::with_capacity(512);
                            }
                        } else {
                            if packet_deadline.is_none() {
                                packet_deadline = Some(now + packet_timeout);
                            }
                            if let Err(e) = make_room(&mut rd, max) {
                                break End::Lost(e);
                            }
                        }
                        if let Err(e) = ticket.hold(held(&rd)) {
                            break End::Lost(e);
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
                _ = tokio::time::sleep_until(deadline) => {
                    shared.counters.timed_out.fetch_add(1, Ordering::Relaxed);
                    break End::Lost(if keep_alive.is_zero() {
                        "idle (keep-alive 0) past the idle limit".into()
                    } else {
                        "keep-alive timeout".into()
                    });
                }
                _ = tokio::time::sleep_until(packet_deadline.unwrap_or(deadline)),
                    if packet_deadline.is_some() =>
                {
                    shared.counters.timed_out.fetch_add(1, Ordering::Relaxed);
                    break End::Lost(format!("a packet not finished within {packet_timeout:?}"));
                }
                _ = close.notified() => {
                    break End::Lost("closed by the platform (credentials revoked)".into());
                }
                _ = evict.notified() => {
                    break End::Lost("closed by the bound on incomplete packets".into());
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
                let mut parked: VecDeque<Queued> =
                    conn.inflight.drain(..).map(|(_, p)| p).collect();
                while let Ok(p) = rx.try_recv() {
                    if p.publish.qos != QoS::AtMostOnce {
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
                session.qos2_in = std::mem::take(&mut conn.qos2_in);
                let (expired, evicted) = state.went_away(
                    &client,
                    Instant::now(),
                    shared.options.session_expiry,
                    shared.options.max_kept_sessions,
                );
                let counters = &shared.counters;
                counters
                    .expired_sessions
                    .fetch_add(expired as u64, Ordering::Relaxed);
                counters
                    .evicted_sessions
                    .fetch_add(evicted as u64, Ordering::Relaxed);
            } else {
                state.remove_session(&client);
            }
        } else if let Some(session) = state.sessions.get_mut(&client) {
            // Taken over, whatever ended this connection first: a session
            // that goes on gets what this one had in flight or queued, and
            // the QoS 2 ids it has not seen released; the new connection
            // waits for them (`gone`, below) before it sends anything.
            if session.taking_over == Some(conn_id) {
                let pending: Vec<Queued> = conn
                    .inflight
                    .drain(..)
                    .map(|(_, p)| p)
                    .chain(std::iter::from_fn(|| rx.try_recv().ok()))
                    .filter(|p| p.publish.qos != QoS::AtMostOnce)
                    .collect();
                for p in pending.into_iter().rev() {
                    session.parked.push_front(p);
                }
                while session.parked.len() > shared.options.max_queued {
                    session.parked.pop_back();
                    dropped += 1;
                }
                for id in std::mem::take(&mut conn.qos2_in) {
                    if !session.qos2_in.contains(&id) {
                        session.qos2_in.push(id);
                    }
                }
            }
        }
        shared
            .counters
            .dropped
            .fetch_add(dropped, Ordering::Relaxed);
        // The will is for a connection that did not say DISCONNECT: lost,
        // or taken over by a new one (as Mosquitto does: the old
        // connection's end is news to whoever watches its will).
        match &end {
            End::Lost(_) | End::TakenOver => connect.last_will.clone(),
            End::Clean => None,
        }
    };
    shared.counters.connections.fetch_sub(1, Ordering::Relaxed);
    // What this connection held is with its session now.
    gone.notify_one();
    match &end {
        End::Lost(why) => log::debug!("embedded broker: {client} lost: {why}"),
        End::TakenOver => log::debug!("embedded broker: {client} taken over"),
        End::Clean => log::debug!("embedded broker: {client} disconnected"),
    }
    let will = will.filter(|w| {
        let allowed = conn.identity.may_use(&w.topic);
        if !allowed {
            shared
                .counters
                .refused_publishes
                .fetch_add(1, Ordering::Relaxed);
            log::info!("embedded broker: {client}: will on {} refused", w.topic);
        }
        allowed
    });
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

/// Gives a read buffer that holds the start of a packet room for all of
/// it, at once: one allocation of the announced size (whose untouched pages
/// cost no memory) instead of doublings that leave freed copies behind in
/// the allocator. `Err` for a packet announced over `max`.
fn make_room(rd: &mut BytesMut, max: usize) -> Result<(), String> {
    if let Some(total) = strict::announced_len(rd)? {
        // `max` bounds what follows the fixed header (at most 5 bytes).
        if total > max + 5 {
            return Err(format!("a packet of {total} bytes, over {max}"));
        }
        if total > rd.len() {
            rd.reserve(total - rd.len());
        }
    }
    Ok(())
}

/// What a read buffer holds of the bound: nothing when empty, else its
/// allocation.
fn held(rd: &BytesMut) -> usize {
    if rd.is_empty() {
        0
    } else {
        rd.capacity()
    }
}

/// Reads until one whole packet is in `rd`, checks it ([`strict`]) and
/// returns it; its bytes count against the bound meanwhile.
async fn read_packet(
    stream: &mut TcpStream,
    rd: &mut BytesMut,
    max: usize,
    ticket: &mut Ticket,
    evict: &Notify,
) -> Result<Packet, Violation> {
    let close = Violation::Close;
    loop {
        if let Some(n) = strict::frame_len(rd).map_err(close)? {
            strict::check(&rd[..n])?;
            let packet = Packet::read(rd, max).map_err(|e| close(e.to_string()));
            ticket.hold(held(rd)).map_err(close)?;
            return packet;
        }
        make_room(rd, max).map_err(close)?;
        ticket.hold(held(rd)).map_err(close)?;
        let read = tokio::select! {
            read = stream.read_buf(rd) => read,
            _ = evict.notified() => {
                return Err(close("closed by the bound on incomplete packets".into()));
            }
        };
        match read {
            Ok(0) => return Err(close("closed before CONNECT".into())),
            Ok(_) => ticket.hold(held(rd)).map_err(close)?,
            Err(e) => return Err(close(e.to_string())),
        }
    }
}

/// One connection's protocol state.
struct Conn {
    /// Who it is: what it may subscribe to and publish on.
    identity: Identity,
    client: Arc<str>,
    shared: Arc<Shared>,
    /// This connection's own queue (retained messages for a new
    /// subscription go through it, under the in-flight limit like the rest).
    own: mpsc::Sender<Queued>,
    /// QoS 1 and 2 messages sent and not acknowledged (PUBACK, PUBCOMP),
    /// oldest first (still charged to the pool of queued bytes).
    inflight: VecDeque<(u16, Queued)>,
    next_pkid: u16,
    /// QoS 2 packet ids received and not released yet.
    qos2_in: Vec<u16>,
}

impl Conn {
    /// Writes `q` to the client; a QoS 1 or 2 message gets a packet id
    /// and waits for its PUBACK, or its PUBREC and then its PUBCOMP.
    fn send(&mut self, mut q: Queued, wr: &mut BytesMut) {
        if q.publish.qos == QoS::AtMostOnce {
            let _ = q.publish.write(wr);
            return;
        }
        // A message sent before (kept by a persistent session) goes again
        // with its packet id, as the spec wants (MQTT-4.4.0-1): a late
        // acknowledgement for that id is then this very message's.
        let id = q.publish.pkid;
        let again = id != 0 && !self.inflight.iter().any(|(i, _)| *i == id);
        match (again, q.released) {
            // The client has it (PUBREC came): only the PUBREL again.
            (true, true) => {
                let _ = PubRel::new(id).write(wr);
            }
            (true, false) => {
                q.publish.dup = true;
                let _ = q.publish.write(wr);
            }
            // Received already, and its id taken meanwhile: nothing to send.
            (false, true) => return,
            (false, false) => {
                q.publish.pkid = self.pkid();
                let _ = q.publish.write(wr);
            }
        }
        self.inflight.push_back((q.publish.pkid, q));
    }

    /// The message in flight with packet id `id` at `qos`, if any.
    fn in_flight(&self, id: u16, qos: QoS) -> Option<usize> {
        self.inflight
            .iter()
            .position(|(i, q)| *i == id && q.publish.qos == qos)
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
            match strict::frame_len(rd) {
                Ok(Some(n)) => match strict::check(&rd[..n]) {
                    Ok(()) => {}
                    Err(Violation::Close(e)) => return Err(e),
                    Err(Violation::UnsupportedLevel(_)) => return Err("a second CONNECT".into()),
                },
                Ok(None) if rd.len() > max => return Err(format!("a packet over {max} bytes")),
                Ok(None) => return Ok(true),
                Err(e) => return Err(e),
            }
            let packet = match Packet::read(rd, max) {
                Ok(p) => p,
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => return Ok(true),
                Err(e) => return Err(format!("bad packet: {e}")),
            };
            match packet {
                Packet::Publish(p) => self.publish(p, wr)?,
                Packet::PubAck(ack) => {
                    if let Some(i) = self.in_flight(ack.pkid, QoS::AtLeastOnce) {
                        self.inflight.remove(i);
                    }
                }
                Packet::PubRec(rec) => {
                    // The client has the message: it is released, and its
                    // id stays taken until the PUBCOMP.
                    if let Some(i) = self.in_flight(rec.pkid, QoS::ExactlyOnce) {
                        self.inflight[i].1.released = true;
                    }
                    let _ = PubRel::new(rec.pkid).write(wr);
                }
                Packet::PubComp(comp) => {
                    if let Some(i) = self.in_flight(comp.pkid, QoS::ExactlyOnce) {
                        if self.inflight[i].1.released {
                            self.inflight.remove(i);
                        }
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
                            let allowed = self.identity.may_use(&f.path);
                            if !allowed {
                                self.shared
                                    .counters
                                    .refused_subscribes
                                    .fetch_add(1, Ordering::Relaxed);
                            }
                            if !allowed
                                || !topic::valid_filter(&f.path)
                                || f.path.starts_with("$share/")
                                || held > self.shared.options.max_subscriptions
                            {
                                codes.push(SubscribeReasonCode::Failure);
                                continue;
                            }
                            let qos = f.qos;
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
                        let sent = match self.shared.pool.charge(p) {
                            Some(q) => self.own.try_send(q).is_ok(),
                            None => false,
                        };
                        if !sent {
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
                } else if self.qos2_in.len() >= self.shared.options.max_inflight {
                    return Err(format!(
                        "{} QoS 2 messages not released (PUBREL), at most {}",
                        self.qos2_in.len() + 1,
                        self.shared.options.max_inflight
                    ));
                } else {
                    self.qos2_in.push(p.pkid);
                    true
                }
            }
        };
        // Another's topic: acknowledged (as Mosquitto does with MQTT
        // 3.1.1), dropped, and counted.
        if !self.identity.may_use(&p.topic) {
            if fresh {
                counters.refused_publishes.fetch_add(1, Ordering::Relaxed);
                log::info!(
                    "embedded broker: {}: publish on {} refused",
                    self.client,
                    p.topic
                );
            }
            return Ok(());
        }
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

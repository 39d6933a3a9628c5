//! An MQTT client that records what crosses the wire, and publishes.

use std::collections::HashSet;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use rumqttc::{
    AsyncClient, Event, EventLoop, Incoming, MqttOptions, Outgoing, QoS, SubscribeFilter,
    SubscribeReasonCode, TlsConfiguration, Transport,
};
use rustls::ClientConfig;
use serde_json::Value;
use tokio::sync::oneshot;

use crate::signal::Watched;
use crate::TestCa;

/// How long `connect`, `subscribe` and `publish` wait for the broker.
const OP_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between reconnection attempts after the connection broke.
const RECONNECT_PAUSE: Duration = Duration::from_millis(100);
/// Largest packet accepted or sent: far above any OTA message.
const MAX_PACKET: usize = 16 * 1024 * 1024;

/// One message the recorder received.
#[derive(Clone, PartialEq)]
pub struct WireMessage {
    /// The topic it was published on.
    pub topic: String,
    /// The raw payload.
    pub payload: Vec<u8>,
    /// The payload parsed as JSON, if it is JSON.
    pub json: Option<Value>,
    /// The QoS it was delivered with (0, 1 or 2).
    pub qos: u8,
    /// Whether it was a retained message.
    pub retain: bool,
}

impl WireMessage {
    fn new(topic: String, payload: Vec<u8>, qos: QoS, retain: bool) -> Self {
        let json = serde_json::from_slice(&payload).ok();
        WireMessage {
            topic,
            payload,
            json,
            qos: qos as u8,
            retain,
        }
    }

    /// The JSON value at a dot path: `"data.firmwareVersion"`, `"msgId"`,
    /// or `"list.0.name"` (a number indexes an array); `""` is the whole
    /// document. `None` if the payload is not JSON or the path is absent.
    pub fn json_path(&self, path: &str) -> Option<Value> {
        let mut value = self.json.as_ref()?;
        for key in path.split('.').filter(|k| !k.is_empty()) {
            value = match value {
                Value::Object(map) => map.get(key)?,
                Value::Array(items) => items.get(key.parse::<usize>().ok()?)?,
                _ => return None,
            };
        }
        Some(value.clone())
    }

    /// The string at a dot path (see [`WireMessage::json_path`]); `None`
    /// if it is absent or not a string.
    pub fn json_str(&self, path: &str) -> Option<String> {
        match self.json_path(path)? {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The integer at a dot path; `None` if absent or not an integer.
    pub fn json_i64(&self, path: &str) -> Option<i64> {
        self.json_path(path)?.as_i64()
    }

    /// The payload as UTF-8 text, if it is.
    pub fn payload_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.payload).ok()
    }
}

impl fmt::Debug for WireMessage {
    // Payloads are JSON text: show them as text, not as a list of numbers.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WireMessage")
            .field("topic", &self.topic)
            .field("payload", &String::from_utf8_lossy(&self.payload))
            .field("qos", &self.qos)
            .field("retain", &self.retain)
            .finish()
    }
}

/// Connection settings beyond a plain anonymous `mqtt://` connection.
#[derive(Clone, Default)]
pub struct RecorderOptions {
    /// The TLS client config for `mqtts://` URLs (required for them).
    pub tls: Option<Arc<ClientConfig>>,
    /// Username and password.
    pub credentials: Option<(String, String)>,
    /// The MQTT client id; a unique one is made when `None`.
    pub client_id: Option<String>,
    /// How long `connect_with` waits to be connected and subscribed;
    /// 10 s when `None`. Shorten it in tests that expect a refusal.
    pub connect_timeout: Option<Duration>,
}

impl RecorderOptions {
    /// Options trusting `ca` for `mqtts://` URLs.
    pub fn trusting(ca: &TestCa) -> Self {
        RecorderOptions {
            tls: Some(ca.client_config()),
            ..Self::default()
        }
    }

    /// Adds a username and password.
    pub fn credentials(mut self, user: &str, password: &str) -> Self {
        self.credentials = Some((user.to_string(), password.to_string()));
        self
    }
}

/// What the event-loop thread shares with the [`WireRecorder`] handle.
#[derive(Default)]
struct State {
    messages: Vec<WireMessage>,
    filters: Vec<String>,
    /// Connected, and every filter subscribed in this session.
    ready: bool,
    connected: bool,
    subacks: u64,
    last_error: Option<String>,
    /// A publish or subscribe is waiting for its acknowledgement: they go
    /// one at a time, so that the packet id of "the next outgoing publish"
    /// is unambiguously the caller's.
    busy: bool,
    outgoing_publishes: u64,
    last_publish_pkid: u16,
    pubacks: HashSet<u16>,
}

/// An MQTT client that subscribes to a filter at QoS 1 and records every
/// message it receives; it also publishes (e.g. upgrade commands).
///
/// It runs rumqttc on its own thread and runtime, so the blocking methods
/// work from sync tests, and the `*_async` ones from async tests without
/// stalling the runtime the device under test shares. After a broker
/// restart it reconnects and subscribes again by itself
/// ([`WireRecorder::wait_ready`] tells when). Dropping it disconnects and
/// joins the thread.
pub struct WireRecorder {
    shared: Arc<Watched<State>>,
    client: AsyncClient,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl WireRecorder {
    /// Connects to `url` (`mqtt://127.0.0.1:PORT`) and subscribes to
    /// `filter` at QoS 1; returns once the SUBACK arrived. Panics if that
    /// does not happen within 10 s.
    pub fn connect(url: &str, filter: &str) -> WireRecorder {
        Self::connect_with(url, &[filter], RecorderOptions::default())
            .unwrap_or_else(|e| panic!("wire recorder cannot connect to {url}: {e}"))
    }

    /// Connects with `options` and subscribes to every filter; returns once
    /// they are all acknowledged, or an error after the connect timeout
    /// (the error names the last connection error, e.g. a refusal).
    pub fn connect_with(
        url: &str,
        filters: &[&str],
        options: RecorderOptions,
    ) -> io::Result<WireRecorder> {
        let timeout = options.connect_timeout.unwrap_or(OP_TIMEOUT);
        let mqtt = mqtt_options(url, options)?;
        let shared = Arc::new(Watched::new(State {
            filters: filters.iter().map(|f| f.to_string()).collect(),
            ..State::default()
        }));
        let (client, eventloop) = AsyncClient::new(mqtt, 64);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (shutdown, stopped) = oneshot::channel();
        let driver = Driver {
            shared: shared.clone(),
            client: client.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("testkit-wire-recorder".into())
            .spawn(move || runtime.block_on(driver.run(eventloop, stopped)))?;
        let recorder = WireRecorder {
            shared,
            client,
            shutdown: Some(shutdown),
            thread: Some(thread),
        };
        if !recorder.wait_ready(timeout) {
            let why = recorder.shared.lock().last_error.clone();
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "not connected and subscribed within {timeout:?} (last error: {})",
                    why.as_deref().unwrap_or("none")
                ),
            ));
        }
        Ok(recorder)
    }

    /// Blocks until connected with every filter subscribed (after a broker
    /// restart, until the recorder is back); false on timeout.
    pub fn wait_ready(&self, timeout: Duration) -> bool {
        self.shared
            .wait(timeout, |s| s.ready.then_some(()))
            .is_some()
    }

    /// [`WireRecorder::wait_ready`] for async tests.
    pub async fn wait_ready_async(&self, timeout: Duration) -> bool {
        let ready = self.shared.wait_async(timeout, |s| s.ready.then_some(()));
        ready.await.is_some()
    }

    /// Whether the connection to the broker is up right now.
    pub fn is_connected(&self) -> bool {
        self.shared.lock().connected
    }

    /// Subscribes to one more filter at QoS 1 and waits for its SUBACK.
    pub fn subscribe(&self, filter: &str) -> io::Result<()> {
        let _busy = self.acquire(self.shared.wait(OP_TIMEOUT, try_acquire))?;
        let before = self.begin_subscribe(filter)?;
        let acked = self
            .shared
            .wait(OP_TIMEOUT, |s| (s.subacks > before).then_some(()));
        acked.ok_or_else(|| timed_out("SUBACK"))
    }

    /// Every message received so far, in arrival order.
    pub fn messages(&self) -> Vec<WireMessage> {
        self.shared.lock().messages.clone()
    }

    /// The JSON payloads received on exactly `topic`, in arrival order
    /// (payloads that are not JSON are skipped).
    pub fn json_on(&self, topic: &str) -> Vec<Value> {
        self.shared
            .lock()
            .messages
            .iter()
            .filter(|m| m.topic == topic)
            .filter_map(|m| m.json.clone())
            .collect()
    }

    /// `data.firmwareVersion` of every message received on `topic` (an
    /// inform's version, a report's target), in arrival order.
    pub fn versions_on(&self, topic: &str) -> Vec<String> {
        self.json_on(topic)
            .iter()
            .map(|v| {
                v["data"]["firmwareVersion"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned()
            })
            .collect()
    }

    /// `(status, progress)` of every OTA progress report received on
    /// `topic` (`data.status`, `data.progress`), in arrival order.
    pub fn progress_on(&self, topic: &str) -> Vec<(i64, i64)> {
        self.json_on(topic)
            .iter()
            .filter_map(|v| {
                Some((
                    v["data"]["status"].as_i64()?,
                    v["data"]["progress"].as_i64()?,
                ))
            })
            .collect()
    }

    /// Forgets the messages received so far.
    pub fn clear(&self) {
        self.shared.lock().messages.clear();
    }

    /// One line per message received (topic and payload text): for a
    /// failing assertion's message.
    pub fn summary(&self) -> String {
        let state = self.shared.lock();
        let lines: Vec<String> = state
            .messages
            .iter()
            .map(|m| format!("{} {}", m.topic, String::from_utf8_lossy(&m.payload)))
            .collect();
        lines.join("\n")
    }

    /// Blocks until a received message matches `pred` (messages received
    /// before the call count: [`WireRecorder::clear`] first to wait for a
    /// new one), or `timeout` passes. Returns the first match.
    pub fn wait_for(
        &self,
        pred: impl Fn(&WireMessage) -> bool,
        timeout: Duration,
    ) -> Option<WireMessage> {
        self.shared.wait(timeout, |s| first_match(s, &pred))
    }

    /// [`WireRecorder::wait_for`] for async tests.
    pub async fn wait_for_async(
        &self,
        pred: impl Fn(&WireMessage) -> bool,
        timeout: Duration,
    ) -> Option<WireMessage> {
        self.shared
            .wait_async(timeout, |s| first_match(s, &pred))
            .await
    }

    /// [`WireRecorder::wait_for`] a message on exactly `topic`.
    pub fn wait_for_topic(&self, topic: &str, timeout: Duration) -> Option<WireMessage> {
        self.wait_for(|m| m.topic == topic, timeout)
    }

    /// Blocks until `n` received messages match `pred`, or `timeout` passes;
    /// returns the matches (fewer than `n` on timeout, so a test can show
    /// what did arrive).
    pub fn wait_count(
        &self,
        pred: impl Fn(&WireMessage) -> bool,
        n: usize,
        timeout: Duration,
    ) -> Vec<WireMessage> {
        let enough = self.shared.wait(timeout, |s| n_matches(s, &pred, n));
        enough.unwrap_or_else(|| all_matches(&self.shared.lock(), &pred))
    }

    /// [`WireRecorder::wait_count`] for async tests.
    pub async fn wait_count_async(
        &self,
        pred: impl Fn(&WireMessage) -> bool,
        n: usize,
        timeout: Duration,
    ) -> Vec<WireMessage> {
        let enough = self.shared.wait_async(timeout, |s| n_matches(s, &pred, n));
        match enough.await {
            Some(found) => found,
            None => all_matches(&self.shared.lock(), &pred),
        }
    }

    /// Publishes `payload` on `topic`, not retained, at QoS 1 (`qos1`) or
    /// QoS 0. With QoS 1 it returns once the broker's PUBACK arrived; with
    /// QoS 0 once the packet was handed to the connection.
    pub fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>, qos1: bool) -> io::Result<()> {
        let _busy = self.acquire(self.shared.wait(OP_TIMEOUT, try_acquire))?;
        let before = self.begin_publish(topic, payload.into(), qos1)?;
        let pkid = self.shared.wait(OP_TIMEOUT, |s| sent_pkid(s, before));
        let pkid = pkid.ok_or_else(|| timed_out("the publish to be sent"))?;
        if qos1 {
            let acked = self
                .shared
                .wait(OP_TIMEOUT, |s| s.pubacks.remove(&pkid).then_some(()));
            acked.ok_or_else(|| timed_out("PUBACK"))?;
        }
        Ok(())
    }

    /// [`WireRecorder::publish`] for async tests.
    pub async fn publish_async(
        &self,
        topic: &str,
        payload: impl Into<Vec<u8>>,
        qos1: bool,
    ) -> io::Result<()> {
        let _busy = self.acquire(self.shared.wait_async(OP_TIMEOUT, try_acquire).await)?;
        let before = self.begin_publish(topic, payload.into(), qos1)?;
        let pkid = self
            .shared
            .wait_async(OP_TIMEOUT, |s| sent_pkid(s, before))
            .await;
        let pkid = pkid.ok_or_else(|| timed_out("the publish to be sent"))?;
        if qos1 {
            let acked = self
                .shared
                .wait_async(OP_TIMEOUT, |s| s.pubacks.remove(&pkid).then_some(()))
                .await;
            acked.ok_or_else(|| timed_out("PUBACK"))?;
        }
        Ok(())
    }

    /// Turns a successful wait for the busy flag into a guard clearing it.
    fn acquire(&self, acquired: Option<()>) -> io::Result<Busy<'_>> {
        acquired.ok_or_else(|| timed_out("an earlier publish or subscribe"))?;
        Ok(Busy(&self.shared))
    }

    /// Queues the publish; returns the outgoing-publish count before it.
    fn begin_publish(&self, topic: &str, payload: Vec<u8>, qos1: bool) -> io::Result<u64> {
        let before = self.shared.lock().outgoing_publishes;
        let qos = if qos1 {
            QoS::AtLeastOnce
        } else {
            QoS::AtMostOnce
        };
        self.client
            .try_publish(topic, qos, false, payload)
            .map_err(io::Error::other)?;
        Ok(before)
    }

    /// Records and queues a subscription; returns the SUBACK count before it.
    fn begin_subscribe(&self, filter: &str) -> io::Result<u64> {
        let before = self.shared.update(|s| {
            s.filters.push(filter.to_string());
            s.subacks
        });
        self.client
            .try_subscribe(filter, QoS::AtLeastOnce)
            .map_err(io::Error::other)?;
        Ok(before)
    }
}

impl Drop for WireRecorder {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Clears the busy flag when a publish or subscribe ends, however it ends
/// (an async caller may also drop the future midway).
struct Busy<'a>(&'a Watched<State>);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.update(|s| s.busy = false);
    }
}

fn try_acquire(s: &mut State) -> Option<()> {
    (!s.busy).then(|| s.busy = true)
}

fn sent_pkid(s: &mut State, before: u64) -> Option<u16> {
    (s.outgoing_publishes > before).then_some(s.last_publish_pkid)
}

fn first_match(s: &mut State, pred: &impl Fn(&WireMessage) -> bool) -> Option<WireMessage> {
    s.messages.iter().find(|m| pred(m)).cloned()
}

fn all_matches(s: &State, pred: &impl Fn(&WireMessage) -> bool) -> Vec<WireMessage> {
    s.messages.iter().filter(|m| pred(m)).cloned().collect()
}

fn n_matches(
    s: &mut State,
    pred: &impl Fn(&WireMessage) -> bool,
    n: usize,
) -> Option<Vec<WireMessage>> {
    let found = all_matches(s, pred);
    (found.len() >= n).then_some(found)
}

fn timed_out(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("timed out waiting for {what}"),
    )
}

/// The event loop's side: polls rumqttc and records what happens.
struct Driver {
    shared: Arc<Watched<State>>,
    client: AsyncClient,
}

impl Driver {
    async fn run(self, mut eventloop: EventLoop, mut stopped: oneshot::Receiver<()>) {
        loop {
            let event = tokio::select! {
                _ = &mut stopped => break,
                event = eventloop.poll() => event,
            };
            match event {
                Ok(event) => self.handle(event),
                Err(e) => {
                    self.shared.update(|s| {
                        s.connected = false;
                        s.ready = false;
                        s.last_error = Some(e.to_string());
                    });
                    // The next poll reconnects; do not hammer a dead port.
                    tokio::select! {
                        _ = &mut stopped => break,
                        _ = tokio::time::sleep(RECONNECT_PAUSE) => {}
                    }
                }
            }
        }
        self.disconnect(&mut eventloop).await;
    }

    fn handle(&self, event: Event) {
        match event {
            Event::Incoming(Incoming::ConnAck(_)) => self.on_connected(),
            Event::Incoming(Incoming::SubAck(ack)) => {
                let refused = ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, SubscribeReasonCode::Failure));
                self.shared.update(|s| {
                    s.subacks += 1;
                    if refused {
                        s.last_error = Some("subscription refused by the broker".into());
                    } else {
                        s.ready = s.connected;
                    }
                });
            }
            Event::Incoming(Incoming::Publish(p)) => {
                let message = WireMessage::new(p.topic, p.payload.to_vec(), p.qos, p.retain);
                self.shared.update(|s| s.messages.push(message));
            }
            Event::Incoming(Incoming::PubAck(ack)) => {
                self.shared.update(|s| s.pubacks.insert(ack.pkid));
            }
            Event::Outgoing(Outgoing::Publish(pkid)) => self.shared.update(|s| {
                // A stale ack of an earlier use of this packet id must not
                // count for this publish.
                s.pubacks.remove(&pkid);
                s.outgoing_publishes += 1;
                s.last_publish_pkid = pkid;
            }),
            _ => {}
        }
    }

    /// A new session (clean session): subscribe to every filter again.
    fn on_connected(&self) {
        let filters = self.shared.update(|s| {
            s.connected = true;
            s.ready = s.filters.is_empty();
            s.filters.clone()
        });
        if filters.is_empty() {
            return;
        }
        let filters = filters
            .into_iter()
            .map(|f| SubscribeFilter::new(f, QoS::AtLeastOnce));
        if let Err(e) = self.client.try_subscribe_many(filters) {
            self.shared.update(|s| s.last_error = Some(e.to_string()));
        }
    }

    /// A polite DISCONNECT, so the broker logs a clean close; bounded, as
    /// the broker may already be gone.
    async fn disconnect(&self, eventloop: &mut EventLoop) {
        if !self.shared.lock().connected || self.client.try_disconnect().is_err() {
            return;
        }
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
}

/// Builds rumqttc options from a broker URL and the recorder options.
fn mqtt_options(url: &str, options: RecorderOptions) -> io::Result<MqttOptions> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let (tls, host, port) = parse_broker_url(url)?;
    let id = options.client_id.unwrap_or_else(|| {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        format!("testkit-recorder-{}-{n}", std::process::id())
    });
    let mut mqtt = MqttOptions::new(id, host, port);
    mqtt.set_keep_alive(Duration::from_secs(5))
        .set_clean_session(true)
        .set_max_packet_size(MAX_PACKET, MAX_PACKET);
    if let Some((user, password)) = options.credentials {
        mqtt.set_credentials(user, password);
    }
    if tls {
        let config = options
            .tls
            .ok_or_else(|| invalid(format!("{url}: an mqtts URL needs RecorderOptions::tls")))?;
        mqtt.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(config)));
    }
    Ok(mqtt)
}

/// `mqtt://host:port` (or `tcp://`), `mqtts://host:port` (or `ssl://`);
/// the port defaults to 1883 / 8883; `[::1]` style hosts are accepted.
fn parse_broker_url(url: &str) -> io::Result<(bool, String, u16)> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| invalid(format!("{url}: not a broker URL")))?;
    let tls = match scheme {
        "mqtt" | "tcp" => false,
        "mqtts" | "ssl" => true,
        _ => return Err(invalid(format!("{url}: unknown scheme {scheme}"))),
    };
    let authority = rest.trim_end_matches('/');
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => {
            let port = port
                .parse()
                .map_err(|_| invalid(format!("{url}: bad port")))?;
            (host, port)
        }
        _ => (authority, if tls { 8883 } else { 1883 }),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(invalid(format!("{url}: no host")));
    }
    Ok((tls, host.to_string(), port))
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_broker_urls() {
        let p = |u: &str| parse_broker_url(u).unwrap();
        assert_eq!(
            p("mqtt://127.0.0.1:1234"),
            (false, "127.0.0.1".into(), 1234)
        );
        assert_eq!(
            p("mqtts://localhost:8884/"),
            (true, "localhost".into(), 8884)
        );
        assert_eq!(p("tcp://localhost"), (false, "localhost".into(), 1883));
        assert_eq!(p("ssl://[::1]"), (true, "::1".into(), 8883));
        assert_eq!(p("mqtt://[::1]:99"), (false, "::1".into(), 99));
        assert!(parse_broker_url("http://x:1").is_err());
        assert!(parse_broker_url("mqtt://:1").is_err());
        assert!(parse_broker_url("mqtt://h:x").is_err());
        assert!(parse_broker_url("127.0.0.1:1883").is_err());
    }

    #[test]
    fn json_paths() {
        let payload = br#"{"msgId":"7","data":{"firmwareVersion":"2.0.1","n":3,"l":[{"a":1}]}}"#;
        let m = WireMessage::new("t".into(), payload.to_vec(), QoS::AtLeastOnce, false);
        assert_eq!(m.json_str("data.firmwareVersion").as_deref(), Some("2.0.1"));
        assert_eq!(m.json_str("msgId").as_deref(), Some("7"));
        assert_eq!(m.json_i64("data.n"), Some(3));
        assert_eq!(m.json_path("data.l.0.a"), Some(Value::from(1)));
        assert_eq!(m.json_path("data.missing"), None);
        assert_eq!(m.json_str("data.n"), None);
        assert_eq!(m.json_path(""), m.json.clone());
        assert_eq!(m.qos, 1);
        let raw = WireMessage::new("t".into(), b"not json".to_vec(), QoS::AtMostOnce, false);
        assert_eq!(raw.json, None);
        assert_eq!(raw.json_path(""), None);
        assert_eq!(raw.payload_str(), Some("not json"));
    }
}

//! The MQTT 3.1.1 interoperability suite of Eclipse Paho
//! (`paho.mqtt.testing`, `interoperability/client_test.py`), ported here
//! behaviour by behaviour and run against both brokers the platform
//! supports: the embedded one and Mosquitto (Debian's, which scripts/test
//! installs). Each behaviour is one function; [`both!`] makes a test of
//! it for each broker, so a difference between them is a failing test.
//!
//! Both brokers are set up as the platform runs them: clients log in, the
//! suite's two clients as users that may use every topic (as the
//! platform's own user does), and one device (`pk/dev1`) that may use only
//! its own topics, for the subscription refusal. Where Paho waits a fixed
//! time and counts, these tests send a marker behind what they count and
//! wait for it: one publisher's messages arrive in order, so once the
//! marker is in, everything before it is too, and nothing waits longer
//! than it must.
//!
//! Where the specification lets a broker choose (Paho accepts either
//! answer), the test accepts what Paho accepts and says which it saw.
//! Debian's Mosquitto 2.0.11 fails two of Paho's checks, and the tests
//! say where: it grants a subscription its ACL refuses (the embedded
//! broker answers 0x80, as Paho checks), and it delivers a message that
//! matches two filters at the lower one's QoS (mosquitto#3319). The
//! embedded broker passes every check.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use iot_ota_platform::broker::{Authenticator, Identity, Refusal};
use iot_ota_platform::{BrokerOptions, EmbeddedBroker};
use iot_ota_testkit::{Mosquitto, MosquittoOptions};
use rumqttc::mqttbytes::v4::Connect;
use rumqttc::{
    AsyncClient, Event, EventLoop, LastWill, MqttOptions, Packet, Publish, QoS, SubscribeReasonCode,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// Paho's topics and wildcard filters.
const TOPICS: [&str; 5] = ["TopicA", "TopicA/B", "Topic/C", "TopicA/C", "/TopicA"];
const WILD: [&str; 7] = ["TopicA/+", "+/C", "#", "/#", "/+", "+/+", "TopicA/#"];
const SUITE_USER: &str = "suite";
const SUITE_PASSWORD: &str = "suite-secret";
const DEVICE_USER: &str = "pk/dev1";
const DEVICE_PASSWORD: &str = "device-secret";
/// How long any one answer may take (far longer than it does).
const WAIT: Duration = Duration::from_secs(10);

/// One broker under test, with its suite's logins.
enum Server {
    Embedded(EmbeddedBroker),
    Mosquitto(Mosquitto),
}

impl Server {
    fn port(&self) -> u16 {
        match self {
            Server::Embedded(b) => b.addr().port(),
            Server::Mosquitto(m) => m.port(),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Server::Embedded(_) => "embedded",
            Server::Mosquitto(_) => "mosquitto",
        }
    }
}

/// The embedded broker's logins: the suite's user may use every topic,
/// the device only its own.
#[derive(Debug)]
struct SuiteLogins;

impl Authenticator for SuiteLogins {
    fn authenticate(
        &self,
        _client_id: &str,
        username: Option<&str>,
        password: Option<&[u8]>,
    ) -> Result<Identity, Refusal> {
        match (username, password) {
            (Some(SUITE_USER), Some(p)) if p == SUITE_PASSWORD.as_bytes() => Ok(Identity::Platform),
            (Some(DEVICE_USER), Some(p)) if p == DEVICE_PASSWORD.as_bytes() => {
                Ok(Identity::device("/sys", "pk", "dev1"))
            }
            _ => Err(Refusal::NotAuthorized("not a suite login".into())),
        }
    }
}

async fn embedded() -> Server {
    let options = BrokerOptions {
        auth: Some(Arc::new(SuiteLogins)),
        ..BrokerOptions::default()
    };
    Server::Embedded(
        EmbeddedBroker::start("127.0.0.1:0".parse().unwrap(), options)
            .await
            .unwrap(),
    )
}

async fn mosquitto() -> Server {
    let started = MosquittoOptions::new()
        .auth(SUITE_USER, SUITE_PASSWORD)
        .auth(DEVICE_USER, DEVICE_PASSWORD)
        .acl(&format!(
            "user {SUITE_USER}\ntopic readwrite #\n\npattern readwrite /sys/%u/#\n"
        ))
        .start();
    match started {
        Ok(m) => Server::Mosquitto(m),
        Err(e) => panic!("{e} (scripts/test installs Mosquitto)"),
    }
}

/// A test of `$behaviour` on each broker.
macro_rules! both {
    ($behaviour:ident) => {
        mod $behaviour {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                super::$behaviour(&super::embedded().await).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mosquitto() {
                super::$behaviour(&super::mosquitto().await).await;
            }
        }
    };
}

/// How a [`Peer`] connects.
#[derive(Clone)]
struct Options {
    clean: bool,
    keep_alive: Duration,
    will: Option<(&'static str, &'static [u8])>,
    /// The test acknowledges what it receives (or does not).
    manual_acks: bool,
    device: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            clean: true,
            keep_alive: Duration::from_secs(30),
            will: None,
            manual_acks: false,
            device: false,
        }
    }
}

/// One client: rumqttc's, its event loop polled by a task of its own,
/// whose packets the test reads in order.
struct Peer {
    client: AsyncClient,
    seen: mpsc::UnboundedReceiver<Packet>,
    /// Packets read while waiting for another kind (an acknowledgement),
    /// for [`Peer::next`] to return in order.
    passed: std::collections::VecDeque<Packet>,
    /// Tells the poller to stop polling (and so to go silent) without
    /// closing the connection.
    silence: Option<tokio::sync::oneshot::Sender<()>>,
    poller: tokio::task::JoinHandle<()>,
}

impl Peer {
    /// Connected as `id`; returns it and the CONNACK's session present.
    async fn connect(server: &Server, id: &str, o: Options) -> (Peer, bool) {
        let mut opts = MqttOptions::new(id, "127.0.0.1", server.port());
        opts.set_clean_session(o.clean)
            .set_keep_alive(o.keep_alive)
            .set_manual_acks(o.manual_acks);
        if o.device {
            opts.set_credentials(DEVICE_USER, DEVICE_PASSWORD);
        } else {
            opts.set_credentials(SUITE_USER, SUITE_PASSWORD);
        }
        if let Some((topic, message)) = o.will {
            opts.set_last_will(LastWill::new(topic, message, QoS::AtLeastOnce, false));
        }
        let (client, el) = AsyncClient::new(opts, 64);
        let (tx, mut seen) = mpsc::unbounded_channel();
        let (silence, quiet) = tokio::sync::oneshot::channel();
        let poller = tokio::spawn(poll(el, tx, quiet));
        let present = match tokio::time::timeout(WAIT, seen.recv()).await {
            Ok(Some(Packet::ConnAck(a))) => a.session_present,
            other => panic!("{id}: no CONNACK from {}: {other:?}", server.name()),
        };
        let peer = Peer {
            client,
            seen,
            passed: Default::default(),
            silence: Some(silence),
            poller,
        };
        (peer, present)
    }

    /// The next packet the broker sent.
    async fn next(&mut self) -> Packet {
        match self.passed.pop_front() {
            Some(p) => p,
            None => self.recv().await,
        }
    }

    /// The first packet that is `what`, the others kept for [`Peer::next`].
    async fn take(&mut self, what: impl Fn(&Packet) -> bool) -> Packet {
        if let Some(i) = self.passed.iter().position(&what) {
            return self.passed.remove(i).expect("found");
        }
        loop {
            let p = self.recv().await;
            if what(&p) {
                return p;
            }
            self.passed.push_back(p);
        }
    }

    async fn recv(&mut self) -> Packet {
        match tokio::time::timeout(WAIT, self.seen.recv()).await {
            Ok(Some(p)) => p,
            Ok(None) => panic!("the connection ended"),
            Err(_) => panic!("nothing within {WAIT:?}"),
        }
    }

    async fn next_publish(&mut self) -> Publish {
        loop {
            if let Packet::Publish(p) = self.next().await {
                return p;
            }
        }
    }

    /// Subscribes and returns the SUBACK's codes.
    async fn subscribe(&mut self, filters: &[(&str, QoS)]) -> Vec<SubscribeReasonCode> {
        let filters = filters
            .iter()
            .map(|(f, q)| rumqttc::SubscribeFilter::new(f.to_string(), *q));
        self.client.subscribe_many(filters).await.unwrap();
        match self.take(|p| matches!(p, Packet::SubAck(_))).await {
            Packet::SubAck(a) => a.return_codes,
            _ => unreachable!("taken for a SUBACK"),
        }
    }

    /// Publishes and waits until the broker has it (PUBACK, PUBCOMP; for
    /// QoS 0 only the send).
    async fn publish(&mut self, topic: &str, payload: &[u8], qos: QoS, retain: bool) {
        self.client
            .publish(topic, qos, retain, payload.to_vec())
            .await
            .unwrap();
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => {
                self.take(|p| matches!(p, Packet::PubAck(_))).await;
            }
            QoS::ExactlyOnce => {
                self.take(|p| matches!(p, Packet::PubComp(_))).await;
            }
        }
    }

    /// Every message before the one on `marker` (which must come).
    async fn until_marker(&mut self, marker: &str) -> Vec<Publish> {
        let mut got = Vec::new();
        loop {
            let p = self.next_publish().await;
            if p.topic == marker {
                return got;
            }
            got.push(p);
        }
    }

    /// DISCONNECT, and the connection closed.
    async fn disconnect(mut self) {
        self.client.disconnect().await.unwrap();
        while tokio::time::timeout(WAIT, self.seen.recv())
            .await
            .expect("closed after DISCONNECT")
            .is_some()
        {}
    }

    /// The connection closed with no DISCONNECT (a crashed client).
    fn terminate(self) {
        self.poller.abort();
    }

    /// Stops sending anything, PINGREQ included, with the connection open.
    fn go_silent(&mut self) {
        if let Some(s) = self.silence.take() {
            let _ = s.send(());
        }
    }
}

/// Polls `el`, handing every incoming packet to the test, until the
/// connection ends or `quiet` says to stop polling (then it holds the
/// connection open, silent, until aborted).
async fn poll(
    mut el: EventLoop,
    tx: mpsc::UnboundedSender<Packet>,
    mut quiet: tokio::sync::oneshot::Receiver<()>,
) {
    loop {
        let event = tokio::select! {
            e = el.poll() => e,
            _ = &mut quiet => {
                std::future::pending::<()>().await;
                return;
            }
        };
        match event {
            Ok(Event::Incoming(p)) => {
                if tx.send(p).is_err() {
                    return;
                }
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => {
                // Let the DISCONNECT go out, then end.
                let _ = tokio::time::timeout(Duration::from_secs(1), el.poll()).await;
                return;
            }
            Ok(Event::Outgoing(_)) => {}
            Err(_) => return,
        }
    }
}

/// Sends raw CONNECT `frames` and returns the broker's answer (up to its
/// closing the connection): the CONNACK's code if one came, and whether
/// the connection was then closed.
async fn raw(server: &Server, frames: &[u8]) -> (Option<u8>, bool) {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", server.port()))
        .await
        .unwrap();
    s.write_all(frames).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    let code = (got.len() >= 4 && got[0] == 0x20).then(|| got[3]);
    (code, closed)
}

fn connect_frame(id: &str, clean: bool) -> Vec<u8> {
    let mut c = Connect::new(id);
    c.clean_session = clean;
    c.set_login(SUITE_USER, SUITE_PASSWORD);
    let mut out = BytesMut::new();
    c.write(&mut out).unwrap();
    out.to_vec()
}

fn payloads(ps: &[Publish]) -> Vec<String> {
    ps.iter()
        .map(|p| String::from_utf8_lossy(&p.payload).into_owned())
        .collect()
}

/// Paho's testBasic: a clean session has none present; a subscriber gets
/// its own messages at QoS 0, 1 and 2; a second CONNECT on one connection,
/// and a CONNECT with a wrong protocol name, fail.
async fn basic(s: &Server) {
    let (a, _) = Peer::connect(s, "myclientid", Options::default()).await;
    a.disconnect().await;
    let (mut a, present) = Peer::connect(s, "myclientid", Options::default()).await;
    assert!(!present, "a clean session is never present");
    let codes = a.subscribe(&[(TOPICS[0], QoS::ExactlyOnce)]).await;
    assert_eq!(codes, [SubscribeReasonCode::Success(QoS::ExactlyOnce)]);
    a.publish(TOPICS[0], b"qos 0", QoS::AtMostOnce, false).await;
    a.publish(TOPICS[0], b"qos 1", QoS::AtLeastOnce, false)
        .await;
    a.publish(TOPICS[0], b"qos 2", QoS::ExactlyOnce, false)
        .await;
    a.publish(TOPICS[0], b"end", QoS::AtLeastOnce, false).await;
    let mut got = Vec::new();
    loop {
        let p = a.next_publish().await;
        if &p.payload[..] == b"end" {
            break;
        }
        got.push((String::from_utf8_lossy(&p.payload).into_owned(), p.qos));
    }
    assert_eq!(
        got,
        [
            ("qos 0".to_string(), QoS::AtMostOnce),
            ("qos 1".to_string(), QoS::AtLeastOnce),
            ("qos 2".to_string(), QoS::ExactlyOnce),
        ]
    );
    a.disconnect().await;

    let mut twice = connect_frame("myclientid", true);
    twice.extend(connect_frame("myclientid", true));
    let (code, closed) = raw(s, &twice).await;
    assert_eq!((code, closed), (Some(0), true), "a second CONNECT closes");
    let mut wrong = connect_frame("myclientid", true);
    wrong[4..6].copy_from_slice(b"hj"); // "MQTT" → "hjTT"
    let (code, closed) = raw(s, &wrong).await;
    assert!(closed && code != Some(0), "a wrong protocol name: {code:?}");
}

/// Paho's test_retained_messages: retained messages at QoS 0, 1 and 2 all
/// reach a later subscriber, flagged retained; empty ones clear them.
async fn retained_messages(s: &Server) {
    let (mut a, _) = Peer::connect(s, "myclientid", Options::default()).await;
    a.publish(TOPICS[1], b"qos 0", QoS::AtMostOnce, true).await;
    a.publish(TOPICS[2], b"qos 1", QoS::AtLeastOnce, true).await;
    a.publish(TOPICS[3], b"qos 2", QoS::ExactlyOnce, true).await;
    // The QoS 0 one has no acknowledgement: a round trip behind it.
    a.subscribe(&[("unrelated", QoS::AtMostOnce)]).await;
    a.subscribe(&[(WILD[5], QoS::ExactlyOnce)]).await;
    a.publish("Topic/end", b"", QoS::AtLeastOnce, false).await;
    let mut got = a.until_marker("Topic/end").await;
    got.sort_by(|x, y| x.topic.cmp(&y.topic));
    let seen: Vec<_> = got
        .iter()
        .map(|p| (p.topic.as_str(), p.qos, p.retain))
        .collect();
    assert_eq!(
        seen,
        [
            (TOPICS[2], QoS::AtLeastOnce, true),
            (TOPICS[1], QoS::AtMostOnce, true),
            (TOPICS[3], QoS::ExactlyOnce, true),
        ]
    );
    a.disconnect().await;

    let (mut a, _) = Peer::connect(s, "myclientid", Options::default()).await;
    a.publish(TOPICS[1], b"", QoS::AtMostOnce, true).await;
    a.publish(TOPICS[2], b"", QoS::AtLeastOnce, true).await;
    a.publish(TOPICS[3], b"", QoS::ExactlyOnce, true).await;
    a.subscribe(&[("unrelated", QoS::AtMostOnce)]).await;
    a.subscribe(&[(WILD[5], QoS::ExactlyOnce)]).await;
    a.publish("Topic/end", b"", QoS::AtLeastOnce, false).await;
    let got = a.until_marker("Topic/end").await;
    assert!(got.is_empty(), "cleared: {:?}", payloads(&got));
    a.disconnect().await;
}

/// Paho's will_message_test: a client that ends without DISCONNECT has
/// its will published.
async fn will_message(s: &Server) {
    let will = Options {
        will: Some((TOPICS[2], b"client not disconnected")),
        keep_alive: Duration::from_secs(2),
        ..Options::default()
    };
    let (a, _) = Peer::connect(s, "myclientid", will).await;
    let persistent = Options {
        clean: false,
        ..Options::default()
    };
    let (mut b, _) = Peer::connect(s, "myclientid2", persistent).await;
    b.subscribe(&[(TOPICS[2], QoS::ExactlyOnce)]).await;
    a.terminate();
    let p = b.next_publish().await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        (TOPICS[2], &b"client not disconnected"[..])
    );
    b.disconnect().await;
}

/// Paho's test_zero_length_clientid: refused with a persistent session
/// (identifier rejected), accepted with a clean one.
async fn zero_length_clientid(s: &Server) {
    assert_eq!(raw(s, &connect_frame("", false)).await, (Some(2), true));
    let mut clean = connect_frame("", true);
    clean.extend([0xe0, 0]); // DISCONNECT
    assert_eq!(raw(s, &clean).await, (Some(0), true));
}

/// Paho's test_offline_message_queueing: a persistent session away keeps
/// QoS 1 and 2 messages (QoS 0 at the broker's choice), and is present
/// when its client comes back.
async fn offline_message_queueing(s: &Server) {
    let persistent = Options {
        clean: false,
        ..Options::default()
    };
    let (mut a, _) = Peer::connect(s, "myclientid", persistent.clone()).await;
    a.subscribe(&[(WILD[5], QoS::ExactlyOnce)]).await;
    a.disconnect().await;
    let (mut b, present) = Peer::connect(s, "myclientid2", Options::default()).await;
    assert!(!present);
    b.publish(TOPICS[1], b"qos 0", QoS::AtMostOnce, false).await;
    b.publish(TOPICS[2], b"qos 1", QoS::AtLeastOnce, false)
        .await;
    b.publish(TOPICS[3], b"qos 2", QoS::ExactlyOnce, false)
        .await;
    b.publish("Topic/end", b"", QoS::AtLeastOnce, false).await;
    b.disconnect().await;
    let (mut a, present) = Peer::connect(s, "myclientid", persistent).await;
    assert!(present, "the session was kept");
    let got = payloads(&a.until_marker("Topic/end").await);
    assert!(
        got == ["qos 1", "qos 2"] || got == ["qos 0", "qos 1", "qos 2"],
        "{got:?}"
    );
    eprintln!(
        "{}: {} QoS 0 messages for a client away",
        s.name(),
        if got.len() == 3 {
            "queues"
        } else {
            "does not queue"
        }
    );
    a.disconnect().await;
}

/// Paho's test_overlapping_subscriptions: a message that matches two of a
/// client's filters comes once at the highest QoS, or once per filter at
/// each one's QoS.
async fn overlapping_subscriptions(s: &Server) {
    let (mut a, _) = Peer::connect(s, "myclientid", Options::default()).await;
    a.subscribe(&[(WILD[6], QoS::ExactlyOnce), (WILD[0], QoS::AtLeastOnce)])
        .await;
    a.publish(
        TOPICS[3],
        b"overlapping topic filters",
        QoS::ExactlyOnce,
        false,
    )
    .await;
    a.subscribe(&[("Topic/end", QoS::AtLeastOnce)]).await;
    a.publish("Topic/end", b"", QoS::AtLeastOnce, false).await;
    let got = a.until_marker("Topic/end").await;
    let mut qos: Vec<_> = got.iter().map(|p| p.qos).collect();
    qos.sort_by_key(|q| *q as u8);
    let paho = qos == [QoS::ExactlyOnce] || qos == [QoS::AtLeastOnce, QoS::ExactlyOnce];
    match s {
        Server::Embedded(_) => assert!(paho, "{qos:?}"),
        // Mosquitto 2.0 delivers one copy at the QoS of one filter, not
        // the highest (eclipse-mosquitto/mosquitto#3319, MQTT-3.3.5-1;
        // fixed after the 2.0 series): Paho's check fails on it, here too
        // if Debian's is one of those.
        Server::Mosquitto(_) if !paho => {
            assert_eq!(qos, [QoS::AtLeastOnce], "not even the known deviation");
            eprintln!("mosquitto: one copy at QoS 1, not 2 (mosquitto#3319)");
        }
        Server::Mosquitto(_) => {}
    }
    eprintln!(
        "{}: {} message(s) for two matching filters",
        s.name(),
        qos.len()
    );
    a.disconnect().await;
}

/// Paho's test_keepalive: a client silent past its keep-alive is cut off,
/// and its will goes out.
async fn keepalive(s: &Server) {
    let will = Options {
        keep_alive: Duration::from_secs(2),
        will: Some((TOPICS[4], b"keepalive expiry")),
        ..Options::default()
    };
    let (mut a, _) = Peer::connect(s, "myclientid", will).await;
    let (mut b, _) = Peer::connect(
        s,
        "myclientid2",
        Options {
            keep_alive: Duration::ZERO,
            ..Options::default()
        },
    )
    .await;
    b.subscribe(&[(TOPICS[4], QoS::ExactlyOnce)]).await;
    a.go_silent();
    // 1.5 × 2 s, then the will.
    let p = b.next_publish().await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        (TOPICS[4], &b"keepalive expiry"[..])
    );
    b.disconnect().await;
    a.terminate();
}

/// Paho's test_redelivery_on_reconnect: QoS 1 and 2 messages a persistent
/// client received and never acknowledged come again when it reconnects.
async fn redelivery_on_reconnect(s: &Server) {
    let paused = Options {
        clean: false,
        manual_acks: true,
        ..Options::default()
    };
    let (mut b, _) = Peer::connect(s, "myclientid2", paused.clone()).await;
    b.subscribe(&[(WILD[6], QoS::ExactlyOnce)]).await;
    b.publish(TOPICS[1], b"", QoS::AtLeastOnce, false).await;
    b.publish(TOPICS[3], b"", QoS::ExactlyOnce, false).await;
    let first = [b.next_publish().await, b.next_publish().await];
    b.disconnect().await;
    let (mut b, present) = Peer::connect(s, "myclientid2", paused).await;
    assert!(present);
    let again = [b.next_publish().await, b.next_publish().await];
    for (one, two) in first.iter().zip(&again) {
        assert_eq!((&one.topic, one.pkid), (&two.topic, two.pkid));
        assert!(two.dup, "sent again with DUP");
    }
    for p in &again {
        b.client.ack(p).await.unwrap();
    }
    b.disconnect().await;
}

/// Paho's test_subscribe_failure: a filter the client may not use is
/// refused with 0x80. Mosquitto 2.0 grants such a filter instead (its
/// ACL decides delivery, not subscription): there the test checks what
/// both must do, that nothing is delivered through it.
async fn subscribe_failure(s: &Server) {
    let device = Options {
        device: true,
        ..Options::default()
    };
    let (mut d, _) = Peer::connect(s, "pk.dev1", device).await;
    let codes = d.subscribe(&[("test/nosubscribe", QoS::ExactlyOnce)]).await;
    match s {
        Server::Embedded(_) => assert_eq!(codes, [SubscribeReasonCode::Failure]),
        Server::Mosquitto(_) => eprintln!("mosquitto: a refused filter gets {codes:?}"),
    }
    let (mut a, _) = Peer::connect(s, "myclientid", Options::default()).await;
    a.publish(
        "test/nosubscribe",
        b"not for the device",
        QoS::AtLeastOnce,
        false,
    )
    .await;
    d.subscribe(&[("/sys/pk/dev1/end", QoS::AtLeastOnce)]).await;
    a.publish("/sys/pk/dev1/end", b"", QoS::AtLeastOnce, false)
        .await;
    let got = d.until_marker("/sys/pk/dev1/end").await;
    assert!(got.is_empty(), "{:?}", payloads(&got));
    a.disconnect().await;
    d.disconnect().await;
}

/// Paho's test_dollar_topics: a filter beginning with a wildcard does not
/// match a topic beginning with `$`.
async fn dollar_topics(s: &Server) {
    let (mut b, _) = Peer::connect(
        s,
        "myclientid2",
        Options {
            keep_alive: Duration::ZERO,
            ..Options::default()
        },
    )
    .await;
    b.subscribe(&[(WILD[5], QoS::ExactlyOnce)]).await;
    b.publish(&format!("${}", TOPICS[1]), b"", QoS::AtLeastOnce, false)
        .await;
    b.publish("Topic/end", b"", QoS::AtLeastOnce, false).await;
    let got = b.until_marker("Topic/end").await;
    assert!(
        got.is_empty(),
        "{:?}",
        got.iter().map(|p| &p.topic).collect::<Vec<_>>()
    );
    b.disconnect().await;
}

/// Paho's test_unsubscribe: after unsubscribing from one of three topics,
/// a client gets the other two only.
async fn unsubscribe(s: &Server) {
    let (mut b, _) = Peer::connect(s, "myclientid2", Options::default()).await;
    for t in &TOPICS[..3] {
        b.subscribe(&[(t, QoS::ExactlyOnce)]).await;
    }
    b.client.unsubscribe(TOPICS[0]).await.unwrap();
    b.take(|p| matches!(p, Packet::UnsubAck(_))).await;
    let (mut a, _) = Peer::connect(s, "myclientid", Options::default()).await;
    for t in &TOPICS[..3] {
        a.publish(t, t.as_bytes(), QoS::AtLeastOnce, false).await;
    }
    a.publish(TOPICS[2], b"end", QoS::AtLeastOnce, false).await;
    let mut got = Vec::new();
    loop {
        let p = b.next_publish().await;
        if &p.payload[..] == b"end" {
            break;
        }
        got.push(p.topic);
    }
    assert_eq!(got, [TOPICS[1], TOPICS[2]]);
    a.disconnect().await;
    b.disconnect().await;
}

both!(basic);
both!(retained_messages);
both!(will_message);
both!(zero_length_clientid);
both!(offline_message_queueing);
both!(overlapping_subscriptions);
both!(keepalive);
both!(redelivery_on_reconnect);
both!(subscribe_failure);
both!(dollar_topics);
both!(unsubscribe);

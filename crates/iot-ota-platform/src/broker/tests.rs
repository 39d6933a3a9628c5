//! The embedded broker against rumqttc clients on loopback.

use super::*;
use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{Packet, Publish, SubscribeReasonCode};
use rumqttc::mqttbytes::QoS;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

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
async fn a_take_over_and_a_lost_connection_each_send_the_will_as_mosquitto_does() {
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
    // The first connection is closed by the broker, and its will goes out
    // (Mosquitto does: the old connection did not say DISCONNECT).
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if el1.poll().await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the old connection was closed");
    let will = next_publish(&mut wel)
        .await
        .expect("the will of the one taken over");
    assert_eq!(will.topic, "will/dev");
    assert!(nothing_more(&mut wel).await, "one will per connection");
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
    let out = connect_and_subscribe(
        "slow",
        &[("t", QoS::AtLeastOnce), ("a/#/b", QoS::AtMostOnce)],
    );
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

/// Sends `bytes` on a raw connection and returns all the broker answers
/// until it closes the connection (or 5 s pass: then `None`).
async fn raw_exchange(b: &EmbeddedBroker, bytes: &[u8]) -> Option<Vec<u8>> {
    let mut raw = TcpStream::connect(b.addr()).await.unwrap();
    raw.write_all(bytes).await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 256];
        loop {
            match raw.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .ok()?;
    Some(got)
}

// A CONNECT of protocol `name` level `level` with `flags` (client id "c").
use super::strict::connect_frame as raw_connect;

/// The bytes of a CONNECT as `id`, then one SUBSCRIBE (packet id 1) to
/// `filters` (at least one).
fn connect_and_subscribe(id: &str, filters: &[(&str, QoS)]) -> Vec<u8> {
    let mut out = BytesMut::new();
    rumqttc::mqttbytes::v4::Connect::new(id)
        .write(&mut out)
        .unwrap();
    let (first, rest) = filters.split_first().expect("a filter");
    let mut sub = rumqttc::mqttbytes::v4::Subscribe::new(first.0, first.1);
    sub.pkid = 1;
    for (filter, qos) in rest {
        sub.add((*filter).into(), *qos);
    }
    sub.write(&mut out).unwrap();
    out.to_vec()
}

#[tokio::test]
async fn an_mqtt_3_1_client_gets_connack_1_and_can_fall_back() {
    let b = broker().await;
    let answer = raw_exchange(&b, &raw_connect(b"MQIsdp", 3, 0x02)).await;
    assert_eq!(answer.as_deref(), Some(&[0x20, 2, 0, 1][..]));
}

#[tokio::test]
async fn reserved_bits_ids_and_empty_payloads_close_the_connection() {
    let b = broker().await;
    let ok_connect = raw_connect(b"MQTT", 4, 0x02);
    // Each case: a CONNECT (or a good CONNECT then a bad packet) that
    // Mosquitto closes; the broker answers nothing to the bad packet.
    let connack = [0x20u8, 2, 0, 0];
    let cases: Vec<(&str, Vec<u8>, &[u8])> = vec![
        ("CONNECT reserved flag", raw_connect(b"MQTT", 4, 0x03), &[]),
        (
            "password without user name",
            raw_connect(b"MQTT", 4, 0x42),
            &[],
        ),
        (
            "SUBSCRIBE flags 0000",
            [&ok_connect[..], &[0x80, 6, 0, 1, 0, 1, b'a', 1]].concat(),
            &connack,
        ),
        (
            "SUBSCRIBE packet id 0",
            [&ok_connect[..], &[0x82, 6, 0, 0, 0, 1, b'a', 1]].concat(),
            &connack,
        ),
        (
            "SUBSCRIBE reserved QoS bits",
            [&ok_connect[..], &[0x82, 6, 0, 1, 0, 1, b'a', 0x81]].concat(),
            &connack,
        ),
        (
            "UNSUBSCRIBE flags 0000",
            [&ok_connect[..], &[0xa0, 5, 0, 1, 0, 1, b'a']].concat(),
            &connack,
        ),
        (
            "UNSUBSCRIBE with no topic",
            [&ok_connect[..], &[0xa2, 2, 0, 1]].concat(),
            &connack,
        ),
        (
            "PUBREL flags 0000",
            [&ok_connect[..], &[0x60, 2, 0, 1]].concat(),
            &connack,
        ),
    ];
    for (what, bytes, want) in cases {
        let got = raw_exchange(&b, &bytes).await;
        assert_eq!(
            got.as_deref(),
            Some(want),
            "{what}: closed after exactly this"
        );
    }
    // The good forms are answered and the connection stays.
    let mut good = ok_connect.clone();
    good.extend_from_slice(&[0x82, 6, 0, 1, 0, 1, b'a', 1]);
    let mut raw = TcpStream::connect(b.addr()).await.unwrap();
    raw.write_all(&good).await.unwrap();
    let mut buf = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(5), raw.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        buf,
        [0x20, 2, 0, 0, 0x90, 3, 0, 1, 1],
        "CONNACK, SUBACK granted 1"
    );
}

/// A PUBLISH of `total` payload bytes on topic "t", of which only the
/// first `sent` are written (after a good CONNECT as `id`).
fn half_publish(id: &str, total: usize, sent: usize) -> Vec<u8> {
    let mut out = BytesMut::new();
    rumqttc::mqttbytes::v4::Connect::new(id)
        .write(&mut out)
        .unwrap();
    let mut publish = vec![0x30u8];
    let mut len = total + 3;
    loop {
        let b = (len % 128) as u8;
        len /= 128;
        publish.push(if len > 0 { b | 0x80 } else { b });
        if len == 0 {
            break;
        }
    }
    publish.extend_from_slice(&[0, 1, b't']);
    publish.resize(publish.len() + sent, 7);
    out.extend_from_slice(&publish);
    out.to_vec()
}

#[tokio::test]
async fn incomplete_packets_stay_within_their_bound_and_others_are_served() {
    let limit = 2 * 1024 * 1024;
    let b = EmbeddedBroker::start(
        "127.0.0.1:0".parse().unwrap(),
        BrokerOptions {
            max_pending_bytes: limit,
            ..BrokerOptions::default()
        },
    )
    .await
    .unwrap();
    let (s, mut sel) = client(&b, "sub", true);
    s.subscribe("ok", QoS::AtLeastOnce).await.unwrap();
    until(&mut sel, is_suback).await;
    // 64 connections each half-send a 1 MiB packet: 32 MiB wanted, 2 allowed.
    let mut raws = Vec::new();
    let mut peak = 0;
    for i in 0..64 {
        let mut raw = TcpStream::connect(b.addr()).await.unwrap();
        let _ = raw
            .write_all(&half_publish(
                &format!("hog{i}"),
                (1 << 20) - 64,
                512 * 1024,
            ))
            .await;
        raws.push(raw);
        tokio::time::sleep(Duration::from_millis(5)).await;
        peak = peak.max(b.stats().pending_bytes);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stats = b.stats();
    peak = peak.max(stats.pending_bytes);
    // A margin for reads in flight: each hold follows one read.
    assert!(
        peak <= (limit + 2 * 1024 * 1024) as u64,
        "incomplete packets held {peak} bytes, the bound is {limit}"
    );
    assert!(
        stats.evicted >= 40,
        "the oldest offenders were closed: {stats:?}"
    );
    // A device that finishes its packets is still served.
    let (p, mut pel) = client(&b, "pub", true);
    p.publish("ok", QoS::AtLeastOnce, false, "fine")
        .await
        .unwrap();
    acked(&mut pel, 1).await;
    let m = next_publish(&mut sel).await.expect("delivered");
    assert_eq!(&m.payload[..], b"fine");
}

#[tokio::test]
async fn a_slow_packet_and_a_silent_keep_alive_0_client_are_closed() {
    let b = EmbeddedBroker::start(
        "127.0.0.1:0".parse().unwrap(),
        BrokerOptions {
            packet_timeout: Duration::from_millis(300),
            idle_timeout: Duration::from_millis(300),
            ..BrokerOptions::default()
        },
    )
    .await
    .unwrap();
    // Half a packet, then nothing: closed after the packet timeout.
    let got = raw_exchange(&b, &half_publish("slow", 1000, 10)).await;
    assert_eq!(
        got.as_deref(),
        Some(&[0x20, 2, 0, 0][..]),
        "CONNACK, then closed"
    );
    // Keep-alive 0 and silent: closed after the idle limit.
    let mut out = BytesMut::new();
    let mut c = rumqttc::mqttbytes::v4::Connect::new("idle");
    c.keep_alive = 0;
    c.write(&mut out).unwrap();
    let got = raw_exchange(&b, &out).await;
    assert_eq!(
        got.as_deref(),
        Some(&[0x20, 2, 0, 0][..]),
        "CONNACK, then closed"
    );
    assert_eq!(b.stats().timed_out, 2);
}

/// Two devices of product "pk" (secrets "s1", "s2") and the platform ("plat").
#[derive(Debug)]
struct TwoDevices;

impl Authenticator for TwoDevices {
    fn authenticate(
        &self,
        _client_id: &str,
        username: Option<&str>,
        password: Option<&[u8]>,
    ) -> Result<Identity, Refusal> {
        match (username, password) {
            (Some("platform"), Some(b"plat")) => Ok(Identity::Platform),
            (Some("pk/dev1"), Some(b"s1")) => Ok(Identity::device("/sys", "pk", "dev1")),
            (Some("pk/dev2"), Some(b"s2")) => Ok(Identity::device("/sys", "pk", "dev2")),
            _ => Err(Refusal::NotAuthorized("unknown".into())),
        }
    }
}

fn login(b: &EmbeddedBroker, id: &str, user: &str, pass: &str) -> (AsyncClient, EventLoop) {
    let mut opts = MqttOptions::new(id, "127.0.0.1", b.addr().port());
    opts.set_keep_alive(Duration::from_secs(5))
        .set_credentials(user, pass);
    AsyncClient::new(opts, 64)
}

async fn connack(el: &mut EventLoop) -> Result<(), rumqttc::ConnectionError> {
    loop {
        if let Event::Incoming(Packet::ConnAck(_)) = el.poll().await? {
            return Ok(());
        }
    }
}

#[tokio::test]
async fn only_known_devices_get_in_and_each_uses_only_its_own_topics() {
    let b = EmbeddedBroker::start(
        "127.0.0.1:0".parse().unwrap(),
        BrokerOptions {
            auth: Some(Arc::new(TwoDevices)),
            ..BrokerOptions::default()
        },
    )
    .await
    .unwrap();
    // No credentials, wrong ones: CONNACK 5.
    let (_c, mut el) = client(&b, "anon", true);
    let refused = connack(&mut el).await.unwrap_err();
    assert!(
        matches!(
            refused,
            rumqttc::ConnectionError::ConnectionRefused(rumqttc::ConnectReturnCode::NotAuthorized)
        ),
        "{refused:?}"
    );
    let (_c, mut el) = login(&b, "x", "pk/dev1", "wrong");
    assert!(connack(&mut el).await.is_err());
    assert_eq!(b.stats().refused_connects, 2);

    let (plat, mut pel) = login(&b, "platform", "platform", "plat");
    plat.subscribe("/sys/#", QoS::AtLeastOnce).await.unwrap();
    until(&mut pel, is_suback).await;
    let (d1, mut el1) = login(&b, "pk.dev1", "pk/dev1", "s1");
    connack(&mut el1).await.unwrap();
    // dev1 may not read dev2's commands, nor everything.
    d1.subscribe("/sys/pk/dev2/ota/firmware/upgrade", QoS::AtLeastOnce)
        .await
        .unwrap();
    d1.subscribe("#", QoS::AtLeastOnce).await.unwrap();
    d1.subscribe("/sys/pk/dev1/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    let mut codes = Vec::new();
    while codes.len() < 3 {
        if let Event::Incoming(Packet::SubAck(a)) = el1.poll().await.unwrap() {
            codes.extend(a.return_codes);
        }
    }
    assert_eq!(
        codes,
        [
            SubscribeReasonCode::Failure,
            SubscribeReasonCode::Failure,
            SubscribeReasonCode::Success(QoS::AtLeastOnce)
        ]
    );
    // A forged report for dev2 is dropped; its own goes through.
    d1.publish("/sys/pk/dev2/ota/inform", QoS::AtLeastOnce, false, "forged")
        .await
        .unwrap();
    d1.publish("/sys/pk/dev1/ota/inform", QoS::AtLeastOnce, false, "mine")
        .await
        .unwrap();
    acked(&mut el1, 5).await;
    let m = next_publish(&mut pel).await.expect("dev1's own report");
    assert_eq!(
        (m.topic.as_str(), &m.payload[..]),
        ("/sys/pk/dev1/ota/inform", &b"mine"[..])
    );
    assert!(nothing_more(&mut pel).await, "the forged one was dropped");
    let s = b.stats();
    assert_eq!((s.refused_publishes, s.refused_subscribes), (1, 2), "{s:?}");

    // dev2 cannot take dev1's session over by its client id.
    let (_d2, mut el2) = login(&b, "pk.dev1", "pk/dev2", "s2");
    assert!(connack(&mut el2).await.is_err(), "another's client id");

    // Revoked: dev1's connection is closed.
    assert_eq!(
        b.stats_handle()
            .disconnect(&Identity::device("/sys", "pk", "dev1")),
        1
    );
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if el1.poll().await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the revoked device was disconnected");
}

#[tokio::test]
async fn queued_messages_stay_within_their_bytes_and_are_given_back() {
    let b = EmbeddedBroker::start(
        "127.0.0.1:0".parse().unwrap(),
        BrokerOptions {
            max_queued_bytes: 64 * 1024,
            max_inflight: 0,
            ..BrokerOptions::default()
        },
    )
    .await
    .unwrap();
    // A raw subscriber that never reads nor acks: everything queues.
    let mut raw = TcpStream::connect(b.addr()).await.unwrap();
    let out = connect_and_subscribe("slow", &[("t", QoS::AtLeastOnce)]);
    raw.write_all(&out).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (p, mut pel) = client(&b, "pub", true);
    for _ in 0..20 {
        p.publish("t", QoS::AtLeastOnce, false, vec![7u8; 8 * 1024])
            .await
            .unwrap();
    }
    acked(&mut pel, 20).await;
    let s = b.stats();
    assert!(s.queued_bytes <= 64 * 1024, "{s:?}");
    assert!(
        s.dropped >= 12,
        "8 KiB messages past 64 KiB are dropped: {s:?}"
    );
    assert_eq!(s.delivered + s.dropped, 20, "{s:?}");
    // Its session goes (clean): every byte is given back.
    drop(raw);
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.stats().queued_bytes != 0 {
        assert!(Instant::now() < deadline, "{:?}", b.stats());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A client written packet by packet, to see exactly what the broker
/// sends and when (rumqttc would answer for us).
struct Raw {
    s: TcpStream,
    rd: BytesMut,
}

impl Raw {
    /// Connected as `id` (`clean` or persistent), with the CONNACK read:
    /// returns the client and whether a session was present.
    async fn connect(b: &EmbeddedBroker, id: &str, clean: bool) -> (Raw, bool) {
        let mut raw = Raw {
            s: TcpStream::connect(b.addr()).await.unwrap(),
            rd: BytesMut::new(),
        };
        let mut c = rumqttc::mqttbytes::v4::Connect::new(id);
        c.clean_session = clean;
        raw.send(|w| c.write(w)).await;
        match raw.next().await {
            Some(Packet::ConnAck(a)) => {
                assert_eq!(a.code, rumqttc::mqttbytes::v4::ConnectReturnCode::Success);
                (raw, a.session_present)
            }
            other => panic!("no CONNACK: {other:?}"),
        }
    }

    async fn send(
        &mut self,
        write: impl FnOnce(&mut BytesMut) -> Result<usize, rumqttc::mqttbytes::Error>,
    ) {
        let mut out = BytesMut::new();
        write(&mut out).unwrap();
        self.s.write_all(&out).await.unwrap();
    }

    /// The next packet within 2 s (`None`: none came, or the broker closed).
    async fn next(&mut self) -> Option<Packet> {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match Packet::read(&mut self.rd, 1 << 20) {
                Ok(p) => return Some(p),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("{e}"),
            }
            match tokio::time::timeout_at(deadline, self.s.read_buf(&mut self.rd)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return None,
            }
        }
    }

    async fn subscribe(&mut self, filter: &str, qos: QoS) {
        let mut sub = rumqttc::mqttbytes::v4::Subscribe::new(filter, qos);
        sub.pkid = 1;
        self.send(|w| sub.write(w)).await;
        match self.next().await {
            Some(Packet::SubAck(a)) => {
                assert_eq!(a.return_codes, [SubscribeReasonCode::Success(qos)])
            }
            other => panic!("no SUBACK: {other:?}"),
        }
    }

    async fn publish(&mut self, topic: &str, qos: QoS, pkid: u16, payload: &str) {
        let mut p = Publish::new(topic, qos, payload.as_bytes().to_vec());
        p.pkid = pkid;
        self.send(|w| p.write(w)).await;
    }
}

#[tokio::test]
async fn qos_2_goes_out_as_qos_2_and_a_released_message_resumes_at_its_pubrel() {
    use rumqttc::mqttbytes::v4::{PubComp, PubRec, PubRel};
    let b = broker().await;
    let (mut sub, _) = Raw::connect(&b, "sub", false).await;
    sub.subscribe("up/#", QoS::ExactlyOnce).await;
    let (mut dev, _) = Raw::connect(&b, "dev", true).await;
    dev.publish("up/a", QoS::ExactlyOnce, 7, "once").await;
    assert_eq!(dev.next().await, Some(Packet::PubRec(PubRec::new(7))));
    let Some(Packet::Publish(p)) = sub.next().await else {
        panic!("not delivered")
    };
    assert_eq!(
        (p.qos, &p.payload[..], p.dup),
        (QoS::ExactlyOnce, &b"once"[..], false)
    );
    // Gone before the PUBREC: the message again, same id, DUP.
    drop(sub);
    let (mut sub, present) = Raw::connect(&b, "sub", false).await;
    assert!(present);
    let Some(Packet::Publish(again)) = sub.next().await else {
        panic!("not sent again")
    };
    assert_eq!(
        (again.pkid, again.dup, &again.payload[..]),
        (p.pkid, true, &b"once"[..])
    );
    // PUBREC: the broker releases it; gone before the PUBCOMP: only the
    // PUBREL again, never the message a second time.
    sub.send(|w| PubRec::new(p.pkid).write(w)).await;
    assert_eq!(sub.next().await, Some(Packet::PubRel(PubRel::new(p.pkid))));
    drop(sub);
    let (mut sub, _) = Raw::connect(&b, "sub", false).await;
    assert_eq!(sub.next().await, Some(Packet::PubRel(PubRel::new(p.pkid))));
    sub.send(|w| PubComp::new(p.pkid).write(w)).await;
    assert_eq!(sub.next().await, None, "done: nothing more");
    assert_eq!(b.stats().queued_bytes, 0, "{:?}", b.stats());
    assert_eq!(b.stats().delivered, 1);
}

#[tokio::test]
async fn a_qos_2_message_sent_again_after_a_reconnect_is_delivered_once() {
    use rumqttc::mqttbytes::v4::{PubComp, PubRec, PubRel};
    let b = broker().await;
    let (mut sub, _) = Raw::connect(&b, "sub", true).await;
    sub.subscribe("up/#", QoS::AtLeastOnce).await;
    let (mut dev, _) = Raw::connect(&b, "dev", false).await;
    dev.publish("up/a", QoS::ExactlyOnce, 9, "once").await;
    assert_eq!(dev.next().await, Some(Packet::PubRec(PubRec::new(9))));
    // The PUBREC was lost with the connection: the device sends the
    // message again (DUP) on its next one, then releases it.
    drop(dev);
    let (mut dev, present) = Raw::connect(&b, "dev", false).await;
    assert!(present);
    let mut p = Publish::new("up/a", QoS::ExactlyOnce, b"once".to_vec());
    p.pkid = 9;
    p.dup = true;
    dev.send(|w| p.write(w)).await;
    assert_eq!(dev.next().await, Some(Packet::PubRec(PubRec::new(9))));
    dev.send(|w| PubRel::new(9).write(w)).await;
    assert_eq!(dev.next().await, Some(Packet::PubComp(PubComp::new(9))));
    let Some(Packet::Publish(first)) = sub.next().await else {
        panic!("not delivered")
    };
    assert_eq!(&first.payload[..], b"once");
    sub.send(|w| rumqttc::mqttbytes::v4::PubAck::new(first.pkid).write(w))
        .await;
    assert_eq!(sub.next().await, None, "delivered once");
    // Released: the same id is a new message now.
    dev.publish("up/a", QoS::ExactlyOnce, 9, "twice").await;
    assert_eq!(dev.next().await, Some(Packet::PubRec(PubRec::new(9))));
    let Some(Packet::Publish(second)) = sub.next().await else {
        panic!("the new message not delivered")
    };
    assert_eq!(&second.payload[..], b"twice");
}

#[tokio::test]
async fn persistent_sessions_expire_and_their_count_is_capped() {
    // Expiry zero: a persistent session ends with its connection.
    let b = EmbeddedBroker::start(
        "127.0.0.1:0".parse().unwrap(),
        BrokerOptions {
            session_expiry: Duration::ZERO,
            ..BrokerOptions::default()
        },
    )
    .await
    .unwrap();
    let (mut a, _) = Raw::connect(&b, "a", false).await;
    a.subscribe("up/#", QoS::AtLeastOnce).await;
    drop(a);
    let (_a, present) = Raw::connect(&b, "a", false).await;
    assert!(!present, "expired at once");
    assert_eq!(b.stats().expired_sessions, 1);

    // At most two kept away: the third to go away drops the first.
    let b = EmbeddedBroker::start(
        "127.0.0.1:0".parse().unwrap(),
        BrokerOptions {
            max_kept_sessions: 2,
            ..BrokerOptions::default()
        },
    )
    .await
    .unwrap();
    for id in ["a", "b", "c"] {
        let (mut c, _) = Raw::connect(&b, id, false).await;
        c.subscribe("up/#", QoS::AtLeastOnce).await;
        c.send(|w| Packet::Disconnect.write(w, 1 << 20)).await;
        assert_eq!(c.next().await, None, "closed after DISCONNECT");
        // Gone in this order.
        while b.stats().connections > 0 {
            tokio::task::yield_now().await;
        }
    }
    let s = b.stats();
    assert_eq!((s.sessions_away, s.evicted_sessions), (2, 1), "{s:?}");
    let (_a, a_present) = Raw::connect(&b, "a", false).await;
    let (_c, c_present) = Raw::connect(&b, "c", false).await;
    assert!(!a_present && c_present, "the oldest away went");
}

/// Sessions away expire by the time they are given (instants a week
/// apart here, with no waiting).
#[test]
fn sessions_away_expire_in_the_order_they_went_and_say_the_next_deadline() {
    {
        let mut state = State::new(state::QueuePool::new(1 << 20));
        let week = Duration::from_secs(7 * 24 * 3600);
        let t0 = Instant::now();
        for (i, id) in ["a", "b"].iter().enumerate() {
            let id: Arc<str> = Arc::from(*id);
            state.sessions.insert(
                id.clone(),
                state::Session {
                    conn: None,
                    persistent: true,
                    filters: vec![("up/#".into(), QoS::AtLeastOnce)],
                    parked: Default::default(),
                    owner: Identity::Anonymous,
                    qos2_in: Vec::new(),
                    away_since: None,
                    taking_over: None,
                },
            );
            state.subscribe(&id, "up/#", QoS::AtLeastOnce);
            let at = t0 + Duration::from_secs(60 * i as u64);
            assert_eq!(state.went_away(&id, at, week, 10), (0, 0));
        }
        assert_eq!(state.expire(t0, week), (0, Some(t0 + week)));
        // A week after "a" went: "a" goes, "b" is due a minute later.
        let (gone, next) = state.expire(t0 + week, week);
        assert_eq!((gone, next), (1, Some(t0 + week + Duration::from_secs(60))));
        assert!(!state.sessions.contains_key("a"));
        assert_eq!(state.wild.len(), 1, "its subscription went with it");
        // "b" came back: it no longer expires.
        state.came_back(&Arc::from("b"));
        assert_eq!(state.expire(t0 + 2 * week, week), (0, None));
        assert!(state.sessions.contains_key("b"));
    }
}

/// A take-over (the old connection still open, as after a half-open link):
/// the new connection gets the QoS 2 ids the old one had not seen released
/// (a message sent again is delivered once), and the old one's in-flight
/// messages keep their ids, before the new one uses any id of its own.
#[tokio::test]
async fn a_take_over_keeps_qos_2_ids_and_in_flight_ids() {
    use rumqttc::mqttbytes::v4::{PubComp, PubRec, PubRel};
    let b = broker().await;
    // The device's side: id 9 received on the first connection.
    let (mut sub, _) = Raw::connect(&b, "sub", true).await;
    sub.subscribe("up/#", QoS::AtLeastOnce).await;
    let (mut dev, _) = Raw::connect(&b, "dev", false).await;
    dev.publish("up/a", QoS::ExactlyOnce, 9, "once").await;
    assert_eq!(dev.next().await, Some(Packet::PubRec(PubRec::new(9))));
    let (mut dev2, present) = Raw::connect(&b, "dev", false).await;
    assert!(present);
    let mut again = Publish::new("up/a", QoS::ExactlyOnce, b"once".to_vec());
    again.pkid = 9;
    again.dup = true;
    dev2.send(|w| again.write(w)).await;
    assert_eq!(dev2.next().await, Some(Packet::PubRec(PubRec::new(9))));
    dev2.send(|w| PubRel::new(9).write(w)).await;
    assert_eq!(dev2.next().await, Some(Packet::PubComp(PubComp::new(9))));
    let Some(Packet::Publish(first)) = sub.next().await else {
        panic!("not delivered")
    };
    sub.send(|w| rumqttc::mqttbytes::v4::PubAck::new(first.pkid).write(w))
        .await;
    assert_eq!(sub.next().await, None, "delivered once");
    drop(dev);

    // The subscriber's side: a QoS 2 message released on the first
    // connection, which stays open; the new one resumes at its PUBREL and
    // gives a new message another id.
    let (mut a, _) = Raw::connect(&b, "watcher", false).await;
    a.subscribe("up/#", QoS::ExactlyOnce).await;
    let (mut p, _) = Raw::connect(&b, "pub", true).await;
    p.publish("up/b", QoS::ExactlyOnce, 1, "m1").await;
    let Some(Packet::Publish(m1)) = a.next().await else {
        panic!("m1 not delivered")
    };
    a.send(|w| PubRec::new(m1.pkid).write(w)).await;
    assert_eq!(a.next().await, Some(Packet::PubRel(PubRel::new(m1.pkid))));
    let (mut a2, present) = Raw::connect(&b, "watcher", false).await;
    assert!(present);
    assert_eq!(a2.next().await, Some(Packet::PubRel(PubRel::new(m1.pkid))));
    p.publish("up/b", QoS::ExactlyOnce, 2, "m2").await;
    let Some(Packet::Publish(m2)) = a2.next().await else {
        panic!("m2 not delivered")
    };
    assert_ne!(m2.pkid, m1.pkid, "m1's id is still m1's until its PUBCOMP");
    drop(a);
}

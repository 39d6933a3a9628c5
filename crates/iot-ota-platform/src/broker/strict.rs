//! The MQTT 3.1.1 rules the packet decoder (rumqttc's `mqttbytes`) is lenient
//! about, checked on each whole frame before it is decoded: reserved flags
//! and bits, packet ids, empty SUBSCRIBE and UNSUBSCRIBE payloads, a
//! password without a user name, and the protocol level of a CONNECT (an
//! MQTT 3.1 client gets CONNACK 0x01, as the spec requires, so that it can
//! fall back). Mosquitto closes the connection on each of these; so does
//! this broker. Pure functions over bytes.

/// Why a frame is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Violation {
    /// A CONNECT of a protocol level this broker does not speak (MQTT 3.1
    /// is level 3): answer CONNACK 0x01, then close (MQTT-3.1.2-2).
    UnsupportedLevel(u8),
    /// Anything else: close the connection without an answer.
    Close(String),
}

fn close(why: impl Into<String>) -> Violation {
    Violation::Close(why.into())
}

/// The length of the first frame in `buf` (fixed header and remaining
/// length), `None` while it is incomplete; `Err` for a remaining length
/// longer than MQTT's four bytes.
pub(super) fn frame_len(buf: &[u8]) -> Result<Option<usize>, String> {
    Ok(announced_len(buf)?.filter(|total| buf.len() >= *total))
}

/// The length the first frame in `buf` announces (fixed header included),
/// once its fixed header is complete, whether or not the rest has come.
pub(super) fn announced_len(buf: &[u8]) -> Result<Option<usize>, String> {
    let mut len = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        len |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some(2 + i + len));
        }
    }
    Err("malformed remaining length".into())
}

/// How many bytes the fixed header of `frame` takes.
fn header_len(frame: &[u8]) -> usize {
    1 + frame[1..]
        .iter()
        .take(4)
        .position(|b| b & 0x80 == 0)
        .unwrap_or(3)
        + 1
}

fn u16_at(body: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*body.get(at)?, *body.get(at + 1)?]))
}

/// Checks one whole frame from a client (see the module docs).
pub(super) fn check(frame: &[u8]) -> Result<(), Violation> {
    let kind = frame[0] >> 4;
    let flags = frame[0] & 0x0f;
    let body = &frame[header_len(frame)..];
    let want_flags = match kind {
        3 => flags, // PUBLISH: DUP, QoS, RETAIN (checked below)
        6 | 8 | 10 => 0b0010,
        1 | 4 | 5 | 7 | 12 | 14 => 0,
        2 | 9 | 11 | 13 => return Err(close(format!("packet type {kind} is the server's"))),
        _ => return Err(close(format!("reserved packet type {kind}"))),
    };
    if flags != want_flags {
        return Err(close(format!(
            "packet type {kind} with reserved flags {flags:#06b}"
        )));
    }
    match kind {
        1 => check_connect(body),
        3 => {
            let qos = (flags >> 1) & 0b11;
            if qos == 3 {
                return Err(close("PUBLISH with QoS 3"));
            }
            if qos > 0 {
                let topic_len = usize::from(u16_at(body, 0).ok_or_else(|| close("short PUBLISH"))?);
                if u16_at(body, 2 + topic_len) == Some(0) {
                    return Err(close("PUBLISH with packet id 0"));
                }
            }
            Ok(())
        }
        8 => {
            if u16_at(body, 0) == Some(0) {
                return Err(close("SUBSCRIBE with packet id 0"));
            }
            let mut at = 2;
            if at >= body.len() {
                return Err(close("SUBSCRIBE with no topic filter"));
            }
            while at < body.len() {
                let len = usize::from(u16_at(body, at).ok_or_else(|| close("short SUBSCRIBE"))?);
                at += 2 + len;
                let Some(&qos) = body.get(at) else {
                    return Err(close("SUBSCRIBE filter without its QoS byte"));
                };
                if qos & 0b1111_1100 != 0 || qos == 3 {
                    return Err(close(format!("SUBSCRIBE with the QoS byte {qos:#04x}")));
                }
                at += 1;
            }
            Ok(())
        }
        10 => {
            if u16_at(body, 0) == Some(0) {
                return Err(close("UNSUBSCRIBE with packet id 0"));
            }
            if body.len() <= 2 {
                return Err(close("UNSUBSCRIBE with no topic filter"));
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn check_connect(body: &[u8]) -> Result<(), Violation> {
    let name_len = usize::from(u16_at(body, 0).ok_or_else(|| close("short CONNECT"))?);
    let name = body
        .get(2..2 + name_len)
        .ok_or_else(|| close("short CONNECT"))?;
    let level = *body
        .get(2 + name_len)
        .ok_or_else(|| close("short CONNECT"))?;
    let flags = *body
        .get(3 + name_len)
        .ok_or_else(|| close("short CONNECT"))?;
    match (name, level) {
        (b"MQTT", 4) => {}
        (b"MQTT" | b"MQIsdp", level) => return Err(Violation::UnsupportedLevel(level)),
        _ => return Err(close("CONNECT of an unknown protocol")),
    }
    if flags & 0b0000_0001 != 0 {
        return Err(close("CONNECT with its reserved flag set"));
    }
    let will = flags & 0b0000_0100 != 0;
    let will_qos = (flags >> 3) & 0b11;
    let will_retain = flags & 0b0010_0000 != 0;
    if will_qos == 3 || (!will && (will_qos != 0 || will_retain)) {
        return Err(close("CONNECT with bad will flags"));
    }
    let username = flags & 0b1000_0000 != 0;
    let password = flags & 0b0100_0000 != 0;
    if password && !username {
        return Err(close("CONNECT with a password and no user name"));
    }
    Ok(())
}

/// A CONNECT of protocol `name` level `level` with `flags` (client id
/// "c"), for tests.
#[cfg(test)]
pub(super) fn connect_frame(name: &[u8], level: u8, flags: u8) -> Vec<u8> {
    let mut body = vec![0, name.len() as u8];
    body.extend_from_slice(name);
    body.extend_from_slice(&[level, flags, 0, 60, 0, 1, b'c']);
    let mut f = vec![0x10, body.len() as u8];
    f.extend(body);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::connect_frame as connect;

    #[test]
    fn frames_are_cut_by_their_remaining_length() {
        assert_eq!(frame_len(&[0xc0]), Ok(None));
        assert_eq!(frame_len(&[0xc0, 0]), Ok(Some(2)));
        assert_eq!(frame_len(&[0x30, 3, 0, 1]), Ok(None));
        assert_eq!(announced_len(&[0x30, 3, 0, 1]), Ok(Some(5)));
        assert_eq!(announced_len(&[0x30, 0x80]), Ok(None));
        assert_eq!(frame_len(&[0x30, 3, 0, 1, b'a', 9]), Ok(Some(5)));
        // 200 bytes: two length bytes.
        let mut f = vec![0x30, 0xc8, 0x01];
        f.resize(203, 0);
        assert_eq!(frame_len(&f), Ok(Some(203)));
        assert!(frame_len(&[0x30, 0xff, 0xff, 0xff, 0xff, 1]).is_err());
        assert_eq!(header_len(&f), 3);
    }

    #[test]
    fn a_connect_is_checked_as_the_spec_says() {
        assert_eq!(check(&connect(b"MQTT", 4, 0x02)), Ok(()));
        assert_eq!(
            check(&connect(b"MQIsdp", 3, 0x02)),
            Err(Violation::UnsupportedLevel(3))
        );
        assert_eq!(
            check(&connect(b"MQTT", 5, 0x02)),
            Err(Violation::UnsupportedLevel(5))
        );
        for (flags, what) in [
            (0x03, "reserved flag"),
            (0x42, "password and no user name"),
            (0x0a, "will QoS without a will"),
            (0x22, "will retain without a will"),
            (0x1e, "will QoS 3"),
        ] {
            assert!(
                matches!(check(&connect(b"MQTT", 4, flags)), Err(Violation::Close(_))),
                "{what}"
            );
        }
        assert!(matches!(
            check(&connect(b"XMPP", 4, 2)),
            Err(Violation::Close(_))
        ));
        assert_eq!(
            check(&connect(b"MQTT", 4, 0xc2)),
            Ok(()),
            "user and password"
        );
    }

    #[test]
    fn reserved_flags_ids_and_empty_payloads_close() {
        let sub = |flags: u8, id: u16, qos: u8| {
            vec![0x80 | flags, 6, (id >> 8) as u8, id as u8, 0, 1, b'a', qos]
        };
        assert_eq!(check(&sub(2, 1, 1)), Ok(()));
        assert!(
            check(&sub(0, 1, 1)).is_err(),
            "SUBSCRIBE flags must be 0010"
        );
        assert!(check(&sub(2, 0, 1)).is_err(), "SUBSCRIBE packet id 0");
        assert!(check(&sub(2, 1, 0x41)).is_err(), "reserved QoS bits");
        assert!(check(&sub(2, 1, 3)).is_err(), "QoS 3");
        assert!(check(&[0x82, 2, 0, 1]).is_err(), "SUBSCRIBE with no filter");
        assert!(
            check(&[0xa2, 2, 0, 1]).is_err(),
            "UNSUBSCRIBE with no filter"
        );
        assert_eq!(check(&[0xa2, 5, 0, 1, 0, 1, b'a']), Ok(()));
        assert!(
            check(&[0xa0, 5, 0, 1, 0, 1, b'a']).is_err(),
            "UNSUBSCRIBE flags"
        );
        assert!(
            check(&[0x60, 2, 0, 1]).is_err(),
            "PUBREL flags must be 0010"
        );
        assert_eq!(check(&[0x62, 2, 0, 1]), Ok(()));
        assert!(
            check(&[0x36, 5, 0, 1, b'a', 0, 1]).is_err(),
            "QoS 3 PUBLISH"
        );
        assert!(check(&[0x32, 5, 0, 1, b'a', 0, 0]).is_err(), "QoS 1 id 0");
        assert_eq!(check(&[0x32, 5, 0, 1, b'a', 0, 7]), Ok(()));
        assert!(check(&[0x20, 2, 0, 0]).is_err(), "a CONNACK from a client");
        assert!(check(&[0xf0, 0]).is_err(), "reserved type 15");
        assert!(check(&[0xc1, 0]).is_err(), "PINGREQ flags");
    }
}

//! The embedded MQTT broker (rumqttd). Broker URLs are `iot_ota_core::BrokerUrl`.
//!
//! rumqttd runs its router and listener on threads of its own and offers no
//! way to stop them: an [`EmbeddedBroker`] lives until the process exits. The
//! platform talks to it through an ordinary MQTT client over loopback, exactly
//! as it talks to an external Mosquitto, so both paths run the same code.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use rumqttd::{Config, ConnectionSettings, RouterConfig, ServerSettings};

/// A rumqttd broker running in this process.
#[derive(Debug)]
pub struct EmbeddedBroker {
    addr: SocketAddr,
}

impl EmbeddedBroker {
    /// Starts a broker listening on `addr` (port 0: a free port) and waits until it accepts.
    pub fn start(addr: SocketAddr) -> Result<EmbeddedBroker, String> {
        let addr = if addr.port() == 0 {
            // rumqttd does not report the port it bound: find a free one first.
            let probe = TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
            probe.local_addr().map_err(|e| e.to_string())?
        } else {
            addr
        };
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Err(format!("{addr} is already in use"));
        }
        let server = ServerSettings {
            name: "v4".into(),
            listen: addr,
            tls: None,
            next_connection_delay_ms: 1,
            connections: ConnectionSettings {
                connection_timeout_ms: 60_000,
                max_payload_size: 1024 * 1024,
                max_inflight_count: 200,
                auth: None,
                external_auth: None,
                dynamic_filters: true,
            },
        };
        let config = Config {
            id: 0,
            router: RouterConfig {
                max_connections: 10_010,
                max_outgoing_packet_count: 200,
                max_segment_size: 10 * 1024 * 1024,
                max_segment_count: 10,
                ..RouterConfig::default()
            },
            v4: Some(HashMap::from([("1".to_string(), server)])),
            ..Config::default()
        };
        let mut broker = rumqttd::Broker::new(config);
        std::thread::Builder::new()
            .name("rumqttd".into())
            .spawn(move || {
                if let Err(e) = broker.start() {
                    eprintln!("embedded broker stopped: {e}");
                }
            })
            .map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(EmbeddedBroker { addr });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!(
            "the embedded broker did not start listening on {addr}"
        ))
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `mqtt://ADDR`.
    pub fn url(&self) -> String {
        format!("mqtt://{}", self.addr)
    }
}

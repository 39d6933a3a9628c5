//! The device's MQTT link, written once for both APIs: one settings type,
//! one client constructor, one event loop with one reconnect policy and one
//! disconnect drain.
//!
//! The async client ([`crate::OtaClient`]) runs [`run`] as a background
//! task; the C API runs it as a task on its instance's runtime, driven by
//! the application's yield calls. What differs between them (who hears of
//! a connection, where messages go) is a [`LinkHandler`]. What a connection
//! means for OTA (subscribe again, inform the version again) is the core's
//! rule, [`iot_ota_core::Ota::handle_connected`]: handlers only forward.

use std::time::Duration;

use iot_ota_core::{Backoff, BrokerUrl};
use rumqttc::{
    AsyncClient, ConnectionError, EventLoop, MqttOptions, Outgoing, Packet, Publish,
    TlsConfiguration, Transport,
};

use crate::error::Error;
use crate::tls::{self, TlsOptions};

/// How a device connects to its broker.
///
/// ```
/// use iot_ota_device::LinkSettings;
/// let link = LinkSettings::new("mqtts://broker.example:8883", "pk.dev1")?;
/// assert!(link.broker.tls);
/// assert_eq!(link.keep_alive.as_secs(), 60);
/// # Ok::<(), iot_ota_device::Error>(())
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct LinkSettings {
    /// The broker; `broker.tls` turns TLS on.
    pub broker: BrokerUrl,
    /// MQTT client id.
    pub client_id: String,
    /// User name, if the broker wants one.
    pub username: Option<String>,
    /// Password (empty when `username` is set and this is `None`).
    pub password: Option<String>,
    /// Trust roots and client certificate for a TLS broker.
    pub tls: TlsOptions,
    /// MQTT keep-alive (at least 5 s).
    pub keep_alive: Duration,
    /// Bound on one connection attempt: TCP, TLS and the CONNACK.
    pub connect_timeout: Duration,
    /// The first wait before reconnecting after a loss.
    pub reconnect_min: Duration,
    /// The longest wait between reconnect attempts.
    pub reconnect_max: Duration,
    /// Largest MQTT packet accepted or sent, in bytes.
    pub max_packet_size: usize,
}

impl LinkSettings {
    /// Settings for `client_id` on the broker at `broker_url` (`mqtt://` or
    /// `mqtts://`): no credentials, system trust roots, keep-alive 60 s,
    /// connect timeout 10 s, reconnects from 0.5 s doubling to 30 s,
    /// jittered, packets up to 64 KiB.
    pub fn new(broker_url: &str, client_id: &str) -> Result<LinkSettings, Error> {
        let broker = BrokerUrl::parse(broker_url).map_err(Error::Config)?;
        Ok(LinkSettings::for_broker(broker, client_id))
    }

    /// As [`LinkSettings::new`], for a broker already parsed.
    pub fn for_broker(broker: BrokerUrl, client_id: &str) -> LinkSettings {
        LinkSettings {
            broker,
            client_id: client_id.to_owned(),
            username: None,
            password: None,
            tls: TlsOptions::default(),
            keep_alive: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            reconnect_min: Duration::from_millis(500),
            reconnect_max: Duration::from_secs(30),
            max_packet_size: 64 * 1024,
        }
    }

    /// "host:port" of the broker, for messages.
    pub fn broker_addr(&self) -> String {
        if self.broker.host.contains(':') {
            format!("[{}]:{}", self.broker.host, self.broker.port)
        } else {
            format!("{}:{}", self.broker.host, self.broker.port)
        }
    }

    /// The reconnect policy: jittered, seeded by the client id and the
    /// process, so a fleet that lost its broker does not come back in step.
    pub fn backoff(&self) -> Backoff {
        seeded_backoff(&self.client_id, self.reconnect_min, self.reconnect_max)
    }

    /// The rumqttc options: clean session (the platform does not keep
    /// offline devices' messages), credentials, TLS, keep-alive, packet size.
    fn mqtt_options(&self) -> Result<MqttOptions, Error> {
        let mut opts = MqttOptions::new(&self.client_id, &self.broker.host, self.broker.port);
        opts.set_keep_alive(self.keep_alive.max(Duration::from_secs(5)))
            .set_clean_session(true)
            .set_max_packet_size(self.max_packet_size, self.max_packet_size)
            .set_request_channel_capacity(REQUEST_CAPACITY);
        if let Some(user) = &self.username {
            opts.set_credentials(user.clone(), self.password.clone().unwrap_or_default());
        }
        if self.broker.tls {
            let tls = tls::client_config(&self.tls)?;
            opts.set_transport(Transport::Tls(TlsConfiguration::Rustls(tls)));
        }
        Ok(opts)
    }
}

/// A jittered backoff seeded by `name` (a client id, a URL) and the
/// process, so that devices, and downloads, do not retry in step.
pub(crate) fn seeded_backoff(name: &str, min: Duration, max: Duration) -> Backoff {
    let mut seed = u64::from(std::process::id());
    for b in name.bytes() {
        seed = seed
            .wrapping_mul(0x100_0000_01B3)
            .wrapping_add(u64::from(b));
    }
    // Addresses differ from run to run (ASLR): a little more spread.
    seed ^= std::ptr::addr_of!(seed) as u64;
    Backoff::new(min, max).seeded(seed)
}

/// Requests (publishes, subscriptions) queued for the event loop at most.
const REQUEST_CAPACITY: usize = 256;

/// A client that queues publishes and an event loop that carries them,
/// not connected yet: [`run`] connects. Needs a tokio runtime's context.
pub fn client(settings: &LinkSettings) -> Result<(AsyncClient, EventLoop), Error> {
    let opts = settings.mqtt_options()?;
    let (client, mut eventloop) = AsyncClient::new(opts, REQUEST_CAPACITY);
    let mut net = rumqttc::NetworkOptions::new();
    net.set_connection_timeout(settings.connect_timeout.as_secs().max(1));
    // Small packets at once: with Nagle, a reply written behind a report
    // still unacknowledged waited for the broker's delayed ACK (about 40 ms).
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);
    Ok((client, eventloop))
}

/// What the driver of a link is told. Called on the event loop's task, so
/// keep each call short (queue, notify, feed the engine).
pub trait LinkHandler {
    /// The broker accepted the connection (CONNACK).
    fn connected(&self);
    /// A message arrived.
    fn publish(&self, publish: &Publish);
    /// A connection attempt failed or the connection was lost; the link
    /// tries again after `retry_in`, unless this returns false (then [`run`]
    /// returns at once).
    fn lost(&self, error: &ConnectionError, retry_in: Duration) -> bool;
    /// Our DISCONNECT has been written: what was queued before it is sent.
    fn closing(&self) {}
}

/// Runs the link until it is closed: connects, feeds `handler`, and after a
/// loss reconnects with `backoff` (reset by every CONNACK).
///
/// It returns after a disconnect ([`AsyncClient::disconnect`]) once the
/// broker has closed the connection, when every client handle is dropped,
/// or when [`LinkHandler::lost`] says so.
///
/// Why it keeps reading after our DISCONNECT: closing the socket while the
/// broker's last acknowledgements sit unread in it makes the kernel reset
/// the connection, and a reset makes the broker drop what it has received
/// and not processed yet: our final reports.
pub async fn run(mut eventloop: EventLoop, mut backoff: Backoff, handler: &impl LinkHandler) {
    let mut closing = false;
    loop {
        match eventloop.poll().await {
            Ok(rumqttc::Event::Outgoing(Outgoing::Disconnect)) => {
                closing = true;
                handler.closing();
            }
            Ok(_) if closing => {}
            Ok(rumqttc::Event::Incoming(Packet::ConnAck(_))) => {
                backoff.reset();
                handler.connected();
            }
            Ok(rumqttc::Event::Incoming(Packet::Publish(p))) => handler.publish(&p),
            Ok(_) => {}
            Err(_) if closing => return,
            Err(ConnectionError::RequestsDone) => return,
            Err(e) => {
                let wait = backoff.next_delay();
                if !handler.lost(&e, wait) {
                    return;
                }
                tokio::time::sleep(wait).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_addresses() {
        let s = LinkSettings::new("mqtt://[::1]:1884", "c").unwrap();
        assert!(!s.broker.tls);
        assert_eq!(s.broker_addr(), "[::1]:1884");
        assert_eq!(s.reconnect_max, Duration::from_secs(30));
        assert!(LinkSettings::new("http://h", "c").is_err());
        let mut b = s.backoff();
        let w = b.next_delay();
        assert!(w >= Duration::from_millis(250) && w <= Duration::from_millis(500));
    }

    #[test]
    fn tls_options_fail_early() {
        let mut s = LinkSettings::new("mqtts://h", "c").unwrap();
        s.tls.ca_file = Some("/nonexistent/ca.pem".into());
        assert!(s.mqtt_options().is_err());
        s.broker.tls = false;
        assert!(s.mqtt_options().is_ok());
    }
}

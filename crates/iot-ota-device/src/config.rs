//! Device configuration, built builder-style.

use std::path::PathBuf;
use std::time::Duration;

use iot_ota_core::protocol::{self, DEFAULT_PREFIX};
use iot_ota_core::{BrokerUrl, Throttle, Topics};

use iot_ota_core::manifest::{PublicKey, TrustStore};

use crate::error::Error;
use crate::link::LinkSettings;

/// Everything a device needs to run OTA upgrades.
///
/// ```
/// use std::time::Duration;
/// let config = iot_ota_device::Config::new("mqtt://127.0.0.1:1883", "pk", "dev1", "1.0.0")?
///     .username("dev1")
///     .password("secret")
///     .keep_alive(Duration::from_secs(30));
/// assert_eq!(config.client_id(), "pk.dev1");
/// # Ok::<(), iot_ota_device::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Config {
    /// The MQTT link: broker, client id, credentials, TLS, keep-alive,
    /// timeouts, reconnect policy.
    pub(crate) link: LinkSettings,
    pub(crate) product_key: String,
    pub(crate) device_name: String,
    pub(crate) firmware_version: String,
    pub(crate) topic_prefix: String,
    /// The engine's settings (limits, throttle, get timeout, downgrade
    /// policy, pinned keys), embedded rather than redeclared.
    pub(crate) core: iot_ota_core::Config,
    pub(crate) idle_timeout: Duration,
    pub(crate) download_retries: u32,
    pub(crate) min_rate: u64,
    pub(crate) rate_window: Duration,
    pub(crate) start_report: Option<iot_ota_core::Progress>,
    pub(crate) security_counter: u64,
    pub(crate) download_dir: Option<PathBuf>,
}

impl Config {
    /// A configuration for device `device_name` of product `product_key`,
    /// running `firmware_version`, on the broker at `broker_url`.
    pub fn new(
        broker_url: &str,
        product_key: &str,
        device_name: &str,
        firmware_version: &str,
    ) -> Result<Config, Error> {
        let broker = BrokerUrl::parse(broker_url).map_err(Error::Config)?;
        protocol::validate_identity("product key", product_key).map_err(Error::Config)?;
        protocol::validate_identity("device name", device_name).map_err(Error::Config)?;
        protocol::validate_version(firmware_version)
            .map_err(|r| Error::Config(format!("firmware version: {}", r.message)))?;
        Ok(Config {
            link: LinkSettings::for_broker(
                broker,
                &protocol::default_client_id(product_key, device_name),
            ),
            product_key: product_key.to_owned(),
            device_name: device_name.to_owned(),
            firmware_version: firmware_version.to_owned(),
            topic_prefix: DEFAULT_PREFIX.to_owned(),
            core: iot_ota_core::Config::new(product_key, device_name),
            idle_timeout: Duration::from_secs(30),
            download_retries: 3,
            min_rate: 1024,
            rate_window: Duration::from_secs(60),
            start_report: None,
            security_counter: 0,
            download_dir: None,
        })
    }

    /// The report of the start-up decision
    /// ([`crate::lifecycle::Start::report`]): SUCCESS of the upgrade just
    /// committed, or its rollback. It goes out on the first connection,
    /// after the subscriptions and before the inform.
    pub fn report_at_start(mut self, report: iot_ota_core::Progress) -> Self {
        self.start_report = Some(report);
        self
    }

    /// MQTT client id; defaults to `{product_key}.{device_name}`.
    pub fn client_id(&self) -> String {
        self.link.client_id.clone()
    }

    /// The broker.
    pub fn broker(&self) -> &BrokerUrl {
        &self.link.broker
    }

    /// The MQTT link's settings.
    pub fn link(&self) -> &LinkSettings {
        &self.link
    }

    /// Replaces the MQTT link's settings (for what the builder methods do
    /// not cover: the reconnect policy, the packet size).
    pub fn with_link(mut self, link: LinkSettings) -> Self {
        self.link = link;
        self
    }

    /// The product key.
    pub fn product_key(&self) -> &str {
        &self.product_key
    }

    /// The device name (the topics' identifier).
    pub fn device_name(&self) -> &str {
        &self.device_name
    }

    /// The firmware version the device runs at start.
    pub fn firmware_version(&self) -> &str {
        &self.firmware_version
    }

    /// The same configuration for a device running `version` (what
    /// [`crate::lifecycle::Lifecycle::at_start`] found running).
    pub fn with_firmware_version(mut self, version: &str) -> Result<Self, Error> {
        protocol::validate_version(version)
            .map_err(|r| Error::Config(format!("firmware version: {}", r.message)))?;
        self.firmware_version = version.to_owned();
        Ok(self)
    }

    /// The device's topics.
    pub fn topics(&self) -> Topics {
        Topics::with_prefix(&self.topic_prefix, &self.product_key, &self.device_name)
    }

    /// Sets the MQTT client id.
    pub fn with_client_id(mut self, id: impl Into<String>) -> Self {
        self.link.client_id = id.into();
        self
    }

    /// Sets the MQTT user name.
    pub fn username(mut self, username: impl Into<String>) -> Self {
        self.link.username = Some(username.into());
        self
    }

    /// Sets the MQTT password.
    pub fn password(mut self, password: impl Into<String>) -> Self {
        self.link.password = Some(password.into());
        self
    }

    /// Trusts the CA certificates in this PEM file (besides the system roots)
    /// for both the broker and HTTPS downloads.
    pub fn ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.link.tls.ca_file = Some(path.into());
        self
    }

    /// Client certificate and key (PEM) for mutual TLS with the broker.
    pub fn client_cert(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.link.tls.client_cert = Some(cert.into());
        self.link.tls.client_key = Some(key.into());
        self
    }

    /// MQTT keep-alive interval (default 60 s; at least 5 s).
    pub fn keep_alive(mut self, keep_alive: Duration) -> Self {
        self.link.keep_alive = keep_alive.max(Duration::from_secs(5));
        self
    }

    /// Topic prefix (default `/sys`).
    pub fn topic_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.topic_prefix = prefix.into();
        self
    }

    /// Largest firmware accepted, in bytes; larger commands get 412.
    pub fn max_firmware_size(mut self, bytes: u64) -> Self {
        self.core.limits.max_size = bytes;
        self
    }

    /// Only accept firmware URLs on these hosts (empty: any host).
    pub fn allowed_hosts(mut self, hosts: Vec<String>) -> Self {
        self.core.limits.allowed_hosts = hosts;
        self
    }

    /// Hold the 200 reply of an accepted command until
    /// [`crate::OtaClient::acknowledge`]: journal the command first, then
    /// reply, so that a power cut between the two cannot lose it.
    pub fn ack_after_journal(mut self, hold: bool) -> Self {
        self.core.ack_after_journal = hold;
        self
    }

    /// Refuse (412) `http://` firmware URLs: only `https://` downloads.
    pub fn require_https(mut self, require: bool) -> Self {
        self.core.limits.require_https = require;
        self
    }

    /// Where downloads go: before each command the free space there is
    /// measured, and a `size` that cannot fit is refused (412).
    pub fn download_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.download_dir = Some(dir.into());
        self
    }

    /// Progress reports while downloading: every `step` points and `interval` at most.
    pub fn progress_throttle(mut self, step: u32, interval: Duration) -> Self {
        self.core.throttle = Throttle {
            step: step.max(1),
            interval,
        };
        self
    }

    /// How long a firmware get waits for its reply (default 10 s).
    pub fn get_timeout(mut self, timeout: Duration) -> Self {
        self.core.get_timeout = timeout;
        self
    }

    /// Refuse (412) commands whose version is lower than the running one.
    pub fn refuse_downgrade(mut self, refuse: bool) -> Self {
        self.core.refuse_downgrade = refuse;
        self
    }

    /// Connect timeout for the broker and the firmware server (default 10 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.link.connect_timeout = timeout;
        self
    }

    /// A download with no byte for this long fails or resumes (default 30 s).
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// How many times a broken download resumes with a Range request (default 3).
    pub fn download_retries(mut self, retries: u32) -> Self {
        self.download_retries = retries;
        self
    }

    /// The slowest download accepted: at least `bytes_per_sec` over every
    /// `window` (default 1 KiB/s over 60 s), and done within 5 min plus the
    /// image's size at that rate. A slower server ends the download with
    /// DOWNLOAD_FAILED. `bytes_per_sec` 0 turns both bounds off.
    pub fn min_download_rate(mut self, bytes_per_sec: u64, window: Duration) -> Self {
        self.min_rate = bytes_per_sec;
        self.rate_window = window;
        self
    }

    /// Pins a public key: from then on only firmware whose manifest a
    /// pinned, not revoked key signed is accepted (PROTOCOL.md, "Signed
    /// manifests"); other commands get 412. Several keys may be pinned.
    pub fn trust_key(mut self, key: PublicKey) -> Self {
        self.core.trust.keys.push(key);
        self
    }

    /// Pins the key in the PEM `PUBLIC KEY` file `path` (Ed25519 or P-256).
    pub fn trust_key_file(self, path: impl AsRef<std::path::Path>) -> Result<Self, Error> {
        let path = path.as_ref();
        let pem = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("trusted key {}: {e}", path.display())))?;
        let key = PublicKey::from_pem(&pem)
            .map_err(|e| Error::Config(format!("trusted key {}: {e}", path.display())))?;
        Ok(self.trust_key(key))
    }

    /// Revokes a key id (the hex SHA-256 of its SubjectPublicKeyInfo): its
    /// signatures no longer count, even when the key is pinned.
    pub fn revoke_key(mut self, key_id: impl Into<String>) -> Self {
        self.core
            .trust
            .revoked
            .push(key_id.into().to_ascii_lowercase());
        self
    }

    /// The running firmware's security counter (from the upgrade journal,
    /// [`crate::lifecycle::Lifecycle::security_counter`]): a signed
    /// manifest with a lower one is refused.
    pub fn security_counter(mut self, counter: u64) -> Self {
        self.security_counter = counter;
        self
    }

    /// The pinned keys and revoked ids.
    pub fn trust(&self) -> &TrustStore {
        &self.core.trust
    }

    /// The core engine's configuration.
    pub(crate) fn core(&self) -> iot_ota_core::Config {
        iot_ota_core::Config {
            topics: self.topics(),
            ..self.core.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_checks() {
        assert!(Config::new("mqtt://h", "p/k", "d", "1").is_err());
        assert!(Config::new("mqtt://h", "pk", "", "1").is_err());
        assert!(Config::new("mqtt://h", "pk", "d", "").is_err());
        let c = Config::new("mqtt://h", "pk", "d", "1")
            .unwrap()
            .topic_prefix("/t");
        assert_eq!(c.topics().upgrade, "/t/pk/d/ota/firmware/upgrade");
    }
}

//! The local IoT platform: a console-like OTA service on one machine.
//!
//! - MQTT: the embedded broker ([`EmbeddedBroker`], MQTT 3.1.1 on the
//!   platform's runtime, sized for fleets) or any external broker, reached
//!   through an ordinary MQTT client in both cases.
//! - A firmware HTTP(S) server with `Range`, `ETag` and `Content-Length` (`/fw/...`).
//! - State in SQLite ([`store`]): firmware, devices, batches and records.
//! - Batches and records run on a pure state machine ([`batch`]): every
//!   input takes `now`, every timer comes out as a value, and the shell
//!   ([`Platform`]) commits each change before acting on it.
//! - An HTTP JSON API ([`api`], `docs/platform-api.md`) and a small client for
//!   it ([`client::ApiClient`]), used by the `iot-ota` command line.
//!
//! ```no_run
//! # async fn run() -> Result<(), String> {
//! use iot_ota_platform::{Platform, PlatformConfig};
//! let platform = Platform::start(PlatformConfig::new("/var/lib/iot-ota")).await?;
//! println!("API on {}, broker {}", platform.api_url(), platform.broker_url());
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod api;
pub mod batch;
pub mod broker;
pub mod client;
pub mod credentials;
mod http;
mod service;
pub mod signing;
pub mod store;
pub mod token;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, MqttOptions, Transport};
use tokio::task::JoinHandle;

pub use broker::{BrokerOptions, BrokerStats, BrokerStatsHandle, EmbeddedBroker};
pub use client::ApiClient;
pub use iot_ota_core::BrokerUrl;
pub use service::{now_ms, process_usage};

/// Where the platform's MQTT broker is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerChoice {
    /// Start the embedded broker on this address (port 0: a free port),
    /// with [`PlatformConfig::broker_options`].
    Embedded(SocketAddr),
    /// Use this external broker (`mqtt://HOST:PORT` or `mqtts://HOST:PORT`).
    External(String),
}

/// How to run the platform.
#[derive(Debug, Clone)]
pub struct PlatformConfig {
    /// Database and firmware files live here.
    pub data_dir: PathBuf,
    /// HTTP listen address (API and firmware files); port 0 for a free port.
    pub http_addr: SocketAddr,
    /// Base URL put in commands, when devices reach the server by another name
    /// (default `http://` + the bound address).
    pub public_url: Option<String>,
    /// The MQTT broker.
    pub broker: BrokerChoice,
    /// The embedded broker's limits (with [`BrokerChoice::Embedded`]).
    pub broker_options: BrokerOptions,
    /// Topic prefix (default `/sys`).
    pub topic_prefix: String,
    /// Largest firmware accepted, bytes (default 100 MiB: 104,857,600 bytes).
    pub max_firmware_size: u64,
    /// MQTT username for an external broker.
    pub mqtt_username: Option<String>,
    /// MQTT password for an external broker.
    pub mqtt_password: Option<String>,
    /// CA certificates (PEM) for `mqtts://`, trusted besides the system's
    /// roots (as the device SDK's `ca_file`).
    pub ca_file: Option<PathBuf>,
    /// MQTT client id (default `iot-ota-platform-<16 hex of the data
    /// directory's SHA-256>`: stable across restarts, for the persistent
    /// session that keeps the reports sent while the platform is down).
    pub client_id: Option<String>,
    /// Also serve (API and firmware) over HTTPS on this address, with
    /// [`PlatformConfig::tls_cert`] and [`PlatformConfig::tls_key`]; the
    /// command URLs then default to `https://` this address.
    pub https_addr: Option<SocketAddr>,
    /// Server certificate chain (PEM) for HTTPS.
    pub tls_cert: Option<PathBuf>,
    /// Server private key (PEM) for HTTPS.
    pub tls_key: Option<PathBuf>,
    /// The API token every request that changes something must carry
    /// (`Authorization: Bearer TOKEN`); `None`: the one in
    /// `DATA_DIR/api-token`, made (random, 0600) at the first start.
    pub api_token: Option<String>,
    /// Manifest signing key (PKCS#8 PEM, Ed25519 or P-256): each uploaded
    /// firmware's manifest is signed with it and sent in commands and get
    /// replies (PROTOCOL.md, "Signed manifests").
    pub signing_key: Option<PathBuf>,
    /// Let anyone use the embedded broker, to every topic (development
    /// only). By default only the registered devices may connect, each to
    /// its own topics ([`credentials`]).
    pub mqtt_anonymous: bool,
}

impl PlatformConfig {
    /// Defaults: HTTP on 127.0.0.1:8080, embedded broker on 127.0.0.1:1883, prefix `/sys`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        PlatformConfig {
            data_dir: data_dir.into(),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            public_url: None,
            broker: BrokerChoice::Embedded(SocketAddr::from(([127, 0, 0, 1], 1883))),
            broker_options: BrokerOptions::default(),
            topic_prefix: iot_ota_core::protocol::DEFAULT_PREFIX.into(),
            max_firmware_size: api::DEFAULT_MAX_FIRMWARE_SIZE,
            mqtt_username: None,
            mqtt_password: None,
            ca_file: None,
            client_id: None,
            https_addr: None,
            tls_cert: None,
            tls_key: None,
            api_token: None,
            signing_key: None,
            mqtt_anonymous: false,
        }
    }
}

/// QoS 1 publishes (pushes, get replies) the platform keeps in flight.
const MQTT_INFLIGHT: u16 = 4096;

/// A running platform. Dropping it (or [`Platform::shutdown`]) stops the HTTP
/// server, the MQTT client, the ticker and the embedded broker.
pub struct Platform {
    shared: Arc<service::Shared>,
    token_made: bool,
    /// Held while the platform runs: one platform per data directory.
    _data_lock: std::fs::File,
    http_addr: SocketAddr,
    https_addr: Option<SocketAddr>,
    broker_url: String,
    tasks: Vec<JoinHandle<()>>,
    /// The MQTT reader, and the handler of what it queued (stopped in that
    /// order, the handler after draining the queue).
    mqtt_task: Option<JoinHandle<()>>,
    handler: Option<JoinHandle<()>>,
    broker: Option<EmbeddedBroker>,
}

/// TLS as a client (to an `mqtts://` broker, to an `https://` API): the
/// system's roots, plus the certificates of `ca_file` when given (the same
/// meaning as the device SDK's `ca_file`).
fn tls_config(ca_file: Option<&PathBuf>) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = ca_file {
        let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert = cert.map_err(|e| format!("{}: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    if roots.is_empty() {
        return Err("no trusted certificates: the system has none and no CA file was given".into());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

fn tls_server_config(cert: &PathBuf, key: &PathBuf) -> Result<rustls::ServerConfig, String> {
    let read = |p: &PathBuf| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    let certs = rustls_pemfile::certs(&mut read(cert)?.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate", cert.display()));
    }
    let key_der = rustls_pemfile::private_key(&mut read(key)?.as_slice())
        .map_err(|e| format!("{}: {e}", key.display()))?
        .ok_or_else(|| format!("{}: no private key", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| format!("TLS certificate and key: {e}"))
}

/// Serves `app` over TLS, one task per connection.
async fn serve_tls(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    acceptor: tokio_rustls::TlsAcceptor,
) {
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(x) => x,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let Ok(Ok(tls)) =
                tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
            else {
                return;
            };
            let service = hyper_util::service::TowerToHyperService::new(app);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await;
        });
    }
}

impl Platform {
    /// Starts everything and waits (up to 10 s) until the MQTT subscriptions are in place.
    pub async fn start(config: PlatformConfig) -> Result<Platform, String> {
        let data = config.data_dir.display();
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| format!("cannot use {data} as the data directory: {e}"))?;
        // One platform per data directory: a second one would push the same
        // batches twice. The lock goes with the process (or the Platform).
        let lock_path = config.data_dir.join("lock");
        let data_lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| format!("cannot use {data} as the data directory: {e}"))?;
        match data_lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(format!(
                    "another platform is running on the data directory {data} (it holds {})",
                    lock_path.display()
                ))
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(format!("locking the data directory {data}: {e}"))
            }
        }
        let store = store::Store::open(&config.data_dir.join("platform.db"))
            .map_err(|e| format!("the data directory {data}: {e}"))?;
        // The embedded broker admits the registered devices and the
        // platform's own client, unless it is asked to be open.
        let embedded_auth = match (&config.broker, config.mqtt_anonymous) {
            (BrokerChoice::Embedded(_), false) => {
                let (secret, _) = token::load_or_create_named(
                    &config.data_dir,
                    credentials::PLATFORM_SECRET_FILE,
                )?;
                let active = store
                    .active_credentials()
                    .map_err(|e| format!("the data directory {data}: {e}"))?;
                let creds = credentials::Credentials::new(&config.topic_prefix, &secret, active);
                Some((Arc::new(creds), secret))
            }
            (BrokerChoice::Embedded(_), true) => {
                log::warn!(
                    "the embedded MQTT broker is open (--mqtt-anonymous): anyone may connect, \
                     read every device's commands and report for any device"
                );
                None
            }
            (BrokerChoice::External(_), _) => None,
        };
        let (embedded, broker_url) = match &config.broker {
            BrokerChoice::Embedded(addr) => {
                let mut options = config.broker_options.clone();
                if let Some((creds, _)) = &embedded_auth {
                    options.auth = Some(creds.clone());
                }
                let b = EmbeddedBroker::start(*addr, options).await?;
                let url = b.url();
                (Some(b), url)
            }
            BrokerChoice::External(url) => (None, url.clone()),
        };
        let url = BrokerUrl::parse(&broker_url)?;
        // A persistent session under an id that stays with the data
        // directory: while the platform is down (a restart, an upgrade of
        // its own), the broker keeps its subscriptions and queues the
        // devices' QoS 1 reports (Mosquitto: `max_queued_messages`, 1000 by
        // default; raise it for large fleets), so no SUCCESS or inform
        // sent meanwhile is lost.
        let client_id = config.client_id.clone().unwrap_or_else(|| {
            let dir =
                std::fs::canonicalize(&config.data_dir).unwrap_or_else(|_| config.data_dir.clone());
            let hash = iot_ota_core::digest::digest_hex(
                iot_ota_core::SignMethod::Sha256,
                dir.to_string_lossy().as_bytes(),
            );
            format!("iot-ota-platform-{}", &hash[..16])
        });
        let mut opts = MqttOptions::new(client_id, url.host.clone(), url.port);
        opts.set_keep_alive(Duration::from_secs(30))
            .set_clean_session(false)
            .set_max_packet_size(1024 * 1024, 1024 * 1024)
            // rumqttc's default of 100 unacknowledged QoS 1 publishes made a
            // batch's pushes wait for the broker's round trips: 10,000 pushes
            // took 25 s to leave, and 1 in 9 missed its ack timeout.
            .set_inflight(MQTT_INFLIGHT)
            // A device message is acknowledged once it is handled and
            // committed, not when it is read: a crash in between loses
            // nothing (the broker delivers it again).
            .set_manual_acks(true);
        if let Some((_, secret)) = &embedded_auth {
            opts.set_credentials(credentials::PLATFORM_USER, secret.clone());
        } else if let Some(user) = &config.mqtt_username {
            opts.set_credentials(user, config.mqtt_password.clone().unwrap_or_default());
        }
        if url.tls {
            let tls = tls_config(config.ca_file.as_ref())?;
            opts.set_transport(Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(Arc::new(tls)),
            ));
        }
        let (mqtt, mut eventloop) = AsyncClient::new(opts, 1024);
        let mut net = rumqttc::NetworkOptions::new();
        // Pushes go out at once (no Nagle wait behind an unacknowledged one).
        net.set_tcp_nodelay(true);
        eventloop.set_network_options(net);

        let listener = tokio::net::TcpListener::bind(config.http_addr)
            .await
            .map_err(|e| format!("HTTP listen on {}: {e}", config.http_addr))?;
        let http_addr = listener.local_addr().map_err(|e| e.to_string())?;
        let https = match config.https_addr {
            None => None,
            Some(addr) => {
                let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else {
                    return Err("HTTPS needs a certificate and a key".into());
                };
                let tls = tls_server_config(cert, key)?;
                let l = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| format!("HTTPS listen on {addr}: {e}"))?;
                let bound = l.local_addr().map_err(|e| e.to_string())?;
                Some((l, bound, tokio_rustls::TlsAcceptor::from(Arc::new(tls))))
            }
        };
        let https_addr = https.as_ref().map(|(_, a, _)| *a);
        let default_url = match https_addr {
            Some(a) => format!("https://{a}"),
            None => format!("http://{http_addr}"),
        };
        let public_url = config
            .public_url
            .clone()
            .unwrap_or(default_url)
            .trim_end_matches('/')
            .to_owned();
        let signing_key = config
            .signing_key
            .as_deref()
            .map(signing::SigningKey::load)
            .transpose()?;
        if let Some(k) = &signing_key {
            log::info!(
                "signing manifests with key {}",
                iot_ota_core::manifest::Signer::key_id(k)
            );
        }
        let (api_token, token_made) = match config.api_token.clone() {
            Some(t) if t.trim().is_empty() => return Err("the API token must not be empty".into()),
            Some(t) => (t, false),
            None => token::load_or_create(&config.data_dir)?,
        };
        let shared = Arc::new(
            service::Shared::new(
                store,
                mqtt,
                service::Settings {
                    prefix: config.topic_prefix.clone(),
                    public_url,
                    data_dir: config.data_dir.clone(),
                    max_size: config.max_firmware_size,
                    signing_key,
                    api_token,
                    broker_stats: embedded.as_ref().map(EmbeddedBroker::stats_handle),
                    credentials: embedded_auth.as_ref().map(|(c, _)| c.clone()),
                },
            )
            .map_err(|e| e.to_string())?,
        );
        let app = http::router(shared.clone());
        let mut tasks = Vec::new();
        if let Some((l, _, acceptor)) = https {
            tasks.push(tokio::spawn(serve_tls(l, app.clone(), acceptor)));
        }
        tasks.push(tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                eprintln!("platform: HTTP server stopped: {e}");
            }
        }));
        let (queue_tx, queue_rx) = tokio::sync::mpsc::unbounded_channel();
        let mqtt_task = tokio::spawn(service::mqtt_loop(shared.clone(), eventloop, queue_tx));
        let handler = tokio::spawn(service::handle_messages(shared.clone(), queue_rx));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !shared.mqtt_up.load(Ordering::SeqCst) {
            if tokio::time::Instant::now() > deadline {
                for t in &tasks {
                    t.abort();
                }
                return Err(format!("could not connect and subscribe to {broker_url}"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tasks.push(tokio::spawn(service::ticker(shared.clone())));
        Ok(Platform {
            mqtt_task: Some(mqtt_task),
            handler: Some(handler),
            shared,
            token_made,
            _data_lock: data_lock,
            http_addr,
            https_addr,
            broker_url,
            tasks,
            broker: embedded,
        })
    }

    /// Registers `devices` of `product` (as `POST /api/devices` does) and
    /// returns their credentials, each secret once.
    pub fn register_devices(
        &self,
        product: &str,
        devices: &[String],
    ) -> Result<Vec<api::DeviceCredential>, String> {
        let req = api::RegisterDevices {
            product: product.to_owned(),
            devices: devices.to_vec(),
        };
        self.shared
            .register_devices(&req)
            .map(|r| r.devices)
            .map_err(|e| e.to_string())
    }

    /// Whether the embedded broker lets anyone in (`mqtt_anonymous`).
    pub fn is_open(&self) -> bool {
        self.broker.is_some() && self.shared.credentials.is_none()
    }

    /// The bound HTTP address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The bound HTTPS address, when HTTPS is on.
    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.https_addr
    }

    /// `http://ADDR`, the API's base URL.
    pub fn api_url(&self) -> String {
        format!("http://{}", self.http_addr)
    }

    /// The API token (`Authorization: Bearer ...` on every request that
    /// changes something).
    pub fn api_token(&self) -> &str {
        &self.shared.api_token
    }

    /// True when this start made the token (show it once).
    pub fn token_made(&self) -> bool {
        self.token_made
    }

    /// A client of this platform's API, with its token.
    pub fn client(&self) -> Result<ApiClient, String> {
        Ok(ApiClient::new(&self.api_url())
            .map_err(|e| e.to_string())?
            .with_token(self.api_token()))
    }

    /// The base URL put in commands.
    pub fn public_url(&self) -> &str {
        &self.shared.public_url
    }

    /// The broker the platform uses (the embedded one's `mqtt://ADDR`, or the external URL).
    pub fn broker_url(&self) -> &str {
        &self.broker_url
    }

    /// The embedded broker's counters (connections, messages, drops), when
    /// the platform runs its own broker.
    pub fn broker_stats(&self) -> Option<BrokerStats> {
        self.broker.as_ref().map(EmbeddedBroker::stats)
    }

    /// True while the MQTT connection is up and subscribed.
    pub fn mqtt_connected(&self) -> bool {
        self.shared.mqtt_up.load(Ordering::SeqCst)
    }

    /// Stops the HTTP server, the MQTT client and the ticker.
    pub async fn shutdown(mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        let _ = self.shared.mqtt.disconnect().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The reader first: then the handler takes what the reader queued
        // (acknowledged to the broker already, so not to be lost) and ends.
        if let Some(t) = self.mqtt_task.take() {
            t.abort();
            let _ = t.await;
        }
        if let Some(mut h) = self.handler.take() {
            if tokio::time::timeout(Duration::from_secs(10), &mut h)
                .await
                .is_err()
            {
                log::warn!("stopping: device messages still queued after 10 s were dropped");
                h.abort();
            }
        }
        // Wait for the aborted tasks, so the listeners are closed (and their
        // ports free for a restart) when this returns.
        let tasks: Vec<JoinHandle<()>> = self.tasks.drain(..).collect();
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
    }

    fn stop_tasks(&mut self) {
        let reader = self.mqtt_task.take().into_iter();
        let handler = self.handler.take().into_iter();
        for t in self.tasks.drain(..).chain(reader).chain(handler) {
            t.abort();
        }
    }
}

impl Drop for Platform {
    fn drop(&mut self) {
        self.stop_tasks();
    }
}

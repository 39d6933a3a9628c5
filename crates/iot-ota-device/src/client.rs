//! The async client: connect, receive upgrade commands, report, ask for firmware.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use iot_ota_core::{Event, Firmware, Ota, Status, UpgradeCommand};
use rumqttc::{ConnectionError, Publish};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::download::Download;
use crate::error::Error;
use crate::http::HttpOptions;
use crate::link::{self, LinkHandler};
use crate::session::Session;

type GetWaiters = Arc<Mutex<HashMap<String, oneshot::Sender<Result<Firmware, Error>>>>>;

/// A connected OTA device. Cheap to clone; the connection is closed when the
/// last clone is dropped (or by [`OtaClient::disconnect`]).
///
/// The MQTT connection is kept up in a background task ([`crate::link::run`]):
/// it reconnects with backoff (by default 0.5 s doubling to 30 s, jittered),
/// and after every reconnect the engine re-subscribes (the session is clean)
/// and re-reports the running version, since the platform may have missed it.
#[derive(Clone, Debug)]
pub struct OtaClient {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    session: Arc<Session>,
    config: Config,
    http: HttpOptions,
    waiters: GetWaiters,
    timer: Arc<Notify>,
    /// Signalled when the link has ended (after a disconnect: once the broker
    /// has closed the connection, so it has read our last reports).
    disconnected: Arc<Notify>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The stream of accepted upgrade commands (already acknowledged with 200).
///
/// Use [`Upgrades::next`], or it as a `futures_core::Stream`. Rejected commands
/// never appear here: the SDK has replied to them and reported the failure.
#[derive(Debug)]
pub struct Upgrades {
    rx: mpsc::UnboundedReceiver<UpgradeCommand>,
}

impl Upgrades {
    /// The next accepted upgrade command; `None` once the client is closed.
    pub async fn next(&mut self) -> Option<UpgradeCommand> {
        self.rx.recv().await
    }
}

impl futures_core::Stream for Upgrades {
    type Item = UpgradeCommand;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

impl OtaClient {
    /// Connects to the broker, subscribes to the upgrade and get-reply topics,
    /// and reports the configured firmware version. Fails if the first
    /// connection does not succeed within the connect timeout; later losses of
    /// the connection are repaired in the background.
    pub async fn connect(config: Config) -> Result<(OtaClient, Upgrades), Error> {
        let mut ota = Ota::new(config.core(), config.firmware_version())?;
        ota.set_security_counter(config.security_counter);
        if let Some(report) = config.start_report.clone() {
            ota.report_at_start(report)?;
        }
        let (mqtt, eventloop) = link::client(config.link())?;
        let (upgrades_tx, upgrades_rx) = mpsc::unbounded_channel();
        let waiters: GetWaiters = Arc::default();
        let sink_waiters = waiters.clone();
        let sink = Box::new(move |event: Event| match event {
            Event::Upgrade(cmd) => {
                log::info!("upgrade to {} accepted", cmd.firmware.version);
                // A closed receiver means the application stopped listening;
                // the command was acked and will fail by the platform's timeout.
                let _ = upgrades_tx.send(cmd);
            }
            Event::Rejected { msg_id, rejection } => {
                log::warn!("upgrade command {msg_id:?} rejected: {rejection}");
            }
            Event::FirmwareInfo(reply) => {
                let waiter = lock(&sink_waiters).remove(&reply.msg_id);
                if let Some(tx) = waiter {
                    let _ = tx.send(reply.result.map_err(|e| Error::NotFound {
                        code: e.code,
                        message: e.message,
                    }));
                }
            }
            Event::GetTimedOut { msg_id, .. } => {
                if let Some(tx) = lock(&sink_waiters).remove(&msg_id) {
                    let _ = tx.send(Err(Error::Timeout));
                }
            }
        });
        let session = Session::new(ota, mqtt, sink);
        session.set_download_dir(config.download_dir.clone());
        let timer = Arc::new(Notify::new());

        let (first_tx, first_rx) = oneshot::channel();
        let disconnected = Arc::new(Notify::new());
        let handler = ClientLink {
            session: session.clone(),
            first: Mutex::new(Some(first_tx)),
            broker: config.link().broker_addr(),
        };
        let backoff = config.link().backoff();
        let done = disconnected.clone();
        let driver = tokio::spawn(async move {
            link::run(eventloop, backoff, &handler).await;
            // After our DISCONNECT the link has read until the broker closed.
            done.notify_one();
        });
        let timers = tokio::spawn(run_timers(session.clone(), timer.clone()));
        let connected = tokio::time::timeout(
            config.link().connect_timeout + Duration::from_secs(1),
            first_rx,
        )
        .await;
        let result = match connected {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Error::Closed),
            Err(_) => Err(Error::Mqtt(format!(
                "no connection to {} within {:?}",
                config.link().broker_addr(),
                config.link().connect_timeout
            ))),
        };
        if let Err(e) = result {
            driver.abort();
            timers.abort();
            return Err(e);
        }
        let http = HttpOptions {
            connect_timeout: config.link().connect_timeout,
            idle_timeout: config.idle_timeout,
            // With a CA file, build the TLS config now so a bad file fails the
            // connect. Without one, the HTTP client loads the system roots on
            // the first https:// download: a plain-HTTP device without a
            // system certificate store must still work.
            tls: match config.link().tls.ca_file {
                Some(_) => Some(crate::tls::client_config(&config.link().tls)?),
                None => None,
            },
            ..HttpOptions::default()
        };
        let client = OtaClient {
            inner: Arc::new(Inner {
                session,
                config,
                http,
                waiters,
                timer,
                disconnected,
                tasks: vec![driver, timers],
            }),
        };
        Ok((client, Upgrades { rx: upgrades_rx }))
    }

    /// The session (engine and MQTT client) under this client.
    pub fn session(&self) -> &Arc<Session> {
        &self.inner.session
    }

    /// The configuration the client was made with.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The firmware version last reported.
    pub fn version(&self) -> String {
        self.inner.session.version()
    }

    /// Reports the running firmware version (after an upgrade; the client
    /// already does it at every connection).
    pub fn report_version(&self, version: &str) -> Result<(), Error> {
        Ok(self.inner.session.with(|ota| ota.report_version(version))?)
    }

    /// Sends the held 200 reply of `command` ([`Config::ack_after_journal`]),
    /// once it is journaled. False when no reply of it waits.
    pub fn acknowledge(&self, command: &UpgradeCommand) -> bool {
        self.inner
            .session
            .with(|ota| ota.acknowledge(&command.msg_id))
    }

    /// Reports a status and percent for the upgrade in progress. SUCCESS or a
    /// failure status ends the upgrade; the next command is then accepted.
    pub fn report_progress(&self, status: Status, progress: u32, desc: &str) -> Result<(), Error> {
        Ok(self
            .inner
            .session
            .with(|ota| ota.report_progress(status, progress, desc))?)
    }

    /// Asks the platform for firmware `version` of this product and waits for
    /// the reply: the firmware, [`Error::NotFound`] (the 404 form), or
    /// [`Error::Timeout`] after the get timeout.
    pub async fn get_firmware_info(&self, version: &str) -> Result<Firmware, Error> {
        let (tx, rx) = oneshot::channel();
        {
            // Hold the waiters' lock across the request so the reply cannot be
            // matched before its waiter is registered. The request itself
            // emits no event, so the sink never needs this lock meanwhile.
            let mut waiters = lock(&self.inner.waiters);
            let msg_id = self
                .inner
                .session
                .with(|ota| ota.request_firmware_info(version, Instant::now()))?;
            waiters.insert(msg_id, tx);
        }
        self.inner.timer.notify_one();
        rx.await.map_err(|_| Error::Closed)?
    }

    /// The download of an accepted upgrade command.
    pub fn download(&self, command: &UpgradeCommand) -> Download {
        Download::new(
            self.inner.session.clone(),
            command.firmware.clone(),
            self.download_options(),
        )
    }

    /// The download of the upgrade the engine has as its job again after a
    /// restart ([`crate::lifecycle::Lifecycle::resume`] gave it back): the
    /// part file resumes it.
    pub fn resume_download(&self, firmware: &Firmware) -> Download {
        Download::new(
            self.inner.session.clone(),
            firmware.clone(),
            self.download_options(),
        )
    }

    /// Starts an upgrade to a firmware the device asked for
    /// ([`OtaClient::get_firmware_info`]), as if a command had brought it.
    /// Fails with [`iot_ota_core::Error::Busy`] while another upgrade runs.
    pub fn download_firmware(&self, firmware: &Firmware) -> Result<Download, Error> {
        self.inner
            .session
            .with(|ota| ota.accept_firmware(firmware))?;
        Ok(Download::new(
            self.inner.session.clone(),
            firmware.clone(),
            self.download_options(),
        ))
    }

    fn download_options(&self) -> crate::download::DownloadOptions {
        let c = &self.inner.config;
        crate::download::DownloadOptions {
            http: self.inner.http.clone(),
            retries: c.download_retries,
            min_rate: c.min_rate,
            rate_window: c.rate_window,
            ..Default::default()
        }
    }

    /// Disconnects from the broker after sending what is queued (reports
    /// included: requests go out in order), waiting at most 2 s for that, and
    /// stops the background tasks.
    pub async fn disconnect(self) {
        let inner = &self.inner;
        // Bounded as a whole: queueing the DISCONNECT itself waits when the
        // request queue is full (the broker away).
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            if inner.session.mqtt().disconnect().await.is_ok() {
                inner.disconnected.notified().await;
            }
        })
        .await;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The async client's side of the link: feeds the session and tells
/// [`OtaClient::connect`] how the first attempt went.
struct ClientLink {
    session: Arc<Session>,
    first: Mutex<Option<oneshot::Sender<Result<(), Error>>>>,
    broker: String,
}

impl LinkHandler for ClientLink {
    fn connected(&self) {
        log::info!("connected to the broker {}", self.broker);
        self.session.handle_connected();
        if let Some(tx) = lock(&self.first).take() {
            let _ = tx.send(Ok(()));
        }
    }

    fn publish(&self, publish: &Publish) {
        self.session.handle_publish(publish);
    }

    fn lost(&self, error: &ConnectionError, retry_in: Duration) -> bool {
        self.session.handle_disconnected();
        if let Some(tx) = lock(&self.first).take() {
            // The first attempt failed: `connect` returns the error.
            let _ = tx.send(Err(Error::Mqtt(format!("{}: {error}", self.broker))));
            return false;
        }
        log::warn!(
            "MQTT connection to {} lost: {error}; reconnecting in {retry_in:.1?}",
            self.broker
        );
        true
    }

    fn closing(&self) {
        self.session.handle_disconnected();
    }
}

/// Expires firmware gets when their time comes; woken early when a new one starts.
async fn run_timers(session: Arc<Session>, wake: Arc<Notify>) {
    loop {
        match session.next_timeout() {
            Some(d) => {
                tokio::select! {
                    _ = tokio::time::sleep(d) => session.handle_timeout(),
                    _ = wake.notified() => {}
                }
            }
            None => wake.notified().await,
        }
    }
}

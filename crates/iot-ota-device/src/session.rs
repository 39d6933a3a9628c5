//! The MQTT side of the driver: the core engine wired to a rumqttc client.
//!
//! A [`Session`] is shared by whoever polls the MQTT event loop (the async
//! client's background task, or the C API's `iot_mqtt_yield`) and by whoever
//! reports (the application, a download). Every engine call goes through
//! [`Session::with`], which drains the engine's outputs right after: the drive
//! contract of `iot-ota-core`, written once.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use iot_ota_core::{Event, Ota, Output, Progress};
use rumqttc::{AsyncClient, Publish, QoS};

/// Receives the engine's events ([`Event`]), outside of any lock.
pub type EventSink = Box<dyn Fn(Event) + Send + Sync>;

/// The engine, the MQTT client that carries its messages, and where its events go.
pub struct Session {
    ota: Mutex<Ota>,
    mqtt: AsyncClient,
    sink: EventSink,
    /// Where downloads go: its free space is measured before each command.
    download_dir: Mutex<Option<std::path::PathBuf>>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").finish_non_exhaustive()
    }
}

impl Session {
    /// A session over `ota`, publishing through `mqtt`, telling `sink` of events.
    pub fn new(ota: Ota, mqtt: AsyncClient, sink: EventSink) -> Arc<Session> {
        Arc::new(Session {
            ota: Mutex::new(ota),
            mqtt,
            sink,
            download_dir: Mutex::new(None),
        })
    }

    /// Where downloads go: before each command the engine learns the free
    /// space there, and refuses (412) a `size` that cannot fit.
    pub fn set_download_dir(&self, dir: Option<std::path::PathBuf>) {
        *self.download_dir.lock().unwrap_or_else(|p| p.into_inner()) = dir;
    }

    /// The MQTT client (to publish or subscribe beyond OTA).
    pub fn mqtt(&self) -> &AsyncClient {
        &self.mqtt
    }

    fn lock(&self) -> MutexGuard<'_, Ota> {
        // A panic while holding the lock leaves the engine consistent (every
        // engine call is a few field updates), so a poisoned lock is still usable.
        self.ota.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the engine, then carries out its outputs: subscriptions and
    /// publishes go to the MQTT client's queue, events to the sink (after the
    /// lock is released, so the sink may call back into the session).
    pub fn with<R>(&self, f: impl FnOnce(&mut Ota) -> R) -> R {
        let mut f = Some(f);
        let mut result = None;
        self.with_erased(&mut |ota| {
            if let Some(f) = f.take() {
                result = Some(f(ota));
            }
        });
        result.expect("with_erased calls its closure once")
    }

    /// [`Session::with`]'s work, once for every closure type: the drain of
    /// the outputs is the bulk of it, and each copy would cost a KB of code.
    fn with_erased(&self, f: &mut dyn FnMut(&mut Ota)) {
        let mut events = Vec::new();
        {
            let mut ota = self.lock();
            f(&mut ota);
            while let Some(out) = ota.poll_output() {
                match out {
                    Output::Subscribe { topic } => {
                        if let Err(e) = self.mqtt.try_subscribe(topic.clone(), QoS::AtLeastOnce) {
                            log::error!("cannot queue subscribe to {topic}: {e}");
                        }
                    }
                    Output::Publish { topic, payload } => {
                        if let Err(e) =
                            self.mqtt
                                .try_publish(topic.clone(), QoS::AtLeastOnce, false, payload)
                        {
                            log::error!("cannot queue publish to {topic}: {e}");
                        }
                    }
                    Output::Event(e) => events.push(e),
                }
            }
        }
        for e in events {
            (self.sink)(e);
        }
    }

    /// The link is up (CONNACK): the engine subscribes and informs again.
    pub fn handle_connected(&self) {
        self.with(|ota| ota.handle_connected());
    }

    /// The link is down.
    pub fn handle_disconnected(&self) {
        self.with(|ota| ota.handle_disconnected());
    }

    /// Feeds a message to the engine. Returns true when it was one of this
    /// device's OTA topics.
    pub fn handle_publish(&self, publish: &Publish) -> bool {
        // Only an upgrade command needs the free space (a statvfs call).
        let command = publish.topic.ends_with("/ota/firmware/upgrade");
        let free = command
            .then(|| {
                self.download_dir
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone()
            })
            .flatten()
            .and_then(|d| crate::fsutil::free_space(&d).ok());
        self.with(|ota| {
            if free.is_some() {
                ota.set_free_space(free);
            }
            ota.handle_publish(&publish.topic, &publish.payload, Instant::now())
        })
    }

    /// Lets the engine expire what is due.
    pub fn handle_timeout(&self) {
        self.with(|ota| ota.handle_timeout(Instant::now()));
    }

    /// How long until [`Session::handle_timeout`] is due, if anything is pending.
    pub fn next_timeout(&self) -> Option<Duration> {
        self.lock()
            .poll_timeout()
            .map(|t| t.saturating_duration_since(Instant::now()))
    }

    /// Publishes a report. Reports are best effort while the broker is away:
    /// they are queued, and a failure to queue is logged, never fatal to the
    /// download that made them.
    pub fn publish_progress(&self, report: &Progress) {
        // The device's own account of its steps (`-v` in the agent).
        log::info!("{report}");
        if let Err(e) = self.with(|ota| ota.publish_progress(report)) {
            log::error!("progress report refused: {e}");
        }
    }

    /// The firmware version last reported.
    pub fn version(&self) -> String {
        self.lock().version().to_owned()
    }

    /// The core engine's settings.
    pub fn core_config(&self) -> iot_ota_core::Config {
        self.lock().config().clone()
    }
}

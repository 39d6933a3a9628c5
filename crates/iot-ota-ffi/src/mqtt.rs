//! `iot_mqtt.h`: the MQTT instance that `iot_ota_init` takes as its `mqtt_client`.
//!
//! One instance is one rumqttc connection, its event loop running as a task
//! on the instance's own current-thread tokio runtime. The task runs only
//! while the application is inside a call that drives the runtime
//! (`iot_mqtt_connect`, `iot_mqtt_yield`, `iot_ota_fetch_yield`,
//! `iot_mqtt_destroy`); between calls the instance is idle, as a C
//! application expects of a yield-driven API.
//!
//! Incoming messages go first to the OTA engines attached to the instance
//! (one per `iot_ota_init`), then, by message type, to the callbacks of
//! `iot_mqtt_subscribe`. Callbacks are queued and called after the runtime
//! has stopped, so they may call anything in this API.

use std::collections::VecDeque;
use std::ffi::{c_char, c_int, c_void, CString};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use iot_ota_core::protocol::{TopicKind, DEFAULT_PREFIX};
use iot_ota_core::{BrokerUrl, Topics};
use iot_ota_device::ffi_support::{link_client, run_link, LinkHandler};
use iot_ota_device::tls::{self, TlsOptions};
use iot_ota_device::LinkSettings;
use iot_ota_device::Session;
use rumqttc::{AsyncClient, ConnectionError, EventLoop, Publish};
use rustls::ClientConfig;
use tokio::runtime::Runtime;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::registry::Registry;
use crate::{
    c_str, guard, lock, opt_c_str, IOT_OTA_ERR_GENERAL, IOT_OTA_ERR_INVALID_PARAM,
    IOT_OTA_ERR_INVALID_STATE, IOT_OTA_ERR_MQTT_FAILED, IOT_OTA_ERR_NONE, IOT_OTA_ERR_TIMEOUT,
};

/// `iot_mqtt_sub_type_t`: upgrade commands (`.../ota/firmware/upgrade`).
pub const MQTT_SUB_TYPE_OTA_FIRMWARE_UPGRADE: c_int = 1;
/// `iot_mqtt_sub_type_t`: firmware get replies (`.../ota/firmware/get_reply`).
pub const MQTT_SUB_TYPE_OTA_FIRMWARE_GET_INF_REPLY: c_int = 2;

/// `iot_mqtt_config_t`: how `iot_mqtt_create` connects. Zero-initialise it,
/// then set at least `host` and `client_id`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct IotMqttConfig {
    /// Broker host name or address (required).
    pub host: *const c_char,
    /// Broker port; 0 means 1883, or 8883 with TLS.
    pub port: u16,
    /// MQTT client id (required).
    pub client_id: *const c_char,
    /// User name, or NULL for none.
    pub username: *const c_char,
    /// Password, or NULL (empty) when `username` is set.
    pub password: *const c_char,
    /// PEM file of extra trusted CA certificates (besides the system's), or
    /// NULL. Setting it turns MQTT TLS on; unless `download_ca_file` is set,
    /// the same roots serve HTTPS downloads.
    pub ca_file: *const c_char,
    /// Non-zero: MQTT over TLS even without `ca_file` (system roots).
    pub use_tls: c_int,
    /// MQTT keep-alive in seconds; 0 means 60, values below 5 count as 5.
    pub keep_alive_s: u16,
    /// PEM file of extra trusted CA certificates for HTTPS downloads only
    /// (besides the system's), or NULL (then `ca_file`'s roots serve them).
    /// Does not turn MQTT TLS on.
    pub download_ca_file: *const c_char,
}

/// `iot_mqtt_callback_t`: receives a message of a subscribed type. `topic`
/// and `payload` (NUL-terminated; `payload_len` excludes the NUL) are valid
/// only during the call.
pub type IotMqttCallback = Option<
    unsafe extern "C" fn(
        user_data: *mut c_void,
        sub_type: c_int,
        topic: *const c_char,
        payload: *const c_char,
        payload_len: u32,
    ),
>;

/// A message waiting to be handed to a callback.
struct Delivery {
    sub_type: c_int,
    topic: String,
    payload: Vec<u8>,
}

/// A registered callback: the function and the caller's `user_data` (kept as
/// an address: it is only ever handed back).
#[derive(Clone, Copy)]
struct Callback {
    f: unsafe extern "C" fn(*mut c_void, c_int, *const c_char, *const c_char, u32),
    user_data: usize,
}

/// What the event loop task and the API calls share.
pub(crate) struct Shared {
    state: Mutex<SharedState>,
    /// Woken when something the waiting call may care about happened.
    notify: Notify,
}

#[derive(Default)]
struct SharedState {
    /// The attached OTA engines, keyed by their session's address.
    sessions: Vec<(usize, Arc<Session>)>,
    connected: bool,
    /// Successful connections so far.
    connects: u64,
    /// Failed connection attempts and lost connections so far.
    failures: u64,
    last_error: Option<String>,
    /// Events delivered to OTA handles so far (upgrades, get replies).
    ota_events: u64,
    deliveries: VecDeque<Delivery>,
    callbacks: [Option<Callback>; 2],
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, SharedState> {
        lock(&self.state)
    }

    /// Something a waiting call may care about happened (a download's read-ahead has bytes).
    pub(crate) fn wake(&self) {
        self.notify.notify_one();
    }

    /// Until the next [`Shared::wake`] or connection event.
    pub(crate) async fn notified(&self) {
        self.notify.notified().await
    }

    /// An OTA handle got an event: wake whoever is yielding.
    pub(crate) fn ota_event(&self) {
        self.state().ota_events += 1;
        self.notify.notify_one();
    }

    /// The attached engines (cloned out, so no lock is held while they run).
    fn sessions(&self) -> Vec<Arc<Session>> {
        self.state()
            .sessions
            .iter()
            .map(|(_, s)| s.clone())
            .collect()
    }
}

/// The C API's side of the link ([`run_link`]): feeds the attached engines,
/// queues the callbacks' deliveries, keeps the counters `iot_mqtt_connect`
/// and `iot_mqtt_yield` read, and wakes whoever waits in them.
struct FfiLink(Arc<Shared>);

impl LinkHandler for FfiLink {
    fn connected(&self) {
        {
            let mut st = self.0.state();
            st.connected = true;
            st.connects += 1;
        }
        for session in self.0.sessions() {
            session.handle_connected();
        }
        self.0.notify.notify_one();
    }

    fn publish(&self, p: &Publish) {
        for session in self.0.sessions() {
            session.handle_publish(p);
        }
        let sub_type = match Topics::parse(DEFAULT_PREFIX, &p.topic) {
            Some((_, _, TopicKind::Upgrade)) => Some(MQTT_SUB_TYPE_OTA_FIRMWARE_UPGRADE),
            Some((_, _, TopicKind::GetReply)) => Some(MQTT_SUB_TYPE_OTA_FIRMWARE_GET_INF_REPLY),
            _ => None,
        };
        if let Some(sub_type) = sub_type {
            let mut st = self.0.state();
            if st.callbacks[slot(sub_type)].is_some() {
                st.deliveries.push_back(Delivery {
                    sub_type,
                    topic: p.topic.clone(),
                    payload: p.payload.to_vec(),
                });
            }
        }
        self.0.notify.notify_one();
    }

    fn lost(&self, error: &ConnectionError, retry_in: Duration) -> bool {
        log::warn!("MQTT connection: {error}; retrying in {retry_in:.1?}");
        self.down(Some(error));
        true
    }

    fn closing(&self) {
        self.down(None);
    }
}

impl FfiLink {
    /// The connection is down: lost (with the error) or closed by us.
    fn down(&self, error: Option<&ConnectionError>) {
        {
            let mut st = self.0.state();
            st.connected = false;
            if let Some(e) = error {
                st.failures += 1;
                st.last_error = Some(e.to_string());
            }
        }
        for session in self.0.sessions() {
            session.handle_disconnected();
        }
        self.0.notify.notify_one();
    }
}

fn slot(sub_type: c_int) -> usize {
    (sub_type - 1) as usize
}

/// An MQTT instance (`iot_mqtt_t`).
pub struct Mqtt {
    client: AsyncClient,
    pub(crate) shared: Arc<Shared>,
    /// The event loop until `iot_mqtt_connect` hands it to its task.
    eventloop: Mutex<Option<EventLoop>>,
    driver: Mutex<Option<JoinHandle<()>>>,
    /// TLS settings for HTTPS downloads, when the configuration named a CA
    /// file for them (`download_ca_file`, else `ca_file`); otherwise
    /// downloads use the system roots.
    pub(crate) https: Option<Arc<ClientConfig>>,
    /// What the instance was made with.
    settings: LinkSettings,
    closed: AtomicBool,
    /// Declared last: dropped after everything that may hold its resources.
    pub(crate) rt: Runtime,
}

impl std::fmt::Debug for Mqtt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mqtt").finish_non_exhaustive()
    }
}

pub(crate) static MQTTS: Registry<Mqtt> = Registry::new();

/// Reads an [`IotMqttConfig`] into the link's settings (the same type the
/// Rust API's `Config` holds) and the trust settings of HTTPS downloads.
///
/// # Safety
/// `config`'s strings are each NULL or a valid NUL-terminated string.
unsafe fn read_settings(config: &IotMqttConfig) -> Result<(LinkSettings, TlsOptions), c_int> {
    // SAFETY: the caller's contract on the strings.
    let (host, client_id, username, password, ca_file, download_ca_file) = unsafe {
        (
            c_str(config.host)?,
            c_str(config.client_id)?,
            opt_c_str(config.username)?,
            opt_c_str(config.password)?,
            opt_c_str(config.ca_file)?,
            opt_c_str(config.download_ca_file)?,
        )
    };
    if host.is_empty()
        || client_id.is_empty()
        || ca_file == Some("")
        || download_ca_file == Some("")
    {
        return Err(IOT_OTA_ERR_INVALID_PARAM);
    }
    let tls = config.use_tls != 0 || ca_file.is_some();
    let port = match config.port {
        0 if tls => 8883,
        0 => 1883,
        p => p,
    };
    let keep_alive = match config.keep_alive_s {
        0 => 60,
        s => s.max(5),
    };
    let broker = BrokerUrl {
        tls,
        host: host.to_owned(),
        port,
    };
    let mut settings = LinkSettings::for_broker(broker, client_id);
    settings.username = username.map(str::to_owned);
    settings.password = password.map(str::to_owned);
    settings.tls = TlsOptions {
        ca_file: ca_file.map(PathBuf::from),
        ..TlsOptions::default()
    };
    settings.keep_alive = Duration::from_secs(u64::from(keep_alive));
    let downloads = TlsOptions {
        ca_file: download_ca_file.or(ca_file).map(PathBuf::from),
        ..TlsOptions::default()
    };
    Ok((settings, downloads))
}

/// Keeps a reference to the calling thread's std `Thread` handle for the
/// life of the process.
///
/// Why: the runtime asks std for the current thread's handle, which std
/// allocates on first use and frees only when the thread exits through
/// Rust's thread-exit hooks. A C program's main thread never runs them, and
/// std's thread-local points into that allocation rather than at its start,
/// so at exit valgrind calls the block "possibly lost" (an error under
/// `--leak-check=full`). Holding a clone here keeps it plainly reachable: one
/// small block per thread that ever drove an MQTT instance.
fn anchor_current_thread() {
    static THREADS: Mutex<Vec<std::thread::Thread>> = Mutex::new(Vec::new());
    let me = std::thread::current();
    let mut threads = lock(&THREADS);
    if !threads.iter().any(|t| t.id() == me.id()) {
        threads.push(me);
    }
}

impl Mqtt {
    fn new(settings: LinkSettings, downloads: TlsOptions) -> Result<Mqtt, c_int> {
        anchor_current_thread();
        let rt = iot_ota_device::ffi_support::current_thread_runtime()
            .map_err(|_| crate::IOT_OTA_ERR_NOMEM)?;
        // With a CA file for downloads, build their TLS settings once, now,
        // so a bad file fails iot_mqtt_create; without one, the system roots
        // load on the first https:// download.
        let https = match &downloads.ca_file {
            Some(_) => Some(tls::client_config(&downloads).map_err(|e| {
                log::error!("TLS: {e}");
                IOT_OTA_ERR_INVALID_PARAM
            })?),
            None => None,
        };
        // Creating the client and event loop touches no socket yet, but
        // keep every tokio object inside its runtime's context.
        let _context = rt.enter();
        let (client, eventloop) = link_client(&settings).map_err(|e| {
            log::error!("MQTT: {e}");
            IOT_OTA_ERR_INVALID_PARAM
        })?;
        Ok(Mqtt {
            client,
            shared: Arc::new(Shared {
                state: Mutex::new(SharedState::default()),
                notify: Notify::new(),
            }),
            eventloop: Mutex::new(Some(eventloop)),
            driver: Mutex::new(None),
            https,
            settings,
            closed: AtomicBool::new(false),
            rt,
        })
    }

    /// Runs `future` on the instance's runtime (and so the MQTT task with it).
    ///
    /// Every call goes through one type-erased `block_on`: tokio's
    /// scheduler entry is generic over the future, about 3 KB of code per
    /// distinct future type, and the device binary has a size budget.
    pub(crate) fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        anchor_current_thread();
        iot_ota_device::ffi_support::block_on_erased(&self.rt, future)
    }

    /// The client that queues publishes and subscriptions.
    pub(crate) fn client(&self) -> &AsyncClient {
        &self.client
    }

    /// True once `iot_mqtt_destroy` was called.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// True while connected to the broker.
    pub(crate) fn is_connected(&self) -> bool {
        self.shared.state().connected
    }

    /// True once connected at least once.
    pub(crate) fn has_connected(&self) -> bool {
        self.shared.state().connects > 0
    }

    /// A weak reference to the shared state (for OTA event sinks: no cycle).
    pub(crate) fn shared_weak(&self) -> Weak<Shared> {
        Arc::downgrade(&self.shared)
    }

    /// Attaches an OTA engine; returns true when it must subscribe now
    /// (already connected; otherwise the next connection does it).
    pub(crate) fn attach(&self, session: Arc<Session>) -> bool {
        let mut st = self.shared.state();
        st.sessions.push((Arc::as_ptr(&session) as usize, session));
        st.connected
    }

    /// Detaches an OTA engine.
    pub(crate) fn detach(&self, session: &Arc<Session>) {
        let key = Arc::as_ptr(session) as usize;
        self.shared.state().sessions.retain(|(k, _)| *k != key);
    }

    /// Events seen by the OTA handles so far.
    fn ota_events(&self) -> u64 {
        self.shared.state().ota_events
    }

    /// Calls the callbacks of the queued messages; returns how many ran.
    /// Must be called with no lock of ours held and outside the runtime.
    pub(crate) fn deliver(&self) -> usize {
        let mut ran = 0;
        loop {
            let (delivery, callback) = {
                let mut st = self.shared.state();
                let Some(d) = st.deliveries.pop_front() else {
                    return ran;
                };
                let cb = st.callbacks[slot(d.sub_type)];
                (d, cb)
            };
            let Some(cb) = callback else { continue };
            let Ok(topic) = CString::new(delivery.topic) else {
                continue;
            };
            let len = delivery.payload.len();
            let mut payload = delivery.payload;
            payload.push(0);
            // SAFETY: the function was registered by the application for
            // this purpose; every pointer is valid for the call, as the
            // header promises, and `user_data` is handed back unchanged.
            unsafe {
                (cb.f)(
                    cb.user_data as *mut c_void,
                    delivery.sub_type,
                    topic.as_ptr(),
                    payload.as_ptr().cast(),
                    u32::try_from(len).unwrap_or(u32::MAX),
                )
            };
            ran += 1;
        }
    }

    fn connect(&self, timeout: Duration) -> c_int {
        if self.is_closed() {
            return IOT_OTA_ERR_INVALID_STATE;
        }
        if self.is_connected() {
            return IOT_OTA_ERR_NONE;
        }
        let failures_before = self.shared.state().failures;
        if let Some(eventloop) = lock(&self.eventloop).take() {
            let handler = FfiLink(self.shared.clone());
            let backoff = self.settings.backoff();
            let task = self
                .rt
                .spawn(async move { run_link(eventloop, backoff, &handler).await });
            *lock(&self.driver) = Some(task);
        }
        let shared = &self.shared;
        let result = self.block_on(async {
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                {
                    let st = shared.state();
                    if st.connected {
                        return IOT_OTA_ERR_NONE;
                    }
                    if st.failures > failures_before {
                        return IOT_OTA_ERR_MQTT_FAILED;
                    }
                }
                tokio::select! {
                    _ = shared.notify.notified() => {}
                    _ = tokio::time::sleep_until(deadline) => return IOT_OTA_ERR_TIMEOUT,
                }
            }
        });
        if result != IOT_OTA_ERR_NONE {
            if let Some(e) = &self.shared.state().last_error {
                log::error!("MQTT connect: {e}");
            }
        }
        self.deliver();
        result
    }

    fn yield_for(&self, timeout: Duration) -> c_int {
        if self.is_closed() || lock(&self.driver).is_none() {
            return IOT_OTA_ERR_INVALID_STATE;
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let events_before = self.ota_events();
        loop {
            let shared = &self.shared;
            self.block_on(async {
                // Let the event loop task run at least once, even for a 0 ms yield.
                tokio::task::yield_now().await;
                let pending = !shared.state().deliveries.is_empty();
                if !pending {
                    tokio::select! {
                        _ = shared.notify.notified() => {}
                        _ = tokio::time::sleep_until(deadline) => {}
                    }
                }
            });
            let ran = self.deliver();
            if ran > 0 || self.ota_events() != events_before {
                break;
            }
            if tokio::time::Instant::now() >= deadline || self.is_closed() {
                break;
            }
        }
        if self.is_connected() {
            IOT_OTA_ERR_NONE
        } else {
            IOT_OTA_ERR_MQTT_FAILED
        }
    }

    fn subscribe(&self, sub_type: c_int, callback: IotMqttCallback, user_data: *mut c_void) {
        self.shared.state().callbacks[slot(sub_type)] = callback.map(|f| Callback {
            f,
            user_data: user_data as usize,
        });
    }

    /// Disconnects (after what is queued has been sent) and stops the task.
    fn shutdown(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let task = lock(&self.driver).take();
        if let Some(mut task) = task {
            if self.is_connected() && self.client.try_disconnect().is_ok() {
                // The DISCONNECT is queued after every pending publish: when
                // the task sees it go out, the reports before it are sent.
                let _ = self.block_on(async {
                    tokio::time::timeout(Duration::from_secs(3), &mut task).await
                });
            }
            if !task.is_finished() {
                task.abort();
                let _ = self.block_on(task);
            }
        }
        let _context = self.rt.enter();
        drop(lock(&self.eventloop).take());
        let mut st = self.shared.state();
        st.connected = false;
        st.deliveries.clear();
        st.callbacks = [None, None];
    }
}

impl Drop for Mqtt {
    fn drop(&mut self) {
        // Tokio objects are dropped inside their runtime's context.
        let _context = self.rt.enter();
        if let Some(task) = lock(&self.driver).take() {
            task.abort();
        }
        drop(lock(&self.eventloop).take());
    }
}

/// `iot_mqtt_t *iot_mqtt_create(const iot_mqtt_config_t *config)`: a new,
/// unconnected MQTT instance. NULL when `config` is NULL or invalid (NULL or
/// empty host or client id, non-UTF-8 strings, an unusable CA file).
///
/// # Safety
/// `config` is NULL or points to an `iot_mqtt_config_t` whose strings are
/// each NULL or NUL-terminated. They are copied; the caller keeps them.
#[no_mangle]
pub unsafe extern "C" fn iot_mqtt_create(config: *const IotMqttConfig) -> *mut c_void {
    guard(std::ptr::null_mut(), || {
        if config.is_null() {
            return std::ptr::null_mut();
        }
        // SAFETY: non-NULL and pointing to a config, by the caller's contract.
        let config = unsafe { &*config };
        // SAFETY: the strings' contract is the caller's.
        let (settings, downloads) = match unsafe { read_settings(config) } {
            Ok(s) => s,
            Err(_) => return std::ptr::null_mut(),
        };
        match Mqtt::new(settings, downloads) {
            Ok(mqtt) => MQTTS.insert(Arc::new(mqtt)),
            Err(_) => std::ptr::null_mut(),
        }
    })
}

/// `int iot_mqtt_connect(iot_mqtt_t *mqtt, uint32_t timeout_ms)`: connects
/// and waits for the broker's CONNACK, at most `timeout_ms` (0: 10 s).
///
/// Returns 0; `IOT_OTA_ERR_MQTT_FAILED` when the attempt failed (refused,
/// unreachable), `IOT_OTA_ERR_TIMEOUT` when no answer came in time (later
/// yields keep trying, with backoff); `IOT_OTA_ERR_INVALID_PARAM` for a bad
/// handle; `IOT_OTA_ERR_INVALID_STATE` after destroy.
///
/// # Safety
/// Any pointer value is accepted; only live handles are used.
#[no_mangle]
pub unsafe extern "C" fn iot_mqtt_connect(mqtt: *mut c_void, timeout_ms: u32) -> c_int {
    guard(IOT_OTA_ERR_GENERAL, || {
        let Some(m) = MQTTS.get(mqtt) else {
            return IOT_OTA_ERR_INVALID_PARAM;
        };
        let ms = if timeout_ms == 0 { 10_000 } else { timeout_ms };
        m.connect(Duration::from_millis(u64::from(ms)))
    })
}

/// `int iot_mqtt_yield(iot_mqtt_t *mqtt, uint32_t timeout_ms)`: drives the
/// connection (receives, acknowledges, keeps alive, sends what is queued,
/// reconnects) for up to `timeout_ms`, calling the callbacks of what
/// arrived. Returns early once a callback ran or an OTA instance received an
/// upgrade or a firmware reply.
///
/// Returns 0 when connected at the end; `IOT_OTA_ERR_MQTT_FAILED` when the
/// connection is down (later yields reconnect); `IOT_OTA_ERR_INVALID_STATE`
/// before `iot_mqtt_connect`; `IOT_OTA_ERR_INVALID_PARAM` for a bad handle.
///
/// # Safety
/// Any pointer value is accepted; only live handles are used.
#[no_mangle]
pub unsafe extern "C" fn iot_mqtt_yield(mqtt: *mut c_void, timeout_ms: u32) -> c_int {
    guard(IOT_OTA_ERR_GENERAL, || {
        let Some(m) = MQTTS.get(mqtt) else {
            return IOT_OTA_ERR_INVALID_PARAM;
        };
        m.yield_for(Duration::from_millis(u64::from(timeout_ms)))
    })
}

/// `int iot_mqtt_subscribe(iot_mqtt_t *mqtt, iot_mqtt_sub_type_t type,
/// iot_mqtt_callback_t callback, void *user_data)`: routes the messages of
/// `type` to `callback` (NULL removes it). The broker subscriptions to a
/// device's OTA topics are made by `iot_ota_init` (again after every
/// reconnect); this says where their messages go besides the OTA engine.
///
/// Returns 0, or `IOT_OTA_ERR_INVALID_PARAM` for a bad handle or type.
///
/// # Safety
/// `callback` is NULL or a function of the declared type that may be called
/// from `iot_mqtt_connect`, `iot_mqtt_yield` and `iot_ota_fetch_yield` until
/// it is replaced or the instance is destroyed; `user_data` is only handed back.
#[no_mangle]
pub unsafe extern "C" fn iot_mqtt_subscribe(
    mqtt: *mut c_void,
    sub_type: c_int,
    callback: IotMqttCallback,
    user_data: *mut c_void,
) -> c_int {
    guard(IOT_OTA_ERR_GENERAL, || {
        let Some(m) = MQTTS.get(mqtt) else {
            return IOT_OTA_ERR_INVALID_PARAM;
        };
        if !matches!(
            sub_type,
            MQTT_SUB_TYPE_OTA_FIRMWARE_UPGRADE | MQTT_SUB_TYPE_OTA_FIRMWARE_GET_INF_REPLY
        ) {
            return IOT_OTA_ERR_INVALID_PARAM;
        }
        if m.is_closed() {
            return IOT_OTA_ERR_INVALID_STATE;
        }
        m.subscribe(sub_type, callback, user_data);
        IOT_OTA_ERR_NONE
    })
}

/// `int iot_mqtt_is_connected(iot_mqtt_t *mqtt)`: 1 when connected, 0 when
/// not, `IOT_OTA_ERR_INVALID_PARAM` for a bad handle.
///
/// # Safety
/// Any pointer value is accepted; only live handles are used.
#[no_mangle]
pub unsafe extern "C" fn iot_mqtt_is_connected(mqtt: *mut c_void) -> c_int {
    guard(IOT_OTA_ERR_GENERAL, || match MQTTS.get(mqtt) {
        Some(m) => c_int::from(m.is_connected()),
        None => IOT_OTA_ERR_INVALID_PARAM,
    })
}

/// `int iot_mqtt_destroy(iot_mqtt_t *mqtt)`: sends what is queued (reports
/// included), disconnects, and frees the instance. OTA instances made on it
/// should be destroyed first; any left fail their calls with
/// `IOT_OTA_ERR_MQTT_FAILED` until destroyed. Returns 0, or
/// `IOT_OTA_ERR_INVALID_PARAM` (harmless) for NULL or a stale handle.
///
/// # Safety
/// Any pointer value is accepted; only live handles are used.
#[no_mangle]
pub unsafe extern "C" fn iot_mqtt_destroy(mqtt: *mut c_void) -> c_int {
    guard(IOT_OTA_ERR_GENERAL, || {
        let Some(m) = MQTTS.remove(mqtt) else {
            return IOT_OTA_ERR_INVALID_PARAM;
        };
        m.shutdown();
        drop(m);
        IOT_OTA_ERR_NONE
    })
}

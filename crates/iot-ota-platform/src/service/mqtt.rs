//! The devices' side: messages in, commands out, the batches' timers.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use iot_ota_core::protocol::{
    encode_get_not_found, encode_get_reply, encode_upgrade, parse_progress, parse_upgrade_reply,
    parse_version_message, TopicKind,
};
use iot_ota_core::{Firmware, Topics};
use rumqttc::{Event, EventLoop, Packet, QoS, SubscribeFilter};

use super::{now_ms, Inner, Outgoing, Shared, SAVE_RETRY_MS};
use crate::batch::{Action, Batch, Millis};
use crate::store::{DeviceWrite, Store};

impl Shared {
    // ---- MQTT input

    /// Handles one message from a device; returns what to publish in answer.
    #[cfg(test)]
    pub(crate) fn on_message(&self, topic: &str, payload: &[u8], now: Millis) -> Vec<Outgoing> {
        self.on_messages([(topic, payload)], now)
    }

    /// Handles the messages that arrived together, under one lock and in
    /// one transaction (group commit: at 10,000 devices the platform gets
    /// thousands of reports a second, and one commit each was its limit);
    /// returns what to publish in answer, once that is committed.
    pub(crate) fn on_messages<'a>(
        &self,
        messages: impl IntoIterator<Item = (&'a str, &'a [u8])>,
        now: Millis,
    ) -> Vec<Outgoing> {
        let mut inner = self.lock();
        let mut group = Group::default();
        for (topic, payload) in messages {
            let Some((product, device, kind)) = Topics::parse(&self.prefix, topic) else {
                continue;
            };
            let result = match kind {
                TopicKind::Inform => {
                    self.on_inform(&mut inner, &mut group, product, device, payload, now)
                }
                TopicKind::Progress => {
                    self.on_progress(&mut inner, &mut group, product, device, payload, now)
                }
                TopicKind::UpgradeReply => {
                    self.on_reply(&mut inner, &mut group, product, device, payload, now)
                }
                TopicKind::Get => self.on_get(&inner, &mut group, product, device, payload),
                TopicKind::Upgrade | TopicKind::GetReply => Ok(()),
            };
            if let Err(e) = result {
                log::warn!("{topic}: {e}");
            }
        }
        self.commit_group(&mut inner, &mut group, now);
        drop(inner);
        self.changed();
        group.out
    }

    /// Writes what a group of messages changed in one transaction and
    /// retires the batches they finished. A failed write keeps the changes
    /// in memory with their rows still marked changed: the ticker's next
    /// save writes them (within a second), and anything acted on later is
    /// decided by a tick whose save commits these rows first.
    fn commit_group(&self, inner: &mut Inner, group: &mut Group, now: Millis) {
        let Inner {
            store,
            running,
            unsaved_devices,
        } = inner;
        let mut batches: Vec<&mut Batch> = running
            .values_mut()
            .filter(|b| group.touched.contains(&b.id))
            .collect();
        // Rows a failed commit left behind go first; the newer ones after.
        let mut devices = std::mem::take(unsaved_devices);
        devices.append(&mut group.devices);
        if let Err(e) = store.save_group(&mut batches, &devices, now) {
            log::error!("saving {} device messages: {e}", devices.len());
            *unsaved_devices = merge_device_writes(devices);
            return;
        }
        let done: Vec<i64> = batches
            .iter()
            .filter(|b| !b.is_running())
            .map(|b| b.id)
            .collect();
        for id in done {
            running.remove(&id);
        }
    }

    fn on_inform(
        &self,
        inner: &mut Inner,
        group: &mut Group,
        product: &str,
        device: &str,
        payload: &[u8],
        now: Millis,
    ) -> Result<(), String> {
        let (_, version) = parse_version_message(payload).map_err(|r| r.message)?;
        log::info!("{product}/{device}: runs {version}");
        for_batches(inner, group, product, |b| {
            b.handle_inform(device, &version, now)
        });
        group
            .devices
            .push(DeviceWrite::informed(product, device, version));
        Ok(())
    }

    fn on_progress(
        &self,
        inner: &mut Inner,
        group: &mut Group,
        product: &str,
        device: &str,
        payload: &[u8],
        now: Millis,
    ) -> Result<(), String> {
        let (_, p) = parse_progress(payload).map_err(|r| r.message)?;
        log::info!("{product}/{device}: {p}");
        group.devices.push(DeviceWrite::seen(product, device));
        for_batches(inner, group, product, |b| {
            b.handle_progress(device, &p, now)
        });
        Ok(())
    }

    fn on_reply(
        &self,
        inner: &mut Inner,
        group: &mut Group,
        product: &str,
        device: &str,
        payload: &[u8],
        now: Millis,
    ) -> Result<(), String> {
        let r = parse_upgrade_reply(payload).map_err(|r| r.message)?;
        log::info!(
            "{product}/{device}: reply {} to {}: {}",
            r.code,
            r.msg_id,
            r.message
        );
        group.devices.push(DeviceWrite::seen(product, device));
        for_batches(inner, group, product, |b| {
            b.handle_reply(device, &r.msg_id, r.code, &r.message, now)
        });
        Ok(())
    }

    fn on_get(
        &self,
        inner: &Inner,
        group: &mut Group,
        product: &str,
        device: &str,
        payload: &[u8],
    ) -> Result<(), String> {
        let (msg_id, version) = parse_version_message(payload).map_err(|r| r.message)?;
        let store = &inner.store;
        group.devices.push(DeviceWrite::seen(product, device));
        let topic = self.topics(product, device).get_reply;
        let payload = match store
            .firmware(product, &version)
            .map_err(|e| e.to_string())?
        {
            Some(fw) => encode_get_reply(
                &msg_id,
                &Firmware {
                    version: fw.version.clone(),
                    url: fw.info(&self.public_url).url,
                    size: Some(fw.size),
                    sign: fw.md5.clone(),
                    sign_method: iot_ota_core::SignMethod::Md5,
                    policy: None,
                    signed: fw.signed_manifest(),
                    delta: fw.delta(&self.public_url),
                },
            ),
            None => encode_get_not_found(&msg_id, &version),
        };
        group.out.push((topic, payload));
        Ok(())
    }

    // ---- timers

    /// Polls every running batch at `now`; returns the commands to publish and
    /// when to poll next.
    pub(crate) fn tick(&self, now: Millis) -> (Vec<Outgoing>, Option<Millis>) {
        let mut inner = self.lock();
        let Inner { store, running, .. } = &mut *inner;
        let mut out = Vec::new();
        let mut done = Vec::new();
        let mut next: Option<Millis> = None;
        let mut changed = false;
        for b in running.values_mut() {
            let unsaved = b.unsaved();
            changed |= b.next_wakeup().is_some_and(|w| w <= now);
            let actions = b.poll(now);
            // Fsynced when it pushes: a push is acted on only once it is durable.
            let saved = if actions.is_empty() {
                store.save(b)
            } else {
                store.save_durable(b)
            };
            if let Err(e) = saved {
                // Not committed: do not act on it. Undo the poll: go back to
                // what is committed plus what was changed and not saved
                // before the poll, and try again shortly (the next tick
                // decides again). If even that cannot be read, the records
                // marked pushed fail their ack timeout and are retried.
                log::error!("saving batch {}: {e}", b.id);
                if let Err(e) = super::undo(store, b, unsaved) {
                    log::error!("reloading batch {}: {e}", b.id);
                }
                let retry = now.saturating_add(SAVE_RETRY_MS);
                next = Some(next.map_or(retry, |n| n.min(retry)));
                continue;
            }
            for Action::Push { device, msg_id, .. } in actions {
                match self.command(store, b, &device, &msg_id) {
                    Ok(cmd) => {
                        log::info!(
                            "batch {}: push {msg_id} to {}/{device}: {}",
                            b.id,
                            b.product,
                            b.firmware_version
                        );
                        out.push(cmd)
                    }
                    Err(e) => log::error!("batch {}: {e}", b.id),
                }
            }
            if !b.is_running() {
                done.push(b.id);
            }
            if let Some(w) = b.next_wakeup() {
                next = Some(next.map_or(w, |n| n.min(w)));
            }
        }
        for id in done {
            running.remove(&id);
        }
        drop(inner);
        if !out.is_empty() || changed {
            self.changed();
        }
        (out, next)
    }

    fn command(
        &self,
        store: &Store,
        b: &Batch,
        device: &str,
        msg_id: &str,
    ) -> Result<Outgoing, String> {
        let fw = store
            .firmware(&b.product, &b.firmware_version)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("firmware {} {} is gone", b.product, b.firmware_version))?;
        let sign = match b.config.sign_method {
            iot_ota_core::SignMethod::Md5 => fw.md5.clone(),
            iot_ota_core::SignMethod::Sha256 => fw.sha256.clone(),
        };
        let firmware = Firmware {
            version: fw.version.clone(),
            url: fw.info(&self.public_url).url,
            size: Some(fw.size),
            sign,
            sign_method: b.config.sign_method,
            policy: Some(b.config.policy),
            signed: fw.signed_manifest(),
            delta: fw.delta(&self.public_url),
        };
        Ok((
            self.topics(&b.product, device).upgrade,
            encode_upgrade(msg_id, &firmware),
        ))
    }
}

/// Drives the MQTT connection: re-subscribes on every ConnAck, and hands
/// the messages to [`handle_messages`] through a queue, so that reading
/// the socket never waits for the database.
pub(crate) async fn mqtt_loop(
    shared: Arc<Shared>,
    mut eventloop: EventLoop,
    tx: tokio::sync::mpsc::UnboundedSender<rumqttc::Publish>,
) {
    let filters: Vec<SubscribeFilter> = ["upgrade_reply", "inform", "progress", "get"]
        .iter()
        .map(|k| {
            SubscribeFilter::new(
                format!(
                    "{}/+/+/ota/firmware/{k}",
                    shared.prefix.trim_end_matches('/')
                ),
                QoS::AtLeastOnce,
            )
        })
        .collect();
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                // A broker that lost our session (restarted) forgot the subscriptions.
                if let Err(e) = shared.mqtt.try_subscribe_many(filters.clone()) {
                    log::error!("subscribe: {e}");
                }
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                shared.mqtt_up.store(true, Ordering::SeqCst);
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let depth = shared.queued.fetch_add(1, Ordering::Relaxed) + 1;
                shared.peak_queued.fetch_max(depth, Ordering::Relaxed);
                if tx.send(p).is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                if shared.mqtt_up.swap(false, Ordering::SeqCst)
                    && !shared.stopping.load(Ordering::SeqCst)
                {
                    log::warn!("MQTT connection lost: {e}; reconnecting");
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    }
}

/// Messages handled in one group at most.
const GROUP: usize = 512;

/// Takes the queued messages in groups (whatever has arrived, up to
/// [`GROUP`]) and handles each group in one transaction, off the runtime's
/// event threads. Ends once the MQTT loop is gone and the queue is empty
/// (the platform's shutdown waits for that: those messages were
/// acknowledged to the broker already).
pub(crate) async fn handle_messages(
    shared: Arc<Shared>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<rumqttc::Publish>,
) {
    let mut group = Vec::with_capacity(GROUP);
    while rx.recv_many(&mut group, GROUP).await > 0 {
        let messages = std::mem::take(&mut group);
        let n = messages.len() as u64;
        let s = shared.clone();
        let (out, messages) = tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let out = s.on_messages(
                messages.iter().map(|p| (p.topic.as_str(), &p.payload[..])),
                now_ms(),
            );
            s.busy_us
                .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
            (out, messages)
        })
        .await
        .unwrap_or_default();
        shared.messages.fetch_add(n, Ordering::Relaxed);
        shared.queued.fetch_sub(n, Ordering::Relaxed);
        // Acknowledged only now that they are handled (manual acks): a
        // crash before this leaves them unacknowledged, and the broker
        // delivers them again to the persistent session.
        for p in &messages {
            if let Err(e) = shared.mqtt.ack(p).await {
                log::warn!("acknowledging a device message: {e}");
            }
        }
        for (topic, payload) in out {
            // try_publish: awaiting here could block the loop that drains the queue.
            if let Err(e) = shared
                .mqtt
                .try_publish(topic, QoS::AtLeastOnce, false, payload)
            {
                log::warn!("reply: {e}");
            }
        }
    }
}

/// Runs the batches' timers: wakes at the earliest deadline (at most every second)
/// or when a batch is created.
pub(crate) async fn ticker(shared: Arc<Shared>) {
    loop {
        let now = now_ms();
        let (out, next) = shared.tick(now);
        shared.publish(out).await;
        let wait = next
            .map(|n| (n - now_ms()).clamp(0, 1000))
            .unwrap_or(1000)
            .max(5) as u64;
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
            _ = shared.wake.notified() => {}
        }
    }
}

/// Device rows kept across failed commits at most.
const UNSAVED_DEVICES_MAX: usize = 100_000;

/// One row per device, for the next commit: the newest informed version
/// (a later "seen" does not hide it), in first-seen order, bounded (so a
/// broken disk cannot grow it).
fn merge_device_writes(devices: Vec<DeviceWrite>) -> Vec<DeviceWrite> {
    let mut index: std::collections::HashMap<(String, String), usize> = Default::default();
    let mut out: Vec<DeviceWrite> = Vec::new();
    for d in devices {
        let key = (d.product.clone(), d.device.clone());
        match index.get(&key) {
            Some(&i) if d.version.is_some() => out[i].version = d.version,
            Some(_) => {}
            None if out.len() < UNSAVED_DEVICES_MAX => {
                index.insert(key, out.len());
                out.push(d);
            }
            None => {}
        }
    }
    out
}

/// What a group of device messages changed, written together.
#[derive(Default)]
struct Group {
    /// Ids of the batches fed.
    touched: std::collections::BTreeSet<i64>,
    /// Device rows to write.
    devices: Vec<DeviceWrite>,
    /// Replies to publish once committed.
    out: Vec<Outgoing>,
}

/// Feeds every running batch of `product`; the group remembers which.
fn for_batches(
    inner: &mut Inner,
    group: &mut Group,
    product: &str,
    mut f: impl FnMut(&mut Batch) -> bool,
) {
    for b in inner.running.values_mut().filter(|b| b.product == product) {
        if f(b) {
            group.touched.insert(b.id);
        }
    }
}

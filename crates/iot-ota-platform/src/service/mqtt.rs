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
use crate::engine::{Action, Batch, Millis};
use crate::store::{Store, StoreError};

impl Shared {
    // ---- MQTT input

    /// Handles one message from a device; returns what to publish in answer.
    pub(crate) fn on_message(&self, topic: &str, payload: &[u8], now: Millis) -> Vec<Outgoing> {
        let Some((product, device, kind)) = Topics::parse(&self.prefix, topic) else {
            return Vec::new();
        };
        let mut inner = self.lock();
        let result = match kind {
            TopicKind::Inform => self.on_inform(&mut inner, product, device, payload, now),
            TopicKind::Progress => self.on_progress(&mut inner, product, device, payload, now),
            TopicKind::UpgradeReply => self.on_reply(&mut inner, product, device, payload, now),
            TopicKind::Get => self.on_get(&inner, product, device, payload, now),
            TopicKind::Upgrade | TopicKind::GetReply => Ok(Vec::new()),
        };
        match result {
            Ok(out) => out,
            Err(e) => {
                log::warn!("{topic}: {e}");
                Vec::new()
            }
        }
    }

    fn on_inform(
        &self,
        inner: &mut Inner,
        product: &str,
        device: &str,
        payload: &[u8],
        now: Millis,
    ) -> Result<Vec<Outgoing>, String> {
        let (_, version) = parse_version_message(payload).map_err(|r| r.message)?;
        log::info!("{product}/{device}: runs {version}");
        bookkeeping(
            product,
            device,
            inner.store.device_informed(product, device, &version, now),
        );
        self.for_batches(inner, product, |b| b.handle_inform(device, &version, now))?;
        Ok(Vec::new())
    }

    fn on_progress(
        &self,
        inner: &mut Inner,
        product: &str,
        device: &str,
        payload: &[u8],
        now: Millis,
    ) -> Result<Vec<Outgoing>, String> {
        let (_, p) = parse_progress(payload).map_err(|r| r.message)?;
        log::info!("{product}/{device}: {p}");
        bookkeeping(
            product,
            device,
            inner.store.device_seen(product, device, now),
        );
        self.for_batches(inner, product, |b| b.handle_progress(device, &p, now))?;
        Ok(Vec::new())
    }

    fn on_reply(
        &self,
        inner: &mut Inner,
        product: &str,
        device: &str,
        payload: &[u8],
        now: Millis,
    ) -> Result<Vec<Outgoing>, String> {
        let r = parse_upgrade_reply(payload).map_err(|r| r.message)?;
        log::info!(
            "{product}/{device}: reply {} to {}: {}",
            r.code,
            r.msg_id,
            r.message
        );
        bookkeeping(
            product,
            device,
            inner.store.device_seen(product, device, now),
        );
        self.for_batches(inner, product, |b| {
            b.handle_reply(device, &r.msg_id, r.code, &r.message, now)
        })?;
        Ok(Vec::new())
    }

    fn on_get(
        &self,
        inner: &Inner,
        product: &str,
        device: &str,
        payload: &[u8],
        now: Millis,
    ) -> Result<Vec<Outgoing>, String> {
        let (msg_id, version) = parse_version_message(payload).map_err(|r| r.message)?;
        let store = &inner.store;
        store
            .device_seen(product, device, now)
            .map_err(|e| e.to_string())?;
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
                },
            ),
            None => encode_get_not_found(&msg_id, &version),
        };
        Ok(vec![(topic, payload)])
    }

    /// Feeds every running batch of `product`, saves what changed, retires finished batches.
    ///
    /// A batch whose save fails keeps the change in memory with its rows still
    /// marked changed ([`Store::save`]), and stays running: the ticker's next
    /// save writes them (within a second), and anything acted on later is
    /// decided by a tick whose save commits these rows first.
    fn for_batches(
        &self,
        inner: &mut Inner,
        product: &str,
        mut f: impl FnMut(&mut Batch) -> bool,
    ) -> Result<(), String> {
        let Inner { store, running } = inner;
        let mut done = Vec::new();
        let mut errors = Vec::new();
        for b in running.values_mut().filter(|b| b.product == product) {
            if f(b) {
                if let Err(e) = store.save(b) {
                    errors.push(format!("saving batch {}: {e}", b.id));
                    continue;
                }
                if !b.is_running() {
                    done.push(b.id);
                }
            }
        }
        for id in done {
            running.remove(&id);
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    // ---- timers

    /// Polls every running batch at `now`; returns the commands to publish and
    /// when to poll next.
    pub(crate) fn tick(&self, now: Millis) -> (Vec<Outgoing>, Option<Millis>) {
        let mut inner = self.lock();
        let Inner { store, running } = &mut *inner;
        let mut out = Vec::new();
        let mut done = Vec::new();
        let mut next: Option<Millis> = None;
        for b in running.values_mut() {
            // A poll that is due may decide pushes: keep the batch as it was, so
            // that a failed save can undo the poll and the next tick decides again.
            let before = b.next_wakeup().is_some_and(|w| w <= now).then(|| b.clone());
            let actions = b.poll(now);
            if let Err(e) = store.save(b) {
                // Not committed: do not act on it. Undo the poll (a poll that was
                // not due decided nothing, and `save` kept its rows marked
                // changed), and try again shortly.
                log::error!("saving batch {}: {e}", b.id);
                if let Some(before) = before {
                    *b = before;
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
        };
        Ok((
            self.topics(&b.product, device).upgrade,
            encode_upgrade(msg_id, &firmware),
        ))
    }
}

/// Drives the MQTT connection: re-subscribes on every ConnAck, feeds messages in.
pub(crate) async fn mqtt_loop(shared: Arc<Shared>, mut eventloop: EventLoop) {
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
                // Clean session: the broker forgot our subscriptions.
                if let Err(e) = shared.mqtt.try_subscribe_many(filters.clone()) {
                    log::error!("subscribe: {e}");
                }
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                shared.mqtt_up.store(true, Ordering::SeqCst);
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let out = shared.on_message(&p.topic, &p.payload, now_ms());
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

/// The device row is bookkeeping: failing to write it is logged, and must
/// not drop the message for the batches.
fn bookkeeping(product: &str, device: &str, written: Result<(), StoreError>) {
    if let Err(e) = written {
        log::warn!("{product}/{device}: {e}");
    }
}

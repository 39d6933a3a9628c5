//! Sans-IO core of the IoT OTA device SDK.
//!
//! This crate holds everything about an over-the-air upgrade that is not IO:
//! the wire protocol ([`protocol`]), command validation, the reply each command
//! gets, the upgrade bookkeeping ([`Ota`]), and one download's byte counting,
//! digest, length checks and progress throttling ([`Fetch`]). It opens no
//! socket, reads no clock and starts no thread: every call that needs the
//! time takes `now`, and everything to be done comes out as an [`Output`].
//! The device SDK (`iot-ota-device`) drives it over MQTT and HTTP(S); its
//! async API and the blocking C API share this one core.
//!
//! # The drive contract
//!
//! [`Ota`] has four kinds of methods, after quinn-proto's `Connection`:
//! - getters ([`Ota::version`], [`Ota::job`], ...);
//! - `handle_*` for events from outside: the MQTT session came up
//!   ([`Ota::handle_connected`]) or went down ([`Ota::handle_disconnected`]), a message arrived ([`Ota::handle_publish`]),
//!   time passed ([`Ota::handle_timeout`]);
//! - mutators for the application's commands ([`Ota::report_version`],
//!   [`Ota::report_progress`], [`Ota::request_firmware_info`], ...);
//! - `poll_*` for what the driver must do: **after every `handle_*` call or
//!   mutator, drain [`Ota::poll_output`] until it returns `None`**, then sleep
//!   until [`Ota::poll_timeout`] (or the next message).
//!
//! The upgrade around the download (journal, acknowledge, install, reboot,
//! confirm, commit or roll back) is [`flow::Flow`], driven the same way:
//! answers in, [`flow::Action`]s out, one device-side driver for the agent,
//! the Rust API and the C API.
//!
//! A [`Fetch`] tracks one download: feed it every received slice with
//! [`Fetch::handle_data`], tell it the body ended with [`Fetch::handle_end`],
//! and publish each [`Progress`] it returns with [`Ota::publish_progress`].
//!
//! ```
//! use std::time::Instant;
//! use iot_ota_core::{Config, Event, Fetch, Ota, Output, Status};
//! use iot_ota_core::digest::{digest_hex, SignMethod};
//!
//! let image = b"new firmware image".to_vec();
//! let mut ota = Ota::new(Config::new("pk", "dev1"), "1.0.0")?;
//! let mut wire = Vec::new(); // what a driver would publish
//! let mut drain = |ota: &mut Ota, wire: &mut Vec<(String, String)>| {
//!     let mut events = Vec::new();
//!     while let Some(out) = ota.poll_output() {
//!         match out {
//!             Output::Subscribe { .. } => {} // client.subscribe(topic, QoS 1)
//!             Output::Publish { topic, payload } => {
//!                 wire.push((topic, String::from_utf8(payload).unwrap()))
//!             }
//!             Output::Event(e) => events.push(e),
//!         }
//!     }
//!     events
//! };
//!
//! // Connected: subscribe, and report the running version (again after
//! // every reconnect: the session is clean, the platform may have missed it).
//! ota.handle_connected();
//! drain(&mut ota, &mut wire);
//!
//! // The platform pushes an upgrade command.
//! let command = format!(
//!     r#"{{"msgId":"123","version":"1.0","data":{{"policy":"standard","size":{},
//!        "firmwareVersion":"2.0.0","url":"http://127.0.0.1/fw.bin",
//!        "sign":"{}","signMethod":"Md5"}}}}"#,
//!     image.len(),
//!     digest_hex(SignMethod::Md5, &image)
//! );
//! let now = Instant::now();
//! ota.handle_publish("/sys/pk/dev1/ota/firmware/upgrade", command.as_bytes(), now);
//! let events = drain(&mut ota, &mut wire);
//! let Event::Upgrade(cmd) = &events[0] else { panic!("expected an upgrade") };
//! assert!(wire.last().unwrap().1.contains(r#""code":200"#));
//!
//! // Download it (here from memory), reporting as the fetch says.
//! let mut fetch = Fetch::new(cmd.firmware.clone(), ota.config().throttle);
//! ota.publish_progress(&fetch.begin(now))?;
//! fetch.handle_response(0, Some(image.len() as u64))?;
//! for chunk in image.chunks(4) {
//!     if let Some(report) = fetch.handle_data(chunk, now)? {
//!         ota.publish_progress(&report)?;
//!     }
//! }
//! ota.publish_progress(&fetch.handle_end()?)?; // DOWNLOADED, verified
//!
//! // Install, then report success and the new version.
//! ota.report_progress(Status::Upgrading, 100, "")?;
//! ota.report_progress(Status::Success, 100, "")?;
//! ota.report_version("2.0.0")?;
//! drain(&mut ota, &mut wire);
//! assert!(wire.last().unwrap().0.ends_with("/inform"));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # The upgrade, as states
//!
//! ```text
//!                       upgrade command
//!                 ┌──── invalid ─────────► reply 400/412 + UPGRADE_FAILED(-1)
//!                 │
//!   ┌──────┐  connect   ┌──────┐  valid command: reply 200    ┌──────────┐
//!   │uninit│──────────► │ init │ ───────────────────────────► │ fetching │◄─┐ 2nd command:
//!   └──────┘ subscribe, └──────┘  or accepted get reply       └──────────┘──┘ reply 409
//!            inform v      ▲         DOWNLOADING 0%, then          │
//!                          │         every ≥5 points and ≥1 s,     │ last byte / error
//!                          │         and 100%                      ▼
//!                          │                                  ┌─────────┐
//!                          │   new command: fresh counters    │ fetched │
//!                          │   and digest ◄────────────────── └─────────┘
//!                          │                                   │       │
//!                          │             size+digest ok:       │       │ short, long, transport
//!                          │             DOWNLOADED(2) 100     │       │ error: DOWNLOAD_FAILED(-2)
//!                          │                                   ▼       │ digest: VERIFY_FAILED(-3)
//!                          │                 UPGRADING(3) .. SUCCESS(4)│
//!                          │                 or FLASH_FAILED(-4)       │
//!                          └──── inform new version ◄──────────────────┘
//! ```
//!
//! The job (the upgrade the engine is busy with) lasts from the accepting
//! reply to the first terminal report (SUCCESS or a negative status); while
//! it lasts every new command gets 409 and the running download goes on.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod backoff;
mod broker_url;
pub mod delta;
pub mod digest;
mod error;
mod fetch;
pub mod flow;
pub mod journal;
pub mod manifest;
mod ota;
mod pace;
pub mod protocol;

pub use backoff::Backoff;
pub use broker_url::BrokerUrl;
pub use digest::{Hasher, SignMethod};
pub use error::{Error, FetchError};
pub use fetch::{percent_of, Fetch, FetchState, ProgressMeter, Throttle, Verified};
pub use ota::{compare_versions, Config, Event, Ota, Output};
pub use pace::{Pace, PaceRules};
pub use protocol::{
    DeltaRef, Firmware, GetError, GetReply, Limits, Policy, Progress, Rejection, ReplyCode, Status,
    Topics, UpgradeCommand,
};

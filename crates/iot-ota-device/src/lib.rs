//! Device-side OTA SDK: MQTT, HTTP(S) download, verification and reports.
//!
//! The platform pushes an upgrade command over MQTT; this crate validates and
//! acknowledges it, downloads the firmware over HTTP or HTTPS while reporting
//! progress, checks its size and digest, and lets the application install it
//! and report the outcome and its new version. The protocol and every
//! decision live in the sans-IO core [`iot_ota_core`]; this crate holds the
//! drivers around it (see `docs/design.md`):
//!
//! - [`OtaClient`]: the async API. It connects (rumqttc, TCP or TLS with
//!   rustls + ring), subscribes, reports the running version, keeps the
//!   connection up (re-subscribing and re-informing after every reconnect)
//!   and hands out accepted commands as a stream ([`Upgrades`]).
//! - [`Download`]: one firmware download, reported automatically: pull it
//!   with [`Download::fetch_yield`] into your buffer, or let
//!   [`Download::download_to`] write it to a file, verified, atomically, with
//!   receiving, hashing and writing overlapped on separate threads.
//! - [`Session`]: the engine and the MQTT client together, for drivers that
//!   poll the MQTT event loop themselves (the C API does).
//! - [`lifecycle::Lifecycle`]: the upgrade across reboots (PROTOCOL.md,
//!   "Install, reboot, confirm"): an upgrade journal in a state directory,
//!   the install through an [`install::Installer`] (slot directories with a
//!   simulated bootloader, command hooks, RAUC, or the application itself),
//!   and the decision at every start: commit a healthy new image (SUCCESS
//!   only then), roll back an unhealthy one, resume what a crash cut off.
//!   It is the one driver of the core's upgrade flow
//!   ([`iot_ota_core::flow`]) for the agent, this API and the C API.
//! - [`ffi_support`]: what only the C API builds on (the shared MQTT link,
//!   the read-ahead, the application as installer, its runtime).
//!
//! # Example
//!
//! A device that installs every upgrade it is sent (this is the heart of
//! `examples/ota_example.rs`):
//!
//! ```no_run
//! use iot_ota_device::{Config, OtaClient, Status};
//!
//! # async fn device() -> Result<(), iot_ota_device::Error> {
//! let config = Config::new("mqtt://127.0.0.1:1883", "pk", "dev1", "1.0.0")?
//!     .ca_file("/etc/ota/ca.pem"); // for mqtts:// brokers and https:// firmware
//! let (client, mut upgrades) = OtaClient::connect(config).await?;
//! while let Some(command) = upgrades.next().await {
//!     let version = command.firmware.version.clone();
//!     let path = format!("/data/firmware-{version}.bin");
//!     // DOWNLOADING 0%..100%, then DOWNLOADED, or DOWNLOAD_FAILED / VERIFY_FAILED:
//!     // all reported by the SDK. The file appears only once verified.
//!     if client.download(&command).download_to(&path).await.is_err() {
//!         continue; // already reported; wait for the next command
//!     }
//!     client.report_progress(Status::Upgrading, 50, "")?;
//!     // ... install `path` ...
//!     client.report_progress(Status::Success, 100, "")?;
//!     client.report_version(&version)?; // the platform judges success by this
//! }
//! # Ok(()) }
//! ```
//!
//! Or pull the bytes yourself, as the C API's `iot_ota_fetch_yield` does:
//!
//! ```no_run
//! # use std::time::Duration;
//! # use iot_ota_device::{Error, OtaClient, UpgradeCommand};
//! # async fn pull(client: &OtaClient, command: &UpgradeCommand) -> Result<(), Error> {
//! let mut download = client.download(command);
//! let mut buf = vec![0u8; 5000];
//! loop {
//!     match download.fetch_yield(&mut buf, Duration::from_secs(1)).await {
//!         Ok(0) => break,                  // complete and verified
//!         Ok(n) => { /* write buf[..n] */ let _ = n; }
//!         Err(Error::Timeout) => continue, // nothing within 1 s; still downloading
//!         Err(e) => return Err(e),         // failed, and reported
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! # The upgrade, as states
//!
//! See the diagram in [`iot_ota_core`]'s docs: `init` → `fetching` (on an
//! accepted command) → `fetched` (on the last byte or an error), with 409 for
//! every command while an upgrade runs, and fresh counters for the next one.
//! Across reboots ([`lifecycle`]):
//!
//! ```text
//!  downloading ─► downloaded ─► installing ─► installed ──reboot──► booted
//!                                                    health good ──► committed: SUCCESS, inform new
//!       bad health / bootloader fell back / too many boots ──► rolled back: UPGRADE_FAILED, inform old
//! ```
//!
//! # Errors
//!
//! [`Error`] is the crate's error. The [`http`] and [`tls`] modules have
//! their own detailed error types, which reach callers inside it:
//! a TLS setup error as [`Error::Tls`], an HTTP failure as the
//! [`FetchError::Transport`] inside [`Error::Fetch`]. What was *reported* to
//! the platform for a failed download is [`Error::status`].
// One `unsafe` call in the crate: statvfs(3) in `fsutil::free_space`.
#![deny(unsafe_code)]
#![deny(missing_docs)]

mod client;
mod config;
mod download;
mod error;
pub mod ffi_support;
pub mod fsutil;
pub mod http;
pub mod install;
pub mod journal_file;
pub mod lifecycle;
mod link;
pub mod session;
pub mod tls;

pub use client::{OtaClient, Upgrades};
pub use config::Config;
pub use download::{Download, DownloadOptions};
pub use error::Error;
pub use iot_ota_core::{
    BrokerUrl, Fetch, FetchError, FetchState, Firmware, Policy, Progress, SignMethod, Status,
    UpgradeCommand, Verified,
};
pub use link::LinkSettings;
pub use session::Session;

//! Test harness for the OTA SDK: real parts on loopback.
//!
//! Integration tests of the device SDK, the C API and the platform use this
//! crate to stand up the real things the SDK talks to, each on `127.0.0.1`
//! and a free port, each stopping itself when dropped:
//!
//! - [`Mosquitto`]: the real Mosquitto broker (plain, TLS, with a password);
//! - [`FileServer`]: an HTTP/1.1 (and HTTPS) firmware server with Range
//!   support and injectable faults ([`Route`]);
//! - [`WireRecorder`]: an MQTT client that records what goes over the wire
//!   and publishes commands, usable from sync and async tests alike;
//! - [`Rig`]: all of these for a device test, the recorder playing the platform;
//! - [`TestKey`]: a throwaway manifest signing key (signed commands);
//! - [`TestCa`]: a throwaway CA with a `localhost` server certificate and
//!   client certificates for mutual TLS;
//! - [`TempDir`], [`free_port`], [`random_bytes`], [`wait_child`],
//!   [`upgrade_command`]: small helpers.
//!
//! Blocking waits (`wait_for`, `publish`, ...) suit sync tests; their
//! `*_async` twins suit async tests, where blocking would stall the runtime
//! that also drives the device under test (they need a tokio runtime with
//! time enabled, as `#[tokio::test]` gives). Every handle can be dropped
//! from either kind of test: its thread and runtime are its own.
//!
//! Nothing here reaches beyond loopback, and the only processes it ever
//! kills are the ones it spawned, by their handle.
//!
//! ```no_run
//! use std::time::Duration;
//! use iot_ota_testkit::{random_bytes, FileServer, Mosquitto, Route, WireRecorder};
//!
//! let broker = Mosquitto::start();
//! let wire = WireRecorder::connect(&broker.url(), "/sys/#");
//! let files = FileServer::start();
//! let url = files.add("/fw.bin", Route::file(random_bytes(1 << 20, 7)));
//! wire.publish("/sys/pk/dev/ota/firmware/upgrade", format!(r#"{{"url":"{url}"}}"#), true)
//!     .unwrap();
//! let seen = wire.wait_for(|m| m.topic.ends_with("/upgrade"), Duration::from_secs(5));
//! assert!(seen.is_some());
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod acceptance;
mod ca;
mod child;
mod http;
mod mosquitto;
mod recorder;
mod rig;
mod signal;
mod signing;
mod tempdir;
mod util;
mod webdriver;

pub use ca::{ClientCert, TestCa};
pub use child::{wait_child, ChildExit};
pub use http::{FileServer, RequestLog, Route};
pub use mosquitto::{Mosquitto, MosquittoOptions};
pub use recorder::{RecorderOptions, WireMessage, WireRecorder};
pub use rig::{assert_progress_never_goes_back, assert_success_statuses, Rig, RIG_WAIT};
pub use signing::TestKey;
pub use tempdir::TempDir;
pub use util::{free_port, random_bytes, upgrade_command, write_random_file};
pub use webdriver::ChromeDriver;

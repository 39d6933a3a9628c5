//! Device-side OTA SDK (being written).
#![forbid(unsafe_code)]

mod client;
mod config;
mod download;
mod error;
pub mod http;
pub mod session;
pub mod tls;

pub use client::{OtaClient, Upgrades};
pub use config::{BrokerUrl, Config};
pub use download::{Download, DownloadOptions};
pub use error::Error;
pub use iot_ota_core::{
    Fetch, FetchError, FetchState, Firmware, Policy, Progress, SignMethod, Status, UpgradeCommand,
    Verified,
};
pub use session::Session;

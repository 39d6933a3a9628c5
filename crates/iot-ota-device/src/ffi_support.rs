//! **For the C API only** (`iot-ota-ffi`): what its blocking calls are
//! built on, and what a Rust application does not need (it has
//! [`crate::OtaClient`] and [`crate::Download::download_to`]).
//!
//! - one MQTT link shared by many engines: [`link_client`], [`run_link`]
//!   and the [`LinkHandler`] that feeds the engines;
//! - the download read ahead on threads of its own, polled into a
//!   caller's buffer ([`ReadAhead`], from [`crate::Download::read_ahead`]);
//! - the application as the installer ([`Application`]:
//!   `iot_ota_install_done`, `iot_ota_boot_confirm`);
//! - the runtime the C calls block on ([`current_thread_runtime`],
//!   [`block_on_erased`]).
//!
//! These follow the C API's needs and may change with it.

use std::path::Path;

pub use crate::download::{ReadAhead, ReadAheadPoll};
use crate::install::Installer;
pub use crate::link::{client as link_client, run as run_link, LinkHandler};

/// A current-thread tokio runtime with IO and timers: what the C API's MQTT
/// instances and the read-ahead's thread run on (built in one place: the
/// builder's code is not small).
pub fn current_thread_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// Runs `future` on `rt` through a single, type-erased instantiation of
/// [`tokio::runtime::Runtime::block_on`].
///
/// Why: the runtime's scheduler entry is generic over the future, and each
/// distinct future type costs about 3 KB of code. Drivers that block on
/// many kinds of futures (the C API does, in every call) share one copy.
pub fn block_on_erased<F: std::future::Future>(
    rt: &tokio::runtime::Runtime,
    future: F,
) -> F::Output {
    let mut out = None;
    {
        let run = async {
            out = Some(future.await);
        };
        let mut run = std::pin::pin!(run);
        let erased: std::pin::Pin<&mut dyn std::future::Future<Output = ()>> = run.as_mut();
        rt.block_on(erased);
    }
    out.expect("block_on returns once its future has completed")
}

/// The application is the installer (the C API's `iot_ota_install_done`
/// and `iot_ota_boot_confirm`): it writes the image and reboots by itself,
/// and tells the version it runs and its health; the lifecycle journals and
/// decides. Nothing here touches a slot.
#[derive(Debug, Clone, Default)]
pub struct Application {
    /// The version the application says it runs.
    pub running: String,
    /// Whether its install needs a reboot to take effect.
    pub reboot: bool,
}

impl Installer for Application {
    fn name(&self) -> &str {
        "application"
    }

    fn running_version(&mut self) -> Result<String, String> {
        Ok(self.running.clone())
    }

    /// The application has installed `version` already; without a reboot
    /// it runs now.
    fn install(
        &mut self,
        _image: &Path,
        version: &str,
        _progress: &mut dyn FnMut(u32),
    ) -> Result<(), String> {
        if !self.reboot {
            self.running = version.to_owned();
        }
        Ok(())
    }

    fn needs_reboot(&self) -> bool {
        self.reboot
    }

    fn reboot(&mut self) -> Result<(), String> {
        Ok(())
    }

    fn commit(&mut self) -> Result<(), String> {
        Ok(())
    }

    fn roll_back(&mut self, _new_image_running: bool) -> Result<(), String> {
        Ok(())
    }
}

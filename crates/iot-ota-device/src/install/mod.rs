//! Install back-ends: how a verified image becomes the running firmware.
//!
//! An [`Installer`] writes the image to the inactive slot, asks for the
//! reboot into it, says which version runs after the reboot, checks its
//! health, and commits it (marks it good) or rolls it back. The upgrade
//! journal and the decisions around these calls are
//! [`crate::lifecycle::Lifecycle`]'s; an installer only does what it is told.
//!
//! Three back-ends come with the SDK:
//!
//! - [`SlotDirs`]: two slot directories and a simulated bootloader (a
//!   "try the new slot" flag and a boot counter, as U-Boot's bootcount or
//!   the Raspberry Pi's tryboot): the test bench and the demo's device.
//! - [`CommandHooks`]: shell commands for install, reboot, health check,
//!   commit and rollback, in the spirit of Mender's state scripts.
//! - [`Rauc`]: the real RAUC, through its command line (`rauc install`,
//!   `rauc status`, `rauc status mark-good` / `mark-bad`).
//!
//! The methods block (they write images and run commands): call them from a
//! thread that may block, as the agent does with
//! `tokio::task::block_in_place`.

use std::path::Path;

use iot_ota_core::journal::Health;

mod hooks;
mod rauc;
mod slots;

pub use hooks::{
    health_command, shell_command, shell_quote, CommandHooks, DEFAULT_HEALTH_TIMEOUT,
    DEFAULT_REBOOT,
};
pub use rauc::Rauc;
pub use slots::{BootState, SlotDirs};

/// One install back-end. Errors are the text of the report's `desc`.
pub trait Installer: Send {
    /// A short name for messages (`slots`, `commands`, `rauc`).
    fn name(&self) -> &str;

    /// The version the device runs now: after a reboot, the booted slot's.
    fn running_version(&mut self) -> Result<String, String>;

    /// Writes the verified `image` of `version` to the inactive slot and
    /// makes the next boot try it. `progress` takes percents (0-100) of
    /// the install.
    fn install(
        &mut self,
        image: &Path,
        version: &str,
        progress: &mut dyn FnMut(u32),
    ) -> Result<(), String>;

    /// The image the device runs, as a file or block device it can read,
    /// when the back-end knows it: the base of a delta update
    /// ([`crate::Download::delta_from`]). The default knows none.
    fn running_image(&self) -> Option<std::path::PathBuf> {
        None
    }

    /// Whether [`Installer::install`] needs a reboot to take effect. When
    /// false, the installed version runs as soon as the install returns
    /// (an application updated in place): it is checked and committed at once.
    fn needs_reboot(&self) -> bool {
        true
    }

    /// Asks for the reboot into the new slot (or back into the old one).
    /// The caller stops its work after it: the next start goes on from the
    /// journal.
    fn reboot(&mut self) -> Result<(), String>;

    /// Checks the running image. The default trusts it: that the agent
    /// started at all is the check.
    fn health_check(&mut self) -> Health {
        Health::Good
    }

    /// Marks the running slot good: the bootloader keeps it.
    fn commit(&mut self) -> Result<(), String>;

    /// Gives up on the new slot: marks it bad so that the next boot (or
    /// the one the caller asks for) runs the old one again.
    /// `new_image_running` tells whether the bad image runs now (its health
    /// check failed) or the old one already does (the bootloader fell back).
    fn roll_back(&mut self, new_image_running: bool) -> Result<(), String>;
}

impl<T: Installer + ?Sized> Installer for Box<T> {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn running_version(&mut self) -> Result<String, String> {
        (**self).running_version()
    }
    fn install(
        &mut self,
        image: &Path,
        version: &str,
        progress: &mut dyn FnMut(u32),
    ) -> Result<(), String> {
        (**self).install(image, version, progress)
    }
    fn running_image(&self) -> Option<std::path::PathBuf> {
        (**self).running_image()
    }
    fn needs_reboot(&self) -> bool {
        (**self).needs_reboot()
    }
    fn reboot(&mut self) -> Result<(), String> {
        (**self).reboot()
    }
    fn health_check(&mut self) -> Health {
        (**self).health_check()
    }
    fn commit(&mut self) -> Result<(), String> {
        (**self).commit()
    }
    fn roll_back(&mut self, new_image_running: bool) -> Result<(), String> {
        (**self).roll_back(new_image_running)
    }
}

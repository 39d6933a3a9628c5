//! Sans-IO core of the IoT OTA device SDK.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod digest;
pub mod protocol;

pub use digest::{Hasher, SignMethod};
pub use protocol::{
    Firmware, GetError, GetReply, Limits, Policy, Progress, Rejection, ReplyCode, Status, Topics,
    UpgradeCommand,
};

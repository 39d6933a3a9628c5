//! The core's errors.
//!
//! Failure *reasons* reported to the platform are [`Status`] values; these are
//! Rust errors for the caller. [`FetchError::status`] maps a download error to
//! the status to report.

use std::fmt;

use crate::digest::SignMethod;
use crate::protocol::{Rejection, Status};

/// Why a download failed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FetchError {
    /// The body went past the expected size.
    TooLong {
        /// Expected size.
        expected: u64,
        /// Bytes received, counting the excess.
        received: u64,
    },
    /// The body ended before the expected size.
    Truncated {
        /// Expected size.
        expected: u64,
        /// Bytes received.
        received: u64,
    },
    /// The server declared a length that is not the command's `size`.
    LengthMismatch {
        /// The command's size.
        expected: u64,
        /// What the server declared (offset + Content-Length).
        declared: u64,
    },
    /// A resumed response does not start where the download stopped.
    OffsetMismatch {
        /// Bytes received so far.
        expected: u64,
        /// Where the response starts.
        offset: u64,
    },
    /// The digest of the received bytes is not the command's `sign`.
    DigestMismatch {
        /// The method used.
        method: SignMethod,
        /// The command's digest.
        expected: String,
        /// The digest computed.
        actual: String,
    },
    /// The transport failed (HTTP status, connection, timeout, TLS): the text says how.
    Transport {
        /// What went wrong.
        message: String,
        /// Whether trying again (resuming) may succeed.
        retryable: bool,
        /// The HTTP status, when the server answered with one that ended
        /// the download (404, 403, ...): callers can match on it.
        http_status: Option<u16>,
    },
    /// A delta update's chunk index, or a chunk fetched with it, is not
    /// what it must be (its SHA-256): VERIFY_FAILED, like a bad image.
    DeltaMismatch(String),
    /// Writing the image to storage failed.
    Storage(String),
    /// The download was cancelled by the application or a destroy.
    Cancelled,
    /// The download has already ended.
    Finished,
}

impl FetchError {
    /// The status to report for this failure.
    pub fn status(&self) -> Status {
        match self {
            FetchError::DigestMismatch { .. } | FetchError::DeltaMismatch(_) => {
                Status::VerifyFailed
            }
            FetchError::Storage(_) => Status::FlashFailed,
            _ => Status::DownloadFailed,
        }
    }

    /// Whether resuming the download may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            FetchError::Transport {
                retryable: true,
                ..
            }
        )
    }
}

impl fmt::Display for FetchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FetchError::TooLong { expected, received } => write!(
                f,
                "body is longer than the expected {expected} bytes (got at least {received})"
            ),
            FetchError::Truncated { expected, received } => {
                write!(f, "body ended after {received} of {expected} bytes")
            }
            FetchError::LengthMismatch { expected, declared } => write!(
                f,
                "server declares {declared} bytes but the firmware size is {expected}"
            ),
            FetchError::OffsetMismatch { expected, offset } => {
                write!(f, "server resumed at byte {offset}, expected {expected}")
            }
            FetchError::DigestMismatch {
                method,
                expected,
                actual,
            } => write!(f, "{method} mismatch: expected {expected}, got {actual}"),
            FetchError::Transport { message, .. } => f.write_str(message),
            FetchError::Storage(m) => write!(f, "writing the image failed: {m}"),
            FetchError::DeltaMismatch(m) => write!(f, "delta update refused: {m}"),
            FetchError::Cancelled => f.write_str("download cancelled"),
            FetchError::Finished => f.write_str("the download has already ended"),
        }
    }
}

impl std::error::Error for FetchError {}

/// Errors of the [`crate::Ota`] engine's mutators.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// A parameter is out of range or malformed (the text says which).
    InvalidParam(String),
    /// The call is not allowed in the current state (the text says why).
    InvalidState(String),
    /// Another upgrade is in progress.
    Busy {
        /// The version being installed.
        version: String,
    },
    /// A firmware offered by a get reply failed validation.
    Rejected(Rejection),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidParam(m) => write!(f, "invalid parameter: {m}"),
            Error::InvalidState(m) => write!(f, "invalid state: {m}"),
            Error::Busy { version } => write!(f, "busy upgrading to {version}"),
            Error::Rejected(r) => write!(f, "firmware rejected: {r}"),
        }
    }
}

impl std::error::Error for Error {}

//! The device SDK's one error type.

use std::fmt;
use std::io;

use iot_ota_core::{FetchError, Status};

use crate::http::HttpError;
use crate::tls::TlsError;

/// Everything that can go wrong in the device SDK.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The configuration is invalid (the text says which setting and why).
    Config(String),
    /// TLS setup failed (CA file, client certificate).
    Tls(TlsError),
    /// The MQTT connection failed or was closed.
    Mqtt(String),
    /// The engine refused a call (bad parameter, wrong state, busy).
    Core(iot_ota_core::Error),
    /// The download failed; [`FetchError::status`] is what was reported.
    Fetch(FetchError),
    /// The platform has no such firmware (the get reply's 404 form, or another code).
    NotFound {
        /// The reply's code (404 when the version does not exist).
        code: i64,
        /// The reply's message.
        message: String,
    },
    /// No data or no reply within the time allowed; the operation may be retried.
    Timeout,
    /// A file operation failed.
    Io(io::Error),
    /// The upgrade journal could not be read or written.
    Journal(iot_ota_core::journal::JournalError),
    /// An install step failed (the text is the report's `desc`).
    Install(String),
    /// The client has been shut down.
    Closed,
}

impl Error {
    /// Whether trying the same operation again may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Timeout | Error::Mqtt(_) => true,
            Error::Fetch(e) => e.is_retryable(),
            _ => false,
        }
    }

    /// The failure status reported to the platform for this error, if it ended an upgrade.
    pub fn status(&self) -> Option<Status> {
        match self {
            Error::Fetch(e) => Some(e.status()),
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Config(m) => write!(f, "configuration: {m}"),
            Error::Tls(e) => write!(f, "TLS: {e}"),
            Error::Mqtt(m) => write!(f, "MQTT: {m}"),
            Error::Core(e) => e.fmt(f),
            Error::Fetch(e) => write!(f, "download failed: {e}"),
            Error::NotFound { code, message } => {
                write!(f, "firmware not found ({code}): {message}")
            }
            Error::Timeout => f.write_str("timed out"),
            Error::Io(e) => write!(f, "I/O: {e}"),
            Error::Journal(e) => e.fmt(f),
            Error::Install(m) => write!(f, "install: {m}"),
            Error::Closed => f.write_str("the OTA client is closed"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Tls(e) => Some(e),
            Error::Core(e) => Some(e),
            Error::Fetch(e) => Some(e),
            Error::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<TlsError> for Error {
    fn from(e: TlsError) -> Self {
        Error::Tls(e)
    }
}

impl From<iot_ota_core::Error> for Error {
    fn from(e: iot_ota_core::Error) -> Self {
        Error::Core(e)
    }
}

impl From<FetchError> for Error {
    fn from(e: FetchError) -> Self {
        Error::Fetch(e)
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(e)
    }
}

/// How a transport error becomes a download failure.
impl From<HttpError> for FetchError {
    fn from(e: HttpError) -> Self {
        let http_status = match &e {
            HttpError::Status { code, .. } => Some(*code),
            _ => None,
        };
        FetchError::Transport {
            retryable: e.is_retryable(),
            message: e.to_string(),
            http_status,
        }
    }
}

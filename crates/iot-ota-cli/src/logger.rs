//! The `log` facade's output for the `iot-ota` binary: one line per record
//! on stderr, at the level `RUST_LOG` names (`error`, `warn`, `info`,
//! `debug`, `trace`, `off`; default `warn`, or `-v` info, `-vv` debug), so the SDK's and the
//! platform's warnings reach the terminal. Without `RUST_LOG`, only our own
//! crates' records are shown: other crates' (rumqttc's, hyper's) records
//! are noise to a user.
//!
//! A `module=level` list is accepted too; its last bare level (or `warn`)
//! applies to everything: the binary needs no per-module filtering yet, and
//! no logging crate for that.

use log::{Level, LevelFilter, Log, Metadata, Record};

struct Stderr {
    /// Records of other crates too (`RUST_LOG` was set).
    all: bool,
}

impl Log for Stderr {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
            && (self.all || metadata.target().starts_with("iot_ota"))
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let level = match record.level() {
            Level::Error => "error",
            Level::Warn => "warning",
            Level::Info => "info",
            Level::Debug => "debug",
            Level::Trace => "trace",
        };
        eprintln!("iot-ota: {level}: {}: {}", record.target(), record.args());
    }

    fn flush(&self) {}
}

/// The level a `RUST_LOG` value asks for.
fn level(spec: Option<&str>) -> LevelFilter {
    spec.into_iter()
        .flat_map(|s| s.split(','))
        .rev()
        .filter(|part| !part.contains('='))
        .find_map(|part| part.trim().parse::<LevelFilter>().ok())
        .unwrap_or(LevelFilter::Warn)
}

/// Installs the logger (once; later calls do nothing). `verbose` is the
/// count of `-v` flags: 1 shows `info`, 2 `debug`, 3 `trace` of our crates;
/// `RUST_LOG` wins when set.
pub fn init(verbose: u8) {
    static ALL: Stderr = Stderr { all: true };
    static OURS: Stderr = Stderr { all: false };
    let spec = std::env::var("RUST_LOG").ok();
    let logger = if spec.is_some() { &ALL } else { &OURS };
    let max = match (&spec, verbose) {
        (Some(_), _) | (None, 0) => level(spec.as_deref()),
        (None, 1) => LevelFilter::Info,
        (None, 2) => LevelFilter::Debug,
        (None, _) => LevelFilter::Trace,
    };
    if log::set_logger(logger).is_ok() {
        log::set_max_level(max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_from_rust_log() {
        assert_eq!(level(None), LevelFilter::Warn);
        assert_eq!(level(Some("info")), LevelFilter::Info);
        assert_eq!(level(Some("iot_ota=debug,error")), LevelFilter::Error);
        assert_eq!(level(Some("OFF")), LevelFilter::Off);
        assert_eq!(level(Some("bogus")), LevelFilter::Warn);
    }
}

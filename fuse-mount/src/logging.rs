//! Where log messages go: stderr (filtered by `RUST_LOG`, `info` by
//! default), until a daemonised mount is up; from then on syslog
//! (facility daemon, tag `mount.hammer2`), since nobody reads the
//! stderr of a background process. Without a syslog daemon the messages
//! are lost; `-f` keeps them on stderr.

use log::{Level, LevelFilter, Log, Metadata, Record};
use nix::syslog::{Facility, LogFlags, Priority, Severity};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

struct Logger {
    stderr: env_logger::Logger,
    to_syslog: AtomicBool,
}

static LOGGER: OnceLock<Logger> = OnceLock::new();

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        self.stderr.enabled(metadata)
    }

    fn log(&self, record: &Record) {
        if !self.stderr.matches(record) {
            return;
        }
        if !self.to_syslog.load(Ordering::Relaxed) {
            return self.stderr.log(record);
        }
        let severity = match record.level() {
            Level::Error => Severity::LOG_ERR,
            Level::Warn => Severity::LOG_WARNING,
            Level::Info => Severity::LOG_INFO,
            Level::Debug | Level::Trace => Severity::LOG_DEBUG,
        };
        let msg = format!("{}: {}", record.target(), record.args());
        // Nowhere to report a failure to log.
        let _ = nix::syslog::syslog(Priority::new(severity, Facility::LOG_DAEMON), &msg);
    }

    fn flush(&self) {
        self.stderr.flush();
    }
}

/// Start logging to stderr; `verbose` lowers the default level to debug.
pub fn init(verbose: bool) {
    let default = if verbose {
        LevelFilter::Debug
    } else {
        LevelFilter::Info
    };
    let logger = LOGGER.get_or_init(|| Logger {
        stderr: env_logger::Builder::new()
            .filter_level(default)
            .parse_default_env()
            .build(),
        to_syslog: AtomicBool::new(false),
    });
    if log::set_logger(logger).is_ok() {
        log::set_max_level(logger.stderr.filter());
    }
}

/// Send everything from now on to syslog.
pub fn to_syslog() {
    let _ = nix::syslog::openlog(
        Some(c"mount.hammer2"),
        LogFlags::LOG_PID,
        Facility::LOG_DAEMON,
    );
    if let Some(l) = LOGGER.get() {
        l.to_syslog.store(true, Ordering::Relaxed);
    }
}

//! Logs go to syslog (default), stderr or a file — never stdout, which carries only
//! CNI results.
use std::{
    fs::OpenOptions,
    io::Write,
    str::FromStr,
    sync::Mutex,
    time::{SystemTime, UNIX_EPOCH},
};

use log::{LevelFilter, Log, Metadata, Record};

use crate::config::LogConfig;

pub fn init(config: Option<&LogConfig>) {
    let default = LogConfig::default();
    let config = config.unwrap_or(&default);
    let level = LevelFilter::from_str(&config.level).unwrap_or(LevelFilter::Info);
    let logger: Box<dyn Log> = match config.target.as_str() {
        "syslog" => match syslog_logger() {
            Some(logger) => logger,
            // No syslog socket (minimal hosts, tests): stderr rather than nothing.
            None => Box::new(LineLogger {
                out: Mutex::new(Box::new(std::io::stderr())),
            }),
        },
        "stderr" => Box::new(LineLogger {
            out: Mutex::new(Box::new(std::io::stderr())),
        }),
        path => match OpenOptions::new().create(true).append(true).open(path) {
            Ok(file) => Box::new(LineLogger {
                out: Mutex::new(Box::new(file)),
            }),
            Err(_) => Box::new(LineLogger {
                out: Mutex::new(Box::new(std::io::stderr())),
            }),
        },
    };
    if log::set_boxed_logger(logger).is_ok() {
        log::set_max_level(level);
    }
}

fn syslog_logger() -> Option<Box<dyn Log>> {
    let formatter = syslog::Formatter3164 {
        facility: syslog::Facility::LOG_DAEMON,
        hostname: None,
        process: "egress-deny".into(),
        pid: std::process::id(),
    };
    let logger = syslog::unix(formatter).ok()?;
    Some(Box::new(syslog::BasicLogger::new(logger)))
}

/// One line per record: `<unix time> <level> egress-deny[<pid>]: <message>`.
struct LineLogger {
    out: Mutex<Box<dyn Write + Send>>,
}

impl Log for LineLogger {
    fn enabled(&self, _: &Metadata) -> bool {
        true
    }

    fn log(&self, record: &Record) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        if let Ok(mut out) = self.out.lock() {
            let _ = writeln!(
                out,
                "{}.{:03} {} egress-deny[{}]: {}",
                now.as_secs(),
                now.subsec_millis(),
                record.level(),
                std::process::id(),
                record.args()
            );
        }
    }

    fn flush(&self) {
        if let Ok(mut out) = self.out.lock() {
            let _ = out.flush();
        }
    }
}

//! Logging to the console. As PID 1 stdout/stderr are /dev/console (ttyS0), which the
//! host captures; every line carries the guest monotonic time.

use std::io::Write;

fn line(level: &str, msg: &str) {
    let t = crate::clock::monotonic_ms();
    let mut err = std::io::stderr().lock();
    let _ = writeln!(
        err,
        "[{:>5}.{:03}] vessel-agent {level}: {msg}",
        t / 1000,
        t % 1000
    );
}

pub fn info(msg: &str) {
    line("info", msg);
}

pub fn warn(msg: &str) {
    line("warn", msg);
}

pub fn error(msg: &str) {
    line("error", msg);
}

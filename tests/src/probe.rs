//! Small probes the end-to-end tests share: a free loopback port, vesseld's
//! /metrics, the host processes that name a path.

use std::io::{Read as _, Write as _};
use std::time::Duration;

/// A TCP port on 127.0.0.1 that nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The whole /metrics text served on 127.0.0.1:`port` ("" when it cannot be read).
pub fn metrics_text(port: u16) -> String {
    let mut text = String::new();
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return text;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").is_ok() {
        let _ = s.read_to_string(&mut text);
    }
    text
}

/// The value of the first metric line of `text` starting with `prefix` (a name,
/// or a name with labels).
pub fn metric_in(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.trim().parse().ok())
}

/// One metric of the /metrics served on `port`.
pub fn metric(port: u16, prefix: &str) -> Option<f64> {
    metric_in(&metrics_text(port), prefix)
}

/// Pids of the processes (other than this one) whose command line contains `needle`.
pub fn pids_naming(needle: &str) -> Vec<i32> {
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_string_lossy().parse().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            (pid as u32 != me && cmd.contains(needle)).then_some(pid)
        })
        .collect()
}

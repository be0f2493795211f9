//! systemd's readiness protocol (`Type=notify`): one datagram such as `READY=1` to
//! the unix socket named by `$NOTIFY_SOCKET` (a path, or an abstract name when it
//! starts with '@').
//!
//! Written on std's `UnixDatagram` rather than with a crate: the protocol is a single
//! `sendto`, and the small `sd-notify` crate would add a dependency for ~20 lines.

use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The socket systemd listens on, from the environment; None outside `Type=notify`.
fn notify_addr(var: &str) -> std::io::Result<SocketAddr> {
    if let Some(name) = var.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt as _;
        SocketAddr::from_abstract_name(name.as_bytes())
    } else {
        SocketAddr::from_pathname(var)
    }
}

/// Sends `state` (e.g. "READY=1") to `socket` (the value of `$NOTIFY_SOCKET`).
pub fn notify_to(socket: &str, state: &str) -> std::io::Result<()> {
    let addr = notify_addr(socket)?;
    UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &addr)?;
    Ok(())
}

/// Tells systemd `state` when vesseld runs under `Type=notify`; a no-op otherwise.
/// Failures are logged, never fatal: the daemon works without its supervisor knowing.
pub fn notify(state: &str) {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let socket = socket.to_string_lossy();
    if let Err(e) = notify_to(&socket, state) {
        tracing::warn!(%socket, state, error = %e, "cannot notify systemd");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_to_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let server = UnixDatagram::bind(&path).unwrap();
        notify_to(path.to_str().unwrap(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt as _;
        let name = format!("vessel-test-notify-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixDatagram::bind_addr(&addr).unwrap();
        notify_to(&format!("@{name}"), "STOPPING=1").unwrap();
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
    }

    #[test]
    fn a_missing_socket_is_an_error() {
        assert!(notify_to("/nonexistent/vessel/notify.sock", "READY=1").is_err());
    }
}

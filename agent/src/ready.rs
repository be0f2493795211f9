//! Readiness announcement: once the agent's port is bound, connect out to the host
//! (CID 2, port `READY_VSOCK_PORT` or `vessel.ready_port=` from the kernel command
//! line) and write `READY_LINE_PREFIX <version>\n`. The host waits for this instead of
//! polling the guest, which vhost-device-vsock 0.3 does not survive reliably.

use std::time::Duration;

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio_vsock::{VsockAddr, VsockStream, VMADDR_CID_HOST};
use vessel_proto::{READY_LINE_PREFIX, READY_VSOCK_PORT};

/// Per-attempt limit (a hybrid-vsock host that does not listen never refuses: the
/// guest kernel times the connect out, after 2 s by default).
const ATTEMPT: Duration = Duration::from_secs(5);
/// Give up after this many attempts: the host is not waiting (an older runtime).
const ATTEMPTS: u32 = 30;

/// The host port named on the kernel command line, or the default.
pub fn port_from_cmdline(cmdline: &str) -> u32 {
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("vessel.ready_port="))
        .and_then(|p| p.parse().ok())
        .unwrap_or(READY_VSOCK_PORT)
}

/// The announcement line.
pub fn line() -> String {
    format!("{READY_LINE_PREFIX} {}\n", env!("CARGO_PKG_VERSION"))
}

/// Writes the announcement and closes the stream.
pub async fn announce_on(mut s: impl AsyncWrite + Unpin) -> std::io::Result<()> {
    s.write_all(line().as_bytes()).await?;
    s.shutdown().await
}

/// Announces readiness to the host, retrying with a growing pause. Runs detached:
/// serving never waits for it.
pub async fn announce() {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let port = port_from_cmdline(&cmdline);
    let mut pause = Duration::from_millis(50);
    for attempt in 1..=ATTEMPTS {
        let r = tokio::time::timeout(ATTEMPT, async {
            let s = VsockStream::connect(VsockAddr::new(VMADDR_CID_HOST, port)).await?;
            announce_on(s).await
        })
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()));
        match r {
            Ok(()) => {
                crate::log::info(&format!(
                    "announced readiness to host port {port} at {} ms",
                    crate::clock::monotonic_ms()
                ));
                return;
            }
            Err(e) => crate::log::warn(&format!("readiness announcement {attempt}: {e}")),
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(2));
    }
    crate::log::warn("host never took the readiness announcement");
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[test]
    fn port_comes_from_the_cmdline() {
        assert_eq!(port_from_cmdline("quiet console=ttyS0"), READY_VSOCK_PORT);
        assert_eq!(port_from_cmdline("quiet vessel.ready_port=4711 x=1"), 4711);
        assert_eq!(
            port_from_cmdline("vessel.ready_port=junk"),
            READY_VSOCK_PORT
        );
    }

    #[tokio::test]
    async fn announcement_is_one_line_then_eof() {
        let (a, mut b) = tokio::io::duplex(1024);
        announce_on(a).await.unwrap();
        let mut got = String::new();
        b.read_to_string(&mut got).await.unwrap();
        assert_eq!(
            got,
            format!("{READY_LINE_PREFIX} {}\n", env!("CARGO_PKG_VERSION"))
        );
    }
}

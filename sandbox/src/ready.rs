//! The agent's readiness announcement, host side. Instead of polling the guest (every
//! refused or abandoned CONNECT is a chance to wedge vhost-device-vsock 0.3), the host
//! listens before the VM starts and the agent connects out once it serves, writing
//! `READY_LINE_PREFIX <version>\n`. Hybrid vsock: the guest's connection to host port
//! P arrives on the unix socket `<uds-path>_P`. Kernel vhost-vsock: an AF_VSOCK
//! listener on a host port of its own (host ports are host-wide), named to the guest
//! on the kernel command line.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::net::UnixListener;
use vessel_proto::{READY_LINE_PREFIX, READY_VSOCK_PORT};

use crate::vsock::VsockAddr;

/// How long an accepted announcement connection gets to deliver its line.
const LINE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest line accepted (prefix + version).
const MAX_LINE: u64 = 256;

/// Where the host waits for one VM's agent to announce itself.
#[derive(Debug)]
pub enum ReadyListener {
    /// `<uds-path>_<READY_VSOCK_PORT>`, served to the guest by vhost-device-vsock.
    Hybrid {
        /// The bound socket.
        listener: UnixListener,
        /// Its path (removed on drop).
        path: PathBuf,
    },
    /// AF_VSOCK on the host, accepting only the VM's CID.
    Kernel {
        /// The bound socket.
        listener: tokio_vsock::VsockListener,
        /// The guest CID expected to connect.
        cid: u32,
        /// The host port it got.
        port: u32,
    },
}

/// The unix socket where vhost-device-vsock delivers a guest connection to host
/// port `port`, for the hybrid socket `uds`.
pub fn hybrid_port_path(uds: &Path, port: u32) -> PathBuf {
    let mut p = uds.as_os_str().to_owned();
    p.push(format!("_{port}"));
    PathBuf::from(p)
}

impl ReadyListener {
    /// Binds the listener matching how the host reaches the agent at `agent`.
    /// Must happen before the guest can run (a hybrid connection to a port nobody
    /// listens on is never refused, only timed out by the guest).
    pub fn bind(agent: &VsockAddr) -> io::Result<Self> {
        match agent {
            VsockAddr::Hybrid { path, .. } => {
                let path = hybrid_port_path(path, READY_VSOCK_PORT);
                // A stale socket file from a crashed start would make bind fail.
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
                let listener = UnixListener::bind(&path)?;
                Ok(Self::Hybrid { listener, path })
            }
            VsockAddr::Kernel { cid, .. } => {
                let listener = tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(
                    tokio_vsock::VMADDR_CID_ANY,
                    u32::MAX, // VMADDR_PORT_ANY: the kernel picks a free port.
                ))?;
                let port = listener.local_addr()?.port();
                Ok(Self::Kernel {
                    listener,
                    cid: *cid,
                    port,
                })
            }
        }
    }

    /// Kernel command line arguments the guest needs to find this listener.
    pub fn kernel_args(&self) -> Vec<String> {
        match self {
            // The agent's default port.
            Self::Hybrid { .. } => Vec::new(),
            Self::Kernel { port, .. } => vec![format!("vessel.ready_port={port}")],
        }
    }

    /// Waits for the agent's announcement and returns the version it sent.
    /// Connections that are not a well-formed announcement (or, for AF_VSOCK, come
    /// from another CID) are dropped and waiting goes on. No timeout: the caller
    /// races this against its deadline and the VMM's exit.
    pub async fn wait(&self) -> io::Result<String> {
        loop {
            let line = match self {
                Self::Hybrid { listener, .. } => {
                    let (s, _) = listener.accept().await?;
                    read_announcement(s).await
                }
                Self::Kernel { listener, cid, .. } => {
                    let (s, peer) = listener.accept().await?;
                    if peer.cid() != *cid {
                        tracing::warn!(peer = ?peer, "readiness connection from a foreign CID");
                        continue;
                    }
                    read_announcement(s).await
                }
            };
            match line {
                Ok(version) => return Ok(version),
                Err(e) => tracing::warn!("bad readiness announcement: {e}"),
            }
        }
    }
}

impl Drop for ReadyListener {
    fn drop(&mut self) {
        if let Self::Hybrid { path, .. } = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Reads one `READY_LINE_PREFIX <version>\n` line.
async fn read_announcement(s: impl AsyncRead + Unpin) -> io::Result<String> {
    let mut line = String::new();
    let mut r = BufReader::new(tokio::io::AsyncReadExt::take(s, MAX_LINE));
    tokio::time::timeout(LINE_TIMEOUT, r.read_line(&mut line))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no line"))??;
    parse_announcement(&line)
        .map(str::to_owned)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("{line:?}")))
}

/// Longest version accepted in an announcement.
const MAX_VERSION: usize = 64;

/// The version in a complete announcement line. Printable ASCII only: the version goes
/// to the log, where control characters could forge or hide lines.
fn parse_announcement(line: &str) -> Option<&str> {
    let rest = line.strip_suffix('\n')?.strip_prefix(READY_LINE_PREFIX)?;
    let version = rest.strip_prefix(' ')?;
    let ok = !version.is_empty()
        && version.len() <= MAX_VERSION
        && version.bytes().all(|b| b.is_ascii_graphic());
    ok.then_some(version)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::UnixStream;

    #[test]
    fn parses_announcements() {
        assert_eq!(
            parse_announcement(&format!("{READY_LINE_PREFIX} 0.1.0\n")),
            Some("0.1.0")
        );
        assert_eq!(
            parse_announcement(&format!("{READY_LINE_PREFIX} 0.1.0")),
            None
        );
        assert_eq!(parse_announcement(&format!("{READY_LINE_PREFIX}\n")), None);
        assert_eq!(parse_announcement(&format!("{READY_LINE_PREFIX} \n")), None);
        assert_eq!(parse_announcement("hello 1\n"), None);
        assert_eq!(
            parse_announcement(&format!("{READY_LINE_PREFIX} 1\x1b[2J\n")),
            None
        );
        assert_eq!(
            parse_announcement(&format!("{READY_LINE_PREFIX} 1\n2\n")),
            None
        );
    }

    /// Whatever a guest writes to the readiness port: one bounded line is read, and a
    /// version comes back only from a well-formed announcement.
    #[test]
    fn fuzz_ready_lines() {
        let seeds: Vec<Vec<u8>> = vec![
            format!("{READY_LINE_PREFIX} 0.1.0\n").into_bytes(),
            format!("{READY_LINE_PREFIX} 0.1.0\nmore").into_bytes(),
            format!("{READY_LINE_PREFIX} {}\n", "v".repeat(300)).into_bytes(),
            b"GET / HTTP/1.1\r\n".to_vec(),
        ];
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let mut accepted = 0u64;
        vessel_fuzz::fuzz("ready lines", &seeds, |data| {
            let got = rt.block_on(read_announcement(data));
            // The line read: up to the first newline, within MAX_LINE bytes.
            let window = &data[..data.len().min(MAX_LINE as usize)];
            let line = match window.iter().position(|&b| b == b'\n') {
                Some(nl) => &window[..=nl],
                None => window,
            };
            match got {
                Ok(version) => {
                    accepted += 1;
                    assert_eq!(
                        line,
                        format!("{READY_LINE_PREFIX} {version}\n").as_bytes(),
                        "a version only from the exact announcement"
                    );
                    assert!(version.len() <= MAX_VERSION);
                    assert!(version.bytes().all(|b| b.is_ascii_graphic()));
                }
                Err(_) => {
                    if let Ok(text) = std::str::from_utf8(line) {
                        assert_eq!(parse_announcement(text), None, "{text:?} refused");
                    }
                }
            }
        });
        eprintln!("fuzz ready lines: {accepted} accepted");
    }

    #[test]
    fn port_path_appends_the_port() {
        assert_eq!(
            hybrid_port_path(Path::new("/run/x/vsock.hybrid"), 1025),
            Path::new("/run/x/vsock.hybrid_1025")
        );
    }

    /// Stands in for vhost-device-vsock delivering guest connections to host port 1025.
    #[tokio::test]
    async fn hybrid_waits_for_a_good_announcement() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.hybrid");
        let addr = VsockAddr::Hybrid {
            path: uds.clone(),
            port: 1024,
        };
        // A stale socket file does not stop a new start.
        std::fs::write(hybrid_port_path(&uds, READY_VSOCK_PORT), b"").unwrap();
        let ready = ReadyListener::bind(&addr).unwrap();
        assert!(ready.kernel_args().is_empty());
        let path = hybrid_port_path(&uds, READY_VSOCK_PORT);
        let guest = tokio::spawn(async move {
            // Junk, then a connection closed without a line, then the real one.
            let mut s = UnixStream::connect(&path).await.unwrap();
            s.write_all(b"GET / HTTP/1.1\n").await.unwrap();
            drop(s);
            drop(UnixStream::connect(&path).await.unwrap());
            let mut s = UnixStream::connect(&path).await.unwrap();
            s.write_all(format!("{READY_LINE_PREFIX} 9.9.9\n").as_bytes())
                .await
                .unwrap();
        });
        let version = tokio::time::timeout(Duration::from_secs(10), ready.wait())
            .await
            .expect("announcement seen")
            .unwrap();
        assert_eq!(version, "9.9.9");
        guest.await.unwrap();
        let path = hybrid_port_path(&uds, READY_VSOCK_PORT);
        assert!(path.exists());
        drop(ready);
        assert!(!path.exists(), "socket file removed with the listener");
    }
}

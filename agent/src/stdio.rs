//! A process's stdio as the agent holds it: pipes, or a pty master for TTY processes.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::Arc;

use nix::fcntl::OFlag;
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

use crate::output::OutputBuffer;

/// Output kept per stream before the process is made to wait.
pub const OUTPUT_CAP: usize = 1024 * 1024;

/// The agent's ends of a process's stdio.
pub struct Stdio {
    pub stdout: Arc<OutputBuffer>,
    pub stderr: Arc<OutputBuffer>,
    stdin: Mutex<Option<tokio::fs::File>>,
    /// Close stdin after the first WriteStdin stream ends (CRI stdin_once).
    pub stdin_once: bool,
    /// The pty master of a TTY process (for resize).
    pty: Option<Arc<OwnedFd>>,
}

/// The child's ends to hand to the helper (fds 3, 4, 5), when not a TTY.
pub struct ChildEnds {
    pub fds: [OwnedFd; 3],
}

fn pipe() -> nix::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC)
}

fn null() -> std::io::Result<OwnedFd> {
    Ok(std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?
        .into())
}

fn async_reader(fd: OwnedFd) -> std::io::Result<tokio::fs::File> {
    Ok(tokio::fs::File::from_std(std::fs::File::from(fd)))
}

impl Stdio {
    /// Pipes for a non-TTY process. Without `stdin`, the process reads /dev/null.
    pub fn pipes(stdin: bool, stdin_once: bool) -> std::io::Result<(Stdio, ChildEnds)> {
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        let (child_in, our_in) = if stdin {
            let (r, w) = pipe()?;
            (r, Some(w))
        } else {
            (null()?, None)
        };
        let stdout = Arc::new(OutputBuffer::new(OUTPUT_CAP));
        let stderr = Arc::new(OutputBuffer::new(OUTPUT_CAP));
        spawn_pump(stdout.clone(), out_r)?;
        spawn_pump(stderr.clone(), err_r)?;
        let stdin = our_in.map(|w| tokio::fs::File::from_std(std::fs::File::from(w)));
        Ok((
            Stdio {
                stdout,
                stderr,
                stdin: Mutex::new(stdin),
                stdin_once,
                pty: None,
            },
            ChildEnds {
                fds: [child_in, out_w, err_w],
            },
        ))
    }

    /// A TTY process: output and input go through the pty master.
    pub fn pty(master: OwnedFd, stdin: bool, stdin_once: bool) -> std::io::Result<Stdio> {
        let master = Arc::new(master);
        let stdout = Arc::new(OutputBuffer::new(OUTPUT_CAP));
        spawn_pump(stdout.clone(), master.try_clone()?)?;
        let stdin = if stdin {
            Some(async_reader(master.try_clone()?)?)
        } else {
            None
        };
        Ok(Stdio {
            stdout,
            stderr: Arc::new(OutputBuffer::closed()),
            stdin: Mutex::new(stdin),
            stdin_once,
            pty: Some(master),
        })
    }

    pub async fn write_stdin(&self, data: &[u8]) -> std::io::Result<()> {
        let mut guard = self.stdin.lock().await;
        match guard.as_mut() {
            Some(f) => {
                f.write_all(data).await?;
                f.flush().await
            }
            None => Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "stdin is closed",
            )),
        }
    }

    pub async fn close_stdin(&self) {
        self.stdin.lock().await.take();
    }

    pub fn resize(&self, width: u16, height: u16) -> std::io::Result<()> {
        let Some(master) = &self.pty else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a TTY process",
            ));
        };
        set_window_size(master, width, height)
    }
}

fn set_window_size(master: &OwnedFd, width: u16, height: u16) -> std::io::Result<()> {
    let ws = libc::winsize {
        ws_row: height,
        ws_col: width,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize that lives across the call; fd is valid.
    let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn spawn_pump(buf: Arc<OutputBuffer>, fd: OwnedFd) -> std::io::Result<()> {
    let reader = async_reader(fd)?;
    tokio::spawn(async move { buf.pump(reader).await });
    Ok(())
}

/// Binds a console socket for libcontainer, which sends the pty master over it.
pub fn console_listener(path: &Path) -> std::io::Result<UnixListener> {
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path)
}

/// Receives the pty master fd that libcontainer sends on the console socket, and gives
/// it the console size (when known) before anyone else sees the terminal.
pub async fn receive_pty(
    listener: UnixListener,
    width: u16,
    height: u16,
) -> std::io::Result<OwnedFd> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::UnixListener::from_std(listener)?;
    let (conn, _) = listener.accept().await?;
    let conn = conn.into_std()?;
    let master = tokio::task::spawn_blocking(move || recv_fd(&conn))
        .await
        .map_err(std::io::Error::other)??;
    if width != 0 || height != 0 {
        set_window_size(&master, width, height)?;
    }
    Ok(master)
}

fn recv_fd(conn: &std::os::unix::net::UnixStream) -> std::io::Result<OwnedFd> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::FromRawFd;
    conn.set_nonblocking(false)?;
    let mut buf = [0u8; 4096];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(
        conn.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(std::io::Error::from)?;
    for c in msg.cmsgs().map_err(std::io::Error::from)? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            if let Some(&fd) = fds.first() {
                // SAFETY: the kernel just installed this fd for us; we take sole ownership.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    Err(std::io::Error::other("no pty fd on the console socket"))
}

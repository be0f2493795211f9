//! vesseld's own log file, capped in size: when a write would take the file past
//! `max_bytes`, `vesseld.log` becomes `vesseld.log.1` (`.1` → `.2`, ... up to `keep`
//! old files; the oldest is deleted) and a new file is started.
//!
//! A small writer of our own: `tracing-appender` rotates by time only, and a log that
//! grows without bound between midnights is what this replaces. The fmt layer writes
//! each event with one `write`, so files are cut between events, never inside one.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};

/// Mode of the log files (vesseld logs image names, pod names and errors).
const LOG_MODE: u32 = 0o640;

/// A size-capped, rotating log file.
#[derive(Debug)]
pub struct RotatingFile {
    path: PathBuf,
    max_bytes: u64,
    keep: usize,
    file: File,
    size: u64,
}

impl RotatingFile {
    /// Opens (appends to) `path`, creating its directory; keeps `keep` rotated files
    /// of at most about `max_bytes` each.
    pub fn open(path: &Path, max_bytes: u64, keep: usize) -> std::io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = open_append(path)?;
        let size = file.metadata()?.len();
        Ok(RotatingFile {
            path: path.to_owned(),
            max_bytes: max_bytes.max(1),
            keep,
            file,
            size,
        })
    }

    fn rotated(&self, n: usize) -> PathBuf {
        let mut name = self.path.clone().into_os_string();
        name.push(format!(".{n}"));
        name.into()
    }

    /// Shifts `path.N-1` → `path.N`, ..., `path` → `path.1`, and starts a new file.
    fn rotate(&mut self) -> std::io::Result<()> {
        if self.keep == 0 {
            // Nothing kept: start over in place.
            self.file.set_len(0)?;
            self.size = 0;
            return Ok(());
        }
        let _ = std::fs::remove_file(self.rotated(self.keep));
        for n in (1..self.keep).rev() {
            let from = self.rotated(n);
            if from.exists() {
                std::fs::rename(&from, self.rotated(n + 1))?;
            }
        }
        std::fs::rename(&self.path, self.rotated(1))?;
        self.file = open_append(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(LOG_MODE)
        .open(path)
}

impl Write for RotatingFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.size > 0 && self.size + buf.len() as u64 > self.max_bytes {
            // A failed rotation must not lose the event: keep writing to the old file.
            if let Err(e) = self.rotate() {
                eprintln!("vesseld: cannot rotate {}: {e}", self.path.display());
            }
        }
        let n = self.file.write(buf)?;
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Hands vesseld's log lines to one thread that writes them, so an event logged on
/// an async worker never waits for the disk (or a stalled stderr pipe). When the
/// thread falls [`QUEUE`] lines behind, new lines are dropped and counted, and the
/// count is written once it catches up: blocking every worker on a slow log would
/// stall every pod.
#[derive(Clone, Debug)]
pub struct Background {
    tx: mpsc::SyncSender<Msg>,
    dropped: Arc<AtomicU64>,
}

#[derive(Debug)]
enum Msg {
    Line(Vec<u8>),
    Flush(mpsc::Sender<()>),
}

/// Lines queued at most.
pub const QUEUE: usize = 8192;

impl Background {
    pub fn start<W: Write + Send + 'static>(mut out: W) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let counted = dropped.clone();
        std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || {
                for msg in rx {
                    match msg {
                        Msg::Line(line) => {
                            let lost = counted.swap(0, Ordering::Relaxed);
                            if lost > 0 {
                                let note = format!("vesseld: {lost} log lines dropped: the log writer fell behind\n");
                                let _ = out.write_all(note.as_bytes());
                            }
                            // Nowhere to report a failed log write but the log.
                            let _ = out.write_all(&line);
                        }
                        Msg::Flush(done) => {
                            let _ = out.flush();
                            let _ = done.send(());
                        }
                    }
                }
            })?;
        Ok(Background { tx, dropped })
    }

    /// Waits (at most `limit`) until every line queued before is written.
    pub fn flush_blocking(&self, limit: std::time::Duration) {
        let (done, wait) = mpsc::channel();
        if self.tx.send(Msg::Flush(done)).is_ok() {
            let _ = wait.recv_timeout(limit);
        }
    }
}

impl Write for Background {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.tx.try_send(Msg::Line(buf.to_vec())) {
            Ok(()) => {}
            Err(mpsc::TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
            Err(mpsc::TrySendError::Disconnected(_)) => {
                return Err(std::io::Error::other("the log writer thread is gone"));
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(p: &Path) -> String {
        std::fs::read_to_string(p).unwrap_or_default()
    }

    #[test]
    fn rotates_at_the_cap_and_keeps_n_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log/vesseld.log");
        let mut f = RotatingFile::open(&path, 20, 2).unwrap();
        for i in 0..7 {
            // 10 bytes per event: two fit in one file.
            f.write_all(format!("event {i:03}\n").as_bytes()).unwrap();
        }
        assert_eq!(read(&path), "event 006\n");
        assert_eq!(read(&f.rotated(1)), "event 004\nevent 005\n");
        assert_eq!(read(&f.rotated(2)), "event 002\nevent 003\n");
        assert!(!f.rotated(3).exists(), "only 2 old files are kept");
        let mode = std::fs::metadata(&path).unwrap().permissions();
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(mode.mode() & 0o777, LOG_MODE);
    }

    #[test]
    fn appends_to_an_existing_file_and_counts_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vesseld.log");
        std::fs::write(&path, "0123456789012345\n").unwrap();
        let mut f = RotatingFile::open(&path, 20, 1).unwrap();
        f.write_all(b"next event\n").unwrap();
        assert_eq!(read(&path), "next event\n");
        assert_eq!(read(&f.rotated(1)), "0123456789012345\n");
    }

    #[test]
    fn an_event_larger_than_the_cap_is_written_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vesseld.log");
        let mut f = RotatingFile::open(&path, 4, 0).unwrap();
        f.write_all(b"a long event\n").unwrap();
        f.write_all(b"another one\n").unwrap();
        assert_eq!(read(&path), "another one\n");
    }

    #[test]
    fn background_lines_are_written_in_order_and_flushed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vesseld.log");
        let mut bg = Background::start(RotatingFile::open(&path, 1 << 20, 1).unwrap()).unwrap();
        for i in 0..100 {
            bg.write_all(format!("event {i:03}\n").as_bytes()).unwrap();
        }
        bg.flush_blocking(std::time::Duration::from_secs(10));
        let text = read(&path);
        let want: String = (0..100).map(|i| format!("event {i:03}\n")).collect();
        assert_eq!(text, want);
    }
}

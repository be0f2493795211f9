//! Container output → CRI log, without losing a line across a `vesseld` restart.
//!
//! The agent keeps a stream's bytes until they are acknowledged, and every byte has
//! a stream offset. A pump writes whole lines to the CRI log, then stores the offset
//! up to which the log holds the stream (one small file per stream under the pod's
//! run dir), then acknowledges it to the agent. A restarted `vesseld` reads the
//! stored offset and asks the agent for the stream from there. A kill between the log
//! write and the offset write repeats those lines; no order of events loses one.
//! The offset file is not fsynced: it must survive the death of `vesseld`, not of
//! the host (which takes the VM, and its buffers, with it).
//!
//! `crate::engine` starts a container's pumps together with its exit watcher.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use vessel_proto::agent as pb;
use vessel_sandbox::AgentClient;

use crate::crilog::{CriLog, Stream, Tag};
use crate::outcursor::OutputCursor;

/// Pause between attempts to reopen a broken output stream.
const RETRY_PAUSE: Duration = Duration::from_millis(500);
/// Consecutive failed opens after which a pump gives up (the VM is gone).
const MAX_RETRIES: u32 = 60;
/// Width of the stored offset: fixed, so every store is one same-sized `pwrite`.
const OFFSET_WIDTH: usize = 20;

/// The stored offset of one output stream.
#[derive(Debug)]
pub struct OffsetFile {
    file: File,
}

impl OffsetFile {
    /// Opens (creating) the file; returns it with the offset it holds (0 when new
    /// or unreadable: repeating output beats losing it).
    pub fn open(path: &Path) -> std::io::Result<(Self, u64)> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let mut buf = [0u8; OFFSET_WIDTH + 1];
        let n = file.read_at(&mut buf, 0)?;
        let offset = std::str::from_utf8(&buf[..n])
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        Ok((OffsetFile { file }, offset))
    }

    /// Records that the log holds the stream up to `offset`. One `pwrite` of a
    /// fixed size at 0: a killed `vesseld` leaves the old value or the new one.
    pub fn store(&self, offset: u64) -> std::io::Result<()> {
        let text = format!("{offset:0width$}\n", width = OFFSET_WIDTH);
        self.file.write_all_at(text.as_bytes(), 0)
    }
}

fn stream_name(which: pb::OutputStream) -> &'static str {
    match which {
        pb::OutputStream::Stdout => "stdout",
        pb::OutputStream::Stderr => "stderr",
    }
}

/// Where the stored offset of one stream of a container lives.
pub fn offset_path(pod_dir: &Path, container_id: &str, which: pb::OutputStream) -> PathBuf {
    pod_dir
        .join("output")
        .join(format!("{container_id}.{}", stream_name(which)))
}

/// Drops a removed container's stored offsets.
pub fn forget(pod_dir: &Path, container_id: &str) {
    for which in [pb::OutputStream::Stdout, pb::OutputStream::Stderr] {
        let _ = std::fs::remove_file(offset_path(pod_dir, container_id, which));
    }
}

/// Starts one pump per output stream of a container's main process; each ends when
/// its stream does (process gone, everything logged) or the container is gone.
pub fn spawn_pumps(
    agent: &AgentClient,
    pod_dir: &Path,
    container_id: &str,
    log: Option<Arc<CriLog>>,
) -> Vec<JoinHandle<()>> {
    [
        (Stream::Stdout, pb::OutputStream::Stdout),
        (Stream::Stderr, pb::OutputStream::Stderr),
    ]
    .into_iter()
    .map(|(stream, which)| {
        tokio::spawn(
            Pump {
                agent: agent.clone(),
                id: container_id.to_owned(),
                which,
                stream,
                log: log.clone(),
                offset_path: offset_path(pod_dir, container_id, which),
            }
            .run(),
        )
    })
    .collect()
}

fn gone(e: &vessel_sandbox::Error) -> bool {
    matches!(e, vessel_sandbox::Error::Agent(s) if s.code() == tonic::Code::NotFound)
}

/// Copies one output stream of a container's main process into the CRI log.
struct Pump {
    agent: AgentClient,
    id: String,
    which: pb::OutputStream,
    stream: Stream,
    log: Option<Arc<CriLog>>,
    offset_path: PathBuf,
}

/// How one ReadOutput stream ended.
enum End {
    /// Everything was read and logged.
    Done,
    /// The container is gone from the agent.
    Gone,
    /// A transport error: open the stream again from the stored offset.
    Broken,
}

impl Pump {
    async fn run(self) {
        // Creating the dir and reading the file touch the disk: off the workers.
        let path = self.offset_path.clone();
        let opened = tokio::task::spawn_blocking(move || OffsetFile::open(&path))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        let (file, mut done) = match opened {
            Ok((f, o)) => (Some(Arc::new(f)), o),
            Err(e) => {
                tracing::warn!(container = %self.id, path = %self.offset_path.display(), error = %e,
                    "cannot open the output offset file; a vesseld restart may repeat output");
                (None, 0)
            }
        };
        // Acks go out from their own task so a slow ack never holds up the log, and
        // a burst of writes coalesces into one ack of the latest offset.
        let (acked_tx, acked_rx) = watch::channel(done);
        let acker = tokio::spawn(ack_loop(
            self.agent.clone(),
            self.id.clone(),
            self.which,
            acked_rx,
        ));
        let mut failures = 0;
        loop {
            let req = pb::ReadOutputRequest {
                container_id: self.id.clone(),
                exec_id: String::new(),
                stream: self.which as i32,
                offset: done,
                explicit_ack: true,
            };
            let end = match self.agent.read_output(req).await {
                Ok(s) => {
                    self.copy(s, &mut done, file.as_ref(), &acked_tx, &mut failures)
                        .await
                }
                Err(e) if gone(&e) => End::Gone,
                Err(e) => {
                    tracing::debug!(container = %self.id, which = ?self.which, error = %e, "cannot open output");
                    End::Broken
                }
            };
            match end {
                End::Done | End::Gone => break,
                End::Broken => {
                    failures += 1;
                    if failures > MAX_RETRIES {
                        tracing::warn!(container = %self.id, which = ?self.which,
                            "output stream keeps failing; giving up");
                        break;
                    }
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
            }
        }
        drop(acked_tx);
        let _ = acker.await;
    }

    /// Copies one open stream from `*done`, advancing `*done` (and its file and the
    /// ack) past every byte the log holds.
    async fn copy(
        &self,
        mut s: tonic::Streaming<pb::OutputChunk>,
        done: &mut u64,
        file: Option<&Arc<OffsetFile>>,
        acked: &watch::Sender<u64>,
        failures: &mut u32,
    ) -> End {
        // Bytes not yet in the log (an unfinished line) are read again after a
        // reopen, so every stream starts with an empty cursor at `*done`.
        let mut cursor = OutputCursor::new(*done);
        loop {
            match s.message().await {
                Ok(Some(chunk)) => {
                    *failures = 0;
                    if self.log.as_ref().is_some_and(|l| l.is_capped()) {
                        // Nothing more reaches this log until a rotation: skip the
                        // per-line work, only keep the offsets right.
                        match cursor.discard(chunk.offset, &chunk.data) {
                            Ok(dropped) => crate::crilog::count_dropped(dropped),
                            Err(e) => {
                                tracing::warn!(container = %self.id, which = ?self.which, "{e}");
                                return End::Broken;
                            }
                        }
                        if cursor.done() != *done {
                            *done = cursor.done();
                            self.persist(Vec::new(), Some(*done), file).await;
                            acked.send_replace(*done);
                        }
                        continue;
                    }
                    let fed = match cursor.feed(chunk.offset, &chunk.data) {
                        Ok(fed) => fed,
                        Err(e) => {
                            // Only a broken or hostile agent sends this; reopening
                            // from the stored offset is all that can be done.
                            tracing::warn!(container = %self.id, which = ?self.which, "{e}");
                            return End::Broken;
                        }
                    };
                    if fed.lost > 0 {
                        // The agent no longer has these bytes; nothing brings them back.
                        tracing::warn!(container = %self.id, which = ?self.which,
                            lost = fed.lost, "output bytes were lost");
                    }
                    if let Some(cut) = fed.cut {
                        self.persist(vec![cut], None, None).await;
                    }
                    *done = cursor.done();
                    if !fed.entries.is_empty() {
                        self.persist(fed.entries, Some(*done), file).await;
                        acked.send_replace(*done);
                    }
                }
                Ok(None) => {
                    // The last line has no newline: what was fed is what is logged.
                    let last: Vec<_> = cursor.finish().into_iter().collect();
                    *done = cursor.done();
                    self.persist(last, Some(*done), file).await;
                    acked.send_replace(*done);
                    return End::Done;
                }
                Err(e) if e.code() == tonic::Code::NotFound => return End::Gone,
                Err(e) => {
                    tracing::debug!(container = %self.id, which = ?self.which, error = %e, "output stream broke");
                    return End::Broken;
                }
            }
        }
    }

    /// Writes entries to the log, then (when given) stores the offset the log now
    /// holds. File writes run on the blocking pool: a slow disk or one pod's flood
    /// never stalls the async workers that serve every other pod's calls.
    async fn persist(
        &self,
        entries: Vec<(Tag, Vec<u8>)>,
        offset: Option<u64>,
        file: Option<&Arc<OffsetFile>>,
    ) {
        let (log, stream, id) = (self.log.clone(), self.stream, self.id.clone());
        let file = file.cloned();
        let task = tokio::task::spawn_blocking(move || {
            if let (Some(log), false) = (&log, entries.is_empty()) {
                // A log that cannot be written drops output, as with no log at all:
                // holding it would block the container forever.
                if let Err(e) = log.write(stream, &entries) {
                    tracing::warn!(container = %id, error = %e, "cannot write the log");
                }
            }
            if let (Some(f), Some(offset)) = (&file, offset) {
                if let Err(e) = f.store(offset) {
                    tracing::warn!(container = %id, error = %e, "cannot store the output offset");
                }
            }
        });
        if let Err(e) = task.await {
            tracing::warn!(container = %self.id, error = %e, "log writer task failed");
        }
    }
}

/// Acknowledges the latest logged offset until the pump ends.
async fn ack_loop(
    agent: AgentClient,
    id: String,
    which: pb::OutputStream,
    mut rx: watch::Receiver<u64>,
) {
    let mut sent = None;
    loop {
        let offset = *rx.borrow_and_update();
        if sent != Some(offset) {
            let req = pb::AckOutputRequest {
                container_id: id.clone(),
                exec_id: String::new(),
                stream: which as i32,
                offset,
            };
            match agent.ack_output(req).await {
                Ok(_) => sent = Some(offset),
                Err(e) if gone(&e) => return,
                Err(e) => {
                    // Unacked bytes only cost guest buffer space; the next change
                    // (or a reconnect) acks them.
                    tracing::debug!(container = %id, ?which, error = %e, "AckOutput failed");
                }
            }
        }
        if rx.changed().await.is_err() {
            // The pump ended: one last ack of its final offset.
            let last = *rx.borrow();
            if sent != Some(last) {
                let _ = agent
                    .ack_output(pb::AckOutputRequest {
                        container_id: id.clone(),
                        exec_id: String::new(),
                        stream: which as i32,
                        offset: last,
                    })
                    .await;
            }
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_persist_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = offset_path(dir.path(), "c1", pb::OutputStream::Stderr);
        assert!(path.ends_with("output/c1.stderr"));
        let (f, start) = OffsetFile::open(&path).unwrap();
        assert_eq!(start, 0, "a new stream starts at 0");
        f.store(12).unwrap();
        f.store(123_456_789_012).unwrap();
        drop(f);
        // A restarted vesseld finds the last value.
        let (f, start) = OffsetFile::open(&path).unwrap();
        assert_eq!(start, 123_456_789_012);
        // A smaller value overwrites a longer one completely (fixed width).
        f.store(7).unwrap();
        assert_eq!(OffsetFile::open(&path).unwrap().1, 7);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.len(), OFFSET_WIDTH + 1);
        // The other stream and container are separate; forget removes both streams.
        let out = offset_path(dir.path(), "c1", pb::OutputStream::Stdout);
        OffsetFile::open(&out).unwrap().0.store(3).unwrap();
        forget(dir.path(), "c1");
        assert!(!path.exists() && !out.exists());
    }

    #[test]
    fn garbage_offset_reads_as_zero() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o");
        std::fs::write(&path, b"not a number").unwrap();
        assert_eq!(OffsetFile::open(&path).unwrap().1, 0);
    }

    #[test]
    fn entries_account_for_their_bytes() {
        let mut s = crate::crilog::LineSplitter::default();
        let mut long = vec![b'x'; crate::crilog::MAX_LINE + 5];
        long.extend_from_slice(b"\nab\n\npart");
        let entries = s.feed(&long);
        // Everything but the unfinished "part" is in the entries.
        assert_eq!(
            crate::outcursor::consumed(&entries),
            (long.len() - 4) as u64
        );
    }
}

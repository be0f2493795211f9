//! Container log files in the CRI format the kubelet reads:
//! `<RFC3339Nano> <stdout|stderr> <P|F> <message>\n`, one entry per line, lines longer
//! than 16 KiB split into partial (`P`) entries ended by a full (`F`) one.
//!
//! One file holds at most `[containers] log_size_max` bytes between two rotations:
//! the kubelet rotates by size only every 10 s, and each empty line costs a ~41-byte
//! entry, so a container printing newlines would otherwise write 41× its output to
//! node disk. Past the cap one marker entry says output is dropped; what is dropped
//! is counted ([`dropped_bytes`], on /metrics) and a reopen (rotation) starts afresh.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use chrono::{SecondsFormat, Utc};

/// Longest message of one entry; longer lines become partial entries.
pub const MAX_LINE: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tag {
    Partial,
    Full,
}

/// The bytes of one entry, without its message.
fn entry_overhead(timestamp: &str, stream: Stream) -> usize {
    // "<ts> <stream> <tag> " and the newline.
    timestamp.len() + stream.as_str().len() + 5
}

/// Appends one log entry to `out` (one buffer per batch: a flood of short lines
/// costs no allocation per line).
pub fn append_entry(out: &mut Vec<u8>, timestamp: &str, stream: Stream, tag: Tag, msg: &[u8]) {
    let tag = match tag {
        Tag::Partial => b'P',
        Tag::Full => b'F',
    };
    out.extend_from_slice(timestamp.as_bytes());
    out.push(b' ');
    out.extend_from_slice(stream.as_str().as_bytes());
    out.extend_from_slice(&[b' ', tag, b' ']);
    out.extend_from_slice(msg);
    out.push(b'\n');
}

/// Stream bytes dropped because a log reached its cap, since vesseld started.
static DROPPED_BYTES: AtomicU64 = AtomicU64::new(0);

/// Stream bytes dropped by every capped log (the /metrics counter).
pub fn dropped_bytes() -> u64 {
    DROPPED_BYTES.load(Ordering::Relaxed)
}

/// Counts stream bytes a pump dropped without handing them to a capped log.
pub fn count_dropped(bytes: u64) {
    DROPPED_BYTES.fetch_add(bytes, Ordering::Relaxed);
}

/// The stream bytes an entry stands for (its message, and the newline of a full one).
fn stream_bytes(tag: Tag, msg: &[u8]) -> u64 {
    msg.len() as u64 + u64::from(tag == Tag::Full)
}

/// Cuts a byte stream into log entries, keeping an unfinished line between feeds.
/// Linear in the bytes fed: each byte is scanned and copied once, and the kept
/// line is always shorter than [`MAX_LINE`], whatever the guest sends.
#[derive(Debug, Default)]
pub struct LineSplitter {
    buf: Vec<u8>,
}

impl LineSplitter {
    /// Entries completed by `data`.
    pub fn feed(&mut self, data: &[u8]) -> Vec<(Tag, Vec<u8>)> {
        let mut out = Vec::new();
        let mut rest = data;
        while !rest.is_empty() {
            // Invariant: buf holds less than MAX_LINE bytes.
            let room = MAX_LINE - self.buf.len();
            let window = &rest[..rest.len().min(room)];
            if let Some(pos) = memchr::memchr(b'\n', window) {
                self.buf.extend_from_slice(&window[..pos]);
                out.push((Tag::Full, std::mem::take(&mut self.buf)));
                rest = &rest[pos + 1..];
            } else if window.len() == room {
                self.buf.extend_from_slice(window);
                out.push((Tag::Partial, std::mem::take(&mut self.buf)));
                rest = &rest[room..];
            } else {
                self.buf.extend_from_slice(window);
                rest = &[];
            }
        }
        out
    }

    /// Bytes of the unfinished line held.
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.buf.len()
    }

    /// Takes `data` as [`LineSplitter::feed`] would, without making entries: what
    /// `feed` would have completed is dropped. Returns the bytes it accounts for
    /// (as [`consumed`](crate::outcursor::consumed) of `feed`'s entries would).
    pub fn discard(&mut self, data: &[u8]) -> u64 {
        let held = self.buf.len();
        // The unterminated run at the end (with what is held when `data` ends no
        // line): `feed` cuts it into MAX_LINE partials and keeps the remainder.
        let (run_in_data, run) = match memchr::memrchr(b'\n', data) {
            Some(pos) => (data.len() - pos - 1, data.len() - pos - 1),
            None => (data.len(), held + data.len()),
        };
        let keep = run % MAX_LINE;
        let consumed = (held + data.len() - keep) as u64;
        if keep <= run_in_data {
            self.buf.clear();
            self.buf.extend_from_slice(&data[data.len() - keep..]);
        } else {
            // No newline in `data` and the remainder reaches into what was held.
            let from_held = keep - data.len();
            self.buf.drain(..held - from_held);
            self.buf.extend_from_slice(data);
        }
        consumed
    }

    /// The unfinished last line at end of stream, as a full entry.
    pub fn finish(&mut self) -> Option<(Tag, Vec<u8>)> {
        (!self.buf.is_empty()).then(|| (Tag::Full, std::mem::take(&mut self.buf)))
    }
}

/// An open CRI log file shared by a container's stdout and stderr pumps.
#[derive(Debug)]
pub struct CriLog {
    path: PathBuf,
    /// Most bytes one file may hold (None: no cap).
    max_bytes: Option<u64>,
    file: Mutex<OpenLog>,
}

#[derive(Debug)]
struct OpenLog {
    file: File,
    /// Bytes the file holds (its size at open, plus what was written since).
    written: u64,
    /// The cap was reached: the marker is written, output is dropped.
    capped: bool,
}

impl OpenLog {
    fn open(path: &Path) -> std::io::Result<Self> {
        let file = open_append(path)?;
        let written = file.metadata()?.len();
        Ok(OpenLog {
            file,
            written,
            capped: false,
        })
    }
}

fn open_append(path: &Path) -> std::io::Result<File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // Readable by the log reader's group (the kubelet runs as root), not the world.
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
}

impl CriLog {
    /// Opens (creating) the log at `path`, holding at most `max_bytes` per file.
    pub fn open(path: &Path, max_bytes: Option<u64>) -> std::io::Result<Self> {
        Ok(CriLog {
            path: path.to_owned(),
            max_bytes,
            file: Mutex::new(OpenLog::open(path)?),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True once the file reached its cap (until a reopen): output for it may be
    /// dropped unread.
    pub fn is_capped(&self) -> bool {
        self.file.lock().unwrap_or_else(|p| p.into_inner()).capped
    }

    /// Reopens the path (after the kubelet rotated the file away).
    pub fn reopen(&self) -> std::io::Result<()> {
        let fresh = OpenLog::open(&self.path)?;
        *self.file.lock().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(())
    }

    /// Writes entries with the current time; one write per batch keeps a stream's
    /// entries together. Entries past the cap are dropped (and counted), the first
    /// time behind one marker entry.
    pub fn write(&self, stream: Stream, entries: &[(Tag, Vec<u8>)]) -> std::io::Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut open = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if open.capped {
            let dropped: u64 = entries.iter().map(|(t, m)| stream_bytes(*t, m)).sum();
            DROPPED_BYTES.fetch_add(dropped, Ordering::Relaxed);
            return Ok(());
        }
        let ts = Utc::now().to_rfc3339_opts(SecondsFormat::Nanos, true);
        let overhead = entry_overhead(&ts, stream) as u64;
        let room = self
            .max_bytes
            .map_or(u64::MAX, |max| max.saturating_sub(open.written));
        let mut bytes = Vec::new();
        let mut kept = 0;
        for (tag, msg) in entries {
            if (bytes.len() as u64).saturating_add(overhead + msg.len() as u64) > room {
                break;
            }
            append_entry(&mut bytes, &ts, stream, *tag, msg);
            kept += 1;
        }
        if kept < entries.len() {
            let dropped: u64 = entries[kept..]
                .iter()
                .map(|(t, m)| stream_bytes(*t, m))
                .sum();
            DROPPED_BYTES.fetch_add(dropped, Ordering::Relaxed);
            let marker = format!(
                "vesseld: this log reached [containers] log_size_max ({} bytes); output \
                 is dropped until the log is rotated",
                self.max_bytes.unwrap_or(0)
            );
            append_entry(&mut bytes, &ts, stream, Tag::Full, marker.as_bytes());
            open.capped = true;
        }
        open.written += bytes.len() as u64;
        open.file.write_all(&bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_carry_over() {
        let mut s = LineSplitter::default();
        assert_eq!(s.feed(b"one\ntw"), vec![(Tag::Full, b"one".to_vec())]);
        assert_eq!(
            s.feed(b"o\n\nthree"),
            vec![(Tag::Full, b"two".to_vec()), (Tag::Full, Vec::new())]
        );
        assert_eq!(s.finish(), Some((Tag::Full, b"three".to_vec())));
        assert_eq!(s.finish(), None);
    }

    #[test]
    fn long_lines_become_partials() {
        let mut s = LineSplitter::default();
        let mut line = vec![b'a'; MAX_LINE * 2 + 100];
        line.push(b'\n');
        // Fed in odd chunks, as the agent's stream may deliver it.
        let mut out = Vec::new();
        for chunk in line.chunks(5000) {
            out.extend(s.feed(chunk));
        }
        let tags: Vec<Tag> = out.iter().map(|(t, _)| *t).collect();
        assert_eq!(tags, vec![Tag::Partial, Tag::Partial, Tag::Full]);
        assert_eq!(out[0].1.len(), MAX_LINE);
        assert_eq!(out[1].1.len(), MAX_LINE);
        assert_eq!(out[2].1.len(), 100);
        // A line of exactly MAX_LINE fills an entry, then ends with an empty full one.
        let mut exact = vec![b'b'; MAX_LINE];
        exact.push(b'\n');
        let out = s.feed(&exact);
        assert_eq!(out.len(), 2);
        assert_eq!((out[0].0, out[0].1.len()), (Tag::Partial, MAX_LINE));
        assert_eq!(out[1], (Tag::Full, Vec::new()));
    }

    #[test]
    fn one_huge_chunk_is_split_in_one_pass() {
        // 64 MiB without a newline, then lines: the kept buffer never grows past
        // MAX_LINE, and the entries account for every byte.
        let mut s = LineSplitter::default();
        let data = vec![b'x'; 64 << 20];
        let out = s.feed(&data);
        assert_eq!(out.len(), (64 << 20) / MAX_LINE);
        assert!(out
            .iter()
            .all(|(t, m)| *t == Tag::Partial && m.len() == MAX_LINE));
        assert!(s.buf.capacity() <= MAX_LINE * 2);
        let out = s.feed(b"a\nb\n");
        assert_eq!(
            out,
            vec![(Tag::Full, b"a".to_vec()), (Tag::Full, b"b".to_vec())]
        );
    }

    /// `discard` accounts for exactly what `feed` would, and leaves the same state.
    #[test]
    fn discard_matches_feed() {
        let mut rng = 7u64;
        let mut next = || {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (rng >> 33) as usize
        };
        for _ in 0..300 {
            let (mut fed, mut dropped) = (LineSplitter::default(), LineSplitter::default());
            for _ in 0..6 {
                let len = next() % (MAX_LINE * 3);
                let nl_every = 1 + next() % (MAX_LINE * 2);
                let data: Vec<u8> = (0..len)
                    .map(|i| {
                        if next() % nl_every == 0 || i % 100_000 == 99_999 {
                            b'\n'
                        } else {
                            b'x'
                        }
                    })
                    .collect();
                let want = crate::outcursor::consumed(&fed.feed(&data));
                assert_eq!(dropped.discard(&data), want);
                assert_eq!(dropped.buf, fed.buf);
            }
        }
    }

    #[test]
    fn a_capped_log_drops_behind_one_marker_until_reopened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c/0.log");
        let log = CriLog::open(&path, Some(1000)).unwrap();
        let before = dropped_bytes();
        // 100 empty lines: ~41 bytes of log each, so about 24 fit.
        let flood = vec![(Tag::Full, Vec::new()); 100];
        log.write(Stream::Stdout, &flood).unwrap();
        log.write(Stream::Stderr, &[(Tag::Full, b"later".to_vec())])
            .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let kept = lines.len() - 1;
        assert!((20..30).contains(&kept), "{kept}");
        assert!(lines[..kept].iter().all(|l| l.ends_with(" stdout F ")));
        assert!(
            lines[kept].contains("log_size_max (1000 bytes)"),
            "{}",
            lines[kept]
        );
        assert!(text.len() <= 1000 + 200, "{}", text.len());
        // Newlines dropped from the flood, plus "later\n".
        assert_eq!(dropped_bytes() - before, (100 - kept) as u64 + 6);
        // Rotation gives a fresh budget.
        std::fs::rename(&path, dir.path().join("rotated")).unwrap();
        log.reopen().unwrap();
        log.write(Stream::Stdout, &[(Tag::Full, b"after".to_vec())])
            .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.ends_with(" stdout F after\n"), "{text}");
        // A reopened file that is already full (a restart) keeps its budget spent.
        let again = CriLog::open(&dir.path().join("rotated"), Some(1000)).unwrap();
        again
            .write(Stream::Stdout, &[(Tag::Full, b"x".to_vec())])
            .unwrap();
        let rotated = std::fs::read_to_string(dir.path().join("rotated")).unwrap();
        assert_eq!(
            rotated
                .lines()
                .filter(|l| l.contains("log_size_max"))
                .count(),
            2
        );
    }

    #[test]
    fn file_format_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pod/c/0.log");
        let log = CriLog::open(&path, None).unwrap();
        log.write(
            Stream::Stdout,
            &[(Tag::Partial, b"he".to_vec()), (Tag::Full, b"llo".to_vec())],
        )
        .unwrap();
        log.write(Stream::Stderr, &[(Tag::Full, b"oops".to_vec())])
            .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        for (line, want) in lines
            .iter()
            .zip([" stdout P he", " stdout F llo", " stderr F oops"])
        {
            let (ts, rest) = line.split_at(line.find(' ').unwrap());
            assert_eq!(rest, want);
            let parsed = chrono::DateTime::parse_from_rfc3339(ts).unwrap();
            assert!(ts.ends_with('Z') && ts.len() == "2006-01-02T15:04:05.999999999Z".len());
            assert!(parsed.timestamp() > 0);
        }
        // Rotation: the kubelet renames the file, then asks for a reopen.
        std::fs::rename(&path, dir.path().join("rotated")).unwrap();
        log.reopen().unwrap();
        log.write(Stream::Stdout, &[(Tag::Full, b"after".to_vec())])
            .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.ends_with(" stdout F after\n"), "{text}");
        assert_eq!(text.lines().count(), 1);
    }
}

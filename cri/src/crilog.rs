//! Container log files in the CRI format the kubelet reads:
//! `<RFC3339Nano> <stdout|stderr> <P|F> <message>\n`, one entry per line, lines longer
//! than 16 KiB split into partial (`P`) entries ended by a full (`F`) one.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
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

/// One log entry as bytes.
pub fn format_entry(timestamp: &str, stream: Stream, tag: Tag, msg: &[u8]) -> Vec<u8> {
    let tag = match tag {
        Tag::Partial => "P",
        Tag::Full => "F",
    };
    let mut out = Vec::with_capacity(timestamp.len() + msg.len() + 12);
    out.extend_from_slice(timestamp.as_bytes());
    out.push(b' ');
    out.extend_from_slice(stream.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(tag.as_bytes());
    out.push(b' ');
    out.extend_from_slice(msg);
    out.push(b'\n');
    out
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
            if let Some(pos) = window.iter().position(|&b| b == b'\n') {
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

    /// The unfinished last line at end of stream, as a full entry.
    pub fn finish(&mut self) -> Option<(Tag, Vec<u8>)> {
        (!self.buf.is_empty()).then(|| (Tag::Full, std::mem::take(&mut self.buf)))
    }
}

/// An open CRI log file shared by a container's stdout and stderr pumps.
#[derive(Debug)]
pub struct CriLog {
    path: PathBuf,
    file: Mutex<File>,
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
    pub fn open(path: &Path) -> std::io::Result<Self> {
        Ok(CriLog {
            path: path.to_owned(),
            file: Mutex::new(open_append(path)?),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reopens the path (after the kubelet rotated the file away).
    pub fn reopen(&self) -> std::io::Result<()> {
        let fresh = open_append(&self.path)?;
        *self.file.lock().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(())
    }

    /// Writes entries with the current time; one write per batch keeps a stream's
    /// entries together.
    pub fn write(&self, stream: Stream, entries: &[(Tag, Vec<u8>)]) -> std::io::Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let ts = Utc::now().to_rfc3339_opts(SecondsFormat::Nanos, true);
        let mut bytes = Vec::new();
        for (tag, msg) in entries {
            bytes.extend(format_entry(&ts, stream, *tag, msg));
        }
        self.file
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .write_all(&bytes)
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

    #[test]
    fn file_format_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pod/c/0.log");
        let log = CriLog::open(&path).unwrap();
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

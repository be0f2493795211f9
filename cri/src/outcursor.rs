//! Where a log pump stands in one output stream of the agent, and what each chunk the
//! agent sends does to it. Pure, so that every chunk a hostile guest can send is
//! fuzzed: offsets are the guest's to choose, so all arithmetic on them is checked.

use crate::crilog::{LineSplitter, Tag};

/// The stream position of a pump: `done` is what the log holds (the offset stored and
/// acknowledged), `next` what was fed to the line splitter. `done <= next`, and the
/// difference is the unfinished line held in the splitter.
#[derive(Debug, Default)]
pub struct OutputCursor {
    done: u64,
    next: u64,
    lines: LineSplitter,
}

/// What one chunk produced.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Fed {
    /// Bytes the agent no longer has (the chunk starts past what was read).
    pub lost: u64,
    /// The unfinished line cut short by that gap, to log without moving `done`.
    pub cut: Option<(Tag, Vec<u8>)>,
    /// Completed entries; `done` now counts them.
    pub entries: Vec<(Tag, Vec<u8>)>,
}

/// A chunk whose end lies past the largest offset: no honest agent sends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("output chunk at offset {offset} with {len} bytes ends past the largest offset")]
pub struct BadChunk {
    pub offset: u64,
    pub len: usize,
}

impl OutputCursor {
    /// A cursor for a stream whose log holds everything below `done`.
    pub fn new(done: u64) -> Self {
        OutputCursor {
            done,
            next: done,
            lines: LineSplitter::default(),
        }
    }

    /// What the log holds.
    pub fn done(&self) -> u64 {
        self.done
    }

    /// Bytes of the unfinished line held.
    #[cfg(test)]
    fn lines_held(&self) -> usize {
        self.lines.held()
    }

    /// Moves the cursor over the chunk at `offset` of `len` bytes: a gap before it
    /// is skipped (returned as a [`Fed`] without entries: the bytes lost and the
    /// unfinished line it cuts), and what of the chunk was read already (a replay
    /// after a reopen) is skipped too (returned: where the new bytes start).
    fn advance(&mut self, offset: u64, len: usize) -> Result<(Fed, usize), BadChunk> {
        let end = offset
            .checked_add(len as u64)
            .ok_or(BadChunk { offset, len })?;
        let mut gap = Fed::default();
        if offset > self.next {
            gap.lost = offset - self.next;
            gap.cut = self.lines.finish();
            self.done = offset;
            self.next = offset;
        }
        // offset <= next here, and end fits: the skip stays within the chunk.
        let skip = (self.next - offset).min(len as u64) as usize;
        self.next = self.next.max(end);
        Ok((gap, skip))
    }

    /// Takes the chunk `data` at stream offset `offset`. Bytes already read (a replay
    /// after a reopen) are skipped; a gap is reported as lost and skipped over.
    pub fn feed(&mut self, offset: u64, data: &[u8]) -> Result<Fed, BadChunk> {
        let (mut fed, skip) = self.advance(offset, data.len())?;
        fed.entries = self.lines.feed(&data[skip..]);
        self.done += consumed(&fed.entries);
        Ok(fed)
    }

    /// [`OutputCursor::feed`] for a log that holds nothing more (capped): the chunk
    /// is accounted for without making entries, so a flood costs a scan per chunk,
    /// not work per line. Returns the stream bytes dropped (the cut line included).
    pub fn discard(&mut self, offset: u64, data: &[u8]) -> Result<u64, BadChunk> {
        let (gap, skip) = self.advance(offset, data.len())?;
        let consumed = self.lines.discard(&data[skip..]);
        self.done += consumed;
        Ok(gap.cut.map_or(0, |(_, m)| m.len() as u64) + consumed)
    }

    /// The end of the stream: the unfinished last line is logged as a full one.
    pub fn finish(&mut self) -> Option<(Tag, Vec<u8>)> {
        self.done = self.next;
        self.lines.finish()
    }
}

/// Bytes of the stream that a batch of entries accounts for.
pub fn consumed(entries: &[(Tag, Vec<u8>)]) -> u64 {
    entries
        .iter()
        .map(|(tag, msg)| msg.len() as u64 + u64::from(*tag == Tag::Full))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crilog::MAX_LINE;
    use vessel_fuzz::Input;

    /// What the log shows for `entries`, as stream bytes.
    fn logged(out: &mut Vec<u8>, entries: &[(Tag, Vec<u8>)]) {
        for (tag, msg) in entries {
            out.extend_from_slice(msg);
            if *tag == Tag::Full {
                out.push(b'\n');
            }
        }
    }

    #[test]
    fn replays_are_skipped_and_gaps_reported() {
        let mut c = OutputCursor::new(0);
        let f = c.feed(0, b"one\ntw").unwrap();
        assert_eq!(f.entries, vec![(Tag::Full, b"one".to_vec())]);
        assert_eq!(c.done(), 4);
        // A reopen replays from `done`: "tw" again, then more.
        let f = c.feed(4, b"two\nthr").unwrap();
        assert_eq!(f.entries, vec![(Tag::Full, b"two".to_vec())]);
        assert_eq!(c.done(), 8);
        // The agent dropped bytes 11..20: the cut line is logged, done jumps.
        let f = c.feed(20, b"x\n").unwrap();
        assert_eq!(f.lost, 9);
        assert_eq!(f.cut, Some((Tag::Full, b"thr".to_vec())));
        assert_eq!(f.entries, vec![(Tag::Full, b"x".to_vec())]);
        assert_eq!(c.done(), 22);
        assert_eq!(c.finish(), None);
    }

    #[test]
    fn chunks_past_the_largest_offset_are_refused() {
        let mut c = OutputCursor::new(0);
        assert!(c.feed(u64::MAX, b"ab").is_err());
        assert!(c.feed(u64::MAX - 1, b"a").is_ok());
        assert_eq!(c.done(), u64::MAX - 1, "past the gap, no line yet");
        assert_eq!(c.finish(), Some((Tag::Full, b"a".to_vec())));
        assert_eq!(c.done(), u64::MAX);
    }

    /// Chunks a guest may send, decoded from fuzz bytes: a one-byte length-ish tag,
    /// an offset (absolute or relative to what was sent), then the data.
    fn chunks(data: &[u8]) -> Vec<(u64, Vec<u8>)> {
        let mut input = Input::new(data);
        let mut out = Vec::new();
        while !input.is_empty() && out.len() < 64 {
            let kind = input.u8();
            let offset = if kind & 1 == 0 {
                input.u64()
            } else {
                u64::from(input.u8())
            };
            let len = usize::from(kind >> 1) * 3;
            out.push((offset, input.bytes(len).to_vec()));
        }
        out
    }

    /// Hostile chunks never panic, never move `done` backwards or past what was read,
    /// and never log more bytes than were sent or an entry longer than `MAX_LINE`.
    /// An honest agent's stream (replays from any earlier offset, in any cut) is
    /// logged byte for byte.
    #[test]
    fn fuzz_output_chunks() {
        let seeds: Vec<Vec<u8>> = vec![
            b"\x08\x00hello\nwor\x09\x03lo\nworld\n".to_vec(),
            [
                &[0x20u8][..],
                &u64::MAX.to_le_bytes(),
                b"abc\ndef\nghij\n",
                &[0x41, 0],
                &[b'z'; 96],
            ]
            .concat(),
            b"\x7f\x01\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n".to_vec(),
        ];
        let mut refused = 0u64;
        vessel_fuzz::fuzz("output chunks", &seeds, |data| {
            // Hostile: offsets as the guest likes.
            let mut c = OutputCursor::new(0);
            let (mut sent, mut log_bytes) = (0u64, 0u64);
            for (offset, bytes) in chunks(data) {
                let before = c.done();
                match c.feed(offset, &bytes) {
                    Ok(fed) => {
                        assert!(c.done() >= before, "done moved back");
                        assert!(c.done() <= c.next);
                        for (_, m) in fed.cut.iter().chain(&fed.entries) {
                            assert!(m.len() <= MAX_LINE);
                            log_bytes += m.len() as u64;
                        }
                        sent += bytes.len() as u64;
                    }
                    Err(e) => {
                        refused += 1;
                        assert!(e.offset.checked_add(e.len as u64).is_none());
                    }
                }
            }
            let last = c.finish();
            log_bytes += last.map_or(0, |(_, m)| m.len() as u64);
            assert!(log_bytes <= sent, "logged {log_bytes} of {sent} bytes sent");

            // The same hostile chunks to a capped log's cursor: done never moves
            // back nor past what was read, and what is dropped was sent.
            let mut c = OutputCursor::new(0);
            let mut dropped = 0u64;
            for (offset, bytes) in chunks(data) {
                let before = c.done();
                if let Ok(n) = c.discard(offset, &bytes) {
                    assert!(c.done() >= before && c.done() <= c.next);
                    assert!(c.lines_held() < MAX_LINE);
                    dropped += n;
                }
            }
            assert!(dropped <= sent, "dropped {dropped} of {sent} bytes sent");

            // Honest: the input is the stream; the chunk decoder picks how it is cut
            // and from where each reopen replays (never past what was logged).
            let stream = data;
            let mut c = OutputCursor::new(0);
            let mut log = Vec::new();
            let mut pos = 0usize;
            for (i, (hint, _)) in chunks(data).into_iter().enumerate() {
                if pos >= stream.len() {
                    break;
                }
                let done = c.done() as usize;
                // A replay starts between what the log holds and what was sent.
                let start = done + (hint as usize) % (pos - done + 1);
                let len = 1 + (hint as usize / 7 + i) % 200;
                let end = (start + len).min(stream.len());
                let fed = c.feed(start as u64, &stream[start..end]).unwrap();
                assert_eq!(fed.lost, 0);
                logged(&mut log, &fed.entries);
                pos = pos.max(end);
            }
            let fed = c.feed(pos as u64, &stream[pos..]).unwrap();
            logged(&mut log, &fed.entries);
            let tail = c.finish();
            assert_eq!(c.done(), stream.len() as u64);
            if let Some((_, m)) = tail {
                log.extend_from_slice(&m);
                // The unfinished last line is logged without a newline of its own.
                assert!(!stream.ends_with(b"\n"));
            }
            assert_eq!(log, stream, "the log holds the stream");
        });
        eprintln!("fuzz output chunks: {refused} chunks refused");
    }
}

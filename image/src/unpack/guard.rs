//! Caps on the tar records the `tar` crate reads whole into memory.
//!
//! `tar` buffers a GNU long name (`L`), a GNU long link name (`K`) and a PAX
//! extended header (`x`) completely, however large the size the header declares, and
//! collects the blocks of GNU sparse extension headers into a list. A layer of a few
//! MiB of gzip can declare gigabytes there. [`HeaderGuard`] sits between the
//! (decompressed) stream and `tar`: it follows the archive's block structure the way
//! `tar` does, looks at every 512-byte header before `tar` has all of it, and fails
//! the read when a record that would be buffered is larger than [`MAX_META_RECORD`].
//! `tar` never gets the header, so it never allocates for it.
//!
//! The framing mirrors `tar` 0.4.46 exactly (sizes in octal or base-256, a PAX `size`
//! record overriding the size of the member's own header, sparse extension blocks
//! between a sparse header and its data), so that the guard and `tar` agree on where
//! each header is; the unpack tests check that agreement when `tar` is upgraded. Where `tar` would fail on a header (bad size
//! field), the guard stops looking and lets `tar` report it.

use std::io::{self, Read};

/// Largest GNU long name/link or PAX record accepted, as Go's `archive/tar` allows.
pub(crate) const MAX_META_RECORD: u64 = 1 << 20;
/// Largest run of GNU sparse extension blocks accepted (1 MiB of them).
pub(crate) const MAX_SPARSE_EXT_BLOCKS: u64 = MAX_META_RECORD / BLOCK;
/// Largest real size of a GNU sparse file: its holes cost no layer bytes, and
/// although they are written as holes, they are still read (as zeros) through `tar`.
pub(crate) const MAX_SPARSE_REAL_SIZE: u64 = 64 << 30;

const BLOCK: u64 = 512;
const BLOCK_LEN: usize = 512;

/// A record of the layer exceeding its cap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordTooLarge {
    /// What the record is ("GNU long name", "PAX extended header", ...).
    pub what: &'static str,
    /// The size the layer declares (bytes; for sparse maps, extension blocks so far).
    pub size: u64,
    /// The cap it exceeds, in the same unit.
    pub limit: u64,
    /// Offset of the header in the uncompressed tar stream.
    pub offset: u64,
}

impl std::fmt::Display for RecordTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} at tar offset {} declares {} bytes, over the limit of {} bytes",
            self.what, self.offset, self.size, self.limit
        )
    }
}

impl std::error::Error for RecordTooLarge {}

/// Where the next byte of the stream belongs.
#[derive(Debug, Clone, Copy)]
enum State {
    /// Inside a 512-byte header block.
    Header,
    /// Inside a GNU sparse extension block; `data` is the entry's data size after it.
    SparseExt { data: u64, blocks: u64 },
    /// Inside an entry's data: `left` bytes to the next header (padding included), of
    /// which the first `capture` are kept (a PAX record the next header depends on).
    Data { left: u64, capture: u64 },
    /// After the end-of-archive block: `tar` reads no further headers.
    Done,
}

/// A reader that refuses tar records whose buffering would be unbounded.
pub(crate) struct HeaderGuard<R> {
    inner: R,
    state: State,
    /// Offset of the next byte in the uncompressed stream.
    pos: u64,
    /// The header (or sparse extension) block being assembled.
    block: [u8; BLOCK_LEN],
    filled: usize,
    /// Offset of the block being assembled.
    block_pos: u64,
    /// PAX records of the member being described (they apply to its own header).
    pax: Option<Vec<u8>>,
    /// The PAX record being read.
    capture: Option<Vec<u8>>,
    violation: Option<RecordTooLarge>,
}

impl<R: Read> HeaderGuard<R> {
    pub(crate) fn new(inner: R) -> Self {
        Self {
            inner,
            state: State::Header,
            pos: 0,
            block: [0; BLOCK_LEN],
            filled: 0,
            block_pos: 0,
            pax: None,
            capture: None,
            violation: None,
        }
    }

    /// The cap that was exceeded, if one was.
    pub(crate) fn violation(&self) -> Option<&RecordTooLarge> {
        self.violation.as_ref()
    }

    /// Follows the archive structure over `bytes`, the next bytes of the stream.
    fn scan(&mut self, mut bytes: &[u8]) -> Result<(), RecordTooLarge> {
        while !bytes.is_empty() {
            match self.state {
                State::Done => return Ok(()),
                State::Data { left, capture } => {
                    let n = (bytes.len() as u64).min(left);
                    let keep = n.min(capture) as usize;
                    if keep > 0 {
                        if let Some(c) = self.capture.as_mut() {
                            c.extend_from_slice(&bytes[..keep]);
                        }
                    }
                    let (left, capture) = (left - n, capture - keep as u64);
                    bytes = &bytes[n as usize..];
                    self.pos += n;
                    if capture == 0 {
                        if let Some(c) = self.capture.take() {
                            self.pax = Some(c);
                        }
                    }
                    self.state = if left == 0 {
                        State::Header
                    } else {
                        State::Data { left, capture }
                    };
                }
                State::Header | State::SparseExt { .. } => {
                    if self.filled == 0 {
                        self.block_pos = self.pos;
                    }
                    let n = bytes.len().min(BLOCK_LEN - self.filled);
                    self.block[self.filled..self.filled + n].copy_from_slice(&bytes[..n]);
                    self.filled += n;
                    self.pos += n as u64;
                    bytes = &bytes[n..];
                    if self.filled == BLOCK_LEN {
                        self.filled = 0;
                        self.state = match self.state {
                            State::SparseExt { data, blocks } => self.sparse_ext(data, blocks)?,
                            _ => self.header()?,
                        };
                    }
                }
            }
        }
        Ok(())
    }

    /// A complete header block: checks it and returns what follows it.
    fn header(&mut self) -> Result<State, RecordTooLarge> {
        let b = &self.block;
        if b.iter().all(|&x| x == 0) {
            // `tar` (not ignoring zeros) ends the archive here.
            return Ok(State::Done);
        }
        let Some(mut size) = num_field(&b[124..136]) else {
            return Ok(State::Done); // `tar` fails on this header.
        };
        let kind = b[156];
        // A PAX `size` overrides the size of the member's own header, not that of
        // extension headers between (`tar` >= 0.4.46).
        if !matches!(kind, b'L' | b'K' | b'x' | b'g') {
            if let Some(pax_size) = self.pax.as_deref().and_then(pax_size) {
                size = pax_size;
            }
        }
        let magic = &b[257..263];
        let version = &b[263..265];
        let gnu = magic == b"ustar " && version == b" \0";
        let recognized = gnu || (magic == b"ustar\0" && version == b"00");
        let too_large = |what| RecordTooLarge {
            what,
            size,
            limit: MAX_META_RECORD,
            offset: self.block_pos,
        };
        let meta = match kind {
            b'L' if recognized => Some("GNU long name"),
            b'K' if recognized => Some("GNU long link name"),
            b'x' if recognized => Some("PAX extended header"),
            _ => None,
        };
        if let Some(what) = meta {
            if size > MAX_META_RECORD {
                return Err(too_large(what));
            }
            let capture = if kind == b'x' {
                self.capture = Some(Vec::with_capacity(size as usize));
                size
            } else {
                0
            };
            if capture == 0 && kind == b'x' {
                self.pax = self.capture.take();
            }
            return Ok(data_state(size, capture));
        }
        // The member's own header: its PAX records are used up.
        self.pax = None;
        if kind == b'g' && size > MAX_META_RECORD {
            // `tar` hands global headers over as entries and the unpacker skips them,
            // but no legitimate one is this large (Go refuses it too).
            return Err(too_large("PAX global header"));
        }
        if kind == b'S' && gnu {
            if let Some(real) = num_field(&b[483..495]).filter(|&r| r > MAX_SPARSE_REAL_SIZE) {
                return Err(RecordTooLarge {
                    what: "GNU sparse file",
                    size: real,
                    limit: MAX_SPARSE_REAL_SIZE,
                    offset: self.block_pos,
                });
            }
        }
        if kind == b'S' && gnu && b[482] == 1 {
            return Ok(State::SparseExt {
                data: size,
                blocks: 0,
            });
        }
        Ok(data_state(size, 0))
    }

    /// A complete GNU sparse extension block.
    fn sparse_ext(&mut self, data: u64, blocks: u64) -> Result<State, RecordTooLarge> {
        let blocks = blocks + 1;
        if blocks > MAX_SPARSE_EXT_BLOCKS {
            return Err(RecordTooLarge {
                what: "GNU sparse map",
                size: blocks * BLOCK,
                limit: MAX_SPARSE_EXT_BLOCKS * BLOCK,
                offset: self.block_pos,
            });
        }
        if self.block[504] == 1 {
            Ok(State::SparseExt { data, blocks })
        } else {
            Ok(data_state(data, 0))
        }
    }
}

/// The state after a header announcing `size` bytes of data.
fn data_state(size: u64, capture: u64) -> State {
    // `tar` rounds up to whole blocks; a size near u64::MAX makes it fail.
    match size.checked_add(BLOCK - 1) {
        Some(s) if s & !(BLOCK - 1) == 0 => State::Header,
        Some(s) => State::Data {
            left: s & !(BLOCK - 1),
            capture,
        },
        None => State::Done,
    }
}

/// A numeric header field as `tar` reads it: base-256 when the high bit of the first
/// byte is set (the last 8 bytes count), else octal text up to the first NUL, trimmed.
fn num_field(field: &[u8]) -> Option<u64> {
    if field[0] & 0x80 != 0 {
        let skip = if field.len() == 8 { 1 } else { field.len() - 8 };
        let mut v: u64 = if field.len() == 8 {
            u64::from(field[0] ^ 0x80)
        } else {
            0
        };
        for &x in &field[skip..] {
            v = (v << 8) | u64::from(x);
        }
        return Some(v);
    }
    let end = field.iter().position(|&x| x == 0).unwrap_or(field.len());
    let text = std::str::from_utf8(&field[..end]).ok()?;
    u64::from_str_radix(text.trim(), 8).ok()
}

/// The PAX `size` record as `tar` finds it: the first `size` key of well-formed
/// `"<len> <key>=<value>\n"` records, none once a record is malformed.
fn pax_size(records: &[u8]) -> Option<u64> {
    for line in records.split(|&b| b == b'\n') {
        if line.is_empty() {
            return None;
        }
        let sp = line.iter().position(|&b| b == b' ')?;
        let len: usize = std::str::from_utf8(&line[..sp]).ok()?.parse().ok()?;
        if line.len() + 1 != len {
            return None;
        }
        let kv = &line[sp + 1..];
        let eq = kv.iter().position(|&b| b == b'=')?;
        if &kv[..eq] == b"size" {
            return std::str::from_utf8(&kv[eq + 1..]).ok()?.parse().ok();
        }
    }
    None
}

impl<R: Read> Read for HeaderGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(v) = &self.violation {
            return Err(io::Error::new(io::ErrorKind::InvalidData, v.clone()));
        }
        let n = self.inner.read(buf)?;
        if let Err(v) = self.scan(&buf[..n]) {
            self.violation = Some(v.clone());
            return Err(io::Error::new(io::ErrorKind::InvalidData, v));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_fields_parse_like_tar() {
        assert_eq!(num_field(b"00000001750\0"), Some(1000));
        assert_eq!(num_field(b"  1750 \0\0\0\0\0"), Some(1000));
        assert_eq!(num_field(b"\0\0\0\0\0\0\0\0\0\0\0\0"), None);
        assert_eq!(num_field(b"0000000175x\0"), None);
        let mut b256 = [0u8; 12];
        b256[4..].copy_from_slice(&(3u64 << 29).to_be_bytes());
        b256[0] = 0x80;
        assert_eq!(num_field(&b256), Some(3 << 29));
    }

    #[test]
    fn pax_size_is_the_first_well_formed_size_record() {
        assert_eq!(pax_size(b"12 size=100\n"), Some(100));
        assert_eq!(pax_size(b"11 path=ab\n12 size=100\n"), Some(100));
        // A malformed record (wrong length) ends the search, as in `tar`.
        assert_eq!(pax_size(b"99 path=ab\n12 size=100\n"), None);
        assert_eq!(pax_size(b"12 size=1x0\n"), None);
        assert_eq!(pax_size(b""), None);
    }
}

//! Header blocks: name/value pairs, zlib-compressed with one context per direction
//! for the whole session (so blocks must be (de)compressed in frame order) and the
//! SPDY dictionary. Decompression is bounded: a peer cannot make us inflate a small
//! frame into a large allocation.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::dictionary;

/// Largest header block accepted after decompression.
pub const MAX_HEADER_BLOCK: usize = 16 * 1024;
/// Most name/value pairs accepted in one block.
pub const MAX_HEADER_PAIRS: usize = 64;

/// Header pairs in order; names are lower case on the wire. A value with several
/// parts keeps them NUL-separated, as SPDY sends them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(pub Vec<(String, String)>);

impl Headers {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with(mut self, name: &str, value: &str) -> Self {
        self.0.push((name.to_ascii_lowercase(), value.to_owned()));
        self
    }

    /// The first value of `name` (case-insensitive).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = (self.0.len() as u32).to_be_bytes().to_vec();
        for (n, v) in &self.0 {
            for s in [n, v] {
                out.extend_from_slice(&(s.len() as u32).to_be_bytes());
                out.extend_from_slice(s.as_bytes());
            }
        }
        out
    }

    fn decode(b: &[u8]) -> Result<Self, HeaderBlockError> {
        let bad = HeaderBlockError::Malformed;
        let mut at = 0usize;
        let mut take = |n: usize| -> Result<&[u8], HeaderBlockError> {
            let s = b.get(at..at.checked_add(n).ok_or(bad)?).ok_or(bad)?;
            at += n;
            Ok(s)
        };
        let be32 = |s: &[u8]| u32::from_be_bytes([s[0], s[1], s[2], s[3]]) as usize;
        let count = be32(take(4)?);
        if count > MAX_HEADER_PAIRS {
            return Err(HeaderBlockError::TooManyPairs(count));
        }
        let mut pairs = Vec::with_capacity(count);
        for _ in 0..count {
            let mut pair = [String::new(), String::new()];
            for s in &mut pair {
                let n = be32(take(4)?);
                *s = String::from_utf8(take(n)?.to_vec()).map_err(|_| bad)?;
            }
            let [n, v] = pair;
            pairs.push((n, v));
        }
        Ok(Headers(pairs))
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
pub enum HeaderBlockError {
    #[error("SPDY header block does not decompress")]
    Zlib,
    #[error("SPDY header block is larger than {MAX_HEADER_BLOCK} bytes")]
    TooLarge,
    #[error("SPDY header block has {0} pairs, more than {MAX_HEADER_PAIRS}")]
    TooManyPairs(usize),
    #[error("malformed SPDY header block")]
    Malformed,
}

/// The sending side's zlib context.
pub struct HeaderCompressor(Compress);

impl Default for HeaderCompressor {
    fn default() -> Self {
        Self::new()
    }
}

impl HeaderCompressor {
    pub fn new() -> Self {
        let mut c = Compress::new(Compression::default(), true);
        c.set_dictionary(dictionary())
            .expect("a fresh zlib stream accepts a dictionary");
        Self(c)
    }

    /// The compressed block for `headers`, flushed so the peer can decode it alone.
    pub fn compress(&mut self, headers: &Headers) -> Vec<u8> {
        let input = headers.encode();
        let mut out = Vec::with_capacity(input.len() + 64);
        let mut consumed = 0usize;
        loop {
            if out.capacity() - out.len() < 64 {
                out.reserve(out.capacity().max(256));
            }
            let before = self.0.total_in();
            // In-memory deflate fails only on misuse of the stream, not on data.
            self.0
                .compress_vec(&input[consumed..], &mut out, FlushCompress::Sync)
                .expect("zlib deflate into memory");
            consumed += (self.0.total_in() - before) as usize;
            // A sync flush is complete once all input is in and room was left over.
            if consumed == input.len() && out.capacity() - out.len() >= 64 {
                return out;
            }
        }
    }
}

/// The receiving side's zlib context.
pub struct HeaderDecompressor(Decompress);

impl Default for HeaderDecompressor {
    fn default() -> Self {
        Self::new()
    }
}

impl HeaderDecompressor {
    pub fn new() -> Self {
        Self(Decompress::new(true))
    }

    /// Decodes one block. An error leaves the context unusable: end the session.
    pub fn decompress(&mut self, block: &[u8]) -> Result<Headers, HeaderBlockError> {
        let mut out = Vec::with_capacity(1024);
        let mut consumed = 0usize;
        loop {
            if out.len() == out.capacity() {
                if out.capacity() >= MAX_HEADER_BLOCK {
                    return Err(HeaderBlockError::TooLarge);
                }
                out.reserve((out.capacity() * 2).min(MAX_HEADER_BLOCK) - out.len());
            }
            let before = self.0.total_in();
            let res = self
                .0
                .decompress_vec(&block[consumed..], &mut out, FlushDecompress::Sync);
            consumed += (self.0.total_in() - before) as usize;
            match res {
                Ok(Status::StreamEnd) => return Err(HeaderBlockError::Malformed),
                Ok(_) => {}
                Err(e) if e.needs_dictionary().is_some() => {
                    self.0
                        .set_dictionary(dictionary())
                        .map_err(|_| HeaderBlockError::Zlib)?;
                }
                Err(_) => return Err(HeaderBlockError::Zlib),
            }
            if consumed == block.len() && out.len() < out.capacity() {
                return Headers::decode(&out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_round_trip_through_one_context() {
        let mut c = HeaderCompressor::new();
        let mut d = HeaderDecompressor::new();
        for i in 0..20 {
            let h = Headers::new()
                .with("streamType", "stdout")
                .with("port", &i.to_string())
                .with("requestid", "0");
            let block = c.compress(&h);
            let got = d.decompress(&block).unwrap();
            assert_eq!(got.get("streamtype"), Some("stdout"));
            assert_eq!(got, h);
        }
        // An empty block (what SYN_REPLY usually carries) too.
        assert_eq!(
            d.decompress(&c.compress(&Headers::new())).unwrap(),
            Headers::new()
        );
    }

    #[test]
    fn the_stream_names_the_spdy_dictionary() {
        // zlib header (2 bytes) then DICTID: the Adler-32 of the dictionary.
        let block = HeaderCompressor::new().compress(&Headers::new());
        assert_eq!(block[2..6], [0xe3, 0xc6, 0xa7, 0xc2]);
    }

    #[test]
    fn bombs_and_garbage_are_refused() {
        let mut c = HeaderCompressor::new();
        let big = "x".repeat(MAX_HEADER_BLOCK);
        let block = c.compress(&Headers::new().with("a", &big));
        assert!(block.len() < 1024, "compresses well");
        assert_eq!(
            HeaderDecompressor::new().decompress(&block),
            Err(HeaderBlockError::TooLarge)
        );
        assert!(HeaderDecompressor::new().decompress(b"not zlib").is_err());
        let many = (0..100).fold(Headers::new(), |h, i| h.with(&i.to_string(), ""));
        let block = HeaderCompressor::new().compress(&many);
        assert_eq!(
            HeaderDecompressor::new().decompress(&block),
            Err(HeaderBlockError::TooManyPairs(100))
        );
        // A block whose lengths point past its end, or whose count lies.
        assert_eq!(
            Headers::decode(&[0, 0, 0, 1, 0, 0, 0, 9, b'a']),
            Err(HeaderBlockError::Malformed)
        );
        assert_eq!(
            Headers::decode(&[0, 0, 0, 2]),
            Err(HeaderBlockError::Malformed)
        );
    }
}

//! Bounded mutation fuzzing on stable Rust, with no crate of its own: seeds are mutated
//! with a small PRNG for a time budget and every input goes through a check that
//! asserts a property (no panic, bounded output, round trip, refusal). The crates'
//! fuzz tests (`cargo test -p <crate> fuzz`) use it as a dev-dependency.
//!
//! Each target runs `VESSEL_FUZZ_SECS` seconds (default 1, so `cargo test` stays
//! quick); `VESSEL_FUZZ_SEED` fixes the seed to replay a failure.

use std::time::{Duration, Instant};

/// xorshift64*: deterministic given the seed, good enough to pick mutations.
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (0 is mapped to a valid state).
    pub fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform-ish in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }
}

/// Bytes that matter to the formats under test (JSON, text lines, numbers, NULs).
const INTERESTING: &[u8] = b"\0\xff\x80 \n\"{}[]:,/@.=-_0179LKxgS5";

/// Numbers at the edges of the integer types, spliced in as text or little-endian.
const EDGES: &[u64] = &[
    0,
    1,
    0x7f,
    0xff,
    0xffff,
    0x7fff_ffff,
    0xffff_ffff,
    0x7fff_ffff_ffff_ffff,
    0x8000_0000_0000_0000,
    u64::MAX,
    u64::MAX - 1,
];

/// One random change to `data`, sometimes borrowing from `other`.
pub fn mutate(rng: &mut Rng, data: &mut Vec<u8>, other: &[u8]) {
    let len = data.len();
    match rng.below(10) {
        0 if len > 0 => {
            let i = rng.below(len);
            data[i] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let i = rng.below(len);
            data[i] = INTERESTING[rng.below(INTERESTING.len())];
        }
        2 => {
            let i = rng.below(len + 1);
            let n = 1 + rng.below(16);
            let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
            data.splice(i..i, bytes);
        }
        3 if len > 0 => {
            let i = rng.below(len);
            let n = 1 + rng.below((len - i).min(64));
            data.drain(i..i + n);
        }
        4 if len > 0 => {
            let i = rng.below(len);
            let n = 1 + rng.below((len - i).min(64));
            let copy = data[i..i + n].to_vec();
            let at = rng.below(len + 1);
            data.splice(at..at, copy);
        }
        5 if !other.is_empty() => {
            let i = rng.below(other.len());
            let n = 1 + rng.below((other.len() - i).min(256));
            let at = rng.below(len + 1);
            let end = (at + n).min(len);
            data.splice(at..end, other[i..i + n].iter().copied());
        }
        6 if len > 0 => data.truncate(rng.below(len)),
        7 => {
            // An edge number, as decimal text (sizes, offsets and ports are text in
            // the line formats) or as 8 raw bytes (the structured decoders).
            let v = EDGES[rng.below(EDGES.len())];
            let at = rng.below(len + 1);
            if rng.below(2) == 0 {
                data.splice(at..at, v.to_string().into_bytes());
            } else {
                let end = (at + 8).min(len);
                data.splice(at..end, v.to_le_bytes());
            }
        }
        _ if len > 0 => {
            let i = rng.below(len);
            data[i] = b'0' + rng.below(10) as u8;
        }
        _ => data.push(rng.next_u64() as u8),
    }
}

/// Runs `check` on every seed, then on mutations of them for the time budget;
/// returns how many mutated inputs were checked.
pub fn fuzz(name: &str, seeds: &[Vec<u8>], mut check: impl FnMut(&[u8])) -> u64 {
    assert!(!seeds.is_empty(), "fuzz {name}: no seeds");
    let secs: f64 = std::env::var("VESSEL_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let seed: u64 = std::env::var("VESSEL_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        })
        | 1;
    let mut rng = Rng::new(seed);
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let mut n = 0u64;
    for s in seeds {
        check(s);
    }
    while Instant::now() < end {
        let mut input = seeds[rng.below(seeds.len())].clone();
        let other = &seeds[rng.below(seeds.len())];
        for _ in 0..1 + rng.below(8) {
            mutate(&mut rng, &mut input, other);
        }
        check(&input);
        n += 1;
    }
    eprintln!(
        "fuzz {name}: {n} inputs in {:.0}s (VESSEL_FUZZ_SEED={seed})",
        start.elapsed().as_secs_f64()
    );
    n
}

/// Reads structured values off fuzz bytes; past the end every read gives zeros, so any
/// input decodes to something.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    /// Wraps `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    /// Whether everything was read.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The next byte.
    pub fn u8(&mut self) -> u8 {
        self.bytes(1).first().copied().unwrap_or(0)
    }

    /// The next 8 bytes, little-endian.
    pub fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        let got = self.bytes(8);
        b[..got.len()].copy_from_slice(got);
        u64::from_le_bytes(b)
    }

    /// The next 8 bytes as a signed number.
    pub fn i64(&mut self) -> i64 {
        self.u64() as i64
    }

    /// Up to `n` next bytes.
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        head
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_reads_past_the_end_as_zeros() {
        let mut i = Input::new(&[1, 0, 0, 0, 0, 0, 0, 0, 7]);
        assert_eq!(i.u64(), 1);
        assert_eq!(i.u8(), 7);
        assert!(i.is_empty());
        assert_eq!(i.u64(), 0);
        assert_eq!(i.bytes(3), b"");
    }

    #[test]
    fn mutation_is_deterministic_for_a_seed() {
        let run = || {
            let mut rng = Rng::new(42);
            let mut d = b"seed data".to_vec();
            for _ in 0..100 {
                mutate(&mut rng, &mut d, b"other");
            }
            d
        };
        assert_eq!(run(), run());
    }
}

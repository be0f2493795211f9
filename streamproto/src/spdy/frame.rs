//! Frame encoding and decoding. Header blocks stay compressed here (`Vec<u8>`);
//! `headers` turns them into name/value pairs with the session's zlib contexts.

const VERSION: u16 = 3;
/// Every frame starts with 8 bytes: control bit + version + type, or stream id; then
/// flags and a 24-bit length.
pub const FRAME_HEADER_LEN: usize = 8;
/// Largest payload accepted (the 24-bit length allows 16 MiB; nothing in Kubernetes
/// streaming needs more than a few tens of KiB, and each byte here is buffered).
pub const MAX_FRAME_PAYLOAD: usize = 1 << 20;

pub const DATA_FLAG_FIN: u8 = 0x01;
pub const SYN_FLAG_FIN: u8 = 0x01;
pub const SYN_FLAG_UNIDIRECTIONAL: u8 = 0x02;

const TYPE_SYN_STREAM: u16 = 1;
const TYPE_SYN_REPLY: u16 = 2;
const TYPE_RST_STREAM: u16 = 3;
const TYPE_SETTINGS: u16 = 4;
const TYPE_PING: u16 = 6;
const TYPE_GOAWAY: u16 = 7;
const TYPE_HEADERS: u16 = 8;
const TYPE_WINDOW_UPDATE: u16 = 9;

const STREAM_ID_MASK: u32 = 0x7fff_ffff;

/// One SETTINGS entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting {
    pub flags: u8,
    pub id: u32,
    pub value: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Data {
        stream_id: u32,
        flags: u8,
        data: Vec<u8>,
    },
    SynStream {
        stream_id: u32,
        associated_to: u32,
        priority: u8,
        flags: u8,
        header_block: Vec<u8>,
    },
    SynReply {
        stream_id: u32,
        flags: u8,
        header_block: Vec<u8>,
    },
    RstStream {
        stream_id: u32,
        status: u32,
    },
    Settings {
        flags: u8,
        entries: Vec<Setting>,
    },
    Ping {
        id: u32,
    },
    GoAway {
        last_good_stream_id: u32,
        status: u32,
    },
    Headers {
        stream_id: u32,
        flags: u8,
        header_block: Vec<u8>,
    },
    WindowUpdate {
        stream_id: u32,
        delta: u32,
    },
    /// A control frame of a type this implementation does not use (the spec says
    /// to ignore those).
    Unknown {
        frame_type: u16,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("SPDY version {0} is not supported (only 3)")]
    Version(u16),
    #[error("SPDY frame of {0} bytes is larger than the {MAX_FRAME_PAYLOAD} bytes allowed")]
    TooLarge(usize),
    #[error("malformed SPDY {0} frame")]
    Malformed(&'static str),
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

impl Frame {
    /// Parses one frame from the start of `buf`: `Ok(None)` when more bytes are
    /// needed, else the frame and how many bytes it used. A length over
    /// `MAX_FRAME_PAYLOAD` is an error before any of the payload is buffered.
    pub fn parse(buf: &[u8]) -> Result<Option<(Frame, usize)>, FrameError> {
        if buf.len() < FRAME_HEADER_LEN {
            return Ok(None);
        }
        let len = (be32(&buf[4..8]) & 0x00ff_ffff) as usize;
        if len > MAX_FRAME_PAYLOAD {
            return Err(FrameError::TooLarge(len));
        }
        let total = FRAME_HEADER_LEN + len;
        if buf.len() < total {
            return Ok(None);
        }
        let flags = buf[4];
        let p = &buf[FRAME_HEADER_LEN..total];
        let first = be32(&buf[0..4]);
        if first & 0x8000_0000 == 0 {
            return Ok(Some((
                Frame::Data {
                    stream_id: first & STREAM_ID_MASK,
                    flags,
                    data: p.to_vec(),
                },
                total,
            )));
        }
        let version = ((first >> 16) & 0x7fff) as u16;
        if version != VERSION {
            return Err(FrameError::Version(version));
        }
        let need = |n: usize, what: &'static str| {
            if p.len() < n {
                Err(FrameError::Malformed(what))
            } else {
                Ok(())
            }
        };
        let frame = match (first & 0xffff) as u16 {
            TYPE_SYN_STREAM => {
                need(10, "SYN_STREAM")?;
                Frame::SynStream {
                    stream_id: be32(&p[0..4]) & STREAM_ID_MASK,
                    associated_to: be32(&p[4..8]) & STREAM_ID_MASK,
                    priority: p[8] >> 5,
                    flags,
                    header_block: p[10..].to_vec(),
                }
            }
            TYPE_SYN_REPLY => {
                need(4, "SYN_REPLY")?;
                Frame::SynReply {
                    stream_id: be32(&p[0..4]) & STREAM_ID_MASK,
                    flags,
                    header_block: p[4..].to_vec(),
                }
            }
            TYPE_RST_STREAM => {
                need(8, "RST_STREAM")?;
                Frame::RstStream {
                    stream_id: be32(&p[0..4]) & STREAM_ID_MASK,
                    status: be32(&p[4..8]),
                }
            }
            TYPE_SETTINGS => {
                need(4, "SETTINGS")?;
                let n = be32(&p[0..4]) as usize;
                if p.len() != 4 + n.saturating_mul(8) {
                    return Err(FrameError::Malformed("SETTINGS"));
                }
                let entries = p[4..]
                    .chunks_exact(8)
                    .map(|e| Setting {
                        flags: e[0],
                        id: be32(&e[0..4]) & 0x00ff_ffff,
                        value: be32(&e[4..8]),
                    })
                    .collect();
                Frame::Settings { flags, entries }
            }
            TYPE_PING => {
                need(4, "PING")?;
                Frame::Ping { id: be32(&p[0..4]) }
            }
            TYPE_GOAWAY => {
                need(8, "GOAWAY")?;
                Frame::GoAway {
                    last_good_stream_id: be32(&p[0..4]) & STREAM_ID_MASK,
                    status: be32(&p[4..8]),
                }
            }
            TYPE_HEADERS => {
                need(4, "HEADERS")?;
                Frame::Headers {
                    stream_id: be32(&p[0..4]) & STREAM_ID_MASK,
                    flags,
                    header_block: p[4..].to_vec(),
                }
            }
            TYPE_WINDOW_UPDATE => {
                need(8, "WINDOW_UPDATE")?;
                Frame::WindowUpdate {
                    stream_id: be32(&p[0..4]) & STREAM_ID_MASK,
                    delta: be32(&p[4..8]) & STREAM_ID_MASK,
                }
            }
            other => Frame::Unknown { frame_type: other },
        };
        Ok(Some((frame, total)))
    }

    /// Appends the frame's bytes to `out`. Payloads are the caller's to keep under
    /// `MAX_FRAME_PAYLOAD` (and the 24-bit length).
    pub fn encode(&self, out: &mut Vec<u8>) {
        fn control(out: &mut Vec<u8>, ty: u16, flags: u8, payload: &[&[u8]]) {
            let len: usize = payload.iter().map(|p| p.len()).sum();
            debug_assert!(len < 1 << 24);
            out.extend_from_slice(
                &(0x8000_0000 | (VERSION as u32) << 16 | ty as u32).to_be_bytes(),
            );
            out.extend_from_slice(&((flags as u32) << 24 | len as u32).to_be_bytes());
            for p in payload {
                out.extend_from_slice(p);
            }
        }
        match self {
            Frame::Data {
                stream_id,
                flags,
                data,
            } => {
                debug_assert!(data.len() < 1 << 24);
                out.extend_from_slice(&(stream_id & STREAM_ID_MASK).to_be_bytes());
                out.extend_from_slice(&((*flags as u32) << 24 | data.len() as u32).to_be_bytes());
                out.extend_from_slice(data);
            }
            Frame::SynStream {
                stream_id,
                associated_to,
                priority,
                flags,
                header_block,
            } => control(
                out,
                TYPE_SYN_STREAM,
                *flags,
                &[
                    &stream_id.to_be_bytes(),
                    &associated_to.to_be_bytes(),
                    &[priority << 5, 0],
                    header_block,
                ],
            ),
            Frame::SynReply {
                stream_id,
                flags,
                header_block,
            } => control(
                out,
                TYPE_SYN_REPLY,
                *flags,
                &[&stream_id.to_be_bytes(), header_block],
            ),
            Frame::RstStream { stream_id, status } => control(
                out,
                TYPE_RST_STREAM,
                0,
                &[&stream_id.to_be_bytes(), &status.to_be_bytes()],
            ),
            Frame::Settings { flags, entries } => {
                let mut p = (entries.len() as u32).to_be_bytes().to_vec();
                for e in entries {
                    p.extend_from_slice(
                        &((e.flags as u32) << 24 | (e.id & 0x00ff_ffff)).to_be_bytes(),
                    );
                    p.extend_from_slice(&e.value.to_be_bytes());
                }
                control(out, TYPE_SETTINGS, *flags, &[&p])
            }
            Frame::Ping { id } => control(out, TYPE_PING, 0, &[&id.to_be_bytes()]),
            Frame::GoAway {
                last_good_stream_id,
                status,
            } => control(
                out,
                TYPE_GOAWAY,
                0,
                &[&last_good_stream_id.to_be_bytes(), &status.to_be_bytes()],
            ),
            Frame::Headers {
                stream_id,
                flags,
                header_block,
            } => control(
                out,
                TYPE_HEADERS,
                *flags,
                &[&stream_id.to_be_bytes(), header_block],
            ),
            Frame::WindowUpdate { stream_id, delta } => control(
                out,
                TYPE_WINDOW_UPDATE,
                0,
                &[&stream_id.to_be_bytes(), &delta.to_be_bytes()],
            ),
            Frame::Unknown { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(f: Frame) {
        let mut b = Vec::new();
        f.encode(&mut b);
        // Every prefix is "need more", the whole is the frame.
        for cut in 0..b.len() {
            assert_eq!(Frame::parse(&b[..cut]), Ok(None), "{f:?} cut at {cut}");
        }
        b.extend_from_slice(b"trailing");
        let (g, used) = Frame::parse(&b).unwrap().unwrap();
        assert_eq!(g, f);
        assert_eq!(used, b.len() - 8);
    }

    #[test]
    fn frames_round_trip() {
        round_trip(Frame::Data {
            stream_id: 5,
            flags: DATA_FLAG_FIN,
            data: b"hello".to_vec(),
        });
        round_trip(Frame::SynStream {
            stream_id: 1,
            associated_to: 0,
            priority: 3,
            flags: SYN_FLAG_FIN,
            header_block: vec![1, 2, 3],
        });
        round_trip(Frame::SynReply {
            stream_id: 7,
            flags: 0,
            header_block: vec![9; 40],
        });
        round_trip(Frame::RstStream {
            stream_id: 3,
            status: super::super::rst::CANCEL,
        });
        round_trip(Frame::Settings {
            flags: 0,
            entries: vec![Setting {
                flags: 0,
                id: 7,
                value: 65536,
            }],
        });
        round_trip(Frame::Ping { id: 42 });
        round_trip(Frame::GoAway {
            last_good_stream_id: 9,
            status: 0,
        });
        round_trip(Frame::Headers {
            stream_id: 11,
            flags: 0,
            header_block: vec![],
        });
        round_trip(Frame::WindowUpdate {
            stream_id: 1,
            delta: 1000,
        });
    }

    #[test]
    fn known_bytes() {
        // PING id 1 as the spec lays it out: control bit, version 3, type 6, length 4.
        let mut b = Vec::new();
        Frame::Ping { id: 1 }.encode(&mut b);
        assert_eq!(b, [0x80, 3, 0, 6, 0, 0, 0, 4, 0, 0, 0, 1]);
        // A data frame: no control bit, stream id, flags, 24-bit length.
        let (f, _) = Frame::parse(&[0, 0, 0, 3, 1, 0, 0, 2, b'h', b'i'])
            .unwrap()
            .unwrap();
        assert_eq!(
            f,
            Frame::Data {
                stream_id: 3,
                flags: DATA_FLAG_FIN,
                data: b"hi".to_vec()
            }
        );
    }

    #[test]
    fn rejects_bad_frames() {
        // Version 2.
        assert_eq!(
            Frame::parse(&[0x80, 2, 0, 6, 0, 0, 0, 4, 0, 0, 0, 1]),
            Err(FrameError::Version(2))
        );
        // Over the size limit: refused from the header alone.
        assert_eq!(
            Frame::parse(&[0, 0, 0, 1, 0, 0xff, 0xff, 0xff]),
            Err(FrameError::TooLarge(0xff_ffff))
        );
        // Too short for its type.
        assert_eq!(
            Frame::parse(&[0x80, 3, 0, 3, 0, 0, 0, 4, 0, 0, 0, 1]),
            Err(FrameError::Malformed("RST_STREAM"))
        );
        // SETTINGS whose count does not match its length.
        assert_eq!(
            Frame::parse(&[0x80, 3, 0, 4, 0, 0, 0, 4, 0, 0, 0, 9]),
            Err(FrameError::Malformed("SETTINGS"))
        );
        // Unknown control types are skipped, not errors.
        assert_eq!(
            Frame::parse(&[0x80, 3, 0, 0x20, 0, 0, 0, 1, 0]).unwrap(),
            Some((Frame::Unknown { frame_type: 0x20 }, 9))
        );
    }
}

//! SPDY/3.1 framing (the subset Kubernetes streaming uses; spdystream's peer).

mod dictionary;
mod frame;
mod headers;
pub mod session;

pub use dictionary::dictionary;
pub use frame::{
    Frame, FrameError, Setting, DATA_FLAG_FIN, FRAME_HEADER_LEN, MAX_FRAME_PAYLOAD, SYN_FLAG_FIN,
    SYN_FLAG_UNIDIRECTIONAL,
};
pub use headers::{HeaderBlockError, HeaderCompressor, HeaderDecompressor, Headers};

/// The protocol name in `Upgrade:` headers.
pub const UPGRADE: &str = "SPDY/3.1";

/// RST_STREAM status codes (SPDY/3 section 2.6.3).
pub mod rst {
    pub const PROTOCOL_ERROR: u32 = 1;
    pub const INVALID_STREAM: u32 = 2;
    pub const REFUSED_STREAM: u32 = 3;
    pub const CANCEL: u32 = 5;
    pub const INTERNAL_ERROR: u32 = 6;
    pub const FLOW_CONTROL_ERROR: u32 = 7;
    pub const STREAM_IN_USE: u32 = 8;
    pub const FRAME_TOO_LARGE: u32 = 11;
}

/// GOAWAY status codes.
pub mod goaway {
    pub const OK: u32 = 0;
    pub const PROTOCOL_ERROR: u32 = 1;
    pub const INTERNAL_ERROR: u32 = 2;
}

/// Initial per-stream and per-session window (SPDY/3.1 default).
pub const DEFAULT_WINDOW: u32 = 64 * 1024;

//! The Kubernetes streaming protocols on top of SPDY streams or WebSocket messages:
//! subprotocol names, stream/channel numbering, the v4 status on the error stream,
//! terminal resize messages.

use serde::{Deserialize, Serialize};

/// Header carrying the subprotocol offers (request) and the choice (101 response).
pub const PROTOCOL_HEADER: &str = "X-Stream-Protocol-Version";

/// Exec/attach subprotocols over SPDY, most preferred first.
pub const SPDY_EXEC_PROTOCOLS: &[&str] = &[
    "v4.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
    "channel.k8s.io",
];
/// Port-forward subprotocol over SPDY.
pub const SPDY_PORT_FORWARD_PROTOCOL: &str = "portforward.k8s.io";

/// Exec/attach subprotocols over WebSocket (`Sec-WebSocket-Protocol`), most
/// preferred first. v5 adds the close signal (channel 255).
pub const WS_EXEC_PROTOCOLS: &[&str] = &["v5.channel.k8s.io", "v4.channel.k8s.io"];
/// Port-forward subprotocols over WebSocket.
pub const WS_PORT_FORWARD_PROTOCOLS: &[&str] = &["v4.channel.k8s.io", "portforward.k8s.io"];

/// SPDY `streamtype` header and its values.
pub const STREAM_TYPE_HEADER: &str = "streamtype";
pub const PORT_HEADER: &str = "port";
pub const REQUEST_ID_HEADER: &str = "requestid";

/// WebSocket channel numbers (first byte of every binary message).
pub mod channel {
    pub const STDIN: u8 = 0;
    pub const STDOUT: u8 = 1;
    pub const STDERR: u8 = 2;
    pub const ERROR: u8 = 3;
    pub const RESIZE: u8 = 4;
    /// v5: `[CLOSE, n]` closes channel n (half-close of stdin).
    pub const CLOSE: u8 = 255;
}

/// The role of an exec/attach stream (SPDY `streamtype` values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamType {
    Error,
    Stdin,
    Stdout,
    Stderr,
    Resize,
    /// Port-forward data stream.
    Data,
}

impl StreamType {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "error" => Self::Error,
            "stdin" => Self::Stdin,
            "stdout" => Self::Stdout,
            "stderr" => Self::Stderr,
            "resize" => Self::Resize,
            "data" => Self::Data,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Error => "error",
            Self::Stdin => "stdin",
            Self::Stdout => "stdout",
            Self::Stderr => "stderr",
            Self::Resize => "resize",
            Self::Data => "data",
        }
    }
}

/// The first of the client's offers that the server supports, in the client's
/// order. Offers may come as several headers or comma-separated.
pub fn negotiate<'a>(
    offers: impl IntoIterator<Item = &'a str>,
    supported: &[&'static str],
) -> Option<&'static str> {
    offers
        .into_iter()
        .flat_map(|h| h.split(','))
        .map(str::trim)
        .find_map(|o| supported.iter().find(|s| **s == o).copied())
}

/// A terminal size message (resize stream / channel 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminalSize {
    #[serde(rename = "Width")]
    pub width: u16,
    #[serde(rename = "Height")]
    pub height: u16,
}

/// metav1.Status as the v4 error stream carries it (only the fields clients read).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    #[serde(default)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub status: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<StatusDetails>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusDetails {
    #[serde(default)]
    pub causes: Vec<StatusCause>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusCause {
    pub reason: String,
    pub message: String,
}

impl Status {
    pub fn success() -> Self {
        Self {
            metadata: Default::default(),
            status: "Success".into(),
            message: String::new(),
            reason: String::new(),
            details: None,
        }
    }

    /// What kubectl turns into "command terminated with exit code N".
    pub fn exit_code(code: i32) -> Self {
        if code == 0 {
            return Self::success();
        }
        Self {
            metadata: Default::default(),
            status: "Failure".into(),
            message: format!("command terminated with non-zero exit code: exit status {code}"),
            reason: "NonZeroExitCode".into(),
            details: Some(StatusDetails {
                causes: vec![StatusCause {
                    reason: "ExitCode".into(),
                    message: code.to_string(),
                }],
            }),
        }
    }

    pub fn failure(message: impl Into<String>) -> Self {
        Self {
            metadata: Default::default(),
            status: "Failure".into(),
            message: message.into(),
            reason: "InternalError".into(),
            details: None,
        }
    }

    /// The exit code this status reports: Some(0) for success, the code for
    /// NonZeroExitCode, None for other failures.
    pub fn code(&self) -> Option<i32> {
        if self.status == "Success" {
            return Some(0);
        }
        if self.reason != "NonZeroExitCode" {
            return None;
        }
        self.details
            .as_ref()?
            .causes
            .iter()
            .find(|c| c.reason == "ExitCode")?
            .message
            .parse()
            .ok()
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// The WebSocket port-forward channels of the i-th requested port: data is 2i,
/// error is 2i+1.
pub fn port_forward_channels(index: usize) -> Option<(u8, u8)> {
    let data = u8::try_from(index.checked_mul(2)?).ok()?;
    Some((data, data.checked_add(1)?))
}

/// First message on each WebSocket port-forward channel: the channel number then the
/// port, little-endian.
pub fn port_forward_prefix(channel: u8, port: u16) -> Vec<u8> {
    let p = port.to_le_bytes();
    vec![channel, p[0], p[1]]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_follows_the_client_order() {
        assert_eq!(
            negotiate(
                ["v2.channel.k8s.io, v4.channel.k8s.io", "channel.k8s.io"],
                SPDY_EXEC_PROTOCOLS
            ),
            Some("v2.channel.k8s.io")
        );
        assert_eq!(negotiate(["v9.channel.k8s.io"], SPDY_EXEC_PROTOCOLS), None);
    }

    #[test]
    fn exit_statuses_are_what_kubectl_reads() {
        let s = Status::exit_code(3);
        let v: serde_json::Value = serde_json::from_slice(&s.to_json()).unwrap();
        assert_eq!(v["status"], "Failure");
        assert_eq!(v["reason"], "NonZeroExitCode");
        assert_eq!(v["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(v["details"]["causes"][0]["message"], "3");
        let back: Status = serde_json::from_value(v).unwrap();
        assert_eq!(back.code(), Some(3));
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&Status::exit_code(0).to_json()).unwrap(),
            serde_json::json!({"metadata": {}, "status": "Success"})
        );
        assert_eq!(Status::failure("boom").code(), None);
    }

    #[test]
    fn resize_and_port_forward_encodings() {
        let t: TerminalSize = serde_json::from_str(r#"{"Width":80,"Height":24}"#).unwrap();
        assert_eq!(
            t,
            TerminalSize {
                width: 80,
                height: 24
            }
        );
        assert_eq!(port_forward_channels(1), Some((2, 3)));
        assert_eq!(port_forward_channels(128), None);
        assert_eq!(port_forward_prefix(2, 8080), vec![2, 0x90, 0x1f]);
    }
}

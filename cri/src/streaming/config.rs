//! The `[streaming]` config section.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamingConfig {
    /// Address the streaming server listens on (the kubelet connects to it).
    pub address: String,
    /// TCP port; 0 picks a free one at start.
    pub port: u16,
    /// PEM certificate chain and key: serve HTTPS. Both or neither.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
    /// How long a URL returned by Exec/Attach/PortForward stays valid (seconds).
    pub token_ttl_s: u64,
    /// Most URLs waiting for their client at once.
    pub max_pending: usize,
    /// A session with no traffic either way for this long is closed (seconds; 0: never).
    pub idle_timeout_s: u64,
    /// How long a client has to open the streams it asked for (seconds).
    pub stream_creation_timeout_s: u64,
    /// Most streaming sessions at once (each holds agent streams and buffers).
    pub max_sessions: usize,
    /// Most sessions into one pod at once, so one tenant cannot take the node's
    /// `max_sessions`. Unset: `max_sessions / 8` (32 of 256), at least 1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_sessions_per_pod: Option<usize>,
    /// New sessions per second into one pod, on average (a token bucket).
    pub sessions_per_pod_per_s: f64,
    /// New sessions one pod may open at once before `sessions_per_pod_per_s` applies.
    pub sessions_per_pod_burst: u32,
}

impl Default for StreamingConfig {
    fn default() -> Self {
        Self {
            address: "127.0.0.1".into(),
            port: 0,
            tls_cert_file: None,
            tls_key_file: None,
            token_ttl_s: 60,
            max_pending: 1000,
            idle_timeout_s: 4 * 3600,
            stream_creation_timeout_s: 30,
            max_sessions: 256,
            max_sessions_per_pod: None,
            sessions_per_pod_per_s: 10.0,
            sessions_per_pod_burst: 20,
        }
    }
}

impl StreamingConfig {
    /// The per-pod share in effect.
    pub fn per_pod_cap(&self) -> usize {
        self.max_sessions_per_pod
            .unwrap_or((self.max_sessions / 8).max(1))
    }

    /// What is wrong with the section, as (key, reason).
    pub fn problem(&self) -> Option<(&'static str, &'static str)> {
        if self.address.parse::<std::net::IpAddr>().is_err() {
            return Some(("streaming.address", "must be an IP address"));
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return Some((
                "streaming.tls_cert_file",
                "set both tls_cert_file and tls_key_file, or neither",
            ));
        }
        if self.token_ttl_s == 0 || self.max_pending == 0 || self.max_sessions == 0 {
            return Some((
                "streaming",
                "token_ttl_s, max_pending and max_sessions must be at least 1",
            ));
        }
        if self.stream_creation_timeout_s == 0 {
            return Some(("streaming.stream_creation_timeout_s", "must be at least 1"));
        }
        if let Some(n) = self.max_sessions_per_pod {
            if n == 0 || n > self.max_sessions {
                return Some((
                    "streaming.max_sessions_per_pod",
                    "must be at least 1 and at most max_sessions",
                ));
            }
        }
        if !(self.sessions_per_pod_per_s.is_finite() && self.sessions_per_pod_per_s > 0.0) {
            return Some((
                "streaming.sessions_per_pod_per_s",
                "must be a number above 0",
            ));
        }
        if self.sessions_per_pod_burst == 0 {
            return Some(("streaming.sessions_per_pod_burst", "must be at least 1"));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_pod_share_defaults_to_an_eighth_and_is_validated() {
        let c = StreamingConfig::default();
        assert_eq!(c.per_pod_cap(), 32);
        assert_eq!(c.problem(), None);
        let small = StreamingConfig {
            max_sessions: 4,
            ..Default::default()
        };
        assert_eq!(small.per_pod_cap(), 1);
        for bad in [
            StreamingConfig {
                max_sessions_per_pod: Some(0),
                ..Default::default()
            },
            StreamingConfig {
                max_sessions_per_pod: Some(257),
                ..Default::default()
            },
        ] {
            assert_eq!(bad.problem().unwrap().0, "streaming.max_sessions_per_pod");
        }
        let bad_rate = StreamingConfig {
            sessions_per_pod_per_s: f64::NAN,
            ..Default::default()
        };
        assert_eq!(
            bad_rate.problem().unwrap().0,
            "streaming.sessions_per_pod_per_s"
        );
        let bad_burst = StreamingConfig {
            sessions_per_pod_burst: 0,
            ..Default::default()
        };
        assert_eq!(
            bad_burst.problem().unwrap().0,
            "streaming.sessions_per_pod_burst"
        );
    }
}

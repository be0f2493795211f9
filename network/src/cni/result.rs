//! CNI results (spec 1.0, and 0.3.x/0.4.0 which differ only by an `ips[].version`)
//! and CNI error objects.

use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::ip::IpPrefix;

/// The typed view of a plugin chain's final ADD result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CniResult {
    pub cni_version: String,
    #[serde(default)]
    pub interfaces: Vec<CniInterface>,
    #[serde(default)]
    pub ips: Vec<CniIp>,
    #[serde(default)]
    pub routes: Vec<CniRoute>,
    #[serde(default)]
    pub dns: CniDns,
}

/// An interface a plugin created or configured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CniInterface {
    pub name: String,
    #[serde(default)]
    pub mac: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// The netns path for interfaces inside the pod; empty for host-side ones.
    #[serde(default)]
    pub sandbox: String,
}

/// An assigned address.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CniIp {
    pub address: IpPrefix,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

/// A route the plugins want inside the pod.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CniRoute {
    pub dst: IpPrefix,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
}

/// DNS settings from the result.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CniDns {
    #[serde(default)]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default)]
    pub search: Vec<String>,
    #[serde(default)]
    pub options: Vec<String>,
}

impl CniResult {
    /// Parses a plugin's result. Versions older than 0.3.0 have another shape and are
    /// refused.
    pub fn parse(value: &serde_json::Value) -> Result<CniResult, String> {
        let version = value
            .get("cniVersion")
            .and_then(|v| v.as_str())
            .ok_or("result has no cniVersion")?;
        if !crate::cni::config::version_supported(version) {
            return Err(format!("unsupported result version {version:?}"));
        }
        CniResult::deserialize(value).map_err(|e| e.to_string())
    }

    /// Index of the interface named `ifname` that lives in a sandbox (the pod side).
    pub fn sandbox_interface(&self, ifname: &str) -> Option<usize> {
        self.interfaces
            .iter()
            .position(|i| i.name == ifname && !i.sandbox.is_empty())
    }
}

/// The error object a failing plugin prints (`code`, `msg`, `details`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginError {
    #[serde(default)]
    pub code: u32,
    #[serde(default)]
    pub msg: String,
    #[serde(default)]
    pub details: String,
}

impl PluginError {
    /// Reads the error from a failed plugin's stdout, falling back to stderr (plugins
    /// that crash print no JSON).
    pub fn from_output(stdout: &[u8], stderr: &[u8], status: &str) -> PluginError {
        if let Ok(e) = serde_json::from_slice::<PluginError>(stdout) {
            if !e.msg.is_empty() || e.code != 0 {
                return e;
            }
        }
        let text = String::from_utf8_lossy(if stdout.trim_ascii().is_empty() {
            stderr
        } else {
            stdout
        });
        let text = text.trim();
        PluginError {
            code: 0,
            msg: if text.is_empty() {
                format!("plugin exited with {status}")
            } else {
                text.to_string()
            },
            details: String::new(),
        }
    }
}

impl fmt::Display for PluginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)?;
        if !self.details.is_empty() {
            write!(f, ": {}", self.details)?;
        }
        if self.code != 0 {
            write!(f, " (code {})", self.code)?;
        }
        Ok(())
    }
}

impl std::error::Error for PluginError {}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_a_1_0_result() {
        let v = json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "cni0", "mac": "aa:aa:aa:aa:aa:01"},
                {"name": "veth1", "mac": "aa:aa:aa:aa:aa:02"},
                {"name": "eth0", "mac": "aa:aa:aa:aa:aa:03", "mtu": 1450, "sandbox": "/run/vessel/netns/p"}
            ],
            "ips": [{"address": "10.88.0.7/16", "gateway": "10.88.0.1", "interface": 2}],
            "routes": [{"dst": "0.0.0.0/0"}, {"dst": "192.168.0.0/24", "gw": "10.88.0.254"}],
            "dns": {"nameservers": ["10.96.0.10"], "search": ["svc.local"], "options": ["ndots:5"]}
        });
        let r = CniResult::parse(&v).unwrap();
        assert_eq!(r.sandbox_interface("eth0"), Some(2));
        assert_eq!(r.interfaces[2].mtu, Some(1450));
        assert_eq!(r.ips[0].address.to_string(), "10.88.0.7/16");
        assert_eq!(r.ips[0].gateway, Some("10.88.0.1".parse().unwrap()));
        assert_eq!(r.ips[0].interface, Some(2));
        assert!(r.routes[0].dst.is_default() && r.routes[0].gw.is_none());
        assert_eq!(r.routes[1].gw, Some("10.88.0.254".parse().unwrap()));
        assert_eq!(r.dns.nameservers, ["10.96.0.10"]);
        assert_eq!(r.dns.options, ["ndots:5"]);
    }

    #[test]
    fn parses_a_0_4_result_with_ip_versions() {
        let v = json!({
            "cniVersion": "0.4.0",
            "interfaces": [{"name": "eth0", "sandbox": "/x"}],
            "ips": [
                {"version": "4", "address": "10.1.2.3/24", "gateway": "10.1.2.1", "interface": 0},
                {"version": "6", "address": "fd00::3/64", "interface": 0}
            ],
            "dns": {}
        });
        let r = CniResult::parse(&v).unwrap();
        assert_eq!(r.ips.len(), 2);
        assert!(r.ips[1].address.addr.is_ipv6());
        assert!(r.routes.is_empty());
    }

    #[test]
    fn refuses_old_or_missing_versions() {
        assert!(CniResult::parse(&json!({"cniVersion": "0.2.0", "ip4": {}})).is_err());
        assert!(CniResult::parse(&json!({"ips": []})).is_err());
        assert!(
            CniResult::parse(&json!({"cniVersion": "1.0.0", "ips": [{"address": "bad"}]})).is_err()
        );
    }

    #[test]
    fn error_json_keeps_the_plugin_message() {
        let out =
            br#"{"cniVersion":"1.0.0","code":7,"msg":"failed to allocate","details":"range full"}"#;
        let e = PluginError::from_output(out, b"", "exit status: 1");
        assert_eq!(e.code, 7);
        assert_eq!(e.to_string(), "failed to allocate: range full (code 7)");
    }

    #[test]
    fn non_json_errors_fall_back_to_text() {
        let e = PluginError::from_output(b"", b"panic: boom\n", "exit status: 2");
        assert_eq!(e.msg, "panic: boom");
        let e = PluginError::from_output(b"", b"", "signal: 9");
        assert_eq!(e.msg, "plugin exited with signal: 9");
    }
}

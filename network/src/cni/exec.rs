//! Running one plugin: its environment, its stdin, and reading what it prints.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::io::AsyncWriteExt;

use super::result::PluginError;
use crate::error::{io, Error, Result};

/// The CNI operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
}

impl Command {
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
        }
    }
}

/// A host port forwarded to the pod (`runtimeConfig.portMappings`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortMapping {
    pub host_port: u16,
    pub container_port: u16,
    /// "tcp", "udp" or "sctp".
    pub protocol: String,
    /// Empty: all host addresses.
    #[serde(rename = "hostIP", default, skip_serializing_if = "String::is_empty")]
    pub host_ip: String,
}

/// Per-attachment arguments: who the pod is and what it asks for. Cached with the
/// result so a DEL after a restart uses the same values as the ADD.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    /// `CNI_CONTAINERID`: the pod sandbox id.
    pub container_id: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
    pub pod_namespace: String,
    pub pod_name: String,
    pub pod_uid: String,
    #[serde(default)]
    pub port_mappings: Vec<PortMapping>,
}

impl Attachment {
    /// `CNI_ARGS`: the Kubernetes keys plus `IgnoreUnknown=1` so plugins that do not
    /// know them do not fail.
    pub fn cni_args(&self) -> String {
        let mut args = vec!["IgnoreUnknown=1".to_string()];
        for (k, v) in [
            ("K8S_POD_NAMESPACE", &self.pod_namespace),
            ("K8S_POD_NAME", &self.pod_name),
            ("K8S_POD_INFRA_CONTAINER_ID", &self.container_id),
            ("K8S_POD_UID", &self.pod_uid),
        ] {
            // `;` and `=` separate pairs: a value holding them would corrupt the list.
            if !v.is_empty() && !v.contains([';', '=']) {
                args.push(format!("{k}={v}"));
            }
        }
        args.join(";")
    }
}

/// The `CNI_*` variables for one call. The plugin also inherits the runtime's own
/// environment (it needs `PATH` for iptables and friends).
pub fn plugin_env(
    cmd: Command,
    att: &Attachment,
    netns: Option<&Path>,
    bin_dirs: &[PathBuf],
) -> Vec<(&'static str, String)> {
    let path = bin_dirs
        .iter()
        .map(|d| d.to_string_lossy())
        .collect::<Vec<_>>()
        .join(":");
    vec![
        ("CNI_COMMAND", cmd.as_str().to_string()),
        ("CNI_CONTAINERID", att.container_id.clone()),
        (
            "CNI_NETNS",
            netns
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default(),
        ),
        ("CNI_IFNAME", att.ifname.clone()),
        ("CNI_ARGS", att.cni_args()),
        ("CNI_PATH", path),
    ]
}

/// The plugin's stdin: its own config with the network's `name` and `cniVersion`,
/// the previous result in the chain, and the runtime config for the capabilities it
/// declares.
pub fn plugin_stdin(
    network_name: &str,
    cni_version: &str,
    plugin: &Map<String, Value>,
    prev_result: Option<&Value>,
    att: &Attachment,
) -> Value {
    let mut conf = plugin.clone();
    conf.insert("name".into(), network_name.into());
    conf.insert("cniVersion".into(), cni_version.into());
    if let Some(prev) = prev_result {
        conf.insert("prevResult".into(), prev.clone());
    }
    if super::config::has_capability(plugin, "portMappings") && !att.port_mappings.is_empty() {
        let mut rc = Map::new();
        rc.insert(
            "portMappings".into(),
            serde_json::to_value(&att.port_mappings).unwrap_or_default(),
        );
        conf.insert("runtimeConfig".into(), Value::Object(rc));
    }
    Value::Object(conf)
}

/// The first executable file called `plugin_type` in `dirs`.
pub fn find_plugin(plugin_type: &str, dirs: &[PathBuf]) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    dirs.iter()
        .map(|d| d.join(plugin_type))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .ok_or_else(|| Error::PluginNotFound {
            plugin: plugin_type.to_string(),
            dirs: dirs.to_vec(),
        })
}

/// Runs the plugin binary; returns its stdout on success.
pub async fn run_plugin(
    binary: &Path,
    cmd: Command,
    env: &[(&'static str, String)],
    stdin: &Value,
    timeout: Duration,
) -> Result<Vec<u8>> {
    let plugin = binary
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut child = tokio::process::Command::new(binary)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(io("spawn", binary))?;
    let input = serde_json::to_vec(stdin).unwrap_or_default();
    let mut pipe = child.stdin.take().expect("stdin is piped");
    let run = async move {
        // A plugin may exit without reading stdin; its error is in the output.
        let _ = pipe.write_all(&input).await;
        drop(pipe);
        child.wait_with_output().await
    };
    let out = tokio::time::timeout(timeout, run)
        .await
        .map_err(|_| Error::PluginTimeout {
            plugin: plugin.clone(),
            command: cmd.as_str(),
        })?
        .map_err(io("wait for", binary))?;
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(Error::Plugin {
            plugin,
            command: cmd.as_str(),
            error: PluginError::from_output(&out.stdout, &out.stderr, &out.status.to_string()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn att() -> Attachment {
        Attachment {
            container_id: "abc123".into(),
            ifname: "eth0".into(),
            pod_namespace: "default".into(),
            pod_name: "web".into(),
            pod_uid: "u-1".into(),
            port_mappings: vec![PortMapping {
                host_port: 8080,
                container_port: 80,
                protocol: "tcp".into(),
                host_ip: String::new(),
            }],
        }
    }

    #[test]
    fn env_has_every_cni_variable() {
        let dirs = [PathBuf::from("/opt/cni/bin"), PathBuf::from("/usr/lib/cni")];
        let env = plugin_env(
            Command::Add,
            &att(),
            Some(Path::new("/run/vessel/netns/abc123")),
            &dirs,
        );
        let get = |k: &str| {
            env.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.as_str())
                .unwrap()
        };
        assert_eq!(get("CNI_COMMAND"), "ADD");
        assert_eq!(get("CNI_CONTAINERID"), "abc123");
        assert_eq!(get("CNI_NETNS"), "/run/vessel/netns/abc123");
        assert_eq!(get("CNI_IFNAME"), "eth0");
        assert_eq!(get("CNI_PATH"), "/opt/cni/bin:/usr/lib/cni");
        assert_eq!(
            get("CNI_ARGS"),
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;\
             K8S_POD_INFRA_CONTAINER_ID=abc123;K8S_POD_UID=u-1"
        );
        let del = plugin_env(Command::Del, &Attachment::default(), None, &dirs);
        assert!(del.contains(&("CNI_COMMAND", "DEL".into())));
        assert!(del.contains(&("CNI_NETNS", String::new())));
        assert!(del.contains(&("CNI_ARGS", "IgnoreUnknown=1".into())));
    }

    #[test]
    fn stdin_injects_name_version_prev_result_and_port_mappings() {
        let bridge = json!({"type": "bridge", "bridge": "cni0"})
            .as_object()
            .unwrap()
            .clone();
        let portmap = json!({"type": "portmap", "capabilities": {"portMappings": true}})
            .as_object()
            .unwrap()
            .clone();
        let first = plugin_stdin("pods", "1.0.0", &bridge, None, &att());
        assert_eq!(first["name"], "pods");
        assert_eq!(first["cniVersion"], "1.0.0");
        assert_eq!(first["bridge"], "cni0");
        assert!(first.get("prevResult").is_none());
        assert!(
            first.get("runtimeConfig").is_none(),
            "bridge lacks the capability"
        );

        let prev = json!({"cniVersion": "1.0.0", "ips": [{"address": "10.88.0.2/16"}]});
        let second = plugin_stdin("pods", "1.0.0", &portmap, Some(&prev), &att());
        assert_eq!(second["prevResult"], prev);
        assert_eq!(
            second["runtimeConfig"]["portMappings"],
            json!([{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}])
        );
        let none = plugin_stdin("pods", "1.0.0", &portmap, None, &Attachment::default());
        assert!(none.get("runtimeConfig").is_none());
    }

    #[test]
    fn finds_only_executable_plugins() {
        use std::os::unix::fs::PermissionsExt;
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        std::fs::write(a.path().join("bridge"), "").unwrap();
        let exe = b.path().join("bridge");
        std::fs::write(&exe, "").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let dirs = [a.path().to_path_buf(), b.path().to_path_buf()];
        assert_eq!(find_plugin("bridge", &dirs).unwrap(), exe);
        assert!(matches!(
            find_plugin("macvlan", &dirs),
            Err(Error::PluginNotFound { .. })
        ));
    }

    #[tokio::test]
    async fn plugin_errors_carry_the_plugin_message() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let exe = d.path().join("failing");
        std::fs::write(
            &exe,
            "#!/bin/sh\ncat >/dev/null\necho \"{\\\"code\\\":11,\\\"msg\\\":\\\"no $CNI_COMMAND\\\"}\"\nexit 1\n",
        )
        .unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let env = plugin_env(Command::Add, &att(), None, &[]);
        let err = run_plugin(
            &exe,
            Command::Add,
            &env,
            &json!({}),
            Duration::from_secs(10),
        )
        .await
        .unwrap_err();
        match err {
            Error::Plugin {
                plugin,
                command,
                error,
            } => {
                assert_eq!(plugin, "failing");
                assert_eq!(command, "ADD");
                assert_eq!(error.code, 11);
                assert_eq!(error.msg, "no ADD");
            }
            other => panic!("unexpected {other}"),
        }
    }
}

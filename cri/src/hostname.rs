//! The one place a pod's hostname is derived: the guest's kernel hostname, the
//! containers' UTS hostname, `/etc/hostname` and the `hosts` line all use it.

use k8s_cri::v1 as cri;

/// Longest hostname Linux accepts is 64 bytes; a DNS label is at most 63.
const MAX_LABEL: usize = 63;

/// The pod's hostname: `hostname` when given, else the pod name (as the kubelet
/// would pass it). Either is made a valid DNS label the way the kubelet truncates
/// pod names: lowercase, characters outside `[a-z0-9-.]` become `-`, at most 63
/// bytes, no trailing `-` or `.`. Direct CRI clients (critest) send pod names far
/// longer than a hostname may be.
pub fn pod_hostname(config: &cri::PodSandboxConfig) -> String {
    let raw = if config.hostname.is_empty() {
        config
            .metadata
            .as_ref()
            .map(|m| m.name.as_str())
            .unwrap_or_default()
    } else {
        config.hostname.as_str()
    };
    let mut name: String = raw
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .take(MAX_LABEL)
        .collect();
    while name.ends_with('-') || name.ends_with('.') {
        name.pop();
    }
    let name = name.trim_start_matches(['-', '.']).to_owned();
    if name.is_empty() {
        "localhost".into()
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(name: &str, hostname: &str) -> cri::PodSandboxConfig {
        cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.into(),
                ..Default::default()
            }),
            hostname: hostname.into(),
            ..Default::default()
        }
    }

    #[test]
    fn given_hostname_wins_and_names_are_labels() {
        assert_eq!(pod_hostname(&cfg("web", "")), "web");
        assert_eq!(pod_hostname(&cfg("web", "h1")), "h1");
        // critest's pod names: ~70 characters with a UUID.
        let long = "podsandbox-for-create-container-with-a-rather-long-name-6f1b2c3d-aaaa-bbbb";
        let h = pod_hostname(&cfg(long, ""));
        assert!(h.len() <= 63, "{h}");
        assert!(long.starts_with(&h));
        assert_eq!(
            pod_hostname(&cfg(&format!("{}-x", "a".repeat(62)), "")),
            "a".repeat(62)
        );
        assert_eq!(pod_hostname(&cfg("My_Pod", "")), "my-pod");
        assert_eq!(pod_hostname(&cfg("", "")), "localhost");
        assert_eq!(pod_hostname(&cfg("---", "")), "localhost");
    }
}

//! The pod-wide files the containers bind-mount from the share dir.

use std::collections::BTreeMap;

use k8s_cri::v1 as cri;

/// hosts, resolv.conf and hostname of a pod.
pub fn pod_files(config: &cri::PodSandboxConfig) -> BTreeMap<&'static str, String> {
    let hostname = crate::hostname::pod_hostname(config);
    let hosts = format!(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n"
    );
    let resolv = config
        .dns_config
        .as_ref()
        .map(|dns| crate::podnet::resolv_conf(&dns.servers, &dns.searches, &dns.options))
        .unwrap_or_default();
    BTreeMap::from([
        ("hosts", hosts),
        ("resolv.conf", resolv),
        ("hostname", format!("{hostname}\n")),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_files_follow_the_config() {
        let config = cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: "web".into(),
                ..Default::default()
            }),
            dns_config: Some(cri::DnsConfig {
                servers: vec!["10.0.0.10".into()],
                searches: vec!["ns.svc.cluster.local".into(), "svc.cluster.local".into()],
                options: vec!["ndots:5".into()],
            }),
            ..Default::default()
        };
        let f = pod_files(&config);
        assert_eq!(f["hostname"], "web\n");
        assert!(f["hosts"].contains("127.0.1.1\tweb\n"));
        assert_eq!(
            f["resolv.conf"],
            "nameserver 10.0.0.10\nsearch ns.svc.cluster.local svc.cluster.local\noptions ndots:5\n"
        );
        let mut c = config.clone();
        c.hostname = "h1".into();
        c.dns_config = None;
        let f = pod_files(&c);
        assert_eq!(f["hostname"], "h1\n");
        assert_eq!(f["resolv.conf"], "");
    }
}

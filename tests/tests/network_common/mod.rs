//! Shared helpers of the network_* end-to-end tests: what they inspect in the "test
//! host" network namespace vesseld runs in ([`TestHost`]), the example CNI config
//! installed into a daemon, and the listings the leak checks compare.
// Each test binary uses its own subset of these helpers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_cri::v1 as cri;
use vessel_tests::cri::CriClient;
use vessel_tests::daemon::TestDaemon;
pub use vessel_tests::testhost::TestHost;

/// The example config shipped in docs/: bridge + host-local + portmap + loopback.
pub const CONFLIST: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../docs/examples/10-vessel.conflist"
);

/// What the leak checks and the network tests ask of a test host beyond
/// [`TestHost`]'s own methods.
pub trait HostExt {
    /// Runs a command in the test host namespace; panics unless it succeeds. Stdout.
    fn exec_ok(&self, cmd: &[&str]) -> String;
    /// An HTTP/1.0 GET of /index.html from the test host (response with headers).
    fn http_get(&self, ip: &str, port: u16) -> String;
    /// Names of the links of one kind (`veth`, `tun`, `bridge`).
    fn links_of_type(&self, kind: &str) -> Vec<String>;
    /// `iptables-save` (or `ip6tables-save`) without what changes on its own: the
    /// header/footer comments and the packet counters of the chain lines.
    fn iptables_rules(&self, save: &str) -> Vec<String>;
    /// The chains whose names start with `CNI-`, in any IPv4 table.
    fn cni_chains(&self) -> Vec<String>;
}

impl HostExt for TestHost {
    fn exec_ok(&self, cmd: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", self.name()])
            .args(cmd)
            .output()
            .expect("ip netns exec");
        assert!(
            out.status.success(),
            "{cmd:?} in {}: {}",
            self.name(),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn http_get(&self, ip: &str, port: u16) -> String {
        let (_, out) = self.exec(&[
            "sh",
            "-c",
            &format!("printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | busybox nc -w 3 {ip} {port}"),
        ]);
        out
    }

    fn links_of_type(&self, kind: &str) -> Vec<String> {
        self.exec_ok(&["ip", "-o", "link", "show", "type", kind])
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_owned())
            .collect()
    }

    fn iptables_rules(&self, save: &str) -> Vec<String> {
        self.exec_ok(&[save])
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| match (l.strip_prefix(':'), l.rfind(" [")) {
                (Some(_), Some(i)) => l[..i].to_owned(),
                _ => l.to_owned(),
            })
            .collect()
    }

    fn cni_chains(&self) -> Vec<String> {
        self.iptables_rules("iptables-save")
            .iter()
            .filter_map(|l| l.strip_prefix(':'))
            .filter_map(|l| l.split_whitespace().next())
            .filter(|c| c.starts_with("CNI-"))
            .map(str::to_owned)
            .collect()
    }
}

/// The example conflist with host-local's store inside the test dir.
pub fn install_conflist(d: &TestDaemon) {
    install_conflist_with(d, |_| {});
}

/// The example conflist with host-local's store at `<test dir>/cni-ipam`, after `edit`
/// (e.g. another network name, bridge or subnet).
pub fn install_conflist_with(d: &TestDaemon, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut conf: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(CONFLIST).unwrap()).unwrap();
    conf["plugins"][0]["ipam"]["dataDir"] =
        serde_json::Value::String(ipam_dir(d).display().to_string());
    edit(&mut conf);
    std::fs::write(
        d.cni_conf_dir().join("10-vessel.conflist"),
        serde_json::to_vec_pretty(&conf).unwrap(),
    )
    .unwrap();
}

/// host-local's store (one dir per network name below it).
pub fn ipam_dir(d: &TestDaemon) -> PathBuf {
    d.dir().join("cni-ipam")
}

/// IP reservations host-local holds (files named after an address; `lock` and
/// `last_reserved_ip.*` are its bookkeeping and stay).
pub fn ip_reservations(d: &TestDaemon) -> Vec<PathBuf> {
    files_under(&ipam_dir(d))
        .into_iter()
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.parse::<std::net::IpAddr>().is_ok())
        })
        .collect()
}

pub async fn network_ready(c: &mut CriClient) -> cri::RuntimeCondition {
    c.condition("NetworkReady").await.unwrap()
}

/// Every non-directory below `dir` (none if it does not exist).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.path().is_dir() {
                out.extend(files_under(&e.path()));
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

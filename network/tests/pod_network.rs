//! Root-only integration tests: real CNI plugins (Debian's containernetworking-plugins
//! in /usr/lib/cni) run inside a "test host" network namespace the test creates, so
//! the machine's own network is never touched.

use std::collections::BTreeSet;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use vessel_network::{NetNs, NetworkConfig, NetworkManager, PodNetworkRequest, PortMapping};

const PLUGINS: &str = "/usr/lib/cni";
/// Chains portmap creates once per network namespace and shares between pods.
const SHARED_CHAINS: &[&str] = &[
    "CNI-HOSTPORT-DNAT",
    "CNI-HOSTPORT-MASQ",
    "CNI-HOSTPORT-SETMARK",
];

/// The tests run one at a time: the fd-leak check counts the whole process's fds.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn usable() -> bool {
    let root = nix::unistd::geteuid().is_root();
    let plugins = Path::new(PLUGINS).join("bridge").exists();
    if !(root && plugins) {
        assert!(
            std::env::var_os("VESSEL_SKIP_VM").is_some(),
            "needs root and {PLUGINS}; set VESSEL_SKIP_VM=1 to skip the tests that need them"
        );
        eprintln!("SKIPPED (VESSEL_SKIP_VM): needs root and {PLUGINS}");
    }
    root && plugins
}

/// A network namespace standing in for the host (`ip netns add`), deleted on drop.
struct TestHost {
    name: String,
}

impl TestHost {
    fn new() -> TestHost {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "vessel-nt-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        run("ip", &["netns", "add", &name]);
        let host = TestHost { name };
        host.exec("ip", &["link", "set", "lo", "up"]);
        host
    }

    fn netns(&self) -> NetNs {
        NetNs::at(Path::new("/run/netns").join(&self.name))
    }

    /// Runs a command in the test host namespace; returns stdout, panics on failure.
    fn exec(&self, cmd: &str, args: &[&str]) -> String {
        let mut full = vec!["netns", "exec", &self.name, cmd];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    fn cni_chains(&self) -> BTreeSet<String> {
        self.exec("iptables-save", &[])
            .lines()
            .filter_map(|l| l.strip_prefix(':'))
            .filter_map(|l| l.split_whitespace().next())
            .filter(|c| c.starts_with("CNI-"))
            .map(str::to_string)
            .collect()
    }

    fn links(&self) -> Vec<String> {
        self.exec("ip", &["-o", "link", "show"])
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .collect()
    }

    /// Runs `f` on a thread inside the test host namespace with a tokio runtime built
    /// there: CNI plugins forked from it create their host side here.
    fn run<R: Send>(&self, f: impl AsyncFnOnce() -> R + Send) -> R {
        self.netns()
            .run(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(f())
            })
            .unwrap()
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn nsenter(ns: &Path, cmd: &[&str]) -> String {
    let net = format!("--net={}", ns.display());
    let mut args = vec![net.as_str()];
    args.extend_from_slice(cmd);
    run("nsenter", &args)
}

struct Env {
    dir: tempfile::TempDir,
    manager: NetworkManager,
}

impl Env {
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("net.d");
        std::fs::create_dir_all(&conf).unwrap();
        let ipam = dir.path().join("ipam");
        let conflist = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "vessel-test",
            "plugins": [
                {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": true,
                 "hairpinMode": true, "macspoofchk": true,
                 "ipam": {"type": "host-local", "dataDir": ipam,
                          "ranges": [[{"subnet": "10.88.0.0/16"}]],
                          "routes": [{"dst": "0.0.0.0/0"}]}},
                {"type": "portmap", "capabilities": {"portMappings": true}},
                {"type": "loopback"}
            ]
        });
        std::fs::write(conf.join("10-test.conflist"), conflist.to_string()).unwrap();
        let mut config = NetworkConfig::new(&dir.path().join("run"), &dir.path().join("state"));
        config.cni_conf_dir = conf;
        config.cni_bin_dirs = vec![PLUGINS.into()];
        Env {
            manager: NetworkManager::new(config),
            dir,
        }
    }

    fn netns_dir(&self) -> PathBuf {
        self.manager.config().netns_dir.clone()
    }

    fn cache_entries(&self) -> Vec<PathBuf> {
        list(&self.manager.config().cni_cache_dir.join("results"))
    }

    /// host-local's allocation files (one per leased IP).
    fn leases(&self) -> Vec<PathBuf> {
        list(&self.dir.path().join("ipam/vessel-test"))
            .into_iter()
            .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("10."))
            .collect()
    }
}

impl Drop for Env {
    /// A failed test may leave pod namespaces mounted inside the temp dir.
    fn drop(&mut self) {
        for ns in list(&self.netns_dir()) {
            let _ = NetNs::at(ns).remove();
        }
    }
}

fn list(dir: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(dir) {
        Ok(rd) => rd.map(|e| e.unwrap().path()).collect(),
        Err(_) => Vec::new(),
    }
}

fn request(id: &str) -> PodNetworkRequest {
    PodNetworkRequest {
        pod_id: id.into(),
        pod_name: "web".into(),
        pod_namespace: "default".into(),
        pod_uid: "uid-1".into(),
        port_mappings: vec![PortMapping {
            host_port: 18080,
            container_port: 80,
            protocol: "tcp".into(),
            host_ip: String::new(),
        }],
    }
}

#[test]
fn setup_bridges_eth0_to_the_tap_and_teardown_leaves_nothing() {
    let _serial = serial();
    if !usable() {
        return;
    }
    let host = TestHost::new();
    let env = Env::new();
    let id = "pod-one";
    let started = Instant::now();
    let pod = host.run(async || env.manager.setup(&request(id)).await.unwrap());
    eprintln!("setup took {:?}", started.elapsed());

    // CNI result and plan.
    let ip = pod.result.ips[0].address;
    let addr = match ip.addr {
        std::net::IpAddr::V4(a) => a,
        other => panic!("expected IPv4, got {other}"),
    };
    assert_eq!(
        (addr.octets()[0], addr.octets()[1], ip.prefix_len),
        (10, 88, 16)
    );
    assert_eq!(pod.veth.addresses, vec![ip]);
    let guest = &pod.plan.interfaces[0];
    assert_eq!(guest.mac, pod.veth.mac);
    assert_eq!(guest.addresses, vec![ip]);
    assert!(pod
        .plan
        .routes
        .iter()
        .any(|r| r.dst.is_default() && r.gateway == Some("10.88.0.1".parse().unwrap())));

    // What the kernel says, independently of the crate.
    let ns = pod.netns.path().to_path_buf();
    assert_eq!(ns, env.netns_dir().join(id));
    let eth0 = nsenter(&ns, &["ip", "-o", "addr", "show", "dev", "eth0"]);
    assert!(eth0.contains(&ip.to_string()), "{eth0}");
    let tap = nsenter(&ns, &["ip", "-d", "-o", "link", "show", "tap0"]);
    assert!(
        tap.contains("tap") && tap.contains(&format!("mtu {}", pod.veth.mtu)),
        "{tap}"
    );
    assert!(
        tap.contains(",UP") || tap.contains("<UP") || tap.contains(",UP,"),
        "{tap}"
    );
    for (from, to) in [("eth0", "tap0"), ("tap0", "eth0")] {
        let filters = nsenter(&ns, &["tc", "filter", "show", "dev", from, "ingress"]);
        assert!(
            filters.contains("protocol all")
                && filters.contains("mirred")
                && filters.contains(&format!("Redirect to device {to}")),
            "{from}: {filters}"
        );
    }
    assert_eq!(
        env.cache_entries(),
        vec![env
            .manager
            .config()
            .cni_cache_dir
            .join(format!("results/{id}-eth0.json"))]
    );
    assert_eq!(env.leases().len(), 1);
    let chains = host.cni_chains();
    assert!(
        chains.len() > SHARED_CHAINS.len(),
        "per-pod chains expected: {chains:?}"
    );
    assert!(host.exec("iptables-save", &[]).contains("18080"));
    // macspoofchk (as in docs/examples/10-vessel.conflist): the bridge plugin's
    // nftables chain for the pod's port drops frames not from the pod's MAC.
    let nft = host.exec("nft", &["list", "ruleset"]);
    assert!(
        nft.contains("cni-br-iface") && nft.contains(&pod.veth.mac.to_lowercase()),
        "{nft}"
    );

    // The redirect: the test host pings the pod IP; the "guest" is this test, reading
    // the tap fd and answering ARP and the echo request through it.
    let pod_mac = pod.veth.mac.to_lowercase();
    let mac = parse_mac(&pod.veth.mac);
    // A "guest" answering with another MAC is cut off by macspoofchk: its ARP reply
    // and echo reply never leave the bridge port, so the ping fails.
    let spoofed = {
        let mut m = mac;
        m[5] ^= 0x5a;
        m
    };
    let tap_fd = pod.tap.fd().try_clone_to_owned().unwrap();
    let responder = std::thread::spawn(move || answer_on_tap(tap_fd, spoofed, addr.octets()));
    assert!(
        !ping_from(&host, addr),
        "a reply from a spoofed MAC reached the host"
    );
    let seen = responder.join().unwrap();
    assert!(seen.arp, "the spoofing guest was asked");
    host.exec("ip", &["neigh", "flush", "all"]);
    let tap_fd = pod.tap.fd().try_clone_to_owned().unwrap();
    let responder = std::thread::spawn(move || answer_on_tap(tap_fd, mac, addr.octets()));
    let replied = ping_from(&host, addr);
    let seen = responder.join().unwrap();
    assert!(
        seen.arp && seen.echo,
        "tap saw arp={} echo={}",
        seen.arp,
        seen.echo
    );
    assert!(
        replied,
        "the echo reply written to the tap did not reach the test host"
    );

    // Teardown while the tap fd is still open (as if the VM were still exiting), by a
    // "restarted" manager whose config dir no longer has the network: DEL must come
    // from the cache alone.
    std::fs::remove_file(env.manager.config().cni_conf_dir.join("10-test.conflist")).unwrap();
    let restarted = NetworkManager::new(env.manager.config().clone());
    let started = Instant::now();
    host.run(async || restarted.teardown(id).await.unwrap());
    eprintln!("teardown took {:?}", started.elapsed());
    drop(pod);
    assert!(!ns.exists());
    assert!(list(&env.netns_dir()).is_empty());
    assert!(env.cache_entries().is_empty());
    assert!(env.leases().is_empty());
    assert_no_pod_leftovers(&host, id);
    let nft = host.exec("nft", &["list", "ruleset"]);
    assert!(!nft.contains(&pod_mac), "{nft}");
    // Idempotent.
    host.run(async || env.manager.teardown(id).await.unwrap());
}

#[test]
fn twenty_cycles_leak_nothing() {
    let _serial = serial();
    if !usable() {
        return;
    }
    let host = TestHost::new();
    let env = Env::new();
    let fds_before = list(Path::new("/proc/self/fd")).len();
    let (mut up, mut down) = (Duration::ZERO, Duration::ZERO);
    for i in 0..20 {
        let id = format!("cycle-{i}");
        let t = Instant::now();
        let pod = host.run(async || env.manager.setup(&request(&id)).await.unwrap());
        up += t.elapsed();
        drop(pod);
        let t = Instant::now();
        host.run(async || env.manager.teardown(&id).await.unwrap());
        down += t.elapsed();
        assert_no_pod_leftovers(&host, &id);
    }
    eprintln!("mean setup {:?}, mean teardown {:?}", up / 20, down / 20);
    assert!(list(&env.netns_dir()).is_empty());
    assert!(env.cache_entries().is_empty());
    assert!(env.leases().is_empty());
    assert_eq!(
        list(Path::new("/proc/self/fd")).len(),
        fds_before,
        "fd leak"
    );
}

/// The first pods of a fresh host, set up at once: every one gets its network
/// (portmap's shared chains are created once, not raced for), and tearing them all
/// down at once leaves nothing.
#[test]
fn concurrent_first_setups_in_fresh_hosts() {
    let _serial = serial();
    if !usable() {
        return;
    }
    const PODS: u16 = 4;
    for round in 0..3 {
        let host = TestHost::new();
        let env = Env::new();
        let ids: Vec<String> = (0..PODS).map(|i| format!("par-{round}-{i}")).collect();
        let requests: Vec<PodNetworkRequest> = ids
            .iter()
            .zip(0..)
            .map(|(id, i)| {
                let mut r = request(id);
                r.port_mappings[0].host_port = 18100 + i;
                r
            })
            .collect();
        let results = host.run(async || {
            let setups = requests.iter().map(|r| env.manager.setup(r));
            futures_util::future::join_all(setups).await
        });
        let mut pods = Vec::new();
        for (id, r) in ids.iter().zip(results) {
            pods.push(r.unwrap_or_else(|e| panic!("round {round}, {id}: {e}")));
        }
        let ips: BTreeSet<_> = pods
            .iter()
            .map(|p| p.plan.interfaces[0].addresses[0].addr)
            .collect();
        assert_eq!(ips.len(), usize::from(PODS), "distinct IPs: {ips:?}");
        drop(pods);
        let results = host.run(async || {
            futures_util::future::join_all(ids.iter().map(|id| env.manager.teardown(id))).await
        });
        for r in results {
            r.unwrap();
        }
        for id in &ids {
            assert_no_pod_leftovers(&host, id);
        }
        assert!(env.leases().is_empty(), "round {round}: {:?}", env.leases());
        assert!(env.cache_entries().is_empty());
    }
}

#[test]
fn failed_setup_unwinds() {
    let _serial = serial();
    if !usable() {
        return;
    }
    let host = TestHost::new();
    let env = Env::new();
    // A chain whose second plugin is missing: ADD of bridge succeeds, then fails.
    let conf = env.manager.config().cni_conf_dir.join("10-test.conflist");
    let mut list_json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&conf).unwrap()).unwrap();
    list_json["plugins"][1]["type"] = "no-such-plugin".into();
    std::fs::write(&conf, list_json.to_string()).unwrap();
    let err = host.run(async || env.manager.setup(&request("broken")).await.unwrap_err());
    assert!(err.to_string().contains("no-such-plugin"), "{err}");
    assert!(list(&env.netns_dir()).is_empty());
    assert!(env.cache_entries().is_empty());
    assert!(
        env.leases().is_empty(),
        "bridge's IP must be released by the unwind"
    );
    assert_no_pod_leftovers(&host, "broken");
}

fn assert_no_pod_leftovers(host: &TestHost, id: &str) {
    let links = host.links();
    assert!(
        links.iter().all(|l| l == "lo" || l == "cni0"),
        "links left: {links:?}"
    );
    let chains = host.cni_chains();
    assert!(
        chains.iter().all(|c| SHARED_CHAINS.contains(&c.as_str())),
        "chains left: {chains:?}"
    );
    assert!(
        !host.exec("iptables-save", &[]).contains(id),
        "rules mention {id}"
    );
}

/// Sends one ICMP echo request from the test host (raw socket) and waits for the reply.
fn ping_from(host: &TestHost, dst: std::net::Ipv4Addr) -> bool {
    use nix::sys::socket::{recv, sendto, setsockopt, socket, sockopt, AddressFamily};
    use nix::sys::socket::{MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn};
    use std::os::fd::AsRawFd;
    host.netns()
        .run(|| {
            let sock = socket(
                AddressFamily::Inet,
                SockType::Raw,
                SockFlag::SOCK_CLOEXEC,
                SockProtocol::Icmp,
            )
            .unwrap();
            let timeout = nix::sys::time::TimeVal::new(0, 200_000);
            setsockopt(&sock, sockopt::ReceiveTimeout, &timeout).unwrap();
            let mut echo = vec![8, 0, 0, 0, 0x56, 0x53, 0, 1];
            echo.extend_from_slice(b"vessel tap redirect");
            let sum = checksum(&echo);
            echo[2..4].copy_from_slice(&sum.to_be_bytes());
            let to = SockaddrIn::from(std::net::SocketAddrV4::new(dst, 0));
            sendto(sock.as_raw_fd(), &echo, &to, MsgFlags::empty()).unwrap();
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut buf = [0u8; 1500];
            while Instant::now() < deadline {
                let Ok(n) = recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty()) else {
                    continue;
                };
                let ihl = usize::from(buf[0] & 0x0f) * 4;
                if n >= ihl + 8
                    && buf[12..16] == dst.octets()
                    && buf[ihl] == 0
                    && buf[ihl + 4..ihl + 6] == [0x56, 0x53]
                {
                    return true;
                }
            }
            false
        })
        .unwrap()
}

fn parse_mac(s: &str) -> [u8; 6] {
    let v: Vec<u8> = s
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect();
    v.try_into().unwrap()
}

#[derive(Default)]
struct Seen {
    arp: bool,
    echo: bool,
}

/// Acts as the guest on the tap: answers ARP for `ip` and one ICMP echo request.
fn answer_on_tap(fd: OwnedFd, mac: [u8; 6], ip: [u8; 4]) -> Seen {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    const VNET_HDR: usize = 10;
    let mut seen = Seen::default();
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut buf = vec![0u8; 65536];
    while !seen.echo && Instant::now() < deadline {
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        if poll(&mut fds, PollTimeout::from(200u16)).unwrap() == 0 {
            continue;
        }
        let n = nix::unistd::read(&fd, &mut buf).unwrap();
        let frame = &buf[VNET_HDR.min(n)..n];
        if frame.len() < 14 {
            continue;
        }
        let reply = match u16::from_be_bytes([frame[12], frame[13]]) {
            0x0806 if frame.len() >= 42 && frame[21] == 1 && frame[38..42] == ip => {
                seen.arp = true;
                let mut r = frame[..42].to_vec();
                r[0..6].copy_from_slice(&frame[6..12]);
                r[6..12].copy_from_slice(&mac);
                r[21] = 2; // reply
                r[22..28].copy_from_slice(&mac);
                r[28..32].copy_from_slice(&ip);
                r[32..42].copy_from_slice(&frame[22..32]);
                r
            }
            0x0800 if frame.len() >= 34 && frame[23] == 1 && frame[30..34] == ip => {
                let ihl = usize::from(frame[14] & 0x0f) * 4;
                if frame[14 + ihl] != 8 {
                    continue;
                }
                seen.echo = true;
                let mut r = frame.to_vec();
                r[0..6].copy_from_slice(&frame[6..12]);
                r[6..12].copy_from_slice(&mac);
                r[26..30].copy_from_slice(&frame[30..34]);
                r[30..34].copy_from_slice(&frame[26..30]);
                let icmp = 14 + ihl;
                r[icmp] = 0; // echo reply
                r[icmp + 2..icmp + 4].fill(0);
                let sum = checksum(&r[icmp..]);
                r[icmp + 2..icmp + 4].copy_from_slice(&sum.to_be_bytes());
                r
            }
            _ => continue,
        };
        let mut out = vec![0u8; VNET_HDR];
        out.extend_from_slice(&reply);
        nix::unistd::write(&fd, &out).unwrap();
    }
    seen
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

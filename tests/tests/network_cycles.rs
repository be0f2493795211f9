//! Pod network teardown under churn: 50 pod VMs created and removed through the CRI
//! socket, two at a time, with vesseld in a test host netns. After every step and at
//! the end nothing of theirs may remain: pod netns, host veths or taps, iptables
//! chains or rules, IP reservations, CNI cache entries, processes, mounts or files.

mod network_common;
mod runtime_common;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use network_common::*;
use runtime_common::{assert_no_leaks, guest_dir, pod_config, pod_status, run_pod, Cleanup};
use vessel_tests::cri::CriClient;
use vessel_tests::daemon::TestDaemon;

/// Names of its own, so nothing can be confused with network_pod.rs's `vessel0`
/// network (that runs in another test host netns anyway).
const NET_NAME: &str = "vessel-cycles";
const BRIDGE: &str = "vcyc0";
const SUBNET: &str = "10.89.7.0/24";
const SUBNET_PREFIX: [u8; 3] = [10, 89, 7];
/// Pods running at once; STEPS × PARALLEL pods in all.
const PARALLEL: usize = 2;
const STEPS: usize = 25;
/// Chains portmap creates once per netns and shares between pods; they stay, with
/// only their fixed rules, once the last pod with a hostPort is gone.
const SHARED_CHAINS: &[&str] = &[
    "CNI-HOSTPORT-DNAT",
    "CNI-HOSTPORT-MASQ",
    "CNI-HOSTPORT-SETMARK",
];

fn usable() -> bool {
    let guest = guest_dir();
    if !guest.join("vmlinux").is_file() || !guest.join("initrd.img").is_file() {
        vessel_tests::skip_vm_or_fail(&format!("no guest in {}", guest.display()));
        return false;
    }
    if !nix::unistd::geteuid().is_root() || !Path::new("/usr/lib/cni/bridge").exists() {
        vessel_tests::skip_vm_or_fail("needs root and the CNI plugins in /usr/lib/cni");
        return false;
    }
    true
}

/// vesseld with the guest and the cycles network, running in `host`.
fn start_daemon(host: &TestHost) -> TestDaemon {
    let guest = guest_dir();
    let extra = format!(
        "[guest]\nkernel = {:?}\ninitrd = {:?}\n\n[runtimes.default]\nvcpus = 1\nmemory_mib = 256\n",
        guest.join("vmlinux").display().to_string(),
        guest.join("initrd.img").display().to_string(),
    );
    let mut d = TestDaemon::prepare(&extra).unwrap();
    install_conflist_with(&d, |conf| {
        conf["name"] = NET_NAME.into();
        conf["plugins"][0]["bridge"] = BRIDGE.into();
        conf["plugins"][0]["ipam"]["ranges"] = serde_json::json!([[{ "subnet": SUBNET }]]);
    });
    d.set_netns(host.path());
    d.restart().unwrap();
    d
}

/// Pod `n`: DNS settings always, a hostPort on even steps (so portmap's per-pod
/// chains come and go too).
fn cycle_pod_config(d: &TestDaemon, n: usize) -> cri::PodSandboxConfig {
    let name = format!("cyc-{n}");
    let mut cfg = pod_config(&name, &d.dir().join("logs").join(&name));
    cfg.dns_config = Some(cri::DnsConfig {
        servers: vec!["10.96.0.10".into()],
        searches: vec!["cycles.svc.cluster.local".into()],
        options: vec!["ndots:2".into()],
    });
    if (n / PARALLEL).is_multiple_of(2) {
        cfg.port_mappings = vec![cri::PortMapping {
            protocol: cri::Protocol::Tcp as i32,
            container_port: 8080,
            host_port: 20080 + (n % PARALLEL) as i32,
            host_ip: String::new(),
        }];
    }
    cfg
}

/// RunPodSandbox + PodSandboxStatus: the id and the pod IP (checked to be in SUBNET).
async fn up(mut c: CriClient, cfg: cri::PodSandboxConfig) -> (String, Ipv4Addr) {
    let name = cfg.metadata.as_ref().unwrap().name.clone();
    let id = run_pod(&mut c, &cfg, "")
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox {name}: {e:?}"));
    let st = pod_status(&mut c, &id).await.status.unwrap();
    assert_eq!(
        st.state,
        cri::PodSandboxState::SandboxReady as i32,
        "{name}"
    );
    let ip_text = st.network.unwrap_or_default().ip;
    let ip: Ipv4Addr = ip_text
        .parse()
        .unwrap_or_else(|_| panic!("{name}: pod IP {ip_text:?}"));
    let o = ip.octets();
    assert!(
        o[..3] == SUBNET_PREFIX && (2..=254).contains(&o[3]),
        "{name}: pod IP {ip} not a host address of {SUBNET}"
    );
    (id, ip)
}

/// StopPodSandbox + RemovePodSandbox.
async fn down(mut c: CriClient, id: String) {
    c.runtime
        .stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: id.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("StopPodSandbox {id}: {e:?}"));
    c.runtime
        .remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: id.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("RemovePodSandbox {id}: {e:?}"));
}

/// Runs the futures as concurrent tasks; their results in order (a panic in one is
/// re-raised here).
async fn join_all<T: Send + 'static>(
    futs: impl IntoIterator<Item = impl std::future::Future<Output = T> + Send + 'static>,
) -> Vec<T> {
    let tasks: Vec<_> = futs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::new();
    for t in tasks {
        match t.await {
            Ok(v) => out.push(v),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("{e}"),
        }
    }
    out
}

/// Everything pod networking may leave in the test host and in vesseld's dirs once
/// no pod exists; `removed` are the ids of all pods so far, `baseline` the iptables
/// state after the first step (the shared chains portmap keeps).
fn leftovers(
    host: &TestHost,
    d: &TestDaemon,
    removed: &[String],
    baseline: Option<&[String]>,
) -> Vec<String> {
    let mut left = Vec::new();
    let show = |what: &str, p: &Path| format!("{what}: {}", p.display());
    left.extend(
        files_under(&d.run_root().join("netns"))
            .iter()
            .map(|p| show("pod netns pin", p)),
    );
    left.extend(
        files_under(&d.root().join("cni"))
            .iter()
            .map(|p| show("CNI cache entry", p)),
    );
    left.extend(
        ip_reservations(d)
            .iter()
            .map(|p| show("host-local reservation", p)),
    );
    // With dataDir set, host-local must not have used its default store.
    let default_store = Path::new("/var/lib/cni/networks").join(NET_NAME);
    if default_store.exists() {
        left.push(show("host-local default store", &default_store));
    }
    if let Ok(rd) = std::fs::read_dir("/run/netns") {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if removed.iter().any(|id| n.contains(id.as_str())) {
                left.push(format!("netns /run/netns/{n}"));
            }
        }
    }
    left.extend(
        host.links()
            .into_iter()
            .filter(|l| l != "lo" && l != BRIDGE)
            .map(|l| format!("link {l}")),
    );
    for kind in ["veth", "tun"] {
        left.extend(
            host.links_of_type(kind)
                .into_iter()
                .map(|l| format!("{kind} link {l}")),
        );
    }
    left.extend(
        host.cni_chains()
            .into_iter()
            .filter(|c| !SHARED_CHAINS.contains(&c.as_str()))
            .map(|c| format!("iptables chain {c}")),
    );
    for save in ["iptables-save", "ip6tables-save"] {
        let rules = host.iptables_rules(save);
        for r in &rules {
            if removed.iter().any(|id| r.contains(id.as_str())) {
                left.push(format!("{save} rule naming a removed pod: {r}"));
            }
            // The DNAT chain holds one jump per pod with a hostPort, nothing else.
            if r.starts_with("-A CNI-HOSTPORT-DNAT ") {
                left.push(format!("{save} hostPort rule: {r}"));
            }
        }
        if let Some(base) = baseline.filter(|_| save == "iptables-save") {
            let (now, then): (BTreeSet<_>, BTreeSet<_>) =
                (rules.iter().collect(), base.iter().collect());
            left.extend(
                now.difference(&then)
                    .map(|r| format!("{save} line not in the baseline: {r}")),
            );
            left.extend(
                then.difference(&now)
                    .map(|r| format!("{save} baseline line gone: {r}")),
            );
            // Same lines but not the same list: a shared rule added once more.
            if now == then && rules != base {
                left.push(format!(
                    "{save}: rules repeated or reordered:\n{}",
                    rules.join("\n")
                ));
            }
        }
    }
    left
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_pod_cycles_leave_no_network_state() {
    if !usable() {
        return;
    }
    let host = TestHost::new("vcyc").unwrap();
    let d = start_daemon(&host);
    let _cleanup = Cleanup(d.dir().to_owned());
    let mut c = d.client().await.unwrap();
    let cond = network_ready(&mut c).await;
    assert!(cond.status, "{cond:?}");
    assert!(
        leftovers(&host, &d, &[], None).is_empty(),
        "state before any pod"
    );

    let started = Instant::now();
    let (mut t_up, mut t_down) = (Duration::ZERO, Duration::ZERO);
    let mut removed: Vec<String> = Vec::new();
    let mut baseline: Option<Vec<String>> = None;
    for step in 0..STEPS {
        let t = Instant::now();
        let cfgs: Vec<_> = (0..PARALLEL)
            .map(|slot| cycle_pod_config(&d, step * PARALLEL + slot))
            .collect();
        let pods = join_all(cfgs.iter().map(|cfg| up(c.clone(), cfg.clone()))).await;
        t_up += t.elapsed();
        let ips: BTreeSet<_> = pods.iter().map(|p| p.1).collect();
        assert_eq!(
            ips.len(),
            PARALLEL,
            "step {step}: pods share an IP: {pods:?}"
        );

        // The checks below would see these pods' state: the per-pod objects exist now.
        let veths = host.links_of_type("veth");
        assert_eq!(veths.len(), PARALLEL, "step {step}: host veths {veths:?}");
        assert_eq!(
            files_under(&d.run_root().join("netns")).len(),
            PARALLEL,
            "step {step}: netns pins"
        );
        assert_eq!(
            files_under(&d.root().join("cni")).len(),
            PARALLEL,
            "step {step}: CNI cache"
        );
        assert_eq!(ip_reservations(&d).len(), PARALLEL, "step {step}: IPAM");
        let rules = host.iptables_rules("iptables-save").join("\n");
        for (id, _) in &pods {
            assert!(
                rules.contains(id.as_str()),
                "step {step}: no rule names {id}"
            );
        }
        if !cfgs[0].port_mappings.is_empty() {
            assert!(
                rules.contains("-A CNI-HOSTPORT-DNAT "),
                "step {step}: no hostPort rule"
            );
        }

        let t = Instant::now();
        removed.extend(pods.iter().map(|p| p.0.clone()));
        join_all(pods.into_iter().map(|(id, _)| down(c.clone(), id))).await;
        t_down += t.elapsed();

        let left = leftovers(&host, &d, &removed, baseline.as_deref());
        assert!(
            left.is_empty(),
            "after step {step} (pods {}..={}) stopped and removed:\n{}",
            step * PARALLEL,
            step * PARALLEL + PARALLEL - 1,
            left.join("\n")
        );
        if step == 0 {
            let chains = host.cni_chains();
            assert!(
                chains.iter().all(|c| SHARED_CHAINS.contains(&c.as_str())),
                "{chains:?}"
            );
            baseline = Some(host.iptables_rules("iptables-save"));
        }
    }
    let wall = started.elapsed();
    let pods = STEPS * PARALLEL;
    eprintln!(
        "{pods} pods in {STEPS} steps of {PARALLEL}: {wall:?} wall; per step: up {:?}, \
         stop+remove {:?}",
        t_up / STEPS as u32,
        t_down / STEPS as u32
    );

    let listed = c
        .runtime
        .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .items;
    assert!(listed.is_empty(), "pods still listed: {listed:?}");
    let left = leftovers(&host, &d, &removed, baseline.as_deref());
    assert!(left.is_empty(), "after all cycles:\n{}", left.join("\n"));
    assert_no_leaks(&d);
}

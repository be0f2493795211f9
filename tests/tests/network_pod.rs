//! Pod networking end to end. vesseld runs inside a network namespace the test makes
//! (a "test host"), so the CNI bridge, pod subnets and iptables rules live there and
//! never touch the machine's own network. Two pod VMs in all (TCG is slow).

mod network_common;
mod runtime_common;

use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use network_common::*;
use runtime_common::*;
use tonic::Code;
use vessel_tests::cri::CriClient;
use vessel_tests::daemon::TestDaemon;
use vessel_tests::registry::TestRegistry;
use vessel_tests::testimages;

/// Counts one connection's bytes on the bridge address (with a deadline).
const SINK: &str = concat!(
    "import socket,time\n",
    "s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n",
    "s.bind(('10.88.0.1',9000));s.listen(1);s.settimeout(30)\n",
    "c,_=s.accept();c.settimeout(30);t=time.time();n=0\n",
    "while True:\n",
    "    b=c.recv(1<<20)\n",
    "    if not b: break\n",
    "    n+=len(b)\n",
    "d=time.time()-t\n",
    "print('%d bytes in %.3f s = %.1f MiB/s'%(n,d,n/d/1048576))\n",
);

/// A registry + vesseld in `host` with busybox pulled (pulled before moving into the
/// namespace: the registry listens on the machine's loopback).
async fn setup(host: &TestHost) -> Option<(TestRegistry, TestDaemon, CriClient, String)> {
    setup_with(host, "").await
}

/// [`setup`] with `handler_toml` added to `[runtimes.default]`.
async fn setup_with(
    host: &TestHost,
    handler_toml: &str,
) -> Option<(TestRegistry, TestDaemon, CriClient, String)> {
    let guest = guest_dir();
    let (kernel, initrd) = (guest.join("vmlinux"), guest.join("initrd.img"));
    if !kernel.is_file() || !initrd.is_file() {
        vessel_tests::skip_vm_or_fail(&format!("no guest in {}", guest.display()));
        return None;
    }
    let reg = TestRegistry::start().unwrap();
    let extra = format!(
        "[guest]\nkernel = {:?}\ninitrd = {:?}\n\n[runtimes.default]\nvcpus = 1\nmemory_mib = 256\n\
         {handler_toml}\n[runtimes.broken]\nkernel = \"/nonexistent/vmlinux\"\n",
        kernel.display().to_string(),
        initrd.display().to_string()
    );
    let mut d = TestDaemon::prepare(&extra).unwrap();
    d.restart().unwrap();
    d.write_hosts_toml(&reg.addr(), &reg.url()).unwrap();
    let mut c = d.client().await.unwrap();
    let img = testimages::push_busybox(&reg, "net/busybox:1")
        .await
        .unwrap();
    c.pull(&img.reference).await.unwrap();
    drop(c);
    install_conflist(&d);
    d.set_netns(host.path());
    d.restart().unwrap();
    let c = d.client().await.unwrap();
    Some((reg, d, c, img.reference))
}

#[tokio::test(flavor = "multi_thread")]
async fn network_ready_follows_the_cni_conf_dir_and_host_network_is_refused() {
    let d = TestDaemon::start().unwrap();
    let mut c = d.client().await.unwrap();
    let cond = network_ready(&mut c).await;
    assert!(!cond.status);
    assert_eq!(cond.reason, "NetworkPluginNotReady");
    assert!(
        cond.message
            .contains(&d.cni_conf_dir().display().to_string()),
        "{cond:?}"
    );
    install_conflist(&d);
    let cond = network_ready(&mut c).await;
    assert!(cond.status, "{cond:?}");

    let mut cfg = pod_config("hostnet", &d.dir().join("logs"));
    cfg.linux = Some(cri::LinuxPodSandboxConfig {
        security_context: Some(cri::LinuxSandboxSecurityContext {
            namespace_options: Some(cri::NamespaceOption {
                network: cri::NamespaceMode::Node as i32,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
    let e = run_pod(&mut c, &cfg, "").await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("host networking"), "{e:?}");
}

async fn exec_ok(c: &mut CriClient, ctr: &str, cmd: &[&str]) -> String {
    let r = exec(c, ctr, cmd, 30).await.expect("ExecSync");
    let out = String::from_utf8_lossy(&r.stdout).into_owned();
    assert_eq!(
        r.exit_code,
        0,
        "{cmd:?}: {out}{}",
        String::from_utf8_lossy(&r.stderr)
    );
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn pods_get_ips_talk_to_each_other_and_leave_nothing_behind() {
    let host = TestHost::new("vtest").expect("test host netns");
    let Some((_reg, mut d, mut c, image)) = setup(&host).await else {
        return;
    };
    let _cleanup = Cleanup(d.dir().to_owned());
    let cond = network_ready(&mut c).await;
    assert!(cond.status, "{cond:?}");

    // A RunPodSandbox failing after CNI ADD (no kernel) unwinds the network.
    let e = run_pod(
        &mut c,
        &pod_config("broken", &d.dir().join("logs/b")),
        "broken",
    )
    .await
    .unwrap_err();
    assert_ne!(e.code(), Code::Ok);
    assert!(
        files_under(&d.run_root().join("netns")).is_empty(),
        "netns left: {e:?}"
    );
    assert!(
        files_under(&d.root().join("cni")).is_empty(),
        "CNI cache left"
    );
    let links = host.links();
    assert!(
        links.iter().all(|l| l == "lo" || l == "vessel0"),
        "{links:?}"
    );

    // Pod A: httpd on 8080, hostPort 18080, CRI DNS settings.
    let mut cfg_a = pod_config("web", &d.dir().join("logs/web"));
    cfg_a.dns_config = Some(cri::DnsConfig {
        servers: vec!["10.96.0.10".into()],
        searches: vec!["ns1.svc.cluster.local".into(), "svc.cluster.local".into()],
        options: vec!["ndots:5".into()],
    });
    cfg_a.port_mappings = vec![cri::PortMapping {
        protocol: cri::Protocol::Tcp as i32,
        container_port: 8080,
        host_port: 18080,
        host_ip: String::new(),
    }];
    let t0 = Instant::now();
    let pod_a = run_pod(&mut c, &cfg_a, "").await.expect("RunPodSandbox A");
    eprintln!("RunPodSandbox with network: {:?}", t0.elapsed());
    let st = pod_status(&mut c, &pod_a).await.status.unwrap();
    let ip_a = st.network.unwrap().ip;
    assert!(ip_a.starts_with("10.88."), "pod IP {ip_a:?}");

    // The test host reaches the pod VM.
    let (ok, out) = host.exec(&["busybox", "ping", "-c1", "-W5", &ip_a]);
    assert!(ok, "ping {ip_a}: {out}");
    let (_, out) = host.exec(&["busybox", "ping", "-c20", "-i", "0.2", "-W2", &ip_a]);
    eprintln!("pod RTT: {}", out.lines().last().unwrap_or(""));

    let web = create(
        &mut c,
        &pod_a,
        &cfg_a,
        container_config(
            "httpd",
            &image,
            &[
                "/bin/busybox",
                "sh",
                "-c",
                "echo hello-from-web > /tmp/index.html; exec /bin/busybox httpd -f -p 8080 -h /tmp",
            ],
        ),
    )
    .await
    .expect("CreateContainer httpd");
    start(&mut c, &web).await;

    let resolv = exec_ok(&mut c, &web, &["/bin/busybox", "cat", "/etc/resolv.conf"]).await;
    assert!(resolv.contains("nameserver 10.96.0.10"), "{resolv}");
    assert!(
        resolv.contains("search ns1.svc.cluster.local svc.cluster.local"),
        "{resolv}"
    );
    assert!(resolv.contains("options ndots:5"), "{resolv}");
    let hn = exec_ok(&mut c, &web, &["/bin/busybox", "hostname"]).await;
    assert_eq!(hn.trim(), "web-host");
    let hosts = exec_ok(&mut c, &web, &["/bin/busybox", "cat", "/etc/hosts"]).await;
    assert!(hosts.contains(&format!("{ip_a}\tweb-host")), "{hosts}");

    // httpd answers the test host by pod IP, then through the hostPort.
    let url = format!("http://{ip_a}:8080/index.html");
    // (busybox wget crashes in the test host's namespace; nc speaks HTTP/1.0 fine.)
    let mut fetched = String::new();
    for _ in 0..50 {
        fetched = host.http_get(&ip_a, 8080);
        if fetched.contains("hello-from-web") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(fetched.contains("hello-from-web"), "by pod IP: {fetched}");
    let out = host.http_get("10.88.0.1", 18080);
    assert!(out.contains("hello-from-web"), "hostPort: {out}");

    // Pod B reaches pod A by pod IP.
    let cfg_b = pod_config("client", &d.dir().join("logs/client"));
    let pod_b = run_pod(&mut c, &cfg_b, "").await.expect("RunPodSandbox B");
    let ip_b = pod_status(&mut c, &pod_b)
        .await
        .status
        .unwrap()
        .network
        .unwrap()
        .ip;
    assert!(ip_b.starts_with("10.88.") && ip_b != ip_a, "{ip_b}");
    let cli = create(
        &mut c,
        &pod_b,
        &cfg_b,
        container_config(
            "cli",
            &image,
            &["/bin/busybox", "sh", "-c", "exec /bin/busybox sleep 600"],
        ),
    )
    .await
    .expect("CreateContainer cli");
    start(&mut c, &cli).await;
    let body = exec_ok(&mut c, &cli, &["/bin/busybox", "wget", "-qO-", &url]).await;
    assert_eq!(body.trim(), "hello-from-web");

    // Throughput pod B -> test host (measured, not asserted): a python sink in the
    // test host counts what B's nc sends.
    let sink = std::process::Command::new("ip")
        .args(["netns", "exec", host.name(), "python3", "-c", SINK])
        .stdout(std::process::Stdio::piped())
        .spawn();
    if let Ok(sink) = sink {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let _ = exec(
            &mut c,
            &cli,
            &[
                "/bin/busybox",
                "sh",
                "-c",
                "/bin/busybox dd if=/dev/zero bs=64k count=512 | /bin/busybox nc 10.88.0.1 9000",
            ],
            60,
        )
        .await;
        let out = sink
            .wait_with_output()
            .map(|o| o.stdout)
            .unwrap_or_default();
        eprintln!("pod -> host TCP: {}", String::from_utf8_lossy(&out).trim());
    }

    // vesseld dies (kill -9) between RunPodSandbox and StopPodSandbox: the restarted
    // one tears down from the CNI cache.
    d.kill9();
    d.restart().unwrap();
    let mut c = d.client().await.unwrap();
    for pod in [&pod_a, &pod_b] {
        c.runtime
            .stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: pod.to_string(),
            })
            .await
            .expect("StopPodSandbox");
    }
    let netns_dir = d.run_root().join("netns");
    assert!(files_under(&netns_dir).is_empty(), "netns left after stop");
    assert!(
        files_under(&d.root().join("cni")).is_empty(),
        "CNI cache left"
    );
    let links = host.links();
    assert!(
        links.iter().all(|l| l == "lo" || l == "vessel0"),
        "links left in the test host: {links:?}"
    );
    let (_, out) = host.exec(&["busybox", "ping", "-c1", "-W1", &ip_a]);
    assert!(
        out.contains("0 packets received") || out.contains("100%"),
        "{out}"
    );
    for pod in [&pod_a, &pod_b] {
        // Stop again is idempotent; remove frees the rest.
        c.runtime
            .stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: pod.to_string(),
            })
            .await
            .expect("StopPodSandbox again");
        c.runtime
            .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: pod.to_string(),
            })
            .await
            .expect("RemovePodSandbox");
    }
    assert!(files_under(&netns_dir).is_empty());
    let ipam: Vec<_> = files_under(&d.dir().join("cni-ipam"))
        .into_iter()
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with("10.")
        })
        .collect();
    assert!(ipam.is_empty(), "IP reservations left: {ipam:?}");
    // Nothing of the pods in iptables: no per-pod chain, no rule naming a pod, no
    // hostPort DNAT left (portmap's shared chains stay, empty).
    let rules = host.iptables_rules("iptables-save");
    for r in &rules {
        assert!(
            !r.contains(pod_a.as_str()) && !r.contains(pod_b.as_str()),
            "rule of a removed pod: {r}"
        );
        assert!(
            !r.starts_with("-A CNI-HOSTPORT-DNAT "),
            "hostPort rule left: {r}"
        );
    }
    let chains: Vec<_> = host
        .cni_chains()
        .into_iter()
        .filter(|c| !c.starts_with("CNI-HOSTPORT-"))
        .collect();
    assert!(chains.is_empty(), "per-pod CNI chains left: {chains:?}");
    assert_no_leaks(&d);
}

/// Waits until the running vesseld (the last start in the log) has a warm pool VM.
async fn wait_pool_ready(d: &TestDaemon) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let log = d.log();
        let current = log.rsplit("vesseld serving CRI v1").next().unwrap_or("");
        if current.contains("pool VM ready") {
            return;
        }
        assert!(Instant::now() < deadline, "no pool VM booted:\n{log}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pooled_pod_gets_its_ip_dns_and_hostname() {
    let host = TestHost::new("vpool").expect("test host netns");
    let Some((_reg, mut d, mut c, image)) = setup_with(&host, "pool_size = 1\n").await else {
        return;
    };
    let _cleanup = Cleanup(d.dir().to_owned());
    wait_pool_ready(&d).await;

    let mut cfg = pod_config("warm", &d.dir().join("logs/warm"));
    cfg.dns_config = Some(cri::DnsConfig {
        servers: vec!["10.96.0.10".into()],
        searches: vec!["ns1.svc.cluster.local".into()],
        options: vec!["ndots:5".into()],
    });
    let pod = run_pod(&mut c, &cfg, "").await.expect("RunPodSandbox");
    let info = pod_info(&mut c, &pod).await;
    assert_eq!(info["startupMs"]["pooled"], true, "{info}");
    eprintln!("pooled RunPodSandbox with CNI: {}", info["startupMs"]);
    let ip = pod_status(&mut c, &pod)
        .await
        .status
        .unwrap()
        .network
        .unwrap()
        .ip;
    assert!(ip.starts_with("10.88."), "pod IP {ip:?}");

    let ctr = create(
        &mut c,
        &pod,
        &cfg,
        container_config(
            "httpd",
            &image,
            &[
                "/bin/busybox",
                "sh",
                "-c",
                "echo hello-from-pool > /tmp/index.html; exec /bin/busybox httpd -f -p 8080 -h /tmp",
            ],
        ),
    )
    .await
    .expect("CreateContainer");
    start(&mut c, &ctr).await;
    let (ok, out) = host.exec(&["busybox", "ping", "-c1", "-W5", &ip]);
    // The NIC booted before the pod's veth existed, yet traffic flows both ways.
    assert!(ok, "ping {ip}: {out}");
    let mut fetched = String::new();
    for _ in 0..50 {
        fetched = host.http_get(&ip, 8080);
        if fetched.contains("hello-from-pool") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        fetched.contains("hello-from-pool"),
        "TCP to the pod: {fetched}"
    );

    // The pod's files, written at claim.
    let resolv = exec_ok(&mut c, &ctr, &["/bin/busybox", "cat", "/etc/resolv.conf"]).await;
    assert!(resolv.contains("nameserver 10.96.0.10"), "{resolv}");
    assert!(resolv.contains("search ns1.svc.cluster.local"), "{resolv}");
    let hn = exec_ok(&mut c, &ctr, &["/bin/busybox", "hostname"]).await;
    assert_eq!(hn.trim(), "warm-host");
    let hosts = exec_ok(&mut c, &ctr, &["/bin/busybox", "cat", "/etc/hosts"]).await;
    assert!(hosts.contains(&format!("{ip}\twarm-host")), "{hosts}");

    remove_pod(&mut c, &pod).await;
    drop(c);
    assert!(d.stop(), "vesseld did not stop cleanly:\n{}", d.log());
    assert!(
        files_under(&d.run_root().join("netns")).is_empty(),
        "netns left"
    );
    assert!(
        files_under(&d.root().join("cni")).is_empty(),
        "CNI cache left"
    );
    let links = host.links();
    assert!(
        links.iter().all(|l| l == "lo" || l == "vessel0"),
        "links left in the test host: {links:?}"
    );
    let ipam: Vec<_> = files_under(&ipam_dir(&d))
        .into_iter()
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("10."))
        .collect();
    assert!(ipam.is_empty(), "IP reservations left: {ipam:?}");
    assert_no_leaks(&d);
}

//! Stats end to end: one pod VM with pod networking (in a test-host namespace), a
//! container burning CPU and one allocating memory on demand. The numbers vesseld
//! reports follow: nano-cores near a full vCPU (the test VM has one), memory growth,
//! network bytes from traffic the test sends, the cAdvisor metrics, and the
//! Prometheus endpoint (pod start phases, VM boots, per-pod VM overhead).

mod network_common;
mod runtime_common;

use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use network_common::*;
use runtime_common::*;
use vessel_tests::cri::CriClient;
use vessel_tests::daemon::TestDaemon;
use vessel_tests::registry::TestRegistry;
use vessel_tests::testimages;

/// The endpoint inside the test host namespace (so no port of the machine is used).
const METRICS_ADDR: &str = "127.0.0.1:9393";

/// Waits for /tmp/go, then holds a 40 MB string in awk (anon memory).
const ALLOCATOR: &str = "while [ ! -e /tmp/go ]; do sleep 0.2; done; \
    exec awk 'BEGIN{s=sprintf(\"%40000000s\",\"\"); system(\"touch /tmp/done; while :; do sleep 1; done\")}'";

async fn setup(host: &TestHost) -> Option<(TestRegistry, TestDaemon, CriClient, String)> {
    let guest = guest_dir();
    let (kernel, initrd) = (guest.join("vmlinux"), guest.join("initrd.img"));
    if !kernel.is_file() || !initrd.is_file() {
        vessel_tests::skip_vm_or_fail(&format!("no guest in {}", guest.display()));
        return None;
    }
    let reg = TestRegistry::start().unwrap();
    let extra = format!(
        "[guest]\nkernel = {:?}\ninitrd = {:?}\n\n[runtimes.default]\nvcpus = 1\nmemory_mib = 256\n",
        kernel.display().to_string(),
        initrd.display().to_string()
    );
    let mut d = TestDaemon::prepare(&extra).unwrap();
    d.restart().unwrap();
    d.write_hosts_toml(&reg.addr(), &reg.url()).unwrap();
    let mut c = d.client().await.unwrap();
    let img = testimages::push_busybox(&reg, "stats/busybox:1")
        .await
        .unwrap();
    c.pull(&img.reference).await.unwrap();
    drop(c);
    install_conflist(&d);
    std::fs::write(
        d.dropin_dir().join("50-metrics.toml"),
        format!("[metrics]\naddress = {METRICS_ADDR:?}\n"),
    )
    .unwrap();
    d.set_netns(host.path());
    d.restart().unwrap();
    let c = d.client().await.unwrap();
    Some((reg, d, c, img.reference))
}

async fn ctr_stats(c: &mut CriClient, id: &str) -> cri::ContainerStats {
    c.runtime
        .container_stats(cri::ContainerStatsRequest {
            container_id: id.into(),
        })
        .await
        .expect("ContainerStats")
        .into_inner()
        .stats
        .unwrap()
}

async fn pod_stats(c: &mut CriClient, id: &str) -> cri::PodSandboxStats {
    c.runtime
        .pod_sandbox_stats(cri::PodSandboxStatsRequest {
            pod_sandbox_id: id.into(),
        })
        .await
        .expect("PodSandboxStats")
        .into_inner()
        .stats
        .unwrap()
}

async fn list_ctr_stats(
    c: &mut CriClient,
    f: cri::ContainerStatsFilter,
) -> Vec<cri::ContainerStats> {
    c.runtime
        .list_container_stats(cri::ListContainerStatsRequest { filter: Some(f) })
        .await
        .expect("ListContainerStats")
        .into_inner()
        .stats
}

fn val(v: &Option<cri::UInt64Value>) -> u64 {
    v.as_ref().map(|v| v.value).unwrap_or(0)
}

fn working_set(s: &cri::ContainerStats) -> u64 {
    val(&s.memory.as_ref().unwrap().working_set_bytes)
}

fn eth0_rx(p: &cri::PodSandboxStats) -> u64 {
    let net = p
        .linux
        .as_ref()
        .unwrap()
        .network
        .as_ref()
        .expect("network stats");
    let eth0 = net.default_interface.as_ref().expect("a default interface");
    assert_eq!(eth0.name, "eth0");
    val(&eth0.rx_bytes)
}

#[tokio::test(flavor = "multi_thread")]
async fn stats_follow_cpu_memory_and_network() {
    let host = TestHost::new("vstat").expect("test host netns");
    let Some((_reg, d, mut c, image)) = setup(&host).await else {
        return;
    };
    let _cleanup = Cleanup(d.dir().to_owned());

    let pod_cfg = pod_config("stats", &d.dir().join("logs/stats"));
    let pod = run_pod(&mut c, &pod_cfg, "").await.expect("RunPodSandbox");
    let ip = pod_status(&mut c, &pod)
        .await
        .status
        .unwrap()
        .network
        .unwrap()
        .ip;
    let burner = run_container(
        &mut c,
        &pod,
        &pod_cfg,
        container_config("burner", &image, &["sh", "-c", "while :; do :; done"]),
    )
    .await;
    // CPU: the burner's nano-cores over a window (the first sample has no rate),
    // alone on the VM's one vCPU. Near 1e9 on a quiet host; a loaded host (TCG
    // competing with builds) gives the vCPU less, hence the loose bound.
    let _ = ctr_stats(&mut c, &burner).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = ctr_stats(&mut c, &burner).await;
    let cpu = s.cpu.as_ref().expect("cpu");
    let nano_cores = val(&cpu.usage_nano_cores);
    eprintln!(
        "burner: {nano_cores} nano-cores, {} ns in all",
        val(&cpu.usage_core_nano_seconds)
    );
    assert!(nano_cores > 500_000_000, "{s:?}");
    assert!(nano_cores <= 1_000_000_000, "1 vCPU: {s:?}");
    assert!(val(&cpu.usage_core_nano_seconds) > 1_000_000_000);
    assert_eq!(s.attributes.as_ref().unwrap().id, burner);

    // A container created after a sample: its stats come at once (no stale cache).
    let alloc = run_container(
        &mut c,
        &pod,
        &pod_cfg,
        container_config("alloc", &image, &["sh", "-c", ALLOCATOR]),
    )
    .await;

    // Memory: the allocator's working set grows by its ~40 MB.
    let before = working_set(&ctr_stats(&mut c, &alloc).await);
    exec(&mut c, &alloc, &["touch", "/tmp/go"], 30)
        .await
        .expect("exec");
    let deadline = Instant::now() + Duration::from_secs(60);
    while exec(&mut c, &alloc, &["sh", "-c", "test -e /tmp/done"], 30)
        .await
        .expect("exec")
        .exit_code
        != 0
    {
        assert!(Instant::now() < deadline, "the allocator never finished");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tokio::time::sleep(Duration::from_millis(1100)).await; // past the cache
    let s = ctr_stats(&mut c, &alloc).await;
    let after = working_set(&s);
    let mem = s.memory.as_ref().unwrap();
    eprintln!(
        "allocator: working set {before} -> {after}, rss {}",
        val(&mem.rss_bytes)
    );
    assert!(after > before + 30_000_000, "{before} -> {after}: {s:?}");
    assert!(val(&mem.rss_bytes) > 30_000_000, "{s:?}");
    assert!(val(&mem.page_faults) > 0, "{s:?}");
    let layer = s.writable_layer.as_ref().expect("writable layer");
    assert!(
        val(&layer.inodes_used) >= 2,
        "/tmp/go and /tmp/done: {layer:?}"
    );
    // The kubelet stats this path on the host (its /stats/summary failed on the
    // guest path before): the container filesystem ImageFsInfo reports.
    let mountpoint = &layer.fs_id.as_ref().expect("fs_id").mountpoint;
    let fs_info = c
        .image
        .image_fs_info(cri::ImageFsInfoRequest {})
        .await
        .expect("ImageFsInfo")
        .into_inner();
    let container_fs = &fs_info.container_filesystems[0];
    assert_eq!(
        Some(mountpoint),
        container_fs.fs_id.as_ref().map(|f| &f.mountpoint),
        "writable layer and ImageFsInfo disagree"
    );
    assert!(
        std::path::Path::new(mountpoint).is_dir(),
        "{mountpoint} is not a host dir"
    );

    // Network: 40 pings of 1000 bytes from the test host reach the guest's eth0.
    let rx_before = eth0_rx(&pod_stats(&mut c, &pod).await);
    let (ok, out) = host.exec(&[
        "busybox", "ping", "-c40", "-i", "0.05", "-s", "1000", "-W2", &ip,
    ]);
    assert!(ok, "ping {ip}: {out}");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let p = pod_stats(&mut c, &pod).await;
    let rx_after = eth0_rx(&p);
    eprintln!("pod eth0 rx: {rx_before} -> {rx_after}");
    assert!(rx_after >= rx_before + 40_000, "{rx_before} -> {rx_after}");

    // The pod: the VM's host-side cost, process count, both containers.
    let linux = p.linux.as_ref().unwrap();
    let vm_cpu = linux.cpu.as_ref().expect("pod cpu");
    let vm_mem = linux.memory.as_ref().expect("pod memory");
    eprintln!(
        "pod VM: {} nano-cores, {} bytes",
        val(&vm_cpu.usage_nano_cores),
        val(&vm_mem.working_set_bytes)
    );
    assert!(val(&vm_cpu.usage_core_nano_seconds) > 0);
    assert!(val(&vm_mem.working_set_bytes) > 40_000_000, "{vm_mem:?}");
    assert!(val(&linux.process.as_ref().unwrap().process_count) >= 2);
    assert_eq!(linux.containers.len(), 2);
    assert_eq!(p.attributes.as_ref().unwrap().id, pod);

    // Filters.
    let by_pod = list_ctr_stats(
        &mut c,
        cri::ContainerStatsFilter {
            pod_sandbox_id: pod.clone(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(by_pod.len(), 2);
    let by_label = list_ctr_stats(
        &mut c,
        cri::ContainerStatsFilter {
            label_selector: [("container".to_string(), "burner".to_string())].into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(by_label.len(), 1);
    assert_eq!(by_label[0].attributes.as_ref().unwrap().id, burner);
    let by_id = list_ctr_stats(
        &mut c,
        cri::ContainerStatsFilter {
            id: alloc.clone(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(by_id.len(), 1);
    let pods = c
        .runtime
        .list_pod_sandbox_stats(cri::ListPodSandboxStatsRequest {
            filter: Some(cri::PodSandboxStatsFilter {
                label_selector: [("app".to_string(), "stats".to_string())].into(),
                ..Default::default()
            }),
        })
        .await
        .expect("ListPodSandboxStats")
        .into_inner()
        .stats;
    assert_eq!(pods.len(), 1);

    // cAdvisor metrics through the CRI.
    let descriptors = c
        .runtime
        .list_metric_descriptors(cri::ListMetricDescriptorsRequest {})
        .await
        .expect("ListMetricDescriptors")
        .into_inner()
        .descriptors;
    assert!(descriptors
        .iter()
        .any(|d| d.name == "container_cpu_usage_seconds_total"));
    let metrics = c
        .runtime
        .list_pod_sandbox_metrics(cri::ListPodSandboxMetricsRequest {})
        .await
        .expect("ListPodSandboxMetrics")
        .into_inner()
        .pod_metrics;
    let pm = metrics
        .iter()
        .find(|m| m.pod_sandbox_id == pod)
        .expect("pod metrics");
    let rx = pm
        .metrics
        .iter()
        .find(|m| m.name == "container_network_receive_bytes_total")
        .expect("network metric");
    assert_eq!(rx.label_values.last().map(String::as_str), Some("eth0"));
    assert!(val(&rx.value) >= 40_000);
    let burner_metrics = pm
        .container_metrics
        .iter()
        .find(|m| m.container_id == burner)
        .expect("burner metrics");
    for m in &burner_metrics.metrics {
        let d = descriptors
            .iter()
            .find(|d| d.name == m.name)
            .expect("described");
        assert_eq!(d.label_keys.len(), m.label_values.len(), "{m:?}");
    }
    assert!(burner_metrics
        .metrics
        .iter()
        .any(|m| m.name == "container_cpu_usage_seconds_total" && val(&m.value) >= 1));

    // vesseld's own /metrics.
    let (ok, text) = host.exec(&[
        "sh",
        "-c",
        &format!(
            "printf 'GET /metrics HTTP/1.0\\r\\n\\r\\n' | busybox nc -w 5 {}",
            METRICS_ADDR.replace(':', " ")
        ),
    ]);
    assert!(ok, "{text}");
    for want in [
        "vessel_cri_call_duration_seconds_count{method=\"RuntimeService/RunPodSandbox\",code=\"Ok\"} 1",
        "vessel_vm_boots_total{accel=\"tcg\"} 1",
        "vessel_pod_start_phase_seconds_count{phase=\"vm_to_agent\"} 1",
        &format!("vessel_pod_vm_memory_bytes{{pod=\"{pod}\"}}"),
        "vessel_agent_call_duration_seconds_count{rpc=\"PodStats\",result=\"ok\"}",
        "vessel_image_pull_bytes_total",
    ] {
        assert!(text.contains(want), "{want} missing from /metrics:\n{text}");
    }

    remove_pod(&mut c, &pod).await;
    assert_no_leaks(&d);
}

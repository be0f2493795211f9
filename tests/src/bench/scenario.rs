//! The rows, in the order they are measured.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use vessel_sandbox::{Accel, ResolvedAccel};

use super::janitor::{pids_naming, Janitor};
use super::memory::{pss_of, Pss};
use super::stats::{Samples, Unit};
use super::table::{format_value, ratio};
use super::{
    agentcalls, channel, floor, guestforks, listing, machine, peer, peer_cri, pods, streams,
    Options, Plan, SharedTable,
};
use crate::cri::CriClient;
use crate::daemon::TestDaemon;
use crate::registry::TestRegistry;
use crate::testhost::TestHost;
use crate::testimages::{self, LayerCompression};

const FLOOR: &str = "1. floor: QEMU spawn → agent Health (direct, no vesseld)";
const FLOOR_CPU: &str = "   ↳ QEMU CPU time until then";
const RUN_PLAIN: &str = "2. RunPodSandbox, no network";
const RUN_CNI: &str = "2. RunPodSandbox, CNI bridge";
const RTT: &str = "8. agent channel: empty call RTT";
const LAYERS: usize = 5;
const MIB: usize = 1 << 20;

/// What every phase needs.
struct Env {
    plan: Plan,
    work: PathBuf,
    janitor: Arc<Janitor>,
    registry: TestRegistry,
    busybox: String,
    kernel: PathBuf,
    initrd: PathBuf,
    accel: ResolvedAccel,
    table: SharedTable,
}

impl Env {
    fn add(&self, label: &str, unit: Unit, samples: Samples, note: impl Into<String>) {
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        t.add(label, unit, samples, note);
    }

    fn median(&self, label: &str) -> Option<f64> {
        self.table
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .median_of(label)
    }

    /// A private vesseld (info logging), owned by the janitor, mirroring the
    /// registry. `netns`: run it there, with the example CNI config.
    async fn daemon(&self, netns: Option<&TestHost>) -> anyhow::Result<(TestDaemon, CriClient)> {
        let extra = format!(
            "[guest]\nkernel = {:?}\ninitrd = {:?}\n\n[runtimes.default]\nvcpus = 1\nmemory_mib = {}\n",
            self.kernel.display().to_string(),
            self.initrd.display().to_string(),
            self.plan.memory_mib,
        );
        let mut d = TestDaemon::prepare(&extra)?;
        self.janitor.own_dir(d.dir());
        std::fs::write(
            d.dropin_dir().join("50-bench.toml"),
            "log_level = \"info\"\n",
        )?;
        d.write_hosts_toml(&self.registry.addr(), &self.registry.url())?;
        if let Some(host) = netns {
            install_conflist(&d)?;
            d.set_netns(host.path());
        }
        d.restart()?;
        let c = d.client().await?;
        Ok((d, c))
    }
}

/// Runs every row into `table`; whatever it started is the janitor's to sweep.
pub async fn run(opts: Options, janitor: Arc<Janitor>, table: SharedTable) -> anyhow::Result<()> {
    let plan = Plan::new(opts.quick);
    let kernel = opts.guest_dir.join("vmlinux");
    let initrd = opts.guest_dir.join("initrd.img");
    for f in [&kernel, &initrd] {
        if !f.is_file() {
            bail!(
                "no guest at {}: run the README's set-up (scripts/setup.sh) or pass --guest-dir",
                f.display()
            );
        }
    }
    let work = tempfile::Builder::new()
        .prefix("vbench")
        .tempdir_in("/tmp")?
        .keep();
    janitor.own_dir(&work);
    let accel_dir = work.clone();
    let accel = tokio::task::spawn_blocking(move || {
        vessel_sandbox::accel::resolve(Accel::Auto, &accel_dir)
    })
    .await??;
    table.lock().unwrap_or_else(|p| p.into_inner()).machine =
        machine::describe(&opts.guest_dir, &format!("{accel:?}").to_lowercase());

    let registry =
        TestRegistry::start().context("starting the registry (Debian's docker-registry)")?;
    let busybox = testimages::push_busybox(&registry, "bench/busybox:1")
        .await?
        .reference;
    let env = Env {
        plan,
        work,
        janitor,
        registry,
        busybox,
        kernel,
        initrd,
        accel,
        table,
    };

    let wanted = |rows: &[u32]| match &opts.only {
        Some(only) => rows.iter().any(|r| only.contains(r)),
        None => true,
    };
    if wanted(&[1, 2]) {
        floor_row(&env).await.context("floor")?;
    }
    if wanted(&[2]) {
        pods_without_network(&env)
            .await
            .context("RunPodSandbox without network")?;
        pods_with_cni(&env)
            .await
            .context("RunPodSandbox with CNI")?;
        pods_from_pool(&env, false)
            .await
            .context("RunPodSandbox from the warm pool")?;
        pods_from_pool(&env, true)
            .await
            .context("RunPodSandbox with CNI from the warm pool")?;
    }
    if wanted(&[3, 4]) {
        containers(&env).await.context("containers")?;
    }
    if wanted(&[3, 4]) {
        round_trips(&env)
            .await
            .context("agent calls per CRI call")?;
    }
    if opts.peer && wanted(&[2, 3, 4]) {
        cri_peer(&env).await.context("containerd + runc peer")?;
    }
    if wanted(&[8, 10]) {
        channel_and_streams(&env, wanted(&[10]))
            .await
            .context("agent channel and streaming")?;
    }
    if wanted(&[5, 6]) {
        parallel_pods(&env).await.context("parallel pods")?;
    }
    if wanted(&[9]) {
        stats_phase(&env).await.context("stats")?;
    }
    if wanted(&[11]) {
        listing_phase(&env)
            .await
            .context("list latency under churn")?;
    }
    if wanted(&[7]) {
        pull(&env, opts.peer).await.context("image pull")?;
    }
    add_goals(&env);
    Ok(())
}

/// Agent calls of each CRI call in one walk-through (pod, containers, exec), from
/// vesseld's `/metrics` before and after the call. A call counts when it ends:
/// those a CRI call sets off in the background (log pumps) count for it if done
/// within [`CALLS_SETTLE`]; the exit watch's WaitProcess counts for the call
/// that ends the process. Guest forks are counted the same way (module
/// `guestforks`); the containers here are idle ones, stopped with SIGKILL.
async fn round_trips(env: &Env) -> anyhow::Result<()> {
    let (mut d, _) = env.daemon(None).await?;
    let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    std::fs::write(
        d.dropin_dir().join("60-metrics.toml"),
        format!("[metrics]\naddress = \"{addr}\"\n"),
    )?;
    d.restart()?;
    let mut c = d.client().await?;
    c.pull(&env.busybox).await?;
    let addr = addr.to_string();
    let mut per_call: Vec<(&str, Samples, agentcalls::Calls)> = Vec::new();
    let mut record = |what: &'static str, calls: agentcalls::Calls| match per_call
        .iter_mut()
        .find(|(w, ..)| *w == what)
    {
        Some((_, samples, last)) => {
            samples.push(calls.total() as f64);
            *last = calls;
        }
        None => per_call.push((what, Samples::from_values([calls.total() as f64]), calls)),
    };
    // Guest forks by CRI call (label as the agent-call row's), once the probe runs.
    let mut forks: Vec<(String, Samples)> = Vec::new();
    let mut probe: Option<guestforks::Probe> = None;
    macro_rules! counted {
        ($what:literal, $call:expr) => {{
            let before = agentcalls::fetch(&addr).await?;
            let out = $call;
            tokio::time::sleep(CALLS_SETTLE).await;
            let calls = agentcalls::fetch(&addr).await?.since(&before);
            // Outside a pod start, Health is the 5 s liveness probe, not the call's.
            let calls = match $what.contains("RunPodSandbox") {
                true => calls,
                false => calls.without("Health"),
            };
            record($what, calls);
            // After the agent calls were read: the probe's ExecSync is not the call's.
            if let Some(p) = probe.as_mut() {
                let n = p.since_last(&mut c).await? as f64;
                let label = $what.replace("agent calls", "guest forks");
                match forks.iter_mut().find(|(l, _)| *l == label) {
                    Some((_, samples)) => samples.push(n),
                    None => forks.push((label, Samples::from_values([n]))),
                }
            }
            out
        }};
    }
    let config = pods::pod_config("calls", &env.work.join("logs"));
    let (pod, _) = counted!(
        "2. agent calls per RunPodSandbox",
        pods::run_pod(&mut c, config.clone()).await?
    );
    let probe_config = pods::idle_config("forks-probe", &env.busybox);
    let (probe_id, _) = pods::create_and_start(&mut c, &pod, &config, probe_config.clone()).await?;
    pods::wait_ready(&config, &probe_config).await?;
    let p = guestforks::Probe::new(&mut c, &probe_id).await?;
    let per_read = p.per_read();
    probe = Some(p);
    for i in 0..env.plan.containers {
        // Idle containers: a sleeper's loop would fork in the background.
        let ctr_config = pods::idle_config(&format!("calls{i}"), &env.busybox);
        let id = counted!(
            "3. agent calls per CreateContainer",
            c.runtime
                .create_container(k8s_cri::v1::CreateContainerRequest {
                    pod_sandbox_id: pod.clone(),
                    config: Some(ctr_config.clone()),
                    sandbox_config: Some(config.clone()),
                })
                .await
                .context("CreateContainer")?
                .into_inner()
                .container_id
        );
        counted!(
            "3. agent calls per StartContainer",
            c.runtime
                .start_container(k8s_cri::v1::StartContainerRequest {
                    container_id: id.clone(),
                })
                .await
                .context("StartContainer")?
        );
        pods::wait_ready(&config, &ctr_config).await?;
        if i + 1 == env.plan.containers {
            for _ in 0..env.plan.execs {
                counted!(
                    "4. agent calls per ExecSync",
                    pods::exec_sync(&mut c, &id, &["true"]).await?
                );
            }
        }
        counted!(
            "3. agent calls per StopContainer",
            pods::stop_container(&mut c, &id, 0).await?
        );
        counted!(
            "3. agent calls per RemoveContainer",
            pods::remove_container(&mut c, &id).await?
        );
    }
    // The pod is torn down empty, as without the probe.
    probe = None;
    pods::stop_container(&mut c, &probe_id, 0).await?;
    pods::remove_container(&mut c, &probe_id).await?;
    counted!(
        "3. agent calls per StopPodSandbox + RemovePodSandbox",
        pods::stop_and_remove_pod(&mut c, &pod).await?
    );
    for (what, samples, last) in per_call {
        env.add(
            what,
            Unit::Count,
            samples,
            format!("last: {}", last.describe()),
        );
    }
    for (what, samples) in forks {
        env.add(
            &what,
            Unit::Count,
            samples,
            format!(
                "/proc/stat processes, read by a probe container (its {per_read} per read taken off)"
            ),
        );
    }
    drop(c);
    drop(d);
    Ok(())
}

/// How long after a CRI call its background agent calls still count for it.
const CALLS_SETTLE: Duration = Duration::from_millis(300);

/// Issue 17's goals: (row label, match as prefix, goal).
const GOALS: &[(&str, bool, &str)] = &[
    (FLOOR, false, "goal ≤ 0.7 s"),
    (CREATE_START, false, "goal ≤ 1.5× containerd + runc"),
    (EXEC_SYNC, false, "goal ≤ 2× containerd + runc"),
    ("5. ", true, "goal ≤ 3× one pod"),
    ("6. PSS per idle pod", true, "goal ≤ 80 MiB"),
    ("↳ guest RAM touched", false, "goal ≤ 40 MiB"),
    (HOST_OVERHEAD, false, "goal ≤ 20 MiB"),
    (RTT, false, "goal ≤ 0.3 ms"),
    ("8. agent stream", true, "goal ≥ 100 MiB/s"),
];

/// Appends each issue-17 goal to its row's note.
fn add_goals(env: &Env) {
    let mut t = env.table.lock().unwrap_or_else(|p| p.into_inner());
    for (label, prefix, goal) in GOALS {
        t.append_note(label, *prefix, goal);
    }
}

const CREATE_START: &str = "3. CreateContainer + StartContainer";
const EXEC_SYNC: &str = "4. ExecSync `true`";
const PEER: &str = "containerd + runc (peer)";

/// Rows 2-4's peer: the same walk-through against a private containerd 1.6 + runc
/// in a namespace of its own (see [`peer_cri`]), each row with vessel's ratio.
async fn cri_peer(env: &Env) -> anyhow::Result<()> {
    if !peer::available() || !peer::runc_available() {
        peer::install()?;
    }
    let host = TestHost::new("vbpeer")?;
    env.janitor.own_netns(host.name());
    let cgroup = format!("/{}", host.name());
    env.janitor.own_cgroup(&cgroup);
    let pause = testimages::push_pause(&env.registry, "bench/pause:1")
        .await?
        .reference;
    let example_path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples/10-vessel.conflist");
    let example: serde_json::Value = serde_json::from_slice(&std::fs::read(&example_path)?)?;
    let registry: std::net::SocketAddr = env.registry.addr().parse()?;
    let dir = env.work.join("cri-peer");
    let (ctrd, mut c) =
        peer_cri::CriContainerd::start(&dir, &host.path(), registry, &pause, &example, &cgroup)
            .await?;
    let counts = (env.plan.boots, env.plan.containers, env.plan.execs);
    let walked = async {
        c.pull(&pause).await?;
        c.pull(&env.busybox).await?;
        peer_cri::walk(&ctrd, &mut c, &env.busybox, &env.work.join("logs"), counts).await
    }
    .await;
    let w = walked.map_err(|e| {
        let log = ctrd.log();
        let tail = &log[log.len().saturating_sub(4000)..];
        e.context(format!("containerd log tail:\n{tail}"))
    })?;
    let leftovers = ctrd.leftover_pids();
    drop(c);
    drop(ctrd);
    drop(host);
    if !leftovers.is_empty() {
        bail!("the peer's pods left processes behind: {leftovers:?}");
    }
    let vs = |vessel: &str, peer: &Samples| {
        format!(
            "vessel takes {} of this",
            ratio(env.median(vessel), peer.median())
        )
    };
    let rows = [
        (
            format!("2. RunPodSandbox, CNI bridge, {PEER}"),
            vs(RUN_CNI, &w.run_cni),
            w.run_cni,
        ),
        (
            format!("3. StopPodSandbox + RemovePodSandbox, {PEER}"),
            vs("3. StopPodSandbox + RemovePodSandbox", &w.teardown),
            w.teardown,
        ),
        (
            format!("{CREATE_START}, {PEER}"),
            vs(CREATE_START, &w.create_start),
            w.create_start,
        ),
        (
            format!("3. StopContainer, {PEER}"),
            vs("3. StopContainer", &w.stop),
            w.stop,
        ),
        (
            format!("3. RemoveContainer, {PEER}"),
            vs("3. RemoveContainer", &w.remove),
            w.remove,
        ),
        (
            format!("{EXEC_SYNC}, {PEER}"),
            vs(EXEC_SYNC, &w.exec),
            w.exec,
        ),
    ];
    for (label, note, samples) in rows {
        env.add(&label, Unit::Millis, samples, note);
    }
    Ok(())
}

async fn floor_row(env: &Env) -> anyhow::Result<()> {
    let mut samples = Samples::new();
    let mut cpu = Samples::new();
    for i in 0..env.plan.boots {
        let boot = floor::boot_once(
            &env.work,
            &format!("floor{i}"),
            &env.kernel,
            &env.initrd,
            env.plan.memory_mib,
            env.accel,
        )
        .await?;
        samples.push_duration(boot.vmm_to_agent);
        if let Some(c) = boot.vmm_cpu {
            cpu.push_duration(c);
        }
    }
    env.add(
        FLOOR,
        Unit::Millis,
        samples,
        format!(
            "same kernel, initrd, 1 vCPU, {} MiB, virtiofs + vsock",
            env.plan.memory_mib
        ),
    );
    env.add(
        FLOOR_CPU,
        Unit::Millis,
        cpu,
        "user + system, all QEMU threads: less moved by other load than wall time",
    );
    Ok(())
}

/// vesseld's VM run dir of a pod (short: socket paths inside must fit 108 bytes).
fn vm_dir(d: &TestDaemon, pod_id: &str) -> PathBuf {
    d.run_root()
        .join("vm")
        .join(&pod_id[..pod_id.len().min(16)])
}

/// PSS of one pod's processes: everything naming its VM run dir or its pod dir.
fn pod_pss(d: &TestDaemon, pod_id: &str) -> Pss {
    let mut pids: Vec<i32> = [vm_dir(d, pod_id), d.run_root().join("pods").join(pod_id)]
        .iter()
        .flat_map(|dir| pids_naming(&format!("{}/", dir.display())))
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids.into_iter()
        .filter_map(pss_of)
        .fold(Pss::default(), |a, b| a + b)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Adds the memory rows of `pss` (one sample per pod): the total, then its parts.
fn memory_rows(env: &Env, what: &str, pss: &[Pss]) {
    let rows = |part: fn(&Pss) -> u64| Samples::from_values(pss.iter().map(|p| mib(part(p))));
    env.add(
        &format!("6. PSS per idle pod, {what}"),
        Unit::MiB,
        rows(Pss::total_kib),
        format!(
            "QEMU + virtiofsd + vsock helper, after {} s idle",
            env.plan.settle_secs
        ),
    );
    env.add(
        "   ↳ guest RAM touched",
        Unit::MiB,
        rows(|p| p.guest_ram_kib),
        format!("of {} MiB", env.plan.memory_mib),
    );
    env.add(
        "   ↳ TCG translated-code cache",
        Unit::MiB,
        rows(|p| p.code_cache_kib),
        "anonymous executable memory; none under KVM",
    );
    env.add(
        "   ↳ file mappings",
        Unit::MiB,
        rows(|p| p.file_kib),
        "binaries, libraries, vmlinux + initrd: page cache shared by pods",
    );
    env.add(
        "   ↳ heaps and the rest",
        Unit::MiB,
        rows(|p| p.other_kib),
        "QEMU and helpers' anonymous memory",
    );
    env.add(
        HOST_OVERHEAD,
        Unit::MiB,
        rows(|p| p.total_kib() - p.guest_ram_kib),
        "all of the above but guest RAM",
    );
}

const HOST_OVERHEAD: &str = "   ↳ host-side overhead beyond guest RAM";

async fn pods_without_network(env: &Env) -> anyhow::Result<()> {
    let (d, mut c) = env.daemon(None).await?;
    let logs = env.work.join("logs");
    let (mut total, mut share, mut helpers, mut vmm, mut rest, mut teardown) = (
        Samples::new(),
        Samples::new(),
        Samples::new(),
        Samples::new(),
        Samples::new(),
        Samples::new(),
    );
    let mut memory = Vec::new();
    for i in 0..env.plan.boots {
        let (id, wall) =
            pods::run_pod(&mut c, pods::pod_config(&format!("plain{i}"), &logs)).await?;
        total.push_duration(wall);
        let ph = pods::startup_phases(&mut c, &id).await?;
        let get = |k: &str| ph.get(k).copied().unwrap_or(0.0);
        // The scratch disk (create + mkfs) is host-side set-up like the share dir.
        let setup = get("share") + get("scratchDisk");
        share.push(setup);
        helpers.push(get("helpers"));
        vmm.push(get("vmToAgent"));
        rest.push(
            (wall.as_secs_f64() * 1000.0 - setup - get("helpers") - get("vmToAgent")).max(0.0),
        );
        tokio::time::sleep(Duration::from_secs(env.plan.settle_secs)).await;
        memory.push(pod_pss(&d, &id));
        teardown.push_duration(pods::stop_and_remove_pod(&mut c, &id).await?);
    }
    let floor = env.median(FLOOR);
    let note = format!("{} floor", ratio(total.median(), floor));
    env.add(RUN_PLAIN, Unit::Millis, total, note);
    env.add(
        "   ↳ share dir + pod files + scratch disk",
        Unit::Millis,
        share,
        "",
    );
    env.add(
        "   ↳ helpers: accel, virtiofsd, vsock",
        Unit::Millis,
        helpers,
        "",
    );
    env.add(
        "   ↳ QEMU spawn → agent ready",
        Unit::Millis,
        vmm,
        "vs floor row 1",
    );
    env.add("   ↳ the rest: state, RPC", Unit::Millis, rest, "");
    env.add(
        "3. StopPodSandbox + RemovePodSandbox",
        Unit::Millis,
        teardown,
        "no containers",
    );
    memory_rows(env, "1 pod", &memory);
    drop(c);
    drop(d);
    Ok(())
}

/// RunPodSandbox served by a warm VM (pool of 1, refilled between samples), and
/// (without a network) what an idle pool VM costs. `cni`: vesseld runs in a netns
/// of its own with the example CNI config, as for the cold CNI row.
async fn pods_from_pool(env: &Env, cni: bool) -> anyhow::Result<()> {
    let host = if cni {
        let host = TestHost::new("vbpool")?;
        env.janitor.own_netns(host.name());
        Some(host)
    } else {
        None
    };
    let netns = host.as_ref().map(|h| h.path());
    let (mut d, c) = env.daemon(host.as_ref()).await?;
    drop(c);
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    std::fs::write(
        d.dropin_dir().join("60-bench-pool.toml"),
        format!("[runtimes.default]\npool_size = 1\n\n[metrics]\naddress = \"127.0.0.1:{port}\"\n"),
    )?;
    d.restart()?;
    let mut c = d.client().await?;
    let logs = env.work.join("logs");
    let (mut total, mut memory) = (Samples::new(), Vec::new());
    for i in 0..env.plan.boots {
        pods::wait_pool_warm(netns.as_deref(), port, 1).await?;
        if !cni {
            tokio::time::sleep(Duration::from_secs(env.plan.settle_secs)).await;
            if let Some(warm) = pods::pool_ids(d.run_root()).first() {
                memory.push(pod_pss(&d, warm));
            }
        }
        let (id, wall) =
            pods::run_pod(&mut c, pods::pod_config(&format!("warm{i}"), &logs)).await?;
        if pods::startup_phases(&mut c, &id).await?.get("pooled") != Some(&1.0) {
            bail!("pod {id} did not come from the warm pool");
        }
        total.push_duration(wall);
        pods::stop_and_remove_pod(&mut c, &id).await?;
    }
    let (label, cold) = if cni {
        ("2. RunPodSandbox, CNI bridge, warm pool", RUN_CNI)
    } else {
        ("2. RunPodSandbox, no network, warm pool", RUN_PLAIN)
    };
    let note = format!(
        "{} of the cold row, same run; pool of 1 refilled between samples; goal ≤ 150 ms",
        ratio(total.median(), env.median(cold))
    );
    env.add(label, Unit::Millis, total, note);
    if cni {
        drop(c);
        d.stop();
        drop(host);
        return Ok(());
    }
    let rows = Samples::from_values(memory.iter().map(|p| mib(p.total_kib())));
    env.add(
        "6. PSS of an idle pool VM",
        Unit::MiB,
        rows,
        format!(
            "what each warm VM costs: QEMU + helpers after {} s idle",
            env.plan.settle_secs
        ),
    );
    drop(c);
    d.stop();
    Ok(())
}

/// The example conflist, with host-local's store in the daemon's dir.
fn install_conflist(d: &TestDaemon) -> anyhow::Result<()> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples/10-vessel.conflist");
    let mut conf: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    conf["plugins"][0]["ipam"]["dataDir"] = d.dir().join("cni-ipam").display().to_string().into();
    std::fs::write(
        d.cni_conf_dir().join("10-vessel.conflist"),
        serde_json::to_vec_pretty(&conf)?,
    )?;
    Ok(())
}

async fn pods_with_cni(env: &Env) -> anyhow::Result<()> {
    let host = TestHost::new("vbench")?;
    env.janitor.own_netns(host.name());
    let (d, mut c) = env.daemon(Some(&host)).await?;
    let logs = env.work.join("logs");
    let (mut total, mut net, mut guest) = (Samples::new(), Samples::new(), Samples::new());
    for i in 0..env.plan.boots {
        let (id, wall) = pods::run_pod(&mut c, pods::pod_config(&format!("cni{i}"), &logs)).await?;
        total.push_duration(wall);
        let ph = pods::startup_phases(&mut c, &id).await?;
        net.push(ph.get("network").copied().unwrap_or(0.0));
        guest.push(ph.get("guestNetwork").copied().unwrap_or(0.0));
        pods::stop_and_remove_pod(&mut c, &id).await?;
    }
    let note = format!(
        "{} floor, {} no network",
        ratio(total.median(), env.median(FLOOR)),
        ratio(total.median(), env.median(RUN_PLAIN))
    );
    env.add(RUN_CNI, Unit::Millis, total, note);
    env.add(
        "   ↳ netns + CNI ADD + tap",
        Unit::Millis,
        net,
        "bridge, host-local, portmap, loopback",
    );
    env.add("   ↳ guest network via agent", Unit::Millis, guest, "");
    drop(c);
    drop(d);
    drop(host);
    Ok(())
}

async fn containers(env: &Env) -> anyhow::Result<()> {
    let (d, mut c) = env.daemon(None).await?;
    c.pull(&env.busybox).await?;
    let config = pods::pod_config("ctrs", &env.work.join("logs"));
    let (pod, _) = pods::run_pod(&mut c, config.clone()).await?;
    let (mut start, mut stop, mut remove) = (Samples::new(), Samples::new(), Samples::new());
    for i in 0..env.plan.containers {
        let ctr_config = pods::sleeper_config(&format!("c{i}"), &env.busybox);
        let (id, t) = pods::create_and_start(&mut c, &pod, &config, ctr_config.clone()).await?;
        start.push_duration(t);
        pods::wait_ready(&config, &ctr_config).await?;
        stop.push_duration(pods::stop_container(&mut c, &id, 10).await?);
        remove.push_duration(pods::remove_container(&mut c, &id).await?);
    }
    env.add(
        "3. CreateContainer + StartContainer",
        Unit::Millis,
        start,
        "busybox, running pod",
    );
    env.add(
        "3. StopContainer",
        Unit::Millis,
        stop,
        "TERM trap, polled every 0.1 s",
    );
    env.add("3. RemoveContainer", Unit::Millis, remove, "");

    // The same start from an image of as many layers as Docker builds: the pod
    // sees it as one overlay, so it should cost what the one-layer start does.
    let many = testimages::push_many_layers(&env.registry, "bench/layers127:1", 127)
        .await?
        .reference;
    c.pull(&many).await?;
    let mut start_many = Samples::new();
    for i in 0..env.plan.containers {
        let ctr_config = pods::sleeper_config(&format!("m{i}"), &many);
        let (id, t) = pods::create_and_start(&mut c, &pod, &config, ctr_config.clone()).await?;
        start_many.push_duration(t);
        pods::wait_ready(&config, &ctr_config).await?;
        pods::stop_container(&mut c, &id, 10).await?;
        pods::remove_container(&mut c, &id).await?;
    }
    env.add(
        "3. CreateContainer + StartContainer, 127-layer image",
        Unit::Millis,
        start_many,
        "running pod; reference: the busybox row above",
    );

    let (ctr, _) = pods::create_and_start(
        &mut c,
        &pod,
        &config,
        pods::sleeper_config("target", &env.busybox),
    )
    .await?;
    let mut execs = Samples::new();
    for _ in 0..env.plan.execs {
        execs.push_duration(pods::exec_sync(&mut c, &ctr, &["true"]).await?);
    }
    env.add("4. ExecSync `true`", Unit::Millis, execs, "");

    pods::stop_and_remove_pod(&mut c, &pod).await?;
    drop(c);
    drop(d);
    Ok(())
}

/// Rows 8 and 10: the agent channel measured directly, then exec and port-forward
/// through vesseld's streaming server over the same channel.
async fn channel_and_streams(env: &Env, with_streams: bool) -> anyhow::Result<()> {
    let (d, mut c) = env.daemon(None).await?;
    c.pull(&env.busybox).await?;
    let config = pods::pod_config("chan", &env.work.join("logs"));
    let (pod, _) = pods::run_pod(&mut c, config.clone()).await?;
    let (ctr, _) = pods::create_and_start(
        &mut c,
        &pod,
        &config,
        pods::sleeper_config("target", &env.busybox),
    )
    .await?;
    let agent = channel::agent_of(&vm_dir(&d, &pod))?;
    let rtt = channel::health_rtt(&agent, env.plan.rtts).await?;
    env.add(RTT, Unit::Millis, rtt, "Health, one connection");
    let (mut out, mut inp) = (Samples::new(), Samples::new());
    for i in 0..env.plan.streams {
        out.push(channel::stream_out(&agent, &ctr, env.plan.stream_bytes, &i.to_string()).await?);
        inp.push(channel::stream_in(&agent, &ctr, env.plan.stream_bytes, &i.to_string()).await?);
    }
    let size = format!("{} MiB per run", env.plan.stream_bytes / MIB);
    env.add(
        "8. agent stream guest → host",
        Unit::MiBps,
        out,
        format!("exec stdout, {size}"),
    );
    env.add(
        "8. agent stream host → guest",
        Unit::MiBps,
        inp,
        format!("exec stdin, {size}"),
    );
    if with_streams {
        streams_rows(env, &mut c, &pod, &config).await?;
    }
    pods::stop_and_remove_pod(&mut c, &pod).await?;
    drop(c);
    drop(d);
    Ok(())
}

/// Row 10 on a running pod: a container serving the port-forward rows, then exec
/// (throughput each way, keystroke echo) and port-forward (one connection each way).
async fn streams_rows(
    env: &Env,
    c: &mut CriClient,
    pod: &str,
    config: &k8s_cri::v1::PodSandboxConfig,
) -> anyhow::Result<()> {
    let bytes = env.plan.stream_bytes;
    let mut server = pods::sleeper_config("servers", &env.busybox);
    server.command = vec!["sh".into(), "-c".into(), streams::servers_script(bytes)];
    let (srv, _) = pods::create_and_start(c, pod, config, server).await?;
    // The guest's own pipe throughput, timed inside it: what any transport out of
    // the guest could reach at most.
    let pipe_bytes = 8 * bytes;
    let script = format!(
        "time sh -c '{} | {} >/dev/null'",
        streams::dd_source(pipe_bytes),
        streams::DD_SINK
    );
    let mut pipe = Samples::new();
    for _ in 0..env.plan.streams {
        let r = c
            .runtime
            .exec_sync(k8s_cri::v1::ExecSyncRequest {
                container_id: srv.clone(),
                cmd: vec!["sh".into(), "-c".into(), script.clone()],
                timeout: 120,
            })
            .await?
            .into_inner();
        let report = String::from_utf8_lossy(&r.stderr);
        let secs = streams::busybox_real_secs(&report)
            .with_context(|| format!("no time report from the guest: {report}"))?;
        pipe.push(channel::mib_per_s(
            pipe_bytes,
            Duration::from_secs_f64(secs),
        ));
    }
    env.add(
        "10. in-guest pipe, dd → dd (reference)",
        Unit::MiBps,
        pipe,
        format!(
            "timed in the guest by busybox time, {} MiB, 10 ms resolution",
            pipe_bytes / MIB
        ),
    );
    let (mut out, mut inp) = (Samples::new(), Samples::new());
    for _ in 0..env.plan.streams {
        out.push(streams::exec_out(c, &srv, bytes).await?);
        inp.push(streams::exec_in(c, &srv, bytes).await?);
    }
    let size = format!("{} MiB per run", bytes / MIB);
    let vs = |what: &Samples, row: &str| {
        format!(
            "{} of row 8 {row}",
            ratio(what.median(), env.median(&format!("8. agent stream {row}")))
        )
    };
    let note_out = format!("dd from /dev/zero, {size}; {}", vs(&out, "guest → host"));
    let note_in = format!("into dd, {size}; {}", vs(&inp, "host → guest"));
    env.add("10. exec stdout over SPDY", Unit::MiBps, out, note_out);
    env.add("10. exec stdin over SPDY", Unit::MiBps, inp, note_in);
    let keys = streams::keystrokes(c, &srv, env.plan.rtts.min(100)).await?;
    let note = format!(
        "exec -it cat, one byte to its echo; {} row 8 RTT",
        ratio(keys.median(), env.median(RTT))
    );
    env.add("10. exec -it keystroke echo", Unit::Millis, keys, note);

    wait_listening(c, &srv).await?;
    let (mut down, mut up) = (Samples::new(), Samples::new());
    for i in 0..env.plan.streams {
        let id = 2 * i as u32;
        down.push(streams::port_forward_down(c, pod, bytes, id).await?);
        up.push(streams::port_forward_up(c, pod, bytes, id + 1).await?);
    }
    env.add(
        "10. port-forward, pod → client",
        Unit::MiBps,
        down,
        format!("one connection, {size} of zeros from nc"),
    );
    env.add(
        "10. port-forward, client → pod",
        Unit::MiBps,
        up,
        format!("one connection, {size} into nc"),
    );
    Ok(())
}

/// Until the servers container's ports listen (TCG is slow to start them).
async fn wait_listening(c: &mut CriClient, ctr: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = c
            .runtime
            .exec_sync(k8s_cri::v1::ExecSyncRequest {
                container_id: ctr.into(),
                cmd: vec!["netstat".into(), "-ltn".into()],
                timeout: 10,
            })
            .await?
            .into_inner();
        let listening = String::from_utf8_lossy(&r.stdout).into_owned();
        let ports = [streams::DOWNLOAD_PORT, streams::UPLOAD_PORT];
        if ports.iter().all(|p| listening.contains(&format!(":{p} "))) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("port-forward servers not listening: {listening}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn parallel_pods(env: &Env) -> anyhow::Result<()> {
    let (d, mut c) = env.daemon(None).await?;
    let n = env.plan.parallel;
    let logs = env.work.join("logs");
    let mut walls = Samples::new();
    for round in 0..env.plan.parallel_rounds {
        let t = Instant::now();
        let started = futures::future::join_all((0..n).map(|i| {
            let mut c = c.clone();
            let config = pods::pod_config(&format!("par{round}-{i}"), &logs);
            async move { pods::run_pod(&mut c, config).await }
        }))
        .await;
        walls.push_duration(t.elapsed());
        let ids: Vec<String> = started
            .iter()
            .filter_map(|r| r.as_ref().ok().map(|(id, _)| id.clone()))
            .collect();
        if round == 0 && ids.len() == n {
            tokio::time::sleep(Duration::from_secs(env.plan.settle_secs)).await;
            let pss: Vec<Pss> = ids.iter().map(|id| pod_pss(&d, id)).collect();
            memory_rows(env, &format!("{n} pods"), &pss);
        }
        futures::future::join_all(ids.iter().map(|id| {
            let mut c = c.clone();
            async move { pods::stop_and_remove_pod(&mut c, id).await }
        }))
        .await;
        for r in started {
            r?;
        }
    }
    let note = format!(
        "{} one pod (row 2, no network); {n}/cores = {:.1}",
        ratio(walls.median(), env.median(RUN_PLAIN)),
        n as f64 / std::thread::available_parallelism().map_or(1, |c| c.get()) as f64
    );
    env.add(
        &format!("5. {n} pods started in parallel (wall)"),
        Unit::Millis,
        walls,
        note,
    );
    pods::remove_all_pods(&mut c).await;
    drop(c);
    drop(d);
    Ok(())
}

/// Row 9: `plan.parallel` pods, then [`stats_rows`].
async fn stats_phase(env: &Env) -> anyhow::Result<()> {
    let (d, mut c) = env.daemon(None).await?;
    c.pull(&env.busybox).await?;
    let logs = env.work.join("logs");
    // One at a time: this row measures stats, not boots (parallel TCG boots on a
    // small host can outlast the agent's start-up limit).
    let mut ids = Vec::new();
    for i in 0..env.plan.parallel {
        let config = pods::pod_config(&format!("stats-{i}"), &logs);
        ids.push(pods::run_pod(&mut c, config).await?.0);
    }
    let measured = stats_rows(env, &c, &ids).await;
    pods::remove_all_pods(&mut c).await;
    drop(c);
    drop(d);
    measured
}

/// Containers per pod in the stats rows.
const STATS_CONTAINERS: usize = 3;

/// ListContainerStats over `pods` with [`STATS_CONTAINERS`] running containers
/// each: with fresh samples (vesseld's cache expired: one agent round trip per
/// pod, all at once) and served from the cache.
async fn stats_rows(env: &Env, c: &CriClient, pods: &[String]) -> anyhow::Result<()> {
    let logs = env.work.join("logs");
    // The configs the pods were started with (stats_phase). One at a time, like
    // the pods: many guests mounting overlays at once under TCG outlast the agent
    // call limit on a small host.
    let mut c = c.clone();
    for (i, pod) in pods.iter().enumerate() {
        let config = pods::pod_config(&format!("stats-{i}"), &logs);
        for k in 0..STATS_CONTAINERS {
            let cfg = pods::sleeper_config(&format!("stats-{k}"), &env.busybox);
            pods::create_and_start(&mut c, pod, &config, cfg).await?;
        }
    }
    let want = pods.len() * STATS_CONTAINERS;
    let (mut fresh, mut cached) = (Samples::new(), Samples::new());
    let mut fewest = want;
    for _ in 0..env.plan.execs {
        // Past vesseld's 1 s stats cache.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        for samples in [&mut fresh, &mut cached] {
            let t = Instant::now();
            let stats = c
                .runtime
                .list_container_stats(k8s_cri::v1::ListContainerStatsRequest::default())
                .await
                .context("ListContainerStats")?
                .into_inner()
                .stats;
            samples.push_duration(t.elapsed());
            // A guest slower than vesseld's 2 s stats limit (a loaded TCG host)
            // leaves its containers without numbers: the note says how many had them.
            let with_cpu = stats.iter().filter(|s| s.cpu.is_some()).count();
            fewest = fewest.min(with_cpu);
        }
    }
    let what = format!("{} pods × {STATS_CONTAINERS} containers", pods.len());
    env.add(
        &format!("9. ListContainerStats, {what}, fresh"),
        Unit::Millis,
        fresh,
        format!("one PodStats round trip per pod, in parallel; ≥ {fewest} of {want} with stats"),
    );
    env.add(
        &format!("9. ListContainerStats, {what}, cached"),
        Unit::Millis,
        cached,
        "within the 1 s sample cache",
    );
    Ok(())
}

/// Row 11: ListContainers / ListPodSandbox latency while `plan.churn_pods` pods
/// change state at once (see [`listing`]).
async fn listing_phase(env: &Env) -> anyhow::Result<()> {
    let (d, mut c) = env.daemon(None).await?;
    c.pull(&env.busybox).await?;
    let (n, cycles) = (env.plan.churn_pods, env.plan.churn_cycles);
    let measured =
        listing::churn_and_poll(&c, &env.busybox, &env.work.join("logs"), n, cycles).await;
    pods::remove_all_pods(&mut c).await;
    drop(c);
    drop(d);
    let l = measured?;
    let failed = if l.failed.is_empty() {
        String::new()
    } else {
        format!("; {} of {} cycles failed", l.failed.len(), l.cycles)
    };
    for e in &l.failed {
        eprintln!("row 11: pod cycle failed: {e}");
    }
    for (call, samples) in [("ListContainers", l.containers), ("ListPodSandbox", l.pods)] {
        let note = format!(
            "p99 {}, max {}; {n} pods × {cycles} run → container → stop → remove, ≤ {} boots at once{failed}",
            samples
                .percentile(0.99)
                .map_or("-".into(), |v| format_value(Unit::Millis, v)),
            samples
                .max()
                .map_or("-".into(), |v| format_value(Unit::Millis, v)),
            listing::BOOTS_AT_ONCE,
        );
        env.add(
            &format!("11. {call} during {n}-pod churn"),
            Unit::Millis,
            samples,
            note,
        );
    }
    if l.failed.len() == l.cycles {
        bail!("every pod cycle failed, first: {}", l.failed[0]);
    }
    Ok(())
}

async fn pull(env: &Env, with_peer: bool) -> anyhow::Result<()> {
    let files = env.plan.layer_files;
    let layers = tokio::task::spawn_blocking(move || {
        (0..LAYERS)
            .map(|i| {
                testimages::random_files_layer(
                    &format!("data{i}"),
                    files,
                    MIB,
                    LayerCompression::Gzip,
                )
            })
            .collect::<anyhow::Result<Vec<_>>>()
    })
    .await??;
    let bytes: usize = layers.iter().map(|l| l.data.len()).sum();
    let image = testimages::push_layers(&env.registry, "bench/pull:1", layers)
        .await?
        .reference;
    let size = bytes as f64 / MIB as f64;

    let (mut secs, mut rate) = (Samples::new(), Samples::new());
    for _ in 0..env.plan.pulls {
        // A fresh daemon each time: an empty store, nothing cached.
        let (d, mut c) = env.daemon(None).await?;
        let t = Instant::now();
        c.pull(&image).await?;
        let elapsed = t.elapsed();
        secs.push_duration(elapsed);
        rate.push(channel::mib_per_s(bytes, elapsed));
        drop(c);
        drop(d);
    }
    let what = format!("{size:.0} MiB, {LAYERS} gzip layers of {files} random 1 MiB files");
    env.add(
        "7. pull + unpack, vessel, cold",
        Unit::Millis,
        secs.clone(),
        what.clone(),
    );
    env.add(
        "   ↳ throughput",
        Unit::MiBps,
        rate,
        "compressed bytes / wall time",
    );

    if with_peer && !peer::available() {
        peer::install()?;
    }
    if !peer::available() {
        env.add(
            "7. pull + unpack, containerd `ctr` (peer)",
            Unit::Millis,
            Samples::new(),
            "containerd not installed: run with --peer",
        );
        return Ok(());
    }
    let mut peer_secs = Samples::new();
    for i in 0..env.plan.pulls {
        let dir = env.work.join(format!("containerd{i}"));
        let mut ctrd = peer::Containerd::start(&dir)?;
        peer_secs.push_duration(ctrd.pull(&image)?);
        drop(ctrd);
        super::janitor::unmount_under(&dir);
        let _ = std::fs::remove_dir_all(&dir);
    }
    let note = format!(
        "vessel takes {} of ctr's time; ctr {}",
        ratio(secs.median(), peer_secs.median()),
        peer_secs
            .median()
            .map(|ms| format_value(Unit::MiBps, size / (ms / 1000.0)))
            .unwrap_or_default()
    );
    env.add(
        "7. pull + unpack, containerd `ctr` (peer)",
        Unit::Millis,
        peer_secs,
        note,
    );
    Ok(())
}

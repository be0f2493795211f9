//! Row 11: how long the kubelet's list calls take while many pods change state.
//! A poller calls ListContainers then ListPodSandbox back to back, as the kubelet's
//! relist does every second, while every pod cycles through run → create + start a
//! container → stop it → remove it → stop + remove the pod, all pods at once. Every
//! one of those steps writes the state store; the lists only read it. Boots are
//! limited to [`BOOTS_AT_ONCE`] at a time: ten TCG guests booting together on a
//! small host outlast the agent's start-up limit, and the row measures state
//! changes, not boots (the other steps of all pods overlap freely).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_cri::v1 as cri;
use tokio::sync::Semaphore;

use super::pods;
use super::stats::Samples;
use crate::cri::CriClient;

/// What the poller saw, and how many pod cycles failed (a cycle that failed still
/// wrote state; the note reports it so a short row is not read as a clean one).
pub struct Listing {
    pub containers: Samples,
    pub pods: Samples,
    pub cycles: usize,
    pub failed: Vec<String>,
}

/// RunPodSandbox calls in flight at most.
pub const BOOTS_AT_ONCE: usize = 2;

/// Runs `cycles` lifecycles in each of `n` pods at once while polling the lists.
pub async fn churn_and_poll(
    c: &CriClient,
    image: &str,
    log_dir: &std::path::Path,
    n: usize,
    cycles: usize,
) -> anyhow::Result<Listing> {
    let done = Arc::new(AtomicBool::new(false));
    let poller = tokio::spawn(poll(c.clone(), done.clone()));
    let boots = Semaphore::new(BOOTS_AT_ONCE);
    let results = futures::future::join_all((0..n).map(|i| {
        let mut c = c.clone();
        let boots = &boots;
        async move {
            for round in 0..cycles {
                let name = format!("list{i}-{round}");
                one_cycle(&mut c, boots, image, log_dir, &name)
                    .await
                    .map_err(|e| format!("{name}: {e:#}"))?;
            }
            Ok::<_, String>(())
        }
    }))
    .await;
    done.store(true, Ordering::Relaxed);
    let (containers, pods) = poller.await??;
    Ok(Listing {
        containers,
        pods,
        cycles: n * cycles,
        failed: results.into_iter().filter_map(Result::err).collect(),
    })
}

/// One pod's lifecycle; the pod is removed even when a container step fails.
async fn one_cycle(
    c: &mut CriClient,
    boots: &Semaphore,
    image: &str,
    log_dir: &std::path::Path,
    name: &str,
) -> anyhow::Result<()> {
    let config = pods::pod_config(name, log_dir);
    let boot = boots.acquire().await?;
    let (pod, _) = pods::run_pod(c, config.clone()).await?;
    drop(boot);
    let containers = async {
        let (ctr, _) =
            pods::create_and_start(c, &pod, &config, pods::sleeper_config("app", image)).await?;
        // Timeout 0: killed at once, so the row measures state changes, not the trap.
        pods::stop_container(c, &ctr, 0).await?;
        pods::remove_container(c, &ctr).await?;
        anyhow::Ok(())
    }
    .await;
    let teardown = pods::stop_and_remove_pod(c, &pod).await;
    containers?;
    teardown?;
    Ok(())
}

/// A short pause between polls: enough samples for a p99 without the poller
/// itself taking a core from the TCG guests.
const POLL_GAP: Duration = Duration::from_millis(20);

/// ListContainers then ListPodSandbox, back to back, until `done`.
async fn poll(mut c: CriClient, done: Arc<AtomicBool>) -> anyhow::Result<(Samples, Samples)> {
    let (mut containers, mut pods) = (Samples::new(), Samples::new());
    while !done.load(Ordering::Relaxed) {
        let t = Instant::now();
        c.runtime
            .list_containers(cri::ListContainersRequest { filter: None })
            .await?;
        containers.push_duration(t.elapsed());
        let t = Instant::now();
        c.runtime
            .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
            .await?;
        pods.push_duration(t.elapsed());
        tokio::time::sleep(POLL_GAP).await;
    }
    Ok((containers, pods))
}

//! vessel-agent: PID 1 of the pod VM. Boots the guest (mounts, modules, cgroups) and
//! serves the agent API (proto/agent.proto) over vsock port 1024.

mod boot;
mod cgroup;
mod clock;
mod containers;
mod execuserns;
mod log;
mod modules;
mod mounts;
mod network;
mod oci;
mod output;
mod podfiles;
mod podinit;
mod podstats;
mod ready;
mod reaper;
mod scratch;
mod service;
mod spec;
mod startsig;
mod stats;
mod stdio;
mod sysctl;
mod vsock_io;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // The kernel's modprobe (/sbin/modprobe links to the agent in the initramfs).
    if std::env::args()
        .next()
        .is_some_and(|a| a.rsplit('/').next() == Some("modprobe"))
    {
        std::process::exit(modules::modprobe_main(&args));
    }
    if args.first().map(String::as_str) == Some(oci::HELPER_ARG) {
        std::process::exit(oci::helper_main(&args[1..]));
    }
    if args.first().map(String::as_str) == Some(podinit::PODINIT_ARG) {
        std::process::exit(podinit::main());
    }
    let pid1 = std::process::id() == 1;
    if pid1 {
        boot::boot();
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => fatal(&format!("tokio runtime: {e}")),
    };
    let result = rt.block_on(serve(pid1));
    match result {
        Ok(()) => fatal("server stopped"),
        Err(e) => fatal(&format!("{e:#}")),
    }
}

async fn serve(pid1: bool) -> anyhow::Result<()> {
    if pid1 {
        // Not awaited: readiness does not wait on it.
        tokio::spawn(async {
            if let Err(e) = network::links_up().await {
                log::warn(&format!("cannot bring the interfaces up: {e}"));
            }
        });
    }
    let reaper = reaper::Reaper::default();
    if pid1 {
        tokio::spawn(reaper.clone().run());
    }
    let incoming = vsock_io::incoming(vessel_proto::AGENT_VSOCK_PORT)?;
    // The port is bound (connections queue until the server below takes them): tell
    // the host, which waits for this rather than polling.
    if pid1 {
        tokio::spawn(ready::announce());
    }
    let svc = service::AgentService::new(reaper, clock::monotonic_ms());
    log::info(&format!(
        "serving on vsock port {} at {} ms",
        vessel_proto::AGENT_VSOCK_PORT,
        clock::monotonic_ms()
    ));
    tonic::transport::Server::builder()
        .add_service(vessel_proto::agent::agent_server::AgentServer::new(svc))
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}

/// PID 1 must never exit (the kernel would panic): log, then power off so the host
/// sees the VM stop rather than a silent hang.
fn fatal(msg: &str) -> ! {
    log::error(&format!("fatal: {msg}"));
    boot::power_off()
}

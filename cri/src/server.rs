//! Start-up order and the gRPC server: lock, state, image store, socket, serve.

use std::sync::Arc;

use anyhow::Context as _;
use k8s_cri::v1::image_service_server::ImageServiceServer;
use k8s_cri::v1::runtime_service_server::RuntimeServiceServer;
use tokio_stream::wrappers::UnixListenerStream;
use vessel_image::{ImageStore, ImageStoreConfig};

use crate::calllog::CallLogLayer;
use crate::config::Config;
use crate::engine::Engine;
use crate::images::ImageSvc;
use crate::instance::{bind_socket, InstanceLock};
use crate::reload::Reloader;
use crate::runtime::RuntimeSvc;

pub fn run(config: Config, reloader: Reloader) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(serve(Arc::new(config), reloader))
}

async fn serve(config: Arc<Config>, reloader: Reloader) -> anyhow::Result<()> {
    // The lock comes first: nothing below may touch the state of a live instance.
    let _lock = InstanceLock::acquire(&config.lock_file())?;

    crate::hostdirs::prepare(&config)?;
    let db_path = config.state_db();
    let db = vessel_storage::db::Db::open(&db_path)
        .with_context(|| format!("cannot open state database {}", db_path.display()))?;

    let store_cfg = ImageStoreConfig {
        root: config.root.clone(),
        certs_dir: config.image.certs_dir.clone(),
        max_concurrent_downloads: config.image.max_concurrent_downloads,
        download_limits: vessel_image::DownloadLimits {
            min_rate: config.image.min_download_rate_kib.saturating_mul(1024),
            window: std::time::Duration::from_secs(config.image.download_rate_window_s),
        },
        limits: vessel_image::ImageLimits {
            max_unpacked_bytes: config.image.max_unpacked_bytes,
            max_image_entries: config.image.max_image_entries,
            max_layers: config.image.max_layers,
        },
    };
    // open() also garbage-collects what an interrupted pull left behind.
    let image_db = db.clone();
    let store = tokio::task::spawn_blocking(move || ImageStore::open(store_cfg, image_db))
        .await
        .context("image store task failed")?
        .context("cannot open the image store")?;

    // Pods and containers: reconnects to the VMs that outlived a restart.
    let engine = Engine::open(config.clone(), store.clone(), db)
        .await
        .context("cannot open the runtime state")?;

    // Before the CRI socket: Exec/Attach/PortForward hand out URLs on it.
    let streaming =
        crate::streaming::StreamingServer::start(config.streaming.clone(), engine.clone()).await?;

    for problem in crate::hostcheck::default_handler_problems(&config) {
        tracing::warn!(%problem, "pod VMs cannot start; Status reports RuntimeReady=false");
    }

    // The socket comes last: once it exists, vesseld answers.
    let listener = bind_socket(&config.listen)?;
    tracing::info!(
        listen = %config.listen.display(),
        root = %config.root.display(),
        version = env!("CARGO_PKG_VERSION"),
        "vesseld serving CRI v1"
    );

    let containers = engine.store().clone();
    let image_users: crate::images::ImageUsers = Arc::new(move |image_id: &str| {
        containers
            .containers()
            .into_iter()
            .find(|c| c.image_id == image_id)
            .map(|c| format!("container {} ({}) of pod {}", c.id, c.name, c.pod_id))
    });

    crate::metrics::get().set_image_store(store.clone());
    let metrics = crate::metrics::get().clone();
    engine.store().observe(Arc::new(move |change, pod, ctrs| {
        metrics.observe_change(change, pod, ctrs)
    }));
    if !config.metrics.address.is_empty() {
        // Validated at load: a socket address.
        let addr = config.metrics.address.parse().context("metrics.address")?;
        let listener = crate::metrics::bind(addr)
            .await
            .with_context(|| format!("cannot listen on metrics.address {addr}"))?;
        tracing::info!(%addr, "serving Prometheus metrics on /metrics");
        tokio::spawn(crate::metrics::serve(listener));
    }

    let shutdown = shutdown_signal();
    tokio::spawn(reloader.start((*config).clone()));
    // The socket is bound and accepting: connections queue until serve() below takes
    // them, so a supervisor may send clients now.
    crate::sdnotify::notify("READY=1");

    // Inside the call log, so the logged latency includes making the change durable.
    let durable = crate::durable::DurableLayer::new(engine.store().clone());
    let result = tonic::transport::Server::builder()
        .layer(CallLogLayer)
        .layer(durable)
        .add_service(RuntimeServiceServer::new(
            RuntimeSvc::new(config.clone(), store.clone(), engine.clone())
                .with_streaming(streaming),
        ))
        .add_service(ImageServiceServer::new(ImageSvc::new(
            store,
            image_users,
            crate::scratch::scratch_disks(&config),
        )))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await;

    // Pods outlive vesseld; its warm pool does not (the next start would only
    // destroy it).
    engine.stop_pools().await;

    // Our own socket: remove it so the next start does not have to probe it.
    if let Err(e) = std::fs::remove_file(&config.listen) {
        tracing::warn!(listen = %config.listen.display(), error = %e, "cannot remove socket");
    }
    result.context("gRPC server failed")?;
    tracing::info!("vesseld stopped");
    Ok(())
}

/// Installs the SIGTERM/SIGINT handlers now (before READY=1 is sent: a stop that
/// follows readiness at once must not meet the default action, which kills) and
/// returns the future that completes on either.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        let (Ok(mut term), Ok(mut int)) = handlers else {
            tracing::warn!("cannot install signal handlers; stop vesseld with SIGKILL");
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        crate::sdnotify::notify("STOPPING=1");
    }
}

//! The pod lifecycle, its locking and its unwind, driven through fake host steps
//! (no root, no VM). The fake records every call, so the tests assert order.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_cri::v1 as cri;
use vessel_network::PodNetwork;
use vessel_sandbox::{PodVm, VmConfig};
use vessel_storage::scratch::ScratchDisk;
use vessel_storage::sharedir::ShareDir;

use super::steps::PodSteps;
use super::{Engine, RuntimeError};
use crate::config::Config;

/// The steps of a pod start, in order, and the undo of each.
const NETWORK: &str = "network";
const SHARE: &str = "share";
const SCRATCH: &str = "scratch";
const VM: &str = "vm";
const UNDO_NETWORK: &str = "undo network";
const UNDO_SHARE: &str = "undo share";
const UNDO_SCRATCH: &str = "undo scratch";

/// How the fake VM start fails (a VM never comes up: a fake cannot make a PodVm).
#[derive(Clone, Copy, PartialEq)]
enum VmFailure {
    /// QEMU or a helper died during boot.
    Boot,
    /// The VM booted but its agent never answered.
    AgentWait,
}

struct FakeSteps {
    calls: Mutex<Vec<&'static str>>,
    /// The step that fails (NETWORK, SHARE, SCRATCH; VM always fails).
    fail_at: Option<&'static str>,
    vm_failure: VmFailure,
    /// When set, the VM start waits for `release` after signalling `entered`.
    gate: bool,
    entered: tokio::sync::Notify,
    release: tokio::sync::Notify,
}

impl FakeSteps {
    fn new(fail_at: Option<&'static str>) -> Self {
        FakeSteps {
            calls: Mutex::default(),
            fail_at,
            vm_failure: VmFailure::Boot,
            gate: false,
            entered: tokio::sync::Notify::new(),
            release: tokio::sync::Notify::new(),
        }
    }

    fn gated() -> Self {
        FakeSteps {
            gate: true,
            ..Self::new(None)
        }
    }

    fn step(&self, name: &'static str) -> Result<(), RuntimeError> {
        self.calls.lock().unwrap().push(name);
        if self.fail_at == Some(name) {
            return Err(RuntimeError::internal(format!("fake {name} failure")));
        }
        Ok(())
    }

    fn calls(&self) -> Vec<&'static str> {
        self.calls.lock().unwrap().clone()
    }
}

#[tonic::async_trait]
impl PodSteps for FakeSteps {
    async fn setup_network(
        &self,
        _id: &str,
        _config: &cri::PodSandboxConfig,
    ) -> Result<Option<PodNetwork>, RuntimeError> {
        self.step(NETWORK).map(|()| None)
    }

    async fn teardown_network(&self, _id: &str) -> Result<(), RuntimeError> {
        self.step(UNDO_NETWORK)
    }

    async fn create_share(
        &self,
        path: PathBuf,
        _files: BTreeMap<&'static str, String>,
    ) -> Result<ShareDir, RuntimeError> {
        self.step(SHARE)?;
        std::fs::create_dir_all(&path).unwrap();
        Ok(ShareDir::existing(&path))
    }

    async fn destroy_share(&self, _path: PathBuf) -> Result<(), RuntimeError> {
        self.step(UNDO_SHARE)
    }

    async fn create_scratch(&self, id: &str, _mib: u64) -> Result<ScratchDisk, RuntimeError> {
        self.step(SCRATCH)?;
        let file = tempfile::tempfile().unwrap();
        Ok(ScratchDisk {
            path: PathBuf::from(format!("/nonexistent/{id}.img")),
            file: file.try_clone().unwrap().into(),
            file_ro: file.into(),
        })
    }

    async fn remove_scratch(&self, _id: &str) -> Result<(), RuntimeError> {
        self.step(UNDO_SCRATCH)
    }

    async fn start_vm(&self, _config: VmConfig) -> Result<PodVm, RuntimeError> {
        self.step(VM)?;
        if self.gate {
            self.entered.notify_one();
            self.release.notified().await;
        }
        let e = match self.vm_failure {
            VmFailure::Boot => vessel_sandbox::Error::HelperDied {
                program: "qemu".into(),
                log_tail: "fake".into(),
            },
            VmFailure::AgentWait => vessel_sandbox::Error::AgentNotReady {
                limit: Duration::from_secs(1),
                last_error: "fake".into(),
                log_tail: String::new(),
            },
        };
        Err(RuntimeError::sandbox("cannot start the pod VM", e))
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    engine: Arc<Engine>,
    steps: Arc<FakeSteps>,
    config: Arc<Config>,
    images: vessel_image::ImageStore,
}

async fn fixture(steps: FakeSteps) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let config = Arc::new(Config {
        root: dir.path().join("root"),
        run_root: dir.path().join("run"),
        ..Default::default()
    });
    let db = Arc::new(redb::Database::create(dir.path().join("state.redb")).unwrap());
    let images = vessel_image::ImageStore::open(
        vessel_image::ImageStoreConfig {
            root: config.root.clone(),
            certs_dir: dir.path().join("certs"),
            max_concurrent_downloads: 1,
            download_limits: vessel_image::DownloadLimits {
                min_rate: 0,
                window: Duration::from_secs(10),
            },
        },
        db.clone(),
    )
    .unwrap();
    let store = crate::store::StateStore::open(db).unwrap();
    let steps = Arc::new(steps);
    let engine = Engine::with_steps(
        config.clone(),
        images.clone(),
        store,
        crate::podnet::manager(&config),
        crate::scratch::scratch_disks(&config),
        steps.clone(),
    )
    .await;
    Fixture {
        _dir: dir,
        engine,
        steps,
        config,
        images,
    }
}

fn run_request(name: &str) -> cri::RunPodSandboxRequest {
    cri::RunPodSandboxRequest {
        config: Some(cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.into(),
                namespace: "ns".into(),
                uid: format!("uid-{name}"),
                attempt: 0,
            }),
            ..Default::default()
        }),
        runtime_handler: String::new(),
    }
}

/// Nothing of the pod is left: no record, no entry, no pod dir.
fn assert_gone(f: &Fixture) {
    assert!(f.engine.store().pods().is_empty(), "a pod record is left");
    assert!(f.engine.entries().is_empty(), "a pod entry is left");
    let pods = f.config.run_root.join("pods");
    let left: Vec<_> = std::fs::read_dir(&pods)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "pod dirs left: {left:?}");
}

/// The only pod's id, once its record exists.
fn only_pod(f: &Fixture) -> String {
    let pods = f.engine.store().pods();
    assert_eq!(pods.len(), 1);
    pods[0].id.clone()
}

#[tokio::test]
async fn a_failed_step_undoes_every_earlier_step() {
    // Each failing step, with the steps that ran before it.
    let cases: [(Option<&'static str>, VmFailure, &[&str]); 5] = [
        (Some(NETWORK), VmFailure::Boot, &[NETWORK]),
        (Some(SHARE), VmFailure::Boot, &[NETWORK, SHARE]),
        (Some(SCRATCH), VmFailure::Boot, &[NETWORK, SHARE, SCRATCH]),
        (None, VmFailure::Boot, &[NETWORK, SHARE, SCRATCH, VM]),
        (None, VmFailure::AgentWait, &[NETWORK, SHARE, SCRATCH, VM]),
    ];
    for (fail_at, vm_failure, ran) in cases {
        let f = fixture(FakeSteps {
            vm_failure,
            ..FakeSteps::new(fail_at)
        })
        .await;
        let err = f.engine.run_pod(run_request("web")).await.unwrap_err();
        let calls = f.steps.calls();
        // The steps up to the failure, then every undo (idempotent, so all run),
        // the VM's resources (the tap) first.
        let mut want = ran.to_vec();
        want.extend([UNDO_NETWORK, UNDO_SHARE, UNDO_SCRATCH]);
        assert_eq!(calls, want, "failing at {fail_at:?}: {err}");
        assert_gone(&f);
    }
}

#[tokio::test]
async fn remove_during_run_waits_for_the_run() {
    let f = fixture(FakeSteps::gated()).await;
    let run = tokio::spawn({
        let e = f.engine.clone();
        async move { e.run_pod(run_request("web")).await }
    });
    f.steps.entered.notified().await;
    // The record exists (NOTREADY) while the VM boots.
    let id = only_pod(&f);
    let remove = tokio::spawn({
        let (e, id) = (f.engine.clone(), id.clone());
        async move { e.remove_pod(&id).await }
    });
    let stop = tokio::spawn({
        let (e, id) = (f.engine.clone(), id.clone());
        async move { e.stop_pod(&id).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!remove.is_finished() && !stop.is_finished());
    // Nothing was torn down under the booting VM.
    assert_eq!(f.steps.calls(), [NETWORK, SHARE, SCRATCH, VM]);
    f.steps.release.notify_one();
    assert!(run.await.unwrap().is_err());
    remove.await.unwrap().unwrap();
    stop.await.unwrap().unwrap();
    // The run's own unwind, once; the remove and stop found the pod gone.
    assert_eq!(
        f.steps.calls(),
        [
            NETWORK,
            SHARE,
            SCRATCH,
            VM,
            UNDO_NETWORK,
            UNDO_SHARE,
            UNDO_SCRATCH
        ]
    );
    assert_gone(&f);
}

#[tokio::test]
async fn create_container_during_run_waits_then_finds_no_pod() {
    let f = fixture(FakeSteps::gated()).await;
    let run = tokio::spawn({
        let e = f.engine.clone();
        async move { e.run_pod(run_request("web")).await }
    });
    f.steps.entered.notified().await;
    let id = only_pod(&f);
    let create = tokio::spawn({
        let (e, id) = (f.engine.clone(), id.clone());
        async move {
            e.create_container(cri::CreateContainerRequest {
                pod_sandbox_id: id,
                config: Some(cri::ContainerConfig {
                    metadata: Some(cri::ContainerMetadata {
                        name: "c".into(),
                        attempt: 0,
                    }),
                    image: Some(cri::ImageSpec {
                        image: "busybox".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                sandbox_config: None,
            })
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !create.is_finished(),
        "CreateContainer ran under a booting pod"
    );
    f.steps.release.notify_one();
    assert!(run.await.unwrap().is_err());
    let err = create.await.unwrap().unwrap_err();
    assert_eq!(tonic::Status::from(err).code(), tonic::Code::NotFound);
    assert!(f.engine.store().containers().is_empty());
    assert_gone(&f);
}

#[tokio::test]
async fn a_client_hanging_up_mid_run_leaves_nothing_half_done() {
    use k8s_cri::v1::runtime_service_server::RuntimeService;
    let f = fixture(FakeSteps::gated()).await;
    let svc = crate::runtime::RuntimeSvc::new(f.config.clone(), f.images.clone(), f.engine.clone());
    {
        let call = svc.run_pod_sandbox(tonic::Request::new(run_request("web")));
        tokio::select! {
            _ = call => panic!("the run finished while its VM was held"),
            _ = f.steps.entered.notified() => {}
        }
        // tonic drops the handler's future when the client goes: so does this.
    }
    f.steps.release.notify_one();
    // The run goes on without its caller and unwinds completely.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while f.steps.calls().len() < 7 || !f.engine.store().pods().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{:?}",
            f.steps.calls()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        f.steps.calls(),
        [
            NETWORK,
            SHARE,
            SCRATCH,
            VM,
            UNDO_NETWORK,
            UNDO_SHARE,
            UNDO_SCRATCH
        ]
    );
    // The entry goes after the record; give the unwind its last step.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_gone(&f);
}

#[tokio::test]
async fn calls_on_unknown_ids_say_not_found_or_succeed() {
    let f = fixture(FakeSteps::new(None)).await;
    // Stop and remove are idempotent; the others name what is missing.
    f.engine.stop_pod("nope").await.unwrap();
    f.engine.remove_pod("nope").await.unwrap();
    f.engine.stop_container("nope", 0).await.unwrap();
    f.engine.remove_container("nope").await.unwrap();
    let code = |e: RuntimeError| tonic::Status::from(e).code();
    assert_eq!(
        code(f.engine.start_container("nope").await.unwrap_err()),
        tonic::Code::NotFound
    );
    assert_eq!(
        code(
            f.engine
                .exec_sync(cri::ExecSyncRequest {
                    container_id: "nope".into(),
                    cmd: vec!["true".into()],
                    timeout: 0,
                })
                .await
                .unwrap_err()
        ),
        tonic::Code::NotFound
    );
    assert!(f.steps.calls().is_empty());
}

#[test]
fn a_missing_or_corrupt_process_spec_fails_the_exec() {
    let mut c = crate::store::ContainerRecord {
        id: "c1".into(),
        pod_id: "p1".into(),
        name: "c".into(),
        attempt: 0,
        labels: Default::default(),
        annotations: Default::default(),
        image: String::new(),
        image_id: String::new(),
        image_ref: String::new(),
        log_path: String::new(),
        state: crate::store::ContainerState::Running,
        created_at_ns: 0,
        started_at_ns: 0,
        finished_at_ns: 0,
        exit_code: 0,
        reason: String::new(),
        message: String::new(),
        config: Vec::new(),
        stop_signal: String::new(),
        process_json: String::new(),
    };
    let e = super::exec_process(&c).unwrap_err();
    assert!(matches!(e, RuntimeError::FailedPrecondition(_)), "{e}");
    c.process_json = "{not json".into();
    let e = super::exec_process(&c).unwrap_err();
    assert!(e.to_string().contains("corrupt"), "{e}");
    c.process_json = r#"{"cwd":"/","user":{"uid":1000,"gid":1000}}"#.into();
    let p = super::exec_process(&c).unwrap();
    assert_eq!(p.user().uid(), 1000);
}

//! The pod lifecycle, its locking and its unwind, driven through fake host steps
//! (no root, no VM). The fake records every call, so the tests assert order.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::fd::BorrowedFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use k8s_cri::v1 as cri;
use tokio::sync::{watch, Notify};
use vessel_proto::agent as pb;
use vessel_sandbox::vm::BootTiming;
use vessel_sandbox::{
    NetConfig, NewContainer, OutputStream, PodVm, ResolvedAccel, VmConfig, VmExit,
};
use vessel_storage::scratch::ScratchDisk;
use vessel_storage::sharedir::ShareDir;

use super::steps::{PodNet, PodSteps, PreparedNet};
use super::vm::{Output, RunningVm};
use super::{Engine, RuntimeError};
use crate::config::Config;
use crate::store::ContainerState;

/// The steps of a pod start, in order, and the undo of each.
const NETWORK: &str = "network";
const SHARE: &str = "share";
const SCRATCH: &str = "scratch";
const VM: &str = "vm";
/// The agent configures the guest's network (only with a pod network).
const GUEST_NETWORK: &str = "guest network";
const VM_STOP: &str = "vm stop";
const UNDO_NETWORK: &str = "undo network";
const UNDO_SHARE: &str = "undo share";
const UNDO_SCRATCH: &str = "undo scratch";
/// A pool VM's claim: CNI ADD into its netns, the pod files into its share.
const ATTACH_NETWORK: &str = "attach network";
const POD_FILES: &str = "pod files";

/// How the fake VM start fails.
#[derive(Clone, Copy, PartialEq)]
enum VmFailure {
    /// QEMU or a helper died during boot.
    Boot,
    /// The VM booted but its agent never answered.
    AgentWait,
}

/// The calls of a pod's steps and of its VM, in the order they ran.
type CallLog = Arc<Mutex<Vec<String>>>;

fn log(calls: &CallLog, call: String) {
    calls.lock().unwrap().push(call);
}

/// A point where a fake call waits until the test lets it go on.
#[derive(Default)]
struct Gate {
    entered: Notify,
    release: Notify,
}

impl Gate {
    async fn pass(&self) {
        self.entered.notify_one();
        self.release.notified().await;
    }
}

/// A pod VM without a VM: records every call in the pod's call log, fails the
/// calls named in `fail`, holds the calls named in `gates` once, and runs each
/// started container's main process until it is signalled or removed.
struct FakeVm {
    id: OnceLock<String>,
    calls: CallLog,
    fail: Mutex<HashSet<&'static str>>,
    gates: Mutex<HashMap<&'static str, Arc<Gate>>>,
    exit: watch::Sender<Option<VmExit>>,
    /// Main processes: container id → its exit code once it ended.
    procs: Mutex<HashMap<String, watch::Sender<Option<i32>>>>,
}

impl FakeVm {
    fn new(calls: CallLog) -> Self {
        FakeVm {
            id: OnceLock::new(),
            calls,
            fail: Mutex::default(),
            gates: Mutex::default(),
            exit: watch::Sender::new(None),
            procs: Mutex::default(),
        }
    }

    fn fail(&self, call: &'static str) {
        self.fail.lock().unwrap().insert(call);
    }

    /// The next `call` waits at the returned gate.
    fn gate(&self, call: &'static str) -> Arc<Gate> {
        let gate = Arc::new(Gate::default());
        self.gates.lock().unwrap().insert(call, gate.clone());
        gate
    }

    /// Logs `call` (with `arg`), waits at its gate if it has one, then fails if told.
    async fn call(&self, call: &'static str, arg: &str) -> vessel_sandbox::Result<()> {
        log(
            &self.calls,
            if arg.is_empty() {
                call.to_owned()
            } else {
                format!("{call} {arg}")
            },
        );
        let gate = self.gates.lock().unwrap().remove(call);
        if let Some(gate) = gate {
            gate.pass().await;
        }
        if self.fail.lock().unwrap().contains(call) {
            return Err(vessel_sandbox::Error::Agent(tonic::Status::internal(
                format!("fake {call} failure"),
            )));
        }
        Ok(())
    }

    /// Ends a container's main process with `code`.
    fn end(&self, id: &str, code: i32) {
        if let Some(p) = self.procs.lock().unwrap().get(id) {
            p.send_if_modified(|c| c.is_none() && c.replace(code).is_none());
        }
    }

    /// Containers whose main process runs.
    fn running(&self) -> Vec<String> {
        self.procs
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, p)| p.borrow().is_none())
            .map(|(id, _)| id.clone())
            .collect()
    }
}

#[tonic::async_trait]
impl RunningVm for FakeVm {
    fn id(&self) -> &str {
        self.id.get().map(String::as_str).unwrap_or_default()
    }
    fn vmm_pid(&self) -> i32 {
        0
    }
    fn accel(&self) -> ResolvedAccel {
        ResolvedAccel::Tcg
    }
    fn boot_timing(&self) -> Option<BootTiming> {
        None
    }
    fn exit_watch(&self) -> watch::Receiver<Option<VmExit>> {
        self.exit.subscribe()
    }
    fn share_exporter(&self) -> Option<BorrowedFd<'_>> {
        None
    }
    fn pod_vm(&self) -> Option<&PodVm> {
        None
    }

    async fn stop(&self) -> vessel_sandbox::Result<()> {
        self.call(VM_STOP, "").await?;
        // The VM takes every process with it.
        for p in self.procs.lock().unwrap().values() {
            p.send_if_modified(|c| c.is_none() && c.replace(137).is_none());
        }
        self.exit.send_replace(Some(VmExit::Requested));
        Ok(())
    }
    async fn create_container(&self, c: NewContainer) -> vessel_sandbox::Result<()> {
        self.call("create", &c.id).await
    }
    async fn start_container(&self, id: &str) -> vessel_sandbox::Result<()> {
        self.call("start", id).await?;
        self.procs
            .lock()
            .unwrap()
            .insert(id.to_owned(), watch::Sender::new(None));
        Ok(())
    }
    async fn remove_container(&self, id: &str) -> vessel_sandbox::Result<()> {
        self.call("remove", id).await?;
        self.end(id, 137);
        self.procs.lock().unwrap().remove(id);
        Ok(())
    }
    async fn signal_container(
        &self,
        id: &str,
        signal: i32,
        _all: bool,
    ) -> vessel_sandbox::Result<()> {
        self.call("signal", &format!("{id} {signal}")).await?;
        self.end(id, 128 + signal);
        Ok(())
    }
    async fn update_resources(&self, id: &str, _json: Vec<u8>) -> vessel_sandbox::Result<()> {
        self.call("update", id).await
    }
    async fn exec(
        &self,
        id: &str,
        _exec_id: &str,
        _process_json: Vec<u8>,
        _stdin: bool,
    ) -> vessel_sandbox::Result<()> {
        self.call("exec", id).await
    }
    async fn output(
        &self,
        _id: &str,
        _exec_id: &str,
        _which: OutputStream,
    ) -> vessel_sandbox::Result<Output> {
        Ok(Box::pin(futures_util::stream::empty()))
    }
    async fn exec_sync(
        &self,
        _id: &str,
        _exec_id: &str,
        _process_json: Vec<u8>,
        _output_limit: usize,
    ) -> vessel_sandbox::Result<pb::ExecSyncResponse> {
        // As an agent from before the call: the engine runs the exec in parts.
        Err(vessel_sandbox::Error::Agent(tonic::Status::unimplemented(
            "ExecSync",
        )))
    }
    async fn wait(
        &self,
        id: &str,
        exec_id: &str,
    ) -> vessel_sandbox::Result<pb::WaitProcessResponse> {
        let proc = match exec_id.is_empty() {
            true => self
                .procs
                .lock()
                .unwrap()
                .get(id)
                .map(watch::Sender::subscribe),
            false => None,
        };
        let Some(mut proc) = proc else {
            return Err(vessel_sandbox::Error::Agent(tonic::Status::not_found(
                format!("no process {id}/{exec_id}"),
            )));
        };
        let code = proc.wait_for(Option::is_some).await.map(|c| *c);
        match code {
            Ok(code) => Ok(pb::WaitProcessResponse {
                exit_code: code.unwrap_or_default(),
                ..Default::default()
            }),
            Err(_) => Err(vessel_sandbox::Error::Agent(tonic::Status::unavailable(
                "the process was removed",
            ))),
        }
    }
    async fn kill_exec(&self, id: &str, _exec_id: &str) -> vessel_sandbox::Result<()> {
        self.call("kill exec", id).await
    }
    async fn configure_network(
        &self,
        _req: pb::ConfigureNetworkRequest,
    ) -> vessel_sandbox::Result<()> {
        self.call(GUEST_NETWORK, "").await
    }
}

struct FakeSteps {
    calls: CallLog,
    /// The step that fails (NETWORK, SHARE, SCRATCH).
    fail_at: Option<&'static str>,
    /// How the VM start fails; None: it boots `vm`.
    vm_failure: Option<VmFailure>,
    /// Whether the pod gets a network (a plan for the guest to configure).
    network: bool,
    /// When set, the VM start waits at it.
    gate: Option<Gate>,
    /// The VM a successful start returns.
    vm: Arc<FakeVm>,
}

impl FakeSteps {
    /// Steps whose VM never comes up.
    fn new(fail_at: Option<&'static str>) -> Self {
        let calls = CallLog::default();
        FakeSteps {
            vm: Arc::new(FakeVm::new(calls.clone())),
            calls,
            fail_at,
            vm_failure: Some(VmFailure::Boot),
            network: false,
            gate: None,
        }
    }

    /// Steps whose VM boots.
    fn booting() -> Self {
        FakeSteps {
            vm_failure: None,
            ..Self::new(None)
        }
    }

    fn gated() -> Self {
        FakeSteps {
            gate: Some(Gate::default()),
            ..Self::new(None)
        }
    }

    fn vm_gate(&self) -> &Gate {
        self.gate.as_ref().expect("a gated VM start")
    }

    fn step(&self, name: &'static str) -> Result<(), RuntimeError> {
        log(&self.calls, name.to_owned());
        if self.fail_at == Some(name) {
            return Err(RuntimeError::internal(format!("fake {name} failure")));
        }
        Ok(())
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

#[tonic::async_trait]
impl PodSteps for FakeSteps {
    async fn setup_network(
        &self,
        _id: &str,
        _config: &cri::PodSandboxConfig,
    ) -> Result<Option<PodNet>, RuntimeError> {
        self.step(NETWORK)?;
        if !self.network {
            return Ok(None);
        }
        let plan = vessel_network::GuestNetworkPlan {
            interfaces: vec![vessel_network::GuestInterface {
                name: "eth0".into(),
                mac: "02:00:00:00:00:01".into(),
                mtu: 1500,
                addresses: vec!["10.88.0.2/16".parse().unwrap()],
            }],
            ..Default::default()
        };
        Ok(Some(PodNet {
            netns: PathBuf::from("/nonexistent/netns"),
            plan,
            // Any descriptor stands in for the tap: the fake VM never uses it.
            nic: NetConfig {
                tap: Arc::new(tempfile::tempfile().unwrap().into()),
                mac: "02:00:00:00:00:01".into(),
            },
        }))
    }

    async fn prepare_network(&self, _id: &str) -> Result<Option<PreparedNet>, RuntimeError> {
        self.step(NETWORK)?;
        if !self.network {
            return Ok(None);
        }
        Ok(Some(PreparedNet {
            netns: PathBuf::from("/nonexistent/netns"),
            nic: NetConfig {
                tap: Arc::new(tempfile::tempfile().unwrap().into()),
                mac: "02:00:00:00:00:02".into(),
            },
        }))
    }

    async fn attach_network(
        &self,
        _id: &str,
        _config: &cri::PodSandboxConfig,
    ) -> Result<vessel_network::GuestNetworkPlan, RuntimeError> {
        self.step(ATTACH_NETWORK)?;
        Ok(vessel_network::GuestNetworkPlan {
            interfaces: vec![vessel_network::GuestInterface {
                name: "eth0".into(),
                mac: "0a:58:0a:58:00:02".into(),
                mtu: 1500,
                addresses: vec!["10.88.0.2/16".parse().unwrap()],
            }],
            ..Default::default()
        })
    }

    async fn teardown_network(&self, _id: &str) -> Result<(), RuntimeError> {
        self.step(UNDO_NETWORK)
    }

    async fn write_pod_files(
        &self,
        _share: ShareDir,
        _files: BTreeMap<&'static str, String>,
    ) -> Result<(), RuntimeError> {
        self.step(POD_FILES)
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

    async fn start_vm(&self, config: VmConfig) -> Result<Arc<dyn RunningVm>, RuntimeError> {
        self.step(VM)?;
        if let Some(gate) = &self.gate {
            gate.pass().await;
        }
        let e = match self.vm_failure {
            None => {
                let _ = self.vm.id.set(config.id.clone());
                return Ok(self.vm.clone());
            }
            Some(VmFailure::Boot) => vessel_sandbox::Error::HelperDied {
                program: "qemu".into(),
                log_tail: "fake".into(),
            },
            Some(VmFailure::AgentWait) => vessel_sandbox::Error::AgentNotReady {
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
    db: Arc<vessel_storage::db::Db>,
}

async fn fixture(steps: FakeSteps) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let config = Arc::new(Config {
        root: dir.path().join("root"),
        run_root: dir.path().join("run"),
        ..Default::default()
    });
    let db = vessel_storage::db::Db::open(dir.path().join("state.redb")).unwrap();
    let images = vessel_image::ImageStore::open(
        vessel_image::ImageStoreConfig {
            root: config.root.clone(),
            certs_dir: dir.path().join("certs"),
            max_concurrent_downloads: 1,
            download_limits: vessel_image::DownloadLimits {
                min_rate: 0,
                window: Duration::from_secs(10),
            },
            limits: vessel_image::ImageLimits::default(),
        },
        db.clone(),
    )
    .unwrap();
    let store = crate::store::StateStore::open(db.clone()).unwrap();
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
        db,
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
            vm_failure: Some(vm_failure),
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
    f.steps.vm_gate().entered.notified().await;
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
    f.steps.vm_gate().release.notify_one();
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
    f.steps.vm_gate().entered.notified().await;
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
    f.steps.vm_gate().release.notify_one();
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
            _ = f.steps.vm_gate().entered.notified() => {}
        }
        // tonic drops the handler's future when the client goes: so does this.
    }
    f.steps.vm_gate().release.notify_one();
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
    // An empty command, or an empty program name, is the caller's mistake.
    for cmd in [vec![], vec![String::new(), "x".into()]] {
        let e = f
            .engine
            .exec_sync(cri::ExecSyncRequest {
                container_id: "nope".into(),
                cmd,
                timeout: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(code(e), tonic::Code::InvalidArgument);
    }
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

/// An image with no layers (CreateContainer then mounts nothing), recorded the way
/// a pull records it (the image crate's tables, image/src/meta.rs): the unit tests
/// have no registry to pull from.
const IMAGE: &str = "docker.io/library/fake:latest";

fn add_image(f: &Fixture) {
    let records: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("image_records");
    let configs: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("image_configs");
    let id = format!("sha256:{}", "0".repeat(64));
    let record = serde_json::json!({
        "id": id, "repo_tags": [IMAGE], "repo_digests": [], "size": 0, "user": "",
        "chain_ids": [], "blobs": [], "pinned": false,
    });
    let config = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]},"config":{"Cmd":["sleep","inf"]}}"#;
    let w = f.db.get().unwrap().begin_write().unwrap();
    {
        let raw = serde_json::to_vec(&record).unwrap();
        w.open_table(records)
            .unwrap()
            .insert(id.as_str(), raw.as_slice())
            .unwrap();
        w.open_table(configs)
            .unwrap()
            .insert(id.as_str(), config.as_slice())
            .unwrap();
    }
    w.commit().unwrap();
    assert!(
        f.images.resolve(IMAGE).unwrap().is_some(),
        "the image resolves"
    );
}

/// A READY pod (its fake VM booted) with the image present.
async fn ready_pod(f: &Fixture) -> String {
    let id = f.engine.run_pod(run_request("web")).await.unwrap();
    add_image(f);
    id
}

fn create_request(pod: &str, name: &str) -> cri::CreateContainerRequest {
    cri::CreateContainerRequest {
        pod_sandbox_id: pod.into(),
        config: Some(cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: IMAGE.into(),
                ..Default::default()
            }),
            command: vec!["sleep".into(), "inf".into()],
            ..Default::default()
        }),
        sandbox_config: None,
    }
}

/// The calls after the first `n`.
fn calls_after(f: &Fixture, n: usize) -> Vec<String> {
    f.steps.calls()[n..].to_vec()
}

fn code(e: RuntimeError) -> tonic::Code {
    tonic::Status::from(e).code()
}

#[tokio::test]
async fn a_failure_after_the_vm_booted_stops_it_and_undoes_every_step() {
    // The agent fails to configure the guest's network.
    let f = fixture(FakeSteps {
        network: true,
        ..FakeSteps::booting()
    })
    .await;
    f.steps.vm.fail(GUEST_NETWORK);
    let err = f.engine.run_pod(run_request("web")).await.unwrap_err();
    assert_eq!(
        f.steps.calls(),
        [
            NETWORK,
            SHARE,
            SCRATCH,
            VM,
            GUEST_NETWORK,
            VM_STOP,
            UNDO_NETWORK,
            UNDO_SHARE,
            UNDO_SCRATCH
        ],
        "{err}"
    );
    assert_gone(&f);

    // The store refuses to mark the pod READY (its record went away under it).
    let f = fixture(FakeSteps {
        gate: Some(Gate::default()),
        ..FakeSteps::booting()
    })
    .await;
    let run = tokio::spawn({
        let e = f.engine.clone();
        async move { e.run_pod(run_request("web")).await }
    });
    f.steps.vm_gate().entered.notified().await;
    f.engine.store().remove_pod(&only_pod(&f)).unwrap();
    f.steps.vm_gate().release.notify_one();
    let err = run.await.unwrap().unwrap_err();
    assert_eq!(code(err), tonic::Code::NotFound);
    assert_eq!(
        f.steps.calls(),
        [
            NETWORK,
            SHARE,
            SCRATCH,
            VM,
            VM_STOP,
            UNDO_NETWORK,
            UNDO_SHARE,
            UNDO_SCRATCH
        ]
    );
    assert_gone(&f);
}

#[tokio::test]
async fn stop_pod_during_a_create_ends_the_new_container() {
    let f = fixture(FakeSteps::booting()).await;
    let pod = ready_pod(&f).await;
    let booted = f.steps.calls().len();
    let gate = f.steps.vm.gate("create");
    let create = tokio::spawn({
        let (e, pod) = (f.engine.clone(), pod.clone());
        async move { e.create_container(create_request(&pod, "c")).await }
    });
    gate.entered.notified().await;
    let stop = tokio::spawn({
        let (e, pod) = (f.engine.clone(), pod.clone());
        async move { e.stop_pod(&pod).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!stop.is_finished(), "the stop ran under a create");
    gate.release.notify_one();
    let id = create.await.unwrap().unwrap();
    stop.await.unwrap().unwrap();
    // Created, then ended with its pod; never started.
    let c = f.engine.store().container(&id).unwrap();
    assert_eq!(c.state, ContainerState::Exited);
    assert_eq!(
        calls_after(&f, booted),
        [&format!("create {id}"), VM_STOP, UNDO_SCRATCH, UNDO_NETWORK]
    );
    assert!(f.steps.vm.running().is_empty());
    assert!(f.engine.live_pod(&pod).is_none());
    f.engine.remove_pod(&pod).await.unwrap();
    assert!(f.engine.store().containers().is_empty());
    assert_gone(&f);
}

#[tokio::test]
async fn create_during_a_stop_pod_fails_and_leaves_no_record() {
    let f = fixture(FakeSteps::booting()).await;
    let pod = ready_pod(&f).await;
    let booted = f.steps.calls().len();
    let gate = f.steps.vm.gate(VM_STOP);
    let stop = tokio::spawn({
        let (e, pod) = (f.engine.clone(), pod.clone());
        async move { e.stop_pod(&pod).await }
    });
    gate.entered.notified().await;
    let create = tokio::spawn({
        let (e, pod) = (f.engine.clone(), pod.clone());
        async move { e.create_container(create_request(&pod, "c")).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!create.is_finished(), "the create ran under a stop");
    gate.release.notify_one();
    stop.await.unwrap().unwrap();
    let err = create.await.unwrap().unwrap_err();
    assert_eq!(code(err), tonic::Code::FailedPrecondition);
    assert!(f.engine.store().containers().is_empty());
    // The VM never saw the container.
    assert_eq!(
        calls_after(&f, booted),
        [VM_STOP, UNDO_SCRATCH, UNDO_NETWORK]
    );
    f.engine.remove_pod(&pod).await.unwrap();
    assert_gone(&f);
}

/// A READY pod with one created container "c", and the number of fake calls so far.
async fn pod_with_a_container() -> (Fixture, String, String, usize) {
    let f = fixture(FakeSteps::booting()).await;
    let pod = ready_pod(&f).await;
    let id = f
        .engine
        .create_container(create_request(&pod, "c"))
        .await
        .unwrap();
    let created = f.steps.calls().len();
    (f, pod, id, created)
}

/// StartContainer of `id` in its own task, as a second client would call it.
fn spawn_start(f: &Fixture, id: &str) -> tokio::task::JoinHandle<Result<(), RuntimeError>> {
    let (e, id) = (f.engine.clone(), id.to_owned());
    tokio::spawn(async move { e.start_container(&id).await })
}

/// RemoveContainer of `id` in its own task.
fn spawn_remove(f: &Fixture, id: &str) -> tokio::task::JoinHandle<Result<(), RuntimeError>> {
    let (e, id) = (f.engine.clone(), id.to_owned());
    tokio::spawn(async move { e.remove_container(&id).await })
}

#[tokio::test]
async fn remove_during_a_start_stops_the_started_container_then_removes_it() {
    let (f, pod, id, created) = pod_with_a_container().await;
    let gate = f.steps.vm.gate("start");
    let start = spawn_start(&f, &id);
    gate.entered.notified().await;
    let remove = spawn_remove(&f, &id);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!remove.is_finished(), "the remove ran under a start");
    gate.release.notify_one();
    start.await.unwrap().unwrap();
    remove.await.unwrap().unwrap();
    // Started, killed (its exit recorded), then removed.
    assert_eq!(
        calls_after(&f, created),
        [
            format!("start {id}"),
            format!("signal {id} {}", libc::SIGKILL),
            format!("remove {id}")
        ]
    );
    assert!(f.steps.vm.running().is_empty());
    assert!(f.engine.store().containers().is_empty());
    assert!(f.engine.live_ctr(&pod, &id).is_none());
    f.engine.remove_pod(&pod).await.unwrap();
    assert_gone(&f);
}

#[tokio::test]
async fn start_during_a_remove_finds_no_container() {
    let (f, pod, id, created) = pod_with_a_container().await;
    let gate = f.steps.vm.gate("remove");
    let remove = spawn_remove(&f, &id);
    gate.entered.notified().await;
    let start = spawn_start(&f, &id);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!start.is_finished(), "the start ran under a remove");
    gate.release.notify_one();
    remove.await.unwrap().unwrap();
    let err = start.await.unwrap().unwrap_err();
    assert_eq!(code(err), tonic::Code::NotFound);
    // No process was ever started for it.
    assert_eq!(calls_after(&f, created), [format!("remove {id}")]);
    assert!(f.steps.vm.running().is_empty());
    assert!(f.engine.store().containers().is_empty());
    f.engine.remove_pod(&pod).await.unwrap();
    assert_gone(&f);
}

/// Waits until the default handler's pool holds `n` warm VMs.
async fn wait_warm(f: &Fixture, n: usize) {
    for _ in 0..500 {
        if f.engine.pools.warm(crate::config::DEFAULT_HANDLER) == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the pool never held {n} warm VMs");
}

/// The pool entries' ids (their markers).
fn pool_markers(f: &Fixture) -> Vec<String> {
    std::fs::read_dir(f.config.run_root.join("pool"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn pods_take_warm_vms_once_each_and_the_pool_refills() {
    // Whether this host has a CNI config decides whether pods want a NIC.
    let network = crate::podnet::has_config(&Config::default().network.cni_conf_dir);
    let f = fixture(FakeSteps {
        network,
        ..FakeSteps::booting()
    })
    .await;
    f.engine.start_pools();
    wait_warm(&f, 1).await;
    let warm = pool_markers(&f);
    assert_eq!(warm.len(), 1);

    // The pod takes the warm VM's id; its record says it was pooled.
    let id = f.engine.run_pod(run_request("web")).await.unwrap();
    assert_eq!(id, warm[0]);
    let pod = f.engine.store().pod(&id).unwrap();
    assert!(pod.vm.unwrap().startup.pooled);
    assert!(f.steps.calls().contains(&POD_FILES.to_owned()));
    assert_eq!(
        network,
        f.steps.calls().contains(&ATTACH_NETWORK.to_owned())
    );

    // Refilled under a new id.
    wait_warm(&f, 1).await;
    let next = pool_markers(&f);
    assert_eq!(next.len(), 1);
    assert_ne!(next[0], id);

    // A pod bigger than the pool's VMs boots its own; the warm one stays.
    let mut big = run_request("big");
    if let Some(c) = big.config.as_mut() {
        c.linux = Some(cri::LinuxPodSandboxConfig {
            resources: Some(cri::LinuxContainerResources {
                memory_limit_in_bytes: 64 << 20,
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    let big_id = f.engine.run_pod(big).await.unwrap();
    assert!(
        !f.engine
            .store()
            .pod(&big_id)
            .unwrap()
            .vm
            .unwrap()
            .startup
            .pooled
    );
    assert_eq!(pool_markers(&f), next);

    // Concurrent starts: each gets its own VM, pooled or not.
    let starts: Vec<_> = (0..4)
        .map(|i| {
            let engine = f.engine.clone();
            tokio::spawn(async move { engine.run_pod(run_request(&format!("p{i}"))).await })
        })
        .collect();
    let mut ids = HashSet::new();
    for s in starts {
        assert!(
            ids.insert(s.await.unwrap().unwrap()),
            "an id handed out twice"
        );
    }
    assert_eq!(f.engine.store().pods().len(), 6);

    // Shutdown destroys the pool, markers included.
    f.engine.stop_pools().await;
    assert_eq!(f.engine.pools.warm(crate::config::DEFAULT_HANDLER), 0);
    assert!(pool_markers(&f).is_empty(), "{:?}", pool_markers(&f));
}

//! A private vesseld for one test: its own config, socket, root and run_root in a
//! temp dir. Killed and cleaned up on drop.

use std::fs::File;
use std::os::fd::AsRawFd as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::cri::CriClient;

/// How long a start may take before the test gives up (a debug build opening redb
/// and running gc on a small root takes well under a second).
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The vesseld binary to test: `$VESSELD_BIN`; else `vesseld` in the target dir this
/// binary was built in; else `$CARGO_TARGET_DIR/debug`; else
/// `<workspace>/target/debug`. `cargo test` does not build another package's
/// binaries: run `cargo build -p vessel-cri` first.
pub fn vesseld_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("VESSELD_BIN") {
        return p.into();
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        // <target>/debug/<binary> or <target>/debug/deps/<test-binary>
        if let Some(dir) = exe.parent() {
            candidates.push(dir.join("vesseld"));
            if let Some(profile_dir) = dir.parent() {
                candidates.push(profile_dir.join("vesseld"));
            }
        }
    }
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        candidates.push(PathBuf::from(dir).join("debug/vesseld"));
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    candidates.push(workspace.join("target/debug/vesseld"));
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| candidates.last().cloned().unwrap_or_default())
}

/// A running vesseld with a private config.
pub struct TestDaemon {
    dir: tempfile::TempDir,
    child: Option<Child>,
    config: PathBuf,
    socket: PathBuf,
    root: PathBuf,
    run_root: PathBuf,
    certs_dir: PathBuf,
    cni_conf_dir: PathBuf,
    /// Network namespace file vesseld is started in (None: the test's own).
    netns: Option<PathBuf>,
    log: PathBuf,
}

impl TestDaemon {
    /// Starts vesseld with the default private config.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with("")
    }

    /// Starts vesseld; `extra_toml` is appended to the generated config (it must not
    /// repeat the generated keys: listen, root, run_root, log_level, [image] certs_dir).
    pub fn start_with(extra_toml: &str) -> anyhow::Result<Self> {
        let mut d = Self::prepare(extra_toml)?;
        d.spawn()?;
        Ok(d)
    }

    /// Writes the config without starting vesseld (for tests that add drop-ins first
    /// or run `vesseld` themselves); call [`TestDaemon::restart`] to start it.
    pub fn prepare(extra_toml: &str) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("vessel-test-").tempdir()?;
        let p = dir.path();
        let config = p.join("etc/vessel.toml");
        let socket = p.join("run/vessel.sock");
        let root = p.join("root");
        let run_root = p.join("run");
        let certs_dir = p.join("etc/certs.d");
        std::fs::create_dir_all(&certs_dir)?;
        // Always private (empty = no pod networking), so a machine-wide
        // /etc/cni/net.d never leaks into a test.
        let cni_conf_dir = p.join("etc/cni/net.d");
        std::fs::create_dir_all(&cni_conf_dir)?;
        let text = format!(
            "listen = {socket:?}\nroot = {root:?}\nrun_root = {run_root:?}\nlog_level = \"debug,h2=info,hyper=info,hyper_util=info,tower=info,rustls=info\"\n\
             {extra_toml}\n",
            socket = socket.display().to_string(),
            root = root.display().to_string(),
            run_root = run_root.display().to_string(),
        );
        // certs_dir goes in a drop-in so that `extra_toml` may still open an [image] table.
        std::fs::write(&config, text)?;
        let dropins = p.join("etc/vessel.d");
        std::fs::create_dir_all(&dropins)?;
        std::fs::write(
            dropins.join("00-test-certs.toml"),
            format!(
                "[image]\ncerts_dir = {:?}\n",
                certs_dir.display().to_string()
            ),
        )?;
        // Unless the test sets it itself (a drop-in would override the main file).
        if !extra_toml.contains("cni_conf_dir") {
            std::fs::write(
                dropins.join("00-test-network.toml"),
                format!(
                    "[network]\ncni_conf_dir = {:?}\n",
                    cni_conf_dir.display().to_string()
                ),
            )?;
        }
        // The warm pool boots VMs of its own: off unless the test turns it on, so
        // leak checks and timings see only the test's pods.
        if !extra_toml.contains("pool_size") {
            std::fs::write(
                dropins.join("00-test-pool.toml"),
                "[runtimes.default]\npool_size = 0\n",
            )?;
        }
        Ok(TestDaemon {
            log: p.join("vesseld.log"),
            dir,
            child: None,
            config,
            socket,
            root,
            run_root,
            certs_dir,
            cni_conf_dir,
            netns: None,
        })
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
    pub fn config_path(&self) -> &Path {
        &self.config
    }
    /// `<config dir>/vessel.d`.
    pub fn dropin_dir(&self) -> PathBuf {
        self.dir.path().join("etc/vessel.d")
    }
    pub fn socket(&self) -> &Path {
        &self.socket
    }
    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn run_root(&self) -> &Path {
        &self.run_root
    }
    pub fn certs_dir(&self) -> &Path {
        &self.certs_dir
    }
    /// The daemon's private CNI config dir (empty unless a test puts a config in it
    /// before starting vesseld; see [`TestDaemon::prepare`]).
    pub fn cni_conf_dir(&self) -> &Path {
        &self.cni_conf_dir
    }
    /// Runs vesseld (from the next start on) in the network namespace pinned at
    /// `netns` (e.g. `/run/netns/<name>`), so CNI bridges land there.
    pub fn set_netns(&mut self, netns: impl Into<PathBuf>) {
        self.netns = Some(netns.into());
    }
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Everything vesseld wrote to stdout/stderr (all starts of this daemon).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A `vesseld --config <this config>` command (not started).
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(vesseld_bin());
        cmd.arg("--config").arg(&self.config);
        cmd
    }

    pub async fn client(&self) -> anyhow::Result<CriClient> {
        CriClient::connect(&self.socket).await
    }

    /// Mirrors `host` (e.g. "docker.io") to `server_url` (e.g. "http://127.0.0.1:5000")
    /// through `<certs_dir>/<host>/hosts.toml`.
    pub fn write_hosts_toml(&self, host: &str, server_url: &str) -> anyhow::Result<()> {
        let dir = self.certs_dir.join(host);
        std::fs::create_dir_all(&dir)?;
        let text = format!(
            "server = {server_url:?}\n\n[host.{server_url:?}]\ncapabilities = [\"pull\", \"resolve\"]\n"
        );
        std::fs::write(dir.join("hosts.toml"), text)?;
        Ok(())
    }

    /// Kills vesseld with SIGKILL (no cleanup on its side) and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops vesseld with SIGTERM, waiting up to 10 s (then SIGKILL). Returns whether
    /// it exited on its own with status 0.
    pub fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        let Ok(pid) = i32::try_from(child.id()) else {
            let _ = child.kill();
            let _ = child.wait();
            return false;
        };
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    /// Starts vesseld again (stopping it first if it runs) and waits for its socket.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.spawn()
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = File::options().create(true).append(true).open(&self.log)?;
        let mut cmd = self.command();
        if let Some(ns) = &self.netns {
            let ns = File::open(ns).with_context(|| format!("open {}", ns.display()))?;
            // SAFETY: between fork and exec only setns(2), an async-signal-safe
            // syscall, runs; `ns` is kept open by the closure until then.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot run {}", vesseld_bin().display()))?;
        self.child = Some(child);
        self.wait_ready()
    }

    /// Waits until the socket accepts connections; a stale socket file left by a
    /// killed instance exists but refuses them.
    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.child = None;
                    bail!(
                        "vesseld exited during start-up ({status}); log:\n{}",
                        self.log()
                    );
                }
            }
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.kill9();
                bail!(
                    "vesseld did not serve {} within {START_TIMEOUT:?}; log:\n{}",
                    self.socket.display(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!(
                "--- vesseld log ({}) ---\n{}",
                self.log.display(),
                self.log()
            );
        }
    }
}

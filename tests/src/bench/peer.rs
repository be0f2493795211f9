//! The peer: containerd's `ctr images pull` of the same image, for the pull row's
//! ratio. Each pull gets a fresh containerd (own root, state and socket under the
//! run's work dir), so it is as cold as vesseld's. The CRI peer of rows 2-4
//! (containerd + runc) is `peer_cri`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

const CONTAINERD: &str = "containerd";
const CTR: &str = "ctr";
const START_LIMIT: Duration = Duration::from_secs(20);

/// Whether Debian's containerd (with `ctr`) is installed.
pub fn available() -> bool {
    which(CONTAINERD) && which(CTR)
}

fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
}

/// Whether runc is installed too (the CRI peer of rows 2-4 runs containers).
pub fn runc_available() -> bool {
    which("runc")
}

/// Installs Debian's containerd and runc packages (what `--peer` asks for).
pub fn install() -> anyhow::Result<()> {
    let ok = Command::new("apt-get")
        .args([
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "containerd",
            "runc",
        ])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("apt-get")?
        .success();
    if !ok || !available() || !runc_available() {
        bail!("could not install containerd and runc (apt-get install containerd runc)");
    }
    Ok(())
}

/// A private containerd; killed on drop.
pub struct Containerd {
    child: Child,
    socket: PathBuf,
}

impl Containerd {
    /// Starts containerd with everything under `dir` (the CRI plugin off: only the
    /// content store, the snapshotter and the image service are used).
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let socket = dir.join("containerd.sock");
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = {root:?}\nstate = {state:?}\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\naddress = {sock:?}\n[ttrpc]\naddress = {ttrpc:?}\n\
                 [plugins.\"io.containerd.internal.v1.opt\"]\npath = {opt:?}\n",
                root = dir.join("root").display().to_string(),
                state = dir.join("state").display().to_string(),
                sock = socket.display().to_string(),
                ttrpc = dir.join("containerd.sock.ttrpc").display().to_string(),
                opt = dir.join("opt").display().to_string(),
            ),
        )?;
        let log = std::fs::File::create(dir.join("containerd.log"))?;
        let child = Command::new(CONTAINERD)
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot run containerd")?;
        let mut me = Self { child, socket };
        let deadline = Instant::now() + START_LIMIT;
        while std::os::unix::net::UnixStream::connect(&me.socket).is_err() {
            if me.child.try_wait()?.is_some() || Instant::now() > deadline {
                let log = std::fs::read_to_string(dir.join("containerd.log")).unwrap_or_default();
                bail!("containerd did not start; log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(me)
    }

    /// `ctr images pull --plain-http` (pull and unpack into overlayfs), timed.
    pub fn pull(&mut self, reference: &str) -> anyhow::Result<Duration> {
        let t = Instant::now();
        let out = Command::new(CTR)
            .arg("--address")
            .arg(&self.socket)
            .args(["-n", "bench", "images", "pull", "--plain-http", reference])
            .output()
            .context("cannot run ctr")?;
        let elapsed = t.elapsed();
        if !out.status.success() {
            bail!(
                "ctr images pull failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(elapsed)
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

//! Accelerator choice: KVM only where it is present *and* fast; TCG otherwise.
//!
//! Nested KVM on some cloud VMs opens fine but runs guests hundreds of times slower
//! than TCG, so `auto` runs a tiny probe guest through the KVM ioctls and times it.

use std::path::Path;
use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VcpuExit};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// What the runtime was asked to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM when it is usable and fast, else TCG.
    #[default]
    Auto,
    /// Always KVM (fails to start where /dev/kvm is unusable).
    Kvm,
    /// Always TCG (software emulation).
    Tcg,
}

/// The accelerator a VM actually runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResolvedAccel {
    /// Hardware virtualization.
    Kvm,
    /// Software emulation.
    Tcg,
}

impl std::str::FromStr for Accel {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "kvm" => Ok(Self::Kvm),
            "tcg" => Ok(Self::Tcg),
            other => Err(Error::InvalidConfig(format!("unknown accel {other:?}"))),
        }
    }
}

/// Result of the KVM speed probe.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KvmProbe {
    /// Average cost of one guest exit to user space, in nanoseconds.
    pub exit_ns: u64,
    /// Time of a tight 100k-iteration guest loop, in microseconds.
    pub loop_us: u64,
}

/// Exits cost ~1-3 µs on bare-metal KVM; the slow nested setups seen cost far more.
const MAX_EXIT_NS: u64 = 50_000;
/// 100k `dec; jnz` iterations take ~0.1 ms natively; the slow nested KVM measured
/// on the dev machines needs ~150 ms (slower than TCG would be).
const MAX_LOOP_US: u64 = 10_000;
const PROBE_EXITS: u16 = 200;
const VERDICT_FILE: &str = "accel-probe.json";

/// Whether KVM is usable here, and why (what `auto` decides and caches).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KvmVerdict {
    /// Present and fast enough.
    pub kvm_usable: bool,
    /// The probe's figures, when the probe ran.
    pub probe: Option<KvmProbe>,
    /// One sentence: why KVM is (not) used.
    pub reason: String,
}

/// Resolves `accel` for this host. `cache_dir` keeps the probe verdict so that the
/// probe runs once per boot of the host (put it on a tmpfs such as /run).
pub fn resolve(accel: Accel, cache_dir: &Path) -> Result<ResolvedAccel> {
    match accel {
        Accel::Kvm => Ok(ResolvedAccel::Kvm),
        Accel::Tcg => Ok(ResolvedAccel::Tcg),
        Accel::Auto => {
            let verdict = cached_verdict(cache_dir)?;
            if verdict.kvm_usable {
                Ok(ResolvedAccel::Kvm)
            } else {
                tracing::warn!(reason = %verdict.reason, "KVM not used; pod VMs run under TCG (slow)");
                Ok(ResolvedAccel::Tcg)
            }
        }
    }
}

/// Serializes first-time probes within this process: concurrent RunPodSandbox calls
/// on a fresh host would otherwise all probe and race on the cache file.
static PROBE_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn read_verdict(cache: &Path) -> Option<KvmVerdict> {
    std::fs::read(cache)
        .ok()
        .and_then(|b| serde_json::from_slice::<KvmVerdict>(&b).ok())
}

/// The cached verdict, probing (once) when there is none.
fn cached_verdict(cache_dir: &Path) -> Result<KvmVerdict> {
    let cache = cache_dir.join(VERDICT_FILE);
    if let Some(v) = read_verdict(&cache) {
        return Ok(v);
    }
    let _guard = PROBE_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(v) = read_verdict(&cache) {
        return Ok(v);
    }
    let v = judge_kvm();
    std::fs::create_dir_all(cache_dir).map_err(|e| Error::io(cache_dir, e))?;
    // A per-process temp name keeps two daemons (or a daemon and a tool) probing at
    // once from renaming each other's file away; the rename itself is atomic.
    let tmp = cache_dir.join(format!("{VERDICT_FILE}.{}.tmp", std::process::id()));
    std::fs::write(&tmp, serde_json::to_vec_pretty(&v)?).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, &cache).map_err(|e| Error::io(&cache, e))?;
    Ok(v)
}

/// Probes KVM now (up to 5 s) and judges it as `auto` does; nothing is cached.
pub fn judge_kvm() -> KvmVerdict {
    match probe_kvm() {
        Err(e) => KvmVerdict {
            kvm_usable: false,
            probe: None,
            reason: format!("KVM probe failed: {e}"),
        },
        Ok(p) if p.exit_ns > MAX_EXIT_NS || p.loop_us > MAX_LOOP_US => KvmVerdict {
            kvm_usable: false,
            reason: format!(
                "KVM too slow (exit {} ns > {MAX_EXIT_NS} or loop {} us > {MAX_LOOP_US})",
                p.exit_ns, p.loop_us
            ),
            probe: Some(p),
        },
        Ok(p) => KvmVerdict {
            kvm_usable: true,
            probe: Some(p),
            reason: "KVM probe passed".into(),
        },
    }
}

/// Runs a real-mode guest: a 100k-iteration loop, then `PROBE_EXITS` port writes
/// (each one a VM exit to user space), then `hlt`.
pub fn probe_kvm() -> std::result::Result<KvmProbe, String> {
    #[rustfmt::skip]
    let code: Vec<u8> = {
        let mut c = vec![
            0x66, 0xB9, 0xA0, 0x86, 0x01, 0x00, // mov ecx, 100_000
            0x66, 0x49,                         // dec ecx
            0x75, 0xFC,                         // jnz -4
            0xE6, 0x80,                         // out 0x80, al   (end of loop phase)
            0xB9,                               // mov cx, PROBE_EXITS
        ];
        c.extend_from_slice(&PROBE_EXITS.to_le_bytes());
        c.extend_from_slice(&[
            0xE6, 0x81,                         // out 0x81, al
            0x49,                               // dec cx
            0x75, 0xFB,                         // jnz -5
            0xF4,                               // hlt
        ]);
        c
    };
    let e = |what: &str, err: kvm_ioctls::Error| format!("{what}: {err}");
    let kvm = Kvm::new().map_err(|err| e("open /dev/kvm", err))?;
    let vm = kvm.create_vm().map_err(|err| e("KVM_CREATE_VM", err))?;
    let mem = MmapRegion::new(0x10000).map_err(|err| format!("mmap: {err}"))?;
    mem.write(0x1000, &code);
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: mem.len as u64,
        userspace_addr: mem.addr as u64,
        flags: 0,
    };
    // SAFETY: `mem` is a valid anonymous mapping of `memory_size` bytes that outlives
    // `vm` (it is dropped after `vm` at the end of this function, in reverse order).
    unsafe { vm.set_user_memory_region(region) }.map_err(|err| e("set memory", err))?;
    let mut vcpu = vm.create_vcpu(0).map_err(|err| e("create vcpu", err))?;
    let mut sregs = vcpu.get_sregs().map_err(|err| e("get sregs", err))?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).map_err(|err| e("set sregs", err))?;
    let regs = kvm_bindings::kvm_regs {
        rip: 0x1000,
        rflags: 2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(|err| e("set regs", err))?;

    let start = Instant::now();
    let mut loop_done = None;
    let mut exits = 0u32;
    let deadline = Duration::from_secs(5);
    loop {
        if start.elapsed() > deadline {
            return Err("probe guest did not finish within 5 s".into());
        }
        match vcpu.run().map_err(|err| e("KVM_RUN", err))? {
            VcpuExit::IoOut(0x80, _) => loop_done = Some(Instant::now()),
            VcpuExit::IoOut(0x81, _) => exits += 1,
            VcpuExit::Hlt => break,
            other => return Err(format!("unexpected exit {other:?}")),
        }
    }
    let end = Instant::now();
    let loop_done = loop_done.ok_or("probe loop never finished")?;
    if exits != u32::from(PROBE_EXITS) {
        return Err(format!("expected {PROBE_EXITS} exits, saw {exits}"));
    }
    Ok(KvmProbe {
        loop_us: (loop_done - start).as_micros() as u64,
        exit_ns: ((end - loop_done).as_nanos() / u128::from(PROBE_EXITS)) as u64,
    })
}

/// An anonymous private mapping, unmapped on drop.
struct MmapRegion {
    addr: *mut u8,
    len: usize,
}

impl MmapRegion {
    fn new(len: usize) -> rustix::io::Result<Self> {
        use rustix::mm::{mmap_anonymous, MapFlags, ProtFlags};
        // SAFETY: a fresh anonymous mapping aliases no Rust object.
        let addr = unsafe {
            mmap_anonymous(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::PRIVATE | MapFlags::NORESERVE,
            )
        }?;
        Ok(Self {
            addr: addr.cast(),
            len,
        })
    }

    fn write(&self, offset: usize, bytes: &[u8]) {
        assert!(offset + bytes.len() <= self.len);
        // SAFETY: bounds checked above; the mapping is writable and exclusively ours.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.addr.add(offset), bytes.len()) }
    }
}

impl Drop for MmapRegion {
    fn drop(&mut self) {
        // SAFETY: `addr`/`len` describe the mapping made in `new`, unmapped only here.
        let _ = unsafe { rustix::mm::munmap(self.addr.cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_accel() {
        assert_eq!("auto".parse::<Accel>().unwrap(), Accel::Auto);
        assert_eq!("tcg".parse::<Accel>().unwrap(), Accel::Tcg);
        assert!("xen".parse::<Accel>().is_err());
    }

    #[test]
    fn forced_accels_skip_probe() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(resolve(Accel::Tcg, dir.path()).unwrap(), ResolvedAccel::Tcg);
        assert_eq!(resolve(Accel::Kvm, dir.path()).unwrap(), ResolvedAccel::Kvm);
        assert!(!dir.path().join(VERDICT_FILE).exists());
    }

    #[test]
    fn auto_caches_verdict() {
        let dir = tempfile::tempdir().unwrap();
        let first = resolve(Accel::Auto, dir.path()).unwrap();
        let cached: KvmVerdict =
            serde_json::from_slice(&std::fs::read(dir.path().join(VERDICT_FILE)).unwrap()).unwrap();
        eprintln!("verdict: {cached:?}");
        assert_eq!(cached.kvm_usable, first == ResolvedAccel::Kvm);
        assert_eq!(resolve(Accel::Auto, dir.path()).unwrap(), first);
    }

    #[test]
    fn concurrent_first_probes_agree() {
        let dir = tempfile::tempdir().unwrap();
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| s.spawn(|| resolve(Accel::Auto, dir.path())))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let first = results[0].as_ref().unwrap();
        for r in &results {
            assert_eq!(r.as_ref().unwrap(), first);
        }
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n != VERDICT_FILE)
            .collect();
        assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
    }
}

//! Kernel module loading: parse `modules.dep` and load every listed module after its
//! dependencies.

use std::collections::{HashMap, HashSet};
use std::path::Path;

/// One `modules.dep` line: a module path and the paths it depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleDep {
    pub path: String,
    pub deps: Vec<String>,
}

/// Parses `modules.dep` text (`path: dep dep ...` per line).
pub fn parse_modules_dep(text: &str) -> Vec<ModuleDep> {
    text.lines()
        .filter_map(|line| {
            let (path, deps) = line.split_once(':')?;
            let path = path.trim();
            if path.is_empty() {
                return None;
            }
            Some(ModuleDep {
                path: path.to_string(),
                deps: deps.split_whitespace().map(str::to_string).collect(),
            })
        })
        .collect()
}

/// Orders every module so that each comes after all of its dependencies. The order
/// among independent modules follows the file, so the result is deterministic.
/// A dependency cycle (which depmod never writes) is broken rather than looped on.
pub fn load_order(deps: &[ModuleDep]) -> Vec<String> {
    let by_path: HashMap<&str, &ModuleDep> = deps.iter().map(|d| (d.path.as_str(), d)).collect();
    let mut done: HashSet<&str> = HashSet::new();
    let mut visiting: HashSet<&str> = HashSet::new();
    let mut order = Vec::new();

    fn visit<'a>(
        path: &'a str,
        by_path: &HashMap<&'a str, &'a ModuleDep>,
        done: &mut HashSet<&'a str>,
        visiting: &mut HashSet<&'a str>,
        order: &mut Vec<String>,
    ) {
        if done.contains(path) || !visiting.insert(path) {
            return;
        }
        if let Some(m) = by_path.get(path) {
            for d in &m.deps {
                visit(d, by_path, done, visiting, order);
            }
        }
        visiting.remove(path);
        done.insert(path);
        order.push(path.to_string());
    }

    for d in deps {
        visit(&d.path, &by_path, &mut done, &mut visiting, &mut order);
    }
    order
}

/// Loads every module in `<dir>/modules.dep`, dependencies first. A module that is
/// already loaded (EEXIST) is fine; other failures are logged and skipped so one bad
/// module does not keep the agent from serving.
pub fn load_all(dir: &Path) -> std::io::Result<usize> {
    let text = std::fs::read_to_string(dir.join("modules.dep"))?;
    let mut loaded = 0;
    for rel in load_order(&parse_modules_dep(&text)) {
        let path = dir.join(&rel);
        match load_one(&path) {
            Ok(()) => loaded += 1,
            Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => crate::log::warn(&format!("module {}: {e}", path.display())),
        }
    }
    Ok(loaded)
}

fn load_one(path: &Path) -> nix::Result<()> {
    let file = std::fs::File::open(path)
        .map_err(|e| nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
    nix::kmod::finit_module(&file, c"", nix::kmod::ModuleInitFlags::empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/fs/overlayfs/overlay.ko:
";

    #[test]
    fn parses_lines() {
        let d = parse_modules_dep(DEP);
        assert_eq!(d.len(), 6);
        assert_eq!(d[0].path, "kernel/drivers/net/virtio_net.ko");
        assert_eq!(d[0].deps.len(), 4);
        assert!(d[1].deps.is_empty());
    }

    #[test]
    fn dependencies_come_first() {
        let order = load_order(&parse_modules_dep(DEP));
        assert_eq!(order.len(), 6);
        let pos = |m: &str| order.iter().position(|p| p.ends_with(m)).unwrap();
        assert!(pos("/failover.ko") < pos("/net_failover.ko"));
        assert!(pos("/net_failover.ko") < pos("/virtio_net.ko"));
        assert!(pos("/virtio.ko") < pos("/virtio_net.ko"));
        assert!(pos("/virtio_ring.ko") < pos("/virtio_net.ko"));
        // Independent modules keep file order.
        assert_eq!(order.last().unwrap(), "kernel/fs/overlayfs/overlay.ko");
    }

    #[test]
    fn cycle_terminates() {
        let d = parse_modules_dep("a.ko: b.ko\nb.ko: a.ko\n");
        let order = load_order(&d);
        assert_eq!(order.len(), 2);
    }

    #[test]
    fn unknown_dependency_is_still_listed() {
        let order = load_order(&parse_modules_dep("a.ko: x.ko\n"));
        assert_eq!(order, vec!["x.ko".to_string(), "a.ko".to_string()]);
    }
}

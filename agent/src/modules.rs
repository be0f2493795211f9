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

/// Modules shipped to be loaded on demand (by the kernel's `request_module`, through
/// [`modprobe_main`]) rather than at boot: one `modules.dep` path per line.
pub const ON_DEMAND: &str = "modules.ondemand";

/// Loads every module in `<dir>/modules.dep` except the on-demand ones, dependencies
/// first. A module that is already loaded (EEXIST) is fine; other failures are
/// logged and skipped so one bad module does not keep the agent from serving.
pub fn load_all(dir: &Path) -> std::io::Result<usize> {
    let text = std::fs::read_to_string(dir.join("modules.dep"))?;
    let on_demand = std::fs::read_to_string(dir.join(ON_DEMAND)).unwrap_or_default();
    let on_demand: HashSet<&str> = on_demand.lines().map(str::trim).collect();
    let deps: Vec<ModuleDep> = parse_modules_dep(&text)
        .into_iter()
        .filter(|d| !on_demand.contains(d.path.as_str()))
        .collect();
    let mut loaded = 0;
    for rel in load_order(&deps) {
        let path = dir.join(&rel);
        match load_one(&path) {
            Ok(()) => loaded += 1,
            Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => crate::log::warn(&format!("module {}: {e}", path.display())),
        }
    }
    Ok(loaded)
}

/// A module's name from its path ("kernel/net/bridge/bridge.ko" → "bridge"), with
/// '-' as '_' as the kernel names modules.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.split(".ko").next().unwrap_or(file).replace('-', "_")
}

/// Shell-style match of `name` against an alias pattern (`*`, `?`; other
/// characters literal), as `modules.alias` patterns are written.
fn glob_match(pattern: &[u8], name: &[u8]) -> bool {
    match (pattern.first(), name.first()) {
        (None, None) => true,
        (Some(b'*'), _) => {
            glob_match(&pattern[1..], name) || (!name.is_empty() && glob_match(pattern, &name[1..]))
        }
        (Some(b'?'), Some(_)) => glob_match(&pattern[1..], &name[1..]),
        (Some(p), Some(n)) if p == n => glob_match(&pattern[1..], &name[1..]),
        _ => false,
    }
}

/// The `modules.dep` paths `wanted` (a module name or an alias) resolves to.
fn resolve<'a>(deps: &'a [ModuleDep], aliases: &str, wanted: &str) -> Vec<&'a str> {
    let by_name = |name: &str| {
        let name = name.replace('-', "_");
        deps.iter()
            .find(|d| module_name(&d.path) == name)
            .map(|d| d.path.as_str())
    };
    if let Some(p) = by_name(wanted) {
        return vec![p];
    }
    let mut found = Vec::new();
    for line in aliases.lines() {
        let mut words = line.split_whitespace();
        if let (Some("alias"), Some(pattern), Some(module)) =
            (words.next(), words.next(), words.next())
        {
            if glob_match(pattern.as_bytes(), wanted.as_bytes()) {
                if let Some(p) = by_name(module) {
                    if !found.contains(&p) {
                        found.push(p);
                    }
                }
            }
        }
    }
    found
}

/// `modprobe [-q] [--] NAME` as the kernel runs it for `request_module` (e.g. when a
/// privileged container creates a bridge or an iptables rule): loads NAME, a module
/// or an alias, after its dependencies, from the guest's own module tree only.
pub fn modprobe_main(args: &[String]) -> i32 {
    let names: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let Some(dir) = std::fs::read_dir("/lib/modules")
        .ok()
        .and_then(|mut d| d.find_map(|e| e.ok().map(|e| e.path())))
    else {
        return 1;
    };
    let Ok(text) = std::fs::read_to_string(dir.join("modules.dep")) else {
        return 1;
    };
    let aliases = std::fs::read_to_string(dir.join("modules.alias")).unwrap_or_default();
    let deps = parse_modules_dep(&text);
    let mut status = 0;
    for name in names {
        let roots = resolve(&deps, &aliases, name);
        if roots.is_empty() {
            status = 1;
            continue;
        }
        let wanted: Vec<ModuleDep> = roots
            .iter()
            .filter_map(|r| deps.iter().find(|d| d.path == *r).cloned())
            .collect();
        let by_path: HashMap<&str, &ModuleDep> =
            deps.iter().map(|d| (d.path.as_str(), d)).collect();
        // Dependencies of the wanted modules, with their full dep lists.
        let mut closure: Vec<ModuleDep> = Vec::new();
        for w in &wanted {
            for p in std::iter::once(&w.path).chain(&w.deps) {
                if let Some(d) = by_path.get(p.as_str()) {
                    if !closure.iter().any(|c| c.path == d.path) {
                        closure.push((*d).clone());
                    }
                }
            }
        }
        for rel in load_order(&closure) {
            match load_one(&dir.join(&rel)) {
                Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
                Err(_) => status = 1,
            }
        }
    }
    status
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
    fn names_and_aliases_resolve() {
        let deps = parse_modules_dep(
            "kernel/net/bridge/bridge.ko: kernel/net/802/stp.ko kernel/net/llc/llc.ko\n\
             kernel/net/802/stp.ko: kernel/net/llc/llc.ko\n\
             kernel/net/llc/llc.ko:\n\
             kernel/net/netfilter/xt_REDIRECT.ko:\n\
             kernel/net/netfilter/nft-chain-nat.ko:\n",
        );
        let aliases = "alias ipt_REDIRECT xt_REDIRECT\nalias nft-chain-?-nat nft_chain_nat\n";
        assert_eq!(
            resolve(&deps, aliases, "bridge"),
            ["kernel/net/bridge/bridge.ko"]
        );
        assert_eq!(
            resolve(&deps, aliases, "ipt_REDIRECT"),
            ["kernel/net/netfilter/xt_REDIRECT.ko"]
        );
        assert_eq!(
            resolve(&deps, aliases, "nft-chain-2-nat"),
            ["kernel/net/netfilter/nft-chain-nat.ko"]
        );
        assert!(resolve(&deps, aliases, "nft-chain-22-nat").is_empty());
        assert!(resolve(&deps, aliases, "/etc/passwd").is_empty());
        assert!(glob_match(b"net-pf-*", b"net-pf-16"));
        assert!(!glob_match(b"net-pf-*x", b"net-pf-16"));
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

//! The cgroup version vessel finds (v1, v2 or hybrid) and the driver it uses.

use vessel_sandbox::cgroup::{parse_mountinfo, Hierarchies, V1_CONTROLLERS};

use super::Verdict;

const ITEM: &str = "cgroups";

/// This host's cgroups, from `/proc/self/mountinfo`.
pub fn host() -> Verdict {
    match std::fs::read_to_string("/proc/self/mountinfo") {
        Ok(text) => from_mountinfo(&text, |dir| {
            std::fs::read_to_string(dir.join("cgroup.controllers")).ok()
        }),
        Err(e) => Verdict::fail(ITEM, format!("cannot read /proc/self/mountinfo: {e}")),
    }
}

/// The verdict for a mountinfo text; `controllers` reads a v2 root's
/// `cgroup.controllers`.
pub fn from_mountinfo(
    mountinfo: &str,
    controllers: impl Fn(&std::path::Path) -> Option<String>,
) -> Verdict {
    const DRIVER: &str = "driver cgroupfs (set the kubelet's cgroupDriver: cgroupfs)";
    let v1_mounted: Vec<&str> = V1_CONTROLLERS
        .iter()
        .copied()
        .filter(|c| {
            mountinfo.lines().any(|l| {
                l.split_once(" - ").is_some_and(|(_, post)| {
                    let mut f = post.split(' ');
                    f.next() == Some("cgroup")
                        && f.nth(1).is_some_and(|o| o.split(',').any(|o| o == *c))
                })
            })
        })
        .collect();
    let has_v2 = mountinfo.lines().any(|l| {
        l.split_once(" - ")
            .is_some_and(|(_, p)| p.starts_with("cgroup2 "))
    });
    match parse_mountinfo(mountinfo) {
        None => Verdict::fail(
            ITEM,
            "no cgroup hierarchy is mounted: mount cgroup2 on /sys/fs/cgroup",
        ),
        Some(Hierarchies::V1(_)) => {
            let kind = if has_v2 {
                "hybrid (v1 controllers, v2 also mounted)"
            } else {
                "v1"
            };
            let missing: Vec<&str> = V1_CONTROLLERS
                .iter()
                .copied()
                .filter(|c| !v1_mounted.contains(c))
                .collect();
            if missing.is_empty() {
                Verdict::ok(
                    ITEM,
                    format!(
                        "{kind}: pod cgroups in the {} hierarchies; {DRIVER}",
                        v1_mounted.join(",")
                    ),
                )
            } else {
                Verdict::warn(
                    ITEM,
                    format!(
                        "{kind}: controllers {} not mounted, so pod VMs are not limited or \
                         accounted by them; {DRIVER}",
                        missing.join(",")
                    ),
                )
            }
        }
        Some(Hierarchies::Unified(root)) => {
            let have = controllers(&root).unwrap_or_default();
            let missing: Vec<&str> = ["cpu", "memory", "pids"]
                .into_iter()
                .filter(|c| !have.split_whitespace().any(|h| h == *c))
                .collect();
            if missing.is_empty() {
                Verdict::ok(ITEM, format!("v2 at {}; {DRIVER}", root.display()))
            } else {
                Verdict::warn(
                    ITEM,
                    format!(
                        "v2 at {}: controllers {} not available at the root",
                        root.display(),
                        missing.join(",")
                    ),
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::Level;

    const V2: &str = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
    const V1: &str = "\
34 25 0:29 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw,nsdelegate
35 25 0:30 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
36 25 0:31 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
";

    #[test]
    fn tells_v1_hybrid_and_v2_apart() {
        let v = from_mountinfo(V2, |_| Some("cpuset cpu io memory pids".into()));
        assert_eq!(v.level, Level::Ok, "{v:?}");
        assert!(v.message.starts_with("v2 at /sys/fs/cgroup"), "{v:?}");

        let v = from_mountinfo(V2, |_| Some("cpu".into()));
        assert_eq!(v.level, Level::Warn, "{v:?}");
        assert!(v.message.contains("memory,pids"), "{v:?}");

        let v = from_mountinfo(V1, |_| None);
        assert_eq!(v.level, Level::Warn, "pids is not mounted: {v:?}");
        assert!(v.message.starts_with("hybrid"), "{v:?}");
        assert!(v.message.contains("controllers pids not mounted"), "{v:?}");

        let full = format!("{V1}37 25 0:32 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n");
        let v = from_mountinfo(&full, |_| None);
        assert_eq!(v.level, Level::Ok, "{v:?}");
        assert!(v.message.contains("cgroupfs"), "{v:?}");

        assert_eq!(from_mountinfo("", |_| None).level, Level::Fail);
    }
}

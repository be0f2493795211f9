//! `vesseld check`: the host diagnosis, against a good test config and a broken one.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Output;

use vessel_tests::daemon::TestDaemon;

/// The guest built by scripts/build-guest.sh: `$VESSEL_GUEST_DIR`, else build/guest.
fn guest_dir() -> PathBuf {
    std::env::var_os("VESSEL_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../build/guest"))
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The report line of `item`.
fn line<'a>(out: &'a str, item: &str) -> &'a str {
    out.lines()
        .find(|l| {
            l.split_once("] ")
                .is_some_and(|(_, rest)| rest.trim_start().starts_with(&format!("{item}:")))
        })
        .unwrap_or_else(|| panic!("no line for {item}:\n{out}"))
}

/// A CNI bin dir with fake plugins, and a conflist naming `types`.
fn network(d: &TestDaemon, types: &[&str]) -> PathBuf {
    let bin = d.dir().join("cni-bin");
    std::fs::create_dir_all(&bin).unwrap();
    for t in ["bridge", "host-local", "loopback"] {
        let p = bin.join(t);
        std::fs::write(&p, "#!/bin/sh\nexit 0\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let plugins: Vec<String> = types
        .iter()
        .map(|t| format!("{{\"type\":\"{t}\"}}"))
        .collect();
    std::fs::write(
        d.cni_conf_dir().join("10-test.conflist"),
        format!(
            "{{\"cniVersion\":\"1.0.0\",\"name\":\"checknet\",\"plugins\":[{}]}}",
            plugins.join(",")
        ),
    )
    .unwrap();
    bin
}

fn config(guest: &Path, cni_bin: &Path, big_kernel: &Path) -> String {
    let s = |p: &Path| format!("{:?}", p.display().to_string());
    format!(
        "[guest]\nkernel = {}\ninitrd = {}\n\n[runtimes.big]\nkernel = {}\n\n\
         [network]\ncni_bin_dirs = [{}]\n",
        s(&guest.join("vmlinux")),
        s(&guest.join("initrd.img")),
        s(big_kernel),
        s(cni_bin),
    )
}

#[test]
fn good_host_passes_and_broken_config_fails_naming_each_item() {
    let guest = guest_dir();
    assert!(
        guest.join("vmlinux").is_file(),
        "no guest in {}: run scripts/build-guest.sh (VESSEL_GUEST_DIR)",
        guest.display()
    );

    // Good: the built guest for every handler, a network whose plugins exist.
    let probe = TestDaemon::prepare("").unwrap();
    let bin = network(&probe, &["bridge", "host-local"]);
    let d = TestDaemon::prepare(&config(&guest, &bin, &guest.join("vmlinux"))).unwrap();
    std::fs::copy(
        probe.cni_conf_dir().join("10-test.conflist"),
        d.cni_conf_dir().join("10-test.conflist"),
    )
    .unwrap();
    d.write_hosts_toml("docker.io", "http://127.0.0.1:5000")
        .unwrap();
    let o = d.command().arg("check").output().unwrap();
    let out = stdout(&o);
    eprintln!("{out}");
    assert!(o.status.success(), "a good host exits 0:\n{out}");
    assert!(!out.contains("[fail]"), "{out}");
    for item in [
        "qemu",
        "virtiofsd",
        "mkfs.ext4",
        "cgroups",
        "disk",
        "cni plugin bridge",
    ] {
        assert!(line(&out, item).starts_with("[ok]"), "{item}:\n{out}");
    }
    // KVM usable (with the probe's figures) or TCG, with the reason.
    let kvm = line(&out, "kvm");
    assert!(
        kvm.contains("under KVM") || kvm.contains("under TCG"),
        "{kvm}"
    );
    let image = line(&out, "guest image (big, default)");
    assert!(
        image.starts_with("[ok]") && image.contains("kernel 6."),
        "{image}"
    );
    assert!(line(&out, "registry hosts").contains("docker.io"), "{out}");
    assert!(line(&out, "root").contains("not created yet"), "{out}");
    assert!(out.lines().last().unwrap().ends_with(" 0 fail"), "{out}");

    // Broken: handler "big" has no kernel, a hosts.toml does not parse, the network
    // names a plugin that is not installed.
    let d = TestDaemon::prepare(&config(
        &guest,
        &bin,
        Path::new("/nonexistent/vessel/vmlinux"),
    ))
    .unwrap();
    let _ = network(&d, &["bridge", "no-such-plugin"]);
    let bad = d.certs_dir().join("bad.example");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(bad.join("hosts.toml"), "server = [\n").unwrap();
    let o = d.command().arg("check").output().unwrap();
    let out = stdout(&o);
    eprintln!("{out}");
    assert_eq!(o.status.code(), Some(1), "any fail exits 1:\n{out}");
    let kernel = line(&out, "guest kernel (big)");
    assert!(
        kernel.starts_with("[fail]")
            && kernel.contains("/nonexistent/vessel/vmlinux")
            && kernel.contains("build-guest.sh"),
        "{kernel}"
    );
    assert!(
        line(&out, "guest kernel (default)").starts_with("[ok]"),
        "{out}"
    );
    let plugin = line(&out, "cni plugin no-such-plugin");
    assert!(
        plugin.starts_with("[fail]") && plugin.contains("checknet"),
        "{plugin}"
    );
    assert!(line(&out, "cni plugin bridge").starts_with("[ok]"), "{out}");
    let registry = line(&out, "registry bad.example");
    assert!(
        registry.starts_with("[fail]") && registry.contains("bad.example/hosts.toml"),
        "{registry}"
    );
    assert!(out.lines().last().unwrap().ends_with(" 3 fail"), "{out}");
}

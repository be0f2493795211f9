//! What the numbers were measured on, printed above the table.

use std::path::Path;
use std::process::Command;

/// `(key, value)` lines: date, CPU, cores, accel, QEMU, kernels, build profile.
pub fn describe(guest_dir: &Path, accel: &str) -> Vec<(String, String)> {
    let mut facts = vec![
        ("date".to_owned(), utc_now()),
        ("cpu".to_owned(), cpu_model()),
        (
            "cores".to_owned(),
            std::thread::available_parallelism().map_or("?".to_owned(), |n| n.to_string()),
        ),
        ("accel".to_owned(), accel.to_owned()),
        (
            "qemu".to_owned(),
            first_line("qemu-system-x86_64", &["--version"]),
        ),
        (
            "host kernel".to_owned(),
            std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
        ),
        ("guest kernel".to_owned(), guest_kernel(guest_dir)),
    ];
    facts.push((
        "vesseld".to_owned(),
        crate::daemon::vesseld_bin().display().to_string(),
    ));
    facts.push((
        "harness build".to_owned(),
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
        .to_owned(),
    ));
    facts
}

fn utc_now() -> String {
    first_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"])
}

fn first_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_owned))
        .unwrap_or_else(|| format!("{program}: not found"))
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "?".to_owned())
}

/// From the `guest.json` that scripts/build-guest.sh writes beside the kernel.
fn guest_kernel(guest_dir: &Path) -> String {
    std::fs::read(guest_dir.join("guest.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["kernel_version"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "?".to_owned())
}

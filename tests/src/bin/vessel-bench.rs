//! `vessel-bench [--quick] [--peer] [--only ROWS] [--stats-only] [--guest-dir DIR] [--vesseld PATH] [--out FILE]`
//!
//! Measures pod and container latency, memory per pod, image pull throughput and the
//! agent channel against their references and prints one markdown table. Needs root
//! and the README's set-up (qemu, helpers, guest image, vesseld). Everything it
//! starts is cleaned up, also on Ctrl-C or SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context as _};
use tokio::signal::unix::{signal, SignalKind};
use vessel_tests::bench::janitor::Janitor;
use vessel_tests::bench::{self, Options, SharedTable};

const USAGE: &str =
    "usage: vessel-bench [--quick] [--peer] [--only ROWS] [--stats-only] [--guest-dir DIR] [--vesseld PATH] [--out FILE]
  --quick      few samples, small image: a smoke run of about 3 minutes
  --peer       also run rows 2-4 against containerd + runc (its CRI, in a netns of
               its own) and pull with containerd's ctr (installs Debian's
               containerd and runc)
  --only       only these rows, comma-separated (e.g. 8,10), with the rows they are
               measured against in the same phase
  --stats-only only the ListContainerStats rows (same as --only 9)
  --guest-dir  vmlinux + initrd.img (default: $VESSEL_GUEST_DIR, else /usr/share/vessel)
  --vesseld    the vesseld to measure (default: $VESSELD_BIN, else beside this binary, else on PATH)
  --out        also write the table to FILE";

struct Args {
    options: Options,
    out: Option<PathBuf>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut quick = false;
    let mut peer = false;
    let mut only: Option<Vec<u32>> = None;
    let mut guest_dir = std::env::var_os("VESSEL_GUEST_DIR").map(PathBuf::from);
    let mut out = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || {
            args.next()
                .with_context(|| format!("{a} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "--quick" => quick = true,
            "--peer" => peer = true,
            "--stats-only" => only = Some(vec![9]),
            "--only" => {
                let v = value()?;
                let rows = v
                    .split(',')
                    .map(|r| r.trim().parse::<u32>())
                    .collect::<Result<Vec<_>, _>>()
                    .with_context(|| format!("--only wants row numbers, got {v:?}\n{USAGE}"))?;
                only = Some(rows);
            }
            "--guest-dir" => guest_dir = Some(value()?.into()),
            "--vesseld" => {
                let v = value()?;
                set_vesseld(v);
            }
            "--out" => out = Some(value()?.into()),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if std::env::var_os("VESSELD_BIN").is_none() {
        if let Some(found) = default_vesseld() {
            set_vesseld(found.display().to_string());
        }
    }
    Ok(Args {
        options: Options {
            quick,
            peer,
            only,
            // vesseld's config wants absolute paths.
            guest_dir: std::path::absolute(
                guest_dir.unwrap_or_else(|| "/usr/share/vessel".into()),
            )?,
        },
        out,
    })
}

fn set_vesseld(path: String) {
    // Before the runtime starts: no other thread reads the environment yet.
    std::env::set_var("VESSELD_BIN", path);
}

/// vesseld beside this binary (same cargo profile), else on PATH.
fn default_vesseld() -> Option<PathBuf> {
    let beside = std::env::current_exe().ok()?.with_file_name("vesseld");
    if beside.is_file() {
        return Some(beside);
    }
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|d| d.join("vesseld"))
        .find(|p| p.is_file())
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e:#}");
            return ExitCode::from(2);
        }
    };
    if !nix::unistd::geteuid().is_root() {
        eprintln!("vessel-bench needs root (VMs, network namespaces, mounts)");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(args))
}

async fn run(args: Args) -> ExitCode {
    let janitor = Arc::new(Janitor::default());
    let table: SharedTable = SharedTable::default();
    let mut work = tokio::spawn(bench::run(
        args.options.clone(),
        janitor.clone(),
        table.clone(),
    ));
    let outcome = tokio::select! {
        r = &mut work => r.unwrap_or_else(|e| Err(anyhow::anyhow!("the benchmark panicked: {e}"))),
        sig = interrupted() => {
            work.abort();
            let _ = work.await;
            Err(anyhow::anyhow!("interrupted by {sig}"))
        }
    };
    eprintln!("vessel-bench: cleaning up");
    let sweeper = janitor.clone();
    let _ = tokio::task::spawn_blocking(move || sweeper.sweep()).await;

    let rendered = table.lock().unwrap_or_else(|p| p.into_inner()).render();
    let mode = if args.options.quick { "quick" } else { "full" };
    println!("\n## vessel-bench ({mode})\n\n{rendered}");
    if let Some(out) = &args.out {
        if let Err(e) = std::fs::write(out, &rendered) {
            eprintln!("cannot write {}: {e}", out.display());
        }
    }
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vessel-bench failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn interrupted() -> &'static str {
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

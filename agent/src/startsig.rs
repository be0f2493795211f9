//! Signals sent while a container's first process is still starting.
//!
//! A container's init is PID 1 of its PID namespace, and the kernel drops any signal
//! sent to a namespace's init from outside unless the init has a handler for it. A
//! StopContainer right after StartContainer often lands before the program has
//! installed its handlers (or even been exec'd), and its TERM was lost: the kubelet
//! then waited the whole grace period. So a catchable signal to such a process
//! waits, for a short while after the start, until the program catches it.

use std::time::Duration;

/// How long after its start a process may still be installing its handlers.
pub const STARTING_WINDOW: Duration = Duration::from_secs(3);
const POLL: Duration = Duration::from_millis(20);

/// Whether the kernel would drop `sig` sent to `pid` from outside its PID namespace
/// now: `pid` is its namespace's init and has no handler for `sig`. False when the
/// status cannot be read (the process is gone: nothing to wait for).
pub fn would_drop(pid: i32, sig: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map(|s| drops(&s, sig))
        .unwrap_or(false)
}

/// [`would_drop`] on the text of `/proc/<pid>/status`.
fn drops(status: &str, sig: i32) -> bool {
    if !(1..=64).contains(&sig) || sig == libc::SIGKILL || sig == libc::SIGSTOP {
        return false;
    }
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
    };
    let ns_init = field("NSpid:")
        .and_then(|v| v.split_whitespace().last())
        .is_some_and(|last| last == "1");
    let caught = field("SigCgt:")
        .and_then(|v| u64::from_str_radix(v, 16).ok())
        .is_some_and(|mask| mask & (1u64 << (sig - 1)) != 0);
    ns_init && !caught
}

/// Waits until `sig` would reach `pid`, it exits, or it has run for
/// [`STARTING_WINDOW`] (`age` says how long it has run).
pub async fn wait_catchable(pid: i32, sig: i32, age: impl Fn() -> Duration) {
    while age() < STARTING_WINDOW && would_drop(pid, sig) {
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INIT_NO_HANDLER: &str =
        "Name:\ttop\nNSpid:\t42\t1\nSigIgn:\t0000000000000000\nSigCgt:\t0000000000000000\n";
    const INIT_TERM_CAUGHT: &str = "Name:\ttop\nNSpid:\t42\t1\nSigCgt:\t0000000000004000\n";
    const NOT_INIT: &str = "Name:\tsh\nNSpid:\t42\t7\nSigCgt:\t0000000000000000\n";

    #[test]
    fn only_an_init_without_a_handler_drops() {
        assert!(drops(INIT_NO_HANDLER, libc::SIGTERM));
        assert!(!drops(INIT_TERM_CAUGHT, libc::SIGTERM));
        assert!(drops(INIT_TERM_CAUGHT, libc::SIGINT));
        assert!(!drops(NOT_INIT, libc::SIGTERM));
        assert!(!drops(INIT_NO_HANDLER, libc::SIGKILL));
        assert!(!drops(INIT_NO_HANDLER, 0));
    }

    #[tokio::test]
    async fn gives_up_after_the_window_and_on_a_gone_process() {
        let t = std::time::Instant::now();
        wait_catchable(i32::MAX, libc::SIGTERM, || Duration::ZERO).await;
        assert!(t.elapsed() < Duration::from_millis(100));
        wait_catchable(1, libc::SIGTERM, || STARTING_WINDOW).await;
        assert!(t.elapsed() < Duration::from_millis(100));
    }
}

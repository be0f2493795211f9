//! The one place that reaps children. As PID 1 the agent inherits every orphan, so it
//! must `waitpid(-1)`; any other `waitpid` (tokio::process, std `Child::wait`) would
//! race it. Exits of processes the agent tracks are dispatched to their waiters; exits
//! that arrive before their pid is registered are kept briefly, so a process that
//! exits at once is not missed.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::sync::oneshot;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Exit code, or 128+N when killed by signal N.
    pub code: i32,
    /// Killed by a signal (the signal number), if so.
    pub signal: Option<i32>,
    pub at_unix_ns: i64,
}

impl Exit {
    pub fn from_status(status: WaitStatus, at_unix_ns: i64) -> Option<(Pid, Exit)> {
        match status {
            WaitStatus::Exited(pid, code) => Some((
                pid,
                Exit {
                    code,
                    signal: None,
                    at_unix_ns,
                },
            )),
            WaitStatus::Signaled(pid, sig, _) => Some((
                pid,
                Exit {
                    code: 128 + sig as i32,
                    signal: Some(sig as i32),
                    at_unix_ns,
                },
            )),
            _ => None,
        }
    }
}

/// Remembered exits of not-yet-registered pids.
const UNCLAIMED_MAX: usize = 4096;

#[derive(Default)]
pub struct State {
    waiters: HashMap<i32, oneshot::Sender<Exit>>,
    unclaimed: VecDeque<(i32, Instant, Exit)>,
}

impl State {
    /// Registers interest in `pid`'s exit. An exit seen since `since` is delivered at
    /// once (older ones belong to an earlier process that had the same pid).
    pub fn register(&mut self, pid: i32, since: Instant) -> oneshot::Receiver<Exit> {
        let (tx, rx) = oneshot::channel();
        if let Some(i) = self
            .unclaimed
            .iter()
            .position(|(p, t, _)| *p == pid && *t >= since)
        {
            let (_, _, exit) = self.unclaimed.remove(i).expect("index from position");
            let _ = tx.send(exit);
        } else {
            self.waiters.insert(pid, tx);
        }
        rx
    }

    fn dispatch(&mut self, pid: i32, exit: Exit) {
        match self.waiters.remove(&pid) {
            Some(tx) => {
                let _ = tx.send(exit);
            }
            None => {
                if self.unclaimed.len() >= UNCLAIMED_MAX {
                    self.unclaimed.pop_front();
                }
                self.unclaimed.push_back((pid, Instant::now(), exit));
            }
        }
    }
}

/// Shared handle to the reaper state.
#[derive(Clone, Default)]
pub struct Reaper {
    state: Arc<Mutex<State>>,
}

impl Reaper {
    /// Locks the state: hold it across fork+register so the child cannot be reaped
    /// before its waiter exists.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Spawns `cmd` and registers its exit. Never call `wait` on the returned child.
    pub fn spawn(
        &self,
        cmd: &mut std::process::Command,
    ) -> std::io::Result<(std::process::Child, oneshot::Receiver<Exit>)> {
        let mut st = self.lock();
        let since = Instant::now();
        let child = cmd.spawn()?;
        let rx = st.register(child.id() as i32, since);
        Ok((child, rx))
    }

    /// Reaps every exited child now, dispatching exits.
    pub fn reap_now(&self) {
        let mut st = self.lock();
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(status) => {
                    if let Some((pid, exit)) = Exit::from_status(status, crate::clock::unix_ns()) {
                        st.dispatch(pid.as_raw(), exit);
                    }
                }
            }
        }
    }

    /// Runs forever: reaps on every SIGCHLD (and every second, in case one was lost).
    pub async fn run(self) {
        let mut sig = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()) {
            Ok(s) => Some(s),
            Err(e) => {
                crate::log::error(&format!("SIGCHLD handler: {e}; polling"));
                None
            }
        };
        loop {
            self.reap_now();
            match sig.as_mut() {
                Some(s) => {
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), s.recv()).await;
                }
                None => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exit(code: i32) -> Exit {
        Exit {
            code,
            signal: None,
            at_unix_ns: 1,
        }
    }

    #[test]
    fn registered_waiter_gets_exit() {
        let mut st = State::default();
        let mut rx = st.register(42, Instant::now());
        st.dispatch(42, exit(3));
        assert_eq!(rx.try_recv().unwrap().code, 3);
        assert!(st.unclaimed.is_empty());
    }

    #[test]
    fn early_exit_is_kept_for_a_later_register() {
        let mut st = State::default();
        let since = Instant::now();
        st.dispatch(7, exit(1));
        let mut rx = st.register(7, since);
        assert_eq!(rx.try_recv().unwrap().code, 1);
        assert!(st.unclaimed.is_empty());
    }

    #[test]
    fn stale_exit_of_reused_pid_is_ignored() {
        let mut st = State::default();
        st.dispatch(9, exit(1));
        std::thread::sleep(std::time::Duration::from_millis(2));
        let mut rx = st.register(9, Instant::now());
        assert!(rx.try_recv().is_err());
        st.dispatch(9, exit(5));
        assert_eq!(rx.try_recv().unwrap().code, 5);
    }

    #[test]
    fn signal_exit_is_128_plus_n() {
        let (_, e) = Exit::from_status(
            WaitStatus::Signaled(Pid::from_raw(5), nix::sys::signal::Signal::SIGKILL, false),
            0,
        )
        .unwrap();
        assert_eq!(e.code, 137);
        assert_eq!(e.signal, Some(9));
    }

    #[tokio::test]
    async fn spawn_and_reap_real_child() {
        let r = Reaper::default();
        let (_child, rx) = r
            .spawn(std::process::Command::new("/bin/sh").args(["-c", "exit 7"]))
            .unwrap();
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        let mut rx = rx;
        loop {
            r.reap_now();
            if let Ok(e) = rx.try_recv() {
                assert_eq!(e.code, 7);
                break;
            }
            assert!(Instant::now() < deadline, "child not reaped");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}

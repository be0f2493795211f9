//! Exit watching: a started container's exit (agent WaitProcess) becomes its
//! record's EXITED state, after its output reached the log.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use vessel_proto::agent as pb;

use super::{Engine, LiveCtr, LivePod, PodGuard};
use crate::clock::now_ns;
use crate::crilog::CriLog;
use crate::logpump::spawn_pumps;
use crate::store::{ContainerState, StoreError};

/// How long an exit waits for its output to reach the log file.
const LOG_DRAIN: Duration = Duration::from_secs(5);

impl Engine {
    /// Starts the log pumps and the exit watcher of a running container.
    pub(super) async fn follow_container(
        &self,
        guard: &PodGuard,
        live: &Arc<LivePod>,
        id: &str,
        log_path: &str,
    ) {
        let log = if log_path.is_empty() {
            None
        } else {
            match CriLog::open(Path::new(log_path), self.config.containers.log_cap()) {
                Ok(l) => Some(Arc::new(l)),
                Err(e) => {
                    tracing::warn!(container = %id, path = log_path, error = %e, "cannot open the log file; output is discarded");
                    None
                }
            }
        };
        let vm = live.vm.clone();
        let pod_id = live.vm.id();
        // The pumps resume from stored offsets, which only the real agent speaks.
        let pumps = match vm.pod_vm() {
            Some(real) => spawn_pumps(real.agent(), &self.pod_dir(pod_id), id, log.clone()),
            None => Vec::new(),
        };
        let (tx, rx) = watch::channel(false);
        self.add_ctr(guard, pod_id, id, Arc::new(LiveCtr { log, exited: rx }));
        let store = self.store.clone();
        let id = id.to_owned();
        tokio::spawn(async move {
            let status = loop {
                match vm.wait(&id, "").await {
                    Ok(s) => break Some(s),
                    Err(e) => {
                        // A transport hiccup: retry while the container is still ours
                        // and unfinished; the VM watcher handles a dead VM.
                        match store.container(&id) {
                            Ok(c) if c.state == ContainerState::Running => {
                                tracing::debug!(container = %id, error = %e, "WaitProcess failed; retrying");
                                tokio::time::sleep(Duration::from_millis(500)).await;
                            }
                            _ => break None,
                        }
                    }
                }
            };
            if let Some(s) = status {
                // Let the output reach the log before the exit is visible.
                for p in pumps {
                    let _ = tokio::time::timeout(LOG_DRAIN, p).await;
                }
                let res = store.update_container(&id, |c| {
                    c.state = ContainerState::Exited;
                    c.exit_code = s.exit_code;
                    c.finished_at_ns = finished_at(c.started_at_ns, &s, now_ns());
                    c.reason = if s.oom_killed {
                        "OOMKilled"
                    } else if s.exit_code == 0 {
                        "Completed"
                    } else {
                        "Error"
                    }
                    .into();
                });
                if let Err(e) = res {
                    if !matches!(
                        e,
                        StoreError::NotFound { .. } | StoreError::BadTransition { .. }
                    ) {
                        tracing::warn!(container = %id, error = %e, "cannot record the exit");
                    }
                }
            }
            let _ = tx.send(true);
        });
    }
}

/// When a container finished, on the host clock: its host start plus how long the
/// guest says it ran (the guest clock is not the host's: only its durations count).
/// The guest's numbers are its own to choose, so the result is never past `now`, and
/// `now` stands in for times that make no sense.
fn finished_at(host_started_ns: i64, status: &pb::WaitProcessResponse, now: i64) -> i64 {
    let ran = status
        .exited_at_unix_ns
        .checked_sub(status.started_at_unix_ns)
        .filter(|ran| status.started_at_unix_ns > 0 && *ran >= 0);
    ran.and_then(|ran| host_started_ns.checked_add(ran))
        .filter(|t| *t <= now)
        .unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(started: i64, exited: i64) -> pb::WaitProcessResponse {
        pb::WaitProcessResponse {
            started_at_unix_ns: started,
            exited_at_unix_ns: exited,
            ..Default::default()
        }
    }

    #[test]
    fn finish_times_use_guest_durations_only() {
        assert_eq!(finished_at(1000, &status(50, 80), 5000), 1030);
        // No guest start, negative or overflowing durations, or a finish in the
        // future: the time the exit was seen.
        assert_eq!(finished_at(1000, &status(0, 80), 5000), 5000);
        assert_eq!(finished_at(1000, &status(80, 50), 5000), 5000);
        assert_eq!(finished_at(1000, &status(1, i64::MIN), 5000), 5000);
        assert_eq!(finished_at(1000, &status(i64::MAX, -1), 5000), 5000);
        assert_eq!(finished_at(i64::MAX, &status(1, 2), i64::MAX), i64::MAX);
        assert_eq!(finished_at(1000, &status(1, i64::MAX), 5000), 5000);
    }

    /// Whatever times the guest reports for an exit: no panic, never after the exit was
    /// seen, never before the container started.
    #[test]
    fn fuzz_wait_status_times() {
        let seeds: Vec<Vec<u8>> = vec![
            [1_000i64, 50, 80, 5_000]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            [i64::MAX, i64::MIN, 1, i64::MAX]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ];
        vessel_fuzz::fuzz("wait status times", &seeds, |data| {
            let mut i = vessel_fuzz::Input::new(data);
            let (host_started, started, exited, now) = (i.i64(), i.i64(), i.i64(), i.i64());
            let t = finished_at(host_started, &status(started, exited), now);
            assert!(t <= now, "finished at {t}, after {now}");
            if host_started <= now {
                assert!(t >= host_started, "finished at {t}, before {host_started}");
            }
            let honest = started > 0
                && exited.checked_sub(started).is_some_and(|r| r >= 0)
                && host_started
                    .checked_add(exited - started)
                    .is_some_and(|e| e <= now);
            if honest {
                assert_eq!(t, host_started + (exited - started));
            } else {
                assert_eq!(t, now);
            }
        });
    }
}

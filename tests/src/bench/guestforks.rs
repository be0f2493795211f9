//! Guest process spawns per CRI call. The guest kernel counts every fork since boot
//! (`processes` in `/proc/stat`; the counter is not per namespace, so a container
//! sees the whole VM's). A probe container in the pod reads it with ExecSync after
//! each call; the reads' own forks are measured first (two reads back to back) and
//! taken off.

use anyhow::Context as _;

use crate::cri::CriClient;

/// Reads of the counter back to back when measuring a read's own forks; the least
/// difference is kept (anything else forking in the guest only adds).
const CALIBRATION_READS: usize = 3;

/// `processes` of a `/proc/stat` text: forks since the guest booted.
pub fn forks_since_boot(stat: &str) -> Option<u64> {
    stat.lines()
        .find_map(|l| l.strip_prefix("processes "))
        .and_then(|n| n.trim().parse().ok())
}

/// A running container whose ExecSync reads the guest's fork counter.
pub struct Probe {
    container_id: String,
    /// Forks one read itself makes (the exec and `cat`).
    per_read: u64,
    last: u64,
}

impl Probe {
    /// Measures what a read costs in `container_id` (running) and takes the first
    /// reading.
    pub async fn new(c: &mut CriClient, container_id: &str) -> anyhow::Result<Probe> {
        let mut last = read(c, container_id).await?;
        let mut per_read = u64::MAX;
        for _ in 0..CALIBRATION_READS {
            let now = read(c, container_id).await?;
            per_read = per_read.min(now.saturating_sub(last));
            last = now;
        }
        Ok(Probe {
            container_id: container_id.to_owned(),
            per_read,
            last,
        })
    }

    /// Forks one read makes.
    pub fn per_read(&self) -> u64 {
        self.per_read
    }

    /// Forks since the last reading, less this reading's own.
    pub async fn since_last(&mut self, c: &mut CriClient) -> anyhow::Result<u64> {
        let now = read(c, &self.container_id).await?;
        let forks = now.saturating_sub(self.last).saturating_sub(self.per_read);
        self.last = now;
        Ok(forks)
    }
}

async fn read(c: &mut CriClient, container_id: &str) -> anyhow::Result<u64> {
    let stat = super::pods::exec_output(c, container_id, &["cat", "/proc/stat"]).await?;
    forks_since_boot(&String::from_utf8_lossy(&stat))
        .context("no `processes` line in the guest's /proc/stat")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_fork_counter() {
        let stat = "cpu  1 2 3 4\nintr 5\nctxt 77\nbtime 1\nprocesses 123\nprocs_running 1\n";
        assert_eq!(forks_since_boot(stat), Some(123));
        assert_eq!(forks_since_boot("processes_x 4\nctxt 1\n"), None);
        assert_eq!(forks_since_boot("processes many\n"), None);
        assert_eq!(forks_since_boot(""), None);
    }
}

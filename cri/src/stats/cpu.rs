//! CPU rate from two cumulative samples.

use std::time::Instant;

/// A cumulative CPU counter read at a host instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuSample {
    pub at: Instant,
    pub usage_ns: u64,
}

/// Average cores used between `prev` and `now`, in nano-cores (1e9 = one full CPU),
/// at most `max_cores` (the VM's vCPUs: a guest's counter cannot be trusted to stay
/// within what it could have used). None when there is no window or the counter went
/// backwards (a restarted cgroup).
pub fn nano_cores(prev: CpuSample, now: CpuSample, max_cores: u32) -> Option<u64> {
    let window_ns = now.at.checked_duration_since(prev.at)?.as_nanos();
    if window_ns == 0 || now.usage_ns < prev.usage_ns {
        return None;
    }
    let used = u128::from(now.usage_ns - prev.usage_ns);
    let rate = used.saturating_mul(1_000_000_000) / window_ns;
    let cap = u128::from(max_cores.max(1)) * 1_000_000_000;
    Some(rate.min(cap) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rate_over_a_window() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(2);
        let a = CpuSample {
            at: t0,
            usage_ns: 1_000,
        };
        // 1 s of CPU over 2 s: half a core.
        let b = CpuSample {
            at: t1,
            usage_ns: 1_000 + 1_000_000_000,
        };
        assert_eq!(nano_cores(a, b, 2), Some(500_000_000));
        // 2 full cores over 2 s on a 2-vCPU VM.
        let c = CpuSample {
            at: t1,
            usage_ns: 1_000 + 4_000_000_000,
        };
        assert_eq!(nano_cores(a, c, 2), Some(2_000_000_000));
    }

    #[test]
    fn bounded_and_undefined_cases() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(1);
        let a = CpuSample {
            at: t0,
            usage_ns: 0,
        };
        let huge = CpuSample {
            at: t1,
            usage_ns: u64::MAX,
        };
        assert_eq!(
            nano_cores(a, huge, 4),
            Some(4_000_000_000),
            "capped at the vCPUs"
        );
        let back = CpuSample {
            at: t1,
            usage_ns: 0,
        };
        let b = CpuSample {
            at: t1,
            usage_ns: 10,
        };
        assert_eq!(nano_cores(b, back, 1), None, "counter went backwards");
        assert_eq!(nano_cores(b, b, 1), None, "no window");
        assert_eq!(nano_cores(b, a, 1), None, "time went backwards");
    }
}

//! Host TSC frequency. Under TCG the guest reads the host TSC; telling the guest
//! kernel its rate (`tsc_early_khz`) spares it a PIT calibration that hangs about half
//! of microvm boots.

/// TSC kHz: the kernel's value where a sysfs file exposes it, else `cpu MHz` of an
/// invariant-TSC CPU from /proc/cpuinfo.
pub fn host_tsc_khz() -> Option<u64> {
    if let Ok(s) = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/tsc_freq_khz") {
        if let Ok(khz) = s.trim().parse() {
            return Some(khz);
        }
    }
    tsc_khz_from_cpuinfo(&std::fs::read_to_string("/proc/cpuinfo").ok()?)
}

/// Parses the first CPU of /proc/cpuinfo. Only trusted with `constant_tsc`: otherwise
/// `cpu MHz` is the current (scaled) clock, not the TSC rate.
pub fn tsc_khz_from_cpuinfo(cpuinfo: &str) -> Option<u64> {
    let first = cpuinfo.split("\n\n").next()?;
    let field = |name: &str| {
        first.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == name).then(|| v.trim())
        })
    };
    let flags = field("flags")?;
    if !flags.split_whitespace().any(|f| f == "constant_tsc") {
        return None;
    }
    let mhz: f64 = field("cpu MHz")?.parse().ok()?;
    (mhz > 0.0).then(|| (mhz * 1000.0).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpuinfo() {
        let info = "processor\t: 0\ncpu MHz\t\t: 2596.156\nflags\t\t: fpu tsc constant_tsc nonstop_tsc\n\nprocessor\t: 1\ncpu MHz\t\t: 1.0\n";
        assert_eq!(tsc_khz_from_cpuinfo(info), Some(2_596_156));
        let scaled = "processor\t: 0\ncpu MHz\t\t: 2596.156\nflags\t\t: fpu tsc\n";
        assert_eq!(tsc_khz_from_cpuinfo(scaled), None);
    }
}

//! Host memory of a pod: PSS of its processes, with the guest's RAM apart.

use std::path::Path;

/// Proportional set size of one process, KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pss {
    /// Guest RAM the guest has touched (QEMU's memfd RAM backend).
    pub guest_ram_kib: u64,
    /// Anonymous executable memory: TCG's translated-code buffer (none under KVM).
    pub code_cache_kib: u64,
    /// File mappings: binaries, libraries, the guest kernel and initrd. Their clean
    /// pages are page cache shared by every pod, so PSS splits them.
    pub file_kib: u64,
    /// Everything else: heaps, stacks, device state of QEMU and the helpers.
    pub other_kib: u64,
}

impl Pss {
    pub fn total_kib(&self) -> u64 {
        self.guest_ram_kib + self.code_cache_kib + self.file_kib + self.other_kib
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    GuestRam,
    CodeCache,
    File,
    Other,
}

impl Kind {
    /// From a smaps mapping header: `address perms offset dev inode [pathname]`.
    fn of_mapping(header: &str) -> Kind {
        let mut fields = header.split_whitespace();
        let perms = fields.nth(1).unwrap_or("");
        let path = fields.nth(3).unwrap_or("");
        if path.starts_with("/memfd:") {
            Kind::GuestRam
        } else if path.starts_with('/') {
            Kind::File
        } else if path.is_empty() && perms.contains('x') {
            Kind::CodeCache
        } else {
            Kind::Other
        }
    }
}

impl std::ops::Add for Pss {
    type Output = Pss;
    fn add(self, o: Pss) -> Pss {
        Pss {
            guest_ram_kib: self.guest_ram_kib + o.guest_ram_kib,
            code_cache_kib: self.code_cache_kib + o.code_cache_kib,
            file_kib: self.file_kib + o.file_kib,
            other_kib: self.other_kib + o.other_kib,
        }
    }
}

/// Sums `/proc/<pid>/smaps` (smaps_rollup has no per-mapping split): mappings of a
/// memfd count as guest RAM, since vessel backs guest RAM with
/// `memory-backend-memfd` and nothing else of a pod maps a memfd that large.
pub fn parse_smaps(text: &str) -> Pss {
    let mut pss = Pss::default();
    let mut kind = Kind::Other;
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if first == "Pss:" {
            let kib: u64 = fields.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            *match kind {
                Kind::GuestRam => &mut pss.guest_ram_kib,
                Kind::CodeCache => &mut pss.code_cache_kib,
                Kind::File => &mut pss.file_kib,
                Kind::Other => &mut pss.other_kib,
            } += kib;
        } else if is_mapping_header(first) {
            kind = Kind::of_mapping(line);
        }
    }
    pss
}

fn is_mapping_header(first: &str) -> bool {
    first.split_once('-').is_some_and(|(a, b)| {
        !a.is_empty() && a.chars().chain(b.chars()).all(|c| c.is_ascii_hexdigit())
    })
}

/// PSS of `pid`, or None if it is gone.
pub fn pss_of(pid: i32) -> Option<Pss> {
    std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("smaps"))
        .ok()
        .map(|t| parse_smaps(&t))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0c0a00000-55d0c0c00000 r-xp 00000000 fd:00 1234    /usr/bin/qemu-system-x86_64
Size:               2048 kB
Rss:                1024 kB
Pss:                 512 kB
7f0000000000-7f0010000000 rw-s 00000000 00:01 99      /memfd:mem (deleted)
Size:             262144 kB
Rss:               70000 kB
Pss:               70000 kB
Pss_Dirty:         70000 kB
7f2000000000-7f2000100000 rw-p 00000000 00:00 0 
Size:               1024 kB
Pss:                 300 kB
7f3000000000-7f303fff0000 rwxp 00000000 00:00 0 
Size:            1048512 kB
Pss:              150000 kB
7f4000000000-7f4003000000 rw-p 00000000 fe:00 77      /usr/share/vessel/vmlinux
Size:              50000 kB
Pss:               44000 kB
";

    #[test]
    fn memfd_mappings_are_guest_ram() {
        let p = parse_smaps(SMAPS);
        assert_eq!(p.guest_ram_kib, 70000);
        assert_eq!(p.code_cache_kib, 150000);
        assert_eq!(p.file_kib, 512 + 44000);
        assert_eq!(p.other_kib, 300);
        assert_eq!(p.total_kib(), 70000 + 150000 + 44512 + 300);
    }

    #[test]
    fn own_process_has_no_guest_ram() {
        let p = pss_of(std::process::id() as i32).unwrap();
        assert_eq!(p.guest_ram_kib, 0);
        assert!(p.file_kib > 0 && p.other_kib > 0);
    }
}

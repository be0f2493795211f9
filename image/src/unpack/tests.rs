//! Unit tests of layer unpack: metadata, whiteouts, compression, hostile entries.

use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use tar::{EntryType, Header};

use super::*;

/// Builds tars entry by entry, writing names raw so hostile ones can be made.
struct TarBuilder(tar::Builder<Vec<u8>>);

#[derive(Clone, Copy)]
struct Attrs {
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
}

const DEFAULT: Attrs = Attrs {
    mode: 0o644,
    uid: 0,
    gid: 0,
    mtime: 1_600_000_000,
};

impl TarBuilder {
    fn new() -> Self {
        Self(tar::Builder::new(Vec::new()))
    }

    fn raw(&mut self, path: &str, kind: EntryType, link: Option<&str>, data: &[u8], a: Attrs) {
        let mut h = Header::new_gnu();
        let name = &mut h.as_gnu_mut().unwrap().name;
        assert!(path.len() < name.len());
        name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(a.mode);
        h.set_uid(a.uid);
        h.set_gid(a.gid);
        h.set_mtime(a.mtime);
        if let Some(link) = link {
            h.set_link_name_literal(link).unwrap();
        }
        h.set_cksum();
        self.0.append(&h, data).unwrap();
    }

    fn file(&mut self, path: &str, data: &[u8]) -> &mut Self {
        self.raw(path, EntryType::Regular, None, data, DEFAULT);
        self
    }

    fn dir(&mut self, path: &str) -> &mut Self {
        self.raw(
            path,
            EntryType::Directory,
            None,
            b"",
            Attrs {
                mode: 0o755,
                ..DEFAULT
            },
        );
        self
    }

    fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.raw(
            path,
            EntryType::Symlink,
            Some(target),
            b"",
            Attrs {
                mode: 0o777,
                ..DEFAULT
            },
        );
        self
    }

    fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.raw(path, EntryType::Link, Some(target), b"", DEFAULT);
        self
    }

    /// A PAX extended header applying to the next entry.
    fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
        let mut data = Vec::new();
        for (k, v) in records {
            // "<len> <key>=<value>\n" where len counts itself.
            let body = k.len() + v.len() + 3;
            let mut len = body + 1;
            while len.to_string().len() + body != len {
                len += 1;
            }
            data.extend_from_slice(format!("{len} {k}=").as_bytes());
            data.extend_from_slice(v);
            data.push(b'\n');
        }
        self.raw("PaxHeader", EntryType::XHeader, None, &data, DEFAULT);
        self
    }

    fn finish(&mut self) -> Vec<u8> {
        let b = std::mem::replace(&mut self.0, tar::Builder::new(Vec::new()));
        b.into_inner().unwrap()
    }
}

fn unpack(tar: &[u8]) -> (tempfile::TempDir, Result<UnpackStats, UnpackError>) {
    let dir = tempfile::tempdir().unwrap();
    let res = unpack_layer(tar, Compression::None, dir.path());
    (dir, res)
}

fn assert_unsafe(res: Result<UnpackStats, UnpackError>, entry: &str) {
    match res {
        Err(UnpackError::Unsafe { path, reason }) => {
            assert_eq!(path, entry, "reason: {reason}");
        }
        other => panic!("expected Unsafe for {entry}, got {other:?}"),
    }
}

fn read_xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    match rustix::fs::lgetxattr(path, name, &mut buf) {
        Ok(n) => Some(buf[..n].to_vec()),
        Err(_) => None,
    }
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

#[test]
fn media_types() {
    use Compression::*;
    let cases = [
        ("application/vnd.oci.image.layer.v1.tar", None),
        ("application/vnd.oci.image.layer.v1.tar+gzip", Gzip),
        ("application/vnd.oci.image.layer.v1.tar+zstd", Zstd),
        ("application/vnd.docker.image.rootfs.diff.tar.gzip", Gzip),
        (
            "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
            Gzip,
        ),
    ];
    for (mt, c) in cases {
        assert_eq!(Compression::from_media_type(mt).unwrap(), c, "{mt}");
    }
    assert!(matches!(
        Compression::from_media_type("application/vnd.oci.image.config.v1+json"),
        Err(UnpackError::UnsupportedMediaType(_))
    ));
}

#[test]
fn regular_files_dirs_links_and_stats() {
    let tar = TarBuilder::new()
        .dir("etc/")
        .file("etc/hosts", b"127.0.0.1 localhost\n")
        .file("deep/implicit/parent", b"x")
        .symlink("etc/link", "/etc/hosts")
        .hardlink("etc/hard", "etc/hosts")
        .file("/abs/file", b"abs")
        .file("./dot/file", b"dot")
        .finish();
    let (dir, res) = unpack(&tar);
    let stats = res.unwrap();
    let d = dir.path();
    assert_eq!(stats.entries, 7);
    assert_eq!(stats.bytes, 20 + 1 + 3 + 3);
    assert_eq!(
        std::fs::read(d.join("etc/hosts")).unwrap(),
        b"127.0.0.1 localhost\n"
    );
    assert_eq!(std::fs::read(d.join("deep/implicit/parent")).unwrap(), b"x");
    let implicit = std::fs::metadata(d.join("deep/implicit")).unwrap();
    assert_eq!(implicit.permissions().mode() & 0o7777, 0o755);
    // Symlink targets are stored verbatim, never resolved on the host.
    assert_eq!(
        std::fs::read_link(d.join("etc/link")).unwrap(),
        Path::new("/etc/hosts")
    );
    let a = std::fs::metadata(d.join("etc/hosts")).unwrap();
    let b = std::fs::metadata(d.join("etc/hard")).unwrap();
    assert_eq!(a.ino(), b.ino());
    assert_eq!(a.nlink(), 2);
    assert_eq!(std::fs::read(d.join("abs/file")).unwrap(), b"abs");
    assert_eq!(std::fs::read(d.join("dot/file")).unwrap(), b"dot");
}

#[test]
fn later_entries_replace_earlier_ones() {
    let tar = TarBuilder::new()
        .file("a", b"first")
        .file("a", b"second")
        .symlink("b", "a")
        .file("b", b"replaces the link, not its target")
        .dir("c/")
        .file("c/inner", b"x")
        .file("c", b"dir replaced by a file")
        .finish();
    let (dir, res) = unpack(&tar);
    res.unwrap();
    let d = dir.path();
    assert_eq!(std::fs::read(d.join("a")).unwrap(), b"second");
    assert!(std::fs::symlink_metadata(d.join("b")).unwrap().is_file());
    assert_eq!(std::fs::read(d.join("a")).unwrap(), b"second");
    assert_eq!(
        std::fs::read(d.join("c")).unwrap(),
        b"dir replaced by a file"
    );
}

#[test]
fn preserves_metadata() {
    let uid_gid = Attrs {
        uid: 1000,
        gid: 2000,
        ..DEFAULT
    };
    let mut b = TarBuilder::new();
    b.raw(
        "bin/",
        EntryType::Directory,
        None,
        b"",
        Attrs {
            mode: 0o750,
            mtime: 1_500_000_000,
            ..uid_gid
        },
    );
    b.raw(
        "bin/suid",
        EntryType::Regular,
        None,
        b"#!",
        Attrs {
            mode: 0o4755,
            ..uid_gid
        },
    );
    b.raw(
        "bin/sgid",
        EntryType::Regular,
        None,
        b"#!",
        Attrs {
            mode: 0o2711,
            ..uid_gid
        },
    );
    b.raw(
        "tmp/",
        EntryType::Directory,
        None,
        b"",
        Attrs {
            mode: 0o1777,
            ..DEFAULT
        },
    );
    b.raw(
        "bin/ln",
        EntryType::Symlink,
        Some("suid"),
        b"",
        Attrs {
            mode: 0o777,
            mtime: 1_400_000_000,
            ..uid_gid
        },
    );
    b.pax(&[
        ("SCHILY.xattr.user.vessel", b"hello"),
        ("SCHILY.xattr.trusted.overlay.redirect", b"/etc"),
        ("mtime", b"1234567890.5"),
        ("uid", b"3000000"),
    ]);
    b.raw("bin/xattr", EntryType::Regular, None, b"", DEFAULT);
    b.raw(
        "dev/fifo",
        EntryType::Fifo,
        None,
        b"",
        Attrs {
            mode: 0o620,
            ..uid_gid
        },
    );
    {
        let mut h = Header::new_gnu();
        h.set_path("dev/null").unwrap();
        h.set_entry_type(EntryType::Char);
        h.set_mode(0o666);
        h.set_uid(0);
        h.set_gid(0);
        h.set_device_major(1).unwrap();
        h.set_device_minor(3).unwrap();
        h.set_size(0);
        h.set_mtime(DEFAULT.mtime);
        h.set_cksum();
        b.0.append(&h, &b""[..]).unwrap();
    }
    let tar = b.finish();
    let (dir, res) = unpack(&tar);
    res.unwrap();
    let d = dir.path();
    let m = |p: &str| std::fs::symlink_metadata(d.join(p)).unwrap();

    assert_eq!(m("bin/suid").mode() & 0o7777, 0o4755);
    assert_eq!(m("bin/sgid").mode() & 0o7777, 0o2711);
    assert_eq!(m("tmp").mode() & 0o7777, 0o1777);
    assert_eq!(m("bin").mode() & 0o7777, 0o750);
    // Directory mtime survives the files created in it afterwards.
    assert_eq!(m("bin").mtime(), 1_500_000_000);
    assert_eq!(m("bin/suid").mtime(), DEFAULT.mtime as i64);
    assert_eq!(m("bin/ln").mtime(), 1_400_000_000);
    assert!(m("bin/ln").file_type().is_symlink());
    assert_eq!(m("bin/xattr").mtime(), 1_234_567_890);
    assert_eq!(m("bin/xattr").mtime_nsec(), 500_000_000);
    assert!(m("dev/fifo").file_type().is_fifo());
    assert_eq!(m("dev/fifo").mode() & 0o7777, 0o620);
    assert_eq!(
        read_xattr(&d.join("bin/xattr"), "user.vessel").as_deref(),
        Some(&b"hello"[..])
    );
    if is_root() {
        assert_eq!((m("bin/suid").uid(), m("bin/suid").gid()), (1000, 2000));
        assert_eq!((m("bin/ln").uid(), m("bin/ln").gid()), (1000, 2000));
        assert_eq!((m("dev/fifo").uid(), m("dev/fifo").gid()), (1000, 2000));
        assert_eq!(
            m("bin/xattr").uid(),
            3_000_000,
            "PAX uid wins over the header"
        );
        let null = m("dev/null");
        assert!(null.file_type().is_char_device());
        assert_eq!(null.rdev(), rustix::fs::makedev(1, 3));
        // A layer cannot plant overlayfs' own xattrs.
        assert_eq!(
            read_xattr(&d.join("bin/xattr"), "trusted.overlay.redirect"),
            None
        );
    }
}

#[test]
fn root_entry_sets_dest_metadata() {
    let mut b = TarBuilder::new();
    b.raw(
        "./",
        EntryType::Directory,
        None,
        b"",
        Attrs {
            mode: 0o711,
            mtime: 1_000_000_000,
            ..DEFAULT
        },
    );
    b.file("f", b"");
    let (dir, res) = unpack(&b.finish());
    res.unwrap();
    let m = std::fs::metadata(dir.path()).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o711);
    assert_eq!(m.mtime(), 1_000_000_000);
}

#[test]
fn whiteouts_become_overlayfs_whiteouts() {
    if !is_root() {
        eprintln!("skipped: mknod of whiteouts and trusted.* xattrs need root");
        return;
    }
    let tar = TarBuilder::new()
        .dir("etc/")
        .file("etc/.wh.passwd", b"")
        .file(".wh.gone-dir", b"")
        .dir("var/cache/")
        .file("var/cache/.wh..wh..opq", b"")
        .file("var/cache/new", b"kept")
        .file("opaque-implicit/.wh..wh..opq", b"")
        .file("etc/.wh..wh.plnk", b"")
        .finish();
    let (dir, res) = unpack(&tar);
    let stats = res.unwrap();
    assert_eq!(stats.entries, 8);
    let d = dir.path();
    for w in ["etc/passwd", "gone-dir"] {
        let m = std::fs::symlink_metadata(d.join(w)).unwrap();
        assert!(m.file_type().is_char_device(), "{w}");
        assert_eq!(m.rdev(), 0, "{w}");
    }
    assert!(!d.join("etc/.wh.passwd").exists());
    assert!(!d.join("var/cache/.wh..wh..opq").exists());
    assert!(!d.join("etc/.wh..wh.plnk").exists());
    assert_eq!(
        read_xattr(&d.join("var/cache"), "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(
        read_xattr(&d.join("opaque-implicit"), "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert_eq!(read_xattr(&d.join("etc"), "trusted.overlay.opaque"), None);
    assert_eq!(std::fs::read(d.join("var/cache/new")).unwrap(), b"kept");
}

#[test]
fn whiteout_of_invalid_name_is_refused() {
    let (_d, res) = unpack(&TarBuilder::new().file("a/.wh...", b"").finish());
    assert_unsafe(res, "a/.wh...");
    let (_d, res) = unpack(&TarBuilder::new().file(".wh.", b"").finish());
    assert_unsafe(res, ".wh.");
}

#[test]
fn gzip_and_zstd() {
    let tar = TarBuilder::new().file("f", &[42u8; 100_000]).finish();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    let gz = gz.finish().unwrap();
    let zst = zstd::encode_all(&tar[..], 3).unwrap();
    for (data, c) in [(gz, Compression::Gzip), (zst, Compression::Zstd)] {
        let dir = tempfile::tempdir().unwrap();
        let stats = unpack_layer(&data[..], c, dir.path()).unwrap();
        assert_eq!(stats.bytes, 100_000);
        assert_eq!(
            std::fs::read(dir.path().join("f")).unwrap(),
            vec![42u8; 100_000]
        );
    }
    // Garbage is a Tar error, not a panic or a silent success.
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        unpack_layer(&b"definitely not gzip"[..], Compression::Gzip, dir.path()),
        Err(UnpackError::Tar(_))
    ));
}

/// A reader that counts what was consumed.
struct Counting<R>(R, usize);
impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.0.read(buf)?;
        self.1 += n;
        Ok(n)
    }
}

#[test]
fn reads_the_whole_stream() {
    let mut tar = TarBuilder::new().file("f", b"x").finish();
    tar.extend_from_slice(&[0u8; 10 * 1024]); // extra zero padding past the end marker
    let dir = tempfile::tempdir().unwrap();
    let mut r = Counting(&tar[..], 0);
    unpack_layer(&mut r, Compression::None, dir.path()).unwrap();
    assert_eq!(r.1, tar.len());
}

/// A directory beside the destination that a hostile layer tries to write into.
struct Victim {
    _tmp: tempfile::TempDir,
    outside: std::path::PathBuf,
    dest: std::path::PathBuf,
}

impl Victim {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside");
        let dest = tmp.path().join("dest");
        std::fs::create_dir(&outside).unwrap();
        std::fs::create_dir(&dest).unwrap();
        std::fs::write(outside.join("precious"), b"untouched").unwrap();
        Self {
            _tmp: tmp,
            outside,
            dest,
        }
    }

    fn unpack(&self, tar: &[u8]) -> Result<UnpackStats, UnpackError> {
        unpack_layer(tar, Compression::None, &self.dest)
    }

    fn assert_untouched(&self) {
        let names: Vec<_> = std::fs::read_dir(&self.outside)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["precious"]);
        assert_eq!(
            std::fs::read(self.outside.join("precious")).unwrap(),
            b"untouched"
        );
        let m = std::fs::metadata(self.outside.join("precious")).unwrap();
        assert_eq!(m.nlink(), 1);
    }
}

#[test]
fn hostile_dotdot() {
    let v = Victim::new();
    let tar = TarBuilder::new().file("../outside/pwned", b"x").finish();
    assert_unsafe(v.unpack(&tar), "../outside/pwned");
    let tar = TarBuilder::new()
        .file("a/../../outside/pwned", b"x")
        .finish();
    assert_unsafe(v.unpack(&tar), "a/../../outside/pwned");
    v.assert_untouched();
}

#[test]
fn hostile_write_through_symlink() {
    let v = Victim::new();
    let target = v.outside.to_str().unwrap();
    for (kind, data) in [
        (EntryType::Regular, &b"x"[..]),
        (EntryType::Directory, &b""[..]),
    ] {
        let mut b = TarBuilder::new();
        b.symlink("evil", target);
        b.raw("evil/pwned", kind, None, data, DEFAULT);
        assert_unsafe(v.unpack(&b.finish()), "evil/pwned");
    }
    // Through a symlink deeper in the path, and a symlink to "/" (never followed).
    let tar = TarBuilder::new()
        .dir("a/")
        .symlink("a/b", "/")
        .file("a/b/tmp/pwned", b"x")
        .finish();
    assert_unsafe(v.unpack(&tar), "a/b/tmp/pwned");
    // Relative symlink climbing out.
    let tar = TarBuilder::new()
        .symlink("up", "../outside")
        .file("up/pwned", b"x")
        .finish();
    assert_unsafe(v.unpack(&tar), "up/pwned");
    v.assert_untouched();
}

#[test]
fn hostile_absolute_through_symlink() {
    let v = Victim::new();
    let tar = TarBuilder::new()
        .symlink("etc", v.outside.to_str().unwrap())
        .file("/etc/pwned", b"x")
        .finish();
    assert_unsafe(v.unpack(&tar), "/etc/pwned");
    v.assert_untouched();
}

#[test]
fn hostile_whiteout_and_opaque_through_symlink() {
    let v = Victim::new();
    let tar = TarBuilder::new()
        .symlink("evil", v.outside.to_str().unwrap())
        .file("evil/.wh.precious", b"")
        .finish();
    assert_unsafe(v.unpack(&tar), "evil/.wh.precious");
    let tar = TarBuilder::new()
        .symlink("evil", v.outside.to_str().unwrap())
        .file("evil/.wh..wh..opq", b"")
        .finish();
    assert_unsafe(v.unpack(&tar), "evil/.wh..wh..opq");
    v.assert_untouched();
    assert_eq!(read_xattr(&v.outside, "trusted.overlay.opaque"), None);
}

#[test]
fn hostile_hardlink_escape() {
    let v = Victim::new();
    let tar = TarBuilder::new()
        .hardlink("pwned", "../outside/precious")
        .finish();
    assert_unsafe(v.unpack(&tar), "pwned");
    // Absolute targets are taken relative to the layer root, and must exist there.
    let abs = format!("{}/precious", v.outside.display());
    let tar = TarBuilder::new().hardlink("pwned", &abs).finish();
    assert_unsafe(v.unpack(&tar), "pwned");
    // Through a symlink the layer made.
    let tar = TarBuilder::new()
        .symlink("evil", v.outside.to_str().unwrap())
        .hardlink("pwned", "evil/precious")
        .finish();
    assert_unsafe(v.unpack(&tar), "pwned");
    v.assert_untouched();
}

#[test]
fn hardlink_to_symlink_links_the_symlink() {
    let v = Victim::new();
    let tar = TarBuilder::new()
        .symlink("evil", v.outside.join("precious").to_str().unwrap())
        .hardlink("h", "evil")
        .finish();
    v.unpack(&tar).unwrap();
    let m = std::fs::symlink_metadata(v.dest.join("h")).unwrap();
    assert!(m.file_type().is_symlink());
    v.assert_untouched();
}

#[test]
fn hostile_parent_is_a_file() {
    let tar = TarBuilder::new().file("f", b"x").file("f/g", b"y").finish();
    let (_d, res) = unpack(&tar);
    assert_unsafe(res, "f/g");
}

#[test]
fn unsupported_entry_type_is_refused() {
    let mut b = TarBuilder::new();
    b.raw("vol", EntryType::new(b'V'), None, b"", DEFAULT);
    let (_d, res) = unpack(&b.finish());
    assert_unsafe(res, "vol");
}

/// Small deterministic PRNG (xorshift64*) for the randomized test below.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[(self.next() % items.len() as u64) as usize]
    }
}

/// Random layers mixing every entry kind with hostile names and link targets: each
/// unpack either succeeds or refuses the layer as Unsafe, never panics, and nothing
/// outside the destination changes.
#[test]
fn randomized_layers_never_touch_the_outside() {
    let v = Victim::new();
    let outside = v.outside.to_str().unwrap().to_owned();
    let outside_file = format!("{outside}/precious");
    let comps = [
        "a",
        "b",
        "..",
        ".",
        "evil",
        "",
        ".wh.a",
        ".wh..wh..opq",
        ".wh.evil",
    ];
    let targets = [
        "a",
        "evil",
        "..",
        "/",
        "../..",
        &outside,
        &outside_file,
        "a/b",
        "/a",
    ];
    let mut rng = Rng(0x5EED_1234_ABCD_0001);
    let (mut ok, mut refused) = (0, 0);
    for round in 0..300 {
        let mut b = TarBuilder::new();
        for _ in 0..(1 + rng.next() % 12) {
            let depth = 1 + rng.next() % 4;
            let mut path = String::new();
            if rng.next() & 3 == 0 {
                path.push('/');
            }
            for i in 0..depth {
                if i > 0 {
                    path.push('/');
                }
                path.push_str(rng.pick(&comps));
            }
            if path.is_empty() {
                path.push('x');
            }
            let target = rng.pick(&targets);
            match rng.next() % 5 {
                0 => b.file(&path, b"data"),
                1 => b.dir(&path),
                2 => b.symlink(&path, target),
                3 => b.hardlink(&path, target),
                _ => b.file(&format!("{path}/f"), b"nested"),
            };
        }
        let dest = v.dest.join(format!("r{round}"));
        std::fs::create_dir(&dest).unwrap();
        match unpack_layer(&b.finish()[..], Compression::None, &dest) {
            Ok(_) => ok += 1,
            Err(UnpackError::Unsafe { .. }) => refused += 1,
            Err(e) => panic!("round {round}: unexpected {e:?}"),
        }
        v.assert_untouched();
    }
    // The generator must exercise both outcomes to mean anything.
    assert!(ok > 10 && refused > 10, "ok {ok}, refused {refused}");
}

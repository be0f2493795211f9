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

// ---- Header bombs: records `tar` would buffer whole ----

const GIB_1_5: u64 = 3 << 29;

fn gz(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// A header block of type `kind` declaring `size` bytes.
fn meta_header(kind: EntryType, size: u64) -> Header {
    let mut h = if kind == EntryType::XHeader {
        Header::new_ustar()
    } else {
        Header::new_gnu()
    };
    h.set_path("././@LongLink").unwrap();
    h.set_entry_type(kind);
    h.set_size(size);
    zero_ids(&mut h);
    h.set_cksum();
    h
}

/// Mode 0644, uid/gid/mtime 0 (`Header::new_*` leaves them empty).
fn zero_ids(h: &mut Header) {
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
}

/// Sets the size field in GNU base-256 form.
fn set_size_base256(h: &mut Header, size: u64) {
    let field = &mut h.as_old_mut().size;
    field.fill(0);
    field[4..].copy_from_slice(&size.to_be_bytes());
    field[0] |= 0x80;
    h.set_cksum();
}

/// A gzip layer: `prefix` (headers), then `payload` zero bytes (gzip members of 1 MiB
/// each, so a 1.5 GiB record is ~1.5 MiB of gzip), then an end-of-archive.
fn bomb_layer(prefix: &[u8], payload: u64) -> Vec<u8> {
    let mut out = gz(prefix);
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(&vec![0u8; 1 << 20]).unwrap();
    let chunk = e.finish().unwrap();
    for _ in 0..payload >> 20 {
        out.extend_from_slice(&chunk);
    }
    out.extend_from_slice(&gz(&[0u8; 1024]));
    out
}

/// The crafted layers, by name: each declares a 1.5 GiB record `tar` would read whole.
fn bomb(name: &str) -> Vec<u8> {
    let h = |kind, size| meta_header(kind, size).as_bytes().to_vec();
    match name {
        "gnu-long-name" => bomb_layer(&h(EntryType::GNULongName, GIB_1_5), GIB_1_5),
        "gnu-long-link" => bomb_layer(&h(EntryType::GNULongLink, GIB_1_5), GIB_1_5),
        "pax" => bomb_layer(&h(EntryType::XHeader, GIB_1_5), GIB_1_5),
        "gnu-long-name-base256" => {
            let mut hd = meta_header(EntryType::GNULongName, 0);
            set_size_base256(&mut hd, GIB_1_5);
            bomb_layer(hd.as_bytes(), GIB_1_5)
        }
        // After ordinary entries (a PAX-sized file, a base-256-sized file): the guard
        // keeps track of where headers are.
        "after-files" => {
            let mut t = TarBuilder::new();
            t.file("a", b"hello");
            // The PAX size applies to "b", not to the GNU long name between.
            t.pax(&[("size", b"1000")]);
            let mut prefix = t.0.get_ref().clone();
            prefix.extend_from_slice(&h(EntryType::GNULongName, 2));
            prefix.extend_from_slice(b"b\0");
            prefix.extend_from_slice(&[0u8; 510]);
            let mut f = Header::new_gnu();
            f.set_path("b").unwrap();
            f.set_size(0);
            zero_ids(&mut f);
            f.set_cksum();
            prefix.extend_from_slice(f.as_bytes());
            prefix.extend_from_slice(&[7u8; 1024]); // 1000 bytes + padding
            let mut f = Header::new_gnu();
            f.set_path("c").unwrap();
            zero_ids(&mut f);
            set_size_base256(&mut f, 600);
            prefix.extend_from_slice(f.as_bytes());
            prefix.extend_from_slice(&[8u8; 1024]);
            prefix.extend_from_slice(&h(EntryType::GNULongName, GIB_1_5));
            bomb_layer(&prefix, GIB_1_5)
        }
        other => panic!("no bomb {other}"),
    }
}

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

const BOMBS: &[&str] = &[
    "gnu-long-name",
    "gnu-long-link",
    "pax",
    "gnu-long-name-base256",
    "after-files",
];

/// Each bomb is refused with a clear error, and the unpack's peak RSS growth stays far
/// below the record's size. Each runs in a child process (this test, re-executed) so
/// that no other test's memory counts.
#[test]
fn header_bombs_are_refused_in_bounded_memory() {
    const TEST: &str = "unpack::tests::header_bombs_are_refused_in_bounded_memory";
    if let Ok(name) = std::env::var("VESSEL_TAR_BOMB") {
        let layer = bomb(&name);
        let dir = tempfile::tempdir().unwrap();
        // Reset the high-water mark to the current RSS, then measure the peak.
        std::fs::write("/proc/self/clear_refs", "5").unwrap();
        let before = status_kib("VmRSS:");
        let start = std::time::Instant::now();
        let res = unpack_layer(&layer[..], Compression::Gzip, dir.path());
        let ms = start.elapsed().as_millis();
        let growth = status_kib("VmHWM:").saturating_sub(before);
        let err = match res {
            Err(e @ UnpackError::TooLarge(_)) => e.to_string(),
            other => format!("UNEXPECTED {other:?}"),
        };
        println!(
            "BOMB {name} gz={} growth_kib={growth} ms={ms} err={err}",
            layer.len()
        );
        return;
    }
    for name in BOMBS {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([TEST, "--exact", "--nocapture", "--test-threads=1"])
            .env("VESSEL_TAR_BOMB", name)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout
            .lines()
            .find_map(|l| l.find("BOMB ").map(|i| &l[i..]))
            .unwrap_or_else(|| panic!("{name}: no result: {stdout}"));
        eprintln!("{line}");
        assert!(!line.contains("UNEXPECTED"), "{line}");
        assert!(line.contains("over the limit of 1048576 bytes"), "{line}");
        let growth: u64 = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("growth_kib="))
            .unwrap()
            .parse()
            .unwrap();
        assert!(growth < 64 * 1024, "{line}");
    }
}

#[test]
fn records_up_to_the_cap_are_accepted() {
    // A PAX record just under 1 MiB (an ignored key) and a long name via GNU `L`.
    let big = vec![b'c'; (1 << 20) - 100];
    let long = format!("{}/f", "d".repeat(200));
    let mut t = TarBuilder::new();
    t.pax(&[("comment", &big)]).file("a", b"1");
    let mut h = Header::new_gnu();
    zero_ids(&mut h);
    h.set_size(2);
    t.0.append_data(&mut h, &long, &b"22"[..]).unwrap();
    let (dir, res) = unpack(&t.finish());
    res.unwrap();
    assert_eq!(std::fs::read(dir.path().join("a")).unwrap(), b"1");
    assert_eq!(std::fs::read(dir.path().join(&long)).unwrap(), b"22");

    // One byte over the cap is refused, PAX or GNU.
    let mut t = TarBuilder::new();
    let over = vec![b'c'; 1 << 20];
    t.pax(&[("comment", &over)]).file("a", b"1");
    let (_d, res) = unpack(&t.finish());
    assert!(matches!(res, Err(UnpackError::TooLarge(_))), "{res:?}");
    let mut tar = meta_header(EntryType::GNULongName, (1 << 20) + 1)
        .as_bytes()
        .to_vec();
    tar.resize(tar.len() + (1 << 20) + 512, b'n');
    let (_d, res) = unpack(&tar);
    assert!(matches!(res, Err(UnpackError::TooLarge(_))), "{res:?}");
}

/// A GNU sparse header with `ext` extension blocks, the last holding one data block.
fn sparse_tar(ext: usize, then: &[u8]) -> Vec<u8> {
    let mut h = Header::new_gnu();
    h.set_path("s").unwrap();
    h.set_entry_type(EntryType::GNUSparse);
    zero_ids(&mut h);
    h.set_size(1024); // stored data: two 512-byte blocks
    let gnu = h.as_gnu_mut().unwrap();
    let oct = |dst: &mut [u8], v: u64| {
        let s = format!("{v:0w$o}", w = dst.len() - 1);
        dst[..s.len()].copy_from_slice(s.as_bytes());
    };
    oct(&mut gnu.sparse[0].offset, 0);
    oct(&mut gnu.sparse[0].numbytes, 512);
    oct(&mut gnu.realsize, 8192 + 512);
    gnu.isextended[0] = 1;
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    for i in 0..ext {
        let mut block = [0u8; 512];
        if i + 1 == ext {
            // The last extension block: the second data block at 8 KiB.
            let s = format!("{:011o}\0{:011o}\0", 8192, 512);
            block[..24].copy_from_slice(s.as_bytes());
        } else {
            block[504] = 1;
        }
        out.extend_from_slice(&block);
    }
    out.extend_from_slice(&[1u8; 512]);
    out.extend_from_slice(&[2u8; 512]);
    out.extend_from_slice(then);
    out.extend_from_slice(&[0u8; 1024]);
    out
}

#[test]
fn sparse_maps_are_followed_and_capped() {
    let next = {
        let mut t = TarBuilder::new();
        t.file("after", b"ok");
        t.0.get_ref().clone()
    };
    // A few extension blocks: unpacked, and the guard finds the next header.
    let bomb_after = meta_header(EntryType::GNULongName, GIB_1_5);
    let (dir, res) = unpack(&sparse_tar(3, &next));
    res.unwrap();
    let s = std::fs::read(dir.path().join("s")).unwrap();
    assert_eq!(s.len(), 8192 + 512);
    assert!(s[..512].iter().all(|&b| b == 1) && s[8192..].iter().all(|&b| b == 2));
    assert_eq!(std::fs::read(dir.path().join("after")).unwrap(), b"ok");
    let (_d, res) = unpack(&sparse_tar(3, bomb_after.as_bytes()));
    assert!(matches!(res, Err(UnpackError::TooLarge(_))), "{res:?}");
    // A map longer than the cap is refused.
    let (_d, res) = unpack(&sparse_tar(3000, &next));
    match res {
        Err(UnpackError::TooLarge(e)) => assert_eq!(e.what, "GNU sparse map"),
        other => panic!("{other:?}"),
    }
}

/// A GNU sparse file of `real` bytes: 512 bytes of 1s at 0, 512 bytes of 2s at
/// `second`, then a hole to the end.
fn sparse_with_holes(second: u64, real: u64) -> Vec<u8> {
    let mut h = Header::new_gnu();
    h.set_path("holes").unwrap();
    h.set_entry_type(EntryType::GNUSparse);
    zero_ids(&mut h);
    h.set_size(1024);
    let gnu = h.as_gnu_mut().unwrap();
    // Octal where it fits, else GNU base-256.
    let oct = |dst: &mut [u8], v: u64| {
        let s = format!("{v:0w$o}", w = dst.len() - 1);
        if s.len() < dst.len() {
            dst[..s.len()].copy_from_slice(s.as_bytes());
        } else {
            dst.fill(0);
            let n = dst.len();
            dst[n - 8..].copy_from_slice(&v.to_be_bytes());
            dst[0] |= 0x80;
        }
    };
    oct(&mut gnu.sparse[0].offset, 0);
    oct(&mut gnu.sparse[0].numbytes, 512);
    oct(&mut gnu.sparse[1].offset, second);
    oct(&mut gnu.sparse[1].numbytes, 512);
    oct(&mut gnu.sparse[2].offset, real);
    oct(&mut gnu.sparse[2].numbytes, 0);
    oct(&mut gnu.realsize, real);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(&[1u8; 512]);
    out.extend_from_slice(&[2u8; 512]);
    out.extend_from_slice(&[0u8; 1024]);
    out
}

#[test]
fn sparse_holes_are_not_written_and_huge_ones_refused() {
    use std::os::unix::fs::MetadataExt;
    let (second, real) = (256 << 20, (256 << 20) + (4 << 20));
    let (dir, res) = unpack(&sparse_with_holes(second, real));
    res.unwrap();
    let path = dir.path().join("holes");
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), real);
    // Only the two data blocks take space (filesystems round up; far below 1 MiB).
    assert!(meta.blocks() * 512 < 1 << 20, "{} blocks", meta.blocks());
    let mut f = std::fs::File::open(&path).unwrap();
    let mut b = [0u8; 512];
    f.read_exact(&mut b).unwrap();
    assert!(b.iter().all(|&x| x == 1));
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(second)).unwrap();
    f.read_exact(&mut b).unwrap();
    assert!(b.iter().all(|&x| x == 2));

    // A petabyte of holes in a 2 KiB tar: refused before tar reads any of it.
    let (_d, res) = unpack(&sparse_with_holes(1 << 50, 1 << 50));
    match res {
        Err(UnpackError::TooLarge(e)) => assert_eq!(e.what, "GNU sparse file"),
        other => panic!("{other:?}"),
    }
}

// ---- Budgets: bytes and entries of one pull ----

fn budget(max_bytes: u64, max_entries: u64) -> UnpackBudget {
    UnpackBudget::new(UnpackLimits {
        max_bytes,
        max_entries,
    })
}

/// A regular file `name` declaring `size` bytes of zeros, as gzip: ~1 KiB per MiB.
fn zeros_layer(name: &str, size: u64) -> Vec<u8> {
    let mut h = Header::new_gnu();
    h.set_path(name).unwrap();
    h.set_entry_type(EntryType::Regular);
    h.set_size(size);
    zero_ids(&mut h);
    h.set_cksum();
    bomb_layer(h.as_bytes(), size)
}

/// Bytes of the regular files under `dir` (apparent sizes).
fn file_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let m = e.metadata().unwrap();
        total += if m.is_dir() {
            file_bytes(&e.path())
        } else {
            m.len()
        };
    }
    total
}

fn snapshots() -> (tempfile::TempDir, vessel_storage::Snapshotter) {
    let dir = tempfile::tempdir().unwrap();
    let s = vessel_storage::Snapshotter::open(dir.path()).unwrap();
    (dir, s)
}

const CHAIN: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";

#[test]
fn zero_bomb_is_refused_mid_file_and_the_snapshot_discarded() {
    // 20 GiB of zeros in ~20 MiB of gzip (the layer of the issue), against an 8 MiB
    // budget: refused after 8 MiB of the one file, not after 20 GiB.
    let layer = zeros_layer("zeros", 20 << 30);
    assert!(layer.len() < 32 << 20, "{} bytes of gzip", layer.len());
    let cap = 8 << 20;
    let b = budget(cap, 1000);
    let (root, snaps) = snapshots();
    let pending = snaps.prepare(CHAIN).unwrap();
    let t = std::time::Instant::now();
    let err = unpack_layer_within(&layer[..], Compression::Gzip, pending.path(), &b).unwrap_err();
    assert!(
        t.elapsed() < std::time::Duration::from_secs(10),
        "{:?}",
        t.elapsed()
    );
    match &err {
        UnpackError::LimitExceeded { what, limit } => {
            assert_eq!((*what, *limit), (Limit::Bytes, cap));
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("8388608 bytes"), "{err}");
    // Stopped inside the file, with no more than the budget written.
    let written = file_bytes(pending.path());
    assert!(written <= cap && written > 0, "{written}");
    assert!(b.exceeded().is_some());
    drop(pending);
    let left: Vec<_> = std::fs::read_dir(root.path()).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn entry_bomb_is_refused_and_the_snapshot_discarded() {
    let mut t = TarBuilder::new();
    t.dir("d");
    for i in 0..2000 {
        t.file(&format!("d/{i}"), b"");
    }
    let tar = gz(&t.finish());
    let b = budget(1 << 30, 500);
    let (root, snaps) = snapshots();
    let pending = snaps.prepare(CHAIN).unwrap();
    let err = unpack_layer_within(&tar[..], Compression::Gzip, pending.path(), &b).unwrap_err();
    match &err {
        UnpackError::LimitExceeded { what, limit } => {
            assert_eq!((*what, *limit), (Limit::Entries, 500));
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("500 entries"), "{err}");
    // "d" and 499 files: nothing past the limit.
    let files = std::fs::read_dir(pending.path().join("d")).unwrap().count();
    assert_eq!(files, 499);
    drop(pending);
    assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 0);
}

#[test]
fn the_budget_is_shared_by_layers_and_stays_exhausted() {
    let data = vec![7u8; 600 << 10];
    let layer = |name: &str| TarBuilder::new().file(name, &data).finish();
    let b = budget(1 << 20, 100);
    let d1 = tempfile::tempdir().unwrap();
    let stats = unpack_layer_within(&layer("a")[..], Compression::None, d1.path(), &b).unwrap();
    assert_eq!(stats.bytes, 600 << 10);
    assert_eq!(b.remaining(), ((1 << 20) - (600 << 10), 99));
    // The second layer alone fits, but not after the first.
    let d2 = tempfile::tempdir().unwrap();
    let err =
        unpack_layer_within(&layer("b")[..], Compression::None, d2.path(), &b.clone()).unwrap_err();
    assert!(
        matches!(
            err,
            UnpackError::LimitExceeded {
                what: Limit::Bytes,
                ..
            }
        ),
        "{err:?}"
    );
    // Exhausted for good: even an entry without content is refused, naming bytes.
    let d3 = tempfile::tempdir().unwrap();
    let err = unpack_layer_within(
        &TarBuilder::new().dir("x").finish()[..],
        Compression::None,
        d3.path(),
        &b,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            UnpackError::LimitExceeded {
                what: Limit::Bytes,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(!d3.path().join("x").exists());
}

#[test]
fn a_layer_exactly_at_the_limits_is_accepted() {
    let tar = TarBuilder::new()
        .dir("d")
        .file("d/f", &[1u8; 3000])
        .finish();
    let dir = tempfile::tempdir().unwrap();
    let b = budget(3000, 2);
    unpack_layer_within(&tar[..], Compression::None, dir.path(), &b).unwrap();
    assert_eq!(b.remaining(), (0, 0));
    assert!(b.exceeded().is_none());
}

#[test]
fn data_outside_files_is_charged_too() {
    // Content declared for a directory (skipped, not written) and zeros after the
    // end-of-archive cost decompression like file content: both are charged.
    let mut t = TarBuilder::new();
    t.raw("d", EntryType::Directory, None, &[0u8; 4096], DEFAULT);
    let tar = t.finish();
    let dir = tempfile::tempdir().unwrap();
    let err = unpack_layer_within(&tar[..], Compression::None, dir.path(), &budget(4000, 10))
        .unwrap_err();
    assert!(matches!(err, UnpackError::LimitExceeded { .. }), "{err:?}");

    let mut tar = TarBuilder::new().file("f", b"x").finish();
    tar.extend_from_slice(&vec![0u8; 1 << 20]);
    let dir = tempfile::tempdir().unwrap();
    let err = unpack_layer_within(
        &tar[..],
        Compression::None,
        dir.path(),
        &budget(64 << 10, 10),
    )
    .unwrap_err();
    assert!(matches!(err, UnpackError::LimitExceeded { .. }), "{err:?}");
    // Within the budget, the same layer passes.
    let dir = tempfile::tempdir().unwrap();
    unpack_layer_within(
        &tar[..],
        Compression::None,
        dir.path(),
        &budget(4 << 20, 10),
    )
    .unwrap();
}

//! Applies tar entries, one at a time, beneath the destination directory.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{AtFlags, FileType, Gid, Mode, OFlags, Timespec, Timestamps, Uid, XattrFlags};
use rustix::io::Errno;
use tar::EntryType;

use super::path::{
    components, is_plain_name, OPAQUE_WHITEOUT, WHITEOUT_META_PREFIX, WHITEOUT_PREFIX,
};
use super::safefs::{file_type_at, open_dir_at, remove_at, walk_dirs};
use super::{UnpackBudget, UnpackError, UnpackStats};

/// Overlayfs marks an opaque directory with this xattr.
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
/// Layers may not carry overlayfs' own xattrs: they would let a layer forge
/// redirects or opaque markers that overlayfs trusts.
const OVERLAY_XATTR_PREFIX: &[u8] = b"trusted.overlay.";
const PAX_XATTR_PREFIX: &[u8] = b"SCHILY.xattr.";
/// Content is read and written in chunks of this size, each charged to the budget
/// before it is written (the default 8 KiB of `io::copy` costs throughput).
const CHUNK: usize = 256 * 1024;
/// A tar record (20 blocks): writers pad the archive to a multiple of it.
const TAR_RECORD: u64 = 20 * 512;

/// Metadata of one entry, PAX overrides applied.
struct Meta {
    uid: u32,
    gid: u32,
    mode: u32,
    mtime: Timespec,
    xattrs: Vec<(OsString, Vec<u8>)>,
}

pub(crate) struct Unpacker {
    root: OwnedFd,
    /// Directories whose mtime is set at the end, after their contents are written.
    dir_times: Vec<(Vec<OsString>, Timespec)>,
    /// The last parent directory opened (entries of one dir are usually adjacent).
    parent_cache: Option<(Vec<OsString>, OwnedFd)>,
    chown: bool,
    stats: UnpackStats,
    /// What this layer (and the others of its pull) may still write.
    budget: UnpackBudget,
    /// The copy buffer, reused for every entry.
    buf: Vec<u8>,
}

/// Context for errors about one entry.
struct Ctx(String);

impl Ctx {
    fn unsafe_(&self, reason: impl Into<String>) -> UnpackError {
        UnpackError::Unsafe {
            path: self.0.clone(),
            reason: reason.into(),
        }
    }

    fn io(&self, e: impl Into<std::io::Error>) -> UnpackError {
        UnpackError::Io {
            path: self.0.clone(),
            source: e.into(),
        }
    }

    /// Maps an error of resolving a path: a symlink or non-directory on the way is
    /// the layer's fault, not the host's.
    fn resolve(&self, what: &str, e: Errno) -> UnpackError {
        match e {
            Errno::LOOP => self.unsafe_(format!("{what} goes through a symlink")),
            Errno::NOTDIR => self.unsafe_(format!("{what} goes through a non-directory")),
            Errno::XDEV => self.unsafe_(format!("{what} escapes the layer root")),
            e => self.io(e),
        }
    }
}

impl Unpacker {
    pub(crate) fn new(dest: &Path, budget: UnpackBudget) -> Result<Self, UnpackError> {
        let root = rustix::fs::open(
            dest,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| UnpackError::Io {
            path: dest.display().to_string(),
            source: e.into(),
        })?;
        Ok(Self {
            root,
            dir_times: Vec::new(),
            parent_cache: None,
            // Without root, ownership cannot be given away; keep the caller's.
            chown: rustix::process::geteuid().is_root(),
            stats: UnpackStats::default(),
            budget,
            buf: vec![0; CHUNK],
        })
    }

    pub(crate) fn stats(&self) -> UnpackStats {
        self.stats
    }

    /// Sets directory mtimes, deepest last-written first, now that nothing more is
    /// created inside them.
    pub(crate) fn finish(&mut self) -> Result<(), UnpackError> {
        self.parent_cache = None;
        for (comps, mtime) in self.dir_times.drain(..).rev() {
            let refs: Vec<&OsStr> = comps.iter().map(OsString::as_os_str).collect();
            // A later entry may have removed or replaced the directory: skip it then.
            let Ok(fd) = walk_dirs(self.root.as_fd(), &refs, false) else {
                continue;
            };
            let ctx = Ctx(comps.join(OsStr::new("/")).to_string_lossy().into_owned());
            rustix::fs::futimens(&fd, &times(mtime)).map_err(|e| ctx.io(e))?;
        }
        Ok(())
    }

    /// Applies one entry, charging it and all of its data to the budget (data the
    /// entry does not use is read here too, so `tar` has nothing left to skip).
    pub(crate) fn apply<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
    ) -> Result<(), UnpackError> {
        self.budget.take_entry()?;
        self.apply_entry(entry)?;
        // Only reads can fail here: errors of the stream itself.
        self.pump(entry, 0, |_| Ok(()), UnpackError::Tar)?;
        Ok(())
    }

    /// Reads what is left of `src` (what follows the end-of-archive marker) through
    /// the budget, past the padding of a standard tar record, which is free; returns
    /// the bytes read.
    pub(crate) fn drain<R: Read>(&mut self, src: &mut R) -> Result<u64, UnpackError> {
        self.pump(src, TAR_RECORD, |_| Ok(()), UnpackError::Tar)
    }

    /// Reads `src` to its end in chunks, charging each to the budget (all but the
    /// first `free` bytes) before `sink` gets it: a layer over its budget stops
    /// mid-file, with nothing past the limit written. I/O errors (reading or in
    /// `sink`) become `io_err(e)`.
    fn pump<R: Read>(
        &mut self,
        src: &mut R,
        mut free: u64,
        mut sink: impl FnMut(&[u8]) -> std::io::Result<()>,
        io_err: impl Fn(std::io::Error) -> UnpackError,
    ) -> Result<u64, UnpackError> {
        let mut total = 0u64;
        loop {
            let n = match src.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err(e)),
            };
            let waived = free.min(n as u64);
            free -= waived;
            self.budget.take_bytes(n as u64 - waived)?;
            sink(&self.buf[..n]).map_err(&io_err)?;
            total += n as u64;
        }
        Ok(total)
    }

    fn apply_entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), UnpackError> {
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            EntryType::XGlobalHeader
                | EntryType::XHeader
                | EntryType::GNULongName
                | EntryType::GNULongLink
        ) {
            return Ok(());
        }
        let raw_path = entry.path_bytes().into_owned();
        let ctx = Ctx(String::from_utf8_lossy(&raw_path).into_owned());
        let comps = components(&raw_path).map_err(|r| ctx.unsafe_(r))?;
        let meta = read_meta(entry, &ctx)?;
        self.stats.entries += 1;

        let Some((name, parents)) = comps.split_last() else {
            // "./": the layer sets the root directory's own metadata.
            if kind != EntryType::Directory {
                return Err(ctx.unsafe_("a non-directory entry names the layer root"));
            }
            let fd = walk_dirs(self.root.as_fd(), &[], false).map_err(|e| ctx.io(e))?;
            self.set_meta_fd(&fd, &meta, &ctx)?;
            self.dir_times.push((Vec::new(), meta.mtime));
            return Ok(());
        };

        let name_bytes = name.as_bytes();
        if name_bytes.starts_with(WHITEOUT_PREFIX.as_bytes()) {
            return self.whiteout(parents, name_bytes, &ctx);
        }

        let parent = self.parent(parents, &ctx)?;
        let parent = parent.as_fd();
        match kind {
            EntryType::Directory => {
                match file_type_at(parent, name).map_err(|e| ctx.io(e))? {
                    Some(FileType::Directory) => {}
                    existing => {
                        if existing.is_some() {
                            self.remove(parent, name, &ctx)?;
                        }
                        rustix::fs::mkdirat(parent, *name, Mode::from_raw_mode(0o700))
                            .map_err(|e| ctx.io(e))?;
                    }
                }
                let fd = open_dir_at(parent, name).map_err(|e| ctx.resolve("directory", e))?;
                self.set_meta_fd(&fd, &meta, &ctx)?;
                let owned = comps.iter().map(|c| c.to_os_string()).collect();
                self.dir_times.push((owned, meta.mtime));
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                self.remove(parent, name, &ctx)?;
                let fd = rustix::fs::openat(
                    parent,
                    *name,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|e| ctx.io(e))?;
                let mut file = File::from(fd);
                let sparse = kind == EntryType::GNUSparse;
                self.stats.bytes += self.copy_data(entry, &mut file, sparse, &ctx)?;
                self.set_meta_fd(&file, &meta, &ctx)?;
                rustix::fs::futimens(&file, &times(meta.mtime)).map_err(|e| ctx.io(e))?;
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| ctx.unsafe_("symlink without a target"))?
                    .into_owned();
                self.remove(parent, name, &ctx)?;
                // The target is not checked: it is resolved inside the container.
                rustix::fs::symlinkat(OsStr::from_bytes(&target), parent, *name)
                    .map_err(|e| ctx.io(e))?;
                self.chown_at(parent, name, &meta, &ctx)?;
                rustix::fs::utimensat(parent, *name, &times(meta.mtime), AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| ctx.io(e))?;
            }
            EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| ctx.unsafe_("hard link without a target"))?
                    .into_owned();
                let tcomps = components(&target)
                    .map_err(|r| ctx.unsafe_(format!("hard link target: {r}")))?;
                let Some((tname, tparents)) = tcomps.split_last() else {
                    return Err(ctx.unsafe_("hard link to the layer root"));
                };
                let tparent =
                    walk_dirs(self.root.as_fd(), tparents, false).map_err(|e| match e {
                        Errno::NOENT => {
                            ctx.unsafe_("hard link target does not exist in this layer")
                        }
                        e => ctx.resolve("hard link target", e),
                    })?;
                match file_type_at(tparent.as_fd(), tname).map_err(|e| ctx.io(e))? {
                    None => {
                        return Err(ctx.unsafe_("hard link target does not exist in this layer"))
                    }
                    Some(FileType::Directory) => {
                        return Err(ctx.unsafe_("hard link to a directory"))
                    }
                    Some(_) => {}
                }
                if tparents == parents && tname == name {
                    return Ok(()); // a link to itself changes nothing
                }
                self.remove(parent, name, &ctx)?;
                // No AT_SYMLINK_FOLLOW: a link to a symlink links the symlink itself.
                rustix::fs::linkat(&tparent, *tname, parent, *name, AtFlags::empty())
                    .map_err(|e| ctx.io(e))?;
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let (ft, dev) = match kind {
                    EntryType::Fifo => (FileType::Fifo, 0),
                    _ => {
                        let h = entry.header();
                        let major = h.device_major().map_err(UnpackError::Tar)?.unwrap_or(0);
                        let minor = h.device_minor().map_err(UnpackError::Tar)?.unwrap_or(0);
                        let ft = if kind == EntryType::Char {
                            FileType::CharacterDevice
                        } else {
                            FileType::BlockDevice
                        };
                        (ft, rustix::fs::makedev(major, minor))
                    }
                };
                self.remove(parent, name, &ctx)?;
                rustix::fs::mknodat(parent, *name, ft, Mode::from_raw_mode(0o600), dev)
                    .map_err(|e| ctx.io(e))?;
                self.chown_at(parent, name, &meta, &ctx)?;
                // We just created it, so it is not a symlink that chmodat could follow.
                rustix::fs::chmodat(
                    parent,
                    *name,
                    Mode::from_raw_mode(meta.mode),
                    AtFlags::empty(),
                )
                .map_err(|e| ctx.io(e))?;
                rustix::fs::utimensat(parent, *name, &times(meta.mtime), AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| ctx.io(e))?;
            }
            other => return Err(ctx.unsafe_(format!("unsupported tar entry type {other:?}"))),
        }
        Ok(())
    }

    /// `.wh.<name>` → a 0/0 character device `<name>`; `.wh..wh..opq` → the opaque
    /// xattr on the parent directory.
    fn whiteout(&mut self, parents: &[&OsStr], name: &[u8], ctx: &Ctx) -> Result<(), UnpackError> {
        let parent = self.parent(parents, ctx)?;
        if name == OPAQUE_WHITEOUT.as_bytes() {
            return rustix::fs::fsetxattr(&parent, OPAQUE_XATTR, b"y", XattrFlags::empty())
                .map_err(|e| ctx.io(e));
        }
        if name.starts_with(WHITEOUT_META_PREFIX.as_bytes()) {
            return Ok(()); // aufs bookkeeping (e.g. .wh..wh.plnk): nothing for overlayfs
        }
        let target = &name[WHITEOUT_PREFIX.len()..];
        if !is_plain_name(target) {
            return Err(ctx.unsafe_("whiteout of an invalid name"));
        }
        let target = OsStr::from_bytes(target);
        self.remove(parent.as_fd(), target, ctx)?;
        rustix::fs::mknodat(
            &parent,
            target,
            FileType::CharacterDevice,
            Mode::empty(),
            rustix::fs::makedev(0, 0),
        )
        .map_err(|e| ctx.io(e))
    }

    /// Opens (creating if absent) the parent directory of an entry. Parents a tar
    /// does not list get mode 0755, like tar does.
    fn parent(&mut self, parents: &[&OsStr], ctx: &Ctx) -> Result<OwnedFd, UnpackError> {
        if let Some((cached, fd)) = &self.parent_cache {
            if cached
                .iter()
                .map(OsString::as_os_str)
                .eq(parents.iter().copied())
            {
                return fd.try_clone().map_err(|e| ctx.io(e));
            }
        }
        let fd = walk_dirs(self.root.as_fd(), parents, true).map_err(|e| ctx.resolve("path", e))?;
        let owned = parents.iter().map(|c| c.to_os_string()).collect();
        self.parent_cache = Some((owned, fd.try_clone().map_err(|e| ctx.io(e))?));
        Ok(fd)
    }

    fn remove(
        &mut self,
        parent: BorrowedFd<'_>,
        name: &OsStr,
        ctx: &Ctx,
    ) -> Result<(), UnpackError> {
        if remove_at(parent, name).map_err(|e| ctx.io(e))? {
            // The cached fd may be (inside) the removed directory.
            self.parent_cache = None;
        }
        Ok(())
    }

    /// Owner, xattrs, then mode: chown clears setuid/setgid, so chmod comes last.
    fn set_meta_fd<Fd: AsFd>(&self, fd: Fd, meta: &Meta, ctx: &Ctx) -> Result<(), UnpackError> {
        let fd = fd.as_fd();
        if self.chown {
            rustix::fs::fchown(
                fd,
                Some(Uid::from_raw(meta.uid)),
                Some(Gid::from_raw(meta.gid)),
            )
            .map_err(|e| ctx.io(e))?;
        }
        for (name, value) in &meta.xattrs {
            // Stored on disk like content (up to 64 KiB each on XFS).
            self.budget.take_bytes((name.len() + value.len()) as u64)?;
            rustix::fs::fsetxattr(fd, name.as_os_str(), value, XattrFlags::empty())
                .map_err(|e| ctx.io(e))?;
        }
        rustix::fs::fchmod(fd, Mode::from_raw_mode(meta.mode)).map_err(|e| ctx.io(e))
    }

    /// Copies an entry's content within the budget. For a GNU sparse entry, runs of
    /// zeros (the holes `tar` fills in, whose size the layer declares freely) become
    /// holes in the file rather than written blocks, so a tiny layer cannot fill the
    /// disk with them; they are still charged, being read.
    fn copy_data<R: Read>(
        &mut self,
        src: &mut R,
        dst: &mut File,
        sparse: bool,
        ctx: &Ctx,
    ) -> Result<u64, UnpackError> {
        use std::io::{Seek, SeekFrom};
        let total = self.pump(
            src,
            0,
            |chunk| {
                if sparse && chunk.iter().all(|&b| b == 0) {
                    dst.seek(SeekFrom::Current(chunk.len() as i64)).map(drop)
                } else {
                    dst.write_all(chunk)
                }
            },
            |e| ctx.io(e),
        )?;
        if sparse {
            // A trailing hole: the file still has its full size.
            dst.set_len(total).map_err(|e| ctx.io(e))?;
        }
        Ok(total)
    }

    fn chown_at(
        &self,
        parent: BorrowedFd<'_>,
        name: &OsStr,
        meta: &Meta,
        ctx: &Ctx,
    ) -> Result<(), UnpackError> {
        if !self.chown {
            return Ok(());
        }
        rustix::fs::chownat(
            parent,
            name,
            Some(Uid::from_raw(meta.uid)),
            Some(Gid::from_raw(meta.gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| ctx.io(e))
    }
}

fn times(mtime: Timespec) -> Timestamps {
    Timestamps {
        last_access: mtime,
        last_modification: mtime,
    }
}

fn read_meta<R: Read>(entry: &mut tar::Entry<'_, R>, ctx: &Ctx) -> Result<Meta, UnpackError> {
    let h = entry.header();
    let id = |v: std::io::Result<u64>, what: &str| -> Result<u32, UnpackError> {
        let v = v.map_err(UnpackError::Tar)?;
        u32::try_from(v)
            .ok()
            .filter(|&v| v != u32::MAX)
            .ok_or_else(|| ctx.unsafe_(format!("{what} {v} out of range")))
    };
    let mut meta = Meta {
        uid: id(h.uid(), "uid")?,
        gid: id(h.gid(), "gid")?,
        mode: h.mode().map_err(UnpackError::Tar)? & 0o7777,
        mtime: Timespec {
            tv_sec: i64::try_from(h.mtime().map_err(UnpackError::Tar)?).unwrap_or(0),
            tv_nsec: 0,
        },
        xattrs: Vec::new(),
    };
    let Some(pax) = entry.pax_extensions().map_err(UnpackError::Tar)? else {
        return Ok(meta);
    };
    for ext in pax {
        let ext = ext.map_err(UnpackError::Tar)?;
        let key = ext.key_bytes();
        let value = ext.value_bytes();
        match key {
            b"uid" => meta.uid = id(parse_u64(value, ctx)?, "uid")?,
            b"gid" => meta.gid = id(parse_u64(value, ctx)?, "gid")?,
            b"mtime" => meta.mtime = parse_pax_time(value).unwrap_or(meta.mtime),
            _ => {
                if let Some(name) = key.strip_prefix(PAX_XATTR_PREFIX) {
                    if !name.starts_with(OVERLAY_XATTR_PREFIX) && !name.is_empty() {
                        meta.xattrs
                            .push((OsStr::from_bytes(name).to_os_string(), value.to_vec()));
                    }
                }
            }
        }
    }
    Ok(meta)
}

fn parse_u64(value: &[u8], ctx: &Ctx) -> Result<std::io::Result<u64>, UnpackError> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .map(Ok)
        .ok_or_else(|| ctx.unsafe_("invalid PAX uid/gid"))
}

/// PAX times are decimal seconds with an optional fraction ("1700000000.5").
fn parse_pax_time(value: &[u8]) -> Option<Timespec> {
    let s = std::str::from_utf8(value).ok()?;
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let tv_sec = secs.parse::<i64>().ok()?;
    let digits: String = frac.chars().take(9).collect();
    let tv_nsec = if digits.is_empty() {
        0
    } else {
        if !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        format!("{digits:0<9}").parse::<i64>().ok()?
    };
    // Negative fractional times are rare enough to drop the fraction.
    Some(Timespec {
        tv_sec,
        tv_nsec: if tv_sec < 0 { 0 } else { tv_nsec },
    })
}

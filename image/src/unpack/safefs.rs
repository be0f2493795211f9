//! Filesystem primitives relative to directory fds that never follow symlinks.
//!
//! Paths handed in here are single names or component lists from
//! [`super::path::components`] (no `..`, no `/`). Each component is opened with
//! `O_NOFOLLOW | O_DIRECTORY`, so a symlink anywhere on the way fails with `ELOOP`
//! instead of being followed: the same guarantee as `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS)`, and it also works on kernels without `openat2`.

use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// Opens the child directory `name` of `dir`, refusing symlinks (`ELOOP`).
pub(crate) fn open_dir_at(dir: BorrowedFd<'_>, name: &OsStr) -> Result<OwnedFd, Errno> {
    rustix::fs::openat(dir, name, DIR_FLAGS, Mode::empty())
}

/// Opens `root/<comps...>` as a directory, creating missing components (mode 0755)
/// when `create` is set.
pub(crate) fn walk_dirs(
    root: BorrowedFd<'_>,
    comps: &[&OsStr],
    create: bool,
) -> Result<OwnedFd, Errno> {
    let mut cur = rustix::fs::openat(root, ".", DIR_FLAGS, Mode::empty())?;
    for comp in comps {
        let next = match open_dir_at(cur.as_fd(), comp) {
            Err(Errno::NOENT) if create => {
                match rustix::fs::mkdirat(cur.as_fd(), *comp, Mode::from_raw_mode(0o755)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(e),
                }
                open_dir_at(cur.as_fd(), comp)?
            }
            other => other?,
        };
        cur = next;
    }
    Ok(cur)
}

/// File type of `dir/name` without following a symlink; `None` if absent.
pub(crate) fn file_type_at(dir: BorrowedFd<'_>, name: &OsStr) -> Result<Option<FileType>, Errno> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(FileType::from_raw_mode(st.st_mode))),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Removes `dir/name` whatever it is (a directory with all its contents); absent is
/// fine. Returns whether a directory was removed.
pub(crate) fn remove_at(dir: BorrowedFd<'_>, name: &OsStr) -> Result<bool, Errno> {
    match file_type_at(dir, name)? {
        None => Ok(false),
        Some(FileType::Directory) => {
            remove_dir_contents(open_dir_at(dir, name)?)?;
            rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)?;
            Ok(true)
        }
        Some(_) => {
            rustix::fs::unlinkat(dir, name, AtFlags::empty())?;
            Ok(false)
        }
    }
}

fn remove_dir_contents(fd: OwnedFd) -> Result<(), Errno> {
    let mut names = Vec::new();
    for entry in rustix::fs::Dir::read_from(&fd)? {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(std::ffi::OsString::from(
                <OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(name),
            ));
        }
    }
    for name in names {
        remove_at(fd.as_fd(), &name)?;
    }
    Ok(())
}

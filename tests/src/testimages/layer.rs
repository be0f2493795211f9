//! Layer tars built in memory, with fixed timestamps so images are reproducible.

use anyhow::Context;
use sha2::{Digest, Sha256};
use std::io::Write;
use tar::{EntryType, Header};

/// Every entry's mtime: identical inputs give identical digests.
pub const MTIME: u64 = 1_700_000_000;

/// `"sha256:<hex>"` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerCompression {
    /// Plain tar.
    None,
    /// gzip.
    Gzip,
    /// zstd.
    Zstd,
}

impl LayerCompression {
    /// The OCI layer media type.
    pub fn media_type(self) -> &'static str {
        match self {
            LayerCompression::None => "application/vnd.oci.image.layer.v1.tar",
            LayerCompression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            LayerCompression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }
}

/// A finished layer blob.
#[derive(Debug, Clone)]
pub struct Layer {
    /// Media type for the manifest.
    pub media_type: &'static str,
    /// The (compressed) blob.
    pub data: Vec<u8>,
    /// Digest of `data`.
    pub digest: String,
    /// Digest of the uncompressed tar (the config's `rootfs.diff_ids`).
    pub diff_id: String,
}

impl Layer {
    /// Compresses a tar into a layer blob.
    pub fn new(tar: Vec<u8>, compression: LayerCompression) -> anyhow::Result<Self> {
        let diff_id = sha256_digest(&tar);
        let data = match compression {
            LayerCompression::None => tar,
            LayerCompression::Gzip => {
                let mut enc =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                enc.write_all(&tar)?;
                enc.finish()?
            }
            LayerCompression::Zstd => zstd::encode_all(&tar[..], 3).context("zstd")?,
        };
        Ok(Self {
            media_type: compression.media_type(),
            digest: sha256_digest(&data),
            data,
            diff_id,
        })
    }
}

/// Builds one layer tar. Paths are written verbatim into the header (no checks),
/// so hostile entries can be made too.
pub struct TarBuilder {
    inner: tar::Builder<Vec<u8>>,
}

impl Default for TarBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl TarBuilder {
    /// An empty tar.
    pub fn new() -> Self {
        Self {
            inner: tar::Builder::new(Vec::new()),
        }
    }

    /// Appends an entry with raw `path` and optional link target.
    #[allow(clippy::too_many_arguments)]
    pub fn entry(
        &mut self,
        path: &str,
        kind: EntryType,
        link: Option<&str>,
        data: &[u8],
        mode: u32,
        uid: u64,
        gid: u64,
    ) -> anyhow::Result<&mut Self> {
        let mut h = Header::new_gnu();
        if path.len() >= 100 {
            // Long names need a GNU long-name entry; set_path writes one.
            h.set_path(path)?;
        } else {
            let name = &mut h.as_gnu_mut().context("gnu header")?.name;
            name[..path.len()].copy_from_slice(path.as_bytes());
        }
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_mtime(MTIME);
        if let Some(link) = link {
            h.set_link_name_literal(link)?;
        }
        h.set_cksum();
        self.inner.append(&h, data)?;
        Ok(self)
    }

    /// A directory owned by root.
    pub fn dir(&mut self, path: &str, mode: u32) -> anyhow::Result<&mut Self> {
        self.entry(path, EntryType::Directory, None, b"", mode, 0, 0)
    }

    /// A regular file owned by root.
    pub fn file(&mut self, path: &str, data: &[u8], mode: u32) -> anyhow::Result<&mut Self> {
        self.entry(path, EntryType::Regular, None, data, mode, 0, 0)
    }

    /// A symlink.
    pub fn symlink(&mut self, path: &str, target: &str) -> anyhow::Result<&mut Self> {
        self.entry(path, EntryType::Symlink, Some(target), b"", 0o777, 0, 0)
    }

    /// A hard link to an earlier entry.
    pub fn hardlink(&mut self, path: &str, target: &str) -> anyhow::Result<&mut Self> {
        self.entry(path, EntryType::Link, Some(target), b"", 0o644, 0, 0)
    }

    /// The tar bytes.
    pub fn finish(self) -> anyhow::Result<Vec<u8>> {
        Ok(self.inner.into_inner()?)
    }
}

/// Applets linked into the busybox image's `/bin`, beyond those the tests name.
fn busybox_applets() -> anyhow::Result<Vec<String>> {
    let out = std::process::Command::new(super::BUSYBOX)
        .arg("--list")
        .output()
        .with_context(|| format!("{} --list", super::BUSYBOX))?;
    anyhow::ensure!(out.status.success(), "busybox --list failed");
    let mut applets: Vec<String> = String::from_utf8(out.stdout)?
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "busybox" && !a.contains('/'))
        .map(str::to_owned)
        .collect();
    applets.sort();
    applets.dedup();
    Ok(applets)
}

/// Adds a minimal busybox rootfs: `/bin/busybox` with applet symlinks, passwd and
/// group with `root` and `vessel` (1000:1000), `/tmp`, `/root`, `/home/vessel`, and
/// empty mount points.
pub fn add_busybox_rootfs(b: &mut TarBuilder) -> anyhow::Result<()> {
    let busybox = std::fs::read(super::BUSYBOX)
        .with_context(|| format!("read {} (apt install busybox-static)", super::BUSYBOX))?;
    for d in ["bin/", "etc/", "dev/", "proc/", "sys/", "home/", "var/"] {
        b.dir(d, 0o755)?;
    }
    b.dir("tmp/", 0o1777)?;
    b.dir("root/", 0o700)?;
    b.entry(
        "home/vessel/",
        EntryType::Directory,
        None,
        b"",
        0o755,
        1000,
        1000,
    )?;
    b.file("bin/busybox", &busybox, 0o755)?;
    for applet in busybox_applets()? {
        b.symlink(&format!("bin/{applet}"), "busybox")?;
    }
    b.file(
        "etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\n\
          vessel:x:1000:1000:vessel:/home/vessel:/bin/sh\n\
          nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        0o644,
    )?;
    b.file(
        "etc/group",
        b"root:x:0:\nvessel:x:1000:\nnogroup:x:65534:\n",
        0o644,
    )?;
    Ok(())
}

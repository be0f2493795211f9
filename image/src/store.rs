//! [`ImageStore`]: images on disk (content + snapshots) and their records in redb.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use vessel_storage::{disk_usage, Snapshotter};

use crate::content::ContentStore;
use crate::meta::{Meta, Record};
use crate::pull::LayerFuture;
use crate::reference::ImageRef;
use crate::{Image, ImageError};

/// Where and how images are kept.
#[derive(Debug, Clone)]
pub struct ImageStoreConfig {
    /// Persistent root: blobs in `root/content`, snapshots in `root/snapshots`.
    pub root: PathBuf,
    /// containerd-style registry host config (`<certs_dir>/<host>/hosts.toml`).
    pub certs_dir: PathBuf,
    /// Most layer blobs downloaded at once (over all pulls).
    pub max_concurrent_downloads: usize,
    /// How slow a registry may be before a download is given up.
    pub download_limits: DownloadLimits,
    /// How large an image may be (layers, unpacked bytes, entries).
    pub limits: ImageLimits,
}

/// Caps on what one pull may bring onto the node: a layer compresses freely (20 MiB
/// of gzip inflate to 20 GiB of zeros), so the compressed sizes a manifest declares
/// bound nothing on disk. A pull over a cap fails as soon as it is crossed
/// ([`crate::ImageError::LimitExceeded`], InvalidArgument), with nothing of the
/// layer being unpacked left on disk. The defaults are far above any real image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLimits {
    /// Most bytes the layers one pull unpacks may hold together (file content, sparse
    /// holes included, and xattrs); default 64 GiB. Config key
    /// `image.max_unpacked_bytes`.
    pub max_unpacked_bytes: u64,
    /// Most tar entries (files, directories, links, whiteouts, ...) in the layers one
    /// pull unpacks, together; default 4,000,000. Config key `image.max_image_entries`.
    pub max_image_entries: u64,
    /// Most layers an image's manifest may list, checked before any blob is fetched;
    /// default 500, overlayfs' maximum stack of lower layers (`OVL_MAX_STACK`).
    /// Config key `image.max_layers`.
    pub max_layers: usize,
}

impl ImageLimits {
    /// Default of [`ImageLimits::max_unpacked_bytes`].
    pub const DEFAULT_MAX_UNPACKED_BYTES: u64 = crate::unpack::UnpackLimits::DEFAULT_MAX_BYTES;
    /// Default of [`ImageLimits::max_image_entries`].
    pub const DEFAULT_MAX_IMAGE_ENTRIES: u64 = crate::unpack::UnpackLimits::DEFAULT_MAX_ENTRIES;
    /// Default of [`ImageLimits::max_layers`]: overlayfs' `OVL_MAX_STACK`.
    pub const DEFAULT_MAX_LAYERS: usize = 500;
    /// Config key of [`ImageLimits::max_unpacked_bytes`], named in errors.
    pub const MAX_UNPACKED_BYTES_KEY: &'static str = "image.max_unpacked_bytes";
    /// Config key of [`ImageLimits::max_image_entries`], named in errors.
    pub const MAX_IMAGE_ENTRIES_KEY: &'static str = "image.max_image_entries";
    /// Config key of [`ImageLimits::max_layers`], named in errors.
    pub const MAX_LAYERS_KEY: &'static str = "image.max_layers";
}

impl Default for ImageLimits {
    fn default() -> Self {
        ImageLimits {
            max_unpacked_bytes: Self::DEFAULT_MAX_UNPACKED_BYTES,
            max_image_entries: Self::DEFAULT_MAX_IMAGE_ENTRIES,
            max_layers: Self::DEFAULT_MAX_LAYERS,
        }
    }
}

/// A download slower than `min_rate` bytes/s over any `window` (counted in
/// consecutive windows from its start) fails, and so does a manifest fetch that takes
/// longer than two windows: one slow registry must not hold the node's download
/// permits, or a pull, forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DownloadLimits {
    /// Least average bytes per second over a window; 0 disables the check.
    pub min_rate: u64,
    /// Window the rate is averaged over.
    pub window: std::time::Duration,
}

impl Default for DownloadLimits {
    fn default() -> Self {
        DownloadLimits {
            min_rate: 10 * 1024,
            window: std::time::Duration::from_secs(30),
        }
    }
}

/// Disk used by images.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsUsage {
    /// Mount point of the filesystem holding `root`.
    pub mountpoint: PathBuf,
    /// Bytes allocated under `root/content` and `root/snapshots`.
    pub used_bytes: u64,
    /// Inodes used there.
    pub inodes_used: u64,
}

/// Counters of work done by pulls since the store was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PullStats {
    /// Blobs (config and layers) fetched from a registry.
    pub blobs_downloaded: u64,
    /// Bytes of those blobs.
    pub bytes_downloaded: u64,
    /// Layers unpacked into new snapshots.
    pub layers_unpacked: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub blobs: AtomicU64,
    pub bytes: AtomicU64,
    pub layers: AtomicU64,
}

/// Blobs and snapshots in use by pulls that have not written their record yet;
/// GC must keep them.
#[derive(Default)]
pub(crate) struct Leases {
    blobs: HashMap<String, usize>,
    chains: HashMap<String, usize>,
}

pub(crate) struct Inner {
    pub cfg: ImageStoreConfig,
    pub meta: Meta,
    pub content: ContentStore,
    pub snapshots: Snapshotter,
    pub downloads: tokio::sync::Semaphore,
    pub leases: Mutex<Leases>,
    pub inflight: Mutex<HashMap<String, LayerFuture>>,
    pub counters: Counters,
}

/// Locks ignoring poison: the protected maps stay consistent across a panic.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Keeps blobs and snapshots of one pull from GC until dropped.
pub(crate) struct Lease {
    inner: Arc<Inner>,
    blobs: Vec<String>,
    chains: Vec<String>,
}

impl Lease {
    pub(crate) fn new(inner: Arc<Inner>) -> Self {
        Lease {
            inner,
            blobs: Vec::new(),
            chains: Vec::new(),
        }
    }

    pub(crate) fn add(&mut self, blobs: &[String], chains: &[String]) {
        let mut l = lock(&self.inner.leases);
        for b in blobs {
            *l.blobs.entry(b.clone()).or_default() += 1;
            self.blobs.push(b.clone());
        }
        for c in chains {
            *l.chains.entry(c.clone()).or_default() += 1;
            self.chains.push(c.clone());
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut l = lock(&self.inner.leases);
        let release = |map: &mut HashMap<String, usize>, key: &String| {
            if let Some(n) = map.get_mut(key) {
                *n -= 1;
                if *n == 0 {
                    map.remove(key);
                }
            }
        };
        for b in &self.blobs {
            release(&mut l.blobs, b);
        }
        for c in &self.chains {
            release(&mut l.chains, c);
        }
    }
}

/// How a name matched an image.
#[derive(Debug, PartialEq, Eq)]
enum Match {
    Id,
    Tag(String),
    Digest,
}

fn is_hex(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Finds the record `name` designates: full id, tag or repo digest, else an
/// unambiguous id prefix.
fn find(records: &[Record], name: &str) -> Option<(usize, Match)> {
    let hex = name.strip_prefix("sha256:").unwrap_or(name);
    if hex.len() == 64 && is_hex(hex) {
        let id = format!("sha256:{hex}");
        return records
            .iter()
            .position(|r| r.id == id)
            .map(|i| (i, Match::Id));
    }
    if let Ok(r) = ImageRef::parse(name) {
        let found = match &r.digest {
            Some(d) => {
                let want = r.with_digest(d);
                records
                    .iter()
                    .position(|rec| rec.repo_digests.contains(&want))
                    .map(|i| (i, Match::Digest))
            }
            None => {
                let want = r.to_string();
                records
                    .iter()
                    .position(|rec| rec.repo_tags.contains(&want))
                    .map(|i| (i, Match::Tag(want)))
            }
        };
        if found.is_some() {
            return found;
        }
    }
    if is_hex(hex) {
        let mut hits = records.iter().enumerate().filter(|(_, r)| {
            r.id.strip_prefix("sha256:")
                .is_some_and(|h| h.starts_with(hex))
        });
        if let (Some((i, _)), None) = (hits.next(), hits.next()) {
            return Some((i, Match::Id));
        }
    }
    None
}

/// Creates `dir` (and its parents) and makes it mode 0700, also when it existed.
fn private_dir(dir: &std::path::Path) -> Result<(), ImageError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)))
        .map_err(ImageError::io(format!("create {}", dir.display())))
}

/// The image store. Cheap to clone.
#[derive(Clone)]
pub struct ImageStore {
    pub(crate) inner: Arc<Inner>,
}

impl ImageStore {
    /// Opens the store, cleans leftovers of interrupted pulls and collects garbage.
    pub fn open(
        cfg: ImageStoreConfig,
        db: Arc<vessel_storage::db::Db>,
    ) -> Result<Self, ImageError> {
        // Private: snapshots hold layers' setuid binaries and device nodes, which no
        // other host user may reach.
        for dir in [
            cfg.root.clone(),
            cfg.root.join("content"),
            cfg.root.join("snapshots"),
        ] {
            private_dir(&dir)?;
        }
        let content =
            ContentStore::open(&cfg.root.join("content"))?.with_limits(cfg.download_limits);
        let snapshots = Snapshotter::open(&cfg.root.join("snapshots"))?;
        let meta = Meta::open(db)?;
        let store = ImageStore {
            inner: Arc::new(Inner {
                downloads: tokio::sync::Semaphore::new(cfg.max_concurrent_downloads.max(1)),
                cfg,
                meta,
                content,
                snapshots,
                leases: Mutex::default(),
                inflight: Mutex::default(),
                counters: Counters::default(),
            }),
        };
        store.gc()?;
        Ok(store)
    }

    /// The configuration the store was opened with.
    pub fn config(&self) -> &ImageStoreConfig {
        &self.inner.cfg
    }

    /// All images, sorted by id.
    pub fn list(&self) -> Result<Vec<Image>, ImageError> {
        self.inner.meta.images()
    }

    /// Finds an image by id (full or unambiguous hex prefix), tag or repo digest.
    pub fn resolve(&self, name: &str) -> Result<Option<Image>, ImageError> {
        let images = self.inner.meta.images()?;
        let records: Vec<Record> = images.iter().map(record_of).collect();
        Ok(find(&records, name).map(|(i, _)| images[i].clone()))
    }

    /// Removes by id, tag or digest. A tag shared with other tags only loses that tag.
    /// `Ok(false)` if nothing matched.
    pub fn remove(&self, name: &str) -> Result<bool, ImageError> {
        self.remove_unless_used(name, |_| None)
    }

    /// Like [`ImageStore::remove`], but an image (not just one of several tags) is
    /// removed only if `user_of(image id)` names no user; otherwise
    /// [`ImageError::InUse`] and nothing changes.
    pub fn remove_unless_used(
        &self,
        name: &str,
        user_of: impl Fn(&str) -> Option<String>,
    ) -> Result<bool, ImageError> {
        let removed_image = self.inner.meta.write(|txn| {
            let records = txn.all()?;
            let Some((i, how)) = find(&records, name) else {
                return Ok(None);
            };
            let mut rec = records[i].clone();
            match how {
                Match::Tag(tag) if rec.repo_tags.len() > 1 => {
                    rec.repo_tags.retain(|t| *t != tag);
                    txn.put(&rec, None)?;
                    Ok(Some(false))
                }
                _ => {
                    if let Some(user) = user_of(&rec.id) {
                        return Err(ImageError::InUse {
                            image: rec.id.clone(),
                            user,
                        });
                    }
                    txn.delete(&rec.id)?;
                    Ok(Some(true))
                }
            }
        })?;
        match removed_image {
            None => Ok(false),
            Some(whole) => {
                if whole {
                    self.gc()?;
                }
                Ok(true)
            }
        }
    }

    /// Bytes and inodes used by `root/content` and `root/snapshots`.
    pub fn fs_usage(&self) -> Result<FsUsage, ImageError> {
        let (cb, ci) = disk_usage(self.inner.content.root())?;
        let (sb, si) = self.inner.snapshots.usage()?;
        let mountpoint = crate::mounts::mount_point(&self.inner.cfg.root).map_err(
            ImageError::io(format!("mount point of {}", self.inner.cfg.root.display())),
        )?;
        Ok(FsUsage {
            mountpoint,
            used_bytes: cb + sb,
            inodes_used: ci + si,
        })
    }

    /// Snapshot directories of the image's layers, bottom to top.
    pub fn layer_paths(&self, image: &Image) -> Result<Vec<PathBuf>, ImageError> {
        image
            .chain_ids
            .iter()
            .map(|c| {
                if self.inner.snapshots.exists(c) {
                    Ok(self.inner.snapshots.path(c))
                } else {
                    Err(ImageError::NotFound(format!(
                        "snapshot {c} of image {}",
                        image.id
                    )))
                }
            })
            .collect()
    }

    /// Removes blobs and snapshots that no image (and no running pull) references.
    pub fn gc(&self) -> Result<(), ImageError> {
        // Held throughout so no pull can start using something being deleted.
        let leases = lock(&self.inner.leases);
        let records = self.inner.meta.records()?;
        let mut blobs: HashSet<&str> = leases.blobs.keys().map(String::as_str).collect();
        let mut chains: HashSet<&str> = leases.chains.keys().map(String::as_str).collect();
        for r in &records {
            blobs.extend(r.blobs.iter().map(String::as_str));
            chains.extend(r.chain_ids.iter().map(String::as_str));
        }
        for d in self.inner.content.list()? {
            if !blobs.contains(d.as_str()) {
                tracing::debug!(blob = %d, "gc: removing blob");
                self.inner.content.remove(&d)?;
            }
        }
        for c in self.inner.snapshots.list()? {
            if !chains.contains(c.as_str()) {
                tracing::debug!(snapshot = %c, "gc: removing snapshot");
                self.inner.snapshots.remove(&c)?;
            }
        }
        Ok(())
    }

    /// Work done by pulls since open (downloads, unpacks).
    pub fn stats(&self) -> PullStats {
        let c = &self.inner.counters;
        PullStats {
            blobs_downloaded: c.blobs.load(Ordering::Relaxed),
            bytes_downloaded: c.bytes.load(Ordering::Relaxed),
            layers_unpacked: c.layers.load(Ordering::Relaxed),
        }
    }
}

fn record_of(i: &Image) -> Record {
    Record {
        id: i.id.clone(),
        repo_tags: i.repo_tags.clone(),
        repo_digests: i.repo_digests.clone(),
        size: i.size,
        user: i.user.clone(),
        chain_ids: i.chain_ids.clone(),
        blobs: Vec::new(),
        pinned: i.pinned,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id_char: char, tags: &[&str], digests: &[&str]) -> Record {
        Record {
            id: format!("sha256:{}", id_char.to_string().repeat(64)),
            repo_tags: tags.iter().map(|s| s.to_string()).collect(),
            repo_digests: digests.iter().map(|s| s.to_string()).collect(),
            size: 0,
            user: String::new(),
            chain_ids: vec![],
            blobs: vec![],
            pinned: false,
        }
    }

    #[test]
    fn find_by_id_tag_digest_and_prefix() {
        let d = format!("sha256:{}", "d".repeat(64));
        let records = vec![
            rec('a', &["docker.io/library/busybox:latest"], &[]),
            rec('b', &["quay.io/x/y:1"], &[&format!("quay.io/x/y@{d}")]),
        ];
        let a = records[0].id.clone();
        assert_eq!(find(&records, &a), Some((0, Match::Id)));
        assert_eq!(find(&records, &a[7..]), Some((0, Match::Id)));
        assert_eq!(find(&records, "aaaa"), Some((0, Match::Id)));
        assert_eq!(find(&records, "sha256:bb"), Some((1, Match::Id)));
        assert_eq!(
            find(&records, "busybox"),
            Some((0, Match::Tag("docker.io/library/busybox:latest".into())))
        );
        assert_eq!(
            find(&records, &format!("quay.io/x/y@{d}")),
            Some((1, Match::Digest))
        );
        assert_eq!(find(&records, "quay.io/x/y:2"), None);
        assert_eq!(find(&records, "c"), None);
        assert_eq!(find(&records, &format!("sha256:{}", "c".repeat(64))), None);
        // Ambiguous prefix matches nothing.
        let records = vec![rec('a', &[], &[]), rec('a', &[], &[])];
        assert_eq!(find(&records, "a"), None);
    }
}

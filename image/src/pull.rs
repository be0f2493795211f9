//! Pulling: resolve the manifest (linux/amd64 out of an index), fetch the config,
//! download and unpack layers in parallel, then record the image in one transaction.

use std::io::Read;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures::future::{BoxFuture, FutureExt, Shared};
use futures::StreamExt;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use crate::content::{digest_hex, sha256_digest};
use crate::meta::Record;
use crate::reference::ImageRef;
use crate::registry::{Registry, MAX_MANIFEST_BYTES};
use crate::store::{lock, Inner, Lease};
use crate::unpack::{
    unpack_layer_within, Compression, Limit, UnpackBudget, UnpackError, UnpackLimits,
};
use crate::{Image, ImageError, ImageLimits, ImageStore, RegistryAuth};

/// A layer being fetched and unpacked, awaited by every pull that needs it.
pub(crate) type LayerFuture = Shared<BoxFuture<'static, Result<(), ImageError>>>;

/// Largest image config accepted.
const MAX_CONFIG_BYTES: i64 = 8 << 20;

#[derive(Deserialize, Clone, Debug)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    #[serde(default)]
    media_type: String,
    digest: String,
    size: i64,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize, Clone, Debug)]
struct Platform {
    architecture: String,
    os: String,
}

/// The fields of a manifest or index this runtime uses.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ManifestDoc {
    schema_version: Option<i64>,
    #[serde(default)]
    media_type: Option<String>,
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    manifests: Option<Vec<Descriptor>>,
}

/// The fields of an image config this runtime uses.
#[derive(Deserialize)]
struct ConfigDoc {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    config: Option<ConfigUser>,
    rootfs: RootFs,
}

#[derive(Deserialize)]
struct ConfigUser {
    #[serde(rename = "User", default)]
    user: Option<String>,
}

#[derive(Deserialize)]
struct RootFs {
    diff_ids: Vec<String>,
}

fn parse_manifest(body: &[u8], what: &str) -> Result<ManifestDoc, ImageError> {
    let doc: ManifestDoc = serde_json::from_slice(body)
        .map_err(|e| ImageError::Registry(format!("{what}: unparsable manifest: {e}")))?;
    if doc.schema_version != Some(2) {
        return Err(ImageError::Unsupported(format!(
            "{what}: manifest schema version {:?}",
            doc.schema_version
        )));
    }
    Ok(doc)
}

/// What `pull` does with manifest/index and config bytes, for the fuzz tests.
#[cfg(test)]
pub(crate) fn fuzz_parse(body: &[u8]) -> Result<(), ImageError> {
    if let Ok(doc) = parse_manifest(body, "fuzz") {
        let _ = is_index(&doc);
        for d in doc.layers.iter().chain(doc.config.iter()) {
            let _ = digest_hex(&d.digest);
        }
    }
    let config: ConfigDoc = serde_json::from_slice(body)
        .map_err(|e| ImageError::Registry(format!("bad image config: {e}")))?;
    let _ = chain_ids(&config.rootfs.diff_ids);
    Ok(())
}

/// Chain ids from diff ids: `chain[0] = diff[0]`,
/// `chain[i] = sha256(chain[i-1] + " " + diff[i])`.
pub(crate) fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => sha256_digest(format!("{prev} {d}").as_bytes()),
        };
        out.push(next);
    }
    out
}

/// Everything needed to produce one layer's snapshot.
#[derive(Clone)]
struct LayerJob {
    chain_id: String,
    diff_id: String,
    blob: Descriptor,
}

/// A reader that hashes what passes through it.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

fn map_unpack(digest: &str, e: UnpackError) -> ImageError {
    match e {
        UnpackError::Unsafe { path, reason } => ImageError::UnsafeLayer {
            digest: digest.to_owned(),
            reason: format!("{path}: {reason}"),
        },
        UnpackError::UnsupportedMediaType(mt) => {
            ImageError::Unsupported(format!("layer {digest} media type {mt}"))
        }
        UnpackError::Io { path, source } => ImageError::Io {
            context: format!("unpacking {path:?} of layer {digest}"),
            source: Arc::new(source),
        },
        UnpackError::TooLarge(e) => ImageError::UnsafeLayer {
            digest: digest.to_owned(),
            reason: e.to_string(),
        },
        UnpackError::Tar(e) => ImageError::UnsafeLayer {
            digest: digest.to_owned(),
            reason: format!("malformed layer: {e}"),
        },
        UnpackError::LimitExceeded { what, limit } => {
            let (counted, key) = match what {
                Limit::Bytes => (
                    "the content unpacked from its layers",
                    ImageLimits::MAX_UNPACKED_BYTES_KEY,
                ),
                Limit::Entries => (
                    "the number of entries (files, directories, links, ...) in its layers",
                    ImageLimits::MAX_IMAGE_ENTRIES_KEY,
                ),
            };
            ImageError::LimitExceeded {
                // `pull` puts the image in front.
                subject: format!("layer {digest}"),
                what: counted.to_owned(),
                limit,
                unit: what.unit(),
                key,
            }
        }
    }
}

/// Refuses a manifest listing more than `max` layers, before anything is fetched
/// for it: overlayfs cannot stack more than 500 anyway.
fn check_layer_count(image: &ImageRef, layers: usize, max: usize) -> Result<(), ImageError> {
    if layers > max {
        return Err(ImageError::LimitExceeded {
            subject: format!("image {image}"),
            what: format!("its layer count ({layers})"),
            limit: max as u64,
            unit: "layers",
            key: ImageLimits::MAX_LAYERS_KEY,
        });
    }
    Ok(())
}

/// The budget of one pull: all its layers draw from it.
fn pull_budget(limits: &ImageLimits) -> UnpackBudget {
    UnpackBudget::new(UnpackLimits {
        max_bytes: limits.max_unpacked_bytes,
        max_entries: limits.max_image_entries,
    })
}

/// Unpacks the stored blob of `job` into a new snapshot, checking the uncompressed
/// stream against the diff id: snapshots are shared by chain id across images, so
/// one must hold exactly what its id says.
///
/// On error the pending snapshot is dropped here, which removes all it holds.
fn unpack_blob(
    inner: &Inner,
    job: &LayerJob,
    compression: Compression,
    budget: &UnpackBudget,
) -> Result<(), ImageError> {
    let digest = &job.blob.digest;
    let path = inner.content.path(digest)?;
    let file =
        std::fs::File::open(&path).map_err(ImageError::io(format!("open {}", path.display())))?;
    let buf = std::io::BufReader::with_capacity(1 << 20, file);
    let decoded: Box<dyn Read> = match compression {
        Compression::None => Box::new(buf),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(buf)),
        Compression::Zstd => Box::new(
            zstd::stream::read::Decoder::with_buffer(buf)
                .map_err(ImageError::io(format!("zstd {digest}")))?,
        ),
    };
    let mut reader = HashingReader {
        inner: decoded,
        hasher: Sha256::new(),
    };
    let pending = inner.snapshots.prepare(&job.chain_id)?;
    unpack_layer_within(&mut reader, Compression::None, pending.path(), budget)
        .map_err(|e| map_unpack(digest, e))?;
    // The tar reader stops at the end-of-archive marker; the diff id covers the rest.
    std::io::copy(&mut reader, &mut std::io::sink()).map_err(|e| ImageError::UnsafeLayer {
        digest: digest.clone(),
        reason: format!("decompressing: {e}"),
    })?;
    let actual = format!("sha256:{}", hex::encode(reader.hasher.finalize()));
    if actual != job.diff_id {
        return Err(ImageError::DigestMismatch {
            expected: job.diff_id.clone(),
            actual,
        });
    }
    pending.commit()?;
    Ok(())
}

impl Inner {
    /// Bytes the snapshots of `chains` take on disk, as `du` counts them.
    fn snapshot_bytes(&self, chains: &[String]) -> Result<u64, ImageError> {
        let mut total = 0;
        for c in chains {
            total += vessel_storage::disk_usage(&self.snapshots.path(c))?.0;
        }
        Ok(total)
    }

    /// Downloads (unless stored) and unpacks one layer within `budget`. Once the
    /// budget is exhausted (by another layer of the pull), it stops: its download at
    /// the next chunk, before unpacking, or mid-unpack at the next chunk or entry.
    async fn fetch_and_unpack(
        self: &Arc<Self>,
        registry: &Registry,
        job: LayerJob,
        budget: UnpackBudget,
    ) -> Result<(), ImageError> {
        if self.snapshots.exists(&job.chain_id) {
            return Ok(());
        }
        let digest = job.blob.digest.clone();
        let compression = Compression::from_media_type(&job.blob.media_type)
            .map_err(|e| map_unpack(&digest, e))?;
        let exhausted = |budget: &UnpackBudget| budget.exceeded().map(|e| map_unpack(&digest, e));
        if let Some(e) = exhausted(&budget) {
            return Err(e);
        }
        if !self.content.exists(&digest) {
            let _permit = self
                .downloads
                .acquire()
                .await
                .map_err(|e| ImageError::Store(e.to_string()))?;
            let stream = registry.blob_stream(&digest).await?;
            // Ends the download (ingest removes its file) once the budget is gone.
            let b = budget.clone();
            let stream = stream
                .map(move |chunk| match b.exceeded() {
                    None => chunk,
                    Some(e) => Err(std::io::Error::other(e)),
                })
                .boxed();
            let size = u64::try_from(job.blob.size).ok();
            let n = self
                .content
                .ingest(&digest, size, stream)
                .await
                .map_err(|e| exhausted(&budget).unwrap_or(e))?;
            self.counters.blobs.fetch_add(1, Ordering::Relaxed);
            self.counters.bytes.fetch_add(n, Ordering::Relaxed);
        }
        if let Some(e) = exhausted(&budget) {
            return Err(e);
        }
        let this = self.clone();
        tokio::task::spawn_blocking(move || unpack_blob(&this, &job, compression, &budget))
            .await
            .map_err(|e| ImageError::Store(format!("unpack task: {e}")))??;
        self.counters.layers.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Runs `work` as its own task, shared by every caller asking for `key` while it
    /// runs, unless `done()` says the result already exists. Being a task, a cancelled
    /// pull does not abort a download others wait for. The flag says whether this
    /// call started the task (rather than joining one, or finding it done).
    fn shared_task<F>(
        self: &Arc<Self>,
        key: String,
        done: impl FnOnce() -> bool,
        work: F,
    ) -> (LayerFuture, bool)
    where
        F: std::future::Future<Output = Result<(), ImageError>> + Send + 'static,
    {
        let mut inflight = lock(&self.inflight);
        if let Some(f) = inflight.get(&key) {
            return (f.clone(), false);
        }
        // Checked under the lock: a finished task publishes its result before it
        // leaves the map.
        if done() {
            return (futures::future::ready(Ok(())).boxed().shared(), false);
        }
        let this = self.clone();
        let k = key.clone();
        let task = tokio::spawn(async move {
            let res = work.await;
            lock(&this.inflight).remove(&k);
            res
        });
        let fut = async move {
            task.await
                .unwrap_or_else(|e| Err(ImageError::Store(format!("pull task: {e}"))))
        }
        .boxed()
        .shared();
        inflight.insert(key, fut.clone());
        (fut, true)
    }

    /// The shared future producing `job`'s snapshot (keyed by chain id), and whether
    /// this call started it (then it draws from `budget`; a pull joining a running
    /// unpack of the same chain id shares the budget of the pull that started it).
    fn layer_future(
        self: &Arc<Self>,
        registry: Arc<Registry>,
        job: LayerJob,
        budget: &UnpackBudget,
    ) -> (LayerFuture, bool) {
        let this = self.clone();
        let chain = job.chain_id.clone();
        let budget = budget.clone();
        self.shared_task(
            format!("layer {chain}"),
            || self.snapshots.exists(&chain),
            async move { this.fetch_and_unpack(&registry, job, budget).await },
        )
    }

    /// Fetches a small blob (the config) into the content store, once for all
    /// concurrent pulls, and returns it.
    async fn small_blob(
        self: &Arc<Self>,
        registry: Arc<Registry>,
        d: &Descriptor,
    ) -> Result<Vec<u8>, ImageError> {
        digest_hex(&d.digest)?;
        if !(0..=MAX_CONFIG_BYTES).contains(&d.size) {
            return Err(ImageError::Registry(format!(
                "blob {} has size {}",
                d.digest, d.size
            )));
        }
        let this = self.clone();
        let desc = d.clone();
        self.shared_task(
            format!("blob {}", d.digest),
            || self.content.exists(&d.digest),
            async move {
                let stream = registry.blob_stream(&desc.digest).await?;
                let n = this
                    .content
                    .ingest(&desc.digest, Some(desc.size as u64), stream)
                    .await?;
                this.counters.blobs.fetch_add(1, Ordering::Relaxed);
                this.counters.bytes.fetch_add(n, Ordering::Relaxed);
                Ok(())
            },
        )
        .0
        .await?;
        self.content.read(&d.digest)
    }
}

fn is_index(doc: &ManifestDoc) -> bool {
    doc.manifests.is_some()
        || doc
            .media_type
            .as_deref()
            .is_some_and(|m| m.contains("index") || m.contains("list"))
}

/// Checks that `body` hashes to `expected`.
fn verify(body: &[u8], expected: &str) -> Result<(), ImageError> {
    let actual = sha256_digest(body);
    if actual != expected {
        return Err(ImageError::DigestMismatch {
            expected: expected.to_owned(),
            actual,
        });
    }
    Ok(())
}

impl ImageStore {
    /// Pulls (or reuses) and unpacks `reference` (short names allowed).
    pub async fn pull(&self, reference: &str, auth: &RegistryAuth) -> Result<Image, ImageError> {
        let image_ref = ImageRef::parse(reference)?;
        let inner = &self.inner;
        let registry = {
            let certs = inner.cfg.certs_dir.clone();
            let (r, a, l) = (image_ref.clone(), auth.clone(), inner.cfg.download_limits);
            tokio::task::spawn_blocking(move || Registry::new(&certs, &r, &a, &l))
                .await
                .map_err(|e| ImageError::Store(e.to_string()))??
        };
        let registry = Arc::new(registry);
        let mut lease = Lease::new(inner.clone());

        // Top-level manifest: what the tag (or pinned digest) names.
        let body = registry.fetch_manifest(image_ref.object()).await?;
        let top_digest = sha256_digest(&body);
        if let Some(pinned) = &image_ref.digest {
            verify(&body, pinned)?;
        }
        lease.add(std::slice::from_ref(&top_digest), &[]);
        let mut doc = parse_manifest(&body, &image_ref.to_string())?;
        inner.content.write_bytes(&top_digest, &body)?;
        let mut blobs = vec![top_digest.clone()];

        if is_index(&doc) {
            let entry = doc
                .manifests
                .unwrap_or_default()
                .into_iter()
                .find(|m| {
                    m.platform
                        .as_ref()
                        .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
                })
                .ok_or_else(|| {
                    ImageError::NotFound(format!("{image_ref}: no linux/amd64 image in index"))
                })?;
            digest_hex(&entry.digest)?;
            if !(0..=MAX_MANIFEST_BYTES as i64).contains(&entry.size) {
                return Err(ImageError::Registry(format!(
                    "manifest size {}",
                    entry.size
                )));
            }
            let body = registry.fetch_manifest(&entry.digest).await?;
            verify(&body, &entry.digest)?;
            lease.add(std::slice::from_ref(&entry.digest), &[]);
            inner.content.write_bytes(&entry.digest, &body)?;
            blobs.push(entry.digest.clone());
            doc = parse_manifest(&body, &entry.digest)?;
            if is_index(&doc) {
                return Err(ImageError::Unsupported(format!(
                    "{image_ref}: nested image index"
                )));
            }
        }

        // Before anything but the manifest is fetched.
        check_layer_count(&image_ref, doc.layers.len(), inner.cfg.limits.max_layers)?;

        let config_desc = doc
            .config
            .clone()
            .ok_or_else(|| ImageError::Registry(format!("{image_ref}: manifest has no config")))?;
        lease.add(std::slice::from_ref(&config_desc.digest), &[]);
        let config_json = inner.small_blob(registry.clone(), &config_desc).await?;
        blobs.push(config_desc.digest.clone());
        let config: ConfigDoc = serde_json::from_slice(&config_json)
            .map_err(|e| ImageError::Registry(format!("{image_ref}: bad image config: {e}")))?;
        if (!config.os.is_empty() && config.os != "linux")
            || (!config.architecture.is_empty() && config.architecture != "amd64")
        {
            return Err(ImageError::Unsupported(format!(
                "{image_ref} is {}/{}, not linux/amd64",
                config.os, config.architecture
            )));
        }
        if config.rootfs.diff_ids.len() != doc.layers.len() {
            return Err(ImageError::Registry(format!(
                "{image_ref}: {} layers but {} diff ids",
                doc.layers.len(),
                config.rootfs.diff_ids.len()
            )));
        }
        for d in config
            .rootfs
            .diff_ids
            .iter()
            .chain(doc.layers.iter().map(|l| &l.digest))
        {
            digest_hex(d)?;
        }
        let chains = chain_ids(&config.rootfs.diff_ids);
        let layer_digests: Vec<String> = doc.layers.iter().map(|l| l.digest.clone()).collect();
        lease.add(&layer_digests, &chains);
        blobs.extend(layer_digests);

        let jobs = doc
            .layers
            .iter()
            .zip(&config.rootfs.diff_ids)
            .zip(&chains)
            .map(|((blob, diff), chain)| LayerJob {
                chain_id: chain.clone(),
                diff_id: diff.clone(),
                blob: blob.clone(),
            });
        let budget = pull_budget(&inner.cfg.limits);
        let (futures, started): (Vec<LayerFuture>, Vec<bool>) = jobs
            .map(|job| inner.layer_future(registry.clone(), job, &budget))
            .unzip();
        if let Err(e) = futures::future::try_join_all(futures.iter().cloned()).await {
            if budget.exceeded().is_some() {
                // The layers this pull started stop at their next chunk or entry (see
                // `fetch_and_unpack`): wait for them, so that none of their pending
                // snapshots outlives the error.
                let own = futures.into_iter().zip(started).filter(|(_, s)| *s);
                futures::future::join_all(own.map(|(f, _)| f)).await;
            }
            return Err(match e {
                ImageError::LimitExceeded {
                    subject,
                    what,
                    limit,
                    unit,
                    key,
                } => ImageError::LimitExceeded {
                    subject: format!("image {image_ref} (stopped in {subject})"),
                    what,
                    limit,
                    unit,
                    key,
                },
                e => e,
            });
        }

        let id = config_desc.digest.clone();
        // What the image takes on this node (its blobs and unpacked snapshots), which
        // the kubelet's image garbage collection counts on, not what was downloaded.
        let compressed: u64 = doc.layers.iter().map(|l| l.size.max(0) as u64).sum();
        let this = inner.clone();
        let chain_list = chains.clone();
        let unpacked = tokio::task::spawn_blocking(move || this.snapshot_bytes(&chain_list))
            .await
            .map_err(|e| ImageError::Store(format!("image size task: {e}")))??;
        let size = compressed + unpacked;
        let user = config.config.and_then(|c| c.user).unwrap_or_default();
        let tag = image_ref.tagged();
        let repo_digest = image_ref.with_digest(&top_digest);
        let record = inner.meta.write(|txn| {
            let all = txn.all()?;
            // A tag names one image: it moves off whatever image had it before.
            if let Some(tag) = &tag {
                for other in all
                    .iter()
                    .filter(|r| r.id != id && r.repo_tags.contains(tag))
                {
                    let mut other = other.clone();
                    other.repo_tags.retain(|t| t != tag);
                    txn.put(&other, None)?;
                }
            }
            let mut rec = all.into_iter().find(|r| r.id == id).unwrap_or(Record {
                id: id.clone(),
                repo_tags: Vec::new(),
                repo_digests: Vec::new(),
                size,
                user: user.clone(),
                chain_ids: chains.clone(),
                blobs: Vec::new(),
                pinned: false,
            });
            if let Some(tag) = &tag {
                if !rec.repo_tags.contains(tag) {
                    rec.repo_tags.push(tag.clone());
                }
            }
            if !rec.repo_digests.contains(&repo_digest) {
                rec.repo_digests.push(repo_digest.clone());
            }
            for b in &blobs {
                if !rec.blobs.contains(b) {
                    rec.blobs.push(b.clone());
                }
            }
            txn.put(&rec, Some(&config_json))?;
            Ok(rec)
        })?;
        drop(lease);
        tracing::info!(image = %image_ref, id = %record.id, "pulled");
        Ok(record.into_image(config_json))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_oci_definition() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let c = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(c[0], a);
        assert_eq!(c[1], sha256_digest(format!("{a} {b}").as_bytes()));
        assert!(chain_ids(&[]).is_empty());
    }

    #[test]
    fn layer_count_is_capped() {
        let r = ImageRef::parse("example.com/many:1").unwrap();
        check_layer_count(&r, 500, 500).unwrap();
        check_layer_count(&r, 0, 500).unwrap();
        let e = check_layer_count(&r, 501, 500).unwrap_err();
        assert_eq!(e.code(), crate::ErrorCode::InvalidArgument);
        let msg = e.to_string();
        assert!(
            msg.contains("example.com/many:1")
                && msg.contains("(501)")
                && msg.contains("limit of 500 layers")
                && msg.contains("image.max_layers"),
            "{msg}"
        );
    }

    #[test]
    fn unpack_limit_errors_name_the_key() {
        let digest = format!("sha256:{}", "c".repeat(64));
        for (what, key, unit) in [
            (Limit::Bytes, "image.max_unpacked_bytes", "bytes"),
            (Limit::Entries, "image.max_image_entries", "entries"),
        ] {
            let e = map_unpack(&digest, UnpackError::LimitExceeded { what, limit: 42 });
            assert_eq!(e.code(), crate::ErrorCode::InvalidArgument);
            let msg = e.to_string();
            assert!(
                msg.contains(&digest) && msg.contains(&format!("42 {unit}")) && msg.contains(key),
                "{msg}"
            );
        }
    }

    #[test]
    fn manifest_parsing_rejects_schema1() {
        assert!(matches!(
            parse_manifest(br#"{"schemaVersion":1}"#, "x"),
            Err(ImageError::Unsupported(_))
        ));
        let idx = parse_manifest(
            br#"{"schemaVersion":2,"manifests":[{"mediaType":"m","digest":"sha256:00","size":1,"platform":{"architecture":"arm64","os":"linux"}}]}"#,
            "x",
        )
        .unwrap();
        assert!(is_index(&idx));
    }
}

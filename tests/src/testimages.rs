//! Test images built in Rust from Debian's static busybox and pushed to a registry
//! over plain HTTP. Images are reproducible: the same call gives the same digests.
//!
//! `reg` arguments accept `"127.0.0.1:PORT"` (`&str`/`String`) or `&TestRegistry`
//! (which also carries its htpasswd credentials). `repo_tag` is `"name[:tag]"`
//! (tag defaults to `latest`).

mod layer;
mod push;

use anyhow::Context;
use rand::RngCore;
use serde_json::json;

pub use layer::{add_busybox_rootfs, sha256_digest, Layer, LayerCompression, TarBuilder, MTIME};
use push::Repo;
pub use push::Target;

/// The busybox binary the images carry (Debian package `busybox-static`).
pub const BUSYBOX: &str = "/bin/busybox";

const MANIFEST_MT: &str = "application/vnd.oci.image.manifest.v1+json";
const INDEX_MT: &str = "application/vnd.oci.image.index.v1+json";
const CONFIG_MT: &str = "application/vnd.oci.image.config.v1+json";

/// Paths present in the final rootfs of [`push_layered_whiteouts`].
pub const WHITEOUT_PRESENT: &[&str] = &[
    "/data/keep",
    "/opaque/new-in-l2",
    "/data/added-in-l3",
    "/opaque/added-in-l3",
];
/// Paths that layers 2 deleted (`.wh.` file, `.wh..wh..opq` dir) in [`push_layered_whiteouts`].
pub const WHITEOUT_ABSENT: &[&str] = &["/data/remove-me", "/opaque/old", "/opaque/sub/old"];

/// What was pushed.
#[derive(Debug, Clone)]
pub struct PushedImage {
    /// `"127.0.0.1:PORT/name:tag"`.
    pub reference: String,
    /// Digest of what the tag points to (the index, for multi-arch images).
    pub manifest_digest: String,
    /// Config digest (of the linux/amd64 image for multi-arch).
    pub config_digest: String,
    /// Compressed layer digests, bottom → top (linux/amd64 for multi-arch).
    pub layer_digests: Vec<String>,
    /// For an index: `("linux/amd64", manifest digest)` per platform; else empty.
    pub platform_manifests: Vec<(String, String)>,
}

impl PushedImage {
    /// `"127.0.0.1:PORT/name@sha256:..."`.
    pub fn digest_reference(&self) -> String {
        let repo = self
            .reference
            .rsplit_once(':')
            .filter(|(r, tag)| !tag.contains('/') && r.contains('/'))
            .map_or(self.reference.as_str(), |(r, _)| r);
        format!("{repo}@{}", self.manifest_digest)
    }
}

/// Kinds of hostile layers; every one must make a pull fail without touching the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostileKind {
    /// A file named `../../…/tmp/<marker>`.
    DotDot,
    /// A symlink `escape -> /`, then a file `escape/tmp/<marker>` written through it.
    SymlinkEscape,
    /// A hard link whose target is `../../…/etc/passwd`.
    HardlinkEscape,
    /// A symlink `abs -> /tmp`, then an absolute `/abs/<marker>` through it.
    AbsoluteThroughSymlink,
}

impl HostileKind {
    /// All kinds.
    pub const ALL: [HostileKind; 4] = [
        HostileKind::DotDot,
        HostileKind::SymlinkEscape,
        HostileKind::HardlinkEscape,
        HostileKind::AbsoluteThroughSymlink,
    ];

    /// The host file this layer tries to create; it must not exist after a pull.
    pub fn host_marker(self) -> Option<&'static str> {
        match self {
            HostileKind::DotDot => Some("/tmp/vessel-hostile-dotdot"),
            HostileKind::SymlinkEscape => Some("/tmp/vessel-hostile-symlink"),
            HostileKind::AbsoluteThroughSymlink => Some("/tmp/vessel-hostile-abs"),
            HostileKind::HardlinkEscape => None,
        }
    }
}

/// Splits `"name[:tag]"`.
fn split_repo_tag(repo_tag: &str) -> (&str, &str) {
    match repo_tag.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => (repo, tag),
        _ => (repo_tag, "latest"),
    }
}

/// Config and manifest of a single-platform image.
struct Built {
    config: Vec<u8>,
    manifest: Vec<u8>,
    layers: Vec<Layer>,
}

/// `config_keys` are extra keys of the image config's `config` object (`User`,
/// `StopSignal`, `Entrypoint`, ...), as JSON values.
fn build_image(
    layers: Vec<Layer>,
    arch: &str,
    config_keys: &[(&str, serde_json::Value)],
) -> anyhow::Result<Built> {
    let mut cfg = json!({
        "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        "Cmd": ["sh"],
        "WorkingDir": "/",
    });
    for (key, value) in config_keys {
        cfg[*key] = value.clone();
    }
    let config = serde_json::to_vec(&json!({
        "created": "2023-11-14T22:13:20Z",
        "architecture": arch,
        "os": "linux",
        "config": cfg,
        "rootfs": {
            "type": "layers",
            "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>(),
        },
        "history": layers.iter().map(|_| json!({"created_by": "vessel-tests"})).collect::<Vec<_>>(),
    }))?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MT,
        "config": {"mediaType": CONFIG_MT, "digest": sha256_digest(&config), "size": config.len()},
        "layers": layers.iter().map(|l| json!({
            "mediaType": l.media_type, "digest": l.digest, "size": l.data.len(),
        })).collect::<Vec<_>>(),
    }))?;
    Ok(Built {
        config,
        manifest,
        layers,
    })
}

/// Uploads the blobs and the manifest under `reference` (tag or digest).
async fn push_built(repo: &Repo, built: &Built, reference: &str) -> anyhow::Result<String> {
    for l in &built.layers {
        repo.put_blob(&l.data).await.context("layer upload")?;
    }
    repo.put_blob(&built.config)
        .await
        .context("config upload")?;
    repo.put_manifest(reference, MANIFEST_MT, &built.manifest)
        .await
}

async fn push_single(
    reg: Target,
    repo_tag: &str,
    layers: Vec<Layer>,
    config_keys: &[(&str, serde_json::Value)],
) -> anyhow::Result<PushedImage> {
    let (name, tag) = split_repo_tag(repo_tag);
    let addr = reg.addr.clone();
    let repo = Repo::new(reg, name);
    let built = build_image(layers, "amd64", config_keys)?;
    let manifest_digest = push_built(&repo, &built, tag).await?;
    Ok(PushedImage {
        reference: format!("{addr}/{name}:{tag}"),
        manifest_digest,
        config_digest: sha256_digest(&built.config),
        layer_digests: built.layers.iter().map(|l| l.digest.clone()).collect(),
        platform_manifests: Vec::new(),
    })
}

/// The busybox rootfs as one layer.
pub fn busybox_layer(compression: LayerCompression) -> anyhow::Result<Layer> {
    let mut b = TarBuilder::new();
    add_busybox_rootfs(&mut b)?;
    Layer::new(b.finish()?, compression)
}

/// 1-layer busybox rootfs (gzip).
pub async fn push_busybox(reg: impl Into<Target>, repo_tag: &str) -> anyhow::Result<PushedImage> {
    push_single(
        reg.into(),
        repo_tag,
        vec![busybox_layer(LayerCompression::Gzip)?],
        &[],
    )
    .await
}

/// A busybox image of `count` layers (gzip). Layer `i` writes its number to
/// `/stack/n` (so the top one's shows) and adds `/stack/l<i>`. Layer 0 also has
/// `/stack/gone` and `/stack/opq/old`; layer 1 (when there is one) whites out
/// `gone` and makes `opq/` opaque, adding `opq/new`.
pub fn many_layers(count: usize) -> anyhow::Result<Vec<Layer>> {
    (0..count)
        .map(|i| {
            let mut b = TarBuilder::new();
            if i == 0 {
                add_busybox_rootfs(&mut b)?;
            }
            b.dir("stack/", 0o755)?
                .file("stack/n", format!("{i}\n").as_bytes(), 0o644)?
                .file(&format!("stack/l{i}"), b"", 0o644)?;
            match i {
                0 => {
                    b.file("stack/gone", b"", 0o644)?
                        .dir("stack/opq/", 0o755)?
                        .file("stack/opq/old", b"", 0o644)?;
                }
                1 => {
                    b.file("stack/.wh.gone", b"", 0o644)?
                        .dir("stack/opq/", 0o755)?
                        .file("stack/opq/.wh..wh..opq", b"", 0o644)?
                        .file("stack/opq/new", b"", 0o644)?;
                }
                _ => {}
            }
            Layer::new(b.finish()?, LayerCompression::Gzip)
        })
        .collect()
}

/// [`many_layers`] pushed as one image.
pub async fn push_many_layers(
    reg: impl Into<Target>,
    repo_tag: &str,
    count: usize,
) -> anyhow::Result<PushedImage> {
    push_single(reg.into(), repo_tag, many_layers(count)?, &[]).await
}

/// 1-layer busybox rootfs compressed with zstd.
pub async fn push_zstd(reg: impl Into<Target>, repo_tag: &str) -> anyhow::Result<PushedImage> {
    push_single(
        reg.into(),
        repo_tag,
        vec![busybox_layer(LayerCompression::Zstd)?],
        &[],
    )
    .await
}

/// Busybox whose command sleeps for a day: a stand-in for the pause image of a
/// runtime that needs one (the containerd peer of vessel-bench).
pub async fn push_pause(reg: impl Into<Target>, repo_tag: &str) -> anyhow::Result<PushedImage> {
    let layers = vec![busybox_layer(LayerCompression::Gzip)?];
    // Cmd, not Entrypoint: the default Cmd (`sh`) would become sleep's argument.
    let cmd = json!(["sleep", "86400"]);
    push_single(reg.into(), repo_tag, layers, &[("Cmd", cmd)]).await
}

/// Busybox whose config sets `User` (e.g. `"1000"`, `"vessel"`, `"1000:1000"`).
pub async fn push_with_user(
    reg: impl Into<Target>,
    repo_tag: &str,
    user: &str,
) -> anyhow::Result<PushedImage> {
    let layers = vec![busybox_layer(LayerCompression::Gzip)?];
    push_single(reg.into(), repo_tag, layers, &[("User", json!(user))]).await
}

/// Busybox running as `vessel`, with a second layer whose `/etc/group` lists
/// `vessel` as a member of `groups` groups (gids from 100000 up).
pub async fn push_with_groups(
    reg: impl Into<Target>,
    repo_tag: &str,
    groups: usize,
) -> anyhow::Result<PushedImage> {
    let mut text = String::from("root:x:0:\nvessel:x:1000:\nnogroup:x:65534:\n");
    for i in 0..groups {
        text += &format!("g{i}:x:{}:vessel\n", 100_000 + i);
    }
    let mut b = TarBuilder::new();
    b.dir("etc/", 0o755)?
        .file("etc/group", text.as_bytes(), 0o644)?;
    let layers = vec![
        busybox_layer(LayerCompression::Gzip)?,
        Layer::new(b.finish()?, LayerCompression::Gzip)?,
    ];
    push_single(reg.into(), repo_tag, layers, &[("User", json!("vessel"))]).await
}

/// Busybox whose config sets `StopSignal` (e.g. `"SIGUSR1"`), the signal
/// StopContainer must send instead of SIGTERM.
pub async fn push_with_stop_signal(
    reg: impl Into<Target>,
    repo_tag: &str,
    signal: &str,
) -> anyhow::Result<PushedImage> {
    let layers = vec![busybox_layer(LayerCompression::Gzip)?];
    push_single(
        reg.into(),
        repo_tag,
        layers,
        &[("StopSignal", json!(signal))],
    )
    .await
}

/// Three layers: (1) busybox plus `/data` and `/opaque` files; (2) `.wh.remove-me`
/// deleting `/data/remove-me` and `.wh..wh..opq` making `/opaque` opaque, plus
/// `/opaque/new-in-l2`; (3) adds `/data/added-in-l3` and `/opaque/added-in-l3`.
/// See [`WHITEOUT_PRESENT`] and [`WHITEOUT_ABSENT`].
pub async fn push_layered_whiteouts(
    reg: impl Into<Target>,
    repo_tag: &str,
) -> anyhow::Result<PushedImage> {
    push_single(reg.into(), repo_tag, whiteout_layers()?, &[]).await
}

/// The three layers of [`push_layered_whiteouts`], bottom → top (gzip).
pub fn whiteout_layers() -> anyhow::Result<Vec<Layer>> {
    let mut l1 = TarBuilder::new();
    add_busybox_rootfs(&mut l1)?;
    l1.dir("data/", 0o755)?
        .file("data/keep", b"keep\n", 0o644)?
        .file("data/remove-me", b"remove me\n", 0o644)?
        .dir("opaque/", 0o755)?
        .file("opaque/old", b"old\n", 0o644)?
        .dir("opaque/sub/", 0o755)?
        .file("opaque/sub/old", b"old\n", 0o644)?;
    let mut l2 = TarBuilder::new();
    l2.dir("data/", 0o755)?
        .file("data/.wh.remove-me", b"", 0o644)?
        .dir("opaque/", 0o755)?
        .file("opaque/.wh..wh..opq", b"", 0o644)?
        .file("opaque/new-in-l2", b"new\n", 0o644)?;
    let mut l3 = TarBuilder::new();
    l3.dir("data/", 0o755)?
        .file("data/added-in-l3", b"added\n", 0o644)?
        .dir("opaque/", 0o755)?
        .file("opaque/added-in-l3", b"added\n", 0o644)?;
    Ok(vec![
        Layer::new(l1.finish()?, LayerCompression::Gzip)?,
        Layer::new(l2.finish()?, LayerCompression::Gzip)?,
        Layer::new(l3.finish()?, LayerCompression::Gzip)?,
    ])
}

/// An OCI index: linux/amd64 → busybox (with `/arch` = "amd64"), linux/arm64 → a
/// small non-runnable image whose only file is `/arch` = "arm64".
pub async fn push_multiarch(reg: impl Into<Target>, repo_tag: &str) -> anyhow::Result<PushedImage> {
    let reg = reg.into();
    let (name, tag) = split_repo_tag(repo_tag);
    let addr = reg.addr.clone();
    let repo = Repo::new(reg, name);

    let mut amd = TarBuilder::new();
    add_busybox_rootfs(&mut amd)?;
    amd.file("arch", b"amd64\n", 0o644)?;
    let amd = build_image(
        vec![Layer::new(amd.finish()?, LayerCompression::Gzip)?],
        "amd64",
        &[],
    )?;
    let mut arm = TarBuilder::new();
    arm.file("arch", b"arm64\n", 0o644)?;
    let arm = build_image(
        vec![Layer::new(arm.finish()?, LayerCompression::Gzip)?],
        "arm64",
        &[],
    )?;

    let mut entries = Vec::new();
    let mut platform_manifests = Vec::new();
    for (built, arch) in [(&amd, "amd64"), (&arm, "arm64")] {
        let digest = sha256_digest(&built.manifest);
        push_built(&repo, built, &digest).await?;
        entries.push(json!({
            "mediaType": MANIFEST_MT, "digest": digest, "size": built.manifest.len(),
            "platform": {"architecture": arch, "os": "linux"},
        }));
        platform_manifests.push((format!("linux/{arch}"), digest));
    }
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": INDEX_MT, "manifests": entries,
    }))?;
    let manifest_digest = repo.put_manifest(tag, INDEX_MT, &index).await?;
    Ok(PushedImage {
        reference: format!("{addr}/{name}:{tag}"),
        manifest_digest,
        config_digest: sha256_digest(&amd.config),
        layer_digests: amd.layers.iter().map(|l| l.digest.clone()).collect(),
        platform_manifests,
    })
}

/// A one-layer image whose layer is hostile (see [`HostileKind`]); plain entries
/// come first so the unpacker has started writing when it meets the bad one.
pub async fn push_hostile(
    reg: impl Into<Target>,
    repo_tag: &str,
    kind: HostileKind,
) -> anyhow::Result<PushedImage> {
    let layers = vec![hostile_layer(kind)?];
    push_single(reg.into(), repo_tag, layers, &[]).await
}

/// The layer of [`push_hostile`] (gzip).
pub fn hostile_layer(kind: HostileKind) -> anyhow::Result<Layer> {
    let climb = "../".repeat(16);
    let mut b = TarBuilder::new();
    b.dir("etc/", 0o755)?.file("etc/harmless", b"ok\n", 0o644)?;
    match kind {
        HostileKind::DotDot => {
            b.file(
                &format!("{climb}tmp/vessel-hostile-dotdot"),
                b"pwned\n",
                0o644,
            )?;
        }
        HostileKind::SymlinkEscape => {
            b.symlink("escape", "/")?.file(
                "escape/tmp/vessel-hostile-symlink",
                b"pwned\n",
                0o644,
            )?;
        }
        HostileKind::HardlinkEscape => {
            b.hardlink("passwd-link", &format!("{climb}etc/passwd"))?;
        }
        HostileKind::AbsoluteThroughSymlink => {
            b.symlink("abs", "/tmp")?
                .file("/abs/vessel-hostile-abs", b"pwned\n", 0o644)?;
        }
    }
    Layer::new(b.finish()?, LayerCompression::Gzip)
}

/// `layers` gzip layers, each one file `/random-<i>` of `bytes_per_layer` random
/// (incompressible) bytes: for pull/unpack throughput. Not reproducible.
pub async fn push_random(
    reg: impl Into<Target>,
    repo_tag: &str,
    layers: usize,
    bytes_per_layer: usize,
) -> anyhow::Result<PushedImage> {
    let built = (0..layers)
        .map(|i| {
            random_layer(
                &format!("random-{i}"),
                bytes_per_layer,
                LayerCompression::Gzip,
            )
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    push_single(reg.into(), repo_tag, built, &[]).await
}

/// An image of the given layers (amd64, busybox-style config) pushed as `repo_tag`.
pub async fn push_layers(
    reg: impl Into<Target>,
    repo_tag: &str,
    layers: Vec<Layer>,
) -> anyhow::Result<PushedImage> {
    push_single(reg.into(), repo_tag, layers, &[]).await
}

/// A layer of `files` random (incompressible) files of `file_bytes` each, under
/// `dir/`: the shape of an application layer, many files rather than one.
pub fn random_files_layer(
    dir: &str,
    files: usize,
    file_bytes: usize,
    compression: LayerCompression,
) -> anyhow::Result<Layer> {
    let mut rng = rand::rng();
    let mut data = vec![0u8; file_bytes];
    let mut b = TarBuilder::new();
    b.dir(dir, 0o755)?;
    for i in 0..files {
        rng.fill_bytes(&mut data);
        b.file(&format!("{dir}/file-{i:04}"), &data, 0o644)?;
    }
    Layer::new(b.finish()?, compression)
}

/// A layer with one file `name` of `bytes` random (incompressible) bytes.
pub fn random_layer(
    name: &str,
    bytes: usize,
    compression: LayerCompression,
) -> anyhow::Result<Layer> {
    let mut data = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut data);
    let mut b = TarBuilder::new();
    b.file(name, &data, 0o644)?;
    Layer::new(b.finish()?, compression)
}

/// Reads a manifest back: `(content type, body)`. `reference` is a tag or digest.
pub async fn get_manifest(
    reg: impl Into<Target>,
    name: &str,
    reference: &str,
) -> anyhow::Result<(String, Vec<u8>)> {
    Repo::new(reg.into(), name).get_manifest(reference).await
}

/// Reads a blob back.
pub async fn get_blob(reg: impl Into<Target>, name: &str, digest: &str) -> anyhow::Result<Vec<u8>> {
    Repo::new(reg.into(), name).get_blob(digest).await
}

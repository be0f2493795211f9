//! Image references, registry client, content store and layer unpack.
//!
//! [`ImageStore`] pulls images from registries (mirrors and credentials per
//! containerd's `hosts.toml`), verifies every blob against its digest, keeps blobs in
//! `root/content`, unpacks layers into snapshots (`root/snapshots`, one per chain id)
//! and records images in redb only once every snapshot is committed.

mod content;
mod error;
#[cfg(test)]
mod fuzz;
pub mod hosts;
mod http;
mod image;
mod meta;
mod mounts;
mod pull;
pub mod reference;
mod registry;
mod store;
pub mod unpack;

pub use error::{ErrorCode, ImageError};
pub use http::registry_bytes_refused;
pub use image::{Image, RegistryAuth};
pub use mounts::mount_point;
pub use reference::{normalize_reference, ImageRef};
pub use store::{DownloadLimits, FsUsage, ImageLimits, ImageStore, ImageStoreConfig, PullStats};

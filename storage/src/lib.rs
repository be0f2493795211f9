//! Layer snapshots, container rootfs assembly, pod share dirs, pod scratch disks,
//! and the node's reopenable state database.
//!
//! A snapshot is one unpacked layer diff stored in `root/<chain-id hex>/`. Snapshots
//! are created through [`Snapshotter::prepare`], filled by the caller, and published
//! atomically with [`PendingSnapshot::commit`].

pub mod db;
mod error;
mod exportns;
pub mod overlay;
pub mod rootfs;
pub mod scratch;
pub mod sharedir;
mod snapshot;
mod usage;

pub use error::StorageError;
pub use snapshot::{PendingSnapshot, Snapshotter};
pub use usage::disk_usage;

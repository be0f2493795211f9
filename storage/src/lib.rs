//! Layer snapshots, container rootfs assembly, pod share dirs

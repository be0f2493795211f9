//! End-to-end tests of vessel through its CRI socket, and the benchmark harness.
pub mod bench;
pub mod cri;
pub mod daemon;
pub mod registry;
pub mod testhost;
pub mod testimages;

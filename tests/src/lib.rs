//! End-to-end tests of vessel through its CRI socket
pub mod cri;
pub mod daemon;
pub mod registry;
pub mod testimages;

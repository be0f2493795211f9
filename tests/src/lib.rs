//! End-to-end tests of vessel through its CRI socket

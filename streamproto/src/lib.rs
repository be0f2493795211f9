//! Wire formats of CRI streaming (exec, attach, port-forward), shared by vesseld's
//! streaming server and the tests' clients: SPDY/3.1 framing with its compressed
//! header blocks, and the Kubernetes channel protocols carried over SPDY or
//! WebSocket. No I/O here: callers own the sockets and the bounds on buffering.

pub mod k8s;
pub mod spdy;

//! vessel-agent: PID 1 of the pod VM, runs the containers

fn main() {}

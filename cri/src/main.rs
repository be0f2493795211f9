//! vesseld: the CRI v1 gRPC server of vessel

fn main() {}

//! The differential test: the same input and the same frames through real kernel iptables
//! (loaded from the parity renderer's output) and through the eBPF datapath, on a namespace
//! compute node. Every verdict must agree, except the documented differences, where sg's
//! side is asserted on its own.
pub mod topo;
pub mod wire;

//! sg userspace: model, then compile, then apply (eBPF datapath or iptables parity).
pub mod datapath;
pub mod netns;
pub mod packet;

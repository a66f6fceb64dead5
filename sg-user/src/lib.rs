//! sg userspace: model, then compile, then apply (eBPF datapath or iptables parity).
pub mod agent;
pub mod datapath;
pub mod netns;
pub mod packet;
pub mod pinned;

//! sg userspace, top-down: the Neutron model, then the compiler, then the back ends that apply
//! it (the eBPF datapath, the iptables parity renderer), and the agent that drives them.
pub mod model;

pub mod iptables;

pub mod compile;

pub mod config;

pub mod agent;
pub mod datapath;
pub mod diff;
pub mod generator;
pub mod inspect;
pub mod journal;
pub mod netns;
pub mod observe;
pub mod packet;
pub mod pinned;
pub mod trace;

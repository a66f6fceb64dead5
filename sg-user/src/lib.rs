//! sg userspace: the Neutron model, the policy compiler and (elsewhere) the datapath agent.

pub mod compile;
pub mod model;

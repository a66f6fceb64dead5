//! sg userspace: the Neutron model, the policy compiler and (elsewhere) the datapath agent.

pub mod model;

//! The agent: follow taps, watch the input, reconcile the datapath.
pub mod links;

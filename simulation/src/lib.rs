//! Deterministic simulation of Warren: the production consensus code (openraft, the
//! registry state machine, sled storage) on a simulated network and clock, with crashes,
//! partitions and a linearizability checker.
//!
//! Nothing is here yet; the simulation is built with its own issue. The consensus crate
//! already keeps its network behind the `Transport` trait so a simulated one can replace
//! QUIC.

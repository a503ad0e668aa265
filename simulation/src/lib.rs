//! Deterministic simulation of a Warren cluster.
//!
//! The production consensus code runs unchanged (openraft, the registry state machine,
//! sled storage, the QUIC transport with mutual TLS); only the network and the clock are
//! simulated, by turmoil. quinn runs over turmoil's UDP through [`net::SimUdp`].
//!
//! A run ([`cluster::run`]) starts a cluster (3 or 5 voters plus learners), lets client
//! workers on every node create, update, delete and read registry entries while a seeded
//! schedule crashes and restarts nodes, cuts their power (one node, a quorum or all at
//! once; the log loses what it had not synced), partitions the network (majority/minority,
//! isolated leader, one-way), drops and delays messages and changes the membership; then
//! it heals everything and requires the cluster to make progress and converge.
//! Throughout, it checks Raft's safety properties after every step, and at the end that
//! no answered write was lost and the linearizability of every client operation
//! ([`checker`]).
//!
//! Every random choice of the simulation comes from the seed, and storage I/O runs inline
//! on the simulated hosts (no background threads). Cryptographic randomness, the order in
//! which `tokio::select!` polls and hash map order stay real, so a replay follows the same
//! fault schedule and operations but may diverge in detail.

pub mod checker;
pub mod cluster;
pub mod history;
pub mod nat;
pub mod net;

//! `warren-node`: the Warren server.
//!
//! One node is a complete install; three make a highly available cluster. This crate owns
//! a node's lifecycle (init, join, run), its supervision tree, its QUIC endpoint and its
//! admin API.
//!
//! ```text
//!                       Supervisor (ractor)
//!        ┌───────────────────┼────────────────────┐
//!   ClusterActor        RpcListener            AdminListener
//!   status, membership  QUIC :7400              HTTPS :7443
//!   serving watch       ├─ warren-cluster/1 ──► Cluster (consensus): Raft RPCs,
//!        │              │                       forwarded writes and reads
//!        │              └─ warren-join/1 ─────► join: sign CSR, register, admit
//!        └──────────────── Cluster handle ◄──── admin routes (reads and writes go
//!                                               straight to the handle: no mailbox hop)
//! ```
//!
//! The Raft instance is not owned by an actor: actors come and go (a crashed child is
//! logged and restarted), Raft and its storage live for the whole process.

pub mod actors;
pub mod admin;
pub mod conn;
pub mod datadir;
pub mod join;
pub mod node;
pub mod settings;

pub use node::{init, join, run, RunningNode};
pub use settings::Settings;
pub mod acme;
pub mod l4;
pub mod miss;
pub mod proxy;
pub mod publish;
pub mod serving;
pub mod sites;
#[cfg(test)]
mod testing;

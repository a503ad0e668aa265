//! Warren's replicated registry.
//!
//! ```text
//!  admin API / join ──► Cluster (handle) ──► Proposer ──► openraft ──► LogStore (sled db "log")
//!                             │           (batches writes)    │
//!                             │ forward to                     └──► StateMachine ──► watch<Arc<Registry>>
//!                             ▼ leader                              applies Registry commands;
//!                         Transport (trait)                         snapshots in sled db "state"
//!                             └──► QUIC + mTLS (cluster CA)
//! ```
//!
//! - [`registry`]: the replicated state and its pure, validating apply.
//! - [`log_store`], [`state_machine`]: openraft's v2 storage traits on sled.
//! - [`storage`]: sled with a real sync (`fdatasync`), checksummed values, and the record of
//!   what the log had made durable, against which a damaged log is recognised.
//! - [`transport`]: the RPC messages and the [`transport::Transport`] trait the Raft network
//!   uses; [`quic`] implements it over QUIC with mutual TLS, and a simulation can replace it.
//! - [`format`]: the versions of stored values and node-to-node messages.
//! - [`pki`]: the cluster CA and node certificates.
//! - [`cluster`]: the handle the rest of a node uses: writes forwarded to the leader,
//!   linearizable reads, membership changes, status, and the snapshot policy.
//! - [`proposer`]: batches concurrent writes on the leader into one log entry.

// openraft's storage traits return its `StorageError` (224 bytes); our helpers that feed
// those traits return it too rather than box and unbox at every call.
#![allow(clippy::result_large_err)]

pub mod cluster;
pub mod format;
pub mod log_store;
pub mod pki;
pub mod proposer;
pub mod quic;
pub mod registry;
pub mod state_machine;
pub mod storage;
pub mod transport;
pub mod types;

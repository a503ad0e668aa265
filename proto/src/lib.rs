//! Warren's sans-IO core, shared by the node, the agent and the client.
//!
//! This crate owns the vocabulary every other crate speaks and nothing that needs a
//! runtime, a socket or a clock:
//!
//! ```text
//!   name      validated identifiers for registry entities
//!   registry  the entities the cluster replicates (users, roles, identity providers,
//!             sites, resources, policies, API keys, nodes) and their validation
//!   policy    the policy model: allow/deny trees of and/or/not over criteria
//!   access    policies compiled for evaluation, and the access decision
//!   api       admin API request, response and error bodies
//!   token     API key and join token formats, hashing and constant-time checks
//!   secret    a string that never shows up in Debug output or logs
//! ```
//!
//! `consensus` applies registry commands on top of these types; `client` speaks the admin
//! API with them.

pub mod access;
pub mod api;
pub mod canonical;
pub mod certificate;
pub mod coordinator;
pub mod identity;
#[cfg(feature = "log")]
pub mod logging;
pub mod name;
pub mod policy;
pub mod registry;
pub mod relay;
pub mod secret;
pub mod session;
pub mod sites;
pub mod token;
pub mod tunnel;
pub mod tunnels;

pub use name::Name;
pub use secret::Secret;

//! `warren-node`: the Warren server.
//!
//! One node is a complete install; three make a highly available cluster. This crate owns
//! a node's lifecycle (init, join, run: [`node`]), its supervision tree ([`actors`]), its
//! QUIC endpoint, the HTTPS proxy ([`proxy`]), the site tunnels ([`sites`]), the TCP/UDP
//! resource ports ([`l4`]) and the admin API ([`admin`]).
//!
//! Single writer, many readers: each piece of soft state has one owner, an actor holding a
//! sans-IO core (`handle_*(…, now)`, `poll_*`, `poll_timeout()`), which publishes an
//! immutable snapshot ([`publish::Published`]); request and stream tasks read it with one
//! atomic load and never wait on a mailbox.
//!
//! ```text
//!  Supervisor (ractor; restarts a failed child, counts it, health shows it while down)
//!   ├─ cluster       ClusterActor: membership changes; computes Serving every 200 ms ──┐
//!   ├─ proxy_config  ProxyConfigCore: registry → routes, policies, certs, keys ─► ProxyState
//!   │                owns the web targets' health checks                              │
//!   ├─ l4            L4Core: which TCP/UDP resource ports to serve; owns port tasks    │
//!   ├─ sessions      provider token refresh (bounded, in parallel), key rotation       │
//!   ├─ certs         ACME orders under a Raft lease (when configured)                  │
//!   ├─ tunnels       one child per connected agent (config push, health) ─► local tunnels
//!   ├─ gossip        which peer holds which site (TTLs), announced every second ─► holdings
//!   ├─ rpc           QUIC :7400 accept loop: Raft RPCs, joins, agents, relays          │
//!   ├─ admin         HTTPS :7443 ─ reads Serving + tree health, Cluster handle         │
//!   └─ proxy         HTTPS :443 / HTTP :80 ─ per-connection tasks ─────────────────────┤
//!                                                                                      ▼
//!   request / flow tasks: ProxyState.load() · Serving.check() · Sites snapshots (no mailbox)
//! ```
//!
//! Raft, storage, sockets and every published snapshot are created before the tree and
//! outlive restarts: a restarted actor rebuilds its core from the current registry and
//! publishes into the same place, while readers keep the last snapshot meanwhile. The
//! libraries take their listeners and a shutdown future ([`serve`], [`Listeners`]): the
//! binary binds its flags' addresses, tests bind `127.0.0.1:0`; shutdown stops accepting,
//! lets open connections finish (up to [`node::SHUTDOWN_GRACE`]), then stops the tree.

pub mod actors;
pub mod admin;
pub mod conn;
pub mod datadir;
pub mod join;
pub mod node;
pub mod settings;

pub use node::{init, join, run, serve, Listeners, RunningNode};
pub use settings::Settings;
pub mod access;
pub mod acme;
pub mod certs;
pub mod coordinator;
pub mod devices;
pub mod l4;
pub mod miss;
pub mod proxy;
pub mod publish;
pub mod relay;
pub mod relay_only;
pub mod serving;
pub mod sessions;
pub mod shell;
pub mod sites;
#[cfg(test)]
mod testing;

//! Warren's L4 data path, shared by `warren` (the client) and `warren-agent`: the node and
//! the admin CLI do not compile it.
//!
//! ```text
//!  client app ─TCP─► local listener ─► stack (smoltcp) ─IP─► wg (boringtun) ─UDP─┐
//!                                                                                 │ relay
//!  target ◄─TCP── agent dials ◄── stack (smoltcp, any-IP) ◄─IP── wg ◄─UDP─────────┘ (node)
//! ```
//!
//! - [`endpoint`]: the IO shell: one task owning the UDP socket, the peers, the relay client
//!   and the stacks; the client's and the agent's roles (the agent's per-flow admission).
//! - [`wg`]: a sans-IO set of WireGuard peers over `boringtun::noise::Tunn`.
//! - [`relays`]: the relay client, sans-IO (bindings, pings, the choice of relay per site).
//! - [`stack`]: a userspace TCP/IP stack over smoltcp (outbound flows for the client,
//!   accepted flows with an admission check for the agent).

pub mod direct;
pub mod endpoint;
pub mod relays;
pub mod stack;
pub mod wg;

//! Warren's L4 data path, shared by `warren` (the client) and `warren-agent`: the node and
//! the admin CLI do not compile it.
//!
//! ```text
//!  client app ─TCP─► local listener ─► stack (smoltcp) ─IP─► wg (boringtun) ─UDP─┐
//!                                                                                 │ relay
//!  target ◄─TCP── agent dials ◄── stack (smoltcp, any-IP) ◄─IP── wg ◄─UDP─────────┘ (node)
//! ```
//!
//! - [`wg`]: a sans-IO set of WireGuard peers over `boringtun::noise::Tunn`.
//! - [`relays`]: the relay client, sans-IO (bindings, pings, the choice of relay per site).
//! - [`stack`]: a userspace TCP/IP stack over smoltcp (outbound flows for the client,
//!   accepted flows with an admission check for the agent).

pub mod relays;
pub mod stack;
pub mod wg;

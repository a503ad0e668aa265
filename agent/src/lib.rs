//! `warren-agent`: the connector that runs inside a private network (a "site") and dials out
//! to the cluster, so the site's targets become reachable without opening a port.
//!
//! Nothing is here yet: the agent, its outbound QUIC tunnels and its `warren-agent` binary
//! are built with the sites capability. This crate exists so the workspace has the shape
//! described in DESIGN.md; it exports nothing that pretends to work.

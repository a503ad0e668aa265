//! `warren`: the command-line client.
//!
//! For now it speaks the admin API (`warren admin …`); signing in and tunnels to sites come
//! with their issues.
//!
//! ```text
//! warren admin <entity> list|get|create|update|delete   users, roles, identity providers,
//!                                                        sites, resources, policies, nodes
//! warren admin cluster status|add|remove|promote
//! warren admin apikey list|create|revoke
//! warren admin join-token list|create|revoke
//! warren admin apply -f FILE.yaml [--prune] [--dry-run]
//! ```
//!
//! Address, key and CA come from `--addr`/`WARREN_ADDR`, `--api-key`/`WARREN_API_KEY` and
//! `--ca`/`WARREN_CA`. Output is a table for people, or the API's JSON with `--json`.

pub mod admin;
pub mod api;
pub mod manifest;
pub mod output;

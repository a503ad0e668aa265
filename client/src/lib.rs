//! `warren`: the command-line client.
//!
//! It speaks the admin API (`warren admin …`), signs people in with their OpenID provider
//! and their Warren cluster (`warren login`), registers this machine as a device, and
//! forwards TCP and UDP to private resources through WireGuard to the site's agent, relayed
//! by a node.
//!
//! ```text
//! warren admin <entity> list|get|create|update|delete   users, roles, identity providers,
//!                                                        sites, resources, policies, nodes
//! warren admin cluster status|add|remove|promote
//! warren admin apikey list|create|revoke
//! warren admin join-token list|create|revoke
//! warren admin apply -f FILE.yaml [--prune] [--dry-run]
//! warren login --node URL [--ca FILE] [--device-name NAME]   sign in to a cluster, register
//! warren login --issuer URL --client-id ID [--scope S]...   device flow (RFC 8628) only
//! warren login status
//! warren logout
//! warren ls [--json]                                  private resources you may reach
//! warren connect NAME [--local ADDR:PORT] [--udp]     a local listener forwarding to it
//! warren nc HOST PORT                                 stdin/stdout as one TCP flow
//! warren ssh [user@]HOST [ssh args]...                ssh with `warren nc` as ProxyCommand
//! warren status [--json]                              sign-in, device, node RTT, paths
//! warren device list [--json] | delete NAME           your devices
//! ```
//!
//! Address, key and CA of the admin API come from `--addr`/`WARREN_ADDR`,
//! `--api-key`/`WARREN_API_KEY` and `--ca`/`WARREN_CA`. Output is a table for people, or
//! JSON with `--json`.
//!
//! Everything `warren login` stores lives in `$WARREN_CONFIG_DIR`, `$XDG_CONFIG_HOME/warren`
//! or `~/.config/warren` (mode 0700): `token.json` (the provider's tokens, see [`token`]),
//! `node.json` (the node session, see [`session`]), `wg.key` (this device's WireGuard
//! private key, see [`device`]), `run/<pid>.json` (running connections, see [`status`]) and
//! `run/hub.sock` (this device's tunnel hub, see [`hub`]).

pub mod admin;
pub mod api;
pub mod connect;
pub mod datapath;
pub mod device;
pub mod enroll;
pub mod hub;
pub mod login;
pub mod manifest;
pub mod node;
pub mod output;
pub mod resources;
pub mod session;
pub mod status;
pub mod token;

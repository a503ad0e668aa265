//! `warren`: the command-line client.
//!
//! It speaks the admin API (`warren admin …`) and signs people in with their OpenID provider
//! (`warren login`); tunnels to sites come with their issue.
//!
//! ```text
//! warren admin <entity> list|get|create|update|delete   users, roles, identity providers,
//!                                                        sites, resources, policies, nodes
//! warren admin cluster status|add|remove|promote
//! warren admin apikey list|create|revoke
//! warren admin join-token list|create|revoke
//! warren admin apply -f FILE.yaml [--prune] [--dry-run]
//! warren login --issuer URL --client-id ID [--scope S]...   device flow (RFC 8628)
//! warren login status
//! warren logout
//! ```
//!
//! Address, key and CA come from `--addr`/`WARREN_ADDR`, `--api-key`/`WARREN_API_KEY` and
//! `--ca`/`WARREN_CA`. Output is a table for people, or the API's JSON with `--json`.
//!
//! `warren login` takes the provider from `--issuer`/`WARREN_OIDC_ISSUER` and
//! `--client-id`/`WARREN_OIDC_CLIENT_ID` and stores the tokens in `token.json` under
//! `$WARREN_CONFIG_DIR`, `$XDG_CONFIG_HOME/warren` or `~/.config/warren` (see [`token`]).

pub mod admin;
pub mod api;
pub mod login;
pub mod manifest;
pub mod output;
pub mod token;

//! `warren admin …`: the admin verbs.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{json, Map, Value};
use warren_proto::api::{ApplyReport, ApplyRequest, ChangeAction, ClusterStatus, Manifest};

use crate::api::Client;
use crate::manifest::{from_yaml, read_source};
use crate::output;

/// Where the admin API is and how to talk to it.
#[derive(Debug, Args)]
pub struct Connection {
    /// Admin API address of any node (`https://host:port`).
    #[arg(
        long,
        env = "WARREN_ADDR",
        global = true,
        default_value = "https://127.0.0.1:7443"
    )]
    pub addr: String,
    /// Admin API key (`wrn_…`).
    #[arg(long, env = "WARREN_API_KEY", global = true, hide_env_values = true)]
    pub api_key: Option<String>,
    /// File with the API key, instead of --api-key.
    #[arg(long, env = "WARREN_API_KEY_FILE", global = true)]
    pub api_key_file: Option<PathBuf>,
    /// The cluster CA certificate (ca.pem in a node's data directory).
    #[arg(long, env = "WARREN_CA", global = true)]
    pub ca: Option<PathBuf>,
    /// Print the API's JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

/// Admin commands.
#[derive(Debug, Subcommand)]
pub enum AdminCmd {
    /// Users.
    User {
        /// What to do.
        #[command(subcommand)]
        cmd: EntityCmd<UserFields, UserUpdate>,
    },
    /// Roles (groups of users).
    Role {
        /// What to do.
        #[command(subcommand)]
        cmd: EntityCmd<RoleFields, RoleUpdate>,
    },
    /// OpenID Connect identity providers.
    #[command(name = "idp", alias = "identity-provider")]
    Idp {
        /// What to do.
        #[command(subcommand)]
        cmd: EntityCmd<IdpFields, IdpUpdate>,
    },
    /// Sites (private networks behind an agent).
    Site {
        /// What to do.
        #[command(subcommand)]
        cmd: EntityCmd<SiteFields, SiteFields>,
    },
    /// Resources (web apps, TCP and UDP services).
    Resource {
        /// What to do.
        #[command(subcommand)]
        cmd: EntityCmd<ResourceFields, ResourceUpdate>,
    },
    /// Policies (who may reach what).
    Policy {
        /// What to do.
        #[command(subcommand)]
        cmd: EntityCmd<PolicyFields, PolicyFields>,
    },
    /// Devices: machines users signed in on with `warren login` (registered by the client;
    /// listed and deleted here).
    Device {
        /// What to do.
        #[command(subcommand)]
        cmd: DeviceCmd,
    },
    /// Nodes of the cluster.
    Node {
        /// What to do.
        #[command(subcommand)]
        cmd: NodeCmd,
    },
    /// Cluster status and membership.
    Cluster {
        /// What to do.
        #[command(subcommand)]
        cmd: ClusterCmd,
    },
    /// TLS certificates the proxy serves (uploaded, or ordered by ACME).
    #[command(name = "cert", alias = "certificate")]
    Cert {
        /// What to do.
        #[command(subcommand)]
        cmd: CertCmd,
    },
    /// Admin API keys.
    #[command(name = "apikey", alias = "api-key")]
    ApiKey {
        /// What to do.
        #[command(subcommand)]
        cmd: ApiKeyCmd,
    },
    /// Enrollment tokens for a site's agent (one-time use; shown once).
    SiteToken {
        /// The site.
        site: String,
        /// Seconds until the token expires unused.
        #[arg(long, default_value_t = 86_400)]
        expires_in: u64,
    },
    /// Join tokens for new nodes.
    JoinToken {
        /// What to do.
        #[command(subcommand)]
        cmd: JoinTokenCmd,
    },
    /// Make the registry match a declarative file (YAML or JSON).
    Apply {
        /// The file (`-` for standard input).
        #[arg(short = 'f', long = "file")]
        file: String,
        /// Also delete entities of the kinds the file lists that it does not name.
        #[arg(long)]
        prune: bool,
        /// Show what would change; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// The verbs every entity has.
#[derive(Debug, Subcommand)]
pub enum EntityCmd<C: Args, U: Args> {
    /// List them.
    List,
    /// Show one.
    Get {
        /// Its name.
        name: String,
    },
    /// Create one from flags, or from a YAML/JSON file with `-f`.
    Create {
        /// Its name (optional with -f).
        name: Option<String>,
        /// Read the entity from this file (`-` for standard input).
        #[arg(short = 'f', long = "file")]
        file: Option<String>,
        /// Field flags.
        #[command(flatten)]
        fields: C,
    },
    /// Change fields of one.
    Update {
        /// Its name.
        name: String,
        /// Only if it is still at this revision.
        #[arg(long)]
        revision: Option<u64>,
        /// Field flags.
        #[command(flatten)]
        fields: U,
    },
    /// Delete one.
    Delete {
        /// Its name.
        name: String,
        /// Only if it is still at this revision.
        #[arg(long)]
        revision: Option<u64>,
    },
}

/// Turns flags into JSON fields.
pub trait Fields {
    /// The fields given on the command line.
    fn to_json(&self) -> anyhow::Result<Map<String, Value>>;
}

fn put<T: serde::Serialize>(m: &mut Map<String, Value>, k: &str, v: &Option<T>) {
    if let Some(v) = v {
        m.insert(k.into(), json!(v));
    }
}

/// User fields.
#[derive(Debug, Args)]
pub struct UserFields {
    /// E-mail address.
    #[arg(long)]
    email: Option<String>,
    /// Name shown to people.
    #[arg(long)]
    display_name: Option<String>,
    /// Create the user disabled.
    #[arg(long)]
    disabled: bool,
}

impl Fields for UserFields {
    fn to_json(&self) -> anyhow::Result<Map<String, Value>> {
        let mut m = Map::new();
        put(&mut m, "email", &self.email);
        put(&mut m, "display_name", &self.display_name);
        if self.disabled {
            m.insert("disabled".into(), json!(true));
        }
        Ok(m)
    }
}

/// User fields to change.
#[derive(Debug, Args)]
pub struct UserUpdate {
    /// E-mail address.
    #[arg(long)]
    email: Option<String>,
    /// Name shown to people.
    #[arg(long)]
    display_name: Option<String>,
    /// Disable the user (`--disabled`, or `--disabled true`); `--disabled false` enables.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    disabled: Option<bool>,
}

impl Fields for UserUpdate {
    fn to_json(&self) -> anyhow::Result<Map<String, Value>> {
        let mut m = Map::new();
        put(&mut m, "email", &self.email);
        put(&mut m, "display_name", &self.display_name);
        put(&mut m, "disabled", &self.disabled);
        Ok(m)
    }
}

/// Role fields.
#[derive(Debug, Args)]
pub struct RoleFields {
    /// Free text.
    #[arg(long)]
    description: Option<String>,
    /// A member (repeat for more).
    #[arg(long = "member")]
    members: Vec<String>,
}

impl Fields for RoleFields {
    fn to_json(&self) -> anyhow::Result<Map<String, Value>> {
        let mut m = Map::new();
        put(&mut m, "description", &self.description);
        if !self.members.is_empty() {
            m.insert("members".into(), json!(self.members));
        }
        Ok(m)
    }
}

/// Role fields to change.
#[derive(Debug, Args)]
pub struct RoleUpdate {
    /// Free text.
    #[arg(long)]
    description: Option<String>,
    /// Replace the members with these (comma separated; empty for none).
    #[arg(long, value_delimiter = ',')]
    members: Option<Vec<String>>,
    /// Add a member (repeat for more).
    #[arg(long)]
    add_member: Vec<String>,
    /// Remove a member (repeat for more).
    #[arg(long)]
    remove_member: Vec<String>,
}

impl Fields for RoleUpdate {
    fn to_json(&self) -> anyhow::Result<Map<String, Value>> {
        let mut m = Map::new();
        put(&mut m, "description", &self.description);
        if let Some(members) = &self.members {
            let members: Vec<&String> = members.iter().filter(|s| !s.is_empty()).collect();
            m.insert("members".into(), json!(members));
        }
        Ok(m)
    }
}

/// Identity provider fields.
#[derive(Debug, Args)]
pub struct IdpFields {
    #[command(flatten)]
    common: IdpCommon,
    /// Treat the provider's e-mail addresses as verified even without `email_verified`
    /// (for providers such as Microsoft Entra ID that do not send the claim but only issue
    /// addresses from their own directory).
    #[arg(long)]
    trust_email: bool,
    /// Sign in only people who already have a user (linked, or with their verified
    /// e-mail address); by default a first sign-in creates one.
    #[arg(long)]
    no_auto_create: bool,
    /// At sign-out, have the provider send the browser back to the auth host's
    /// `/.warren/signed_out` page (register that URL with the provider first).
    #[arg(long)]
    post_logout_redirect: bool,
}

/// Identity provider fields that creating and changing one share.
#[derive(Debug, Args)]
pub struct IdpCommon {
    /// Issuer URL (https://, or http:// on loopback).
    #[arg(long)]
    issuer: Option<String>,
    /// OAuth client id.
    #[arg(long)]
    client_id: Option<String>,
    /// Read the client secret from this file (`-` for standard input).
    #[arg(long)]
    client_secret_file: Option<String>,
    /// Read the client secret from this environment variable.
    #[arg(long)]
    client_secret_env: Option<String>,
    /// A scope to request besides openid (repeat for more).
    #[arg(long = "scope")]
    scopes: Vec<String>,
    /// The ID token claim that lists groups.
    #[arg(long)]
    groups_claim: Option<String>,
    /// What the sign-in page calls the provider (`Acme staff`); its name by default.
    #[arg(long)]
    display_name: Option<String>,
}

fn secret(file: &Option<String>, env: &Option<String>) -> anyhow::Result<Option<String>> {
    match (file, env) {
        (Some(_), Some(_)) => {
            anyhow::bail!("give --client-secret-file or --client-secret-env, not both")
        }
        (Some(f), None) => Ok(Some(
            read_source(f)?.trim_end_matches(['\r', '\n']).to_owned(),
        )),
        (None, Some(v)) => std::env::var(v)
            .map(Some)
            .map_err(|_| anyhow::anyhow!("--client-secret-env: {v} is not set")),
        (None, None) => Ok(None),
    }
}

impl Fields for IdpFields {
    fn to_json(&self) -> anyhow::Result<Map<String, Value>> {
        let mut m = self.common.to_json()?;
        if self.trust_email {
            m.insert("trust_email".into(), json!(true));
        }
        if self.no_auto_create {
            m.insert("auto_create".into(), json!(false));
        }
        if self.post_logout_redirect {
            m.insert("post_logout_redirect".into(), json!(true));
        }
        Ok(m)
    }
}

impl Fields for IdpCommon {
    fn to_json(&self) -> anyhow::Result<Map<String, Value>> {
        let mut m = Map::new();
        put(&mut m, "issuer", &self.issuer);
        put(&mut m, "client_id", &self.client_id);
        put(
            &mut m,
            "client_secret",
            &secret(&self.client_secret_file, &self.client_secret_env)?,
        );
        if !self.scopes.is_empty() {
            m.insert("scopes".into(), json!(self.scopes));
        }
        put(&mut m, "groups_claim", &self.groups_claim);
        put(&mut m, "display_name", &self.display_name);
        Ok(m)
    }
}

/// Identity provider fields to change.
#[derive(Debug, Args)]
pub struct IdpUpdate {
    #[command(flatten)]
    fields: IdpCommon,
    /// Treat the provider's e-mail addresses as verified without `email_verified` (`true`)
    /// or not (`false`).
    #[arg(long)]
    trust_email: Option<bool>,
    /// Create a user at a first sign-in (`--auto-create`, or `true`) or not (`false`).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    auto_create: Option<bool>,
    /// Have the provider send the browser back after sign-out (`--post-logout-redirect`,
    /// or `true`) or not (`false`).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    post_logout_redirect: Option<bool>,
    /// Drop the display name (the page shows the provider's name).
    #[arg(long, conflicts_with = "display_name")]
    no_display_name: bool,
}

impl Fields for IdpUpdate {
    fn to_json(&self) -> anyhow::Result<Map<String, Value>> {
        let mut m = self.fields.to_json()?;
        put(&mut m, "trust_email", &self.trust_email);
        put(&mut m, "auto_create", &self.auto_create);
        put(&mut m, "post_logout_redirect", &self.post_logout_redirect);
        if self.no_display_name {
            m.insert("display_name".into(), Value::Null);
        }
        Ok(m)
    }
}

/// Site fields.
#[derive(Debug, Args)]
pub struct SiteFields {
    /// Free text.
    #[arg(long)]
    description: Option<String>,
}

impl Fields for SiteFields {
    fn to_json(&self) -> anyhow::Result<Map<String, Value>> {
        let mut m = Map::new();
        put(&mut m, "description", &self.description);
        Ok(m)
    }
}

/// Resource fields.
#[derive(Debug, Args)]
pub struct ResourceFields {
    /// The site whose agent reaches the targets.
    #[arg(long)]
    site: Option<String>,
    /// Web app on this host name.
    #[arg(long, conflicts_with_all = ["tcp", "udp", "private"])]
    http: Option<String>,
    /// With --http: only under this path prefix.
    #[arg(long, requires = "http")]
    path_prefix: Option<String>,
    /// TCP service on this port of every node.
    #[arg(long, conflicts_with_all = ["udp", "private"])]
    tcp: Option<u16>,
    /// UDP service on this port of every node.
    #[arg(long, conflicts_with = "private")]
    udp: Option<u16>,
    /// Private resource inside the site, reached with the `warren` client: an IP address,
    /// a network (10.0.0.0/24) or a DNS name the agent resolves.
    #[arg(long)]
    private: Option<String>,
    /// With --private: the ports users may reach, like 22,5432,8000-8100 (default all).
    #[arg(long, requires = "private")]
    ports: Option<String>,
    /// With --private: a protocol users may send, tcp, udp or icmp (repeat; default tcp
    /// and udp).
    #[arg(long = "protocol", requires = "private")]
    protocols: Vec<String>,
    /// With --private: the short name users type (`warren connect <alias>`).
    #[arg(long, requires = "private")]
    alias: Option<String>,
    /// Upstream host:port (repeat for more).
    #[arg(long = "target")]
    targets: Vec<String>,
    /// A policy that decides access (repeat for more).
    #[arg(long = "policy")]
    policies: Vec<String>,
    /// With a path prefix: put this in its place in the path sent upstream.
    #[arg(long, conflicts_with = "strip_prefix")]
    prefix_rewrite: Option<String>,
    /// With a path prefix: take it off the path sent upstream (`--prefix-rewrite /`).
    #[arg(long)]
    strip_prefix: bool,
}

impl ResourceFields {
    fn route(&self) -> Option<Value> {
        if let Some(domain) = &self.http {
            Some(json!({"http": {"domain": domain, "path_prefix": self.path_prefix}}))
        } else if let Some(address) = &self.private {
            let mut private = json!({"address": address});
            if let Some(ports) = &self.ports {
                private["ports"] = json!(ports);
            }
            if !self.protocols.is_empty() {
                private["protocols"] = json!(self.protocols);
            }
            if let Some(alias) = &self.alias {
                private["alias"] = json!(alias);
            }
            Some(json!({ "private": private }))
        } else if let Some(port) = self.tcp {
            Some(json!({"tcp": {"port": port}}))
        } else {
            self.udp.map(|port| json!({"udp": {"port": port}}))
        }
    }
}

impl Fields for ResourceFields {
    fn to_json(&self) -> anyhow::Result<Map<String, Value>> {
        let mut m = Map::new();
        put(&mut m, "site", &self.site);
        put(&mut m, "route", &self.route());
        if !self.targets.is_empty() {
            m.insert("targets".into(), json!(self.targets));
        }
        if !self.policies.is_empty() {
            m.insert("policies".into(), json!(self.policies));
        }
        let rewrite = if self.strip_prefix {
            Some("/")
        } else {
            self.prefix_rewrite.as_deref()
        };
        if let Some(r) = rewrite {
            m.insert("http".into(), json!({ "prefix_rewrite": r }));
        }
        Ok(m)
    }
}

/// Resource fields to change.
#[derive(Debug, Args)]
pub struct ResourceUpdate {
    #[command(flatten)]
    fields: ResourceFields,
    /// Serve the targets from the nodes directly (no site).
    #[arg(long, conflicts_with = "site")]
    no_site: bool,
    /// Send the path upstream as it came (drop a prefix rewrite).
    #[arg(long, conflicts_with_all = ["prefix_rewrite", "strip_prefix"])]
    no_prefix_rewrite: bool,
}

impl Fields for ResourceUpdate {
    fn to_json(&self) -> anyhow::Result<Map<String, Value>> {
        let mut m = self.fields.to_json()?;
        if self.no_site {
            m.insert("site".into(), Value::Null);
        }
        if self.no_prefix_rewrite {
            m.insert("http".into(), json!({ "prefix_rewrite": null }));
        }
        Ok(m)
    }
}

/// Policy fields: the rules come from a file.
#[derive(Debug, Args)]
pub struct PolicyFields {
    /// Free text.
    #[arg(long)]
    description: Option<String>,
    /// YAML or JSON file with `allow:` and/or `deny:` rules (`-` for standard input).
    #[arg(long)]
    rules: Option<String>,
}

impl Fields for PolicyFields {
    fn to_json(&self) -> anyhow::Result<Map<String, Value>> {
        let mut m = Map::new();
        put(&mut m, "description", &self.description);
        if let Some(path) = &self.rules {
            let rules: Value = from_yaml(&read_source(path)?, path)?;
            let Value::Object(rules) = rules else {
                anyhow::bail!("{path}: expected a map with `allow:` and/or `deny:`");
            };
            for (k, v) in rules {
                if k != "allow" && k != "deny" {
                    anyhow::bail!(
                        "{path}: unknown key {k:?}; a rules file has `allow:` and/or `deny:`"
                    );
                }
                m.insert(k, v);
            }
        }
        Ok(m)
    }
}

/// Device verbs.
#[derive(Debug, Subcommand)]
pub enum DeviceCmd {
    /// List the devices.
    List,
    /// Show one.
    Get {
        /// Its name.
        name: String,
    },
    /// Delete a device: it reaches nothing from now on (signing in on it registers it
    /// again, with a new address).
    Delete {
        /// Its name.
        name: String,
    },
}

/// Node verbs.
#[derive(Debug, Subcommand)]
pub enum NodeCmd {
    /// List the nodes.
    List,
    /// Show one.
    Get {
        /// Its name.
        name: String,
    },
    /// Change a node's region.
    Update {
        /// Its name.
        name: String,
        /// New region label.
        #[arg(long)]
        region: String,
    },
    /// Forget a node that is no longer a member (a relay-only node: revoke it).
    Delete {
        /// Its name.
        name: String,
    },
}

/// Cluster verbs.
#[derive(Debug, Subcommand)]
pub enum ClusterCmd {
    /// Members, leader, term, log positions and reachability.
    Status,
    /// Add a known node (it ran `warren-node join` once) to the membership.
    Add {
        /// Node name.
        name: String,
        /// As a learner (replicates, never votes) instead of a voter.
        #[arg(long)]
        learner: bool,
    },
    /// Remove a node from the membership.
    Remove {
        /// Node name.
        name: String,
    },
    /// Make a learner a voter.
    Promote {
        /// Node name.
        name: String,
    },
    /// Show the cluster's title, or set it: the name its sign-in and error pages show.
    Title {
        /// The new title (1 to 64 characters).
        #[arg(conflicts_with = "clear")]
        title: Option<String>,
        /// Remove the title (the pages then say "Warren").
        #[arg(long)]
        clear: bool,
    },
}

/// Certificate verbs.
#[derive(Debug, Subcommand)]
pub enum CertCmd {
    /// List certificates: names they serve, expiry, source (never their keys).
    List,
    /// Show one.
    Get {
        /// Its name.
        name: String,
    },
    /// Upload a certificate and its key (PEM files); the key is stored in the registry
    /// and never shown again. The proxy serves it for the DNS names of its leaf.
    Add {
        /// Its name.
        name: String,
        /// PEM file with the certificate chain, leaf first.
        #[arg(long)]
        cert: String,
        /// PEM file with the private key (`-` for standard input).
        #[arg(long)]
        key: String,
    },
    /// Delete a certificate (an ACME one is ordered again while a resource needs it).
    Delete {
        /// Its name.
        name: String,
    },
}

/// API key verbs.
#[derive(Debug, Subcommand)]
pub enum ApiKeyCmd {
    /// List keys (never their secrets).
    List,
    /// Show one.
    Get {
        /// Its name.
        name: String,
    },
    /// Create a key; it is shown once.
    Create {
        /// Its name.
        name: String,
        /// It may only read.
        #[arg(long)]
        read_only: bool,
    },
    /// Revoke a key.
    Revoke {
        /// Its name.
        name: String,
    },
}

/// Join token verbs.
#[derive(Debug, Subcommand)]
pub enum JoinTokenCmd {
    /// List tokens (never their secrets).
    List,
    /// Create a token; it is shown once.
    Create {
        /// What a node joining with it may be: `voter` (votes, holds the cluster CA key,
        /// admits nodes and sites) or `learner` (a full replica that never votes and never
        /// gets the CA key, for a node you trust less, such as one far away) or `relay` (a
        /// relay-only node, `warren-node relay`: no registry, no vote, ciphertext only).
        #[arg(long, default_value = "voter", value_parser = ["voter", "learner", "relay"])]
        role: String,
    },
    /// Revoke a token.
    Revoke {
        /// Its id.
        id: String,
    },
}

/// Runs an admin command; the error is what to print.
pub async fn run(conn: &Connection, cmd: AdminCmd) -> anyhow::Result<()> {
    let client = connect(conn)?;
    let json = conn.json;
    match cmd {
        AdminCmd::User { cmd } => {
            let columns = ["name", "email", "display_name", "disabled", "revision"];
            match cmd {
                EntityCmd::Get { name } if !json => {
                    let mut v = client
                        .call::<()>(Method::GET, &format!("/v1/users/{}", enc(&name)), None)
                        .await?;
                    let ids = client
                        .call::<()>(
                            Method::GET,
                            &format!("/v1/users/{}/identities", enc(&name)),
                            None,
                        )
                        .await?;
                    let linked: Vec<String> = ids
                        .get("items")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                        .map(|i| {
                            format!(
                                "{} {}",
                                output::cell(i.get("idp")),
                                output::cell(i.get("subject"))
                            )
                        })
                        .collect();
                    if let Value::Object(m) = &mut v {
                        m.insert("identities".into(), json!(linked));
                    }
                    let mut cols = columns.to_vec();
                    cols.insert(cols.len() - 1, "identities");
                    output::print(&v, &cols, false);
                    Ok(())
                }
                cmd => entity(&client, json, "users", &columns, cmd).await,
            }
        }
        AdminCmd::Role { cmd } => role(&client, json, cmd).await,
        AdminCmd::Idp { cmd } => {
            entity(
                &client,
                json,
                "identity-providers",
                &[
                    "name",
                    "issuer",
                    "client_id",
                    "client_secret_set",
                    "scopes",
                    "groups_claim",
                    "trust_email",
                    "display_name",
                    "auto_create",
                ],
                cmd,
            )
            .await
        }
        AdminCmd::Site { cmd } => {
            let columns = ["name", "description", "revision"];
            match cmd {
                EntityCmd::List if !json => site_table(&client, None).await,
                EntityCmd::Get { name } if !json => site_table(&client, Some(&name)).await,
                cmd => entity(&client, json, "sites", &columns, cmd).await,
            }
        }
        AdminCmd::Resource { cmd } => {
            let columns = ["name", "site", "route", "targets", "policies", "revision"];
            match cmd {
                EntityCmd::List if !json => resource_table(&client, None, &columns).await,
                EntityCmd::Get { name } if !json => {
                    resource_table(&client, Some(&name), &columns).await
                }
                cmd => entity(&client, json, "resources", &columns, cmd).await,
            }
        }
        AdminCmd::Cert { cmd } => cert(&client, json, cmd).await,
        AdminCmd::Policy { cmd } => {
            entity(
                &client,
                json,
                "policies",
                &["name", "description", "allow", "deny", "revision"],
                cmd,
            )
            .await
        }
        AdminCmd::Device { cmd } => device(&client, json, cmd).await,
        AdminCmd::Node { cmd } => node(&client, json, cmd).await,
        AdminCmd::Cluster { cmd } => cluster(&client, json, cmd).await,
        AdminCmd::ApiKey { cmd } => api_key(&client, json, cmd).await,
        AdminCmd::JoinToken { cmd } => join_token(&client, json, cmd).await,
        AdminCmd::SiteToken { site, expires_in } => {
            let body = serde_json::json!({ "expires_in_s": expires_in });
            let v = client
                .call(
                    Method::POST,
                    &format!("/v1/sites/{}/tokens", enc(&site)),
                    Some(&body),
                )
                .await?;
            if json {
                output::print(&v, &[], true);
            } else {
                println!("site token for {site}; it works once and is shown only now:");
                println!("{}", output::cell(v.get("token")));
                println!("run: warren-agent --token <token> --node <node cluster address>");
            }
            Ok(())
        }
        AdminCmd::Apply {
            file,
            prune,
            dry_run,
        } => apply(&client, json, &file, prune, dry_run).await,
    }
}

fn connect(conn: &Connection) -> anyhow::Result<Client> {
    let key = match (&conn.api_key, &conn.api_key_file) {
        (Some(k), _) => k.clone(),
        (None, Some(f)) => std::fs::read_to_string(f)
            .map_err(|e| anyhow::anyhow!("--api-key-file {}: {e}", f.display()))?,
        (None, None) => {
            anyhow::bail!("no API key: set WARREN_API_KEY (or --api-key, --api-key-file)")
        }
    };
    let ca = conn.ca.as_ref().ok_or_else(|| {
        anyhow::anyhow!(
            "no CA: set WARREN_CA (or --ca) to the cluster CA, ca.pem in a node's data directory"
        )
    })?;
    Client::new(&conn.addr, &key, ca)
}

fn enc(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c.to_string()
            } else {
                format!("%{:02X}", c as u32 & 0xff)
            }
        })
        .collect()
}

async fn entity<C: Args + Fields, U: Args + Fields>(
    client: &Client,
    json: bool,
    path: &str,
    columns: &[&str],
    cmd: EntityCmd<C, U>,
) -> anyhow::Result<()> {
    match cmd {
        EntityCmd::List => {
            let v = client
                .call::<()>(Method::GET, &format!("/v1/{path}"), None)
                .await?;
            output::print(&v, columns, json);
        }
        EntityCmd::Get { name } => {
            let v = client
                .call::<()>(Method::GET, &format!("/v1/{path}/{}", enc(&name)), None)
                .await?;
            output::print(&v, columns, json);
        }
        EntityCmd::Create { name, file, fields } => {
            let mut body = match &file {
                Some(f) => match from_yaml::<Value>(&read_source(f)?, f)? {
                    Value::Object(m) => m,
                    _ => anyhow::bail!("{f}: expected a map of fields"),
                },
                None => Map::new(),
            };
            if let Some(n) = name {
                body.insert("name".into(), json!(n));
            }
            if !body.contains_key("name") {
                anyhow::bail!("give the name as an argument or in the file");
            }
            body.extend(fields.to_json()?);
            let v = client
                .call(Method::POST, &format!("/v1/{path}"), Some(&body))
                .await?;
            print_warnings(&v);
            if json {
                output::print(&v, columns, true);
            } else {
                println!("created {} {}", singular(path), cellname(&v));
            }
        }
        EntityCmd::Update {
            name,
            revision,
            fields,
        } => {
            let mut body = fields.to_json()?;
            if body.is_empty() {
                anyhow::bail!("nothing to change: give at least one field flag");
            }
            put(&mut body, "revision", &revision);
            let v = client
                .call(
                    Method::PATCH,
                    &format!("/v1/{path}/{}", enc(&name)),
                    Some(&body),
                )
                .await?;
            print_warnings(&v);
            if json {
                output::print(&v, columns, true);
            } else {
                println!(
                    "updated {} {} (revision {})",
                    singular(path),
                    name,
                    output::cell(v.get("revision"))
                );
            }
        }
        EntityCmd::Delete { name, revision } => {
            let q = revision
                .map(|r| format!("?revision={r}"))
                .unwrap_or_default();
            let v = client
                .call::<()>(
                    Method::DELETE,
                    &format!("/v1/{path}/{}{q}", enc(&name)),
                    None,
                )
                .await?;
            if json {
                output::print(&v, &[], true);
            } else {
                println!("deleted {} {name}", singular(path));
                for c in v
                    .get("cascaded")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    println!(
                        "  also updated {} {} ({})",
                        output::cell(c.get("kind")),
                        output::cell(c.get("name")),
                        output::cell(c.get("fields"))
                    );
                }
            }
        }
    }
    Ok(())
}

fn cellname(v: &Value) -> String {
    output::cell(v.get("name"))
}

fn singular(path: &str) -> &str {
    match path {
        "users" => "user",
        "roles" => "role",
        "identity-providers" => "identity provider",
        "sites" => "site",
        "resources" => "resource",
        "policies" => "policy",
        other => other,
    }
}

async fn role(
    client: &Client,
    json: bool,
    cmd: EntityCmd<RoleFields, RoleUpdate>,
) -> anyhow::Result<()> {
    let columns = ["name", "members", "description", "revision"];
    let EntityCmd::Update {
        name,
        revision,
        fields,
    } = cmd
    else {
        return entity(client, json, "roles", &columns, cmd).await;
    };
    if fields.add_member.is_empty() && fields.remove_member.is_empty() {
        return entity::<RoleFields, RoleUpdate>(
            client,
            json,
            "roles",
            &columns,
            EntityCmd::Update {
                name,
                revision,
                fields,
            },
        )
        .await;
    }
    if fields.members.is_some() {
        anyhow::bail!("give --members, or --add-member/--remove-member, not both");
    }
    // Adding or removing needs the current list: read it, change it, and write it back only
    // if nobody changed the role in between.
    let current: Value = client.get(&format!("/v1/roles/{}", enc(&name))).await?;
    let mut members: Vec<String> = current
        .get("members")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|m| m.as_str().map(str::to_owned))
        .collect();
    members.retain(|m| !fields.remove_member.contains(m));
    for m in &fields.add_member {
        if !members.contains(m) {
            members.push(m.clone());
        }
    }
    let mut body = fields.to_json()?;
    body.insert("members".into(), json!(members));
    let rev = revision.or_else(|| current.get("revision").and_then(Value::as_u64));
    put(&mut body, "revision", &rev);
    let v = client
        .call(
            Method::PATCH,
            &format!("/v1/roles/{}", enc(&name)),
            Some(&body),
        )
        .await?;
    if json {
        output::print(&v, &columns, true);
    } else {
        println!(
            "updated role {name}: members {}",
            output::cell(v.get("members"))
        );
    }
    Ok(())
}

/// The columns of `warren admin device list|get`.
const DEVICE_COLUMNS: [&str; 8] = [
    "name",
    "owner",
    "os",
    "address",
    "public_key",
    "created",
    "last_seen",
    "last_address",
];

/// A device as the table shows it: times as UTC dates rather than epoch seconds.
fn device_row(v: &Value) -> Value {
    let mut row = v.clone();
    if let Some(m) = row.as_object_mut() {
        for (from, to) in [("created_at", "created"), ("last_seen", "last_seen")] {
            let at = m.get(from).and_then(Value::as_i64).and_then(|t| {
                jiff::Timestamp::from_second(t)
                    .ok()
                    .map(|t| t.strftime("%Y-%m-%d %H:%M:%SZ").to_string())
            });
            m.insert(to.into(), at.map_or(Value::Null, Value::String));
        }
    }
    row
}

async fn device(client: &Client, json: bool, cmd: DeviceCmd) -> anyhow::Result<()> {
    let show = |v: Value| {
        if json {
            output::print(&v, &[], true);
            return;
        }
        let rows: Vec<Value> = match v.get("items").and_then(Value::as_array) {
            Some(items) => items.iter().map(device_row).collect(),
            None => vec![device_row(&v)],
        };
        let rows: Vec<&Value> = rows.iter().collect();
        println!("{}", output::table(&rows, &DEVICE_COLUMNS));
    };
    match cmd {
        DeviceCmd::List => show(client.call::<()>(Method::GET, "/v1/devices", None).await?),
        DeviceCmd::Get { name } => show(
            client
                .call::<()>(Method::GET, &format!("/v1/devices/{}", enc(&name)), None)
                .await?,
        ),
        DeviceCmd::Delete { name } => {
            let v = client
                .call::<()>(Method::DELETE, &format!("/v1/devices/{}", enc(&name)), None)
                .await?;
            if json {
                output::print(&v, &[], true);
            } else {
                println!("deleted device {name}");
            }
        }
    }
    Ok(())
}

async fn node(client: &Client, json: bool, cmd: NodeCmd) -> anyhow::Result<()> {
    let columns = [
        "id",
        "name",
        "role",
        "grade",
        "cluster_addr",
        "admin_addr",
        "region",
    ];
    match cmd {
        NodeCmd::List => output::print(
            &client.call::<()>(Method::GET, "/v1/nodes", None).await?,
            &columns,
            json,
        ),
        NodeCmd::Get { name } => output::print(
            &client
                .call::<()>(Method::GET, &format!("/v1/nodes/{}", enc(&name)), None)
                .await?,
            &columns,
            json,
        ),
        NodeCmd::Update { name, region } => {
            let v = client
                .call(
                    Method::PATCH,
                    &format!("/v1/nodes/{}", enc(&name)),
                    Some(&json!({"region": region})),
                )
                .await?;
            output::print(&v, &columns, json);
        }
        NodeCmd::Delete { name } => {
            client
                .call::<()>(Method::DELETE, &format!("/v1/nodes/{}", enc(&name)), None)
                .await?;
            if !json {
                println!("deleted node {name}");
            }
        }
    }
    Ok(())
}

async fn cluster(client: &Client, json: bool, cmd: ClusterCmd) -> anyhow::Result<()> {
    let member_columns = ["id", "name", "role", "cluster_addr", "admin_addr", "region"];
    let v = match cmd {
        ClusterCmd::Status => {
            let v = client.call::<()>(Method::GET, "/v1/cluster", None).await?;
            if json {
                output::print(&v, &[], true);
            } else {
                print_status(&serde_json::from_value(v)?);
            }
            return Ok(());
        }
        ClusterCmd::Add { name, learner } => {
            let role = if learner { "learner" } else { "voter" };
            client
                .call(
                    Method::POST,
                    "/v1/cluster/members",
                    Some(&json!({"node": name, "role": role})),
                )
                .await?
        }
        ClusterCmd::Remove { name } => {
            client
                .call::<()>(
                    Method::DELETE,
                    &format!("/v1/cluster/members/{}", enc(&name)),
                    None,
                )
                .await?
        }
        ClusterCmd::Promote { name } => {
            client
                .call::<()>(
                    Method::POST,
                    &format!("/v1/cluster/members/{}/promote", enc(&name)),
                    None,
                )
                .await?
        }
        ClusterCmd::Title { title, clear } => {
            let v = if title.is_some() || clear {
                client
                    .call(
                        Method::PUT,
                        "/v1/cluster/title",
                        Some(&json!({ "title": title })),
                    )
                    .await?
            } else {
                client
                    .call::<()>(Method::GET, "/v1/cluster/title", None)
                    .await?
            };
            if json {
                output::print(&v, &[], true);
            } else {
                println!("{}", v["title"].as_str().unwrap_or("(none)"));
            }
            return Ok(());
        }
    };
    output::print(&v, &member_columns, json);
    Ok(())
}

fn print_status(s: &ClusterStatus) {
    println!(
        "cluster {}   leader {}   term {}{}   (answered by {})",
        s.cluster_id,
        s.leader.as_ref().map_or("none", |l| l.as_str()),
        s.term,
        if s.joint {
            "   membership change in progress"
        } else {
            ""
        },
        s.answered_by
    );
    let rows: Vec<Value> = s
        .members
        .iter()
        .map(|m| {
            json!({
                "name": m.name, "id": m.id, "role": m.role, "state": m.state,
                "reachable": if m.reachable { "yes".to_owned() } else { format!("no: {}", m.error.clone().unwrap_or_default()) },
                "term": m.term, "last_log": m.last_log_index, "applied": m.last_applied,
                "snapshot": m.snapshot_index, "rtt_ms": m.rtt_us.map(|u| format!("{:.2}", u as f64 / 1000.0)),
                "cluster_addr": m.cluster_addr,
            })
        })
        .collect();
    let refs: Vec<&Value> = rows.iter().collect();
    println!(
        "{}",
        output::table(
            &refs,
            &[
                "name",
                "id",
                "role",
                "state",
                "reachable",
                "term",
                "last_log",
                "applied",
                "snapshot",
                "rtt_ms",
                "cluster_addr"
            ]
        )
    );
}

/// The API's warnings about what was just written (it was written), on stderr.
fn print_warnings(v: &Value) {
    for w in v
        .get("warnings")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
    {
        eprintln!("warning: {w}");
    }
}

const CERT_COLUMNS: [&str; 5] = ["name", "domains", "not_after", "source", "revision"];

async fn cert(client: &Client, json: bool, cmd: CertCmd) -> anyhow::Result<()> {
    match cmd {
        CertCmd::List => output::print(
            &client
                .call::<()>(Method::GET, "/v1/certificates", None)
                .await?,
            &CERT_COLUMNS,
            json,
        ),
        CertCmd::Get { name } => output::print(
            &client
                .call::<()>(
                    Method::GET,
                    &format!("/v1/certificates/{}", enc(&name)),
                    None,
                )
                .await?,
            &CERT_COLUMNS,
            json,
        ),
        CertCmd::Add { name, cert, key } => {
            let cert_pem = read_source(&cert)?;
            let key_pem = read_source(&key)?;
            let v = client
                .call(
                    Method::POST,
                    "/v1/certificates",
                    Some(&json!({"name": name, "cert_pem": cert_pem, "key_pem": key_pem})),
                )
                .await?;
            if json {
                output::print(&v, &CERT_COLUMNS, true);
            } else {
                println!(
                    "added certificate {name} for {} (valid until {})",
                    output::cell(v.get("domains")),
                    output::time_cell(v.get("not_after"))
                );
            }
        }
        CertCmd::Delete { name } => {
            client
                .call::<()>(
                    Method::DELETE,
                    &format!("/v1/certificates/{}", enc(&name)),
                    None,
                )
                .await?;
            if !json {
                println!("deleted certificate {name}");
            }
        }
    }
    Ok(())
}

/// Sites as a table with their status: connected or not, the nodes holding a tunnel, the
/// agents connected to the node asked (address, version) and when one was last seen.
async fn site_table(client: &Client, name: Option<&str>) -> anyhow::Result<()> {
    let v = match name {
        Some(n) => {
            client
                .call::<()>(Method::GET, &format!("/v1/sites/{}", enc(n)), None)
                .await?
        }
        None => client.call::<()>(Method::GET, "/v1/sites", None).await?,
    };
    let mut rows: Vec<Value> = match v.get("items").and_then(Value::as_array) {
        Some(items) => items.clone(),
        None => vec![v],
    };
    for r in &mut rows {
        let Some(site) = r.get("name").and_then(Value::as_str).map(str::to_owned) else {
            continue;
        };
        let st = client
            .call::<()>(
                Method::GET,
                &format!("/v1/sites/{}/status", enc(&site)),
                None,
            )
            .await?;
        let agents = st
            .get("agents")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let pick = |k: &str| -> Value {
            json!(agents
                .iter()
                .filter_map(|a| a.get(k).and_then(Value::as_str))
                .collect::<Vec<_>>())
        };
        if let Value::Object(m) = r {
            let connected = st.get("connected").and_then(Value::as_bool) == Some(true);
            m.insert(
                "status".into(),
                json!(if connected { "connected" } else { "offline" }),
            );
            m.insert(
                "tunnels_on".into(),
                st.get("nodes").cloned().unwrap_or(Value::Null),
            );
            m.insert("agent_address".into(), pick("address"));
            m.insert("agent_version".into(), pick("version"));
            m.insert(
                "last_seen".into(),
                st.get("last_seen").cloned().unwrap_or(Value::Null),
            );
        }
    }
    let cols = [
        "name",
        "description",
        "status",
        "tunnels_on",
        "agent_address",
        "agent_version",
        "last_seen",
        "revision",
    ];
    let refs: Vec<&Value> = rows.iter().collect();
    println!("{}", output::table(&refs, &cols));
    Ok(())
}

/// Resources as a table with a column saying whether each web resource's host has a
/// certificate valid now (and until when).
async fn resource_table(
    client: &Client,
    name: Option<&str>,
    columns: &[&str],
) -> anyhow::Result<()> {
    let v = match name {
        Some(n) => {
            client
                .call::<()>(Method::GET, &format!("/v1/resources/{}", enc(n)), None)
                .await?
        }
        None => {
            client
                .call::<()>(Method::GET, "/v1/resources", None)
                .await?
        }
    };
    let certs = client
        .call::<()>(Method::GET, "/v1/certificates", None)
        .await?;
    let certs: Vec<(Vec<String>, i64)> = certs
        .get("items")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|c| {
                    let domains = c
                        .get("domains")
                        .and_then(Value::as_array)
                        .map(|d| {
                            d.iter()
                                .filter_map(Value::as_str)
                                .map(str::to_owned)
                                .collect()
                        })
                        .unwrap_or_default();
                    (
                        domains,
                        c.get("not_after").and_then(Value::as_i64).unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let now = jiff::Timestamp::now().as_second();
    let mut rows: Vec<Value> = match v.get("items").and_then(Value::as_array) {
        Some(items) => items.clone(),
        None => vec![v],
    };
    for r in &mut rows {
        let host = r
            .pointer("/route/http/domain")
            .and_then(Value::as_str)
            .map(str::to_ascii_lowercase);
        let status = match host {
            None => "-".to_owned(),
            Some(h) => cert_status(&certs, &h, now),
        };
        if let Value::Object(m) = r {
            m.insert("certificate".into(), json!(status));
        }
    }
    let mut cols = columns.to_vec();
    cols.insert(cols.len() - 1, "certificate");
    let refs: Vec<&Value> = rows.iter().collect();
    println!("{}", output::table(&refs, &cols));
    Ok(())
}

/// `valid until <date>`, `expired <date>` or `none` for `host` among `certs` (names and
/// expiry): the latest-expiring certificate whose names cover it.
fn cert_status(certs: &[(Vec<String>, i64)], host: &str, now: i64) -> String {
    let covers = |n: &str| match n.strip_prefix("*.") {
        Some(suffix) => host
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == suffix),
        None => n == host,
    };
    let best = certs
        .iter()
        .filter(|(names, _)| names.iter().any(|n| covers(n)))
        .map(|(_, not_after)| *not_after)
        .max();
    match best {
        None => "none".into(),
        Some(t) if t > now => format!("valid until {}", output::time_cell(Some(&json!(t)))),
        Some(t) => format!("expired {}", output::time_cell(Some(&json!(t)))),
    }
}

async fn api_key(client: &Client, json: bool, cmd: ApiKeyCmd) -> anyhow::Result<()> {
    let columns = ["name", "key_id", "scope", "created_at", "revision"];
    match cmd {
        ApiKeyCmd::List => output::print(
            &client.call::<()>(Method::GET, "/v1/api-keys", None).await?,
            &columns,
            json,
        ),
        ApiKeyCmd::Get { name } => output::print(
            &client
                .call::<()>(Method::GET, &format!("/v1/api-keys/{}", enc(&name)), None)
                .await?,
            &columns,
            json,
        ),
        ApiKeyCmd::Create { name, read_only } => {
            let scope = if read_only { "read_only" } else { "admin" };
            let v = client
                .call(
                    Method::POST,
                    "/v1/api-keys",
                    Some(&json!({"name": name, "scope": scope})),
                )
                .await?;
            if json {
                output::print(&v, &[], true);
            } else {
                println!("created API key {name} ({scope}); it is shown only now:");
                println!("{}", output::cell(v.get("key")));
            }
        }
        ApiKeyCmd::Revoke { name } => {
            client
                .call::<()>(
                    Method::DELETE,
                    &format!("/v1/api-keys/{}", enc(&name)),
                    None,
                )
                .await?;
            if !json {
                println!("revoked API key {name}");
            }
        }
    }
    Ok(())
}

async fn join_token(client: &Client, json: bool, cmd: JoinTokenCmd) -> anyhow::Result<()> {
    match cmd {
        JoinTokenCmd::List => output::print(
            &client
                .call::<()>(Method::GET, "/v1/join-tokens", None)
                .await?,
            &["id", "role", "created_at", "revision"],
            json,
        ),
        JoinTokenCmd::Create { role } => {
            let v = client
                .call(
                    Method::POST,
                    "/v1/join-tokens",
                    Some(&serde_json::json!({ "role": role })),
                )
                .await?;
            if json {
                output::print(&v, &[], true);
            } else {
                println!(
                    "created {} join token {}; it is shown only now:",
                    output::cell(v.pointer("/join_token/role")),
                    output::cell(v.pointer("/join_token/id"))
                );
                println!("{}", output::cell(v.get("token")));
            }
        }
        JoinTokenCmd::Revoke { id } => {
            client
                .call::<()>(
                    Method::DELETE,
                    &format!("/v1/join-tokens/{}", enc(&id)),
                    None,
                )
                .await?;
            if !json {
                println!("revoked join token {id}");
            }
        }
    }
    Ok(())
}

/// The fields an update changed that the entity's entry in the file does not mention.
fn unmentioned(raw: &Value, c: &warren_proto::api::Change) -> Vec<String> {
    if c.action != ChangeAction::Update {
        return Vec::new();
    }
    let Some(key) = c.kind.manifest_key() else {
        return Vec::new();
    };
    let Some(entry) = raw.get(key).and_then(Value::as_array).and_then(|list| {
        list.iter()
            .find(|e| e.get("name").and_then(Value::as_str) == Some(c.name.as_str()))
    }) else {
        return Vec::new();
    };
    c.fields
        .iter()
        .filter(|f| entry.get(f.as_str()).is_none())
        .cloned()
        .collect()
}

async fn apply(
    client: &Client,
    json: bool,
    file: &str,
    prune: bool,
    dry_run: bool,
) -> anyhow::Result<()> {
    let text = read_source(file)?;
    let manifest: Manifest = from_yaml(&text, file)?;
    // The file as written, to tell fields it sets from fields it leaves out.
    let raw: Value = from_yaml(&text, file)?;
    let req = ApplyRequest {
        manifest,
        prune,
        dry_run,
    };
    let v = client.call(Method::POST, "/v1/apply", Some(&req)).await?;
    if json {
        output::print(&v, &[], true);
        return Ok(());
    }
    print_warnings(&v);
    let report: ApplyReport = serde_json::from_value(v)?;
    let verb = |a: ChangeAction| match (a, report.dry_run) {
        (ChangeAction::Create, false) => "created",
        (ChangeAction::Update, false) => "updated",
        (ChangeAction::Delete, false) => "deleted",
        (ChangeAction::Create, true) => "would create",
        (ChangeAction::Update, true) => "would update",
        (ChangeAction::Delete, true) => "would delete",
    };
    for c in &report.changes {
        let fields = if c.fields.is_empty() {
            String::new()
        } else {
            format!(" ({})", c.fields.join(", "))
        };
        println!("{} {} {}{fields}", verb(c.action), c.kind, c.name);
        let unset = unmentioned(&raw, c);
        if !unset.is_empty() {
            println!(
                "  {} to the default: the file does not set {} (apply makes each entity exactly what the file says; add {} to keep {})",
                if report.dry_run { "would reset" } else { "reset" },
                unset.join(", "),
                if unset.len() == 1 { "it" } else { "them" },
                if unset.len() == 1 { "its value" } else { "their values" },
            );
        }
    }
    if report.changes.is_empty() {
        println!("no changes ({} unchanged)", report.unchanged);
    } else {
        println!(
            "{} changes, {} unchanged",
            report.changes.len(),
            report.unchanged
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: EntityCmd<IdpFields, IdpUpdate>,
    }

    fn fields(args: &[&str]) -> Map<String, Value> {
        let cli = Cli::try_parse_from(std::iter::once("idp").chain(args.iter().copied())).unwrap();
        match cli.cmd {
            EntityCmd::Create { fields, .. } => fields.to_json(),
            EntityCmd::Update { fields, .. } => fields.to_json(),
            _ => panic!("not a create or an update"),
        }
        .unwrap()
    }

    #[derive(Parser)]
    struct ResourceCli {
        #[command(subcommand)]
        cmd: EntityCmd<ResourceFields, ResourceUpdate>,
    }

    #[test]
    fn a_private_resource_is_made_from_flags() {
        let cli = ResourceCli::try_parse_from([
            "resource",
            "create",
            "db",
            "--site",
            "hq",
            "--private",
            "db.internal",
            "--ports",
            "5432",
            "--protocol",
            "tcp",
            "--alias",
            "pg",
        ])
        .unwrap();
        let EntityCmd::Create { fields, .. } = cli.cmd else {
            panic!("a create")
        };
        let m = fields.to_json().unwrap();
        assert_eq!(
            m["route"],
            json!({"private": {"address": "db.internal", "ports": "5432", "protocols": ["tcp"], "alias": "pg"}})
        );
        assert!(
            ResourceCli::try_parse_from(["resource", "create", "db", "--ports", "22"]).is_err()
        );
        assert!(ResourceCli::try_parse_from([
            "resource",
            "create",
            "db",
            "--private",
            "10.0.0.5",
            "--tcp",
            "22"
        ])
        .is_err());
    }

    #[test]
    fn device_rows_show_dates() {
        let row = device_row(&json!({"name": "d", "created_at": 1_700_000_000, "last_seen": 0}));
        assert_eq!(row["created"], json!("2023-11-14 22:13:20Z"));
        assert_eq!(row["last_seen"], json!("1970-01-01 00:00:00Z"));
        assert_eq!(output::cell(row.get("last_address")), "-");
    }

    #[test]
    fn idp_trust_email_is_a_flag_to_create_and_a_value_to_update() {
        let create = [
            "create",
            "x",
            "--issuer",
            "https://i.example",
            "--client-id",
            "c",
        ];
        assert!(!fields(&create).contains_key("trust_email"));
        let m = fields(&[&create[..], &["--trust-email"]].concat());
        assert_eq!(m["trust_email"], json!(true));
        assert_eq!(m["issuer"], json!("https://i.example"));
        let m = fields(&["update", "x", "--trust-email", "false"]);
        assert_eq!(m, Map::from_iter([("trust_email".into(), json!(false))]));
        assert!(fields(&["update", "x", "--scope", "groups"])
            .get("trust_email")
            .is_none());
    }

    #[test]
    fn provider_and_resource_side_fields_have_flags() {
        let m = fields(&[
            "create",
            "x",
            "--issuer",
            "https://i.example",
            "--client-id",
            "c",
            "--display-name",
            "Acme staff",
            "--no-auto-create",
            "--post-logout-redirect",
        ]);
        assert_eq!(
            (
                &m["display_name"],
                &m["auto_create"],
                &m["post_logout_redirect"]
            ),
            (&json!("Acme staff"), &json!(false), &json!(true))
        );
        let m = fields(&["update", "x", "--auto-create", "--no-display-name"]);
        assert_eq!(
            m,
            Map::from_iter([
                ("auto_create".into(), json!(true)),
                ("display_name".into(), Value::Null)
            ])
        );
        let resource = |args: &[&str]| {
            let cli = ResourceCli::try_parse_from(
                std::iter::once("resource").chain(args.iter().copied()),
            )
            .unwrap();
            match cli.cmd {
                EntityCmd::Create { fields, .. } => fields.to_json(),
                EntityCmd::Update { fields, .. } => fields.to_json(),
                _ => panic!("not a create or an update"),
            }
            .unwrap()
        };
        let create = [
            "create",
            "w",
            "--http",
            "a.example",
            "--path-prefix",
            "/wiki",
        ];
        let m = resource(&[&create[..], &["--strip-prefix"]].concat());
        assert_eq!(m["http"], json!({"prefix_rewrite": "/"}));
        let m = resource(&[&create[..], &["--prefix-rewrite", "/app"]].concat());
        assert_eq!(m["http"], json!({"prefix_rewrite": "/app"}));
        let m = resource(&["update", "w", "--no-prefix-rewrite"]);
        assert_eq!(m["http"], json!({"prefix_rewrite": null}));
        assert!(ResourceCli::try_parse_from([
            "resource",
            "update",
            "w",
            "--strip-prefix",
            "--no-prefix-rewrite"
        ])
        .is_err());
    }
}

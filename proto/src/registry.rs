//! The entities the cluster replicates, and the checks each one passes on its own.
//!
//! Checks that need the whole registry (a duplicate name, a reference to an entity that
//! does not exist, two resources on one port) live with the registry's `apply` in
//! `consensus`; here each entity checks its own fields and lists its references.
//!
//! Every entity carries a `revision`: the Raft log index of its last change, set by the
//! cluster. A client that sends a non-zero `revision` with an update asks for the update to
//! happen only if the entity is still at that revision.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;

use base64::Engine as _;
use ipnet::IpNet;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::policy::Expr;
use crate::session::SessionId;
use crate::{Name, Secret};

/// A problem with one field of an entity or request; the caller sent it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("{field}: {reason}")]
pub struct FieldError {
    /// Path of the offending field, like `route.http.domain` or `targets[1]`.
    pub field: String,
    /// What was expected.
    pub reason: String,
}

impl FieldError {
    /// A new error for `field`.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The same error, with `prefix.` in front of its field path.
    pub fn within(mut self, prefix: &str) -> Self {
        self.field = if self.field.is_empty() {
            prefix.to_owned()
        } else if self.field.starts_with('[') {
            format!("{prefix}{}", self.field)
        } else {
            format!("{prefix}.{}", self.field)
        };
        self
    }
}

/// The kinds of entity in the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A person who signs in.
    User,
    /// A named group of users.
    Role,
    /// An OpenID Connect provider users sign in with.
    IdentityProvider,
    /// A private network reached through an agent.
    Site,
    /// Something users reach: a web app or a TCP/UDP service.
    Resource,
    /// Who may reach a resource, and when.
    Policy,
    /// A credential for the admin API.
    ApiKey,
    /// A `warren-node` in the cluster.
    Node,
    /// A credential that lets a new node join the cluster.
    JoinToken,
    /// A TLS certificate chain and key served for the domains it names.
    Certificate,
    /// A machine a user signed in on with the `warren` client: its WireGuard public key and
    /// tunnel address. Registered by the client, never declared.
    Device,
}

impl Kind {
    /// Every kind, in the order the registry lists them.
    pub const ALL: [Kind; 11] = [
        Kind::User,
        Kind::Role,
        Kind::IdentityProvider,
        Kind::Site,
        Kind::Resource,
        Kind::Policy,
        Kind::ApiKey,
        Kind::Node,
        Kind::JoinToken,
        Kind::Certificate,
        Kind::Device,
    ];

    /// The word for one entity of this kind, as messages use it.
    pub fn noun(self) -> &'static str {
        match self {
            Kind::User => "user",
            Kind::Role => "role",
            Kind::IdentityProvider => "identity provider",
            Kind::Site => "site",
            Kind::Resource => "resource",
            Kind::Policy => "policy",
            Kind::ApiKey => "API key",
            Kind::Node => "node",
            Kind::JoinToken => "join token",
            Kind::Certificate => "certificate",
            Kind::Device => "device",
        }
    }

    /// The admin API's path segment for this kind (`/v1/<segment>`).
    pub fn path(self) -> &'static str {
        match self {
            Kind::User => "users",
            Kind::Role => "roles",
            Kind::IdentityProvider => "identity-providers",
            Kind::Site => "sites",
            Kind::Resource => "resources",
            Kind::Policy => "policies",
            Kind::ApiKey => "api-keys",
            Kind::Node => "nodes",
            Kind::JoinToken => "join-tokens",
            Kind::Certificate => "certificates",
            Kind::Device => "devices",
        }
    }

    /// The key of this kind in a declarative manifest, if it can appear there.
    pub fn manifest_key(self) -> Option<&'static str> {
        match self {
            Kind::User => Some("users"),
            Kind::Role => Some("roles"),
            Kind::IdentityProvider => Some("identity_providers"),
            Kind::Site => Some("sites"),
            Kind::Resource => Some("resources"),
            Kind::Policy => Some("policies"),
            Kind::ApiKey | Kind::Node | Kind::JoinToken | Kind::Certificate | Kind::Device => None,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.noun())
    }
}

/// A reference from one entity to another, by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// The field holding the reference, like `members[0]`.
    pub field: String,
    /// The kind of the entity referred to.
    pub kind: Kind,
    /// Its name.
    pub name: Name,
}

/// What every declarative registry entity offers to the generic create/update/delete code.
pub trait Entity: Clone + PartialEq + Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The kind of entity.
    const KIND: Kind;
    /// The entity's name.
    fn name(&self) -> &Name;
    /// The Raft log index of its last change (0 before it is stored).
    fn revision(&self) -> u64;
    /// Sets the revision; the registry does this when it stores the entity.
    fn set_revision(&mut self, revision: u64);
    /// Checks the fields that can be checked without the rest of the registry.
    fn validate(&self) -> Result<(), FieldError>;
    /// The entities this one refers to.
    fn references(&self) -> Vec<Reference>;
    /// Whether `self` and `other` are the same apart from their revisions.
    fn same_content(&self, other: &Self) -> bool {
        let mut a = self.clone();
        a.set_revision(0);
        let mut b = other.clone();
        b.set_revision(0);
        a == b
    }
}

macro_rules! entity_common {
    () => {
        fn name(&self) -> &Name {
            &self.name
        }
        fn revision(&self) -> u64 {
            self.revision
        }
        fn set_revision(&mut self, revision: u64) {
            self.revision = revision;
        }
    };
}

/// A person who signs in. Users come from a manifest, the API, or (later) first sign-in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    /// Unique name.
    pub name: Name,
    /// E-mail address, if known.
    #[serde(default)]
    pub email: Option<String>,
    /// Name shown to people.
    #[serde(default)]
    pub display_name: Option<String>,
    /// A disabled user is denied everything.
    #[serde(default)]
    pub disabled: bool,
    /// Raft log index of the last change; set by the cluster.
    #[serde(default)]
    pub revision: u64,
}

impl Entity for User {
    const KIND: Kind = Kind::User;
    entity_common!();

    fn validate(&self) -> Result<(), FieldError> {
        if let Some(email) = &self.email {
            check_email(email).map_err(|e| e.within("email"))?;
        }
        if let Some(d) = &self.display_name {
            check_text(d, 256).map_err(|e| e.within("display_name"))?;
        }
        Ok(())
    }

    fn references(&self) -> Vec<Reference> {
        Vec::new()
    }
}

/// A named group of users. Policies match roles with the `group` criterion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Role {
    /// Unique name.
    pub name: Name,
    /// Free text for people.
    #[serde(default)]
    pub description: String,
    /// Names of the users in the role.
    #[serde(default)]
    pub members: BTreeSet<Name>,
    /// Raft log index of the last change; set by the cluster.
    #[serde(default)]
    pub revision: u64,
}

impl Entity for Role {
    const KIND: Kind = Kind::Role;
    entity_common!();

    fn validate(&self) -> Result<(), FieldError> {
        check_text(&self.description, 1024).map_err(|e| e.within("description"))
    }

    fn references(&self) -> Vec<Reference> {
        self.members
            .iter()
            .enumerate()
            .map(|(i, m)| Reference {
                field: format!("members[{i}]"),
                kind: Kind::User,
                name: m.clone(),
            })
            .collect()
    }
}

/// An OpenID Connect provider. The client secret is stored so the cluster can use it, and
/// never returned by the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityProvider {
    /// Unique name.
    pub name: Name,
    /// Issuer URL, used for discovery (`<issuer>/.well-known/openid-configuration`).
    pub issuer: String,
    /// OAuth client id registered at the provider.
    pub client_id: String,
    /// OAuth client secret (empty for a public client).
    #[serde(default)]
    pub client_secret: Secret,
    /// Scopes to request besides `openid`.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// The ID token claim that lists the user's groups, if the provider sends one.
    #[serde(default)]
    pub groups_claim: Option<String>,
    /// Treat this provider's e-mail addresses as verified even without `email_verified` —
    /// for providers such as Microsoft Entra ID that do not send the claim but only issue
    /// addresses from their own directory. Default false: an address the provider did not
    /// verify matches no `email`/`email_domain` policy, is not sent to apps and links or
    /// claims no user.
    #[serde(default)]
    pub trust_email: bool,
    /// Raft log index of the last change; set by the cluster.
    #[serde(default)]
    pub revision: u64,
    /// What the sign-in page calls it (`Google`, `Acme staff`); its name when unset.
    /// Format 3: a [`side_field`].
    #[serde(default, with = "side_field")]
    pub display_name: Option<String>,
    /// Whether a first sign-in by someone the registry does not know creates a user
    /// (default). With `false`, only accounts already linked to a user, or matching an
    /// existing user's e-mail address (verified), may sign in. Format 3: a [`side_field`].
    #[serde(
        default = "yes",
        serialize_with = "side_field::serialize",
        deserialize_with = "side_field::deserialize_yes"
    )]
    pub auto_create: bool,
    /// At sign-out, ask the provider to send the browser back to the auth host's
    /// `/.warren/signed_out` page (OpenID RP-initiated logout's
    /// `post_logout_redirect_uri`). Off by default: register that URL with the provider
    /// first, or it refuses the sign-out. Format 3: a [`side_field`].
    #[serde(default, with = "side_field")]
    pub post_logout_redirect: bool,
}

impl IdentityProvider {
    /// What people see it called: the display name, else the name.
    pub fn title(&self) -> &str {
        self.display_name.as_deref().unwrap_or(self.name.as_str())
    }

    /// Its fields that the binary encoding skips.
    pub fn side(&self) -> ProviderSide {
        ProviderSide {
            display_name: self.display_name.clone(),
            auto_create: self.auto_create,
            post_logout_redirect: self.post_logout_redirect,
        }
    }

    /// Sets the fields that the binary encoding skips.
    pub fn set_side(&mut self, side: ProviderSide) {
        self.display_name = side.display_name;
        self.auto_create = side.auto_create;
        self.post_logout_redirect = side.post_logout_redirect;
    }
}

/// An identity provider's [`side_field`]s (format 3), carried beside it in commands and
/// snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderSide {
    /// [`IdentityProvider::display_name`].
    pub display_name: Option<String>,
    /// [`IdentityProvider::auto_create`].
    pub auto_create: bool,
    /// [`IdentityProvider::post_logout_redirect`].
    pub post_logout_redirect: bool,
}

impl Default for ProviderSide {
    fn default() -> Self {
        Self {
            display_name: None,
            auto_create: true,
            post_logout_redirect: false,
        }
    }
}

/// A web resource's [`side_field`]s (format 3), carried beside it in commands and
/// snapshots.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceSide {
    /// [`HttpOptions::prefix_rewrite`].
    pub prefix_rewrite: Option<String>,
}

impl Resource {
    /// Its fields that the binary encoding skips.
    pub fn side(&self) -> ResourceSide {
        ResourceSide {
            prefix_rewrite: self.http.prefix_rewrite.clone(),
        }
    }

    /// Sets the fields that the binary encoding skips.
    pub fn set_side(&mut self, side: ResourceSide) {
        self.http.prefix_rewrite = side.prefix_rewrite;
    }
}

/// Fields added to an entity after its binary layout was fixed. Bincode (the stored and
/// node-to-node encoding) is positional, so a field added to an entity would change what
/// every stored entity's bytes mean. A side field is written by human-readable encodings
/// (the JSON API, YAML manifests) like any other, and as nothing at all by binary ones,
/// which read it back as its default: the entity's binary layout stays that of the format
/// it was fixed in. The cluster carries side fields beside the entity instead
/// (`Command::WithSide`, the snapshot's format-3 tail) and puts them back on apply.
pub mod side_field {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    /// Writes the value, or nothing in a binary encoding.
    pub fn serialize<T: Serialize, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            v.serialize(s)
        } else {
            s.serialize_unit()
        }
    }

    /// Reads the value, or its default (having read nothing) in a binary encoding.
    pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        T: Deserialize<'de> + Default,
        D: Deserializer<'de>,
    {
        if d.is_human_readable() {
            T::deserialize(d)
        } else {
            <()>::deserialize(d)?;
            Ok(T::default())
        }
    }

    /// [`deserialize`] for a flag whose default is `true`.
    pub fn deserialize_yes<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
        if d.is_human_readable() {
            bool::deserialize(d)
        } else {
            <()>::deserialize(d)?;
            Ok(true)
        }
    }
}

impl Entity for IdentityProvider {
    const KIND: Kind = Kind::IdentityProvider;
    entity_common!();

    fn validate(&self) -> Result<(), FieldError> {
        check_issuer(&self.issuer).map_err(|e| e.within("issuer"))?;
        if self.client_id.is_empty() || self.client_id.len() > 256 {
            return Err(FieldError::new("client_id", "expected 1 to 256 characters"));
        }
        check_text(&self.client_id, 256).map_err(|e| e.within("client_id"))?;
        if self.client_secret.expose().len() > 1024 {
            return Err(FieldError::new("client_secret", "at most 1024 characters"));
        }
        for (i, scope) in self.scopes.iter().enumerate() {
            let ok = !scope.is_empty()
                && scope.len() <= 128
                && scope
                    .chars()
                    .all(|c| c.is_ascii_graphic() && c != '"' && c != '\\');
            if !ok {
                return Err(FieldError::new(
                    format!("scopes[{i}]"),
                    "a scope is 1 to 128 printable ASCII characters without spaces or quotes",
                ));
            }
        }
        if let Some(claim) = &self.groups_claim {
            if claim.is_empty() || claim.len() > 128 {
                return Err(FieldError::new(
                    "groups_claim",
                    "expected 1 to 128 characters",
                ));
            }
        }
        if let Some(d) = &self.display_name {
            if d.trim().is_empty() || d.chars().count() > 64 {
                return Err(FieldError::new(
                    "display_name",
                    "expected 1 to 64 characters, not all spaces",
                ));
            }
            check_text(d, 256).map_err(|e| e.within("display_name"))?;
        }
        Ok(())
    }

    fn references(&self) -> Vec<Reference> {
        Vec::new()
    }
}

/// A private network reached through a `warren-agent`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Site {
    /// Unique name.
    pub name: Name,
    /// Free text for people.
    #[serde(default)]
    pub description: String,
    /// Raft log index of the last change; set by the cluster.
    #[serde(default)]
    pub revision: u64,
}

impl Entity for Site {
    const KIND: Kind = Kind::Site;
    entity_common!();

    fn validate(&self) -> Result<(), FieldError> {
        check_text(&self.description, 1024).map_err(|e| e.within("description"))
    }

    fn references(&self) -> Vec<Reference> {
        Vec::new()
    }
}

/// How users reach a resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Route {
    /// A web app on a host name, optionally under a path prefix.
    Http {
        /// Host name users open, e.g. `wiki.example.com`; `*.example.com` for a wildcard.
        domain: String,
        /// Only requests under this path (starting with `/`) go to this resource.
        #[serde(default)]
        path_prefix: Option<String>,
    },
    /// A TCP port served on every node.
    Tcp {
        /// The public port.
        port: u16,
    },
    /// A UDP port served on every node.
    Udp {
        /// The public port.
        port: u16,
    },
    /// A private address inside the resource's site, reached by `warren` clients through
    /// WireGuard to the site's agent (never by the HTTP proxy or the nodes' public ports).
    ///
    /// The alias and the virtual address live here rather than on [`Resource`] because a
    /// new variant leaves the stored layout of every other resource as it was (the stored
    /// format is positional: a field added to `Resource` would change them all).
    Private {
        /// Where the agent sends the flows: an IP address, a network, or a DNS name the
        /// agent resolves.
        address: PrivateAddress,
        /// Ports users may reach (default: all, `1-65535`). ICMP has no ports.
        #[serde(default)]
        ports: PortSet,
        /// Protocols users may send (default: `[tcp, udp]`).
        #[serde(default = "L4Protocol::default_set")]
        protocols: Vec<L4Protocol>,
        /// A short name users type (`warren connect db`), a DNS label unique among
        /// resources; without one, clients use the resource's name.
        #[serde(default)]
        alias: Option<String>,
        /// The address a client's userspace stack sends to for a DNS-named resource,
        /// from [`VIRTUAL_POOL`]; set by the cluster (a value sent by a user is replaced),
        /// kept across updates while the address stays a DNS name, never reused.
        #[serde(default)]
        virtual_address: Option<Ipv4Addr>,
    },
}

/// Where every DNS-named private resource's virtual address comes from.
pub const VIRTUAL_POOL: &str = "100.100.0.0/16";
/// Where every device's tunnel address comes from (less [`VIRTUAL_POOL`], which lies
/// inside it and is skipped).
pub const DEVICE_POOL: &str = "100.64.0.0/10";

/// A transport protocol a private resource accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum L4Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP echo (ping); ports do not apply.
    Icmp,
}

impl L4Protocol {
    /// The protocols a private resource accepts when it lists none: TCP and UDP.
    pub fn default_set() -> Vec<L4Protocol> {
        vec![L4Protocol::Tcp, L4Protocol::Udp]
    }

    /// The lowercase name (`tcp`, `udp`, `icmp`).
    pub fn as_str(self) -> &'static str {
        match self {
            L4Protocol::Tcp => "tcp",
            L4Protocol::Udp => "udp",
            L4Protocol::Icmp => "icmp",
        }
    }
}

impl fmt::Display for L4Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of ports, written `22,5432,8000-8100`: single ports and inclusive ranges, comma
/// separated. Stored as sorted, merged ranges (`80,81-90` is `80-90`); never empty and
/// never port 0. The default is every port, `1-65535`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PortSet {
    /// Sorted, disjoint, non-adjacent inclusive ranges.
    ranges: Vec<(u16, u16)>,
}

impl PortSet {
    /// Longest port list accepted, in bytes.
    pub const MAX_LEN: usize = 1024;
    /// Most comma-separated items accepted.
    pub const MAX_ITEMS: usize = 128;

    /// Every port, 1 to 65535.
    pub fn all() -> Self {
        Self {
            ranges: vec![(1, u16::MAX)],
        }
    }

    /// Whether `port` is in the set.
    pub fn contains(&self, port: u16) -> bool {
        // Few ranges: a binary search is not worth its branches.
        self.ranges.iter().any(|&(lo, hi)| lo <= port && port <= hi)
    }

    /// Whether this is every port.
    pub fn is_all(&self) -> bool {
        self.ranges == [(1, u16::MAX)]
    }

    /// The inclusive ranges, sorted and merged.
    pub fn ranges(&self) -> &[(u16, u16)] {
        &self.ranges
    }
}

impl Default for PortSet {
    fn default() -> Self {
        Self::all()
    }
}

impl FromStr for PortSet {
    type Err = FieldError;

    /// Parses `22,5432,8000-8100` (spaces around items allowed). The error says what is
    /// wrong; its field is empty, for the caller to name.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: String| FieldError::new("", why);
        if s.len() > Self::MAX_LEN {
            return Err(bad(format!(
                "a port list has at most {} bytes",
                Self::MAX_LEN
            )));
        }
        let port = |p: &str| -> Result<u16, FieldError> {
            let p = p.trim();
            if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad(format!(
                    "{p:?} is not a port: expected ports like \"22,5432,8000-8100\""
                )));
            }
            match p.parse::<u16>() {
                Ok(0) | Err(_) => Err(bad(format!("{p} is not a port from 1 to 65535"))),
                Ok(n) => Ok(n),
            }
        };
        let mut ranges = Vec::new();
        for (i, item) in s.split(',').enumerate() {
            if i >= Self::MAX_ITEMS {
                return Err(bad(format!(
                    "a port list has at most {} items",
                    Self::MAX_ITEMS
                )));
            }
            let (lo, hi) = match item.split_once('-') {
                Some((lo, hi)) => (port(lo)?, port(hi)?),
                None => {
                    let p = port(item)?;
                    (p, p)
                }
            };
            if lo > hi {
                return Err(bad(format!(
                    "{}: a range goes from the lower port to the higher",
                    item.trim()
                )));
            }
            ranges.push((lo, hi));
        }
        ranges.sort_unstable();
        let mut merged: Vec<(u16, u16)> = Vec::with_capacity(ranges.len());
        for (lo, hi) in ranges {
            match merged.last_mut() {
                Some(last) if u32::from(lo) <= u32::from(last.1) + 1 => last.1 = last.1.max(hi),
                _ => merged.push((lo, hi)),
            }
        }
        Ok(Self { ranges: merged })
    }
}

impl fmt::Display for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, &(lo, hi)) in self.ranges.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if lo == hi {
                write!(f, "{lo}")?;
            } else {
                write!(f, "{lo}-{hi}")?;
            }
        }
        Ok(())
    }
}

impl Serialize for PortSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PortSet {
    /// A string like `"22,8000-8100"`, or in human-readable formats one port as a number
    /// (`ports: 22` in YAML).
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Ports;
        impl serde::de::Visitor<'_> for Ports {
            type Value = PortSet;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("ports like \"22,5432,8000-8100\"")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<PortSet, E> {
                s.parse()
                    .map_err(|e: FieldError| E::custom(format!("ports: {}", e.reason)))
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<PortSet, E> {
                match u16::try_from(n) {
                    Ok(p) if p != 0 => Ok(PortSet {
                        ranges: vec![(p, p)],
                    }),
                    _ => Err(E::custom(format!(
                        "ports: {n} is not a port from 1 to 65535"
                    ))),
                }
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<PortSet, E> {
                let n = u64::try_from(n)
                    .map_err(|_| E::custom(format!("ports: {n} is not a port from 1 to 65535")))?;
                self.visit_u64(n)
            }
        }
        // Binary formats (bincode, which cannot be asked "any") always hold the string.
        if d.is_human_readable() {
            d.deserialize_any(Ports)
        } else {
            d.deserialize_string(Ports)
        }
    }
}

/// Where a private resource is: one address, a network, or a DNS name (resolved by the
/// site's agent). Written as a string: `10.0.0.5`, `10.0.0.0/24`, `db.internal`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PrivateAddress {
    /// One host.
    Ip(IpAddr),
    /// A network, given by its network address (`10.0.0.0/24`, not `10.0.0.5/24`).
    Cidr(IpNet),
    /// A host name, lowercase, checked like target hosts (no wildcard).
    Dns(String),
}

impl PrivateAddress {
    /// Whether `ip` is this address or inside this network (never for a DNS name: the
    /// agent checks the address it resolved itself).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match self {
            PrivateAddress::Ip(a) => *a == ip,
            PrivateAddress::Cidr(n) => n.contains(&ip),
            PrivateAddress::Dns(_) => false,
        }
    }
}

impl FromStr for PrivateAddress {
    type Err = FieldError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(PrivateAddress::Ip(ip));
        }
        if s.contains('/') {
            let net: IpNet = s.parse().map_err(|_| {
                FieldError::new("", format!("{s:?} is not a network like 10.0.0.0/24"))
            })?;
            if net.trunc() != net {
                return Err(FieldError::new(
                    "",
                    format!(
                        "{s:?} has host bits set: write the network as {}",
                        net.trunc()
                    ),
                ));
            }
            return Ok(PrivateAddress::Cidr(net));
        }
        let host = s.to_ascii_lowercase();
        check_hostname(&host, false).map_err(|_| {
            FieldError::new(
                "",
                format!(
                    "{s:?} is neither an IP address, a network like 10.0.0.0/24, nor a host name"
                ),
            )
        })?;
        Ok(PrivateAddress::Dns(host))
    }
}

impl fmt::Display for PrivateAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PrivateAddress::Ip(ip) => ip.fmt(f),
            PrivateAddress::Cidr(net) => net.fmt(f),
            PrivateAddress::Dns(host) => f.write_str(host),
        }
    }
}

impl Serialize for PrivateAddress {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PrivateAddress {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.len() > 253 {
            return Err(serde::de::Error::custom("address: at most 253 characters"));
        }
        s.parse()
            .map_err(|e: FieldError| serde::de::Error::custom(format!("address: {}", e.reason)))
    }
}

/// An upstream address: `host:port`, with `host` an IP address or a DNS name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Target {
    /// IP address or DNS name.
    pub host: String,
    /// TCP or UDP port.
    pub port: u16,
}

impl TryFrom<String> for Target {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl std::str::FromStr for Target {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let expected = || format!("expected host:port or [ipv6]:port, got {s:?}");
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (h, p) = rest.split_once("]:").ok_or_else(expected)?;
            h.parse::<std::net::Ipv6Addr>().map_err(|_| expected())?;
            (h, p)
        } else {
            let (h, p) = s.rsplit_once(':').ok_or_else(expected)?;
            if h.parse::<IpAddr>().is_err() && check_hostname(h, false).is_err() {
                return Err(expected());
            }
            (h, p)
        };
        let port: u16 = port.parse().map_err(|_| expected())?;
        if port == 0 {
            return Err(format!("port 0 is not a valid target port in {s:?}"));
        }
        Ok(Self {
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl From<Target> for String {
    fn from(t: Target) -> Self {
        t.to_string()
    }
}

/// Something users reach: a web app or a TCP/UDP service, with its upstream targets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resource {
    /// Unique name.
    pub name: Name,
    /// The site whose agent reaches the targets; none for targets the nodes reach directly.
    #[serde(default)]
    pub site: Option<Name>,
    /// How users reach it.
    pub route: Route,
    /// Upstream addresses, balanced round robin over the healthy ones. None for a private
    /// resource, whose route says where flows go.
    #[serde(default)]
    pub targets: Vec<Target>,
    /// Policies that decide who gets in; with none, nobody does.
    #[serde(default)]
    pub policies: Vec<Name>,
    /// How web requests are handled (HTTP routes only).
    #[serde(default)]
    pub http: Box<HttpOptions>,
    /// Raft log index of the last change; set by the cluster.
    #[serde(default)]
    pub revision: u64,
}

/// Options of a web resource. Every field has a default that suits most apps.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpOptions {
    /// Anyone may use it, without signing in or any policy (identity headers are not sent).
    #[serde(default)]
    pub public: bool,
    /// Send this `Host` upstream instead of the one the client asked for.
    #[serde(default)]
    pub host_header: Option<String>,
    /// Headers set on every request sent upstream (replacing the client's).
    #[serde(default)]
    pub set_request_headers: BTreeMap<String, String>,
    /// Headers removed from every request before it goes upstream.
    #[serde(default)]
    pub remove_request_headers: Vec<String>,
    /// Headers set on every response sent to the client.
    #[serde(default)]
    pub set_response_headers: BTreeMap<String, String>,
    /// Headers removed from every response.
    #[serde(default)]
    pub remove_response_headers: Vec<String>,
    /// Seconds to wait for the upstream's response headers (default 30).
    #[serde(default)]
    pub timeout_s: Option<u32>,
    /// Largest request body accepted, in bytes (default 64 MiB; 0 = no limit).
    #[serde(default)]
    pub max_body_bytes: Option<u64>,
    /// Active health check of the targets; without one, only failed connections eject a
    /// target (for 10 s).
    #[serde(default)]
    pub health_check: Option<HealthCheck>,
    /// Ways in besides single sign-on, and requests that need none.
    #[serde(default)]
    pub access: AccessMethods,
    /// Protocols a request may upgrade to besides WebSocket (an `Upgrade` token such as
    /// `h2c`, compared without case). Any other `Upgrade` is dropped and the request goes
    /// upstream as plain HTTP: an upgraded connection is not checked request by request.
    #[serde(default)]
    pub upgrades: Vec<String>,
    /// Replace the resource's `route.http.path_prefix` at the front of the path sent
    /// upstream with this (`/` strips it: `/wiki/page` under the prefix `/wiki` goes
    /// upstream as `/page`). Only with a path prefix. Format 3: a [`side_field`].
    #[serde(default, with = "side_field")]
    pub prefix_rewrite: Option<String>,
}

/// How people may get into a web resource. Single sign-on (then the policies) is the
/// default; a PIN, a passcode, a one-time code sent to a listed e-mail address or a share
/// link each open this one resource without an account. Bypass rules let matching requests
/// through without any sign-in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessMethods {
    /// Sign in with the cluster's identity provider, then the policies decide.
    #[serde(default = "yes")]
    pub sso: bool,
    /// A PIN (4 to 12 digits). Given in clear to the API, which stores only its hash.
    #[serde(default)]
    pub pin: Option<Secret>,
    /// Hash of the PIN (Argon2id, PHC string); set by the node, shown as `<hidden>`.
    #[serde(default)]
    pub pin_hash: Option<String>,
    /// A passcode (8 to 128 characters). Given in clear to the API, stored hashed.
    #[serde(default)]
    pub passcode: Option<Secret>,
    /// Hash of the passcode; set by the node, shown as `<hidden>`.
    #[serde(default)]
    pub passcode_hash: Option<String>,
    /// E-mail addresses (or `@domain` for a whole domain) that may ask for a one-time
    /// code by e-mail.
    #[serde(default)]
    pub email_codes: Vec<String>,
    /// Requests that need no sign-in at all.
    #[serde(default)]
    pub bypass: Vec<Bypass>,
}

fn yes() -> bool {
    true
}

impl Default for AccessMethods {
    fn default() -> Self {
        Self {
            sso: true,
            pin: None,
            pin_hash: None,
            passcode: None,
            passcode_hash: None,
            email_codes: Vec::new(),
            bypass: Vec::new(),
        }
    }
}

impl AccessMethods {
    /// What the API shows in place of a stored hash.
    pub const HIDDEN: &'static str = "<hidden>";

    /// Whether a way in other than single sign-on is configured.
    pub fn has_other_methods(&self) -> bool {
        self.pin_hash.is_some() || self.passcode_hash.is_some() || !self.email_codes.is_empty()
    }

    /// Whether an e-mail address may ask for a one-time code.
    pub fn email_allowed(&self, email: &str) -> bool {
        let email = email.to_ascii_lowercase();
        self.email_codes.iter().any(|e| {
            let e = e.to_ascii_lowercase();
            if let Some(domain) = e.strip_prefix('@') {
                email.rsplit_once('@').is_some_and(|(_, d)| d == domain)
            } else {
                e == email
            }
        })
    }

    fn validate(&self) -> Result<(), FieldError> {
        if self.pin.is_some() || self.passcode.is_some() {
            return Err(FieldError::new(
                if self.pin.is_some() {
                    "pin"
                } else {
                    "passcode"
                },
                "stored in clear: the node hashes it before it is written",
            ));
        }
        for (field, h) in [
            ("pin_hash", &self.pin_hash),
            ("passcode_hash", &self.passcode_hash),
        ] {
            if let Some(h) = h {
                if !h.starts_with("$argon2") || h.len() > 256 {
                    return Err(FieldError::new(field, "not an Argon2 hash"));
                }
            }
        }
        for (i, e) in self.email_codes.iter().enumerate() {
            let ok = match e.strip_prefix('@') {
                Some(d) => check_hostname(&d.to_ascii_lowercase(), false).is_ok(),
                None => check_email(e).is_ok(),
            };
            if !ok {
                return Err(FieldError::new(
                    format!("email_codes[{i}]"),
                    format!("{e:?} is neither an e-mail address nor @domain"),
                ));
            }
        }
        if self.bypass.len() > 64 {
            return Err(FieldError::new("bypass", "at most 64 rules"));
        }
        for (i, b) in self.bypass.iter().enumerate() {
            if b.path_prefix.is_none() && b.source_cidr.is_none() {
                return Err(FieldError::new(
                    format!("bypass[{i}]"),
                    "give path_prefix, source_cidr or both",
                ));
            }
            if let Some(p) = &b.path_prefix {
                check_path_prefix(p).map_err(|e| e.within(&format!("bypass[{i}].path_prefix")))?;
                if p.starts_with("/.warren") {
                    return Err(FieldError::new(
                        format!("bypass[{i}].path_prefix"),
                        "/.warren/ belongs to the proxy",
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Requests matching every given field need no sign-in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bypass {
    /// The request path starts with this (at a `/` boundary).
    #[serde(default)]
    pub path_prefix: Option<String>,
    /// The client address is in this network.
    #[serde(default)]
    pub source_cidr: Option<ipnet::IpNet>,
}

impl Bypass {
    /// Whether a request matches.
    pub fn matches(&self, path: &str, source: IpAddr) -> bool {
        let path_ok = self
            .path_prefix
            .as_deref()
            .is_none_or(|p| crate::canonical::prefix_matches(path, p));
        let cidr_ok = self.source_cidr.is_none_or(|n| n.contains(&source));
        path_ok && cidr_ok
    }
}

impl HttpOptions {
    /// Default upstream timeout, in seconds.
    pub const DEFAULT_TIMEOUT_S: u32 = 30;
    /// Default body limit, in bytes.
    pub const DEFAULT_MAX_BODY: u64 = 64 * 1024 * 1024;

    /// Whether every field has its default (then it is left out of the JSON).
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    fn validate(&self) -> Result<(), FieldError> {
        if let Some(h) = &self.host_header {
            let host = h.rsplit_once(':').map_or(h.as_str(), |(h, _)| h);
            if host.parse::<IpAddr>().is_err() {
                check_hostname(host, false).map_err(|e| e.within("host_header"))?;
            }
        }
        for (field, map) in [
            ("set_request_headers", &self.set_request_headers),
            ("set_response_headers", &self.set_response_headers),
        ] {
            for (k, v) in map {
                check_header_name(k).map_err(|e| e.within(&format!("{field}.{k}")))?;
                if v.len() > 4096 || v.chars().any(|c| c.is_control() && c != '\t') {
                    return Err(FieldError::new(
                        format!("{field}.{k}"),
                        "a header value has at most 4096 characters and no line breaks",
                    ));
                }
            }
        }
        for (field, list) in [
            ("remove_request_headers", &self.remove_request_headers),
            ("remove_response_headers", &self.remove_response_headers),
        ] {
            for (i, k) in list.iter().enumerate() {
                check_header_name(k).map_err(|e| e.within(&format!("{field}[{i}]")))?;
            }
        }
        if self.timeout_s == Some(0) || self.timeout_s.is_some_and(|t| t > 3600) {
            return Err(FieldError::new("timeout_s", "expected 1 to 3600 seconds"));
        }
        if let Some(hc) = &self.health_check {
            hc.validate().map_err(|e| e.within("health_check"))?;
        }
        if self.upgrades.len() > 16 {
            return Err(FieldError::new("upgrades", "at most 16 protocols"));
        }
        for (i, u) in self.upgrades.iter().enumerate() {
            let token = !u.is_empty()
                && u.len() <= 64
                && u.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~/".contains(&b));
            if !token {
                return Err(FieldError::new(
                    format!("upgrades[{i}]"),
                    format!("{u:?} is not an Upgrade protocol token like h2c"),
                ));
            }
        }
        self.access.validate().map_err(|e| e.within("access"))?;
        if self.public && self.access != AccessMethods::default() {
            return Err(FieldError::new(
                "access",
                "a public resource takes no other access settings",
            ));
        }
        if !self.access.sso && !self.access.has_other_methods() && self.access.bypass.is_empty() {
            return Err(FieldError::new(
                "access.sso",
                "without single sign-on, configure a PIN, a passcode or e-mail codes",
            ));
        }
        Ok(())
    }
}

/// An active check of every target of a resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// `GET` this path and expect a 2xx or 3xx answer; without one, a TCP connect is the check.
    #[serde(default)]
    pub path: Option<String>,
    /// Seconds between checks (default 5).
    #[serde(default = "HealthCheck::default_interval")]
    pub interval_s: u32,
    /// Failed checks in a row before a target is left out (default 2); one success brings it
    /// back.
    #[serde(default = "HealthCheck::default_failures")]
    pub failures: u32,
}

impl HealthCheck {
    fn default_interval() -> u32 {
        5
    }
    fn default_failures() -> u32 {
        2
    }
    fn validate(&self) -> Result<(), FieldError> {
        if let Some(p) = &self.path {
            if !p.starts_with('/')
                || p.len() > 1024
                || p.chars().any(|c| c.is_control() || c == ' ')
            {
                return Err(FieldError::new(
                    "path",
                    "a path starts with '/' and has no spaces",
                ));
            }
        }
        if !(1..=3600).contains(&self.interval_s) {
            return Err(FieldError::new("interval_s", "expected 1 to 3600 seconds"));
        }
        if !(1..=100).contains(&self.failures) {
            return Err(FieldError::new("failures", "expected 1 to 100"));
        }
        Ok(())
    }
}

/// Checks an HTTP header name a resource may set or remove: a token, and not one of the
/// `X-Warren-*` headers the proxy owns.
fn check_header_name(k: &str) -> Result<(), FieldError> {
    let token = !k.is_empty()
        && k.len() <= 128
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if !token {
        return Err(FieldError::new("", format!("{k:?} is not a header name")));
    }
    let lower = k.to_ascii_lowercase();
    if lower.starts_with("x-warren-") {
        return Err(FieldError::new(
            "",
            "X-Warren-* headers are set by the proxy only",
        ));
    }
    if matches!(
        lower.as_str(),
        "host"
            | "connection"
            | "upgrade"
            | "transfer-encoding"
            | "content-length"
            | "te"
            | "trailer"
            | "keep-alive"
    ) {
        return Err(FieldError::new("", format!("{k} is managed by the proxy")));
    }
    Ok(())
}

impl Resource {
    /// Maximum number of targets per resource.
    pub const MAX_TARGETS: usize = 64;

    /// The alias of a private resource, if it has one.
    pub fn alias(&self) -> Option<&str> {
        match &self.route {
            Route::Private { alias, .. } => alias.as_deref(),
            _ => None,
        }
    }

    /// The virtual address the cluster gave a DNS-named private resource.
    pub fn virtual_address(&self) -> Option<Ipv4Addr> {
        match &self.route {
            Route::Private {
                virtual_address, ..
            } => *virtual_address,
            _ => None,
        }
    }

    /// Whether clients reach it through WireGuard (a private resource).
    pub fn is_private(&self) -> bool {
        matches!(self.route, Route::Private { .. })
    }

    fn validate_private(
        &self,
        protocols: &[L4Protocol],
        alias: Option<&str>,
    ) -> Result<(), FieldError> {
        if self.site.is_none() {
            return Err(FieldError::new(
                "site",
                "a private resource is reached through a site's agent: name the site",
            ));
        }
        if !self.targets.is_empty() {
            return Err(FieldError::new(
                "targets",
                "a private resource takes no targets: route.private.address and ports say where flows go",
            ));
        }
        if protocols.is_empty() {
            return Err(FieldError::new(
                "route.private.protocols",
                "list at least one of tcp, udp, icmp (or leave it out for tcp and udp)",
            ));
        }
        check_unique(protocols, "route.private.protocols")?;
        if let Some(a) = alias {
            check_alias(a).map_err(|e| e.within("route.private.alias"))?;
        }
        check_unique(&self.policies, "policies")?;
        if !self.http.is_default() {
            return Err(FieldError::new(
                "http",
                "only web (route.http) resources take HTTP options",
            ));
        }
        Ok(())
    }
}

/// Checks a private resource's alias: one DNS label (1 to 63 lowercase letters, digits
/// and `-`, not starting or ending with `-`).
pub fn check_alias(a: &str) -> Result<(), FieldError> {
    if a.contains('.') {
        return Err(FieldError::new(
            "",
            format!("{a:?} is not an alias: one DNS label like `db`, without dots"),
        ));
    }
    check_hostname(a, false).map_err(|_| {
        FieldError::new(
            "",
            format!(
                "{a:?} is not an alias: one DNS label like `db` (lowercase letters, digits, '-')"
            ),
        )
    })
}

/// A WireGuard (X25519) public key: 32 bytes, written in standard base64 (44 characters),
/// as `wg(8)` prints it. Public, so `Debug` shows it.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WgKey(pub [u8; 32]);

impl FromStr for WgKey {
    type Err = FieldError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            FieldError::new(
                "",
                "expected a WireGuard public key: 32 bytes in base64 (44 characters)",
            )
        };
        if s.len() != 44 {
            return Err(bad());
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(|_| bad())?;
        let key: [u8; 32] = bytes.try_into().map_err(|_| bad())?;
        Ok(WgKey(key))
    }
}

impl fmt::Display for WgKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&base64::engine::general_purpose::STANDARD.encode(self.0))
    }
}

impl fmt::Debug for WgKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WgKey({self})")
    }
}

impl Serialize for WgKey {
    /// Base64 in human-readable formats (JSON, YAML), the 32 bytes in binary ones.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.collect_str(self)
        } else {
            self.0.serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for WgKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            s.parse().map_err(|e: FieldError| {
                serde::de::Error::custom(format!("public_key: {}", e.reason))
            })
        } else {
            <[u8; 32]>::deserialize(d).map(WgKey)
        }
    }
}

/// A machine a user signed in on with the `warren` client. The client registers it (see
/// the registry's `RegisterDevice`); admins list and delete devices but never declare them.
/// Deleting the user deletes its devices; a disabled user keeps them but reaches nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    /// Unique across the cluster, e.g. `alice-laptop`.
    pub name: Name,
    /// The user it belongs to.
    pub owner: Name,
    /// Its WireGuard public key; unique across devices.
    pub public_key: WgKey,
    /// Operating system, free text (`linux`, `macos`), at most [`Device::MAX_OS`] bytes.
    pub os: String,
    /// Its tunnel address, from [`DEVICE_POOL`]; never given to another device.
    pub address: Ipv4Addr,
    /// The client session it last registered with; its flows need this session live.
    pub session: Option<SessionId>,
    /// When it was registered, seconds since the Unix epoch.
    pub created_at: u64,
    /// When it was last registered or seen, seconds since the Unix epoch.
    pub last_seen: u64,
    /// The public address it last called from (what `source_cidr` matches for its flows).
    pub last_address: Option<IpAddr>,
    /// Raft log index of the last change; set by the cluster.
    pub revision: u64,
}

impl Device {
    /// Longest `os` accepted, in bytes.
    pub const MAX_OS: usize = 64;

    /// Checks the fields a client sends.
    pub fn validate(&self) -> Result<(), FieldError> {
        check_text(&self.os, Self::MAX_OS).map_err(|e| e.within("os"))
    }
}

/// A device as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceView {
    /// Unique name.
    pub name: Name,
    /// The user it belongs to.
    pub owner: Name,
    /// WireGuard public key, base64.
    pub public_key: WgKey,
    /// Operating system.
    pub os: String,
    /// Tunnel address.
    pub address: Ipv4Addr,
    /// The client session it last registered with (32 hex digits), if any.
    #[serde(default)]
    pub session: Option<String>,
    /// Registration time, seconds since the Unix epoch.
    pub created_at: u64,
    /// Last seen, seconds since the Unix epoch.
    pub last_seen: u64,
    /// The public address it last called from.
    #[serde(default)]
    pub last_address: Option<IpAddr>,
    /// Raft log index of the last change.
    pub revision: u64,
}

impl From<&Device> for DeviceView {
    fn from(d: &Device) -> Self {
        Self {
            name: d.name.clone(),
            owner: d.owner.clone(),
            public_key: d.public_key,
            os: d.os.clone(),
            address: d.address,
            session: d.session.map(|s| s.to_string()),
            created_at: d.created_at,
            last_seen: d.last_seen,
            last_address: d.last_address,
            revision: d.revision,
        }
    }
}

impl Entity for Resource {
    const KIND: Kind = Kind::Resource;
    entity_common!();

    fn validate(&self) -> Result<(), FieldError> {
        match &self.route {
            Route::Http {
                domain,
                path_prefix,
            } => {
                check_hostname(domain, true).map_err(|e| e.within("route.http.domain"))?;
                if let Some(p) = path_prefix {
                    check_path_prefix(p).map_err(|e| e.within("route.http.path_prefix"))?;
                }
                if let Some(r) = &self.http.prefix_rewrite {
                    if path_prefix.as_deref().is_none_or(|p| p == "/") {
                        return Err(FieldError::new(
                            "http.prefix_rewrite",
                            "only a resource with a route.http.path_prefix (other than /) has a prefix to rewrite",
                        ));
                    }
                    check_path_prefix(r).map_err(|e| e.within("http.prefix_rewrite"))?;
                }
            }
            Route::Tcp { port } | Route::Udp { port } => {
                if *port == 0 {
                    let proto = if matches!(self.route, Route::Tcp { .. }) {
                        "tcp"
                    } else {
                        "udp"
                    };
                    return Err(FieldError::new(
                        format!("route.{proto}.port"),
                        "expected a port from 1 to 65535",
                    ));
                }
            }
            Route::Private {
                protocols, alias, ..
            } => return self.validate_private(protocols, alias.as_deref()),
        }
        if self.targets.is_empty() {
            return Err(FieldError::new("targets", "at least one target is needed"));
        }
        if self.targets.len() > Self::MAX_TARGETS {
            return Err(FieldError::new(
                "targets",
                format!("at most {} targets", Self::MAX_TARGETS),
            ));
        }
        check_unique(&self.targets, "targets")?;
        check_unique(&self.policies, "policies")?;
        if !self.http.is_default() && !matches!(self.route, Route::Http { .. }) {
            return Err(FieldError::new(
                "http",
                "only web (route.http) resources take HTTP options",
            ));
        }
        self.http.validate().map_err(|e| e.within("http"))?;
        Ok(())
    }

    fn references(&self) -> Vec<Reference> {
        let site = self.site.iter().map(|s| Reference {
            field: "site".into(),
            kind: Kind::Site,
            name: s.clone(),
        });
        let policies = self.policies.iter().enumerate().map(|(i, p)| Reference {
            field: format!("policies[{i}]"),
            kind: Kind::Policy,
            name: p.clone(),
        });
        site.chain(policies).collect()
    }
}

/// Who may reach a resource: `deny` wins over `allow`, and without a matching `allow` the
/// answer is no.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Unique name.
    pub name: Name,
    /// Free text for people.
    #[serde(default)]
    pub description: String,
    /// Requests that match are allowed, unless `deny` matches too.
    #[serde(default)]
    pub allow: Option<Expr>,
    /// Requests that match are denied.
    #[serde(default)]
    pub deny: Option<Expr>,
    /// Raft log index of the last change; set by the cluster.
    #[serde(default)]
    pub revision: u64,
}

impl Entity for Policy {
    const KIND: Kind = Kind::Policy;
    entity_common!();

    fn validate(&self) -> Result<(), FieldError> {
        check_text(&self.description, 1024).map_err(|e| e.within("description"))?;
        if let Some(e) = &self.allow {
            e.validate().map_err(|e| e.within("allow"))?;
        }
        if let Some(e) = &self.deny {
            e.validate().map_err(|e| e.within("deny"))?;
        }
        Ok(())
    }

    fn references(&self) -> Vec<Reference> {
        Vec::new()
    }
}

/// The numeric id of a node in the Raft cluster.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct NodeId(pub u64);

impl From<u64> for NodeId {
    fn from(id: u64) -> Self {
        Self(id)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A `warren-node`: recorded when it joins, kept until it is deleted. Whether it votes is
/// not stored here but read from the Raft membership, which is the single truth for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    /// Raft node id.
    pub id: NodeId,
    /// Unique name.
    pub name: Name,
    /// `host:port` other nodes reach it on (QUIC, UDP).
    pub cluster_addr: String,
    /// `host:port` of its admin API (HTTPS).
    pub admin_addr: String,
    /// Free-form region label, used to pick close nodes.
    #[serde(default)]
    pub region: String,
    /// Raft log index of the last change; set by the cluster.
    #[serde(default)]
    pub revision: u64,
    /// What the node may be, as the join token that admitted it said (and its certificate
    /// says): the most it can ever do in this cluster.
    #[serde(default)]
    pub role: NodeRole,
}

/// The trust a node is given, chosen by the admin through the join token that admits it
/// and written into its certificate. It is a ceiling: a voter-grade node may serve as a
/// non-voting member for a while; a learner-grade node can never vote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeRole {
    /// May vote and lead, holds the cluster CA key, admits nodes and enrolls sites.
    #[default]
    Voter,
    /// A full replica that never votes, never holds the CA key, never admits anyone.
    Learner,
    /// Not a Raft member: relays ciphertext only, holds no registry data or secrets.
    Relay,
}

impl NodeRole {
    /// The lowercase name (`voter`, `learner`, `relay`).
    pub fn as_str(self) -> &'static str {
        match self {
            NodeRole::Voter => "voter",
            NodeRole::Learner => "learner",
            NodeRole::Relay => "relay",
        }
    }

    /// Parses [`NodeRole::as_str`]'s names.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "voter" => Some(NodeRole::Voter),
            "learner" => Some(NodeRole::Learner),
            "relay" => Some(NodeRole::Relay),
            _ => None,
        }
    }
}

impl std::fmt::Display for NodeRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Node {
    /// Checks the fields.
    pub fn validate(&self) -> Result<(), FieldError> {
        check_socket_addr(&self.cluster_addr).map_err(|e| e.within("cluster_addr"))?;
        check_socket_addr(&self.admin_addr).map_err(|e| e.within("admin_addr"))?;
        if self.region.len() > 63 {
            return Err(FieldError::new("region", "at most 63 characters"));
        }
        check_text(&self.region, 63).map_err(|e| e.within("region"))
    }
}

/// Checks a `host:port` address that a node listens on or is reached at.
pub fn check_socket_addr(s: &str) -> Result<(), FieldError> {
    let t: Target = s.parse().map_err(|e: String| FieldError::new("", e))?;
    if t.port == 0 {
        return Err(FieldError::new("", "expected a non-zero port"));
    }
    Ok(())
}

/// Checks a host name: lowercase labels of letters, digits and `-`, dot separated, at most
/// 253 characters; with `allow_wildcard`, a leading `*.` is accepted.
pub fn check_hostname(s: &str, allow_wildcard: bool) -> Result<(), FieldError> {
    let bad = |why: &str| FieldError::new("", format!("{s:?} is not a valid host name: {why}"));
    let body = match s.strip_prefix("*.") {
        Some(rest) if allow_wildcard => rest,
        Some(_) => return Err(bad("wildcards are not allowed here")),
        None => s,
    };
    if body.is_empty() || s.len() > 253 {
        return Err(bad("expected 1 to 253 characters"));
    }
    for label in body.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(bad("each label between dots has 1 to 63 characters"));
        }
        if !label
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return Err(bad("use lowercase letters, digits and '-'"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(bad("a label cannot start or end with '-'"));
        }
    }
    Ok(())
}

fn check_path_prefix(p: &str) -> Result<(), FieldError> {
    if !p.starts_with('/') {
        return Err(FieldError::new("", "a path prefix starts with '/'"));
    }
    if p.len() > 1024 {
        return Err(FieldError::new("", "at most 1024 characters"));
    }
    if p.chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '?' || c == '#')
    {
        return Err(FieldError::new(
            "",
            "a path prefix has no spaces, control characters, '?' or '#'",
        ));
    }
    canonical_form(p)
}

/// A configured path must be in the canonical form request paths are matched in
/// (`crate::canonical`), or it could never match.
pub(crate) fn canonical_form(p: &str) -> Result<(), FieldError> {
    match crate::canonical::check_configured_path(p) {
        Ok(()) => Ok(()),
        Err(Some(c)) => Err(FieldError::new(
            "",
            format!("{p:?} is not in canonical form (write it as {c:?}): requests are matched after percent-decoding, merging slashes and removing dot segments"),
        )),
        Err(None) => Err(FieldError::new(
            "",
            format!("{p:?} can never match: requests with '\\', ';', escaped '/', control characters or malformed escapes are refused"),
        )),
    }
}

fn check_email(e: &str) -> Result<(), FieldError> {
    let bad = || FieldError::new("", format!("{e:?} is not an e-mail address"));
    if e.len() > 254 || e.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad());
    }
    let (local, domain) = e.rsplit_once('@').ok_or_else(bad)?;
    if local.is_empty() || local.contains('@') {
        return Err(bad());
    }
    check_hostname(&domain.to_ascii_lowercase(), false).map_err(|_| bad())
}

fn check_issuer(issuer: &str) -> Result<(), FieldError> {
    let url = url::Url::parse(issuer)
        .map_err(|e| FieldError::new("", format!("{issuer:?} is not a URL: {e}")))?;
    let loopback = match url.host() {
        Some(url::Host::Domain(d)) => d == "localhost",
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    match url.scheme() {
        "https" => {}
        "http" if loopback => {}
        _ => {
            return Err(FieldError::new(
                "",
                "the issuer must be an https:// URL (http:// only on loopback)",
            ))
        }
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(FieldError::new(
            "",
            "an issuer URL has no query or fragment",
        ));
    }
    Ok(())
}

/// Checks free text: at most `max` bytes, no control characters.
pub fn check_text(s: &str, max: usize) -> Result<(), FieldError> {
    if s.len() > max {
        return Err(FieldError::new("", format!("at most {max} bytes")));
    }
    if s.chars().any(char::is_control) {
        return Err(FieldError::new("", "no control characters"));
    }
    Ok(())
}

fn check_unique<T: PartialEq + fmt::Display>(items: &[T], field: &str) -> Result<(), FieldError> {
    for (i, item) in items.iter().enumerate() {
        if items[..i].contains(item) {
            return Err(FieldError::new(
                format!("{field}[{i}]"),
                format!("{item} is listed twice"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resource(json: &str) -> Resource {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn targets_parse_and_print() {
        for (s, host, port) in [
            ("10.0.0.5:8080", "10.0.0.5", 8080),
            ("db.internal:5432", "db.internal", 5432),
            ("[::1]:22", "::1", 22),
        ] {
            let t: Target = s.parse().unwrap();
            assert_eq!((t.host.as_str(), t.port), (host, port));
            assert_eq!(t.to_string(), s);
        }
        for bad in [
            "nohost",
            "a:b",
            ":80",
            "host:0",
            "host:70000",
            "[::1]",
            "a b:1",
        ] {
            assert!(bad.parse::<Target>().is_err(), "{bad}");
        }
    }

    #[test]
    fn resource_checks_name_the_field() {
        let r = resource(
            r#"{"name":"wiki","route":{"http":{"domain":"Wiki.example.com"}},"targets":["a:1"]}"#,
        );
        assert_eq!(r.validate().unwrap_err().field, "route.http.domain");
        let r = resource(r#"{"name":"db","route":{"tcp":{"port":0}},"targets":["a:1"]}"#);
        assert_eq!(r.validate().unwrap_err().field, "route.tcp.port");
        let r = resource(r#"{"name":"db","route":{"tcp":{"port":5432}},"targets":[]}"#);
        assert_eq!(r.validate().unwrap_err().field, "targets");
        let r = resource(r#"{"name":"db","route":{"tcp":{"port":5432}},"targets":["a:1","a:1"]}"#);
        assert_eq!(r.validate().unwrap_err().field, "targets[1]");
        let r = resource(
            r#"{"name":"w","route":{"http":{"domain":"*.example.com","path_prefix":"/a/../b"}},"targets":["a:1"]}"#,
        );
        assert_eq!(r.validate().unwrap_err().field, "route.http.path_prefix");
    }

    #[test]
    fn resource_lists_its_references() {
        let r = resource(
            r#"{"name":"w","site":"hq","route":{"udp":{"port":53}},"targets":["a:1"],"policies":["p1","p2"]}"#,
        );
        let refs: Vec<_> = r
            .references()
            .into_iter()
            .map(|r| (r.field, r.kind, r.name.to_string()))
            .collect();
        assert_eq!(
            refs,
            vec![
                ("site".into(), Kind::Site, "hq".into()),
                ("policies[0]".into(), Kind::Policy, "p1".into()),
                ("policies[1]".into(), Kind::Policy, "p2".into()),
            ]
        );
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = serde_json::from_str::<User>(r#"{"name":"a","emial":"x@y.z"}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `emial`"), "{err}");
    }

    #[test]
    fn issuer_must_be_https_except_on_loopback() {
        assert!(check_issuer("https://idp.example.com").is_ok());
        assert!(check_issuer("http://127.0.0.1:9000").is_ok());
        assert!(check_issuer("http://localhost:9000/realm").is_ok());
        assert!(check_issuer("http://idp.example.com").is_err());
        assert!(check_issuer("not a url").is_err());
    }

    #[test]
    fn emails_are_checked() {
        assert!(check_email("alice@example.com").is_ok());
        for bad in [
            "alice",
            "@example.com",
            "alice@",
            "a b@example.com",
            "a@b@c.d",
        ] {
            assert!(check_email(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn port_sets_parse_merge_and_print() {
        for (s, shown) in [
            ("22", "22"),
            ("22,5432,8000-8100", "22,5432,8000-8100"),
            (" 443 , 80 ", "80,443"),
            ("80,81-90,85", "80-90"),
            ("1-65535", "1-65535"),
            ("10-20,21-30,5", "5,10-30"),
            ("7-7", "7"),
        ] {
            let p: PortSet = s.parse().unwrap();
            assert_eq!(p.to_string(), shown, "{s}");
            assert_eq!(p.to_string().parse::<PortSet>().unwrap(), p);
        }
        let p: PortSet = "22,8000-8100".parse().unwrap();
        assert!(p.contains(22) && p.contains(8000) && p.contains(8100));
        assert!(!p.contains(21) && !p.contains(8101) && !p.contains(0));
        assert!(PortSet::default().is_all() && PortSet::default().contains(65535));
    }

    #[test]
    fn hostile_port_lists_are_refused() {
        let long = "1,".repeat(PortSet::MAX_ITEMS) + "1";
        let huge = "9".repeat(PortSet::MAX_LEN + 1);
        for bad in [
            "",
            ",",
            "22,",
            "0",
            "0-10",
            "65536",
            "99999999999999999999",
            "-5",
            "5-",
            "+5",
            "10-5",
            "1-2-3",
            "22;23",
            "２２",
            "0x16",
            long.as_str(),
            huge.as_str(),
        ] {
            assert!(bad.parse::<PortSet>().is_err(), "{bad:?}");
        }
        let err = serde_json::from_str::<Resource>(
            r#"{"name":"db","site":"hq","route":{"private":{"address":"10.0.0.5","ports":"0"}}}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("ports: "), "{err}");
    }

    #[test]
    fn private_addresses_parse_and_print() {
        let a = |s: &str| s.parse::<PrivateAddress>();
        assert_eq!(
            a("10.0.0.5").unwrap(),
            PrivateAddress::Ip("10.0.0.5".parse().unwrap())
        );
        assert_eq!(
            a("fd00::1").unwrap(),
            PrivateAddress::Ip("fd00::1".parse().unwrap())
        );
        assert_eq!(
            a("10.0.0.0/24").unwrap(),
            PrivateAddress::Cidr("10.0.0.0/24".parse().unwrap())
        );
        assert_eq!(
            a("DB.Internal").unwrap(),
            PrivateAddress::Dns("db.internal".into())
        );
        for s in ["10.0.0.5", "10.0.0.0/24", "db.internal", "fd00::/64"] {
            assert_eq!(a(s).unwrap().to_string(), s);
        }
        for bad in [
            "10.0.0.5/24",
            "10.0.0.0/33",
            "*.internal",
            "a b",
            "",
            "db..x",
            "-db",
        ] {
            assert!(a(bad).is_err(), "{bad:?}");
        }
        let net = a("10.0.0.0/24").unwrap();
        assert!(net.contains("10.0.0.9".parse().unwrap()));
        assert!(!net.contains("10.0.1.9".parse().unwrap()));
        assert!(!a("db.internal")
            .unwrap()
            .contains("10.0.0.9".parse().unwrap()));
    }

    #[test]
    fn wireguard_keys_are_base64_of_32_bytes() {
        let k = WgKey([7; 32]);
        let s = k.to_string();
        assert_eq!(s.len(), 44);
        assert_eq!(s.parse::<WgKey>().unwrap(), k);
        let json = serde_json::to_string(&k).unwrap();
        assert_eq!(json, format!("\"{s}\""));
        assert_eq!(serde_json::from_str::<WgKey>(&json).unwrap(), k);
        let bin = bincode::serde::encode_to_vec(k, bincode::config::standard()).unwrap();
        assert_eq!(bin.len(), 32, "binary formats keep the bytes");
        let (back, _): (WgKey, _) =
            bincode::serde::decode_from_slice(&bin, bincode::config::standard()).unwrap();
        assert_eq!(back, k);
        let short = base64::engine::general_purpose::STANDARD.encode([1u8; 31]);
        let long = base64::engine::general_purpose::STANDARD.encode([1u8; 33]);
        for bad in [short.as_str(), long.as_str(), "", &"!".repeat(44), &s[..43]] {
            assert!(bad.parse::<WgKey>().is_err(), "{bad:?}");
        }
        assert!(format!("{k:?}").contains(&s), "public: Debug shows it");
    }

    #[test]
    fn private_resources_take_defaults_and_name_bad_fields() {
        let r = resource(
            r#"{"name":"db","site":"hq","route":{"private":{"address":"db.internal","alias":"pg"}}}"#,
        );
        assert!(r.validate().is_ok());
        let Route::Private {
            ports, protocols, ..
        } = &r.route
        else {
            panic!("private")
        };
        assert!(ports.is_all());
        assert_eq!(protocols, &[L4Protocol::Tcp, L4Protocol::Udp]);
        assert_eq!(r.alias(), Some("pg"));
        let field = |json: &str| resource(json).validate().unwrap_err().field;
        assert_eq!(
            field(r#"{"name":"db","route":{"private":{"address":"10.0.0.5"}}}"#),
            "site"
        );
        assert_eq!(
            field(
                r#"{"name":"db","site":"hq","route":{"private":{"address":"10.0.0.5"}},"targets":["a:1"]}"#
            ),
            "targets"
        );
        assert_eq!(
            field(
                r#"{"name":"db","site":"hq","route":{"private":{"address":"10.0.0.5","protocols":[]}}}"#
            ),
            "route.private.protocols"
        );
        assert_eq!(
            field(
                r#"{"name":"db","site":"hq","route":{"private":{"address":"10.0.0.5","protocols":["tcp","tcp"]}}}"#
            ),
            "route.private.protocols[1]"
        );
        assert_eq!(
            field(
                r#"{"name":"db","site":"hq","route":{"private":{"address":"10.0.0.5","alias":"a.b"}}}"#
            ),
            "route.private.alias"
        );
        assert_eq!(
            field(
                r#"{"name":"db","site":"hq","route":{"private":{"address":"10.0.0.5"}},"http":{"public":true}}"#
            ),
            "http"
        );
        assert!(serde_json::from_str::<Resource>(
            r#"{"name":"db","site":"hq","route":{"private":{"address":"10.0.0.5","protocols":["sctp"]}}}"#
        )
        .is_err());
    }

    #[test]
    fn private_routes_round_trip_in_the_stored_encoding() {
        let r = resource(
            r#"{"name":"db","site":"hq","route":{"private":{"address":"10.0.0.0/24","ports":"22,8000-8100","protocols":["tcp","icmp"],"alias":"lan","virtual_address":"100.100.0.9"}}}"#,
        );
        let cfg = bincode::config::standard();
        let bytes = bincode::serde::encode_to_vec(&r, cfg).unwrap();
        let (back, _): (Resource, _) = bincode::serde::decode_from_slice(&bytes, cfg).unwrap();
        assert_eq!(back, r);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["route"]["private"]["ports"], "22,8000-8100");
        assert_eq!(serde_json::from_value::<Resource>(json).unwrap(), r);
    }

    #[test]
    fn device_os_is_bounded_text() {
        let mut d = Device {
            name: Name::new("alice-laptop").unwrap(),
            owner: Name::new("alice").unwrap(),
            public_key: WgKey([1; 32]),
            os: "linux".into(),
            address: Ipv4Addr::new(100, 64, 0, 1),
            session: None,
            created_at: 0,
            last_seen: 0,
            last_address: None,
            revision: 0,
        };
        assert!(d.validate().is_ok());
        d.os = "x".repeat(Device::MAX_OS + 1);
        assert_eq!(d.validate().unwrap_err().field, "os");
        d.os = "linux\n".into();
        assert_eq!(d.validate().unwrap_err().field, "os");
    }

    #[test]
    fn same_content_ignores_revision() {
        let a = User {
            name: Name::new("a").unwrap(),
            email: None,
            display_name: None,
            disabled: false,
            revision: 3,
        };
        let mut b = a.clone();
        b.revision = 9;
        assert!(a.same_content(&b));
        b.disabled = true;
        assert!(!a.same_content(&b));
    }
}

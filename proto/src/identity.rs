//! Who a certificate from the cluster CA says its holder is: the vocabulary both nodes and
//! agents use to decide whom they talk to. Identity comes from a verified certificate only,
//! never from a field a peer sends.

use crate::registry::{NodeId, NodeRole};

/// The TLS server name every node certificate carries for node-to-node traffic.
pub const CLUSTER_SERVER_NAME: &str = "cluster.warren.internal";

/// Who a node certificate says its holder is: written by the node that signed it (from the
/// registry and the join token), never by the holder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NodeCert {
    /// The cluster.
    pub cluster_id: u128,
    /// The node's id in the registry.
    pub id: NodeId,
    /// What it may do.
    pub role: NodeRole,
}

/// The URI scheme of node identities in certificates.
const NODE_URI_PREFIX: &str = "warren://";

impl NodeCert {
    /// The certificate's URI name: `warren://<cluster id, 32 hex>/node/<id>/<role>`.
    pub fn uri(&self) -> String {
        format!(
            "{NODE_URI_PREFIX}{:032x}/node/{}/{}",
            self.cluster_id, self.id.0, self.role
        )
    }

    /// Parses [`NodeCert::uri`] strictly: anything else is `None`.
    pub fn parse_uri(uri: &str) -> Option<Self> {
        let rest = uri.strip_prefix(NODE_URI_PREFIX)?;
        let mut parts = rest.split('/');
        let cluster = parts.next()?;
        if parts.next()? != "node" {
            return None;
        }
        let id = parts.next()?;
        let role = NodeRole::parse(parts.next()?)?;
        if parts.next().is_some()
            || cluster.len() != 32
            || !cluster
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            || id.is_empty()
            || !id.bytes().all(|b| b.is_ascii_digit())
            || (id.len() > 1 && id.starts_with('0'))
        {
            return None;
        }
        Some(Self {
            cluster_id: u128::from_str_radix(cluster, 16).ok()?,
            id: NodeId(id.parse().ok()?),
            role,
        })
    }
}

impl std::fmt::Display for NodeCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "node {} ({})", self.id, self.role)
    }
}

/// What the verified certificate of a connection's peer says it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// A node of this cluster, as its certificate names it.
    Node(NodeCert),
    /// The agent of a site.
    Site(crate::Name),
    /// A certificate with the cluster server name but no (or a malformed) node identity:
    /// issued by a version before identities were written into certificates.
    NodeWithoutIdentity,
    /// No certificate, or one that is neither.
    Unknown,
}

/// What a DER certificate (which the caller has verified against the cluster CA) says its
/// holder is, by its names: node certificates carry exactly one node identity URI and the
/// cluster server name, site certificates only their site name.
pub fn classify(leaf: &[u8]) -> Peer {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf) else {
        return Peer::Unknown;
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Peer::Unknown;
    };
    let mut dns = Vec::new();
    let mut uris = Vec::new();
    for n in &san.value.general_names {
        match n {
            GeneralName::DNSName(d) => dns.push(*d),
            GeneralName::URI(u) => uris.push(*u),
            _ => {}
        }
    }
    if dns.contains(&CLUSTER_SERVER_NAME) {
        return match uris.as_slice() {
            [one] => NodeCert::parse_uri(one).map_or(Peer::NodeWithoutIdentity, Peer::Node),
            _ => Peer::NodeWithoutIdentity,
        };
    }
    match (dns.as_slice(), uris.is_empty()) {
        ([one], true) => crate::tunnel::site_of_cert_name(one).map_or(Peer::Unknown, Peer::Site),
        _ => Peer::Unknown,
    }
}

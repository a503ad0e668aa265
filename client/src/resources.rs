//! `warren ls`, and finding the resource and flow destination a command names
//! (`warren connect NAME`, `warren nc HOST PORT`).
//!
//! A DNS-named resource is reached at its `virtual_address` (the agent resolves the name);
//! an IP resource at its address; a network resource at an address inside it, which only
//! `nc HOST PORT` (or `connect --to`) can name.

use std::net::{IpAddr, SocketAddr};

use serde_json::{json, Value};
use warren_proto::registry::{PortSet, PrivateAddress};

use crate::node::Resource;
use crate::session;

/// Runs `warren ls`.
pub async fn list(json: bool) -> anyhow::Result<()> {
    let active = session::active()?;
    let resources = active.client.resources(&active.device.name).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&resources)?);
        return Ok(());
    }
    if resources.is_empty() {
        eprintln!("You may reach no private resource right now.");
        return Ok(());
    }
    let rows: Vec<Value> = resources
        .iter()
        .map(|r| {
            json!({
                "name": r.name,
                "alias": r.alias,
                "site": r.site,
                "address": r.address,
                "ports": r.ports,
                "protocols": r.protocols,
            })
        })
        .collect();
    let rows: Vec<&Value> = rows.iter().collect();
    println!(
        "{}",
        crate::output::table(
            &rows,
            &["name", "alias", "site", "address", "ports", "protocols"]
        )
    );
    Ok(())
}

/// A transport protocol a flow uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Proto {
    fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// Where a flow goes: the resource and the destination inside the tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The resource.
    pub resource: Resource,
    /// The destination the agent is asked for.
    pub dst: SocketAddr,
}

/// Why a name or address does not lead to a resource; the person gave one that does not
/// fit what they may reach.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// Nothing has this name, alias or address.
    #[error("{host:?}: not allowed, or no such private resource (you may reach: {known}); see `warren ls`")]
    Unknown {
        /// What was asked for.
        host: String,
        /// The names one may reach.
        known: String,
    },
    /// The resource does not accept this port.
    #[error("{resource} does not accept port {port} (its ports: {ports})")]
    Port {
        /// The resource.
        resource: String,
        /// The port asked for.
        port: u16,
        /// Its ports.
        ports: String,
    },
    /// The resource does not accept this protocol.
    #[error("{resource} does not accept {proto} (it accepts: {accepts})")]
    Protocol {
        /// The resource.
        resource: String,
        /// The protocol asked for.
        proto: &'static str,
        /// What it accepts.
        accepts: String,
    },
    /// The resource is a network: one address in it must be named.
    #[error("{resource} is the network {address}: name an address inside it, like `warren nc ADDRESS PORT`")]
    Network {
        /// The resource.
        resource: String,
        /// Its network.
        address: String,
    },
    /// The resource accepts every port, so which one must be said.
    #[error("{resource} accepts any port: say which with --port PORT")]
    NoPort {
        /// The resource.
        resource: String,
    },
    /// The node sent an address or port list this client cannot read.
    #[error(
        "the node describes {resource} in a way this client cannot read ({why}); update warren"
    )]
    Unreadable {
        /// The resource.
        resource: String,
        /// What is wrong.
        why: String,
    },
}

/// The resource named `name` (its name or alias) and its destination: `port`, else its
/// first port.
pub fn by_name(
    resources: &[Resource],
    name: &str,
    port: Option<u16>,
    proto: Proto,
) -> Result<Target, ResolveError> {
    let Some(r) = find_named(resources, name) else {
        return Err(unknown(resources, name));
    };
    let ports = ports_of(r)?;
    let port = match port {
        Some(p) => p,
        None if ports.is_all() => {
            return Err(ResolveError::NoPort {
                resource: r.name.clone(),
            })
        }
        None => ports.ranges()[0].0,
    };
    let ip = host_ip(r)?;
    check(r, &ports, port, proto)?;
    Ok(Target {
        resource: r.clone(),
        dst: SocketAddr::new(ip, port),
    })
}

/// The resource `host` names (a name, an alias, a DNS address, or an IP inside a resource's
/// address or network) that accepts `port` over `proto`, the most specific one first.
pub fn by_host(
    resources: &[Resource],
    host: &str,
    port: u16,
    proto: Proto,
) -> Result<Target, ResolveError> {
    let host = host.trim_end_matches('.');
    if find_named(resources, host).is_some() {
        return by_name(resources, host, Some(port), proto);
    }
    if let Some(r) = resources
        .iter()
        .find(|r| r.virtual_address.is_some() && r.address.eq_ignore_ascii_case(host))
    {
        return by_name(resources, &r.name, Some(port), proto);
    }
    let ip = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .map_err(|_| unknown(resources, host))?;
    // (specificity, resource): an exact address beats any network, a longer prefix a shorter.
    let mut best: Option<(u8, &Resource)> = None;
    let mut refusal = None;
    for r in resources {
        let Some(specificity) = covers(r, ip)? else {
            continue;
        };
        if let Err(e) = check(r, &ports_of(r)?, port, proto) {
            refusal.get_or_insert(e);
            continue;
        }
        if best.is_none_or(|(s, _)| specificity > s) {
            best = Some((specificity, r));
        }
    }
    match (best, refusal) {
        (Some((_, r)), _) => Ok(Target {
            resource: r.clone(),
            dst: SocketAddr::new(ip, port),
        }),
        (None, Some(e)) => Err(e),
        (None, None) => Err(unknown(resources, host)),
    }
}

fn find_named<'a>(resources: &'a [Resource], name: &str) -> Option<&'a Resource> {
    // A name beats another resource's alias.
    resources
        .iter()
        .find(|r| r.name.eq_ignore_ascii_case(name))
        .or_else(|| {
            resources.iter().find(|r| {
                r.alias
                    .as_deref()
                    .is_some_and(|a| a.eq_ignore_ascii_case(name))
            })
        })
}

fn unknown(resources: &[Resource], host: &str) -> ResolveError {
    let mut known: Vec<&str> = resources
        .iter()
        .map(|r| r.alias.as_deref().unwrap_or(&r.name))
        .collect();
    known.sort_unstable();
    ResolveError::Unknown {
        host: host.to_owned(),
        known: if known.is_empty() {
            "nothing".to_owned()
        } else {
            known.join(", ")
        },
    }
}

fn address_of(r: &Resource) -> Result<PrivateAddress, ResolveError> {
    r.address.parse().map_err(
        |e: warren_proto::registry::FieldError| ResolveError::Unreadable {
            resource: r.name.clone(),
            why: format!("address: {}", e.reason),
        },
    )
}

fn ports_of(r: &Resource) -> Result<PortSet, ResolveError> {
    r.ports.parse().map_err(
        |e: warren_proto::registry::FieldError| ResolveError::Unreadable {
            resource: r.name.clone(),
            why: format!("ports: {}", e.reason),
        },
    )
}

/// The one address a named resource stands for.
fn host_ip(r: &Resource) -> Result<IpAddr, ResolveError> {
    if let Some(v) = r.virtual_address {
        return Ok(IpAddr::V4(v));
    }
    match address_of(r)? {
        PrivateAddress::Ip(ip) => Ok(ip),
        PrivateAddress::Cidr(_) => Err(ResolveError::Network {
            resource: r.name.clone(),
            address: r.address.clone(),
        }),
        PrivateAddress::Dns(_) => Err(ResolveError::Unreadable {
            resource: r.name.clone(),
            why: "a DNS name without a virtual address".to_owned(),
        }),
    }
}

/// How specifically `r` covers `ip` (higher is more specific), or `None`.
fn covers(r: &Resource, ip: IpAddr) -> Result<Option<u8>, ResolveError> {
    if r.virtual_address.is_some_and(|v| IpAddr::V4(v) == ip) {
        return Ok(Some(u8::MAX));
    }
    let addr = address_of(r)?;
    if !addr.contains(ip) {
        return Ok(None);
    }
    Ok(Some(match addr {
        PrivateAddress::Cidr(net) => net.prefix_len(),
        _ => u8::MAX,
    }))
}

fn check(r: &Resource, ports: &PortSet, port: u16, proto: Proto) -> Result<(), ResolveError> {
    if !r.protocols.iter().any(|p| p == proto.as_str()) {
        return Err(ResolveError::Protocol {
            resource: r.name.clone(),
            proto: proto.as_str(),
            accepts: r.protocols.join(", "),
        });
    }
    if !ports.contains(port) {
        return Err(ResolveError::Port {
            resource: r.name.clone(),
            port,
            ports: r.ports.clone(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(name: &str, alias: Option<&str>, address: &str, ports: &str) -> Resource {
        Resource {
            name: name.into(),
            alias: alias.map(Into::into),
            site: "site-a".into(),
            address: address.into(),
            virtual_address: None,
            ports: ports.into(),
            protocols: vec!["tcp".into()],
        }
    }

    fn all() -> Vec<Resource> {
        let mut db = res("postgres-main", Some("db"), "db.internal", "5432");
        db.virtual_address = Some("100.100.0.3".parse().unwrap());
        let mut dns = res("resolver", None, "10.0.0.53", "53");
        dns.protocols = vec!["udp".into()];
        vec![
            db,
            res("ssh-hosts", None, "10.0.0.0/24", "22"),
            res("web-net", None, "10.0.0.0/16", "22,80-90"),
            res("bastion", Some("jump"), "10.0.0.5", "22"),
            dns,
        ]
    }

    fn dst(t: Result<Target, ResolveError>) -> (String, String) {
        let t = t.unwrap();
        (t.resource.name, t.dst.to_string())
    }

    #[test]
    fn names_and_aliases() {
        let r = all();
        assert_eq!(
            dst(by_name(&r, "db", None, Proto::Tcp)),
            ("postgres-main".into(), "100.100.0.3:5432".into())
        );
        assert_eq!(
            dst(by_name(&r, "postgres-main", None, Proto::Tcp)),
            ("postgres-main".into(), "100.100.0.3:5432".into())
        );
        assert_eq!(
            dst(by_host(&r, "jump", 22, Proto::Tcp)),
            ("bastion".into(), "10.0.0.5:22".into())
        );
        assert_eq!(
            dst(by_host(&r, "db.internal", 5432, Proto::Tcp)),
            ("postgres-main".into(), "100.100.0.3:5432".into())
        );
        assert!(matches!(
            by_name(&r, "ssh-hosts", None, Proto::Tcp),
            Err(ResolveError::Network { .. })
        ));
        assert!(matches!(
            by_host(&r, "db", 22, Proto::Tcp),
            Err(ResolveError::Port { .. })
        ));
        assert!(matches!(
            by_name(&r, "resolver", None, Proto::Tcp),
            Err(ResolveError::Protocol { .. })
        ));
        assert_eq!(
            dst(by_name(&r, "resolver", None, Proto::Udp)),
            ("resolver".into(), "10.0.0.53:53".into())
        );
        let e = by_host(&r, "nope", 22, Proto::Tcp).unwrap_err().to_string();
        assert!(e.contains("db") && e.contains("jump"), "{e}");
    }

    #[test]
    fn addresses_pick_the_most_specific_resource_that_accepts_the_port() {
        let r = all();
        assert_eq!(
            dst(by_host(&r, "10.0.0.5", 22, Proto::Tcp)),
            ("bastion".into(), "10.0.0.5:22".into())
        );
        assert_eq!(
            dst(by_host(&r, "10.0.0.7", 22, Proto::Tcp)),
            ("ssh-hosts".into(), "10.0.0.7:22".into())
        );
        // The /24 does not accept 80; the /16 does.
        assert_eq!(
            dst(by_host(&r, "10.0.0.7", 80, Proto::Tcp)),
            ("web-net".into(), "10.0.0.7:80".into())
        );
        assert_eq!(
            dst(by_host(&r, "10.0.9.9", 22, Proto::Tcp)),
            ("web-net".into(), "10.0.9.9:22".into())
        );
        assert_eq!(
            dst(by_host(&r, "100.100.0.3", 5432, Proto::Tcp)),
            ("postgres-main".into(), "100.100.0.3:5432".into())
        );
        assert!(matches!(
            by_host(&r, "10.0.0.7", 443, Proto::Tcp),
            Err(ResolveError::Port { .. })
        ));
        assert!(matches!(
            by_host(&r, "192.168.1.1", 22, Proto::Tcp),
            Err(ResolveError::Unknown { .. })
        ));
    }

    #[test]
    fn any_port_needs_one_named() {
        let r = vec![res("all-ports", None, "10.1.0.1", "1-65535")];
        assert!(matches!(
            by_name(&r, "all-ports", None, Proto::Tcp),
            Err(ResolveError::NoPort { .. })
        ));
        assert_eq!(
            dst(by_name(&r, "all-ports", Some(8080), Proto::Tcp)),
            ("all-ports".into(), "10.1.0.1:8080".into())
        );
    }
}

//! Joining a cluster.
//!
//! The joining node holds a join token: the cluster id, the CA fingerprint, and a secret.
//! It talks to any node over QUIC with ALPN `warren-join/1`, trusting only a server whose
//! CA matches the fingerprint, and presents no certificate (it has none yet).
//!
//! ```text
//! joiner                                     any voter
//!   │ Register{token, name, addrs, CSR} ───►  token valid? RegisterNode (Raft) with the
//!   │                                         token's role; sign the CSR with the node's
//!   │                                         id and role in the certificate
//!   │ ◄─── Registered{id, role, cert, CA, CA key}   (the CA key only to a voter)
//!   │ writes its data dir, starts serving Raft
//!   │ Admit{token, id, start_as_voter} ───►   add learner (waits for catch-up), promote
//!   │ ◄─── Admitted                           to voter if its role allows and it asked
//! ```
//!
//! The role comes from the join token the admin created (`voter` or `learner`), never from
//! the joining node: a node admitted with a learner token gets no CA key and a certificate
//! that says `learner`, so it can never vote, admit nodes or enroll sites. `--learner` with
//! a voter token only makes a voter-grade node start as a non-voting member (promotable
//! later).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use serde::{Deserialize, Serialize};
use warren_consensus::cluster::Cluster;
use warren_consensus::pki::{self, ClusterCa, CLUSTER_SERVER_NAME};
use warren_consensus::quic::{read_message, request, resolve, write_message};
use warren_consensus::registry::{Command, Outcome};
use warren_consensus::types::{Actor as Who, ClusterNode, Request};
use warren_proto::api::MemberRole;
use warren_proto::registry::{NodeId, NodeRole};
use warren_proto::token::JoinToken;
use warren_proto::Name;

use crate::actors::{MemberOp, Members};
use crate::datadir::DataDir;
use crate::node::{host_of, NodeSpec, RunningNode};
use crate::settings::Settings;

/// Largest join message accepted, in bytes (the peer is not authenticated yet).
const MAX_JOIN_MESSAGE: usize = 64 << 10;

/// Why a node without the CA key (learner-grade) admits nobody.
const LEARNER_ADMITS_NOBODY: &str =
    "this node is learner-grade: it holds no cluster CA key and admits no nodes; join through a voter";

/// A joining node's request. `Debug` leaves out the token.
#[derive(Serialize, Deserialize)]
pub enum JoinRequest {
    /// Ask for an id and a certificate.
    Register {
        /// The join token (`wjt1_…`).
        token: String,
        /// Node name.
        name: Name,
        /// Cluster address.
        cluster_addr: String,
        /// Admin API address.
        admin_addr: String,
        /// Region label.
        region: String,
        /// CSR for the node key (PEM).
        csr_pem: String,
    },
    /// Ask to be added to the membership.
    Admit {
        /// The join token again.
        token: String,
        /// The id given at registration.
        node_id: u64,
        /// Become a voter once caught up (only if its role allows; otherwise it stays a
        /// learner and is told so).
        start_as_voter: bool,
    },
    /// A relay-only node asks for an id and a certificate (with a token made with `--role
    /// relay`; it never asks to be admitted: it is no member).
    RegisterRelay {
        /// The join token.
        token: String,
        /// Node name.
        name: Name,
        /// The relay address clients and agents are told (`ip:port`, UDP).
        relay: String,
        /// Region label.
        region: String,
        /// CSR for the node key (PEM).
        csr_pem: String,
    },
}

/// The answer to a [`JoinRequest`]. `Debug` leaves out the certificates and the CA key.
#[derive(Serialize, Deserialize)]
pub enum JoinReply {
    /// Registration done.
    Registered {
        /// The new node's id.
        node_id: u64,
        /// What it may be (the join token's role, also in its certificate).
        role: NodeRole,
        /// The cluster id.
        cluster_id: u128,
        /// The node certificate (PEM).
        cert_pem: String,
        /// The CA certificate (PEM).
        ca_pem: String,
        /// The CA key (PEM), for voters.
        ca_key_pem: Option<String>,
    },
    /// The node is a member now.
    Admitted {
        /// Whether it is a voter now (else a learner).
        voter: bool,
    },
    /// Refused, and why.
    Refused(String),
}

impl std::fmt::Debug for JoinRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JoinRequest::Register { name, .. } => write!(f, "Register({name})"),
            JoinRequest::Admit {
                node_id,
                start_as_voter,
                ..
            } => write!(f, "Admit({node_id}, start as voter: {start_as_voter})"),
            JoinRequest::RegisterRelay { name, relay, .. } => {
                write!(f, "RegisterRelay({name}, {relay})")
            }
        }
    }
}

impl std::fmt::Debug for JoinReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JoinReply::Registered { node_id, role, .. } => {
                write!(f, "Registered({node_id}, {role})")
            }
            JoinReply::Admitted { voter } => write!(f, "Admitted(voter: {voter})"),
            JoinReply::Refused(why) => write!(f, "Refused({why:?})"),
        }
    }
}

/// The joining side: registers, writes the data directory, starts the node, gets admitted.
/// Returns the node and whether it is a voter now.
pub async fn join(
    dir: DataDir,
    spec: NodeSpec,
    peer: &str,
    token: &JoinToken,
    learner: bool,
    settings: &Settings,
    listeners: crate::node::Listeners,
) -> anyhow::Result<(RunningNode, bool)> {
    let peer_addr = resolve(peer)
        .await
        .map_err(|e| anyhow::anyhow!("--peer: {e}"))?;
    dir.begin_create()?;
    let (key_pem, csr_pem) = pki::node_key_and_csr(spec.name.as_str())?;

    let bind: std::net::SocketAddr = if peer_addr.is_ipv6() {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    }
    .parse()
    .expect("valid address");
    let endpoint = quinn::Endpoint::client(bind).context("opening a QUIC socket")?;
    let conn = endpoint
        .connect_with(
            pki::join_client_config(token.ca_fingerprint)?,
            peer_addr,
            CLUSTER_SERVER_NAME,
        )
        .context("connecting to the peer")?;
    let conn = tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .map_err(|_| anyhow::anyhow!("no answer from {peer} within 10 s (is it a warren-node cluster address?)"))?
        .map_err(|e| {
            let s = e.to_string();
            if s.contains("does not match the token") {
                anyhow::anyhow!("{peer} is not part of the cluster this join token belongs to (its CA does not match the token)")
            } else {
                anyhow::anyhow!("cannot reach {peer}: {s}")
            }
        })?;

    let register = JoinRequest::Register {
        token: token.reveal(),
        name: spec.name.clone(),
        cluster_addr: spec.cluster_addr.clone(),
        admin_addr: spec.admin_addr.clone(),
        region: spec.region.clone(),
        csr_pem,
    };
    let reply: JoinReply = request(&conn, &register, MAX_JOIN_MESSAGE)
        .await
        .map_err(|e| anyhow::anyhow!("registering with {peer}: {e}"))?;
    let (node_id, role, cluster_id, cert_pem, ca_pem, ca_key_pem) = match reply {
        JoinReply::Registered {
            node_id,
            role,
            cluster_id,
            cert_pem,
            ca_pem,
            ca_key_pem,
        } => (node_id, role, cluster_id, cert_pem, ca_pem, ca_key_pem),
        JoinReply::Refused(why) => bail!("{peer} refused the join: {why}"),
        JoinReply::Admitted { .. } => bail!("{peer} answered out of turn"),
    };
    if role != NodeRole::Voter && ca_key_pem.is_some() {
        bail!("{peer} sent the CA key to a {role}: refusing to store it");
    }
    tracing::info!(node_id, %role, "registered; the join token makes this node a {role}");
    if cluster_id != token.cluster_id {
        bail!(
            "{peer} answered for cluster {cluster_id:032x}, the token is for {:032x}",
            token.cluster_id
        );
    }
    let ca = ClusterCa::from_pem(&ca_pem, ca_key_pem.clone())?;
    if ca.fingerprint() != token.ca_fingerprint {
        bail!("{peer} sent a CA that does not match the join token");
    }
    dir.write("ca.pem", ca_pem.as_bytes(), false)?;
    if let Some(k) = &ca_key_pem {
        dir.write("ca.key", k.as_bytes(), true)?;
    }
    dir.write("node.pem", cert_pem.as_bytes(), false)?;
    dir.write("node.key", key_pem.as_bytes(), true)?;
    let file = spec.node_file(cluster_id, node_id);
    dir.write_node_file(&file)?;

    let node = RunningNode::start(dir.clone(), file, settings, listeners).await?;
    let admit = JoinRequest::Admit {
        token: token.reveal(),
        node_id,
        start_as_voter: !learner,
    };
    let reply: Result<JoinReply, _> = request(&conn, &admit, MAX_JOIN_MESSAGE).await;
    conn.close(0u32.into(), b"joined");
    endpoint.wait_idle().await;
    let voter = match reply {
        Ok(JoinReply::Admitted { voter }) => voter,
        Ok(JoinReply::Refused(why)) => bail!("{peer} refused to admit this node: {why}"),
        Ok(other) => bail!("{peer} answered out of turn: {other:?}"),
        Err(e) => bail!("asking {peer} to admit this node: {e}"),
    };
    dir.finish_create()?;
    Ok((node, voter))
}

/// What the admitting side needs.
#[derive(Clone)]
pub struct JoinService {
    /// The cluster.
    pub cluster: Cluster,
    /// The CA (with its key on voters).
    pub ca: ClusterCa,
    /// This cluster's id.
    pub cluster_id: u128,
    /// Where membership changes are serialized.
    pub members: Members,
}

impl warren_consensus::quic::OtherAlpn for JoinService {
    fn alpn(&self) -> &'static [u8] {
        warren_consensus::pki::ALPN_JOIN
    }

    fn serve(
        self: Arc<Self>,
        conn: quinn::Connection,
    ) -> warren_consensus::transport::BoxFuture<'static, ()> {
        Box::pin(self.serve_join(conn))
    }
}

impl JoinService {
    /// Serves one join connection.
    pub async fn serve_join(self: Arc<Self>, conn: quinn::Connection) {
        let peer = conn.remote_address();
        loop {
            let (mut send, mut recv) = match conn.accept_bi().await {
                Ok(s) => s,
                Err(_) => return,
            };
            let reply = match read_message::<JoinRequest>(&mut recv, MAX_JOIN_MESSAGE).await {
                Ok(req) => self.handle(req).await,
                Err(e) => JoinReply::Refused(format!("malformed join request: {e}")),
            };
            if let JoinReply::Refused(why) = &reply {
                tracing::warn!(%peer, "refused a join: {why}");
            }
            if write_message(&mut send, &reply).await.is_err() {
                return;
            }
        }
    }

    /// Checks a join token; returns the role it admits.
    async fn check_token(&self, token: &str) -> Result<NodeRole, String> {
        let token = JoinToken::parse(token).map_err(|e| format!("join token: {e}"))?;
        if token.cluster_id != self.cluster_id {
            return Err("the join token belongs to another cluster".into());
        }
        let role_in = |r: &warren_consensus::registry::Registry| {
            r.join_token(token.token_id, token.secret()).map(|t| t.role)
        };
        if let Some(role) = role_in(&self.cluster.registry()) {
            return Ok(role);
        }
        // Perhaps the token was created a moment ago and has not reached this replica yet.
        let registry =
            crate::miss::recheck(&self.cluster, crate::miss::Kind::JoinToken, token.token_id)
                .await
                .map_err(|e| e.to_string())?;
        role_in(&registry).ok_or_else(|| "the join token is unknown or revoked".into())
    }

    async fn handle(&self, req: JoinRequest) -> JoinReply {
        match self.handle_inner(req).await {
            Ok(r) => r,
            Err(why) => JoinReply::Refused(why),
        }
    }

    /// Only a voter-grade node admits anyone: the role the join token gives.
    async fn admitting(&self, token: &str) -> Result<NodeRole, String> {
        if self.ca.key_pem().is_none() {
            return Err(LEARNER_ADMITS_NOBODY.into());
        }
        self.check_token(token).await
    }

    /// A registry write as the system, its refusal as text.
    async fn write(&self, c: Command) -> Result<Outcome, String> {
        self.cluster
            .write(Request::new(Who::System, c))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }

    /// Registers a joining node: as [`Command::RegisterJoiningNode`] (a retried join keeps
    /// the id a failed one got), or, while a member's build does not read format 3 yet, as
    /// the older [`Command::RegisterNode`].
    async fn register(
        &self,
        name: &warren_proto::Name,
        cluster_addr: &str,
        admin_addr: &str,
        region: String,
        role: NodeRole,
    ) -> Result<Outcome, String> {
        let joining = Command::RegisterJoiningNode {
            name: name.clone(),
            cluster_addr: cluster_addr.to_owned(),
            admin_addr: admin_addr.to_owned(),
            region: region.clone(),
            role,
        };
        match self.cluster.write(Request::new(Who::System, joining)).await {
            Err(warren_consensus::cluster::ClusterError::Unsupported(why)) => {
                tracing::info!("registering with the older command: {why}");
                self.write(Command::RegisterNode {
                    name: name.clone(),
                    cluster_addr: cluster_addr.to_owned(),
                    admin_addr: admin_addr.to_owned(),
                    region,
                    role,
                })
                .await
            }
            other => other.map_err(|e| e.to_string())?.map_err(|e| e.to_string()),
        }
    }

    /// Signs a registered node's certificate request with its id and role, and the answer
    /// (the CA key only to a voter).
    fn registered(
        &self,
        node: &warren_proto::registry::Node,
        csr_pem: &str,
        hosts: &[String],
    ) -> Result<JoinReply, String> {
        let who = pki::NodeCert {
            cluster_id: self.cluster_id,
            id: node.id,
            role: node.role,
        };
        let cert_pem = self
            .ca
            .sign_node(csr_pem, who, node.name.as_str(), hosts)
            .map_err(|e| format!("cannot sign the certificate request: {e}"))?
            .ok_or("this node does not hold the cluster CA key")?;
        Ok(JoinReply::Registered {
            node_id: node.id.0,
            role: node.role,
            cluster_id: self.cluster_id,
            cert_pem,
            ca_pem: self.ca.cert_pem().to_owned(),
            ca_key_pem: if node.role == NodeRole::Voter {
                self.ca.key_pem().map(str::to_owned)
            } else {
                None
            },
        })
    }

    async fn handle_inner(&self, req: JoinRequest) -> Result<JoinReply, String> {
        match req {
            JoinRequest::Register {
                token,
                name,
                cluster_addr,
                admin_addr,
                region,
                csr_pem,
            } => {
                let role = self.admitting(&token).await?;
                if role == NodeRole::Relay {
                    return Err(
                        "this join token is for a relay-only node: run `warren-node relay` with it"
                            .into(),
                    );
                }
                let reply = self
                    .register(&name, &cluster_addr, &admin_addr, region, role)
                    .await?;
                let Outcome::Node(node) = reply else {
                    return Err(format!("unexpected registry reply {reply:?}"));
                };
                let hosts = vec![host_of(&cluster_addr), host_of(&admin_addr)];
                tracing::info!(node = %name, id = node.id.0, %role, "registered a joining node");
                self.registered(&node, &csr_pem, &hosts)
            }
            JoinRequest::Admit {
                token,
                node_id,
                start_as_voter,
            } => {
                let token_role = self.admitting(&token).await?;
                if token_role == NodeRole::Relay {
                    return Err("a relay-only node is never a member of the cluster".into());
                }
                let registry = self.cluster.read().await.map_err(|e| e.to_string())?;
                let node = registry
                    .node_by_id(NodeId(node_id))
                    .ok_or_else(|| format!("node {node_id} is not registered"))?;
                if node.role != token_role {
                    return Err(format!(
                        "node {node_id} registered as a {}, this token admits a {token_role}",
                        node.role
                    ));
                }
                let voter = start_as_voter && node.role == NodeRole::Voter;
                let op = MemberOp::Add {
                    id: node.id,
                    node: ClusterNode {
                        name: node.name.to_string(),
                        addr: node.cluster_addr.clone(),
                    },
                    role: if voter {
                        MemberRole::Voter
                    } else {
                        MemberRole::Learner
                    },
                };
                self.members.change(op).await.map_err(|e| e.to_string())?;
                tracing::info!(node = %node.name, id = node_id, voter, "admitted a node");
                Ok(JoinReply::Admitted { voter })
            }
            JoinRequest::RegisterRelay {
                token,
                name,
                relay,
                region,
                csr_pem,
            } => {
                let role = self.admitting(&token).await?;
                if role != NodeRole::Relay {
                    return Err(format!(
                        "this join token admits a {role}, not a relay-only node: make one with `warren admin join-token create --role relay`, or join with `warren-node join`"
                    ));
                }
                let addr: std::net::SocketAddr = relay.parse().map_err(|_| {
                    format!("the relay address must be ip:port (where clients send), got {relay:?}")
                })?;
                if addr.ip().is_unspecified() || addr.port() == 0 {
                    return Err(format!(
                        "the relay address {addr} names no host clients can send to: set --relay-public"
                    ));
                }
                // A relay-only node serves no cluster or admin API: both name its relay.
                // Always a new id: a relay is never a member, and re-registering one (a
                // new key, after a rebuild or a compromise) must retire the old
                // certificate, which names the old id.
                let reply = self
                    .write(Command::RegisterNode {
                        name: name.clone(),
                        cluster_addr: relay.clone(),
                        admin_addr: relay.clone(),
                        region,
                        role,
                    })
                    .await?;
                let Outcome::Node(node) = reply else {
                    return Err(format!("unexpected registry reply {reply:?}"));
                };
                self.write(Command::SetNodeRelay {
                    node: name.clone(),
                    relay: relay.clone(),
                })
                .await?;
                tracing::info!(node = %name, id = node.id.0, %relay, "registered a relay-only node");
                self.registered(&node, &csr_pem, &[host_of(&relay)])
            }
        }
    }
}

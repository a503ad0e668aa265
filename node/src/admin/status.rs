//! Cluster status: the membership and registry as this node knows them, plus what each
//! member says about itself when asked just now.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::future::join_all;
use warren_consensus::cluster::Cluster;
use warren_consensus::quic::QuicTransport;
use warren_consensus::types::ClusterNode;
use warren_proto::api::{ClusterStatus, MemberRole, MemberStatus};
use warren_proto::registry::NodeId;
use warren_proto::Name;

/// How long each member gets to answer a status request.
const ASK_TIMEOUT: Duration = Duration::from_secs(1);

/// Builds the status answered by `GET /v1/cluster`. Works without a quorum: it reads this
/// node's replica and asks members directly.
pub async fn cluster_status(
    cluster: &Cluster,
    transport: &QuicTransport,
    me: &Name,
    cluster_id: u128,
) -> ClusterStatus {
    let reg = cluster.registry();
    let metrics = cluster.raft().metrics().borrow().clone();
    let membership = metrics.membership_config.membership().clone();

    let mut nodes: BTreeMap<NodeId, (Name, String, String)> = BTreeMap::new();
    for n in reg.nodes().values() {
        nodes.insert(
            n.id,
            (n.name.clone(), n.cluster_addr.clone(), n.admin_addr.clone()),
        );
    }
    for (id, n) in membership.nodes() {
        nodes.entry(*id).or_insert_with(|| {
            let name = Name::new(n.name.clone())
                .unwrap_or_else(|_| Name::new(format!("node-{id}")).expect("valid name"));
            (name, n.addr.clone(), String::new())
        });
    }

    let asks = nodes.iter().map(|(id, (name, addr, _))| {
        let role = reg.member_role(*id);
        let node = ClusterNode {
            name: name.to_string(),
            addr: addr.clone(),
        };
        async move {
            if role == MemberRole::None && *id != cluster.id() {
                return None;
            }
            Some(cluster.peer_status(*id, &node, ASK_TIMEOUT).await)
        }
    });
    let answers = join_all(asks).await;

    let members = nodes
        .into_iter()
        .zip(answers)
        .map(|((id, (name, cluster_addr, admin_addr)), answer)| {
            let role = reg.member_role(id);
            let rtt_us = transport
                .health(id)
                .and_then(|h| h.rtt)
                .map(|d| d.as_micros() as u64)
                .filter(|_| id != cluster.id());
            let mut m = MemberStatus {
                id: id.0,
                name,
                cluster_addr,
                admin_addr,
                role,
                reachable: false,
                error: None,
                rtt_us,
                state: None,
                term: None,
                last_log_index: None,
                last_applied: None,
                snapshot_index: None,
                purged_index: None,
                leader_contact_ms: None,
                applied_digest: None,
                format: None,
            };
            match answer {
                Some(Ok(s)) => {
                    m.reachable = true;
                    m.state = Some(s.state);
                    m.term = Some(s.term);
                    m.last_log_index = s.last_log_index;
                    m.last_applied = s.last_applied;
                    m.snapshot_index = s.snapshot_index;
                    m.purged_index = s.purged_index;
                    m.leader_contact_ms = s.leader_contact_ms;
                    m.applied_digest = Some(format!("{:016x}", s.applied_digest));
                    m.format = Some(s.format.0);
                }
                Some(Err(e)) => m.error = Some(e.to_string()),
                None => m.error = Some("not a member".into()),
            }
            m
        })
        .collect();

    ClusterStatus {
        cluster_id: format!("{cluster_id:032x}"),
        answered_by: me.clone(),
        leader: metrics
            .current_leader
            .and_then(|l| reg.node_by_id(l).map(|n| n.name.clone())),
        term: metrics.current_term,
        joint: membership.get_joint_config().len() > 1,
        members,
    }
}

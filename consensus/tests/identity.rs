//! Who a node is comes from its certificate, over real QUIC on loopback: the receiver of a
//! cluster RPC is told the node the caller's certificate names (there is no sender field to
//! forge), a dialed peer must present the certificate of the node it was dialed as, and
//! relay-only or identity-less certificates get no cluster RPC at all.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rcgen::{CertificateParams, DnType, Issuer, KeyPair};
use warren_consensus::pki::{self, ClusterCa, NodeCert, NodeIdentity, CLUSTER_SERVER_NAME};
use warren_consensus::quic::{accept_loop, QuicTransport, RpcHandler};
use warren_consensus::transport::{BoxFuture, NodeStatus, Rpc, RpcReply, Transport};
use warren_consensus::types::ClusterNode;
use warren_proto::registry::{NodeId, NodeRole};

const CLUSTER: u128 = 0x5eed;

/// Answers every RPC with an empty status and records who it was told the caller is.
#[derive(Default)]
struct Recorder {
    callers: Mutex<Vec<NodeCert>>,
}

impl RpcHandler for Recorder {
    fn handle(&self, from: NodeCert, _rpc: Rpc) -> BoxFuture<'_, RpcReply> {
        self.callers.lock().unwrap().push(from);
        Box::pin(async { RpcReply::Status(NodeStatus::default()) })
    }
}

fn identity(ca: &ClusterCa, id: u64, role: NodeRole) -> NodeIdentity {
    let (key, csr) = pki::node_key_and_csr(&format!("n{id}")).unwrap();
    let who = NodeCert {
        cluster_id: CLUSTER,
        id: NodeId(id),
        role,
    };
    let cert = ca
        .sign_node(&csr, who, &format!("n{id}"), &[])
        .unwrap()
        .unwrap();
    NodeIdentity::from_pem(&cert, &key, ca).unwrap()
}

/// A certificate from the cluster CA with the cluster server name but no node identity, as
/// versions before identities issued them.
fn identity_without_id(ca: &ClusterCa) -> NodeIdentity {
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(vec![CLUSTER_SERVER_NAME.to_string(), "localhost".into()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "warren node old");
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let ca_key = KeyPair::from_pem(ca.key_pem().unwrap()).unwrap();
    let issuer = Issuer::from_ca_cert_pem(ca.cert_pem(), ca_key).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    NodeIdentity::from_pem(&cert.pem(), &key.serialize_pem(), ca).unwrap()
}

fn transport(ca: &ClusterCa, me: &NodeIdentity) -> QuicTransport {
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    QuicTransport::new(endpoint, pki::quic_client_config(ca, me).unwrap(), CLUSTER)
}

#[tokio::test]
async fn a_caller_is_the_node_its_certificate_names_and_nobody_else() {
    let ca = ClusterCa::generate(CLUSTER).unwrap();
    let server = identity(&ca, 1, NodeRole::Voter);
    let endpoint = quinn::Endpoint::server(
        pki::quic_server_config(&ca, &server).unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let addr = endpoint.local_addr().unwrap().to_string();
    let recorder = Arc::new(Recorder::default());
    let serving = tokio::spawn(accept_loop(
        endpoint.clone(),
        CLUSTER,
        recorder.clone(),
        vec![],
    ));
    let node1 = ClusterNode {
        name: "n1".into(),
        addr: addr.clone(),
    };
    let timeout = Duration::from_secs(5);

    // A learner calls: the handler is told it is node 2, a learner, from its certificate.
    let learner = transport(&ca, &identity(&ca, 2, NodeRole::Learner));
    let reply = learner
        .call(NodeId(1), &node1, Rpc::Status, timeout)
        .await
        .unwrap();
    assert!(matches!(reply, RpcReply::Status(_)), "{reply:?}");
    assert_eq!(
        recorder.callers.lock().unwrap().as_slice(),
        &[NodeCert {
            cluster_id: CLUSTER,
            id: NodeId(2),
            role: NodeRole::Learner
        }]
    );

    // Dialing node 4 at an address where node 1 answers: refused before any RPC is sent.
    let e = learner
        .call(NodeId(4), &node1, Rpc::Status, timeout)
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("says it is node 1"),
        "dialing the wrong node: {e}"
    );

    // A relay-only node and a certificate without an identity get no cluster RPC.
    for (what, who) in [
        ("relay-only", identity(&ca, 3, NodeRole::Relay)),
        ("identity-less", identity_without_id(&ca)),
    ] {
        let t = transport(&ca, &who);
        let r = t.call(NodeId(1), &node1, Rpc::Status, timeout).await;
        assert!(r.is_err(), "a {what} certificate was served: {r:?}");
    }
    assert_eq!(
        recorder.callers.lock().unwrap().len(),
        1,
        "only the learner's call reached the handler"
    );

    // And a server with an identity-less certificate is not taken for node 1.
    let old = quinn::Endpoint::server(
        pki::quic_server_config(&ca, &identity_without_id(&ca)).unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let old_node = ClusterNode {
        name: "old".into(),
        addr: old.local_addr().unwrap().to_string(),
    };
    let old_serving = tokio::spawn(accept_loop(old.clone(), CLUSTER, recorder.clone(), vec![]));
    let e = learner
        .call(NodeId(1), &old_node, Rpc::Status, timeout)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no node identity"), "{e}");

    endpoint.close(0u32.into(), b"done");
    old.close(0u32.into(), b"done");
    serving.abort();
    old_serving.abort();
}

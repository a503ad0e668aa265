//! Registries for unit tests, built the way the cluster builds them: commands applied in
//! order by the registry's own state machine.

use warren_consensus::registry::{AnyEntity, ApiKeyRecord, Command, JoinTokenRecord, Registry};
use warren_consensus::types::{Actor as Who, Request, RequestId};
use warren_proto::api::Scope;
use warren_proto::registry::{Node, NodeId, NodeRole, Resource, Route, Target};
use warren_proto::token::{KeyId, SecretHash};
use warren_proto::Name;

/// `s` as a name.
pub fn name(s: &str) -> Name {
    Name::new(s).expect("a valid test name")
}

/// A resource `n` on `route` with one target and no policies.
pub fn resource(n: &str, route: Route) -> Resource {
    Resource {
        name: name(n),
        site: None,
        route,
        targets: vec!["127.0.0.1:9".parse::<Target>().expect("valid target")],
        policies: Vec::new(),
        http: Default::default(),
        revision: 0,
    }
}

/// The command that makes a registry belong to cluster 99 with node 1.
pub fn bootstrap() -> Command {
    Command::Bootstrap {
        cluster_id: 99,
        node: Node {
            id: NodeId(1),
            name: name("n1"),
            cluster_addr: "127.0.0.1:7400".into(),
            admin_addr: "127.0.0.1:7443".into(),
            region: String::new(),
            revision: 0,
            role: NodeRole::Voter,
        },
        api_key: ApiKeyRecord {
            name: name("bootstrap"),
            id: KeyId(7),
            hash: SecretHash([1; 32]),
            scope: Scope::Admin,
            created_at: 0,
            revision: 0,
        },
        join_token: JoinTokenRecord {
            id: 1,
            hash: SecretHash([2; 32]),
            created_at: 0,
            revision: 0,
            role: NodeRole::Voter,
        },
    }
}

/// `reg` after `commands` (from the cluster itself), each of which must succeed.
pub fn apply(reg: &mut Registry, commands: impl IntoIterator<Item = Command>) {
    static INDEX: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    for command in commands {
        let index = INDEX.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let req = Request {
            id: RequestId(u128::from(index) + 1_000_000),
            at: 1_700_000_000,
            actor: Who::System,
            command,
        };
        if let Err(e) = reg.apply_request(index, &req) {
            panic!("applying a test command: {e}");
        }
    }
}

/// A registry holding exactly these resources.
pub fn with_resources(resources: impl IntoIterator<Item = Resource>) -> Registry {
    let mut reg = Registry::default();
    apply(
        &mut reg,
        resources
            .into_iter()
            .map(|r| Command::Create(AnyEntity::Resource(r))),
    );
    reg
}

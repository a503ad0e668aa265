//! Reading declarative files (YAML or JSON) the way people write them.

use serde::de::DeserializeOwned;

/// Parses YAML (JSON is YAML too). Enums are written as single-key maps
/// (`route: {tcp: {port: 5432}}`, `allow: {or: [...]}`); errors name the line.
pub fn from_yaml<T: DeserializeOwned>(text: &str, source: &str) -> anyhow::Result<T> {
    serde_norway::with::singleton_map_recursive::deserialize(serde_norway::Deserializer::from_str(
        text,
    ))
    .map_err(|e| anyhow::anyhow!("{source}: {e}"))
}

/// Reads a file, or standard input for `-`.
pub fn read_source(path: &str) -> anyhow::Result<String> {
    if path == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
        Ok(s)
    } else {
        std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{path}: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use warren_proto::api::Manifest;
    use warren_proto::registry::{Entity as _, L4Protocol, Route};

    use super::*;

    #[test]
    fn a_manifest_reads_as_written() {
        let m: Manifest = from_yaml(
            "sites:\n  - name: hq\nresources:\n  - name: db\n    site: hq\n    route: {tcp: {port: 5432}}\n    targets: [\"10.0.0.7:5432\"]\npolicies:\n  - name: staff\n    allow: {or: [{group: admins}, {email_domain: example.com}]}\n",
            "m.yaml",
        )
        .unwrap();
        let resources = m.resources.unwrap();
        assert_eq!(resources[0].route, Route::Tcp { port: 5432 });
        assert!(m.policies.unwrap()[0].allow.is_some());
        assert!(m.users.is_none(), "a missing section is not an empty one");
    }

    #[test]
    fn private_resources_read_as_written() {
        let m: Manifest = from_yaml(
            "resources:\n  - name: db\n    site: hq\n    route:\n      private:\n        address: db.internal\n        ports: 5432\n        protocols: [tcp]\n        alias: pg\n    policies: [staff]\n  - name: lan\n    site: hq\n    route: {private: {address: 10.0.0.0/24, ports: \"22,8000-8100\"}}\n",
            "m.yaml",
        )
        .unwrap();
        let resources = m.resources.unwrap();
        let Route::Private {
            address,
            ports,
            protocols,
            alias,
            virtual_address,
        } = &resources[0].route
        else {
            panic!("a private route: {:?}", resources[0].route)
        };
        assert_eq!(address.to_string(), "db.internal");
        assert_eq!(ports.to_string(), "5432");
        assert_eq!(protocols, &[L4Protocol::Tcp]);
        assert_eq!(alias.as_deref(), Some("pg"));
        assert_eq!(*virtual_address, None);
        assert!(resources[0].validate().is_ok());
        assert_eq!(resources[1].alias(), None);
        let Route::Private {
            ports, protocols, ..
        } = &resources[1].route
        else {
            panic!("a private route")
        };
        assert_eq!(ports.to_string(), "22,8000-8100");
        assert_eq!(protocols, &L4Protocol::default_set());
        let err = from_yaml::<Manifest>(
            "resources:\n  - name: db\n    site: hq\n    route: {private: {address: db.internal, ports: 0}}\n",
            "m.yaml",
        )
        .unwrap_err();
        assert!(err.to_string().contains("ports: 0 is not a port"), "{err}");
    }

    #[test]
    fn errors_name_the_file_and_line() {
        let err =
            from_yaml::<Manifest>("sites:\n  - name: hq\n    colour: red\n", "m.yaml").unwrap_err();
        let s = err.to_string();
        assert!(s.starts_with("m.yaml: "), "{s}");
        assert!(
            s.contains("unknown field `colour`") && s.contains("line 3"),
            "{s}"
        );
    }
}

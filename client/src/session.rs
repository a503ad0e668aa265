//! The stored node sign-in: `node.json` in the configuration directory (mode 0600, written
//! like `token.json`, see [`crate::token`]).
//!
//! It names the node and its CA, the Warren client session token (a [`Secret`]: never
//! printed, `Debug` redacted), who it is for, and the device registered with it. `warren
//! logout` drops the token and the user but keeps the node, CA and device name, so a later
//! `warren login` needs no flags.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::node::NodeClient;
use crate::token::{self, Secret};

/// The file name of the stored node sign-in inside the configuration directory.
pub const SESSION_FILE: &str = "node.json";

/// What `warren login --node` stores.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSession {
    /// The node's base URL, `https://host:port`.
    pub node: String,
    /// The CA file its certificate is checked against (else the public web roots).
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// The cluster id the node's discovery gave.
    #[serde(default)]
    pub cluster: String,
    /// The identity provider signed in with.
    #[serde(default)]
    pub provider: String,
    /// The Warren user, while signed in.
    #[serde(default)]
    pub user: Option<String>,
    /// The client session token, while signed in.
    #[serde(default)]
    pub token: Option<Secret>,
    /// When the session ends, seconds since the Unix epoch.
    #[serde(default)]
    pub expires_at: Option<u64>,
    /// The device registered from this machine.
    #[serde(default)]
    pub device: Option<DeviceRecord>,
    /// The client API of the cluster's other nodes, asked in turn when `node` does not
    /// answer (from the node's discovery at sign-in).
    #[serde(default)]
    pub nodes: Vec<String>,
}

/// This machine's device, as the node registered it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// Its name.
    pub name: String,
    /// Its tunnel address.
    pub address: std::net::Ipv4Addr,
    /// The user it is registered to.
    #[serde(default)]
    pub owner: String,
}

/// A signed-in session with its device: what every command after login needs.
pub struct Active {
    /// The stored session.
    pub session: NodeSession,
    /// The user.
    pub user: String,
    /// The device.
    pub device: DeviceRecord,
    /// A client for the node carrying the session token.
    pub client: NodeClient,
}

/// The path of `node.json`.
pub fn session_path() -> anyhow::Result<PathBuf> {
    Ok(token::config_dir()?.join(SESSION_FILE))
}

/// Reads `node.json`; `None` if there is none.
pub fn load(path: &Path) -> anyhow::Result<Option<NodeSession>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    serde_json::from_slice(&bytes).map(Some).map_err(|e| {
        anyhow::anyhow!(
            "{} is damaged ({e}): run `warren logout`, then `warren login --node URL`",
            path.display()
        )
    })
}

/// Writes `node.json` (mode 0600, atomically).
pub fn save(path: &Path, session: &NodeSession) -> anyhow::Result<()> {
    let json = serde_json::to_vec_pretty(session).context("encoding the node sign-in")?;
    token::write_private(path, &json)
}

/// Forgets the session token (keeping node, CA and device name); false if there was none.
pub fn forget(path: &Path) -> anyhow::Result<bool> {
    let Some(mut s) = load(path).ok().flatten() else {
        // Missing, or damaged beyond reading: nothing worth keeping.
        return token::remove(path);
    };
    let had = s.token.is_some();
    s.token = None;
    s.user = None;
    s.expires_at = None;
    save(path, &s)?;
    Ok(had)
}

/// The signed-in session, or an error telling the person how to sign in.
pub fn active() -> anyhow::Result<Active> {
    let path = session_path()?;
    let Some(session) = load(&path)? else {
        anyhow::bail!("not signed in to a node: run `warren login --node https://NODE:PORT`");
    };
    let (Some(token), Some(user)) = (session.token.clone(), session.user.clone()) else {
        anyhow::bail!("not signed in: run `warren login`");
    };
    let Some(device) = session.device.clone() else {
        anyhow::bail!("this machine has no device registered: run `warren login`");
    };
    if let Some(exp) = session.expires_at {
        if exp <= now_unix() {
            anyhow::bail!(
                "your sign-in to {} has expired: run `warren login` again",
                session.node
            );
        }
    }
    let client = NodeClient::new(&session.node, session.ca.as_deref())?
        .with_token(token)
        .with_fallbacks(&session.nodes);
    Ok(Active {
        session,
        user,
        device,
        client,
    })
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use super::*;

    fn sample() -> NodeSession {
        NodeSession {
            node: "https://n1:7443".into(),
            ca: Some("/tmp/ca.pem".into()),
            cluster: "ab".into(),
            provider: "corp".into(),
            user: Some("alice".into()),
            token: Some(Secret::new("wct_topsecret")),
            expires_at: Some(2_000_000_000),
            device: Some(DeviceRecord {
                name: "alice-host".into(),
                address: "100.64.0.1".parse().unwrap(),
                owner: "alice".into(),
            }),
            nodes: vec!["https://n2:7443".into()],
        }
    }

    #[test]
    fn round_trips_privately_and_logout_keeps_the_node() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("cfg").join(SESSION_FILE);
        save(&path, &sample()).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert_eq!(load(&path).unwrap(), Some(sample()));
        assert!(!format!("{:?}", sample()).contains("topsecret"));

        assert!(forget(&path).unwrap());
        let after = load(&path).unwrap().unwrap();
        assert_eq!(after.token, None);
        assert_eq!(after.user, None);
        assert_eq!(after.node, "https://n1:7443");
        assert_eq!(after.device, sample().device);
        assert!(!std::fs::read_to_string(&path)
            .unwrap()
            .contains("topsecret"));
        assert!(!forget(&path).unwrap());
    }
}

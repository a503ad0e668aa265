//! `warren login --node URL`: sign in to a Warren cluster and register this machine.
//!
//! ```text
//! GET  /v1/client/discovery  ─► issuer, client id   (--issuer/--client-id override)
//! device flow at the provider (crate::login)  ─► ID token, token.json
//! POST /v1/client/sign-in {provider, id_token}  ─► session token     ─┐
//! wg.key (made once, 0600)  ─► POST /v1/client/devices {public key}  ─┴► node.json (0600)
//! ```

use std::path::PathBuf;

use anyhow::anyhow;

use crate::device;
use crate::login::{self, printable, LoginArgs};
use crate::node::{NodeClient, NodeError, RegisterDevice};
use crate::session::{self, DeviceRecord, NodeSession};

/// The node a login goes to, and what was stored for it before.
#[derive(Debug)]
pub struct NodeTarget {
    /// Base URL.
    pub url: String,
    /// CA file.
    pub ca: Option<PathBuf>,
    /// The stored session for the same node, if any.
    pub previous: Option<NodeSession>,
}

/// Which node `warren login` signs in to: `--node`, else (when no `--issuer` asks for a
/// provider-only login) the node of the last login; `None` for a provider-only login.
pub fn node_for_login(args: &LoginArgs) -> anyhow::Result<Option<NodeTarget>> {
    let path = session::session_path()?;
    // A damaged file is replaced by this login rather than blocking it.
    let stored = session::load(&path).ok().flatten();
    let explicit = args.node.as_deref().filter(|s| !s.trim().is_empty());
    let url = match (explicit, &stored) {
        (Some(n), _) => crate::node::normalize_url(n)?,
        (None, Some(s)) if args.issuer.as_deref().is_none_or(str::is_empty) => s.node.clone(),
        _ => return Ok(None),
    };
    let previous = stored.filter(|s| s.node == url);
    let ca = args
        .ca
        .clone()
        .or_else(|| previous.as_ref().and_then(|p| p.ca.clone()));
    Ok(Some(NodeTarget { url, ca, previous }))
}

/// Signs in at the node's identity provider, then to the node, and registers this machine.
pub async fn sign_in(args: &LoginArgs, target: NodeTarget) -> anyhow::Result<()> {
    let NodeTarget { url, ca, previous } = target;
    // A relative CA path would mean something else when a later command runs elsewhere.
    let ca = match ca {
        Some(p) if p.is_relative() => Some(std::env::current_dir()?.join(p)),
        other => other,
    };
    let client = NodeClient::new(&url, ca.as_deref())?;
    let discovery = client.discovery().await.map_err(|e| {
        anyhow!(
            "cannot read the sign-in settings of the node {url}: {e}; check --node \
             (WARREN_NODE) and --ca (WARREN_CA)"
        )
    })?;
    let provider = discovery
        .provider(args.provider.as_deref())
        .map_err(|e| anyhow!("{url}: {e}"))?
        .clone();
    let issuer = args
        .issuer
        .clone()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| provider.issuer.clone());
    let client_id = args
        .client_id
        .clone()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| provider.client_id.clone());
    let mut scopes = provider.scopes.clone();
    scopes.extend(args.scopes.iter().cloned());

    let tokens = login::device_flow(&issuer, &client_id, &scopes).await?;

    let signed = client
        .sign_in(&provider.name, &tokens.id_token)
        .await
        .map_err(|e| match e {
            NodeError::Unauthorized(m) | NodeError::Forbidden(m) => {
                anyhow!("the node {url} refused the sign-in: {m}")
            }
            other => anyhow!("signing in to the node {url} failed: {other}"),
        })?;
    let user = printable(&signed.user);
    let path = session::session_path()?;
    let mut stored = NodeSession {
        node: url.clone(),
        ca: ca.clone(),
        cluster: discovery.cluster.clone(),
        provider: provider.name.clone(),
        user: Some(signed.user.clone()),
        token: Some(signed.token.clone()),
        expires_at: Some(signed.expires_at),
        device: None,
        nodes: discovery.nodes.clone(),
    };
    // Stored before the device is registered, so a failed registration can be retried by
    // the next login without a lost session.
    session::save(&path, &stored)?;
    println!("Signed in to {url} as {user}");

    let previous_device = previous
        .and_then(|p| p.device)
        .filter(|d| d.owner.is_empty() || d.owner == signed.user);
    let name = match args.device_name.as_deref().filter(|s| !s.is_empty()) {
        Some(n) => check_device_name(n)?,
        None => previous_device.map_or_else(
            || device::default_name(&signed.user, &device::hostname()),
            |d| d.name,
        ),
    };
    let key = device::load_or_create_key(&device::key_path()?)?;
    let client = client.with_token(signed.token);
    let registered = client
        .register_device(&RegisterDevice {
            name: name.clone(),
            public_key: device::public_key_base64(&key),
            os: device::os().to_owned(),
        })
        .await
        .map_err(|e| match e {
            NodeError::Api { code, message, .. }
                if code == "already_exists" || code == "conflict" =>
            {
                anyhow!(
                    "the node cannot register this machine as {name}: {message}; choose \
                     another name with --device-name NAME"
                )
            }
            other => anyhow!("registering this machine as {name} failed: {other}"),
        })?;
    stored.device = Some(DeviceRecord {
        name: registered.name.clone(),
        address: registered.address,
        owner: registered.owner.clone(),
    });
    session::save(&path, &stored)?;
    println!(
        "This machine is device {} with tunnel address {}",
        printable(&registered.name),
        registered.address
    );
    Ok(())
}

/// `--device-name`, checked: lowercase letters, digits and '-', at most 63.
fn check_device_name(name: &str) -> anyhow::Result<String> {
    let clean = device::sanitize_name(name);
    if clean != name {
        anyhow::bail!(
            "--device-name {name:?}: a device name has lowercase letters, digits and '-' \
             (not first or last), at most 63 characters; {clean:?} would do"
        );
    }
    Ok(clean)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_given_are_checked() {
        assert_eq!(check_device_name("ci-runner-1").unwrap(), "ci-runner-1");
        let e = check_device_name("Ci Runner").unwrap_err().to_string();
        assert!(e.contains("ci-runner"), "{e}");
        assert!(check_device_name("-x").is_err());
    }
}

//! Automatic TLS: the ACME (HTTP-01) protocol work for the domains of web resources.
//!
//! The `certs` actor ([`crate::certs`]) decides when to order, for which domains, and holds
//! the lease in Raft so one node orders at a time; this module does the I/O it asks for:
//! the account ([`account`]: created once, stored in Raft, shared by every node), one
//! order per domain ([`order`]), and the HTTP-01 answers, which go through Raft so whichever
//! node the CA reaches can answer (`/.well-known/acme-challenge/` on the HTTP port,
//! [`challenge_answer`]). The issued chain and key are stored as a certificate entity, so
//! every node serves them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use warren_consensus::cluster::Cluster;
use warren_consensus::registry::{AnyEntity, Command, Registry};
use warren_consensus::types::{Actor as Who, Request};
use warren_proto::certificate::Certificate;
use warren_proto::registry::Route;
use warren_proto::{Name, Secret};

use crate::proxy::unix_now;

/// ACME settings of a node (the same on every node of a cluster).
#[derive(Debug, Clone)]
pub struct AcmeSettings {
    /// The CA's directory URL.
    pub directory: String,
    /// A PEM file to trust for the CA's own TLS (a test CA), if not a public one.
    pub root_ca: Option<std::path::PathBuf>,
    /// Contact address for the account.
    pub email: Option<String>,
    /// Renew this long before a certificate expires.
    pub renew_before: Duration,
    /// Hosts that need a certificate besides the resources' domains: the auth host.
    pub also: Vec<String>,
}

/// The certificate entity name for an ACME certificate of `domain`.
fn cert_name(domain: &str) -> Option<Name> {
    Name::new(format!("acme.{domain}")).ok().or_else(|| {
        let digest = warren_proto::token::fingerprint(domain.as_bytes());
        Name::new(format!("acme.{}", hex::encode(&digest[..12]))).ok()
    })
}

/// Resource domains, and the hosts in `also` (the auth host), that need a certificate now.
pub fn domains_needing_certs(
    reg: &Registry,
    now: u64,
    renew_before: Duration,
    also: &[String],
) -> Vec<String> {
    let mut covered: HashMap<String, i64> = HashMap::new();
    for c in reg.certificates().values() {
        if let Ok(info) = c.info() {
            for d in info.domains {
                let e = covered.entry(d).or_insert(i64::MIN);
                *e = (*e).max(info.not_after);
            }
        }
    }
    let due = now as i64 + renew_before.as_secs() as i64;
    let mut out: Vec<String> = reg
        .resources()
        .values()
        .filter_map(|r| match &r.route {
            Route::Http { domain, .. } if !domain.starts_with("*.") => Some(domain.clone()),
            _ => None,
        })
        .chain(also.iter().cloned())
        .filter(|d| {
            let wildcard = d.split_once('.').map(|(_, p)| format!("*.{p}"));
            let valid = |n: &str| covered.get(n).is_some_and(|t| *t > due);
            !valid(d) && !wildcard.as_deref().is_some_and(valid)
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Commits `command` as the system; a refusal by the registry is an error too.
pub(crate) async fn write(cluster: &Cluster, command: Command) -> anyhow::Result<()> {
    cluster
        .write(Request::new(Who::System, command))
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

/// The cluster's ACME account: the one stored in Raft, else a new one at the CA, stored
/// (the first stored wins if two nodes race).
pub async fn account(cluster: &Cluster, settings: &AcmeSettings) -> anyhow::Result<Account> {
    let builder = || -> anyhow::Result<_> {
        Ok(match &settings.root_ca {
            Some(path) => Account::builder_with_root(path)
                .with_context(|| format!("--acme-root-ca {}", path.display()))?,
            None => Account::builder()?,
        })
    };
    if let Some(stored) = &cluster.registry().acme().account {
        let creds: AccountCredentials = serde_json::from_str(stored.expose())
            .context("the stored ACME account does not parse")?;
        return Ok(builder()?.from_credentials(creds).await?);
    }
    let contact = settings.email.as_ref().map(|e| format!("mailto:{e}"));
    let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
    let (account, creds) = builder()?
        .create(
            &NewAccount {
                contact: &contacts,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            settings.directory.clone(),
            None,
        )
        .await
        .with_context(|| format!("creating an account at {}", settings.directory))?;
    let json = serde_json::to_string(&creds)?;
    write(cluster, Command::AcmeAccount(Secret::new(json))).await?;
    Ok(account)
}

/// Orders a certificate for `domain`, answers its HTTP-01 challenges through Raft and
/// stores the issued certificate.
pub async fn order(cluster: &Cluster, account: &Account, domain: &str) -> anyhow::Result<()> {
    let ids = [Identifier::Dns(domain.to_owned())];
    let mut order = account.new_order(&NewOrder::new(&ids)).await?;
    let mut tokens = Vec::new();
    {
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz?;
            if authz.status == AuthorizationStatus::Valid {
                continue;
            }
            let mut challenge = authz
                .challenge(ChallengeType::Http01)
                .context("the CA offers no HTTP-01 challenge")?;
            let token = challenge.token.clone();
            let key_authorization = challenge.key_authorization().as_str().to_owned();
            write(
                cluster,
                Command::AcmeChallenge {
                    token: token.clone(),
                    key_authorization,
                    expires_at: unix_now() + 600,
                },
            )
            .await?;
            tokens.push(token);
            challenge.set_ready().await?;
        }
    }
    let status = order.poll_ready(&RetryPolicy::default()).await?;
    let result = async {
        if status != OrderStatus::Ready {
            anyhow::bail!("the order is {status:?}, not ready (the CA could not validate)");
        }
        let key_pem = order.finalize().await?;
        let chain = order.poll_certificate(&RetryPolicy::default()).await?;
        let name = cert_name(domain).context("no certificate name")?;
        let cert = Certificate {
            name: name.clone(),
            cert_pem: chain,
            key_pem: Secret::new(key_pem),
            revision: 0,
        };
        let exists = cluster.registry().certificates().contains_key(&name);
        let command = if exists {
            Command::Update(AnyEntity::Certificate(cert))
        } else {
            Command::Create(AnyEntity::Certificate(cert))
        };
        write(cluster, command).await
    }
    .await;
    for token in tokens {
        let _ = write(cluster, Command::AcmeChallengeDone { token }).await;
    }
    result
}

/// The answer to an HTTP-01 challenge for `token`, from the registry. A token this node
/// has not seen yet may have been stored a moment ago through the ordering node: it is
/// looked up again on the leader, within the limits of [`crate::miss`] (anyone can ask
/// for made-up tokens on the HTTP port).
pub async fn challenge_answer(cluster: &Cluster, token: &str) -> Option<String> {
    let lookup = |reg: Arc<Registry>| reg.acme().challenges.get(token).map(|(k, _)| k.clone());
    if let Some(k) = lookup(cluster.registry()) {
        return Some(k);
    }
    if !plausible_token(token) {
        return None;
    }
    let registry = crate::miss::recheck(cluster, crate::miss::Kind::AcmeChallenge, token)
        .await
        .ok()?;
    lookup(registry)
}

/// Whether `token` could be an HTTP-01 challenge token: base64url without padding (RFC
/// 8555, section 8.3), of a sane length. Anything else is not worth a leader read.
fn plausible_token(token: &str) -> bool {
    (16..=256).contains(&token.len())
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plausible_challenge_tokens_are_worth_a_leader_read() {
        assert!(plausible_token(
            "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0"
        ));
        for bad in [
            "",
            "short",
            "has/a/slash/in/it/xxxxxxxx",
            "padded=padded=padded=padded",
            "spaces are not base64url at all",
            &"a".repeat(257),
        ] {
            assert!(!plausible_token(bad), "{bad:?}");
        }
    }
}

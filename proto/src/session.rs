//! Sign-in sessions: replicated in the registry so every node accepts them.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{Name, Secret};

/// A session's random id. The browser never sees it in clear: cookies carry it sealed
/// under the cluster's cookie key, bound to one host.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SessionId(pub u128);

impl SessionId {
    /// A fresh random id.
    pub fn random() -> Self {
        Self(rand::random())
    }

    /// Parses the 32-hex-digit form the API shows.
    pub fn parse(s: &str) -> Option<Self> {
        if s.len() != 32 {
            return None;
        }
        u128::from_str_radix(s, 16).ok().map(Self)
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Only a prefix: enough to correlate logs, not enough to be the id.
        write!(f, "SessionId({:08x}…)", (self.0 >> 96) as u32)
    }
}

/// A signed-in person's session, created by the proxy after an OpenID Connect sign-in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// Random id.
    pub id: SessionId,
    /// The user it belongs to (set by the registry when it provisions or finds the user).
    pub user: Name,
    /// Identity provider used.
    pub idp: Name,
    /// E-mail address from the ID token (or the one an e-mail code was sent to).
    pub email: String,
    /// Whether `email` is known to be the user's: the provider verified it
    /// (`email_verified`, or the provider's `trust_email`), or an e-mail code proved it.
    /// An unverified address is only shown to the user: policies and apps never see it.
    pub email_verified: bool,
    /// Groups from the provider's groups claim.
    pub groups: Vec<String>,
    /// Start, seconds since the Unix epoch.
    pub created_at: u64,
    /// End, seconds since the Unix epoch; the session is void after it.
    pub expires_at: u64,
    /// The provider's refresh token, if it gave one.
    pub refresh_token: Option<Secret>,
    /// When the provider's tokens expire; the cluster refreshes before then.
    pub token_expires_at: Option<u64>,
    /// The ID token, kept for RP-initiated sign-out (`id_token_hint`).
    pub id_token: Option<Secret>,
    /// How the session was opened.
    pub via: Via,
    /// The one resource a session opened without single sign-on is good for.
    pub resource: Option<Name>,
    /// The ID token's claims as JSON (for `claim` policy criteria); empty if none.
    pub claims: String,
}

impl Session {
    /// The e-mail address if it is verified ([`Session::email_verified`]), else `None`:
    /// the only address policies match and apps are told.
    pub fn verified_email(&self) -> Option<&str> {
        (self.email_verified && !self.email.is_empty()).then_some(self.email.as_str())
    }
}

/// How a session was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    /// Single sign-on with the identity provider: the user's policies decide.
    Sso,
    /// The resource's PIN.
    Pin,
    /// The resource's passcode.
    Passcode,
    /// A one-time code sent to a listed e-mail address.
    EmailCode,
    /// A share link.
    ShareLink,
}

/// A link that opens one resource without an account until it expires. Only the hash of
/// its secret is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareLink {
    /// Random id (in the link, before the secret).
    pub id: u64,
    /// The resource it opens.
    pub resource: Name,
    /// SHA-256 of the secret.
    pub hash: crate::token::SecretHash,
    /// Creation time, seconds since the Unix epoch.
    pub created_at: u64,
    /// End of validity, seconds since the Unix epoch.
    pub expires_at: u64,
}

/// A share link as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareLinkView {
    /// Id, 16 hex digits.
    pub id: String,
    /// Resource.
    pub resource: Name,
    /// Creation time.
    pub created_at: u64,
    /// End of validity.
    pub expires_at: u64,
}

impl From<&ShareLink> for ShareLinkView {
    fn from(l: &ShareLink) -> Self {
        Self {
            id: format!("{:016x}", l.id),
            resource: l.resource.clone(),
            created_at: l.created_at,
            expires_at: l.expires_at,
        }
    }
}

/// A session as the admin API shows it: no tokens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionView {
    /// Id (32 hex digits).
    pub id: String,
    /// User.
    pub user: Name,
    /// Identity provider.
    pub idp: Name,
    /// E-mail address.
    pub email: String,
    /// Whether the address is verified.
    pub email_verified: bool,
    /// Groups from the provider.
    pub groups: Vec<String>,
    /// Start, seconds since the Unix epoch.
    pub created_at: u64,
    /// End, seconds since the Unix epoch.
    pub expires_at: u64,
    /// When the provider's tokens expire.
    pub token_expires_at: Option<u64>,
    /// How it was opened.
    pub via: Via,
    /// The resource it is limited to, if any.
    pub resource: Option<Name>,
}

impl From<&Session> for SessionView {
    fn from(s: &Session) -> Self {
        Self {
            id: s.id.to_string(),
            user: s.user.clone(),
            idp: s.idp.clone(),
            email: s.email.clone(),
            email_verified: s.email_verified,
            groups: s.groups.clone(),
            created_at: s.created_at,
            expires_at: s.expires_at,
            token_expires_at: s.token_expires_at,
            via: s.via,
            resource: s.resource.clone(),
        }
    }
}

/// The cluster's proxy secrets: the key that seals cookies and the keys that sign identity
/// assertions. Created once by the first node that needs them; replicated like the rest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyKeys {
    /// 32 random bytes, base64url: seals session cookies and sign-in state.
    pub cookie_key: Secret,
    /// Signing keys, newest last; the newest signs, all are published.
    pub signing_keys: Vec<SigningKey>,
}

/// A key that signs identity assertions to upstreams.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SigningKey {
    /// Key id (`kid`).
    pub kid: String,
    /// PKCS#8 ECDSA P-256 private key, base64url of DER.
    pub pkcs8: Secret,
    /// Creation time, seconds since the Unix epoch.
    pub created_at: u64,
}

/// Makes a user name from an e-mail address: its local part, lowercased, with characters a
/// name cannot hold replaced by `-`. Gives `user` when nothing usable is left.
pub fn user_name_from_email(email: &str) -> String {
    let local = email.rsplit_once('@').map_or(email, |(l, _)| l);
    let mut out: String = local
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let trimmed = out.trim_start_matches(['-', '_', '.']).len();
    out = out[out.len() - trimmed..].to_owned();
    out.truncate(Name::MAX_LEN - 4);
    if out.is_empty() {
        "user".to_owned()
    } else {
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_names_from_emails_are_valid_names() {
        for (email, want) in [
            ("alice@example.test", "alice"),
            ("Bob.Smith+x@corp.test", "bob.smith-x"),
            ("__x@y.z", "x"),
            ("@y.z", "user"),
        ] {
            let got = user_name_from_email(email);
            assert_eq!(got, want);
            assert!(Name::new(got).is_ok());
        }
        let long = format!("{}@x.y", "a".repeat(200));
        assert!(Name::new(format!("{}-99", user_name_from_email(&long))).is_ok());
    }

    #[test]
    fn only_a_verified_address_is_given_out() {
        let mut s = Session {
            id: SessionId(1),
            user: Name::new("dave").unwrap(),
            idp: Name::new("test").unwrap(),
            email: "dave@example.test".into(),
            email_verified: false,
            groups: Vec::new(),
            created_at: 0,
            expires_at: 1,
            refresh_token: None,
            token_expires_at: None,
            id_token: None,
            via: Via::Sso,
            resource: None,
            claims: String::new(),
        };
        assert_eq!(s.verified_email(), None);
        s.email_verified = true;
        assert_eq!(s.verified_email(), Some("dave@example.test"));
        s.email.clear();
        assert_eq!(s.verified_email(), None, "no address is not a verified one");
    }

    #[test]
    fn debug_shows_only_a_prefix_of_the_id() {
        let id = SessionId(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
        assert_eq!(format!("{id:?}"), "SessionId(01234567…)");
        assert_eq!(SessionId::parse(&id.to_string()), Some(id));
    }
}

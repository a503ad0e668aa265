//! Credential formats: admin API keys and node join tokens.
//!
//! Both carry a 256-bit random secret. The cluster stores only its SHA-256 hash (a fast
//! hash is right for a uniformly random secret of this size: there is nothing to guess),
//! and compares hashes in constant time.
//!
//! ```text
//! API key     wrn_<key id: 16 hex>_<secret: 43 base64url>
//! join token  wjt1_<base64url(cluster id 16 B | CA fingerprint 32 B | token id 8 B | secret 32 B)>
//! ```
//!
//! The join token carries the fingerprint of the cluster CA so a joining node can tell the
//! real cluster from an impostor before it sends the secret.

use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use rand::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The SHA-256 hash of a credential secret, as the registry stores it.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretHash(pub [u8; 32]);

impl SecretHash {
    /// Hashes a secret.
    pub fn of(secret: &[u8; 32]) -> Self {
        Self(Sha256::digest(secret).into())
    }

    /// Whether `secret` hashes to this value, compared in constant time.
    pub fn matches(&self, secret: &[u8; 32]) -> bool {
        Self::of(secret).0.ct_eq(&self.0).into()
    }
}

impl fmt::Debug for SecretHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretHash(..)")
    }
}

/// The public half of an API key: how the registry finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct KeyId(pub u64);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Why a string is not a credential of the expected form; the caller sent it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The string does not start with the expected prefix.
    #[error("expected a value starting with {0:?}")]
    Prefix(&'static str),
    /// The string has the prefix but its body does not decode.
    #[error("the value is malformed (truncated or altered)")]
    Malformed,
}

/// An admin API key as the user holds it. `Debug` hides the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey {
    /// Which key this is.
    pub id: KeyId,
    secret: [u8; 32],
}

impl ApiKey {
    const PREFIX: &'static str = "wrn_";

    /// A new random key.
    pub fn generate(rng: &mut (impl RngCore + CryptoRng)) -> Self {
        let mut secret = [0u8; 32];
        rng.fill_bytes(&mut secret);
        Self {
            id: KeyId(rng.next_u64()),
            secret,
        }
    }

    /// Parses the `wrn_…` form.
    pub fn parse(s: &str) -> Result<Self, TokenError> {
        let body = s
            .trim()
            .strip_prefix(Self::PREFIX)
            .ok_or(TokenError::Prefix(Self::PREFIX))?;
        let (id, secret) = body.split_once('_').ok_or(TokenError::Malformed)?;
        if id.len() != 16 {
            return Err(TokenError::Malformed);
        }
        let id = u64::from_str_radix(id, 16).map_err(|_| TokenError::Malformed)?;
        let secret = decode_exact::<32>(secret)?;
        Ok(Self {
            id: KeyId(id),
            secret,
        })
    }

    /// The hash the registry stores.
    pub fn hash(&self) -> SecretHash {
        SecretHash::of(&self.secret)
    }

    /// The secret, for comparing against a stored hash.
    pub fn secret(&self) -> &[u8; 32] {
        &self.secret
    }

    /// The `wrn_…` form, to show once to the person who created the key.
    pub fn reveal(&self) -> String {
        format!("{}{}_{}", Self::PREFIX, self.id, B64.encode(self.secret))
    }
}

/// The secret part of a share link: `wsl_<16 hex id>_<secret>`.
pub fn share_token(id: u64, secret: &[u8; 32]) -> String {
    format!("wsl_{id:016x}_{}", B64.encode(secret))
}

/// Parses a share link's token into its id and secret.
pub fn parse_share_token(s: &str) -> Option<(u64, [u8; 32])> {
    let (id, secret) = s.trim().strip_prefix("wsl_")?.split_once('_')?;
    if id.len() != 16 {
        return None;
    }
    let id = u64::from_str_radix(id, 16).ok()?;
    Some((id, decode_exact::<32>(secret).ok()?))
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKey({}, <redacted>)", self.id)
    }
}

/// What a [`PinnedToken`] is for: its prefix and its name in `Debug`.
pub trait TokenKind {
    /// The prefix of the printed form.
    const PREFIX: &'static str;
    /// The type's name in `Debug`.
    const NAME: &'static str;
}

/// A token that pins a cluster: the cluster id, the SHA-256 of its CA certificate, the
/// token's id in the registry and a secret, printed as base64url after the kind's prefix
/// (so a token of one kind is never accepted as another). `Debug` hides the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct PinnedToken<K> {
    /// The cluster the token belongs to.
    pub cluster_id: u128,
    /// SHA-256 of the cluster CA certificate (DER).
    pub ca_fingerprint: [u8; 32],
    /// Which token this is in the registry.
    pub token_id: u64,
    secret: [u8; 32],
    kind: std::marker::PhantomData<K>,
}

/// Tokens that let a new node join a cluster (`wjt1_…`).
#[derive(Clone, PartialEq, Eq)]
pub struct Join;
impl TokenKind for Join {
    const PREFIX: &'static str = "wjt1_";
    const NAME: &'static str = "JoinToken";
}

/// One-time tokens that enroll a `warren-agent` for a site (`wst1_…`).
#[derive(Clone, PartialEq, Eq)]
pub struct Site;
impl TokenKind for Site {
    const PREFIX: &'static str = "wst1_";
    const NAME: &'static str = "SiteToken";
}

/// A token that lets a new node join a cluster.
pub type JoinToken = PinnedToken<Join>;
/// A one-time token that enrolls a site's agent.
pub type SiteToken = PinnedToken<Site>;

const PINNED_LEN: usize = 16 + 32 + 8 + 32;

impl<K: TokenKind> PinnedToken<K> {
    /// A new random token for a cluster.
    pub fn generate(
        cluster_id: u128,
        ca_fingerprint: [u8; 32],
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Self {
        let mut secret = [0u8; 32];
        rng.fill_bytes(&mut secret);
        Self {
            cluster_id,
            ca_fingerprint,
            token_id: rng.next_u64(),
            secret,
            kind: std::marker::PhantomData,
        }
    }

    /// Parses the printed form.
    pub fn parse(s: &str) -> Result<Self, TokenError> {
        let body = s
            .trim()
            .strip_prefix(K::PREFIX)
            .ok_or(TokenError::Prefix(K::PREFIX))?;
        let raw = decode_exact::<PINNED_LEN>(body)?;
        let (cluster, rest) = raw.split_at(16);
        let (fp, rest) = rest.split_at(32);
        let (id, secret) = rest.split_at(8);
        Ok(Self {
            cluster_id: u128::from_be_bytes(cluster.try_into().map_err(|_| TokenError::Malformed)?),
            ca_fingerprint: fp.try_into().map_err(|_| TokenError::Malformed)?,
            token_id: u64::from_be_bytes(id.try_into().map_err(|_| TokenError::Malformed)?),
            secret: secret.try_into().map_err(|_| TokenError::Malformed)?,
            kind: std::marker::PhantomData,
        })
    }

    /// The hash the registry stores.
    pub fn hash(&self) -> SecretHash {
        SecretHash::of(&self.secret)
    }

    /// The secret, for comparing against a stored hash.
    pub fn secret(&self) -> &[u8; 32] {
        &self.secret
    }

    /// The printed form, shown once to whoever uses the token.
    pub fn reveal(&self) -> String {
        let mut raw = Vec::with_capacity(PINNED_LEN);
        raw.extend_from_slice(&self.cluster_id.to_be_bytes());
        raw.extend_from_slice(&self.ca_fingerprint);
        raw.extend_from_slice(&self.token_id.to_be_bytes());
        raw.extend_from_slice(&self.secret);
        format!("{}{}", K::PREFIX, B64.encode(raw))
    }
}

impl<K: TokenKind> fmt::Debug for PinnedToken<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}(cluster {:032x}, token {:016x}, <redacted>)",
            K::NAME,
            self.cluster_id,
            self.token_id
        )
    }
}

/// SHA-256 of a certificate, as join tokens pin it.
pub fn fingerprint(der: &[u8]) -> [u8; 32] {
    Sha256::digest(der).into()
}

fn decode_exact<const N: usize>(s: &str) -> Result<[u8; N], TokenError> {
    // Refuse before decoding anything oversized.
    if s.len() > N * 4 / 3 + 4 {
        return Err(TokenError::Malformed);
    }
    let v = B64.decode(s).map_err(|_| TokenError::Malformed)?;
    v.try_into().map_err(|_| TokenError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_key_round_trips_and_hides_its_secret() {
        let k = ApiKey::generate(&mut rand::rngs::OsRng);
        let s = k.reveal();
        assert!(s.starts_with("wrn_"));
        let back = ApiKey::parse(&s).unwrap();
        assert_eq!(back, k);
        assert!(k.hash().matches(back.secret()));
        assert!(!format!("{k:?}").contains(&s[21..]));
    }

    #[test]
    fn altered_api_keys_are_refused_or_do_not_match() {
        let k = ApiKey::generate(&mut rand::rngs::OsRng);
        let s = k.reveal();
        assert_eq!(ApiKey::parse("nope"), Err(TokenError::Prefix("wrn_")));
        assert_eq!(ApiKey::parse(&s[..s.len() - 1]), Err(TokenError::Malformed));
        assert_eq!(
            ApiKey::parse(&format!("{s}AAAA")),
            Err(TokenError::Malformed)
        );
        let mut flipped = s.clone().into_bytes();
        let last = flipped.len() - 2;
        flipped[last] = if flipped[last] == b'A' { b'B' } else { b'A' };
        let other = ApiKey::parse(std::str::from_utf8(&flipped).unwrap()).unwrap();
        assert!(!k.hash().matches(other.secret()));
    }

    #[test]
    fn join_token_round_trips() {
        let t = JoinToken::generate(7, [9; 32], &mut rand::rngs::OsRng);
        let back = JoinToken::parse(&t.reveal()).unwrap();
        assert_eq!(back, t);
        assert_eq!(back.cluster_id, 7);
        assert!(t.hash().matches(back.secret()));
        assert_eq!(JoinToken::parse("wjt1_AAAA"), Err(TokenError::Malformed));
        assert_eq!(
            JoinToken::parse("wjt2_AAAA"),
            Err(TokenError::Prefix("wjt1_"))
        );
    }

    #[test]
    fn a_site_token_is_not_a_join_token_and_hides_its_secret() {
        let t = SiteToken::generate(7, [9; 32], &mut rand::rngs::OsRng);
        let shown = t.reveal();
        assert!(shown.starts_with("wst1_"));
        assert_eq!(SiteToken::parse(&shown).unwrap(), t);
        assert_eq!(JoinToken::parse(&shown), Err(TokenError::Prefix("wjt1_")));
        let debug = format!("{t:?}");
        assert!(debug.starts_with("SiteToken(") && debug.contains("<redacted>"));
        assert!(!debug.contains(&shown[5..15]));
    }
}

//! Sealed tokens: cookies and one-time codes the proxy hands to browsers, encrypted and
//! authenticated with the cluster's cookie key (ChaCha20-Poly1305), so every node can open
//! what any node sealed and nobody else can read or forge them.
//!
//! The purpose is bound in as associated data: a sign-in state cookie cannot be replayed as
//! a session cookie or a handoff code.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// What a sealed token is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// A session cookie.
    Session,
    /// The sign-in state cookie (state, nonce, PKCE verifier, where to go after).
    Login,
    /// A one-time code that hands a session to a resource's domain.
    Handoff,
    /// The pending e-mail code of a resource's sign-in form.
    EmailCode,
    /// The token of a sign-out form: proof that a POST to `/.warren/sign_out` comes from
    /// the page the proxy showed to this session, not from another site.
    SignOut,
    /// A `warren` client's session token (the bearer of the client API).
    Client,
}

impl Purpose {
    fn aad(self) -> &'static [u8] {
        match self {
            Purpose::Session => b"warren/session/v1",
            Purpose::Login => b"warren/login/v1",
            Purpose::Handoff => b"warren/handoff/v1",
            Purpose::EmailCode => b"warren/email-code/v1",
            Purpose::Client => b"warren/client/v1",
            Purpose::SignOut => b"warren/sign-out/v1",
        }
    }
}

/// Seals and opens tokens with one key.
pub struct Sealer {
    key: LessSafeKey,
    rng: SystemRandom,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(<key redacted>)")
    }
}

/// Longest token accepted for opening, in characters (cookies are at most 4 KiB anyway).
const MAX_TOKEN: usize = 3072;

impl Sealer {
    /// A sealer with a 32-byte key given as base64url; `None` if it is not one.
    pub fn from_b64(key: &str) -> Option<Self> {
        let bytes = URL_SAFE_NO_PAD.decode(key).ok()?;
        let key = UnboundKey::new(&CHACHA20_POLY1305, &bytes).ok()?;
        Some(Self {
            key: LessSafeKey::new(key),
            rng: SystemRandom::new(),
        })
    }

    /// A fresh random key, base64url.
    pub fn generate_key() -> String {
        let mut k = [0u8; 32];
        SystemRandom::new()
            .fill(&mut k)
            .expect("the system random source works");
        URL_SAFE_NO_PAD.encode(k)
    }

    /// Seals `value` for `purpose`.
    pub fn seal<T: Serialize>(&self, purpose: Purpose, value: &T) -> String {
        let mut buf = vec![0u8; NONCE_LEN];
        self.rng
            .fill(&mut buf)
            .expect("the system random source works");
        let nonce = Nonce::try_assume_unique_for_key(&buf[..NONCE_LEN]).expect("nonce length");
        let mut body = serde_json::to_vec(value).expect("sealed values encode");
        self.key
            .seal_in_place_append_tag(nonce, Aad::from(purpose.aad()), &mut body)
            .expect("sealing cannot fail for in-memory data");
        buf.extend_from_slice(&body);
        URL_SAFE_NO_PAD.encode(buf)
    }

    /// Opens a token sealed for `purpose`; `None` if it was not sealed by this key for this
    /// purpose, was changed, or does not decode.
    pub fn open<T: DeserializeOwned>(&self, purpose: Purpose, token: &str) -> Option<T> {
        if token.len() > MAX_TOKEN {
            return None;
        }
        let mut buf = URL_SAFE_NO_PAD.decode(token).ok()?;
        if buf.len() < NONCE_LEN + CHACHA20_POLY1305.tag_len() {
            return None;
        }
        let (nonce, body) = buf.split_at_mut(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(purpose.aad()), body)
            .ok()?;
        serde_json::from_slice(plain).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_what_it_sealed_only_for_the_same_purpose_and_key() {
        let key = Sealer::generate_key();
        let a = Sealer::from_b64(&key).unwrap();
        let t = a.seal(Purpose::Session, &("alice", 42u64));
        assert_eq!(
            a.open::<(String, u64)>(Purpose::Session, &t),
            Some(("alice".into(), 42))
        );
        assert_eq!(a.open::<(String, u64)>(Purpose::Handoff, &t), None);
        assert_eq!(a.open::<(String, u64)>(Purpose::SignOut, &t), None);
        let other = Sealer::from_b64(&Sealer::generate_key()).unwrap();
        assert_eq!(other.open::<(String, u64)>(Purpose::Session, &t), None);
        // Any flipped character is refused.
        let mut bytes = t.into_bytes();
        let i = bytes.len() / 2;
        bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
        let forged = String::from_utf8(bytes).unwrap();
        assert_eq!(a.open::<(String, u64)>(Purpose::Session, &forged), None);
        assert_eq!(a.open::<(String, u64)>(Purpose::Session, "garbage!"), None);
        assert!(Sealer::from_b64("short").is_none());
    }
}

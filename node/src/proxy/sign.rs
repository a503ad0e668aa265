//! Identity assertions for upstreams: a JWT (ES256) signed per request with the cluster's
//! newest signing key; all current keys are published as a JWKS.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use bytes::Bytes;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde::Serialize;
use warren_proto::session::SigningKey;
use warren_proto::Secret;

/// Lifetime of an assertion, in seconds.
pub const ASSERTION_TTL: u64 = 300;

/// Signs with the newest key; knows the JWKS of all.
pub struct Signer {
    kid: String,
    key: EcdsaKeyPair,
    rng: SystemRandom,
    jwks: Bytes,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signer(kid={}, <key redacted>)", self.kid)
    }
}

#[derive(Serialize)]
struct Jwk<'a> {
    kty: &'static str,
    crv: &'static str,
    alg: &'static str,
    #[serde(rename = "use")]
    use_: &'static str,
    kid: &'a str,
    x: String,
    y: String,
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    aud: &'a str,
    sub: &'a str,
    /// Only a verified address: an unverified one is the provider's user's say-so.
    #[serde(skip_serializing_if = "Option::is_none")]
    email: Option<&'a str>,
    email_verified: bool,
    groups: &'a [&'a str],
    iat: u64,
    exp: u64,
    jti: String,
}

impl Signer {
    /// A signer from the stored keys (newest last); `None` if there is none or the newest
    /// does not load.
    pub fn from_keys(keys: &[SigningKey]) -> Option<Self> {
        let rng = SystemRandom::new();
        let mut jwks = Vec::new();
        let mut newest = None;
        for k in keys {
            let der = URL_SAFE_NO_PAD.decode(k.pkcs8.expose()).ok()?;
            let pair =
                EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &der, &rng).ok()?;
            let point = pair.public_key().as_ref();
            if point.len() != 65 {
                return None;
            }
            jwks.push(Jwk {
                kty: "EC",
                crv: "P-256",
                alg: "ES256",
                use_: "sig",
                kid: &k.kid,
                x: URL_SAFE_NO_PAD.encode(&point[1..33]),
                y: URL_SAFE_NO_PAD.encode(&point[33..65]),
            });
            newest = Some((k.kid.clone(), pair));
        }
        let (kid, key) = newest?;
        let jwks = serde_json::to_vec(&serde_json::json!({ "keys": jwks })).ok()?;
        Some(Self {
            kid,
            key,
            rng,
            jwks: Bytes::from(jwks),
        })
    }

    /// A fresh key.
    pub fn generate(created_at: u64) -> SigningKey {
        let rng = SystemRandom::new();
        let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .expect("key generation works");
        let mut id = [0u8; 8];
        rng.fill(&mut id).expect("random works");
        SigningKey {
            kid: hex::encode(id),
            pkcs8: Secret::new(URL_SAFE_NO_PAD.encode(doc.as_ref())),
            created_at,
        }
    }

    /// The published key set (`/.well-known/warren/jwks.json`).
    pub fn jwks(&self) -> Bytes {
        self.jwks.clone()
    }

    /// A signed assertion of who is asking, for the upstream of `aud` (the route's host).
    /// `email` is the verified address, if there is one: the claim `email_verified` says
    /// whether the assertion carries one.
    pub fn assertion(
        &self,
        iss: &str,
        aud: &str,
        sub: &str,
        email: Option<&str>,
        groups: &[&str],
        now: u64,
    ) -> String {
        let mut jti = [0u8; 16];
        self.rng.fill(&mut jti).expect("random works");
        let header = serde_json::json!({"alg": "ES256", "typ": "JWT", "kid": self.kid});
        let claims = Claims {
            iss,
            aud,
            sub,
            email,
            email_verified: email.is_some(),
            groups,
            iat: now,
            exp: now + ASSERTION_TTL,
            jti: hex::encode(jti),
        };
        let mut out = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header).expect("encodes"));
        out.push('.');
        out.push_str(&URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).expect("encodes")));
        let sig = self
            .key
            .sign(&self.rng, out.as_bytes())
            .expect("signing works");
        out.push('.');
        out.push_str(&URL_SAFE_NO_PAD.encode(sig.as_ref()));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_FIXED};

    #[test]
    fn assertions_verify_with_the_published_key_and_rotation_keeps_old_keys_published() {
        let old = Signer::generate(1);
        let new = Signer::generate(2);
        let s = Signer::from_keys(&[old.clone(), new.clone()]).unwrap();
        let jwt = s.assertion(
            "https://auth.x",
            "app.x",
            "alice",
            Some("a@x"),
            &["dev"],
            100,
        );
        let jwks: serde_json::Value = serde_json::from_slice(&s.jwks()).unwrap();
        let keys = jwks["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 2);
        let parts: Vec<&str> = jwt.split('.').collect();
        let header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
        assert_eq!(header["kid"], new.kid.as_str());
        let jwk = keys.iter().find(|k| k["kid"] == header["kid"]).unwrap();
        let mut point = vec![4u8];
        point.extend(URL_SAFE_NO_PAD.decode(jwk["x"].as_str().unwrap()).unwrap());
        point.extend(URL_SAFE_NO_PAD.decode(jwk["y"].as_str().unwrap()).unwrap());
        let signed = format!("{}.{}", parts[0], parts[1]);
        let sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &point)
            .verify(signed.as_bytes(), &sig)
            .unwrap();
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(claims["aud"], "app.x");
        assert_eq!(claims["exp"], 100 + ASSERTION_TTL);
        assert_eq!(claims["email"], "a@x");
        assert_eq!(claims["email_verified"], true);
        // A changed payload does not verify.
        let forged = format!("{}.{}x", parts[0], parts[1]);
        assert!(UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &point)
            .verify(forged.as_bytes(), &sig)
            .is_err());
    }

    #[test]
    fn an_assertion_without_a_verified_address_has_no_email_claim() {
        let s = Signer::from_keys(&[Signer::generate(1)]).unwrap();
        let jwt = s.assertion("https://auth.x", "app.x", "dave", None, &[], 100);
        let payload = jwt.split('.').nth(1).unwrap();
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
        assert!(claims.get("email").is_none(), "{claims}");
        assert_eq!(claims["email_verified"], false);
        assert_eq!(claims["sub"], "dave");
    }
}

//! PINs and passcodes: stored as Argon2id hashes, checked in constant time by the Argon2
//! verifier, behind a per-client attempt limit (checking is deliberately slow).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

/// The PHC string of `secret` (Argon2id, default parameters, random salt).
pub fn hash(secret: &str) -> String {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(secret.as_bytes(), &salt)
        .expect("hashing with default parameters works")
        .to_string()
}

/// Whether `secret` matches the PHC string `phc`.
pub fn verify(secret: &str, phc: &str) -> bool {
    PasswordHash::new(phc)
        .map(|h| {
            Argon2::default()
                .verify_password(secret.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

/// Failed attempts allowed per client and key within [`WINDOW`].
pub const MAX_FAILURES: u32 = 10;
/// The window of the attempt limit.
pub const WINDOW: Duration = Duration::from_secs(300);

/// Counts failed attempts per (client address, what was tried), on this node.
#[derive(Default)]
pub struct Attempts {
    failures: Mutex<HashMap<(IpAddr, String), (u32, Instant)>>,
}

impl Attempts {
    /// Whether `client` may try `key` now.
    pub fn allowed(&self, client: IpAddr, key: &str) -> bool {
        let mut map = self.failures.lock().expect("attempts lock");
        let now = Instant::now();
        if map.len() > 100_000 {
            map.retain(|_, (_, since)| now.duration_since(*since) < WINDOW);
        }
        match map.get(&(client, key.to_owned())) {
            Some((n, since)) if now.duration_since(*since) < WINDOW => *n < MAX_FAILURES,
            _ => true,
        }
    }

    /// Records a failed attempt.
    pub fn failed(&self, client: IpAddr, key: &str) {
        let mut map = self.failures.lock().expect("attempts lock");
        let now = Instant::now();
        let e = map.entry((client, key.to_owned())).or_insert((0, now));
        if now.duration_since(e.1) >= WINDOW {
            *e = (0, now);
        }
        e.0 += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_verify_only_the_secret_and_attempts_are_limited() {
        let h = hash("123456");
        assert!(h.starts_with("$argon2id$"));
        assert!(verify("123456", &h));
        assert!(!verify("123457", &h));
        assert!(!verify("123456", "not a hash"));
        let a = Attempts::default();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..MAX_FAILURES {
            assert!(a.allowed(ip, "r"));
            a.failed(ip, "r");
        }
        assert!(!a.allowed(ip, "r"));
        assert!(a.allowed(ip, "other"));
        assert!(a.allowed("192.0.2.2".parse().unwrap(), "r"));
    }
}

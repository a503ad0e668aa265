//! PINs and passcodes: stored as Argon2id hashes, checked in constant time by the Argon2
//! verifier (deliberately slow), behind a per-client attempt limit that the whole cluster
//! counts together.
//!
//! ```text
//!  POST pin ──► reserve(client, key) ──► Raft: ReserveAttempt ──► refused: 429
//!                     │ counted (as a failure until released)
//!                     ▼
//!               Argon2 verify ──► wrong: 401, the try stays counted for WINDOW
//!                     │ right
//!                     ▼
//!               session opened ──► Raft: ReleaseAttempt (the try no longer counts)
//! ```
//!
//! Counting before checking is what makes the limit hold cluster-wide: tries sent to
//! three nodes at once are three writes to one log, and the fourth past the limit is
//! refused wherever it arrives. [`Attempts`] is the node-local counter for rate limits
//! where a per-node count is enough (e-mails sent, invalid share links).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use warren_consensus::cluster::Cluster;
use warren_consensus::registry::{AttemptKey, Command, RegistryError};
use warren_consensus::types::{Actor, Request};

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

/// Why a try at a guessable secret may not be made now.
#[derive(Debug, thiserror::Error)]
pub enum ReserveError {
    /// [`MAX_FAILURES`] tries of this client at this secret count already; the client's
    /// fault.
    #[error("too many attempts; try again in {retry_after} s")]
    TooMany {
        /// Seconds until the oldest counted try leaves the window.
        retry_after: u64,
    },
    /// The cluster could not count the try (no quorum, no leader); the try is refused
    /// rather than checked uncounted.
    #[error("the attempt could not be counted: {0}")]
    Unavailable(String),
}

/// A try at a guessable secret, counted cluster-wide as a failure until
/// [`Reservation::release`]d. Dropping it leaves the try counted (a wrong guess).
#[must_use = "a reservation that is not released counts as a failed attempt"]
#[derive(Debug)]
pub struct Reservation {
    attempt: AttemptKey,
    id: u128,
}

/// The part of a client address tries are counted by: an IPv4 address whole, an IPv6
/// address's /64 (one subscriber usually holds a whole /64, so counting per address would
/// give them 2^64 times the tries).
pub fn client_prefix(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(
            u128::from(v6) & 0xffff_ffff_ffff_ffff_0000_0000_0000_0000,
        )),
        v4 => v4,
    }
}

/// Counts a try of `client` at `key` (e.g. `pin:<resource>`) with the cluster, before the
/// secret is checked; refused when [`MAX_FAILURES`] tries within [`WINDOW`] count already.
///
/// A client this node's replica already shows at the limit is refused without a write,
/// so one that keeps trying past the limit does not cost the cluster a log entry a try.
pub async fn reserve(
    cluster: &Cluster,
    client: IpAddr,
    key: &str,
) -> Result<Reservation, ReserveError> {
    let attempt = AttemptKey {
        client: client_prefix(client),
        key: key.to_owned(),
    };
    let now = super::unix_now();
    if let Some(record) = cluster.registry().attempts().get(&attempt) {
        if record.counted(now) >= MAX_FAILURES as usize {
            return Err(ReserveError::TooMany {
                retry_after: record.retry_after(now),
            });
        }
    }
    let id: u128 = rand::random();
    let command = Command::ReserveAttempt {
        attempt: attempt.clone(),
        id,
        limit: MAX_FAILURES,
        window: WINDOW.as_secs(),
    };
    match cluster.write(Request::new(Actor::System, command)).await {
        Ok(Ok(_)) => Ok(Reservation { attempt, id }),
        Ok(Err(RegistryError::TooManyAttempts { retry_after })) => {
            Err(ReserveError::TooMany { retry_after })
        }
        Ok(Err(e)) => Err(ReserveError::Unavailable(e.to_string())),
        Err(e) => Err(ReserveError::Unavailable(e.to_string())),
    }
}

impl Reservation {
    /// The try succeeded: stop counting it, so that users who know the secret are never
    /// locked out by sharing an address. If the write fails, the try counts as a failure
    /// until it leaves the window (logged, not an error for the user who got in).
    pub async fn release(self, cluster: &Cluster) {
        let command = Command::ReleaseAttempt {
            attempt: self.attempt,
            id: self.id,
        };
        if let Err(e) = cluster.write(Request::new(Actor::System, command)).await {
            tracing::debug!("releasing a successful attempt: {e}");
        }
    }
}

/// Counts failed attempts per (client address, what was tried), on this node only: for
/// rate limits where a per-node count is enough (e-mails sent, invalid share links).
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

    #[test]
    fn tries_are_counted_per_ipv4_address_and_per_ipv6_64() {
        let p = |s: &str| client_prefix(s.parse().unwrap()).to_string();
        assert_eq!(p("192.0.2.1"), "192.0.2.1");
        assert_eq!(p("::ffff:192.0.2.1"), "192.0.2.1");
        assert_eq!(p("2001:db8:1:2:aaaa:bbbb:cccc:dddd"), "2001:db8:1:2::");
        assert_eq!(p("2001:db8:1:2::1"), p("2001:db8:1:2:ffff::9"));
        assert_ne!(p("2001:db8:1:2::1"), p("2001:db8:1:3::1"));
    }
}

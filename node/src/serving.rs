//! Whether this node may grant access now: in contact with a cluster leader within the
//! configured bound, storage healthy, still a member.
//!
//! Computed in one place (the [`ClusterActor`](crate::actors::ClusterActor)'s tick, every
//! [`SERVING_TICK`]) and read by everyone: the proxy before granting a request, every open
//! L4 flow and upgraded connection when it re-checks, the admin API's health. Readers take
//! it with one atomic load ([`Serving::check`]).
//!
//! The answer carries the time it was computed. A reader that finds it older than
//! [`SERVING_STALE`] treats the node as not serving: if the actor that computes it is down
//! (crashed and not back, or stuck), the node fails closed instead of granting access on
//! the last answer for ever.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::publish::Published;

/// How often the serving state is computed.
pub const SERVING_TICK: Duration = Duration::from_millis(200);
/// Older than this, a serving state no longer counts (its producer is down).
pub const SERVING_STALE: Duration = Duration::from_secs(2);

/// One computed serving state.
#[derive(Debug, Clone)]
pub struct ServingState {
    /// `None`: serving. Otherwise why not (fail closed).
    pub why_not: Option<Arc<str>>,
    /// When it was computed.
    pub at: Instant,
}

/// The node's serving state, as last computed.
#[derive(Clone, Debug)]
pub struct Serving {
    state: Arc<Published<ServingState>>,
}

impl Serving {
    /// Not serving until the first computation.
    pub fn new() -> Self {
        Self {
            state: Published::new(ServingState {
                why_not: Some("starting".into()),
                at: Instant::now(),
            }),
        }
    }

    /// `Ok` if the node may grant access now, else why not.
    pub fn check(&self) -> Result<(), Arc<str>> {
        self.check_at(Instant::now())
    }

    /// [`Serving::check`] at `now`.
    pub fn check_at(&self, now: Instant) -> Result<(), Arc<str>> {
        let s = self.state.load();
        let age = now.saturating_duration_since(s.at);
        if age > SERVING_STALE {
            return Err(format!(
                "the serving state was last computed {} ms ago (the cluster actor is down)",
                age.as_millis()
            )
            .into());
        }
        match &s.why_not {
            None => Ok(()),
            Some(why) => Err(why.clone()),
        }
    }

    /// Records a newly computed state; subscribers are woken only when the node starts or
    /// stops serving (the reason's text changes every tick while it is not). Returns whether
    /// it changed between serving and not.
    pub fn set(&self, result: Result<(), String>, now: Instant) -> bool {
        let was = self.state.load().why_not.is_none();
        let is = result.is_ok();
        let state = Arc::new(ServingState {
            why_not: result.err().map(Arc::from),
            at: now,
        });
        if was == is {
            self.state.refresh(state);
            false
        } else {
            self.state.publish(state);
            true
        }
    }

    /// Woken when the node starts or stops serving.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.state.subscribe()
    }
}

impl Default for Serving {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serving_follows_the_last_computation_and_goes_stale() {
        let s = Serving::new();
        let t0 = Instant::now();
        assert!(s.check_at(t0).is_err(), "not serving before the first tick");
        assert!(s.set(Ok(()), t0));
        assert!(s.check_at(t0).is_ok());
        assert!(!s.set(Ok(()), t0 + SERVING_TICK), "no change, no wake-up");
        assert!(s.set(Err("no leader".into()), t0 + 2 * SERVING_TICK));
        assert_eq!(
            &*s.check_at(t0 + 2 * SERVING_TICK).unwrap_err(),
            "no leader"
        );
        assert!(s.set(Ok(()), t0 + 3 * SERVING_TICK));
        // Nobody computed it again: after the stale bound the node fails closed.
        let late = t0 + 3 * SERVING_TICK + SERVING_STALE + Duration::from_millis(1);
        let why = s.check_at(late).unwrap_err();
        assert!(why.contains("cluster actor is down"), "{why}");
    }
}

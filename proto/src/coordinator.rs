//! The hole-punch coordinator's logic for one client↔site pairing, sans-IO: the node the
//! client is bound to runs one per pairing (an actor in `warren-node`), and the simulation
//! drives the same code.
//!
//! ```text
//!  client ──Call(offer C)──► Pairing ──Call(offer C)──► agent
//!  client ◄──Go(offer A)──── Pairing ◄──Answer(offer A)─ agent
//!                              └──────Go(offer C)──────► agent   (both at once: probe now)
//! ```
//!
//! The coordinator reads only what it needs of an offer (its round, to match an Answer to
//! the Call it answers); it cannot check tags (the key belongs to the two ends), and does
//! not need to: a forged offer fails at the far end, and a forged probe target gets probes
//! nobody answers.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::relay::{Offer, PunchKind};

/// A pairing that has seen no Call or Answer this long is forgotten.
pub const PAIRING_IDLE: Duration = Duration::from_secs(120);
/// An answer to a Call older than this is too late (the client has given up on the round).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a coordinator's message goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client's binding.
    Client,
    /// Towards the agent (the agent, or the peer relay that holds it).
    Agent,
}

/// A Punch frame for the shell to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PunchOut {
    /// To whom.
    pub to: Side,
    /// What.
    pub kind: PunchKind,
    /// The offer's sender as the first relay saw it.
    pub observed: Option<SocketAddr>,
    /// The encoded offer.
    pub body: Vec<u8>,
}

/// What a pairing has counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PairingStats {
    /// Calls passed on.
    pub calls: u64,
    /// Go pairs sent (rounds coordinated).
    pub rounds: u64,
    /// Answers to no Call pending (late, or not for the Call we hold): dropped.
    pub unmatched: u64,
    /// Bodies that are no offer: dropped.
    pub malformed: u64,
}

#[derive(Debug, Clone)]
struct Call {
    round: u64,
    observed: Option<SocketAddr>,
    body: Vec<u8>,
    at: Instant,
}

/// One client↔site pairing.
#[derive(Debug, Clone)]
pub struct Pairing {
    call: Option<Call>,
    last: Instant,
    stats: PairingStats,
}

impl Pairing {
    /// A pairing first heard of at `now`.
    pub fn new(now: Instant) -> Self {
        Self {
            call: None,
            last: now,
            stats: PairingStats::default(),
        }
    }

    /// A Call from the client: passed on to the agent, and kept until it is answered.
    pub fn handle_call(
        &mut self,
        observed: Option<SocketAddr>,
        body: &[u8],
        now: Instant,
    ) -> Option<PunchOut> {
        let Some(offer) = Offer::decode(body) else {
            self.stats.malformed += 1;
            return None;
        };
        self.last = now;
        self.stats.calls += 1;
        self.call = Some(Call {
            round: offer.round,
            observed,
            body: body.to_vec(),
            at: now,
        });
        Some(PunchOut {
            to: Side::Agent,
            kind: PunchKind::Call,
            observed,
            body: body.to_vec(),
        })
    }

    /// An Answer from the agent: if it answers the Call held, a Go to each side, at once,
    /// with the other's offer.
    pub fn handle_answer(
        &mut self,
        observed: Option<SocketAddr>,
        body: &[u8],
        now: Instant,
    ) -> Vec<PunchOut> {
        let Some(offer) = Offer::decode(body) else {
            self.stats.malformed += 1;
            return Vec::new();
        };
        let matches = self
            .call
            .as_ref()
            .is_some_and(|c| c.round == offer.answers && now.duration_since(c.at) < CALL_TIMEOUT);
        if !matches {
            self.stats.unmatched += 1;
            return Vec::new();
        }
        let call = self.call.take().expect("matched above");
        self.last = now;
        self.stats.rounds += 1;
        vec![
            PunchOut {
                to: Side::Client,
                kind: PunchKind::Go,
                observed,
                body: body.to_vec(),
            },
            PunchOut {
                to: Side::Agent,
                kind: PunchKind::Go,
                observed: call.observed,
                body: call.body,
            },
        ]
    }

    /// Whether the pairing is gone quiet long enough to forget.
    pub fn is_idle(&self, now: Instant) -> bool {
        now.duration_since(self.last) >= PAIRING_IDLE
    }

    /// When it will be, unless something arrives.
    pub fn idle_at(&self) -> Instant {
        self.last + PAIRING_IDLE
    }

    /// Its counters.
    pub fn stats(&self) -> PairingStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::TAG_LEN;

    fn offer(round: u64, answers: u64) -> Vec<u8> {
        Offer {
            from: [1; 32],
            round,
            answers,
            candidates: vec!["10.0.0.1:1".parse().unwrap()],
            tag: [0; TAG_LEN],
        }
        .encode()
    }

    #[test]
    fn an_answer_to_the_call_held_sends_go_to_both_sides_with_the_other_offer() {
        let t = Instant::now();
        let mut p = Pairing::new(t);
        let obs_c: SocketAddr = "198.51.100.1:4000".parse().unwrap();
        let obs_a: SocketAddr = "203.0.113.1:51820".parse().unwrap();
        let call = offer(7, 0);
        let out = p.handle_call(Some(obs_c), &call, t).unwrap();
        assert_eq!((out.to, out.kind), (Side::Agent, PunchKind::Call));
        // An answer to another round is not this call's.
        assert!(p.handle_answer(Some(obs_a), &offer(9, 8), t).is_empty());
        let answer = offer(9, 7);
        let go = p.handle_answer(Some(obs_a), &answer, t + Duration::from_millis(30));
        assert_eq!(go.len(), 2);
        assert_eq!((go[0].to, go[0].kind), (Side::Client, PunchKind::Go));
        assert_eq!((go[0].observed, &go[0].body), (Some(obs_a), &answer));
        assert_eq!((go[1].to, go[1].kind), (Side::Agent, PunchKind::Go));
        assert_eq!((go[1].observed, &go[1].body), (Some(obs_c), &call));
        // Answered once: a replay of the answer coordinates nothing.
        assert!(p.handle_answer(Some(obs_a), &answer, t).is_empty());
        assert_eq!(p.stats().rounds, 1);
        assert_eq!(p.stats().unmatched, 2);
    }

    #[test]
    fn late_answers_and_garbage_are_dropped_and_idle_pairings_expire() {
        let t = Instant::now();
        let mut p = Pairing::new(t);
        assert!(p.handle_call(None, b"junk", t).is_none());
        p.handle_call(None, &offer(1, 0), t).unwrap();
        assert!(p
            .handle_answer(None, &offer(2, 1), t + CALL_TIMEOUT)
            .is_empty());
        assert!(!p.is_idle(t + PAIRING_IDLE - Duration::from_secs(1)));
        assert!(p.is_idle(t + PAIRING_IDLE));
        assert_eq!(p.stats().malformed, 1);
    }
}

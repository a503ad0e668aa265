use super::*;
use warren_proto::coordinator::{Pairing, Side};

const CLIENT: &str = "198.51.100.2:40000";
const AGENT: &str = "203.0.113.5:51820";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A client and an agent with a coordinator between them, on a network that delivers
/// direct datagrams when `open` says so.
struct Pair {
    client: Direct,
    agent: Direct,
    pairing: Pairing,
    now: Instant,
    open: bool,
    /// The agent's NAT filters: a client datagram reaches it only after the agent sent
    /// one to the client.
    agent_filters: bool,
    agent_opened: bool,
    /// Gos to the agent still to lose.
    lose_agent_go: u32,
    events: Vec<DirectEvent>,
}

impl Pair {
    fn new() -> Self {
        let (c, a) = (SecretKey::generate(), SecretKey::generate());
        let mut client = Direct::new(Role::Controlling, &c, a.public_key(), 1).unwrap();
        let mut agent = Direct::new(Role::Controlled, &a, c.public_key(), 2).unwrap();
        let now = Instant::now();
        client.set_local(vec![addr(CLIENT)], now);
        agent.set_local(vec![addr(AGENT)], now);
        Self {
            client,
            agent,
            pairing: Pairing::new(now),
            now,
            open: true,
            agent_filters: false,
            agent_opened: false,
            lose_agent_go: 0,
            events: Vec::new(),
        }
    }

    /// Moves every datagram until nothing moves.
    fn exchange(&mut self) {
        for _ in 0..1000 {
            let mut moved = false;
            while let Some(t) = self.client.poll_transmit() {
                moved = true;
                match t {
                    DirectTransmit::Punch { kind, body } => {
                        assert_eq!(kind, PunchKind::Call);
                        if let Some(out) = self.pairing.handle_call(None, &body, self.now) {
                            let _ = self.agent.handle_punch(
                                out.kind,
                                out.observed,
                                &out.body,
                                self.now,
                            );
                        }
                    }
                    DirectTransmit::Direct { to, datagram } => {
                        assert_eq!(datagram.len(), PROBE_SIZE);
                        let filtered = self.agent_filters && !self.agent_opened;
                        if self.open && to == addr(AGENT) && !filtered {
                            let f = Frame::decode(&datagram).unwrap();
                            let _ = match f {
                                Frame::Probe { .. } => {
                                    self.agent.handle_probe(addr(CLIENT), &f, self.now)
                                }
                                _ => self.agent.handle_ack(addr(CLIENT), &f, self.now),
                            };
                        }
                    }
                }
            }
            while let Some(t) = self.agent.poll_transmit() {
                moved = true;
                match t {
                    DirectTransmit::Punch { kind, body } => {
                        assert_eq!(kind, PunchKind::Answer);
                        for out in self.pairing.handle_answer(None, &body, self.now) {
                            let d = match out.to {
                                Side::Client => &mut self.client,
                                Side::Agent if self.lose_agent_go > 0 => {
                                    self.lose_agent_go -= 1;
                                    continue;
                                }
                                Side::Agent => &mut self.agent,
                            };
                            let _ = d.handle_punch(out.kind, out.observed, &out.body, self.now);
                        }
                    }
                    DirectTransmit::Direct { to, datagram } => {
                        self.agent_opened |= to == addr(CLIENT);
                        if self.open && to == addr(CLIENT) {
                            let f = Frame::decode(&datagram).unwrap();
                            let _ = match f {
                                Frame::Probe { .. } => {
                                    self.client.handle_probe(addr(AGENT), &f, self.now)
                                }
                                _ => self.client.handle_ack(addr(AGENT), &f, self.now),
                            };
                        }
                    }
                }
            }
            self.events
                .extend(std::iter::from_fn(|| self.client.poll_event()));
            if !moved {
                return;
            }
        }
        panic!("datagrams kept moving");
    }

    /// Runs the timers to `until`, a millisecond at a time at most.
    fn run_until(&mut self, until: Instant) {
        while self.now < until {
            self.exchange();
            let next = [self.client.poll_timeout(), self.agent.poll_timeout()]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(until)
                .clamp(self.now + Duration::from_millis(1), until);
            self.now = next;
            self.client.handle_timeout(self.now);
            self.agent.handle_timeout(self.now);
        }
        self.exchange();
    }

    fn run_for(&mut self, d: Duration) {
        let until = self.now + d;
        self.run_until(until);
    }
}

#[test]
fn an_open_path_is_found_at_once_and_kept_by_heartbeats() {
    let mut p = Pair::new();
    p.client.relay_ready(p.now);
    p.run_for(Duration::from_millis(50));
    assert_eq!(p.client.path(), Some(addr(AGENT)));
    assert!(matches!(p.events[..], [DirectEvent::Direct { .. }]));
    // Minutes later it is still direct, and nothing went back to the relay.
    p.run_for(Duration::from_secs(120));
    assert_eq!(p.client.path(), Some(addr(AGENT)));
    assert_eq!(p.client.stats().fallbacks, 0);
    assert_eq!(p.client.status(p.now).state, "direct");
}

#[test]
fn a_dead_path_falls_back_within_two_seconds_and_is_found_again_after_the_backoff() {
    let mut p = Pair::new();
    p.client.relay_ready(p.now);
    p.run_for(Duration::from_millis(50));
    assert!(p.client.path().is_some());
    p.open = false;
    let cut = p.now;
    while p.client.path().is_some() {
        p.run_for(Duration::from_millis(10));
        assert!(p.now - cut < Duration::from_secs(3), "no fallback");
    }
    let took = p.now - cut;
    assert!(
        took <= Duration::from_millis(2000),
        "fell back after {took:?}"
    );
    assert!(matches!(p.events.last(), Some(DirectEvent::Relayed { .. })));
    // While the path stays cut, rounds find nothing; once it opens, the next round does.
    p.run_for(Duration::from_secs(20));
    assert!(p.client.path().is_none());
    p.open = true;
    p.run_for(BACKOFF_MAX + PUNCH_WINDOW);
    assert_eq!(p.client.path(), Some(addr(AGENT)));
}

#[test]
fn forged_and_replayed_probes_are_ignored_and_counted() {
    let mut p = Pair::new();
    p.client.relay_ready(p.now);
    // Catch a heartbeat of the client on its way.
    p.run_for(Duration::from_millis(50));
    p.now += HEARTBEAT;
    p.client.handle_timeout(p.now);
    let probe = std::iter::from_fn(|| p.client.poll_transmit())
        .find_map(|t| match t {
            DirectTransmit::Direct { datagram, .. } => Some(datagram),
            _ => None,
        })
        .expect("a probe");
    let f = Frame::decode(&probe).unwrap();
    assert_eq!(p.agent.handle_probe(addr(CLIENT), &f, p.now), Ok(()));
    // The same probe again: a replay.
    assert_eq!(
        p.agent.handle_probe(addr(CLIENT), &f, p.now),
        Err(Ignored::Replayed)
    );
    // One bit changed: forged.
    let mut bad = probe.clone();
    bad[40] ^= 1;
    let f = Frame::decode(&bad).unwrap();
    assert_eq!(
        p.agent.handle_probe(addr(CLIENT), &f, p.now),
        Err(Ignored::Forged)
    );
    // A key nobody paired with: forged.
    let stranger = SecretKey::generate();
    let mut other = Direct::new(Role::Controlling, &stranger, p.client.peer(), 9).unwrap();
    other.peer_round = p.agent.peer_round.map(|_| p.agent.round);
    other.send_probe(addr(AGENT), p.now);
    let Some(DirectTransmit::Direct { datagram, .. }) = other.poll_transmit() else {
        panic!("no probe");
    };
    let f = Frame::decode(&datagram).unwrap();
    assert_eq!(
        p.agent.handle_probe(addr(CLIENT), &f, p.now),
        Err(Ignored::Forged)
    );
    let s = p.agent.stats();
    assert_eq!((s.forged, s.replayed), (2, 1));
    // An ack nobody asked for is a replay too.
    let ack = Frame::ProbeAck {
        from: p.agent.me,
        tx: 42,
        observed: addr(CLIENT),
        tag: [0; TAG_LEN],
    };
    assert_eq!(
        p.client.handle_ack(addr(AGENT), &ack, p.now),
        Err(Ignored::Forged)
    );
    assert_eq!(p.client.stats().forged, 1);
}

#[test]
fn a_repeated_call_gets_the_same_answer_and_an_old_one_none() {
    let mut p = Pair::new();
    p.client.relay_ready(p.now);
    p.client.handle_timeout(p.now);
    let Some(DirectTransmit::Punch { body, .. }) = p.client.poll_transmit() else {
        panic!("no call");
    };
    assert_eq!(
        p.agent.handle_punch(PunchKind::Call, None, &body, p.now),
        Ok(())
    );
    let answer = p.agent.poll_transmit();
    assert!(matches!(
        answer,
        Some(DirectTransmit::Punch {
            kind: PunchKind::Answer,
            ..
        })
    ));
    // The same Call again (the client's retry: our Answer may be lost): the same Answer.
    assert_eq!(
        p.agent.handle_punch(PunchKind::Call, None, &body, p.now),
        Ok(())
    );
    assert_eq!(p.agent.poll_transmit(), answer);
    assert_eq!(p.agent.stats().rounds, 1);
    // An older Call played again is not answered: the client's next round makes a new
    // one (its Calls of this round go unanswered here, so the round ends).
    let mut second = None;
    for _ in 0..200 {
        p.now += Duration::from_millis(500);
        p.client.handle_timeout(p.now);
        while let Some(t) = p.client.poll_transmit() {
            if let DirectTransmit::Punch { body: b, .. } = t {
                if b != body {
                    second = Some(b);
                }
            }
        }
        if second.is_some() {
            break;
        }
    }
    let second = second.expect("a second round's call");
    assert_eq!(
        p.agent.handle_punch(PunchKind::Call, None, &second, p.now),
        Ok(())
    );
    assert_eq!(
        p.agent.handle_punch(PunchKind::Call, None, &body, p.now),
        Err(Ignored::Replayed)
    );
    let mut forged = body.clone();
    forged[45] ^= 1;
    assert_eq!(
        p.agent.handle_punch(PunchKind::Call, None, &forged, p.now),
        Err(Ignored::Forged)
    );
}

#[test]
fn a_new_network_starts_a_round_at_once() {
    let mut p = Pair::new();
    p.client.relay_ready(p.now);
    p.run_for(Duration::from_millis(50));
    let rounds = p.client.stats().rounds;
    p.client.set_local(vec![addr("192.0.2.9:40000")], p.now);
    p.run_for(Duration::from_millis(10));
    assert_eq!(p.client.stats().rounds, rounds + 1);
}

#[test]
fn a_lost_go_to_an_agent_behind_a_filter_costs_a_second_not_a_round() {
    let mut p = Pair::new();
    p.agent_filters = true;
    p.lose_agent_go = 1;
    p.client.relay_ready(p.now);
    let start = p.now;
    p.run_for(Duration::from_millis(1500));
    assert_eq!(p.client.path(), Some(addr(AGENT)), "{:?}", p.client.stats());
    // One round: the Call went again while probing, not after a failed round.
    assert_eq!(p.client.stats().rounds, 1);
    assert!(p.now.duration_since(start) < BACKOFF_MIN);

    // Every Go of the round to the agent lost: the round fails, and the next one comes
    // after the backoff.
    let mut p = Pair::new();
    p.agent_filters = true;
    p.lose_agent_go = CALL_ATTEMPTS;
    p.client.relay_ready(p.now);
    p.run_for(PUNCH_WINDOW + Duration::from_millis(500));
    assert_eq!(p.client.path(), None);
    p.run_for(BACKOFF_MIN + Duration::from_secs(1));
    assert_eq!(p.client.path(), Some(addr(AGENT)));
    assert_eq!(p.client.stats().rounds, 2);
}

//! The direct-path logic through the NAT model, over many seeded topologies: a direct path
//! is found iff one exists ([`direct_exists`]); otherwise traffic stays on the relay;
//! never a black hole (data sent on a direct path that does not deliver) longer than the
//! fallback bound. A planted defect in the probe scheduler must make the checker fail.

use std::time::Duration;

use proptest::prelude::*;
use warren_net::direct::Fault;
use warren_simulation::nat::{direct_exists, run, Dependence, NatKind, Scenario};

/// 3 heartbeats of 500 ms unanswered, plus one heartbeat of phase and slack.
const FALLBACK_BOUND: Duration = Duration::from_millis(2500);
/// Once direct, the longest stay on the relay while a direct path exists: loss may take
/// three heartbeats in a row (then the path is given up), and a round may fail (a lost
/// Punch): the backoff of 5 s, then 10 s, with a punch window of 5 s each, and slack.
const RELAYED_BOUND: Duration = Duration::from_secs(30);

fn dependence() -> impl Strategy<Value = Dependence> {
    prop_oneof![
        Just(Dependence::Independent),
        Just(Dependence::Address),
        Just(Dependence::AddressAndPort),
    ]
}

fn nat() -> impl Strategy<Value = NatKind> {
    (
        dependence(),
        dependence(),
        prop_oneof![Just(5u64), Just(30), Just(120)],
        any::<bool>(),
    )
        .prop_map(|(mapping, filtering, t, hairpin)| NatKind {
            mapping,
            filtering,
            timeout: Duration::from_secs(t),
            hairpin,
        })
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        nat(),
        nat(),
        prop::bool::weighted(0.1),
        0u32..30,
        prop::option::weighted(0.3, (2u64..8, 1u64..6)),
    )
        .prop_map(|(client, agent, same_lan, loss, cut)| Scenario {
            client,
            agent,
            same_lan,
            loss_per_mille: loss,
            cut: cut.map(|(at, len)| (Duration::from_secs(at), Duration::from_secs(len))),
            length: Duration::from_secs(75),
            fault: Fault::None,
        })
}

/// The checker: `Err` says what is wrong.
fn check(s: &Scenario, seed: u64) -> Result<(), String> {
    let o = run(s, seed);
    let exists = direct_exists(s);
    if !exists && (o.direct_at_end || o.first_direct.is_some()) {
        return Err(format!("no direct path exists, yet one was used ({o:?})"));
    }
    if exists && s.cut.is_none() && o.longest_relayed > RELAYED_BOUND {
        return Err(format!(
            "a direct path exists, yet traffic went back to the relay for {:?} ({o:?})",
            o.longest_relayed
        ));
    }
    if exists && !o.direct_at_end && o.longest_relayed > RELAYED_BOUND {
        return Err(format!(
            "a direct path exists, yet traffic ended on the relay ({o:?})"
        ));
    }
    if exists && s.cut.is_none() && o.first_direct.is_none_or(|t| t > Duration::from_secs(10)) {
        return Err(format!("no direct path within 10 s ({o:?})"));
    }
    if o.longest_black_hole > FALLBACK_BOUND {
        return Err(format!(
            "data went undelivered on the direct path for {:?} ({o:?})",
            o.longest_black_hole
        ));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn a_direct_path_is_found_iff_one_exists_and_never_black_holes(s in scenario(), seed in any::<u64>()) {
        if let Err(e) = check(&s, seed) {
            return Err(TestCaseError::fail(format!("{e}\n{s:?}")));
        }
    }
}

fn easy() -> NatKind {
    NatKind {
        mapping: Dependence::Independent,
        filtering: Dependence::AddressAndPort,
        timeout: Duration::from_secs(30),
        hairpin: false,
    }
}

fn hard() -> NatKind {
    NatKind {
        mapping: Dependence::AddressAndPort,
        ..easy()
    }
}

fn base(client: NatKind, agent: NatKind) -> Scenario {
    Scenario {
        client,
        agent,
        same_lan: false,
        loss_per_mille: 0,
        cut: None,
        length: Duration::from_secs(20),
        fault: Fault::None,
    }
}

#[test]
fn the_lab_matrix_holds_in_the_model() {
    let open_filter = NatKind {
        filtering: Dependence::Independent,
        ..easy()
    };
    for (name, s, direct) in [
        ("easy x easy", base(easy(), easy()), true),
        ("hard x hard", base(hard(), hard()), false),
        ("easy x hard", base(easy(), hard()), false),
        ("hard x port-mapped", base(hard(), open_filter), true),
        (
            "same LAN, no hairpin",
            Scenario {
                same_lan: true,
                ..base(easy(), easy())
            },
            true,
        ),
    ] {
        assert_eq!(direct_exists(&s), direct, "{name}: the oracle");
        check(&s, 7).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn planted_bugs_make_the_checker_fail() {
    // The agent never probes back: its address-and-port filter never opens.
    let mut s = base(easy(), easy());
    s.fault = Fault::ControlledNeverProbes;
    assert!(check(&s, 1).is_err(), "a silent agent went unnoticed");
    // No heartbeat: a cut direct path is never noticed, data falls in the hole.
    let mut s = base(easy(), easy());
    s.cut = Some((Duration::from_secs(5), Duration::from_secs(10)));
    assert!(check(&s, 1).is_ok(), "the real scheduler, cut and restored");
    s.fault = Fault::NoHeartbeat;
    let e = check(&s, 1).expect_err("a black hole went unnoticed");
    assert!(e.contains("undelivered"), "{e}");
}

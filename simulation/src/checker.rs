//! A linearizability checker for the registry model (Wing & Gong's search with Lowe's
//! memoization, as in Knossos and Porcupine).
//!
//! Every operation touches one key, and linearizability is compositional, so each key's
//! history is checked on its own. The model of a key is its value (`None` when absent).
//!
//! Operations that never completed ([`Out::Unknown`]) may have taken effect at any point
//! after their invocation, or not at all: they get a return point after everything else and
//! accept any result, so the search can place them anywhere after their call (placing one
//! last means it had no visible effect). Failed reads are dropped: they had no effect.

use std::collections::{BTreeMap, HashSet};

use crate::history::{Op, Out, Record};

/// A history that is not linearizable: the key, and the operations on it.
#[derive(Debug)]
pub struct Violation {
    /// The key whose history cannot be linearized.
    pub key: String,
    /// Its operations, in invocation order.
    pub ops: Vec<Record>,
    /// The search was abandoned after this many states (the budget, [`MAX_STATES`] by
    /// default): too many overlapping operations without an answer. Neither proven nor
    /// refuted, reported as a failure so it is not mistaken for a pass.
    pub gave_up: Option<usize>,
}

/// Most search states remembered for one key before the checker gives up.
pub const MAX_STATES: usize = 4_000_000;

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(states) = self.gave_up {
            return writeln!(
                f,
                "the checker gave up on key {:?} after {states} search states ({} operations): \
                 too many overlapping operations without an answer; not proven linearizable",
                self.key,
                self.ops.len()
            );
        }
        writeln!(
            f,
            "the history of key {:?} is not linearizable; its shortest failing prefix has {} operations{}:",
            self.key,
            self.ops.len(),
            if self.ops.len() > 40 { " (the last 40 shown)" } else { "" }
        )?;
        for r in &self.ops[self.ops.len().saturating_sub(40)..] {
            writeln!(f, "    {r}")?;
        }
        Ok(())
    }
}

/// The model: applies `op` to `state`; returns the new state and the result it gives.
pub fn step(state: &Option<String>, op: &Op) -> (Option<String>, Out) {
    match op {
        Op::Create(_, v) => match state {
            None => (Some(v.clone()), Out::Ok),
            Some(_) => (state.clone(), Out::Exists),
        },
        Op::Update(_, v) => match state {
            Some(_) => (Some(v.clone()), Out::Ok),
            None => (None, Out::NotFound),
        },
        Op::Delete(_) => match state {
            Some(_) => (None, Out::Ok),
            None => (None, Out::NotFound),
        },
        Op::Read(_) => (state.clone(), Out::Value(state.clone())),
    }
}

/// Checks a whole history; the first key that fails, if any, cut down to the shortest
/// prefix of the history that already fails (operations still running at the cut count as
/// unanswered).
pub fn check(records: &[Record]) -> Result<(), Violation> {
    check_within(records, MAX_STATES)
}

/// [`check`] with a budget of search states per key.
pub fn check_within(records: &[Record], max_states: usize) -> Result<(), Violation> {
    let Err(v) = check_all(records, max_states) else {
        return Ok(());
    };
    if v.gave_up.is_some() {
        return Err(v);
    }
    let ops = v.ops;
    let times: Vec<u64> = {
        let mut t: Vec<u64> = ops
            .iter()
            .flat_map(|r| std::iter::once(r.invoked).chain(r.completed.as_ref().map(|(t, _)| *t)))
            .collect();
        t.sort_unstable();
        t
    };
    let cut = |at: u64| -> Vec<Record> {
        ops.iter()
            .filter(|r| r.invoked <= at)
            .map(|r| {
                let mut r = r.clone();
                if r.completed.as_ref().is_some_and(|(t, _)| *t > at) {
                    r.completed = None;
                }
                r
            })
            .collect()
    };
    // Failing is monotone in the prefix: binary search the shortest failing one.
    let (mut lo, mut hi) = (0usize, times.len() - 1);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if check_all(&cut(times[mid]), max_states).is_err() {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    Err(Violation {
        key: v.key,
        ops: cut(times[hi]),
        gave_up: None,
    })
}

fn check_all(records: &[Record], max_states: usize) -> Result<(), Violation> {
    let mut by_key: BTreeMap<&str, Vec<&Record>> = BTreeMap::new();
    for r in records {
        let dropped = r.op.is_read() && !matches!(r.completed, Some((_, Out::Value(_))));
        if !dropped {
            by_key.entry(r.op.key()).or_default().push(r);
        }
    }
    for (key, ops) in by_key {
        let verdict = check_key(&ops, max_states);
        if verdict != Verdict::Linearizable {
            return Err(Violation {
                key: key.to_owned(),
                ops: ops.into_iter().cloned().collect(),
                gave_up: (verdict == Verdict::GaveUp).then_some(max_states),
            });
        }
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Call,
    Return,
}

struct Event {
    kind: Kind,
    op: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Linearizable,
    NotLinearizable,
    GaveUp,
}

/// Wing–Gong search over one key's operations.
fn check_key(ops: &[&Record], max_states: usize) -> Verdict {
    let n = ops.len();
    // Events in time order: completed returns at their time, unknown ones after all.
    let mut timed: Vec<(u64, Kind, usize)> = Vec::with_capacity(2 * n);
    for (i, r) in ops.iter().enumerate() {
        timed.push((r.invoked, Kind::Call, i));
        let ret = match &r.completed {
            Some((t, out)) if *out != Out::Unknown => *t,
            _ => u64::MAX - (n - i) as u64,
        };
        timed.push((ret, Kind::Return, i));
    }
    timed.sort_by_key(|(t, _, _)| *t);
    let events: Vec<Event> = timed
        .iter()
        .map(|(_, kind, op)| Event {
            kind: *kind,
            op: *op,
        })
        .collect();
    let len = events.len();
    // Doubly linked list over events; index `len` is the head sentinel.
    let mut next: Vec<usize> = (1..=len).collect();
    next.push(0);
    let mut prev: Vec<usize> = (0..=len)
        .map(|i| match i {
            0 => len,
            i if i == len => 0,
            i => i - 1,
        })
        .collect();
    next[len] = if len > 0 { 0 } else { len };
    let end = len; // next == len also marks the end (sentinel reused as terminator)
    if len > 0 {
        next[len - 1] = end;
    }
    let mut ret_of = vec![0usize; n];
    for (idx, e) in events.iter().enumerate() {
        if e.kind == Kind::Return {
            ret_of[e.op] = idx;
        }
    }

    let words = n.div_ceil(64);
    let mut linearized = vec![0u64; words];
    let mut cache: HashSet<(Vec<u64>, Option<String>)> = HashSet::new();
    let mut stack: Vec<(usize, Option<String>)> = Vec::new();
    let mut state: Option<String> = None;

    let lift = |next: &mut Vec<usize>, prev: &mut Vec<usize>, i: usize| {
        let (p, nx) = (prev[i], next[i]);
        next[p] = nx;
        if nx != end {
            prev[nx] = p;
        }
    };
    let unlift = |next: &mut Vec<usize>, prev: &mut Vec<usize>, i: usize| {
        let (p, nx) = (prev[i], next[i]);
        next[p] = i;
        if nx != end {
            prev[nx] = i;
        }
    };

    let mut entry = next[len];
    loop {
        if entry == end {
            return Verdict::Linearizable;
        }
        if cache.len() > max_states {
            return Verdict::GaveUp;
        }
        let e = &events[entry];
        match e.kind {
            Kind::Call => {
                let r = ops[e.op];
                let (new_state, out) = step(&state, &r.op);
                let fits = match &r.completed {
                    Some((_, Out::Unknown)) | None => true,
                    Some((_, actual)) => *actual == out,
                };
                let mut advanced = false;
                if fits {
                    let mut lin = linearized.clone();
                    lin[e.op / 64] |= 1 << (e.op % 64);
                    if cache.insert((lin.clone(), new_state.clone())) {
                        stack.push((entry, state.clone()));
                        state = new_state;
                        linearized = lin;
                        let ret = ret_of[e.op];
                        lift(&mut next, &mut prev, entry);
                        lift(&mut next, &mut prev, ret);
                        entry = next[len];
                        advanced = true;
                    }
                }
                if !advanced {
                    entry = next[entry];
                }
            }
            Kind::Return => {
                let Some((call, old)) = stack.pop() else {
                    return Verdict::NotLinearizable;
                };
                let op = events[call].op;
                linearized[op / 64] &= !(1 << (op % 64));
                state = old;
                unlift(&mut next, &mut prev, ret_of[op]);
                unlift(&mut next, &mut prev, call);
                entry = next[call];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: usize, op: Op, invoked: u64, completed: Option<(u64, Out)>) -> Record {
        Record {
            id,
            node: 1,
            op,
            invoked,
            completed,
            request: None,
        }
    }

    fn create(k: &str, v: &str) -> Op {
        Op::Create(k.into(), v.into())
    }

    fn read(k: &str) -> Op {
        Op::Read(k.into())
    }

    fn val(v: Option<&str>) -> Out {
        Out::Value(v.map(str::to_owned))
    }

    /// `n` creates and deletes with no answer, all overlapping, then reads of nothing, then
    /// an impossible read of a value nobody wrote.
    fn overlapping_unknowns(n: usize) -> Vec<Record> {
        let mut h: Vec<Record> = (0..n)
            .map(|i| {
                let op = if i % 2 == 0 {
                    create("a", &i.to_string())
                } else {
                    Op::Delete("a".into())
                };
                rec(i, op, i as u64, None)
            })
            .collect();
        for i in n..2 * n {
            let t = 1000 + 2 * i as u64;
            h.push(rec(i, read("a"), t, Some((t + 1, val(None)))));
        }
        h.push(rec(
            2 * n,
            read("a"),
            5000,
            Some((5001, val(Some("nobody")))),
        ));
        h
    }

    #[test]
    fn a_search_over_budget_is_a_failure_not_a_pass() {
        let v = check_within(&overlapping_unknowns(20), 50).unwrap_err();
        assert_eq!(v.gave_up, Some(50));
        assert!(v.to_string().contains("gave up"), "{v}");
        // With room to search, the same kind of history is refuted outright.
        let v = check(&overlapping_unknowns(6)).unwrap_err();
        assert_eq!(v.gave_up, None);
    }

    #[test]
    fn sequential_histories_pass() {
        let h = vec![
            rec(0, create("a", "1"), 0, Some((1, Out::Ok))),
            rec(1, read("a"), 2, Some((3, val(Some("1"))))),
            rec(2, Op::Update("a".into(), "2".into()), 4, Some((5, Out::Ok))),
            rec(3, read("a"), 6, Some((7, val(Some("2"))))),
            rec(4, Op::Delete("a".into()), 8, Some((9, Out::Ok))),
            rec(5, read("a"), 10, Some((11, val(None)))),
        ];
        assert!(check(&h).is_ok());
    }

    #[test]
    fn a_stale_read_after_a_completed_write_fails() {
        let h = vec![
            rec(0, create("a", "1"), 0, Some((1, Out::Ok))),
            rec(1, read("a"), 2, Some((3, val(None)))),
        ];
        let v = check(&h).unwrap_err();
        assert_eq!(v.key, "a");
    }

    #[test]
    fn concurrent_operations_may_be_ordered_either_way() {
        // The read overlaps the create: seeing it or not are both fine.
        for seen in [None, Some("1")] {
            let h = vec![
                rec(0, create("a", "1"), 0, Some((3, Out::Ok))),
                rec(1, read("a"), 1, Some((2, val(seen)))),
            ];
            assert!(check(&h).is_ok(), "{seen:?}");
        }
    }

    #[test]
    fn unknown_outcomes_may_or_may_not_have_happened() {
        for seen in [None, Some("1")] {
            let h = vec![
                rec(0, create("a", "1"), 0, Some((1, Out::Unknown))),
                rec(1, read("a"), 5, Some((6, val(seen)))),
            ];
            assert!(check(&h).is_ok(), "{seen:?}");
        }
        // But not twice: once seen, it cannot be unseen by a later read.
        let h = vec![
            rec(0, create("a", "1"), 0, None),
            rec(1, read("a"), 5, Some((6, val(Some("1"))))),
            rec(2, read("a"), 7, Some((8, val(None)))),
        ];
        assert!(check(&h).is_err());
    }

    #[test]
    fn results_must_match_the_model() {
        let h = vec![
            rec(0, create("a", "1"), 0, Some((1, Out::Ok))),
            rec(1, create("a", "2"), 2, Some((3, Out::Ok))),
        ];
        assert!(check(&h).is_err(), "a second create cannot succeed");
    }

    #[test]
    fn keys_are_independent_and_failed_reads_are_dropped() {
        let h = vec![
            rec(0, create("a", "1"), 0, Some((1, Out::Ok))),
            rec(1, create("b", "1"), 2, Some((3, Out::Ok))),
            rec(2, read("a"), 4, Some((5, Out::Failed))),
            rec(3, read("b"), 6, Some((7, val(Some("1"))))),
        ];
        assert!(check(&h).is_ok());
    }
}

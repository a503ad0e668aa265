//! The record of every client operation: when it was invoked, when (and how) it completed.
//!
//! Events are ordered by a global counter. All simulated hosts run on one thread, one after
//! another, and only exchange messages between steps, so the counter's order is an order in
//! which the events really happened: it is the "real time" linearizability is judged by.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// An operation on one key of the registry (sites are the keys, their description the
/// value).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Op {
    /// Create the site with this description; fails if it exists.
    Create(String, String),
    /// Set the description of the site; fails if it does not exist.
    Update(String, String),
    /// Delete the site; fails if it does not exist.
    Delete(String),
    /// Read the site's description (a linearizable read).
    Read(String),
}

impl Op {
    /// The key the operation is on.
    pub fn key(&self) -> &str {
        match self {
            Op::Create(k, _) | Op::Update(k, _) | Op::Delete(k) | Op::Read(k) => k,
        }
    }

    /// Whether it only reads.
    pub fn is_read(&self) -> bool {
        matches!(self, Op::Read(_))
    }
}

/// What an operation returned.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Out {
    /// It happened.
    Ok,
    /// Create of an existing key.
    Exists,
    /// Update or delete of a missing key.
    NotFound,
    /// A read's answer.
    Value(Option<String>),
    /// No answer (timeout, crash of the node that served it): it may or may not have
    /// taken effect.
    Unknown,
    /// Refused before it could take effect (only reads: a failed read has no effect).
    Failed,
}

/// One operation in the history.
#[derive(Debug, Clone)]
pub struct Record {
    /// Its index in the history.
    pub id: usize,
    /// The node it was sent to.
    pub node: u64,
    /// What it was.
    pub op: Op,
    /// Counter value at invocation.
    pub invoked: u64,
    /// Counter value and result at completion; `None` if it never completed.
    pub completed: Option<(u64, Out)>,
    /// The request id of a write.
    pub request: Option<u128>,
}

impl fmt::Display for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.completed {
            Some((t, out)) => write!(
                f,
                "#{} n{} [{}..{}] {:?} -> {:?}",
                self.id, self.node, self.invoked, t, self.op, out
            ),
            None => write!(
                f,
                "#{} n{} [{}..] {:?} -> (no answer)",
                self.id, self.node, self.invoked, self.op
            ),
        }
    }
}

/// The history of a run.
#[derive(Default)]
pub struct History {
    clock: AtomicU64,
    records: Mutex<Vec<Record>>,
    /// Invocation time of the latest-invoked write that got a definite answer.
    last_answered_write: AtomicU64,
    /// Writes that got a definite answer.
    answered_writes: AtomicU64,
}

impl History {
    /// Records an invocation (of a write with request id `request`); returns its id for
    /// [`History::complete`].
    pub fn invoke(&self, node: u64, op: Op, request: Option<u128>) -> usize {
        let t = self.tick();
        let mut r = self.records.lock().expect("history lock");
        let id = r.len();
        r.push(Record {
            id,
            node,
            op,
            invoked: t,
            completed: None,
            request,
        });
        id
    }

    /// Takes a tick of the history's clock: a moment after every event recorded so far.
    pub fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst)
    }

    /// Records a completion.
    pub fn complete(&self, id: usize, out: Out) {
        let t = self.tick();
        let mut r = self.records.lock().expect("history lock");
        if !r[id].op.is_read() && matches!(out, Out::Ok | Out::Exists | Out::NotFound) {
            self.last_answered_write
                .fetch_max(r[id].invoked, Ordering::SeqCst);
            self.answered_writes.fetch_add(1, Ordering::SeqCst);
        }
        r[id].completed = Some((t, out));
    }

    /// The current time of the history's clock.
    pub fn now(&self) -> u64 {
        self.clock.load(Ordering::SeqCst)
    }

    /// Whether a write invoked after `t` got a definite answer.
    pub fn answered_write_since(&self, t: u64) -> bool {
        self.last_answered_write.load(Ordering::SeqCst) > t
    }

    /// How many writes have got a definite answer so far.
    pub fn answered_writes(&self) -> u64 {
        self.answered_writes.load(Ordering::SeqCst)
    }

    /// Every record so far.
    pub fn records(&self) -> Vec<Record> {
        self.records.lock().expect("history lock").clone()
    }
}

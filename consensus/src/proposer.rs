//! Batching of concurrent writes on the leader.
//!
//! openraft 0.9 flushes the leader's log once per client write, inside its core loop, so a
//! leader writing one request per log entry is capped at one write per fsync. The
//! proposer queues writes and submits everything queued as one [`Proposal`] (one log
//! entry) whenever a submission slot is free: under load, batches grow to whatever arrived
//! while the previous batch was being committed; alone, a write goes out at once.

use std::sync::Arc;

use openraft::error::{ClientWriteError, RaftError};
use openraft::ServerState;
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::transport::ForwardError;
use crate::types::{Proposal, Raft, Reply, Request};

/// Most requests in one log entry.
pub const MAX_BATCH: usize = 256;
/// Most proposals submitted to Raft and not yet answered.
pub const MAX_IN_FLIGHT: usize = 2;
/// Most writes waiting for a slot; callers wait (backpressure) beyond this.
const QUEUE: usize = 4096;

type Waiter = oneshot::Sender<Result<Reply, ForwardError>>;

/// Submits writes to the local Raft instance in batches.
#[derive(Clone)]
pub struct Proposer {
    tx: mpsc::Sender<(Request, Waiter)>,
}

impl Proposer {
    /// Starts the batching task for `raft`.
    pub fn start(raft: Raft) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(raft, rx));
        Self { tx }
    }

    /// Proposes one write and waits for its reply (after commit and apply), or for the
    /// reason it was not committed here (not the leader, shutting down).
    pub async fn propose(&self, req: Request) -> Result<Reply, ForwardError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send((req, tx))
            .await
            .map_err(|_| ForwardError::Failed("this node is shutting down".into()))?;
        rx.await
            .map_err(|_| ForwardError::Failed("this node is shutting down".into()))?
    }
}

async fn run(raft: Raft, mut rx: mpsc::Receiver<(Request, Waiter)>) {
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        // Waiting for a slot is when the next batch fills up.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            let (requests, waiters): (Vec<Request>, Vec<Waiter>) = batch.into_iter().unzip();
            let n = requests.len();
            let fail = |e: ForwardError, waiters: Vec<Waiter>| {
                for w in waiters {
                    let _ = w.send(Err(e.clone()));
                }
            };
            // openraft answers a proposal when its entry is applied here or truncated from
            // the log; a leader deposed and then brought up to date by a snapshot does
            // neither, and the proposal would wait forever, holding its slot (the
            // simulation found a leader whose writes all stalled that way). So a proposal
            // also ends when this node stops leading the term it was made in: the caller
            // retries with the same request id, which applies once whatever happened.
            // Server metrics change with the vote and state only, not with every apply.
            let mut metrics = raft.server_metrics();
            let vote = metrics.borrow().vote;
            let result = tokio::select! {
                r = raft.client_write(Proposal(requests)) => r,
                m = metrics.wait_for(|m| m.vote != vote || m.state != ServerState::Leader) => {
                    drop(slot);
                    let leader = m.ok().and_then(|m| m.current_leader);
                    return fail(ForwardError::NotLeader { leader }, waiters);
                }
            };
            drop(slot);
            match result {
                Ok(resp) if resp.data.len() == n => {
                    for (w, reply) in waiters.into_iter().zip(resp.data) {
                        let _ = w.send(Ok(reply));
                    }
                }
                Ok(resp) => {
                    tracing::error!(
                        sent = n,
                        got = resp.data.len(),
                        "a proposal got the wrong number of replies"
                    );
                    fail(
                        ForwardError::Failed("internal error: reply count mismatch".into()),
                        waiters,
                    );
                }
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                    fail(
                        ForwardError::NotLeader {
                            leader: f.leader_id,
                        },
                        waiters,
                    );
                }
                Err(e) => fail(ForwardError::Failed(e.to_string()), waiters),
            }
        });
    }
}

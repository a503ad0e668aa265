//! What every actor shell of the node does, written once: keep one timer for its core's
//! next deadline, and turn a `watch` into messages.
//!
//! An actor owns a sans-IO core; after each message it drains the core's actions and
//! re-arms [`Timer`] from the core's `poll_timeout()`. Changes it must hear about (a new
//! registry, the serving state) arrive through [`follow`] as casts, so the actor never
//! awaits inside `handle`.

use std::time::Duration;

use futures::future::BoxFuture;
use ractor::{ActorRef, Message, MessagingErr};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// One pending `send_after`, for the core's next deadline `D` (an `Instant`, or unix
/// seconds for cores that count in them).
pub struct Timer<M: Message, D> {
    armed: Option<(D, Pending<M>)>,
}

/// A `send_after` in flight.
type Pending<M> = JoinHandle<Result<(), MessagingErr<M>>>;

impl<M: Message, D: PartialEq + Copy> Timer<M, D> {
    /// No deadline.
    pub fn new() -> Self {
        Self { armed: None }
    }

    /// Sends `msg()` to `myself` at deadline `at`, `delay` from now; `None`: no deadline.
    /// A timer already armed for the same deadline is kept, any other one replaced.
    pub fn set(&mut self, myself: &ActorRef<M>, at: Option<(D, Duration)>, msg: fn() -> M) {
        if self.armed.as_ref().map(|(d, _)| *d) == at.map(|(d, _)| d) {
            return;
        }
        self.cancel();
        if let Some((deadline, delay)) = at {
            self.armed = Some((deadline, myself.send_after(delay, msg)));
        }
    }

    /// The message arrived: nothing is armed any more.
    pub fn fired(&mut self) {
        self.armed = None;
    }

    /// Disarms it (the actor stops).
    pub fn cancel(&mut self) {
        if let Some((_, t)) = self.armed.take() {
            t.abort();
        }
    }
}

impl<M: Message, D: PartialEq + Copy> Default for Timer<M, D> {
    fn default() -> Self {
        Self::new()
    }
}

impl<M: Message, D> Drop for Timer<M, D> {
    fn drop(&mut self) {
        if let Some((_, t)) = self.armed.take() {
            t.abort();
        }
    }
}

/// Something an actor follows: a `watch` of any value.
pub trait Changes: Send + 'static {
    /// Resolves at the next change; `Err` once the sender is gone.
    fn next(&mut self) -> BoxFuture<'_, Result<(), watch::error::RecvError>>;
    /// Counts the current value as seen.
    fn seen(&mut self);
}

impl<T: Send + Sync + 'static> Changes for watch::Receiver<T> {
    fn next(&mut self) -> BoxFuture<'_, Result<(), watch::error::RecvError>> {
        Box::pin(self.changed())
    }

    fn seen(&mut self) {
        self.borrow_and_update();
    }
}

/// Casts `msg()` to `actor` now and after every change of any of `follows`, until the
/// actor or a sender is gone. Several changes in a row may arrive as fewer casts: the
/// actor reads the current value, not the one that woke it.
pub fn follow<M: Message>(
    mut follows: Vec<Box<dyn Changes>>,
    actor: ActorRef<M>,
    msg: fn() -> M,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        for f in &mut follows {
            f.seen();
        }
        if actor.cast(msg()).is_err() {
            return;
        }
        loop {
            let (changed, _, _) =
                futures::future::select_all(follows.iter_mut().map(|f| f.next())).await;
            if changed.is_err() || actor.cast(msg()).is_err() {
                return;
            }
        }
    })
}

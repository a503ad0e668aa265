//! Single writer, many readers: what an actor publishes for request and stream tasks.
//!
//! An actor owns its state and, after each change, publishes an immutable snapshot with
//! [`Published::publish`]. Readers on the data path take it with [`Published::load`] (one
//! atomic load, no lock, no mailbox); readers that must act on a change (an open L4 flow,
//! an upgraded connection) wait on [`Published::subscribe`].
//!
//! ```text
//!   actor (one writer) ──publish(Arc<T>)──► ArcSwap<T> ◄──load()── request / stream tasks
//!                                └──────► watch<()> ──changed()──► flows that re-check
//! ```
//!
//! A `Published` lives outside the supervision tree (it is created before it), so a
//! restarted actor publishes into the same place and readers never see it go away.

use std::sync::Arc;

use arc_swap::{ArcSwap, Guard};
use tokio::sync::watch;

/// A snapshot one actor writes and everyone reads.
pub struct Published<T> {
    value: ArcSwap<T>,
    changed: watch::Sender<u64>,
}

impl<T> Published<T> {
    /// A first value, before the owning actor runs.
    pub fn new(value: T) -> Arc<Self> {
        Arc::new(Self {
            value: ArcSwap::from_pointee(value),
            changed: watch::Sender::new(0),
        })
    }

    /// The current snapshot, for the duration of one request (one atomic load).
    pub fn load(&self) -> Guard<Arc<T>> {
        self.value.load()
    }

    /// The current snapshot, to keep.
    pub fn load_full(&self) -> Arc<T> {
        self.value.load_full()
    }

    /// Replaces the snapshot and wakes every subscriber. Only the owning actor calls it.
    pub fn publish(&self, value: Arc<T>) {
        self.value.store(value);
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Replaces the snapshot without waking subscribers (a refresh that changes nothing
    /// they act on, such as a timestamp).
    pub fn refresh(&self, value: Arc<T>) {
        self.value.store(value);
    }

    /// A receiver that is woken after every [`Published::publish`].
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for Published<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Published")
            .field(&**self.value.load())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn readers_see_each_publish_and_subscribers_wake() {
        let p = Published::new(1u32);
        let mut rx = p.subscribe();
        assert_eq!(**p.load(), 1);
        p.publish(Arc::new(2));
        rx.changed().await.unwrap();
        assert_eq!(**p.load(), 2);
        p.refresh(Arc::new(3));
        assert_eq!(*p.load_full(), 3);
        assert!(!rx.has_changed().unwrap(), "a refresh wakes nobody");
    }
}

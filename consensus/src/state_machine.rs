//! The registry state machine on sled, implementing openraft's v2 [`RaftStateMachine`].
//!
//! The registry lives in memory (persistent maps, cheap to clone) and in sled tree `sm`,
//! one value per entity. Each `apply` call writes every key its entries touched, plus the
//! metadata (last applied log id, membership), in one sled batch: on disk the state machine
//! is always at some entry boundary. It is not flushed on its own; the next log flush or
//! snapshot carries it, and after a crash openraft re-applies the committed entries after
//! whatever `last_applied` was found.
//!
//! After every batch the new registry is published on a `watch` channel: that is how the
//! rest of the node reads applied state without asking Raft.
//!
//! Snapshots are the bincode-encoded registry. The latest one is kept in tree `snapshot`
//! (flushed before openraft is told about it, so log compaction never outruns it).

use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{OptionalSend, RaftSnapshotBuilder, SnapshotMeta, StorageIOError};
use tokio::sync::watch;
use warren_proto::registry::NodeId;

use crate::registry::{decode, encode, Registry, Touched};
use crate::types::{ClusterNode, Entry, LogId, Reply, StorageError, StoredMembership, TypeConfig};

const CURRENT: &[u8] = b"current";

/// The state machine openraft drives.
pub struct StateMachine {
    db: sled::Db,
    sm: sled::Tree,
    snapshots: sled::Tree,
    registry: Registry,
    publish: watch::Sender<Arc<Registry>>,
}

/// Builds a snapshot from a copy of the registry taken when openraft asked for the builder.
pub struct SnapshotBuilder {
    db: sled::Db,
    snapshots: sled::Tree,
    registry: Registry,
}

impl StateMachine {
    /// Opens (or creates) the state machine in `db` and loads the registry stored there.
    /// Returns it with a receiver of the applied registry.
    pub fn open(db: &sled::Db) -> Result<(Self, watch::Receiver<Arc<Registry>>), anyhow::Error> {
        let sm = db.open_tree("sm")?;
        let snapshots = db.open_tree("snapshot")?;
        let pairs = sm.iter().collect::<Result<Vec<_>, _>>()?;
        let registry = Registry::from_pairs(pairs)?;
        let (publish, rx) = watch::channel(Arc::new(registry.clone()));
        Ok((
            Self {
                db: db.clone(),
                sm,
                snapshots,
                registry,
                publish,
            },
            rx,
        ))
    }

    /// A receiver of the applied registry.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Registry>> {
        self.publish.subscribe()
    }

    fn persist(&self, touched: &Touched) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        for key in touched {
            let value = self
                .registry
                .value_of(key)
                .map_err(|e| StorageIOError::write_state_machine(&e))?;
            match value {
                Some(v) => batch.insert(key.encode(), v),
                None => batch.remove(key.encode()),
            }
        }
        let meta = self
            .registry
            .meta_value()
            .map_err(|e| StorageIOError::write_state_machine(&e))?;
        batch.insert(Registry::meta_key(), meta);
        self.sm
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_state_machine(&e))?;
        Ok(())
    }
}

type Meta = SnapshotMeta<NodeId, ClusterNode>;

fn snapshot_id(last: Option<LogId>) -> String {
    match last {
        Some(l) => format!(
            "{}-{}-{:08x}",
            l.leader_id.term,
            l.index,
            rand::random::<u32>()
        ),
        None => format!("0-0-{:08x}", rand::random::<u32>()),
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let data = encode("snapshot", &self.registry)
            .map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        let meta = Meta {
            last_log_id: self.registry.last_applied(),
            last_membership: self.registry.membership().clone(),
            snapshot_id: snapshot_id(self.registry.last_applied()),
        };
        let stored = encode("snapshot", &(&meta, &data))
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        self.snapshots
            .insert(CURRENT, stored)
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        // Durable before openraft may purge the log it replaces.
        self.db
            .flush_async()
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        tracing::info!(snapshot = %meta.snapshot_id, bytes = data.len(), "built snapshot");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(data),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        Ok((
            self.registry.last_applied(),
            self.registry.membership().clone(),
        ))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Reply>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut touched = Touched::new();
        let replies: Vec<Reply> = entries
            .into_iter()
            .map(|e| self.registry.apply_entry(&e, &mut touched))
            .collect();
        self.persist(&touched)?;
        self.publish.send_replace(Arc::new(self.registry.clone()));
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            db: self.db.clone(),
            snapshots: self.snapshots.clone(),
            registry: self.registry.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Vec<u8>>, StorageError> {
        Ok(Box::default())
    }

    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<Vec<u8>>,
    ) -> Result<(), StorageError> {
        let sig = || Some(meta.signature());
        let mut registry: Registry =
            decode("snapshot", &snapshot).map_err(|e| StorageIOError::read_snapshot(sig(), &e))?;
        registry.rebuild_indexes();
        let pairs = registry
            .to_pairs()
            .map_err(|e| StorageIOError::write_snapshot(sig(), &e))?;
        // Replace the stored state in one batch: a crash leaves the old state or the new.
        let mut batch = sled::Batch::default();
        for k in self.sm.iter().keys() {
            batch.remove(k.map_err(|e| StorageIOError::write_snapshot(sig(), &e))?);
        }
        for (k, v) in pairs {
            batch.insert(k, v);
        }
        self.sm
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_snapshot(sig(), &e))?;
        let stored = encode("snapshot", &(meta, snapshot.as_ref()))
            .map_err(|e| StorageIOError::write_snapshot(sig(), &e))?;
        self.snapshots
            .insert(CURRENT, stored)
            .map_err(|e| StorageIOError::write_snapshot(sig(), &e))?;
        self.db
            .flush_async()
            .await
            .map_err(|e| StorageIOError::write_snapshot(sig(), &e))?;
        tracing::info!(snapshot = %meta.snapshot_id, "installed snapshot");
        self.registry = registry;
        self.publish.send_replace(Arc::new(self.registry.clone()));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let Some(stored) = self
            .snapshots
            .get(CURRENT)
            .map_err(|e| StorageIOError::read_snapshot(None, &e))?
        else {
            return Ok(None);
        };
        let (meta, data): (Meta, Vec<u8>) =
            decode("snapshot", &stored).map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(data),
        }))
    }
}

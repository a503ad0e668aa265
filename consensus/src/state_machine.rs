//! The registry state machine, implementing openraft's v2 [`RaftStateMachine`].
//!
//! The registry lives in memory (persistent maps, cheap to clone) and is persisted in sled
//! as Raft snapshots: tree `snapshot` holds the latest one, the bincode-encoded registry in
//! 1 MiB chunks plus its metadata, flushed before openraft is told about it (so log
//! compaction never outruns it). On start the state machine loads that snapshot; openraft then re-applies
//! the committed log entries after it (the cluster's snapshot policy bounds how many: see
//! `ClusterConfig::snapshot_writes`). Writing every applied entity to sled as well was
//! measured to cost about 40% of write throughput (see BENCHMARKS.md) for no gain in
//! durability: the log already holds every committed write.
//!
//! After every batch the new registry is published on a `watch` channel: that is how the
//! rest of the node reads applied state without asking Raft.

use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{OptionalSend, RaftSnapshotBuilder, SnapshotMeta, StorageIOError};
use tokio::sync::watch;
use warren_proto::registry::NodeId;

use crate::log_store::StorageIo;
use crate::registry::{decode, encode, CodecError, Registry};
use crate::types::{
    ClusterNode, Entry, LogId, Replies, StorageError, StoredMembership, TypeConfig,
};

const CURRENT: &[u8] = b"current";

type Meta = SnapshotMeta<NodeId, ClusterNode>;

/// The state machine openraft drives.
pub struct StateMachine {
    io: StorageIo,
    db: sled::Db,
    snapshots: sled::Tree,
    registry: Registry,
    publish: watch::Sender<Arc<Registry>>,
}

/// Builds a snapshot from a copy of the registry taken when openraft asked for the builder.
pub struct SnapshotBuilder {
    io: StorageIo,
    db: sled::Db,
    snapshots: sled::Tree,
    registry: Registry,
}

impl StateMachine {
    /// Opens (or creates) the state machine in `db`, loading the latest snapshot. Returns it
    /// with a receiver of the applied registry.
    pub fn open(
        db: &sled::Db,
        io: StorageIo,
    ) -> Result<(Self, watch::Receiver<Arc<Registry>>), anyhow::Error> {
        let snapshots = db.open_tree("snapshot")?;
        let registry = match load_snapshot(&snapshots)? {
            Some((meta, data)) => {
                let mut registry = decode_registry(&data)?;
                registry.rebuild_indexes();
                anyhow::ensure!(
                    registry.last_applied() == meta.last_log_id,
                    "the stored snapshot is inconsistent (covers {:?}, holds state at {:?})",
                    meta.last_log_id,
                    registry.last_applied()
                );
                registry
            }
            None => Registry::default(),
        };
        let (publish, rx) = watch::channel(Arc::new(registry.clone()));
        Ok((
            Self {
                io,
                db: db.clone(),
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
}

/// Runs blocking storage work: on tokio's blocking pool, or right here (see [`StorageIo`]).
async fn offload<T: Send + 'static>(
    io: StorageIo,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, tokio::task::JoinError> {
    match io {
        StorageIo::Inline => Ok(work()),
        StorageIo::Background => tokio::task::spawn_blocking(work).await,
    }
}

/// Makes the calling thread the least urgent on the machine (nice 19). On Linux the nice
/// value belongs to the thread, not the process.
#[allow(unsafe_code)]
fn lower_priority() {
    // SAFETY: nice(2) takes an integer and changes only the scheduling priority of the
    // calling thread; it touches no memory of ours.
    let _ = unsafe { libc::nice(19) };
}

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

/// Largest registry a snapshot may decode to, in bytes.
const MAX_REGISTRY_BYTES: usize = 4 << 30;

/// The snapshot form of the registry: bincode, then LZ4 (size-prefixed). Registries are
/// text-heavy and compress several-fold; less to write and to send to a lagging follower.
pub fn encode_registry(registry: &Registry) -> Result<Vec<u8>, CodecError> {
    let raw = encode("snapshot", registry)?;
    Ok(lz4_flex::compress_prepend_size(&raw))
}

/// Reads what [`encode_registry`] wrote.
pub fn decode_registry(data: &[u8]) -> Result<Registry, CodecError> {
    let size = data
        .get(..4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or(CodecError::Corrupt("snapshot shorter than its header"))?;
    if size > MAX_REGISTRY_BYTES {
        return Err(CodecError::Corrupt("snapshot larger than the limit"));
    }
    let raw = lz4_flex::decompress_size_prepended(data)
        .map_err(|_| CodecError::Corrupt("snapshot does not decompress"))?;
    decode("snapshot", &raw)
}

/// Bytes per stored snapshot chunk.
const CHUNK: usize = 1 << 20;

/// What `current` points at: the snapshot's metadata and how it is stored.
#[derive(serde::Serialize, serde::Deserialize)]
struct Stored {
    meta: Meta,
    chunks: u32,
    len: u64,
}

fn chunk_key(id: &str, i: u32) -> Vec<u8> {
    let mut k = format!("chunk/{id}/").into_bytes();
    k.extend_from_slice(&i.to_be_bytes());
    k
}

/// Stores `(meta, data)` as the current snapshot, on a blocking thread.
///
/// The data goes in chunks of 1 MiB, each flushed on its own with a short pause between:
/// writing a large snapshot in one go saturated the disk and stalled the Raft log's fsyncs
/// (same disk, other sled database) for tens of milliseconds. Once every chunk is durable,
/// `current` is switched to the new snapshot in one write and the old chunks are removed;
/// a crash at any point leaves the previous snapshot or the new one.
async fn store_snapshot(
    io: StorageIo,
    db: &sled::Db,
    snapshots: &sled::Tree,
    meta: &Meta,
    data: Vec<u8>,
) -> Result<Vec<u8>, StorageError> {
    let sig = Some(meta.signature());
    let (db, snapshots, meta) = (db.clone(), snapshots.clone(), meta.clone());
    offload(io, move || {
        let id = meta.snapshot_id.clone();
        let old = load_stored(&snapshots)?;
        let mut chunks = 0u32;
        for piece in data.chunks(CHUNK) {
            snapshots.insert(chunk_key(&id, chunks), piece)?;
            db.flush()?;
            chunks += 1;
            if io == StorageIo::Background {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
        let stored = Stored {
            meta,
            chunks,
            len: data.len() as u64,
        };
        let bytes =
            encode("snapshot", &stored).map_err(|e| sled::Error::Unsupported(e.to_string()))?;
        snapshots.insert(CURRENT, bytes)?;
        db.flush()?;
        if let Some(old) = old.filter(|o| o.meta.snapshot_id != stored.meta.snapshot_id) {
            for i in 0..old.chunks {
                snapshots.remove(chunk_key(&old.meta.snapshot_id, i))?;
            }
        }
        Ok::<_, sled::Error>(data)
    })
    .await
    .map_err(|e| StorageIOError::write_snapshot(sig.clone(), &e))?
    .map_err(|e| StorageIOError::write_snapshot(sig, &e).into())
}

fn load_stored(snapshots: &sled::Tree) -> Result<Option<Stored>, sled::Error> {
    let Some(bytes) = snapshots.get(CURRENT)? else {
        return Ok(None);
    };
    decode("snapshot", &bytes)
        .map(Some)
        .map_err(|e| sled::Error::Unsupported(e.to_string()))
}

/// The current snapshot: its metadata and data.
fn load_snapshot(snapshots: &sled::Tree) -> Result<Option<(Meta, Vec<u8>)>, sled::Error> {
    let Some(stored) = load_stored(snapshots)? else {
        return Ok(None);
    };
    let mut data = Vec::with_capacity(stored.len as usize);
    for i in 0..stored.chunks {
        let piece = snapshots
            .get(chunk_key(&stored.meta.snapshot_id, i))?
            .ok_or_else(|| sled::Error::Unsupported(format!("snapshot chunk {i} is missing")))?;
        data.extend_from_slice(&piece);
    }
    if data.len() as u64 != stored.len {
        return Err(sled::Error::Unsupported(
            "the stored snapshot has the wrong length".into(),
        ));
    }
    Ok(Some((stored.meta, data)))
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let registry = self.registry.clone();
        // Encoding a large registry takes a while: keep it off the async workers, on a
        // thread of its own that only gets the CPU nothing more urgent wants.
        let encoded = match self.io {
            StorageIo::Inline => encode_registry(&registry),
            StorageIo::Background => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                std::thread::Builder::new()
                    .name("raft-snapshot".into())
                    .spawn(move || {
                        lower_priority();
                        let _ = tx.send(encode_registry(&registry));
                    })
                    .map_err(|e| StorageIOError::write_snapshot(None, &e))?;
                rx.await
                    .map_err(|e| StorageIOError::write_snapshot(None, &e))?
            }
        };
        let data = encoded.map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        let meta = Meta {
            last_log_id: self.registry.last_applied(),
            last_membership: self.registry.membership().clone(),
            snapshot_id: snapshot_id(self.registry.last_applied()),
        };
        let data = store_snapshot(self.io, &self.db, &self.snapshots, &meta, data).await?;
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

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Replies>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let replies: Vec<Replies> = entries
            .into_iter()
            .map(|e| self.registry.apply_entry(&e))
            .collect();
        self.publish.send_replace(Arc::new(self.registry.clone()));
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            io: self.io,
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
        let sig = Some(meta.signature());
        let data = *snapshot;
        let (data, registry) = offload(self.io, move || {
            let registry = decode_registry(&data);
            (data, registry)
        })
        .await
        .map_err(|e| StorageIOError::read_snapshot(sig.clone(), &e))?;
        let mut registry = registry.map_err(|e| StorageIOError::read_snapshot(sig.clone(), &e))?;
        registry.rebuild_indexes();
        store_snapshot(self.io, &self.db, &self.snapshots, meta, data).await?;
        tracing::info!(snapshot = %meta.snapshot_id, "installed snapshot");
        self.registry = registry;
        self.publish.send_replace(Arc::new(self.registry.clone()));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let snapshots = self.snapshots.clone();
        let loaded = offload(self.io, move || load_snapshot(&snapshots))
            .await
            .map_err(|e| StorageIOError::read_snapshot(None, &e))?
            .map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        Ok(loaded.map(|(meta, data)| Snapshot {
            meta,
            snapshot: Box::new(data),
        }))
    }
}

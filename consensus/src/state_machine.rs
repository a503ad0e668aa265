//! The registry state machine, implementing openraft's v2 [`RaftStateMachine`].
//!
//! The registry lives in memory (persistent maps, cheap to clone) and is persisted in sled
//! as Raft snapshots: tree `snapshot` holds the latest one, the registry (a format header,
//! then bincode compressed with LZ4: [`encode_registry`]) in 1 MiB chunks plus its metadata
//! and a CRC-32 of the data, synced (see [`Store::sync`]) before openraft is told about it
//! (so log compaction never outruns it). On start the state machine loads that snapshot (a
//! damaged one is named and dropped; one of a newer format stops the start, see
//! [`StateMachine::open`]); openraft then re-applies the committed log entries after it (the cluster's snapshot policy bounds how many: see
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

use crate::format::{self, Format, ReadError};
use crate::log_store::StorageIo;
use crate::registry::{CodecError, Registry};
use crate::storage::Store;
use crate::types::{
    ClusterNode, Entry, LogId, Replies, StorageError, StoredMembership, TypeConfig,
};

const CURRENT: &[u8] = b"current";

type Meta = SnapshotMeta<NodeId, ClusterNode>;

/// The state machine openraft drives.
pub struct StateMachine {
    io: StorageIo,
    store: Store,
    snapshots: sled::Tree,
    registry: Registry,
    publish: watch::Sender<Arc<Registry>>,
    damaged: Option<String>,
}

/// Builds a snapshot from a copy of the registry taken when openraft asked for the builder.
pub struct SnapshotBuilder {
    io: StorageIo,
    store: Store,
    snapshots: sled::Tree,
    registry: Registry,
}

impl StateMachine {
    /// Opens (or creates) the state machine in `store`, loading the latest snapshot. Returns
    /// it with a receiver of the applied registry.
    ///
    /// A damaged snapshot is reported (named) and deleted, and the state machine starts
    /// empty: [`StateMachine::damaged_snapshot`] says so, and the caller must not replay a
    /// log that was compacted into that snapshot. A whole snapshot of a format newer than
    /// this build is kept and the open fails, naming both versions.
    pub fn open(
        store: &Store,
        io: StorageIo,
    ) -> Result<(Self, watch::Receiver<Arc<Registry>>), anyhow::Error> {
        let snapshots = store.db().open_tree("snapshot")?;
        let mut damaged = None;
        let registry = match load_snapshot(&snapshots).and_then(|loaded| {
            let Some((meta, data)) = loaded else {
                return Ok(Registry::default());
            };
            let mut registry = decode_registry(&data).map_err(|e| {
                if e.is_version() {
                    SnapshotUnreadable::Version(
                        e.about(format!("the stored Raft snapshot {}", meta.snapshot_id)),
                    )
                } else {
                    SnapshotDamaged {
                        id: meta.snapshot_id.clone(),
                        why: e.to_string(),
                    }
                    .into()
                }
            })?;
            registry.rebuild_indexes();
            if registry.last_applied() != meta.last_log_id {
                return Err(SnapshotDamaged {
                    id: meta.snapshot_id.clone(),
                    why: format!(
                        "it covers {:?} but holds the state at {:?}",
                        meta.last_log_id,
                        registry.last_applied()
                    ),
                }
                .into());
            }
            Ok(registry)
        }) {
            Ok(r) => r,
            // Whole, but written by a newer build: keep it, and do not start without it.
            Err(SnapshotUnreadable::Version(e)) => anyhow::bail!("{e}"),
            Err(SnapshotUnreadable::Damaged(e)) => {
                tracing::error!("{e}; it is deleted and this node catches up from a leader");
                snapshots.clear()?;
                store.sync()?;
                damaged = Some(e.to_string());
                Registry::default()
            }
        };
        let (publish, rx) = watch::channel(Arc::new(registry.clone()));
        Ok((
            Self {
                io,
                store: store.clone(),
                snapshots,
                registry,
                publish,
                damaged,
            },
            rx,
        ))
    }

    /// Why the stored snapshot was unusable, if it was (see [`StateMachine::open`]).
    pub fn damaged_snapshot(&self) -> Option<&str> {
        self.damaged.as_deref()
    }

    /// The last log id the loaded state covers.
    pub fn last_applied(&self) -> Option<LogId> {
        self.registry.last_applied()
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

/// What snapshot data begins with: four zero bytes (an unversioned snapshot began with its
/// uncompressed size, never 0) and a mark, then the format (u16 LE).
const SNAPSHOT_MAGIC: [u8; 6] = [0, 0, 0, 0, b'W', b'S'];

/// The snapshot form of the registry: a format header (see [`crate::format`]), then
/// bincode compressed with LZ4 (size-prepended). Registries are text-heavy and compress
/// several-fold; less to write and to send to a lagging follower. The format is the oldest
/// that can carry this registry ([`Registry::snapshot_format`]).
pub fn encode_registry(registry: &Registry) -> Result<Vec<u8>, CodecError> {
    let (format, raw) = registry.encode_snapshot()?;
    let mut out = Vec::with_capacity(raw.len() / 2 + 16);
    out.extend_from_slice(&SNAPSHOT_MAGIC);
    out.extend_from_slice(&format.0.to_le_bytes());
    out.extend_from_slice(&lz4_flex::compress_prepend_size(&raw));
    Ok(out)
}

/// The format of snapshot data, checked to be one this build reads.
pub fn snapshot_format(data: &[u8]) -> Result<Format, ReadError> {
    let what = "the snapshot";
    let Some(rest) = data.strip_prefix(&SNAPSHOT_MAGIC) else {
        // Unversioned data began with its uncompressed size (never 0).
        return match data.get(..4) {
            Some(size) if size != [0; 4] => Err(ReadError::Unversioned { what: what.into() }),
            _ => Err(CodecError::Corrupt("snapshot without its header").into()),
        };
    };
    let format = rest
        .get(..2)
        .map(|b| Format(u16::from_le_bytes([b[0], b[1]])))
        .ok_or(CodecError::Corrupt("snapshot shorter than its header"))?;
    format::check(what, format)?;
    Ok(format)
}

/// Reads what [`encode_registry`] wrote, in any format this build reads.
pub fn decode_registry(data: &[u8]) -> Result<Registry, ReadError> {
    let format = snapshot_format(data)?;
    let body = &data[SNAPSHOT_MAGIC.len() + 2..];
    let size = body
        .get(..4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or(CodecError::Corrupt("snapshot shorter than its header"))?;
    if size > MAX_REGISTRY_BYTES {
        return Err(CodecError::Corrupt("snapshot larger than the limit").into());
    }
    let raw = lz4_flex::decompress_size_prepended(body)
        .map_err(|_| CodecError::Corrupt("snapshot does not decompress"))?;
    Registry::decode_snapshot(format, &raw)
}

/// Bytes per stored snapshot chunk.
const CHUNK: usize = 1 << 20;

/// What `current` points at: the snapshot's metadata and how it is stored.
#[derive(serde::Serialize, serde::Deserialize)]
struct Stored {
    meta: Meta,
    chunks: u32,
    len: u64,
    /// CRC-32 of the whole data.
    crc: u32,
}

/// Why the stored snapshot cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotUnreadable {
    /// It is damaged: it is dropped and the node catches up from a leader.
    #[error(transparent)]
    Damaged(#[from] SnapshotDamaged),
    /// It is whole but of a format this build does not read: this node's binary is too old
    /// for its own data.
    #[error(transparent)]
    Version(ReadError),
}

/// The stored snapshot cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the stored Raft snapshot {id} is damaged: {why}")]
pub struct SnapshotDamaged {
    /// The snapshot's id (`-` if even its description is unreadable).
    pub id: String,
    /// What is wrong with it.
    pub why: String,
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
    store: &Store,
    snapshots: &sled::Tree,
    meta: &Meta,
    data: Vec<u8>,
) -> Result<Vec<u8>, StorageError> {
    let sig = Some(meta.signature());
    let (store, snapshots, meta) = (store.clone(), snapshots.clone(), meta.clone());
    offload(io, move || {
        let id = meta.snapshot_id.clone();
        // A damaged description of the old snapshot only means its chunks stay behind.
        let old = load_stored(&snapshots).ok().flatten();
        let mut chunks = 0u32;
        for piece in data.chunks(CHUNK) {
            snapshots.insert(chunk_key(&id, chunks), piece)?;
            store.sync()?;
            chunks += 1;
            if io == StorageIo::Background {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
        let stored = Stored {
            meta,
            chunks,
            len: data.len() as u64,
            crc: crc32fast::hash(&data),
        };
        let bytes = crate::storage::seal("snapshot", &stored).map_err(std::io::Error::other)?;
        snapshots.insert(CURRENT, bytes)?;
        store.sync()?;
        if let Some(old) = old.filter(|o| o.meta.snapshot_id != stored.meta.snapshot_id) {
            for i in 0..old.chunks {
                snapshots.remove(chunk_key(&old.meta.snapshot_id, i))?;
            }
        }
        Ok::<_, std::io::Error>(data)
    })
    .await
    .map_err(|e| StorageIOError::write_snapshot(sig.clone(), &e))?
    .map_err(|e| StorageIOError::write_snapshot(sig, &e).into())
}

fn load_stored(snapshots: &sled::Tree) -> Result<Option<Stored>, SnapshotUnreadable> {
    let bytes = snapshots.get(CURRENT).map_err(|e| SnapshotDamaged {
        id: "-".into(),
        why: format!("its description cannot be read: {e}"),
    })?;
    let Some(bytes) = bytes else {
        return Ok(None);
    };
    crate::storage::unseal("snapshot", &bytes)
        .map(Some)
        .map_err(|e| {
            if e.is_version() {
                SnapshotUnreadable::Version(
                    e.about("the stored Raft snapshot's description".into()),
                )
            } else {
                SnapshotDamaged {
                    id: "-".into(),
                    why: format!("its description is unreadable: {e}"),
                }
                .into()
            }
        })
}

/// The current snapshot: its metadata and data, checked against its checksum.
fn load_snapshot(snapshots: &sled::Tree) -> Result<Option<(Meta, Vec<u8>)>, SnapshotUnreadable> {
    let Some(stored) = load_stored(snapshots)? else {
        return Ok(None);
    };
    let id = stored.meta.snapshot_id.clone();
    let damaged = |why: String| SnapshotDamaged {
        id: id.clone(),
        why,
    };
    let mut data = Vec::with_capacity(stored.len as usize);
    for i in 0..stored.chunks {
        let piece = snapshots
            .get(chunk_key(&stored.meta.snapshot_id, i))
            .map_err(|e| damaged(format!("chunk {i} cannot be read: {e}")))?
            .ok_or_else(|| damaged(format!("chunk {i} is missing")))?;
        data.extend_from_slice(&piece);
    }
    if data.len() as u64 != stored.len {
        return Err(damaged(format!(
            "{} bytes stored, {} expected",
            data.len(),
            stored.len
        ))
        .into());
    }
    if crc32fast::hash(&data) != stored.crc {
        return Err(damaged("checksum mismatch".into()).into());
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
        let data = store_snapshot(self.io, &self.store, &self.snapshots, &meta, data).await?;
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
            store: self.store.clone(),
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
        store_snapshot(self.io, &self.store, &self.snapshots, meta, data).await?;
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

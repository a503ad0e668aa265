//! The Raft log on sled, implementing openraft's v2 [`RaftLogStorage`].
//!
//! Layout: tree `log` maps a big-endian index to a sealed (checksummed and versioned, see
//! [`crate::storage::seal_as`]) bincode entry, in the oldest [`crate::format::Format`] that
//! carries its commands; tree `raft_meta` holds the sealed vote, committed
//! log id and last purged log id. Next to sled's files, [`RECORD_FILE`](crate::storage::RECORD_FILE)
//! holds the [`DurableRecord`]: the last log id made durable and the last vote saved.
//!
//! Durability: `append` writes the entries into sled and hands the completion callback to a
//! flusher thread; the flusher takes every job waiting (appends, votes, truncations), runs
//! one [`Store::sync`] for the lot (sled's flush, then a real `fdatasync`: group commit),
//! writes and syncs the record, and only then reports the entries durable, in order. A vote
//! is saved the same way before `save_vote` returns, so it is on disk before it is granted.
//!
//! On open every entry's checksum is verified and the log checked for holes. A log that
//! comes back damaged is cut at the first bad entry; one that is then behind the record has
//! lost entries this node may have acknowledged, and [`LogStore::damage`] says so until the
//! node has caught up from a leader past that point (see `cluster`: a damaged node neither
//! stands for election nor votes for a candidate whose log is behind what it had). An entry
//! that is whole but of a format newer than this build is not damage: the open fails,
//! naming both versions, and the entry stays (see [`crate::format`]).

use std::fmt::{self, Debug};
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{LogState, OptionalSend, RaftLogReader, StorageIOError, Vote};
use warren_proto::registry::NodeId;

use crate::format::{self, ReadError};
use crate::storage::{open_sealed, seal, seal_as, unseal, DurableRecord, RecordFile, Store};
use crate::types::{Entry, LogId, StorageError, TypeConfig};

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const PURGED: &[u8] = b"purged";

/// Where storage work that blocks (fsync, deleting compacted entries, encoding snapshots)
/// runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StorageIo {
    /// On background threads, off the async workers: what a node does.
    #[default]
    Background,
    /// On the calling task. Slower, but it takes no time on a simulated clock, so a
    /// simulation replays with the same timing.
    Inline,
}

/// How the log store runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogOptions {
    /// Where blocking work runs.
    pub io: StorageIo,
    /// Test only (a planted bug for the simulation): report appended entries durable before
    /// they are synced; the sync (and the record) happens with the next batch.
    pub ack_before_sync: bool,
}

/// Entries this node had made durable (and may have acknowledged) that its log no longer
/// holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// The last log id the log holds now.
    pub recovered: Option<LogId>,
    /// The last log id it had made durable.
    pub acknowledged: LogId,
    /// What was found on open, if anything beyond the shortfall itself.
    pub found: String,
}

impl fmt::Display for Damage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let recovered = self
            .recovered
            .map_or_else(|| "nothing".to_owned(), |l| format!("index {}", l.index));
        write!(
            f,
            "storage damaged: the Raft log holds {recovered} but this node had made entries up to index {} (term {}) durable",
            self.acknowledged.index, self.acknowledged.leader_id.term
        )?;
        if !self.found.is_empty() {
            write!(f, " ({})", self.found)?;
        }
        f.write_str("; it does not vote or lead until it has caught up from a leader")
    }
}

type Done = tokio::sync::oneshot::Sender<io::Result<()>>;

enum Job {
    Appended {
        last: LogId,
        callback: LogFlushed<TypeConfig>,
    },
    Vote {
        vote: Vote<NodeId>,
        done: Done,
    },
    Truncate {
        since: LogId,
        done: Done,
    },
}

/// What the flusher and the store share.
struct Shared {
    store: Store,
    log: sled::Tree,
    meta: sled::Tree,
    record: Mutex<RecordFile>,
    /// Why the log was cut on open, for the damage report.
    found: Mutex<String>,
    ack_before_sync: bool,
    /// With `ack_before_sync`: appends reported durable but not yet synced.
    deferred: Mutex<Option<LogId>>,
}

/// The Raft log store. Cheap to clone: clones share the sled trees and the flusher.
#[derive(Clone)]
pub struct LogStore {
    shared: Arc<Shared>,
    /// The flusher thread; `None` syncs inline (see [`StorageIo::Inline`]).
    flusher: Option<std::sync::mpsc::Sender<Job>>,
    /// The compaction thread; `None` compacts inline.
    compactor: Option<std::sync::mpsc::Sender<u64>>,
}

/// Reads the log; handed to openraft's replication tasks.
#[derive(Clone)]
pub struct LogReader {
    log: sled::Tree,
}

/// Tells whether the log is behind what this node had made durable. Cheap to clone.
#[derive(Clone)]
pub struct DamageProbe {
    shared: Arc<Shared>,
}

impl DamageProbe {
    /// `Some` while the log holds less than this node had made durable.
    pub fn damage(&self) -> Option<Damage> {
        self.shared.damage()
    }

    /// The durable record as last written.
    pub fn record(&self) -> DurableRecord {
        self.shared.record.lock().expect("record").current().clone()
    }
}

impl LogStore {
    /// Opens (or creates) the log in `store`, verifying every entry (see the module docs);
    /// with [`StorageIo::Background`] it starts its flusher and compaction threads (which
    /// end when the last clone of the store is dropped).
    ///
    /// Fails, with what to do, when the durable record is missing or damaged while the log
    /// holds data: then nothing tells what this node had acknowledged.
    pub fn open(store: &Store, options: LogOptions) -> Result<Self, anyhow::Error> {
        let db = store.db();
        let log = db.open_tree("log")?;
        let meta = db.open_tree("raft_meta")?;
        let record = match RecordFile::read(store.dir()) {
            Ok(Some(_)) => RecordFile::open(store.dir(), DurableRecord::default())?,
            Ok(None) => {
                anyhow::ensure!(
                    log.is_empty() && meta.get(VOTE)?.is_none(),
                    "{} is missing although the Raft log in {} holds data, so this node cannot tell what it had acknowledged: move the data directory aside and join the node to the cluster again",
                    crate::storage::RECORD_FILE,
                    store.dir().display()
                );
                RecordFile::open(store.dir(), DurableRecord::default())?
            }
            Err(e) => anyhow::bail!(
                "{e}, so this node cannot tell what it had acknowledged: move the data directory aside and join the node to the cluster again"
            ),
        };
        let shared = Arc::new(Shared {
            store: store.clone(),
            log,
            meta,
            record: Mutex::new(record),
            found: Mutex::new(String::new()),
            ack_before_sync: options.ack_before_sync,
            deferred: Mutex::new(None),
        });
        shared.verify()?;
        let (flusher, compactor) = match options.io {
            StorageIo::Inline => (None, None),
            StorageIo::Background => {
                let (tx, rx) = std::sync::mpsc::channel();
                let flush = shared.clone();
                std::thread::Builder::new()
                    .name("raft-log-flush".into())
                    .spawn(move || flusher(&flush, &rx))?;
                let (compactor, purges) = std::sync::mpsc::channel();
                let compact_log = shared.log.clone();
                std::thread::Builder::new()
                    .name("raft-log-compact".into())
                    .spawn(move || compact(&compact_log, &purges))?;
                (Some(tx), Some(compactor))
            }
        };
        let store = Self {
            shared,
            flusher,
            compactor,
        };
        // Finish a deletion a crash interrupted.
        if let Ok(Some(purged)) = store.shared.read_meta::<LogId>(PURGED) {
            store.compact_upto(purged.index);
        }
        // The damage, if any, is reported by the caller once the log agrees with the
        // state machine (`cluster::reconcile` can change what is left).
        Ok(store)
    }

    /// `Some` while the log holds less than this node had made durable.
    pub fn damage(&self) -> Option<Damage> {
        self.shared.damage()
    }

    /// A probe for [`LogStore::damage`] that stays usable after the store is handed to Raft.
    pub fn probe(&self) -> DamageProbe {
        DamageProbe {
            shared: self.shared.clone(),
        }
    }

    /// The last purged log id and the last log id (as `get_log_state`), read synchronously.
    pub fn state(&self) -> Result<LogState<TypeConfig>, StorageError> {
        self.shared.log_state()
    }

    /// Empties the log (entries, purge point, committed id; the vote stays), because what it
    /// built on is gone (`why`: the snapshot was damaged or lost). The node then catches up
    /// from a leader.
    pub fn reset(&self, why: &str) -> Result<(), anyhow::Error> {
        let s = &self.shared;
        s.log.clear()?;
        s.meta.remove(PURGED)?;
        s.meta.remove(COMMITTED)?;
        s.store.sync()?;
        s.note(why);
        Ok(())
    }

    /// Makes `upto` the purge point (a snapshot covers the log up to there) and deletes the
    /// entries it covers.
    pub fn rebase(&self, upto: LogId) -> Result<(), anyhow::Error> {
        self.shared.write_meta(PURGED, &upto)?;
        compact_range(&self.shared.log, upto.index);
        self.shared.store.sync()?;
        Ok(())
    }

    fn compact_upto(&self, index: u64) {
        match &self.compactor {
            Some(c) => {
                let _ = c.send(index);
            }
            None => compact_range(&self.shared.log, index),
        }
    }

    /// Runs `job` on the flusher, or here.
    fn submit(&self, job: Job) {
        let job = match &self.flusher {
            Some(f) => match f.send(job) {
                Ok(()) => return,
                // The flusher stopped (shutting down): do it here rather than lose it.
                Err(std::sync::mpsc::SendError(job)) => job,
            },
            None => job,
        };
        self.shared.process(vec![job]);
    }

    async fn wait(&self, job: impl FnOnce(Done) -> Job) -> io::Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(job(tx));
        rx.await
            .unwrap_or_else(|_| Err(io::Error::other("the log flusher stopped")))
    }
}

impl Shared {
    fn read_meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &[u8],
    ) -> Result<Option<T>, StorageError> {
        let Some(v) = self.meta.get(key).map_err(|e| StorageIOError::read(&e))? else {
            return Ok(None);
        };
        unseal("raft metadata", &v)
            .map(Some)
            .map_err(|e| StorageIOError::read(&e).into())
    }

    fn write_meta<T: serde::Serialize>(&self, key: &[u8], v: &T) -> Result<(), StorageError> {
        let bytes = seal("raft metadata", v).map_err(|e| StorageIOError::write(&e))?;
        self.meta
            .insert(key, bytes)
            .map_err(|e| StorageIOError::write(&e))?;
        Ok(())
    }

    fn note(&self, why: &str) {
        let mut found = self.found.lock().expect("found");
        if !found.is_empty() {
            found.push_str("; ");
        }
        found.push_str(why);
    }

    fn log_state(&self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged: Option<LogId> = self.read_meta(PURGED)?;
        let last = match self.log.last().map_err(|e| StorageIOError::read_logs(&e))? {
            Some((k, v)) => Some(
                unseal_entry(key_index(&k), &v)
                    .map_err(|e| StorageIOError::read_logs(&e))?
                    .log_id,
            ),
            None => None,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last.max(last_purged),
        })
    }

    fn damage(&self) -> Option<Damage> {
        let acknowledged = self.record.lock().expect("record").current().last?;
        let recovered = match self.log_state() {
            Ok(s) => s.last_log_id,
            Err(_) => None,
        };
        (recovered < Some(acknowledged)).then(|| Damage {
            recovered,
            acknowledged,
            found: self.found.lock().expect("found").clone(),
        })
    }

    /// Checks every entry and the vote on open; cuts the log at the first damaged or missing
    /// entry and puts back a vote the record has and sled lost.
    fn verify(&self) -> Result<(), anyhow::Error> {
        let purged = match self.read_meta::<LogId>(PURGED) {
            Ok(p) => p,
            Err(e) => {
                self.note(&format!("the purge point is damaged ({e})"));
                self.log.clear()?;
                self.meta.remove(PURGED)?;
                None
            }
        };
        let mut expected = purged.map(|p| p.index + 1);
        let mut cut: Option<(u64, String)> = None;
        for kv in self.log.iter() {
            let (k, v) = kv?;
            let Ok(key) = <[u8; 8]>::try_from(k.as_ref()) else {
                cut = Some((expected.unwrap_or(0), "a log key is malformed".into()));
                break;
            };
            let index = u64::from_be_bytes(key);
            if purged.is_some_and(|p| index <= p.index) {
                continue; // left for compaction
            }
            match expected {
                Some(e) if e != index => {
                    cut = Some((e, format!("entry {e} is missing")));
                    break;
                }
                None if index > 1 => {
                    cut = Some((0, format!("entries before {index} are missing")));
                    break;
                }
                _ => {}
            }
            match unseal_entry(index, &v) {
                Ok(entry) if entry.log_id.index == index => expected = Some(index + 1),
                // Whole, but written by a newer build: cutting it would drop entries this
                // node acknowledged, and a newer leader would only send it again.
                Err(e) if e.is_version() => anyhow::bail!("{e}"),
                Ok(_) => {
                    cut = Some((
                        index,
                        format!("entry {index} is stored under another index"),
                    ));
                    break;
                }
                Err(e) => {
                    cut = Some((index, format!("entry {index} is damaged ({e})")));
                    break;
                }
            }
        }
        if let Some((from, why)) = cut {
            tracing::error!("the Raft log is damaged: {why}; entries from {from} on are dropped");
            let keys: Vec<_> = self
                .log
                .range(index_key(from)..)
                .keys()
                .collect::<Result<_, _>>()?;
            let mut batch = sled::Batch::default();
            for k in keys {
                batch.remove(k);
            }
            self.log.apply_batch(batch)?;
            self.note(&why);
        }
        // The vote: sled's, unless it is damaged or older than the record's.
        let recorded = self.record.lock().expect("record").current().vote;
        let stored = match self.read_meta::<Vote<NodeId>>(VOTE) {
            Ok(v) => v,
            Err(e) => {
                tracing::error!("the stored vote is damaged ({e}); using the durable record's");
                None
            }
        };
        if let Some(r) = recorded {
            // Keep sled's only if it is at least the record's (incomparable counts as older).
            let keep = stored.is_some_and(|s| {
                matches!(
                    s.partial_cmp(&r),
                    Some(std::cmp::Ordering::Greater | std::cmp::Ordering::Equal)
                )
            });
            if !keep {
                if stored.is_some() {
                    tracing::warn!(recorded = %r, "the stored vote is older than the durable record's; restoring it");
                }
                self.write_meta(VOTE, &r)?;
            }
        }
        // A committed id beyond the log would make openraft apply entries it cannot read.
        let last = self.log_state()?.last_log_id;
        match self.read_meta::<Option<LogId>>(COMMITTED) {
            Ok(Some(c)) if c > last => self.write_meta(COMMITTED, &last)?,
            Ok(_) => {}
            Err(_) => {
                self.meta.remove(COMMITTED)?;
            }
        }
        self.store.sync()?;
        Ok(())
    }

    /// Carries out jobs in order: everything written before a truncation is synced (once)
    /// and recorded before the truncation, and so on.
    fn process(&self, jobs: Vec<Job>) {
        let mut group = Vec::new();
        for job in jobs {
            match job {
                Job::Truncate { since, done } => {
                    self.commit(std::mem::take(&mut group));
                    let _ = done.send(self.truncate(since));
                }
                other => group.push(other),
            }
        }
        self.commit(group);
    }

    /// One sync and one record write for a group of appends and votes; then their
    /// callbacks.
    fn commit(&self, group: Vec<Job>) {
        let (group, also) = if self.ack_before_sync {
            // The planted bug: appends are reported durable now, and synced and recorded
            // only with the next group.
            let mut rest = Vec::new();
            let mut latest = None;
            for job in group {
                match job {
                    Job::Appended { last, callback } => {
                        latest = latest.max(Some(last));
                        callback.log_io_completed(Ok(()));
                    }
                    other => rest.push(other),
                }
            }
            let previous = std::mem::replace(&mut *self.deferred.lock().expect("deferred"), latest);
            (rest, previous)
        } else {
            (group, None)
        };
        if group.is_empty() && also.is_none() {
            return;
        }
        let result = self.sync_and_record(&group, also);
        self.complete(group, &result);
    }

    fn sync_and_record(&self, group: &[Job], also: Option<LogId>) -> io::Result<()> {
        self.store.sync()?;
        let mut record = self.record.lock().expect("record");
        let mut next = record.current().clone();
        next.last = next.last.max(also);
        for job in group {
            match job {
                Job::Appended { last, .. } => next.last = next.last.max(Some(*last)),
                Job::Vote { vote, .. } => next.vote = Some(*vote),
                _ => {}
            }
        }
        if next != *record.current() {
            record.write(next)?;
        }
        Ok(())
    }

    fn complete(&self, group: Vec<Job>, result: &io::Result<()>) {
        let r = || match result {
            Ok(()) => Ok(()),
            Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
        };
        for job in group {
            match job {
                Job::Appended { callback, .. } => callback.log_io_completed(r()),
                Job::Vote { done, .. } | Job::Truncate { done, .. } => {
                    let _ = done.send(r());
                }
            }
        }
    }

    /// Deletes the entries from `since` on; the record is lowered first, so that it never
    /// names an entry the log no longer holds.
    fn truncate(&self, since: LogId) -> io::Result<()> {
        let sled_err = |e: sled::Error| io::Error::other(e.to_string());
        {
            let mut record = self.record.lock().expect("record");
            if record
                .current()
                .last
                .is_some_and(|l| l.index >= since.index)
            {
                let before = match since.index.checked_sub(1) {
                    None => None,
                    Some(i) => match self.log.get(index_key(i)).map_err(sled_err)? {
                        Some(v) => Some(unseal_entry(i, &v).map_err(io::Error::other)?.log_id),
                        None => self
                            .read_meta::<LogId>(PURGED)
                            .map_err(|e| io::Error::other(e.to_string()))?,
                    },
                };
                let mut next = record.current().clone();
                next.last = before;
                record.write(next)?;
            }
        }
        let keys: Vec<_> = self
            .log
            .range(index_key(since.index)..)
            .keys()
            .collect::<Result<_, _>>()
            .map_err(sled_err)?;
        let mut batch = sled::Batch::default();
        for k in keys {
            batch.remove(k);
        }
        self.log.apply_batch(batch).map_err(sled_err)?;
        self.store.sync()
    }
}

/// Carries out jobs as they come, all those waiting at once.
fn flusher(shared: &Shared, rx: &std::sync::mpsc::Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while let Ok(more) = rx.try_recv() {
            jobs.push(more);
        }
        shared.process(jobs);
    }
}

/// Deletes log entries up to each purge point it is sent.
fn compact(log: &sled::Tree, rx: &std::sync::mpsc::Receiver<u64>) {
    while let Ok(mut upto) = rx.recv() {
        while let Ok(later) = rx.try_recv() {
            upto = upto.max(later);
        }
        compact_range(log, upto);
    }
}

/// Deletes log entries up to `upto`, a chunk at a time.
fn compact_range(log: &sled::Tree, upto: u64) {
    const CHUNK: usize = 256;
    loop {
        let keys: Vec<sled::IVec> = log
            .range(..=index_key(upto))
            .keys()
            .take(CHUNK)
            .filter_map(Result::ok)
            .collect();
        if keys.is_empty() {
            return;
        }
        let mut batch = sled::Batch::default();
        for k in &keys {
            batch.remove(k.clone());
        }
        if let Err(e) = log.apply_batch(batch) {
            tracing::warn!("deleting compacted log entries: {e}");
            return;
        }
        if keys.len() < CHUNK {
            return;
        }
    }
}

fn index_key(i: u64) -> [u8; 8] {
    i.to_be_bytes()
}

fn key_index(k: &[u8]) -> u64 {
    <[u8; 8]>::try_from(k).map_or(0, u64::from_be_bytes)
}

/// Reads a stored log entry, sealed in the format it needed (see [`crate::format`]).
pub fn unseal_entry(index: u64, v: &[u8]) -> Result<Entry, ReadError> {
    let about = |e: ReadError| e.about(format!("log entry {index}"));
    let (format, body) = open_sealed("log entry", v).map_err(about)?;
    format::decode_entry(format, body).map_err(about)
}

fn read_range(log: &sled::Tree, range: impl RangeBounds<u64>) -> Result<Vec<Entry>, StorageError> {
    let start = match range.start_bound() {
        Bound::Included(i) => Bound::Included(index_key(*i)),
        Bound::Excluded(i) => Bound::Excluded(index_key(*i)),
        Bound::Unbounded => Bound::Unbounded,
    };
    let end = match range.end_bound() {
        Bound::Included(i) => Bound::Included(index_key(*i)),
        Bound::Excluded(i) => Bound::Excluded(index_key(*i)),
        Bound::Unbounded => Bound::Unbounded,
    };
    log.range::<[u8; 8], _>((start, end))
        .map(|kv| {
            let (k, v) = kv.map_err(|e| StorageIOError::read_logs(&e))?;
            let index = key_index(&k);
            unseal_entry(index, &v).map_err(|e| {
                let e = if e.is_version() {
                    io::Error::other(e.to_string())
                } else {
                    io::Error::other(format!("log entry {index} is damaged: {e}"))
                };
                StorageIOError::read_logs(&e).into()
            })
        })
        .collect()
}

impl LogReader {
    /// The entries in `range`, read synchronously.
    pub fn entries(&self, range: std::ops::Range<u64>) -> Result<Vec<Entry>, StorageError> {
        read_range(&self.log, range)
    }
}

impl RaftLogReader<TypeConfig> for LogReader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        read_range(&self.log, range)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        read_range(&self.shared.log, range)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogReader;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        self.shared.log_state()
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        LogReader {
            log: self.shared.log.clone(),
        }
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        let bytes = seal("vote", vote).map_err(|e| StorageIOError::write_vote(&e))?;
        self.shared
            .meta
            .insert(VOTE, bytes)
            .map_err(|e| StorageIOError::write_vote(&e))?;
        let vote = *vote;
        self.wait(|done| Job::Vote { vote, done })
            .await
            .map_err(|e| StorageIOError::write_vote(&e))?;
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.shared.read_meta(VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.shared.write_meta(COMMITTED, &committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.shared.read_meta::<Option<LogId>>(COMMITTED)?.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = sled::Batch::default();
        let mut last = None;
        for entry in entries {
            let bytes = seal_as("log entry", format::entry_format(&entry), &entry)
                .map_err(|e| StorageIOError::write_log_entry(entry.log_id, &e))?;
            batch.insert(&index_key(entry.log_id.index), bytes);
            last = Some(entry.log_id);
        }
        self.shared
            .log
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        match last {
            Some(last) => self.submit(Job::Appended { last, callback }),
            None => callback.log_io_completed(Ok(())),
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.wait(|done| Job::Truncate {
            since: log_id,
            done,
        })
        .await
        .map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Record the purge point; the entries below it are deleted in the background.
        // openraft calls this from its core loop, and deleting thousands of entries there
        // stalled every write for tens of milliseconds. Entries below the purge point are
        // never read again, and a crash before they are gone only leaves garbage that the
        // next start deletes.
        self.shared.write_meta(PURGED, &log_id)?;
        self.compact_upto(log_id.index);
        Ok(())
    }
}

/// Emulates a power cut on the stopped node whose log is in `store` (simulation only): what
/// the last sync did not cover is lost. Entries after the durable record's last log id are
/// deleted and the vote is put back to the record's.
pub fn lose_unsynced_tail(store: &Store) -> Result<(), anyhow::Error> {
    let Some(record) = RecordFile::read(store.dir())? else {
        return Ok(());
    };
    let log = store.db().open_tree("log")?;
    let meta = store.db().open_tree("raft_meta")?;
    let from = record.last.map_or(0, |l| l.index + 1);
    for k in log.range(index_key(from)..).keys() {
        log.remove(k?)?;
    }
    match record.vote {
        Some(v) => meta.insert(VOTE, seal("vote", &v)?)?,
        None => meta.remove(VOTE)?,
    };
    store.sync()?;
    Ok(())
}

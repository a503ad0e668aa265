//! Storage that keeps its promises: a sled database whose `sync` really reaches the disk,
//! checksummed values, and the small record of what this node has made durable.
//!
//! sled 0.34's `flush` (without io_uring) writes its buffers with `pwrite` and
//! `sync_file_range`, which persists neither the file's metadata nor the disk's write
//! cache, and it never syncs the blob files it writes values larger than about 128 KiB
//! to. [`Store::sync`] does that flush and then `fdatasync`s the data file and every blob
//! file (and the blob directory) written since the last sync: only after it returns is a
//! write on stable storage.
//!
//! sled checks its own pages, and when it finds one damaged on start it quietly treats
//! everything after it as never written: a node would start with a shorter log and no
//! error. So the log store keeps a separate [`DurableRecord`] (the last log id it has made
//! durable and the last vote it gave), written in place and synced after every sync of the
//! log; a log that comes back behind it has lost entries this node acknowledged.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use openraft::Vote;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use warren_proto::registry::NodeId;

use crate::format::{self, Format, ReadError};
use crate::registry::{decode, encode, CodecError};
use crate::types::LogId;

/// Why a store did not open.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Another process holds the database.
    #[error("{0} is in use by another process: {1}")]
    InUse(PathBuf, String),
    /// Anything else sled or the file system said.
    #[error("opening storage in {0}: {1}")]
    Other(PathBuf, String),
}

/// A sled database with a real sync. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<StoreInner>,
}

struct StoreInner {
    db: sled::Db,
    dir: PathBuf,
    /// sled's data file, opened again so that it can be `fdatasync`ed (sync works on the
    /// file, whichever descriptor wrote it).
    data: File,
    /// Blob files already synced (sled names them by log sequence number).
    blobs_synced: Mutex<BTreeSet<u64>>,
    syncs: AtomicU64,
}

impl Store {
    /// Opens (or creates) the sled database in `dir`.
    pub fn open(dir: &Path) -> Result<Self, OpenError> {
        let other = |e: &dyn std::fmt::Display| OpenError::Other(dir.to_owned(), e.to_string());
        remove_unfinished_snapshots(dir).map_err(|e| other(&e))?;
        let db = sled::Config::new().path(dir).open().map_err(|e| match e {
            sled::Error::Io(io)
                if io.kind() == io::ErrorKind::WouldBlock || io.to_string().contains("lock") =>
            {
                OpenError::InUse(dir.to_owned(), io.to_string())
            }
            other_err => other(&other_err),
        })?;
        let data = File::open(dir.join("db")).map_err(|e| other(&e))?;
        // sled created the directory and its files: make those names durable too.
        sync_dir(dir).map_err(|e| other(&e))?;
        if let Some(parent) = dir.parent() {
            sync_dir(parent).map_err(|e| other(&e))?;
        }
        Ok(Self {
            inner: Arc::new(StoreInner {
                db,
                dir: dir.to_owned(),
                data,
                blobs_synced: Mutex::new(BTreeSet::new()),
                syncs: AtomicU64::new(0),
            }),
        })
    }

    /// The database.
    pub fn db(&self) -> &sled::Db {
        &self.inner.db
    }

    /// The directory it lives in.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Puts everything written so far on stable storage: sled's flush, then `fdatasync` of
    /// its data file and of the blob files written since the last sync.
    pub fn sync(&self) -> io::Result<()> {
        self.inner.db.flush().map_err(sled_io)?;
        self.inner.data.sync_data()?;
        self.sync_blobs()?;
        self.inner.syncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// How many syncs completed (for tests and metrics).
    pub fn syncs(&self) -> u64 {
        self.inner.syncs.load(Ordering::Relaxed)
    }

    fn sync_blobs(&self) -> io::Result<()> {
        let dir = self.inner.dir.join("blobs");
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut synced = self.inner.blobs_synced.lock().expect("blob set");
        let mut present = BTreeSet::new();
        let mut new = false;
        for entry in entries {
            let entry = entry?;
            let Some(lsn) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            present.insert(lsn);
            if !synced.contains(&lsn) {
                match File::open(entry.path()) {
                    Ok(f) => f.sync_data()?,
                    // sled removed it meanwhile (garbage collection).
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
                new = true;
            }
        }
        if new {
            sync_dir(&dir)?;
        }
        *synced = present;
        Ok(())
    }
}

/// sled writes its page-table snapshot to `snap.<lsn>.generating` and renames it when
/// done. One left behind by a failed write (a full disk) makes every later open fail with
/// "Read corrupted data"; it was never complete, so removing it loses nothing.
fn remove_unfinished_snapshots(dir: &Path) -> io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            tracing::warn!(file = %name, "removing an unfinished sled snapshot file");
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

fn sled_io(e: sled::Error) -> io::Error {
    match e {
        sled::Error::Io(io) => io,
        other => io::Error::other(other.to_string()),
    }
}

/// `fsync` of a directory: makes the names in it (files created, renamed) durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Marks a versioned sealed value: no value sealed before formats were versioned began
/// with it (its first byte was a bincode varint, which is never `0xFF`, or an `Option` tag).
const VERSIONED: u8 = 0xFF;

/// Encodes `v` in format 1 (see [`seal_as`]): Raft metadata and other values whose layout
/// has not changed since.
pub fn seal<T: Serialize>(what: &'static str, v: &T) -> Result<Vec<u8>, CodecError> {
    seal_as(what, Format::V1, v)
}

/// Encodes `v`, tagged as `format`, with a CRC-32 of the rest in front, so that damage is
/// found on read: `[crc32 LE][0xFF][format u16 LE][bincode]` (see [`crate::format`]).
pub fn seal_as<T: Serialize>(
    what: &'static str,
    format: Format,
    v: &T,
) -> Result<Vec<u8>, CodecError> {
    let body = encode(what, v)?;
    let mut out = Vec::with_capacity(body.len() + 7);
    out.extend_from_slice(&[0; 4]);
    out.push(VERSIONED);
    out.extend_from_slice(&format.0.to_le_bytes());
    out.extend_from_slice(&body);
    let crc = crc32fast::hash(&out[4..]);
    out[..4].copy_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Checks what [`seal_as`] wrote and gives back its format and encoding: a checksum
/// mismatch is [`CodecError::Corrupt`], a format this build does not read is a
/// [`ReadError`] naming it.
pub fn open_sealed<'a>(what: &str, b: &'a [u8]) -> Result<(Format, &'a [u8]), ReadError> {
    let (crc, rest) = b
        .split_first_chunk::<4>()
        .ok_or(CodecError::Corrupt("shorter than its checksum"))?;
    if u32::from_le_bytes(*crc) != crc32fast::hash(rest) {
        return Err(CodecError::Corrupt("checksum mismatch").into());
    }
    let Some((&VERSIONED, rest)) = rest.split_first() else {
        return Err(ReadError::Unversioned {
            what: what.to_owned(),
        });
    };
    let (format, body) = rest
        .split_first_chunk::<2>()
        .ok_or(CodecError::Corrupt("shorter than its format"))?;
    let format = Format(u16::from_le_bytes(*format));
    format::check(what, format)?;
    Ok((format, body))
}

/// Reads what [`seal`] or [`seal_as`] wrote, for values that have one layout in every
/// format this build reads.
pub fn unseal<T: DeserializeOwned>(what: &'static str, b: &[u8]) -> Result<T, ReadError> {
    let (_, body) = open_sealed(what, b)?;
    Ok(decode(what, body)?)
}

/// What the log store has made durable: written after every sync of the log, synced
/// itself, and kept apart from sled so that damage to sled's files cannot hide it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DurableRecord {
    /// The last log id that was durable (and may have been acknowledged).
    pub last: Option<LogId>,
    /// The last vote saved (and perhaps granted).
    pub vote: Option<Vote<NodeId>>,
}

/// The record's file name, inside the log's sled directory.
pub const RECORD_FILE: &str = "warren-durable";
const SLOT: u64 = 256;
const MAGIC: &[u8; 4] = b"WDR1";

/// The record file: two slots written alternately, each with a sequence number and a
/// checksum, so that a write torn by a crash leaves the other slot whole.
pub struct RecordFile {
    file: File,
    seq: u64,
    current: DurableRecord,
}

/// Why the record could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RecordDamaged(pub String);

impl RecordFile {
    /// Reads the record in `dir`: `Ok(None)` if there is none.
    pub fn read(dir: &Path) -> Result<Option<DurableRecord>, RecordDamaged> {
        let path = dir.join(RECORD_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(RecordDamaged(format!("{}: {e}", path.display()))),
        };
        best_slot(&bytes)
            .map(|(_, r)| Some(r))
            .ok_or_else(|| RecordDamaged(format!("{} is damaged (no valid copy)", path.display())))
    }

    /// Opens the record in `dir`, creating it (synced, with its name) as `initial` if there
    /// is none.
    pub fn open(dir: &Path, initial: DurableRecord) -> io::Result<Self> {
        let path = dir.join(RECORD_FILE);
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        if existed {
            let mut bytes = Vec::new();
            io::Read::read_to_end(&mut &file, &mut bytes)?;
            if let Some((seq, current)) = best_slot(&bytes) {
                return Ok(Self { file, seq, current });
            }
        }
        let mut this = Self {
            file,
            seq: 0,
            current: DurableRecord::default(),
        };
        this.file.set_len(2 * SLOT)?;
        this.write(initial)?;
        this.file.sync_all()?;
        sync_dir(dir)?;
        Ok(this)
    }

    /// The record as last written.
    pub fn current(&self) -> &DurableRecord {
        &self.current
    }

    /// Writes `record` into the older slot and syncs it.
    pub fn write(&mut self, record: DurableRecord) -> io::Result<()> {
        let seq = self.seq + 1;
        let body = encode("durable record", &(seq, &record)).map_err(io::Error::other)?;
        let mut slot = Vec::with_capacity(SLOT as usize);
        slot.extend_from_slice(MAGIC);
        let len = u16::try_from(body.len())
            .ok()
            .filter(|l| usize::from(*l) + 10 <= SLOT as usize)
            .ok_or_else(|| io::Error::other("durable record too large"))?;
        slot.extend_from_slice(&len.to_le_bytes());
        slot.extend_from_slice(&body);
        let crc = crc32fast::hash(&slot);
        slot.extend_from_slice(&crc.to_le_bytes());
        self.file.write_all_at(&slot, (seq % 2) * SLOT)?;
        self.file.sync_data()?;
        self.seq = seq;
        self.current = record;
        Ok(())
    }
}

fn best_slot(bytes: &[u8]) -> Option<(u64, DurableRecord)> {
    (0..2)
        .filter_map(|i| {
            let slot = bytes.get((i * SLOT) as usize..((i + 1) * SLOT) as usize)?;
            if &slot[..4] != MAGIC {
                return None;
            }
            let len = usize::from(u16::from_le_bytes([slot[4], slot[5]]));
            let end = 6 + len;
            let crc = slot.get(end..end + 4)?;
            if crc32fast::hash(&slot[..end]).to_le_bytes() != crc {
                return None;
            }
            decode::<(u64, DurableRecord)>("durable record", &slot[6..end]).ok()
        })
        .max_by_key(|(seq, _)| *seq)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_value_reads_back_and_any_flipped_bit_is_refused() {
        let sealed = seal("test", &("hello", 42u64)).expect("seal");
        let back: (String, u64) = unseal("test", &sealed).expect("unseal");
        assert_eq!(back, ("hello".to_owned(), 42));
        for i in 0..sealed.len() * 8 {
            let mut bad = sealed.clone();
            bad[i / 8] ^= 1 << (i % 8);
            assert!(
                unseal::<(String, u64)>("test", &bad).is_err(),
                "bit {i} flipped went unnoticed"
            );
        }
        assert!(unseal::<(String, u64)>("test", &sealed[..sealed.len() - 1]).is_err());
    }

    #[test]
    fn a_value_of_a_newer_format_or_from_before_formats_is_refused_by_name() {
        let newer = Format(Format::CURRENT.0 + 1);
        let sealed = seal_as("test", newer, &42u64).expect("seal");
        let e = unseal::<u64>("log entry 812", &sealed).expect_err("newer");
        assert!(e.is_version(), "{e}");
        assert_eq!(
            e.to_string(),
            format!(
                "log entry 812 is format {newer}, this build reads up to {}: upgrade this node",
                Format::CURRENT
            )
        );
        // As sealed before formats: a CRC-32 of the bincode in front, nothing else.
        let body = encode("test", &42u64).expect("encode");
        let mut legacy = crc32fast::hash(&body).to_le_bytes().to_vec();
        legacy.extend_from_slice(&body);
        let e = unseal::<u64>("test", &legacy).expect_err("unversioned");
        assert!(matches!(e, ReadError::Unversioned { .. }), "{e}");
        let e = unseal::<u64>("test", &seal_as("test", Format(0), &42u64).expect("seal"))
            .expect_err("older");
        assert!(matches!(e, ReadError::TooOld { .. }), "{e}");
    }

    #[test]
    fn the_record_survives_a_torn_slot_and_refuses_when_both_are_damaged() {
        let dir = tempfile::tempdir().expect("dir");
        assert_eq!(RecordFile::read(dir.path()), Ok(None));
        let mut f = RecordFile::open(dir.path(), DurableRecord::default()).expect("open");
        let first = DurableRecord {
            last: Some(LogId::new(
                openraft::CommittedLeaderId::new(1, NodeId(1)),
                5,
            )),
            vote: Some(Vote::new(1, NodeId(1))),
        };
        let second = DurableRecord {
            last: Some(LogId::new(
                openraft::CommittedLeaderId::new(2, NodeId(2)),
                9,
            )),
            vote: Some(Vote::new(2, NodeId(2))),
        };
        f.write(first.clone()).expect("write");
        f.write(second.clone()).expect("write");
        drop(f);
        assert_eq!(RecordFile::read(dir.path()), Ok(Some(second.clone())));
        // Tear the newest slot: the one before it is what was durable.
        let path = dir.path().join(RECORD_FILE);
        let mut bytes = std::fs::read(&path).expect("read");
        // Three writes so far (the initial one, then two): the third went to slot 1.
        let newest = SLOT as usize;
        bytes[newest + 8] ^= 0xff;
        std::fs::write(&path, &bytes).expect("write");
        assert_eq!(RecordFile::read(dir.path()), Ok(Some(first)));
        let other = 0;
        bytes[other + 8] ^= 0xff;
        std::fs::write(&path, &bytes).expect("write");
        assert!(RecordFile::read(dir.path()).is_err());
    }
}

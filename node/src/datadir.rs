//! A node's data directory.
//!
//! ```text
//! <data dir>/
//!   node.json      who this node is: cluster id, node id, name, addresses
//!   ca.pem         the cluster CA certificate
//!   ca.key         the cluster CA key (voters only)                      0600
//!   node.pem       this node's certificate
//!   node.key       this node's key                                       0600
//!   admin.key      the bootstrap admin API key (first node only)         0600
//!   raft/log/      sled: the Raft log, vote and commit index
//!   raft/state/    sled: the registry state machine (its latest snapshot)
//!   .incomplete    present while init or join has not finished
//! ```
//!
//! A directory is usable once `node.json` exists and `.incomplete` does not. `init` and
//! `join` create `.incomplete` first and remove it last, so a crash in between leaves a
//! directory that `run` refuses with an explanation and that `init`/`join` start over in.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use serde::{Deserialize, Serialize};
use warren_consensus::pki::{ClusterCa, NodeIdentity};
use warren_proto::registry::NodeId;
use warren_proto::Name;

/// The contents of `node.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeFile {
    /// Format version of this file.
    pub format: u32,
    /// The cluster id (hex).
    pub cluster_id: String,
    /// This node's Raft id.
    pub node_id: u64,
    /// This node's name.
    pub name: Name,
    /// Where other nodes reach it (QUIC, UDP).
    pub cluster_addr: String,
    /// Where the admin API listens (HTTPS).
    pub admin_addr: String,
    /// Region label.
    #[serde(default)]
    pub region: String,
}

impl NodeFile {
    /// The current format version.
    pub const FORMAT: u32 = 1;

    /// The cluster id as a number.
    pub fn cluster_id(&self) -> anyhow::Result<u128> {
        u128::from_str_radix(&self.cluster_id, 16)
            .context("node.json: cluster_id is not a hex number")
    }

    /// The node id.
    pub fn node_id(&self) -> NodeId {
        NodeId(self.node_id)
    }
}

/// Paths inside a data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

/// What is found at a data directory path.
#[derive(Debug)]
pub enum State {
    /// Nothing there, or an empty directory.
    Empty,
    /// An `init` or `join` that did not finish.
    Incomplete,
    /// A usable node.
    Ready(NodeFile),
    /// Something else: files that are not a Warren data directory.
    Foreign,
}

impl DataDir {
    /// The data directory at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// Its root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Path of a file in it.
    pub fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// The sled database of the Raft log.
    pub fn raft_log(&self) -> PathBuf {
        self.root.join("raft").join("log")
    }

    /// The sled database of the state machine (its snapshots).
    pub fn raft_state(&self) -> PathBuf {
        self.root.join("raft").join("state")
    }

    /// What is there now.
    pub fn state(&self) -> anyhow::Result<State> {
        if !self.root.exists() {
            return Ok(State::Empty);
        }
        if !self.root.is_dir() {
            bail!("{} exists and is not a directory", self.root.display());
        }
        if self.path(".incomplete").exists() {
            return Ok(State::Incomplete);
        }
        let node_json = self.path("node.json");
        if node_json.exists() {
            return Ok(State::Ready(self.node_file()?));
        }
        let empty = fs::read_dir(&self.root)
            .with_context(|| format!("reading {}", self.root.display()))?
            .next()
            .is_none();
        Ok(if empty { State::Empty } else { State::Foreign })
    }

    /// Reads `node.json`.
    pub fn node_file(&self) -> anyhow::Result<NodeFile> {
        let path = self.path("node.json");
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let file: NodeFile = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a valid node file", path.display()))?;
        if file.format != NodeFile::FORMAT {
            bail!(
                "{} has format {}, this warren-node reads format {}",
                path.display(),
                file.format,
                NodeFile::FORMAT
            );
        }
        Ok(file)
    }

    /// Checks that the directory is a finished node and returns its `node.json`; the error
    /// says what to do otherwise.
    pub fn require_ready(&self) -> anyhow::Result<NodeFile> {
        match self.state()? {
            State::Ready(f) => Ok(f),
            State::Empty => bail!(
                "{} holds no node: create one with `warren-node init` (new cluster) or `warren-node join` (existing cluster)",
                self.root.display()
            ),
            State::Incomplete => bail!(
                "{} holds a node whose init or join did not finish; run the same `warren-node init` or `warren-node join` again: it starts over in this directory",
                self.root.display()
            ),
            State::Foreign => bail!(
                "{} is not a Warren data directory (it has files but no node.json)",
                self.root.display()
            ),
        }
    }

    /// Prepares the directory for `init` or `join`: refuses one that holds a node or other
    /// files, wipes one left by an unfinished attempt, and marks it incomplete.
    pub fn begin_create(&self) -> anyhow::Result<()> {
        match self.state()? {
            State::Ready(f) => bail!(
                "{} already holds node {:?} (id {}) of cluster {}; start it with `warren-node run --data-dir {}`, or choose an empty directory",
                self.root.display(),
                f.name.as_str(),
                f.node_id,
                f.cluster_id,
                self.root.display()
            ),
            State::Foreign => bail!(
                "{} is not empty and is not a Warren data directory; choose an empty directory",
                self.root.display()
            ),
            State::Incomplete => {
                tracing::warn!(dir = %self.root.display(), "starting over after an unfinished init or join");
                for entry in fs::read_dir(&self.root)? {
                    let p = entry?.path();
                    if p.is_dir() {
                        fs::remove_dir_all(&p)?;
                    } else {
                        fs::remove_file(&p)?;
                    }
                }
            }
            State::Empty => {}
        }
        fs::create_dir_all(&self.root)
            .with_context(|| format!("creating {}", self.root.display()))?;
        fs::set_permissions(&self.root, fs::Permissions::from_mode(0o700))?;
        self.write(".incomplete", b"", false)
    }

    /// Marks the directory complete.
    pub fn finish_create(&self) -> anyhow::Result<()> {
        let marker = self.path(".incomplete");
        fs::remove_file(&marker).with_context(|| format!("removing {}", marker.display()))?;
        sync_dir(&self.root)
    }

    /// Writes a file atomically (temporary file, fsync, rename); `secret` files get mode 0600.
    pub fn write(&self, name: &str, contents: &[u8], secret: bool) -> anyhow::Result<()> {
        let path = self.path(name);
        let tmp = self.path(&format!(".{name}.tmp"));
        let mode = if secret { 0o600 } else { 0o644 };
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(contents)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
        sync_dir(&self.root)
    }

    /// Writes `node.json`.
    pub fn write_node_file(&self, file: &NodeFile) -> anyhow::Result<()> {
        let json = serde_json::to_vec_pretty(file)?;
        self.write("node.json", &json, false)
    }

    /// Reads a text file.
    pub fn read(&self, name: &str) -> anyhow::Result<String> {
        let path = self.path(name);
        fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    }

    /// Loads the cluster CA (with its key, where this node holds it).
    pub fn ca(&self) -> anyhow::Result<ClusterCa> {
        let cert = self.read("ca.pem")?;
        let key = if self.path("ca.key").exists() {
            Some(self.read("ca.key")?)
        } else {
            None
        };
        ClusterCa::from_pem(&cert, key).context("loading ca.pem")
    }

    /// Loads this node's certificate and key.
    pub fn identity(&self, ca: &ClusterCa) -> anyhow::Result<NodeIdentity> {
        NodeIdentity::from_pem(&self.read("node.pem")?, &self.read("node.key")?, ca)
            .context("loading node.pem and node.key")
    }
}

fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifecycle_of_a_data_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::new(tmp.path().join("d"));
        assert!(matches!(dir.state().unwrap(), State::Empty));
        assert!(dir
            .require_ready()
            .unwrap_err()
            .to_string()
            .contains("init"));
        dir.begin_create().unwrap();
        assert!(matches!(dir.state().unwrap(), State::Incomplete));
        let file = NodeFile {
            format: NodeFile::FORMAT,
            cluster_id: "ab".into(),
            node_id: 1,
            name: Name::new("n1").unwrap(),
            cluster_addr: "127.0.0.1:7400".into(),
            admin_addr: "127.0.0.1:7443".into(),
            region: String::new(),
        };
        dir.write_node_file(&file).unwrap();
        assert!(dir
            .require_ready()
            .unwrap_err()
            .to_string()
            .contains("did not finish"));
        // Starting over wipes the unfinished attempt.
        dir.write("stale", b"x", true).unwrap();
        dir.begin_create().unwrap();
        assert!(!dir.path("stale").exists());
        dir.write_node_file(&file).unwrap();
        dir.finish_create().unwrap();
        assert_eq!(dir.require_ready().unwrap(), file);
        let err = dir.begin_create().unwrap_err().to_string();
        assert!(err.contains("already holds node \"n1\""), "{err}");
    }

    #[test]
    fn secret_files_are_private() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::new(tmp.path());
        dir.write("k", b"secret", true).unwrap();
        let mode = fs::metadata(dir.path("k")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn other_files_are_not_mistaken_for_a_node() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("notes.txt"), "hi").unwrap();
        let dir = DataDir::new(tmp.path());
        assert!(matches!(dir.state().unwrap(), State::Foreign));
        assert!(dir.begin_create().is_err());
        assert!(tmp.path().join("notes.txt").exists(), "nothing was removed");
    }
}

//! Runtime settings of a node: command-line flags, each with an environment variable.

use std::time::Duration;

use clap::Args;
use warren_consensus::cluster::ClusterConfig;

/// Settings a node takes at every start (they are not stored in the data directory).
#[derive(Debug, Clone, Args)]
pub struct Settings {
    /// Raft heartbeat interval, in milliseconds.
    #[arg(long, env = "WARREN_HEARTBEAT_MS", default_value_t = 50)]
    pub heartbeat_ms: u64,
    /// Shortest election timeout, in milliseconds.
    #[arg(long, env = "WARREN_ELECTION_TIMEOUT_MIN_MS", default_value_t = 300)]
    pub election_timeout_min_ms: u64,
    /// Longest election timeout, in milliseconds. A follower also refuses to vote for
    /// another node until this long after it last heard from its leader (openraft's leader
    /// lease), so failover takes one to two election timeouts.
    #[arg(long, env = "WARREN_ELECTION_TIMEOUT_MAX_MS", default_value_t = 500)]
    pub election_timeout_max_ms: u64,
    /// Build a snapshot and compact the log after at least this many writes (and at least
    /// as many writes as the registry has entities).
    #[arg(long, env = "WARREN_SNAPSHOT_WRITES", default_value_t = 5000)]
    pub snapshot_writes: u64,
    /// How long a write or a linearizable read may wait for the cluster, in milliseconds,
    /// before it is answered with 503.
    #[arg(long, env = "WARREN_REQUEST_TIMEOUT_MS", default_value_t = 5000)]
    pub request_timeout_ms: u64,
    /// How long a membership change may take (a new learner must catch up), in seconds.
    #[arg(long, env = "WARREN_MEMBERSHIP_TIMEOUT_S", default_value_t = 60)]
    pub membership_timeout_s: u64,
    /// After this many seconds without contact with a leader, the node reports itself
    /// unhealthy and stops granting access.
    #[arg(long, env = "WARREN_LEADER_LOSS_BOUND_S", default_value_t = 15)]
    pub leader_loss_bound_s: u64,
}

impl Default for Settings {
    fn default() -> Self {
        let d = ClusterConfig::default();
        Self {
            heartbeat_ms: d.heartbeat.as_millis() as u64,
            election_timeout_min_ms: d.election_timeout_min.as_millis() as u64,
            election_timeout_max_ms: d.election_timeout_max.as_millis() as u64,
            snapshot_writes: d.snapshot_writes,
            request_timeout_ms: d.request_timeout.as_millis() as u64,
            membership_timeout_s: d.membership_timeout.as_secs(),
            leader_loss_bound_s: d.leader_loss_bound.as_secs(),
        }
    }
}

impl Settings {
    /// The consensus settings, checked.
    pub fn cluster(&self) -> anyhow::Result<ClusterConfig> {
        let c = ClusterConfig {
            heartbeat: Duration::from_millis(self.heartbeat_ms),
            election_timeout_min: Duration::from_millis(self.election_timeout_min_ms),
            election_timeout_max: Duration::from_millis(self.election_timeout_max_ms),
            snapshot_writes: self.snapshot_writes,
            request_timeout: Duration::from_millis(self.request_timeout_ms),
            membership_timeout: Duration::from_secs(self.membership_timeout_s),
            leader_loss_bound: Duration::from_secs(self.leader_loss_bound_s),
            planted_bug: None,
            storage_io: Default::default(),
        };
        c.validate().map_err(|e| {
            let flag = match e.field {
                "heartbeat" => "--heartbeat-ms",
                "election_timeout_min" => "--election-timeout-min-ms",
                "election_timeout_max" => "--election-timeout-max-ms",
                "snapshot_writes" => "--snapshot-writes",
                "request_timeout" => "--request-timeout-ms",
                other => other,
            };
            anyhow::anyhow!("invalid setting {flag}: {}", e.reason)
        })
    }
}

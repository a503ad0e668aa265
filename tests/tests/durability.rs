//! Durability of real nodes: no acknowledged write is lost when a node's storage is damaged
//! (a log cut short or with flipped bytes, a damaged durability record, a damaged snapshot)
//! or its disk fills up; damaged nodes say so, refuse to elect a leader that lacks what they
//! had, and repair themselves from their peers; a write is `fdatasync`ed before it is
//! answered.
//!
//! Needs root (a small tmpfs for the full disk) and `strace`; CI runs it as root.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use futures::StreamExt as _;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use warren_tests::{phase, port_of, Api, Cluster};

/// A user with a long display name that does not compress, so that a registry of a few
/// hundred makes a snapshot larger than sled's inline value limit (128 KiB), stored in a
/// blob file.
fn user(name: &str) -> Value {
    use sha2::Digest as _;
    let noise: String = (0..3u8)
        .map(|i| hex::encode(sha2::Sha256::digest(format!("{name}/{i}"))))
        .collect();
    json!({
        "name": name,
        "email": format!("{name}@example.com"),
        "display_name": format!("{name} {noise}"),
    })
}

/// Creates `n` users named `<prefix><i>`, eight at a time; every one must be acknowledged
/// (2xx). Returns their names and the highest revision (log index) acknowledged.
async fn write_users(api: &Api, prefix: &str, n: usize) -> anyhow::Result<(Vec<String>, u64)> {
    let results: Vec<anyhow::Result<(String, u64)>> = futures::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            let name = format!("{prefix}{i}");
            async move {
                let v = api.post_ok("/v1/users", &user(&name)).await?;
                Ok((name, v["revision"].as_u64().unwrap_or(0)))
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    let mut names = Vec::with_capacity(n);
    let mut top = 0;
    for r in results {
        let (name, revision) = r?;
        names.push(name);
        top = top.max(revision);
    }
    Ok((names, top))
}

/// Every acknowledged user is listed by each of `nodes` (a linearizable read through each).
async fn assert_all_present(c: &Cluster, nodes: &[usize], acked: &[String]) -> anyhow::Result<()> {
    for &i in nodes {
        let have: BTreeSet<String> = c.api(i).names("/v1/users").await?.into_iter().collect();
        let missing: Vec<&String> = acked.iter().filter(|n| !have.contains(*n)).collect();
        ensure!(
            missing.is_empty(),
            "{} of {} acknowledged users are missing on {}, e.g. {:?}",
            missing.len(),
            acked.len(),
            c.nodes[i].name,
            &missing[..missing.len().min(5)]
        );
    }
    Ok(())
}

/// `/v1/health` of a node: status and body, or `None` if it does not answer.
async fn health(api: &Api) -> Option<(StatusCode, Value)> {
    api.get("/v1/health").await.ok()
}

async fn wait_all_healthy(c: &Cluster, timeout: Duration) -> anyhow::Result<()> {
    for i in 0..c.nodes.len() {
        c.api(i).wait_healthy(timeout).await?;
    }
    Ok(())
}

fn others(leader: usize) -> (usize, usize) {
    let mut o = (0..3).filter(|i| *i != leader);
    (o.next().unwrap(), o.next().unwrap())
}

/// The durability record in a node's Raft log directory.
fn record_file(log_dir: &Path) -> PathBuf {
    log_dir.join("warren-durable")
}

/// How a stopped node's Raft log is damaged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LogDamage {
    /// One byte in every 512 flipped from the middle of sled's data file to its end.
    FlippedSecondHalf,
    /// sled's data file cut to half its length.
    TruncatedToHalf,
    /// The log's files put back to a copy taken before writes that the lagging node has
    /// (a disk that lost writes it had reported synced), the durability record kept: the
    /// log is then behind the lagging node's.
    RolledBack,
}

impl LogDamage {
    /// Damages the log in `dir` (sled's directory); `copy` is what [`LogDamage::RolledBack`]
    /// puts back. Says what it did.
    fn apply(self, dir: &Path, copy: &Path) -> anyhow::Result<String> {
        let db = dir.join("db");
        let len = std::fs::metadata(&db)?.len();
        match self {
            Self::FlippedSecondHalf => {
                let mut bytes = std::fs::read(&db)?;
                for i in (bytes.len() / 2..bytes.len()).step_by(512) {
                    bytes[i] ^= 0x5a;
                }
                std::fs::write(&db, &bytes)?;
                Ok(format!(
                    "one byte in 512 flipped from offset {} of {len}",
                    len / 2
                ))
            }
            Self::TruncatedToHalf => {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&db)?
                    .set_len(len / 2)?;
                Ok(format!("cut from {len} to {} bytes", len / 2))
            }
            Self::RolledBack => {
                let record = std::fs::read(record_file(dir))?;
                std::fs::remove_dir_all(dir)?;
                copy_dir(copy, dir)?;
                std::fs::write(record_file(dir), record)?;
                Ok(format!(
                    "its files ({len} bytes of data) replaced by an older copy, the durability record kept"
                ))
            }
        }
    }
}

/// Copies the contents of `from` into `to`, keeping modes.
fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    let status = Command::new("cp")
        .arg("-a")
        .arg(from.join("."))
        .arg(to)
        .status()?;
    ensure!(status.success(), "copying {} failed", from.display());
    Ok(())
}

/// The clear line a node logs when its log lost entries it had made durable.
fn damage_line(log: &str) -> Option<String> {
    let re = regex::Regex::new(
        r"storage damaged: the Raft log holds (index \d+|nothing) but this node had made entries up to index \d+ \(term \d+\) durable[^\n]*; it does not vote or lead until it has caught up from a leader",
    )
    .expect("regex");
    re.find(log).map(|m| m.as_str().to_owned())
}

/// The last log index a damage line says the log still holds (0 for nothing).
fn index_left(line: &str) -> u64 {
    line.strip_prefix("storage damaged: the Raft log holds index ")
        .and_then(|r| r.split(' ').next())
        .and_then(|i| i.parse().ok())
        .unwrap_or(0)
}

/// The node's own entry in its `/v1/cluster`.
async fn own_status(c: &Cluster, i: usize) -> anyhow::Result<Value> {
    let name = c.nodes[i].name.as_str();
    members(c, i)
        .await?
        .into_iter()
        .find(|m| m["name"] == name)
        .with_context(|| format!("{name} does not list itself"))
}

/// The writes that only the leader `a` and a follower `b` hold are lost from `b`'s log
/// (`damage`), and `a` is down when `b` comes back next to `c`, which never had them: `b`
/// says its storage is damaged and must not help elect `c`, so nothing is accepted; once
/// `a` is back every acknowledged write is on every node and `b` has repaired its log.
/// The issue: "elected with the node that missed those writes, the cluster lost 55 to
/// 286 of 300 acknowledged writes".
async fn damaged_follower_refuses_to_elect_a_node_that_lacks_its_writes(
    c: &mut Cluster,
    round: &str,
    damage: LogDamage,
    acked: &mut Vec<String>,
) -> anyhow::Result<()> {
    let a = c.wait_leader(0, None, Duration::from_secs(10)).await?;
    let (b, lagging) = others(a);
    let (an, bn, cn) = (
        c.nodes[a].name.clone(),
        c.nodes[b].name.clone(),
        c.nodes[lagging].name.clone(),
    );
    let b_log = c.nodes[b].dir.join("raft").join("log");
    let copy = c.tmp.path().join(format!("{bn}-log-copy-{round}"));
    if damage == LogDamage::RolledBack {
        phase!("{round}: copy {bn}'s log while it is stopped; 30 writes that every node has");
        c.nodes[b].terminate()?;
        copy_dir(&b_log, &copy)?;
        c.nodes[b].run()?;
        c.api(b).wait_healthy(Duration::from_secs(30)).await?;
        let (more, _) = write_users(&c.api(a), &format!("{round}-all-"), 30).await?;
        acked.extend(more);
        // `cn` is a follower and has appended them once it reports them applied.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !c
            .api(lagging)
            .names("/v1/users")
            .await?
            .contains(&format!("{round}-all-29"))
        {
            ensure!(Instant::now() < deadline, "{cn} did not get the writes");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let lagging_has = own_status(c, lagging).await?["last_log_index"]
        .as_u64()
        .context("no log index for the lagging node")?;
    phase!("{round}: stop {cn} (log at {lagging_has}); 300 writes through leader {an} are acknowledged by {an} and {bn} alone");
    c.nodes[lagging].kill9();
    let (w1, _) = write_users(&c.api(a), &format!("{round}-"), 300).await?;
    acked.extend(w1);

    phase!("{round}: SIGKILL {bn}, damage its log, then SIGKILL {an}, the only other node that has every write");
    c.nodes[b].kill9();
    let how = damage.apply(&b_log, &copy)?;
    phase!("{round}: {bn}'s log: {how}");
    c.nodes[a].kill9();

    phase!("{round}: start {bn} (damaged) and {cn} (behind) without {an}");
    c.nodes[b].run()?;
    c.nodes[lagging].run()?;
    let line = damage_line(&c.nodes[b].log_since_start()).with_context(|| {
        format!(
            "{bn} did not log the 'storage damaged' line:\n{}",
            c.nodes[b].log_tail()
        )
    })?;
    phase!("{round}: {bn} logged: {line}");
    let left = index_left(&line);
    if damage == LogDamage::RolledBack {
        // Then only the damaged node's refusal keeps the lagging one from being elected:
        // by what the logs hold now, the lagging one is the more up to date.
        ensure!(
            left < lagging_has,
            "the rolled-back log of {bn} ends at {left}, not behind {cn}'s ({lagging_has})"
        );
    }
    let (status, body) = health(&c.api(b)).await.context("no health answer")?;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{bn} health: {body}"
    );
    let reason = body["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("storage damaged") && reason.contains("does not vote or lead"),
        "{bn}'s health gives another reason: {body}"
    );

    phase!("{round}: {bn} (log at {left}) and {cn} (log at {lagging_has}) elect no leader; a write through {cn} is not accepted");
    let api = c.api(lagging);
    let write = tokio::spawn(async move {
        api.send(Method::POST, "/v1/users", &user("while-split"))
            .await
    });
    // Their status may still name the old leader (the vote they last saw): what counts is
    // that neither of them leads.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        for i in [b, lagging] {
            let me = own_status(c, i).await?;
            assert_ne!(
                me["state"], "leader",
                "{} leads while {an}, the only node with every acknowledged write, is down: {me}",
                c.nodes[i].name
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    match write.await? {
        Ok((status, body)) => assert!(
            !status.is_success(),
            "a write was accepted through {cn} without {an}: {status} {body}"
        ),
        Err(e) => phase!("{round}: the write through {cn} failed: {e}"),
    }

    phase!("{round}: start {an}: a leader is elected and {bn} repairs its log from it");
    c.nodes[a].run()?;
    wait_all_healthy(c, Duration::from_secs(30)).await?;
    // Health and the log line come from different tasks: give the line a moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !c.nodes[b].log_since_start().contains("storage repaired")
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = c.nodes[b].log_since_start();
    assert!(
        log.contains("storage repaired"),
        "{bn} is healthy but never logged 'storage repaired':\n{}",
        c.nodes[b].log_tail()
    );
    assert_all_present(c, &[0, 1, 2], acked).await?;
    phase!(
        "{round}: all {} acknowledged writes are on every node",
        acked.len()
    );
    Ok(())
}

/// Runs a test body against `c`; if it fails, prints every node's log tail (the cluster
/// prints them itself only when a test panics).
async fn with_logs_on_failure<F>(c: &mut Cluster, body: F) -> anyhow::Result<()>
where
    F: for<'a> FnOnce(&'a mut Cluster) -> futures::future::BoxFuture<'a, anyhow::Result<()>>,
{
    let result = body(c).await;
    if result.is_err() {
        eprintln!("==== node logs ====\n{}", c.logs());
    }
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_log_or_record_loses_no_acknowledged_write() -> anyhow::Result<()> {
    let mut c = Cluster::start(3).await?;
    with_logs_on_failure(&mut c, |c| Box::pin(damaged_logs_and_records(c))).await
}

async fn damaged_logs_and_records(c: &mut Cluster) -> anyhow::Result<()> {
    phase!("50 writes that every node has");
    let (mut acked, _) = write_users(&c.api(0), "base-", 50).await?;
    for (round, damage) in [
        ("flipped", LogDamage::FlippedSecondHalf),
        ("truncated", LogDamage::TruncatedToHalf),
        ("rolled-back", LogDamage::RolledBack),
    ] {
        damaged_follower_refuses_to_elect_a_node_that_lacks_its_writes(
            c, round, damage, &mut acked,
        )
        .await?;
    }

    let leader = c.wait_leader(0, None, Duration::from_secs(10)).await?;
    let (f, _) = others(leader);
    let name = c.nodes[f].name.clone();
    phase!("record: stop {name}; both copies of its durability record damaged, then missing");
    let status = c.nodes[f].terminate()?;
    assert!(status.success(), "{name} exited with {status}");
    let record = record_file(&c.nodes[f].dir.join("raft").join("log"));
    let saved = std::fs::read(&record).context("reading the durability record")?;
    ensure!(
        saved.len() >= 512,
        "the record file has {} bytes",
        saved.len()
    );
    let mut bad = saved.clone();
    bad[8] ^= 0xff;
    bad[256 + 8] ^= 0xff;
    std::fs::write(&record, &bad)?;
    let (status, log) = c.nodes[f].run_expecting_exit(Duration::from_secs(30))?;
    assert!(!status.success(), "{name} started with a damaged record");
    assert!(
        log.contains("warren-durable")
            && log.contains("move the data directory aside and join the node to the cluster again"),
        "{name} exited ({status}) without saying what to do:\n{log}"
    );
    std::fs::remove_file(&record)?;
    let (status, log) = c.nodes[f].run_expecting_exit(Duration::from_secs(30))?;
    assert!(!status.success(), "{name} started without its record");
    assert!(
        log.contains("warren-durable is missing")
            && log.contains("move the data directory aside and join the node to the cluster again"),
        "{name} exited ({status}) without saying what to do:\n{log}"
    );

    phase!("record: put it back; {name} starts and catches up");
    std::fs::write(&record, &saved)?;
    let (more, _) = write_users(&c.api(leader), "after-record-", 20).await?;
    acked.extend(more);
    c.nodes[f].run()?;
    wait_all_healthy(c, Duration::from_secs(30)).await?;
    assert_all_present(c, &[0, 1, 2], &acked).await?;
    Ok(())
}

/// A tmpfs mounted for the life of the value (lazily unmounted on drop, so that a node
/// still running on it does not keep it mounted).
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .context("running mount")?;
        ensure!(
            out.status.success(),
            "mounting a tmpfs on {} failed (this test needs root): {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(Self {
            dir: dir.to_owned(),
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// Writes `path` until the file system has no space left; returns the bytes written.
fn fill(path: &Path) -> anyhow::Result<u64> {
    let mut f = std::fs::File::create(path)?;
    let buf = vec![0xa5u8; 1 << 20];
    let mut written = 0u64;
    for size in [1 << 20, 4096, 1] {
        loop {
            match f.write(&buf[..size]) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => break,
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(written)
}

/// `ls -la` of a directory.
fn listing(dir: &Path) -> String {
    Command::new("ls")
        .arg("-la")
        .arg(dir)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn du(dir: &Path) -> String {
    Command::new("du")
        .args(["-sh"])
        .arg(dir)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// The members of the cluster as node `i` reports them.
async fn members(c: &Cluster, i: usize) -> anyhow::Result<Vec<Value>> {
    let s = c.api(i).get_ok("/v1/cluster").await?;
    Ok(s["members"].as_array().context("no members")?.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_snapshot_is_named_and_rebuilt_from_the_leader() -> anyhow::Result<()> {
    let mut c = Cluster::start_with_env(3, &[("WARREN_SNAPSHOT_WRITES", "20")]).await?;
    with_logs_on_failure(&mut c, |c| Box::pin(damaged_snapshot(c))).await
}

async fn damaged_snapshot(c: &mut Cluster) -> anyhow::Result<()> {
    let leader = c.leader(0).await?;
    let (v, _) = others(leader);
    let vn = c.nodes[v].name.clone();
    phase!("snapshot: writes until {vn} has a snapshot of at least 600 users (larger than sled's inline limit)");
    // Snapshots are spaced by the registry's size (after 20, 40, 80, ... writes): keep
    // writing until one covers the 600th user.
    let mut acked = Vec::new();
    let mut big = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (more, top) = write_users(&c.api(leader), &format!("s{}-", acked.len()), 200).await?;
        acked.extend(more);
        if acked.len() >= 600 {
            big.get_or_insert(top);
        }
        let me = members(c, v)
            .await?
            .into_iter()
            .find(|m| m["name"] == vn.as_str())
            .context("no own entry")?;
        let snapshot = me["snapshot_index"].as_u64().unwrap_or(0);
        if big.is_some_and(|big| snapshot >= big) {
            phase!(
                "snapshot: {vn} has a snapshot at {snapshot} after {} writes",
                acked.len()
            );
            break;
        }
        ensure!(
            Instant::now() < deadline && acked.len() < 4000,
            "{vn} built no snapshot covering index {big:?}: {me}"
        );
    }

    phase!("snapshot: stop {vn}, damage its snapshot (sled's blob files), write more");
    let status = c.nodes[v].terminate()?;
    assert!(status.success(), "{vn} exited with {status}");
    let blobs = c.nodes[v].dir.join("raft").join("state").join("blobs");
    let files: Vec<PathBuf> = std::fs::read_dir(&blobs)
        .with_context(|| format!("{} has no blobs directory", blobs.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    ensure!(
        !files.is_empty(),
        "the snapshot is not in a blob file: nothing to damage"
    );
    for file in &files {
        let mut bytes = std::fs::read(file)?;
        let (mid, len) = (bytes.len() / 2, bytes.len());
        for b in &mut bytes[mid..(mid + 64).min(len)] {
            *b ^= 0xff;
        }
        std::fs::write(file, &bytes)?;
    }
    let (more, _) = write_users(&c.api(leader), "s-down-", 30).await?;
    acked.extend(more);

    phase!("snapshot: start {vn}: it names the damaged snapshot and catches up");
    c.nodes[v].run()?;
    c.api(v).wait_healthy(Duration::from_secs(30)).await?;
    assert_all_present(c, &[v], &acked).await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = members(c, leader).await?;
        let states: BTreeSet<(String, String)> = m
            .iter()
            .map(|m| {
                (
                    m["last_applied"].to_string(),
                    m["applied_digest"].to_string(),
                )
            })
            .collect();
        if states.len() == 1 && m.iter().all(|m| m["applied_digest"].is_string()) {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the replicas do not agree: {m:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    phase!("snapshot: {vn} has every write and the same state as the others");
    let log = c.nodes[v].log_since_start();
    let named = regex::Regex::new(r"the stored Raft snapshot (\S+ )?is damaged[^\n]*")?
        .find(&log)
        .map(|m| m.as_str().to_owned())
        .with_context(|| {
            let errors: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("ERROR") || l.contains("sled"))
                .collect();
            format!(
                "{vn} recovered but did not name its damaged snapshot; it logged:\n{}",
                errors.join("\n")
            )
        })?;
    phase!("snapshot: {vn} logged: {named}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_one_node_loudly_until_space_is_back() -> anyhow::Result<()> {
    let mut c = Cluster::start(3).await?;
    with_logs_on_failure(&mut c, |c| Box::pin(full_disk(c))).await
}

async fn full_disk(c: &mut Cluster) -> anyhow::Result<()> {
    let leader = c.leader(0).await?;
    let (f, _) = others(leader);
    let fname = c.nodes[f].name.clone();
    let (mut acked, _) = write_users(&c.api(leader), "before-", 50).await?;

    phase!("full disk: move {fname}'s data directory onto a 48 MiB tmpfs");
    let status = c.nodes[f].terminate()?;
    assert!(status.success(), "{fname} exited with {status}");
    let mnt = c.tmp.path().join("small-disk");
    let tmpfs = Tmpfs::mount(&mnt, "48m")?;
    c.nodes[f].move_data_dir(&mnt)?;
    phase!("full disk: the data directory takes {}", du(&mnt));
    c.nodes[f].run()?;
    c.api(f).wait_healthy(Duration::from_secs(30)).await?;
    let pid = c.nodes[f].pid();

    phase!("full disk: fill the tmpfs, keep writing through the leader");
    let filler = mnt.join("filler");
    let filled = fill(&filler)?;
    phase!("full disk: {} MiB of filler", filled >> 20);
    // Four writers without pause: sled allocated its current segment before the disk
    // filled, so the node fails only once that segment is used up.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (api, stop) = (c.api(leader), stop.clone());
            tokio::spawn(async move {
                let (mut ok, mut failed) = (Vec::new(), Vec::new());
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let name = format!("full-{w}-{i}");
                    match api.send(Method::POST, "/v1/users", &user(&name)).await {
                        Ok((s, _)) if s.is_success() => ok.push(name),
                        other => failed.push(format!("{name}: {other:?}")),
                    }
                    i += 1;
                }
                (ok, failed)
            })
        })
        .collect();

    phase!("full disk: {fname} says why it cannot serve, and refuses a write clearly");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut reason = None;
    let refused = loop {
        ensure!(
            Instant::now() < deadline,
            "{fname} never refused a write with a clear error within 60 s (health reason seen: {reason:?}):\n{}",
            c.nodes[f].log_tail()
        );
        let Some((status, body)) = health(&c.api(f)).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let why = body["reason"].as_str().unwrap_or_default().to_owned();
        if status != StatusCode::SERVICE_UNAVAILABLE || !why.contains("Raft stopped") {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        reason = Some(why);
        let sent = Instant::now();
        let answer = tokio::time::timeout(
            Duration::from_secs(15),
            c.api(f)
                .send(Method::POST, "/v1/users", &user("to-the-full-node")),
        )
        .await
        .context("a write to the full node hung for 15 s")?;
        match answer {
            Ok((status, body)) => break (status, body, sent.elapsed()),
            // Restarting just then: try in its next window.
            Err(e) => phase!("full disk: the write to {fname} failed: {e}"),
        }
    };
    let reason = reason.unwrap_or_default();
    phase!("full disk: {fname} health: {reason}");
    assert!(
        reason.contains("No space left on device"),
        "{fname}'s health does not say the disk is full: {reason}"
    );
    let (status, body, took) = refused;
    phase!("full disk: a write to {fname}: {status} {body} after {took:?}");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        body.to_string()
            .contains("this node cannot take part in the cluster: Raft stopped"),
        "{body}"
    );

    phase!("full disk: {fname} restarts itself, and again while the disk is still full");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !c.nodes[f].log().contains("(restart 2)") {
        ensure!(
            Instant::now() < deadline,
            "{fname} did not try to start again twice within 30 s:\n{}",
            c.nodes[f].log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    phase!("full disk: free the space; {fname} comes back by itself and catches up");
    std::fs::remove_file(&filler)?;
    if let Err(e) = c.api(f).wait_healthy(Duration::from_secs(60)).await {
        bail!(
            "{e}: {fname} did not recover after the space came back; its Raft log directory holds:\n{}",
            listing(&mnt.join("raft").join("log"))
        );
    }
    assert!(
        c.nodes[f].is_running() && c.nodes[f].pid() == pid,
        "{fname}'s process did not stay up"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut failed) = (Vec::new(), Vec::new());
    for w in writers {
        let (o, f) = w.await?;
        ok.extend(o);
        failed.extend(f);
    }
    phase!(
        "full disk: {} writes through the leader meanwhile, {} failed",
        ok.len(),
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "writes through the leader failed while one follower's disk was full: {failed:?}"
    );
    acked.extend(ok);
    assert_all_present(c, &[0, 1, 2], &acked).await?;
    let log = c.nodes[f].log();
    assert!(
        log.contains("Raft stopped") && log.contains("No space left on device"),
        "{fname} did not log why it stopped:\n{}",
        c.nodes[f].log_tail()
    );
    c.nodes[f].kill9();
    drop(tmpfs);
    Ok(())
}

/// `strace` attached to a process (all its threads), detached on drop.
struct Strace {
    child: Child,
    out: PathBuf,
    err: PathBuf,
}

impl Strace {
    fn attach(pid: u32, out: &Path) -> anyhow::Result<Self> {
        let err = out.with_extension("err");
        let child = Command::new("strace")
            .args(["-f", "-s", "0", "-o"])
            .arg(out)
            .args([
                "-e",
                "trace=fdatasync,fsync,read,write,readv,writev,recvfrom,sendto,recvmsg,sendmsg",
                "-p",
                &pid.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err)?)
            .spawn()
            .context("running strace (install it: apt-get install strace)")?;
        let mut this = Self {
            child,
            out: out.to_owned(),
            err,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let said = std::fs::read_to_string(&this.err).unwrap_or_default();
            if said.contains("attached") {
                // strace reports one thread at a time; give it a moment for the rest.
                std::thread::sleep(Duration::from_millis(300));
                return Ok(this);
            }
            if let Some(status) = this.child.try_wait()? {
                bail!("strace exited ({status}): {said}");
            }
            if Instant::now() > deadline {
                bail!("strace did not attach within 10 s: {said}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Detaches and returns the trace.
    fn finish(mut self) -> anyhow::Result<String> {
        self.detach();
        Ok(std::fs::read_to_string(&self.out)?)
    }

    fn detach(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.child.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Drop for Strace {
    fn drop(&mut self) {
        self.detach();
    }
}

/// File descriptors of `pid`'s established TCP connections on local port `port`.
fn connection_fds(pid: u32, port: u16) -> anyhow::Result<BTreeSet<i64>> {
    let mut inodes = BTreeSet::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}"))?;
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(inode)) = (cols.get(1), cols.get(3), cols.get(9))
            else {
                continue;
            };
            let local_port = local
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port) && *state == "01" {
                inodes.insert(format!("socket:[{inode}]"));
            }
        }
    }
    let mut fds = BTreeSet::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let e = e?;
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        if inodes.contains(&target.display().to_string()) {
            if let Some(fd) = e.file_name().to_str().and_then(|s| s.parse().ok()) {
                fds.insert(fd);
            }
        }
    }
    Ok(fds)
}

/// What a traced syscall did, in the order the trace saw them finish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Io {
    /// Bytes read from a connection.
    Read,
    /// Bytes written to a connection.
    Write,
    /// An `fdatasync` returned.
    Sync,
}

/// Reads `strace -f` output: syscalls on `fds` that moved bytes, and every `fdatasync`.
/// A syscall another thread interrupted is split over an `<unfinished ...>` line and a
/// `<... name resumed>` line; it counts where it finished.
fn parse_trace(text: &str, fds: &BTreeSet<i64>) -> (Vec<Io>, usize) {
    let mut started: std::collections::HashMap<&str, (String, Option<i64>)> = Default::default();
    let mut events = Vec::new();
    let mut fsyncs = 0;
    for line in text.lines() {
        let Some((tid, rest)) = line.split_once(' ') else {
            continue;
        };
        let rest = rest.trim_start();
        let (name, fd, tail) = if let Some(r) = rest.strip_prefix("<... ") {
            let Some((name, tail)) = r.split_once(" resumed>") else {
                continue;
            };
            let Some((_, fd)) = started.remove(tid) else {
                continue;
            };
            (name.to_owned(), fd, tail)
        } else {
            let Some((name, args)) = rest.split_once('(') else {
                continue;
            };
            let fd = args
                .split([',', ')', ' '])
                .next()
                .and_then(|s| s.parse().ok());
            if args.ends_with("<unfinished ...>") {
                started.insert(tid, (name.to_owned(), fd));
                continue;
            }
            (name.to_owned(), fd, args)
        };
        let Some(ret) = tail
            .rsplit_once(" = ")
            .and_then(|(_, r)| r.split_whitespace().next())
            .and_then(|r| r.parse::<i64>().ok())
        else {
            continue;
        };
        match name.as_str() {
            "fdatasync" if ret == 0 => events.push(Io::Sync),
            "fsync" if ret == 0 => fsyncs += 1,
            "read" | "readv" | "recvfrom" | "recvmsg"
                if ret > 0 && fd.is_some_and(|f| fds.contains(&f)) =>
            {
                events.push(Io::Read)
            }
            "write" | "writev" | "sendto" | "sendmsg"
                if ret > 0 && fd.is_some_and(|f| fds.contains(&f)) =>
            {
                events.push(Io::Write)
            }
            _ => {}
        }
    }
    (events, fsyncs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_write_is_fdatasynced_before_it_is_acknowledged() -> anyhow::Result<()> {
    const WRITES: usize = 20;
    let c = Cluster::start(1).await?;
    let api = c.api(0);
    phase!("one write to open the admin connection outside the trace");
    api.post_ok("/v1/users", &user("warm-up")).await?;
    let pid = c.nodes[0].pid().context("not running")?;
    let fds = connection_fds(pid, port_of(&c.nodes[0].admin_addr))?;
    ensure!(!fds.is_empty(), "no admin connection found in /proc/{pid}");

    phase!("strace the node (every thread), then {WRITES} writes, one after another");
    let strace = Strace::attach(pid, &c.tmp.path().join("strace.out"))?;
    for i in 0..WRITES {
        api.post_ok("/v1/users", &user(&format!("synced-{i}")))
            .await?;
    }
    let trace = strace.finish()?;
    let (events, fsyncs) = parse_trace(&trace, &fds);
    let syncs = events.iter().filter(|e| **e == Io::Sync).count();
    // Each request is read, then answered; what matters is an fdatasync in between.
    let (mut answered, mut unsynced) = (0, 0);
    let mut pending: Option<bool> = None;
    for e in &events {
        match (e, pending) {
            (Io::Read, None) => pending = Some(false),
            (Io::Sync, Some(_)) => pending = Some(true),
            (Io::Write, Some(synced)) => {
                answered += 1;
                if !synced {
                    unsynced += 1;
                }
                pending = None;
            }
            _ => {}
        }
    }
    phase!(
        "{syncs} fdatasync and {fsyncs} fsync calls; {answered} requests answered, {unsynced} without an fdatasync between request and answer"
    );
    assert!(
        syncs >= WRITES,
        "{WRITES} acknowledged writes but only {syncs} fdatasync calls ({fsyncs} fsync)"
    );
    assert!(
        answered >= WRITES,
        "the trace shows {answered} request/answer pairs on the admin connection, expected {WRITES}"
    );
    assert_eq!(
        unsynced, 0,
        "{unsynced} of {answered} writes were answered with no fdatasync after the request arrived"
    );
    Ok(())
}

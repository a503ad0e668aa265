//! `warren status`, and the run files it reads.
//!
//! Each running `warren connect` or `warren nc` writes `<config>/run/<pid>.json` every
//! second (its data path's [`SiteStatus`] per site) and removes it when it exits. `warren
//! status` reads the files whose process is alive (same pid, same start time) and deletes the
//! others, left by processes that were killed.
//!
//! ```text
//! warren connect ──every 1 s──► run/4242.json ◄──read── warren status ──► table / --json
//!                  (removed on exit)                     (stale files deleted)
//! ```

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::datapath::SiteStatus;
use crate::node::{NodeClient, Relay};
use crate::session;
use crate::token;

/// The directory of run files inside the configuration directory.
pub const RUN_DIR: &str = "run";

/// What a running `connect` or `nc` says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunFile {
    /// Its process id.
    pub pid: u32,
    /// Its start time in clock ticks since boot (`/proc/<pid>/stat`), so a reused pid is not
    /// taken for it.
    #[serde(default)]
    pub start_ticks: Option<u64>,
    /// `connect` or `nc`.
    pub command: String,
    /// The resource it reaches.
    pub resource: String,
    /// The flow destination.
    pub dst: String,
    /// Its local listener (`connect` only).
    #[serde(default)]
    pub local: Option<String>,
    /// When it last wrote this file, seconds since the Unix epoch.
    pub updated_at: u64,
    /// The relays the node offered (their node names, for people).
    #[serde(default)]
    pub relays: Vec<Relay>,
    /// Per site: the path and its counters.
    pub sites: Vec<SiteStatus>,
}

impl RunFile {
    /// The name of the node whose relay listens on `addr`, if the node said.
    pub fn relay_node(&self, addr: std::net::SocketAddr) -> Option<&str> {
        self.relays
            .iter()
            .find(|r| r.addr == addr)
            .map(|r| r.node.as_str())
    }
}

/// The run directory: `<config>/run`.
pub fn run_dir() -> anyhow::Result<PathBuf> {
    Ok(token::config_dir()?.join(RUN_DIR))
}

/// Writes this process's run file every second until dropped, then removes it.
pub struct Reporter {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Reporter {
    /// Reports a `command` (`connect`, `nc`) reaching `target` through the hub, with its
    /// local listener: no paths of its own (the hub's run file has them).
    pub fn listener(
        dir: PathBuf,
        command: &str,
        target: &crate::resources::Target,
        local: Option<std::net::SocketAddr>,
    ) -> Self {
        Self::start_with(
            dir,
            command,
            &target.resource.name,
            target.dst.to_string(),
            local,
            || async { (Vec::new(), Vec::new()) },
        )
    }

    /// Reports this process under `dir`; every second `source` gives the relays offered
    /// and the sites' paths.
    pub fn start_with<F, Fut>(
        dir: PathBuf,
        command: &str,
        resource: &str,
        dst: String,
        local: Option<std::net::SocketAddr>,
        source: F,
    ) -> Self
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = (Vec<Relay>, Vec<SiteStatus>)> + Send,
    {
        let pid = std::process::id();
        let path = dir.join(format!("{pid}.json"));
        let mut file = RunFile {
            pid,
            start_ticks: process_start(pid),
            command: command.to_owned(),
            resource: resource.to_owned(),
            dst,
            local: local.map(|l| l.to_string()),
            updated_at: 0,
            relays: Vec::new(),
            sites: Vec::new(),
        };
        let target = path.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut warned = false;
            loop {
                tick.tick().await;
                file.updated_at = session::now_unix();
                (file.relays, file.sites) = source().await;
                if let Err(e) = write(&target, &file) {
                    // Status is a convenience: the flows go on without it.
                    if !warned {
                        eprintln!("warren: warning: cannot write {}: {e:#}", target.display());
                        warned = true;
                    }
                }
            }
        });
        Self { path, task }
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Writes `file` at `path` (atomically, mode 0600).
pub fn write(path: &Path, file: &RunFile) -> anyhow::Result<()> {
    let json = serde_json::to_vec(file).context("encoding the run file")?;
    token::write_private(path, &json)
}

/// The run files in `dir` whose process is alive; removes the others (and unreadable ones).
pub fn live(dir: &Path) -> Vec<RunFile> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(pid) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".json"))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let parsed = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<RunFile>(&b).ok())
            .filter(|f| f.pid == pid);
        match parsed {
            Some(f) if alive(&f) => out.push(f),
            // A process that was killed left it, or it is damaged: either way nobody owns it.
            _ => {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    out.sort_by_key(|f| f.pid);
    out
}

/// Whether the process that wrote `f` still runs.
fn alive(f: &RunFile) -> bool {
    let Ok(pid) = i32::try_from(f.pid) else {
        return false;
    };
    let exists = match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) => true,
        Err(nix::errno::Errno::EPERM) => true,
        Err(_) => false,
    };
    exists
        && match (f.start_ticks, process_start(f.pid)) {
            (Some(a), Some(b)) => a == b,
            _ => true,
        }
}

/// A process's start time in clock ticks since boot, from `/proc/<pid>/stat` (Linux).
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    // Fields after the name start at 3 (state); starttime is field 22.
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// Runs `warren status`.
pub async fn run(json_out: bool) -> anyhow::Result<()> {
    let path = session::session_path()?;
    let Some(s) = session::load(&path)? else {
        anyhow::bail!("not signed in to a node: run `warren login --node https://NODE:PORT`");
    };
    let signed_in = s.token.is_some() && s.expires_at.is_none_or(|e| e > session::now_unix());
    let rtt = match NodeClient::new(&s.node, s.ca.as_deref()) {
        // A node that does not answer must not hold the rest of the status up.
        Ok(c) => match tokio::time::timeout(Duration::from_secs(5), rtt(&c)).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err("no answer within 5 s".to_owned()),
        },
        Err(e) => Err(format!("{e:#}")),
    };
    let runs = live(&run_dir()?);

    if json_out {
        let v = json!({
            "user": if signed_in { s.user.clone() } else { None },
            "signed_in": signed_in,
            "signed_in_to": {
                "url": s.node,
                "rtt_ms": rtt.as_ref().ok().map(|d| d.as_secs_f64() * 1000.0),
                "error": rtt.as_ref().err(),
            },
            "device": s.device.as_ref().map(|d| json!({"name": d.name, "address": d.address})),
            "sessions": runs.iter().map(|r| json!({
                "pid": r.pid,
                "command": r.command,
                "resource": r.resource,
                "dst": r.dst,
                "local": r.local,
                "sites": r.sites.iter().map(|st| json!({
                    "site": st.site,
                    "path": if st.direct.is_some() { "direct" } else if st.relay.is_some() { "relayed" } else { "none" },
                    "direct": st.direct,
                    "direct_rtt_ms": st.direct_rtt_us.map(|u| u as f64 / 1000.0),
                    "direct_state": st.direct_state,
                    "next_attempt_s": st.next_attempt_s,
                    "fallbacks": st.fallbacks,
                    "rounds": st.rounds,
                    "probes_ignored": st.probes_ignored,
                    "candidates": st.candidates,
                    "mapping": st.mapping,
                    "relays": st.relay_rtts.iter().map(|(a, rtt)| json!({
                        "relay": a,
                        "node": r.relay_node(*a),
                        "rtt_ms": rtt.map(|u| u as f64 / 1000.0),
                    })).collect::<Vec<_>>(),
                    "relay": st.relay,
                    "relay_node": st.relay.and_then(|a| r.relay_node(a)),
                    "relay_rtt_ms": st.relay_rtt_us.map(|u| u as f64 / 1000.0),
                    "handshake_age_s": st.handshake_age_s,
                    "bytes_sent": st.bytes_sent,
                    "bytes_received": st.bytes_received,
                    "flows": st.flows,
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }

    let show = crate::login::printable;
    match (&s.user, signed_in) {
        (Some(u), true) => println!("Signed in as {}", show(u)),
        (Some(u), false) => println!("Signed in as {} (expired: run `warren login`)", show(u)),
        (None, _) => println!("Not signed in (run `warren login`)"),
    }
    match &s.device {
        Some(d) => println!("Device {} ({})", show(&d.name), d.address),
        None => println!("No device registered (run `warren login`)"),
    }
    match &rtt {
        Ok(d) => println!("Node {} (RTT {:.1} ms)", s.node, d.as_secs_f64() * 1000.0),
        Err(e) => println!("Node {} (unreachable: {e})", s.node),
    }
    if runs.is_empty() {
        println!("No `warren connect` or `warren nc` running.");
    }
    for r in &runs {
        if r.command == "hub" {
            println!("Tunnel (warren hub, pid {}):", r.pid);
            if r.sites.is_empty() {
                println!("  no site path yet");
            }
        } else {
            let local = r
                .local
                .as_deref()
                .map(|l| format!(" on {l}"))
                .unwrap_or_default();
            println!(
                "{} {} ({}){local}, pid {}",
                r.command, r.resource, r.dst, r.pid
            );
        }
        for st in &r.sites {
            println!("  {}", site_line(st, r));
            if !st.relay_rtts.is_empty() {
                let rtts: Vec<String> = st
                    .relay_rtts
                    .iter()
                    .map(|(a, rtt)| {
                        let name = r
                            .relay_node(*a)
                            .map(crate::login::printable)
                            .unwrap_or_else(|| a.to_string());
                        match rtt {
                            Some(us) => format!("{name} {:.1} ms", *us as f64 / 1000.0),
                            None => format!("{name} not answering"),
                        }
                    })
                    .collect();
                println!("    relays: {}", rtts.join(", "));
            }
        }
    }
    Ok(())
}

/// One site's path, for people.
pub fn site_line(st: &SiteStatus, run: &RunFile) -> String {
    let relay = match st.relay {
        Some(r) => {
            let node = run
                .relay_node(r)
                .map(|n| format!(" ({})", crate::login::printable(n)))
                .unwrap_or_default();
            match st.relay_rtt_us {
                Some(us) => format!("relayed via {r}{node}, RTT {:.1} ms", us as f64 / 1000.0),
                None => format!("relayed via {r}{node}"),
            }
        }
        None => "no relay answering".to_owned(),
    };
    let path = match (st.direct, st.direct_rtt_us) {
        (Some(d), Some(us)) => format!(
            "direct to {d}, RTT {:.1} ms (relay standing by: {relay})",
            us as f64 / 1000.0
        ),
        (Some(d), None) => format!("direct to {d} (relay standing by: {relay})"),
        (None, _) => {
            let why = match (st.direct_state.as_deref(), st.next_attempt_s) {
                (Some("probing" | "calling"), _) => " (looking for a direct path)".to_owned(),
                (_, Some(s)) => format!(" (no direct path; next try in {s} s)"),
                _ => String::new(),
            };
            format!("{relay}{why}")
        }
    };
    let nat = st
        .mapping
        .as_deref()
        .map(|m| format!(", NAT mapping {m}"))
        .unwrap_or_default();
    let handshake = match st.handshake_age_s {
        Some(s) => format!("handshake {s} s ago"),
        None => "no handshake yet".to_owned(),
    };
    format!(
        "{}: {path}, {handshake}, {} sent, {} received, {} open flow{}{nat}",
        st.site,
        bytes(st.bytes_sent),
        bytes(st.bytes_received),
        st.flows,
        if st.flows == 1 { "" } else { "s" }
    )
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// The time of one discovery GET on a warm connection (the first one pays for TCP and TLS).
async fn rtt(c: &NodeClient) -> Result<Duration, crate::node::NodeError> {
    c.discovery().await?;
    let started = Instant::now();
    c.discovery().await?;
    Ok(started.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(pid: u32) -> RunFile {
        RunFile {
            pid,
            start_ticks: process_start(pid),
            command: "connect".into(),
            resource: "db".into(),
            dst: "100.100.0.3:5432".into(),
            local: Some("127.0.0.1:5432".into()),
            updated_at: 1,
            relays: vec![Relay {
                node: "n1".into(),
                addr: "10.97.1.1:7401".parse().unwrap(),
            }],
            sites: vec![SiteStatus {
                site: "site-a".into(),
                relay: Some("10.97.1.1:7401".parse().unwrap()),
                relay_rtt_us: Some(1500),
                handshake_age_s: Some(3),
                bytes_sent: 2048,
                bytes_received: 5 * 1024 * 1024,
                flows: 1,
                ..SiteStatus::default()
            }],
        }
    }

    #[test]
    fn run_files_round_trip_and_stale_ones_are_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join(RUN_DIR);
        let me = sample(std::process::id());
        write(&dir.join(format!("{}.json", me.pid)), &me).unwrap();

        // A process that has exited: a child we waited for.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead_pid = child.id();
        child.wait().unwrap();
        write(&dir.join(format!("{dead_pid}.json")), &sample(dead_pid)).unwrap();
        // A file whose name and content disagree, and a damaged one.
        std::fs::write(dir.join("999999999.json"), serde_json::to_vec(&me).unwrap()).unwrap();
        std::fs::write(dir.join("4.json"), b"not json").unwrap();
        std::fs::write(dir.join("notes.txt"), b"kept").unwrap();

        assert_eq!(live(&dir), vec![me.clone()]);
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, vec![format!("{}.json", me.pid), "notes.txt".into()]);
    }

    #[test]
    fn a_reused_pid_is_not_taken_for_the_writer() {
        let tmp = tempfile::tempdir().unwrap();
        let mut reused = sample(std::process::id());
        let Some(ticks) = reused.start_ticks else {
            return; // no /proc here
        };
        reused.start_ticks = Some(ticks + 1);
        write(&tmp.path().join(format!("{}.json", reused.pid)), &reused).unwrap();
        assert_eq!(live(tmp.path()), vec![]);
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    }

    #[test]
    fn site_lines_say_the_path() {
        let run = sample(1);
        let line = site_line(&run.sites[0], &run);
        assert_eq!(
            line,
            "site-a: relayed via 10.97.1.1:7401 (n1), RTT 1.5 ms, handshake 3 s ago, 2.0 KiB sent, 5.0 MiB received, 1 open flow"
        );
    }
}

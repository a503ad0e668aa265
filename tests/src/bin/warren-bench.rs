//! `warren-bench registry`: replicated writes and failover, Warren against etcd, side by side
//! on this machine. See BENCHMARKS.md for how to run it and what it printed.
//!
//! - Throughput and latency: `wrk` posts distinct-key writes for 10 s at 1, 16 and 64
//!   connections to the leader of a 3-node loopback Warren cluster (admin API, HTTPS:
//!   create a user with a ~200-byte field) and of a 3-member etcd cluster (v3 JSON
//!   gateway, plain HTTP: put a 256-byte value).
//! - Failover: SIGKILL the leader while a client writes through a survivor (500 ms client
//!   timeout, immediate retry); the time from the kill to the first acknowledged write.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Parser;
use serde_json::{json, Value};
use warren_tests::{free_port, Cluster};

/// Counts heap allocations, so `policy` can report how many decisions make.
struct CountingAlloc;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

#[allow(unsafe_code)]
// SAFETY: every call goes to the system allocator unchanged; this only counts.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc` is passed on as it is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract for `realloc` is passed on as it is.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

#[derive(Parser)]
#[command(name = "warren-bench")]
struct Cli {
    #[command(subcommand)]
    what: What,
}

#[derive(clap::Subcommand)]
enum What {
    /// Policy evaluation per request, in-process (a microbenchmark).
    Policy {
        /// Decisions to time.
        #[arg(long, default_value_t = 2_000_000)]
        iterations: u32,
    },
    /// Registry writes and leader failover: Warren vs etcd.
    Registry {
        /// Seconds per wrk run.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Failover trials per system.
        #[arg(long, default_value_t = 5)]
        trials: usize,
        /// Connection counts to measure.
        #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
        connections: Vec<u32>,
    },
}

#[derive(Debug, Clone)]
struct WrkResult {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
}

fn parse_latency(s: &str) -> Option<f64> {
    let (num, unit) = s
        .trim()
        .split_at(s.trim().find(|c: char| c.is_ascii_alphabetic())?);
    let v: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => v / 1000.0,
        "ms" => v,
        "s" => v * 1000.0,
        "m" => v * 60_000.0,
        _ => return None,
    })
}

fn parse_wrk(out: &str) -> anyhow::Result<WrkResult> {
    let mut r = WrkResult {
        rps: 0.0,
        p50_ms: 0.0,
        p99_ms: 0.0,
        errors: 0,
    };
    for line in out.lines() {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            r.rps = v.trim().parse()?;
        } else if let Some(v) = t.strip_prefix("50%") {
            r.p50_ms = parse_latency(v).context("p50")?;
        } else if let Some(v) = t.strip_prefix("99%") {
            r.p99_ms = parse_latency(v).context("p99")?;
        } else if let Some(v) = t.strip_prefix("Non-2xx or 3xx responses:") {
            r.errors += v.trim().parse::<u64>()?;
        } else if t.starts_with("Socket errors:") {
            for part in t.trim_start_matches("Socket errors:").split(',') {
                if let Some(n) = part.split_whitespace().last() {
                    r.errors += n.parse::<u64>().unwrap_or(0);
                }
            }
        }
    }
    if r.rps == 0.0 {
        bail!("could not read wrk's output:\n{out}");
    }
    Ok(r)
}

fn wrk(
    url: &str,
    script: &Path,
    conns: u32,
    seconds: u64,
    log: &mut String,
) -> anyhow::Result<WrkResult> {
    let threads = conns.min(2);
    let out = Command::new("wrk")
        .args([
            &format!("-t{threads}"),
            &format!("-c{conns}"),
            &format!("-d{seconds}s"),
            "--latency",
            "-s",
            script.to_str().unwrap(),
            url,
        ])
        .output()
        .context("running wrk (apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    log.push_str(&format!(
        "$ wrk -t{threads} -c{conns} -d{seconds}s --latency -s {} {url}\n{text}\n",
        script.display()
    ));
    parse_wrk(&text)
}

const WARREN_LUA: &str = r#"
-- `tid` is a global: thread:set() sets globals in each thread's Lua state.
local n = 0
tid = 0
local pad = string.rep('v', 200)
setup = function(thread) tid = tid + 1; thread:set('tid', tid) end
request = function()
  n = n + 1
  local body = '{"name":"RUN-' .. (tid or 0) .. '-' .. n .. '","display_name":"' .. pad .. '"}'
  return wrk.format('POST', '/v1/users', { ['Content-Type'] = 'application/json', ['Authorization'] = 'Bearer KEY' }, body)
end
"#;

const ETCD_LUA: &str = r#"
local chars = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/'
local function b64(data)
  local out, pad = {}, (3 - #data % 3) % 3
  data = data .. string.rep('\0', pad)
  for i = 1, #data, 3 do
    local a, b, c = data:byte(i, i + 2)
    local v = a * 65536 + b * 256 + c
    for k = 3, 0, -1 do
      local idx = math.floor(v / 64 ^ k) % 64
      out[#out + 1] = chars:sub(idx + 1, idx + 1)
    end
  end
  local s = table.concat(out)
  return s:sub(1, #s - pad) .. string.rep('=', pad)
end
-- `tid` is a global: thread:set() sets globals in each thread's Lua state.
local n, value = 0, b64(string.rep('v', 256))
tid = 0
setup = function(thread) tid = tid + 1; thread:set('tid', tid) end
request = function()
  n = n + 1
  local body = '{"key":"' .. b64('bench/RUN/' .. (tid or 0) .. '/' .. n) .. '","value":"' .. value .. '"}'
  return wrk.format('POST', '/v3/kv/put', { ['Content-Type'] = 'application/json' }, body)
end
"#;

struct EtcdMember {
    name: String,
    client: u16,
    peer: u16,
    dir: PathBuf,
    child: Option<Child>,
}

struct Etcd {
    members: Vec<EtcdMember>,
    initial: String,
}

impl Etcd {
    fn start(base: &Path) -> anyhow::Result<Self> {
        let members: Vec<EtcdMember> = (1..=3)
            .map(|i| EtcdMember {
                name: format!("e{i}"),
                client: free_port(),
                peer: free_port(),
                dir: base.join(format!("etcd-e{i}")),
                child: None,
            })
            .collect();
        let initial = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let mut e = Self { members, initial };
        for i in 0..3 {
            e.spawn(i)?;
        }
        Ok(e)
    }

    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let m = &mut self.members[i];
        let log = std::fs::File::create(m.dir.with_extension("log"))?;
        let child = Command::new("etcd")
            .args([
                "--name",
                &m.name,
                "--data-dir",
                m.dir.to_str().unwrap(),
                "--listen-client-urls",
                &format!("http://127.0.0.1:{}", m.client),
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{}", m.client),
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{}", m.peer),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{}", m.peer),
                "--initial-cluster",
                &self.initial,
                "--initial-cluster-token",
                "warren-bench",
                "--initial-cluster-state",
                "new",
                "--logger",
                "zap",
                "--log-level",
                "warn",
            ])
            .env("ETCD_UNSUPPORTED_ARCH", "")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("running etcd (apt-get install etcd-server)")?;
        m.child = Some(child);
        Ok(())
    }

    fn url(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.members[i].client)
    }

    async fn leader(&self, http: &reqwest::Client) -> anyhow::Result<usize> {
        for (i, m) in self.members.iter().enumerate() {
            if m.child.is_none() {
                continue;
            }
            let Ok(resp) = http
                .post(format!("{}/v3/maintenance/status", self.url(i)))
                .body("{}")
                .send()
                .await
            else {
                continue;
            };
            let Ok(v) = resp.json::<Value>().await else {
                continue;
            };
            if v["leader"].is_string() && v["leader"] == v["header"]["member_id"] {
                return Ok(i);
            }
        }
        bail!("no etcd leader")
    }

    async fn wait_ready(&self, http: &reqwest::Client) -> anyhow::Result<usize> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(l) = self.leader(http).await {
                if put_etcd(http, &self.url(l), "ready").await.is_ok() {
                    return Ok(l);
                }
            }
            if Instant::now() > deadline {
                bail!("etcd did not become ready");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

fn b64(s: &[u8]) -> String {
    const CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in s.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let v = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(CHARS[((v >> (18 - 6 * k)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

async fn put_etcd(http: &reqwest::Client, url: &str, key: &str) -> anyhow::Result<()> {
    let body = json!({"key": b64(key.as_bytes()), "value": b64(b"x")});
    let resp = http
        .post(format!("{url}/v3/kv/put"))
        .timeout(Duration::from_millis(500))
        .json(&body)
        .send()
        .await?;
    let status = resp.status();
    let v: Value = resp.json().await.unwrap_or(Value::Null);
    if !status.is_success() || v.get("error").is_some() || v.get("header").is_none() {
        bail!("etcd put failed: {status} {v}");
    }
    Ok(())
}

/// Writes through `write` until one succeeds; returns the time since `killed_at`.
async fn first_write_after<F, Fut>(killed_at: Instant, mut write: F) -> anyhow::Result<Duration>
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    for attempt in 0..2000u64 {
        if write(attempt).await.is_ok() {
            return Ok(killed_at.elapsed());
        }
        if killed_at.elapsed() > Duration::from_secs(60) {
            break;
        }
    }
    bail!("no write succeeded within 60 s of the kill")
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

async fn registry(seconds: u64, trials: usize, connections: Vec<u32>) -> anyhow::Result<()> {
    std::env::set_var("WARREN_TEST_RELEASE", "1");
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::builder().build()?;
    let work = tempfile::Builder::new().prefix("warren-bench-").tempdir()?;
    let mut log = String::new();

    eprintln!("starting a 3-node Warren cluster (release build) and a 3-member etcd cluster");
    let mut warren = Cluster::start(3).await?;
    let mut etcd = Etcd::start(work.path())?;
    etcd.wait_ready(&http).await?;

    let mut rows = Vec::new();
    for &c in &connections {
        let wl = warren.leader(0).await?;
        let script = work.path().join(format!("warren-{c}.lua"));
        std::fs::write(
            &script,
            WARREN_LUA
                .replace("KEY", &warren.admin_key)
                .replace("RUN", &format!("r{c}")),
        )?;
        eprintln!("wrk: Warren, {c} connections");
        let w = wrk(
            &format!("https://{}", warren.nodes[wl].admin_addr),
            &script,
            c,
            seconds,
            &mut log,
        )?;
        let el = etcd.leader(&http).await?;
        let script = work.path().join(format!("etcd-{c}.lua"));
        std::fs::write(&script, ETCD_LUA.replace("RUN", &format!("r{c}")))?;
        eprintln!("wrk: etcd, {c} connections");
        let e = wrk(&etcd.url(el), &script, c, seconds, &mut log)?;
        rows.push((c, w, e));
    }

    let mut warren_fo = Vec::new();
    for t in 0..trials {
        let leader = warren
            .leader(0)
            .await
            .or_else(|_| Ok::<_, anyhow::Error>(0))?;
        let leader = if warren.nodes[leader].is_running() {
            leader
        } else {
            warren.leader(1).await?
        };
        let survivor = (0..3).find(|i| *i != leader).unwrap();
        let api = warren.api(survivor);
        let killed_at = Instant::now();
        warren.nodes[leader].kill9();
        let took = first_write_after(killed_at, |i| {
            let api = api.clone();
            async move {
                let body = json!({"name": format!("fo-{t}-{i}")});
                match tokio::time::timeout(
                    Duration::from_millis(500),
                    api.send(reqwest::Method::POST, "/v1/sites", &body),
                )
                .await
                {
                    Ok(Ok((s, _))) if s.is_success() => Ok(()),
                    Ok(Ok((s, v))) => bail!("{s} {v}"),
                    Ok(Err(e)) => Err(e),
                    Err(_) => bail!("timeout"),
                }
            }
        })
        .await?;
        eprintln!("Warren failover trial {t}: {took:?}");
        warren_fo.push(took.as_secs_f64() * 1000.0);
        warren.nodes[leader].run()?;
        warren
            .api(leader)
            .wait_healthy(Duration::from_secs(30))
            .await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    let mut etcd_fo = Vec::new();
    for t in 0..trials {
        let leader = etcd.wait_ready(&http).await?;
        let survivor = (0..3).find(|i| *i != leader).unwrap();
        let url = etcd.url(survivor);
        let killed_at = Instant::now();
        etcd.kill(leader);
        let took = first_write_after(killed_at, |i| {
            let (http, url) = (http.clone(), url.clone());
            async move { put_etcd(&http, &url, &format!("fo/{t}/{i}")).await }
        })
        .await?;
        eprintln!("etcd failover trial {t}: {took:?}");
        etcd_fo.push(took.as_secs_f64() * 1000.0);
        etcd.spawn(leader)?;
        etcd.wait_ready(&http).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    let wrk_log =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-registry-wrk.log");
    std::fs::write(&wrk_log, &log)?;
    println!("### Registry writes, 3 nodes on loopback, {seconds} s per run (wrk, distinct keys, sent to the leader)\n");
    println!("| connections | Warren writes/s | Warren p50 ms | Warren p99 ms | Warren errors | etcd writes/s | etcd p50 ms | etcd p99 ms | etcd errors |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (c, w, e) in &rows {
        println!(
            "| {c} | {:.0} | {:.2} | {:.2} | {} | {:.0} | {:.2} | {:.2} | {} |",
            w.rps, w.p50_ms, w.p99_ms, w.errors, e.rps, e.p50_ms, e.p99_ms, e.errors
        );
    }
    println!("\n### Leader failover: SIGKILL of the leader to the first acknowledged write through a survivor\n");
    println!("| system | trials (ms) | median ms |");
    println!("|---|---|---:|");
    let show = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if trials > 0 {
        println!(
            "| Warren | {} | {:.0} |",
            show(&warren_fo),
            median(&mut warren_fo.clone())
        );
        println!(
            "| etcd | {} | {:.0} |",
            show(&etcd_fo),
            median(&mut etcd_fo.clone())
        );
    }
    eprintln!("raw wrk output: {}", wrk_log.display());
    // Keep the work directory's logs around for inspection only on request.
    if std::env::var("WARREN_BENCH_KEEP").is_ok() {
        let kept = work.keep();
        eprintln!("kept {}", kept.display());
    }
    drop(warren);
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().what {
        What::Policy { iterations } => policy(iterations),
        What::Registry {
            seconds,
            trials,
            connections,
        } => registry(seconds, trials, connections).await,
    }
}

/// Times `decide` for a resource with three policies of the kind people write (groups,
/// e-mail domain, CIDR, path regex, office hours in a time zone, a deny rule), for an
/// allowed and a denied person. Prints ns per decision.
fn policy(iterations: u32) -> anyhow::Result<()> {
    use warren_proto::access::{decide, CompiledPolicy, Facts, Identity};
    use warren_proto::registry::Policy;
    let yaml = |s: &str| -> anyhow::Result<Policy> {
        let p: Policy = serde_norway::with::singleton_map_recursive::deserialize(
            serde_norway::Deserializer::from_str(s),
        )?;
        Ok(p)
    };
    let policies = [
        yaml(
            "name: engineers\nallow:\n  and:\n    - or:\n        - group: engineering\n        - group: sre\n    - email_domain: example.com\n    - time: {days: [mon, tue, wed, thu, fri], from: \"07:00\", to: \"20:00\", timezone: Europe/Paris}\ndeny:\n  or:\n    - path: {prefix: /admin}\n    - path: {regex: '/internal/[0-9]+/debug'}\n",
        )?,
        yaml("name: office\nallow:\n  and:\n    - source_cidr: 10.0.0.0/8\n    - method: GET\n    - claim: {path: org.team, value: infra}\n")?,
        yaml("name: admins\nallow:\n  or:\n    - user: root\n    - email: boss@example.com\n    - group: admins\n")?,
    ];
    let compiled: Vec<CompiledPolicy> = policies
        .iter()
        .map(CompiledPolicy::compile)
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let claims = json!({"org": {"team": ["infra"]}});
    let groups_alice = vec!["staff".to_owned(), "engineering".to_owned()];
    let groups_bob = vec!["sales".to_owned()];
    let facts = |groups: &'static [String], email: &'static str, claims: &'static Value| Facts {
        identity: Some(Identity {
            user: "someone",
            email,
            groups,
            claims,
        }),
        source: "192.168.7.9".parse().expect("ip"),
        method: Some("GET"),
        path: Some("/app/projects/42"),
        now: 1_795_600_800,
    };
    let claims: &'static Value = Box::leak(Box::new(claims));
    let alice = facts(
        Box::leak(groups_alice.into_boxed_slice()),
        "alice@example.com",
        claims,
    );
    let bob = facts(
        Box::leak(groups_bob.into_boxed_slice()),
        "bob@other.org",
        claims,
    );
    assert!(decide(&compiled, &alice).allowed());
    assert!(!decide(&compiled, &bob).allowed());
    for (who, f) in [("allowed (alice)", alice), ("denied (bob)", bob)] {
        let allocs_before = ALLOCATIONS.load(Ordering::Relaxed);
        let started = Instant::now();
        let mut allowed = 0u32;
        for _ in 0..iterations {
            allowed += u32::from(
                std::hint::black_box(decide(&compiled, std::hint::black_box(&f))).allowed(),
            );
        }
        let ns = started.elapsed().as_nanos() as f64 / f64::from(iterations);
        let allocs = ALLOCATIONS.load(Ordering::Relaxed) - allocs_before;
        println!(
            "policy decision, {who}: {ns:.0} ns, {allocs} heap allocations in all ({iterations} decisions, {allowed} allowed)"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrk_output() {
        let out = "  Latency Distribution\n     50%  1.50ms\n     75%    2.00ms\n     90%    3.00ms\n     99%   1.20s \n  1000 requests in 10.00s, 1.00MB read\n  Non-2xx or 3xx responses: 3\nRequests/sec:    100.50\n";
        let r = parse_wrk(out).unwrap();
        assert_eq!(
            (r.rps, r.p50_ms, r.p99_ms, r.errors),
            (100.5, 1.5, 1200.0, 3)
        );
    }

    #[test]
    fn base64_matches_the_standard() {
        assert_eq!(b64(b"bench/1"), "YmVuY2gvMQ==");
        assert_eq!(b64(b"abc"), "YWJj");
        assert_eq!(b64(b"ab"), "YWI=");
    }
}

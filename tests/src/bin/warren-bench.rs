//! `warren-bench`: measurements of Warren against established systems, side by side on this
//! machine. See BENCHMARKS.md for how to run each and what it printed.
//!
//! `registry`: replicated writes and failover, Warren against etcd.
//!
//! - Throughput and latency: `wrk` posts distinct-key writes for 10 s at 1, 16 and 64
//!   connections to the leader of a 3-node loopback Warren cluster (admin API, HTTPS:
//!   create a user with a ~200-byte field) and of a 3-member etcd cluster (v3 JSON
//!   gateway, plain HTTP: put a 256-byte value).
//! - Failover: SIGKILL the leader while a client writes through a survivor (500 ms client
//!   timeout, immediate retry); the time from the kill to the first acknowledged write.
//!
//! `proxy`: authenticated requests through one node's proxy (session cookie checked and
//! policy decided per request) against nginx as a plain TLS reverse proxy and against the
//! backend directly, all in front of the same static backend and driven by the same load
//! generator (below, in Rust: it sets the TLS server name and `Host` apart, which `wrk`
//! cannot); also a public resource on the node, for the cost of the path without the
//! identity work. The paths take turns in rounds; each one's median round is shown, with
//! the CPU each process used per request.
//!
//! `sites`: a site's public web resource through a node and the agent's QUIC tunnel to the
//! same backend, against nginx and the backend directly (the same backend, nginx and load
//! generator as `proxy`); a large download through each (the backend's
//! `/download?bytes=N`); and the time from SIGKILL of a node holding the agent's tunnel to
//! the first success through each surviving node.
//!
//! `policy`: policy decisions in-process (a microbenchmark).
//!
//! `access`: client access (issue 14) in a network lab: iperf3 (1 and 4 TCP streams) and
//! time to first byte of a new flow over the raw veth, `wireguard-go` <-> `wireguard-go`,
//! and `warren connect` relayed by a node, with CPU per GiB of every process
//! (`warren_tests::bench_access`). Needs root.

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
    /// Authenticated requests through one node's proxy vs nginx vs the backend directly.
    Proxy {
        /// Seconds per measured run.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Seconds of load before each measured run, not counted.
        #[arg(long, default_value_t = 1)]
        warmup: u64,
        /// Connection counts to measure.
        #[arg(long, value_delimiter = ',', default_value = "16,64")]
        connections: Vec<u32>,
        /// Rounds over all paths per connection count; the median round of each is shown.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// A site's public web resource through a node and the agent's tunnel vs nginx vs the
    /// backend directly; a download through each; node loss to the first success.
    Sites {
        /// Seconds per measured run.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Seconds of load before each measured run, not counted.
        #[arg(long, default_value_t = 1)]
        warmup: u64,
        /// Connection counts to measure.
        #[arg(long, value_delimiter = ',', default_value = "16,64")]
        connections: Vec<u32>,
        /// Rounds over all paths (requests and downloads); the median round is shown.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// MiB per download.
        #[arg(long, default_value_t = 1024)]
        download_mib: u64,
        /// Node-loss trials.
        #[arg(long, default_value_t = 3)]
        trials: usize,
    },
    /// Client access: iperf3 and time to first byte over the raw veth, wireguard-go and
    /// `warren connect` relayed by a node, in network namespaces (root).
    Access {
        /// Seconds per iperf3 run.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Rounds over all paths; the median round is shown.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// New flows timed per path for time to first byte.
        #[arg(long, default_value_t = 20)]
        ttfb_samples: usize,
        /// Paths to measure: raw, wggo, warren.
        #[arg(long, value_delimiter = ',', default_value = "raw,wggo,warren")]
        paths: Vec<String>,
        /// The NATs between client and site: `star` (they cannot reach each other: warren
        /// is relayed), or a pair `<client>-<site>` of easy, firewall, hard, mapped (the
        /// site's WireGuard port forwarded), double (two NATs, client side only), or
        /// `same-lan`.
        #[arg(long, default_value = "star")]
        nat: String,
    },
    /// The static backend `proxy` starts (`GET` anything: `hello`); exits when its
    /// standard input closes.
    #[command(hide = true)]
    Backend {
        /// Port on 127.0.0.1.
        #[arg(long)]
        port: u16,
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
        What::Proxy {
            seconds,
            warmup,
            connections,
            rounds,
        } => proxy::run(seconds, warmup, connections, rounds).await,
        What::Sites {
            seconds,
            warmup,
            connections,
            rounds,
            download_mib,
            trials,
        } => sites::run(seconds, warmup, connections, rounds, download_mib, trials).await,
        What::Access {
            seconds,
            rounds,
            ttfb_samples,
            paths,
            nat,
        } => {
            warren_tests::bench_access::run_access(warren_tests::bench_access::Options {
                seconds,
                rounds,
                ttfb_samples,
                paths,
                nat,
            })
            .await
        }
        What::Backend { port } => proxy::backend(port).await,
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
        device: None,
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

/// `warren-bench proxy` and the backend it starts.
mod proxy {
    use std::convert::Infallible;
    use std::io::Read as _;
    use std::net::SocketAddr;
    use std::path::{Path, PathBuf};
    use std::pin::Pin;
    use std::process::{Child, Command, Stdio};
    use std::sync::Arc;
    use std::task::{Context, Poll};
    use std::time::{Duration, Instant};

    use anyhow::{bail, Context as _};
    use bytes::Bytes;
    use http::{header, HeaderValue, Request, Response, StatusCode};
    use http_body_util::{BodyExt as _, Either, Empty, Full};
    use hyper::body::{Frame, SizeHint};
    use hyper::client::conn::http1::SendRequest;
    use hyper_util::rt::TokioIo;
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, ServerName};
    use serde_json::json;
    use tokio::io::{AsyncRead, AsyncWrite};
    use warren_tests::oidc::{browser_async, BrowserArgs, Idp};
    use warren_tests::{certs, free_port, phase, Cluster};

    /// What the backend answers to every request.
    pub(super) const HELLO: &[u8] = b"hello\n";
    /// The host both proxies serve (Warren and Chromium send `*.localhost` to loopback).
    pub(super) const APP_HOST: &str = "app.localhost";
    /// Warren's sign-in host (its default).
    const AUTH_HOST: &str = "auth.localhost";
    /// A public resource on Warren (no session, no policy): the cost of the path alone.
    const OPEN_HOST: &str = "open.localhost";
    /// A request that takes longer counts as an error (and its connection is replaced).
    pub(super) const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
    /// Clock ticks per second of the times in `/proc/<pid>/stat` (USER_HZ, 100 on Linux).
    const USER_HZ: f64 = 100.0;

    /// What `/download` sends, over and over: one static 256 KiB chunk.
    static CHUNK: [u8; 256 * 1024] = [b'w'; 256 * 1024];

    /// A body of `left` bytes sent as frames that point at [`CHUNK`] (no copy and no
    /// allocation per frame), with its exact length (so a `Content-Length`).
    struct Download {
        left: u64,
    }

    impl hyper::body::Body for Download {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            if self.left == 0 {
                return Poll::Ready(None);
            }
            let n = usize::try_from(self.left).map_or(CHUNK.len(), |l| l.min(CHUNK.len()));
            self.left -= n as u64;
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&CHUNK[..n])))))
        }

        fn is_end_stream(&self) -> bool {
            self.left == 0
        }

        fn size_hint(&self) -> SizeHint {
            SizeHint::with_exact(self.left)
        }
    }

    /// The backend's answer: `GET /download?bytes=N` streams N bytes, anything else is
    /// `hello`.
    fn answer<B>(req: &Request<B>) -> Response<Either<Full<Bytes>, Download>> {
        let bytes = (req.uri().path() == "/download")
            .then(|| req.uri().query())
            .flatten()
            .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("bytes=")))
            .and_then(|n| n.parse::<u64>().ok());
        let builder = Response::builder();
        match bytes {
            Some(left) => builder
                .header(header::CONTENT_TYPE, "application/octet-stream")
                .body(Either::Right(Download { left })),
            None => builder
                .header(header::CONTENT_TYPE, "text/plain")
                .body(Either::Left(Full::new(Bytes::from_static(HELLO)))),
        }
        .expect("a valid response")
    }

    /// Serves `hello` to every request on 127.0.0.1:`port` (HTTP/1.1, keep-alive), and
    /// N bytes to `GET /download?bytes=N`, until standard input closes: the benchmark holds
    /// it open, so the backend ends with it.
    pub async fn backend(port: u16) -> anyhow::Result<()> {
        std::thread::spawn(|| {
            let _ = std::io::stdin().read_to_end(&mut Vec::new());
            std::process::exit(0);
        });
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let _ = tcp.set_nodelay(true);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|req| {
                    let resp = answer(&req);
                    async move { Ok::<_, Infallible>(resp) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    }

    /// A process this benchmark started, ended when dropped: SIGTERM (nginx's master then
    /// stops its workers and waits for them), SIGKILL to it and the children it had if it
    /// is still there 5 s later.
    pub(super) struct Proc {
        what: &'static str,
        child: Option<Child>,
        log: PathBuf,
    }

    impl Proc {
        pub(super) fn spawn(
            what: &'static str,
            mut cmd: Command,
            log: PathBuf,
        ) -> anyhow::Result<Self> {
            let file = std::fs::File::create(&log)?;
            let child = cmd
                .stdin(Stdio::piped())
                .stdout(file.try_clone()?)
                .stderr(file)
                .spawn()
                .with_context(|| format!("starting {what}"))?;
            Ok(Self {
                what,
                child: Some(child),
                log,
            })
        }

        pub(super) fn pid(&self) -> u32 {
            self.child.as_ref().map_or(0, Child::id)
        }

        /// Waits (at most 10 s) until `addr` accepts connections.
        fn wait_listening(&mut self, addr: SocketAddr) -> anyhow::Result<()> {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    return Ok(());
                }
                if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok()?) {
                    bail!(
                        "{} exited with {status}:\n{}",
                        self.what,
                        std::fs::read_to_string(&self.log).unwrap_or_default()
                    );
                }
                if Instant::now() > deadline {
                    bail!("{} does not listen on {addr} after 10 s", self.what);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    impl Drop for Proc {
        fn drop(&mut self) {
            let Some(mut child) = self.child.take() else {
                return;
            };
            let pid = child.id();
            let children = children_of(pid);
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
            for c in children {
                // Only if it is still the orphan of this process (pid not reused).
                if proc_stat(c).is_some_and(|f| f.ppid == 1 || f.ppid == pid) {
                    let _ = kill(Pid::from_raw(c as i32), Signal::SIGKILL);
                }
            }
        }
    }

    /// What `/proc/<pid>/stat` says about a process.
    struct Stat {
        ppid: u32,
        /// User plus system time of all its threads, in clock ticks.
        cpu_ticks: u64,
    }

    fn proc_stat(pid: u32) -> Option<Stat> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name (which may hold spaces): state is field 3.
        let rest: Vec<&str> = text[text.rfind(')')? + 1..].split_whitespace().collect();
        let field = |n: usize| rest.get(n - 3)?.parse::<u64>().ok();
        Some(Stat {
            ppid: u32::try_from(field(4)?).ok()?,
            cpu_ticks: field(14)? + field(15)?,
        })
    }

    fn children_of(pid: u32) -> Vec<u32> {
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        dir.flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|p| proc_stat(*p).is_some_and(|s| s.ppid == pid))
            .collect()
    }

    /// CPU seconds the processes `pids` have used so far.
    fn cpu_seconds(pids: &[u32]) -> f64 {
        pids.iter()
            .filter_map(|p| proc_stat(*p))
            .map(|s| s.cpu_ticks as f64 / USER_HZ)
            .sum()
    }

    /// (busy, total) clock ticks of all CPUs so far, from `/proc/stat`.
    fn machine_ticks() -> (u64, u64) {
        let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
            return (0, 0);
        };
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal (guest time is in user already).
        let total: u64 = v.iter().take(8).sum();
        let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
        (total - idle, total)
    }

    /// Waits (at most about 60 s) until the CPUs have been under 10% busy for a second, so
    /// that other work on the machine stays out of the next run if it can; the "others"
    /// column shows what came in anyway.
    async fn wait_quiet() {
        for i in 0..60 {
            let before = machine_ticks();
            tokio::time::sleep(Duration::from_secs(1)).await;
            let after = machine_ticks();
            let busy = (after.0 - before.0) as f64 / (after.1 - before.1).max(1) as f64;
            if busy < 0.10 {
                return;
            }
            if i == 0 {
                eprintln!(
                    "the CPUs are {:.0}% busy with other work; waiting up to a minute",
                    busy * 100.0
                );
            }
        }
    }

    pub(super) fn load_average() -> String {
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Where the load generator sends `GET /`, and how.
    pub(super) struct Target {
        pub(super) label: &'static str,
        pub(super) addr: SocketAddr,
        pub(super) host: HeaderValue,
        pub(super) tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
        pub(super) cookie: Option<HeaderValue>,
        /// The proxy's processes, for CPU accounting (none for the backend itself).
        pub(super) pids: Vec<u32>,
    }

    pub(super) type Sender = SendRequest<Empty<Bytes>>;

    impl Target {
        /// A fresh keep-alive HTTP/1.1 connection (over TLS with the target's server name).
        pub(super) async fn connect(&self) -> anyhow::Result<Sender> {
            let tcp = tokio::net::TcpStream::connect(self.addr).await?;
            tcp.set_nodelay(true)?;
            match &self.tls {
                None => handshake(tcp).await,
                Some((tls, name)) => handshake(tls.connect(name.clone(), tcp).await?).await,
            }
        }

        pub(super) fn request(&self) -> Request<Empty<Bytes>> {
            self.get(http::Uri::from_static("/"))
        }

        /// `GET uri` with the target's `Host` (and cookie).
        pub(super) fn get(&self, uri: http::Uri) -> Request<Empty<Bytes>> {
            let mut req = Request::new(Empty::new());
            *req.uri_mut() = uri;
            req.headers_mut().insert(header::HOST, self.host.clone());
            if let Some(c) = &self.cookie {
                req.headers_mut().insert(header::COOKIE, c.clone());
            }
            req
        }
    }

    async fn handshake<S>(io: S) -> anyhow::Result<Sender>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// One request; whether it got `200 hello`.
    pub(super) async fn send(
        sender: &mut Sender,
        req: Request<Empty<Bytes>>,
    ) -> anyhow::Result<bool> {
        sender.ready().await?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok(status == StatusCode::OK && body.as_ref() == HELLO)
    }

    /// What one connection saw.
    #[derive(Default)]
    struct Tally {
        latencies_us: Vec<u32>,
        errors: u64,
    }

    /// Sends requests one after the other on one connection until `deadline`; replaces the
    /// connection if it fails.
    async fn drive(target: Arc<Target>, sender: Sender, deadline: Instant) -> Tally {
        let mut tally = Tally::default();
        let mut sender = Some(sender);
        while Instant::now() < deadline {
            let Some(s) = sender.as_mut() else {
                match tokio::time::timeout(REQUEST_TIMEOUT, target.connect()).await {
                    Ok(Ok(s)) => sender = Some(s),
                    _ => {
                        tally.errors += 1;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                continue;
            };
            let started = Instant::now();
            match tokio::time::timeout(REQUEST_TIMEOUT, send(s, target.request())).await {
                Ok(Ok(ok)) => {
                    let us = started.elapsed().as_micros();
                    tally
                        .latencies_us
                        .push(u32::try_from(us).unwrap_or(u32::MAX));
                    tally.errors += u64::from(!ok);
                }
                Ok(Err(_)) | Err(_) => {
                    tally.errors += 1;
                    sender = None;
                }
            }
        }
        tally
    }

    /// What one run measured.
    #[derive(Clone, Copy)]
    pub(super) struct Measured {
        pub(super) rps: f64,
        pub(super) p50_ms: f64,
        pub(super) p99_ms: f64,
        errors: u64,
        /// CPU µs per request of the proxy, the backend and the load generator.
        cpu_us: [Option<f64>; 3],
        /// Share of all CPUs busy during the run (everyone's work), in percent.
        busy: f64,
        /// The part of `busy` that was neither the proxy, the backend nor the load generator
        /// (other work on the machine), in percent.
        others: f64,
    }

    /// `conns` connections, each sending one request at a time for `length`.
    async fn load(
        target: &Arc<Target>,
        conns: u32,
        length: Duration,
        backend_pid: u32,
    ) -> anyhow::Result<Measured> {
        let senders = tokio::time::timeout(
            REQUEST_TIMEOUT,
            futures::future::try_join_all((0..conns).map(|_| target.connect())),
        )
        .await
        .with_context(|| format!("connecting to {}", target.label))??;
        let me = std::process::id();
        let cpu_before = [
            cpu_seconds(&target.pids),
            cpu_seconds(&[backend_pid]),
            cpu_seconds(&[me]),
        ];
        let machine_before = machine_ticks();
        let started = Instant::now();
        let deadline = started + length;
        let tasks: Vec<_> = senders
            .into_iter()
            .map(|s| tokio::spawn(drive(target.clone(), s, deadline)))
            .collect();
        let mut latencies = Vec::new();
        let mut errors = 0;
        for t in tasks {
            let t = t.await?;
            latencies.extend(t.latencies_us);
            errors += t.errors;
        }
        let elapsed = started.elapsed().as_secs_f64();
        let machine_after = machine_ticks();
        let cpu_after = [
            cpu_seconds(&target.pids),
            cpu_seconds(&[backend_pid]),
            cpu_seconds(&[me]),
        ];
        if latencies.is_empty() {
            bail!("no request to {} completed", target.label);
        }
        latencies.sort_unstable();
        let pct = |p: f64| {
            let rank = ((p * latencies.len() as f64).ceil() as usize).clamp(1, latencies.len());
            f64::from(latencies[rank - 1]) / 1000.0
        };
        let n = latencies.len() as f64;
        let per_request = |i: usize| (cpu_after[i] - cpu_before[i]) * 1e6 / n;
        let machine_total = (machine_after.1 - machine_before.1).max(1) as f64;
        let busy = (machine_after.0 - machine_before.0) as f64 / machine_total;
        let ours = (0..3).map(|i| cpu_after[i] - cpu_before[i]).sum::<f64>() * USER_HZ;
        Ok(Measured {
            rps: n / elapsed,
            p50_ms: pct(0.50),
            p99_ms: pct(0.99),
            errors,
            cpu_us: [
                (!target.pids.is_empty()).then(|| per_request(0)),
                Some(per_request(1)),
                Some(per_request(2)),
            ],
            busy: busy * 100.0,
            others: (busy - ours / machine_total).max(0.0) * 100.0,
        })
    }

    /// Checks that `target` answers `200 hello` (through Warren: that the session and the
    /// policy let the request through).
    pub(super) async fn probe(target: &Target) -> anyhow::Result<()> {
        let mut s = target.connect().await?;
        let req = target.request();
        s.ready().await?;
        let resp = s.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        if status != StatusCode::OK || body.as_ref() != HELLO {
            bail!(
                "{} answered {status}: {}",
                target.label,
                String::from_utf8_lossy(&body)
            );
        }
        Ok(())
    }

    fn nginx_conf(dir: &Path, listen: SocketAddr, backend: SocketAddr, workers: usize) -> String {
        let d = dir.display();
        format!(
            r#"# Written by warren-bench proxy: nginx as a plain TLS reverse proxy.
worker_processes {workers};
daemon off;
user root;
pid {d}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
  # One log line per request, as Warren's proxy writes one (warren::access).
  access_log {d}/access.log;
  # The default of 1000 requests would close every client connection now and then.
  keepalive_requests 1000000;
  client_body_temp_path {d}/tmp/body; proxy_temp_path {d}/tmp/proxy;
  fastcgi_temp_path {d}/tmp/fcgi; uwsgi_temp_path {d}/tmp/uwsgi; scgi_temp_path {d}/tmp/scgi;
  upstream backend {{ server {backend}; keepalive 128; }}
  server {{
    listen {listen} ssl;
    server_name {APP_HOST};
    ssl_certificate {d}/cert.pem;
    ssl_certificate_key {d}/key.pem;
    ssl_protocols TLSv1.3;
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto https;
    }}
  }}
}}
"#
        )
    }

    fn nginx_binary() -> PathBuf {
        std::env::var_os("PATH")
            .and_then(|p| {
                std::env::split_paths(&p)
                    .map(|d| d.join("nginx"))
                    .find(|f| f.is_file())
            })
            .unwrap_or_else(|| PathBuf::from("/usr/sbin/nginx"))
    }

    /// The static backend and nginx in front of it, as `proxy` and `sites` start them.
    pub(super) struct Servers {
        pub(super) backend: Proc,
        pub(super) backend_addr: SocketAddr,
        pub(super) nginx: Proc,
        pub(super) nginx_addr: SocketAddr,
        /// nginx's master and workers, for CPU accounting.
        pub(super) nginx_pids: Vec<u32>,
    }

    impl Servers {
        /// Starts the backend and nginx (`workers` workers, serving `cert`/`key` for every
        /// name) with their files in `dir`.
        pub(super) fn start(
            dir: &Path,
            cert: &str,
            key: &str,
            workers: usize,
        ) -> anyhow::Result<Self> {
            std::fs::create_dir_all(dir.join("tmp"))?;
            std::fs::write(dir.join("cert.pem"), cert)?;
            std::fs::write(dir.join("key.pem"), key)?;
            phase!("backend and nginx ({workers} workers)");
            let backend_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
            let mut cmd = Command::new(std::env::current_exe()?);
            cmd.args(["backend", "--port", &backend_addr.port().to_string()]);
            let mut backend = Proc::spawn("the backend", cmd, dir.join("backend.log"))?;
            backend.wait_listening(backend_addr)?;

            let nginx_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
            let conf = dir.join("nginx.conf");
            std::fs::write(&conf, nginx_conf(dir, nginx_addr, backend_addr, workers))?;
            let mut cmd = Command::new(nginx_binary());
            cmd.arg("-p")
                .arg(dir)
                .arg("-e")
                .arg(dir.join("error.log"))
                .arg("-c")
                .arg(&conf);
            let mut nginx =
                Proc::spawn("nginx (apt-get install nginx)", cmd, dir.join("nginx.log"))?;
            nginx.wait_listening(nginx_addr)?;
            let mut nginx_pids = vec![nginx.pid()];
            nginx_pids.extend(children_of(nginx.pid()));
            Ok(Self {
                backend,
                backend_addr,
                nginx,
                nginx_addr,
                nginx_pids,
            })
        }
    }

    /// A TLS 1.3 client (ALPN `http/1.1`) that trusts only `cert`.
    pub(super) fn tls_connector(cert: &str) -> anyhow::Result<tokio_rustls::TlsConnector> {
        let roots = {
            let mut r = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(cert.as_bytes()) {
                r.add(c?)?;
            }
            r
        };
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(tokio_rustls::TlsConnector::from(Arc::new(tls)))
    }

    /// The backend directly (plain HTTP) and nginx in front of it (HTTPS, [`APP_HOST`]).
    pub(super) fn direct_and_nginx(
        backend_addr: SocketAddr,
        nginx_addr: SocketAddr,
        nginx_pids: Vec<u32>,
        tls: &tokio_rustls::TlsConnector,
    ) -> anyhow::Result<[Target; 2]> {
        Ok([
            Target {
                label: "backend directly (HTTP)",
                addr: backend_addr,
                host: HeaderValue::from_str(&backend_addr.to_string())?,
                tls: None,
                cookie: None,
                pids: Vec::new(),
            },
            Target {
                label: "nginx (HTTPS)",
                addr: nginx_addr,
                host: HeaderValue::from_static(APP_HOST),
                tls: Some((tls.clone(), ServerName::try_from(APP_HOST)?.to_owned())),
                cookie: None,
                pids: nginx_pids,
            },
        ])
    }

    /// One path's median round at one connection count.
    pub(super) struct Row {
        pub(super) conns: u32,
        pub(super) label: &'static str,
        pub(super) median: Measured,
        /// Lowest and highest requests/s over the rounds.
        range: (f64, f64),
        /// Errors over all rounds.
        errors: u64,
    }

    /// Loads every target in turn, `rounds` times per connection count (`warmup` s, then
    /// `seconds` s measured, each after waiting for idle CPUs); each path's median round.
    pub(super) async fn compare(
        targets: &[Arc<Target>],
        connections: &[u32],
        rounds: usize,
        warmup: u64,
        seconds: u64,
        backend_pid: u32,
    ) -> anyhow::Result<Vec<Row>> {
        // Paths take turns within each round, so that a change in the machine's speed or
        // other work touches all of them alike.
        let mut runs: Vec<(u32, usize, Measured)> = Vec::new();
        for &c in connections {
            for round in 1..=rounds {
                for (i, t) in targets.iter().enumerate() {
                    phase!(
                        "{c} connections, round {round}/{rounds}: {} ({warmup} s warm-up, {seconds} s measured)",
                        t.label
                    );
                    wait_quiet().await;
                    if warmup > 0 {
                        load(t, c, Duration::from_secs(warmup), backend_pid).await?;
                    }
                    let m = load(t, c, Duration::from_secs(seconds), backend_pid).await?;
                    runs.push((c, i, m));
                }
            }
        }
        // The median round of each path (by requests/s), and the range over all rounds.
        let mut rows = Vec::new();
        for &c in connections {
            for (i, t) in targets.iter().enumerate() {
                let mut of: Vec<Measured> = runs
                    .iter()
                    .filter(|r| r.0 == c && r.1 == i)
                    .map(|r| r.2)
                    .collect();
                of.sort_by(|a, b| a.rps.total_cmp(&b.rps));
                rows.push(Row {
                    conns: c,
                    label: t.label,
                    median: of[of.len() / 2],
                    range: (of[0].rps, of[of.len() - 1].rps),
                    errors: of.iter().map(|m| m.errors).sum(),
                });
            }
        }
        Ok(rows)
    }

    /// Prints `rows` as a Markdown table.
    pub(super) fn print_rows(rows: &[Row]) {
        println!("| connections | path | requests/s | range | p50 ms | p99 ms | errors | CPU µs/request: proxy | backend | load generator | CPUs busy (others) |");
        println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        let us = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.0}"));
        for r in rows {
            let m = &r.median;
            println!(
                "| {} | {} | {:.0} | {:.0}–{:.0} | {:.2} | {:.2} | {} | {} | {} | {} | {:.0}% ({:.0}%) |",
                r.conns,
                r.label,
                m.rps,
                r.range.0,
                r.range.1,
                m.p50_ms,
                m.p99_ms,
                r.errors,
                us(m.cpu_us[0]),
                us(m.cpu_us[1]),
                us(m.cpu_us[2]),
                m.busy,
                m.others
            );
        }
        println!();
    }

    /// One download of `bytes` bytes from `target` (`GET /download?bytes=N`).
    #[derive(Clone, Copy)]
    pub(super) struct Downloaded {
        pub(super) seconds: f64,
        /// CPU seconds per GiB of the proxy (none for the backend itself), the backend and
        /// the client.
        pub(super) cpu_per_gib: [Option<f64>; 3],
    }

    /// Downloads `bytes` bytes from `target` on a fresh connection, reading the body frame
    /// by frame; times it from the request to the last byte (at most 10 minutes).
    pub(super) async fn download(
        target: &Target,
        bytes: u64,
        backend_pid: u32,
    ) -> anyhow::Result<Downloaded> {
        let mut s = tokio::time::timeout(REQUEST_TIMEOUT, target.connect())
            .await
            .with_context(|| format!("connecting to {}", target.label))??;
        let req = target.get(format!("/download?bytes={bytes}").parse()?);
        let me = std::process::id();
        let cpu = || {
            [
                cpu_seconds(&target.pids),
                cpu_seconds(&[backend_pid]),
                cpu_seconds(&[me]),
            ]
        };
        let before = cpu();
        let started = Instant::now();
        let got = tokio::time::timeout(Duration::from_secs(600), async {
            s.ready().await?;
            let resp = s.send_request(req).await?;
            anyhow::ensure!(resp.status() == StatusCode::OK, "{}", resp.status());
            let mut body = resp.into_body();
            let mut got = 0u64;
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame?.into_data() {
                    got += data.len() as u64;
                }
            }
            Ok(got)
        })
        .await
        .with_context(|| format!("downloading from {}: over 10 minutes", target.label))??;
        let seconds = started.elapsed().as_secs_f64();
        let after = cpu();
        anyhow::ensure!(
            got == bytes,
            "{} sent {got} bytes, not {bytes}",
            target.label
        );
        let gib = bytes as f64 / f64::from(1u32 << 30);
        let per = |i: usize| (after[i] - before[i]) / gib;
        Ok(Downloaded {
            seconds,
            cpu_per_gib: [
                (!target.pids.is_empty()).then(|| per(0)),
                Some(per(1)),
                Some(per(2)),
            ],
        })
    }

    /// A one-node cluster whose proxy serves [`APP_HOST`] from `backend` to the group
    /// `admins` (and [`OPEN_HOST`] to anyone), with alice signed in through a real OpenID
    /// provider and Chromium; returns her session cookie (`__Host-warren_session=...`).
    async fn warren_signed_in(
        backend: SocketAddr,
        cert: &str,
        key: &str,
        web: &reqwest::Client,
    ) -> anyhow::Result<(Cluster, Idp, String)> {
        let cluster = Cluster::start(1).await?;
        let https: u16 = cluster.nodes[0]
            .https_addr
            .rsplit_once(':')
            .context("https address")?
            .1
            .parse()?;
        let redirect = vec![format!("https://{AUTH_HOST}:{https}/.warren/callback")];
        let idp = tokio::task::spawn_blocking(move || Idp::start(&redirect, &[])).await??;
        let api = cluster.api(0);
        api.post_ok(
            "/v1/certificates",
            &json!({"name": "bench", "cert_pem": cert, "key_pem": key}),
        )
        .await?;
        api.post_ok(
            "/v1/identity-providers",
            &json!({"name": "test", "issuer": idp.issuer, "client_id": idp.client_id,
                    "client_secret": idp.client_secret, "scopes": ["groups"],
                    "groups_claim": "groups"}),
        )
        .await?;
        api.post_ok(
            "/v1/policies",
            &json!({"name": "admins", "allow": {"group": "admins"}}),
        )
        .await?;
        api.post_ok(
            "/v1/resources",
            &json!({"name": "app", "route": {"http": {"domain": APP_HOST}},
                    "targets": [backend.to_string()], "policies": ["admins"]}),
        )
        .await?;
        api.post_ok(
            "/v1/resources",
            &json!({"name": "open", "route": {"http": {"domain": OPEN_HOST}},
                    "targets": [backend.to_string()], "http": {"public": true}}),
        )
        .await?;
        // Sign-in needs the cluster's proxy keys, which the node proposes once it leads.
        let jwks = format!("https://{AUTH_HOST}:{https}/.well-known/warren/jwks.json");
        let mut ready = false;
        for _ in 0..400 {
            if let Ok(r) = web.get(&jwks).send().await {
                if r.status() == StatusCode::OK {
                    ready = true;
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        if !ready {
            bail!("the cluster's keys were not published within 10 s");
        }
        phase!("alice signs in with Chromium");
        let b = browser_async(
            BrowserArgs::new(format!("https://{APP_HOST}:{https}/")).login("alice", "alice-pw"),
        )
        .await?;
        if b.status != Some(200) || b.text.trim() != "hello" {
            bail!("sign-in ended on {} with {:?}: {}", b.url, b.status, b.text);
        }
        let cookie = b
            .cookies
            .iter()
            .find(|c| {
                c.name == "__Host-warren_session" && c.domain.trim_start_matches('.') == APP_HOST
            })
            .with_context(|| format!("no session cookie for {APP_HOST}: {:?}", b.cookies))?;
        let cookie = format!("__Host-warren_session={}", cookie.value);
        Ok((cluster, idp, cookie))
    }

    /// Runs the comparison and prints it as Markdown.
    pub async fn run(
        seconds: u64,
        warmup: u64,
        connections: Vec<u32>,
        rounds: usize,
    ) -> anyhow::Result<()> {
        anyhow::ensure!(rounds > 0, "--rounds must be at least 1");
        // Release binaries unless asked otherwise (WARREN_TEST_RELEASE=0: a quick check).
        if std::env::var_os("WARREN_TEST_RELEASE").is_none() {
            std::env::set_var("WARREN_TEST_RELEASE", "1");
        }
        let _ = rustls::crypto::ring::default_provider().install_default();
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        let work = tempfile::Builder::new()
            .prefix("warren-bench-proxy-")
            .tempdir()?;
        let dir = work.path();
        let (cert, key) = certs::self_signed(&[AUTH_HOST, APP_HOST, OPEN_HOST]);
        let Servers {
            backend,
            backend_addr,
            nginx,
            nginx_addr,
            nginx_pids,
        } = Servers::start(dir, &cert, &key, cores)?;
        let tls = tls_connector(&cert)?;
        let sni = ServerName::try_from(APP_HOST)?.to_owned();

        phase!("Warren: one node, identity provider, policy, resource");
        let web = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(cert.as_bytes())?)
            .resolve(AUTH_HOST, "127.0.0.1:0".parse()?)
            .timeout(Duration::from_secs(5))
            .build()?;
        let (cluster, idp, cookie) = warren_signed_in(backend_addr, &cert, &key, &web).await?;
        let warren_addr: SocketAddr = cluster.nodes[0].https_addr.parse()?;
        let warren_pid = cluster.nodes[0].pid().context("the node is not running")?;

        let [direct, via_nginx] = direct_and_nginx(backend_addr, nginx_addr, nginx_pids, &tls)?;
        let targets = [
            direct,
            via_nginx,
            Target {
                label: "Warren (HTTPS, session + policy)",
                addr: warren_addr,
                host: HeaderValue::from_static(APP_HOST),
                tls: Some((tls.clone(), sni)),
                cookie: Some(HeaderValue::from_str(&cookie)?),
                pids: vec![warren_pid],
            },
            Target {
                label: "Warren, public resource (HTTPS; no session, no policy)",
                addr: warren_addr,
                host: HeaderValue::from_static(OPEN_HOST),
                tls: Some((tls, ServerName::try_from(OPEN_HOST)?.to_owned())),
                cookie: None,
                pids: vec![warren_pid],
            },
        ]
        .map(Arc::new);
        for t in &targets {
            probe(t).await?;
        }
        // The cookie is what lets the requests through: without it, none.
        let anonymous = Target {
            label: "Warren without a session",
            addr: warren_addr,
            host: HeaderValue::from_static(APP_HOST),
            tls: targets[2].tls.clone(),
            cookie: None,
            pids: Vec::new(),
        };
        if probe(&anonymous).await.is_ok() {
            bail!("Warren let a request without a session through");
        }

        let load_before = load_average();
        let rows = compare(
            &targets,
            &connections,
            rounds,
            warmup,
            seconds,
            backend.pid(),
        )
        .await?;
        let load_after = load_average();
        println!(
            "### Proxy: `GET /` with a 6-byte answer; median of {rounds} rounds of {seconds} s (after {warmup} s of warm-up each)\n"
        );
        print_rows(&rows);
        for &c in &connections {
            let of = |label: &str| {
                rows.iter()
                    .find(|r| r.conns == c && r.label == label)
                    .map(|r| r.median)
            };
            if let (Some(n), Some(w)) = (of(targets[1].label), of(targets[2].label)) {
                println!(
                    "- {c} connections: Warren {:.2}x nginx's requests/s, p99 {:.2} ms against {:.2} ms ({})",
                    w.rps / n.rps,
                    w.p99_ms,
                    n.p99_ms,
                    if w.rps >= n.rps && w.p99_ms <= n.p99_ms {
                        "target met"
                    } else {
                        "target not met"
                    }
                );
            }
        }
        println!(
            "- {cores} CPUs; load average (1, 5, 15 min) {load_before} before the runs, {load_after} after"
        );
        if std::env::var("WARREN_BENCH_KEEP").is_ok() {
            let kept = work.keep();
            eprintln!("kept {}", kept.display());
        }
        drop(nginx);
        drop(backend);
        drop(cluster);
        drop(idp);
        Ok(())
    }
}

/// `warren-bench sites`: a site's public web resource through a node and the agent's
/// tunnel, against nginx and the backend directly (the `proxy` benchmark's backend, nginx
/// and load generator); a download through each; node loss to the first success.
mod sites {
    use std::process::Command;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use anyhow::{bail, Context as _};
    use http::HeaderValue;
    use rustls_pki_types::ServerName;
    use serde_json::json;
    use warren_tests::{bins, certs, phase, Cluster};

    use super::median;
    use super::proxy::{
        compare, direct_and_nginx, download, load_average, print_rows, probe, send, tls_connector,
        Downloaded, Proc, Sender, Servers, Target, APP_HOST,
    };

    /// The site's web resource (Warren sends `*.localhost` to loopback).
    const SITE_HOST: &str = "web.localhost";
    /// A failover poll that takes longer counts as failed.
    const POLL_TIMEOUT: Duration = Duration::from_millis(500);
    /// How long each survivor is watched after a kill.
    const WATCH: Duration = Duration::from_secs(6);
    /// A failover poll that succeeds but takes longer than this counts as slow.
    const SLOW: Duration = Duration::from_millis(100);
    /// Time between failover polls.
    const POLL_EVERY: Duration = Duration::from_millis(10);
    /// The longest a failover may take before the trial counts as failed.
    const FAILOVER_LIMIT: Duration = Duration::from_secs(30);

    fn site_target(
        label: &'static str,
        addr: &str,
        tls: &tokio_rustls::TlsConnector,
        pids: Vec<u32>,
    ) -> anyhow::Result<Target> {
        Ok(Target {
            label,
            addr: addr.parse()?,
            host: HeaderValue::from_static(SITE_HOST),
            tls: Some((tls.clone(), ServerName::try_from(SITE_HOST)?.to_owned())),
            cookie: None,
            pids,
        })
    }

    /// Polls `target` (bounded) until it answers `200 hello`.
    async fn wait_serving(target: &Target, limit: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let mut last = String::new();
        while started.elapsed() < limit {
            match tokio::time::timeout(Duration::from_secs(2), probe(target)).await {
                Ok(Ok(())) => return Ok(started.elapsed()),
                Ok(Err(e)) => last = format!("{e:#}"),
                Err(_) => last = "timed out".to_owned(),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!(
            "{} did not serve the site within {limit:?}: {last}",
            target.label
        )
    }

    /// Which of `nodes` (cluster addresses) the agent's log says it has a tunnel to now.
    fn tunnels(log: &str, nodes: &[String]) -> Vec<bool> {
        let mut up = vec![false; nodes.len()];
        for line in log.lines() {
            let Some(i) = nodes.iter().position(|n| line.contains(n.as_str())) else {
                continue;
            };
            if line.contains("tunnel up") {
                up[i] = true;
            } else if line.contains("tunnel closed") || line.contains("tunnel failed") {
                up[i] = false;
            } else if line.contains("moving a tunnel") {
                // `from = <node> to = <node>`: the first address named is the one left.
                let from = nodes
                    .iter()
                    .enumerate()
                    .filter_map(|(j, n)| line.find(n.as_str()).map(|at| (at, j)))
                    .min();
                if let Some((_, j)) = from {
                    up[j] = false;
                }
            }
        }
        up
    }

    /// What one survivor answered after the kill.
    struct Watched {
        /// Time from the kill to the first `200 hello`.
        first: Option<Duration>,
        /// Polls that failed (error, wrong answer or over [`POLL_TIMEOUT`]).
        failed: u32,
        polls: u32,
        /// The longest time from the start of a failed poll to the end of the next good one.
        longest_gap: Duration,
        /// The slowest poll that succeeded.
        slowest: Duration,
        /// Polls that succeeded after more than [`SLOW`].
        slow: u32,
    }

    /// Polls `target` every [`POLL_EVERY`] (each request at most [`POLL_TIMEOUT`], on a
    /// kept connection while it works) from `killed_at` for [`WATCH`], and longer (up to
    /// [`FAILOVER_LIMIT`]) until one answers `200 hello`.
    async fn watch(target: Arc<Target>, killed_at: Instant) -> Watched {
        let mut w = Watched {
            first: None,
            failed: 0,
            polls: 0,
            longest_gap: Duration::ZERO,
            slowest: Duration::ZERO,
            slow: 0,
        };
        let mut failing_since: Option<Instant> = None;
        let mut conn: Option<Sender> = None;
        while killed_at.elapsed() < WATCH
            || (w.first.is_none() && killed_at.elapsed() < FAILOVER_LIMIT)
        {
            let at = Instant::now();
            let ok = tokio::time::timeout(POLL_TIMEOUT, async {
                if conn.is_none() {
                    conn = Some(target.connect().await?);
                }
                let s = conn.as_mut().expect("connected");
                send(s, target.request()).await
            })
            .await;
            w.polls += 1;
            if matches!(ok, Ok(Ok(true))) {
                w.first.get_or_insert_with(|| killed_at.elapsed());
                w.slowest = w.slowest.max(at.elapsed());
                w.slow += u32::from(at.elapsed() > SLOW);
                if let Some(since) = failing_since.take() {
                    w.longest_gap = w.longest_gap.max(since.elapsed());
                }
            } else {
                w.failed += 1;
                failing_since.get_or_insert(at);
                if !matches!(ok, Ok(Ok(false))) {
                    conn = None;
                }
            }
            tokio::time::sleep_until((at + POLL_EVERY).into()).await;
        }
        if let Some(since) = failing_since {
            w.longest_gap = w.longest_gap.max(since.elapsed());
        }
        w
    }

    /// Runs the comparison and prints it as Markdown.
    #[allow(clippy::too_many_lines)]
    pub async fn run(
        seconds: u64,
        warmup: u64,
        connections: Vec<u32>,
        rounds: usize,
        download_mib: u64,
        trials: usize,
    ) -> anyhow::Result<()> {
        anyhow::ensure!(rounds > 0, "--rounds must be at least 1");
        // Release binaries unless asked otherwise (WARREN_TEST_RELEASE=0: a quick check).
        if std::env::var_os("WARREN_TEST_RELEASE").is_none() {
            std::env::set_var("WARREN_TEST_RELEASE", "1");
        }
        let _ = rustls::crypto::ring::default_provider().install_default();
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        let work = tempfile::Builder::new()
            .prefix("warren-bench-sites-")
            .tempdir()?;
        let dir = work.path();
        let (cert, key) = certs::self_signed(&[APP_HOST, SITE_HOST]);
        let servers = Servers::start(dir, &cert, &key, cores)?;
        let backend_pid = servers.backend.pid();
        let tls = tls_connector(&cert)?;

        phase!("Warren: 3 nodes, site hq, an agent enrolled through node 1, resource web");
        let mut cluster = Cluster::start(3).await?;
        let api = cluster.api(0);
        api.post_ok("/v1/sites", &json!({"name": "hq"})).await?;
        api.post_ok(
            "/v1/certificates",
            &json!({"name": "web", "cert_pem": cert, "key_pem": key}),
        )
        .await?;
        let token = api.post_ok("/v1/sites/hq/tokens", &json!({})).await?["token"]
            .as_str()
            .context("no token in the answer")?
            .to_owned();
        let mut cmd = Command::new(&bins().agent);
        cmd.arg("--token")
            .arg(&token)
            .arg("--node")
            .arg(&cluster.nodes[0].cluster_addr)
            .arg("--state-dir")
            .arg(dir.join("agent"))
            .env("WARREN_LOG", "info")
            .env("NO_COLOR", "1");
        let agent_log = dir.join("agent.log");
        let agent = Proc::spawn("warren-agent", cmd, agent_log.clone())?;
        api.post_ok(
            "/v1/resources",
            &json!({"name": "web", "site": "hq", "route": {"http": {"domain": SITE_HOST}},
                    "targets": [servers.backend_addr.to_string()], "http": {"public": true}}),
        )
        .await?;
        let node_pid = cluster.nodes[0].pid().context("node 1 is not running")?;
        let through = site_target(
            "Warren site: node 1 → agent tunnel → backend (HTTPS)",
            &cluster.nodes[0].https_addr,
            &tls,
            vec![node_pid, agent.pid()],
        )?;
        let took = wait_serving(&through, Duration::from_secs(60)).await?;
        eprintln!("the site answers through node 1 {took:?} after the resource was added");

        let [direct, via_nginx] = direct_and_nginx(
            servers.backend_addr,
            servers.nginx_addr,
            servers.nginx_pids.clone(),
            &tls,
        )?;
        let targets = [direct, via_nginx, through].map(Arc::new);
        for t in &targets {
            probe(t).await?;
        }

        let load_before = load_average();
        let rows = compare(&targets, &connections, rounds, warmup, seconds, backend_pid).await?;

        let bytes = download_mib << 20;
        let mut downloads: Vec<(usize, Downloaded)> = Vec::new();
        for round in 1..=rounds {
            for (i, t) in targets.iter().enumerate() {
                phase!(
                    "download {download_mib} MiB, round {round}/{rounds}: {}",
                    t.label
                );
                downloads.push((i, download(t, bytes, backend_pid).await?));
            }
        }
        let load_after = load_average();

        // Failover: SIGKILL a node the agent has a tunnel to (the first time, node 1, which
        // it enrolled through), poll through both survivors.
        let addrs: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| n.cluster_addr.clone())
            .collect();
        let mut failovers = Vec::new();
        for trial in 1..=trials {
            let up = tunnels(
                &std::fs::read_to_string(&agent_log).unwrap_or_default(),
                &addrs,
            );
            let victim = if trial == 1 {
                0
            } else {
                (0..3).find(|&i| up[i]).unwrap_or(0)
            };
            let survivors: Vec<usize> = (0..3).filter(|&i| i != victim).collect();
            let polled: Vec<Arc<Target>> = survivors
                .iter()
                .map(|&i| {
                    site_target(
                        "a surviving node",
                        &cluster.nodes[i].https_addr,
                        &tls,
                        vec![],
                    )
                    .map(Arc::new)
                })
                .collect::<anyhow::Result<_>>()?;
            for t in &polled {
                wait_serving(t, Duration::from_secs(30)).await?;
            }
            phase!(
                "failover {trial}/{trials}: SIGKILL node {} (tunnels to nodes {:?})",
                victim + 1,
                (0..3).filter(|&i| up[i]).map(|i| i + 1).collect::<Vec<_>>()
            );
            let killed_at = Instant::now();
            cluster.nodes[victim].kill9();
            let got = futures::future::join_all(
                polled
                    .iter()
                    .map(|t| tokio::spawn(watch(t.clone(), killed_at))),
            )
            .await;
            for (k, g) in survivors.iter().zip(got) {
                let w = g?;
                eprintln!(
                    "  node {}: first success {:?} after the kill; {} of {} polls failed, longest gap {:?}; {} slow, slowest {:?}",
                    k + 1,
                    w.first,
                    w.failed,
                    w.polls,
                    w.longest_gap,
                    w.slow,
                    w.slowest
                );
                failovers.push((trial, victim, *k, up[*k], w));
            }
            cluster.nodes[victim].run()?;
            let back = site_target(
                "the restarted node",
                &cluster.nodes[victim].https_addr,
                &tls,
                vec![],
            )?;
            wait_serving(&back, Duration::from_secs(60)).await?;
            // Let the announcements of who holds the site settle (they expire after 3.5 s).
            tokio::time::sleep(Duration::from_secs(5)).await;
        }

        println!(
            "### Sites: `GET /` with a 6-byte answer; median of {rounds} rounds of {seconds} s (after {warmup} s of warm-up each)\n"
        );
        print_rows(&rows);
        for &c in &connections {
            let of = |i: usize| {
                rows.iter()
                    .find(|r| r.conns == c && r.label == targets[i].label)
                    .map(|r| r.median)
            };
            if let (Some(n), Some(w)) = (of(1), of(2)) {
                println!(
                    "- {c} connections: through the tunnel {:.2}x nginx's requests/s, p99 {:.2} ms against {:.2} ms",
                    w.rps / n.rps,
                    w.p99_ms,
                    n.p99_ms
                );
            }
        }
        println!(
            "\n### Sites: download of {download_mib} MiB (`GET /download?bytes={bytes}`, one connection), median of {rounds}\n"
        );
        println!("| path | MB/s | Gbit/s | range MB/s | CPU s/GiB: proxy | backend | client |");
        println!("|---|---:|---:|---:|---:|---:|---:|");
        let s = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"));
        let mut tunnel_gbit = 0.0;
        for (i, t) in targets.iter().enumerate() {
            let mut of: Vec<Downloaded> =
                downloads.iter().filter(|d| d.0 == i).map(|d| d.1).collect();
            of.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
            let mbs = |d: &Downloaded| bytes as f64 / d.seconds / 1e6;
            let m = of[of.len() / 2];
            if i == 2 {
                tunnel_gbit = mbs(&m) * 8.0 / 1000.0;
            }
            println!(
                "| {} | {:.0} | {:.2} | {:.0}–{:.0} | {} | {} | {} |",
                t.label,
                mbs(&m),
                mbs(&m) * 8.0 / 1000.0,
                mbs(&of[0]),
                mbs(&of[of.len() - 1]),
                s(m.cpu_per_gib[0]),
                s(m.cpu_per_gib[1]),
                s(m.cpu_per_gib[2]),
            );
        }
        println!(
            "\n- through the tunnel: {tunnel_gbit:.2} Gbit/s ({})",
            if tunnel_gbit >= 2.0 {
                "target of 2 Gbit/s met"
            } else {
                "target of 2 Gbit/s not met"
            }
        );
        if trials > 0 {
            println!("\n### Sites: SIGKILL of a node holding a tunnel, then the site through each survivor (polled every {} ms, {} ms timeout, for {} s)\n", POLL_EVERY.as_millis(), POLL_TIMEOUT.as_millis(), WATCH.as_secs());
            println!("| trial | killed | polled through | it had a tunnel | first success ms | failed polls | longest gap ms | polls over {} ms | slowest good poll ms |", SLOW.as_millis());
            println!("|---:|---:|---:|---|---:|---:|---:|---:|---:|");
            for (trial, victim, k, had, w) in &failovers {
                println!(
                    "| {trial} | node {} | node {} | {} | {} | {} of {} | {:.0} | {} | {:.0} |",
                    victim + 1,
                    k + 1,
                    if *had { "yes" } else { "no" },
                    w.first.map_or_else(
                        || "none in 30 s".to_owned(),
                        |d| format!("{:.0}", d.as_secs_f64() * 1000.0)
                    ),
                    w.failed,
                    w.polls,
                    w.longest_gap.as_secs_f64() * 1000.0,
                    w.slow,
                    w.slowest.as_secs_f64() * 1000.0
                );
            }
            // Per trial, the survivor that took longest: when the site worked everywhere.
            let mut worst: Vec<f64> = (1..=trials)
                .map(|t| {
                    failovers
                        .iter()
                        .filter(|f| f.0 == t)
                        .map(|f| {
                            f.4.first
                                .map_or(f64::INFINITY, |d| d.as_secs_f64() * 1000.0)
                        })
                        .fold(0.0, f64::max)
                })
                .collect();
            let med = median(&mut worst);
            println!(
                "\n- median over trials of the slower survivor: {med:.0} ms ({})",
                if med < 3000.0 {
                    "target of 3 s met"
                } else {
                    "target of 3 s not met"
                }
            );
        }
        println!(
            "- {cores} CPUs; load average (1, 5, 15 min) {load_before} before the runs, {load_after} after the downloads"
        );
        if std::env::var("WARREN_BENCH_KEEP").is_ok() {
            let kept = work.keep();
            eprintln!("kept {}", kept.display());
        }
        drop(agent);
        drop(cluster);
        drop(servers);
        Ok(())
    }
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

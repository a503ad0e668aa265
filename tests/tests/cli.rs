//! The `warren` CLI and the `warren-node` quick start, as a person uses them.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde_json::Value;
use warren_tests::{bins, phase, Cluster};

const MANIFEST: &str = r#"
sites:
  - name: hq
    description: Head office
users:
  - name: alice
    email: alice@example.com
  - name: bob
    email: bob@example.com
roles:
  - name: admins
    members: [alice]
policies:
  - name: staff
    allow:
      or:
        - group: admins
        - email_domain: example.com
    deny:
      path: {prefix: /admin}
resources:
  - name: wiki
    site: hq
    route: {http: {domain: wiki.example.com}}
    targets: ["10.0.0.5:8080"]
    policies: [staff]
  - name: db
    site: hq
    route: {tcp: {port: 5432}}
    targets: ["10.0.0.7:5432"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_is_idempotent_and_all_or_nothing() -> anyhow::Result<()> {
    let c = Cluster::start(3).await?;
    let file = c.tmp.path().join("warren.yaml");
    std::fs::write(&file, MANIFEST)?;
    let f = file.to_str().unwrap();

    phase!("dry run changes nothing");
    let (ok, out, err) = c.warren(1, &["apply", "-f", f, "--dry-run"]);
    assert!(ok, "{err}");
    assert!(out.contains("would create resource wiki"), "{out}");
    assert!(c.api(0).names("/v1/sites").await?.is_empty());

    phase!("apply creates everything, referenced kinds first, and warns of what will not work");
    let (ok, out, err) = c.warren(1, &["apply", "-f", f]);
    assert!(ok, "{err}");
    assert!(
        err.contains("warning: resource db: no policy: nobody may use this resource"),
        "the resource without a policy is named:\n{err}"
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines.iter().filter(|l| l.starts_with("created")).count(),
        7,
        "{out}"
    );
    let site = lines.iter().position(|l| *l == "created site hq").unwrap();
    let res = lines
        .iter()
        .position(|l| *l == "created resource wiki")
        .unwrap();
    assert!(site < res, "{out}");

    phase!("a second apply reports no change");
    let (ok, out, _) = c.warren(2, &["apply", "-f", f]);
    assert!(ok);
    assert!(out.contains("no changes (7 unchanged)"), "{out}");

    phase!("an edit is an update of exactly that entity");
    std::fs::write(&file, MANIFEST.replace("10.0.0.7:5432", "10.0.0.8:5432"))?;
    let (ok, out, err) = c.warren(0, &["apply", "-f", f]);
    assert!(ok, "{err}");
    assert_eq!(
        out.trim(),
        "updated resource db (targets)\n1 changes, 6 unchanged".trim(),
        "{out}"
    );

    phase!("an error names the entity and the field, and applies nothing");
    let before = c.api(0).get_ok("/v1/resources").await?;
    let broken = MANIFEST.replace("10.0.0.5:8080", "10.0.0.9:8080").replace(
        "    site: hq\n    route: {tcp",
        "    site: mars\n    route: {tcp",
    );
    std::fs::write(&file, broken)?;
    let (ok, _, err) = c.warren(0, &["apply", "-f", f]);
    assert!(!ok);
    assert!(
        err.contains("resource \"db\"")
            && err.contains("resources.db.site")
            && err.contains("mars"),
        "{err}"
    );
    assert_eq!(
        c.api(0).get_ok("/v1/resources").await?,
        before,
        "half of a failed apply was applied"
    );

    phase!("a YAML mistake names the line");
    std::fs::write(&file, "sites:\n  - name: x\n    colour: red\n")?;
    let (ok, _, err) = c.warren(0, &["apply", "-f", f]);
    assert!(!ok);
    assert!(
        err.contains("unknown field `colour`") && err.contains("line 3"),
        "{err}"
    );

    phase!("a policy that does not parse names the line and the reason");
    std::fs::write(
        &file,
        "policies:\n  - name: p\n    allow:\n      or:\n        - group: admins\n        - source_cidr: 10.0.0.0/33\n",
    )?;
    let (ok, _, err) = c.warren(0, &["apply", "-f", f]);
    assert!(!ok);
    assert!(err.contains("line 6"), "{err}");
    std::fs::write(
        &file,
        "policies:\n  - name: p\n    allow:\n      time: {from: \"09:00\", to: \"17:00\", timezone: Mars/Olympus}\n",
    )?;
    let (ok, _, err) = c.warren(0, &["apply", "-f", f]);
    assert!(!ok);
    assert!(
        err.contains("Mars/Olympus") && err.contains("policies.p.allow"),
        "{err}"
    );
    assert!(
        !c.api(0)
            .names("/v1/policies")
            .await?
            .contains(&"p".to_owned()),
        "nothing applied"
    );

    phase!("prune removes what the file no longer lists, of the kinds it lists");
    std::fs::write(
        &file,
        "sites:\n  - name: hq\n    description: Head office\nresources: []\n",
    )?;
    let (ok, out, err) = c.warren(0, &["apply", "-f", f, "--prune"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("deleted resource wiki") && out.contains("deleted resource db"),
        "{out}"
    );
    assert_eq!(
        c.api(0).names("/v1/users").await?.len(),
        2,
        "users were not in the file: untouched"
    );

    phase!("a field the file leaves out is reset, and the output says so");
    std::fs::write(&file, "sites:\n  - name: hq\n")?;
    let (ok, out, err) = c.warren(0, &["apply", "-f", f, "--dry-run"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("would update site hq (description)")
            && out.contains("would reset")
            && out.contains("does not set description"),
        "{out}"
    );
    let (ok, out, err) = c.warren(0, &["apply", "-f", f]);
    assert!(ok && out.contains("reset to the default"), "{out}{err}");

    phase!("a TCP resource on another node's admin port: apply warns, naming the node");
    let admin_port = c.nodes[0]
        .admin_addr
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse::<u16>().ok())
        .expect("admin port");
    std::fs::write(
        &file,
        format!(
            "policies:\n  - name: anyone\n    allow: {{source_cidr: 0.0.0.0/0}}\nresources:\n  - name: clash\n    route: {{tcp: {{port: {admin_port}}}}}\n    targets: [\"10.0.0.9:22\"]\n    policies: [anyone]\n"
        ),
    )?;
    let (ok, out, err) = c.warren(1, &["apply", "-f", f]);
    assert!(ok && out.contains("created resource clash"), "{out}{err}");
    assert!(
        err.contains(&format!(
            "warning: resource clash: TCP port {admin_port} is node {}'s admin API",
            c.nodes[0].name
        )),
        "{err}"
    );
    phase!("an unchanged entity is not warned about again");
    let (ok, out, err) = c.warren(1, &["apply", "-f", f]);
    assert!(ok && out.contains("no changes"), "{out}");
    assert!(!err.contains("warning"), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entity_verbs_tables_and_json() -> anyhow::Result<()> {
    let c = Cluster::start(1).await?;
    let run = |args: &[&str]| {
        let (ok, out, err) = c.warren(0, args);
        assert!(ok, "warren admin {args:?}: {err}");
        out
    };
    run(&["site", "create", "hq", "--description", "Head office"]);
    run(&["user", "create", "carol", "--email", "carol@example.com"]);
    run(&["role", "create", "ops", "--member", "carol"]);
    run(&[
        "resource",
        "create",
        "db",
        "--site",
        "hq",
        "--tcp",
        "5432",
        "--target",
        "10.0.0.7:5432",
    ]);
    let rules = c.tmp.path().join("rules.yaml");
    std::fs::write(&rules, "allow:\n  group: ops\n")?;
    run(&[
        "policy",
        "create",
        "ops-only",
        "--rules",
        rules.to_str().unwrap(),
    ]);
    run(&["resource", "update", "db", "--policy", "ops-only"]);

    phase!("the README's policy language reference: its example and every criterion in its table are accepted");
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))?;
    let section = readme
        .split("\n## Policy language\n")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("the README has a policy language section");
    let example = section
        .split("--rules - <<'YAML'\n")
        .nth(1)
        .and_then(|s| s.split("\nYAML\n").next())
        .expect("the section has an example");
    std::fs::write(&rules, format!("{example}\n"))?;
    run(&[
        "policy",
        "create",
        "office",
        "--rules",
        rules.to_str().unwrap(),
    ]);
    let v: Value = serde_json::from_str(&run(&["policy", "get", "office", "--json"]))?;
    assert!(
        v["allow"]["or"].is_array() && v["deny"]["or"].is_array(),
        "{v}"
    );
    let mut criteria = 0;
    for row in section.lines().filter(|l| l.starts_with("| `")) {
        let expr = row.split('`').nth(1).unwrap_or_default();
        if expr.contains("e, ...") || expr == "not: e" {
            continue;
        }
        criteria += 1;
        std::fs::write(&rules, format!("allow: {{{expr}}}\n"))?;
        let name = format!("readme-{criteria}");
        let (ok, _, err) = c.warren(
            0,
            &[
                "policy",
                "create",
                &name,
                "--rules",
                rules.to_str().unwrap(),
            ],
        );
        assert!(ok, "the README's `{expr}` is refused: {err}");
    }
    assert!(criteria >= 12, "{criteria} criteria in the README's table");
    std::fs::write(&rules, "allow: {source_cidr: 10.0.0.0/33}\n")?;
    let (ok, _, err) = c.warren(
        0,
        &[
            "policy",
            "create",
            "broken",
            "--rules",
            rules.to_str().unwrap(),
        ],
    );
    assert!(
        !ok && err.contains("allow.source_cidr"),
        "names the bad part: {err}"
    );

    phase!("tables for people");
    let table = run(&["resource", "list"]);
    assert!(
        table.contains("NAME") && table.contains("tcp 5432") && table.contains("ops-only"),
        "{table}"
    );
    phase!("JSON for scripts");
    let v: Value = serde_json::from_str(&run(&["resource", "get", "db", "--json"]))?;
    assert_eq!(v["policies"][0], "ops-only");

    phase!("role membership edits");
    run(&["role", "update", "ops", "--remove-member", "carol"]);
    let v: Value = serde_json::from_str(&run(&["role", "get", "ops", "--json"]))?;
    assert_eq!(v["members"], serde_json::json!([]));

    phase!("certificates from PEM files; resource list says which host has one");
    run(&[
        "resource",
        "create",
        "wiki",
        "--http",
        "wiki.example.com",
        "--target",
        "10.0.0.5:80",
        "--policy",
        "ops-only",
    ]);
    let table = run(&["resource", "list"]);
    let wiki = table
        .lines()
        .find(|l| l.contains("wiki"))
        .unwrap_or_default();
    assert!(wiki.contains("none"), "no certificate yet:\n{table}");
    let (cert_pem, key_pem) = warren_tests::certs::self_signed(&["wiki.example.com"]);
    let (cert_file, key_file) = (c.tmp.path().join("w.pem"), c.tmp.path().join("w.key"));
    std::fs::write(&cert_file, &cert_pem)?;
    std::fs::write(&key_file, &key_pem)?;
    let out = run(&[
        "cert",
        "add",
        "wiki",
        "--cert",
        cert_file.to_str().unwrap(),
        "--key",
        key_file.to_str().unwrap(),
    ]);
    assert!(
        out.contains("wiki.example.com") && out.contains("valid until"),
        "{out}"
    );
    let table = run(&["cert", "list"]);
    assert!(
        table.contains("wiki.example.com") && table.contains("uploaded") && table.contains("Z"),
        "names, expiry as a date, source:\n{table}"
    );
    assert!(
        !table.contains("PRIVATE KEY")
            && !run(&["cert", "get", "wiki", "--json"]).contains("PRIVATE KEY")
    );
    let table = run(&["resource", "list"]);
    let wiki = table
        .lines()
        .find(|l| l.contains("wiki"))
        .unwrap_or_default();
    assert!(wiki.contains("valid until"), "{table}");
    let (ok, _, err) = c.warren(
        0,
        &[
            "cert",
            "add",
            "acme.x",
            "--cert",
            cert_file.to_str().unwrap(),
            "--key",
            key_file.to_str().unwrap(),
        ],
    );
    assert!(
        !ok && err.contains("acme."),
        "ACME's names are refused: {err}"
    );
    let (other_cert, _) = warren_tests::certs::self_signed(&["other.example.com"]);
    std::fs::write(&cert_file, other_cert)?;
    let (ok, _, err) = c.warren(
        0,
        &[
            "cert",
            "add",
            "bad",
            "--cert",
            cert_file.to_str().unwrap(),
            "--key",
            key_file.to_str().unwrap(),
        ],
    );
    assert!(
        !ok && err.contains("does not fit"),
        "a key for another certificate: {err}"
    );
    run(&["cert", "delete", "wiki"]);
    assert!(!run(&["cert", "list"]).contains("wiki.example.com"));

    phase!("mistakes are caught when they are made");
    let node = &c.nodes[0];
    let l4_is_admin = node.admin_addr.starts_with(&format!("{}:", node.l4_ip));
    let admin_port = node.admin_addr.rsplit_once(':').unwrap().1.to_owned();
    let (ok, _, err) = c.warren(
        0,
        &[
            "resource",
            "create",
            "clash",
            "--tcp",
            &admin_port,
            "--target",
            "10.0.0.9:22",
        ],
    );
    if l4_is_admin {
        assert!(
            !ok && err.contains("admin API"),
            "a port the node itself uses: {err}"
        );
    } else {
        assert!(
            ok && err.contains("admin API"),
            "another address, a warning: {err}"
        );
        run(&["resource", "delete", "clash"]);
    }
    assert!(
        !run(&["resource", "list"]).contains("clash"),
        "nothing was stored"
    );
    let (ok, _, err) = c.warren(
        0,
        &[
            "resource",
            "create",
            "nobody",
            "--http",
            "nobody.example.com",
            "--target",
            "10.0.0.5:80",
        ],
    );
    assert!(ok && err.contains("warning: no policy"), "{err}");
    let secret = c.tmp.path().join("secret.txt");
    std::fs::write(&secret, "s3cret")?;
    let (ok, out, err) = c.warren(
        0,
        &[
            "idp",
            "create",
            "nowhere",
            "--issuer",
            "http://127.0.0.1:9/realm",
            "--client-id",
            "warren",
            "--client-secret-file",
            secret.to_str().unwrap(),
        ],
    );
    assert!(
        ok && err.contains("warning: OpenID discovery"),
        "{out}{err}"
    );
    assert!(!err.contains("s3cret") && !out.contains("s3cret"));

    phase!("API keys and join tokens are shown once, never listed");
    let out = run(&["apikey", "create", "ci", "--read-only"]);
    let key = out.lines().last().unwrap().to_owned();
    assert!(key.starts_with("wrn_"), "{out}");
    assert!(!run(&["apikey", "list"]).contains(&key[21..]));
    let out = run(&["join-token", "create"]);
    assert!(out.lines().last().unwrap().starts_with("wjt1_"), "{out}");

    phase!("errors say what is wrong and exit non-zero");
    let (ok, _, err) = c.warren(0, &["site", "delete", "hq"]);
    assert!(
        !ok && err.contains("in use") && err.contains("[in_use]"),
        "{err}"
    );
    let out = Command::new(&bins().warren)
        .args(["admin", "user", "list"])
        .env_remove("WARREN_API_KEY")
        .env("WARREN_CA", c.ca())
        .output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("WARREN_API_KEY"));
    Ok(())
}

/// The README's first command: `warren-node` with no arguments.
#[test]
fn quick_start_creates_then_reuses_warren_data() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let start =
        |dir: &std::path::Path, args: &[&str]| -> anyhow::Result<(std::process::Child, String)> {
            let out_path = dir.join("out.txt");
            let child = Command::new(&bins().node)
                .args(args)
                .current_dir(dir)
                .stdout(std::fs::File::create(&out_path)?)
                .stderr(std::fs::File::create(dir.join("err.txt"))?)
                .spawn()?;
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let text = std::fs::read_to_string(&out_path).unwrap_or_default();
                if text.contains("Try it:") && text.lines().any(|l| l.contains("cargo run")) {
                    return Ok((child, text));
                }
                anyhow::ensure!(Instant::now() < deadline, "no quick start output:\n{text}");
                std::thread::sleep(Duration::from_millis(50));
            }
        };
    phase!("first start creates ./warren-data and prints the key");
    let (mut child, text) = start(dir.path(), &[])?;
    assert!(
        text.contains("https://127.0.0.1:7443") && text.contains("admin API key  wrn_"),
        "{text}"
    );
    let key = std::fs::read_to_string(dir.path().join("warren-data/admin.key"))?;
    assert!(text.contains(key.trim()));
    let status = Command::new(&bins().warren)
        .args(["admin", "cluster", "status"])
        .env("WARREN_ADDR", "https://127.0.0.1:7443")
        .env("WARREN_CA", dir.path().join("warren-data/ca.pem"))
        .env("WARREN_API_KEY", key.trim())
        .output()?;
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(String::from_utf8_lossy(&status.stdout).contains("node1"));
    phase!("a TCP resource on the admin API's own port is refused, with the reason");
    let out = Command::new(&bins().warren)
        .args([
            "admin",
            "resource",
            "create",
            "clash",
            "--tcp",
            "7443",
            "--target",
            "10.0.0.9:22",
        ])
        .env("WARREN_ADDR", "https://127.0.0.1:7443")
        .env("WARREN_CA", dir.path().join("warren-data/ca.pem"))
        .env("WARREN_API_KEY", key.trim())
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("admin API"), "{err}");
    let ca_path = dir.path().join("warren-data/ca.pem").canonicalize()?;
    assert!(
        text.contains(&format!("WARREN_CA={}", ca_path.display())),
        "the export names the CA by its absolute path:\n{text}"
    );

    phase!("with no certificate uploaded, the sign-in host is served with one from the cluster CA");
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&ca_path)?)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let web = reqwest::Client::builder()
            .add_root_certificate(ca)
            .resolve("auth.localhost", "127.0.0.1:8443".parse()?)
            .resolve("nothing.localhost", "127.0.0.1:8443".parse()?)
            .build()?;
        let resp = web
            .get("https://auth.localhost:8443/.warren/")
            .send()
            .await?;
        assert!(
            resp.status().as_u16() < 500,
            "the sign-in host answers over TLS the CA file verifies: {}",
            resp.status()
        );
        phase!("a host the cluster does not serve fails the handshake, and the log says why");
        assert!(web
            .get("https://nothing.localhost:8443/")
            .send()
            .await
            .is_err());
        anyhow::Ok(())
    })?;
    assert!(
        text.contains("auth.localhost"),
        "the output says what to open:\n{text}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = std::fs::read_to_string(dir.path().join("err.txt")).unwrap_or_default();
        if log.contains("no certificate for this TLS server name")
            && log.contains("nothing.localhost")
        {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "nothing in the log:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    assert!(child.wait()?.success());

    phase!("second start reuses it, logging JSON lines");
    let (mut child, text) = start(dir.path(), &["--log-format", "json"])?;
    assert!(
        text.contains("was printed when this node was created"),
        "{text}"
    );
    assert!(!text.contains(key.trim()), "the key is printed only once");
    let log = wait_for_text(&dir.path().join("err.txt"), "serving")?;
    // Whole lines only: the node may be writing the next one.
    let whole = &log[..log.rfind('\n').unwrap_or(0)];
    for line in whole.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| anyhow::anyhow!("not a JSON log line ({e}): {line}"))?;
        assert!(
            v["level"].is_string() && v["fields"]["message"].is_string(),
            "{line}"
        );
    }
    child.kill()?;
    child.wait()?;
    Ok(())
}

/// The README's "A three-node cluster" lines, as written (joined where a line ends in
/// `\`, comments and the alias dropped), with `warren-node` the built binary and the join
/// token the one `init` printed.
fn readme_three_node_lines() -> anyhow::Result<Vec<String>> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))?;
    let section = readme
        .split_once("### A three-node cluster")
        .context("the README has no three-node section")?
        .1;
    let block = section
        .split_once("```sh\n")
        .and_then(|(_, rest)| rest.split_once("```"))
        .context("the section has no sh block")?
        .0;
    let mut lines = Vec::new();
    let mut current = String::new();
    for raw in block.lines() {
        let line = raw.split_once(" #").map_or(raw, |(l, _)| l).trim();
        if line.starts_with('#') || line.starts_with("alias ") || line.is_empty() {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(l) => {
                current.push_str(l);
                current.push(' ');
            }
            None => {
                current.push_str(line);
                lines.push(std::mem::take(&mut current));
            }
        }
    }
    Ok(lines)
}

/// A network namespace of the test's own (fresh loopback: the README's fixed ports are
/// free there), deleted with the processes started in it when dropped.
struct Netns {
    name: String,
    children: Vec<std::process::Child>,
}

impl Netns {
    fn new(name: &str) -> anyhow::Result<Self> {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        for args in [
            vec!["netns", "add", name],
            vec!["-n", name, "link", "set", "lo", "up"],
        ] {
            let out = Command::new("ip").args(&args).output()?;
            anyhow::ensure!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(Self {
            name: name.to_owned(),
            children: Vec::new(),
        })
    }

    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Waits until `path` holds `needle`, for up to 30 s; returns the text.
fn wait_for_text(path: &std::path::Path, needle: &str) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return Ok(text);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{} never said {needle:?}:\n{text}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn readme_three_node_example_runs_as_written() -> anyhow::Result<()> {
    let lines = readme_three_node_lines()?;
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.starts_with("warren-node "))
            .count(),
        4,
        "init, two joins and a restart: {lines:#?}"
    );
    let dir = tempfile::tempdir()?;
    let mut ns = Netns::new(&format!("wrn-readme-{}", std::process::id()))?;
    let mut token = String::new();
    let mut run_line = |ns: &mut Netns, i: usize, line: &str| -> anyhow::Result<String> {
        let line = line.replace("wjt1_...", &token);
        let args: Vec<&str> = line
            .strip_prefix("warren-node ")
            .context("a README line that is not warren-node")?
            .split_whitespace()
            .collect();
        let out = dir.path().join(format!("out{i}.txt"));
        let child = ns
            .command(&bins().node)
            .args(&args)
            .current_dir(dir.path())
            .stdout(std::fs::File::create(&out)?)
            .stderr(std::fs::File::create(
                dir.path().join(format!("err{i}.txt")),
            )?)
            .spawn()?;
        ns.children.push(child);
        let needle = match args[0] {
            "init" => "join token",
            "join" => "Joined cluster",
            _ => "Serving node",
        };
        let text = wait_for_text(&out, needle).map_err(|e| {
            let err = std::fs::read_to_string(dir.path().join(format!("err{i}.txt")));
            anyhow::anyhow!("`{line}`: {e}\n{}", err.unwrap_or_default())
        })?;
        if args[0] == "init" {
            token = text
                .split_whitespace()
                .find(|w| w.starts_with("wjt1_"))
                .context("no join token printed")?
                .to_owned();
        }
        Ok(text)
    };
    let status = |ns: &Netns, admin: &str| -> anyhow::Result<String> {
        let key = std::fs::read_to_string(dir.path().join("d1/admin.key"))?;
        let out = ns
            .command(&bins().warren)
            .args(["admin", "cluster", "status"])
            .env("WARREN_ADDR", format!("https://{admin}"))
            .env("WARREN_CA", dir.path().join("d1/ca.pem"))
            .env("WARREN_API_KEY", key.trim())
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    phase!("init and two joins, as the README has them");
    for (i, line) in lines[..3].iter().enumerate() {
        run_line(&mut ns, i, line)?;
    }
    let table = status(&ns, "127.0.0.1:7443")?;
    for n in ["n1", "n2", "n3"] {
        assert!(table.contains(n), "{n} is a member:\n{table}");
    }
    assert_eq!(table.matches("voter").count(), 3, "{table}");

    phase!("the restart line starts n1 again from its data directory");
    let mut n1 = ns.children.remove(0);
    let term = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(n1.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    n1.wait()?;
    term?;
    run_line(&mut ns, 3, &lines[3])?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match status(&ns, "127.0.0.2:7443") {
            Ok(t) if t.matches("voter").count() == 3 => break,
            other => anyhow::ensure!(Instant::now() < deadline, "after the restart: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

//! The `warren` CLI and the `warren-node` quick start, as a person uses them.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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

    phase!("apply creates everything, referenced kinds first");
    let (ok, out, err) = c.warren(1, &["apply", "-f", f]);
    assert!(ok, "{err}");
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
    let start = |dir: &std::path::Path| -> anyhow::Result<(std::process::Child, String)> {
        let out_path = dir.join("out.txt");
        let child = Command::new(&bins().node)
            .current_dir(dir)
            .stdout(std::fs::File::create(&out_path)?)
            .stderr(Stdio::null())
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
    let (mut child, text) = start(dir.path())?;
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
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    assert!(child.wait()?.success());

    phase!("second start reuses it");
    let (mut child, text) = start(dir.path())?;
    assert!(
        text.contains("was printed when this node was created"),
        "{text}"
    );
    assert!(!text.contains(key.trim()), "the key is printed only once");
    child.kill()?;
    child.wait()?;
    Ok(())
}

//! Bad input of every kind gets a clear error and changes nothing.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use warren_tests::{phase, Cluster, TestNode};

/// Everything the registry holds, to compare before and after a refused request.
async fn snapshot(c: &Cluster, i: usize) -> anyhow::Result<Vec<Value>> {
    let mut all = Vec::new();
    for path in [
        "users",
        "roles",
        "identity-providers",
        "sites",
        "resources",
        "policies",
        "nodes",
        "api-keys",
        "join-tokens",
    ] {
        all.push(c.api(i).get_ok(&format!("/v1/{path}")).await?);
    }
    Ok(all)
}

fn assert_error(
    status: StatusCode,
    body: &Value,
    want_status: u16,
    want_code: &str,
    want_field: Option<&str>,
) {
    assert_eq!(status.as_u16(), want_status, "{body}");
    assert_eq!(body["error"]["code"], want_code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    if let Some(f) = want_field {
        assert_eq!(body["error"]["field"], f, "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors_and_change_nothing() -> anyhow::Result<()> {
    let c = Cluster::start(3).await?;
    let api = c.api(1);
    api.post_ok("/v1/sites", &json!({"name": "hq"})).await?;
    api.post_ok(
        "/v1/users",
        &json!({"name": "alice", "email": "alice@example.com"}),
    )
    .await?;
    let before = snapshot(&c, 0).await?;

    phase!("malformed JSON");
    let (s, v) = api
        .raw(Method::POST, "/v1/users", Some("{\"name\": \"bob\""))
        .await?;
    assert_error(s, &v, 400, "invalid_json", None);
    phase!("exactly one JSON object: no trailing data, no second document, no array");
    for body in [
        "{\"name\": \"x1\"} junk",
        "{\"name\": \"x2\"}{\"name\": \"x3\"}",
        "{\"name\": \"x4\"}\n{\"name\": \"x5\"}",
        "[\"x6\"]",
        "\"x7\"",
        "null",
    ] {
        let (s, v) = api.raw(Method::POST, "/v1/sites", Some(body)).await?;
        assert_error(s, &v, 400, "invalid_json", None);
        let (s, v) = api.raw(Method::PATCH, "/v1/sites/hq", Some(body)).await?;
        assert_error(s, &v, 400, "invalid_json", None);
    }
    phase!("a body not declared as JSON is refused");
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(c.ca())?)?)
        .build()?;
    for content_type in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
    ] {
        let mut req = http
            .post(format!("https://{}/v1/sites", c.nodes[1].admin_addr))
            .bearer_auth(&c.admin_key)
            .body("{\"name\": \"x8\"}");
        if let Some(t) = content_type {
            req = req.header("content-type", t);
        }
        let resp = req.send().await?;
        let s = resp.status();
        let v: Value = resp.json().await?;
        assert_error(s, &v, 400, "invalid_json", None);
    }
    phase!("unknown field");
    let (s, v) = api
        .send(
            Method::POST,
            "/v1/users",
            &json!({"name": "bob", "emial": "b@x.y"}),
        )
        .await?;
    assert_error(s, &v, 400, "invalid_field", Some("emial"));
    phase!("bad value, nested field");
    let (s, v) = api
        .send(
            Method::POST,
            "/v1/resources",
            &json!({"name": "w", "route": {"http": {"domain": "Not A Host"}}, "targets": ["a:1"]}),
        )
        .await?;
    assert_error(s, &v, 400, "invalid_field", Some("route.http.domain"));
    let (s, v) = api
        .send(Method::POST, "/v1/users", &json!({"name": "Bad Name"}))
        .await?;
    assert_error(s, &v, 400, "invalid_field", Some("name"));
    phase!("dangling reference");
    let (s, v) = api
        .send(Method::POST, "/v1/resources", &json!({"name": "db", "site": "nowhere", "route": {"tcp": {"port": 5432}}, "targets": ["10.0.0.1:5432"]}))
        .await?;
    assert_error(s, &v, 400, "unknown_reference", Some("site"));
    let (s, v) = api
        .send(
            Method::POST,
            "/v1/roles",
            &json!({"name": "ops", "members": ["ghost"]}),
        )
        .await?;
    assert_error(s, &v, 400, "unknown_reference", Some("members[0]"));
    phase!("duplicate name and duplicate unique value");
    let (s, v) = api
        .send(Method::POST, "/v1/sites", &json!({"name": "hq"}))
        .await?;
    assert_error(s, &v, 409, "already_exists", Some("name"));
    let (s, v) = api
        .send(
            Method::POST,
            "/v1/users",
            &json!({"name": "alice2", "email": "ALICE@example.com"}),
        )
        .await?;
    assert_error(s, &v, 409, "already_exists", Some("email"));
    phase!("stale revision");
    let (s, v) = api
        .send(
            Method::PATCH,
            "/v1/users/alice",
            &json!({"display_name": "A", "revision": 1}),
        )
        .await?;
    assert_error(s, &v, 409, "revision_conflict", Some("revision"));
    phase!("rename through PATCH, unknown entity, unknown route, wrong method");
    let (s, v) = api
        .send(Method::PATCH, "/v1/users/alice", &json!({"name": "alicia"}))
        .await?;
    assert_error(s, &v, 400, "invalid_field", Some("name"));
    let (s, v) = api.get("/v1/users/nobody").await?;
    assert_error(s, &v, 404, "not_found", None);
    let (s, v) = api.get("/v1/nothing").await?;
    assert_error(s, &v, 404, "not_found", None);
    let (s, v) = api.raw(Method::PUT, "/v1/users", Some("{}")).await?;
    assert_error(s, &v, 405, "method_not_allowed", None);
    phase!("oversized body");
    let big = format!(
        "{{\"name\":\"x\",\"description\":\"{}\"}}",
        "a".repeat(2 << 20)
    );
    let (s, v) = api.raw(Method::POST, "/v1/sites", Some(&big)).await?;
    assert_error(s, &v, 413, "payload_too_large", None);
    phase!("in use");
    api.post_ok("/v1/resources", &json!({"name": "db", "site": "hq", "route": {"tcp": {"port": 5432}}, "targets": ["10.0.0.1:5432"]}))
        .await?;
    let (s, v) = api.raw(Method::DELETE, "/v1/sites/hq", None).await?;
    assert_error(s, &v, 409, "in_use", None);
    api.raw(Method::DELETE, "/v1/resources/db", None).await?;

    phase!("nothing changed, on any node");
    for i in 0..3 {
        let after = snapshot(&c, i).await?;
        // Compare contents; revisions of untouched entities must be equal too.
        assert_eq!(after, before, "node {}", c.nodes[i].name);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_read_only_and_revoked_keys() -> anyhow::Result<()> {
    let c = Cluster::start(3).await?;
    let (s, v) = c.api_with_key(0, "not-a-key").get("/v1/users").await?;
    assert_error(s, &v, 401, "unauthorized", None);
    let forged = "wrn_0123456789abcdef_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    let (s, v) = c
        .api_with_key(0, forged)
        .send(Method::POST, "/v1/sites", &json!({"name": "x"}))
        .await?;
    assert_error(s, &v, 401, "unauthorized", None);
    let (s, v) = c.api_with_key(0, "").get("/v1/cluster").await?;
    assert_error(s, &v, 401, "unauthorized", None);

    phase!("a read-only key reads but may not write");
    let created = c
        .api(0)
        .post_ok(
            "/v1/api-keys",
            &json!({"name": "viewer", "scope": "read_only"}),
        )
        .await?;
    let viewer = created["key"].as_str().unwrap().to_owned();
    assert!(
        !created["api_key"].to_string().contains(&viewer[21..]),
        "the listing shows the secret"
    );
    c.api_with_key(2, &viewer).get_ok("/v1/users").await?;
    let (s, v) = c
        .api_with_key(2, &viewer)
        .send(Method::POST, "/v1/sites", &json!({"name": "x"}))
        .await?;
    assert_error(s, &v, 403, "forbidden", None);

    phase!("a key created on n1 works on n3 at once; revoked on n2 it fails on n3 at once");
    let created = c
        .api(0)
        .post_ok("/v1/api-keys", &json!({"name": "ops"}))
        .await?;
    let ops = created["key"].as_str().unwrap().to_owned();
    c.api_with_key(2, &ops)
        .post_ok("/v1/sites", &json!({"name": "by-ops"}))
        .await?;
    let (s, _) = c
        .api(1)
        .raw(Method::DELETE, "/v1/api-keys/ops", None)
        .await?;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = c.api_with_key(2, &ops).get("/v1/users").await?;
    assert_error(s, &v, 401, "unauthorized", None);
    let (s, v) = c
        .api_with_key(2, &ops)
        .send(Method::POST, "/v1/sites", &json!({"name": "late"}))
        .await?;
    assert_error(s, &v, 401, "unauthorized", None);
    assert!(!c
        .api(0)
        .names("/v1/sites")
        .await?
        .contains(&"late".to_owned()));
    phase!("the last admin key cannot be revoked");
    let (s, v) = c
        .api(0)
        .raw(Method::DELETE, "/v1/api-keys/bootstrap", None)
        .await?;
    assert_error(s, &v, 409, "conflict", None);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_join_tokens_and_foreign_data_dirs_are_refused() -> anyhow::Result<()> {
    let mut a = Cluster::start(3).await?;
    let nodes_before = a.api(0).get_ok("/v1/nodes").await?;

    phase!("a corrupt join token");
    let mut x = TestNode::new(a.tmp.path(), "x1", &[]);
    let mut corrupt = a.join_token.clone();
    corrupt.truncate(corrupt.len() - 5);
    let err = x.join_expect_failure(&a.nodes[0].cluster_addr, &corrupt)?;
    assert!(
        err.contains("--token") && err.contains("malformed"),
        "{err}"
    );
    assert!(!x.dir.exists(), "a refused join left a data directory");

    phase!("a token of another cluster");
    let mut b = Cluster::start(1).await?;
    let err = x.join_expect_failure(&a.nodes[0].cluster_addr, &b.join_token)?;
    assert!(
        err.contains("not part of the cluster this join token belongs to"),
        "{err}"
    );
    phase!("a well-formed token of this cluster with a wrong secret");
    // Change one character inside the secret (the token ends with it).
    let mut chars: Vec<char> = a.join_token.chars().collect();
    let i = chars.len() - 10;
    chars[i] = if chars[i] == 'A' { 'B' } else { 'A' };
    let forged: String = chars.into_iter().collect();
    let err = x.join_expect_failure(&a.nodes[1].cluster_addr, &forged)?;
    assert!(err.contains("unknown or revoked"), "{err}");
    assert_eq!(a.api(0).get_ok("/v1/nodes").await?, nodes_before);

    phase!("join into a data dir that already holds a node of another cluster");
    let mut intruder = TestNode::new(a.tmp.path(), "intruder", &[]);
    intruder.dir = b.nodes[0].dir.clone();
    let err = intruder.join_expect_failure(&a.nodes[0].cluster_addr, &a.join_token)?;
    assert!(
        err.contains("already holds node \"n1\"") && err.contains(&b.cluster_id_hex()?),
        "{err}"
    );

    phase!("a node of cluster B started at the address of A's n3");
    let b_dir = b.nodes[0].dir.clone();
    b.nodes[0].kill9();
    a.nodes[2].kill9();
    let mut b_at_a3 = TestNode::new(a.tmp.path(), "n3", &[]);
    b_at_a3.cluster_addr = a.nodes[2].cluster_addr.clone();
    b_at_a3.admin_addr = a.nodes[2].admin_addr.clone();
    b_at_a3.dir = a.tmp.path().join("b-at-a3");
    let (b_key, _) = b_at_a3.init()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let reason = loop {
        let s = a.api(0).get_ok("/v1/cluster").await?;
        let n3 = s["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "n3")
            .unwrap()
            .clone();
        if let Some(e) = n3["error"]
            .as_str()
            .filter(|e| e.contains("another cluster") || e.contains("refused"))
        {
            break e.to_owned();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no clear reachability error for n3: {n3}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    phase!("A sees: {reason}");
    a.api(0)
        .post_ok("/v1/sites", &json!({"name": "still-writable"}))
        .await?;
    let b_api = warren_tests::Api::new(&a.nodes[2].admin_addr, &b_key, &b_at_a3.dir.join("ca.pem"));
    assert!(
        b_api.names("/v1/sites").await?.is_empty(),
        "cluster A's data reached cluster B"
    );
    assert_eq!(b_api.names("/v1/nodes").await?, vec!["n3".to_owned()]);
    b_at_a3.kill9();
    drop(b_dir);

    phase!("A's own n3 comes back and catches up");
    a.nodes[2].run()?;
    a.api(2).wait_healthy(Duration::from_secs(30)).await?;
    assert!(a
        .api(2)
        .names("/v1/sites")
        .await?
        .contains(&"still-writable".to_owned()));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_quorum_writes_and_reads_get_503_and_status_still_answers() -> anyhow::Result<()> {
    let mut c = Cluster::start_with_env(3, &[("WARREN_REQUEST_TIMEOUT_MS", "2000")]).await?;
    c.api(0)
        .post_ok("/v1/sites", &json!({"name": "before"}))
        .await?;
    phase!("SIGKILL two of three");
    c.nodes[1].kill9();
    c.nodes[2].kill9();
    let (s, v) = c
        .api(0)
        .send(Method::POST, "/v1/sites", &json!({"name": "lost"}))
        .await?;
    assert_error(s, &v, 503, "no_quorum", None);
    // A leader that proposed the write before it timed out says its outcome is unknown (it
    // may commit once a quorum is back); one that had no leader to send it to refused it.
    let outcome_unknown = v["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .contains("may or may not");
    let (s, v) = c.api(0).get("/v1/sites").await?;
    assert_error(s, &v, 503, "no_quorum", None);
    let status = c.api(0).get_ok("/v1/cluster").await?;
    let unreachable = status["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["reachable"] == false)
        .count();
    assert_eq!(unreachable, 2, "{status}");
    phase!("a node without a leader reports itself unhealthy once the bound passes");
    phase!("restart one: the quorum is back, the refused write did not happen");
    c.nodes[1].run()?;
    c.api(0).wait_healthy(Duration::from_secs(30)).await?;
    let sites = c.api(0).names("/v1/sites").await?;
    if outcome_unknown {
        assert!(
            sites == ["before"] || sites == ["before", "lost"],
            "{sites:?}"
        );
    } else {
        assert_eq!(sites, vec!["before".to_owned()], "a refused write happened");
    }
    Ok(())
}

//! Admin API routes and handlers.

use std::collections::HashMap;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use warren_consensus::registry::{
    ApiKeyRecord, Command, JoinTokenRecord, Outcome, Registry, RegistryError, Table,
};
use warren_consensus::types::{Actor, ClusterNode, Request, RequestId};
use warren_proto::api::CertificateView;
use warren_proto::api::{
    AddMember, ApiKeyView, ApplyRequest, CreateApiKey, CreateJoinToken, CreatedApiKey,
    CreatedJoinToken, ErrorCode, Health, IdentityProviderView, JoinTokenView, List, MemberRole,
    NodeView, UpdateNode,
};
use warren_proto::certificate::Certificate;
use warren_proto::registry::{
    AccessMethods, DeviceView, IdentityProvider, Kind, Node, NodeRole, Policy, Resource, Role,
    Site, User,
};
use warren_proto::session::{SessionId, SessionView, ShareLink, ShareLinkView};
use warren_proto::token::{ApiKey, JoinToken, KeyId};
use warren_proto::Name;

use super::{
    auth_local, auth_read, auth_write, path_name, read_json, read_optional_json, AdminState,
    ApiErr, MAX_APPLY_BODY, MAX_BODY,
};
use crate::actors::MemberOp;

/// The admin API router.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .merge(entity_routes::<User>())
        .merge(entity_routes::<Role>())
        .merge(entity_routes::<IdentityProvider>())
        .merge(entity_routes::<Site>())
        .merge(entity_routes::<Resource>())
        .merge(entity_routes::<Policy>())
        .merge(entity_routes::<Certificate>())
        .route("/v1/sessions", get(list_sessions))
        .route("/v1/signing-keys/rotate", post(rotate_signing_key))
        .route("/metrics", get(metrics))
        .route("/v1/resources/{name}/share-links", post(create_share_link))
        .route("/v1/sites/{name}/tokens", post(create_site_token))
        .route("/v1/sites/{name}/status", get(site_status))
        .route("/v1/users/{name}/identities", get(user_identities))
        .route("/v1/share-links", get(list_share_links))
        .route(
            "/v1/share-links/{id}",
            axum::routing::delete(revoke_share_link),
        )
        .route("/v1/sessions/{id}", axum::routing::delete(revoke_session))
        .route("/v1/nodes", get(list_nodes).post(create_node))
        .route(
            "/v1/nodes/{name}",
            get(get_node).patch(update_node).delete(delete_node),
        )
        .route("/v1/api-keys", get(list_api_keys).post(create_api_key))
        .route(
            "/v1/api-keys/{name}",
            get(get_api_key).delete(revoke_api_key),
        )
        .route(
            "/v1/join-tokens",
            get(list_join_tokens).post(create_join_token),
        )
        .route(
            "/v1/join-tokens/{id}",
            axum::routing::delete(revoke_join_token),
        )
        .route("/v1/cluster", get(cluster_status))
        .route("/v1/cluster/members", post(add_member))
        .route("/v1/cluster/title", get(get_title).put(set_title))
        .route("/v1/cluster/members/{name}/promote", post(promote_member))
        .route(
            "/v1/cluster/members/{name}",
            axum::routing::delete(remove_member),
        )
        .route("/v1/apply", post(apply))
        .merge(super::client::routes())
        .route("/v1/devices", get(list_devices).post(create_device))
        .route(
            "/v1/devices/{name}",
            get(get_device)
                .delete(delete_device)
                .patch(create_device)
                .put(create_device),
        )
        .merge(format_next_routes())
        .fallback(|| async {
            ApiErr::new(
                ErrorCode::NotFound,
                "no such route; the API lives under /v1",
            )
        })
        .method_not_allowed_fallback(|| async {
            ApiErr::new(
                ErrorCode::MethodNotAllowed,
                "this route does not take that method",
            )
        })
        .layer(axum::middleware::from_fn(json_bodies_only))
        .with_state(state)
}

/// Refuses a request that carries a body not declared as JSON (`Content-Type:
/// application/json` or `application/<x>+json`): what is not JSON is not guessed at.
async fn json_bodies_only(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let headers = req.headers();
    let has_body = headers.contains_key(axum::http::header::TRANSFER_ENCODING)
        || headers
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() != "0")
        || !axum::body::HttpBody::is_end_stream(req.body());
    if has_body {
        let json = headers
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase()
            })
            .is_some_and(|m| {
                m == "application/json" || (m.starts_with("application/") && m.ends_with("+json"))
            });
        if !json {
            return ApiErr::new(
                ErrorCode::InvalidJson,
                "a request body must be JSON, sent with `Content-Type: application/json`",
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// How a declarative entity appears in the API.
pub trait ApiEntity: Table {
    /// What the API returns for it.
    type View: Serialize + Send;
    /// Its view.
    fn view(&self) -> Self::View;
    /// Unwraps from an [`warren_consensus::registry::AnyEntity`].
    fn from_any(any: warren_consensus::registry::AnyEntity) -> Option<Self>;
    /// Checks only the node can make and changes only it can do (hashing credentials),
    /// before the write; `current` is the stored version, if any. The registry checks the
    /// rest.
    fn prepare(&mut self, _current: Option<&Self>) -> Result<(), ApiErr> {
        Ok(())
    }
    /// Mistakes this node can see before the write: an error where it is certain the
    /// entity cannot work, warnings (returned with the answer) where it only may not.
    fn check(
        &self,
        _s: &AdminState,
    ) -> impl std::future::Future<Output = Result<Vec<String>, ApiErr>> + Send {
        async { Ok(Vec::new()) }
    }
}

macro_rules! plain_view {
    ($ty:ty, $variant:ident) => {
        impl ApiEntity for $ty {
            type View = $ty;
            fn view(&self) -> Self::View {
                self.clone()
            }
            fn from_any(any: warren_consensus::registry::AnyEntity) -> Option<Self> {
                match any {
                    warren_consensus::registry::AnyEntity::$variant(e) => Some(e),
                    _ => None,
                }
            }
        }
    };
}

plain_view!(User, User);
plain_view!(Role, Role);
plain_view!(Site, Site);

impl ApiEntity for Resource {
    type View = Resource;
    fn view(&self) -> Self::View {
        let mut r = self.clone();
        let a = &mut r.http.access;
        for h in [&mut a.pin_hash, &mut a.passcode_hash] {
            if h.is_some() {
                *h = Some(AccessMethods::HIDDEN.to_owned());
            }
        }
        r
    }
    fn from_any(any: warren_consensus::registry::AnyEntity) -> Option<Self> {
        match any {
            warren_consensus::registry::AnyEntity::Resource(e) => Some(e),
            _ => None,
        }
    }
    async fn check(&self, s: &AdminState) -> Result<Vec<String>, ApiErr> {
        resource_problems(self, s)
    }
    fn prepare(&mut self, current: Option<&Self>) -> Result<(), ApiErr> {
        let current = current.map(|c| &c.http.access);
        let a = &mut self.http.access;
        let pin = a.pin.take();
        prepare_credential(
            pin,
            &mut a.pin_hash,
            current.and_then(|c| c.pin_hash.as_deref()),
            "http.access.pin",
            |p| (4..=12).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()),
            "a PIN is 4 to 12 digits",
        )?;
        let passcode = a.passcode.take();
        prepare_credential(
            passcode,
            &mut a.passcode_hash,
            current.and_then(|c| c.passcode_hash.as_deref()),
            "http.access.passcode",
            |p| (8..=128).contains(&p.chars().count()) && !p.chars().any(char::is_control),
            "a passcode is 8 to 128 characters",
        )
    }
}

/// Hashes a credential given in clear, or keeps the stored hash where the client sent back
/// `<hidden>` (what it read) or the stored hash itself. A hash the cluster did not make is
/// refused: it could only come from outside.
fn prepare_credential(
    clear: Option<warren_proto::Secret>,
    hash: &mut Option<String>,
    stored: Option<&str>,
    field: &str,
    ok: impl Fn(&str) -> bool,
    expected: &str,
) -> Result<(), ApiErr> {
    if let Some(clear) = clear {
        if !ok(clear.expose()) {
            return Err(ApiErr::new(ErrorCode::InvalidField, expected).field(field));
        }
        *hash = Some(crate::proxy::credential::hash(clear.expose()));
        return Ok(());
    }
    match hash.as_deref() {
        None => Ok(()),
        Some(h) if h == AccessMethods::HIDDEN || Some(h) == stored => {
            *hash = stored.map(str::to_owned);
            if hash.is_none() {
                return Err(ApiErr::new(
                    ErrorCode::InvalidField,
                    "nothing is stored to keep; give the value in clear",
                )
                .field(format!("{field}_hash")));
            }
            Ok(())
        }
        Some(_) => Err(ApiErr::new(
            ErrorCode::InvalidField,
            "set the value in clear (it is hashed by the cluster), not its hash",
        )
        .field(format!("{field}_hash"))),
    }
}
plain_view!(Policy, Policy);

impl ApiEntity for IdentityProvider {
    type View = IdentityProviderView;
    fn view(&self) -> Self::View {
        IdentityProviderView::from(self)
    }
    async fn check(&self, _s: &AdminState) -> Result<Vec<String>, ApiErr> {
        Ok(discovery_problem(&self.issuer).await.into_iter().collect())
    }
    fn from_any(any: warren_consensus::registry::AnyEntity) -> Option<Self> {
        match any {
            warren_consensus::registry::AnyEntity::IdentityProvider(e) => Some(e),
            _ => None,
        }
    }
}

impl ApiEntity for Certificate {
    type View = CertificateView;
    fn view(&self) -> Self::View {
        CertificateView::from(self)
    }
    fn from_any(any: warren_consensus::registry::AnyEntity) -> Option<Self> {
        match any {
            warren_consensus::registry::AnyEntity::Certificate(e) => Some(e),
            _ => None,
        }
    }
    fn prepare(&mut self, current: Option<&Self>) -> Result<(), ApiErr> {
        if current.is_none() && self.name.as_str().starts_with("acme.") {
            return Err(ApiErr::new(
                ErrorCode::InvalidField,
                "names starting with \"acme.\" are kept for the certificates the cluster orders; pick another name",
            )
            .field("name"));
        }
        // The registry checks the PEM; only the node has the crypto to check the key
        // belongs to the certificate.
        let (Ok(chain), Ok(key)) = (self.chain(), self.key()) else {
            return Ok(());
        };
        rustls::sign::CertifiedKey::from_der(chain, key, &rustls::crypto::ring::default_provider())
            .map(|_| ())
            .map_err(|e| {
                ApiErr::new(
                    ErrorCode::InvalidField,
                    format!("the key does not fit the certificate: {e}"),
                )
                .field("key_pem")
            })
    }
}

/// What is wrong with a resource that the registry cannot know: a port this node itself
/// listens on (an error), another node's ports or a program already on the port here,
/// and a resource that lets nobody in (warnings).
fn resource_problems(r: &Resource, s: &AdminState) -> Result<Vec<String>, ApiErr> {
    use warren_proto::registry::Route;
    let mut warnings = Vec::new();
    let (port, udp) = match &r.route {
        Route::Tcp { port } => (Some(*port), false),
        Route::Udp { port } => (Some(*port), true),
        _ => (None, false),
    };
    if let Some(port) = port {
        let proto = if udp { "UDP" } else { "TCP" };
        if let Some(what) = s.inner.own.taken(port, udp) {
            return Err(ApiErr::new(
                ErrorCode::InvalidField,
                format!("{proto} port {port} is {what}: a resource cannot listen there; pick another port"),
            )
            .field("route"));
        }
        let reg = s.cluster().registry();
        for n in reg.nodes().values() {
            let theirs = if udp { &n.cluster_addr } else { &n.admin_addr };
            if theirs
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok())
                == Some(port)
            {
                warnings.push(format!(
                    "{proto} port {port} is node {}'s {} ({theirs}); if its --l4-addr is the same address, the resource cannot listen there",
                    n.name.as_str(),
                    if udp { "cluster address" } else { "admin API" }
                ));
            }
        }
        let ours = reg
            .resources()
            .get(&r.name)
            .is_some_and(|cur| cur.route == r.route);
        let addr = std::net::SocketAddr::new(s.inner.own.l4_ip, port);
        let busy = if udp {
            std::net::UdpSocket::bind(addr).is_err()
        } else {
            std::net::TcpListener::bind(addr).is_err()
        };
        if busy && !ours {
            warnings.push(format!(
                "{proto} {addr} is in use on node {} by another program: the resource will not be served there until it is free",
                s.inner.node_name.as_str()
            ));
        }
    }
    let public = matches!(r.route, Route::Http { .. }) && r.http.public;
    if r.policies.is_empty() && !public && !matches!(r.route, Route::Private { .. }) {
        warnings.push(
            "no policy: nobody may use this resource (deny by default); add one with --policy"
                .into(),
        );
    }
    Ok(warnings)
}

/// Why OpenID discovery at `issuer` fails from this node, if it does.
async fn discovery_problem(issuer: &str) -> Option<String> {
    let url = format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    );
    let client = openidconnect::reqwest::Client::builder()
        .redirect(openidconnect::reqwest::redirect::Policy::none())
        .timeout(std::time::Duration::from_secs(5))
        .build()
        .ok()?;
    let problem = match client.get(&url).send().await {
        Err(e) => format!("cannot reach it: {e}"),
        Ok(resp) if !resp.status().is_success() => format!("it answered {}", resp.status()),
        Ok(resp) => match resp
            .bytes()
            .await
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<Value>(&b).map_err(|e| e.to_string()))
        {
            Err(e) => format!("the answer is not JSON: {e}"),
            Ok(v) => match v.get("issuer").and_then(Value::as_str) {
                Some(i) if i.trim_end_matches('/') == issuer.trim_end_matches('/') => return None,
                Some(i) => format!("it names another issuer, {i:?}"),
                None => "the answer has no issuer".into(),
            },
        },
    };
    Some(format!(
        "OpenID discovery at {url} failed from node ({problem}): sign-in with this provider will fail until it works"
    ))
}

/// The body of a request that makes something that expires.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ExpiresIn {
    /// Seconds until it stops working (default one day).
    #[serde(default = "default_share_ttl")]
    expires_in_s: u64,
}

/// Reads an [`ExpiresIn`] body and checks it is 60 seconds to `max_days` days.
async fn read_expiry(body: Body, max_days: u64) -> Result<u64, ApiErr> {
    let req: ExpiresIn = read_json(body, MAX_BODY).await?;
    if !(60..=max_days * 86_400).contains(&req.expires_in_s) {
        return Err(ApiErr::new(
            ErrorCode::InvalidField,
            format!("expected 60 seconds to {max_days} days"),
        )
        .field("expires_in_s"));
    }
    Ok(req.expires_in_s)
}

fn default_share_ttl() -> u64 {
    86_400
}

async fn create_site_token(
    State(s): State<AdminState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<Value>), ApiErr> {
    let key = auth_write(&s, &headers).await?;
    let name = path_name(Kind::Site, &name)?;
    let expires_in_s = read_expiry(body, 30).await?;
    let token = warren_proto::token::SiteToken::generate(
        s.inner.cluster_id,
        s.inner.ca.fingerprint(),
        &mut rand::rngs::OsRng,
    );
    let now = crate::proxy::unix_now();
    let record = warren_consensus::registry::SiteTokenRecord {
        id: token.token_id,
        site: name.clone(),
        hash: token.hash(),
        created_at: now,
        expires_at: now + expires_in_s,
    };
    submit(&s, key, &headers, Command::CreateSiteToken(record)).await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "site": name,
            "token": token.reveal(),
            "expires_at": now + expires_in_s,
        })),
    ))
}

/// The provider accounts linked to a user (provider and subject): who a sign-in finds.
async fn user_identities(
    State(s): State<AdminState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiErr> {
    let reg = auth_read(&s, &headers).await?;
    let name = path_name(Kind::User, &name)?;
    if !reg.users().contains_key(&name) {
        return Err(ApiErr::not_found(Kind::User, name.as_str()));
    }
    let items: Vec<Value> = reg
        .identities()
        .iter()
        .filter(|(_, u)| **u == name)
        .map(|(id, _)| json!({"idp": id.idp, "subject": id.subject}))
        .collect();
    Ok(Json(json!({ "user": name, "items": items })))
}

async fn site_status(
    State(s): State<AdminState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiErr> {
    let reg = auth_read(&s, &headers).await?;
    let name = path_name(Kind::Site, &name)?;
    if !reg.sites().contains_key(&name) {
        return Err(ApiErr::not_found(Kind::Site, name.as_str()));
    }
    let sites = s.inner.proxy.sites();
    let here = sites.held().contains(&name);
    let mut nodes: Vec<String> = sites
        .holders(&name)
        .into_iter()
        .map(|id| {
            reg.node_by_id(id)
                .map_or_else(|| format!("node {}", id.0), |n| n.name.to_string())
        })
        .collect();
    if here {
        nodes.insert(0, s.inner.node_name.to_string());
    }
    nodes.dedup();
    let (agents, last_seen) = sites.agents(&name);
    let agents: Vec<Value> = agents
        .iter()
        .map(|a| {
            json!({
                "address": a.remote.to_string(),
                "version": a.software,
                "connected_at": a.since,
                "node": s.inner.node_name.as_str(),
            })
        })
        .collect();
    Ok(Json(json!({
        "site": name,
        "connected": sites.connected(&name),
        "tunnel_here": here,
        "nodes": nodes,
        "agents": agents,
        // This node's view: now while an agent is connected here, else when one left.
        "last_seen": if here { Some(crate::proxy::unix_now()) } else { last_seen },
    })))
}

async fn create_share_link(
    State(s): State<AdminState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<Value>), ApiErr> {
    let key = auth_write(&s, &headers).await?;
    let name = path_name(Kind::Resource, &name)?;
    let expires_in_s = read_expiry(body, 90).await?;
    let reg = s.cluster().read().await?;
    let res = reg
        .resources()
        .get(&name)
        .cloned()
        .ok_or_else(|| ApiErr::not_found(Kind::Resource, name.as_str()))?;
    let warren_proto::registry::Route::Http {
        domain,
        path_prefix,
    } = &res.route
    else {
        return Err(ApiErr::new(
            ErrorCode::InvalidField,
            "share links open web resources only",
        )
        .field("route"));
    };
    let mut secret = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut secret);
    let id: u64 = rand::random();
    let now = crate::proxy::unix_now();
    let link = ShareLink {
        id,
        resource: name.clone(),
        hash: warren_proto::token::SecretHash::of(&secret),
        created_at: now,
        expires_at: now + expires_in_s,
    };
    submit(&s, key, &headers, Command::CreateShareLink(link.clone())).await?;
    let token = warren_proto::token::share_token(id, &secret);
    let port = s.inner.proxy.public_https_port();
    let url = (!domain.starts_with("*.")).then(|| {
        format!(
            "https://{}{}/.warren/share?t={token}",
            crate::proxy::authority_with_port(domain, port),
            path_prefix.as_deref().unwrap_or("").trim_end_matches('/'),
        )
    });
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "share_link": ShareLinkView::from(&link),
            "token": token,
            "url": url,
        })),
    ))
}

async fn list_share_links(
    State(s): State<AdminState>,
    headers: HeaderMap,
) -> Result<Json<List<ShareLinkView>>, ApiErr> {
    let reg = auth_read(&s, &headers).await?;
    Ok(Json(List {
        items: reg
            .share_links()
            .values()
            .map(ShareLinkView::from)
            .collect(),
    }))
}

async fn revoke_share_link(
    State(s): State<AdminState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiErr> {
    let key = auth_write(&s, &headers).await?;
    let id = (id.len() == 16)
        .then(|| u64::from_str_radix(&id, 16).ok())
        .flatten()
        .ok_or_else(|| {
            ApiErr::new(
                ErrorCode::InvalidField,
                "a share link id is 16 hexadecimal digits",
            )
            .field("id")
        })?;
    submit(&s, key, &headers, Command::RevokeShareLink { id }).await?;
    Ok(Json(
        json!({ "revoked": { "kind": "share link", "id": format!("{id:016x}") } }),
    ))
}

async fn rotate_signing_key(
    State(s): State<AdminState>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiErr> {
    let key = auth_write(&s, &headers).await?;
    let new = crate::proxy::sign::Signer::generate(crate::proxy::unix_now());
    let kid = new.kid.clone();
    submit(&s, key, &headers, Command::RotateSigningKey(new)).await?;
    Ok(Json(json!({ "rotated": { "kid": kid } })))
}

/// Routes that exist only in `format-next` builds (rolling-upgrade tests): `POST
/// /v1/test/annotate` with `{"note": "..."}` writes [`Command::Annotate`], which the leader
/// refuses (409, naming the node that lags) until every member reads its format.
#[cfg(feature = "format-next")]
fn format_next_routes() -> Router<AdminState> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Annotate {
        note: String,
    }
    async fn annotate(
        State(s): State<AdminState>,
        headers: HeaderMap,
        body: Body,
    ) -> Result<Json<Value>, ApiErr> {
        let key = auth_write(&s, &headers).await?;
        let Annotate { note } = read_json(body, MAX_BODY).await?;
        submit(&s, key, &headers, Command::Annotate { note }).await?;
        Ok(Json(json!({ "annotated": true })))
    }
    Router::new().route("/v1/test/annotate", post(annotate))
}

/// No extra routes in a normal build.
#[cfg(not(feature = "format-next"))]
fn format_next_routes() -> Router<AdminState> {
    Router::new()
}

async fn metrics(
    State(s): State<AdminState>,
    headers: HeaderMap,
) -> Result<(HeaderMap, String), ApiErr> {
    // This node's own counters: no read barrier, so a scrape costs the leader nothing.
    auth_local(&s, &headers)?;
    let mut h = HeaderMap::new();
    h.insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    let mut text = s.inner.proxy.metrics.render();
    text.push_str(&s.inner.connections.render("admin", "Admin API"));
    text.push_str(&s.inner.proxy.connections.render("proxy", "HTTPS proxy"));
    text.push_str(&crate::miss::render(s.cluster()));
    text.push_str(&s.inner.tree.load().render());
    render_cluster_metrics(&s, &mut text);
    s.inner.proxy.sites().render_stats(&mut text);
    s.inner.proxy.l4_flows.render(&mut text);
    if let Some(access) = s.inner.proxy.sites().access() {
        access.relay.render(&mut text);
        access.devices.render(&mut text);
        access.coordinator.render(&mut text);
    }
    Ok((h, text))
}

/// Raft as this node sees it, the sites it holds tunnels to, and certificate expiry: all
/// from local state (a node cut off from the leader still answers).
fn render_cluster_metrics(s: &AdminState, out: &mut String) {
    use std::fmt::Write as _;
    let m = s.cluster().raft().metrics().borrow().clone();
    let gauge = |out: &mut String, name: &str, help: &str, v: u64| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
    };
    gauge(
        out,
        "warren_raft_term",
        "Current Raft term.",
        m.current_term,
    );
    gauge(
        out,
        "warren_raft_leader_id",
        "Node id of the leader this node knows (0: none).",
        m.current_leader.map_or(0, |l| l.0),
    );
    gauge(
        out,
        "warren_raft_is_leader",
        "1 if this node is the leader.",
        u64::from(m.current_leader == Some(m.id)),
    );
    let _ = writeln!(
        out,
        "# HELP warren_raft_leader_changes_total Leaders this node saw take office (a new leader, or the same in a new term) since it started.\n# TYPE warren_raft_leader_changes_total counter\nwarren_raft_leader_changes_total {}",
        s.cluster().leader_changes()
    );
    gauge(
        out,
        "warren_raft_last_log_index",
        "Index of the last entry in this node's log.",
        m.last_log_index.unwrap_or(0),
    );
    gauge(
        out,
        "warren_raft_applied_index",
        "Index of the last entry this node applied to its registry.",
        m.last_applied.map_or(0, |l| l.index),
    );
    gauge(
        out,
        "warren_raft_snapshot_index",
        "Index of this node's last snapshot.",
        m.snapshot.map_or(0, |l| l.index),
    );
    let sites = s.inner.proxy.sites();
    let held = sites.held();
    gauge(
        out,
        "warren_sites_tunnels_here",
        "Sites with an agent tunnel to this node.",
        held.len() as u64,
    );
    let agents: usize = held.iter().map(|site| sites.agents(site).0.len()).sum();
    gauge(
        out,
        "warren_site_agents_connected",
        "Agent tunnels to this node.",
        agents as u64,
    );
    let reg = s.cluster().registry();
    let now = crate::proxy::unix_now() as i64;
    let _ = writeln!(
        out,
        "# HELP warren_certificate_expiry_seconds Seconds until the certificate expires (negative: expired).\n# TYPE warren_certificate_expiry_seconds gauge"
    );
    for c in reg.certificates().values() {
        if let Ok(info) = c.info() {
            let _ = writeln!(
                out,
                "warren_certificate_expiry_seconds{{name=\"{}\"}} {}",
                c.name.as_str(),
                info.not_after - now
            );
        }
    }
}

async fn list_sessions(
    State(s): State<AdminState>,
    headers: HeaderMap,
) -> Result<Json<List<SessionView>>, ApiErr> {
    let reg = auth_read(&s, &headers).await?;
    let now = crate::proxy::unix_now();
    Ok(Json(List {
        items: reg
            .sessions()
            .values()
            .filter(|x| x.expires_at > now)
            .map(SessionView::from)
            .collect(),
    }))
}

async fn revoke_session(
    State(s): State<AdminState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiErr> {
    let key = auth_write(&s, &headers).await?;
    let Some(id) = SessionId::parse(&id) else {
        return Err(ApiErr::new(
            ErrorCode::InvalidField,
            "a session id is 32 hexadecimal digits",
        )
        .field("id"));
    };
    submit(&s, key, &headers, Command::RevokeSession { id }).await?;
    Ok(Json(
        json!({ "revoked": { "kind": "session", "id": id.to_string() } }),
    ))
}

fn entity_routes<E: ApiEntity>() -> Router<AdminState> {
    let base = format!("/v1/{}", E::KIND.path());
    let one = format!("{base}/{{name}}");
    Router::new()
        .route(&base, get(list::<E>).post(create::<E>))
        .route(
            &one,
            get(get_one::<E>).patch(update::<E>).delete(delete::<E>),
        )
}

/// Submits a write as the holder of `key`. An `Idempotency-Key` header makes a retried
/// request apply once.
async fn submit(
    state: &AdminState,
    key: KeyId,
    headers: &HeaderMap,
    command: Command,
) -> Result<Outcome, ApiErr> {
    let mut req = Request::new(Actor::ApiKey(key), command);
    if let Some(idem) = headers.get("idempotency-key") {
        let mut h = Sha256::new();
        h.update(key.0.to_be_bytes());
        h.update(idem.as_bytes());
        let digest = h.finalize();
        let mut id = [0u8; 16];
        id.copy_from_slice(&digest[..16]);
        req.id = RequestId(u128::from_be_bytes(id));
    }
    let reply = state.cluster().write(req).await?;
    Ok(reply?)
}

fn unexpected(outcome: &Outcome) -> ApiErr {
    tracing::error!("unexpected registry outcome: {outcome:?}");
    ApiErr::new(ErrorCode::Internal, "the registry answered unexpectedly")
}

async fn health(State(s): State<AdminState>) -> (StatusCode, Json<Health>) {
    let c = s.cluster();
    let reg = c.registry();
    let leader = c
        .leader()
        .and_then(|id| reg.node_by_id(id))
        .map(|n| n.name.clone());
    let contact = c.leader_contact().map(|d| d.as_millis() as u64);
    // The node's one serving state (what the proxy grants by), then the tree: a part that
    // is down (its actor failed and is restarting) makes the node unhealthy too.
    let serving = s
        .inner
        .serving
        .check()
        .map_err(|why| why.to_string())
        .and_then(|()| s.inner.tree.load().check());
    let status = if serving.is_ok() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = Health {
        ok: serving.is_ok(),
        node: s.inner.node_name.clone(),
        leader,
        leader_contact_ms: contact,
        reason: serving.err(),
    };
    (status, Json(body))
}

async fn list<E: ApiEntity>(
    State(s): State<AdminState>,
    headers: HeaderMap,
) -> Result<Json<List<E::View>>, ApiErr> {
    let reg = auth_read(&s, &headers).await?;
    Ok(Json(List {
        items: E::table(&reg).values().map(E::view).collect(),
    }))
}

async fn get_one<E: ApiEntity>(
    State(s): State<AdminState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Json<E::View>, ApiErr> {
    let reg = auth_read(&s, &headers).await?;
    let name = path_name(E::KIND, &name)?;
    found_or_404(E::KIND, &name, E::table(&reg).get(&name), E::view)
}

async fn create<E: ApiEntity>(
    State(s): State<AdminState>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<Value>), ApiErr> {
    let key = auth_write(&s, &headers).await?;
    let mut entity: E = read_json(body, MAX_BODY).await?;
    entity.prepare(None)?;
    let warnings = entity.check(&s).await?;
    let outcome = submit(&s, key, &headers, Command::Create(entity.wrap())).await?;
    match outcome {
        Outcome::Entity(any) => E::from_any(any)
            .map(|e| (StatusCode::CREATED, Json(with_warnings(e.view(), warnings))))
            .ok_or_else(|| {
                ApiErr::new(
                    ErrorCode::Internal,
                    "the registry answered with another kind",
                )
            }),
        other => Err(unexpected(&other)),
    }
}

/// The entity's view, with `warnings` beside its fields when there are any.
fn with_warnings(view: impl Serialize, warnings: Vec<String>) -> Value {
    let mut v = serde_json::to_value(view).unwrap_or(Value::Null);
    if let (false, Value::Object(m)) = (warnings.is_empty(), &mut v) {
        m.insert("warnings".into(), json!(warnings));
    }
    v
}

/// RFC 7396 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    if let Value::Object(p) = patch {
        if !target.is_object() {
            *target = Value::Object(serde_json::Map::new());
        }
        let t = target.as_object_mut().expect("made an object above");
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    } else {
        *target = patch.clone();
    }
}

async fn update<E: ApiEntity>(
    State(s): State<AdminState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiErr> {
    let key = auth_write(&s, &headers).await?;
    let name = path_name(E::KIND, &name)?;
    let patch: Value = read_json(body, MAX_BODY).await?;
    let Value::Object(fields) = &patch else {
        return Err(ApiErr::new(
            ErrorCode::InvalidJson,
            "expected a JSON object with the fields to change",
        ));
    };
    if let Some(n) = fields.get("name") {
        if n.as_str() != Some(name.as_str()) {
            return Err(ApiErr::new(
                ErrorCode::InvalidField,
                "an entity cannot be renamed; create one with the new name and delete the old one",
            )
            .field("name"));
        }
    }
    let explicit_revision = match fields.get("revision") {
        None => None,
        Some(v) => Some(v.as_u64().ok_or_else(|| {
            ApiErr::new(
                ErrorCode::InvalidField,
                "revision is a non-negative integer",
            )
            .field("revision")
        })?),
    };
    // A merge patch is applied to the current entity; if someone else changes it between
    // our read and our write, read again (unless the caller pinned a revision).
    for attempt in 0..3 {
        let reg = s.cluster().read().await?;
        let current = E::table(&reg)
            .get(&name)
            .cloned()
            .ok_or_else(|| ApiErr::not_found(E::KIND, name.as_str()))?;
        let mut doc = serde_json::to_value(&current).map_err(|e| {
            ApiErr::new(
                ErrorCode::Internal,
                format!("encoding the current entity: {e}"),
            )
        })?;
        merge_patch(&mut doc, &patch);
        if explicit_revision.is_none() {
            doc["revision"] = json!(current.revision());
        }
        let mut updated: E =
            super::parse_json(&serde_json::to_vec(&doc).expect("a JSON value encodes"))?;
        updated.prepare(Some(&current))?;
        let warnings = updated.check(&s).await?;
        match submit(&s, key, &headers, Command::Update(updated.wrap())).await {
            Err(e)
                if e.code() == ErrorCode::RevisionConflict
                    && explicit_revision.is_none()
                    && attempt < 2 =>
            {
                continue
            }
            Err(e) => return Err(e),
            Ok(Outcome::Entity(any)) => {
                return E::from_any(any)
                    .map(|e| Json(with_warnings(e.view(), warnings)))
                    .ok_or_else(|| {
                        ApiErr::new(
                            ErrorCode::Internal,
                            "the registry answered with another kind",
                        )
                    })
            }
            Ok(other) => return Err(unexpected(&other)),
        }
    }
    Err(ApiErr::new(
        ErrorCode::RevisionConflict,
        format!("{} {:?} keeps changing; try again", E::KIND, name.as_str()),
    ))
}

fn revision_param(q: &HashMap<String, String>) -> Result<u64, ApiErr> {
    match q.get("revision") {
        None => Ok(0),
        Some(v) => v.parse().map_err(|_| {
            ApiErr::new(
                ErrorCode::InvalidField,
                "revision is a non-negative integer",
            )
            .field("revision")
        }),
    }
}

async fn delete<E: ApiEntity>(
    State(s): State<AdminState>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiErr> {
    let key = auth_write(&s, &headers).await?;
    let name = path_name(E::KIND, &name)?;
    let revision = revision_param(&q)?;
    let outcome = submit(
        &s,
        key,
        &headers,
        Command::Delete {
            kind: E::KIND,
            name: name.clone(),
            revision,
        },
    )
    .await?;
    match outcome {
        Outcome::Deleted { cascaded } => Ok(Json(json!({
            "deleted": { "kind": E::KIND, "name": name },
            "cascaded": cascaded,
        }))),
        other => Err(unexpected(&other)),
    }
}

fn node_view(reg: &Registry, n: &Node) -> NodeView {
    NodeView {
        id: n.id.0,
        name: n.name.clone(),
        cluster_addr: n.cluster_addr.clone(),
        admin_addr: n.admin_addr.clone(),
        region: n.region.clone(),
        role: reg.member_role(n.id),
        grade: n.role,
        revision: n.revision,
    }
}

async fn list_nodes(
    State(s): State<AdminState>,
    headers: HeaderMap,
) -> Result<Json<List<NodeView>>, ApiErr> {
    let reg = auth_read(&s, &headers).await?;
    Ok(Json(List {
        items: reg.nodes().values().map(|n| node_view(&reg, n)).collect(),
    }))
}

async fn get_node(
    State(s): State<AdminState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Json<NodeView>, ApiErr> {
    let reg = auth_read(&s, &headers).await?;
    let name = path_name(Kind::Node, &name)?;
    found_or_404(Kind::Node, &name, reg.nodes().get(&name), |n| {
        node_view(&reg, n)
    })
}

async fn create_node(
    State(s): State<AdminState>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiErr> {
    auth_write(&s, &headers).await?;
    Err(ApiErr::new(
        ErrorCode::MethodNotAllowed,
        "nodes are created by running `warren-node join` on the new node (with a join token from `warren admin join-token create`)",
    ))
}

async fn update_node(
    State(s): State<AdminState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<NodeView>, ApiErr> {
    let key = auth_write(&s, &headers).await?;
    let name = path_name(Kind::Node, &name)?;
    let change: UpdateNode = read_json(body, MAX_BODY).await?;
    let outcome = submit(
        &s,
        key,
        &headers,
        Command::UpdateNode {
            name,
            region: change.region,
            revision: change.revision,
        },
    )
    .await?;
    match outcome {
        Outcome::Node(n) => Ok(Json(node_view(&s.cluster().registry(), &n))),
        other => Err(unexpected(&other)),
    }
}

async fn delete_node(
    State(s): State<AdminState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiErr> {
    remove_named(&s, &headers, Kind::Node, &name, "deleted", |name| {
        Command::DeleteNode { name }
    })
    .await
}

/// Removes the entity of `kind` named `name` with the command `command` makes, and answers
/// `{"<done>": {"kind": ..., "name": ...}}`.
async fn remove_named(
    s: &AdminState,
    headers: &HeaderMap,
    kind: Kind,
    name: &str,
    done: &str,
    command: fn(Name) -> Command,
) -> Result<Json<Value>, ApiErr> {
    let key = auth_write(s, headers).await?;
    let name = path_name(kind, name)?;
    submit(s, key, headers, command(name.clone())).await?;
    Ok(Json(json!({ done: { "kind": kind, "name": name } })))
}

/// The view of `found`, or a 404 naming `kind` and `name`.
fn found_or_404<T, V>(
    kind: Kind,
    name: &Name,
    found: Option<T>,
    view: impl FnOnce(T) -> V,
) -> Result<Json<V>, ApiErr> {
    found
        .map(|x| Json(view(x)))
        .ok_or_else(|| ApiErr::not_found(kind, name.as_str()))
}

/// `GET /v1/devices`: every device (read-only keys may list).
async fn list_devices(
    State(s): State<AdminState>,
    headers: HeaderMap,
) -> Result<Json<List<DeviceView>>, ApiErr> {
    let reg = auth_read(&s, &headers).await?;
    Ok(Json(List {
        items: reg.devices().values().map(DeviceView::from).collect(),
    }))
}

/// `GET /v1/devices/{name}`.
async fn get_device(
    State(s): State<AdminState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Json<DeviceView>, ApiErr> {
    let reg = auth_read(&s, &headers).await?;
    let name = path_name(Kind::Device, &name)?;
    found_or_404(
        Kind::Device,
        &name,
        reg.devices().get(&name),
        DeviceView::from,
    )
}

/// `DELETE /v1/devices/{name}[?revision=N]`: the device can no longer reach anything; its
/// address is not given out again.
async fn delete_device(
    State(s): State<AdminState>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiErr> {
    let key = auth_write(&s, &headers).await?;
    let name = path_name(Kind::Device, &name)?;
    let revision = revision_param(&q)?;
    let command = Command::Delete {
        kind: Kind::Device,
        name: name.clone(),
        revision,
    };
    match submit(&s, key, &headers, command).await? {
        Outcome::Deleted { cascaded } => Ok(Json(json!({
            "deleted": { "kind": Kind::Device, "name": name },
            "cascaded": cascaded,
        }))),
        other => Err(unexpected(&other)),
    }
}

/// Devices are registered by the `warren` client when a user signs in, never written
/// through the admin API.
async fn create_device(
    State(s): State<AdminState>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiErr> {
    auth_write(&s, &headers).await?;
    Err(ApiErr::new(
        ErrorCode::MethodNotAllowed,
        "devices are registered by `warren login` on the device; the admin API lists and deletes them",
    ))
}

fn api_key_view(k: &ApiKeyRecord) -> ApiKeyView {
    ApiKeyView {
        name: k.name.clone(),
        key_id: k.id.to_string(),
        scope: k.scope,
        created_at: k.created_at,
        revision: k.revision,
    }
}

async fn list_api_keys(
    State(s): State<AdminState>,
    headers: HeaderMap,
) -> Result<Json<List<ApiKeyView>>, ApiErr> {
    let reg = auth_read(&s, &headers).await?;
    Ok(Json(List {
        items: reg.api_keys().values().map(api_key_view).collect(),
    }))
}

async fn get_api_key(
    State(s): State<AdminState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Json<ApiKeyView>, ApiErr> {
    let reg = auth_read(&s, &headers).await?;
    let name = path_name(Kind::ApiKey, &name)?;
    found_or_404(Kind::ApiKey, &name, reg.api_keys().get(&name), api_key_view)
}

async fn create_api_key(
    State(s): State<AdminState>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<CreatedApiKey>), ApiErr> {
    let key = auth_write(&s, &headers).await?;
    let req: CreateApiKey = read_json(body, MAX_BODY).await?;
    let new_key = ApiKey::generate(&mut rand::rngs::OsRng);
    let record = ApiKeyRecord {
        name: req.name,
        id: new_key.id,
        hash: new_key.hash(),
        scope: req.scope,
        created_at: 0,
        revision: 0,
    };
    match submit(&s, key, &headers, Command::CreateApiKey(record)).await? {
        Outcome::ApiKey(stored) => Ok((
            StatusCode::CREATED,
            Json(CreatedApiKey {
                api_key: api_key_view(&stored),
                key: new_key.reveal(),
            }),
        )),
        other => Err(unexpected(&other)),
    }
}

async fn revoke_api_key(
    State(s): State<AdminState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiErr> {
    remove_named(&s, &headers, Kind::ApiKey, &name, "revoked", |name| {
        Command::RevokeApiKey { name }
    })
    .await
}

fn join_token_view(t: &JoinTokenRecord) -> JoinTokenView {
    JoinTokenView {
        id: format!("{:016x}", t.id),
        role: t.role,
        created_at: t.created_at,
        revision: t.revision,
    }
}

async fn list_join_tokens(
    State(s): State<AdminState>,
    headers: HeaderMap,
) -> Result<Json<List<JoinTokenView>>, ApiErr> {
    let reg = auth_read(&s, &headers).await?;
    Ok(Json(List {
        items: reg.join_tokens().values().map(join_token_view).collect(),
    }))
}

async fn create_join_token(
    State(s): State<AdminState>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<CreatedJoinToken>), ApiErr> {
    let key = auth_write(&s, &headers).await?;
    let req: CreateJoinToken = read_optional_json(body, MAX_BODY).await?;
    let role = req.role.unwrap_or(NodeRole::Voter);
    let token = JoinToken::generate(
        s.inner.cluster_id,
        s.inner.ca.fingerprint(),
        &mut rand::rngs::OsRng,
    );
    let record = JoinTokenRecord {
        id: token.token_id,
        hash: token.hash(),
        created_at: 0,
        revision: 0,
        role,
    };
    match submit(&s, key, &headers, Command::CreateJoinToken(record)).await? {
        Outcome::JoinToken(stored) => Ok((
            StatusCode::CREATED,
            Json(CreatedJoinToken {
                join_token: join_token_view(&stored),
                token: token.reveal(),
            }),
        )),
        other => Err(unexpected(&other)),
    }
}

async fn revoke_join_token(
    State(s): State<AdminState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiErr> {
    let key = auth_write(&s, &headers).await?;
    let parsed =
        u64::from_str_radix(&id, 16).map_err(|_| ApiErr::not_found(Kind::JoinToken, &id))?;
    submit(&s, key, &headers, Command::RevokeJoinToken { id: parsed }).await?;
    Ok(Json(
        json!({ "revoked": { "kind": Kind::JoinToken, "id": id } }),
    ))
}

async fn cluster_status(
    State(s): State<AdminState>,
    headers: HeaderMap,
) -> Result<Json<warren_proto::api::ClusterStatus>, ApiErr> {
    auth_local(&s, &headers)?;
    Ok(Json(
        super::cluster_status(
            s.cluster(),
            &s.inner.transport,
            &s.inner.node_name,
            s.inner.cluster_id,
        )
        .await,
    ))
}

/// `GET /v1/cluster/title`: `{"title": <text or null>}`.
async fn get_title(State(s): State<AdminState>, headers: HeaderMap) -> Result<Json<Value>, ApiErr> {
    let reg = auth_read(&s, &headers).await?;
    Ok(Json(json!({ "title": reg.title() })))
}

/// `PUT /v1/cluster/title` with `{"title": <text or null>}`: the name the sign-in and
/// error pages show (null clears it).
async fn set_title(
    State(s): State<AdminState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiErr> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Title {
        title: Option<String>,
    }
    let key = auth_write(&s, &headers).await?;
    let Title { title } = read_json(body, MAX_BODY).await?;
    if let Some(t) = &title {
        warren_consensus::registry::check_title(t)
            .map_err(|why| ApiErr::new(ErrorCode::InvalidField, why).field("title"))?;
    }
    submit(
        &s,
        key,
        &headers,
        Command::SetClusterTitle {
            title: title.clone(),
        },
    )
    .await?;
    Ok(Json(json!({ "title": title })))
}

async fn known_node(s: &AdminState, name: &str) -> Result<Node, ApiErr> {
    let name = path_name(Kind::Node, name)?;
    let reg = s.cluster().read().await?;
    reg.nodes()
        .get(&name)
        .cloned()
        .ok_or_else(|| ApiErr::not_found(Kind::Node, name.as_str()))
}

async fn after_membership(s: &AdminState, name: &Name) -> Result<Json<NodeView>, ApiErr> {
    let reg = s.cluster().read().await?;
    reg.nodes()
        .get(name)
        .map(|n| Json(node_view(&reg, n)))
        .ok_or_else(|| ApiErr::not_found(Kind::Node, name.as_str()))
}

async fn add_member(
    State(s): State<AdminState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<NodeView>, ApiErr> {
    auth_write(&s, &headers).await?;
    let req: AddMember = read_json(body, MAX_BODY).await?;
    if req.role == MemberRole::None {
        return Err(
            ApiErr::new(ErrorCode::InvalidField, "role is `voter` or `learner`").field("role"),
        );
    }
    let node = known_node(&s, req.node.as_str()).await?;
    if node.role == NodeRole::Relay {
        return Err(ApiErr::new(
            ErrorCode::InvalidField,
            format!(
                "node {} is relay-only: it carries ciphertext and is never a member",
                node.name
            ),
        )
        .field("node"));
    }
    s.inner
        .members
        .change(MemberOp::Add {
            id: node.id,
            node: ClusterNode {
                name: node.name.to_string(),
                addr: node.cluster_addr.clone(),
            },
            role: req.role,
        })
        .await?;
    after_membership(&s, &node.name).await
}

async fn promote_member(
    State(s): State<AdminState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Json<NodeView>, ApiErr> {
    auth_write(&s, &headers).await?;
    let node = known_node(&s, &name).await?;
    s.inner.members.change(MemberOp::Promote(node.id)).await?;
    after_membership(&s, &node.name).await
}

async fn remove_member(
    State(s): State<AdminState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Json<NodeView>, ApiErr> {
    auth_write(&s, &headers).await?;
    let node = known_node(&s, &name).await?;
    s.inner.members.change(MemberOp::Remove(node.id)).await?;
    after_membership(&s, &node.name).await
}

/// Puts the manifest path in front of a registry error's field (`resources.web.site`).
fn in_manifest(e: RegistryError) -> ApiErr {
    let (kind, name) = match &e {
        RegistryError::Invalid { kind, name, .. }
        | RegistryError::AlreadyExists { kind, name, .. } => (*kind, name.clone()),
        RegistryError::UnknownReference { kind, name, .. }
        | RegistryError::InUse { kind, name, .. } => (*kind, name.to_string()),
        _ => return ApiErr::from(e),
    };
    let mut err = ApiErr::from(e);
    let key = kind.manifest_key().unwrap_or("?");
    err.0.field = Some(match err.0.field.take() {
        Some(f) => format!("{key}.{name}.{f}"),
        None => format!("{key}.{name}"),
    });
    err
}

async fn apply(
    State(s): State<AdminState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiErr> {
    let key = auth_write(&s, &headers).await?;
    let mut req: ApplyRequest = read_json(body, MAX_APPLY_BODY).await?;
    let reg = s.cluster().read().await?;
    if let Some(resources) = &mut req.manifest.resources {
        for (i, r) in resources.iter_mut().enumerate() {
            let current = reg.resources().get(&r.name).cloned();
            r.prepare(current.as_ref()).map_err(|e| {
                let field = format!("resources[{i}].{}", e.field_name().unwrap_or_default());
                e.field(field)
            })?;
        }
    }
    let mut plan = reg
        .plan_manifest(&req.manifest, req.prune)
        .map_err(in_manifest)?;
    // What a single write of the same entity would refuse or warn of, for the entities
    // this apply creates or updates: a refusal fails the whole apply before anything is
    // written, warnings come back beside the report.
    let warnings = apply_problems(&s, &req.manifest, &plan).await?;
    if req.dry_run || plan.changes.is_empty() {
        plan.dry_run = req.dry_run;
        return Ok(Json(with_warnings(plan, warnings)));
    }
    let command = Command::Apply {
        manifest: req.manifest,
        prune: req.prune,
    };
    match submit(&s, key, &headers, command).await {
        Ok(Outcome::Applied(report)) => Ok(Json(with_warnings(report, warnings))),
        Ok(other) => Err(unexpected(&other)),
        Err(e) => Err(e),
    }
}

/// The checks of [`ApiEntity::check`] for the resources and identity providers `plan`
/// creates or updates, each warning prefixed with the entity it is about.
async fn apply_problems(
    s: &AdminState,
    manifest: &warren_proto::api::Manifest,
    plan: &warren_proto::api::ApplyReport,
) -> Result<Vec<String>, ApiErr> {
    use warren_proto::api::ChangeAction;
    let written = |kind: Kind, name: &Name| {
        plan.changes
            .iter()
            .any(|c| c.kind == kind && &c.name == name && c.action != ChangeAction::Delete)
    };
    let mut warnings = Vec::new();
    for (i, r) in manifest.resources.iter().flatten().enumerate() {
        if !written(Kind::Resource, &r.name) {
            continue;
        }
        let found = r.check(s).await.map_err(|e| {
            let field = format!("resources[{i}].{}", e.field_name().unwrap_or_default());
            e.field(field)
        })?;
        warnings.extend(
            found
                .into_iter()
                .map(|w| format!("resource {}: {w}", r.name.as_str())),
        );
    }
    for idp in manifest.identity_providers.iter().flatten() {
        if written(Kind::IdentityProvider, &idp.name) {
            let found = idp.check(s).await?;
            warnings.extend(
                found
                    .into_iter()
                    .map(|w| format!("identity provider {}: {w}", idp.name.as_str())),
            );
        }
    }
    Ok(warnings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch_follows_rfc_7396() {
        let mut doc = json!({"a": 1, "b": {"c": 2, "d": 3}, "e": [1]});
        merge_patch(
            &mut doc,
            &json!({"a": null, "b": {"c": 9}, "e": [2], "f": "x"}),
        );
        assert_eq!(doc, json!({"b": {"c": 9, "d": 3}, "e": [2], "f": "x"}));
    }
}

//! The client API: what `warren login`, `ls`, `connect`, `nc` and `device` ask a node, on
//! the admin API's listener.
//!
//! ```text
//! GET    /v1/client/discovery               no auth: cluster id, identity providers, CLI client id
//! POST   /v1/client/sign-in                 no auth: the provider's ID token (issued to the
//!                                           CLI's client) -> a client session token
//! POST   /v1/client/devices                 register this machine's WireGuard public key
//! GET    /v1/client/devices                 the user's devices
//! DELETE /v1/client/devices/{name}          one of the user's devices
//! GET    /v1/client/resources?device=NAME   private resources the user may reach now
//! POST   /v1/client/connect                 agent key, relays and a relay ticket for a site
//! ```
//!
//! The session token is the session's id sealed with the cluster's cookie key
//! (`Purpose::Client`): any node opens it, and every call checks the session against the
//! registry, so a revoked session, a disabled or deleted user is refused on the next call.
//! The device's owner and session always come from the token, never from the body.

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::routing::{delete, get, post};
use axum::{Extension, Json, Router};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use warren_consensus::registry::{Command, Outcome, Registry};
use warren_consensus::types::{Actor as Who, Request as RaftRequest};
use warren_proto::api::ErrorCode;
use warren_proto::registry::{Device, Kind, Route, WgKey};
use warren_proto::relay::Holder;
use warren_proto::session::{Session, SessionId};
use warren_proto::Name;

use super::error::ApiErr;
use super::{read_json, AdminState, Peer};
use crate::access;
use crate::proxy::seal::Purpose;
use crate::proxy::unix_now;

const MAX_BODY: usize = 64 * 1024;

/// The client API's routes.
pub fn routes() -> Router<AdminState> {
    Router::new()
        .route("/v1/client/discovery", get(discovery))
        .route("/v1/client/sign-in", post(sign_in))
        .route(
            "/v1/client/devices",
            get(list_devices).post(register_device),
        )
        .route("/v1/client/devices/{name}", delete(delete_device))
        .route("/v1/client/resources", get(resources))
        .route("/v1/client/connect", post(connect))
}

#[derive(Serialize, Deserialize)]
struct ClientToken {
    sid: u128,
}

fn cli_client_id(s: &AdminState) -> Option<String> {
    s.inner
        .proxy
        .sites()
        .access()
        .and_then(|a| a.cli_client_id.clone())
}

async fn discovery(State(s): State<AdminState>) -> Json<Value> {
    let reg = s.cluster().registry();
    let cli = cli_client_id(&s);
    let providers: Vec<Value> = reg
        .identity_providers()
        .values()
        .map(|p| {
            json!({
                "name": p.name,
                "issuer": p.issuer,
                "client_id": cli.clone().unwrap_or_else(|| p.client_id.clone()),
                "scopes": p.scopes,
            })
        })
        .collect();
    Json(json!({
        "cluster": format!("{:032x}", reg.cluster_id()),
        "providers": providers,
        "nodes": node_urls(&reg),
    }))
}

/// The client API of every node of the cluster (clients fall back to them in order when
/// the node they signed in at does not answer).
fn node_urls(reg: &Registry) -> Vec<String> {
    reg.member_grade_nodes()
        .map(|n| format!("https://{}", n.admin_addr))
        .collect()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignInBody {
    #[serde(default)]
    provider: Option<String>,
    id_token: String,
}

fn status_err(status: axum::http::StatusCode, message: String) -> ApiErr {
    let code = match status.as_u16() {
        401 => ErrorCode::Unauthorized,
        403 => ErrorCode::Forbidden,
        503 => ErrorCode::Unavailable,
        _ => ErrorCode::Unavailable,
    };
    ApiErr::new(code, message)
}

async fn sign_in(State(s): State<AdminState>, body: Body) -> Result<Json<Value>, ApiErr> {
    let b: SignInBody = read_json(body, MAX_BODY).await?;
    let reg = s.cluster().registry();
    let idp = match &b.provider {
        Some(p) => Name::new(p.clone())
            .ok()
            .and_then(|n| reg.identity_providers().get(&n).cloned()),
        None => reg.identity_providers().values().next().cloned(),
    }
    .ok_or_else(|| ApiErr::new(ErrorCode::NotFound, "no such identity provider"))?;
    let client_id = cli_client_id(&s).unwrap_or_else(|| idp.client_id.clone());
    let signed_in = s
        .inner
        .proxy
        .client_sign_in(&idp, &client_id, &b.id_token)
        .await;
    let proxy_metrics = &s.inner.proxy.metrics;
    proxy_metrics.record_sign_in(
        signed_in
            .as_ref()
            .map_or_else(|(st, _)| st.as_u16(), |_| 200),
    );
    let (sid, user, expires_at) = signed_in.map_err(|(st, m)| status_err(st, m))?;
    let sealer = s
        .inner
        .proxy
        .state()
        .sealer
        .clone()
        .ok_or_else(|| ApiErr::new(ErrorCode::Unavailable, "the cluster has no keys yet"))?;
    let token = sealer.seal(Purpose::Client, &ClientToken { sid: sid.0 });
    Ok(Json(
        json!({"token": token, "user": user, "expires_at": expires_at}),
    ))
}

/// The live session behind the bearer token, from this node's replica.
fn session(
    s: &AdminState,
    headers: &HeaderMap,
) -> Result<(std::sync::Arc<Registry>, Session), ApiErr> {
    let relogin = || ApiErr::unauthorized("your session has ended: run `warren login` again");
    let value = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| ApiErr::unauthorized("expected `Authorization: Bearer <session token>`"))?;
    let sealer = s.inner.proxy.state().sealer.clone().ok_or_else(relogin)?;
    let t: ClientToken = sealer.open(Purpose::Client, value).ok_or_else(relogin)?;
    let reg = s.cluster().registry();
    let now = unix_now();
    let session = reg
        .sessions()
        .get(&SessionId(t.sid))
        .filter(|x| x.expires_at > now)
        .cloned()
        .ok_or_else(relogin)?;
    let user = reg.users().get(&session.user).ok_or_else(relogin)?;
    if user.disabled {
        return Err(ApiErr::new(
            ErrorCode::Forbidden,
            "your account is disabled",
        ));
    }
    Ok((reg, session))
}

fn device_json(d: &Device) -> Value {
    json!({
        "name": d.name,
        "owner": d.owner,
        "public_key": d.public_key.to_string(),
        "os": d.os,
        "address": d.address,
        "created_at": d.created_at,
        "last_seen": d.last_seen,
        "last_address": d.last_address,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterBody {
    name: String,
    public_key: String,
    #[serde(default)]
    os: String,
}

async fn register_device(
    State(s): State<AdminState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiErr> {
    let (_, session) = session(&s, &headers)?;
    let b: RegisterBody = read_json(body, MAX_BODY).await?;
    let name = Name::new(b.name.clone())
        .map_err(|e| ApiErr::new(ErrorCode::InvalidField, e.to_string()).field("name"))?;
    let key: WgKey = b
        .public_key
        .parse()
        .map_err(|e: warren_proto::registry::FieldError| {
            ApiErr::new(ErrorCode::InvalidField, e.to_string()).field("public_key")
        })?;
    let write = RaftRequest::new(
        Who::System,
        Command::RegisterDevice {
            name,
            owner: session.user.clone(),
            public_key: key,
            os: b.os,
            session: Some(session.id),
            address: None,
        },
    );
    match s.cluster().write(write).await? {
        Ok(Outcome::Device(d)) => {
            tracing::info!(device = %d.name, user = %d.owner, "device registered");
            Ok(Json(device_json(&d)))
        }
        Ok(other) => Err(ApiErr::new(
            ErrorCode::Unavailable,
            format!("unexpected outcome {other:?}"),
        )),
        Err(e) => Err(e.into()),
    }
}

async fn list_devices(
    State(s): State<AdminState>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiErr> {
    let (reg, session) = session(&s, &headers)?;
    let items: Vec<Value> = reg.devices_of(&session.user).map(device_json).collect();
    Ok(Json(Value::Array(items)))
}

async fn delete_device(
    State(s): State<AdminState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiErr> {
    let (reg, session) = session(&s, &headers)?;
    let name = Name::new(name).map_err(|_| ApiErr::not_found(Kind::Device, "?"))?;
    // Another user's device is as invisible as one that does not exist.
    match reg.devices().get(&name) {
        Some(d) if d.owner == session.user => {}
        _ => return Err(ApiErr::not_found(Kind::Device, name.as_str())),
    }
    let write = RaftRequest::new(
        Who::System,
        Command::Delete {
            kind: Kind::Device,
            name: name.clone(),
            revision: 0,
        },
    );
    s.cluster().write(write).await??;
    Ok(Json(json!({"deleted": {"kind": "device", "name": name}})))
}

#[derive(Deserialize)]
struct ResourcesQuery {
    #[serde(default)]
    device: Option<String>,
}

fn own_device<'r>(reg: &'r Registry, session: &Session, name: &str) -> Result<&'r Device, ApiErr> {
    Name::new(name.to_owned())
        .ok()
        .and_then(|n| reg.devices().get(&n))
        .filter(|d| d.owner == session.user)
        .ok_or_else(|| ApiErr::not_found(Kind::Device, name))
}

/// `device` as policies see it on this request: seen from the address the request came
/// from (what `source_cidr` matches), whatever the registry last recorded.
fn seen_from(device: &Device, peer: Option<&Extension<Peer>>) -> Device {
    let mut d = device.clone();
    if let Some(Extension(Peer(addr))) = peer {
        d.last_address = Some(addr.ip());
    }
    d
}

async fn resources(
    State(s): State<AdminState>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
    Query(q): Query<ResourcesQuery>,
) -> Result<Json<Value>, ApiErr> {
    let (reg, session) = session(&s, &headers)?;
    let device = q
        .device
        .as_deref()
        .map(|d| own_device(&reg, &session, d).map(|d| seen_from(d, peer.as_ref())))
        .transpose()?;
    let now = unix_now();
    let items: Vec<Value> = access::reachable(&reg, &session, device.as_ref(), now)
        .into_iter()
        .filter_map(|r| {
            let Route::Private {
                address,
                ports,
                protocols,
                alias,
                virtual_address,
            } = &r.route
            else {
                return None;
            };
            Some(json!({
                "name": r.name,
                "alias": alias,
                "site": r.site,
                "address": address.to_string(),
                "virtual_address": virtual_address,
                "ports": ports.to_string(),
                "protocols": protocols.iter().map(|p| p.as_str()).collect::<Vec<_>>(),
            }))
        })
        .collect();
    Ok(Json(Value::Array(items)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConnectBody {
    device: String,
    site: String,
}

async fn connect(
    State(s): State<AdminState>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiErr> {
    let (reg, session) = session(&s, &headers)?;
    let b: ConnectBody = read_json(body, MAX_BODY).await?;
    let device = own_device(&reg, &session, &b.device)?;
    if device.session != Some(session.id) {
        return Err(ApiErr::unauthorized(
            "this device was registered with another session: run `warren login` again",
        ));
    }
    // The device's actor on this node records where it is seen from (and when) before the
    // answer, so the agents' grants, which follow the registry, see the same address.
    if let (Some(Extension(Peer(addr))), Some(shell)) =
        (peer.as_ref(), s.inner.proxy.sites().access())
    {
        shell
            .devices
            .seen_and_recorded(
                device.name.clone(),
                crate::devices::Seen::Connect { addr: addr.ip() },
            )
            .await;
    }
    let device = &seen_from(device, peer.as_ref());
    let site = Name::new(b.site.clone()).map_err(|_| ApiErr::not_found(Kind::Site, &b.site))?;
    let now = unix_now();
    let allowed: Vec<Name> = access::reachable(&reg, &session, Some(device), now)
        .into_iter()
        .filter_map(|r| r.site.clone())
        .collect();
    if !allowed.contains(&site) {
        return Err(ApiErr::new(
            ErrorCode::Forbidden,
            format!("you are not allowed to reach anything behind site {site}"),
        ));
    }
    let agent_key = reg.site_key(&site).ok_or_else(|| {
        ApiErr::new(
            ErrorCode::Unavailable,
            format!("the agent of site {site} has not connected yet"),
        )
    })?;
    let (ticket, expires_at) = access::ticket(
        &reg,
        Holder::Device {
            device: device.name.clone(),
            key: device.public_key.0,
            sites: vec![site.clone()],
        },
        now,
    )
    .ok_or_else(|| {
        ApiErr::new(
            ErrorCode::Unavailable,
            "the cluster has no signing keys yet",
        )
    })?;
    let relays: Vec<Value> = reg
        .node_relays()
        .filter_map(|(n, relay)| {
            let addr: SocketAddr = relay.parse().ok()?;
            Some(json!({"node": n.name, "addr": addr}))
        })
        .collect();
    if relays.is_empty() {
        return Err(ApiErr::new(
            ErrorCode::Unavailable,
            "no node of the cluster runs a relay",
        ));
    }
    Ok(Json(json!({
        "site": site,
        "agent_key": STANDARD.encode(agent_key.0),
        "device_address": device.address,
        "ticket": STANDARD.encode(ticket.encode()),
        "ticket_expires_at": expires_at,
        "relays": relays,
        "mtu": warren_proto::relay::INNER_MTU,
        "nodes": node_urls(&reg),
    })))
}

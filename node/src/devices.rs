//! Client devices connected to this node: one actor per device, under the tree's child
//! `devices`, owning what the node knows of that device's connection (where it is seen
//! from, the relay bindings it holds here, when it was last seen) and recording it in
//! the registry.
//!
//! ```text
//!  POST /v1/client/connect ── Seen::Connect{addr} (waits) ─┐
//!  relay: a device's new binding ── Seen::Bound{site, from} ┴─► DevicesActor (child `devices`)
//!                                                                 │ spawn_linked, one per device
//!                                                                 ▼
//!                                                  DeviceActor ─ DeviceCore (sans-IO)
//!                                                   ├─ TouchDevice through Raft: a new public
//!                                                   │  address at once, last-seen once a minute
//!                                                   └─ every TICK: the registry (gone → stop),
//!                                                      idle for IDLE → stop
//! ```
//!
//! Packets never go through these actors: the relay reports a binding when it is made
//! (a control frame, at most once per binding), never data. The public address recorded is
//! what policies' `source_cidr` matches for the device's flows (the agents' grants follow
//! the registry); a connect from a new address waits for the write, so the grants the
//! client is then told about and the ones the agents get agree.
//!
//! A failing device actor takes only itself down (logged); the next sighting starts a
//! fresh one. A restart of `devices` stops them all; they come back as devices are seen.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use warren_consensus::cluster::Cluster;
use warren_consensus::registry::Command;
use warren_proto::registry::Device;
use warren_proto::Name;

use crate::actors::ChildSpec;
use crate::sites::Current;

/// Last-seen is written at most this often (seconds) when nothing else changed: it is for
/// people, not a per-connect write.
pub const TOUCH_EVERY: u64 = 60;
/// A device not seen for this long (seconds) has its actor stopped.
pub const IDLE: u64 = 300;
/// How often each device actor looks at the registry and its idleness.
pub const TICK: Duration = Duration::from_secs(5);
/// A registry write not answered within this is given up (and tried again later).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most device actors one node runs; sightings of further devices are dropped (counted).
pub const MAX_DEVICES: usize = 100_000;

/// How a device was seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// It asked this node for a site's connection details, from `addr`.
    Connect {
        /// The address its HTTPS connection came from.
        addr: IpAddr,
    },
    /// It bound a relay channel to `site` on this node, from `from`.
    Bound {
        /// The site.
        site: Name,
        /// The address its datagrams come from.
        from: SocketAddr,
    },
}

impl Seen {
    fn addr(&self) -> IpAddr {
        match self {
            Seen::Connect { addr } => *addr,
            Seen::Bound { from, .. } => from.ip(),
        }
    }
}

/// One device's connection as this node knows it, without I/O.
///
/// Calling order: [`handle_registry`](Self::handle_registry) with the registry's record
/// (at start and every [`TICK`]), [`handle_seen`](Self::handle_seen) for each sighting,
/// then [`poll_touch`](Self::poll_touch) for the write to make, if any, and
/// [`handle_written`](Self::handle_written) with its result. Time (`now`, Unix seconds)
/// arrives as an argument.
#[derive(Debug, Clone)]
pub struct DeviceCore {
    name: Name,
    /// What the registry holds: last seen, last public address.
    recorded: Option<(u64, Option<IpAddr>)>,
    /// The newest address it was seen from, and when.
    seen: Option<(IpAddr, u64)>,
    /// Its relay bindings on this node: site → (from, when).
    paths: BTreeMap<Name, (SocketAddr, u64)>,
    /// A write in flight since.
    writing: Option<u64>,
    /// When this actor started.
    started: u64,
}

/// What a [`DeviceCore`] reports of itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConnection {
    /// The device.
    pub device: Name,
    /// The newest address it was seen from.
    pub address: Option<IpAddr>,
    /// When (Unix seconds).
    pub seen_at: Option<u64>,
    /// Its relay bindings on this node, by site.
    pub relayed: BTreeMap<Name, SocketAddr>,
}

impl DeviceCore {
    /// A device first seen (by this actor) at `now`.
    pub fn new(name: Name, now: u64) -> Self {
        Self {
            name,
            recorded: None,
            seen: None,
            paths: BTreeMap::new(),
            writing: None,
            started: now,
        }
    }

    /// The registry's record of the device; `false` when it has none (deleted: stop).
    pub fn handle_registry(&mut self, device: Option<&Device>) -> bool {
        match device {
            Some(d) => {
                self.recorded = Some((d.last_seen, d.last_address));
                true
            }
            None => false,
        }
    }

    /// The device was seen at `now`.
    pub fn handle_seen(&mut self, seen: &Seen, now: u64) {
        self.seen = Some((seen.addr(), now));
        if let Seen::Bound { site, from } = seen {
            self.paths.insert(site.clone(), (*from, now));
        }
    }

    /// The write asked for by [`poll_touch`](Self::poll_touch) ended; on success the
    /// registry now holds what it wrote (also learnt at the next registry look).
    pub fn handle_written(&mut self, wrote: Option<(u64, Option<IpAddr>)>) {
        self.writing = None;
        if let (Some((at, addr)), Some(rec)) = (wrote, self.recorded.as_mut()) {
            rec.0 = at;
            if addr.is_some() {
                rec.1 = addr;
            }
        }
    }

    /// The registry write to make now, if any: the device's public address when it
    /// differs from the recorded one, else last-seen when the record is older than
    /// [`TOUCH_EVERY`] and the device has been seen since. One write at a time.
    pub fn poll_touch(&mut self, now: u64) -> Option<(Command, (u64, Option<IpAddr>))> {
        if self.writing.is_some() {
            return None;
        }
        let (recorded_at, recorded_addr) = self.recorded?;
        let (addr, seen_at) = self.seen?;
        let moved = recorded_addr != Some(addr);
        let stale = seen_at > recorded_at && now.saturating_sub(recorded_at) >= TOUCH_EVERY;
        if !moved && !stale {
            return None;
        }
        self.writing = Some(now);
        let address = moved.then_some(addr);
        Some((
            Command::TouchDevice {
                name: self.name.clone(),
                address,
            },
            (now, address),
        ))
    }

    /// Whether nothing has been heard of the device for [`IDLE`]; bindings older than the
    /// relay's lifetime are forgotten on the way.
    pub fn handle_tick(&mut self, now: u64) -> bool {
        let lifetime = crate::relay::BINDING_LIFETIME.as_secs();
        self.paths
            .retain(|_, (_, at)| now.saturating_sub(*at) < lifetime * 2);
        let last = self.seen.map_or(self.started, |(_, at)| at);
        now.saturating_sub(last) >= IDLE
    }

    /// What it knows now.
    pub fn view(&self) -> DeviceConnection {
        DeviceConnection {
            device: self.name.clone(),
            address: self.seen.map(|(a, _)| a),
            seen_at: self.seen.map(|(_, at)| at),
            relayed: self
                .paths
                .iter()
                .map(|(s, (from, _))| (s.clone(), *from))
                .collect(),
        }
    }
}

/// Messages of the [`DevicesActor`].
pub enum DevicesMsg {
    /// A device was seen; `reply` (if any) is answered once its actor handled it (and
    /// wrote what it had to).
    Seen {
        /// The device.
        device: Name,
        /// How.
        seen: Seen,
        /// Answered when done.
        reply: Option<RpcReplyPort<()>>,
    },
}

/// The devices of this node: the handle the connect handler and the relay report to.
pub struct Devices {
    cluster: Cluster,
    current: Arc<Current<DevicesMsg>>,
    /// Device actors running now.
    pub running: AtomicU64,
    /// Sightings dropped (no `devices` actor, or too many devices).
    pub dropped: AtomicU64,
}

impl std::fmt::Debug for Devices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Devices")
            .field("running", &self.running)
            .finish_non_exhaustive()
    }
}

impl Devices {
    /// The service, before its actor starts ([`child`](Self::child)).
    pub fn new(cluster: Cluster) -> Arc<Self> {
        Arc::new(Self {
            cluster,
            current: Current::new(),
            running: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        })
    }

    /// The tree's child `devices`.
    pub fn child(self: &Arc<Self>) -> ChildSpec {
        let me = self.clone();
        ChildSpec::new("devices", move |sup| {
            let me = me.clone();
            async move {
                me.current.set(None);
                let (actor, _) = Actor::spawn_linked(None, DevicesActor, me.clone(), sup).await?;
                me.current.set(Some(actor.clone()));
                Ok(actor.get_cell())
            }
        })
    }

    /// Prometheus text.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        let _ = writeln!(
            out,
            "# TYPE warren_devices_connected gauge\nwarren_devices_connected {}\n# TYPE warren_device_sightings_dropped_total counter\nwarren_device_sightings_dropped_total {}",
            self.running.load(Ordering::Relaxed),
            self.dropped.load(Ordering::Relaxed)
        );
    }

    /// `device` was seen; returns at once.
    pub fn seen(&self, device: Name, seen: Seen) {
        match self.current.actor() {
            Some(a)
                if a.cast(DevicesMsg::Seen {
                    device,
                    seen,
                    reply: None,
                })
                .is_ok() => {}
            _ => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// `device` was seen; returns once its actor recorded what it had to (or after
    /// [`WRITE_TIMEOUT`], or at once when the actor is down).
    pub async fn seen_and_recorded(&self, device: Name, seen: Seen) {
        let Some(a) = self.current.actor() else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let asked = ractor::call_t!(
            a,
            |reply| DevicesMsg::Seen {
                device,
                seen,
                reply: Some(reply),
            },
            (WRITE_TIMEOUT.as_millis() + 500) as u64
        );
        if let Err(e) = asked {
            tracing::debug!("recording a device's sighting: {e}");
        }
    }
}

/// The tree's child `devices`: one linked [`DeviceActor`] per device seen.
pub struct DevicesActor;

/// State of the [`DevicesActor`].
pub struct DevicesState {
    devices: Arc<Devices>,
    by_name: HashMap<Name, ActorRef<DeviceMsg>>,
    by_id: HashMap<ActorId, Name>,
}

impl Actor for DevicesActor {
    type Msg = DevicesMsg;
    type State = DevicesState;
    type Arguments = Arc<Devices>;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        devices: Arc<Devices>,
    ) -> Result<Self::State, ActorProcessingErr> {
        devices.running.store(0, Ordering::Relaxed);
        Ok(DevicesState {
            devices,
            by_name: HashMap::new(),
            by_id: HashMap::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            DevicesMsg::Seen {
                device,
                seen,
                reply,
            } => {
                let child = match state.by_name.get(&device) {
                    Some(c) => c.clone(),
                    None => {
                        if state.by_name.len() >= MAX_DEVICES {
                            state.devices.dropped.fetch_add(1, Ordering::Relaxed);
                            return Ok(());
                        }
                        let args = DeviceArgs {
                            name: device.clone(),
                            cluster: state.devices.cluster.clone(),
                        };
                        // Starting a child only reads the registry: nothing here waits on I/O.
                        // A child that cannot start loses this sighting, not the others.
                        let child =
                            match Actor::spawn_linked(None, DeviceActor, args, myself.get_cell())
                                .await
                            {
                                Ok((c, _)) => c,
                                Err(e) => {
                                    tracing::warn!(%device, "cannot start the device's actor: {e}");
                                    state.devices.dropped.fetch_add(1, Ordering::Relaxed);
                                    return Ok(());
                                }
                            };
                        state.by_id.insert(child.get_id(), device.clone());
                        state.by_name.insert(device.clone(), child.clone());
                        state
                            .devices
                            .running
                            .store(state.by_name.len() as u64, Ordering::Relaxed);
                        tracing::debug!(%device, "device connected to this node");
                        child
                    }
                };
                // A child that just stopped drops the message; its reply port then
                // answers the caller with an error, which it takes as "done".
                let _ = child.cast(DeviceMsg::Seen(seen, reply));
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // A device actor's end is its own, never this actor's.
        let cell = match event {
            SupervisionEvent::ActorFailed(cell, err) => {
                if let Some(name) = state.by_id.get(&cell.get_id()) {
                    tracing::warn!(device = %name, "the device's actor failed: {err}");
                }
                cell
            }
            SupervisionEvent::ActorTerminated(cell, _, _) => cell,
            _ => return Ok(()),
        };
        if let Some(name) = state.by_id.remove(&cell.get_id()) {
            state.by_name.remove(&name);
            state
                .devices
                .running
                .store(state.by_name.len() as u64, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// Messages of a [`DeviceActor`].
pub enum DeviceMsg {
    /// Seen; answered (if asked) once recorded.
    Seen(Seen, Option<RpcReplyPort<()>>),
    /// Look at the registry and idleness.
    Tick,
}

/// Arguments of a [`DeviceActor`].
pub struct DeviceArgs {
    name: Name,
    cluster: Cluster,
}

/// One connected device (see the module docs).
pub struct DeviceActor;

/// State of a [`DeviceActor`].
pub struct DeviceState {
    core: DeviceCore,
    cluster: Cluster,
    ticker: tokio::task::JoinHandle<()>,
}

impl Drop for DeviceState {
    fn drop(&mut self) {
        self.ticker.abort();
    }
}

impl DeviceActor {
    /// Reads the registry's record; `false` when the device is gone.
    fn look(state: &mut DeviceState) -> bool {
        let reg = state.cluster.registry();
        state
            .core
            .handle_registry(reg.devices().get(&state.core.name))
    }

    /// Makes the write the core asks for, waiting for it (bounded).
    async fn touch(state: &mut DeviceState) {
        let Some((command, wrote)) = state.core.poll_touch(crate::proxy::unix_now()) else {
            return;
        };
        let req =
            warren_consensus::types::Request::new(warren_consensus::types::Actor::System, command);
        let written = tokio::time::timeout(WRITE_TIMEOUT, state.cluster.write(req)).await;
        let ok = matches!(written, Ok(Ok(Ok(_))));
        if !ok {
            tracing::debug!(device = %state.core.name, "recording the device's last sighting failed; trying again later");
        }
        state.core.handle_written(ok.then_some(wrote));
    }
}

impl Actor for DeviceActor {
    type Msg = DeviceMsg;
    type State = DeviceState;
    type Arguments = DeviceArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: DeviceArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let ticker = myself.send_interval(TICK, || DeviceMsg::Tick);
        let mut state = DeviceState {
            core: DeviceCore::new(args.name, crate::proxy::unix_now()),
            cluster: args.cluster,
            ticker,
        };
        if !Self::look(&mut state) {
            // Not (or no longer) in the registry: nothing to keep.
            myself.stop(Some("the device is not in the registry".into()));
        }
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            DeviceMsg::Seen(seen, reply) => {
                state.core.handle_seen(&seen, crate::proxy::unix_now());
                if Self::look(state) {
                    Self::touch(state).await;
                }
                if let Some(r) = reply {
                    let _ = r.send(());
                }
            }
            DeviceMsg::Tick => {
                if !Self::look(state) {
                    myself.stop(Some("the device was deleted".into()));
                    return Ok(());
                }
                if state.core.handle_tick(crate::proxy::unix_now()) {
                    myself.stop(Some("idle".into()));
                    return Ok(());
                }
                Self::touch(state).await;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_proto::registry::WgKey;

    fn name(s: &str) -> Name {
        Name::new(s).unwrap()
    }

    fn device(last_seen: u64, last_address: Option<&str>) -> Device {
        Device {
            name: name("laptop"),
            owner: name("alice"),
            public_key: WgKey([7; 32]),
            os: "linux".into(),
            address: "100.64.0.1".parse().unwrap(),
            session: None,
            created_at: 1_000,
            last_seen,
            last_address: last_address.map(|a| a.parse().unwrap()),
            revision: 1,
        }
    }

    fn addr(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_new_address_is_written_at_once_and_only_once() {
        let mut core = DeviceCore::new(name("laptop"), 10_000);
        assert!(core.handle_registry(Some(&device(9_990, None))));
        assert!(
            core.poll_touch(10_000).is_none(),
            "never seen: nothing to write"
        );
        core.handle_seen(
            &Seen::Connect {
                addr: addr("203.0.113.7"),
            },
            10_000,
        );
        let (cmd, wrote) = core.poll_touch(10_000).expect("a new address");
        assert_eq!(
            cmd,
            Command::TouchDevice {
                name: name("laptop"),
                address: Some(addr("203.0.113.7"))
            }
        );
        assert!(core.poll_touch(10_000).is_none(), "one write at a time");
        core.handle_written(Some(wrote));
        assert!(core.poll_touch(10_001).is_none(), "recorded: nothing more");
        // Seen again from the same address within the minute: nothing to write.
        core.handle_seen(
            &Seen::Connect {
                addr: addr("203.0.113.7"),
            },
            10_030,
        );
        assert!(core.poll_touch(10_030).is_none());
        // A minute after the record: last-seen, without an address.
        let (cmd, _) = core.poll_touch(10_060).expect("last-seen is due");
        assert_eq!(
            cmd,
            Command::TouchDevice {
                name: name("laptop"),
                address: None
            }
        );
    }

    #[test]
    fn a_failed_write_is_tried_again_and_a_move_is_seen() {
        let mut core = DeviceCore::new(name("laptop"), 10_000);
        core.handle_registry(Some(&device(10_000, Some("203.0.113.7"))));
        core.handle_seen(
            &Seen::Bound {
                site: name("office"),
                from: "198.51.100.4:40000".parse().unwrap(),
            },
            10_001,
        );
        let _ = core.poll_touch(10_001).expect("moved to another network");
        core.handle_written(None);
        let (cmd, _) = core.poll_touch(10_002).expect("the failed write again");
        assert!(
            matches!(cmd, Command::TouchDevice { address: Some(a), .. } if a == addr("198.51.100.4"))
        );
        assert_eq!(
            core.view().relayed.get(&name("office")).copied(),
            Some("198.51.100.4:40000".parse().unwrap())
        );
    }

    #[test]
    fn a_quiet_device_goes_idle_and_a_deleted_one_is_gone() {
        let mut core = DeviceCore::new(name("laptop"), 10_000);
        core.handle_registry(Some(&device(10_000, None)));
        core.handle_seen(
            &Seen::Bound {
                site: name("office"),
                from: "198.51.100.4:40000".parse().unwrap(),
            },
            10_000,
        );
        assert!(!core.handle_tick(10_000 + IDLE - 1));
        assert!(core.view().relayed.is_empty(), "old bindings are forgotten");
        assert!(core.handle_tick(10_000 + IDLE));
        assert!(!core.handle_registry(None));
    }
}

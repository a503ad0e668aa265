//! A client endpoint and an agent endpoint on loopback UDP, spliced by a fake relay that
//! speaks `proto::relay`, with real tokio targets behind the agent.

use std::collections::HashMap;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use warren_proto::relay::{Frame, Refusal};
use warren_proto::tunnel::{FlowDst, FlowGrant};

use super::*;

const DEVICE_IP: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);
const SITE: &str = "lab";
/// A guard against a hung test, not a measurement.
const PATIENCE: Duration = Duration::from_secs(20);

/// The node relay, reduced to the splice: agents bind with an empty site, clients with
/// the site; a client channel C is paired with an agent-side channel A.
async fn fake_relay() -> SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    tune_socket(&sock);
    let addr = sock.local_addr().unwrap();
    tokio::spawn(async move {
        let mut agent: Option<SocketAddr> = None;
        let mut next = 1000u32;
        // C -> (client, A), A -> (client, C)
        let mut by_c: HashMap<u32, (SocketAddr, u32)> = HashMap::new();
        let mut by_a: HashMap<u32, (SocketAddr, u32)> = HashMap::new();
        let mut buf = vec![0u8; 65536];
        let mut out = Vec::with_capacity(2048);
        loop {
            let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                return;
            };
            let Ok(frame) = Frame::decode(&buf[..n]) else {
                continue;
            };
            out.clear();
            let to = match frame {
                Frame::Ping { nonce } => {
                    Frame::Pong {
                        nonce,
                        observed: from,
                    }
                    .encode(&mut out);
                    from
                }
                Frame::Bind {
                    nonce,
                    site: "",
                    ticket,
                    ..
                } => {
                    assert_eq!(ticket, b"agent-ticket");
                    agent = Some(from);
                    Frame::Bound {
                        nonce,
                        channel: 1,
                        lifetime: 30,
                    }
                    .encode(&mut out);
                    from
                }
                Frame::Bind { nonce, ticket, .. } => {
                    if ticket == b"bad" {
                        Frame::Refused {
                            nonce,
                            reason: Refusal::BadTicket,
                        }
                        .encode(&mut out);
                    } else {
                        let c = by_c
                            .iter()
                            .find(|(_, (a, _))| *a == from)
                            .map(|(c, _)| *c)
                            .unwrap_or_else(|| {
                                next += 2;
                                by_c.insert(next, (from, next + 1));
                                by_a.insert(next + 1, (from, next));
                                next
                            });
                        Frame::Bound {
                            nonce,
                            channel: c,
                            lifetime: 30,
                        }
                        .encode(&mut out);
                    }
                    from
                }
                Frame::Data { channel, payload } => {
                    if Some(from) == agent {
                        let Some(&(client, c)) = by_a.get(&channel) else {
                            continue;
                        };
                        Frame::Data {
                            channel: c,
                            payload,
                        }
                        .encode(&mut out);
                        client
                    } else {
                        let (Some(&(client, a)), Some(agent)) = (by_c.get(&channel), agent) else {
                            continue;
                        };
                        if client != from {
                            continue;
                        }
                        Frame::Data {
                            channel: a,
                            payload,
                        }
                        .encode(&mut out);
                        agent
                    }
                }
                _ => continue,
            };
            let _ = sock.send_to(&out, to).await;
        }
    });
    addr
}

async fn tcp_echo() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

async fn udp_echo() -> SocketAddr {
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = s.local_addr().unwrap();
    tokio::spawn(async move {
        let mut b = [0u8; 2048];
        while let Ok((n, from)) = s.recv_from(&mut b).await {
            let _ = s.send_to(&b[..n], from).await;
        }
    });
    addr
}

fn grant(port: u16, tcp: bool, udp: bool) -> FlowGrant {
    FlowGrant {
        resource: Name::new("echo").unwrap(),
        dst: FlowDst::Net("127.0.0.1/32".parse().unwrap()),
        ports: vec![(port, port)],
        tcp,
        udp,
        icmp: false,
    }
}

struct Lab {
    relay: SocketAddr,
    client: ClientEndpoint,
    agent: AgentEndpoint,
    device: DeviceAccess,
}

impl Lab {
    async fn new(grants: Vec<FlowGrant>) -> Self {
        let relay = fake_relay().await;
        let ck = SecretKey::generate();
        let ak = SecretKey::generate();
        let agent = Endpoint::agent(
            UdpSocket::bind("127.0.0.1:0").await.unwrap(),
            ak.clone(),
            EndpointConfig::default(),
        )
        .unwrap();
        let client = Endpoint::client(
            UdpSocket::bind("127.0.0.1:0").await.unwrap(),
            ck.clone(),
            DEVICE_IP,
            EndpointConfig::default(),
        )
        .unwrap();
        let device = DeviceAccess {
            device: Name::new("laptop").unwrap(),
            user: Name::new("alice").unwrap(),
            key: ck.public_key().0,
            address: DEVICE_IP,
            grants,
        };
        let lab = Lab {
            relay,
            client,
            agent,
            device,
        };
        lab.grant(lab.device.grants.clone(), Duration::from_secs(60))
            .await;
        lab.client
            .add_site(SitePeer {
                site: SITE.into(),
                agent_key: ak.public_key(),
                relays: vec![relay],
                ticket: b"device-ticket".to_vec(),
            })
            .await
            .unwrap();
        lab
    }

    async fn grant(&self, grants: Vec<FlowGrant>, valid_for: Duration) {
        let device = DeviceAccess {
            grants,
            ..self.device.clone()
        };
        self.agent
            .set_access(
                vec![device],
                vec![(self.relay, b"agent-ticket".to_vec())],
                Instant::now() + valid_for,
            )
            .await
            .unwrap();
    }

    async fn connect(&self, dst: SocketAddr) -> io::Result<TcpFlow> {
        let flow = self.client.connect_tcp(SITE, dst).await.unwrap();
        tokio::time::timeout(PATIENCE, flow.established())
            .await
            .expect("connect hung")?;
        Ok(flow)
    }
}

/// Writes `msg` and reads it back.
async fn round_trip(flow: &mut TcpFlow, msg: &[u8]) -> io::Result<()> {
    flow.write_all(msg).await?;
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(PATIENCE, flow.read_exact(&mut back))
        .await
        .expect("echo hung")?;
    assert_eq!(back, msg);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_echo_through_the_relay_16_mib_intact() {
    let echo = tcp_echo().await;
    let lab = Lab::new(vec![grant(echo.port(), true, false)]).await;
    let flow = lab.connect(echo).await.unwrap();

    const LEN: usize = 16 << 20;
    let data: Vec<u8> = (0..LEN).map(|i| (i * 7 + i / 4093) as u8).collect();
    let start = Instant::now();
    let (mut r, mut w) = tokio::io::split(flow);
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::with_capacity(LEN);
    tokio::time::timeout(Duration::from_secs(120), r.read_to_end(&mut back))
        .await
        .expect("transfer hung")
        .unwrap();
    writer.await.unwrap();
    let took = start.elapsed();
    assert_eq!(back.len(), LEN);
    assert!(back == data, "the echoed bytes differ");
    eprintln!(
        "16 MiB echoed (each way) in {took:?}: {:.0} Mbit/s each way",
        LEN as f64 * 8.0 / took.as_secs_f64() / 1e6
    );

    let st = lab.client.status().await.unwrap();
    let site = &st.sites[0];
    assert_eq!(site.relay, Some(lab.relay));
    assert!(site.rtt.is_some() && site.handshake_age.is_some());
    assert!(site.tx_bytes > LEN as u64 && site.rx_bytes > LEN as u64);
    let a = lab.agent.status().await.unwrap();
    assert_eq!(a.flows.admitted, 1);
    assert_eq!(a.devices[0].last_path.map(|p| p.remote), Some(lab.relay));
    assert_eq!(a.drops.total(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flow_without_a_grant_is_refused() {
    let echo = tcp_echo().await;
    let other = tcp_echo().await;
    let lab = Lab::new(vec![grant(echo.port(), true, false)]).await;
    let err = lab.connect(other).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
    let a = lab.agent.status().await.unwrap();
    assert_eq!(a.flows.refused_no_grant, 1);
    assert_eq!(a.flows.admitted, 0);
    // The granted one works.
    let mut flow = lab.connect(echo).await.unwrap();
    round_trip(&mut flow, b"allowed").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_does_not_answer_refuses_the_flow() {
    // A port nobody listens on, granted.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = l.local_addr().unwrap();
    drop(l);
    let lab = Lab::new(vec![grant(dead.port(), true, false)]).await;
    let err = lab.connect(dead).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
    assert_eq!(lab.agent.status().await.unwrap().flows.dial_failed, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_without_the_device_cuts_the_open_flow() {
    let echo = tcp_echo().await;
    let lab = Lab::new(vec![grant(echo.port(), true, false)]).await;
    let mut flow = lab.connect(echo).await.unwrap();
    round_trip(&mut flow, b"before").await.unwrap();

    lab.agent
        .set_access(
            vec![],
            vec![(lab.relay, b"agent-ticket".to_vec())],
            Instant::now() + Duration::from_secs(60),
        )
        .await
        .unwrap();
    let mut b = [0u8; 16];
    let r = tokio::time::timeout(PATIENCE, flow.read(&mut b))
        .await
        .expect("the cut flow still hangs");
    assert_eq!(r.map_err(|e| e.kind()), Err(io::ErrorKind::ConnectionReset));
    let a = lab.agent.status().await.unwrap();
    assert_eq!(a.flows.revoked, 1);
    assert!(a.devices.is_empty());
    // And a new flow from it gets nowhere (no answer: it is no peer any more).
    let flow = lab.client.connect_tcp(SITE, echo).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_secs(2), flow.established())
            .await
            .is_err(),
        "a removed device got an answer"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_narrowed_cuts_only_the_flows_it_no_longer_allows() {
    let a_echo = tcp_echo().await;
    let b_echo = tcp_echo().await;
    let lab = Lab::new(vec![
        grant(a_echo.port(), true, false),
        grant(b_echo.port(), true, false),
    ])
    .await;
    let mut fa = lab.connect(a_echo).await.unwrap();
    let mut fb = lab.connect(b_echo).await.unwrap();
    lab.grant(
        vec![grant(a_echo.port(), true, false)],
        Duration::from_secs(60),
    )
    .await;
    let mut b = [0u8; 4];
    let r = tokio::time::timeout(PATIENCE, fb.read(&mut b))
        .await
        .unwrap();
    assert_eq!(r.map_err(|e| e.kind()), Err(io::ErrorKind::ConnectionReset));
    round_trip(&mut fa, b"still allowed").await.unwrap();
}

/// Fail closed: with no word from a node past `valid_until`, no new flow is admitted, but
/// open flows keep going (only a new AccessConfig cuts them): cutting every ssh because a
/// node restarted would hurt more than the bound protects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_access_refuses_new_flows_and_keeps_open_ones() {
    let echo = tcp_echo().await;
    let lab = Lab::new(vec![grant(echo.port(), true, false)]).await;
    let mut open = lab.connect(echo).await.unwrap();
    // Access valid for no time at all: stale at once.
    lab.grant(vec![grant(echo.port(), true, false)], Duration::ZERO)
        .await;
    let err = lab.connect(echo).await.unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
    round_trip(&mut open, b"still open").await.unwrap();
    let a = lab.agent.status().await.unwrap();
    assert!(!a.admitting);
    assert_eq!(a.flows.refused_stale, 1);
    // A heartbeat: admitting again.
    lab.agent
        .heartbeat(Instant::now() + Duration::from_secs(60))
        .unwrap();
    let mut again = lab.connect(echo).await.unwrap();
    round_trip(&mut again, b"again").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_echo_through_the_relay() {
    let echo = udp_echo().await;
    let lab = Lab::new(vec![grant(echo.port(), false, true)]).await;
    let flow = lab.client.open_udp(SITE, echo).await.unwrap();
    // The first datagram may wait for the handshake; send until one comes back.
    let mut b = [0u8; 64];
    let got = tokio::time::timeout(PATIENCE, async {
        loop {
            flow.send(b"ping").await.unwrap();
            if let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_millis(500), flow.recv(&mut b)).await
            {
                return n;
            }
        }
    })
    .await
    .expect("no udp echo");
    assert_eq!(&b[..got], b"ping");
    for i in 0..50u32 {
        flow.send(&i.to_be_bytes()).await.unwrap();
        let n = tokio::time::timeout(PATIENCE, flow.recv(&mut b))
            .await
            .unwrap()
            .unwrap();
        // Loopback does not reorder; stale duplicates from the first loop may lead.
        if b[..n] != i.to_be_bytes() {
            assert!(b[..n] == *b"ping", "{:?}", &b[..n]);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_key_gets_nothing_back_from_the_agent() {
    let lab = Lab::new(vec![]).await;
    // A WireGuard initiation from a key the agent does not know, sent straight to it.
    let stranger = SecretKey::generate();
    let mut peers = Peers::new(&stranger, Instant::now());
    let id = peers.add_peer(
        PeerConfig {
            key: lab.agent.public_key(),
            sources: Sources::Any,
            keepalive: None,
        },
        Instant::now(),
    );
    let mut out = [0u8; MAX_DATAGRAM];
    let n = peers.encapsulate(id, &[], &mut out).unwrap().unwrap().len;
    let probe = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    probe
        .send_to(&out[..n], lab.agent.local_addr())
        .await
        .unwrap();
    // And garbage, a truncated relay frame, an oversized datagram.
    probe
        .send_to(&[1, 0, 0, 0, 9, 9], lab.agent.local_addr())
        .await
        .unwrap();
    probe
        .send_to(&[0xA3, 0], lab.agent.local_addr())
        .await
        .unwrap();
    probe
        .send_to(&[4u8; 4000], lab.agent.local_addr())
        .await
        .unwrap();
    let mut b = [0u8; 2048];
    assert!(
        tokio::time::timeout(Duration::from_millis(700), probe.recv_from(&mut b))
            .await
            .is_err(),
        "the agent answered"
    );
    let a = lab.agent.status().await.unwrap();
    assert_eq!(a.drops.unknown_key, 1);
    assert_eq!(a.drops.malformed, 1);
    assert_eq!(a.drops.oversized, 1);
    assert_eq!(a.other_drops.relay_frames, 1);
}

#[test]
fn admission_is_a_pure_decision() {
    let now = Instant::now();
    let device = DeviceAccess {
        device: Name::new("laptop").unwrap(),
        user: Name::new("alice").unwrap(),
        key: [1; 32],
        address: DEVICE_IP,
        grants: vec![
            grant(22, true, false),
            FlowGrant {
                resource: Name::new("db").unwrap(),
                dst: FlowDst::Dns {
                    name: "db.internal".into(),
                    virtual_address: Ipv4Addr::new(100, 100, 0, 1),
                },
                ports: vec![(5432, 5432)],
                tcp: true,
                udp: false,
                icmp: false,
            },
        ],
    };
    let src: SocketAddr = (DEVICE_IP, 40000).into();
    let later = Some(now + Duration::from_secs(1));
    let ssh: SocketAddr = "127.0.0.1:22".parse().unwrap();
    assert_eq!(
        admission(Some(&device), later, now, Proto::Tcp, src, ssh),
        Ok(Target::Address(ssh))
    );
    assert_eq!(
        admission(
            Some(&device),
            later,
            now,
            Proto::Tcp,
            src,
            "100.100.0.1:5432".parse().unwrap()
        ),
        Ok(Target::Name("db.internal".into(), 5432))
    );
    assert_eq!(
        admission(Some(&device), later, now, Proto::Udp, src, ssh),
        Err(FlowRefusal::NoGrant)
    );
    assert_eq!(
        admission(
            Some(&device),
            later,
            now,
            Proto::Tcp,
            src,
            "127.0.0.1:23".parse().unwrap()
        ),
        Err(FlowRefusal::NoGrant)
    );
    assert_eq!(
        admission(Some(&device), Some(now), now, Proto::Tcp, src, ssh),
        Err(FlowRefusal::Stale)
    );
    assert_eq!(
        admission(Some(&device), None, now, Proto::Tcp, src, ssh),
        Err(FlowRefusal::Stale)
    );
    let spoofed: SocketAddr = "100.64.0.9:40000".parse().unwrap();
    assert_eq!(
        admission(Some(&device), later, now, Proto::Tcp, spoofed, ssh),
        Err(FlowRefusal::UnknownSource)
    );
    assert_eq!(
        admission(None, later, now, Proto::Tcp, src, ssh),
        Err(FlowRefusal::UnknownSource)
    );
}

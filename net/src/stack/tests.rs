//! Two stacks back to back in memory (client 100.64.0.2, accept side), a pump task that moves
//! packets between them (optionally losing a seeded fraction), and tokio's paused clock.

use std::hash::{DefaultHasher, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::*;

const CLIENT: &str = "100.64.0.2";

fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// What the accept side does with each new flow.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Policy {
    /// Admit and echo every byte/datagram back.
    Echo,
    /// Refuse everything.
    Refuse,
    /// Admit TCP and hand the flow to the test through `Pair::accepted`.
    Hand,
}

struct Pair {
    client: Arc<Mutex<Stack>>,
    server: Arc<Mutex<Stack>>,
    /// Every event of the accept side, in order.
    server_events: Arc<Mutex<Vec<StackEvent>>>,
    /// Every event of the client side, in order.
    client_events: Arc<Mutex<Vec<StackEvent>>>,
    accepted: mpsc::UnboundedReceiver<TcpFlow>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Pair {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Pair {
    fn new(policy: Policy, loss: f64, seed: u64) -> Self {
        Self::with(
            StackConfig::client(CLIENT.parse().unwrap()),
            policy,
            loss,
            seed,
        )
    }

    fn with(mut client_config: StackConfig, policy: Policy, loss: f64, seed: u64) -> Self {
        client_config.seed = Some(seed);
        let server_config = StackConfig {
            seed: Some(seed + 1),
            ..StackConfig::accept()
        };
        let client = Arc::new(Mutex::new(Stack::new(client_config, now()).unwrap()));
        let server = Arc::new(Mutex::new(Stack::new(server_config, now()).unwrap()));
        let server_events = Arc::new(Mutex::new(Vec::new()));
        let client_events = Arc::new(Mutex::new(Vec::new()));
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let (accepted_tx, accepted) = mpsc::unbounded_channel();
        let pump = tokio::spawn(pump(
            client.clone(),
            server.clone(),
            events_tx,
            client_events.clone(),
            loss,
            seed,
        ));
        let policy = tokio::spawn(serve(
            server.clone(),
            events_rx,
            server_events.clone(),
            accepted_tx,
            policy,
        ));
        Self {
            client,
            server,
            server_events,
            client_events,
            accepted,
            tasks: vec![pump, policy],
        }
    }

    fn connect(&self, dst: &str) -> TcpFlow {
        let mut client = lock(&self.client);
        let flow = client.connect_tcp(dst.parse().unwrap(), now()).unwrap();
        client.waker().notify_one();
        flow
    }

    fn open_udp(&self, dst: &str) -> UdpFlow {
        let mut client = lock(&self.client);
        let flow = client.open_udp(dst.parse().unwrap(), now()).unwrap();
        client.waker().notify_one();
        flow
    }

    fn new_flows(&self) -> Vec<(Proto, SocketAddr, SocketAddr)> {
        lock(&self.server_events)
            .iter()
            .filter_map(|event| match event {
                StackEvent::NewFlow {
                    proto, src, dst, ..
                } => Some((*proto, *src, *dst)),
                StackEvent::Closed { .. } => None,
            })
            .collect()
    }
}

/// The IO shell's loop, in memory.
async fn pump(
    client: Arc<Mutex<Stack>>,
    server: Arc<Mutex<Stack>>,
    server_events: mpsc::UnboundedSender<StackEvent>,
    client_events: Arc<Mutex<Vec<StackEvent>>>,
    loss: f64,
    seed: u64,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let (client_waker, server_waker) = (lock(&client).waker(), lock(&server).waker());
    loop {
        let now = now();
        let deadline = {
            let (mut c, mut s) = (lock(&client), lock(&server));
            let mut moved = false;
            for _ in 0..64 {
                c.poll(now);
                s.poll(now);
                let mut any = false;
                while let Some(packet) = c.poll_packet() {
                    any = true;
                    if !rng.gen_bool(loss) {
                        s.handle_packet(&packet, now);
                    }
                }
                while let Some(packet) = s.poll_packet() {
                    any = true;
                    if !rng.gen_bool(loss) {
                        c.handle_packet(&packet, now);
                    }
                }
                if !any {
                    break;
                }
                moved = true;
            }
            while let Some(event) = s.poll_event() {
                let _ = server_events.send(event);
            }
            while let Some(event) = c.poll_event() {
                lock(&client_events).push(event);
            }
            if moved {
                None
            } else {
                [c.poll_timeout(now), s.poll_timeout(now)]
                    .into_iter()
                    .flatten()
                    .min()
                    .map(|at| at.max(now))
                    .or(Some(now + Duration::from_secs(3600)))
            }
        };
        let Some(deadline) = deadline else {
            // Let the flows' tasks run before the next round.
            tokio::task::yield_now().await;
            continue;
        };
        tokio::select! {
            () = client_waker.notified() => {}
            () = server_waker.notified() => {}
            () = tokio::time::sleep_until(deadline.into()) => {}
        }
    }
}

/// The agent's policy loop: decides every new flow, echoes what it admits.
async fn serve(
    server: Arc<Mutex<Stack>>,
    mut events: mpsc::UnboundedReceiver<StackEvent>,
    log: Arc<Mutex<Vec<StackEvent>>>,
    accepted: mpsc::UnboundedSender<TcpFlow>,
    policy: Policy,
) {
    while let Some(event) = events.recv().await {
        lock(&log).push(event.clone());
        let StackEvent::NewFlow { id, proto, .. } = event else {
            continue;
        };
        let mut stack = lock(&server);
        match (policy, proto) {
            (Policy::Refuse, _) => stack.refuse(id),
            (Policy::Hand, Proto::Tcp) => {
                let _ = accepted.send(stack.admit_tcp(id).unwrap());
            }
            (_, Proto::Tcp) => {
                let flow = stack.admit_tcp(id).unwrap();
                tokio::spawn(async move {
                    let (mut read, mut write) = tokio::io::split(flow);
                    if tokio::io::copy(&mut read, &mut write).await.is_ok() {
                        let _ = write.shutdown().await;
                    }
                });
            }
            (_, Proto::Udp) => {
                let flow = stack.admit_udp(id).unwrap();
                tokio::spawn(async move {
                    let mut buf = vec![0; 2048];
                    while let Ok(n) = flow.recv(&mut buf).await {
                        if flow.send(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
            (_, Proto::Icmp) => stack.admit_icmp(id).unwrap(),
        }
        stack.waker().notify_one();
    }
}

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0; len];
    StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    data
}

fn hash(data: &[u8]) -> u64 {
    let mut hasher = DefaultHasher::new();
    hasher.write(data);
    hasher.finish()
}

/// Writes `data` through `flow` while reading the echo back; returns what came back.
async fn round_trip(flow: TcpFlow, data: Vec<u8>) -> io::Result<Vec<u8>> {
    let (mut read, mut write) = tokio::io::split(flow);
    let writer = tokio::spawn(async move {
        write.write_all(&data).await?;
        write.shutdown().await?;
        io::Result::Ok(write)
    });
    let mut back = Vec::new();
    read.read_to_end(&mut back).await?;
    writer.await.unwrap()?;
    Ok(back)
}

async fn echo_16mib(loss: f64, seed: u64) {
    let pair = Pair::new(Policy::Echo, loss, seed);
    let flow = pair.connect("10.0.0.5:5432");
    let data = random_bytes(16 << 20, seed);
    let expected = hash(&data);
    let back = tokio::time::timeout(Duration::from_secs(600), round_trip(flow, data))
        .await
        .expect("round trip finished")
        .unwrap_or_else(|e| {
            panic!(
                "round trip failed: {e} at {:?}; client {:?} {:?}; server {:?} {:?}",
                tokio::time::Instant::now(),
                lock(&pair.client_events),
                lock(&pair.client).stats(),
                lock(&pair.server_events),
                lock(&pair.server).stats(),
            )
        });
    assert_eq!(back.len(), 16 << 20);
    assert_eq!(hash(&back), expected, "echoed bytes differ");

    let flows = pair.new_flows();
    assert_eq!(flows.len(), 1);
    let (proto, src, dst) = flows[0];
    assert_eq!(proto, Proto::Tcp);
    assert_eq!(src.ip(), CLIENT.parse::<IpAddr>().unwrap());
    assert_eq!(dst, "10.0.0.5:5432".parse().unwrap());
}

#[tokio::test(start_paused = true)]
async fn tcp_echo_16_mib_intact() {
    echo_16mib(0.0, 1).await;
}

#[tokio::test(start_paused = true)]
async fn tcp_echo_16_mib_intact_with_2_percent_loss() {
    echo_16mib(0.02, 2).await;
}

#[tokio::test(start_paused = true)]
async fn refused_tcp_fails_promptly_and_opens_nothing() {
    let pair = Pair::new(Policy::Refuse, 0.0, 3);
    let flow = pair.connect("10.0.0.5:5432");
    let result = tokio::time::timeout(Duration::from_secs(1), flow.established())
        .await
        .expect("refusal arrived within 1 s");
    assert_eq!(result.unwrap_err().kind(), io::ErrorKind::ConnectionRefused);
    let mut flow = flow;
    let mut buf = [0; 16];
    assert!(flow.read(&mut buf).await.is_err());

    let stats = lock(&pair.server).stats();
    assert_eq!(stats.refused, 1);
    assert_eq!(stats.open_flows, 0);
    assert_eq!(stats.pending_flows, 0);
    assert_eq!(lock(&pair.server).flows().count(), 0);
    assert_eq!(lock(&pair.client).flows().count(), 0);
    assert!(lock(&pair.client_events).contains(&StackEvent::Closed {
        id: flow.id(),
        why: CloseReason::Reset
    }));
}

#[tokio::test(start_paused = true)]
async fn abort_cuts_an_open_flow() {
    let mut pair = Pair::new(Policy::Hand, 0.0, 4);
    let mut flow = pair.connect("10.0.0.5:22");
    flow.write_all(b"hello").await.unwrap();
    let mut server_flow = pair.accepted.recv().await.unwrap();
    let mut buf = [0; 5];
    server_flow.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"hello");
    server_flow.write_all(b"world").await.unwrap();
    flow.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"world");

    {
        let mut server = lock(&pair.server);
        server.abort(server_flow.id());
        server.waker().notify_one();
    }
    let read = tokio::time::timeout(Duration::from_secs(1), flow.read(&mut buf))
        .await
        .expect("the client saw the reset within 1 s");
    assert_eq!(read.unwrap_err().kind(), io::ErrorKind::ConnectionReset);
    assert_eq!(
        flow.write(b"more").await.unwrap_err().kind(),
        io::ErrorKind::ConnectionReset
    );
    assert_eq!(
        server_flow.read(&mut buf).await.unwrap_err().kind(),
        io::ErrorKind::ConnectionReset
    );
    assert_eq!(lock(&pair.server).stats().open_flows, 0);
    assert_eq!(lock(&pair.client).stats().open_flows, 0);
    assert!(lock(&pair.server_events).contains(&StackEvent::Closed {
        id: server_flow.id(),
        why: CloseReason::Aborted
    }));
}

#[tokio::test(start_paused = true)]
async fn fifty_concurrent_flows_complete() {
    let pair = Pair::new(Policy::Echo, 0.0, 5);
    let mut tasks = Vec::new();
    for i in 0..50u16 {
        let flow = pair.connect(&format!("10.0.0.5:{}", 1000 + i));
        let data = random_bytes(256 << 10, u64::from(i));
        tasks.push(tokio::spawn(async move {
            let expected = hash(&data);
            let back = round_trip(flow, data).await.unwrap();
            assert_eq!(hash(&back), expected);
        }));
    }
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(120), task)
            .await
            .expect("flow finished")
            .unwrap();
    }
    let mut ports: Vec<u16> = pair
        .new_flows()
        .iter()
        .map(|(_, _, dst)| dst.port())
        .collect();
    ports.sort_unstable();
    assert_eq!(ports, (1000..1050).collect::<Vec<_>>());
}

#[tokio::test(start_paused = true)]
async fn udp_datagrams_both_ways() {
    let pair = Pair::new(Policy::Echo, 0.0, 6);
    let flow = pair.open_udp("10.0.0.5:53");
    let mut buf = [0; 2048];
    for i in 0..20u8 {
        let datagram = vec![i; 100 + usize::from(i) * 50];
        flow.send(&datagram).await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(1), flow.recv(&mut buf))
            .await
            .expect("echo arrived")
            .unwrap();
        assert_eq!(&buf[..n], &datagram[..]);
    }
    let too_big = vec![0; 1280 - 28 + 1];
    assert_eq!(
        flow.send(&too_big).await.unwrap_err().kind(),
        io::ErrorKind::InvalidInput
    );
    assert_eq!(
        pair.new_flows(),
        vec![(Proto::Udp, flow.src(), "10.0.0.5:53".parse().unwrap())]
    );
}

#[tokio::test(start_paused = true)]
async fn refused_udp_gets_nothing() {
    let pair = Pair::new(Policy::Refuse, 0.0, 7);
    let flow = pair.open_udp("10.0.0.5:53");
    let mut buf = [0; 2048];
    for _ in 0..5 {
        flow.send(b"query").await.unwrap();
        assert!(
            tokio::time::timeout(Duration::from_secs(1), flow.recv(&mut buf))
                .await
                .is_err(),
            "nothing comes back"
        );
    }
    // Refused once; the later datagrams of the same 5-tuple raise no new event.
    assert_eq!(pair.new_flows().len(), 1);
    let stats = lock(&pair.server).stats();
    assert_eq!(stats.refused, 1);
    assert_eq!(stats.no_flow, 4);
    assert_eq!(stats.open_flows, 0);
    assert_eq!(lock(&pair.client).stats().packets_in, 0);
}

#[tokio::test(start_paused = true)]
async fn half_close_reads_eof_and_still_sends() {
    let mut pair = Pair::new(Policy::Hand, 0.0, 8);
    let mut flow = pair.connect("10.0.0.5:8000");
    flow.write_all(b"request").await.unwrap();
    flow.shutdown().await.unwrap();

    let mut server_flow = pair.accepted.recv().await.unwrap();
    let mut request = Vec::new();
    server_flow.read_to_end(&mut request).await.unwrap();
    assert_eq!(request, b"request");
    let response = random_bytes(1 << 20, 8);
    server_flow.write_all(&response).await.unwrap();
    server_flow.shutdown().await.unwrap();

    let mut got = Vec::new();
    flow.read_to_end(&mut got).await.unwrap();
    assert_eq!(hash(&got), hash(&response));
    assert_eq!(
        flow.write(b"x").await.unwrap_err().kind(),
        io::ErrorKind::BrokenPipe
    );

    // Both sides closed cleanly and forgot the flow.
    let (client_id, server_id) = (flow.id(), server_flow.id());
    drop((flow, server_flow));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(lock(&pair.client_events).contains(&StackEvent::Closed {
        id: client_id,
        why: CloseReason::Finished
    }));
    assert!(lock(&pair.server_events).contains(&StackEvent::Closed {
        id: server_id,
        why: CloseReason::Finished
    }));
    assert_eq!(lock(&pair.server).stats().open_flows, 0);
    assert_eq!(lock(&pair.client).stats().open_flows, 0);
}

#[tokio::test(start_paused = true)]
async fn dropping_a_flow_delivers_what_was_written() {
    let mut pair = Pair::new(Policy::Hand, 0.0, 9);
    let mut flow = pair.connect("10.0.0.5:8000");
    let data = random_bytes(300 << 10, 9);
    flow.write_all(&data).await.unwrap();
    drop(flow);
    let mut server_flow = pair.accepted.recv().await.unwrap();
    let mut got = Vec::new();
    server_flow.read_to_end(&mut got).await.unwrap();
    assert_eq!(hash(&got), hash(&data));
}

#[tokio::test(start_paused = true)]
async fn ipv6_flows() {
    let pair = Pair::with(
        StackConfig::client("fd00::2".parse().unwrap()),
        Policy::Echo,
        0.0,
        10,
    );
    let flow = pair.connect("[fd00::5]:22");
    let data = random_bytes(1 << 20, 10);
    let back = round_trip(flow, data.clone()).await.unwrap();
    assert_eq!(hash(&back), hash(&data));
    let udp = pair.open_udp("[fd00::5]:53");
    udp.send(b"v6").await.unwrap();
    let mut buf = [0; 16];
    let n = udp.recv(&mut buf).await.unwrap();
    assert_eq!(&buf[..n], b"v6");
    assert_eq!(
        lock(&pair.client)
            .connect_tcp("10.0.0.5:22".parse().unwrap(), now())
            .unwrap_err(),
        StackError::BadDestination("10.0.0.5:22".parse().unwrap())
    );
}

/// A SYN from a real client stack, to feed by hand.
fn client_syn(dst: &str, seed: u64) -> Vec<u8> {
    let config = StackConfig {
        seed: Some(seed),
        ..StackConfig::client(CLIENT.parse().unwrap())
    };
    let mut client = Stack::new(config, now()).unwrap();
    let _flow = client.connect_tcp(dst.parse().unwrap(), now()).unwrap();
    client.poll(now());
    client.poll_packet().unwrap().to_vec()
}

fn echo_request(src: Ipv4Addr, dst: Ipv4Addr, ident: u16, seq: u16) -> Vec<u8> {
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{Icmpv4Packet, Icmpv4Repr, IpProtocol, Ipv4Packet, Ipv4Repr};
    let icmp = Icmpv4Repr::EchoRequest {
        ident,
        seq_no: seq,
        data: b"ping",
    };
    let ip = Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: IpProtocol::Icmp,
        payload_len: icmp.buffer_len(),
        hop_limit: 64,
    };
    let mut buf = vec![0; ip.buffer_len() + icmp.buffer_len()];
    let caps = ChecksumCapabilities::default();
    ip.emit(&mut Ipv4Packet::new_unchecked(&mut buf[..]), &caps);
    icmp.emit(
        &mut Icmpv4Packet::new_unchecked(&mut buf[ip.buffer_len()..]),
        &caps,
    );
    buf
}

#[test]
fn icmp_echo_is_a_flow_answered_once_admitted() {
    let mut server = Stack::new(StackConfig::accept(), Instant::now()).unwrap();
    let (src, dst) = (CLIENT.parse().unwrap(), Ipv4Addr::new(10, 0, 0, 5));
    server.handle_packet(&echo_request(src, dst, 7, 1), Instant::now());
    let Some(StackEvent::NewFlow { id, proto, .. }) = server.poll_event() else {
        panic!("no new flow");
    };
    assert_eq!(proto, Proto::Icmp);
    assert!(
        server.poll_packet().is_none(),
        "nothing answered before admission"
    );
    server.admit_icmp(id).unwrap();
    server.handle_packet(&echo_request(src, dst, 7, 2), Instant::now());
    for seq in [1, 2] {
        let reply = server.poll_packet().expect("echo reply");
        let ip = smoltcp::wire::Ipv4Packet::new_checked(&reply[..]).unwrap();
        assert_eq!((ip.src_addr(), ip.dst_addr()), (dst, src));
        let icmp = smoltcp::wire::Icmpv4Packet::new_checked(ip.payload()).unwrap();
        assert_eq!(icmp.msg_type(), smoltcp::wire::Icmpv4Message::EchoReply);
        assert!(icmp.verify_checksum());
        assert_eq!((icmp.echo_ident(), icmp.echo_seq_no()), (7, seq));
    }
}

#[test]
fn a_second_syn_to_the_same_destination_gets_its_own_flow() {
    let t = Instant::now();
    let mut server = Stack::new(StackConfig::accept(), t).unwrap();
    let (a, b) = (client_syn("10.0.0.5:22", 1), client_syn("10.0.0.5:22", 2));
    server.handle_packet(&a, t);
    server.handle_packet(&b, t);
    server.handle_packet(&a, t); // a retransmission: no new event
    let ids: Vec<FlowId> = std::iter::from_fn(|| server.poll_event())
        .map(|event| match event {
            StackEvent::NewFlow { id, .. } => id,
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(ids.len(), 2);
    let second = server.admit_tcp(ids[1]).unwrap();
    let first = server.admit_tcp(ids[0]).unwrap();
    assert_ne!(first.src(), second.src());
    server.poll(t);
    let syn_acks: Vec<_> = std::iter::from_fn(|| server.poll_packet()).collect();
    assert_eq!(syn_acks.len(), 2);
    assert_eq!(server.stats().open_flows, 2);
    assert_eq!(
        server.admit_tcp(ids[0]).unwrap_err(),
        StackError::NotPending {
            id: ids[0],
            expected: Proto::Tcp
        }
    );
}

#[test]
fn bad_input_is_counted_and_opens_nothing() {
    let t = Instant::now();
    let mut server = Stack::new(StackConfig::accept(), t).unwrap();
    let syn = client_syn("10.0.0.5:5432", 1);

    // Every truncation of a real SYN.
    for len in 0..syn.len() {
        server.handle_packet(&syn[..len], t);
    }
    // Wrong IP versions.
    for version in [0u8, 1, 5, 7, 15] {
        let mut bad = syn.clone();
        bad[0] = (version << 4) | (bad[0] & 0x0f);
        server.handle_packet(&bad, t);
    }
    // A corrupted IPv4 header checksum.
    let mut bad = syn.clone();
    bad[10] ^= 0xff;
    server.handle_packet(&bad, t);
    // Oversized.
    let mut big = syn.clone();
    big.resize(1281, 0);
    server.handle_packet(&big, t);
    server.handle_packet(&vec![0x45; 70_000], t);
    let crafted = syn.len() + 5 + 1 + 2;
    let stats = server.stats();
    assert_eq!(stats.malformed + stats.oversized, crafted as u64);
    assert_eq!(stats.oversized, 2);

    // Random bytes, with a plausible first byte half of the time.
    let mut rng = StdRng::seed_from_u64(11);
    for i in 0..20_000 {
        let len = rng.gen_range(0..1400);
        let mut packet = vec![0; len];
        rng.fill_bytes(&mut packet);
        if i % 2 == 0 && len > 0 {
            packet[0] = if rng.gen_bool(0.5) { 0x45 } else { 0x60 };
        }
        server.handle_packet(&packet, t);
        server.poll(t);
    }
    let stats = server.stats();
    assert_eq!(stats.packets_in, crafted as u64 + 20_000);
    assert_eq!(stats.open_flows, 0);
    // Whatever parsed as a new flow by chance waits for admission and is not answered.
    assert_eq!(stats.pending_flows, server.flows().count());
    while let Some(event) = server.poll_event() {
        assert!(matches!(event, StackEvent::NewFlow { .. }));
    }
    assert!(
        std::iter::from_fn(|| server.poll_packet()).all(|p| {
            // Only RSTs for stray TCP segments may leave.
            p[0] >> 4 == 4 && p[9] == 6 || p[0] >> 4 == 6
        }),
        "only TCP resets leave"
    );
    assert!(stats.malformed + stats.oversized > 19_000, "{stats:?}");
}

#[test]
fn config_errors_name_the_field() {
    let err = Stack::new(
        StackConfig {
            mtu: 100,
            ..StackConfig::accept()
        },
        Instant::now(),
    )
    .err()
    .unwrap();
    assert_eq!(err.field, "mtu");
    let err = StackConfig {
        flow_buffer: 0,
        ..StackConfig::client(CLIENT.parse().unwrap())
    }
    .validate()
    .unwrap_err();
    assert_eq!(err.field, "flow_buffer");
}

#[test]
fn client_only_calls_fail_in_accept_mode_and_back() {
    let t = Instant::now();
    let mut server = Stack::new(StackConfig::accept(), t).unwrap();
    assert_eq!(
        server
            .connect_tcp("10.0.0.5:1".parse().unwrap(), t)
            .unwrap_err(),
        StackError::WrongMode
    );
    let mut client = Stack::new(StackConfig::client(CLIENT.parse().unwrap()), t).unwrap();
    assert_eq!(
        client.admit_tcp(FlowId(1)).unwrap_err(),
        StackError::UnknownFlow(FlowId(1))
    );
    // Client mode drops packets for other addresses and answers none.
    client.handle_packet(&client_syn("10.0.0.5:5432", 1), t);
    assert_eq!(client.stats().misdirected, 1);
    assert!(client.poll_packet().is_none());
}

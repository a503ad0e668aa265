//! Packet parsing for admission and bookkeeping, the packets the stack builds itself (UDP,
//! ICMP echo replies), and the smoltcp device that connects the interface to the stack's
//! queues without copying inbound packets.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};

use bytes::BytesMut;
use smoltcp::phy::{self, Checksum, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{
    Icmpv4Message, Icmpv4Packet, Icmpv6Message, Icmpv6Packet, IpAddress, IpProtocol, IpRepr,
    Ipv4Packet, Ipv6Packet, TcpOption, TcpPacket, UdpPacket, UdpRepr,
};

/// Why an inbound packet was dropped before any flow saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reject {
    /// Not a well-formed IPv4/IPv6 packet with a well-formed TCP/UDP/ICMP header.
    Malformed,
    /// Well-formed but not handled: fragments, IPv6 extension headers, other protocols,
    /// ICMP other than echo requests.
    Unsupported,
    /// Longer than the configured inner MTU.
    Oversized,
}

/// The parts of an inbound packet the stack decides on.
#[derive(Debug)]
pub(super) struct Parsed<'a> {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub l4: L4<'a>,
}

/// The transport header of an inbound packet.
#[derive(Debug)]
pub(super) enum L4<'a> {
    Tcp {
        src_port: u16,
        dst_port: u16,
        syn: bool,
        ack: bool,
        rst: bool,
        ack_number: u32,
        /// The window field as sent (unscaled).
        window: u16,
        /// The window scale option (parsed on SYNs only).
        wscale: Option<u8>,
    },
    Udp {
        src_port: u16,
        dst_port: u16,
        payload: &'a [u8],
    },
    /// An ICMP (v4) or ICMPv6 echo request: `message` is the whole ICMP message.
    Echo { ident: u16, message: &'a [u8] },
}

/// Parses `packet` far enough to classify it. Never panics on any input.
pub(super) fn parse(packet: &[u8], mtu: usize) -> Result<Parsed<'_>, Reject> {
    if packet.len() > mtu {
        return Err(Reject::Oversized);
    }
    let Some(first) = packet.first() else {
        return Err(Reject::Malformed);
    };
    let (src, dst, proto, payload) = match first >> 4 {
        4 => {
            let ip = Ipv4Packet::new_checked(packet).map_err(|_| Reject::Malformed)?;
            if !ip.verify_checksum() {
                return Err(Reject::Malformed);
            }
            if ip.more_frags() || ip.frag_offset() != 0 {
                return Err(Reject::Unsupported);
            }
            let (src, dst) = (ip.src_addr(), ip.dst_addr());
            if src.is_unspecified()
                || src.is_multicast()
                || src.is_broadcast()
                || dst.is_unspecified()
                || dst.is_multicast()
                || dst.is_broadcast()
            {
                return Err(Reject::Malformed);
            }
            (
                IpAddr::V4(src),
                IpAddr::V4(dst),
                ip.next_header(),
                ip.payload(),
            )
        }
        6 => {
            let ip = Ipv6Packet::new_checked(packet).map_err(|_| Reject::Malformed)?;
            let (src, dst) = (ip.src_addr(), ip.dst_addr());
            if src.is_unspecified()
                || src.is_multicast()
                || dst.is_unspecified()
                || dst.is_multicast()
            {
                return Err(Reject::Malformed);
            }
            (
                IpAddr::V6(src),
                IpAddr::V6(dst),
                ip.next_header(),
                ip.payload(),
            )
        }
        _ => return Err(Reject::Malformed),
    };
    let l4 = match proto {
        IpProtocol::Tcp => {
            let tcp = TcpPacket::new_checked(payload).map_err(|_| Reject::Malformed)?;
            if tcp.src_port() == 0 || tcp.dst_port() == 0 {
                return Err(Reject::Malformed);
            }
            L4::Tcp {
                src_port: tcp.src_port(),
                dst_port: tcp.dst_port(),
                syn: tcp.syn(),
                ack: tcp.ack(),
                rst: tcp.rst(),
                ack_number: tcp.ack_number().0 as u32,
                window: tcp.window_len(),
                wscale: if tcp.syn() {
                    window_scale(tcp.options())
                } else {
                    None
                },
            }
        }
        IpProtocol::Udp => {
            let udp = UdpPacket::new_checked(payload).map_err(|_| Reject::Malformed)?;
            if udp.src_port() == 0 || udp.dst_port() == 0 {
                return Err(Reject::Malformed);
            }
            L4::Udp {
                src_port: udp.src_port(),
                dst_port: udp.dst_port(),
                payload: udp.payload(),
            }
        }
        IpProtocol::Icmp if src.is_ipv4() => {
            let icmp = Icmpv4Packet::new_checked(payload).map_err(|_| Reject::Malformed)?;
            if icmp.msg_type() != Icmpv4Message::EchoRequest {
                return Err(Reject::Unsupported);
            }
            if !icmp.verify_checksum() {
                return Err(Reject::Malformed);
            }
            L4::Echo {
                ident: icmp.echo_ident(),
                message: payload,
            }
        }
        IpProtocol::Icmpv6 => {
            let (IpAddr::V6(src6), IpAddr::V6(dst6)) = (src, dst) else {
                return Err(Reject::Malformed);
            };
            let icmp = Icmpv6Packet::new_checked(payload).map_err(|_| Reject::Malformed)?;
            if icmp.msg_type() != Icmpv6Message::EchoRequest {
                return Err(Reject::Unsupported);
            }
            if !icmp.verify_checksum(&src6, &dst6) {
                return Err(Reject::Malformed);
            }
            L4::Echo {
                ident: icmp.echo_ident(),
                message: payload,
            }
        }
        _ => return Err(Reject::Unsupported),
    };
    Ok(Parsed { src, dst, l4 })
}

/// The window scale option among a SYN's options, if any (malformed options: none).
fn window_scale(mut options: &[u8]) -> Option<u8> {
    while !options.is_empty() {
        let (rest, option) = TcpOption::parse(options).ok()?;
        match option {
            TcpOption::WindowScale(shift) => return Some(shift.min(14)),
            TcpOption::EndOfList => return None,
            _ => options = rest,
        }
    }
    None
}

/// The stack's outbound packets: one queue, packets carved out of a shared arena so that a
/// packet costs no allocation of its own once the shell has dropped the earlier ones.
pub(super) struct OutQueue {
    arena: BytesMut,
    queue: VecDeque<BytesMut>,
    /// Packets queued since the stack was made (for `StackStats`).
    pub sent: u64,
}

/// Room reserved at once for outbound packets (about 50 packets of 1280 bytes).
const ARENA_BYTES: usize = 64 * 1024;

impl OutQueue {
    pub fn new() -> Self {
        Self {
            arena: BytesMut::with_capacity(ARENA_BYTES),
            queue: VecDeque::new(),
            sent: 0,
        }
    }

    /// A zeroed buffer of `len` bytes; hand it back with [`OutQueue::push`].
    pub fn alloc(&mut self, len: usize) -> BytesMut {
        if self.arena.capacity() < len {
            // Reuses the old allocation when every packet carved from it has been dropped.
            self.arena.reserve(ARENA_BYTES.max(len));
        }
        self.arena.resize(len, 0);
        self.arena.split_to(len)
    }

    pub fn push(&mut self, packet: BytesMut) {
        self.sent += 1;
        self.queue.push_back(packet);
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Queued packets from index `start` on.
    pub fn since(&mut self, start: usize) -> impl Iterator<Item = &mut BytesMut> {
        self.queue.range_mut(start..)
    }

    pub fn pop(&mut self) -> Option<BytesMut> {
        self.queue.pop_front()
    }

    /// Queues a UDP datagram from `ours` to `theirs`.
    pub fn push_udp(&mut self, ours: SocketAddr, theirs: SocketAddr, payload: &[u8]) {
        let udp = UdpRepr {
            src_port: ours.port(),
            dst_port: theirs.port(),
        };
        let (src, dst) = (IpAddress::from(ours.ip()), IpAddress::from(theirs.ip()));
        let ip = IpRepr::new(
            src,
            dst,
            IpProtocol::Udp,
            udp.header_len() + payload.len(),
            64,
        );
        let mut buf = self.alloc(ip.buffer_len());
        let caps = ChecksumCapabilities::default();
        let header = ip.header_len();
        ip.emit(&mut buf[..], &caps);
        udp.emit(
            &mut UdpPacket::new_unchecked(&mut buf[header..]),
            &src,
            &dst,
            payload.len(),
            |out| out.copy_from_slice(payload),
            &caps,
        );
        self.push(buf);
    }

    /// Queues the echo reply to `request` (a whole ICMP or ICMPv6 echo request message)
    /// from `ours` to `theirs`.
    pub fn push_echo_reply(&mut self, ours: IpAddr, theirs: IpAddr, request: &[u8]) {
        let (src, dst) = (IpAddress::from(ours), IpAddress::from(theirs));
        let proto = if ours.is_ipv4() {
            IpProtocol::Icmp
        } else {
            IpProtocol::Icmpv6
        };
        let ip = IpRepr::new(src, dst, proto, request.len(), 64);
        let mut buf = self.alloc(ip.buffer_len());
        let header = ip.header_len();
        ip.emit(&mut buf[..], &ChecksumCapabilities::default());
        let message = &mut buf[header..];
        message.copy_from_slice(request);
        if ours.is_ipv4() {
            let mut icmp = Icmpv4Packet::new_unchecked(message);
            icmp.set_msg_type(Icmpv4Message::EchoReply);
            icmp.fill_checksum();
        } else if let (IpAddr::V6(src6), IpAddr::V6(dst6)) = (ours, theirs) {
            let mut icmp = Icmpv6Packet::new_unchecked(message);
            icmp.set_msg_type(Icmpv6Message::EchoReply);
            icmp.fill_checksum(&src6, &dst6);
        }
        self.push(buf);
    }
}

/// The smoltcp device: at most one inbound packet, borrowed (no copy), and the outbound queue.
pub(super) struct Phy<'a> {
    pub rx: Option<&'a [u8]>,
    pub out: &'a mut OutQueue,
    pub mtu: usize,
}

/// The checksum work smoltcp does: compute everything it sends, verify nothing it receives.
/// WireGuard's AEAD has already authenticated every inbound byte, so a checksum can only be
/// wrong if the (authenticated) peer made it so, which hurts nobody but that peer's flow; the
/// IPv4 header checksum is still checked by [`parse`] before smoltcp sees a packet.
pub(super) fn smoltcp_checksums() -> ChecksumCapabilities {
    let mut caps = ChecksumCapabilities::default();
    caps.ipv4 = Checksum::Tx;
    caps.tcp = Checksum::Tx;
    caps.udp = Checksum::Tx;
    caps.icmpv4 = Checksum::Tx;
    caps.icmpv6 = Checksum::Tx;
    caps
}

impl phy::Device for Phy<'_> {
    type RxToken<'b>
        = Rx<'b>
    where
        Self: 'b;
    type TxToken<'b>
        = Tx<'b>
    where
        Self: 'b;

    fn receive(&mut self, _: SmolInstant) -> Option<(Rx<'_>, Tx<'_>)> {
        let packet = self.rx.take()?;
        Some((Rx(packet), Tx(self.out)))
    }

    fn transmit(&mut self, _: SmolInstant) -> Option<Tx<'_>> {
        Some(Tx(self.out))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        caps.checksum = smoltcp_checksums();
        caps
    }
}

/// An inbound packet handed to smoltcp.
pub(super) struct Rx<'a>(&'a [u8]);

impl phy::RxToken for Rx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.0)
    }
}

/// Room for one outbound packet.
pub(super) struct Tx<'a>(&'a mut OutQueue);

impl phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut packet = self.0.alloc(len);
        let result = f(&mut packet);
        self.0.push(packet);
        result
    }
}

/// The parts of an outbound TCP segment [`fix_pure_ack`] needs.
pub(super) struct Segment {
    pub ours: SocketAddr,
    pub theirs: SocketAddr,
    pub seq: u32,
    /// Sequence space the segment occupies (payload, SYN, FIN); 0 for a pure ACK.
    pub len: u32,
    /// Nothing but ACK (no payload, no SYN, FIN or RST).
    pub pure_ack: bool,
}

/// Reads an outbound TCP segment built by smoltcp (`None` for anything else).
pub(super) fn outbound_segment(packet: &[u8]) -> Option<Segment> {
    let (src, dst, payload) = match packet.first()? >> 4 {
        4 => {
            let ip = Ipv4Packet::new_checked(packet).ok()?;
            if ip.next_header() != IpProtocol::Tcp {
                return None;
            }
            (
                IpAddr::V4(ip.src_addr()),
                IpAddr::V4(ip.dst_addr()),
                ip.payload(),
            )
        }
        6 => {
            let ip = Ipv6Packet::new_checked(packet).ok()?;
            if ip.next_header() != IpProtocol::Tcp {
                return None;
            }
            (
                IpAddr::V6(ip.src_addr()),
                IpAddr::V6(ip.dst_addr()),
                ip.payload(),
            )
        }
        _ => return None,
    };
    let tcp = TcpPacket::new_checked(payload).ok()?;
    let data = tcp.payload().len() as u32;
    let len = data + u32::from(tcp.syn()) + u32::from(tcp.fin());
    Some(Segment {
        ours: SocketAddr::new(src, tcp.src_port()),
        theirs: SocketAddr::new(dst, tcp.dst_port()),
        seq: tcp.seq_number().0 as u32,
        len,
        pure_ack: len == 0 && !tcp.rst() && tcp.ack(),
    })
}

/// Sets the sequence number of an outbound pure ACK to `seq` (and fixes its checksum).
pub(super) fn set_seq(packet: &mut [u8], seq: u32) {
    let (src, dst, offset) = match packet[0] >> 4 {
        4 => {
            let ip = Ipv4Packet::new_unchecked(&packet[..]);
            let header = usize::from(ip.header_len());
            (
                IpAddress::Ipv4(ip.src_addr()),
                IpAddress::Ipv4(ip.dst_addr()),
                header,
            )
        }
        _ => {
            let ip = Ipv6Packet::new_unchecked(&packet[..]);
            (
                IpAddress::Ipv6(ip.src_addr()),
                IpAddress::Ipv6(ip.dst_addr()),
                40,
            )
        }
    };
    let mut tcp = TcpPacket::new_unchecked(&mut packet[offset..]);
    tcp.set_seq_number(smoltcp::wire::TcpSeqNumber(seq as i32));
    tcp.fill_checksum(&src, &dst);
}

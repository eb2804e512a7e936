//! The resolver's sockets: what TPROXY hands over, and replies that leave from the
//! server the client asked.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::time::Duration;

use nix::sys::socket::{self as sock, sockopt, ControlMessageOwned, MsgFlags, SockaddrIn};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// The resolver's listening sockets.
pub struct Sockets {
    pub(super) udp: UdpSocket,
    pub(super) tcp: TcpListener,
}

/// Binds the resolver's sockets on every address of `port`. IP_TRANSPARENT lets them
/// take connections and datagrams addressed to other hosts (TPROXY hands them over);
/// IP_ORIGDSTADDR tells the UDP socket where each datagram was going. The firewall
/// drops whatever is addressed to `port` itself, and the resolver ignores it too.
pub fn bind(port: u16) -> io::Result<Sockets> {
    let udp = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port))?;
    sock::setsockopt(&udp, sockopt::IpTransparent, &true)?;
    sock::setsockopt(&udp, sockopt::Ipv4OrigDstAddr, &true)?;
    udp.set_nonblocking(true)?;
    let tcp = std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))?;
    sock::setsockopt(&tcp, sockopt::IpTransparent, &true)?;
    tcp.set_nonblocking(true)?;
    Ok(Sockets {
        udp: UdpSocket::from_std(udp)?,
        tcp: TcpListener::from_std(tcp)?,
    })
}

/// Receives one datagram into `buf`: its length, who sent it, and where it was going.
pub async fn recv_query(
    socket: &UdpSocket,
    buf: &mut [u8],
) -> io::Result<(usize, SocketAddrV4, SocketAddrV4)> {
    socket
        .async_io(Interest::READABLE, || {
            let mut cmsg = nix::cmsg_space!(libc::sockaddr_in);
            let mut iov = [io::IoSliceMut::new(&mut *buf)];
            let msg = sock::recvmsg::<SockaddrIn>(
                socket.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::empty(),
            )?;
            let client = msg
                .address
                .map(SocketAddrV4::from)
                .ok_or_else(|| io::Error::other("datagram without a sender"))?;
            let server = msg
                .cmsgs()?
                .find_map(|c| match c {
                    ControlMessageOwned::Ipv4OrigDstAddr(a) => Some(SocketAddrV4::new(
                        Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                        u16::from_be(a.sin_port),
                    )),
                    _ => None,
                })
                .ok_or_else(|| io::Error::other("datagram without its destination"))?;
            Ok((msg.bytes, client, server))
        })
        .await
}

/// How a reply left.
#[derive(Debug, PartialEq, Eq)]
pub enum Sent {
    /// From a transparent socket bound to the server's address and port.
    Bound,
    /// That port is held by a socket of the host's that shares it with nobody (a DNS
    /// server on 0.0.0.0:53, docker-proxy for `-p 53:53/udp`): as a raw datagram.
    Raw,
}

/// Sends `bytes` to `client` from `server`'s address and port: from a socket bound to
/// that address of another host (IP_TRANSPARENT allows it), connected to the client so
/// that no other client's query is delivered to it meanwhile; or, when a socket of
/// the host holds that port for every address, as a raw datagram.
pub fn reply_from(server: SocketAddrV4, client: SocketAddrV4, bytes: &[u8]) -> io::Result<Sent> {
    match reply_bound(server, client, bytes) {
        Ok(()) => Ok(Sent::Bound),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            reply_raw(server, client, bytes).map(|()| Sent::Raw)
        }
        Err(e) => Err(e),
    }
}

fn reply_bound(server: SocketAddrV4, client: SocketAddrV4, bytes: &[u8]) -> io::Result<()> {
    let fd = sock::socket(
        sock::AddressFamily::Inet,
        sock::SockType::Datagram,
        sock::SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    sock::setsockopt(&fd, sockopt::IpTransparent, &true)?;
    sock::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    sock::bind(fd.as_raw_fd(), &SockaddrIn::from(server))?;
    let socket = std::net::UdpSocket::from(fd);
    socket.connect(client)?;
    socket.send(bytes)?;
    Ok(())
}

/// The IPv4 and UDP headers of a datagram from `server` to `client` carrying
/// `payload` bytes. The kernel fills in the IP checksum, ID and total length (raw(7),
/// IP_HDRINCL); a UDP checksum of 0 means none, which IPv4 allows (RFC 768).
fn udp_headers(server: SocketAddrV4, client: SocketAddrV4, payload: usize) -> io::Result<Vec<u8>> {
    let udp_len = u16::try_from(8 + payload)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "datagram over 64 KiB"))?;
    let mut h = Vec::with_capacity(28);
    h.extend_from_slice(&[0x45, 0]); // version 4, 20-byte header; TOS
    h.extend_from_slice(&(udp_len + 20).to_be_bytes());
    h.extend_from_slice(&[0, 0, 0, 0]); // ID, no fragment flags
    h.extend_from_slice(&[64, libc::IPPROTO_UDP as u8, 0, 0]); // TTL, protocol, checksum
    h.extend_from_slice(&server.ip().octets());
    h.extend_from_slice(&client.ip().octets());
    h.extend_from_slice(&server.port().to_be_bytes());
    h.extend_from_slice(&client.port().to_be_bytes());
    h.extend_from_slice(&udp_len.to_be_bytes());
    h.extend_from_slice(&[0, 0]);
    Ok(h)
}

fn reply_raw(server: SocketAddrV4, client: SocketAddrV4, bytes: &[u8]) -> io::Result<()> {
    let fd = sock::socket(
        sock::AddressFamily::Inet,
        sock::SockType::Raw,
        sock::SockFlag::SOCK_CLOEXEC,
        sock::SockProtocol::Raw, // IPPROTO_RAW: the headers are ours
    )?;
    let mut datagram = udp_headers(server, client, bytes.len())?;
    datagram.extend_from_slice(bytes);
    sock::sendto(
        fd.as_raw_fd(),
        &datagram,
        &SockaddrIn::from(SocketAddrV4::new(*client.ip(), 0)),
        MsgFlags::empty(),
    )?;
    Ok(())
}

/// Why a passed-on query got no reply.
#[derive(Debug, thiserror::Error)]
pub enum Unanswered {
    #[error("nothing listens there (ICMP unreachable)")]
    Refused,
    #[error(transparent)]
    Other(io::Error),
}

/// Passes a query on to the server it was going to and returns that server's reply.
pub async fn forward_udp(
    query: &[u8],
    server: SocketAddrV4,
    deadline: Duration,
) -> Result<Vec<u8>, Unanswered> {
    let io_err = |e: io::Error| match e.kind() {
        io::ErrorKind::ConnectionRefused => Unanswered::Refused,
        _ => Unanswered::Other(e),
    };
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
        .await
        .map_err(io_err)?;
    socket.connect(server).await.map_err(io_err)?;
    socket.send(query).await.map_err(io_err)?;
    let mut buf = vec![0u8; 65535];
    tokio::time::timeout(deadline, async {
        loop {
            let n = socket.recv(&mut buf).await.map_err(io_err)?;
            // The reply to this query (same ID), not a stray datagram.
            if n >= 2 && query.len() >= 2 && buf[..2] == query[..2] {
                buf.truncate(n);
                return Ok(buf);
            }
        }
    })
    .await
    .map_err(|_| Unanswered::Other(io::Error::new(io::ErrorKind::TimedOut, "server silent")))?
}

/// One DNS message over TCP (a two-byte length first); None at a clean end.
pub async fn read_framed(stream: &mut TcpStream) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match stream.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut message = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut message).await?;
    Ok(Some(message))
}

pub async fn write_framed(stream: &mut TcpStream, message: &[u8]) -> io::Result<()> {
    let len = u16::try_from(message.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "DNS message over 64 KiB"))?;
    let mut framed = Vec::with_capacity(message.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(message);
    stream.write_all(&framed).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_raw_reply_has_the_servers_address_and_port_and_the_right_lengths() {
        let server: SocketAddrV4 = "192.0.2.1:53".parse().unwrap();
        let client: SocketAddrV4 = "10.90.1.5:40000".parse().unwrap();
        let h = udp_headers(server, client, 100).unwrap();
        assert_eq!(h.len(), 28);
        assert_eq!(h[0], 0x45);
        assert_eq!(u16::from_be_bytes([h[2], h[3]]), 128, "IP total length");
        assert_eq!(h[9], 17, "UDP");
        assert_eq!(&h[12..16], &[192, 0, 2, 1]);
        assert_eq!(&h[16..20], &[10, 90, 1, 5]);
        assert_eq!(u16::from_be_bytes([h[20], h[21]]), 53);
        assert_eq!(u16::from_be_bytes([h[22], h[23]]), 40000);
        assert_eq!(u16::from_be_bytes([h[24], h[25]]), 108, "UDP length");
        assert!(udp_headers(server, client, 70000).is_err());
    }
}

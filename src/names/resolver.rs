//! weft's resolver: answers containers' DNS queries for the names of their network
//! on every host, and passes every other query on, unchanged, to where it was going.
//!
//! dockerd's embedded DNS (127.0.0.11 in each container) answers the names of its
//! own host and forwards the rest to its external servers from inside the
//! container's network namespace, so those queries leave through the container's
//! link. weft's firewall hands UDP and TCP port 53 from its links (to anything but
//! its own subnets) to this resolver by TPROXY (`datapath::firewall`), which keeps
//! the packet's original destination: the socket learns it (IP_ORIGDSTADDR for UDP,
//! the accepted socket's local address for TCP), and the reply leaves from it, so the
//! client sees the server it asked answer. Queries are answered only from the names
//! of the network the query comes from.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};
use ipnetwork::Ipv4Network;
use nix::sys::socket::{self as sock, sockopt, ControlMessageOwned, MsgFlags, SockaddrIn};
use serde::{Deserialize, Serialize};
use tokio::io::Interest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use super::directory::{answer, Answer, Directory};
use super::NamesError;
use crate::driver::Driver;
use crate::schema::{keys, NamesRecord};
use crate::store::{Store, StoreExt};

/// The port weft's resolver listens on, for queries handed to it by TPROXY.
pub const DEFAULT_PORT: u16 = 15353;
/// How old the names may be when a query is answered.
const FRESH_FOR: Duration = Duration::from_secs(1);
/// How long a read of the names may take before the last ones are used.
const READ_DEADLINE: Duration = Duration::from_millis(500);
/// How long the server a query was going to may take to answer it.
const UPSTREAM_DEADLINE: Duration = Duration::from_secs(5);
/// How long a TCP client may stay silent between queries.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Queries handled at once; more are dropped (the client asks again).
const IN_FLIGHT: usize = 512;

/// One of weft's networks on this host, with the names of its containers.
struct Network {
    subnet: Ipv4Network,
    internal: bool,
    directory: Arc<Directory>,
}

#[derive(Default)]
struct Snapshot {
    read_at: Option<Instant>,
    networks: Vec<Network>,
}

#[derive(Default)]
struct Counters {
    answered: AtomicU64,
    forwarded: AtomicU64,
    refused: AtomicU64,
    failed: AtomicU64,
}

/// What `weft status` shows of the resolver.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ResolverStatus {
    pub port: u16,
    /// Queries answered from the cluster's names.
    pub answered: u64,
    /// Queries passed on to the server they were going to.
    pub forwarded: u64,
    /// Queries refused: from no weft network, or from an internal network for a name
    /// outside it.
    pub refused: u64,
    /// Queries the server they were going to did not answer.
    pub failed: u64,
}

pub struct Resolver {
    port: u16,
    store: Arc<dyn Store>,
    driver: Arc<Driver>,
    snapshot: tokio::sync::Mutex<Snapshot>,
    counters: Counters,
    in_flight: Arc<Semaphore>,
}

/// What the resolver does with one query.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    Reply(Vec<u8>),
    Forward,
    /// Not from a weft network: no answer at all.
    Drop,
}

impl Resolver {
    pub fn new(port: u16, store: Arc<dyn Store>, driver: Arc<Driver>) -> Self {
        Self {
            port,
            store,
            driver,
            snapshot: Default::default(),
            counters: Default::default(),
            in_flight: Arc::new(Semaphore::new(IN_FLIGHT)),
        }
    }

    /// Reads this host's networks and every host's names on them.
    async fn read(&self) -> Result<Vec<Network>, NamesError> {
        let mut networks: Vec<Network> = Vec::new();
        for net in self.driver.networks().await? {
            if networks.iter().any(|n| n.subnet == net.subnet) {
                continue;
            }
            let (records, bad) = self
                .store
                .list_json_lossy::<NamesRecord>(&keys::names_of(net.subnet))
                .await?;
            if !bad.is_empty() {
                debug!(?bad, "names records that do not decode; skipped");
            }
            networks.push(Network {
                subnet: net.subnet,
                internal: net.internal,
                directory: Arc::new(Directory::from_records(
                    records.iter().map(|(_, r)| &r.value),
                )),
            });
        }
        Ok(networks)
    }

    /// Decides on one query from `source`: from the names of `source`'s network, read
    /// at most [`FRESH_FOR`] ago (or the last names read, when the store is slow or
    /// down).
    pub async fn decide(&self, query: &[u8], source: Ipv4Addr, udp: bool) -> Decision {
        let mut snapshot = self.snapshot.lock().await;
        if snapshot.read_at.is_none_or(|at| at.elapsed() >= FRESH_FOR) {
            match tokio::time::timeout(READ_DEADLINE, self.read()).await {
                Ok(Ok(networks)) => snapshot.networks = networks,
                Ok(Err(e)) => warn!(error = %e, "names not read; answering from the last ones"),
                Err(_) => {
                    warn!("names not read within {READ_DEADLINE:?}; answering from the last ones")
                }
            }
            snapshot.read_at = Some(Instant::now());
        }
        let Some(network) = snapshot.networks.iter().find(|n| n.subnet.contains(source)) else {
            self.counters.refused.fetch_add(1, Ordering::Relaxed);
            return Decision::Drop;
        };
        let directory = network.directory.clone();
        let internal = network.internal;
        drop(snapshot);
        match answer(query, &directory, udp) {
            Answer::Reply(bytes) => {
                self.counters.answered.fetch_add(1, Ordering::Relaxed);
                Decision::Reply(bytes)
            }
            // An internal network reaches nothing outside itself, names included.
            Answer::Forward if internal => {
                self.counters.refused.fetch_add(1, Ordering::Relaxed);
                match refusal(query) {
                    Some(bytes) => Decision::Reply(bytes),
                    None => Decision::Drop,
                }
            }
            Answer::Forward => {
                self.counters.forwarded.fetch_add(1, Ordering::Relaxed);
                Decision::Forward
            }
        }
    }

    pub fn status(&self) -> ResolverStatus {
        let c = &self.counters;
        ResolverStatus {
            port: self.port,
            answered: c.answered.load(Ordering::Relaxed),
            forwarded: c.forwarded.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
        }
    }

    /// Serves on `sockets` (from [`bind`]) until the process ends.
    pub async fn serve(self: Arc<Self>, sockets: Sockets) {
        info!(
            port = self.port,
            "answering containers' DNS for the cluster's names"
        );
        tokio::spawn(self.clone().serve_tcp(sockets.tcp));
        self.serve_udp(sockets.udp).await;
    }

    async fn serve_udp(self: Arc<Self>, socket: UdpSocket) {
        let mut buf = vec![0u8; 65535];
        loop {
            let (len, client, server) = match recv_query(&socket, &mut buf).await {
                Ok(got) => got,
                Err(e) => {
                    debug!(error = %e, "DNS query not received");
                    continue;
                }
            };
            let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
                continue; // overloaded: the client asks again
            };
            let query = buf[..len].to_vec();
            let me = self.clone();
            tokio::spawn(async move {
                let _permit = permit;
                me.handle_udp(&query, client, server).await;
            });
        }
    }

    async fn handle_udp(&self, query: &[u8], client: SocketAddrV4, server: SocketAddrV4) {
        let reply = match self.decide(query, *client.ip(), true).await {
            Decision::Drop => return,
            Decision::Reply(bytes) => bytes,
            Decision::Forward => match forward_udp(query, server).await {
                Ok(bytes) => bytes,
                Err(e) => {
                    self.counters.failed.fetch_add(1, Ordering::Relaxed);
                    debug!(%server, error = %e, "forwarded DNS query not answered");
                    return;
                }
            },
        };
        if let Err(e) = reply_from(server, client, &reply) {
            warn!(%server, %client, error = %e, "DNS reply not sent");
        }
    }

    async fn serve_tcp(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (stream, client) = match listener.accept().await {
                Ok(got) => got,
                Err(e) => {
                    debug!(error = %e, "DNS connection not accepted");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
                continue;
            };
            let me = self.clone();
            tokio::spawn(async move {
                let _permit = permit;
                if let Err(e) = me.handle_tcp(stream, client).await {
                    debug!(%client, error = %e, "DNS connection ended");
                }
            });
        }
    }

    /// One client connection: each query answered, or relayed over one connection to
    /// the server the client was connecting to (its local address, kept by TPROXY).
    async fn handle_tcp(&self, mut stream: TcpStream, client: SocketAddr) -> io::Result<()> {
        let (SocketAddr::V4(client), SocketAddr::V4(server)) = (client, stream.local_addr()?)
        else {
            return Ok(());
        };
        let mut upstream: Option<TcpStream> = None;
        loop {
            let query = match tokio::time::timeout(TCP_IDLE, read_framed(&mut stream)).await {
                Ok(Ok(Some(q))) => q,
                Ok(Ok(None)) | Err(_) => return Ok(()),
                Ok(Err(e)) => return Err(e),
            };
            let reply = match self.decide(&query, *client.ip(), false).await {
                Decision::Drop => return Ok(()),
                Decision::Reply(bytes) => bytes,
                Decision::Forward => {
                    let relayed = tokio::time::timeout(UPSTREAM_DEADLINE, async {
                        if upstream.is_none() {
                            upstream = Some(TcpStream::connect(server).await?);
                        }
                        let up = upstream.as_mut().expect("connected above");
                        write_framed(up, &query).await?;
                        read_framed(up).await?.ok_or_else(|| {
                            io::Error::new(io::ErrorKind::UnexpectedEof, "server closed")
                        })
                    })
                    .await;
                    match relayed {
                        Ok(Ok(bytes)) => bytes,
                        Ok(Err(e)) => {
                            self.counters.failed.fetch_add(1, Ordering::Relaxed);
                            return Err(e);
                        }
                        Err(_) => {
                            self.counters.failed.fetch_add(1, Ordering::Relaxed);
                            return Err(io::Error::new(io::ErrorKind::TimedOut, "server silent"));
                        }
                    }
                }
            };
            write_framed(&mut stream, &reply).await?;
        }
    }
}

/// A REFUSED reply to `query`, if it is a DNS message at all.
fn refusal(query: &[u8]) -> Option<Vec<u8>> {
    let request = Message::from_vec(query).ok()?;
    let mut reply = Message::error_msg(
        request.metadata.id,
        request.metadata.op_code,
        ResponseCode::Refused,
    );
    reply.metadata.recursion_desired = request.metadata.recursion_desired;
    reply.add_queries(request.queries);
    reply.to_vec().ok()
}

/// The resolver's listening sockets.
pub struct Sockets {
    udp: UdpSocket,
    tcp: TcpListener,
}

/// Binds the resolver's sockets on every address of `port`. IP_TRANSPARENT lets them
/// take connections and datagrams addressed to other hosts (TPROXY hands them over);
/// IP_ORIGDSTADDR tells the UDP socket where each datagram was going. Nothing else
/// reaches them: the firewall drops whatever is addressed to `port` itself.
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

/// Receives one datagram: its length, who sent it, and where it was going.
async fn recv_query(
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

/// Sends `bytes` to `client` from `server`'s address and port (a socket bound to an
/// address of another host, which IP_TRANSPARENT allows), connected to the client so
/// that no other client's query is delivered to it meanwhile.
fn reply_from(server: SocketAddrV4, client: SocketAddrV4, bytes: &[u8]) -> io::Result<()> {
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

/// Passes a query on to the server it was going to and returns that server's reply.
async fn forward_udp(query: &[u8], server: SocketAddrV4) -> io::Result<Vec<u8>> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await?;
    socket.connect(server).await?;
    socket.send(query).await?;
    let mut buf = vec![0u8; 65535];
    tokio::time::timeout(UPSTREAM_DEADLINE, async {
        loop {
            let n = socket.recv(&mut buf).await?;
            // The reply to this query (same ID), not a stray datagram.
            if n >= 2 && query.len() >= 2 && buf[..2] == query[..2] {
                return Ok(buf[..n].to_vec());
            }
        }
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "server silent"))?
}

/// One DNS message over TCP (a two-byte length first); None at a clean end.
async fn read_framed(stream: &mut TcpStream) -> io::Result<Option<Vec<u8>>> {
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

async fn write_framed(stream: &mut TcpStream, message: &[u8]) -> io::Result<()> {
    let len = u16::try_from(message.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "DNS message over 64 KiB"))?;
    let mut framed = Vec::with_capacity(message.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(message);
    stream.write_all(&framed).await
}

#[cfg(test)]
mod tests;

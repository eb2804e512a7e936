//! weft's resolver: answers containers' DNS queries for the names of their network
//! on every host, and passes every other query on, unchanged, to where it was going.
//!
//! dockerd's embedded DNS (127.0.0.11 in each container) answers the names of its
//! own host and forwards the rest to its external servers from inside the
//! container's network namespace, so those queries leave through the container's
//! link. weft's firewall hands UDP and TCP port 53 from its links (to anything but
//! its own subnets and the host's own addresses) to this resolver by TPROXY
//! (`datapath::firewall`), which keeps the packet's original destination: the socket
//! learns it, and the reply leaves from it, so the client sees the server it asked
//! answer ([`transport`]). Queries are answered only from the names of the network
//! the query comes from; the names are read in the background ([`Resolver::refresh`]),
//! so a query never waits for the cluster store.

mod transport;

use std::collections::BTreeMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Message, ResponseCode};
use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Notify, Semaphore};
use tracing::{debug, info, warn};

use super::directory::{answer, Answer, Directory};
use super::NamesError;
use crate::driver::Driver;
use crate::schema::{keys, NamesRecord};
use crate::store::{Store, StoreExt};
pub use transport::{bind, Sockets};
use transport::{forward_udp, read_framed, reply_from, write_framed, Sent, Unanswered};

/// The port weft's resolver listens on, for queries handed to it by TPROXY.
pub const DEFAULT_PORT: u16 = 15353;
/// How often the names are read when no change in etcd wakes the reader.
pub const REFRESH_EVERY: Duration = Duration::from_secs(2);
/// How long the read of one network's names may take before its last ones stay.
const READ_DEADLINE: Duration = Duration::from_secs(1);
/// How long the server a query was going to may take to answer it (dockerd's
/// embedded DNS gives up on a server after about 4 s).
const UPSTREAM_DEADLINE: Duration = Duration::from_secs(4);
/// How long a TCP client may stay silent between queries.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Datagrams handled at once, and TCP connections open at once; more are dropped
/// (the client asks again) and counted.
const UDP_IN_FLIGHT: usize = 512;
const TCP_CONNECTIONS: usize = 64;
/// The port TPROXY keeps: a query handed over was going to port 53. Anything else
/// reached the resolver's own port directly, which the firewall forbids.
const DNS_PORT: u16 = 53;

#[derive(Default)]
struct Counters {
    answered: AtomicU64,
    forwarded: AtomicU64,
    refused: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
    raw_replies: AtomicU64,
}

/// What `weft status` shows of the resolver.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ResolverStatus {
    pub port: u16,
    /// Queries answered from the cluster's names.
    pub answered: u64,
    /// Queries passed on to the server they were going to.
    pub forwarded: u64,
    /// Queries of an internal network for names outside it, refused.
    pub refused: u64,
    /// Passed-on queries their server did not answer, and replies that could not be sent.
    pub failed: u64,
    /// Queries not handled: not handed over by the firewall, or over the limits.
    #[serde(default)]
    pub dropped: u64,
    /// Replies sent as raw datagrams because a socket of the host holds the server's
    /// port for every address.
    #[serde(default)]
    pub raw_replies: u64,
    /// Networks whose names are known, and how many names in all.
    #[serde(default)]
    pub networks: usize,
    #[serde(default)]
    pub names: usize,
}

pub struct Resolver {
    port: u16,
    store: Arc<dyn Store>,
    driver: Arc<Driver>,
    /// Every network's names as last read, by subnet.
    names: Mutex<Arc<BTreeMap<Ipv4Network, Arc<Directory>>>>,
    /// A read failed; logged once until one succeeds.
    reading_failed: AtomicBool,
    /// A reply failed; logged once until one is sent.
    sending_failed: AtomicBool,
    counters: Counters,
    udp_in_flight: Arc<Semaphore>,
    tcp_connections: Arc<Semaphore>,
}

/// What the resolver does with one query.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    Reply(Vec<u8>),
    Forward,
    /// Not handed over by the firewall: no answer at all.
    Drop,
}

impl Resolver {
    pub fn new(port: u16, store: Arc<dyn Store>, driver: Arc<Driver>) -> Self {
        Self {
            port,
            store,
            driver,
            names: Default::default(),
            reading_failed: AtomicBool::new(false),
            sending_failed: AtomicBool::new(false),
            counters: Default::default(),
            udp_in_flight: Arc::new(Semaphore::new(UDP_IN_FLIGHT)),
            tcp_connections: Arc::new(Semaphore::new(TCP_CONNECTIONS)),
        }
    }

    fn snapshot(&self) -> Arc<BTreeMap<Ipv4Network, Arc<Directory>>> {
        self.names.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Reads every host's names for each of this host's networks. A network whose
    /// names cannot be read keeps the ones read last.
    pub async fn refresh(&self) -> Result<(), NamesError> {
        let last = self.snapshot();
        let mut fresh = BTreeMap::new();
        let mut failure = None;
        for net in self.driver.networks().await? {
            if fresh.contains_key(&net.subnet) {
                continue;
            }
            let read = tokio::time::timeout(
                READ_DEADLINE,
                self.store
                    .list_json_lossy::<NamesRecord>(&keys::names_of(net.subnet)),
            )
            .await
            .unwrap_or_else(|_| {
                Err(crate::store::StoreError::Unavailable(format!(
                    "no answer within {READ_DEADLINE:?}"
                )))
            });
            let directory = match read {
                Ok((records, bad)) => {
                    if !bad.is_empty() {
                        debug!(?bad, "names records that do not decode; skipped");
                    }
                    Arc::new(Directory::from_records(
                        records.iter().map(|(_, r)| &r.value),
                    ))
                }
                Err(e) => {
                    failure = Some(e);
                    last.get(&net.subnet).cloned().unwrap_or_default()
                }
            };
            fresh.insert(net.subnet, directory);
        }
        *self.names.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(fresh);
        match failure {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    /// Reads the names until the process ends: when `wake` says they changed in etcd,
    /// else every [`REFRESH_EVERY`].
    pub async fn keep_fresh(self: Arc<Self>, wake: Arc<Notify>) {
        loop {
            match self.refresh().await.err() {
                None => {
                    if self.reading_failed.swap(false, Ordering::Relaxed) {
                        info!("the cluster's names are read again");
                    }
                }
                Some(e) if !self.reading_failed.swap(true, Ordering::Relaxed) => {
                    warn!(error = %e, "the cluster's names not read; answering from the last ones")
                }
                Some(e) => debug!(error = %e, "the cluster's names not read"),
            }
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(REFRESH_EVERY) => {}
            }
        }
    }

    /// Decides on one query from `client` that was going to `server`: answered from
    /// the names of `client`'s network, else passed on. Never waits.
    pub async fn decide(
        &self,
        query: &[u8],
        client: Ipv4Addr,
        server: SocketAddrV4,
        udp: bool,
    ) -> Decision {
        if server.port() != DNS_PORT {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            return Decision::Drop;
        }
        // The network comes from this host's own records (local, never waiting on
        // etcd), its names from the last read.
        let network = match self.driver.networks().await {
            Ok(networks) => networks.into_iter().find(|n| n.subnet.contains(client)),
            Err(e) => {
                // Not knowing whether the network is internal, nothing goes out.
                debug!(error = %e, "this host's networks not read");
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                return Decision::Drop;
            }
        };
        let Some(network) = network else {
            // Handed over, so from one of weft's links, but of no network known here
            // (yet): passed on as if weft were not there.
            self.counters.forwarded.fetch_add(1, Ordering::Relaxed);
            return Decision::Forward;
        };
        let directory = self
            .snapshot()
            .get(&network.subnet)
            .cloned()
            .unwrap_or_default();
        match answer(query, &directory, udp) {
            Answer::Reply(bytes) => {
                self.counters.answered.fetch_add(1, Ordering::Relaxed);
                Decision::Reply(bytes)
            }
            // An internal network reaches nothing outside itself, names included.
            Answer::Forward if network.internal => {
                self.counters.refused.fetch_add(1, Ordering::Relaxed);
                match reply_with(query, ResponseCode::Refused) {
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
        let names = self.snapshot();
        ResolverStatus {
            port: self.port,
            answered: c.answered.load(Ordering::Relaxed),
            forwarded: c.forwarded.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            raw_replies: c.raw_replies.load(Ordering::Relaxed),
            networks: names.len(),
            names: names.values().map(|d| d.len()).sum(),
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
            let (len, client, server) = match transport::recv_query(&socket, &mut buf).await {
                Ok(got) => got,
                Err(e) => {
                    debug!(error = %e, "DNS query not received");
                    continue;
                }
            };
            let Ok(permit) = self.udp_in_flight.clone().try_acquire_owned() else {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
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
        let reply = match self.decide(query, *client.ip(), server, true).await {
            Decision::Drop => return,
            Decision::Reply(bytes) => bytes,
            Decision::Forward => match forward_udp(query, server, UPSTREAM_DEADLINE).await {
                Ok(bytes) => bytes,
                Err(why) => {
                    self.counters.failed.fetch_add(1, Ordering::Relaxed);
                    debug!(%server, error = %why, "passed-on DNS query not answered");
                    // Nothing listens there: say so at once, as the ICMP error would
                    // have told the client, which then tries its next server.
                    match why {
                        Unanswered::Refused => match reply_with(query, ResponseCode::ServFail) {
                            Some(bytes) => bytes,
                            None => return,
                        },
                        Unanswered::Other(_) => return,
                    }
                }
            },
        };
        let sent = match reply_from(server, client, &reply) {
            // Too large for a raw datagram (the kernel fragments none): truncated, the
            // client asks again over TCP.
            Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => match truncated(&reply) {
                Some(short) => reply_from(server, client, &short),
                None => Err(e),
            },
            other => other,
        };
        match sent {
            Ok(sent) => {
                if sent == Sent::Raw {
                    self.counters.raw_replies.fetch_add(1, Ordering::Relaxed);
                }
                self.sending_failed.store(false, Ordering::Relaxed);
            }
            Err(e) => {
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
                if !self.sending_failed.swap(true, Ordering::Relaxed) {
                    warn!(%server, error = %e, "DNS replies not sent");
                } else {
                    debug!(%server, error = %e, "DNS reply not sent");
                }
            }
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
            let Ok(permit) = self.tcp_connections.clone().try_acquire_owned() else {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
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
            let reply = match self.decide(&query, *client.ip(), server, false).await {
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
                    .await
                    .unwrap_or_else(|_| {
                        Err(io::Error::new(io::ErrorKind::TimedOut, "server silent"))
                    });
                    match relayed {
                        Ok(bytes) => bytes,
                        Err(e) => {
                            self.counters.failed.fetch_add(1, Ordering::Relaxed);
                            return Err(e);
                        }
                    }
                }
            };
            write_framed(&mut stream, &reply).await?;
        }
    }
}

/// `reply` with its records dropped and the TC bit set, if it is a DNS message.
fn truncated(reply: &[u8]) -> Option<Vec<u8>> {
    Message::from_vec(reply).ok()?.truncate().to_vec().ok()
}

/// A reply to `query` with no answer and `code` (REFUSED, SERVFAIL), if the query is
/// a DNS message at all.
fn reply_with(query: &[u8], code: ResponseCode) -> Option<Vec<u8>> {
    let request = Message::from_vec(query).ok()?;
    let mut reply = Message::error_msg(request.metadata.id, request.metadata.op_code, code);
    reply.metadata.recursion_desired = request.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.add_queries(request.queries);
    reply.to_vec().ok()
}

#[cfg(test)]
mod tests;

//! `weft status`: this host's view of the mesh, served by the daemon on its socket
//! (`POST /weft.Status`, a path dockerd never calls) and printed by the CLI.

use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::cluster_networks::{ClusterNetworks, ClusterNetworksStatus};
use crate::driver::{Driver, DriverError};
use crate::ipam::{BlockConflict, Blocks, Reservation};
use crate::mesh::Mesh;

pub struct StatusSource {
    pub host: String,
    pub blocks: Arc<Blocks>,
    pub mesh: Option<Arc<Mesh>>,
    pub cluster_networks: Option<Arc<ClusterNetworks>>,
    pub names: Option<Arc<crate::names::NamePublisher>>,
    pub resolver: Option<Arc<crate::names::resolver::Resolver>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub host: String,
    pub mode: String,
    pub hosts: Vec<HostStatus>,
    pub networks: Vec<NetworkStatus>,
    pub blocks: Vec<String>,
    pub endpoints: Vec<EndpointStatus>,
    /// Blocks this host still has containers in while another host owns them: no
    /// address comes from them here until the conflict is resolved.
    #[serde(default)]
    pub conflicts: Vec<BlockConflict>,
    /// Addresses reserved for containers of hosts in blocks those hosts lost (to a
    /// reclaim while they were cut off): nobody hands them out.
    #[serde(default)]
    pub reservations: Vec<Reservation>,
    /// Which WireGuard carries the tunnel (several hosts only).
    #[serde(default)]
    pub wireguard: Option<crate::tunnel::Implementation>,
    /// Cluster networks (`-o weft.scope=cluster`) and where they stand here; `None`
    /// with `--docker-host none`.
    #[serde(default)]
    pub cluster_networks: Option<ClusterNetworksStatus>,
    /// The container names this host publishes, per network subnet.
    #[serde(default)]
    pub names: std::collections::BTreeMap<String, Vec<crate::schema::NameEntry>>,
    /// weft's resolver of the cluster's names, when it runs (several hosts).
    #[serde(default)]
    pub resolver: Option<crate::names::resolver::ResolverStatus>,
    /// Cluster records the mesh skipped because they are bad ("key: why").
    #[serde(default)]
    pub skipped_records: Vec<String>,
    /// Why part of the view is missing (e.g. etcd unreachable), if it is.
    pub errors: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HostStatus {
    pub id: String,
    pub endpoint: String,
    pub key_fingerprint: String,
    pub this_host: bool,
    pub last_handshake_secs_ago: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub blocks: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NetworkStatus {
    pub id: String,
    pub subnet: String,
    pub gateway: Option<String>,
    pub internal: bool,
    pub mtu: u32,
    pub name: Option<String>,
    /// `local`, or the cluster network's state here (`cluster`, `cluster-unpublished`,
    /// `cluster-joining`, `cluster-withdrawn`).
    #[serde(default)]
    pub scope: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EndpointStatus {
    pub id: String,
    pub network: String,
    pub address: String,
    pub link: String,
    pub joined: bool,
    /// Host ports published to it: `0.0.0.0:8080->80/tcp`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub published: Vec<String>,
}

fn fingerprint(key: &str) -> String {
    key.chars().take(10).collect()
}

impl StatusSource {
    pub async fn collect(&self, driver: &Driver) -> Result<Status, DriverError> {
        let mut errors = Vec::new();
        let networks = driver
            .networks()
            .await?
            .into_iter()
            .map(|n| NetworkStatus {
                id: n.id.chars().take(12).collect(),
                subnet: n.subnet.to_string(),
                gateway: n.gateway.map(|g| g.to_string()),
                internal: n.internal,
                mtu: n.mtu,
                name: n.name,
                scope: match n.cluster {
                    None => "local",
                    Some(crate::schema::ClusterState::Member { .. }) => "cluster",
                    Some(crate::schema::ClusterState::Unpublished) => "cluster-unpublished",
                    Some(crate::schema::ClusterState::Joining { .. }) => "cluster-joining",
                    Some(crate::schema::ClusterState::Withdrawn { .. }) => "cluster-withdrawn",
                }
                .into(),
            })
            .collect();
        let endpoints = driver
            .endpoints()
            .await?
            .into_iter()
            .map(|e| EndpointStatus {
                id: e.id.chars().take(12).collect(),
                network: e.network_id.chars().take(12).collect(),
                address: e.address.to_string(),
                link: e.host_if,
                joined: e.joined,
                published: e.published.iter().map(ToString::to_string).collect(),
            })
            .collect();
        let all_blocks: Vec<(String, String)> = match self.blocks.all().await {
            Ok(list) => list
                .into_iter()
                .map(|(_, block, owner)| (block.to_string(), owner))
                .collect(),
            Err(e) => {
                errors.push(format!("blocks: {e}"));
                Vec::new()
            }
        };
        let blocks_of = |h: &str| {
            all_blocks
                .iter()
                .filter(|(_, o)| o == h)
                .map(|(b, _)| b.clone())
                .collect::<Vec<_>>()
        };
        let mut hosts = Vec::new();
        if let Some(mesh) = &self.mesh {
            let peers = mesh.tunnel().peers().await.unwrap_or_else(|e| {
                errors.push(format!("tunnel: {e}"));
                Vec::new()
            });
            match mesh.hosts().await {
                Ok(list) => {
                    for h in list {
                        let peer = peers.iter().find(|p| p.public_key == h.public_key);
                        hosts.push(HostStatus {
                            this_host: h.id == self.host,
                            blocks: blocks_of(&h.id),
                            last_handshake_secs_ago: peer
                                .and_then(|p| p.last_handshake)
                                .and_then(|t| SystemTime::now().duration_since(t).ok())
                                .map(|d| d.as_secs()),
                            rx_bytes: peer.map_or(0, |p| p.rx_bytes),
                            tx_bytes: peer.map_or(0, |p| p.tx_bytes),
                            key_fingerprint: fingerprint(&h.public_key),
                            endpoint: h.endpoint.to_string(),
                            id: h.id,
                        });
                    }
                }
                Err(e) => errors.push(format!("hosts: {e}")),
            }
        }
        let reservations = match self.blocks.reservations_checked().await {
            Ok(r) => r,
            Err(e) => {
                errors.push(format!("reservations: {e}"));
                Vec::new()
            }
        };
        Ok(Status {
            mode: if self.mesh.is_some() {
                "multi-host (etcd, WireGuard)"
            } else {
                "single host (embedded store)"
            }
            .into(),
            blocks: blocks_of(&self.host),
            host: self.host.clone(),
            hosts,
            networks,
            endpoints,
            conflicts: self.blocks.conflicts(),
            reservations,
            wireguard: self.mesh.as_ref().and_then(|m| m.tunnel().implementation()),
            skipped_records: self.mesh.as_ref().map(|m| m.skipped()).unwrap_or_default(),
            names: self
                .names
                .as_ref()
                .map(|n| n.published())
                .unwrap_or_default()
                .into_iter()
                .map(|(subnet, r)| (subnet.to_string(), r.entries))
                .collect(),
            resolver: self.resolver.as_ref().map(|r| r.status()),
            cluster_networks: match &self.cluster_networks {
                Some(c) => Some(c.status().await),
                None => None,
            },
            errors,
        })
    }
}

/// Addresses separated by spaces.
fn spaced<'a>(addresses: impl IntoIterator<Item = &'a std::net::Ipv4Addr>) -> String {
    addresses
        .into_iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Renders a status for people.
pub fn render(s: &Status) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "host {} — {}", s.host, s.mode);
    if let Some(wg) = &s.wireguard {
        let offloads = match wg.offloads {
            Some(true) => " (TUN and UDP offloads)",
            Some(false) => " (no offloads: install wireguard-go 0.0.20231211 or later)",
            None => "",
        };
        let _ = writeln!(
            out,
            "wireguard: {} {} {}{offloads}",
            wg.kind,
            wg.program.as_deref().unwrap_or(""),
            wg.version.as_deref().unwrap_or("")
        );
    }
    if !s.hosts.is_empty() {
        let _ = writeln!(
            out,
            "\nHOSTS\n  {:<18} {:<22} {:<12} {:>10} {:>12} {:>12}  BLOCKS",
            "ID", "ENDPOINT", "KEY", "HANDSHAKE", "RX", "TX"
        );
        for h in &s.hosts {
            let hs = match (h.this_host, h.last_handshake_secs_ago) {
                (true, _) => "(this host)".to_string(),
                (false, Some(secs)) => format!("{secs}s ago"),
                (false, None) => "never".to_string(),
            };
            let _ = writeln!(
                out,
                "  {:<18} {:<22} {:<12} {:>10} {:>12} {:>12}  {}",
                h.id,
                h.endpoint,
                h.key_fingerprint,
                hs,
                h.rx_bytes,
                h.tx_bytes,
                h.blocks.join(" ")
            );
        }
    }
    let _ = writeln!(out, "\nNETWORKS");
    for n in &s.networks {
        let _ = writeln!(
            out,
            "  {:<14} {:<18} gateway {:<15} mtu {:<5} {:<8} {}{}",
            n.id,
            n.subnet,
            n.gateway.as_deref().unwrap_or("-"),
            n.mtu,
            n.scope,
            if n.internal { "internal " } else { "" },
            n.name.as_deref().unwrap_or("")
        );
    }
    if let Some(c) = &s.cluster_networks {
        let _ = writeln!(out, "\nCLUSTER NETWORKS");
        for n in &c.networks {
            let _ = writeln!(
                out,
                "  {:<20} {:<18} uid {:<16} from {:<16} here: {}  hosts: {}",
                n.name,
                n.subnet,
                n.uid,
                n.origin_host,
                n.here,
                n.hosts.join(" ")
            );
        }
        for k in &c.kept {
            let _ = writeln!(out, "  kept: {k}");
        }
        for p in &c.problems {
            let _ = writeln!(out, "\nCLUSTER NETWORK PROBLEM: {p}");
        }
    }
    let _ = writeln!(
        out,
        "\nBLOCKS OWNED HERE\n  {}",
        if s.blocks.is_empty() {
            "-".to_string()
        } else {
            s.blocks.join(" ")
        }
    );
    let _ = writeln!(out, "\nENDPOINTS");
    for e in &s.endpoints {
        let _ = writeln!(
            out,
            "  {:<14} net {:<14} {:<15} {:<16} {}",
            e.id,
            e.network,
            e.address,
            e.link,
            if e.joined { "joined" } else { "created" }
        );
        for p in &e.published {
            let _ = writeln!(out, "    published {p} ({})", e.address);
        }
    }
    for c in &s.conflicts {
        let _ = writeln!(
            out,
            "\nCONFLICT: block {} of {} belongs to host {} in etcd, but this host still has {} there; no address comes from it here",
            c.block,
            c.pool,
            c.owner,
            spaced(&c.addresses)
        );
    }
    for r in &s.reservations {
        let _ = writeln!(
            out,
            "\nreserved for host {} in block {}: {}",
            r.host,
            r.block,
            spaced(&r.addresses)
        );
    }
    for r in &s.skipped_records {
        let _ = writeln!(out, "\nskipped a bad record: {r}");
    }
    for (subnet, entries) in &s.names {
        let _ = writeln!(out, "\nNAMES PUBLISHED FROM HERE ON {subnet}");
        for e in entries {
            let names: Vec<&str> = e.names.iter().map(String::as_str).collect();
            let _ = writeln!(
                out,
                "  {:<15} {}  {}",
                e.address,
                e.container,
                names.join(" ")
            );
        }
    }
    if let Some(r) = &s.resolver {
        let _ = writeln!(
            out,
            "\ncontainer DNS: port {}: {} answered with the cluster's names, {} passed on, {} refused, {} unanswered by their server",
            r.port, r.answered, r.forwarded, r.refused, r.failed
        );
    }
    for e in &s.errors {
        let _ = writeln!(out, "\nwarning: {e}");
    }
    out
}

/// The CLI side: asks the daemon over its socket.
pub async fn fetch(socket: &std::path::Path) -> anyhow::Result<Status> {
    use anyhow::Context;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| format!("connecting to {} (is weft running?)", socket.display()))?;
    stream
        .write_all(b"POST /weft.Status HTTP/1.1\r\nHost: weft\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        .await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("malformed reply from weft")?;
    anyhow::ensure!(
        head.starts_with("HTTP/1.1 200"),
        "weft answered: {}",
        head.lines().next().unwrap_or("")
    );
    // Tolerate chunked encoding by taking the JSON object out of the body.
    let json = &body[body.find('{').context("no JSON in reply")?
        ..=body.rfind('}').context("no JSON in reply")?];
    Ok(serde_json::from_str(json)?)
}

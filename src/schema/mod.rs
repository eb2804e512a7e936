//! The shape of weft's state: every stored record and the key it lives under
//! ([`keys::Key`]). Cluster records are shared by every host through the cluster
//! store (etcd, or the embedded store on one host); local records belong to this host.
//! `docs/etcd-schema.md` describes the same schema for operators.

pub mod keys;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};

pub use keys::Key;

// ---- cluster records ----

/// A pool, shared by every host that requested it (`pools/<cidr>`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PoolRecord {
    pub pool: Ipv4Network,
    pub sub_pool: Option<Ipv4Network>,
    pub block_prefix: u8,
    /// Chosen by weft (no `--subnet`), not by the user.
    pub automatic: bool,
    pub gateway: Option<Ipv4Addr>,
    /// host id -> number of RequestPool calls not yet released.
    pub refs: BTreeMap<String, u32>,
    /// `--aux-address` reservations: address -> hosts that reserved it.
    pub aux: BTreeMap<Ipv4Addr, BTreeSet<String>>,
}

impl PoolRecord {
    /// A user's pool (`--subnet`) with blocks of `/block_prefix`, nothing else set.
    #[cfg(test)]
    pub fn with_blocks(pool: Ipv4Network, block_prefix: u8) -> Self {
        Self {
            pool,
            sub_pool: None,
            block_prefix,
            automatic: false,
            gateway: None,
            refs: BTreeMap::new(),
            aux: BTreeMap::new(),
        }
    }

    /// Where container addresses come from: the ip-range, else the whole pool.
    pub fn range(&self) -> Ipv4Network {
        self.sub_pool.unwrap_or(self.pool)
    }

    /// Addresses never handed to a container: the gateway and the aux reservations.
    pub fn reserved(&self) -> BTreeSet<Ipv4Addr> {
        self.aux.keys().copied().chain(self.gateway).collect()
    }

    /// Whether `block` is a block this pool can have (inside it, of its block size).
    pub fn has_block(&self, block: Ipv4Network) -> bool {
        block.prefix() == self.block_prefix.max(self.pool.prefix())
            && self.pool.contains(block.network())
    }
}

/// Ownership of one block of a pool (`blocks/<pool>/<block>`). Only the cluster
/// store decides who owns a block: a host hands out addresses from a block only
/// while this record names it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BlockRecord {
    pub host: String,
    /// Every address the owner may have handed out from the block: those in use, and
    /// a few more it may hand out without asking the store (while cut off from it).
    /// When the block is reclaimed from a host gone past the grace period, these
    /// become that host's reservation, so that no address of its containers is
    /// handed out again while they may still run.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub published: BTreeSet<Ipv4Addr>,
}

impl BlockRecord {
    /// A record of `host`'s block with nothing published yet.
    pub fn of(host: impl Into<String>) -> Self {
        Self {
            host: host.into(),
            published: BTreeSet::new(),
        }
    }
}

/// Addresses of a host's containers in a block it no longer owns
/// (`reserved/<pool>/<block>/<host>`), which nobody else may hand out. Written when
/// the block is reclaimed from a host gone past the grace period, and by that host
/// when it comes back and finds the block taken; it expires by itself one grace
/// period after its last write, so a host that never returns frees them in time.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReservedRecord {
    pub addresses: BTreeSet<Ipv4Addr>,
}

/// A network's identity across hosts (`overlays/<subnet>`): the hosts that have it
/// and the name they agreed on, if any.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct OverlayRecord {
    pub name: Option<String>,
    pub hosts: BTreeSet<String>,
}

/// What other hosts need to reach this one (`hosts/<id>`, on the host's short lease).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HostRecord {
    pub id: String,
    /// Base64 WireGuard public key.
    pub public_key: String,
    /// Underlay address and WireGuard port.
    pub endpoint: SocketAddr,
    pub keepalive: Option<u16>,
}

/// A host's membership for block ownership (`seen/<id>`, on a lease of the block
/// grace period that the host keeps alive). Its absence, decided by the store's
/// lease alone, means the host has been gone longer than the grace period: no
/// clocks are compared across hosts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SeenRecord {
    /// Seconds since the Unix epoch at registration (informational only).
    pub last_seen: u64,
}

/// A network created once for the whole cluster (`cluster-networks/<name>`): weft
/// creates it in every host's dockerd. `uid` tells this network from a later one of
/// the same name, so that a copy of a removed network never comes back as an original.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClusterNetworkRecord {
    pub uid: String,
    pub spec: ClusterNetworkSpec,
    /// The host and Docker network ID it was first created as.
    pub origin_host: String,
    pub origin_network: String,
}

/// A cluster network as `docker network create -d weft --ipam-driver weft` takes it,
/// read from the dockerd it was created in.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClusterNetworkSpec {
    pub name: String,
    /// The driver and IPAM driver names weft has in the dockerd it was read from
    /// (`weft`; `weft:latest` for the managed plugin). Each host creates its copy
    /// under the names weft has there, when it knows them.
    #[serde(default = "weft_name")]
    pub driver: String,
    #[serde(default = "weft_name")]
    pub ipam_driver: String,
    pub subnet: Ipv4Network,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_range: Option<Ipv4Network>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<Ipv4Addr>,
    /// `--ipam-opt` (`weft.block-size`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ipam_options: BTreeMap<String, String>,
    /// `--aux-address`: name -> address.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub aux_addresses: BTreeMap<String, Ipv4Addr>,
    pub internal: bool,
    /// The driver options (`-o`), the MTU and `weft.scope=cluster` among them.
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

fn weft_name() -> String {
    "weft".into()
}

impl ClusterNetworkSpec {
    /// Whether a network of this spec is the same network as `other` (what carries
    /// traffic: subnet, range, gateway, internal), whatever its labels.
    pub fn same_network(&self, other: &ClusterNetworkSpec) -> bool {
        self.subnet == other.subnet
            && self.ip_range == other.ip_range
            && self.internal == other.internal
            && (self.gateway.is_none() || other.gateway.is_none() || self.gateway == other.gateway)
    }
}

/// The names of one host's containers on one network (`names/<subnet>/<host>`), on
/// the host's lease: they vanish with the host.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct NamesRecord {
    pub entries: Vec<NameEntry>,
}

/// One container on the network: the names it answers to there (its name, network
/// aliases, compose service name) and its address.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct NameEntry {
    pub address: Ipv4Addr,
    /// The container's short ID.
    pub container: String,
    pub names: BTreeSet<String>,
}

// ---- local records ----

/// A Docker network on this host (`networks/<NetworkID>`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetworkRecord {
    pub id: String,
    pub subnet: Ipv4Network,
    pub gateway: Option<Ipv4Addr>,
    pub internal: bool,
    pub mtu: u32,
    /// `-o weft.network=NAME`: the cluster-wide name, when the user gave one.
    pub name: Option<String>,
    /// `-o weft.host-access=true`: containers may reach every address of the host.
    #[serde(default)]
    pub host_access: bool,
    /// `-o weft.scope=cluster`: where it stands as one of the cluster's networks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterState>,
}

/// A local network's part in a cluster network ([`ClusterNetworkRecord`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum ClusterState {
    /// Created here by a user; weft has yet to learn its name from dockerd and
    /// record it for the other hosts (or it clashes with a cluster network).
    Unpublished,
    /// A copy of cluster network `uid` that weft asked dockerd to create here, until
    /// weft sees dockerd has it: removing it now (dockerd rolling back a failed
    /// create) touches no record.
    Joining { uid: String },
    /// This host's instance of cluster network `uid`: removing it here removes the
    /// network everywhere.
    Member { uid: String },
    /// Its cluster network was removed (or replaced): weft removes it from this
    /// host's dockerd once no container uses it, and removing it touches no record.
    Withdrawn { uid: String },
}

impl ClusterState {
    /// Whether a network recorded as `self` may since have moved on to `later` (a
    /// replayed CreateNetwork carries the state it was created with).
    pub fn may_become(&self, later: &ClusterState) -> bool {
        use ClusterState::*;
        match (self, later) {
            (Unpublished, _) => true,
            (Joining { uid: a }, Joining { uid: b } | Member { uid: b } | Withdrawn { uid: b }) => {
                a == b
            }
            (a, b) => a == b,
        }
    }
}

#[cfg(test)]
impl NetworkRecord {
    /// A plain network of `subnet` (no gateway, not internal, MTU 1420), for tests.
    pub fn for_subnet(id: impl Into<String>, subnet: Ipv4Network) -> Self {
        Self {
            id: id.into(),
            subnet,
            gateway: None,
            internal: false,
            mtu: 1420,
            name: None,
            host_access: false,
            cluster: None,
        }
    }
}

/// An endpoint on this host (`endpoints/<EndpointID>`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EndpointRecord {
    pub id: String,
    pub network_id: String,
    pub address: Ipv4Addr,
    pub host_if: String,
    pub container_if: String,
    pub mtu: u32,
    /// Set by Join, cleared by Leave. Once joined, the container end belongs to Docker
    /// and the pair dies with the container's namespace.
    pub joined: bool,
    /// When it was created or last left (seconds since the Unix epoch, this host's
    /// clock): a never-joined endpoint older than the endpoint grace is collected.
    #[serde(default)]
    pub since: u64,
    /// Host ports published to it (ProgramExternalConnectivity), until revoked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub published: Vec<crate::ports::Published>,
}

/// An address this host handed out (`addresses/<pool>/<ip>`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AddressRecord {
    pub block: Ipv4Network,
    /// When it was handed out (seconds since the Unix epoch, this host's clock; 0 in
    /// records written before weft kept it).
    #[serde(default)]
    pub since: u64,
}

/// 16 random hex digits: a host's id, a cluster network's uid.
pub fn random_id() -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 8];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Seconds since the Unix epoch on this host's clock. Only ever compared with
/// other readings of the same host's clock.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

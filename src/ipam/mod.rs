//! The IPAM service: pools, the shared gateway, reservations and container addresses.
//!
//! Cluster-wide records (pools, blocks) live in the cluster store; the addresses this
//! host hands out live in the local store. Container addresses come from blocks this
//! host claimed with a create-if-absent, so hosts never hand out the same address and
//! the container path never needs another host's agreement. Every write is a
//! compare-and-set with bounded retries.

pub mod addresses;
pub mod allocator;
pub mod blocks;
mod pools;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnetwork::Ipv4Network;
use tracing::{info, instrument, warn};

use crate::datapath::Datapath;
use crate::locks::KeyedLocks;
use crate::schema::keys;
pub use crate::schema::{AddressRecord, BlockRecord, NetworkRecord, PoolRecord};
use crate::store::{Store, StoreError, StoreExt};

pub use blocks::{BlockConflict, Blocks, Reservation, Verified, HEADROOM};

pub const LOCAL_ADDRESS_SPACE: &str = "weft-local";
pub const GLOBAL_ADDRESS_SPACE: &str = "weft-global";
pub const GATEWAY_REQUEST: &str = "com.docker.network.gateway";
pub const BLOCK_SIZE_OPTION: &str = "weft.block-size";

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Exhausted(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Unsupported(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Datapath(#[from] crate::datapath::DatapathError),
}

#[derive(Debug, Clone)]
pub struct IpamConfig {
    /// Where automatic pools (networks created without `--subnet`) come from.
    pub default_pools: Vec<Ipv4Network>,
    pub default_pool_prefix: u8,
    pub default_block_prefix: u8,
}

impl Default for IpamConfig {
    fn default() -> Self {
        Self {
            default_pools: vec!["10.200.0.0/13".parse().expect("valid")],
            default_pool_prefix: 24,
            default_block_prefix: 26,
        }
    }
}

/// Parsed PoolID: `<address space>/<pool cidr>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolId {
    pub space: String,
    pub pool: Ipv4Network,
}

impl PoolId {
    pub fn parse(id: &str) -> Result<Self, IpamError> {
        let (space, cidr) = id
            .split_once('/')
            .ok_or_else(|| IpamError::Invalid(format!("malformed PoolID {id:?}")))?;
        let pool = parse_cidr(cidr)?;
        Ok(Self {
            space: space.to_string(),
            pool,
        })
    }
}

impl std::fmt::Display for PoolId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.space, self.pool)
    }
}

pub fn parse_cidr(s: &str) -> Result<Ipv4Network, IpamError> {
    let net: Ipv4Network = s
        .parse()
        .map_err(|_| IpamError::Invalid(format!("{s:?} is not an IPv4 CIDR")))?;
    Ok(Ipv4Network::new(net.network(), net.prefix()).expect("same prefix"))
}

fn parse_ip(s: &str) -> Result<Ipv4Addr, IpamError> {
    // Docker sends plain addresses; tolerate a CIDR suffix.
    let plain = s.split('/').next().unwrap_or(s);
    plain
        .parse()
        .map_err(|_| IpamError::Invalid(format!("{s:?} is not an IPv4 address")))
}

/// The name of a pool's lock in [`Ipam::locks`].
fn pool_lock(pool: Ipv4Network) -> String {
    format!("pool/{pool}")
}

/// Held by pool requests that pick a pool by themselves.
const AUTOMATIC_POOLS_LOCK: &str = "pools/automatic";

pub struct PoolRequest {
    pub address_space: String,
    pub pool: String,
    pub sub_pool: String,
    pub options: BTreeMap<String, String>,
    pub v6: bool,
}

pub struct Ipam {
    cluster: Arc<dyn Store>,
    blocks: Arc<Blocks>,
    local: Arc<dyn Store>,
    host: String,
    routes: Arc<dyn Datapath>,
    config: IpamConfig,
    /// One lock per pool ([`pool_lock`]): addresses from blocks this host has
    /// published share it (each is recorded with a create-if-absent, so two never get
    /// the same one); changes to blocks, the gateway or reservations hold it alone.
    /// Other pools never wait; other hosts are kept out by compare-and-set.
    locks: KeyedLocks,
    /// Addresses being recorded by the shared path right now, so that allocations
    /// running side by side pick different ones.
    picking: std::sync::Mutex<BTreeSet<(Ipv4Network, Ipv4Addr)>>,
    /// The pool records this host last read or wrote, so that a container address
    /// from an owned block needs no cluster round trip (and works while etcd is down).
    pools: std::sync::Mutex<BTreeMap<Ipv4Network, PoolRecord>>,
}

impl Ipam {
    pub fn new(
        cluster: Arc<dyn Store>,
        local: Arc<dyn Store>,
        blocks: Arc<Blocks>,
        routes: Arc<dyn Datapath>,
        config: IpamConfig,
    ) -> Self {
        Self {
            host: blocks.host().to_string(),
            cluster,
            blocks,
            local,
            routes,
            config,
            locks: KeyedLocks::default(),
            picking: std::sync::Mutex::new(BTreeSet::new()),
            pools: std::sync::Mutex::new(BTreeMap::new()),
        }
    }

    /// The block owner this IPAM allocates through (shared with the mesh).
    pub fn blocks(&self) -> &Arc<Blocks> {
        &self.blocks
    }

    pub fn address_spaces(&self) -> (&'static str, &'static str) {
        (LOCAL_ADDRESS_SPACE, GLOBAL_ADDRESS_SPACE)
    }

    #[instrument(skip_all, fields(pool = %req.pool, sub_pool = %req.sub_pool))]
    pub async fn request_pool(&self, req: PoolRequest) -> Result<(PoolId, Ipv4Network), IpamError> {
        if req.v6 {
            return Err(IpamError::Unsupported(
                "weft does not support IPv6 pools yet; create the network without --ipv6".into(),
            ));
        }
        if req.address_space != LOCAL_ADDRESS_SPACE && req.address_space != GLOBAL_ADDRESS_SPACE {
            return Err(IpamError::Invalid(format!(
                "unknown address space {:?} (weft serves {LOCAL_ADDRESS_SPACE} and {GLOBAL_ADDRESS_SPACE})",
                req.address_space
            )));
        }
        let block_prefix = self.block_prefix(&req.options)?;
        let pool = if req.pool.is_empty() {
            if !req.sub_pool.is_empty() {
                return Err(IpamError::Invalid("--ip-range needs --subnet".into()));
            }
            let _automatic = self.locks.write(AUTOMATIC_POOLS_LOCK).await;
            self.claim_automatic_pool(block_prefix).await?
        } else {
            let pool = parse_cidr(&req.pool)?;
            let sub_pool = match req.sub_pool.as_str() {
                "" => None,
                s => Some(parse_cidr(s)?),
            };
            if let Some(sub) = sub_pool {
                if !(pool.contains(sub.network()) && pool.contains(sub.broadcast())) {
                    return Err(IpamError::Invalid(format!(
                        "ip-range {sub} is not inside subnet {pool}"
                    )));
                }
            }
            let explicit_block = req.options.contains_key(BLOCK_SIZE_OPTION);
            let _pool = self.locks.write(&pool_lock(pool)).await;
            self.reference_pool(pool, sub_pool, block_prefix, explicit_block)
                .await?;
            pool
        };
        let id = PoolId {
            space: req.address_space,
            pool,
        };
        info!(pool_id = %id, "pool requested");
        Ok((id, pool))
    }

    #[instrument(skip_all, fields(pool_id = %pool_id))]
    pub async fn release_pool(&self, pool_id: &str) -> Result<(), IpamError> {
        let id = PoolId::parse(pool_id)?;
        let _pool = self.locks.write(&pool_lock(id.pool)).await;
        let host = self.host.clone();
        let after = self
            .modify_pool(id.pool, |current| {
                let Some(mut rec) = current else {
                    return Ok(None);
                };
                if let Some(n) = rec.refs.get_mut(&host) {
                    *n -= 1;
                    if *n == 0 {
                        rec.refs.remove(&host);
                        for hosts in rec.aux.values_mut() {
                            hosts.remove(&host);
                        }
                        rec.aux.retain(|_, hosts| !hosts.is_empty());
                    }
                }
                Ok((!rec.refs.is_empty()).then_some(rec))
            })
            .await?;
        let still_ours = after
            .as_ref()
            .is_some_and(|r| r.refs.contains_key(&self.host));
        if !still_ours {
            // This host no longer uses the pool: drop its addresses and blocks.
            for (key, _) in self.local.list(&keys::addresses_of(id.pool)).await? {
                self.local.delete(&key, None).await?;
            }
            self.blocks.release_own(id.pool).await?;
        }
        info!(
            remaining_hosts = after.map_or(0, |r| r.refs.len()),
            "pool released"
        );
        Ok(())
    }

    /// Answers `RequestAddress`. Returns the address with the pool's prefix length.
    #[instrument(skip_all, fields(pool_id = %pool_id, address = %address))]
    pub async fn request_address(
        &self,
        pool_id: &str,
        address: &str,
        options: &BTreeMap<String, String>,
    ) -> Result<Ipv4Network, IpamError> {
        let id = PoolId::parse(pool_id)?;
        let wanted = match address {
            "" => None,
            a => Some(parse_ip(a)?),
        };
        let gateway =
            options.get("RequestAddressType").map(String::as_str) == Some(GATEWAY_REQUEST);
        let ip = if !gateway && wanted.is_none() {
            self.allocate_dynamic(id.pool).await?
        } else {
            let _pool = self.locks.write(&pool_lock(id.pool)).await;
            let pool = self.pool_record(id.pool).await?;
            match wanted {
                Some(ip) if !gateway => {
                    self.check_host_address(&pool, ip)?;
                    if self.pool_attached_to_network(id.pool).await? {
                        self.allocate_static(&pool, ip).await?
                    } else {
                        // Before the network exists Docker only asks for --aux-address
                        // reservations.
                        self.reserve_aux(id.pool, ip).await?
                    }
                }
                _ => self.gateway(id.pool, wanted).await?,
            }
        };
        info!(%ip, "address assigned");
        Ok(Ipv4Network::new(ip, id.pool.prefix()).expect("pool prefix"))
    }

    #[instrument(skip_all, fields(pool_id = %pool_id, address = %address))]
    pub async fn release_address(&self, pool_id: &str, address: &str) -> Result<(), IpamError> {
        let id = PoolId::parse(pool_id)?;
        let ip = parse_ip(address)?;
        let key = keys::address(id.pool, ip);
        let released = {
            let _shared = self.locks.read(&pool_lock(id.pool)).await;
            let mut released = None;
            for attempt in 0.. {
                let Some(rec) = self.local.get_json::<AddressRecord>(&key).await? else {
                    break;
                };
                // Conditional on the revision read: the collector may have stamped the
                // record meanwhile (then read it again).
                if self.local.delete(&key, Some(rec.revision)).await? {
                    let left = self.local_addresses(id.pool).await?;
                    released = Some((rec.value.block, left));
                    break;
                }
                if attempt == crate::store::CAS_RETRIES {
                    return Err(StoreError::Contended(key).into());
                }
            }
            released
        };
        if let Some((block, left)) = released {
            if !left.iter().any(|a| block.contains(*a)) {
                self.release_block_if_empty(id.pool, block).await;
            }
            info!("address released");
            return Ok(());
        }
        let _pool = self.locks.write(&pool_lock(id.pool)).await;
        let host = self.host.clone();
        self.modify_pool(id.pool, |current| {
            let Some(mut rec) = current else {
                return Ok(None);
            };
            if let Some(hosts) = rec.aux.get_mut(&ip) {
                hosts.remove(&host);
                if hosts.is_empty() {
                    rec.aux.remove(&ip);
                }
            }
            Ok(Some(rec))
        })
        .await?;
        // The gateway is shared and lives as long as the pool; unknown addresses are fine.
        Ok(())
    }

    /// Gives `block` back to the cluster when no address of this host is left in it,
    /// looked at alone (no address of the pool is being handed out meanwhile). A
    /// release that fails (cluster store unreachable) leaves the block owned until a
    /// later one.
    async fn release_block_if_empty(&self, pool: Ipv4Network, block: Ipv4Network) {
        let _pool = self.locks.write(&pool_lock(pool)).await;
        let released = match self.local_addresses(pool).await {
            Ok(left) => self.blocks.release_if_empty(pool, block, &left).await,
            Err(e) => Err(e),
        };
        if let Err(e) = released {
            warn!(error = %e, %block, "could not release an empty block");
        }
    }
}

#[cfg(test)]
mod tests;

//! The IPAM service: pools, the shared gateway, reservations and container addresses.
//!
//! Cluster-wide records (pools, blocks) live in the cluster store; the addresses this
//! host hands out live in the local store. Container addresses come from blocks this
//! host claimed with a create-if-absent, so hosts never hand out the same address and
//! the container path never needs another host's agreement. Every write is a
//! compare-and-set with bounded retries.

pub mod allocator;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tracing::{info, instrument, warn};

use crate::datapath::Datapath;
use crate::driver::NetworkRecord;
use crate::store::{keys, Store, StoreError, StoreExt, CAS_RETRIES};

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
    fn range(&self) -> Ipv4Network {
        self.sub_pool.unwrap_or(self.pool)
    }

    fn reserved(&self) -> BTreeSet<Ipv4Addr> {
        self.aux.keys().copied().chain(self.gateway).collect()
    }
}

/// Ownership of one block of a pool (`blocks/<pool>/<block>`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BlockRecord {
    pub host: String,
}

/// An address this host handed out (`addresses/<pool>/<ip>`, local store).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AddressRecord {
    pub block: Ipv4Network,
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

pub struct PoolRequest {
    pub address_space: String,
    pub pool: String,
    pub sub_pool: String,
    pub options: BTreeMap<String, String>,
    pub v6: bool,
}

pub struct Ipam {
    cluster: Arc<dyn Store>,
    local: Arc<dyn Store>,
    host: String,
    routes: Arc<dyn Datapath>,
    config: IpamConfig,
    /// Serialises this host's allocation decisions; other hosts are kept out by CAS.
    alloc: Mutex<()>,
    /// The pool records this host last read or wrote, so that a container address
    /// from an owned block needs no cluster round trip (and works while etcd is down).
    pools: std::sync::Mutex<BTreeMap<Ipv4Network, PoolRecord>>,
}

impl Ipam {
    pub fn new(
        cluster: Arc<dyn Store>,
        local: Arc<dyn Store>,
        host: String,
        routes: Arc<dyn Datapath>,
        config: IpamConfig,
    ) -> Self {
        Self {
            cluster,
            local,
            host,
            routes,
            config,
            alloc: Mutex::new(()),
            pools: std::sync::Mutex::new(BTreeMap::new()),
        }
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
        let _guard = self.alloc.lock().await;
        let pool = if req.pool.is_empty() {
            if !req.sub_pool.is_empty() {
                return Err(IpamError::Invalid("--ip-range needs --subnet".into()));
            }
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

    fn block_prefix(&self, options: &BTreeMap<String, String>) -> Result<u8, IpamError> {
        for key in options.keys() {
            if key.starts_with("weft.") && key != BLOCK_SIZE_OPTION {
                return Err(IpamError::Invalid(format!(
                    "unknown IPAM option {key:?} (known: {BLOCK_SIZE_OPTION})"
                )));
            }
        }
        match options.get(BLOCK_SIZE_OPTION) {
            None => Ok(self.config.default_block_prefix),
            Some(v) => match v.trim_start_matches('/').parse::<u8>() {
                Ok(p) if (16..=30).contains(&p) => Ok(p),
                _ => Err(IpamError::Invalid(format!(
                    "{BLOCK_SIZE_OPTION}={v:?}: expected a prefix length from 16 to 30, such as 26"
                ))),
            },
        }
    }

    async fn held_pools(&self) -> Result<Vec<PoolRecord>, IpamError> {
        Ok(self
            .cluster
            .list_json::<PoolRecord>(keys::POOLS)
            .await?
            .into_iter()
            .map(|(_, r)| r.value)
            .collect())
    }

    async fn reference_pool(
        &self,
        pool: Ipv4Network,
        sub_pool: Option<Ipv4Network>,
        block_prefix: u8,
        explicit_block: bool,
    ) -> Result<(), IpamError> {
        let others = self.held_pools().await?;
        if let Some(other) = others
            .iter()
            .find(|o| o.pool != pool && allocator::overlaps(o.pool, pool))
        {
            return Err(IpamError::Conflict(format!(
                "subnet {pool} overlaps subnet {} already in use",
                other.pool
            )));
        }
        let host = self.host.clone();
        self.modify_pool(pool, |current| {
                let mut rec = match current {
                    None => PoolRecord {
                        pool,
                        sub_pool,
                        block_prefix,
                        automatic: false,
                        gateway: None,
                        refs: BTreeMap::new(),
                        aux: BTreeMap::new(),
                    },
                    Some(rec) => {
                        if rec.sub_pool != sub_pool {
                            return Err(IpamError::Conflict(format!(
                                "subnet {pool} is already in use with ip-range {}; use the same --ip-range",
                                rec.sub_pool.map_or("(none)".to_string(), |s| s.to_string())
                            )));
                        }
                        if explicit_block && rec.block_prefix != block_prefix {
                            return Err(IpamError::Conflict(format!(
                                "subnet {pool} is already in use with {BLOCK_SIZE_OPTION}={}",
                                rec.block_prefix
                            )));
                        }
                        rec
                    }
                };
                *rec.refs.entry(host.clone()).or_default() += 1;
                Ok(Some(rec))
            })
            .await?;
        Ok(())
    }

    async fn claim_automatic_pool(&self, block_prefix: u8) -> Result<Ipv4Network, IpamError> {
        let held: Vec<Ipv4Network> = self
            .held_pools()
            .await?
            .into_iter()
            .map(|p| p.pool)
            .collect();
        let routes: Vec<Ipv4Network> = self.routes.host_routes().await?;
        for space in &self.config.default_pools {
            for candidate in allocator::candidate_pools(
                *space,
                self.config.default_pool_prefix.max(space.prefix()),
            ) {
                let busy = held
                    .iter()
                    .chain(routes.iter())
                    .any(|n| allocator::overlaps(*n, candidate));
                if busy {
                    continue;
                }
                let rec = PoolRecord {
                    pool: candidate,
                    sub_pool: None,
                    block_prefix,
                    automatic: true,
                    gateway: None,
                    refs: BTreeMap::from([(self.host.clone(), 1)]),
                    aux: BTreeMap::new(),
                };
                if self
                    .cluster
                    .create_json(&keys::pool(candidate), &rec)
                    .await?
                    .is_some()
                {
                    self.remember(candidate, Some(&rec));
                    return Ok(candidate);
                }
            }
        }
        Err(IpamError::Exhausted(format!(
            "no free automatic pool left in {:?}; pass --subnet or widen --default-address-pool",
            self.config
                .default_pools
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
        )))
    }

    #[instrument(skip_all, fields(pool_id = %pool_id))]
    pub async fn release_pool(&self, pool_id: &str) -> Result<(), IpamError> {
        let id = PoolId::parse(pool_id)?;
        let _guard = self.alloc.lock().await;
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
            for (key, rec) in self
                .cluster
                .list_json::<BlockRecord>(&keys::blocks_of(id.pool))
                .await?
            {
                if rec.value.host == self.host || after.is_none() {
                    self.cluster.delete(&key, Some(rec.revision)).await?;
                }
            }
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
        let _guard = self.alloc.lock().await;
        let pool = self.pool_record(id.pool).await?;
        let ip = if options.get("RequestAddressType").map(String::as_str) == Some(GATEWAY_REQUEST) {
            self.gateway(id.pool, wanted).await?
        } else if let Some(ip) = wanted {
            self.check_host_address(&pool, ip)?;
            if self.pool_attached_to_network(id.pool).await? {
                self.allocate_static(&pool, ip).await?
            } else {
                // Before the network exists Docker only asks for --aux-address reservations.
                self.reserve_aux(id.pool, ip).await?
            }
        } else {
            self.allocate_dynamic(&pool).await?
        };
        info!(%ip, "address assigned");
        Ok(Ipv4Network::new(ip, id.pool.prefix()).expect("pool prefix"))
    }

    /// Compare-and-set on a pool record, keeping the cache in step.
    async fn modify_pool<F>(&self, pool: Ipv4Network, f: F) -> Result<Option<PoolRecord>, IpamError>
    where
        F: FnMut(Option<PoolRecord>) -> Result<Option<PoolRecord>, IpamError> + Send,
    {
        let after = self
            .cluster
            .modify_json::<PoolRecord, IpamError, _>(&keys::pool(pool), f)
            .await?;
        self.remember(pool, after.as_ref());
        Ok(after)
    }

    fn remember(&self, pool: Ipv4Network, rec: Option<&PoolRecord>) {
        let mut cache = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        match rec {
            Some(r) if r.refs.contains_key(&self.host) => {
                cache.insert(pool, r.clone());
            }
            _ => {
                cache.remove(&pool);
            }
        }
    }

    async fn pool_record(&self, pool: Ipv4Network) -> Result<PoolRecord, IpamError> {
        if let Some(rec) = self
            .pools
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&pool)
        {
            return Ok(rec.clone());
        }
        let rec = self
            .cluster
            .get_json::<PoolRecord>(&keys::pool(pool))
            .await?
            .map(|r| r.value);
        self.remember(pool, rec.as_ref());
        match rec {
            Some(r) if r.refs.contains_key(&self.host) => Ok(r),
            _ => Err(IpamError::NotFound(format!(
                "pool {pool} is not held by this host (was it released?)"
            ))),
        }
    }

    fn check_host_address(&self, pool: &PoolRecord, ip: Ipv4Addr) -> Result<(), IpamError> {
        if !allocator::is_host_address(pool.pool, ip) {
            return Err(IpamError::Invalid(format!(
                "address {ip} is not a usable address of subnet {}",
                pool.pool
            )));
        }
        if pool.gateway == Some(ip) {
            return Err(IpamError::Conflict(format!(
                "address {ip} is the gateway of subnet {}",
                pool.pool
            )));
        }
        Ok(())
    }

    async fn pool_attached_to_network(&self, pool: Ipv4Network) -> Result<bool, IpamError> {
        let networks = self
            .local
            .list_json::<NetworkRecord>(keys::NETWORKS)
            .await?;
        Ok(networks.iter().any(|(_, n)| n.value.subnet == pool))
    }

    async fn gateway(
        &self,
        pool: Ipv4Network,
        wanted: Option<Ipv4Addr>,
    ) -> Result<Ipv4Addr, IpamError> {
        let taken = self.local_addresses(pool).await?;
        let rec = self
            .modify_pool(pool, |current| {
                let mut rec =
                    current.ok_or_else(|| IpamError::NotFound(format!("pool {pool} vanished")))?;
                let ip = wanted
                    .or(rec.gateway)
                    .unwrap_or_else(|| allocator::default_gateway(pool));
                match rec.gateway {
                    Some(g) if g != ip => {
                        return Err(IpamError::Conflict(format!(
                            "subnet {pool} already has gateway {g}; pass --gateway {g} or none"
                        )))
                    }
                    Some(_) => {}
                    None => {
                        if !allocator::is_host_address(pool, ip) {
                            return Err(IpamError::Invalid(format!(
                                "gateway {ip} is not a usable address of subnet {pool}"
                            )));
                        }
                        if taken.contains(&ip) || rec.aux.contains_key(&ip) {
                            return Err(IpamError::Conflict(format!(
                                "gateway {ip} is already in use"
                            )));
                        }
                        rec.gateway = Some(ip);
                    }
                }
                Ok(Some(rec))
            })
            .await?
            .expect("modify keeps the record");
        Ok(rec.gateway.expect("gateway set"))
    }

    async fn reserve_aux(&self, pool: Ipv4Network, ip: Ipv4Addr) -> Result<Ipv4Addr, IpamError> {
        if self.local_addresses(pool).await?.contains(&ip) {
            return Err(IpamError::Conflict(format!(
                "address {ip} is already in use"
            )));
        }
        let host = self.host.clone();
        self.modify_pool(pool, |current| {
            let mut rec =
                current.ok_or_else(|| IpamError::NotFound(format!("pool {pool} vanished")))?;
            if !rec.aux.entry(ip).or_default().insert(host.clone()) {
                return Err(IpamError::Conflict(format!(
                    "address {ip} is already reserved"
                )));
            }
            Ok(Some(rec))
        })
        .await?;
        Ok(ip)
    }

    async fn local_addresses(&self, pool: Ipv4Network) -> Result<BTreeSet<Ipv4Addr>, IpamError> {
        let prefix = keys::addresses_of(pool);
        Ok(self
            .local
            .list(&prefix)
            .await?
            .into_iter()
            .filter_map(|(k, _)| k[prefix.len()..].parse().ok())
            .collect())
    }

    async fn blocks(
        &self,
        pool: Ipv4Network,
    ) -> Result<BTreeMap<Ipv4Network, BlockRecord>, IpamError> {
        let prefix = keys::blocks_of(pool);
        let mut out = BTreeMap::new();
        for (key, rec) in self.cluster.list_json::<BlockRecord>(&prefix).await? {
            if let Ok(block) = key[prefix.len()..]
                .replacen('_', "/", 1)
                .parse::<Ipv4Network>()
            {
                out.insert(block, rec.value);
            }
        }
        Ok(out)
    }

    /// Makes sure this host owns `block`, claiming it if nobody does.
    async fn own_block(&self, pool: Ipv4Network, block: Ipv4Network) -> Result<(), IpamError> {
        let key = keys::block(pool, block);
        let mine = BlockRecord {
            host: self.host.clone(),
        };
        if self.cluster.create_json(&key, &mine).await?.is_some() {
            info!(%block, "block claimed");
            return Ok(());
        }
        match self.cluster.get_json::<BlockRecord>(&key).await? {
            Some(r) if r.value.host == self.host => Ok(()),
            Some(r) => Err(IpamError::Conflict(format!(
                "block {block} belongs to host {}; choose an address outside it or let weft choose",
                r.value.host
            ))),
            None => Err(StoreError::Contended(key).into()),
        }
    }

    async fn record_address(
        &self,
        pool: Ipv4Network,
        block: Ipv4Network,
        ip: Ipv4Addr,
    ) -> Result<bool, IpamError> {
        Ok(self
            .local
            .create_json(&keys::address(pool, ip), &AddressRecord { block })
            .await?
            .is_some())
    }

    async fn allocate_static(
        &self,
        pool: &PoolRecord,
        ip: Ipv4Addr,
    ) -> Result<Ipv4Addr, IpamError> {
        if pool.aux.contains_key(&ip) {
            return Err(IpamError::Conflict(format!(
                "address {ip} is reserved as an auxiliary address"
            )));
        }
        let block = allocator::block_of(pool.pool, pool.block_prefix, ip);
        self.own_block(pool.pool, block).await?;
        if !self.record_address(pool.pool, block, ip).await? {
            return Err(IpamError::Conflict(format!(
                "address {ip} is already in use"
            )));
        }
        Ok(ip)
    }

    async fn allocate_dynamic(&self, pool: &PoolRecord) -> Result<Ipv4Addr, IpamError> {
        let range = pool.range();
        let reserved = pool.reserved();
        // Fast path, local store only: a free address in a block this host already
        // holds addresses in (blocks are released when empty, so those are owned).
        let held = self
            .local
            .list_json::<AddressRecord>(&keys::addresses_of(pool.pool))
            .await?;
        let taken: BTreeSet<Ipv4Addr> = held
            .iter()
            .filter_map(|(k, _)| k.rsplit('/').next()?.parse().ok())
            .collect();
        let owned: BTreeSet<Ipv4Network> = held.iter().map(|(_, r)| r.value.block).collect();
        for block in owned.into_iter().filter(|b| allocator::overlaps(*b, range)) {
            if let Some(ip) = allocator::first_free(pool.pool, block, range, &taken, &reserved) {
                if self.record_address(pool.pool, block, ip).await? {
                    return Ok(ip);
                }
            }
        }
        for _ in 0..CAS_RETRIES {
            let taken = self.local_addresses(pool.pool).await?;
            let blocks = self.blocks(pool.pool).await?;
            let mine = blocks
                .iter()
                .filter(|(b, r)| r.host == self.host && allocator::overlaps(**b, range))
                .map(|(b, _)| *b);
            let free_in_mine = mine.into_iter().find_map(|b| {
                allocator::first_free(pool.pool, b, range, &taken, &reserved).map(|ip| (b, ip))
            });
            let (block, ip) = match free_in_mine {
                Some(found) => found,
                None => match self.claim_new_block(pool, &blocks, &taken, &reserved).await? {
                    Some(found) => found,
                    None => {
                        return Err(IpamError::Exhausted(format!(
                            "no free address left in {range} for this host: its blocks are full and no unclaimed block remains"
                        )))
                    }
                },
            };
            if self.record_address(pool.pool, block, ip).await? {
                return Ok(ip);
            }
        }
        Err(StoreError::Contended(keys::addresses_of(pool.pool)).into())
    }

    async fn claim_new_block(
        &self,
        pool: &PoolRecord,
        known: &BTreeMap<Ipv4Network, BlockRecord>,
        taken: &BTreeSet<Ipv4Addr>,
        reserved: &BTreeSet<Ipv4Addr>,
    ) -> Result<Option<(Ipv4Network, Ipv4Addr)>, IpamError> {
        let range = pool.range();
        for block in allocator::blocks_overlapping(pool.pool, pool.block_prefix, range) {
            if known.contains_key(&block) {
                continue;
            }
            let Some(ip) = allocator::first_free(pool.pool, block, range, taken, reserved) else {
                continue;
            };
            let key = keys::block(pool.pool, block);
            if self
                .cluster
                .create_json(
                    &key,
                    &BlockRecord {
                        host: self.host.clone(),
                    },
                )
                .await?
                .is_some()
            {
                info!(%block, "block claimed");
                return Ok(Some((block, ip)));
            }
        }
        Ok(None)
    }

    /// Checks that every block holding an address of this host is still owned by it,
    /// claiming back any that were reclaimed and are free. Returns how many were
    /// claimed back; a block another host took meanwhile is reported loudly.
    pub async fn verify_owned_blocks(&self) -> Result<usize, IpamError> {
        let _guard = self.alloc.lock().await;
        let mut blocks = BTreeSet::new();
        for (key, rec) in self
            .local
            .list_json::<AddressRecord>(keys::ADDRESSES)
            .await?
        {
            let pool_seg = key[keys::ADDRESSES.len()..]
                .split('/')
                .next()
                .unwrap_or_default();
            if let Ok(pool) = pool_seg.replacen('_', "/", 1).parse::<Ipv4Network>() {
                blocks.insert((pool, rec.value.block));
            }
        }
        let mut reclaimed = 0;
        for (pool, block) in blocks {
            match self
                .cluster
                .get_json::<BlockRecord>(&keys::block(pool, block))
                .await?
            {
                Some(r) if r.value.host == self.host => {}
                Some(r) => tracing::error!(
                    %block, owner = %r.value.host,
                    "this host has addresses in a block another host owns now; those containers may clash"
                ),
                None => {
                    let mine = BlockRecord {
                        host: self.host.clone(),
                    };
                    if self
                        .cluster
                        .create_json(&keys::block(pool, block), &mine)
                        .await?
                        .is_some()
                    {
                        reclaimed += 1;
                    }
                }
            }
        }
        Ok(reclaimed)
    }

    #[instrument(skip_all, fields(pool_id = %pool_id, address = %address))]
    pub async fn release_address(&self, pool_id: &str, address: &str) -> Result<(), IpamError> {
        let id = PoolId::parse(pool_id)?;
        let ip = parse_ip(address)?;
        let _guard = self.alloc.lock().await;
        let key = keys::address(id.pool, ip);
        if let Some(rec) = self.local.get_json::<AddressRecord>(&key).await? {
            self.local.delete(&key, Some(rec.revision)).await?;
            // The address is free here either way; an empty block whose release fails
            // (cluster store unreachable) stays owned until a later release.
            if let Err(e) = self.release_block_if_empty(id.pool, rec.value.block).await {
                warn!(error = %e, block = %rec.value.block, "could not release an empty block");
            }
            info!("address released");
            return Ok(());
        }
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

    async fn release_block_if_empty(
        &self,
        pool: Ipv4Network,
        block: Ipv4Network,
    ) -> Result<(), IpamError> {
        let still_used = self
            .local_addresses(pool)
            .await?
            .iter()
            .any(|ip| block.contains(*ip));
        if still_used {
            return Ok(());
        }
        let key = keys::block(pool, block);
        if let Some(rec) = self.cluster.get_json::<BlockRecord>(&key).await? {
            if rec.value.host == self.host {
                self.cluster.delete(&key, Some(rec.revision)).await?;
                info!(%block, "empty block released");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;

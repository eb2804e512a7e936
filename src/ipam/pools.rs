//! Pools: shared `pools/<cidr>` records, refcounted per host, with the gateway and
//! aux reservations; the cache that lets owned blocks serve without the cluster store.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

use super::{allocator, pool_lock, Ipam, IpamError, BLOCK_SIZE_OPTION};
use crate::schema::keys;
use crate::schema::{NetworkRecord, PoolRecord};
use crate::store::StoreExt;

impl Ipam {
    /// Puts this host back into the pool record of every network it still has: a host
    /// taken for gone while cut off loses its references in the reclaim, and without
    /// them the pool would be refused to it after a restart, or deleted under it by
    /// the last other host. A pool record that is gone is written again from what this
    /// host last knew of it. Returns the pools put right.
    pub async fn restore_references(&self) -> Result<usize, IpamError> {
        // Checked without locks (nearly always nothing is missing), so that no pass
        // holds one across etcd calls for nothing.
        let mut missing = BTreeSet::new();
        for pool in self.network_pools().await?.into_keys() {
            let rec = self
                .cluster
                .get_json::<PoolRecord>(&keys::pool(pool))
                .await?;
            if !rec.is_some_and(|r| r.value.refs.contains_key(&self.host)) {
                missing.insert(pool);
            }
        }
        if missing.is_empty() {
            return Ok(0);
        }
        // The networks again under each pool's lock, so that a ReleasePool of a network
        // deleted meanwhile is either seen here (no network) or comes after (and
        // releases what this adds).
        let mut restored = 0;
        let mut first_error = None;
        for pool in missing {
            let _pool = self.locks.write(&pool_lock(pool)).await;
            let Some(&count) = self.network_pools().await?.get(&pool) else {
                continue;
            };
            match self.restore_reference(pool, count).await {
                Ok(true) => restored += 1,
                Ok(false) => {}
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(restored), Err)
    }

    /// The pools of this host's networks, with how many networks use each.
    async fn network_pools(&self) -> Result<BTreeMap<Ipv4Network, u32>, IpamError> {
        let mut networks: BTreeMap<Ipv4Network, u32> = BTreeMap::new();
        for (_, n) in self
            .local
            .list_json::<NetworkRecord>(keys::NETWORKS)
            .await?
        {
            *networks.entry(n.value.subnet).or_default() += 1;
        }
        Ok(networks)
    }

    /// Puts this host back into `pool` with `count` references (and its aux
    /// reservations as it knew them); true if it had to.
    async fn restore_reference(&self, pool: Ipv4Network, count: u32) -> Result<bool, IpamError> {
        let current = self
            .cluster
            .get_json::<PoolRecord>(&keys::pool(pool))
            .await?;
        if current
            .as_ref()
            .is_some_and(|r| r.value.refs.contains_key(&self.host))
        {
            return Ok(false);
        }
        let known = self
            .pools
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&pool)
            .cloned();
        if current.is_none() {
            let Some(known) = &known else {
                tracing::error!(%pool, "the pool record of a network this host still has is gone and this host does not know it; remove the network and create it again");
                return Ok(false);
            };
            let overlapping = self
                .held_pools()
                .await?
                .into_iter()
                .find(|p| p.pool != pool && allocator::overlaps(p.pool, known.pool));
            if let Some(other) = overlapping {
                tracing::error!(%pool, other = %other.pool, "the pool record of a network this host still has is gone and an overlapping pool took its place; remove the network");
                return Ok(false);
            }
        }
        let host = self.host.clone();
        let my_aux: Vec<Ipv4Addr> = known
            .iter()
            .flat_map(|r| r.aux.iter())
            .filter(|(_, hosts)| hosts.contains(&host))
            .map(|(ip, _)| *ip)
            .collect();
        let after = self
            .modify_pool(pool, |current| {
                let Some(mut rec) = current.or_else(|| {
                    known.clone().map(|mut r| {
                        r.refs.clear();
                        r.aux.clear();
                        r
                    })
                }) else {
                    return Ok(None);
                };
                rec.refs.entry(host.clone()).or_insert(count);
                for ip in &my_aux {
                    rec.aux.entry(*ip).or_default().insert(host.clone());
                }
                Ok(Some(rec))
            })
            .await?;
        if after.is_some() {
            tracing::warn!(%pool, "this host's references to a pool it still uses were gone (reclaimed while it was cut off); restored them");
        }
        Ok(after.is_some())
    }

    pub(super) fn block_prefix(&self, options: &BTreeMap<String, String>) -> Result<u8, IpamError> {
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

    pub(super) async fn held_pools(&self) -> Result<Vec<PoolRecord>, IpamError> {
        Ok(self
            .cluster
            .list_json::<PoolRecord>(keys::POOLS)
            .await?
            .into_iter()
            .map(|(_, r)| r.value)
            .collect())
    }

    pub(super) async fn reference_pool(
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

    pub(super) async fn claim_automatic_pool(
        &self,
        block_prefix: u8,
    ) -> Result<Ipv4Network, IpamError> {
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

    /// Compare-and-set on a pool record, keeping the cache in step.
    pub(super) async fn modify_pool<F>(
        &self,
        pool: Ipv4Network,
        f: F,
    ) -> Result<Option<PoolRecord>, IpamError>
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

    pub(super) fn remember(&self, pool: Ipv4Network, rec: Option<&PoolRecord>) {
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

    pub(super) async fn pool_record(&self, pool: Ipv4Network) -> Result<PoolRecord, IpamError> {
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

    pub(super) fn check_host_address(
        &self,
        pool: &PoolRecord,
        ip: Ipv4Addr,
    ) -> Result<(), IpamError> {
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

    pub(super) async fn pool_attached_to_network(
        &self,
        pool: Ipv4Network,
    ) -> Result<bool, IpamError> {
        let networks = self
            .local
            .list_json::<NetworkRecord>(keys::NETWORKS)
            .await?;
        Ok(networks.iter().any(|(_, n)| n.value.subnet == pool))
    }

    pub(super) async fn gateway(
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

    pub(super) async fn reserve_aux(
        &self,
        pool: Ipv4Network,
        ip: Ipv4Addr,
    ) -> Result<Ipv4Addr, IpamError> {
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
}

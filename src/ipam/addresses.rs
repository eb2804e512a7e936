//! Container addresses: handed out from blocks this host owns and recorded in the
//! local store (`addresses/<pool>/<ip>`), with when they were handed out so that one
//! whose endpoint never came (or whose release was lost) is collected.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

use super::{allocator, pool_lock, Ipam, IpamError};
use crate::schema::{keys, unix_now, AddressRecord, Key, PoolRecord};
use crate::store::{StoreError, StoreExt, CAS_RETRIES};

impl Ipam {
    pub(super) async fn local_addresses(
        &self,
        pool: Ipv4Network,
    ) -> Result<BTreeSet<Ipv4Addr>, IpamError> {
        let prefix = keys::addresses_of(pool);
        Ok(self
            .local
            .list(&prefix)
            .await?
            .into_iter()
            .filter_map(|(k, _)| k[prefix.len()..].parse().ok())
            .collect())
    }

    pub(super) async fn record_address(
        &self,
        pool: Ipv4Network,
        block: Ipv4Network,
        ip: Ipv4Addr,
    ) -> Result<bool, IpamError> {
        let rec = AddressRecord {
            block,
            since: unix_now(),
        };
        Ok(self
            .local
            .create_json(&keys::address(pool, ip), &rec)
            .await?
            .is_some())
    }

    pub(super) async fn allocate_static(
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
        let taken = self.local_addresses(pool.pool).await?;
        self.blocks.own(pool, block, ip, &taken).await?;
        if !self.record_address(pool.pool, block, ip).await? {
            return Err(IpamError::Conflict(format!(
                "address {ip} is already in use"
            )));
        }
        Ok(ip)
    }

    /// An address for a container: from the blocks this host has published, side by
    /// side with other allocations of the pool, or else (alone in the pool) from the
    /// cluster store's view of its blocks.
    pub(super) async fn allocate_dynamic(&self, pool: Ipv4Network) -> Result<Ipv4Addr, IpamError> {
        {
            let _shared = self.locks.read(&pool_lock(pool)).await;
            let record = self.pool_record(pool).await?;
            if let Some(ip) = self.allocate_published(&record).await? {
                return Ok(ip);
            }
        }
        let _alone = self.locks.write(&pool_lock(pool)).await;
        // Read again: the gateway, an aux reservation or a release may have come
        // between the two locks.
        let record = self.pool_record(pool).await?;
        self.allocate_from_blocks(&record).await
    }

    /// Local store only: an address this host has published in a block it holds
    /// addresses in, while its blocks are certainly still its own in etcd (its seen/
    /// lease is alive) and the block is not in conflict. Concurrent callers pick
    /// different addresses ([`Ipam::picking`]) and the create-if-absent settles any
    /// race left.
    async fn allocate_published(&self, pool: &PoolRecord) -> Result<Option<Ipv4Addr>, IpamError> {
        let held = self
            .local
            .list_json::<AddressRecord>(&keys::addresses_of(pool.pool))
            .await?;
        let mut taken: BTreeSet<Ipv4Addr> = held
            .iter()
            .filter_map(|(k, _)| match Key::parse(k) {
                Ok(Key::Address { ip, .. }) => Some(ip),
                _ => None,
            })
            .collect();
        let owned: BTreeSet<Ipv4Network> = held.iter().map(|(_, r)| r.value.block).collect();
        for block in owned
            .into_iter()
            .filter(|b| allocator::overlaps(*b, pool.range()))
        {
            while let Some(picked) = self.pick_published(pool, block, &taken) {
                if self.record_address(pool.pool, block, picked.ip).await? {
                    return Ok(Some(picked.ip));
                }
                taken.insert(picked.ip);
            }
        }
        Ok(None)
    }

    /// A published free address of `block` that no concurrent allocation is picking,
    /// marked as picked until the returned guard goes.
    fn pick_published(
        &self,
        pool: &PoolRecord,
        block: Ipv4Network,
        taken: &BTreeSet<Ipv4Addr>,
    ) -> Option<Picked<'_>> {
        let mut picking = self.picking.lock().unwrap_or_else(|p| p.into_inner());
        let mut busy = taken.clone();
        busy.extend(
            picking
                .iter()
                .filter(|(p, _)| *p == pool.pool)
                .map(|(_, ip)| *ip),
        );
        let ip = self.blocks.published_free(pool, block, &busy)?;
        picking.insert((pool.pool, ip));
        Some(Picked {
            picking: &self.picking,
            pool: pool.pool,
            ip,
        })
    }

    /// The cluster store says which blocks are this host's, what is reserved in them,
    /// and gets the address published before it is handed out. Alone in the pool.
    async fn allocate_from_blocks(&self, pool: &PoolRecord) -> Result<Ipv4Addr, IpamError> {
        let range = pool.range();
        let reserved = pool.reserved();
        for _ in 0..CAS_RETRIES {
            let taken = self.local_addresses(pool.pool).await?;
            let owners = self
                .blocks
                .of_pool(pool.pool)
                .await
                .map_err(unreachable_owner)?;
            let reservations = self
                .blocks
                .reserved_in_pool(pool.pool)
                .await
                .map_err(unreachable_owner)?;
            let excluded = |block: Ipv4Network| -> BTreeSet<Ipv4Addr> {
                let mut out = reserved.clone();
                out.extend(reservations.get(&block).into_iter().flatten());
                out
            };
            let mine = owners
                .iter()
                .filter(|(b, owner)| **owner == self.host && allocator::overlaps(**b, range))
                .map(|(b, _)| *b);
            let free_in_mine = mine.into_iter().find_map(|b| {
                allocator::first_free(pool.pool, b, range, &taken, &excluded(b)).map(|ip| (b, ip))
            });
            let (block, ip) = match free_in_mine {
                Some((block, ip)) => {
                    match self
                        .blocks
                        .publish(pool, block, ip, &taken, &excluded(block))
                        .await
                    {
                        Ok(()) => (block, ip),
                        // The block changed hands meanwhile: look again.
                        Err(IpamError::Conflict(_)) => continue,
                        Err(e) => return Err(e),
                    }
                }
                None => match self
                    .blocks
                    .claim_free(pool, &owners, &taken, excluded)
                    .await?
                {
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

    /// Releases addresses of pools that a weft network on this host uses when no
    /// endpoint holds them and they were handed out more than `grace` ago: their
    /// endpoint never came, or their ReleaseAddress was lost. `in_use` is every
    /// (pool, address) an endpoint of this host holds. Returns how many went.
    pub async fn collect_unused_addresses(
        &self,
        in_use: &BTreeSet<(Ipv4Network, Ipv4Addr)>,
        grace: std::time::Duration,
    ) -> Result<usize, IpamError> {
        let now = unix_now();
        let mut collected = 0;
        for (key, rec) in self
            .local
            .list_json::<AddressRecord>(keys::ADDRESSES)
            .await?
        {
            let Ok(Key::Address { pool, ip }) = Key::parse(&key) else {
                continue;
            };
            if in_use.contains(&(pool, ip)) || !self.pool_attached_to_network(pool).await? {
                continue;
            }
            if rec.value.since == 0 {
                // Written before weft kept the time: start counting now.
                let stamped = AddressRecord {
                    since: now,
                    ..rec.value
                };
                self.local.update_json(&key, rec.revision, &stamped).await?;
                continue;
            }
            if now.saturating_sub(rec.value.since) <= grace.as_secs() {
                continue;
            }
            // The delete is conditional on the revision read above: an address handed
            // out again meanwhile is a new record and stays.
            if self.local.delete(&key, Some(rec.revision)).await? {
                tracing::warn!(%ip, %pool, "collected an address no endpoint has used for longer than the address grace");
                collected += 1;
                self.release_block_if_empty(pool, rec.value.block).await;
            }
        }
        Ok(collected)
    }
}

/// An address [`Ipam::pick_published`] picked: no other allocation picks it until
/// this goes (its record is written, or the write failed).
struct Picked<'a> {
    picking: &'a std::sync::Mutex<BTreeSet<(Ipv4Network, Ipv4Addr)>>,
    pool: Ipv4Network,
    ip: Ipv4Addr,
}

impl Drop for Picked<'_> {
    fn drop(&mut self) {
        self.picking
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(self.pool, self.ip));
    }
}

/// Without the fast path, the owner of a block must come from the cluster store.
fn unreachable_owner(e: StoreError) -> IpamError {
    match e {
        StoreError::Unavailable(why) => IpamError::Store(StoreError::Unavailable(format!(
            "{why} (this host is cut off from the cluster store and has handed out every address it published for use offline, or has been cut off for longer than it may hand out addresses on its own)"
        ))),
        other => other.into(),
    }
}

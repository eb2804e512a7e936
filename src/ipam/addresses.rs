//! Container addresses: handed out from blocks this host owns and recorded in the
//! local store (`addresses/<pool>/<ip>`), with when they were handed out so that one
//! whose endpoint never came (or whose release was lost) is collected.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

use super::{allocator, Ipam, IpamError};
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

    pub(super) async fn allocate_dynamic(&self, pool: &PoolRecord) -> Result<Ipv4Addr, IpamError> {
        let range = pool.range();
        let reserved = pool.reserved();
        // Fast path, local store only: an address this host has published in a block
        // it holds addresses in, while its blocks are certainly still its own in etcd
        // (its seen/ lease is alive) and the block is not in conflict.
        let held = self
            .local
            .list_json::<AddressRecord>(&keys::addresses_of(pool.pool))
            .await?;
        let taken: BTreeSet<Ipv4Addr> = held
            .iter()
            .filter_map(|(k, _)| match Key::parse(k) {
                Ok(Key::Address { ip, .. }) => Some(ip),
                _ => None,
            })
            .collect();
        let owned: BTreeSet<Ipv4Network> = held.iter().map(|(_, r)| r.value.block).collect();
        for block in owned.into_iter().filter(|b| allocator::overlaps(*b, range)) {
            if let Some(ip) = self.blocks.published_free(pool, block, &taken) {
                if self.record_address(pool.pool, block, ip).await? {
                    return Ok(ip);
                }
            }
        }
        // Otherwise the cluster store says which blocks are this host's, what is
        // reserved in them, and gets the address published before it is handed out.
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
        let _guard = self.alloc.lock().await;
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
            if self.local.delete(&key, Some(rec.revision)).await? {
                tracing::warn!(%ip, %pool, "collected an address no endpoint has used for longer than the address grace");
                collected += 1;
                let left = self.local_addresses(pool).await?;
                if let Err(e) = self
                    .blocks
                    .release_if_empty(pool, rec.value.block, &left)
                    .await
                {
                    tracing::warn!(error = %e, "could not release an empty block");
                }
            }
        }
        Ok(collected)
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

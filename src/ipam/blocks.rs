//! Block ownership: the one place that claims, verifies, releases and reclaims
//! `blocks/<pool>/<block>` records. The cluster store alone decides who owns a block:
//! - a host claims a block with create-if-absent, and hands out addresses from it
//!   without asking the store only while its `seen/` lease is certainly alive
//!   ([`Tenure::blocks_are_safe`]); otherwise it reads the owner from the store first;
//! - it verifies every block it holds addresses in on every (re-)registration and
//!   every mesh pass: a free one is claimed back, one another host took is a
//!   conflict (no more addresses from it, reported in the log and `weft status`);
//! - it releases only its own blocks;
//! - a host's blocks (and its pool references, aux reservations and network
//!   memberships) are reclaimed only when etcd has expired its `seen/` lease and the
//!   reclaiming host has itself been registered for the whole grace period; never
//!   a live host's, never one's own.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use ipnetwork::Ipv4Network;
use serde::Serialize;
use tracing::{error, info, warn};

use super::{allocator, IpamError};
use crate::cluster::Tenure;
use crate::schema::keys::{self, Key};
use crate::schema::{AddressRecord, BlockRecord, HostRecord, OverlayRecord, PoolRecord};
use crate::store::{Store, StoreError, StoreExt};

/// A block this host holds addresses in while another host owns it in etcd.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct BlockConflict {
    pub pool: Ipv4Network,
    pub block: Ipv4Network,
    pub owner: String,
    /// This host's addresses in it.
    pub addresses: Vec<Ipv4Addr>,
}

/// What a verification pass found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Verified {
    pub claimed_back: usize,
    pub conflicts: usize,
}

pub struct Blocks {
    cluster: Arc<dyn Store>,
    local: Arc<dyn Store>,
    host: String,
    tenure: Arc<Tenure>,
    grace: std::time::Duration,
    conflicts: Mutex<BTreeMap<Ipv4Network, BlockConflict>>,
}

impl Blocks {
    pub fn new(
        cluster: Arc<dyn Store>,
        local: Arc<dyn Store>,
        host: String,
        tenure: Arc<Tenure>,
        grace: std::time::Duration,
    ) -> Self {
        Self {
            cluster,
            local,
            host,
            tenure,
            grace,
            conflicts: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    /// The cluster records under `prefix` that decode; the others are logged and left out.
    async fn lossy<T: serde::de::DeserializeOwned + Send>(
        &self,
        prefix: &str,
    ) -> Result<Vec<(String, crate::store::Record<T>)>, StoreError> {
        let (good, bad) = self.cluster.list_json_lossy::<T>(prefix).await?;
        warn_skipped(&bad);
        Ok(good)
    }

    /// Every block of `pool` with its owner. Keys that do not decode are skipped.
    pub async fn of_pool(
        &self,
        pool: Ipv4Network,
    ) -> Result<BTreeMap<Ipv4Network, String>, StoreError> {
        let mut out = BTreeMap::new();
        for (key, rec) in self.cluster.list(&keys::blocks_of(pool)).await? {
            if let Some((_, block, owner)) = decode_block(&key, &rec.value) {
                out.insert(block, owner);
            }
        }
        Ok(out)
    }

    /// Every block in the cluster as (pool, block, owner). Records that do not decode,
    /// or name a block that is not one of an existing pool's blocks (outside it, or not
    /// of its block size), are skipped with a warning and returned apart, so that one
    /// bad record never stops a pass nor gets a forged range routed.
    pub async fn all_checked(
        &self,
    ) -> Result<(Vec<(Ipv4Network, Ipv4Network, String)>, Vec<String>), StoreError> {
        let pools: BTreeMap<Ipv4Network, PoolRecord> = self
            .lossy::<PoolRecord>(keys::POOLS)
            .await?
            .into_iter()
            .map(|(_, r)| (r.value.pool, r.value))
            .collect();
        let mut good = Vec::new();
        let mut skipped = Vec::new();
        for (key, v) in self.cluster.list(keys::BLOCKS).await? {
            let why = match decode_block(&key, &v.value) {
                None => "does not decode",
                Some((pool, block, _)) if !pools.get(&pool).is_some_and(|p| p.has_block(block)) => {
                    "is not a block of any pool"
                }
                Some(found) => {
                    good.push(found);
                    continue;
                }
            };
            warn!(%key, why, "skipping a bad block record");
            skipped.push(format!("{key}: {why}"));
        }
        Ok((good, skipped))
    }

    /// [`Blocks::all_checked`] without the skipped records.
    pub async fn all(&self) -> Result<Vec<(Ipv4Network, Ipv4Network, String)>, StoreError> {
        Ok(self.all_checked().await?.0)
    }

    /// Whether addresses may come from `block` without asking the cluster store.
    pub fn usable_locally(&self, block: Ipv4Network) -> bool {
        self.tenure.blocks_are_safe() && !self.is_conflicted(block)
    }

    fn is_conflicted(&self, block: Ipv4Network) -> bool {
        self.lock_conflicts().contains_key(&block)
    }

    fn lock_conflicts(&self) -> std::sync::MutexGuard<'_, BTreeMap<Ipv4Network, BlockConflict>> {
        self.conflicts.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn conflicts(&self) -> Vec<BlockConflict> {
        self.lock_conflicts().values().cloned().collect()
    }

    /// Makes sure this host owns `block`, claiming it if nobody does.
    pub async fn own(&self, pool: Ipv4Network, block: Ipv4Network) -> Result<(), IpamError> {
        let key = keys::block(pool, block);
        if self.claim(&key).await? {
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

    async fn claim(&self, key: &str) -> Result<bool, StoreError> {
        let mine = BlockRecord {
            host: self.host.clone(),
        };
        Ok(self.cluster.create_json(key, &mine).await?.is_some())
    }

    /// Claims the first block of `pool` that nobody owns and that has a free address
    /// for this host; returns it with that address.
    pub async fn claim_free(
        &self,
        pool: &PoolRecord,
        known: &BTreeMap<Ipv4Network, String>,
        taken: &BTreeSet<Ipv4Addr>,
        reserved: &BTreeSet<Ipv4Addr>,
    ) -> Result<Option<(Ipv4Network, Ipv4Addr)>, IpamError> {
        let range = pool.range();
        for block in allocator::blocks_overlapping(pool.pool, pool.block_prefix, range) {
            if known.contains_key(&block) || self.is_conflicted(block) {
                continue;
            }
            let Some(ip) = allocator::first_free(pool.pool, block, range, taken, reserved) else {
                continue;
            };
            if self.claim(&keys::block(pool.pool, block)).await? {
                info!(%block, "block claimed");
                return Ok(Some((block, ip)));
            }
        }
        Ok(None)
    }

    /// Checks every block this host holds addresses in against the cluster store:
    /// claims back the ones nobody owns, records as conflicts the ones another host
    /// owns. Runs on every (re-)registration and every mesh pass.
    pub async fn verify(&self) -> Result<Verified, IpamError> {
        let generation = self.tenure.generation();
        let mut held: BTreeMap<(Ipv4Network, Ipv4Network), Vec<Ipv4Addr>> = BTreeMap::new();
        let (addresses, bad) = self
            .local
            .list_json_lossy::<AddressRecord>(keys::ADDRESSES)
            .await?;
        warn_skipped(&bad);
        for (key, rec) in addresses {
            match Key::parse(&key) {
                Ok(Key::Address { pool, ip }) => {
                    held.entry((pool, rec.value.block)).or_default().push(ip)
                }
                _ => warn!(%key, "skipping an address record whose key does not decode"),
            }
        }
        let mut report = Verified::default();
        let mut conflicts = BTreeMap::new();
        for ((pool, block), addresses) in held {
            let key = keys::block(pool, block);
            let stored = self.cluster.get(&key).await?;
            let decoded = stored
                .as_ref()
                .map(|v| serde_json::from_slice::<BlockRecord>(&v.value));
            let owner = match decoded {
                Some(Ok(r)) => r.host,
                // A record nobody can read is nobody's to hand out from.
                Some(Err(_)) => "(unreadable record)".to_string(),
                None if self.claim(&key).await? => {
                    warn!(%block, "claimed back a block this host still uses");
                    report.claimed_back += 1;
                    continue;
                }
                None => continue, // claimed meanwhile: the next pass decides
            };
            if owner != self.host {
                conflicts.insert(
                    block,
                    BlockConflict {
                        pool,
                        block,
                        owner,
                        addresses,
                    },
                );
            }
        }
        report.conflicts = conflicts.len();
        let mut current = self.lock_conflicts();
        for (block, c) in &conflicts {
            if current.get(block) != Some(c) {
                error!(
                    %block, owner = %c.owner, addresses = ?c.addresses,
                    "another host owns a block this host still has containers in; no more addresses come from it here"
                );
            }
        }
        for block in current.keys() {
            if !conflicts.contains_key(block) {
                info!(%block, "block conflict resolved");
            }
        }
        *current = conflicts;
        drop(current);
        self.tenure.verified(generation);
        Ok(report)
    }

    /// Releases `block` if it is this host's and no address of this host is left in it.
    pub async fn release_if_empty(
        &self,
        pool: Ipv4Network,
        block: Ipv4Network,
        addresses: &BTreeSet<Ipv4Addr>,
    ) -> Result<(), IpamError> {
        if addresses.iter().any(|ip| block.contains(*ip)) {
            return Ok(());
        }
        let key = keys::block(pool, block);
        if let Some(rec) = self.cluster.get_json::<BlockRecord>(&key).await? {
            if rec.value.host == self.host && self.cluster.delete(&key, Some(rec.revision)).await? {
                info!(%block, "empty block released");
            }
        }
        Ok(())
    }

    /// Releases every block of `pool` that is this host's (and only those: another
    /// host may have claimed blocks of a pool re-created meanwhile).
    pub async fn release_own(&self, pool: Ipv4Network) -> Result<(), IpamError> {
        for (key, rec) in self
            .cluster
            .list_json::<BlockRecord>(&keys::blocks_of(pool))
            .await?
        {
            if rec.value.host == self.host {
                self.cluster.delete(&key, Some(rec.revision)).await?;
            }
        }
        Ok(())
    }

    /// Forgets hosts that etcd says are gone longer than the grace period (no `seen/`
    /// record, no `hosts/` record): deletes their blocks and removes them from pool
    /// references, aux reservations and network memberships. Does nothing until this
    /// host has been registered for the whole grace period. Returns the blocks reclaimed.
    pub async fn reclaim(&self, live: &[HostRecord]) -> Result<usize, StoreError> {
        if self.tenure.registered_for().is_none_or(|d| d < self.grace) {
            return Ok(0);
        }
        let seen: BTreeSet<String> = self
            .cluster
            .list(keys::SEEN)
            .await?
            .into_iter()
            .filter_map(|(k, _)| match Key::parse(&k) {
                Ok(Key::Seen(id)) => Some(id),
                _ => None,
            })
            .collect();
        let gone =
            |id: &str| id != self.host && !seen.contains(id) && !live.iter().any(|h| h.id == id);
        let mut reclaimed = 0;
        for (key, v) in self.cluster.list(keys::BLOCKS).await? {
            let Some((_, block, owner)) = decode_block(&key, &v.value) else {
                continue;
            };
            if gone(&owner) && self.cluster.delete(&key, Some(v.revision)).await? {
                info!(%block, host = %owner, "reclaimed the block of a host gone longer than the grace period");
                reclaimed += 1;
            }
        }
        for (key, rec) in self.lossy::<PoolRecord>(keys::POOLS).await? {
            let p = &rec.value;
            let stale_refs = p.refs.keys().any(|h| gone(h));
            let stale_aux = p.aux.values().flatten().any(|h| gone(h));
            if !(stale_refs || stale_aux) {
                continue;
            }
            let mut next = p.clone();
            next.refs.retain(|h, _| !gone(h));
            for hosts in next.aux.values_mut() {
                hosts.retain(|h| !gone(h));
            }
            next.aux.retain(|_, hosts| !hosts.is_empty());
            let done = if next.refs.is_empty() {
                self.cluster.delete(&key, Some(rec.revision)).await?
            } else {
                self.cluster
                    .update_json(&key, rec.revision, &next)
                    .await?
                    .is_some()
            };
            if done {
                info!(pool = %p.pool, "removed the references of hosts gone longer than the grace period");
            }
        }
        for (key, rec) in self.lossy::<OverlayRecord>(keys::OVERLAYS).await? {
            if !rec.value.hosts.iter().any(|h| gone(h)) {
                continue;
            }
            let mut next = rec.value.clone();
            next.hosts.retain(|h| !gone(h));
            if next.hosts.is_empty() {
                self.cluster.delete(&key, Some(rec.revision)).await?;
            } else {
                self.cluster.update_json(&key, rec.revision, &next).await?;
            }
        }
        Ok(reclaimed)
    }
}

fn warn_skipped(bad: &[String]) {
    for record in bad {
        warn!(%record, "skipping a record that does not decode");
    }
}

fn decode_block(key: &str, value: &[u8]) -> Option<(Ipv4Network, Ipv4Network, String)> {
    let Ok(Key::Block { pool, block }) = Key::parse(key) else {
        return None;
    };
    let rec: BlockRecord = serde_json::from_slice(value).ok()?;
    Some((pool, block, rec.host))
}

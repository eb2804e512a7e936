//! Block ownership: the one place that claims, verifies, releases and reclaims
//! `blocks/<pool>/<block>` records. The cluster store alone decides who owns a block:
//! - a host claims a block with create-if-absent, and hands out addresses from it
//!   without asking the store only while its `seen/` lease is certainly alive
//!   ([`Tenure::blocks_are_safe`]); otherwise it reads the owner from the store first;
//! - it verifies every block it holds addresses in on every (re-)registration and
//!   every mesh pass: a free one is claimed back, one another host took is a
//!   conflict (no more addresses from it, reported in the log and `weft status`);
//! - it publishes in each block's record every address it may have handed out from
//!   it: those in use and a headroom of [`HEADROOM`] more, the only ones it may hand
//!   out without asking the store;
//! - it releases only its own blocks;
//! - a host's blocks (and its pool references, aux reservations and network
//!   memberships) are reclaimed only when etcd has expired its `seen/` lease and the
//!   reclaiming host has itself been registered for the whole grace period; never
//!   a live host's, never one's own. What the host published in a reclaimed block
//!   becomes its reservation (`reserved/<pool>/<block>/<host>`, expiring one grace
//!   period after its last write): nobody hands those addresses out, and the mesh
//!   routes them to that host while it is live. A host that comes back and finds a
//!   block taken writes (and keeps writing) its reservation of the addresses it
//!   still uses there, and drops it when they are gone.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ipnetwork::Ipv4Network;
use serde::Serialize;
use tracing::{error, info, warn};

use super::{allocator, IpamError};
use crate::cluster::Tenure;
use crate::schema::keys::{self, Key};
use crate::schema::{
    AddressRecord, BlockRecord, HostRecord, OverlayRecord, PoolRecord, ReservedRecord,
};
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

/// Addresses past those in use that a host publishes in each of its blocks: it may
/// hand these out while cut off from the cluster store; beyond them it publishes
/// more first.
pub const HEADROOM: usize = 8;

/// Addresses reserved for a host's containers in a block it no longer owns.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Reservation {
    pub pool: Ipv4Network,
    pub block: Ipv4Network,
    pub host: String,
    pub addresses: BTreeSet<Ipv4Addr>,
}

/// What this host last read or wrote of the records it allocates by.
#[derive(Default)]
struct Known {
    /// This host's blocks, with what it has published in each.
    published: BTreeMap<Ipv4Network, BTreeSet<Ipv4Addr>>,
    /// Every host's reservations, by block.
    reserved: BTreeMap<Ipv4Network, BTreeSet<Ipv4Addr>>,
    /// This host's own reservations, with when it last wrote each.
    mine: BTreeMap<Ipv4Network, (BTreeSet<Ipv4Addr>, Instant)>,
}

pub struct Blocks {
    cluster: Arc<dyn Store>,
    local: Arc<dyn Store>,
    host: String,
    tenure: Arc<Tenure>,
    grace: std::time::Duration,
    conflicts: Mutex<BTreeMap<Ipv4Network, BlockConflict>>,
    known: Mutex<Known>,
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
            known: Mutex::new(Known::default()),
        }
    }

    fn known(&self) -> std::sync::MutexGuard<'_, Known> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
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
        let pools = self.pools().await?;
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

    /// An address of `block` this host may hand out without asking the cluster store:
    /// one it has published there, not `taken`, not reserved by the pool or for another
    /// host, while the block is certainly still its own.
    pub fn published_free(
        &self,
        pool: &PoolRecord,
        block: Ipv4Network,
        taken: &BTreeSet<Ipv4Addr>,
    ) -> Option<Ipv4Addr> {
        if !self.usable_locally(block) {
            return None;
        }
        let range = pool.range();
        let excluded = pool.reserved();
        let known = self.known();
        let reserved = known.reserved.get(&block);
        known.published.get(&block)?.iter().copied().find(|ip| {
            range.contains(*ip)
                && allocator::is_host_address(pool.pool, *ip)
                && !taken.contains(ip)
                && !excluded.contains(ip)
                && !reserved.is_some_and(|r| r.contains(ip))
        })
    }

    /// Every reservation in `pool`'s blocks, read from the cluster store, as the
    /// addresses nobody may hand out there (by block).
    pub async fn reserved_in_pool(
        &self,
        pool: Ipv4Network,
    ) -> Result<BTreeMap<Ipv4Network, BTreeSet<Ipv4Addr>>, StoreError> {
        let mut out: BTreeMap<Ipv4Network, BTreeSet<Ipv4Addr>> = BTreeMap::new();
        for r in self
            .reservations_under(&keys::reserved_of_pool(pool))
            .await?
        {
            out.entry(r.block).or_default().extend(r.addresses);
        }
        let mut known = self.known();
        known.reserved.retain(|b, _| !pool.contains(b.network()));
        known.reserved.extend(out.clone());
        Ok(out)
    }

    /// The reservations under `prefix` whose key and record decode and whose
    /// addresses lie in their block; the others are skipped with a warning.
    async fn reservations_under(&self, prefix: &str) -> Result<Vec<Reservation>, StoreError> {
        let mut out = Vec::new();
        for (key, rec) in self.lossy::<ReservedRecord>(prefix).await? {
            match Key::parse(&key) {
                Ok(Key::Reserved { pool, block, host })
                    if rec.value.addresses.iter().all(|ip| block.contains(*ip)) =>
                {
                    out.push(Reservation {
                        pool,
                        block,
                        host,
                        addresses: rec.value.addresses,
                    })
                }
                _ => {
                    warn!(%key, "skipping a reservation whose key does not decode or whose addresses lie outside its block")
                }
            }
        }
        Ok(out)
    }

    /// Every address this host has handed out (its local address records).
    pub async fn addresses_here(&self) -> Result<BTreeSet<Ipv4Addr>, StoreError> {
        Ok(self
            .local
            .list(keys::ADDRESSES)
            .await?
            .into_iter()
            .filter_map(|(k, _)| match Key::parse(&k) {
                Ok(Key::Address { ip, .. }) => Some(ip),
                _ => None,
            })
            .collect())
    }

    /// Whether this host has been registered for the whole grace period: only then
    /// may it take another host for gone.
    pub fn may_reclaim(&self) -> bool {
        self.tenure
            .registered_for()
            .is_some_and(|d| d >= self.grace)
    }

    /// How often this host must rewrite its reservations (a third of their lifetime).
    pub fn reservation_refresh(&self) -> std::time::Duration {
        self.grace / 3
    }

    /// The pools this host has a network in (a weft network's subnet is its pool):
    /// the only ones whose blocks it routes.
    pub async fn pools_here(&self) -> Result<BTreeSet<Ipv4Network>, StoreError> {
        let (networks, bad) = self
            .local
            .list_json_lossy::<crate::schema::NetworkRecord>(keys::NETWORKS)
            .await?;
        warn_skipped(&bad);
        Ok(networks.into_iter().map(|(_, r)| r.value.subnet).collect())
    }

    /// Every reservation in the cluster.
    pub async fn reservations(&self) -> Result<Vec<Reservation>, StoreError> {
        self.reservations_under(keys::RESERVED).await
    }

    /// Every reservation in a block of an existing pool (for the mesh and `weft
    /// status`): one of a pool since deleted only waits to expire.
    pub async fn reservations_checked(&self) -> Result<Vec<Reservation>, StoreError> {
        let pools = self.pools().await?;
        let mut out = self.reservations().await?;
        out.retain(|r| pools.get(&r.pool).is_some_and(|p| p.has_block(r.block)));
        Ok(out)
    }

    async fn pools(&self) -> Result<BTreeMap<Ipv4Network, PoolRecord>, StoreError> {
        Ok(self
            .lossy::<PoolRecord>(keys::POOLS)
            .await?
            .into_iter()
            .map(|(_, r)| (r.value.pool, r.value))
            .collect())
    }

    /// Publishes `ip` in this host's `block`, with the addresses in use there and a
    /// fresh headroom (added to what is published), unless it is published already.
    /// Fails when the block is not this host's (any more).
    pub async fn publish(
        &self,
        pool: &PoolRecord,
        block: Ipv4Network,
        ip: Ipv4Addr,
        taken: &BTreeSet<Ipv4Addr>,
        excluded: &BTreeSet<Ipv4Addr>,
    ) -> Result<(), IpamError> {
        let key = keys::block(pool.pool, block);
        for _ in 0..crate::store::CAS_RETRIES {
            let Some(rec) = self.cluster.get_json::<BlockRecord>(&key).await? else {
                return Err(IpamError::Conflict(format!(
                    "block {block} is no longer this host's; try again"
                )));
            };
            if rec.value.host != self.host {
                return Err(IpamError::Conflict(format!(
                    "block {block} belongs to host {}; try again",
                    rec.value.host
                )));
            }
            if rec.value.published.contains(&ip) {
                self.known().published.insert(block, rec.value.published);
                return Ok(());
            }
            // Published addresses only ever grow while the block is this host's: a
            // smaller set could drop one handed out on a stale view.
            let mut published = rec.value.published.clone();
            published.extend(self.to_publish(pool, block, ip, taken, excluded));
            let next = BlockRecord {
                host: self.host.clone(),
                published,
            };
            if self
                .cluster
                .update_json(&key, rec.revision, &next)
                .await?
                .is_some()
            {
                self.known().published.insert(block, next.published);
                return Ok(());
            }
        }
        Err(StoreError::Contended(key).into())
    }

    /// What this host publishes in `block` when it hands out `ip`: the addresses in
    /// use there, `ip`, and the next [`HEADROOM`] free ones.
    fn to_publish(
        &self,
        pool: &PoolRecord,
        block: Ipv4Network,
        ip: Ipv4Addr,
        taken: &BTreeSet<Ipv4Addr>,
        excluded: &BTreeSet<Ipv4Addr>,
    ) -> BTreeSet<Ipv4Addr> {
        let mut used: BTreeSet<Ipv4Addr> = taken
            .iter()
            .copied()
            .filter(|a| block.contains(*a))
            .collect();
        used.insert(ip);
        let headroom: Vec<Ipv4Addr> =
            allocator::free(pool.pool, block, pool.range(), &used, excluded)
                .take(HEADROOM)
                .collect();
        used.extend(headroom);
        used
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

    /// Makes sure this host owns the block that holds the static address `ip`
    /// (claiming it if nobody does) and has published `ip` there; fails when another
    /// host owns the block or `ip` is reserved for another host's container.
    pub async fn own(
        &self,
        pool: &PoolRecord,
        block: Ipv4Network,
        ip: Ipv4Addr,
        taken: &BTreeSet<Ipv4Addr>,
    ) -> Result<(), IpamError> {
        let key = keys::block(pool.pool, block);
        // Ownership first, reservations after: a reclaim writes its reservation before
        // it frees the block, so once the block is this host's, every reservation made
        // before is visible.
        let claimed = self.claim(&key, &BTreeSet::new()).await?;
        if claimed {
            info!(%block, "block claimed");
        } else {
            match self.cluster.get_json::<BlockRecord>(&key).await? {
                Some(r) if r.value.host == self.host => {}
                Some(r) => {
                    return Err(IpamError::Conflict(format!(
                        "block {block} belongs to host {}; choose an address outside it or let weft choose",
                        r.value.host
                    )))
                }
                None => return Err(StoreError::Contended(key).into()),
            }
        }
        let reserved = self.reserved_in_pool(pool.pool).await?;
        let reserved = reserved.get(&block).cloned().unwrap_or_default();
        if reserved.contains(&ip) {
            return Err(IpamError::Conflict(format!(
                "address {ip} is reserved for a container of a host that lost its block {block} while cut off; choose another address"
            )));
        }
        let excluded: BTreeSet<Ipv4Addr> = pool.reserved().union(&reserved).copied().collect();
        self.publish(pool, block, ip, taken, &excluded).await
    }

    /// Creates `key` as this host's block with `published`; false if it exists.
    async fn claim(&self, key: &str, published: &BTreeSet<Ipv4Addr>) -> Result<bool, StoreError> {
        let mine = BlockRecord {
            host: self.host.clone(),
            published: published.clone(),
        };
        let claimed = self.cluster.create_json(key, &mine).await?.is_some();
        if claimed {
            if let Ok(Key::Block { block, .. }) = Key::parse(key) {
                self.known().published.insert(block, mine.published);
            }
        }
        Ok(claimed)
    }

    /// Claims the first block of `pool` that nobody owns and that has a free address
    /// for this host (`excluded` gives, per block, what may not be handed out there);
    /// returns it with that address, published.
    pub async fn claim_free(
        &self,
        pool: &PoolRecord,
        owners: &BTreeMap<Ipv4Network, String>,
        taken: &BTreeSet<Ipv4Addr>,
        excluded: impl Fn(Ipv4Network) -> BTreeSet<Ipv4Addr>,
    ) -> Result<Option<(Ipv4Network, Ipv4Addr)>, IpamError> {
        let range = pool.range();
        for block in allocator::blocks_overlapping(pool.pool, pool.block_prefix, range) {
            if owners.contains_key(&block) || self.is_conflicted(block) {
                continue;
            }
            let excluded = excluded(block);
            let Some(ip) = allocator::first_free(pool.pool, block, range, taken, &excluded) else {
                continue;
            };
            let published = self.to_publish(pool, block, ip, taken, &excluded);
            if self
                .claim(&keys::block(pool.pool, block), &published)
                .await?
            {
                info!(%block, "block claimed");
                return Ok(Some((block, ip)));
            }
        }
        Ok(None)
    }

    /// Checks every block this host holds addresses in against the cluster store:
    /// claims back the ones nobody owns, publishes in its own blocks every address in
    /// use there, records as conflicts the ones another host owns and keeps its
    /// reservation of its addresses in those. Runs on every (re-)registration and
    /// every mesh pass.
    pub async fn verify(&self) -> Result<Verified, IpamError> {
        let generation = self.tenure.generation();
        let mut held: BTreeMap<(Ipv4Network, Ipv4Network), BTreeSet<Ipv4Addr>> = BTreeMap::new();
        let (addresses, bad) = self
            .local
            .list_json_lossy::<AddressRecord>(keys::ADDRESSES)
            .await?;
        warn_skipped(&bad);
        for (key, rec) in addresses {
            match Key::parse(&key) {
                Ok(Key::Address { pool, ip }) => {
                    held.entry((pool, rec.value.block)).or_default().insert(ip);
                }
                _ => warn!(%key, "skipping an address record whose key does not decode"),
            }
        }
        let reservations = self.reservations().await?;
        let reserved_here: BTreeSet<(Ipv4Network, Ipv4Network)> = reservations
            .iter()
            .filter(|r| r.host == self.host)
            .map(|r| (r.pool, r.block))
            .collect();
        let mut report = Verified::default();
        let mut conflicts = BTreeMap::new();
        let mut published = BTreeMap::new();
        let mut undecided = BTreeSet::new();
        for (&(pool, block), addresses) in &held {
            let key = keys::block(pool, block);
            let stored = self.cluster.get(&key).await?;
            let decoded = stored
                .as_ref()
                .map(|v| (serde_json::from_slice::<BlockRecord>(&v.value), v.revision));
            let owner = match decoded {
                Some((Ok(r), revision)) if r.host == self.host => {
                    // A reservation of this host's in its own block comes from a reclaim
                    // that raced its return: confirm the block with a write first, so
                    // that the reclaim's delete (at the revision it read) fails; only
                    // then may the reservation go.
                    let confirm = reserved_here.contains(&(pool, block));
                    match self
                        .publish_in_use(&key, r, revision, addresses, confirm)
                        .await?
                    {
                        Some(p) => {
                            published.insert(block, p);
                        }
                        None => {
                            undecided.insert((pool, block));
                        }
                    }
                    continue;
                }
                Some((Ok(r), _)) => r.host,
                // A record nobody can read is nobody's to hand out from.
                Some((Err(_), _)) => "(unreadable record)".to_string(),
                None if self.claim(&key, addresses).await? => {
                    warn!(%block, "claimed back a block this host still uses");
                    report.claimed_back += 1;
                    published.insert(block, addresses.clone());
                    continue;
                }
                None => {
                    // Claimed meanwhile: the next pass decides; any reservation stays.
                    undecided.insert((pool, block));
                    continue;
                }
            };
            conflicts.insert(
                block,
                BlockConflict {
                    pool,
                    block,
                    owner,
                    addresses: addresses.iter().copied().collect(),
                },
            );
        }
        let lost: BTreeMap<(Ipv4Network, Ipv4Network), &BTreeSet<Ipv4Addr>> = held
            .iter()
            .filter(|((_, block), _)| conflicts.contains_key(block))
            .map(|(k, a)| (*k, a))
            .collect();
        self.keep_reservations(&lost, &undecided, &reservations)
            .await?;
        {
            let mut known = self.known();
            known.published = published;
            known.reserved.clear();
            for r in reservations {
                known
                    .reserved
                    .entry(r.block)
                    .or_default()
                    .extend(r.addresses);
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

    /// Makes sure every address this host uses in its own block is published there
    /// (records written before weft published them have none), writing the record
    /// when something is missing or `confirm` asks for a write anyway; returns what is
    /// published, or None when the record changed meanwhile (the next pass decides).
    async fn publish_in_use(
        &self,
        key: &str,
        record: BlockRecord,
        revision: u64,
        in_use: &BTreeSet<Ipv4Addr>,
        confirm: bool,
    ) -> Result<Option<BTreeSet<Ipv4Addr>>, StoreError> {
        if in_use.is_subset(&record.published) && !confirm {
            return Ok(Some(record.published));
        }
        let next = BlockRecord {
            published: record.published.union(in_use).copied().collect(),
            ..record
        };
        let done = self.cluster.update_json(key, revision, &next).await?;
        Ok(done.map(|_| next.published))
    }

    /// Keeps this host's reservation of its addresses in every block it `lost` to
    /// another host: written when missing or different, and again a third of the grace
    /// period after the last write (it expires one grace period after it); every other
    /// reservation of this host (no address of it left there, or the block is its own
    /// again) is deleted, but those in blocks still `undecided`.
    async fn keep_reservations(
        &self,
        lost: &BTreeMap<(Ipv4Network, Ipv4Network), &BTreeSet<Ipv4Addr>>,
        undecided: &BTreeSet<(Ipv4Network, Ipv4Network)>,
        stored: &[Reservation],
    ) -> Result<(), StoreError> {
        let now = Instant::now();
        let stored: BTreeMap<(Ipv4Network, Ipv4Network), &BTreeSet<Ipv4Addr>> = stored
            .iter()
            .filter(|r| r.host == self.host)
            .map(|r| ((r.pool, r.block), &r.addresses))
            .collect();
        for (&(pool, block), &addresses) in lost {
            let written_lately =
                self.known().mine.get(&block).is_some_and(|(a, at)| {
                    a == addresses && now - *at < self.reservation_refresh()
                });
            if written_lately && stored.get(&(pool, block)) == Some(&addresses) {
                continue;
            }
            self.reserve(pool, block, &self.host, addresses.clone())
                .await?;
            if stored.get(&(pool, block)) != Some(&addresses) {
                warn!(%block, ?addresses, "reserved this host's addresses in a block another host took");
            }
            self.known().mine.insert(block, (addresses.clone(), now));
        }
        for &(pool, block) in stored.keys() {
            if lost.contains_key(&(pool, block)) || undecided.contains(&(pool, block)) {
                continue;
            }
            self.cluster
                .delete(&keys::reserved(pool, block, &self.host), None)
                .await?;
            info!(%block, "dropped this host's reservation: no container of it is left there, or the block is its own again");
            self.known().mine.remove(&block);
        }
        Ok(())
    }

    /// Writes `host`'s reservation of `addresses` in `block`, for one grace period.
    async fn reserve(
        &self,
        pool: Ipv4Network,
        block: Ipv4Network,
        host: &str,
        addresses: BTreeSet<Ipv4Addr>,
    ) -> Result<(), StoreError> {
        let record = ReservedRecord { addresses };
        self.cluster
            .put_expiring_json(&keys::reserved(pool, block, host), &record, self.grace)
            .await?;
        Ok(())
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
        if !self.may_reclaim() {
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
            let (Ok(Key::Block { pool, block }), Ok(record)) = (
                Key::parse(&key),
                serde_json::from_slice::<BlockRecord>(&v.value),
            ) else {
                continue;
            };
            if !gone(&record.host) {
                continue;
            }
            // Its containers may still run, cut off: what it published stays theirs.
            if !record.published.is_empty() {
                self.reserve(pool, block, &record.host, record.published)
                    .await?;
            }
            if self.cluster.delete(&key, Some(v.revision)).await? {
                info!(%block, host = %record.host, "reclaimed the block of a host gone longer than the grace period; its published addresses stay reserved");
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

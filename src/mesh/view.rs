//! What the mesh is built from: every host, block, pool and reservation record of
//! the cluster store, decoded and checked. The watch keeps one up to date from its
//! events (a pass that reads it costs no store round trip); a full pass builds one
//! from the store's listings. Both check records the same way.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use tracing::warn;

use crate::cluster::HostRecord;
use crate::ipam::Reservation;
use crate::schema::{keys, BlockRecord, Key, PoolRecord, ReservedRecord};

/// The key prefixes a view holds.
pub const PREFIXES: [&str; 4] = [keys::HOSTS, keys::BLOCKS, keys::POOLS, keys::RESERVED];

#[derive(Debug, Default)]
pub struct ClusterView {
    me: String,
    hosts: BTreeMap<String, HostRecord>,
    /// (pool, block) -> owner.
    blocks: BTreeMap<(Ipv4Network, Ipv4Network), String>,
    pools: BTreeMap<Ipv4Network, PoolRecord>,
    reserved: BTreeMap<(Ipv4Network, Ipv4Network, String), BTreeSet<Ipv4Addr>>,
    /// Records that do not decode, by key, with why.
    bad: BTreeMap<String, &'static str>,
    /// A block of this host's was given, taken or lost since the last `take_mine_changed`.
    mine_changed: bool,
    /// A host's membership (`seen/`) expired since the last `take_seen_gone`.
    seen_gone: bool,
}

/// The mesh's inputs at one moment: only records that passed every check.
#[derive(Debug, Default, PartialEq)]
pub struct Snapshot {
    pub hosts: Vec<HostRecord>,
    /// (pool, block, owner), each a block of an existing pool.
    pub blocks: Vec<(Ipv4Network, Ipv4Network, String)>,
    /// Reservations in blocks of existing pools.
    pub reservations: Vec<Reservation>,
    /// "key: why" for every record left out.
    pub skipped: Vec<String>,
}

impl ClusterView {
    /// An empty view for host `me` (whose own blocks changing is told apart).
    pub fn new(me: impl Into<String>) -> Self {
        Self {
            me: me.into(),
            ..Self::default()
        }
    }

    /// A record was written (`key` without the store's prefix).
    pub fn put(&mut self, key: &str, value: &[u8]) {
        // Other records (memberships, overlays, kinds of a newer version) do not
        // shape the mesh, and a full pass never reads them.
        if !PREFIXES.iter().any(|p| key.starts_with(p)) {
            return;
        }
        self.remove(key);
        let bad = match Key::parse(key) {
            Ok(Key::Host(id)) => match serde_json::from_slice::<HostRecord>(value) {
                Ok(rec) if rec.id == id => {
                    self.hosts.insert(id, rec);
                    return;
                }
                Ok(_) => "key and record disagree",
                Err(_) => "does not decode",
            },
            Ok(Key::Block { pool, block }) => match serde_json::from_slice::<BlockRecord>(value) {
                Ok(rec) => {
                    self.mine_changed |= rec.host == self.me;
                    self.blocks.insert((pool, block), rec.host);
                    return;
                }
                Err(_) => "does not decode",
            },
            Ok(Key::Pool(pool)) => match serde_json::from_slice::<PoolRecord>(value) {
                Ok(rec) if rec.pool == pool => {
                    self.pools.insert(pool, rec);
                    return;
                }
                _ => "does not decode",
            },
            Ok(Key::Reserved { pool, block, host }) => {
                match serde_json::from_slice::<ReservedRecord>(value) {
                    Ok(rec) if rec.addresses.iter().all(|ip| block.contains(*ip)) => {
                        self.reserved.insert((pool, block, host), rec.addresses);
                        return;
                    }
                    _ => "does not decode or lies outside its block",
                }
            }
            _ => "does not decode",
        };
        self.bad.insert(key.to_string(), bad);
    }

    /// A record was deleted.
    pub fn delete(&mut self, key: &str) {
        if let Ok(Key::Seen(_)) = Key::parse(key) {
            self.seen_gone = true;
        }
        self.remove(key);
    }

    /// Forgets what the view held under `key`.
    fn remove(&mut self, key: &str) {
        self.bad.remove(key);
        match Key::parse(key) {
            Ok(Key::Host(id)) => {
                self.hosts.remove(&id);
            }
            Ok(Key::Block { pool, block }) => {
                if let Some(owner) = self.blocks.remove(&(pool, block)) {
                    self.mine_changed |= owner == self.me;
                }
            }
            Ok(Key::Pool(pool)) => {
                self.pools.remove(&pool);
            }
            Ok(Key::Reserved { pool, block, host }) => {
                self.reserved.remove(&(pool, block, host));
            }
            _ => {}
        }
    }

    /// Whether one of this host's blocks changed hands since the last call: then a
    /// full pass (which checks this host's blocks against the store) must run.
    pub fn take_mine_changed(&mut self) -> bool {
        std::mem::take(&mut self.mine_changed)
    }

    /// Whether a host's membership expired since the last call: a host may be gone
    /// for good, and the full pass looks for blocks to reclaim.
    pub fn take_seen_gone(&mut self) -> bool {
        std::mem::take(&mut self.seen_gone)
    }

    pub fn snapshot(&self) -> Snapshot {
        let in_pool = |pool: &Ipv4Network, block: &Ipv4Network| {
            self.pools.get(pool).is_some_and(|p| p.has_block(*block))
        };
        let mut skipped: Vec<String> = self
            .bad
            .iter()
            .map(|(key, why)| format!("{key}: {why}"))
            .collect();
        let mut blocks = Vec::with_capacity(self.blocks.len());
        for ((pool, block), owner) in &self.blocks {
            if in_pool(pool, block) {
                blocks.push((*pool, *block, owner.clone()));
            } else {
                skipped.push(format!(
                    "{}: is not a block of any pool",
                    keys::block(*pool, *block)
                ));
            }
        }
        let reservations = self
            .reserved
            .iter()
            // One in a pool since deleted only waits to expire.
            .filter(|((pool, block, _), _)| in_pool(pool, block))
            .map(|((pool, block, host), addresses)| Reservation {
                pool: *pool,
                block: *block,
                host: host.clone(),
                addresses: addresses.clone(),
            })
            .collect();
        for record in &skipped {
            warn!(%record, "skipping a bad cluster record");
        }
        Snapshot {
            hosts: self.hosts.values().cloned().collect(),
            blocks,
            reservations,
            skipped,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool_json(pool: &str) -> Vec<u8> {
        serde_json::to_vec(&PoolRecord::with_blocks(pool.parse().unwrap(), 26)).unwrap()
    }

    fn host_json(id: &str) -> Vec<u8> {
        format!(r#"{{"id":"{id}","public_key":"key-{id}","endpoint":"192.0.2.1:51820","keepalive":null}}"#)
            .into_bytes()
    }

    #[test]
    fn events_keep_the_view_and_bad_records_are_set_apart() {
        let mut view = ClusterView::new("a");
        view.put("pools/10.42.0.0_16", &pool_json("10.42.0.0/16"));
        view.put("hosts/b", &host_json("b"));
        view.put("hosts/c", &host_json("not-c"));
        view.put("blocks/10.42.0.0_16/10.42.0.64_26", br#"{"host":"b"}"#);
        view.put("blocks/10.42.0.0_16/10.42.1.0_24", br#"{"host":"b"}"#);
        view.put("blocks/garbage", br#"{"host":"b"}"#);
        view.put("seen/b", br#"{"last_seen":1}"#);
        view.put("overlays/garbage", b"{");
        let snap = view.snapshot();
        assert_eq!(snap.hosts.len(), 1);
        assert_eq!(
            snap.blocks,
            vec![(
                "10.42.0.0/16".parse().unwrap(),
                "10.42.0.64/26".parse().unwrap(),
                "b".to_string()
            )]
        );
        assert_eq!(snap.skipped.len(), 3, "{:?}", snap.skipped);
        assert!(!view.take_mine_changed(), "no block of a's changed");
        // b leaves; its block goes to a.
        view.delete("hosts/b");
        view.put("blocks/10.42.0.0_16/10.42.0.64_26", br#"{"host":"a"}"#);
        // A bad record mended is no longer reported.
        view.put("hosts/c", &host_json("c"));
        let snap = view.snapshot();
        assert_eq!(snap.hosts[0].id, "c");
        assert_eq!(snap.blocks[0].2, "a");
        assert_eq!(snap.skipped.len(), 2);
        assert!(view.take_mine_changed());
        assert!(!view.take_mine_changed(), "told once");
        assert!(!view.take_seen_gone());
        view.delete("seen/b");
        assert!(view.take_seen_gone(), "b's membership expired");
        // The pool goes: its blocks are no longer valid.
        view.delete("pools/10.42.0.0_16");
        assert!(view.snapshot().blocks.is_empty());
    }

    #[test]
    fn a_reservation_outside_its_block_is_skipped() {
        let mut view = ClusterView::new("a");
        view.put("pools/10.42.0.0_16", &pool_json("10.42.0.0/16"));
        view.put(
            "reserved/10.42.0.0_16/10.42.0.0_26/b",
            br#"{"addresses":["10.42.0.2"]}"#,
        );
        view.put(
            "reserved/10.42.0.0_16/10.42.0.64_26/b",
            br#"{"addresses":["10.42.9.9"]}"#,
        );
        let snap = view.snapshot();
        assert_eq!(snap.reservations.len(), 1);
        assert_eq!(snap.skipped.len(), 1);
    }
}

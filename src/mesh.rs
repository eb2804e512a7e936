//! The mesh reconciler: the live hosts in the cluster store (desired) against the
//! tunnel's peers and the routes to remote blocks (actual). It runs when anything
//! under the store prefix changes (an etcd watch), on a timer, and after a lost or
//! compacted watch; every pass computes the whole diff, so no event can be missed
//! for long and no stale peer or route survives a pass.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, WatchOptions};
use ipnetwork::Ipv4Network;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::cluster::{HostRecord, Tenure};
use crate::datapath::{Datapath, DatapathError};
use crate::ipam::Blocks;
use crate::schema::keys;
use crate::store::{Store, StoreError, StoreExt};
use crate::tunnel::{Peer, PeerDiff, Tunnel, TunnelError};

#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Tunnel(#[from] TunnelError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Ipam(#[from] crate::ipam::IpamError),
}

/// Peers for every live host but `me`, each allowed (and routed) its own blocks.
pub fn desired_peers(
    me: &str,
    hosts: &[HostRecord],
    blocks: &[(Ipv4Network, String)],
) -> (Vec<Peer>, Vec<Ipv4Network>) {
    let mut owned: BTreeMap<&str, Vec<Ipv4Network>> = BTreeMap::new();
    for (block, host) in blocks {
        owned.entry(host.as_str()).or_default().push(*block);
    }
    let mut peers = Vec::new();
    let mut routes = Vec::new();
    for h in hosts.iter().filter(|h| h.id != me) {
        let allowed = owned.get(h.id.as_str()).cloned().unwrap_or_default();
        routes.extend(allowed.iter().copied());
        peers.push(Peer {
            public_key: h.public_key.clone(),
            endpoint: h.endpoint,
            allowed_ips: allowed,
            keepalive: h.keepalive,
        });
    }
    peers.sort_by(|a, b| a.public_key.cmp(&b.public_key));
    routes.sort();
    (peers, routes)
}

pub struct Mesh {
    cluster: Arc<dyn Store>,
    tunnel: Arc<dyn Tunnel>,
    datapath: Arc<dyn Datapath>,
    blocks: Arc<Blocks>,
    tenure: Arc<Tenure>,
    host: String,
    wake: Notify,
    /// How long a host whose lease expired stays in the data plane while its
    /// WireGuard traffic still arrives (None: hosts leave with their lease).
    liveness: Option<Duration>,
    /// What this host last saw of every other host: its record, and the bytes
    /// received from it with when that count last grew.
    heard: std::sync::Mutex<BTreeMap<String, Heard>>,
    /// Records the last pass skipped as bad ("key: why"), for `weft status`.
    skipped: std::sync::Mutex<Vec<String>>,
}

struct Heard {
    record: HostRecord,
    rx_bytes: u64,
    grew: Instant,
}

impl Mesh {
    pub fn new(
        cluster: Arc<dyn Store>,
        tunnel: Arc<dyn Tunnel>,
        datapath: Arc<dyn Datapath>,
        blocks: Arc<Blocks>,
        tenure: Arc<Tenure>,
    ) -> Self {
        Self {
            cluster,
            tunnel,
            datapath,
            host: blocks.host().to_string(),
            blocks,
            tenure,
            wake: Notify::new(),
            liveness: None,
            heard: std::sync::Mutex::new(BTreeMap::new()),
            skipped: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Records the last pass skipped because they were bad.
    pub fn skipped(&self) -> Vec<String> {
        self.skipped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Keeps a host whose lease expired while traffic from it still arrives within
    /// `window` (2 × the keepalive other hosts send to this one, + 1 s): a host cut off
    /// from etcd alone is not cut off from the data plane.
    pub fn with_liveness(mut self, window: Option<Duration>) -> Self {
        self.liveness = window;
        self
    }

    /// The live hosts, plus hosts whose lease expired but whose WireGuard traffic
    /// grew within the liveness window. Also returns when the next such host will
    /// go stale (a pass must run then).
    fn still_heard(
        &self,
        live: Vec<HostRecord>,
        peers: &[crate::tunnel::PeerStatus],
    ) -> (Vec<HostRecord>, Option<Instant>) {
        let now = Instant::now();
        let rx_of = |key: &str| {
            peers
                .iter()
                .find(|p| p.public_key == key)
                .map(|p| p.rx_bytes)
        };
        let mut heard = self.heard.lock().unwrap_or_else(|p| p.into_inner());
        for h in &live {
            let rx = rx_of(&h.public_key).unwrap_or(0);
            let entry = heard.entry(h.id.clone()).or_insert(Heard {
                record: h.clone(),
                rx_bytes: rx,
                grew: now,
            });
            if rx != entry.rx_bytes || entry.record != *h {
                entry.grew = now;
            }
            entry.rx_bytes = rx;
            entry.record = h.clone();
        }
        let mut hosts = live;
        let mut next_stale = None;
        let window = self.liveness.unwrap_or(Duration::ZERO);
        heard.retain(|id, entry| {
            if hosts.iter().any(|h| &h.id == id) {
                return true;
            }
            // Any change counts (a re-created device starts from zero); a peer missing
            // from the device (it was just re-created) keeps the host until the window
            // ends, like silence does.
            if let Some(rx) = rx_of(&entry.record.public_key) {
                if rx != entry.rx_bytes {
                    entry.rx_bytes = rx;
                    entry.grew = now;
                }
            }
            let stale_at = entry.grew + window;
            if now >= stale_at {
                info!(host = %id, "host gone: lease expired and no traffic from it within the liveness window");
                return false;
            }
            debug!(host = %id, "lease expired but still heard over WireGuard; keeping its peer");
            next_stale = Some(next_stale.map_or(stale_at, |t: Instant| t.min(stale_at)));
            hosts.push(entry.record.clone());
            true
        });
        (hosts, next_stale)
    }

    pub fn tunnel(&self) -> &Arc<dyn Tunnel> {
        &self.tunnel
    }

    /// The live hosts; records that do not decode (or whose key and id disagree) are
    /// skipped with a warning and returned apart.
    pub async fn hosts_checked(&self) -> Result<(Vec<HostRecord>, Vec<String>), MeshError> {
        let (records, mut skipped) = self
            .cluster
            .list_json_lossy::<HostRecord>(keys::HOSTS)
            .await?;
        let mut good = Vec::new();
        for (key, rec) in records {
            match crate::schema::Key::parse(&key) {
                Ok(crate::schema::Key::Host(id)) if rec.value.id == id => good.push(rec.value),
                _ => skipped.push(format!("{key}: key and record disagree")),
            }
        }
        for record in &skipped {
            warn!(%record, "skipping a bad host record");
        }
        Ok((good, skipped))
    }

    pub async fn hosts(&self) -> Result<Vec<HostRecord>, MeshError> {
        Ok(self.hosts_checked().await?.0)
    }

    pub async fn reconcile(&self) -> Result<PeerDiff, MeshError> {
        self.pass().await.map(|(diff, _)| diff)
    }

    /// One pass; also returns when the next pass must run at the latest (a host kept
    /// for its traffic goes stale then).
    async fn pass(&self) -> Result<(PeerDiff, Option<Instant>), MeshError> {
        let (live, mut skipped) = self.hosts_checked().await?;
        // The device is ensured on every pass: a userspace WireGuard that died, or a
        // deleted interface, is set up again (and gets its peers below).
        let status = match self.tunnel.peers().await {
            Ok(status) => status,
            Err(e) => {
                warn!(error = %e, "WireGuard device unreadable; setting it up again");
                self.tunnel.ensure_device().await?;
                self.tunnel.peers().await?
            }
        };
        let (hosts, next_stale) = self.still_heard(live, &status);
        // Ownership first: the blocks this host uses must still be its own.
        if let Err(e) = self.blocks.verify().await {
            warn!(error = %e, "block verification incomplete");
        }
        if let Err(e) = self.blocks.reclaim(&hosts).await {
            warn!(error = %e, "block reclaim skipped");
        }
        let (blocks, bad_blocks) = self.blocks.all_checked().await?;
        skipped.extend(bad_blocks);
        *self.skipped.lock().unwrap_or_else(|p| p.into_inner()) = skipped;
        // Only pools this host has a network in are routed (and allowed) here: another
        // host's subnet must never take over a route of this host's.
        let here = self.blocks.pools_here().await?;
        // A host's reserved addresses in blocks it lost are its own, as /32s: more
        // specific than the block's route and allowed-ips, so they reach its containers.
        let reserved = self.reserved_routes(&here).await?;
        let blocks: Vec<(Ipv4Network, String)> = blocks
            .into_iter()
            .filter(|(pool, _, _)| here.contains(pool))
            .map(|(_, b, owner)| (b, owner))
            .chain(reserved)
            .collect();
        let (peers, routes) = desired_peers(&self.host, &hosts, &blocks);
        let diff = self.tunnel.apply_peers(&peers).await?;
        self.datapath
            .sync_tunnel_routes(self.tunnel.interface(), &routes)
            .await?;
        if !diff.is_empty() {
            info!(
                peers = peers.len(),
                routes = routes.len(),
                ?diff,
                "mesh updated"
            );
        }
        Ok((diff, next_stale))
    }

    /// Every reserved address in a pool of `here`, as a /32 of the host it is reserved
    /// for; never one a container of this host holds (its own /32 stays).
    async fn reserved_routes(
        &self,
        here: &std::collections::BTreeSet<Ipv4Network>,
    ) -> Result<Vec<(Ipv4Network, String)>, MeshError> {
        let mine = self.blocks.addresses_here().await?;
        Ok(self
            .blocks
            .reservations_checked()
            .await?
            .into_iter()
            .filter(|r| here.contains(&r.pool))
            .flat_map(|r| r.addresses.into_iter().map(move |ip| (ip, r.host.clone())))
            .filter(|(ip, _)| !mine.contains(ip))
            .map(|(ip, host)| (Ipv4Network::from(ip), host))
            .collect())
    }

    /// Asks for a pass now (e.g. after this host claimed a block).
    pub fn poke(&self) {
        self.wake.notify_one();
    }

    /// Reconciles on every wake-up, and at least every `every` (more often when this
    /// host's reservations must be rewritten sooner).
    pub async fn run(self: Arc<Self>, every: Duration) {
        let every = every.min(
            self.blocks
                .reservation_refresh()
                .max(Duration::from_secs(1)),
        );
        loop {
            let mut wait = every;
            match self.pass().await {
                Ok((_, Some(stale_at))) => {
                    let until = stale_at.saturating_duration_since(Instant::now());
                    wait = wait.min(until + Duration::from_millis(10));
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "mesh reconcile incomplete"),
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = self.tenure.registered_now.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
            // Coalesce a burst of changes into one pass.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Wakes the mesh on any change under `prefix`. A failed or compacted watch is
    /// opened again; the pass that follows resynchronises everything.
    pub async fn watch(self: Arc<Self>, client: Client, prefix: String) {
        loop {
            let mut watch = client.watch_client();
            match watch
                .watch(prefix.clone(), Some(WatchOptions::new().with_prefix()))
                .await
            {
                Ok(mut stream) => {
                    debug!("watching the cluster store");
                    self.poke();
                    loop {
                        match stream.message().await {
                            Ok(Some(resp)) if resp.canceled() || resp.compact_revision() > 0 => {
                                warn!(
                                    compacted = resp.compact_revision(),
                                    "watch cancelled; resyncing"
                                );
                                break;
                            }
                            Ok(Some(resp)) if !resp.events().is_empty() => self.poke(),
                            Ok(Some(_)) => {}
                            Ok(None) => break,
                            Err(e) => {
                                warn!(error = %e, "watch failed");
                                break;
                            }
                        }
                    }
                }
                Err(e) => debug!(error = %e, "cannot watch the cluster store yet"),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::fake::FakeDatapath;
    use crate::schema::{BlockRecord, PoolRecord};
    use crate::store::embedded::EmbeddedStore;
    use crate::tunnel::fake::FakeTunnel;

    /// A pool record for `pool` with /26 blocks, so that its blocks are valid, and a
    /// network of this host in it (the tests' mesh keeps its local records in the
    /// same store), so that they are routed here.
    async fn seed_pool(store: &EmbeddedStore, pool: Ipv4Network) {
        seed_network(store, pool).await;
        seed_pool_only(store, pool).await;
    }

    async fn seed_network(store: &EmbeddedStore, subnet: Ipv4Network) {
        let net = crate::schema::NetworkRecord::for_subnet(
            format!("net-{}", keys::cidr_segment(subnet)),
            subnet,
        );
        store
            .create_json(&keys::network(&net.id), &net)
            .await
            .unwrap();
    }

    async fn seed_pool_only(store: &EmbeddedStore, pool: Ipv4Network) {
        let rec = PoolRecord {
            pool,
            sub_pool: None,
            block_prefix: 26,
            automatic: false,
            gateway: None,
            refs: BTreeMap::new(),
            aux: BTreeMap::new(),
        };
        store.create_json(&keys::pool(pool), &rec).await.unwrap();
    }

    fn mesh_of(store: &Arc<EmbeddedStore>, tunnel: &Arc<FakeTunnel>) -> (Mesh, Arc<FakeDatapath>) {
        let dp = Arc::new(FakeDatapath::new());
        let tenure = Arc::new(Tenure::clustered());
        let blocks = Arc::new(Blocks::new(
            store.clone(),
            store.clone(),
            "a".into(),
            tenure.clone(),
            Duration::from_secs(600),
        ));
        let mesh = Mesh::new(store.clone(), tunnel.clone(), dp.clone(), blocks, tenure);
        (mesh, dp)
    }

    /// Hosts a (this one) and b, live.
    async fn seed_hosts(store: &EmbeddedStore) {
        for h in [host("a", "192.0.2.11"), host("b", "192.0.2.12")] {
            store.create_json(&keys::host(&h.id), &h).await.unwrap();
        }
    }

    fn host(id: &str, ip: &str) -> HostRecord {
        HostRecord {
            id: id.into(),
            public_key: format!("key-{id}"),
            endpoint: format!("{ip}:51820").parse().unwrap(),
            keepalive: None,
        }
    }

    #[test]
    fn peers_are_the_other_live_hosts_with_their_blocks() {
        let hosts = vec![
            host("a", "192.0.2.11"),
            host("b", "192.0.2.12"),
            host("c", "192.0.2.13"),
        ];
        let blocks = vec![
            ("10.42.0.0/26".parse().unwrap(), "a".to_string()),
            ("10.42.0.64/26".parse().unwrap(), "b".to_string()),
            ("10.42.1.0/26".parse().unwrap(), "b".to_string()),
            ("10.42.2.0/26".parse().unwrap(), "gone".to_string()),
        ];
        let (peers, routes) = desired_peers("a", &hosts, &blocks);
        assert_eq!(
            peers
                .iter()
                .map(|p| p.public_key.as_str())
                .collect::<Vec<_>>(),
            ["key-b", "key-c"]
        );
        assert_eq!(peers[0].allowed_ips.len(), 2);
        assert!(peers[1].allowed_ips.is_empty());
        let routes: Vec<String> = routes.iter().map(|r| r.to_string()).collect();
        assert_eq!(
            routes,
            ["10.42.0.64/26", "10.42.1.0/26"],
            "no route to my own or a dead host's blocks"
        );
    }

    #[tokio::test]
    async fn reconcile_programs_peers_and_routes_and_drops_departed_hosts() {
        let store = Arc::new(EmbeddedStore::in_memory());
        let tunnel = Arc::new(FakeTunnel::default());
        let (mesh, dp) = mesh_of(&store, &tunnel);
        seed_hosts(&store).await;
        let pool = "10.42.0.0/16".parse().unwrap();
        let block = "10.42.0.64/26".parse().unwrap();
        seed_pool(&store, pool).await;
        store
            .create_json(&keys::block(pool, block), &BlockRecord::of("b"))
            .await
            .unwrap()
            .unwrap();
        let diff = mesh.reconcile().await.unwrap();
        assert_eq!(diff.added, 1);
        assert_eq!(dp.with(|s| s.tunnel_routes.clone()), vec![block]);
        assert!(
            mesh.reconcile().await.unwrap().is_empty(),
            "a second pass changes nothing"
        );
        store.delete(&keys::host("b"), None).await.unwrap();
        assert_eq!(mesh.reconcile().await.unwrap().removed, 1);
        assert!(tunnel.peers.lock().unwrap().is_empty());
        assert!(
            dp.with(|s| s.tunnel_routes.is_empty()),
            "routes to a departed host go with it"
        );
    }

    /// Blocks of a pool this host has no network in are neither routed nor allowed:
    /// another host's subnet must not take over a route of this host.
    #[tokio::test]
    async fn only_pools_this_host_has_a_network_in_are_routed() {
        let store = Arc::new(EmbeddedStore::in_memory());
        let tunnel = Arc::new(FakeTunnel::default());
        let (mesh, dp) = mesh_of(&store, &tunnel);
        seed_hosts(&store).await;
        let (mine, theirs): (Ipv4Network, Ipv4Network) = (
            "10.42.0.0/24".parse().unwrap(),
            "10.99.0.0/24".parse().unwrap(),
        );
        seed_pool(&store, mine).await;
        seed_pool_only(&store, theirs).await;
        for pool in [mine, theirs] {
            let block = Ipv4Network::new(pool.network(), 26).unwrap();
            store
                .create_json(&keys::block(pool, block), &BlockRecord::of("b"))
                .await
                .unwrap();
        }
        mesh.reconcile().await.unwrap();
        let routes: Vec<String> =
            dp.with(|s| s.tunnel_routes.iter().map(|r| r.to_string()).collect());
        assert_eq!(routes, ["10.42.0.0/26"]);
        let allowed = tunnel.peers.lock().unwrap()[0].allowed_ips.clone();
        assert_eq!(
            allowed,
            vec!["10.42.0.0/26".parse::<Ipv4Network>().unwrap()]
        );
        // This host creates a network in the other pool: now it is routed too.
        seed_network(&store, theirs).await;
        mesh.reconcile().await.unwrap();
        assert_eq!(dp.with(|s| s.tunnel_routes.len()), 2);
    }

    /// Addresses reserved for b in a block a took from it are routed to b as /32s
    /// (more specific than the block), and only while b is live.
    #[tokio::test]
    async fn reserved_addresses_are_routed_to_their_host() {
        let store = Arc::new(EmbeddedStore::in_memory());
        let tunnel = Arc::new(FakeTunnel::default());
        let (mesh, dp) = mesh_of(&store, &tunnel);
        seed_hosts(&store).await;
        let pool = "10.42.0.0/16".parse().unwrap();
        let block = "10.42.0.0/26".parse().unwrap();
        seed_pool(&store, pool).await;
        store
            .create_json(&keys::block(pool, block), &BlockRecord::of("a"))
            .await
            .unwrap();
        let reserved = crate::schema::ReservedRecord {
            addresses: ["10.42.0.2".parse().unwrap(), "10.42.0.3".parse().unwrap()].into(),
        };
        store
            .put_expiring_json(
                &keys::reserved(pool, block, "b"),
                &reserved,
                Duration::from_secs(600),
            )
            .await
            .unwrap();
        mesh.reconcile().await.unwrap();
        let b_allowed = |t: &FakeTunnel| -> Vec<String> {
            t.peers.lock().unwrap()[0]
                .allowed_ips
                .iter()
                .map(|n| n.to_string())
                .collect()
        };
        assert_eq!(b_allowed(&tunnel), ["10.42.0.2/32", "10.42.0.3/32"]);
        let routes: Vec<String> =
            dp.with(|s| s.tunnel_routes.iter().map(|r| r.to_string()).collect());
        assert_eq!(routes, ["10.42.0.2/32", "10.42.0.3/32"]);
        // One of them is also on a container here (a duplicate from before): its own
        // /32 stays, no tunnel route takes it over.
        let record = crate::schema::AddressRecord { block, since: 1 };
        store
            .create_json(&keys::address(pool, "10.42.0.3".parse().unwrap()), &record)
            .await
            .unwrap();
        mesh.reconcile().await.unwrap();
        let routes: Vec<String> =
            dp.with(|s| s.tunnel_routes.iter().map(|r| r.to_string()).collect());
        assert_eq!(routes, ["10.42.0.2/32"]);
        store.delete(&keys::host("b"), None).await.unwrap();
        mesh.reconcile().await.unwrap();
        assert!(
            dp.with(|s| s.tunnel_routes.is_empty()),
            "not routed to a host that is not live"
        );
    }

    #[tokio::test]
    async fn a_host_whose_lease_expired_stays_while_its_traffic_arrives() {
        let store = Arc::new(EmbeddedStore::in_memory());
        let tunnel = Arc::new(FakeTunnel::default());
        let (mesh, dp) = mesh_of(&store, &tunnel);
        let mesh = mesh.with_liveness(Some(Duration::from_millis(300)));
        seed_hosts(&store).await;
        let pool = "10.42.0.0/16".parse().unwrap();
        let block = "10.42.0.64/26".parse().unwrap();
        seed_pool(&store, pool).await;
        store
            .create_json(&keys::block(pool, block), &BlockRecord::of("b"))
            .await
            .unwrap();
        let heard_from_b = |bytes: u64| {
            for p in tunnel.peers.lock().unwrap().iter_mut() {
                p.rx_bytes = bytes;
            }
        };
        mesh.reconcile().await.unwrap();
        heard_from_b(100);
        mesh.reconcile().await.unwrap();
        // b's lease expires (say, b lost etcd), but its keepalives keep coming.
        store.delete(&keys::host("b"), None).await.unwrap();
        for bytes in [200, 300, 400] {
            tokio::time::sleep(Duration::from_millis(150)).await;
            heard_from_b(bytes);
            mesh.reconcile().await.unwrap();
            assert_eq!(tunnel.peers.lock().unwrap().len(), 1, "b is still heard");
            assert_eq!(dp.with(|s| s.tunnel_routes.clone()), vec![block]);
        }
        // Then b falls silent: it leaves once the window has passed.
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert_eq!(mesh.reconcile().await.unwrap().removed, 1);
        assert!(dp.with(|s| s.tunnel_routes.is_empty()));
    }

    #[tokio::test]
    async fn without_liveness_a_host_leaves_with_its_lease() {
        let store = Arc::new(EmbeddedStore::in_memory());
        let tunnel = Arc::new(FakeTunnel::default());
        let (mesh, _) = mesh_of(&store, &tunnel);
        seed_hosts(&store).await;
        mesh.reconcile().await.unwrap();
        tunnel.peers.lock().unwrap()[0].rx_bytes = 10;
        store.delete(&keys::host("b"), None).await.unwrap();
        assert_eq!(mesh.reconcile().await.unwrap().removed, 1);
    }

    #[tokio::test]
    async fn a_vanished_device_is_set_up_again_with_its_peers() {
        let store = Arc::new(EmbeddedStore::in_memory());
        let tunnel = Arc::new(FakeTunnel::default());
        let (mesh, _) = mesh_of(&store, &tunnel);
        seed_hosts(&store).await;
        mesh.reconcile().await.unwrap();
        assert_eq!(tunnel.peers.lock().unwrap().len(), 1);
        // The userspace process died: the device and its peers are gone.
        tunnel.gone.store(true, std::sync::atomic::Ordering::SeqCst);
        let diff = mesh.reconcile().await.expect("the pass heals the device");
        assert_eq!(diff.added, 1);
        assert_eq!(tunnel.peers.lock().unwrap().len(), 1);
        assert_eq!(tunnel.ensured.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn bad_records_are_skipped_and_reported_and_the_rest_converges() {
        let store = Arc::new(EmbeddedStore::in_memory());
        let tunnel = Arc::new(FakeTunnel::default());
        let (mesh, dp) = mesh_of(&store, &tunnel);
        seed_hosts(&store).await;
        let pool: Ipv4Network = "10.42.0.0/16".parse().unwrap();
        seed_pool(&store, pool).await;
        let good: Ipv4Network = "10.42.0.64/26".parse().unwrap();
        store
            .create_json(&keys::block(pool, good), &BlockRecord::of("b"))
            .await
            .unwrap();
        // A host record that does not parse, a forged /16 in no pool, a block of the
        // wrong size, a block value that does not parse, and a key that does not decode.
        store
            .create("hosts/c", b"{not json".to_vec())
            .await
            .unwrap();
        for (key, value) in [
            ("blocks/10.99.0.0_16/10.99.0.0_16", &br#"{"host":"b"}"#[..]),
            ("blocks/10.42.0.0_16/10.42.1.0_24", &br#"{"host":"b"}"#[..]),
            ("blocks/10.42.0.0_16/10.42.2.0_26", &b"[]"[..]),
            ("blocks/garbage", &br#"{"host":"b"}"#[..]),
        ] {
            store.create(key, value.to_vec()).await.unwrap();
        }
        mesh.reconcile()
            .await
            .expect("one bad record never stops a pass");
        assert_eq!(tunnel.peers.lock().unwrap().len(), 1, "b is still a peer");
        assert_eq!(
            dp.with(|s| s.tunnel_routes.clone()),
            vec![good],
            "only the valid block is routed"
        );
        let skipped = mesh.skipped();
        assert_eq!(skipped.len(), 5, "{skipped:?}");
        assert!(skipped.iter().any(|s| s.starts_with("hosts/c")));
        assert!(skipped.iter().any(|s| s.contains("10.99.0.0_16")));
    }
}

//! The mesh reconciler: the live hosts in the cluster store (desired) against the
//! tunnel's peers and the routes to remote blocks (actual).
//!
//! Two kinds of pass. A full pass reads the store and the device and sets everything
//! right: on a timer, at start, after a lost or compacted watch, and when one of this
//! host's blocks changed hands. Between them, a pass after watch events reads the
//! [`ClusterView`] the watch keeps in memory and changes only the peers and routes that
//! differ from what the last pass programmed: no store round trip, no device read, no
//! route dump, so a host joining a large cluster costs the others little.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use ipnetwork::Ipv4Network;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::cluster::{HostRecord, Tenure};
use crate::datapath::{Datapath, DatapathError};
use crate::ipam::Blocks;
use crate::schema::keys;
use crate::store::{Store, StoreError};
use crate::tunnel::{Peer, PeerDiff, PeerStatus, Tunnel, TunnelError};

pub mod view;
pub use view::{ClusterView, Snapshot};

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
    /// Held while the peers on the device are changed, and by the heartbeat between
    /// its look at them and its keepalives (not the pass lock: a pass waiting on etcd
    /// must not silence the heartbeat, least of all then).
    device: tokio::sync::Mutex<()>,
    /// Records the last pass skipped as bad ("key: why"), for `weft status`.
    skipped: std::sync::Mutex<Vec<String>>,
    /// The cluster as the watch last told it (None until it has loaded, and after
    /// it broke).
    view: std::sync::Mutex<Option<ClusterView>>,
    /// What the last pass programmed (None: not known, a full pass must run). Held
    /// through a pass, so that passes never overlap.
    programmed: tokio::sync::Mutex<Option<Programmed>>,
    full_wanted: AtomicBool,
    full_passes: std::sync::atomic::AtomicU64,
    /// Tells the watch to load the view again.
    resync: Notify,
    /// The next full pass looks for gone hosts' blocks to reclaim.
    reclaim_due: AtomicBool,
    /// Full passes in a row whose store read differed from the view.
    view_mismatches: std::sync::atomic::AtomicU32,
}

/// One full pass in this many reads the cluster from the store rather than from the
/// watch's view (once a minute at the default `--mesh-interval`).
const STORE_EVERY: u64 = 12;

/// The peers (by key) and tunnel routes a pass left on this host.
#[derive(Debug, Default)]
struct Programmed {
    peers: BTreeMap<String, Peer>,
    routes: BTreeSet<Ipv4Network>,
}

impl Programmed {
    fn of(peers: Vec<Peer>, routes: Vec<Ipv4Network>) -> Self {
        Self {
            peers: peers
                .into_iter()
                .map(|p| (p.public_key.clone(), p))
                .collect(),
            routes: routes.into_iter().collect(),
        }
    }
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
            device: tokio::sync::Mutex::new(()),
            skipped: std::sync::Mutex::new(Vec::new()),
            view: std::sync::Mutex::new(None),
            programmed: tokio::sync::Mutex::new(None),
            full_wanted: AtomicBool::new(true),
            full_passes: std::sync::atomic::AtomicU64::new(0),
            resync: Notify::new(),
            reclaim_due: AtomicBool::new(true),
            view_mismatches: std::sync::atomic::AtomicU32::new(0),
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
    /// go stale (a pass must run then). Without the device's counters (`peers`
    /// None: a pass that does not read the device) the last ones seen are used.
    fn still_heard(
        &self,
        live: Vec<HostRecord>,
        peers: Option<&[PeerStatus]>,
    ) -> (Vec<HostRecord>, Option<Instant>) {
        let now = Instant::now();
        let rx_by_key: Option<BTreeMap<&str, u64>> = peers.map(|p| {
            p.iter()
                .map(|p| (p.public_key.as_str(), p.rx_bytes))
                .collect()
        });
        let on_device = |key: &str| rx_by_key.as_ref().and_then(|m| m.get(key).copied());
        let mut heard = self.heard.lock().unwrap_or_else(|p| p.into_inner());
        for h in &live {
            // Read from the device: a peer missing from it counts as zero.
            let rx = rx_by_key
                .as_ref()
                .map(|_| on_device(&h.public_key).unwrap_or(0));
            let entry = heard.entry(h.id.clone()).or_insert(Heard {
                record: h.clone(),
                rx_bytes: rx.unwrap_or(0),
                grew: now,
            });
            if rx.is_some_and(|rx| rx != entry.rx_bytes) || entry.record != *h {
                entry.grew = now;
            }
            if let Some(rx) = rx {
                entry.rx_bytes = rx;
            }
            entry.record = h.clone();
        }
        let live_ids: BTreeSet<String> = live.iter().map(|h| h.id.clone()).collect();
        let mut hosts = live;
        let mut next_stale = None;
        let window = self.liveness.unwrap_or(Duration::ZERO);
        heard.retain(|id, entry| {
            if live_ids.contains(id) {
                return true;
            }
            // Any change counts (a re-created device starts from zero); a peer missing
            // from the device (it was just re-created) keeps the host until the window
            // ends, like silence does.
            if let Some(rx) = on_device(&entry.record.public_key) {
                if rx != entry.rx_bytes {
                    entry.rx_bytes = rx;
                    entry.grew = now;
                }
            }
            let stale_at = entry.grew + window;
            if now >= stale_at && peers.is_none() && self.liveness.is_some() {
                // Without the device's counters this pass cannot tell: it keeps the
                // host and asks for a full pass at once.
                next_stale = Some(now);
                hosts.push(entry.record.clone());
                return true;
            }
            if now >= stale_at {
                info!(host = %id, "host gone: lease expired and no traffic from it within the liveness window");
                if self.liveness.is_some() {
                    // Its membership may have expired while it was still heard: its
                    // blocks may be reclaimable now.
                    self.reclaim_due.store(true, Ordering::SeqCst);
                }
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

    /// The live hosts in the store; bad records are left out (with a warning).
    pub async fn hosts(&self) -> Result<Vec<HostRecord>, MeshError> {
        let mut view = ClusterView::new(self.host.clone());
        for (key, v) in self.cluster.list(keys::HOSTS).await? {
            view.put(&key, &v.value);
        }
        Ok(view.snapshot().hosts)
    }

    /// A full pass now.
    pub async fn reconcile(&self) -> Result<PeerDiff, MeshError> {
        self.pass(true).await.map(|(diff, _)| diff)
    }

    /// One pass, full when `full` or when a pass from the view cannot be trusted;
    /// also returns when the next pass must run at the latest (a host kept for its
    /// traffic goes stale then).
    async fn pass(&self, full: bool) -> Result<(PeerDiff, Option<Instant>), MeshError> {
        let started = Instant::now();
        let mut programmed = self.programmed.lock().await;
        let from_view = match (full, programmed.as_mut()) {
            (false, Some(prog)) => self.view_snapshot().map(|snap| (snap, prog)),
            _ => None,
        };
        let quick = from_view.is_some();
        let result = match from_view {
            Some((snap, prog)) => self.pass_from_view(snap, prog).await,
            None => self.full_pass(&mut programmed).await,
        };
        if result.is_err() {
            // What the device and routes hold is no longer known.
            *programmed = None;
        }
        debug!(
            took_ms = started.elapsed().as_secs_f64() * 1000.0,
            full = !quick,
            "mesh pass"
        );
        result
    }

    /// The view's snapshot, unless there is none or one of this host's blocks changed
    /// hands (then the full pass checks them against the store).
    fn view_snapshot(&self) -> Option<Snapshot> {
        let mut view = self.view.lock().unwrap_or_else(|p| p.into_inner());
        let view = view.as_mut()?;
        if view.take_mine_changed() {
            return None;
        }
        Some(view.snapshot())
    }

    /// A view that differs from what the store holds in two full passes in a row (a
    /// watch that stalls without an error; a change in flight differs only once) is
    /// dropped and loaded again.
    fn check_view(&self, stored: &Snapshot) {
        let mut view = self.view.lock().unwrap_or_else(|p| p.into_inner());
        let Some(current) = view.as_ref() else {
            return;
        };
        if current.snapshot() == *stored {
            self.view_mismatches.store(0, Ordering::SeqCst);
            return;
        }
        if self.view_mismatches.fetch_add(1, Ordering::SeqCst) == 0 {
            debug!(
                "the watched view of the cluster differs from the store; checking again next pass"
            );
            return;
        }
        warn!("the watched view of the cluster differs from the store; loading it again");
        self.view_mismatches.store(0, Ordering::SeqCst);
        *view = None;
        self.resync.notify_one();
    }

    /// The view's snapshot, whatever changed (for a full pass).
    fn view_any(&self) -> Option<Snapshot> {
        let mut view = self.view.lock().unwrap_or_else(|p| p.into_inner());
        let view = view.as_mut()?;
        view.take_mine_changed();
        Some(view.snapshot())
    }

    /// Reads the device and makes peers and routes exact, from the store or the view.
    async fn full_pass(
        &self,
        programmed: &mut Option<Programmed>,
    ) -> Result<(PeerDiff, Option<Instant>), MeshError> {
        // The device is ensured on every full pass: a userspace WireGuard that died,
        // or a deleted interface, is set up again (and gets its peers below).
        let status = match self.tunnel.peers().await {
            Ok(status) => status,
            Err(e) => {
                warn!(error = %e, "WireGuard device unreadable; setting it up again");
                self.tunnel.ensure_device().await?;
                self.tunnel.peers().await?
            }
        };
        // The watch's view when there is one; the store itself without it, and every
        // STORE_EVERY-th full pass as a check on the view.
        let from_store = self
            .full_passes
            .fetch_add(1, Ordering::SeqCst)
            .is_multiple_of(STORE_EVERY)
            || self.view_mismatches.load(Ordering::SeqCst) > 0;
        let view = if from_store { None } else { self.view_any() };
        let watched = view.is_some();
        let mut snap = match view {
            Some(snap) => snap,
            None => self.read_store().await?,
        };
        if from_store {
            self.check_view(&snap);
        }
        let (hosts, next_stale) = self.still_heard(snap.hosts.clone(), Some(&status));
        // Ownership first: the blocks this host uses must still be its own.
        if let Err(e) = self.blocks.verify().await {
            warn!(error = %e, "block verification incomplete");
        }
        // Reclaiming reads every membership and block from the store: only when a
        // membership expired, without a view, before this host may reclaim at all
        // (it tries again), and with every read of the store.
        if self.reclaim_due.swap(false, Ordering::SeqCst) || from_store || !watched {
            if !self.blocks.may_reclaim() {
                self.reclaim_due.store(true, Ordering::SeqCst);
            }
            match self.blocks.reclaim(&hosts).await {
                Ok(0) => {}
                Ok(_) => snap = self.read_store().await?,
                Err(e) => {
                    warn!(error = %e, "block reclaim skipped");
                    self.reclaim_due.store(true, Ordering::SeqCst);
                }
            }
        }
        let (peers, routes) = self.desired(&snap, &hosts).await?;
        *self.skipped.lock().unwrap_or_else(|p| p.into_inner()) = snap.skipped;
        let diff = {
            let _device = self.device.lock().await;
            self.tunnel.apply_peers(&peers).await?
        };
        self.datapath
            .sync_tunnel_routes(self.tunnel.interface(), &routes)
            .await?;
        self.log_change(&diff, peers.len(), routes.len());
        *programmed = Some(Programmed::of(peers, routes));
        Ok((diff, next_stale))
    }

    /// From the watch's view, changes only the peers and routes that differ from
    /// what the last pass programmed.
    async fn pass_from_view(
        &self,
        snap: Snapshot,
        programmed: &mut Programmed,
    ) -> Result<(PeerDiff, Option<Instant>), MeshError> {
        let (hosts, next_stale) = self.still_heard(snap.hosts.clone(), None);
        let (peers, routes) = self.desired(&snap, &hosts).await?;
        *self.skipped.lock().unwrap_or_else(|p| p.into_inner()) = snap.skipped;
        let next = Programmed::of(peers, routes);
        let mut diff = PeerDiff::default();
        let mut upserts = Vec::new();
        for (key, peer) in &next.peers {
            match programmed.peers.get(key) {
                None => diff.added += 1,
                Some(old) if old != peer => diff.updated += 1,
                Some(_) => continue,
            }
            upserts.push(peer.clone());
        }
        let removals: Vec<String> = programmed
            .peers
            .keys()
            .filter(|k| !next.peers.contains_key(*k))
            .cloned()
            .collect();
        diff.removed = removals.len();
        let add: Vec<Ipv4Network> = next
            .routes
            .difference(&programmed.routes)
            .copied()
            .collect();
        let remove: Vec<Ipv4Network> = programmed
            .routes
            .difference(&next.routes)
            .copied()
            .collect();
        if !(upserts.is_empty() && removals.is_empty()) {
            let _device = self.device.lock().await;
            self.tunnel.change_peers(&upserts, &removals).await?;
        }
        if !(add.is_empty() && remove.is_empty()) {
            self.datapath
                .change_tunnel_routes(self.tunnel.interface(), &add, &remove)
                .await?;
        }
        self.log_change(&diff, next.peers.len(), next.routes.len());
        *programmed = next;
        Ok((diff, next_stale))
    }

    fn log_change(&self, diff: &PeerDiff, peers: usize, routes: usize) {
        if !diff.is_empty() {
            info!(peers, routes, ?diff, "mesh updated");
        }
    }

    /// A view of the cluster read from the store's listings, checked as the watch's is.
    async fn read_store(&self) -> Result<Snapshot, MeshError> {
        let mut view = ClusterView::new(self.host.clone());
        for prefix in view::PREFIXES {
            for (key, v) in self.cluster.list(prefix).await? {
                view.put(&key, &v.value);
            }
        }
        Ok(view.snapshot())
    }

    /// The peers and routes `snap` asks for on this host, with `hosts` as the hosts
    /// to reach. Only pools this host has a network in are routed (and allowed)
    /// here: another host's subnet must never take over a route of this host's.
    async fn desired(
        &self,
        snap: &Snapshot,
        hosts: &[HostRecord],
    ) -> Result<(Vec<Peer>, Vec<Ipv4Network>), MeshError> {
        let here = self.blocks.pools_here().await?;
        let mine = self.blocks.addresses_here().await?;
        // A host's reserved addresses in blocks it lost are its own, as /32s: more
        // specific than the block's route and allowed-ips, so they reach its
        // containers; never one a container of this host holds (its own /32 stays).
        let reserved = snap
            .reservations
            .iter()
            .filter(|r| here.contains(&r.pool))
            .flat_map(|r| r.addresses.iter().map(move |ip| (*ip, r.host.clone())))
            .filter(|(ip, _)| !mine.contains(ip))
            .map(|(ip, host)| (Ipv4Network::from(ip), host));
        let blocks: Vec<(Ipv4Network, String)> = snap
            .blocks
            .iter()
            .filter(|(pool, _, _)| here.contains(pool))
            .map(|(_, b, owner)| (*b, owner.clone()))
            .chain(reserved)
            .collect();
        Ok(desired_peers(&self.host, hosts, &blocks))
    }

    /// WireGuard resets a peer's persistent-keepalive timer on every packet from it
    /// too, so of two hosts with the same keepalive one may never send (the other's
    /// keepalives keep putting its timer off), and its silence would make the other
    /// take it for gone once its lease expires: the liveness check counts what
    /// arrives. So every second this host looks at its peers and makes each one it
    /// has sent nothing to for half that peer's keepalive send a keepalive now. One
    /// device read a second; a write only for peers it fell silent to.
    pub async fn heartbeat(self: Arc<Self>) {
        let mut last_tx = BTreeMap::new();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tick.tick().await;
            if let Err(e) = self.keep_talking(&mut last_tx, Instant::now()).await {
                debug!(error = %e, "keepalive check skipped");
            }
        }
    }

    /// One look for [`Mesh::heartbeat`] at `now`: `last_tx` holds each peer's sent
    /// bytes and since when they have not changed. Returns how many peers were made
    /// to send.
    async fn keep_talking(
        &self,
        last_tx: &mut BTreeMap<String, (u64, Instant)>,
        now: Instant,
    ) -> Result<usize, MeshError> {
        // Not between a pass's look at the device and its change of it: a peer it
        // removes is not added back, a keepalive it changes is not set back.
        let _device = self.device.lock().await;
        let status = self.tunnel.peers().await?;
        let keepalive: BTreeMap<String, u16> = self
            .heard
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter_map(|h| Some((h.record.public_key.clone(), h.record.keepalive?)))
            .collect();
        let mut silent = Vec::new();
        let mut next = BTreeMap::new();
        for p in status {
            let since = match last_tx.get(&p.public_key) {
                Some(&(tx, since)) if tx == p.tx_bytes => since,
                _ => now,
            };
            if let Some(&k) = keepalive.get(&p.public_key) {
                let half = Duration::from_millis(u64::from(k) * 500).max(Duration::from_secs(1));
                if now.duration_since(since) >= half {
                    silent.push((p.public_key.clone(), k));
                }
            }
            next.insert(p.public_key, (p.tx_bytes, since));
        }
        *last_tx = next;
        if !silent.is_empty() {
            self.tunnel.send_keepalives(&silent).await?;
            // The keepalive shows in the counters at the next look; count from now.
            for (key, _) in &silent {
                if let Some(entry) = last_tx.get_mut(key) {
                    entry.1 = now;
                }
            }
        }
        Ok(silent.len())
    }

    /// Asks for a full pass now (e.g. after this host claimed a block).
    pub fn poke(&self) {
        self.full_wanted.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }

    /// Asks for a pass from the view (the watch saw changes).
    fn nudge(&self) {
        self.wake.notify_one();
    }

    /// Reconciles on every wake-up, fully at least every `every` (more often when
    /// this host's reservations must be rewritten sooner).
    pub async fn run(self: Arc<Self>, every: Duration) {
        let every = every.min(
            self.blocks
                .reservation_refresh()
                .max(Duration::from_secs(1)),
        );
        // The full passes keep their period however many events come between them.
        let mut next_full = tokio::time::Instant::now();
        loop {
            let now = tokio::time::Instant::now();
            let full = self.full_wanted.swap(false, Ordering::SeqCst) || now >= next_full;
            if full {
                next_full = now + every;
            }
            let mut deadline = next_full;
            match self.pass(full).await {
                Ok((_, Some(stale_at))) => {
                    if stale_at <= Instant::now() {
                        // A pass from the view left the call to a full pass.
                        self.full_wanted.store(true, Ordering::SeqCst);
                    }
                    let until = stale_at.saturating_duration_since(Instant::now());
                    deadline = deadline
                        .min(tokio::time::Instant::now() + until + Duration::from_millis(10));
                }
                Ok(_) => {}
                Err(e) => {
                    warn!(error = %e, "mesh reconcile incomplete");
                    self.full_wanted.store(true, Ordering::SeqCst);
                }
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = self.tenure.registered_now.notified() => {
                    // A new registration starts the grace period again.
                    self.reclaim_due.store(true, Ordering::SeqCst);
                    self.full_wanted.store(true, Ordering::SeqCst);
                }
                _ = tokio::time::sleep_until(deadline) => self.full_wanted.store(true, Ordering::SeqCst),
            }
            // Coalesce a burst of changes into one pass.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Keeps the view from the store: loads everything under `prefix`, then follows
    /// the changes from the next revision on, so that no event is missed or applied
    /// twice. A failed or compacted watch drops the view (passes are full until it is
    /// loaded again) and starts over.
    pub async fn watch(self: Arc<Self>, client: Client, prefix: String) {
        loop {
            match self.follow(&client, &prefix).await {
                Ok(()) => warn!("the cluster store's watch ended; loading again"),
                Err(e) => debug!(error = %e, "cannot watch the cluster store"),
            }
            *self.view.lock().unwrap_or_else(|p| p.into_inner()) = None;
            self.poke();
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn follow(&self, client: &Client, prefix: &str) -> Result<(), etcd_client::Error> {
        let loaded = client
            .kv_client()
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await?;
        let revision = loaded.header().map_or(0, |h| h.revision());
        let mut view = ClusterView::new(self.host.clone());
        for kv in loaded.kvs() {
            if let Some(key) = kv.key_str().ok().and_then(|k| k.strip_prefix(prefix)) {
                view.put(key, kv.value());
            }
        }
        let mut stream = client
            .watch_client()
            .watch(
                prefix,
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(revision + 1),
                ),
            )
            .await?;
        *self.view.lock().unwrap_or_else(|p| p.into_inner()) = Some(view);
        self.view_mismatches.store(0, Ordering::SeqCst);
        debug!(revision, "watching the cluster store");
        // A membership may have expired while the watch was down.
        self.reclaim_due.store(true, Ordering::SeqCst);
        // A full pass programs what the view starts from.
        self.poke();
        loop {
            let resp = tokio::select! {
                resp = stream.message() => match resp? {
                    Some(resp) => resp,
                    None => return Ok(()),
                },
                _ = self.resync.notified() => return Ok(()),
            };
            if resp.canceled() || resp.compact_revision() > 0 {
                warn!(compacted = resp.compact_revision(), "watch cancelled");
                return Ok(());
            }
            if resp.events().is_empty() {
                continue;
            }
            // Other records (cluster networks, names) change often and shape no mesh.
            let mut relevant = false;
            let seen_gone = {
                let mut view = self.view.lock().unwrap_or_else(|p| p.into_inner());
                let Some(view) = view.as_mut() else {
                    return Ok(());
                };
                for event in resp.events() {
                    let Some(kv) = event.kv() else { continue };
                    let Some(key) = kv.key_str().ok().and_then(|k| k.strip_prefix(prefix)) else {
                        continue;
                    };
                    relevant |= view::PREFIXES
                        .iter()
                        .chain([&keys::SEEN])
                        .any(|p| key.starts_with(p));
                    match event.event_type() {
                        EventType::Put => view.put(key, kv.value()),
                        EventType::Delete => view.delete(key),
                    }
                }
                view.take_seen_gone()
            };
            if seen_gone {
                self.reclaim_due.store(true, Ordering::SeqCst);
                self.poke();
            } else if relevant {
                self.nudge();
            }
        }
    }

    /// Feeds the view as the watch would (tests).
    #[cfg(test)]
    fn view_with(&self, f: impl FnOnce(&mut ClusterView)) {
        let mut view = self.view.lock().unwrap();
        f(view.get_or_insert_with(|| ClusterView::new(self.host.clone())));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::fake::FakeDatapath;
    use crate::schema::{BlockRecord, PoolRecord};
    use crate::store::embedded::EmbeddedStore;
    use crate::store::StoreExt;
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
        let rec = PoolRecord::with_blocks(pool, 26);
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

    /// Hosts a (this one) and b live, the pool 10.42.0.0/16 with a network here, and
    /// `block` of it owned by `owner`.
    async fn cluster_with_block(
        block: &str,
        owner: &str,
    ) -> (
        Arc<EmbeddedStore>,
        Arc<FakeTunnel>,
        Mesh,
        Arc<FakeDatapath>,
        Ipv4Network,
        Ipv4Network,
    ) {
        let store = Arc::new(EmbeddedStore::in_memory());
        let tunnel = Arc::new(FakeTunnel::default());
        let (mesh, dp) = mesh_of(&store, &tunnel);
        seed_hosts(&store).await;
        let pool: Ipv4Network = "10.42.0.0/16".parse().unwrap();
        let block: Ipv4Network = block.parse().unwrap();
        seed_pool(&store, pool).await;
        store
            .create_json(&keys::block(pool, block), &BlockRecord::of(owner))
            .await
            .unwrap()
            .unwrap();
        (store, tunnel, mesh, dp, pool, block)
    }

    /// The view as the watch would load it from `store`.
    async fn load_view(mesh: &Mesh, store: &EmbeddedStore) {
        let mut loaded = Vec::new();
        for prefix in view::PREFIXES {
            loaded.extend(store.list(prefix).await.unwrap());
        }
        mesh.view_with(|v| loaded.iter().for_each(|(k, val)| v.put(k, &val.value)));
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
        let (store, tunnel, mesh, dp, _, block) = cluster_with_block("10.42.0.64/26", "b").await;
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
        let (store, tunnel, mesh, dp, pool, block) = cluster_with_block("10.42.0.0/26", "a").await;
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

    /// After watch events, a pass reads neither the store nor the device and changes
    /// only what differs from what the last pass programmed.
    #[tokio::test]
    async fn a_pass_after_events_touches_only_what_changed() {
        use std::sync::atomic::Ordering::SeqCst;
        let (store, tunnel, mesh, dp, pool, b_block) =
            cluster_with_block("10.42.0.64/26", "b").await;
        // The watch loaded what the store holds; the first pass is full.
        load_view(&mesh, &store).await;
        assert_eq!(mesh.pass(false).await.unwrap().0.added, 1);
        let reads = tunnel.reads.load(SeqCst);
        // Host c joins with a block, as the watch tells it (the store is not read:
        // c is only in the view), and b's record changes its endpoint.
        let c = host("c", "192.0.2.13");
        let c_block: Ipv4Network = "10.42.1.0/26".parse().unwrap();
        let mut b = host("b", "192.0.2.99");
        b.keepalive = None;
        mesh.view_with(|v| {
            v.put(&keys::host("c"), &serde_json::to_vec(&c).unwrap());
            v.put(
                &keys::block(pool, c_block),
                &serde_json::to_vec(&BlockRecord::of("c")).unwrap(),
            );
            v.put(&keys::host("b"), &serde_json::to_vec(&b).unwrap());
        });
        let (diff, _) = mesh.pass(false).await.unwrap();
        assert_eq!((diff.added, diff.updated, diff.removed), (1, 1, 0));
        assert_eq!(tunnel.reads.load(SeqCst), reads, "the device was not read");
        assert_eq!(tunnel.changes.load(SeqCst), 1, "one device update");
        assert_eq!(dp.with(|s| s.tunnel_routes.clone()), vec![b_block, c_block]);
        // Nothing changed: nothing is touched.
        assert!(mesh.pass(false).await.unwrap().0.is_empty());
        assert_eq!(tunnel.changes.load(SeqCst), 1);
        // c leaves: its peer and route go.
        mesh.view_with(|v| v.delete(&keys::host("c")));
        assert_eq!(mesh.pass(false).await.unwrap().0.removed, 1);
        assert_eq!(dp.with(|s| s.tunnel_routes.clone()), vec![b_block]);
        assert_eq!(tunnel.peers.lock().unwrap().len(), 1);
        assert_eq!(tunnel.reads.load(SeqCst), reads, "still no device read");
    }

    /// A block of this host's changing hands, or no view yet, makes the pass full
    /// (it reads the device and checks this host's blocks against the store).
    #[tokio::test]
    async fn a_pass_is_full_without_a_view_or_when_a_block_of_this_host_changed_hands() {
        use std::sync::atomic::Ordering::SeqCst;
        let store = Arc::new(EmbeddedStore::in_memory());
        let tunnel = Arc::new(FakeTunnel::default());
        let (mesh, _) = mesh_of(&store, &tunnel);
        seed_hosts(&store).await;
        let pool: Ipv4Network = "10.42.0.0/16".parse().unwrap();
        seed_pool(&store, pool).await;
        mesh.pass(false).await.unwrap();
        assert_eq!(tunnel.reads.load(SeqCst), 1, "no view: full");
        mesh.pass(false).await.unwrap();
        assert_eq!(tunnel.reads.load(SeqCst), 2, "still no view: full");
        mesh.view_with(|_| {});
        mesh.pass(false).await.unwrap();
        assert_eq!(tunnel.reads.load(SeqCst), 2, "a view: from it");
        mesh.view_with(|v| {
            v.put(
                &keys::block(pool, "10.42.0.0/26".parse().unwrap()),
                &serde_json::to_vec(&BlockRecord::of("a")).unwrap(),
            )
        });
        mesh.pass(false).await.unwrap();
        assert_eq!(tunnel.reads.load(SeqCst), 3, "a's block changed: full");
        mesh.pass(false).await.unwrap();
        assert_eq!(tunnel.reads.load(SeqCst), 3);
    }

    /// A full pass reads the store now and then; a view that differs from it is
    /// dropped (and loaded again by the watch), and the store's state is programmed.
    #[tokio::test]
    async fn a_view_that_differs_from_the_store_is_dropped() {
        let store = Arc::new(EmbeddedStore::in_memory());
        let tunnel = Arc::new(FakeTunnel::default());
        let (mesh, _) = mesh_of(&store, &tunnel);
        seed_hosts(&store).await;
        // The view missed b's record and holds a c the store no longer has.
        let c = host("c", "192.0.2.13");
        mesh.view_with(|v| v.put(&keys::host("c"), &serde_json::to_vec(&c).unwrap()));
        mesh.reconcile().await.unwrap();
        assert!(
            mesh.view.lock().unwrap().is_some(),
            "once may be a change in flight"
        );
        mesh.reconcile().await.unwrap();
        assert!(
            mesh.view.lock().unwrap().is_none(),
            "twice: the view is dropped"
        );
        let keys: Vec<String> = tunnel
            .peers
            .lock()
            .unwrap()
            .iter()
            .map(|p| p.public_key.clone())
            .collect();
        assert_eq!(keys, ["key-b"], "the store's hosts, not the view's");
        // A view equal to the store is kept.
        let b = host("b", "192.0.2.12");
        mesh.view_with(|v| v.put(&keys::host("b"), &serde_json::to_vec(&b).unwrap()));
        mesh.view_with(|v| {
            v.put(
                &keys::host("a"),
                &serde_json::to_vec(&host("a", "192.0.2.11")).unwrap(),
            )
        });
        for _ in 0..STORE_EVERY {
            mesh.reconcile().await.unwrap();
        }
        assert!(mesh.view.lock().unwrap().is_some());
    }

    /// Watch events more frequent than the full-pass period never put the full
    /// passes (device read, ownership checks, reservations) off.
    #[tokio::test(start_paused = true)]
    async fn full_passes_keep_their_period_while_events_keep_coming() {
        use std::sync::atomic::Ordering::SeqCst;
        let (store, tunnel, mesh, _, _, _) = cluster_with_block("10.42.0.64/26", "b").await;
        load_view(&mesh, &store).await;
        let mesh = Arc::new(mesh);
        let runner = tokio::spawn(mesh.clone().run(Duration::from_secs(2)));
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            mesh.nudge();
        }
        runner.abort();
        let full = tunnel.reads.load(SeqCst);
        assert!(
            (4..=7).contains(&full),
            "a full pass every 2 s over 10 s of events, not {full}"
        );
    }

    /// A pass without the device's counters never drops a host kept for its
    /// traffic: it keeps it and asks for a full pass, which reads them and decides.
    #[tokio::test]
    async fn only_a_full_pass_lets_a_silent_host_go() {
        let (store, tunnel, mesh, _, _, _) = cluster_with_block("10.42.0.64/26", "b").await;
        let mesh = mesh.with_liveness(Some(Duration::from_millis(200)));
        load_view(&mesh, &store).await;
        mesh.pass(false).await.unwrap();
        // b's lease expires; a pass from the view keeps it within the window.
        mesh.view_with(|v| v.delete(&keys::host("b")));
        assert_eq!(mesh.pass(false).await.unwrap().0.removed, 0);
        tokio::time::sleep(Duration::from_millis(250)).await;
        // Past the window, a pass from the view still keeps it, and asks for a full
        // pass now.
        let (diff, next) = mesh.pass(false).await.unwrap();
        assert_eq!(diff.removed, 0, "no counters read: not this pass's call");
        assert!(next.is_some_and(|t| t <= Instant::now()));
        assert_eq!(tunnel.peers.lock().unwrap().len(), 1);
        // The full pass reads the counters: b was silent, it goes.
        store.delete(&keys::host("b"), None).await.unwrap();
        assert_eq!(mesh.reconcile().await.unwrap().removed, 1);
    }

    /// ... and the run loop gives it that full pass at once, even while watch
    /// events keep coming (not only at the next full-pass period).
    #[tokio::test]
    async fn a_silent_host_goes_soon_while_events_keep_coming() {
        let (store, tunnel, mesh, _, _, _) = cluster_with_block("10.42.0.64/26", "b").await;
        let mesh = Arc::new(mesh.with_liveness(Some(Duration::from_millis(200))));
        load_view(&mesh, &store).await;
        let runner = tokio::spawn(mesh.clone().run(Duration::from_secs(60)));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(tunnel.peers.lock().unwrap().len(), 1);
        store.delete(&keys::host("b"), None).await.unwrap();
        mesh.view_with(|v| v.delete(&keys::host("b")));
        for _ in 0..60 {
            tokio::time::sleep(Duration::from_millis(15)).await;
            mesh.nudge();
        }
        runner.abort();
        assert!(
            tunnel.peers.lock().unwrap().is_empty(),
            "b, silent past its window, is gone long before the next full-pass period"
        );
    }

    /// Of two hosts with the same keepalive, WireGuard may let only one send (each
    /// packet that arrives puts the receiver's keepalive off): a peer this host sent
    /// nothing to since the last look is made to send, so the other hears it.
    #[tokio::test]
    async fn a_peer_this_host_fell_silent_to_is_made_to_send_a_keepalive() {
        let (store, tunnel, mesh, _, _, _) = cluster_with_block("10.42.0.64/26", "b").await;
        let b = HostRecord {
            keepalive: Some(5),
            ..host("b", "192.0.2.12")
        };
        store
            .modify_json::<HostRecord, StoreError, _>(&keys::host("b"), |_| Ok(Some(b.clone())))
            .await
            .unwrap();
        mesh.reconcile().await.unwrap();
        let b = b.public_key;
        let sent_to_b = |bytes: u64| {
            for p in tunnel.peers.lock().unwrap().iter_mut() {
                p.tx_bytes = bytes;
            }
        };
        let mut last_tx = BTreeMap::new();
        let t0 = Instant::now();
        let at = |secs: f64| t0 + Duration::from_secs_f64(secs);
        // b's keepalive is 5 s: this host may be silent towards it for 2.5 s.
        assert_eq!(mesh.keep_talking(&mut last_tx, at(0.0)).await.unwrap(), 0);
        assert_eq!(mesh.keep_talking(&mut last_tx, at(2.0)).await.unwrap(), 0);
        // This host sends to b: the silence counts from then.
        sent_to_b(100);
        assert_eq!(mesh.keep_talking(&mut last_tx, at(2.4)).await.unwrap(), 0);
        assert_eq!(mesh.keep_talking(&mut last_tx, at(4.0)).await.unwrap(), 0);
        // Silent towards b for 2.5 s (b's keepalives put ours off): made to send.
        assert_eq!(mesh.keep_talking(&mut last_tx, at(4.9)).await.unwrap(), 1);
        assert_eq!(*tunnel.keepalives_sent.lock().unwrap(), [b]);
        // Not again at once, but after another half keepalive of silence.
        assert_eq!(mesh.keep_talking(&mut last_tx, at(5.5)).await.unwrap(), 0);
        assert_eq!(mesh.keep_talking(&mut last_tx, at(7.4)).await.unwrap(), 1);
        // A peer whose keepalive is unknown (off) is left alone.
        let mut unknown = BTreeMap::new();
        tunnel.peers.lock().unwrap()[0].public_key = "key-x".into();
        assert_eq!(mesh.keep_talking(&mut unknown, at(0.0)).await.unwrap(), 0);
        assert_eq!(mesh.keep_talking(&mut unknown, at(60.0)).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_host_whose_lease_expired_stays_while_its_traffic_arrives() {
        let (store, tunnel, mesh, dp, _, block) = cluster_with_block("10.42.0.64/26", "b").await;
        let mesh = mesh.with_liveness(Some(Duration::from_millis(300)));
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
        let (store, tunnel, mesh, dp, _, good) = cluster_with_block("10.42.0.64/26", "b").await;
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

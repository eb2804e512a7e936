//! The mesh reconciler: the live hosts in the cluster store (desired) against the
//! tunnel's peers and the routes to remote blocks (actual). It runs when anything
//! under the store prefix changes (an etcd watch), on a timer, and after a lost or
//! compacted watch; every pass computes the whole diff, so no event can be missed
//! for long and no stale peer or route survives a pass.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, WatchOptions};
use ipnetwork::Ipv4Network;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::cluster::{HostRecord, Tenure};
use crate::datapath::{Datapath, DatapathError};
use crate::ipam::Blocks;
use crate::store::{keys, Store, StoreError, StoreExt};
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
        }
    }

    pub fn tunnel(&self) -> &Arc<dyn Tunnel> {
        &self.tunnel
    }

    pub async fn hosts(&self) -> Result<Vec<HostRecord>, MeshError> {
        Ok(self
            .cluster
            .list_json::<HostRecord>(keys::HOSTS)
            .await?
            .into_iter()
            .map(|(_, r)| r.value)
            .collect())
    }

    /// Every block in the cluster with its owner.
    pub async fn blocks(&self) -> Result<Vec<(Ipv4Network, String)>, MeshError> {
        Ok(self
            .blocks
            .all()
            .await?
            .into_iter()
            .map(|(_, block, owner)| (block, owner))
            .collect())
    }

    pub async fn reconcile(&self) -> Result<PeerDiff, MeshError> {
        let hosts = self.hosts().await?;
        // Ownership first: the blocks this host uses must still be its own.
        if let Err(e) = self.blocks.verify().await {
            warn!(error = %e, "block verification incomplete");
        }
        if let Err(e) = self.blocks.reclaim(&hosts).await {
            warn!(error = %e, "block reclaim skipped");
        }
        let blocks = self.blocks().await?;
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
        Ok(diff)
    }

    /// Asks for a pass now (e.g. after this host claimed a block).
    pub fn poke(&self) {
        self.wake.notify_one();
    }

    /// Reconciles on every wake-up, and at least every `every`.
    pub async fn run(self: Arc<Self>, every: Duration) {
        loop {
            if let Err(e) = self.reconcile().await {
                warn!(error = %e, "mesh reconcile incomplete");
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = self.tenure.registered_now.notified() => {}
                _ = tokio::time::sleep(every) => {}
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
    use crate::schema::BlockRecord;
    use crate::store::embedded::EmbeddedStore;
    use crate::tunnel::fake::FakeTunnel;

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
        let dp = Arc::new(FakeDatapath::new());
        let tenure = Arc::new(Tenure::clustered());
        let blocks = Arc::new(Blocks::new(
            store.clone(),
            Arc::new(EmbeddedStore::in_memory()),
            "a".into(),
            tenure.clone(),
            Duration::from_secs(600),
        ));
        let mesh = Mesh::new(store.clone(), tunnel.clone(), dp.clone(), blocks, tenure);
        for h in [host("a", "192.0.2.11"), host("b", "192.0.2.12")] {
            store
                .create_json(&keys::host(&h.id), &h)
                .await
                .unwrap()
                .unwrap();
        }
        let pool = "10.42.0.0/16".parse().unwrap();
        let block = "10.42.0.64/26".parse().unwrap();
        store
            .create_json(&keys::block(pool, block), &BlockRecord { host: "b".into() })
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
}

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::*;
use crate::datapath::fake::FakeDatapath;
use crate::store::embedded::EmbeddedStore;

struct Host {
    ipam: Arc<Ipam>,
    local: Arc<EmbeddedStore>,
}

/// The block owner of a host that is always safely registered (as on one host).
fn blocks_for(cluster: Arc<dyn Store>, local: Arc<dyn Store>, id: &str) -> Arc<Blocks> {
    Arc::new(Blocks::new(
        cluster,
        local,
        id.into(),
        Arc::new(crate::cluster::Tenure::standalone()),
        std::time::Duration::from_secs(600),
    ))
}

fn host(cluster: &Arc<EmbeddedStore>, id: &str, routes: Vec<Ipv4Network>) -> Host {
    let local = Arc::new(EmbeddedStore::in_memory());
    let fake = Arc::new(FakeDatapath::new());
    fake.with(|s| s.host_routes = routes);
    let ipam = Arc::new(Ipam::new(
        cluster.clone(),
        local.clone(),
        blocks_for(cluster.clone(), local.clone(), id),
        fake,
        IpamConfig::default(),
    ));
    Host { ipam, local }
}

fn one_host() -> Host {
    host(&Arc::new(EmbeddedStore::in_memory()), "h1", vec![])
}

fn pool_req(pool: &str, sub: &str, opts: &[(&str, &str)]) -> PoolRequest {
    PoolRequest {
        address_space: LOCAL_ADDRESS_SPACE.into(),
        pool: pool.into(),
        sub_pool: sub.into(),
        options: opts
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        v6: false,
    }
}

fn gw() -> BTreeMap<String, String> {
    BTreeMap::from([(
        "RequestAddressType".to_string(),
        GATEWAY_REQUEST.to_string(),
    )])
}

fn none() -> BTreeMap<String, String> {
    BTreeMap::new()
}

/// Marks the pool as used by a network, as CreateNetwork does, so that explicit
/// addresses are container addresses rather than aux reservations.
async fn attach_network(h: &Host, pool: &str) {
    let rec = NetworkRecord {
        id: format!("net{}", pool.replace(['.', '/'], "")),
        subnet: pool.parse().unwrap(),
        gateway: None,
        internal: false,
        mtu: 1420,
        name: None,
    };
    h.local
        .create_json(&keys::network(&rec.id), &rec)
        .await
        .unwrap()
        .unwrap();
}

async fn pool_id(h: &Host, pool: &str, sub: &str) -> String {
    h.ipam
        .request_pool(pool_req(pool, sub, &[]))
        .await
        .unwrap()
        .0
        .to_string()
}

#[tokio::test]
async fn explicit_pool_is_refcounted_and_overlaps_are_refused() {
    let h = one_host();
    let (a, _) = h
        .ipam
        .request_pool(pool_req("10.42.0.0/16", "", &[]))
        .await
        .unwrap();
    let (b, _) = h
        .ipam
        .request_pool(pool_req("10.42.0.0/16", "", &[]))
        .await
        .unwrap();
    assert_eq!(a, b, "identical requests share one PoolID");
    assert_eq!(a.to_string(), "weft-local/10.42.0.0/16");
    let err = h
        .ipam
        .request_pool(pool_req("10.42.5.0/24", "", &[]))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("overlaps"), "{err}");
    h.ipam.release_pool(&a.to_string()).await.unwrap();
    assert!(
        h.ipam
            .request_address(&a.to_string(), "", &none())
            .await
            .is_ok(),
        "one reference left"
    );
    h.ipam.release_pool(&a.to_string()).await.unwrap();
    assert!(
        h.ipam
            .request_address(&a.to_string(), "", &none())
            .await
            .is_err(),
        "pool is gone"
    );
    // ReleasePool of unknown or garbage-free IDs is fine.
    h.ipam
        .release_pool("weft-local/10.99.0.0/16")
        .await
        .unwrap();
}

#[tokio::test]
async fn automatic_pools_avoid_held_pools_and_host_routes() {
    let cluster = Arc::new(EmbeddedStore::in_memory());
    let h = host(&cluster, "h1", vec!["10.200.1.0/24".parse().unwrap()]);
    let (_, p1) = h.ipam.request_pool(pool_req("", "", &[])).await.unwrap();
    let (_, p2) = h.ipam.request_pool(pool_req("", "", &[])).await.unwrap();
    assert_eq!(p1.to_string(), "10.200.0.0/24");
    assert_eq!(
        p2.to_string(),
        "10.200.2.0/24",
        "10.200.1.0/24 is a host route"
    );
    assert!(h
        .ipam
        .request_pool(pool_req("", "10.200.5.0/25", &[]))
        .await
        .is_err());
}

#[tokio::test]
async fn automatic_pools_run_out_with_a_clear_error() {
    let cluster = Arc::new(EmbeddedStore::in_memory());
    let local = Arc::new(EmbeddedStore::in_memory());
    let config = IpamConfig {
        default_pools: vec!["10.9.0.0/23".parse().unwrap()],
        default_pool_prefix: 24,
        default_block_prefix: 26,
    };
    let ipam = Ipam::new(
        cluster.clone(),
        local.clone(),
        blocks_for(cluster, local, "h1"),
        Arc::new(FakeDatapath::new()),
        config,
    );
    ipam.request_pool(pool_req("", "", &[])).await.unwrap();
    ipam.request_pool(pool_req("", "", &[])).await.unwrap();
    let err = ipam.request_pool(pool_req("", "", &[])).await.unwrap_err();
    assert!(matches!(err, IpamError::Exhausted(_)), "{err}");
}

#[tokio::test]
async fn bad_pool_requests_are_refused() {
    let h = one_host();
    for (pool, sub, opts) in [
        ("10.42.0.0/33", "", vec![]),
        ("not-a-cidr", "", vec![]),
        ("10.42.0.0/16", "10.43.0.0/24", vec![]),
        ("10.42.0.0/16", "", vec![("weft.block-size", "8")]),
        ("10.42.0.0/16", "", vec![("weft.unknown", "1")]),
    ] {
        assert!(
            h.ipam
                .request_pool(pool_req(pool, sub, &opts))
                .await
                .is_err(),
            "{pool} {sub} {opts:?}"
        );
    }
    let mut v6 = pool_req("fd00::/64", "", &[]);
    v6.v6 = true;
    assert!(matches!(
        h.ipam.request_pool(v6).await,
        Err(IpamError::Unsupported(_))
    ));
    let mut space = pool_req("10.42.0.0/16", "", &[]);
    space.address_space = "nope".into();
    assert!(h.ipam.request_pool(space).await.is_err());
}

#[tokio::test]
async fn gateway_is_shared_and_deterministic() {
    let h = one_host();
    let id = pool_id(&h, "10.42.0.0/16", "").await;
    assert_eq!(
        h.ipam
            .request_address(&id, "", &gw())
            .await
            .unwrap()
            .to_string(),
        "10.42.0.1/16"
    );
    assert_eq!(
        h.ipam
            .request_address(&id, "10.42.0.1", &gw())
            .await
            .unwrap()
            .to_string(),
        "10.42.0.1/16"
    );
    let err = h
        .ipam
        .request_address(&id, "10.42.0.9", &gw())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("already has gateway 10.42.0.1"),
        "{err}"
    );
    attach_network(&h, "10.42.0.0/16").await;
    let err = h
        .ipam
        .request_address(&id, "10.42.0.1", &none())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("gateway"), "{err}");
}

#[tokio::test]
async fn dynamic_addresses_come_from_the_ip_range_and_skip_reserved() {
    let h = one_host();
    let id = pool_id(&h, "10.250.0.0/16", "10.250.1.0/24").await;
    h.ipam
        .request_address(&id, "10.250.0.1", &gw())
        .await
        .unwrap();
    // Aux address outside the ip-range but inside the pool is accepted.
    assert_eq!(
        h.ipam
            .request_address(&id, "10.250.0.5", &none())
            .await
            .unwrap()
            .to_string(),
        "10.250.0.5/16"
    );
    attach_network(&h, "10.250.0.0/16").await;
    let a = h.ipam.request_address(&id, "", &none()).await.unwrap();
    assert!(
        "10.250.1.0/24"
            .parse::<Ipv4Network>()
            .unwrap()
            .contains(a.ip()),
        "{a}"
    );
    assert_eq!(a.prefix(), 16, "address carries the pool's prefix length");
    let err = h
        .ipam
        .request_address(&id, "10.250.0.5", &none())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("auxiliary"), "{err}");
}

#[tokio::test]
async fn static_addresses_are_unique_and_must_be_in_the_pool() {
    let h = one_host();
    let id = pool_id(&h, "10.42.0.0/24", "").await;
    attach_network(&h, "10.42.0.0/24").await;
    h.ipam
        .request_address(&id, "10.42.0.77", &none())
        .await
        .unwrap();
    let dup = h
        .ipam
        .request_address(&id, "10.42.0.77", &none())
        .await
        .unwrap_err();
    assert!(dup.to_string().contains("already in use"), "{dup}");
    for bad in ["10.43.0.1", "10.42.0.0", "10.42.0.255", "nonsense"] {
        assert!(
            h.ipam.request_address(&id, bad, &none()).await.is_err(),
            "{bad} accepted"
        );
    }
    h.ipam.release_address(&id, "10.42.0.77").await.unwrap();
    h.ipam
        .request_address(&id, "10.42.0.77", &none())
        .await
        .unwrap();
    // Releasing unknown addresses is fine.
    h.ipam.release_address(&id, "10.42.0.99").await.unwrap();
}

#[tokio::test]
async fn a_full_pool_reports_exhaustion() {
    let h = one_host();
    let id = pool_id(&h, "10.42.0.0/29", "").await;
    attach_network(&h, "10.42.0.0/29").await;
    h.ipam.request_address(&id, "", &gw()).await.unwrap();
    let mut got = BTreeSet::new();
    for _ in 0..5 {
        got.insert(h.ipam.request_address(&id, "", &none()).await.unwrap().ip());
    }
    assert_eq!(got.len(), 5);
    let err = h.ipam.request_address(&id, "", &none()).await.unwrap_err();
    assert!(matches!(err, IpamError::Exhausted(_)), "{err}");
}

#[tokio::test]
async fn hosts_allocate_from_their_own_blocks_and_never_collide() {
    let cluster = Arc::new(EmbeddedStore::in_memory());
    let a = host(&cluster, "a", vec![]);
    let b = host(&cluster, "b", vec![]);
    let ida = pool_id(&a, "10.42.0.0/24", "").await;
    let idb = pool_id(&b, "10.42.0.0/24", "").await;
    assert_eq!(ida, idb);
    assert_eq!(
        a.ipam.request_address(&ida, "", &gw()).await.unwrap(),
        b.ipam.request_address(&idb, "", &gw()).await.unwrap()
    );
    attach_network(&a, "10.42.0.0/24").await;
    attach_network(&b, "10.42.0.0/24").await;
    let mut all = BTreeSet::new();
    let mut tasks = Vec::new();
    for i in 0..100 {
        let (ipam, id) = if i % 2 == 0 {
            (a.ipam.clone(), ida.clone())
        } else {
            (b.ipam.clone(), idb.clone())
        };
        tasks.push(tokio::spawn(async move {
            ipam.request_address(&id, "", &BTreeMap::new())
                .await
                .unwrap()
                .ip()
        }));
    }
    for t in tasks {
        assert!(all.insert(t.await.unwrap()), "duplicate address handed out");
    }
    assert_eq!(all.len(), 100);
    let a_block = allocator::block_of(
        "10.42.0.0/24".parse().unwrap(),
        26,
        "10.42.0.2".parse().unwrap(),
    );
    let owner = cluster
        .get_json::<BlockRecord>(&keys::block("10.42.0.0/24".parse().unwrap(), a_block))
        .await
        .unwrap()
        .unwrap();
    let other = if owner.value.host == "a" { &b } else { &a };
    let err = other
        .ipam
        .request_address(&ida, "10.42.0.60", &none())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("belongs to host"), "{err}");
}

#[tokio::test]
async fn empty_blocks_are_released_and_pool_release_cleans_up() {
    let cluster = Arc::new(EmbeddedStore::in_memory());
    let h = host(&cluster, "h1", vec![]);
    let id = pool_id(&h, "10.42.0.0/16", "").await;
    attach_network(&h, "10.42.0.0/16").await;
    let ip = h.ipam.request_address(&id, "", &none()).await.unwrap().ip();
    assert_eq!(cluster.list(keys::BLOCKS).await.unwrap().len(), 1);
    h.ipam.release_address(&id, &ip.to_string()).await.unwrap();
    assert!(
        cluster.list(keys::BLOCKS).await.unwrap().is_empty(),
        "empty block released"
    );
    h.ipam.request_address(&id, "", &none()).await.unwrap();
    h.ipam.release_pool(&id).await.unwrap();
    assert!(
        cluster.list("").await.unwrap().is_empty(),
        "cluster store left {:?}",
        cluster.list("").await.unwrap()
    );
    assert!(h.local.list(keys::ADDRESSES).await.unwrap().is_empty());
}

/// A cluster store that can be switched off, like an unreachable etcd.
struct Switchable {
    inner: EmbeddedStore,
    down: std::sync::atomic::AtomicBool,
}

impl Switchable {
    fn check(&self) -> Result<(), StoreError> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            Err(StoreError::Unavailable(
                "etcd get: no answer within 3s".into(),
            ))
        } else {
            Ok(())
        }
    }
}

#[async_trait::async_trait]
impl Store for Switchable {
    async fn get(&self, key: &str) -> Result<Option<crate::store::Versioned>, StoreError> {
        self.check()?;
        self.inner.get(key).await
    }
    async fn list(
        &self,
        prefix: &str,
    ) -> Result<Vec<(String, crate::store::Versioned)>, StoreError> {
        self.check()?;
        self.inner.list(prefix).await
    }
    async fn create(&self, key: &str, value: Vec<u8>) -> Result<Option<u64>, StoreError> {
        self.check()?;
        self.inner.create(key, value).await
    }
    async fn update(
        &self,
        key: &str,
        expected: u64,
        value: Vec<u8>,
    ) -> Result<Option<u64>, StoreError> {
        self.check()?;
        self.inner.update(key, expected, value).await
    }
    async fn delete(&self, key: &str, expected: Option<u64>) -> Result<bool, StoreError> {
        self.check()?;
        self.inner.delete(key, expected).await
    }
}

#[tokio::test]
async fn owned_blocks_serve_containers_while_the_cluster_store_is_down() {
    let cluster = Arc::new(Switchable {
        inner: EmbeddedStore::in_memory(),
        down: Default::default(),
    });
    let local = Arc::new(EmbeddedStore::in_memory());
    let ipam = Ipam::new(
        cluster.clone(),
        local.clone(),
        blocks_for(cluster.clone(), local.clone(), "h1"),
        Arc::new(FakeDatapath::new()),
        IpamConfig::default(),
    );
    let h = Host {
        ipam: Arc::new(ipam),
        local,
    };
    let id = pool_id(&h, "10.42.0.0/24", "").await;
    h.ipam.request_address(&id, "", &gw()).await.unwrap();
    attach_network(&h, "10.42.0.0/24").await;
    let first = h.ipam.request_address(&id, "", &none()).await.unwrap();
    cluster
        .down
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let second = h
        .ipam
        .request_address(&id, "", &none())
        .await
        .expect("served from the owned block");
    assert_ne!(first, second);
    h.ipam
        .release_address(&id, &second.ip().to_string())
        .await
        .expect("release works offline");
    // Filling the block needs a new one: that fails, clearly, while the store is down.
    let mut last = Ok(first);
    for _ in 0..70 {
        last = h.ipam.request_address(&id, "", &none()).await;
        if last.is_err() {
            break;
        }
    }
    let err = last.unwrap_err();
    assert!(err.to_string().contains("unavailable"), "{err}");
}

#[tokio::test]
async fn a_restarted_host_claims_back_blocks_it_still_uses() {
    let cluster = Arc::new(EmbeddedStore::in_memory());
    let h = host(&cluster, "h1", vec![]);
    let id = pool_id(&h, "10.42.0.0/24", "").await;
    attach_network(&h, "10.42.0.0/24").await;
    let ip = h.ipam.request_address(&id, "", &none()).await.unwrap().ip();
    let pool = "10.42.0.0/24".parse().unwrap();
    let block = allocator::block_of(pool, 26, ip);
    // Reclaimed while the host was away...
    cluster
        .delete(&keys::block(pool, block), None)
        .await
        .unwrap();
    assert_eq!(h.ipam.blocks().verify().await.unwrap().claimed_back, 1);
    let owner = cluster
        .get_json::<BlockRecord>(&keys::block(pool, block))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(owner.value.host, "h1");
    assert_eq!(
        h.ipam.blocks().verify().await.unwrap(),
        Verified::default(),
        "nothing to do the second time"
    );
}

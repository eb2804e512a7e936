use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::*;
use crate::datapath::fake::FakeDatapath;
use crate::store::embedded::EmbeddedStore;
use crate::store::switchable::Switchable;

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
    let rec = NetworkRecord::for_subnet(
        format!("net{}", pool.replace(['.', '/'], "")),
        pool.parse().unwrap(),
    );
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

/// Host h1 on a cluster store that can be switched off.
fn host_on_switchable_store() -> (Arc<Switchable>, Host) {
    let cluster = Arc::new(Switchable::new());
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
    (cluster, h)
}

#[tokio::test]
async fn owned_blocks_serve_containers_while_the_cluster_store_is_down() {
    let (cluster, h) = host_on_switchable_store();
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

// ---- block ownership under faults ----

fn pool_of(s: &str) -> Ipv4Network {
    s.parse().unwrap()
}

#[tokio::test]
async fn release_pool_releases_only_this_hosts_blocks() {
    let cluster = Arc::new(EmbeddedStore::in_memory());
    let h1 = host(&cluster, "h1", vec![]);
    let id = pool_id(&h1, "10.42.0.0/24", "").await;
    attach_network(&h1, "10.42.0.0/24").await;
    h1.ipam.request_address(&id, "", &none()).await.unwrap();
    // h2 claimed a block of the same pool (say, after re-creating it) that h1 never
    // had a reference to.
    let theirs = pool_of("10.42.0.192/26");
    cluster
        .create_json(
            &keys::block(pool_of("10.42.0.0/24"), theirs),
            &BlockRecord::of("h2"),
        )
        .await
        .unwrap();
    h1.ipam.release_pool(&id).await.unwrap();
    let left: Vec<String> = cluster
        .list(keys::BLOCKS)
        .await
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(
        left,
        [keys::block(pool_of("10.42.0.0/24"), theirs)],
        "h1's block went, h2's stayed"
    );
}

/// Host `id` on `cluster` with a network in 10.42.0.0/24 (/26 blocks) and one address
/// handed out: the host, the PoolID and the address.
async fn host_with_an_address(
    cluster: &Arc<EmbeddedStore>,
    id: &str,
) -> (Host, String, std::net::Ipv4Addr) {
    let h = host(cluster, id, vec![]);
    let pool_id = pool_id(&h, "10.42.0.0/24", "").await;
    attach_network(&h, "10.42.0.0/24").await;
    let ip = h
        .ipam
        .request_address(&pool_id, "", &none())
        .await
        .unwrap()
        .ip();
    (h, pool_id, ip)
}

#[tokio::test]
async fn a_block_another_host_owns_is_a_conflict_and_serves_no_address() {
    let cluster = Arc::new(EmbeddedStore::in_memory());
    let (h1, id, first) = host_with_an_address(&cluster, "h1").await;
    let pool = pool_of("10.42.0.0/24");
    let block = allocator::block_of(pool, 26, first);
    // While h1 was cut off, its block was reclaimed and h2 took it.
    cluster
        .delete(&keys::block(pool, block), None)
        .await
        .unwrap();
    cluster
        .create_json(&keys::block(pool, block), &BlockRecord::of("h2"))
        .await
        .unwrap();
    let found = h1.ipam.blocks().verify().await.unwrap();
    assert_eq!(found.conflicts, 1);
    let conflicts = h1.ipam.blocks().conflicts();
    assert_eq!(conflicts[0].owner, "h2");
    assert_eq!(conflicts[0].addresses, vec![first]);
    for _ in 0..5 {
        let ip = h1
            .ipam
            .request_address(&id, "", &none())
            .await
            .unwrap()
            .ip();
        assert!(!block.contains(ip), "{ip} came from h2's block {block}");
    }
    // h1's container in that block goes: the conflict is over.
    h1.ipam
        .release_address(&id, &first.to_string())
        .await
        .unwrap();
    assert_eq!(h1.ipam.blocks().verify().await.unwrap().conflicts, 0);
    assert!(h1.ipam.blocks().conflicts().is_empty());
}

/// A host cut off from the cluster store may serve addresses from its own blocks
/// only while its seen/ lease is certainly alive in the store.
#[tokio::test]
async fn owned_blocks_serve_offline_only_while_the_seen_lease_holds() {
    let cluster = Arc::new(Switchable::new());
    let local = Arc::new(EmbeddedStore::in_memory());
    let tenure = Arc::new(crate::cluster::Tenure::clustered());
    tenure.registered();
    tenure.seen_renewed(
        std::time::Instant::now(),
        std::time::Duration::from_secs(600),
    );
    let blocks = Arc::new(Blocks::new(
        cluster.clone(),
        local.clone(),
        "h1".into(),
        tenure.clone(),
        std::time::Duration::from_secs(600),
    ));
    let h = Host {
        ipam: Arc::new(Ipam::new(
            cluster.clone(),
            local.clone(),
            blocks,
            Arc::new(FakeDatapath::new()),
            IpamConfig::default(),
        )),
        local,
    };
    let id = pool_id(&h, "10.42.0.0/24", "").await;
    attach_network(&h, "10.42.0.0/24").await;
    h.ipam.request_address(&id, "", &none()).await.unwrap();
    assert!(
        !tenure.blocks_are_safe(),
        "a first lease: nothing is safe before the blocks are verified"
    );
    h.ipam.blocks().verify().await.unwrap();
    cluster
        .down
        .store(true, std::sync::atomic::Ordering::SeqCst);
    h.ipam
        .request_address(&id, "", &none())
        .await
        .expect("lease alive and blocks verified: served from the owned block");
    // The last confirmed renewal is now older than the lease.
    tenure.seen_renewed(
        std::time::Instant::now() - std::time::Duration::from_secs(700),
        std::time::Duration::from_secs(600),
    );
    let err = h.ipam.request_address(&id, "", &none()).await.unwrap_err();
    assert!(err.to_string().contains("cut off"), "{err}");
}

async fn seed_gone_host(cluster: &Arc<EmbeddedStore>) -> Ipv4Network {
    let pool = pool_of("10.42.0.0/24");
    for (owner, block) in [
        ("h1", "10.42.0.0/26"),
        ("live", "10.42.0.64/26"),
        ("gone", "10.42.0.128/26"),
        ("gone", "10.42.0.192/26"),
    ] {
        cluster
            .create_json(&keys::block(pool, pool_of(block)), &BlockRecord::of(owner))
            .await
            .unwrap();
    }
    let rec = PoolRecord {
        refs: BTreeMap::from([("h1".into(), 1), ("gone".into(), 2)]),
        aux: BTreeMap::from([(
            "10.42.0.9".parse().unwrap(),
            BTreeSet::from(["gone".to_string()]),
        )]),
        ..PoolRecord::with_blocks(pool, 26)
    };
    cluster.create_json(&keys::pool(pool), &rec).await.unwrap();
    cluster
        .create_json(
            &keys::overlay(pool),
            &crate::schema::OverlayRecord {
                name: None,
                hosts: BTreeSet::from(["h1".into(), "gone".into()]),
            },
        )
        .await
        .unwrap();
    // "live" is registered (its seen/ lease holds); "gone" has no seen/ record left.
    cluster
        .create_json(
            &keys::seen("live"),
            &crate::schema::SeenRecord { last_seen: 0 },
        )
        .await
        .unwrap();
    pool
}

fn reclaimer(
    cluster: &Arc<EmbeddedStore>,
    grace_secs: u64,
) -> (Blocks, Arc<crate::cluster::Tenure>) {
    let tenure = Arc::new(crate::cluster::Tenure::clustered());
    let blocks = Blocks::new(
        cluster.clone(),
        Arc::new(EmbeddedStore::in_memory()),
        "h1".into(),
        tenure.clone(),
        std::time::Duration::from_secs(grace_secs),
    );
    (blocks, tenure)
}

#[tokio::test]
async fn a_host_whose_seen_lease_expired_is_forgotten_but_never_a_live_one_or_oneself() {
    let cluster = Arc::new(EmbeddedStore::in_memory());
    let pool = seed_gone_host(&cluster).await;
    let (blocks, tenure) = reclaimer(&cluster, 0);
    tenure.registered();
    // h1 itself has neither a live hosts/ record nor a seen/ record here: its own
    // blocks must stay all the same.
    assert_eq!(blocks.reclaim(&[]).await.unwrap(), 2);
    let owners: Vec<String> = blocks
        .all()
        .await
        .unwrap()
        .into_iter()
        .map(|(_, _, o)| o)
        .collect();
    assert_eq!(owners, ["h1", "live"]);
    let p = cluster
        .get_json::<PoolRecord>(&keys::pool(pool))
        .await
        .unwrap()
        .unwrap()
        .value;
    assert_eq!(p.refs.keys().collect::<Vec<_>>(), ["h1"]);
    assert!(p.aux.is_empty(), "the gone host's aux reservation went");
    let o = cluster
        .get_json::<crate::schema::OverlayRecord>(&keys::overlay(pool))
        .await
        .unwrap()
        .unwrap()
        .value;
    assert_eq!(o.hosts, BTreeSet::from(["h1".to_string()]));
}

#[tokio::test]
async fn nothing_is_reclaimed_until_this_host_has_been_registered_for_the_grace_period() {
    let cluster = Arc::new(EmbeddedStore::in_memory());
    seed_gone_host(&cluster).await;
    let (blocks, tenure) = reclaimer(&cluster, 600);
    assert_eq!(blocks.reclaim(&[]).await.unwrap(), 0, "not registered");
    tenure.registered();
    assert_eq!(
        blocks.reclaim(&[]).await.unwrap(),
        0,
        "registered, but not for the grace period: its view may be stale (the whole cluster was cut off)"
    );
    assert_eq!(blocks.all().await.unwrap().len(), 4);
}

#[tokio::test]
async fn addresses_no_endpoint_used_past_the_grace_are_collected() {
    let h = one_host();
    let id = pool_id(&h, "10.42.0.0/24", "").await;
    attach_network(&h, "10.42.0.0/24").await;
    let kept = h.ipam.request_address(&id, "", &none()).await.unwrap().ip();
    let lost = h.ipam.request_address(&id, "", &none()).await.unwrap().ip();
    let pool = pool_of("10.42.0.0/24");
    let in_use = BTreeSet::from([(pool, kept)]);
    let grace = std::time::Duration::from_secs(60);
    assert_eq!(
        h.ipam
            .collect_unused_addresses(&in_use, grace)
            .await
            .unwrap(),
        0,
        "young"
    );
    // Handed out two minutes ago; its endpoint never came.
    h.local
        .modify_json::<AddressRecord, IpamError, _>(&keys::address(pool, lost), |r| {
            Ok(r.map(|mut r| {
                r.since -= 120;
                r
            }))
        })
        .await
        .unwrap();
    assert_eq!(
        h.ipam
            .collect_unused_addresses(&in_use, grace)
            .await
            .unwrap(),
        1
    );
    let again = h
        .ipam
        .request_address(&id, &lost.to_string(), &none())
        .await
        .expect("the collected address is free again");
    assert_eq!(again.ip(), lost);
}

/// A host gone past the grace period (cut off, its containers still running) loses
/// its block, but what it published there stays reserved: the host that takes the
/// block hands none of it out, the returning host narrows the reservation to what it
/// still uses and gives it up when its containers are gone.
#[tokio::test]
async fn a_reclaimed_blocks_published_addresses_stay_reserved_for_their_host() {
    let cluster = Arc::new(EmbeddedStore::in_memory());
    let pool = pool_of("10.42.0.0/24");
    let small_blocks = || pool_req("10.42.0.0/24", "", &[(BLOCK_SIZE_OPTION, "28")]);
    let h2 = host(&cluster, "h2", vec![]);
    let id = h2
        .ipam
        .request_pool(small_blocks())
        .await
        .unwrap()
        .0
        .to_string();
    attach_network(&h2, "10.42.0.0/24").await;
    let mut in_use = BTreeSet::new();
    for _ in 0..3 {
        in_use.insert(
            h2.ipam
                .request_address(&id, "", &none())
                .await
                .unwrap()
                .ip(),
        );
    }
    let block = pool_of("10.42.0.0/28");
    let published = cluster
        .get_json::<BlockRecord>(&keys::block(pool, block))
        .await
        .unwrap()
        .unwrap()
        .value
        .published;
    assert!(
        in_use.is_subset(&published),
        "{in_use:?} in use, {published:?} published"
    );
    // The claim published the first address and a headroom; the next two came from it.
    assert_eq!(
        published.len(),
        1 + HEADROOM,
        "the first address plus the headroom"
    );

    // h2 has no seen/ record: it is gone past the grace period. h1 reclaims its block.
    let h1 = host(&cluster, "h1", vec![]);
    h1.ipam.request_pool(small_blocks()).await.unwrap();
    attach_network(&h1, "10.42.0.0/24").await;
    assert_eq!(h1.ipam.blocks().reclaim(&[]).await.unwrap(), 1);
    let reservations = h1.ipam.blocks().reservations().await.unwrap();
    assert_eq!(reservations.len(), 1);
    assert_eq!(
        (reservations[0].host.as_str(), &reservations[0].addresses),
        ("h2", &published)
    );

    // h1 needs addresses: it takes the reclaimed block, and never one h2 published.
    let mut h1_in_block = 0;
    for _ in 0..8 {
        let ip = h1
            .ipam
            .request_address(&id, "", &none())
            .await
            .unwrap()
            .ip();
        assert!(
            !published.contains(&ip),
            "h1 handed out {ip}, reserved for h2"
        );
        h1_in_block += usize::from(block.contains(ip));
    }
    assert!(h1_in_block > 0, "h1 should have taken the reclaimed block");
    let static_ip = *in_use.iter().next().unwrap();
    assert!(
        matches!(
            h1.ipam
                .request_address(&id, &static_ip.to_string(), &none())
                .await,
            Err(IpamError::Conflict(_))
        ),
        "a reserved address is refused as a static address too"
    );

    // h2 comes back: the block is h1's now; h2 reports it and reserves just what it uses.
    let found = h2.ipam.blocks().verify().await.unwrap();
    assert_eq!(found.conflicts, 1);
    let mine = h2.ipam.blocks().reservations().await.unwrap();
    assert_eq!(mine.len(), 1);
    assert_eq!(
        mine[0].addresses, in_use,
        "narrowed to the addresses still in use"
    );
    let next = h2
        .ipam
        .request_address(&id, "", &none())
        .await
        .unwrap()
        .ip();
    assert!(
        !block.contains(next),
        "h2 handed out {next} from the block it lost"
    );

    // h2's containers in the block go: so does its reservation.
    for ip in &in_use {
        h2.ipam.release_address(&id, &ip.to_string()).await.unwrap();
    }
    h2.ipam.blocks().verify().await.unwrap();
    assert!(h2.ipam.blocks().reservations().await.unwrap().is_empty());
    assert!(h2.ipam.blocks().conflicts().is_empty());
}

/// Offline, a host hands out only addresses it has published; beyond them it must
/// reach the cluster store first, so a reclaim can never miss one of its addresses.
#[tokio::test]
async fn offline_a_host_hands_out_only_what_it_has_published() {
    let (cluster, h) = host_on_switchable_store();
    let id = pool_id(&h, "10.42.0.0/24", "").await;
    attach_network(&h, "10.42.0.0/24").await;
    let first = h.ipam.request_address(&id, "", &none()).await.unwrap().ip();
    cluster
        .down
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let mut offline = BTreeSet::new();
    let failure = loop {
        match h.ipam.request_address(&id, "", &none()).await {
            Ok(ip) => offline.insert(ip.ip()),
            Err(e) => break e,
        };
        assert!(
            offline.len() <= HEADROOM,
            "handed out more than the headroom offline"
        );
    };
    assert_eq!(
        offline.len(),
        HEADROOM,
        "the whole headroom serves while offline"
    );
    assert!(failure.to_string().contains("cut off"), "{failure}");
    cluster
        .down
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let published = cluster
        .inner
        .get_json::<BlockRecord>(&keys::block(
            pool_of("10.42.0.0/24"),
            pool_of("10.42.0.0/26"),
        ))
        .await
        .unwrap()
        .unwrap()
        .value
        .published;
    assert!(published.contains(&first) && offline.is_subset(&published));
}

/// A host taken for gone while cut off loses its pool references in the reclaim; it
/// puts them back for the networks it still has, and writes a vanished pool record
/// again from what it knew of it.
#[tokio::test]
async fn a_returning_host_restores_its_pool_references() {
    let cluster = Arc::new(EmbeddedStore::in_memory());
    let pool = pool_of("10.42.0.0/24");
    let request = || {
        pool_req(
            "10.42.0.0/24",
            "10.42.0.128/25",
            &[(BLOCK_SIZE_OPTION, "28")],
        )
    };
    let h1 = host(&cluster, "h1", vec![]);
    let h2 = host(&cluster, "h2", vec![]);
    h1.ipam.request_pool(request()).await.unwrap();
    h2.ipam.request_pool(request()).await.unwrap();
    attach_network(&h2, "10.42.0.0/24").await;
    assert_eq!(
        h2.ipam.restore_references().await.unwrap(),
        0,
        "nothing to put right"
    );
    // h2 has no seen/ record: h1 takes it for gone and removes its references.
    h1.ipam.blocks().reclaim(&[]).await.unwrap();
    let refs = |c: &Arc<EmbeddedStore>| {
        let c = c.clone();
        async move {
            c.get_json::<PoolRecord>(&keys::pool(pool))
                .await
                .unwrap()
                .map(|r| r.value)
        }
    };
    assert!(!refs(&cluster).await.unwrap().refs.contains_key("h2"));
    assert_eq!(h2.ipam.restore_references().await.unwrap(), 1);
    assert_eq!(refs(&cluster).await.unwrap().refs.get("h2"), Some(&1));
    // The pool record vanished altogether: written again, as it was.
    cluster.delete(&keys::pool(pool), None).await.unwrap();
    assert_eq!(h2.ipam.restore_references().await.unwrap(), 1);
    let back = refs(&cluster).await.unwrap();
    assert_eq!(back.refs, BTreeMap::from([("h2".to_string(), 1)]));
    assert_eq!(
        (back.block_prefix, back.sub_pool),
        (28, Some(pool_of("10.42.0.128/25")))
    );
}

/// A reclaim that raced this host's return leaves a reservation of this host in a
/// block that is still its own: the host confirms the block with a write (so the
/// reclaim's delete, at the revision it read, fails) before it drops the reservation.
#[tokio::test]
async fn a_returning_host_confirms_its_block_before_dropping_a_racing_reservation() {
    let cluster = Arc::new(EmbeddedStore::in_memory());
    let pool = pool_of("10.42.0.0/24");
    let (h2, _, ip) = host_with_an_address(&cluster, "h2").await;
    let block = allocator::block_of(pool, 26, ip);
    let key = keys::block(pool, block);
    // The reclaimer read the block, then wrote h2's reservation.
    let read = cluster.get(&key).await.unwrap().unwrap().revision;
    let reservation = crate::schema::ReservedRecord {
        addresses: [ip].into(),
    };
    cluster
        .put_expiring_json(
            &keys::reserved(pool, block, "h2"),
            &reservation,
            std::time::Duration::from_secs(600),
        )
        .await
        .unwrap();
    h2.ipam.blocks().verify().await.unwrap();
    assert!(
        !cluster.delete(&key, Some(read)).await.unwrap(),
        "the reclaim's delete must fail once h2 has confirmed the block"
    );
    assert!(h2.ipam.blocks().reservations().await.unwrap().is_empty());
    assert_eq!(
        cluster
            .get_json::<BlockRecord>(&key)
            .await
            .unwrap()
            .unwrap()
            .value
            .host,
        "h2"
    );
}

/// Allocations side by side in one pool get different addresses, each recorded once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_allocations_in_one_pool_get_different_addresses() {
    let h = one_host();
    let id = pool_id(&h, "10.42.0.0/24", "").await;
    attach_network(&h, "10.42.0.0/24").await;
    // A first address: the block is this host's and published.
    h.ipam.request_address(&id, "", &none()).await.unwrap();
    let tasks = (0..40).map(|_| {
        let ipam = h.ipam.clone();
        let id = id.clone();
        tokio::spawn(async move { ipam.request_address(&id, "", &none()).await })
    });
    let mut got = BTreeSet::new();
    for r in futures::future::join_all(tasks).await {
        assert!(
            got.insert(r.unwrap().unwrap().ip()),
            "an address handed out twice"
        );
    }
    assert_eq!(got.len(), 40);
    let recorded = h
        .local
        .list(&keys::addresses_of("10.42.0.0/24".parse().unwrap()))
        .await
        .unwrap();
    assert_eq!(recorded.len(), 41);
}

/// A pool's lock covers that pool only: a change held up in one pool (a slow etcd
/// call while claiming a block, say) holds up no allocation in another, and
/// allocations of published addresses share their pool.
#[tokio::test]
async fn pools_never_wait_for_each_other() {
    let h = one_host();
    let a = pool_id(&h, "10.42.0.0/24", "").await;
    let b = pool_id(&h, "10.43.0.0/24", "").await;
    attach_network(&h, "10.42.0.0/24").await;
    attach_network(&h, "10.43.0.0/24").await;
    h.ipam.request_address(&a, "", &none()).await.unwrap();
    h.ipam.request_address(&b, "", &none()).await.unwrap();
    let quick = std::time::Duration::from_secs(1);
    {
        let _stuck = h
            .ipam
            .locks
            .write(&pool_lock(pool_of("10.42.0.0/24")))
            .await;
        let other = tokio::time::timeout(quick, h.ipam.request_address(&b, "", &none())).await;
        assert!(other.is_ok(), "pool b waited for pool a");
        let released = tokio::time::timeout(quick, h.ipam.release_address(&b, "10.43.0.3")).await;
        assert!(released.is_ok(), "a release in pool b waited for pool a");
    }
    let _sharing = h.ipam.locks.read(&pool_lock(pool_of("10.42.0.0/24"))).await;
    let same = tokio::time::timeout(quick, h.ipam.request_address(&a, "", &none())).await;
    assert!(
        same.is_ok(),
        "a published address waited for another allocation"
    );
}

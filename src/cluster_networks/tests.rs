use std::collections::BTreeMap;
use std::sync::Arc;

use super::*;
use crate::datapath::fake::FakeDatapath;
use crate::driver::DriverConfig;
use crate::engine::fake::FakeEngine;
use crate::schema::ClusterNetworkSpec;
use crate::store::embedded::EmbeddedStore;

/// One simulated host: its dockerd, its weft driver and its reconciler, sharing the
/// cluster store with the others.
struct Host {
    engine: Arc<FakeEngine>,
    driver: Arc<Driver>,
    networks: ClusterNetworks,
}

fn host(name: &str, cluster: &Arc<EmbeddedStore>) -> Host {
    let driver = Arc::new(
        Driver::new(
            Arc::new(EmbeddedStore::in_memory()),
            Arc::new(FakeDatapath::new()),
            DriverConfig::default(),
        )
        .with_cluster(cluster.clone(), name.into()),
    );
    let engine = Arc::new(FakeEngine::with_driver(driver.clone()));
    Host {
        networks: ClusterNetworks::new(
            name.into(),
            cluster.clone(),
            driver.clone(),
            engine.clone(),
        ),
        engine,
        driver,
    }
}

fn spec(name: &str, subnet: &str, scope: Option<&str>) -> ClusterNetworkSpec {
    ClusterNetworkSpec {
        name: name.into(),
        driver: "weft".into(),
        ipam_driver: "weft".into(),
        subnet: subnet.parse().unwrap(),
        ip_range: None,
        gateway: Some(subnet.replace(".0/24", ".1").parse().unwrap()),
        ipam_options: BTreeMap::new(),
        aux_addresses: BTreeMap::new(),
        internal: false,
        options: scope
            .map(|s| BTreeMap::from([("weft.scope".to_string(), s.to_string())]))
            .unwrap_or_default(),
        labels: BTreeMap::from([("team".to_string(), "blue".to_string())]),
    }
}

async fn records(cluster: &EmbeddedStore) -> Vec<ClusterNetworkRecord> {
    records::list(cluster)
        .await
        .unwrap()
        .0
        .into_iter()
        .map(|r| r.value)
        .collect()
}

async fn state_of(h: &Host, id: &str) -> Option<ClusterState> {
    h.driver
        .networks()
        .await
        .unwrap()
        .into_iter()
        .find(|n| n.id == id)
        .and_then(|n| n.cluster)
}

async fn here(h: &Host, name: &str) -> String {
    h.networks
        .status()
        .await
        .networks
        .into_iter()
        .find(|n| n.name == name)
        .map_or_else(|| "absent".into(), |n| n.here)
}

#[tokio::test]
async fn a_network_created_on_one_host_is_created_on_every_other_host_also_later_ones() {
    let cluster = Arc::new(EmbeddedStore::in_memory());
    let (h1, h2) = (host("h1", &cluster), host("h2", &cluster));
    let original = h1
        .engine
        .user_creates(spec("app", "10.70.0.0/24", Some("cluster")))
        .await;
    assert_eq!(
        state_of(&h1, &original).await,
        Some(ClusterState::Unpublished)
    );

    h1.networks.pass().await.unwrap();
    let recorded = records(&cluster).await;
    let [r] = recorded.as_slice() else {
        panic!("{recorded:?}")
    };
    assert_eq!(
        (r.origin_host.as_str(), r.origin_network.as_str()),
        ("h1", original.as_str())
    );
    assert_eq!(r.spec, spec("app", "10.70.0.0/24", Some("cluster")));
    assert_eq!(
        state_of(&h1, &original).await,
        Some(ClusterState::Member { uid: r.uid.clone() })
    );

    h2.networks.pass().await.unwrap();
    let copy = h2.engine.by_name("app").expect("created on h2");
    let copied = copy.spec.as_ref().unwrap();
    assert_eq!(copied.subnet, r.spec.subnet);
    assert_eq!(copied.gateway, r.spec.gateway);
    assert_eq!(copied.labels, r.spec.labels);
    assert_eq!(copied.options.get("weft.cluster-uid"), Some(&r.uid));
    assert_eq!(
        state_of(&h2, &copy.id).await,
        Some(ClusterState::Member { uid: r.uid.clone() })
    );
    assert_eq!(here(&h2, "app").await, "created");

    // Settled: nothing more is created, and the copy is never published as an original.
    h2.networks.pass().await.unwrap();
    h1.networks.pass().await.unwrap();
    assert_eq!(
        h2.engine.creates.load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    assert_eq!(
        h1.engine.creates.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    assert_eq!(records(&cluster).await.len(), 1);
    assert_eq!(here(&h1, "app").await, "present");
    assert_eq!(here(&h2, "app").await, "present");
    let hosts = h2.networks.status().await.networks[0].hosts.clone();
    assert_eq!(hosts, ["h1", "h2"]);

    // A host that joins later gets it on its first pass.
    let h3 = host("h3", &cluster);
    h3.networks.pass().await.unwrap();
    assert!(h3.engine.by_name("app").is_some());
}

#[tokio::test]
async fn a_network_docker_has_not_committed_yet_is_published_on_a_later_pass() {
    let cluster = Arc::new(EmbeddedStore::in_memory());
    let h1 = host("h1", &cluster);
    // The driver has it (CreateNetwork ran) but dockerd does not list it yet.
    let id = "e1".repeat(32);
    h1.driver
        .create_network(
            serde_json::from_value(serde_json::json!({
                "NetworkID": id,
                "Options": {"com.docker.network.generic": {"weft.scope": "cluster"}},
                "IPv4Data": [{"Pool": "10.71.0.0/24", "Gateway": "10.71.0.1/24"}],
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let outcome = h1.networks.pass().await.unwrap();
    assert!(outcome.again_soon);
    assert!(records(&cluster).await.is_empty());
    h1.engine.networks.lock().unwrap().push(EngineNetwork {
        id: id.clone(),
        name: "late".into(),
        driver: "weft".into(),
        spec: Some(spec("late", "10.71.0.0/24", Some("cluster"))),
    });
    assert!(!h1.networks.pass().await.unwrap().again_soon);
    assert_eq!(records(&cluster).await[0].spec.name, "late");
}

#[tokio::test]
async fn removing_it_on_any_host_removes_it_everywhere_except_where_containers_still_use_it() {
    let cluster = Arc::new(EmbeddedStore::in_memory());
    let (h1, h2, h3) = (
        host("h1", &cluster),
        host("h2", &cluster),
        host("h3", &cluster),
    );
    h1.engine
        .user_creates(spec("app", "10.72.0.0/24", Some("cluster")))
        .await;
    for h in [&h1, &h2, &h3] {
        h.networks.pass().await.unwrap();
    }
    let on_h3 = h3.engine.by_name("app").unwrap().id;
    h3.engine.in_use.lock().unwrap().insert(on_h3.clone());

    // `docker network rm app` on h2, a host that got a copy.
    let on_h2 = h2.engine.by_name("app").unwrap().id;
    assert_eq!(
        h2.engine.remove_network(&on_h2).await.unwrap(),
        Removal::Removed
    );
    assert!(
        records(&cluster).await.is_empty(),
        "the record goes with the rm"
    );

    for h in [&h1, &h2, &h3] {
        h.networks.pass().await.unwrap();
    }
    assert!(
        h1.engine.by_name("app").is_none(),
        "the original is removed too"
    );
    assert!(h2.engine.by_name("app").is_none(), "nothing recreates it");
    assert!(
        h3.engine.by_name("app").is_some(),
        "kept while a container uses it"
    );
    assert!(matches!(
        state_of(&h3, &on_h3).await,
        Some(ClusterState::Withdrawn { .. })
    ));
    let status = h3.networks.status().await;
    assert!(status.networks.is_empty(), "{status:?}");
    assert!(
        status
            .kept
            .iter()
            .any(|k| k.contains("app") && k.contains("active endpoints")),
        "{status:?}"
    );
    assert!(
        records(&cluster).await.is_empty(),
        "withdrawing never brings a record back"
    );

    h3.engine.in_use.lock().unwrap().clear();
    h3.networks.pass().await.unwrap();
    assert!(
        h3.engine.by_name("app").is_none(),
        "removed once its containers are gone"
    );
    assert!(h3.networks.status().await.kept.is_empty());
    assert!(records(&cluster).await.is_empty());
}

#[tokio::test]
async fn a_name_clash_is_reported_and_never_overwritten() {
    let cluster = Arc::new(EmbeddedStore::in_memory());
    let (h1, h2) = (host("h1", &cluster), host("h2", &cluster));
    // h2 already has a bridge network and a local weft network of the cluster names.
    let bridge = h2
        .engine
        .user_creates(ClusterNetworkSpec {
            driver: "bridge".into(),
            ipam_driver: "default".into(),
            ..spec("app", "172.30.0.0/24", None)
        })
        .await;
    let theirs = h2
        .engine
        .user_creates(spec("db", "10.74.0.0/24", Some("cluster")))
        .await;
    h1.engine
        .user_creates(spec("app", "10.73.0.0/24", Some("cluster")))
        .await;
    h1.engine
        .user_creates(spec("db", "10.75.0.0/24", Some("cluster")))
        .await;
    h1.networks.pass().await.unwrap();
    h2.networks.pass().await.unwrap();

    assert_eq!(
        h2.engine.by_name("app").unwrap().id,
        bridge,
        "never replaced"
    );
    assert_eq!(h2.engine.by_name("db").unwrap().id, theirs);
    assert_eq!(
        h2.engine.creates.load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    assert_eq!(
        state_of(&h2, &theirs).await,
        Some(ClusterState::Unpublished)
    );
    let db = records(&cluster)
        .await
        .into_iter()
        .find(|r| r.spec.name == "db")
        .unwrap();
    assert_eq!(db.origin_host, "h1", "the clashing network is not recorded");

    let status = h2.networks.status().await;
    let problems = status.problems.join("\n");
    assert!(
        problems.contains("\"app\"") && problems.contains("driver bridge"),
        "{problems}"
    );
    assert!(
        problems.contains("10.74.0.0/24") && problems.contains("10.75.0.0/24"),
        "{problems}"
    );
    assert!(here(&h2, "app").await.starts_with("not here"));
}

#[tokio::test]
async fn the_same_network_created_by_hand_on_two_hosts_becomes_one_cluster_network() {
    let cluster = Arc::new(EmbeddedStore::in_memory());
    let (h1, h2) = (host("h1", &cluster), host("h2", &cluster));
    let a = h1
        .engine
        .user_creates(spec("app", "10.76.0.0/24", Some("cluster")))
        .await;
    let b = h2
        .engine
        .user_creates(spec("app", "10.76.0.0/24", Some("cluster")))
        .await;
    h1.networks.pass().await.unwrap();
    h2.networks.pass().await.unwrap();
    let uid = records(&cluster).await[0].uid.clone();
    assert_eq!(
        state_of(&h1, &a).await,
        Some(ClusterState::Member { uid: uid.clone() })
    );
    assert_eq!(state_of(&h2, &b).await, Some(ClusterState::Member { uid }));
    assert_eq!(here(&h2, "app").await, "present");
}

#[tokio::test]
async fn a_name_used_again_gets_a_new_network_once_the_old_one_is_gone() {
    let cluster = Arc::new(EmbeddedStore::in_memory());
    let (h1, h2) = (host("h1", &cluster), host("h2", &cluster));
    let first = h1
        .engine
        .user_creates(spec("app", "10.77.0.0/24", Some("cluster")))
        .await;
    h1.networks.pass().await.unwrap();
    h2.networks.pass().await.unwrap();
    let old_copy = h2.engine.by_name("app").unwrap().id;
    h2.engine.in_use.lock().unwrap().insert(old_copy.clone());

    h1.engine.remove_network(&first).await.unwrap();
    h1.engine
        .user_creates(spec("app", "10.78.0.0/24", Some("cluster")))
        .await;
    h1.networks.pass().await.unwrap();
    h2.networks.pass().await.unwrap();
    assert_eq!(h2.engine.by_name("app").unwrap().id, old_copy);
    assert!(here(&h2, "app").await.starts_with("waiting"));
    let recorded = records(&cluster).await;
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].spec.subnet.to_string(), "10.78.0.0/24");

    // One pass removes the old copy and creates the new network.
    h2.engine.in_use.lock().unwrap().clear();
    h2.networks.pass().await.unwrap();
    let now = h2.engine.by_name("app").unwrap();
    assert_eq!(now.spec.unwrap().subnet.to_string(), "10.78.0.0/24");
    assert_eq!(here(&h2, "app").await, "created");
}

#[tokio::test]
async fn a_record_of_a_network_removed_before_it_was_published_is_forgotten_by_its_host_only() {
    let cluster = Arc::new(EmbeddedStore::in_memory());
    let (h1, h2) = (host("h1", &cluster), host("h2", &cluster));
    let record = |origin: &str| ClusterNetworkRecord {
        uid: format!("{origin}0000"),
        spec: spec(&format!("from-{origin}"), "10.79.0.0/24", Some("cluster")),
        origin_host: origin.into(),
        origin_network: "ab".repeat(32),
    };
    cluster
        .create_json(&keys::cluster_network("from-h1"), &record("h1"))
        .await
        .unwrap();
    h1.networks.pass().await.unwrap();
    assert!(records(&cluster).await.is_empty());
    assert!(h1.engine.by_name("from-h1").is_none());
    // Another host's record stays, whatever h1 has.
    let mut r = record("h2");
    r.spec.subnet = "10.80.0.0/24".parse().unwrap();
    cluster
        .create_json(&keys::cluster_network("from-h2"), &r)
        .await
        .unwrap();
    h1.networks.pass().await.unwrap();
    assert_eq!(records(&cluster).await.len(), 1);
    assert!(h1.engine.by_name("from-h2").is_some());
    drop(h2);
}

#[tokio::test]
async fn an_unreachable_dockerd_fails_the_pass_and_touches_nothing() {
    let cluster = Arc::new(EmbeddedStore::in_memory());
    let h1 = host("h1", &cluster);
    h1.engine
        .user_creates(spec("app", "10.81.0.0/24", Some("cluster")))
        .await;
    h1.engine
        .down
        .store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(h1.networks.pass().await.is_err());
    assert!(records(&cluster).await.is_empty());
}

#[tokio::test]
async fn each_host_creates_its_copy_under_the_driver_name_weft_has_there() {
    let cluster = Arc::new(EmbeddedStore::in_memory());
    let (h1, h2, h3) = (
        host("h1", &cluster),
        host("h2", &cluster),
        host("h3", &cluster),
    );
    let plugin = |s: ClusterNetworkSpec| ClusterNetworkSpec {
        driver: "weft:latest".into(),
        ipam_driver: "weft:latest".into(),
        ..s
    };
    h1.engine
        .user_creates(plugin(spec("app", "10.82.0.0/24", Some("cluster"))))
        .await;
    // h2 runs weft as a host service: its networks say `weft`.
    h2.engine
        .user_creates(spec("own", "10.83.0.0/24", None))
        .await;
    h1.networks.pass().await.unwrap();
    h2.networks.pass().await.unwrap();
    h3.networks.pass().await.unwrap();
    let on_h2 = h2.engine.by_name("app").unwrap().spec.unwrap();
    assert_eq!(
        (on_h2.driver.as_str(), on_h2.ipam_driver.as_str()),
        ("weft", "weft")
    );
    // h3 has no weft network to tell: the origin's names.
    let on_h3 = h3.engine.by_name("app").unwrap().spec.unwrap();
    assert_eq!(on_h3.driver, "weft:latest");
}

#[tokio::test]
async fn a_withdrawn_network_dockerd_no_longer_has_is_forgotten_here() {
    let cluster = Arc::new(EmbeddedStore::in_memory());
    let (h1, h2) = (host("h1", &cluster), host("h2", &cluster));
    let original = h1
        .engine
        .user_creates(spec("app", "10.84.0.0/24", Some("cluster")))
        .await;
    h1.networks.pass().await.unwrap();
    h2.networks.pass().await.unwrap();
    let copy = h2.engine.by_name("app").unwrap().id;
    h2.engine.in_use.lock().unwrap().insert(copy.clone());
    h1.engine.remove_network(&original).await.unwrap();
    h2.networks.pass().await.unwrap();
    assert!(matches!(
        state_of(&h2, &copy).await,
        Some(ClusterState::Withdrawn { .. })
    ));
    // dockerd lost it some other way: no DeleteNetwork will come.
    h2.engine.networks.lock().unwrap().clear();
    h2.engine.in_use.lock().unwrap().clear();
    h2.networks.pass().await.unwrap();
    assert!(h2.driver.networks().await.unwrap().is_empty());
}

#[tokio::test]
async fn nothing_is_withdrawn_while_a_record_does_not_decode() {
    let cluster = Arc::new(EmbeddedStore::in_memory());
    let (h1, h2) = (host("h1", &cluster), host("h2", &cluster));
    h1.engine
        .user_creates(spec("app", "10.85.0.0/24", Some("cluster")))
        .await;
    h1.networks.pass().await.unwrap();
    h2.networks.pass().await.unwrap();
    // The record is damaged (by hand, or by a newer weft): it may still be the network.
    let key = keys::cluster_network("app");
    let revision = cluster.get(&key).await.unwrap().unwrap().revision;
    cluster
        .update(&key, revision, b"{not json".to_vec())
        .await
        .unwrap();
    h2.networks.pass().await.unwrap();
    assert!(h2.engine.by_name("app").is_some());
    let problems = h2.networks.status().await.problems.join("\n");
    assert!(problems.contains("cluster-networks/app"), "{problems}");
}

#[tokio::test]
async fn a_create_dockerd_refuses_is_retried_with_backoff_not_every_pass() {
    let cluster = Arc::new(EmbeddedStore::in_memory());
    let (h1, h2) = (host("h1", &cluster), host("h2", &cluster));
    h1.engine
        .user_creates(spec("app", "10.86.0.0/24", Some("cluster")))
        .await;
    h1.networks.pass().await.unwrap();
    h2.engine
        .refuse_creates
        .store(true, std::sync::atomic::Ordering::SeqCst);
    for _ in 0..5 {
        h2.networks.pass().await.unwrap();
    }
    assert_eq!(
        h2.engine.creates.load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    let here = here(&h2, "app").await;
    assert!(
        here.contains("could not resolve driver") || here.contains("next try"),
        "{here}"
    );
}

use std::sync::Arc;

use serde_json::json;

use super::*;
use crate::datapath::fake::FakeDatapath;
use crate::store::embedded::EmbeddedStore;

const NET: &str = "5f3c000000000000000000000000000000000000000000000000000000000001";
const EP: &str = "9ab1c2d3e4f5000000000000000000000000000000000000000000000000000a";

fn setup() -> (Driver, Arc<FakeDatapath>, Arc<EmbeddedStore>) {
    let store = Arc::new(EmbeddedStore::in_memory());
    let fake = Arc::new(FakeDatapath::new());
    (
        Driver::new(store.clone(), fake.clone(), DriverConfig::default()),
        fake,
        store,
    )
}

fn create_req(
    id: &str,
    subnet: &str,
    generic: serde_json::Value,
    internal: bool,
) -> proto::CreateNetworkRequest {
    let mut options =
        json!({"com.docker.network.enable_ipv6": false, "com.docker.network.generic": generic});
    if internal {
        options["com.docker.network.internal"] = json!(true);
    }
    serde_json::from_value(json!({
        "NetworkID": id,
        "Options": options,
        "IPv4Data": [{"AddressSpace": "weft-local", "Pool": subnet, "Gateway": format!("{}/16", subnet.replace(".0.0/16", ".0.1"))}],
        "IPv6Data": []
    }))
    .unwrap()
}

fn endpoint_req(net: &str, ep: &str, addr: &str) -> proto::CreateEndpointRequest {
    serde_json::from_value(json!({"NetworkID": net, "EndpointID": ep, "Interface": {"Address": addr, "AddressIPv6": "", "MacAddress": ""}, "Options": {}})).unwrap()
}

async fn endpoint_ids(d: &Driver) -> Vec<String> {
    d.endpoints()
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect()
}

fn join_req(net: &str, ep: &str) -> proto::JoinRequest {
    serde_json::from_value(json!({"NetworkID": net, "EndpointID": ep, "SandboxKey": "/var/run/docker/netns/doesnotexist", "Options": null})).unwrap()
}

#[tokio::test]
async fn mtu_is_derived_from_the_underlay_or_taken_from_options() {
    let (d, fake, _) = setup();
    fake.with(|s| s.underlay_mtu = 9000);
    d.create_network(create_req(NET, "10.42.0.0/16", json!({}), false))
        .await
        .unwrap();
    assert_eq!(d.networks().await.unwrap()[0].mtu, 8920);
    let other = NET.replace("01", "02");
    d.create_network(create_req(
        &other,
        "10.43.0.0/16",
        json!({"weft.mtu": "1300"}),
        false,
    ))
    .await
    .unwrap();
    assert_eq!(d.network(&other).await.unwrap().mtu, 1300);
}

#[tokio::test]
async fn create_network_is_idempotent_and_refuses_conflicts() {
    let (d, _, _) = setup();
    d.create_network(create_req(NET, "10.42.0.0/16", json!({}), false))
        .await
        .unwrap();
    d.create_network(create_req(NET, "10.42.0.0/16", json!({}), false))
        .await
        .unwrap();
    let err = d
        .create_network(create_req(
            NET,
            "10.42.0.0/16",
            json!({"weft.mtu": "1300"}),
            false,
        ))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("different settings"), "{err}");
    let err = d
        .create_network(create_req(
            &NET.replace("01", "02"),
            "10.42.0.0/16",
            json!({}),
            false,
        ))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("overlaps"), "{err}");
}

#[tokio::test]
async fn internal_networks_give_no_gateway_and_disable_the_gateway_service() {
    let (d, fake, _) = setup();
    d.create_network(create_req(NET, "10.42.0.0/16", json!({}), true))
        .await
        .unwrap();
    d.create_endpoint(endpoint_req(NET, EP, "10.42.0.2/16"))
        .await
        .unwrap();
    let r = d.join(join_req(NET, EP)).await.unwrap();
    assert_eq!(r.gateway, "");
    assert!(r.disable_gateway_service);
    assert!(fake.with(|s| s.synced.networks[0].gateway.is_none()));
}

#[tokio::test]
async fn join_returns_the_container_link_and_a_plain_gateway() {
    let (d, fake, store) = setup();
    d.create_network(create_req(NET, "10.42.0.0/16", json!({}), false))
        .await
        .unwrap();
    let resp = d
        .create_endpoint(endpoint_req(NET, EP, "10.42.0.2/16"))
        .await
        .unwrap();
    assert_eq!(
        resp,
        proto::CreateEndpointResponse::default(),
        "nothing Docker set is echoed"
    );
    assert!(fake.links().contains("wfh9ab1c2d3e4f5"));
    let r = d.join(join_req(NET, EP)).await.unwrap();
    assert_eq!(r.interface_name.src_name, "wfc9ab1c2d3e4f5");
    assert_eq!(r.interface_name.dst_prefix, "eth");
    assert_eq!(r.gateway, "10.42.0.1");
    assert!(!r.disable_gateway_service);
    let ep = store
        .get_json::<EndpointRecord>(&keys::endpoint(EP))
        .await
        .unwrap()
        .unwrap()
        .value;
    assert!(ep.joined, "join is persisted");
    d.leave(NET, EP).await.unwrap();
    d.leave(NET, EP).await.unwrap();
    d.delete_endpoint(NET, EP).await.unwrap();
    d.delete_endpoint(NET, EP).await.unwrap();
    assert!(fake.links().is_empty());
    d.delete_network(NET).await.unwrap();
    d.delete_network(NET).await.unwrap();
    assert!(store.list("").await.unwrap().is_empty());
    assert_eq!(fake.with(|s| s.synced.clone()), DesiredState::default());
}

#[tokio::test]
async fn failed_endpoint_setup_rolls_back_everything() {
    let (d, fake, store) = setup();
    d.create_network(create_req(NET, "10.42.0.0/16", json!({}), false))
        .await
        .unwrap();
    fake.with(|s| s.fail_setup = true);
    assert!(d
        .create_endpoint(endpoint_req(NET, EP, "10.42.0.2/16"))
        .await
        .is_err());
    assert!(fake.links().is_empty(), "links left: {:?}", fake.links());
    assert!(store.list(keys::ENDPOINTS).await.unwrap().is_empty());
}

/// The container path (CreateEndpoint, Join, Leave, DeleteEndpoint) never waits for a
/// host-wide datapath sync: one stuck in `nft` (held here) holds up no container.
#[tokio::test]
async fn the_container_path_never_waits_for_a_datapath_sync() {
    let (d, fake, _) = setup();
    d.create_network(create_req(NET, "10.42.0.0/16", json!({}), false))
        .await
        .unwrap();
    let _stuck = d.syncing.lock().await;
    let lifecycle = async {
        d.create_endpoint(endpoint_req(NET, EP, "10.42.0.2/16"))
            .await
            .unwrap();
        d.join(join_req(NET, EP)).await.unwrap();
        d.leave(NET, EP).await.unwrap();
        d.delete_endpoint(NET, EP).await.unwrap();
    };
    tokio::time::timeout(std::time::Duration::from_secs(2), lifecycle)
        .await
        .expect("an endpoint's lifecycle waited for the datapath sync");
    assert!(fake.links().is_empty());
}

/// Endpoints never wait for each other: with a slow kernel (every setup takes
/// 300 ms), ten containers started at once are all set up in about one setup's time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_are_set_up_side_by_side() {
    let (d, fake, store) = setup();
    d.create_network(create_req(NET, "10.42.0.0/16", json!({}), false))
        .await
        .unwrap();
    fake.with(|s| s.setup_delay = Some(std::time::Duration::from_millis(300)));
    let d = std::sync::Arc::new(d);
    let started = std::time::Instant::now();
    let creates = (0..10u8).map(|i| {
        let d = d.clone();
        tokio::spawn(async move {
            let id = format!("{i:02x}{}", &EP[2..]);
            d.create_endpoint(endpoint_req(NET, &id, &format!("10.42.0.{}/16", i + 2)))
                .await
        })
    });
    for r in futures::future::join_all(creates).await {
        r.unwrap().unwrap();
    }
    let took = started.elapsed();
    assert!(
        took < std::time::Duration::from_millis(1500),
        "10 endpoints took {took:?}: they waited for each other"
    );
    assert_eq!(store.list(keys::ENDPOINTS).await.unwrap().len(), 10);
    assert_eq!(fake.links().len(), 20);
}

#[tokio::test]
async fn failed_network_sync_rolls_back_the_record() {
    let (d, fake, store) = setup();
    fake.with(|s| s.fail_sync = true);
    assert!(d
        .create_network(create_req(NET, "10.42.0.0/16", json!({}), false))
        .await
        .is_err());
    assert!(store.list(keys::NETWORKS).await.unwrap().is_empty());
}

#[tokio::test]
async fn create_endpoint_validates_its_input() {
    let (d, _, _) = setup();
    assert!(matches!(
        d.create_endpoint(endpoint_req(NET, EP, "10.42.0.2/16"))
            .await,
        Err(DriverError::NotFound(_))
    ));
    d.create_network(create_req(NET, "10.42.0.0/16", json!({}), false))
        .await
        .unwrap();
    for (ep, addr) in [
        (EP, ""),
        (EP, "10.99.0.2/16"),
        (EP, "garbage"),
        ("not-hex-at-all!", "10.42.0.2/16"),
    ] {
        assert!(
            d.create_endpoint(endpoint_req(NET, ep, addr))
                .await
                .is_err(),
            "{ep} {addr}"
        );
    }
}

#[tokio::test]
async fn reconcile_forgets_dead_containers_repairs_links_and_removes_orphans() {
    let (d, fake, store) = setup();
    d.create_network(create_req(NET, "10.42.0.0/16", json!({}), false))
        .await
        .unwrap();
    let joined = EP;
    let unjoined = "0123456789ab0000000000000000000000000000000000000000000000000000";
    d.create_endpoint(endpoint_req(NET, joined, "10.42.0.2/16"))
        .await
        .unwrap();
    d.create_endpoint(endpoint_req(NET, unjoined, "10.42.0.3/16"))
        .await
        .unwrap();
    d.join(join_req(NET, joined)).await.unwrap();
    // The joined container died with dockerd; the unjoined pair vanished; a stray link appeared.
    fake.destroy_pair("wfh9ab1c2d3e4f5", "wfc9ab1c2d3e4f5");
    fake.destroy_pair("wfh0123456789ab", "wfc0123456789ab");
    fake.with(|s| s.links.insert("wfhdeadbeef0000".into()));
    let report = d.reconcile().await.unwrap();
    assert_eq!(
        report,
        ReconcileReport {
            stale_endpoints: 1,
            orphan_links: 1
        }
    );
    assert_eq!(endpoint_ids(&d).await, vec![unjoined.to_string()]);
    assert!(
        fake.links().contains("wfh0123456789ab"),
        "unjoined pair recreated"
    );
    assert!(!fake.links().contains("wfhdeadbeef0000"));
    assert_eq!(
        fake.with(|s| s.resyncs),
        1,
        "reconcile rewrites the whole datapath state"
    );
    assert!(store.get(&keys::network(NET)).await.unwrap().is_some());
}

/// Host `id`'s driver, with its own local store, on the shared `cluster` store.
fn host_on(cluster: &Arc<EmbeddedStore>, id: &str) -> Driver {
    Driver::new(
        Arc::new(EmbeddedStore::in_memory()),
        Arc::new(FakeDatapath::new()),
        DriverConfig::default(),
    )
    .with_cluster(cluster.clone(), id.into())
}

#[tokio::test]
async fn a_network_name_must_match_across_hosts() {
    let cluster = Arc::new(EmbeddedStore::in_memory());
    let host = |id: &str| host_on(&cluster, id);
    let (a, b, c) = (host("a"), host("b"), host("c"));
    a.create_network(create_req(
        NET,
        "10.42.0.0/16",
        json!({"weft.network": "blue"}),
        false,
    ))
    .await
    .unwrap();
    let err = b
        .create_network(create_req(
            NET,
            "10.42.0.0/16",
            json!({"weft.network": "red"}),
            false,
        ))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("\"blue\""), "{err}");
    assert!(
        b.networks().await.unwrap().is_empty(),
        "a refused network is not kept"
    );
    b.create_network(create_req(
        NET,
        "10.42.0.0/16",
        json!({"weft.network": "blue"}),
        false,
    ))
    .await
    .unwrap();
    c.create_network(create_req(NET, "10.42.0.0/16", json!({}), false))
        .await
        .unwrap();
    for d in [&a, &b, &c] {
        d.delete_network(NET).await.unwrap();
    }
    assert!(
        cluster.list(keys::OVERLAYS).await.unwrap().is_empty(),
        "the last host removes the identity"
    );
}

const EP2: &str = "7c0de0000000000000000000000000000000000000000000000000000000000b";

/// A driver with network NET (10.42.0.0/16) created.
async fn with_network(config: DriverConfig) -> (Driver, Arc<FakeDatapath>, Arc<EmbeddedStore>) {
    let store = Arc::new(EmbeddedStore::in_memory());
    let fake = Arc::new(FakeDatapath::new());
    let d = Driver::new(store.clone(), fake.clone(), config);
    d.create_network(create_req(NET, "10.42.0.0/16", json!({}), false))
        .await
        .unwrap();
    (d, fake, store)
}

#[tokio::test]
async fn a_newer_endpoint_supersedes_a_never_joined_one_holding_its_address() {
    let (d, fake, _) = with_network(DriverConfig::default()).await;
    // Left behind when weft was killed between CreateEndpoint and Join.
    d.create_endpoint(endpoint_req(NET, EP, "10.42.0.77/16"))
        .await
        .unwrap();
    d.create_endpoint(endpoint_req(NET, EP2, "10.42.0.77/16"))
        .await
        .unwrap();
    let eps = d.endpoints().await.unwrap();
    assert_eq!(eps.len(), 1, "one record per address: {eps:?}");
    assert_eq!(eps[0].id, EP2);
    let links = fake.links();
    assert!(
        !links.contains("wfh9ab1c2d3e4f5") && links.contains("wfh7c0de0000000"),
        "the stale pair is gone, the new one is there: {links:?}"
    );
}

#[tokio::test]
async fn a_live_endpoint_keeps_its_address() {
    let (d, _, _) = with_network(DriverConfig::default()).await;
    create_and_join(&d, EP, "10.42.0.77/16").await;
    let err = d
        .create_endpoint(endpoint_req(NET, EP2, "10.42.0.77/16"))
        .await
        .unwrap_err();
    assert!(matches!(err, DriverError::Conflict(_)), "{err}");
    assert_eq!(d.endpoints().await.unwrap()[0].id, EP);
}

#[tokio::test]
async fn never_joined_endpoints_are_collected_after_the_grace() {
    let (d, fake, store) = with_network(DriverConfig {
        endpoint_grace: std::time::Duration::from_secs(60),
        ..DriverConfig::default()
    })
    .await;
    d.create_endpoint(endpoint_req(NET, EP, "10.42.0.5/16"))
        .await
        .unwrap();
    d.create_endpoint(endpoint_req(NET, EP2, "10.42.0.6/16"))
        .await
        .unwrap();
    assert_eq!(
        d.reconcile().await.unwrap().stale_endpoints,
        0,
        "young: kept"
    );
    // EP was created two minutes ago and never joined.
    let key = keys::endpoint(EP);
    store
        .modify_json::<EndpointRecord, DriverError, _>(&key, |ep| {
            Ok(ep.map(|mut ep| {
                ep.since -= 120;
                ep
            }))
        })
        .await
        .unwrap();
    assert_eq!(d.reconcile().await.unwrap().stale_endpoints, 1);
    let left: Vec<String> = d
        .endpoints()
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(left, [EP2]);
    assert!(!fake.links().contains("wfh9ab1c2d3e4f5"));
    let in_use = d.addresses_in_use().await.unwrap();
    assert_eq!(
        in_use
            .into_iter()
            .map(|(_, ip)| ip.to_string())
            .collect::<Vec<_>>(),
        ["10.42.0.6"]
    );
}

#[tokio::test]
async fn a_subnet_over_a_route_weft_did_not_add_is_refused_unless_allowed() {
    let (d, fake, _) = setup();
    fake.with(|s| s.host_routes = vec!["10.99.0.0/24".parse().unwrap()]);
    let err = d
        .create_network(create_req(NET, "10.99.0.0/16", json!({}), false))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, DriverError::Conflict(m) if m.contains("overlaps the host's route 10.99.0.0/24")),
        "{err}"
    );
    assert!(d.networks().await.unwrap().is_empty());
    d.create_network(create_req(
        NET,
        "10.99.0.0/16",
        json!({"weft.allow-route-overlap": "true"}),
        false,
    ))
    .await
    .expect("forced");
    let bad = d
        .create_network(create_req(
            &NET.replace("01", "02"),
            "10.98.0.0/16",
            json!({"weft.allow-route-overlap": "maybe"}),
            false,
        ))
        .await
        .unwrap_err();
    assert!(matches!(bad, DriverError::Invalid(_)), "{bad}");
}

/// A host taken for gone while cut off loses its overlay memberships; it puts itself
/// back for every network it still has (and only those), keeping the agreed name.
#[tokio::test]
async fn a_returning_host_restores_its_memberships() {
    let cluster = Arc::new(EmbeddedStore::in_memory());
    let d = host_on(&cluster, "h2");
    d.create_network(create_req(
        NET,
        "10.42.0.0/16",
        json!({"weft.network": "blue"}),
        false,
    ))
    .await
    .unwrap();
    assert_eq!(
        d.restore_memberships().await.unwrap(),
        0,
        "nothing to put right"
    );
    // The reclaim removed h2 (the last member, so the record went).
    let key = keys::overlay("10.42.0.0/16".parse().unwrap());
    cluster.delete(&key, None).await.unwrap();
    assert_eq!(d.restore_memberships().await.unwrap(), 1);
    let rec = cluster
        .get_json::<OverlayRecord>(&key)
        .await
        .unwrap()
        .unwrap()
        .value;
    assert_eq!(rec.hosts, ["h2".to_string()].into());
    assert_eq!(rec.name.as_deref(), Some("blue"));
}

/// A pass over healthy joined endpoints sets none of them up again: the cost of a
/// quiet host's passes grows with what changed, not with its containers. What the
/// kernel shows amiss is still repaired at once, and every THOROUGH_EVERY-th pass
/// sets everything up again.
#[tokio::test]
async fn quiet_reconcile_passes_touch_only_what_changed() {
    let (d, fake, _) = with_network(DriverConfig::default()).await;
    let ids: Vec<String> = (0..20u8).map(|i| format!("{i:02x}{}", &EP[2..])).collect();
    for (i, id) in ids.iter().enumerate() {
        d.create_endpoint(endpoint_req(NET, id, &format!("10.42.0.{}/16", i + 2)))
            .await
            .unwrap();
        d.join(join_req(NET, id)).await.unwrap();
    }
    d.reconcile().await.unwrap(); // the first pass is thorough
    let before = fake.with(|s| s.setups);
    for _ in 0..3 {
        d.reconcile().await.unwrap();
    }
    assert_eq!(
        fake.with(|s| s.setups),
        before,
        "quiet passes set endpoints up"
    );
    let (host_if, _) = link_names(&ids[7]).unwrap();
    fake.with(|s| s.damaged.insert(host_if.clone()));
    d.reconcile().await.unwrap();
    assert_eq!(fake.with(|s| s.setups), before + 1, "only the damaged one");
    assert!(!fake.with(|s| s.damaged.contains(&host_if)), "repaired");
    for _ in 5..THOROUGH_EVERY {
        d.reconcile().await.unwrap();
    }
    assert_eq!(fake.with(|s| s.setups), before + 1);
    d.reconcile().await.unwrap();
    assert_eq!(
        fake.with(|s| s.setups),
        before + 1 + ids.len(),
        "the thorough pass sets everything up"
    );
}

fn portmap(map: serde_json::Value) -> crate::protocol::OptionsMap {
    serde_json::from_value(json!({
        "com.docker.network.endpoint.exposedports": [],
        "com.docker.network.portmap": map
    }))
    .unwrap()
}

/// `-p 8080:80`.
fn tcp_8080_to_80() -> crate::protocol::OptionsMap {
    portmap(json!([{"Proto": 6, "Port": 80, "HostIP": "", "HostPort": 8080, "HostPortEnd": 8080}]))
}

/// Endpoint `ep` of `NET` created and joined at `addr` (a /16).
async fn create_and_join(d: &Driver, ep: &str, addr: &str) {
    d.create_endpoint(endpoint_req(NET, ep, addr))
        .await
        .unwrap();
    d.join(join_req(NET, ep)).await.unwrap();
}

/// A network with `EP` created and joined at 10.42.0.5.
async fn joined_endpoint() -> (Driver, Arc<FakeDatapath>, Arc<EmbeddedStore>) {
    let (d, fake, store) = with_network(DriverConfig::default()).await;
    create_and_join(&d, EP, "10.42.0.5/16").await;
    (d, fake, store)
}

fn published_in(fake: &FakeDatapath) -> Vec<String> {
    fake.with(|s| {
        s.synced
            .published
            .iter()
            .map(|(c, p)| format!("{}->{c}:{}", p, p.container_port))
            .collect()
    })
}

#[tokio::test]
async fn published_ports_are_kept_in_the_record_rendered_and_withdrawn_on_revoke() {
    let (d, fake, store) = joined_endpoint().await;
    let map = portmap(json!([
        {"Proto": 6, "IP": "", "Port": 80, "HostIP": "", "HostPort": 18080, "HostPortEnd": 18080},
        {"Proto": 17, "IP": "", "Port": 53, "HostIP": "127.0.0.1", "HostPort": 5300, "HostPortEnd": 5301},
        {"Proto": 6, "IP": "", "Port": 81, "HostIP": "", "HostPort": 0, "HostPortEnd": 0}
    ]));
    fake.with(|s| s.taken_ports.insert((crate::ports::Proto::Udp, 5300)));
    let got = d.program_external(NET, EP, &map).await.unwrap();
    assert_eq!(
        describe_ports(&got),
        "0.0.0.0:18080->80/tcp, 127.0.0.1:5301->53/udp, 0.0.0.0:49153->81/tcp"
    );
    assert_eq!(
        published_in(&fake),
        [
            "0.0.0.0:18080->80/tcp->10.42.0.5:80",
            "0.0.0.0:49153->81/tcp->10.42.0.5:81",
            "127.0.0.1:5301->53/udp->10.42.0.5:53"
        ]
    );
    // Asked again (Docker may do so), the same ports: the ephemeral one too.
    assert_eq!(d.program_external(NET, EP, &map).await.unwrap(), got);
    // A restarted weft renders them from the record (kill -9 loses nothing).
    let fresh = Arc::new(FakeDatapath::new());
    let restarted = Driver::new(store.clone(), fresh.clone(), DriverConfig::default());
    fresh.with(|s| s.links = fake.links());
    restarted.reconcile().await.unwrap();
    assert_eq!(published_in(&fresh), published_in(&fake));
    restarted.revoke_external(NET, EP).await.unwrap();
    assert!(published_in(&fresh).is_empty());
    assert!(restarted.endpoints().await.unwrap()[0].published.is_empty());
    // Revoking again, or for an unknown endpoint, is fine.
    restarted.revoke_external(NET, EP).await.unwrap();
    restarted
        .revoke_external(NET, &EP.replace('a', "b"))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_port_conflict_is_refused_naming_the_port_and_publishes_nothing() {
    let (d, fake, _) = joined_endpoint().await;
    let other = EP.replace("9ab1", "8ab1");
    create_and_join(&d, &other, "10.42.0.6/16").await;
    let one = |port: u16| json!({"Proto": 6, "Port": 80, "HostIP": "", "HostPort": port, "HostPortEnd": port});
    d.program_external(NET, EP, &portmap(json!([one(8080)])))
        .await
        .unwrap();
    let before = published_in(&fake);
    // Taken by weft for another container: refused, and its free port 9090 is not
    // published either.
    let err = d
        .program_external(NET, &other, &portmap(json!([one(9090), one(8080)])))
        .await
        .unwrap_err();
    assert!(matches!(err, DriverError::Conflict(_)), "{err}");
    assert!(
        err.to_string().contains("8080/tcp is already published"),
        "{err}"
    );
    // Held by a process of the host.
    fake.with(|s| s.taken_ports.insert((crate::ports::Proto::Tcp, 7070)));
    let err = d
        .program_external(NET, &other, &portmap(json!([one(7070)])))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("7070/tcp is in use by a process"),
        "{err}"
    );
    // A firewall that refuses the rules: the record is taken back too.
    fake.with(|s| s.fail_sync = true);
    assert!(d
        .program_external(NET, &other, &portmap(json!([one(9191)])))
        .await
        .is_err());
    fake.with(|s| s.fail_sync = false);
    let records = d.endpoints().await.unwrap();
    let theirs = records.iter().find(|e| e.id == other).unwrap();
    assert!(theirs.published.is_empty(), "{:?}", theirs.published);
    assert_eq!(published_in(&fake), before);
    // A port map that is not one is refused as invalid.
    let err = d
        .program_external(NET, &other, &portmap(json!("nonsense")))
        .await
        .unwrap_err();
    assert!(matches!(err, DriverError::Invalid(_)), "{err}");
}

#[tokio::test]
async fn leave_delete_endpoint_and_network_removal_leave_no_published_port() {
    let (d, fake, _) = joined_endpoint().await;
    let map = tcp_8080_to_80();
    d.program_external(NET, EP, &map).await.unwrap();
    // Leave without Revoke (a missed call): the ports go with the join.
    d.leave(NET, EP).await.unwrap();
    assert!(published_in(&fake).is_empty());
    d.join(join_req(NET, EP)).await.unwrap();
    d.program_external(NET, EP, &map).await.unwrap();
    assert_eq!(published_in(&fake).len(), 1);
    d.delete_endpoint(NET, EP).await.unwrap();
    assert!(published_in(&fake).is_empty());
    // A network removed with a publishing endpoint still on it.
    create_and_join(&d, EP, "10.42.0.5/16").await;
    d.program_external(NET, EP, &map).await.unwrap();
    d.delete_network(NET).await.unwrap();
    assert!(published_in(&fake).is_empty());
    assert_eq!(fake.with(|s| s.synced.clone()), DesiredState::default());
}

#[tokio::test]
async fn a_gone_containers_ports_do_not_block_its_restart() {
    // dockerd was killed: the container's namespace (and its link) went, but no Leave
    // or DeleteEndpoint came, so its record still holds port 8080.
    let (d, fake, _) = joined_endpoint().await;
    let map = tcp_8080_to_80();
    d.program_external(NET, EP, &map).await.unwrap();
    let gone = d.endpoints().await.unwrap().remove(0);
    fake.destroy_pair(&gone.host_if, &gone.container_if);
    let again = EP.replace("9ab1", "7ab1");
    create_and_join(&d, &again, "10.42.0.7/16").await;
    d.program_external(NET, &again, &map).await.unwrap();
    assert_eq!(
        endpoint_ids(&d).await,
        [again],
        "the gone container's record is forgotten"
    );
    assert_eq!(published_in(&fake), ["0.0.0.0:8080->80/tcp->10.42.0.7:80"]);
}

#[tokio::test]
async fn a_replayed_create_of_a_published_cluster_network_is_accepted() {
    let (d, _, _) = setup();
    let req = create_req(NET, "10.60.0.0/16", json!({"weft.scope": "cluster"}), false);
    d.create_network(req.clone()).await.unwrap();
    let member = ClusterState::Member { uid: "ab12".into() };
    assert!(d
        .set_cluster_state(NET, &ClusterState::Unpublished, member.clone())
        .await
        .unwrap());
    d.create_network(req).await.unwrap();
    assert_eq!(d.network(NET).await.unwrap().cluster, Some(member));
    // A different scope for the same ID is a different network.
    let local = create_req(NET, "10.60.0.0/16", json!({}), false);
    assert!(matches!(
        d.create_network(local).await,
        Err(DriverError::Conflict(_))
    ));
}

/// Whether cluster network "app" is recorded.
async fn recorded(cluster: &crate::store::switchable::Switchable) -> bool {
    cluster
        .get(&keys::cluster_network("app"))
        .await
        .unwrap()
        .is_some()
}

#[tokio::test]
async fn a_cluster_network_removed_while_the_cluster_store_is_down_loses_its_record_later() {
    let cluster = Arc::new(crate::store::switchable::Switchable::new());
    let (d, _, _) = setup();
    let d = d.with_cluster(cluster.clone(), "h1".into());
    // This host's copy of cluster network ab12.
    let copy = || {
        create_req(
            NET,
            "10.61.0.0/16",
            json!({"weft.scope": "cluster", "weft.cluster-uid": "ab12"}),
            false,
        )
    };
    let joining = ClusterState::Joining { uid: "ab12".into() };
    let member = ClusterState::Member { uid: "ab12".into() };
    d.create_network(copy()).await.unwrap();
    let record = crate::schema::ClusterNetworkRecord {
        uid: "ab12".into(),
        spec: crate::schema::ClusterNetworkSpec {
            name: "app".into(),
            driver: "weft".into(),
            ipam_driver: "weft".into(),
            subnet: "10.61.0.0/16".parse().unwrap(),
            ip_range: None,
            ipam_options: Default::default(),
            gateway: None,
            aux_addresses: Default::default(),
            internal: false,
            options: Default::default(),
            labels: Default::default(),
        },
        origin_host: "h2".into(),
        origin_network: "x".into(),
    };
    cluster
        .create_json(&keys::cluster_network("app"), &record)
        .await
        .unwrap();
    // dockerd rolling back its create of this copy removes no record.
    d.delete_network(NET).await.unwrap();
    assert!(recorded(&cluster).await);
    d.create_network(copy()).await.unwrap();
    d.set_cluster_state(NET, &joining, member.clone())
        .await
        .unwrap();
    // dockerd removes the network whatever weft answers: the removal completes here
    // and the record goes once the cluster store answers.
    cluster
        .down
        .store(true, std::sync::atomic::Ordering::SeqCst);
    // (It answers an error: the overlay membership could not be left either.)
    let _ = d.delete_network(NET).await;
    assert!(d.network(NET).await.is_err(), "removed here");
    assert_eq!(d.retry_cluster_removals().await.unwrap(), ["ab12"]);
    cluster
        .down
        .store(false, std::sync::atomic::Ordering::SeqCst);
    assert!(recorded(&cluster).await);
    assert!(d.retry_cluster_removals().await.unwrap().is_empty());
    assert!(!recorded(&cluster).await);
    assert!(d.retry_cluster_removals().await.unwrap().is_empty());

    // A withdrawn network's removal touches no record (a later network of the name).
    d.create_network(copy()).await.unwrap();
    d.set_cluster_state(NET, &joining, member.clone())
        .await
        .unwrap();
    let later = crate::schema::ClusterNetworkRecord {
        uid: "cd34".into(),
        ..record
    };
    cluster
        .create_json(&keys::cluster_network("app"), &later)
        .await
        .unwrap();
    d.set_cluster_state(NET, &member, ClusterState::Withdrawn { uid: "ab12".into() })
        .await
        .unwrap();
    d.delete_network(NET).await.unwrap();
    assert!(recorded(&cluster).await);
}

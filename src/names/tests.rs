use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::cluster::fake::MemoryLeases;
use crate::datapath::fake::FakeDatapath;
use crate::driver::DriverConfig;
use crate::engine::fake::FakeEngine;
use crate::engine::ContainerEndpoint;
use crate::store::embedded::EmbeddedStore;

const NET: &str = "5f3c000000000000000000000000000000000000000000000000000000000001";
const EP1: &str = "e100000000000000000000000000000000000000000000000000000000000001";
const EP2: &str = "e200000000000000000000000000000000000000000000000000000000000002";

struct Host {
    leases: Arc<MemoryLeases>,
    driver: Arc<Driver>,
    engine: Arc<FakeEngine>,
    names: NamePublisher,
}

async fn host() -> Host {
    let store = Arc::new(EmbeddedStore::in_memory());
    let driver = Arc::new(
        Driver::new(
            store.clone(),
            Arc::new(FakeDatapath::new()),
            DriverConfig::default(),
        )
        .with_cluster(store, "h1".into()),
    );
    driver
        .create_network(
            serde_json::from_value(serde_json::json!({
                "NetworkID": NET,
                "Options": {},
                "IPv4Data": [{"Pool": "10.60.0.0/24", "Gateway": "10.60.0.1/24"}],
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let leases = Arc::new(MemoryLeases::default());
    let engine = Arc::new(FakeEngine::default());
    Host {
        names: NamePublisher::new("h1".into(), leases.clone(), driver.clone(), engine.clone()),
        leases,
        driver,
        engine,
    }
}

impl Host {
    async fn register(&self) -> LeaseId {
        let lease = self.leases.grant(Duration::from_secs(4)).await.unwrap();
        self.leases
            .put("hosts/h1", b"{}".to_vec(), lease)
            .await
            .unwrap();
        lease
    }

    /// A container with `names` on the network, joined at `address`.
    async fn run(&self, ep: &str, address: &str, names: &[&str]) {
        let create = serde_json::json!({"NetworkID": NET, "EndpointID": ep, "Interface": {"Address": format!("{address}/24"), "AddressIPv6": "", "MacAddress": ""}, "Options": {}});
        self.driver
            .create_endpoint(serde_json::from_value(create).unwrap())
            .await
            .unwrap();
        let join = serde_json::json!({"NetworkID": NET, "EndpointID": ep, "SandboxKey": "/var/run/docker/netns/x", "Options": null});
        self.driver
            .join(serde_json::from_value(join).unwrap())
            .await
            .unwrap();
        self.engine
            .endpoints
            .lock()
            .unwrap()
            .push(ContainerEndpoint {
                container: ep[..12].to_string(),
                endpoint_id: ep.to_string(),
                names: names.iter().map(|n| n.to_string()).collect(),
            });
    }

    fn record(&self) -> Option<NamesRecord> {
        self.leases
            .get("names/10.60.0.0_24/h1")
            .map(|(v, _)| serde_json::from_slice(&v).unwrap())
    }
}

#[tokio::test]
async fn names_of_joined_containers_are_published_on_the_hosts_lease() {
    let h = host().await;
    h.run(EP1, "10.60.0.2", &["web", "frontend"]).await;
    // Not registered yet: nothing to bind the names to.
    h.names.pass().await.unwrap();
    assert_eq!(h.record(), None);

    let lease = h.register().await;
    h.names.pass().await.unwrap();
    let record = h.record().expect("published");
    assert_eq!(
        record.entries,
        [NameEntry {
            address: "10.60.0.2".parse().unwrap(),
            container: EP1[..12].to_string(),
            names: BTreeSet::from(["web".to_string(), "frontend".to_string()]),
        }]
    );
    assert_eq!(h.leases.get("names/10.60.0.0_24/h1").unwrap().1, lease);

    // Containers of other drivers' networks, and unjoined endpoints, have no names here.
    h.engine.endpoints.lock().unwrap().push(ContainerEndpoint {
        container: "b0b0b0b0b0b0".into(),
        endpoint_id: "not-weft".into(),
        names: BTreeSet::from(["other".to_string()]),
    });
    h.names.pass().await.unwrap();
    assert_eq!(h.record().unwrap().entries.len(), 1);
}

#[tokio::test]
async fn names_go_when_their_container_leaves_and_come_back_on_a_new_lease() {
    let h = host().await;
    let first = h.register().await;
    h.run(EP1, "10.60.0.2", &["web"]).await;
    h.run(EP2, "10.60.0.3", &["db"]).await;
    h.names.pass().await.unwrap();
    assert_eq!(h.record().unwrap().entries.len(), 2);

    h.driver.leave(NET, EP2).await.unwrap();
    h.names.pass().await.unwrap();
    let names: Vec<_> = h
        .record()
        .unwrap()
        .entries
        .into_iter()
        .flat_map(|e| e.names)
        .collect();
    assert_eq!(names, ["web"]);

    h.driver.leave(NET, EP1).await.unwrap();
    h.names.pass().await.unwrap();
    assert_eq!(h.record(), None, "no named container left: the record goes");

    // The host's lease expired (cut off); registered again, its names are written again.
    h.driver
        .join(serde_json::from_value(serde_json::json!({"NetworkID": NET, "EndpointID": EP1, "SandboxKey": "/x", "Options": null})).unwrap())
        .await
        .unwrap();
    h.names.pass().await.unwrap();
    assert!(h.record().is_some());
    h.leases.expire(first);
    assert_eq!(h.record(), None, "gone with the lease");
    let second = h.register().await;
    h.names.pass().await.unwrap();
    assert_eq!(h.leases.get("names/10.60.0.0_24/h1").unwrap().1, second);
}

//! In-memory [`Engine`] for tests: a dockerd's list of networks. Given a driver, it
//! calls the driver's CreateNetwork and DeleteNetwork inside its own create and
//! remove, as dockerd does.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::{ContainerEndpoint, Engine, EngineError, EngineNetwork, Removal};
use crate::driver::Driver;
use crate::protocol::network::{CreateNetworkRequest, IpamData};
use crate::schema::ClusterNetworkSpec;

#[derive(Default)]
pub struct FakeEngine {
    pub networks: Mutex<Vec<EngineNetwork>>,
    /// Running containers' endpoints.
    pub endpoints: Mutex<Vec<ContainerEndpoint>>,
    /// IDs of networks containers still use: removing them is refused.
    pub in_use: Mutex<BTreeSet<String>>,
    /// dockerd is down: every call fails.
    pub down: std::sync::atomic::AtomicBool,
    pub creates: std::sync::atomic::AtomicUsize,
    /// Every create is refused (as for a driver name dockerd does not know).
    pub refuse_creates: std::sync::atomic::AtomicBool,
    driver: Option<Arc<Driver>>,
    next_id: std::sync::atomic::AtomicUsize,
}

impl FakeEngine {
    /// A dockerd that hands its weft networks to `driver`.
    pub fn with_driver(driver: Arc<Driver>) -> Self {
        Self {
            driver: Some(driver),
            ..Default::default()
        }
    }

    /// A user's `docker network create` of `spec`: returns the ID. The driver is
    /// weft's when `spec.driver` starts with `weft`.
    pub async fn user_creates(&self, spec: ClusterNetworkSpec) -> String {
        use std::sync::atomic::Ordering::SeqCst;
        let id = format!("{:064x}", 0xd0c0_0000 + self.next_id.fetch_add(1, SeqCst));
        if spec.driver.starts_with("weft") {
            if let Some(d) = &self.driver {
                d.create_network(create_request(&id, &spec))
                    .await
                    .expect("the driver takes the network");
            }
        }
        self.networks.lock().unwrap().push(EngineNetwork {
            id: id.clone(),
            name: spec.name.clone(),
            driver: spec.driver.clone(),
            spec: Some(spec),
        });
        id
    }

    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .networks
            .lock()
            .unwrap()
            .iter()
            .map(|n| n.name.clone())
            .collect();
        names.sort();
        names
    }

    pub fn by_name(&self, name: &str) -> Option<EngineNetwork> {
        self.networks
            .lock()
            .unwrap()
            .iter()
            .find(|n| n.name == name)
            .cloned()
    }

    fn check_up(&self) -> Result<(), EngineError> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(EngineError::Refused("cannot connect to dockerd".into()));
        }
        Ok(())
    }
}

/// What dockerd sends the driver for a network of `spec`.
fn create_request(id: &str, spec: &ClusterNetworkSpec) -> CreateNetworkRequest {
    let generic: serde_json::Map<String, serde_json::Value> = spec
        .options
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    let mut options = crate::protocol::OptionsMap::new();
    options.insert("com.docker.network.generic".into(), generic.into());
    options.insert("com.docker.network.internal".into(), spec.internal.into());
    CreateNetworkRequest {
        network_id: id.to_string(),
        options,
        ipv4_data: vec![IpamData {
            pool: spec.subnet.to_string(),
            gateway: spec
                .gateway
                .map(|g| format!("{g}/{}", spec.subnet.prefix()))
                .unwrap_or_default(),
            ..Default::default()
        }],
        ipv6_data: vec![],
    }
}

#[async_trait]
impl Engine for FakeEngine {
    async fn container_endpoints(
        &self,
        wanted: &BTreeSet<String>,
    ) -> Result<Vec<ContainerEndpoint>, EngineError> {
        self.check_up()?;
        let all = self.endpoints.lock().unwrap().clone();
        Ok(all
            .into_iter()
            .filter(|e| wanted.contains(&e.endpoint_id))
            .collect())
    }

    async fn networks(&self) -> Result<Vec<EngineNetwork>, EngineError> {
        self.check_up()?;
        Ok(self.networks.lock().unwrap().clone())
    }

    async fn create_network(&self, spec: &ClusterNetworkSpec) -> Result<String, EngineError> {
        self.check_up()?;
        if self.by_name(&spec.name).is_some() {
            return Err(EngineError::Refused(format!(
                "network with name {} already exists",
                spec.name
            )));
        }
        self.creates
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if self
            .refuse_creates
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            return Err(EngineError::Refused(format!(
                "could not resolve driver {} in registry",
                spec.driver
            )));
        }
        Ok(self.user_creates(spec.clone()).await)
    }

    async fn remove_network(&self, id: &str) -> Result<Removal, EngineError> {
        self.check_up()?;
        if self.in_use.lock().unwrap().contains(id) {
            return Ok(Removal::InUse(format!(
                "error while removing network: network {id} has active endpoints"
            )));
        }
        let Some(n) = self
            .networks
            .lock()
            .unwrap()
            .iter()
            .find(|n| n.id == id)
            .cloned()
        else {
            return Ok(Removal::Gone);
        };
        // dockerd removes the network whatever the driver answers.
        if let (Some(d), true) = (&self.driver, n.driver.starts_with("weft")) {
            let _ = d.delete_network(id).await;
        }
        self.networks.lock().unwrap().retain(|n| n.id != id);
        Ok(Removal::Removed)
    }
}

//! The Docker Engine API of this host's dockerd, for what no plugin call carries (a
//! network's name) and for creating and removing cluster networks. Never called from
//! a plugin request handler: dockerd waits for the plugin while it handles the call.

pub mod fake;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use async_trait::async_trait;
use bollard::models::{Ipam, IpamConfig, Network, NetworkCreateRequest};
use bollard::Docker;

use crate::schema::ClusterNetworkSpec;

/// What weft asks of dockerd; [`fake::FakeEngine`] stands in for it in tests.
#[async_trait]
pub trait Engine: Send + Sync + 'static {
    /// Every network dockerd has.
    async fn networks(&self) -> Result<Vec<EngineNetwork>, EngineError>;
    /// Creates a weft network as `docker network create -d weft --ipam-driver weft`
    /// would; returns its ID.
    async fn create_network(&self, spec: &ClusterNetworkSpec) -> Result<String, EngineError>;
    /// Removes a network by ID, unless containers still use it.
    async fn remove_network(&self, id: &str) -> Result<Removal, EngineError>;
    /// The endpoints among `wanted` (endpoint IDs) of running containers, with the
    /// names each answers to there.
    async fn container_endpoints(
        &self,
        wanted: &BTreeSet<String>,
    ) -> Result<Vec<ContainerEndpoint>, EngineError>;
}

/// A running container's endpoint on one network, as dockerd lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerEndpoint {
    /// The container's short ID.
    pub container: String,
    pub endpoint_id: String,
    /// Its name, its network aliases (compose service names among them; dockerd
    /// 20.10 adds the short ID) and, on dockerd 25 and later, every DNS name dockerd
    /// gives it there (its hostname too).
    pub names: BTreeSet<String>,
}

/// A network as dockerd lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineNetwork {
    pub id: String,
    pub name: String,
    pub driver: String,
    /// Its settings as a cluster network would take them; `None` when it has not
    /// exactly one IPv4 subnet.
    pub spec: Option<ClusterNetworkSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removal {
    Removed,
    /// It was not there (any more).
    Gone,
    /// dockerd refused: containers still use it (its words).
    InUse(String),
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("docker engine: {0}")]
    Api(#[from] bollard::errors::Error),
    #[error("docker engine: {0}")]
    Refused(String),
}

pub struct DockerEngine {
    socket: String,
    docker: std::sync::Mutex<Option<Docker>>,
}

impl DockerEngine {
    /// `socket`: a path or `unix://` URL of dockerd's API socket. Connects on first
    /// use, and again after a failure: dockerd may come up after weft, and restart.
    pub fn new(socket: &str) -> Self {
        Self {
            socket: socket.to_string(),
            docker: std::sync::Mutex::new(None),
        }
    }

    /// A connection at the newest API version both sides speak (dockerd 20.10: 1.41;
    /// newer dockerds refuse versions that old).
    async fn docker(&self) -> Result<Docker, EngineError> {
        if let Some(d) = self
            .docker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            return Ok(d.clone());
        }
        let d = Docker::connect_with_unix(&self.socket, 30, bollard::API_DEFAULT_VERSION)?
            .negotiate_version()
            .await?;
        *self.docker.lock().unwrap_or_else(|p| p.into_inner()) = Some(d.clone());
        Ok(d)
    }

    /// Keeps a working connection; drops one that failed to talk to dockerd.
    fn checked<T>(
        &self,
        result: Result<T, bollard::errors::Error>,
    ) -> Result<T, bollard::errors::Error> {
        if result.as_ref().is_err_and(|e| status_of(e).is_none()) {
            *self.docker.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
        result
    }
}

/// Reads the settings of a network with one IPv4 subnet.
fn spec_of(n: &Network, name: &str) -> Option<ClusterNetworkSpec> {
    let configs = n.ipam.as_ref()?.config.as_ref()?;
    let [config] = configs.as_slice() else {
        return None;
    };
    let parse_ip = |s: &Option<String>| {
        s.as_deref()
            .filter(|s| !s.is_empty())
            .and_then(|s| s.split('/').next()?.parse().ok())
    };
    let sorted = |m: &Option<HashMap<String, String>>| {
        m.iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<BTreeMap<_, _>>()
    };
    Some(ClusterNetworkSpec {
        name: name.to_string(),
        driver: n.driver.clone().unwrap_or_default(),
        ipam_driver: n.ipam.as_ref()?.driver.clone().unwrap_or_default(),
        subnet: config.subnet.as_deref()?.parse().ok()?,
        ip_range: config
            .ip_range
            .as_deref()
            .filter(|s| !s.is_empty())
            .map(str::parse)
            .transpose()
            .ok()?,
        gateway: parse_ip(&config.gateway),
        ipam_options: sorted(&n.ipam.as_ref()?.options),
        aux_addresses: config
            .auxiliary_addresses
            .iter()
            .flatten()
            .filter_map(|(k, v)| Some((k.clone(), v.split('/').next()?.parse().ok()?)))
            .collect(),
        internal: n.internal.unwrap_or(false),
        options: sorted(&n.options),
        labels: sorted(&n.labels),
    })
}

fn status_of(e: &bollard::errors::Error) -> Option<u16> {
    match e {
        bollard::errors::Error::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

#[async_trait]
impl Engine for DockerEngine {
    async fn container_endpoints(
        &self,
        wanted: &BTreeSet<String>,
    ) -> Result<Vec<ContainerEndpoint>, EngineError> {
        let docker = self.docker().await?;
        let list = self.checked(
            docker
                .list_containers(None::<bollard::query_parameters::ListContainersOptions>)
                .await,
        )?;
        let mut found = Vec::new();
        for c in &list {
            let Some(id) = c.id.as_deref() else { continue };
            let listed = c
                .network_settings
                .as_ref()
                .and_then(|s| s.networks.as_ref());
            let ours = listed
                .into_iter()
                .flatten()
                .any(|(_, e)| e.endpoint_id.as_ref().is_some_and(|ep| wanted.contains(ep)));
            if !ours {
                continue;
            }
            let full = match docker
                .inspect_container(
                    id,
                    None::<bollard::query_parameters::InspectContainerOptions>,
                )
                .await
            {
                Ok(full) => full,
                Err(e) if status_of(&e) == Some(404) => continue, // gone since the list
                Err(e) => return Err(self.checked::<()>(Err(e)).unwrap_err().into()),
            };
            let networks = full
                .network_settings
                .as_ref()
                .and_then(|s| s.networks.as_ref());
            found.extend(
                endpoints_of(id, full.name.as_deref(), networks)
                    .into_iter()
                    .filter(|e| wanted.contains(&e.endpoint_id)),
            );
        }
        Ok(found)
    }

    async fn networks(&self) -> Result<Vec<EngineNetwork>, EngineError> {
        let list = self.checked(
            self.docker()
                .await?
                .list_networks(None::<bollard::query_parameters::ListNetworksOptions>)
                .await,
        )?;
        Ok(list
            .iter()
            .filter_map(|n| {
                let name = n.name.clone()?;
                Some(EngineNetwork {
                    id: n.id.clone()?,
                    driver: n.driver.clone().unwrap_or_default(),
                    spec: spec_of(n, &name),
                    name,
                })
            })
            .collect())
    }

    async fn create_network(&self, spec: &ClusterNetworkSpec) -> Result<String, EngineError> {
        let request = NetworkCreateRequest {
            name: spec.name.clone(),
            driver: Some(spec.driver.clone()),
            internal: Some(spec.internal),
            ipam: Some(Ipam {
                driver: Some(spec.ipam_driver.clone()),
                config: Some(vec![IpamConfig {
                    subnet: Some(spec.subnet.to_string()),
                    ip_range: spec.ip_range.map(|r| r.to_string()),
                    gateway: spec.gateway.map(|g| g.to_string()),
                    auxiliary_addresses: (!spec.aux_addresses.is_empty()).then(|| {
                        spec.aux_addresses
                            .iter()
                            .map(|(k, v)| (k.clone(), v.to_string()))
                            .collect()
                    }),
                }]),
                options: (!spec.ipam_options.is_empty())
                    .then(|| spec.ipam_options.clone().into_iter().collect()),
            }),
            options: Some(spec.options.clone().into_iter().collect()),
            labels: Some(spec.labels.clone().into_iter().collect()),
            ..Default::default()
        };
        let created = self.checked(self.docker().await?.create_network(request).await)?;
        Ok(created.id)
    }

    async fn remove_network(&self, id: &str) -> Result<Removal, EngineError> {
        match self.checked(self.docker().await?.remove_network(id).await) {
            Ok(()) => Ok(Removal::Removed),
            Err(e) if status_of(&e) == Some(404) => Ok(Removal::Gone),
            // "error while removing network: network … has active endpoints"
            Err(e) if matches!(status_of(&e), Some(403 | 409)) => Ok(Removal::InUse(match e {
                bollard::errors::Error::DockerResponseServerError { message, .. } => message,
                other => other.to_string(),
            })),
            Err(e) => Err(e.into()),
        }
    }
}

/// A container's endpoints from its inspection (the list carries no aliases).
fn endpoints_of(
    id: &str,
    name: Option<&str>,
    networks: Option<&HashMap<String, bollard::models::EndpointSettings>>,
) -> Vec<ContainerEndpoint> {
    let short = id.get(..12).unwrap_or(id).to_string();
    let own = name.map(|n| n.trim_start_matches('/').to_string());
    networks
        .into_iter()
        .flatten()
        .filter_map(|(_, e)| {
            let names = own
                .iter()
                .chain(e.aliases.iter().flatten())
                .chain(e.dns_names.iter().flatten())
                .filter(|n| !n.is_empty())
                .cloned()
                .collect();
            Some(ContainerEndpoint {
                container: short.clone(),
                endpoint_id: e.endpoint_id.clone().filter(|e| !e.is_empty())?,
                names,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against a real dockerd: `WEFT_TEST_DOCKER=/path/docker.sock cargo test -- --ignored engine`.
    #[tokio::test]
    #[ignore = "needs a dockerd socket in WEFT_TEST_DOCKER"]
    async fn engine_lists_networks_of_dockerd() {
        let socket = std::env::var("WEFT_TEST_DOCKER").expect("WEFT_TEST_DOCKER");
        let engine = DockerEngine::new(&socket);
        let networks = engine.networks().await.unwrap();
        let bridge = networks
            .iter()
            .find(|n| n.name == "bridge")
            .expect("bridge");
        assert_eq!(bridge.driver, "bridge");
        assert!(bridge.spec.is_some(), "{bridge:?}");
        assert_eq!(
            engine.remove_network("no-such-network").await.unwrap(),
            Removal::Gone
        );
    }
}

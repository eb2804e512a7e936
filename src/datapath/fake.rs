//! In-memory [`Datapath`] for tests: tracks links and the last synced state, and can
//! be told to fail, so driver logic (rollback, idempotency, reconcile) is testable
//! without root.

use std::collections::BTreeSet;
use std::sync::Mutex;

use async_trait::async_trait;
use ipnetwork::Ipv4Network;

use super::{Datapath, DatapathError, DesiredState, EndpointSpec};

#[derive(Debug, Default)]
pub struct FakeState {
    pub links: BTreeSet<String>,
    pub synced: DesiredState,
    pub host_routes: Vec<Ipv4Network>,
    pub underlay_mtu: u32,
    pub fail_setup: bool,
    pub fail_sync: bool,
    pub setups: usize,
    pub resyncs: usize,
    pub tunnel_routes: Vec<Ipv4Network>,
    /// Makes every `setup_endpoint` take this long (a slow kernel).
    pub setup_delay: Option<std::time::Duration>,
    /// Host ends whose state was changed behind weft's back (down, lost route), until
    /// the next setup.
    pub damaged: BTreeSet<String>,
    /// Host ports a process of the host holds.
    pub taken_ports: BTreeSet<(crate::ports::Proto, u16)>,
}

#[derive(Debug, Default)]
pub struct FakeDatapath {
    pub state: Mutex<FakeState>,
}

impl FakeDatapath {
    pub fn new() -> Self {
        let fake = Self::default();
        fake.state.lock().unwrap().underlay_mtu = 1500;
        fake
    }

    pub fn with<R>(&self, f: impl FnOnce(&mut FakeState) -> R) -> R {
        f(&mut self.state.lock().unwrap())
    }

    pub fn links(&self) -> BTreeSet<String> {
        self.with(|s| s.links.clone())
    }

    /// What a container's death does: the veth pair vanishes with its namespace.
    pub fn destroy_pair(&self, host_if: &str, container_if: &str) {
        self.with(|s| {
            s.links.remove(host_if);
            s.links.remove(container_if);
        });
    }
}

#[async_trait]
impl Datapath for FakeDatapath {
    async fn underlay_mtu(&self) -> Result<u32, DatapathError> {
        Ok(self.with(|s| s.underlay_mtu))
    }

    async fn host_routes(&self) -> Result<Vec<Ipv4Network>, DatapathError> {
        Ok(self.with(|s| s.host_routes.clone()))
    }

    async fn setup_endpoint(&self, ep: &EndpointSpec) -> Result<(), DatapathError> {
        if let Some(delay) = self.with(|s| s.setup_delay) {
            tokio::time::sleep(delay).await;
        }
        self.with(|s| {
            if s.fail_setup {
                return Err(DatapathError::PermissionDenied {
                    what: format!("create {}", ep.host_if),
                });
            }
            s.setups += 1;
            s.damaged.remove(&ep.host_if);
            s.links.insert(ep.host_if.clone());
            s.links.insert(ep.container_if.clone());
            Ok(())
        })
    }

    async fn teardown_endpoint(&self, ep: &EndpointSpec) -> Result<(), DatapathError> {
        self.destroy_pair(&ep.host_if, &ep.container_if);
        Ok(())
    }

    async fn host_link_exists(&self, host_if: &str) -> Result<bool, DatapathError> {
        Ok(self.with(|s| s.links.contains(host_if)))
    }

    async fn endpoint_links(&self) -> Result<Vec<String>, DatapathError> {
        Ok(self.links().into_iter().collect())
    }

    async fn endpoints_needing_setup(
        &self,
        endpoints: &[EndpointSpec],
    ) -> Result<BTreeSet<String>, DatapathError> {
        Ok(self.with(|s| {
            endpoints
                .iter()
                .filter(|e| !s.links.contains(&e.host_if) || s.damaged.contains(&e.host_if))
                .map(|e| e.host_if.clone())
                .collect()
        }))
    }

    async fn delete_link(&self, name: &str) -> Result<(), DatapathError> {
        self.with(|s| {
            if s.links.remove(name) {
                Ok(())
            } else {
                Err(DatapathError::NotFound {
                    what: name.to_string(),
                })
            }
        })
    }

    async fn sync_tunnel_routes(
        &self,
        _tunnel_if: &str,
        blocks: &[Ipv4Network],
    ) -> Result<(), DatapathError> {
        self.with(|s| s.tunnel_routes = blocks.to_vec());
        Ok(())
    }

    async fn change_tunnel_routes(
        &self,
        _tunnel_if: &str,
        add: &[Ipv4Network],
        remove: &[Ipv4Network],
    ) -> Result<(), DatapathError> {
        self.with(|s| {
            s.tunnel_routes.retain(|r| !remove.contains(r));
            for r in add {
                if !s.tunnel_routes.contains(r) {
                    s.tunnel_routes.push(*r);
                }
            }
            s.tunnel_routes.sort();
        });
        Ok(())
    }

    async fn default_address(&self) -> Result<Option<std::net::Ipv4Addr>, DatapathError> {
        Ok(Some(std::net::Ipv4Addr::new(192, 0, 2, 10)))
    }

    fn host_port_free(
        &self,
        proto: crate::ports::Proto,
        _ip: Option<std::net::Ipv4Addr>,
        port: u16,
    ) -> Result<bool, DatapathError> {
        Ok(self.with(|s| !s.taken_ports.contains(&(proto, port))))
    }

    async fn resync(&self, desired: &DesiredState) -> Result<(), DatapathError> {
        self.with(|s| s.resyncs += 1);
        self.sync(desired).await
    }

    async fn sync(&self, desired: &DesiredState) -> Result<(), DatapathError> {
        self.with(|s| {
            if s.fail_sync {
                return Err(DatapathError::Firewall("injected failure".into()));
            }
            s.synced = desired.clone();
            Ok(())
        })
    }
}

//! Names across hosts (issue 12, part 2, first step): every host publishes the names
//! of its containers on each weft network (`names/<subnet>/<host>`) on its own lease,
//! so they vanish with the host. Docker tells a driver no container name: they come
//! from this host's dockerd ([`Engine::container_endpoints`]), matched to weft's own
//! endpoints by endpoint ID (the address is weft's, the authority on it).
//! [`resolver`] answers containers' queries for them from every host's records.

pub mod directory;
pub mod resolver;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnetwork::Ipv4Network;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::cluster::{LeaseId, Leases, MembershipError};
use crate::driver::{Driver, DriverError};
use crate::engine::{Engine, EngineError};
use crate::schema::{keys, NameEntry, NamesRecord};
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum NamesError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Membership(#[from] MembershipError),
    #[error(transparent)]
    Driver(#[from] DriverError),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// What this host last wrote: on which lease, and which records.
#[derive(Default)]
struct Written {
    passes: u64,
    lease: Option<LeaseId>,
    records: BTreeMap<Ipv4Network, NamesRecord>,
}

/// Every this many passes, every record is written again.
const REWRITE_EVERY: u64 = 60;

pub struct NamePublisher {
    host: String,
    leases: Arc<dyn Leases>,
    driver: Arc<Driver>,
    engine: Arc<dyn Engine>,
    wake: Arc<Notify>,
    written: tokio::sync::Mutex<Written>,
    /// The names this host publishes, as of the last pass (for `weft status`).
    published: Mutex<BTreeMap<Ipv4Network, NamesRecord>>,
}

impl NamePublisher {
    pub fn new(
        host: String,
        leases: Arc<dyn Leases>,
        driver: Arc<Driver>,
        engine: Arc<dyn Engine>,
    ) -> Self {
        Self {
            host,
            leases,
            wake: driver.endpoint_changes(),
            driver,
            engine,
            written: Default::default(),
            published: Default::default(),
        }
    }

    /// Publishes until the process ends: soon after a container joins or leaves (a
    /// joined container shows in dockerd's list once it runs), else every `every`.
    pub async fn run(self: Arc<Self>, every: Duration) {
        let mut failing = false;
        loop {
            match self.pass().await {
                Ok(()) => failing = false,
                Err(e) if !failing => {
                    warn!(error = %e, "container names not published; retrying");
                    failing = true;
                }
                Err(e) => debug!(error = %e, "container names not published"),
            }
            tokio::select! {
                _ = self.wake.notified() => {
                    // Again over the next seconds: dockerd lists a container once it
                    // has started, after its Join.
                    for _ in 0..4 {
                        tokio::time::sleep(Duration::from_millis(250)).await;
                        if let Err(e) = self.pass().await {
                            debug!(error = %e, "container names not published");
                        }
                    }
                }
                _ = tokio::time::sleep(every) => {}
            }
        }
    }

    /// What this host should publish: per network, its joined containers' names.
    async fn desired(&self) -> Result<BTreeMap<Ipv4Network, NamesRecord>, NamesError> {
        let networks = self.driver.networks().await?;
        let endpoints = self.driver.endpoints().await?;
        let mut desired: BTreeMap<Ipv4Network, NamesRecord> = BTreeMap::new();
        let joined = endpoints
            .iter()
            .filter(|e| e.joined)
            .map(|e| e.id.clone())
            .collect();
        for c in self.engine.container_endpoints(&joined).await? {
            let Some(ep) = endpoints.iter().find(|e| e.joined && e.id == c.endpoint_id) else {
                continue; // another driver's network, or not joined (any more)
            };
            let Some(net) = networks.iter().find(|n| n.id == ep.network_id) else {
                continue;
            };
            desired
                .entry(net.subnet)
                .or_default()
                .entries
                .push(NameEntry {
                    address: ep.address,
                    container: c.container,
                    names: c.names,
                });
        }
        for record in desired.values_mut() {
            record.entries.sort();
        }
        Ok(desired)
    }

    /// One pass: writes the records that changed (all of them on a new lease) and
    /// deletes those of networks where this host has no named container any more.
    pub async fn pass(&self) -> Result<(), NamesError> {
        let mut written = self.written.lock().await;
        let Some(lease) = self.leases.lease_of(&keys::host(&self.host)).await? else {
            return Ok(()); // not registered (yet, or again): nothing to bind names to
        };
        let desired = self.desired().await?;
        // Everything again on a new lease, and now and then (a record deleted behind
        // this host's back comes back).
        written.passes += 1;
        let fresh_lease =
            written.lease != Some(lease) || written.passes.is_multiple_of(REWRITE_EVERY);
        for (subnet, record) in &desired {
            if fresh_lease || written.records.get(subnet) != Some(record) {
                let value = serde_json::to_vec(record).expect("names serialise");
                self.leases
                    .put(&keys::names(*subnet, &self.host), value, lease)
                    .await?;
                debug!(%subnet, names = record.entries.len(), "container names published");
                written.records.insert(*subnet, record.clone());
            }
        }
        let gone: Vec<Ipv4Network> = written
            .records
            .keys()
            .filter(|s| !desired.contains_key(s))
            .copied()
            .collect();
        for subnet in gone {
            self.leases.delete(&keys::names(subnet, &self.host)).await?;
            written.records.remove(&subnet);
        }
        if fresh_lease {
            info!(
                lease,
                networks = desired.len(),
                "container names published on this host's lease"
            );
        }
        written.lease = Some(lease);
        *self.published.lock().unwrap_or_else(|p| p.into_inner()) = desired;
        Ok(())
    }

    /// The names this host published in its last pass.
    pub fn published(&self) -> BTreeMap<Ipv4Network, NamesRecord> {
        self.published
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests;

//! Port publishing (`docker run -p`): ProgramExternalConnectivity and
//! RevokeExternalConnectivity. What an endpoint publishes lives in its record, so it
//! survives restarts, and the firewall is rendered from the records: every sync (the
//! reconciler's too) puts the rules back as the records say.

use tracing::{info, instrument, warn};

use super::{lock_keys, short, Driver, DriverError, EndpointRecord};
use crate::datapath::DatapathError;
use crate::ports::{self, PortError, Published};
use crate::protocol::OptionsMap;
use crate::schema::keys;
use crate::store::StoreExt;

impl From<PortError> for DriverError {
    fn from(e: PortError) -> Self {
        match e {
            PortError::Invalid(_) => DriverError::Invalid(e.to_string()),
            _ => DriverError::Conflict(e.to_string()),
        }
    }
}

impl Driver {
    /// Publishes the port map in `options` (the container's `-p`/`-P`) to this
    /// endpoint, replacing what it published before: every port or none.
    #[instrument(skip_all, fields(network = %short(network_id), endpoint = %short(endpoint_id)))]
    pub async fn program_external(
        &self,
        network_id: &str,
        endpoint_id: &str,
        options: &OptionsMap,
    ) -> Result<Vec<Published>, DriverError> {
        let requests = ports::requests(options)?;
        let _net = self.locks.read(&lock_keys::network(network_id)).await;
        let _ep = self.locks.write(&lock_keys::endpoint(endpoint_id)).await;
        if requests.is_empty() {
            // Nothing to publish (most containers): only what it had goes.
            self.unpublish(endpoint_id).await?;
            return Ok(Vec::new());
        }
        let key = keys::endpoint(endpoint_id);
        let before = self.endpoint_record(&key, endpoint_id).await?;
        self.forget_gone_publishers(endpoint_id).await;
        // Host ports belong to the whole host: one endpoint picks at a time, so two
        // containers never get the same port.
        let _one = self.publishing.lock().await;
        let others: Vec<Published> = self
            .endpoints()
            .await?
            .into_iter()
            .filter(|e| e.id != endpoint_id)
            .flat_map(|e| e.published)
            .collect();
        // Trying a crowded range binds port after port: off the async workers.
        let datapath = self.datapath.clone();
        let previous = before.published.clone();
        let published = tokio::task::spawn_blocking(move || {
            ports::resolve(&requests, &others, &previous, |proto, ip, port| {
                datapath
                    .host_port_free(proto, ip, port)
                    .map_err(|e| match e {
                        DatapathError::NotFound { what } => {
                            PortError::Invalid(format!("{what} is not an address of this host"))
                        }
                        e => PortError::Host {
                            proto,
                            port,
                            message: e.to_string(),
                        },
                    })
            })
        })
        .await
        .map_err(|e| {
            DriverError::Datapath(DatapathError::Kernel {
                what: "choosing host ports".into(),
                message: e.to_string(),
            })
        })??;
        self.set_published(&key, endpoint_id, published.clone())
            .await?;
        if let Err(e) = self.sync().await {
            // Nothing half-published: the record goes back, and the rules with it.
            if let Err(undo) = self
                .set_published(&key, endpoint_id, before.published)
                .await
            {
                warn!(error = %undo, "could not take back the ports of a failed publish");
            } else if let Err(undo) = self.sync().await {
                warn!(error = %undo, "could not take back the rules of a failed publish");
            }
            return Err(e);
        }
        info!(ports = %describe(&published), "ports published");
        Ok(published)
    }

    /// Withdraws every port this endpoint published; an unknown endpoint has none.
    #[instrument(skip_all, fields(network = %short(network_id), endpoint = %short(endpoint_id)))]
    pub async fn revoke_external(
        &self,
        network_id: &str,
        endpoint_id: &str,
    ) -> Result<(), DriverError> {
        let _net = self.locks.read(&lock_keys::network(network_id)).await;
        let _ep = self.locks.write(&lock_keys::endpoint(endpoint_id)).await;
        self.unpublish(endpoint_id).await
    }

    /// Clears an endpoint's published ports and withdraws their rules (no-op without
    /// any). The caller holds the endpoint's lock.
    async fn unpublish(&self, endpoint_id: &str) -> Result<(), DriverError> {
        let key = keys::endpoint(endpoint_id);
        let Some(rec) = self.local.get_json::<EndpointRecord>(&key).await? else {
            return Ok(());
        };
        if rec.value.published.is_empty() {
            return Ok(());
        }
        self.set_published(&key, endpoint_id, Vec::new()).await?;
        self.sync().await?;
        info!(ports = %describe(&rec.value.published), "ports withdrawn");
        Ok(())
    }

    /// Removes the records of other endpoints that publish ports but whose container
    /// is gone (joined, its link vanished with its namespace: dockerd was killed, say),
    /// as the reconciler would on its next pass: a container started again with the
    /// same `-p` must not be refused for a port nothing serves. Called before
    /// [`Driver::publishing`] is taken; best effort (errors are the reconciler's).
    async fn forget_gone_publishers(&self, endpoint_id: &str) {
        let Ok(endpoints) = self.endpoints().await else {
            return;
        };
        for other in endpoints {
            if other.id == endpoint_id || other.published.is_empty() || !other.joined {
                continue;
            }
            if self
                .datapath
                .host_link_exists(&other.host_if)
                .await
                .unwrap_or(true)
            {
                continue;
            }
            // Never waits while holding this endpoint's lock: two publishers could
            // each hold the lock the other waits for. A busy one is left to the
            // reconciler.
            let Some(_other) = self.locks.try_write(&lock_keys::endpoint(&other.id)) else {
                continue;
            };
            let key = keys::endpoint(&other.id);
            let Ok(Some(current)) = self.local.get_json::<EndpointRecord>(&key).await else {
                continue;
            };
            if current.value.joined
                && !self
                    .datapath
                    .host_link_exists(&other.host_if)
                    .await
                    .unwrap_or(true)
            {
                warn!(endpoint = %short(&other.id), ports = %describe(&other.published), "forgetting a gone container's endpoint that still held published ports");
                if let Err(e) = self.remove_endpoint(&current.value).await {
                    warn!(error = %e, "forgetting a gone container's endpoint left something behind");
                }
            }
        }
    }

    async fn endpoint_record(&self, key: &str, id: &str) -> Result<EndpointRecord, DriverError> {
        self.local
            .get_json::<EndpointRecord>(key)
            .await?
            .map(|r| r.value)
            .ok_or_else(|| DriverError::NotFound(format!("endpoint {} not found", short(id))))
    }

    async fn set_published(
        &self,
        key: &str,
        id: &str,
        published: Vec<Published>,
    ) -> Result<(), DriverError> {
        self.local
            .modify_json::<EndpointRecord, DriverError, _>(key, |current| {
                Ok(current.map(|mut ep| {
                    ep.published = published.clone();
                    ep
                }))
            })
            .await?
            .map(drop)
            .ok_or_else(|| DriverError::NotFound(format!("endpoint {} not found", short(id))))
    }
}

/// `0.0.0.0:8080->80/tcp, 127.0.0.1:5353->53/udp`, as `docker ps` shows ports.
pub fn describe(published: &[Published]) -> String {
    published
        .iter()
        .map(Published::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

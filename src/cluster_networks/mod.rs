//! Cluster networks (`-o weft.scope=cluster`): created once on any host, weft creates
//! them in every host's dockerd, and `docker network rm` on any host removes them
//! everywhere (except where containers still use them, until they are gone).
//!
//! Each host reconciles on its own, never inside a plugin request (dockerd waits for
//! the plugin while it handles a call): its dockerd's networks ([`Engine`]), its
//! weft networks ([`Driver`]) and the cluster's records ([`records`]) are brought
//! together in one [`ClusterNetworks::pass`], woken by the driver, by the cluster
//! store's watch, and by a timer.

pub mod records;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::driver::{ClusterState, Driver, DriverError, NetworkRecord};
use crate::engine::{Engine, EngineError, EngineNetwork, Removal};
use crate::schema::{keys, ClusterNetworkRecord, OverlayRecord};
use crate::store::{Record, Store, StoreError, StoreExt};

#[derive(Debug, thiserror::Error)]
pub enum ClusterNetworksError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Driver(#[from] DriverError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("no random uid: {0}")]
    Random(std::io::Error),
    #[error("{0}")]
    Refused(String),
}

/// What `weft status` shows of cluster networks.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ClusterNetworksStatus {
    pub networks: Vec<ClusterNetworkStatus>,
    /// Networks of removed cluster networks this host keeps while containers use them.
    #[serde(default)]
    pub kept: Vec<String>,
    /// Name clashes and failures of the last pass, in words.
    #[serde(default)]
    pub problems: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClusterNetworkStatus {
    pub name: String,
    pub subnet: String,
    pub uid: String,
    pub origin_host: String,
    /// Where it stands on this host: `present`, `created`, or why not.
    pub here: String,
    /// The hosts that have a weft network of its subnet.
    pub hosts: Vec<String>,
}

/// How a pass ended: `again_soon` when it waits on dockerd (a network it has not
/// committed yet) or on a failure.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PassOutcome {
    pub again_soon: bool,
}

pub struct ClusterNetworks {
    host: String,
    cluster: Arc<dyn Store>,
    driver: Arc<Driver>,
    engine: Arc<dyn Engine>,
    wake: Arc<Notify>,
    last: Mutex<ClusterNetworksStatus>,
    /// Cluster networks dockerd refused to create here, by uid: how often in a row,
    /// and when to try again (backing off from one pass period to [`MAX_BACKOFF`]).
    refused: Mutex<BTreeMap<String, (u32, Instant)>>,
    /// Unpublished networks dockerd does not list yet, by ID: since when.
    unlisted: Mutex<BTreeMap<String, Instant>>,
}

/// The first wait before creating again a network dockerd refused.
const CREATE_RETRY: Duration = Duration::from_secs(5);
/// The longest wait before creating again a network dockerd refused.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// How long a network created here may stay missing from dockerd's list (dockerd
/// commits it after the driver's reply) before weft stops looking out for it.
const UNLISTED_PATIENCE: Duration = Duration::from_secs(10);

/// The pass's view of this host's dockerd and weft networks.
struct Here {
    docker: Vec<EngineNetwork>,
    local: Vec<NetworkRecord>,
}

impl Here {
    fn docker_named(&self, name: &str) -> Vec<&EngineNetwork> {
        self.docker.iter().filter(|d| d.name == name).collect()
    }
    fn local(&self, id: &str) -> Option<&NetworkRecord> {
        self.local.iter().find(|n| n.id == id)
    }
    /// The name weft has in this dockerd (`weft`, or `weft:latest` for the managed
    /// plugin; the same for the network and the IPAM driver), if a weft network shows
    /// it.
    fn weft_name(&self) -> Option<String> {
        self.docker
            .iter()
            .find(|d| self.local(&d.id).is_some())
            .map(|d| d.driver.clone())
    }
}

impl ClusterNetworks {
    pub fn new(
        host: String,
        cluster: Arc<dyn Store>,
        driver: Arc<Driver>,
        engine: Arc<dyn Engine>,
    ) -> Self {
        Self {
            host,
            cluster,
            wake: driver.cluster_changes(),
            driver,
            engine,
            last: Mutex::new(ClusterNetworksStatus::default()),
            refused: Mutex::default(),
            unlisted: Mutex::default(),
        }
    }

    /// Wakes the reconciler (a cluster record changed).
    pub fn wake(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// Reconciles until the process ends: at once when woken, else every `every`.
    pub async fn run(self: Arc<Self>, every: Duration) {
        let mut failing = false;
        loop {
            let soon = match self.pass().await {
                Ok(outcome) => {
                    if failing {
                        info!("cluster networks reconciled again");
                    }
                    failing = false;
                    outcome.again_soon
                }
                Err(e) => {
                    // Once per outage in the log; every pass in `weft status`.
                    if !failing {
                        warn!(error = %e, "cluster networks not reconciled; retrying every second");
                    } else {
                        debug!(error = %e, "cluster networks not reconciled");
                    }
                    failing = true;
                    let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
                    last.problems = vec![format!("not reconciled: {e}")];
                    for n in &mut last.networks {
                        n.here = "unknown: the last pass failed".into();
                    }
                    true
                }
            };
            let wait = if soon {
                Duration::from_millis(200)
            } else {
                every
            };
            let wait = if failing {
                Duration::from_secs(1)
            } else {
                wait
            };
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One pass: publish this host's new cluster networks, withdraw the ones removed
    /// elsewhere, create the missing ones.
    pub async fn pass(&self) -> Result<PassOutcome, ClusterNetworksError> {
        let mut outcome = PassOutcome::default();
        let mut problems = Vec::new();
        let pending = self.driver.retry_cluster_removals().await?;
        problems.extend(pending.iter().map(|uid| {
            format!("cluster network {uid} was removed here; its record goes once the cluster store answers")
        }));
        // This host first, the records second: a network removed in between (record,
        // then dockerd's) is then never created again from a record read before.
        let mut here = Here {
            docker: self.engine.networks().await?,
            local: self.driver.networks().await?,
        };
        let (mut records, skipped) = records::list(self.cluster.as_ref()).await?;
        records.retain(|r| !pending.contains(&r.value.uid));
        problems.extend(skipped.iter().map(|s| format!("skipped a bad record: {s}")));
        let published = self
            .publish(&here, &mut records, &mut problems, &mut outcome)
            .await?;
        if published | self.promote(&here).await? {
            here.local = self.driver.networks().await?;
        }
        // A record that does not decode may be one of ours: withdraw nothing then.
        let (kept, removed) = if skipped.is_empty() {
            self.withdraw(&here, &records, &mut problems).await?
        } else {
            (Vec::new(), false)
        };
        if removed {
            // The name may be free now for the network that replaced it.
            here.docker = self.engine.networks().await?;
        }
        self.forget_orphans(&here, &mut records).await?;
        let mut statuses = Vec::new();
        for r in &records {
            let state = match self.converge(&here, &r.value).await {
                Ok(state) => state,
                // Tried again on the next pass (a refusal is not retried at once).
                Err(e) => format!("not created here: {e}"),
            };
            if !matches!(state.as_str(), "present" | "created") {
                problems.push(format!("cluster network {:?}: {state}", r.value.spec.name));
            }
            statuses.push(ClusterNetworkStatus {
                name: r.value.spec.name.clone(),
                subnet: r.value.spec.subnet.to_string(),
                uid: r.value.uid.clone(),
                origin_host: r.value.origin_host.clone(),
                here: state,
                hosts: Vec::new(),
            });
        }
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        for p in problems.iter().filter(|p| !last.problems.contains(p)) {
            warn!(problem = %p, "cluster networks");
        }
        for k in kept.iter().filter(|k| !last.kept.contains(k)) {
            info!(network = %k, "cluster networks");
        }
        *last = ClusterNetworksStatus {
            networks: statuses,
            kept,
            problems,
        };
        Ok(outcome)
    }

    /// Records this host's unpublished cluster networks for the other hosts once
    /// dockerd shows their names, or takes them as this host's copy of a cluster
    /// network that is the same network. Returns whether a local record changed.
    async fn publish(
        &self,
        here: &Here,
        records: &mut Vec<Record<ClusterNetworkRecord>>,
        problems: &mut Vec<String>,
        outcome: &mut PassOutcome,
    ) -> Result<bool, ClusterNetworksError> {
        let mut changed = false;
        for n in here
            .local
            .iter()
            .filter(|n| n.cluster == Some(ClusterState::Unpublished))
        {
            let Some(docker) = here.docker.iter().find(|d| d.id == n.id) else {
                // dockerd commits a network after the driver's reply: look out for it
                // a while, then only on the normal passes.
                let mut unlisted = self.unlisted.lock().unwrap_or_else(|p| p.into_inner());
                let since = *unlisted.entry(n.id.clone()).or_insert_with(Instant::now);
                if since.elapsed() < UNLISTED_PATIENCE {
                    outcome.again_soon = true;
                } else {
                    problems.push(format!(
                        "network {} was created here with -o weft.scope=cluster {} s ago, but dockerd at --docker-host does not list it (is it this host's dockerd?)",
                        crate::driver::short(&n.id),
                        since.elapsed().as_secs()
                    ));
                }
                continue;
            };
            self.unlisted
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&n.id);
            let Some(spec) = &docker.spec else {
                problems.push(format!(
                    "network {:?} cannot be a cluster network: it has not one IPv4 subnet",
                    docker.name
                ));
                continue;
            };
            let uid = match records.iter().find(|r| r.value.spec.name == docker.name) {
                None => {
                    let record = ClusterNetworkRecord {
                        uid: crate::schema::random_id().map_err(ClusterNetworksError::Random)?,
                        spec: spec.clone(),
                        origin_host: self.host.clone(),
                        origin_network: n.id.clone(),
                    };
                    let key = keys::cluster_network(&docker.name);
                    let Some(revision) = self.cluster.create_json(&key, &record).await? else {
                        outcome.again_soon = true; // another host took the name just now
                        continue;
                    };
                    info!(name = %docker.name, subnet = %spec.subnet, uid = %record.uid, "cluster network recorded for every host");
                    let uid = record.uid.clone();
                    records.push(Record {
                        value: record,
                        revision,
                    });
                    uid
                }
                Some(r)
                    if (r.value.origin_host == self.host && r.value.origin_network == n.id)
                        || r.value.spec.same_network(spec) =>
                {
                    r.value.uid.clone()
                }
                Some(r) => {
                    problems.push(format!(
                        "network {:?} here ({}) clashes with cluster network {:?} ({}, from host {}): it stays on this host only; remove it or give it another name",
                        docker.name, spec.subnet, r.value.spec.name, r.value.spec.subnet, r.value.origin_host
                    ));
                    continue;
                }
            };
            changed |= self
                .driver
                .set_cluster_state(
                    &n.id,
                    &ClusterState::Unpublished,
                    ClusterState::Member { uid },
                )
                .await?;
        }
        Ok(changed)
    }

    /// Makes the copies weft created here members once dockerd lists them (a create
    /// dockerd rolled back never gets there). Returns whether one changed.
    async fn promote(&self, here: &Here) -> Result<bool, ClusterNetworksError> {
        let mut changed = false;
        for n in &here.local {
            if let Some(ClusterState::Joining { uid }) = &n.cluster {
                if here.docker.iter().any(|d| d.id == n.id) {
                    let member = ClusterState::Member { uid: uid.clone() };
                    changed |= self
                        .driver
                        .set_cluster_state(&n.id, n.cluster.as_ref().expect("joining"), member)
                        .await?;
                }
            }
        }
        Ok(changed)
    }

    /// Removes from this host's dockerd the copies of cluster networks removed (or
    /// replaced) elsewhere; dockerd refuses while containers use them, so those are
    /// kept and tried again on every pass. Returns the kept ones, in words, and
    /// whether it removed any.
    async fn withdraw(
        &self,
        here: &Here,
        records: &[Record<ClusterNetworkRecord>],
        problems: &mut Vec<String>,
    ) -> Result<(Vec<String>, bool), ClusterNetworksError> {
        let (mut kept, mut removed) = (Vec::new(), false);
        for n in &here.local {
            let uid = match &n.cluster {
                Some(ClusterState::Member { uid })
                    if !records.iter().any(|r| &r.value.uid == uid) =>
                {
                    // Withdrawn first: removing it must not remove a record.
                    let to = ClusterState::Withdrawn { uid: uid.clone() };
                    let from = ClusterState::Member { uid: uid.clone() };
                    if !self.driver.set_cluster_state(&n.id, &from, to).await? {
                        continue;
                    }
                    uid
                }
                Some(ClusterState::Withdrawn { uid }) => uid,
                _ => continue,
            };
            let name = here.docker.iter().find(|d| d.id == n.id).map_or_else(
                || crate::driver::short(&n.id).to_string(),
                |d| d.name.clone(),
            );
            match self.engine.remove_network(&n.id).await {
                Ok(Removal::Removed) => {
                    removed = true;
                    info!(name = %name, uid = %uid, "cluster network removed elsewhere; removed here")
                }
                // dockerd no longer has it: no DeleteNetwork will come.
                Ok(Removal::Gone) => {
                    if let Err(e) = self.driver.delete_network(&n.id).await {
                        problems.push(format!("network {name}: not forgotten here: {e}"));
                    }
                }
                Ok(Removal::InUse(why)) => {
                    kept.push(format!(
                        "{name} ({}): removed from the cluster, kept here until its containers are gone ({why})",
                        n.subnet
                    ));
                }
                Err(e) => problems.push(format!("network {name}: not removed here: {e}")),
            }
        }
        Ok((kept, removed))
    }

    /// Drops records this host made for a network that is gone from it (removed
    /// before weft could note it was published).
    async fn forget_orphans(
        &self,
        here: &Here,
        records: &mut Vec<Record<ClusterNetworkRecord>>,
    ) -> Result<(), ClusterNetworksError> {
        let mut gone = Vec::new();
        for r in records.iter() {
            let v = &r.value;
            let orphan = v.origin_host == self.host
                && here.local(&v.origin_network).is_none()
                && !here.docker.iter().any(|d| d.id == v.origin_network)
                && !here.local.iter().any(
                    |n| matches!(&n.cluster, Some(ClusterState::Member { uid }) if *uid == v.uid),
                );
            if orphan
                && self
                    .cluster
                    .delete(&keys::cluster_network(&v.spec.name), Some(r.revision))
                    .await?
            {
                info!(name = %v.spec.name, uid = %v.uid, "forgot a cluster network removed here before it was published");
                gone.push(v.uid.clone());
            }
        }
        records.retain(|r| !gone.contains(&r.value.uid));
        Ok(())
    }

    /// Makes cluster network `r` exist in this host's dockerd; returns where it stands.
    async fn converge(
        &self,
        here: &Here,
        r: &ClusterNetworkRecord,
    ) -> Result<String, ClusterNetworksError> {
        let name = &r.spec.name;
        match here.docker_named(name).as_slice() {
            [] => {
                if let Some((tries, next)) = self.refused_lock().get(&r.uid) {
                    if Instant::now() < *next {
                        return Err(ClusterNetworksError::Refused(format!(
                            "dockerd refused it {tries} time(s); next try in {} s",
                            next.saturating_duration_since(Instant::now()).as_secs()
                        )));
                    }
                }
                let mut spec = r.spec.clone();
                if let Some(driver) = here.weft_name() {
                    (spec.driver, spec.ipam_driver) = (driver.clone(), driver);
                }
                spec.options.insert(
                    crate::driver::CLUSTER_UID.into(),
                    r.uid.clone(),
                );
                let id = match self.engine.create_network(&spec).await {
                    Ok(id) => {
                        self.refused_lock().remove(&r.uid);
                        id
                    }
                    Err(e) => {
                        let mut refused = self.refused_lock();
                        let tries = refused.get(&r.uid).map_or(0, |(t, _)| *t) + 1;
                        let wait = (CREATE_RETRY * 2u32.saturating_pow(tries - 1)).min(MAX_BACKOFF);
                        refused.insert(r.uid.clone(), (tries, Instant::now() + wait));
                        return Err(e.into());
                    }
                };
                // dockerd has it now: a member, whose removal removes the record.
                let joining = ClusterState::Joining { uid: r.uid.clone() };
                let member = ClusterState::Member { uid: r.uid.clone() };
                self.driver.set_cluster_state(&id, &joining, member).await?;
                info!(name = %name, subnet = %spec.subnet, uid = %r.uid, "cluster network created here");
                Ok("created".into())
            }
            [d] => Ok(match here.local(&d.id).and_then(|n| n.cluster.as_ref()) {
                Some(ClusterState::Member { uid }) if *uid == r.uid => "present".into(),
                Some(
                    ClusterState::Member { .. }
                    | ClusterState::Joining { .. }
                    | ClusterState::Withdrawn { .. },
                ) => {
                    "waiting: an earlier network of this name is still in use here".into()
                }
                Some(ClusterState::Unpublished) => {
                    "not here: a network of this name was created here by hand".into()
                }
                None => format!(
                    "not here: another network named {name:?} (driver {}) exists on this host; weft never replaces it",
                    d.driver
                ),
            }),
            several => Ok(format!(
                "not here: {} networks named {name:?} exist on this host",
                several.len()
            )),
        }
    }

    fn refused_lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, (u32, Instant)>> {
        self.refused.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The last pass's view, with the hosts that have each network.
    pub async fn status(&self) -> ClusterNetworksStatus {
        let mut status = self.last.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut overlays = BTreeMap::new();
        for n in &mut status.networks {
            let Ok(subnet) = n.subnet.parse() else {
                continue;
            };
            if !overlays.contains_key(&n.subnet) {
                let hosts = match self
                    .cluster
                    .get_json::<OverlayRecord>(&keys::overlay(subnet))
                    .await
                {
                    Ok(r) => r
                        .map(|r| r.value.hosts.into_iter().collect())
                        .unwrap_or_default(),
                    Err(e) => {
                        status.problems.push(format!("hosts of {}: {e}", n.subnet));
                        Vec::new()
                    }
                };
                overlays.insert(n.subnet.clone(), hosts);
            }
            n.hosts = overlays[&n.subnet].clone();
        }
        status
    }
}

#[cfg(test)]
mod tests;

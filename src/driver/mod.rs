//! The network driver service: networks, endpoints, join and leave.
//!
//! Every accepted object is written to the local store before the reply, so a
//! restarted daemon knows everything Docker told it. Kernel work goes through the
//! [`Datapath`]; setup rolls back on failure and teardown never stops early.

mod options;
mod publish;

use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnetwork::Ipv4Network;
use tokio::sync::Mutex;
use tracing::{info, instrument, warn};

use crate::datapath::{
    link_names, Datapath, DatapathError, DesiredState, EndpointSpec, NetworkSpec,
};
use crate::locks::KeyedLocks;
use crate::protocol::network as proto;
use crate::schema::keys;
use crate::schema::unix_now;
use crate::store::{Store, StoreError, StoreExt};

pub use crate::schema::{ClusterState, EndpointRecord, NetworkRecord, OverlayRecord};
pub use options::{NetworkOptions, CLUSTER_UID};
pub use publish::describe as describe_ports;

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
}

impl EndpointRecord {
    pub fn spec(&self) -> EndpointSpec {
        EndpointSpec {
            host_if: self.host_if.clone(),
            container_if: self.container_if.clone(),
            address: self.address,
            mtu: self.mtu,
        }
    }
}

#[derive(Debug, Clone)]
pub struct DriverConfig {
    /// MTU for networks created without an MTU option; `None` derives it from the underlay.
    pub default_mtu: Option<u32>,
    /// Bytes subtracted from the underlay MTU (WireGuard over an IPv6 underlay: 80).
    pub mtu_overhead: u32,
    /// How long an endpoint may stay unjoined before the reconciler collects it.
    pub endpoint_grace: std::time::Duration,
}

impl Default for DriverConfig {
    fn default() -> Self {
        Self {
            default_mtu: None,
            mtu_overhead: 80,
            endpoint_grace: std::time::Duration::from_secs(120),
        }
    }
}

pub struct Driver {
    local: Arc<dyn Store>,
    /// Where the cluster-wide identity of networks lives (`overlays/`).
    cluster: Arc<dyn Store>,
    host: String,
    datapath: Arc<dyn Datapath>,
    config: DriverConfig,
    /// One lock per network, endpoint and address (see [`lock_keys`]): changes to
    /// different containers never wait for each other.
    locks: KeyedLocks,
    /// Subnets of networks being created, so that two at once cannot overlap.
    creating: std::sync::Mutex<Vec<Ipv4Network>>,
    /// Serialises whole-state datapath syncs (the firewall table, gateways, subnet
    /// routes): only network changes and the reconciler sync; the container path
    /// (endpoints, join, leave) never does.
    syncing: Mutex<()>,
    /// Serialises choosing host ports (they belong to the whole host).
    publishing: Mutex<()>,
    /// Reconcile passes so far (every [`THOROUGH_EVERY`]th sets every endpoint up again).
    passes: std::sync::atomic::AtomicU64,
    /// Woken when a cluster-scope network is created or deleted here.
    cluster_changes: Arc<tokio::sync::Notify>,
    /// Woken when an endpoint joins or leaves (its container's names change).
    endpoint_changes: Arc<tokio::sync::Notify>,
}

/// Every this many reconcile passes, the first among them, every endpoint is set up
/// again (its sysctls too); the passes between repair only what one look at the
/// kernel shows amiss, so a quiet host's passes cost little however many containers
/// it runs.
pub const THOROUGH_EVERY: u64 = 30;

/// Names in [`Driver::locks`]. Order when taking several: network, address, endpoint.
mod lock_keys {
    use std::net::Ipv4Addr;

    pub fn network(id: &str) -> String {
        format!("network/{id}")
    }
    pub fn address(ip: Ipv4Addr) -> String {
        format!("address/{ip}")
    }
    /// By the 12 characters that name the endpoint's links, so that a link found in
    /// the kernel and its endpoint's requests take the same lock.
    pub fn endpoint(id: &str) -> String {
        format!("endpoint/{}", super::short(id).to_ascii_lowercase())
    }
    /// The endpoint lock of one of weft's link names (`wfh…`/`wfc…`).
    pub fn endpoint_of_link(link: &str) -> String {
        endpoint(link.get(3..).unwrap_or(link))
    }
}

/// Takes a subnet into [`Driver::creating`] until dropped.
struct SubnetClaim<'a> {
    creating: &'a std::sync::Mutex<Vec<Ipv4Network>>,
    subnet: Ipv4Network,
}

impl Drop for SubnetClaim<'_> {
    fn drop(&mut self) {
        let mut creating = self.creating.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = creating.iter().position(|s| *s == self.subnet) {
            creating.remove(i);
        }
    }
}

pub fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

impl Driver {
    pub fn new(local: Arc<dyn Store>, datapath: Arc<dyn Datapath>, config: DriverConfig) -> Self {
        Self {
            cluster: local.clone(),
            host: "local".into(),
            local,
            datapath,
            config,
            locks: KeyedLocks::default(),
            creating: std::sync::Mutex::new(Vec::new()),
            syncing: Mutex::new(()),
            publishing: Mutex::new(()),
            passes: Default::default(),
            cluster_changes: Default::default(),
            endpoint_changes: Default::default(),
        }
    }

    /// Notified when an endpoint joins or leaves.
    pub fn endpoint_changes(&self) -> Arc<tokio::sync::Notify> {
        self.endpoint_changes.clone()
    }

    /// Removes the records of cluster networks removed here while the cluster store
    /// did not answer. Returns the uids still pending.
    pub async fn retry_cluster_removals(&self) -> Result<Vec<String>, DriverError> {
        let mut pending = Vec::new();
        for (key, _) in self.local.list(keys::CLUSTER_REMOVALS).await? {
            let Some(uid) = key.strip_prefix(keys::CLUSTER_REMOVALS) else {
                continue;
            };
            match crate::cluster_networks::records::remove(self.cluster.as_ref(), uid).await {
                Ok(_) => {
                    info!(uid = %uid, "cluster network removed from every host's record (it was removed here earlier)");
                    self.local.delete(&key, None).await?;
                }
                Err(_) => pending.push(uid.to_string()),
            }
        }
        Ok(pending)
    }

    /// Notified when a cluster-scope network is created or deleted on this host.
    pub fn cluster_changes(&self) -> Arc<tokio::sync::Notify> {
        self.cluster_changes.clone()
    }

    /// Moves network `id` from cluster state `from` to `to`; false (and no change)
    /// if it is gone or no longer in `from`.
    pub async fn set_cluster_state(
        &self,
        id: &str,
        from: &ClusterState,
        to: ClusterState,
    ) -> Result<bool, DriverError> {
        let _net = self.locks.write(&lock_keys::network(id)).await;
        let mut moved = false;
        self.local
            .modify_json::<NetworkRecord, DriverError, _>(&keys::network(id), |current| {
                moved = false;
                Ok(current.map(|mut n| {
                    if n.cluster.as_ref() == Some(from) {
                        n.cluster = Some(to.clone());
                        moved = true;
                    }
                    n
                }))
            })
            .await?;
        Ok(moved)
    }

    /// Shares network identities with other hosts through `cluster`, as host `host`.
    pub fn with_cluster(mut self, cluster: Arc<dyn Store>, host: String) -> Self {
        self.cluster = cluster;
        self.host = host;
        self
    }

    /// Joins this host to the overlay network identified by `subnet`: an optional
    /// `-o weft.network` name must match the one other hosts gave.
    async fn join_overlay(
        &self,
        subnet: Ipv4Network,
        name: Option<&str>,
    ) -> Result<(), DriverError> {
        let host = self.host.clone();
        self.cluster
            .modify_json::<OverlayRecord, DriverError, _>(&keys::overlay(subnet), |current| {
                let mut rec = current.unwrap_or_default();
                match (&rec.name, name) {
                    (Some(theirs), Some(mine)) if theirs != mine => {
                        return Err(DriverError::Conflict(format!(
                            "subnet {subnet} is weft network {theirs:?} on other hosts; -o weft.network={mine} does not match"
                        )))
                    }
                    (None, Some(mine)) => rec.name = Some(mine.to_string()),
                    _ => {}
                }
                rec.hosts.insert(host.clone());
                Ok(Some(rec))
            })
            .await?;
        Ok(())
    }

    /// Puts this host back into the overlay record of every network it has (a host
    /// taken for gone while cut off loses its memberships in the reclaim). Returns how
    /// many it put right.
    pub async fn restore_memberships(&self) -> Result<usize, DriverError> {
        // Checked without locks (nearly always nothing is missing); a missing one is
        // put back under its network's lock, and only if the network is still there:
        // a network being deleted or rolled back must not come back.
        let mut errors = Vec::new();
        let mut missing = Vec::new();
        for n in self.networks().await? {
            match self
                .cluster
                .get_json::<OverlayRecord>(&keys::overlay(n.subnet))
                .await
            {
                Ok(r)
                    if r.as_ref()
                        .is_some_and(|r| r.value.hosts.contains(&self.host)) => {}
                Ok(_) => missing.push(n.id),
                Err(e) => errors.push(e.into()),
            }
        }
        let mut restored = 0;
        for id in missing {
            let _net = self.locks.write(&lock_keys::network(&id)).await;
            let Some(n) = self
                .local
                .get_json::<NetworkRecord>(&keys::network(&id))
                .await?
                .map(|r| r.value)
            else {
                continue;
            };
            match self.join_overlay(n.subnet, n.name.as_deref()).await {
                Ok(()) => {
                    warn!(subnet = %n.subnet, "this host's membership of a network it still has was gone (reclaimed while it was cut off); restored it");
                    restored += 1;
                }
                Err(e) => errors.push(e),
            }
        }
        first_error(errors).map(|()| restored)
    }

    fn claim_subnet(&self, subnet: Ipv4Network) -> Result<SubnetClaim<'_>, DriverError> {
        let mut creating = self.creating.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(other) = creating
            .iter()
            .find(|s| crate::ipam::allocator::overlaps(**s, subnet))
        {
            return Err(DriverError::Conflict(format!(
                "subnet {subnet} overlaps subnet {other} of a weft network being created on this host"
            )));
        }
        creating.push(subnet);
        Ok(SubnetClaim {
            creating: &self.creating,
            subnet,
        })
    }

    async fn leave_overlay(&self, subnet: Ipv4Network) -> Result<(), DriverError> {
        let host = self.host.clone();
        self.cluster
            .modify_json::<OverlayRecord, DriverError, _>(&keys::overlay(subnet), |current| {
                Ok(current.and_then(|mut rec| {
                    rec.hosts.remove(&host);
                    (!rec.hosts.is_empty()).then_some(rec)
                }))
            })
            .await?;
        Ok(())
    }

    #[instrument(skip_all, fields(network = %short(&req.network_id)))]
    pub async fn create_network(
        &self,
        req: proto::CreateNetworkRequest,
    ) -> Result<(), DriverError> {
        check_id("NetworkID", &req.network_id)?;
        let opts = NetworkOptions::parse(&req.options)?;
        if opts.ipv6 || !req.ipv6_data.is_empty() {
            return Err(DriverError::Unsupported(
                "weft does not support IPv6 yet; create the network without --ipv6".into(),
            ));
        }
        let data = match req.ipv4_data.as_slice() {
            [one] => one,
            [] => {
                return Err(DriverError::Invalid(
                    "no IPv4 subnet given (IPv4Data is empty)".into(),
                ))
            }
            _ => {
                return Err(DriverError::Unsupported(
                    "weft supports one subnet per network".into(),
                ))
            }
        };
        let subnet = parse_cidr("Pool", &data.pool)?;
        let gateway = match (opts.internal, data.gateway.as_str()) {
            (true, _) | (false, "") => None,
            (false, g) => Some(parse_cidr("Gateway", g)?.ip()),
        };
        let _net = self.locks.write(&lock_keys::network(&req.network_id)).await;
        let mtu = match opts.mtu.or(self.config.default_mtu) {
            Some(m) => m,
            None => self
                .datapath
                .underlay_mtu()
                .await?
                .saturating_sub(self.config.mtu_overhead),
        };
        let record = NetworkRecord {
            id: req.network_id.clone(),
            subnet: Ipv4Network::new(subnet.network(), subnet.prefix()).expect("valid"),
            gateway,
            internal: opts.internal,
            mtu,
            name: opts.name,
            host_access: opts.host_access,
            cluster: opts.cluster,
        };
        // Claimed before the records are read: of two overlapping networks created at
        // once, the second sees the first here or its record below.
        let _claim = self.claim_subnet(record.subnet)?;
        for (_, other) in self
            .local
            .list_json::<NetworkRecord>(keys::NETWORKS)
            .await?
        {
            let other = other.value;
            if other.id == record.id {
                // A cluster network's state moves on after its creation.
                let same_state = match (&record.cluster, &other.cluster) {
                    (Some(was), Some(now)) => was.may_become(now),
                    (was, now) => was == now,
                };
                if same_state
                    && other
                        == (NetworkRecord {
                            cluster: other.cluster.clone(),
                            ..record.clone()
                        })
                {
                    return Ok(());
                }
                return Err(DriverError::Conflict(format!(
                    "network {} already exists with different settings",
                    short(&record.id)
                )));
            }
            if crate::ipam::allocator::overlaps(other.subnet, record.subnet) {
                return Err(DriverError::Conflict(format!(
                    "subnet {} overlaps subnet {} of weft network {} on this host",
                    record.subnet,
                    other.subnet,
                    short(&other.id)
                )));
            }
        }
        if !opts.allow_route_overlap {
            // Never take over a route someone else set up (a VPN, another CNI, Docker's
            // own bridges): refuse the subnet unless the user says otherwise.
            let routes = self.datapath.host_routes().await?;
            if let Some(route) = routes
                .iter()
                .find(|r| crate::ipam::allocator::overlaps(**r, record.subnet))
            {
                return Err(DriverError::Conflict(format!(
                    "subnet {} overlaps the host's route {route}, which weft did not add; choose another subnet, or pass -o {}=true to use it anyway (weft never replaces or deletes that route)",
                    record.subnet,
                    options::ALLOW_ROUTE_OVERLAP
                )));
            }
        }
        // The local record first: the overlay change wakes the mesh, which routes
        // only pools this host has a network in.
        if self
            .local
            .create_json(&keys::network(&record.id), &record)
            .await?
            .is_none()
        {
            return Err(DriverError::Conflict(format!(
                "network {} was created concurrently",
                short(&record.id)
            )));
        }
        if let Err(e) = self
            .join_overlay(record.subnet, record.name.as_deref())
            .await
        {
            let _ = self.local.delete(&keys::network(&record.id), None).await;
            return Err(e);
        }
        if let Err(e) = self.sync().await {
            // Roll back: the network must not half-exist.
            let _ = self.local.delete(&keys::network(&record.id), None).await;
            let _ = self.leave_overlay(record.subnet).await;
            let _ = self.sync().await;
            return Err(e);
        }
        info!(subnet = %record.subnet, mtu, internal = record.internal, cluster = ?record.cluster, "network created");
        if record.cluster.is_some() {
            self.cluster_changes.notify_one();
        }
        Ok(())
    }

    #[instrument(skip_all, fields(network = %short(network_id)))]
    pub async fn delete_network(&self, network_id: &str) -> Result<(), DriverError> {
        let _net = self.locks.write(&lock_keys::network(network_id)).await;
        let record = self
            .local
            .get_json::<NetworkRecord>(&keys::network(network_id))
            .await?;
        // `docker network rm` of a cluster network removes it from every host: its
        // record goes. dockerd removes the network here whatever weft answers (it
        // ignores a driver's errors), so if the record cannot go now, a local note
        // makes the reconciler remove it once it can.
        if let Some(ClusterState::Member { uid }) =
            record.as_ref().and_then(|r| r.value.cluster.as_ref())
        {
            match crate::cluster_networks::records::remove(self.cluster.as_ref(), uid).await {
                Ok(_) => info!(uid = %uid, "cluster network removed from every host's record"),
                Err(e) => {
                    warn!(uid = %uid, error = %e, "cannot remove the cluster network's record now; weft removes it once the cluster store answers");
                    self.local
                        .create_json(&keys::cluster_removal(uid), uid)
                        .await?;
                }
            }
        }
        let mut errors = Vec::new();
        for ep in self.endpoints().await? {
            if ep.network_id == network_id {
                warn!(endpoint = %short(&ep.id), "removing endpoint left on a deleted network");
                let _ep = self.locks.write(&lock_keys::endpoint(&ep.id)).await;
                if let Err(e) = self.remove_endpoint(&ep).await {
                    errors.push(e);
                }
            }
        }
        self.local.delete(&keys::network(network_id), None).await?;
        if record.as_ref().is_some_and(|r| r.value.cluster.is_some()) {
            self.cluster_changes.notify_one();
        }
        if let Some(rec) = record {
            if let Err(e) = self.leave_overlay(rec.value.subnet).await {
                errors.push(e);
            }
        }
        if let Err(e) = self.sync().await {
            errors.push(e);
        }
        info!("network deleted");
        first_error(errors)
    }

    #[instrument(skip_all, fields(network = %short(&req.network_id), endpoint = %short(&req.endpoint_id)))]
    pub async fn create_endpoint(
        &self,
        req: proto::CreateEndpointRequest,
    ) -> Result<proto::CreateEndpointResponse, DriverError> {
        let (host_if, container_if) = link_names(&req.endpoint_id).ok_or_else(|| {
            DriverError::Invalid(format!("EndpointID {:?} is not a hex ID", req.endpoint_id))
        })?;
        if !req.interface.address_ipv6.is_empty() {
            return Err(DriverError::Unsupported(
                "weft does not support IPv6 addresses yet".into(),
            ));
        }
        if req.interface.address.is_empty() {
            return Err(DriverError::Invalid(
                "the endpoint has no IPv4 address (Interface.Address is empty)".into(),
            ));
        }
        let address = parse_cidr("Interface.Address", &req.interface.address)?;
        let _net = self.locks.read(&lock_keys::network(&req.network_id)).await;
        let _addr = self.locks.write(&lock_keys::address(address.ip())).await;
        let _ep = self
            .locks
            .write(&lock_keys::endpoint(&req.endpoint_id))
            .await;
        let network = self.network(&req.network_id).await?;
        if !network.subnet.contains(address.ip()) {
            return Err(DriverError::Invalid(format!(
                "address {} is outside subnet {}",
                address.ip(),
                network.subnet
            )));
        }
        let record = EndpointRecord {
            id: req.endpoint_id.clone(),
            network_id: req.network_id.clone(),
            address: address.ip(),
            host_if,
            container_if,
            mtu: network.mtu,
            joined: false,
            since: unix_now(),
            published: Vec::new(),
        };
        let mut superseded = Vec::new();
        for other in self.endpoints().await? {
            if other.id == record.id {
                return if other.network_id == record.network_id && other.address == record.address {
                    Ok(proto::CreateEndpointResponse::default())
                } else {
                    Err(DriverError::Conflict(format!(
                        "endpoint {} already exists",
                        short(&record.id)
                    )))
                };
            }
            if other.host_if == record.host_if {
                return Err(DriverError::Conflict(format!(
                    "endpoint {} collides with endpoint {} on link name {}",
                    short(&record.id),
                    short(&other.id),
                    record.host_if
                )));
            }
            if other.address == record.address && self.same_subnet(&other, &network).await? {
                // Docker gave the address to this endpoint, so IPAM had it free: the
                // other record is a leftover (never joined, or its container is gone).
                // A live joined endpoint on the same address is a real conflict.
                if other.joined && self.datapath.host_link_exists(&other.host_if).await? {
                    return Err(DriverError::Conflict(format!(
                        "address {} is in use by endpoint {} on this host",
                        record.address,
                        short(&other.id)
                    )));
                }
                superseded.push(other);
            }
        }
        for old in superseded {
            warn!(endpoint = %short(&old.id), address = %old.address, "superseding a stale endpoint that held this address");
            // Its own requests (and the reconciler) take only its endpoint lock, never
            // this one's or this address's, so taking it here cannot deadlock.
            let _old = self.locks.write(&lock_keys::endpoint(&old.id)).await;
            if let Err(e) = self.remove_endpoint(&old).await {
                warn!(error = %e, "removing the superseded endpoint left something behind");
            }
        }
        // The record's write and the endpoint's own kernel state, side by side: nothing
        // else looks at either before this endpoint's lock is free (the reconciler
        // checks a link's record under it), and the firewall checks a container's
        // source address against its route, so no firewall change waits.
        let (key, spec) = (keys::endpoint(&record.id), record.spec());
        let (stored, set_up) = tokio::join!(
            self.local.create_json(&key, &record),
            self.datapath.setup_endpoint(&spec)
        );
        let failed = match (stored, set_up) {
            (Ok(Some(_)), Ok(())) => None,
            // Another record of this ID: impossible under the endpoint lock, but never
            // tear down what would be its links.
            (Ok(None), _) => {
                return Err(DriverError::Conflict(format!(
                    "endpoint {} was created concurrently",
                    short(&record.id)
                )))
            }
            (Err(e), _) => Some(DriverError::from(e)),
            (_, Err(e)) => Some(DriverError::from(e)),
        };
        if let Some(e) = failed {
            // Docker does not call DeleteEndpoint after a failed CreateEndpoint.
            if let Err(undo) = self.remove_endpoint(&record).await {
                warn!(error = %undo, "rollback of a failed endpoint left something behind");
            }
            return Err(e);
        }
        info!(address = %record.address, link = %record.host_if, mtu = record.mtu, "endpoint created");
        // Docker set the address (and MAC, if any); echoing them back is an error.
        Ok(proto::CreateEndpointResponse::default())
    }

    #[instrument(skip_all, fields(network = %short(network_id), endpoint = %short(endpoint_id)))]
    pub async fn delete_endpoint(
        &self,
        network_id: &str,
        endpoint_id: &str,
    ) -> Result<(), DriverError> {
        let _net = self.locks.read(&lock_keys::network(network_id)).await;
        let _ep = self.locks.write(&lock_keys::endpoint(endpoint_id)).await;
        let Some(record) = self
            .local
            .get_json::<EndpointRecord>(&keys::endpoint(endpoint_id))
            .await?
        else {
            return Ok(());
        };
        self.remove_endpoint(&record.value).await?;
        info!("endpoint deleted");
        Ok(())
    }

    /// Removes an endpoint's kernel state and record, under its endpoint lock. The
    /// record goes even when the kernel refuses something: the reconciler removes
    /// leftover links (and their routes go with them).
    async fn remove_endpoint(&self, ep: &EndpointRecord) -> Result<(), DriverError> {
        let mut errors = Vec::new();
        if let Err(e) = self.datapath.teardown_endpoint(&ep.spec()).await {
            errors.push(DriverError::from(e));
        }
        if let Err(e) = self.local.delete(&keys::endpoint(&ep.id), None).await {
            errors.push(e.into());
        } else if !ep.published.is_empty() {
            // Its ports go with its record.
            if let Err(e) = self.sync().await {
                errors.push(e);
            }
        }
        first_error(errors)
    }

    #[instrument(skip_all, fields(network = %short(&req.network_id), endpoint = %short(&req.endpoint_id)))]
    pub async fn join(&self, req: proto::JoinRequest) -> Result<proto::JoinResponse, DriverError> {
        let _net = self.locks.read(&lock_keys::network(&req.network_id)).await;
        let _ep = self
            .locks
            .write(&lock_keys::endpoint(&req.endpoint_id))
            .await;
        let network = self.network(&req.network_id).await?;
        let key = keys::endpoint(&req.endpoint_id);
        let rec = self
            .local
            .get_json::<EndpointRecord>(&key)
            .await?
            .ok_or_else(|| {
                DriverError::NotFound(format!("endpoint {} not found", short(&req.endpoint_id)))
            })?;
        let mut ep = rec.value;
        // Repairs a pair lost while weft was down (both ends go together, so the host
        // end tells); never touches the sandbox (it may not exist yet).
        if !self.datapath.host_link_exists(&ep.host_if).await? {
            self.datapath.setup_endpoint(&ep.spec()).await?;
        }
        if !ep.joined {
            ep.joined = true;
            if self
                .local
                .update_json(&key, rec.revision, &ep)
                .await?
                .is_none()
            {
                return Err(StoreError::Contended(key).into());
            }
        }
        let gateway = network.gateway.filter(|_| !network.internal);
        info!(link = %ep.container_if, "endpoint joined");
        self.endpoint_changes.notify_one();
        Ok(proto::JoinResponse {
            interface_name: proto::InterfaceName {
                src_name: ep.container_if,
                dst_prefix: "eth".into(),
            },
            gateway: gateway.map(|g| g.to_string()).unwrap_or_default(),
            static_routes: Vec::new(),
            // Without a default route from us, Docker would attach docker_gwbridge.
            disable_gateway_service: gateway.is_none(),
        })
    }

    #[instrument(skip_all, fields(network = %short(network_id), endpoint = %short(endpoint_id)))]
    pub async fn leave(&self, network_id: &str, endpoint_id: &str) -> Result<(), DriverError> {
        let _net = self.locks.read(&lock_keys::network(network_id)).await;
        let _ep = self.locks.write(&lock_keys::endpoint(endpoint_id)).await;
        let key = keys::endpoint(endpoint_id);
        let mut withdrawn = false;
        self.local
            .modify_json::<EndpointRecord, DriverError, _>(&key, |current| {
                Ok(current.map(|mut ep| {
                    ep.joined = false;
                    ep.since = unix_now();
                    // Docker revokes a gateway endpoint's ports before Leave; should
                    // that have been missed, they go now, in the same write.
                    withdrawn = !ep.published.is_empty();
                    ep.published.clear();
                    ep
                }))
            })
            .await?;
        if withdrawn {
            // A failed firewall change is repaired by the reconciler.
            if let Err(e) = self.sync().await {
                warn!(error = %e, "withdrawing the rules of a left endpoint's ports");
            }
        }
        info!("endpoint left");
        self.endpoint_changes.notify_one();
        Ok(())
    }

    /// Whether an unjoined endpoint has waited longer than the endpoint grace
    /// (records written before weft kept the time count from now on).
    fn unjoined_too_long(&self, ep: &EndpointRecord) -> bool {
        ep.since != 0 && unix_now().saturating_sub(ep.since) > self.config.endpoint_grace.as_secs()
    }

    async fn same_subnet(
        &self,
        other: &EndpointRecord,
        network: &NetworkRecord,
    ) -> Result<bool, DriverError> {
        if other.network_id == network.id {
            return Ok(true);
        }
        Ok(self
            .local
            .get_json::<NetworkRecord>(&keys::network(&other.network_id))
            .await?
            .is_none_or(|n| n.value.subnet == network.subnet))
    }

    /// Every (subnet, address) an endpoint of this host holds: what IPAM must keep.
    pub async fn addresses_in_use(
        &self,
    ) -> Result<std::collections::BTreeSet<(Ipv4Network, Ipv4Addr)>, DriverError> {
        let networks = self.networks().await?;
        Ok(self
            .endpoints()
            .await?
            .into_iter()
            .filter_map(|ep| {
                let net = networks.iter().find(|n| n.id == ep.network_id)?;
                Some((net.subnet, ep.address))
            })
            .collect())
    }

    async fn network(&self, id: &str) -> Result<NetworkRecord, DriverError> {
        self.local
            .get_json::<NetworkRecord>(&keys::network(id))
            .await?
            .map(|r| r.value)
            .ok_or_else(|| DriverError::NotFound(format!("network {} not found", short(id))))
    }

    pub async fn networks(&self) -> Result<Vec<NetworkRecord>, DriverError> {
        Ok(self
            .local
            .list_json::<NetworkRecord>(keys::NETWORKS)
            .await?
            .into_iter()
            .map(|(_, r)| r.value)
            .collect())
    }

    pub async fn endpoints(&self) -> Result<Vec<EndpointRecord>, DriverError> {
        Ok(self
            .local
            .list_json::<EndpointRecord>(keys::ENDPOINTS)
            .await?
            .into_iter()
            .map(|(_, r)| r.value)
            .collect())
    }

    async fn desired(&self) -> Result<DesiredState, DriverError> {
        let networks = self.networks().await?;
        // Only joined endpoints of this host's networks that have a way out publish.
        let published = self
            .endpoints()
            .await?
            .into_iter()
            .filter(|e| e.joined && networks.iter().any(|n| n.id == e.network_id && !n.internal))
            .flat_map(|e| e.published.into_iter().map(move |p| (e.address, p)))
            .collect();
        Ok(DesiredState {
            published,
            networks: networks
                .iter()
                .map(|n| NetworkSpec {
                    subnet: n.subnet,
                    gateway: n.gateway,
                    internal: n.internal,
                    host_access: n.host_access,
                })
                .collect(),
        })
    }

    /// Brings the host-wide datapath (gateways, subnet routes, firewall) to the
    /// networks in the store. One at a time, each reading the store when its turn
    /// comes, so the last one applied is never older than the last change.
    async fn sync(&self) -> Result<(), DriverError> {
        let _one = self.syncing.lock().await;
        let desired = self.desired().await?;
        Ok(self.datapath.sync(&desired).await?)
    }

    async fn resync(&self) -> Result<(), DriverError> {
        let _one = self.syncing.lock().await;
        let desired = self.desired().await?;
        Ok(self.datapath.resync(&desired).await?)
    }

    /// Brings the kernel in line with the store: repairs what is missing, forgets
    /// endpoints whose container is gone, removes what no endpoint owns. Runs at start
    /// and on a timer. Addresses are left to IPAM: Docker releases them itself. Takes
    /// each endpoint's locks only while it looks at that endpoint, so requests for
    /// other containers go on meanwhile.
    pub async fn reconcile(&self) -> Result<ReconcileReport, DriverError> {
        let thorough = self
            .passes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .is_multiple_of(THOROUGH_EVERY);
        let mut report = ReconcileReport::default();
        let mut errors = Vec::new();
        let endpoints = self.endpoints().await?;
        let networks: std::collections::BTreeSet<String> =
            self.networks().await?.into_iter().map(|n| n.id).collect();
        let specs: Vec<EndpointSpec> = endpoints.iter().map(EndpointRecord::spec).collect();
        let needing_setup = self.datapath.endpoints_needing_setup(&specs).await?;
        for listed in endpoints {
            // A joined endpoint of a known network whose links and route are as set up
            // needs nothing; anything else is looked at closely, under its locks.
            let quiet = !thorough
                && listed.joined
                && networks.contains(&listed.network_id)
                && !needing_setup.contains(&listed.host_if);
            if quiet {
                continue;
            }
            let _net = self
                .locks
                .read(&lock_keys::network(&listed.network_id))
                .await;
            let _ep = self.locks.write(&lock_keys::endpoint(&listed.id)).await;
            // Read again under the locks: it may have changed or gone meanwhile.
            let key = keys::endpoint(&listed.id);
            let Some(ep) = self.local.get_json::<EndpointRecord>(&key).await? else {
                continue;
            };
            let ep = ep.value;
            let network_known = self
                .local
                .get(&keys::network(&ep.network_id))
                .await?
                .is_some();
            let container_gone = ep.joined && !self.datapath.host_link_exists(&ep.host_if).await?;
            if !ep.joined && ep.since == 0 {
                // Written before weft kept the time: start counting now.
                self.local
                    .modify_json::<EndpointRecord, DriverError, _>(&key, |cur| {
                        Ok(cur.map(|mut e| {
                            e.since = unix_now();
                            e
                        }))
                    })
                    .await?;
            }
            let never_joined = !ep.joined && self.unjoined_too_long(&ep);
            if !network_known || container_gone || never_joined {
                info!(endpoint = %short(&ep.id), network_known, container_gone, never_joined, "forgetting stale endpoint");
                if let Err(e) = self.datapath.teardown_endpoint(&ep.spec()).await {
                    errors.push(DriverError::from(e));
                }
                self.local.delete(&key, None).await?;
                report.stale_endpoints += 1;
            } else if let Err(e) = self.datapath.setup_endpoint(&ep.spec()).await {
                errors.push(e.into());
            }
        }
        // A link with no record may belong to an endpoint being created (its record
        // and link are written side by side): decided under that endpoint's lock.
        let links = self.datapath.endpoint_links().await?;
        let endpoints = self.endpoints().await?;
        let owned = |endpoints: &[EndpointRecord], link: &str| {
            endpoints
                .iter()
                .any(|e| e.host_if == link || e.container_if == link)
        };
        for link in links {
            if owned(&endpoints, &link) {
                continue;
            }
            let _ep = self.locks.write(&lock_keys::endpoint_of_link(&link)).await;
            if owned(&self.endpoints().await?, &link) {
                continue;
            }
            info!(%link, "removing link that no endpoint owns");
            match self.datapath.delete_link(&link).await {
                Ok(()) => report.orphan_links += 1,
                // Gone with its peer, or torn down by its endpoint's removal meanwhile.
                Err(DatapathError::NotFound { .. }) => {}
                Err(e) => errors.push(e.into()),
            }
        }
        if let Err(e) = self.resync().await {
            errors.push(e);
        }
        first_error(errors).map(|()| report)
    }
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReconcileReport {
    pub stale_endpoints: usize,
    pub orphan_links: usize,
}

fn check_id(what: &str, id: &str) -> Result<(), DriverError> {
    if id.is_empty() || id.len() > 128 || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(DriverError::Invalid(format!(
            "{what} {id:?} is not a valid ID"
        )));
    }
    Ok(())
}

fn parse_cidr(what: &str, s: &str) -> Result<Ipv4Network, DriverError> {
    s.parse()
        .map_err(|_| DriverError::Invalid(format!("{what} {s:?} is not an IPv4 CIDR")))
}

fn first_error(errors: Vec<DriverError>) -> Result<(), DriverError> {
    let mut iter = errors.into_iter();
    match iter.next() {
        None => Ok(()),
        Some(first) => {
            for rest in iter {
                warn!(error = %rest, "further teardown error");
            }
            Err(first)
        }
    }
}

#[cfg(test)]
mod tests;

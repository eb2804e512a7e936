//! The kernel side: veth pairs, routes, gateway addresses, sysctls and the firewall.
//!
//! The driver speaks to the kernel only through [`Datapath`]. Every method is
//! idempotent and expressed as desired state, so the same calls serve request
//! handlers and the reconcile loop. Netlink types stay inside `netlink.rs`.

pub mod fake;
pub mod firewall;
pub mod netlink;
pub mod sysctl;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use async_trait::async_trait;
use ipnetwork::Ipv4Network;

use crate::ports::{Proto, Published};

/// Name prefix of the host end of every endpoint's veth pair.
pub const HOST_IF_PREFIX: &str = "wfh";
/// Name prefix of the container end (renamed by Docker once it is moved).
pub const CONTAINER_IF_PREFIX: &str = "wfc";
/// Link holding every network's gateway address (the anycast gateway): a bridge
/// with no ports, since not every kernel has the dummy driver.
pub const GATEWAY_LINK: &str = "weft-gw";

/// What the kernel should have for one endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSpec {
    pub host_if: String,
    pub container_if: String,
    pub address: Ipv4Addr,
    pub mtu: u32,
}

/// What the kernel should have for one network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkSpec {
    pub subnet: Ipv4Network,
    pub gateway: Option<Ipv4Addr>,
    pub internal: bool,
    /// Its containers may reach every address and port of the host.
    pub host_access: bool,
}

/// Containers' DNS queries to servers outside weft's subnets go to weft's resolver
/// (issue 12): nftables TPROXY marks them with this, and a rule sends marked packets
/// to a table whose one route delivers everything locally ("weft" in ASCII).
pub const NAMES_MARK: u32 = 0x7765_6674;
/// The routing table of marked DNS queries, and its rule's priority (before `main`).
pub const NAMES_TABLE: u32 = 30565;
pub const NAMES_RULE_PRIORITY: u32 = 30565;

/// The host-wide desired state of this host's datapath. Endpoints are not part of
/// it: each has its own links and route ([`Datapath::setup_endpoint`]), and the
/// firewall checks a container's source address against that route, so nothing
/// host-wide changes when a container comes or goes, unless it publishes ports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub networks: Vec<NetworkSpec>,
    /// Ports published on this host: (container address, port).
    pub published: BTreeSet<(Ipv4Addr, Published)>,
}

/// Kernel errors, classified once here so callers can decide what "already there"
/// or "already gone" means for them.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("{what}: already exists")]
    AlreadyExists { what: String },
    #[error("{what}: not found")]
    NotFound { what: String },
    #[error("{what}: permission denied (weft needs CAP_NET_ADMIN)")]
    PermissionDenied { what: String },
    #[error("{what}: {message}")]
    Kernel { what: String, message: String },
    #[error("firewall: {0}")]
    Firewall(String),
    #[error("sysctl {path}: {source}")]
    Sysctl {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{} errors: {}", .0.len(), .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    Many(Vec<DatapathError>),
}

impl DatapathError {
    /// Collapse a list of teardown errors into one result.
    pub fn collect(errors: Vec<DatapathError>) -> Result<(), DatapathError> {
        match errors.len() {
            0 => Ok(()),
            1 => Err(errors.into_iter().next().expect("one error")),
            _ => Err(DatapathError::Many(errors)),
        }
    }
}

#[async_trait]
pub trait Datapath: Send + Sync + 'static {
    /// MTU of the underlay: the link of the default route (or the largest other link).
    async fn underlay_mtu(&self) -> Result<u32, DatapathError>;
    /// Destinations of the host's routes that weft did not install (for choosing
    /// automatic pools that collide with nothing).
    async fn host_routes(&self) -> Result<Vec<Ipv4Network>, DatapathError>;
    /// Creates (or repairs) the veth pair, MTU, link state, proxy ARP and host route.
    async fn setup_endpoint(&self, ep: &EndpointSpec) -> Result<(), DatapathError>;
    /// Removes the pair and the route; absent pieces are fine; never stops early.
    async fn teardown_endpoint(&self, ep: &EndpointSpec) -> Result<(), DatapathError>;
    /// Whether the host end of an endpoint exists (it vanishes with the container's
    /// namespace once Docker has moved the container end).
    async fn host_link_exists(&self, host_if: &str) -> Result<bool, DatapathError>;
    /// Names of every link in this namespace with one of weft's endpoint prefixes.
    async fn endpoint_links(&self) -> Result<Vec<String>, DatapathError>;
    /// The host ends (`host_if`) of those of `endpoints` whose kernel state is not as
    /// [`Datapath::setup_endpoint`] leaves it: the host end missing or down, a wrong
    /// MTU, or no /32 through it. One look at the kernel for all of them, so a pass
    /// over many healthy endpoints costs next to nothing per endpoint.
    async fn endpoints_needing_setup(
        &self,
        endpoints: &[EndpointSpec],
    ) -> Result<std::collections::BTreeSet<String>, DatapathError>;
    async fn delete_link(&self, name: &str) -> Result<(), DatapathError>;
    /// Brings networks (gateway addresses, subnet routes) and the firewall to
    /// `desired`, removing whatever weft installed that is not in it (an endpoint's
    /// route goes with its link). Skips the firewall when it is what weft last applied.
    async fn sync(&self, desired: &DesiredState) -> Result<(), DatapathError>;
    /// Like `sync`, but rewrites and re-verifies everything, repairing changes made
    /// behind weft's back (the reconciler).
    async fn resync(&self, desired: &DesiredState) -> Result<(), DatapathError>;
    /// Routes to other hosts' blocks through the tunnel interface: exactly `blocks`.
    async fn sync_tunnel_routes(
        &self,
        tunnel_if: &str,
        blocks: &[Ipv4Network],
    ) -> Result<(), DatapathError>;
    /// Adds routes to `add` and deletes those to `remove` through the tunnel interface,
    /// without a dump: for a caller that knows the difference.
    async fn change_tunnel_routes(
        &self,
        tunnel_if: &str,
        add: &[Ipv4Network],
        remove: &[Ipv4Network],
    ) -> Result<(), DatapathError>;
    /// The first IPv4 address of the default route's link (the underlay address).
    async fn default_address(&self) -> Result<Option<Ipv4Addr>, DatapathError>;
    /// Whether no process of the host holds `port` (on `ip`, or on any address): a
    /// brief bind, so it is cheap enough to try a range port by port. An `ip` that is
    /// not the host's is an error.
    fn host_port_free(
        &self,
        proto: Proto,
        ip: Option<Ipv4Addr>,
        port: u16,
    ) -> Result<bool, DatapathError>;
}

/// The host and container link names for an endpoint ID (at most 15 bytes each).
pub fn link_names(endpoint_id: &str) -> Option<(String, String)> {
    let id = endpoint_id.get(..12)?;
    if !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let id = id.to_ascii_lowercase();
    Some((
        format!("{HOST_IF_PREFIX}{id}"),
        format!("{CONTAINER_IF_PREFIX}{id}"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_names_fit_the_kernel_limit_and_reject_non_hex() {
        let (h, c) = link_names("9ab1c2d3e4f5a6b7c8d9").unwrap();
        assert_eq!(h, "wfh9ab1c2d3e4f5");
        assert_eq!(c, "wfc9ab1c2d3e4f5");
        assert!(h.len() <= 15 && c.len() <= 15);
        assert!(link_names("short").is_none());
        assert!(link_names("zzzzzzzzzzzzzzzz").is_none());
        assert!(link_names("ü1234567890123").is_none());
    }
}

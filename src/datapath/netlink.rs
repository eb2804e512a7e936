//! The real datapath: rtnetlink for links, addresses and routes, sysctls for proxy
//! ARP, and the firewall module for nftables/iptables. Netlink types stay in here.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::TryStreamExt;
use ipnetwork::Ipv4Network;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{InfoData, InfoVeth, LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::{Handle, IpVersion, LinkBridge, LinkUnspec, LinkVeth, RouteMessageBuilder};
use tracing::{debug, info, warn};

use super::sysctl::Sysctl;
use super::{
    firewall, Datapath, DatapathError, DesiredState, EndpointSpec, CONTAINER_IF_PREFIX,
    GATEWAY_LINK, HOST_IF_PREFIX, NAMES_MARK, NAMES_RULE_PRIORITY, NAMES_TABLE,
};
use crate::ports::Proto;

/// Routing protocol number that marks routes weft installed (`ip route show proto 87`).
pub const ROUTE_PROTOCOL: u8 = 87;
/// Marks weft's routes to other hosts' blocks through the tunnel (`proto 88`).
pub const TUNNEL_ROUTE_PROTOCOL: u8 = 88;

pub struct NetlinkDatapath {
    handle: Handle,
    sysctl: Sysctl,
    /// When the iptables accept rules were last verified, and for which state. Each
    /// check spawns iptables several times, so request-path syncs reuse a recent one;
    /// the reconciler's passes (further apart than this) re-verify.
    iptables_checked: std::sync::Mutex<Option<(bool, Instant)>>,
    /// The firewall state weft last applied: a sync that would apply the same skips `nft`.
    nft_applied: std::sync::Mutex<Option<DesiredState>>,
    /// The tunnel interface whose traffic to containers is accepted, if any.
    tunnel_if: Option<String>,
    /// The port of weft's resolver, which takes containers' DNS queries, if it runs.
    names_port: Option<u16>,
    /// Whether the routing of those queries to the resolver was last set up (true)
    /// or removed (false).
    names_routing: std::sync::Mutex<Option<bool>>,
    /// One dump at a time on the shared netlink socket: the kernel answers a second
    /// concurrent dump with EBUSY (the mesh and the driver both dump routes).
    dumps: tokio::sync::Mutex<()>,
}

const IPTABLES_RECHECK: Duration = Duration::from_secs(5);

/// Turns an rtnetlink error into a domain error naming what was being done.
fn classify(what: impl Into<String>, err: rtnetlink::Error) -> DatapathError {
    let what = what.into();
    match &err {
        rtnetlink::Error::NetlinkError(msg) => match -msg.raw_code() {
            libc::EEXIST => DatapathError::AlreadyExists { what },
            libc::ENODEV | libc::ENOENT | libc::ESRCH | libc::EADDRNOTAVAIL => {
                DatapathError::NotFound { what }
            }
            libc::EPERM | libc::EACCES => DatapathError::PermissionDenied { what },
            _ => DatapathError::Kernel {
                what,
                message: msg.to_io().to_string(),
            },
        },
        other => DatapathError::Kernel {
            what,
            message: other.to_string(),
        },
    }
}

/// Treats "not found" as success (for idempotent deletes).
fn gone_ok(r: Result<(), DatapathError>) -> Result<(), DatapathError> {
    match r {
        Err(DatapathError::NotFound { .. }) => Ok(()),
        other => other,
    }
}

struct Link {
    index: u32,
    name: String,
    mtu: u32,
    up: bool,
}

fn link_of(msg: &LinkMessage) -> Link {
    let mut link = Link {
        index: msg.header.index,
        name: String::new(),
        mtu: 0,
        up: msg.header.flags.contains(LinkFlags::Up),
    };
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => link.name = n.clone(),
            LinkAttribute::Mtu(m) => link.mtu = *m,
            _ => {}
        }
    }
    link
}

struct Route {
    dst: Ipv4Network,
    kind: RouteType,
    oif: Option<u32>,
    protocol: RouteProtocol,
    message: RouteMessage,
}

fn route_of(msg: RouteMessage) -> Option<Route> {
    let mut table = msg.header.table as u32;
    let mut dst = Ipv4Addr::UNSPECIFIED;
    let mut oif = None;
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(RouteAddress::Inet(a)) => dst = *a,
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    if table != RouteHeader::RT_TABLE_MAIN as u32 {
        return None;
    }
    Some(Route {
        dst: Ipv4Network::new(dst, msg.header.destination_prefix_length).ok()?,
        kind: msg.header.kind,
        oif,
        protocol: msg.header.protocol,
        message: msg,
    })
}

impl NetlinkDatapath {
    /// Opens one netlink connection for the daemon's lifetime (its task is spawned here).
    pub fn connect(sysctl_root: &str) -> Result<Self, DatapathError> {
        let (connection, handle, _) =
            rtnetlink::new_connection().map_err(|e| DatapathError::Kernel {
                what: "netlink socket".into(),
                message: e.to_string(),
            })?;
        tokio::spawn(connection);
        Ok(Self {
            handle,
            sysctl: Sysctl::new(sysctl_root),
            iptables_checked: std::sync::Mutex::new(None),
            nft_applied: std::sync::Mutex::new(None),
            tunnel_if: None,
            names_port: None,
            names_routing: std::sync::Mutex::new(None),
            dumps: tokio::sync::Mutex::new(()),
        })
    }

    /// Accepts forwarded traffic from `tunnel_if` to containers (multi-host).
    pub fn with_tunnel(mut self, tunnel_if: &str) -> Self {
        self.tunnel_if = Some(tunnel_if.to_string());
        self
    }

    /// Hands containers' DNS queries to weft's resolver on `port` (several hosts).
    pub fn with_names_port(mut self, port: u16) -> Self {
        self.names_port = Some(port);
        self
    }

    async fn links(&self) -> Result<Vec<Link>, DatapathError> {
        let _dump = self.dumps.lock().await;
        let msgs: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| classify("list links", e))?;
        Ok(msgs.iter().map(link_of).collect())
    }

    async fn link(&self, name: &str) -> Result<Option<Link>, DatapathError> {
        let found = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute()
            .try_next()
            .await;
        match found {
            Ok(msg) => Ok(msg.as_ref().map(link_of)),
            Err(e) => match classify(format!("look up link {name}"), e) {
                DatapathError::NotFound { .. } => Ok(None),
                other => Err(other),
            },
        }
    }

    async fn set_link(&self, what: String, msg: LinkMessage) -> Result<(), DatapathError> {
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(|e| classify(what, e))
    }

    async fn routes(&self) -> Result<Vec<Route>, DatapathError> {
        let _dump = self.dumps.lock().await;
        let msgs: Vec<RouteMessage> = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(|e| classify("list routes", e))?;
        Ok(msgs.into_iter().filter_map(route_of).collect())
    }

    async fn delete_route(&self, route: &Route) -> Result<(), DatapathError> {
        gone_ok(
            self.handle
                .route()
                .del(route.message.clone())
                .execute()
                .await
                .map_err(|e| classify(format!("delete route {}", route.dst), e)),
        )
    }

    async fn tunnel_link(&self, tunnel_if: &str) -> Result<Link, DatapathError> {
        self.link(tunnel_if)
            .await?
            .ok_or_else(|| DatapathError::NotFound {
                what: format!("tunnel link {tunnel_if}"),
            })
    }

    fn tunnel_route(block: Ipv4Network, tunnel_index: u32) -> RouteMessage {
        RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(block.network(), block.prefix())
            .protocol(RouteProtocol::Other(TUNNEL_ROUTE_PROTOCOL))
            .output_interface(tunnel_index)
            .scope(RouteScope::Link)
            .build()
    }

    async fn add_tunnel_route(
        &self,
        block: Ipv4Network,
        tunnel_index: u32,
        tunnel_if: &str,
    ) -> Result<(), DatapathError> {
        let msg = Self::tunnel_route(block, tunnel_index);
        let r = self.handle.route().add(msg).replace().execute().await;
        r.map_err(|e| classify(format!("route {block} via {tunnel_if}"), e))
    }

    fn weft_route(dst: Ipv4Network) -> RouteMessageBuilder<Ipv4Addr> {
        RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst.network(), dst.prefix())
            .protocol(RouteProtocol::Other(ROUTE_PROTOCOL))
    }

    /// Creates the pair, both ends with the endpoint's MTU, the host end up. Returns
    /// whether it was created (false: it exists already).
    async fn create_pair(&self, ep: &EndpointSpec) -> Result<bool, DatapathError> {
        let peer = LinkUnspec::new_with_name(&ep.container_if)
            .mtu(ep.mtu)
            .build();
        let msg = LinkVeth::new(&ep.host_if, &ep.container_if)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .mtu(ep.mtu)
            .up()
            .build();
        let created = self
            .handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(|e| classify(format!("create veth {}", ep.host_if), e));
        match created {
            Ok(()) => {
                info!(link = %ep.host_if, peer = %ep.container_if, mtu = ep.mtu, "veth pair created");
                Ok(true)
            }
            Err(DatapathError::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn sync_gateways(&self, desired: &DesiredState) -> Result<(), DatapathError> {
        let wanted: BTreeSet<Ipv4Addr> = desired
            .networks
            .iter()
            .filter(|n| !n.internal)
            .filter_map(|n| n.gateway)
            .collect();
        let existing = self.link(GATEWAY_LINK).await?;
        if wanted.is_empty() {
            if let Some(link) = existing {
                gone_ok(self.delete_index(link.index, GATEWAY_LINK).await)?;
            }
            return Ok(());
        }
        let link = match existing {
            Some(l) => l,
            None => {
                let add = self
                    .handle
                    .link()
                    .add(LinkBridge::new(GATEWAY_LINK).up().build())
                    .execute()
                    .await;
                match add.map_err(|e| classify(format!("create {GATEWAY_LINK}"), e)) {
                    Ok(()) | Err(DatapathError::AlreadyExists { .. }) => {}
                    Err(e) => return Err(e),
                }
                self.link(GATEWAY_LINK)
                    .await?
                    .ok_or_else(|| DatapathError::NotFound {
                        what: GATEWAY_LINK.into(),
                    })?
            }
        };
        self.set_link(
            format!("bring up {GATEWAY_LINK}"),
            LinkUnspec::new_with_index(link.index).up().build(),
        )
        .await?;
        let dump = self.dumps.lock().await;
        let addrs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(link.index)
            .execute()
            .try_collect()
            .await
            .map_err(|e| classify("list gateway addresses", e))?;
        drop(dump);
        let mut present = BTreeSet::new();
        for msg in addrs {
            let ip = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(IpAddr::V4(ip))
                | AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            });
            match ip {
                Some(ip) if wanted.contains(&ip) && msg.header.prefix_len == 32 => {
                    present.insert(ip);
                }
                _ => {
                    let r = self.handle.address().del(msg).execute().await;
                    gone_ok(r.map_err(|e| classify("remove stale gateway address", e)))?;
                }
            }
        }
        for ip in wanted.difference(&present) {
            let r = self
                .handle
                .address()
                .add(link.index, IpAddr::V4(*ip), 32)
                .execute()
                .await;
            match r.map_err(|e| classify(format!("add gateway {ip}"), e)) {
                Ok(()) | Err(DatapathError::AlreadyExists { .. }) => {
                    debug!(gateway = %ip, "gateway address added")
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    async fn sync_routes(&self, desired: &DesiredState) -> Result<(), DatapathError> {
        let routes = self.routes().await?;
        let ours = |r: &&Route| r.protocol == RouteProtocol::Other(ROUTE_PROTOCOL);
        let subnets: BTreeSet<Ipv4Network> = desired.networks.iter().map(|n| n.subnet).collect();
        let mut errors = Vec::new();
        for r in routes.iter().filter(ours) {
            let wanted = match r.kind {
                RouteType::Unreachable => subnets.contains(&r.dst),
                // An endpoint's route lives and dies with its link (the endpoint's
                // teardown, or the reconciler's removal of a link no endpoint owns),
                // so a sync never races an endpoint being set up meanwhile.
                _ => r.dst.prefix() == 32 && r.oif.is_some(),
            };
            if !wanted {
                debug!(dst = %r.dst, "removing stale route");
                if let Err(e) = self.delete_route(r).await {
                    errors.push(e);
                }
            }
        }
        // Addresses of a subnet that no local container holds are unreachable here,
        // rather than leaking out of the default route.
        for subnet in subnets {
            let present = routes
                .iter()
                .filter(ours)
                .any(|r| r.dst == subnet && r.kind == RouteType::Unreachable);
            if !present {
                let msg = Self::weft_route(subnet)
                    .kind(RouteType::Unreachable)
                    .build();
                // A plain add, never a replace: a route of the host's own for the same
                // subnet (allowed with weft.allow-route-overlap) stays as it is.
                let r = self.handle.route().add(msg).execute().await;
                match r.map_err(|e| classify(format!("add unreachable route {subnet}"), e)) {
                    Ok(()) => {}
                    Err(DatapathError::AlreadyExists { .. }) => {
                        debug!(%subnet, "the host has its own route for this subnet; leaving it")
                    }
                    Err(e) => errors.push(e),
                }
            }
        }
        DatapathError::collect(errors)
    }

    /// `full` rewrites the whole firewall and re-verifies iptables; otherwise the
    /// firewall is left alone when it is what weft last applied.
    async fn sync_with(&self, desired: &DesiredState, full: bool) -> Result<(), DatapathError> {
        let mut errors = Vec::new();
        let started = Instant::now();
        if !desired.networks.is_empty() {
            if let Err(e) = self.sysctl.set("ipv4/ip_forward", "1").await {
                errors.push(e);
            }
        }
        for result in [
            self.sync_gateways(desired).await,
            self.sync_routes(desired).await,
            self.sync_nftables(desired, full).await,
            self.sync_names_routing(desired, full).await,
        ] {
            if let Err(e) = result {
                errors.push(e);
            }
        }
        if full {
            *self
                .iptables_checked
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = None;
        }
        if let Err(e) = self.sync_iptables(!desired.networks.is_empty()).await {
            errors.push(e);
        }
        debug!(
            full,
            micros = started.elapsed().as_micros() as u64,
            "datapath synced"
        );
        DatapathError::collect(errors)
    }

    async fn sync_nftables(&self, desired: &DesiredState, full: bool) -> Result<(), DatapathError> {
        let unchanged = !full
            && self
                .nft_applied
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                == Some(desired);
        if unchanged {
            return Ok(());
        }
        let result =
            firewall::apply_nftables(desired, self.tunnel_if.as_deref(), self.names_port).await;
        *self.nft_applied.lock().unwrap_or_else(|p| p.into_inner()) =
            result.is_ok().then(|| desired.clone());
        result
    }

    /// The rule and route that deliver DNS queries marked by TPROXY to the resolver's
    /// socket (`ip rule fwmark 0x77656674 lookup 30565`, `local 0.0.0.0/0 dev lo
    /// table 30565`) and iptables' accept of them in `INPUT`, while there are
    /// networks; gone when there are none.
    async fn sync_names_routing(
        &self,
        desired: &DesiredState,
        full: bool,
    ) -> Result<(), DatapathError> {
        let wanted = self.names_port.is_some() && !desired.networks.is_empty();
        let last = *self.names_routing.lock().unwrap_or_else(|p| p.into_inner());
        if !full && last == Some(wanted) {
            return Ok(());
        }
        if !wanted && last.is_none() && self.names_port.is_none() {
            return Ok(()); // never set up by this process, and never will be
        }
        let result = self.apply_names_routing(wanted).await;
        *self.names_routing.lock().unwrap_or_else(|p| p.into_inner()) =
            result.is_ok().then_some(wanted);
        result
    }

    async fn apply_names_routing(&self, wanted: bool) -> Result<(), DatapathError> {
        let rules: Vec<RuleMessage> = {
            let _dump = self.dumps.lock().await;
            self.handle
                .rule()
                .get(IpVersion::V4)
                .execute()
                .try_collect()
                .await
                .map_err(|e| classify("list routing rules", e))?
        };
        let ours = |r: &RuleMessage| {
            r.attributes.contains(&RuleAttribute::FwMark(NAMES_MARK))
                && r.attributes.contains(&RuleAttribute::Table(NAMES_TABLE))
        };
        let lo = self
            .link("lo")
            .await?
            .ok_or_else(|| DatapathError::NotFound {
                what: "link lo".into(),
            })?;
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
            .table_id(NAMES_TABLE)
            .kind(RouteType::Local)
            .scope(RouteScope::Host)
            .protocol(RouteProtocol::Other(ROUTE_PROTOCOL))
            .output_interface(lo.index)
            .build();
        if !wanted {
            let mut errors = Vec::new();
            if let Err(e) = firewall::apply_iptables_input(false).await {
                errors.push(e);
            }
            for rule in rules.into_iter().filter(ours) {
                let r = self.handle.rule().del(rule).execute().await;
                if let Err(e) = gone_ok(r.map_err(|e| classify("delete the DNS rule", e))) {
                    errors.push(e);
                }
            }
            let r = self.handle.route().del(route).execute().await;
            if let Err(e) = gone_ok(r.map_err(|e| classify("delete the DNS route", e))) {
                errors.push(e);
            }
            return DatapathError::collect(errors);
        }
        let r = self.handle.route().add(route).replace().execute().await;
        r.map_err(|e| classify(format!("local route in table {NAMES_TABLE}"), e))?;
        if !rules.iter().any(ours) {
            let r = self
                .handle
                .rule()
                .add()
                .v4()
                .fw_mark(NAMES_MARK)
                .table_id(NAMES_TABLE)
                .priority(NAMES_RULE_PRIORITY)
                .action(RuleAction::ToTable)
                .execute()
                .await;
            r.map_err(|e| classify(format!("rule fwmark {NAMES_MARK:#x}"), e))?;
        }
        firewall::apply_iptables_input(true).await
    }

    async fn sync_iptables(&self, active: bool) -> Result<(), DatapathError> {
        let recent = |c: &Option<(bool, Instant)>| matches!(c, Some((a, at)) if *a == active && at.elapsed() < IPTABLES_RECHECK);
        if recent(
            &self
                .iptables_checked
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        ) {
            return Ok(());
        }
        let result = firewall::apply_iptables(active, self.tunnel_if.as_deref()).await;
        *self
            .iptables_checked
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = result.is_ok().then(|| (active, Instant::now()));
        result
    }

    async fn delete_index(&self, index: u32, name: &str) -> Result<(), DatapathError> {
        self.handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(|e| classify(format!("delete link {name}"), e))
    }
}

#[async_trait]
impl Datapath for NetlinkDatapath {
    async fn underlay_mtu(&self) -> Result<u32, DatapathError> {
        let links = self.links().await?;
        let default_oif = self
            .routes()
            .await?
            .into_iter()
            .find(|r| r.dst.prefix() == 0 && r.kind == RouteType::Unicast)
            .and_then(|r| r.oif);
        if let Some(link) = default_oif.and_then(|i| links.iter().find(|l| l.index == i)) {
            return Ok(link.mtu);
        }
        let ours = |n: &str| {
            n == "lo"
                || n == GATEWAY_LINK
                || n.starts_with(HOST_IF_PREFIX)
                || n.starts_with(CONTAINER_IF_PREFIX)
        };
        Ok(links
            .iter()
            .filter(|l| !ours(&l.name))
            .map(|l| l.mtu)
            .max()
            .unwrap_or(1500))
    }

    async fn host_routes(&self) -> Result<Vec<Ipv4Network>, DatapathError> {
        Ok(self
            .routes()
            .await?
            .into_iter()
            .filter(|r| {
                r.protocol != RouteProtocol::Other(ROUTE_PROTOCOL)
                    && r.protocol != RouteProtocol::Other(TUNNEL_ROUTE_PROTOCOL)
                    && r.dst.prefix() > 0
            })
            .map(|r| r.dst)
            .collect())
    }

    async fn setup_endpoint(&self, ep: &EndpointSpec) -> Result<(), DatapathError> {
        // A new pair is created whole (both MTUs, host end up) in one request: the
        // container path makes as few round trips under the kernel's RTNL as it can.
        let created = self.create_pair(ep).await?;
        let host = self
            .link(&ep.host_if)
            .await?
            .ok_or_else(|| DatapathError::NotFound {
                what: format!("link {} right after creating it", ep.host_if),
            })?;
        if !created {
            // An existing pair (the reconciler's repair): the container end is ours to
            // configure only while it is still in this namespace.
            if let Some(peer) = self.link(&ep.container_if).await? {
                if peer.mtu != ep.mtu {
                    self.set_link(
                        format!("set MTU of {}", ep.container_if),
                        LinkUnspec::new_with_index(peer.index).mtu(ep.mtu).build(),
                    )
                    .await?;
                }
            }
            self.set_link(
                format!("set up {}", ep.host_if),
                LinkUnspec::new_with_index(host.index)
                    .mtu(ep.mtu)
                    .up()
                    .build(),
            )
            .await?;
        }
        // The host end answers ARP for the whole subnet (and for the gateway), at once.
        self.sysctl
            .set(&format!("ipv4/conf/{}/proxy_arp", ep.host_if), "1")
            .await?;
        self.sysctl
            .set(&format!("ipv4/neigh/{}/proxy_delay", ep.host_if), "0")
            .await?;
        // Lets the host reach its published ports over 127.0.0.1 (DNATed and
        // masqueraded out of this link); the firewall drops anything a container
        // sends to 127.0.0.0/8 through it.
        self.sysctl
            .set(&format!("ipv4/conf/{}/route_localnet", ep.host_if), "1")
            .await?;
        if let Err(e) = self
            .sysctl
            .set(&format!("ipv6/conf/{}/disable_ipv6", ep.host_if), "1")
            .await
        {
            debug!(error = %e, "could not disable IPv6 on the host end");
        }
        let route = Self::weft_route(Ipv4Network::new(ep.address, 32).expect("/32"))
            .output_interface(host.index)
            .scope(RouteScope::Link)
            .build();
        self.handle
            .route()
            .add(route)
            .replace()
            .execute()
            .await
            .map_err(|e| classify(format!("route {} via {}", ep.address, ep.host_if), e))
    }

    async fn teardown_endpoint(&self, ep: &EndpointSpec) -> Result<(), DatapathError> {
        // Deleting the host end takes the container end (while it is still here) and
        // every route through the link, the endpoint's /32 among them; a route another
        // endpoint holds for the address now goes through that one's link and stays.
        let mut errors = Vec::new();
        for name in [&ep.host_if, &ep.container_if] {
            match self.link(name).await {
                Ok(Some(link)) => {
                    if let Err(e) = gone_ok(self.delete_index(link.index, name).await) {
                        errors.push(e);
                    }
                }
                Ok(None) => {}
                Err(e) => errors.push(e),
            }
        }
        if errors.is_empty() {
            debug!(link = %ep.host_if, "endpoint datapath removed");
        } else {
            warn!(link = %ep.host_if, errors = errors.len(), "endpoint teardown incomplete");
        }
        DatapathError::collect(errors)
    }

    async fn host_link_exists(&self, host_if: &str) -> Result<bool, DatapathError> {
        Ok(self.link(host_if).await?.is_some())
    }

    async fn endpoint_links(&self) -> Result<Vec<String>, DatapathError> {
        Ok(self
            .links()
            .await?
            .into_iter()
            .map(|l| l.name)
            .filter(|n| n.starts_with(HOST_IF_PREFIX) || n.starts_with(CONTAINER_IF_PREFIX))
            .collect())
    }

    async fn endpoints_needing_setup(
        &self,
        endpoints: &[EndpointSpec],
    ) -> Result<BTreeSet<String>, DatapathError> {
        let links: std::collections::HashMap<String, Link> = self
            .links()
            .await?
            .into_iter()
            .map(|l| (l.name.clone(), l))
            .collect();
        let routed: BTreeSet<(Ipv4Addr, u32)> = self
            .routes()
            .await?
            .iter()
            .filter(|r| r.protocol == RouteProtocol::Other(ROUTE_PROTOCOL) && r.dst.prefix() == 32)
            .filter_map(|r| Some((r.dst.ip(), r.oif?)))
            .collect();
        Ok(endpoints
            .iter()
            .filter(|e| match links.get(&e.host_if) {
                None => true,
                Some(l) => !l.up || l.mtu != e.mtu || !routed.contains(&(e.address, l.index)),
            })
            .map(|e| e.host_if.clone())
            .collect())
    }

    async fn delete_link(&self, name: &str) -> Result<(), DatapathError> {
        match self.link(name).await? {
            Some(link) => self.delete_index(link.index, name).await,
            None => Err(DatapathError::NotFound {
                what: format!("link {name}"),
            }),
        }
    }

    async fn sync(&self, desired: &DesiredState) -> Result<(), DatapathError> {
        self.sync_with(desired, false).await
    }

    async fn resync(&self, desired: &DesiredState) -> Result<(), DatapathError> {
        self.sync_with(desired, true).await
    }

    async fn sync_tunnel_routes(
        &self,
        tunnel_if: &str,
        blocks: &[Ipv4Network],
    ) -> Result<(), DatapathError> {
        let dev = self.tunnel_link(tunnel_if).await?;
        let wanted: BTreeSet<Ipv4Network> = blocks.iter().copied().collect();
        let routes = self.routes().await?;
        let ours: Vec<&Route> = routes
            .iter()
            .filter(|r| r.protocol == RouteProtocol::Other(TUNNEL_ROUTE_PROTOCOL))
            .collect();
        let mut errors = Vec::new();
        for r in &ours {
            if !wanted.contains(&r.dst) || r.oif != Some(dev.index) {
                if let Err(e) = self.delete_route(r).await {
                    errors.push(e);
                }
            }
        }
        for block in &wanted {
            if ours
                .iter()
                .any(|r| r.dst == *block && r.oif == Some(dev.index))
            {
                continue;
            }
            if let Err(e) = self.add_tunnel_route(*block, dev.index, tunnel_if).await {
                errors.push(e);
            }
        }
        DatapathError::collect(errors)
    }

    async fn change_tunnel_routes(
        &self,
        tunnel_if: &str,
        add: &[Ipv4Network],
        remove: &[Ipv4Network],
    ) -> Result<(), DatapathError> {
        if add.is_empty() && remove.is_empty() {
            return Ok(());
        }
        let dev = self.tunnel_link(tunnel_if).await?;
        let mut errors = Vec::new();
        for block in remove {
            let msg = Self::tunnel_route(*block, dev.index);
            let r = self.handle.route().del(msg).execute().await;
            if let Err(e) = gone_ok(r.map_err(|e| classify(format!("delete route {block}"), e))) {
                errors.push(e);
            }
        }
        for block in add {
            if let Err(e) = self.add_tunnel_route(*block, dev.index, tunnel_if).await {
                errors.push(e);
            }
        }
        DatapathError::collect(errors)
    }

    async fn default_address(&self) -> Result<Option<Ipv4Addr>, DatapathError> {
        let Some(oif) = self
            .routes()
            .await?
            .into_iter()
            .find(|r| r.dst.prefix() == 0 && r.kind == RouteType::Unicast)
            .and_then(|r| r.oif)
        else {
            return Ok(None);
        };
        let dump = self.dumps.lock().await;
        let addrs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(oif)
            .execute()
            .try_collect()
            .await
            .map_err(|e| classify("list underlay addresses", e))?;
        drop(dump);
        Ok(addrs.iter().find_map(|m| {
            m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(IpAddr::V4(ip))
                | AddressAttribute::Address(IpAddr::V4(ip)) => Some(*ip),
                _ => None,
            })
        }))
    }

    fn host_port_free(
        &self,
        proto: Proto,
        ip: Option<Ipv4Addr>,
        port: u16,
    ) -> Result<bool, DatapathError> {
        let at = std::net::SocketAddrV4::new(ip.unwrap_or(Ipv4Addr::UNSPECIFIED), port);
        let bound = match proto {
            Proto::Tcp => std::net::TcpListener::bind(at).map(drop),
            Proto::Udp => std::net::UdpSocket::bind(at).map(drop),
        };
        match bound {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Ok(false),
            Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => {
                Err(DatapathError::NotFound {
                    what: format!("host address {}", at.ip()),
                })
            }
            Err(e) => Err(DatapathError::Kernel {
                what: format!("bind {at}/{proto}"),
                message: e.to_string(),
            }),
        }
    }
}

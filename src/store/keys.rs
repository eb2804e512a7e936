//! Every key weft writes, in one place (the schema is documented in
//! `docs/architecture.md`). Keys are relative: a store may put them under a prefix.
//!
//! Cluster-wide (shared by hosts): `pools/`, `blocks/`, `hosts/`, `overlays/`, `seen/`. Host-local: `networks/`,
//! `endpoints/`, `addresses/`. CIDRs are written with `_` instead of `/` so that a
//! key segment never contains a slash.

use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

pub const POOLS: &str = "pools/";
pub const BLOCKS: &str = "blocks/";
pub const NETWORKS: &str = "networks/";
pub const ENDPOINTS: &str = "endpoints/";
pub const ADDRESSES: &str = "addresses/";
pub const HOSTS: &str = "hosts/";
pub const OVERLAYS: &str = "overlays/";
pub const SEEN: &str = "seen/";

pub fn cidr_segment(net: Ipv4Network) -> String {
    format!("{}_{}", net.network(), net.prefix())
}

pub fn pool(pool: Ipv4Network) -> String {
    format!("{POOLS}{}", cidr_segment(pool))
}

pub fn blocks_of(pool: Ipv4Network) -> String {
    format!("{BLOCKS}{}/", cidr_segment(pool))
}

pub fn block(pool: Ipv4Network, block: Ipv4Network) -> String {
    format!("{}{}", blocks_of(pool), cidr_segment(block))
}

pub fn overlay(subnet: Ipv4Network) -> String {
    format!("{OVERLAYS}{}", cidr_segment(subnet))
}

pub fn seen(id: &str) -> String {
    format!("{SEEN}{id}")
}

pub fn host(id: &str) -> String {
    format!("{HOSTS}{id}")
}

pub fn network(id: &str) -> String {
    format!("{NETWORKS}{id}")
}

pub fn endpoint(id: &str) -> String {
    format!("{ENDPOINTS}{id}")
}

pub fn addresses_of(pool: Ipv4Network) -> String {
    format!("{ADDRESSES}{}/", cidr_segment(pool))
}

pub fn address(pool: Ipv4Network, ip: Ipv4Addr) -> String {
    format!("{}{ip}", addresses_of(pool))
}

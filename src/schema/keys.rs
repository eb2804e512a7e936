//! Every key weft writes, as a type that encodes and decodes itself (the schema is
//! documented in `docs/etcd-schema.md` and `docs/architecture.md`). Keys are
//! relative: a store may put them under a prefix.
//!
//! Cluster-wide (shared by hosts): `pools/`, `blocks/`, `reserved/`, `hosts/`,
//! `overlays/`, `seen/`, `cluster-networks/`.
//! Host-local: `networks/`, `endpoints/`, `addresses/`, `cluster-removals/`. CIDRs are written with `_`
//! instead of `/` so that a key segment never contains a slash.

use std::fmt;
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
pub const RESERVED: &str = "reserved/";
pub const CLUSTER_NETWORKS: &str = "cluster-networks/";
pub const CLUSTER_REMOVALS: &str = "cluster-removals/";
pub const NAMES: &str = "names/";

/// One stored key, decoded.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Key {
    Pool(Ipv4Network),
    Block {
        pool: Ipv4Network,
        block: Ipv4Network,
    },
    /// Addresses of `host`'s containers kept in a block it no longer owns.
    Reserved {
        pool: Ipv4Network,
        block: Ipv4Network,
        host: String,
    },
    Overlay(Ipv4Network),
    Host(String),
    Seen(String),
    /// A network created once for every host (`-o weft.scope=cluster`), by name.
    ClusterNetwork(String),
    /// The container names `host` publishes on the network of `subnet`.
    Names {
        subnet: Ipv4Network,
        host: String,
    },
    Network(String),
    /// A cluster network removed here whose record could not be removed yet, by uid.
    ClusterRemoval(String),
    Endpoint(String),
    Address {
        pool: Ipv4Network,
        ip: Ipv4Addr,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid key {0:?}")]
pub struct KeyError(pub String);

impl Key {
    /// Decodes a relative key (no store prefix). Every segment must be canonical:
    /// a CIDR is its network address, an id is non-empty and has no slash.
    pub fn parse(key: &str) -> Result<Key, KeyError> {
        let bad = || KeyError(key.to_string());
        let (kind, rest) = key.split_once('/').ok_or_else(bad)?;
        let segments: Vec<&str> = rest.split('/').collect();
        let parsed = match (kind, segments.as_slice()) {
            ("pools", [p]) => Key::Pool(parse_segment(p)?),
            ("blocks", [p, b]) => {
                let (pool, block) = parse_block(p, b).ok_or_else(bad)?;
                Key::Block { pool, block }
            }
            ("reserved", [p, b, id]) => {
                let (pool, block) = parse_block(p, b).ok_or_else(bad)?;
                Key::Reserved {
                    pool,
                    block,
                    host: parse_id(id)?,
                }
            }
            ("overlays", [s]) => Key::Overlay(parse_segment(s)?),
            ("hosts", [id]) => Key::Host(parse_id(id)?),
            ("seen", [id]) => Key::Seen(parse_id(id)?),
            ("cluster-networks", [name]) => Key::ClusterNetwork(parse_id(name)?),
            ("names", [s, id]) => Key::Names {
                subnet: parse_segment(s)?,
                host: parse_id(id)?,
            },
            ("networks", [id]) => Key::Network(parse_id(id)?),
            ("endpoints", [id]) => Key::Endpoint(parse_id(id)?),
            ("cluster-removals", [uid]) => Key::ClusterRemoval(parse_id(uid)?),
            ("addresses", [p, ip]) => {
                let pool = parse_segment(p)?;
                let ip: Ipv4Addr = ip.parse().map_err(|_| bad())?;
                if !pool.contains(ip) {
                    return Err(bad());
                }
                Key::Address { pool, ip }
            }
            _ => return Err(bad()),
        };
        Ok(parsed)
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Pool(p) => write!(f, "{POOLS}{}", cidr_segment(*p)),
            Key::Block { pool, block } => {
                write!(
                    f,
                    "{BLOCKS}{}/{}",
                    cidr_segment(*pool),
                    cidr_segment(*block)
                )
            }
            Key::Reserved { pool, block, host } => write!(
                f,
                "{RESERVED}{}/{}/{host}",
                cidr_segment(*pool),
                cidr_segment(*block)
            ),
            Key::Overlay(s) => write!(f, "{OVERLAYS}{}", cidr_segment(*s)),
            Key::Host(id) => write!(f, "{HOSTS}{id}"),
            Key::Seen(id) => write!(f, "{SEEN}{id}"),
            Key::ClusterNetwork(name) => write!(f, "{CLUSTER_NETWORKS}{name}"),
            Key::Names { subnet, host } => write!(f, "{NAMES}{}/{host}", cidr_segment(*subnet)),
            Key::Network(id) => write!(f, "{NETWORKS}{id}"),
            Key::Endpoint(id) => write!(f, "{ENDPOINTS}{id}"),
            Key::ClusterRemoval(uid) => write!(f, "{CLUSTER_REMOVALS}{uid}"),
            Key::Address { pool, ip } => write!(f, "{ADDRESSES}{}/{ip}", cidr_segment(*pool)),
        }
    }
}

pub fn cidr_segment(net: Ipv4Network) -> String {
    format!("{}_{}", net.network(), net.prefix())
}

fn parse_segment(seg: &str) -> Result<Ipv4Network, KeyError> {
    let bad = || KeyError(seg.to_string());
    let (ip, prefix) = seg.split_once('_').ok_or_else(bad)?;
    let ip: Ipv4Addr = ip.parse().map_err(|_| bad())?;
    let prefix: u8 = prefix.parse().map_err(|_| bad())?;
    let net = Ipv4Network::new(ip, prefix).map_err(|_| bad())?;
    if net.network() != ip {
        return Err(bad());
    }
    Ok(net)
}

/// A pool and one of its blocks (inside it, no larger).
fn parse_block(pool: &str, block: &str) -> Option<(Ipv4Network, Ipv4Network)> {
    let pool = parse_segment(pool).ok()?;
    let block = parse_segment(block).ok()?;
    (block.prefix() >= pool.prefix() && pool.contains(block.network())).then_some((pool, block))
}

fn parse_id(id: &str) -> Result<String, KeyError> {
    if id.is_empty() || id.contains('/') {
        return Err(KeyError(id.to_string()));
    }
    Ok(id.to_string())
}

pub fn pool(pool: Ipv4Network) -> String {
    Key::Pool(pool).to_string()
}

pub fn blocks_of(pool: Ipv4Network) -> String {
    format!("{BLOCKS}{}/", cidr_segment(pool))
}

pub fn block(pool: Ipv4Network, block: Ipv4Network) -> String {
    Key::Block { pool, block }.to_string()
}

/// The reservations in every block of `pool`.
pub fn reserved_of_pool(pool: Ipv4Network) -> String {
    format!("{RESERVED}{}/", cidr_segment(pool))
}

pub fn reserved(pool: Ipv4Network, block: Ipv4Network, host: &str) -> String {
    Key::Reserved {
        pool,
        block,
        host: host.to_string(),
    }
    .to_string()
}

pub fn overlay(subnet: Ipv4Network) -> String {
    Key::Overlay(subnet).to_string()
}

pub fn seen(id: &str) -> String {
    Key::Seen(id.to_string()).to_string()
}

pub fn host(id: &str) -> String {
    Key::Host(id.to_string()).to_string()
}

pub fn cluster_network(name: &str) -> String {
    Key::ClusterNetwork(name.to_string()).to_string()
}

/// Every host's container names on the network of `subnet`.
pub fn names_of(subnet: Ipv4Network) -> String {
    format!("{NAMES}{}/", cidr_segment(subnet))
}

pub fn names(subnet: Ipv4Network, host: &str) -> String {
    Key::Names {
        subnet,
        host: host.to_string(),
    }
    .to_string()
}

pub fn cluster_removal(uid: &str) -> String {
    Key::ClusterRemoval(uid.to_string()).to_string()
}

pub fn network(id: &str) -> String {
    Key::Network(id.to_string()).to_string()
}

pub fn endpoint(id: &str) -> String {
    Key::Endpoint(id.to_string()).to_string()
}

pub fn addresses_of(pool: Ipv4Network) -> String {
    format!("{ADDRESSES}{}/", cidr_segment(pool))
}

pub fn address(pool: Ipv4Network, ip: Ipv4Addr) -> String {
    Key::Address { pool, ip }.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_decodes_to_what_encoded_it() {
        let pool: Ipv4Network = "10.42.0.0/16".parse().unwrap();
        let keys = [
            Key::Pool(pool),
            Key::Block {
                pool,
                block: "10.42.0.64/26".parse().unwrap(),
            },
            Key::Reserved {
                pool,
                block: "10.42.0.64/26".parse().unwrap(),
                host: "ab12".into(),
            },
            Key::Overlay(pool),
            Key::Host("ab12".into()),
            Key::Seen("ab12".into()),
            Key::ClusterNetwork("app.net-1".into()),
            Key::Names {
                subnet: pool,
                host: "ab12".into(),
            },
            Key::Network("n1".into()),
            Key::Endpoint("e1".into()),
            Key::ClusterRemoval("ab12".into()),
            Key::Address {
                pool,
                ip: "10.42.0.5".parse().unwrap(),
            },
        ];
        for key in keys {
            assert_eq!(Key::parse(&key.to_string()), Ok(key.clone()), "{key}");
        }
    }

    #[test]
    fn malformed_keys_are_errors_not_guesses() {
        for bad in [
            "pools/10.42.0.0",
            "pools/10.42.0.1_16",
            "blocks/10.42.0.0_16",
            "blocks/10.42.0.0_16/10.43.0.0_26",
            "blocks/10.42.0.0_16/10.0.0.0_8",
            "blocks/10.42.0.0_16/10.42.0.0_26/x",
            "hosts/",
            "cluster-networks/",
            "cluster-networks/a/b",
            "reserved/10.42.0.0_16/10.42.0.0_26",
            "reserved/10.42.0.0_16/10.43.0.0_26/ab12",
            "reserved/10.42.0.0_16/10.42.0.0_26/",
            "addresses/10.42.0.0_16/10.43.0.1",
            "unknown/x",
            "nokind",
        ] {
            assert!(Key::parse(bad).is_err(), "{bad} parsed");
        }
    }
}

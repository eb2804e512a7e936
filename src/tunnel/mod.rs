//! The encrypted tunnel between hosts: one WireGuard interface per host.
//!
//! [`Tunnel`] takes the desired peer set and applies only the difference, so a peer
//! whose settings did not change keeps its session. wireguard-control types stay in
//! `wireguard.rs`.

pub mod fake;
pub mod keys;
pub mod wireguard;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::SystemTime;

use async_trait::async_trait;
use ipnetwork::Ipv4Network;

/// One remote host as the tunnel should know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Base64 WireGuard public key.
    pub public_key: String,
    pub endpoint: SocketAddr,
    /// The host's address blocks: what it may send from and what is routed to it.
    pub allowed_ips: Vec<Ipv4Network>,
    pub keepalive: Option<u16>,
}

/// What the tunnel reports about a peer (for `weft status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    pub public_key: String,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<Ipv4Network>,
    pub last_handshake: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// Which WireGuard carries the tunnel (for `weft status` and the start log).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Implementation {
    /// `kernel` or `userspace`.
    pub kind: String,
    /// The userspace program, and the version it reports.
    pub program: Option<String>,
    pub version: Option<String>,
    /// Whether the userspace program has the TUN and UDP offloads (GSO/GRO) that
    /// wireguard-go gained in 0.0.20231211; None when not known.
    pub offloads: Option<bool>,
}

/// Reads `<program> --version`: the version (the first word that starts with a digit,
/// or `v` and a digit), and whether the program is wireguard-go.
pub fn parse_version(output: &str) -> (Option<String>, bool) {
    let first = output.lines().next().unwrap_or_default();
    let version = first
        .split_whitespace()
        .map(|w| w.strip_prefix('v').unwrap_or(w))
        .find(|w| w.starts_with(|c: char| c.is_ascii_digit()))
        .map(str::to_string);
    (version, first.starts_with("wireguard-go"))
}

/// Whether a wireguard-go binary has the TUN and UDP offloads (GSO/GRO) that came in
/// 0.0.20231211. Its version string cannot tell (Debian's build of 0.0.20231211
/// reports v0.0.20230223), so look for the code: UDP GRO on the TUN side and UDP
/// GSO on the socket side, by their function names, which Go keeps in every binary.
pub fn has_offloads(binary: &[u8]) -> bool {
    const MARKS: [&[u8]; 2] = [
        b"golang.zx2c4.com/wireguard/tun.newUDPGROTable",
        b"golang.zx2c4.com/wireguard/conn.setGSOSize",
    ];
    MARKS
        .iter()
        .all(|mark| binary.windows(mark.len()).any(|w| w == *mark))
}

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("wireguard {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("wireguard: {0}")]
    Setup(String),
}

#[async_trait]
pub trait Tunnel: Send + Sync + 'static {
    /// Name of the interface routes to remote blocks point at.
    fn interface(&self) -> &str;
    /// This host's public key (base64).
    fn public_key(&self) -> String;
    /// Creates or adopts the interface, sets key, port and MTU, brings it up.
    async fn ensure_device(&self) -> Result<(), TunnelError>;
    /// Makes the peer set equal to `peers`, touching only what differs.
    async fn apply_peers(&self, peers: &[Peer]) -> Result<PeerDiff, TunnelError>;
    /// Sets `upserts` (added, or replaced whole) and removes the peers keyed
    /// `removals`, without reading the device: for a caller that knows the difference.
    async fn change_peers(&self, upserts: &[Peer], removals: &[String]) -> Result<(), TunnelError>;
    async fn peers(&self) -> Result<Vec<PeerStatus>, TunnelError>;
    /// Makes each of `peers` (key, its persistent keepalive in seconds) send a
    /// keepalive now: its persistent keepalive is switched off and on again, which
    /// both the kernel and wireguard-go answer with one. Does nothing on other
    /// userspace implementations (boringtun rebuilds a peer from the fields given).
    async fn send_keepalives(&self, peers: &[(String, u16)]) -> Result<(), TunnelError>;
    /// Which WireGuard carries the tunnel, once the device is set up.
    fn implementation(&self) -> Option<Implementation> {
        None
    }
}

/// What `apply_peers` changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerDiff {
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
}

impl PeerDiff {
    pub fn is_empty(&self) -> bool {
        *self == PeerDiff::default()
    }
}

/// Compares desired peers with the device's: (to add or update, keys to remove).
pub fn diff<'a>(
    desired: &'a [Peer],
    actual: &[PeerStatus],
) -> (Vec<&'a Peer>, Vec<String>, PeerDiff) {
    let actual_by_key: BTreeMap<&str, &PeerStatus> =
        actual.iter().map(|a| (a.public_key.as_str(), a)).collect();
    let wanted: BTreeSet<&str> = desired.iter().map(|d| d.public_key.as_str()).collect();
    let mut changes = Vec::new();
    let mut stats = PeerDiff::default();
    for peer in desired {
        match actual_by_key.get(peer.public_key.as_str()) {
            None => {
                stats.added += 1;
                changes.push(peer);
            }
            Some(a) => {
                let mut want: Vec<_> = peer.allowed_ips.clone();
                let mut have: Vec<_> = a.allowed_ips.clone();
                want.sort();
                have.sort();
                if a.endpoint != Some(peer.endpoint) || want != have {
                    stats.updated += 1;
                    changes.push(peer);
                }
            }
        }
    }
    let removals: Vec<String> = actual
        .iter()
        .filter(|a| !wanted.contains(a.public_key.as_str()))
        .map(|a| a.public_key.clone())
        .collect();
    stats.removed = removals.len();
    (changes, removals, stats)
}

#[cfg(test)]
mod version_tests {
    use super::*;

    #[test]
    fn versions_are_read_and_wireguard_go_is_recognised() {
        let out = "wireguard-go v0.0.20230223\n\nUserspace WireGuard daemon for linux-amd64.\n";
        assert_eq!(parse_version(out), (Some("0.0.20230223".into()), true));
        assert_eq!(
            parse_version("boringtun 0.6.0"),
            (Some("0.6.0".into()), false)
        );
        assert_eq!(parse_version(""), (None, false));
    }

    #[test]
    fn the_offloads_are_found_by_their_code() {
        let with = b"..golang.zx2c4.com/wireguard/tun.newUDPGROTable..golang.zx2c4.com/wireguard/conn.setGSOSize..";
        assert!(has_offloads(with));
        // 0.0.20230223 had TCP GRO on the TUN side but neither UDP GRO nor UDP GSO.
        let without = b"..golang.zx2c4.com/wireguard/tun.tcpGRO..";
        assert!(!has_offloads(without));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(key: &str, ep: &str, ips: &[&str]) -> Peer {
        Peer {
            public_key: key.into(),
            endpoint: ep.parse().unwrap(),
            allowed_ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            keepalive: None,
        }
    }

    fn status(p: &Peer) -> PeerStatus {
        PeerStatus {
            public_key: p.public_key.clone(),
            endpoint: Some(p.endpoint),
            allowed_ips: p.allowed_ips.iter().rev().cloned().collect(),
            last_handshake: None,
            rx_bytes: 0,
            tx_bytes: 0,
        }
    }

    #[test]
    fn diff_touches_only_what_changed() {
        let a = peer("A", "192.0.2.11:51820", &["10.42.0.0/26", "10.42.1.0/26"]);
        let b = peer("B", "192.0.2.12:51820", &["10.42.0.64/26"]);
        let c = peer("C", "192.0.2.13:51820", &[]);
        let actual = vec![status(&a), status(&b), status(&c)];
        let b2 = peer("B", "192.0.2.99:51820", &["10.42.0.64/26"]);
        let d = peer("D", "192.0.2.14:51820", &["10.42.2.0/26"]);
        let desired = vec![a.clone(), b2.clone(), d.clone()];
        let (changes, removals, stats) = diff(&desired, &actual);
        assert_eq!(
            changes,
            vec![&b2, &d],
            "unchanged A (allowed IPs in another order) is left alone"
        );
        assert_eq!(removals, vec!["C".to_string()]);
        assert_eq!(
            stats,
            PeerDiff {
                added: 1,
                updated: 1,
                removed: 1
            }
        );
        let (changes, removals, stats) =
            diff(&desired, &desired.iter().map(status).collect::<Vec<_>>());
        assert!(changes.is_empty() && removals.is_empty() && stats.is_empty());
    }
}

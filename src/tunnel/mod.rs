//! The encrypted tunnel between hosts: one WireGuard interface per host.
//!
//! [`Tunnel`] takes the desired peer set and applies only the difference, so a peer
//! whose settings did not change keeps its session. wireguard-control types stay in
//! `wireguard.rs`.

pub mod fake;
pub mod keys;
pub mod wireguard;

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
    async fn peers(&self) -> Result<Vec<PeerStatus>, TunnelError>;
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
    let mut changes = Vec::new();
    let mut stats = PeerDiff::default();
    for peer in desired {
        match actual.iter().find(|a| a.public_key == peer.public_key) {
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
        .filter(|a| !desired.iter().any(|d| d.public_key == a.public_key))
        .map(|a| a.public_key.clone())
        .collect();
    stats.removed = removals.len();
    (changes, removals, stats)
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

//! In-memory [`Tunnel`] for tests of the mesh logic.

use std::sync::Mutex;

use async_trait::async_trait;

use super::{diff, Peer, PeerDiff, PeerStatus, Tunnel, TunnelError};

#[derive(Debug, Default)]
pub struct FakeTunnel {
    pub peers: Mutex<Vec<PeerStatus>>,
}

#[async_trait]
impl Tunnel for FakeTunnel {
    fn interface(&self) -> &str {
        "weft0"
    }

    fn public_key(&self) -> String {
        "fake-public-key".into()
    }

    async fn ensure_device(&self) -> Result<(), TunnelError> {
        Ok(())
    }

    async fn apply_peers(&self, peers: &[Peer]) -> Result<PeerDiff, TunnelError> {
        let mut current = self.peers.lock().unwrap();
        let (_, _, stats) = diff(peers, &current);
        *current = peers
            .iter()
            .map(|p| PeerStatus {
                public_key: p.public_key.clone(),
                endpoint: Some(p.endpoint),
                allowed_ips: p.allowed_ips.clone(),
                last_handshake: None,
                rx_bytes: 0,
                tx_bytes: 0,
            })
            .collect();
        Ok(stats)
    }

    async fn peers(&self) -> Result<Vec<PeerStatus>, TunnelError> {
        Ok(self.peers.lock().unwrap().clone())
    }
}

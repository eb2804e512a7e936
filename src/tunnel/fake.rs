//! In-memory [`Tunnel`] for tests of the mesh logic.

use std::sync::Mutex;

use async_trait::async_trait;

use super::{diff, Peer, PeerDiff, PeerStatus, Tunnel, TunnelError};

#[derive(Debug, Default)]
pub struct FakeTunnel {
    pub peers: Mutex<Vec<PeerStatus>>,
    /// The device is gone (the userspace process died, or the link was deleted):
    /// reads fail until `ensure_device` runs.
    pub gone: std::sync::atomic::AtomicBool,
    pub ensured: std::sync::atomic::AtomicUsize,
    /// How often the device was read, and changed without a read.
    pub reads: std::sync::atomic::AtomicUsize,
    pub changes: std::sync::atomic::AtomicUsize,
    /// Keys of the peers made to send a keepalive, in order.
    pub keepalives_sent: Mutex<Vec<String>>,
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
        use std::sync::atomic::Ordering::SeqCst;
        if self.gone.swap(false, SeqCst) {
            self.peers.lock().unwrap().clear();
        }
        self.ensured.fetch_add(1, SeqCst);
        Ok(())
    }

    async fn apply_peers(&self, peers: &[Peer]) -> Result<PeerDiff, TunnelError> {
        if self.gone.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(TunnelError::Setup("no such device".into()));
        }
        let mut current = self.peers.lock().unwrap();
        let (_, _, stats) = diff(peers, &current);
        // A kept peer keeps its counters, as on a real device.
        let counters = |key: &str| {
            current
                .iter()
                .find(|c| c.public_key == key)
                .map_or((None, 0, 0), |c| (c.last_handshake, c.rx_bytes, c.tx_bytes))
        };
        let next = peers
            .iter()
            .map(|p| {
                let (last_handshake, rx_bytes, tx_bytes) = counters(&p.public_key);
                PeerStatus {
                    public_key: p.public_key.clone(),
                    endpoint: Some(p.endpoint),
                    allowed_ips: p.allowed_ips.clone(),
                    last_handshake,
                    rx_bytes,
                    tx_bytes,
                }
            })
            .collect();
        *current = next;
        Ok(stats)
    }

    async fn change_peers(&self, upserts: &[Peer], removals: &[String]) -> Result<(), TunnelError> {
        if self.gone.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(TunnelError::Setup("no such device".into()));
        }
        self.changes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut current = self.peers.lock().unwrap();
        current.retain(|c| {
            !removals.contains(&c.public_key)
                && !upserts.iter().any(|u| u.public_key == c.public_key)
        });
        current.extend(upserts.iter().map(|p| PeerStatus {
            public_key: p.public_key.clone(),
            endpoint: Some(p.endpoint),
            allowed_ips: p.allowed_ips.clone(),
            last_handshake: None,
            rx_bytes: 0,
            tx_bytes: 0,
        }));
        Ok(())
    }

    async fn send_keepalives(&self, peers: &[(String, u16)]) -> Result<(), TunnelError> {
        let mut sent = self.keepalives_sent.lock().unwrap();
        sent.extend(peers.iter().map(|(key, _)| key.clone()));
        Ok(())
    }

    async fn peers(&self) -> Result<Vec<PeerStatus>, TunnelError> {
        self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if self.gone.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(TunnelError::Setup("no such device".into()));
        }
        Ok(self.peers.lock().unwrap().clone())
    }
}

//! This host's membership of the cluster: its record under `hosts/<id>`, attached to
//! a short etcd lease that a background task keeps alive. When etcd is lost the
//! record expires there but the host carries on (its blocks are durable, not leased);
//! when etcd returns, the task registers again by itself.

use std::net::SocketAddr;
use std::time::Duration;

use etcd_client::{Client, PutOptions};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::store::keys;

/// What other hosts need to reach this one (`hosts/<id>`, leased).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HostRecord {
    pub id: String,
    /// Base64 WireGuard public key.
    pub public_key: String,
    /// Underlay address and WireGuard port.
    pub endpoint: SocketAddr,
    pub keepalive: Option<u16>,
}

/// When a host was last known alive (`seen/<id>`, durable): lets others reclaim the
/// blocks of a host gone longer than the grace period.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SeenRecord {
    /// Seconds since the Unix epoch.
    pub last_seen: u64,
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// How often the durable last-seen mark is refreshed while registered.
const SEEN_EVERY: Duration = Duration::from_secs(30);

/// Keeps `record` registered under a lease of `ttl` until the process ends. Sends
/// `true` on `alive` while registered.
pub fn spawn_registration(
    client: Client,
    prefix: String,
    record: HostRecord,
    ttl: Duration,
    alive: watch::Sender<bool>,
) {
    tokio::spawn(async move {
        let key = format!("{prefix}{}", keys::host(&record.id));
        let seen_key = format!("{prefix}{}", keys::seen(&record.id));
        let value = serde_json::to_vec(&record).expect("host record serialises");
        let ttl_secs = ttl.as_secs().max(2) as i64;
        loop {
            match register_once(&client, &key, &seen_key, &value, ttl_secs, &alive).await {
                Ok(()) => warn!("host lease lost; registering again"),
                Err(e) => warn!(error = %e, "host registration failed; retrying"),
            }
            let _ = alive.send(false);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
}

async fn mark_seen(
    kv: &mut etcd_client::KvClient,
    seen_key: &str,
) -> Result<(), etcd_client::Error> {
    let mark = serde_json::to_vec(&SeenRecord {
        last_seen: unix_now(),
    })
    .expect("serialises");
    kv.put(seen_key, mark, None).await.map(|_| ())
}

async fn register_once(
    client: &Client,
    key: &str,
    seen_key: &str,
    value: &[u8],
    ttl: i64,
    alive: &watch::Sender<bool>,
) -> Result<(), etcd_client::Error> {
    let mut lease = client.lease_client();
    let mut kv = client.kv_client();
    let granted = lease.grant(ttl, None).await?;
    let id = granted.id();
    kv.put(key, value, Some(PutOptions::new().with_lease(id)))
        .await?;
    mark_seen(&mut kv, seen_key).await?;
    let mut marked = std::time::Instant::now();
    info!(lease = id, ttl, "host registered");
    let _ = alive.send(true);
    let (mut keeper, mut responses) = lease.keep_alive(id).await?;
    let every = Duration::from_millis((ttl as u64 * 1000) / 3);
    loop {
        tokio::time::sleep(every).await;
        keeper.keep_alive().await?;
        // A slow answer is not a lost lease: wait up to the whole TTL before giving up.
        match tokio::time::timeout(Duration::from_secs(ttl as u64), responses.message()).await {
            Ok(Ok(Some(resp))) if resp.ttl() > 0 => {
                debug!(ttl = resp.ttl(), "lease renewed");
                if marked.elapsed() >= SEEN_EVERY {
                    mark_seen(&mut kv, seen_key).await?;
                    marked = std::time::Instant::now();
                }
            }
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(etcd_client::Error::InvalidArgs(
                    "lease keep-alive got no answer".into(),
                ));
            }
        }
    }
}

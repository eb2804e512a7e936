//! This host's membership of the cluster, on two etcd leases that one background
//! task keeps alive:
//! - `hosts/<id>` on a short lease (`--host-ttl`): what other hosts need to reach this
//!   one; it expires soon after the host is gone (or cut off from etcd);
//! - `seen/<id>` on a lease of the block grace period (`--block-grace`): while it
//!   exists, nobody may reclaim this host's blocks. Its expiry is decided by etcd
//!   alone, so no clocks are compared across hosts.
//!
//! When etcd is lost both records expire there in time but the host carries on; when
//! etcd returns, the task registers again by itself. [`Tenure`] tells the rest of the
//! daemon, on this host's own monotonic clock, what it may rely on meanwhile.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use etcd_client::{Client, PutOptions};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

pub use crate::schema::{unix_now, HostRecord, SeenRecord};
use crate::store::keys;

/// This host's standing in the cluster store, on its own monotonic clock.
///
/// - *Registered since*: when its registration last started to hold without a break.
///   A host reclaims nothing before it has been registered for the whole grace
///   period, so a host back from its own outage never acts on a stale view.
/// - *Blocks safe until*: the send time of the last `seen/` keep-alive that etcd
///   confirmed, plus the lease's TTL (less 5 % for clock-rate drift). etcd renewed
///   the lease no earlier than that send, so until then nobody can have reclaimed
///   this host's blocks, and addresses may come from them without asking etcd.
///
/// On a single host (embedded store) both always hold.
pub struct Tenure {
    standalone: bool,
    state: Mutex<TenureState>,
    /// Notified on every (re-)registration: blocks are verified again then.
    pub registered_now: Notify,
}

#[derive(Default)]
struct TenureState {
    registered_since: Option<Instant>,
    blocks_safe_until: Option<Instant>,
}

impl Tenure {
    pub fn standalone() -> Self {
        Self {
            standalone: true,
            state: Mutex::default(),
            registered_now: Notify::new(),
        }
    }

    pub fn clustered() -> Self {
        Self {
            standalone: false,
            ..Self::standalone()
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut TenureState) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn registered(&self) {
        self.with(|s| {
            s.registered_since.get_or_insert_with(Instant::now);
        });
        self.registered_now.notify_one();
    }

    pub fn lost(&self) {
        self.with(|s| s.registered_since = None);
    }

    /// etcd confirmed a keep-alive of the `seen/` lease (TTL `ttl`) sent at `sent`.
    pub fn seen_renewed(&self, sent: Instant, ttl: Duration) {
        let until = sent + ttl - ttl / 20;
        self.with(|s| s.blocks_safe_until = Some(until));
    }

    /// Whether this host's blocks are certainly still its own in etcd.
    pub fn blocks_are_safe(&self) -> bool {
        self.standalone || self.with(|s| s.blocks_safe_until.is_some_and(|t| Instant::now() < t))
    }

    /// How long the registration has held without a break (`None`: not registered).
    pub fn registered_for(&self) -> Option<Duration> {
        if self.standalone {
            return Some(Duration::MAX);
        }
        self.with(|s| s.registered_since.map(|t| t.elapsed()))
    }
}

/// Keeps `record` registered (and its `seen/` mark alive) until the process ends.
pub fn spawn_registration(
    client: Client,
    prefix: String,
    record: HostRecord,
    ttl: Duration,
    grace: Duration,
    tenure: std::sync::Arc<Tenure>,
) {
    tokio::spawn(async move {
        let keys = RegistrationKeys {
            host: format!("{prefix}{}", keys::host(&record.id)),
            seen: format!("{prefix}{}", keys::seen(&record.id)),
        };
        let value = serde_json::to_vec(&record).expect("host record serialises");
        let ttl_secs = ttl.as_secs().max(2) as i64;
        let grace_secs = grace.as_secs().max(ttl.as_secs()).max(2) as i64;
        loop {
            match register_once(&client, &keys, &value, ttl_secs, grace_secs, &tenure).await {
                Ok(()) => warn!("host registration lost; registering again"),
                Err(e) => warn!(error = %e, "host registration failed; retrying"),
            }
            tenure.lost();
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
}

struct RegistrationKeys {
    host: String,
    seen: String,
}

/// Registers once and keeps both leases alive; returns when the registration is lost
/// (a lease expired, or `hosts/<id>` is no longer on this host's lease).
async fn register_once(
    client: &Client,
    keys: &RegistrationKeys,
    value: &[u8],
    ttl: i64,
    grace: i64,
    tenure: &Tenure,
) -> Result<(), etcd_client::Error> {
    let mut lease = client.lease_client();
    let mut kv = client.kv_client();
    let host_lease = lease.grant(ttl, None).await?.id();
    let seen_sent = Instant::now();
    let seen_lease = lease.grant(grace, None).await?.id();
    let mark = serde_json::to_vec(&SeenRecord {
        last_seen: unix_now(),
    })
    .expect("serialises");
    kv.put(
        keys.seen.as_str(),
        mark,
        Some(PutOptions::new().with_lease(seen_lease)),
    )
    .await?;
    tenure.seen_renewed(seen_sent, Duration::from_secs(grace as u64));
    kv.put(
        keys.host.as_str(),
        value,
        Some(PutOptions::new().with_lease(host_lease)),
    )
    .await?;
    info!(lease = host_lease, ttl, grace, "host registered");
    tenure.registered();
    let (mut host_keeper, mut host_answers) = lease.keep_alive(host_lease).await?;
    let (mut seen_keeper, mut seen_answers) = lease.keep_alive(seen_lease).await?;
    let every = Duration::from_millis((ttl as u64 * 1000) / 3);
    // A slow answer is not a lost lease: wait up to the whole TTL before giving up.
    let patience = Duration::from_secs(ttl as u64);
    let mut renewals: u64 = 0;
    loop {
        tokio::time::sleep(every).await;
        let sent = Instant::now();
        host_keeper.keep_alive().await?;
        seen_keeper.keep_alive().await?;
        match tokio::time::timeout(patience, host_answers.message()).await {
            Ok(Ok(Some(resp))) if resp.ttl() > 0 => debug!(ttl = resp.ttl(), "lease renewed"),
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(no_answer()),
        }
        match tokio::time::timeout(patience, seen_answers.message()).await {
            Ok(Ok(Some(resp))) if resp.ttl() > 0 => {
                tenure.seen_renewed(sent, Duration::from_secs(grace as u64))
            }
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(no_answer()),
        }
        // Someone may have deleted or re-attached our record (another daemon on the
        // same id): a registration that holds nothing is no registration.
        renewals += 1;
        if renewals.is_multiple_of(3) {
            let resp = kv.get(keys.host.as_str(), None).await?;
            let ours = resp
                .kvs()
                .first()
                .is_some_and(|kv| kv.lease() == host_lease);
            if !ours {
                warn!("hosts/ record missing or not on this host's lease");
                return Ok(());
            }
        }
    }
}

fn no_answer() -> etcd_client::Error {
    etcd_client::Error::InvalidArgs("lease keep-alive got no answer".into())
}

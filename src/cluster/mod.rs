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

use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::schema::keys;
pub use crate::schema::{unix_now, HostRecord, SeenRecord};

/// This host's standing in the cluster store, on its own monotonic clock.
///
/// - *Registered since*: when its registration last started to hold without a break.
///   A host reclaims nothing before it has been registered for the whole grace
///   period, so a host back from its own outage never acts on a stale view.
/// - *Blocks safe until*: the send time of the last `seen/` keep-alive that etcd
///   confirmed, plus the lease's TTL (less 5 % for clock-rate drift). etcd renewed
///   the lease no earlier than that send, so until then nobody can have reclaimed
///   this host's blocks, and addresses may come from them without asking etcd. That
///   holds only while the lease never lapsed: once it has (or before the first one),
///   a new lease makes the blocks safe only after a verification of them that started
///   under it has succeeded ([`Tenure::verified`]).
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
    /// A renewal that waits for a verification (the lease had lapsed).
    pending_until: Option<Instant>,
    /// Counts registrations, so that a verification proves only its own.
    generation: u64,
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
            s.generation += 1;
        });
        self.registered_now.notify_one();
    }

    pub fn lost(&self) {
        self.with(|s| s.registered_since = None);
    }

    /// The current registration's number, taken when a verification starts.
    pub fn generation(&self) -> u64 {
        self.with(|s| s.generation)
    }

    /// etcd confirmed a keep-alive of the `seen/` lease (TTL `ttl`) sent at `sent`.
    pub fn seen_renewed(&self, sent: Instant, ttl: Duration) {
        let until = sent + ttl - ttl / 20;
        self.with(|s| {
            let unbroken = s.blocks_safe_until.is_some_and(|t| Instant::now() < t);
            if unbroken {
                s.blocks_safe_until = Some(until);
            } else {
                s.pending_until = Some(until);
            }
        });
    }

    /// etcd says the `seen/` lease is gone: the blocks may be reclaimed from now on.
    pub fn seen_lost(&self) {
        self.with(|s| {
            s.blocks_safe_until = None;
            s.pending_until = None;
        });
    }

    /// A verification of this host's blocks that started under registration
    /// `generation` succeeded: a pending renewal of that registration counts now.
    pub fn verified(&self, generation: u64) {
        self.with(|s| {
            if s.generation == generation && s.registered_since.is_some() {
                if let Some(until) = s.pending_until.take() {
                    s.blocks_safe_until = Some(until);
                }
            }
        });
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

pub mod etcd;
pub mod fake;

/// A lease's id in the cluster store.
pub type LeaseId = i64;

#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error("cluster store: {0}")]
    Store(String),
    #[error("lease keep-alive got no answer within {0:?}")]
    NoAnswer(Duration),
}

/// The cluster store's leases, as membership needs them: etcd in production,
/// [`fake::MemoryLeases`] in tests. Keys are relative to the store's prefix.
#[async_trait::async_trait]
pub trait Leases: Send + Sync + 'static {
    /// Grants a lease that expires `ttl` after its last renewal.
    async fn grant(&self, ttl: Duration) -> Result<LeaseId, MembershipError>;
    /// Renews `lease`; `Ok(false)` once it has expired.
    async fn renew(&self, lease: LeaseId) -> Result<bool, MembershipError>;
    /// Writes `key` on `lease` (it goes when the lease expires).
    async fn put(&self, key: &str, value: Vec<u8>, lease: LeaseId) -> Result<(), MembershipError>;
    /// The lease `key` is on; `None` when the key does not exist.
    async fn lease_of(&self, key: &str) -> Result<Option<LeaseId>, MembershipError>;
    /// Deletes `key` before its lease ends.
    async fn delete(&self, key: &str) -> Result<(), MembershipError>;
}

/// This host's registration: `hosts/<id>` on a lease of `ttl`, `seen/<id>` on a lease
/// of `grace`, both renewed every `ttl / 3`, re-registered whenever either lease is
/// lost or `hosts/<id>` is no longer on this host's lease.
pub struct Registration {
    pub leases: std::sync::Arc<dyn Leases>,
    pub record: HostRecord,
    pub ttl: Duration,
    pub grace: Duration,
    pub tenure: std::sync::Arc<Tenure>,
}

/// Why one registration ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    LeaseExpired,
    RecordNotOurs,
}

impl Registration {
    /// Keeps the host registered until the process ends.
    pub async fn run(self) {
        loop {
            match self.once().await {
                Ok(why) => warn!(?why, "host registration lost; registering again"),
                Err(e) => warn!(error = %e, "host registration failed; retrying"),
            }
            self.tenure.lost();
            tokio::time::sleep(Duration::from_millis(500).min(self.ttl / 2)).await;
        }
    }

    /// Registers once and keeps both leases alive; returns when the registration is lost.
    pub async fn once(&self) -> Result<Ended, MembershipError> {
        let host_key = keys::host(&self.record.id);
        let seen_key = keys::seen(&self.record.id);
        let grace = self.grace.max(self.ttl);
        let host_lease = self.leases.grant(self.ttl).await?;
        let seen_sent = Instant::now();
        let seen_lease = self.leases.grant(grace).await?;
        let mark = serde_json::to_vec(&SeenRecord {
            last_seen: unix_now(),
        })
        .expect("serialises");
        self.leases.put(&seen_key, mark, seen_lease).await?;
        self.tenure.seen_renewed(seen_sent, grace);
        let value = serde_json::to_vec(&self.record).expect("host record serialises");
        self.leases.put(&host_key, value, host_lease).await?;
        info!(lease = host_lease, ttl = ?self.ttl, grace = ?grace, "host registered");
        self.tenure.registered();
        let mut renewals: u64 = 0;
        loop {
            tokio::time::sleep(self.ttl / 3).await;
            let sent = Instant::now();
            if !self.leases.renew(host_lease).await? {
                return Ok(Ended::LeaseExpired);
            }
            if !self.leases.renew(seen_lease).await? {
                self.tenure.seen_lost();
                return Ok(Ended::LeaseExpired);
            }
            debug!("leases renewed");
            self.tenure.seen_renewed(sent, grace);
            // Someone may have deleted or re-attached our record (another daemon on the
            // same id): a registration that holds nothing is no registration.
            renewals += 1;
            if renewals.is_multiple_of(3)
                && self.leases.lease_of(&host_key).await? != Some(host_lease)
            {
                warn!("hosts/ record missing or not on this host's lease");
                return Ok(Ended::RecordNotOurs);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::fake::MemoryLeases;
    use super::*;

    fn registration(leases: &Arc<MemoryLeases>, tenure: &Arc<Tenure>) -> Registration {
        Registration {
            leases: leases.clone(),
            record: HostRecord {
                id: "h1".into(),
                public_key: "key".into(),
                endpoint: "192.0.2.11:51820".parse().unwrap(),
                keepalive: Some(5),
            },
            ttl: Duration::from_millis(300),
            grace: Duration::from_secs(600),
            tenure: tenure.clone(),
        }
    }

    async fn until(what: &str, mut f: impl FnMut() -> bool) {
        for _ in 0..100 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("never: {what}");
    }

    #[tokio::test]
    async fn registration_puts_both_records_on_their_leases_and_keeps_them() {
        let leases = Arc::new(MemoryLeases::default());
        let tenure = Arc::new(Tenure::clustered());
        tokio::spawn(registration(&leases, &tenure).run());
        until("registered", || leases.get("hosts/h1").is_some()).await;
        let (_, host_lease) = leases.get("hosts/h1").unwrap();
        let (_, seen_lease) = leases.get("seen/h1").unwrap();
        assert_eq!(leases.ttl_of(host_lease), Some(Duration::from_millis(300)));
        assert_eq!(leases.ttl_of(seen_lease), Some(Duration::from_secs(600)));
        assert!(
            !tenure.blocks_are_safe(),
            "a first lease makes nothing safe before the blocks are verified"
        );
        tenure.verified(tenure.generation());
        assert!(tenure.blocks_are_safe());
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(
            leases.get("hosts/h1").unwrap().1,
            host_lease,
            "renewed, not replaced"
        );
        assert!(tenure.registered_for().is_some());
    }

    #[tokio::test]
    async fn an_expired_lease_or_a_deleted_record_is_registered_again() {
        let leases = Arc::new(MemoryLeases::default());
        let tenure = Arc::new(Tenure::clustered());
        tokio::spawn(registration(&leases, &tenure).run());
        until("registered", || leases.get("hosts/h1").is_some()).await;
        let (_, first) = leases.get("hosts/h1").unwrap();
        leases.expire(first);
        until("registered on a new lease", || {
            leases.get("hosts/h1").is_some_and(|(_, l)| l != first)
        })
        .await;
        // Deleted behind its back (say, by another daemon's expiring lease).
        let (_, second) = leases.get("hosts/h1").unwrap();
        leases.remove("hosts/h1");
        until("written again", || {
            leases.get("hosts/h1").is_some_and(|(_, l)| l != second)
        })
        .await;
    }

    #[tokio::test]
    async fn a_store_outage_ends_the_registration_but_blocks_stay_safe_for_the_lease() {
        let leases = Arc::new(MemoryLeases::default());
        let tenure = Arc::new(Tenure::clustered());
        let reg = registration(&leases, &tenure);
        let handle = tokio::spawn(async move { reg.once().await });
        until("registered", || leases.get("hosts/h1").is_some()).await;
        tenure.verified(tenure.generation());
        leases.down.store(true, std::sync::atomic::Ordering::SeqCst);
        let ended = handle.await.unwrap();
        assert!(ended.is_err(), "{ended:?}");
        tenure.lost();
        assert!(tenure.registered_for().is_none());
        assert!(
            tenure.blocks_are_safe(),
            "the seen/ lease (600 s) was renewed moments ago: its blocks are still this host's"
        );
    }

    #[test]
    fn a_lapsed_lease_makes_blocks_safe_again_only_after_a_verification() {
        let tenure = Tenure::clustered();
        let ttl = Duration::from_secs(600);
        tenure.registered();
        tenure.seen_renewed(Instant::now(), ttl);
        tenure.verified(tenure.generation());
        assert!(tenure.blocks_are_safe());
        // Cut off past the lease: the last confirmed renewal is older than the TTL.
        tenure.lost();
        tenure.seen_renewed(Instant::now() - Duration::from_secs(700), ttl);
        assert!(!tenure.blocks_are_safe());
        // Back: a new registration and lease, but the blocks may have been reclaimed.
        tenure.registered();
        let generation = tenure.generation();
        tenure.seen_renewed(Instant::now(), ttl);
        assert!(!tenure.blocks_are_safe(), "not before a verification");
        tenure.verified(generation - 1);
        assert!(
            !tenure.blocks_are_safe(),
            "an older verification proves nothing"
        );
        tenure.verified(generation);
        assert!(tenure.blocks_are_safe());
        tenure.seen_lost();
        assert!(!tenure.blocks_are_safe(), "etcd said the lease is gone");
    }
}

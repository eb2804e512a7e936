//! [`Leases`] on etcd: grants, keep-alive streams (one per lease, opened on first
//! renewal), puts on a lease, and the lease a key is on. Every call has a deadline.

use std::collections::HashMap;
use std::time::Duration;

use etcd_client::{Client, LeaseKeepAliveStream, LeaseKeeper, PutOptions};
use tokio::sync::Mutex;

use super::{LeaseId, Leases, MembershipError};

pub struct EtcdLeases {
    client: Client,
    prefix: String,
    /// A slow answer is not a lost lease: a renewal waits this long before failing.
    patience: Duration,
    keepers: Mutex<HashMap<LeaseId, (LeaseKeeper, LeaseKeepAliveStream)>>,
}

impl EtcdLeases {
    pub fn new(client: Client, prefix: String, patience: Duration) -> Self {
        Self {
            client,
            prefix,
            patience,
            keepers: Mutex::new(HashMap::new()),
        }
    }

    async fn timed<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, MembershipError> {
        match tokio::time::timeout(self.patience, fut).await {
            Ok(r) => r.map_err(|e| MembershipError::Store(e.to_string())),
            Err(_) => Err(MembershipError::NoAnswer(self.patience)),
        }
    }
}

fn whole_seconds(d: Duration) -> i64 {
    d.as_secs_f64().ceil().max(2.0) as i64
}

#[async_trait::async_trait]
impl Leases for EtcdLeases {
    async fn grant(&self, ttl: Duration) -> Result<LeaseId, MembershipError> {
        let mut lease = self.client.lease_client();
        Ok(self
            .timed(lease.grant(whole_seconds(ttl), None))
            .await?
            .id())
    }

    async fn renew(&self, lease: LeaseId) -> Result<bool, MembershipError> {
        let mut keepers = self.keepers.lock().await;
        if let std::collections::hash_map::Entry::Vacant(slot) = keepers.entry(lease) {
            let mut client = self.client.lease_client();
            slot.insert(self.timed(client.keep_alive(lease)).await?);
        }
        let (keeper, answers) = keepers.get_mut(&lease).expect("inserted above");
        let result = async {
            self.timed(keeper.keep_alive()).await?;
            match tokio::time::timeout(self.patience, answers.message()).await {
                Ok(Ok(Some(resp))) => Ok(resp.ttl() > 0),
                Ok(Ok(None)) => Ok(false),
                Ok(Err(e)) => Err(MembershipError::Store(e.to_string())),
                Err(_) => Err(MembershipError::NoAnswer(self.patience)),
            }
        }
        .await;
        // A failed or expired stream is not reused: the next renewal opens a new one.
        if !matches!(result, Ok(true)) {
            keepers.remove(&lease);
        }
        result
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: LeaseId) -> Result<(), MembershipError> {
        let mut kv = self.client.kv_client();
        let key = format!("{}{key}", self.prefix);
        self.timed(kv.put(key, value, Some(PutOptions::new().with_lease(lease))))
            .await
            .map(|_| ())
    }

    async fn lease_of(&self, key: &str) -> Result<Option<LeaseId>, MembershipError> {
        let mut kv = self.client.kv_client();
        let key = format!("{}{key}", self.prefix);
        let resp = self.timed(kv.get(key, None)).await?;
        Ok(resp.kvs().first().map(|kv| kv.lease()))
    }

    async fn delete(&self, key: &str) -> Result<(), MembershipError> {
        let mut kv = self.client.kv_client();
        let key = format!("{}{key}", self.prefix);
        self.timed(kv.delete(key, None)).await.map(|_| ())
    }
}

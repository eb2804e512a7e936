//! The cluster store on etcd (v3 API), for several hosts.
//!
//! Keys live under a versioned prefix (default `/weft/v1/`, see docs/etcd-schema.md).
//! Conditional writes are etcd transactions comparing `create_revision` (create only
//! if absent) or `mod_revision` (compare-and-set); a value's revision is its
//! `mod_revision`. Every call has a deadline, so a lost etcd makes requests fail fast
//! with a clear error instead of hanging dockerd.

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, Identity,
    KvClient, PutOptions, TlsOptions, Txn, TxnOp,
};

use super::{Store, StoreError, Versioned};

#[derive(Debug, Clone)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub user: Option<String>,
    /// Never logged.
    pub password: Option<String>,
    pub timeout: Duration,
}

#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    prefix: String,
    timeout: Duration,
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("etcd {what}: {e}"))
}

fn read_file(path: &PathBuf) -> Result<Vec<u8>, StoreError> {
    std::fs::read(path).map_err(|source| StoreError::Io {
        path: path.display().to_string(),
        source,
    })
}

impl EtcdStore {
    pub async fn connect(config: &EtcdConfig) -> Result<Self, StoreError> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(config.timeout)
            .with_timeout(config.timeout)
            .with_keep_alive(Duration::from_secs(5), config.timeout);
        if let (Some(user), Some(password)) = (&config.user, &config.password) {
            options = options.with_user(user.clone(), password.clone());
        }
        if config.ca.is_some() || config.cert.is_some() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &config.ca {
                tls = tls.ca_certificate(Certificate::from_pem(read_file(ca)?));
            }
            match (&config.cert, &config.key) {
                (Some(cert), Some(key)) => {
                    tls = tls.identity(Identity::from_pem(read_file(cert)?, read_file(key)?))
                }
                (None, None) => {}
                _ => {
                    return Err(StoreError::Unavailable(
                        "etcd client TLS needs both --etcd-cert and --etcd-key".into(),
                    ))
                }
            }
            options = options.with_tls(tls);
        }
        let client = tokio::time::timeout(
            config.timeout,
            Client::connect(config.endpoints.clone(), Some(options)),
        )
        .await
        .map_err(|_| {
            unavailable(
                "connect",
                format!(
                    "no answer from {:?} within {:?}",
                    config.endpoints, config.timeout
                ),
            )
        })?
        .map_err(|e| unavailable("connect", e))?;
        Ok(Self {
            client,
            prefix: config.prefix.clone(),
            timeout: config.timeout,
        })
    }

    pub fn client(&self) -> Client {
        self.client.clone()
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn kv(&self) -> KvClient {
        self.client.kv_client()
    }

    async fn deadline<T, F>(&self, what: &str, fut: F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| unavailable(what, format!("no answer within {:?}", self.timeout)))?
            .map_err(|e| unavailable(what, e))
    }

    async fn txn(&self, what: &str, txn: Txn) -> Result<Option<u64>, StoreError> {
        let resp = self.deadline(what, self.kv().txn(txn)).await?;
        let revision = resp
            .header()
            .map(|h| h.revision() as u64)
            .unwrap_or_default();
        Ok(resp.succeeded().then_some(revision))
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        let resp = self
            .deadline("get", self.kv().get(self.full(key), None))
            .await?;
        Ok(resp.kvs().first().map(|kv| Versioned {
            value: kv.value().to_vec(),
            revision: kv.mod_revision() as u64,
        }))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError> {
        let resp = self
            .deadline(
                "list",
                self.kv()
                    .get(self.full(prefix), Some(GetOptions::new().with_prefix())),
            )
            .await?;
        Ok(resp
            .kvs()
            .iter()
            .filter_map(|kv| {
                let key = kv.key_str().ok()?.strip_prefix(&self.prefix)?.to_string();
                Some((
                    key,
                    Versioned {
                        value: kv.value().to_vec(),
                        revision: kv.mod_revision() as u64,
                    },
                ))
            })
            .collect())
    }

    async fn create(&self, key: &str, value: Vec<u8>) -> Result<Option<u64>, StoreError> {
        let key = self.full(key);
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, value, None)]);
        self.txn("create", txn).await
    }

    async fn update(
        &self,
        key: &str,
        expected: u64,
        value: Vec<u8>,
    ) -> Result<Option<u64>, StoreError> {
        let key = self.full(key);
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                expected as i64,
            )])
            .and_then([TxnOp::put(key, value, None)]);
        self.txn("update", txn).await
    }

    async fn delete(&self, key: &str, expected: Option<u64>) -> Result<bool, StoreError> {
        let key = self.full(key);
        match expected {
            None => {
                let resp = self
                    .deadline("delete", self.kv().delete(key, None::<DeleteOptions>))
                    .await?;
                Ok(resp.deleted() > 0)
            }
            Some(rev) => {
                let txn = Txn::new()
                    .when([Compare::mod_revision(
                        key.clone(),
                        CompareOp::Equal,
                        rev as i64,
                    )])
                    .and_then([TxnOp::delete(key, None)]);
                Ok(self.txn("delete", txn).await?.is_some())
            }
        }
    }

    async fn put_expiring(
        &self,
        key: &str,
        value: Vec<u8>,
        ttl: Duration,
    ) -> Result<u64, StoreError> {
        // A lease of its own: it is never kept alive, so the key goes when it ends.
        let seconds = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        let mut lease = self.client.lease_client();
        let granted = self
            .deadline("lease grant", lease.grant(seconds.max(1) as i64, None))
            .await?;
        let options = PutOptions::new().with_lease(granted.id());
        let resp = self
            .deadline("put", self.kv().put(self.full(key), value, Some(options)))
            .await?;
        Ok(resp
            .header()
            .map(|h| h.revision() as u64)
            .unwrap_or_default())
    }
}

/// Wakes `wake` on every change under `key` (a prefix) in etcd, and once each time the
/// watch (re)starts, for whatever changed while it was down; a timer is always the
/// caller's fallback.
pub async fn wake_on_changes(
    client: etcd_client::Client,
    key: String,
    wake: std::sync::Arc<tokio::sync::Notify>,
) {
    use etcd_client::WatchOptions;
    loop {
        let result: Result<(), etcd_client::Error> = async {
            let mut stream = client
                .watch_client()
                .watch(key.as_str(), Some(WatchOptions::new().with_prefix()))
                .await?;
            wake.notify_one();
            while let Some(resp) = stream.message().await? {
                if resp.canceled() {
                    break;
                }
                if !resp.events().is_empty() {
                    wake.notify_one();
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            tracing::debug!(%key, error = %e, "cannot watch etcd");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

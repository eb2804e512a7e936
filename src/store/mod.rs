//! The key-value store behind weft's state.
//!
//! Every write is conditional: `create` only succeeds when the key is absent and
//! `update`/`delete` only when the caller read the current revision. Callers build
//! allocation on these (compare-and-set with bounded retries), never on
//! read-then-write. The embedded store implements the trait for one host; the etcd
//! store (multi-host) implements the same contract, checked by [`contract`].

pub mod contract;
pub mod embedded;
pub mod etcd;
#[cfg(test)]
pub mod switchable;

use async_trait::async_trait;
use serde::{de::DeserializeOwned, Serialize};

/// A value with the revision at which it was last modified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub value: Vec<u8>,
    pub revision: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store I/O on {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("stored value at {key} is corrupt: {source}")]
    Corrupt {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("value for {key} is not valid UTF-8 JSON")]
    NotText { key: String },
    #[error("too many concurrent changes to {0}; try again")]
    Contended(String),
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError>;
    /// All keys starting with `prefix`, in key order.
    async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError>;
    /// Create `key` if it does not exist. `Ok(None)` means it already existed.
    async fn create(&self, key: &str, value: Vec<u8>) -> Result<Option<u64>, StoreError>;
    /// Replace `key` if its revision is still `expected`. `Ok(None)` means it changed
    /// (or vanished) since it was read.
    async fn update(
        &self,
        key: &str,
        expected: u64,
        value: Vec<u8>,
    ) -> Result<Option<u64>, StoreError>;
    /// Delete `key`, if `expected` is given only at that revision. `Ok(false)` means
    /// nothing was deleted.
    async fn delete(&self, key: &str, expected: Option<u64>) -> Result<bool, StoreError>;
    /// Write `key` unconditionally so that it vanishes by itself `ttl` after this
    /// write (a later write starts a new `ttl`). etcd keeps the time on its leases
    /// (whole seconds, at least etcd's minimum TTL); the embedded store, which serves
    /// one host, on that host's clock.
    async fn put_expiring(
        &self,
        key: &str,
        value: Vec<u8>,
        ttl: std::time::Duration,
    ) -> Result<u64, StoreError>;
}

/// A decoded value with its revision.
#[derive(Debug, Clone, PartialEq)]
pub struct Record<T> {
    pub value: T,
    pub revision: u64,
}

fn decode<T: DeserializeOwned>(key: &str, v: Versioned) -> Result<Record<T>, StoreError> {
    let value = serde_json::from_slice(&v.value).map_err(|source| StoreError::Corrupt {
        key: key.to_string(),
        source,
    })?;
    Ok(Record {
        value,
        revision: v.revision,
    })
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serialising our own plain structs cannot fail.
    serde_json::to_vec(value).expect("state types serialise to JSON")
}

/// Typed JSON helpers over any [`Store`].
#[async_trait]
pub trait StoreExt: Store {
    async fn get_json<T: DeserializeOwned + Send>(
        &self,
        key: &str,
    ) -> Result<Option<Record<T>>, StoreError> {
        self.get(key).await?.map(|v| decode(key, v)).transpose()
    }

    async fn list_json<T: DeserializeOwned + Send>(
        &self,
        prefix: &str,
    ) -> Result<Vec<(String, Record<T>)>, StoreError> {
        self.list(prefix)
            .await?
            .into_iter()
            .map(|(k, v)| decode(&k, v).map(|r| (k, r)))
            .collect()
    }

    /// Like [`StoreExt::list_json`], but a record that does not decode is left out and
    /// named in the second list ("key: does not decode") instead of failing the whole
    /// listing: one bad record must never stop a pass that reads many.
    async fn list_json_lossy<T: DeserializeOwned + Send>(
        &self,
        prefix: &str,
    ) -> Result<(Vec<(String, Record<T>)>, Vec<String>), StoreError> {
        let mut good = Vec::new();
        let mut bad = Vec::new();
        for (key, v) in self.list(prefix).await? {
            match decode(&key, v) {
                Ok(rec) => good.push((key, rec)),
                Err(_) => bad.push(format!("{key}: does not decode")),
            }
        }
        Ok((good, bad))
    }

    async fn create_json<T: Serialize + Sync>(
        &self,
        key: &str,
        value: &T,
    ) -> Result<Option<u64>, StoreError> {
        self.create(key, encode(value)).await
    }

    async fn put_expiring_json<T: Serialize + Sync>(
        &self,
        key: &str,
        value: &T,
        ttl: std::time::Duration,
    ) -> Result<u64, StoreError> {
        self.put_expiring(key, encode(value), ttl).await
    }

    async fn update_json<T: Serialize + Sync>(
        &self,
        key: &str,
        expected: u64,
        value: &T,
    ) -> Result<Option<u64>, StoreError> {
        self.update(key, expected, encode(value)).await
    }

    /// Read-modify-write with compare-and-set and bounded retries. `f` gets the current
    /// value (or `None`) and returns the new one, `None` to delete, or an error to stop.
    async fn modify_json<T, E, F>(&self, key: &str, mut f: F) -> Result<Option<T>, E>
    where
        T: Serialize + DeserializeOwned + Send + Sync,
        E: From<StoreError> + Send,
        F: FnMut(Option<T>) -> Result<Option<T>, E> + Send,
    {
        for _ in 0..CAS_RETRIES {
            let current = self.get_json::<T>(key).await?;
            let revision = current.as_ref().map(|r| r.revision);
            let next = f(current.map(|r| r.value))?;
            let done = match (revision, &next) {
                (None, None) => true,
                (None, Some(v)) => self.create_json(key, v).await?.is_some(),
                (Some(rev), Some(v)) => self.update_json(key, rev, v).await?.is_some(),
                (Some(rev), None) => self.delete(key, Some(rev)).await?,
            };
            if done {
                return Ok(next);
            }
        }
        Err(StoreError::Contended(key.to_string()).into())
    }
}

impl<S: Store + ?Sized> StoreExt for S {}

/// Bounded retries for compare-and-set loops.
pub const CAS_RETRIES: usize = 32;

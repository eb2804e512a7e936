//! A cluster store that can be switched off, for tests of what weft does while etcd
//! does not answer.

use async_trait::async_trait;

use super::embedded::EmbeddedStore;
use super::{Store, StoreError, Versioned};

/// An in-memory store that fails every call while `down`, like an unreachable etcd.
pub struct Switchable {
    pub inner: EmbeddedStore,
    pub down: std::sync::atomic::AtomicBool,
}

impl Default for Switchable {
    fn default() -> Self {
        Self {
            inner: EmbeddedStore::in_memory(),
            down: Default::default(),
        }
    }
}

impl Switchable {
    pub fn new() -> Self {
        Self::default()
    }

    fn check(&self) -> Result<(), StoreError> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            Err(StoreError::Unavailable(
                "etcd get: no answer within 3s".into(),
            ))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl Store for Switchable {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        self.check()?;
        self.inner.get(key).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError> {
        self.check()?;
        self.inner.list(prefix).await
    }
    async fn create(&self, key: &str, value: Vec<u8>) -> Result<Option<u64>, StoreError> {
        self.check()?;
        self.inner.create(key, value).await
    }
    async fn update(
        &self,
        key: &str,
        expected: u64,
        value: Vec<u8>,
    ) -> Result<Option<u64>, StoreError> {
        self.check()?;
        self.inner.update(key, expected, value).await
    }
    async fn delete(&self, key: &str, expected: Option<u64>) -> Result<bool, StoreError> {
        self.check()?;
        self.inner.delete(key, expected).await
    }
    async fn put_expiring(
        &self,
        key: &str,
        value: Vec<u8>,
        ttl: std::time::Duration,
    ) -> Result<u64, StoreError> {
        self.check()?;
        self.inner.put_expiring(key, value, ttl).await
    }
}

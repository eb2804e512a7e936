//! In-memory [`Leases`] for tests: leases expire when a test says so, keys can be
//! deleted behind the registration's back, and the store can go down.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use super::{LeaseId, Leases, MembershipError};

#[derive(Default)]
pub struct MemoryLeases {
    state: Mutex<State>,
    pub down: AtomicBool,
}

#[derive(Default)]
struct State {
    next: LeaseId,
    /// Live leases with their TTL.
    live: HashMap<LeaseId, Duration>,
    keys: HashMap<String, (Vec<u8>, LeaseId)>,
}

impl MemoryLeases {
    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> Result<T, MembershipError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(MembershipError::Store("unavailable".into()));
        }
        Ok(f(&mut self.state.lock().unwrap()))
    }

    /// Expires `lease` now, with every key on it.
    pub fn expire(&self, lease: LeaseId) {
        let mut s = self.state.lock().unwrap();
        s.live.remove(&lease);
        s.keys.retain(|_, (_, l)| *l != lease);
    }

    /// Deletes `key` behind its writer's back.
    pub fn remove(&self, key: &str) {
        self.state.lock().unwrap().keys.remove(key);
    }

    /// The keys under `prefix`, sorted.
    pub fn keys_under(&self, prefix: &str) -> Vec<String> {
        let mut keys: Vec<String> = self
            .state
            .lock()
            .unwrap()
            .keys
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect();
        keys.sort();
        keys
    }

    pub fn get(&self, key: &str) -> Option<(Vec<u8>, LeaseId)> {
        self.state.lock().unwrap().keys.get(key).cloned()
    }

    pub fn ttl_of(&self, lease: LeaseId) -> Option<Duration> {
        self.state.lock().unwrap().live.get(&lease).copied()
    }
}

#[async_trait::async_trait]
impl Leases for MemoryLeases {
    async fn grant(&self, ttl: Duration) -> Result<LeaseId, MembershipError> {
        self.with(|s| {
            s.next += 1;
            s.live.insert(s.next, ttl);
            s.next
        })
    }

    async fn renew(&self, lease: LeaseId) -> Result<bool, MembershipError> {
        self.with(|s| s.live.contains_key(&lease))
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: LeaseId) -> Result<(), MembershipError> {
        self.with(|s| {
            if s.live.contains_key(&lease) {
                s.keys.insert(key.to_string(), (value, lease));
                Ok(())
            } else {
                Err(MembershipError::Store(format!("lease {lease} not found")))
            }
        })?
    }

    async fn lease_of(&self, key: &str) -> Result<Option<LeaseId>, MembershipError> {
        self.with(|s| s.keys.get(key).map(|(_, l)| *l))
    }

    async fn delete(&self, key: &str) -> Result<(), MembershipError> {
        self.with(|s| {
            s.keys.remove(key);
        })
    }
}

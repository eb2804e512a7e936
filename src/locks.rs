//! Locks by name: one reader-writer lock per network, endpoint, address or pool, so
//! that changes to different objects never wait for each other; what must be unique
//! across hosts is decided by the store's compare-and-set. What is still done one at
//! a time on a host, and never on behalf of one container: the host-wide datapath
//! sync of network changes and the reconciler (it runs `nft` and `iptables`), the
//! choice of an automatic pool (etcd calls), and the embedded store's writes (one
//! fsync at a time, each carrying every change waiting for it).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};

/// A set of named locks, created on first use and forgotten when nobody holds or
/// waits for them.
#[derive(Debug, Default)]
pub struct KeyedLocks {
    locks: Mutex<HashMap<String, Arc<RwLock<()>>>>,
}

/// Held while the named object is read (shared with other readers).
pub type ReadGuard = OwnedRwLockReadGuard<()>;
/// Held while the named object is changed (alone).
pub type WriteGuard = OwnedRwLockWriteGuard<()>;

impl KeyedLocks {
    fn lock_for(&self, key: &str) -> Arc<RwLock<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        // Forget the locks nobody holds or waits for (only the map refers to them),
        // now and then, so the map grows with what is in flight, not with history.
        if locks.len() >= 64 && locks.len().is_power_of_two() {
            locks.retain(|_, l| Arc::strong_count(l) > 1);
        }
        locks.entry(key.to_string()).or_default().clone()
    }

    pub async fn read(&self, key: &str) -> ReadGuard {
        self.lock_for(key).read_owned().await
    }

    pub async fn write(&self, key: &str) -> WriteGuard {
        self.lock_for(key).write_owned().await
    }

    /// The write lock if nobody holds or waits for it now (for a caller that already
    /// holds another object's lock and must not wait for a second one).
    pub fn try_write(&self, key: &str) -> Option<WriteGuard> {
        self.lock_for(key).try_write_owned().ok()
    }

    /// How many named locks the set remembers.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.locks.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn different_names_never_wait_for_each_other() {
        let locks = KeyedLocks::default();
        let _a = locks.write("a").await;
        let b = tokio::time::timeout(Duration::from_secs(1), locks.write("b")).await;
        assert!(b.is_ok(), "b waited for a");
    }

    #[tokio::test]
    async fn a_writer_excludes_readers_and_writers_of_the_same_name() {
        let locks = KeyedLocks::default();
        let r1 = locks.read("a").await;
        let r2 = tokio::time::timeout(Duration::from_secs(1), locks.read("a")).await;
        assert!(r2.is_ok(), "readers share");
        let w = tokio::time::timeout(Duration::from_millis(50), locks.write("a")).await;
        assert!(w.is_err(), "a writer got in beside readers");
        drop((r1, r2));
        let _w = locks.write("a").await;
        let r = tokio::time::timeout(Duration::from_millis(50), locks.read("a")).await;
        assert!(r.is_err(), "a reader got in beside a writer");
    }

    #[tokio::test]
    async fn forgotten_names_do_not_pile_up() {
        let locks = KeyedLocks::default();
        let held = locks.write("kept").await;
        for i in 0..1000 {
            drop(locks.write(&i.to_string()).await);
        }
        assert!(locks.len() <= 129, "{} locks remembered", locks.len());
        // A held lock is never forgotten: a new caller of its name still waits for it.
        let again = tokio::time::timeout(Duration::from_millis(50), locks.write("kept")).await;
        assert!(again.is_err(), "a held lock was forgotten");
        drop(held);
    }
}

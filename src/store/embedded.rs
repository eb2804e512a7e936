//! The embedded store: one JSON file under the state directory.
//!
//! Every accepted change is written to a temporary file, fsynced and renamed over
//! the old one (then the directory is fsynced) before the call returns, so a crash
//! leaves either the old or the new state, never a torn file.
//!
//! Group commit: a change is applied in memory at once, then waits for a write of
//! the state that contains it. One write runs at a time, off the runtime's worker
//! threads, and takes every change applied before it started, so concurrent
//! changes share one fsync. Reads see applied changes that are still waiting for
//! their write; if a write fails, the state rolls back to the last one written and
//! every change not yet written fails with it.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{Store, StoreError, Versioned};

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Entry {
    revision: u64,
    value: String,
    /// When it vanishes (milliseconds since the Unix epoch, this host's clock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires_ms: Option<u64>,
}

impl Entry {
    fn live(&self, now_ms: u64) -> bool {
        self.expires_ms.is_none_or(|t| now_ms < t)
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Data {
    /// Highest revision handed out; never reused, even after deletes.
    revision: u64,
    entries: BTreeMap<String, Entry>,
}

impl Data {
    /// Writes `key` at the next revision; returns that revision.
    fn put(&mut self, key: String, value: String, expires_ms: Option<u64>) -> u64 {
        self.revision += 1;
        let revision = self.revision;
        self.entries.insert(
            key,
            Entry {
                revision,
                value,
                expires_ms,
            },
        );
        revision
    }
}

/// What a waiting change hears from the writer: written, or why not.
type Outcome = Result<(), (std::io::ErrorKind, String)>;

#[derive(Debug)]
struct Inner {
    path: Option<PathBuf>,
    /// Every applied change, written or not.
    data: Data,
    /// What the state file holds: where a failed write rolls back to.
    written: Data,
    /// The callers of changes applied but not yet written, waiting for the outcome.
    waiting: Vec<tokio::sync::oneshot::Sender<Outcome>>,
    /// Whether the writer task is running (it exits when nothing waits).
    writing: bool,
    /// How many times the state file was written.
    writes: u64,
}

#[derive(Debug, Clone)]
pub struct EmbeddedStore {
    inner: Arc<Mutex<Inner>>,
}

pub const STATE_FILE: &str = "state.json";

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

impl EmbeddedStore {
    /// Opens (or creates) `dir/state.json`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let path = dir.join(STATE_FILE);
        let data = match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| StoreError::Corrupt {
                key: path.display().to_string(),
                source,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Data::default(),
            Err(e) => return Err(io_err(&path)(e)),
        };
        Ok(Self::with(Some(path), data))
    }

    /// A store that lives only in memory (tests, fakes).
    pub fn in_memory() -> Self {
        Self::with(None, Data::default())
    }

    fn with(path: Option<PathBuf>, data: Data) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                path,
                written: data.clone(),
                data,
                waiting: Vec::new(),
                writing: false,
                writes: 0,
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        lock(&self.inner)
    }

    /// How many times the state file has been written (each write may carry many
    /// changes).
    pub fn writes(&self) -> u64 {
        self.lock().writes
    }

    /// Runs `f` on the data; when it reports a change, returns once the change is in
    /// the state file (see the module's group commit). Dropping the returned future
    /// drops only the wait: the change is written (or rolled back) all the same.
    async fn mutate<R, F>(&self, f: F) -> Result<R, StoreError>
    where
        F: FnOnce(&mut Data) -> Result<(R, bool), StoreError>,
    {
        let (result, outcome, path) = {
            let mut inner = self.lock();
            // Expired entries are gone for every change, as they are for every read.
            let now = now_ms();
            inner.data.entries.retain(|_, e| e.live(now));
            let (result, changed) = f(&mut inner.data)?;
            let Some(path) = inner.path.clone().filter(|_| changed) else {
                return Ok(result);
            };
            let (tx, rx) = tokio::sync::oneshot::channel();
            inner.waiting.push(tx);
            if !inner.writing {
                inner.writing = true;
                tokio::spawn(write_while_waited_for(self.inner.clone(), path.clone()));
            }
            (result, rx, path)
        };
        match outcome.await {
            Ok(Ok(())) => Ok(result),
            Ok(Err((kind, message))) => Err(StoreError::Io {
                path: path.display().to_string(),
                source: std::io::Error::new(kind, message),
            }),
            Err(_) => Err(StoreError::Unavailable(
                "the store's writer stopped before writing this change".into(),
            )),
        }
    }

    fn read<R>(&self, f: impl FnOnce(&Data) -> R) -> R {
        f(&self.lock().data)
    }
}

fn lock(inner: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    inner.lock().unwrap_or_else(|p| p.into_inner())
}

/// The one writer: while changes wait, writes the state that holds all of them (off
/// the runtime's worker threads) and tells their callers. A failed write rolls the
/// data back to what the file holds and fails every change not in it, also those
/// applied during the write. Runs detached, so no caller going away can leave a
/// write half-told or start a second one.
async fn write_while_waited_for(inner: Arc<Mutex<Inner>>, path: PathBuf) {
    loop {
        let (data, told) = {
            let mut guard = lock(&inner);
            if guard.waiting.is_empty() {
                guard.writing = false;
                return;
            }
            guard.writes += 1;
            (guard.data.clone(), std::mem::take(&mut guard.waiting))
        };
        let target = path.clone();
        let result = tokio::task::spawn_blocking(move || persist(&target, &data).map(|()| data))
            .await
            .unwrap_or_else(|e| Err(StoreError::Unavailable(format!("store write failed: {e}"))));
        let mut guard = lock(&inner);
        let outcome: Outcome = match result {
            Ok(written) => {
                guard.written = written;
                Ok(())
            }
            Err(e) => {
                let kind = match &e {
                    StoreError::Io { source, .. } => source.kind(),
                    _ => std::io::ErrorKind::Other,
                };
                // Revisions handed out stay used: a reader may have seen one.
                let revision = guard.data.revision;
                guard.data = guard.written.clone();
                guard.data.revision = revision;
                for later in std::mem::take(&mut guard.waiting) {
                    let _ = later.send(Err((kind, e.to_string())));
                }
                Err((kind, e.to_string()))
            }
        };
        drop(guard);
        for waiter in told {
            let _ = waiter.send(outcome.clone());
        }
    }
}

fn persist(path: &Path, data: &Data) -> Result<(), StoreError> {
    let bytes = serde_json::to_vec(data).expect("store data serialises");
    let tmp = path.with_extension("json.tmp");
    let mut file = File::create(&tmp).map_err(io_err(&tmp))?;
    file.write_all(&bytes).map_err(io_err(&tmp))?;
    file.sync_all().map_err(io_err(&tmp))?;
    drop(file);
    fs::rename(&tmp, path).map_err(io_err(path))?;
    if let Some(dir) = path.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(dir))?;
    }
    Ok(())
}

fn text(key: &str, value: Vec<u8>) -> Result<String, StoreError> {
    String::from_utf8(value).map_err(|_| StoreError::NotText {
        key: key.to_string(),
    })
}

fn versioned(e: &Entry) -> Versioned {
    Versioned {
        value: e.value.clone().into_bytes(),
        revision: e.revision,
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        let now = now_ms();
        Ok(self.read(|d| d.entries.get(key).filter(|e| e.live(now)).map(versioned)))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError> {
        let now = now_ms();
        Ok(self.read(|d| {
            d.entries
                .range(prefix.to_string()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .filter(|(_, e)| e.live(now))
                .map(|(k, e)| (k.clone(), versioned(e)))
                .collect()
        }))
    }

    async fn create(&self, key: &str, value: Vec<u8>) -> Result<Option<u64>, StoreError> {
        let key = key.to_string();
        let value = text(&key, value)?;
        self.mutate(move |d| {
            if d.entries.contains_key(&key) {
                return Ok((None, false));
            }
            Ok((Some(d.put(key, value, None)), true))
        })
        .await
    }

    async fn update(
        &self,
        key: &str,
        expected: u64,
        value: Vec<u8>,
    ) -> Result<Option<u64>, StoreError> {
        let key = key.to_string();
        let value = text(&key, value)?;
        self.mutate(move |d| {
            let next = d.revision + 1;
            match d.entries.get_mut(&key) {
                Some(e) if e.revision == expected => {
                    *e = Entry {
                        revision: next,
                        value,
                        expires_ms: None,
                    };
                    d.revision = next;
                    Ok((Some(next), true))
                }
                _ => Ok((None, false)),
            }
        })
        .await
    }

    async fn delete(&self, key: &str, expected: Option<u64>) -> Result<bool, StoreError> {
        let key = key.to_string();
        self.mutate(move |d| {
            let matches = match (d.entries.get(&key), expected) {
                (Some(e), Some(rev)) => e.revision == rev,
                (Some(_), None) => true,
                (None, _) => false,
            };
            if matches {
                d.entries.remove(&key);
                d.revision += 1;
            }
            Ok((matches, matches))
        })
        .await
    }

    async fn put_expiring(
        &self,
        key: &str,
        value: Vec<u8>,
        ttl: std::time::Duration,
    ) -> Result<u64, StoreError> {
        let key = key.to_string();
        let value = text(&key, value)?;
        let expires_ms = Some(now_ms() + ttl.as_millis() as u64);
        self.mutate(move |d| Ok((d.put(key, value, expires_ms), true)))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn in_memory_store_meets_the_contract() {
        super::super::contract::run_all(|| async { EmbeddedStore::in_memory() }).await;
    }

    #[tokio::test]
    async fn file_store_meets_the_contract() {
        let dir = tempfile::tempdir().unwrap();
        let counter = std::sync::atomic::AtomicUsize::new(0);
        let base = dir.path().to_path_buf();
        super::super::contract::run_all(|| {
            let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let path = base.join(n.to_string());
            async move { EmbeddedStore::open(&path).unwrap() }
        })
        .await;
    }

    #[tokio::test]
    async fn every_accepted_write_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let rev = store.create("a", b"1".to_vec()).await.unwrap().unwrap();
        store.create("b", b"2".to_vec()).await.unwrap().unwrap();
        store
            .update("a", rev, b"3".to_vec())
            .await
            .unwrap()
            .unwrap();
        assert!(store.delete("b", None).await.unwrap());
        drop(store);

        let reopened = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(reopened.get("a").await.unwrap().unwrap().value, b"3");
        assert!(reopened.get("b").await.unwrap().is_none());
        // Revisions keep growing after a reopen: a new key never reuses an old revision.
        let c = reopened.create("c", b"4".to_vec()).await.unwrap().unwrap();
        assert!(c > rev + 1, "revision {c} reused after reopen");
    }

    #[tokio::test]
    async fn a_corrupt_state_file_is_an_error_not_an_empty_store() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(STATE_FILE), b"{not json").unwrap();
        assert!(matches!(
            EmbeddedStore::open(dir.path()),
            Err(StoreError::Corrupt { .. })
        ));
    }

    #[tokio::test]
    async fn a_failed_write_leaves_memory_and_disk_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("s");
        let store = EmbeddedStore::open(&sub).unwrap();
        let first = store.create("a", b"1".to_vec()).await.unwrap().unwrap();
        // Make the directory unwritable by replacing it with a file.
        fs::remove_dir_all(&sub).unwrap();
        fs::write(&sub, b"").unwrap();
        assert!(store.create("b", b"2".to_vec()).await.is_err());
        assert!(store.get("b").await.unwrap().is_none());
        // Changes waiting for the same failed write fail with it, and none stays.
        let results = futures::future::join_all((0..10).map(|i| {
            let store = store.clone();
            async move { store.create(&format!("c{i}"), b"3".to_vec()).await }
        }))
        .await;
        assert!(results.iter().all(|r| r.is_err()), "{results:?}");
        assert!(store.list("c").await.unwrap().is_empty());
        assert_eq!(store.get("a").await.unwrap().unwrap().value, b"1");
        // Writable again: changes are written, and the revisions the failed changes
        // took (a reader may have seen them) are never handed out again.
        fs::remove_file(&sub).unwrap();
        fs::create_dir(&sub).unwrap();
        let next = store.create("d", b"4".to_vec()).await.unwrap().unwrap();
        assert!(
            next > first + 11,
            "revision {next} reused after a failed write"
        );
        drop(store);
        let reopened = EmbeddedStore::open(&sub).unwrap();
        assert_eq!(reopened.get("d").await.unwrap().unwrap().value, b"4");
        assert!(reopened.get("b").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn concurrent_changes_share_one_write_and_all_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let results = futures::future::join_all((0..100).map(|i| {
            let store = store.clone();
            async move { store.create(&format!("k{i:03}"), b"1".to_vec()).await }
        }))
        .await;
        assert!(
            results.iter().all(|r| matches!(r, Ok(Some(_)))),
            "{results:?}"
        );
        let writes = store.writes();
        assert!(writes <= 10, "100 concurrent changes took {writes} writes");
        drop(store);
        let reopened = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(reopened.list("k").await.unwrap().len(), 100);
    }
}

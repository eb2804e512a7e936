//! The `Store` contract against a real etcd. `scripts/test.sh` starts one (inside a
//! private network namespace, on its loopback) and sets `WEFT_TEST_ETCD`; a plain
//! `cargo test` skips these tests (they are `#[ignore]`d).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use weft::store::contract;
use weft::store::etcd::{EtcdConfig, EtcdStore};
use weft::store::{Store, StoreError};

fn config(prefix: String) -> EtcdConfig {
    EtcdConfig {
        endpoints: vec![
            std::env::var("WEFT_TEST_ETCD").expect("WEFT_TEST_ETCD names the etcd to test against")
        ],
        prefix,
        ca: None,
        cert: None,
        key: None,
        user: None,
        password: None,
        timeout: Duration::from_secs(3),
    }
}

static RUN: AtomicUsize = AtomicUsize::new(0);

/// A store in an empty key space of its own.
async fn fresh() -> EtcdStore {
    let n = RUN.fetch_add(1, Ordering::SeqCst);
    let prefix = format!("/weft-test/{}-{n}/", std::process::id());
    EtcdStore::connect(&config(prefix))
        .await
        .expect("etcd reachable")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs etcd: scripts/test.sh runs it with --ignored"]
async fn etcd_store_meets_the_contract() {
    contract::run_all(fresh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs etcd: scripts/test.sh runs it with --ignored"]
async fn keys_stay_under_the_prefix() {
    let a = fresh().await;
    let b = fresh().await;
    a.create("pools/x", b"1".to_vec()).await.unwrap().unwrap();
    assert!(
        b.get("pools/x").await.unwrap().is_none(),
        "prefixes must not leak into each other"
    );
    assert_eq!(a.list("").await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs etcd: scripts/test.sh runs it with --ignored"]
async fn an_unreachable_etcd_fails_fast_with_a_clear_error() {
    let mut cfg = config("/weft-test/unreachable/".into());
    cfg.endpoints = vec!["http://127.0.0.1:1".into()];
    cfg.timeout = Duration::from_millis(500);
    let started = std::time::Instant::now();
    let err = match EtcdStore::connect(&cfg).await {
        Ok(store) => store.get("k").await.unwrap_err(),
        Err(e) => e,
    };
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
}

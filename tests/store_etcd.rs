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

fn tls_config(prefix: &str, user: Option<(&str, &str)>) -> EtcdConfig {
    let pki = std::path::PathBuf::from(std::env::var("WEFT_TEST_PKI").expect("WEFT_TEST_PKI"));
    EtcdConfig {
        endpoints: vec![std::env::var("WEFT_TEST_ETCD_TLS").expect("WEFT_TEST_ETCD_TLS")],
        prefix: prefix.into(),
        ca: Some(pki.join("ca.pem")),
        cert: Some(pki.join("client.pem")),
        key: Some(pki.join("client.key")),
        user: user.map(|(u, _)| u.to_string()),
        password: user.map(|(_, p)| p.to_string()),
        timeout: Duration::from_secs(3),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs etcd: scripts/test.sh runs it with --ignored"]
async fn etcd_over_tls_with_user_and_password() {
    // Over TLS with a client certificate, turn on etcd authentication.
    let admin = EtcdStore::connect(&tls_config("/weft-tls/", None))
        .await
        .expect("TLS connect");
    let mut client = admin.client();
    client.user_add("root", "s3cret-pw", None).await.unwrap();
    client.user_grant_role("root", "root").await.unwrap();
    client.auth_enable().await.unwrap();

    // With the right password, the store meets the contract.
    contract::run_all(|| {
        let n = RUN.fetch_add(1, Ordering::SeqCst);
        async move {
            EtcdStore::connect(&tls_config(
                &format!("/weft-tls/{n}/"),
                Some(("root", "s3cret-pw")),
            ))
            .await
            .expect("TLS + password connect")
        }
    })
    .await;

    // A wrong password is a clear error, quickly, and the password is not in it.
    let err =
        match EtcdStore::connect(&tls_config("/weft-tls/x/", Some(("root", "wrong-pw")))).await {
            Ok(store) => store.get("k").await.unwrap_err(),
            Err(e) => e,
        };
    let text = err.to_string();
    assert!(matches!(err, StoreError::Unavailable(_)), "{text}");
    assert!(
        !text.contains("wrong-pw"),
        "the password leaked into an error: {text}"
    );

    // Without the CA, the server's certificate is not trusted.
    let mut untrusted = tls_config("/weft-tls/y/", Some(("root", "s3cret-pw")));
    untrusted.ca = None;
    let err = match EtcdStore::connect(&untrusted).await {
        Ok(store) => store.get("k").await.unwrap_err(),
        Err(e) => e,
    };
    assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
}

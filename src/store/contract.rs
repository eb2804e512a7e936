//! The contract every [`Store`] implementation must meet. The embedded store runs it
//! in its unit tests; the etcd store runs the same functions against a real etcd.

use std::future::Future;
use std::sync::Arc;

use super::{Store, StoreExt};

/// Runs every contract check, each against a fresh, empty store from `make`.
pub async fn run_all<S, F, Fut>(mut make: F)
where
    S: Store,
    F: FnMut() -> Fut,
    Fut: Future<Output = S>,
{
    create_only_when_absent(&make().await).await;
    update_is_compare_and_set(&make().await).await;
    delete_is_conditional(&make().await).await;
    list_returns_exactly_the_prefix_in_order(&make().await).await;
    concurrent_creates_have_one_winner(Arc::new(make().await)).await;
    modify_json_loses_no_increment(Arc::new(make().await)).await;
    an_expiring_key_vanishes_by_itself(&make().await).await;
}

/// `put_expiring` writes unconditionally and the key vanishes after its TTL (etcd's
/// leases are whole seconds and expire with some lag: allow up to 6 s for 2).
pub async fn an_expiring_key_vanishes_by_itself<S: Store>(s: &S) {
    let ttl = std::time::Duration::from_secs(2);
    s.create("e", b"1".to_vec()).await.unwrap().unwrap();
    let rev = s.put_expiring("e", b"2".to_vec(), ttl).await.unwrap();
    let got = s.get("e").await.unwrap().expect("visible before its TTL");
    assert_eq!((got.value.as_slice(), got.revision), (&b"2"[..], rev));
    assert_eq!(s.list("e").await.unwrap().len(), 1);
    s.create("stays", b"1".to_vec()).await.unwrap().unwrap();
    let started = std::time::Instant::now();
    while s.get("e").await.unwrap().is_some() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(6),
            "an expiring key outlived its TTL of {ttl:?} by far"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        started.elapsed() >= ttl - std::time::Duration::from_millis(200),
        "gone after {:?}, before its TTL",
        started.elapsed()
    );
    assert!(
        s.list("e").await.unwrap().is_empty(),
        "gone from listings too"
    );
    assert!(
        s.create("e", b"3".to_vec()).await.unwrap().is_some(),
        "and creatable again"
    );
    assert!(s.get("stays").await.unwrap().is_some(), "other keys stay");
}

pub async fn create_only_when_absent<S: Store>(s: &S) {
    let rev = s.create("k", b"\"a\"".to_vec()).await.unwrap();
    assert!(rev.is_some(), "first create must succeed");
    assert_eq!(
        s.create("k", b"\"b\"".to_vec()).await.unwrap(),
        None,
        "second create must fail"
    );
    let got = s.get("k").await.unwrap().unwrap();
    assert_eq!(got.value, b"\"a\"");
    assert_eq!(Some(got.revision), rev);
    assert!(s.get("missing").await.unwrap().is_none());
}

pub async fn update_is_compare_and_set<S: Store>(s: &S) {
    let r1 = s.create("k", b"1".to_vec()).await.unwrap().unwrap();
    let r2 = s
        .update("k", r1, b"2".to_vec())
        .await
        .unwrap()
        .expect("update at current revision");
    assert!(r2 > r1, "revision must grow");
    assert_eq!(
        s.update("k", r1, b"3".to_vec()).await.unwrap(),
        None,
        "stale revision must fail"
    );
    assert_eq!(s.get("k").await.unwrap().unwrap().value, b"2");
    assert_eq!(
        s.update("absent", r2, b"x".to_vec()).await.unwrap(),
        None,
        "update never creates"
    );
    assert!(s.get("absent").await.unwrap().is_none());
}

pub async fn delete_is_conditional<S: Store>(s: &S) {
    let r1 = s.create("k", b"1".to_vec()).await.unwrap().unwrap();
    let r2 = s.update("k", r1, b"2".to_vec()).await.unwrap().unwrap();
    assert!(
        !s.delete("k", Some(r1)).await.unwrap(),
        "stale delete must fail"
    );
    assert!(s.get("k").await.unwrap().is_some());
    assert!(s.delete("k", Some(r2)).await.unwrap());
    assert!(s.get("k").await.unwrap().is_none());
    assert!(
        !s.delete("k", None).await.unwrap(),
        "deleting an absent key reports false"
    );
    // A re-created key starts a new life with a fresh revision.
    let r3 = s.create("k", b"3".to_vec()).await.unwrap().unwrap();
    assert!(r3 > r2);
}

pub async fn list_returns_exactly_the_prefix_in_order<S: Store>(s: &S) {
    for k in ["a/2", "a/1", "ab", "a0", "b/1", "a/3/x"] {
        s.create(k, b"0".to_vec()).await.unwrap().unwrap();
    }
    let keys: Vec<String> = s
        .list("a/")
        .await
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(keys, ["a/1", "a/2", "a/3/x"]);
    assert!(s.list("zz/").await.unwrap().is_empty());
}

pub async fn concurrent_creates_have_one_winner<S: Store>(s: Arc<S>) {
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(
                async move { s.create("race", format!("{i}").into_bytes()).await.unwrap() },
            )
        })
        .collect();
    let mut winners = 0;
    for t in tasks {
        if t.await.unwrap().is_some() {
            winners += 1;
        }
    }
    assert_eq!(winners, 1, "exactly one concurrent create may win");
}

pub async fn modify_json_loses_no_increment<S: Store>(s: Arc<S>) {
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move {
                s.modify_json::<u64, super::StoreError, _>("counter", |v| {
                    Ok(Some(v.unwrap_or(0) + 1))
                })
                .await
                .unwrap()
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let v = s.get_json::<u64>("counter").await.unwrap().unwrap().value;
    assert_eq!(v, 16, "compare-and-set must not lose concurrent increments");
}

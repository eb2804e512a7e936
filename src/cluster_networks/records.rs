//! The cluster's record of its cluster networks (`cluster-networks/<name>`), shared
//! by the driver (a `docker network rm` removes one) and the reconciler.

use crate::schema::{keys, ClusterNetworkRecord};
use crate::store::{Record, Store, StoreError, StoreExt};

/// Every cluster network, skipping (and naming) records that do not decode.
pub async fn list(
    store: &dyn Store,
) -> Result<(Vec<Record<ClusterNetworkRecord>>, Vec<String>), StoreError> {
    let (records, bad) = store
        .list_json_lossy::<ClusterNetworkRecord>(keys::CLUSTER_NETWORKS)
        .await?;
    let mut skipped = bad;
    let mut kept = Vec::new();
    for (key, record) in records {
        if key == keys::cluster_network(&record.value.spec.name) {
            kept.push(record);
        } else {
            skipped.push(format!("{key}: names network {:?}", record.value.spec.name));
        }
    }
    Ok((kept, skipped))
}

/// Removes cluster network `uid` (if it is still recorded, and not a later network
/// of the same name). Returns whether it removed it.
pub async fn remove(store: &dyn Store, uid: &str) -> Result<bool, StoreError> {
    let (records, _) = list(store).await?;
    match records.into_iter().find(|r| r.value.uid == uid) {
        Some(r) => {
            store
                .delete(&keys::cluster_network(&r.value.spec.name), Some(r.revision))
                .await
        }
        None => Ok(false),
    }
}

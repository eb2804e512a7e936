//! `/IpamDriver.*` handlers: decode, call the IPAM service, encode.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};

use super::{ApiError, AppState, DockerJson};
use crate::ipam::PoolRequest;
use crate::protocol::ipam::*;
use crate::protocol::Empty;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/IpamDriver.GetCapabilities", post(capabilities))
        .route("/IpamDriver.GetDefaultAddressSpaces", post(address_spaces))
        .route("/IpamDriver.RequestPool", post(request_pool))
        .route("/IpamDriver.ReleasePool", post(release_pool))
        .route("/IpamDriver.RequestAddress", post(request_address))
        .route("/IpamDriver.ReleaseAddress", post(release_address))
}

type Reply<T> = Result<Json<T>, ApiError>;

async fn capabilities() -> Json<CapabilitiesResponse> {
    // State is persisted by weft itself, so dockerd need not replay requests.
    Json(CapabilitiesResponse {
        requires_mac_address: false,
        requires_request_replay: false,
    })
}

async fn address_spaces(State(s): State<AppState>) -> Json<AddressSpacesResponse> {
    let (local, global) = s.ipam.address_spaces();
    Json(AddressSpacesResponse {
        local_default: local.into(),
        global_default: global.into(),
    })
}

async fn request_pool(
    State(s): State<AppState>,
    DockerJson(req): DockerJson<RequestPoolRequest>,
) -> Reply<RequestPoolResponse> {
    let (id, pool) = s
        .ipam
        .request_pool(PoolRequest {
            address_space: req.address_space,
            pool: req.pool,
            sub_pool: req.sub_pool,
            options: req.options,
            v6: req.v6,
        })
        .await?;
    Ok(Json(RequestPoolResponse {
        pool_id: id.to_string(),
        pool: pool.to_string(),
        data: BTreeMap::new(),
    }))
}

async fn release_pool(
    State(s): State<AppState>,
    DockerJson(req): DockerJson<ReleasePoolRequest>,
) -> Reply<Empty> {
    s.ipam.release_pool(&req.pool_id).await?;
    Ok(Json(Empty {}))
}

async fn request_address(
    State(s): State<AppState>,
    DockerJson(req): DockerJson<RequestAddressRequest>,
) -> Reply<RequestAddressResponse> {
    let address = s
        .ipam
        .request_address(&req.pool_id, &req.address, &req.options)
        .await?;
    Ok(Json(RequestAddressResponse {
        address: address.to_string(),
        data: BTreeMap::new(),
    }))
}

async fn release_address(
    State(s): State<AppState>,
    DockerJson(req): DockerJson<ReleaseAddressRequest>,
) -> Reply<Empty> {
    s.ipam.release_address(&req.pool_id, &req.address).await?;
    Ok(Json(Empty {}))
}

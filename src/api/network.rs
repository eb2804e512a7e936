//! `/NetworkDriver.*` handlers: decode, call the driver, encode.

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};

use super::{record_ids, ApiError, AppState, DockerJson};
use crate::protocol::network::*;
use crate::protocol::Empty;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/NetworkDriver.GetCapabilities", post(capabilities))
        .route("/NetworkDriver.CreateNetwork", post(create_network))
        .route("/NetworkDriver.DeleteNetwork", post(delete_network))
        .route("/NetworkDriver.CreateEndpoint", post(create_endpoint))
        .route("/NetworkDriver.DeleteEndpoint", post(delete_endpoint))
        .route("/NetworkDriver.EndpointOperInfo", post(endpoint_oper_info))
        .route("/NetworkDriver.Join", post(join))
        .route("/NetworkDriver.Leave", post(leave))
        .route(
            "/NetworkDriver.ProgramExternalConnectivity",
            post(program_external),
        )
        .route(
            "/NetworkDriver.RevokeExternalConnectivity",
            post(revoke_external),
        )
        .route("/NetworkDriver.DiscoverNew", post(discover))
        .route("/NetworkDriver.DiscoverDelete", post(discover))
        .route("/NetworkDriver.AllocateNetwork", post(allocate_network))
        .route("/NetworkDriver.FreeNetwork", post(free_network))
        .route("/NetworkDriver.GwAllocCheck", post(gw_alloc_check))
}

type Reply<T> = Result<Json<T>, ApiError>;

async fn capabilities() -> Json<CapabilitiesResponse> {
    // Local data scope: cross-host consistency is weft's store's job, not dockerd's.
    Json(CapabilitiesResponse {
        scope: "local".into(),
        connectivity_scope: "global".into(),
        gw_alloc_checker: false,
    })
}

async fn create_network(
    State(s): State<AppState>,
    DockerJson(req): DockerJson<CreateNetworkRequest>,
) -> Reply<Empty> {
    record_ids(&req.network_id, "");
    s.driver.create_network(req).await?;
    Ok(Json(Empty {}))
}

async fn delete_network(
    State(s): State<AppState>,
    DockerJson(req): DockerJson<NetworkIdRequest>,
) -> Reply<Empty> {
    record_ids(&req.network_id, "");
    s.driver.delete_network(&req.network_id).await?;
    Ok(Json(Empty {}))
}

async fn create_endpoint(
    State(s): State<AppState>,
    DockerJson(req): DockerJson<CreateEndpointRequest>,
) -> Reply<CreateEndpointResponse> {
    record_ids(&req.network_id, &req.endpoint_id);
    Ok(Json(s.driver.create_endpoint(req).await?))
}

async fn delete_endpoint(
    State(s): State<AppState>,
    DockerJson(req): DockerJson<EndpointRequest>,
) -> Reply<Empty> {
    record_ids(&req.network_id, &req.endpoint_id);
    s.driver
        .delete_endpoint(&req.network_id, &req.endpoint_id)
        .await?;
    Ok(Json(Empty {}))
}

async fn endpoint_oper_info(
    DockerJson(_req): DockerJson<EndpointRequest>,
) -> Json<EndpointOperInfoResponse> {
    Json(EndpointOperInfoResponse::default())
}

async fn join(
    State(s): State<AppState>,
    DockerJson(req): DockerJson<JoinRequest>,
) -> Reply<JoinResponse> {
    record_ids(&req.network_id, &req.endpoint_id);
    Ok(Json(s.driver.join(req).await?))
}

async fn leave(
    State(s): State<AppState>,
    DockerJson(req): DockerJson<EndpointRequest>,
) -> Reply<Empty> {
    record_ids(&req.network_id, &req.endpoint_id);
    s.driver.leave(&req.network_id, &req.endpoint_id).await?;
    Ok(Json(Empty {}))
}

/// Publishes the container's `-p`/`-P` ports on this host.
async fn program_external(
    State(s): State<AppState>,
    DockerJson(req): DockerJson<ProgramExternalConnectivityRequest>,
) -> Reply<Empty> {
    record_ids(&req.network_id, &req.endpoint_id);
    s.driver
        .program_external(&req.network_id, &req.endpoint_id, &req.options)
        .await?;
    Ok(Json(Empty {}))
}

async fn revoke_external(
    State(s): State<AppState>,
    DockerJson(req): DockerJson<EndpointRequest>,
) -> Reply<Empty> {
    record_ids(&req.network_id, &req.endpoint_id);
    s.driver
        .revoke_external(&req.network_id, &req.endpoint_id)
        .await?;
    Ok(Json(Empty {}))
}

async fn discover(DockerJson(_req): DockerJson<DiscoveryRequest>) -> Json<Empty> {
    Json(Empty {})
}

/// Swarm only: echo the options so every worker receives them in CreateNetwork.
async fn allocate_network(
    DockerJson(req): DockerJson<AllocateNetworkRequest>,
) -> Json<AllocateNetworkResponse> {
    Json(AllocateNetworkResponse {
        options: req.options,
    })
}

async fn free_network(DockerJson(_req): DockerJson<NetworkIdRequest>) -> Json<Empty> {
    Json(Empty {})
}

async fn gw_alloc_check(
    DockerJson(_req): DockerJson<GwAllocCheckRequest>,
) -> Json<GwAllocCheckResponse> {
    Json(GwAllocCheckResponse {
        skip_ipv4: false,
        skip_ipv6: false,
    })
}

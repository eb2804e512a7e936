//! NetworkDriver requests and responses (`/NetworkDriver.*`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{null_as_default, OptionsMap};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CapabilitiesResponse {
    #[serde(rename = "Scope")]
    pub scope: String,
    #[serde(rename = "ConnectivityScope")]
    pub connectivity_scope: String,
    #[serde(rename = "GwAllocChecker")]
    pub gw_alloc_checker: bool,
}

/// One element of `IPv4Data` / `IPv6Data`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct IpamData {
    #[serde(rename = "AddressSpace", default, deserialize_with = "null_as_default")]
    pub address_space: String,
    #[serde(rename = "Pool", default, deserialize_with = "null_as_default")]
    pub pool: String,
    #[serde(rename = "Gateway", default, deserialize_with = "null_as_default")]
    pub gateway: String,
    /// name -> CIDR; values may be unparsable (`"<nil>"`), so kept as JSON.
    #[serde(rename = "AuxAddresses", default, deserialize_with = "null_as_default")]
    pub aux_addresses: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CreateNetworkRequest {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(rename = "Options", default, deserialize_with = "null_as_default")]
    pub options: OptionsMap,
    #[serde(rename = "IPv4Data", default, deserialize_with = "null_as_default")]
    pub ipv4_data: Vec<IpamData>,
    #[serde(rename = "IPv6Data", default, deserialize_with = "null_as_default")]
    pub ipv6_data: Vec<IpamData>,
}

/// Requests that carry only a network ID (`DeleteNetwork`, `FreeNetwork`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetworkIdRequest {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AllocateNetworkRequest {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(rename = "Options", default, deserialize_with = "null_as_default")]
    pub options: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AllocateNetworkResponse {
    #[serde(rename = "Options")]
    pub options: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct EndpointInterface {
    #[serde(
        rename = "Address",
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub address: String,
    #[serde(
        rename = "AddressIPv6",
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub address_ipv6: String,
    #[serde(
        rename = "MacAddress",
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub mac_address: String,
}

impl EndpointInterface {
    pub fn is_empty(&self) -> bool {
        self.address.is_empty() && self.address_ipv6.is_empty() && self.mac_address.is_empty()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CreateEndpointRequest {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
    #[serde(rename = "Interface", default, deserialize_with = "null_as_default")]
    pub interface: EndpointInterface,
    #[serde(rename = "Options", default, deserialize_with = "null_as_default")]
    pub options: OptionsMap,
}

/// Only fields Docker left empty may be filled in; weft fills none, so this is `{}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CreateEndpointResponse {
    #[serde(rename = "Interface", skip_serializing_if = "Option::is_none")]
    pub interface: Option<EndpointInterface>,
}

/// Requests naming one endpoint (`DeleteEndpoint`, `EndpointOperInfo`, `Leave`,
/// `RevokeExternalConnectivity`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EndpointRequest {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct EndpointOperInfoResponse {
    #[serde(rename = "Value")]
    pub value: OptionsMap,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JoinRequest {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
    #[serde(rename = "SandboxKey", default, deserialize_with = "null_as_default")]
    pub sandbox_key: String,
    #[serde(rename = "Options", default, deserialize_with = "null_as_default")]
    pub options: OptionsMap,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InterfaceName {
    #[serde(rename = "SrcName")]
    pub src_name: String,
    #[serde(rename = "DstPrefix")]
    pub dst_prefix: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StaticRoute {
    #[serde(rename = "Destination")]
    pub destination: String,
    #[serde(rename = "RouteType")]
    pub route_type: u8,
    #[serde(rename = "NextHop", skip_serializing_if = "String::is_empty", default)]
    pub next_hop: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct JoinResponse {
    #[serde(rename = "InterfaceName")]
    pub interface_name: InterfaceName,
    /// Plain IP, never CIDR; empty when the network gives no default route.
    #[serde(rename = "Gateway", skip_serializing_if = "String::is_empty", default)]
    pub gateway: String,
    #[serde(
        rename = "StaticRoutes",
        skip_serializing_if = "Vec::is_empty",
        default
    )]
    pub static_routes: Vec<StaticRoute>,
    #[serde(rename = "DisableGatewayService")]
    pub disable_gateway_service: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProgramExternalConnectivityRequest {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
    #[serde(rename = "Options", default, deserialize_with = "null_as_default")]
    pub options: OptionsMap,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GwAllocCheckRequest {
    #[serde(rename = "Options", default, deserialize_with = "null_as_default")]
    pub options: OptionsMap,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GwAllocCheckResponse {
    #[serde(rename = "SkipIPv4")]
    pub skip_ipv4: bool,
    #[serde(rename = "SkipIPv6")]
    pub skip_ipv6: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DiscoveryRequest {
    #[serde(rename = "DiscoveryType", default)]
    pub discovery_type: i64,
    #[serde(rename = "DiscoveryData", default)]
    pub discovery_data: serde_json::Value,
}

//! IpamDriver requests and responses (`/IpamDriver.*`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::null_as_default;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CapabilitiesResponse {
    #[serde(rename = "RequiresMACAddress")]
    pub requires_mac_address: bool,
    #[serde(rename = "RequiresRequestReplay")]
    pub requires_request_replay: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AddressSpacesResponse {
    #[serde(rename = "LocalDefaultAddressSpace")]
    pub local_default: String,
    #[serde(rename = "GlobalDefaultAddressSpace")]
    pub global_default: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RequestPoolRequest {
    #[serde(rename = "AddressSpace", default, deserialize_with = "null_as_default")]
    pub address_space: String,
    #[serde(rename = "Pool", default, deserialize_with = "null_as_default")]
    pub pool: String,
    #[serde(rename = "SubPool", default, deserialize_with = "null_as_default")]
    pub sub_pool: String,
    #[serde(rename = "Options", default, deserialize_with = "null_as_default")]
    pub options: BTreeMap<String, String>,
    #[serde(rename = "V6", default)]
    pub v6: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RequestPoolResponse {
    #[serde(rename = "PoolID")]
    pub pool_id: String,
    #[serde(rename = "Pool")]
    pub pool: String,
    #[serde(rename = "Data")]
    pub data: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReleasePoolRequest {
    #[serde(rename = "PoolID")]
    pub pool_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RequestAddressRequest {
    #[serde(rename = "PoolID")]
    pub pool_id: String,
    #[serde(rename = "Address", default, deserialize_with = "null_as_default")]
    pub address: String,
    #[serde(rename = "Options", default, deserialize_with = "null_as_default")]
    pub options: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RequestAddressResponse {
    /// CIDR: the address with the pool's prefix length.
    #[serde(rename = "Address")]
    pub address: String,
    #[serde(rename = "Data")]
    pub data: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReleaseAddressRequest {
    #[serde(rename = "PoolID")]
    pub pool_id: String,
    #[serde(rename = "Address", default, deserialize_with = "null_as_default")]
    pub address: String,
}

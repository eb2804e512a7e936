//! Wire types of libnetwork's remote NetworkDriver and IpamDriver protocols.
//!
//! Plain serde structs with explicit field names (Docker's casing has acronyms that
//! `rename_all = "PascalCase"` gets wrong) and no behaviour. Every map or list may
//! arrive as `null`; [`null_as_default`] turns that into an empty value. Unknown
//! fields are ignored, as Go's `encoding/json` does.

pub mod ipam;
pub mod network;

use serde::{Deserialize, Deserializer, Serialize};

/// Deserialise `null` (or a missing field, with `#[serde(default)]`) as `T::default()`.
pub fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// `Plugin.Activate` reply.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ActivateResponse {
    #[serde(rename = "Implements")]
    pub implements: Vec<String>,
}

/// The empty JSON object `{}` that most calls answer with.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Empty {}

/// JSON options map as Docker sends it (values of any JSON type).
pub type OptionsMap = serde_json::Map<String, serde_json::Value>;

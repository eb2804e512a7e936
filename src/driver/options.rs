//! The `-o` options of `docker network create` that weft understands.

use crate::protocol::OptionsMap;
use crate::schema::ClusterState;

use super::DriverError;

pub const MTU_DOCKER: &str = "com.docker.network.driver.mtu";
pub const MTU_WEFT: &str = "weft.mtu";
pub const NETWORK_NAME: &str = "weft.network";
pub const ALLOW_ROUTE_OVERLAP: &str = "weft.allow-route-overlap";
pub const HOST_ACCESS: &str = "weft.host-access";
/// `local` (the default) or `cluster`: created once, weft creates it on every host.
pub const SCOPE: &str = "weft.scope";
/// Set by weft on the copies of a cluster network it creates on other hosts.
pub const CLUSTER_UID: &str = "weft.cluster-uid";
const GENERIC: &str = "com.docker.network.generic";
const INTERNAL: &str = "com.docker.network.internal";
const ENABLE_IPV6: &str = "com.docker.network.enable_ipv6";

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworkOptions {
    pub mtu: Option<u32>,
    pub name: Option<String>,
    pub internal: bool,
    pub ipv6: bool,
    /// Use a subnet even though a route of the host that weft did not add overlaps it.
    pub allow_route_overlap: bool,
    /// Let the network's containers reach every address and port of their host (by
    /// default only their gateway, for ICMP).
    pub host_access: bool,
    /// `-o weft.scope=cluster`: a user's original, or (with `weft.cluster-uid`) a
    /// copy weft made of cluster network `uid`.
    pub cluster: Option<ClusterState>,
}

/// Docker sends booleans as JSON booleans, but be lenient with strings.
fn truthy(v: Option<&serde_json::Value>) -> bool {
    match v {
        Some(serde_json::Value::Bool(b)) => *b,
        Some(serde_json::Value::String(s)) => s == "true" || s == "1",
        _ => false,
    }
}

fn parse_mtu(key: &str, v: &str) -> Result<u32, DriverError> {
    match v.trim().parse::<u32>() {
        Ok(m) if (576..=65535).contains(&m) => Ok(m),
        _ => Err(DriverError::Invalid(format!(
            "-o {key}={v:?}: expected an MTU from 576 to 65535"
        ))),
    }
}

fn parse_bool(key: &str, v: &str) -> Result<bool, DriverError> {
    match v {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(DriverError::Invalid(format!(
            "-o {key}={v:?}: expected true or false"
        ))),
    }
}

impl NetworkOptions {
    pub fn parse(options: &OptionsMap) -> Result<Self, DriverError> {
        let mut out = NetworkOptions {
            internal: truthy(options.get(INTERNAL)),
            ipv6: truthy(options.get(ENABLE_IPV6)),
            ..Default::default()
        };
        let generic = match options.get(GENERIC) {
            None | Some(serde_json::Value::Null) => return Ok(out),
            Some(serde_json::Value::Object(m)) => m,
            Some(_) => return Err(DriverError::Invalid(format!("{GENERIC} must be an object"))),
        };
        let mut mtus = Vec::new();
        let (mut cluster_scope, mut uid) = (false, None);
        for (key, value) in generic {
            let text = match value {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            match key.as_str() {
                MTU_DOCKER | MTU_WEFT => mtus.push((key.as_str(), parse_mtu(key, &text)?)),
                NETWORK_NAME => {
                    let ok = !text.is_empty()
                        && text.len() <= 64
                        && text.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
                    if !ok {
                        return Err(DriverError::Invalid(format!(
                            "-o {NETWORK_NAME}={text:?}: use 1 to 64 letters, digits, '-', '_' or '.'"
                        )));
                    }
                    out.name = Some(text);
                }
                ALLOW_ROUTE_OVERLAP => out.allow_route_overlap = parse_bool(key, &text)?,
                HOST_ACCESS => out.host_access = parse_bool(key, &text)?,
                SCOPE => {
                    cluster_scope = match text.as_str() {
                        "local" => false,
                        "cluster" => true,
                        _ => {
                            return Err(DriverError::Invalid(format!(
                                "-o {SCOPE}={text:?}: expected local or cluster"
                            )))
                        }
                    }
                }
                CLUSTER_UID => {
                    if text.is_empty()
                        || text.len() > 64
                        || !text.bytes().all(|b| b.is_ascii_alphanumeric())
                    {
                        return Err(DriverError::Invalid(format!(
                            "-o {CLUSTER_UID}={text:?}: not a cluster network uid (weft sets this option itself)"
                        )));
                    }
                    uid = Some(text);
                }
                k if k.starts_with("weft.") => {
                    return Err(DriverError::Invalid(format!(
                        "unknown option -o {k} (weft knows {MTU_WEFT}, {MTU_DOCKER}, {NETWORK_NAME}, {ALLOW_ROUTE_OVERLAP}, {HOST_ACCESS} and {SCOPE})"
                    )))
                }
                // Options meant for other tools (or daemon-wide defaults) are not ours to refuse.
                _ => {}
            }
        }
        if let [(k1, m1), (k2, m2)] = mtus.as_slice() {
            if m1 != m2 {
                return Err(DriverError::Invalid(format!(
                    "-o {k1}={m1} and -o {k2}={m2} disagree"
                )));
            }
        }
        out.mtu = mtus.first().map(|(_, m)| *m);
        out.cluster = match (cluster_scope, uid) {
            (false, None) => None,
            (true, None) => Some(ClusterState::Unpublished),
            (true, Some(uid)) => Some(ClusterState::Joining { uid }),
            (false, Some(_)) => {
                return Err(DriverError::Invalid(format!(
                    "-o {CLUSTER_UID} without -o {SCOPE}=cluster"
                )))
            }
        };
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn opts(v: serde_json::Value) -> OptionsMap {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn reads_mtu_name_internal_and_ipv6() {
        let o = NetworkOptions::parse(&opts(json!({
            "com.docker.network.enable_ipv6": false,
            "com.docker.network.internal": true,
            "com.docker.network.generic": {"weft.mtu": "1400", "com.docker.network.driver.mtu": "1400", "weft.network": "blue", "weft.allow-route-overlap": "true", "weft.host-access": "true", "other": "x"}
        })))
        .unwrap();
        assert_eq!(
            o,
            NetworkOptions {
                mtu: Some(1400),
                name: Some("blue".into()),
                internal: true,
                ipv6: false,
                allow_route_overlap: true,
                host_access: true,
                cluster: None,
            }
        );
    }

    #[test]
    fn reads_the_scope_of_an_original_and_of_a_copy() {
        let scope = |generic: serde_json::Value| {
            NetworkOptions::parse(&opts(json!({ "com.docker.network.generic": generic })))
                .map(|o| o.cluster)
        };
        assert_eq!(scope(json!({"weft.scope": "local"})).unwrap(), None);
        assert_eq!(
            scope(json!({"weft.scope": "cluster"})).unwrap(),
            Some(ClusterState::Unpublished)
        );
        assert_eq!(
            scope(json!({"weft.scope": "cluster", "weft.cluster-uid": "ab12"})).unwrap(),
            Some(ClusterState::Joining { uid: "ab12".into() })
        );
        for bad in [
            json!({"weft.scope": "global"}),
            json!({"weft.cluster-uid": "ab12"}),
            json!({"weft.scope": "cluster", "weft.cluster-uid": "a/b"}),
        ] {
            assert!(scope(bad.clone()).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn rejects_bad_and_conflicting_values() {
        for bad in [
            json!({"com.docker.network.generic": {"weft.mtu": "12"}}),
            json!({"com.docker.network.generic": {"weft.mtu": "abc"}}),
            json!({"com.docker.network.generic": {"weft.mtu": "1400", "com.docker.network.driver.mtu": "1300"}}),
            json!({"com.docker.network.generic": {"weft.nope": "1"}}),
            json!({"com.docker.network.generic": {"weft.network": "has space"}}),
            json!({"com.docker.network.generic": {"weft.host-access": "yes"}}),
            json!({"com.docker.network.generic": "string"}),
        ] {
            assert!(
                NetworkOptions::parse(&opts(bad.clone())).is_err(),
                "{bad} accepted"
            );
        }
    }

    #[test]
    fn missing_or_null_generic_is_fine() {
        assert_eq!(
            NetworkOptions::parse(&OptionsMap::new()).unwrap(),
            NetworkOptions::default()
        );
        assert_eq!(
            NetworkOptions::parse(&opts(json!({"com.docker.network.generic": null}))).unwrap(),
            NetworkOptions::default()
        );
    }
}

//! API tests through the router, with the in-memory store and the fake datapath.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::{to_bytes, Body};
use axum::http::{Request, StatusCode};
use serde_json::{json, Value};
use tower::ServiceExt;

use super::*;
use crate::datapath::fake::FakeDatapath;
use crate::driver::DriverConfig;
use crate::ipam::IpamConfig;
use crate::store::embedded::EmbeddedStore;
use crate::store::Store;

struct Harness {
    app: Router,
    store: Arc<EmbeddedStore>,
    fake: Arc<FakeDatapath>,
}

fn harness() -> Harness {
    let store = Arc::new(EmbeddedStore::in_memory());
    let fake = Arc::new(FakeDatapath::new());
    let driver = Arc::new(Driver::new(
        store.clone(),
        fake.clone(),
        DriverConfig::default(),
    ));
    let blocks = Arc::new(crate::ipam::Blocks::new(
        store.clone(),
        store.clone(),
        "h1".into(),
        Arc::new(crate::cluster::Tenure::standalone()),
        std::time::Duration::from_secs(600),
    ));
    let ipam = Arc::new(Ipam::new(
        store.clone(),
        store.clone(),
        blocks.clone(),
        fake.clone(),
        IpamConfig::default(),
    ));
    let status = Arc::new(crate::status::StatusSource {
        host: "h1".into(),
        blocks,
        mesh: None,
        cluster_networks: None,
        names: None,
        resolver: None,
    });
    Harness {
        app: router(AppState {
            driver,
            ipam,
            status,
        }),
        store,
        fake,
    }
}

/// Sends a POST the way dockerd does: no Content-Type, a v1.2 Accept header.
async fn call(app: &Router, method: &str, body: &str) -> (StatusCode, Value) {
    let req = Request::post(format!("/{method}"))
        .header("Accept", "application/vnd.docker.plugins.v1.2+json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = to_bytes(resp.into_body(), 1 << 20).await.unwrap();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| panic!("{method}: reply is not JSON: {bytes:?}"));
    (status, value)
}

async fn ok(app: &Router, method: &str, body: Value) -> Value {
    let (status, v) = call(app, method, &body.to_string()).await;
    assert_eq!(status, StatusCode::OK, "{method} {body} -> {v}");
    v
}

async fn fails(app: &Router, method: &str, body: &str) -> String {
    let (status, v) = call(app, method, body).await;
    assert_eq!(
        status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "{method} {body} -> {v}"
    );
    let err = v["Err"].as_str().unwrap_or_default().to_string();
    assert!(!err.is_empty(), "Err must be set: {v}");
    assert_eq!(v["Error"], v["Err"], "IPAM clients read Error");
    err
}

#[tokio::test]
async fn handshake_and_capabilities() {
    let h = harness();
    assert_eq!(
        ok(&h.app, "Plugin.Activate", json!(null)).await,
        json!({"Implements": ["NetworkDriver", "IpamDriver"]})
    );
    let (_, caps) = call(&h.app, "NetworkDriver.GetCapabilities", "").await;
    assert_eq!(
        caps,
        json!({"Scope": "local", "ConnectivityScope": "global", "GwAllocChecker": false})
    );
    let (_, caps) = call(&h.app, "IpamDriver.GetCapabilities", "").await;
    assert_eq!(
        caps,
        json!({"RequiresMACAddress": false, "RequiresRequestReplay": false})
    );
    let (_, spaces) = call(&h.app, "IpamDriver.GetDefaultAddressSpaces", "").await;
    assert_eq!(
        spaces,
        json!({"LocalDefaultAddressSpace": "weft-local", "GlobalDefaultAddressSpace": "weft-global"})
    );
}

#[tokio::test]
async fn status_reports_networks_and_endpoints() {
    let h = harness();
    let pool = ok(
        &h.app,
        "IpamDriver.RequestPool",
        json!({"AddressSpace": "weft-local", "Pool": "10.61.0.0/24"}),
    )
    .await;
    let id = pool["PoolID"].as_str().unwrap();
    ok(&h.app, "IpamDriver.RequestAddress", json!({"PoolID": id, "Address": "", "Options": {"RequestAddressType": "com.docker.network.gateway"}})).await;
    let net = "ab".repeat(32);
    ok(&h.app, "NetworkDriver.CreateNetwork", json!({"NetworkID": net, "IPv4Data": [{"Pool": "10.61.0.0/24", "Gateway": "10.61.0.1/24"}]})).await;
    let addr = ok(
        &h.app,
        "IpamDriver.RequestAddress",
        json!({"PoolID": id, "Address": ""}),
    )
    .await;
    ok(&h.app, "NetworkDriver.CreateEndpoint", json!({"NetworkID": net, "EndpointID": "cd".repeat(32), "Interface": {"Address": addr["Address"]}})).await;
    let status = ok(&h.app, "weft.Status", json!(null)).await;
    assert_eq!(status["networks"][0]["subnet"], "10.61.0.0/24");
    assert_eq!(status["endpoints"][0]["address"], "10.61.0.2");
    assert_eq!(status["blocks"], json!(["10.61.0.0/26"]));
    let text = crate::status::render(&serde_json::from_value(status).unwrap());
    assert!(
        text.contains("10.61.0.0/24") && text.contains("10.61.0.2"),
        "{text}"
    );
}

#[tokio::test]
async fn unknown_methods_are_404() {
    let h = harness();
    for m in [
        "NetworkDriver.FutureMethod",
        "VolumeDriver.List",
        "",
        "IpamDriver.RequestPool/extra",
    ] {
        let (status, v) = call(&h.app, m, "{}").await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{m}");
        assert!(v["Err"].is_string());
    }
}

#[tokio::test]
async fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let h = harness();
    for (method, body) in [
        ("IpamDriver.RequestAddress", ""),
        ("NetworkDriver.CreateNetwork", ""),
        ("NetworkDriver.CreateNetwork", "\n"),
        ("NetworkDriver.CreateNetwork", "{\"NetworkID\": \"ab\""),
        ("NetworkDriver.CreateNetwork", "{}"),
        ("NetworkDriver.CreateNetwork", "[]"),
        (
            "NetworkDriver.CreateNetwork",
            r#"{"NetworkID":"ab","IPv4Data":[{"Pool":"10.1.0.0/33"}]}"#,
        ),
        (
            "NetworkDriver.CreateNetwork",
            r#"{"NetworkID":"ab","IPv4Data":[{"Pool":"10.1.0.0/16","Gateway":"x"}]}"#,
        ),
        (
            "NetworkDriver.CreateNetwork",
            r#"{"NetworkID":"a b","IPv4Data":[{"Pool":"10.1.0.0/16"}]}"#,
        ),
        (
            "NetworkDriver.CreateEndpoint",
            r#"{"NetworkID":"ab","EndpointID":"0123456789abcdef","Interface":{"Address":"10.1.0.2/16"}}"#,
        ),
        (
            "NetworkDriver.Join",
            r#"{"NetworkID":"ab","EndpointID":"0123456789abcdef"}"#,
        ),
        (
            "IpamDriver.RequestPool",
            r#"{"AddressSpace":"weft-local","Pool":"banana"}"#,
        ),
        (
            "IpamDriver.RequestAddress",
            r#"{"PoolID":"weft-local/10.1.0.0/16"}"#,
        ),
        ("IpamDriver.RequestAddress", r#"{"PoolID":"nonsense"}"#),
        (
            "IpamDriver.ReleaseAddress",
            r#"{"PoolID":"weft-local/10.1.0.0/16","Address":"x"}"#,
        ),
    ] {
        fails(&h.app, method, body).await;
    }
    let err = fails(&h.app, "IpamDriver.ReleasePool", "").await;
    assert!(err.contains("empty request body"), "{err}");
    assert!(
        h.store.list("").await.unwrap().is_empty(),
        "bad input changed the store"
    );
    assert!(h.fake.links().is_empty());
}

#[tokio::test]
async fn deletes_and_info_succeed_for_unknown_ids_and_when_repeated() {
    let h = harness();
    let ids = json!({"NetworkID": "ab", "EndpointID": "cd"});
    for _ in 0..2 {
        ok(
            &h.app,
            "NetworkDriver.DeleteNetwork",
            json!({"NetworkID": "ab"}),
        )
        .await;
        ok(&h.app, "NetworkDriver.DeleteEndpoint", ids.clone()).await;
        ok(&h.app, "NetworkDriver.Leave", ids.clone()).await;
        ok(
            &h.app,
            "NetworkDriver.RevokeExternalConnectivity",
            ids.clone(),
        )
        .await;
        ok(
            &h.app,
            "NetworkDriver.FreeNetwork",
            json!({"NetworkID": "ab"}),
        )
        .await;
        ok(&h.app, "NetworkDriver.DiscoverDelete", json!({"DiscoveryType": 1, "DiscoveryData": {"Address": "192.0.2.1", "BindAddress": "0.0.0.0", "Self": true}})).await;
        ok(
            &h.app,
            "IpamDriver.ReleasePool",
            json!({"PoolID": "weft-local/10.9.0.0/16"}),
        )
        .await;
        ok(
            &h.app,
            "IpamDriver.ReleaseAddress",
            json!({"PoolID": "weft-local/10.9.0.0/16", "Address": "10.9.0.5"}),
        )
        .await;
    }
    assert_eq!(
        ok(&h.app, "NetworkDriver.EndpointOperInfo", ids).await,
        json!({"Value": {}})
    );
    let pec = json!({"NetworkID": "ab", "EndpointID": "cd", "Options": {"com.docker.network.driver.private.no_proxy_6to4": true}});
    assert_eq!(
        ok(&h.app, "NetworkDriver.ProgramExternalConnectivity", pec).await,
        json!({})
    );
    let alloc = json!({"NetworkID": "ab", "Options": {"a": "b"}, "IPv4Data": [], "IPv6Data": null});
    assert_eq!(
        ok(&h.app, "NetworkDriver.AllocateNetwork", alloc).await,
        json!({"Options": {"a": "b"}})
    );
    assert_eq!(
        ok(
            &h.app,
            "NetworkDriver.GwAllocCheck",
            json!({"Options": null})
        )
        .await,
        json!({"SkipIPv4": false, "SkipIPv6": false})
    );
}

#[tokio::test]
async fn concurrent_address_requests_never_share_an_address() {
    let h = harness();
    let pool = ok(&h.app, "IpamDriver.RequestPool", json!({"AddressSpace": "weft-local", "Pool": "10.60.0.0/22", "SubPool": "", "Options": {}, "V6": false})).await;
    let id = pool["PoolID"].as_str().unwrap().to_string();
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let app = h.app.clone();
            let id = id.clone();
            tokio::spawn(async move {
                ok(
                    &app,
                    "IpamDriver.RequestAddress",
                    json!({"PoolID": id, "Address": "", "Options": null}),
                )
                .await
            })
        })
        .collect();
    let mut seen = std::collections::BTreeSet::new();
    for t in tasks {
        let v = t.await.unwrap();
        let addr = v["Address"].as_str().unwrap().to_string();
        assert!(addr.ends_with("/22"), "{addr}");
        assert!(seen.insert(addr.clone()), "{addr} handed out twice");
    }
}

/// Rewrites a recorded request so that it refers to what weft (not the stand-in
/// plugin that answered during the recording) handed out.
#[derive(Default)]
struct Translator {
    space: String,
    pools: HashMap<String, (String, String)>,
    automatic: Option<(String, String)>,
    addresses: HashMap<String, String>,
    gateways: HashMap<String, String>,
    /// weft's answer to the last container RequestAddress, used by the next CreateEndpoint.
    pending_address: Option<String>,
}

impl Translator {
    fn pool(&mut self, recorded: &str) -> (String, String) {
        if let Some(p) = self.pools.get(recorded) {
            return p.clone();
        }
        let auto = self
            .automatic
            .take()
            .expect("a recorded PoolID with no matching pool");
        self.pools.insert(recorded.to_string(), auto.clone());
        auto
    }

    fn address(&self, ip: &str) -> String {
        self.addresses
            .get(ip)
            .cloned()
            .unwrap_or_else(|| ip.to_string())
    }

    fn request(&mut self, method: &str, body: &mut Value) {
        if let Some(s) = body.get_mut("AddressSpace") {
            *s = json!(self.space);
        }
        if let Some(id) = body
            .get("PoolID")
            .and_then(Value::as_str)
            .map(str::to_string)
        {
            body["PoolID"] = json!(self.pool(&id).0);
            if method == "IpamDriver.ReleaseAddress" {
                let ip = body["Address"].as_str().unwrap().to_string();
                body["Address"] = json!(self.address(&ip));
            }
        }
        if let Some(data) = body.get_mut("IPv4Data").and_then(Value::as_array_mut) {
            for d in data {
                let recorded = d["Pool"].as_str().unwrap().to_string();
                let (id, cidr) = self.pool(&recorded);
                d["Pool"] = json!(cidr);
                d["AddressSpace"] = json!(self.space);
                let recorded_gw = d["Gateway"]
                    .as_str()
                    .unwrap()
                    .split('/')
                    .next()
                    .unwrap()
                    .to_string();
                let ours = self.gateways[&id].clone();
                d["Gateway"] = json!(ours);
                self.addresses
                    .insert(recorded_gw, ours.split('/').next().unwrap().to_string());
            }
        }
        if method == "NetworkDriver.CreateEndpoint" {
            let recorded = body["Interface"]["Address"]
                .as_str()
                .unwrap()
                .split('/')
                .next()
                .unwrap()
                .to_string();
            let ours_cidr = self
                .pending_address
                .take()
                .expect("CreateEndpoint follows RequestAddress");
            self.addresses
                .insert(recorded, ours_cidr.split('/').next().unwrap().to_string());
            body["Interface"]["Address"] = json!(ours_cidr);
        }
    }

    fn response(&mut self, method: &str, request: &Value, reply: &Value) {
        match method {
            "IpamDriver.GetDefaultAddressSpaces" => {
                self.space = reply["LocalDefaultAddressSpace"].as_str().unwrap().into()
            }
            "IpamDriver.RequestPool" => {
                let ours = (
                    reply["PoolID"].as_str().unwrap().to_string(),
                    reply["Pool"].as_str().unwrap().to_string(),
                );
                match request["Pool"].as_str().unwrap() {
                    "" => self.automatic = Some(ours),
                    p => {
                        self.pools.insert(p.to_string(), ours);
                    }
                }
            }
            "IpamDriver.RequestAddress" => {
                let addr = reply["Address"].as_str().unwrap().to_string();
                if request["Options"]["RequestAddressType"] == json!("com.docker.network.gateway") {
                    self.gateways
                        .insert(request["PoolID"].as_str().unwrap().to_string(), addr);
                } else {
                    self.pending_address = Some(addr);
                }
            }
            _ => {}
        }
    }
}

async fn replay(fixture: &str) {
    let h = harness();
    let mut t = Translator::default();
    let mut joins = Vec::new();
    let mut publishes = 0;
    for line in fixture.lines().filter(|l| !l.trim().is_empty()) {
        let rec: Value = serde_json::from_str(line).unwrap();
        let method = rec["method"].as_str().unwrap();
        let raw = rec["body"].as_str().unwrap();
        let body = if raw.is_empty() {
            String::new()
        } else {
            let mut v: Value = serde_json::from_str(raw).unwrap();
            t.request(method, &mut v);
            format!("{v}\n")
        };
        let published_before = h.fake.with(|s| s.synced.published.len());
        let (status, reply) = call(&h.app, method, &body).await;
        assert_eq!(status, StatusCode::OK, "{method} {body} -> {reply}");
        let request: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        t.response(method, &request, &reply);
        match method {
            "NetworkDriver.CreateEndpoint" => assert_eq!(
                reply,
                json!({}),
                "CreateEndpoint must not echo the interface"
            ),
            "NetworkDriver.Join" => joins.push(reply),
            "NetworkDriver.ProgramExternalConnectivity" => {
                // The fixtures' `-p 18080:80` is published; a container without
                // `-p` publishes nothing.
                let asked = request["Options"]["com.docker.network.portmap"]
                    .as_array()
                    .map_or(0, Vec::len);
                let (now, ours) = h.fake.with(|s| {
                    let p = &s.synced.published;
                    let ours = p
                        .iter()
                        .any(|(_, p)| p.host_port == 18080 && p.container_port == 80);
                    (p.len(), ours)
                });
                assert_eq!(now, published_before + asked, "{body}");
                assert!(asked == 0 || ours, "{body}");
                publishes += asked;
            }
            _ => {}
        }
    }
    assert!(publishes > 0, "the fixture publishes a port");
    assert!(!joins.is_empty());
    for j in &joins {
        let src = j["InterfaceName"]["SrcName"].as_str().unwrap();
        assert!(src.starts_with("wfc") && src.len() <= 15, "{j}");
        assert_eq!(j["InterfaceName"]["DstPrefix"], "eth");
        match j.get("Gateway").and_then(Value::as_str) {
            Some(g) => {
                assert!(
                    g.parse::<std::net::Ipv4Addr>().is_ok(),
                    "Gateway must be a plain IP: {j}"
                );
                assert_eq!(j["DisableGatewayService"], false);
            }
            None => assert_eq!(j["DisableGatewayService"], true, "{j}"),
        }
    }
    // The internal network's joins carry no gateway.
    assert!(joins.iter().any(|j| j.get("Gateway").is_none()));
    // The whole lifecycle leaves nothing behind.
    assert!(
        h.store.list("").await.unwrap().is_empty(),
        "store left: {:?}",
        h.store.list("").await.unwrap()
    );
    assert!(
        h.fake.links().is_empty(),
        "links left: {:?}",
        h.fake.links()
    );
    assert_eq!(h.fake.with(|s| s.synced.clone()), Default::default());
}

#[tokio::test]
async fn replays_the_dockerd_20_10_lifecycle() {
    replay(include_str!(
        "../../tests/fixtures/dockerd-20.10.24-lifecycle.jsonl"
    ))
    .await;
}

#[tokio::test]
async fn replays_the_dockerd_26_1_lifecycle() {
    replay(include_str!(
        "../../tests/fixtures/dockerd-26.1.5-lifecycle.jsonl"
    ))
    .await;
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    const METHODS: &[&str] = &[
        "NetworkDriver.CreateNetwork",
        "NetworkDriver.DeleteNetwork",
        "NetworkDriver.CreateEndpoint",
        "NetworkDriver.DeleteEndpoint",
        "NetworkDriver.EndpointOperInfo",
        "NetworkDriver.Join",
        "NetworkDriver.Leave",
        "NetworkDriver.ProgramExternalConnectivity",
        "NetworkDriver.RevokeExternalConnectivity",
        "NetworkDriver.AllocateNetwork",
        "NetworkDriver.DiscoverNew",
        "IpamDriver.RequestPool",
        "IpamDriver.ReleasePool",
        "IpamDriver.RequestAddress",
        "IpamDriver.ReleaseAddress",
    ];

    fn json_ish() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            Just("null".to_string()),
            Just("\"\"".to_string()),
            Just("\"10.1.0.0/16\"".to_string()),
            Just("\"10.1.0.300\"".to_string()),
            Just("\"0123456789abcdef0123\"".to_string()),
            Just("true".to_string()),
            any::<i64>().prop_map(|n| n.to_string()),
            "\"[a-zA-Z0-9./:_ -]{0,24}\"",
        ];
        let keys = prop_oneof![
            Just("NetworkID"),
            Just("EndpointID"),
            Just("Interface"),
            Just("Address"),
            Just("Options"),
            Just("IPv4Data"),
            Just("Pool"),
            Just("PoolID"),
            Just("SubPool"),
            Just("Gateway"),
            Just("AddressSpace"),
            Just("com.docker.network.generic"),
            Just("RequestAddressType"),
            Just("V6"),
            Just("AuxAddresses"),
        ];
        leaf.prop_recursive(3, 24, 6, move |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4)
                    .prop_map(|v| format!("[{}]", v.join(","))),
                proptest::collection::vec((keys.clone(), inner), 0..6).prop_map(|kv| {
                    format!(
                        "{{{}}}",
                        kv.iter()
                            .map(|(k, v)| format!("\"{k}\":{v}"))
                            .collect::<Vec<_>>()
                            .join(",")
                    )
                }),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// No body, however malformed, makes a handler panic or answer outside the protocol.
        #[test]
        fn any_body_gets_a_json_reply(method in proptest::sample::select(METHODS), body in prop_oneof![json_ish(), any::<Vec<u8>>().prop_map(|b| String::from_utf8_lossy(&b).into_owned())]) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let h = harness();
                let (status, reply) = call(&h.app, method, &body).await;
                prop_assert!(status == StatusCode::OK || status == StatusCode::INTERNAL_SERVER_ERROR);
                if status != StatusCode::OK {
                    prop_assert!(reply["Err"].as_str().is_some_and(|e| !e.is_empty()));
                }
                Ok(())
            })?;
        }
    }
}

/// dockerd may hang up mid-request (it restarts, or its client times out): the work
/// of the request must still run to completion, not stop between two steps.
#[tokio::test]
async fn a_request_completes_even_when_dockerd_hangs_up() {
    let h = harness();
    let net = "5f3c000000000000000000000000000000000000000000000000000000000001";
    let ep = "9ab1c2d3e4f5000000000000000000000000000000000000000000000000000a";
    ok(
        &h.app,
        "NetworkDriver.CreateNetwork",
        json!({"NetworkID": net, "Options": {}, "IPv4Data": [{"AddressSpace": "weft-local", "Pool": "10.42.0.0/16", "Gateway": "10.42.0.1/16"}], "IPv6Data": []}),
    )
    .await;
    h.fake
        .with(|s| s.setup_delay = Some(std::time::Duration::from_millis(200)));
    let body = json!({"NetworkID": net, "EndpointID": ep, "Interface": {"Address": "10.42.0.5/16", "AddressIPv6": "", "MacAddress": ""}, "Options": {}});
    let hung_up = tokio::time::timeout(
        std::time::Duration::from_millis(50),
        call(&h.app, "NetworkDriver.CreateEndpoint", &body.to_string()),
    )
    .await;
    assert!(hung_up.is_err(), "the client gave up before the answer");
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    assert!(
        h.fake.links().contains("wfh9ab1c2d3e4f5"),
        "the endpoint's pair was created after the hang-up"
    );
    let records = h.store.list(crate::schema::keys::ENDPOINTS).await.unwrap();
    assert_eq!(records.len(), 1, "and its record written");
}

//! Decoding of every request body dockerd can send must never panic: it either
//! yields a request or a clean error. Run with `cargo fuzz run decode` (nightly).
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft::api::DockerJson;
use weft::protocol::{ipam, network};

fuzz_target!(|data: &[u8]| {
    let _ = DockerJson::<network::CreateNetworkRequest>::decode(data);
    let _ = DockerJson::<network::CreateEndpointRequest>::decode(data);
    let _ = DockerJson::<network::JoinRequest>::decode(data);
    let _ = DockerJson::<network::EndpointRequest>::decode(data);
    let _ = DockerJson::<network::NetworkIdRequest>::decode(data);
    let _ = DockerJson::<network::ProgramExternalConnectivityRequest>::decode(data);
    let _ = DockerJson::<network::AllocateNetworkRequest>::decode(data);
    let _ = DockerJson::<network::DiscoveryRequest>::decode(data);
    let _ = DockerJson::<ipam::RequestPoolRequest>::decode(data);
    let _ = DockerJson::<ipam::RequestAddressRequest>::decode(data);
    let _ = DockerJson::<ipam::ReleaseAddressRequest>::decode(data);
    let _ = DockerJson::<ipam::ReleasePoolRequest>::decode(data);
    if let Ok(req) = DockerJson::<network::CreateNetworkRequest>::decode(data) {
        let _ = weft::driver::NetworkOptions::parse(&req.options);
    }
});

//! weft: a Docker network driver and IPAM driver.
//!
//! `api` decodes dockerd's requests and calls the `driver` and `ipam` services;
//! those keep their state in a `store` and program the kernel through a `datapath`.
//! Each outside system sits behind a trait with a fake, injected at construction.

pub mod api;
pub mod cluster;
pub mod cluster_networks;
pub mod config;
pub mod daemon;
pub mod datapath;
pub mod driver;
pub mod engine;
pub mod ipam;
pub mod locks;
pub mod mesh;
pub mod names;
pub mod ports;
pub mod protocol;
pub mod schema;
pub mod status;
pub mod store;
pub mod telemetry;
pub mod tunnel;

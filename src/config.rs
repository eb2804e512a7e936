//! Command line and `WEFT_*` environment, parsed and validated once at start.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use ipnetwork::Ipv4Network;

#[derive(Debug, Parser)]
#[command(
    name = "weft",
    version,
    about = "Docker network and IPAM driver: a routed, encrypted overlay"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the NetworkDriver and IpamDriver APIs on a unix socket.
    Daemon(DaemonConfig),
}

#[derive(Debug, Clone, Args)]
pub struct DaemonConfig {
    /// Unix socket dockerd connects to; its file name is the driver name.
    #[arg(
        long,
        env = "WEFT_SOCKET",
        default_value = "/run/docker/plugins/weft.sock"
    )]
    pub socket: PathBuf,

    /// Directory for the state file and the host id.
    #[arg(long, env = "WEFT_STATE_DIR", default_value = "/var/lib/weft")]
    pub state_dir: PathBuf,

    /// Log filter (tracing EnvFilter syntax, e.g. `info` or `weft=debug`).
    #[arg(long, env = "WEFT_LOG", default_value = "info")]
    pub log: String,

    /// Log format.
    #[arg(long, env = "WEFT_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// MTU of container interfaces for networks without an MTU option
    /// (default: the underlay's MTU minus --mtu-overhead).
    #[arg(long, env = "WEFT_MTU", value_parser = clap::value_parser!(u32).range(576..=65535))]
    pub mtu: Option<u32>,

    /// Bytes reserved for encapsulation when the MTU is derived from the underlay.
    #[arg(long, env = "WEFT_MTU_OVERHEAD", default_value_t = 80)]
    pub mtu_overhead: u32,

    /// Address ranges that networks created without --subnet get their subnet from.
    #[arg(
        long,
        env = "WEFT_DEFAULT_ADDRESS_POOL",
        value_delimiter = ',',
        default_value = "10.200.0.0/13"
    )]
    pub default_address_pool: Vec<Ipv4Network>,

    /// Prefix length of subnets chosen from --default-address-pool.
    #[arg(long, env = "WEFT_DEFAULT_POOL_SIZE", default_value_t = 24, value_parser = clap::value_parser!(u8).range(8..=30))]
    pub default_pool_size: u8,

    /// Prefix length of the address blocks a host claims (per network: --ipam-opt weft.block-size=N).
    #[arg(long, env = "WEFT_BLOCK_SIZE", default_value_t = 26, value_parser = clap::value_parser!(u8).range(16..=30))]
    pub block_size: u8,

    /// Seconds between reconcile passes (kernel state repaired from the store).
    #[arg(long, env = "WEFT_RECONCILE_INTERVAL", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub reconcile_interval: u64,

    /// Where the network sysctls are (a managed plugin bind-mounts the host's).
    #[arg(long, env = "WEFT_PROC_SYS_NET", default_value = "/proc/sys/net")]
    pub proc_sys_net: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl DaemonConfig {
    pub fn reconcile_every(&self) -> Duration {
        Duration::from_secs(self.reconcile_interval)
    }
}

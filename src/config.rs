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
    Daemon(Box<DaemonConfig>),
    /// Show this host's view: mesh peers, networks, blocks, endpoints.
    Status(StatusArgs),
}

#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// The daemon's socket.
    #[arg(
        long,
        env = "WEFT_SOCKET",
        default_value = "/run/docker/plugins/weft.sock"
    )]
    pub socket: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
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

    /// Seconds after which an endpoint that was created but never joined (or left and
    /// never deleted) is collected: its link and route go.
    #[arg(long, env = "WEFT_ENDPOINT_GRACE", default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..))]
    pub endpoint_grace: u64,

    /// Seconds after which an address that no endpoint uses (its endpoint never came,
    /// or its ReleaseAddress was lost) is released, on pools of weft networks.
    #[arg(long, env = "WEFT_ADDRESS_GRACE", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub address_grace: u64,

    /// Where the network sysctls are (a managed plugin bind-mounts the host's).
    #[arg(long, env = "WEFT_PROC_SYS_NET", default_value = "/proc/sys/net")]
    pub proc_sys_net: String,

    /// This host's dockerd API, where weft creates and removes cluster networks
    /// (`-o weft.scope=cluster`); `none`: no cluster networks on this host.
    #[arg(
        long,
        env = "WEFT_DOCKER_HOST",
        default_value = "unix:///var/run/docker.sock"
    )]
    pub docker_host: String,

    /// The port of weft's resolver of the cluster's container names (several hosts):
    /// containers' DNS queries to servers outside weft's subnets are handed to it
    /// (TPROXY) and it answers the names of their network on every host, passing
    /// every other query on unchanged. 0: no resolver, no interception.
    #[arg(long, env = "WEFT_DNS_PORT", default_value_t = crate::names::resolver::DEFAULT_PORT)]
    pub dns_port: u16,

    #[command(flatten)]
    pub cluster: ClusterConfig,
}

/// Multi-host settings: with `--etcd-endpoints`, pools and blocks live in etcd and
/// hosts are joined by a WireGuard mesh. Without it weft is single-host.
#[derive(Debug, Clone, Args)]
pub struct ClusterConfig {
    /// etcd client URLs, comma-separated (enables multi-host mode).
    #[arg(long, env = "WEFT_ETCD_ENDPOINTS", value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,

    /// Key prefix of weft's records in etcd.
    #[arg(long, env = "WEFT_ETCD_PREFIX", default_value = "/weft/v1/")]
    pub etcd_prefix: String,

    /// CA certificate (PEM) to verify etcd with.
    #[arg(long, env = "WEFT_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,

    /// Client certificate (PEM) for etcd.
    #[arg(long, env = "WEFT_ETCD_CERT")]
    pub etcd_cert: Option<PathBuf>,

    /// Client key (PEM) for etcd.
    #[arg(long, env = "WEFT_ETCD_KEY")]
    pub etcd_key: Option<PathBuf>,

    /// etcd user name (with --etcd-password).
    #[arg(long, env = "WEFT_ETCD_USER")]
    pub etcd_user: Option<String>,

    /// etcd password (prefer the environment variable or the file; it is never logged).
    #[arg(long, env = "WEFT_ETCD_PASSWORD", hide_env_values = true)]
    pub etcd_password: Option<String>,

    /// File holding the etcd password (keeps it out of argv and the environment).
    #[arg(long, env = "WEFT_ETCD_PASSWORD_FILE")]
    pub etcd_password_file: Option<PathBuf>,

    /// Seconds any etcd call may take before it fails.
    #[arg(long, env = "WEFT_ETCD_TIMEOUT", default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=60))]
    pub etcd_timeout: u64,

    /// Underlay address other hosts reach this one at (default: the address of the default route's link).
    #[arg(long, env = "WEFT_ADVERTISE_ADDR")]
    pub advertise_addr: Option<std::net::Ipv4Addr>,

    /// Seconds of the liveness lease of this host's record.
    #[arg(long, env = "WEFT_HOST_TTL", default_value_t = 15, value_parser = clap::value_parser!(u64).range(2..=3600))]
    pub host_ttl: u64,

    /// Which WireGuard to use.
    #[arg(long, env = "WEFT_WIREGUARD", value_enum, default_value = "auto")]
    pub wireguard: crate::tunnel::wireguard::Mode,

    /// Userspace WireGuard implementation to start when the kernel has none.
    #[arg(long, env = "WEFT_WIREGUARD_USERSPACE", default_value = "wireguard-go")]
    pub wireguard_userspace: String,

    /// WireGuard interface name.
    #[arg(long, env = "WEFT_WG_INTERFACE", default_value = "weft0")]
    pub wg_interface: String,

    /// WireGuard UDP port.
    #[arg(long, env = "WEFT_WG_PORT", default_value_t = 51820)]
    pub wg_port: u16,

    /// Persistent keepalive (seconds) other hosts use towards this one: keeps NAT
    /// mappings open and tells this host that they are alive when their etcd lease
    /// expired (0: off; then a host leaves the data plane with its lease).
    #[arg(long, env = "WEFT_WG_KEEPALIVE", default_value_t = 5, value_parser = clap::value_parser!(u16).range(0..=300))]
    pub wg_keepalive: u16,

    /// Seconds a host may be gone before other hosts reclaim its address blocks.
    #[arg(long, env = "WEFT_BLOCK_GRACE", default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=31_536_000))]
    pub block_grace: u64,

    /// Seconds between full mesh passes (changes in etcd trigger one at once).
    #[arg(long, env = "WEFT_MESH_INTERVAL", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub mesh_interval: u64,
}

impl ClusterConfig {
    pub fn enabled(&self) -> bool {
        !self.etcd_endpoints.is_empty()
    }

    pub fn keepalive(&self) -> Option<u16> {
        (self.wg_keepalive > 0).then_some(self.wg_keepalive)
    }

    /// How long a host whose lease expired stays while its traffic still arrives:
    /// two keepalives it sends this host, plus a second.
    pub fn liveness_window(&self) -> Option<Duration> {
        self.keepalive()
            .map(|k| Duration::from_secs(2 * u64::from(k) + 1))
    }

    pub fn etcd(&self) -> anyhow::Result<crate::store::etcd::EtcdConfig> {
        Ok(crate::store::etcd::EtcdConfig {
            endpoints: self.etcd_endpoints.clone(),
            prefix: self.etcd_prefix.clone(),
            ca: self.etcd_ca.clone(),
            cert: self.etcd_cert.clone(),
            key: self.etcd_key.clone(),
            user: self.etcd_user.clone(),
            password: self.password()?,
            timeout: Duration::from_secs(self.etcd_timeout),
        })
    }

    /// The etcd password, from the flag or environment variable or from the file
    /// (trailing newline trimmed); both at once is an error.
    pub fn password(&self) -> anyhow::Result<Option<String>> {
        use anyhow::Context;
        match (&self.etcd_password, &self.etcd_password_file) {
            (Some(_), Some(_)) => anyhow::bail!(
                "give the etcd password with --etcd-password or --etcd-password-file, not both"
            ),
            (Some(p), None) => Ok(Some(p.clone())),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path).with_context(|| {
                    format!("reading the etcd password file {}", path.display())
                })?;
                Ok(Some(text.trim_end_matches(['\n', '\r']).to_string()))
            }
            (None, None) => Ok(None),
        }
    }

    /// Endpoints that anyone on the network could write weft's state through: plain
    /// HTTP, no user, and not on the loopback interface.
    pub fn open_etcd_endpoints(&self) -> Vec<String> {
        if self.etcd_user.is_some() {
            return Vec::new();
        }
        self.etcd_endpoints
            .iter()
            .filter(|e| {
                let Some(rest) = e.strip_prefix("http://") else {
                    return false;
                };
                let host = rest.split(['/']).next().unwrap_or_default();
                let host = match host.rsplit_once(':') {
                    Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
                    _ => host,
                };
                let host = host.trim_start_matches('[').trim_end_matches(']');
                let loopback = host == "localhost"
                    || host
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback());
                !loopback
            })
            .cloned()
            .collect()
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(args: &[&str]) -> ClusterConfig {
        let mut argv = vec!["weft", "daemon"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Daemon(config) => config.cluster,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn plain_http_etcd_without_a_user_off_loopback_is_flagged() {
        let c = cluster(&[
            "--etcd-endpoints",
            "http://192.0.2.1:2379,http://127.0.0.1:2379,http://localhost:2379,https://etcd:2379,http://[::1]:2379",
        ]);
        assert_eq!(c.open_etcd_endpoints(), ["http://192.0.2.1:2379"]);
        let with_user = cluster(&[
            "--etcd-endpoints",
            "http://192.0.2.1:2379",
            "--etcd-user",
            "weft",
        ]);
        assert!(with_user.open_etcd_endpoints().is_empty());
    }

    #[test]
    fn the_password_comes_from_the_flag_or_the_file_not_both() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "s3cret\n").unwrap();
        let path = file.to_str().unwrap();
        let from_file = cluster(&["--etcd-password-file", path]);
        assert_eq!(from_file.password().unwrap().as_deref(), Some("s3cret"));
        let both = cluster(&["--etcd-password", "x", "--etcd-password-file", path]);
        assert!(both
            .password()
            .unwrap_err()
            .to_string()
            .contains("not both"));
        let missing = cluster(&["--etcd-password-file", "/nonexistent/pw"]);
        assert!(missing.password().is_err());
    }
}

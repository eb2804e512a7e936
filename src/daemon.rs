//! `weft daemon`: wires the store, datapath and services together, reconciles, and
//! serves the plugin API on a unix socket until SIGTERM or SIGINT.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::net::{UnixListener, UnixStream};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

use crate::api::{router, AppState};
use crate::cluster::HostRecord;
use crate::cluster::Tenure;
use crate::cluster_networks::ClusterNetworks;
use crate::config::DaemonConfig;
use crate::datapath::netlink::NetlinkDatapath;
use crate::datapath::Datapath;
use crate::driver::{Driver, DriverConfig};
use crate::ipam::{Blocks, Ipam, IpamConfig, Verified};
use crate::mesh::Mesh;
use crate::names::resolver::Resolver;
use crate::names::NamePublisher;
use crate::status::StatusSource;
use crate::store::embedded::EmbeddedStore;
use crate::store::etcd::EtcdStore;
use crate::store::Store;
use crate::tunnel::wireguard::{WireGuard, WireGuardConfig};
use crate::tunnel::Tunnel;

pub const HOST_ID_FILE: &str = "host-id";
pub const LOCK_FILE: &str = "lock";
/// How often cluster networks are reconciled when nothing wakes them.
const CLUSTER_NETWORKS_EVERY: Duration = Duration::from_secs(5);
/// How often container names are published when no container joins or leaves.
const NAMES_EVERY: Duration = Duration::from_secs(5);

/// Takes the state directory for this process alone, before weft touches etcd or the
/// kernel: two daemons on one state dir (say, the managed plugin and the systemd
/// unit) would fight over the host's registration and delete each other's links.
/// The lock (flock) goes with the process; the file keeps the holder's PID.
pub fn lock_state_dir(state_dir: &Path) -> anyhow::Result<std::fs::File> {
    use std::io::{Read, Seek, Write};
    let path = state_dir.join(LOCK_FILE);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {
            file.set_len(0)?;
            file.rewind()?;
            write!(file, "{}", std::process::id())?;
            file.flush()?;
            Ok(file)
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            bail!(
                "another weft daemon (pid {}, as its PID namespace sees it) holds {}; \
                 only one may run per state directory (is weft installed both as a managed \
                 plugin and as a service?)",
                holder.trim(),
                path.display()
            )
        }
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("locking {}", path.display()))
        }
    }
}

/// This host's id: generated once, kept in the state directory.
pub fn host_id(state_dir: &Path) -> anyhow::Result<String> {
    let path = state_dir.join(HOST_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let id = crate::schema::random_id().context("reading /dev/urandom")?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, &id)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(id)
}

/// Binds the socket, replacing a stale one but never one a live daemon still serves.
async fn bind(socket: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(socket) {
        if !meta.file_type().is_socket() {
            bail!(
                "{} exists and is not a socket; refusing to replace it",
                socket.display()
            );
        }
        if UnixStream::connect(socket).await.is_ok() {
            bail!(
                "another process is serving {}; is weft already running?",
                socket.display()
            );
        }
        warn!(socket = %socket.display(), "replacing stale socket");
        std::fs::remove_file(socket)
            .with_context(|| format!("removing stale {}", socket.display()))?;
    }
    let listener =
        UnixListener::bind(socket).with_context(|| format!("binding {}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o660))?;
    Ok(listener)
}

async fn shutdown_signal() {
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = int.recv() => info!("SIGINT received"),
    }
}

/// Multi-host wiring: the etcd store, the WireGuard device, this host's registration
/// and the mesh reconciler.
struct Cluster {
    store: Arc<dyn Store>,
    etcd: EtcdStore,
    tunnel: Arc<dyn Tunnel>,
    record: HostRecord,
}

async fn connect_cluster(
    config: &DaemonConfig,
    host: &str,
    datapath: &Arc<dyn Datapath>,
) -> anyhow::Result<Cluster> {
    let cluster = &config.cluster;
    let open = cluster.open_etcd_endpoints();
    if !open.is_empty() {
        warn!(
            endpoints = ?open,
            "etcd over plain HTTP without authentication: anyone who can reach it can rewrite weft's state and redirect traffic; use TLS and a user outside a lab (docs/security.md)"
        );
    }
    let etcd = EtcdStore::connect(&cluster.etcd()?)
        .await
        .context("connecting to etcd")?;
    let underlay_mtu = datapath.underlay_mtu().await?;
    let key = crate::tunnel::keys::load_or_create(&config.state_dir)?;
    let wg = WireGuard::new(
        WireGuardConfig {
            interface: cluster.wg_interface.clone(),
            listen_port: cluster.wg_port,
            mtu: underlay_mtu.saturating_sub(config.mtu_overhead),
            mode: cluster.wireguard,
            userspace_binary: cluster.wireguard_userspace.clone(),
            log_file: config.state_dir.join("wireguard.log"),
        },
        key,
    )?;
    wg.ensure_device().await.context("setting up WireGuard")?;
    let address = match cluster.advertise_addr {
        Some(a) => a,
        None => datapath
            .default_address()
            .await?
            .context("no --advertise-addr given and no address on the default route's link")?,
    };
    let record = HostRecord {
        id: host.to_string(),
        public_key: wg.public_key(),
        endpoint: std::net::SocketAddr::new(address.into(), cluster.wg_port),
        keepalive: cluster.keepalive(),
    };
    info!(endpoint = %record.endpoint, wireguard = wg.backend_name(), "joining the mesh");
    Ok(Cluster {
        store: Arc::new(etcd.clone()),
        etcd,
        tunnel: Arc::new(wg),
        record,
    })
}

pub async fn run(config: DaemonConfig) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("creating state dir {}", config.state_dir.display()))?;
    let _lock = lock_state_dir(&config.state_dir)?;
    let host = host_id(&config.state_dir)?;
    let local: Arc<dyn Store> =
        Arc::new(EmbeddedStore::open(&config.state_dir).context("opening the embedded store")?);
    let mut netlink = NetlinkDatapath::connect(&config.proc_sys_net)?;
    if config.cluster.enabled() {
        netlink = netlink.with_tunnel(&config.cluster.wg_interface);
    }
    // The resolver of the cluster's names (several hosts): its port is taken before
    // the firewall hands it anything, and a port in use is a clear error.
    let resolver_sockets = match config.dns_port {
        port @ 1.. if config.cluster.enabled() => {
            netlink = netlink.with_names_port(port);
            Some(crate::names::resolver::bind(port).with_context(|| {
                format!(
                    "binding weft's resolver to port {port} (UDP and TCP); choose another with --dns-port, or 0 for none"
                )
            })?)
        }
        _ => None,
    };
    let datapath: Arc<dyn Datapath> = Arc::new(netlink);
    let grace = Duration::from_secs(config.cluster.block_grace);
    let clustered = if config.cluster.enabled() {
        Some(connect_cluster(&config, &host, &datapath).await?)
    } else {
        None
    };
    let tenure = Arc::new(if clustered.is_some() {
        Tenure::clustered()
    } else {
        Tenure::standalone()
    });
    let cluster = clustered
        .as_ref()
        .map_or_else(|| local.clone(), |c| c.store.clone());
    let blocks = Arc::new(Blocks::new(
        cluster.clone(),
        local.clone(),
        host.clone(),
        tenure.clone(),
        grace,
    ));
    let driver = Arc::new(
        Driver::new(
            local.clone(),
            datapath.clone(),
            DriverConfig {
                default_mtu: config.mtu,
                mtu_overhead: config.mtu_overhead,
                endpoint_grace: Duration::from_secs(config.endpoint_grace),
            },
        )
        .with_cluster(cluster.clone(), host.clone()),
    );
    let ipam = Arc::new(Ipam::new(
        cluster.clone(),
        local,
        blocks.clone(),
        datapath.clone(),
        IpamConfig {
            default_pools: config.default_address_pool.clone(),
            default_pool_prefix: config.default_pool_size,
            default_block_prefix: config.block_size,
        },
    ));
    let engine: Option<Arc<dyn crate::engine::Engine>> = (config.docker_host != "none")
        .then(|| Arc::new(crate::engine::DockerEngine::new(&config.docker_host)) as _);
    let cluster_networks = if let Some(engine) = &engine {
        let networks = Arc::new(ClusterNetworks::new(
            host.clone(),
            cluster.clone(),
            driver.clone(),
            engine.clone(),
        ));
        if let Some(c) = &clustered {
            // Other hosts follow a creation or removal at once (the timer is the fallback).
            tokio::spawn(crate::store::etcd::wake_on_changes(
                c.etcd.client(),
                format!(
                    "{}{}",
                    c.etcd.prefix(),
                    crate::schema::keys::CLUSTER_NETWORKS
                ),
                networks.wake(),
            ));
        }
        Some(networks)
    } else {
        None
    };
    let mut names = None;
    let resolver = match (resolver_sockets, &clustered) {
        (Some(sockets), Some(c)) => {
            let r = Arc::new(Resolver::new(
                config.dns_port,
                cluster.clone(),
                driver.clone(),
            ));
            // The names are read when they change in etcd, and on a timer.
            let wake = Arc::new(tokio::sync::Notify::new());
            tokio::spawn(crate::store::etcd::wake_on_changes(
                c.etcd.client(),
                format!("{}{}", c.etcd.prefix(), crate::schema::keys::NAMES),
                wake.clone(),
            ));
            tokio::spawn(r.clone().keep_fresh(wake));
            tokio::spawn(r.clone().serve(sockets));
            Some(r)
        }
        _ => None,
    };
    let mesh = match clustered {
        Some(c) => {
            let leases = Arc::new(crate::cluster::etcd::EtcdLeases::new(
                c.etcd.client(),
                c.etcd.prefix().to_string(),
                Duration::from_secs(config.cluster.host_ttl),
            ));
            if let Some(engine) = &engine {
                names = Some(Arc::new(NamePublisher::new(
                    host.clone(),
                    leases.clone(),
                    driver.clone(),
                    engine.clone(),
                )));
            }
            tokio::spawn(
                crate::cluster::Registration {
                    leases,
                    record: c.record,
                    ttl: Duration::from_secs(config.cluster.host_ttl),
                    grace,
                    tenure: tenure.clone(),
                }
                .run(),
            );
            // Blocks this host still has addresses in must still be its own (they could
            // have been reclaimed while it was gone longer than the grace period); the
            // mesh checks again on every pass and every re-registration.
            match blocks.verify().await {
                Ok(v) if v == Verified::default() => {}
                Ok(v) => warn!(?v, "block ownership verified with findings"),
                Err(e) => warn!(error = %e, "could not verify block ownership"),
            }
            let mesh = Arc::new(
                Mesh::new(c.store, c.tunnel, datapath, blocks, tenure)
                    .with_liveness(config.cluster.liveness_window()),
            );
            tokio::spawn(
                mesh.clone()
                    .run(Duration::from_secs(config.cluster.mesh_interval)),
            );
            tokio::spawn(
                mesh.clone()
                    .watch(c.etcd.client(), c.etcd.prefix().to_string()),
            );
            // Every host's keepalives must reach the others (their liveness check).
            tokio::spawn(mesh.clone().heartbeat());
            Some(mesh)
        }
        None => None,
    };
    info!(host = %host, state_dir = %config.state_dir.display(), "weft starting");

    // Before serving: the kernel must match what the store says (state survives kill -9).
    match driver.reconcile().await {
        Ok(report) => info!(?report, "startup reconcile done"),
        Err(e) => error!(error = %e, "startup reconcile incomplete; retrying on the timer"),
    }

    let listener = bind(&config.socket).await?;
    info!(socket = %config.socket.display(), "serving the Docker plugin API");
    // Only now: what it asks of dockerd makes dockerd call this socket.
    if let Some(networks) = &cluster_networks {
        tokio::spawn(networks.clone().run(CLUSTER_NETWORKS_EVERY));
    }
    if let Some(names) = &names {
        tokio::spawn(names.clone().run(NAMES_EVERY));
    }

    let reconciler = {
        let driver = driver.clone();
        let ipam = ipam.clone();
        let address_grace = Duration::from_secs(config.address_grace);
        let every = config.reconcile_every();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                match driver.reconcile().await {
                    Ok(report) if report != Default::default() => {
                        info!(?report, "reconcile repaired state")
                    }
                    Ok(_) => {}
                    Err(e) => warn!(error = %e, "reconcile incomplete"),
                }
                // Back from being taken for gone: references and memberships again.
                if let Err(e) = ipam.restore_references().await {
                    warn!(error = %e, "pool references not checked");
                }
                if let Err(e) = driver.restore_memberships().await {
                    warn!(error = %e, "network memberships not checked");
                }
                match driver.addresses_in_use().await {
                    Ok(in_use) => {
                        if let Err(e) = ipam.collect_unused_addresses(&in_use, address_grace).await
                        {
                            warn!(error = %e, "address collection incomplete");
                        }
                    }
                    Err(e) => warn!(error = %e, "address collection skipped"),
                }
            }
        })
    };

    let status = Arc::new(StatusSource {
        host: host.clone(),
        blocks: ipam.blocks().clone(),
        mesh,
        cluster_networks,
        names,
        resolver,
    });
    let app = router(AppState {
        driver,
        ipam,
        status,
    });
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await;
    reconciler.abort();
    if let Err(e) = std::fs::remove_file(&config.socket) {
        warn!(error = %e, "could not remove the socket");
    }
    served.context("serving the plugin API")?;
    info!("weft stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_daemon_on_the_same_state_dir_is_refused_naming_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let first = lock_state_dir(dir.path()).unwrap();
        let err = lock_state_dir(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains(&format!("pid {}", std::process::id())) && err.contains("only one"),
            "{err}"
        );
        drop(first);
        lock_state_dir(dir.path()).expect("free again once the first is gone");
    }
}

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
use crate::config::DaemonConfig;
use crate::datapath::netlink::NetlinkDatapath;
use crate::datapath::Datapath;
use crate::driver::{Driver, DriverConfig};
use crate::ipam::{Ipam, IpamConfig};
use crate::mesh::Mesh;
use crate::status::StatusSource;
use crate::store::embedded::EmbeddedStore;
use crate::store::etcd::EtcdStore;
use crate::store::Store;
use crate::tunnel::wireguard::{WireGuard, WireGuardConfig};
use crate::tunnel::Tunnel;

pub const HOST_ID_FILE: &str = "host-id";

/// This host's id: generated once, kept in the state directory.
pub fn host_id(state_dir: &Path) -> anyhow::Result<String> {
    let path = state_dir.join(HOST_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let mut bytes = [0u8; 8];
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom")?;
    let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
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
async fn start_cluster(
    config: &DaemonConfig,
    host: &str,
    datapath: Arc<dyn Datapath>,
) -> anyhow::Result<(Arc<dyn Store>, Arc<Mesh>)> {
    let cluster = &config.cluster;
    let etcd = EtcdStore::connect(&cluster.etcd())
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
        keepalive: cluster.wg_keepalive,
    };
    info!(endpoint = %record.endpoint, wireguard = wg.backend_name(), "joining the mesh");
    let (alive, _) = tokio::sync::watch::channel(false);
    crate::cluster::spawn_registration(
        etcd.client(),
        etcd.prefix().to_string(),
        record,
        Duration::from_secs(cluster.host_ttl),
        alive,
    );
    let store: Arc<dyn Store> = Arc::new(etcd.clone());
    let mesh = Arc::new(
        Mesh::new(store.clone(), Arc::new(wg), datapath, host.to_string())
            .with_block_grace(Duration::from_secs(cluster.block_grace)),
    );
    tokio::spawn(mesh.clone().run(Duration::from_secs(cluster.mesh_interval)));
    tokio::spawn(mesh.clone().watch(etcd.client(), etcd.prefix().to_string()));
    Ok((store, mesh))
}

pub async fn run(config: DaemonConfig) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("creating state dir {}", config.state_dir.display()))?;
    let host = host_id(&config.state_dir)?;
    let local: Arc<dyn Store> =
        Arc::new(EmbeddedStore::open(&config.state_dir).context("opening the embedded store")?);
    let mut netlink = NetlinkDatapath::connect(&config.proc_sys_net)?;
    if config.cluster.enabled() {
        netlink = netlink.with_tunnel(&config.cluster.wg_interface);
    }
    let datapath: Arc<dyn Datapath> = Arc::new(netlink);
    let (cluster, mesh) = if config.cluster.enabled() {
        let (store, mesh) = start_cluster(&config, &host, datapath.clone()).await?;
        (store, Some(mesh))
    } else {
        (local.clone(), None)
    };
    let driver = Arc::new(
        Driver::new(
            local.clone(),
            datapath.clone(),
            DriverConfig {
                default_mtu: config.mtu,
                mtu_overhead: config.mtu_overhead,
            },
        )
        .with_cluster(cluster.clone(), host.clone()),
    );
    let ipam = Arc::new(Ipam::new(
        cluster.clone(),
        local,
        host.clone(),
        datapath,
        IpamConfig {
            default_pools: config.default_address_pool.clone(),
            default_pool_prefix: config.default_pool_size,
            default_block_prefix: config.block_size,
        },
    ));
    if mesh.is_some() {
        // Blocks this host still has addresses in must still be its own (they could
        // have been reclaimed while it was gone longer than the grace period).
        match ipam.verify_owned_blocks().await {
            Ok(0) => {}
            Ok(n) => warn!(reclaimed = n, "re-claimed blocks this host still uses"),
            Err(e) => warn!(error = %e, "could not verify block ownership"),
        }
    }
    info!(host = %host, state_dir = %config.state_dir.display(), "weft starting");

    // Before serving: the kernel must match what the store says (state survives kill -9).
    match driver.reconcile().await {
        Ok(report) => info!(?report, "startup reconcile done"),
        Err(e) => error!(error = %e, "startup reconcile incomplete; retrying on the timer"),
    }

    let listener = bind(&config.socket).await?;
    info!(socket = %config.socket.display(), "serving the Docker plugin API");

    let reconciler = {
        let driver = driver.clone();
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
            }
        })
    };

    let status = Arc::new(StatusSource {
        host: host.clone(),
        cluster,
        mesh,
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

//! `weft daemon`: wires the store, datapath and services together, reconciles, and
//! serves the plugin API on a unix socket until SIGTERM or SIGINT.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use tokio::net::{UnixListener, UnixStream};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

use crate::api::{router, AppState};
use crate::config::DaemonConfig;
use crate::datapath::netlink::NetlinkDatapath;
use crate::datapath::Datapath;
use crate::driver::{Driver, DriverConfig};
use crate::ipam::{Ipam, IpamConfig};
use crate::store::embedded::EmbeddedStore;
use crate::store::Store;

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

pub async fn run(config: DaemonConfig) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("creating state dir {}", config.state_dir.display()))?;
    let host = host_id(&config.state_dir)?;
    let store: Arc<dyn Store> =
        Arc::new(EmbeddedStore::open(&config.state_dir).context("opening the embedded store")?);
    let datapath: Arc<dyn Datapath> = Arc::new(NetlinkDatapath::connect(&config.proc_sys_net)?);
    let driver = Arc::new(Driver::new(
        store.clone(),
        datapath.clone(),
        DriverConfig {
            default_mtu: config.mtu,
            mtu_overhead: config.mtu_overhead,
        },
    ));
    let ipam = Arc::new(Ipam::new(
        store.clone(),
        store,
        host.clone(),
        datapath,
        IpamConfig {
            default_pools: config.default_address_pool.clone(),
            default_pool_prefix: config.default_pool_size,
            default_block_prefix: config.block_size,
        },
    ));
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

    let app = router(AppState { driver, ipam });
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

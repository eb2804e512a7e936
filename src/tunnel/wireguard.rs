//! WireGuard through wireguard-control: the kernel module where the kernel has it,
//! otherwise a userspace implementation (`wireguard-go` by default) running as its
//! own process. That process is not weft's child in any way that matters: it keeps
//! forwarding while weft restarts, and a restarted weft adopts it through its UAPI
//! socket (`/var/run/wireguard/<iface>.sock`) instead of starting another.

use std::net::IpAddr;
/// How long the userspace WireGuard may take to daemonise with its device up.
const USERSPACE_START_DEADLINE: Duration = Duration::from_secs(10);
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use futures::TryStreamExt;
use ipnetwork::Ipv4Network;
use rtnetlink::{LinkUnspec, LinkWireguard};
use tracing::{debug, info, warn};
use wireguard_control::{Backend, Device, DeviceUpdate, InterfaceName, Key, PeerConfigBuilder};

use super::{diff, Implementation, Peer, PeerDiff, PeerStatus, Tunnel, TunnelError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Kernel WireGuard if the kernel has it, else userspace.
    Auto,
    Kernel,
    Userspace,
}

pub struct WireGuardConfig {
    pub interface: String,
    pub listen_port: u16,
    pub mtu: u32,
    pub mode: Mode,
    /// Userspace implementation to start (`wireguard-go`, or e.g. `boringtun-cli`).
    pub userspace_binary: String,
    /// Where the userspace implementation's output goes.
    pub log_file: std::path::PathBuf,
}

pub struct WireGuard {
    name: String,
    iface: InterfaceName,
    private_key: Key,
    config: WireGuardConfig,
    backend: Mutex<Option<Backend>>,
    implementation: Mutex<Option<Implementation>>,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> TunnelError {
    let what = what.into();
    move |source| TunnelError::Io { what, source }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, TunnelError> + Send + 'static,
) -> Result<T, TunnelError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| TunnelError::Setup(format!("worker failed: {e}")))?
}

impl WireGuard {
    pub fn new(config: WireGuardConfig, private_key: Key) -> Result<Self, TunnelError> {
        let iface: InterfaceName = config.interface.parse().map_err(|_| {
            TunnelError::Setup(format!("invalid interface name {:?}", config.interface))
        })?;
        Ok(Self {
            name: config.interface.clone(),
            iface,
            private_key,
            config,
            backend: Mutex::new(None),
            implementation: Mutex::new(None),
        })
    }

    fn backend(&self) -> Result<Backend, TunnelError> {
        self.backend
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .ok_or_else(|| TunnelError::Setup("device not set up yet".into()))
    }

    pub fn backend_name(&self) -> &'static str {
        match self
            .backend
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            Some(Backend::Kernel) => "kernel",
            Some(Backend::Userspace) => "userspace",
            _ => "none",
        }
    }

    /// The interface's link index, if it exists.
    async fn link_index(&self, handle: &rtnetlink::Handle) -> Option<u32> {
        let found = handle
            .link()
            .get()
            .match_name(self.name.clone())
            .execute()
            .try_next()
            .await;
        found.ok().flatten().map(|msg| msg.header.index)
    }

    /// Tries to create a kernel WireGuard link (fine if it already exists).
    async fn kernel_link(&self, handle: &rtnetlink::Handle) -> Result<(), String> {
        let exists = self.link_index(handle).await.is_some();
        if exists && Device::get(&self.iface, Backend::Kernel).is_ok() {
            return Ok(());
        }
        handle
            .link()
            .add(LinkWireguard::new(&self.name).build())
            .execute()
            .await
            .map_err(|e| e.to_string())
    }

    /// Finds out, once, which WireGuard this is (for the userspace one, from
    /// `<program> --version`), logs it and warns when it lacks the offloads.
    async fn learn_implementation(&self, backend: Backend) {
        if self
            .implementation
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
        {
            return;
        }
        let found = match backend {
            Backend::Userspace => {
                let program = self.config.userspace_binary.clone();
                let output = tokio::time::timeout(
                    Duration::from_secs(5),
                    tokio::process::Command::new(&program)
                        .arg("--version")
                        .env_remove("WEFT_ETCD_PASSWORD")
                        .kill_on_drop(true)
                        .output(),
                )
                .await;
                let text = match output {
                    Ok(Ok(out)) => String::from_utf8_lossy(&out.stdout).into_owned(),
                    _ => String::new(),
                };
                let (version, wireguard_go) = super::parse_version(&text);
                let offloads = match (wireguard_go, find_program(&program)) {
                    (true, Some(path)) => tokio::task::spawn_blocking(move || {
                        std::fs::read(path).ok().map(|b| super::has_offloads(&b))
                    })
                    .await
                    .ok()
                    .flatten(),
                    _ => None,
                };
                Implementation {
                    kind: "userspace".into(),
                    program: Some(program),
                    version,
                    offloads,
                }
            }
            _ => Implementation {
                kind: "kernel".into(),
                program: None,
                version: None,
                offloads: None,
            },
        };
        info!(
            kind = %found.kind,
            program = found.program.as_deref().unwrap_or("-"),
            version = found.version.as_deref().unwrap_or("unknown"),
            offloads = ?found.offloads,
            "WireGuard implementation"
        );
        if found.offloads == Some(false) {
            warn!(
                program = found.program.as_deref().unwrap_or("-"),
                version = found.version.as_deref().unwrap_or("unknown"),
                "this userspace WireGuard lacks the TUN and UDP offloads (GSO/GRO) and moves several times less data; install wireguard-go 0.0.20231211 or later (Debian 12: from bookworm-backports, as scripts/deps.sh does)"
            );
        }
        *self
            .implementation
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(found);
    }

    fn userspace_running(&self) -> bool {
        Device::get(&self.iface, Backend::Userspace).is_ok()
    }

    async fn start_userspace(&self) -> Result<(), TunnelError> {
        let bin = &self.config.userspace_binary;
        info!(binary = %bin, interface = %self.name, "starting userspace WireGuard");
        // wireguard-go daemonises itself: the command returns once the device is up,
        // and the daemon is reparented, so it outlives weft. Its output goes to a file:
        // the daemon keeps it open, so a pipe would never reach end-of-file.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.config.log_file)
            .map_err(io(format!("open {}", self.config.log_file.display())))?;
        let mut child = tokio::process::Command::new(bin)
            .arg(&self.name)
            // Set only by wireguard-go itself for its daemon child; inheriting it would
            // keep the first process in the foreground.
            .env_remove("WG_PROCESS_FOREGROUND")
            // weft's secrets are not the tunnel's business.
            .env_remove("WEFT_ETCD_PASSWORD")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().map_err(io("log file"))?)
            .stderr(log)
            // On the deadline the launcher is killed (a daemon it forked is adopted or
            // replaced on the next pass).
            .kill_on_drop(true)
            .spawn()
            .map_err(io(format!("start {bin} (is it installed?)")))?;
        let status = tokio::time::timeout(USERSPACE_START_DEADLINE, child.wait())
            .await
            .map_err(|_| {
                TunnelError::Setup(format!(
                    "{bin} {} did not come up within {USERSPACE_START_DEADLINE:?}; see {}",
                    self.name,
                    self.config.log_file.display()
                ))
            })?
            .map_err(io(format!("wait for {bin}")))?;
        if !status.success() {
            return Err(TunnelError::Setup(format!(
                "{bin} {} exited with {status}; see {}",
                self.name,
                self.config.log_file.display()
            )));
        }
        Ok(())
    }

    async fn set_link_up(&self, handle: &rtnetlink::Handle) -> Result<(), TunnelError> {
        // A userspace implementation creates its TUN link asynchronously.
        let mut found = None;
        for _ in 0..50 {
            found = self.link_index(handle).await;
            if found.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let index = found
            .ok_or_else(|| TunnelError::Setup(format!("link {} did not appear", self.name)))?;
        handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .mtu(self.config.mtu)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| {
                TunnelError::Setup(format!(
                    "set {} up with MTU {}: {e}",
                    self.name, self.config.mtu
                ))
            })
    }
}

/// `program` itself if it names a path, else the first match on the `PATH`.
fn find_program(program: &str) -> Option<std::path::PathBuf> {
    if program.contains('/') {
        return Some(program.into());
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| std::path::Path::new(dir).join(program))
        .find(|p| p.is_file())
}

fn status(info: &wireguard_control::PeerInfo) -> PeerStatus {
    PeerStatus {
        public_key: info.config.public_key.to_base64(),
        endpoint: info.config.endpoint,
        allowed_ips: info
            .config
            .allowed_ips
            .iter()
            .filter_map(|a| match a.address {
                IpAddr::V4(ip) => Ipv4Network::new(ip, a.cidr).ok(),
                IpAddr::V6(_) => None,
            })
            .collect(),
        last_handshake: info.stats.last_handshake_time,
        rx_bytes: info.stats.rx_bytes,
        tx_bytes: info.stats.tx_bytes,
    }
}

impl WireGuard {
    /// One device update: `upserts` set whole (their allowed IPs replaced), `removals` gone.
    async fn update<'a>(
        &self,
        upserts: impl Iterator<Item = &'a Peer>,
        removals: &[String],
    ) -> Result<(), TunnelError> {
        let mut update = DeviceUpdate::new();
        for peer in upserts {
            let key = Key::from_base64(&peer.public_key).map_err(|_| {
                TunnelError::Setup(format!("peer key {:?} is not valid", peer.public_key))
            })?;
            let mut builder = PeerConfigBuilder::new(&key)
                .set_endpoint(peer.endpoint)
                .replace_allowed_ips();
            for net in &peer.allowed_ips {
                builder = builder.add_allowed_ip(IpAddr::V4(net.network()), net.prefix());
            }
            if let Some(k) = peer.keepalive {
                builder = builder.set_persistent_keepalive_interval(k);
            }
            update = update.add_peer(builder);
        }
        for key in removals {
            match Key::from_base64(key) {
                Ok(k) => update = update.remove_peer_by_key(&k),
                Err(_) => warn!(%key, "device holds a peer with an unreadable key"),
            }
        }
        let iface = self.iface;
        let backend = self.backend()?;
        blocking(move || update.apply(&iface, backend).map_err(io("apply peers"))).await
    }
}

/// Two settings of each peer in one update, off then on: turning a persistent
/// keepalive on sends one at once.
fn keepalive_toggles(peers: &[(String, u16)]) -> Result<DeviceUpdate, TunnelError> {
    let mut update = DeviceUpdate::new();
    for (key, interval) in peers {
        let key = Key::from_base64(key)
            .map_err(|_| TunnelError::Setup(format!("peer key {key:?} is not valid")))?;
        update = update
            .add_peer(PeerConfigBuilder::new(&key).set_persistent_keepalive_interval(0))
            .add_peer(PeerConfigBuilder::new(&key).set_persistent_keepalive_interval(*interval));
    }
    Ok(update)
}

#[async_trait]
impl Tunnel for WireGuard {
    fn interface(&self) -> &str {
        &self.name
    }

    fn public_key(&self) -> String {
        self.private_key.get_public().to_base64()
    }

    fn implementation(&self) -> Option<Implementation> {
        self.implementation
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    async fn ensure_device(&self) -> Result<(), TunnelError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(io("netlink socket"))?;
        let conn = tokio::spawn(connection);
        let backend = match self.config.mode {
            Mode::Userspace => Backend::Userspace,
            Mode::Kernel => {
                self.kernel_link(&handle).await.map_err(|e| {
                    TunnelError::Setup(format!("kernel WireGuard unavailable: {e}"))
                })?;
                Backend::Kernel
            }
            Mode::Auto => match self.kernel_link(&handle).await {
                Ok(()) => Backend::Kernel,
                Err(e) => {
                    debug!(error = %e, "no kernel WireGuard; using userspace");
                    Backend::Userspace
                }
            },
        };
        if backend == Backend::Userspace {
            if self.userspace_running() {
                info!(interface = %self.name, "adopting running userspace WireGuard");
            } else {
                self.start_userspace().await?;
            }
        }
        *self.backend.lock().unwrap_or_else(|p| p.into_inner()) = Some(backend);
        self.learn_implementation(backend).await;
        let iface = self.iface;
        let key = self.private_key.clone();
        let port = self.config.listen_port;
        blocking(move || {
            // An adopted device that already has our key and port is left alone:
            // re-setting the port rebinds its socket, which could drop packets.
            if let Ok(device) = Device::get(&iface, backend) {
                if device.private_key.as_ref() == Some(&key) && device.listen_port == Some(port) {
                    return Ok(());
                }
            }
            DeviceUpdate::new()
                .set_private_key(key)
                .set_listen_port(port)
                .apply(&iface, backend)
                .map_err(io("configure device"))
        })
        .await?;
        let up = self.set_link_up(&handle).await;
        conn.abort();
        up?;
        info!(interface = %self.name, backend = self.backend_name(), port, mtu = self.config.mtu, "WireGuard device ready");
        Ok(())
    }

    async fn apply_peers(&self, desired: &[Peer]) -> Result<PeerDiff, TunnelError> {
        let actual = self.peers().await?;
        let (changes, removals, stats) = diff(desired, &actual);
        if !stats.is_empty() {
            self.update(changes.into_iter(), &removals).await?;
        }
        Ok(stats)
    }

    async fn change_peers(&self, upserts: &[Peer], removals: &[String]) -> Result<(), TunnelError> {
        if upserts.is_empty() && removals.is_empty() {
            return Ok(());
        }
        self.update(upserts.iter(), removals).await
    }

    async fn send_keepalives(&self, peers: &[(String, u16)]) -> Result<(), TunnelError> {
        // boringtun builds a peer anew from just the fields given: the toggle would
        // drop its endpoint and session. Only the kernel and wireguard-go get it.
        let toggles_safely = self.implementation().is_some_and(|i| {
            i.kind == "kernel"
                || i.program
                    .as_deref()
                    .is_some_and(|p| p.contains("wireguard-go"))
        });
        if peers.is_empty() || !toggles_safely {
            return Ok(());
        }
        let update = keepalive_toggles(peers)?;
        let iface = self.iface;
        let backend = self.backend()?;
        blocking(move || update.apply(&iface, backend).map_err(io("send keepalives"))).await
    }

    async fn peers(&self) -> Result<Vec<PeerStatus>, TunnelError> {
        let iface = self.iface;
        let backend = self.backend()?;
        blocking(move || {
            let device = Device::get(&iface, backend).map_err(io("read device"))?;
            Ok(device.peers.iter().map(status).collect())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The userspace implementation is a child of weft: it must not see weft's secrets.
    #[tokio::test]
    async fn the_userspace_wireguard_does_not_inherit_the_etcd_password() {
        let dir = tempfile::tempdir().unwrap();
        let seen = dir.path().join("environ");
        let fake = dir.path().join("fake-wireguard");
        std::fs::write(&fake, format!("#!/bin/sh\nenv > {}\n", seen.display())).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        // Only this test reads the variable; the child inherits the process environment.
        std::env::set_var("WEFT_ETCD_PASSWORD", "s3cret");
        let wg = WireGuard::new(
            WireGuardConfig {
                interface: "wgtest0".into(),
                listen_port: 51820,
                mtu: 1420,
                mode: Mode::Userspace,
                userspace_binary: fake.to_str().unwrap().into(),
                log_file: dir.path().join("log"),
            },
            Key::generate_private(),
        )
        .unwrap();
        wg.start_userspace().await.unwrap();
        let environ = std::fs::read_to_string(&seen).unwrap();
        assert!(environ.contains("PATH="), "the fake ran: {environ}");
        assert!(
            !environ.contains("s3cret"),
            "the password leaked to the child"
        );
    }
}

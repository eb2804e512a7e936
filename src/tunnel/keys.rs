//! The host's WireGuard private key: generated once, kept 0600 in the state
//! directory (not in tmpfs: a new key after every reboot would make every peer
//! relearn it), never logged and never sent anywhere. Only the public key leaves.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use wireguard_control::Key;

use super::TunnelError;

pub const PRIVATE_KEY_FILE: &str = "wireguard.key";

fn io(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> TunnelError {
    let what = format!("{what} {}", path.display());
    move |source| TunnelError::Io { what, source }
}

/// Loads the private key from `state_dir`, creating it on first use.
pub fn load_or_create(state_dir: &Path) -> Result<Key, TunnelError> {
    let path = state_dir.join(PRIVATE_KEY_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => {
            let mode = fs::metadata(&path)
                .map_err(io("stat", &path))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
                    .map_err(io("chmod", &path))?;
            }
            Key::from_base64(text.trim()).map_err(|_| {
                TunnelError::Setup(format!("{} does not hold a WireGuard key", path.display()))
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = Key::generate_private();
            let tmp = path.with_extension("tmp");
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io("create", &tmp))?;
            f.write_all(key.to_base64().as_bytes())
                .map_err(io("write", &tmp))?;
            f.sync_all().map_err(io("sync", &tmp))?;
            fs::rename(&tmp, &path).map_err(io("rename", &path))?;
            Ok(key)
        }
        Err(e) => Err(io("read", &path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_created_once_with_mode_0600_and_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let k1 = load_or_create(dir.path()).unwrap();
        let mode = fs::metadata(dir.path().join(PRIVATE_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let k2 = load_or_create(dir.path()).unwrap();
        assert_eq!(k1.to_base64(), k2.to_base64());
        fs::write(dir.path().join(PRIVATE_KEY_FILE), "garbage").unwrap();
        assert!(load_or_create(dir.path()).is_err());
    }
}

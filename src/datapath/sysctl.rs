//! Writes under `/proc/sys/net` (the root is configurable: a managed plugin sees the
//! host's through a bind mount).

use std::path::PathBuf;

use super::DatapathError;

#[derive(Debug, Clone)]
pub struct Sysctl {
    root: PathBuf,
}

impl Sysctl {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// Writes `value` to `<root>/<key>` (key like `ipv4/conf/wfh.../proxy_arp`),
    /// skipping the write when it already holds that value.
    pub async fn set(&self, key: &str, value: &str) -> Result<(), DatapathError> {
        let path = self.root.join(key);
        let err = |source| DatapathError::Sysctl {
            path: path.display().to_string(),
            source,
        };
        if let Ok(current) = tokio::fs::read_to_string(&path).await {
            if current.trim() == value {
                return Ok(());
            }
        }
        tokio::fs::write(&path, value).await.map_err(err)
    }
}

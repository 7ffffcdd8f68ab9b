//! This process's connections to the cluster's nodes: one multiplexed `redis` connection per
//! node address, opened on first use and dropped when it fails.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use redis::AsyncConnectionConfig;
use redis::aio::MultiplexedConnection;

use crate::error::{Error, Result};

/// Connections by `host:port`.
pub struct Pool {
    conns: Mutex<HashMap<String, MultiplexedConnection>>,
    config: AsyncConnectionConfig,
}

impl Pool {
    /// An empty pool whose connections use these time limits.
    pub fn new(connect_timeout: Duration, command_timeout: Duration) -> Self {
        Pool {
            conns: Mutex::new(HashMap::new()),
            config: AsyncConnectionConfig::new()
                .set_connection_timeout(Some(connect_timeout))
                .set_response_timeout(Some(command_timeout)),
        }
    }

    /// The connection to `addr`, opening it if needed. (A multiplexed connection is a cheap
    /// handle: clones share one socket.)
    pub async fn get(&self, addr: &str) -> Result<MultiplexedConnection> {
        if let Some(conn) = self.lock().get(addr) {
            return Ok(conn.clone());
        }
        let (host, port) = split_addr(addr).ok_or_else(|| Error::Connect {
            addr: addr.to_string(),
            source: redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "not a host:port address",
            )),
        })?;
        let connect = async {
            redis::Client::open((host.to_string(), port))?
                .get_multiplexed_async_connection_with_config(&self.config)
                .await
        };
        let conn = connect.await.map_err(|source| Error::Connect {
            addr: addr.to_string(),
            source,
        })?;
        Ok(self.lock().entry(addr.to_string()).or_insert(conn).clone())
    }

    /// Drops the connection to `addr` (after an I/O error), so the next use reconnects.
    pub fn forget(&self, addr: &str) {
        self.lock().remove(addr);
    }

    /// Drops every connection.
    pub fn clear(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, MultiplexedConnection>> {
        // A panic while holding this lock cannot leave the map inconsistent.
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Splits `host:port` (also `[v6]:port`, and Redis's bracketless `v6:port`) at the last colon.
pub fn split_addr(addr: &str) -> Option<(&str, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let port = port.parse().ok()?;
    (!host.is_empty()).then_some((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_addresses() {
        assert_eq!(split_addr("127.0.0.1:7000"), Some(("127.0.0.1", 7000)));
        assert_eq!(split_addr("[::1]:7000"), Some(("::1", 7000)));
        assert_eq!(split_addr("::1:7000"), Some(("::1", 7000)));
        assert_eq!(split_addr("redis.local:6379"), Some(("redis.local", 6379)));
        assert_eq!(split_addr(":7000"), None);
        assert_eq!(split_addr("host"), None);
        assert_eq!(split_addr("host:http"), None);
    }
}

//! How many client connections each cluster has open through the proxy, and since when it has
//! had none: what the gateway's "no client for N seconds" policy reads. Only scheduler TLS
//! connections spliced by this process count (the Dask clients of notebooks and scripts);
//! workers reach their scheduler directly and dashboards are not clients.
//!
//! Times are tokio's instants, so tests of that policy can pause and advance them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use tokio::time::Instant;

/// Open client connections per cluster (shared; cheap to update once per connection).
#[derive(Debug, Default)]
pub struct ClientConnections {
    table: Mutex<HashMap<String, Clients>>,
}

/// What the proxy knows of one cluster's clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Clients {
    /// This many connections are open now.
    Open(u32),
    /// None now; the last one closed at this instant.
    ClosedAt(Instant),
}

/// Counts one open connection until dropped.
#[derive(Debug)]
pub struct ConnectionGuard {
    table: Arc<ClientConnections>,
    cluster: String,
}

impl ClientConnections {
    /// Records a new connection to `cluster`; it counts until the guard is dropped.
    pub fn opened(self: &Arc<Self>, cluster: &str) -> ConnectionGuard {
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = table.entry(cluster.to_string()).or_insert(Clients::Open(0));
        *entry = match *entry {
            Clients::Open(n) => Clients::Open(n + 1),
            Clients::ClosedAt(_) => Clients::Open(1),
        };
        ConnectionGuard {
            table: self.clone(),
            cluster: cluster.to_string(),
        }
    }

    /// The clients of `cluster`; `None` when no client ever connected through this process.
    pub fn get(&self, cluster: &str) -> Option<Clients> {
        let table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        table.get(cluster).copied()
    }

    /// Forgets clusters for which `keep` is false and that have no open connection.
    pub fn retain(&self, mut keep: impl FnMut(&str) -> bool) {
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        table.retain(|name, c| matches!(c, Clients::Open(_)) || keep(name));
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let mut table = self
            .table
            .table
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = table.get_mut(&self.cluster) {
            *entry = match *entry {
                Clients::Open(n) if n > 1 => Clients::Open(n - 1),
                _ => Clients::ClosedAt(Instant::now()),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_open_connections_and_remembers_the_last_close() {
        let c = Arc::new(ClientConnections::default());
        assert_eq!(c.get("a"), None);
        let first = c.opened("a");
        let second = c.opened("a");
        assert_eq!(c.get("a"), Some(Clients::Open(2)));
        drop(first);
        assert_eq!(c.get("a"), Some(Clients::Open(1)));
        let before = Instant::now();
        drop(second);
        assert!(matches!(c.get("a"), Some(Clients::ClosedAt(t)) if t >= before));
        let third = c.opened("a");
        assert_eq!(c.get("a"), Some(Clients::Open(1)));
        c.retain(|_| false);
        assert_eq!(c.get("a"), Some(Clients::Open(1)), "open entries stay");
        drop(third);
        c.retain(|_| false);
        assert_eq!(c.get("a"), None);
    }
}

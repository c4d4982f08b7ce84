//! How many connections the public listeners hold at once.
//!
//! Every connection costs descriptors (a spliced scheduler connection six: both sockets and
//! two pipes), and a process out of descriptors accepts nothing at all: not the users' API
//! calls, not their schedulers' heartbeats. So the listeners hold at most a fixed number of
//! connections; one over the limit is closed at once, and the descriptors for everything the
//! gateway itself opens stay free. The limit also tells the gateway when it has been turning
//! connections away (or could not accept them), so that silence it caused is not blamed on
//! schedulers ([`ConnectionLimit::take_turned_away`]).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// Descriptors one connection may cost at most (a spliced scheduler connection: the client's
/// and the scheduler's sockets, and a pipe of two descriptors for each direction).
const DESCRIPTORS_PER_CONNECTION: u64 = 6;
/// Descriptors kept for everything else the gateway opens (its database, its outgoing HTTP,
/// its child processes' pipes, the Kubernetes API).
const RESERVED_DESCRIPTORS: u64 = 256;
/// The fewest connections a limit allows.
const MIN_CONNECTIONS: usize = 64;

/// The shared count and cap of open connections (see the module docs). Cheap to share.
#[derive(Debug)]
pub struct ConnectionLimit {
    max: usize,
    open: AtomicUsize,
    turned_away: AtomicBool,
}

impl ConnectionLimit {
    /// At most `max` connections at once (at least [`MIN_CONNECTIONS`]).
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(ConnectionLimit {
            max: max.max(MIN_CONNECTIONS),
            open: AtomicUsize::new(0),
            turned_away: AtomicBool::new(false),
        })
    }

    /// The limit a process allowed `open_files` descriptors can keep: each connection at its
    /// most expensive, with some descriptors kept for the gateway's own use.
    pub fn for_open_files(open_files: u64) -> Arc<Self> {
        let usable = open_files.saturating_sub(RESERVED_DESCRIPTORS) / DESCRIPTORS_PER_CONNECTION;
        Self::new(usize::try_from(usable).unwrap_or(usize::MAX))
    }

    /// The most connections held at once.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// A place for one more connection, held until the returned slot is dropped; `None` (and
    /// noted as turned away) when all are taken.
    pub(crate) fn try_acquire(self: &Arc<Self>) -> Option<Slot> {
        let taken = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_ok();
        if taken {
            Some(Slot(self.clone()))
        } else {
            self.note_turned_away();
            None
        }
    }

    /// Notes that a connection could not be taken (over the limit, or the accept failed).
    pub(crate) fn note_turned_away(&self) {
        self.turned_away.store(true, Ordering::Relaxed);
    }

    /// Whether a connection was turned away since the last call, or all places are taken now.
    pub fn take_turned_away(&self) -> bool {
        self.turned_away.swap(false, Ordering::Relaxed) || self.open() >= self.max
    }
}

/// One taken place (see [`ConnectionLimit::try_acquire`]).
#[derive(Debug)]
pub(crate) struct Slot(Arc<ConnectionLimit>);

/// A connection's place under the limit, as a request extension: whatever outlives the
/// connection's HTTP serving with its socket (an upgraded WebSocket relay) keeps a clone, and
/// the place is given back when the last clone is gone.
#[derive(Clone, Debug)]
pub struct HeldConnection(#[allow(dead_code)] Arc<Slot>);

impl HeldConnection {
    pub(crate) fn new(slot: Slot) -> Self {
        HeldConnection(Arc::new(slot))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Raises this process's soft limit on open files to its hard limit (a service manager's
/// default soft limit, often 1,024, is far below what the gateway may use), and returns the
/// limit in force afterwards.
pub fn raise_open_file_limit() -> std::io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    Ok(limit.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_counted_and_the_one_over_is_turned_away() {
        let limit = ConnectionLimit::new(64);
        let slots: Vec<_> = (0..64).map(|_| limit.try_acquire().unwrap()).collect();
        assert_eq!(limit.open(), 64);
        assert!(!limit.turned_away.load(Ordering::Relaxed));
        assert!(limit.try_acquire().is_none());
        assert!(limit.take_turned_away());
        drop(slots);
        assert_eq!(limit.open(), 0);
        assert!(
            !limit.take_turned_away(),
            "reported once, and nothing is full now"
        );
        assert!(limit.try_acquire().is_some());
    }

    #[test]
    fn the_limit_follows_the_descriptors() {
        assert_eq!(ConnectionLimit::for_open_files(1024).max(), 128);
        assert_eq!(ConnectionLimit::for_open_files(1_048_576).max(), 174_720);
        assert_eq!(ConnectionLimit::for_open_files(100).max(), MIN_CONNECTIONS);
        assert!(raise_open_file_limit().unwrap() >= 64);
    }
}

//! Telling a client that completed its TLS handshake with a scheduler from one that only began
//! it, without terminating the TLS the proxy relays.
//!
//! A cluster's no-client timeout counts connected clients, and a connection should count only
//! once its client has proven it holds the cluster's credentials: a bare ClientHello, which
//! anyone who knows a cluster's name can send and then hold, must not keep the cluster alive.
//! The proxy sees only who sends how many bytes when, and that is enough:
//!
//! * turn 0, the client: its ClientHello;
//! * turn 1, the scheduler: its first flight (ServerHello … Finished with its certificate and
//!   the request for the client's);
//! * turn 2, the client: its certificate, proof and Finished (and the start of Dask's
//!   handshake);
//! * turn 3, the scheduler: its session tickets and Dask's handshake, which it sends only once
//!   it has accepted the client's certificate. A refused certificate gets an alert instead
//!   (at most 31 bytes, two of them 62) and a closed connection.
//!
//! So a connection counts once the scheduler has sent at least [`ESTABLISHED_BYTES`] in turn 3.
//! A client that makes the scheduler ask for a second ClientHello (a HelloRetryRequest, which
//! anyone can provoke) shifts the handshake by two turns; the proxy recognises that message in
//! the scheduler's first bytes and waits for turn 5 instead.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use tokio::sync::Notify;

/// Bytes a scheduler sends in the deciding turn only when it has accepted the client: more
/// than two TLS alerts (31 bytes each at most) and fewer than its session ticket or Dask's
/// handshake message.
pub(crate) const ESTABLISHED_BYTES: u64 = 64;

/// The `random` of a ServerHello that is a HelloRetryRequest (RFC 8446, section 4.1.3).
const HELLO_RETRY_RANDOM: [u8; 32] = [
    0xCF, 0x21, 0xAD, 0x74, 0xE5, 0x9A, 0x61, 0x11, 0xBE, 0x1D, 0x8C, 0x02, 0x1E, 0x65, 0xB8, 0x91,
    0xC2, 0xA2, 0x11, 0x16, 0x7A, 0xBB, 0x8C, 0x5E, 0x07, 0x9E, 0x09, 0xE2, 0xC8, 0xA8, 0x33, 0x9C,
];

/// Bytes of a scheduler's first flight that tell whether it is a HelloRetryRequest: the record
/// header (5), the handshake header (4), the version (2) and the random (32).
pub(crate) const FIRST_FLIGHT_PEEK: usize = 43;

/// Whether a scheduler's first bytes are a HelloRetryRequest.
pub(crate) fn is_hello_retry(first: &[u8]) -> bool {
    first.len() >= FIRST_FLIGHT_PEEK
        && first[0] == 0x16 // handshake record
        && first[5] == 0x02 // server_hello
        && first[11..43] == HELLO_RETRY_RANDOM
}

/// The turns of one relayed connection (see the module docs). Shared by the relay's two
/// directions, which report what they move, and the task that waits for [`Turns::established`].
#[derive(Debug)]
pub(crate) struct Turns {
    /// Changes of speaker so far: even turns are the client's, odd ones the scheduler's.
    turn: AtomicU32,
    /// The scheduler turn from which its bytes decide (3, or 5 after a HelloRetryRequest).
    deciding: AtomicU32,
    /// Bytes the scheduler has sent in its current turn.
    server_bytes: AtomicU64,
    /// Set once the handshake is known to be complete.
    done: AtomicBool,
    established: Notify,
}

impl Default for Turns {
    fn default() -> Self {
        Turns {
            turn: AtomicU32::new(0),
            deciding: AtomicU32::new(3),
            server_bytes: AtomicU64::new(0),
            done: AtomicBool::new(false),
            established: Notify::new(),
        }
    }
}

impl Turns {
    /// Whether the scheduler's next bytes would open its first turn (the relay then peeks at
    /// them for [`Turns::server_sent`]).
    pub(crate) fn awaits_first_flight(&self) -> bool {
        self.turn.load(Ordering::Relaxed) == 0
    }

    /// The client sent `n` bytes.
    pub(crate) fn client_sent(&self, n: usize) {
        if n == 0 || self.is_established() {
            return;
        }
        let turn = self.turn.load(Ordering::Relaxed);
        if turn & 1 == 1 {
            self.turn.store(turn + 1, Ordering::Relaxed);
        }
    }

    /// The scheduler sent `n` bytes; `first` holds what a peek saw of them when they opened
    /// its first turn.
    pub(crate) fn server_sent(&self, n: usize, first: Option<&[u8]>) {
        if n == 0 || self.is_established() {
            return;
        }
        let mut turn = self.turn.load(Ordering::Relaxed);
        if turn & 1 == 0 {
            turn += 1;
            self.turn.store(turn, Ordering::Relaxed);
            self.server_bytes.store(0, Ordering::Relaxed);
            if turn == 1 && first.is_some_and(is_hello_retry) {
                self.deciding.store(5, Ordering::Relaxed);
            }
        }
        let bytes = self.server_bytes.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        if turn >= self.deciding.load(Ordering::Relaxed) && bytes >= ESTABLISHED_BYTES {
            self.establish();
        }
    }

    /// Marks the handshake complete (also used where the bytes cannot be watched).
    pub(crate) fn establish(&self) {
        if !self.done.swap(true, Ordering::Relaxed) {
            self.established.notify_one();
        }
    }

    /// Whether the handshake is known to be complete.
    pub(crate) fn is_established(&self) -> bool {
        self.done.load(Ordering::Relaxed)
    }

    /// Waits until the handshake is known to be complete.
    pub(crate) async fn established(&self) {
        if !self.is_established() {
            self.established.notified().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello_retry() -> Vec<u8> {
        let mut b = vec![
            0x16, 0x03, 0x03, 0x00, 0x58, 0x02, 0x00, 0x00, 0x54, 0x03, 0x03,
        ];
        b.extend_from_slice(&HELLO_RETRY_RANDOM);
        b.extend_from_slice(&[0u8; 40]);
        b
    }

    fn server_hello() -> Vec<u8> {
        let mut b = hello_retry();
        b[11] = 0x00;
        b
    }

    #[test]
    fn a_full_handshake_counts_once_the_scheduler_answers_the_clients_proof() {
        let t = Turns::default();
        assert!(t.awaits_first_flight());
        t.server_sent(900, Some(&server_hello()));
        assert!(!t.awaits_first_flight());
        t.client_sent(700);
        t.server_sent(40, None);
        assert!(!t.is_established(), "not yet enough to be more than alerts");
        t.server_sent(200, None);
        assert!(t.is_established());
    }

    #[test]
    fn a_bare_client_hello_or_a_refused_certificate_never_counts() {
        // The client stops after its ClientHello: the scheduler's flight is all there is.
        let t = Turns::default();
        t.server_sent(5000, Some(&server_hello()));
        t.server_sent(5000, None);
        assert!(!t.is_established());
        // A bad certificate: two alerts back, however many bytes the client sends.
        let t = Turns::default();
        t.server_sent(900, Some(&server_hello()));
        t.client_sent(100_000);
        t.server_sent(31, None);
        t.server_sent(31, None);
        assert!(!t.is_established());
    }

    #[test]
    fn a_hello_retry_moves_the_deciding_turn_by_two() {
        let t = Turns::default();
        t.server_sent(95, Some(&hello_retry()));
        t.client_sent(300); // the second ClientHello
        t.server_sent(900, None); // the real first flight
        assert!(!t.is_established());
        t.client_sent(700);
        t.server_sent(30, None);
        assert!(!t.is_established());
        t.server_sent(300, None);
        assert!(t.is_established());
        assert!(is_hello_retry(&hello_retry()));
        assert!(!is_hello_retry(&server_hello()));
        assert!(!is_hello_retry(&hello_retry()[..20]));
    }

    #[tokio::test]
    async fn waiting_for_the_handshake_ends_when_it_completes_even_if_that_came_first() {
        let t = Turns::default();
        t.establish();
        tokio::time::timeout(std::time::Duration::from_secs(5), t.established())
            .await
            .unwrap();
        let t = std::sync::Arc::new(Turns::default());
        let waiter = tokio::spawn({
            let t = t.clone();
            async move { t.established().await }
        });
        tokio::task::yield_now().await;
        t.establish();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
    }
}

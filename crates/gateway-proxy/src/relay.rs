//! Relaying a spliced scheduler connection: zero-copy through kernel pipes with `splice(2)`,
//! falling back to a userspace copy where pipes cannot be made.
//!
//! Each direction owns one pipe: `socket → pipe` (as much as is readable, up to [`CHUNK`]),
//! then `pipe → socket` until the pipe is empty, so the bytes never enter user space. Readiness
//! comes from tokio (`readable`/`writable` + `try_io`), so a relay costs no thread. An EOF is
//! passed on as a half-close (`shutdown(SHUT_WR)`), and the relay ends when both directions
//! have ended; an error in either direction ends both (the sockets are dropped and closed).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::turns::{Turns, FIRST_FLIGHT_PEEK};

/// Bytes moved per `splice` call: the default pipe capacity. (A 256 KiB pipe measured no
/// better: wake-ups follow how the peers write, not the pipe size.)
const CHUNK: usize = 64 * 1024;

/// Buffer size of each direction when falling back to a userspace copy.
const FALLBACK_BUFFER: usize = 64 * 1024;

/// A non-blocking pipe: the kernel buffer one direction moves its bytes through.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 writes two descriptors into the array we pass.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors are fresh and owned by nobody else.
        Ok(unsafe {
            Pipe {
                read: OwnedFd::from_raw_fd(fds[0]),
                write: OwnedFd::from_raw_fd(fds[1]),
            }
        })
    }
}

/// One non-blocking `splice(2)` call.
fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain descriptors, null offsets (both ends are streams).
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Which end a direction of the relay reads from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum From {
    Client,
    Scheduler,
}

/// One non-blocking `recv(MSG_PEEK)`: what `src` has to read, left in place.
fn peek(src: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: recv into a live buffer of the given length.
    let n = unsafe {
        libc::recv(
            src,
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Moves `src → dst` until `src` ends; then half-closes `dst`. Returns the bytes moved. What
/// it moves is reported to `turns`, with a peek at the scheduler's first bytes.
async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    pipe: &Pipe,
    from: From,
    turns: &Turns,
) -> io::Result<u64> {
    let mut total = 0u64;
    let mut first = [0u8; FIRST_FLIGHT_PEEK];
    loop {
        let peek_first = from == From::Scheduler && turns.awaits_first_flight();
        let mut peeked = 0;
        let n = loop {
            src.readable().await?;
            match src.try_io(Interest::READABLE, || {
                if peek_first {
                    peeked = peek(src.as_raw_fd(), &mut first)?;
                }
                splice(src.as_raw_fd(), pipe.write.as_raw_fd(), CHUNK)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            // SAFETY: shutdown(2) on a descriptor we borrow; errors (e.g. already closed) are moot.
            unsafe { libc::shutdown(dst.as_raw_fd(), libc::SHUT_WR) };
            return Ok(total);
        }
        match from {
            From::Client => turns.client_sent(n),
            From::Scheduler => turns.server_sent(n, peek_first.then_some(&first[..peeked])),
        }
        let mut left = n;
        while left > 0 {
            dst.writable().await?;
            match dst.try_io(Interest::WRITABLE, || {
                splice(pipe.read.as_raw_fd(), dst.as_raw_fd(), left)
            }) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(m) => left -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        total += n as u64;
    }
}

/// Relays `client ⇄ scheduler` until both directions have ended; returns the bytes moved
/// `(client→scheduler, scheduler→client)`. The turns of the exchange go to `turns` (where
/// they cannot be watched, the handshake is taken as complete at once).
pub(crate) async fn relay(
    mut client: TcpStream,
    mut scheduler: TcpStream,
    turns: &Turns,
) -> io::Result<(u64, u64)> {
    match (Pipe::new(), Pipe::new()) {
        (Ok(up), Ok(down)) => tokio::try_join!(
            pump(&client, &scheduler, &up, From::Client, turns),
            pump(&scheduler, &client, &down, From::Scheduler, turns)
        ),
        (Err(e), _) | (_, Err(e)) => {
            tracing::debug!(error = %e, "no pipes for splice(2); copying in user space");
            turns.establish();
            tokio::io::copy_bidirectional_with_sizes(
                &mut client,
                &mut scheduler,
                FALLBACK_BUFFER,
                FALLBACK_BUFFER,
            )
            .await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connected pair of TCP streams on loopback.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    #[tokio::test]
    async fn relays_large_streams_both_ways_with_half_close() {
        let (mut client, front) = pair().await;
        let (back, mut server) = pair().await;
        let relay = tokio::spawn(async move { relay(front, back, &Turns::default()).await });
        let data: Vec<u8> = (0..5_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let expected = data.clone();
        // Echo server: reads everything until EOF, then writes it back and closes.
        let echo = tokio::spawn(async move {
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            server.write_all(&got).await.unwrap();
            server.shutdown().await.unwrap();
            got.len()
        });
        let writer = tokio::spawn(async move {
            client.write_all(&data).await.unwrap();
            client.shutdown().await.unwrap(); // half-close: the echo side sees EOF
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        let back = writer.await.unwrap();
        assert_eq!(echo.await.unwrap(), expected.len());
        assert_eq!(back, expected);
        let (up, down) = relay.await.unwrap().unwrap();
        assert_eq!((up, down), (expected.len() as u64, expected.len() as u64));
    }

    #[tokio::test]
    async fn a_reset_ends_the_relay() {
        let (client, front) = pair().await;
        let (back, server) = pair().await;
        let relay = tokio::spawn(async move { relay(front, back, &Turns::default()).await });
        // Abort the server side with a reset (linger 0) while the client stays open.
        #[allow(deprecated)] // a zero linger resets at once; nothing blocks on drop
        server.set_linger(Some(std::time::Duration::ZERO)).unwrap();
        drop(server);
        let done = tokio::time::timeout(std::time::Duration::from_secs(10), relay).await;
        assert!(done.is_ok(), "relay must end when one side is reset");
        drop(client);
    }
}

//! The gateway's one clock: where everything in this crate that compares times reads them.
//!
//! [`Clock::system`] is the production clock: Unix time from the system's wall clock, instants
//! from tokio's clock. [`Clock::tokio`] makes Unix time follow tokio's clock as well, so a test
//! under paused time (`#[tokio::test(start_paused = true)]`, `tokio::time::pause`) moves both
//! with `tokio::time::advance` (or a sleep that auto-advances) instead of waiting for them.

use std::time::{SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

/// Where the gateway reads the time (see the module docs). Cheap to copy.
#[derive(Clone, Copy, Debug, Default)]
pub struct Clock(Source);

#[derive(Clone, Copy, Debug, Default)]
enum Source {
    /// The system's wall clock.
    #[default]
    System,
    /// `unix_ms` at tokio's instant `at`, moving with tokio's clock from there.
    Tokio { unix_ms: i64, at: Instant },
}

impl Clock {
    /// The system's wall clock (what the server runs with).
    pub fn system() -> Self {
        Clock(Source::System)
    }

    /// Unix time that starts at the system's current time and then moves with tokio's clock
    /// (tests: it stands still under paused time until time is advanced).
    pub fn tokio() -> Self {
        Self::tokio_at(system_ms())
    }

    /// Unix time that is `unix_ms` now and then moves with tokio's clock.
    pub fn tokio_at(unix_ms: i64) -> Self {
        Clock(Source::Tokio {
            unix_ms,
            at: Instant::now(),
        })
    }

    /// Milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> i64 {
        match self.0 {
            Source::System => system_ms(),
            Source::Tokio { unix_ms, at } => {
                unix_ms + Instant::now().duration_since(at).as_millis() as i64
            }
        }
    }

    /// The current instant, for durations (tokio's clock, which paused time controls).
    pub fn instant(&self) -> Instant {
        Instant::now()
    }
}

fn system_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_system_clock_reads_the_wall_clock() {
        let before = system_ms();
        let now = Clock::system().now_ms();
        assert!(now >= before && now - before < 60_000, "{before} {now}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_tokio_clock_moves_only_with_tokio_time() {
        let clock = Clock::tokio_at(1_000_000);
        let start = clock.instant();
        assert_eq!(clock.now_ms(), 1_000_000);
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert_eq!(clock.now_ms(), 1_001_500);
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(clock.now_ms(), 1_061_500);
        assert_eq!(clock.instant() - start, Duration::from_millis(61_500));
        // Copies read the same time.
        let copy = clock;
        assert_eq!(copy.now_ms(), clock.now_ms());
    }
}

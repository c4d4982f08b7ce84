//! A token bucket for the controller's API writes: `qps` tokens per second, at most `burst`
//! saved up. Waiters are served first come, first served, so a 500-pod scale-up that queued
//! first delays another cluster's few writes by at most the requests already queued, and never
//! starves them.

use gateway_backend::metrics::Counter;
use std::time::Duration;
use tokio::sync::Mutex;
use tokio::time::Instant;

/// The bucket (see the module docs).
pub struct RateLimiter {
    /// Held while waiting for a token: the queue of waiters is the mutex's FIFO queue.
    bucket: Mutex<Bucket>,
    qps: f64,
    burst: f64,
    /// Tokens handed out (API writes made): since creation, or see [`RateLimiter::counting_in`].
    granted: Counter,
}

struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl RateLimiter {
    /// A full bucket of `burst` tokens refilled at `qps` per second.
    pub fn new(qps: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        RateLimiter {
            bucket: Mutex::new(Bucket {
                tokens: burst,
                updated: Instant::now(),
            }),
            qps: qps.max(0.001),
            burst,
            granted: Counter::default(),
        }
    }

    /// Counts the tokens it hands out in `granted` (a counter that outlives this limiter, such
    /// as the controller's API writes over every leadership term) instead of its own.
    pub fn counting_in(mut self, granted: Counter) -> Self {
        self.granted = granted;
        self
    }

    /// Waits for one token.
    pub async fn acquire(&self) {
        let mut b = self.bucket.lock().await;
        loop {
            let now = Instant::now();
            let elapsed = now.duration_since(b.updated).as_secs_f64();
            b.tokens = (b.tokens + elapsed * self.qps).min(self.burst);
            b.updated = now;
            if b.tokens >= 1.0 {
                b.tokens -= 1.0;
                self.granted.inc();
                return;
            }
            let wait = (1.0 - b.tokens) / self.qps;
            tokio::time::sleep(Duration::from_secs_f64(wait)).await;
        }
    }

    /// Tokens handed out so far (what its counter holds).
    pub fn granted(&self) -> u64 {
        self.granted.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn bursts_then_paces() {
        let l = RateLimiter::new(10.0, 5);
        let start = Instant::now();
        for _ in 0..5 {
            l.acquire().await;
        }
        assert!(
            start.elapsed() < Duration::from_millis(1),
            "the burst is free"
        );
        for _ in 0..10 {
            l.acquire().await;
        }
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(990) && took < Duration::from_millis(1100),
            "{took:?}"
        );
        assert_eq!(l.granted(), 15);
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_are_served_in_order() {
        let l = std::sync::Arc::new(RateLimiter::new(1.0, 1));
        l.acquire().await;
        let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..4 {
            let (l, order) = (l.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                l.acquire().await;
                order.lock().unwrap().push(i);
            }));
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3]);
    }
}

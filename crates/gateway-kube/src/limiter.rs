//! A token bucket for the controller's API writes: `qps` tokens per second, at most `burst`
//! saved up, dealt out fairly among clusters.
//!
//! Each write names its *flow*, the cluster it is for. While writes wait, the flows take
//! turns, one token each, and each flow's own writes go first come, first served. A cluster
//! that queued a 100-pod scale-up therefore delays another cluster's next write by one token
//! per busy cluster, not by everything queued before it: a user whose cluster starts while 30
//! others scale up waits for about 30 tokens (0.6 s at the default 50 per second) per write,
//! not for the 600 queued ahead (12 s). Nobody starves: a flow's turn comes once per round.
//!
//! With tokens in the bucket and nobody waiting, `acquire` takes one at once. Otherwise the
//! caller queues, and a dealer task (spawned while anyone waits, gone when nobody does) hands
//! the tokens out as they accrue. A waiter that gives up (its future dropped) uses no token.
//! How many writes wait is a gauge (`controller_api_writes_waiting`): one that stays high says
//! the budget is too small for the installation's scale-ups.

use gateway_backend::metrics::Counter;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// The bucket (see the module docs).
pub struct RateLimiter {
    shared: Arc<Shared>,
}

/// What the limiter and its dealer task share.
struct Shared {
    state: Mutex<State>,
    qps: f64,
    burst: f64,
    /// Tokens handed out (API writes made): since creation, or see [`RateLimiter::counting_in`].
    granted: Counter,
    /// Callers waiting for a token now (see [`RateLimiter::waiting_in`]).
    waiting: Arc<AtomicU64>,
}

struct State {
    tokens: f64,
    updated: Instant,
    /// The flows with waiters, in the order of their next turn.
    turns: VecDeque<Arc<str>>,
    /// Each flow's waiters, first come first served (one that gave up stays until passed over).
    queues: HashMap<Arc<str>, VecDeque<oneshot::Sender<()>>>,
    /// Whether a dealer task runs.
    dealing: bool,
}

impl RateLimiter {
    /// A full bucket of `burst` tokens refilled at `qps` per second.
    pub fn new(qps: f64, burst: u32) -> Self {
        Self::build(
            qps.max(0.001),
            f64::from(burst.max(1)),
            Counter::default(),
            Arc::default(),
        )
    }

    fn build(qps: f64, burst: f64, granted: Counter, waiting: Arc<AtomicU64>) -> Self {
        RateLimiter {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    tokens: burst,
                    updated: Instant::now(),
                    turns: VecDeque::new(),
                    queues: HashMap::new(),
                    dealing: false,
                }),
                qps,
                burst,
                granted,
                waiting,
            }),
        }
    }

    /// Counts the tokens it hands out in `granted` (a counter that outlives this limiter, such
    /// as the controller's API writes over every leadership term) instead of its own.
    pub fn counting_in(self, granted: Counter) -> Self {
        let s = &self.shared;
        Self::build(s.qps, s.burst, granted, s.waiting.clone())
    }

    /// Keeps the number of callers waiting for a token in `waiting` (a gauge that outlives this
    /// limiter) instead of its own.
    pub fn waiting_in(self, waiting: Arc<AtomicU64>) -> Self {
        let s = &self.shared;
        Self::build(s.qps, s.burst, s.granted.clone(), waiting)
    }

    /// Waits for one token for a write of `flow` (the cluster it is for; see the module docs).
    pub async fn acquire(&self, flow: &str) {
        let granted = {
            let mut state = self.shared.lock();
            if state.turns.is_empty() && state.tokens >= 1.0 {
                state.tokens -= 1.0;
                self.shared.granted.inc();
                return;
            }
            let (tx, rx) = oneshot::channel();
            if let Some(queue) = state.queues.get_mut(flow) {
                queue.push_back(tx);
            } else {
                let flow: Arc<str> = flow.into();
                state.queues.insert(flow.clone(), VecDeque::from([tx]));
                state.turns.push_back(flow);
            }
            if !state.dealing {
                state.dealing = true;
                tokio::spawn(deal(self.shared.clone()));
            }
            self.shared.waiting.fetch_add(1, Ordering::Relaxed);
            rx
        };
        // Counted out when served, and also when the caller gives up.
        let _waiting = Waiting(&self.shared.waiting);
        // An error would mean the dealer is gone, which happens only as the runtime shuts down.
        let _ = granted.await;
    }

    /// Tokens handed out so far (what its counter holds).
    pub fn granted(&self) -> u64 {
        self.shared.granted.get()
    }

    /// Callers waiting for a token now.
    pub fn waiting(&self) -> u64 {
        self.shared.waiting.load(Ordering::Relaxed)
    }
}

/// One caller counted as waiting until it is dropped.
struct Waiting<'a>(&'a AtomicU64);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Shared {
    /// The state, with the tokens accrued since it was last read added.
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock, so a poisoned lock still holds a sound state.
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let elapsed = now.duration_since(state.updated).as_secs_f64();
        state.tokens = (state.tokens + elapsed * self.qps).min(self.burst);
        state.updated = now;
        state
    }
}

/// The dealer: hands each token, as it accrues, to the first waiter of the flow whose turn it
/// is, and ends when nobody waits.
async fn deal(shared: Arc<Shared>) {
    loop {
        let wait = {
            let mut state = shared.lock();
            loop {
                let Some(flow) = state.turns.pop_front() else {
                    state.dealing = false;
                    return;
                };
                if state.tokens < 1.0 {
                    state.turns.push_front(flow);
                    break (1.0 - state.tokens) / shared.qps;
                }
                let waiter = match state.queues.get_mut(&flow) {
                    Some(queue) => {
                        let waiter = queue.pop_front();
                        if queue.is_empty() {
                            state.queues.remove(&flow);
                        } else {
                            state.turns.push_back(flow);
                        }
                        waiter
                    }
                    None => None,
                };
                // A waiter that gave up has dropped its receiver: it takes no token.
                if waiter.is_some_and(|w| w.send(()).is_ok()) {
                    state.tokens -= 1.0;
                    shared.granted.inc();
                }
            }
        };
        tokio::time::sleep(Duration::from_secs_f64(wait)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex as StdMutex;

    #[tokio::test(start_paused = true)]
    async fn bursts_then_paces() {
        let l = RateLimiter::new(10.0, 5);
        let start = Instant::now();
        for _ in 0..5 {
            l.acquire("a").await;
        }
        assert_eq!(start.elapsed(), Duration::ZERO, "the burst is free");
        for _ in 0..10 {
            l.acquire("a").await;
        }
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(990) && took < Duration::from_millis(1100),
            "{took:?}"
        );
        assert_eq!(l.granted(), 15);
    }

    /// Starts a task per `(flow, label)`, in order, each taking a token and noting its label;
    /// returns the labels in the order the tokens went.
    async fn order_served(l: Arc<RateLimiter>, waiters: &[(&'static str, u32)]) -> Vec<u32> {
        let order = Arc::new(StdMutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for &(flow, label) in waiters {
            let (l, order) = (l.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                l.acquire(flow).await;
                order.lock().unwrap().push(label);
            }));
            // Each queues before the next starts.
            tokio::task::yield_now().await;
        }
        for t in tasks {
            t.await.unwrap();
        }
        let order = order.lock().unwrap().clone();
        order
    }

    #[tokio::test(start_paused = true)]
    async fn one_clusters_writes_are_served_in_order() {
        let l = Arc::new(RateLimiter::new(1.0, 1));
        l.acquire("a").await;
        let order = order_served(l, &[("a", 0), ("a", 1), ("a", 2), ("a", 3)]).await;
        assert_eq!(order, vec![0, 1, 2, 3]);
    }

    #[tokio::test(start_paused = true)]
    async fn clusters_take_turns_while_writes_wait() {
        let l = Arc::new(RateLimiter::new(1.0, 1));
        l.acquire("big").await;
        // A scale-up queues six writes, then two other clusters queue theirs: each of those is
        // served at the next turn, not after everything queued before it.
        let mut waiters: Vec<(&str, u32)> = (0..6).map(|i| ("big", i)).collect();
        waiters.extend([("starting", 100), ("other", 200), ("other", 201)]);
        let order = order_served(l.clone(), &waiters).await;
        assert_eq!(order, vec![0, 100, 200, 1, 201, 2, 3, 4, 5]);
        assert_eq!(l.granted(), 10);
        assert_eq!(l.waiting(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_that_gives_up_takes_no_token() {
        let l = Arc::new(RateLimiter::new(1.0, 1));
        l.acquire("a").await;
        let gave_up = tokio::time::timeout(Duration::from_millis(500), async {
            tokio::join!(l.acquire("a"), async {
                tokio::task::yield_now().await;
                assert_eq!(l.waiting(), 1, "a caller that waits is counted");
            })
        })
        .await;
        assert!(gave_up.is_err());
        assert_eq!(l.waiting(), 0, "a caller that gave up is not counted");
        let start = Instant::now();
        l.acquire("b").await;
        assert_eq!(
            start.elapsed(),
            Duration::from_millis(500),
            "the next token is b's"
        );
        assert_eq!(l.granted(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn the_dealer_ends_when_nobody_waits_and_comes_back() {
        let l = Arc::new(RateLimiter::new(1.0, 1));
        for _ in 0..3 {
            l.acquire("a").await;
            l.acquire("a").await;
            tokio::task::yield_now().await;
            assert!(!l.shared.lock().dealing, "no dealer is left running");
        }
        assert_eq!(l.granted(), 6);
    }
}

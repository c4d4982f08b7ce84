//! The idle backstop. A cluster's `idle_timeout` is kept by its scheduler: the stock preload
//! checks for idleness and asks the gateway to stop the cluster (a `DELETE` with the cluster's
//! token). It asks once: if that request fails, because the gateway was restarting or could
//! not be reached, the preload's check ends for good and the cluster would run idle until
//! someone stops it.
//!
//! So the gateway also asks each running scheduler with an idle timeout, a few times per
//! timeout, whether it is idle (Dask's own `check_idle`, over the cluster's TLS), and stops a
//! cluster it has seen idle for clearly longer than the preload would have waited. The
//! preload's request always comes first when it can come at all: it fires at most a quarter of
//! the timeout after the timeout, and the gateway waits that long plus [`HEAD_START`] from the
//! moment it first saw the scheduler idle, which is never before the scheduler really was.
//!
//! The preload's own test of idleness misses one kind of work: tasks that wait in the
//! scheduler's queue for workers (Dask queues root tasks by default, and a cluster whose
//! workers are still starting holds its whole graph there). Its request to stop is therefore
//! checked against Dask's answer first ([`ClusterService::scheduler_says_busy`]): a cluster
//! with queued, unrunnable or running tasks is not stopped, and the preload asks again a
//! quarter of a timeout later, when its test still finds it idle.

use super::*;
use futures_util::stream::{self, StreamExt};
use gateway_backend::TlsPair;
use gateway_comm::{protocol, ClusterTls, CommError};

/// How long one check may take: connect, TLS, Dask handshake and answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Checks in flight at once.
const PROBES_AT_ONCE: usize = 16;
/// The wait before asking again a scheduler that refused the request (a Dask without it).
const REFUSED_RETRY: Duration = Duration::from_secs(600);
/// How much longer than the preload's latest request the gateway waits before it stops an
/// idle cluster itself.
const HEAD_START: Duration = Duration::from_secs(5);

/// What this process knows about one running cluster's idleness.
#[derive(Debug, Default)]
pub(super) struct IdleWatch {
    /// When to ask next (`None`: at once).
    next: Option<Instant>,
    /// The scheduler's own "idle since" (its clock) and when this process first saw it.
    spell: Option<(f64, Instant)>,
}

/// What one question to a scheduler found.
#[derive(Debug, PartialEq)]
enum Finding {
    /// Idle since this time (seconds since the Unix epoch, the scheduler's clock).
    Idle(f64),
    /// Working, or it has worked since the last question.
    Busy,
    /// It answered that it does not do this check.
    Refused(String),
    /// No answer: not reachable, too slow, or the connection broke.
    NoAnswer(String),
}

/// How often to ask a cluster with this idle timeout (seconds): four times per timeout,
/// between once a second and once a minute.
fn period(idle_timeout: f64) -> Duration {
    Duration::from_secs_f64((idle_timeout / 4.0).clamp(1.0, 60.0))
}

/// How long the gateway must see a cluster idle before stopping it itself: the timeout, the
/// preload's own checking period (a quarter of it), and [`HEAD_START`].
fn patience(idle_timeout: f64) -> Duration {
    Duration::from_secs_f64(idle_timeout * 1.25) + HEAD_START
}

impl IdleWatch {
    /// Takes in what a question at `now` found; true when the cluster has now been idle, as
    /// far as this process has seen, for `patience`.
    fn observe(
        &mut self,
        finding: &Finding,
        now: Instant,
        every: Duration,
        patience: Duration,
    ) -> bool {
        self.next = Some(
            now + match finding {
                Finding::Refused(_) => REFUSED_RETRY,
                _ => every,
            },
        );
        match finding {
            Finding::Idle(since) => {
                let first_seen = match self.spell {
                    Some((known, at)) if known == *since => at,
                    _ => now,
                };
                self.spell = Some((*since, first_seen));
                now.duration_since(first_seen) >= patience
            }
            Finding::Busy | Finding::Refused(_) => {
                self.spell = None;
                false
            }
            // A spell goes on while the scheduler cannot be asked: the next answer either
            // names the same time (nothing happened) or another (the spell ended).
            Finding::NoAnswer(_) => false,
        }
    }
}

/// A question out to one cluster's scheduler; the cluster is free for the next when dropped.
struct OneQuestion<'a> {
    out: &'a Mutex<std::collections::HashSet<String>>,
    name: String,
}

impl<'a> OneQuestion<'a> {
    /// Marks a question to `name` as out, or `None` if one already is.
    fn start(out: &'a Mutex<std::collections::HashSet<String>>, name: &str) -> Option<Self> {
        let mut set = out.lock().unwrap_or_else(|e| e.into_inner());
        set.insert(name.to_string()).then(|| OneQuestion {
            out,
            name: name.to_string(),
        })
    }
}

impl Drop for OneQuestion<'_> {
    fn drop(&mut self) {
        let mut set = self.out.lock().unwrap_or_else(|e| e.into_inner());
        set.remove(&self.name);
    }
}

/// Asks cluster `name`'s scheduler at `scheduler` (`tls://host:port`) whether it is idle.
async fn ask_if_idle(name: &str, scheduler: &str, tls: &TlsPair) -> Finding {
    let credentials = match ClusterTls::from_pem(&tls.cert, &tls.key) {
        Ok(c) => c,
        Err(e) => return Finding::Refused(e.to_string()),
    };
    let address = scheduler.strip_prefix("tls://").unwrap_or(scheduler);
    let ask = async {
        let sni = format!("daskgateway-{name}");
        let mut stream = gateway_comm::connect(address, &sni, &credentials, PROBE_TIMEOUT).await?;
        protocol::handshake(&mut stream).await?;
        let idle = protocol::check_idle(&mut stream).await;
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut stream).await;
        idle
    };
    match tokio::time::timeout(PROBE_TIMEOUT, ask).await {
        Ok(Ok(Some(since))) => Finding::Idle(since),
        Ok(Ok(None)) => Finding::Busy,
        Ok(Err(CommError::Protocol(why))) => Finding::Refused(why),
        Ok(Err(e)) => Finding::NoAnswer(e.to_string()),
        Err(_) => Finding::NoAnswer(format!("no answer within {} s", PROBE_TIMEOUT.as_secs())),
    }
}

impl ClusterService {
    /// Whether cluster `view`'s scheduler answers that it has work (Dask's own idle check:
    /// tasks queued, unrunnable or running, or a graph arriving). A scheduler that cannot be
    /// asked, or does not answer this question, counts as not busy. While one question to a
    /// cluster is out, another request of its scheduler's counts as busy: the preload asks
    /// one at a time, and a flood of requests with the cluster's token asks nothing more.
    pub(super) async fn scheduler_says_busy(&self, view: &ClusterView) -> bool {
        let (Some(addresses), Some(tls)) = (&view.addresses, &view.tls) else {
            return false;
        };
        let Some(_asking) = OneQuestion::start(&self.stop_checks, &view.name) else {
            return true;
        };
        match ask_if_idle(&view.name, &addresses.scheduler, tls).await {
            Finding::Busy => true,
            Finding::Idle(_) => false,
            Finding::Refused(why) | Finding::NoAnswer(why) => {
                debug!(cluster = %view.name, "no answer to an idle check: {why}");
                false
            }
        }
    }

    /// Asks the running schedulers whose check is due whether they are idle, and stops the
    /// clusters idle past their timeout whose own request to stop never came (see the module
    /// docs). Unclaimed warm schedulers are not asked: they wait for a user. Called about
    /// once a second.
    pub async fn check_idleness(&self) {
        let now = self.clock.instant();
        let mut due = Vec::new();
        {
            let mut watches = self.idle_watches.lock().unwrap_or_else(|e| e.into_inner());
            let mut watched = std::collections::HashSet::new();
            for v in self.backend.list(None) {
                let idle_timeout = v.settings.idle_timeout;
                if v.status != ClusterStatus::Running || v.pool.is_some() || idle_timeout <= 0.0 {
                    continue;
                }
                let (Some(addresses), Some(tls)) = (v.addresses, v.tls) else {
                    continue;
                };
                watched.insert(v.name.clone());
                let watch = watches.entry(v.name.clone()).or_default();
                if watch.next.is_none_or(|t| t <= now) {
                    due.push((v.name, addresses.scheduler, tls, idle_timeout));
                }
            }
            watches.retain(|name, _| watched.contains(name));
        }
        if due.is_empty() {
            return;
        }
        let findings: Vec<_> = stream::iter(due)
            .map(|(name, scheduler, tls, idle_timeout)| async move {
                let finding = ask_if_idle(&name, &scheduler, &tls).await;
                (name, idle_timeout, finding)
            })
            .buffer_unordered(PROBES_AT_ONCE)
            .collect()
            .await;
        let now = self.clock.instant();
        let mut idle = Vec::new();
        {
            let mut watches = self.idle_watches.lock().unwrap_or_else(|e| e.into_inner());
            for (name, idle_timeout, finding) in findings {
                let Some(watch) = watches.get_mut(&name) else {
                    continue;
                };
                match &finding {
                    Finding::Refused(why) => {
                        debug!(cluster = %name, "the scheduler does not answer idle checks: {why}")
                    }
                    Finding::NoAnswer(why) => {
                        debug!(cluster = %name, "no answer to an idle check: {why}")
                    }
                    _ => {}
                }
                if watch.observe(&finding, now, period(idle_timeout), patience(idle_timeout)) {
                    watches.remove(&name);
                    idle.push((name, idle_timeout));
                }
            }
        }
        for (name, idle_timeout) in idle {
            // Only clusters still running and still someone's: a stop or a claim may have
            // come while the scheduler was being asked.
            if !self
                .backend
                .get(&name)
                .is_some_and(|v| v.status == ClusterStatus::Running && v.pool.is_none())
            {
                continue;
            }
            let reason = format!(
                "idle for longer than its idle timeout of {}; its scheduler's request to stop \
                 never arrived, so the gateway stopped it",
                human_seconds(idle_timeout)
            );
            info!(cluster = %name, %reason, "stopping an idle cluster");
            self.counters.idle_stops.inc();
            if let Err(e) = self
                .backend
                .stop(&name, StopRequest::stopped(format!("stopped: {reason}")))
                .await
            {
                warn!(cluster = %name, "could not stop the cluster: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVERY: Duration = Duration::from_secs(1);
    const PATIENCE: Duration = Duration::from_secs(10);

    #[test]
    fn the_preload_always_has_the_first_word() {
        // The preload asks at most 1.25 timeouts after the scheduler fell idle.
        for timeout in [1.0, 4.0, 60.0, 3600.0] {
            let p = patience(timeout).as_secs_f64();
            assert!(p >= timeout * 1.25 + HEAD_START.as_secs_f64(), "{timeout}");
            assert!(period(timeout) <= Duration::from_secs(60));
            assert!(period(timeout) >= Duration::from_secs(1));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn one_unbroken_idle_spell_as_long_as_the_patience_stops() {
        let mut w = IdleWatch::default();
        let start = Instant::now();
        assert!(!w.observe(&Finding::Idle(100.0), start, EVERY, PATIENCE));
        assert_eq!(w.next, Some(start + EVERY));
        assert!(!w.observe(
            &Finding::Idle(100.0),
            start + Duration::from_secs(9),
            EVERY,
            PATIENCE
        ));
        // A check that could not be made neither ends nor extends the spell.
        assert!(!w.observe(
            &Finding::NoAnswer("refused".into()),
            start + Duration::from_secs(9),
            EVERY,
            PATIENCE
        ));
        assert!(w.observe(&Finding::Idle(100.0), start + PATIENCE, EVERY, PATIENCE));
    }

    #[tokio::test(start_paused = true)]
    async fn work_in_between_starts_the_spell_again() {
        let start = Instant::now();
        let later = |s| start + Duration::from_secs(s);
        // Busy in between.
        let mut w = IdleWatch::default();
        w.observe(&Finding::Idle(100.0), start, EVERY, PATIENCE);
        w.observe(&Finding::Busy, later(5), EVERY, PATIENCE);
        assert!(!w.observe(&Finding::Idle(106.0), later(6), EVERY, PATIENCE));
        assert!(!w.observe(&Finding::Idle(106.0), later(15), EVERY, PATIENCE));
        assert!(w.observe(&Finding::Idle(106.0), later(16), EVERY, PATIENCE));
        // Work between two checks (or between checks by another replica) shows as a new
        // "idle since", even without a busy answer.
        let mut w = IdleWatch::default();
        w.observe(&Finding::Idle(100.0), start, EVERY, PATIENCE);
        assert!(!w.observe(&Finding::Idle(104.0), later(10), EVERY, PATIENCE));
        assert!(w.observe(&Finding::Idle(104.0), later(20), EVERY, PATIENCE));
    }

    #[tokio::test(start_paused = true)]
    async fn a_scheduler_that_refuses_the_check_is_asked_rarely_and_never_stopped() {
        let start = Instant::now();
        let mut w = IdleWatch::default();
        w.observe(&Finding::Idle(100.0), start, EVERY, PATIENCE);
        assert!(!w.observe(
            &Finding::Refused("no handler".into()),
            start + PATIENCE,
            EVERY,
            PATIENCE
        ));
        assert_eq!(w.spell, None);
        assert_eq!(w.next, Some(start + PATIENCE + REFUSED_RETRY));
    }

    #[test]
    fn one_question_per_cluster_at_a_time() {
        let out = Mutex::new(std::collections::HashSet::new());
        let first = OneQuestion::start(&out, "a").unwrap();
        assert!(OneQuestion::start(&out, "a").is_none());
        let other = OneQuestion::start(&out, "b").unwrap();
        drop(first);
        assert!(OneQuestion::start(&out, "a").is_some());
        drop(other);
        assert!(out.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn an_unreachable_scheduler_is_no_answer_and_bad_credentials_a_refusal() {
        let tls = TlsPair {
            cert: "not a certificate".into(),
            key: "not a key".into(),
        };
        assert!(matches!(
            ask_if_idle("c", "tls://127.0.0.1:1", &tls).await,
            Finding::Refused(_)
        ));
        let creds = gateway_backend::credentials::ClusterCredentials::generate("c").unwrap();
        let tls = TlsPair {
            cert: creds.cert_pem,
            key: creds.key_pem,
        };
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        assert!(matches!(
            ask_if_idle("c", &format!("tls://127.0.0.1:{port}"), &tls).await,
            Finding::NoAnswer(_)
        ));
    }
}

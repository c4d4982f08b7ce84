//! `GET /api/v1/usage`: who used how much, from the backend's per-cluster usage
//! ([`gateway_backend::ClusterBackend::usage`]), and the usage families of `/metrics` (from a
//! [`UsageCache`]).

use crate::auth::User;
use crate::clock::Clock;
use crate::clusters::ClusterError;
use gateway_backend::metrics::{self, Registry};
use gateway_backend::ClusterBackend;
use gateway_model::{ClusterUsage, UsageGrouping, UsageReport};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How long `/metrics` reuses the usage it last read (on Kubernetes each read lists every
/// DaskCluster).
pub const METRICS_USAGE_TTL: Duration = Duration::from_secs(10);

/// The usage `/metrics` last read, reused for a while: one read at a time, and scrapes that
/// arrive during a read wait for it and share its result. A failed read is not kept.
pub struct UsageCache {
    clock: Clock,
    ttl: Duration,
    /// When the last read started, and what it returned.
    last: tokio::sync::Mutex<Option<(Instant, Arc<[ClusterUsage]>)>>,
    /// What the last [`UsageCache::get`] returned (none after a failed read): what the usage
    /// families show (see [`register_metrics`]).
    shown: std::sync::Mutex<Option<Arc<[ClusterUsage]>>>,
}

impl Default for UsageCache {
    /// On the system clock, for [`METRICS_USAGE_TTL`].
    fn default() -> Self {
        UsageCache::new(Clock::system(), METRICS_USAGE_TTL)
    }
}

impl UsageCache {
    /// A cache whose reads are reused for `ttl` of `clock`'s time.
    pub fn new(clock: Clock, ttl: Duration) -> Self {
        UsageCache {
            clock,
            ttl,
            last: tokio::sync::Mutex::new(None),
            shown: std::sync::Mutex::new(None),
        }
    }

    /// The usage read less than the TTL ago, else what `read(now_ms)` returns now (`now_ms`:
    /// the end of the window to read, ms since the Unix epoch).
    pub async fn get<F, Fut, E>(&self, read: F) -> Result<Arc<[ClusterUsage]>, E>
    where
        F: FnOnce(i64) -> Fut,
        Fut: Future<Output = Result<Vec<ClusterUsage>, E>>,
    {
        let mut last = self.last.lock().await;
        let started = self.clock.instant();
        if let Some((at, usage)) = &*last {
            if started.duration_since(*at) < self.ttl {
                self.show(Some(usage.clone()));
                return Ok(usage.clone());
            }
        }
        match read(self.clock.now_ms()).await {
            Ok(usage) => {
                let usage: Arc<[ClusterUsage]> = usage.into();
                *last = Some((started, usage.clone()));
                self.show(Some(usage.clone()));
                Ok(usage)
            }
            Err(e) => {
                self.show(None);
                Err(e)
            }
        }
    }

    /// What the last [`UsageCache::get`] returned; none before the first or after a failed read.
    pub fn shown(&self) -> Option<Arc<[ClusterUsage]>> {
        self.shown.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn show(&self, usage: Option<Arc<[ClusterUsage]>>) {
        *self.shown.lock().unwrap_or_else(|e| e.into_inner()) = usage;
    }
}

/// A parsed usage request.
#[derive(Clone, Debug, PartialEq)]
pub struct UsageQuery {
    /// Window start, ms since the Unix epoch (default: 0, everything kept).
    pub since: i64,
    /// Window end, ms since the Unix epoch (default: now).
    pub until: i64,
    /// Row grouping (default: by user).
    pub by: UsageGrouping,
    /// Only this user's clusters (admins; a user may name only themselves).
    pub user: Option<String>,
    /// Answer as CSV.
    pub csv: bool,
}

impl UsageQuery {
    /// Parses `since`, `until`, `by`, `user` and `format` from decoded query pairs; `now_ms`
    /// is the default `until`. Times are RFC 3339 (`2026-12-01T00:00:00Z`), a UTC date
    /// (`2026-12-01`), or milliseconds since the Unix epoch.
    pub fn parse(pairs: &[(String, String)], now_ms: i64) -> Result<UsageQuery, String> {
        let mut q = UsageQuery {
            since: 0,
            until: now_ms,
            by: UsageGrouping::User,
            user: None,
            csv: false,
        };
        for (key, value) in pairs {
            match key.as_str() {
                "since" => q.since = parse_instant(value).map_err(|e| format!("since: {e}"))?,
                "until" => q.until = parse_instant(value).map_err(|e| format!("until: {e}"))?,
                "by" => q.by = value.parse()?,
                "user" if !value.is_empty() => q.user = Some(value.clone()),
                "user" => {}
                "format" => {
                    q.csv = match value.as_str() {
                        "csv" => true,
                        "json" | "" => false,
                        other => return Err(format!("format must be json or csv; got {other:?}")),
                    }
                }
                other => return Err(format!("unknown parameter {other:?}")),
            }
        }
        if q.since >= q.until {
            return Err("since must be before until".into());
        }
        Ok(q)
    }
}

/// A time as RFC 3339, a UTC date, or ms since the Unix epoch. A value of one of these forms
/// that cannot be used (out of range, a 13th month) says so, rather than that it has no form.
fn parse_instant(s: &str) -> Result<i64, String> {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit() || b == b'-') && !s[1..].contains('-')
    {
        return match s.parse::<i64>() {
            Ok(ms) if ms >= 0 => Ok(ms),
            Ok(_) => Err(format!("{s} is before 1970")),
            Err(_) => Err(format!("{s} is too large for milliseconds since 1970")),
        };
    }
    let looks_like_time = s.contains(['T', 't', ' ']);
    match s.parse::<jiff::Timestamp>() {
        Ok(ts) => return Ok(ts.as_millisecond().max(0)),
        Err(e) if looks_like_time => return Err(format!("{s:?} is not a usable time: {e}")),
        Err(_) => {}
    }
    let looks_like_date = s.len() == 10 && s.as_bytes()[4] == b'-' && s.as_bytes()[7] == b'-';
    match s.parse::<jiff::civil::Date>() {
        Ok(date) => date
            .to_zoned(jiff::tz::TimeZone::UTC)
            .map(|zoned| zoned.timestamp().as_millisecond().max(0))
            .map_err(|e| format!("{s:?} is out of range: {e}")),
        Err(e) if looks_like_date => Err(format!("{s:?} is not a valid date: {e}")),
        Err(_) => Err(format!(
            "{s:?} is not an RFC 3339 time, a date (YYYY-MM-DD) or milliseconds since 1970"
        )),
    }
}

/// The usage report `user` may see: everyone's (or `query.user`'s) for an admin, their own
/// otherwise. A non-admin naming another user is refused, as seeing that user's cluster
/// would be.
pub async fn report(
    backend: &dyn ClusterBackend,
    user: &User,
    query: &UsageQuery,
) -> Result<UsageReport, ClusterError> {
    let owner = match (&query.user, user.admin) {
        (Some(other), false) if *other != user.name => {
            return Err(ClusterError::ForbiddenUsage {
                user: user.name.clone(),
                other: other.clone(),
            })
        }
        (Some(named), _) => Some(named.as_str()),
        (None, true) => None,
        (None, false) => Some(user.name.as_str()),
    };
    let clusters = backend.usage(owner, query.since, query.until).await?;
    Ok(UsageReport::build(
        query.since,
        query.until,
        query.by,
        &clusters,
    ))
}

/// Registers the usage families of `/metrics`: core- and memory-seconds used since the oldest
/// usage kept, as counters, from what `cache` showed last ([`UsageCache::shown`]: a scrape reads
/// the usage first, see [`crate::metrics::GatewayMetrics::render`]); per `user` and `group`
/// label when `by_user` (one series per user: mind the cardinality), else one series each. No
/// families while the last read failed.
pub fn register_metrics(registry: &mut Registry, cache: Arc<UsageCache>, by_user: bool) {
    registry.register_collector(metrics::collector("usage", move |scrape| {
        let Some(clusters) = cache.shown() else {
            return Ok(());
        };
        let totals = usage_totals(&clusters, by_user);
        for (name, help, pick) in [
            (
                "usage_core_seconds",
                "Cores requested by running schedulers and workers, times seconds",
                (|t| t.0) as fn((f64, f64)) -> f64,
            ),
            (
                "usage_memory_byte_seconds",
                "Memory bytes requested by running schedulers and workers, times seconds",
                |t| t.1,
            ),
        ] {
            if by_user {
                scrape.counters(
                    name,
                    help,
                    totals.iter().map(|((user, group), t)| {
                        (
                            [("user", user.as_str()), ("group", group.as_str())],
                            pick(*t),
                        )
                    }),
                )?;
            } else {
                // (A fold, not `sum`: the sum of nothing is -0.0.)
                let total = totals.values().fold(0.0, |sum, t| sum + pick(*t));
                scrape.counter(name, help, total)?;
            }
        }
        Ok(())
    }));
}

/// Core- and memory-seconds per (user, group) when `by_user`, else all under one empty key.
fn usage_totals(
    clusters: &[ClusterUsage],
    by_user: bool,
) -> BTreeMap<(String, String), (f64, f64)> {
    let mut totals: BTreeMap<(String, String), (f64, f64)> = BTreeMap::new();
    for c in clusters {
        let key = if by_user {
            (c.owner.clone(), c.group.clone().unwrap_or_default())
        } else {
            Default::default()
        };
        let t = totals.entry(key).or_default();
        t.0 += c.amount.core_seconds;
        t.1 += c.amount.memory_byte_seconds;
    }
    totals
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_model::UsageAmount;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn used_until(until: i64) -> ClusterUsage {
        ClusterUsage {
            cluster: "c".into(),
            owner: "alice".into(),
            group: None,
            created: until,
            amount: UsageAmount::default(),
            cores_now: 0.0,
            memory_now: 0.0,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn metrics_read_usage_once_per_window() {
        let cache = UsageCache::new(Clock::tokio_at(1_000_000), Duration::from_secs(10));
        let reads = AtomicUsize::new(0);
        // A read that takes a while (a LIST on Kubernetes).
        let read = |until: i64| {
            reads.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                Ok::<_, String>(vec![used_until(until)])
            }
        };
        // Two concurrent scrapes: one read, shared.
        let (a, b) = tokio::join!(cache.get(read), cache.get(read));
        assert_eq!(reads.load(Ordering::SeqCst), 1);
        assert_eq!(a.unwrap()[0].created, 1_000_000);
        assert_eq!(b.unwrap()[0].created, 1_000_000);
        // Another within the window (counted from when the read started): still none.
        tokio::time::advance(Duration::from_millis(9_699)).await;
        let c = cache.get(read).await.unwrap();
        assert_eq!((reads.load(Ordering::SeqCst), c[0].created), (1, 1_000_000));
        // After it: read again, up to now.
        tokio::time::advance(Duration::from_millis(1)).await;
        let d = cache.get(read).await.unwrap();
        assert_eq!((reads.load(Ordering::SeqCst), d[0].created), (2, 1_010_000));
        // A failed read is not kept: the next scrape reads again.
        tokio::time::advance(Duration::from_secs(10)).await;
        let failing = |_| async { Err::<Vec<ClusterUsage>, _>("the API server is away") };
        assert!(cache.get(failing).await.is_err());
        let e = cache.get(read).await.unwrap();
        assert_eq!((reads.load(Ordering::SeqCst), e[0].created), (3, 1_020_300));
    }

    fn pairs(q: &[(&str, &str)]) -> Vec<(String, String)> {
        q.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn queries_take_dates_times_and_milliseconds() {
        let q = UsageQuery::parse(
            &pairs(&[
                ("since", "2026-12-01"),
                ("until", "2026-12-02T12:00:00Z"),
                ("by", "group"),
                ("format", "csv"),
            ]),
            0,
        )
        .unwrap();
        assert_eq!(q.since, 1_796_083_200_000);
        assert_eq!(q.until, 1_796_083_200_000 + 36 * 3_600_000);
        assert_eq!(q.by, UsageGrouping::Group);
        assert!(q.csv);
        let q = UsageQuery::parse(&pairs(&[("since", "1000")]), 5000).unwrap();
        assert_eq!((q.since, q.until, q.by), (1000, 5000, UsageGrouping::User));
    }

    #[test]
    fn bad_queries_say_what_is_wrong() {
        for (q, needle) in [
            (vec![("since", "yesterday")], "since:"),
            (vec![("since", "-5")], "before 1970"),
            (vec![("since", "10"), ("until", "10")], "before until"),
            (vec![("by", "planet")], "by must be"),
            (vec![("format", "xml")], "format must be"),
            (vec![("limit", "3")], "unknown parameter"),
            (
                vec![("until", "9999-12-31")],
                "\"9999-12-31\" is out of range",
            ),
            (
                vec![("until", "2026-13-01")],
                "\"2026-13-01\" is not a valid date",
            ),
            (vec![("since", "2026-02-30")], "is not a valid date"),
            (
                vec![("since", "2026-12-01T25:00:00Z")],
                "is not a usable time",
            ),
            (
                vec![("since", "2026-12-01T00:00:00")],
                "is not a usable time",
            ),
            (vec![("since", "99999999999999999999")], "too large"),
            (vec![("since", "")], "is not an RFC 3339 time"),
            (vec![("since", "1-2")], "is not an RFC 3339 time"),
        ] {
            let err = UsageQuery::parse(&pairs(&q), 100).unwrap_err();
            assert!(err.contains(needle), "{q:?}: {err}");
        }
    }

    /// The usage families as `/metrics` shows them after a scrape read `usage`.
    async fn usage_text(usage: Vec<ClusterUsage>, by_user: bool) -> String {
        let cache = Arc::new(UsageCache::default());
        let mut registry = metrics::registry();
        register_metrics(&mut registry, cache.clone(), by_user);
        cache.get(|_| async { Ok::<_, ()>(usage) }).await.unwrap();
        metrics::render(&registry).unwrap()
    }

    #[tokio::test]
    async fn metrics_label_users_only_when_asked_and_escape_them() {
        let usage = ClusterUsage {
            cluster: "c".into(),
            owner: "ev\"il\n".into(),
            group: None,
            created: 0,
            amount: UsageAmount {
                core_seconds: 2.5,
                memory_byte_seconds: 10.0,
            },
            cores_now: 0.0,
            memory_now: 0.0,
        };
        let out = usage_text(vec![usage.clone()], false).await;
        for line in [
            "# HELP dask_gateway_usage_core_seconds Cores requested by running schedulers and workers, times seconds.",
            "# TYPE dask_gateway_usage_core_seconds counter",
            "dask_gateway_usage_core_seconds_total 2.5",
            "# TYPE dask_gateway_usage_memory_byte_seconds counter",
            "dask_gateway_usage_memory_byte_seconds_total 10.0",
        ] {
            assert!(out.lines().any(|l| l == line), "{line} missing from\n{out}");
        }
        let out = usage_text(vec![usage], true).await;
        assert!(
            out.contains(
                "dask_gateway_usage_core_seconds_total{user=\"ev\\\"il\\n\",group=\"\"} 2.5\n"
            ),
            "{out}"
        );
        let out = usage_text(vec![], false).await;
        assert!(
            out.contains("dask_gateway_usage_memory_byte_seconds_total 0.0\n"),
            "{out}"
        );
        // Per user with no usage: no series, so no families.
        let out = usage_text(vec![], true).await;
        assert_eq!(out, "# EOF\n");
    }

    #[tokio::test]
    async fn metrics_show_no_usage_after_a_failed_read() {
        let cache = Arc::new(UsageCache::new(Clock::system(), Duration::ZERO));
        let mut registry = metrics::registry();
        register_metrics(&mut registry, cache.clone(), false);
        assert_eq!(
            metrics::render(&registry).unwrap(),
            "# EOF\n",
            "nothing read yet"
        );
        cache.get(|_| async { Ok::<_, ()>(vec![]) }).await.unwrap();
        assert!(metrics::render(&registry)
            .unwrap()
            .contains("usage_core_seconds_total 0.0"));
        assert!(cache
            .get(|_| async { Err::<Vec<ClusterUsage>, _>(()) })
            .await
            .is_err());
        assert_eq!(metrics::render(&registry).unwrap(), "# EOF\n");
    }
}

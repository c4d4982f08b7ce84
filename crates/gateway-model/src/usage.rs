//! Usage accounting: the resources a cluster's processes or pods requested, integrated over the
//! time they ran, and the `GET /api/v1/usage` report built from it.
//!
//! A backend keeps one [`UsageMeter`] per cluster: the cores and memory its running scheduler
//! and workers request now, and up to when their use has been added to hourly
//! [`UsageHour`] buckets. Whenever what runs changes, the backend calls
//! [`UsageMeter::accrue`] with what runs now (each with its start time) and stores the meter
//! and the returned bucket amounts together. Between changes nothing needs writing: the rate
//! and `accounted_until` say what has accrued since ([`UsageMeter::pending`]).

use serde::{Deserialize, Serialize};

/// Milliseconds in one accounting bucket.
pub const HOUR_MS: i64 = 3_600_000;

/// Core-seconds and memory-byte-seconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct UsageAmount {
    /// Cores requested × seconds.
    pub core_seconds: f64,
    /// Bytes of memory requested × seconds.
    pub memory_byte_seconds: f64,
}

impl UsageAmount {
    /// Adds `other` to this amount.
    pub fn add(&mut self, other: UsageAmount) {
        self.core_seconds += other.core_seconds;
        self.memory_byte_seconds += other.memory_byte_seconds;
    }

    /// This amount times `factor`.
    pub fn scaled(self, factor: f64) -> UsageAmount {
        UsageAmount {
            core_seconds: self.core_seconds * factor,
            memory_byte_seconds: self.memory_byte_seconds * factor,
        }
    }

    /// A rate of `cores` and `memory` bytes held for `ms` milliseconds.
    pub fn of_rate(cores: f64, memory: f64, ms: i64) -> UsageAmount {
        let seconds = ms.max(0) as f64 / 1000.0;
        UsageAmount {
            core_seconds: cores * seconds,
            memory_byte_seconds: memory * seconds,
        }
    }
}

/// The usage accrued within one hour (UTC, aligned to the hour), and the part of the hour in
/// which it accrued: a report window that cuts the hour takes the share of that span it
/// covers, which is exact while the rate held steady within the hour.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct UsageHour {
    /// The hour's start, ms since the Unix epoch (a whole hour).
    pub start: i64,
    /// What accrued in it.
    pub amount: UsageAmount,
    /// When the first use in it began, ms since the Unix epoch.
    pub first: i64,
    /// When the last use in it ended, ms since the Unix epoch.
    pub last: i64,
}

impl UsageHour {
    /// Adds `other` (of the same hour, or a later one merged into this bucket).
    fn absorb(&mut self, other: &UsageHour) {
        self.amount.add(other.amount);
        self.first = self.first.min(other.first);
        self.last = self.last.max(other.last);
    }
}

/// One running scheduler or worker, as accounting sees it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RunningUnit {
    /// When it started running, ms since the Unix epoch.
    pub started_ms: i64,
    /// Cores it requested.
    pub cores: f64,
    /// Memory it requested, bytes.
    pub memory: u64,
}

/// A cluster's accounting state between changes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct UsageMeter {
    /// Cores requested by what ran when use was last accounted.
    pub cores: f64,
    /// Memory (bytes) requested by what ran when use was last accounted.
    pub memory: f64,
    /// Use up to this time (ms since the Unix epoch) is in the hourly buckets; 0: never
    /// accrued.
    pub accounted_until: i64,
}

impl UsageMeter {
    /// Whether `running` differs from what the meter last accrued: the rate changed, or a unit
    /// started since. Only then does [`UsageMeter::accrue`] need calling (and its result
    /// storing).
    pub fn needs_accrual(&self, running: &[RunningUnit]) -> bool {
        let (cores, memory) = rate_of(running);
        !close(cores, self.cores)
            || !close(memory, self.memory)
            || running.iter().any(|u| u.started_ms > self.accounted_until)
    }

    /// Adds the use since `accounted_until` up to `now_ms` and makes `running` the new rate.
    /// Returns the amounts to add to each hour bucket.
    ///
    /// Units running now are counted from their start (or `accounted_until`, if earlier).
    /// Units the meter counted before that are gone now are counted up to `now_ms`: the caller
    /// accrues as soon as it sees a change, so that is when they were last seen running.
    pub fn accrue(&mut self, now_ms: i64, running: &[RunningUnit]) -> Vec<UsageHour> {
        let since = self.accounted_until;
        let mut hours = Vec::new();
        if since > 0 && now_ms > since {
            let mut carried = (self.cores, self.memory);
            for u in running {
                let from = u.started_ms.max(since).min(now_ms);
                add_spread(&mut hours, from, now_ms, u.cores, u.memory as f64);
                if u.started_ms <= since {
                    carried.0 -= u.cores;
                    carried.1 -= u.memory as f64;
                }
            }
            // What the meter counted at `since` and no longer runs.
            add_spread(
                &mut hours,
                since,
                now_ms,
                carried.0.max(0.0),
                carried.1.max(0.0),
            );
        } else if since == 0 {
            // First accrual: everything counts from its own start.
            for u in running {
                add_spread(
                    &mut hours,
                    u.started_ms.min(now_ms),
                    now_ms,
                    u.cores,
                    u.memory as f64,
                );
            }
        }
        let (cores, memory) = rate_of(running);
        self.cores = cores;
        self.memory = memory;
        self.accounted_until = self.accounted_until.max(now_ms);
        hours.retain(|h| h.amount != UsageAmount::default());
        hours
    }

    /// What has accrued since `accounted_until` (not yet in any bucket) that falls within
    /// `[since, until)`, with `now_ms` as the present.
    pub fn pending(&self, now_ms: i64, since: i64, until: i64) -> UsageAmount {
        let from = self.accounted_until.max(since);
        let to = now_ms.min(until);
        if self.accounted_until == 0 || to <= from {
            return UsageAmount::default();
        }
        UsageAmount::of_rate(self.cores, self.memory, to - from)
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

fn rate_of(running: &[RunningUnit]) -> (f64, f64) {
    running
        .iter()
        .fold((0.0, 0.0), |(c, m), u| (c + u.cores, m + u.memory as f64))
}

/// The hour containing `ms`.
pub fn hour_of(ms: i64) -> i64 {
    ms.div_euclid(HOUR_MS) * HOUR_MS
}

/// Adds a rate held over `[from, to)` to `hours`, split at hour boundaries.
fn add_spread(hours: &mut Vec<UsageHour>, from: i64, to: i64, cores: f64, memory: f64) {
    if to <= from || (cores == 0.0 && memory == 0.0) {
        return;
    }
    let mut t = from;
    while t < to {
        let start = hour_of(t);
        let end = (start + HOUR_MS).min(to);
        let piece = UsageHour {
            start,
            amount: UsageAmount::of_rate(cores, memory, end - t),
            first: t,
            last: end,
        };
        match hours.iter_mut().find(|h| h.start == start) {
            Some(h) => h.absorb(&piece),
            None => hours.push(piece),
        }
        t = end;
    }
}

/// A cluster's usage as one record holds it (a DaskCluster's status): the meter and the
/// hourly buckets, oldest first.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub struct UsageLedger {
    /// The rate and up to when it is accounted.
    pub meter: UsageMeter,
    /// Hourly buckets, oldest first; the oldest may hold several hours once the record
    /// reached its bound.
    #[serde(default)]
    pub hours: Vec<UsageHour>,
}

impl UsageLedger {
    /// [`UsageMeter::accrue`] into this record's buckets, keeping at most `max_buckets`.
    pub fn accrue(&mut self, now_ms: i64, running: &[RunningUnit], max_buckets: usize) {
        let delta = self.meter.accrue(now_ms, running);
        merge_hours(&mut self.hours, &delta, max_buckets);
    }

    /// What the cluster used within `[since, until)`, with `now_ms` as the present.
    pub fn within(&self, now_ms: i64, since: i64, until: i64) -> UsageAmount {
        let mut total = hours_within(&self.hours, since, until);
        total.add(self.meter.pending(now_ms, since, until));
        total
    }
}

/// Adds `delta` into the sorted bucket list `hours`, then merges the oldest buckets into each
/// other while there are more than `max_buckets` (a bound on a long-lived cluster's record).
pub fn merge_hours(hours: &mut Vec<UsageHour>, delta: &[UsageHour], max_buckets: usize) {
    for d in delta {
        match hours.binary_search_by_key(&d.start, |h| h.start) {
            Ok(i) => hours[i].absorb(d),
            Err(i) => hours.insert(i, *d),
        }
    }
    while hours.len() > max_buckets.max(1) && hours.len() >= 2 {
        // The oldest bucket absorbs the next: its start stays, its span grows. Windows
        // cutting it are taken pro rata over that span, so only reports reaching that far
        // back lose precision.
        let second = hours.remove(1);
        hours[0].absorb(&second);
    }
}

/// The part of `hours` within `[since, until)`: each bucket pro rata to the overlap of the
/// window with the span in which its use accrued.
pub fn hours_within(hours: &[UsageHour], since: i64, until: i64) -> UsageAmount {
    let mut total = UsageAmount::default();
    for h in hours {
        if h.last <= h.first {
            if (since..until).contains(&h.first) {
                total.add(h.amount);
            }
            continue;
        }
        let from = h.first.max(since);
        let to = h.last.min(until);
        if to <= from {
            continue;
        }
        total.add(
            h.amount
                .scaled((to - from) as f64 / (h.last - h.first) as f64),
        );
    }
    total
}

/// One cluster's use within a report window, as a backend reports it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClusterUsage {
    /// Cluster name.
    pub cluster: String,
    /// Its owner.
    pub owner: String,
    /// The group policy it ran under (none: the default `cluster` section).
    pub group: Option<String>,
    /// When it was created, ms since the Unix epoch.
    pub created: i64,
    /// What it used within the window.
    #[serde(flatten)]
    pub amount: UsageAmount,
    /// Cores its running processes or pods request now.
    pub cores_now: f64,
    /// Memory (bytes) its running processes or pods request now.
    pub memory_now: f64,
}

/// How `GET /api/v1/usage` groups its rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum UsageGrouping {
    /// One row per user.
    User,
    /// One row per group policy (the default section is the group `null`).
    Group,
    /// One row per cluster.
    Cluster,
}

impl std::str::FromStr for UsageGrouping {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "user" => Ok(UsageGrouping::User),
            "group" => Ok(UsageGrouping::Group),
            "cluster" => Ok(UsageGrouping::Cluster),
            other => Err(format!(
                "by must be one of user, group, cluster; got {other:?}"
            )),
        }
    }
}

/// One row of a usage report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct UsageRow {
    /// The user (by user or cluster), else null.
    pub user: Option<String>,
    /// The group policy (by group or cluster; null: the default section).
    pub group: Option<String>,
    /// The cluster (by cluster), else null.
    pub cluster: Option<String>,
    /// Clusters created within the window.
    pub clusters_created: u64,
    /// Clusters that used anything within the window.
    pub clusters_active: u64,
    /// Cores requested × seconds within the window.
    pub core_seconds: f64,
    /// Memory bytes requested × seconds within the window.
    pub memory_byte_seconds: f64,
    /// Cores requested right now.
    pub cores_now: f64,
    /// Memory (bytes) requested right now.
    pub memory_now: f64,
}

/// `GET /api/v1/usage`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct UsageReport {
    /// Window start, ms since the Unix epoch (inclusive).
    pub since: i64,
    /// Window end, ms since the Unix epoch (exclusive).
    pub until: i64,
    /// The grouping of `rows`.
    pub by: UsageGrouping,
    /// One row per user, group or cluster, largest core-seconds first.
    pub rows: Vec<UsageRow>,
}

impl UsageReport {
    /// Groups `clusters` into a report over `[since, until)`.
    pub fn build(since: i64, until: i64, by: UsageGrouping, clusters: &[ClusterUsage]) -> Self {
        let mut rows: Vec<UsageRow> = Vec::new();
        for c in clusters {
            let key = match by {
                UsageGrouping::User => (Some(c.owner.clone()), None, None),
                UsageGrouping::Group => (None, c.group.clone(), None),
                UsageGrouping::Cluster => (
                    Some(c.owner.clone()),
                    c.group.clone(),
                    Some(c.cluster.clone()),
                ),
            };
            let i = match rows
                .iter()
                .position(|r| (&r.user, &r.group, &r.cluster) == (&key.0, &key.1, &key.2))
            {
                Some(i) => i,
                None => {
                    rows.push(UsageRow {
                        user: key.0,
                        group: key.1,
                        cluster: key.2,
                        clusters_created: 0,
                        clusters_active: 0,
                        core_seconds: 0.0,
                        memory_byte_seconds: 0.0,
                        cores_now: 0.0,
                        memory_now: 0.0,
                    });
                    rows.len() - 1
                }
            };
            let row = &mut rows[i];
            if (since..until).contains(&c.created) {
                row.clusters_created += 1;
            }
            if c.amount.core_seconds > 0.0 || c.amount.memory_byte_seconds > 0.0 {
                row.clusters_active += 1;
            }
            row.core_seconds += c.amount.core_seconds;
            row.memory_byte_seconds += c.amount.memory_byte_seconds;
            row.cores_now += c.cores_now;
            row.memory_now += c.memory_now;
        }
        // Sums of decimal fractions (0.1 + 0.2 cores) carry binary noise; a millionth of a
        // core (or a byte) is below anything a report means.
        for row in &mut rows {
            row.cores_now = to_millionths(row.cores_now);
            row.core_seconds = to_millionths(row.core_seconds);
            row.memory_now = row.memory_now.round();
            row.memory_byte_seconds = row.memory_byte_seconds.round();
        }
        rows.sort_by(|a, b| {
            b.core_seconds
                .total_cmp(&a.core_seconds)
                .then_with(|| (&a.user, &a.group, &a.cluster).cmp(&(&b.user, &b.group, &b.cluster)))
        });
        UsageReport {
            since,
            until,
            by,
            rows,
        }
    }

    /// The report as CSV (a header line, then one line per row; text fields quoted).
    pub fn to_csv(&self) -> String {
        let mut out = String::from(
            "user,group,cluster,clusters_created,clusters_active,core_seconds,memory_byte_seconds,cores_now,memory_now\n",
        );
        for r in &self.rows {
            let text = |v: &Option<String>| v.as_deref().map(csv_field).unwrap_or_default();
            out.push_str(&format!(
                "{},{},{},{},{},{:.3},{:.0},{},{:.0}\n",
                text(&r.user),
                text(&r.group),
                text(&r.cluster),
                r.clusters_created,
                r.clusters_active,
                r.core_seconds,
                r.memory_byte_seconds,
                r.cores_now,
                r.memory_now
            ));
        }
        out
    }
}

/// A CSV field, quoted, with quotes doubled; a leading `=`, `+`, `-` or `@` is prefixed with
/// `'` so that a spreadsheet never reads a user-chosen name as a formula.
fn csv_field(s: &str) -> String {
    let guarded = if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{s}")
    } else {
        s.to_string()
    };
    format!("\"{}\"", guarded.replace('"', "\"\""))
}

/// `x` rounded to millionths.
fn to_millionths(x: f64) -> f64 {
    (x * 1e6).round() / 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn unit(started_ms: i64, cores: f64, memory: u64) -> RunningUnit {
        RunningUnit {
            started_ms,
            cores,
            memory,
        }
    }

    fn total(hours: &[UsageHour]) -> UsageAmount {
        let mut t = UsageAmount::default();
        for h in hours {
            t.add(h.amount);
        }
        t
    }

    #[test]
    fn units_count_from_their_start_and_ended_ones_until_the_change_is_seen() {
        let t0 = 10 * HOUR_MS;
        let mut m = UsageMeter::default();
        let sched = unit(t0, 1.0, GIB);
        assert!(m.needs_accrual(&[sched]));
        assert!(m
            .accrue(t0 + 1_000, &[sched])
            .iter()
            .all(|h| h.start == 10 * HOUR_MS));
        // Two workers start at +10 s; seen at +12 s.
        let w1 = unit(t0 + 10_000, 2.0, 2 * GIB);
        let w2 = unit(t0 + 10_000, 2.0, 2 * GIB);
        let h = m.accrue(t0 + 12_000, &[sched, w1, w2]);
        let a = total(&h);
        // scheduler 11 s × 1 core + 2 workers × 2 s × 2 cores.
        assert!((a.core_seconds - (11.0 + 8.0)).abs() < 1e-9, "{a:?}");
        assert!(!m.needs_accrual(&[sched, w1, w2]));
        // One worker is gone at +20 s.
        let a = total(&m.accrue(t0 + 20_000, &[sched, w1]));
        assert!((a.core_seconds - (8.0 + 16.0 + 16.0)).abs() < 1e-9, "{a:?}");
        assert_eq!(m.cores, 3.0);
        assert_eq!(m.memory, 3.0 * GIB as f64);
        // Nothing more runs at +30 s.
        let a = total(&m.accrue(t0 + 30_000, &[]));
        assert!((a.core_seconds - 30.0).abs() < 1e-9, "{a:?}");
        assert!((a.memory_byte_seconds - 30.0 * GIB as f64).abs() < 1.0);
        assert!(!m.needs_accrual(&[]));
    }

    #[test]
    fn a_replacement_started_between_accruals_is_not_double_counted() {
        let mut m = UsageMeter::default();
        m.accrue(1_000, &[unit(1_000, 1.0, 0)]);
        // The old unit ended and a new one started at 5 s; the change is seen at once.
        let a = total(&m.accrue(5_000, &[unit(5_000, 1.0, 0)]));
        assert!((a.core_seconds - 4.0).abs() < 1e-9, "{a:?}");
        let a = total(&m.accrue(9_000, &[]));
        assert!((a.core_seconds - 4.0).abs() < 1e-9, "{a:?}");
    }

    #[test]
    fn use_is_split_at_hour_boundaries_and_windows_take_buckets_pro_rata() {
        let mut m = UsageMeter::default();
        let start = 5 * HOUR_MS - 30 * 60_000; // 4:30
        m.accrue(start, &[unit(start, 2.0, GIB)]);
        let delta = m.accrue(6 * HOUR_MS + 15 * 60_000, &[]); // 6:15
        let mut hours = Vec::new();
        merge_hours(&mut hours, &delta, 100);
        let starts: Vec<i64> = hours.iter().map(|h| h.start).collect();
        assert_eq!(starts, vec![4 * HOUR_MS, 5 * HOUR_MS, 6 * HOUR_MS]);
        assert!((hours[0].amount.core_seconds - 3600.0).abs() < 1e-6);
        assert!((hours[1].amount.core_seconds - 7200.0).abs() < 1e-6);
        assert!((hours[2].amount.core_seconds - 1800.0).abs() < 1e-6);
        // 5:00 to 6:00 exactly.
        let a = hours_within(&hours, 5 * HOUR_MS, 6 * HOUR_MS);
        assert!((a.core_seconds - 7200.0).abs() < 1e-6);
        // Everything.
        let a = hours_within(&hours, 0, i64::MAX);
        assert!((a.core_seconds - 2.0 * 1.75 * 3600.0).abs() < 1e-6);
        // A window cutting an hour takes its share of the span in which use accrued: 4:45 to
        // 6:05 is 15 + 60 + 5 minutes at 2 cores, although 4:00-4:30 and 6:15-7:00 had none.
        let a = hours_within(&hours, 4 * HOUR_MS + 45 * 60_000, 6 * HOUR_MS + 5 * 60_000);
        assert!((a.core_seconds - 2.0 * 80.0 * 60.0).abs() < 1e-6, "{a:?}");
    }

    #[test]
    fn pending_use_counts_the_running_rate_inside_the_window_only() {
        let mut m = UsageMeter::default();
        m.accrue(10_000, &[unit(10_000, 4.0, 0)]);
        assert_eq!(m.pending(20_000, 0, i64::MAX).core_seconds, 40.0);
        assert_eq!(m.pending(20_000, 15_000, i64::MAX).core_seconds, 20.0);
        assert_eq!(m.pending(20_000, 0, 12_000).core_seconds, 8.0);
        assert_eq!(m.pending(20_000, 30_000, 40_000).core_seconds, 0.0);
        assert_eq!(
            UsageMeter::default()
                .pending(20_000, 0, i64::MAX)
                .core_seconds,
            0.0
        );
    }

    #[test]
    fn bucket_lists_stay_bounded_and_keep_their_total() {
        let mut hours = Vec::new();
        let delta: Vec<UsageHour> = (0..10)
            .map(|i| UsageHour {
                start: i * HOUR_MS,
                amount: UsageAmount::of_rate(1.0, 0.0, HOUR_MS),
                first: i * HOUR_MS,
                last: (i + 1) * HOUR_MS,
            })
            .collect();
        merge_hours(&mut hours, &delta, 4);
        assert_eq!(hours.len(), 4);
        assert_eq!(hours[0].start, 0);
        assert!((total(&hours).core_seconds - 36_000.0).abs() < 1e-6);
    }

    #[test]
    fn reports_group_by_user_group_and_cluster() {
        let c = |cluster: &str, owner: &str, group: Option<&str>, created, cs| ClusterUsage {
            cluster: cluster.into(),
            owner: owner.into(),
            group: group.map(Into::into),
            created,
            amount: UsageAmount {
                core_seconds: cs,
                memory_byte_seconds: 0.0,
            },
            cores_now: 0.0,
            memory_now: 0.0,
        };
        let all = [
            c("a", "alice", None, 5, 10.0),
            c("b", "alice", Some("gpu"), 50, 30.0),
            c("c", "bob", Some("gpu"), 5, 0.0),
        ];
        let r = UsageReport::build(0, 20, UsageGrouping::User, &all);
        assert_eq!(r.rows.len(), 2);
        assert_eq!(r.rows[0].user.as_deref(), Some("alice"));
        assert_eq!(r.rows[0].core_seconds, 40.0);
        assert_eq!(r.rows[0].clusters_created, 1);
        assert_eq!(r.rows[0].clusters_active, 2);
        assert_eq!(r.rows[1].clusters_active, 0);
        let r = UsageReport::build(0, 100, UsageGrouping::Group, &all);
        assert_eq!(r.rows[0].group.as_deref(), Some("gpu"));
        assert_eq!(r.rows[0].clusters_created, 2);
        assert_eq!(r.rows[1].group, None);
        let r = UsageReport::build(0, 100, UsageGrouping::Cluster, &all);
        assert_eq!(r.rows.len(), 3);
        // Decimal fractions add up as written, not as binary floats do (0.30000000000000004).
        let mut scheduler = c("d", "carol", None, 5, 0.0);
        scheduler.cores_now = 0.1;
        let mut worker = c("e", "carol", None, 5, 0.0);
        worker.cores_now = 0.2;
        let r = UsageReport::build(0, 100, UsageGrouping::User, &[scheduler, worker]);
        assert_eq!(r.rows[0].cores_now.to_string(), "0.3");
    }

    #[test]
    fn csv_quotes_fields_and_defuses_formulas() {
        let r = UsageReport {
            since: 0,
            until: 1,
            by: UsageGrouping::User,
            rows: vec![UsageRow {
                user: Some("=cmd|\"x\"".into()),
                group: None,
                cluster: None,
                clusters_created: 1,
                clusters_active: 1,
                core_seconds: 1.5,
                memory_byte_seconds: 2.0,
                cores_now: 0.0,
                memory_now: 0.0,
            }],
        };
        let csv = r.to_csv();
        assert_eq!(
            csv.lines().nth(1).unwrap(),
            "\"'=cmd|\"\"x\"\"\",,,1,1,1.500,2,0,0"
        );
        assert_eq!(
            "cluster".parse::<UsageGrouping>(),
            Ok(UsageGrouping::Cluster)
        );
        assert!("users".parse::<UsageGrouping>().is_err());
    }
}

//! Durable state of the local backend: one SQLite file in the data directory.
//! Cluster records (with the scheduler's process identity), worker processes, events, and
//! usage (which outlives the cluster records: it is kept for the usage retention).
//!
//! Every change of a cluster's persistent record is written through before it becomes
//! visible, so a gateway killed at any moment restarts with what it had promised.

use crate::process::ProcessId;
use gateway_backend::ClusterSettings;
use gateway_model::usage::{hour_of, hours_within};
use gateway_model::{
    ClusterEvent, ClusterStatus, ClusterUsage, EventType, UsageAmount, UsageHour, UsageMeter,
};
use rusqlite::{params, Connection};
use serde_json::{Map, Value};
use std::path::Path;
use std::sync::Mutex;

/// Errors of the state store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("state database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// One cluster's stored record cannot be read back (a column edited or damaged by hand).
    #[error(
        "state database: the record of cluster {cluster} is damaged ({detail}); repair that \
         row, or delete it (`DELETE FROM clusters WHERE name = '{cluster}'`) after stopping \
         the cluster's processes"
    )]
    DamagedRecord {
        /// The cluster.
        cluster: String,
        /// The column and what is wrong with it.
        detail: String,
    },
}

/// Maps a decoding failure of column `index` to SQLite's conversion error.
fn decoded<T, E: std::error::Error + Send + Sync + 'static>(
    index: usize,
    value: Result<T, E>,
) -> rusqlite::Result<T> {
    value.map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(index, rusqlite::types::Type::Text, Box::new(e))
    })
}

/// The columns of a cluster record, in the order [`cluster_from_row`] reads them.
const CLUSTER_COLUMNS: [&str; 21] = [
    "name",
    "owner",
    "status",
    "reason",
    "final_status",
    "options",
    "settings",
    "token",
    "tls_cert",
    "tls_key",
    "scheduler_pid",
    "scheduler_ticks",
    "scheduler_address",
    "dashboard_address",
    "api_address",
    "target",
    "start_time",
    "stop_time",
    "pool",
    "heartbeat_period",
    "gateway_api_url",
];

/// One cluster record from a row of [`CLUSTER_COLUMNS`].
fn cluster_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ClusterRecord> {
    let pid: Option<i64> = r.get(10)?;
    let ticks: Option<i64> = r.get(11)?;
    Ok(ClusterRecord {
        name: r.get(0)?,
        owner: r.get(1)?,
        status: decoded(2, r.get::<_, String>(2)?.parse::<ClusterStatus>())?,
        reason: r.get(3)?,
        final_status: r
            .get::<_, Option<String>>(4)?
            .map(|s| decoded(4, s.parse::<ClusterStatus>()))
            .transpose()?,
        options: decoded(5, serde_json::from_str(&r.get::<_, String>(5)?))?,
        settings: decoded(6, serde_json::from_str(&r.get::<_, String>(6)?))?,
        token: r.get(7)?,
        tls_cert: r.get(8)?,
        tls_key: r.get(9)?,
        scheduler: pid.zip(ticks).map(|(pid, ticks)| ProcessId {
            pid: pid as u32,
            start_ticks: ticks as u64,
        }),
        scheduler_address: r.get(12)?,
        dashboard_address: r.get(13)?,
        api_address: r.get(14)?,
        target_workers: r.get::<_, i64>(15)?.max(0) as u64,
        start_time: r.get(16)?,
        stop_time: r.get(17)?,
        pool: r.get(18)?,
        heartbeat_period: r.get(19)?,
        gateway_api_url: r.get(20)?,
    })
}

/// The persistent part of a cluster.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterRecord {
    /// Cluster name.
    pub name: String,
    /// Owner's user name.
    pub owner: String,
    /// Current status.
    pub status: ClusterStatus,
    /// Why it failed or was stopped, for operators.
    pub reason: Option<String>,
    /// Status to reach when a STOPPING cluster has been torn down.
    pub final_status: Option<ClusterStatus>,
    /// Validated options as reported to the user.
    pub options: Map<String, Value>,
    /// Resolved settings.
    pub settings: ClusterSettings,
    /// Cluster API token.
    pub token: String,
    /// PEM certificate.
    pub tls_cert: String,
    /// PEM key.
    pub tls_key: String,
    /// The scheduler process, once started.
    pub scheduler: Option<ProcessId>,
    /// `tls://host:port` from the first heartbeat.
    pub scheduler_address: Option<String>,
    /// Dashboard `http://host:port`, if any.
    pub dashboard_address: Option<String>,
    /// Preload API `http://host:port`.
    pub api_address: Option<String>,
    /// Worker count the scheduler last asked for (clipped).
    pub target_workers: u64,
    /// Creation time in ms.
    pub start_time: i64,
    /// Terminal time in ms.
    pub stop_time: Option<i64>,
    /// The warm pool this unclaimed cluster belongs to (its owner is empty meanwhile).
    pub pool: Option<String>,
    /// Seconds between heartbeats its scheduler was started with (`--dg-heartbeat-period`):
    /// a later configuration may change the period, not what a running scheduler does. `None`
    /// in records of gateways that did not keep it (the configured period is assumed).
    pub heartbeat_period: Option<f64>,
    /// The gateway API URL its scheduler was started with (`DASK_GATEWAY_API_URL`), where its
    /// heartbeats go. `None` in records of gateways that did not keep it.
    pub gateway_api_url: Option<String>,
}

/// A stored worker process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerRecord {
    /// Cluster name.
    pub cluster: String,
    /// Worker `--name`.
    pub name: String,
    /// Its process.
    pub process: ProcessId,
}

/// Whose use a meter records.
#[derive(Clone, Copy, Debug)]
pub struct UsageKey<'a> {
    /// Cluster name.
    pub name: &'a str,
    /// Its owner.
    pub owner: &'a str,
    /// Its group policy.
    pub group: Option<&'a str>,
    /// When it was created (or claimed from the warm pool), ms since the Unix epoch.
    pub created: i64,
}

/// The SQLite store (one connection; every call is short).
pub struct Store {
    conn: Mutex<Connection>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS clusters (
    name TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    status TEXT NOT NULL,
    reason TEXT,
    final_status TEXT,
    options TEXT NOT NULL,
    settings TEXT NOT NULL,
    token TEXT NOT NULL,
    tls_cert TEXT NOT NULL,
    tls_key TEXT NOT NULL,
    scheduler_pid INTEGER,
    scheduler_ticks INTEGER,
    scheduler_address TEXT,
    dashboard_address TEXT,
    api_address TEXT,
    target INTEGER NOT NULL DEFAULT 0,
    start_time INTEGER NOT NULL,
    stop_time INTEGER,
    pool TEXT,
    heartbeat_period REAL,
    gateway_api_url TEXT
);
CREATE TABLE IF NOT EXISTS workers (
    cluster TEXT NOT NULL,
    name TEXT NOT NULL,
    pid INTEGER NOT NULL,
    ticks INTEGER NOT NULL,
    PRIMARY KEY (cluster, name)
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    cluster TEXT NOT NULL,
    time INTEGER NOT NULL,
    type TEXT NOT NULL,
    reason TEXT NOT NULL,
    message TEXT NOT NULL,
    source TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_cluster ON events (cluster, seq);
CREATE TABLE IF NOT EXISTS usage_meters (
    cluster TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    grp TEXT,
    created INTEGER NOT NULL,
    cores REAL NOT NULL,
    memory REAL NOT NULL,
    accounted_until INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_meters_by_owner ON usage_meters (owner);
CREATE TABLE IF NOT EXISTS write_probe (
    id INTEGER PRIMARY KEY,
    at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS usage_hours (
    cluster TEXT NOT NULL,
    hour INTEGER NOT NULL,
    core_seconds REAL NOT NULL,
    memory_byte_seconds REAL NOT NULL,
    first_ms INTEGER NOT NULL,
    last_ms INTEGER NOT NULL,
    PRIMARY KEY (cluster, hour)
);
";

/// Events kept per cluster; older ones are dropped as new ones come.
pub const EVENTS_PER_CLUSTER: i64 = 200;

/// Creates the tables, and adds the columns a database made by an older gateway lacks.
fn migrate(conn: &Connection) -> Result<(), StoreError> {
    conn.execute_batch(SCHEMA)?;
    for (column, kind) in [
        ("pool", "TEXT"),
        ("heartbeat_period", "REAL"),
        ("gateway_api_url", "TEXT"),
    ] {
        let has = conn
            .prepare("SELECT 1 FROM pragma_table_info('clusters') WHERE name = ?1")?
            .exists([column])?;
        if !has {
            conn.execute_batch(&format!("ALTER TABLE clusters ADD COLUMN {column} {kind}"))?;
        }
    }
    Ok(())
}

impl Store {
    /// Opens (creating if needed) the database at `path`, readable only by its owner.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let conn = Connection::open(path)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        }
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        migrate(&conn)?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    /// An in-memory store (tests).
    pub fn in_memory() -> Result<Store, StoreError> {
        let conn = Connection::open_in_memory()?;
        migrate(&conn)?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Inserts or replaces a cluster record.
    pub fn put_cluster(&self, c: &ClusterRecord) -> Result<(), StoreError> {
        let options = serde_json::to_string(&c.options).expect("options serialise");
        let settings = serde_json::to_string(&c.settings).expect("settings serialise");
        self.conn().execute(
            "INSERT OR REPLACE INTO clusters (name, owner, status, reason, final_status, options, settings, token,
                tls_cert, tls_key, scheduler_pid, scheduler_ticks, scheduler_address, dashboard_address,
                api_address, target, start_time, stop_time, pool, heartbeat_period, gateway_api_url)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19,
                ?20, ?21)",
            params![
                c.name,
                c.owner,
                c.status.as_str(),
                c.reason,
                c.final_status.map(|s| s.as_str()),
                options,
                settings,
                c.token,
                c.tls_cert,
                c.tls_key,
                c.scheduler.map(|p| p.pid as i64),
                c.scheduler.map(|p| p.start_ticks as i64),
                c.scheduler_address,
                c.dashboard_address,
                c.api_address,
                c.target_workers as i64,
                c.start_time,
                c.stop_time,
                c.pool,
                c.heartbeat_period,
                c.gateway_api_url,
            ],
        )?;
        Ok(())
    }

    /// Forgets a cluster and its workers.
    pub fn delete_cluster(&self, name: &str) -> Result<(), StoreError> {
        let conn = self.conn();
        conn.execute("DELETE FROM workers WHERE cluster = ?1", params![name])?;
        conn.execute("DELETE FROM events WHERE cluster = ?1", params![name])?;
        conn.execute("DELETE FROM clusters WHERE name = ?1", params![name])?;
        Ok(())
    }

    /// Appends an event to a cluster's history, dropping its oldest beyond
    /// [`EVENTS_PER_CLUSTER`].
    pub fn add_event(&self, cluster: &str, event: &ClusterEvent) -> Result<(), StoreError> {
        let conn = self.conn();
        let kind = match event.kind {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        };
        conn.execute(
            "INSERT INTO events (cluster, time, type, reason, message, source)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                cluster,
                event.time,
                kind,
                event.reason,
                event.message,
                event.source
            ],
        )?;
        conn.execute(
            "DELETE FROM events WHERE cluster = ?1 AND seq <= (
                SELECT seq FROM events WHERE cluster = ?1 ORDER BY seq DESC LIMIT 1 OFFSET ?2)",
            params![cluster, EVENTS_PER_CLUSTER],
        )?;
        Ok(())
    }

    /// A cluster's events, oldest first.
    pub fn events(&self, cluster: &str) -> Result<Vec<ClusterEvent>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT time, type, reason, message, source FROM events WHERE cluster = ?1 ORDER BY seq",
        )?;
        let rows = stmt.query_map(params![cluster], |r| {
            let kind: String = r.get(1)?;
            Ok(ClusterEvent {
                time: r.get(0)?,
                kind: if kind == "Warning" {
                    EventType::Warning
                } else {
                    EventType::Normal
                },
                reason: r.get(2)?,
                message: r.get(3)?,
                source: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Stores cluster `cluster`'s meter and adds `delta` to its hourly buckets, atomically.
    pub fn record_usage(
        &self,
        cluster: &UsageKey<'_>,
        meter: &UsageMeter,
        delta: &[UsageHour],
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT INTO usage_meters (cluster, owner, grp, created, cores, memory, accounted_until)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (cluster) DO UPDATE SET owner = excluded.owner, grp = excluded.grp,
                created = excluded.created, cores = excluded.cores, memory = excluded.memory,
                accounted_until = excluded.accounted_until",
            params![
                cluster.name,
                cluster.owner,
                cluster.group,
                cluster.created,
                meter.cores,
                meter.memory,
                meter.accounted_until
            ],
        )?;
        for h in delta {
            tx.execute(
                "INSERT INTO usage_hours
                    (cluster, hour, core_seconds, memory_byte_seconds, first_ms, last_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (cluster, hour) DO UPDATE SET
                    core_seconds = core_seconds + excluded.core_seconds,
                    memory_byte_seconds = memory_byte_seconds + excluded.memory_byte_seconds,
                    first_ms = MIN(first_ms, excluded.first_ms),
                    last_ms = MAX(last_ms, excluded.last_ms)",
                params![
                    cluster.name,
                    h.start,
                    h.amount.core_seconds,
                    h.amount.memory_byte_seconds,
                    h.first,
                    h.last
                ],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// A cluster's stored meter (none: it never accrued anything).
    pub fn usage_meter(&self, cluster: &str) -> Result<Option<UsageMeter>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT cores, memory, accounted_until FROM usage_meters WHERE cluster = ?1",
        )?;
        let mut rows = stmt.query_map(params![cluster], |r| {
            Ok(UsageMeter {
                cores: r.get(0)?,
                memory: r.get(1)?,
                accounted_until: r.get(2)?,
            })
        })?;
        Ok(rows.next().transpose()?)
    }

    /// Every cluster's use within `[since, until)` (only `owner`'s, if given), with `now_ms`
    /// as the present; clusters that neither used anything nor were created in the window are
    /// left out.
    pub fn usage(
        &self,
        owner: Option<&str>,
        since: i64,
        until: i64,
        now_ms: i64,
    ) -> Result<Vec<ClusterUsage>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT cluster, owner, grp, created, cores, memory, accounted_until FROM usage_meters
             WHERE (?1 IS NULL OR owner = ?1) ORDER BY created, cluster",
        )?;
        let meters = stmt
            .query_map(params![owner], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<String>>(2)?,
                    r.get::<_, i64>(3)?,
                    UsageMeter {
                        cores: r.get(4)?,
                        memory: r.get(5)?,
                        accounted_until: r.get(6)?,
                    },
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        let mut hours_of = conn.prepare(
            "SELECT hour, core_seconds, memory_byte_seconds, first_ms, last_ms FROM usage_hours
             WHERE cluster = ?1 AND hour >= ?2 AND hour < ?3 ORDER BY hour",
        )?;
        let mut out = Vec::new();
        for (cluster, owner, group, created, meter) in meters {
            let hours = hours_of
                .query_map(params![cluster, hour_of(since), until], |r| {
                    Ok(UsageHour {
                        start: r.get(0)?,
                        amount: UsageAmount {
                            core_seconds: r.get(1)?,
                            memory_byte_seconds: r.get(2)?,
                        },
                        first: r.get(3)?,
                        last: r.get(4)?,
                    })
                })?
                .collect::<Result<Vec<_>, _>>()?;
            let mut amount = hours_within(&hours, since, until);
            amount.add(meter.pending(now_ms, since, until));
            let created_within = (since..until).contains(&created);
            if amount == UsageAmount::default() && !created_within {
                continue;
            }
            out.push(ClusterUsage {
                cluster,
                owner,
                group,
                created,
                amount,
                cores_now: meter.cores,
                memory_now: meter.memory,
            });
        }
        Ok(out)
    }

    /// Forgets usage from before `cutoff_ms`: older hourly buckets, and the meters of clusters
    /// that have stopped with nothing newer left.
    pub fn forget_usage_before(&self, cutoff_ms: i64) -> Result<(), StoreError> {
        let conn = self.conn();
        conn.execute(
            "DELETE FROM usage_hours WHERE hour < ?1",
            params![hour_of(cutoff_ms)],
        )?;
        conn.execute(
            "DELETE FROM usage_meters WHERE cores = 0 AND memory = 0 AND accounted_until < ?1
                AND NOT EXISTS (SELECT 1 FROM usage_hours h WHERE h.cluster = usage_meters.cluster)",
            params![cutoff_ms],
        )?;
        Ok(())
    }

    /// Records a started worker process.
    pub fn put_worker(&self, w: &WorkerRecord) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT OR REPLACE INTO workers (cluster, name, pid, ticks) VALUES (?1, ?2, ?3, ?4)",
            params![
                w.cluster,
                w.name,
                w.process.pid as i64,
                w.process.start_ticks as i64
            ],
        )?;
        Ok(())
    }

    /// Forgets a worker process.
    pub fn delete_worker(&self, cluster: &str, name: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "DELETE FROM workers WHERE cluster = ?1 AND name = ?2",
            params![cluster, name],
        )?;
        Ok(())
    }

    /// Every stored cluster, oldest first. A record that cannot be read back is an error
    /// naming its cluster and column ([`StoreError::DamagedRecord`]).
    pub fn load_clusters(&self) -> Result<Vec<ClusterRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {} FROM clusters ORDER BY start_time",
            CLUSTER_COLUMNS.join(", ")
        ))?;
        let mut rows = stmt.query([])?;
        let mut records = Vec::new();
        while let Some(row) = rows.next()? {
            let name = match row.get_ref(0)? {
                rusqlite::types::ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned(),
                other => format!("{other:?}"),
            };
            let record = cluster_from_row(row).map_err(|e| StoreError::DamagedRecord {
                cluster: name,
                detail: match &e {
                    rusqlite::Error::FromSqlConversionFailure(i, _, why) => {
                        format!("column {}: {why}", CLUSTER_COLUMNS[*i])
                    }
                    rusqlite::Error::InvalidColumnType(i, _, found) => {
                        format!(
                            "column {}: {found} where it should not be",
                            CLUSTER_COLUMNS[*i]
                        )
                    }
                    rusqlite::Error::IntegralValueOutOfRange(i, v) => {
                        format!("column {}: {v} is out of range", CLUSTER_COLUMNS[*i])
                    }
                    other => other.to_string(),
                },
            })?;
            records.push(record);
        }
        Ok(records)
    }

    /// Stored workers of one cluster.
    pub fn load_workers(&self, cluster: &str) -> Result<Vec<WorkerRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT name, pid, ticks FROM workers WHERE cluster = ?1")?;
        let rows = stmt.query_map(params![cluster], |r| {
            Ok(WorkerRecord {
                cluster: cluster.to_string(),
                name: r.get(0)?,
                process: ProcessId {
                    pid: r.get::<_, i64>(1)? as u32,
                    start_ticks: r.get::<_, i64>(2)? as u64,
                },
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// A trivial query: does the database answer?
    pub fn ping(&self) -> Result<(), StoreError> {
        self.conn().query_row("SELECT 1", [], |_| Ok(()))?;
        Ok(())
    }

    /// Whether the database takes a write now (one row, rewritten in place): a full disk, a
    /// read-only or damaged file fails it where a read would pass.
    pub fn probe_write(&self) -> Result<(), StoreError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        self.conn().execute(
            "INSERT OR REPLACE INTO write_probe (id, at) VALUES (1, ?1)",
            params![now],
        )?;
        Ok(())
    }

    /// Whether a cluster is stored (tests).
    #[cfg(test)]
    fn has_cluster(&self, name: &str) -> Result<bool, StoreError> {
        use rusqlite::OptionalExtension;
        Ok(self
            .conn()
            .query_row(
                "SELECT 1 FROM clusters WHERE name = ?1",
                params![name],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_outlives_the_cluster_record_and_a_reopened_store() {
        use gateway_model::usage::HOUR_MS;
        use gateway_model::RunningUnit;
        let dir = std::env::temp_dir().join(format!("dgrs-usage-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.db");
        let t0 = 100 * HOUR_MS;
        {
            let store = Store::open(&path).unwrap();
            let key = UsageKey {
                name: "a",
                owner: "alice",
                group: Some("gpu"),
                created: t0,
            };
            let mut meter = UsageMeter::default();
            let unit = RunningUnit {
                started_ms: t0,
                cores: 2.0,
                memory: 1 << 30,
            };
            let delta = meter.accrue(t0, &[unit]);
            store.record_usage(&key, &meter, &delta).unwrap();
            // Ran 90 minutes: across an hour boundary.
            let second = RunningUnit {
                started_ms: t0 + 90 * 60_000,
                ..unit
            };
            let delta = meter.accrue(t0 + 90 * 60_000, &[unit, second]);
            store.record_usage(&key, &meter, &delta).unwrap();
            store.put_cluster(&record("a")).unwrap();
            store.delete_cluster("a").unwrap();
        }
        let store = Store::open(&path).unwrap();
        let now = t0 + 100 * 60_000;
        let all = store.usage(None, 0, i64::MAX, now).unwrap();
        assert_eq!(all.len(), 1);
        let a = &all[0];
        assert_eq!(
            (a.owner.as_str(), a.group.as_deref()),
            ("alice", Some("gpu"))
        );
        // 90 min × 2 cores, then 10 min × 4 cores still running (not yet in any bucket).
        assert!((a.amount.core_seconds - (5400.0 * 2.0 + 600.0 * 4.0)).abs() < 1e-6);
        assert_eq!(a.cores_now, 4.0);
        // The second hour only: 30 min × 2 cores + 10 min × 4 cores.
        let second = store
            .usage(None, t0 + HOUR_MS, t0 + 2 * HOUR_MS, now)
            .unwrap();
        assert!((second[0].amount.core_seconds - (1800.0 * 2.0 + 600.0 * 4.0)).abs() < 1e-6);
        assert!(store
            .usage(Some("bob"), 0, i64::MAX, now)
            .unwrap()
            .is_empty());
        assert!(store.usage(None, 0, t0 - 1, now).unwrap().is_empty());
        assert_eq!(store.usage_meter("a").unwrap().unwrap().cores, 4.0);
        // A running cluster's meter stays when its old buckets go.
        store.forget_usage_before(t0 + 2 * HOUR_MS).unwrap();
        assert!(store.usage_meter("a").unwrap().is_some());
        let later = store.usage(None, 0, i64::MAX, now).unwrap();
        assert!((later[0].amount.core_seconds - 2400.0).abs() < 1e-6);
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn events_are_kept_in_order_bounded_and_go_with_the_cluster() {
        let store = Store::in_memory().unwrap();
        let event = |i: i64| {
            ClusterEvent::new(
                i,
                EventType::Normal,
                "WorkersStarting",
                format!("#{i}"),
                "gateway",
            )
        };
        for i in 0..EVENTS_PER_CLUSTER + 10 {
            store.add_event("a", &event(i)).unwrap();
        }
        let mut warning = event(1000);
        warning.kind = EventType::Warning;
        store.add_event("b", &warning).unwrap();
        let a = store.events("a").unwrap();
        assert_eq!(a.len() as i64, EVENTS_PER_CLUSTER);
        assert_eq!(a.first().unwrap().message, "#10", "the oldest are dropped");
        assert_eq!(
            a.last().unwrap().message,
            format!("#{}", EVENTS_PER_CLUSTER + 9)
        );
        assert_eq!(store.events("b").unwrap(), vec![warning]);
        store.delete_cluster("a").unwrap();
        assert!(store.events("a").unwrap().is_empty());
        assert_eq!(store.events("b").unwrap().len(), 1);
    }

    pub(crate) fn record(name: &str) -> ClusterRecord {
        ClusterRecord {
            name: name.into(),
            owner: "alice@example.com".into(),
            status: ClusterStatus::Pending,
            reason: None,
            final_status: None,
            options: Map::new(),
            settings: ClusterSettings::example(),
            token: "t".into(),
            tls_cert: "c".into(),
            tls_key: "k".into(),
            scheduler: None,
            scheduler_address: None,
            dashboard_address: None,
            api_address: None,
            target_workers: 0,
            start_time: 5,
            stop_time: None,
            pool: None,
            heartbeat_period: Some(15.0),
            gateway_api_url: Some("http://127.0.0.1:8000/api".into()),
        }
    }

    #[test]
    fn a_database_of_an_older_gateway_gets_the_new_columns() {
        let dir = std::env::temp_dir().join(format!("store-migrate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("old.sqlite");
        let _ = std::fs::remove_file(&path);
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(&SCHEMA.replace(
                ",\n    pool TEXT,\n    heartbeat_period REAL,\n    gateway_api_url TEXT",
                "",
            ))
            .unwrap();
            let columns = conn
                .prepare("SELECT 1 FROM pragma_table_info('clusters') WHERE name IN ('pool', 'heartbeat_period', 'gateway_api_url')")
                .unwrap()
                .exists([])
                .unwrap();
            assert!(!columns, "the old schema has none of the new columns");
            conn.execute(
                "INSERT INTO clusters (name, owner, status, options, settings, token, tls_cert, tls_key, start_time)
                 VALUES ('old', 'bob', 'RUNNING', '{}', ?1, 't', 'c', 'k', 1)",
                [serde_json::to_string(&ClusterSettings::example()).unwrap()],
            )
            .unwrap();
        }
        let store = Store::open(&path).unwrap();
        let [old] = &store.load_clusters().unwrap()[..] else {
            panic!("the old row")
        };
        assert_eq!(
            (
                old.pool.as_deref(),
                old.heartbeat_period,
                old.gateway_api_url.as_deref()
            ),
            (None, None, None)
        );
        store.delete_cluster("old").unwrap();
        let mut c = record("a");
        c.pool = Some("k".into());
        store.put_cluster(&c).unwrap();
        assert_eq!(store.load_clusters().unwrap(), vec![c]);
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_write_probe_fails_where_reads_still_pass() {
        let store = Store::in_memory().unwrap();
        store.probe_write().unwrap();
        store.probe_write().unwrap();
        // As a full disk or a read-only file would: reads pass, writes fail.
        store
            .conn()
            .pragma_update(None, "query_only", true)
            .unwrap();
        store.ping().unwrap();
        assert!(store.probe_write().is_err());
    }

    #[test]
    fn a_corrupt_row_is_an_error_not_a_panic() {
        let store = Store::in_memory().unwrap();
        store.put_cluster(&record("a")).unwrap();
        store
            .conn()
            .execute("UPDATE clusters SET status = 'SIDEWAYS'", [])
            .unwrap();
        let err = store.load_clusters().unwrap_err().to_string();
        assert!(
            err.contains("the record of cluster a is damaged (column status: 'SIDEWAYS' is not a valid ClusterStatus)"),
            "{err}"
        );
        assert!(err.contains("WHERE name = 'a'"), "{err}");
        // Any column, any kind of damage: the cluster and the column are named.
        for (column, bad, wanted) in [
            ("settings", "'{'", "column settings: "),
            ("options", "'[1]'", "column options: "),
            ("owner", "x'ff'", "column owner: "),
            ("target", "'many'", "column target: "),
        ] {
            let store = Store::in_memory().unwrap();
            store.put_cluster(&record("b")).unwrap();
            store
                .conn()
                .execute(&format!("UPDATE clusters SET {column} = {bad}"), [])
                .unwrap();
            let err = store.load_clusters().unwrap_err().to_string();
            assert!(err.contains("cluster b is damaged"), "{column}: {err}");
            assert!(err.contains(wanted), "{column}: {err}");
        }
    }

    #[test]
    fn round_trips_clusters_and_workers() {
        let store = Store::in_memory().unwrap();
        let mut c = record("a");
        store.put_cluster(&c).unwrap();
        c.status = ClusterStatus::Running;
        c.scheduler = Some(ProcessId {
            pid: 42,
            start_ticks: 7,
        });
        c.scheduler_address = Some("tls://127.0.0.1:1".into());
        c.target_workers = 3;
        store.put_cluster(&c).unwrap();
        assert_eq!(store.load_clusters().unwrap(), vec![c.clone()]);
        let w = WorkerRecord {
            cluster: "a".into(),
            name: "w1".into(),
            process: ProcessId {
                pid: 43,
                start_ticks: 8,
            },
        };
        store.put_worker(&w).unwrap();
        assert_eq!(store.load_workers("a").unwrap(), vec![w]);
        store.delete_worker("a", "w1").unwrap();
        assert!(store.load_workers("a").unwrap().is_empty());
        store.delete_cluster("a").unwrap();
        assert!(!store.has_cluster("a").unwrap());
    }
}

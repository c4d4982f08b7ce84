//! Opening the local backend: its data directory (modes for the isolation in use, locked
//! against a second gateway), the SQLite store (the gateway's alone), the launcher and the
//! engine, which re-adopts the stored clusters.

use crate::engine::{EngineConfig, LocalBackend};
use crate::identity::{Identities, Isolation};
use crate::launch::{DaskLaunch, ForkConfig, LaunchConfig, Launcher};
use crate::store::{Store, StoreError};
use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tracing::info;

/// What the local backend needs to start.
#[derive(Clone, Debug)]
pub struct LocalSetup {
    /// The data directory: `gateway.sqlite`, `gateway.lock`, `clusters/<name>/`,
    /// `forkserver/`.
    pub data_dir: PathBuf,
    /// Which accounts users' processes run as.
    pub isolation: Isolation,
    /// The `dask` command, its `PATH` and the API URL schedulers report to.
    pub dask: DaskLaunch,
    /// Fork processes from a pre-imported Python (only without user isolation: the server
    /// runs as the gateway's account).
    pub fork_server: bool,
    /// Modules the fork server imports ahead.
    pub preimport: Vec<String>,
    /// The engine's timing and failure rules (the launcher takes the clusters' timing from it
    /// too).
    pub engine: EngineConfig,
}

/// Why the local backend could not start.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The data directory is unusable.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Another gateway already uses this data directory.
    #[error("another gateway-server is already using the data directory {0}")]
    Locked(PathBuf),
    /// User isolation cannot work as configured.
    #[error("{0}")]
    Isolation(String),
    /// The state database failed (opening it, or loading the stored clusters).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The data directory holds clusters but no state database: starting would forget them
    /// and stop their processes.
    #[error(
        "{db} is missing, but {clusters} holds the directories of {count} cluster(s): the state \
         database was lost or moved. Put it back; or, to start afresh and stop those clusters, \
         remove {clusters}"
    )]
    DatabaseMissing {
        /// Where the database should be.
        db: PathBuf,
        /// The clusters' directories.
        clusters: PathBuf,
        /// How many there are.
        count: usize,
    },
}

/// A started local backend, and the lock that keeps its data directory its own: hold it for
/// the life of the process.
pub struct OpenedBackend {
    /// The backend.
    pub backend: Arc<LocalBackend>,
    /// The exclusive `flock` on `<data_dir>/gateway.lock`.
    pub lock: File,
}

fn dir_error(path: &Path) -> impl FnOnce(std::io::Error) -> SetupError {
    let path = path.to_path_buf();
    move |source| SetupError::DataDir { path, source }
}

/// Takes an exclusive `flock` on `<dir>/gateway.lock`.
fn lock_data_dir(dir: &Path) -> Result<File, SetupError> {
    let path = dir.join("gateway.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(dir_error(&path))?;
    // SAFETY: flock on a descriptor we own.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(SetupError::Locked(dir.to_path_buf()));
    }
    Ok(file)
}

/// Creates the data directory with the modes `isolated` needs, and checks that users'
/// processes can reach it when they run under their own accounts.
fn prepare_data_dir(data_dir: &Path, isolated: bool) -> Result<(), SetupError> {
    use std::os::unix::fs::DirBuilderExt;
    // With isolation users' processes pass through the data directory to their own cluster
    // directory (0711: no listing); everything else in it stays the gateway's (0600 files).
    let mode = if isolated { 0o711 } else { 0o700 };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(data_dir)
        .map_err(dir_error(data_dir))?;
    if !isolated {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(SetupError::Isolation(
            "user isolation (dask.isolation) needs the gateway to run as root, to start \
             processes under users' accounts"
                .into(),
        ));
    }
    std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(mode))
        .map_err(dir_error(data_dir))?;
    for dir in data_dir.ancestors().skip(1) {
        let meta = std::fs::metadata(dir).map_err(dir_error(dir))?;
        if meta.permissions().mode() & 0o001 == 0 {
            return Err(SetupError::Isolation(format!(
                "user isolation: users' processes cannot reach the data directory {} because \
                 {} is not searchable by others (mode {:o}); choose a data_dir such as \
                 /var/lib/dask-gateway-rs",
                data_dir.display(),
                dir.display(),
                meta.permissions().mode() & 0o777
            )));
        }
    }
    Ok(())
}

/// A data directory whose state database is gone but whose clusters are not: opening it would
/// make an empty database, and the engine would stop every process no record accounts for.
fn refuse_clusters_without_database(db: &Path, clusters: &Path) -> Result<(), SetupError> {
    if db.exists() {
        return Ok(());
    }
    let count = match std::fs::read_dir(clusters) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .count(),
        Err(_) => 0,
    };
    if count == 0 {
        return Ok(());
    }
    Err(SetupError::DatabaseMissing {
        db: db.to_path_buf(),
        clusters: clusters.to_path_buf(),
        count,
    })
}

/// Opens the local backend in `setup.data_dir` and starts its engine (which re-adopts the
/// stored clusters). Must run inside a Tokio runtime.
pub fn open(setup: LocalSetup) -> Result<OpenedBackend, SetupError> {
    let data_dir = setup.data_dir.clone();
    let isolated = setup.isolation != Isolation::Shared;
    prepare_data_dir(&data_dir, isolated)?;
    let identities = Arc::new(
        Identities::new(setup.isolation.clone())
            .map_err(|e| SetupError::Isolation(e.to_string()))?,
    );
    let lock = lock_data_dir(&data_dir)?;
    let db = data_dir.join("gateway.sqlite");
    refuse_clusters_without_database(&db, &data_dir.join("clusters"))?;
    let store = Store::open(&db)?;
    // The database holds every cluster's token and key: the gateway's alone.
    for suffix in ["", "-wal", "-shm"] {
        let path = PathBuf::from(format!("{}{suffix}", db.display()));
        if path.exists() {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .map_err(dir_error(&path))?;
        }
    }
    let (exit_tx, exit_rx) = tokio::sync::mpsc::unbounded_channel();
    let launcher = Launcher::new(
        LaunchConfig {
            work_root: data_dir.join("clusters"),
            dask: setup.dask,
            bind_host: "127.0.0.1".into(),
            timing: setup.engine.timing,
            identities,
            // The server runs as the gateway's account and its children inherit what it
            // imported: with user isolation that account is root, and a Python environment a
            // user can write to would run their code as root. Isolated processes are exec'd.
            fork: (setup.fork_server && !isolated).then(|| ForkConfig {
                dir: data_dir.join("forkserver"),
                preimport: setup.preimport,
            }),
        },
        exit_tx,
    );
    let backend = LocalBackend::start(setup.engine, store, Arc::new(launcher), exit_rx)?;
    if isolated {
        info!(data_dir = %data_dir.display(), "local process backend ready; each user's processes run under their own uid");
    } else {
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        info!(data_dir = %data_dir.display(), uid, "local process backend ready in single-user mode: every cluster runs as this gateway's account, so users of one gateway can read each other's cluster credentials; set dask.isolation on a machine shared by several users");
    }
    Ok(OpenedBackend { backend, lock })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clusters_without_their_database_are_refused_not_forgotten() {
        let dir = std::env::temp_dir().join(format!("dgrs-setup-nodb-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (db, clusters) = (dir.join("gateway.sqlite"), dir.join("clusters"));
        // A fresh data directory, and one with an empty clusters directory, are fine.
        refuse_clusters_without_database(&db, &clusters).unwrap();
        std::fs::create_dir_all(&clusters).unwrap();
        refuse_clusters_without_database(&db, &clusters).unwrap();
        std::fs::create_dir_all(clusters.join("0123abcd")).unwrap();
        let err = refuse_clusters_without_database(&db, &clusters).unwrap_err();
        assert!(matches!(err, SetupError::DatabaseMissing { count: 1, .. }));
        assert!(
            err.to_string().contains("gateway.sqlite is missing"),
            "{err}"
        );
        // With its database, the same directory opens.
        std::fs::write(&db, b"").unwrap();
        refuse_clusters_without_database(&db, &clusters).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

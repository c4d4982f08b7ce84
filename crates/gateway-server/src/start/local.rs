//! Starting the local process backend from the configuration: the `dask` section, user
//! isolation and the cluster timing, handed to [`gateway_local::setup`] (which prepares and
//! locks the data directory).

use super::StartError;
use crate::config::{GatewayConfig, IsolationKind};
use gateway_backend::ClusterBackend;
use gateway_local::{DaskLaunch, EngineConfig, Isolation};
use std::sync::Arc;
use std::time::Duration;

/// Starts the local process backend (see [`gateway_local::setup`]) from the configuration.
pub(crate) fn start_local_backend(
    config: &GatewayConfig,
) -> Result<(Arc<dyn ClusterBackend>, std::fs::File), StartError> {
    let data_dir = config.data_dir();
    let isolation = match config.dask.isolation {
        IsolationKind::None => Isolation::Shared,
        IsolationKind::SystemUsers => Isolation::SystemUsers,
        IsolationKind::UidRange => Isolation::UidRange {
            first: config.dask.uid_range.first,
            count: config.dask.uid_range.count,
            map_file: data_dir.join("uids.json"),
        },
    };
    let (command, path_prefix) = config.dask.command_and_path();
    let opened = gateway_local::setup::open(gateway_local::LocalSetup {
        data_dir,
        isolation,
        dask: DaskLaunch {
            command,
            path_prefix,
            api_url: config.api_url(),
        },
        fork_server: config.dask.fork_server,
        preimport: config.dask.preimport.clone(),
        engine: EngineConfig {
            timing: config.cluster.timing(),
            retention: Duration::from_secs_f64(config.cluster.retention),
            usage_retention: Duration::from_secs_f64(config.usage_retention),
            api_url: Some(config.api_url()),
            ..EngineConfig::default()
        },
    })?;
    Ok((opened.backend, opened.lock))
}

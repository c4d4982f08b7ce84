//! The Kubernetes backend: every user's Dask cluster as pods.
//!
//! * [`crd`]: the `DaskCluster` custom resource (`dask-gateway-rs.io/v1alpha1`), with a structural
//!   schema generated from its Rust types (`crdgen` writes it to `manifests/`).
//! * [`backend`]: [`KubeBackend`], the gateway side. No state of its own: it creates
//!   DaskClusters, reads them (and their credentials) from watch caches, and patches the spec on
//!   heartbeats (`replicas`, `retiredWorkers`) and stops (`active: false`).
//! * [`controller`]: one level-triggered reconcile per DaskCluster that makes the credentials
//!   Secret, the scheduler Pod and Service, and the worker Pods, and reports the status.
//! * [`build`]: the pure builders of those objects; [`names`]: their names and labels.
//! * [`runtime`]: the controller's watch caches and kube-runtime loop, under [`leader`] election
//!   so that one replica reconciles; [`limiter`]: the token bucket pacing its writes, the clusters
//!   taking turns.
//! * [`events`]: a cluster's Kubernetes Events (its DaskCluster's and its pods'), read on
//!   demand, and recording new ones on the DaskCluster.
//! * [`metrics`]: the controller's metric families (its counters, whether this process leads).
//! * [`client`]: the Kubernetes client, over HTTP/2 where the API server offers it.
//! * [`config`]: the `kubernetes:` section of the gateway configuration.
//! * [`lean`]: pods as the controller's cache decodes them (without `managedFields`).
//! * [`session_key`]: the session-cookie key the replicas share through a Secret.

#![warn(missing_docs)]

pub mod backend;
pub mod build;
pub mod client;
pub mod config;
pub mod controller;
pub mod crd;
pub mod events;
pub mod leader;
pub mod lean;
pub mod limiter;
pub mod metrics;
#[cfg(test)]
mod mock_api;
pub mod names;
pub mod pod_cache;
pub mod quantity;
pub mod quota_lock;
pub mod runtime;
pub mod session_key;

pub use backend::{GatewayRuntime, KubeBackend};
pub use config::{KubeConfig, Profile};
pub use crd::{DaskCluster, DaskClusterSpec, DaskClusterStatus, Phase, PodTemplate};
pub use metrics::LiveContext;
pub use runtime::{check_crd, run_controller, ControllerError, CrdError};
pub use session_key::{installation_owner, shared_session_key, SessionKeyError};

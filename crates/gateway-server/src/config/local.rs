//! The local backend's section (`dask`): where the `dask` command comes from, the fork server,
//! and which accounts users' processes run as.

use super::ConfigError;
use serde::Deserialize;
use std::path::PathBuf;

/// Where the `dask` command comes from.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaskConfig {
    /// A venv or conda prefix: `<env>/bin/dask` is used and `<env>/bin` leads `PATH`.
    pub python_env: Option<PathBuf>,
    /// The command when `python_env` is unset (default `dask`, found on `PATH`).
    pub command: Option<PathBuf>,
    /// Which account runs each user's processes: `none` (all as the gateway's account, the
    /// single-user default), `system-users` (the system account named like the user) or
    /// `uid-range` (a uid of their own from `uid_range`). Isolation needs a root gateway.
    pub isolation: IsolationKind,
    /// The uids `uid-range` isolation hands out.
    pub uid_range: UidRange,
    /// Start workers and schedulers by forking them from a long-lived Python per environment
    /// that has imported `distributed` already (default on); off starts each by exec.
    pub fork_server: bool,
    /// Modules the fork server imports ahead besides `distributed` (e.g. `numpy`, `pandas`).
    pub preimport: Vec<String>,
}

/// A dotted Python module name: `numpy`, `dask.dataframe`.
fn is_module_name(name: &str) -> bool {
    name.split('.').all(|part| {
        let mut chars = part.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
    })
}

impl Default for DaskConfig {
    fn default() -> Self {
        DaskConfig {
            python_env: None,
            command: None,
            isolation: IsolationKind::default(),
            uid_range: UidRange::default(),
            fork_server: true,
            preimport: Vec::new(),
        }
    }
}

/// How the local backend isolates users from each other.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IsolationKind {
    /// Every cluster runs as the gateway's own account.
    #[default]
    None,
    /// Each user runs as the system account of the same name.
    SystemUsers,
    /// Each user runs under a uid of their own from `uid_range`.
    UidRange,
}

/// A range of uids (and equal gids) for `uid-range` isolation.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UidRange {
    /// First uid.
    pub first: u32,
    /// How many.
    pub count: u32,
}

impl Default for UidRange {
    fn default() -> Self {
        UidRange {
            first: 200_000,
            count: 65_536,
        }
    }
}

impl DaskConfig {
    /// Checks what serde cannot: the fork server's modules are module names.
    pub(super) fn check(&self) -> Result<(), ConfigError> {
        if let Some(bad_name) = self.preimport.iter().find(|m| !is_module_name(m)) {
            return Err(ConfigError::Invalid(format!(
                "dask.preimport: {bad_name:?} is not a Python module name (like numpy or dask.dataframe)"
            )));
        }
        Ok(())
    }

    /// The `dask` executable and the directory to put first on `PATH`.
    pub fn command_and_path(&self) -> (PathBuf, Option<PathBuf>) {
        match (&self.python_env, &self.command) {
            (_, Some(cmd)) => (cmd.clone(), self.python_env.as_ref().map(|e| e.join("bin"))),
            (Some(env), None) => (env.join("bin").join("dask"), Some(env.join("bin"))),
            (None, None) => ("dask".into(), None),
        }
    }
}

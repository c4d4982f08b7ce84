//! Process identity, signalling and exit watching (Linux `/proc`).

use std::time::Duration;
use tokio::sync::mpsc;

/// A process we started: its pid plus its start time in clock ticks since boot, which together
/// survive pid reuse (a different process with the same pid has a different start time).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ProcessId {
    /// Kernel process id (also the process-group id: each runs in its own group).
    pub pid: u32,
    /// Field 22 of `/proc/<pid>/stat`.
    pub start_ticks: u64,
}

/// Which part of a cluster a process is.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ProcessRole {
    /// The Dask scheduler.
    Scheduler,
    /// A Dask worker, by its `--name`.
    Worker(String),
}

/// Reported once when a watched process has exited.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessExit {
    /// Cluster name.
    pub cluster: String,
    /// Scheduler or which worker.
    pub role: ProcessRole,
    /// The process.
    pub id: ProcessId,
    /// Exit code when known (our own children), a signal as its negative number (`-9`:
    /// SIGKILL); `None` for adopted processes, whose end is only seen in `/proc`.
    pub code: Option<i32>,
}

/// Reads state and start time of `pid` from `/proc`; `None` if there is no such process.
fn stat(pid: u32) -> Option<(char, u64)> {
    stat_fields(pid).map(|(state, _, start)| (state, start))
}

/// State, process group and start time of `pid`.
fn stat_fields(pid: u32) -> Option<(char, u32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: parse after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let group = fields.get(2)?.parse().ok()?; // field 5 overall
    let start = fields.get(19)?.parse().ok()?; // field 22 overall
    Some((state, group, start))
}

impl ProcessId {
    /// Identifies a running process by pid (reads its start time).
    pub fn of(pid: u32) -> Option<ProcessId> {
        stat(pid).map(|(_, start_ticks)| ProcessId { pid, start_ticks })
    }

    /// True while this exact process exists and is not a zombie.
    pub fn is_alive(&self) -> bool {
        matches!(stat(self.pid), Some((state, start)) if start == self.start_ticks && state != 'Z' && state != 'X')
    }

    /// Sends `signal` to the process group this process leads (only if it is still ours).
    pub fn signal_group(&self, signal: i32) {
        if self.is_alive() {
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe {
                libc::kill(-(self.pid as i32), signal);
                libc::kill(self.pid as i32, signal);
            }
        }
    }

    /// After this process has exited: SIGKILL whatever is left in its process group (e.g. the
    /// worker process of a `dask worker` nanny that was killed). Call it right after the exit
    /// is seen, while the group id cannot have been reused.
    pub fn kill_remnants(&self) {
        if !self.is_alive() {
            // SAFETY: kill(2) has no memory-safety preconditions; ESRCH for an empty group is fine.
            unsafe {
                libc::kill(-(self.pid as i32), libc::SIGKILL);
            }
        }
    }

    /// SIGTERM to the group, then SIGKILL after `grace` if it is still alive.
    pub async fn terminate(&self, grace: Duration) {
        self.signal_group(libc::SIGTERM);
        let deadline = tokio::time::Instant::now() + grace;
        while self.is_alive() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if self.is_alive() {
            self.signal_group(libc::SIGKILL);
        } else {
            // The leader is gone; make sure helpers it left in its group go too.
            self.kill_remnants();
        }
    }
}

/// The environment variable every scheduler and worker gets whose value is a path inside its
/// cluster's directory (its CA file). Processes they start inherit it, wherever they go.
pub const CLUSTER_PATH_VARIABLE: &str = "DASK_DISTRIBUTED__COMM__TLS__CA_FILE";

/// Live process-group leaders of `root/<cluster>/`, with the cluster name: those whose working
/// directory is inside it, or whose environment at start named a path inside it
/// ([`CLUSTER_PATH_VARIABLE`], inherited by what they start). Every scheduler and worker this
/// backend starts is one, and so is a process they start in a session of its own that then
/// changes directory. Used after a restart to find processes the state store does not know
/// (e.g. started just before a crash), and at a stop for what the cluster left behind.
pub fn group_leaders_under(root: &std::path::Path) -> Vec<(String, ProcessId)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Some(cluster) = std::fs::read_link(entry.path().join("cwd"))
            .ok()
            .and_then(|cwd| cluster_of(&cwd, root))
            .or_else(|| cluster_in_environment(&entry.path(), root))
        else {
            continue;
        };
        match stat_fields(pid) {
            Some((state, group, start)) if group == pid && state != 'Z' && state != 'X' => {
                found.push((
                    cluster.to_string(),
                    ProcessId {
                        pid,
                        start_ticks: start,
                    },
                ));
            }
            _ => {}
        }
    }
    found
}

/// The cluster whose directory under `root` holds `path`.
fn cluster_of(path: &std::path::Path, root: &std::path::Path) -> Option<String> {
    let rel = path.strip_prefix(root).ok()?;
    let first = rel.components().next()?;
    match first {
        std::path::Component::Normal(name) => name.to_str().map(str::to_string),
        _ => None,
    }
}

/// The cluster named by [`CLUSTER_PATH_VARIABLE`] in the start environment of the process at
/// `proc_dir` (`/proc/<pid>`), if it is a path under `root`.
fn cluster_in_environment(proc_dir: &std::path::Path, root: &std::path::Path) -> Option<String> {
    use std::os::unix::ffi::OsStrExt;
    let environ = std::fs::read(proc_dir.join("environ")).ok()?;
    let prefix = format!("{CLUSTER_PATH_VARIABLE}=");
    let value = environ
        .split(|b| *b == 0)
        .find_map(|entry| entry.strip_prefix(prefix.as_bytes()))?;
    let path = std::path::Path::new(std::ffi::OsStr::from_bytes(value));
    // A relative or climbing path names no cluster.
    if !path.is_absolute()
        || path
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return None;
    }
    cluster_of(path, root)
}

/// Watches a process that is not our child (adopted after a gateway restart) by polling
/// `/proc`, and reports its exit once on `events`.
pub fn watch_adopted(
    cluster: String,
    role: ProcessRole,
    id: ProcessId,
    events: mpsc::UnboundedSender<ProcessExit>,
) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tick.tick().await;
            if events.is_closed() {
                return;
            }
            if !id.is_alive() {
                let _ = events.send(ProcessExit {
                    cluster,
                    role,
                    id,
                    code: None,
                });
                return;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn identifies_and_terminates_a_process_group() {
        let mut child = tokio::process::Command::new("sleep")
            .arg("30")
            .process_group(0)
            .spawn()
            .unwrap();
        let id = ProcessId::of(child.id().unwrap()).unwrap();
        assert!(id.is_alive());
        let forged = ProcessId {
            pid: id.pid,
            start_ticks: id.start_ticks + 1,
        };
        assert!(
            !forged.is_alive(),
            "a different start time is a different process"
        );
        id.terminate(Duration::from_secs(5)).await;
        let status = child.wait().await.unwrap();
        assert!(!status.success());
        assert!(!id.is_alive());
    }

    #[tokio::test]
    async fn finds_group_leaders_by_working_directory() {
        let root = std::env::temp_dir().join(format!("dgrs-leaders-{}", std::process::id()));
        std::fs::create_dir_all(root.join("c9")).unwrap();
        let mut child = tokio::process::Command::new("sleep")
            .arg("30")
            .current_dir(root.join("c9"))
            .process_group(0)
            .spawn()
            .unwrap();
        let id = ProcessId::of(child.id().unwrap()).unwrap();
        let found = group_leaders_under(&root);
        assert_eq!(found, vec![("c9".to_string(), id)]);
        id.terminate(Duration::from_secs(5)).await;
        child.wait().await.unwrap();
        assert!(group_leaders_under(&root).is_empty());
        let _ = std::fs::remove_dir_all(root);
    }

    #[tokio::test]
    async fn finds_group_leaders_that_left_by_their_environment() {
        let root = std::env::temp_dir().join(format!("dgrs-leaders-env-{}", std::process::id()));
        std::fs::create_dir_all(root.join("c7/.certs")).unwrap();
        let marker = root.join("c7/.certs/dask.crt");
        let spawn = |value: &std::path::Path| {
            tokio::process::Command::new("sleep")
                .arg("30")
                .current_dir("/")
                .env(CLUSTER_PATH_VARIABLE, value)
                .process_group(0)
                .spawn()
                .unwrap()
        };
        let mut left = spawn(&marker);
        // Paths that only look inside the root name no cluster.
        let mut climbing = spawn(&root.join("c7/../../etc/dask.crt"));
        let mut elsewhere = spawn(std::path::Path::new("/etc/dask.crt"));
        let id = ProcessId::of(left.id().unwrap()).unwrap();
        assert_eq!(group_leaders_under(&root), vec![("c7".to_string(), id)]);
        for child in [&mut left, &mut climbing, &mut elsewhere] {
            child.kill().await.unwrap();
        }
        let _ = std::fs::remove_dir_all(root);
    }

    #[tokio::test]
    async fn adopted_exit_is_reported() {
        let mut child = tokio::process::Command::new("sleep")
            .arg("0.2")
            .spawn()
            .unwrap();
        let id = ProcessId::of(child.id().unwrap()).unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        watch_adopted("c".into(), ProcessRole::Scheduler, id, tx);
        child.wait().await.unwrap();
        let exit = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(exit.role, ProcessRole::Scheduler);
        assert_eq!(exit.cluster, "c");
    }
}

//! Pre-imported process start: one long-lived Python per environment that has imported
//! `distributed` and forks `dask worker` / `dask scheduler` processes from itself
//! (`python/forkserver.py`, which documents the protocol).
//!
//! A forked process is like an exec'd one in every way the backend relies on: it leads its own
//! session and process group, its working directory is the cluster's `work/`, it has exactly
//! the environment it was given, and its exit is reported once on the
//! launcher's channel with its exit code. If the server is not ready, fails, or dies, the
//! launcher starts a plain `dask` process instead; the processes a dead server forked are then
//! watched through `/proc` like any adopted process.

use crate::process::{watch_adopted, ProcessExit, ProcessId, ProcessRole};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::{info, warn};

/// The server's source, written next to the cluster directories at start-up.
const SCRIPT: &str = include_str!("../python/forkserver.py");

/// The largest request the server accepts (it refuses bigger ones and exits).
const MAX_REQUEST: usize = 4 << 20;

/// How long a start waits for the server's answer before giving up on it.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// Bytes of command line each forked process can show (`ps`); longer ones are cut.
const TITLE_ROOM: usize = 1024;

/// Bytes of environment each forked process can show in `/proc/<pid>/environ`.
const ENV_ROOM: usize = 32 << 10;

/// After a server failed, how long before another is tried for the same environment.
const RETRY_AFTER: Duration = Duration::from_secs(60);

/// Environment variables that only take effect when an interpreter, the C library or a BLAS
/// library (which `distributed` loads through numpy) starts: a cluster that sets one is started
/// by exec, so the setting applies.
const START_ONLY_ENV_PREFIXES: &[&str] = &[
    "PYTHON",
    "LD_",
    "MALLOC_",
    "GLIBC_TUNABLES",
    "OMP_",
    "MKL_",
    "OPENBLAS_",
];

/// The settings a `dask worker`'s nanny gives its worker process before it starts
/// (`distributed.nanny.pre-spawn-environ`, and the str hash seed it gives every worker so that
/// `hash()` agrees across workers): they are read when the interpreter, the C library and BLAS
/// start, so the server, whose state every forked process inherits, starts with them.
const SERVER_START_ENV: &[(&str, &str)] = &[
    ("PYTHONHASHSEED", "6640"),
    ("MALLOC_TRIM_THRESHOLD_", "65536"),
    ("OMP_NUM_THREADS", "1"),
    ("MKL_NUM_THREADS", "1"),
    ("OPENBLAS_NUM_THREADS", "1"),
];

/// Why a process was not forked (the launcher then execs it).
#[derive(Debug, thiserror::Error)]
pub enum ForkError {
    /// No server is ready for this environment yet (one is starting, or failed recently).
    #[error("no fork server ready for {0}")]
    NotReady(PathBuf),
    /// The cluster's environment has a variable that must be seen at interpreter start.
    #[error("environment variable {0} needs a fresh interpreter")]
    StartOnlyEnv(String),
    /// The request was larger than the server accepts.
    #[error("request too large ({0} bytes)")]
    TooLarge(usize),
    /// Talking to the server failed; it is stopped and replaced later.
    #[error("fork server for {python}: {reason}")]
    Server {
        /// The environment's interpreter.
        python: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

/// What one forked process is to run.
#[derive(Debug)]
pub struct ForkRequest<'a> {
    /// The `dask` script, shown as the process's second word of its command line.
    pub argv0: &'a Path,
    /// `worker` or `scheduler`.
    pub command: &'a str,
    /// The command's arguments (after `dask worker`).
    pub args: &'a [String],
    /// The whole environment of the process.
    pub env: &'a BTreeMap<String, String>,
    /// Working directory.
    pub cwd: &'a Path,
    /// The log file its output is appended to (made 0600 if new).
    pub log: &'a Path,
    /// The cluster, for exit reports.
    pub cluster: &'a str,
    /// Scheduler or which worker, for exit reports.
    pub role: ProcessRole,
}

/// The fork servers of one launcher, one per Python interpreter, started on first use.
#[derive(Debug)]
pub struct ForkServers {
    script: PathBuf,
    preimport: Vec<String>,
    /// The servers' own environment (the pass-through variables, never the gateway's secrets).
    env: BTreeMap<String, String>,
    events: mpsc::UnboundedSender<ProcessExit>,
    slots: Mutex<HashMap<PathBuf, Slot>>,
}

#[derive(Debug)]
enum Slot {
    Up(Arc<Server>),
    Down(Instant),
}

/// One running server.
#[derive(Debug)]
struct Server {
    python: PathBuf,
    ready: AtomicBool,
    alive: AtomicBool,
    /// When it was found dead (the next one is started no sooner than [`RETRY_AFTER`] later).
    died_at: Mutex<Option<Instant>>,
    /// Held for a whole request and its answer, so answers come in request order.
    stdin: Mutex<Option<ChildStdin>>,
    shared: Arc<Mutex<Shared>>,
}

/// What the server's reader thread and the requesting thread share.
#[derive(Debug, Default)]
struct Shared {
    /// The request awaiting its `started` answer.
    pending: Option<Pending>,
    /// Live children by pid, for exit reports.
    children: HashMap<u32, (String, ProcessRole, ProcessId)>,
}

#[derive(Debug)]
struct Pending {
    cluster: String,
    role: ProcessRole,
    answer: std_mpsc::Sender<ProcessId>,
}

impl ForkServers {
    /// Fork servers whose script lives in `dir` (created 0700), importing `preimport` ahead,
    /// running with `env`, and reporting their children's exits on `events`.
    pub fn new(
        dir: &Path,
        preimport: Vec<String>,
        env: BTreeMap<String, String>,
        events: mpsc::UnboundedSender<ProcessExit>,
    ) -> std::io::Result<Self> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let script = dir.join("forkserver.py");
        let tmp = dir.join("forkserver.py.tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(SCRIPT.as_bytes())?;
        std::fs::rename(&tmp, &script)?;
        Ok(ForkServers {
            script,
            preimport,
            env,
            events,
            slots: Mutex::new(HashMap::new()),
        })
    }

    /// Starts the server for `python` unless it runs or failed within the last minute.
    pub fn warm(&self, python: &Path) {
        let _ = self.server(python);
    }

    /// Whether the server for `python` has finished its imports and takes requests.
    pub fn is_ready(&self, python: &Path) -> bool {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        matches!(slots.get(python), Some(Slot::Up(s)) if s.ready.load(Ordering::Acquire) && s.alive.load(Ordering::Acquire))
    }

    /// The running server for `python`, starting one if there is none.
    fn server(&self, python: &Path) -> Option<Arc<Server>> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        match slots.get(python) {
            Some(Slot::Up(s)) if s.alive.load(Ordering::Acquire) => return Some(s.clone()),
            Some(Slot::Down(at)) if at.elapsed() < RETRY_AFTER => return None,
            Some(Slot::Up(dead)) => {
                // It died: a new one no sooner than a minute after its death.
                let died = dead.death_time();
                slots.insert(python.to_path_buf(), Slot::Down(died));
                if died.elapsed() < RETRY_AFTER {
                    return None;
                }
            }
            _ => {}
        }
        match self.spawn(python) {
            Ok(server) => {
                slots.insert(python.to_path_buf(), Slot::Up(server.clone()));
                Some(server)
            }
            Err(e) => {
                warn!(python = %python.display(), "fork server not started, Dask processes start by exec: {e}");
                slots.insert(python.to_path_buf(), Slot::Down(Instant::now()));
                None
            }
        }
    }

    fn spawn(&self, python: &Path) -> std::io::Result<Arc<Server>> {
        let mut cmd = Command::new(python);
        cmd.arg(&self.script)
            .args(&self.preimport)
            // Room for the children's own command lines (`dask worker ...`), written over it.
            .arg(" ".repeat(TITLE_ROOM))
            .env_clear()
            .envs(&self.env)
            .envs(SERVER_START_ENV.iter().copied())
            // Room for the children's own environments in /proc/<pid>/environ.
            .env("DGRS_FORKSERVER_ENV_ROOM", " ".repeat(ENV_ROOM))
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn()?;
        let stdin = child.stdin.take();
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| std::io::Error::other("no stdout"))?;
        let server = Arc::new(Server {
            python: python.to_path_buf(),
            ready: AtomicBool::new(false),
            alive: AtomicBool::new(true),
            died_at: Mutex::new(None),
            stdin: Mutex::new(stdin),
            shared: Arc::new(Mutex::new(Shared::default())),
        });
        let reader = server.clone();
        let events = self.events.clone();
        let runtime = tokio::runtime::Handle::try_current().ok();
        std::thread::Builder::new()
            .name("forkserver-reader".into())
            .spawn(move || read_answers(reader, child, stdout, events, runtime))?;
        Ok(server)
    }

    /// Forks the process `request` describes from the server for `python`. Any error means
    /// nothing was started: the caller starts the process by exec instead.
    pub fn start(&self, python: &Path, request: ForkRequest<'_>) -> Result<ProcessId, ForkError> {
        if let Some(key) = request
            .env
            .keys()
            .find(|k| START_ONLY_ENV_PREFIXES.iter().any(|p| k.starts_with(p)))
        {
            return Err(ForkError::StartOnlyEnv(key.clone()));
        }
        let server = self
            .server(python)
            .filter(|s| s.ready.load(Ordering::Acquire))
            .ok_or_else(|| ForkError::NotReady(python.to_path_buf()))?;
        let body = serde_json::json!({
            "command": request.command,
            "argv0": request.argv0,
            "args": request.args,
            "env": request.env,
            "cwd": request.cwd,
            "log": request.log,
        });
        let body = serde_json::to_vec(&body).map_err(|e| server.failed(e.to_string()))?;
        if body.len() > MAX_REQUEST {
            return Err(ForkError::TooLarge(body.len()));
        }
        let mut stdin = server.stdin.lock().unwrap_or_else(|e| e.into_inner());
        let Some(pipe) = stdin.as_mut() else {
            return Err(ForkError::NotReady(python.to_path_buf()));
        };
        let (tx, rx) = std_mpsc::channel();
        server.shared().pending = Some(Pending {
            cluster: request.cluster.to_string(),
            role: request.role,
            answer: tx,
        });
        let mut message = Vec::with_capacity(4 + body.len());
        message.extend_from_slice(&(body.len() as u32).to_be_bytes());
        message.extend_from_slice(&body);
        if let Err(e) = pipe.write_all(&message).and_then(|_| pipe.flush()) {
            server.shared().pending = None;
            *stdin = None;
            return Err(server.failed(e.to_string()));
        }
        match rx.recv_timeout(REPLY_TIMEOUT) {
            Ok(id) => Ok(id),
            Err(e) => {
                server.shared().pending = None;
                // Closing its stdin makes the server exit; a replacement comes later.
                *stdin = None;
                Err(server.failed(format!("no answer: {e}")))
            }
        }
    }
}

impl Server {
    fn shared(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks it dead, remembering when first.
    fn died(&self) {
        self.alive.store(false, Ordering::Release);
        self.died_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert_with(Instant::now);
    }

    /// When it was found dead (now, if it was not yet marked).
    fn death_time(&self) -> Instant {
        *self
            .died_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert_with(Instant::now)
    }

    fn failed(&self, reason: String) -> ForkError {
        self.died();
        ForkError::Server {
            python: self.python.clone(),
            reason,
        }
    }
}

/// The server's reader thread: hands `started` pids to the waiting request, reports exits, and
/// when the server is gone hands its children to `/proc` watchers.
fn read_answers(
    server: Arc<Server>,
    mut child: Child,
    stdout: std::process::ChildStdout,
    events: mpsc::UnboundedSender<ProcessExit>,
    runtime: Option<tokio::runtime::Handle>,
) {
    let python = server.python.display().to_string();
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        let Ok(answer) = serde_json::from_str::<Value>(&line) else {
            warn!(%python, "fork server said {line:?}");
            continue;
        };
        if answer.get("ready").is_some() {
            info!(%python, pid = child.id(), "fork server ready");
            server.ready.store(true, Ordering::Release);
        } else if let Some(pid) = answer.get("started").and_then(Value::as_u64) {
            let pid = pid as u32;
            let id = ProcessId::of(pid).unwrap_or(ProcessId {
                pid,
                start_ticks: 0,
            });
            let mut shared = server.shared();
            if let Some(pending) = shared.pending.take() {
                shared
                    .children
                    .insert(pid, (pending.cluster, pending.role, id));
                let _ = pending.answer.send(id);
            } else {
                // Its requester gave up waiting: the process is nobody's, end it.
                id.signal_group(libc::SIGKILL);
            }
        } else if let Some(pid) = answer.get("exit").and_then(Value::as_u64) {
            let code = answer.get("code").and_then(Value::as_i64).map(|c| c as i32);
            if let Some((cluster, role, id)) = server.shared().children.remove(&(pid as u32)) {
                let _ = events.send(ProcessExit {
                    cluster,
                    role,
                    id,
                    code,
                });
            }
        }
    }
    server.died();
    // A request waiting for its answer learns at once that none comes.
    server.shared().pending = None;
    let status = child.wait();
    let orphans: Vec<_> = server.shared().children.drain().collect();
    if !orphans.is_empty() || !events.is_closed() {
        warn!(%python, ?status, children = orphans.len(), "fork server exited; its children are watched through /proc");
    }
    for (_, (cluster, role, id)) in orphans {
        match &runtime {
            Some(rt) => {
                let _guard = rt.enter();
                watch_adopted(cluster, role, id, events.clone());
            }
            None => {
                let _ = events.send(ProcessExit {
                    cluster,
                    role,
                    id,
                    code: None,
                });
            }
        }
    }
}

/// The Python interpreter behind a `dask` script: its `#!` line, or a `python` beside it.
/// `None` when it cannot be told (the launcher then always execs).
pub fn python_behind(dask: &Path, path: Option<&str>) -> Option<PathBuf> {
    let dask = if dask.components().count() > 1 {
        dask.to_path_buf()
    } else {
        path?
            .split(':')
            .map(|dir| Path::new(dir).join(dask))
            .find(|p| p.is_file())?
    };
    let text = std::fs::read(&dask).ok()?;
    let first = text.split(|b| *b == b'\n').next()?;
    let first = std::str::from_utf8(first).ok()?;
    if let Some(interp) = first.strip_prefix("#!") {
        let mut words = interp.split_whitespace();
        let program = words.next()?;
        let candidate = if program.ends_with("/env") {
            let name = words.next()?;
            path?
                .split(':')
                .map(|dir| Path::new(dir).join(name))
                .find(|p| p.is_file())?
        } else {
            PathBuf::from(program)
        };
        if candidate
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("python"))
            && candidate.is_file()
        {
            return Some(candidate);
        }
    }
    // pip writes a `#!/bin/sh` trampoline when the interpreter's path is too long for `#!`.
    let beside = dask.parent()?.join("python");
    beside.is_file().then_some(beside)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("dgrs-fork-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn script(path: &Path, text: &str) {
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn finds_the_interpreter_behind_a_dask_script() {
        let dir = temp_dir("behind");
        let python = dir.join("python3.11");
        script(&python, "");
        let direct = dir.join("dask");
        script(&direct, &format!("#!{}\nimport sys\n", python.display()));
        assert_eq!(python_behind(&direct, None), Some(python.clone()));
        // A bare name is looked up on PATH.
        let path = format!("/nonexistent:{}", dir.display());
        assert_eq!(
            python_behind(Path::new("dask"), Some(&path)),
            Some(python.clone())
        );
        // `#!/usr/bin/env python3.11` resolves the interpreter on PATH too.
        let env = dir.join("dask-env");
        script(&env, "#!/usr/bin/env python3.11\n");
        assert_eq!(python_behind(&env, Some(&path)), Some(python.clone()));
        // pip's trampoline for long paths: the `python` beside the script.
        let sub = dir.join("bin");
        std::fs::create_dir_all(&sub).unwrap();
        let trampoline = sub.join("dask");
        script(
            &trampoline,
            "#!/bin/sh\n'''exec' \"/long/python\" \"$0\" \"$@\"\n' '''\n",
        );
        assert_eq!(python_behind(&trampoline, None), None);
        script(&sub.join("python"), "");
        assert_eq!(python_behind(&trampoline, None), Some(sub.join("python")));
        // Not a Python script, nothing beside it: exec only.
        let shell = dir.join("shell-dask");
        script(&shell, "#!/bin/sh\nexit 0\n");
        assert_eq!(python_behind(&shell, None), None);
        assert_eq!(python_behind(&dir.join("missing"), None), None);
        let _ = std::fs::remove_dir_all(dir);
    }

    fn request<'a>(env: &'a BTreeMap<String, String>, dir: &'a Path) -> ForkRequest<'a> {
        ForkRequest {
            argv0: Path::new("dask"),
            command: "worker",
            args: &[],
            env,
            cwd: dir,
            log: dir,
            cluster: "c1",
            role: ProcessRole::Worker("w1".into()),
        }
    }

    #[tokio::test]
    async fn start_only_variables_and_a_failed_server_mean_exec() {
        let dir = temp_dir("fail");
        let (tx, _rx) = mpsc::unbounded_channel();
        let servers = ForkServers::new(&dir.join("fs"), vec![], BTreeMap::new(), tx).unwrap();
        // The script is written privately.
        let mode = std::fs::metadata(dir.join("fs/forkserver.py"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // A variable an interpreter reads only when it starts: no server is even asked.
        let env = BTreeMap::from([("PYTHONPATH".to_string(), "/x".to_string())]);
        let err = servers.start(Path::new("/bin/false"), request(&env, &dir));
        assert!(matches!(err, Err(ForkError::StartOnlyEnv(k)) if k == "PYTHONPATH"));
        // An interpreter that exits at once: not ready, then down (no retry for a minute).
        let env = BTreeMap::new();
        let err = servers.start(Path::new("/bin/false"), request(&env, &dir));
        assert!(matches!(err, Err(ForkError::NotReady(_))), "{err:?}");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let slots = servers.slots.lock().unwrap();
            match slots.get(Path::new("/bin/false")) {
                Some(Slot::Up(s)) if s.alive.load(Ordering::Acquire) => {}
                _ => break,
            }
            drop(slots);
            assert!(
                Instant::now() < deadline,
                "the failed server was not noticed"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!servers.is_ready(Path::new("/bin/false")));
        let err = servers.start(Path::new("/bin/false"), request(&env, &dir));
        assert!(matches!(err, Err(ForkError::NotReady(_))));
        assert!(matches!(
            servers.slots.lock().unwrap().get(Path::new("/bin/false")),
            Some(Slot::Down(_))
        ));
        let _ = std::fs::remove_dir_all(dir);
    }
}

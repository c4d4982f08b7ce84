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

    /// Sends `signal` once to the process group this process leads, or to the process alone
    /// if it leads none (only if it is still ours). Once: Dask's processes take a second
    /// SIGTERM as "exit now" and skip their orderly close, so a process must never get the
    /// group's signal and its own.
    pub fn signal_group(&self, signal: i32) {
        let Some((state, group, start)) = stat_fields(self.pid) else {
            return;
        };
        if start != self.start_ticks || state == 'Z' || state == 'X' {
            return;
        }
        let target = if group == self.pid {
            -(self.pid as i32)
        } else {
            self.pid as i32
        };
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe {
            libc::kill(target, signal);
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
/// directory is inside its `work/` (where its processes start; an operator's shell reading
/// the cluster's logs is not one), or whose environment at start named a path inside it
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
            .and_then(|cwd| cluster_working_in(&cwd, root))
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

/// The cluster whose processes' working directory (`root/<cluster>/work`) holds `path`.
fn cluster_working_in(path: &std::path::Path, root: &std::path::Path) -> Option<String> {
    let cluster = cluster_of(path, root)?;
    path.starts_with(root.join(&cluster).join("work"))
        .then_some(cluster)
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

/// Whether a process of the process group led by `leader` holds a listening TCP socket bound
/// to `address` (or to the unspecified address of its family, on that port). Read from the
/// leader's `/proc/<pid>/net/tcp{,6}` (its own network namespace) and the group's descriptors.
/// Where those descriptors cannot be read (a gateway running as root without
/// `CAP_SYS_PTRACE`, with the leader under another uid), the socket's owner decides: the
/// leader's uid, which must not be the gateway's own.
pub fn group_listens_on(leader: u32, address: std::net::SocketAddr) -> bool {
    use std::collections::HashMap;
    let table = if address.is_ipv4() { "tcp" } else { "tcp6" };
    let Ok(text) = std::fs::read_to_string(format!("/proc/{leader}/net/{table}")) else {
        return false;
    };
    // Listening sockets on that address: inode -> owner uid.
    let sockets: HashMap<u64, u32> = text
        .lines()
        .skip(1)
        .filter_map(parse_listening_socket)
        .filter(|l| {
            l.address.port() == address.port()
                && (l.address.ip() == address.ip() || l.address.ip().is_unspecified())
        })
        .map(|l| (l.inode, l.uid))
        .collect();
    if sockets.is_empty() {
        return false;
    }
    // Some(true/false): the process's descriptors say; None: they cannot be read.
    let holds = |pid: u32| -> Option<bool> {
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
        Some(fds.flatten().any(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|target| {
                target
                    .to_str()
                    .and_then(|t| t.strip_prefix("socket:["))
                    .and_then(|t| t.strip_suffix(']'))
                    .and_then(|n| n.parse::<u64>().ok())
                    .is_some_and(|inode| sockets.contains_key(&inode))
            })
        }))
    };
    match holds(leader) {
        Some(true) => return true,
        Some(false) => {}
        None => {
            // SAFETY: geteuid has no preconditions.
            let gateway_uid = unsafe { libc::geteuid() };
            return owned_by_another_uid(process_uid(leader), gateway_uid, sockets.values());
        }
    }
    // The listener may be a child in the group (a wrapper that did not exec, say).
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != leader)
        .any(|pid| {
            stat_fields(pid).is_some_and(|(_, group, _)| group == leader)
                && holds(pid) == Some(true)
        })
}

/// Whether one of the sockets (by owner uid) belongs to `leader_uid`, a uid that is not the
/// gateway's own (which would let the gateway's own ports pass).
fn owned_by_another_uid<'a>(
    leader_uid: Option<u32>,
    gateway_uid: u32,
    mut owners: impl Iterator<Item = &'a u32>,
) -> bool {
    leader_uid.is_some_and(|uid| uid != gateway_uid && owners.any(|&owner| owner == uid))
}

/// The real uid of process `pid`.
fn process_uid(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A listening TCP socket, as `/proc/<pid>/net/tcp{,6}` shows it.
#[derive(Debug, PartialEq)]
struct ListeningSocket {
    address: std::net::SocketAddr,
    uid: u32,
    inode: u64,
}

/// A line of `/proc/<pid>/net/tcp{,6}` in the LISTEN state.
fn parse_listening_socket(line: &str) -> Option<ListeningSocket> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    // sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode
    if fields.len() < 10 || fields[3] != "0A" {
        return None;
    }
    let (ip_hex, port_hex) = fields[1].split_once(':')?;
    let port = u16::from_str_radix(port_hex, 16).ok()?;
    // The kernel prints the address as 32-bit words in this machine's byte order.
    let mut bytes = Vec::with_capacity(16);
    for word in ip_hex.as_bytes().chunks(8) {
        let word = std::str::from_utf8(word).ok()?;
        bytes.extend_from_slice(&u32::from_str_radix(word, 16).ok()?.to_ne_bytes());
    }
    let ip = match bytes.len() {
        4 => std::net::IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?),
        16 => std::net::IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?),
        _ => return None,
    };
    Some(ListeningSocket {
        address: std::net::SocketAddr::new(ip, port),
        uid: fields[7].parse().ok()?,
        inode: fields[9].parse().ok()?,
    })
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
    async fn a_group_leader_gets_each_signal_once() {
        // A real-time signal queues once per send while it is blocked: the child blocks it,
        // and once signalled counts how many it can take (two sends, to the group and to the
        // process, would count 2).
        let dir = std::env::temp_dir().join(format!("dgrs-signal-once-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = |name: &str| dir.join(name).display().to_string();
        let signal = libc::SIGRTMIN() + 3;
        let script = "import os, signal, sys, time\n\
                      sig = int(sys.argv[1])\n\
                      signal.pthread_sigmask(signal.SIG_BLOCK, {sig})\n\
                      open(sys.argv[2], 'w').close()\n\
                      while not os.path.exists(sys.argv[3]): time.sleep(0.02)\n\
                      n = 0\n\
                      while signal.sigtimedwait([sig], 0) is not None: n += 1\n\
                      open(sys.argv[4] + '.tmp', 'w').write(str(n))\n\
                      os.rename(sys.argv[4] + '.tmp', sys.argv[4])\n";
        let mut child = tokio::process::Command::new("python3")
            .args(["-c", script, &signal.to_string()])
            .args([file("ready"), file("go"), file("count")])
            .process_group(0)
            .spawn()
            .unwrap();
        let appears = |name: &str| {
            let path = dir.join(name);
            async move {
                while !path.exists() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        appears("ready").await;
        let id = ProcessId::of(child.id().unwrap()).unwrap();
        id.signal_group(signal);
        std::fs::write(dir.join("go"), "").unwrap();
        appears("count").await;
        let count = std::fs::read_to_string(dir.join("count")).unwrap();
        child.wait().await.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(count, "1");
    }

    #[tokio::test]
    async fn finds_group_leaders_by_working_directory() {
        let root = std::env::temp_dir().join(format!("dgrs-leaders-{}", std::process::id()));
        std::fs::create_dir_all(root.join("c9/work/sub")).unwrap();
        std::fs::create_dir_all(root.join("c9/logs")).unwrap();
        let spawn = |dir: std::path::PathBuf| {
            tokio::process::Command::new("sleep")
                .arg("30")
                .current_dir(dir)
                .process_group(0)
                .spawn()
                .unwrap()
        };
        let mut child = spawn(root.join("c9/work/sub"));
        // An operator's shell in the cluster's logs, or in its directory, is no cluster's.
        let mut in_logs = spawn(root.join("c9/logs"));
        let mut in_cluster = spawn(root.join("c9"));
        let id = ProcessId::of(child.id().unwrap()).unwrap();
        let found = group_leaders_under(&root);
        assert_eq!(found, vec![("c9".to_string(), id)]);
        id.terminate(Duration::from_secs(5)).await;
        child.wait().await.unwrap();
        assert!(group_leaders_under(&root).is_empty());
        for other in [&mut in_logs, &mut in_cluster] {
            other.kill().await.unwrap();
        }
        let _ = std::fs::remove_dir_all(root);
    }

    #[test]
    fn a_process_group_listens_only_on_its_own_sockets() {
        use std::os::unix::process::CommandExt;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let me = std::process::id();
        assert!(group_listens_on(me, addr));
        // Another address on the same port, and a process (of its own group) without it.
        // (Not a port this process let go: a test running beside this one may take it.)
        assert!(!group_listens_on(
            me,
            std::net::SocketAddr::new([127, 0, 0, 2].into(), addr.port())
        ));
        let child = ChildGuard(
            std::process::Command::new("sleep")
                .arg("5")
                .process_group(0)
                .spawn()
                .unwrap(),
        );
        assert!(!group_listens_on(child.0.id(), addr));
        drop(child);
        // A connected (not listening) socket is no listener.
        let client = std::net::TcpStream::connect(addr).unwrap();
        assert!(!group_listens_on(me, client.local_addr().unwrap()));
    }

    /// Kills the child when dropped.
    struct ChildGuard(std::process::Child);
    impl Drop for ChildGuard {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn unreadable_descriptors_leave_it_to_the_sockets_owner() {
        let owners = [1001u32, 0];
        // The leader's uid owns one: its port. The gateway's uid: never, even if it owns one.
        assert!(owned_by_another_uid(Some(1001), 0, owners.iter()));
        assert!(!owned_by_another_uid(Some(0), 0, owners.iter()));
        assert!(!owned_by_another_uid(Some(1002), 0, owners.iter()));
        assert!(!owned_by_another_uid(None, 0, owners.iter()));
        let me = std::process::id();
        assert_eq!(process_uid(me), Some(unsafe { libc::getuid() }));
    }

    #[test]
    fn listening_lines_of_proc_net_tcp_are_read() {
        let v4 = "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1001        0 123456 1 0000000000000000 100 0 0 10 0";
        assert_eq!(
            parse_listening_socket(v4).unwrap(),
            ListeningSocket {
                address: "127.0.0.1:8080".parse().unwrap(),
                uid: 1001,
                inode: 123456
            }
        );
        let v6 = "   1: 00000000000000000000000001000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 777 1 0000000000000000 100 0 0 10 0";
        assert_eq!(
            parse_listening_socket(v6).unwrap().address,
            "[::1]:80".parse().unwrap()
        );
        // Established, not listening.
        let est = v4.replacen(" 0A ", " 01 ", 1);
        assert!(parse_listening_socket(&est).is_none());
        assert!(parse_listening_socket("garbage").is_none());
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

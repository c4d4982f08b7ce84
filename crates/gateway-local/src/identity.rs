//! Which operating-system account runs a user's Dask processes on the local backend.
//!
//! By default every cluster runs as the gateway's own account: right for one person on a
//! laptop, wrong for a shared machine, where any user's code could read every other cluster's
//! credentials. With isolation each gateway user's processes run under a uid of their own, so
//! the kernel keeps users apart (files, `/proc/<pid>/environ`, signals).

use crate::error::LocalError;
use std::collections::BTreeMap;
use std::ffi::{CStr, CString};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// How users' processes are kept apart.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Isolation {
    /// Every cluster runs as the gateway's own account (single-user mode).
    #[default]
    Shared,
    /// Each gateway user runs as the system account of the same name (e.g. from LDAP/PAM).
    SystemUsers,
    /// Each gateway user gets a uid (and a gid of the same number) of its own from
    /// `first..first + count`, remembered in `map_file` so it never changes.
    UidRange {
        /// First uid of the range.
        first: u32,
        /// How many uids the range holds.
        count: u32,
        /// Where the user → uid map is kept (JSON).
        map_file: PathBuf,
    },
}

/// The account one user's processes run as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// `HOME` for the processes (`None`: the cluster's own working directory).
    pub home: Option<PathBuf>,
}

/// Resolves gateway users to accounts under an [`Isolation`] policy.
#[derive(Debug)]
pub struct Identities {
    isolation: Isolation,
    allocated: Mutex<BTreeMap<String, u32>>,
}

impl Identities {
    /// Loads the uid map of a `UidRange` policy (a missing file is an empty map).
    pub fn new(isolation: Isolation) -> Result<Self, LocalError> {
        let mut allocated = BTreeMap::new();
        if let Isolation::UidRange {
            first,
            count,
            map_file,
        } = &isolation
        {
            if *first == 0 || *count == 0 || first.checked_add(*count).is_none() {
                return Err(LocalError::Identity(format!(
                    "the uid range {first}+{count} is empty, starts at root or overflows"
                )));
            }
            match std::fs::read(map_file) {
                Ok(bytes) => {
                    allocated = serde_json::from_slice(&bytes).map_err(|e| {
                        LocalError::Identity(format!("reading {}: {e}", map_file.display()))
                    })?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(LocalError::Prepare {
                        path: map_file.clone(),
                        source,
                    })
                }
            }
        }
        Ok(Identities {
            isolation,
            allocated: Mutex::new(allocated),
        })
    }

    /// Whether users run under accounts of their own.
    pub fn isolated(&self) -> bool {
        self.isolation != Isolation::Shared
    }

    /// The account `user`'s processes run as; `None` in single-user mode (the gateway's own).
    pub fn resolve(&self, user: &str) -> Result<Option<Identity>, LocalError> {
        match &self.isolation {
            Isolation::Shared => Ok(None),
            Isolation::SystemUsers => system_account(user).map(Some),
            Isolation::UidRange {
                first,
                count,
                map_file,
            } => {
                let mut map = self.allocated.lock().unwrap_or_else(|e| e.into_inner());
                let uid = match map.get(user) {
                    Some(uid) => *uid,
                    None => {
                        let taken: std::collections::HashSet<u32> = map.values().copied().collect();
                        let uid = (*first..first + count)
                            .find(|u| !taken.contains(u))
                            .ok_or_else(|| {
                                LocalError::Identity(format!(
                                    "all {count} uids of the range starting at {first} are taken"
                                ))
                            })?;
                        map.insert(user.to_string(), uid);
                        if let Err(e) = save_map(map_file, &map) {
                            map.remove(user);
                            return Err(e);
                        }
                        uid
                    }
                };
                Ok(Some(Identity {
                    uid,
                    gid: uid,
                    home: None,
                }))
            }
        }
    }
}

/// Writes the map atomically (temporary file, fsync, rename), readable by the gateway only.
fn save_map(path: &Path, map: &BTreeMap<String, u32>) -> Result<(), LocalError> {
    let err = |source| LocalError::Prepare {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    let text = serde_json::to_vec_pretty(map).expect("a map of strings to numbers serializes");
    f.write_all(&text).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// The system account named `user` (never root).
fn system_account(user: &str) -> Result<Identity, LocalError> {
    let missing = || LocalError::Identity(format!("there is no system account named {user:?}"));
    let name = CString::new(user).map_err(|_| missing())?;
    let mut buf = vec![0u8; 16 * 1024];
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: getpwnam_r writes into `pwd` and `buf`, both live for the call and after it
    // (the strings in `pwd` point into `buf`, read before `buf` is dropped).
    let rc = unsafe {
        libc::getpwnam_r(
            name.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 || found.is_null() {
        return Err(missing());
    }
    if pwd.pw_uid == 0 {
        return Err(LocalError::Identity(format!(
            "{user:?} is a root account: clusters never run as root"
        )));
    }
    // A name service may answer for names that are not the account's own (`Alice` for
    // `alice` where names ignore case, `DOMAIN\alice`): two gateway users would then share
    // one account, and each other's files. Only the account's exact name counts.
    let account = (!pwd.pw_name.is_null())
        // SAFETY: a NUL-terminated string inside `buf`.
        .then(|| unsafe { CStr::from_ptr(pwd.pw_name) })
        .and_then(|s| s.to_str().ok());
    exactly_named(user, account)?;
    let home = (!pwd.pw_dir.is_null())
        // SAFETY: a NUL-terminated string inside `buf`.
        .then(|| unsafe { CStr::from_ptr(pwd.pw_dir) })
        .and_then(|s| s.to_str().ok())
        .filter(|s| !s.is_empty())
        .map(PathBuf::from);
    Ok(Identity {
        uid: pwd.pw_uid,
        gid: pwd.pw_gid,
        home,
    })
}

/// Refuses an account the name service found for `user` under another name.
fn exactly_named(user: &str, account: Option<&str>) -> Result<(), LocalError> {
    if account == Some(user) {
        return Ok(());
    }
    Err(LocalError::Identity(format!(
        "the system account found for {user:?} is named {:?}: a user runs only as the \
         account of exactly their name",
        account.unwrap_or("?")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_account_found_under_another_name_is_refused() {
        assert!(exactly_named("alice", Some("alice")).is_ok());
        for found in [Some("Alice"), Some("alice "), None] {
            let err = exactly_named("alice", found).unwrap_err().to_string();
            assert!(err.contains("exactly their name"), "{err}");
        }
        let err = exactly_named("Alice", Some("alice"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("named \"alice\""), "{err}");
    }

    #[test]
    fn shared_mode_runs_as_the_gateway() {
        let ids = Identities::new(Isolation::Shared).unwrap();
        assert!(!ids.isolated());
        assert_eq!(ids.resolve("alice").unwrap(), None);
    }

    #[test]
    fn uid_ranges_allocate_stable_distinct_uids() {
        let dir = std::env::temp_dir().join(format!("dgrs-uids-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let map_file = dir.join("uids.json");
        let policy = Isolation::UidRange {
            first: 70000,
            count: 2,
            map_file: map_file.clone(),
        };
        let ids = Identities::new(policy.clone()).unwrap();
        let alice = ids.resolve("alice").unwrap().unwrap();
        let bob = ids.resolve("bob").unwrap().unwrap();
        assert_eq!((alice.uid, alice.gid, bob.uid), (70000, 70000, 70001));
        assert_eq!(ids.resolve("alice").unwrap().unwrap(), alice);
        let full = ids.resolve("carol").unwrap_err().to_string();
        assert!(full.contains("are taken"), "{full}");
        // A restarted gateway gives everyone the same uid again.
        let again = Identities::new(policy).unwrap();
        assert_eq!(again.resolve("bob").unwrap().unwrap().uid, 70001);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&map_file).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_dir_all(dir).unwrap();
        assert!(Identities::new(Isolation::UidRange {
            first: 0,
            count: 5,
            map_file: "/nonexistent".into()
        })
        .is_err());
    }

    #[test]
    fn system_users_are_looked_up_and_root_refused() {
        let ids = Identities::new(Isolation::SystemUsers).unwrap();
        let nobody = ids.resolve("nobody").unwrap().unwrap();
        assert_ne!(nobody.uid, 0);
        assert!(ids
            .resolve("root")
            .unwrap_err()
            .to_string()
            .contains("never run as root"));
        assert!(ids
            .resolve("no-such-user-here")
            .unwrap_err()
            .to_string()
            .contains("no system account"));
        assert!(ids.resolve("bad\0name").is_err());
    }
}

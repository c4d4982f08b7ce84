//! The tunnel's copy of a cluster's certificate and key on disk, where only the user can read
//! or replace it.
//!
//! A directory of the tool's own choosing is new and has a random name (`mkdtemp`'s rule), so
//! nobody can have made it first. A directory the user names must be theirs and writable by
//! nobody else. Each file is written under a fresh name that no link may already hold, and
//! renamed into place, so a planted file or symbolic link is replaced, never written through.

use std::fs::{DirBuilder, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Written credentials: removed by [`CredentialFiles::remove`] (the whole directory when the
/// tool made it, the key otherwise).
pub struct CredentialFiles {
    dir: PathBuf,
    temporary: bool,
    /// The certificate (also the CA: the cluster's certificate is self-signed).
    pub cert: PathBuf,
    /// The private key.
    pub key: PathBuf,
}

impl CredentialFiles {
    /// Writes `cert_pem` and `key_pem` (mode 0600) into `dir`, or into a new private
    /// directory under the temporary directory named after `cluster`.
    pub fn write(
        dir: Option<PathBuf>,
        cluster: &str,
        cert_pem: &str,
        key_pem: &str,
    ) -> Result<Self, String> {
        let (dir, temporary) = match dir {
            Some(d) => (private_dir(d)?, false),
            None => (new_temporary_dir(&std::env::temp_dir(), cluster)?, true),
        };
        let files = CredentialFiles {
            cert: dir.join("dask.crt"),
            key: dir.join("dask.pem"),
            dir,
            temporary,
        };
        let written = replace_file(&files.cert, cert_pem.as_bytes())
            .and_then(|()| replace_file(&files.key, key_pem.as_bytes()));
        if let Err(e) = written {
            files.remove();
            return Err(e);
        }
        Ok(files)
    }

    /// Removes what [`Self::write`] left.
    pub fn remove(&self) {
        if self.temporary {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            let _ = std::fs::remove_file(&self.key);
        }
    }
}

/// A new directory `<base>/gateway-cli-<cluster>-<random>`, mode 0700; an existing one is
/// never reused.
fn new_temporary_dir(base: &Path, cluster: &str) -> Result<PathBuf, String> {
    for _ in 0..16 {
        let dir = base.join(format!("gateway-cli-{cluster}-{}", random_hex()?));
        match DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(format!("creating {}: {e}", dir.display())),
        }
    }
    Err(format!(
        "could not make a new directory under {}",
        base.display()
    ))
}

/// `dir`, made (mode 0700) if missing; an existing one must be a directory (not a link) of
/// this user that nobody else may write to.
fn private_dir(dir: PathBuf) -> Result<PathBuf, String> {
    match std::fs::symlink_metadata(&dir) {
        Err(e) if e.kind() == ErrorKind::NotFound => {
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent)
                    .map_err(|e| format!("creating {}: {e}", parent.display()))?;
            }
            DirBuilder::new()
                .mode(0o700)
                .create(&dir)
                .map_err(|e| format!("creating {}: {e}", dir.display()))?;
            Ok(dir)
        }
        Err(e) => Err(format!("{}: {e}", dir.display())),
        Ok(meta) => {
            // SAFETY: geteuid has no preconditions and cannot fail.
            let me = unsafe { libc::geteuid() };
            if !meta.file_type().is_dir() {
                Err(format!(
                    "--credentials-dir {} is not a directory",
                    dir.display()
                ))
            } else if meta.uid() != me || meta.mode() & 0o022 != 0 {
                Err(format!(
                    "--credentials-dir {} is not a private directory of yours (owner uid {}, mode {:o}): the cluster's key must not be where others can replace it",
                    dir.display(),
                    meta.uid(),
                    meta.mode() & 0o7777
                ))
            } else {
                Ok(dir)
            }
        }
    }
}

/// Writes `path` as a new file of mode 0600: under a fresh name first (never through a link
/// or into a file someone else made), then renamed over whatever `path` was.
fn replace_file(path: &Path, content: &[u8]) -> Result<(), String> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let fresh = path.with_file_name(format!(".{name}.{}", random_hex()?));
    let io = |e: std::io::Error| format!("writing {}: {e}", path.display());
    let write = || -> std::io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&fresh)?;
        f.write_all(content)?;
        f.sync_all()?;
        std::fs::rename(&fresh, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&fresh);
        io(e)
    })
}

/// 16 random hex digits from the kernel.
fn random_hex() -> Result<String, String> {
    let mut bytes = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| format!("reading /dev/urandom: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn scratch(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("gateway-cli-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().mode() & 0o777
    }

    #[test]
    fn a_temporary_directory_is_new_private_and_removed() {
        let base = scratch("tmp");
        let a = new_temporary_dir(&base, "c").unwrap();
        let b = new_temporary_dir(&base, "c").unwrap();
        assert_ne!(a, b);
        assert_eq!(mode(&a), 0o700);
        let files = CredentialFiles {
            cert: a.join("dask.crt"),
            key: a.join("dask.pem"),
            dir: a.clone(),
            temporary: true,
        };
        replace_file(&files.key, b"key").unwrap();
        assert_eq!(mode(&files.key), 0o600);
        files.remove();
        assert!(!a.exists());
        std::fs::remove_dir_all(base).unwrap();
    }

    #[test]
    fn planted_files_and_links_are_replaced_not_written_through() {
        let dir = scratch("planted");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let victim = dir.join("victim");
        std::fs::write(&victim, "precious").unwrap();
        std::os::unix::fs::symlink(&victim, dir.join("dask.crt")).unwrap();
        std::fs::write(dir.join("dask.pem"), "old").unwrap();
        std::fs::set_permissions(dir.join("dask.pem"), std::fs::Permissions::from_mode(0o666))
            .unwrap();
        let files = CredentialFiles::write(Some(dir.clone()), "c", "CERT", "KEY").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert_eq!(std::fs::read_to_string(&files.cert).unwrap(), "CERT");
        assert!(std::fs::symlink_metadata(&files.cert).unwrap().is_file());
        assert_eq!(std::fs::read_to_string(&files.key).unwrap(), "KEY");
        assert_eq!(mode(&files.key), 0o600);
        files.remove();
        assert!(!files.key.exists() && files.cert.exists());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_directory_others_may_write_to_is_refused() {
        let dir = scratch("open");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = CredentialFiles::write(Some(dir.clone()), "c", "C", "K")
            .err()
            .unwrap();
        assert!(e.contains("not a private directory"), "{e}");
        assert!(!dir.join("dask.pem").exists());
        let link = dir.with_extension("link");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        let e = CredentialFiles::write(Some(link.clone()), "c", "C", "K")
            .err()
            .unwrap();
        assert!(e.contains("not a directory"), "{e}");
        std::fs::remove_file(link).unwrap();
        let made = dir.join("new/creds");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let files = CredentialFiles::write(Some(made.clone()), "c", "C", "K").unwrap();
        assert_eq!(mode(&made), 0o700);
        files.remove();
        std::fs::remove_dir_all(dir).unwrap();
    }
}

//! The API token: taken from `ALIGNER_TOKEN` when set, else read from (or generated on first
//! start into) a file only its owner can read. Requests carry it as `Authorization: Bearer
//! TOKEN`; a browser's GET (the dashboard, an event stream, a report link) may carry it as
//! `?token=TOKEN` instead, since a page cannot set headers on those.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rand::RngCore;

/// `$XDG_CONFIG_HOME/aligner/daemon-token`, else `~/.config/aligner/daemon-token`.
pub fn default_token_path() -> PathBuf {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("aligner").join("daemon-token")
}

/// Reads the token file, or creates it (mode 0600, 32 random bytes as hex) when missing.
/// Refuses a file others can read.
pub fn load_or_create_token(path: &Path) -> Result<String> {
    match std::fs::metadata(path) {
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                bail!(
                    "token file {} is readable by others (mode {mode:o})\nhint: chmod 600 {}",
                    path.display(),
                    path.display()
                );
            }
            let token = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read token file {}", path.display()))?
                .trim()
                .to_string();
            if token.len() < 16 {
                bail!(
                    "token file {} holds no usable token (under 16 characters)\nhint: delete it to have a new one generated",
                    path.display()
                );
            }
            Ok(token)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
            }
            let mut bytes = [0u8; 32];
            rand::rngs::OsRng.fill_bytes(&mut bytes);
            let token = hex::encode(bytes);
            // Written under a temporary name and renamed, so a reader never sees a half-written
            // file; when another process created it first, theirs is used.
            let tmp = path.with_extension(format!("tmp{}", std::process::id()));
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .with_context(|| format!("cannot create token file {}", tmp.display()))?;
            writeln!(f, "{token}")?;
            drop(f);
            match std::fs::hard_link(&tmp, path) {
                Ok(()) => {
                    let _ = std::fs::remove_file(&tmp);
                    Ok(token)
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let _ = std::fs::remove_file(&tmp);
                    load_or_create_token(path)
                }
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    Err(e).with_context(|| format!("cannot create token file {}", path.display()))
                }
            }
        }
        Err(e) => Err(e).with_context(|| format!("cannot read token file {}", path.display())),
    }
}

/// Compares in time independent of where the strings differ (`subtle`).
pub fn token_matches(given: &str, expected: &str) -> bool {
    use subtle::ConstantTimeEq;
    bool::from(given.as_bytes().ct_eq(expected.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(token_matches("abcdef0123456789", "abcdef0123456789"));
        assert!(!token_matches("abcdef0123456788", "abcdef0123456789"));
        assert!(!token_matches("abcdef012345678", "abcdef0123456789"));
        assert!(!token_matches("abcdef01234567890", "abcdef0123456789"));
        assert!(!token_matches("", "abcdef0123456789"));
    }

    #[test]
    fn token_file_is_created_private_and_reused() {
        let dir = tempfile_dir();
        let path = dir.join("sub").join("token");
        let t1 = load_or_create_token(&path).unwrap();
        assert_eq!(t1.len(), 64);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load_or_create_token(&path).unwrap(), t1);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_or_create_token(&path).unwrap_err().to_string();
        assert!(err.contains("readable by others"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "aligner-token-test-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}

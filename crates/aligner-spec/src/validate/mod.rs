//! From text to a validated [`Pipeline`], collecting every error it can find.
//!
//! Steps:
//! 1. index node positions with yaml-rust2 (also catches syntax errors and duplicate keys);
//! 2. parse into a `serde_yaml_ng::Value`;
//! 3. report every key that [`KNOWN_FIELDS`](fields::KNOWN_FIELDS) does not allow where it
//!    is (with a did-you-mean) and remove it, so the rest of its block still deserializes;
//! 4. deserialize each block on its own (`models.<name>`, `prompts`, each stage of
//!    `rounds`), so that an error in one does not hide those in the others; inside a
//!    block, after each error the broken field is dropped and the block is read again,
//!    so its other errors are reported too (a block with any error counts as broken);
//! 5. semantic checks (`${VAR}` expansion, path resolution, files on disk, ranges,
//!    references between blocks) on every block that deserialized; only the checks that
//!    need a broken block are skipped (e.g. model references when `models` is broken).
//!
//! No cascades: a field dropped after a type error, or an unknown key that looks like a
//! misspelling of a field, is not then also reported as missing.
//!
//! Every error carries the YAML path of the node at fault and, via the position index, its
//! line and column.
//!
//! This module holds the entry point, the context that collects errors, and the helpers
//! every block uses (values, `${VAR}`s, paths). Step 3's table is built in `fields`, step
//! 4's machinery is in `deserialize`; the other modules mirror the wire types of `wire.rs`,
//! one per block: `pipeline` (the top level), `models`, `prompts`, `sampling`, `rounds`
//! (with `generate` and `correct`), `synthesize`, `train`, `evaluate` and `aligner`.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

use serde_yaml_ng::Value;

use crate::error::{Errors, SpecError};
use crate::position::{Anchor, PositionIndex};
use crate::types::Pipeline;

mod aligner;
mod deserialize;
mod evaluate;
pub(crate) mod fields;
mod models;
mod pipeline;
mod prompts;
mod rounds;
mod sampling;
mod synthesize;
mod train;

/// Looks up an environment variable (`None` when unset).
pub(crate) type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Reads, checks and converts a pipeline.
pub(crate) fn load(
    text: &str,
    file: &Path,
    base_dir: &Path,
    env: EnvLookup<'_>,
) -> Result<Pipeline, Errors> {
    let base_dir = std::path::absolute(base_dir).unwrap_or_else(|_| base_dir.to_path_buf());
    let mut cx = Ctx {
        file,
        base_dir,
        index: PositionIndex::default(),
        env,
        errors: Vec::new(),
        misspelled: HashMap::new(),
        aligner_name: None,
    };

    match PositionIndex::build(text) {
        Ok(index) => cx.index = index,
        Err(e) => {
            cx.push(
                String::new(),
                Some(e.at),
                format!("invalid yaml: {}", e.message),
                None,
            );
            return Err(cx.finish());
        }
    }
    for dup in std::mem::take(&mut cx.index.duplicates) {
        cx.push(
            dup.path,
            Some(dup.at),
            format!("duplicate key `{}`", dup.key),
            Some("each key may appear only once in a mapping".into()),
        );
    }
    if !cx.errors.is_empty() {
        return Err(cx.finish());
    }

    let value: Value = match serde_yaml_ng::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            let at = e.location().map(|l| (l.line(), l.column()));
            let msg = e.to_string();
            let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
            cx.push(String::new(), at, format!("invalid yaml: {msg}"), None);
            return Err(cx.finish());
        }
    };
    if value.is_null() {
        cx.push(
            String::new(),
            None,
            "the pipeline file is empty".into(),
            Some("start with `version: 1`".into()),
        );
        return Err(cx.finish());
    }

    let mut value = value;
    cx.strip_unknown_fields(&mut value, "", "");
    let Some(parts) = cx.parse_blocks(&value) else {
        return Err(cx.finish());
    };
    let pipeline = cx.pipeline(parts);
    match pipeline {
        Some(p) if cx.errors.is_empty() => Ok(p),
        _ => Err(cx.finish()),
    }
}

/// The closest candidate to `name`, if close enough to be a likely typo.
pub(crate) fn did_you_mean<'a>(
    name: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(name, c), c))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

/// `` `a`, `b`, `c` ``.
fn list(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The backticked names in `text`.
fn backticked(text: &str) -> Vec<&str> {
    text.split('`').skip(1).step_by(2).collect()
}

/// The last segment of a dotted path: the field's own name.
fn field_name(path: &str) -> &str {
    let tail = path.rsplit('.').next().unwrap_or(path);
    tail.split('[').next().unwrap_or(tail)
}

/// Removes `.` and resolves `..` lexically (no symlinks are followed).
fn clean_path(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

struct Ctx<'a> {
    file: &'a Path,
    base_dir: PathBuf,
    index: PositionIndex,
    env: EnvLookup<'a>,
    errors: Vec<SpecError>,
    /// Mapping path -> the fields that its unknown keys look like misspellings of (already
    /// reported with a did-you-mean). A "missing field" error for one of them would only
    /// repeat that error, so it is not reported.
    misspelled: HashMap<String, Vec<&'static str>>,
    /// `aligner.name`, once read: `rounds.correct.model` may name it.
    aligner_name: Option<String>,
}

impl Ctx<'_> {
    fn push(
        &mut self,
        yaml_path: String,
        at: Option<(usize, usize)>,
        message: String,
        hint: Option<String>,
    ) {
        self.errors.push(SpecError {
            file: self.file.to_path_buf(),
            line: at.map(|a| a.0),
            column: at.map(|a| a.1),
            yaml_path,
            message,
            hint,
        });
    }

    /// An error about the node at `path`.
    fn err(
        &mut self,
        path: &str,
        anchor: Anchor,
        message: impl Into<String>,
        hint: Option<String>,
    ) {
        let at = self.index.locate(path, anchor);
        self.push(path.to_string(), at, message.into(), hint);
    }

    /// Errors sorted by position (unpositioned ones last), keeping discovery order on ties,
    /// without repeats.
    fn finish(mut self) -> Errors {
        self.errors
            .sort_by_key(|e| (e.line.is_none(), e.line, e.column));
        let mut out: Vec<SpecError> = Vec::with_capacity(self.errors.len());
        for e in std::mem::take(&mut self.errors) {
            if !out.contains(&e) {
                out.push(e);
            }
        }
        Errors(out)
    }

    /// Expands `${VAR}` and `${VAR:-default}` in the value at `path`.
    fn interpolate(&mut self, path: &str, text: &str) -> Option<String> {
        let mut out = String::new();
        let mut rest = text;
        let mut ok = true;
        while let Some(i) = rest.find("${") {
            out.push_str(&rest[..i]);
            let after = &rest[i + 2..];
            let Some(end) = after.find('}') else {
                self.err(
                    path,
                    Anchor::Value,
                    "unterminated `${` in value",
                    Some("write `${NAME}` or `${NAME:-default}`".into()),
                );
                return None;
            };
            let inner = &after[..end];
            let (name, default) = match inner.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (inner, None),
            };
            let valid = !name.is_empty()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !name.starts_with(|c: char| c.is_ascii_digit());
            if !valid {
                self.err(
                    path,
                    Anchor::Value,
                    format!("invalid environment variable name `{name}`"),
                    Some("write `${NAME}` or `${NAME:-default}`".into()),
                );
                ok = false;
            } else {
                match (
                    (self.env)(name).filter(|v| !v.is_empty() || default.is_none()),
                    default,
                ) {
                    (Some(v), _) => out.push_str(&v),
                    (None, Some(d)) => out.push_str(d),
                    (None, None) => {
                        self.err(
                            path,
                            Anchor::Value,
                            format!("environment variable `{name}` is not set"),
                            Some(format!(
                                "`export {name}=...`, or give a default: `${{{name}:-...}}`"
                            )),
                        );
                        ok = false;
                    }
                }
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        ok.then_some(out)
    }

    /// Expands, then resolves against the pipeline's folder (`~/` against `$HOME`).
    fn path_value(&mut self, path: &str, text: &str) -> Option<(String, PathBuf)> {
        let expanded = self.interpolate(path, text)?;
        if expanded.trim().is_empty() {
            self.err(
                path,
                Anchor::Value,
                format!("`{}` is empty", field_name(path)),
                None,
            );
            return None;
        }
        let raw = match expanded.strip_prefix("~/") {
            Some(rest) => match (self.env)("HOME") {
                Some(home) => Path::new(&home).join(rest),
                None => PathBuf::from(&expanded),
            },
            None => PathBuf::from(&expanded),
        };
        let resolved = clean_path(&if raw.is_absolute() {
            raw
        } else {
            self.base_dir.join(raw)
        });
        if resolved.to_str().is_none() {
            self.err(
                path,
                Anchor::Value,
                "path is not valid UTF-8",
                Some(format!("resolved to `{}`", resolved.display())),
            );
            return None;
        }
        Some((expanded, resolved))
    }

    /// Records an error unless `ok`; `constraint` reads after "must be".
    fn expect(
        &mut self,
        path: &str,
        ok: bool,
        constraint: &str,
        got: impl std::fmt::Display,
    ) -> bool {
        if !ok {
            self.err(
                path,
                Anchor::Value,
                format!("`{}` must be {constraint}, got `{got}`", field_name(path)),
                None,
            );
        }
        ok
    }
}

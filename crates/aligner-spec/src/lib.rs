//! Pipeline files for aligner: the YAML wire format, its validation, and the validated
//! types the engine runs.
//!
//! A pipeline (`version: 1`) names its models, its prompts and the stages of each round:
//! generate -> correct -> synthesize -> train (and optionally evaluate). Loading it
//!
//! * rejects unknown keys (with a did-you-mean hint) and wrong types;
//! * expands `${VAR}` / `${VAR:-default}` in path, URL and command fields;
//! * resolves relative paths against the file's folder and checks the files exist
//!   (prompts, GGUF header, Hugging Face folder contents);
//! * checks ranges and references between blocks (model names, `serve_model`, ...);
//!
//! and reports every problem it finds with file, line, column and YAML path:
//!
//! ```text
//! error: unknown field `temprature`
//!   --> pipelines/x.yaml:14:7
//!    at: rounds.generate.sampling.temprature
//!   hint: did you mean `temperature`?
//! ```
//!
//! A validated [`Pipeline`] has a canonical JSON [`snapshot`](Pipeline::snapshot), a
//! [`hash`](Pipeline::hash) of it, and [`diff_snapshots`] to say what changed between runs.

mod error;
mod gguf;
mod invalid;
mod position;
pub mod sentences;
mod snapshot;
mod template;
mod types;
mod validate;
mod wire;

use std::path::Path;

pub use error::{Errors, SpecError};
pub use invalid::Invalid;
pub use snapshot::{diff_snapshots, hash_snapshot, Change};
pub use template::{
    fill, join_step, render_history, StreamTemplate, EDITOR_PROMPT, HISTORY_FORMAT, REFUSAL_TEXTS,
    STREAM_ALIGNER_V1,
};
pub use types::*;

impl Pipeline {
    /// Reads and validates a pipeline file. Relative paths in the YAML resolve against the
    /// file's folder; `${VAR}`s are read from the process environment.
    pub fn from_path(path: &Path) -> Result<Pipeline, Errors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Errors(vec![SpecError {
                file: path.to_path_buf(),
                line: None,
                column: None,
                yaml_path: String::new(),
                message: format!(
                    "cannot read the pipeline file: {}",
                    e.to_string().to_lowercase()
                ),
                hint: None,
            }])
        })?;
        let base_dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        Pipeline::from_yaml(&text, path, base_dir)
    }

    /// Validates pipeline text. `file` is used in messages (and for the default name),
    /// `base_dir` to resolve relative paths; `${VAR}`s come from the process environment.
    pub fn from_yaml(text: &str, file: &Path, base_dir: &Path) -> Result<Pipeline, Errors> {
        Pipeline::from_yaml_with_env(text, file, base_dir, |name| {
            std::env::var_os(name).map(|v| v.to_string_lossy().into_owned())
        })
    }

    /// As [`from_yaml`](Pipeline::from_yaml), reading `${VAR}`s through `env` instead of the
    /// process environment (for tests and for callers with their own variables).
    pub fn from_yaml_with_env(
        text: &str,
        file: &Path,
        base_dir: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Pipeline, Errors> {
        validate::load(text, file, base_dir, &env)
    }
}

#[cfg(test)]
mod tests;

/// `aligner validate`: each file checked. Returns what goes to stdout (an `ok:` line per valid
/// file, or with `json` its snapshot), what goes to stderr (every error of the others) and how
/// many did not validate.
pub fn check_files(files: &[std::path::PathBuf], json: bool) -> (String, String, usize) {
    let (mut out, mut errors, mut bad) = (String::new(), String::new(), 0);
    for file in files {
        match Pipeline::from_path(file) {
            Ok(spec) if json => {
                let snapshot = serde_json::to_string_pretty(&spec.snapshot()).unwrap_or_default();
                out.push_str(&format!("{snapshot}\n"));
            }
            Ok(spec) => out.push_str(&format!(
                "ok: `{}` ({} rounds, {} models)\n",
                file.display(),
                spec.rounds.count,
                spec.models.len()
            )),
            Err(e) => {
                bad += 1;
                errors.push_str(&format!("{e}\n"));
            }
        }
    }
    (out, errors, bad)
}

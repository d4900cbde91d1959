//! From text to a validated [`Pipeline`], collecting every error it can find.
//!
//! Steps:
//! 1. index node positions with yaml-rust2 (also catches syntax errors and duplicate keys);
//! 2. parse into a `serde_yaml::Value`;
//! 3. report every key that [`KNOWN_FIELDS`] does not allow where it is (with a
//!    did-you-mean) and remove it, so the rest of its block still deserializes;
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

use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};

use serde::de::DeserializeOwned;
use serde_path_to_error::Segment;
use serde_yaml::Value;

use crate::error::{Errors, SpecError};
use crate::position::{join, Anchor, PositionIndex};
use crate::types::*;
use crate::wire::*;

/// Looks up an environment variable (`None` when unset).
pub(crate) type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The built-in trainer's options as written, wherever they appear.
struct BuiltinWire<'a> {
    lora: Option<&'a LoraWire>,
    train_layers: Option<u32>,
    seed: Option<u64>,
    weight_decay: Option<f64>,
    max_grad_norm: Option<f64>,
    save_every: Option<u32>,
}

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

    let value: Value = match serde_yaml::from_str(text) {
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

/// The blocks of the file, each deserialized on its own so that an error in one does not
/// hide those in the others. `None` marks a block or field that failed to deserialize (its
/// errors are recorded): the checks that need it are skipped, the others still run.
struct Parts {
    version: Option<Option<u64>>,
    name: Option<Option<String>>,
    store: Option<Option<String>>,
    workdir: Option<Option<String>>,
    /// `None` when `models` is not a mapping; empty when it is absent or null.
    models: Option<BTreeMap<String, ModelEntry>>,
    /// `None` when missing or broken.
    prompts: Option<PromptsWire>,
    rounds: RoundsParts,
    /// `Some(None)` when absent, `None` when broken.
    aligner: Option<Option<AlignerWire>>,
}

/// One entry of `models:`.
struct ModelEntry {
    /// `None` when the entry failed to deserialize.
    wire: Option<ModelWire>,
    /// Its `kind`, when that much is readable (even if other fields are broken).
    kind: Option<ModelKind>,
}

/// The stages of `rounds:`; all `None` when `rounds` is missing or not a mapping.
#[derive(Default)]
struct RoundsParts {
    count: Option<Option<u32>>,
    generate: Option<GenerateWire>,
    correct: Option<CorrectWire>,
    synthesize: Option<Option<SynthesizeWire>>,
    train: Option<Option<TrainWire>>,
    evaluate: Option<Option<EvaluateWire>>,
}

/// The field named by a serde "missing field `x`" message.
fn missing_field(msg: &str) -> Option<&str> {
    msg.strip_prefix("missing field `")?.split('`').next()
}

/// Removes the mapping entry at `parents` + `last` from `value`; `None` when there is none.
fn remove_entry(value: &mut Value, parents: &[Segment], last: &Segment) -> Option<()> {
    let mut node = value;
    for seg in parents {
        node = match seg {
            Segment::Map { key } => node.get_mut(key.as_str())?,
            Segment::Seq { index } => node.get_mut(*index)?,
            _ => return None,
        };
    }
    match last {
        Segment::Map { key } => node
            .as_mapping_mut()?
            .shift_remove(key.as_str())
            .map(|_| ()),
        _ => None,
    }
}

/// serde_path_to_error segments below `prefix`, in our dotted form.
fn segments_string<'a>(prefix: &str, segments: impl IntoIterator<Item = &'a Segment>) -> String {
    let mut out = prefix.to_string();
    for seg in segments {
        match seg {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => out = join(&out, key),
            Segment::Unknown => out = join(&out, "?"),
        }
    }
    out
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

fn is_env_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_uppercase() || c == '_')
        && chars.all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

fn is_pipeline_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Whether an `api_key_env` value looks like a key rather than a variable name.
fn looks_like_key(s: &str) -> bool {
    let prefixes = ["sk-", "sk_", "hf_", "gsk_", "xai-", "key-", "bearer "];
    let lower = s.to_ascii_lowercase();
    prefixes.iter().any(|p| lower.starts_with(p))
        || (s.len() >= 20 && !is_env_name(s) && !s.contains(' '))
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

    // ----- structural (serde) errors -------------------------------------------------

    /// Turns a serde message about the node at `path` into a positioned error with a hint.
    fn serde_error(&mut self, path: String, msg: String) {
        let (head, expected) = match msg.split_once(", expected ") {
            Some((h, e)) => (h, Some(e)),
            None => match msg.split_once(", there are no fields") {
                Some((h, _)) => (h, None),
                None => (msg.as_str(), None),
            },
        };
        if let Some(name) = head
            .strip_prefix("unknown field `")
            .and_then(|s| s.strip_suffix('`'))
        {
            let expected = expected.map(backticked).unwrap_or_default();
            let path = if field_name(&path) == name {
                path
            } else {
                join(&path, name)
            };
            self.unknown_field(&path, name, &expected);
        } else if let Some(name) = head
            .strip_prefix("unknown variant `")
            .and_then(|s| s.strip_suffix('`'))
        {
            let hint = expected
                .and_then(|e| did_you_mean(name, backticked(e)))
                .map(|m| format!("did you mean `{m}`?"));
            self.err(&path, Anchor::Value, msg.clone(), hint);
        } else if head.starts_with("missing field") {
            self.err(&path, Anchor::Key, msg.clone(), None);
        } else {
            let msg = msg
                .replace("expected u32", "expected a whole number")
                .replace("expected u64", "expected a whole number")
                .replace("expected f64", "expected a number");
            self.err(&path, Anchor::Value, msg, None);
        }
    }

    /// Reports an unknown field; returns the field it probably meant, if any.
    fn unknown_field<'e>(
        &mut self,
        path: &str,
        name: &str,
        expected: &[&'e str],
    ) -> Option<&'e str> {
        let meant = did_you_mean(name, expected.iter().copied());
        let hint = match meant {
            Some(m) => Some(format!("did you mean `{m}`?")),
            None if !expected.is_empty() => Some(format!("valid fields here: {}", list(expected))),
            None => None,
        };
        self.err(path, Anchor::Key, format!("unknown field `{name}`"), hint);
        meant
    }

    /// Reports every key that [`KNOWN_FIELDS`] does not allow at its place and removes it
    /// from `value` (the node at `path`, whose pattern is `pattern`), so that the rest of
    /// its block still deserializes and gets checked.
    fn strip_unknown_fields(&mut self, value: &mut Value, path: &str, pattern: &str) {
        let Some(map) = value.as_mapping_mut() else {
            return;
        };
        if let Some(allowed) = known_fields(pattern) {
            let unknown: Vec<Value> = map
                .keys()
                .filter(|k| k.as_str().is_some_and(|k| !allowed.contains(&k)))
                .cloned()
                .collect();
            for key in unknown {
                let name = key.as_str().unwrap_or_default();
                if let Some(meant) = self.unknown_field(&join(path, name), name, allowed) {
                    self.misspelled
                        .entry(path.to_string())
                        .or_default()
                        .push(meant);
                }
                map.shift_remove(&key);
            }
        }
        for (k, v) in map.iter_mut() {
            if let Some(key) = k.as_str() {
                self.strip_unknown_fields(v, &join(path, key), &child_pattern(pattern, key));
            }
        }
    }

    /// Whether an unknown key of the mapping at `path` looks like a misspelled `field`
    /// (then a "missing `field`" error would only repeat the unknown-field one).
    fn is_misspelled(&self, path: &str, field: &str) -> bool {
        self.misspelled
            .get(path)
            .is_some_and(|fields| fields.contains(&field))
    }

    /// An error about a missing `field` of the mapping at `path`, unless an unknown key
    /// there already looks like a misspelling of it.
    fn missing(
        &mut self,
        path: &str,
        field: &str,
        message: impl Into<String>,
        hint: Option<String>,
    ) {
        if !self.is_misspelled(path, field) {
            self.err(path, Anchor::Key, message, hint);
        }
    }

    /// Deserializes `value` (the node at `path`) as a `T`, recording every error serde
    /// finds in it: after each error, the innermost field on its path is dropped and
    /// deserializing is tried again, until it succeeds or the error is about the node
    /// itself. `None` when there was any error.
    fn parse<T: DeserializeOwned>(&mut self, value: &Value, path: &str) -> Option<T> {
        let mut value = std::borrow::Cow::Borrowed(value);
        let mut dropped: Vec<String> = Vec::new();
        loop {
            let err = match serde_path_to_error::deserialize::<_, T>(value.as_ref()) {
                Ok(t) => return dropped.is_empty().then_some(t),
                Err(e) => e,
            };
            let segments: Vec<Segment> = err.path().iter().cloned().collect();
            let at = segments_string(path, &segments);
            let msg = err.into_inner().to_string();
            if let Some(field) = missing_field(&msg) {
                // Missing because it was dropped after an error, or misspelled: said already.
                if dropped.contains(&join(&at, field)) || self.is_misspelled(&at, field) {
                    return None;
                }
            }
            self.serde_error(at, msg);
            let i = segments
                .iter()
                .rposition(|s| matches!(s, Segment::Map { .. }))?;
            remove_entry(value.to_mut(), &segments[..i], &segments[i])?;
            dropped.push(segments_string(path, &segments[..=i]));
            if dropped.len() > 256 {
                return None;
            }
        }
    }

    /// Deserializes the file block by block (see [`Parts`]); `None` when it is not a
    /// mapping at all.
    fn parse_blocks(&mut self, root: &Value) -> Option<Parts> {
        let Some(map) = root.as_mapping() else {
            if self.parse::<PipelineWire>(root, "").is_some() {
                self.err(
                    "",
                    Anchor::Value,
                    "the pipeline file must be a mapping",
                    None,
                );
            }
            return None;
        };
        let mut parts = Parts {
            version: Some(None),
            name: Some(None),
            store: Some(None),
            workdir: Some(None),
            models: Some(BTreeMap::new()),
            prompts: None,
            rounds: RoundsParts::default(),
            aligner: Some(None),
        };
        let (mut has_prompts, mut has_rounds) = (false, false);
        for (k, v) in map {
            let Some(key) = k.as_str() else {
                self.err("", Anchor::Value, "top-level keys must be strings", None);
                continue;
            };
            match key {
                "version" => parts.version = self.parse(v, key),
                "name" => parts.name = self.parse(v, key),
                "store" => parts.store = self.parse(v, key),
                "workdir" => parts.workdir = self.parse(v, key),
                "models" => parts.models = self.parse_models(v),
                "prompts" => {
                    has_prompts = true;
                    parts.prompts = self.parse(v, key);
                }
                "rounds" => {
                    has_rounds = true;
                    parts.rounds = self.parse_rounds(v);
                }
                "aligner" => parts.aligner = self.parse(v, key),
                // Reported and removed by `strip_unknown_fields`.
                _ => {}
            }
        }
        for (required, present) in [("prompts", has_prompts), ("rounds", has_rounds)] {
            if !present {
                self.missing("", required, format!("missing field `{required}`"), None);
            }
        }
        Some(parts)
    }

    /// Deserializes each entry of `models:` on its own.
    fn parse_models(&mut self, value: &Value) -> Option<BTreeMap<String, ModelEntry>> {
        if value.is_null() {
            return Some(BTreeMap::new());
        }
        let Some(map) = value.as_mapping() else {
            self.parse::<BTreeMap<String, ModelWire>>(value, "models");
            return None;
        };
        let mut out = BTreeMap::new();
        for (k, v) in map {
            let kind = v
                .get("kind")
                .and_then(|k| serde_yaml::from_value::<ModelKind>(k.clone()).ok());
            match k.as_str() {
                Some(name) => {
                    let wire = self.parse::<ModelWire>(v, &join("models", name));
                    out.insert(name.to_string(), ModelEntry { wire, kind });
                }
                None => {
                    // Let serde say what it thinks of the key.
                    let mut single = serde_yaml::Mapping::new();
                    single.insert(k.clone(), v.clone());
                    let parsed = self
                        .parse::<BTreeMap<String, ModelWire>>(&Value::Mapping(single), "models");
                    for (name, wire) in parsed.into_iter().flatten() {
                        out.insert(
                            name,
                            ModelEntry {
                                wire: Some(wire),
                                kind,
                            },
                        );
                    }
                }
            }
        }
        Some(out)
    }

    /// Deserializes each stage of `rounds:` on its own.
    fn parse_rounds(&mut self, value: &Value) -> RoundsParts {
        let Some(map) = value.as_mapping() else {
            self.parse::<RoundsWire>(value, "rounds");
            return RoundsParts::default();
        };
        let mut parts = RoundsParts {
            count: Some(None),
            generate: None,
            correct: None,
            synthesize: Some(None),
            train: Some(None),
            evaluate: Some(None),
        };
        for (k, v) in map {
            let key = k.as_str().unwrap_or("?");
            let path = join("rounds", key);
            match key {
                "count" => parts.count = self.parse(v, &path),
                "generate" => parts.generate = self.parse(v, &path),
                "correct" => parts.correct = self.parse(v, &path),
                "synthesize" => parts.synthesize = self.parse(v, &path),
                "train" => parts.train = self.parse(v, &path),
                "evaluate" => parts.evaluate = self.parse(v, &path),
                _ => {
                    self.unknown_field(&path, key, ROUNDS_FIELDS);
                }
            }
        }
        for required in ["generate", "correct"] {
            if !map.contains_key(required) {
                self.missing(
                    "rounds",
                    required,
                    format!("missing field `{required}`"),
                    None,
                );
            }
        }
        parts
    }

    // ----- values ----------------------------------------------------------------------

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

    /// Checks that `name` is defined in `models` (`None` when `models` is broken: then
    /// nothing is checked).
    fn model_ref(&mut self, path: &str, name: &str, models: Option<&BTreeMap<String, ModelEntry>>) {
        let Some(models) = models else {
            return;
        };
        if models.is_empty() || models.contains_key(name) {
            return;
        }
        if path == "rounds.correct.model" && self.aligner_name.as_deref() == Some(name) {
            return;
        }
        let names: Vec<&str> = models.keys().map(String::as_str).collect();
        let hint = match did_you_mean(name, names.iter().copied()) {
            Some(m) => format!("did you mean `{m}`?"),
            None => format!("models defined: {}", list(&names)),
        };
        self.err(
            path,
            Anchor::Value,
            format!("model `{name}` is not defined in `models`"),
            Some(hint),
        );
    }

    // ----- blocks ----------------------------------------------------------------------

    fn pipeline(&mut self, w: Parts) -> Option<Pipeline> {
        match w.version {
            // Broken: reported already.
            None => {}
            Some(None) => self.missing(
                "",
                "version",
                "missing field `version`",
                Some("add `version: 1`".into()),
            ),
            Some(Some(1)) => {}
            Some(Some(v)) => self.err(
                "version",
                Anchor::Value,
                format!("unsupported version `{v}`"),
                Some("this aligner reads `version: 1`".into()),
            ),
        }

        let name = match w.name {
            None => None,
            Some(Some(n)) => {
                if !is_pipeline_name(&n) {
                    self.err(
                        "name",
                        Anchor::Value,
                        format!("invalid pipeline name `{n}`"),
                        Some("use letters, digits, `_`, `.` and `-`".into()),
                    );
                }
                Some(n)
            }
            Some(None) => {
                let stem = self
                    .file
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .unwrap_or_default()
                    .to_string();
                if !is_pipeline_name(&stem) {
                    self.missing(
                        "",
                        "name",
                        format!("cannot use the file name `{stem}` as the pipeline name"),
                        Some("add `name:` (letters, digits, `_`, `.` and `-`)".into()),
                    );
                }
                Some(stem)
            }
        };

        let store = w.store.map(|store| {
            store
                .as_deref()
                .and_then(|s| self.path_value("store", s))
                .map(|(_, p)| p)
        });
        let workdir = w.workdir.and_then(|workdir| {
            self.path_value("workdir", workdir.as_deref().unwrap_or("runs"))
                .map(|(_, p)| p)
        });

        let hint =
            || Some("define at least one model, e.g. `upstream:` with `kind: openai`".to_string());
        let mut models = BTreeMap::new();
        if let Some(entries) = &w.models {
            if entries.is_empty() {
                if self.index.contains("models") {
                    self.err("models", Anchor::Key, "`models` is empty", hint());
                } else {
                    self.missing("", "models", "missing field `models`", hint());
                }
            }
            for (name, entry) in entries {
                self.model_name(name);
                if let Some(spec) = entry.wire.as_ref().and_then(|mw| self.model(name, mw)) {
                    models.insert(name.clone(), spec);
                }
            }
        }

        let prompts = w.prompts.as_ref().and_then(|p| self.prompts("prompts", p));
        if let Some(Some(a)) = &w.aligner {
            self.aligner_name = Some(a.name.clone().unwrap_or_else(|| "aligner".into()));
        }
        let rounds = self.rounds(&w.rounds, w.models.as_ref());
        if let (Some(p), Some(Some(e))) = (&prompts, rounds.as_ref().map(|r| r.evaluate.as_ref())) {
            if p.holdout <= 0.0 {
                self.err(
                    "rounds.evaluate",
                    Anchor::Key,
                    "evaluation needs held-out prompts, and `prompts.holdout` is 0",
                    Some(
                        "hold some prompts out of training, e.g. `prompts: { holdout: 0.2 }`"
                            .into(),
                    ),
                );
            }
            if let Some(l) = &e.labels {
                if !p.metadata_fields.contains(&l.field) {
                    self.err(
                        "rounds.evaluate.labels.field",
                        Anchor::Value,
                        format!("`{}` is not among `prompts.fields.metadata`", l.field),
                        Some(format!("add it: `fields: {{ metadata: [{}] }}`", l.field)),
                    );
                }
            }
        }
        let aligner = match &w.aligner {
            None => None,
            Some(None) => Some(None),
            Some(Some(a)) => self
                .aligner(a, w.models.as_ref(), rounds.as_ref())
                .map(Some),
        };

        Some(Pipeline {
            name: name?,
            store: store?,
            workdir: workdir?,
            models,
            prompts: prompts?,
            rounds: rounds?,
            aligner: aligner?,
        })
    }

    fn model_name(&mut self, name: &str) {
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            self.err(
                &join("models", name),
                Anchor::Key,
                format!("invalid model name `{name}`"),
                Some("use letters, digits, `_` and `-`".into()),
            );
        }
    }

    fn model(&mut self, name: &str, w: &ModelWire) -> Option<ModelSpec> {
        let path = join("models", name);
        let (kind_name, allowed) = match w.kind {
            ModelKind::Openai => ("openai", OPENAI_FIELDS),
            ModelKind::Local => ("local", LOCAL_FIELDS),
        };
        let errors_before = self.errors.len();
        for (field, kind) in w.set_fields() {
            if kind != w.kind {
                self.err(
                    &join(&path, field),
                    Anchor::Key,
                    format!("field `{field}` does not apply to `kind: {kind_name}`"),
                    Some(format!("`kind: {kind_name}` takes {}", list(allowed))),
                );
            }
        }
        let spec = match w.kind {
            ModelKind::Openai => self.openai_model(&path, w).map(ModelSpec::Openai),
            ModelKind::Local => self.local_model(&path, w).map(ModelSpec::Local),
        };
        spec.filter(|_| self.errors.len() == errors_before)
    }

    fn openai_model(&mut self, path: &str, w: &ModelWire) -> Option<OpenAiModel> {
        let mut ok = true;
        let base_url = match &w.base_url {
            None => {
                self.missing(
                    path,
                    "base_url",
                    "missing field `base_url` for `kind: openai`",
                    Some("e.g. `base_url: http://127.0.0.1:8000/v1`".into()),
                );
                None
            }
            Some(raw) => {
                let p = join(path, "base_url");
                let url = self.interpolate(&p, raw);
                url.filter(|u| {
                    let good = url::Url::parse(u).is_ok_and(|parsed| {
                        matches!(parsed.scheme(), "http" | "https") && parsed.has_host()
                    });
                    if !good {
                        self.err(
                            &p,
                            Anchor::Value,
                            format!("`base_url` is not an http(s) url: `{u}`"),
                            Some("e.g. `http://127.0.0.1:8000/v1`".into()),
                        );
                    }
                    good
                })
                .map(|u| u.trim_end_matches('/').to_string())
            }
        };
        let model = match &w.model {
            Some(m) if !m.trim().is_empty() => Some(m.clone()),
            Some(_) => {
                self.err(
                    &join(path, "model"),
                    Anchor::Value,
                    "`model` is empty",
                    None,
                );
                None
            }
            None => {
                self.missing(
                    path,
                    "model",
                    "missing field `model` for `kind: openai`",
                    Some("the model name the server expects, e.g. `model: gpt-4o-mini`".into()),
                );
                None
            }
        };
        if let Some(key_env) = &w.api_key_env {
            let p = join(path, "api_key_env");
            // Never echo the value: it may be the key itself.
            if looks_like_key(key_env) {
                self.err(
                    &p,
                    Anchor::Value,
                    "`api_key_env` looks like an api key; it must be the name of an environment variable",
                    Some("keep the key out of the file: `export OPENAI_API_KEY=...` and write `api_key_env: OPENAI_API_KEY`".into()),
                );
                ok = false;
            } else if !is_env_name(key_env) {
                self.err(
                    &p,
                    Anchor::Value,
                    "`api_key_env` is not a valid environment variable name",
                    Some("use upper-case letters, digits and `_`, e.g. `OPENAI_API_KEY`".into()),
                );
                ok = false;
            }
        }
        let max_concurrency = w.max_concurrency.unwrap_or(16);
        ok &= self.expect(
            &join(path, "max_concurrency"),
            (1..=4096).contains(&max_concurrency),
            "between 1 and 4096",
            max_concurrency,
        );
        if let Some(rpm) = w.requests_per_minute {
            ok &= self.expect(
                &join(path, "requests_per_minute"),
                rpm >= 1,
                "at least 1",
                rpm,
            );
        }
        if let Some(tpm) = w.tokens_per_minute {
            ok &= self.expect(
                &join(path, "tokens_per_minute"),
                tpm >= 1,
                "at least 1",
                tpm,
            );
        }
        let timeout_secs = w.timeout.map_or(120.0, |d| d.secs);
        ok &= self.expect(
            &join(path, "timeout"),
            timeout_secs.is_finite() && timeout_secs > 0.0,
            "more than 0 seconds",
            timeout_secs,
        );
        let max_retries = w.max_retries.unwrap_or(5);
        ok &= self.expect(
            &join(path, "max_retries"),
            max_retries <= 100,
            "between 0 and 100",
            max_retries,
        );
        let (base_url, model) = (base_url?, model?);
        ok.then(|| OpenAiModel {
            base_url,
            model,
            api_key_env: w.api_key_env.clone(),
            max_concurrency,
            requests_per_minute: w.requests_per_minute,
            tokens_per_minute: w.tokens_per_minute,
            timeout_secs,
            max_retries,
        })
    }

    fn local_model(&mut self, path: &str, w: &ModelWire) -> Option<LocalModel> {
        let dtype = w.dtype.unwrap_or(DtypeWire::Auto).as_str().to_string();
        let source = match (&w.path, &w.hub) {
            (Some(_), Some(_)) => {
                self.err(
                    &join(path, "hub"),
                    Anchor::Key,
                    "give either `path` or `hub`, not both",
                    None,
                );
                None
            }
            (None, None) if self.is_misspelled(path, "path") || self.is_misspelled(path, "hub") => {
                None
            }
            (None, None) => {
                self.err(
                    path,
                    Anchor::Key,
                    "a `kind: local` model needs `path` or `hub`",
                    Some(
                        "`path:` a `.gguf` file or a Hugging Face folder, or `hub: org/name`"
                            .into(),
                    ),
                );
                None
            }
            (Some(p), None) => {
                if w.revision.is_some() {
                    self.err(
                        &join(path, "revision"),
                        Anchor::Key,
                        "`revision` applies only with `hub`",
                        None,
                    );
                }
                self.local_path(&join(path, "path"), p)
            }
            (None, Some(id)) => {
                let parts: Vec<&str> = id.split('/').collect();
                let valid = parts.len() == 2
                    && parts.iter().all(|s| {
                        !s.is_empty()
                            && s.chars()
                                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
                    });
                if valid {
                    Some(LocalSource::HubId {
                        id: id.clone(),
                        revision: w.revision.clone(),
                    })
                } else {
                    self.err(
                        &join(path, "hub"),
                        Anchor::Value,
                        format!("invalid hub id `{id}`"),
                        Some(
                            "write it as `org/name`, e.g. `HuggingFaceTB/SmolLM2-135M-Instruct`"
                                .into(),
                        ),
                    );
                    None
                }
            }
        };
        Some(LocalModel {
            source: source?,
            dtype,
        })
    }

    /// Checks a local model path: a GGUF file or a Hugging Face folder.
    fn local_path(&mut self, path: &str, text: &str) -> Option<LocalSource> {
        let (shown, resolved) = self.path_value(path, text)?;
        let resolved_hint = Some(format!("resolved to `{}`", resolved.display()));
        if resolved.is_dir() {
            let has = |name: &str| resolved.join(name).is_file();
            let has_weights = std::fs::read_dir(&resolved)
                .map(|rd| {
                    rd.flatten()
                        .any(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
                })
                .unwrap_or(false);
            let mut missing = Vec::new();
            if !has("config.json") {
                missing.push("config.json");
            }
            if !has("tokenizer.json") {
                missing.push("tokenizer.json");
            }
            if !has_weights {
                missing.push("*.safetensors");
            }
            if !missing.is_empty() {
                self.err(
                    path,
                    Anchor::Value,
                    format!("model folder `{shown}` is missing {}", list(&missing)),
                    resolved_hint,
                );
                return None;
            }
            let architecture = std::fs::read_to_string(resolved.join("config.json"))
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .and_then(|v| {
                    v.get("model_type")
                        .and_then(|m| m.as_str())
                        .map(str::to_string)
                });
            Some(LocalSource::HfFolder {
                path: resolved,
                architecture,
            })
        } else if resolved.is_file() {
            match crate::gguf::read_header(&resolved) {
                Ok(Some(header)) => Some(LocalSource::Gguf {
                    path: resolved,
                    architecture: header.architecture,
                }),
                Ok(None) => {
                    self.err(
                        path,
                        Anchor::Value,
                        format!("`{shown}` is not a GGUF file"),
                        Some("its first bytes are not `GGUF`; give a `.gguf` file or a Hugging Face model folder".into()),
                    );
                    None
                }
                Err(e) => {
                    self.err(
                        path,
                        Anchor::Value,
                        format!("cannot read `{shown}`: {e}"),
                        resolved_hint,
                    );
                    None
                }
            }
        } else {
            self.err(
                path,
                Anchor::Value,
                format!("model path `{shown}` does not exist"),
                resolved_hint,
            );
            None
        }
    }

    fn prompts(&mut self, path: &str, w: &PromptsWire) -> Option<PromptsSpec> {
        let p = |f: &str| join(path, f);
        let errors_before = self.errors.len();
        let source = self
            .path_value(&p("source"), &w.source)
            .and_then(|(shown, resolved)| {
                if resolved.is_file() {
                    Some(resolved)
                } else {
                    let what = if resolved.is_dir() {
                        "is a folder, not a file"
                    } else {
                        "does not exist"
                    };
                    self.err(
                        &p("source"),
                        Anchor::Value,
                        format!("prompts file `{shown}` {what}"),
                        Some(format!("resolved to `{}`", resolved.display())),
                    );
                    None
                }
            });
        let format = match (w.format, &source) {
            (Some(f), _) => Some(match f {
                PromptFormatWire::Jsonl => PromptFormat::Jsonl,
                PromptFormatWire::Csv => PromptFormat::Csv,
                PromptFormatWire::Parquet => PromptFormat::Parquet,
            }),
            (None, Some(src)) => {
                let ext = src
                    .extension()
                    .and_then(|e| e.to_str())
                    .unwrap_or_default()
                    .to_ascii_lowercase();
                match ext.as_str() {
                    "jsonl" | "json" | "ndjson" => Some(PromptFormat::Jsonl),
                    "csv" => Some(PromptFormat::Csv),
                    "parquet" | "pq" => Some(PromptFormat::Parquet),
                    // `format` is there, misspelled: reported already.
                    _ if self.is_misspelled(path, "format") => None,
                    _ => {
                        self.err(
                            &p("source"),
                            Anchor::Value,
                            format!(
                                "cannot tell the format of `{}` from its extension",
                                w.source
                            ),
                            Some("add `format: jsonl`, `format: csv` or `format: parquet`".into()),
                        );
                        None
                    }
                }
            }
            (None, None) => None,
        };
        let column = |cx: &mut Self, field: &str, value: &Option<String>| -> Option<String> {
            let v = value.clone()?;
            if v.trim().is_empty() {
                cx.err(
                    &p(&format!("fields.{field}")),
                    Anchor::Value,
                    format!("`{field}` is empty"),
                    Some("give a column name or remove the line".into()),
                );
            }
            Some(v)
        };
        let prompt_field =
            column(self, "prompt", &w.fields.prompt).unwrap_or_else(|| "prompt".into());
        let id_field = column(self, "id", &w.fields.id);
        let system_field = column(self, "system", &w.fields.system);
        for (i, m) in w.fields.metadata.iter().enumerate() {
            if m.trim().is_empty() {
                self.err(
                    &p(&format!("fields.metadata[{i}]")),
                    Anchor::Value,
                    "metadata column name is empty",
                    None,
                );
            }
        }
        if let Some(sample) = w.sample {
            self.expect(&p("sample"), sample >= 1, "at least 1", sample);
        }
        let holdout = w.holdout.unwrap_or(0.0);
        self.expect(
            &p("holdout"),
            (0.0..1.0).contains(&holdout),
            "at least 0 and less than 1",
            holdout,
        );
        if self.errors.len() != errors_before {
            return None;
        }
        Some(PromptsSpec {
            source: source?,
            format: format?,
            prompt_field,
            id_field,
            system_field,
            metadata_fields: w.fields.metadata.clone(),
            system_prompt: w.system_prompt.clone(),
            sample: w.sample,
            seed: w.seed.unwrap_or(0),
            holdout,
        })
    }

    fn sampling(&mut self, path: &str, w: &SamplingWire) -> SamplingSpec {
        let p = |f: &str| join(path, f);
        if let Some(t) = w.temperature {
            self.expect(
                &p("temperature"),
                (0.0..=2.0).contains(&t),
                "between 0 and 2",
                t,
            );
        }
        if let Some(t) = w.top_p {
            self.expect(
                &p("top_p"),
                t > 0.0 && t <= 1.0,
                "more than 0 and at most 1",
                t,
            );
        }
        if let Some(k) = w.top_k {
            self.expect(&p("top_k"), k >= 1, "at least 1", k);
        }
        if let Some(m) = w.max_tokens {
            self.expect(&p("max_tokens"), m >= 1, "at least 1", m);
        }
        for (name, value) in [
            ("frequency_penalty", w.frequency_penalty),
            ("presence_penalty", w.presence_penalty),
        ] {
            if let Some(v) = value {
                self.expect(&p(name), (-2.0..=2.0).contains(&v), "between -2 and 2", v);
            }
        }
        if let Some(r) = w.repetition_penalty {
            self.expect(
                &p("repetition_penalty"),
                r.is_finite() && r > 0.0,
                "more than 0",
                r,
            );
        }
        for (i, s) in w.stop.iter().enumerate() {
            if s.is_empty() {
                self.err(
                    &format!("{path}.stop[{i}]"),
                    Anchor::Value,
                    "stop strings must not be empty",
                    None,
                );
            }
        }
        SamplingSpec {
            temperature: w.temperature,
            top_p: w.top_p,
            top_k: w.top_k,
            max_tokens: w.max_tokens,
            frequency_penalty: w.frequency_penalty,
            presence_penalty: w.presence_penalty,
            repetition_penalty: w.repetition_penalty,
            seed: w.seed,
            stop: w.stop.clone(),
        }
    }

    fn template(&mut self, path: &str, text: Option<&str>) -> Option<Template> {
        let Some(text) = text else {
            return Some(Template::AlignerV1);
        };
        if let Some(t) = Template::builtin(text) {
            return Some(t);
        }
        let missing: Vec<&str> = ["{question}", "{answer}"]
            .into_iter()
            .filter(|p| !text.contains(p))
            .collect();
        if missing.is_empty() {
            return Some(Template::Custom(text.to_string()));
        }
        let looks_like_id = !text.contains(char::is_whitespace) && !text.contains('{');
        let (message, hint) = match did_you_mean(text, Template::BUILTIN_IDS).filter(|_| looks_like_id) {
            Some(m) => (format!("unknown template `{text}`"), format!("did you mean `{m}`?")),
            None => (
                format!("custom template is missing {}", list(&missing)),
                format!(
                    "write `{{question}}` and `{{answer}}` where the question and the answer go, or use a built-in template: {}",
                    list(&Template::BUILTIN_IDS)
                ),
            ),
        };
        self.err(path, Anchor::Value, message, Some(hint));
        None
    }

    /// Checks the stages that deserialized; `None` when any stage is broken or wrong.
    fn rounds(
        &mut self,
        w: &RoundsParts,
        models: Option<&BTreeMap<String, ModelEntry>>,
    ) -> Option<RoundsSpec> {
        let errors_before = self.errors.len();
        let count = w.count.map(|count| {
            let count = count.unwrap_or(1);
            self.expect(
                "rounds.count",
                (1..=100).contains(&count),
                "between 1 and 100",
                count,
            );
            count
        });

        let generate = w.generate.as_ref().map(|g| {
            self.model_ref("rounds.generate.model", &g.model, models);
            let n = g.n.unwrap_or(1);
            self.expect(
                "rounds.generate.n",
                (1..=64).contains(&n),
                "between 1 and 64",
                n,
            );
            GenerateStage {
                model: g.model.clone(),
                sampling: self.sampling("rounds.generate.sampling", &g.sampling),
                n,
            }
        });

        let correct = w.correct.as_ref().and_then(|c| {
            self.model_ref("rounds.correct.model", &c.model, models);
            let template = self.template("rounds.correct.template", c.template.as_deref());
            let sampling = self.sampling("rounds.correct.sampling", &c.sampling);
            Some(CorrectStage {
                model: c.model.clone(),
                template: template?,
                sampling,
            })
        });

        let synthesize = w
            .synthesize
            .as_ref()
            .map(|s| self.synthesize(s.clone().unwrap_or_default()));
        // The `kind` of the generate model, when both are readable.
        let generate_is_openai = w.generate.as_ref().is_some_and(|g| {
            models
                .and_then(|m| m.get(&g.model))
                .is_some_and(|m| m.kind == Some(ModelKind::Openai))
        });
        let generate_model = w.generate.as_ref().map_or("", |g| g.model.as_str());
        let train = w.train.as_ref().map(|t| {
            t.as_ref()
                .map(|t| self.train(t, generate_is_openai, generate_model))
        });
        // `Some(None)`: no train block. A broken one counts as present (its own error is
        // reported), so the evaluate block does not pile on.
        let trains = !matches!(w.train, Some(None));
        let evaluate = w
            .evaluate
            .as_ref()
            .map(|e| e.as_ref().map(|e| self.evaluate(e, models, trains)));
        if self.errors.len() != errors_before {
            return None;
        }
        Some(RoundsSpec {
            count: count?,
            generate: generate?,
            correct: correct?,
            synthesize: synthesize?,
            train: match train? {
                Some(t) => Some(t?),
                None => None,
            },
            evaluate: evaluate?,
        })
    }

    /// `rounds.evaluate`.
    fn evaluate(
        &mut self,
        w: &EvaluateWire,
        models: Option<&BTreeMap<String, ModelEntry>>,
        trains: bool,
    ) -> EvaluateStage {
        if let Some(judge) = &w.judge {
            self.model_ref("rounds.evaluate.judge", judge, models);
        }
        let mut aspects = Vec::new();
        for a in w
            .aspects
            .clone()
            .unwrap_or_else(|| vec!["helpfulness".into(), "harmlessness".into()])
        {
            match JudgeAspect::ALL.iter().find(|x| x.as_str() == a) {
                Some(x) if !aspects.contains(x) => aspects.push(*x),
                Some(_) => {}
                None => self.err(
                    "rounds.evaluate.aspects",
                    Anchor::Value,
                    format!("unknown aspect `{a}`"),
                    Some("aspects are helpfulness, harmlessness, empathy, summary".into()),
                ),
            }
        }
        if w.judge.is_some() && aspects.is_empty() && w.aspects.is_some() {
            self.err(
                "rounds.evaluate.aspects",
                Anchor::Value,
                "`aspects` is empty, so the judge would never be asked",
                Some("list at least one: helpfulness, harmlessness, empathy, summary".into()),
            );
        }
        // Without training every round's model is the upstream: only the Aligner comparison
        // means anything.
        let default_compare: Vec<String> = if trains {
            Comparison::ALL
                .iter()
                .map(|c| c.as_str().to_string())
                .collect()
        } else {
            vec!["aligner".into()]
        };
        let mut compare = Vec::new();
        for c in w.compare.clone().unwrap_or(default_compare) {
            if !trains && (c == "initial" || c == "previous") {
                self.err(
                    "rounds.evaluate.compare",
                    Anchor::Value,
                    format!("`{c}` compares the models of different rounds, and these rounds do not train"),
                    Some("add `rounds.train`, or compare only `aligner`".into()),
                );
                continue;
            }
            match Comparison::ALL.iter().find(|x| x.as_str() == c) {
                Some(x) if !compare.contains(x) => compare.push(*x),
                Some(_) => {}
                None => self.err(
                    "rounds.evaluate.compare",
                    Anchor::Value,
                    format!("unknown comparison `{c}`"),
                    Some("comparisons are aligner (the model with and without the Aligner), initial (round k vs the initial model), previous (round k vs round k-1)".into()),
                ),
            }
        }
        let sampling = w
            .sampling
            .as_ref()
            .map(|s| self.sampling("rounds.evaluate.sampling", s));
        let judge_sampling = match &w.judge_sampling {
            Some(s) => self.sampling("rounds.evaluate.judge_sampling", s),
            None => SamplingSpec {
                temperature: Some(0.0),
                max_tokens: Some(512),
                ..Default::default()
            },
        };
        let labels = w.labels.as_ref().map(|l| {
            if l.field.trim().is_empty() {
                self.err("rounds.evaluate.labels.field", Anchor::Value, "`field` is empty", None);
            }
            if l.harmful.is_empty() {
                self.err(
                    "rounds.evaluate.labels.harmful",
                    Anchor::Value,
                    "`harmful` lists no value",
                    Some("list the values of `field` that mark a harmful prompt, e.g. `[strongreject, harmbench]`".into()),
                );
            }
            LabelRule {
                field: l.field.clone(),
                harmful: l.harmful.clone(),
            }
        });
        let bootstrap = w.bootstrap.unwrap_or(1000);
        self.expect(
            "rounds.evaluate.bootstrap",
            (100..=100_000).contains(&bootstrap),
            "between 100 and 100000",
            bootstrap,
        );
        let gate = w.gate.as_ref().and_then(|g| {
            let mut names = vec!["refusal_rate".to_string(), "over_refusal".to_string()];
            if w.judge.is_some() {
                for a in &aspects {
                    for c in &compare {
                        names.push(format!("omega.{}.{}", a.as_str(), c.as_str()));
                    }
                }
            }
            if !names.contains(&g.metric) {
                let hint = match did_you_mean(&g.metric, names.iter().map(String::as_str)) {
                    Some(m) => format!("did you mean `{m}`?"),
                    None => format!("metrics this block computes: {}", list(&names.iter().map(String::as_str).collect::<Vec<_>>())),
                };
                self.err("rounds.evaluate.gate.metric", Anchor::Value, format!("`{}` is not a metric this evaluation computes", g.metric), Some(hint));
            }
            if g.metric.starts_with("refusal_rate") || g.metric.starts_with("over_refusal") {
                if labels.is_none() {
                    self.err(
                        "rounds.evaluate.gate.metric",
                        Anchor::Value,
                        format!("`{}` needs `rounds.evaluate.labels`", g.metric),
                        Some("say which held-out prompts are harmful: `labels: { field: source, harmful: [strongreject] }`".into()),
                    );
                }
            }
            self.expect(
                "rounds.evaluate.gate.max_drop",
                g.max_drop.is_finite() && g.max_drop >= 0.0,
                "a number of at least 0",
                g.max_drop,
            );
            let action = match g.action.as_deref().unwrap_or("stop") {
                "stop" => GateAction::Stop,
                "rollback" if !trains => {
                    self.err(
                        "rounds.evaluate.gate.action",
                        Anchor::Value,
                        "`rollback` returns to an earlier round's model, and these rounds do not train",
                        Some("use `action: stop`, or add `rounds.train`".into()),
                    );
                    return None;
                }
                "rollback" => GateAction::Rollback,
                other => {
                    self.err(
                        "rounds.evaluate.gate.action",
                        Anchor::Value,
                        format!("unknown action `{other}`"),
                        Some("actions are stop (end the run) and rollback (continue from the best round's model)".into()),
                    );
                    return None;
                }
            };
            Some(Gate {
                metric: g.metric.clone(),
                max_drop: g.max_drop,
                action,
            })
        });
        EvaluateStage {
            judge: w.judge.clone(),
            aspects,
            compare,
            sampling,
            judge_sampling,
            labels,
            bootstrap,
            seed: w.seed.unwrap_or(0),
            gate,
        }
    }

    fn synthesize(&mut self, w: SynthesizeWire) -> SynthesizeStage {
        let min_edit_distance = w.min_edit_distance.unwrap_or(0.05);
        self.expect(
            "rounds.synthesize.min_edit_distance",
            (0.0..=1.0).contains(&min_edit_distance),
            "between 0 and 1",
            min_edit_distance,
        );
        let (mut lo, mut hi) = (0.1, 10.0);
        if let Some(ratio) = &w.length_ratio {
            let path = "rounds.synthesize.length_ratio";
            match ratio[..] {
                [a, b] => {
                    (lo, hi) = (a, b);
                    let ok = a.is_finite() && b.is_finite() && a > 0.0 && b > 0.0 && a < b;
                    if !ok {
                        self.err(path, Anchor::Value, format!("`length_ratio` must be `[min, max]` with 0 < min < max, got `[{a}, {b}]`"), None);
                    }
                }
                _ => self.err(
                    path,
                    Anchor::Value,
                    format!(
                        "`length_ratio` must have two numbers `[min, max]`, got {}",
                        ratio.len()
                    ),
                    Some("e.g. `length_ratio: [0.1, 10]`".into()),
                ),
            }
        }
        if let Some(m) = w.max_pairs {
            self.expect("rounds.synthesize.max_pairs", m >= 1, "at least 1", m);
        }
        let semantic = w.semantic.as_ref().and_then(|s| self.semantic(s));
        SynthesizeStage {
            drop_identical: w.drop_identical.unwrap_or(true),
            min_edit_distance,
            length_ratio_min: lo,
            length_ratio_max: hi,
            drop_empty: w.drop_empty.unwrap_or(true),
            drop_truncated: w.drop_truncated.unwrap_or(true),
            dedupe_prompts: w.dedupe_prompts.unwrap_or(true),
            max_pairs: w.max_pairs,
            semantic,
        }
    }

    /// `rounds.synthesize.semantic`: the embedder folder must hold a sentence-transformers
    /// model, the thresholds must be cosines in (0, 1].
    fn semantic(&mut self, w: &SemanticWire) -> Option<SemanticFilter> {
        let p = |f: &str| join("rounds.synthesize.semantic", f);
        let errors_before = self.errors.len();
        let max_copy_similarity = w.max_copy_similarity.unwrap_or(0.98);
        let in_range = |v: f64| v > 0.0 && v <= 1.0;
        self.expect(
            &p("max_copy_similarity"),
            in_range(max_copy_similarity),
            "more than 0 and at most 1",
            max_copy_similarity,
        );
        if let Some(t) = w.dedupe_prompts_above {
            self.expect(
                &p("dedupe_prompts_above"),
                in_range(t),
                "more than 0 and at most 1",
                t,
            );
        }
        let embedder = self.embedder_path(&p("embedder"), &w.embedder);
        if self.errors.len() != errors_before {
            return None;
        }
        Some(SemanticFilter {
            embedder: embedder?,
            max_copy_similarity,
            dedupe_prompts_above: w.dedupe_prompts_above,
        })
    }

    /// Checks an embedder folder: `config.json`, `model.safetensors` and `tokenizer.json`.
    fn embedder_path(&mut self, path: &str, text: &str) -> Option<PathBuf> {
        let (shown, resolved) = self.path_value(path, text)?;
        let hint = Some(format!(
            "resolved to `{}`; `aligner models fetch` puts all-MiniLM-L6-v2 into `models/all-MiniLM-L6-v2`",
            resolved.display()
        ));
        if !resolved.is_dir() {
            let what = if resolved.exists() {
                "is not a folder"
            } else {
                "does not exist"
            };
            self.err(
                path,
                Anchor::Value,
                format!("embedder folder `{shown}` {what}"),
                hint,
            );
            return None;
        }
        let missing: Vec<&str> = ["config.json", "model.safetensors", "tokenizer.json"]
            .into_iter()
            .filter(|f| !resolved.join(f).is_file())
            .collect();
        if !missing.is_empty() {
            self.err(
                path,
                Anchor::Value,
                format!("embedder folder `{shown}` is missing {}", list(&missing)),
                hint,
            );
            return None;
        }
        Some(resolved)
    }

    /// `aligner:` (checked after `rounds`, whose correct stage may use it).
    fn aligner(
        &mut self,
        w: &AlignerWire,
        models: Option<&BTreeMap<String, ModelEntry>>,
        rounds: Option<&RoundsSpec>,
    ) -> Option<AlignerSpec> {
        let errors_before = self.errors.len();
        let name = w.name.clone().unwrap_or_else(|| "aligner".into());
        if w.name.is_some() {
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                self.err(
                    "aligner.name",
                    Anchor::Value,
                    format!("invalid model name `{name}`"),
                    Some("use letters, digits, `_` and `-`".into()),
                );
            }
        }
        if models.is_some_and(|m| m.contains_key(&name)) {
            let path = if w.name.is_some() {
                "aligner.name"
            } else {
                "aligner"
            };
            self.err(
                path,
                Anchor::Key,
                format!("the trained Aligner's name `{name}` is also a key of `models`"),
                Some("give `aligner.name` another name; `rounds.correct.model` uses it to pick the trained Aligner".into()),
            );
        }
        // The base must be a local model: the built-in trainer trains it.
        self.model_ref("aligner.base", &w.base, models);
        if let Some(entry) = models.and_then(|m| m.get(&w.base)) {
            if entry.kind == Some(ModelKind::Openai) {
                self.err(
                    "aligner.base",
                    Anchor::Value,
                    format!("the built-in trainer trains local models; `{}` is `kind: openai`", w.base),
                    Some("start the Aligner from a `kind: local` model (a GGUF file or a Hugging Face folder)".into()),
                );
            }
        }
        let template = self.template("aligner.template", w.template.as_deref());
        if let (Some(t), Some(r)) = (&template, rounds) {
            if r.correct.model == name && r.correct.template != *t {
                self.err(
                    "rounds.correct.template",
                    Anchor::Value,
                    format!(
                        "the trained Aligner `{name}` is trained with the template `{}`, but `rounds.correct.template` is `{}`",
                        t.id(),
                        r.correct.template.id()
                    ),
                    Some("use the same template in both places, so the Aligner reads the prompts it was trained on".into()),
                );
            }
        }
        let labels = w.labels.as_ref().map(|l| {
            if l.field.trim().is_empty() {
                self.err("aligner.labels.field", Anchor::Value, "`field` is empty", None);
            }
            if l.harmful.is_empty() {
                self.err(
                    "aligner.labels.harmful",
                    Anchor::Value,
                    "`harmful` lists no value",
                    Some("list the values of `field` that mark a harmful row, e.g. `[strongreject, harmbench]`".into()),
                );
            }
            LabelRule {
                field: l.field.clone(),
                harmful: l.harmful.clone(),
            }
        });
        let data = match (&w.data, &w.teach) {
            (Some(_), Some(_)) => {
                self.err(
                    "aligner.teach",
                    Anchor::Key,
                    "`data` and `teach` exclude each other",
                    Some("train on your own question-answer-correction file (`data`), or let a teacher write the corrections (`teach`)".into()),
                );
                None
            }
            (None, None) => {
                self.missing(
                    "",
                    "aligner",
                    "`aligner` needs `data` (a question-answer-correction file) or `teach` (prompts and a teacher)",
                    None,
                );
                None
            }
            (Some(d), None) => self.qac_file(d),
            (None, Some(t)) => self.teach(t, models, rounds, labels.as_ref()),
        };
        let holdout = w.holdout.unwrap_or(0.2);
        self.expect(
            "aligner.holdout",
            (0.0..1.0).contains(&holdout),
            "at least 0 and less than 1",
            holdout,
        );
        let t = &w.train;
        let q = |f: &str| join("aligner.train", f);
        let epochs = t.epochs.unwrap_or(3);
        self.expect(&q("epochs"), epochs >= 1, "at least 1", epochs);
        let learning_rate = t.learning_rate.unwrap_or(5e-5);
        self.expect(
            &q("learning_rate"),
            learning_rate > 0.0 && learning_rate < 1.0,
            "more than 0 and less than 1",
            learning_rate,
        );
        let batch_size = t.batch_size.unwrap_or(8);
        self.expect(&q("batch_size"), batch_size >= 1, "at least 1", batch_size);
        let gradient_accumulation = t.gradient_accumulation.unwrap_or(1);
        self.expect(
            &q("gradient_accumulation"),
            gradient_accumulation >= 1,
            "at least 1",
            gradient_accumulation,
        );
        let max_length = t.max_length.unwrap_or(1024);
        self.expect(
            &q("max_length"),
            max_length >= 16,
            "at least 16",
            max_length,
        );
        let warmup_ratio = t.warmup_ratio.unwrap_or(0.03);
        self.expect(
            &q("warmup_ratio"),
            (0.0..1.0).contains(&warmup_ratio),
            "at least 0 and less than 1",
            warmup_ratio,
        );
        let warmup_fraction = t.warmup_fraction.unwrap_or(0.2);
        self.expect(
            &q("warmup_fraction"),
            (0.0..1.0).contains(&warmup_fraction),
            "at least 0 and less than 1",
            warmup_fraction,
        );
        let warmup_epochs = t.warmup_epochs.unwrap_or(1);
        let options = self.builtin_options(
            "aligner.train",
            BuiltinWire {
                lora: t.lora.as_ref(),
                train_layers: t.train_layers,
                seed: t.seed,
                weight_decay: t.weight_decay,
                max_grad_norm: t.max_grad_norm,
                save_every: t.save_every,
            },
            20,
        );
        let sampling = match &w.sampling {
            Some(s) => self.sampling("aligner.sampling", s),
            None => rounds
                .map(|r| r.correct.sampling.clone())
                .unwrap_or_default(),
        };
        if self.errors.len() != errors_before {
            return None;
        }
        Some(AlignerSpec {
            name,
            base: w.base.clone(),
            template: template?,
            data: data?,
            labels,
            holdout,
            seed: w.seed.unwrap_or(0),
            train: AlignerTrain {
                epochs,
                learning_rate,
                batch_size,
                gradient_accumulation,
                max_length,
                warmup_ratio,
                warmup_fraction,
                warmup_epochs,
                options,
            },
            sampling,
        })
    }

    /// `aligner.data`: a question-answer-correction file.
    fn qac_file(&mut self, text: &str) -> Option<AlignerData> {
        let (shown, path) = self.path_value("aligner.data", text)?;
        if !path.is_file() {
            self.err(
                "aligner.data",
                Anchor::Value,
                format!("question-answer-correction file `{shown}` does not exist"),
                Some(format!("resolved to `{}`", path.display())),
            );
            return None;
        }
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or_default()
            .to_ascii_lowercase();
        let format = match ext.as_str() {
            "jsonl" | "json" | "ndjson" => PromptFormat::Jsonl,
            "csv" => PromptFormat::Csv,
            "parquet" | "pq" => PromptFormat::Parquet,
            _ => {
                self.err(
                    "aligner.data",
                    Anchor::Value,
                    format!("cannot tell the format of `{shown}` from its extension"),
                    Some("use a `.jsonl`, `.csv` or `.parquet` file with `question`, `answer` and `correction` columns".into()),
                );
                return None;
            }
        };
        Some(AlignerData::File { path, format })
    }

    /// `aligner.teach`: prompts, who answers them, and the teacher.
    fn teach(
        &mut self,
        w: &TeachWire,
        models: Option<&BTreeMap<String, ModelEntry>>,
        rounds: Option<&RoundsSpec>,
        labels: Option<&LabelRule>,
    ) -> Option<AlignerData> {
        let prompts = self.prompts("aligner.teach.prompts", &w.prompts);
        if let (Some(p), Some(l)) = (&prompts, labels) {
            if !p.metadata_fields.contains(&l.field) {
                self.err(
                    "aligner.labels.field",
                    Anchor::Value,
                    format!(
                        "`{}` is not among `aligner.teach.prompts.fields.metadata`",
                        l.field
                    ),
                    Some(format!("add it: `fields: {{ metadata: [{}] }}`", l.field)),
                );
            }
        }
        let (answer_model, answer_sampling) = match &w.answer {
            Some(a) => {
                self.model_ref("aligner.teach.answer.model", &a.model, models);
                (
                    Some(a.model.clone()),
                    self.sampling("aligner.teach.answer.sampling", &a.sampling),
                )
            }
            None => (
                rounds.map(|r| r.generate.model.clone()),
                rounds
                    .map(|r| r.generate.sampling.clone())
                    .unwrap_or_default(),
            ),
        };
        let t = &w.teacher;
        let tp = |f: &str| join("aligner.teach.teacher", f);
        let teacher = match t.kind {
            TeacherKind::Model => {
                if t.texts.is_some() {
                    self.err(
                        &tp("texts"),
                        Anchor::Key,
                        "field `texts` does not apply to `kind: model`",
                        Some("`kind: model` takes `model`, `prompt` and `sampling`".into()),
                    );
                }
                let prompt = t
                    .prompt
                    .clone()
                    .unwrap_or_else(|| crate::EDITOR_PROMPT.to_string());
                let missing: Vec<&str> = ["{question}", "{answer}"]
                    .into_iter()
                    .filter(|p| !prompt.contains(p))
                    .collect();
                if !missing.is_empty() {
                    self.err(
                        &tp("prompt"),
                        Anchor::Value,
                        format!("the editor prompt is missing {}", list(&missing)),
                        Some("write `{question}` and `{answer}` where the question and the answer go".into()),
                    );
                }
                let sampling = t
                    .sampling
                    .as_ref()
                    .map(|s| self.sampling(&tp("sampling"), s))
                    .unwrap_or_default();
                match &t.model {
                    None => {
                        self.missing(
                            "aligner.teach.teacher",
                            "model",
                            "missing field `model` for `kind: model`",
                            Some("name the teacher, a key of `models` (any backend)".into()),
                        );
                        None
                    }
                    Some(m) => {
                        self.model_ref(&tp("model"), m, models);
                        Some(Teacher::Model {
                            model: m.clone(),
                            prompt,
                            sampling,
                        })
                    }
                }
            }
            TeacherKind::Refusal => {
                for (field, set) in [
                    ("model", t.model.is_some()),
                    ("prompt", t.prompt.is_some()),
                    ("sampling", t.sampling.is_some()),
                ] {
                    if set {
                        self.err(
                            &tp(field),
                            Anchor::Key,
                            format!("field `{field}` does not apply to `kind: refusal`"),
                            Some("`kind: refusal` takes `texts`".into()),
                        );
                    }
                }
                if labels.is_none() {
                    self.missing(
                        "aligner",
                        "labels",
                        "the refusal teacher needs `aligner.labels` to tell harmful prompts from benign ones",
                        Some("e.g. `labels: { field: source, harmful: [strongreject, harmbench] }`".into()),
                    );
                }
                let texts = t.texts.clone().unwrap_or_else(|| {
                    crate::REFUSAL_TEXTS.iter().map(|s| s.to_string()).collect()
                });
                if texts.is_empty() || texts.iter().any(|s| s.trim().is_empty()) {
                    self.err(
                        &tp("texts"),
                        Anchor::Value,
                        "`texts` must list at least one non-empty refusal",
                        None,
                    );
                }
                Some(Teacher::Refusal { texts })
            }
        };
        Some(AlignerData::Teach(TeachSpec {
            prompts: prompts?,
            answer_model: answer_model?,
            answer_sampling,
            teacher: teacher?,
        }))
    }

    /// The built-in trainer's options (`rounds.train.backend` and `aligner.train` share them).
    fn builtin_options(
        &mut self,
        path: &str,
        w: BuiltinWire<'_>,
        default_save_every: u32,
    ) -> crate::types::BuiltinTrainer {
        let q = |f: &str| join(path, f);
        let lora = w.lora.map(|l| {
            let rank = l.rank.unwrap_or(16);
            self.expect(&q("lora.rank"), rank >= 1, "at least 1", rank);
            let alpha = l.alpha.unwrap_or(2.0 * rank as f64);
            self.expect(&q("lora.alpha"), alpha > 0.0, "more than 0", alpha);
            let dropout = l.dropout.unwrap_or(0.0);
            self.expect(
                &q("lora.dropout"),
                (0.0..1.0).contains(&dropout),
                "at least 0 and less than 1",
                dropout,
            );
            const TARGETS: [&str; 7] = [
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ];
            let targets = l
                .targets
                .clone()
                .unwrap_or_else(|| TARGETS.iter().map(|t| t.to_string()).collect());
            for t in &targets {
                if !TARGETS.contains(&t.as_str()) {
                    self.err(
                        &q("lora.targets"),
                        Anchor::Value,
                        format!("`{t}` is not a linear layer of a llama-family model"),
                        Some(format!("targets are {}", TARGETS.join(", "))),
                    );
                }
            }
            crate::types::LoraSpec {
                rank,
                alpha,
                dropout,
                targets,
            }
        });
        if let Some(n) = w.train_layers {
            self.expect(&q("train_layers"), n >= 1, "at least 1", n);
            if lora.is_some() {
                self.err(
                    &q("train_layers"),
                    Anchor::Key,
                    "`train_layers` and `lora` exclude each other",
                    Some("LoRA adapts every layer's named projections; `train_layers` trains the last N layers fully".into()),
                );
            }
        }
        let max_grad_norm = w.max_grad_norm.unwrap_or(1.0);
        self.expect(
            &q("max_grad_norm"),
            max_grad_norm >= 0.0,
            "at least 0",
            max_grad_norm,
        );
        let weight_decay = w.weight_decay.unwrap_or(0.0);
        self.expect(
            &q("weight_decay"),
            (0.0..1.0).contains(&weight_decay),
            "at least 0 and less than 1",
            weight_decay,
        );
        let save_every = w.save_every.unwrap_or(default_save_every);
        self.expect(&q("save_every"), save_every >= 1, "at least 1", save_every);
        crate::types::BuiltinTrainer {
            lora,
            train_layers: w.train_layers,
            seed: w.seed.unwrap_or(42),
            weight_decay,
            max_grad_norm,
            save_every,
        }
    }

    fn train(
        &mut self,
        w: &TrainWire,
        generate_is_openai: bool,
        generate_model: &str,
    ) -> Option<TrainStage> {
        let p = |f: &str| join("rounds.train", f);
        let beta = w.beta.unwrap_or(0.1);
        self.expect(
            &p("beta"),
            beta.is_finite() && beta > 0.0,
            "more than 0",
            beta,
        );
        let learning_rate = w.learning_rate.unwrap_or(1e-6);
        self.expect(
            &p("learning_rate"),
            learning_rate > 0.0 && learning_rate < 1.0,
            "more than 0 and less than 1",
            learning_rate,
        );
        let epochs = w.epochs.unwrap_or(3);
        self.expect(&p("epochs"), epochs >= 1, "at least 1", epochs);
        let batch_size = w.batch_size.unwrap_or(8);
        self.expect(&p("batch_size"), batch_size >= 1, "at least 1", batch_size);
        let gradient_accumulation = w.gradient_accumulation.unwrap_or(1);
        self.expect(
            &p("gradient_accumulation"),
            gradient_accumulation >= 1,
            "at least 1",
            gradient_accumulation,
        );
        let max_length = w.max_length.unwrap_or(1024);
        self.expect(&p("max_length"), max_length >= 1, "at least 1", max_length);
        let warmup_ratio = w.warmup_ratio.unwrap_or(0.03);
        self.expect(
            &p("warmup_ratio"),
            (0.0..1.0).contains(&warmup_ratio),
            "at least 0 and less than 1",
            warmup_ratio,
        );

        let b = &w.backend;
        let backend = match b.kind {
            BackendKind::Builtin => {
                let set = [
                    ("command", b.command.is_some()),
                    ("format", b.format.is_some()),
                    ("conversational", b.conversational.is_some()),
                    ("serve_model", b.serve_model.is_some()),
                ];
                for (field, _) in set.iter().filter(|(_, is_set)| *is_set) {
                    self.err(
                        &p(&format!("backend.{field}")),
                        Anchor::Key,
                        format!("field `{field}` does not apply to `kind: builtin`"),
                        None,
                    );
                }
                if generate_is_openai {
                    self.err(
                        &p("backend.kind"),
                        Anchor::Value,
                        format!("the built-in trainer trains local models; the generate model `{generate_model}` is `kind: openai`"),
                        Some("make the generate model `kind: local` (a GGUF file or a Hugging Face folder), or use `kind: command` with your own trainer and `serve_model`".into()),
                    );
                }
                if let Some(loss) = &w.loss {
                    use crate::wire::DpoLossWire as L;
                    if !matches!(loss, L::Sigmoid | L::Ipo | L::SigmoidNll) {
                        self.err(
                            &p("loss"),
                            Anchor::Value,
                            "the built-in trainer implements the `sigmoid`, `ipo` and `sigmoid_nll` losses",
                            Some("use one of those, or `kind: command` with TRL for the others".into()),
                        );
                    }
                }
                Some(TrainBackend::Builtin(self.builtin_options(
                    &p("backend"),
                    BuiltinWire {
                        lora: b.lora.as_ref(),
                        train_layers: b.train_layers,
                        seed: b.seed,
                        weight_decay: b.weight_decay,
                        max_grad_norm: b.max_grad_norm,
                        save_every: b.save_every,
                    },
                    50,
                )))
            }
            BackendKind::Command => {
                let set = [
                    ("lora", b.lora.is_some()),
                    ("train_layers", b.train_layers.is_some()),
                    ("seed", b.seed.is_some()),
                    ("weight_decay", b.weight_decay.is_some()),
                    ("max_grad_norm", b.max_grad_norm.is_some()),
                    ("save_every", b.save_every.is_some()),
                ];
                for (field, _) in set.iter().filter(|(_, is_set)| *is_set) {
                    self.err(
                        &p(&format!("backend.{field}")),
                        Anchor::Key,
                        format!("field `{field}` applies to `kind: builtin` only"),
                        Some(
                            "your train command takes its own options; pass them in `command`"
                                .into(),
                        ),
                    );
                }
                let cmd_path = p("backend.command");
                let command = match &b.command {
                    None => {
                        self.missing(
                            &p("backend"),
                            "command",
                            "missing field `command` for `kind: command`",
                            Some("e.g. `command: \"python train.py --data {data} --model {base_model} --out {output_dir}\"`".into()),
                        );
                        None
                    }
                    Some(c) => self.interpolate(&cmd_path, c).filter(|c| {
                        if c.trim().is_empty() {
                            self.err(&cmd_path, Anchor::Value, "`command` is empty", None);
                            false
                        } else if !c.contains("{output_dir}") {
                            self.err(
                                &cmd_path,
                                Anchor::Value,
                                "`command` does not use `{output_dir}`",
                                Some("the trainer must write the new checkpoint to `{output_dir}`; also available: `{data}`, `{base_model}`, `{round}`".into()),
                            );
                            false
                        } else {
                            true
                        }
                    }),
                };
                if b.serve_model.is_none() && generate_is_openai {
                    self.missing(
                        &p("backend"),
                        "serve_model",
                        format!("`serve_model` is required: the generate model `{generate_model}` is `kind: openai`"),
                        Some("the name under which your server will serve the new checkpoint, e.g. `serve_model: \"ckpt-round-{round}\"` (`{round}` and `{output_dir}` are filled in)".into()),
                    );
                }
                if let Some(s) = &b.serve_model {
                    if s.trim().is_empty() {
                        self.err(
                            &p("backend.serve_model"),
                            Anchor::Value,
                            "`serve_model` is empty",
                            None,
                        );
                    }
                }
                command.map(|command| TrainBackend::Command {
                    command,
                    format: match b.format.unwrap_or(ExportFormatWire::Jsonl) {
                        ExportFormatWire::Jsonl => ExportFormat::Jsonl,
                        ExportFormatWire::Parquet => ExportFormat::Parquet,
                    },
                    conversational: b.conversational.unwrap_or(false),
                    serve_model: b.serve_model.clone(),
                })
            }
        };
        Some(TrainStage {
            method: match w.method.unwrap_or(TrainMethodWire::Dpo) {
                TrainMethodWire::Dpo => TrainMethod::Dpo,
                TrainMethodWire::Sft => TrainMethod::Sft,
            },
            beta,
            loss: match w.loss.unwrap_or(DpoLossWire::Sigmoid) {
                DpoLossWire::Sigmoid => DpoLoss::Sigmoid,
                DpoLossWire::Ipo => DpoLoss::Ipo,
                DpoLossWire::Hinge => DpoLoss::Hinge,
                DpoLossWire::Robust => DpoLoss::Robust,
                DpoLossWire::ApoZero => DpoLoss::ApoZero,
                DpoLossWire::ApoDown => DpoLoss::ApoDown,
                DpoLossWire::SigmoidNll => DpoLoss::SigmoidNll,
            },
            learning_rate,
            epochs,
            batch_size,
            gradient_accumulation,
            max_length,
            warmup_ratio,
            reference: match w.reference.unwrap_or(ReferenceWire::Initial) {
                ReferenceWire::Initial => ReferencePolicy::Initial,
                ReferenceWire::Previous => ReferencePolicy::Previous,
            },
            backend: backend?,
        })
    }
}

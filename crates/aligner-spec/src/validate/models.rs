//! `models:` ([`ModelWire`]): each entry read on its own, its fields checked against its
//! `kind`, and references to model names from the other blocks.

use std::collections::BTreeMap;

use serde_yaml_ng::Value;

use super::{did_you_mean, list, Ctx};
use crate::position::{join, Anchor};
use crate::types::*;
use crate::wire::*;

/// One entry of `models:`.
pub(super) struct ModelEntry {
    /// `None` when the entry failed to deserialize.
    pub(super) wire: Option<ModelWire>,
    /// Its `kind`, when that much is readable (even if other fields are broken).
    pub(super) kind: Option<ModelKind>,
}

fn is_env_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_uppercase() || c == '_')
        && chars.all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

/// Whether an `api_key_env` value looks like a key rather than a variable name.
fn looks_like_key(s: &str) -> bool {
    let prefixes = ["sk-", "sk_", "hf_", "gsk_", "xai-", "key-", "bearer "];
    let lower = s.to_ascii_lowercase();
    prefixes.iter().any(|p| lower.starts_with(p))
        || (s.len() >= 20 && !is_env_name(s) && !s.contains(' '))
}

impl Ctx<'_> {
    /// Deserializes each entry of `models:` on its own.
    pub(super) fn parse_models(&mut self, value: &Value) -> Option<BTreeMap<String, ModelEntry>> {
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
                .and_then(|k| serde_yaml_ng::from_value::<ModelKind>(k.clone()).ok());
            match k.as_str() {
                Some(name) => {
                    let wire = self.parse::<ModelWire>(v, &join("models", name));
                    out.insert(name.to_string(), ModelEntry { wire, kind });
                }
                None => {
                    // Let serde say what it thinks of the key.
                    let mut single = serde_yaml_ng::Mapping::new();
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

    /// Checks that `name` is defined in `models` (`None` when `models` is broken: then
    /// nothing is checked).
    pub(super) fn model_ref(
        &mut self,
        path: &str,
        name: &str,
        models: Option<&BTreeMap<String, ModelEntry>>,
    ) {
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

    pub(super) fn model_name(&mut self, name: &str) {
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

    pub(super) fn model(&mut self, name: &str, w: &ModelWire) -> Option<ModelSpec> {
        let path = join("models", name);
        let kind_name = match w.kind {
            ModelKind::Openai => "openai",
            ModelKind::Local => "local",
        };
        let allowed = w.fields_for(w.kind);
        let errors_before = self.errors.len();
        for (field, kind) in w.set_fields() {
            if kind != w.kind {
                self.err(
                    &join(&path, field),
                    Anchor::Key,
                    format!("field `{field}` does not apply to `kind: {kind_name}`"),
                    Some(format!("`kind: {kind_name}` takes {}", list(&allowed))),
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
                    let good = is_http_url(u);
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
        let weights = w.weights.as_ref().and_then(|raw| {
            let p = join(path, "weights");
            let v = self.interpolate(&p, raw)?;
            if v.trim().is_empty() {
                self.err(
                    &p,
                    Anchor::Value,
                    "`weights` is empty",
                    Some("a path or hub id of the served model's weights".into()),
                );
                return None;
            }
            Some(v)
        });
        let mut replicas = Vec::new();
        for (i, raw) in w.replicas.iter().flatten().enumerate() {
            let p = join(path, &format!("replicas[{i}]"));
            let Some(u) = self.interpolate(&p, raw) else {
                ok = false;
                continue;
            };
            let good = is_http_url(&u);
            let u = u.trim_end_matches('/').to_string();
            if !good {
                self.err(
                    &p,
                    Anchor::Value,
                    format!("replica `{u}` is not an http(s) url"),
                    Some("e.g. `http://10.0.0.2:8000/v1`".into()),
                );
                ok = false;
            } else if base_url.as_deref() == Some(u.as_str()) || replicas.contains(&u) {
                self.err(
                    &p,
                    Anchor::Value,
                    format!("replica `{u}` is listed twice (`base_url` is the first replica)"),
                    None,
                );
                ok = false;
            } else {
                replicas.push(u);
            }
        }
        if let Some(n) = w.replica_concurrency {
            ok &= self.expect(
                &join(path, "replica_concurrency"),
                (1..=max_concurrency).contains(&n),
                &format!("between 1 and `max_concurrency` ({max_concurrency})"),
                n,
            );
        }
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
            raw_endpoint: w.raw_endpoint.unwrap_or_default(),
            weights,
            replicas,
            replica_concurrency: w.replica_concurrency,
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
}

/// Whether `u` is an http(s) URL with a host (a server's base URL).
fn is_http_url(u: &str) -> bool {
    url::Url::parse(u)
        .is_ok_and(|parsed| matches!(parsed.scheme(), "http" | "https") && parsed.has_host())
}

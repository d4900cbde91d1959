//! The top level ([`PipelineWire`]): the file read block by block, and the checks of
//! `version`, `name`, `store`, `workdir` and those that span several blocks.

use std::collections::BTreeMap;

use serde_yaml_ng::Value;

use super::models::ModelEntry;
use super::rounds::RoundsParts;
use super::Ctx;
use crate::position::{join, Anchor};
use crate::types::*;
use crate::wire::*;

/// The blocks of the file, each deserialized on its own so that an error in one does not
/// hide those in the others. `None` marks a block or field that failed to deserialize (its
/// errors are recorded): the checks that need it are skipped, the others still run.
pub(super) struct Parts {
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
    /// `None` when absent or broken (a broken one is reported where it is parsed).
    prices: Option<BTreeMap<String, PriceWire>>,
    budget: Option<BudgetWire>,
}

fn is_pipeline_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

impl Ctx<'_> {
    /// A labels rule's `field` must be read from the prompts file (`prompts.fields.metadata`).
    fn metadata_field(&mut self, path: &str, p: &PromptsSpec, field: &str) {
        if !p.metadata_fields.iter().any(|f| f == field) {
            self.err(
                path,
                Anchor::Value,
                format!("`{field}` is not among `prompts.fields.metadata`"),
                Some(format!("add it: `fields: {{ metadata: [{field}] }}`")),
            );
        }
    }

    /// Deserializes the file block by block (see [`Parts`]); `None` when it is not a
    /// mapping at all.
    pub(super) fn parse_blocks(&mut self, root: &Value) -> Option<Parts> {
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
            prices: None,
            budget: None,
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
                "prices" => parts.prices = self.parse(v, key),
                "budget" => parts.budget = self.parse(v, key),
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

    pub(super) fn pipeline(&mut self, w: Parts) -> Option<Pipeline> {
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
            if p.holdout <= 0.0 && p.holdout_source.is_none() {
                self.err(
                    "rounds.evaluate",
                    Anchor::Key,
                    "evaluation needs held-out prompts, and `prompts.holdout` is 0",
                    Some(
                        "hold some prompts out of training, e.g. `prompts: { holdout: 0.2 }`, or name a fixed held-out file in `prompts.holdout_source`"
                            .into(),
                    ),
                );
            }
            if let Some(l) = &e.labels {
                self.metadata_field("rounds.evaluate.labels.field", p, &l.field);
            }
        }
        if let (Some(p), Some(l)) = (
            &prompts,
            rounds
                .as_ref()
                .and_then(|r| r.synthesize.benign_refusals.as_ref()),
        ) {
            self.metadata_field("rounds.synthesize.benign_refusals.field", p, &l.field);
        }
        if let (Some(p), Some(b)) = (
            &prompts,
            rounds
                .as_ref()
                .and_then(|r| r.synthesize.benign_preference.as_ref()),
        ) {
            self.metadata_field(
                "rounds.synthesize.benign_preference.field",
                p,
                &b.labels.field,
            );
        }
        let aligner = match &w.aligner {
            None => None,
            Some(None) => Some(None),
            Some(Some(a)) => self
                .aligner(a, w.models.as_ref(), rounds.as_ref())
                .map(Some),
        };

        let prices = self.prices(
            w.prices.as_ref(),
            w.models.as_ref(),
            aligner.as_ref().and_then(|a| a.as_ref()),
        );
        let budget = w.budget.as_ref().map(|b| {
            self.expect(
                "budget.max_cost",
                b.max_cost.is_finite() && b.max_cost > 0.0,
                "more than 0",
                b.max_cost,
            );
            Budget {
                max_cost: b.max_cost,
            }
        });
        Some(Pipeline {
            name: name?,
            store: store?,
            workdir: workdir?,
            models,
            prompts: prompts?,
            rounds: rounds?,
            aligner: aligner?,
            prices,
            budget,
        })
    }

    /// `prices:`: each key a model (or the Aligner's name), each price at least 0.
    fn prices(
        &mut self,
        prices: Option<&BTreeMap<String, PriceWire>>,
        models: Option<&BTreeMap<String, ModelEntry>>,
        aligner: Option<&AlignerSpec>,
    ) -> BTreeMap<String, Price> {
        let mut out = BTreeMap::new();
        for (key, p) in prices.into_iter().flatten() {
            let path = join("prices", key);
            let known = models.is_some_and(|m| m.contains_key(key))
                || aligner.is_some_and(|a| &a.name == key);
            if !known {
                self.err(
                    &path,
                    Anchor::Key,
                    format!("`{key}` is not a model of this pipeline"),
                    Some("price the keys of `models` (or the Aligner's `name`)".into()),
                );
            }
            let mut price = Price::default();
            for (field, value, slot) in [
                ("input", p.input, &mut price.input),
                ("output", p.output, &mut price.output),
                ("per_hour", p.per_hour, &mut price.per_hour),
            ] {
                let v = value.unwrap_or(0.0);
                self.expect(
                    &join(&path, field),
                    v.is_finite() && v >= 0.0,
                    "at least 0",
                    v,
                );
                *slot = v;
            }
            out.insert(key.clone(), price);
        }
        out
    }
}

//! `rounds:` ([`RoundsWire`]): each stage read on its own; `count`, `generate` and
//! `correct` ([`GenerateWire`], [`CorrectWire`]) checked here, the other stages in their
//! own modules.

use std::collections::BTreeMap;

use serde_yaml_ng::Value;

use super::fields::fields_of;
use super::models::ModelEntry;
use super::{did_you_mean, list, Ctx};
use crate::position::{join, Anchor};
use crate::types::*;
use crate::wire::*;

/// The stages of `rounds:`; all `None` when `rounds` is missing or not a mapping.
#[derive(Default)]
pub(super) struct RoundsParts {
    count: Option<Option<u32>>,
    generate: Option<GenerateWire>,
    correct: Option<CorrectWire>,
    synthesize: Option<Option<SynthesizeWire>>,
    train: Option<Option<TrainWire>>,
    evaluate: Option<Option<EvaluateWire>>,
}

impl Ctx<'_> {
    /// Deserializes each stage of `rounds:` on its own.
    pub(super) fn parse_rounds(&mut self, value: &Value) -> RoundsParts {
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
                    self.unknown_field(&path, key, fields_of::<RoundsWire>());
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

    /// Checks the stages that deserialized; `None` when any stage is broken or wrong.
    pub(super) fn rounds(
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
        // Whether an `openai` generate model says where its weights are (`weights:`).
        let generate_has_weights = w.generate.as_ref().is_some_and(|g| {
            models
                .and_then(|m| m.get(&g.model))
                .and_then(|m| m.wire.as_ref())
                .is_some_and(|m| m.weights.is_some())
        });
        let train = w.train.as_ref().map(|t| {
            t.as_ref().map(|t| {
                self.train(
                    t,
                    (generate_is_openai, generate_has_weights),
                    generate_model,
                )
            })
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

    pub(super) fn template(&mut self, path: &str, text: Option<&str>) -> Option<Template> {
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
}

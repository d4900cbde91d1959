//! `aligner:` ([`AlignerWire`]): the pipeline's own Aligner, its data (`data` or `teach`,
//! [`TeachWire`]) and its training ([`AlignerTrainWire`]).

use std::collections::BTreeMap;

use super::models::ModelEntry;
use super::{list, Ctx};
use crate::position::{join, Anchor};
use crate::types::*;
use crate::wire::*;

impl Ctx<'_> {
    /// `aligner:` (checked after `rounds`, whose correct stage may use it).
    pub(super) fn aligner(
        &mut self,
        w: &AlignerWire,
        models: Option<&BTreeMap<String, ModelEntry>>,
        rounds: Option<&RoundsSpec>,
    ) -> Option<AlignerSpec> {
        let errors_before = self.errors.len();
        let name = w.name.clone().unwrap_or_else(|| "aligner".into());
        if w.name.is_some()
            && (name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'))
        {
            self.err(
                "aligner.name",
                Anchor::Value,
                format!("invalid model name `{name}`"),
                Some("use letters, digits, `_` and `-`".into()),
            );
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
        let options = self.builtin_options("aligner.train", t.builtin(), 20);
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
}

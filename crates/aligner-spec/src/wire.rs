//! The pipeline file as written: serde structs that mirror the YAML one to one.
//!
//! Every block denies unknown fields, so a typo is an error rather than a silently ignored
//! setting. The
//! allowed keys of each block are also listed in [`KNOWN_FIELDS`], so that validation can
//! report every unknown key of a file in one pass; a test keeps the two in step. Values are
//! still raw here: paths are not resolved, `${VAR}`s are not expanded, ranges are not
//! checked, model names are not cross-referenced. `validate.rs` turns these into the types
//! of `types.rs`.
//!
//! Enums whose variants carry different fields (`models.*.kind`, `train.backend.kind`) are
//! flat structs with a `kind` field rather than tagged serde enums: serde buffers tagged
//! enums before deserializing them, which loses the path of an error inside, and a flat
//! struct lets validation say "field `x` does not apply to `kind: y`".

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// Keys allowed at the top level, in the order of [`PipelineWire`].
pub(crate) const ROOT_FIELDS: &[&str] = &[
    "version", "name", "store", "workdir", "models", "prompts", "rounds", "aligner",
];

/// Keys allowed under `aligner:`, in the order of [`AlignerWire`].
pub(crate) const ALIGNER_FIELDS: &[&str] = &[
    "name", "base", "template", "data", "teach", "labels", "holdout", "seed", "train", "sampling",
];

/// Keys allowed under `aligner.teach:`, in the order of [`TeachWire`].
pub(crate) const TEACH_FIELDS: &[&str] = &["prompts", "answer", "teacher"];

/// Keys allowed under `aligner.teach.answer:`, in the order of [`AnswerWire`].
pub(crate) const ANSWER_FIELDS: &[&str] = &["model", "sampling"];

/// Keys allowed under `aligner.teach.teacher:`, in the order of [`TeacherWire`].
pub(crate) const TEACHER_FIELDS: &[&str] = &["kind", "model", "prompt", "sampling", "texts"];

/// Keys allowed under `aligner.labels:`, in the order of [`LabelsWire`].
pub(crate) const LABELS_FIELDS: &[&str] = &["field", "harmful"];

/// Keys allowed under `aligner.train:`, in the order of [`AlignerTrainWire`].
pub(crate) const ALIGNER_TRAIN_FIELDS: &[&str] = &[
    "epochs",
    "learning_rate",
    "batch_size",
    "gradient_accumulation",
    "max_length",
    "warmup_ratio",
    "warmup_fraction",
    "warmup_epochs",
    "lora",
    "train_layers",
    "seed",
    "weight_decay",
    "max_grad_norm",
    "save_every",
];

/// Keys allowed under `rounds:`, in the order of [`RoundsWire`].
pub(crate) const ROUNDS_FIELDS: &[&str] = &[
    "count",
    "generate",
    "correct",
    "synthesize",
    "train",
    "evaluate",
];

/// Keys allowed in each `models.<name>:` entry, in the order of [`ModelWire`].
pub(crate) const MODEL_FIELDS: &[&str] = &[
    "kind",
    "base_url",
    "model",
    "api_key_env",
    "max_concurrency",
    "requests_per_minute",
    "tokens_per_minute",
    "timeout",
    "max_retries",
    "path",
    "hub",
    "revision",
    "dtype",
];

/// The keys of `MODEL_FIELDS` that apply to `kind: openai`.
pub(crate) const OPENAI_FIELDS: &[&str] = &[
    "base_url",
    "model",
    "api_key_env",
    "max_concurrency",
    "requests_per_minute",
    "tokens_per_minute",
    "timeout",
    "max_retries",
];
/// The keys of `MODEL_FIELDS` that apply to `kind: local`.
pub(crate) const LOCAL_FIELDS: &[&str] = &["path", "hub", "revision", "dtype"];

/// Keys allowed under `prompts:`, in the order of [`PromptsWire`].
pub(crate) const PROMPTS_FIELDS: &[&str] = &[
    "source",
    "format",
    "fields",
    "system_prompt",
    "sample",
    "seed",
    "holdout",
];

/// Keys allowed under `prompts.fields:`, in the order of [`FieldsWire`].
pub(crate) const PROMPT_COLUMNS_FIELDS: &[&str] = &["prompt", "id", "system", "metadata"];

/// Keys allowed under `sampling:`, in the order of [`SamplingWire`].
pub(crate) const SAMPLING_FIELDS: &[&str] = &[
    "temperature",
    "top_p",
    "top_k",
    "max_tokens",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
    "seed",
    "stop",
];

/// Keys allowed under `rounds.generate:`, in the order of [`GenerateWire`].
pub(crate) const GENERATE_FIELDS: &[&str] = &["model", "n", "sampling"];

/// Keys allowed under `rounds.correct:`, in the order of [`CorrectWire`].
pub(crate) const CORRECT_FIELDS: &[&str] = &["model", "template", "sampling"];

/// Keys allowed under `rounds.synthesize:`, in the order of [`SynthesizeWire`].
pub(crate) const SYNTHESIZE_FIELDS: &[&str] = &[
    "drop_identical",
    "min_edit_distance",
    "length_ratio",
    "drop_empty",
    "drop_truncated",
    "dedupe_prompts",
    "max_pairs",
    "semantic",
];

/// Keys allowed under `rounds.synthesize.semantic:`, in the order of [`SemanticWire`].
pub(crate) const SEMANTIC_FIELDS: &[&str] =
    &["embedder", "max_copy_similarity", "dedupe_prompts_above"];

/// Keys allowed under `rounds.train:`, in the order of [`TrainWire`].
pub(crate) const TRAIN_FIELDS: &[&str] = &[
    "method",
    "beta",
    "loss",
    "learning_rate",
    "epochs",
    "batch_size",
    "gradient_accumulation",
    "max_length",
    "warmup_ratio",
    "reference",
    "backend",
];

/// Keys allowed under `rounds.train.backend:`, in the order of [`BackendWire`].
pub(crate) const BACKEND_FIELDS: &[&str] = &[
    "kind",
    "command",
    "format",
    "conversational",
    "serve_model",
    "lora",
    "train_layers",
    "seed",
    "weight_decay",
    "max_grad_norm",
    "save_every",
];

/// Keys allowed under `rounds.train.backend.lora:`, in the order of [`LoraWire`].
pub(crate) const LORA_FIELDS: &[&str] = &["rank", "alpha", "dropout", "targets"];

/// Keys allowed in `rounds.evaluate:`, in the order of [`EvaluateWire`].
pub(crate) const EVALUATE_FIELDS: &[&str] = &[
    "judge",
    "aspects",
    "compare",
    "sampling",
    "judge_sampling",
    "labels",
    "bootstrap",
    "seed",
    "gate",
];

/// Keys allowed in `rounds.evaluate.gate:`.
pub(crate) const GATE_FIELDS: &[&str] = &["metric", "max_drop", "action"];

/// The one table of allowed keys: for each YAML path pattern (`*` stands for any key, e.g.
/// a model name), the keys its mapping may have. Validation reports and drops every other
/// key before deserializing, so that all unknown keys of a file are reported at once and
/// the rest of each block is still checked. A unit test checks each list against what serde
/// accepts.
pub(crate) const KNOWN_FIELDS: &[(&str, &[&str])] = &[
    ("", ROOT_FIELDS),
    ("models.*", MODEL_FIELDS),
    ("prompts", PROMPTS_FIELDS),
    ("prompts.fields", PROMPT_COLUMNS_FIELDS),
    ("rounds", ROUNDS_FIELDS),
    ("rounds.generate", GENERATE_FIELDS),
    ("rounds.generate.sampling", SAMPLING_FIELDS),
    ("rounds.correct", CORRECT_FIELDS),
    ("rounds.correct.sampling", SAMPLING_FIELDS),
    ("rounds.synthesize", SYNTHESIZE_FIELDS),
    ("rounds.synthesize.semantic", SEMANTIC_FIELDS),
    ("rounds.train", TRAIN_FIELDS),
    ("rounds.train.backend", BACKEND_FIELDS),
    ("rounds.train.backend.lora", LORA_FIELDS),
    ("rounds.evaluate", EVALUATE_FIELDS),
    ("rounds.evaluate.sampling", SAMPLING_FIELDS),
    ("rounds.evaluate.judge_sampling", SAMPLING_FIELDS),
    ("rounds.evaluate.labels", LABELS_FIELDS),
    ("rounds.evaluate.gate", GATE_FIELDS),
    ("aligner", ALIGNER_FIELDS),
    ("aligner.teach", TEACH_FIELDS),
    ("aligner.teach.prompts", PROMPTS_FIELDS),
    ("aligner.teach.prompts.fields", PROMPT_COLUMNS_FIELDS),
    ("aligner.teach.answer", ANSWER_FIELDS),
    ("aligner.teach.answer.sampling", SAMPLING_FIELDS),
    ("aligner.teach.teacher", TEACHER_FIELDS),
    ("aligner.teach.teacher.sampling", SAMPLING_FIELDS),
    ("aligner.labels", LABELS_FIELDS),
    ("aligner.train", ALIGNER_TRAIN_FIELDS),
    ("aligner.train.lora", LORA_FIELDS),
    ("aligner.sampling", SAMPLING_FIELDS),
];

/// The allowed keys of the mapping at path pattern `pattern`, if it is checked.
pub(crate) fn known_fields(pattern: &str) -> Option<&'static [&'static str]> {
    KNOWN_FIELDS
        .iter()
        .find(|(p, _)| *p == pattern)
        .map(|(_, fields)| *fields)
}

/// The pattern of the child `key` of the node at pattern `parent`: `models` + `up` ->
/// `models.*`, `rounds` + `train` -> `rounds.train`.
pub(crate) fn child_pattern(parent: &str, key: &str) -> String {
    let join = |k: &str| {
        if parent.is_empty() {
            k.to_string()
        } else {
            format!("{parent}.{k}")
        }
    };
    let wildcard = join("*");
    let is_wildcard = KNOWN_FIELDS.iter().any(|(p, _)| {
        *p == wildcard
            || p.strip_prefix(wildcard.as_str())
                .is_some_and(|rest| rest.starts_with('.'))
    });
    if is_wildcard {
        wildcard
    } else {
        join(key)
    }
}

/// The whole file. Validation deserializes it block by block (each field on its own), so
/// the fields are not read: the struct gives the message for a file that is not a mapping
/// and is the reference that [`ROOT_FIELDS`] is tested against.
#[allow(dead_code)]
#[derive(Debug, Clone, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a pipeline mapping (`version: 1`, `models:`, `prompts:`, `rounds:`)"
)]
pub struct PipelineWire {
    /// Must be 1; optional here so that its absence gets a dedicated message.
    pub version: Option<u64>,
    pub name: Option<String>,
    pub store: Option<String>,
    pub workdir: Option<String>,
    /// Optional here so that a missing or empty block gets a dedicated message.
    pub models: Option<BTreeMap<String, ModelWire>>,
    pub prompts: PromptsWire,
    pub rounds: RoundsWire,
    pub aligner: Option<AlignerWire>,
}

/// `kind:` of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    Openai,
    Local,
}

/// One entry of `models:`. Which fields apply depends on `kind`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a model mapping with a `kind`")]
pub struct ModelWire {
    pub kind: ModelKind,
    // kind: openai
    pub base_url: Option<String>,
    pub model: Option<String>,
    pub api_key_env: Option<String>,
    pub max_concurrency: Option<u32>,
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u32>,
    pub timeout: Option<DurationWire>,
    pub max_retries: Option<u32>,
    // kind: local
    pub path: Option<String>,
    pub hub: Option<String>,
    pub revision: Option<String>,
    pub dtype: Option<DtypeWire>,
}

impl ModelWire {
    /// The fields that are set, with the kinds they belong to (for "does not apply" checks).
    pub(crate) fn set_fields(&self) -> Vec<(&'static str, ModelKind)> {
        use ModelKind::{Local, Openai};
        let mut out = Vec::new();
        let mut push = |set: bool, name: &'static str, kind: ModelKind| {
            if set {
                out.push((name, kind));
            }
        };
        push(self.base_url.is_some(), "base_url", Openai);
        push(self.model.is_some(), "model", Openai);
        push(self.api_key_env.is_some(), "api_key_env", Openai);
        push(self.max_concurrency.is_some(), "max_concurrency", Openai);
        push(
            self.requests_per_minute.is_some(),
            "requests_per_minute",
            Openai,
        );
        push(
            self.tokens_per_minute.is_some(),
            "tokens_per_minute",
            Openai,
        );
        push(self.timeout.is_some(), "timeout", Openai);
        push(self.max_retries.is_some(), "max_retries", Openai);
        push(self.path.is_some(), "path", Local);
        push(self.hub.is_some(), "hub", Local);
        push(self.revision.is_some(), "revision", Local);
        push(self.dtype.is_some(), "dtype", Local);
        out
    }
}

/// `dtype:` of a local model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DtypeWire {
    Auto,
    F32,
    Bf16,
    F16,
    /// f32/bf16 weights quantized to Q8_0 at load (CPU path; about 4x faster than f32).
    #[serde(rename = "q8_0")]
    Q8_0,
}

impl DtypeWire {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            DtypeWire::Auto => "auto",
            DtypeWire::F32 => "f32",
            DtypeWire::Bf16 => "bf16",
            DtypeWire::F16 => "f16",
            DtypeWire::Q8_0 => "q8_0",
        }
    }
}

/// A duration: a number of seconds (`60`, `0.5`) or a string with a unit (`"500ms"`,
/// `"60s"`, `"2m"`, `"1h"`). Parsed while deserializing, so a bad one is reported with
/// its path.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DurationWire {
    pub secs: f64,
}

impl DurationWire {
    /// Parses `"500ms"`, `"60s"`, `"2m"`, `"1h"` or a bare number of seconds.
    pub fn parse(text: &str) -> Result<DurationWire, String> {
        let t = text.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let factor = match unit.trim() {
            "" | "s" | "sec" | "secs" => 1.0,
            "ms" => 0.001,
            "m" | "min" | "mins" => 60.0,
            "h" => 3600.0,
            _ => return Err(format!("invalid duration `{text}`, expected a number of seconds or a string like `500ms`, `60s`, `2m`")),
        };
        match num.parse::<f64>() {
            Ok(n) if n.is_finite() => Ok(DurationWire { secs: n * factor }),
            _ => Err(format!("invalid duration `{text}`, expected a number of seconds or a string like `500ms`, `60s`, `2m`")),
        }
    }
}

impl<'de> Deserialize<'de> for DurationWire {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = DurationWire;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number of seconds or a duration like `500ms`, `60s`, `2m`")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<DurationWire, E> {
                Ok(DurationWire { secs: v as f64 })
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<DurationWire, E> {
                Ok(DurationWire { secs: v as f64 })
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<DurationWire, E> {
                Ok(DurationWire { secs: v })
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<DurationWire, E> {
                DurationWire::parse(v).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(V)
    }
}

/// `prompts:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a prompts mapping with a `source`")]
pub struct PromptsWire {
    pub source: String,
    /// Overrides the format guessed from the extension.
    pub format: Option<PromptFormatWire>,
    #[serde(default)]
    pub fields: FieldsWire,
    pub system_prompt: Option<String>,
    pub sample: Option<u64>,
    pub seed: Option<u64>,
    pub holdout: Option<f64>,
}

/// `prompts.format:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptFormatWire {
    Jsonl,
    Csv,
    Parquet,
}

/// `prompts.fields:`: which columns hold what.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping of column names")]
pub struct FieldsWire {
    pub prompt: Option<String>,
    pub id: Option<String>,
    pub system: Option<String>,
    #[serde(default)]
    pub metadata: Vec<String>,
}

/// `rounds:`. As with [`PipelineWire`], validation deserializes each stage on its own; the
/// struct gives the message for a `rounds` that is not a mapping.
#[allow(dead_code)]
#[derive(Debug, Clone, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a rounds mapping with `generate` and `correct`"
)]
pub struct RoundsWire {
    pub count: Option<u32>,
    pub generate: GenerateWire,
    pub correct: CorrectWire,
    pub synthesize: Option<SynthesizeWire>,
    pub train: Option<TrainWire>,
    pub evaluate: Option<EvaluateWire>,
}

/// Sampling settings, shared by `generate` and `correct`. All optional: unset ones are
/// left to the model's defaults.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping of sampling settings")]
pub struct SamplingWire {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<u32>,
    pub max_tokens: Option<u32>,
    pub frequency_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub seed: Option<u64>,
    #[serde(default)]
    pub stop: Vec<String>,
}

/// `rounds.generate:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a generate mapping with a `model`")]
pub struct GenerateWire {
    pub model: String,
    pub n: Option<u32>,
    #[serde(default)]
    pub sampling: SamplingWire,
}

/// `rounds.correct:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a correct mapping with a `model`")]
pub struct CorrectWire {
    pub model: String,
    /// A built-in id (`aligner-v1`, ...) or a custom text with `{question}` and `{answer}`.
    pub template: Option<String>,
    #[serde(default)]
    pub sampling: SamplingWire,
}

/// `rounds.synthesize:`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a synthesize mapping")]
pub struct SynthesizeWire {
    pub drop_identical: Option<bool>,
    pub min_edit_distance: Option<f64>,
    /// `[min, max]`.
    pub length_ratio: Option<Vec<f64>>,
    pub drop_empty: Option<bool>,
    pub drop_truncated: Option<bool>,
    pub dedupe_prompts: Option<bool>,
    pub max_pairs: Option<u64>,
    pub semantic: Option<SemanticWire>,
}

/// `rounds.synthesize.semantic:`: filters on sentence embeddings.
#[derive(Debug, Clone, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a semantic mapping with an `embedder`"
)]
pub struct SemanticWire {
    /// A sentence-transformers folder (`config.json`, `model.safetensors`, `tokenizer.json`).
    pub embedder: String,
    pub max_copy_similarity: Option<f64>,
    pub dedupe_prompts_above: Option<f64>,
}

/// `rounds.train.method:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainMethodWire {
    Dpo,
    Sft,
}

/// `rounds.train.loss:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DpoLossWire {
    Sigmoid,
    Ipo,
    Hinge,
    Robust,
    ApoZero,
    ApoDown,
    SigmoidNll,
}

/// `rounds.train.reference:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReferenceWire {
    Initial,
    Previous,
}

/// `rounds.train:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a train mapping with a `backend`")]
pub struct TrainWire {
    pub method: Option<TrainMethodWire>,
    pub beta: Option<f64>,
    pub loss: Option<DpoLossWire>,
    pub learning_rate: Option<f64>,
    pub epochs: Option<u32>,
    pub batch_size: Option<u32>,
    pub gradient_accumulation: Option<u32>,
    pub max_length: Option<u32>,
    pub warmup_ratio: Option<f64>,
    pub reference: Option<ReferenceWire>,
    pub backend: BackendWire,
}

/// `rounds.train.backend.kind:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    Command,
    Builtin,
}

/// `rounds.train.backend.format:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExportFormatWire {
    Jsonl,
    Parquet,
}

/// `rounds.train.backend:`. `command`, `format`, `conversational` and `serve_model` belong
/// to `kind: command`; the rest to `kind: builtin`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a backend mapping with a `kind`")]
pub struct BackendWire {
    pub kind: BackendKind,
    pub command: Option<String>,
    pub format: Option<ExportFormatWire>,
    pub conversational: Option<bool>,
    pub serve_model: Option<String>,
    pub lora: Option<LoraWire>,
    pub train_layers: Option<u32>,
    pub seed: Option<u64>,
    pub weight_decay: Option<f64>,
    pub max_grad_norm: Option<f64>,
    pub save_every: Option<u32>,
}

/// `rounds.train.backend.lora:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a lora mapping")]
pub struct LoraWire {
    pub rank: Option<u32>,
    pub alpha: Option<f64>,
    pub dropout: Option<f64>,
    pub targets: Option<Vec<String>>,
}

/// `rounds.evaluate:`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "an evaluate mapping")]
pub struct EvaluateWire {
    pub judge: Option<String>,
    pub aspects: Option<Vec<String>>,
    pub compare: Option<Vec<String>>,
    pub sampling: Option<SamplingWire>,
    pub judge_sampling: Option<SamplingWire>,
    pub labels: Option<LabelsWire>,
    pub bootstrap: Option<u32>,
    pub seed: Option<u64>,
    pub gate: Option<GateWire>,
}

/// `rounds.evaluate.gate:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a gate mapping with `metric` and `max_drop`"
)]
pub struct GateWire {
    pub metric: String,
    pub max_drop: f64,
    pub action: Option<String>,
}

/// `aligner:`: the pipeline's own Aligner, trained before round 1.
#[derive(Debug, Clone, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "an aligner mapping with a `base` and `data` or `teach`"
)]
pub struct AlignerWire {
    pub name: Option<String>,
    pub base: String,
    pub template: Option<String>,
    /// A question-answer-correction file.
    pub data: Option<String>,
    pub teach: Option<TeachWire>,
    pub labels: Option<LabelsWire>,
    pub holdout: Option<f64>,
    pub seed: Option<u64>,
    #[serde(default)]
    pub train: AlignerTrainWire,
    pub sampling: Option<SamplingWire>,
}

/// `aligner.teach:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a teach mapping with `prompts` and `teacher`"
)]
pub struct TeachWire {
    pub prompts: PromptsWire,
    pub answer: Option<AnswerWire>,
    pub teacher: TeacherWire,
}

/// `aligner.teach.answer:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, expecting = "an answer mapping with a `model`")]
pub struct AnswerWire {
    pub model: String,
    #[serde(default)]
    pub sampling: SamplingWire,
}

/// `aligner.teach.teacher.kind:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TeacherKind {
    Model,
    Refusal,
}

/// `aligner.teach.teacher:`. `model`, `prompt` and `sampling` belong to `kind: model`,
/// `texts` to `kind: refusal`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a teacher mapping with a `kind`")]
pub struct TeacherWire {
    pub kind: TeacherKind,
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub sampling: Option<SamplingWire>,
    pub texts: Option<Vec<String>>,
}

/// `aligner.labels:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a labels mapping with `field` and `harmful`"
)]
pub struct LabelsWire {
    pub field: String,
    pub harmful: Vec<String>,
}

/// `aligner.train:`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a train mapping")]
pub struct AlignerTrainWire {
    pub epochs: Option<u32>,
    pub learning_rate: Option<f64>,
    pub batch_size: Option<u32>,
    pub gradient_accumulation: Option<u32>,
    pub max_length: Option<u32>,
    pub warmup_ratio: Option<f64>,
    pub warmup_fraction: Option<f64>,
    pub warmup_epochs: Option<u32>,
    pub lora: Option<LoraWire>,
    pub train_layers: Option<u32>,
    pub seed: Option<u64>,
    pub weight_decay: Option<f64>,
    pub max_grad_norm: Option<f64>,
    pub save_every: Option<u32>,
}

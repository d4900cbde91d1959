//! The pipeline file as written: serde structs that mirror the YAML one to one.
//!
//! Every block denies unknown fields, so a typo is an error rather than a silently ignored
//! setting. Validation reads the allowed keys of each block from these derives
//! ([`KNOWN_FIELDS`](crate::validate::fields::KNOWN_FIELDS)), so that it can report every
//! unknown key of a file in one pass. Values are still raw here: paths are not resolved,
//! `${VAR}`s are not expanded, ranges are not checked, model names are not
//! cross-referenced. `validate/` turns these into the types of `types.rs`.
//!
//! Enums whose variants carry different fields (`models.*.kind`, `train.backend.kind`) are
//! flat structs with a `kind` field rather than tagged serde enums: serde buffers tagged
//! enums before deserializing them, which loses the path of an error inside, and a flat
//! struct lets validation say "field `x` does not apply to `kind: y`".

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use aligner_backend::Sampling;

use crate::types::{DpoLoss, RawEndpoint, TrainMethod};

/// The whole file. Validation deserializes it block by block (each field on its own), so
/// the fields are not read: the struct gives the message for a file that is not a mapping
/// and is where the walk that builds
/// [`KNOWN_FIELDS`](crate::validate::fields::KNOWN_FIELDS) starts.
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
    /// Prices per model key (or the Aligner's name): what the `costs` view charges.
    pub prices: Option<BTreeMap<String, PriceWire>>,
    pub budget: Option<BudgetWire>,
}

/// `prices.<model>:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a price mapping")]
pub struct PriceWire {
    /// Per million prompt tokens.
    pub input: Option<f64>,
    /// Per million completion tokens.
    pub output: Option<f64>,
    /// Per hour of the stages and training jobs that run the model.
    pub per_hour: Option<f64>,
}

/// `budget:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a budget mapping with `max_cost`")]
pub struct BudgetWire {
    pub max_cost: f64,
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
    pub raw_endpoint: Option<RawEndpoint>,
    pub weights: Option<String>,
    pub replicas: Option<Vec<String>>,
    pub replica_concurrency: Option<u32>,
    // kind: local
    pub path: Option<String>,
    pub hub: Option<String>,
    pub revision: Option<String>,
    pub dtype: Option<DtypeWire>,
}

impl ModelWire {
    /// Every field but `kind`: its name, the kind it applies to, and whether it is set, in
    /// the order of the struct. The destructuring names each field, so a field added to the
    /// struct does not compile until it is given its kind here.
    pub(crate) fn fields(&self) -> Vec<(&'static str, ModelKind, bool)> {
        use ModelKind::{Local, Openai};
        let ModelWire {
            kind: _,
            base_url,
            model,
            api_key_env,
            max_concurrency,
            requests_per_minute,
            tokens_per_minute,
            timeout,
            max_retries,
            raw_endpoint,
            weights,
            replicas,
            replica_concurrency,
            path,
            hub,
            revision,
            dtype,
        } = self;
        macro_rules! field {
            ($name:ident, $kind:expr) => {
                (stringify!($name), $kind, $name.is_some())
            };
        }
        vec![
            field!(base_url, Openai),
            field!(model, Openai),
            field!(api_key_env, Openai),
            field!(max_concurrency, Openai),
            field!(requests_per_minute, Openai),
            field!(tokens_per_minute, Openai),
            field!(timeout, Openai),
            field!(max_retries, Openai),
            field!(raw_endpoint, Openai),
            field!(weights, Openai),
            field!(replicas, Openai),
            field!(replica_concurrency, Openai),
            field!(path, Local),
            field!(hub, Local),
            field!(revision, Local),
            field!(dtype, Local),
        ]
    }

    /// The fields that are set, with the kinds they belong to (for "does not apply" checks).
    pub(crate) fn set_fields(&self) -> Vec<(&'static str, ModelKind)> {
        self.fields()
            .into_iter()
            .filter(|(_, _, set)| *set)
            .map(|(name, kind, _)| (name, kind))
            .collect()
    }

    /// The fields that apply to `kind`, in the order of the struct.
    pub(crate) fn fields_for(&self, kind: ModelKind) -> Vec<&'static str> {
        self.fields()
            .into_iter()
            .filter(|(_, k, _)| *k == kind)
            .map(|(name, _, _)| name)
            .collect()
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
    /// A fixed file of held-out prompts (rounds' `prompts` only).
    pub holdout_source: Option<String>,
    pub leak_check: Option<LeakCheckWire>,
}

/// `prompts.leak_check:`: held-out prompts checked against training prompts by embeddings.
#[derive(Debug, Clone, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a leak_check mapping with an `embedder`"
)]
pub struct LeakCheckWire {
    /// A sentence-transformers folder, as `rounds.synthesize.semantic.embedder`.
    pub embedder: String,
    pub max_similarity: Option<f64>,
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
    pub messages: Option<String>,
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

/// `rounds.generate:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a generate mapping with a `model`")]
pub struct GenerateWire {
    pub model: String,
    pub n: Option<u32>,
    #[serde(default)]
    pub sampling: Sampling,
}

/// `rounds.correct:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a correct mapping with a `model`")]
pub struct CorrectWire {
    pub model: String,
    /// A built-in id (`aligner-v1`, ...) or a custom text with `{question}` and `{answer}`.
    pub template: Option<String>,
    #[serde(default)]
    pub sampling: Sampling,
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
    /// `{field, harmful}`: drop pairs that teach refusing a benign prompt.
    pub benign_refusals: Option<LabelsWire>,
    /// `{field, harmful, refusals}`: benign prompts give pairs that prefer the answer to a
    /// refusal.
    pub benign_preference: Option<BenignPreferenceWire>,
}

/// `rounds.synthesize.benign_preference:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a benign_preference mapping with `field` and `harmful`"
)]
pub struct BenignPreferenceWire {
    pub field: String,
    pub harmful: Vec<String>,
    pub refusals: Option<Vec<String>>,
    pub max_ratio: Option<f64>,
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
    pub method: Option<TrainMethod>,
    pub beta: Option<f64>,
    pub loss: Option<DpoLoss>,
    pub learning_rate: Option<f64>,
    pub epochs: Option<u32>,
    pub batch_size: Option<u32>,
    pub gradient_accumulation: Option<u32>,
    pub max_length: Option<u32>,
    pub warmup_ratio: Option<f64>,
    pub reference: Option<ReferenceWire>,
    pub backend: BackendWire,
    pub serve: Option<ServeWire>,
    pub replay: Option<ReplayWire>,
}

/// `rounds.train.replay:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a replay mapping with `min_pairs`")]
pub struct ReplayWire {
    pub min_pairs: u32,
    pub origins: Option<Vec<crate::types::PairKind>>,
}

/// `rounds.train.serve:`: how a round's checkpoint gets behind the upstream's endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a serve mapping with a `kind`")]
pub struct ServeWire {
    pub kind: ServeKindWire,
    pub command: Option<String>,
    pub port: Option<u16>,
    pub base_url: Option<String>,
    pub timeout_secs: Option<f64>,
}

/// `rounds.train.serve.kind:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServeKindWire {
    Command,
    VllmLora,
    SglangReload,
}

/// `rounds.train.backend.kind:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    Command,
    Ray,
    Slurm,
    Builtin,
}

/// `rounds.train.backend.format:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExportFormatWire {
    Jsonl,
    Parquet,
}

/// Declares a wire struct whose last fields are the built-in trainer's options (`lora`,
/// `train_layers`, `seed`, `weight_decay`, `max_grad_norm`, `save_every`), written here once
/// for the two mappings that take them, with [`builtin`](BackendWire::builtin) to borrow them.
macro_rules! with_builtin_options {
    (
        $(#[$meta:meta])*
        pub struct $name:ident { $($(#[$fmeta:meta])* pub $field:ident: $ty:ty,)* }
    ) => {
        $(#[$meta])*
        pub struct $name {
            $($(#[$fmeta])* pub $field: $ty,)*
            pub lora: Option<LoraWire>,
            pub train_layers: Option<u32>,
            pub seed: Option<u64>,
            pub weight_decay: Option<f64>,
            pub max_grad_norm: Option<f64>,
            pub save_every: Option<u32>,
        }

        impl $name {
            /// The built-in trainer's options as written.
            pub(crate) fn builtin(&self) -> BuiltinWire<'_> {
                BuiltinWire {
                    lora: self.lora.as_ref(),
                    train_layers: self.train_layers,
                    seed: self.seed,
                    weight_decay: self.weight_decay,
                    max_grad_norm: self.max_grad_norm,
                    save_every: self.save_every,
                }
            }
        }
    };
}

/// The built-in trainer's options as written, wherever they appear (`rounds.train.backend`,
/// `aligner.train`).
pub(crate) struct BuiltinWire<'a> {
    pub(crate) lora: Option<&'a LoraWire>,
    pub(crate) train_layers: Option<u32>,
    pub(crate) seed: Option<u64>,
    pub(crate) weight_decay: Option<f64>,
    pub(crate) max_grad_norm: Option<f64>,
    pub(crate) save_every: Option<u32>,
}

impl BuiltinWire<'_> {
    /// The options that are set, by name.
    pub(crate) fn set(&self) -> Vec<&'static str> {
        [
            ("lora", self.lora.is_some()),
            ("train_layers", self.train_layers.is_some()),
            ("seed", self.seed.is_some()),
            ("weight_decay", self.weight_decay.is_some()),
            ("max_grad_norm", self.max_grad_norm.is_some()),
            ("save_every", self.save_every.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, set)| set.then_some(name))
        .collect()
    }
}

with_builtin_options! {
    /// `rounds.train.backend:`. `command`, `format`, `conversational` and `serve_model` belong
    /// to `kind: command`, `kind: ray` and `kind: slurm`; `address` ... `metadata` to `kind: ray`,
    /// `partition` ... `sbatch` to `kind: slurm` (`poll_seconds` to both); the rest to
    /// `kind: builtin`.
    #[derive(Debug, Clone, Deserialize)]
    #[serde(deny_unknown_fields, expecting = "a backend mapping with a `kind`")]
    pub struct BackendWire {
        pub kind: BackendKind,
        pub command: Option<String>,
        pub format: Option<ExportFormatWire>,
        pub conversational: Option<bool>,
        pub serve_model: Option<String>,
        pub address: Option<String>,
        pub runtime_env: Option<serde_json::Value>,
        pub entrypoint_num_cpus: Option<f64>,
        pub entrypoint_num_gpus: Option<f64>,
        pub metadata: Option<std::collections::BTreeMap<String, String>>,
        pub poll_seconds: Option<f64>,
        pub partition: Option<String>,
        pub time: Option<String>,
        pub nodes: Option<u32>,
        pub gpus: Option<String>,
        pub cpus_per_task: Option<u32>,
        pub mem: Option<String>,
        pub sbatch: Option<Vec<String>>,
    }
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
    pub sampling: Option<Sampling>,
    pub judge_sampling: Option<Sampling>,
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
    pub sampling: Option<Sampling>,
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
    pub sampling: Sampling,
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
    pub sampling: Option<Sampling>,
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

with_builtin_options! {
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
    }
}

//! The validated pipeline: what the rest of the code takes. Built only by `Pipeline::from_yaml`
//! (see `wire.rs` / `validate/`), so every value here has passed its checks.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use aligner_backend::Sampling;

/// Linear layers LoRA can adapt, by their Hugging Face names (what `lora.targets` may list
/// and the built-in trainer adapts).
pub const LORA_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// A whole pipeline, `version: 1`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Pipeline {
    /// `name:`; defaults to the file stem. Runs are keyed by it.
    pub name: String,
    /// `store:`; the SQLite file (relative paths resolve against the YAML's folder).
    pub store: Option<PathBuf>,
    /// `workdir:`; where exports and checkpoints go. Default `runs/` beside the YAML.
    pub workdir: PathBuf,
    pub models: BTreeMap<String, ModelSpec>,
    pub prompts: PromptsSpec,
    pub rounds: RoundsSpec,
    /// `aligner:`: train this pipeline's own Aligner before round 1. Left out of the snapshot
    /// when unset, so the hash of a spec without it did not change when it was added.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aligner: Option<AlignerSpec>,
    /// `prices:` per model key (or the Aligner's name). May change between a run and its
    /// resume (left out of the resume hash).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub prices: BTreeMap<String, Price>,
    /// `budget:`: the run stops cleanly before a stage once its cost reaches this. May be
    /// raised for a resume.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget: Option<Budget>,
}

/// What a model costs: per million prompt and completion tokens, and per hour of the stages
/// and training jobs that run it (a GPU's hour, for local models and trainers).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Price {
    pub input: f64,
    pub output: f64,
    pub per_hour: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Budget {
    pub max_cost: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ModelSpec {
    Openai(OpenAiModel),
    Local(LocalModel),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OpenAiModel {
    /// Base URL up to and including `/v1` (e.g. `http://127.0.0.1:8000/v1`).
    pub base_url: String,
    /// The `model` field sent in requests.
    pub model: String,
    /// Name of the environment variable that holds the API key. The key itself never enters
    /// the spec, the store, logs or errors.
    pub api_key_env: Option<String>,
    /// Requests in flight at once. Default 16.
    pub max_concurrency: u32,
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u32>,
    /// Per-request timeout in seconds. Default 120.
    pub timeout_secs: f64,
    /// Retries after the first attempt. Default 5.
    pub max_retries: u32,
    /// Where raw prompts (an Aligner's rendered template, a raw judge prompt) go. Default
    /// `completions`; left out of the snapshot then, so older runs resume unchanged.
    #[serde(skip_serializing_if = "RawEndpoint::is_completions")]
    pub raw_endpoint: RawEndpoint,
    /// Where the served model's weights are (a path or hub id): what a `command` trainer gets
    /// as `{base_model}` in round 1 (and `{ref_model}` for `reference: initial`), as opposed to
    /// the name the server gives them (`model`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weights: Option<String>,
    /// More endpoints serving the same model (replicas); `base_url` is the first. Requests go
    /// to the replica with the fewest in flight; one that fails is taken out, probed, and let
    /// back in.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<String>,
    /// Requests in flight at once per replica (`max_concurrency` bounds them all). Default:
    /// `max_concurrency`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replica_concurrency: Option<u32>,
}

impl OpenAiModel {
    /// Every endpoint that serves the model: `base_url`, then the replicas.
    pub fn endpoints(&self) -> Vec<String> {
        std::iter::once(self.base_url.clone())
            .chain(self.replicas.iter().cloned())
            .collect()
    }
}

/// `raw_endpoint:` of an `openai` model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RawEndpoint {
    /// `POST /v1/completions` with the text as `prompt`.
    #[default]
    Completions,
    /// `POST /v1/chat/completions` with the text as the one user message, for servers that
    /// serve chat only (most hosted APIs).
    Chat,
}

impl RawEndpoint {
    pub fn is_completions(&self) -> bool {
        *self == RawEndpoint::Completions
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LocalModel {
    pub source: LocalSource,
    /// `f32` | `bf16` | `auto` (default: the file's own).
    pub dtype: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LocalSource {
    /// A `.gguf` file whose header has been checked.
    Gguf {
        path: PathBuf,
        architecture: Option<String>,
    },
    /// A Hugging Face folder with `config.json`, `tokenizer.json` and `*.safetensors`.
    HfFolder {
        path: PathBuf,
        architecture: Option<String>,
    },
    /// `org/name` on a model hub, resolved when the local-models backend loads it.
    HubId {
        id: String,
        revision: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptFormat {
    Jsonl,
    Csv,
    Parquet,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PromptsSpec {
    pub source: PathBuf,
    pub format: PromptFormat,
    /// Column holding the prompt text (default `prompt`).
    pub prompt_field: String,
    /// Column holding a stable id; when absent the row number is the id.
    pub id_field: Option<String>,
    /// Column holding a per-row system prompt.
    pub system_field: Option<String>,
    /// A column of conversations (`[{"role", "content"}]`): the last user turn is the prompt,
    /// the turns before it its history. Replaces `prompt_field`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub messages_field: Option<String>,
    /// Extra columns copied into the prompt's metadata (e.g. `category`).
    pub metadata_fields: Vec<String>,
    /// A system prompt for every row (a per-row one wins).
    pub system_prompt: Option<String>,
    /// Keep only this many rows, sampled with `seed`.
    pub sample: Option<u64>,
    pub seed: u64,
    /// Fraction in [0, 1) of the (sampled) prompts held out for evaluation.
    pub holdout: f64,
    /// A fixed file of held-out prompts (same format and fields as `source`), instead of a
    /// random `holdout` fraction: every row of `source` trains, every row of this file is held
    /// out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub holdout_source: Option<PathBuf>,
    /// Near-duplicates of held-out prompts among the training prompts, by sentence embeddings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leak_check: Option<LeakCheck>,
}

/// `prompts.leak_check`: a training prompt of the rounds, or a teaching prompt of the Aligner,
/// whose embedding has a cosine above `max_similarity` with a held-out prompt's stops the run
/// (the exact-text check runs always).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LeakCheck {
    /// A sentence-transformers folder, e.g. all-MiniLM-L6-v2.
    pub embedder: PathBuf,
    /// In (0, 1]; default 0.9.
    pub max_similarity: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RoundsSpec {
    pub count: u32,
    pub generate: GenerateStage,
    pub correct: CorrectStage,
    pub synthesize: SynthesizeStage,
    pub train: Option<TrainStage>,
    pub evaluate: Option<EvaluateStage>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GenerateStage {
    /// A key of `models`.
    pub model: String,
    pub sampling: Sampling,
    /// Answers per prompt. Default 1.
    pub n: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CorrectStage {
    /// A key of `models`.
    pub model: String,
    pub template: Template,
    pub sampling: Sampling,
}

/// A correction prompt template. Built-in texts are byte-exact copies of the Aligner
/// releases (see docs/aligner-method).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "id", content = "text", rename_all = "kebab-case")]
pub enum Template {
    AlignerV1,
    AlignerGeneral,
    AlignerEmpathy,
    /// `aligner-v1-multiturn`: `aligner-v1` with the conversation before the question
    /// (`{history}`, rendered as [`crate::render_history`] says).
    AlignerV1Multiturn,
    /// A custom text containing `{question}` and `{answer}` (and optionally `{history}`).
    Custom(String),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SynthesizeStage {
    /// Drop pairs whose correction equals the original (after trimming). Default true.
    pub drop_identical: bool,
    /// Drop pairs whose normalized edit distance is below this (0 disables). Default 0.05.
    pub min_edit_distance: f64,
    /// Keep pairs whose len(chosen)/len(rejected) is within [min, max]. Default [0.1, 10].
    pub length_ratio_min: f64,
    pub length_ratio_max: f64,
    /// Drop pairs with an empty side. Default true.
    pub drop_empty: bool,
    /// Drop pairs where either side hit `max_tokens`. Default true.
    pub drop_truncated: bool,
    /// Keep at most one pair per prompt text. Default true.
    pub dedupe_prompts: bool,
    /// Keep at most this many pairs per round.
    pub max_pairs: Option<u64>,
    /// Filters on sentence embeddings (`semantic:`), when set. Left out of the snapshot when
    /// unset, so that the hash of a spec without it did not change when it was added.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub semantic: Option<SemanticFilter>,
    /// Drop a pair whose prompt this rule calls benign and whose correction is a refusal
    /// (`benign_refusal`): the Aligner's over-refusals never become DPO data. Unset: off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub benign_refusals: Option<LabelRule>,
    /// Pairs that prefer the upstream's answer to a refusal, for the prompts this rule calls
    /// benign, so that DPO sees refusing a benign request as the worse answer. Unset: off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub benign_preference: Option<BenignPreference>,
}

/// `rounds.synthesize.benign_preference`: for a prompt that `labels` calls benign, the kept
/// pair is (chosen = the upstream's answer, rejected = a refusal) instead of a correction
/// pair. The refusal is the Aligner's own correction when it refused the prompt
/// (`answer_over_aligner_refusal`), otherwise one of `refusals`, picked by a hash of the
/// prompt (`answer_over_refusal_text`). An answer that is itself a refusal is dropped
/// (`answer_refuses`); the Aligner's other edits of benign answers are not used.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BenignPreference {
    pub labels: LabelRule,
    /// Default: the refusal teacher's texts ([`crate::REFUSAL_TEXTS`]).
    pub refusals: Vec<String>,
    /// At most this many benign-preference pairs per kept correction pair in a round; the
    /// rest are dropped as `benign_cap` (picked by a hash of the prompt). As the upstream
    /// learns, correction pairs dry up while benign prompts keep giving pairs; the cap keeps
    /// the mix. Unset: no cap.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_ratio: Option<f64>,
}

/// `rounds.synthesize.semantic`: drops pairs by what their texts mean, using sentence
/// embeddings (cosine similarity of L2-normalized vectors).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SemanticFilter {
    /// A sentence-transformers folder (`config.json`, `model.safetensors`, `tokenizer.json`),
    /// e.g. all-MiniLM-L6-v2.
    pub embedder: PathBuf,
    /// Drop a pair whose correction's embedding has a cosine above this with the original's:
    /// the correction says the same thing (`semantic_copy`). In (0, 1]; default 0.98; 1 turns
    /// it off.
    pub max_copy_similarity: f64,
    /// Drop a pair whose prompt's embedding has a cosine above this with the prompt of a pair
    /// already kept this round (another prompt text): near-duplicate prompts give the pairs
    /// of the first one only (`near_duplicate_prompt`). In (0, 1]; unset: not checked.
    pub dedupe_prompts_above: Option<f64>,
}

/// `rounds.train.method:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainMethod {
    Dpo,
    Sft,
}

/// `rounds.train.loss:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DpoLoss {
    Sigmoid,
    Ipo,
    Hinge,
    Robust,
    ApoZero,
    ApoDown,
    /// Sigmoid plus an NLL term on chosen (TRL's old `rpo_alpha`).
    SigmoidNll,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReferencePolicy {
    Initial,
    Previous,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExportFormat {
    Jsonl,
    Parquet,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TrainBackend {
    /// Runs a user command on this machine.
    Command(ExternalTrainer),
    /// Submits the user command as a job to a Ray cluster (the Jobs REST API of its dashboard).
    Ray {
        trainer: ExternalTrainer,
        cluster: RayCluster,
    },
    /// Submits the user command as a Slurm batch job (`sbatch`).
    Slurm {
        trainer: ExternalTrainer,
        cluster: SlurmCluster,
    },
    /// The built-in candle trainer (`aligner-train`), for `kind: local` generate models.
    Builtin(BuiltinTrainer),
}

impl TrainBackend {
    /// The user's trainer, for the backends that run one.
    pub fn external(&self) -> Option<&ExternalTrainer> {
        match self {
            TrainBackend::Command(t)
            | TrainBackend::Ray { trainer: t, .. }
            | TrainBackend::Slurm { trainer: t, .. } => Some(t),
            TrainBackend::Builtin(_) => None,
        }
    }
}

/// A user's trainer: a command over the exported pairs. Placeholders: `{data}`,
/// `{base_model}`, `{ref_model}`, `{output_dir}`, `{round}` and the train stage's settings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExternalTrainer {
    pub command: String,
    /// How the exported pairs look on disk. Default jsonl.
    pub format: ExportFormat,
    /// Conversational (`[{role, content}]`) instead of plain strings. Default false.
    pub conversational: bool,
    /// For an `openai` upstream: the model name under which the server serves the new
    /// checkpoint (`{round}` and `{output_dir}` are filled in). Required then.
    pub serve_model: Option<String>,
}

/// Where and how a Ray job runs. Paths in the command (`{data}`, `{output_dir}`) must be
/// readable and writable from the cluster's workers: a shared filesystem, as on most clusters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RayCluster {
    /// The dashboard's address, e.g. `http://127.0.0.1:8265`.
    pub address: String,
    /// Ray's `runtime_env` (working_dir, pip, env_vars, ...), passed as written; the
    /// placeholders' `ALIGNER_*` variables are added to its `env_vars`.
    pub runtime_env: Option<serde_json::Value>,
    pub entrypoint_num_cpus: Option<f64>,
    pub entrypoint_num_gpus: Option<f64>,
    /// Extra job metadata (strings); `aligner_run` and `aligner_round` are always set.
    pub metadata: std::collections::BTreeMap<String, String>,
    /// Seconds between two looks at the job's state and logs. Default 2.
    pub poll_seconds: f64,
}

/// Options of the built-in trainer. Without `lora` or `train_layers` every weight trains.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BuiltinTrainer {
    pub lora: Option<LoraSpec>,
    /// Train only the last N transformer layers (and the final norm).
    pub train_layers: Option<u32>,
    /// Shuffling and adapter initialisation. Default 42.
    pub seed: u64,
    /// AdamW's decoupled weight decay. Default 0.
    pub weight_decay: f64,
    /// Global gradient-norm clipping. Default 1.0; 0 turns it off.
    pub max_grad_norm: f64,
    /// Save resumable state every N optimizer steps. Default 50.
    pub save_every: u32,
}

/// What a Slurm batch job asks for. The job runs the command on a node that must see this
/// machine's `{data}` and `{output_dir}` (a shared filesystem); its output goes to
/// `{output_dir}.out`, its exit status to `{output_dir}.exit`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlurmCluster {
    pub partition: Option<String>,
    /// `--time`, e.g. `04:00:00`.
    pub time: Option<String>,
    pub nodes: Option<u32>,
    /// `--gpus`, e.g. `8` or `a100:8`.
    pub gpus: Option<String>,
    pub cpus_per_task: Option<u32>,
    /// `--mem`, e.g. `64G`.
    pub mem: Option<String>,
    /// Further `#SBATCH` options as written, e.g. `--account=alignment`.
    pub sbatch: Vec<String>,
    /// Seconds between two looks at the job's state and output. Default 5.
    pub poll_seconds: f64,
}

impl Default for BuiltinTrainer {
    /// What validation fills in when the YAML sets nothing (`aligner train`'s defaults too).
    fn default() -> Self {
        BuiltinTrainer {
            lora: None,
            train_layers: None,
            seed: 42,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            save_every: 50,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoraSpec {
    pub rank: u32,
    pub alpha: f64,
    pub dropout: f64,
    /// Linear layers by Hugging Face name (`q_proj` ... `down_proj`).
    pub targets: Vec<String>,
}

/// `rounds.train.serve`: how a round's checkpoint gets behind the upstream's endpoint before
/// the next round asks it (and before evaluation asks it as version k).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServeSpec {
    pub how: ServeHow,
    /// How long the server may take to list the checkpoint. Default 600.
    pub timeout_secs: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ServeHow {
    /// Start a server for the checkpoint (`{checkpoint}`, `{port}`, `{name}`, `{round}`); it is
    /// ready when `{base_url}/models` lists `{name}`. Round k's listens on `port + k - 1`.
    Command {
        command: String,
        port: u16,
        /// With `{port}`; default `http://127.0.0.1:{port}/v1`.
        base_url: String,
    },
    /// vLLM with `--enable-lora`: `POST /v1/load_lora_adapter` (the checkpoint is an adapter).
    VllmLora { base_url: Option<String> },
    /// SGLang: `POST /update_weights_from_disk` (the checkpoint replaces the served weights).
    SglangReload { base_url: Option<String> },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainStage {
    pub method: TrainMethod,
    pub beta: f64,
    pub loss: DpoLoss,
    pub learning_rate: f64,
    pub epochs: u32,
    pub batch_size: u32,
    pub gradient_accumulation: u32,
    pub max_length: u32,
    pub warmup_ratio: f64,
    pub reference: ReferencePolicy,
    pub backend: TrainBackend,
    pub serve: Option<ServeSpec>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replay: Option<Replay>,
}

impl Default for TrainStage {
    /// What validation fills in when the YAML sets only `backend: {kind: builtin}`.
    fn default() -> Self {
        TrainStage {
            method: TrainMethod::Dpo,
            beta: 0.1,
            loss: DpoLoss::Sigmoid,
            learning_rate: 1e-6,
            epochs: 3,
            batch_size: 8,
            gradient_accumulation: 1,
            max_length: 1024,
            warmup_ratio: 0.03,
            reference: ReferencePolicy::Initial,
            backend: TrainBackend::Builtin(BuiltinTrainer::default()),
            serve: None,
            replay: None,
        }
    }
}

/// `rounds.train.replay`: when a round kept fewer than `min_pairs` pairs, earlier rounds' kept
/// pairs of the listed kinds fill its training set up to `min_pairs`: newest round first, one
/// per prompt, never a prompt the round has a pair of. As the upstream learns, its answers to
/// harmful prompts are refusals already, so correction pairs dry up while benign prompts keep
/// giving pairs; replaying earlier corrections keeps the set's size and mix. The store's
/// `replayed_pairs` lists what each round replayed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Replay {
    pub min_pairs: u32,
    /// Default: `[correction]`.
    pub origins: Vec<PairKind>,
}

/// Where a pair came from (`pairs.origin`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PairKind {
    /// chosen = the Aligner's correction, rejected = the upstream's answer.
    Correction,
    /// A benign prompt: chosen = the answer, rejected = the Aligner's refusal of it.
    AnswerOverAlignerRefusal,
    /// A benign prompt: chosen = the answer, rejected = a refusal text.
    AnswerOverRefusalText,
}

impl PairKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PairKind::Correction => "correction",
            PairKind::AnswerOverAlignerRefusal => "answer_over_aligner_refusal",
            PairKind::AnswerOverRefusalText => "answer_over_refusal_text",
        }
    }
}

/// `rounds.evaluate`: each round's model measured on the held-out prompts.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvaluateStage {
    /// Judge model (a key of `models`); without one only the judge-free checks run.
    pub judge: Option<String>,
    /// The judge prompts to run (default helpfulness and harmlessness).
    pub aspects: Vec<JudgeAspect>,
    /// Which comparisons to judge (default all three).
    pub compare: Vec<Comparison>,
    /// Sampling of the held-out answers (`None`: the generate stage's).
    pub sampling: Option<Sampling>,
    /// Sampling of the judge (default greedy, 512 tokens).
    pub judge_sampling: Sampling,
    /// Which held-out prompts are harmful (refusal rate) and which benign (over-refusal).
    pub labels: Option<LabelRule>,
    /// Bootstrap resamples for omega's confidence interval (default 1000).
    pub bootstrap: u32,
    /// Seed of the bootstrap.
    pub seed: u64,
    pub gate: Option<Gate>,
}

/// A judge prompt: what the judge compares the two answers on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JudgeAspect {
    Helpfulness,
    Harmlessness,
    Empathy,
    Summary,
}

impl JudgeAspect {
    pub const ALL: [JudgeAspect; 4] = [
        JudgeAspect::Helpfulness,
        JudgeAspect::Harmlessness,
        JudgeAspect::Empathy,
        JudgeAspect::Summary,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JudgeAspect::Helpfulness => "helpfulness",
            JudgeAspect::Harmlessness => "harmlessness",
            JudgeAspect::Empathy => "empathy",
            JudgeAspect::Summary => "summary",
        }
    }
}

/// Two sides a judge compares, candidate first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Comparison {
    /// Round k's model plus the Aligner vs round k's model alone (the plug-and-play gain).
    Aligner,
    /// Round k's model vs the initial upstream (the bootstrapping gain).
    Initial,
    /// Round k's model vs round k-1's.
    Previous,
}

impl Comparison {
    pub const ALL: [Comparison; 3] = [
        Comparison::Aligner,
        Comparison::Initial,
        Comparison::Previous,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Comparison::Aligner => "aligner",
            Comparison::Initial => "initial",
            Comparison::Previous => "previous",
        }
    }
}

/// `rounds.evaluate.gate`: stop the loop, or roll back to the best round, when `metric`
/// falls more than `max_drop` below its best value so far (for rates where lower is better,
/// rises more than `max_drop` above its best).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Gate {
    pub metric: String,
    pub max_drop: f64,
    pub action: GateAction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GateAction {
    /// End the run after the round that regressed.
    Stop,
    /// The next round answers with the best round's model; the best stays the run's result.
    Rollback,
}

/// `aligner:`: the Aligner this pipeline trains for itself before round 1 (round 0 in the
/// store): Q-A-C data from a file or from a teacher, identity warm-up then SFT on the
/// corrections, and a check on held-out rows. `rounds.correct.model` names it by `name`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AlignerSpec {
    /// The model key the trained Aligner goes by (default `aligner`); not a key of `models`.
    pub name: String,
    /// The `kind: local` model it starts from.
    pub base: String,
    /// The prompt template it is trained with (recorded in its checkpoint).
    pub template: Template,
    pub data: AlignerData,
    /// Which rows are harmful (the refusal teacher's rule, and how held-out metrics are split).
    pub labels: Option<LabelRule>,
    /// Fraction in [0, 1) of the rows held out of training, to measure the trained Aligner.
    pub holdout: f64,
    /// Seed of the held-out split.
    pub seed: u64,
    pub train: AlignerTrain,
    /// Sampling of the trained Aligner on the held-out rows (default: `rounds.correct.sampling`).
    pub sampling: Sampling,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
// Built once per spec; boxing the larger variant would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum AlignerData {
    /// Question-answer-correction rows (`question`, `answer`, `correction` columns).
    File { path: PathBuf, format: PromptFormat },
    /// Prompts answered by a model and corrected by a teacher.
    Teach(TeachSpec),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TeachSpec {
    /// The prompts (their `holdout` is unused: `aligner.holdout` splits the rows).
    pub prompts: PromptsSpec,
    /// Who writes the answers to correct (default: `rounds.generate.model`).
    pub answer_model: String,
    pub answer_sampling: Sampling,
    pub teacher: Teacher,
}

/// Who writes the corrections.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Teacher {
    /// A model (any backend) given the editor prompt with the question and the answer.
    Model {
        model: String,
        /// The editor prompt, with `{question}` and `{answer}` (default: the built-in
        /// `EDITOR_PROMPT`).
        prompt: String,
        sampling: Sampling,
    },
    /// A fixed rule for offline use: a harmful row's answer becomes a refusal with a
    /// redirection (one of `texts`, picked by a hash of the row's id); a benign row keeps
    /// its answer (an identity example).
    Refusal { texts: Vec<String> },
}

/// A row is harmful when its metadata column `field` holds one of `harmful`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LabelRule {
    pub field: String,
    pub harmful: Vec<String>,
}

impl LabelRule {
    /// The value of `field` in a prompt's metadata (`""` when it has none; a non-string value
    /// as its JSON text).
    pub fn value_of(&self, metadata: Option<&serde_json::Value>) -> String {
        match metadata.and_then(|m| m.get(&self.field)) {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Null) | None => String::new(),
            Some(other) => other.to_string(),
        }
    }

    /// Whether the rule calls a prompt with this metadata harmful.
    pub fn is_harmful(&self, metadata: Option<&serde_json::Value>) -> bool {
        self.harmful.contains(&self.value_of(metadata))
    }
}

/// `aligner.train`: the built-in trainer's SFT settings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AlignerTrain {
    pub epochs: u32,
    pub learning_rate: f64,
    pub batch_size: u32,
    pub gradient_accumulation: u32,
    pub max_length: u32,
    pub warmup_ratio: f64,
    /// Fraction of the training rows used as identity (Q-A-A) warm-up first (default 0.2).
    pub warmup_fraction: f64,
    /// Passes over the warm-up rows (default 1).
    pub warmup_epochs: u32,
    pub options: BuiltinTrainer,
}

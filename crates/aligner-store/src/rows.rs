//! Row types read from and written to the store.

use serde::Serialize;

use crate::domain::{EventKind, GateDecision, Level, Outcome, RunStatus, Stage, StageStatus};

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct RunRow {
    pub id: i64,
    pub name: String,
    pub pipeline_path: String,
    #[serde(skip)]
    pub spec_json: String,
    pub spec_hash: String,
    pub status: RunStatus,
    pub error: Option<String>,
    pub lease_holder: Option<String>,
    pub lease_expires_ms: Option<i64>,
    pub created_at: String,
    pub updated_at: String,
    pub finished_at: Option<String>,
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct RoundRow {
    pub run_id: i64,
    pub round: i64,
    pub status: StageStatus,
    pub upstream_model: String,
    pub upstream_ref: String,
    pub checkpoint_id: Option<i64>,
    pub started_at: String,
    pub finished_at: Option<String>,
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct RoundSummary {
    pub run_id: i64,
    pub round: i64,
    pub status: StageStatus,
    pub upstream_ref: String,
    pub generations_ok: i64,
    pub generations_failed: i64,
    pub corrections_ok: i64,
    pub corrections_failed: i64,
    pub pairs_kept: i64,
    pub pairs_dropped: i64,
    pub copy_rate: Option<f64>,
    pub mean_len_original: Option<f64>,
    pub mean_len_correction: Option<f64>,
    pub drop_reasons: Option<String>,
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct StageRow {
    pub run_id: i64,
    pub round: i64,
    pub stage: Stage,
    pub status: StageStatus,
    pub total: Option<i64>,
    pub done: i64,
    pub failed: i64,
    pub executions: i64,
    pub error: Option<String>,
    pub started_at: String,
    pub finished_at: Option<String>,
}

#[derive(Debug, Clone)]
pub struct NewEvent<'a> {
    pub run_id: Option<i64>,
    pub round: Option<i64>,
    pub stage: Option<Stage>,
    pub level: Level,
    pub kind: EventKind,
    pub message: &'a str,
    pub data: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct EventRow {
    pub id: i64,
    pub run_id: Option<i64>,
    pub round: Option<i64>,
    pub stage: Option<Stage>,
    pub level: Level,
    pub kind: EventKind,
    pub message: String,
    pub data: Option<String>,
    pub ts: String,
}

#[derive(Debug, Clone)]
pub struct NewPrompt {
    pub idx: i64,
    pub source_id: String,
    /// `train` | `holdout`
    pub split: String,
    pub system: Option<String>,
    /// The turns before the prompt, as JSON (`[{"role", "content"}]`); `None`: single-turn.
    pub history: Option<String>,
    pub prompt: String,
    pub prompt_hash: String,
    pub metadata: Option<serde_json::Value>,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PromptRow {
    pub id: i64,
    pub idx: i64,
    pub system: Option<String>,
    pub history: Option<String>,
    pub prompt: String,
    pub prompt_hash: String,
}

/// What a model call ended with: text, or an error after all retries.
#[derive(Debug, Clone, Default)]
pub struct ItemOutcome {
    pub text: Option<String>,
    pub finish_reason: Option<String>,
    pub served_model: Option<String>,
    /// The endpoint that answered, when the model has several.
    pub replica: Option<String>,
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    pub latency_ms: Option<f64>,
    pub attempts: i64,
    pub error: Option<String>,
}

impl ItemOutcome {
    pub fn status(&self) -> Outcome {
        if self.error.is_some() {
            Outcome::Failed
        } else {
            Outcome::Ok
        }
    }
}

#[derive(Debug, Clone)]
pub struct NewGeneration {
    pub run_id: i64,
    pub round: i64,
    pub prompt_id: i64,
    pub sample_idx: i64,
    pub model: String,
    pub backend: String,
    pub checkpoint_id: Option<i64>,
    /// JSON of the sampling parameters sent.
    pub sampling: String,
    pub out: ItemOutcome,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct UncorrectedRow {
    pub generation_id: i64,
    pub prompt_id: i64,
    pub history: Option<String>,
    pub prompt: String,
    pub answer: String,
}

#[derive(Debug, Clone)]
pub struct NewCorrection {
    pub run_id: i64,
    pub round: i64,
    pub generation_id: i64,
    pub model: String,
    pub backend: String,
    pub template_id: String,
    pub template_hash: String,
    pub sampling: String,
    pub out: ItemOutcome,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct UnpairedRow {
    pub generation_id: i64,
    pub prompt_id: i64,
    /// The prompt text (what the semantic filter compares for near-duplicate prompts).
    pub prompt: String,
    /// The prompt's metadata (JSON), for labels rules.
    pub metadata: Option<String>,
    /// Prompt hash and sample index: pairs with the same key are duplicates.
    pub dedupe_key: String,
    pub generation_status: Outcome,
    pub original: Option<String>,
    pub original_finish: Option<String>,
    pub correction_id: Option<i64>,
    pub correction_status: Option<Outcome>,
    pub correction: Option<String>,
    pub correction_finish: Option<String>,
}

#[derive(Debug, Clone)]
pub struct NewPair {
    pub run_id: i64,
    pub round: i64,
    pub prompt_id: i64,
    pub generation_id: i64,
    pub correction_id: Option<i64>,
    pub chosen: Option<String>,
    pub rejected: Option<String>,
    /// `None` = kept; `Some(reason)` = dropped.
    pub reason: Option<String>,
    pub edit_distance: Option<f64>,
    pub length_ratio: Option<f64>,
    pub origin: PairOrigin,
}

/// `pairs.origin`: where a pair's chosen and rejected texts come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairOrigin {
    /// Chosen = the Aligner's correction, rejected = the upstream's answer.
    Correction,
    /// A benign prompt (`benign_preference`): chosen = the answer, rejected = the Aligner's
    /// refusal of it.
    AnswerOverAlignerRefusal,
    /// A benign prompt (`benign_preference`): chosen = the answer, rejected = a refusal text.
    AnswerOverRefusalText,
}

impl PairOrigin {
    pub const ALL: [PairOrigin; 3] = [
        PairOrigin::Correction,
        PairOrigin::AnswerOverAlignerRefusal,
        PairOrigin::AnswerOverRefusalText,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PairOrigin::Correction => "correction",
            PairOrigin::AnswerOverAlignerRefusal => "answer_over_aligner_refusal",
            PairOrigin::AnswerOverRefusalText => "answer_over_refusal_text",
        }
    }
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct ExportPair {
    pub pair_id: i64,
    pub system: Option<String>,
    pub history: Option<String>,
    pub prompt: String,
    pub chosen: Option<String>,
    pub rejected: Option<String>,
}

#[derive(Debug, Clone)]
pub struct NewTrainingJob<'a> {
    pub run_id: i64,
    pub round: i64,
    pub method: &'a str,
    pub backend: &'a str,
    pub hyperparameters: serde_json::Value,
    pub reference_policy: &'a str,
    pub reference_model: &'a str,
    pub base_model: &'a str,
    pub data_path: &'a str,
    pub pairs: i64,
    pub output_dir: &'a str,
    pub command: Option<&'a str>,
    /// The model key it trains (the generate model; round 0: the Aligner's name).
    pub model: &'a str,
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct TrainingJobRow {
    pub id: i64,
    pub run_id: i64,
    pub round: i64,
    pub status: StageStatus,
    pub attempts: i64,
    pub exit_code: Option<i64>,
    pub output_dir: String,
    pub error: Option<String>,
    /// JSON: who the running `command` trainer is and where its output goes.
    pub process: Option<String>,
    pub stdout_offset: i64,
    pub stderr_offset: i64,
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct CheckpointRow {
    pub id: i64,
    pub run_id: i64,
    pub round: i64,
    pub path: String,
    pub serve_model: Option<String>,
    /// The server `serve: {kind: command}` started for it (JSON), while it runs.
    pub server: Option<String>,
}

/// A row of the Aligner's data as ingested (`aligner_examples`).
#[derive(Debug, Clone, PartialEq)]
pub struct NewAlignerExample {
    pub idx: i64,
    pub source_id: String,
    /// `train` | `holdout`
    pub split: String,
    /// `harmful` | `benign` | none
    pub label: Option<String>,
    /// The turns before the question, as JSON (`[{"role", "content"}]`); `None`: one turn.
    pub history: Option<String>,
    pub question: String,
    pub metadata: Option<serde_json::Value>,
    /// Set for rows read from a question-answer-correction file.
    pub answer: Option<String>,
    pub correction: Option<String>,
    pub teacher: Option<String>,
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct AlignerExampleRow {
    pub id: i64,
    pub idx: i64,
    pub source_id: String,
    pub split: String,
    pub label: Option<String>,
    pub history: Option<String>,
    pub question: String,
    pub answer: Option<String>,
    pub answer_finish: Option<String>,
    pub correction: Option<String>,
    pub output: Option<String>,
}

/// What an answer, teacher or Aligner call left for one row.
#[derive(Debug, Clone, PartialEq)]
pub enum AlignerUpdate {
    Answer {
        id: i64,
        text: String,
        finish: String,
        model: String,
        usage: CallUsage,
    },
    Correction {
        id: i64,
        text: String,
        teacher: String,
        answer_refusal: bool,
        correction_refusal: bool,
        /// `None`: no model call (the refusal teacher, or corrections from the data).
        usage: Option<CallUsage>,
    },
    Output {
        id: i64,
        text: String,
        finish: String,
        refusal: bool,
        answer_refusal: bool,
        edit_distance: f64,
        model: String,
        usage: CallUsage,
    },
    /// A failed call: the row keeps what it had, with the error.
    Failed { id: i64, error: String },
}

/// One round of the `costs` view, summed over stages and models.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct RoundCost {
    pub round: i64,
    pub calls: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cost: f64,
}

/// What one model call used: tokens as the backend reported them, and its latency.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CallUsage {
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    pub latency_ms: Option<f64>,
}

/// One line of `aligner_eval`.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct AlignerEvalRow {
    pub label: String,
    pub rows: i64,
    pub refusal_rate_answer: Option<f64>,
    pub refusal_rate_teacher: Option<f64>,
    pub refusal_rate_aligner: Option<f64>,
    pub copy_rate: Option<f64>,
    pub mean_edit_distance: Option<f64>,
}

/// A held-out prompt, with its metadata (JSON text) for the evaluation's labels.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct HoldoutPromptRow {
    pub id: i64,
    pub idx: i64,
    /// The prompt file's id for it.
    pub source_id: String,
    pub system: Option<String>,
    pub history: Option<String>,
    pub prompt: String,
    pub metadata: Option<String>,
}

/// A held-out answer (or the Aligner's correction of one) to write.
#[derive(Debug, Clone)]
pub struct NewEvalAnswer {
    pub run_id: i64,
    pub version: i64,
    pub prompt_id: i64,
    /// `answer` | `corrected`
    pub kind: &'static str,
    pub model: String,
    pub model_ref: String,
    pub refusal: Option<bool>,
    pub degenerate: Option<String>,
    pub out: ItemOutcome,
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct EvalAnswerRow {
    pub id: i64,
    pub version: i64,
    pub prompt_id: i64,
    pub kind: String,
    pub status: Outcome,
    pub text: Option<String>,
    pub finish_reason: Option<String>,
    pub completion_tokens: Option<i64>,
    pub refusal: Option<i64>,
    pub degenerate: Option<String>,
}

/// One judge call's result to write.
#[derive(Debug, Clone)]
pub struct NewEvalJudgement {
    pub run_id: i64,
    pub round: i64,
    pub comparison: &'static str,
    pub aspect: &'static str,
    pub prompt_id: i64,
    /// `forward` | `swapped`
    pub order: &'static str,
    pub candidate_id: i64,
    pub baseline_id: i64,
    /// `A` | `B` | `Equal`; `None` when the output had no verdict (or the call failed).
    pub verdict: Option<&'static str>,
    pub judge: String,
    pub out: ItemOutcome,
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct EvalJudgementRow {
    pub comparison: String,
    pub aspect: String,
    pub prompt_id: i64,
    pub order: String,
    pub status: Outcome,
    pub verdict: Option<String>,
}

/// A metric of a round's evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct EvalMetricRow {
    pub round: i64,
    pub name: String,
    pub value: Option<f64>,
    pub ci_low: Option<f64>,
    pub ci_high: Option<f64>,
    pub n: i64,
    pub detail: Option<String>,
}

/// What the gate decided after a round.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct GateDecisionRow {
    pub round: i64,
    pub metric: String,
    pub value: Option<f64>,
    pub best_round: Option<i64>,
    pub best_value: Option<f64>,
    pub decision: GateDecision,
    pub reason: String,
}

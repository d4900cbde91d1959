//! Round 0: the pipeline's own Aligner (`aligner:` in the spec).
//!
//! * `teach` stores the question-answer-correction rows: read from the `data` file, or made
//!   from prompts that a model answers and a teacher corrects (a model given the editor prompt,
//!   or the offline refusal rule). Every finished call is committed, so a resumed stage only
//!   makes the calls that are missing.
//! * `train_aligner` trains the Aligner with the built-in trainer (identity warm-up, then SFT
//!   on the corrections) and registers its checkpoint as round 0's.
//! * `evaluate_aligner` runs the trained Aligner on the held-out rows and records, per row,
//!   its output, whether the refusal detector flags the answer and the output, and how far the
//!   output is from the answer (`aligner_eval` sums this up).

use std::path::PathBuf;

use aligner_backend::{CompletionRequest, Message, Prompt};
use aligner_spec::{AlignerData, AlignerSpec, LabelRule, PromptFormat, Sampling, Teacher};
use aligner_store::{
    AlignerExampleRow, AlignerUpdate, EventKind, NewAlignerExample, NewTrainingJob, StageEnd,
};

use crate::executor::{self, CallResult, ItemStage, Progress};
use crate::filters::normalized_edit_distance;
use crate::refusal::{is_refusal, refusal_for};
use crate::stages::{to_sampling, Ctx};
use crate::{Error, Result, Stage};

fn spec<'a>(ctx: &'a Ctx<'_>) -> &'a AlignerSpec {
    ctx.engine
        .spec
        .aligner
        .as_ref()
        .expect("planned only with an `aligner` block")
}

fn stage_err(stage: Stage, message: String) -> Error {
    Error::Stage {
        round: 0,
        stage: stage.as_str(),
        message,
    }
}

/// `{workdir}/{name}-{run}/aligner`: the Aligner's checkpoint and training state.
fn aligner_dir(ctx: &Ctx<'_>) -> PathBuf {
    let e = ctx.engine;
    e.spec
        .workdir
        .join(format!("{}-{}", e.spec.name, ctx.run_id))
        .join("aligner")
}

/// `harmful` or `benign` by the rule, from a row's metadata.
fn label_of(rule: &LabelRule, metadata: Option<&serde_json::Value>) -> String {
    if rule.is_harmful(metadata) {
        "harmful".into()
    } else {
        "benign".into()
    }
}

fn format_of(f: PromptFormat) -> aligner_dataset::Format {
    match f {
        PromptFormat::Jsonl => aligner_dataset::Format::Jsonl,
        PromptFormat::Csv => aligner_dataset::Format::Csv,
        PromptFormat::Parquet => aligner_dataset::Format::Parquet,
    }
}

/// The rows of the Aligner's data, split into training and held-out rows.
fn read_rows(a: &AlignerSpec) -> Result<Vec<NewAlignerExample>> {
    // (example index, source row, split) of each row kept.
    let split = |n: usize, sample: Option<u64>, seed: u64| -> Vec<(i64, usize, &'static str)> {
        let (keep, holdout) = crate::ingest::sample_and_split(n, sample, a.holdout, seed);
        keep.iter()
            .zip(&holdout)
            .enumerate()
            .map(|(i, (&row, &held))| (i as i64, row, if held { "holdout" } else { "train" }))
            .collect()
    };
    Ok(match &a.data {
        AlignerData::File { path, format } => {
            let (records, _) = aligner_dataset::read_qac(path, format_of(*format))?;
            split(records.len(), None, a.seed)
                .into_iter()
                .map(|(idx, row, split)| {
                    let r = &records[row];
                    NewAlignerExample {
                        idx,
                        source_id: row.to_string(),
                        split: split.into(),
                        label: None,
                        history: None,
                        question: r.question.clone(),
                        metadata: None,
                        answer: Some(r.answer.clone()),
                        correction: Some(r.correction.clone()),
                        teacher: Some("data".into()),
                    }
                })
                .collect()
        }
        AlignerData::Teach(t) => {
            let p = &t.prompts;
            let mapping = aligner_dataset::Mapping {
                prompt: p.prompt_field.clone(),
                id: p.id_field.clone(),
                system: p.system_field.clone(),
                messages: p.messages_field.clone(),
                metadata: p.metadata_fields.clone(),
            };
            let (records, _) =
                aligner_dataset::read_prompts(&p.source, format_of(p.format), &mapping)?;
            split(records.len(), p.sample, a.seed.wrapping_add(p.seed))
                .into_iter()
                .map(|(idx, row, split)| {
                    let r = &records[row];
                    NewAlignerExample {
                        idx,
                        source_id: r.source_id.clone(),
                        split: split.into(),
                        label: a.labels.as_ref().map(|l| label_of(l, r.metadata.as_ref())),
                        history: crate::history_json(&r.history),
                        question: r.prompt.clone(),
                        metadata: r.metadata.clone(),
                        answer: None,
                        correction: None,
                        teacher: None,
                    }
                })
                .collect()
        }
    })
}

/// An answer cut off by the token limit, trimmed back to the end of its last full sentence
/// (when that keeps most of it): the Aligner learns to copy an answer up to its end and stop,
/// which a mid-sentence cut would turn into "stop anywhere".
pub(crate) fn trim_truncated(text: &str) -> String {
    let t = text.trim_end();
    if t.ends_with(['.', '!', '?', '"', ')']) {
        return t.to_string();
    }
    let end = t
        .char_indices()
        .filter(|&(i, c)| {
            matches!(c, '.' | '!' | '?')
                && t[i + c.len_utf8()..]
                    .chars()
                    .next()
                    .is_some_and(char::is_whitespace)
        })
        .map(|(i, c)| i + c.len_utf8())
        .next_back();
    match end {
        Some(end) if end * 2 >= t.len() => t[..end].to_string(),
        _ => t.to_string(),
    }
}

/// What the stored row gets from a correction: the text, and the refusal detector's verdict on
/// it and on the answer it corrects.
fn correction_update(
    r: &AlignerExampleRow,
    text: String,
    teacher: &str,
    usage: Option<aligner_store::CallUsage>,
) -> AlignerUpdate {
    AlignerUpdate::Correction {
        usage,
        id: r.id,
        answer_refusal: is_refusal(r.answer.as_deref().unwrap_or_default()),
        correction_refusal: is_refusal(&text),
        text,
        teacher: teacher.to_string(),
    }
}

/// Runs `stage`'s model call (through `model`) for every row of `rows` with the item-stage
/// [`executor`], each result committed as a row update (and, with `progress`, counted into
/// that round-0 stage's progress). Returns the first error.
async fn call_rows<S>(
    ctx: &Ctx<'_>,
    model: &str,
    stage: &S,
    rows: Vec<AlignerExampleRow>,
    progress: Option<Progress>,
) -> Result<Option<String>>
where
    S: ItemStage<Unit = AlignerExampleRow, Row = AlignerUpdate>,
{
    let e = ctx.engine;
    if rows.is_empty() {
        return Ok(None);
    }
    let model = e.model(e.backend_for(ctx.run_id, model).await?, model);
    let tally = executor::execute(ctx, stage, rows, model, progress).await?;
    Ok(tally.first_error)
}

/// Teach's chat calls to a model, each on one stored row: the answer model answering the
/// row's question (an answer cut off by the token limit is trimmed back to its last full
/// sentence), or a teacher model given the editor prompt filled with the question and answer.
struct ChatCalls<'a> {
    model: &'a str,
    sampling: &'a Sampling,
    /// `None`: answer the question; `Some(editor prompt)`: correct the answer.
    teacher_prompt: Option<&'a str>,
}

impl ItemStage for ChatCalls<'_> {
    type Unit = AlignerExampleRow;
    type Row = AlignerUpdate;

    fn request(&self, r: &AlignerExampleRow) -> CompletionRequest {
        let messages = match self.teacher_prompt {
            // The question with the conversation before it, as the upstream is asked.
            None => crate::chat_messages(None, r.history.as_deref(), &r.question),
            Some(prompt) => {
                // The teacher reads the earlier turns before the question (`history-v1`).
                let turns = crate::history_turns(r.history.as_deref());
                let refs: Vec<(&str, &str)> = turns
                    .iter()
                    .map(|(a, b)| (a.as_str(), b.as_str()))
                    .collect();
                let question = match refs.is_empty() {
                    true => r.question.clone(),
                    false => format!(
                        "{}User: {}",
                        aligner_spec::render_history(&refs),
                        r.question
                    ),
                };
                let text =
                    aligner_spec::fill(prompt, &question, r.answer.as_deref().unwrap_or_default());
                vec![Message::new("user", text)]
            }
        };
        CompletionRequest {
            prompt: Prompt::Chat(messages),
            sampling: to_sampling(self.sampling, r.idx as u64),
            model: None,
        }
    }

    fn record(&self, r: AlignerExampleRow, result: &CallResult) -> AlignerUpdate {
        match (result, self.teacher_prompt) {
            (Ok(c), None) => AlignerUpdate::Answer {
                id: r.id,
                text: match c.finish_reason {
                    aligner_backend::FinishReason::Length => trim_truncated(&c.text),
                    _ => c.text.trim().to_string(),
                },
                finish: c.finish_reason.as_str().to_string(),
                model: self.model.to_string(),
                usage: executor::usage(c),
            },
            (Ok(c), Some(_)) => correction_update(
                &r,
                c.text.trim().to_string(),
                self.model,
                Some(executor::usage(c)),
            ),
            (Err(err), None) => failed_call(r.id, "answer", err),
            (Err(err), Some(_)) => failed_call(r.id, "teacher", err),
        }
    }
}

/// The row a failed call leaves: which call (`answer`, `teacher`, `aligner`) and its error.
fn failed_call(id: i64, call: &str, err: &aligner_backend::Error) -> AlignerUpdate {
    AlignerUpdate::Failed {
        id,
        error: format!("{call}: {err}"),
    }
}

/// `evaluate_aligner`'s calls: the trained Aligner corrects a held-out row's answer; its
/// output is scored by the refusal detector and its edit distance from the answer.
struct AlignerOutputs<'a> {
    aligner: &'a AlignerSpec,
}

impl ItemStage for AlignerOutputs<'_> {
    type Unit = AlignerExampleRow;
    type Row = AlignerUpdate;

    fn request(&self, r: &AlignerExampleRow) -> CompletionRequest {
        let a = self.aligner;
        CompletionRequest {
            prompt: Prompt::Raw(crate::render_correction(
                &a.template,
                r.history.as_deref(),
                &r.question,
                r.answer.as_deref().unwrap_or_default(),
            )),
            sampling: to_sampling(&a.sampling, 0),
            model: None,
        }
    }

    fn record(&self, r: AlignerExampleRow, result: &CallResult) -> AlignerUpdate {
        match result {
            Ok(c) => {
                let answer = r.answer.clone().unwrap_or_default();
                let text = c.text.trim().to_string();
                AlignerUpdate::Output {
                    id: r.id,
                    refusal: is_refusal(&text),
                    answer_refusal: is_refusal(&answer),
                    edit_distance: normalized_edit_distance(answer.trim(), &text),
                    text,
                    finish: c.finish_reason.as_str().to_string(),
                    model: self.aligner.name.clone(),
                    usage: executor::usage(c),
                }
            }
            Err(err) => failed_call(r.id, "aligner", err),
        }
    }
}

pub(crate) async fn teach(ctx: &Ctx<'_>) -> Result<()> {
    let e = ctx.engine;
    let a = spec(ctx);
    let run_id = ctx.run_id;
    if e.store.aligner_examples(run_id).await?.is_empty() {
        let rows = read_rows(a)?;
        if rows.is_empty() {
            return Err(stage_err(
                Stage::Teach,
                "the Aligner's data has no rows\nhint: check `aligner.data` or `aligner.teach.prompts`".into(),
            ));
        }
        // The Aligner must not learn from the rounds' held-out prompts: the evaluation of
        // "version k + Aligner" would measure what it was taught.
        let held = e.store.holdout_prompts(run_id).await?;
        let teaching = rows
            .iter()
            .filter(|r| r.split == "train")
            .map(|r| (r.source_id.as_str(), r.question.as_str(), false));
        let held = held
            .iter()
            .map(|h| (h.source_id.as_str(), h.prompt.as_str(), true));
        crate::ingest::check_no_leak(
            teaching.clone().chain(held.clone()),
            "the Aligner's teaching prompt",
        )
        .map_err(|err| stage_err(Stage::Teach, err.to_string()))?;
        let teaching: Vec<(&str, &str)> = teaching.map(|(id, t, _)| (id, t)).collect();
        let held: Vec<(&str, &str)> = held.map(|(id, t, _)| (id, t)).collect();
        crate::ingest::check_no_near_leak(e, &teaching, &held, "the Aligner's teaching prompt")
            .await
            .map_err(|err| stage_err(Stage::Teach, err.to_string()))?;
        e.store.insert_aligner_examples(run_id, &rows).await?;
    }
    let rows = e.store.aligner_examples(run_id).await?;
    let total = rows.len() as i64;
    let have = rows.iter().filter(|r| r.correction.is_some()).count() as i64;
    e.store
        .start_stage(run_id, 0, Stage::Teach, Some(total))
        .await?;
    e.observer
        .stage_started(0, Stage::Teach, total as u64, have as u64);
    let mut first_error = None;
    if let AlignerData::Teach(t) = &a.data {
        // Answers first.
        let todo: Vec<AlignerExampleRow> = rows
            .iter()
            .filter(|r| r.answer.is_none())
            .cloned()
            .collect();
        let answers = ChatCalls {
            model: &t.answer_model,
            sampling: &t.answer_sampling,
            teacher_prompt: None,
        };
        let err = call_rows(ctx, &t.answer_model, &answers, todo, None).await?;
        first_error = first_error.or(err);
        // Then the teacher.
        let rows = e.store.aligner_examples(run_id).await?;
        let todo: Vec<AlignerExampleRow> = rows
            .into_iter()
            .filter(|r| r.answer.is_some() && r.correction.is_none())
            .collect();
        match &t.teacher {
            Teacher::Refusal { texts } => {
                let updates: Vec<AlignerUpdate> = todo
                    .iter()
                    .map(|r| {
                        let text = if r.label.as_deref() == Some("harmful") {
                            refusal_for(texts, &r.source_id)
                        } else {
                            r.answer.clone().unwrap_or_default()
                        };
                        correction_update(r, text, "refusal", None)
                    })
                    .collect();
                e.store.update_aligner_examples(&updates).await?;
            }
            Teacher::Model {
                model,
                prompt,
                sampling,
            } => {
                let teacher = ChatCalls {
                    model,
                    sampling,
                    teacher_prompt: Some(prompt),
                };
                let err = call_rows(ctx, model, &teacher, todo, None).await?;
                first_error = first_error.or(err);
            }
        }
    }
    let rows = e.store.aligner_examples(run_id).await?;
    let ok = rows.iter().filter(|r| r.correction.is_some()).count() as i64;
    let failed = rows.len() as i64 - ok;
    let message = format!(
        "the Aligner's data: {} rows ({} train, {} held out), {ok} with a correction",
        rows.len(),
        rows.iter().filter(|r| r.split == "train").count(),
        rows.iter().filter(|r| r.split == "holdout").count(),
    );
    e.observer.note(&message);
    ctx.finish(Stage::Teach, ok, failed, first_error).await
}

pub(crate) async fn train_aligner(ctx: &Ctx<'_>) -> Result<()> {
    let e = ctx.engine;
    let a = spec(ctx);
    let run_id = ctx.run_id;
    let stage = Stage::TrainAligner;
    let err = |m: String| stage_err(stage, m);
    let aligner_spec::ModelSpec::Local(base) = &e.spec.models[&a.base] else {
        return Err(err(format!(
            "the built-in trainer trains local models; `{}` is not `kind: local`",
            a.base
        )));
    };
    let dir = aligner_dir(ctx);
    let out = dir.join("checkpoint");
    // A checkpoint registered before a crash that came before the stage was marked done.
    if e.store.checkpoint(run_id, 0).await?.is_some() && out.is_dir() {
        e.store
            .finish_stage(run_id, 0, stage, StageEnd::done(1, 0))
            .await?;
        return Ok(());
    }
    let rows = e.store.aligner_examples(run_id).await?;
    let examples: Vec<crate::AlignerExample> = rows
        .iter()
        .filter(|r| r.split == "train")
        .filter_map(|r| {
            Some(crate::AlignerExample {
                history: crate::history_turns(r.history.as_deref()),
                question: r.question.clone(),
                answer: r.answer.clone().filter(|s| !s.trim().is_empty())?,
                correction: r.correction.clone().filter(|s| !s.trim().is_empty())?,
            })
        })
        .collect();
    e.store.start_stage(run_id, 0, stage, Some(1)).await?;
    e.observer.stage_started(0, stage, 1, 0);
    if examples.is_empty() {
        let message = "no training row has an answer and a correction\nhint: look at `SELECT error FROM aligner_examples` for the failed calls".to_string();
        e.store
            .finish_stage(run_id, 0, stage, StageEnd::failed(0, 1, &message))
            .await?;
        return Err(err(message));
    }
    let (attempt_dir, state_dir) = crate::train::attempt_dirs(ctx, &dir).await?;
    let trainer = e
        .factory
        .trainer()
        .map_err(|source| Error::component(0, stage.as_str(), source))?;
    let base_desc = crate::train::describe_local(base);
    let job = e
        .store
        .start_training_job(&NewTrainingJob {
            run_id,
            round: 0,
            method: "aligner_sft",
            backend: "builtin",
            hyperparameters: serde_json::json!({
                "train": a.train,
                "template": a.template.id(),
            }),
            reference_policy: "none",
            reference_model: "",
            base_model: &base_desc,
            data_path: "aligner_examples",
            pairs: examples.len() as i64,
            output_dir: &out.display().to_string(),
            command: None,
            model: &a.name,
        })
        .await?;
    let message = format!(
        "training the Aligner `{}` from `{base_desc}` on {} rows (template `{}`)",
        a.name,
        examples.len(),
        a.template.id()
    );
    e.announce((run_id, 0, stage), EventKind::TrainStarted, &message, None)
        .await;
    let request = crate::AlignerTrainRequest {
        spec: a.train.clone(),
        template: a.template.clone(),
        base: base.clone(),
        examples,
        out_dir: attempt_dir.clone(),
        state_dir,
        interrupt: e.interrupt.clone(),
    };
    crate::train::run_in_thread(ctx, stage, &job, move |events| {
        trainer.train_aligner(&request, events)
    })
    .await?;
    crate::train::move_into_place(&attempt_dir, &out).map_err(err)?;
    let ckpt = e
        .store
        .register_checkpoint(run_id, 0, job.id, 0, &out.display().to_string(), None)
        .await?;
    e.store
        .finish_stage(run_id, 0, stage, StageEnd::done(1, 0))
        .await?;
    e.observer.stage_finished(0, stage, 1, 0);
    let message = format!(
        "the Aligner `{}`: checkpoint {ckpt} at `{}`",
        a.name,
        out.display()
    );
    e.announce(
        (run_id, 0, stage),
        EventKind::CheckpointRegistered,
        &message,
        None,
    )
    .await;
    Ok(())
}

pub(crate) async fn evaluate_aligner(ctx: &Ctx<'_>) -> Result<()> {
    let e = ctx.engine;
    let a = spec(ctx);
    let run_id = ctx.run_id;
    let stage = Stage::EvaluateAligner;
    let rows = e.store.aligner_examples(run_id).await?;
    let held: Vec<&AlignerExampleRow> = rows
        .iter()
        .filter(|r| r.split == "holdout" && r.answer.is_some())
        .collect();
    let total = held.len() as i64;
    let done = held.iter().filter(|r| r.output.is_some()).count() as i64;
    e.store.start_stage(run_id, 0, stage, Some(total)).await?;
    e.observer
        .stage_started(0, stage, total as u64, done as u64);
    let todo: Vec<AlignerExampleRow> = held
        .iter()
        .filter(|r| r.output.is_none())
        .map(|r| (*r).clone())
        .collect();
    let outputs = AlignerOutputs { aligner: a };
    let progress = Progress {
        stage,
        ok: done,
        failed: 0,
    };
    let first_error = call_rows(ctx, &a.name, &outputs, todo, Some(progress)).await?;
    let rows = e.store.aligner_examples(run_id).await?;
    let ok = rows
        .iter()
        .filter(|r| r.split == "holdout" && r.output.is_some())
        .count() as i64;
    let failed = total - ok;
    for line in e.store.aligner_eval(run_id).await? {
        let pct = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{:.0}%", v * 100.0));
        let message = format!(
            "held-out {} rows ({}): refusals {} in the answers -> {} after the Aligner (teacher {}); unchanged {}, mean edit distance {}",
            line.label,
            line.rows,
            pct(line.refusal_rate_answer),
            pct(line.refusal_rate_aligner),
            pct(line.refusal_rate_teacher),
            pct(line.copy_rate),
            line.mean_edit_distance.map_or("-".into(), |v| format!("{v:.2}")),
        );
        e.announce(
            (run_id, 0, stage),
            EventKind::AlignerEvaluated,
            &message,
            serde_json::to_value(&line).ok(),
        )
        .await;
    }
    ctx.finish(stage, ok, failed, first_error).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncated_answers_end_at_their_last_full_sentence() {
        assert_eq!(
            trim_truncated("First sentence here. Second one is long enough. And a cut-off thi"),
            "First sentence here. Second one is long enough."
        );
        // Nothing to cut back to, or cutting would lose most of it: kept as it is.
        assert_eq!(
            trim_truncated("no sentence end at all"),
            "no sentence end at all"
        );
        assert_eq!(
            trim_truncated(
                "Short. Then a very long tail without any end that goes on and on and on"
            ),
            "Short. Then a very long tail without any end that goes on and on and on"
        );
        assert_eq!(trim_truncated("Complete. "), "Complete.");
        // Decimal points are not sentence ends.
        assert_eq!(
            trim_truncated("Pi is 3.14 and e is 2.71 which are both numbers. The next"),
            "Pi is 3.14 and e is 2.71 which are both numbers."
        );
    }

    #[test]
    fn labels_follow_the_rule() {
        let rule = LabelRule {
            field: "source".into(),
            harmful: vec!["strongreject".into(), "harmbench".into()],
        };
        let m = |v: &str| serde_json::json!({ "source": v });
        assert_eq!(label_of(&rule, Some(&m("harmbench"))), "harmful");
        assert_eq!(label_of(&rule, Some(&m("mtbench"))), "benign");
        assert_eq!(label_of(&rule, None), "benign");
    }

    #[test]
    fn the_refusal_text_depends_on_the_row_only() {
        let texts: Vec<String> = aligner_spec::REFUSAL_TEXTS
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(refusal_for(&texts, "a-1"), refusal_for(&texts, "a-1"));
        let distinct: std::collections::HashSet<String> = (0..40)
            .map(|i| refusal_for(&texts, &format!("row-{i}")))
            .collect();
        assert_eq!(distinct.len(), texts.len());
    }
}

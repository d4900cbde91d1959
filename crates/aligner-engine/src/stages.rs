//! The item stages of a round: generate, correct (model calls through the [`executor`], bounded
//! concurrency, results committed in small batches as they complete) and synthesize (pair
//! verdicts, pure CPU, plus sentence embeddings when the semantic filter is on).
//!
//! [`executor`]: crate::executor

use std::collections::HashSet;

use sha2::{Digest, Sha256};

use aligner_backend::{CompletionRequest, Prompt, Sampling};
use aligner_spec::{CorrectStage, GenerateStage, ModelSpec};
use aligner_store::{
    EventKind, Level, NewCorrection, NewGeneration, NewPair, Outcome, PairOrigin, StageEnd, Store,
    UncorrectedRow,
};

use crate::executor::{self, outcome, CallResult, ItemStage, Pending, Progress};
use crate::filters::{self, Candidate, FilterState};
use crate::semantic::{Measured, Scorer};
use crate::{Engine, Error, Result, Stage};

/// Units read from the store per page.
const PAGE: i64 = 512;

/// What every stage runs with: the engine, the run, the round and the commit batch size.
pub(crate) struct Ctx<'a> {
    pub engine: &'a Engine,
    pub run_id: i64,
    pub round: u32,
    pub batch: usize,
}

impl Ctx<'_> {
    pub(crate) fn round(&self) -> i64 {
        self.round as i64
    }

    pub(crate) async fn finish(
        &self,
        stage: Stage,
        ok: i64,
        failed: i64,
        first_error: Option<String>,
    ) -> Result<()> {
        let e = self.engine;
        if e.interrupted() {
            return Err(e.interrupted_error(self.run_id));
        }
        // A stage where every item failed is a broken backend, not bad luck: stop the run so the
        // user can fix it; a resume retries the failed items.
        let error = (ok == 0 && failed > 0).then(|| {
            format!(
                "all {failed} item(s) failed; first error: {}",
                first_error.clone().unwrap_or_default()
            )
        });
        let end = match &error {
            Some(error) => StageEnd::failed(ok, failed, error),
            None => StageEnd::done(ok, failed),
        };
        e.store
            .finish_stage(self.run_id, self.round(), stage, end)
            .await?;
        e.observer
            .stage_finished(self.round, stage, ok as u64, failed as u64);
        let message = format!(
            "round {} {}: {ok} ok, {failed} failed",
            self.round,
            stage.as_str()
        );
        let level = if failed > 0 { Level::Warn } else { Level::Info };
        e.event(
            self.run_id,
            Some(self.round),
            Some(stage),
            level,
            EventKind::StageFinished,
            &message,
            Some(serde_json::json!({"ok": ok, "failed": failed, "first_error": first_error})),
        )
        .await;
        match error {
            Some(message) => Err(Error::Stage {
                round: self.round,
                stage: stage.as_str(),
                message,
            }),
            None => Ok(()),
        }
    }
}

pub(crate) fn to_sampling(s: &Sampling, seed_offset: u64) -> Sampling {
    Sampling {
        seed: s.seed.map(|seed| seed.wrapping_add(seed_offset)),
        ..s.clone()
    }
}

/// Who answers in this round: the configured upstream, or the previous round's checkpoint.
struct Upstream {
    /// Model name sent instead of the configured one (a served checkpoint).
    model_override: Option<String>,
    /// The model asked instead of the configured one: a local upstream's checkpoint, or a
    /// served checkpoint's own server.
    instead: Option<ModelSpec>,
    upstream_ref: String,
    checkpoint_id: Option<i64>,
}

async fn upstream(ctx: &Ctx<'_>) -> Result<Upstream> {
    let e = ctx.engine;
    let key = &e.spec.rounds.generate.model;
    let configured = match &e.spec.models[key] {
        ModelSpec::Openai(m) => m.model.clone(),
        ModelSpec::Local(m) => match &m.source {
            aligner_spec::LocalSource::Gguf { path, .. }
            | aligner_spec::LocalSource::HfFolder { path, .. } => path.display().to_string(),
            aligner_spec::LocalSource::HubId { id, revision } => match revision {
                Some(r) => format!("{id}@{r}"),
                None => id.clone(),
            },
        },
    };
    if ctx.round == 1 || e.spec.rounds.train.is_none() {
        return Ok(Upstream {
            model_override: None,
            upstream_ref: configured,
            checkpoint_id: None,
            instead: None,
        });
    }
    let ckpt = e
        .store
        .checkpoint(ctx.run_id, e.start_round(ctx.run_id, ctx.round()).await?)
        .await?
        .ok_or_else(|| Error::Stage {
            round: ctx.round,
            stage: "generate",
            message: format!("round {} left no checkpoint to answer with", ctx.round - 1),
        })?;
    // A local upstream answers with the checkpoint folder itself; a served one from where
    // `rounds.train.serve` put it (served first when it is not).
    let instead = match (
        &e.spec.models[&e.spec.rounds.generate.model],
        &ckpt.serve_model,
    ) {
        (ModelSpec::Local(_), None) => {
            Some(ModelSpec::Local(crate::train::checkpoint_model(&ckpt.path)))
        }
        _ => crate::serving::served_model(e, (ctx.round, "generate"), &ckpt).await?,
    };
    Ok(Upstream {
        model_override: ckpt.serve_model.clone(),
        upstream_ref: ckpt.serve_model.clone().unwrap_or(ckpt.path.clone()),
        checkpoint_id: Some(ckpt.id),
        instead,
    })
}

/// Generate's pending units: `n` samples of every training prompt, a page of prompts at a time,
/// less the samples already recorded.
struct Unanswered {
    store: Store,
    run_id: i64,
    round: i64,
    n: i64,
    /// The last prompt index read (keyset pagination).
    after: i64,
}

/// One sample to draw for one training prompt.
struct Sample {
    prompt_id: i64,
    sample_idx: i64,
    system: Option<String>,
    history: Option<String>,
    prompt: String,
}

impl Pending for Unanswered {
    type Unit = Sample;

    async fn next_page(&mut self) -> Result<Option<Vec<Sample>>> {
        let (run_id, round) = (self.run_id, self.round);
        let page = self
            .store
            .train_prompts_page(run_id, self.after, PAGE)
            .await?;
        let (Some(first), Some(last)) = (page.first(), page.last()) else {
            return Ok(None);
        };
        self.after = last.idx;
        let have: HashSet<(i64, i64)> = self
            .store
            .generation_keys(run_id, round, first.id, last.id)
            .await?
            .into_iter()
            .collect();
        let mut units = Vec::new();
        for p in &page {
            for k in 0..self.n {
                if !have.contains(&(p.id, k)) {
                    units.push(Sample {
                        prompt_id: p.id,
                        sample_idx: k,
                        system: p.system.clone(),
                        history: p.history.clone(),
                        prompt: p.prompt.clone(),
                    });
                }
            }
        }
        Ok(Some(units))
    }
}

/// Generate as an item stage: the upstream (or the previous round's checkpoint) answers a
/// prompt; the answer lands in `generations`.
struct Generate<'a> {
    run_id: i64,
    round: i64,
    spec: &'a GenerateStage,
    up: Upstream,
    backend_id: String,
    /// The sampling of each sample index, as stored.
    sampling_json: Vec<String>,
}

impl ItemStage for Generate<'_> {
    type Unit = Sample;
    type Row = NewGeneration;

    fn request(&self, u: &Sample) -> CompletionRequest {
        let messages = crate::chat_messages(u.system.as_deref(), u.history.as_deref(), &u.prompt);
        CompletionRequest {
            prompt: Prompt::Chat(messages),
            sampling: to_sampling(&self.spec.sampling, u.sample_idx as u64),
            model: self.up.model_override.clone(),
        }
    }

    fn record(&self, u: Sample, result: &CallResult) -> NewGeneration {
        NewGeneration {
            run_id: self.run_id,
            round: self.round,
            prompt_id: u.prompt_id,
            sample_idx: u.sample_idx,
            model: self.spec.model.clone(),
            backend: self.backend_id.clone(),
            checkpoint_id: self.up.checkpoint_id,
            sampling: self.sampling_json[u.sample_idx as usize].clone(),
            out: outcome(result),
        }
    }
}

pub(crate) async fn generate(ctx: &Ctx<'_>) -> Result<()> {
    let e = ctx.engine;
    let (run_id, round) = (ctx.run_id, ctx.round());
    let spec = &e.spec.rounds.generate;
    let up = upstream(ctx).await?;
    e.store
        .ensure_round(
            run_id,
            round,
            &spec.model,
            &up.upstream_ref,
            up.checkpoint_id,
        )
        .await?;
    e.store.delete_failed_generations(run_id, round).await?;
    let n = spec.n as i64;
    let total = e.store.count_prompts(run_id, "train").await? * n;
    let base = e.store.generation_counts(run_id, round).await?;
    let done_ok = base.0;
    e.store
        .start_stage(run_id, round, Stage::Generate, Some(total))
        .await?;
    e.observer
        .stage_started(ctx.round, Stage::Generate, total as u64, done_ok as u64);
    let backend = match &up.instead {
        Some(m) => {
            let name = format!("{}@round-{}", spec.model, ctx.round - 1);
            e.factory
                .text_generator(&name, m)
                .map_err(|source| Error::Backend { name, source })?
        }
        None => e.backend(&spec.model)?,
    };
    let stage = Generate {
        run_id,
        round,
        spec,
        backend_id: backend.id(),
        sampling_json: (0..spec.n as u64)
            .map(|k| serde_json::to_string(&to_sampling(&spec.sampling, k)).unwrap_or_default())
            .collect(),
        up,
    };
    let pending = Unanswered {
        store: e.store.clone(),
        run_id,
        round,
        n,
        after: -1,
    };
    let model = e.model(backend, &spec.model);
    let progress = Progress::new(Stage::Generate, base);
    let tally = executor::execute(ctx, &stage, pending, model, Some(progress)).await?;
    let (ok, failed) = e.store.generation_counts(run_id, round).await?;
    ctx.finish(Stage::Generate, ok, failed, tally.first_error)
        .await
}

/// An Aligner trained here records its prompt template (`aligner.json` in its folder); using
/// it with another template would feed it prompts it never saw. Returns the error to report.
fn template_mismatch(
    model: Option<&ModelSpec>,
    template: &aligner_spec::Template,
) -> Option<String> {
    let Some(ModelSpec::Local(m)) = model else {
        return None;
    };
    let aligner_spec::LocalSource::HfFolder { path, .. } = &m.source else {
        return None;
    };
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path.join("aligner.json")).ok()?).ok()?;
    let trained_text = meta["extra"]["template_text"].as_str()?;
    if trained_text == template.text() {
        return None;
    }
    let trained_id = meta["aligner_template"].as_str().unwrap_or("custom");
    Some(format!(
        "the Aligner `{}` was trained with the template `{trained_id}`, but `rounds.correct.template` is `{}`\nhint: set `template: {}` (its text is in `{}`), so the Aligner reads the prompts it was trained on",
        path.display(),
        template.id(),
        if trained_id == "custom" { "<the same text>" } else { trained_id },
        path.join("aligner.json").display()
    ))
}

/// Correct's pending units: the round's successful answers without a correction, a page at a
/// time.
struct Uncorrected {
    store: Store,
    run_id: i64,
    round: i64,
    /// The last generation id read (keyset pagination).
    after: i64,
}

impl Pending for Uncorrected {
    type Unit = UncorrectedRow;

    async fn next_page(&mut self) -> Result<Option<Vec<UncorrectedRow>>> {
        let page = self
            .store
            .uncorrected_page(self.run_id, self.round, self.after, PAGE)
            .await?;
        let Some(last) = page.last() else {
            return Ok(None);
        };
        self.after = last.generation_id;
        Ok(Some(page))
    }
}

/// Correct as an item stage: the Aligner rewrites an answer through the correction template;
/// the correction lands in `corrections`.
struct Correct<'a> {
    run_id: i64,
    round: i64,
    spec: &'a CorrectStage,
    backend_id: String,
    template_id: String,
    template_hash: String,
    sampling: Sampling,
    sampling_json: String,
}

impl ItemStage for Correct<'_> {
    type Unit = UncorrectedRow;
    type Row = NewCorrection;

    fn request(&self, u: &UncorrectedRow) -> CompletionRequest {
        CompletionRequest {
            prompt: Prompt::Raw(crate::render_correction(
                &self.spec.template,
                u.history.as_deref(),
                &u.prompt,
                &u.answer,
            )),
            sampling: self.sampling.clone(),
            model: None,
        }
    }

    fn record(&self, u: UncorrectedRow, result: &CallResult) -> NewCorrection {
        NewCorrection {
            run_id: self.run_id,
            round: self.round,
            generation_id: u.generation_id,
            model: self.spec.model.clone(),
            backend: self.backend_id.clone(),
            template_id: self.template_id.clone(),
            template_hash: self.template_hash.clone(),
            sampling: self.sampling_json.clone(),
            out: outcome(result),
        }
    }
}

pub(crate) async fn correct(ctx: &Ctx<'_>) -> Result<()> {
    let e = ctx.engine;
    let (run_id, round) = (ctx.run_id, ctx.round());
    let spec = &e.spec.rounds.correct;
    if let Some(message) = template_mismatch(e.spec.models.get(&spec.model), &spec.template) {
        return Err(Error::Stage {
            round: ctx.round,
            stage: "correct",
            message,
        });
    }
    e.store.delete_failed_corrections(run_id, round).await?;
    let (gen_ok, _) = e.store.generation_counts(run_id, round).await?;
    let base = e.store.correction_counts(run_id, round).await?;
    let done_ok = base.0;
    e.store
        .start_stage(run_id, round, Stage::Correct, Some(gen_ok))
        .await?;
    e.observer
        .stage_started(ctx.round, Stage::Correct, gen_ok as u64, done_ok as u64);
    let backend = e.backend_for(run_id, &spec.model).await?;
    let sampling = to_sampling(&spec.sampling, 0);
    let stage = Correct {
        run_id,
        round,
        spec,
        backend_id: backend.id(),
        template_id: spec.template.id().to_string(),
        template_hash: hex::encode(Sha256::digest(spec.template.text().as_bytes())),
        sampling_json: serde_json::to_string(&sampling).unwrap_or_default(),
        sampling,
    };
    let pending = Uncorrected {
        store: e.store.clone(),
        run_id,
        round,
        after: 0,
    };
    let model = e.model(backend, &spec.model);
    let progress = Progress::new(Stage::Correct, base);
    let tally = executor::execute(ctx, &stage, pending, model, Some(progress)).await?;
    let (ok, failed) = e.store.correction_counts(run_id, round).await?;
    ctx.finish(Stage::Correct, ok, failed, tally.first_error)
        .await
}

/// A unit's prompt metadata as JSON, for the labels rules (`None` without any).
fn metadata(u: &aligner_store::UnpairedRow) -> Option<serde_json::Value> {
    u.metadata
        .as_deref()
        .and_then(|m| serde_json::from_str(m).ok())
}

pub(crate) async fn synthesize(ctx: &Ctx<'_>) -> Result<()> {
    let e = ctx.engine;
    let (run_id, round) = (ctx.run_id, ctx.round());
    let spec = &e.spec.rounds.synthesize;
    let (gen_ok, gen_failed) = e.store.generation_counts(run_id, round).await?;
    let (kept0, dropped0) = e.store.pair_counts(run_id, round).await?;
    e.store
        .start_stage(run_id, round, Stage::Synthesize, Some(gen_ok + gen_failed))
        .await?;
    e.observer.stage_started(
        ctx.round,
        Stage::Synthesize,
        (gen_ok + gen_failed) as u64,
        (kept0 + dropped0) as u64,
    );
    // The filters' state spans pairs; rebuild it from what is committed.
    let hashes = e.store.kept_pair_keys(run_id, round).await?;
    let mut state = FilterState {
        kept: hashes.len() as u64,
        kept_prompts: hashes.into_iter().collect(),
        ..Default::default()
    };
    let scorer = match &spec.semantic {
        Some(filter) => {
            let embedder = e
                .factory
                .embedder(&filter.embedder)
                .map_err(|source| Error::component(ctx.round, "synthesize", source))?;
            let scorer = Scorer::new(embedder, filter.clone(), ctx.round);
            if state.kept > 0 {
                let kept = e.store.kept_pairs(run_id, round).await?;
                scorer
                    .restore(&mut state, kept.into_iter().map(|p| p.prompt).collect())
                    .await?;
            }
            Some(scorer)
        }
        None => None,
    };
    let (mut total_kept, mut total_dropped) = (kept0, dropped0);
    let mut after = 0i64;
    loop {
        if e.interrupted() {
            return Err(e.interrupted_error(run_id));
        }
        let page = e
            .store
            .unpaired_page(run_id, round, after, ctx.batch as i64)
            .await?;
        let Some(last) = page.last() else { break };
        after = last.generation_id;
        // `benign_preference`: which prompts of the page it calls benign, and the refusal
        // each benign pair rejects (the Aligner's own when it refused, else a fixed text).
        let benign: Vec<Option<(String, PairOrigin)>> = page
            .iter()
            .map(|u| {
                let rule = spec.benign_preference.as_ref()?;
                if rule.labels.is_harmful(metadata(u).as_ref()) {
                    return None;
                }
                Some(match u.correction.as_deref() {
                    Some(c)
                        if u.correction_status == Some(Outcome::Ok)
                            && crate::refusal::is_refusal(c) =>
                    {
                        (c.to_string(), PairOrigin::AnswerOverAlignerRefusal)
                    }
                    _ => (
                        crate::refusal::refusal_for(&rule.refusals, &u.dedupe_key),
                        PairOrigin::AnswerOverRefusalText,
                    ),
                })
            })
            .collect();
        let candidates: Vec<Candidate> = page
            .iter()
            .zip(&benign)
            .map(|(u, benign)| {
                let gen_ok = u.generation_status == Outcome::Ok;
                let corr_ok = u.correction_status == Some(Outcome::Ok) && benign.is_none();
                let benign_refusal = spec.benign_refusals.as_ref().is_some_and(|rule| {
                    !rule.is_harmful(metadata(u).as_ref())
                        && u.correction
                            .as_deref()
                            .is_some_and(crate::refusal::is_refusal)
                });
                Candidate {
                    prompt_hash: &u.dedupe_key,
                    original: gen_ok.then_some(u.original.as_deref().unwrap_or("")),
                    original_truncated: u.original_finish.as_deref() == Some("length"),
                    // A benign pair under `benign_preference` does not use the correction.
                    correction: corr_ok.then_some(u.correction.as_deref().unwrap_or("")),
                    correction_truncated: u.correction_finish.as_deref() == Some("length"),
                    benign_refusal,
                    semantic: None,
                }
            })
            .collect();
        let measured = match &scorer {
            Some(scorer) => {
                let prompts: Vec<&str> = page.iter().map(|u| u.prompt.as_str()).collect();
                scorer.measure(spec, &state, &candidates, &prompts).await?
            }
            None => vec![None; page.len()],
        };
        let verdicts: Vec<filters::Verdict> = candidates
            .iter()
            .zip(&measured)
            .zip(&benign)
            .map(|((c, m), benign)| match benign {
                Some((refusal, _)) => filters::benign_verdict(spec, &mut state, c, refusal),
                None => {
                    let c = Candidate {
                        semantic: m.as_ref().map(Measured::semantic),
                        ..*c
                    };
                    filters::verdict(spec, &mut state, &c)
                }
            })
            .collect();
        drop(candidates);
        let mut rows = Vec::with_capacity(page.len());
        let (mut kept, mut dropped) = (0u64, 0u64);
        for ((u, v), benign) in page.into_iter().zip(verdicts).zip(benign) {
            if v.reason.is_none() {
                kept += 1
            } else {
                dropped += 1
            }
            let (chosen, rejected, origin) = match benign {
                Some((refusal, origin)) => (u.original, Some(refusal), origin),
                None => (u.correction, u.original, PairOrigin::Correction),
            };
            rows.push(NewPair {
                run_id,
                round,
                prompt_id: u.prompt_id,
                generation_id: u.generation_id,
                correction_id: u.correction_id,
                chosen,
                rejected,
                reason: v.reason.map(str::to_string),
                edit_distance: v.edit_distance,
                length_ratio: v.length_ratio,
                origin,
            });
        }
        e.store.insert_pairs(&rows).await?;
        total_kept += kept as i64;
        total_dropped += dropped as i64;
        e.store
            .update_stage_progress(run_id, round, Stage::Synthesize, total_kept, total_dropped)
            .await?;
        e.observer.advanced(kept, dropped);
    }
    // The cap on benign-preference pairs needs the round's correction pairs counted first;
    // run again after a restart, it drops nothing more.
    if let Some(ratio) = spec.benign_preference.as_ref().and_then(|b| b.max_ratio) {
        let capped = e.store.cap_benign_pairs(run_id, round, ratio).await?;
        if capped > 0 {
            e.observer.note(&format!(
                "round {}: {capped} benign-preference pairs over `max_ratio` {ratio} dropped (`benign_cap`)",
                ctx.round
            ));
        }
    }
    let (kept, dropped) = e.store.pair_counts(run_id, round).await?;
    e.store
        .finish_stage(
            run_id,
            round,
            Stage::Synthesize,
            StageEnd::done(kept, dropped),
        )
        .await?;
    e.observer
        .stage_finished(ctx.round, Stage::Synthesize, kept as u64, dropped as u64);
    let message = format!("round {}: {kept} pairs kept, {dropped} dropped", ctx.round);
    e.event(
        run_id,
        Some(ctx.round),
        Some(Stage::Synthesize),
        Level::Info,
        EventKind::StageFinished,
        &message,
        None,
    )
    .await;
    Ok(())
}

#[cfg(test)]
mod template_tests {
    use super::*;

    #[test]
    fn an_aligner_checkpoint_refuses_another_template() {
        let dir = tempfile::tempdir().unwrap();
        let meta = serde_json::json!({
            "method": "train_aligner",
            "aligner_template": "aligner-v1",
            "base_model": "x",
            "optimizer_steps": 3,
            "extra": { "template_text": aligner_spec::Template::AlignerV1.text() }
        });
        std::fs::write(dir.path().join("aligner.json"), meta.to_string()).unwrap();
        let model = ModelSpec::Local(aligner_spec::LocalModel {
            source: aligner_spec::LocalSource::HfFolder {
                path: dir.path().into(),
                architecture: None,
            },
            dtype: "auto".into(),
        });
        assert_eq!(
            template_mismatch(Some(&model), &aligner_spec::Template::AlignerV1),
            None
        );
        let err = template_mismatch(Some(&model), &aligner_spec::Template::AlignerGeneral).unwrap();
        assert!(
            err.contains("aligner-v1") && err.contains("aligner-general"),
            "{err}"
        );
    }
}

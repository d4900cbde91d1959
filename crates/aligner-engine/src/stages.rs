//! The item stages of a round: generate, correct (model calls, bounded concurrency, results
//! committed in small batches as they complete) and synthesize (pair verdicts, pure CPU, plus
//! sentence embeddings when the semantic filter is on).

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use aligner_backend::{Completion, CompletionRequest, Message, Prompt, Sampling, TextGenerator};
use aligner_spec::{ModelSpec, SamplingSpec};
use aligner_store::{ItemOutcome, NewCorrection, NewGeneration, NewPair};

use crate::filters::{self, Candidate, FilterState};
use crate::semantic::{Measured, Scorer};
use crate::{Engine, Error, Result, Stage};

/// Longest time a finished item waits in memory before it is committed.
const FLUSH_EVERY: Duration = Duration::from_millis(50);
/// Units read from the store per page.
const PAGE: i64 = 512;

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
        let status = if ok == 0 && failed > 0 {
            "failed"
        } else {
            "done"
        };
        let error = (status == "failed").then(|| {
            format!(
                "all {failed} item(s) failed; first error: {}",
                first_error.clone().unwrap_or_default()
            )
        });
        e.store
            .finish_stage(
                self.run_id,
                self.round(),
                stage.as_str(),
                status,
                ok,
                failed,
                error.as_deref(),
            )
            .await?;
        e.observer
            .stage_finished(self.round, stage, ok as u64, failed as u64);
        let message = format!(
            "round {} {}: {ok} ok, {failed} failed",
            self.round,
            stage.as_str()
        );
        let level = if failed > 0 { "warn" } else { "info" };
        e.event(
            self.run_id,
            Some(self.round),
            Some(stage.as_str()),
            level,
            "stage_finished",
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

pub(crate) fn to_sampling(s: &SamplingSpec, seed_offset: u64) -> Sampling {
    Sampling {
        temperature: s.temperature,
        top_p: s.top_p,
        top_k: s.top_k,
        max_tokens: s.max_tokens,
        frequency_penalty: s.frequency_penalty,
        presence_penalty: s.presence_penalty,
        repetition_penalty: s.repetition_penalty,
        seed: s.seed.map(|seed| seed.wrapping_add(seed_offset)),
        stop: s.stop.clone(),
    }
}

pub(crate) fn outcome(result: &Result<Completion, aligner_backend::Error>) -> ItemOutcome {
    match result {
        Ok(c) => ItemOutcome {
            text: Some(c.text.clone()),
            finish_reason: Some(c.finish_reason.as_str().to_string()),
            served_model: Some(c.model.clone()),
            prompt_tokens: c.prompt_tokens.map(i64::from),
            completion_tokens: c.completion_tokens.map(i64::from),
            latency_ms: Some(c.latency.as_secs_f64() * 1000.0),
            attempts: c.attempts as i64,
            error: None,
        },
        Err(e) => ItemOutcome {
            attempts: e.attempts as i64,
            error: Some(format!("{}: {}", e.kind.as_str(), e.message)),
            ..Default::default()
        },
    }
}

/// Runs model calls for every unit the producer sends, `concurrency` at a time, and commits
/// results through `flush` in batches of `batch` (or every [`FLUSH_EVERY`]). Returns the
/// (ok, failed) counts of this execution and the first error seen.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn call_all<U, R, F, Fut>(
    ctx: &Ctx<'_>,
    backend: Arc<dyn TextGenerator>,
    concurrency: usize,
    rx: mpsc::Receiver<U>,
    request: impl Fn(&U) -> CompletionRequest,
    record: impl Fn(U, &Result<Completion, aligner_backend::Error>) -> R,
    base: (i64, i64),
    flush: F,
) -> Result<(u64, u64, Option<String>)>
where
    F: Fn(Vec<R>, i64, i64) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    // Stop taking queued units as soon as the run is interrupted; in-flight calls finish.
    let flag = ctx.engine.interrupt.clone();
    let units = futures::stream::unfold((rx, flag), |(mut rx, flag)| async move {
        if flag.load(Ordering::Relaxed) {
            return None;
        }
        rx.recv().await.map(|u| (u, (rx, flag)))
    });
    let results = units
        .map(|unit| {
            let req = request(&unit);
            let backend = backend.clone();
            async move {
                let result = backend.complete(req).await;
                (unit, result)
            }
        })
        .buffer_unordered(concurrency.max(1));
    let mut results = std::pin::pin!(results);
    let (mut ok, mut failed, mut first_error) = (0u64, 0u64, None);
    let mut buf = Vec::with_capacity(ctx.batch);
    let (mut buf_ok, mut buf_failed) = (0u64, 0u64);
    let mut last_flush = Instant::now();
    loop {
        let wait = FLUSH_EVERY.saturating_sub(last_flush.elapsed());
        let next = tokio::time::timeout(wait, results.next()).await;
        let done = matches!(next, Ok(None));
        if let Ok(Some((unit, result))) = next {
            match &result {
                Ok(_) => buf_ok += 1,
                Err(e) => {
                    buf_failed += 1;
                    if first_error.is_none() {
                        first_error = Some(e.to_string());
                    }
                }
            }
            buf.push(record(unit, &result));
        }
        if !buf.is_empty()
            && (done || buf.len() >= ctx.batch || last_flush.elapsed() >= FLUSH_EVERY)
        {
            ok += buf_ok;
            failed += buf_failed;
            flush(
                std::mem::take(&mut buf),
                base.0 + ok as i64,
                base.1 + failed as i64,
            )
            .await?;
            ctx.engine.observer.advanced(buf_ok, buf_failed);
            (buf_ok, buf_failed) = (0, 0);
            last_flush = Instant::now();
        } else if buf.is_empty() {
            last_flush = Instant::now();
        }
        if done {
            return Ok((ok, failed, first_error));
        }
    }
}

/// Who answers in this round: the configured upstream, or the previous round's checkpoint.
struct Upstream {
    /// Model name sent instead of the configured one (a served checkpoint).
    model_override: Option<String>,
    /// A local upstream's checkpoint, loaded instead of the configured model.
    local: Option<aligner_spec::LocalModel>,
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
            local: None,
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
    // A local upstream answers with the checkpoint folder itself.
    let local = match (
        &e.spec.models[&e.spec.rounds.generate.model],
        &ckpt.serve_model,
    ) {
        (ModelSpec::Local(_), None) => Some(crate::train::checkpoint_model(&ckpt.path)),
        _ => None,
    };
    Ok(Upstream {
        model_override: ckpt.serve_model.clone(),
        upstream_ref: ckpt.serve_model.clone().unwrap_or(ckpt.path.clone()),
        checkpoint_id: Some(ckpt.id),
        local,
    })
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
        .start_stage(run_id, round, "generate", Some(total))
        .await?;
    e.observer
        .stage_started(ctx.round, Stage::Generate, total as u64, done_ok as u64);
    let backend = match &up.local {
        Some(m) => {
            let name = format!("{}@round-{}", spec.model, ctx.round - 1);
            e.factory
                .text_generator(&name, &ModelSpec::Local(m.clone()))
                .map_err(|message| Error::Backend { name, message })?
        }
        None => e.backend(&spec.model)?,
    };
    let backend_id = backend.id();
    let sampling_json: Vec<String> = (0..spec.n as u64)
        .map(|k| serde_json::to_string(&to_sampling(&spec.sampling, k)).unwrap_or_default())
        .collect();

    struct Unit {
        prompt_id: i64,
        sample_idx: i64,
        system: Option<String>,
        prompt: String,
    }
    let (tx, rx) = mpsc::channel::<Unit>(1024);
    let store = e.store.clone();
    let interrupt = e.interrupt.clone();
    let producer = async move {
        let mut after = -1i64;
        loop {
            let page = store.train_prompts_page(run_id, after, PAGE).await?;
            let (Some(first), Some(last)) = (page.first(), page.last()) else {
                break;
            };
            after = last.idx;
            let have: std::collections::HashSet<(i64, i64)> = store
                .generation_keys(run_id, round, first.id, last.id)
                .await?
                .into_iter()
                .collect();
            for p in page {
                for k in 0..n {
                    if have.contains(&(p.id, k)) {
                        continue;
                    }
                    if interrupt.load(Ordering::Relaxed) {
                        return Ok(());
                    }
                    let unit = Unit {
                        prompt_id: p.id,
                        sample_idx: k,
                        system: p.system.clone(),
                        prompt: p.prompt.clone(),
                    };
                    if tx.send(unit).await.is_err() {
                        return Ok(());
                    }
                }
            }
        }
        Ok::<(), Error>(())
    };
    let consumer = call_all(
        ctx,
        backend,
        e.concurrency(&spec.model),
        rx,
        |u| {
            let mut messages = Vec::with_capacity(2);
            if let Some(system) = &u.system {
                messages.push(Message::new("system", system.clone()));
            }
            messages.push(Message::new("user", u.prompt.clone()));
            CompletionRequest {
                prompt: Prompt::Chat(messages),
                sampling: to_sampling(&spec.sampling, u.sample_idx as u64),
                model: up.model_override.clone(),
            }
        },
        |u, result| NewGeneration {
            run_id,
            round,
            prompt_id: u.prompt_id,
            sample_idx: u.sample_idx,
            model: spec.model.clone(),
            backend: backend_id.clone(),
            checkpoint_id: up.checkpoint_id,
            sampling: sampling_json[u.sample_idx as usize].clone(),
            out: outcome(result),
        },
        base,
        |rows, ok, failed| {
            let store = e.store.clone();
            async move {
                store.insert_generations(&rows).await?;
                store
                    .update_stage_progress(run_id, round, "generate", ok, failed)
                    .await?;
                Ok(())
            }
        },
    );
    let (produced, consumed) = tokio::join!(producer, consumer);
    produced?;
    let (_, _, first_error) = consumed?;
    let (ok, failed) = e.store.generation_counts(run_id, round).await?;
    ctx.finish(Stage::Generate, ok, failed, first_error).await
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
        .start_stage(run_id, round, "correct", Some(gen_ok))
        .await?;
    e.observer
        .stage_started(ctx.round, Stage::Correct, gen_ok as u64, done_ok as u64);
    let backend = e.backend_for(run_id, &spec.model).await?;
    let backend_id = backend.id();
    let template_id = spec.template.id().to_string();
    let template_hash = hex::encode(Sha256::digest(spec.template.text().as_bytes()));
    let sampling = to_sampling(&spec.sampling, 0);
    let sampling_json = serde_json::to_string(&sampling).unwrap_or_default();

    let (tx, rx) = mpsc::channel::<aligner_store::UncorrectedRow>(1024);
    let store = e.store.clone();
    let interrupt = e.interrupt.clone();
    let producer = async move {
        let mut after = 0i64;
        loop {
            let page = store.uncorrected_page(run_id, round, after, PAGE).await?;
            let Some(last) = page.last() else { break };
            after = last.generation_id;
            for row in page {
                if interrupt.load(Ordering::Relaxed) || tx.send(row).await.is_err() {
                    return Ok(());
                }
            }
        }
        Ok::<(), Error>(())
    };
    let consumer = call_all(
        ctx,
        backend,
        e.concurrency(&spec.model),
        rx,
        |u| CompletionRequest {
            prompt: Prompt::Raw(spec.template.render(&u.prompt, &u.answer)),
            sampling: sampling.clone(),
            model: None,
        },
        |u, result| NewCorrection {
            run_id,
            round,
            generation_id: u.generation_id,
            model: spec.model.clone(),
            backend: backend_id.clone(),
            template_id: template_id.clone(),
            template_hash: template_hash.clone(),
            sampling: sampling_json.clone(),
            out: outcome(result),
        },
        base,
        |rows, ok, failed| {
            let store = e.store.clone();
            async move {
                store.insert_corrections(&rows).await?;
                store
                    .update_stage_progress(run_id, round, "correct", ok, failed)
                    .await?;
                Ok(())
            }
        },
    );
    let (produced, consumed) = tokio::join!(producer, consumer);
    produced?;
    let (_, _, first_error) = consumed?;
    let (ok, failed) = e.store.correction_counts(run_id, round).await?;
    ctx.finish(Stage::Correct, ok, failed, first_error).await
}

pub(crate) async fn synthesize(ctx: &Ctx<'_>) -> Result<()> {
    let e = ctx.engine;
    let (run_id, round) = (ctx.run_id, ctx.round());
    let spec = &e.spec.rounds.synthesize;
    let (gen_ok, gen_failed) = e.store.generation_counts(run_id, round).await?;
    let (kept0, dropped0) = e.store.pair_counts(run_id, round).await?;
    e.store
        .start_stage(run_id, round, "synthesize", Some(gen_ok + gen_failed))
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
            let embedder = e.factory.embedder(filter).map_err(|message| Error::Stage {
                round: ctx.round,
                stage: "synthesize",
                message,
            })?;
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
        let candidates: Vec<Candidate> = page
            .iter()
            .map(|u| {
                let gen_ok = u.generation_status == "ok";
                let corr_ok = u.correction_status.as_deref() == Some("ok");
                Candidate {
                    prompt_hash: &u.dedupe_key,
                    original: gen_ok.then_some(u.original.as_deref().unwrap_or("")),
                    original_truncated: u.original_finish.as_deref() == Some("length"),
                    correction: corr_ok.then_some(u.correction.as_deref().unwrap_or("")),
                    correction_truncated: u.correction_finish.as_deref() == Some("length"),
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
            .map(|(c, m)| {
                let c = Candidate {
                    semantic: m.as_ref().map(Measured::semantic),
                    ..*c
                };
                filters::verdict(spec, &mut state, &c)
            })
            .collect();
        drop(candidates);
        let mut rows = Vec::with_capacity(page.len());
        let (mut kept, mut dropped) = (0u64, 0u64);
        for (u, v) in page.into_iter().zip(verdicts) {
            if v.reason.is_none() {
                kept += 1
            } else {
                dropped += 1
            }
            rows.push(NewPair {
                run_id,
                round,
                prompt_id: u.prompt_id,
                generation_id: u.generation_id,
                correction_id: u.correction_id,
                chosen: u.correction,
                rejected: u.original,
                reason: v.reason.map(str::to_string),
                edit_distance: v.edit_distance,
                length_ratio: v.length_ratio,
            });
        }
        e.store.insert_pairs(&rows).await?;
        total_kept += kept as i64;
        total_dropped += dropped as i64;
        e.store
            .update_stage_progress(run_id, round, "synthesize", total_kept, total_dropped)
            .await?;
        e.observer.advanced(kept, dropped);
    }
    let (kept, dropped) = e.store.pair_counts(run_id, round).await?;
    e.store
        .finish_stage(run_id, round, "synthesize", "done", kept, dropped, None)
        .await?;
    e.observer
        .stage_finished(ctx.round, Stage::Synthesize, kept as u64, dropped as u64);
    let message = format!("round {}: {kept} pairs kept, {dropped} dropped", ctx.round);
    e.event(
        run_id,
        Some(ctx.round),
        Some("synthesize"),
        "info",
        "stage_finished",
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

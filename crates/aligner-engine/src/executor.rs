//! The one loop every item stage runs: pending units -> model calls -> rows -> batched commits.
//!
//! An item stage is a parameterisation of [`execute`]: a [`Pending`] source says which units are
//! left (a page at a time), an [`ItemStage`] says what model call a unit makes and what row its
//! result leaves, and the row's type ([`StoreRow`]) says how a batch of them is committed. The executor owns what they all share:
//! model calls at the model's concurrency (`buffer_unordered`), no new unit started once the run
//! is interrupted (in-flight calls finish and are committed), commits every `batch` rows or
//! [`FLUSH_EVERY`], the stage's progress row and the observer's counts.
//!
//! Its users: generate and correct (`stages.rs`), teach's answers and teacher corrections and
//! the trained Aligner's held-out outputs (`teach.rs`), evaluate's answers, corrections and
//! judge calls (`evaluate.rs`). Each stage then marks itself finished with [`Ctx::finish`].

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::mpsc;

use aligner_backend::{Completion, CompletionRequest, TextGenerator};
use aligner_store::{
    AlignerUpdate, ItemOutcome, NewCorrection, NewEvalAnswer, NewEvalJudgement, NewGeneration,
    Store,
};

use crate::stages::Ctx;
use crate::{Error, Result, Stage};

/// Longest time a finished item waits in memory before it is committed.
pub(crate) const FLUSH_EVERY: Duration = Duration::from_millis(50);
/// Units queued between the producer and the model calls.
const QUEUE: usize = 1024;

/// What one model call returned.
pub(crate) type CallResult = std::result::Result<Completion, aligner_backend::Error>;

/// Where a stage's pending units come from. Paged sources read the store with keyset
/// pagination, so memory is bounded by the page and queue sizes, not by the run.
pub(crate) trait Pending: Send {
    type Unit: Send;

    /// The next page of pending units (possibly empty, when a page held only finished work);
    /// `None` once every page has been read.
    fn next_page(&mut self) -> impl Future<Output = Result<Option<Vec<Self::Unit>>>> + Send;
}

/// Units already known in full (a few hundred rows read at once): one page.
impl<U: Send> Pending for Vec<U> {
    type Unit = U;

    async fn next_page(&mut self) -> Result<Option<Vec<U>>> {
        Ok((!self.is_empty()).then(|| std::mem::take(self)))
    }
}

/// What an item stage does with each unit.
pub(crate) trait ItemStage: Sync {
    type Unit: Send;
    /// What a call leaves in the store. A failed call leaves its row too, with its error;
    /// nothing is invented in its place.
    type Row: StoreRow;

    /// The model call for a unit.
    fn request(&self, unit: &Self::Unit) -> CompletionRequest;

    /// The row a unit's call leaves.
    fn record(&self, unit: Self::Unit, result: &CallResult) -> Self::Row;
}

/// A row that an item stage leaves, and how the store commits a batch of them (one
/// transaction; the store's unique keys make a retried unit land once).
pub(crate) trait StoreRow: Send + Sized {
    fn commit(store: &Store, rows: &[Self]) -> impl Future<Output = Result<()>> + Send;
}

/// Each row type with the store method that commits it.
macro_rules! store_rows {
    ($($row:ty => $method:ident),* $(,)?) => {
        $(impl StoreRow for $row {
            async fn commit(store: &Store, rows: &[Self]) -> Result<()> {
                Ok(store.$method(rows).await?)
            }
        })*
    };
}

store_rows! {
    NewGeneration => insert_generations,
    NewCorrection => insert_corrections,
    AlignerUpdate => update_aligner_examples,
    NewEvalAnswer => insert_eval_answers,
    NewEvalJudgement => insert_eval_judgements,
}

/// The stage row whose `ok`/`failed` counts the executor keeps up to date, and the counts it
/// starts from (what earlier executions and phases of the stage already committed).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Progress {
    pub stage: Stage,
    pub ok: i64,
    pub failed: i64,
}

impl Progress {
    /// `stage`'s progress from the `(ok, failed)` counts already committed.
    pub fn new(stage: Stage, (ok, failed): (i64, i64)) -> Self {
        Progress { stage, ok, failed }
    }
}

/// What one execution did.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    pub ok: u64,
    pub failed: u64,
    /// The first failed call's error.
    pub first_error: Option<String>,
}

/// The model that answers a stage's units, and how many calls it takes at once.
pub(crate) struct Model {
    pub backend: Arc<dyn TextGenerator>,
    pub concurrency: usize,
}

/// Runs `stage`'s model call for every unit `pending` yields, `model.concurrency` at a time,
/// and commits the rows in batches of `ctx.batch` (or every [`FLUSH_EVERY`]), each commit
/// followed by the `progress` row's update (when given) and the observer's counts.
pub(crate) async fn execute<S, P>(
    ctx: &Ctx<'_>,
    stage: &S,
    pending: P,
    model: Model,
    progress: Option<Progress>,
) -> Result<Tally>
where
    S: ItemStage,
    P: Pending<Unit = S::Unit>,
{
    let (tx, rx) = mpsc::channel::<S::Unit>(QUEUE);
    let interrupt = ctx.engine.interrupt.clone();
    let producer = async move {
        let mut pending = pending;
        while let Some(page) = pending.next_page().await? {
            for unit in page {
                if interrupt.load(Ordering::Relaxed) || tx.send(unit).await.is_err() {
                    return Ok(());
                }
            }
        }
        Ok::<(), Error>(())
    };
    let (produced, consumed) = tokio::join!(producer, call_all(ctx, stage, rx, model, progress));
    produced?;
    consumed
}

/// The consumer half of [`execute`]: calls, rows, batched commits.
async fn call_all<S: ItemStage>(
    ctx: &Ctx<'_>,
    stage: &S,
    rx: mpsc::Receiver<S::Unit>,
    model: Model,
    progress: Option<Progress>,
) -> Result<Tally> {
    let e = ctx.engine;
    // Stop taking queued units as soon as the run is interrupted; in-flight calls finish.
    let flag = e.interrupt.clone();
    let units = futures::stream::unfold((rx, flag), |(mut rx, flag)| async move {
        if flag.load(Ordering::Relaxed) {
            return None;
        }
        rx.recv().await.map(|u| (u, (rx, flag)))
    });
    let backend = model.backend;
    let results = units
        .map(|unit| {
            let req = stage.request(&unit);
            let backend = backend.clone();
            async move {
                let result = backend.complete(req).await;
                (unit, result)
            }
        })
        .buffer_unordered(model.concurrency.max(1));
    let mut results = std::pin::pin!(results);
    let mut tally = Tally::default();
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
                Err(err) => {
                    buf_failed += 1;
                    if tally.first_error.is_none() {
                        tally.first_error = Some(err.to_string());
                    }
                }
            }
            buf.push(stage.record(unit, &result));
        }
        if !buf.is_empty()
            && (done || buf.len() >= ctx.batch || last_flush.elapsed() >= FLUSH_EVERY)
        {
            tally.ok += buf_ok;
            tally.failed += buf_failed;
            let rows = std::mem::take(&mut buf);
            S::Row::commit(&e.store, &rows).await?;
            if let Some(p) = progress {
                e.store
                    .update_stage_progress(
                        ctx.run_id,
                        ctx.round(),
                        p.stage,
                        p.ok + tally.ok as i64,
                        p.failed + tally.failed as i64,
                    )
                    .await?;
            }
            e.observer.advanced(buf_ok, buf_failed);
            (buf_ok, buf_failed) = (0, 0);
            last_flush = Instant::now();
        } else if buf.is_empty() {
            last_flush = Instant::now();
        }
        if done {
            return Ok(tally);
        }
    }
}

/// What a finished call used (tokens, latency), as stored with round-0 rows.
pub(crate) fn usage(c: &aligner_backend::Completion) -> aligner_store::CallUsage {
    aligner_store::CallUsage {
        prompt_tokens: c.prompt_tokens.map(i64::from),
        completion_tokens: c.completion_tokens.map(i64::from),
        latency_ms: Some(c.latency.as_secs_f64() * 1000.0),
    }
}

/// The stored outcome of a call: its text and provenance, or its error.
pub(crate) fn outcome(result: &CallResult) -> ItemOutcome {
    match result {
        Ok(c) => ItemOutcome {
            text: Some(c.text.clone()),
            finish_reason: Some(c.finish_reason.as_str().to_string()),
            served_model: Some(c.model.clone()),
            replica: c.replica.clone(),
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

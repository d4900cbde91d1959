//! The ingest step: read the prompt set once, sample it, split off the held-out part and store
//! it, all in one transaction, so every later stage reads prompts from the store only.

use std::collections::HashMap;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use sha2::{Digest, Sha256};

use aligner_dataset::{Format, Mapping};
use aligner_spec::PromptFormat;
use aligner_store::{EventKind, Level, NewPrompt, Stage, StageEnd};

use crate::{Engine, Error, Result};

/// Hash of the prompt with case and whitespace normalized: the key for duplicate prompts.
pub(crate) fn prompt_hash(text: &str) -> String {
    let normalized = text
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase();
    hex::encode(&Sha256::digest(normalized.as_bytes())[..16])
}

/// Indices of the rows to keep (sorted) and, among them, the held-out ones.
pub(crate) fn sample_and_split(
    rows: usize,
    sample: Option<u64>,
    holdout: f64,
    seed: u64,
) -> (Vec<usize>, Vec<bool>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut idx: Vec<usize> = (0..rows).collect();
    if let Some(n) = sample.map(|n| n as usize).filter(|&n| n < rows) {
        idx.shuffle(&mut rng);
        idx.truncate(n);
        idx.sort_unstable();
    }
    let n_holdout = ((idx.len() as f64) * holdout).floor() as usize;
    let mut order: Vec<usize> = (0..idx.len()).collect();
    order.shuffle(&mut rng);
    let mut is_holdout = vec![false; idx.len()];
    for &i in &order[..n_holdout] {
        is_holdout[i] = true;
    }
    (idx, is_holdout)
}

/// No training prompt may be a held-out prompt (the same text after normalizing case and
/// spaces): given `(id, text, held out)` rows, the first such pair is an error naming both ids.
/// `what` says what the training side is.
pub(crate) fn check_no_leak<'a>(
    rows: impl IntoIterator<Item = (&'a str, &'a str, bool)>,
    what: &str,
) -> Result<()> {
    let mut held: HashMap<String, &str> = HashMap::new();
    let mut train: Vec<(&str, String)> = Vec::new();
    for (id, text, is_held) in rows {
        let hash = prompt_hash(text);
        if is_held {
            held.entry(hash).or_insert(id);
        } else {
            train.push((id, hash));
        }
    }
    match train.iter().find_map(|(id, h)| held.get(h).map(|held_id| (id, held_id))) {
        None => Ok(()),
        Some((id, held_id)) => Err(Error::Other(format!(
            "{what} `{id}` is the held-out prompt `{held_id}` (the same text after normalizing case and spaces): a round would train on what it is measured on\nhint: remove one of the two from its file, or hold both out"
        ))),
    }
}

/// `prompts.leak_check`: the first `train` prompt whose embedding has a cosine above the
/// limit with a `held` prompt's is an error naming both ids and the similarity. Texts are
/// `(id, text)`; `what` says what the training side is.
pub(crate) async fn check_no_near_leak(
    engine: &Engine,
    train: &[(&str, &str)],
    held: &[(&str, &str)],
    what: &str,
) -> Result<()> {
    let Some(check) = &engine.spec.prompts.leak_check else {
        return Ok(());
    };
    if train.is_empty() || held.is_empty() {
        return Ok(());
    }
    let component = |source: anyhow::Error| Error::Component {
        round: 0,
        stage: "ingest",
        message: format!("`prompts.leak_check`: {source:#}"),
        source,
    };
    let embedder = engine
        .factory
        .embedder(&check.embedder)
        .map_err(component)?;
    let embed = |side: &[(&str, &str)]| {
        let texts: Vec<String> = side.iter().map(|(_, t)| t.to_string()).collect();
        embedder.embed(&texts)
    };
    let (a, b) = embed(train)
        .and_then(|a| Ok((a, embed(held)?)))
        .map_err(|err| component(err.into()))?;
    let mut worst: Option<(f32, usize, usize)> = None;
    for (i, x) in a.iter().enumerate() {
        for (j, y) in b.iter().enumerate() {
            let sim = aligner_backend::cosine(x, y);
            if f64::from(sim) > check.max_similarity && worst.is_none_or(|w| sim > w.0) {
                worst = Some((sim, i, j));
            }
        }
    }
    match worst {
        None => Ok(()),
        Some((sim, i, j)) => Err(Error::Other(format!(
            "{what} `{}` is a near-duplicate of the held-out prompt `{}` (cosine {sim:.3} by `{}`, above `prompts.leak_check.max_similarity` {}):\n  {:?}\n  {:?}\nhint: remove one of the two from its file, or hold both out",
            train[i].0,
            held[j].0,
            check.embedder.display(),
            check.max_similarity,
            train[i].1,
            held[j].1,
        ))),
    }
}

pub(crate) async fn run(engine: &Engine, run_id: i64) -> Result<()> {
    let p = &engine.spec.prompts;
    engine
        .store
        .start_stage(run_id, 0, Stage::Ingest, None)
        .await?;
    let format = match p.format {
        PromptFormat::Jsonl => Format::Jsonl,
        PromptFormat::Csv => Format::Csv,
        PromptFormat::Parquet => Format::Parquet,
    };
    let mapping = Mapping {
        prompt: p.prompt_field.clone(),
        id: p.id_field.clone(),
        system: p.system_field.clone(),
        messages: p.messages_field.clone(),
        metadata: p.metadata_fields.clone(),
    };
    let (mut records, mut report) = aligner_dataset::read_prompts(&p.source, format, &mapping)?;
    let (mut keep, mut holdout) = sample_and_split(records.len(), p.sample, p.holdout, p.seed);
    if let Some(path) = &p.holdout_source {
        // A fixed held-out file: its rows follow the (sampled) rows of `source`, all held out.
        let (fixed, fixed_report) = aligner_dataset::read_prompts(path, format, &mapping)?;
        report.rows += fixed_report.rows;
        report.skipped_empty += fixed_report.skipped_empty;
        keep.extend(records.len()..records.len() + fixed.len());
        holdout.extend(std::iter::repeat_n(true, fixed.len()));
        records.extend(fixed);
    }
    let prompts: Vec<NewPrompt> = keep
        .iter()
        .zip(&holdout)
        .enumerate()
        .map(|(i, (&row, &held))| {
            let r = &records[row];
            NewPrompt {
                idx: i as i64,
                source_id: r.source_id.clone(),
                split: if held { "holdout" } else { "train" }.into(),
                system: r.system.clone().or_else(|| p.system_prompt.clone()),
                history: crate::history_json(&r.history),
                prompt: r.prompt.clone(),
                // A conversation's hash covers its earlier turns: the same last question
                // after another conversation is another prompt.
                prompt_hash: match crate::history_json(&r.history) {
                    Some(h) => prompt_hash(&format!("{h}\n{}", r.prompt)),
                    None => prompt_hash(&r.prompt),
                },
                metadata: r.metadata.clone(),
            }
        })
        .collect();
    check_no_leak(
        prompts.iter().map(|p| {
            (
                p.source_id.as_str(),
                p.prompt.as_str(),
                p.split == "holdout",
            )
        }),
        "a round's training prompt",
    )?;
    let side = |held: bool| -> Vec<(&str, &str)> {
        prompts
            .iter()
            .filter(|p| (p.split == "holdout") == held)
            .map(|p| (p.source_id.as_str(), p.prompt.as_str()))
            .collect()
    };
    check_no_near_leak(
        engine,
        &side(false),
        &side(true),
        "a round's training prompt",
    )
    .await?;
    let n_holdout = holdout.iter().filter(|h| **h).count() as i64;
    // Prompts and the stage's completion commit separately, but a crash between them only
    // re-runs ingest on prompts that are already there: `insert_prompts` is all-or-nothing and
    // is skipped when the run already has them.
    if engine.store.count_prompts(run_id, "train").await?
        + engine.store.count_prompts(run_id, "holdout").await?
        == 0
    {
        engine.store.insert_prompts(run_id, &prompts).await?;
    }
    let total = prompts.len() as i64;
    engine
        .store
        .finish_stage(run_id, 0, Stage::Ingest, StageEnd::done(total, 0))
        .await?;
    let files = match &p.holdout_source {
        Some(held) => format!("`{}` and `{}`", p.source.display(), held.display()),
        None => format!("`{}`", p.source.display()),
    };
    let message = format!(
        "{} prompts from {files} ({} rows, {} empty skipped): {} train, {} held out",
        total,
        report.rows,
        report.skipped_empty,
        total - n_holdout,
        n_holdout
    );
    engine.observer.note(&message);
    engine
        .event(run_id, None, Some(Stage::Ingest), Level::Info, EventKind::PromptsLoaded, &message, Some(serde_json::json!({"train": total - n_holdout, "holdout": n_holdout, "skipped_empty": report.skipped_empty})))
        .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_training_prompt_equal_to_a_held_out_one_is_an_error_naming_both() {
        let rows = [
            ("a", "How do I bake bread?", false),
            ("h1", "What is rain?", true),
            ("b", "  what IS   rain? ", false),
        ];
        let err = check_no_leak(rows, "the Aligner's teaching prompt").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("the Aligner's teaching prompt `b` is the held-out prompt `h1`"),
            "{msg}"
        );
        assert!(check_no_leak(rows.into_iter().filter(|r| r.0 != "b"), "x").is_ok());
        // Repeats within one side are not a leak.
        assert!(check_no_leak([("a", "Hi", false), ("b", "hi", false)], "x").is_ok());
    }

    #[test]
    fn sampling_is_seeded_and_ordered() {
        let (a, ha) = sample_and_split(100, Some(10), 0.2, 7);
        let (b, hb) = sample_and_split(100, Some(10), 0.2, 7);
        assert_eq!((a.clone(), ha.clone()), (b, hb));
        assert_eq!(a.len(), 10);
        assert!(a.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(ha.iter().filter(|h| **h).count(), 2);
        let (c, _) = sample_and_split(100, Some(10), 0.2, 8);
        assert_ne!(a, c);
        let (all, h) = sample_and_split(5, None, 0.0, 1);
        assert_eq!(all, vec![0, 1, 2, 3, 4]);
        assert!(h.iter().all(|h| !h));
    }

    #[test]
    fn prompt_hash_ignores_case_and_spacing() {
        assert_eq!(
            prompt_hash("How  do I\nbake bread?"),
            prompt_hash("how do i bake bread?")
        );
        assert_ne!(prompt_hash("a"), prompt_hash("b"));
    }
}

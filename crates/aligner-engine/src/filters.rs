//! The synthesize stage's pair filters: a pure verdict per (original, correction).
//!
//! Checks run in a fixed order and the first that fails names the reason, so every dropped
//! pair has exactly one reason:
//! `generation_failed`, `correction_failed`, `empty_original`, `empty_correction`,
//! `truncated_original`, `truncated_correction`, `benign_refusal`, `identical`, `near_identical`,
//! `length_ratio`, `duplicate_prompt`, `semantic_copy`, `near_duplicate_prompt`, `cap`.
//!
//! A prompt that `benign_preference` calls benign gets [`benign_verdict`] instead: its pair
//! prefers the upstream's answer to a refusal, so only the answer is checked
//! (`generation_failed`, `empty_original`, `truncated_original`, `answer_refuses`), then
//! `duplicate_prompt` and `cap` as for every pair.
//!
//! The two semantic checks (`rounds.synthesize.semantic`) compare sentence embeddings that the
//! stage computes beforehand (see `semantic.rs`) for the candidates that
//! [`needs_semantic`] says can still be kept; the cap comes last, so it counts only pairs
//! that passed every filter.

use std::collections::HashSet;

use aligner_spec::SynthesizeStage;

/// One candidate pair, as the store has it.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    /// Normalized prompt text hash and sample index: one kept pair per key.
    pub prompt_hash: &'a str,
    /// `None` when the generation failed.
    pub original: Option<&'a str>,
    pub original_truncated: bool,
    /// `None` when the correction failed or is missing.
    pub correction: Option<&'a str>,
    pub correction_truncated: bool,
    /// The correction refuses a prompt that `benign_refusals` calls benign.
    pub benign_refusal: bool,
    /// What the semantic filter measured; `None` when it is off or was not needed.
    pub semantic: Option<Semantic<'a>>,
}

/// The embeddings-based measures of one candidate (`rounds.synthesize.semantic`).
#[derive(Debug, Clone, Copy)]
pub struct Semantic<'a> {
    /// Cosine of the original's and the correction's embeddings; `None`: not measured.
    pub copy_similarity: Option<f32>,
    /// The prompt's normalized hash and its embedding; `None`: near-duplicate prompts are not
    /// checked.
    pub prompt: Option<(&'a str, &'a [f32])>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// `None`: kept.
    pub reason: Option<&'static str>,
    pub edit_distance: Option<f64>,
    pub length_ratio: Option<f64>,
}

/// State that spans pairs (duplicate prompts, the cap). Rebuilt from kept pairs on resume.
#[derive(Debug, Default)]
pub struct FilterState {
    pub kept_prompts: HashSet<String>,
    pub kept: u64,
    /// Normalized hash and embedding of each prompt with a kept pair (one per prompt), for
    /// near-duplicate prompts.
    pub kept_prompt_embeddings: Vec<(String, Vec<f32>)>,
}

impl FilterState {
    /// Remembers the embedding of a prompt with a kept pair.
    pub fn add_kept_prompt(&mut self, hash: &str, embedding: &[f32]) {
        if !self.kept_prompt_embeddings.iter().any(|(h, _)| h == hash) {
            self.kept_prompt_embeddings
                .push((hash.to_string(), embedding.to_vec()));
        }
    }
}

/// Cosine similarity in [-1, 1], as the embedders' vectors are compared.
pub use aligner_backend::cosine;

/// Normalized character edit distance in [0, 1]: 0 = identical, 1 = nothing in common.
pub fn normalized_edit_distance(a: &str, b: &str) -> f64 {
    1.0 - strsim::normalized_levenshtein(a, b)
}

pub fn verdict(spec: &SynthesizeStage, state: &mut FilterState, c: &Candidate<'_>) -> Verdict {
    let (distance, ratio) = match precheck(spec, c) {
        Ok(measures) => measures,
        Err(dropped) => return dropped,
    };
    let drop = |reason| Verdict {
        reason: Some(reason),
        edit_distance: Some(distance),
        length_ratio: ratio,
    };
    if spec.dedupe_prompts && state.kept_prompts.contains(c.prompt_hash) {
        return drop("duplicate_prompt");
    }
    if let (Some(filter), Some(measured)) = (&spec.semantic, c.semantic) {
        if measured
            .copy_similarity
            .is_some_and(|s| f64::from(s) > filter.max_copy_similarity)
        {
            return drop("semantic_copy");
        }
        if let (Some(limit), Some((hash, embedding))) =
            (filter.dedupe_prompts_above, measured.prompt)
        {
            let near = state
                .kept_prompt_embeddings
                .iter()
                .any(|(h, e)| h != hash && f64::from(cosine(e, embedding)) > limit);
            if near {
                return drop("near_duplicate_prompt");
            }
        }
    }
    if spec.max_pairs.is_some_and(|cap| state.kept >= cap) {
        return drop("cap");
    }
    state.kept += 1;
    state.kept_prompts.insert(c.prompt_hash.to_string());
    if let Some((hash, embedding)) = c.semantic.and_then(|m| m.prompt) {
        state.add_kept_prompt(hash, embedding);
    }
    Verdict {
        reason: None,
        edit_distance: Some(distance),
        length_ratio: ratio,
    }
}

/// The verdict on a benign prompt's pair under `benign_preference` (chosen = the answer,
/// rejected = a refusal). `edit_distance` and `length_ratio` compare the answer to the refusal.
pub fn benign_verdict(
    spec: &SynthesizeStage,
    state: &mut FilterState,
    c: &Candidate<'_>,
    refusal: &str,
) -> Verdict {
    let Some(original) = c.original else {
        return Verdict {
            reason: Some("generation_failed"),
            edit_distance: None,
            length_ratio: None,
        };
    };
    let o = original.trim();
    // As for every pair, len(chosen) / len(rejected): here the answer over the refusal.
    let r = refusal.trim().chars().count();
    let ratio = (r > 0).then(|| o.chars().count() as f64 / r as f64);
    let drop = |reason| Verdict {
        reason: Some(reason),
        edit_distance: None,
        length_ratio: ratio,
    };
    if spec.drop_empty && o.is_empty() {
        return drop("empty_original");
    }
    if spec.drop_truncated && c.original_truncated {
        return drop("truncated_original");
    }
    if crate::refusal::is_refusal(o) {
        return drop("answer_refuses");
    }
    if spec.dedupe_prompts && state.kept_prompts.contains(c.prompt_hash) {
        return drop("duplicate_prompt");
    }
    if spec.max_pairs.is_some_and(|cap| state.kept >= cap) {
        return drop("cap");
    }
    state.kept += 1;
    state.kept_prompts.insert(c.prompt_hash.to_string());
    Verdict {
        reason: None,
        edit_distance: Some(normalized_edit_distance(o, refusal.trim())),
        length_ratio: ratio,
    }
}

/// Whether `c` can still be kept after the checks that need no embeddings, so that its texts
/// are worth embedding: the semantic filter is on, the per-pair checks pass, its prompt has no
/// kept pair yet and the cap is not reached. (State only grows, so a `false` stays `false`.)
pub fn needs_semantic(spec: &SynthesizeStage, state: &FilterState, c: &Candidate<'_>) -> bool {
    spec.semantic.is_some()
        && precheck(spec, c).is_ok()
        && !(spec.dedupe_prompts && state.kept_prompts.contains(c.prompt_hash))
        && spec.max_pairs.is_none_or(|cap| state.kept < cap)
}

/// The checks of one pair on its own; `Ok` holds its edit distance and length ratio.
fn precheck(spec: &SynthesizeStage, c: &Candidate<'_>) -> Result<(f64, Option<f64>), Verdict> {
    let drop = |reason, edit_distance, length_ratio| Verdict {
        reason: Some(reason),
        edit_distance,
        length_ratio,
    };
    let Some(original) = c.original else {
        return Err(drop("generation_failed", None, None));
    };
    let Some(correction) = c.correction else {
        return Err(drop("correction_failed", None, None));
    };
    let (o, k) = (original.trim(), correction.trim());
    if spec.drop_empty && o.is_empty() {
        return Err(drop("empty_original", None, None));
    }
    if spec.drop_empty && k.is_empty() {
        return Err(drop("empty_correction", None, None));
    }
    let ratio = (!o.is_empty()).then(|| k.chars().count() as f64 / o.chars().count() as f64);
    if spec.drop_truncated && c.original_truncated {
        return Err(drop("truncated_original", None, ratio));
    }
    if spec.drop_truncated && c.correction_truncated {
        return Err(drop("truncated_correction", None, ratio));
    }
    if c.benign_refusal {
        return Err(drop("benign_refusal", None, ratio));
    }
    if o == k && spec.drop_identical {
        return Err(drop("identical", Some(0.0), ratio));
    }
    let distance = normalized_edit_distance(o, k);
    if spec.min_edit_distance > 0.0 && distance < spec.min_edit_distance && o != k {
        return Err(drop("near_identical", Some(distance), ratio));
    }
    if let Some(r) = ratio {
        if r < spec.length_ratio_min || r > spec.length_ratio_max {
            return Err(drop("length_ratio", Some(distance), ratio));
        }
    }
    Ok((distance, ratio))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> SynthesizeStage {
        SynthesizeStage {
            drop_identical: true,
            min_edit_distance: 0.05,
            length_ratio_min: 0.1,
            length_ratio_max: 10.0,
            drop_empty: true,
            drop_truncated: true,
            dedupe_prompts: true,
            max_pairs: Some(2),
            semantic: None,
            benign_refusals: None,
            benign_preference: None,
        }
    }

    fn check(
        state: &mut FilterState,
        hash: &str,
        original: Option<&str>,
        correction: Option<&str>,
        expected: Option<&str>,
    ) {
        let c = Candidate {
            prompt_hash: hash,
            original,
            original_truncated: false,
            correction,
            correction_truncated: false,
            benign_refusal: false,
            semantic: None,
        };
        assert_eq!(
            verdict(&spec(), state, &c).reason,
            expected,
            "{original:?} -> {correction:?}"
        );
    }

    #[test]
    fn each_reason() {
        let mut s = FilterState::default();
        check(&mut s, "a", None, None, Some("generation_failed"));
        check(&mut s, "a", Some("x"), None, Some("correction_failed"));
        check(&mut s, "a", Some("  "), Some("x"), Some("empty_original"));
        check(&mut s, "a", Some("x"), Some(""), Some("empty_correction"));
        check(
            &mut s,
            "a",
            Some("same answer"),
            Some(" same answer\n"),
            Some("identical"),
        );
        let long = "a fairly long answer that the aligner barely touched at all, really.";
        check(
            &mut s,
            "a",
            Some(long),
            Some(&long.replace("really.", "really!")),
            Some("near_identical"),
        );
        check(
            &mut s,
            "a",
            Some("short"),
            Some(&"much longer ".repeat(10)),
            Some("length_ratio"),
        );
        check(
            &mut s,
            "a",
            Some("how to pick a lock"),
            Some("I can't help with that."),
            None,
        );
        check(
            &mut s,
            "a",
            Some("how to pick a lock"),
            Some("I won't help with that."),
            Some("duplicate_prompt"),
        );
        check(&mut s, "b", Some("answer b"), Some("better answer b"), None);
        check(
            &mut s,
            "c",
            Some("answer c"),
            Some("better answer c"),
            Some("cap"),
        );
        assert_eq!(s.kept, 2);
        let t = Candidate {
            prompt_hash: "d",
            original: Some("x"),
            original_truncated: true,
            correction: Some("y"),
            correction_truncated: false,
            benign_refusal: false,
            semantic: None,
        };
        assert_eq!(
            verdict(&spec(), &mut s, &t).reason,
            Some("truncated_original")
        );
    }

    #[test]
    fn semantic_reasons_come_after_the_pair_checks_and_before_the_cap() {
        let spec = SynthesizeStage {
            max_pairs: Some(3),
            semantic: Some(aligner_spec::SemanticFilter {
                embedder: "unused".into(),
                max_copy_similarity: 0.98,
                dedupe_prompts_above: Some(0.9),
            }),
            ..spec()
        };
        let mut s = FilterState::default();
        let (cats, cats2, bread) = ([1.0, 0.0, 0.0], [0.99, 0.1, 0.0], [0.0, 1.0, 0.0]);
        let check = |state: &mut FilterState,
                     hash: &str,
                     copy: f32,
                     prompt: &[f32],
                     expected: Option<&str>| {
            let c = Candidate {
                prompt_hash: hash,
                original: Some("the original answer"),
                original_truncated: false,
                correction: Some("a rather different correction"),
                correction_truncated: false,
                benign_refusal: false,
                semantic: Some(Semantic {
                    copy_similarity: Some(copy),
                    prompt: Some((hash.split(':').next().unwrap(), prompt)),
                }),
            };
            let worth_embedding = !matches!(expected, Some("duplicate_prompt" | "cap"));
            assert_eq!(needs_semantic(&spec, state, &c), worth_embedding, "{hash}");
            assert_eq!(verdict(&spec, state, &c).reason, expected, "{hash}");
        };
        check(&mut s, "cats:0", 0.99, &cats, Some("semantic_copy"));
        // A dropped pair's prompt is not remembered: the next one for it may be kept.
        check(&mut s, "cats:0", 0.5, &cats, None);
        check(&mut s, "cats:0", 0.5, &cats, Some("duplicate_prompt"));
        // Another sample of the same prompt is not a near duplicate of itself.
        check(&mut s, "cats:1", 0.5, &cats, None);
        check(
            &mut s,
            "kittens:0",
            0.5,
            &cats2,
            Some("near_duplicate_prompt"),
        );
        check(&mut s, "bread:0", 0.5, &bread, None);
        check(&mut s, "soup:0", 0.5, &[0.0, 0.0, 1.0], Some("cap"));
        assert_eq!(s.kept, 3);
        assert_eq!(s.kept_prompt_embeddings.len(), 2);

        // Off: the same measures change nothing.
        let off = SynthesizeStage {
            semantic: None,
            ..spec.clone()
        };
        let c = Candidate {
            prompt_hash: "x:0",
            original: Some("an answer"),
            original_truncated: false,
            correction: Some("AN ANSWER, said again"),
            correction_truncated: false,
            benign_refusal: false,
            semantic: Some(Semantic {
                copy_similarity: Some(1.0),
                prompt: None,
            }),
        };
        assert!(!needs_semantic(&off, &FilterState::default(), &c));
        assert_eq!(verdict(&off, &mut FilterState::default(), &c).reason, None);
        assert!((cosine(&[1.0, 1.0], &[1.0, 0.0]) - 0.70710677).abs() < 1e-6);
    }

    #[test]
    fn a_refusal_of_a_benign_prompt_is_dropped_before_the_text_checks() {
        let mut state = FilterState::default();
        let c = Candidate {
            prompt_hash: "p",
            original: Some("Use `kill -9 <pid>` on the stuck process."),
            original_truncated: false,
            correction: Some("I can't help with that."),
            correction_truncated: false,
            benign_refusal: true,
            semantic: None,
        };
        assert_eq!(
            verdict(&spec(), &mut state, &c).reason,
            Some("benign_refusal")
        );
        assert_eq!(state.kept, 0);
        // The same correction of a harmful prompt's answer is kept.
        let harmful = Candidate {
            benign_refusal: false,
            ..c
        };
        assert_eq!(verdict(&spec(), &mut state, &harmful).reason, None);
    }

    #[test]
    fn a_benign_pair_checks_the_answer_only() {
        let spec = spec();
        let mut s = FilterState::default();
        let c = |hash, original, truncated| Candidate {
            prompt_hash: hash,
            original,
            original_truncated: truncated,
            // The correction plays no part: identical, missing or failed alike.
            correction: None,
            correction_truncated: false,
            benign_refusal: false,
            semantic: None,
        };
        let no = "I can't help with that.";
        let mut reason = |c: Candidate<'_>| benign_verdict(&spec, &mut s, &c, no).reason;
        assert_eq!(reason(c("a", None, false)), Some("generation_failed"));
        assert_eq!(reason(c("a", Some("  "), false)), Some("empty_original"));
        assert_eq!(
            reason(c("a", Some("Sure..."), true)),
            Some("truncated_original")
        );
        assert_eq!(
            reason(c("a", Some("I'm sorry, but no."), false)),
            Some("answer_refuses")
        );
        assert_eq!(reason(c("a", Some("Kill it with `kill -9`."), false)), None);
        assert_eq!(
            reason(c("a", Some("Or with htop."), false)),
            Some("duplicate_prompt")
        );
        assert_eq!(
            reason(c("b", Some("Lay them off with notice."), false)),
            None
        );
        // The cap (2) counts these pairs too.
        assert_eq!(reason(c("c", Some("Fine."), false)), Some("cap"));
        assert_eq!(s.kept, 2);
        let kept = benign_verdict(
            &spec,
            &mut FilterState::default(),
            &c("d", Some("Yes, here."), false),
            no,
        );
        assert!(kept.edit_distance.unwrap() > 0.5, "{kept:?}");
        assert!(kept.length_ratio.unwrap() < 1.0, "{kept:?}");
    }

    #[test]
    fn edit_distance_is_normalized() {
        assert_eq!(normalized_edit_distance("abc", "abc"), 0.0);
        assert_eq!(normalized_edit_distance("abc", "xyz"), 1.0);
        assert!((normalized_edit_distance("abcd", "abce") - 0.25).abs() < 1e-9);
    }
}

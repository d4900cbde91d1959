//! The synthesize stage's pair filters: a pure verdict per (original, correction).
//!
//! Checks run in a fixed order and the first that fails names the reason, so every dropped
//! pair has exactly one reason:
//! `generation_failed`, `correction_failed`, `empty_original`, `empty_correction`,
//! `truncated_original`, `truncated_correction`, `identical`, `near_identical`,
//! `length_ratio`, `duplicate_prompt`, `cap`.

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
}

/// Normalized character edit distance in [0, 1]: 0 = identical, 1 = nothing in common.
pub fn normalized_edit_distance(a: &str, b: &str) -> f64 {
    1.0 - strsim::normalized_levenshtein(a, b)
}

pub fn verdict(spec: &SynthesizeStage, state: &mut FilterState, c: &Candidate<'_>) -> Verdict {
    let drop = |reason, edit_distance, length_ratio| Verdict {
        reason: Some(reason),
        edit_distance,
        length_ratio,
    };
    let Some(original) = c.original else {
        return drop("generation_failed", None, None);
    };
    let Some(correction) = c.correction else {
        return drop("correction_failed", None, None);
    };
    let (o, k) = (original.trim(), correction.trim());
    if spec.drop_empty && o.is_empty() {
        return drop("empty_original", None, None);
    }
    if spec.drop_empty && k.is_empty() {
        return drop("empty_correction", None, None);
    }
    let ratio = (!o.is_empty()).then(|| k.chars().count() as f64 / o.chars().count() as f64);
    if spec.drop_truncated && c.original_truncated {
        return drop("truncated_original", None, ratio);
    }
    if spec.drop_truncated && c.correction_truncated {
        return drop("truncated_correction", None, ratio);
    }
    if o == k {
        let d = Some(0.0);
        if spec.drop_identical {
            return drop("identical", d, ratio);
        }
    }
    let distance = normalized_edit_distance(o, k);
    if spec.min_edit_distance > 0.0 && distance < spec.min_edit_distance && o != k {
        return drop("near_identical", Some(distance), ratio);
    }
    if let Some(r) = ratio {
        if r < spec.length_ratio_min || r > spec.length_ratio_max {
            return drop("length_ratio", Some(distance), ratio);
        }
    }
    if spec.dedupe_prompts && state.kept_prompts.contains(c.prompt_hash) {
        return drop("duplicate_prompt", Some(distance), ratio);
    }
    if spec.max_pairs.is_some_and(|cap| state.kept >= cap) {
        return drop("cap", Some(distance), ratio);
    }
    state.kept += 1;
    state.kept_prompts.insert(c.prompt_hash.to_string());
    Verdict {
        reason: None,
        edit_distance: Some(distance),
        length_ratio: ratio,
    }
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
        };
        assert_eq!(
            verdict(&spec(), &mut s, &t).reason,
            Some("truncated_original")
        );
    }

    #[test]
    fn edit_distance_is_normalized() {
        assert_eq!(normalized_edit_distance("abc", "abc"), 0.0);
        assert_eq!(normalized_edit_distance("abc", "xyz"), 1.0);
        assert!((normalized_edit_distance("abcd", "abce") - 0.25).abs() < 1e-9);
    }
}

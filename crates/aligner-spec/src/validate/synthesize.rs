//! `rounds.synthesize:` ([`SynthesizeWire`], [`SemanticWire`]): the pair filters and the
//! embedder they use.

use std::path::PathBuf;

use super::{list, Ctx};
use crate::position::{join, Anchor};
use crate::types::*;
use crate::wire::*;

impl Ctx<'_> {
    pub(super) fn synthesize(&mut self, w: SynthesizeWire) -> SynthesizeStage {
        let min_edit_distance = w.min_edit_distance.unwrap_or(0.05);
        self.expect(
            "rounds.synthesize.min_edit_distance",
            (0.0..=1.0).contains(&min_edit_distance),
            "between 0 and 1",
            min_edit_distance,
        );
        let (mut lo, mut hi) = (0.1, 10.0);
        if let Some(ratio) = &w.length_ratio {
            let path = "rounds.synthesize.length_ratio";
            match ratio[..] {
                [a, b] => {
                    (lo, hi) = (a, b);
                    let ok = a.is_finite() && b.is_finite() && a > 0.0 && b > 0.0 && a < b;
                    if !ok {
                        self.err(path, Anchor::Value, format!("`length_ratio` must be `[min, max]` with 0 < min < max, got `[{a}, {b}]`"), None);
                    }
                }
                _ => self.err(
                    path,
                    Anchor::Value,
                    format!(
                        "`length_ratio` must have two numbers `[min, max]`, got {}",
                        ratio.len()
                    ),
                    Some("e.g. `length_ratio: [0.1, 10]`".into()),
                ),
            }
        }
        if let Some(m) = w.max_pairs {
            self.expect("rounds.synthesize.max_pairs", m >= 1, "at least 1", m);
        }
        let semantic = w.semantic.as_ref().and_then(|s| self.semantic(s));
        let benign_preference = w
            .benign_preference
            .as_ref()
            .map(|b| self.benign_preference(b));
        if w.benign_refusals.is_some() && benign_preference.is_some() {
            self.err(
                "rounds.synthesize.benign_refusals",
                Anchor::Key,
                "both `benign_refusals` and `benign_preference` are set",
                Some("`benign_preference` already turns the Aligner's refusals of benign prompts into pairs that prefer the answer: remove `benign_refusals`".into()),
            );
        }
        SynthesizeStage {
            drop_identical: w.drop_identical.unwrap_or(true),
            min_edit_distance,
            length_ratio_min: lo,
            length_ratio_max: hi,
            drop_empty: w.drop_empty.unwrap_or(true),
            drop_truncated: w.drop_truncated.unwrap_or(true),
            dedupe_prompts: w.dedupe_prompts.unwrap_or(true),
            max_pairs: w.max_pairs,
            semantic,
            benign_refusals: w
                .benign_refusals
                .as_ref()
                .map(|l| self.label_rule("rounds.synthesize.benign_refusals", l)),
            benign_preference,
        }
    }

    /// `rounds.synthesize.benign_preference`: a labels rule and the refusal texts (default the
    /// refusal teacher's), none of them empty.
    fn benign_preference(&mut self, w: &BenignPreferenceWire) -> BenignPreference {
        let path = "rounds.synthesize.benign_preference";
        let labels = self.label_rule(
            path,
            &LabelsWire {
                field: w.field.clone(),
                harmful: w.harmful.clone(),
            },
        );
        let refusals = match &w.refusals {
            Some(texts) => {
                if texts.is_empty() || texts.iter().any(|t| t.trim().is_empty()) {
                    self.err(
                        &join(path, "refusals"),
                        Anchor::Value,
                        "`refusals` must list at least one text, none of them empty",
                        Some("leave it out to use the refusal teacher's texts".into()),
                    );
                }
                texts.clone()
            }
            None => crate::REFUSAL_TEXTS.iter().map(|t| t.to_string()).collect(),
        };
        if let Some(r) = w.max_ratio {
            self.expect(
                &join(path, "max_ratio"),
                r >= 0.0 && r.is_finite(),
                "at least 0",
                r,
            );
        }
        BenignPreference {
            labels,
            refusals,
            max_ratio: w.max_ratio,
        }
    }

    /// `rounds.synthesize.semantic`: the embedder folder must hold a sentence-transformers
    /// model, the thresholds must be cosines in (0, 1].
    fn semantic(&mut self, w: &SemanticWire) -> Option<SemanticFilter> {
        let p = |f: &str| join("rounds.synthesize.semantic", f);
        let errors_before = self.errors.len();
        let max_copy_similarity = w.max_copy_similarity.unwrap_or(0.98);
        let in_range = |v: f64| v > 0.0 && v <= 1.0;
        self.expect(
            &p("max_copy_similarity"),
            in_range(max_copy_similarity),
            "more than 0 and at most 1",
            max_copy_similarity,
        );
        if let Some(t) = w.dedupe_prompts_above {
            self.expect(
                &p("dedupe_prompts_above"),
                in_range(t),
                "more than 0 and at most 1",
                t,
            );
        }
        let embedder = self.embedder_path(&p("embedder"), &w.embedder);
        if self.errors.len() != errors_before {
            return None;
        }
        Some(SemanticFilter {
            embedder: embedder?,
            max_copy_similarity,
            dedupe_prompts_above: w.dedupe_prompts_above,
        })
    }

    /// Checks an embedder folder: `config.json`, `model.safetensors` and `tokenizer.json`.
    pub(super) fn embedder_path(&mut self, path: &str, text: &str) -> Option<PathBuf> {
        let (shown, resolved) = self.path_value(path, text)?;
        let hint = Some(format!(
            "resolved to `{}`; `aligner models fetch` puts all-MiniLM-L6-v2 into `models/all-MiniLM-L6-v2`",
            resolved.display()
        ));
        if !resolved.is_dir() {
            let what = if resolved.exists() {
                "is not a folder"
            } else {
                "does not exist"
            };
            self.err(
                path,
                Anchor::Value,
                format!("embedder folder `{shown}` {what}"),
                hint,
            );
            return None;
        }
        let missing: Vec<&str> = ["config.json", "model.safetensors", "tokenizer.json"]
            .into_iter()
            .filter(|f| !resolved.join(f).is_file())
            .collect();
        if !missing.is_empty() {
            self.err(
                path,
                Anchor::Value,
                format!("embedder folder `{shown}` is missing {}", list(&missing)),
                hint,
            );
            return None;
        }
        Some(resolved)
    }
}

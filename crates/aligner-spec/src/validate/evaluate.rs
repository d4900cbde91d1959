//! `rounds.evaluate:` ([`EvaluateWire`], [`GateWire`], [`LabelsWire`]).

use std::collections::BTreeMap;

use super::models::ModelEntry;
use super::{did_you_mean, list, Ctx};
use crate::position::{join, Anchor};
use crate::types::*;
use crate::wire::*;

impl Ctx<'_> {
    /// `rounds.evaluate`.
    pub(super) fn evaluate(
        &mut self,
        w: &EvaluateWire,
        models: Option<&BTreeMap<String, ModelEntry>>,
        trains: bool,
    ) -> EvaluateStage {
        if let Some(judge) = &w.judge {
            self.model_ref("rounds.evaluate.judge", judge, models);
        }
        let mut aspects = Vec::new();
        for a in w
            .aspects
            .clone()
            .unwrap_or_else(|| vec!["helpfulness".into(), "harmlessness".into()])
        {
            match JudgeAspect::ALL.iter().find(|x| x.as_str() == a) {
                Some(x) if !aspects.contains(x) => aspects.push(*x),
                Some(_) => {}
                None => self.err(
                    "rounds.evaluate.aspects",
                    Anchor::Value,
                    format!("unknown aspect `{a}`"),
                    Some("aspects are helpfulness, harmlessness, empathy, summary".into()),
                ),
            }
        }
        if w.judge.is_some() && aspects.is_empty() && w.aspects.is_some() {
            self.err(
                "rounds.evaluate.aspects",
                Anchor::Value,
                "`aspects` is empty, so the judge would never be asked",
                Some("list at least one: helpfulness, harmlessness, empathy, summary".into()),
            );
        }
        // Without training every round's model is the upstream: only the Aligner comparison
        // means anything.
        let default_compare: Vec<String> = if trains {
            Comparison::ALL
                .iter()
                .map(|c| c.as_str().to_string())
                .collect()
        } else {
            vec!["aligner".into()]
        };
        let mut compare = Vec::new();
        for c in w.compare.clone().unwrap_or(default_compare) {
            if !trains && (c == "initial" || c == "previous") {
                self.err(
                    "rounds.evaluate.compare",
                    Anchor::Value,
                    format!("`{c}` compares the models of different rounds, and these rounds do not train"),
                    Some("add `rounds.train`, or compare only `aligner`".into()),
                );
                continue;
            }
            match Comparison::ALL.iter().find(|x| x.as_str() == c) {
                Some(x) if !compare.contains(x) => compare.push(*x),
                Some(_) => {}
                None => self.err(
                    "rounds.evaluate.compare",
                    Anchor::Value,
                    format!("unknown comparison `{c}`"),
                    Some("comparisons are aligner (the model with and without the Aligner), initial (round k vs the initial model), previous (round k vs round k-1)".into()),
                ),
            }
        }
        let sampling = w
            .sampling
            .as_ref()
            .map(|s| self.sampling("rounds.evaluate.sampling", s));
        let judge_sampling = match &w.judge_sampling {
            Some(s) => self.sampling("rounds.evaluate.judge_sampling", s),
            None => Sampling {
                temperature: Some(0.0),
                max_tokens: Some(512),
                ..Default::default()
            },
        };
        let labels = w
            .labels
            .as_ref()
            .map(|l| self.label_rule("rounds.evaluate.labels", l));
        let bootstrap = w.bootstrap.unwrap_or(1000);
        self.expect(
            "rounds.evaluate.bootstrap",
            (100..=100_000).contains(&bootstrap),
            "between 100 and 100000",
            bootstrap,
        );
        let gate = w.gate.as_ref().and_then(|g| {
            let mut names = vec!["refusal_rate".to_string(), "over_refusal".to_string()];
            if w.judge.is_some() {
                for a in &aspects {
                    for c in &compare {
                        names.push(format!("omega.{}.{}", a.as_str(), c.as_str()));
                    }
                }
            }
            if !names.contains(&g.metric) {
                let hint = match did_you_mean(&g.metric, names.iter().map(String::as_str)) {
                    Some(m) => format!("did you mean `{m}`?"),
                    None => format!("metrics this block computes: {}", list(&names.iter().map(String::as_str).collect::<Vec<_>>())),
                };
                self.err("rounds.evaluate.gate.metric", Anchor::Value, format!("`{}` is not a metric this evaluation computes", g.metric), Some(hint));
            }
            if (g.metric.starts_with("refusal_rate") || g.metric.starts_with("over_refusal"))
                && labels.is_none() {
                    self.err(
                        "rounds.evaluate.gate.metric",
                        Anchor::Value,
                        format!("`{}` needs `rounds.evaluate.labels`", g.metric),
                        Some("say which held-out prompts are harmful: `labels: { field: source, harmful: [strongreject] }`".into()),
                    );
                }
            self.expect(
                "rounds.evaluate.gate.max_drop",
                g.max_drop.is_finite() && g.max_drop >= 0.0,
                "a number of at least 0",
                g.max_drop,
            );
            let action = match g.action.as_deref().unwrap_or("stop") {
                "stop" => GateAction::Stop,
                "rollback" if !trains => {
                    self.err(
                        "rounds.evaluate.gate.action",
                        Anchor::Value,
                        "`rollback` returns to an earlier round's model, and these rounds do not train",
                        Some("use `action: stop`, or add `rounds.train`".into()),
                    );
                    return None;
                }
                "rollback" => GateAction::Rollback,
                other => {
                    self.err(
                        "rounds.evaluate.gate.action",
                        Anchor::Value,
                        format!("unknown action `{other}`"),
                        Some("actions are stop (end the run) and rollback (continue from the best round's model)".into()),
                    );
                    return None;
                }
            };
            Some(Gate {
                metric: g.metric.clone(),
                max_drop: g.max_drop,
                action,
            })
        });
        EvaluateStage {
            judge: w.judge.clone(),
            aspects,
            compare,
            sampling,
            judge_sampling,
            labels,
            bootstrap,
            seed: w.seed.unwrap_or(0),
            gate,
        }
    }
}

impl Ctx<'_> {
    /// A `{field, harmful}` rule at `path`: the field named, at least one harmful value.
    pub(super) fn label_rule(&mut self, path: &str, l: &LabelsWire) -> LabelRule {
        let p = |f: &str| join(path, f);
        if l.field.trim().is_empty() {
            self.err(&p("field"), Anchor::Value, "`field` is empty", None);
        }
        if l.harmful.is_empty() {
            self.err(
                &p("harmful"),
                Anchor::Value,
                "`harmful` lists no value",
                Some("list the values of `field` that mark a harmful prompt, e.g. `[strongreject, harmbench]`".into()),
            );
        }
        LabelRule {
            field: l.field.clone(),
            harmful: l.harmful.clone(),
        }
    }
}

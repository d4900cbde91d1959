//! The pure planner: given the spec's shape and what the store says has finished, the next
//! piece of work. No IO here, so resume-after-crash is a replay tests can drive directly.

use std::collections::BTreeSet;

/// The stages of a run: the store's vocabulary, which the planner orders (ingest, the
/// Aligner's three stages in round 0, then each round's).
pub use aligner_store::Stage;

/// The shape of a run, as far as planning goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub rounds: u32,
    pub train: bool,
    /// Each round ends with `evaluate` (`rounds.evaluate`).
    pub evaluate: bool,
    /// The pipeline trains its own Aligner first (round 0).
    pub aligner: bool,
}

/// The stages of round 0, when the pipeline trains its own Aligner.
pub const ALIGNER_STAGES: [Stage; 3] = [Stage::Teach, Stage::TrainAligner, Stage::EvaluateAligner];

impl Plan {
    pub fn stages(&self) -> Vec<Stage> {
        let mut s = vec![Stage::Generate, Stage::Correct, Stage::Synthesize];
        if self.train {
            s.push(Stage::Train);
        }
        if self.evaluate {
            s.push(Stage::Evaluate);
        }
        s
    }
}

/// What has finished, read from the store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Finished {
    pub ingested: bool,
    pub stages: BTreeSet<(u32, Stage)>,
    pub rounds: BTreeSet<u32>,
    /// The round after which the evaluation's gate stopped the run.
    pub stopped_after: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Load the prompt set into the store.
    Ingest,
    Stage {
        round: u32,
        stage: Stage,
    },
    /// Every stage of the round is done: mark it.
    FinishRound(u32),
    /// Every round is done.
    FinishRun,
}

/// The next step to take.
pub fn next_step(plan: &Plan, finished: &Finished) -> Step {
    if !finished.ingested {
        return Step::Ingest;
    }
    if plan.aligner {
        for stage in ALIGNER_STAGES {
            if !finished.stages.contains(&(0, stage)) {
                return Step::Stage { round: 0, stage };
            }
        }
    }
    for round in 1..=plan.rounds {
        if finished.rounds.contains(&round) {
            if finished.stopped_after == Some(round) {
                return Step::FinishRun;
            }
            continue;
        }
        for stage in plan.stages() {
            if !finished.stages.contains(&(round, stage)) {
                return Step::Stage { round, stage };
            }
        }
        return Step::FinishRound(round);
    }
    Step::FinishRun
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Replays a run step by step, "crashing" after every step and re-planning from what
    /// finished, and returns the sequence of steps. A correct planner never repeats one.
    fn replay(plan: &Plan) -> Vec<Step> {
        let mut finished = Finished::default();
        let mut steps = Vec::new();
        loop {
            let step = next_step(plan, &finished);
            steps.push(step);
            match step {
                Step::Ingest => finished.ingested = true,
                Step::Stage { round, stage } => {
                    finished.stages.insert((round, stage));
                }
                Step::FinishRound(r) => {
                    finished.rounds.insert(r);
                }
                Step::FinishRun => return steps,
            }
        }
    }

    /// Evaluation ends every round; a gate that stopped the run after round 2 of 3 skips
    /// round 3 (once round 2 is marked finished).
    #[test]
    fn evaluation_and_a_stopping_gate() {
        use Stage::*;
        let plan = Plan {
            rounds: 3,
            train: true,
            evaluate: true,
            aligner: false,
        };
        assert_eq!(
            plan.stages(),
            vec![Generate, Correct, Synthesize, Train, Evaluate]
        );
        let mut finished = Finished {
            ingested: true,
            ..Default::default()
        };
        for round in 1..=2 {
            for stage in plan.stages() {
                finished.stages.insert((round, stage));
            }
        }
        finished.rounds.insert(1);
        finished.stopped_after = Some(2);
        assert_eq!(next_step(&plan, &finished), Step::FinishRound(2));
        finished.rounds.insert(2);
        assert_eq!(next_step(&plan, &finished), Step::FinishRun);
        finished.stopped_after = None;
        assert_eq!(
            next_step(&plan, &finished),
            Step::Stage {
                round: 3,
                stage: Generate
            }
        );
    }

    #[test]
    fn two_rounds_with_training() {
        let steps = replay(&Plan {
            rounds: 2,
            train: true,
            evaluate: false,
            aligner: false,
        });
        use Stage::*;
        let st = |round, stage| Step::Stage { round, stage };
        assert_eq!(
            steps,
            vec![
                Step::Ingest,
                st(1, Generate),
                st(1, Correct),
                st(1, Synthesize),
                st(1, Train),
                Step::FinishRound(1),
                st(2, Generate),
                st(2, Correct),
                st(2, Synthesize),
                st(2, Train),
                Step::FinishRound(2),
                Step::FinishRun
            ]
        );
    }

    #[test]
    fn the_aligner_is_trained_once_before_round_one() {
        let steps = replay(&Plan {
            rounds: 1,
            train: false,
            evaluate: false,
            aligner: true,
        });
        use Stage::*;
        let st = |round, stage| Step::Stage { round, stage };
        assert_eq!(
            steps,
            vec![
                Step::Ingest,
                st(0, Teach),
                st(0, TrainAligner),
                st(0, EvaluateAligner),
                st(1, Generate),
                st(1, Correct),
                st(1, Synthesize),
                Step::FinishRound(1),
                Step::FinishRun
            ]
        );
    }

    #[test]
    fn resume_continues_where_the_store_says() {
        let plan = Plan {
            rounds: 3,
            train: false,
            evaluate: false,
            aligner: false,
        };
        let mut finished = Finished {
            ingested: true,
            ..Default::default()
        };
        finished.rounds.insert(1);
        finished.stages.insert((2, Stage::Generate));
        assert_eq!(
            next_step(&plan, &finished),
            Step::Stage {
                round: 2,
                stage: Stage::Correct
            }
        );
        // A stage of a finished round is never redone, even if its row were missing.
        finished.stages.clear();
        assert_eq!(
            next_step(&plan, &finished),
            Step::Stage {
                round: 2,
                stage: Stage::Generate
            }
        );
    }
}

//! The domain's closed vocabularies: the stages of a round and the statuses, verdicts and
//! decisions the store records. Each is one Rust enum with one mapping to the text the SQLite
//! columns hold (and their `CHECK` constraints allow), used by the store's rows and API, the
//! engine, the daemon and the report alike; the JSON they serialize to is that same text.

use std::fmt;
use std::str::FromStr;

/// A text that is not one of an enum's values, as read from a column or an argument.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{value}` is not a {what} (expected one of: {expected})")]
pub struct UnknownValue {
    pub what: &'static str,
    pub value: String,
    pub expected: String,
}

/// Declares a closed vocabulary: the enum, its text (`as_str`, `Display`, `FromStr`), and the
/// serde and sqlx mappings, all from one list of `Variant = "text"` pairs.
macro_rules! vocabulary {
    (
        $(#[$meta:meta])*
        $name:ident ($what:literal) {
            $( $(#[$vmeta:meta])* $variant:ident = $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash,
            serde::Serialize, serde::Deserialize, sqlx::Type,
        )]
        pub enum $name {
            $( $(#[$vmeta])* #[serde(rename = $text)] #[sqlx(rename = $text)] $variant, )+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The text the store holds.
            pub fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $text, )+
                }
            }

            /// The value whose text is `s`, if any.
            pub fn parse(s: &str) -> Option<Self> {
                match s {
                    $( $text => Some($name::$variant), )+
                    _ => None,
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownValue;

            fn from_str(s: &str) -> Result<Self, UnknownValue> {
                Self::parse(s).ok_or_else(|| UnknownValue {
                    what: $what,
                    value: s.to_string(),
                    expected: Self::ALL.iter().map(|v| v.as_str()).collect::<Vec<_>>().join(", "),
                })
            }
        }
    };
}

vocabulary! {
    /// The stages of a run, in the order they run. Ingest loads the prompts once; the next
    /// three make the pipeline's own Aligner (`aligner:`) and run once, as round 0, before
    /// round 1; the rest make up every round.
    Stage ("stage") {
        Ingest = "ingest",
        /// Question-answer-correction rows: answers from a model, corrections from a teacher.
        Teach = "teach",
        TrainAligner = "train_aligner",
        /// The trained Aligner on the held-out rows.
        EvaluateAligner = "evaluate_aligner",
        Generate = "generate",
        Correct = "correct",
        Synthesize = "synthesize",
        Train = "train",
        Evaluate = "evaluate",
    }
}

vocabulary! {
    /// A run's status (`runs.status`).
    RunStatus ("run status") {
        Running = "running",
        Done = "done",
        Failed = "failed",
        Cancelled = "cancelled",
    }
}

vocabulary! {
    /// The status of a piece of a run: a round (`rounds.status`), a stage execution
    /// (`stage_executions.status`) or a training job (`training_jobs.status`).
    StageStatus ("stage status") {
        Running = "running",
        Done = "done",
        Failed = "failed",
    }
}

vocabulary! {
    /// A daemon job's place in the queue (`daemon_jobs.state`).
    JobState ("job state") {
        Queued = "queued",
        Running = "running",
        Paused = "paused",
        Cancelled = "cancelled",
        Done = "done",
        Failed = "failed",
    }
}

impl JobState {
    /// The states a job never leaves.
    pub const TERMINAL: [JobState; 3] = [JobState::Done, JobState::Failed, JobState::Cancelled];

    /// Whether the job has ended.
    pub fn is_terminal(self) -> bool {
        Self::TERMINAL.contains(&self)
    }
}

vocabulary! {
    /// How one model call ended (`generations.status`, `corrections.status`,
    /// `eval_answers.status`, `eval_judgements.status`): text, or an error after all retries.
    Outcome ("call outcome") {
        Ok = "ok",
        Failed = "failed",
    }
}

vocabulary! {
    /// What the pair filters decided about a (correction, original) pair (`pairs.verdict`).
    Verdict ("pair verdict") {
        Kept = "kept",
        Dropped = "dropped",
    }
}

vocabulary! {
    /// The gate's decision after a round (`gate_decisions.decision`).
    GateDecision ("gate decision") {
        Continue = "continue",
        Stop = "stop",
        Rollback = "rollback",
    }
}

vocabulary! {
    /// What an `events` row records.
    EventKind ("event kind") {
        PromptsLoaded = "prompts_loaded",
        RunStarted = "run_started",
        RunResumed = "run_resumed",
        StageFinished = "stage_finished",
        TrainStarted = "train_started",
        CheckpointRegistered = "checkpoint_registered",
        AlignerEvaluated = "aligner_evaluated",
        Gate = "gate",
        RoundFinished = "round_finished",
        RunFinished = "run_finished",
        RunFailed = "run_failed",
    }
}

vocabulary! {
    /// How much an event matters (`events.level`).
    Level ("event level") {
        Info = "info",
        Warn = "warn",
        Error = "error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trips_through_every_mapping() {
        for s in Stage::ALL {
            assert_eq!(Stage::parse(s.as_str()), Some(*s));
            assert_eq!(s.to_string(), s.as_str());
            let json = serde_json::to_string(s).unwrap();
            assert_eq!(json, format!("\"{}\"", s.as_str()));
            assert_eq!(serde_json::from_str::<Stage>(&json).unwrap(), *s);
        }
        assert_eq!(Stage::TrainAligner.as_str(), "train_aligner");
        assert_eq!(GateDecision::Rollback.to_string(), "rollback");
        let err = "finished".parse::<RunStatus>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "`finished` is not a run status (expected one of: running, done, failed, cancelled)"
        );
        assert!(Stage::Ingest < Stage::Teach && Stage::Train < Stage::Evaluate);
        assert!(JobState::Cancelled.is_terminal() && !JobState::Paused.is_terminal());
    }

    /// Every value the enums can write is one the schema's `CHECK` constraints accept, and
    /// the other way round: the migrations and the enums say the same thing.
    #[test]
    fn enums_match_the_schemas_check_constraints() {
        let schema: String = [
            include_str!("../../../migrations/20261128000001_initial.sql"),
            include_str!("../../../migrations/20261128000003_evaluation.sql"),
            include_str!("../../../migrations/20261128000005_daemon.sql"),
        ]
        .concat();
        let check = |column: &str| -> Vec<Vec<String>> {
            let needle = format!("CHECK ({column} IN (");
            schema
                .match_indices(&needle)
                .map(|(at, _)| {
                    let rest = &schema[at + needle.len()..];
                    let list = &rest[..rest.find(')').unwrap()];
                    list.split(',')
                        .map(|v| v.trim().trim_matches('\'').to_string())
                        .collect()
                })
                .collect()
        };
        let texts = |all: &[&str]| all.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let sorted = |mut v: Vec<String>| {
            v.sort();
            v
        };
        let run: Vec<&str> = RunStatus::ALL.iter().map(|v| v.as_str()).collect();
        let stage: Vec<&str> = StageStatus::ALL.iter().map(|v| v.as_str()).collect();
        let outcome: Vec<&str> = Outcome::ALL.iter().map(|v| v.as_str()).collect();
        let statuses = check("status");
        assert!(statuses
            .iter()
            .any(|c| sorted(c.clone()) == sorted(texts(&run))));
        for c in &statuses {
            let c = sorted(c.clone());
            assert!(
                c == sorted(texts(&run))
                    || c == sorted(texts(&stage))
                    || c == sorted(texts(&outcome)),
                "a status CHECK the enums do not cover: {c:?}"
            );
        }
        let state: Vec<&str> = JobState::ALL.iter().map(|v| v.as_str()).collect();
        assert_eq!(sorted(check("state")[0].clone()), sorted(texts(&state)));
        let verdict: Vec<&str> = Verdict::ALL.iter().map(|v| v.as_str()).collect();
        assert!(check("verdict")
            .iter()
            .any(|c| sorted(c.clone()) == sorted(texts(&verdict))));
        let decision: Vec<&str> = GateDecision::ALL.iter().map(|v| v.as_str()).collect();
        assert_eq!(
            sorted(check("decision")[0].clone()),
            sorted(texts(&decision))
        );
    }
}

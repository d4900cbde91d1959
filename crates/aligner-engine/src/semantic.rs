//! The synthesize stage's semantic filter (`rounds.synthesize.semantic`): embeds the texts of
//! the candidates that can still be kept (original, correction and, for near-duplicate
//! prompts, the prompt) on a blocking thread, one call per page, and hands the measures to
//! the pure [`filters::verdict`](crate::filters::verdict).

use std::collections::HashMap;
use std::sync::Arc;

use aligner_backend::Embedder;
use aligner_spec::{SemanticFilter, SynthesizeStage};

use crate::filters::{self, Candidate, FilterState, Semantic};
use crate::{Error, Result};

/// What was measured for one candidate; [`Measured::semantic`] lends it to a [`Candidate`].
#[derive(Debug, Clone, Default)]
pub(crate) struct Measured {
    copy_similarity: Option<f32>,
    /// Normalized prompt hash and the prompt's embedding.
    prompt: Option<(String, Vec<f32>)>,
}

impl Measured {
    pub(crate) fn semantic(&self) -> Semantic<'_> {
        Semantic {
            copy_similarity: self.copy_similarity,
            prompt: self
                .prompt
                .as_ref()
                .map(|(hash, embedding)| (hash.as_str(), embedding.as_slice())),
        }
    }
}

/// Where one candidate's vectors sit in the batch to embed: its original's (when copies are
/// checked) and its prompt's hash and slot (when prompts are deduplicated).
type Slots = (Option<usize>, Option<(String, usize)>);

pub(crate) struct Scorer {
    embedder: Arc<dyn Embedder>,
    filter: SemanticFilter,
    round: u32,
}

impl Scorer {
    pub(crate) fn new(embedder: Arc<dyn Embedder>, filter: SemanticFilter, round: u32) -> Self {
        Scorer {
            embedder,
            filter,
            round,
        }
    }

    /// Embeds `texts` on a blocking thread (the embedder is CPU-bound).
    async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let embedder = self.embedder.clone();
        let n = texts.len();
        let out = tokio::task::spawn_blocking(move || embedder.embed(&texts))
            .await
            .map_err(|e| self.error(format!("the embedder panicked: {e}")))?
            .map_err(|e| self.error(format!("embedding failed: {e}")))?;
        if out.len() != n {
            return Err(self.error(format!(
                "the embedder returned {} vectors for {n} texts",
                out.len()
            )));
        }
        Ok(out)
    }

    fn error(&self, message: String) -> Error {
        Error::Stage {
            round: self.round,
            stage: "synthesize",
            message: format!(
                "semantic filter (`{}`): {message}",
                self.filter.embedder.display()
            ),
        }
    }

    /// Rebuilds the near-duplicate state from the prompts of the pairs already kept (on
    /// resume); nothing to do when near-duplicate prompts are not checked.
    pub(crate) async fn restore(
        &self,
        state: &mut FilterState,
        kept_prompts: Vec<String>,
    ) -> Result<()> {
        if self.filter.dedupe_prompts_above.is_none() {
            return Ok(());
        }
        let mut by_hash: HashMap<String, String> = HashMap::new();
        for prompt in kept_prompts {
            by_hash
                .entry(crate::ingest::prompt_hash(&prompt))
                .or_insert(prompt);
        }
        let (hashes, prompts): (Vec<String>, Vec<String>) = by_hash.into_iter().unzip();
        let embeddings = self.embed(prompts).await?;
        for (hash, embedding) in hashes.iter().zip(&embeddings) {
            state.add_kept_prompt(hash, embedding);
        }
        Ok(())
    }

    /// Measures every candidate of a page that [`filters::needs_semantic`] says is worth it,
    /// with one embedder call; the others get `None`. `prompts[i]` is candidate `i`'s prompt.
    pub(crate) async fn measure(
        &self,
        spec: &SynthesizeStage,
        state: &FilterState,
        candidates: &[Candidate<'_>],
        prompts: &[&str],
    ) -> Result<Vec<Option<Measured>>> {
        let check_copies = self.filter.max_copy_similarity < 1.0;
        let check_prompts = self.filter.dedupe_prompts_above.is_some();
        let mut texts: Vec<String> = Vec::new();
        // Per candidate: where its original's, correction's and prompt's vectors will be.
        let mut slots: Vec<Option<Slots>> = Vec::new();
        let mut prompt_slot: HashMap<String, usize> = HashMap::new();
        for (c, prompt) in candidates.iter().zip(prompts) {
            if !filters::needs_semantic(spec, state, c) {
                slots.push(None);
                continue;
            }
            let copy = check_copies.then(|| {
                texts.push(c.original.unwrap_or_default().trim().to_string());
                texts.push(c.correction.unwrap_or_default().trim().to_string());
                texts.len() - 2
            });
            let prompt = check_prompts.then(|| {
                let hash = crate::ingest::prompt_hash(prompt);
                let at = *prompt_slot.entry(hash.clone()).or_insert_with(|| {
                    texts.push(prompt.to_string());
                    texts.len() - 1
                });
                (hash, at)
            });
            slots.push(Some((copy, prompt)));
        }
        let vectors = self.embed(texts).await?;
        Ok(slots
            .into_iter()
            .map(|slot| {
                slot.map(|(copy, prompt)| Measured {
                    copy_similarity: copy.map(|i| filters::cosine(&vectors[i], &vectors[i + 1])),
                    prompt: prompt.map(|(hash, i)| (hash, vectors[i].clone())),
                })
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use aligner_backend::{Completion, CompletionRequest, FinishReason, Prompt, TextGenerator};
    use aligner_spec::{ModelSpec, Pipeline};
    use aligner_store::Store;

    use super::*;
    use crate::{BackendFactory, Engine, RunOptions, Silent};

    /// Bag of words: texts with the same words (any case, spacing, punctuation) get the same
    /// vector, so their cosine is 1.
    struct BagOfWords {
        texts: AtomicUsize,
    }

    impl Embedder for BagOfWords {
        fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, aligner_backend::Error> {
            self.texts.fetch_add(texts.len(), Ordering::Relaxed);
            Ok(texts
                .iter()
                .map(|t| {
                    let mut v = vec![0f32; 64];
                    for word in t
                        .to_lowercase()
                        .split(|c: char| !c.is_alphanumeric())
                        .filter(|w| !w.is_empty())
                    {
                        let h = word.bytes().fold(2166136261u32, |h, b| {
                            (h ^ u32::from(b)).wrapping_mul(16777619)
                        });
                        v[h as usize % 64] += 1.0;
                    }
                    v
                })
                .collect())
        }
    }

    /// Answers `Here is my answer about <prompt>`; corrects prompts that contain `COPY` with
    /// the answer in upper case (a copy in other letters), the others with a new text.
    struct Doubles {
        embedder: Arc<BagOfWords>,
    }

    #[async_trait::async_trait]
    impl TextGenerator for Doubles {
        fn id(&self) -> String {
            "doubles".into()
        }
        async fn complete(
            &self,
            request: CompletionRequest,
        ) -> Result<Completion, aligner_backend::Error> {
            let text = match &request.prompt {
                Prompt::Chat(messages) => {
                    format!(
                        "Here is my answer about {}",
                        messages.last().unwrap().content
                    )
                }
                Prompt::Raw(p) => {
                    let answer = p
                        .rsplit(" | ")
                        .next()
                        .unwrap()
                        .trim_end_matches(" ASSISTANT:");
                    if p.contains("COPY") {
                        answer.to_uppercase()
                    } else {
                        "I would explain it differently, step by step.".into()
                    }
                }
            };
            Ok(Completion {
                text,
                finish_reason: FinishReason::Stop,
                model: "doubles".into(),
                prompt_tokens: None,
                completion_tokens: None,
                latency: Duration::ZERO,
                attempts: 1,
                replica: None,
            })
        }
    }

    impl BackendFactory for Doubles {
        fn text_generator(
            &self,
            _name: &str,
            _spec: &ModelSpec,
        ) -> anyhow::Result<Arc<dyn TextGenerator>> {
            Ok(Arc::new(Doubles {
                embedder: self.embedder.clone(),
            }))
        }
        fn embedder(&self, _dir: &std::path::Path) -> anyhow::Result<Arc<dyn Embedder>> {
            Ok(self.embedder.clone())
        }
    }

    /// No embedder: the trait's default.
    struct NoEmbedder;
    impl BackendFactory for NoEmbedder {
        fn text_generator(
            &self,
            _name: &str,
            _spec: &ModelSpec,
        ) -> anyhow::Result<Arc<dyn TextGenerator>> {
            Ok(Arc::new(Doubles {
                embedder: Arc::new(BagOfWords {
                    texts: AtomicUsize::new(0),
                }),
            }))
        }
    }

    fn pipeline(dir: &Path, prompts: &[&str]) -> Pipeline {
        let lines: Vec<String> = prompts
            .iter()
            .map(|p| serde_json::json!({ "prompt": p }).to_string())
            .collect();
        std::fs::write(dir.join("prompts.jsonl"), lines.join("\n")).unwrap();
        let folder = dir.join("minilm");
        std::fs::create_dir_all(&folder).unwrap();
        for f in ["config.json", "model.safetensors", "tokenizer.json"] {
            std::fs::write(folder.join(f), "").unwrap();
        }
        let yaml = "version: 1
name: semantic
models:
  up: { kind: openai, base_url: http://127.0.0.1:9/v1, model: m, max_concurrency: 1 }
prompts:
  source: prompts.jsonl
rounds:
  generate: { model: up }
  correct: { model: up }
  synthesize:
    semantic:
      embedder: minilm
      dedupe_prompts_above: 0.95
";
        Pipeline::from_yaml(yaml, &dir.join("p.yaml"), dir).unwrap_or_else(|e| panic!("{e}"))
    }

    async fn reasons(store: &Store) -> Vec<(String, String)> {
        let q = store
            .query_read_only(
                "SELECT pr.prompt, coalesce(p.reason, 'kept') FROM pairs p
                 JOIN prompts pr ON pr.id = p.prompt_id ORDER BY p.generation_id",
            )
            .await
            .unwrap();
        q.rows
            .iter()
            .map(|r| {
                (
                    r[0].as_str().unwrap().to_string(),
                    r[1].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    #[tokio::test]
    async fn copies_and_near_duplicate_prompts_are_dropped_with_their_reason() {
        let dir = tempfile::tempdir().unwrap();
        let spec = pipeline(
            dir.path(),
            &[
                "Tell me about cats",
                "COPY: how do plants grow?",
                "tell me about... CATS!",
                "What is the capital of France?",
            ],
        );
        let store = Store::open(&dir.path().join("s.db")).await.unwrap();
        let embedder = Arc::new(BagOfWords {
            texts: AtomicUsize::new(0),
        });
        let factory = Arc::new(Doubles {
            embedder: embedder.clone(),
        });
        let engine = Engine::new(
            store.clone(),
            spec,
            &dir.path().join("p.yaml"),
            factory,
            Arc::new(Silent),
        );
        engine.run(&RunOptions::default()).await.unwrap();
        assert_eq!(
            reasons(&store).await,
            vec![
                ("Tell me about cats".into(), "kept".into()),
                ("COPY: how do plants grow?".into(), "semantic_copy".into()),
                (
                    "tell me about... CATS!".into(),
                    "near_duplicate_prompt".into()
                ),
                ("What is the capital of France?".into(), "kept".into()),
            ]
        );
        // Original, correction and prompt of each of the four candidates, in one call per page.
        assert_eq!(embedder.texts.load(Ordering::Relaxed), 12);
    }

    #[tokio::test]
    async fn without_an_embedder_the_stage_fails_with_a_hint() {
        let dir = tempfile::tempdir().unwrap();
        let spec = pipeline(dir.path(), &["Tell me about cats"]);
        let store = Store::open(&dir.path().join("s.db")).await.unwrap();
        let engine = Engine::new(
            store,
            spec,
            &dir.path().join("p.yaml"),
            Arc::new(NoEmbedder),
            Arc::new(Silent),
        );
        let err = engine
            .run(&RunOptions::default())
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("round 1 `synthesize`"), "{err}");
        assert!(err.contains("remove the `semantic` block"), "{err}");
    }

    #[tokio::test]
    async fn kept_prompts_are_restored_on_resume() {
        let filter = SemanticFilter {
            embedder: "unused".into(),
            max_copy_similarity: 0.98,
            dedupe_prompts_above: Some(0.95),
        };
        let scorer = Scorer::new(
            Arc::new(BagOfWords {
                texts: AtomicUsize::new(0),
            }),
            filter.clone(),
            1,
        );
        let mut state = FilterState::default();
        scorer
            .restore(
                &mut state,
                vec!["Tell me about cats".into(), "tell me  ABOUT cats".into()],
            )
            .await
            .unwrap();
        assert_eq!(state.kept_prompt_embeddings.len(), 1, "one per prompt hash");

        let spec = SynthesizeStage {
            drop_identical: true,
            min_edit_distance: 0.05,
            length_ratio_min: 0.1,
            length_ratio_max: 10.0,
            drop_empty: true,
            drop_truncated: true,
            dedupe_prompts: true,
            max_pairs: None,
            semantic: Some(filter),
            benign_refusals: None,
            benign_preference: None,
        };
        let candidate = Candidate {
            prompt_hash: "other:0",
            original: Some("an answer"),
            original_truncated: false,
            correction: Some("a new and better text"),
            correction_truncated: false,
            benign_refusal: false,
            semantic: None,
        };
        let measured = scorer
            .measure(&spec, &state, &[candidate], &["Tell me about cats!"])
            .await
            .unwrap();
        let c = Candidate {
            semantic: measured[0].as_ref().map(Measured::semantic),
            ..candidate
        };
        assert_eq!(
            filters::verdict(&spec, &mut state, &c).reason,
            Some("near_duplicate_prompt")
        );
    }
}

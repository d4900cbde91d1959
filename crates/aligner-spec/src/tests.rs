//! End-to-end tests of loading: a full valid pipeline, and broken ones whose complete
//! error output is snapshot-tested (temporary folders are shown as `[TMP]`).

use std::path::Path;

use tempfile::TempDir;

use crate::*;

/// The example from the docs, with every block filled in.
const FULL: &str = r#"version: 1
name: quickstart
store: ${ALIGNER_HOME}/aligner.db
workdir: runs
models:
  upstream:
    kind: openai
    base_url: ${OPENAI_BASE_URL}
    model: gpt-4o-mini
    api_key_env: OPENAI_API_KEY
    max_concurrency: 16
    requests_per_minute: 600
    tokens_per_minute: 200000
    timeout: 60
    max_retries: 5
    weights: meta-llama/Llama-3.1-8B-Instruct
  aligner:
    kind: local
    path: models/tiny.gguf
    dtype: auto
prompts:
  source: data/prompts.jsonl
  fields: { prompt: prompt, id: id, system: system, metadata: [category] }
  system_prompt: "You are helpful."
  sample: 200
  seed: 7
  holdout: 0.1
rounds:
  count: 2
  generate:
    model: upstream
    n: 1
    sampling: { temperature: 0.5, top_p: 0.95, top_k: 10, max_tokens: 256, repetition_penalty: 1.1, frequency_penalty: 0.0, presence_penalty: 0.0, seed: 1, stop: ["\n\nUser:"] }
  correct:
    model: aligner
    template: aligner-v1
    sampling: { temperature: 0.3, top_p: 0.95, top_k: 10, frequency_penalty: 1.2, max_tokens: 256 }
  synthesize:
    drop_identical: true
    min_edit_distance: 0.05
    length_ratio: [0.1, 10]
    drop_empty: true
    drop_truncated: true
    dedupe_prompts: true
    max_pairs: 1000
  train:
    method: dpo
    beta: 0.1
    loss: sigmoid
    learning_rate: 1.0e-6
    epochs: 3
    batch_size: 8
    gradient_accumulation: 1
    max_length: 1024
    warmup_ratio: 0.03
    reference: initial
    backend:
      kind: command
      command: "python train.py --data {data} --model {base_model} --out {output_dir} --round {round}"
      format: jsonl
      conversational: false
      serve_model: "ckpt-round-{round}"
  evaluate:
    judge: upstream
    aspects: [helpfulness, harmlessness]
    compare: [aligner, initial]
    labels: { field: category, harmful: [harmful] }
    bootstrap: 500
    gate: { metric: omega.harmlessness.initial, max_drop: 10, action: rollback }
"#;

/// A folder with the files `FULL` refers to.
fn setup() -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    std::fs::create_dir_all(dir.path().join("models")).unwrap();
    std::fs::write(
        dir.path().join("data/prompts.jsonl"),
        "{\"prompt\": \"hi\"}\n",
    )
    .unwrap();
    crate::gguf::write_test_gguf(
        &dir.path().join("models/tiny.gguf"),
        &[("general.architecture", "llama")],
    );
    dir
}

fn env(name: &str) -> Option<String> {
    match name {
        "ALIGNER_HOME" => Some("/srv/aligner".into()),
        "OPENAI_BASE_URL" => Some("http://127.0.0.1:8000/v1/".into()),
        _ => None,
    }
}

fn load(dir: &TempDir, text: &str) -> Result<Pipeline, Errors> {
    Pipeline::from_yaml_with_env(text, Path::new("pipelines/x.yaml"), dir.path(), env)
}

/// `FULL` with `from` replaced by `to` (which must be there).
fn full_with(from: &str, to: &str) -> String {
    assert!(FULL.contains(from), "{from:?} not in FULL");
    FULL.replacen(from, to, 1)
}

/// The complete error output for `text`, with the temporary folder shown as `[TMP]`.
fn errors(dir: &TempDir, text: &str) -> String {
    let err = load(dir, text).expect_err("expected errors");
    err.to_string()
        .replace(dir.path().to_str().unwrap(), "[TMP]")
}

#[test]
fn full_example_parses() {
    let dir = setup();
    let p = load(&dir, FULL).unwrap_or_else(|e| panic!("{e}"));
    let root = dir.path();
    assert_eq!(p.name, "quickstart");
    assert_eq!(
        p.store.as_deref(),
        Some(Path::new("/srv/aligner/aligner.db"))
    );
    assert_eq!(p.workdir, root.join("runs"));
    assert_eq!(
        p.models["upstream"],
        ModelSpec::Openai(OpenAiModel {
            base_url: "http://127.0.0.1:8000/v1".into(),
            model: "gpt-4o-mini".into(),
            api_key_env: Some("OPENAI_API_KEY".into()),
            max_concurrency: 16,
            requests_per_minute: Some(600),
            tokens_per_minute: Some(200000),
            timeout_secs: 60.0,
            max_retries: 5,
            raw_endpoint: RawEndpoint::Completions,
            weights: Some("meta-llama/Llama-3.1-8B-Instruct".into()),
            replicas: vec![],
            replica_concurrency: None,
        })
    );
    assert_eq!(
        p.models["aligner"],
        ModelSpec::Local(LocalModel {
            source: LocalSource::Gguf {
                path: root.join("models/tiny.gguf"),
                architecture: Some("llama".into())
            },
            dtype: "auto".into(),
        })
    );
    assert_eq!(p.prompts.source, root.join("data/prompts.jsonl"));
    assert_eq!(p.prompts.format, PromptFormat::Jsonl);
    assert_eq!(p.prompts.prompt_field, "prompt");
    assert_eq!(p.prompts.id_field.as_deref(), Some("id"));
    assert_eq!(p.prompts.system_field.as_deref(), Some("system"));
    assert_eq!(p.prompts.metadata_fields, vec!["category"]);
    assert_eq!(p.prompts.system_prompt.as_deref(), Some("You are helpful."));
    assert_eq!(
        (p.prompts.sample, p.prompts.seed, p.prompts.holdout),
        (Some(200), 7, 0.1)
    );

    let r = &p.rounds;
    assert_eq!(r.count, 2);
    assert_eq!(r.generate.model, "upstream");
    assert_eq!(r.generate.n, 1);
    assert_eq!(
        r.generate.sampling,
        Sampling {
            temperature: Some(0.5),
            top_p: Some(0.95),
            top_k: Some(10),
            max_tokens: Some(256),
            frequency_penalty: Some(0.0),
            presence_penalty: Some(0.0),
            repetition_penalty: Some(1.1),
            seed: Some(1),
            stop: vec!["\n\nUser:".into()],
        }
    );
    assert_eq!(r.correct.model, "aligner");
    assert_eq!(r.correct.template, Template::AlignerV1);
    assert_eq!(r.correct.sampling.frequency_penalty, Some(1.2));
    assert_eq!(r.correct.sampling.stop, Vec::<String>::new());
    assert_eq!(
        r.synthesize,
        SynthesizeStage {
            drop_identical: true,
            min_edit_distance: 0.05,
            length_ratio_min: 0.1,
            length_ratio_max: 10.0,
            drop_empty: true,
            drop_truncated: true,
            dedupe_prompts: true,
            max_pairs: Some(1000),
            semantic: None,
            benign_refusals: None,
            benign_preference: None,
        }
    );
    assert_eq!(
        r.train,
        Some(TrainStage {
            method: TrainMethod::Dpo,
            beta: 0.1,
            loss: DpoLoss::Sigmoid,
            learning_rate: 1e-6,
            epochs: 3,
            batch_size: 8,
            gradient_accumulation: 1,
            max_length: 1024,
            warmup_ratio: 0.03,
            reference: ReferencePolicy::Initial,
            backend: TrainBackend::Command(ExternalTrainer {
                command: "python train.py --data {data} --model {base_model} --out {output_dir} --round {round}".into(),
                format: ExportFormat::Jsonl,
                conversational: false,
                serve_model: Some("ckpt-round-{round}".into()),
            }),
            serve: None,
            replay: None,
        })
    );
    let eval = r.evaluate.as_ref().unwrap();
    assert_eq!(eval.judge.as_deref(), Some("upstream"));
    assert_eq!(
        eval.aspects,
        vec![JudgeAspect::Helpfulness, JudgeAspect::Harmlessness]
    );
    assert_eq!(eval.compare, vec![Comparison::Aligner, Comparison::Initial]);
    // Held-out answers sample as the generate stage does (None); the judge is greedy.
    assert_eq!(eval.sampling, None);
    assert_eq!(eval.judge_sampling.temperature, Some(0.0));
    assert_eq!(eval.judge_sampling.max_tokens, Some(512));
    assert_eq!(
        eval.labels,
        Some(LabelRule {
            field: "category".into(),
            harmful: vec!["harmful".into()]
        })
    );
    assert_eq!(eval.bootstrap, 500);
    assert_eq!(
        eval.gate,
        Some(Gate {
            metric: "omega.harmlessness.initial".into(),
            max_drop: 10.0,
            action: GateAction::Rollback
        })
    );
}

#[test]
fn evaluate_errors_name_the_place_and_the_fix() {
    let dir = setup();
    let text = FULL
        .replace(
            "aspects: [helpfulness, harmlessness]",
            "aspects: [helpfulness, harmlesness]",
        )
        .replace("compare: [aligner, initial]", "compare: [aligner, first]")
        .replace(
            "metric: omega.harmlessness.initial",
            "metric: omega.helpfulness.inital",
        )
        .replace("action: rollback", "action: revert");
    let e = errors(&dir, &text);
    assert!(e.contains("unknown aspect `harmlesness`"), "{e}");
    assert!(e.contains("unknown comparison `first`"), "{e}");
    assert!(
        // With `first` rejected, the only comparison left is `aligner`.
        e.contains("`omega.helpfulness.inital` is not a metric this evaluation computes")
            && e.contains("did you mean `omega.helpfulness.aligner`?"),
        "{e}"
    );
    assert!(e.contains("unknown action `revert`"), "{e}");
    assert!(e.contains("at: rounds.evaluate.gate.action"), "{e}");

    let text = FULL
        .replace("  holdout: 0.1\n", "")
        .replace("labels: { field: category,", "labels: { field: source,")
        .replace("samples_typo", "");
    let e = errors(&dir, &text);
    assert!(
        e.contains("evaluation needs held-out prompts, and `prompts.holdout` is 0"),
        "{e}"
    );
    assert!(
        e.contains("`source` is not among `prompts.fields.metadata`"),
        "{e}"
    );

    // Without `rounds.train` every round's model is the upstream.
    let start = FULL.find("  train:\n    method: dpo").unwrap();
    let end = FULL.find("  evaluate:\n").unwrap();
    let text = format!("{}{}", &FULL[..start], &FULL[end..]);
    let e = errors(&dir, &text);
    assert!(
        e.contains(
            "`initial` compares the models of different rounds, and these rounds do not train"
        ),
        "{e}"
    );
    assert!(
        e.contains("`rollback` returns to an earlier round's model"),
        "{e}"
    );
    let text = text
        .replace("compare: [aligner, initial]", "compare: [aligner]")
        .replace(
            "metric: omega.harmlessness.initial",
            "metric: omega.harmlessness.aligner",
        )
        .replace("action: rollback", "action: stop");
    let p = load(&dir, &text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        p.rounds.evaluate.unwrap().compare,
        vec![Comparison::Aligner]
    );

    let text = FULL.replace("bootstrap: 500", "bootstrap: 500\n    samples: 50");
    let e = errors(&dir, &text);
    assert!(e.contains("samples"), "{e}");
}

#[test]
fn minimal_pipeline_gets_defaults() {
    let dir = setup();
    let text = "version: 1
models:
  local:
    kind: local
    hub: HuggingFaceTB/SmolLM2-135M-Instruct
prompts:
  source: data/prompts.jsonl
rounds:
  generate: { model: local }
  correct: { model: local }
";
    let p = load(&dir, text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(p.name, "x", "defaults to the file stem");
    assert_eq!(p.store, None);
    assert_eq!(p.workdir, dir.path().join("runs"));
    assert_eq!(
        p.models["local"],
        ModelSpec::Local(LocalModel {
            source: LocalSource::HubId {
                id: "HuggingFaceTB/SmolLM2-135M-Instruct".into(),
                revision: None
            },
            dtype: "auto".into(),
        })
    );
    assert_eq!(
        (p.prompts.seed, p.prompts.holdout, p.prompts.sample),
        (0, 0.0, None)
    );
    assert_eq!(p.rounds.count, 1);
    assert_eq!(p.rounds.generate.n, 1);
    assert_eq!(p.rounds.generate.sampling, Sampling::default());
    assert_eq!(p.rounds.correct.template, Template::AlignerV1);
    assert!(p.rounds.synthesize.drop_identical && p.rounds.synthesize.dedupe_prompts);
    assert_eq!(
        (
            p.rounds.synthesize.length_ratio_min,
            p.rounds.synthesize.length_ratio_max
        ),
        (0.1, 10.0)
    );
    assert_eq!(p.rounds.train, None);
    assert_eq!(p.rounds.evaluate, None);
}

#[test]
fn durations_defaults_and_env_defaults() {
    let dir = setup();
    let text = full_with("timeout: 60", "timeout: 2m")
        .replace("${ALIGNER_HOME}", "${NOT_SET_ANYWHERE:-state}");
    let p = load(&dir, &text).unwrap_or_else(|e| panic!("{e}"));
    let ModelSpec::Openai(m) = &p.models["upstream"] else {
        panic!()
    };
    assert_eq!(m.timeout_secs, 120.0);
    assert_eq!(p.store, Some(dir.path().join("state/aligner.db")));
    let p = load(&dir, &full_with("timeout: 60", "timeout: \"500ms\"")).unwrap();
    let ModelSpec::Openai(m) = &p.models["upstream"] else {
        panic!()
    };
    assert_eq!(m.timeout_secs, 0.5);
}

#[test]
fn custom_template_and_builtins_from_yaml() {
    let dir = setup();
    for id in Template::BUILTIN_IDS {
        let p = load(
            &dir,
            &full_with("template: aligner-v1", &format!("template: {id}")),
        )
        .unwrap();
        assert_eq!(p.rounds.correct.template.id(), id);
    }
    let p = load(
        &dir,
        &full_with(
            "template: aligner-v1",
            "template: \"Q: {question}\\nA: {answer}\\nBetter:\"",
        ),
    )
    .unwrap();
    assert_eq!(
        p.rounds.correct.template,
        Template::Custom("Q: {question}\nA: {answer}\nBetter:".into())
    );
    assert_eq!(
        p.rounds.correct.template.render("why?", "because"),
        "Q: why?\nA: because\nBetter:"
    );
}

#[test]
fn hf_folder_model() {
    let dir = setup();
    let folder = dir.path().join("models/hf");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(folder.join("config.json"), r#"{"model_type": "llama"}"#).unwrap();
    let text = full_with("path: models/tiny.gguf", "path: ./models/hf/");
    insta::assert_snapshot!(errors(&dir, &text), @r"
    error: model folder `./models/hf/` is missing `tokenizer.json`, `*.safetensors`
      --> pipelines/x.yaml:19:11
       at: models.aligner.path
      hint: resolved to `[TMP]/models/hf`
    ");
    std::fs::write(folder.join("tokenizer.json"), "{}").unwrap();
    std::fs::write(folder.join("model.safetensors"), "").unwrap();
    let p = load(&dir, &text).unwrap();
    let ModelSpec::Local(m) = &p.models["aligner"] else {
        panic!()
    };
    assert_eq!(
        m.source,
        LocalSource::HfFolder {
            path: folder,
            architecture: Some("llama".into())
        }
    );
}

/// `FULL` with a `semantic:` block (`extra` lines indented under it) after `max_pairs`.
fn full_with_semantic(extra: &str) -> String {
    full_with(
        "    max_pairs: 1000\n",
        &format!("    max_pairs: 1000\n    semantic:\n{extra}"),
    )
}

/// A folder with the files an embedder needs (empty: validation only looks for them).
fn embedder_folder(dir: &TempDir) -> std::path::PathBuf {
    let folder = dir.path().join("models/minilm");
    std::fs::create_dir_all(&folder).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::write(folder.join(f), "").unwrap();
    }
    folder
}

#[test]
fn semantic_filter_block() {
    let dir = setup();
    let folder = embedder_folder(&dir);
    let text = full_with_semantic(
        "      embedder: ${MODELS:-models}/minilm\n      dedupe_prompts_above: 0.95\n",
    );
    let p = load(&dir, &text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        p.rounds.synthesize.semantic,
        Some(SemanticFilter {
            embedder: folder.clone(),
            max_copy_similarity: 0.98,
            dedupe_prompts_above: Some(0.95),
        })
    );
    let text = full_with_semantic("      embedder: models/minilm\n      max_copy_similarity: 1\n");
    let s = load(&dir, &text)
        .unwrap()
        .rounds
        .synthesize
        .semantic
        .unwrap();
    assert_eq!((s.max_copy_similarity, s.dedupe_prompts_above), (1.0, None));

    // Unset, it is not in the snapshot (hashes of older specs stay the same); set, it is,
    // and a changed threshold is a spec change.
    let plain = load(&dir, FULL).unwrap();
    assert!(plain.snapshot()["rounds"]["synthesize"]
        .get("semantic")
        .is_none());
    let with = load(&dir, &text).unwrap();
    assert_ne!(plain.hash(), with.hash());
    let changed = load(
        &dir,
        &full_with_semantic("      embedder: models/minilm\n      max_copy_similarity: 0.9\n"),
    )
    .unwrap();
    assert_eq!(
        diff_snapshots(&with.snapshot(), &changed.snapshot()),
        vec![Change {
            path: "rounds.synthesize.semantic.max_copy_similarity".into(),
            old: "1.0".into(),
            new: "0.9".into()
        }]
    );
}

#[test]
fn error_semantic_filter_values() {
    let dir = setup();
    embedder_folder(&dir);
    let text = full_with_semantic(
        "      embedder: models/minilm\n      max_copy_similarity: 0\n      dedupe_prompts_above: 1.5\n      dedupe_prompt_above: 0.9\n",
    );
    insta::assert_snapshot!(errors(&dir, &text), @r"
    error: `max_copy_similarity` must be more than 0 and at most 1, got `0`
      --> pipelines/x.yaml:48:28
       at: rounds.synthesize.semantic.max_copy_similarity

    error: `dedupe_prompts_above` must be more than 0 and at most 1, got `1.5`
      --> pipelines/x.yaml:49:29
       at: rounds.synthesize.semantic.dedupe_prompts_above

    error: unknown field `dedupe_prompt_above`
      --> pipelines/x.yaml:50:7
       at: rounds.synthesize.semantic.dedupe_prompt_above
      hint: did you mean `dedupe_prompts_above`?
    ");
    let text = full_with_semantic("      embedder: models/nothing-here\n");
    insta::assert_snapshot!(errors(&dir, &text), @r"
    error: embedder folder `models/nothing-here` does not exist
      --> pipelines/x.yaml:47:17
       at: rounds.synthesize.semantic.embedder
      hint: resolved to `[TMP]/models/nothing-here`; `aligner models fetch` puts all-MiniLM-L6-v2 into `models/all-MiniLM-L6-v2`
    ");
    std::fs::remove_file(dir.path().join("models/minilm/model.safetensors")).unwrap();
    let text = full_with_semantic("      embedder: models/minilm\n");
    insta::assert_snapshot!(errors(&dir, &text), @r"
    error: embedder folder `models/minilm` is missing `model.safetensors`
      --> pipelines/x.yaml:47:17
       at: rounds.synthesize.semantic.embedder
      hint: resolved to `[TMP]/models/minilm`; `aligner models fetch` puts all-MiniLM-L6-v2 into `models/all-MiniLM-L6-v2`
    ");
    let text = full_with_semantic("      max_copy_similarity: high\n");
    insta::assert_snapshot!(errors(&dir, &text), @r#"
    error: missing field `embedder`
      --> pipelines/x.yaml:46:5
       at: rounds.synthesize.semantic

    error: invalid type: string "high", expected a number
      --> pipelines/x.yaml:47:28
       at: rounds.synthesize.semantic.max_copy_similarity
    "#);
    let text = full_with_semantic("      embedder: ${NOPE}/minilm\n");
    insta::assert_snapshot!(errors(&dir, &text), @r"
    error: environment variable `NOPE` is not set
      --> pipelines/x.yaml:47:17
       at: rounds.synthesize.semantic.embedder
      hint: `export NOPE=...`, or give a default: `${NOPE:-...}`
    ");
}

#[test]
fn snapshot_hash_and_diff() {
    let dir = setup();
    let a = load(&dir, FULL).unwrap();
    let b = load(&dir, FULL).unwrap();
    assert_eq!(a.hash(), b.hash(), "hash is stable across parses");
    assert_eq!(a.hash().len(), 64);
    assert!(diff_snapshots(&a.snapshot(), &b.snapshot()).is_empty());

    let c = load(&dir, &full_with("temperature: 0.5", "temperature: 0.7")).unwrap();
    assert_ne!(a.hash(), c.hash());
    assert_eq!(
        diff_snapshots(&a.snapshot(), &c.snapshot()),
        vec![Change {
            path: "rounds.generate.sampling.temperature".into(),
            old: "0.5".into(),
            new: "0.7".into()
        }]
    );
    let snap = a.snapshot();
    assert_eq!(
        snap["rounds"]["correct"]["template"],
        serde_json::json!({"id": "aligner-v1"})
    );
    assert_eq!(snap["models"]["upstream"]["kind"], "openai");
}

#[test]
fn from_path_resolves_against_the_file_folder() {
    let dir = setup();
    std::fs::create_dir_all(dir.path().join("pipelines")).unwrap();
    let file = dir.path().join("pipelines/my-run.yaml");
    let text = FULL
        .replace("name: quickstart\n", "")
        .replace("store: ${ALIGNER_HOME}/aligner.db\n", "")
        .replace(
            "base_url: ${OPENAI_BASE_URL}",
            "base_url: http://localhost:8000/v1",
        )
        .replace("models/tiny.gguf", "../models/tiny.gguf")
        .replace("data/prompts.jsonl", "../data/prompts.jsonl");
    std::fs::write(&file, text).unwrap();
    let p = Pipeline::from_path(&file).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(p.name, "my-run");
    assert_eq!(p.prompts.source, dir.path().join("data/prompts.jsonl"));
    assert_eq!(p.workdir, dir.path().join("pipelines/runs"));

    let missing = Pipeline::from_path(&dir.path().join("nope.yaml")).unwrap_err();
    assert_eq!(missing.len(), 1);
    assert!(
        missing
            .to_string()
            .starts_with("error: cannot read the pipeline file: no such file"),
        "{missing}"
    );
}

fn ticked(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[test]
fn wire_field_lists_match_serde() {
    // The block-by-block checker reads the fields from the derives; they must be the ones
    // serde names in its own message.
    use crate::validate::fields::fields_of;
    let err = serde_yaml_ng::from_str::<crate::wire::PipelineWire>("bogus: 1")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!(
            "expected one of {}",
            ticked(fields_of::<crate::wire::PipelineWire>())
        )),
        "{err}"
    );
    let err = serde_yaml_ng::from_str::<crate::wire::RoundsWire>("bogus: 1")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!(
            "expected one of {}",
            ticked(fields_of::<crate::wire::RoundsWire>())
        )),
        "{err}"
    );
}

/// The fields serde accepts for `T`, from its unknown-field message, in its order.
fn serde_fields<T: serde::de::DeserializeOwned + std::fmt::Debug>() -> Vec<String> {
    let err = serde_yaml_ng::from_str::<T>("bogus_field: 1")
        .unwrap_err()
        .to_string();
    let expected = err
        .split_once(", expected ")
        .unwrap_or_else(|| panic!("no field list in {err:?}"))
        .1;
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

#[test]
fn known_fields_table_matches_serde() {
    // The generated table has a row for every wire struct at every place it is used, with
    // the fields serde's own message names.
    use crate::validate::fields::{child_pattern, fields_of, KNOWN_FIELDS};
    use crate::wire::*;
    let table: Vec<(&str, Vec<String>)> = KNOWN_FIELDS
        .iter()
        .map(|(p, f)| (p.as_str(), f.iter().map(|s| s.to_string()).collect()))
        .collect();
    let from_serde = vec![
        ("", serde_fields::<PipelineWire>()),
        ("models.*", serde_fields::<ModelWire>()),
        ("prompts", serde_fields::<PromptsWire>()),
        ("prompts.fields", serde_fields::<FieldsWire>()),
        ("prompts.leak_check", serde_fields::<LeakCheckWire>()),
        ("rounds", serde_fields::<RoundsWire>()),
        ("rounds.generate", serde_fields::<GenerateWire>()),
        ("rounds.generate.sampling", serde_fields::<Sampling>()),
        ("rounds.correct", serde_fields::<CorrectWire>()),
        ("rounds.correct.sampling", serde_fields::<Sampling>()),
        ("rounds.synthesize", serde_fields::<SynthesizeWire>()),
        ("rounds.synthesize.semantic", serde_fields::<SemanticWire>()),
        (
            "rounds.synthesize.benign_refusals",
            serde_fields::<LabelsWire>(),
        ),
        (
            "rounds.synthesize.benign_preference",
            serde_fields::<BenignPreferenceWire>(),
        ),
        ("rounds.train", serde_fields::<TrainWire>()),
        ("rounds.train.backend", serde_fields::<BackendWire>()),
        ("rounds.train.backend.lora", serde_fields::<LoraWire>()),
        ("rounds.train.serve", serde_fields::<ServeWire>()),
        ("rounds.train.replay", serde_fields::<ReplayWire>()),
        ("rounds.evaluate", serde_fields::<EvaluateWire>()),
        ("rounds.evaluate.sampling", serde_fields::<Sampling>()),
        ("rounds.evaluate.judge_sampling", serde_fields::<Sampling>()),
        ("rounds.evaluate.labels", serde_fields::<LabelsWire>()),
        ("rounds.evaluate.gate", serde_fields::<GateWire>()),
        ("aligner", serde_fields::<AlignerWire>()),
        ("aligner.teach", serde_fields::<TeachWire>()),
        ("aligner.teach.prompts", serde_fields::<PromptsWire>()),
        ("aligner.teach.prompts.fields", serde_fields::<FieldsWire>()),
        (
            "aligner.teach.prompts.leak_check",
            serde_fields::<LeakCheckWire>(),
        ),
        ("aligner.teach.answer", serde_fields::<AnswerWire>()),
        ("aligner.teach.answer.sampling", serde_fields::<Sampling>()),
        ("aligner.teach.teacher", serde_fields::<TeacherWire>()),
        ("aligner.teach.teacher.sampling", serde_fields::<Sampling>()),
        ("aligner.labels", serde_fields::<LabelsWire>()),
        ("aligner.train", serde_fields::<AlignerTrainWire>()),
        ("aligner.train.lora", serde_fields::<LoraWire>()),
        ("aligner.sampling", serde_fields::<Sampling>()),
        ("prices.*", serde_fields::<PriceWire>()),
        ("budget", serde_fields::<BudgetWire>()),
    ];
    assert_eq!(table, from_serde);

    // The per-kind model lists of validation cover `ModelWire` exactly, under serde's names.
    let model: ModelWire = serde_yaml_ng::from_str("kind: local").unwrap();
    let mut by_kind: Vec<&str> = vec!["kind"];
    by_kind.extend(model.fields_for(ModelKind::Openai));
    by_kind.extend(model.fields_for(ModelKind::Local));
    assert_eq!(by_kind, fields_of::<ModelWire>());

    // Patterns: model names match `*`, everything else by name.
    assert_eq!(child_pattern("models", "up"), "models.*");
    assert_eq!(child_pattern("", "rounds"), "rounds");
    assert_eq!(
        child_pattern("rounds.train", "backend"),
        "rounds.train.backend"
    );
}

// ----- broken pipelines -------------------------------------------------------------

#[test]
fn error_unknown_field_with_typo() {
    let dir = setup();
    let text = full_with(
        "sampling: { temperature: 0.5",
        "sampling: { temprature: 0.5",
    );
    insta::assert_snapshot!(errors(&dir, &text), @r"
    error: unknown field `temprature`
      --> pipelines/x.yaml:33:17
       at: rounds.generate.sampling.temprature
      hint: did you mean `temperature`?
    ");
}

#[test]
fn error_unknown_field_in_block_mapping() {
    let dir = setup();
    let text = full_with(
        "    drop_empty: true\n",
        "    drop_empty: true\n    sparkle: true\n",
    );
    insta::assert_snapshot!(errors(&dir, &text), @r"
    error: unknown field `sparkle`
      --> pipelines/x.yaml:43:5
       at: rounds.synthesize.sparkle
      hint: valid fields here: `drop_identical`, `min_edit_distance`, `length_ratio`, `drop_empty`, `drop_truncated`, `dedupe_prompts`, `max_pairs`, `semantic`, `benign_refusals`, `benign_preference`
    ");
}

#[test]
fn error_wrong_type() {
    let dir = setup();
    let text = full_with("    n: 1\n", "    n: many\n");
    insta::assert_snapshot!(errors(&dir, &text), @r#"
    error: invalid type: string "many", expected a whole number
      --> pipelines/x.yaml:32:8
       at: rounds.generate.n
    "#);
}

#[test]
fn error_several_blocks_at_once() {
    let dir = setup();
    let text = full_with("  seed: 7\n", "  seeds: 7\n")
        .replace("max_retries: 5", "max_retries: -1")
        .replace("count: 2", "count: two");
    insta::assert_snapshot!(errors(&dir, &text), @r#"
    error: `weights` is required: the generate model `upstream` is `kind: openai` and round 1's trainer gets its weights as `{base_model}`, not the name a server gives them
      --> pipelines/x.yaml:6:3
       at: models.upstream
      hint: the path or hub id of the served model's weights, e.g. `weights: Qwen/Qwen2.5-7B-Instruct` or `weights: /models/upstream`

    error: invalid value: integer `-1`, expected a whole number
      --> pipelines/x.yaml:15:18
       at: models.upstream.max_retries

    error: unknown field `seeds`
      --> pipelines/x.yaml:26:3
       at: prompts.seeds
      hint: did you mean `seed`?

    error: invalid type: string "two", expected a whole number
      --> pipelines/x.yaml:29:10
       at: rounds.count
    "#);
}

#[test]
fn error_missing_prompts_file() {
    let dir = setup();
    let text = full_with("source: data/prompts.jsonl", "source: data/missing.jsonl");
    insta::assert_snapshot!(errors(&dir, &text), @r"
    error: prompts file `data/missing.jsonl` does not exist
      --> pipelines/x.yaml:22:11
       at: prompts.source
      hint: resolved to `[TMP]/data/missing.jsonl`
    ");
}

#[test]
fn error_undefined_model_names() {
    let dir = setup();
    let text =
        full_with("model: aligner", "model: alignr").replace("judge: upstream", "judge: gpt4");
    insta::assert_snapshot!(errors(&dir, &text), @r"
    error: model `alignr` is not defined in `models`
      --> pipelines/x.yaml:35:12
       at: rounds.correct.model
      hint: did you mean `aligner`?

    error: model `gpt4` is not defined in `models`
      --> pipelines/x.yaml:64:12
       at: rounds.evaluate.judge
      hint: models defined: `aligner`, `upstream`
    ");
}

#[test]
fn error_out_of_range() {
    let dir = setup();
    let text = full_with("temperature: 0.5", "temperature: 3").replace(
        "top_p: 0.95, top_k: 10, frequency_penalty: 1.2",
        "top_p: 0, top_k: 10, frequency_penalty: 2.5",
    );
    insta::assert_snapshot!(errors(&dir, &text), @r"
    error: `temperature` must be between 0 and 2, got `3`
      --> pipelines/x.yaml:33:30
       at: rounds.generate.sampling.temperature

    error: `top_p` must be more than 0 and at most 1, got `0`
      --> pipelines/x.yaml:37:42
       at: rounds.correct.sampling.top_p

    error: `frequency_penalty` must be between -2 and 2, got `2.5`
      --> pipelines/x.yaml:37:75
       at: rounds.correct.sampling.frequency_penalty
    ");
}

#[test]
fn error_bad_version() {
    let dir = setup();
    insta::assert_snapshot!(errors(&dir, &full_with("version: 1", "version: 2")), @r"
    error: unsupported version `2`
      --> pipelines/x.yaml:1:10
       at: version
      hint: this aligner reads `version: 1`
    ");
    insta::assert_snapshot!(errors(&dir, &full_with("version: 1\n", "")), @r"
    error: missing field `version`
      --> pipelines/x.yaml:1:1
      hint: add `version: 1`
    ");
}

#[test]
fn error_unset_env_var() {
    let dir = setup();
    let text = full_with(
        "base_url: ${OPENAI_BASE_URL}",
        "base_url: ${MY_SERVER_URL}/v1",
    );
    insta::assert_snapshot!(errors(&dir, &text), @r"
    error: environment variable `MY_SERVER_URL` is not set
      --> pipelines/x.yaml:8:15
       at: models.upstream.base_url
      hint: `export MY_SERVER_URL=...`, or give a default: `${MY_SERVER_URL:-...}`
    ");
}

#[test]
fn error_bad_enum_value() {
    let dir = setup();
    insta::assert_snapshot!(errors(&dir, &full_with("method: dpo", "method: dpoo")), @r"
    error: unknown variant `dpoo`, expected `dpo` or `sft`
      --> pipelines/x.yaml:47:13
       at: rounds.train.method
      hint: did you mean `dpo`?
    ");
    insta::assert_snapshot!(errors(&dir, &full_with("loss: sigmoid", "loss: squared")), @r"
    error: unknown variant `squared`, expected one of `sigmoid`, `ipo`, `hinge`, `robust`, `apo_zero`, `apo_down`, `sigmoid_nll`
      --> pipelines/x.yaml:49:11
       at: rounds.train.loss
    ");
}

#[test]
fn error_custom_template_without_answer() {
    let dir = setup();
    let text = full_with(
        "template: aligner-v1",
        "template: \"Fix this answer to {question}\"",
    );
    insta::assert_snapshot!(errors(&dir, &text), @r"
    error: custom template is missing `{answer}`
      --> pipelines/x.yaml:36:15
       at: rounds.correct.template
      hint: write `{question}` and `{answer}` where the question and the answer go, or use a built-in template: `aligner-v1`, `aligner-general`, `aligner-empathy`, `aligner-v1-multiturn`
    ");
    insta::assert_snapshot!(errors(&dir, &full_with("template: aligner-v1", "template: aligner-v2")), @r"
    error: unknown template `aligner-v2`
      --> pipelines/x.yaml:36:15
       at: rounds.correct.template
      hint: did you mean `aligner-v1`?
    ");
}

#[test]
fn error_api_key_in_api_key_env() {
    let dir = setup();
    let text = full_with(
        "api_key_env: OPENAI_API_KEY",
        "api_key_env: sk-proj-abcdef1234567890",
    );
    let out = errors(&dir, &text);
    assert!(!out.contains("abcdef"), "the key must never be echoed");
    insta::assert_snapshot!(out, @r"
    error: `api_key_env` looks like an api key; it must be the name of an environment variable
      --> pipelines/x.yaml:10:18
       at: models.upstream.api_key_env
      hint: keep the key out of the file: `export OPENAI_API_KEY=...` and write `api_key_env: OPENAI_API_KEY`
    ");
}

#[test]
fn error_yaml_syntax() {
    let dir = setup();
    let text = full_with("  count: 2\n", "  count: [2\n");
    insta::assert_snapshot!(errors(&dir, &text), @r"
    error: invalid yaml: while parsing a flow sequence, expected ',' or ']'
      --> pipelines/x.yaml:31:10
    ");
    insta::assert_snapshot!(errors(&dir, &full_with("  seed: 7\n", "  seed: 7\n  seed: 8\n")), @r"
    error: duplicate key `seed`
      --> pipelines/x.yaml:27:3
       at: prompts.seed
      hint: each key may appear only once in a mapping
    ");
}

#[test]
fn error_serve_model_and_command() {
    let dir = setup();
    let text = full_with("      serve_model: \"ckpt-round-{round}\"\n", "")
        .replace(" --out {output_dir}", "");
    insta::assert_snapshot!(errors(&dir, &text), @r#"
    error: `serve_model` is required: the generate model `upstream` is `kind: openai`
      --> pipelines/x.yaml:57:5
       at: rounds.train.backend
      hint: the name under which your server will serve the new checkpoint, e.g. `serve_model: "ckpt-round-{round}"` (`{round}` and `{output_dir}` are filled in)

    error: `command` does not use `{output_dir}`
      --> pipelines/x.yaml:59:16
       at: rounds.train.backend.command
      hint: the trainer must write the new checkpoint to `{output_dir}`; also available: `{data}`, `{base_model}`, `{round}`
    "#);
}

#[test]
fn error_model_fields_and_files() {
    let dir = setup();
    std::fs::write(dir.path().join("models/fake.gguf"), "not really").unwrap();
    let text = full_with(
        "path: models/tiny.gguf",
        "path: models/fake.gguf\n    base_url: http://x",
    )
    .replace("timeout: 60", "timeout: soon")
    .replace("max_concurrency: 16", "max_concurrency: 0");
    // `upstream` has a type error, so its other checks wait; `aligner` is still checked.
    insta::assert_snapshot!(errors(&dir, &text), @r"
    error: `weights` is required: the generate model `upstream` is `kind: openai` and round 1's trainer gets its weights as `{base_model}`, not the name a server gives them
      --> pipelines/x.yaml:6:3
       at: models.upstream
      hint: the path or hub id of the served model's weights, e.g. `weights: Qwen/Qwen2.5-7B-Instruct` or `weights: /models/upstream`

    error: invalid duration `soon`, expected a number of seconds or a string like `500ms`, `60s`, `2m`
      --> pipelines/x.yaml:14:14
       at: models.upstream.timeout

    error: `models/fake.gguf` is not a GGUF file
      --> pipelines/x.yaml:19:11
       at: models.aligner.path
      hint: its first bytes are not `GGUF`; give a `.gguf` file or a Hugging Face model folder

    error: field `base_url` does not apply to `kind: local`
      --> pipelines/x.yaml:20:5
       at: models.aligner.base_url
      hint: `kind: local` takes `path`, `hub`, `revision`, `dtype`
    ");
    let text = full_with(
        "path: models/tiny.gguf",
        "path: models/fake.gguf\n    base_url: http://x",
    )
    .replace("max_concurrency: 16", "max_concurrency: 0");
    insta::assert_snapshot!(errors(&dir, &text), @r"
    error: `max_concurrency` must be between 1 and 4096, got `0`
      --> pipelines/x.yaml:11:22
       at: models.upstream.max_concurrency

    error: `models/fake.gguf` is not a GGUF file
      --> pipelines/x.yaml:19:11
       at: models.aligner.path
      hint: its first bytes are not `GGUF`; give a `.gguf` file or a Hugging Face model folder

    error: field `base_url` does not apply to `kind: local`
      --> pipelines/x.yaml:20:5
       at: models.aligner.base_url
      hint: `kind: local` takes `path`, `hub`, `revision`, `dtype`
    ");
}

#[test]
fn error_empty_file_and_not_a_mapping() {
    let dir = setup();
    insta::assert_snapshot!(errors(&dir, ""), @r"
    error: the pipeline file is empty
      --> pipelines/x.yaml
      hint: start with `version: 1`
    ");
    insta::assert_snapshot!(errors(&dir, "- a\n- b\n"), @r"
    error: invalid type: sequence, expected a pipeline mapping (`version: 1`, `models:`, `prompts:`, `rounds:`)
      --> pipelines/x.yaml:1:1
    ");
}

#[test]
fn error_missing_or_empty_models() {
    let dir = setup();
    let rest = &FULL[FULL.find("prompts:").unwrap()..];
    insta::assert_snapshot!(errors(&dir, &format!("version: 1\nmodels:\n{rest}")), @r"
    error: `models` is empty
      --> pipelines/x.yaml:2:1
       at: models
      hint: define at least one model, e.g. `upstream:` with `kind: openai`
    ");
    insta::assert_snapshot!(errors(&dir, &format!("version: 1\n{rest}")), @r"
    error: missing field `models`
      --> pipelines/x.yaml:1:1
      hint: define at least one model, e.g. `upstream:` with `kind: openai`
    ");
}

#[test]
fn error_many_mistakes_in_one_pass() {
    let dir = setup();
    let text = r#"version: 1
models:
  up: {kind: openai, base_url: "http://x/v1", model: m, api_key_env: sk-abc123}
prompts: {source: nope.jsonl}
rounds:
  count: 0
  generate: {model: up, sampling: {temperature: 3, temprature: 1}}
  correct: {model: aligner, template: "fix {question}"}
  train: {method: dpoo}
"#;
    insta::assert_snapshot!(errors(&dir, text), @r"
    error: `api_key_env` looks like an api key; it must be the name of an environment variable
      --> pipelines/x.yaml:3:70
       at: models.up.api_key_env
      hint: keep the key out of the file: `export OPENAI_API_KEY=...` and write `api_key_env: OPENAI_API_KEY`

    error: prompts file `nope.jsonl` does not exist
      --> pipelines/x.yaml:4:19
       at: prompts.source
      hint: resolved to `[TMP]/nope.jsonl`

    error: `count` must be between 1 and 100, got `0`
      --> pipelines/x.yaml:6:10
       at: rounds.count

    error: `temperature` must be between 0 and 2, got `3`
      --> pipelines/x.yaml:7:49
       at: rounds.generate.sampling.temperature

    error: unknown field `temprature`
      --> pipelines/x.yaml:7:52
       at: rounds.generate.sampling.temprature
      hint: did you mean `temperature`?

    error: model `aligner` is not defined in `models`
      --> pipelines/x.yaml:8:20
       at: rounds.correct.model
      hint: models defined: `up`

    error: custom template is missing `{answer}`
      --> pipelines/x.yaml:8:39
       at: rounds.correct.template
      hint: write `{question}` and `{answer}` where the question and the answer go, or use a built-in template: `aligner-v1`, `aligner-general`, `aligner-empathy`, `aligner-v1-multiturn`

    error: missing field `backend`
      --> pipelines/x.yaml:9:3
       at: rounds.train

    error: unknown variant `dpoo`, expected `dpo` or `sft`
      --> pipelines/x.yaml:9:19
       at: rounds.train.method
      hint: did you mean `dpo`?
    ");
}

#[test]
fn error_every_unknown_field_at_once() {
    let dir = setup();
    let text = full_with("  seed: 7\n", "  sed: 7\n")
        .replace("dtype: auto", "dtype: auto\n    colour: red")
        .replace("count: 2", "count: 2\n  extra: 1")
        .replace("workdir: runs", "workdir: runs\nfoo: bar")
        .replace("format: jsonl", "formt: jsonl");
    insta::assert_snapshot!(errors(&dir, &text), @r"
    error: unknown field `foo`
      --> pipelines/x.yaml:5:1
       at: foo
      hint: valid fields here: `version`, `name`, `store`, `workdir`, `models`, `prompts`, `rounds`, `aligner`, `prices`, `budget`

    error: unknown field `colour`
      --> pipelines/x.yaml:22:5
       at: models.aligner.colour
      hint: valid fields here: `kind`, `base_url`, `model`, `api_key_env`, `max_concurrency`, `requests_per_minute`, `tokens_per_minute`, `timeout`, `max_retries`, `raw_endpoint`, `weights`, `replicas`, `replica_concurrency`, `path`, `hub`, `revision`, `dtype`

    error: unknown field `sed`
      --> pipelines/x.yaml:28:3
       at: prompts.sed
      hint: did you mean `seed`?

    error: unknown field `extra`
      --> pipelines/x.yaml:32:3
       at: rounds.extra
      hint: valid fields here: `count`, `generate`, `correct`, `synthesize`, `train`, `evaluate`

    error: unknown field `formt`
      --> pipelines/x.yaml:63:7
       at: rounds.train.backend.formt
      hint: did you mean `format`?
    ");
}

#[test]
fn error_misspelled_required_fields_are_not_also_missing() {
    // Each typo would also leave a required field missing; only the typo is reported.
    let dir = setup();
    let text = full_with(
        "    model: upstream\n    n: 1",
        "    modle: upstream\n    n: 1",
    )
    .replace("path: models/tiny.gguf", "pth: models/tiny.gguf")
    .replace("      command:", "      comand:")
    .replace("      serve_model:", "      serve_modle:")
    .replace("prompts:\n", "promts:\n");
    insta::assert_snapshot!(errors(&dir, &text), @r"
    error: unknown field `pth`
      --> pipelines/x.yaml:19:5
       at: models.aligner.pth
      hint: did you mean `path`?

    error: unknown field `promts`
      --> pipelines/x.yaml:21:1
       at: promts
      hint: did you mean `prompts`?

    error: unknown field `modle`
      --> pipelines/x.yaml:31:5
       at: rounds.generate.modle
      hint: did you mean `model`?

    error: unknown field `comand`
      --> pipelines/x.yaml:59:7
       at: rounds.train.backend.comand
      hint: did you mean `command`?

    error: unknown field `serve_modle`
      --> pipelines/x.yaml:62:7
       at: rounds.train.backend.serve_modle
      hint: did you mean `serve_model`?
    ");
}

#[test]
fn error_several_type_errors_in_one_block() {
    // After each error the broken field is dropped and the block is read again; the
    // dropped `model` is not then reported as missing.
    let dir = setup();
    let text = full_with("    n: 1\n", "    n: many\n")
        .replace("    model: upstream\n    n", "    model: [upstream]\n    n")
        .replace("seed: 1, stop", "seed: x, stop")
        .replace("      kind: command", "      kind: cmd")
        .replace("beta: 0.1", "beta: high");
    insta::assert_snapshot!(errors(&dir, &text), @r#"
    error: invalid type: sequence, expected a string
      --> pipelines/x.yaml:31:12
       at: rounds.generate.model

    error: invalid type: string "many", expected a whole number
      --> pipelines/x.yaml:32:8
       at: rounds.generate.n

    error: invalid type: string "x", expected a whole number
      --> pipelines/x.yaml:33:154
       at: rounds.generate.sampling.seed

    error: invalid type: string "high", expected a number
      --> pipelines/x.yaml:48:11
       at: rounds.train.beta

    error: unknown variant `cmd`, expected one of `command`, `ray`, `slurm`, `builtin`
      --> pipelines/x.yaml:58:13
       at: rounds.train.backend.kind
    "#);
}

#[test]
fn error_broken_models_block_skips_model_references() {
    let dir = setup();
    let rest = &FULL[FULL.find("prompts:").unwrap()..];
    let text = format!("version: 1\nmodels: 5\n{rest}").replace("model: aligner", "model: nobody");
    insta::assert_snapshot!(errors(&dir, &text), @r"
    error: invalid type: integer `5`, expected a map
      --> pipelines/x.yaml:2:9
       at: models
    ");
    // A broken entry still defines its name.
    let text = full_with("timeout: 60", "timeout: [60]");
    insta::assert_snapshot!(errors(&dir, &text), @r"
    error: `weights` is required: the generate model `upstream` is `kind: openai` and round 1's trainer gets its weights as `{base_model}`, not the name a server gives them
      --> pipelines/x.yaml:6:3
       at: models.upstream
      hint: the path or hub id of the served model's weights, e.g. `weights: Qwen/Qwen2.5-7B-Instruct` or `weights: /models/upstream`

    error: invalid type: sequence, expected a number of seconds or a duration like `500ms`, `60s`, `2m`
      --> pipelines/x.yaml:14:14
       at: models.upstream.timeout
    ");
}

// ----- the pipeline's own Aligner (`aligner:`) ----------------------------------------

/// `FULL` with a local upstream, the trained Aligner as the corrector, and `aligner:`.
fn with_aligner(block: &str) -> String {
    let text = full_with(
        "    model: aligner\n    template",
        "    model: trained\n    template",
    )
    .replace(
        "  generate:\n    model: upstream",
        "  generate:\n    model: aligner",
    );
    format!("{text}{block}")
}

const TEACH: &str = r#"aligner:
  name: trained
  base: aligner
  teach:
    prompts: { source: data/prompts.jsonl, fields: { metadata: [category] } }
    teacher: { kind: refusal }
  labels: { field: category, harmful: [crime] }
  holdout: 0.25
  train: { epochs: 2, learning_rate: 1.0e-4, train_layers: 4 }
"#;

#[test]
fn an_aligner_block_with_a_refusal_teacher_validates() {
    let dir = setup();
    let p = load(&dir, &with_aligner(TEACH)).unwrap();
    let a = p.aligner.clone().expect("aligner block");
    assert_eq!(a.name, "trained");
    assert_eq!(a.template, Template::AlignerV1);
    assert_eq!(a.holdout, 0.25);
    assert_eq!(a.train.epochs, 2);
    assert_eq!(a.train.warmup_fraction, 0.2);
    assert_eq!(a.train.options.train_layers, Some(4));
    assert_eq!(a.train.options.save_every, 20);
    let AlignerData::Teach(t) = &a.data else {
        panic!("teach data")
    };
    // The answers default to the generate stage's model and sampling.
    assert_eq!(t.answer_model, "aligner");
    assert_eq!(t.answer_sampling.max_tokens, Some(256));
    match &t.teacher {
        Teacher::Refusal { texts } => assert_eq!(texts.len(), REFUSAL_TEXTS.len()),
        other => panic!("{other:?}"),
    }
    // The Aligner's sampling defaults to the correct stage's.
    assert_eq!(a.sampling.temperature, Some(0.3));
    // The block is in the snapshot (so a changed recipe is a changed run) ...
    assert!(p.snapshot().get("aligner").is_some());
    // ... and a pipeline without it hashes as before it existed.
    let plain = load(&dir, FULL).unwrap();
    assert!(plain.snapshot().get("aligner").is_none());
}

#[test]
fn aligner_block_errors_name_the_place_and_the_fix() {
    let dir = setup();
    let text = with_aligner(
        &TEACH
            .replace("  labels: { field: category, harmful: [crime] }\n", "")
            .replace("train_layers: 4", "train_layers: 4, lora: { rank: 8 }"),
    )
    .replace(
        "    template: aligner-v1\n    sampling: { temperature: 0.3",
        "    template: aligner-general\n    sampling: { temperature: 0.3",
    );
    insta::assert_snapshot!(errors(&dir, &text), @r"
    error: the trained Aligner `trained` is trained with the template `aligner-v1`, but `rounds.correct.template` is `aligner-general`
      --> pipelines/x.yaml:36:15
       at: rounds.correct.template
      hint: use the same template in both places, so the Aligner reads the prompts it was trained on

    error: the refusal teacher needs `aligner.labels` to tell harmful prompts from benign ones
      --> pipelines/x.yaml:70:1
       at: aligner
      hint: e.g. `labels: { field: source, harmful: [strongreject, harmbench] }`

    error: `train_layers` and `lora` exclude each other
      --> pipelines/x.yaml:77:46
       at: aligner.train.train_layers
      hint: LoRA adapts every layer's named projections; `train_layers` trains the last N layers fully
    ");
}

#[test]
fn the_aligner_name_cannot_shadow_a_model() {
    let dir = setup();
    let text = with_aligner(&TEACH.replace("name: trained", "name: upstream"));
    let out = errors(&dir, &text);
    assert!(
        out.contains("the trained Aligner's name `upstream` is also a key of `models`"),
        "{out}"
    );
}

#[test]
fn fixed_held_out_file_and_leak_check() {
    let dir = setup();
    let folder = embedder_folder(&dir);
    std::fs::write(dir.path().join("data/held.jsonl"), "{\"prompt\": \"ho\"}\n").unwrap();
    let text = full_with(
        "  holdout: 0.1\n",
        "  holdout_source: data/held.jsonl\n  leak_check: { embedder: models/minilm }\n",
    );
    let p = load(&dir, &text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        p.prompts.holdout_source,
        Some(dir.path().join("data/held.jsonl"))
    );
    assert_eq!(
        p.prompts.leak_check,
        Some(LeakCheck {
            embedder: folder,
            max_similarity: 0.9
        })
    );
    // Unset, neither is in the snapshot: the hashes of older specs stay the same.
    let plain = load(&dir, FULL).unwrap().snapshot();
    assert!(plain["prompts"].get("holdout_source").is_none());
    assert!(plain["prompts"].get("leak_check").is_none());

    let e = errors(
        &dir,
        &full_with(
            "  holdout: 0.1\n",
            "  holdout: 0.1\n  holdout_source: data/nope.jsonl\n  leak_check: { embedder: models/minilm, max_similarity: 0 }\n",
        ),
    );
    assert!(
        e.contains("prompts file `data/nope.jsonl` does not exist"),
        "{e}"
    );
    assert!(e.contains("at: prompts.holdout_source"), "{e}");
    assert!(e.contains("at: prompts.leak_check.max_similarity"), "{e}");
    let e = errors(
        &dir,
        &full_with(
            "  holdout: 0.1\n",
            "  holdout: 0.1\n  holdout_source: data/held.jsonl\n",
        ),
    );
    assert!(
        e.contains("both `holdout` and `holdout_source` are set"),
        "{e}"
    );
}

#[test]
fn benign_refusals_rule() {
    let dir = setup();
    let text = full_with(
        "    max_pairs: 1000\n",
        "    max_pairs: 1000\n    benign_refusals: { field: category, harmful: [bad] }\n",
    );
    let p = load(&dir, &text).unwrap_or_else(|e| panic!("{e}"));
    let rule = p.rounds.synthesize.benign_refusals.clone().unwrap();
    let meta = |v: &str| serde_json::json!({ "category": v });
    assert!(rule.is_harmful(Some(&meta("bad"))));
    assert!(!rule.is_harmful(Some(&meta("fine"))));
    assert!(!rule.is_harmful(None));
    // Unset, it is not in the snapshot.
    let plain = load(&dir, FULL).unwrap().snapshot();
    assert!(plain["rounds"]["synthesize"]
        .get("benign_refusals")
        .is_none());
    // The field must be read from the prompts file.
    let e = errors(&dir, &text.replace("field: category", "field: topic"));
    assert!(
        e.contains("`topic` is not among `prompts.fields.metadata`"),
        "{e}"
    );
    assert!(
        e.contains("at: rounds.synthesize.benign_refusals.field"),
        "{e}"
    );
}

#[test]
fn benign_preference_rule() {
    let dir = setup();
    let text = full_with(
        "    max_pairs: 1000\n",
        "    max_pairs: 1000\n    benign_preference: { field: category, harmful: [bad] }\n",
    );
    let p = load(&dir, &text).unwrap_or_else(|e| panic!("{e}"));
    let b = p.rounds.synthesize.benign_preference.clone().unwrap();
    assert!(b
        .labels
        .is_harmful(Some(&serde_json::json!({ "category": "bad" }))));
    assert_eq!(b.refusals, crate::REFUSAL_TEXTS.map(String::from).to_vec());
    let snap = p.snapshot();
    assert_eq!(
        snap["rounds"]["synthesize"]["benign_preference"]["labels"]["field"],
        "category"
    );
    // Own texts replace the teacher's; an empty one is an error at its place.
    let own = text.replace("harmful: [bad] }", "harmful: [bad], refusals: [\"No.\"] }");
    let p = load(&dir, &own).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        p.rounds.synthesize.benign_preference.unwrap().refusals,
        ["No."]
    );
    let e = errors(&dir, &own.replace("\"No.\"", "\" \""));
    assert!(
        e.contains("at: rounds.synthesize.benign_preference.refusals"),
        "{e}"
    );
    // The field must be read from the prompts file.
    let e = errors(&dir, &text.replace("field: category", "field: topic"));
    assert!(
        e.contains("at: rounds.synthesize.benign_preference.field"),
        "{e}"
    );
    // With it, dropping the Aligner's benign refusals is already covered.
    let both = text.replace(
        "    benign_preference:",
        "    benign_refusals: { field: category, harmful: [bad] }\n    benign_preference:",
    );
    let e = errors(&dir, &both);
    assert!(
        e.contains("both `benign_refusals` and `benign_preference` are set"),
        "{e}"
    );
}

#[test]
fn prices_and_budget() {
    let dir = setup();
    let text = format!(
        "{FULL}prices:\n  upstream: {{ input: 0.15, output: 0.6 }}\n  aligner: {{ per_hour: 2.5 }}\nbudget: {{ max_cost: 20 }}\n"
    );
    let p = load(&dir, &text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        p.prices["upstream"],
        Price {
            input: 0.15,
            output: 0.6,
            per_hour: 0.0
        }
    );
    assert_eq!(p.prices["aligner"].per_hour, 2.5);
    assert_eq!(p.budget, Some(Budget { max_cost: 20.0 }));
    // Unset, neither is in the snapshot (older runs' hashes stay the same).
    let plain = load(&dir, FULL).unwrap().snapshot();
    assert!(plain.get("prices").is_none() && plain.get("budget").is_none());
    let bad = text
        .replace("upstream: { input", "upstreem: { input")
        .replace("per_hour: 2.5", "per_hour: -1")
        .replace("max_cost: 20", "max_cost: 0");
    let e = errors(&dir, &bad);
    assert!(
        e.contains("`upstreem` is not a model of this pipeline"),
        "{e}"
    );
    assert!(e.contains("at: prices.aligner.per_hour"), "{e}");
    assert!(e.contains("at: budget.max_cost"), "{e}");
}

#[test]
fn a_ray_backend_submits_the_command_to_the_cluster() {
    let dir = setup();
    let text = full_with(
        "      kind: command\n",
        "      kind: ray\n      address: http://127.0.0.1:8265/\n      runtime_env: { env_vars: { HF_HOME: /shared/hf } }\n      entrypoint_num_gpus: 1\n      metadata: { team: alignment }\n",
    );
    let spec = load(&dir, &text).expect("valid");
    let TrainBackend::Ray { trainer, cluster } = &spec.rounds.train.as_ref().unwrap().backend
    else {
        panic!("not a ray backend");
    };
    assert!(trainer.command.contains("{output_dir}"));
    assert_eq!(trainer.serve_model.as_deref(), Some("ckpt-round-{round}"));
    assert_eq!(cluster.address, "http://127.0.0.1:8265");
    assert_eq!(
        cluster.runtime_env,
        Some(serde_json::json!({"env_vars": {"HF_HOME": "/shared/hf"}}))
    );
    assert_eq!(cluster.entrypoint_num_gpus, Some(1.0));
    assert_eq!(cluster.entrypoint_num_cpus, None);
    assert_eq!(cluster.metadata["team"], "alignment");
    assert_eq!(cluster.poll_seconds, 2.0);
}

#[test]
fn error_ray_backend_fields() {
    let dir = setup();
    let text = full_with(
        "      kind: command\n",
        "      kind: ray\n      runtime_env: [pip]\n      entrypoint_num_gpus: -1\n",
    );
    insta::assert_snapshot!(errors(&dir, &text), @r"
    error: missing field `address` for `kind: ray`
      --> pipelines/x.yaml:57:5
       at: rounds.train.backend
      hint: the Ray dashboard's address, e.g. `address: ${RAY_ADDRESS:-http://127.0.0.1:8265}`

    error: `runtime_env` must be a mapping (Ray's runtime environment)
      --> pipelines/x.yaml:59:20
       at: rounds.train.backend.runtime_env
      hint: e.g. `runtime_env: {env_vars: {HF_HOME: /shared/hf}}`

    error: `entrypoint_num_gpus` must be at least 0, got `-1`
      --> pipelines/x.yaml:60:28
       at: rounds.train.backend.entrypoint_num_gpus
    ");
    let text = full_with(
        "      kind: command\n",
        "      kind: ray\n      address: 127.0.0.1:6379\n",
    );
    insta::assert_snapshot!(errors(&dir, &text), @r"
    error: `address` must be the dashboard's http(s) URL, got `127.0.0.1:6379`
      --> pipelines/x.yaml:59:16
       at: rounds.train.backend.address
      hint: e.g. `http://127.0.0.1:8265` (the dashboard port, not the GCS port 6379)
    ");
    let text = full_with(
        "      kind: command\n",
        "      kind: command\n      address: http://127.0.0.1:8265\n",
    );
    insta::assert_snapshot!(errors(&dir, &text), @r"
    error: field `address` applies to `kind: ray` only
      --> pipelines/x.yaml:59:7
       at: rounds.train.backend.address
    ");
}

#[test]
fn a_slurm_backend_submits_a_batch_job() {
    let dir = setup();
    let text = full_with(
        "      kind: command\n",
        "      kind: slurm\n      partition: gpu\n      time: \"04:00:00\"\n      gpus: \"8\"\n      cpus_per_task: 16\n      sbatch: [\"--account=alignment\"]\n",
    );
    let spec = load(&dir, &text).expect("valid");
    let TrainBackend::Slurm { trainer, cluster } = &spec.rounds.train.as_ref().unwrap().backend
    else {
        panic!("not a slurm backend");
    };
    assert_eq!(trainer.serve_model.as_deref(), Some("ckpt-round-{round}"));
    assert_eq!(cluster.partition.as_deref(), Some("gpu"));
    assert_eq!(cluster.time.as_deref(), Some("04:00:00"));
    assert_eq!(cluster.gpus.as_deref(), Some("8"));
    assert_eq!(cluster.cpus_per_task, Some(16));
    assert_eq!(cluster.sbatch, vec!["--account=alignment".to_string()]);
    assert_eq!(cluster.poll_seconds, 5.0);
}

#[test]
fn error_slurm_backend_fields() {
    let dir = setup();
    let text = full_with(
        "      kind: command\n",
        "      kind: slurm\n      address: http://127.0.0.1:8265\n      nodes: 0\n      sbatch: [\"account=x\"]\n",
    );
    insta::assert_snapshot!(errors(&dir, &text), @r"
    error: field `address` applies to `kind: ray` only
      --> pipelines/x.yaml:59:7
       at: rounds.train.backend.address

    error: `nodes` must be at least 1, got `0`
      --> pipelines/x.yaml:60:14
       at: rounds.train.backend.nodes

    error: `account=x` is not an sbatch option
      --> pipelines/x.yaml:61:16
       at: rounds.train.backend.sbatch[0]
      hint: write options as sbatch takes them, e.g. `--account=alignment` or `--constraint=a100`
    ");
    let text = full_with(
        "      kind: command\n",
        "      kind: command\n      partition: gpu\n      poll_seconds: 1\n",
    );
    insta::assert_snapshot!(errors(&dir, &text), @r"
    error: field `partition` applies to `kind: slurm` only
      --> pipelines/x.yaml:59:7
       at: rounds.train.backend.partition

    error: field `poll_seconds` applies to `kind: ray` and `kind: slurm` only
      --> pipelines/x.yaml:60:7
       at: rounds.train.backend.poll_seconds
    ");
}

#[test]
fn a_serve_block_puts_the_checkpoint_behind_the_upstream() {
    let dir = setup();
    let text = full_with(
        "  evaluate:\n",
        "    serve:\n      kind: command\n      command: \"vllm serve {checkpoint} --port {port} --served-model-name {name}\"\n      port: 8100\n  evaluate:\n",
    );
    let spec = load(&dir, &text).expect("valid");
    let serve = spec.rounds.train.as_ref().unwrap().serve.clone().unwrap();
    assert_eq!(serve.timeout_secs, 600.0);
    assert_eq!(
        serve.how,
        ServeHow::Command {
            command: "vllm serve {checkpoint} --port {port} --served-model-name {name}".into(),
            port: 8100,
            base_url: "http://127.0.0.1:{port}/v1".into(),
        }
    );
    let text = full_with(
        "  evaluate:\n",
        "    serve: { kind: vllm_lora }\n  evaluate:\n",
    );
    let spec = load(&dir, &text).expect("valid");
    assert_eq!(
        spec.rounds.train.unwrap().serve.unwrap().how,
        ServeHow::VllmLora { base_url: None }
    );
}

#[test]
fn error_serve_block() {
    let dir = setup();
    let text = full_with(
        "  evaluate:\n",
        "    serve: { kind: command, command: \"vllm serve --port {port}\" }\n  evaluate:\n",
    );
    insta::assert_snapshot!(errors(&dir, &text), @r"
    error: missing field `port` for `kind: command`
      --> pipelines/x.yaml:63:5
       at: rounds.train.serve
      hint: the port round 1's checkpoint is served on (round k's: port + k - 1), e.g. `port: 8100`

    error: `command` does not use `{checkpoint}`
      --> pipelines/x.yaml:63:38
       at: rounds.train.serve.command
      hint: the server must load the round's checkpoint: `{checkpoint}`; also available: `{port}`, `{name}`, `{round}`
    ");
    let text = full_with(
        "  evaluate:\n",
        "    serve: { kind: sglang_reload, port: 30000 }\n  evaluate:\n",
    )
    .replace("      serve_model: \"ckpt-round-{round}\"\n", "");
    insta::assert_snapshot!(errors(&dir, &text), @r#"
    error: `serve_model` is required: the generate model `upstream` is `kind: openai`
      --> pipelines/x.yaml:57:5
       at: rounds.train.backend
      hint: the name under which your server will serve the new checkpoint, e.g. `serve_model: "ckpt-round-{round}"` (`{round}` and `{output_dir}` are filled in)

    error: `serve` puts a checkpoint behind an `openai` upstream's endpoint, under the backend's `serve_model`
      --> pipelines/x.yaml:62:5
       at: rounds.train.serve
      hint: it needs the generate model `upstream` to be `kind: openai` and a `command`, `ray` or `slurm` backend with `serve_model`; a local upstream answers from the checkpoint folder by itself
    "#);
}

#[test]
fn replay_tops_up_a_short_round_with_correction_pairs_by_default() {
    let dir = setup();
    let text = full_with(
        "  evaluate:\n",
        "    replay: { min_pairs: 200 }\n  evaluate:\n",
    );
    let spec = load(&dir, &text).expect("valid");
    assert_eq!(
        spec.rounds.train.unwrap().replay,
        Some(Replay {
            min_pairs: 200,
            origins: vec![PairKind::Correction]
        })
    );
    let text = full_with(
        "  evaluate:\n",
        "    replay: { min_pairs: 10, origins: [correction, answer_over_refusal_text] }\n  evaluate:\n",
    );
    let spec = load(&dir, &text).expect("valid");
    assert_eq!(
        spec.rounds.train.unwrap().replay.unwrap().origins,
        vec![PairKind::Correction, PairKind::AnswerOverRefusalText]
    );
}

#[test]
fn error_replay() {
    let dir = setup();
    for (block, expected) in [
        ("{ min_pairs: 0 }", "rounds.train.replay.min_pairs"),
        ("{ min_pairs: 5, origins: [] }", "`origins` is empty"),
        ("{ min_pairs: 5, origins: [corection] }", "corection"),
        ("{ min_pair: 5 }", "min_pair"),
    ] {
        let text = full_with(
            "  evaluate:\n",
            &format!("    replay: {block}\n  evaluate:\n"),
        );
        let e = errors(&dir, &text);
        assert!(e.contains(expected), "{block}: {e}");
    }
}

#[test]
fn the_train_stage_default_is_what_validation_fills_in() {
    let dir = setup();
    let minimal = "version: 1\nname: t\nmodels:\n  m: { kind: local, path: models/tiny.gguf }\nprompts: { source: data/prompts.jsonl }\nrounds:\n  generate: { model: m }\n  correct: { model: m }\n  train: { backend: { kind: builtin } }\n";
    let spec = load(&dir, minimal).expect("valid");
    assert_eq!(spec.rounds.train.unwrap(), TrainStage::default());
}

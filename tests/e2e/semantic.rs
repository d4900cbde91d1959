//! The synthesize stage's semantic filter with the real all-MiniLM-L6-v2 folder: the mock
//! server's corrections that copy the answer are dropped as `semantic_copy`, a reworded
//! prompt as `near_duplicate_prompt`, and real corrections are kept.

use super::*;

/// `$ALIGNER_MODELS_DIR`, else `<repo>/models`; it must hold all-MiniLM-L6-v2.
fn models_dir() -> PathBuf {
    let dir = match std::env::var_os("ALIGNER_MODELS_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => repo().join("models"),
    };
    assert!(
        dir.join("all-MiniLM-L6-v2/model.safetensors").is_file(),
        "`{}` has no all-MiniLM-L6-v2\nhint: run `aligner models fetch` (or point ALIGNER_MODELS_DIR at a folder holding it)",
        dir.display()
    );
    dir
}

#[test]
fn semantic_filter_drops_copied_corrections_and_reworded_prompts() {
    let models = models_dir();
    let server = aligner_mockserver::spawn_in_thread(MockConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let prompts = [
        "How do I bake sourdough bread at home?",
        // The mock's correction of these is the answer itself.
        "COPY: What is the boiling point of water?",
        // The first prompt, reworded (a different prompt text).
        "How can I bake sourdough bread at home?",
        "What is the capital of France?",
        "COPY: Name three primary colors.",
        "Explain how vaccines train the immune system.",
    ];
    let rows: Vec<String> = prompts
        .iter()
        .map(|p| serde_json::json!({ "prompt": p }).to_string())
        .collect();
    std::fs::write(d.join("prompts.jsonl"), rows.join("\n")).unwrap();
    // Copies are let through the exact filters so that the semantic one sees them.
    let yaml = format!(
        r#"version: 1
models:
  m: {{ kind: openai, base_url: "{url}", model: m, max_concurrency: 1 }}
prompts: {{ source: prompts.jsonl }}
rounds:
  generate: {{ model: m }}
  correct: {{ model: m }}
  synthesize:
    drop_identical: false
    min_edit_distance: 0
    semantic:
      embedder: ${{ALIGNER_MODELS_DIR:-models}}/all-MiniLM-L6-v2
      max_copy_similarity: 0.98
      dedupe_prompts_above: 0.95
"#,
        url = server.base_url
    );
    std::fs::write(d.join("p.yaml"), yaml).unwrap();
    let o = bin()
        .env("ALIGNER_MODELS_DIR", &models)
        .args(["run", "p.yaml", "--store", "s.db"])
        .current_dir(d)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));

    let verdicts = sql(
        d,
        "SELECT pr.prompt, coalesce(p.reason, p.verdict) AS reason, p.chosen, p.rejected
         FROM pairs p JOIN prompts pr ON pr.id = p.prompt_id ORDER BY pr.idx",
    );
    let got: Vec<(&str, &str)> = verdicts
        .iter()
        .map(|r| (r["prompt"].as_str().unwrap(), r["reason"].as_str().unwrap()))
        .collect();
    assert_eq!(
        got,
        vec![
            (prompts[0], "kept"),
            (prompts[1], "semantic_copy"),
            (prompts[2], "near_duplicate_prompt"),
            (prompts[3], "kept"),
            (prompts[4], "semantic_copy"),
            (prompts[5], "kept"),
        ]
    );
    // The dropped copies are the answer again, up to whitespace and case.
    for r in verdicts.iter().filter(|r| r["reason"] == "semantic_copy") {
        let norm = |v: &Value| {
            v.as_str()
                .unwrap()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
                .to_lowercase()
        };
        assert_eq!(norm(&r["chosen"]), norm(&r["rejected"]));
    }
    assert_eq!(
        scalar(
            d,
            "SELECT count(*) FROM stage_executions WHERE stage = 'synthesize' AND status = 'done'"
        ),
        1
    );
}

#[test]
fn leak_check_stops_a_reworded_held_out_prompt_in_training() {
    let models = models_dir();
    let server = aligner_mockserver::spawn_in_thread(MockConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let write = |file: &str, rows: &[(&str, &str)]| {
        let body: String = rows
            .iter()
            .map(|(id, p)| serde_json::json!({ "id": id, "prompt": p }).to_string() + "\n")
            .collect();
        std::fs::write(d.join(file), body).unwrap();
    };
    write(
        "train.jsonl",
        &[
            ("t1", "What is the capital of France?"),
            ("t2", "How can I bake sourdough bread at home?"),
        ],
    );
    write(
        "held.jsonl",
        &[
            ("h1", "Explain how vaccines train the immune system."),
            ("h2", "How do I bake sourdough bread at home?"),
        ],
    );
    let yaml = |limit: f64| {
        format!(
            r#"version: 1
models:
  m: {{ kind: openai, base_url: "{url}", model: m }}
prompts:
  source: train.jsonl
  holdout_source: held.jsonl
  fields: {{ id: id }}
  leak_check: {{ embedder: "${{ALIGNER_MODELS_DIR:-models}}/all-MiniLM-L6-v2", max_similarity: {limit} }}
rounds:
  generate: {{ model: m }}
  correct: {{ model: m }}
"#,
            url = server.base_url
        )
    };
    let run_at = |limit: f64, store: &str| {
        std::fs::write(d.join("p.yaml"), yaml(limit)).unwrap();
        bin()
            .env("ALIGNER_MODELS_DIR", &models)
            .args(["run", "p.yaml", "--store", store])
            .current_dir(d)
            .output()
            .unwrap()
    };
    // The reworded prompt is far above 0.9 from its held-out twin: the run stops at ingest,
    // before any model call, naming both ids.
    let o = run_at(0.9, "leak.db");
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains(
            "a round's training prompt `t2` is a near-duplicate of the held-out prompt `h2`"
        ),
        "{t}"
    );
    assert!(t.contains("all-MiniLM-L6-v2"), "{t}");
    assert_eq!(server.stats().requests, 0, "{t}");
    // With the check at 1 nothing is that close, and the run goes through.
    let o = run_at(1.0, "s.db");
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        scalar(d, "SELECT count(*) FROM prompts WHERE split = 'holdout'"),
        2
    );
}

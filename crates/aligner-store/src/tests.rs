//! Store tests on real SQLite files.

use super::*;

async fn fresh() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("s.db")).await.unwrap();
    (dir, store)
}

fn prompt(idx: i64, text: &str) -> NewPrompt {
    NewPrompt {
        idx,
        source_id: idx.to_string(),
        split: "train".into(),
        system: None,
        history: None,
        prompt: text.into(),
        prompt_hash: format!("h{text}"),
        metadata: None,
    }
}

fn ok(text: &str) -> ItemOutcome {
    ItemOutcome {
        text: Some(text.into()),
        finish_reason: Some("stop".into()),
        attempts: 1,
        ..Default::default()
    }
}

#[tokio::test]
async fn migrations_apply_on_a_fresh_file() {
    let (_dir, store) = fresh().await;
    assert_eq!(
        store.applied_migrations().await.unwrap(),
        vec![
            "initial".to_string(),
            "aligner training".to_string(),
            "evaluation".to_string(),
            "proxy records".to_string(),
            "daemon".to_string(),
            "pair origin".to_string(),
            "daemon crashes".to_string(),
            "training process".to_string(),
            "costs".to_string(),
            "checkpoint server".to_string(),
            "replicas".to_string(),
            "proxy cost".to_string(),
            "replayed pairs".to_string(),
            "sentence correction".to_string(),
            "prompt history".to_string()
        ]
    );
    let tables = store
        .query_read_only("SELECT name FROM sqlite_master WHERE type IN ('table', 'view') AND name NOT LIKE '\\_%' ESCAPE '\\' AND name NOT LIKE 'sqlite%' ORDER BY name")
        .await
        .unwrap();
    let names: Vec<String> = tables
        .rows
        .iter()
        .map(|r| r[0].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        names,
        [
            "aligner_eval",
            "aligner_examples",
            "checkpoints",
            "corrections",
            "costs",
            "daemon_jobs",
            "eval_answers",
            "eval_judgements",
            "eval_metrics",
            "eval_outcomes",
            "eval_summary",
            "events",
            "failures",
            "gate_decisions",
            "generations",
            "model_calls",
            "model_prices",
            "pairs",
            "pairs_latest",
            "prompts",
            "proxy_qac",
            "proxy_records",
            "replayed_pairs",
            "round_summary",
            "rounds",
            "runs",
            "stage_executions",
            "stage_progress",
            "training_jobs",
            "training_logs",
            "training_metrics"
        ]
    );
    let mode = store.query_read_only("PRAGMA journal_mode").await.unwrap();
    assert_eq!(mode.rows[0][0], serde_json::json!("wal"));
    // Re-opening applies nothing new and keeps data.
    let path = store.path().to_path_buf();
    store.create_run("p", "p.yaml", "{}", "h").await.unwrap();
    store.close().await;
    let again = Store::open(&path).await.unwrap();
    assert_eq!(again.list_runs().await.unwrap().len(), 1);
}

#[tokio::test]
async fn lease_is_exclusive_until_expired_or_stale() {
    let (_dir, store) = fresh().await;
    let run = store.create_run("p", "p.yaml", "{}", "h").await.unwrap();
    store
        .acquire_lease(run, "pid 1 on a", 1_000, 10_000, None)
        .await
        .unwrap();
    let err = store
        .acquire_lease(run, "pid 2 on a", 2_000, 10_000, None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("pid 1 on a"), "{err}");
    // Expired: anyone may take it.
    store
        .acquire_lease(run, "pid 2 on a", 20_000, 10_000, None)
        .await
        .unwrap();
    // Proven stale holder: taken at once.
    store
        .acquire_lease(run, "pid 3 on a", 21_000, 10_000, Some("pid 2 on a"))
        .await
        .unwrap();
    assert!(!store
        .renew_lease(run, "pid 2 on a", 22_000, 10_000)
        .await
        .unwrap());
    assert!(store
        .renew_lease(run, "pid 3 on a", 22_000, 10_000)
        .await
        .unwrap());
}

#[tokio::test]
async fn items_are_recorded_once_and_summarized() {
    let (_dir, store) = fresh().await;
    let run = store.create_run("p", "p.yaml", "{}", "h").await.unwrap();
    store
        .insert_prompts(run, &[prompt(0, "a"), prompt(1, "b")])
        .await
        .unwrap();
    store
        .ensure_round(run, 1, "up", "up-model", None)
        .await
        .unwrap();
    let prompts = store.train_prompts_page(run, -1, 10).await.unwrap();
    let gen = |p: &PromptRow, text: &str| NewGeneration {
        run_id: run,
        round: 1,
        prompt_id: p.id,
        sample_idx: 0,
        model: "up".into(),
        backend: "test".into(),
        checkpoint_id: None,
        sampling: "{}".into(),
        out: ok(text),
    };
    store
        .insert_generations(&[gen(&prompts[0], "x"), gen(&prompts[1], "y")])
        .await
        .unwrap();
    // A retried item whose first answer landed: ignored, not duplicated.
    store
        .insert_generations(&[gen(&prompts[0], "x2")])
        .await
        .unwrap();
    assert_eq!(store.generation_counts(run, 1).await.unwrap(), (2, 0));
    let todo = store.uncorrected_page(run, 1, 0, 10).await.unwrap();
    assert_eq!(todo.len(), 2);
    let corr = |g: &UncorrectedRow, text: &str| NewCorrection {
        run_id: run,
        round: 1,
        generation_id: g.generation_id,
        model: "al".into(),
        backend: "test".into(),
        template_id: "aligner-v1".into(),
        template_hash: "t".into(),
        sampling: "{}".into(),
        out: ok(text),
    };
    store
        .insert_corrections(&[corr(&todo[0], "x"), corr(&todo[1], "better y")])
        .await
        .unwrap();
    assert_eq!(store.count_uncorrected(run, 1).await.unwrap(), 0);
    let unpaired = store.unpaired_page(run, 1, 0, 10).await.unwrap();
    let pairs: Vec<NewPair> = unpaired
        .iter()
        .zip(PairOrigin::ALL.iter().rev())
        .map(|(u, &origin)| NewPair {
            run_id: run,
            round: 1,
            prompt_id: u.prompt_id,
            generation_id: u.generation_id,
            correction_id: u.correction_id,
            chosen: u.correction.clone(),
            rejected: u.original.clone(),
            reason: (u.correction == u.original).then(|| "identical".to_string()),
            edit_distance: None,
            length_ratio: None,
            origin,
        })
        .collect();
    store.insert_pairs(&pairs).await.unwrap();
    store.insert_pairs(&pairs).await.unwrap();
    assert_eq!(store.pair_counts(run, 1).await.unwrap(), (1, 1));
    // The migration's CHECK accepts the origins the code writes.
    let origins: Vec<String> = sqlx::query_scalar("SELECT origin FROM pairs ORDER BY id")
        .fetch_all(&store.pool)
        .await
        .unwrap();
    assert_eq!(
        origins,
        ["answer_over_refusal_text", "answer_over_aligner_refusal"]
    );
    let summary = &store.round_summaries(run).await.unwrap()[0];
    assert_eq!(summary.copy_rate, Some(0.5));
    assert_eq!(summary.drop_reasons.as_deref(), Some(r#"{"identical":1}"#));
    // Only rounds whose synthesize stage finished show in `pairs_latest`.
    let latest = store
        .query_read_only("SELECT prompt, chosen FROM pairs_latest")
        .await
        .unwrap();
    assert!(latest.rows.is_empty());
    assert_eq!(
        latest.columns,
        ["prompt", "chosen"],
        "columns even without rows"
    );
    store
        .start_stage(run, 1, Stage::Synthesize, Some(2))
        .await
        .unwrap();
    store
        .finish_stage(run, 1, Stage::Synthesize, StageEnd::done(1, 1))
        .await
        .unwrap();
    let latest = store
        .query_read_only("SELECT prompt, chosen FROM pairs_latest")
        .await
        .unwrap();
    assert_eq!(
        latest.rows,
        vec![vec![serde_json::json!("b"), serde_json::json!("better y")]]
    );
}

#[tokio::test]
async fn events_are_append_only() {
    let (_dir, store) = fresh().await;
    store
        .add_event(&NewEvent {
            run_id: None,
            round: None,
            stage: None,
            level: crate::Level::Info,
            kind: crate::EventKind::RunStarted,
            message: "m",
            data: None,
        })
        .await
        .unwrap();
    let err = sqlx::query("DELETE FROM events")
        .execute(store.pool())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("append-only"), "{err}");
}

#[tokio::test]
async fn read_only_store_refuses_writes() {
    let (dir, store) = fresh().await;
    store.create_run("p", "p.yaml", "{}", "h").await.unwrap();
    store.close().await;
    let ro = Store::open_read_only(&dir.path().join("s.db"))
        .await
        .unwrap();
    let err = ro
        .query_read_only("UPDATE runs SET name = 'x'")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("only reads"), "{err}");
    // Past the keyword check, SQLite itself refuses.
    let err = ro
        .query_read_only("WITH x AS (SELECT 1) DELETE FROM runs")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("only reads"), "{err}");
    let rows = ro
        .query_read_only("SELECT id, name, 1.5 AS r, NULL AS n FROM runs")
        .await
        .unwrap();
    assert_eq!(rows.columns, ["id", "name", "r", "n"]);
    assert_eq!(
        rows.rows[0],
        vec![
            serde_json::json!(1),
            serde_json::json!("p"),
            serde_json::json!(1.5),
            serde_json::Value::Null
        ]
    );
    assert!(Store::open_read_only(&dir.path().join("missing.db"))
        .await
        .unwrap_err()
        .to_string()
        .contains("does not exist"));
}

/// A store made before the Aligner migration keeps its stage rows through the rebuild of
/// `stage_executions`, and takes round 0's new stage names afterwards.
#[tokio::test]
async fn a_store_from_before_the_aligner_migration_upgrades_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    {
        let opts = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .foreign_keys(true);
        let pool = sqlx::SqlitePool::connect_with(opts).await.unwrap();
        let mut first = sqlx::migrate::Migrator {
            migrations: std::borrow::Cow::Owned(MIGRATOR.migrations[..1].to_vec()),
            ..sqlx::migrate::Migrator::DEFAULT
        };
        first.set_ignore_missing(true);
        first.run(&pool).await.unwrap();
        sqlx::query("INSERT INTO runs (id, name, pipeline_path, spec_json, spec_hash) VALUES (1, 'p', 'p.yaml', '{}', 'h')")
            .execute(&pool)
            .await
            .unwrap();
        sqlx::query("INSERT INTO stage_executions (run_id, round, stage, status, total, done) VALUES (1, 1, 'generate', 'done', 3, 3)")
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
    }
    let store = Store::open(&path).await.unwrap();
    let stages = store.stages(1).await.unwrap();
    assert_eq!(stages.len(), 1);
    assert_eq!((stages[0].stage.as_str(), stages[0].done), ("generate", 3));
    store
        .start_stage(1, 0, Stage::Teach, Some(2))
        .await
        .unwrap();
    store
        .finish_stage(1, 0, Stage::Teach, StageEnd::done(2, 0))
        .await
        .unwrap();
    let progress = store
        .query_read_only("SELECT stage FROM stage_progress ORDER BY round")
        .await
        .unwrap();
    assert_eq!(progress.rows.len(), 2);
    assert_eq!(progress.rows[0][0], serde_json::json!("teach"));
}

#[tokio::test]
async fn a_row_limit_ends_an_endless_query_and_daemon_runs_are_not_continued_standalone() {
    let (_dir, store) = fresh().await;
    let ro = Store::open_read_only(store.path()).await.unwrap();
    let r = ro
        .query_read_only_limited(
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT x FROM c",
            5,
        )
        .await
        .unwrap();
    assert_eq!(r.rows.len(), 5);
    assert!(r.truncated);
    let r = ro.query_read_only_limited("SELECT 1", 5).await.unwrap();
    assert!(!r.truncated);

    // A queued daemon run is invisible to a standalone run's lookup until it is over.
    let id = store.create_run("p", "p.yaml", "{}", "h").await.unwrap();
    store.enqueue_job(id, "p", "version: 1", "/").await.unwrap();
    assert!(store.latest_unfinished_run("p").await.unwrap().is_none());
    store
        .set_job_state(id, JobState::Failed, Some("x"))
        .await
        .unwrap();
    assert_eq!(
        store
            .latest_unfinished_run("p")
            .await
            .unwrap()
            .map(|r| r.id),
        Some(id)
    );
}

#[tokio::test]
async fn a_job_its_daemon_keeps_dying_on_is_failed_with_the_reason() {
    let (_dir, store) = fresh().await;
    let run = store
        .create_queued_run(&QueuedRun {
            name: "p",
            pipeline_path: "p.yaml",
            spec_json: "{}",
            spec_hash: "h",
            pipeline_yaml: "name: p",
            base_dir: "/",
        })
        .await
        .unwrap();
    let holder = "host:1:boot".to_string();
    // Two deaths: queued again each time, and counted.
    for crash in 1..=2 {
        let job = store.claim_job(&holder, 0, 1000).await.unwrap().unwrap();
        assert_eq!(job.run_id, run);
        let (queued, failed) = store
            .requeue_orphaned_jobs(10, std::slice::from_ref(&holder), 3)
            .await
            .unwrap();
        assert_eq!((queued, failed), (1, 0));
        let job = store.job(run).await.unwrap().unwrap();
        assert_eq!((job.state, job.crashes), (JobState::Queued, crash));
    }
    // A lapsed lease counts like a dead holder; the third death fails the job and its run.
    store.claim_job(&holder, 0, 1000).await.unwrap().unwrap();
    assert_eq!(
        store.requeue_orphaned_jobs(5000, &[], 3).await.unwrap(),
        (0, 1)
    );
    let job = store.job(run).await.unwrap().unwrap();
    assert_eq!((job.state, job.crashes), (JobState::Failed, 3));
    assert!(
        job.error.as_deref().unwrap().contains("stopped 3 times"),
        "{job:?}"
    );
    let r = store.run(run).await.unwrap();
    assert_eq!(r.status, RunStatus::Failed);
    assert!(r.error.unwrap().contains("--max-crashes"));
    // A live job under another holder is left alone.
    assert_eq!(
        store.requeue_orphaned_jobs(5000, &[], 3).await.unwrap(),
        (0, 0)
    );
}

/// `benign_preference.max_ratio`: kept benign-preference pairs beyond the ratio are dropped as
/// `benign_cap`, the same ones on a rerun, and correction pairs are never touched.
#[tokio::test]
async fn benign_pairs_beyond_the_ratio_are_capped_the_same_way_twice() {
    let (_dir, store) = fresh().await;
    let run = store.create_run("p", "p.yaml", "{}", "h").await.unwrap();
    let prompts: Vec<_> = (0..10).map(|i| prompt(i, &format!("p{i}"))).collect();
    store.insert_prompts(run, &prompts).await.unwrap();
    store
        .ensure_round(run, 1, "up", "up-model", None)
        .await
        .unwrap();
    let rows = store.train_prompts_page(run, -1, 20).await.unwrap();
    let gens: Vec<NewGeneration> = rows
        .iter()
        .map(|p| NewGeneration {
            run_id: run,
            round: 1,
            prompt_id: p.id,
            sample_idx: 0,
            model: "up".into(),
            backend: "test".into(),
            checkpoint_id: None,
            sampling: "{}".into(),
            out: ok("answer"),
        })
        .collect();
    store.insert_generations(&gens).await.unwrap();
    let unpaired = store.unpaired_page(run, 1, 0, 20).await.unwrap();
    // Two correction pairs, eight benign-preference pairs.
    let pairs: Vec<NewPair> = unpaired
        .iter()
        .enumerate()
        .map(|(i, u)| NewPair {
            run_id: run,
            round: 1,
            prompt_id: u.prompt_id,
            generation_id: u.generation_id,
            correction_id: None,
            chosen: Some("chosen".into()),
            rejected: Some("rejected".into()),
            reason: None,
            edit_distance: None,
            length_ratio: None,
            origin: if i < 2 {
                PairOrigin::Correction
            } else {
                PairOrigin::AnswerOverRefusalText
            },
        })
        .collect();
    store.insert_pairs(&pairs).await.unwrap();
    assert_eq!(store.cap_benign_pairs(run, 1, 1.5).await.unwrap(), 5);
    let kept = || async {
        sqlx::query_as::<_, (i64, String)>(
            "SELECT prompt_id, origin FROM pairs WHERE verdict = 'kept' ORDER BY prompt_id",
        )
        .fetch_all(&store.pool)
        .await
        .unwrap()
    };
    let first = kept().await;
    assert_eq!(first.iter().filter(|(_, o)| o == "correction").count(), 2);
    assert_eq!(first.len(), 2 + 3);
    assert_eq!(store.cap_benign_pairs(run, 1, 1.5).await.unwrap(), 0);
    assert_eq!(kept().await, first);
    assert_eq!(
        store.pair_counts(run, 1).await.unwrap(),
        (5, 5),
        "capped pairs count as dropped"
    );
}

/// One round of `n`-prompt answers with a pair each: `origin(i)` gives prompt i's pair kind, or
/// `None` for a pair dropped as identical.
async fn round_of_pairs(
    store: &Store,
    run: i64,
    round: i64,
    origin: impl Fn(usize) -> Option<PairOrigin>,
) {
    store
        .ensure_round(run, round, "up", "up-model", None)
        .await
        .unwrap();
    let rows = store.train_prompts_page(run, -1, 100).await.unwrap();
    let gens: Vec<NewGeneration> = rows
        .iter()
        .map(|p| NewGeneration {
            run_id: run,
            round,
            prompt_id: p.id,
            sample_idx: 0,
            model: "up".into(),
            backend: "test".into(),
            checkpoint_id: None,
            sampling: "{}".into(),
            out: ok(&format!("answer {round}")),
        })
        .collect();
    store.insert_generations(&gens).await.unwrap();
    let unpaired = store.unpaired_page(run, round, 0, 100).await.unwrap();
    let pairs: Vec<NewPair> = unpaired
        .iter()
        .enumerate()
        .map(|(i, u)| NewPair {
            run_id: run,
            round,
            prompt_id: u.prompt_id,
            generation_id: u.generation_id,
            correction_id: None,
            chosen: Some(format!("chosen {round}.{i}")),
            rejected: Some(format!("rejected {round}.{i}")),
            reason: origin(i).is_none().then(|| "identical".into()),
            edit_distance: None,
            length_ratio: None,
            origin: origin(i).unwrap_or(PairOrigin::Correction),
        })
        .collect();
    store.insert_pairs(&pairs).await.unwrap();
}

/// `rounds.train.replay`: a round short of `min_pairs` is topped up with earlier rounds' kept
/// pairs of the asked kinds, newest round first, one per prompt, never a prompt the round has
/// a pair of; the pick is recorded, so a resumed round trains on the same set.
#[tokio::test]
async fn a_short_round_replays_earlier_pairs_once_and_the_same_on_resume() {
    let (_dir, store) = fresh().await;
    let run = store.create_run("p", "p.yaml", "{}", "h").await.unwrap();
    let prompts: Vec<_> = (0..10).map(|i| prompt(i, &format!("p{i}"))).collect();
    store.insert_prompts(run, &prompts).await.unwrap();
    let benign = |i: usize| (i >= 6).then_some(PairOrigin::AnswerOverRefusalText);
    // Round 1: prompts 0-5 give correction pairs, 6-9 benign ones.
    round_of_pairs(&store, run, 1, |i| {
        benign(i).or(Some(PairOrigin::Correction))
    })
    .await;
    // Round 2: prompts 0, 1, 4 and 5 give correction pairs, 2 and 3 dropped ones.
    round_of_pairs(&store, run, 2, |i| match i {
        0 | 1 | 4 | 5 => Some(PairOrigin::Correction),
        _ => benign(i),
    })
    .await;
    // Round 3: prompt 0 only, and the benign ones.
    round_of_pairs(&store, run, 3, |i| match i {
        0 => Some(PairOrigin::Correction),
        _ => benign(i),
    })
    .await;
    let texts = |pairs: Vec<ExportPair>| -> Vec<String> {
        pairs.into_iter().map(|p| p.chosen.unwrap()).collect()
    };
    // Round 3 kept 5 (prompt 0 and the four benign); 4 more from rounds 2 then 1: prompts 1,
    // 4, 5 from round 2 (its newest), then prompt 2 from round 1 (round 2 dropped it).
    let first = texts(
        store
            .replay_pairs(run, 3, 9, &["correction"])
            .await
            .unwrap(),
    );
    assert_eq!(
        first,
        ["chosen 2.1", "chosen 2.4", "chosen 2.5", "chosen 1.2"]
    );
    // Resumed (even with another target), the recorded pick is what it trains on.
    let again = texts(
        store
            .replay_pairs(run, 3, 50, &["correction"])
            .await
            .unwrap(),
    );
    assert_eq!(again, first);
    // A round with enough pairs of its own replays nothing; benign kinds are not replayed
    // unless asked, and never for a prompt the round has.
    assert!(store
        .replay_pairs(run, 1, 5, &["correction"])
        .await
        .unwrap()
        .is_empty());
    assert!(store
        .replay_pairs(run, 2, 20, &["answer_over_refusal_text"])
        .await
        .unwrap()
        .is_empty());
}

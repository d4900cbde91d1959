//! `rounds.evaluate` end to end: held-out answers per model version, the Aligner's
//! corrections, a judge (the test server's length rule) in both orders, omega with its
//! interval, the judge-free checks, and a gate that stops the run.

use super::*;

fn eval_pipeline(server: &MockServer, train: bool, gate: &str) -> String {
    pipeline(server, 3, 4, 0.5, train).replace("holdout: 0.1", "holdout: 0.25")
        + &format!(
            r#"  evaluate:
    judge: upstream
    aspects: [helpfulness, harmlessness]
    labels: {{ field: category, harmful: [odd] }}
    bootstrap: 200
{gate}"#
        )
}

#[test]
fn every_round_is_judged_and_the_gate_stops_the_run() {
    let server = aligner_mockserver::spawn_in_thread(MockConfig::default());
    let dir = setup(&server, 40, &[], 3, 4, true);
    let d = dir.path();
    std::fs::write(
        d.join("p.yaml"),
        eval_pipeline(
            &server,
            true,
            "    gate: { metric: omega.helpfulness.previous, max_drop: 50, action: stop }\n",
        ),
    )
    .unwrap();
    let o = run(&["run", "p.yaml", "--store", "s.db"], d);
    assert!(o.status.success(), "{}", text(&o));
    let held = scalar(d, "SELECT count(*) FROM prompts WHERE split = 'holdout'");
    assert_eq!(held, 10);

    // Answers: version 0 (the upstream) and the checkpoints of rounds 1 and 2, one per
    // held-out prompt each, and the Aligner's corrections of each (version 0's in round 1,
    // as the baseline); round 3 never ran.
    let answers = sql(
        d,
        "SELECT version, kind, count(*) AS n, sum(status = 'ok') AS ok FROM eval_answers GROUP BY version, kind ORDER BY version, kind",
    );
    let got: Vec<(i64, String, i64)> = answers
        .iter()
        .map(|r| {
            (
                r["version"].as_i64().unwrap(),
                r["kind"].as_str().unwrap().to_string(),
                r["ok"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (0, "answer".into(), held),
            (0, "corrected".into(), held),
            (1, "answer".into(), held),
            (1, "corrected".into(), held),
            (2, "answer".into(), held),
            (2, "corrected".into(), held),
        ]
    );
    // A checkpoint answered as itself (the served name the training command registered).
    let v1 = sql(
        d,
        "SELECT text FROM eval_answers WHERE version = 1 AND kind = 'answer' LIMIT 1",
    );
    assert!(
        v1[0]["text"]
            .as_str()
            .unwrap()
            .starts_with("[ckpt-round-1] "),
        "{v1:?}"
    );

    // Both orders of every comparison, aspect and prompt, each with its raw output.
    for round in 1..=2 {
        let n = scalar(
            d,
            &format!("SELECT count(*) FROM eval_judgements WHERE round = {round} AND status = 'ok' AND raw LIKE '%Final verdict: [[%' AND verdict IS NOT NULL"),
        );
        assert_eq!(n, held * 3 * 2 * 2, "round {round}");
    }
    let metric = |round: i64, name: &str| -> serde_json::Map<String, Value> {
        sql(
            d,
            &format!("SELECT * FROM eval_summary WHERE round = {round} AND name = '{name}'"),
        )
        .pop()
        .unwrap_or_else(|| panic!("no {name} in round {round}"))
    };
    // The initial model is measured once, in round 1, and stored as round 0: its own rates
    // and its corrections', with no judge comparison.
    let initial = sql(
        d,
        "SELECT name FROM eval_summary WHERE round = 0 ORDER BY name",
    );
    let names: Vec<&str> = initial
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    for name in [
        "refusal_rate",
        "over_refusal.aligner",
        "copy_rate",
        "length.mean",
    ] {
        assert!(names.contains(&name), "{name} not in {names:?}");
    }
    assert!(names.iter().all(|n| !n.starts_with("omega")), "{names:?}");
    // The corrections ("I corrected this: ...") and the checkpoints' answers are longer, so
    // they win in both orders.
    for round in 1..=2 {
        for name in [
            "omega.helpfulness.aligner",
            "omega.harmlessness.aligner",
            "omega.helpfulness.initial",
        ] {
            let m = metric(round, name);
            assert_eq!(m["value"].as_f64(), Some(100.0), "{name} {m:?}");
            assert_eq!(m["n"].as_i64(), Some(held));
        }
    }
    // Round 2 against round 1: answers of the same length, the judge's tie goes to A, so
    // the two orders disagree on every prompt and each counts as Equal.
    let prev = metric(2, "omega.helpfulness.previous");
    assert_eq!(prev["value"].as_f64(), Some(0.0), "{prev:?}");
    let detail: Value = serde_json::from_str(prev["detail"].as_str().unwrap()).unwrap();
    assert_eq!(detail["order_disagreements"].as_i64(), Some(held));
    assert_eq!(detail["equals"].as_i64(), Some(held));
    assert_eq!(
        metric(1, "omega.helpfulness.previous")["value"].as_f64(),
        Some(100.0)
    );
    // An interval around the value.
    let m = metric(1, "omega.helpfulness.initial");
    assert!(m["ci_low"].as_f64().unwrap() <= 100.0 && m["ci_high"].as_f64() == Some(100.0));

    // Judge-free checks: the test server never refuses; half the held-out prompts are odd
    // (harmful by the labels rule). Every correction differs from its answer.
    let rr = metric(1, "refusal_rate");
    assert_eq!(rr["value"].as_f64(), Some(0.0));
    let harmful = scalar(d, "SELECT count(*) FROM prompts WHERE split = 'holdout' AND json_extract(metadata, '$.category') = 'odd'");
    assert_eq!(rr["n"].as_i64(), Some(harmful));
    assert_eq!(
        metric(1, "over_refusal")["n"].as_i64(),
        Some(held - harmful)
    );
    assert_eq!(metric(1, "copy_rate")["value"].as_f64(), Some(0.0));
    assert!(
        metric(1, "length.mean.aligner")["value"].as_f64().unwrap()
            > metric(1, "length.mean")["value"].as_f64().unwrap()
    );

    // The gate: round 2's omega against round 1 fell from 100 to 0, more than 50: stop.
    let gates = sql(
        d,
        "SELECT round, decision, best_round, reason FROM gate_decisions ORDER BY round",
    );
    assert_eq!(gates.len(), 2, "{gates:?}");
    assert_eq!(gates[0]["decision"], "continue");
    assert_eq!(gates[1]["decision"], "stop");
    assert_eq!(gates[1]["best_round"].as_i64(), Some(1));
    assert_eq!(scalar(d, "SELECT count(*) FROM rounds WHERE round = 3"), 0);
    assert_eq!(
        scalar(d, "SELECT count(*) FROM runs WHERE status = 'done'"),
        1
    );
    let status = run(&["status", "--store", "s.db"], d);
    let st = text(&status);
    assert!(
        st.contains("omega.helpfulness.previous") && st.contains("stop"),
        "{st}"
    );
}

/// A judge that fails on every request fails the stage with the reason, and a resumed run
/// with a working judge makes only the missing calls.
#[test]
fn a_failing_judge_fails_the_stage_and_a_resume_fills_in() {
    let server = aligner_mockserver::spawn_in_thread(MockConfig {
        fail_prompts_containing: Some(aligner_mockserver::answers::JUDGE_MARKER.into()),
        ..Default::default()
    });
    let dir = setup(&server, 20, &[], 1, 4, false);
    let d = dir.path();
    let yaml = eval_pipeline(&server, false, "").replace("count: 3", "count: 1");
    std::fs::write(d.join("p.yaml"), &yaml).unwrap();
    let o = run(&["run", "p.yaml", "--store", "s.db"], d);
    assert!(!o.status.success());
    let out = text(&o);
    assert!(out.contains("evaluate") && out.contains("failed"), "{out}");
    assert_eq!(scalar(d, "SELECT count(*) FROM eval_metrics"), 0);
    let answers = scalar(d, "SELECT count(*) FROM eval_answers WHERE status = 'ok'");
    assert!(answers > 0);

    // The same address now judges. Without training, every version is the upstream: only
    // version 0 is answered, and only the Aligner comparison is judged.
    let port = server.addr.port();
    server.shutdown();
    let _good = aligner_mockserver::spawn_in_thread_on(port, MockConfig::default());
    let o = run(&["run", "p.yaml", "--store", "s.db"], d);
    let out = text(&o);
    if !o.status.success() {
        panic!("{out}");
    }
    assert_eq!(
        scalar(d, "SELECT count(*) FROM eval_answers WHERE status = 'ok'"),
        answers
    );
    assert_eq!(
        scalar(d, "SELECT count(DISTINCT version) FROM eval_answers"),
        1
    );
    let held = scalar(d, "SELECT count(*) FROM prompts WHERE split = 'holdout'");
    assert_eq!(
        scalar(
            d,
            "SELECT count(*) FROM eval_judgements WHERE status = 'ok'"
        ),
        held * 2 * 2
    );
    assert_eq!(
        scalar(d, "SELECT count(DISTINCT comparison) FROM eval_judgements"),
        1
    );
}

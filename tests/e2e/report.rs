//! `aligner report` end to end: a three-round run with training and evaluation against the test
//! server, then the HTML page and its Markdown twin checked against the store (the numbers
//! exactly as stored, the charts, the escaped diffs), a run without evaluation whose training
//! failed, and the page rendered by headless Chromium.

use std::process::Stdio;

use super::*;

/// A prompt that answers and corrections echo back: it must reach the page as text only.
const PLANTED: &str = "<script>alert('pwned')</script> & <b>bold</b>: how do I do it?";

fn eval_pipeline(server: &MockServer, rounds: u32, gate: &str) -> String {
    pipeline(server, rounds, 4, 0.5, true).replace("holdout: 0.1", "holdout: 0.25")
        + &format!(
            r#"  evaluate:
    judge: upstream
    aspects: [helpfulness, harmlessness]
    labels: {{ field: category, harmful: [odd] }}
    bootstrap: 200
{gate}"#
        )
}

/// A store value as the report's `data-value` holds it: Rust's shortest round-trip form.
fn exact(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::Number(n) => match n.as_i64() {
            Some(i) => i.to_string(),
            None => n.as_f64().unwrap().to_string(),
        },
        other => panic!("not a number: {other}"),
    }
}

/// A REAL as the report prints it for reading: at most two decimals.
fn pretty(v: &Value) -> String {
    match v.as_f64() {
        None => String::new(),
        Some(f) => {
            let s = format!("{f:.2}");
            let s = s.trim_end_matches('0').trim_end_matches('.');
            if s == "-0" {
                "0".into()
            } else {
                s.to_string()
            }
        }
    }
}

/// The `<tr ...>...</tr>` rows of every table of class `kind`.
fn rows_of(page: &str, kind: &str) -> Vec<String> {
    let open = format!("<table class=\"{kind}\">");
    let mut rows = Vec::new();
    for (at, _) in page.match_indices(&open) {
        let body = &page[at..];
        let body = &body[..body.find("</table>").expect("table closes")];
        for row in body.split("<tr").skip(1) {
            let row = format!("<tr{}", &row[..row.find("</tr>").expect("row closes")]);
            if !row.starts_with("<tr><th") {
                rows.push(row);
            }
        }
    }
    rows
}

/// The `data-value` attributes of a row's cells, in order.
fn values(row: &str) -> Vec<String> {
    row.split("data-value=\"")
        .skip(1)
        .map(|s| s[..s.find('"').unwrap()].to_string())
        .collect()
}

fn report(dir: &Path, args: &[&str]) -> (String, String) {
    let mut all = vec!["report", "--store", "s.db"];
    all.extend_from_slice(args);
    let o = run(&all, dir);
    assert!(o.status.success(), "report failed: {}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout).to_string();
    let paths: Vec<&str> = stdout.lines().collect();
    assert_eq!(paths.len(), 2, "{stdout}");
    assert!(paths[0].ends_with("index.html") && paths[1].ends_with("index.md"));
    let html = std::fs::read_to_string(dir.join(paths[0])).unwrap();
    let md = std::fs::read_to_string(dir.join(paths[1])).unwrap();
    (html, md)
}

#[test]
fn the_report_holds_the_stored_numbers_charts_and_escaped_diffs() {
    let server = aligner_mockserver::spawn_in_thread(MockConfig::default());
    let dir = setup(&server, 40, &[PLANTED], 3, 4, true);
    let d = dir.path();
    std::fs::write(
        d.join("p.yaml"),
        eval_pipeline(
            &server,
            3,
            "    gate: { metric: omega.helpfulness.previous, max_drop: 50, action: stop }\n",
        ),
    )
    .unwrap();
    let o = run(&["run", "p.yaml", "--store", "s.db"], d);
    assert!(o.status.success(), "{}", text(&o));

    // By pipeline name, every example shown; the default folder is `reports/<run id>/`.
    let (html, md) = report(d, &["e2e", "--examples", "100"]);
    assert!(d.join("reports/1/index.html").exists());
    assert!(html.starts_with("<!DOCTYPE html>"));
    assert!(html.contains("<title>Run 1 `e2e`</title>"));

    // Self-contained: no scripts, nothing fetched.
    assert!(!html.contains("<script"), "a script tag reached the page");
    let fetchable = html.replace("xmlns=\"http://www.w3.org/2000/svg\"", "");
    assert!(
        !fetchable.contains("<link") && !fetchable.contains(" src=") && !fetchable.contains("http")
    );
    assert!(!html.contains("<b>bold</b>"));

    // Every evaluation metric of every round, exactly as stored.
    let metrics = sql(
        d,
        "SELECT round, name, value, ci_low, ci_high, n FROM eval_summary WHERE run_id = 1",
    );
    assert!(metrics.len() > 20, "{metrics:?}");
    let eval_rows = rows_of(&html, "eval-round");
    assert_eq!(eval_rows.len(), metrics.len());
    for m in &metrics {
        let (round, name) = (m["round"].as_i64().unwrap(), m["name"].as_str().unwrap());
        let row = eval_rows
            .iter()
            .find(|r| {
                r.starts_with(&format!(
                    "<tr data-round=\"{round}\" data-metric=\"{name}\">"
                ))
            })
            .unwrap_or_else(|| panic!("no row for {name} in round {round}"));
        assert_eq!(
            values(row),
            vec![
                exact(&m["value"]),
                exact(&m["ci_low"]),
                exact(&m["ci_high"]),
                exact(&m["n"])
            ],
            "{name} round {round}: {row}"
        );
        // The Markdown twin: the same row, rounded for reading.
        let line = format!(
            "| {} | {} | {} | {} | {} |",
            name.replace('_', "\\_"),
            pretty(&m["value"]),
            pretty(&m["ci_low"]),
            pretty(&m["ci_high"]),
            m["n"]
        );
        assert!(md.contains(&line), "no `{line}` in the Markdown");
    }
    // The metric x round overview too.
    let omega = sql(
        d,
        "SELECT value FROM eval_summary WHERE round = 2 AND name = 'omega.helpfulness.previous'",
    );
    let matrix = rows_of(&html, "eval-matrix");
    let row = matrix
        .iter()
        .find(|r| r.contains("data-metric=\"omega.helpfulness.previous\""))
        .unwrap();
    assert_eq!(values(row)[1], exact(&omega[0]["value"]));

    // The gate's decisions with their reasons.
    let gates = sql(
        d,
        "SELECT round, value, best_round, best_value, decision, reason FROM gate_decisions ORDER BY round",
    );
    let gate_rows = rows_of(&html, "gates");
    assert_eq!(gate_rows.len(), 2 * gates.len(), "overview and per round");
    for g in &gates {
        let round = g["round"].as_i64().unwrap();
        let row = gate_rows
            .iter()
            .find(|r| r.starts_with(&format!("<tr data-round=\"{round}\">")))
            .unwrap();
        assert_eq!(
            values(row),
            vec![
                round.to_string(),
                exact(&g["value"]),
                exact(&g["best_round"]),
                exact(&g["best_value"])
            ]
        );
        assert!(row.contains(g["decision"].as_str().unwrap()));
        let reason = g["reason"].as_str().unwrap();
        assert!(
            row.contains(&reason.replace('&', "&amp;").replace('<', "&lt;")),
            "{row}"
        );
    }
    assert!(gates[1]["decision"] == "stop");

    // Stage progress and pair counts, per round.
    let stages = sql(
        d,
        "SELECT round, stage, done, failed FROM stage_progress WHERE run_id = 1 AND round > 0",
    );
    let stage_rows = rows_of(&html, "stages");
    for s in &stages {
        let row = stage_rows
            .iter()
            .find(|r| {
                r.starts_with(&format!(
                    "<tr data-round=\"{}\" data-stage=\"{}\">",
                    s["round"],
                    s["stage"].as_str().unwrap()
                ))
            })
            .unwrap_or_else(|| panic!("no stage row {s:?}"));
        assert_eq!(values(row)[..2], [exact(&s["done"]), exact(&s["failed"])]);
    }
    let summaries = sql(
        d,
        "SELECT round, pairs_kept, pairs_dropped, copy_rate FROM round_summary WHERE run_id = 1",
    );
    assert_eq!(summaries.len(), 2, "the gate stopped after round 2");
    let round_rows = rows_of(&html, "rounds");
    for s in &summaries {
        let row = round_rows
            .iter()
            .find(|r| r.starts_with(&format!("<tr data-round=\"{}\">", s["round"])))
            .unwrap();
        let v = values(row);
        // round, generations ok/failed, corrections ok/failed, kept, dropped, copy rate, ...
        assert_eq!(
            v[5..8],
            [
                exact(&s["pairs_kept"]),
                exact(&s["pairs_dropped"]),
                exact(&s["copy_rate"])
            ]
        );
    }
    let jobs = rows_of(&html, "training-jobs");
    assert!(jobs
        .iter()
        .any(|r| r.starts_with("<tr data-round=\"1\">") && r.contains("dpo")));
    assert!(html.contains("no per-step metrics stored"));

    // Charts: inline SVG in the page, files beside the Markdown.
    for chart in [
        "chart-omega-helpfulness",
        "chart-omega-harmlessness",
        "chart-refusals",
        "chart-length",
        "chart-tradeoff",
        "chart-refusal-tradeoff",
    ] {
        assert!(
            html.contains(&format!("<figure id=\"{chart}\"><svg")),
            "no {chart}"
        );
        assert!(
            md.contains(&format!("]({chart}.svg)")),
            "no {chart} in the Markdown"
        );
        let svg = std::fs::read_to_string(d.join(format!("reports/1/{chart}.svg"))).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("<text"), "{chart}");
    }
    assert!(html.contains("Helpfulness vs harmlessness"));
    let refusals = std::fs::read_to_string(d.join("reports/1/chart-refusal-tradeoff.svg")).unwrap();
    assert!(
        refusals.contains("upstream alone") && refusals.contains("upstream + Aligner"),
        "{refusals}"
    );

    // Side by side: the original and the correction, the edit marked, the planted markup
    // escaped on both sides; labels from the evaluation's rule.
    assert!(
        html.contains("<ins>I corrected this:</ins>"),
        "no insertion mark"
    );
    let escaped =
        "&lt;script&gt;alert(&#39;pwned&#39;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;";
    assert!(
        html.matches(escaped).count() >= 3,
        "the planted prompt, answer and correction"
    );
    assert!(html.contains("<span class=\"badge bad\">harmful</span>"));
    assert!(html.contains("<span class=\"badge muted\">benign</span>"));
    assert!(html.contains("version 1 answer") && html.contains("Aligner correction"));
    assert!(!md.contains("<script") && !md.contains("<b>"));
    assert!(
        md.contains("&lt;script&gt;alert('pwned')&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;")
    );
    assert!(md.contains("**I corrected this:**"));

    // Capped examples say how many were left out.
    let (html, _) = report(d, &["1", "--examples", "3", "--out", "small"]);
    let held = scalar(d, "SELECT count(*) FROM prompts WHERE split = 'holdout'");
    assert!(
        html.contains(&format!(
            "showing 3 of {held} held-out prompts ({} left out",
            held - 3
        )),
        "no cap note"
    );
    assert!(d.join("small/index.md").exists());
}

#[test]
fn a_run_without_evaluation_whose_training_failed_still_reports() {
    let server = aligner_mockserver::spawn_in_thread(MockConfig::default());
    let dir = setup(&server, 10, &[], 2, 4, true);
    let d = dir.path();
    std::fs::write(
        d.join("train.sh"),
        "echo 'CUDA out of memory' >&2; exit 3\n",
    )
    .unwrap();
    let o = run(&["run", "p.yaml", "--store", "s.db"], d);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));

    let (html, md) = report(d, &["--out", "out"]);
    assert!(html.contains("no evaluation configured"));
    assert!(md.contains("no evaluation configured"));
    assert!(html.contains("<p class=\"error\">the run failed:"));
    assert!(
        html.contains("<p class=\"error\">stage `train` failed:")
            || html.contains("stage `train` failed:")
    );
    assert!(html.contains("<td class=\"bad\">failed</td>"));
    assert!(!html.contains("<svg"), "no metrics, no charts");
    let kept = scalar(d, "SELECT pairs_kept FROM round_summary WHERE round = 1");
    let row = rows_of(&html, "pairs")
        .into_iter()
        .find(|r| r.contains("data-measure=\"pairs kept\""))
        .unwrap();
    assert_eq!(values(&row), vec![kept.to_string()]);

    // An unknown run is refused with a hint.
    let o = run(&["report", "--store", "s.db", "nope"], d);
    assert!(!o.status.success());
    assert!(text(&o).contains("no run `nope`"), "{}", text(&o));
}

/// The PNG's width and height from its IHDR chunk, after checking the signature.
fn png_size(bytes: &[u8]) -> (u32, u32) {
    assert!(bytes.len() > 33, "too short for a PNG");
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG signature");
    assert_eq!(&bytes[12..16], b"IHDR", "no IHDR first");
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    (be(&bytes[16..20]), be(&bytes[20..24]))
}

#[test]
fn the_page_renders_in_headless_chromium() {
    let chromium = ["chromium", "chromium-browser"].into_iter().find(|c| {
        Command::new(c)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    let Some(chromium) = chromium else {
        if std::env::var("ALIGNER_SKIP_CHROMIUM").as_deref() == Ok("1") {
            eprintln!("chromium is missing; skipped because ALIGNER_SKIP_CHROMIUM=1");
            return;
        }
        panic!("`chromium` is not installed (scripts/test.sh installs it; set ALIGNER_SKIP_CHROMIUM=1 to skip this test)");
    };
    let server = aligner_mockserver::spawn_in_thread(MockConfig::default());
    let dir = setup(&server, 20, &[PLANTED], 2, 4, true);
    let d = dir.path();
    std::fs::write(d.join("p.yaml"), eval_pipeline(&server, 2, "")).unwrap();
    let o = run(&["run", "p.yaml", "--store", "s.db"], d);
    assert!(o.status.success(), "{}", text(&o));
    let (html, _) = report(d, &["--out", "page"]);
    assert!(html.contains("<svg"));

    let page = d.join("page/index.html");
    let png = d.join("shot.png");
    let mut child = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            &format!("--user-data-dir={}", d.join("profile").display()),
            &format!("--screenshot={}", png.display()),
            "--window-size=1280,2000",
            &format!("file://{}", page.display()),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("chromium starts");
    let mut status = None;
    wait_until("chromium's screenshot", Duration::from_secs(120), || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    let out = child.wait_with_output().unwrap();
    assert!(
        status.unwrap().success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&png).expect("a screenshot");
    assert_eq!(png_size(&bytes), (1280, 2000));

    let decoder = png::Decoder::new(std::io::Cursor::new(&bytes));
    let mut reader = decoder.read_info().expect("a decodable PNG");
    let mut buf = vec![0; reader.output_buffer_size()];
    let frame = reader.next_frame(&mut buf).expect("a frame");
    let channels = frame.color_type.samples();
    assert!(channels >= 3, "{:?}", frame.color_type);
    let pixels: Vec<&[u8]> = buf[..frame.buffer_size()].chunks(channels).collect();
    let not_white = pixels.iter().filter(|p| p[..3] != [255, 255, 255]).count();
    let mut colours: Vec<[u8; 3]> = pixels.iter().map(|p| [p[0], p[1], p[2]]).collect();
    colours.sort_unstable();
    colours.dedup();
    // Text, tables, the page's grey margins and the charts' colours.
    assert!(
        not_white > pixels.len() / 20,
        "the page looks blank: {not_white} of {} pixels not white",
        pixels.len()
    );
    assert!(colours.len() > 50, "only {} colours", colours.len());
}

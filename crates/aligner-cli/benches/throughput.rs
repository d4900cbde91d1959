//! Throughput and memory of the item pipeline (generate -> correct -> synthesize) against a
//! loopback OpenAI-compatible server that answers at once.
//!
//!     cargo bench -p aligner-cli --bench throughput
//!     ALIGNER_BENCH_PROMPTS=100000 ALIGNER_BENCH_CONCURRENCY=64 cargo bench -p aligner-cli --bench throughput
//!
//! Prints prompts/s through all three stages, per-stage times from the store, and the
//! `aligner` process's peak RSS (VmHWM, reported by the process itself). `ALIGNER_BIN` runs
//! another `aligner` binary (an earlier build, for a side-by-side comparison).

use std::process::Command;
use std::time::Instant;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let prompts = env_or("ALIGNER_BENCH_PROMPTS", 100_000);
    let concurrency = env_or("ALIGNER_BENCH_CONCURRENCY", 64);
    let server = aligner_mockserver::spawn_in_thread(aligner_mockserver::MockConfig::default());
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mut data = String::with_capacity(prompts * 80);
    for i in 0..prompts {
        data.push_str(&serde_json::json!({"prompt": format!("Benchmark prompt {i}: explain topic {} briefly.", i % 977)}).to_string());
        data.push('\n');
    }
    std::fs::write(d.join("prompts.jsonl"), data).unwrap();
    let yaml = format!(
        r#"version: 1
name: bench
models:
  upstream: {{ kind: openai, base_url: "{url}", model: up, max_concurrency: {concurrency} }}
  aligner: {{ kind: openai, base_url: "{url}", model: al, max_concurrency: {concurrency} }}
prompts: {{ source: prompts.jsonl }}
rounds:
  count: 1
  generate: {{ model: upstream, sampling: {{ temperature: 0.7, max_tokens: 128 }} }}
  correct: {{ model: aligner, template: aligner-v1, sampling: {{ temperature: 0.3, max_tokens: 128 }} }}
  synthesize: {{ dedupe_prompts: false }}
"#,
        url = server.base_url
    );
    std::fs::write(d.join("bench.yaml"), yaml).unwrap();
    let bin = std::env::var("ALIGNER_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_aligner").into());
    let start = Instant::now();
    let out = Command::new(&bin)
        .args(["run", "bench.yaml", "--store", "bench.db", "--json"])
        .current_dir(d)
        .output()
        .expect("run aligner");
    let secs = start.elapsed().as_secs_f64();
    if !out.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
        std::process::exit(1);
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json outcome");
    let stages = Command::new(&bin)
        .args([
            "sql",
            "--store",
            "bench.db",
            "SELECT stage, done, failed, round((julianday(finished_at) - julianday(started_at)) * 86400, 2) AS seconds FROM stage_executions ORDER BY id",
        ])
        .current_dir(d)
        .output()
        .unwrap();
    let r = &v["rounds"][0];
    println!("prompts:            {prompts}");
    println!("concurrency:        {concurrency}");
    println!("wall time:          {secs:.2} s (whole `aligner run`, ingest included)");
    println!(
        "throughput:         {:.0} prompts/s through generate -> correct -> synthesize",
        prompts as f64 / secs
    );
    println!(
        "pairs kept/dropped: {}/{}",
        r["pairs_kept"], r["pairs_dropped"]
    );
    println!(
        "peak RSS:           {:.1} MB",
        v["peak_rss_kb"].as_f64().unwrap_or(0.0) / 1024.0
    );
    println!("server requests:    {}", server.stats().requests);
    println!("{}", String::from_utf8_lossy(&stages.stdout));
}

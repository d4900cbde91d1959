//! Local model speed, in the shape of llama.cpp's `llama-bench`: prefill at 64 and 512
//! tokens (pp64, pp512), one-stream decode of 128 tokens (tg128), generation throughput with
//! 16 concurrent sequences through the batching engine, and peak RSS.
//!
//! `cargo bench -p aligner-local --bench generate -- [MODEL.gguf] [--reps N] [--only pp|tg|gen]`
//! (default model: `$ALIGNER_MODELS_DIR` or `./models`, SmolLM2-135M-Instruct.Q4_1.gguf).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use aligner_local::engine::{Engine, EngineOptions, GenParams};
use aligner_local::gguf::GgufFile;
use aligner_local::model::{Chunk, KvCache, Model};
use aligner_local::sampling::{argmax, SamplingParams};
use aligner_local::tokenizer::TextTokenizer;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let reps: usize = args
        .iter()
        .position(|a| a == "--reps")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let run = |what: &str| only.as_deref().is_none_or(|o| o == what);
    let path = args
        .iter()
        .find(|a| a.ends_with(".gguf"))
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let dir = std::env::var_os("ALIGNER_MODELS_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models"));
            dir.join("SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    let file = GgufFile::open(&path)?;
    let model = Arc::new(Model::from_gguf(&file)?);
    let tokenizer = Arc::new(TextTokenizer::from_gguf(&file.content)?);
    drop(file);
    println!(
        "model {} ({}), {} threads, weights {} MB",
        path.display(),
        model.config.architecture,
        rayon::current_num_threads(),
        model.weight_bytes() / (1 << 20)
    );
    // Deterministic pseudo-random prompt tokens (as llama-bench does).
    let prompt = |n: usize| -> Vec<u32> {
        (0..n)
            .map(|i| {
                ((i as u64 * 2654435761 + 17) % (model.config.vocab as u64 - 100) + 100) as u32
            })
            .collect()
    };
    let best = |f: &mut dyn FnMut() -> f64| -> (f64, f64) {
        let runs: Vec<f64> = (0..reps).map(|_| f()).collect();
        let mean = runs.iter().sum::<f64>() / runs.len() as f64;
        let sd = (runs.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / runs.len() as f64).sqrt();
        (mean, sd)
    };
    for n in [64usize, 512].into_iter().filter(|_| run("pp")) {
        let toks = prompt(n);
        let (m, sd) = best(&mut || {
            let mut cache = KvCache::new(model.config.layers);
            let t = Instant::now();
            model.forward(&mut [Chunk {
                cache: &mut cache,
                tokens: &toks,
                logits: true,
            }]);
            n as f64 / t.elapsed().as_secs_f64()
        });
        println!("pp{n:<4} {m:8.1} ± {sd:5.1} tok/s");
    }
    let (m, sd) = if !run("tg") {
        (0.0, 0.0)
    } else {
        best(&mut || {
            let mut cache = KvCache::new(model.config.layers);
            let mut tok = 1u32;
            let t = Instant::now();
            for _ in 0..128 {
                let l = model.forward(&mut [Chunk {
                    cache: &mut cache,
                    tokens: &[tok],
                    logits: true,
                }]);
                tok = argmax(&l[0]);
            }
            128.0 / t.elapsed().as_secs_f64()
        })
    };
    println!("tg128  {m:8.1} ± {sd:5.1} tok/s  (one stream)");
    let engine = Engine::start(
        model.clone(),
        tokenizer,
        EngineOptions {
            max_batch: 16,
            prefill_chunk: 512,
            context: 4096,
        },
    );
    for batch in [16usize].into_iter().filter(|_| run("gen")) {
        let (m, sd) = best(&mut || {
            let t = Instant::now();
            let handles: Vec<_> = (0..batch)
                .map(|i| {
                    let ids = prompt(32 + i);
                    let params = GenParams {
                        max_tokens: 128,
                        stop: Vec::new(),
                        ignore_eos: true,
                        sampling: SamplingParams {
                            temperature: 0.8,
                            seed: i as u64,
                            ..Default::default()
                        },
                    };
                    (ids, params)
                })
                .collect();
            let engine = &engine;
            let total: usize = std::thread::scope(|s| {
                let hs: Vec<_> = handles
                    .into_iter()
                    .map(|(ids, p)| {
                        s.spawn(move || {
                            engine
                                .generate_blocking(ids, p)
                                .map(|o| o.tokens.len())
                                .unwrap_or(0)
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).sum()
            });
            total as f64 / t.elapsed().as_secs_f64()
        });
        println!("gen x{batch} {m:8.1} ± {sd:5.1} tok/s  ({batch} concurrent sequences x 128 tokens, prompts 32-47 tokens, prefill included)");
    }
    println!("peak RSS {} MB", peak_rss_kb() / 1024);
    Ok(())
}

fn peak_rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

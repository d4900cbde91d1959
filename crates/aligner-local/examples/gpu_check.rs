//! Checks the candle device path against the SIMD CPU path on one GGUF file, then measures
//! the device's speed. With `--features cuda` the device is the first CUDA GPU; without it
//! the device path runs on the CPU through candle (an independent reference).
//!
//! For each of the five prompts of `tests/fixtures/smollm2_greedy.json`: 32 greedy tokens of
//! both paths, whether they agree, the first position where they differ, and the largest
//! absolute difference of the first-step logits. Then throughput of both paths: prefill of
//! 512 tokens, one-stream decode of 128 tokens, and 16 sequences (32-token prompts) decoding
//! 128 tokens each. Each figure is the median of `--reps` timed runs after one warm-up run.
//!
//! `cargo run --release -p aligner-local [--features cuda] --example gpu_check -- MODEL.gguf
//! [--out DIR] [--fixture PATH] [--reps N] [--steps N]`; writes `DIR/gpu_check.json`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use aligner_local::device::{best_device, DeviceCache, DeviceModel};
use aligner_local::engine::{Engine, EngineOptions, GenParams};
use aligner_local::gguf::GgufFile;
use aligner_local::model::{Chunk, KvCache, Model};
use aligner_local::sampling::{argmax, SamplingParams};
use aligner_local::tokenizer::TextTokenizer;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::Device;
use serde_json::{json, Value};

struct Args {
    model: PathBuf,
    out: Option<PathBuf>,
    fixture: PathBuf,
    reps: usize,
    steps: usize,
}

fn parse_args() -> Result<Args> {
    let mut model = None;
    let mut out = None;
    let mut fixture = None;
    let mut reps = 3;
    let mut steps = 32;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or_else(|| anyhow!("{a} needs a value"));
        match a.as_str() {
            "--out" => out = Some(PathBuf::from(value()?)),
            "--fixture" => fixture = Some(PathBuf::from(value()?)),
            "--reps" => reps = value()?.parse().context("--reps")?,
            "--steps" => steps = value()?.parse().context("--steps")?,
            _ if a.starts_with("--") => bail!("unknown option {a}"),
            _ => model = Some(PathBuf::from(a)),
        }
    }
    let fixture = fixture.unwrap_or_else(|| {
        let rel = PathBuf::from("crates/aligner-local/tests/fixtures/smollm2_greedy.json");
        if rel.is_file() {
            rel
        } else {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2_greedy.json")
        }
    });
    Ok(Args {
        model: model.ok_or_else(|| {
            anyhow!("usage: gpu_check MODEL.gguf [--out DIR] [--fixture PATH] [--reps N]")
        })?,
        out,
        fixture,
        reps: reps.max(1),
        steps: steps.max(1),
    })
}

fn gpu_name() -> Option<String> {
    let out = std::process::Command::new("nvidia-smi")
        .args([
            "--query-gpu=name,driver_version,memory.total",
            "--format=csv,noheader",
        ])
        .output()
        .ok()?;
    let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !s.is_empty()).then_some(s)
}

fn sync(device: &Device) -> Result<()> {
    device
        .synchronize()
        .map_err(|e| anyhow!("candle synchronize: {e}"))
}

/// Median tokens per second of `reps` timed runs after one warm-up; `run` returns the tokens
/// it processed.
fn timed(device: &Device, reps: usize, run: &mut dyn FnMut() -> Result<usize>) -> Result<f64> {
    run()?;
    sync(device)?;
    let mut rates = Vec::with_capacity(reps);
    for _ in 0..reps {
        sync(device)?;
        let t = Instant::now();
        let n = run()?;
        sync(device)?;
        rates.push(n as f64 / t.elapsed().as_secs_f64());
    }
    rates.sort_by(f64::total_cmp);
    Ok(rates[rates.len() / 2])
}

/// Deterministic pseudo-random prompt tokens (as llama-bench does).
fn bench_prompt(n: usize, vocab: usize, salt: u64) -> Vec<u32> {
    (0..n as u64)
        .map(|i| (((i + salt * 7919) * 2654435761 + 17) % (vocab as u64 - 100) + 100) as u32)
        .collect()
}

fn show(r: &Result<f64>) -> String {
    match r {
        Ok(v) => format!("{v:.0} tok/s"),
        Err(e) => format!("FAILED ({e})"),
    }
}

/// A rate, or `{"error": ...}`.
fn as_json(r: &Result<f64>) -> Value {
    match r {
        Ok(v) => json!(v),
        Err(e) => json!({ "error": e.to_string() }),
    }
}

fn first_diff(a: &[u32], b: &[u32]) -> Option<usize> {
    (0..a.len().max(b.len())).find(|&i| a.get(i) != b.get(i))
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let started = Instant::now();
    let gpu = gpu_name();
    println!(
        "gpu: {}",
        gpu.as_deref().unwrap_or("(nvidia-smi not available)")
    );
    let cases = read_fixture(&args.fixture)?;

    let t = Instant::now();
    let file = GgufFile::open(&args.model)?;
    let model = Arc::new(Model::from_gguf(&file)?);
    let tokenizer = Arc::new(TextTokenizer::from_gguf(&file.content)?);
    let cpu_load_s = t.elapsed().as_secs_f64();
    let device = best_device();
    if cfg!(feature = "cuda") && device.is_cpu() {
        let why = Device::new_cuda(0)
            .err()
            .map_or(String::new(), |e| e.to_string());
        println!("WARNING: built with CUDA but no CUDA device opened ({why}); the device path runs on the CPU");
    }
    let t = Instant::now();
    let dev = DeviceModel::from_gguf(&file, &device)?;
    sync(&device)?;
    let device_load_s = t.elapsed().as_secs_f64();
    // With a GPU, candle on the CPU too: tells a device difference from a candle difference.
    let candle_cpu = if device.is_cpu() {
        None
    } else {
        Some(DeviceModel::from_gguf(&file, &Device::Cpu)?)
    };
    let cfg = &model.config;
    let device_label = format!("{:?}", device.location());
    println!(
        "model {} ({} layers, hidden {}, vocab {}); device path on {device_label}; {} CPU threads",
        args.model.display(),
        cfg.layers,
        cfg.hidden,
        cfg.vocab,
        rayon::current_num_threads()
    );
    println!("load: CPU path {cpu_load_s:.2} s, device path {device_load_s:.2} s");

    // Agreement.
    let engine = Engine::start(model.clone(), tokenizer.clone(), EngineOptions::default());
    let greedy = |max_tokens: usize| GenParams {
        max_tokens,
        stop: Vec::new(),
        ignore_eos: true,
        sampling: SamplingParams::default(),
    };
    let mut prompts_json = Vec::new();
    let mut equal_count = 0;
    for (i, ids) in cases.iter().enumerate() {
        let cpu = engine
            .generate_blocking(ids.clone(), greedy(args.steps))
            .map_err(|e| anyhow!("CPU path: {e}"))?
            .tokens;
        let mut cache = KvCache::new(cfg.layers);
        let cpu_logits = model
            .forward(&mut [Chunk {
                cache: &mut cache,
                tokens: ids,
                logits: true,
            }])
            .remove(0);
        let on_device = || -> Result<(Vec<u32>, Vec<f32>)> {
            let toks = dev.greedy(std::slice::from_ref(ids), args.steps)?.remove(0);
            let logits = dev
                .forward(std::slice::from_ref(ids), &mut DeviceCache::new(cfg.layers))?
                .remove(0);
            Ok((toks, logits))
        };
        let (on_dev, dev_logits) = match on_device() {
            Ok(r) => r,
            Err(e) => {
                println!("prompt {i}: device path FAILED: {e}");
                prompts_json.push(json!({"index": i, "cpu": cpu, "error": e.to_string()}));
                continue;
            }
        };
        let diff = max_abs_diff(&cpu_logits, &dev_logits);
        let scale = cpu_logits.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let equal = cpu == on_dev;
        equal_count += usize::from(equal);
        let fd = first_diff(&cpu, &on_dev);
        let mut p = json!({
            "index": i,
            "prompt_tokens": ids.len(),
            "cpu": cpu,
            "device": on_dev,
            "equal": equal,
            "first_diff": fd,
            "first_logits_max_abs_diff": diff,
            "first_logits_max_abs": scale,
            "first_argmax_equal": argmax(&cpu_logits) == argmax(&dev_logits),
        });
        let mut extra = String::new();
        if let Some(cc) = &candle_cpu {
            let toks = cc.greedy(std::slice::from_ref(ids), args.steps)?.remove(0);
            let same = toks == on_dev;
            extra = format!("; candle-CPU {} device", if same { "==" } else { "!=" });
            p["candle_cpu"] = json!(toks);
            p["device_equals_candle_cpu"] = json!(same);
            p["candle_cpu_first_diff_vs_device"] = json!(first_diff(&toks, &on_dev));
        }
        println!(
            "prompt {i} ({} tokens): {}; first-step logits max |diff| {diff:.2e} (max |logit| {scale:.1}){extra}",
            ids.len(),
            match fd {
                None => "EQUAL".to_string(),
                Some(d) => format!("DIFFER from token {d}"),
            },
        );
        if !equal {
            println!("  cpu    {cpu:?}\n  device {on_dev:?}");
        }
        prompts_json.push(p);
    }
    let all_equal = equal_count == cases.len();
    println!(
        "greedy agreement: {equal_count}/{} prompts equal over {} tokens",
        cases.len(),
        args.steps
    );

    // Batching on the device: 16 equal-length prompts in one batch == each alone.
    let vocab = cfg.vocab;
    let batch: Vec<Vec<u32>> = (0..16).map(|s| bench_prompt(32, vocab, s + 1)).collect();
    let batch_check = (|| -> Result<Value> {
        let together = dev.greedy(&batch, args.steps)?;
        let mut differing = Vec::new();
        for (j, ids) in batch.iter().enumerate() {
            let alone = dev.greedy(std::slice::from_ref(ids), args.steps)?.remove(0);
            if alone != together[j] {
                differing.push(json!({"seq": j, "first_diff": first_diff(&alone, &together[j])}));
            }
        }
        Ok(json!({"sequences": batch.len(), "steps": args.steps, "differing": differing}))
    })();
    match &batch_check {
        Ok(v) => println!(
            "device batch of 16 vs each alone ({} tokens): {} sequences differ",
            args.steps,
            v["differing"].as_array().map_or(0, Vec::len)
        ),
        Err(e) => println!("device batch of 16 vs each alone: FAILED ({e})"),
    }
    let batch_check = batch_check.unwrap_or_else(|e| json!({"error": e.to_string()}));

    // Device throughput; a failing measurement is reported and the others still run.
    let reps = args.reps;
    let pp = bench_prompt(512, vocab, 0);
    let dev_prefill = timed(&device, reps, &mut || {
        let mut cache = DeviceCache::new(cfg.layers);
        dev.forward(std::slice::from_ref(&pp), &mut cache)?;
        Ok(pp.len())
    });
    let dev_decode = timed(&device, reps, &mut || {
        let mut cache = DeviceCache::new(cfg.layers);
        let mut tok = 1u32;
        for _ in 0..128 {
            let l = dev.forward(&[vec![tok]], &mut cache)?;
            tok = argmax(&l[0]);
        }
        Ok(128)
    });
    let dev_batched = timed(&device, reps, &mut || {
        let out = dev.greedy(&batch, 128)?;
        Ok(out.iter().map(Vec::len).sum())
    });
    println!(
        "device ({device_label}): prefill 512 {}, decode 1x128 {}, decode 16x128 {}",
        show(&dev_prefill),
        show(&dev_decode),
        show(&dev_batched)
    );

    // CPU throughput, same shapes.
    let cpu_dev = Device::Cpu;
    let cpu_prefill = timed(&cpu_dev, reps, &mut || {
        let mut cache = KvCache::new(cfg.layers);
        model.forward(&mut [Chunk {
            cache: &mut cache,
            tokens: &pp,
            logits: true,
        }]);
        Ok(pp.len())
    })?;
    let cpu_decode = timed(&cpu_dev, reps, &mut || {
        let mut cache = KvCache::new(cfg.layers);
        let mut tok = 1u32;
        for _ in 0..128 {
            let l = model.forward(&mut [Chunk {
                cache: &mut cache,
                tokens: &[tok],
                logits: true,
            }]);
            tok = argmax(&l[0]);
        }
        Ok(128)
    })?;
    let cpu_batched = timed(&cpu_dev, reps, &mut || {
        let engine = &engine;
        let total: usize = std::thread::scope(|s| {
            let hs: Vec<_> = batch
                .iter()
                .map(|ids| {
                    let ids = ids.clone();
                    s.spawn(move || {
                        engine
                            .generate_blocking(ids, greedy(128))
                            .map(|o| o.tokens.len())
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().expect("generation thread"))
                .sum::<Result<usize, String>>()
        })
        .map_err(|e| anyhow!("CPU path: {e}"))?;
        Ok(total)
    })?;
    println!(
        "cpu ({} threads): prefill 512 {cpu_prefill:.0} tok/s, decode 1x128 {cpu_decode:.0} tok/s, decode 16x128 {cpu_batched:.0} tok/s",
        rayon::current_num_threads()
    );

    let total_s = started.elapsed().as_secs_f64();
    let report = json!({
        "gpu": gpu,
        "device": device_label,
        "model": args.model.display().to_string(),
        "layers": cfg.layers,
        "hidden": cfg.hidden,
        "vocab": vocab,
        "cpu_threads": rayon::current_num_threads(),
        "load_s": {"cpu": cpu_load_s, "device": device_load_s},
        "greedy_steps": args.steps,
        "prompts": prompts_json,
        "all_equal": all_equal,
        "device_batch_vs_alone": batch_check,
        "reps": reps,
        "throughput_note": "tok/s, median of reps after one warm-up; decode 16x128 = 16 sequences with 32-token prompts, 128 generated tokens each, prefill included",
        "device_throughput": {
            "prefill512_tok_s": as_json(&dev_prefill),
            "decode128_tok_s": as_json(&dev_decode),
            "batched16_decode128_tok_s": as_json(&dev_batched),
        },
        "cpu_throughput": {
            "prefill512_tok_s": cpu_prefill,
            "decode128_tok_s": cpu_decode,
            "batched16_decode128_tok_s": cpu_batched,
        },
        "total_s": total_s,
    });
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("gpu_check.json");
        std::fs::write(&path, serde_json::to_string_pretty(&report)? + "\n")?;
        println!("wrote {}", path.display());
    }
    println!("total {total_s:.1} s");
    Ok(())
}

fn read_fixture(path: &Path) -> Result<Vec<Vec<u32>>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the prompts fixture {}", path.display()))?;
    let v: Value = serde_json::from_str(&text)?;
    let prompts = v["prompts"]
        .as_array()
        .ok_or_else(|| anyhow!("{}: no `prompts` array", path.display()))?;
    prompts
        .iter()
        .map(|p| {
            serde_json::from_value::<Vec<u32>>(p["prompt_ids"].clone())
                .with_context(|| format!("{}: prompt_ids", path.display()))
        })
        .collect()
}

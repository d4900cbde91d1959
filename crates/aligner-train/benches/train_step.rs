//! Training throughput of the built-in trainer on SmolLM2-135M (f32, full fine-tuning), in
//! the shape of `scripts/bench/torch_train_step.py`: an SFT step (forward, backward, AdamW)
//! at batch 1 and 2, and a DPO step on one pair (policy on chosen and rejected, frozen
//! reference forward), sequence length 512, random token ids. The DPO pair shares a 128-token
//! prompt, as in the PyTorch script; on the CPU it is packed as the trainer packs it (one row,
//! the prompt computed once), `--separate` packs chosen and rejected as two rows instead.
//!
//! `cargo bench -p aligner-train --bench train_step -- [--seq N] [--steps N] [--only sft|dpo]
//!  [--batches 1,2] [--random] [--device cpu|cuda] [--tf32] [--separate]`
//!
//! `--random` uses SmolLM2-135M's shapes with random weights (no model file needed);
//! `--device cuda` (built with `--features cuda`) runs the step on the GPU, where the model is
//! composed of candle's differentiable ops (the fused blocks are CPU kernels), and `--tf32`
//! lets cuBLAS use TF32 for the f32 matrix products.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::Device;

use aligner_train::data::{pack, pack_pairs, sequence_logps, token_logps, Pair, PairSeqs};
use aligner_train::loss::{dpo_loss, sft_loss, DpoOptions};
use aligner_train::model::{gguf_weights, Config, TrainModel, Trainable, Weights};
use aligner_train::optim::{AdamW, OptimConfig};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn main() -> anyhow::Result<()> {
    aligner_train::tune_allocator();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let seq: usize = arg(&args, "--seq")
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);
    let steps: usize = arg(&args, "--steps")
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let only = arg(&args, "--only");
    let run = |w: &str| only.as_deref().is_none_or(|o| o == w);
    let batches: Vec<usize> = arg(&args, "--batches")
        .map(|v| v.split(',').filter_map(|b| b.parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 2]);
    let dev = match arg(&args, "--device").as_deref() {
        None | Some("cpu") => Device::Cpu,
        Some("cuda") => Device::new_cuda(0)?,
        Some(other) => anyhow::bail!("--device {other}: expected cpu or cuda"),
    };
    if args.iter().any(|a| a == "--tf32") {
        #[cfg(feature = "cuda")]
        candle_core::cuda::set_gemm_reduced_precision_f32(true);
    }
    let (config, weights) = if args.iter().any(|a| a == "--random") {
        random_smollm2()
    } else {
        let dir = std::env::var_os("ALIGNER_MODELS_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models"));
        gguf_weights(&dir.join("SmolLM2-135M-Instruct.Q4_1.gguf"))?
    };
    let vocab = config.vocab as u64;
    let ids = |n: usize, salt: u64| -> Vec<u32> {
        (0..n as u64)
            .map(|i| ((i * 2654435761 + salt * 97 + 17) % (vocab - 100) + 100) as u32)
            .collect()
    };
    println!(
        "SmolLM2-135M f32, full fine-tuning, seq {seq}, {dev:?}, {} threads, median of {steps} steps after 1 warm-up",
        candle_core::utils::get_num_threads()
    );
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    if run("sft") {
        for &batch in &batches {
            let model =
                TrainModel::from_weights(config.clone(), weights.clone(), &Trainable::Full, &dev)?;
            let mut opt = AdamW::new(
                model.vars(),
                OptimConfig {
                    learning_rate: 1e-5,
                    warmup_ratio: 0.0,
                    ..Default::default()
                },
            )?;
            let seqs: Vec<Vec<u32>> = (0..batch).map(|b| ids(seq, b as u64)).collect();
            // Loss on every token but the first (as a causal LM loss over the whole sequence).
            let refs: Vec<(&[u32], &[u32])> = seqs.iter().map(|s| (&s[..1], &s[1..])).collect();
            let data = pack(&refs, 0, &dev)?;
            let (mut times, mut fwd) = (Vec::new(), Vec::new());
            for i in 0..=steps {
                let t = Instant::now();
                let loss = sft_loss(&token_logps(&model, &data, true)?)?;
                dev.synchronize()?;
                let f = t.elapsed().as_secs_f64();
                opt.backward_step_with(&loss, |l| model.backward(l))?;
                dev.synchronize()?;
                if i > 0 {
                    times.push(t.elapsed().as_secs_f64());
                    fwd.push(f);
                }
            }
            let (s, f) = (median(times), median(fwd));
            println!(
                "sft  batch {batch}: {:.2} s/step, {:.1} tok/s (forward {f:.2} s, backward and AdamW {:.2} s)",
                s,
                (batch * seq) as f64 / s,
                s - f
            );
        }
    }
    if run("dpo") {
        let model =
            TrainModel::from_weights(config.clone(), weights.clone(), &Trainable::Full, &dev)?;
        let reference = TrainModel::from_weights(config.clone(), weights, &Trainable::None, &dev)?;
        let mut opt = AdamW::new(
            model.vars(),
            OptimConfig {
                learning_rate: 1e-5,
                warmup_ratio: 0.0,
                ..Default::default()
            },
        )?;
        // As the PyTorch script: each sequence `seq` tokens, a `seq / 4`-token shared prompt.
        let prompt_len = seq / 4;
        let pair = Pair {
            prompt: ids(prompt_len, 0),
            chosen: ids(seq - prompt_len, 1),
            rejected: ids(seq - prompt_len, 2),
        };
        // The trainer's layout on the CPU: one row, the prompt computed once
        // (`--separate`: chosen and rejected as two rows, the prompt computed twice).
        let separate = args.iter().any(|a| a == "--separate") || !model.takes_layouts();
        let data = if separate {
            let refs: Vec<(&[u32], &[u32])> =
                vec![(&pair.prompt, &pair.chosen), (&pair.prompt, &pair.rejected)];
            pack(&refs, 0, &dev)?
        } else {
            let row = PairSeqs {
                chosen: (&pair.prompt, &pair.chosen),
                rejected: (&pair.prompt, &pair.rejected),
            };
            pack_pairs(&[row], 0, &dev)?
        };
        println!(
            "dpo layout: {}",
            if separate {
                "two rows"
            } else {
                "one row, shared prompt"
            }
        );
        let (mut times, mut refs, mut fwd) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..=steps {
            let t = Instant::now();
            let r = sequence_logps(&reference, &data, false)?
                .detach()
                .to_vec1::<f32>()?;
            let tr = t.elapsed().as_secs_f64();
            let p = sequence_logps(&model, &data, true)?;
            dev.synchronize()?;
            let tp = t.elapsed().as_secs_f64() - tr;
            let (loss, _) = dpo_loss(
                &p.narrow(0, 0, 1)?,
                &p.narrow(0, 1, 1)?,
                &r[..1],
                &r[1..],
                &DpoOptions::default(),
                None,
            )?;
            opt.backward_step_with(&loss, |l| model.backward(l))?;
            dev.synchronize()?;
            if i > 0 {
                times.push(t.elapsed().as_secs_f64());
                refs.push(tr);
                fwd.push(tp);
            }
        }
        let (s, r, f) = (median(times), median(refs), median(fwd));
        println!(
            "dpo  one pair: {:.2} s/step, {:.1} policy tok/s (reference forward {r:.2} s, policy forward {f:.2} s, backward and AdamW {:.2} s)",
            s,
            (2 * seq) as f64 / s,
            s - r - f
        );
    }
    println!("peak RSS {} MB", peak_rss_kb() / 1024);
    Ok(())
}

/// SmolLM2-135M's shapes with random weights (normal, std 0.02; norms at 1), for measuring
/// where the model file is not at hand.
fn random_smollm2() -> (Config, Weights) {
    let config = Config {
        architecture: "llama".into(),
        vocab: 49152,
        hidden: 576,
        intermediate: 1536,
        layers: 30,
        heads: 9,
        kv_heads: 3,
        head_dim: 64,
        rope_theta: 100000.0,
        rms_eps: 1e-5,
        context: 8192,
        tie_embeddings: true,
        qkv_bias: false,
        rope: aligner_train::model::RopeStyle::Halves,
        rope_scaling: None,
        gemma3: None,
    };
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut normal = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                // Sum of four uniforms: close enough to a normal for timing.
                let mut s = 0.0f32;
                for _ in 0..4 {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    s += (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                }
                s * 0.02 * 3f32.sqrt()
            })
            .collect()
    };
    let (h, kv) = (config.hidden, config.kv_heads * config.head_dim);
    let mut w = Weights::new();
    let mut add = |name: String, shape: Vec<usize>, v: Vec<f32>| {
        w.insert(name, (shape, v));
    };
    add(
        "model.embed_tokens.weight".into(),
        vec![config.vocab, h],
        normal(config.vocab * h),
    );
    add("model.norm.weight".into(), vec![h], vec![1.0; h]);
    for i in 0..config.layers {
        let p = format!("model.layers.{i}");
        for (name, out, inp) in [
            ("self_attn.q_proj", h, h),
            ("self_attn.k_proj", kv, h),
            ("self_attn.v_proj", kv, h),
            ("self_attn.o_proj", h, h),
            ("mlp.gate_proj", config.intermediate, h),
            ("mlp.up_proj", config.intermediate, h),
            ("mlp.down_proj", h, config.intermediate),
        ] {
            add(
                format!("{p}.{name}.weight"),
                vec![out, inp],
                normal(out * inp),
            );
        }
        add(format!("{p}.input_layernorm.weight"), vec![h], vec![1.0; h]);
        add(
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            vec![1.0; h],
        );
    }
    (config, w)
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

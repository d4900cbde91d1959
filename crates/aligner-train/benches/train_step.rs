//! Training throughput of the built-in trainer on SmolLM2-135M (f32, full fine-tuning), in
//! the shape of `scripts/bench/torch_train_step.py`: an SFT step (forward, backward, AdamW)
//! at batch 1 and 2, and a DPO step on one pair (policy on chosen and rejected, frozen
//! reference forward), sequence length 512, random token ids.
//!
//! `cargo bench -p aligner-train --bench train_step -- [--seq N] [--steps N] [--only sft|dpo]`

use std::path::PathBuf;
use std::time::Instant;

use candle_core::Device;

use aligner_train::data::{pack, sequence_logps, token_logps, Pair};
use aligner_train::loss::{dpo_loss, sft_loss, DpoOptions};
use aligner_train::model::{gguf_weights, TrainModel, Trainable};
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
    let dir = std::env::var_os("ALIGNER_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models"));
    let path = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let dev = Device::Cpu;
    let (config, weights) = gguf_weights(&path)?;
    let vocab = config.vocab as u64;
    let ids = |n: usize, salt: u64| -> Vec<u32> {
        (0..n as u64)
            .map(|i| ((i * 2654435761 + salt * 97 + 17) % (vocab - 100) + 100) as u32)
            .collect()
    };
    println!(
        "SmolLM2-135M f32, full fine-tuning, seq {seq}, {} threads, median of {steps} steps after 1 warm-up",
        candle_core::utils::get_num_threads()
    );
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    if run("sft") {
        for batch in [1usize, 2] {
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
                let f = t.elapsed().as_secs_f64();
                opt.backward_step_with(&loss, |l| model.backward(l))?;
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
        let pair = Pair {
            prompt: ids(1, 0),
            chosen: ids(seq - 1, 1),
            rejected: ids(seq - 1, 2),
        };
        let refs: Vec<(&[u32], &[u32])> =
            vec![(&pair.prompt, &pair.chosen), (&pair.prompt, &pair.rejected)];
        let data = pack(&refs, 0, &dev)?;
        let (mut times, mut refs, mut fwd) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..=steps {
            let t = Instant::now();
            let r = sequence_logps(&reference, &data, false)?
                .detach()
                .to_vec1::<f32>()?;
            let tr = t.elapsed().as_secs_f64();
            let p = sequence_logps(&model, &data, true)?;
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

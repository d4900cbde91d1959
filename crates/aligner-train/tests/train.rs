//! The trainer on tiny random llama models: gradients reach every parameter and agree with
//! finite differences, a copy task is learned, DPO separates a toy preference set, LoRA merges,
//! and an interrupted run resumes to the same weights.

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor};

use aligner_train::data::{pack, pack_pairs, sequence_logps, token_logps, Example, Pair, PairSeqs};
use aligner_train::loss::{dpo_loss, sft_loss, DpoKind, DpoOptions};
use aligner_train::model::{Config, LoraConfig, TrainModel, Trainable, Weights};
use aligner_train::optim::OptimConfig;
use aligner_train::trainer::{self, LoopConfig};

fn tiny_config() -> Config {
    Config {
        architecture: "llama".into(),
        vocab: 24,
        hidden: 32,
        intermediate: 64,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        head_dim: 8,
        rope_theta: 10_000.0,
        rms_eps: 1e-5,
        context: 64,
        tie_embeddings: true,
        qkv_bias: false,
        rope: aligner_train::model::RopeStyle::Halves,
        rope_scaling: None,
        gemma3: None,
    }
}

fn lcg(seed: &mut u64) -> f32 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

fn tiny_weights(c: &Config, seed: u64) -> Weights {
    let mut s = seed;
    let mut w = Weights::new();
    let mut put = |name: String, shape: Vec<usize>, scale: f32, base: f32| {
        let n = shape.iter().product();
        let v = (0..n).map(|_| base + scale * lcg(&mut s)).collect();
        w.insert(name, (shape, v));
    };
    let (h, qd, kvd) = (c.hidden, c.heads * c.head_dim, c.kv_heads * c.head_dim);
    put(
        "model.embed_tokens.weight".into(),
        vec![c.vocab, h],
        0.5,
        0.0,
    );
    for i in 0..c.layers {
        let p = format!("model.layers.{i}");
        put(format!("{p}.input_layernorm.weight"), vec![h], 0.1, 1.0);
        put(
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
            0.1,
            1.0,
        );
        put(
            format!("{p}.self_attn.q_proj.weight"),
            vec![qd, h],
            0.2,
            0.0,
        );
        put(
            format!("{p}.self_attn.k_proj.weight"),
            vec![kvd, h],
            0.2,
            0.0,
        );
        put(
            format!("{p}.self_attn.v_proj.weight"),
            vec![kvd, h],
            0.2,
            0.0,
        );
        put(
            format!("{p}.self_attn.o_proj.weight"),
            vec![h, qd],
            0.2,
            0.0,
        );
        put(
            format!("{p}.mlp.gate_proj.weight"),
            vec![c.intermediate, h],
            0.2,
            0.0,
        );
        put(
            format!("{p}.mlp.up_proj.weight"),
            vec![c.intermediate, h],
            0.2,
            0.0,
        );
        put(
            format!("{p}.mlp.down_proj.weight"),
            vec![h, c.intermediate],
            0.2,
            0.0,
        );
    }
    put("model.norm.weight".into(), vec![h], 0.1, 1.0);
    w
}

/// B starts at zero; gives both models' variables the same shifted values so adapter
/// gradients are not trivial.
fn give_adapters_values(a: &TrainModel, b: &TrainModel) {
    for ((_, x), (_, y)) in a.vars().iter().zip(b.vars().iter()) {
        let t = x.as_tensor().affine(1.0, 0.05).unwrap();
        x.set(&t).unwrap();
        y.set(&t).unwrap();
    }
}

/// Every trainable variable of `a` has a gradient in `ga` within 1e-4 (relative to the largest
/// element, at least 1) of `b`'s in `gb`, and `b`'s are not all zero.
fn assert_same_gradients(
    what: &str,
    (a, ga): (&TrainModel, &GradStore),
    (b, gb): (&TrainModel, &GradStore),
) {
    let max_abs = |t: &Tensor| {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    for ((name, x), (_, y)) in a.vars().iter().zip(b.vars().iter()) {
        let gx = ga
            .get(x.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let gy = gb.get(y.as_tensor()).unwrap();
        let scale = max_abs(gy);
        let diff = max_abs(&(gx - gy).unwrap());
        assert!(
            scale > 0.0 && diff <= 1e-4 * scale.max(1.0),
            "{what} {name}: gradients differ by {diff} (largest {scale})"
        );
    }
}

fn tiny(trainable: &Trainable) -> TrainModel {
    let c = tiny_config();
    TrainModel::from_weights(c.clone(), tiny_weights(&c, 1), trainable, &Device::Cpu).unwrap()
}

fn toy_pairs() -> Vec<Pair> {
    // Prompt [1, x]; chosen repeats x, rejected answers x + 1.
    (0..8u32)
        .map(|i| {
            let x = 4 + i;
            Pair {
                prompt: vec![1, x],
                chosen: vec![x, x, 2],
                rejected: vec![x + 1, 3, 2],
            }
        })
        .collect()
}

#[test]
fn every_trainable_parameter_receives_a_gradient() {
    let m = tiny(&Trainable::Full);
    let seqs: Vec<(&[u32], &[u32])> = vec![(&[1, 5, 6], &[7, 8, 2]), (&[1, 9], &[10, 2])];
    let batch = pack(&seqs, 0, &Device::Cpu).unwrap();
    let loss = sft_loss(&token_logps(&m, &batch, true).unwrap()).unwrap();
    let grads = m.backward(&loss).unwrap();
    let vars = m.vars();
    // embeddings, 2 norms x 2 layers, 7 linears x 2 layers, final norm.
    assert_eq!(vars.len(), 1 + 2 * 2 + 7 * 2 + 1);
    for (name, v) in &vars {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        let n = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(n > 0.0 && n.is_finite(), "{name}: gradient norm² {n}");
    }
}

/// The fused CPU layers (linear, RMSNorm, rotary + grouped-query attention, SwiGLU) give the
/// log-probs and gradients of the same model composed from candle's basic ops, for full
/// fine-tuning, LoRA (frozen base weights) and top-layer training (frozen lower layers).
#[test]
fn fused_layers_match_the_composed_model() {
    let lora = LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
    };
    for trainable in [
        Trainable::Full,
        Trainable::Lora(lora),
        Trainable::TopLayers(1),
    ] {
        let fused = tiny(&trainable);
        let mut plain = tiny(&trainable);
        plain.set_fused(false);
        if let Trainable::Lora(_) = trainable {
            give_adapters_values(&fused, &plain);
        }
        let seqs: Vec<(&[u32], &[u32])> = vec![(&[1, 5, 6], &[7, 8, 9, 2]), (&[1, 11], &[12, 2])];
        let batch = pack(&seqs, 0, &Device::Cpu).unwrap();
        let lf = sequence_logps(&fused, &batch, true).unwrap();
        let lp = sequence_logps(&plain, &batch, true).unwrap();
        let (vf, vp) = (lf.to_vec1::<f32>().unwrap(), lp.to_vec1::<f32>().unwrap());
        for (a, b) in vf.iter().zip(&vp) {
            assert!(
                (a - b).abs() < 1e-4,
                "{trainable:?}: logps {vf:?} vs {vp:?}"
            );
        }
        let w = Tensor::new(&[0.7f32, -1.3], &Device::Cpu).unwrap();
        let gf = fused
            .backward(&(&lf * &w).unwrap().sum_all().unwrap())
            .unwrap();
        let gp = plain
            .backward(&(&lp * &w).unwrap().sum_all().unwrap())
            .unwrap();
        assert!(!fused.vars().is_empty());
        assert_same_gradients(&format!("{trainable:?}"), (&fused, &gf), (&plain, &gp));
    }
}

#[test]
fn padding_changes_nothing_for_the_real_tokens() {
    let m = tiny(&Trainable::None);
    let a: (&[u32], &[u32]) = (&[1, 5, 6], &[7, 8, 9, 2]);
    let b: (&[u32], &[u32]) = (&[1, 11], &[12, 2]);
    let both = pack(&[a, b], 0, &Device::Cpu).unwrap();
    let together = sequence_logps(&m, &both, false)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for (i, s) in [a, b].into_iter().enumerate() {
        let one = pack(&[s], 0, &Device::Cpu).unwrap();
        let alone = sequence_logps(&m, &one, false)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0];
        assert!(
            (alone - together[i]).abs() < 1e-4,
            "{alone} vs {}",
            together[i]
        );
    }
}

/// The DPO loss through the whole model, differentiated by candle, against central
/// differences on the largest-gradient elements of several weights.
#[test]
fn dpo_gradient_matches_finite_differences() {
    let m = tiny(&Trainable::Full);
    let pairs = &toy_pairs()[..3];
    let seqs: Vec<(&[u32], &[u32])> = pairs
        .iter()
        .map(|p| (&p.prompt[..], &p.chosen[..]))
        .chain(pairs.iter().map(|p| (&p.prompt[..], &p.rejected[..])))
        .collect();
    let batch = pack(&seqs, 0, &Device::Cpu).unwrap();
    let (rc, rr) = ([-9.0f32, -8.5, -10.0], [-9.5f32, -8.0, -9.0]);
    for kind in [
        DpoKind::Sigmoid,
        DpoKind::Ipo,
        DpoKind::SigmoidNll { alpha: 1.0 },
    ] {
        let opts = DpoOptions {
            beta: 0.5,
            kind,
            label_smoothing: if kind == DpoKind::Sigmoid { 0.1 } else { 0.0 },
        };
        let loss_of = |m: &TrainModel| -> Tensor {
            let all = sequence_logps(m, &batch, false).unwrap();
            let pc = all.narrow(0, 0, 3).unwrap();
            let pr = all.narrow(0, 3, 3).unwrap();
            let nll = pc.affine(-1.0 / 3.0, 0.0).unwrap();
            dpo_loss(&pc, &pr, &rc, &rr, &opts, Some(&nll)).unwrap().0
        };
        let grads = m.backward(&loss_of(&m)).unwrap();
        let vars = m.vars();
        let mut checked = 0;
        for (name, v) in vars.iter().filter(|(n, _)| {
            n.contains("layers.0.self_attn.q_proj")
                || n.contains("layers.1.mlp.down_proj")
                || n.contains("embed_tokens")
                || n.contains("model.norm")
        }) {
            let g = grads.get(v.as_tensor()).unwrap().flatten_all().unwrap();
            let gv = g.to_vec1::<f32>().unwrap();
            let mut order: Vec<usize> = (0..gv.len()).collect();
            order.sort_by(|&a, &b| gv[b].abs().total_cmp(&gv[a].abs()));
            for &i in order.iter().take(3) {
                let orig = v
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let eps = 1e-2f32;
                let at = |delta: f32| -> f64 {
                    let mut w = orig.clone();
                    w[i] += delta;
                    v.set(&Tensor::from_vec(w, v.as_tensor().dims(), &Device::Cpu).unwrap())
                        .unwrap();
                    loss_of(&m).to_scalar::<f32>().unwrap() as f64
                };
                let fd = (at(eps) - at(-eps)) / (2.0 * eps as f64);
                v.set(&Tensor::from_vec(orig, v.as_tensor().dims(), &Device::Cpu).unwrap())
                    .unwrap();
                let an = gv[i] as f64;
                assert!(
                    (fd - an).abs() <= 2e-2 * an.abs().max(1e-3) + 1e-4,
                    "{kind:?} {name}[{i}]: autograd {an}, finite differences {fd}"
                );
                checked += 1;
            }
        }
        assert_eq!(checked, 12);
    }
}

#[test]
fn a_tiny_model_learns_to_copy() {
    let m = tiny(&Trainable::Full);
    let mut s = 7u64;
    let data: Vec<Example> = (0..32)
        .map(|_| {
            let xs: Vec<u32> = (0..4)
                .map(|_| 4 + ((lcg(&mut s) + 1.0) * 9.99) as u32)
                .collect();
            let mut prompt = vec![1];
            prompt.extend(&xs);
            prompt.push(2);
            let mut completion = xs.clone();
            completion.push(3);
            Example { prompt, completion }
        })
        .collect();
    let cfg = LoopConfig {
        epochs: 60,
        batch_size: 8,
        max_length: 32,
        optim: OptimConfig {
            learning_rate: 1e-2,
            warmup_ratio: 0.05,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut losses = Vec::new();
    trainer::sft(&m, &data, &cfg, &mut |log| {
        losses.push(log.loss);
        Ok(())
    })
    .unwrap();
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(first > 2.0, "initial loss {first}");
    assert!(last < 0.05, "final loss {last} (first {first})");
}

#[test]
fn dpo_separates_a_toy_preference_set() {
    let m = tiny(&Trainable::Full);
    let reference = m.frozen_copy().unwrap();
    let pairs = toy_pairs();
    let cfg = LoopConfig {
        epochs: 15,
        batch_size: 4,
        max_length: 16,
        optim: OptimConfig {
            learning_rate: 5e-3,
            ..Default::default()
        },
        ..Default::default()
    };
    let refs = trainer::reference_logps(&reference, &pairs, &cfg).unwrap();
    let mut logs = Vec::new();
    trainer::dpo(&m, &pairs, &refs, &DpoOptions::default(), &cfg, &mut |l| {
        logs.push(l.clone());
        Ok(())
    })
    .unwrap();
    let first = logs[0].dpo.unwrap();
    let last = logs.last().unwrap().dpo.unwrap();
    assert!(
        (first.loss - std::f64::consts::LN_2).abs() < 1e-3,
        "{first:?}"
    );
    assert!(last.rewards_accuracies > 0.9, "{last:?}");
    assert!(
        last.rewards_margins > 0.0 && last.loss < first.loss,
        "{last:?}"
    );
}

#[test]
fn lora_trains_only_adapters_and_merges_into_the_weights() {
    let lora = LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
    };
    let m = tiny(&Trainable::Lora(lora));
    let vars = m.vars();
    assert_eq!(vars.len(), 2 * 3 * 2, "A and B for 3 targets x 2 layers");
    assert!(vars.iter().all(|(n, _)| n.contains("lora_")));
    let base = tiny(&Trainable::None);
    let data = vec![Example {
        prompt: vec![1, 5],
        completion: vec![6, 7, 2],
    }];
    let cfg = LoopConfig {
        epochs: 5,
        batch_size: 1,
        optim: OptimConfig {
            learning_rate: 1e-2,
            warmup_ratio: 0.0,
            ..Default::default()
        },
        ..Default::default()
    };
    trainer::sft(&m, &data, &cfg, &mut |_| Ok(())).unwrap();
    // The adapters moved the model; the merged weights reproduce it exactly enough.
    let batch = pack(&[(&[1, 5][..], &[6, 7, 2][..])], 0, &Device::Cpu).unwrap();
    let trained = sequence_logps(&m, &batch, false)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0];
    let before = sequence_logps(&base, &batch, false)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0];
    let merged = m.frozen_copy().unwrap();
    let after = sequence_logps(&merged, &batch, false)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0];
    assert!(trained > before + 0.1, "{before} -> {trained}");
    assert!(
        (after - trained).abs() < 1e-3,
        "merged {after} vs adapters {trained}"
    );
}

#[test]
fn an_interrupted_run_resumes_to_the_same_weights() {
    let data: Vec<Example> = (0..12u32)
        .map(|i| Example {
            prompt: vec![1, 4 + i % 8],
            completion: vec![5 + i % 7, 2],
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let cfg = LoopConfig {
        epochs: 2,
        batch_size: 2,
        save_every: 2,
        state_dir: Some(dir.path().join("state")),
        optim: OptimConfig {
            learning_rate: 1e-2,
            accumulation: 2,
            ..Default::default()
        },
        ..Default::default()
    };
    // Uninterrupted.
    let whole = tiny(&Trainable::Full);
    let plain = LoopConfig {
        state_dir: None,
        ..cfg.clone()
    };
    let s = trainer::sft(&whole, &data, &plain, &mut |_| Ok(())).unwrap();
    assert_eq!(s.steps, 6);
    // Stopped at step 5 (state saved at step 4), then run again.
    let m = tiny(&Trainable::Full);
    let err = trainer::sft(&m, &data, &cfg, &mut |l| {
        if l.step == 5 {
            anyhow::bail!("killed")
        }
        Ok(())
    });
    assert!(err.is_err());
    let fresh = tiny(&Trainable::Full);
    let mut seen = Vec::new();
    let s = trainer::sft(&fresh, &data, &cfg, &mut |l| {
        seen.push(l.step);
        Ok(())
    })
    .unwrap();
    assert_eq!(s.resumed_from, 4);
    assert_eq!(seen, vec![5, 6]);
    for ((name, a), (_, b)) in whole.vars().iter().zip(fresh.vars().iter()) {
        let d = (a.as_tensor() - b.as_tensor())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-6, "{name} differs by {d}");
    }
}

/// A pair packed as one row (the prompt once, chosen and rejected as branches that do not see
/// each other) gives the log-probs and gradients of the two sequences packed apart: prompts
/// and answers longer than one attention block, a pair whose truncated prompts differ, and an
/// empty prompt; full fine-tuning and LoRA.
#[test]
fn pairs_sharing_their_prompt_match_separate_sequences() {
    let mut c = tiny_config();
    c.context = 512;
    let seq = |n: usize, salt: u32| -> Vec<u32> {
        (0..n as u32).map(|i| (i * 7 + salt) % 20 + 3).collect()
    };
    let (p1, p2, p3) = (seq(130, 1), seq(3, 2), seq(9, 3));
    let (c1, r1) = (seq(140, 4), seq(5, 5));
    let (c2, r2) = (seq(1, 6), seq(200, 7));
    let (c3, r3) = (seq(12, 8), seq(4, 9));
    let p3b = seq(7, 10);
    // Its row (610 tokens) is longer than the model's 512 positions; each sequence fits.
    let (p5, c5, r5) = (seq(10, 13), seq(300, 14), seq(300, 15));
    let (c4, r4) = (seq(6, 11), seq(8, 12));
    let pairs = [
        PairSeqs {
            chosen: (&p1, &c1),
            rejected: (&p1, &r1),
        },
        PairSeqs {
            chosen: (&p2, &c2),
            rejected: (&p2, &r2),
        },
        PairSeqs {
            chosen: (&p3, &c3),
            rejected: (&p3b, &r3),
        },
        PairSeqs {
            chosen: (&[], &c4),
            rejected: (&[], &r4),
        },
        PairSeqs {
            chosen: (&p5, &c5),
            rejected: (&p5, &r5),
        },
    ];
    let lora = LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: vec!["q_proj".into(), "k_proj".into(), "o_proj".into()],
    };
    for trainable in [Trainable::Full, Trainable::Lora(lora)] {
        let shared =
            TrainModel::from_weights(c.clone(), tiny_weights(&c, 3), &trainable, &Device::Cpu)
                .unwrap();
        let apart =
            TrainModel::from_weights(c.clone(), tiny_weights(&c, 3), &trainable, &Device::Cpu)
                .unwrap();
        assert!(shared.takes_layouts());
        if let Trainable::Lora(_) = trainable {
            give_adapters_values(&shared, &apart);
        }
        let one_row = pack_pairs(&pairs, 0, &Device::Cpu).unwrap();
        let seqs: Vec<(&[u32], &[u32])> = pairs
            .iter()
            .map(|p| p.chosen)
            .chain(pairs.iter().map(|p| p.rejected))
            .collect();
        let two_rows = pack(&seqs, 0, &Device::Cpu).unwrap();
        assert_eq!(one_row.counts, two_rows.counts);
        assert_eq!(one_row.ids.dims2().unwrap(), (5, 610));
        assert_eq!(two_rows.ids.dims2().unwrap().0, 10);
        let ls = sequence_logps(&shared, &one_row, true).unwrap();
        let la = sequence_logps(&apart, &two_rows, true).unwrap();
        let (vs, va) = (ls.to_vec1::<f32>().unwrap(), la.to_vec1::<f32>().unwrap());
        for (a, b) in vs.iter().zip(&va) {
            assert!(
                (a - b).abs() < 2e-3 + 1e-5 * b.abs(),
                "{trainable:?}: logps {vs:?} vs {va:?}"
            );
        }
        let w = Tensor::new(
            &[0.7f32, -1.3, 0.4, 1.1, 0.3, -0.6, 0.9, -0.2, 1.5, -0.8],
            &Device::Cpu,
        )
        .unwrap();
        let gs = shared
            .backward(&(&ls * &w).unwrap().sum_all().unwrap())
            .unwrap();
        let ga = apart
            .backward(&(&la * &w).unwrap().sum_all().unwrap())
            .unwrap();
        assert_same_gradients(&format!("{trainable:?}"), (&shared, &gs), (&apart, &ga));
    }
}

//! Log-probs, DPO losses and gradients on SmolLM2-135M agree with PyTorch (transformers'
//! LlamaForCausalLM, f32) computing the same thing from the same dequantized weights.
//! Fixture: `tests/fixtures/smollm2_dpo_reference.json`, made by
//! `scripts/fixtures/torch_dpo_reference.py`.

use std::path::PathBuf;

use candle_core::Device;
use serde_json::Value;

use aligner_train::data::{pack, sequence_logps};
use aligner_train::loss::{dpo_loss, DpoKind, DpoOptions};
use aligner_train::model::{TrainModel, Trainable};

fn gguf_path() -> PathBuf {
    let dir = std::env::var_os("ALIGNER_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models"));
    let p = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.is_file(),
        "{} is missing: run `aligner models fetch` (or set ALIGNER_MODELS_DIR)",
        p.display()
    );
    p
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn logps_losses_and_gradients_match_pytorch() {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2_dpo_reference.json");
    let fx: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let model = TrainModel::load(&gguf_path(), &Trainable::Full, &Device::Cpu).unwrap();
    let pairs = fx["pairs"].as_array().unwrap();
    let prompts: Vec<Vec<u32>> = pairs.iter().map(|p| ids(&p["prompt_ids"])).collect();
    let chosen: Vec<Vec<u32>> = pairs.iter().map(|p| ids(&p["chosen_ids"])).collect();
    let rejected: Vec<Vec<u32>> = pairs.iter().map(|p| ids(&p["rejected_ids"])).collect();
    let n = pairs.len();
    let seqs: Vec<(&[u32], &[u32])> = (0..n)
        .map(|i| (&prompts[i][..], &chosen[i][..]))
        .chain((0..n).map(|i| (&prompts[i][..], &rejected[i][..])))
        .collect();
    let batch = pack(&seqs, 2, &Device::Cpu).unwrap();
    let all = sequence_logps(&model, &batch, true).unwrap();
    let got = all.to_vec1::<f32>().unwrap();
    let (want_c, want_r) = (floats(&fx["logps_chosen"]), floats(&fx["logps_rejected"]));
    // Summed over 12-16 tokens in f32 with other summation orders: a few 1e-4 apart.
    for i in 0..n {
        assert!(
            (got[i] - want_c[i]).abs() < 2e-3,
            "chosen {i}: {} vs {}",
            got[i],
            want_c[i]
        );
        assert!(
            (got[n + i] - want_r[i]).abs() < 2e-3,
            "rejected {i}: {} vs {}",
            got[n + i],
            want_r[i]
        );
    }
    let (rc, rr) = (
        floats(&fx["ref_logps_chosen"]),
        floats(&fx["ref_logps_rejected"]),
    );
    let beta = fx["beta"].as_f64().unwrap();
    let pc = all.narrow(0, 0, n).unwrap();
    let pr = all.narrow(0, n, n).unwrap();
    let ipo = DpoOptions {
        beta,
        kind: DpoKind::Ipo,
        label_smoothing: 0.0,
    };
    let (l_ipo, _) = dpo_loss(&pc, &pr, &rc, &rr, &ipo, None).unwrap();
    let want_ipo = fx["loss_ipo"].as_f64().unwrap();
    let l_ipo = l_ipo.to_scalar::<f32>().unwrap() as f64;
    assert!(
        (l_ipo - want_ipo).abs() < 1e-3 * want_ipo,
        "ipo {l_ipo} vs {want_ipo}"
    );
    let sigmoid = DpoOptions {
        beta,
        kind: DpoKind::Sigmoid,
        label_smoothing: 0.0,
    };
    let (loss, m) = dpo_loss(&pc, &pr, &rc, &rr, &sigmoid, None).unwrap();
    let want = fx["loss_sigmoid"].as_f64().unwrap();
    assert!((m.loss - want).abs() < 1e-4, "sigmoid {} vs {want}", m.loss);
    let margins = floats(&fx["rewards"]["margins"]);
    let mean_margin = margins.iter().sum::<f32>() as f64 / n as f64;
    assert!((m.rewards_margins - mean_margin).abs() < 1e-4);

    let grads = model.backward(&loss).unwrap();
    let vars = model.vars();
    let var = |name: &str| {
        vars.iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no variable {name}"))
            .1
            .clone()
    };
    let first_chosen = chosen[0][0] as usize;
    let cases = [
        ("model.norm.weight[:16]", "model.norm.weight", None),
        (
            "model.layers.29.mlp.down_proj.weight[0,:16]",
            "model.layers.29.mlp.down_proj.weight",
            Some(0),
        ),
        (
            "model.layers.0.self_attn.q_proj.weight[0,:16]",
            "model.layers.0.self_attn.q_proj.weight",
            Some(0),
        ),
        (
            &*format!("model.embed_tokens.weight[{first_chosen},:16]"),
            "model.embed_tokens.weight",
            Some(first_chosen),
        ),
    ];
    for (key, name, row) in cases {
        let want = floats(&fx["grads"][key]);
        let g = grads.get(var(name).as_tensor()).unwrap();
        let g = match row {
            Some(r) => g.get(r).unwrap(),
            None => g.clone(),
        };
        let got = g.narrow(0, 0, 16).unwrap().to_vec1::<f32>().unwrap();
        let scale = want.iter().fold(0f32, |a, b| a.max(b.abs()));
        for (j, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() <= 2e-3 * scale + 1e-7,
                "{key}[{j}]: {a} vs PyTorch {b}"
            );
        }
    }
    let mut sq = 0f64;
    for (_, v) in &vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            sq += g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64;
        }
    }
    let want_norm = fx["grad_global_norm"].as_f64().unwrap();
    assert!(
        (sq.sqrt() - want_norm).abs() < 1e-3 * want_norm,
        "global gradient norm {} vs PyTorch {want_norm}",
        sq.sqrt()
    );
}

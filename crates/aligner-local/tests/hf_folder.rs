//! A Hugging Face folder loads and runs the same model as the GGUF it came from: the test
//! writes SmolLM2's GGUF weights back into the Hugging Face layout (dequantized, Q/K rows
//! un-permuted for half-split rotary embeddings, `model.layers.N.*` names, tied embeddings),
//! in f32 and in bf16, and checks logits and greedy tokens against the GGUF path.

use std::collections::HashMap;
use std::path::PathBuf;

use aligner_local::gguf::GgufFile;
use aligner_local::model::{Chunk, KvCache, Model};
use candle_core::{DType, Device, Tensor};

fn gguf_path() -> PathBuf {
    let dir = std::env::var_os("ALIGNER_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models"));
    let p = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.is_file(),
        "{} is missing: run `aligner models fetch`",
        p.display()
    );
    p
}

/// llama.cpp's converter interleaves each head's two rotary halves; undo it.
fn unpermute(w: &Tensor, heads: usize) -> Tensor {
    let (rows, cols) = w.dims2().unwrap();
    let hd = rows / heads;
    w.reshape((heads, hd / 2, 2, cols))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((rows, cols))
        .unwrap()
}

fn write_hf_folder(file: &GgufFile, dir: &std::path::Path, dtype: DType) {
    let heads = file.usize("llama.attention.head_count").unwrap();
    let kv_heads = file.usize("llama.attention.head_count_kv").unwrap();
    let layers = file.usize("llama.block_count").unwrap();
    let t = |n: &str| {
        file.qtensor(n, &Device::Cpu)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap()
    };
    let mut out: HashMap<String, Tensor> = HashMap::new();
    out.insert("model.embed_tokens.weight".into(), t("token_embd.weight"));
    out.insert("model.norm.weight".into(), t("output_norm.weight"));
    for i in 0..layers {
        let g = |n: &str| t(&format!("blk.{i}.{n}"));
        let h = |n: &str| format!("model.layers.{i}.{n}");
        out.insert(
            h("self_attn.q_proj.weight"),
            unpermute(&g("attn_q.weight"), heads),
        );
        out.insert(
            h("self_attn.k_proj.weight"),
            unpermute(&g("attn_k.weight"), kv_heads),
        );
        out.insert(h("self_attn.v_proj.weight"), g("attn_v.weight"));
        out.insert(h("self_attn.o_proj.weight"), g("attn_output.weight"));
        out.insert(h("mlp.gate_proj.weight"), g("ffn_gate.weight"));
        out.insert(h("mlp.up_proj.weight"), g("ffn_up.weight"));
        out.insert(h("mlp.down_proj.weight"), g("ffn_down.weight"));
        out.insert(h("input_layernorm.weight"), g("attn_norm.weight"));
        out.insert(h("post_attention_layernorm.weight"), g("ffn_norm.weight"));
    }
    let out: HashMap<String, Tensor> = out
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(dtype).unwrap()))
        .collect();
    candle_core::safetensors::save(&out, dir.join("model.safetensors")).unwrap();
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": file.usize("llama.embedding_length").unwrap(),
        "intermediate_size": file.usize("llama.feed_forward_length").unwrap(),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": file.f32("llama.attention.layer_norm_rms_epsilon").unwrap(),
        "rope_theta": file.f32("llama.rope.freq_base").unwrap(),
        "max_position_embeddings": 8192,
        "vocab_size": 49152,
        "tie_word_embeddings": true,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
}

fn last_logits(model: &Model, ids: &[u32]) -> Vec<f32> {
    let mut cache = KvCache::new(model.config.layers);
    model
        .forward(&mut [Chunk {
            cache: &mut cache,
            tokens: ids,
            logits: true,
        }])
        .remove(0)
}

#[test]
fn hf_folder_in_f32_and_bf16_matches_the_gguf_it_came_from() {
    let file = GgufFile::open(&gguf_path()).unwrap();
    // Prompt: a ChatML question (ids from the golden fixture's tokenizer).
    let ids: Vec<u32> = vec![
        1, 4093, 198, 6106, 1296, 5574, 338, 359, 2382, 30, 2, 198, 1, 520, 9531, 198,
    ];
    std::env::set_var("ALIGNER_DEQUANTIZE", "1");
    let reference = Model::from_gguf(&file).unwrap();
    std::env::remove_var("ALIGNER_DEQUANTIZE");
    let want = last_logits(&reference, &ids);
    drop(reference);
    // f32: the same weights, rotated by halves instead of interleaved pairs (the same
    // arithmetic in another order); bf16: weights rounded to 8 mantissa bits.
    for (dtype, name, tol) in [(DType::F32, "f32", 0.02f32), (DType::BF16, "bf16", 0.6)] {
        let dir = tempfile::tempdir().unwrap();
        write_hf_folder(&file, dir.path(), dtype);
        let model = Model::from_hf_folder(dir.path(), "auto").unwrap();
        let got = last_logits(&model, &ids);
        let max_diff = want
            .iter()
            .zip(&got)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(max_diff < tol, "{name}: logits differ by {max_diff}");
        assert_eq!(
            aligner_local::sampling::argmax(&want),
            aligner_local::sampling::argmax(&got),
            "{name}"
        );
    }
}

#[test]
fn hf_folder_errors_name_the_missing_piece() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"architectures": ["GPTNeoXForCausalLM"]}"#,
    )
    .unwrap();
    let err = Model::from_hf_folder(dir.path(), "auto")
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("GPTNeoXForCausalLM") && err.contains("LlamaForCausalLM"),
        "{err}"
    );
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 10}"#,
    )
    .unwrap();
    let err = Model::from_hf_folder(dir.path(), "auto")
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("safetensors"), "{err}");
}

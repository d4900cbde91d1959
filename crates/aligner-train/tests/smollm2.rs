//! The trainable model on the real SmolLM2-135M-Instruct GGUF: a checkpoint written from it
//! loads back through `aligner-local` (Hugging Face path) with the same logits and tokenizer.

use std::path::PathBuf;

use candle_core::{Device, Tensor};

use aligner_local::gguf::GgufFile;
use aligner_local::model::{Chunk, KvCache, Model};
use aligner_local::tokenizer::TextTokenizer;
use aligner_train::checkpoint::{read_meta, save_hf, CheckpointMeta};
use aligner_train::model::{gguf_weights, TrainModel, Trainable};

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

/// Logits of the trainer's forward pass equal the inference engine's on the checkpoint it
/// wrote (f32 weights there, so no activation quantization). The inference path keeps q and
/// the KV cache in f16, which moves logits by a few thousandths; 0.02 is well below any real
/// error (a wrong rotary layout or tensor name moves them by whole units).
#[test]
fn checkpoint_round_trips_through_the_inference_engine() {
    let path = gguf_path();
    let (mut config, weights) = gguf_weights(&path).unwrap();
    // The first four of the thirty layers keep the test fast and still cover every tensor
    // kind and the q/k un-permutation.
    config.layers = 4;
    let model = TrainModel::from_weights(config, weights, &Trainable::None, &Device::Cpu).unwrap();
    let file = GgufFile::open(&path).unwrap();
    let tok = TextTokenizer::from_gguf(&file.content).unwrap();
    let ids = tok
        .encode(
            "<|im_start|>user\nName three prime numbers.<|im_end|>\n<|im_start|>assistant\n",
            true,
        )
        .unwrap();
    let t = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let ours = model.logits(&t, None).unwrap();
    let last: Vec<f32> = ours
        .squeeze(0)
        .unwrap()
        .get(ids.len() - 1)
        .unwrap()
        .to_vec1()
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("ckpt");
    let meta = CheckpointMeta {
        method: "sft".into(),
        aligner_template: Some("aligner-v1".into()),
        base_model: path.display().to_string(),
        optimizer_steps: 0,
        extra: serde_json::Value::Null,
    };
    save_hf(&model, &tok, &meta, &ckpt).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "aligner.json",
    ] {
        assert!(ckpt.join(f).is_file(), "{f} missing");
    }
    assert_eq!(read_meta(&ckpt).unwrap().unwrap(), meta);

    let back = Model::from_hf_folder(&ckpt, "f32").unwrap();
    let mut cache = KvCache::new(back.config.layers);
    let theirs = back
        .forward(&mut [Chunk {
            cache: &mut cache,
            tokens: &ids,
            logits: true,
        }])
        .remove(0);
    let diff = last
        .iter()
        .zip(&theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(diff < 0.02, "logits differ by {diff}");
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0
    };
    assert_eq!(argmax(&last), argmax(&theirs));

    // Quantized to Q8_0 at load (how a checkpoint answers the next round), the same argmax
    // and logits within quantization noise.
    let q8 = Model::from_hf_folder(&ckpt, "q8_0").unwrap();
    let mut cache = KvCache::new(q8.config.layers);
    let quantized = q8
        .forward(&mut [Chunk {
            cache: &mut cache,
            tokens: &ids,
            logits: true,
        }])
        .remove(0);
    let qdiff = last
        .iter()
        .zip(&quantized)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let range = last.iter().cloned().fold(f32::MIN, f32::max)
        - last.iter().cloned().fold(f32::MAX, f32::min);
    assert!(
        qdiff < 0.05 * range,
        "q8_0 logits differ by {qdiff} (range {range})"
    );
    assert_eq!(argmax(&last), argmax(&quantized));

    // The tokenizer and chat template travel with the checkpoint.
    let tok2 = TextTokenizer::from_hf_folder(&ckpt).unwrap();
    for s in [
        "Hello, world! 12345",
        "  code:\n\tfn main() {}",
        "naïve café 東京",
    ] {
        assert_eq!(
            tok.encode(s, false).unwrap(),
            tok2.encode(s, false).unwrap(),
            "{s:?}"
        );
    }
    assert_eq!(tok.chat_template(), tok2.chat_template());
    assert_eq!(tok.eos_ids(), tok2.eos_ids());
}

/// `aligner export-gguf`: the weights written back as GGUF with the source's metadata load in
/// the inference engine with the tokenizer intact. Written as f32, the model is the source's
/// (same next token; logits within the noise of the source's Q4_1 kernel, which quantizes
/// activations to 8 bits: 0.66 of a 31.6 range here); as Q8_0 its logits stay within
/// quantization noise too. (This prompt's top two tokens are 0.02 apart in the source, so
/// Q8_0 may swap them: the check is that each model's choice is in the other's top three.)
#[test]
fn a_re_quantized_gguf_loads_and_answers_like_the_source() {
    use aligner_train::gguf_export::{export_gguf, parse_type};
    let path = gguf_path();
    let (config, weights) = gguf_weights(&path).unwrap();
    let source = GgufFile::open(&path).unwrap();
    let tok = TextTokenizer::from_gguf(&source.content).unwrap();
    let prompt = "<|im_start|>user\nName three prime numbers.<|im_end|>\n<|im_start|>assistant\n";
    let ids = tok.encode(prompt, true).unwrap();
    let run = |file: &GgufFile| {
        let m = Model::from_gguf(file).unwrap();
        let mut cache = KvCache::new(m.config.layers);
        m.forward(&mut [Chunk {
            cache: &mut cache,
            tokens: &ids,
            logits: true,
        }])
        .remove(0)
    };
    let top = |v: &[f32], k: usize| {
        let mut i: Vec<usize> = (0..v.len()).collect();
        i.sort_by(|x, y| v[*y].total_cmp(&v[*x]));
        i.truncate(k);
        i
    };
    let a = run(&source);
    let range =
        a.iter().cloned().fold(f32::MIN, f32::max) - a.iter().cloned().fold(f32::MAX, f32::min);
    let dir = tempfile::tempdir().unwrap();
    for ty in ["f32", "q8_0"] {
        let out = dir.path().join(format!("model.{ty}.gguf"));
        let info = export_gguf(&config, &weights, &path, &out, parse_type(ty).unwrap()).unwrap();
        assert_eq!(info.tensors, 2 + 9 * config.layers);
        assert!(!dir.path().join(format!("model.{ty}.gguf.partial")).exists());
        let exported = GgufFile::open(&out).unwrap();
        let (dtype, dims, _) = exported.raw("blk.0.attn_q.weight").unwrap();
        assert_eq!(dims, vec![config.hidden, config.hidden]);
        assert_eq!(dtype, parse_type(ty).unwrap());
        let tok2 = TextTokenizer::from_gguf(&exported.content).unwrap();
        assert_eq!(ids, tok2.encode(prompt, true).unwrap());
        let b = run(&exported);
        let diff = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        if ty == "f32" {
            assert_eq!(top(&a, 1), top(&b, 1));
            assert!(
                diff < 0.05 * range,
                "{ty}: logits differ by {diff} (range {range})"
            );
        } else {
            assert_eq!(exported.usize("general.file_type").unwrap(), 7);
            assert!(top(&a, 3).contains(&top(&b, 1)[0]) && top(&b, 3).contains(&top(&a, 1)[0]));
            assert!(
                diff < 0.05 * range,
                "{ty}: logits differ by {diff} (range {range})"
            );
            // The weights read back (q/k un-permuted) within Q8_0's rounding of the originals.
            let (_, back) = gguf_weights(&out).unwrap();
            for name in [
                "model.layers.0.self_attn.q_proj.weight",
                "model.layers.29.self_attn.k_proj.weight",
                "model.embed_tokens.weight",
            ] {
                let (x, y) = (&weights[name].1, &back[name].1);
                let err: f32 = x
                    .iter()
                    .zip(y)
                    .map(|(p, q)| (p - q) * (p - q))
                    .sum::<f32>()
                    .sqrt();
                let norm: f32 = x.iter().map(|p| p * p).sum::<f32>().sqrt();
                assert!(err / norm < 0.01, "{name}: relative error {}", err / norm);
            }
        }
    }
}

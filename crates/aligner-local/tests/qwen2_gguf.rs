//! The CPU path on a real Qwen2.5 GGUF (Qwen2.5-Coder-0.5B-Instruct, Q4_K_M: Q5_0, Q8_0, Q6_K
//! and Q4_K tensors, QKV biases): weights kept quantized, logits against candle's own Qwen2
//! implementation on the same file, a greedy answer, and the tokenizer and greedy tokens
//! against llama.cpp's on the same file.

mod golden;

use std::path::PathBuf;
use std::sync::Arc;

use aligner_local::engine::{Engine, EngineOptions, GenParams};
use aligner_local::model::{Chunk, KvCache, Model};
use aligner_local::sampling::{argmax, SamplingParams};
use aligner_local::tokenizer::TextTokenizer;

fn load() -> (PathBuf, Model, TextTokenizer) {
    golden::load(
        aligner_local::fetch::QWEN25_CODER_GGUF,
        "qwen2.5-coder-0.5b",
    )
}

const PROMPT: &str = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is the capital of France? Answer in one sentence.<|im_end|>\n<|im_start|>assistant\n";

#[test]
fn qwen2_runs_quantized_and_agrees_with_candles_qwen2() {
    let (path, model, tok) = load();
    assert_eq!(model.config.architecture, "qwen2");
    // Weights stay quantized: within a quarter of the file's size (it was 2.4 GB in f32).
    let (held, file_bytes) = golden::weights_within_a_quarter_of_the_file(&model, &path);

    let ids = tok.encode(PROMPT, true).unwrap();
    let mut cache = KvCache::new(model.config.layers);
    let ours = model.forward(&mut [Chunk {
        cache: &mut cache,
        tokens: &ids,
        logits: true,
    }]);
    let ours = &ours[0];

    // candle-transformers' quantized Qwen2 on the same file: an independent implementation
    // (its own GGML kernels, rotary embedding and attention).
    let mut reader = std::fs::File::open(&path).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut reader).unwrap();
    let dev = candle_core::Device::Cpu;
    let mut reference = candle_transformers::models::quantized_qwen2::ModelWeights::from_gguf(
        content,
        &mut reader,
        &dev,
    )
    .unwrap();
    let input = candle_core::Tensor::new(ids.as_slice(), &dev)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let theirs: Vec<f32> = reference
        .forward(&input, 0)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(ours.len(), theirs.len());
    let max_diff = ours
        .iter()
        .zip(&theirs)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    let range = ours.iter().cloned().fold(f32::MIN, f32::max)
        - ours.iter().cloned().fold(f32::MAX, f32::min);
    // Both quantize activations to 8 bits before each product (candle per 256 values for the
    // K-quants, we per 32), so logits differ by a few percent of their range; a wrong kernel,
    // bias or rotary layout is off by the whole range.
    eprintln!(
        "weights {held} bytes (file {file_bytes}); logits max difference {max_diff} of range {range}"
    );
    assert!(
        max_diff < 0.05 * range,
        "logits differ by {max_diff} (range {range})"
    );
    assert_eq!(argmax(ours), argmax(&theirs));

    let engine = Engine::start(Arc::new(model), Arc::new(tok), EngineOptions::default());
    let out = engine
        .generate_blocking(
            ids,
            GenParams {
                max_tokens: 16,
                stop: Vec::new(),
                ignore_eos: false,
                sampling: SamplingParams::default(),
            },
        )
        .unwrap();
    eprintln!("greedy answer: {:?}", out.text);
    assert!(out.text.contains("Paris"), "{:?}", out.text);
}

#[test]
fn qwen2_tokens_and_greedy_path_match_llama_cpp() {
    let (_, model, tok) = load();
    golden::agrees_with_llama_cpp(&model, &tok, "qwen25", 0.15);
}

//! The CPU path on a real Gemma 3 GGUF (Gemma 3 270M, base, Q4_K_M: Q8_0, Q5_0, Q4_K and Q6_K
//! tensors; query/key and post-block norms, GELU, sliding-window local layers, a SentencePiece
//! vocabulary): weights kept quantized, the tokenizer and greedy tokens against llama.cpp's on
//! the same file.

mod golden;

use std::path::PathBuf;
use std::sync::Arc;

use aligner_local::engine::{Engine, EngineOptions, GenParams};
use aligner_local::gguf::GgufFile;
use aligner_local::model::Model;
use aligner_local::sampling::SamplingParams;
use aligner_local::tokenizer::TextTokenizer;

fn gguf_path() -> PathBuf {
    let dir = std::env::var_os("ALIGNER_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models"));
    let p = dir.join(aligner_local::fetch::GEMMA3_GGUF);
    assert!(
        p.is_file(),
        "{} is missing: run `aligner models fetch gemma3-270m` (or set ALIGNER_MODELS_DIR)",
        p.display()
    );
    p
}

const PROMPT: &str = "The capital of France is";

#[test]
fn gemma3_runs_quantized_and_continues_as_llama_cpp() {
    let path = gguf_path();
    let file = GgufFile::open(&path).unwrap();
    let model = Model::from_gguf(&file).unwrap();
    let tok = TextTokenizer::from_gguf(&file.content).unwrap();
    assert_eq!(model.config.architecture, "gemma3");
    let file_bytes = std::fs::metadata(&path).unwrap().len() as f64;
    let held = model.weight_bytes() as f64;
    assert!(
        held <= 1.25 * file_bytes,
        "weights hold {held} bytes for a {file_bytes}-byte file"
    );

    let ids = tok.encode(PROMPT, true).unwrap();
    // BOS, then SentencePiece pieces with `▁` for spaces and no space added in front.
    assert_eq!(ids[0], 2, "{ids:?}");
    assert_eq!(tok.decode(&ids[1..], true).unwrap(), PROMPT);
    // (candle-transformers' quantized Gemma 3 is no reference here: its feed-forward block
    // uses SiLU where Gemma 3 uses GELU. llama.cpp's greedy path is, below.)
    eprintln!("tokens {ids:?}; weights {held} bytes (file {file_bytes})");
    let engine = Engine::start(Arc::new(model), Arc::new(tok), EngineOptions::default());
    let out = engine
        .generate_blocking(
            ids,
            GenParams {
                max_tokens: 8,
                stop: Vec::new(),
                ignore_eos: true,
                sampling: SamplingParams::default(),
            },
        )
        .unwrap();
    eprintln!("greedy continuation: {:?}", out.text);
    // llama.cpp's (llama-completion --temp 0) on the same file.
    assert_eq!(out.text, " the capital of the country of France.");
}

#[test]
fn gemma3_tokens_and_greedy_path_match_llama_cpp() {
    let file = GgufFile::open(&gguf_path()).unwrap();
    let model = Model::from_gguf(&file).unwrap();
    let tok = TextTokenizer::from_gguf(&file.content).unwrap();
    golden::tokens_match(&tok, "gemma3");
    let (steps, argmax, worst) = golden::greedy_path_agrees(&model, &tok, "gemma3", 0.35);
    eprintln!("gemma3: llama.cpp's greedy token is our argmax at {argmax} of {steps} steps; largest gap {worst}");
    assert!(argmax * 10 >= steps * 9, "{argmax} of {steps}");
}

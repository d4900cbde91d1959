//! The CPU path on a real Gemma 3 GGUF (Gemma 3 270M, base, Q4_K_M: Q8_0, Q5_0, Q4_K and Q6_K
//! tensors; query/key and post-block norms, GELU, sliding-window local layers, a SentencePiece
//! vocabulary): weights kept quantized, the tokenizer and greedy tokens against llama.cpp's on
//! the same file.

mod golden;

use std::path::PathBuf;
use std::sync::Arc;

use aligner_local::engine::{Engine, EngineOptions, GenParams};
use aligner_local::model::Model;
use aligner_local::sampling::SamplingParams;
use aligner_local::tokenizer::TextTokenizer;

fn load() -> (PathBuf, Model, TextTokenizer) {
    golden::load(aligner_local::fetch::GEMMA3_GGUF, "gemma3-270m")
}

const PROMPT: &str = "The capital of France is";

#[test]
fn gemma3_runs_quantized_and_continues_as_llama_cpp() {
    let (path, model, tok) = load();
    assert_eq!(model.config.architecture, "gemma3");
    let (held, file_bytes) = golden::weights_within_a_quarter_of_the_file(&model, &path);

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
    let (_, model, tok) = load();
    golden::agrees_with_llama_cpp(&model, &tok, "gemma3", 0.35);
}

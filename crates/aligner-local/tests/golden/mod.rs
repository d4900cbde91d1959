//! What the real-GGUF tests share: loading a fetched model, the weight-size bound, and the
//! checks against llama.cpp's golden fixtures (`scripts/fixtures/llamacpp_cli_golden.py`):
//! tokenizer ids of fixed strings, and greedy tokens teacher-forced along llama.cpp's path.

use std::path::PathBuf;

use aligner_local::gguf::GgufFile;
use aligner_local::model::{Chunk, KvCache, Model};
use aligner_local::tokenizer::TextTokenizer;

/// `file` in the models folder (`$ALIGNER_MODELS_DIR`, else the repository's `models/`), with
/// its model and tokenizer; a missing file names the fetch command (`aligner models fetch
/// fetch_name`).
pub fn load(file: &str, fetch_name: &str) -> (PathBuf, Model, TextTokenizer) {
    let dir = std::env::var_os("ALIGNER_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models"));
    let path = dir.join(file);
    assert!(
        path.is_file(),
        "{} is missing: run `aligner models fetch {fetch_name}` (or set ALIGNER_MODELS_DIR)",
        path.display()
    );
    let gguf = GgufFile::open(&path).unwrap();
    let model = Model::from_gguf(&gguf).unwrap();
    let tok = TextTokenizer::from_gguf(&gguf.content).unwrap();
    (path, model, tok)
}

/// Weights stay quantized: they hold at most 1.25 times the file's bytes. Returns (held, file).
pub fn weights_within_a_quarter_of_the_file(model: &Model, path: &std::path::Path) -> (f64, f64) {
    let file_bytes = std::fs::metadata(path).unwrap().len() as f64;
    let held = model.weight_bytes() as f64;
    assert!(
        held <= 1.25 * file_bytes,
        "weights hold {held} bytes for a {file_bytes}-byte file"
    );
    (held, file_bytes)
}

/// [`tokens_match`], then [`greedy_path_agrees`] with llama.cpp's token our argmax at nine
/// steps in ten at least.
pub fn agrees_with_llama_cpp(model: &Model, tok: &TextTokenizer, name: &str, tolerance: f32) {
    tokens_match(tok, name);
    let (steps, argmax, worst) = greedy_path_agrees(model, tok, name, tolerance);
    eprintln!(
        "{name}: llama.cpp's greedy token is our argmax at {argmax} of {steps} steps; largest gap {worst}"
    );
    assert!(argmax * 10 >= steps * 9, "{argmax} of {steps}");
}

fn fixture(name: &str) -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// Every string of `NAME_tokens.json` tokenizes to llama.cpp's ids.
pub fn tokens_match(tok: &TextTokenizer, name: &str) {
    let doc = fixture(&format!("{name}_tokens.json"));
    let cases = doc["cases"].as_array().unwrap();
    assert!(cases.len() >= 40);
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let special = c["parse_special"].as_bool().unwrap();
        let want: Vec<u32> = serde_json::from_value(c["ids"].clone()).unwrap();
        assert_eq!(
            tok.encode(text, special).unwrap(),
            want,
            "{name}: {text:?} (special tokens parsed: {special})"
        );
    }
}

/// Along llama.cpp's greedy path for each prompt of `NAME_greedy.json`, its token is our
/// argmax or at most `tolerance` logits below it. Returns (steps, steps where it is our argmax,
/// the largest gap).
pub fn greedy_path_agrees(
    model: &Model,
    tok: &TextTokenizer,
    name: &str,
    tolerance: f32,
) -> (usize, usize, f32) {
    let doc = fixture(&format!("{name}_greedy.json"));
    let prompts = doc["prompts"].as_array().unwrap();
    assert!(prompts.len() >= 4);
    let (mut steps, mut argmax, mut worst) = (0, 0, 0f32);
    for p in prompts {
        let prompt = p["prompt"].as_str().unwrap();
        // The prompt's end names it in messages (one is ~1,400 tokens long).
        let label: String = {
            let tail: Vec<char> = prompt.chars().rev().take(60).collect();
            tail.into_iter().rev().collect()
        };
        let ids: Vec<u32> = serde_json::from_value(p["prompt_ids"].clone()).unwrap();
        assert_eq!(
            tok.encode(prompt, true).unwrap(),
            ids,
            "{name}: prompt ids of {prompt:?}"
        );
        let path: Vec<u32> = serde_json::from_value(p["greedy_ids"].clone()).unwrap();
        let mut cache = KvCache::new(model.config.layers);
        let mut logits = model
            .forward(&mut [Chunk {
                cache: &mut cache,
                tokens: &ids,
                logits: true,
            }])
            .remove(0);
        for (i, &t) in path.iter().enumerate() {
            let best = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let gap = best - logits[t as usize];
            assert!(
                gap <= tolerance,
                "{name}: ...{label:?} step {i}: llama.cpp's token {t} is {gap} logits below our best"
            );
            steps += 1;
            argmax += usize::from(gap == 0.0);
            worst = worst.max(gap);
            logits = model
                .forward(&mut [Chunk {
                    cache: &mut cache,
                    tokens: &[t],
                    logits: true,
                }])
                .remove(0);
        }
    }
    (steps, argmax, worst)
}

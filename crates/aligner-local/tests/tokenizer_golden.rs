//! The GGUF tokenizer against llama.cpp's own token ids (fixtures made by
//! `scripts/fixtures/llamacpp_golden.py`), the chat template against the prompts llama.cpp was
//! given, and the Hugging Face folder loader on MiniLM's tokenizer.json.

use std::path::PathBuf;

use aligner_backend::Message;
use aligner_local::chat::ChatTemplate;
use aligner_local::tokenizer::{StreamDecoder, TextTokenizer};
use candle_core::quantized::gguf_file;
use serde_json::Value;

const GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const MINILM: &str = "all-MiniLM-L6-v2";

fn models_dir() -> PathBuf {
    match std::env::var_os("ALIGNER_MODELS_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models"),
    }
}

fn model_path(name: &str) -> PathBuf {
    let p = models_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: run `aligner models fetch` (or set ALIGNER_MODELS_DIR)",
        p.display()
    );
    p
}

fn smollm2() -> TextTokenizer {
    let path = model_path(GGUF);
    let mut f = std::fs::File::open(&path).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    TextTokenizer::from_gguf(&content).unwrap()
}

fn fixture(name: &str) -> Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn gguf_tokenizer_matches_llama_cpp_ids() {
    let tok = smollm2();
    let doc = fixture("smollm2_tokens.json");
    assert_eq!(doc["add_bos"].as_bool().unwrap(), tok.add_bos());
    let cases = doc["cases"].as_array().unwrap();
    assert!(cases.len() >= 40, "only {} golden strings", cases.len());
    let mut failures = Vec::new();
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let special = case["parse_special"].as_bool().unwrap();
        let want = ids(&case["ids"]);
        let got = tok.encode(text, special).unwrap();
        if got != want {
            failures.push(format!(
                "{text:?} (parse_special={special}): llama.cpp {want:?}, ours {got:?}"
            ));
            continue;
        }
        let back = tok.decode(&got, false).unwrap();
        if back != text {
            failures.push(format!("{text:?} decodes back to {back:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} golden strings differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// llama.cpp's other pre-tokenizers, checked on SmolLM2's vocabulary with `tokenizer.ggml.pre`
/// replaced (llama.cpp was given a tensor-less copy of the GGUF with the same change).
#[test]
fn gguf_pre_tokenizer_variants_match_llama_cpp_ids() {
    let path = model_path(GGUF);
    let mut f = std::fs::File::open(&path).unwrap();
    let mut content = gguf_file::Content::read(&mut f).unwrap();
    let cases = fixture("smollm2_tokens.json")["cases"].clone();
    let cases = cases.as_array().unwrap();
    let doc = fixture("pre_tokenizers.json");
    let variants = doc["variants"].as_object().unwrap();
    assert!(variants.len() >= 4);
    let mut failures = Vec::new();
    for (pre, all_ids) in variants {
        content.metadata.insert(
            "tokenizer.ggml.pre".into(),
            gguf_file::Value::String(pre.clone()),
        );
        let tok = TextTokenizer::from_gguf(&content).unwrap();
        let all_ids = all_ids.as_array().unwrap();
        assert_eq!(all_ids.len(), cases.len());
        for (case, want) in cases.iter().zip(all_ids) {
            let text = case["text"].as_str().unwrap();
            let special = case["parse_special"].as_bool().unwrap();
            let want = ids(want);
            let got = tok.encode(text, special).unwrap();
            if got != want {
                failures.push(format!(
                    "pre={pre} {text:?}: llama.cpp {want:?}, ours {got:?}"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn gguf_unsupported_tokenizers_are_refused() {
    let path = model_path(GGUF);
    let mut f = std::fs::File::open(&path).unwrap();
    let mut content = gguf_file::Content::read(&mut f).unwrap();
    content.metadata.insert(
        "tokenizer.ggml.pre".into(),
        gguf_file::Value::String("deepseek-coder".into()),
    );
    let err = TextTokenizer::from_gguf(&content).unwrap_err().to_string();
    assert!(
        err.contains("deepseek-coder") && err.contains("smollm"),
        "{err}"
    );
    content.metadata.insert(
        "tokenizer.ggml.model".into(),
        gguf_file::Value::String("bert".into()),
    );
    let err = TextTokenizer::from_gguf(&content).unwrap_err().to_string();
    assert!(
        err.contains("\"bert\"") && err.contains("tokenizer.json"),
        "{err}"
    );
    // A SentencePiece vocabulary needs its scores.
    content.metadata.insert(
        "tokenizer.ggml.model".into(),
        gguf_file::Value::String("llama".into()),
    );
    let err = TextTokenizer::from_gguf(&content).unwrap_err().to_string();
    assert!(err.contains("tokenizer.ggml.scores"), "{err}");
}

#[test]
fn gguf_special_tokens_and_metadata() {
    let tok = smollm2();
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
    assert_eq!(tok.bos_token(), Some("<|im_start|>"));
    assert_eq!(tok.eos_token(), Some("<|im_end|>"));
    assert!(tok.eos_ids().contains(&2) && tok.eos_ids().contains(&0));
    assert!(tok.chat_template().unwrap().contains("<|im_start|>"));
    // Special-token strings in user text stay text unless asked for.
    assert_eq!(tok.encode("<|im_end|>", true).unwrap(), vec![2]);
    assert!(tok.encode("<|im_end|>", false).unwrap().len() > 1);
    // Special tokens are dropped from decoded text on request.
    let ids = tok.encode("<|im_start|>user\nhi<|im_end|>", true).unwrap();
    assert_eq!(tok.decode(&ids, true).unwrap(), "user\nhi");
}

#[test]
fn chat_template_renders_the_prompts_llama_cpp_was_given() {
    let tok = smollm2();
    let template = ChatTemplate::new(
        tok.chat_template().unwrap(),
        tok.bos_token().map(str::to_string),
        tok.eos_token().map(str::to_string),
    )
    .unwrap();
    let doc = fixture("smollm2_greedy.json");
    let prompts = doc["prompts"].as_array().unwrap();
    assert_eq!(prompts.len(), 5);
    for p in prompts {
        let user = p["user"].as_str().unwrap();
        let rendered = template
            .render(&[Message::new("user", user)], true)
            .unwrap();
        assert_eq!(rendered, p["prompt"].as_str().unwrap());
        assert_eq!(tok.encode(&rendered, true).unwrap(), ids(&p["prompt_ids"]));
        assert_eq!(
            rendered,
            format!(
                "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
            )
        );
    }
    let with_system = template
        .render(
            &[
                Message::new("system", "You are terse."),
                Message::new("user", "Hi"),
            ],
            true,
        )
        .unwrap();
    assert_eq!(
        with_system,
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn stream_decoder_pieces_concatenate_to_decode() {
    let tok = smollm2();
    let doc = fixture("smollm2_tokens.json");
    let mut texts: Vec<Vec<u32>> = doc["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| ids(&c["ids"]))
        .collect();
    for p in fixture("smollm2_greedy.json")["prompts"]
        .as_array()
        .unwrap()
    {
        texts.push(ids(&p["greedy_ids"]));
    }
    // A byte-level emoji split across tokens, and a lone continuation byte at the end.
    let mut partial = tok.encode("a\u{1F600}b", false).unwrap();
    texts.push(partial.clone());
    partial.pop();
    partial.pop();
    texts.push(partial);
    for skip_special in [true, false] {
        for ids in &texts {
            let mut dec = StreamDecoder::with_skip_special(&tok, skip_special);
            let mut out = String::new();
            for &id in ids {
                if let Some(piece) = dec.push(id).unwrap() {
                    assert!(!piece.contains('\u{FFFD}') || ids.is_empty(), "{piece:?}");
                    out.push_str(&piece);
                }
            }
            if let Some(rest) = dec.finish().unwrap() {
                out.push_str(&rest);
            }
            assert_eq!(out, tok.decode(ids, skip_special).unwrap(), "ids {ids:?}");
        }
    }
}

#[test]
fn hf_folder_tokenizer_loads_encodes_and_decodes() {
    let dir = model_path(MINILM);
    let tok = TextTokenizer::from_hf_folder(&dir).unwrap();
    assert!(tok.vocab_size() > 30_000);
    assert!(!tok.add_bos());
    let ids = tok.encode("Hello, World! Tokenizers work.", false).unwrap();
    assert!(!ids.is_empty());
    assert_eq!(tok.token_to_id("[CLS]"), Some(101));
    assert_eq!(
        tok.decode(&ids, true).unwrap(),
        "hello, world! tokenizers work."
    );
    assert_eq!(tok.chat_template(), None);
}

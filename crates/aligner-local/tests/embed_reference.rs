//! The candle MiniLM embedder against a float64 numpy reference
//! (`scripts/fixtures/minilm_reference.py` wrote `fixtures/minilm_embeddings.json`), batched
//! against one by one, and paraphrases against unrelated sentences.

use std::path::PathBuf;

use aligner_local::embed::{cosine, Embedder};
use candle_core::Device;

/// `$ALIGNER_MODELS_DIR/all-MiniLM-L6-v2`, else `<repo>/models/all-MiniLM-L6-v2`.
fn minilm_dir() -> PathBuf {
    let models = match std::env::var_os("ALIGNER_MODELS_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models"),
    };
    let dir = models.join("all-MiniLM-L6-v2");
    assert!(
        dir.join("model.safetensors").is_file(),
        "all-MiniLM-L6-v2 is not in `{}`: run `aligner models fetch` (or set ALIGNER_MODELS_DIR)",
        dir.display()
    );
    dir
}

struct Reference {
    texts: Vec<String>,
    embeddings: Vec<Vec<f32>>,
}

fn reference() -> Reference {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/minilm_embeddings.json");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut r = Reference {
        texts: Vec::new(),
        embeddings: Vec::new(),
    };
    for s in v["sentences"].as_array().unwrap() {
        r.texts.push(s["text"].as_str().unwrap().to_string());
        r.embeddings.push(
            s["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect(),
        );
    }
    r
}

#[test]
fn minilm_matches_numpy_reference_batched_and_alone() {
    let embedder = Embedder::load(&minilm_dir(), &Device::Cpu).unwrap();
    assert_eq!(embedder.dim(), 384);
    assert_eq!(embedder.max_seq_length(), 256);
    let r = reference();
    let texts: Vec<&str> = r.texts.iter().map(String::as_str).collect();

    let batched = embedder.embed(&texts).unwrap();
    assert_eq!(batched.len(), texts.len());
    for (i, (got, want)) in batched.iter().zip(&r.embeddings).enumerate() {
        assert_eq!(got.len(), 384);
        let norm: f32 = got.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "text {i}: norm {norm}");
        let c = cosine(got, want);
        assert!(
            c > 0.9999,
            "text {i} ({:?}): cosine to reference {c}",
            texts[i]
        );
    }

    // One by one (no padding) agrees with the padded batch.
    for (i, text) in texts.iter().enumerate() {
        let alone = embedder.embed(&[text]).unwrap().remove(0);
        let max_diff = alone
            .iter()
            .zip(&batched[i])
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            max_diff < 1e-5,
            "text {i}: batched vs alone differ by {max_diff}"
        );
    }

    // More than one batch, in the caller's order, duplicates included.
    let many: Vec<&str> = (0..40).map(|i| texts[i % texts.len()]).collect();
    let out = embedder.embed(&many).unwrap();
    for (i, v) in out.iter().enumerate() {
        let c = cosine(v, &batched[i % texts.len()]);
        assert!(c > 0.99999, "item {i} out of order: {c}");
    }
    assert!(embedder.embed(&[]).unwrap().is_empty());
}

#[test]
fn paraphrases_score_higher_than_unrelated_sentences() {
    let embedder = Embedder::load(&minilm_dir(), &Device::Cpu).unwrap();
    let e = embedder
        .embed(&[
            "A man is playing a guitar.",
            "Someone is strumming a guitar.",
            "The stock market fell sharply on Monday.",
            "Shares dropped steeply at the start of the week.",
            "To reset your password, open Settings and choose Security.",
            "OPEN SETTINGS AND CHOOSE SECURITY TO RESET YOUR PASSWORD.",
        ])
        .unwrap();
    let guitar = cosine(&e[0], &e[1]);
    let market = cosine(&e[2], &e[3]);
    let password = cosine(&e[4], &e[5]);
    for (a, b) in [(0, 2), (0, 3), (1, 2), (1, 4), (3, 5)] {
        let unrelated = cosine(&e[a], &e[b]);
        assert!(
            guitar > unrelated + 0.4 && market > unrelated + 0.4,
            "paraphrases {guitar:.3}/{market:.3} vs unrelated {a},{b}: {unrelated:.3}"
        );
    }
    // The model is uncased: a case change alone is the same text.
    let upper = embedder
        .embed(&[
            "Hello World, this is a test.",
            "hello world, THIS IS A TEST.",
        ])
        .unwrap();
    assert!(cosine(&upper[0], &upper[1]) > 0.9999);
    assert!(password > 0.85, "reworded instructions: {password}");
}

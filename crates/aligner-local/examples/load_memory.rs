//! Where a GGUF model's memory goes while it loads: resident and peak memory (VmRSS, VmHWM)
//! after opening the file, after building its tokenizer, and after loading its weights.
//!
//! `cargo run --release -p aligner-local --example load_memory -- MODEL.gguf`

use anyhow::{Context, Result};

fn memory() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .filter(|l| l.starts_with("VmHWM") || l.starts_with("VmRSS"))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join(", ")
}

fn main() -> Result<()> {
    let path = std::env::args()
        .nth(1)
        .context("usage: load_memory MODEL.gguf")?;
    println!("start: {}", memory());
    let file = aligner_local::gguf::GgufFile::open(std::path::Path::new(&path))?;
    println!("file opened (metadata): {}", memory());
    let tokenizer = aligner_local::tokenizer::TextTokenizer::from_gguf(&file.content)?;
    println!("tokenizer built: {}", memory());
    let model = aligner_local::model::Model::from_gguf(&file)?;
    println!(
        "weights loaded ({} MB held): {}",
        model.weight_bytes() / 1_000_000,
        memory()
    );
    drop((file, tokenizer, model));
    Ok(())
}

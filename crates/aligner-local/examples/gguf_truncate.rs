//! Writes a copy of a llama GGUF that keeps only its first N transformer blocks: the
//! `blk.0..N-1` tensors, `token_embd`, `output_norm` and `output` (when present), with
//! `llama.block_count` set to N and every other metadata value unchanged. A small model of
//! the same shapes, for checks that must carry the model somewhere (a lent GPU machine).
//!
//! `cargo run --release -p aligner-local --example gguf_truncate -- IN.gguf OUT.gguf N`

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file::{self, Content, Value};
use candle_core::quantized::QTensor;
use candle_core::Device;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [input, output, n] = &args[..] else {
        bail!("usage: gguf_truncate IN.gguf OUT.gguf N");
    };
    let n: usize = n
        .parse()
        .with_context(|| format!("N must be a block count, got `{n}`"))?;
    truncate(Path::new(input), Path::new(output), n)?;
    // The copy must load as a model.
    let file = aligner_local::gguf::GgufFile::open(Path::new(output))?;
    let model = aligner_local::model::Model::from_gguf(&file)?;
    println!(
        "{}: {} layers, hidden {}, vocab {}, {} bytes",
        output,
        model.config.layers,
        model.config.hidden,
        model.config.vocab,
        std::fs::metadata(output)?.len()
    );
    Ok(())
}

fn keep(name: &str, n: usize) -> bool {
    match name.strip_prefix("blk.") {
        Some(rest) => rest
            .split('.')
            .next()
            .and_then(|i| i.parse::<usize>().ok())
            .is_some_and(|i| i < n),
        None => matches!(
            name.split_once(".weight").map_or(name, |(base, _)| base),
            "token_embd" | "output_norm" | "output"
        ),
    }
}

fn truncate(input: &Path, output: &Path, n: usize) -> Result<()> {
    let mut reader = BufReader::new(
        File::open(input).with_context(|| format!("cannot open {}", input.display()))?,
    );
    let content = Content::read(&mut reader)
        .map_err(|e| anyhow!("{} is not a readable GGUF file: {e}", input.display()))?;
    let arch = content
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .ok_or_else(|| anyhow!("{}: no general.architecture", input.display()))?;
    if arch != "llama" {
        bail!("only llama-architecture files are supported; found `{arch}`");
    }
    let key = "llama.block_count";
    let blocks = match content.metadata.get(key) {
        Some(Value::U32(x)) => *x as usize,
        Some(Value::U64(x)) => *x as usize,
        Some(Value::I32(x)) => *x as usize,
        other => bail!("{}: `{key}` is {other:?}", input.display()),
    };
    if n == 0 || n > blocks {
        bail!("N must be between 1 and {blocks}, got {n}");
    }
    let new_count = match &content.metadata[key] {
        Value::U32(_) => Value::U32(n as u32),
        Value::U64(_) => Value::U64(n as u64),
        _ => Value::I32(n as i32),
    };
    // Metadata: sorted by key for a deterministic file; candle's writer aligns to 32 bytes.
    let mut keys: Vec<&String> = content.metadata.keys().collect();
    keys.sort();
    let align32 = Value::U32(32);
    let metadata: Vec<(&str, &Value)> = keys
        .into_iter()
        .map(|k| {
            let v = match k.as_str() {
                "llama.block_count" => &new_count,
                "general.alignment" => &align32,
                _ => &content.metadata[k],
            };
            (k.as_str(), v)
        })
        .collect();
    // Tensors in their original order.
    let mut names: Vec<(&String, u64)> = content
        .tensor_infos
        .iter()
        .filter(|(name, _)| keep(name, n))
        .map(|(name, info)| (name, info.offset))
        .collect();
    names.sort_by_key(|(_, off)| *off);
    let tensors: Vec<(String, QTensor)> = names
        .iter()
        .map(|(name, _)| {
            content
                .tensor(&mut reader, name, &Device::Cpu)
                .map(|t| (name.to_string(), t))
                .map_err(|e| anyhow!("tensor `{name}`: {e}"))
        })
        .collect::<Result<_>>()?;
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut w = BufWriter::new(
        File::create(output).with_context(|| format!("cannot create {}", output.display()))?,
    );
    gguf_file::write(&mut w, &metadata, &refs).map_err(|e| anyhow!("writing GGUF: {e}"))?;
    w.flush()?;
    eprintln!(
        "kept {} of {} tensors ({n} of {blocks} blocks)",
        refs.len(),
        content.tensor_infos.len()
    );
    Ok(())
}

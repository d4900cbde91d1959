//! A trained checkpoint as a re-quantized GGUF for fast local inference (`aligner export-gguf`):
//! the weights in llama.cpp's names and q/k row layout, quantized per tensor, and every
//! metadata key (tokenizer, chat template, rope and norm constants) taken from a GGUF of the
//! same architecture, usually the model the checkpoint was trained from.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use aligner_local::gguf::GgufFile;

use crate::model::{Config, Weights};

/// The quantizations `aligner export-gguf --type` offers.
pub fn parse_type(name: &str) -> Result<GgmlDType> {
    Ok(match name.to_ascii_lowercase().as_str() {
        "f32" => GgmlDType::F32,
        "f16" => GgmlDType::F16,
        "q8_0" => GgmlDType::Q8_0,
        "q4_0" => GgmlDType::Q4_0,
        "q4_1" => GgmlDType::Q4_1,
        other => bail!("unknown GGUF type `{other}`\nhint: use f32, f16, q8_0, q4_0 or q4_1"),
    })
}

/// llama.cpp's `general.file_type` for a whole-model quantization.
fn file_type(dtype: GgmlDType) -> u32 {
    match dtype {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q8_0 => 7,
        _ => 0,
    }
}

/// Applies llama.cpp's q/k row permutation (the inverse of [`crate::model::unpermute_rows`]):
/// Hugging Face row `h*hd + j*hd/2 + i` becomes GGUF row `h*hd + 2i + j`.
pub fn permute_rows(w: &[f32], heads: usize, rows: usize, cols: usize) -> Vec<f32> {
    crate::model::reorder_qk_rows(w, heads, rows, cols, true)
}

/// What was written.
#[derive(Debug, Clone)]
pub struct Exported {
    pub tensors: usize,
    pub bytes: u64,
}

/// Writes `weights` (Hugging Face names and layout, as [`crate::model::hf_weights`] reads a
/// checkpoint) to `out` as GGUF, matrices in `dtype` (norms and biases stay f32), with the
/// metadata of `template`, whose shape must match `config`. Written under a temporary name and
/// renamed, so a half-written file never has the final name.
pub fn export_gguf(
    config: &Config,
    weights: &Weights,
    template: &Path,
    out: &Path,
    dtype: GgmlDType,
) -> Result<Exported> {
    let file = GgufFile::open(template)?;
    let arch = file
        .string("general.architecture")
        .unwrap_or_else(|_| "llama".into());
    if arch != config.architecture {
        bail!(
            "{} is a `{arch}` model, the checkpoint a `{}` one\nhint: take the metadata from the GGUF the checkpoint was trained from",
            template.display(),
            config.architecture
        );
    }
    for (key, want) in [
        ("block_count", config.layers),
        ("embedding_length", config.hidden),
        ("feed_forward_length", config.intermediate),
        ("attention.head_count", config.heads),
    ] {
        let got = file.usize(&format!("{arch}.{key}"))?;
        if got != want {
            bail!(
                "{}: `{arch}.{key}` is {got}, the checkpoint has {want}\nhint: take the metadata from the GGUF the checkpoint was trained from",
                template.display()
            );
        }
    }
    let embed_dims = file.dims("token_embd.weight")?;
    if embed_dims[0] != config.vocab {
        bail!(
            "{}: a vocabulary of {} tokens, the checkpoint has {}\nhint: take the metadata from the GGUF the checkpoint was trained from",
            template.display(),
            embed_dims[0],
            config.vocab
        );
    }

    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut add = |gguf: String, hf: &str, permute: Option<usize>| -> Result<()> {
        let (shape, values) = weights
            .get(hf)
            .ok_or_else(|| anyhow!("the checkpoint has no `{hf}`"))?;
        let values = match (permute, &shape[..]) {
            (Some(nh), [rows, cols]) => permute_rows(values, nh, *rows, *cols),
            (Some(nh), [rows]) => permute_rows(values, nh, *rows, 1),
            _ => values.clone(),
        };
        let t = Tensor::from_vec(values, shape.as_slice(), &Device::Cpu)?;
        // Vectors (norms, biases) stay f32 as llama.cpp keeps them; a matrix whose rows do not
        // fill whole quantization blocks falls back to f16.
        let ty = if shape.len() == 1 {
            GgmlDType::F32
        } else if shape[shape.len() - 1] % dtype.block_size() != 0 {
            GgmlDType::F16
        } else {
            dtype
        };
        let q = QTensor::quantize(&t, ty).with_context(|| format!("quantizing `{hf}`"))?;
        tensors.push((gguf, q));
        Ok(())
    };
    for (gguf, hf, permute) in crate::model::gguf_tensor_names(config) {
        add(gguf, &hf, permute)?;
    }

    let mut metadata: Vec<(String, Value)> = file
        .content
        .metadata
        .iter()
        .filter(|(k, _)| k.as_str() != "general.file_type")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    metadata.push(("general.file_type".into(), Value::U32(file_type(dtype))));
    metadata.sort_by(|a, b| a.0.cmp(&b.0));

    let tmp = out.with_extension("gguf.partial");
    {
        let f = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut w = std::io::BufWriter::new(f);
        let meta: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tens: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        candle_core::quantized::gguf_file::write(&mut w, &meta, &tens)
            .with_context(|| format!("writing {}", tmp.display()))?;
        use std::io::Write;
        w.flush()?;
    }
    std::fs::rename(&tmp, out)
        .with_context(|| format!("cannot move the GGUF to {}", out.display()))?;
    Ok(Exported {
        tensors: tensors.len(),
        bytes: std::fs::metadata(out)?.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_inverts_the_readers() {
        let (heads, rows, cols) = (3, 12, 5);
        let w: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        let p = permute_rows(&w, heads, rows, cols);
        assert_ne!(p, w);
        assert_eq!(crate::model::unpermute_rows(&p, heads, rows, cols), w);
    }

    #[test]
    fn types_parse() {
        assert_eq!(parse_type("Q8_0").unwrap(), GgmlDType::Q8_0);
        assert!(parse_type("q3_k").unwrap_err().to_string().contains("hint"));
    }
}

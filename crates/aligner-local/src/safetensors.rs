//! Hugging Face safetensors checkpoints (one file or shards) into [`Weight`]s.

// `unsafe` here: only to memory-map the checkpoint files (candle's `MmapedSafetensors`).
#![allow(unsafe_code)]

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::quant::Weight;

pub struct SafeTensors {
    dir: PathBuf,
    st: MmapedSafetensors,
    names: std::collections::HashSet<String>,
    /// `f32`, `bf16` or `auto` (bf16 files stay bf16, everything else becomes f32).
    dtype: String,
}

/// The `*.safetensors` files of a Hugging Face model folder, in name order (shards in
/// sequence); an error with a hint when there are none.
pub fn files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| anyhow!("cannot read model folder {}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!(
            "{}: no *.safetensors file\nhint: a Hugging Face model folder holds config.json, tokenizer.json, tokenizer_config.json and model*.safetensors; for a .gguf file give its path",
            dir.display()
        );
    }
    Ok(files)
}

impl SafeTensors {
    pub fn open(dir: &Path, dtype: &str) -> Result<Self> {
        let files = files(dir)?;
        if !matches!(dtype, "f32" | "bf16" | "auto" | "q8_0") {
            bail!("dtype `{dtype}` is not supported on the CPU path\nhint: use f32, bf16, q8_0 or auto");
        }
        // SAFETY: the files are memory-mapped read-only; we never write through the map, and
        // a checkpoint changing under a running process is outside what we support.
        let st = unsafe { MmapedSafetensors::multi(&files) }
            .map_err(|e| anyhow!("{}: reading safetensors: {e}", dir.display()))?;
        let names = st.tensors().into_iter().map(|(n, _)| n).collect();
        Ok(SafeTensors {
            dir: dir.to_path_buf(),
            st,
            names,
            dtype: dtype.to_string(),
        })
    }

    pub fn has(&self, name: &str) -> bool {
        self.names.contains(name)
    }

    fn load(&self, name: &str) -> Result<Tensor> {
        if !self.has(name) {
            bail!(
                "{}: tensor `{name}` is missing from the safetensors files",
                self.dir.display()
            );
        }
        self.st
            .load(name, &Device::Cpu)
            .map_err(|e| anyhow!("{}: tensor `{name}`: {e}", self.dir.display()))
    }

    pub fn weight(&self, name: &str) -> Result<Weight> {
        let t = self.load(name)?;
        let (rows, cols) = t
            .dims2()
            .map_err(|e| anyhow!("{}: `{name}`: {e}", self.dir.display()))?;
        let keep_bf16 = self.dtype == "bf16" || (self.dtype == "auto" && t.dtype() == DType::BF16);
        let conv = |e: candle_core::Error| anyhow!("{}: `{name}`: {e}", self.dir.display());
        if keep_bf16 {
            let w = t
                .to_dtype(DType::BF16)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<half::bf16>())
                .map_err(conv)?;
            Ok(Weight::Bf16 { rows, cols, w })
        } else {
            let w = t
                .to_dtype(DType::F32)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(conv)?;
            if self.dtype == "q8_0" && cols % crate::quant::QK == 0 {
                return Ok(Weight::quantize_q8_0(rows, cols, &w).into_fastest_layout());
            }
            Ok(Weight::F32 { rows, cols, w })
        }
    }

    pub fn vector(&self, name: &str) -> Result<Vec<f32>> {
        self.load(name)?
            .to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| anyhow!("{}: `{name}`: {e}", self.dir.display()))
    }

    pub fn optional_vector(&self, name: &str) -> Result<Option<Vec<f32>>> {
        if self.has(name) {
            Ok(Some(self.vector(name)?))
        } else {
            Ok(None)
        }
    }
}

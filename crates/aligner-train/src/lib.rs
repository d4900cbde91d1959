//! The built-in trainer: llama-family models whose weights are candle variables, the SFT and
//! DPO losses (sigmoid, IPO, sigmoid + NLL, label smoothing), LoRA adapters, AdamW with a
//! cosine schedule, gradient accumulation and global-norm clipping, and checkpoints written as
//! Hugging Face folders that transformers, vLLM and `aligner-local` load as they are.
//!
//! Only differentiable candle operations are used: candle's fused `softmax_last_dim`,
//! `rms_norm` and `rope` kernels record no gradient, so their compositions from basic ops are
//! written out here (and a test checks that every trainable parameter gets a gradient).

pub mod checkpoint;
pub mod data;
pub mod kernels;
pub mod loss;
pub mod model;
pub mod optim;
pub mod trainer;

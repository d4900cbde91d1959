//! Local models for aligner: llama-family GGUF and Hugging Face checkpoints executed on the
//! CPU (SIMD kernels over GGML block formats, continuous batching) or through candle on a
//! GPU, with tokenizers built from GGUF metadata or `tokenizer.json`, the model's own chat
//! template, and MiniLM sentence embeddings.
//!
//! The crate takes the workspace's `unsafe_code = "deny"`. It is allowed, each time with the
//! reason, only in the modules that need it: the SIMD kernels (`quant`, `tiled`), the shared
//! output pointer their parallel writes go through (`sync_ptr`), memory-mapping safetensors
//! files (`safetensors`), and in `model` on the attention function alone (its disjoint writes).

pub mod backend;
pub mod blocks;
pub mod chat;
pub mod config;
pub mod device;
pub mod embed;
pub mod engine;
pub mod fetch;
pub mod gguf;
pub mod model;
pub mod quant;
pub mod safetensors;
pub mod sampling;
pub mod shared;
pub mod sync_ptr;
pub mod tiled;
pub mod tokenizer;

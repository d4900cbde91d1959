//! Local models for aligner: llama-family GGUF and Hugging Face checkpoints executed on the
//! CPU (SIMD kernels over GGML block formats, continuous batching) or through candle on a
//! GPU, with tokenizers built from GGUF metadata or `tokenizer.json`, the model's own chat
//! template, and MiniLM sentence embeddings.
//!
//! `unsafe` in this crate is confined to the SIMD kernels (`quant`), the disjoint parallel
//! writes of the matrix products and attention (`quant`, `model`), and memory-mapping
//! safetensors files (`safetensors`).

pub mod backend;
pub mod chat;
pub mod device;
pub mod embed;
pub mod engine;
pub mod gguf;
pub mod model;
pub mod quant;
pub mod safetensors;
pub mod sampling;
pub mod tiled;
pub mod tokenizer;

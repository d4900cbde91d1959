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
pub mod fused;
pub mod gguf_export;
pub mod kernels;
pub mod loss;
pub mod model;
pub mod optim;
pub mod pipeline;
pub mod trainer;
pub mod vmath;

/// Keeps large freed buffers in the process heap instead of returning them to the system.
/// A training step allocates and frees the same few hundred megabytes of activations and
/// gradients every step (logits alone are 100 MB at 512 tokens); with glibc's defaults each
/// large allocation is a fresh `mmap` whose pages the kernel faults in and zeroes again. With
/// no `mmap` allocations and no trimming, freed blocks are reused. Call once at startup,
/// before threads start.
// `unsafe` only for the libc call, so it is allowed on this function alone.
#[allow(unsafe_code)]
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt takes plain integers (no pointer, no memory is touched) and only
        // changes glibc's allocator thresholds; it is called once at startup, before other
        // threads allocate.
        unsafe {
            libc::mallopt(libc::M_MMAP_MAX, 0);
            libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
        }
    }
}

